//! `crmsync-sim`: run one seed with its trace, or a swarm of seeds.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use crmsync_sim::timeline::{self, Verdict};
use crmsync_sim::world::{FaultChoice, Outcome, WorldConfig, run_seed};
use crmsync_sim::{FaultKind, scenario, swarm};

#[derive(Parser)]
#[command(name = "crmsync-sim", about = "Deterministic simulation of crmsync under faults")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Users in the world.
    #[arg(long, global = true, default_value_t = 5)]
    users: usize,
    /// Client machines in all (one to three per user).
    #[arg(long, global = true, default_value_t = 10)]
    machines: usize,
    /// Records in CRM at the start.
    #[arg(long, global = true, default_value_t = 500)]
    records: usize,
    /// Scheduled sync runs per machine.
    #[arg(long, global = true, default_value_t = 20)]
    runs: usize,
    /// Edits per user per sync interval.
    #[arg(long, global = true, default_value_t = 2)]
    edits: usize,
    /// Which faults: `swarm` (each seed draws its own), `none`, `all`, or a comma-separated
    /// list of kinds (`crash,late-page`).
    #[arg(long, global = true, default_value = "swarm")]
    faults: String,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one seed and prints one line per event, then the verdict.
    Run {
        #[arg(long)]
        seed: u64,
        /// Also writes the run as one self-contained HTML page with an SVG timeline (lanes per
        /// machine and for the server, runs as bars, faults as marks, hover for the line).
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
    },
    /// Runs many seeds and prints how often each fault kind fired and which seeds failed.
    Swarm {
        #[arg(long, default_value_t = 1000)]
        seeds: u64,
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// Runs one scenario file (see sim/SCENARIOS.md) and prints its canonical final state and
    /// the invariant verdicts; exit code 1 when a check or an invariant fails, 2 on a bad file.
    Scenario {
        file: PathBuf,
        /// Prints the final state as JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also writes the scenario's timeline as one self-contained HTML page.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
    },
    /// Prints the JSON Schema of scenario files (committed as sim/scenario.schema.json).
    ScenarioSchema,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let faults = match FaultChoice::parse(&cli.faults) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("crmsync-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let config = WorldConfig {
        faults,
        users: cli.users,
        machines: cli.machines,
        records: cli.records,
        runs_per_machine: cli.runs,
        edits_per_interval: cli.edits,
        ..WorldConfig::default()
    };
    let world_args = world_args(&cli, &config);
    match cli.command {
        Command::Scenario { file, json, html } => run_scenario(&file, json, html.as_deref()),
        Command::ScenarioSchema => {
            print!("{}", scenario::schema_json());
            ExitCode::SUCCESS
        }
        Command::Run { seed, html } => match run_seed(seed, &config, true) {
            Ok(outcome) => {
                let code = print_run(seed, &outcome, &world_args);
                if let Some(path) = html {
                    let events = outcome.trace.timeline.as_ref().map_or(&[][..], |t| &t.events[..]);
                    let title = format!("crmsync-sim run --seed {seed}{world_args}");
                    let page = timeline::render_html(&title, events, &Verdict::of(&outcome));
                    if let Err(e) = timeline::write_page(&path, &page) {
                        eprintln!("crmsync-sim: {e}");
                        return ExitCode::from(2);
                    }
                    eprintln!("timeline written to {}", path.display());
                }
                code
            }
            Err(e) => {
                eprintln!("crmsync-sim: {e}");
                ExitCode::from(2)
            }
        },
        Command::Swarm { seeds, from } => {
            let bar = indicatif::ProgressBar::new(seeds);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} seeds {per_sec} {msg}")
                    .expect("a valid template"),
            );
            let started = Instant::now();
            let report = swarm::sweep(from, seeds, &config, |r| {
                bar.inc(1);
                if !r.failures.is_empty() {
                    bar.set_message(format!("{} failing", r.failures.len()));
                }
            });
            bar.finish_and_clear();
            let report = match report {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("crmsync-sim: {e}");
                    return ExitCode::from(2);
                }
            };
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{} seeds from {from} in {secs:.1} s: {:.1} seeds/s, {:.0} sync runs/s",
                report.seeds,
                report.seeds as f64 / secs,
                report.sync_runs as f64 / secs
            );
            println!("{:<22} {:>10} {:>8}", "fault kind", "fired", "seeds");
            for kind in FaultKind::ALL {
                println!(
                    "{:<22} {:>10} {:>8}",
                    kind.name(),
                    report.faults.get(kind),
                    report.seeds_hit.get(kind)
                );
            }
            if report.failures.is_empty() {
                println!("all seeds pass");
                ExitCode::SUCCESS
            } else {
                for (seed, what) in &report.failures {
                    println!("FAIL seed {seed}: {what}");
                    println!("  replay: cargo run --release -p crmsync-sim -- run --seed {seed}{world_args}");
                }
                ExitCode::FAILURE
            }
        }
    }
}

