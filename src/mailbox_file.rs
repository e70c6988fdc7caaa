//! The mailbox as one SQLite file ([`SqliteMailbox`]): a stand-in for an Outlook store, so the
//! tool runs with no Outlook at all. It implements [`Mailbox`] and [`UserEdits`] exactly as
//! [`MemoryMailbox`](crate::mailbox::MemoryMailbox) does (the module doc of `mailbox` says how);
//! the tests hold the two to the same model.
//!
//! The file: `Item` (one row per item; `Number` is the item number of its EntryId, never reused,
//! which `AUTOINCREMENT` guarantees across deletes and reopens), `Change` (the user-change log;
//! `Seq` is the [`MailboxCursor`] position) and `Meta` (the EntryId prefix). WAL journal.
//!
//! Writes through [`Mailbox`] gather in one transaction, committed by [`Mailbox::flush`], every
//! [`BATCH_WRITES_MAX`] writes, by a user edit, and when the mailbox is dropped: a sync run can
//! commit its mailbox writes in groups, as it does its cache. A user edit commits at once.
//!
//! A file that is not a crmsync mailbox, is of a newer schema or is corrupt is refused with a
//! typed error naming the file before anything is written to it: its header is read with a plain
//! file read, so SQLite never opens a foreign or newer file (not even to roll back its hot
//! journal); a file that may be a mailbox is checked again through a read-only connection (see
//! `validate`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};

use crate::change::{ActivityStatus, ChangeKind, Role};
use crate::clock::Clock;
use crate::entity::{ObjectTypeCode, UnknownObjectTypeCode};
use crate::fields::{FieldPatch, Fields};
use crate::ids::{CrmId, EntryId, GlobalObjectId, VersionNumber};
use crate::mailbox::{
    ChangePage, ENTRY_ID_PREFIX_LEN_MAX, EntryIdFormat, ITEM_COUNT_MAX, Mailbox, MailboxChange,
    MailboxCursor, MailboxError, MailboxItem, NewItem, Tracking, UserEdits, check_goid, check_page,
};
use crate::mailbox::{SyncBase, ensure_stamp_free};

/// `PRAGMA application_id` of a crmsync mailbox file ("CRMM"; the server store is "CRMS").
pub const MAILBOX_APPLICATION_ID: i32 = 0x4352_4D4D;
/// The schema version this build writes and reads (`PRAGMA user_version`).
pub const MAILBOX_SCHEMA_VERSION: i32 = 3;
/// Most sync writes one transaction gathers before it is committed without a `flush`.
pub const BATCH_WRITES_MAX: usize = 10_000;
/// How long a write waits for another connection's lock on the file.
pub const BUSY_TIMEOUT_MS: u64 = 5_000;

const SCHEMA: &str = "
CREATE TABLE Meta (Key TEXT PRIMARY KEY, Value TEXT NOT NULL);
CREATE TABLE Item (
    Number INTEGER PRIMARY KEY AUTOINCREMENT,
    ObjectTypeCode INTEGER NOT NULL,
    Fields TEXT NOT NULL,
    GlobalObjectId BLOB,
    Status INTEGER NOT NULL,
    Tracked INTEGER NOT NULL,
    Stamp BLOB,
    ModifiedAt TEXT NOT NULL,
    UntrackedAt INTEGER NOT NULL DEFAULT 0,
    CHECK (Stamp IS NULL OR Tracked = 1)
);
CREATE INDEX Item_Stamp ON Item (Stamp, Number) WHERE Stamp IS NOT NULL;
CREATE INDEX Item_Goid ON Item (GlobalObjectId, Number) WHERE GlobalObjectId IS NOT NULL;
CREATE TABLE Change (
    Seq INTEGER PRIMARY KEY AUTOINCREMENT,
    Number INTEGER NOT NULL,
    ObjectTypeCode INTEGER NOT NULL,
    Kind INTEGER NOT NULL,
    ModifiedAt TEXT NOT NULL
);
";

/// From version 1 to 2: items keep the base the sync last agreed on (`SyncBase`, JSON).
const MIGRATE_V1_TO_V2: &str = "
ALTER TABLE Item ADD COLUMN Synced TEXT;
";

/// From version 2 to 3: `Synced` may leave out the base's fields when they are the item's own
/// (`StoredBaseOut`); a version 2 file is valid version 3 as it is. (Only the number changes, so
/// that a build that reads version 2 refuses such a file instead of misreading it.)
const MIGRATE_V2_TO_V3: &str = "";

const PREFIX_KEY: &str = "EntryIdPrefix";
const ITEM_COLUMNS: &str =
    "Number, ObjectTypeCode, Fields, GlobalObjectId, Status, Tracked, Stamp, ModifiedAt, Synced";

