//! The support reports on a server store where users changed machines (an old subscription left
//! behind, a reinstall that made a duplicate), a client row went missing and a stray SyncEntry
//! table lies around: `whois`, the sync report, orphans, cleanup (a dry run that leaves the file
//! byte for byte as it was, an apply that removes exactly what was listed), corrupt rows; and the
//! `crmsync server` commands end to end.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use chrono::{DateTime, Duration, Utc};
use crmsync::ObjectTypeCode::{Contact, Task};
use crmsync::clock::{Clock, ManualClock};
use crmsync::reports::*;
use crmsync::server::*;
use crmsync::*;
use uuid::Uuid;

use crate::snapshot;
use crate::support::*;

/// A SyncEntry table no subscription names.
const STRAY: &str = "SyncEntry_0123456789abcdef0123456789abcdef";

/// A directory under the system's temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("crmsync-reports-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn join(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn user(n: u8) -> SystemUserId {
    SystemUserId::new(Uuid::from_u128(0x7700 + n as u128)).unwrap()
}

fn record(crm: u128, owner: u8, otc: ObjectTypeCode, fields: &[(&str, &str)]) -> ServerRecord {
    ServerRecord {
        crm_id: id(crm),
        object_type: otc,
        owner: user(owner),
        version: VersionNumber(0),
        fields: f(fields),
        goid: None,
        status: ActivityStatus::Open,
        attendees: Vec::new(),
    }
}

const R1: &[(&str, &str)] = &[("fullname", "Ann Archer")];
const R1_EDITED: &[(&str, &str)] = &[("fullname", "Ann Archer-Lee")];
const R2: &[(&str, &str)] = &[("fullname", "Ben Brook")];
const R3: &[(&str, &str)] = &[("subject", "Call the supplier")];
const R4: &[(&str, &str)] = &[("fullname", "Ada Aziz")];

fn size(fields: &[(&str, &str)]) -> u64 {
    f(fields).data_size() as u64
}

/// One sync: prepare, every page, acknowledging each unless `lose_ack`.
fn sync(store: &mut ServerStore, sub: SubscriptionId, lose_ack: bool) {
    store.prepare_sync(sub).unwrap();
    let mut after = None;
    loop {
        let page = store.get_sync_data(sub, after, 10).unwrap();
        if let (Some(last), false) = (page.last_seq, lose_ack) {
            store.acknowledge(sub, last).unwrap();
        }
        after = page.last_seq.or(after);
        if !page.more {
            return;
        }
    }
}

/// The planted story, on a file. Times are days after `start`; "now" is day 200.
struct Fixture {
    path: PathBuf,
    start: DateTime<Utc>,
    /// Alice's laptop before she moved: last sync day 1, a page handed out and never acknowledged.
    alice_old: SubscriptionId,
    /// Alice's new laptop, primary since day 100, last sync day 150.
    alice_new: SubscriptionId,
    /// Bob's Outlook before he reinstalled on the same machine: last sync day 0.
    bob_1: SubscriptionId,
    /// Bob's reinstall on "desktop-7" (the same machine, another case), primary, last sync day 150.
    bob_2: SubscriptionId,
    /// Bob's Offline subscription on DESKTOP-7, last sync day 150: not a duplicate of the others.
    bob_offline: SubscriptionId,
    /// Carol's kiosk: registered day 2, never synced, its SubscriptionClients row removed.
    carol: SubscriptionId,
    /// Dan's address book subscription, registered day 190, never synced.
    dan_abp: SubscriptionId,
}

impl Fixture {
    fn day(&self, n: i64) -> DateTime<Utc> {
        self.start + Duration::days(n)
    }

    /// The store, on a clock at day `n`.
    fn open_at(&self, n: i64) -> ServerStore {
        ServerStore::open(&self.path, Box::new(ManualClock::new(self.day(n)))).unwrap()
    }

    /// A copy of the file, to spoil.
    fn copy_to(&self, path: &Path) -> Fixture {
        std::fs::copy(&self.path, path).unwrap();
        Fixture { path: path.to_owned(), ..*self }
    }
}

