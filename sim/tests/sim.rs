//! The simulator's own tests: a seed replays byte for byte, and the CI sweep: seeds run under
//! their swarms, every fault kind hit in every chunk, and every failure accounted for.

use crmsync_sim::swarm::sweep;
use crmsync_sim::world::WorldConfig;
use crmsync_sim::{FaultKind, run_seed};

#[test]
fn a_seed_replays_byte_for_byte() {
    let config = WorldConfig::default();
    for seed in [0, 1, 42] {
        let a = run_seed(seed, &config, true).unwrap();
        let b = run_seed(seed, &config, true).unwrap();
        assert_eq!(a.trace.hash(), b.trace.hash(), "seed {seed}");
        assert_eq!(a.trace.lines, b.trace.lines, "seed {seed}");
        assert_eq!(a.faults, b.faults, "seed {seed}");
        assert!(a.trace.events > 400, "seed {seed} ran a world: {} events", a.trace.events);
    }
    // Different seeds make different worlds.
    let x = run_seed(3, &config, false).unwrap();
    let y = run_seed(4, &config, false).unwrap();
    assert_ne!(x.trace.hash(), y.trace.hash());
}

/// Seeds of the CI sweep that still fail on an open finding of issue 6, with the finding. A seed
/// not listed must pass, and a listed seed that starts passing must leave the list: either way
/// CI turns red, so the list only ever shrinks by fixing the engine.
///
/// The finding: a client's CRM update whose answer was lost (`network-after-call`) leaves the
/// item's `SyncBase` behind CRM; if the machine is then unlinked and linked again
/// (`unlink-relink`) before a run confirms the write, the relinked cache merges the user's later
/// edit against that old base, sees a conflict, and `CrmWins` keeps the earlier value.
const KNOWN_OPEN: &[(u64, &str)] = &[
    (7, "lost answer, then unlink and relink: later Outlook edit lost to a stale base"),
    (15, "lost answer, then unlink and relink: later Outlook edit lost to a stale base"),
    (59, "lost answer, then unlink and relink: later Outlook edit lost to a stale base"),
];

fn sweep_chunk(from: u64, count: u64) {
    let config = WorldConfig::default();
    let report = sweep(from, count, &config, |_| {}).unwrap();
    let failing: Vec<u64> = report.failures.iter().map(|(seed, _)| *seed).collect();
    let known: Vec<u64> =
        KNOWN_OPEN.iter().map(|(seed, _)| *seed).filter(|seed| (from..from + count).contains(seed)).collect();
    assert_eq!(
        failing, known,
        "failing seeds differ from the known open ones; replay with \
         `cargo run --release -p crmsync-sim -- run --seed S`:\n{:#?}",
        report.failures
    );
    for kind in FaultKind::ALL {
        assert!(report.seeds_hit.get(kind) > 0, "no seed in {from}..{} fired {kind}", from + count);
    }
    assert!(report.sync_runs > count * 50, "{} sync runs in {count} seeds", report.sync_runs);
}

#[test]
fn sweep_seeds_0_to_99() {
    sweep_chunk(0, 100);
}

#[test]
fn sweep_seeds_100_to_199() {
    sweep_chunk(100, 100);
}

#[test]
fn sweep_seeds_200_to_299() {
    sweep_chunk(200, 100);
}

#[test]
fn sweep_seeds_300_to_399() {
    sweep_chunk(300, 100);
}