/// Why a mailbox file could not be opened. The file is left as it was.
#[derive(Debug, thiserror::Error)]
pub enum MailboxOpenError {
    #[error("{path}: no such mailbox file")]
    Missing { path: PathBuf },
    #[error("{path}: not an SQLite database, so not a crmsync mailbox")]
    NotADatabase { path: PathBuf },
    #[error("{path}: not a crmsync mailbox (application_id {found:#x})")]
    NotAMailbox { path: PathBuf, found: i32 },
    #[error("{path}: schema version {found} is newer than the {MAILBOX_SCHEMA_VERSION} this build reads")]
    NewerSchema { path: PathBuf, found: i32 },
    #[error("{path}: the mailbox's EntryIds start with {stored:?}, not {given:?}")]
    PrefixMismatch { path: PathBuf, stored: String, given: String },
    #[error("{path}: {table}.{column} holds {value:?}, which is not valid")]
    Corrupt { path: PathBuf, table: &'static str, column: &'static str, value: String },
    #[error("EntryId prefix {0:?} is not 1 to {ENTRY_ID_PREFIX_LEN_MAX} upper-case hex digits")]
    BadPrefix(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
}

/// A mailbox in one SQLite file (or in memory).
pub struct SqliteMailbox {
    conn: Connection,
    path: Option<PathBuf>,
    ids: EntryIdFormat,
    clock: Box<dyn Clock>,
    item_count_max: usize,
    /// Items in the file, including uncommitted writes.
    item_count: usize,
    /// Sync writes in the open transaction.
    pending_writes: usize,
}

fn corrupt(table: &'static str, column: &'static str, value: impl fmt::Display) -> MailboxError {
    MailboxError::Corrupt { table, column, value: value.to_string() }
}

fn otc_from(table: &'static str, code: i64) -> Result<ObjectTypeCode, MailboxError> {
    u32::try_from(code).map_err(|_| corrupt(table, "ObjectTypeCode", code)).and_then(|c| {
        ObjectTypeCode::try_from(c).map_err(|UnknownObjectTypeCode(n)| corrupt(table, "ObjectTypeCode", n))
    })
}

fn status_code(status: ActivityStatus) -> i64 {
    match status {
        ActivityStatus::Open => 0,
        ActivityStatus::Completed => 1,
        ActivityStatus::Cancelled => 2,
    }
}

fn status_from(code: i64) -> Result<ActivityStatus, MailboxError> {
    match code {
        0 => Ok(ActivityStatus::Open),
        1 => Ok(ActivityStatus::Completed),
        2 => Ok(ActivityStatus::Cancelled),
        _ => Err(corrupt("Item", "Status", code)),
    }
}

fn kind_code(kind: ChangeKind) -> i64 {
    match kind {
        ChangeKind::Create => 0,
        ChangeKind::Update => 1,
        ChangeKind::Delete => 2,
    }
}

fn kind_from(code: i64) -> Result<ChangeKind, MailboxError> {
    match code {
        0 => Ok(ChangeKind::Create),
        1 => Ok(ChangeKind::Update),
        2 => Ok(ChangeKind::Delete),
        _ => Err(corrupt("Change", "Kind", code)),
    }
}

/// `SyncBase` as `Item.Synced` holds it: without the base's fields when they equal the item's
/// own `Fields` (as after every sync write of the item: the row then holds them once, not twice).
/// Every statement that changes `Fields` writes `Synced` again when it left them out
/// (`synced_after_edit`), so a base never silently follows an edit.
#[derive(Serialize)]
struct StoredBaseOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    fields: Option<&'a Fields>,
    crm_version: Option<VersionNumber>,
    role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    pending: Option<&'a FieldPatch>,
}

/// `StoredBaseOut` read back (a version 2 file always has the fields). Left out, the fields are
/// the item's; present, they must be a field set (`null` is refused, not read as left out).
#[derive(Deserialize)]
struct StoredBaseIn {
    #[serde(default, deserialize_with = "present")]
    fields: Option<Fields>,
    crm_version: Option<VersionNumber>,
    role: Role,
    #[serde(default)]
    pending: Option<FieldPatch>,
}

/// A field that, when present, holds a value: `Some` of it (`default` gives `None` when absent).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// The `Synced` text of `base` on an item whose fields are `fields`.
fn synced_text(base: &SyncBase, fields: &Fields) -> Result<String, MailboxError> {
    let stored = StoredBaseOut {
        fields: (base.fields != *fields).then_some(&base.fields),
        crm_version: base.crm_version,
        role: base.role,
        pending: base.pending.as_ref(),
    };
    serde_json::to_string(&stored).map_err(|e| corrupt("Item", "Synced", e))
}

/// The base `text` stores, on an item whose fields are `fields`.
fn synced_from(text: &str, fields: &Fields) -> Result<SyncBase, MailboxError> {
    let stored: StoredBaseIn = serde_json::from_str(text).map_err(|_| corrupt("Item", "Synced", text))?;
    Ok(SyncBase {
        fields: stored.fields.unwrap_or_else(|| fields.clone()),
        crm_version: stored.crm_version,
        role: stored.role,
        pending: stored.pending,
    })
}

/// The `Synced` text to write when an edit changes `item`'s fields to `fields`: `None` (keep the
/// stored text) unless the stored one left the base's fields out, which it did only when they
/// were the item's fields before the edit.
fn synced_after_edit(item: &MailboxItem, fields: &Fields) -> Result<Option<String>, MailboxError> {
    match &item.synced {
        Some(base) if base.fields == item.fields => synced_text(base, fields).map(Some),
        _ => Ok(None),
    }
}

