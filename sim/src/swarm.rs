//! Many seeds: runs each, sums how often every fault kind fired, and keeps the failing seeds.

use serde::Serialize;

use crate::fault::{FaultCounts, FaultKind};
use crate::world::{WorldConfig, WorldError, run_seed};

/// What a sweep of seeds found.
#[derive(Debug, Default, Serialize)]
pub struct SwarmReport {
    pub seeds: u64,
    pub sync_runs: u64,
    pub faults: FaultCounts,
    /// Seeds in which each kind fired at least once.
    pub seeds_hit: FaultCounts,
    /// Failing seeds with their first violation.
    pub failures: Vec<(u64, String)>,
}

impl SwarmReport {
    /// The kinds no seed of the sweep fired.
    pub fn kinds_never_hit(&self) -> Vec<FaultKind> {
        FaultKind::ALL.iter().copied().filter(|&k| self.seeds_hit.get(k) == 0).collect()
    }
}

/// Runs `count` seeds from `from`, calling `tick` after each.
pub fn sweep(
    from: u64,
    count: u64,
    config: &WorldConfig,
    mut tick: impl FnMut(&SwarmReport),
) -> Result<SwarmReport, WorldError> {
    let mut report = SwarmReport::default();
    for seed in from..from.saturating_add(count) {
        let outcome = run_seed(seed, config, false)?;
        report.seeds += 1;
        report.sync_runs += outcome.sync_runs;
        report.faults.add(&outcome.faults);
        for (&k, &n) in &outcome.faults.0 {
            if n > 0 {
                *report.seeds_hit.0.entry(k).or_default() += 1;
            }
        }
        if let Some(v) = outcome.violation {
            report.failures.push((seed, v.to_string()));
        }
        tick(&report);
    }
    Ok(report)
}
