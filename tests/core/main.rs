//! The one integration-test binary of the core (one binary keeps link time down on 2 cores).
//!
//! - `decision_table`: one named test per row of DOMAIN's decision table and per documented
//!   policy row, each an insta snapshot of input and plan in `snapshots/`;
//! - `bad_input`: every typed error, with the value it carries;
//! - `properties`: proptest invariants over generated queues;
//! - `mailbox`: the mailbox edge, in memory and as a file, against one model.

mod bad_input;
#[cfg(feature = "sqlite")]
mod cache;
#[cfg(feature = "cli")]
mod cli;
#[cfg(feature = "cli")]
mod crash;
mod decision_table;
#[cfg(feature = "sqlite")]
mod engine;
mod mailbox;
mod properties;
#[cfg(feature = "sqlite")]
mod reports;
#[cfg(feature = "sqlite")]
mod server;
mod support;
