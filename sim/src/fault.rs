//! The fault catalogue: every kind of failure the simulator injects, one name each, and the
//! *swarm* draw that decides, per seed, which kinds are on and how often they fire.
//!
//! Swarm testing (Groce et al.): a seed that turns on every fault at once rarely gets deep into
//! any one story; a seed that turns on a few, at a rate of their own, reaches combinations a
//! uniform mix never does. Each kind draws from its own random stream, so adding a kind keeps
//! every other kind's choices for a given seed.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// One kind of fault. The catalogue is [`FaultKind::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FaultKind {
    /// A `CrmService` call fails before the server acts (the request is lost).
    NetworkBeforeCall,
    /// The server acts, and its answer is lost on the way back.
    NetworkAfterCall,
    /// The server rejects one record write (a validation rule, a plug-in): an item error.
    ItemRejected,
    /// An Outlook item is locked when the sync writes it: an item error.
    ItemLocked,
    /// The client process is killed right after a durable step; the cache's open group is lost.
    Crash,
    /// A page of *get sync data* is delivered twice.
    DuplicatePage,
    /// A page handed out by an earlier call (maybe an earlier run) arrives again, late.
    LatePage,
    /// An acknowledge never reaches the server (the client believes it did).
    LostAcknowledge,
    /// A machine's clock is off (Outlook's `ModifiedAt` of edits made there).
    ClockSkew,
    /// The user chose "ignore all errors" for a run.
    IgnoreAllErrors,
    /// The user makes another of their machines the primary client.
    SwitchPrimary,
    /// A machine is desynchronised (unlink) and linked again.
    UnlinkRelink,
}

impl FaultKind {
    pub const ALL: [FaultKind; 12] = [
        FaultKind::NetworkBeforeCall,
        FaultKind::NetworkAfterCall,
        FaultKind::ItemRejected,
        FaultKind::ItemLocked,
        FaultKind::Crash,
        FaultKind::DuplicatePage,
        FaultKind::LatePage,
        FaultKind::LostAcknowledge,
        FaultKind::ClockSkew,
        FaultKind::IgnoreAllErrors,
        FaultKind::SwitchPrimary,
        FaultKind::UnlinkRelink,
    ];

