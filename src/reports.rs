//! Support reports over the server store: the questions the seed's readers asked of a Dynamics
//! CRM organisation database (DOMAIN section 2, "Support queries"), as typed functions.
//!
//! - [`whois`]: which user, machine and subscription a `SyncEntry_<guid>` table belongs to;
//! - [`sync_report`]: per user and subscription, the number of syncs, the sum, max and min of
//!   `DataSize` and the total `InsertObjectCount` (the seed's `SubscriptionSyncInfo` query);
//! - [`orphans`]: subscriptions with no `SubscriptionClients` row, `SyncEntry_*` tables with no
//!   subscription, and duplicate subscriptions of one user and machine;
//! - [`cleanup_candidates`] and [`cleanup_apply`]: subscriptions whose machine last synced before
//!   a cutoff, listed first (a dry run changes nothing) and then removed in one transaction.
//!
//! Every function but [`cleanup_apply`] only reads. Rows that do not parse (a bad GUID, an
//! unknown `SubscriptionType`, a time that is not RFC 3339) are [`ReportError::Corrupt`] carrying
//! the value, never a panic. No text from outside is put into SQL: a table name is accepted only
//! as [`SyncEntryTable`] (`SyncEntry_` and 32 hex digits), and the one statement that names a
//! table ([`cleanup_apply`]'s `DROP TABLE`) spells it from a parsed `SubscriptionId`.
//!
//! Choices DOMAIN leaves open, documented here:
//! - Cleanup keeps the `SubscriptionSyncInfo` rows of a removed subscription: they are the sync
//!   history support asks about afterwards (when did this machine last sync, how much did it
//!   pull), and `unregister_client` keeps them too. [`sync_report`] reports only subscriptions
//!   that still exist (as the seed's query does, by joining `Subscription`), so the history of a
//!   removed one stays in the table under its `SubscriptionId` and leaves the report.
//! - Cleanup never makes another client primary: that is an explicit, logged act (DOMAIN). A
//!   candidate says whether it is its user's primary client, so the operator sees it.
//! - Duplicates are subscriptions of one user, one kind and one machine name (compared without
//!   ASCII case: Windows machine names are case-insensitive). A user with an Outlook and an
//!   Offline subscription on one machine has no duplicate; a user who reinstalled the client has.
//! - A subscription that never synced is as old as its `CreatedOn`.

use std::collections::BTreeMap;
use std::fmt::{self, Write};
use std::str::FromStr;

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::server::{ServerStore, SubscriptionId, SubscriptionType, SystemUserId, remove_subscription_rows};

/// The prefix of every SyncEntry table's name.
pub const SYNC_ENTRY_PREFIX: &str = "SyncEntry_";
/// Longest piece of an offending value an error carries, in characters (input can be any size).
pub const ERROR_VALUE_LEN_MAX: usize = 256;
/// Longest cleanup age accepted: 100 years.
pub const CLEANUP_AGE_DAYS_MAX: i64 = 36_525;

/// Why a report could not be made. Every variant carries the offending value.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{0:?} is not a SyncEntry table name (SyncEntry_ followed by 32 hex digits)")]
    BadTableName(String),
    #[error("cleanup age {0} is not between zero and {CLEANUP_AGE_DAYS_MAX} days")]
    BadAge(Duration),
    #[error("{table}.{column} holds {value:?}, which is not valid")]
    Corrupt { table: &'static str, column: &'static str, value: String },
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

fn clipped(value: &str) -> String {
    value.chars().take(ERROR_VALUE_LEN_MAX).collect()
}

fn corrupt(table: &'static str, column: &'static str, value: impl fmt::Display) -> ReportError {
    ReportError::Corrupt { table, column, value: clipped(&value.to_string()) }
}

/// The name of a subscription's SyncEntry table, validated: `SyncEntry_` (in any ASCII case) and
/// 32 hex digits of a non-nil GUID. It displays as the server writes it (lowercase hex).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SyncEntryTable(SubscriptionId);

