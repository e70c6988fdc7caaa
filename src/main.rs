//! `crmsync`: the command-line tool over the crmsync adapters.
//!
//! `crmsync demo [--dir DIR] [--records N] [--seed S] [--json]`: a demo world on SQLite files,
//! edited on both sides and synchronised (see `crmsync::demo`).
//!
//! `crmsync server <whois|report|orphans|cleanup> --server FILE [--json]`: the support reports of
//! `crmsync::reports` on an existing server store, as an aligned table or, with `--json`, as JSON.
//!
//! Exit codes: 0 done; 1 the store could not be read or written (corrupt rows, SQLite errors,
//! `whois` found no subscription); 2 bad input (arguments, a path that is missing, a directory,
//! empty, or not a crmsync server store). A path given to a server command is never created, and
//! a file that is not a server store is never written to.

#![deny(unsafe_code)]
#![warn(clippy::unwrap_used)]

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use chrono::{DateTime, Duration, Utc};
use clap::{Args, Parser, Subcommand};
use crmsync::clock::SystemClock;
use crmsync::demo::{DemoConfig, DemoError, run_demo};
use crmsync::engine::{DurableStep, StepObserver};
use crmsync::reports::{self, CLEANUP_AGE_DAYS_MAX, CleanupCandidate, ReportError, SyncEntryTable};
use crmsync::server::{OpenError, ServerStore};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(
    name = "crmsync",
    version,
    about = "Two-way CRM <-> Outlook synchronisation, modelled on Dynamics CRM 2011"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Builds a demo world (server, mailbox and sync cache as SQLite files), edits both sides
    /// and synchronises it three times, printing what each run did per entity type.
    Demo {
        /// The folder for the three files (created; must not already hold a demo). Default: a
        /// new folder under the system's temporary folder.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// How many records the server starts with.
        #[arg(long, value_name = "N", default_value_t = 200)]
        records: usize,
        /// The seed of the sample data: one seed, one demo.
        #[arg(long, value_name = "S", default_value_t = 1)]
        seed: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Support queries on a server store (the CRM organisation database).
    #[command(subcommand)]
    Server(ServerCommand),
}

#[derive(Debug, Subcommand)]
enum ServerCommand {
    /// Which user, machine and subscription a SyncEntry_<guid> table belongs to.
    Whois {
        /// The table: SyncEntry_ followed by 32 hex digits.
        #[arg(value_parser = parse_table)]
        table: SyncEntryTable,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Per user and subscription: syncs, DataSize sum/max/min and total InsertObjectCount.
    Report {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Subscriptions with no client row, stray SyncEntry tables, duplicate subscriptions.
    ///
    /// Subscriptions with no SubscriptionClients row; SyncEntry_* tables no subscription names;
    /// and duplicates: two or more subscriptions of one user, one kind and one machine (machine
    /// names compared without case), as a reinstall of the client leaves them.
    Orphans {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Subscriptions not synced for longer than --older-than (a dry run unless --apply).
    ///
    /// A subscription that never synced counts from its creation. Without --apply it lists them
    /// and changes nothing; with --apply it removes each one's Subscription row, SubscriptionClients
    /// rows, prepared changes and SyncEntry table in one transaction, keeps the SubscriptionSyncInfo
    /// history, and prints what it removed. No other client is made primary.
    Cleanup {
        /// How long ago: a number and a unit, h (hours), d (days) or w (weeks), e.g. 90d.
        #[arg(long, value_name = "AGE", value_parser = parse_age)]
        older_than: Age,
        /// Remove them: each subscription's row, client rows, prepared changes and SyncEntry
        /// table, in one transaction (SubscriptionSyncInfo history is kept).
        #[arg(long)]
        apply: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Args)]
struct StoreArgs {
    /// The server store: an existing crmsync server database file.
    #[arg(long, value_name = "FILE")]
    server: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// A cleanup age as given (`90d`) and as a duration.
#[derive(Debug, Clone)]
struct Age {
    text: String,
    duration: Duration,
}

fn parse_table(text: &str) -> Result<SyncEntryTable, String> {
    text.parse().map_err(|e: ReportError| e.to_string())
}

fn parse_age(text: &str) -> Result<Age, String> {
    let usage = || format!("{text:?} is not an age: give a number and a unit, h, d or w (e.g. 90d)");
    let hours_per_unit: i64 = match text.chars().last() {
        Some('h') => 1,
        Some('d') => 24,
        Some('w') => 24 * 7,
        _ => return Err(usage()),
    };
    // The unit is one ASCII byte.
    let digits = &text[..text.len() - 1];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(usage());
    }
    let too_long = || format!("{text:?} is longer than {CLEANUP_AGE_DAYS_MAX} days");
    let n: i64 = digits.parse().map_err(|_| too_long())?;
    if n == 0 {
        return Err(format!("{text:?}: the age must be at least 1 (0 would list every subscription)"));
    }
    let hours =
        n.checked_mul(hours_per_unit).filter(|h| *h <= CLEANUP_AGE_DAYS_MAX * 24).ok_or_else(too_long)?;
    let duration = Duration::try_hours(hours).ok_or_else(too_long)?;
    Ok(Age { text: text.to_owned(), duration })
}

/// Why a command failed, and so its exit code.
#[derive(Debug)]
enum Failure {
    /// Bad arguments or paths: exit 2.
    Input(String),
    /// Anything else: exit 1.
    Other(String),
}

impl Failure {
    fn code(&self) -> ExitCode {
        match self {
            Failure::Input(_) => ExitCode::from(2),
            Failure::Other(_) => ExitCode::from(1),
        }
    }

    fn message(&self) -> &str {
        match self {
            Failure::Input(m) | Failure::Other(m) => m,
        }
    }
}

impl From<ReportError> for Failure {
    fn from(e: ReportError) -> Failure {
        match e {
            ReportError::BadTableName(_) | ReportError::BadAge(_) => Failure::Input(e.to_string()),
            ReportError::Corrupt { .. } | ReportError::Sqlite(_) => Failure::Other(e.to_string()),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // Help and version go to stdout with 0; usage errors to stderr with 2.
            let _ = err.print();
            return ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(2));
        }
    };
    // Every store is dropped (closed) inside `run`, before the process exits, so SQLite removes
    // its -wal and -shm files.
    match run(cli) {
        Ok(code) => code,
        Err(failure) => {
            let _ = writeln!(io::stderr(), "crmsync: {}", failure.message());
            failure.code()
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, Failure> {
    match cli.command {
        Command::Demo { dir, records, seed, json: as_json } => demo(dir, records, seed, as_json),
        Command::Server(command) => server(command),
    }
}

/// Draws the demo's progress from the engine's durable steps.
struct Progress(indicatif::ProgressBar);

impl StepObserver for Progress {
    fn after(&mut self, step: DurableStep) {
        self.0.set_message(format!("{step:?}"));
        self.0.inc(1);
    }
}

fn demo(dir: Option<PathBuf>, records: usize, seed: u64, as_json: bool) -> Result<ExitCode, Failure> {
    let dir = dir.unwrap_or_else(|| crmsync::demo::default_dir(seed));
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos} durable steps, last: {msg} [{elapsed}]")
            .map_err(|e| Failure::Other(e.to_string()))?,
    );
    if as_json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let config = DemoConfig { dir, records, seed };
    let result = run_demo(&config, &mut Progress(bar.clone()));
    bar.finish_and_clear();
    let report = result.map_err(|e| match e {
        DemoError::NotEmpty(_) | DemoError::Records(_) | DemoError::Io { .. } => {
            Failure::Input(e.to_string())
        }
        other => Failure::Other(other.to_string()),
    })?;
    if as_json {
        emit(&json(&report)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = format!("Demo in {}\n", report.dir.display());
    for run in &report.runs {
        out.push_str(&format!(
            "\n{}: {} server changes, {} Outlook changes\n",
            run.name, run.report.server_changes, run.report.mailbox_changes
        ));
        out.push_str(&format!(
            "  {:<28} {:>7} {:>7} {:>7} {:>9} {:>9} {:>9} {:>6} {:>7}\n",
            "ENTITY",
            "CREATED",
            "UPDATED",
            "DELETED",
            "UNTRACKED",
            "UNCHANGED",
            "CONFLICTS",
            "FAILED",
            "IGNORED"
        ));
        for (entity, c) in &run.report.by_entity {
            out.push_str(&format!(
                "  {:<28} {:>7} {:>7} {:>7} {:>9} {:>9} {:>9} {:>6} {:>7}\n",
                entity.to_string(),
                c.created,
                c.updated,
                c.deleted,
                c.untracked,
                c.unchanged,
                c.merged_conflicts,
                c.failed,
                c.ignored
            ));
        }
    }
    out.push_str(&format!(
        "\nOutlook holds {} items, {} linked to CRM records; {} changes left queued, {} ignored errors.\n",
        report.mailbox_items, report.mapped_pairs, report.queue_left, report.ignored_errors
    ));
    for file in crmsync::demo::DEMO_FILES {
        out.push_str(&format!("  {}\n", report.dir.join(file).display()));
    }
    emit(&out)?;
    Ok(ExitCode::SUCCESS)
}

fn server(command: ServerCommand) -> Result<ExitCode, Failure> {
    match command {
        ServerCommand::Whois { table, store } => {
            let db = open_existing(&store.server)?;
            let owner = reports::whois(&db, &table.to_string())?;
            drop(db);
            match owner {
                Some(owner) if store.json => emit(&json(&owner)?)?,
                Some(owner) => emit(&reports::render_whois(&owner))?,
                None => {
                    if store.json {
                        emit("null\n")?;
                    }
                    return Err(Failure::Other(format!(
                        "{}: no subscription has the SyncEntry table {table} (see `crmsync server orphans`)",
                        store.server.display()
                    )));
                }
            }
        }
        ServerCommand::Report { store } => {
            let db = open_existing(&store.server)?;
            let rows = reports::sync_report(&db)?;
            drop(db);
            emit(&if store.json { json(&rows)? } else { reports::render_sync_report(&rows) })?;
        }
        ServerCommand::Orphans { store } => {
            let db = open_existing(&store.server)?;
            let orphans = reports::orphans(&db)?;
            drop(db);
            emit(&if store.json { json(&orphans)? } else { reports::render_orphans(&orphans) })?;
        }
        ServerCommand::Cleanup { older_than, apply, store } => cleanup(&older_than, apply, &store)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// What `cleanup --json` prints: what was listed and, with `--apply`, what was removed.
#[derive(Serialize)]
struct CleanupOutput<'a> {
    applied: bool,
    older_than: &'a str,
    cutoff: DateTime<Utc>,
    candidates: &'a [CleanupCandidate],
    removed: &'a [CleanupCandidate],
}

fn cleanup(age: &Age, apply: bool, store: &StoreArgs) -> Result<(), Failure> {
    let mut db = open_existing(&store.server)?;
    let cutoff = reports::cleanup_cutoff(&db, age.duration)?;
    let candidates = reports::cleanup_candidates_before(&db, cutoff)?;
    let removed = if apply { reports::cleanup_apply(&mut db, &candidates)? } else { Vec::new() };
    drop(db);
    let kept: Vec<&CleanupCandidate> = candidates
        .iter()
        .filter(|c| !removed.iter().any(|r| r.info.subscription == c.info.subscription))
        .collect();
    if store.json {
        let output = CleanupOutput {
            applied: apply,
            older_than: &age.text,
            cutoff,
            candidates: &candidates,
            removed: &removed,
        };
        emit(&json(&output)?)?;
    } else {
        let when = format!(
            "last active before {} (older than {})",
            cutoff.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            age.text
        );
        let text = match (apply, candidates.len()) {
            (_, 0) => format!("No subscription was {when}; nothing to remove.\n"),
            (false, n) => format!(
                "Dry run: {n} subscription(s) {when}. Nothing was changed; run again with --apply to remove them.\n{}",
                reports::render_cleanup(&candidates)
            ),
            (true, _) => format!(
                "Removed {} subscription(s) {when}: their Subscription and SubscriptionClients rows, prepared \
                 changes and SyncEntry tables, in one transaction. Their SubscriptionSyncInfo history is kept.\n{}",
                removed.len(),
                reports::render_cleanup(&removed)
            ),
        };
        emit(&text)?;
    }
    if apply && !kept.is_empty() {
        let ids: Vec<String> = kept.iter().map(|c| c.info.subscription.to_string()).collect();
        note(&format!(
            "kept {} listed subscription(s) that synced or changed meanwhile: {}",
            kept.len(),
            ids.join(", ")
        ));
    }
    for r in removed.iter().filter(|r| r.info.primary_client == Some(true)) {
        note(&format!(
            "{} was the primary {} client of user {}; no other client becomes primary until one is made primary",
            r.info.machine.escape_debug(),
            r.info.subscription_type.name(),
            r.info.user
        ));
    }
    Ok(())
}

/// Opens an existing server store. A missing, empty or non-regular path is refused with a clear
/// message before SQLite sees it, and the open itself never creates a file.
fn open_existing(path: &Path) -> Result<ServerStore, Failure> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Failure::Input(format!(
            "{shown}: no such file (the server commands read an existing server store and never create one)"
        )),
        _ => Failure::Input(format!("{shown}: {e}")),
    })?;
    if meta.is_dir() {
        return Err(Failure::Input(format!("{shown}: is a directory, not a server store file")));
    }
    if !meta.is_file() {
        return Err(Failure::Input(format!("{shown}: not a regular file")));
    }
    if meta.len() == 0 {
        return Err(Failure::Input(format!("{shown}: empty file, not a crmsync server store")));
    }
    ServerStore::open_existing(path, Box::new(SystemClock)).map_err(|e| match &e {
        OpenError::NotAServerStore { .. } | OpenError::NewerSchema { .. } => Failure::Input(e.to_string()),
        OpenError::Sqlite { source, .. }
            if source.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase) =>
        {
            Failure::Input(format!("{shown}: not a SQLite database, so not a crmsync server store"))
        }
        OpenError::Sqlite { .. } => Failure::Other(e.to_string()),
    })
}

fn json<T: Serialize + ?Sized>(value: &T) -> Result<String, Failure> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| Failure::Other(format!("JSON: {e}")))?;
    text.push('\n');
    Ok(text)
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn emit(text: &str) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(Failure::Other(format!("stdout: {e}"))),
        _ => Ok(()),
    }
}

fn note(text: &str) {
    let _ = writeln!(io::stderr(), "crmsync: note: {text}");
}