/// Runs a scenario file and prints its final state and verdicts.
fn run_scenario(file: &std::path::Path, json: bool, html: Option<&std::path::Path>) -> ExitCode {
    let ran = match scenario::load(file).and_then(|s| scenario::run(&s)) {
        Ok(ran) => ran,
        Err(e) => {
            eprintln!("crmsync-sim: {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    if json {
        match serde_json::to_string_pretty(&ran.state) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("crmsync-sim: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", scenario::state::render_text(&ran.state));
    }
    if let Some(path) = html {
        let failed: Vec<String> =
            ran.state.verdicts.iter().filter(|v| !v.ok).flat_map(|v| v.detail.iter().cloned()).collect();
        let verdict = if failed.is_empty() {
            Verdict::Passed { summary: format!("scenario {}: every verdict holds", file.display()) }
        } else {
            Verdict::Failed { what: failed.join("; "), at_step: ran.failed_at_step }
        };
        let title = format!("crmsync-sim scenario {}", file.display());
        let page = timeline::render_html(&title, &ran.events, &verdict);
        if let Err(e) = timeline::write_page(path, &page) {
            eprintln!("crmsync-sim: {e}");
            return ExitCode::from(2);
        }
        eprintln!("timeline written to {}", path.display());
    }
    if ran.state.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// Prints the trace of one seed and its verdict; the exit code of the verdict.
fn print_run(seed: u64, outcome: &Outcome, world_args: &str) -> ExitCode {
    for line in outcome.trace.lines.iter().flatten() {
        println!("{line}");
    }
    let swarm: Vec<&str> = outcome.swarm.rates.keys().map(|k| k.name()).collect();
    println!("swarm: {}", swarm.join(", "));
    println!("trace hash: {:016x}", outcome.trace.hash());
    match &outcome.violation {
        None => {
            println!("seed {seed}: PASS ({} sync runs)", outcome.sync_runs);
            ExitCode::SUCCESS
        }
        Some(v) => {
            println!("seed {seed}: FAIL at {v}");
            println!("replay: cargo run --release -p crmsync-sim -- run --seed {seed}{world_args}");
            ExitCode::FAILURE
        }
    }
}

/// The world flags that differ from the defaults, to repeat in a replay command.
fn world_args(cli: &Cli, config: &WorldConfig) -> String {
    let d = WorldConfig::default();
    let mut out = String::new();
    if config.users != d.users {
        out += &format!(" --users {}", cli.users);
    }
    if config.machines != d.machines {
        out += &format!(" --machines {}", cli.machines);
    }
    if config.records != d.records {
        out += &format!(" --records {}", cli.records);
    }
    if config.faults != d.faults {
        out += &format!(" --faults {}", cli.faults);
    }
    if config.edits_per_interval != d.edits_per_interval {
        out += &format!(" --edits {}", cli.edits);
    }
    if config.runs_per_machine != d.runs_per_machine {
        out += &format!(" --runs {}", cli.runs);
    }
    out
}
