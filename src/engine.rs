//! One sync run (DOMAIN section 4, the seed's seven steps) through the edges: the server
//! ([`CrmService`]), the mailbox ([`Mailbox`]) and the cache ([`SyncCache`]), deciding with the
//! pure [`plan`] and [`settle`].
//!
//! The durable steps, in order (each is a [`DurableStep`], so a test can stop the process
//! between any two):
//! 1. `QueueServerPage`: a page of *get sync data* is queued in the cache (one transaction);
//! 2. `AcknowledgeServerPage`: the server is told the page is held;
//! 3. `QueueMailboxPage`: a page of the mailbox's user changes is queued together with the
//!    mailbox cursor after it (one transaction);
//! 4. `ApplyAction`: one action's writes to the mailbox and to the server (the mailbox is
//!    flushed before the cache commits the outcome, so the cache never records a lost write);
//! 5. `FlushMailbox`: the mailbox's writes so far become durable, before the cache records
//!    their outcomes (so the cache never records a write the mailbox lost);
//! 6. `SettleAction`: what settling its outcome changed is written to the cache (per outcome, or
//!    grouped, see [`EngineConfig::commit_every`]);
//! 7. `CommitGroup`: a group of settled outcomes becomes durable;
//! 8. `RestoreLinks` (before planning, after a run that stopped while applying) and
//!    `Reconcile` (after the server pages, under a primary term the cache has not synced
//!    under): see ARCHITECTURE.md.
//!
//! Why a crash anywhere is safe: a page queued and not acknowledged is handed out again and folds
//! into the queue as a repeat; a mailbox page is queued with its cursor atomically; an action
//! applied and not settled is applied again and finds its earlier effect (a create in Outlook
//! first looks for the item stamped with its `CrmId`, a create in CRM reuses the client-chosen
//! id, updates and deletes are idempotent).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::cache::{CacheError, SyncCache};
use crate::change::{Change, ChangeKind, ChangeOp, DeleteReason, Record, RecordKey, Role};
use crate::entity::ObjectTypeCode;
use crate::fields::FieldPatch;
use crate::ids::{CrmId, EntryId};
use crate::mailbox::{
    Mailbox, MailboxChange, MailboxCursor, MailboxError, MailboxItem, NewItem, SyncBase, Tracking,
};
use crate::mapping::MappingEntry;
use crate::mutant::{self, Mutant};
use crate::plan::{Action, ActionOp, LinkChange, PendingLink, PlanError, plan};
use crate::policy::Policies;
use crate::server::{CrmService, ServerError, SubscriptionId};
use crate::settle::SyncState;
use crate::settle::{Applied, ItemError, ItemErrorKind, Outcome, settle};

/// The cache metadata key of the mailbox cursor.
pub const MAILBOX_CURSOR_KEY: &str = "mailbox_cursor";
/// The prefix of the cache metadata keys of CRM writes whose answer was lost: the key ends with
/// the `CrmId`, the value is the write's `FieldPatch` (JSON).
pub const UNCERTAIN_WRITE_PREFIX: &str = "uncertain_write:";
/// The cache metadata key of the primary term this cache last synced under.
pub const PRIMARY_TERM_KEY: &str = "primary_term";
/// The cache metadata key saying a run is applying its plan ("1") or finished it ("0").
pub const APPLYING_KEY: &str = "applying";

/// The durable steps of a run, named as ARCHITECTURE.md names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DurableStep {
    QueueServerPage,
    AcknowledgeServerPage,
    QueueMailboxPage,
    ApplyAction,
    /// The mailbox's writes so far are durable (before the cache records their outcomes).
    FlushMailbox,
    SettleAction,
    CommitGroup,
    /// Links an interrupted run left on items are back in the cache (before planning).
    RestoreLinks,
    /// A cache new to this primary term is reconciled with the mailbox's items.
    Reconcile,
}

/// What an observer answers when it wants the run to stop right after a durable step: the
/// simulator's "process killed here" (the run returns [`EngineError::Interrupted`], and whatever
/// the cache holds uncommitted is for the caller to drop, as a crash would).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupt;

/// Told after every durable step; a test or the simulator stops the run there (a fail point).
pub trait StepObserver {
    /// Called just after `step` became durable. `Err(Interrupt)` stops the run at once.
    fn after(&mut self, step: DurableStep) -> Result<(), Interrupt>;
}

/// Observes nothing.
#[derive(Debug, Default)]
pub struct NoObserver;

impl StepObserver for NoObserver {
    fn after(&mut self, _: DurableStep) -> Result<(), Interrupt> {
        Ok(())
    }
}

/// The environment variable that makes [`PauseAtStep`] stop a run.
pub const PAUSE_AT_STEP_VAR: &str = "CRMSYNC_PAUSE_AT_STEP";

/// A fail point for crash tests: at the N-th durable step (counting from 1) it writes
/// `crmsync: paused after durable step N (Step)` to stderr and sleeps until the process is
/// killed. N comes from [`PAUSE_AT_STEP_VAR`]; without it, it only passes each step on.
pub struct PauseAtStep<'a> {
    at: Option<u64>,
    seen: u64,
    inner: &'a mut dyn StepObserver,
}

impl<'a> PauseAtStep<'a> {
    /// Reads [`PAUSE_AT_STEP_VAR`]; a value that is not a number is ignored.
    pub fn from_env(inner: &'a mut dyn StepObserver) -> Self {
        let at = std::env::var(PAUSE_AT_STEP_VAR).ok().and_then(|v| v.parse().ok());
        PauseAtStep { at, seen: 0, inner }
    }
}

impl StepObserver for PauseAtStep<'_> {
    fn after(&mut self, step: DurableStep) -> Result<(), Interrupt> {
        self.inner.after(step)?;
        self.seen += 1;
        if self.at == Some(self.seen) {
            use std::io::Write;
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "crmsync: paused after durable step {} ({step:?})", self.seen);
            let _ = err.flush();
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        Ok(())
    }
}

/// Counts durable steps (how many kill points a run has).
#[derive(Debug, Default)]
pub struct StepCounter(pub u64);

impl StepObserver for StepCounter {
    fn after(&mut self, _: DurableStep) -> Result<(), Interrupt> {
        self.0 += 1;
        Ok(())
    }
}

