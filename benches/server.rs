//! `prepare_get`: one subscription over 1,000,000 records with 100,000 changed since its last
//! sync: prepare sync, get every page, acknowledge each page. The store is an SQLite file (WAL)
//! in a temporary folder.
//!
//! Run: `cargo bench --bench server`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use crmsync::clock::ManualClock;
use crmsync::server::{
    CrmService, ServerRecord, ServerStore, SubscriptionId, SubscriptionType, SystemUserId,
};
use crmsync::{ActivityStatus, CrmId, Fields, ObjectTypeCode, VersionNumber};
use uuid::Uuid;

const RECORDS: u64 = 1_000_000;
const CHANGED: u64 = 100_000;
const PAGE_SIZE: usize = 5_000;

fn record(owner: SystemUserId, n: u64, edit: u64) -> ServerRecord {
    let otc = [ObjectTypeCode::Contact, ObjectTypeCode::Task, ObjectTypeCode::Appointment][(n % 3) as usize];
    ServerRecord {
        crm_id: CrmId::new(Uuid::from_u64_pair(0xc0ffee, n + 1)).expect("non-nil"),
        object_type: otc,
        owner,
        version: VersionNumber(0),
        fields: Fields::try_from_pairs([
            ("subject", format!("record {n} edit {edit}")),
            ("description", format!("some longer text about record {n}")),
            ("telephone1", format!("+44 20 7946 {:04}", n % 10_000)),
        ])
        .expect("valid fields"),
        goid: None,
        status: ActivityStatus::Open,
        attendees: Vec::new(),
    }
}

/// Prepare, every page, acknowledge each page. Returns how many changes were handed out.
fn sync(store: &mut ServerStore, sub: SubscriptionId) -> usize {
    store.prepare_sync(sub).expect("prepare");
    let (mut after, mut handed) = (None, 0);
    loop {
        let page = store.get_sync_data(sub, after, PAGE_SIZE).expect("page");
        handed += page.changes.len();
        if let Some(last) = page.last_seq {
            store.acknowledge(sub, last).expect("ack");
        }
        after = page.last_seq.or(after);
        if !page.more {
            return handed;
        }
    }
}

fn bench(c: &mut Criterion) {
    let dir: PathBuf = std::env::temp_dir().join(format!("crmsync-bench-server-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let clock = ManualClock::new(DateTime::<Utc>::UNIX_EPOCH);
    let mut store = ServerStore::open(&dir.join("server.db"), Box::new(clock)).expect("store");
    let owner = SystemUserId::new(Uuid::from_u128(0x55)).expect("non-nil");
    store.add_user(owner, "Bench User").expect("user");
    let sub = store.register_client(owner, "BENCH", SubscriptionType::Outlook).expect("subscription");
    for chunk in (0..RECORDS).collect::<Vec<_>>().chunks(100_000) {
        let records: Vec<ServerRecord> = chunk.iter().map(|&n| record(owner, n, 0)).collect();
        store.put_records(&records).expect("import");
    }
    assert_eq!(sync(&mut store, sub), RECORDS as usize, "the first sync hands out every record");

    let mut group = c.benchmark_group("prepare_get");
    group.sample_size(10);
    group.throughput(Throughput::Elements(CHANGED));
    let mut edit = 0;
    group.bench_function("100k_of_1M", |b| {
        // The edits are made outside the timed part; only prepare + get + acknowledge is timed.
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                edit += 1;
                // A different tenth of the records each time, edited since the last sync.
                let start = (edit * CHANGED) % RECORDS;
                let records: Vec<ServerRecord> =
                    (start..start + CHANGED).map(|n| record(owner, n % RECORDS, edit)).collect();
                store.put_records(&records).expect("edits");
                let t = Instant::now();
                assert_eq!(sync(&mut store, sub), CHANGED as usize);
                timed += t.elapsed();
            }
            timed
        })
    });
    group.finish();
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
