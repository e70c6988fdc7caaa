//! The simulator proves it catches bugs: each of the engine's deliberately broken variants
//! (`crmsync::mutant`, feature `mutants`) is switched on for this thread, and seeds 0, 1, 2, ...
//! of the default world run until one fails; each must be caught within [`SEEDS_MAX`] seeds.
//! The same seeds pass with no mutant on, so the catch is the mutant's. The table of seeds each
//! took is printed (and recorded in `sim/MUTANTS.md`).
//!
//! `cargo test -p crmsync-sim --features mutants --release --test mutants -- --nocapture`

use std::panic::{AssertUnwindSafe, catch_unwind};

use crmsync::mutant::{self, Mutant};
use crmsync_sim::run_seed;
use crmsync_sim::world::WorldConfig;

/// Most seeds a mutant may survive.
const SEEDS_MAX: u64 = 100;

/// How a seed ended under a mutant.
enum Verdict {
    Passed,
    /// A checker's violation (the preferred catch).
    Violation(String),
    /// The world could not run, or the engine panicked: caught, less precisely.
    Crashed(String),
}

fn run(seed: u64, config: &WorldConfig) -> Verdict {
    match catch_unwind(AssertUnwindSafe(|| run_seed(seed, config, false))) {
        Ok(Ok(outcome)) => match outcome.violation {
            None => Verdict::Passed,
            Some(v) => Verdict::Violation(v.what),
        },
        Ok(Err(e)) => Verdict::Crashed(format!("world error: {e}")),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Verdict::Crashed(format!("panic: {what}"))
        }
    }
}

/// The class of invariant a violation's text names (the checkers' wording, `sim/src/check.rs`).
fn class(what: &str) -> &'static str {
    if what.contains("share a GOID") || what.contains("both stamped") {
        "duplicate"
    } else if what.starts_with("lost update") {
        "lost update"
    } else if what.contains("was lost") {
        "lost record or item"
    } else if what.contains("which is stamped") || what.contains("not a bijection") {
        "mapping"
    } else if what.starts_with("world error") || what.starts_with("panic") {
        "crash"
    } else {
        "convergence"
    }
}

#[test]
fn the_swarm_catches_every_mutant() {
    let config = WorldConfig::default();
    let mut rows = Vec::new();
    let mut last_seed = 0;
    for m in Mutant::ALL {
        let caught = mutant::with(m, || {
            (0..SEEDS_MAX).find_map(|seed| match run(seed, &config) {
                Verdict::Passed => None,
                Verdict::Violation(what) => Some((seed, what)),
                Verdict::Crashed(what) => Some((seed, what)),
            })
        });
        if let Some((seed, _)) = &caught {
            last_seed = last_seed.max(*seed);
        }
        rows.push((m, caught));
    }
    println!("\n| mutant | seeds to catch | class | first violation |\n|---|---|---|---|");
    for (m, caught) in &rows {
        match caught {
            Some((seed, what)) => {
                let what: String = what.chars().take(160).collect();
                println!("| {m} | {} (seed {seed}) | {} | {what} |", seed + 1, class(&what))
            }
            None => println!("| {m} | not caught in {SEEDS_MAX} | | |"),
        }
    }
    let missed: Vec<Mutant> = rows.iter().filter(|(_, c)| c.is_none()).map(|(m, _)| *m).collect();
    assert!(missed.is_empty(), "not caught within {SEEDS_MAX} seeds: {missed:?}");
    // The catch is the mutant's: the unmutated engine passes every seed that caught one.
    for seed in 0..=last_seed {
        let outcome = run_seed(seed, &config, false).unwrap();
        assert!(outcome.passed(), "seed {seed} fails with no mutant on: {:?}", outcome.violation);
    }
}
