//! `crmsync-sim`: a deterministic world simulator for crmsync, in the spirit of FoundationDB's
//! simulation and TigerBeetle's VOPR, applied to sync.
//!
//! One thread, one virtual clock, one `u64` seed: the world (a CRM server, users, their
//! mailboxes, their client machines), the actors' edits, the sync schedule and the faults all
//! derive from it, so a seed replays byte for byte. The engine, the server store, the cache and
//! the mailbox are crmsync's own, unchanged, reached through the same traits a front end uses;
//! the simulator only wraps those edges to inject faults ([`edge`]).
//!
//! - [`rng`]: the seed's random streams, one per component;
//! - [`fault`]: the fault catalogue and the per-seed swarm;
//! - [`edge`]: the faulty server and mailbox, the crash point, the skewed machine clock;
//! - [`model`]: the reference model (what the final values must be, from the edits alone);
//! - [`check`]: safety after every run, convergence after the liveness phase;
//! - [`world`]: the world, its schedule and its run;
//! - [`swarm`]: many seeds, with counts per fault kind;
//! - [`trace`]: the trace lines as data (lane, kind, faults) when a trace is kept;
//! - [`timeline`]: a run as one self-contained HTML page with an SVG timeline;
//! - [`scenario`]: hand-written scenario files run through the same edges, with a canonical
//!   final state and verdicts.
//!
//! It is not a fuzzer of the pure core (that is `tests/core/properties.rs`), nor a load test.

#![deny(unsafe_code)]

pub mod check;
pub mod edge;
pub mod fault;
pub mod mirror;
pub mod model;
pub mod rng;
pub mod scenario;
pub mod swarm;
pub mod timeline;
pub mod trace;
pub mod world;

pub use fault::{FaultCounts, FaultKind, Swarm};
pub use world::{Outcome, WorldConfig, run_seed};
