//! Settling (DOMAIN section 4 steps 5 and 7): what the queue, the mapping and the ignored errors
//! become once an action's outcome is known. Pure: `settle(state, &action, outcome) -> state'`.
//!
//! - success: the action's queue entries leave the queue and the mapping changes as the action
//!   says (insert/update with the new base, re-point, or remove), in one step;
//! - failure: the entries stay, each with one more attempt and the error;
//! - failure with "ignore all errors": the entries move to `IgnoredErrors` with the error.
//!
//! Settling the same success twice equals settling it once.
//!
//! [`settle_all`] settles a whole plan in one call, equal to folding [`settle`] over its actions
//! (property-tested): it works on the state in place and moves each action's link into the
//! mapping instead of cloning it, for a run that settles every action at once.

use serde::{Deserialize, Serialize};

use crate::change::RecordKey;
use crate::ids::{CrmId, EntryId, VersionNumber};
use crate::mapping::{Mapping, MappingEntry};
use crate::plan::{Action, ActionOp, LinkChange, PendingLink, Plan, SlotHint};
use crate::queue::{Queue, QueueEntry, QueueId, clip_error};

/// The client's sync state as a value: the queue, the mapping and the ignored errors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    pub queue: Queue,
    pub mapping: Mapping,
    /// Changes the user chose to ignore, with their error, oldest first: in queue order (by
    /// `QueueId`), as the cache's `IgnoredErrors` table lists them, whatever order they failed in.
    pub ignored: Vec<IgnoredError>,
}

/// A change that failed while "ignore all errors" was chosen. Kept so a report can show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IgnoredError {
    pub entry: QueueEntry,
    pub error: String,
}

/// What kind of failure an item met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ItemErrorKind {
    /// The side refused the item (validation, permissions).
    Rejected,
    /// The item was locked (open in an editor, in use).
    Locked,
    /// The side could not be reached.
    Unavailable,
    /// The plan refused the record's changes (see `RecordError`).
    Invalid,
    /// The record changed in CRM, or was deleted there, since the version the merge started
    /// from: nothing was written, the record as it is now (or its delete) is queued, and the
    /// next run merges it (never ignored: it is no error, only a write that waits for a merge).
    ChangedSince,
}

/// Why applying one action failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct ItemError {
    pub kind: ItemErrorKind,
    pub message: String,
}

impl ItemError {
    pub fn new(kind: ItemErrorKind, message: impl Into<String>) -> Self {
        ItemError { kind, message: message.into() }
    }
}

/// What the engine learned by applying an action successfully.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The Outlook item an action created or found (required when the action's link waits for
    /// it: a create in Outlook).
    pub entry_id: Option<EntryId>,
    /// The `VersionNumber` the server gave the engine's own write, so its echo is recognised as
    /// stale.
    pub crm_version: Option<VersionNumber>,
}

/// The outcome of applying one action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Applied(Applied),
    /// Failed; the entries stay queued for the next run.
    Failed(ItemError),
    /// Failed while the user chose "ignore all errors"; the entries move to `IgnoredErrors`.
    FailedIgnored(ItemError),
}

/// Settles one action's outcome. See the module doc.
pub fn settle(mut state: SyncState, action: &Action, outcome: Outcome) -> SyncState {
    let link = Link::Borrowed(&action.link);
    settle_in_place(&mut state, &action.op, link, &action.consumed, action.slot, outcome);
    state.queue.sweep_if_sparse();
    state
}

