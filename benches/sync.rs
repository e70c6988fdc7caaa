//! `sync_sqlite`: one sync run that applies 100,000 queued changes (new CRM records to create in
//! Outlook) through the SQLite cache and the SQLite mailbox, committing every 1,000 outcomes
//! (`group_commit`) or every outcome (`per_record_commit`); against `baseline_raw_sql/*`: the bare
//! SQL work per change on the same cache file (upsert the mapping row, delete the queue row)
//! with the same commit sizes, written directly with rusqlite.
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

/// The floor: per queued change, upsert its mapping row and delete its queue row.
fn raw_sql(pristine: &Path, work: &Path, commit_every: usize) -> Duration {
    copy(pristine, work);
    let conn = Connection::open(work.join(FILES[1])).expect("open");
    conn.pragma_update(None, "journal_mode", "WAL").expect("wal");
    conn.pragma_update(None, "synchronous", "FULL").expect("sync");
    let ids: Vec<i64> = {
        let mut stmt = conn.prepare("SELECT Id FROM OutlookSyncTable ORDER BY Id").expect("prepare");
        stmt.query_map([], |r| r.get(0)).expect("query").collect::<Result<_, _>>().expect("ids")
    };
    let t = Instant::now();
    let mut in_tx = 0;
    for id in &ids {
        if in_tx == 0 {
            conn.execute_batch("BEGIN").expect("begin");
        }
        conn.prepare_cached(
            "INSERT INTO IdMappingTable (CrmId, EntryId, ObjectTypeCode, Base) VALUES (?1, ?2, 2, '{}') \
             ON CONFLICT (CrmId) DO UPDATE SET EntryId = ?2",
        )
        .expect("upsert")
        .execute(params![format!("crm-{id}"), format!("entry-{id}")])
        .expect("upsert");
        conn.prepare_cached("DELETE FROM OutlookSyncTable WHERE Id = ?1")
            .expect("delete")
            .execute([id])
            .expect("delete");
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

fn bench(c: &mut Criterion) {
    let n = changes();
    let root: PathBuf = std::env::temp_dir().join(format!("crmsync-bench-sync-{}", std::process::id()));
    let pristine_dir = root.join("pristine");
    pristine(&pristine_dir, n);
    let work = root.join("work");
    let mut group = c.benchmark_group("sync_sqlite");
    group.sample_size(10);
    group.throughput(Throughput::Elements(n));
    let timed = |run: fn(&Path, &Path, usize) -> Duration, every: usize| {
        let (pristine_dir, work) = (pristine_dir.clone(), work.clone());
        move |b: &mut criterion::Bencher| {
            b.iter_custom(|iters| (0..iters).map(|_| run(&pristine_dir, &work, every)).sum())
        }
    };
    group.bench_function("group_commit", timed(engine_run, 1000));
    group.bench_function(BenchmarkId::new("baseline_raw_sql", "group_commit"), timed(raw_sql, 1000));
    if n <= 100_000 {
        group.bench_function("per_record_commit", timed(engine_run, 1));
        group.bench_function(BenchmarkId::new("baseline_raw_sql", "per_record_commit"), timed(raw_sql, 1));
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&root);
}

criterion_group!(benches, bench);
criterion_main!(benches);
