//! `crmsync`: the command-line tool over the crmsync adapters.
//!
//! `crmsync demo [--dir DIR] [--records N] [--seed S] [--json]`: a demo world on SQLite files,
//! edited on both sides and synchronised (see `crmsync::demo`).
//!
//! `crmsync sync --server FILE --mailbox FILE --cache FILE [--ignore-all-errors] [--commit-every N]
//! [--json]`: one sync run over existing files, of the subscription the cache is linked to.
//!
//! `crmsync inspect --cache FILE [--json]`: the cache's queue, mapping and ignored errors (read
//! only).
//!
//! `crmsync unlink --server FILE --cache FILE [--json]`: desynchronise: removes the cache's
//! subscription from the server and forgets the cache's queue, mapping and ignored errors. Every
//! Outlook item and CRM record stays (the mailbox is not even opened).
//!
//! `crmsync server <whois|report|orphans|cleanup> --server FILE [--json]`: the support reports of
//! `crmsync::reports` on an existing server store, as an aligned table or, with `--json`, as JSON.
//!
//! Exit codes: 0 done; 1 a store could not be read or written (corrupt rows, SQLite errors,
//! `whois` found no subscription, a sync stopped by a store); 2 bad input (arguments, a path that
//! is missing, a directory, empty, or not a crmsync file of the kind asked for; a cache linked to
//! no subscription). Only `demo` creates files: a path given to any other command is never
//! created, and a file that is not of the kind asked for is never written to.

#![deny(unsafe_code)]
#![warn(clippy::unwrap_used)]