fn build(path: &Path, start: DateTime<Utc>) -> Fixture {
    let clock = Rc::new(ManualClock::new(start));
    let day = |n: i64| start + Duration::days(n);
    let mut s = ServerStore::open(path, Box::new(Rc::clone(&clock)) as Box<dyn Clock>).unwrap();
    s.add_user(user(1), "Alice Ng").unwrap();
    s.add_user(user(2), "Bob Okafor").unwrap();
    s.add_user(user(3), "Carol Diaz").unwrap();
    s.add_user(user(4), "Dan Ito").unwrap();

    let alice_old = s.register_client(user(1), "LAPTOP-OLD", SubscriptionType::Outlook).unwrap();
    let bob_1 = s.register_client(user(2), "DESKTOP-7", SubscriptionType::Outlook).unwrap();
    let bob_offline = s.register_client(user(2), "DESKTOP-7", SubscriptionType::Offline).unwrap();
    s.put_record(&record(1, 1, Contact, R1)).unwrap();
    s.put_record(&record(2, 2, Contact, R2)).unwrap();
    s.put_record(&record(3, 2, Task, R3)).unwrap();
    sync(&mut s, alice_old, false);
    sync(&mut s, bob_1, false);

    clock.set(day(1));
    s.put_record(&record(4, 1, Contact, R4)).unwrap();
    sync(&mut s, alice_old, true);

    clock.set(day(2));
    let carol = s.register_client(user(3), "KIOSK", SubscriptionType::Outlook).unwrap();

    clock.set(day(10));
    let bob_2 = s.register_client(user(2), "desktop-7", SubscriptionType::Outlook).unwrap();
    s.set_primary_client(bob_2).unwrap();
    sync(&mut s, bob_2, false);

    clock.set(day(100));
    let alice_new = s.register_client(user(1), "LAPTOP-NEW", SubscriptionType::Outlook).unwrap();
    s.set_primary_client(alice_new).unwrap();
    sync(&mut s, alice_new, false);

    clock.set(day(150));
    s.update_record(id(1), &FieldPatch::between(&f(R1), &f(R1_EDITED))).unwrap();
    sync(&mut s, alice_new, false);
    sync(&mut s, bob_2, false);
    sync(&mut s, bob_offline, false);

    clock.set(day(190));
    let dan_abp = s.register_client(user(4), "DAN-PC", SubscriptionType::AddressBookProvider).unwrap();
    drop(s);

    // What the store's API would never do: lose a client row, leave a table behind.
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute("DELETE FROM SubscriptionClients WHERE SubscriptionId = ?1", [carol.to_string()]).unwrap();
    conn.execute_batch(&format!(
        "CREATE TABLE {STRAY} (ObjectId TEXT PRIMARY KEY, ObjectTypeCode INTEGER NOT NULL, \
         VersionNumber INTEGER NOT NULL, State INTEGER NOT NULL)"
    ))
    .unwrap();
    drop(conn);
    Fixture { path: path.to_owned(), start, alice_old, alice_new, bob_1, bob_2, bob_offline, carol, dan_abp }
}

/// The fixed start of the snapshot tests.
fn fixed_start() -> DateTime<Utc> {
    at(0)
}