/// A time as the file writes it: RFC 3339, UTC, with as many second digits as it needs, so it
/// reads back exactly.
fn time_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn time_from(table: &'static str, text: &str) -> Result<DateTime<Utc>, MailboxError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| corrupt(table, "ModifiedAt", text))
}

/// A stamp as the file stores it: the GUID's 16 bytes (a compact, fast index key).
fn stamp_bytes(stamp: &CrmId) -> &[u8] {
    stamp.as_uuid().as_bytes()
}

fn stamp_from(bytes: &[u8]) -> Result<CrmId, MailboxError> {
    let uuid = uuid::Uuid::from_slice(bytes).map_err(|_| corrupt("Item", "Stamp", hex(bytes)))?;
    CrmId::new(uuid).map_err(|_| corrupt("Item", "Stamp", hex(bytes)))
}

/// Bytes as hex, for an error that shows a bad value.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An item number as SQLite stores it (a rowid).
fn sql_number(number: u64) -> i64 {
    i64::try_from(number).unwrap_or(i64::MAX)
}

fn number_from(table: &'static str, n: i64) -> Result<u64, MailboxError> {
    u64::try_from(n).ok().filter(|&n| n > 0).ok_or_else(|| corrupt(table, "Number", n))
}

/// The columns of `ITEM_COLUMNS`, read from `row` starting at column `at`.
struct ItemRow {
    number: i64,
    otc: i64,
    fields: String,
    goid: Option<Vec<u8>>,
    status: i64,
    tracked: i64,
    stamp: Option<Vec<u8>>,
    modified_at: String,
    synced: Option<String>,
}

impl ItemRow {
    fn read(row: &Row<'_>, at: usize) -> rusqlite::Result<ItemRow> {
        Ok(ItemRow {
            number: row.get(at)?,
            otc: row.get(at + 1)?,
            fields: row.get(at + 2)?,
            goid: row.get(at + 3)?,
            status: row.get(at + 4)?,
            tracked: row.get(at + 5)?,
            stamp: row.get(at + 6)?,
            modified_at: row.get(at + 7)?,
            synced: row.get(at + 8)?,
        })
    }
}

/// A row of the change log the query reports, joined with its item (`None` for a delete).
struct ChangeRow {
    seq: i64,
    number: i64,
    otc: i64,
    kind: i64,
    modified_at: String,
    item: Option<ItemRow>,
}

impl SqliteMailbox {
    /// Opens the mailbox at `path`, creating it (its EntryIds starting with `prefix`) when the
    /// file does not exist or is empty. An existing mailbox must have been made with `prefix`.
    pub fn open(path: &Path, prefix: &str, clock: Box<dyn Clock>) -> Result<SqliteMailbox, MailboxOpenError> {
        let ids = EntryIdFormat::new(prefix).map_err(|_| MailboxOpenError::BadPrefix(prefix.to_owned()))?;
        let fresh = std::fs::metadata(path).map(|m| m.len() == 0).unwrap_or(true);
        if fresh {
            let sqlite = |source| MailboxOpenError::Sqlite { path: path.to_owned(), source };
            let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let conn = Connection::open_with_flags(path, flags).map_err(sqlite)?;
            create_schema(&conn, &ids).map_err(sqlite)?;
            return Ok(Self::with(conn, Some(path.to_owned()), ids, clock, 0));
        }
        let stored = validate(path)?;
        if stored.prefix() != ids.prefix() {
            let (stored, given) = (stored.prefix().to_owned(), prefix.to_owned());
            return Err(MailboxOpenError::PrefixMismatch { path: path.to_owned(), stored, given });
        }
        Self::open_validated(path, stored, clock)
    }

    /// Opens an existing mailbox; a missing path is an error and no file is created.
    pub fn open_existing(path: &Path, clock: Box<dyn Clock>) -> Result<SqliteMailbox, MailboxOpenError> {
        if !path.exists() {
            return Err(MailboxOpenError::Missing { path: path.to_owned() });
        }
        let ids = validate(path)?;
        Self::open_validated(path, ids, clock)
    }

    /// A mailbox in memory (tests, the simulator).
    pub fn in_memory(prefix: &str, clock: Box<dyn Clock>) -> Result<SqliteMailbox, MailboxError> {
        let ids = EntryIdFormat::new(prefix)?;
        let conn = Connection::open_in_memory()?;
        create_schema(&conn, &ids)?;
        Ok(Self::with(conn, None, ids, clock, 0))
    }

    /// The same mailbox holding at most `max` items (at most [`ITEM_COUNT_MAX`]).
    pub fn with_item_count_max(mut self, max: usize) -> SqliteMailbox {
        self.item_count_max = max.min(ITEM_COUNT_MAX);
        self
    }

    pub fn prefix(&self) -> &str {
        self.ids.prefix()
    }

