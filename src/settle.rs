//! Settling (DOMAIN section 4 steps 5 and 7): what the queue, the mapping and the ignored errors
//! become once an action's outcome is known. Pure: `settle(state, &action, outcome) -> state'`.
//!
//! - success: the action's queue entries leave the queue and the mapping changes as the action
//!   says (insert/update with the new base, re-point, or remove), in one step;
//! - failure: the entries stay, each with one more attempt and the error;
//! - failure with "ignore all errors": the entries move to `IgnoredErrors` with the error.
//!
//! Settling the same success twice equals settling it once.

use serde::{Deserialize, Serialize};

use crate::ids::{EntryId, VersionNumber};
use crate::mapping::{Mapping, MappingEntry};
use crate::plan::{Action, ActionOp, LinkChange, PendingLink};
use crate::queue::{Queue, QueueEntry, QueueId, clip_error};

/// The client's sync state as a value: the queue, the mapping and the ignored errors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    pub queue: Queue,
    pub mapping: Mapping,
    /// Changes the user chose to ignore, with their error, oldest first.
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
    let outcome = match (outcome, &action.op) {
        // A rejected record cannot succeed: whatever the engine says, it stays with its error.
        (Outcome::Applied(_), ActionOp::Reject { error }) => {
            Outcome::Failed(ItemError::new(ItemErrorKind::Invalid, error.to_string()))
        }
        (outcome, _) => outcome,
    };
    match outcome {
        Outcome::Applied(applied) => match resolve(&action.link, &applied) {
            Ok(link) => {
                for id in &action.consumed {
                    state.queue.remove(*id);
                }
                apply_link(&mut state.mapping, link);
            }
            Err(error) => fail(&mut state, &action.consumed, &error, false),
        },
        Outcome::Failed(error) => fail(&mut state, &action.consumed, &error, false),
        Outcome::FailedIgnored(error) => fail(&mut state, &action.consumed, &error, true),
    }
    state
}

/// The mapping change with the created item's id filled in from the outcome.
enum Resolved {
    Keep,
    Link(MappingEntry),
    Remove(crate::ids::CrmId),
    Replace(crate::ids::CrmId, MappingEntry),
}

fn resolve(link: &LinkChange, applied: &Applied) -> Result<Resolved, ItemError> {
    let entry = |p: &PendingLink| -> Result<MappingEntry, ItemError> {
        let mut entry = p.resolve(applied.entry_id.as_ref()).ok_or_else(|| {
            let text = format!("success reported for {} without the Outlook item's EntryId", p.crm_id);
            ItemError::new(ItemErrorKind::Invalid, text)
        })?;
        entry.crm_version = entry.crm_version.max(applied.crm_version);
        Ok(entry)
    };
    Ok(match link {
        LinkChange::Keep => Resolved::Keep,
        LinkChange::Link(p) => Resolved::Link(entry(p)?),
        LinkChange::Remove(id) => Resolved::Remove(*id),
        LinkChange::Replace { remove, link } => Resolved::Replace(*remove, entry(link)?),
    })
}

fn apply_link(mapping: &mut Mapping, link: Resolved) {
    match link {
        Resolved::Keep => {}
        Resolved::Link(entry) => {
            mapping.link(entry);
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
                state.ignored.push(IgnoredError { entry, error: text.clone() });
            }
        }
    }
}