/// The database file and its write-ahead log, as bytes (`None`: no such file).
#[derive(Debug, PartialEq, Eq)]
struct Files {
    main: Vec<u8>,
    wal: Option<Vec<u8>>,
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn files(path: &Path) -> Files {
    Files { main: std::fs::read(path).unwrap(), wal: std::fs::read(sidecar(path, "-wal")).ok() }
}

/// Every table and its rows (sorted), as text: what "nothing else changed" compares.
type Dump = BTreeMap<String, BTreeSet<Vec<String>>>;

fn dump(path: &Path) -> Dump {
    let conn = rusqlite::Connection::open(path).unwrap();
    let names: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    names
        .into_iter()
        .map(|name| {
            let mut stmt = conn.prepare(&format!("SELECT * FROM \"{name}\"")).unwrap();
            let width = stmt.column_count();
            let rows = stmt
                .query_map([], |r| {
                    (0..width)
                        .map(|i| r.get::<_, rusqlite::types::Value>(i).map(|v| format!("{v:?}")))
                        .collect()
                })
                .unwrap()
                .collect::<Result<BTreeSet<Vec<String>>, _>>()
                .unwrap();
            (name, rows)
        })
        .collect()
}

/// `before` without the removed subscriptions: their rows in the tables keyed by SubscriptionId
/// first, and their SyncEntry tables. `SubscriptionSyncInfo` keeps its rows.
fn without(before: &Dump, removed: &[SubscriptionId]) -> Dump {
    let ids: BTreeSet<String> =
        removed.iter().map(|s| format!("{:?}", rusqlite::types::Value::Text(s.to_string()))).collect();
    let tables: BTreeSet<String> = removed.iter().map(|s| s.sync_entry_table()).collect();
    before
        .iter()
        .filter(|(name, _)| !tables.contains(*name))
        .map(|(name, rows)| {
            let keyed = ["Subscription", "SubscriptionClients", "PreparedChange"].contains(&name.as_str());
            let rows = rows.iter().filter(|row| !(keyed && ids.contains(&row[0]))).cloned().collect();
            (name.clone(), rows)
        })
        .collect()
}

fn ids(candidates: &[CleanupCandidate]) -> Vec<SubscriptionId> {
    candidates.iter().map(|c| c.info.subscription).collect()
}

#[test]
fn whois_names_the_user_machine_and_subscription_of_a_sync_entry_table() {
    let dir = TempDir::new("whois");
    let fx = build(&dir.join("server.db"), fixed_start());
    let store = fx.open_at(200);
    let table = fx.bob_2.sync_entry_table();
    let owner = whois(&store, &table).unwrap().expect("bob's table has an owner");
    assert_eq!(owner.subscription, fx.bob_2);
    assert_eq!(owner.table.to_string(), table);
    assert_eq!(owner.user, user(2));
    assert_eq!(owner.full_name.as_deref(), Some("Bob Okafor"));
    assert_eq!(owner.machine, "desktop-7");
    assert_eq!(owner.subscription_type, SubscriptionType::Outlook);
    assert_eq!(owner.created_on, fx.day(10));
    assert_eq!(owner.last_sync_started_on, Some(fx.day(150)));
    assert_eq!(owner.primary_client, Some(true));
    snapshot!("reports_whois", render_whois(&owner));

    // SQL Server spells the hex in capitals; SQLite's table names ignore case.
    let shouting = format!("SYNCENTRY_{}", fx.bob_2.as_uuid().simple().to_string().to_uppercase());
    assert_eq!(whois(&store, &shouting).unwrap(), Some(owner));
    let carol = whois(&store, &fx.carol.sync_entry_table()).unwrap().unwrap();
    assert_eq!((carol.user, carol.primary_client, carol.last_sync_started_on), (user(3), None, None));
    // A table with no subscription has no owner.
    assert_eq!(whois(&store, STRAY).unwrap(), None);
}

#[test]
fn whois_refuses_anything_but_a_sync_entry_name_and_carries_it() {
    let dir = TempDir::new("whois-bad");
    let fx = build(&dir.join("server.db"), fixed_start());
    let store = fx.open_at(200);
    let hex = fx.bob_2.as_uuid().simple().to_string();
    let bad = [
        String::new(),
        "SyncEntry_".into(),
        "Subscription".into(),
        "SyncEntry_xyz".into(),
        format!("SyncEntry_{}", &hex[..31]),
        format!("SyncEntry_{hex}0"),
        format!("SyncEntry_{}", fx.bob_2),
        format!("SyncEntry_{{{hex}}}"),
        format!("SyncEntry_{hex} "),
        format!(" SyncEntry_{hex}"),
        format!("SyncEntry_{hex}; DROP TABLE Subscription"),
        hex.clone(),
        "SyncEntry_00000000000000000000000000000000".into(),
        "SyncEntrü_0123456789abcdef0123456789abcdef".into(),
        format!("SyncEntry_{}", "é".repeat(16)),
        format!("SyncEntry_{}", "\u{ff10}".repeat(32)),
    ];
    for name in &bad {
        match whois(&store, name) {
            Err(ReportError::BadTableName(value)) => assert_eq!(&value, name),
            other => panic!("{name:?}: {other:?}"),
        }
        assert!(name.parse::<SyncEntryTable>().is_err(), "{name:?}");
    }
    // A huge value is carried clipped.
    let huge = "x".repeat(100_000);
    match whois(&store, &huge) {
        Err(ReportError::BadTableName(value)) => assert_eq!(value, huge[..ERROR_VALUE_LEN_MAX]),
        other => panic!("{other:?}"),
    }
    // Nothing was dropped by the attempt above.
    assert!(whois(&store, &fx.bob_2.sync_entry_table()).unwrap().is_some());
}

#[test]
fn the_sync_report_counts_syncs_data_size_and_inserts_per_subscription() {
    let dir = TempDir::new("report");
    let fx = build(&dir.join("server.db"), fixed_start());
    let store = fx.open_at(200);
    let rows = sync_report(&store).unwrap();
    type Row<'a> = (SubscriptionId, &'a str, SubscriptionType, u64, u64, u64, u64, u64);
    let got: Vec<Row> = rows
        .iter()
        .map(|r| {
            (
                r.subscription,
                r.full_name.as_deref().unwrap_or("-"),
                r.subscription_type,
                r.syncs,
                r.data_size_sum,
                r.data_size_max,
                r.data_size_min,
                r.insert_object_count_sum,
            )
        })
        .collect();
    let (r1, r1e, r2, r3, r4) = (size(R1), size(R1_EDITED), size(R2), size(R3), size(R4));
    use SubscriptionType::{Offline, Outlook};
    assert_eq!(
        got,
        [
            // Alice: the new laptop first (LAPTOP-NEW < LAPTOP-OLD).
            (fx.alice_new, "Alice Ng", Outlook, 2, r1 + r4 + r1e, r1 + r4, r1e, 2),
            (fx.alice_old, "Alice Ng", Outlook, 2, r1 + r4, r1.max(r4), r1.min(r4), 2),
            (fx.bob_offline, "Bob Okafor", Offline, 1, r2 + r3, r2 + r3, r2 + r3, 2),
            (fx.bob_1, "Bob Okafor", Outlook, 1, r2 + r3, r2 + r3, r2 + r3, 2),
            // The second sync after the reinstall handed out nothing.
            (fx.bob_2, "Bob Okafor", Outlook, 2, r2 + r3, r2 + r3, 0, 2),
        ]
    );
    // Carol and Dan never synced: no row (as in the seed's query, which starts from SyncInfo).
    assert!(rows.iter().all(|r| r.subscription != fx.carol && r.subscription != fx.dan_abp));
    snapshot!("reports_sync_report", render_sync_report(&rows));
}