    /// The file, or `None` in memory.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn with(
        conn: Connection,
        path: Option<PathBuf>,
        ids: EntryIdFormat,
        clock: Box<dyn Clock>,
        item_count: usize,
    ) -> SqliteMailbox {
        SqliteMailbox {
            conn,
            path,
            ids,
            clock,
            item_count_max: ITEM_COUNT_MAX,
            item_count,
            pending_writes: 0,
        }
    }

    fn open_validated(
        path: &Path,
        ids: EntryIdFormat,
        clock: Box<dyn Clock>,
    ) -> Result<SqliteMailbox, MailboxOpenError> {
        let sqlite = |source| MailboxOpenError::Sqlite { path: path.to_owned(), source };
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(sqlite)?;
        set_pragmas(&conn).map_err(sqlite)?;
        let version: i32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sqlite)?;
        if version < MAILBOX_SCHEMA_VERSION {
            migrate(&conn, path, version)?;
        }
        let count: i64 = conn.query_row("SELECT COUNT(*) FROM Item", [], |r| r.get(0)).map_err(sqlite)?;
        let count = usize::try_from(count).unwrap_or(usize::MAX);
        Ok(Self::with(conn, Some(path.to_owned()), ids, clock, count))
    }

    /// Opens the write transaction if none is open.
    fn begin(&self) -> Result<(), MailboxError> {
        if self.conn.is_autocommit() {
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
        }
        Ok(())
    }

    /// Counts a sync write; commits when the transaction holds `BATCH_WRITES_MAX`.
    fn wrote(&mut self) -> Result<(), MailboxError> {
        self.pending_writes += 1;
        if self.pending_writes >= BATCH_WRITES_MAX {
            self.flush()?;
        }
        Ok(())
    }

    /// Re-reads the item count after a failed write may have rolled something back.
    fn recount(&mut self) {
        let count: rusqlite::Result<i64> = self.conn.query_row("SELECT COUNT(*) FROM Item", [], |r| r.get(0));
        if let Ok(count) = count {
            self.item_count = usize::try_from(count).unwrap_or(usize::MAX);
        }
    }

    fn check_room(&self) -> Result<(), MailboxError> {
        if self.item_count >= self.item_count_max {
            return Err(MailboxError::Full(self.item_count_max));
        }
        Ok(())
    }

    fn head_seq(&self) -> Result<u64, MailboxError> {
        let head: i64 = self
            .conn
            .prepare_cached("SELECT COALESCE(MAX(Seq), 0) FROM Change")?
            .query_row([], |r| r.get(0))?;
        u64::try_from(head).map_err(|_| corrupt("Change", "Seq", head))
    }

    fn decode(&self, row: ItemRow) -> Result<MailboxItem, MailboxError> {
        let number = number_from("Item", row.number)?;
        let fields: Fields =
            serde_json::from_str(&row.fields).map_err(|_| corrupt("Item", "Fields", &row.fields))?;
        let goid = row
            .goid
            .map(|g| {
                GlobalObjectId::new(g.as_slice()).map_err(|_| corrupt("Item", "GlobalObjectId", hex(&g)))
            })
            .transpose()?;
        let stamp = row.stamp.map(|s| stamp_from(&s)).transpose()?;
        let tracking = match (row.tracked, stamp) {
            (0, None) => Tracking::Untracked,
            (1, None) => Tracking::Pending,
            (1, Some(stamp)) => Tracking::Stamped(stamp),
            (other, _) => return Err(corrupt("Item", "Tracked", other)),
        };
        let object_type = otc_from("Item", row.otc)?;
        if goid.is_some() && !object_type.is_calendar() {
            return Err(corrupt("Item", "GlobalObjectId", goid.map(|g| g.to_hex()).unwrap_or_default()));
        }
        Ok(MailboxItem {
            entry_id: self.ids.render(number),
            object_type,
            goid,
            status: status_from(row.status)?,
            tracking,
            modified_at: time_from("Item", &row.modified_at)?,
            synced: row.synced.map(|text| synced_from(&text, &fields)).transpose()?,
            fields,
        })
    }

    fn item_by_number(&self, number: u64) -> Result<Option<MailboxItem>, MailboxError> {
        let row = self
            .conn
            .prepare_cached(&format!("SELECT {ITEM_COLUMNS} FROM Item WHERE Number = ?1"))?
            .query_row([sql_number(number)], |r| ItemRow::read(r, 0))
            .optional()?;
        row.map(|row| self.decode(row)).transpose()
    }

    /// The item `entry_id` names, or `NotFound`.
    fn existing(&self, entry_id: &EntryId) -> Result<(u64, MailboxItem), MailboxError> {
        let not_found = || MailboxError::NotFound(entry_id.clone());
        let number = self.ids.parse(entry_id).ok_or_else(not_found)?;
        let item = self.item_by_number(number)?.ok_or_else(not_found)?;
        Ok((number, item))
    }

    /// The lowest-numbered item `sql` selects by `key`. (The lowest is taken here, not by an
    /// `ORDER BY`: with a bound key, SQLite's STAT4 planner marks such a statement to be
    /// prepared again at every call, which made the lookup ten times slower.)
    fn first_number(&self, sql: &str, key: &[u8]) -> Result<Option<EntryId>, MailboxError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut lowest: Option<i64> = None;
        for number in stmt.query_map([key], |r| r.get::<_, i64>(0))? {
            let number = number?;
            lowest = Some(lowest.map_or(number, |l| l.min(number)));
        }
        lowest.map(|n| number_from("Item", n).map(|n| self.ids.render(n))).transpose()
    }

    /// Inserts `item` under the next number, which it returns (`item.entry_id` is not read: the
    /// EntryId comes from the number).
    fn insert_item(&self, item: &MailboxItem) -> Result<u64, MailboxError> {
        let fields = serde_json::to_string(&item.fields).map_err(|e| corrupt("Item", "Fields", e))?;
        self.conn
            .prepare_cached(
                "INSERT INTO Item (ObjectTypeCode, Fields, GlobalObjectId, Status, Tracked, Stamp, ModifiedAt, \
                 Synced) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                item.object_type.code(),
                fields,
                item.goid.as_ref().map(|g| g.as_bytes()),
                status_code(item.status),
                i64::from(item.is_tracked()),
                item.stamp().as_ref().map(stamp_bytes),
                time_text(item.modified_at),
                item.synced.as_ref().map(|base| synced_text(base, &item.fields)).transpose()?,
            ])?;
        number_from("Item", self.conn.last_insert_rowid())
    }

    fn log(
        &self,
        number: u64,
        object_type: ObjectTypeCode,
        kind: ChangeKind,
        at: DateTime<Utc>,
    ) -> Result<(), MailboxError> {
        self.conn
            .prepare_cached(
                "INSERT INTO Change (Number, ObjectTypeCode, Kind, ModifiedAt) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![sql_number(number), object_type.code(), kind_code(kind), time_text(at)])?;
        Ok(())
    }

    /// Runs one user edit in its own savepoint (all of it or nothing), then commits.
    fn user_edit<T>(
        &mut self,
        edit: impl FnOnce(&Self) -> Result<T, MailboxError>,
    ) -> Result<T, MailboxError> {
        self.begin()?;
        self.conn.execute_batch("SAVEPOINT user_edit")?;
        match edit(self) {
            Ok(value) => {
                self.conn.execute_batch("RELEASE user_edit")?;
                self.flush()?;
                Ok(value)
            }
            Err(err) => {
                // The edit is undone; the error it failed with is the one to report.
                let _ = self.conn.execute_batch("ROLLBACK TO user_edit; RELEASE user_edit");
                self.recount();
                Err(err)
            }
        }
    }

    fn decode_change(&self, row: ChangeRow) -> Result<MailboxChange, MailboxError> {
        let seq = u64::try_from(row.seq).map_err(|_| corrupt("Change", "Seq", row.seq))?;
        let number = number_from("Change", row.number)?;
        let object_type = otc_from("Change", row.otc)?;
        let kind = kind_from(row.kind)?;
        let item = match (kind, row.item) {
            (ChangeKind::Delete, _) => None,
            (_, Some(item)) => Some(self.decode(item)?),
            (_, None) => return Err(corrupt("Change", "Number", row.number)),
        };
        // Checked when written (the log copies the item's type) and again when read.
        if item.as_ref().is_some_and(|i| i.object_type != object_type) {
            return Err(corrupt("Change", "ObjectTypeCode", row.otc));
        }
        Ok(MailboxChange {
            seq: MailboxCursor(seq),
            entry_id: self.ids.render(number),
            object_type,
            kind,
            modified_at: time_from("Change", &row.modified_at)?,
            item,
        })
    }
}