/// Settles every action of `plan` in order, each with the outcome `outcome_of` gives for it.
///
/// Equal to `plan.actions.iter().fold(state, |s, a| settle(s, a, outcome_of(a)))`, without moving
/// the state per action or cloning the links: the plan is consumed.
pub fn settle_all(
    mut state: SyncState,
    plan: Plan,
    mut outcome_of: impl FnMut(&Action) -> Outcome,
) -> SyncState {
    let mut actions = plan.actions.into_iter();
    loop {
        // Settling an action writes the counts of shared blocks (a queue entry's fields, the pair's
        // old base, the ids) that were last touched long ago; each such write waits for its line,
        // one at a time. Asking for the lines of the actions a little ahead overlaps those waits.
        let ahead = actions.as_slice();
        if let Some(next) = ahead.get(PREFETCH_SLOTS) {
            prefetch_slots(&state, next);
        }
        if let Some(next) = ahead.get(PREFETCH_BLOCKS) {
            prefetch_blocks(&state, next);
        }
        if let Some(next) = ahead.get(PREFETCH_BUCKETS) {
            prefetch_buckets(&state.mapping, next);
        }
        let Some(action) = actions.next() else { break };
        let outcome = outcome_of(&action);
        let Action { op, link, consumed, slot, .. } = action;
        settle_in_place(&mut state, &op, Link::Owned(link), &consumed, slot, outcome);
    }
    // Once, after the whole plan: sweeping along the way would leave gaps in the ids, and every
    // later id would then be found by bisection instead of at its offset.
    state.queue.sweep_if_sparse();
    state
}

/// How many actions ahead `settle_all` asks for an action's queue slots, mapping slot and the
/// blocks its op holds, then (nearer) for the blocks those slots point to, and then (nearer still)
/// for the mapping's index buckets a new or removed pair reads and writes.
const PREFETCH_SLOTS: usize = 16;
const PREFETCH_BLOCKS: usize = 8;
const PREFETCH_BUCKETS: usize = 4;

/// The slots settling `action` reads and writes, and the counts of the blocks its op drops.
fn prefetch_slots(state: &SyncState, action: &Action) {
    for id in action.consumed.iter() {
        state.queue.prefetch(*id);
    }
    if let Some(slot) = action.slot.get() {
        state.mapping.prefetch_slot(slot);
    }
    match &action.op {
        ActionOp::Update { entry_id, to_crm, to_outlook, .. } => {
            entry_id.prefetch();
            to_crm.prefetch();
            to_outlook.prefetch();
        }
        ActionOp::CreateInOutlook { fields, .. } => fields.prefetch(),
        ActionOp::CreateInCrm { entry_id, fields, .. } => {
            entry_id.prefetch();
            fields.prefetch();
        }
        _ => {}
    }
    // A new pair's GOID, hashed when its bucket is asked for.
    if let (LinkChange::Link(link), None) = (&action.link, action.slot.get()) {
        if let Some(goid) = &link.goid {
            goid.prefetch();
        }
    }
}

/// The counts of the blocks the slots of `action` hold (read from the slots `prefetch_slots` asked
/// for earlier): the queued changes' fields and keys, the pair's base and item.
fn prefetch_blocks(state: &SyncState, action: &Action) {
    for id in action.consumed.iter() {
        if let Some(entry) = state.queue.get(*id) {
            if let Some(record) = entry.change.record() {
                record.fields.prefetch();
                if let Some(goid) = &record.goid {
                    goid.prefetch();
                }
            }
            if let RecordKey::Outlook(key) = entry.change.key() {
                key.prefetch();
            }
        }
    }
    if let Some(pair) = action.slot.get().and_then(|slot| state.mapping.at_slot(slot)) {
        pair.base.prefetch();
        pair.entry_id.prefetch();
        if let Some(goid) = &pair.goid {
            goid.prefetch();
        }
    }
}

/// The index buckets settling `action` reads and writes: a new pair's, or a removed pair's
/// (hashing the ids whose text `prefetch_slots` and `prefetch_blocks` asked for). A pair
/// updated where it sits touches none.
fn prefetch_buckets(mapping: &Mapping, action: &Action) {
    match (&action.link, action.slot.get()) {
        (LinkChange::Link(link), None) => {
            mapping.prefetch_buckets(link.crm_id, link.entry_id.as_ref(), link.goid.as_ref());
        }
        (LinkChange::Remove(crm_id), Some(slot)) => {
            if let Some(pair) = mapping.at_slot(slot) {
                mapping.prefetch_buckets(*crm_id, Some(&pair.entry_id), pair.goid.as_ref());
            }
        }
        _ => {}
    }
}

