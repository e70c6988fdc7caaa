//! `sync_sqlite`: one sync run that applies 100,000 queued changes (new CRM records to create in
//! Outlook) through the SQLite cache and the SQLite mailbox, committing every 1,000 outcomes
//! (`group_commit`) or every outcome (`per_record_commit`); against `baseline_raw_sql/*`: the bare
//! SQL work per change on the same cache file (upsert the mapping row, delete the queue row)
//! with the same commit sizes, written directly with rusqlite. The baseline's mapping rows are
//! the very rows an engine run writes (read back from one run before measuring), so both pay for
//! the same bytes and index entries.
//!
//! `mailbox_raw_sql/group_commit` is the other half of the floor: the mailbox's bare SQL per
//! created item (the stamp lookup and the insert of the very row the engine writes) with the
//! same commit size, on the mailbox file's own settings. An engine run writes both files, so it
//! can be no faster than the two baselines together.
//!
//! Run: `cargo bench --bench sync`. `CRMSYNC_BENCH_CHANGES=1000000 cargo bench --bench sync --
//! group_commit` runs the same on a million changes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use crmsync::cache::SyncCache;
use crmsync::clock::ManualClock;
use crmsync::engine::{Edges, EngineConfig, NoObserver, SeededIds, run_sync};
use crmsync::mailbox_file::SqliteMailbox;
use crmsync::server::{CrmService, ServerStore, SubscriptionId, SubscriptionType, SystemUserId};
use crmsync::{Change, ChangeOp, CrmId, Fields, ObjectTypeCode, Record, SyncState, VersionNumber};
use rusqlite::{Connection, params};
use uuid::Uuid;

const FILES: [&str; 2] = ["mailbox.sqlite", "OutlookSyncCache.sqlite"];

fn changes() -> u64 {
    std::env::var("CRMSYNC_BENCH_CHANGES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000)
}

fn clock() -> Box<ManualClock> {
    Box::new(ManualClock::new(DateTime::<Utc>::UNIX_EPOCH))
}

/// A cache with `n` queued creates from CRM and an empty mailbox, written once.
fn pristine(dir: &Path, n: u64) {
    std::fs::create_dir_all(dir).expect("dir");
    drop(SqliteMailbox::open(&dir.join(FILES[0]), "BE", clock()).expect("mailbox"));
    let mut cache = SyncCache::open(&dir.join(FILES[1])).expect("cache");
    let mut state = SyncState::default();
    let batch: Vec<Change> = (0..n)
        .map(|i| {
            let otc = [ObjectTypeCode::Contact, ObjectTypeCode::Task][(i % 2) as usize];
            let fields = Fields::try_from_pairs([
                ("subject", format!("record {i}")),
                ("description", format!("queued change number {i}")),
            ])
            .expect("fields");
            let id = CrmId::new(Uuid::from_u64_pair(0xbe, i + 1)).expect("non-nil");
            Change::crm(id, otc, VersionNumber(i + 1), ChangeOp::Create(Record::new(fields))).expect("valid")
        })
        .collect();
    for chunk in batch.chunks(50_000) {
        cache.enqueue(&mut state, chunk).expect("enqueue");
    }
}

fn copy(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).expect("dir");
    for f in FILES {
        std::fs::copy(from.join(f), to.join(f)).expect("copy");
    }
}

/// One engine run over a fresh copy; returns the time of the run alone.
fn engine_run(pristine: &Path, work: &Path, commit_every: usize) -> Duration {
    copy(pristine, work);
    let mut server = ServerStore::in_memory(clock()).expect("server");
    let user = SystemUserId::new(Uuid::from_u128(0xbe)).expect("non-nil");
    server.add_user(user, "Bench").expect("user");
    let subscription: SubscriptionId =
        server.register_client(user, "BENCH", SubscriptionType::Outlook).expect("sub");
    let mut mailbox = SqliteMailbox::open_existing(&work.join(FILES[0]), clock()).expect("mailbox");
    let mut cache = SyncCache::open_existing(&work.join(FILES[1])).expect("cache");
    let config = EngineConfig { commit_every, ..EngineConfig::default() };
    let t = Instant::now();
    let edges = Edges {
        server: &mut server,
        mailbox: &mut mailbox,
        cache: &mut cache,
        ids: &mut SeededIds::new(1),
        observer: &mut NoObserver,
    };
    let report = run_sync(edges, subscription, &config).expect("run");
    let took = t.elapsed();
    let created: u32 = report.by_entity.values().map(|c| c.created).sum();
    assert_eq!(u64::from(created), changes(), "every queued change applied");
    took
}