fn set_pragmas(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    crate::sqlite::keep_plans(conn)?;
    conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))
}

/// Brings a file of schema `version` (1 or 2, as `validate` checked) to this build's, in one
/// transaction.
fn migrate(conn: &Connection, path: &Path, version: i32) -> Result<(), MailboxOpenError> {
    let steps = if version == 1 { MIGRATE_V1_TO_V2 } else { "" };
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE; {steps} {MIGRATE_V2_TO_V3} PRAGMA user_version = {MAILBOX_SCHEMA_VERSION}; COMMIT;"
    ))
    .map_err(|source| MailboxOpenError::Sqlite { path: path.to_owned(), source })
}

/// Writes the schema, the prefix and the header of a new mailbox, in one transaction.
fn create_schema(conn: &Connection, ids: &EntryIdFormat) -> rusqlite::Result<()> {
    set_pragmas(conn)?;
    conn.execute_batch(&format!(
        "BEGIN; {SCHEMA} {MIGRATE_V1_TO_V2} {MIGRATE_V2_TO_V3} PRAGMA application_id = {MAILBOX_APPLICATION_ID}; \
         PRAGMA user_version = {MAILBOX_SCHEMA_VERSION};"
    ))?;
    conn.execute("INSERT INTO Meta VALUES (?1, ?2)", [PREFIX_KEY, ids.prefix()])?;
    conn.execute_batch("COMMIT")
}

