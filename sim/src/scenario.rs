//! Scenario files: a small world written down by hand (users, machines, CRM records, Outlook
//! items, policies) and a script of steps (edits on either side, sync runs with faults at named
//! points, a switch of primary machine, an unlink, checks), run through the real engine, server
//! store, cache and mailbox, on a virtual clock that advances one minute per step.
//!
//! This module owns:
//! - the file format ([`format`]: serde types refusing unknown fields, and the JSON Schema
//!   derived from them, committed as `sim/scenario.schema.json`);
//! - reading a file ([`parse`], [`load`]): a deserialisation error carries the JSON path of the
//!   problem (`steps[3].sync.fail[0]`), as does every semantic error found while running (a
//!   label that names nothing, a step that cannot happen), as a typed [`ScenarioError`];
//! - running one ([`run`]) into its canonical final state ([`state::FinalState`]: records,
//!   items, each machine's mapping, queue and ignored errors, the server's subscriptions, what
//!   each run did, sorted and stable) with the invariant verdicts, and its timeline events for
//!   [`crate::timeline::render_html`].
//!
//! It is not the random world ([`crate::world`]): nothing here is drawn from a seed, and no
//! reference model is consulted; a scenario states what it expects in `check` steps.
//!
//! The library of scenarios is `sim/scenarios/*.json`, documented in `sim/SCENARIOS.md`.

use std::path::{Path, PathBuf};

pub mod format;
pub mod state;

mod edges;
mod run;

pub use format::{Scenario, schema_json};
pub use run::{Ran, run};
pub use state::FinalState;

/// Why a scenario file could not be read or run. Every variant names where in the file the
/// problem is (a JSON path such as `steps[3].sync.machine`) and the offending value.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not JSON, or not the format: a missing or unknown field, a wrong type.
    #[error("{path}: {message}")]
    Format { path: String, message: String },
    /// A label that names nothing.
    #[error("{path}: no {kind} named {label:?}")]
    Unknown { path: String, kind: &'static str, label: String },
    /// A label given to two things of one kind.
    #[error("{path}: {kind} {label:?} is already declared")]
    Duplicate { path: String, kind: &'static str, label: String },
    /// A value the world refuses (an empty label, a GOID on a contact, a field too long).
    #[error("{path}: {value:?} {why}")]
    Invalid { path: String, value: String, why: String },
    /// A step that cannot happen now (syncing an unlinked machine, editing a deleted record).
    #[error("{path}: impossible step: {why}")]
    Impossible { path: String, why: String },
    /// A store refused a setup act (not a sync run: a run's failures are its outcome).
    #[error("{path}: {message}")]
    Store { path: String, message: String },
}

impl ScenarioError {
    /// Where in the file the problem is (empty for a file that cannot be read).
    pub fn path(&self) -> &str {
        match self {
            ScenarioError::Read { .. } => "",
            ScenarioError::Format { path, .. }
            | ScenarioError::Unknown { path, .. }
            | ScenarioError::Duplicate { path, .. }
            | ScenarioError::Invalid { path, .. }
            | ScenarioError::Impossible { path, .. }
            | ScenarioError::Store { path, .. } => path,
        }
    }
}

/// Parses a scenario from JSON text; an error names the JSON path of the problem.
pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let scenario: Scenario = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        ScenarioError::Format { path, message: e.into_inner().to_string() }
    })?;
    de.end().map_err(|e| ScenarioError::Format { path: ".".into(), message: e.to_string() })?;
    Ok(scenario)
}

/// Reads and parses a scenario file.
pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ScenarioError::Read { path: path.to_owned(), source })?;
    parse(&text)
}
