//! The SQLite sync cache: it mirrors the pure state step by step (a property over generated
//! runs), a group of steps is durable only once committed, version 1 migrates (committed fixture),
//! and files it must refuse are left byte for byte as they were.

use std::path::{Path, PathBuf};

use crmsync::ObjectTypeCode::{Appointment, Contact, Task};
use crmsync::cache::*;
use crmsync::*;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

use crate::support::*;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("crmsync-cache-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The state as a comparable value: queue entries and ignored errors in id order, the mapping.
fn canonical(state: &SyncState) -> (Vec<QueueEntry>, Mapping, Vec<(QueueId, String)>) {
    let queue = state.queue.entries().into_iter().cloned().collect();
    let mut ignored: Vec<(QueueId, String)> =
        state.ignored.iter().map(|i| (i.entry.id, i.error.clone())).collect();
    ignored.sort();
    (queue, state.mapping.clone(), ignored)
}

#[derive(Debug, Clone, Copy)]
enum Fate {
    Applied,
    Failed,
    Ignored,
}

fn changes(n: usize, seed: u64) -> Vec<Change> {
    // A little of everything: creates and updates from both sides, deletes, a meeting.
    let mut out = Vec::new();
    for i in 0..n as u128 {
        let k = (i as u64).wrapping_mul(seed | 1) % 7;
        let crm = i + 1;
        let entry = format!("E{crm}");
        let value = format!("v{}", seed % 5);
        let change = match k {
            0 | 1 => Change::crm(
                id(crm),
                Contact,
                VersionNumber(100 + i as u64),
                ChangeOp::Create(rec(&[("fullname", &value)])),
            ),
            2 => Change::crm(
                id(crm),
                Appointment,
                VersionNumber(100 + i as u64),
                ChangeOp::Create(meeting(crm as u8, Role::Owner, &[("subject", &value)])),
            ),
            3 => Change::outlook(
                e(&entry),
                Task,
                at(i as i64),
                ChangeOp::Create(orec(crm, &[("subject", &value)])),
            ),
            4 => Change::crm(
                id(crm),
                Task,
                VersionNumber(100 + i as u64),
                ChangeOp::Delete(DeleteReason::Deleted),
            ),
            5 => Change::outlook(
                e(&entry),
                Contact,
                at(i as i64),
                ChangeOp::Create(orec(crm, &[("fullname", &value)])),
            ),
            _ => Change::crm(
                id(crm),
                Contact,
                VersionNumber(100 + i as u64),
                ChangeOp::Update(rec(&[("fullname", &value)])),
            ),
        };
        out.push(change.unwrap());
    }
    out
}

fn outcome(action: &Action, fate: Fate, n: usize) -> Outcome {
    let error = || ItemError::new(ItemErrorKind::Locked, format!("locked {n}"));
    match (fate, &action.op) {
        (_, ActionOp::Reject { error }) => {
            Outcome::Failed(ItemError::new(ItemErrorKind::Invalid, error.to_string()))
        }
        (Fate::Applied, ActionOp::CreateInOutlook { .. }) => {
            Outcome::Applied(Applied { entry_id: Some(e(&format!("NEW{n}"))), crm_version: None })
        }
        (Fate::Applied, _) => {
            Outcome::Applied(Applied { entry_id: None, crm_version: Some(VersionNumber(10_000 + n as u64)) })
        }
        (Fate::Failed, _) => Outcome::Failed(error()),
        (Fate::Ignored, _) => Outcome::FailedIgnored(error()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/cache.txt"))),
        ..ProptestConfig::with_cases(48)
    })]

    /// Queueing and settling through the cache, then loading it, gives the state the pure core
    /// reached, over two runs (so retried and ignored entries are settled again).
    #[test]
    fn the_cache_mirrors_the_pure_state(
        n in 1usize..40,
        seed in any::<u64>(),
        fates in proptest::collection::vec(prop_oneof![3 => Just(Fate::Applied), 1 => Just(Fate::Failed), 1 => Just(Fate::Ignored)], 80),
        group in 1usize..5,
        reuse in any::<bool>(),
    ) {
        let mut cache = SyncCache::in_memory().unwrap();
        // Kept loads must never show a state the cache no longer holds.
        cache.reuse_loads(reuse);
        let mut state = SyncState::default();
        cache.enqueue(&mut state, &changes(n, seed)).unwrap();
        let policies = deletes_confirmed();
        let mut step = 0;
        for _run in 0..2 {
            let plan = plan(&state.queue, &state.mapping, &policies).unwrap();
            for action in &plan.actions {
                if step % group == 0 {
                    cache.commit().unwrap();
                    cache.begin().unwrap();
                }
                let o = outcome(action, fates[step % fates.len()], step);
                state = settle(state, action, o);
                cache.record_settled(&state, action).unwrap();
                if step % 3 == 0 {
                    prop_assert_eq!(canonical(&cache.load().unwrap()), canonical(&state));
                }
                step += 1;
            }
            cache.commit().unwrap();
            prop_assert_eq!(canonical(&cache.load().unwrap()), canonical(&state));
        }
    }
}