/// What the 100-byte header of an SQLite file says, read with a plain file read.
struct Header {
    application_id: i32,
    user_version: i32,
    /// The file is in WAL mode, so its newest header may still be in its WAL.
    wal: bool,
}

/// Reads the header of an SQLite file without opening it with SQLite: a file that is not an
/// SQLite database is refused here.
fn read_header(path: &Path) -> Result<Header, MailboxOpenError> {
    use std::io::Read;
    const MAGIC: &[u8; 16] = b"SQLite format 3\0";
    let io = |source| MailboxOpenError::Io { path: path.to_owned(), source };
    let mut header = Vec::with_capacity(100);
    std::fs::File::open(path).map_err(io)?.take(100).read_to_end(&mut header).map_err(io)?;
    if header.len() < 100 || !header.starts_with(MAGIC) {
        return Err(MailboxOpenError::NotADatabase { path: path.to_owned() });
    }
    let be = |at: usize| i32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
    // Bytes 18 and 19 (file format write and read versions) are 2 in WAL mode.
    Ok(Header { application_id: be(68), user_version: be(60), wal: header[18] == 2 && header[19] == 2 })
}

/// Whether `path`'s WAL holds anything (pages not yet copied into the file).
fn wal_has_pages(path: &Path) -> bool {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::metadata(PathBuf::from(wal)).is_ok_and(|m| m.len() > 0)
}

/// Refuses a header that is not a mailbox's of a schema this build reads.
fn check_header(path: &Path, found: i32, version: i32) -> Result<(), MailboxOpenError> {
    if found != MAILBOX_APPLICATION_ID {
        return Err(MailboxOpenError::NotAMailbox { path: path.to_owned(), found });
    }
    if version > MAILBOX_SCHEMA_VERSION {
        return Err(MailboxOpenError::NewerSchema { path: path.to_owned(), found: version });
    }
    if version < 1 {
        // Our id but no schema version: not a file this project wrote.
        return Err(MailboxOpenError::NotAMailbox { path: path.to_owned(), found });
    }
    Ok(())
}

/// Checks an existing file and reads its prefix, writing nothing.
///
/// The header in the file is read first, with a plain read: a file that is not SQLite, or whose
/// header is another application's or ours of a newer schema, is refused without SQLite ever
/// opening it. That header can be stale only in WAL mode, while the WAL holds pages (a writer
/// killed before a checkpoint: a new mailbox then still shows `application_id` 0), so such a
/// file, and any that says it is ours, is read again through a read-only connection, which sees
/// the WAL. (SQLite may leave a `-shm` beside a WAL-mode file it read.)
fn validate(path: &Path) -> Result<EntryIdFormat, MailboxOpenError> {
    let header = read_header(path)?;
    let maybe_ours_in_wal = header.application_id == 0 && header.wal && wal_has_pages(path);
    if !maybe_ours_in_wal {
        check_header(path, header.application_id, header.user_version)?;
    }
    let sqlite = |source| MailboxOpenError::Sqlite { path: path.to_owned(), source };
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(sqlite)?;
    let found: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0)).map_err(sqlite)?;
    let version: i32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sqlite)?;
    check_header(path, found, version)?;
    let corrupt = |value: String| MailboxOpenError::Corrupt {
        path: path.to_owned(),
        table: "Meta",
        column: PREFIX_KEY,
        value,
    };
    let prefix: Option<String> = conn
        .query_row("SELECT Value FROM Meta WHERE Key = ?1", [PREFIX_KEY], |r| r.get(0))
        .optional()
        .map_err(sqlite)?;
    let prefix = prefix.ok_or_else(|| corrupt(String::new()))?;
    EntryIdFormat::new(&prefix).map_err(|_| corrupt(prefix))
}