/// One mapping row as the engine writes it: `CrmId`, `EntryId`, `ObjectTypeCode`, `Base`, `Goid`,
/// `Role`, `Status`, `CrmVersion`.
type MappingRow = (String, String, i64, String, Option<String>, String, String, Option<i64>);

/// One item row as the engine writes it: `ObjectTypeCode`, `Fields`, `GlobalObjectId`, `Status`,
/// `Tracked`, `Stamp`, `ModifiedAt`, `Synced`.
type ItemRow = (i64, String, Option<Vec<u8>>, i64, i64, Option<Vec<u8>>, String, Option<String>);

/// The rows `sql` reads from `file`, one per queued change.
fn read_back<R>(file: &Path, sql: &str) -> Vec<R>
where
    R: for<'r> TryFrom<&'r rusqlite::Row<'r>, Error = rusqlite::Error>,
{
    let conn = Connection::open(file).expect("open");
    let mut stmt = conn.prepare(sql).expect("prepare");
    let rows =
        stmt.query_map([], |r| R::try_from(r)).expect("query").collect::<Result<Vec<R>, _>>().expect("rows");
    assert_eq!(rows.len() as u64, changes(), "one row per queued change: {sql}");
    rows
}

/// The rows an engine run writes to the cache and the mailbox, in the order it writes them: one
/// run on a scratch copy, read back from `IdMappingTable` and `Item`. The baselines write exactly
/// these values, so they pay for the same bytes and the same index entries the engine does (not
/// shorter stand-ins).
fn engine_rows(pristine: &Path, scratch: &Path) -> (Vec<MappingRow>, Vec<ItemRow>) {
    engine_run(pristine, scratch, usize::MAX);
    let mapping = read_back(
        &scratch.join(FILES[1]),
        "SELECT CrmId, EntryId, ObjectTypeCode, Base, Goid, Role, Status, CrmVersion \
         FROM IdMappingTable ORDER BY rowid",
    );
    let items = read_back(
        &scratch.join(FILES[0]),
        "SELECT ObjectTypeCode, Fields, GlobalObjectId, Status, Tracked, Stamp, ModifiedAt, Synced \
         FROM Item ORDER BY Number",
    );
    (mapping, items)
}

/// A fresh copy of `file` from `pristine`, opened with the settings its store puts on it (WAL,
/// and `synchronous`).
fn open_copy(pristine: &Path, work: &Path, file: &str, synchronous: &str) -> Connection {
    copy(pristine, work);
    let conn = Connection::open(work.join(file)).expect("open");
    conn.pragma_update(None, "journal_mode", "WAL").expect("wal");
    conn.pragma_update(None, "synchronous", synchronous).expect("sync");
    conn
}

/// Writes each of `items` with `write`, in transactions opened by `begin` and committed every
/// `commit_every` items (and after the last); returns the time it took.
fn timed_in_groups<I: IntoIterator>(
    conn: &Connection,
    begin: &str,
    commit_every: usize,
    items: I,
    mut write: impl FnMut(I::Item),
) -> Duration {
    let t = Instant::now();
    let mut in_tx = 0;
    for item in items {
        if in_tx == 0 {
            conn.execute_batch(begin).expect("begin");
        }
        write(item);
        in_tx += 1;
        if in_tx == commit_every {
            conn.execute_batch("COMMIT").expect("commit");
            in_tx = 0;
        }
    }
    if in_tx > 0 {
        conn.execute_batch("COMMIT").expect("commit");
    }
    t.elapsed()
}