#[test]
fn orphans_are_exactly_the_planted_ones() {
    let dir = TempDir::new("orphans");
    let fx = build(&dir.join("server.db"), fixed_start());
    let store = fx.open_at(200);
    let o = orphans(&store).unwrap();
    assert_eq!(o.without_client.iter().map(|s| s.subscription).collect::<Vec<_>>(), [fx.carol]);
    assert_eq!(o.tables_without_subscription, [STRAY]);
    assert_eq!(o.duplicates.len(), 1, "{:?}", o.duplicates);
    let dup = &o.duplicates[0];
    assert_eq!(
        (dup.user, dup.machine.as_str(), dup.subscription_type),
        (user(2), "DESKTOP-7", SubscriptionType::Outlook)
    );
    assert_eq!(dup.subscriptions.iter().map(|s| s.subscription).collect::<Vec<_>>(), [fx.bob_1, fx.bob_2]);
    snapshot!("reports_orphans", render_orphans(&o));
}

#[test]
fn cleanup_dry_run_leaves_the_file_byte_for_byte_and_apply_removes_exactly_what_it_listed() {
    let dir = TempDir::new("cleanup");
    let fx = build(&dir.join("server.db"), fixed_start());
    // `build` closed every connection: SQLite checkpointed the log into the file and removed it,
    // so the file alone is the database. (Were a -wal left over, opening would checkpoint it into
    // the file: a change of bytes, not of content. The first assert rules that out.)
    let before = files(&fx.path);
    assert_eq!(before.wal, None);
    let dump_before = dump(&fx.path);
    assert!(dump_before["PreparedChange"].iter().any(|row| row[0].contains(&fx.alice_old.to_string())));

    let store = fx.open_at(200);
    let listed = cleanup_candidates(&store, Duration::days(90)).unwrap();
    // Oldest first: Bob's pre-reinstall Outlook (day 0), Alice's old laptop (day 1), Carol's
    // kiosk that never synced (created day 2). Everything else was active after day 110.
    assert_eq!(ids(&listed), [fx.bob_1, fx.alice_old, fx.carol]);
    assert!(listed.iter().all(|c| c.cutoff == fx.day(110)));
    assert_eq!(listed[1].info.last_active(), fx.day(1));
    assert_eq!(listed[2].info.last_active(), fx.day(2));
    assert_eq!(cleanup_candidates(&store, Duration::days(201)).unwrap(), []);
    snapshot!("reports_cleanup_dry_run", render_cleanup(&listed));
    drop(store);
    assert_eq!(files(&fx.path), before, "a dry run changed the file");
    assert!(!sidecar(&fx.path, "-shm").exists());

    let mut store = fx.open_at(200);
    let listed = cleanup_candidates(&store, Duration::days(90)).unwrap();
    let removed = cleanup_apply(&mut store, &listed).unwrap();
    assert_eq!(removed, listed);
    // Now nothing is left to clean, no client row is missing, no duplicate is left; the stray
    // table was never a subscription's, so cleanup left it.
    assert_eq!(cleanup_candidates(&store, Duration::days(90)).unwrap(), []);
    let o = orphans(&store).unwrap();
    assert_eq!((o.without_client.len(), o.duplicates.len()), (0, 0));
    assert_eq!(o.tables_without_subscription, [STRAY]);
    for s in ids(&listed) {
        assert_eq!(whois(&store, &s.sync_entry_table()).unwrap(), None);
    }
    drop(store);
    assert_eq!(dump(&fx.path), without(&dump_before, &ids(&listed)));
}