impl Mailbox for SqliteMailbox {
    fn changes_since(&self, cursor: MailboxCursor, limit: usize) -> Result<ChangePage, MailboxError> {
        let head = MailboxCursor(self.head_seq()?);
        check_page(cursor, limit, head)?;
        // A create or update is reported while its item exists and was not untracked since; a
        // delete always (see the `mailbox` module doc). One more row than the page says `more`.
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT c.Seq, c.Number, c.ObjectTypeCode, c.Kind, c.ModifiedAt, i.{} \
             FROM Change c LEFT JOIN Item i ON i.Number = c.Number AND c.Kind != 2 \
             WHERE c.Seq > ?1 AND (c.Kind = 2 OR c.Seq > i.UntrackedAt) \
             ORDER BY c.Seq LIMIT ?2",
            ITEM_COLUMNS.replace(", ", ", i.")
        ))?;
        let rows = stmt.query_map(params![sql_number(cursor.0), limit as i64 + 1], |r| {
            let has_item = r.get::<_, Option<i64>>(5)?.is_some();
            Ok(ChangeRow {
                seq: r.get(0)?,
                number: r.get(1)?,
                otc: r.get(2)?,
                kind: r.get(3)?,
                modified_at: r.get(4)?,
                item: if has_item { Some(ItemRow::read(r, 5)?) } else { None },
            })
        })?;
        let reported = rows.map(|row| self.decode_change(row?));
        ChangePage::assemble(reported, limit, head)
    }

    fn head(&self) -> Result<MailboxCursor, MailboxError> {
        Ok(MailboxCursor(self.head_seq()?))
    }

    fn get(&self, entry_id: &EntryId) -> Result<Option<MailboxItem>, MailboxError> {
        match self.ids.parse(entry_id) {
            Some(number) => self.item_by_number(number),
            None => Ok(None),
        }
    }

    fn create(&mut self, new: NewItem) -> Result<EntryId, MailboxError> {
        check_goid(new.object_type, &new.goid)?;
        ensure_stamp_free(self, None, new.stamp)?;
        self.check_room()?;
        self.begin()?;
        let item = MailboxItem {
            // Written by the insert; the number is known only after it.
            entry_id: self.ids.render(1),
            object_type: new.object_type,
            fields: new.fields,
            goid: new.goid,
            status: new.status,
            tracking: Tracking::Stamped(new.stamp),
            modified_at: self.clock.now(),
            synced: Some(new.synced),
        };
        let number = self.insert_item(&item)?;
        self.item_count += 1;
        self.wrote()?;
        Ok(self.ids.render(number))
    }

    fn update(&mut self, entry_id: &EntryId, patch: &FieldPatch) -> Result<(), MailboxError> {
        let (number, item) = self.existing(entry_id)?;
        let fields = patch.apply(&item.fields)?;
        if fields == item.fields {
            return Ok(());
        }
        let json = serde_json::to_string(&fields).map_err(|e| corrupt("Item", "Fields", e))?;
        let synced = synced_after_edit(&item, &fields)?;
        self.begin()?;
        self.conn
            .prepare_cached(
                "UPDATE Item SET Fields = ?2, ModifiedAt = ?3, Synced = COALESCE(?4, Synced) WHERE Number = ?1",
            )?
            .execute(params![sql_number(number), json, time_text(self.clock.now()), synced])?;
        self.wrote()
    }

    fn delete(&mut self, entry_id: &EntryId) -> Result<(), MailboxError> {
        let Some(number) = self.ids.parse(entry_id) else { return Ok(()) };
        self.begin()?;
        let deleted =
            self.conn.prepare_cached("DELETE FROM Item WHERE Number = ?1")?.execute([sql_number(number)])?;
        self.item_count = self.item_count.saturating_sub(deleted);
        self.wrote()
    }

    fn set_stamp(&mut self, entry_id: &EntryId, stamp: Option<CrmId>) -> Result<(), MailboxError> {
        let (number, item) = self.existing(entry_id)?;
        let tracking = stamp.map_or(Tracking::Untracked, Tracking::Stamped);
        if item.tracking == tracking {
            return Ok(());
        }
        if let Some(stamp) = stamp {
            ensure_stamp_free(self, item.stamp(), stamp)?;
        }
        let head = self.head_seq()?;
        self.begin()?;
        self.conn
            .prepare_cached(
                "UPDATE Item SET Tracked = ?2, Stamp = ?3, ModifiedAt = ?4, \
                 UntrackedAt = CASE WHEN ?2 = 0 THEN ?5 ELSE UntrackedAt END, \
                 Synced = CASE WHEN ?2 = 0 THEN NULL ELSE Synced END WHERE Number = ?1",
            )?
            .execute(params![
                sql_number(number),
                i64::from(tracking.is_tracked()),
                stamp.as_ref().map(stamp_bytes),
                time_text(self.clock.now()),
                sql_number(head),
            ])?;
        self.wrote()
    }

    fn link(&mut self, entry_id: &EntryId, stamp: CrmId, base: SyncBase) -> Result<(), MailboxError> {
        let (number, item) = self.existing(entry_id)?;
        ensure_stamp_free(self, item.stamp(), stamp)?;
        let synced = synced_text(&base, &item.fields)?;
        self.begin()?;
        self.conn
            .prepare_cached(
                "UPDATE Item SET Tracked = 1, Stamp = ?2, Synced = ?3, \
                 ModifiedAt = CASE WHEN Stamp IS ?2 THEN ModifiedAt ELSE ?4 END WHERE Number = ?1",
            )?
            .execute(params![sql_number(number), stamp_bytes(&stamp), synced, time_text(self.clock.now())])?;
        self.wrote()
    }

    fn update_and_link(
        &mut self,
        entry_id: &EntryId,
        patch: &FieldPatch,
        stamp: CrmId,
        base: SyncBase,
    ) -> Result<(), MailboxError> {
        let (number, item) = self.existing(entry_id)?;
        let fields = patch.apply(&item.fields)?;
        ensure_stamp_free(self, item.stamp(), stamp)?;
        let json = serde_json::to_string(&fields).map_err(|e| corrupt("Item", "Fields", e))?;
        let synced = synced_text(&base, &fields)?;
        let now = time_text(self.clock.now());
        // One statement: the fields, the stamp and the base land together.
        self.begin()?;
        self.conn
            .prepare_cached(
                "UPDATE Item SET Fields = ?2, Tracked = 1, Stamp = ?3, Synced = ?4, \
                 ModifiedAt = CASE WHEN Fields IS ?2 AND Stamp IS ?3 THEN ModifiedAt ELSE ?5 END \
                 WHERE Number = ?1",
            )?
            .execute(params![sql_number(number), json, stamp_bytes(&stamp), synced, now])?;
        self.wrote()
    }

    fn find_by_goid(&self, goid: &GlobalObjectId) -> Result<Option<EntryId>, MailboxError> {
        self.first_number("SELECT Number FROM Item WHERE GlobalObjectId = ?1", goid.as_bytes())
    }

    fn find_by_stamp(&self, stamp: CrmId) -> Result<Option<EntryId>, MailboxError> {
        self.first_number("SELECT Number FROM Item WHERE Stamp = ?1", stamp_bytes(&stamp))
    }

    fn all_items(&self) -> Result<Vec<MailboxItem>, MailboxError> {
        let mut stmt =
            self.conn.prepare_cached(&format!("SELECT {ITEM_COLUMNS} FROM Item ORDER BY Number"))?;
        let rows = stmt.query_map([], |r| ItemRow::read(r, 0))?;
        rows.map(|row| self.decode(row?)).collect()
    }

    fn flush(&mut self) -> Result<(), MailboxError> {
        if !self.conn.is_autocommit() {
            if let Err(err) = self.conn.execute_batch("COMMIT") {
                self.recount();
                return Err(err.into());
            }
        }
        self.pending_writes = 0;
        Ok(())
    }
}