#[test]
fn an_uncommitted_group_is_lost_whole_on_a_crash() {
    let dir = temp_dir("group");
    let path = dir.join("OutlookSyncCache.sqlite");
    {
        let mut cache = SyncCache::open(&path).unwrap();
        let mut state = SyncState::default();
        cache.enqueue(&mut state, &changes(3, 1)).unwrap();
        cache.begin().unwrap();
        cache.enqueue(&mut state, &changes(2, 2)).unwrap();
        cache.set_meta("mailbox_cursor", "42").unwrap();
        // Dropped without commit: the process died mid-group.
    }
    let cache = SyncCache::open(&path).unwrap();
    assert_eq!(cache.load().unwrap().queue.len(), 3);
    assert_eq!(cache.meta("mailbox_cursor").unwrap(), None);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Rows settled inside a group leave the file with the group's commit (deleted together, see
/// `SyncCache::record_settled`): another connection sees them gone once it commits, a load inside
/// the group already sees them gone, and a crash keeps them all.
#[test]
fn rows_settled_in_a_group_leave_the_file_with_its_commit() {
    let dir = temp_dir("settled");
    let path = dir.join("OutlookSyncCache.sqlite");
    let mut cache = SyncCache::open(&path).unwrap();
    let mut state = SyncState::default();
    cache.enqueue(&mut state, &changes(12, 5)).unwrap();
    let policies = deletes_confirmed();
    let plan = plan(&state.queue, &state.mapping, &policies).unwrap();
    let settle_group = |cache: &mut SyncCache, state: &mut SyncState| {
        cache.begin().unwrap();
        // Every other action fails and stays: the settled rows are not one range.
        for (n, action) in plan.actions.iter().enumerate() {
            let fate = if n % 2 == 0 { Fate::Applied } else { Fate::Failed };
            *state = settle(std::mem::take(state), action, outcome(action, fate, n));
            cache.record_settled(state, action).unwrap();
        }
    };
    let before = state.clone();
    settle_group(&mut cache, &mut state);
    assert!(state.queue.len() < before.queue.len(), "some rows were settled");
    assert_eq!(canonical(&cache.load().unwrap()), canonical(&state), "a load inside the group");
    cache.abandon_group().unwrap();
    assert_eq!(canonical(&cache.load().unwrap()), canonical(&before), "a crash keeps every row");
    state = before;
    settle_group(&mut cache, &mut state);
    cache.commit().unwrap();
    let other = SyncCache::open_existing(&path).unwrap();
    assert_eq!(canonical(&other.load().unwrap()), canonical(&state));
    drop((cache, other));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_kept_load_never_outlives_a_write_a_rollback_or_another_connection() {
    let dir = temp_dir("reuse");
    let path = dir.join("OutlookSyncCache.sqlite");
    let mut cache = SyncCache::open(&path).unwrap();
    cache.reuse_loads(true);
    let mut state = SyncState::default();
    cache.enqueue(&mut state, &changes(3, 1)).unwrap();
    assert_eq!(cache.load().unwrap().queue.len(), 3);
    assert_eq!(cache.load().unwrap(), cache.load().unwrap(), "a repeated load answers the same");
    // A write through this connection.
    cache.enqueue(&mut state, &changes(2, 2)).unwrap();
    assert_eq!(cache.load().unwrap().queue.len(), 5);
    // A group: its writes show inside it, and a crash (rollback) takes them back.
    cache.begin().unwrap();
    cache.enqueue(&mut state, &changes(4, 3)).unwrap();
    assert_eq!(cache.load().unwrap().queue.len(), 9);
    cache.abandon_group().unwrap();
    assert_eq!(cache.load().unwrap().queue.len(), 5);
    // Another connection (another process) writing the same file.
    let mut other = SyncCache::open_existing(&path).unwrap();
    other.enqueue(&mut SyncState::default(), &changes(1, 4)).unwrap();
    assert_eq!(cache.load().unwrap().queue.len(), 6);
    other.clear().unwrap();
    assert_eq!(canonical(&cache.load().unwrap()), canonical(&SyncState::default()));
    drop((cache, other));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_remembered_run_state_answers_loads_until_the_file_changes() {
    let dir = temp_dir("remember");
    let path = dir.join("OutlookSyncCache.sqlite");
    let mut cache = SyncCache::open(&path).unwrap();
    let mut state = SyncState::default();
    cache.enqueue(&mut state, &changes(3, 1)).unwrap();
    // Off by default: nothing is kept, every load reads the file.
    cache.remember(SyncState::default()).unwrap();
    assert_eq!(cache.load().unwrap().queue.len(), 3);
    cache.reuse_loads(true);
    // What a finished run hands over is what loads answer (shared, without a copy) ...
    cache.remember(state.clone()).unwrap();
    let shared = cache.load_shared().unwrap();
    assert!(std::rc::Rc::ptr_eq(&shared, &cache.load_shared().unwrap()));
    assert_eq!(canonical(&shared), canonical(&state));
    assert_eq!(canonical(&cache.load_from_file().unwrap()), canonical(&state));
    // ... until this connection writes, or another one does.
    cache.enqueue(&mut state, &changes(2, 2)).unwrap();
    assert_eq!(cache.load_shared().unwrap().queue.len(), 5);
    cache.remember(state.clone()).unwrap();
    let mut other = SyncCache::open_existing(&path).unwrap();
    other.enqueue(&mut SyncState::default(), &changes(1, 4)).unwrap();
    assert_eq!(cache.load_shared().unwrap().queue.len(), 6);
    // Never inside a group: a rollback could take its state back.
    cache.begin().unwrap();
    cache.remember(SyncState::default()).unwrap();
    assert_eq!(cache.load().unwrap().queue.len(), 6);
    cache.abandon_group().unwrap();
    drop((cache, other));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn clear_forgets_everything_the_cache_held() {
    let mut cache = SyncCache::in_memory().unwrap();
    let mut state = SyncState::default();
    cache.enqueue(&mut state, &changes(5, 3)).unwrap();
    cache.set_meta("subscription", "x").unwrap();
    cache.clear().unwrap();
    assert_eq!(canonical(&cache.load().unwrap()), canonical(&SyncState::default()));
    assert_eq!(cache.meta("subscription").unwrap(), None);
}

fn fixture_copy(dir: &Path) -> PathBuf {
    let path = dir.join("OutlookSyncCache.sqlite");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cache-v1.sqlite"), &path).unwrap();
    path
}

#[test]
fn a_version_1_cache_migrates_and_keeps_its_rows() {
    let dir = temp_dir("migrate");
    let path = fixture_copy(&dir);
    let cache = SyncCache::open(&path).unwrap();
    let state = cache.load().unwrap();
    let entry = state.queue.entries()[0].clone();
    assert_eq!((entry.id, entry.attempts), (QueueId(1), 1));
    assert_eq!(entry.last_error.as_deref(), Some("Locked: item open in an inspector"));
    assert_eq!(entry.change.key(), &RecordKey::Crm(id(1)));
    let alice = state.mapping.get(id(1)).unwrap();
    assert_eq!((alice.entry_id.as_str(), &alice.base), ("E1", &f(&[("fullname", "Alice")])));
    assert_eq!(
        (alice.role, alice.status, alice.goid.clone(), alice.crm_version),
        (Role::Owner, ActivityStatus::Open, None, None)
    );
    assert_eq!(state.mapping.get(id(2)).unwrap().object_type, Task);
    drop(cache);
    // Migrated once: it opens as version 2 and can now hold ignored errors.
    let version: i32 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, CACHE_SCHEMA_VERSION);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn foreign_corrupt_and_newer_files_are_refused_and_left_untouched() {
    let dir = temp_dir("refuse");
    let refused = |path: &Path| {
        let before = std::fs::read(path).unwrap();
        let err = SyncCache::open(path).unwrap_err();
        assert_eq!(std::fs::read(path).unwrap(), before, "{} was changed", path.display());
        assert!(err.to_string().contains(&path.display().to_string()), "the error names the file: {err}");
        err
    };

    let text = dir.join("notes.txt");
    std::fs::write(&text, b"plain text, and no database at all; long enough to have a header").unwrap();
    assert!(matches!(refused(&text), CacheOpenError::Sqlite { .. }));

    let other = dir.join("other.db");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    assert!(matches!(refused(&other), CacheOpenError::NotACache { found: 0, .. }));

    let newer = fixture_copy(&dir);
    rusqlite::Connection::open(&newer)
        .unwrap()
        .pragma_update(None, "user_version", CACHE_SCHEMA_VERSION + 1)
        .unwrap();
    assert!(
        matches!(refused(&newer), CacheOpenError::NewerSchema { found, .. } if found == CACHE_SCHEMA_VERSION + 1)
    );

    // A cache whose pages were damaged: a valid header, garbage after it.
    let corrupt = dir.join("corrupt.sqlite");
    let mut bytes =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cache-v1.sqlite")).unwrap();
    for b in bytes.iter_mut().skip(4096) {
        *b = 0xA5;
    }
    std::fs::write(&corrupt, &bytes).unwrap();
    refused(&corrupt);

    let missing = dir.join("missing.sqlite");
    assert!(SyncCache::open_existing(&missing).is_err());
    assert!(!missing.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn re_pointed_pairs_are_mirrored_as_the_pure_mapping_has_them() {
    let mut cache = SyncCache::in_memory().unwrap();
    let mut state = SyncState::default();
    let policies = Policies::default();
    let run = |cache: &mut SyncCache, state: SyncState, created: &[&str]| {
        let plan = plan(&state.queue, &state.mapping, &policies).unwrap();
        let mut made = created.iter();
        let mut state = state;
        for action in &plan.actions {
            let entry_id = match &action.op {
                ActionOp::CreateInOutlook { .. } => made.next().map(|name| e(name)),
                _ => None,
            };
            state = settle(state, action, Outcome::Applied(Applied { entry_id, crm_version: None }));
            cache.record_settled(&state, action).unwrap();
        }
        state
    };
    // Two pairs: 1 <-> E1, 2 <-> E2.
    let creates = [
        Change::crm(id(1), Contact, VersionNumber(11), ChangeOp::Create(rec(&[("fullname", "A")]))).unwrap(),
        Change::crm(id(2), Contact, VersionNumber(12), ChangeOp::Create(rec(&[("fullname", "B")]))).unwrap(),
    ];
    cache.enqueue(&mut state, &creates).unwrap();
    state = run(&mut cache, state, &["E1", "E2"]);
    // 1 deleted in CRM while edited in Outlook: re-created under a new id, E1 re-pointed.
    // 2 edited in CRM while deleted in Outlook: re-created in Outlook as E3, 2 re-pointed.
    let edits = [
        Change::crm(id(1), Contact, VersionNumber(13), ChangeOp::Delete(DeleteReason::Deleted)).unwrap(),
        Change::outlook(e("E1"), Contact, at(1), ChangeOp::Update(rec(&[("fullname", "A2")]))).unwrap(),
        Change::crm(id(2), Contact, VersionNumber(14), ChangeOp::Update(rec(&[("fullname", "B2")]))).unwrap(),
        Change::outlook(e("E2"), Contact, at(2), ChangeOp::Delete(DeleteReason::Deleted)).unwrap(),
    ];
    cache.enqueue(&mut state, &edits).unwrap();
    state = run(&mut cache, state, &["E3"]);
    assert_eq!(state.mapping.get(id(1).successor()).unwrap().entry_id, e("E1"));
    assert_eq!(state.mapping.get(id(2)).unwrap().entry_id, e("E3"));
    assert_eq!(state.mapping.len(), 2);
    assert_eq!(canonical(&cache.load().unwrap()), canonical(&state));
}