/// The mailbox's floor: per created item, look its stamp up (as a create must: a retried create
/// finds its earlier item) and insert the very row the engine writes, with the mailbox file's
/// own settings (WAL, synchronous NORMAL).
fn raw_mailbox_sql(pristine: &Path, work: &Path, items: &[ItemRow], commit_every: usize) -> Duration {
    let conn = open_copy(pristine, work, FILES[0], "NORMAL");
    timed_in_groups(&conn, "BEGIN IMMEDIATE", commit_every, items, |item| {
        let mut lookup = conn.prepare_cached("SELECT Number FROM Item WHERE Stamp = ?1").expect("lookup");
        assert!(!lookup.exists([&item.5]).expect("lookup"), "the stamp is free");
        conn.prepare_cached(
            "INSERT INTO Item (ObjectTypeCode, Fields, GlobalObjectId, Status, Tracked, Stamp, ModifiedAt, Synced) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .expect("insert")
        .execute(params![item.0, item.1, item.2, item.3, item.4, item.5, item.6, item.7])
        .expect("insert");
    })
}

/// The floor: per queued change, upsert its mapping row (the very row the engine writes) and
/// delete its queue row, with the cache file's own settings (WAL, synchronous FULL).
fn raw_sql(pristine: &Path, work: &Path, rows: &[MappingRow], commit_every: usize) -> Duration {
    let conn = open_copy(pristine, work, FILES[1], "FULL");
    let ids: Vec<i64> = {
        let mut stmt = conn.prepare("SELECT Id FROM OutlookSyncTable ORDER BY Id").expect("prepare");
        stmt.query_map([], |r| r.get(0)).expect("query").collect::<Result<_, _>>().expect("ids")
    };
    assert_eq!(ids.len(), rows.len(), "a row per queued change");
    timed_in_groups(&conn, "BEGIN", commit_every, ids.iter().zip(rows), |(id, row)| {
        conn.prepare_cached(
            "INSERT INTO IdMappingTable (CrmId, EntryId, ObjectTypeCode, Base, Goid, Role, Status, CrmVersion) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (CrmId) DO UPDATE SET EntryId = ?2",
        )
        .expect("upsert")
        .execute(params![row.0, row.1, row.2, row.3, row.4, row.5, row.6, row.7])
        .expect("upsert");
        conn.prepare_cached("DELETE FROM OutlookSyncTable WHERE Id = ?1")
            .expect("delete")
            .execute([id])
            .expect("delete");
    })
}

/// A criterion routine that times `run` (one run's own time) once per iteration.
fn each_run(run: impl Fn() -> Duration) -> impl FnMut(&mut criterion::Bencher) {
    move |b| b.iter_custom(|iters| (0..iters).map(|_| run()).sum())
}

fn bench(c: &mut Criterion) {
    let n = changes();
    let root: PathBuf = std::env::temp_dir().join(format!("crmsync-bench-sync-{}", std::process::id()));
    let pristine_dir = root.join("pristine");
    pristine(&pristine_dir, n);
    let work = root.join("work");
    let (rows, items) = engine_rows(&pristine_dir, &root.join("scratch"));
    let mut group = c.benchmark_group("sync_sqlite");
    group.sample_size(10);
    group.throughput(Throughput::Elements(n));
    let (pristine_dir, work, rows, items) = (&pristine_dir, &work, &rows, &items);
    let engine = |every: usize| each_run(move || engine_run(pristine_dir, work, every));
    let raw = |every: usize| each_run(move || raw_sql(pristine_dir, work, rows, every));
    group.bench_function("group_commit", engine(1000));
    group.bench_function(BenchmarkId::new("baseline_raw_sql", "group_commit"), raw(1000));
    group.bench_function(
        BenchmarkId::new("mailbox_raw_sql", "group_commit"),
        each_run(move || raw_mailbox_sql(pristine_dir, work, items, 1000)),
    );
    if n <= 100_000 {
        group.bench_function("per_record_commit", engine(1));
        group.bench_function(BenchmarkId::new("baseline_raw_sql", "per_record_commit"), raw(1));
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&root);
}

criterion_group!(benches, bench);
criterion_main!(benches);