impl SyncEntryTable {
    /// The table of `subscription`.
    pub fn of(subscription: SubscriptionId) -> Self {
        SyncEntryTable(subscription)
    }

    /// The subscription whose id the name spells.
    pub fn subscription(&self) -> SubscriptionId {
        self.0
    }
}

impl FromStr for SyncEntryTable {
    type Err = ReportError;

    fn from_str(name: &str) -> Result<Self, ReportError> {
        let bad = || ReportError::BadTableName(clipped(name));
        let (prefix, hex) = name.split_at_checked(SYNC_ENTRY_PREFIX.len()).ok_or_else(bad)?;
        // `Uuid::parse_str` also takes hyphens, braces and `urn:`; the name is 32 digits only.
        if !prefix.eq_ignore_ascii_case(SYNC_ENTRY_PREFIX)
            || hex.len() != 32
            || !hex.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(bad());
        }
        let uuid = Uuid::parse_str(hex).map_err(|_| bad())?;
        SubscriptionId::new(uuid).map(SyncEntryTable).map_err(|_| bad())
    }
}

impl TryFrom<String> for SyncEntryTable {
    type Error = ReportError;
    fn try_from(name: String) -> Result<Self, ReportError> {
        name.parse()
    }
}

impl From<SyncEntryTable> for String {
    fn from(table: SyncEntryTable) -> String {
        table.to_string()
    }
}

impl fmt::Display for SyncEntryTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.sync_entry_table())
    }
}

impl fmt::Debug for SyncEntryTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SyncEntryTable({self})")
    }
}

/// One subscription as the reports show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionInfo {
    pub subscription: SubscriptionId,
    pub table: SyncEntryTable,
    pub user: SystemUserId,
    /// `None` when the user has no `SystemUser` row.
    pub full_name: Option<String>,
    pub machine: String,
    pub subscription_type: SubscriptionType,
    pub created_on: DateTime<Utc>,
    /// `None` when it never synced.
    pub last_sync_started_on: Option<DateTime<Utc>>,
    /// `IsPrimaryClient` of its `SubscriptionClients` row; `None` when it has none.
    pub primary_client: Option<bool>,
}

impl SubscriptionInfo {
    /// When its machine was last seen: the last sync's start, or its creation if it never synced.
    pub fn last_active(&self) -> DateTime<Utc> {
        self.last_sync_started_on.unwrap_or(self.created_on)
    }

    /// Whether `other` is this subscription as it was: same user, machine, kind, creation and
    /// last sync. (The user's name and which client is primary may change meanwhile.)
    fn unchanged_since(&self, other: &SubscriptionInfo) -> bool {
        self.subscription == other.subscription
            && self.user == other.user
            && self.machine == other.machine
            && self.subscription_type == other.subscription_type
            && self.created_on == other.created_on
            && self.last_sync_started_on == other.last_sync_started_on
    }
}

/// Whose a `SyncEntry_<guid>` table is.
pub type SyncEntryOwner = SubscriptionInfo;

/// The syncs of one subscription (the seed's `SubscriptionSyncInfo` query, one row per
/// subscription; a subscription that never synced has no row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReportRow {
    pub user: SystemUserId,
    pub full_name: Option<String>,
    pub subscription: SubscriptionId,
    pub subscription_type: SubscriptionType,
    pub machine: String,
    /// `SubscriptionSyncInfo` rows: one per prepare sync.
    pub syncs: u64,
    /// `DataSize` (bytes of field data handed out) over its syncs.
    pub data_size_sum: u64,
    pub data_size_max: u64,
    pub data_size_min: u64,
    /// `InsertObjectCount` over its syncs.
    pub insert_object_count_sum: u64,
}

