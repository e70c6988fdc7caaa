//! Plans one sync run from a JSON file and prints the plan as JSON (or, with `--explain`, as the
//! text a support engineer reads).
//!
//! ```text
//! cargo run --release --example plan -- examples/conflict.json [--explain]
//! ```
//!
//! The file holds `{"mapping": [MappingEntry...], "queue": [QueueEntry...], "policies": {...}}`;
//! every part is optional and `policies` defaults to the documented defaults.

use std::process::ExitCode;

use crmsync::{Mapping, Policies, Queue, plan};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    #[serde(default)]
    mapping: Mapping,
    #[serde(default)]
    queue: Queue,
    #[serde(default)]
    policies: Policies,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let explain = args.iter().any(|a| a == "--explain");
    let Some(path) = args.iter().find(|a| !a.starts_with("--")) else {
        eprintln!("usage: plan FILE.json [--explain]");
        return ExitCode::from(2);
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) => {
            eprintln!("cannot read {path}: {err}");
            return ExitCode::from(2);
        }
    };
    let input: Input = match serde_json::from_str(&text) {
        Ok(input) => input,
        Err(err) => {
            eprintln!("{path} is not a valid plan input: {err}");
            return ExitCode::from(2);
        }
    };
    match plan(&input.queue, &input.mapping, &input.policies) {
        Ok(plan) if explain => print!("{plan}"),
        Ok(plan) => match serde_json::to_string_pretty(&plan) {
            Ok(json) => println!("{json}"),
            Err(err) => {
                eprintln!("cannot write the plan as JSON: {err}");
                return ExitCode::FAILURE;
            }
        },
        Err(err) => {
            eprintln!("plan refused: {err}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