/// Where new `CrmId`s for items tracked in Outlook come from (an edge: randomness).
pub trait IdSource {
    fn new_crm_id(&mut self) -> CrmId;
}

/// Deterministic ids (tests, the simulator): UUID v5 of a seed and a counter.
#[derive(Debug, Clone)]
pub struct SeededIds {
    seed: u64,
    next: u64,
}

impl SeededIds {
    pub fn new(seed: u64) -> Self {
        SeededIds { seed, next: 0 }
    }
}

impl IdSource for SeededIds {
    fn new_crm_id(&mut self) -> CrmId {
        self.next += 1;
        let name = format!("crmsync/{}/{}", self.seed, self.next);
        CrmId::new(Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes())).expect("a v5 id is never nil")
    }
}

/// How a run behaves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    pub policies: Policies,
    /// Page size of *get sync data* and of the mailbox's changes.
    pub page_size: usize,
    /// Settled outcomes per cache transaction: 1 commits every outcome.
    pub commit_every: usize,
    /// "Ignore all errors": a failed change leaves the queue for `IgnoredErrors`.
    pub ignore_all_errors: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            policies: Policies::default(),
            page_size: 1000,
            commit_every: 1,
            ignore_all_errors: false,
        }
    }
}

/// What one run did, per entity type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCounts {
    pub created: u32,
    pub updated: u32,
    pub deleted: u32,
    pub untracked: u32,
    pub merged_conflicts: u32,
    pub unchanged: u32,
    pub failed: u32,
    pub ignored: u32,
}

/// The summary of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunReport {
    /// Whether this client is the primary one (a secondary client does nothing).
    pub primary: bool,
    pub server_changes: usize,
    pub mailbox_changes: usize,
    pub by_entity: BTreeMap<ObjectTypeCode, RunCounts>,
}

/// Why a run stopped. Item-level failures are not errors: they are settled and reported.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("server: {0}")]
    Server(#[from] ServerError),
    #[error("mailbox: {0}")]
    Mailbox(#[from] MailboxError),
    #[error("cache: {0}")]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("the cache's mailbox cursor {0:?} is not a number")]
    BadCursor(String),
    /// The observer stopped the run after this step (a simulated crash).
    #[error("interrupted after durable step {0:?}")]
    Interrupted(DurableStep),
}

/// The edges one run works through.
pub struct Edges<'a, S: CrmService, M: Mailbox> {
    pub server: &'a mut S,
    pub mailbox: &'a mut M,
    pub cache: &'a mut SyncCache,
    pub ids: &'a mut dyn IdSource,
    pub observer: &'a mut dyn StepObserver,
}