/// The subscriptions of one user, kind and machine, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DuplicateSubscriptions {
    pub user: SystemUserId,
    pub full_name: Option<String>,
    pub machine: String,
    pub subscription_type: SubscriptionType,
    /// Two or more, by `CreatedOn` then id.
    pub subscriptions: Vec<SubscriptionInfo>,
}

/// What no longer hangs together.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orphans {
    /// Subscriptions with no `SubscriptionClients` row.
    pub without_client: Vec<SubscriptionInfo>,
    /// `SyncEntry_*` tables no subscription names, as they are named in the file.
    pub tables_without_subscription: Vec<String>,
    /// Groups of subscriptions of one user and machine.
    pub duplicates: Vec<DuplicateSubscriptions>,
}

impl Orphans {
    pub fn is_empty(&self) -> bool {
        self.without_client.is_empty()
            && self.tables_without_subscription.is_empty()
            && self.duplicates.is_empty()
    }
}

/// A subscription whose machine was last active before `cutoff`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupCandidate {
    #[serde(flatten)]
    pub info: SubscriptionInfo,
    /// The cutoff it was listed against; [`cleanup_apply`] checks it again.
    pub cutoff: DateTime<Utc>,
}

/// Columns of [`SubscriptionInfo`], in the order [`subscription_info`] reads them.
const SUBSCRIPTION_SELECT: &str = "SELECT s.SubscriptionId, s.SyncEntryTableName, s.SystemUserId, u.FullName, \
     s.MachineName, s.SubscriptionType, s.CreatedOn, s.LastSyncStartedOn, \
     (SELECT MAX(c.IsPrimaryClient) FROM SubscriptionClients c WHERE c.SubscriptionId = s.SubscriptionId) \
     FROM Subscription s LEFT JOIN SystemUser u ON u.SystemUserId = s.SystemUserId";

/// The raw columns of one subscription row, before parsing.
struct RawSubscription {
    id: String,
    table: String,
    user: String,
    full_name: Option<String>,
    machine: String,
    kind: i64,
    created_on: String,
    last_sync: Option<String>,
    primary: Option<i64>,
}

fn raw_subscription(r: &Row<'_>) -> rusqlite::Result<RawSubscription> {
    Ok(RawSubscription {
        id: r.get(0)?,
        table: r.get(1)?,
        user: r.get(2)?,
        full_name: r.get(3)?,
        machine: r.get(4)?,
        kind: r.get(5)?,
        created_on: r.get(6)?,
        last_sync: r.get(7)?,
        primary: r.get(8)?,
    })
}

fn parse_subscription_id(table: &'static str, text: &str) -> Result<SubscriptionId, ReportError> {
    text.parse().map_err(|_| corrupt(table, "SubscriptionId", text))
}

fn parse_user(table: &'static str, text: &str) -> Result<SystemUserId, ReportError> {
    text.parse().map_err(|_| corrupt(table, "SystemUserId", text))
}

fn parse_kind(code: i64) -> Result<SubscriptionType, ReportError> {
    SubscriptionType::from_code(code).ok_or_else(|| corrupt("Subscription", "SubscriptionType", code))
}

fn parse_time(table: &'static str, column: &'static str, text: &str) -> Result<DateTime<Utc>, ReportError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| corrupt(table, column, text))
}

fn count(table: &'static str, column: &'static str, value: i64) -> Result<u64, ReportError> {
    u64::try_from(value).map_err(|_| corrupt(table, column, value))
}

