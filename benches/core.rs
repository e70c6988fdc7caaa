//! `plan_settle`: plan a queue and settle every action, at 10k, 100k and 1M queued changes
//! (about 30% of them in conflicting pairs, mixed entity types), against the floor any planner
//! pays: `baseline_sort_merge/1M`, a plain sort by key and one linear pass over the same changes.
//!
//! Run: `cargo bench --bench core`. Both run on the allocator of the `crmsync` binary (mimalloc).

use std::hint::black_box;

/// The allocator the `crmsync` binary runs on (see `Cargo.toml`), so the figures are the tool's.
/// Under glibc's malloc each 1M plan's actions (about 250 MB) came from fresh pages that the
/// kernel faults in one 4 KiB page at a time, and took back once the plan was settled
/// (ARCHITECTURE.md, "Memory"). The baseline runs on it too.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use chrono::{DateTime, Duration, Utc};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use crmsync::*;

/// A deterministic generator (SplitMix64), so every run benches the same queue.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const TYPES: [ObjectTypeCode; 5] = [
    ObjectTypeCode::Contact,
    ObjectTypeCode::Appointment,
    ObjectTypeCode::Task,
    ObjectTypeCode::PhoneCall,
    ObjectTypeCode::Letter,
];

fn crm_id(n: u64) -> CrmId {
    CrmId::new(uuid::Uuid::from_u64_pair(0x5eed, n + 1)).expect("not nil")
}

fn entry_id(n: u64) -> EntryId {
    EntryId::new(format!("00000000{n:016X}")).expect("valid")
}

fn fields(rng: &mut Rng, otc: ObjectTypeCode) -> Fields {
    let names: &[&str] = match otc {
        ObjectTypeCode::Contact => &["emailaddress1", "fullname", "jobtitle", "telephone1", "address1_city"],
        ObjectTypeCode::Appointment => {
            &["subject", "scheduledstart", "scheduledend", "location", "description"]
        }
        _ => &["subject", "scheduledend", "prioritycode", "description", "statecode"],
    };
    Fields::try_from_pairs(names.iter().map(|n| (*n, format!("{n}-{}", rng.below(4))))).expect("valid fields")
}

fn record(rng: &mut Rng, otc: ObjectTypeCode, n: u64) -> Record {
    let mut r = Record::new(fields(rng, otc));
    if otc == ObjectTypeCode::Appointment {
        r.goid = Some(GlobalObjectId::new(n.to_be_bytes().to_vec()).expect("valid"));
    }
    r
}

/// `changes` queued changes: 30% in conflicting pairs (both sides updated a mapped record), 35%
/// CRM updates, 15% Outlook updates, 10% CRM creates, 5% Outlook creates, 5% deletes.
fn world(changes: usize) -> SyncState {
    let mut rng = Rng(42);
    let t0 = DateTime::<Utc>::UNIX_EPOCH + Duration::days(20_000);
    let mut state = SyncState::default();
    let mut version = 1_000_000u64;
    let mut n = 0u64;
    while state.queue.len() < changes {
        n += 1;
        let otc = TYPES[rng.below(TYPES.len() as u64) as usize];
        let roll = rng.below(100);
        let mapped = !(80..95).contains(&roll);
        if mapped {
            let base = record(&mut rng, otc, n);
            let entry = MappingEntry {
                crm_id: crm_id(n),
                entry_id: entry_id(n),
                object_type: otc,
                base: base.fields.clone(),
                goid: base.goid.clone(),
                role: Role::Owner,
                status: ActivityStatus::Open,
                crm_version: Some(VersionNumber(n)),
            };
            state.mapping.insert(entry).expect("unique ids");
        }
        version += 1;
        let at = t0 + Duration::seconds(n as i64);
        let crm = |op| Change::crm(crm_id(n), otc, VersionNumber(version), op).expect("valid");
        let outlook = |op| Change::outlook(entry_id(n), otc, at, op).expect("valid");
        let mut push = |c: Change| {
            state.queue.push(c).expect("room");
        };
        match roll {
            0..15 => {
                push(crm(ChangeOp::Update(record(&mut rng, otc, n))));
                push(outlook(ChangeOp::Update(record(&mut rng, otc, n))));
            }
            15..50 => push(crm(ChangeOp::Update(record(&mut rng, otc, n)))),
            50..65 => push(outlook(ChangeOp::Update(record(&mut rng, otc, n)))),
            65..80 => push(crm(ChangeOp::Update(record(&mut rng, otc, n)))),
            80..90 => push(crm(ChangeOp::Create(record(&mut rng, otc, n)))),
            90..95 => {
                let mut r = record(&mut rng, otc, n);
                r.crm_id = Some(crm_id(n));
                push(outlook(ChangeOp::Create(r)));
            }
            _ => push(crm(ChangeOp::Delete(DeleteReason::Deleted))),
        };
    }
    state
}

fn confirmed() -> Policies {
    // The bench deletes 5% of records on purpose; the guard is not what is measured.
    Policies {
        mass_delete: MassDeleteGuard { confirmed: true, ..MassDeleteGuard::default() },
        ..Policies::default()
    }
}

/// Plans and settles every action as a success, as the engine would after applying it (in one
/// batch: `settle_all` equals settling the actions one by one).
fn plan_and_settle(state: SyncState, new_items: &[EntryId], policies: &Policies) -> SyncState {
    let plan = plan(&state.queue, &state.mapping, policies).expect("guard confirmed");
    let mut next_item = new_items.iter();
    settle_all(state, plan, |action| match &action.op {
        ActionOp::Reject { error } => {
            Outcome::Failed(ItemError::new(ItemErrorKind::Invalid, error.to_string()))
        }
        ActionOp::CreateInOutlook { .. } => {
            Outcome::Applied(Applied { entry_id: next_item.next().cloned(), crm_version: None })
        }
        _ => Outcome::Applied(Applied::default()),
    })
}

/// The floor: sort the same changes by key and fold each key's run in one linear pass.
fn sort_merge(queue: &Queue) -> usize {
    let mut keyed: Vec<(&RecordKey, QueueId, &QueueEntry)> =
        queue.iter_unordered().map(|e| (e.change.key(), e.id, e)).collect();
    keyed.sort_unstable_by(|a, b| a.0.cmp(b.0).then(a.1.cmp(&b.1)));
    let mut records = 0;
    let mut last: Option<&RecordKey> = None;
    for (key, _, entry) in &keyed {
        if last != Some(*key) {
            records += 1;
            last = Some(*key);
        }
        black_box(entry.change.stamp());
    }
    records
}

fn bench(c: &mut Criterion) {
    let policies = confirmed();
    let mut group = c.benchmark_group("plan_settle");
    group.sample_size(10);
    for (id, size) in [("10k", 10_000), ("100k", 100_000), ("1M", 1_000_000)] {
        let state = world(size);
        let new_items: Vec<EntryId> = (0..size as u64).map(|i| entry_id(u64::MAX / 2 + i)).collect();
        group.throughput(Throughput::Elements(state.queue.len() as u64));
        group.bench_function(id, |b| {
            b.iter_batched(
                || state.clone(),
                |s| plan_and_settle(s, &new_items, &policies),
                BatchSize::LargeInput,
            )
        });
        if size == 1_000_000 {
            group
                .bench_function("baseline_sort_merge/1M", |b| b.iter(|| sort_merge(black_box(&state.queue))));
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