/// Runs one sync of `subscription` (one user on this machine).
pub fn run_sync<S: CrmService, M: Mailbox>(
    edges: Edges<'_, S, M>,
    subscription: SubscriptionId,
    config: &EngineConfig,
) -> Result<RunReport, EngineError> {
    let Edges { server, mailbox, cache, ids, observer } = edges;
    let result = run(server, mailbox, &mut *cache, ids, observer, subscription, config);
    if result.is_err() {
        // A run that stops loses its open group, as a crash would: every outcome in it is
        // applied again next time and finds its earlier effect. Committing it instead could
        // record a write the mailbox has not made durable.
        let _ = cache.abandon_group();
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn run<S: CrmService, M: Mailbox>(
    server: &mut S,
    mailbox: &mut M,
    cache: &mut SyncCache,
    ids: &mut dyn IdSource,
    observer: &mut dyn StepObserver,
    subscription: SubscriptionId,
    config: &EngineConfig,
) -> Result<RunReport, EngineError> {
    let term = server.primary_term(subscription)?;
    let mut report = RunReport { primary: term.is_some(), ..RunReport::default() };
    let Some(term) = term else {
        // A secondary client reads and never writes.
        return Ok(report);
    };
    let mut state = cache.load()?;

    // Steps 1 and 2: prepare, then queue every server page durably before acknowledging it.
    server.prepare_sync(subscription)?;
    let mut after = None;
    loop {
        let page = server.get_sync_data(subscription, after, config.page_size)?;
        report.server_changes += page.changes.len();
        let early_ack = mutant::active(Mutant::AcknowledgeBeforeQueue);
        if let (true, Some(last)) = (early_ack, page.last_seq) {
            server.acknowledge(subscription, last)?;
            durable(observer, DurableStep::AcknowledgeServerPage)?;
        }
        let seen = mutant::active(Mutant::DropRedeliveredPage) && mutant::page_seen(cache, page.last_seq)?;
        cache.enqueue(&mut state, if seen { &[] } else { &page.changes })?;
        durable(observer, DurableStep::QueueServerPage)?;
        if let (false, Some(last)) = (early_ack, page.last_seq) {
            server.acknowledge(subscription, last)?;
            durable(observer, DurableStep::AcknowledgeServerPage)?;
        }
        after = page.last_seq.or(after);
        if !page.more {
            break;
        }
    }

    // A term this cache has not synced under: the cache is new or rebuilt, or another machine
    // was primary meanwhile. Its view of the mailbox may be stale: reconcile it with the items.
    if cache.meta(PRIMARY_TERM_KEY)?.as_deref() != Some(term.to_string().as_str()) {
        reconcile(server, mailbox, cache, &mut state, subscription, term)?;
        durable(observer, DurableStep::Reconcile)?;
    }

    // Step 3: the user's changes of tracked items since the last run, with the cursor.
    let mut cursor = match cache.meta(MAILBOX_CURSOR_KEY)? {
        Some(text) => MailboxCursor(text.parse().map_err(|_| EngineError::BadCursor(text))?),
        None => MailboxCursor::START,
    };
    loop {
        let page = mailbox.changes_since(cursor, config.page_size)?;
        report.mailbox_changes += page.changes.len();
        let changes: Vec<Change> = page.changes.iter().filter_map(|c| outlook_change(c, ids)).collect();
        // An item stamped by a sync that this client sees created (its cache was rebuilt: a new
        // primary machine, an unlink and relink) may name a record the server will never hand
        // out to this subscription (deleted, or out of the filter since): ask.
        let mut fetched = Vec::new();
        for change in &page.changes {
            if let (ChangeKind::Create, Some(item)) = (change.kind, &change.item) {
                if let Tracking::Stamped(crm_id) = item.tracking {
                    fetched.extend(server.fetch_record(subscription, crm_id)?);
                }
            }
        }
        let restored =
            links_kept_on_items(&state, page.changes.iter().filter_map(|c| c.item.as_ref()), &fetched);
        cache.begin()?;
        cache.restore_links(&mut state, restored)?;
        uncertain_writes_kept_on_items(cache, page.changes.iter().filter_map(|c| c.item.as_ref()))?;
        cache.enqueue(&mut state, &fetched)?;
        cache.enqueue(&mut state, &changes)?;
        cache.set_meta(MAILBOX_CURSOR_KEY, &page.cursor.0.to_string())?;
        cache.commit()?;
        durable(observer, DurableStep::QueueMailboxPage)?;
        cursor = page.cursor;
        if !page.more {
            break;
        }
    }

    // A run stopped while applying (a crash, a network failure) may have written items whose
    // links the cache never recorded: the items keep them (`SyncBase`), so restore them before
    // planning, or a record created then deleted, say, would be dropped as never synced while
    // its item stays stamped.
    if cache.meta(APPLYING_KEY)?.as_deref() == Some("1") {
        let items = items_of_unmapped_entries(&state, mailbox)?;
        let restored = links_kept_on_items(&state, items.iter(), &[]);
        cache.restore_links(&mut state, restored)?;
        durable(observer, DurableStep::RestoreLinks)?;
    }
    resolve_uncertain_writes(cache, &mut state)?;
    let agreed = agreed_through_earlier_snapshots(&state);
    cache.restore_links(&mut state, agreed)?;
    cache.set_meta(APPLYING_KEY, "1")?;

    // Steps 4 to 7: plan, apply, settle.
    let plan = plan(&state.queue, &state.mapping, &config.policies)?;
    let mut in_group = 0;
    for action in &plan.actions {
        let renamed = if mutant::active(Mutant::RetryWithoutIdempotencyKey) {
            mutant::retry_under_new_id(action, mailbox)?
        } else {
            None
        };
        let action = renamed.as_ref().unwrap_or(action);
        if mutant::active(Mutant::DequeueBeforeApply) {
            cache.drop_entries(&mut state, &action.consumed)?;
        }
        if mutant::active(Mutant::MapBeforeItemExists) {
            let link = match (&action.op, pending(&action.link)) {
                (ActionOp::CreateInCrm { .. }, Some(p)) => p.resolve(None),
                _ => None,
            };
            cache.restore_links(&mut state, link.into_iter().collect())?;
        }
        let outcome = match apply(action, server, mailbox, subscription, config) {
            Err(EngineError::Server(ServerError::Unreachable(why))) => {
                cache.abandon_group()?;
                note_uncertain_write(cache, mailbox, action)?;
                return Err(EngineError::Server(ServerError::Unreachable(why)));
            }
            other => other?,
        };
        // A group opens with its first outcome (the note below belongs to it).
        if in_group == 0 && config.commit_every > 1 {
            cache.begin()?;
        }
        match &outcome {
            // Nothing was written: queue the record as it is now, so the next run merges it
            // (the server notes it as held, so it is not handed out again behind it).
            Outcome::Failed(e) if e.kind == ItemErrorKind::ChangedSince => match (&action.op, &action.link) {
                (ActionOp::Update { crm_id, .. }, _) => {
                    let now = server.fetch_record(subscription, *crm_id)?;
                    cache.enqueue(&mut state, &now.into_iter().collect::<Vec<_>>())?;
                }
                (ActionOp::CreateInCrm { crm_id, entry_id, .. }, LinkChange::Replace { remove, .. }) => {
                    join_comeback(server, cache, &mut state, subscription, *remove, *crm_id, entry_id)?;
                }
                _ => {}
            },
            // A failed action may have written to CRM before failing.
            Outcome::Failed(_) | Outcome::FailedIgnored(_) => note_uncertain_write(cache, mailbox, action)?,
            Outcome::Applied(_) => {}
        }
        durable(observer, DurableStep::ApplyAction)?;
        count(&mut report, action, &outcome);
        state = settle(state, action, outcome);
        if config.commit_every <= 1 {
            mailbox.flush()?;
            durable(observer, DurableStep::FlushMailbox)?;
        }
        cache.record_settled(&state, action)?;
        durable(observer, DurableStep::SettleAction)?;
        in_group += 1;
        if in_group >= config.commit_every.max(1) {
            // The mailbox's writes become durable before the cache records their outcomes.
            mailbox.flush()?;
            durable(observer, DurableStep::FlushMailbox)?;
            cache.commit()?;
            durable(observer, DurableStep::CommitGroup)?;
            in_group = 0;
        }
    }
    if in_group > 0 {
        mailbox.flush()?;
        durable(observer, DurableStep::FlushMailbox)?;
        cache.commit()?;
        durable(observer, DurableStep::CommitGroup)?;
    }
    cache.set_meta(APPLYING_KEY, "0")?;
    cache.remember(state)?;
    Ok(report)
}

/// The links the mailbox knows of and the cache does not (or knows an older base of): items
/// stamped, with a [`SyncBase`] newer than the mapping's. That is what a crash between a write
/// and the cache's record of it leaves, and what a rebuilt cache (another primary machine, an
/// unlink and relink) finds; restoring them first makes the queued changes merge against the
/// base both sides really agreed on, so an edit made since is not lost to an empty base.
///
/// An unversioned base was stamped before its CRM create was confirmed. It is restored only
/// once CRM is known to hold the record (a change of it is queued, or in `arriving`): then the
/// create landed, with exactly those fields (the `CrmId` is the create's own, chosen by this
/// client), and they are the base both sides agreed on. Otherwise a queued create retries it.
/// (Found by crmsync-sim, seed 54: a create whose answer was lost, then an unlink and relink
/// that dropped the queued create; the item's next edit met the record with an empty base, lost
/// the conflict with its own earlier value, and was overwritten.)
fn links_kept_on_items<'i>(
    state: &SyncState,
    items: impl Iterator<Item = &'i MailboxItem>,
    arriving: &[Change],
) -> Vec<MappingEntry> {
    // Built only if an unversioned base turns up (rare: a create interrupted mid-air): the
    // queued CRM changes by record, as (version, fields).
    type Seen<'s> =
        std::collections::HashMap<CrmId, Vec<(crate::ids::VersionNumber, Option<&'s crate::fields::Fields>)>>;
    let queued_crm: std::cell::OnceCell<Seen<'_>> = std::cell::OnceCell::new();
    let queued = || {
        queued_crm.get_or_init(|| {
            let mut seen = Seen::new();
            let changes = state.queue.iter_unordered().map(|e| &e.change).chain(arriving.iter());
            for change in changes {
                if let (RecordKey::Crm(id), crate::change::ChangeStamp::Crm(v)) =
                    (change.key(), change.stamp())
                {
                    seen.entry(*id).or_default().push((v, change.record().map(|r| &r.fields)));
                }
            }
            seen
        })
    };
    let mut out: Vec<MappingEntry> = Vec::new();
    for item in items {
        let (Some(crm_id), Some(base)) = (item.stamp(), item.synced.as_ref()) else { continue };
        let mut crm_version = base.crm_version;
        if crm_version.is_none() {
            let Some(changes) = queued().get(&crm_id) else { continue };
            // The create's own echo, if queued, says which version holds the base.
            crm_version =
                changes.iter().filter(|(_, fields)| *fields == Some(&base.fields)).map(|(v, _)| *v).min();
        }
        let newer = match state.mapping.get(crm_id) {
            Some(m) => m.entry_id == item.entry_id && crm_version > m.crm_version,
            None => state.mapping.crm_id_of(&item.entry_id).is_none(),
        };
        let goid_free = item
            .goid
            .as_ref()
            .and_then(|g| state.mapping.crm_id_of_goid(g))
            .is_none_or(|holder| holder == crm_id);
        let unseen = !out.iter().any(|e| e.crm_id == crm_id || e.entry_id == item.entry_id);
        if newer && goid_free && unseen {
            out.push(MappingEntry {
                crm_id,
                entry_id: item.entry_id.clone(),
                object_type: item.object_type,
                base: base.fields.clone(),
                goid: item.goid.clone(),
                role: base.role,
                status: item.status,
                crm_version,
            });
        }
    }
    out
}

/// Brings a cache that may be stale (new, rebuilt, or last used before another machine was
/// primary) in line with the mailbox, in one transaction: forgets pairs whose item is gone or
/// carries another stamp (another machine's sync decided), restores the links items keep
/// ([`SyncBase`]), and for every stamped item whose record the server will not hand out (this
/// subscription does not hold it) asks the server ([`CrmService::fetch_record`]) and queues the
/// answer: a record deleted or gone out of the filter meanwhile then meets its item.
fn reconcile<S: CrmService, M: Mailbox>(
    server: &mut S,
    mailbox: &M,
    cache: &mut SyncCache,
    state: &mut SyncState,
    subscription: SubscriptionId,
    term: u64,
) -> Result<(), EngineError> {
    let items = mailbox.all_items()?;
    let by_entry: std::collections::BTreeMap<&EntryId, &MailboxItem> =
        items.iter().map(|i| (&i.entry_id, i)).collect();
    let mut stale: Vec<CrmId> = state
        .mapping
        .iter_unordered()
        .filter(|m| by_entry.get(&m.entry_id).and_then(|i| i.stamp()) != Some(m.crm_id))
        .map(|m| m.crm_id)
        .collect();
    stale.sort_unstable();
    let queued: std::collections::BTreeSet<CrmId> = state
        .queue
        .iter_unordered()
        .filter_map(|e| match e.change.key() {
            RecordKey::Crm(id) => Some(*id),
            RecordKey::Outlook(_) => None,
        })
        .collect();
    // Queued Outlook changes are snapshots of items taken when they were queued; while this
    // machine was not primary another one may have synced those items since. Drop them and
    // read the mailbox's log again from the start: every change comes back with its item as it
    // is now. A create whose item is still pending keeps its entry: it holds the CrmId chosen
    // for it, the create's idempotency key (its record may already exist).
    let pending: std::collections::BTreeSet<&EntryId> =
        items.iter().filter(|i| i.tracking == Tracking::Pending).map(|i| &i.entry_id).collect();
    let mut snapshots: Vec<crate::queue::QueueId> = state
        .queue
        .iter_unordered()
        .filter(|e| match e.change.key() {
            RecordKey::Outlook(entry_id) => !pending.contains(entry_id),
            RecordKey::Crm(_) => false,
        })
        .map(|e| e.id)
        .collect();
    snapshots.sort_unstable();
    cache.begin()?;
    cache.drop_entries(state, &snapshots)?;
    cache.set_meta(MAILBOX_CURSOR_KEY, &MailboxCursor::START.0.to_string())?;
    cache.forget_links(state, &stale)?;
    let held: std::collections::BTreeSet<CrmId> = state.mapping.iter_unordered().map(|m| m.crm_id).collect();
    let restored = links_kept_on_items(state, items.iter(), &[]);
    cache.restore_links(state, restored)?;
    uncertain_writes_kept_on_items(cache, items.iter())?;
    let mut fetched = Vec::new();
    let mut asked = std::collections::BTreeSet::new();
    for item in &items {
        let Some(crm_id) = item.stamp() else { continue };
        if !held.contains(&crm_id) && !queued.contains(&crm_id) && asked.insert(crm_id) {
            fetched.extend(server.fetch_record(subscription, crm_id)?);
        }
    }
    cache.enqueue(state, &fetched)?;
    cache.set_meta(PRIMARY_TERM_KEY, &term.to_string())?;
    cache.commit()?;
    Ok(())
}

/// A meeting deleted in CRM came back as `successor` from another attendee's client first
/// (`ServerError::MeetingJoined`: the server made this user an attendee of it). This item joins
/// it: the pair moves to the successor keeping the old pair's base (the last both sides agreed
/// on), and the successor is queued as it is now; the item's queued edit stays, so the next run
/// merges the two like edits on both sides, and neither attendee's edit is lost (found by
/// crmsync-sim, seeds 1619 and 1659).
fn join_comeback<S: CrmService>(
    server: &mut S,
    cache: &mut SyncCache,
    state: &mut SyncState,
    subscription: SubscriptionId,
    old: CrmId,
    successor: CrmId,
    entry_id: &EntryId,
) -> Result<(), EngineError> {
    let Some(pair) = state.mapping.get(old).cloned() else { return Ok(()) };
    let now = server.fetch_record(subscription, successor)?;
    cache.forget_links(state, &[old])?;
    let joined = MappingEntry { crm_id: successor, entry_id: entry_id.clone(), crm_version: None, ..pair };
    cache.restore_links(state, vec![joined])?;
    cache.enqueue(state, &now.into_iter().collect::<Vec<_>>())?;
    Ok(())
}

/// A CRM update whose answer was lost, or whose action failed after it (a locked item), may
/// or may not have landed: what it set is noted so the next run can tell from CRM's next
/// change. Without it, a later edit of the item would be merged against a base that lags the
/// write, and lose a conflict with the client's own earlier value (found by crmsync-sim).
///
/// The note is kept twice: in the cache, and on the item's base (best effort: a locked item
/// keeps only the cache's), because a cache rebuilt since (an unlink and relink, another
/// primary) has lost its own (found by crmsync-sim, seed 867).
fn note_uncertain_write<M: Mailbox>(
    cache: &mut SyncCache,
    mailbox: &mut M,
    action: &Action,
) -> Result<(), EngineError> {
    let ActionOp::Update { crm_id, entry_id, to_crm, .. } = &action.op else { return Ok(()) };
    if to_crm.is_empty() {
        return Ok(());
    }
    note_in_cache(cache, *crm_id, to_crm)?;
    if let Ok(Some(item)) = mailbox.get(entry_id) {
        if let (Some(stamp), Some(base)) = (item.stamp().filter(|s| s == crm_id), item.synced) {
            let noted = SyncBase { pending: Some(to_crm.clone()), ..base };
            // Made durable now: the run may stop right after (a lost answer ends it). Items may
            // run ahead of the cache, never behind it, so flushing early is safe.
            if mailbox.link(entry_id, stamp, noted).is_ok() {
                let _ = mailbox.flush();
            }
        }
    }
    Ok(())
}

/// The uncertain writes the items keep (see [`note_uncertain_write`]), noted again in the cache
/// so [`resolve_uncertain_writes`] decides them: what a rebuilt cache needs before merging.
fn uncertain_writes_kept_on_items<'i>(
    cache: &mut SyncCache,
    items: impl Iterator<Item = &'i MailboxItem>,
) -> Result<(), EngineError> {
    for item in items {
        let (Some(crm_id), Some(patch)) =
            (item.stamp(), item.synced.as_ref().and_then(|b| b.pending.as_ref()))
        else {
            continue;
        };
        note_in_cache(cache, crm_id, patch)?;
    }
    Ok(())
}

/// The cache's note of an uncertain write of `patch` to `crm_id` (one per record).
fn note_in_cache(cache: &mut SyncCache, crm_id: CrmId, patch: &FieldPatch) -> Result<(), EngineError> {
    let Ok(text) = serde_json::to_string(patch) else { return Ok(()) };
    cache.set_meta(&format!("{UNCERTAIN_WRITE_PREFIX}{crm_id}"), &text)?;
    Ok(())
}

/// Decides the writes [`note_uncertain_write`] noted, from the newest queued CRM change of each
/// record: if it holds every value the write set (and lacks every field it cleared), the write
/// landed, and the pair's base takes the patch (its version stays, so the change itself is still compared, not dropped). With
/// no change queued yet the note waits for the next run.
fn resolve_uncertain_writes(cache: &mut SyncCache, state: &mut SyncState) -> Result<(), EngineError> {
    for (key, value) in cache.meta_with_prefix(UNCERTAIN_WRITE_PREFIX)? {
        let crm_id = key[UNCERTAIN_WRITE_PREFIX.len()..].parse::<CrmId>().ok();
        let patch: Option<FieldPatch> = serde_json::from_str(&value).ok();
        let (Some(crm_id), Some(patch)) = (crm_id, patch) else {
            cache.delete_meta(&key)?;
            continue;
        };
        let newest = state
            .queue
            .iter_unordered()
            .filter(|e| e.change.key() == &RecordKey::Crm(crm_id))
            .max_by_key(|e| (e.change.stamp(), e.id))
            .and_then(|e| e.change.record());
        let Some(pair) = state.mapping.get(crm_id).cloned() else {
            cache.delete_meta(&key)?;
            continue;
        };
        let Some(newest) = newest else { continue };
        if patch.iter().all(|(name, value)| newest.fields.get(name) == value) {
            if let Ok(base) = patch.apply(&pair.base) {
                cache.restore_links(state, vec![MappingEntry { base, ..pair }])?;
            }
        }
        cache.delete_meta(&key)?;
    }
    Ok(())
}

/// A write whose outcome was lost (the process killed right after it) leaves CRM holding a state
/// the item passed through, while the pair's base lags behind it: the item's next edit would
/// then be merged as a conflict with its own earlier value, and lose to it (found by
/// crmsync-sim, seed 238). For each mapped pair with queued changes from both sides and more
/// than one queued Outlook update, every field whose newest queued CRM value equals its value
/// in an earlier queued Outlook snapshot (not the newest) moves the pair's base to that value:
/// both sides held it, so it is agreed, and the item's newer value was made after it. Whatever
/// explains the match, the item moved on from that value, so this is no policy choice.
fn agreed_through_earlier_snapshots(state: &SyncState) -> Vec<MappingEntry> {
    use std::collections::HashMap;
    // Outlook updates of mapped items, grouped by item in queue order; most items have one.
    let mut updates: Vec<(&EntryId, crate::queue::QueueId, &Record)> = state
        .queue
        .iter_unordered()
        .filter_map(|e| match (e.change.key(), e.change.kind(), e.change.record()) {
            (RecordKey::Outlook(entry_id), ChangeKind::Update, Some(r)) => Some((entry_id, e.id, r)),
            _ => None,
        })
        .collect();
    updates.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let runs: Vec<&[(&EntryId, crate::queue::QueueId, &Record)]> =
        updates.chunk_by(|a, b| a.0 == b.0).filter(|run| run.len() > 1).collect();
    if runs.is_empty() {
        return Vec::new();
    }
    let mut newest_crm: HashMap<CrmId, (crate::change::ChangeStamp, crate::queue::QueueId, &Record)> =
        HashMap::new();
    for e in state.queue.iter_unordered() {
        let (RecordKey::Crm(crm_id), Some(r)) = (e.change.key(), e.change.record()) else { continue };
        let candidate = (e.change.stamp(), e.id, r);
        let slot = newest_crm.entry(*crm_id).or_insert(candidate);
        if (candidate.0, candidate.1) > (slot.0, slot.1) {
            *slot = candidate;
        }
    }
    let mut out = Vec::new();
    for run in runs {
        let Some(crm_id) = state.mapping.crm_id_of(run[0].0) else { continue };
        let (Some(pair), Some((_, _, crm))) = (state.mapping.get(crm_id), newest_crm.get(&crm_id)) else {
            continue;
        };
        let (earlier, newest) = run.split_at(run.len() - 1);
        let newest = &newest[0].2.fields;
        let mut names: Vec<&str> =
            crm.fields.iter().map(|(n, _)| n).chain(pair.base.iter().map(|(n, _)| n)).collect();
        names.sort_unstable();
        names.dedup();
        let mut moved = false;
        let mut base: Vec<(&str, &str)> = Vec::new();
        for name in names {
            let in_crm = crm.fields.get(name);
            let agreed = in_crm != pair.base.get(name)
                && in_crm != newest.get(name)
                && earlier.iter().any(|(_, _, snapshot)| snapshot.fields.get(name) == in_crm);
            moved |= agreed;
            if let Some(value) = if agreed { in_crm } else { pair.base.get(name) } {
                base.push((name, value));
            }
        }
        if moved {
            if let Ok(base) = crate::fields::Fields::try_from_pairs(base) {
                out.push(MappingEntry { base, ..pair.clone() });
            }
        }
    }
    out
}

/// The items the queue's unmapped entries name: by stamp for a CRM change, by EntryId for an
/// Outlook one (what an interrupted run may have linked without the cache knowing).
fn items_of_unmapped_entries<M: Mailbox>(
    state: &SyncState,
    mailbox: &M,
) -> Result<Vec<MailboxItem>, EngineError> {
    let mut seen = std::collections::BTreeSet::new();
    let mut items = Vec::new();
    for entry in state.queue.iter_unordered() {
        let entry_id = match entry.change.key() {
            RecordKey::Crm(crm_id) if state.mapping.get(*crm_id).is_none() => {
                mailbox.find_by_stamp(*crm_id)?
            }
            RecordKey::Outlook(entry_id) if state.mapping.crm_id_of(entry_id).is_none() => {
                Some(entry_id.clone())
            }
            _ => None,
        };
        if let Some(entry_id) = entry_id.filter(|e| seen.insert(e.clone())) {
            items.extend(mailbox.get(&entry_id)?);
        }
    }
    // The order the queue's index gave must not reach the result.
    items.sort_by(|a, b| a.entry_id.cmp(&b.entry_id));
    Ok(items)
}

/// Tells the observer that `step` is durable; it may stop the run there.
fn durable(observer: &mut dyn StepObserver, step: DurableStep) -> Result<(), EngineError> {
    observer.after(step).map_err(|Interrupt| EngineError::Interrupted(step))
}

/// The change a mailbox change stands for. An item the user just tracked is created in CRM
/// under a new id; a stamped one carries its stamp.
fn outlook_change(change: &MailboxChange, ids: &mut dyn IdSource) -> Option<Change> {
    let op = match (&change.item, change.kind) {
        (None, _) | (_, ChangeKind::Delete) => ChangeOp::Delete(DeleteReason::Deleted),
        (Some(item), kind) => {
            let crm_id = match item.tracking {
                Tracking::Stamped(id) => id,
                Tracking::Pending | Tracking::Untracked => ids.new_crm_id(),
            };
            let record = Record {
                fields: item.fields.clone(),
                goid: item.goid.clone(),
                role: Role::Owner,
                status: item.status,
                crm_id: Some(crm_id),
            };
            if kind == ChangeKind::Create { ChangeOp::Create(record) } else { ChangeOp::Update(record) }
        }
    };
    // A change the mailbox reports is always a valid Outlook change.
    Change::outlook(change.entry_id.clone(), change.object_type, change.modified_at, op).ok()
}

/// Performs one action's writes. Item-level failures become the outcome; a failure of a store
/// itself stops the run.
fn apply<S: CrmService, M: Mailbox>(
    action: &Action,
    server: &mut S,
    mailbox: &mut M,
    subscription: SubscriptionId,
    config: &EngineConfig,
) -> Result<Outcome, EngineError> {
    // A write that waits for a concurrent change to be merged is no error the user could choose
    // to ignore: the next run merges and retries it whatever the choice.
    let failed = |error: ItemError| {
        if config.ignore_all_errors && error.kind != ItemErrorKind::ChangedSince {
            Outcome::FailedIgnored(error)
        } else {
            Outcome::Failed(error)
        }
    };
    let result = match &action.op {
        ActionOp::Reject { error } => {
            return Ok(failed(ItemError::new(ItemErrorKind::Invalid, error.to_string())));
        }
        // Nothing to write to either side's data; a pair that moves to a newer version (an
        // echo) takes the item's copy of the base along, so a new primary finds it there.
        ActionOp::Drop { .. } => match pending(&action.link) {
            Some(PendingLink { crm_id, entry_id: Some(entry_id), .. }) => {
                relink(mailbox, entry_id, *crm_id, synced_base(action, None)).map(|()| Applied::default())
            }
            _ => Ok(Applied::default()),
        },
        ActionOp::CreateInOutlook { crm_id, fields, goid_search } => {
            create_in_outlook(mailbox, action, *crm_id, fields, goid_search.as_ref())
        }
        ActionOp::CreateInCrm { crm_id, entry_id, fields, to_outlook } => {
            let link = pending(&action.link);
            let record = Record {
                fields: fields.clone(),
                goid: link.and_then(|l| l.goid.clone()),
                role: Role::Owner,
                status: link.map_or(crate::change::ActivityStatus::Open, |l| l.status),
                crm_id: None,
            };
            // Stamp the item first, with the base being created: a locked item then fails before
            // anything is written, and once the record exists its item already says so (found by
            // crmsync-sim: a stamp that failed after the create left a record whose later
            // edits were merged against an empty base).
            // Once the record exists, the base on the item gets its version: only a versioned
            // base is restored as a link (an unversioned one may name a record never created).
            let relink = |mailbox: &mut M, entry_id: &EntryId, crm_id: CrmId, base: Option<SyncBase>| {
                if mutant::active(Mutant::NoStamp) { Ok(()) } else { relink(mailbox, entry_id, crm_id, base) }
            };
            let first = match synced_base(action, None) {
                // A record brought back with CRM values the item lacks: they land with the stamp.
                Some(base) if !to_outlook.is_empty() => {
                    mailbox.update_and_link(entry_id, to_outlook, *crm_id, base).map_err(Failure::from)
                }
                base => relink(mailbox, entry_id, *crm_id, base),
            };
            first
                .and_then(|()| {
                    server_write(server.create_record(subscription, *crm_id, action.object_type, &record))
                })
                .and_then(|v| {
                    // Best effort: the record exists and the item is stamped, so the action
                    // succeeded; a locked item keeps its unversioned base, which only means a
                    // crash now would retry the (idempotent) create instead of restoring.
                    match relink(mailbox, entry_id, *crm_id, synced_base(action, Some(v))) {
                        Ok(()) | Err(Failure::Item(_)) => {
                            Ok(Applied { entry_id: None, crm_version: Some(v) })
                        }
                        Err(fatal) => Err(fatal),
                    }
                })
        }
        ActionOp::Update { crm_id, entry_id, to_crm, to_outlook } => {
            let version = if to_crm.is_empty() {
                Ok(None)
            } else {
                // The new version becomes the pair's known version only if the patch was written
                // over the version this plan knew; if someone wrote in between, their change
                // must still come back as a change, not be dropped as stale.
                // With a known version the write is conditional: a record someone changed since
                // the version the merge started from is not overwritten (found by crmsync-sim,
                // seeds 50 and 61: a CRM edit held back by a late page, or made after the run
                // read its pages, was written over by the item's conflicting edit). The run
                // then queues the record as it is, and the next run merges it.
                let known = pending(&action.link).and_then(|p| p.crm_version);
                let written = match known {
                    Some(v) if !mutant::active(Mutant::UnconditionalCrmUpdate) => {
                        server.update_record_if(*crm_id, to_crm, v)
                    }
                    _ => server.update_record(*crm_id, to_crm),
                };
                let written = match written {
                    // Deleted in CRM since (its delete not merged here: it was ignored, or is
                    // yet to come): like a newer version, the next run merges the delete with
                    // this edit, and `UpdateVsDeletePolicy` decides (found by crmsync-sim, seed
                    // 502: after "ignore all errors" set a CRM delete aside, the item's later
                    // edit was refused on every run and never left the queue).
                    Err(deleted @ ServerError::RecordDeleted(_)) => {
                        Err(Failure::Item(ItemError::new(ItemErrorKind::ChangedSince, deleted.to_string())))
                    }
                    other => server_write(other),
                };
                written.map(|u| if Some(u.previous) == known { Some(u.version) } else { None })
            };
            version.and_then(|v| {
                let base = synced_base(action, v);
                if !to_outlook.is_empty() {
                    // The fields and the agreed base land on the item in one write (found by
                    // crmsync-sim, seeds 123 and 866: an item locked between the two writes
                    // kept new fields under an old base, and a later switch of primary merged
                    // the user's next edit against that old base and lost it).
                    let written = match &base {
                        Some(base) => mailbox.update_and_link(entry_id, to_outlook, *crm_id, base.clone()),
                        None => mailbox.update(entry_id, to_outlook),
                    };
                    match written {
                        // The item is gone while the pair stayed (its delete failed and was
                        // ignored): the record changed in CRM, so Outlook gets it back (found by
                        // crmsync-sim, seed 272: the update failed on every run).
                        Err(MailboxError::NotFound(_)) => {
                            let base = pending(&action.link).map(|p| p.base.clone());
                            if let Some(fields) = base {
                                let made = create_in_outlook(mailbox, action, *crm_id, &fields, None)?;
                                return Ok(Applied { entry_id: made.entry_id, crm_version: v });
                            }
                        }
                        other => mailbox_write(other)?,
                    }
                    if base.is_some() {
                        return Ok(Applied { entry_id: None, crm_version: v });
                    }
                }
                relink(mailbox, entry_id, *crm_id, base)?;
                Ok(Applied { entry_id: None, crm_version: v })
            })
        }
        ActionOp::DeleteInOutlook { entry_id, .. } => {
            mailbox_write(mailbox.delete(entry_id)).map(|()| Applied::default())
        }
        ActionOp::DeleteInCrm { crm_id, .. } => server_write(server.delete_record(*crm_id))
            .map(|v| Applied { entry_id: None, crm_version: Some(v) }),
        ActionOp::Untrack { entry_id, .. } => match mailbox.set_stamp(entry_id, None) {
            Ok(()) | Err(MailboxError::NotFound(_)) => Ok(Applied::default()),
            Err(e) => mailbox_write(Err(e)),
        },
    };
    match result {
        Ok(applied) => Ok(Outcome::Applied(applied)),
        Err(Failure::Item(error)) => Ok(failed(error)),
        Err(Failure::Fatal(error)) => Err(error),
    }
}

/// An item-level failure (the run goes on) or a store failure (the run stops).
enum Failure {
    Item(ItemError),
    Fatal(EngineError),
}

impl From<MailboxError> for Failure {
    fn from(error: MailboxError) -> Failure {
        match error {
            MailboxError::NotFound(_)
            | MailboxError::Locked(_)
            | MailboxError::StampTaken { .. }
            | MailboxError::Fields(_) => {
                Failure::Item(ItemError::new(ItemErrorKind::Rejected, error.to_string()))
            }
            other => Failure::Fatal(other.into()),
        }
    }
}

impl From<ServerError> for Failure {
    fn from(error: ServerError) -> Failure {
        match error {
            // A store or the network failing is not the item's fault: the run stops.
            ServerError::Sqlite(_) | ServerError::Corrupt { .. } | ServerError::Unreachable(_) => {
                Failure::Fatal(error.into())
            }
            // Nothing written; the record as it is now is queued and merged on the next run.
            ServerError::ChangedSince { .. } | ServerError::MeetingJoined { .. } => {
                Failure::Item(ItemError::new(ItemErrorKind::ChangedSince, error.to_string()))
            }
            other => Failure::Item(ItemError::new(ItemErrorKind::Rejected, other.to_string())),
        }
    }
}

fn server_write<T>(result: Result<T, ServerError>) -> Result<T, Failure> {
    result.map_err(Failure::from)
}

fn mailbox_write<T>(result: Result<T, MailboxError>) -> Result<T, Failure> {
    result.map_err(Failure::from)
}

fn pending(link: &LinkChange) -> Option<&PendingLink> {
    match link {
        LinkChange::Link(p) => Some(p),
        LinkChange::Replace { link, .. } => Some(&**link),
        LinkChange::Keep | LinkChange::Remove(_) => None,
    }
}

/// Creates the item for `crm_id`, unless an earlier try created it (stamped) or, for a meeting,
/// the attendee's copy is already there (same GOID): then that item is brought to `fields`.
fn create_in_outlook<M: Mailbox>(
    mailbox: &mut M,
    action: &Action,
    crm_id: CrmId,
    fields: &crate::fields::Fields,
    goid_search: Option<&crate::ids::GlobalObjectId>,
) -> Result<Applied, Failure> {
    // A retried create finds its earlier effect: an item already stamped with `crm_id`. With a
    // GOID to search, it is looked for first (the search must not find, and link, another item
    // when this one exists); without, the create itself refuses with that item's id, which
    // spares a lookup on every create.
    let found = match goid_search {
        None => None,
        Some(goid) => match mailbox.find_by_stamp(crm_id)? {
            Some(entry) => Some(entry),
            None if mutant::active(Mutant::SkipGoidSearch) => None,
            None => mailbox.find_by_goid(goid)?,
        },
    };
    let entry_id = match found {
        Some(entry) => entry,
        None => {
            let link = pending(&action.link);
            let synced = synced_base(action, None).unwrap_or_else(|| SyncBase {
                fields: fields.clone(),
                crm_version: None,
                role: Role::Owner,
                pending: None,
            });
            let created = mailbox.create(NewItem {
                object_type: action.object_type,
                fields: fields.clone(),
                goid: link.and_then(|l| l.goid.clone()).filter(|_| action.object_type.is_calendar()),
                status: link.map_or(crate::change::ActivityStatus::Open, |l| l.status),
                stamp: crm_id,
                synced,
            });
            match created {
                Ok(entry_id) => return Ok(Applied { entry_id: Some(entry_id), crm_version: None }),
                Err(MailboxError::StampTaken { entry_id, .. }) => entry_id,
                Err(e) => return Err(e.into()),
            }
        }
    };
    // An item already there (stamped by an earlier try, or found by GOID): bring it up to date.
    if let Some(item) = mailbox.get(&entry_id)? {
        let patch = FieldPatch::between(&item.fields, fields);
        if !patch.is_empty() {
            mailbox.update(&entry_id, &patch)?;
        }
    }
    relink(mailbox, &entry_id, crm_id, synced_base(action, None))?;
    Ok(Applied { entry_id: Some(entry_id), crm_version: None })
}

/// The base an applied action agrees on, to keep on the item: the pending link's, with the
/// CRM version the write returned.
fn synced_base(action: &Action, version: Option<crate::ids::VersionNumber>) -> Option<SyncBase> {
    pending(&action.link).map(|p| SyncBase {
        fields: p.base.clone(),
        crm_version: p.crm_version.max(version),
        role: p.role,
        pending: None,
    })
}

/// Makes sure the item carries `crm_id` (a link, a re-created record) and, when the action
/// agrees on one, the new base; an item deleted since is fine: the mapping's next run sees the
/// delete.
fn relink<M: Mailbox>(
    mailbox: &mut M,
    entry_id: &EntryId,
    crm_id: CrmId,
    base: Option<SyncBase>,
) -> Result<(), Failure> {
    match base {
        Some(base) => match mailbox.link(entry_id, crm_id, base) {
            Ok(()) | Err(MailboxError::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        },
        None => match mailbox.get(entry_id)? {
            Some(item) if item.stamp() == Some(crm_id) => Ok(()),
            Some(_) => Ok(mailbox.set_stamp(entry_id, Some(crm_id))?),
            None => Ok(()),
        },
    }
}

fn count(report: &mut RunReport, action: &Action, outcome: &Outcome) {
    let counts = report.by_entity.entry(action.object_type).or_default();
    match outcome {
        Outcome::Failed(_) => counts.failed += 1,
        Outcome::FailedIgnored(_) => counts.ignored += 1,
        Outcome::Applied(_) => {
            match &action.op {
                ActionOp::CreateInOutlook { .. } | ActionOp::CreateInCrm { .. } => counts.created += 1,
                ActionOp::Update { .. } => counts.updated += 1,
                ActionOp::DeleteInOutlook { .. } | ActionOp::DeleteInCrm { .. } => counts.deleted += 1,
                ActionOp::Untrack { .. } => counts.untracked += 1,
                ActionOp::Drop { .. } | ActionOp::Reject { .. } => counts.unchanged += 1,
            }
            if !action.conflicts.is_empty() {
                counts.merged_conflicts += 1;
            }
        }
    }
}

/// Desynchronise: removes the subscription on the server and forgets the cache's queue,
/// mapping and ignored errors. Every Outlook item and every CRM record stays where it is.
pub fn unlink<S: CrmService>(
    server: &mut S,
    cache: &mut SyncCache,
    subscription: SubscriptionId,
) -> Result<(), EngineError> {
    match server.unregister_client(subscription) {
        // Already gone (a cleanup removed it): the cache is still to be forgotten.
        Ok(()) | Err(ServerError::UnknownSubscription(_)) => {}
        Err(other) => return Err(other.into()),
    }
    cache.clear()?;
    Ok(())
}