fn subscription_info(raw: RawSubscription) -> Result<SubscriptionInfo, ReportError> {
    let subscription = parse_subscription_id("Subscription", &raw.id)?;
    // The name is derived from the id; a row where they disagree would make a report (and a
    // cleanup's DROP TABLE) talk about another subscription's table.
    if !raw.table.eq_ignore_ascii_case(&subscription.sync_entry_table()) {
        return Err(corrupt("Subscription", "SyncEntryTableName", &raw.table));
    }
    let primary_client = match raw.primary {
        None => None,
        Some(0) => Some(false),
        Some(1) => Some(true),
        Some(other) => return Err(corrupt("SubscriptionClients", "IsPrimaryClient", other)),
    };
    Ok(SubscriptionInfo {
        subscription,
        table: SyncEntryTable::of(subscription),
        user: parse_user("Subscription", &raw.user)?,
        full_name: raw.full_name,
        machine: raw.machine,
        subscription_type: parse_kind(raw.kind)?,
        created_on: parse_time("Subscription", "CreatedOn", &raw.created_on)?,
        last_sync_started_on: raw
            .last_sync
            .map(|t| parse_time("Subscription", "LastSyncStartedOn", &t))
            .transpose()?,
        primary_client,
    })
}

/// Every subscription, by user, machine, kind, creation and id.
fn all_subscriptions(conn: &Connection) -> Result<Vec<SubscriptionInfo>, ReportError> {
    let mut stmt = conn.prepare(&format!(
        "{SUBSCRIPTION_SELECT} ORDER BY s.SystemUserId, s.MachineName, s.SubscriptionType, s.CreatedOn, \
         s.SubscriptionId"
    ))?;
    let raws = stmt.query_map([], raw_subscription)?.collect::<Result<Vec<_>, _>>()?;
    raws.into_iter().map(subscription_info).collect()
}

/// The subscription `id`, if there is one.
fn one_subscription(conn: &Connection, id: SubscriptionId) -> Result<Option<SubscriptionInfo>, ReportError> {
    let raw = conn
        .query_row(&format!("{SUBSCRIPTION_SELECT} WHERE s.SubscriptionId = ?1"), [id.to_string()], |r| {
            raw_subscription(r)
        })
        .optional()?;
    raw.map(subscription_info).transpose()
}

/// The subscription whose SyncEntry table is `table_name`, or `None` if no subscription names it.
/// `table_name` must be `SyncEntry_` and 32 hex digits ([`ReportError::BadTableName`] otherwise).
pub fn whois(store: &ServerStore, table_name: &str) -> Result<Option<SyncEntryOwner>, ReportError> {
    let table: SyncEntryTable = table_name.parse()?;
    let conn = store.connection();
    let raw = conn
        .query_row(
            &format!("{SUBSCRIPTION_SELECT} WHERE s.SyncEntryTableName = ?1 COLLATE NOCASE"),
            [table.to_string()],
            raw_subscription,
        )
        .optional()?;
    raw.map(subscription_info).transpose()
}

/// Per user and subscription: syncs, `DataSize` sum/max/min and total `InsertObjectCount`, by
/// full name, user, kind, machine, creation and subscription.
pub fn sync_report(store: &ServerStore) -> Result<Vec<SyncReportRow>, ReportError> {
    let conn = store.connection();
    let mut stmt = conn.prepare(
        "SELECT s.SystemUserId, u.FullName, s.SubscriptionId, s.SubscriptionType, s.MachineName, COUNT(*), \
         SUM(i.DataSize), MAX(i.DataSize), MIN(i.DataSize), SUM(i.InsertObjectCount) \
         FROM SubscriptionSyncInfo i JOIN Subscription s ON s.SubscriptionId = i.SubscriptionId \
         LEFT JOIN SystemUser u ON u.SystemUserId = s.SystemUserId \
         GROUP BY s.SubscriptionId \
         ORDER BY u.FullName, s.SystemUserId, s.SubscriptionType, s.MachineName, s.CreatedOn, s.SubscriptionId",
    )?;
    let rows = stmt.query_map([], |r| {
        let raw = (r.get::<_, String>(0)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?);
        let counts: [i64; 5] = [r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?];
        Ok(report_row(raw, r.get(1)?, r.get(4)?, counts))
    })?;
    rows.map(|row| row?).collect()
}