#[test]
fn cleanup_apply_keeps_a_candidate_that_synced_went_or_is_not_old_enough() {
    let dir = TempDir::new("cleanup-recheck");
    let fx = build(&dir.join("server.db"), fixed_start());
    let mut store = fx.open_at(200);
    assert_eq!(cleanup_apply(&mut store, &[]).unwrap(), []);
    let listed = cleanup_candidates(&store, Duration::days(90)).unwrap();
    assert_eq!(ids(&listed), [fx.bob_1, fx.alice_old, fx.carol]);
    // Meanwhile Bob's old Outlook syncs once more, and Carol's kiosk is unregistered.
    store.prepare_sync(fx.bob_1).unwrap();
    store.unregister_client(fx.carol).unwrap();
    // And two forged candidates: Alice's active laptop against a cutoff before its last sync,
    // and against a cutoff after now.
    let alice_new = whois(&store, &fx.alice_new.sync_entry_table()).unwrap().unwrap();
    let forged = [
        CleanupCandidate { info: alice_new.clone(), cutoff: fx.day(120) },
        CleanupCandidate { info: alice_new, cutoff: fx.day(300) },
    ];
    let all: Vec<CleanupCandidate> = listed.iter().chain(&forged).chain(&listed).cloned().collect();
    let removed = cleanup_apply(&mut store, &all).unwrap();
    assert_eq!(ids(&removed), [fx.alice_old]);
    assert!(whois(&store, &fx.bob_1.sync_entry_table()).unwrap().is_some());
    assert!(whois(&store, &fx.alice_new.sync_entry_table()).unwrap().is_some());
    assert!(whois(&store, &fx.alice_old.sync_entry_table()).unwrap().is_none());
    assert!(
        matches!(cleanup_candidates(&store, Duration::days(-1)), Err(ReportError::BadAge(d)) if d == Duration::days(-1))
    );
    assert!(matches!(
        cleanup_candidates(&store, Duration::days(CLEANUP_AGE_DAYS_MAX + 1)),
        Err(ReportError::BadAge(_))
    ));
}