impl UserEdits for SqliteMailbox {
    fn user_create(
        &mut self,
        object_type: ObjectTypeCode,
        fields: Fields,
        goid: Option<GlobalObjectId>,
        status: ActivityStatus,
    ) -> Result<EntryId, MailboxError> {
        check_goid(object_type, &goid)?;
        self.check_room()?;
        let item = MailboxItem {
            entry_id: self.ids.render(1),
            object_type,
            fields,
            goid,
            status,
            tracking: Tracking::Untracked,
            modified_at: self.clock.now(),
            synced: None,
        };
        let number = self.user_edit(|mb| mb.insert_item(&item))?;
        self.item_count += 1;
        Ok(self.ids.render(number))
    }

    fn user_track(&mut self, entry_id: &EntryId) -> Result<(), MailboxError> {
        let (number, item) = self.existing(entry_id)?;
        if item.is_tracked() {
            return Ok(());
        }
        let now = self.clock.now();
        self.user_edit(|mb| {
            mb.conn
                .prepare_cached("UPDATE Item SET Tracked = 1, ModifiedAt = ?2 WHERE Number = ?1")?
                .execute(params![sql_number(number), time_text(now)])?;
            mb.log(number, item.object_type, ChangeKind::Create, now)
        })
    }

    fn user_update(&mut self, entry_id: &EntryId, fields: Fields) -> Result<(), MailboxError> {
        let (number, item) = self.existing(entry_id)?;
        let json = serde_json::to_string(&fields).map_err(|e| corrupt("Item", "Fields", e))?;
        let synced = synced_after_edit(&item, &fields)?;
        let now = self.clock.now();
        self.user_edit(|mb| {
            mb.conn
                .prepare_cached(
                    "UPDATE Item SET Fields = ?2, ModifiedAt = ?3, Synced = COALESCE(?4, Synced) \
                     WHERE Number = ?1",
                )?
                .execute(params![sql_number(number), json, time_text(now), synced])?;
            if item.is_tracked() {
                mb.log(number, item.object_type, ChangeKind::Update, now)?;
            }
            Ok(())
        })
    }

    fn user_delete(&mut self, entry_id: &EntryId) -> Result<(), MailboxError> {
        let (number, item) = self.existing(entry_id)?;
        let now = self.clock.now();
        self.user_edit(|mb| {
            mb.conn.prepare_cached("DELETE FROM Item WHERE Number = ?1")?.execute([sql_number(number)])?;
            if item.is_tracked() {
                mb.log(number, item.object_type, ChangeKind::Delete, now)?;
            }
            Ok(())
        })?;
        self.item_count = self.item_count.saturating_sub(1);
        Ok(())
    }

    fn user_copy(&mut self, entry_id: &EntryId) -> Result<EntryId, MailboxError> {
        let (_, original) = self.existing(entry_id)?;
        self.check_room()?;
        let copy = MailboxItem { modified_at: self.clock.now(), ..original };
        let number = self.user_edit(|mb| {
            let number = mb.insert_item(&copy)?;
            if copy.is_tracked() {
                mb.log(number, copy.object_type, ChangeKind::Create, copy.modified_at)?;
            }
            Ok(number)
        })?;
        self.item_count += 1;
        Ok(self.ids.render(number))
    }
}

impl Drop for SqliteMailbox {
    /// Commits the writes not yet flushed (a graceful close keeps them; committing them early is
    /// always safe, see [`Mailbox`]).
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

impl fmt::Debug for SqliteMailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteMailbox")
            .field("path", &self.path)
            .field("prefix", &self.ids.prefix())
            .field("items", &self.item_count)
            .finish_non_exhaustive()
    }
}