/// One row of the sync report from its columns: (user, subscription, kind), the full name, the
/// machine, and [syncs, DataSize sum, max, min, InsertObjectCount sum].
fn report_row(
    (user, subscription, kind): (String, String, i64),
    full_name: Option<String>,
    machine: String,
    [syncs, sum, max, min, inserts]: [i64; 5],
) -> Result<SyncReportRow, ReportError> {
    const T: &str = "SubscriptionSyncInfo";
    // The minimum first: a negative row shows as itself, where the sum could hide it.
    let data_size_min = count(T, "DataSize", min)?;
    Ok(SyncReportRow {
        user: parse_user("Subscription", &user)?,
        full_name,
        subscription: parse_subscription_id("Subscription", &subscription)?,
        subscription_type: parse_kind(kind)?,
        machine,
        syncs: count(T, "SyncInfoId", syncs)?,
        data_size_sum: count(T, "DataSize", sum)?,
        data_size_max: count(T, "DataSize", max)?,
        data_size_min,
        insert_object_count_sum: count(T, "InsertObjectCount", inserts)?,
    })
}

/// Subscriptions with no client row, SyncEntry tables with no subscription, and duplicate
/// subscriptions of one user, kind and machine; each list in a stable order.
pub fn orphans(store: &ServerStore) -> Result<Orphans, ReportError> {
    let conn = store.connection();
    let subscriptions = all_subscriptions(conn)?;
    let without_client = subscriptions.iter().filter(|s| s.primary_client.is_none()).cloned().collect();
    // Table names are case-insensitive in SQLite; LIKE is too, for ASCII.
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'SyncEntry\\_%' ESCAPE '\\' \
         AND lower(name) NOT IN (SELECT lower(SyncEntryTableName) FROM Subscription) ORDER BY name",
    )?;
    let tables_without_subscription = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    let mut groups: BTreeMap<(SystemUserId, String, SubscriptionType), Vec<SubscriptionInfo>> =
        BTreeMap::new();
    for s in subscriptions {
        groups.entry((s.user, s.machine.to_ascii_uppercase(), s.subscription_type)).or_default().push(s);
    }
    let duplicates = groups
        .into_values()
        .filter(|group| group.len() > 1)
        .map(|mut subscriptions| {
            subscriptions.sort_by_key(|s| (s.created_on, s.subscription));
            let first = &subscriptions[0];
            DuplicateSubscriptions {
                user: first.user,
                full_name: first.full_name.clone(),
                machine: first.machine.clone(),
                subscription_type: first.subscription_type,
                subscriptions,
            }
        })
        .collect();
    Ok(Orphans { without_client, tables_without_subscription, duplicates })
}

/// The store's clock, read back.
fn store_now(store: &ServerStore) -> Result<DateTime<Utc>, ReportError> {
    parse_time("clock", "now", &store.now())
}

/// `older_than` before the store's clock: what [`cleanup_candidates`] compares with.
pub fn cleanup_cutoff(store: &ServerStore, older_than: Duration) -> Result<DateTime<Utc>, ReportError> {
    let max = Duration::try_days(CLEANUP_AGE_DAYS_MAX).ok_or(ReportError::BadAge(older_than))?;
    if older_than < Duration::zero() || older_than > max {
        return Err(ReportError::BadAge(older_than));
    }
    store_now(store)?.checked_sub_signed(older_than).ok_or(ReportError::BadAge(older_than))
}

/// Subscriptions last active (last sync started, or created if never synced) more than
/// `older_than` ago by the store's clock, oldest first. Reads only.
pub fn cleanup_candidates(
    store: &ServerStore,
    older_than: Duration,
) -> Result<Vec<CleanupCandidate>, ReportError> {
    cleanup_candidates_before(store, cleanup_cutoff(store, older_than)?)
}