#[test]
fn corrupt_rows_are_errors_carrying_the_value() {
    let dir = TempDir::new("corrupt");
    let fx = build(&dir.join("server.db"), fixed_start());
    let spoil = |name: &str, sql: &str| {
        let copy = fx.copy_to(&dir.join(name));
        let conn = rusqlite::Connection::open(&copy.path).unwrap();
        conn.execute_batch(sql).unwrap();
        drop(conn);
        copy
    };
    let corrupt = |r: Result<(), ReportError>, column: &str, value: &str| match r {
        Err(ReportError::Corrupt { column: c, value: v, .. }) if c == column && v == value => {}
        other => panic!("{column} {value}: {other:?}"),
    };

    let bob_2 = fx.bob_2.to_string();
    let kind = spoil(
        "kind.db",
        &format!("UPDATE Subscription SET SubscriptionType = 7 WHERE SubscriptionId = '{bob_2}'"),
    );
    let store = kind.open_at(200);
    corrupt(whois(&store, &fx.bob_2.sync_entry_table()).map(|_| ()), "SubscriptionType", "7");
    corrupt(sync_report(&store).map(|_| ()), "SubscriptionType", "7");
    corrupt(orphans(&store).map(|_| ()), "SubscriptionType", "7");
    corrupt(cleanup_candidates(&store, Duration::days(90)).map(|_| ()), "SubscriptionType", "7");

    let guid = spoil(
        "guid.db",
        "INSERT INTO Subscription (SubscriptionId, SystemUserId, MachineName, SubscriptionType, \
         SyncEntryTableName, CreatedOn) VALUES ('not-a-guid', 'x', 'PC', 1, 'SyncEntry_x', '2024-01-01T00:00:00Z')",
    );
    let store = guid.open_at(200);
    corrupt(orphans(&store).map(|_| ()), "SubscriptionId", "not-a-guid");

    let user = spoil(
        "user.db",
        &format!("UPDATE Subscription SET SystemUserId = 'nobody' WHERE SubscriptionId = '{bob_2}'"),
    );
    corrupt(sync_report(&user.open_at(200)).map(|_| ()), "SystemUserId", "nobody");

    let time = spoil(
        "time.db",
        &format!("UPDATE Subscription SET LastSyncStartedOn = 'yesterday' WHERE SubscriptionId = '{bob_2}'"),
    );
    corrupt(
        cleanup_candidates(&time.open_at(200), Duration::days(90)).map(|_| ()),
        "LastSyncStartedOn",
        "yesterday",
    );

    let size = spoil(
        "size.db",
        &format!("UPDATE SubscriptionSyncInfo SET DataSize = -5 WHERE SubscriptionId = '{bob_2}'"),
    );
    corrupt(sync_report(&size.open_at(200)).map(|_| ()), "DataSize", "-5");

    // A subscription naming another's table: whois must not report the wrong owner, and
    // cleanup must not drop the wrong table.
    let table = spoil(
        "table.db",
        &format!("UPDATE Subscription SET SyncEntryTableName = '{STRAY}' WHERE SubscriptionId = '{bob_2}'"),
    );
    corrupt(whois(&table.open_at(200), STRAY).map(|_| ()), "SyncEntryTableName", STRAY);
    // Listed while sound, spoiled before the apply: the apply fails and removes nothing.
    let listed = cleanup_candidates(&fx.open_at(200), Duration::days(90)).unwrap();
    let bob_1_table = spoil(
        "table-2.db",
        &format!(
            "UPDATE Subscription SET SyncEntryTableName = '{STRAY}' WHERE SubscriptionId = '{}'",
            fx.bob_1
        ),
    );
    let before = dump(&bob_1_table.path);
    let mut store = bob_1_table.open_at(200);
    corrupt(cleanup_apply(&mut store, &listed).map(|_| ()), "SyncEntryTableName", STRAY);
    drop(store);
    assert_eq!(dump(&bob_1_table.path), before, "a failed cleanup removed something");
}

/// The `crmsync` binary, end to end.
#[cfg(feature = "cli")]
mod cli {
    use std::process::{Command, Output};

    use super::*;