    /// The name used in traces and reports (stable: traces are hashed).
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::NetworkBeforeCall => "network-before-call",
            FaultKind::NetworkAfterCall => "network-after-call",
            FaultKind::ItemRejected => "item-rejected",
            FaultKind::ItemLocked => "item-locked",
            FaultKind::Crash => "crash",
            FaultKind::DuplicatePage => "duplicate-page",
            FaultKind::LatePage => "late-page",
            FaultKind::LostAcknowledge => "lost-acknowledge",
            FaultKind::ClockSkew => "clock-skew",
            FaultKind::IgnoreAllErrors => "ignore-all-errors",
            FaultKind::SwitchPrimary => "switch-primary",
            FaultKind::UnlinkRelink => "unlink-relink",
        }
    }

    /// The range of per-mille rates a swarm draws from: per opportunity (a call, a write, a
    /// durable step, a run, or a scheduling interval, by kind).
    fn rate_range(self) -> (u64, u64) {
        match self {
            FaultKind::NetworkBeforeCall | FaultKind::NetworkAfterCall => (5, 60),
            FaultKind::ItemRejected | FaultKind::ItemLocked => (10, 120),
            FaultKind::Crash => (2, 25),
            FaultKind::DuplicatePage | FaultKind::LatePage | FaultKind::LostAcknowledge => (30, 300),
            FaultKind::ClockSkew => (50, 400),
            FaultKind::IgnoreAllErrors => (50, 500),
            FaultKind::SwitchPrimary | FaultKind::UnlinkRelink => (10, 80),
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which kinds are on for one seed, and at what rate (per mille per opportunity).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Swarm {
    pub rates: BTreeMap<FaultKind, u32>,
}

impl Swarm {
    /// No faults.
    pub fn none() -> Swarm {
        Swarm { rates: BTreeMap::new() }
    }

    /// Every kind on at the middle of its range (for tests that want all of them).
    pub fn all() -> Swarm {
        let rates = FaultKind::ALL
            .iter()
            .map(|&k| {
                let (lo, hi) = k.rate_range();
                (k, ((lo + hi) / 2) as u32)
            })
            .collect();
        Swarm { rates }
    }

    /// The swarm of `seed`: each kind on with probability one half, at a rate drawn from its
    /// range. A seed with nothing on turns one kind on, so every seed tests some fault.
    pub fn draw(seed: u64) -> Swarm {
        let mut rng = Rng::derive(seed, "swarm");
        let mut rates = BTreeMap::new();
        for kind in FaultKind::ALL {
            let on = rng.chance(500);
            let (lo, hi) = kind.rate_range();
            let rate = rng.between(lo, hi) as u32;
            if on {
                rates.insert(kind, rate);
            }
        }
        if rates.is_empty() {
            let kind = FaultKind::ALL[rng.below(FaultKind::ALL.len() as u64) as usize];
            let (lo, hi) = kind.rate_range();
            rates.insert(kind, rng.between(lo, hi) as u32);
        }
        Swarm { rates }
    }

    pub fn is_on(&self, kind: FaultKind) -> bool {
        self.rates.contains_key(&kind)
    }
}

/// How often each kind fired.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultCounts(pub BTreeMap<FaultKind, u64>);

impl FaultCounts {
    pub fn add(&mut self, other: &FaultCounts) {
        for (k, n) in &other.0 {
            *self.0.entry(*k).or_default() += n;
        }
    }

    pub fn get(&self, kind: FaultKind) -> u64 {
        self.0.get(&kind).copied().unwrap_or(0)
    }
}

/// The faults of one world: the swarm, one stream per kind, and the counts. Off during the
/// liveness phase.
#[derive(Debug, Clone)]
pub struct Faults {
    swarm: Swarm,
    streams: BTreeMap<FaultKind, Rng>,
    pub counts: FaultCounts,
    pub enabled: bool,
}

impl Faults {
    pub fn new(seed: u64, swarm: Swarm) -> Faults {
        let streams = FaultKind::ALL.iter().map(|&k| (k, Rng::derive(seed, k.name()))).collect();
        Faults { swarm, streams, counts: FaultCounts::default(), enabled: true }
    }

    pub fn swarm(&self) -> &Swarm {
        &self.swarm
    }

    /// Whether `kind` fires at this opportunity (and counts it if so).
    pub fn fire(&mut self, kind: FaultKind) -> bool {
        if !self.enabled {
            return false;
        }
        let Some(&rate) = self.swarm.rates.get(&kind) else { return false };
        let fired = self.streams.get_mut(&kind).is_some_and(|rng| rng.chance(rate));
        if fired {
            *self.counts.0.entry(kind).or_default() += 1;
        }
        fired
    }

    /// A number from `kind`'s own stream (how far a clock is skewed, which step a crash hits).
    pub fn draw(&mut self, kind: FaultKind, lo: u64, hi: u64) -> u64 {
        self.streams.get_mut(&kind).map_or(lo, |rng| rng.between(lo, hi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_swarm_is_a_function_of_its_seed_and_never_empty() {
        for seed in 0..500 {
            let s = Swarm::draw(seed);
            assert_eq!(s, Swarm::draw(seed));
            assert!(!s.rates.is_empty());
        }
        let on: usize = (0..500).map(|s| Swarm::draw(s).rates.len()).sum();
        // About half of the twelve kinds per seed.
        assert!((2000..4000).contains(&on), "{on}");
    }

    #[test]
    fn a_kind_that_is_off_never_fires() {
        let mut f = Faults::new(3, Swarm::none());
        assert!((0..1000).all(|_| FaultKind::ALL.iter().all(|&k| !f.fire(k))));
        let mut f = Faults::new(3, Swarm::all());
        f.enabled = false;
        assert!((0..1000).all(|_| !f.fire(FaultKind::Crash)));
        assert_eq!(f.counts, FaultCounts::default());
    }
}