/// Subscriptions last active before `cutoff`, oldest first. Reads only.
pub fn cleanup_candidates_before(
    store: &ServerStore,
    cutoff: DateTime<Utc>,
) -> Result<Vec<CleanupCandidate>, ReportError> {
    let mut out: Vec<CleanupCandidate> = all_subscriptions(store.connection())?
        .into_iter()
        .filter(|s| s.last_active() < cutoff)
        .map(|info| CleanupCandidate { info, cutoff })
        .collect();
    out.sort_by_key(|c| (c.info.last_active(), c.info.subscription));
    Ok(out)
}

/// Removes each candidate that still is one, in one transaction: its `Subscription` row, its
/// `SubscriptionClients` rows, its `PreparedChange` rows and its SyncEntry table. Its
/// `SubscriptionSyncInfo` history is kept (see the module docs). Returns what it removed, as it
/// was just before; a candidate that is gone, changed (it synced since it was listed) or no longer
/// older than its cutoff is left alone and not returned. On any error nothing is removed.
pub fn cleanup_apply(
    store: &mut ServerStore,
    candidates: &[CleanupCandidate],
) -> Result<Vec<CleanupCandidate>, ReportError> {
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let now = store_now(store)?;
    let conn = store.connection();
    // IMMEDIATE: take the write lock before re-reading, so no sync slips in between the check
    // and the delete.
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    let mut removed = Vec::new();
    for candidate in candidates {
        // A candidate listed twice is gone the second time: the transaction sees its own deletes.
        let Some(current) = one_subscription(&tx, candidate.info.subscription)? else { continue };
        let still = current.unchanged_since(&candidate.info)
            && candidate.cutoff <= now
            && current.last_active() < candidate.cutoff;
        if !still {
            continue;
        }
        remove_subscription_rows(&tx, current.subscription)?;
        removed.push(CleanupCandidate { info: current, cutoff: candidate.cutoff });
    }
    tx.commit()?;
    Ok(removed)
}

// ---- Text: the tables the `crmsync` tool prints ----

/// A time as the tables show it: RFC 3339 to the second, UTC.
fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Text from the file, with control characters escaped so a cell stays on its line.
fn cell(text: &str) -> String {
    if text.chars().any(char::is_control) { text.escape_debug().to_string() } else { text.to_owned() }
}

fn name(full_name: &Option<String>) -> String {
    full_name.as_deref().map_or_else(|| "-".to_owned(), cell)
}

fn primary(p: Option<bool>) -> &'static str {
    match p {
        Some(true) => "yes",
        Some(false) => "no",
        None => "no client row",
    }
}

fn last_sync(s: &SubscriptionInfo) -> String {
    s.last_sync_started_on.map_or_else(|| format!("never (created {})", time(s.created_on)), time)
}