/// mimalloc, not the system's malloc: it keeps freed memory for reuse, where glibc hands every
/// block past 32 MiB (the plan of a large queue) back to the kernel, to be faulted in afresh.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use chrono::{DateTime, Duration, Utc};
use clap::{Args, Parser, Subcommand};
use crmsync::cache::{CacheError, CacheOpenError, SyncCache};
use crmsync::clock::SystemClock;
use crmsync::demo::{DemoConfig, DemoError, SUBSCRIPTION_KEY, USER_KEY, run_demo};
use crmsync::engine::{
    DurableStep, Edges, EngineConfig, EngineError, IdSource, Interrupt, PauseAtStep, RunReport, StepObserver,
    run_sync,
};
use crmsync::ids::CrmId;
use crmsync::mailbox_file::{MailboxOpenError, SqliteMailbox};
use crmsync::reports::{self, CLEANUP_AGE_DAYS_MAX, CleanupCandidate, ReportError, SyncEntryTable};
use crmsync::server::{OpenError, ServerStore, SubscriptionId, SystemUserId};
use serde::Serialize;
use uuid::Uuid;

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
    /// Synchronises once: the subscription the cache is linked to, over existing files.
    ///
    /// Reads the subscription and user from the cache (a demo's cache is linked), runs one sync
    /// (only the user's primary client syncs) and prints what it did per entity type. Never
    /// creates a file.
    Sync {
        /// The server store: an existing crmsync server database file.
        #[arg(long, value_name = "FILE")]
        server: PathBuf,
        /// The Outlook mailbox: an existing crmsync mailbox file.
        #[arg(long, value_name = "FILE")]
        mailbox: PathBuf,
        /// The sync cache (OutlookSyncCache): an existing crmsync cache file, linked to a
        /// subscription.
        #[arg(long, value_name = "FILE")]
        cache: PathBuf,
        /// A change that fails leaves the queue for the ignored errors instead of being retried.
        #[arg(long)]
        ignore_all_errors: bool,
        /// Settled outcomes per cache transaction (1: every outcome is committed on its own).
        #[arg(long, value_name = "N", default_value_t = 1,
              value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        commit_every: u64,
        /// Print the run's report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Shows a sync cache: its queue, its mapping and its ignored errors. Changes nothing.
    Inspect {
        /// The sync cache (OutlookSyncCache): an existing crmsync cache file.
        #[arg(long, value_name = "FILE")]
        cache: PathBuf,
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Desynchronise: removes the cache's subscription from the server and forgets the cache's
    /// queue, mapping and ignored errors.
    ///
    /// Every Outlook item and every CRM record stays where it is: the mailbox is not opened.
    Unlink {
        /// The server store: an existing crmsync server database file.
        #[arg(long, value_name = "FILE")]
        server: PathBuf,
        /// The sync cache (OutlookSyncCache): an existing crmsync cache file, linked to a
        /// subscription.
        #[arg(long, value_name = "FILE")]
        cache: PathBuf,
        /// Print what was removed as JSON.
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
        Command::Sync { server, mailbox, cache, ignore_all_errors, commit_every, json: as_json } => {
            let config = EngineConfig {
                ignore_all_errors,
                commit_every: usize::try_from(commit_every).unwrap_or(usize::MAX),
                ..EngineConfig::default()
            };
            sync(&server, &mailbox, &cache, &config, as_json)
        }
        Command::Inspect { cache, json: as_json } => inspect(&cache, as_json),
        Command::Unlink { server, cache, json: as_json } => unlink(&server, &cache, as_json),
        Command::Server(command) => server(command),
    }
}

/// Draws the progress of `demo` and `sync` from the engine's durable steps.
struct Progress(indicatif::ProgressBar);

impl StepObserver for Progress {
    fn after(&mut self, step: DurableStep) -> Result<(), Interrupt> {
        self.0.set_message(format!("{step:?}"));
        self.0.inc(1);
        Ok(())
    }
}

fn demo(dir: Option<PathBuf>, records: usize, seed: u64, as_json: bool) -> Result<ExitCode, Failure> {
    let dir = dir.unwrap_or_else(|| crmsync::demo::default_dir(seed));
    let bar = spinner(as_json)?;
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
        out.push_str(&render_counts(&run.report));
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

/// The per-entity table of one run, indented by two spaces.
fn render_counts(report: &RunReport) -> String {
    let mut out = format!(
        "  {:<28} {:>7} {:>7} {:>7} {:>9} {:>9} {:>9} {:>6} {:>7}\n",
        "ENTITY", "CREATED", "UPDATED", "DELETED", "UNTRACKED", "UNCHANGED", "CONFLICTS", "FAILED", "IGNORED"
    );
    for (entity, c) in &report.by_entity {
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
    out
}

/// The progress spinner of `demo` and `sync` (on stderr; hidden when the output is JSON).
fn spinner(hidden: bool) -> Result<indicatif::ProgressBar, Failure> {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos} durable steps, last: {msg} [{elapsed}]")
            .map_err(|e| Failure::Other(e.to_string()))?,
    );
    if hidden {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    Ok(bar)
}

/// New `CrmId`s for items tracked in Outlook that do not repeat across runs.
///
/// The uuid crate's `v4` feature (random ids) is not enabled and this tool adds no dependency,
/// so each id is a UUID v5 (SHA-1) of a name no other id of any run has: the cache file's
/// canonical path, the process id, the wall-clock time in nanoseconds when the run started, and
/// a counter. Within a run the counter differs. Two runs on one cache differ in their start time:
/// each run takes far longer than a clock tick, and a concurrent run has another process id. So a
/// repeat would need the clock set back to the very nanosecond an earlier run with the same
/// process id started at, on the same cache; besides that, only a SHA-1 collision of two
/// different names. The `crmsync-cli/` prefix keeps the names apart from the demo's seeded ones.
struct UniqueIds {
    run: String,
    next: u64,
}

impl UniqueIds {
    fn new(cache: &Path) -> UniqueIds {
        let path = std::fs::canonicalize(cache).unwrap_or_else(|_| cache.to_owned());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let run = format!("crmsync-cli/{}/{}/{nanos}", path.display(), std::process::id());
        UniqueIds { run, next: 0 }
    }
}

impl IdSource for UniqueIds {
    fn new_crm_id(&mut self) -> CrmId {
        self.next += 1;
        let name = format!("{}/{}", self.run, self.next);
        CrmId::new(Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes())).expect("a v5 id is never nil")
    }
}

fn sync(
    server: &Path,
    mailbox: &Path,
    cache: &Path,
    config: &EngineConfig,
    as_json: bool,
) -> Result<ExitCode, Failure> {
    // Every path is checked before any file is opened.
    check_file(server, "server store")?;
    check_file(mailbox, "mailbox")?;
    check_file(cache, "sync cache")?;
    let mut cache_db = open_cache(cache)?;
    let (subscription, user) = linked(&cache_db, cache)?;
    let mut server_db = open_existing(server)?;
    let mut mailbox_db = open_mailbox(mailbox)?;
    let bar = spinner(as_json)?;
    let mut ids = UniqueIds::new(cache);
    let mut progress = Progress(bar.clone());
    // CRMSYNC_PAUSE_AT_STEP=N stops the run after durable step N (the crash tests kill it there).
    let mut observer = PauseAtStep::from_env(&mut progress);
    let edges = Edges {
        server: &mut server_db,
        mailbox: &mut mailbox_db,
        cache: &mut cache_db,
        ids: &mut ids,
        observer: &mut observer,
    };
    let result = run_sync(edges, subscription, config);
    bar.finish_and_clear();
    drop((server_db, mailbox_db, cache_db));
    let report = result.map_err(|e| engine_failure(&e, subscription))?;
    if as_json {
        emit(&json(&report)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if !report.primary {
        emit(&format!(
            "Nothing was synchronised: this machine is not the primary Outlook client of user {user} \
             (subscription {subscription}); only the primary client syncs.\n"
        ))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = format!(
        "Synchronised subscription {subscription}: {} server changes, {} Outlook changes\n",
        report.server_changes, report.mailbox_changes
    );
    if report.by_entity.is_empty() {
        out.push_str("Nothing to apply: both sides agree.\n");
    } else {
        out.push_str(&render_counts(&report));
    }
    emit(&out)?;
    Ok(ExitCode::SUCCESS)
}

fn engine_failure(e: &EngineError, subscription: SubscriptionId) -> Failure {
    match e {
        EngineError::Server(crmsync::server::ServerError::UnknownSubscription(_)) => Failure::Other(format!(
            "the server has no subscription {subscription}, which the cache is linked to (was it removed \
             by `crmsync server cleanup`?); nothing was synchronised"
        )),
        // Everything done up to the failure is durable; the next run resumes from there.
        other => Failure::Other(format!("the sync stopped: {other} (the next run resumes where it stopped)")),
    }
}

/// The subscription and user the cache is linked to (see `crmsync::demo::SUBSCRIPTION_KEY`).
fn linked(cache: &SyncCache, path: &Path) -> Result<(SubscriptionId, SystemUserId), Failure> {
    let shown = path.display();
    let read = |key: &str| cache.meta(key).map_err(|e| cache_failure(path, e));
    let (Some(subscription), Some(user)) = (read(SUBSCRIPTION_KEY)?, read(USER_KEY)?) else {
        return Err(Failure::Input(format!(
            "{shown}: the cache was not linked to a subscription; run crmsync demo, or link it first"
        )));
    };
    let bad = |key: &str, value: &str| {
        Failure::Other(format!("{shown}: SyncMeta.{key} holds {value:?}, which is not a GUID"))
    };
    Ok((
        subscription.parse().map_err(|_| bad(SUBSCRIPTION_KEY, &subscription))?,
        user.parse().map_err(|_| bad(USER_KEY, &user))?,
    ))
}

/// What `inspect --json` prints.
#[derive(Serialize)]
struct Inspection {
    cache: PathBuf,
    subscription: Option<String>,
    user: Option<String>,
    queue: Vec<QueueRow>,
    mapping: Vec<MappingRow>,
    ignored: Vec<IgnoredRow>,
}

#[derive(Serialize)]
struct QueueRow {
    id: u64,
    side: String,
    kind: String,
    key: String,
    entity: String,
    attempts: u32,
    last_error: Option<String>,
}

#[derive(Serialize)]
struct MappingRow {
    crm_id: String,
    entry_id: String,
    entity: String,
    crm_version: Option<u64>,
}

#[derive(Serialize)]
struct IgnoredRow {
    id: u64,
    key: String,
    error: String,
}

fn inspect(cache: &Path, as_json: bool) -> Result<ExitCode, Failure> {
    check_file(cache, "sync cache")?;
    let cache_db = open_cache(cache)?;
    let state = cache_db.load().map_err(|e| cache_failure(cache, e))?;
    let subscription = cache_db.meta(SUBSCRIPTION_KEY).map_err(|e| cache_failure(cache, e))?;
    let user = cache_db.meta(USER_KEY).map_err(|e| cache_failure(cache, e))?;
    drop(cache_db);
    let queue: Vec<QueueRow> = state
        .queue
        .entries()
        .into_iter()
        .map(|q| QueueRow {
            id: q.id.0,
            side: q.change.side().to_string(),
            kind: format!("{:?}", q.change.kind()),
            key: q.change.key().to_string(),
            entity: q.change.object_type().to_string(),
            attempts: q.attempts,
            last_error: q.last_error.clone(),
        })
        .collect();
    let mapping: Vec<MappingRow> = state
        .mapping
        .entries()
        .into_iter()
        .map(|m| MappingRow {
            crm_id: m.crm_id.to_string(),
            entry_id: m.entry_id.to_string(),
            entity: m.object_type.to_string(),
            crm_version: m.crm_version.map(|v| v.0),
        })
        .collect();
    let ignored: Vec<IgnoredRow> = state
        .ignored
        .iter()
        .map(|i| IgnoredRow {
            id: i.entry.id.0,
            key: i.entry.change.key().to_string(),
            error: i.error.clone(),
        })
        .collect();
    let inspection = Inspection { cache: cache.to_owned(), subscription, user, queue, mapping, ignored };
    if as_json {
        emit(&json(&inspection)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let none = || "-".to_owned();
    let mut out = format!("Cache {}\n", cache.display());
    match (&inspection.subscription, &inspection.user) {
        (Some(s), Some(u)) => out.push_str(&format!("Linked to subscription {s} of user {u}\n")),
        _ => out.push_str("Not linked to a subscription\n"),
    }
    out.push_str(&format!("\nQueue: {} change(s)\n", inspection.queue.len()));
    out.push_str(&render_table(
        &["ID", "SIDE", "KIND", "KEY", "ENTITY", "ATTEMPTS", "LAST ERROR"],
        inspection.queue.iter().map(|q| {
            vec![
                q.id.to_string(),
                q.side.clone(),
                q.kind.clone(),
                q.key.clone(),
                q.entity.clone(),
                q.attempts.to_string(),
                q.last_error.as_deref().map_or_else(none, one_line),
            ]
        }),
    ));
    out.push_str(&format!("\nMapping: {} linked pair(s)\n", inspection.mapping.len()));
    out.push_str(&render_table(
        &["CRMID", "ENTRYID", "ENTITY", "CRM VERSION"],
        inspection.mapping.iter().map(|m| {
            vec![
                m.crm_id.clone(),
                m.entry_id.clone(),
                m.entity.clone(),
                m.crm_version.map_or_else(none, |v| v.to_string()),
            ]
        }),
    ));
    out.push_str(&format!("\nIgnored errors: {}\n", inspection.ignored.len()));
    out.push_str(&render_table(
        &["ID", "KEY", "ERROR"],
        inspection.ignored.iter().map(|i| vec![i.id.to_string(), i.key.clone(), one_line(&i.error)]),
    ));
    emit(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// An aligned table, indented by two spaces; the last column is not padded. No rows: none.
fn render_table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.collect();
    if rows.is_empty() {
        return "  (none)\n".to_owned();
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut text = String::from(" ");
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                text.push_str(&format!(" {cell}"));
            } else {
                text.push_str(&format!(" {cell:<w$}"));
            }
        }
        text.push('\n');
        text
    };
    let mut out = line(headers.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// An error message on one line of a table.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What `unlink` removed.
#[derive(Serialize)]
struct Unlinked {
    subscription: SubscriptionId,
    user: SystemUserId,
    sync_entry_table: String,
    queue_forgotten: usize,
    mapping_forgotten: usize,
    ignored_forgotten: usize,
}

fn unlink(server: &Path, cache: &Path, as_json: bool) -> Result<ExitCode, Failure> {
    check_file(server, "server store")?;
    check_file(cache, "sync cache")?;
    let mut cache_db = open_cache(cache)?;
    let (subscription, user) = linked(&cache_db, cache)?;
    let state = cache_db.load().map_err(|e| cache_failure(cache, e))?;
    let mut server_db = open_existing(server)?;
    let result = crmsync::engine::unlink(&mut server_db, &mut cache_db, subscription);
    drop((server_db, cache_db));
    result.map_err(|e| engine_failure(&e, subscription))?;
    let unlinked = Unlinked {
        subscription,
        user,
        sync_entry_table: subscription.sync_entry_table(),
        queue_forgotten: state.queue.len(),
        mapping_forgotten: state.mapping.len(),
        ignored_forgotten: state.ignored.len(),
    };
    if as_json {
        emit(&json(&unlinked)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    emit(&format!(
        "Unlinked subscription {subscription} of user {user}.\n\
         Server {}: removed the subscription, its client rows, its prepared changes and its table {}.\n\
         Cache {}: forgot {} queued change(s), {} linked pair(s) and {} ignored error(s).\n\
         Every Outlook item and every CRM record stays where it is (the mailbox was not opened).\n",
        server.display(),
        unlinked.sync_entry_table,
        cache.display(),
        unlinked.queue_forgotten,
        unlinked.mapping_forgotten,
        unlinked.ignored_forgotten
    ))?;
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

/// Refuses a path that is missing, empty or not a regular file, with a clear message naming
/// `what` it should be, before SQLite sees it.
fn check_file(path: &Path, what: &str) -> Result<(), Failure> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Failure::Input(format!(
            "{shown}: no such file (crmsync reads an existing {what} here and never creates one)"
        )),
        _ => Failure::Input(format!("{shown}: {e}")),
    })?;
    if meta.is_dir() {
        return Err(Failure::Input(format!("{shown}: is a directory, not a {what} file")));
    }
    if !meta.is_file() {
        return Err(Failure::Input(format!("{shown}: not a regular file")));
    }
    if meta.len() == 0 {
        return Err(Failure::Input(format!("{shown}: empty file, not a crmsync {what}")));
    }
    Ok(())
}

/// Opens an existing sync cache (see [`check_file`]); never creates a file.
fn open_cache(path: &Path) -> Result<SyncCache, Failure> {
    check_file(path, "sync cache")?;
    SyncCache::open_existing(path).map_err(|e| match &e {
        CacheOpenError::NotACache { .. } | CacheOpenError::NewerSchema { .. } => {
            Failure::Input(e.to_string())
        }
        CacheOpenError::Sqlite { source, .. }
            if source.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase) =>
        {
            Failure::Input(format!("{}: not a SQLite database, so not a crmsync sync cache", path.display()))
        }
        CacheOpenError::Sqlite { .. } => Failure::Other(e.to_string()),
    })
}

fn cache_failure(path: &Path, e: CacheError) -> Failure {
    Failure::Other(format!("{}: {e}", path.display()))
}

/// Opens an existing mailbox file (see [`check_file`]); never creates a file.
fn open_mailbox(path: &Path) -> Result<SqliteMailbox, Failure> {
    check_file(path, "mailbox")?;
    SqliteMailbox::open_existing(path, Box::new(SystemClock)).map_err(|e| match &e {
        MailboxOpenError::Missing { .. }
        | MailboxOpenError::NotADatabase { .. }
        | MailboxOpenError::NotAMailbox { .. }
        | MailboxOpenError::NewerSchema { .. }
        | MailboxOpenError::PrefixMismatch { .. }
        | MailboxOpenError::BadPrefix(_) => Failure::Input(e.to_string()),
        MailboxOpenError::Corrupt { .. } | MailboxOpenError::Io { .. } | MailboxOpenError::Sqlite { .. } => {
            Failure::Other(e.to_string())
        }
    })
}

/// Opens an existing server store (see [`check_file`]); the open itself never creates a file.
fn open_existing(path: &Path) -> Result<ServerStore, Failure> {
    let shown = path.display();
    check_file(path, "server store")?;
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
