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

/// Seeds of the CI sweep that still fail on an open finding of issue 6. A seed not listed must
/// pass, and a listed seed that starts passing must leave the list: either way CI turns red.
/// A fix changes the traces of many seeds, so it may expose a finding in a seed that passed
/// before; that seed joins the list under its class (seeds 50 and 61 did when the fix of seed
/// 54 changed their runs, until the conditional CRM write fixed them). Replay one with
/// `cargo run --release -p crmsync-sim -- run --seed S` (`CRMSYNC_SIM_WATCH=<CrmId>` follows a
/// record).
const KNOWN_OPEN: &[(u64, &str)] = &[];

/// Findings the sweep made and the engine (or the model) fixed, replayed by name so a
/// regression says which story broke. The sweep runs them too.
const FIXED: &[(u64, &str)] = &[
    (7, "model: an organiser's Outlook delete overrides the CRM edits it had seen"),
    (54, "engine: an unconfirmed create's base restored once CRM is known to hold the record"),
    (123, "mailbox: an update's fields and agreed base land on the item in one write"),
    (866, "mailbox: as seed 123, then a switch of primary took the lagging base"),
    (171, "engine: as seed 54"),
    (50, "engine: a CRM write is conditional on the version its merge started from"),
    (61, "engine: as seed 50"),
    (202, "engine: as seed 50"),
    (286, "engine: as seed 50"),
    (315, "engine: as seed 50"),
    (238, "engine: CRM holding a value the item has since moved on from is agreed, not a conflict"),
    (502, "engine: an update of a record deleted in CRM meanwhile waits for the delete to merge"),
    (587, "engine: an echo moves the pair and the item's base to the version CRM holds"),
    (257, "engine: as seed 587, across a switch of primary"),
    (954, "engine: as seed 587"),
    (1155, "engine: as seed 587"),
    (853, "engine: update wins over a CRM delete with the record's last CRM values"),
    (1831, "engine: as seed 853"),
    (447, "model: an earlier edit that reached CRM counts when a later one is withdrawn"),
    (890, "model: as seed 447"),
    (1046, "model: as seed 447"),
    (1619, "engine: a second attendee bringing back a deleted meeting joins the first's comeback"),
    (1659, "model: a CRM delete overrides the values its author saw; the comeback lacks them"),
    (433, "model: as seed 1659 (left the filter, then deleted: the comeback carries the edit)"),
    (867, "engine: the note of a write whose answer was lost is kept on the item, for a rebuilt cache"),
    (1109, "engine: as seed 867"),
    (1734, "engine: as seed 867"),
];

#[test]
fn fixed_findings_stay_fixed() {
    let config = WorldConfig::default();
    for (seed, story) in FIXED {
        let outcome = run_seed(*seed, &config, false).unwrap();
        assert!(outcome.passed(), "seed {seed} ({story}) fails again: {:?}", outcome.violation);
    }
}

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

/// The CI sweep: seeds 0..2000 in eight chunks of 250, so the test threads share them.
macro_rules! sweep_chunks {
    ($($name:ident: $from:expr),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                sweep_chunk($from, 250);
            }
        )*
    };
}

sweep_chunks! {
    sweep_seeds_0_to_249: 0,
    sweep_seeds_250_to_499: 250,
    sweep_seeds_500_to_749: 500,
    sweep_seeds_750_to_999: 750,
    sweep_seeds_1000_to_1249: 1000,
    sweep_seeds_1250_to_1499: 1250,
    sweep_seeds_1500_to_1749: 1500,
    sweep_seeds_1750_to_1999: 1750,
}

mod generated {
    //! The world and its faults as a proptest strategy: a failing world shrinks to a smaller
    //! one (fewer users, machines, records, runs and fault kinds; a smaller seed), and the case
    //! is kept in `proptest-regressions/`. The random seed of the search is fixed, so CI runs
    //! the same cases every time.

    use crmsync_sim::FaultKind;
    use crmsync_sim::world::{FaultChoice, WorldConfig, run_seed};
    use proptest::prelude::*;
    use proptest::test_runner::{Config, FileFailurePersistence, RngSeed};

    /// Fault kinds left out of generated worlds while an open finding they trigger is not
    /// fixed (see `KNOWN_OPEN` above); none now.
    const OPEN_FINDING_KINDS: [FaultKind; 0] = [];

    fn world() -> impl Strategy<Value = (u64, WorldConfig)> {
        (
            0u64..1_000_000,
            1usize..=3,
            0usize..=3,
            0usize..=40,
            1usize..=6,
            0usize..=3,
            proptest::sample::subsequence(
                FaultKind::ALL
                    .iter()
                    .copied()
                    .filter(|k| !OPEN_FINDING_KINDS.contains(k))
                    .collect::<Vec<_>>(),
                0..=FaultKind::ALL.len() - OPEN_FINDING_KINDS.len(),
            ),
        )
            .prop_map(|(seed, users, extra, records, runs, edits, kinds)| {
                let config = WorldConfig {
                    users,
                    machines: (users + extra).min(users * 3),
                    records,
                    runs_per_machine: runs,
                    edits_per_interval: edits,
                    faults: FaultChoice::Only(kinds),
                    ..WorldConfig::default()
                };
                (seed, config)
            })
    }

    proptest! {
        #![proptest_config(Config {
            cases: 256,
            rng_seed: RngSeed::Fixed(0x5eed_c0de),
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct("../proptest-regressions/sim.txt"))),
            ..Config::default()
        })]

        #[test]
        fn every_generated_world_converges_without_a_violation((seed, config) in world()) {
            let outcome = run_seed(seed, &config, false).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(
                outcome.violation.is_none(),
                "seed {seed} in {config:?}: {:?}",
                outcome.violation
            );
        }
    }
}