    fn crmsync(args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_crmsync")).args(args).output().unwrap()
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn ok(args: &[&str]) -> String {
        let out = crmsync(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    }

    /// Runs a command that must fail with `code` and say `message` on stderr; returns stderr.
    fn fails(args: &[&str], code: i32, message: &str) -> String {
        let out = crmsync(args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr:?} does not say {message:?}");
        stderr
    }

    #[test]
    fn the_commands_print_what_the_library_reports() {
        let dir = TempDir::new("cli-report");
        let fx = build(&dir.join("server.db"), fixed_start());
        let file = fx.path.to_str().unwrap();
        let store = fx.open_at(200);
        let rows = sync_report(&store).unwrap();
        let orphans = orphans(&store).unwrap();
        let owner = whois(&store, &fx.alice_old.sync_entry_table()).unwrap().unwrap();
        drop(store);
        let before = files(&fx.path);

        assert_eq!(ok(&["server", "report", "--server", file]), render_sync_report(&rows));
        let json: Vec<SyncReportRow> =
            serde_json::from_str(&ok(&["server", "report", "--server", file, "--json"])).unwrap();
        assert_eq!(json, rows);
        let value: serde_json::Value =
            serde_json::from_str(&ok(&["server", "report", "--json", "--server", file])).unwrap();
        assert_eq!(value[0]["full_name"], "Alice Ng");
        assert_eq!(value[0]["subscription_type"], "Outlook");
        assert_eq!(value[0]["syncs"], 2);

        assert_eq!(ok(&["server", "orphans", "--server", file]), render_orphans(&orphans));
        let json: Orphans =
            serde_json::from_str(&ok(&["server", "orphans", "--server", file, "--json"])).unwrap();
        assert_eq!(json, orphans);

        let table = fx.alice_old.sync_entry_table();
        assert_eq!(ok(&["server", "whois", &table, "--server", file]), render_whois(&owner));
        let json: SyncEntryOwner =
            serde_json::from_str(&ok(&["server", "whois", &table, "--server", file, "--json"])).unwrap();
        assert_eq!(json, owner);
        // A well-formed name nobody owns: exit 1, `null` for JSON.
        fails(&["server", "whois", STRAY, "--server", file], 1, "no subscription has the SyncEntry table");
        let out = crmsync(&["server", "whois", STRAY, "--server", file, "--json"]);
        assert_eq!((out.status.code(), text(&out.stdout).as_str()), (Some(1), "null\n"));

        assert_eq!(files(&fx.path), before, "a report changed the file");
    }

    #[test]
    fn cleanup_lists_without_changing_the_file_and_apply_removes_what_it_listed() {
        let dir = TempDir::new("cli-cleanup");
        // The tool reads the system clock: put "now" (day 200) at the real now.
        let now = DateTime::<Utc>::from(std::time::SystemTime::now());
        let fx = build(&dir.join("server.db"), now - Duration::days(200));
        let file = fx.path.to_str().unwrap();
        let before = files(&fx.path);
        assert_eq!(before.wal, None);
        let dump_before = dump(&fx.path);

        let listed = |json: &serde_json::Value, key: &str| -> Vec<SubscriptionId> {
            let list: Vec<CleanupCandidate> = serde_json::from_value(json[key].clone()).unwrap();
            ids(&list)
        };
        let dry: serde_json::Value = serde_json::from_str(&ok(&[
            "server",
            "cleanup",
            "--server",
            file,
            "--older-than",
            "90d",
            "--json",
        ]))
        .unwrap();
        assert_eq!(dry["applied"], false);
        assert_eq!(dry["older_than"], "90d");
        assert_eq!(listed(&dry, "candidates"), [fx.bob_1, fx.alice_old, fx.carol]);
        assert_eq!(listed(&dry, "removed"), []);
        let table = ok(&["server", "cleanup", "--server", file, "--older-than", "12w"]);
        assert!(table.starts_with("Dry run: 3 subscription(s) last active before "), "{table}");
        assert!(
            table.contains("(older than 12w)") && table.contains("LAPTOP-OLD") && table.contains("KIOSK"),
            "{table}"
        );
        assert!(!table.contains("LAPTOP-NEW"), "{table}");
        assert_eq!(files(&fx.path), before, "a dry run changed the file");
        assert!(!sidecar(&fx.path, "-shm").exists());

        let out =
            crmsync(&["server", "cleanup", "--server", file, "--older-than", "2160h", "--apply", "--json"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        // None of the removed is a primary client (Alice and Bob made their new ones primary),
        // so there is no note.
        assert_eq!(text(&out.stderr), "");
        let applied: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(applied["applied"], true);
        assert_eq!(listed(&applied, "removed"), listed(&dry, "candidates"));
        assert_eq!(listed(&applied, "candidates"), listed(&dry, "candidates"));
        assert_eq!(dump(&fx.path), without(&dump_before, &listed(&dry, "candidates")));

        let again = ok(&["server", "cleanup", "--server", file, "--older-than", "90d", "--apply"]);
        assert!(again.starts_with("No subscription was last active before "), "{again}");
        assert!(again.ends_with("(older than 90d); nothing to remove.\n"), "{again}");
    }

    #[test]
    fn removing_a_primary_client_says_that_no_other_becomes_primary() {
        let dir = TempDir::new("cli-primary");
        let now = DateTime::<Utc>::from(std::time::SystemTime::now());
        let fx = build(&dir.join("server.db"), now - Duration::days(200));
        // Bob's pre-reinstall Outlook is made primary again (it does not sync, so it stays old).
        let mut store = fx.open_at(200);
        store.set_primary_client(fx.bob_1).unwrap();
        drop(store);
        let out = crmsync(&[
            "server",
            "cleanup",
            "--server",
            fx.path.to_str().unwrap(),
            "--older-than",
            "90d",
            "--apply",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(text(&out.stdout).starts_with("Removed 3 subscription(s) last active before "));
        assert_eq!(
            text(&out.stderr),
            format!(
                "crmsync: note: DESKTOP-7 was the primary Outlook client of user {}; no other client becomes \
                 primary until one is made primary\n",
                user(2)
            )
        );
        let store = fx.open_at(200);
        let bob_2 = whois(&store, &fx.bob_2.sync_entry_table()).unwrap().unwrap();
        assert_eq!(bob_2.primary_client, Some(false));
    }

    #[test]
    fn bad_paths_are_refused_with_exit_2_and_no_file_is_created_or_changed() {
        let dir = TempDir::new("cli-paths");
        let commands: [&[&str]; 4] = [
            &["server", "report"],
            &["server", "orphans"],
            &["server", "whois", STRAY],
            &["server", "cleanup", "--older-than", "90d", "--apply"],
        ];
        let missing = dir.join("missing.db");
        let text_file = dir.join("notes.txt");
        std::fs::write(&text_file, b"not a database at all, just some text that is long enough").unwrap();
        let empty = dir.join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        let other = dir.join("other.db");
        {
            let conn = rusqlite::Connection::open(&other).unwrap();
            conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);").unwrap();
        }
        let cases: [(&Path, &str); 5] = [
            (&missing, "no such file"),
            (&dir.0, "is a directory"),
            (&text_file, "not a SQLite database"),
            (&empty, "empty file"),
            (&other, "not a crmsync server store"),
        ];
        for (path, message) in cases {
            let before = std::fs::read(path).ok();
            for command in commands {
                let mut args = command.to_vec();
                args.extend(["--server", path.to_str().unwrap()]);
                let stderr = fails(&args, 2, message);
                assert!(stderr.contains(path.to_str().unwrap()), "{stderr}");
                assert!(!stderr.contains("panicked"), "{stderr}");
                assert_eq!(std::fs::read(path).ok(), before, "{args:?} changed {}", path.display());
                assert!(!sidecar(path, "-wal").exists() && !sidecar(path, "-shm").exists(), "{args:?}");
            }
        }
        assert!(!missing.exists());
    }

    #[test]
    fn bad_arguments_are_refused_with_exit_2_before_the_file_is_opened() {
        let dir = TempDir::new("cli-args");
        let fx = build(&dir.join("server.db"), fixed_start());
        let file = fx.path.to_str().unwrap();
        let before = files(&fx.path);
        let bad_table = "SyncEntry_0123; DROP TABLE Subscription";
        fails(&["server", "whois", bad_table, "--server", file], 2, "is not a SyncEntry table name");
        fails(&["server", "whois", bad_table, "--server", file], 2, bad_table);
        for age in
            ["90", "90x", "d", "0d", "1.5d", "-5d", "\u{663}d", "99999999999999999999d", "36526d", "5300w"]
        {
            let arg = format!("--older-than={age}");
            fails(&["server", "cleanup", "--server", file, &arg], 2, age);
        }
        fails(&["server", "cleanup", "--server", file], 2, "--older-than");
        fails(&["server", "report"], 2, "--server");
        fails(&["server"], 2, "Usage");
        fails(&[], 2, "Usage");
        fails(&["server", "report", "--server", file, "--bogus"], 2, "--bogus");
        assert!(ok(&["server", "cleanup", "--help"]).contains("--older-than"));
        assert_eq!(files(&fx.path), before);
    }
}