/// An action's link, borrowed from an action that stays (`settle`) or moved out of a consumed plan
/// (`settle_all`).
enum Link<'a> {
    Borrowed(&'a LinkChange),
    Owned(LinkChange),
}

fn settle_in_place(
    state: &mut SyncState,
    op: &ActionOp,
    link: Link<'_>,
    consumed: &[QueueId],
    slot: SlotHint,
    outcome: Outcome,
) {
    let outcome = match (outcome, op) {
        // A rejected record cannot succeed: whatever the engine says, it stays with its error.
        (Outcome::Applied(_), ActionOp::Reject { error }) => {
            Outcome::Failed(ItemError::new(ItemErrorKind::Invalid, error.to_string()))
        }
        (outcome, _) => outcome,
    };
    match outcome {
        Outcome::Applied(applied) => match resolve(link, &applied) {
            Ok(link) => {
                for id in consumed {
                    state.queue.discard(*id);
                }
                apply_link(&mut state.mapping, link, slot);
            }
            Err(error) => fail(state, consumed, &error, false),
        },
        Outcome::Failed(error) => fail(state, consumed, &error, false),
        Outcome::FailedIgnored(error) => fail(state, consumed, &error, true),
    }
}

/// The mapping change with the created item's id filled in from the outcome.
enum Resolved {
    Keep,
    Link(MappingEntry),
    Remove(crate::ids::CrmId),
    Replace(crate::ids::CrmId, MappingEntry),
}

fn resolve(link: Link<'_>, applied: &Applied) -> Result<Resolved, ItemError> {
    let finish = |entry: Option<MappingEntry>, crm_id: CrmId| -> Result<MappingEntry, ItemError> {
        let mut entry = entry.ok_or_else(|| {
            let text = format!("success reported for {crm_id} without the Outlook item's EntryId");
            ItemError::new(ItemErrorKind::Invalid, text)
        })?;
        entry.crm_version = entry.crm_version.max(applied.crm_version);
        Ok(entry)
    };
    let found = applied.entry_id.as_ref();
    let borrowed = |p: &PendingLink| finish(p.resolve(found), p.crm_id);
    let owned = |p: PendingLink| {
        let crm_id = p.crm_id;
        finish(p.into_resolved(found), crm_id)
    };
    Ok(match link {
        Link::Borrowed(LinkChange::Keep) | Link::Owned(LinkChange::Keep) => Resolved::Keep,
        Link::Borrowed(LinkChange::Remove(id)) => Resolved::Remove(*id),
        Link::Owned(LinkChange::Remove(id)) => Resolved::Remove(id),
        Link::Borrowed(LinkChange::Link(p)) => Resolved::Link(borrowed(p)?),
        Link::Owned(LinkChange::Link(p)) => Resolved::Link(owned(p)?),
        Link::Borrowed(LinkChange::Replace { remove, link }) => Resolved::Replace(*remove, borrowed(link)?),
        Link::Owned(LinkChange::Replace { remove, link }) => Resolved::Replace(remove, owned(*link)?),
    })
}

fn apply_link(mapping: &mut Mapping, link: Resolved, slot: SlotHint) {
    match link {
        Resolved::Keep => {}
        Resolved::Link(entry) => {
            mapping.link_at(slot.get(), entry);
        }
        Resolved::Remove(crm_id) => {
            mapping.remove(crm_id);
        }
        Resolved::Replace(old, entry) => {
            mapping.remove(old);
            mapping.link(entry);
        }
    }
}

fn fail(state: &mut SyncState, consumed: &[QueueId], error: &ItemError, ignore: bool) {
    let text = clip_error(&error.to_string());
    for id in consumed {
        let Some(entry) = state.queue.get_mut(*id) else { continue };
        entry.attempts = entry.attempts.saturating_add(1);
        entry.last_error = Some(text.clone());
        if ignore {
            if let Some(entry) = state.queue.remove(*id) {
                let at = state.ignored.partition_point(|i| i.entry.id < entry.id);
                state.ignored.insert(at, IgnoredError { entry, error: text.clone() });
            }
        }
    }
}