/// Left-aligned text columns, right-aligned number columns, two spaces apart, no trailing space.
struct Table {
    header: Vec<&'static str>,
    numeric: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[(&'static str, bool)]) -> Self {
        Table {
            header: columns.iter().map(|c| c.0).collect(),
            numeric: columns.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len());
        self.rows.push(cells);
    }

    fn drop_first_column(&mut self) {
        self.header.remove(0);
        self.numeric.remove(0);
        for row in &mut self.rows {
            row.remove(0);
        }
    }

    fn render(&self, out: &mut String) {
        let width = |i: usize| {
            self.rows.iter().map(|r| r[i].chars().count()).chain([self.header[i].len()]).max().unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.header.len()).map(width).collect();
        let header: Vec<String> = self.header.iter().map(|h| (*h).to_owned()).collect();
        for cells in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, text) in cells.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = widths[i] - text.chars().count();
                if self.numeric[i] {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(text);
                } else {
                    line.push_str(text);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
}

/// One row per subscription; with `groups`, a first column numbering the group each row is in.
fn subscriptions_table(subscriptions: &[(usize, &SubscriptionInfo)], groups: bool, out: &mut String) {
    let mut t = Table::new(&[
        ("GROUP", true),
        ("FULL NAME", false),
        ("USER", false),
        ("MACHINE", false),
        ("TYPE", false),
        ("LAST SYNC", false),
        ("PRIMARY", false),
        ("SUBSCRIPTION", false),
        ("SYNCENTRY TABLE", false),
    ]);
    for (group, s) in subscriptions {
        t.row(vec![
            group.to_string(),
            name(&s.full_name),
            s.user.to_string(),
            cell(&s.machine),
            s.subscription_type.name().to_owned(),
            last_sync(s),
            primary(s.primary_client).to_owned(),
            s.subscription.to_string(),
            s.table.to_string(),
        ]);
    }
    if !groups {
        t.drop_first_column();
    }
    t.render(out);
}

/// `whois` as `name: value` lines.
pub fn render_whois(owner: &SyncEntryOwner) -> String {
    let mut out = String::new();
    let lines = [
        ("table", owner.table.to_string()),
        ("user", owner.user.to_string()),
        ("full name", name(&owner.full_name)),
        ("machine", cell(&owner.machine)),
        ("type", owner.subscription_type.name().to_owned()),
        ("subscription", owner.subscription.to_string()),
        ("created", time(owner.created_on)),
        ("last sync", owner.last_sync_started_on.map_or_else(|| "never".to_owned(), time)),
        ("primary", primary(owner.primary_client).to_owned()),
    ];
    for (label, value) in lines {
        let _ = writeln!(out, "{:<14}{value}", format!("{label}:"));
    }
    out
}

/// The sync report as a table.
pub fn render_sync_report(rows: &[SyncReportRow]) -> String {
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str("no syncs recorded\n");
        return out;
    }
    let mut t = Table::new(&[
        ("FULL NAME", false),
        ("USER", false),
        ("TYPE", false),
        ("MACHINE", false),
        ("SUBSCRIPTION", false),
        ("SYNCS", true),
        ("DATASIZE SUM", true),
        ("DATASIZE MAX", true),
        ("DATASIZE MIN", true),
        ("INSERTS", true),
    ]);
    for r in rows {
        t.row(vec![
            name(&r.full_name),
            r.user.to_string(),
            r.subscription_type.name().to_owned(),
            cell(&r.machine),
            r.subscription.to_string(),
            r.syncs.to_string(),
            r.data_size_sum.to_string(),
            r.data_size_max.to_string(),
            r.data_size_min.to_string(),
            r.insert_object_count_sum.to_string(),
        ]);
    }
    t.render(&mut out);
    out
}

/// The three orphan lists, each under a heading.
pub fn render_orphans(orphans: &Orphans) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Subscriptions with no SubscriptionClients row: {}", orphans.without_client.len());
    if !orphans.without_client.is_empty() {
        let rows: Vec<_> = orphans.without_client.iter().map(|s| (0, s)).collect();
        subscriptions_table(&rows, false, &mut out);
    }
    let _ = writeln!(
        out,
        "\nSyncEntry tables with no subscription: {}",
        orphans.tables_without_subscription.len()
    );
    for table in &orphans.tables_without_subscription {
        let _ = writeln!(out, "{}", cell(table));
    }
    let groups = orphans.duplicates.len();
    let _ = writeln!(
        out,
        "\nDuplicate subscriptions of one user and machine: {groups} group{}",
        if groups == 1 { "" } else { "s" }
    );
    if groups > 0 {
        let rows: Vec<_> = orphans
            .duplicates
            .iter()
            .enumerate()
            .flat_map(|(i, g)| g.subscriptions.iter().map(move |s| (i + 1, s)))
            .collect();
        subscriptions_table(&rows, true, &mut out);
    }
    out
}

/// Cleanup candidates (or what was removed) as a table.
pub fn render_cleanup(candidates: &[CleanupCandidate]) -> String {
    let mut out = String::new();
    if !candidates.is_empty() {
        let rows: Vec<_> = candidates.iter().map(|c| (0, &c.info)).collect();
        subscriptions_table(&rows, false, &mut out);
    }
    out
}
