//! Planning (DOMAIN section 4 step 4 and section 5): a pure function of (queue, mapping,
//! policies) that groups the queue by record, coalesces each side, and decides one `Action` per
//! record from the decision table.
//!
//! Architecture invariant: `plan` touches no IO, reads no clock and draws no randomness; its output
//! depends only on its arguments, never on the order of the queue or of any hash map. Every queue
//! entry is consumed by exactly one action, so settling every action empties the queue.
//!
//! A record whose changes are invalid (a change after a delete, two entity types for one key, an
//! email, a duplicate meeting) becomes a `Reject` action: it stays queued with its error and never
//! blocks the other records. Only a run-wide condition (the mass-delete guard) fails the plan.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::change::{ChangeKind, ChangeStamp, DeleteReason, Record, RecordKey, Side};
use crate::entity::{EntityGroup, ObjectTypeCode};
use crate::fields::{FieldNames, FieldPatch, Fields, FieldsError};
use crate::ids::{CrmId, EntryId, GlobalObjectId, VersionNumber};
use crate::index::IdMap;
use crate::mapping::{Mapping, MappingEntry};
use crate::merge::merge;
use crate::policy::{Policies, UpdateVsDeletePolicy};
use crate::queue::{CoalesceError, Coalesced, Net, Queue, QueueEntry, QueueIds, coalesce};

/// The row of the decision table (DOMAIN section 5) that chose an action, named
/// `server change / Outlook change / mapping`. Rows past the table are the documented policies
/// for the cases it leaves open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DecisionRow {
    /// create/update | none | none: GOID search for appointments, else create in Outlook, map.
    CrmChangeUnmapped,
    /// create/update | none | present: update the Outlook item.
    CrmChangeMapped,
    /// delete (or left the filter) | none | present: `CrmDeletePolicy`.
    CrmDeleteMapped,
    /// delete | none | none: nothing; a delete for a record this client never held.
    CrmDeleteUnmapped,
    /// none | create | none: create in CRM with the client-chosen `CrmId`, map.
    OutlookChangeUnmapped,
    /// none | update | present: update the CRM record.
    OutlookChangeMapped,
    /// none | delete | present: `OutlookDeletePolicy`.
    OutlookDeleteMapped,
    /// update | update | present: three-way field merge.
    BothUpdated,
    /// update | delete | present (either way round): `UpdateVsDeletePolicy`.
    UpdateVsDelete,
    /// delete | delete | present: drop the mapping, no other write.
    BothDeleted,
    /// create | create | none, joined by GOID or by the stamped `CrmId`: link, merge with an
    /// empty base.
    BothCreatedLinked,
    /// Policy: none | delete | none: an untracked item was deleted; nothing to do.
    OutlookDeleteUnmapped,
    /// Policy: every change of the record was no change (echo, stale, created and deleted
    /// before it was ever synced, an Outlook edit of a CRM-to-Outlook-only entity).
    NoChange,
    /// Invalid input for this record; it stays queued with the error.
    Invalid,
}

impl DecisionRow {
    /// The row as the decision table writes it.
    pub fn label(self) -> &'static str {
        match self {
            DecisionRow::CrmChangeUnmapped => "create/update | none | none",
            DecisionRow::CrmChangeMapped => "create/update | none | present",
            DecisionRow::CrmDeleteMapped => "delete | none | present",
            DecisionRow::CrmDeleteUnmapped => "delete | none | none",
            DecisionRow::OutlookChangeUnmapped => "none | create | none",
            DecisionRow::OutlookChangeMapped => "none | update | present",
            DecisionRow::OutlookDeleteMapped => "none | delete | present",
            DecisionRow::BothUpdated => "update | update | present",
            DecisionRow::UpdateVsDelete => "update | delete | present",
            DecisionRow::BothDeleted => "delete | delete | present",
            DecisionRow::BothCreatedLinked => "create | create | none",
            DecisionRow::OutlookDeleteUnmapped => "none | delete | none",
            DecisionRow::NoChange => "no change",
            DecisionRow::Invalid => "invalid",
        }
    }
}

/// Why an action writes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DropReason {
    /// The update equals the mapping's base (a re-save, or the echo of the engine's own write).
    Echo,
    /// A CRM change at or below the version the mapping already agrees with (late or repeated).
    Stale,
    /// Created and deleted before it was ever synced.
    NeverSynced,
    /// A delete of a record or item this client does not hold.
    NotHeld,
    /// An Outlook edit of an entity that syncs CRM -> Outlook only; the next CRM change
    /// overwrites it.
    OneWayEntity,
}

/// The IO an action asks for. The engine performs it through the side's adapter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionOp {
    /// Create an Outlook item stamped with `crm_id`. First look for an item already stamped with
    /// it (a retried create finds its earlier effect); for an appointment with a GOID, then search
    /// the mailbox by GOID and link a hit instead of creating (writing `fields` over it).
    CreateInOutlook {
        crm_id: CrmId,
        fields: Fields,
        goid_search: Option<GlobalObjectId>,
    },
    /// Create the CRM record `crm_id` (the client-chosen id; a retry with the same id and fields
    /// is a success) and stamp the Outlook item `entry_id` with it, writing `to_outlook` to the
    /// item in the same write (empty but for a record brought back by update-wins-over-delete
    /// with CRM values the item lacks).
    CreateInCrm {
        crm_id: CrmId,
        entry_id: EntryId,
        fields: Fields,
        to_outlook: FieldPatch,
    },
    /// Write the patches (an empty one writes nothing) and stamp the item with `crm_id`.
    Update {
        crm_id: CrmId,
        entry_id: EntryId,
        to_crm: FieldPatch,
        to_outlook: FieldPatch,
    },
    DeleteInOutlook {
        crm_id: CrmId,
        entry_id: EntryId,
    },
    DeleteInCrm {
        crm_id: CrmId,
        entry_id: EntryId,
    },
    /// Stop tracking the pair: both copies stay; the item loses its stamp.
    Untrack {
        crm_id: CrmId,
        entry_id: EntryId,
    },
    /// Nothing to write; settle only removes the queue entries.
    Drop {
        why: DropReason,
    },
    /// Invalid input: settled as a failure carrying the error.
    Reject {
        error: RecordError,
    },
}

/// A mapping entry an action will insert; `entry_id` is `None` when the Outlook item is only
/// known once the action ran (a create in Outlook), and then comes from the outcome.
pub type PendingLink = MappingEntry<Option<EntryId>>;

/// What the mapping becomes when an action succeeds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkChange {
    Keep,
    /// Insert or update this pair (re-pointing the `CrmId` when the item is new).
    Link(PendingLink),
    Remove(CrmId),
    /// Remove the old pair, link the new one (a CRM record re-created under a new id).
    Replace {
        remove: CrmId,
        /// Boxed: a re-create is rare, and every action would otherwise carry room for it.
        link: Box<PendingLink>,
    },
}

/// Where an action sits in the run: by change kind, then change timestamp, ties broken by key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ActionOrder {
    pub kind: ChangeKind,
    pub stamp: ChangeStamp,
    pub key: RecordKey,
}

/// One decision: the IO to perform, what the mapping becomes on success, and the queue entries
/// it settles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    pub order: ActionOrder,
    pub object_type: ObjectTypeCode,
    pub row: DecisionRow,
    pub op: ActionOp,
    pub link: LinkChange,
    /// Fields changed on both sides and settled by `FieldConflictPolicy`.
    pub conflicts: FieldNames,
    /// The queue entries this action settles, in id order.
    pub consumed: QueueIds,
    /// Where the record's pair sat in the mapping when planned, so settling finds it without a
    /// lookup (checked before use; not part of the decision).
    #[serde(skip)]
    pub(crate) slot: SlotHint,
}

/// A mapping slot remembered by the plan for settling. Only a hint: settling checks that the slot
/// still holds the pair before using it, so it never changes an outcome, and two actions that
/// differ only in their hints are equal.
///
/// Held as the slot plus one, so that an action carries it in 4 bytes (a mapping holds fewer than
/// 2^32 - 1 pairs, so the sum never overflows).
#[derive(Clone, Copy, Default)]
pub(crate) struct SlotHint(Option<std::num::NonZeroU32>);

impl SlotHint {
    pub(crate) fn new(slot: Option<u32>) -> Self {
        SlotHint(slot.and_then(|slot| std::num::NonZeroU32::new(slot.wrapping_add(1))))
    }

    pub(crate) fn get(self) -> Option<u32> {
        self.0.map(|n| n.get() - 1)
    }
}

impl PartialEq for SlotHint {
    fn eq(&self, _: &SlotHint) -> bool {
        true
    }
}

impl Eq for SlotHint {}

impl fmt::Debug for SlotHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SlotHint")
    }
}

/// Why one record's changes were refused. The record stays queued with this error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Coalesce(#[from] CoalesceError),
    #[error("{key}: {object_type} is tracked, not synchronised by this process")]
    NotSynchronised { key: RecordKey, object_type: ObjectTypeCode },
    #[error("{key}: a {object_type} syncs CRM -> Outlook only; it cannot be created in Outlook")]
    OneWayEntity { key: RecordKey, object_type: ObjectTypeCode },
    #[error("{key}: the CRM side has it as a {crm}, the Outlook side as a {outlook}")]
    TypeMismatch { key: RecordKey, crm: ObjectTypeCode, outlook: ObjectTypeCode },
    #[error("{key}: meeting {goid} is already synced as {holder}")]
    DuplicateGoid { key: RecordKey, goid: GlobalObjectId, holder: CrmId },
    #[error("{entry_id} is stamped with {crm_id}, which is mapped to another item {holder}")]
    StampTaken { entry_id: EntryId, crm_id: CrmId, holder: EntryId },
    #[error("{entry_id} is stamped with {crm_id}, which another change of this run already uses")]
    StampInUse { entry_id: EntryId, crm_id: CrmId },
    #[error("{key}: the merged record is too large: {error}")]
    Fields { key: RecordKey, error: FieldsError },
    #[error("{entry_id}: an untracked item's change carries no CrmId to create it under")]
    MissingCrmId { entry_id: EntryId },
}

/// Why a whole plan was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "this run would delete {deletes} of the {mapped} mapped records in {side} \
         (more than {percent_max}%); confirm to go on"
    )]
    MassDelete { side: Side, deletes: usize, mapped: usize, percent_max: u8 },
}

/// The ordered actions of one sync run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub actions: Vec<Action>,
}

/// Plans one sync run. See the module doc for the guarantees.
pub fn plan(queue: &Queue, mapping: &Mapping, policies: &Policies) -> Result<Plan, PlanError> {
    let mut planner = Planner {
        mapping,
        policies,
        claimed_goids: IdMap::default(),
        run_crm_ids: Vec::new(),
        created_in_crm: IdMap::default(),
        claims: Vec::new(),
    };
    let mut grouping = planner.group(queue);
    planner.run_crm_ids = std::mem::take(&mut grouping.run_ids);
    let run_order = grouping.run_order();
    let actions = planner.decide_all(grouping, &run_order);
    check_mass_delete(&actions, mapping, policies)?;
    Ok(Plan { actions })
}

fn check_mass_delete(actions: &[Action], mapping: &Mapping, policies: &Policies) -> Result<(), PlanError> {
    let (mut in_outlook, mut in_crm) = (0, 0);
    for action in actions {
        match action.op {
            ActionOp::DeleteInOutlook { .. } => in_outlook += 1,
            ActionOp::DeleteInCrm { .. } => in_crm += 1,
            _ => {}
        }
    }
    let guard = policies.mass_delete;
    for (side, deletes) in [(Side::Outlook, in_outlook), (Side::Crm, in_crm)] {
        if guard.trips(deletes, mapping.len()) {
            return Err(PlanError::MassDelete {
                side,
                deletes,
                mapped: mapping.len(),
                percent_max: guard.percent_max,
            });
        }
    }
    Ok(())
}

/// The changes of one record from both sides, joined, with its mapping.
struct Group<'m> {
    crm: Option<Coalesced<'m>>,
    outlook: Option<Coalesced<'m>>,
    mapped: Option<&'m MappingEntry>,
    /// The mapping slot of `mapped`.
    slot: SlotHint,
    /// Set when a side's changes could not be coalesced: the whole record is rejected.
    error: Option<Box<(ActionOrder, ObjectTypeCode, CoalesceError)>>,
    /// Every queue entry of the record, in id order.
    consumed: QueueIds,
    /// For an unmapped item whose change carries a `CrmId`: what `Grouping::join_unmapped`
    /// found out about that id, so `create_in_crm` need not look again.
    stamp: Option<StampLookup<'m>>,
}

/// Where the `CrmId` stamped on an unmapped item stands.
#[derive(Clone, Copy)]
struct StampLookup<'m> {
    /// The pair that holds the id, if one does.
    holder: Option<&'m MappingEntry>,
    /// Whether a record with changes in this run has the id.
    in_run: bool,
}

impl<'m> Group<'m> {
    /// What the group's action is ordered by (`ActionOrder`, borrowing the key): a rejected
    /// record's first failing side's first entry, else the CRM side's net change, else the Outlook
    /// side's. `None` for a group with nothing left (an item joined to a record).
    fn order_parts(&self) -> Option<(ChangeKind, ChangeStamp, &RecordKey)> {
        if let Some(error) = &self.error {
            let order = &error.0;
            return Some((order.kind, order.stamp, &order.key));
        }
        let primary = self.crm.as_ref().or(self.outlook.as_ref())?;
        Some((primary.net.kind(), primary.stamp, primary.key))
    }

    fn new(
        crm: &[&'m QueueEntry],
        outlook: &[&'m QueueEntry],
        mapped: Option<(u32, &'m MappingEntry)>,
    ) -> Self {
        let (slot, mapped) = (SlotHint::new(mapped.map(|m| m.0)), mapped.map(|m| m.1));
        let mut group = Group {
            crm: None,
            outlook: None,
            mapped,
            slot,
            error: None,
            consumed: QueueIds::new(),
            stamp: None,
        };
        for side in [crm, outlook] {
            if side.is_empty() {
                continue;
            }
            match coalesce(side) {
                Ok(mut net) => {
                    // The first side's ids become the group's without a copy.
                    if group.consumed.is_empty() {
                        group.consumed = std::mem::take(&mut net.consumed);
                    } else {
                        group.consumed.append(&mut net.consumed);
                        group.consumed.sort_unstable();
                    }
                    match net.key.side() {
                        Side::Crm => group.crm = Some(net),
                        Side::Outlook => group.outlook = Some(net),
                    }
                }
                Err(error) => {
                    let head = &side[0].change;
                    let order =
                        ActionOrder { kind: head.kind(), stamp: head.stamp(), key: head.key().clone() };
                    group.error.get_or_insert(Box::new((order, head.object_type(), error)));
                }
            }
        }
        if group.error.is_some() {
            group.consumed = crm.iter().chain(outlook).map(|e| e.id).collect();
            group.consumed.sort_unstable();
        }
        group
    }
}

/// One record's entries in `Grouping::by_record`: CRM entries from `start`, Outlook entries from
/// `outlook`, up to `end`.
struct Run {
    start: u32,
    outlook: u32,
    end: u32,
}

/// An entry of `Grouping::by_record`: its record's `CrmId` (as a number), its side, the entry.
type Keyed<'m> = (u128, Side, &'m QueueEntry);

impl Run {
    /// The run's entries in `by_record`, both sides.
    fn all<'a, 'm>(&self, by_record: &'a [Keyed<'m>]) -> &'a [Keyed<'m>] {
        &by_record[self.start as usize..self.end as usize]
    }

    /// The run's CRM entries.
    fn crm<'a, 'm>(&self, by_record: &'a [Keyed<'m>]) -> &'a [Keyed<'m>] {
        &by_record[self.start as usize..self.outlook as usize]
    }

    /// The run's Outlook entries.
    fn outlook<'a, 'm>(&self, by_record: &'a [Keyed<'m>]) -> &'a [Keyed<'m>] {
        &by_record[self.outlook as usize..self.end as usize]
    }

    /// Asks for the changes of the run's queue entries.
    fn prefetch_changes(&self, by_record: &[Keyed<'_>]) {
        for e in self.all(by_record) {
            crate::prefetch::value(&e.2.change);
        }
    }
}

/// The queue entries of some entries of `by_record`.
fn entries<'a, 'm>(keyed: &'a [Keyed<'m>]) -> impl Iterator<Item = &'m QueueEntry> + 'a {
    keyed.iter().map(|e| e.2)
}

/// The queue grouped by record, before the records' sides are coalesced.
struct Grouping<'m> {
    /// Entries of records keyed by `CrmId`, sorted by (record, side, queue id).
    by_record: Vec<Keyed<'m>>,
    runs: Vec<Run>,
    /// Each run's `CrmId`, in one vector of their own (bisected when joining).
    run_ids: Vec<CrmId>,
    /// Each run's mapping entry.
    mapped: Vec<Option<u32>>,
    /// Unmapped items, coalesced, in `EntryId` order.
    items: Vec<Group<'m>>,
    /// Items joined to a record (by run), moved out of `items`.
    joined: IdMap<usize, (Coalesced<'m>, QueueIds)>,
}

impl<'m> Grouping<'m> {
    /// The CRM side of run `r` coalesced, when it is a new server record: not mapped, no Outlook
    /// side, valid, and not joined yet.
    fn new_record(&self, r: usize) -> Option<Coalesced<'m>> {
        if !self.may_be_new(r) || self.joined.contains_key(&r) {
            return None;
        }
        let crm: Vec<&QueueEntry> = entries(self.runs[r].crm(&self.by_record)).collect();
        coalesce(&crm).ok()
    }

    /// Whether run `r` may be a new server record: not mapped and with no Outlook side (read off
    /// the run alone; `new_record` checks the rest).
    fn may_be_new(&self, r: usize) -> bool {
        self.mapped[r].is_none() && self.runs[r].outlook == self.runs[r].end
    }

    /// Joins each unmapped item to the record of a new server record: by the `CrmId` stamped on
    /// the item, else, for a new meeting, by GOID. A joined item's side moves into `joined`.
    fn join_unmapped(&mut self, mapping: &'m Mapping) {
        let join = |joined: &mut IdMap<_, _>, r: usize, item: &mut Group<'m>| {
            if let Some(net) = item.outlook.take() {
                joined.insert(r, (net, std::mem::take(&mut item.consumed)));
            }
        };
        // Stamps first: an item stamped with a record's id is that record, whatever its GOID.
        // Items in stamp order (then item order, so of two items with one stamp the first is
        // joined), walked along the records' ids in one pass instead of a bisection each.
        let mut stamped: Vec<(CrmId, usize)> = (self.items.iter().enumerate())
            .filter_map(|(i, item)| {
                item.outlook.as_ref().and_then(|o| o.net.record().and(o.crm_id)).map(|s| (s, i))
            })
            .collect();
        stamped.sort_unstable();
        let mut r = 0;
        for (stamp, i) in stamped {
            while self.run_ids.get(r).is_some_and(|id| *id < stamp) {
                r += 1;
            }
            let lookup =
                StampLookup { holder: mapping.get(stamp), in_run: self.run_ids.get(r) == Some(&stamp) };
            self.items[i].stamp = Some(lookup);
            if lookup.holder.is_some() {
                continue; // a copy of a held item: refused in `create_in_crm`
            }
            if lookup.in_run && self.new_record(r).is_some() {
                join(&mut self.joined, r, &mut self.items[i]);
            }
        }
        // Then new meetings by GOID, among the records still unjoined: the first record (in key
        // order) of each meeting an unjoined new item is.
        let goid_of = |item: &Group<'m>| match item.outlook.as_ref().map(|o| &o.net) {
            Some(Net::Create(record)) => record.goid.clone(),
            _ => None,
        };
        let wanted: IdMap<GlobalObjectId, ()> =
            self.items.iter().filter_map(goid_of).map(|g| (g, ())).collect();
        if wanted.is_empty() {
            return;
        }
        // The records that may be new server records, listed first so that the changes and GOIDs
        // of those a little ahead can be asked for while one is read.
        let maybe_new: Vec<usize> = (0..self.runs.len()).filter(|&r| self.may_be_new(r)).collect();
        let goids = |r: usize| {
            entries(self.runs[r].crm(&self.by_record)).filter_map(|e| e.change.record()?.goid.as_ref())
        };
        let mut new_meetings: IdMap<GlobalObjectId, usize> = IdMap::default();
        for (k, &r) in maybe_new.iter().enumerate() {
            if let Some(&ahead) = maybe_new.get(k + PREFETCH_ENTRIES) {
                self.runs[ahead].prefetch_changes(&self.by_record);
            }
            if let Some(&ahead) = maybe_new.get(k + PREFETCH_BLOCKS) {
                goids(ahead).for_each(GlobalObjectId::prefetch);
            }
            // Only a record one of whose changes carries a wanted GOID can have it as its net.
            if !goids(r).any(|g| wanted.contains_key(g)) {
                continue;
            }
            let Some(net) = self.new_record(r) else { continue };
            if let Some(goid) = net.net.record().and_then(|rec| rec.goid.as_ref()) {
                new_meetings.entry(goid.clone()).or_insert(r);
            }
        }
        for i in 0..self.items.len() {
            let Some(goid) = goid_of(&self.items[i]) else { continue };
            let Some(&r) = new_meetings.get(&goid) else { continue };
            if self.new_record(r).is_some() {
                join(&mut self.joined, r, &mut self.items[i]);
            }
        }
    }
}

/// How many bits of a run-order key hold the record's index (a queue holds at most 16M entries,
/// so at most as many records).
const INDEX_BITS: u32 = 31;

/// A record's place in the run as one number: kind: 2 bits | side of the stamp: 1 bit | seconds
/// or version: 64 bits | nanoseconds: 30 bits | record index: 31 bits. Ordered as `ActionOrder`
/// up to the key, except for two Outlook times inside one leap second (nanoseconds past
/// 2^30 - 1 the number cannot hold), which tie and are then ordered in full.
fn packed_order(kind: ChangeKind, stamp: ChangeStamp, index: usize) -> u128 {
    debug_assert!(index < 1 << INDEX_BITS);
    let (side, high, nanos) = match stamp {
        ChangeStamp::Crm(v) => (0u128, v.0, 0u32),
        ChangeStamp::Outlook(t) => {
            (1, (t.timestamp() as u64) ^ (1 << 63), t.timestamp_subsec_nanos().min((1 << 30) - 1))
        }
    };
    ((kind as u128) << 95 | side << 94 | (high as u128) << 30 | nanos as u128) << INDEX_BITS | index as u128
}

impl<'m> Grouping<'m> {
    /// The records in run order (`ActionOrder`), each named by its index: `r` for run `r`,
    /// `runs.len() + k` for item `k` (items with nothing left, joined to a record, are left out).
    ///
    /// Found before deciding, so the actions are made in the order they run and never moved:
    /// a record's order depends only on its coalesced sides, not on the decision. Sorts one
    /// number per record (`packed_order`), then the rare ties of that number by the full order.
    fn run_order(&self) -> Vec<u32> {
        let mut keys: Vec<u128> = Vec::with_capacity(self.runs.len() + self.items.len());
        for r in 0..PREFETCH_ENTRIES {
            self.prefetch_heads(r);
        }
        for r in 0..self.runs.len() {
            self.prefetch_heads(r + PREFETCH_ENTRIES);
            keys.push(self.run_order_parts(r, |kind, stamp, _| packed_order(kind, stamp, r)));
        }
        for (k, item) in self.items.iter().enumerate() {
            if let Some((kind, stamp, _)) = item.order_parts() {
                keys.push(packed_order(kind, stamp, self.runs.len() + k));
            }
        }
        keys.sort_unstable();
        let index = |key: u128| (key & ((1 << INDEX_BITS) - 1)) as usize;
        for tie in keys.chunk_by_mut(|a, b| a >> INDEX_BITS == b >> INDEX_BITS).filter(|tie| tie.len() > 1) {
            // Two records never share a key, so their full orders differ.
            let mut full: Vec<(ActionOrder, u128)> =
                tie.iter().map(|&key| (self.order_of(index(key)), key)).collect();
            full.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for (slot, (_, key)) in tie.iter_mut().zip(full) {
                *slot = key;
            }
        }
        keys.into_iter().map(|key| index(key) as u32).collect()
    }

    /// Asks for the queue entries of run `r`, whose heads `run_order_parts` reads.
    fn prefetch_heads(&self, r: usize) {
        if let Some(run) = self.runs.get(r) {
            run.prefetch_changes(&self.by_record);
        }
    }

    /// Calls `f` with what run `r`'s action is ordered by (`Group::order_parts`). A run whose
    /// sides hold one change each at most needs no coalescing: its net change is that change.
    fn run_order_parts<R>(&self, r: usize, f: impl FnOnce(ChangeKind, ChangeStamp, &RecordKey) -> R) -> R {
        let run = &self.runs[r];
        let (crm, outlook) = (run.outlook - run.start, run.end - run.outlook);
        if crm <= 1 && outlook <= 1 {
            let head = &self.by_record[run.start as usize].2.change;
            return f(head.kind(), head.stamp(), head.key());
        }
        let side = |keyed| -> Vec<&QueueEntry> { entries(keyed).collect() };
        let group = Group::new(&side(run.crm(&self.by_record)), &side(run.outlook(&self.by_record)), None);
        let (kind, stamp, key) = group.order_parts().expect("a run has at least one change");
        f(kind, stamp, key)
    }

    /// The full order of record `i` (see `run_order`).
    fn order_of(&self, i: usize) -> ActionOrder {
        let order = |kind, stamp, key: &RecordKey| ActionOrder { kind, stamp, key: key.clone() };
        match i.checked_sub(self.runs.len()) {
            None => self.run_order_parts(i, order),
            Some(k) => {
                let (kind, stamp, key) =
                    self.items[k].order_parts().expect("only items with a change are ordered");
                order(kind, stamp, key)
            }
        }
    }
}

/// How many records ahead `decide_all` asks for a record's run (and, nearer, its entries in
/// `by_record`), its queue entries and pair, and (nearer still) for the field blocks they point to.
const PREFETCH_RUNS: usize = 48;
const PREFETCH_RUN_ENTRIES: usize = 32;
const PREFETCH_ENTRIES: usize = 16;
const PREFETCH_BLOCKS: usize = 8;

struct Planner<'m> {
    mapping: &'m Mapping,
    policies: &'m Policies,
    /// GOIDs of meetings this plan creates or links, so no two end in two items.
    claimed_goids: IdMap<GlobalObjectId, CrmId>,
    /// The `CrmId`s of the records with changes in this run, sorted.
    run_crm_ids: Vec<CrmId>,
    /// The `CrmId`s this plan creates in CRM for Outlook items.
    created_in_crm: IdMap<CrmId, ()>,
    /// The claims the record being decided makes (see `Claim`), in the order it makes them, each
    /// with the record's key when it is not its action's (see `Planner::claim`).
    claims: Vec<(Claim, Option<RecordKey>)>,
}

/// A claim a record's decision makes on what two records of one run must not share. Records are
/// decided in run order, but a claim goes to the first record in key order (`CrmId`, then
/// `EntryId`), whatever the run order: so a decision is made as if its claims hold, and the
/// claims are settled afterwards in key order (`Planner::settle_claims`), turning the action of
/// a record that loses one into the rejection it would have been.
enum Claim {
    /// The record's Outlook item is created in CRM under this id.
    CreateInCrm(CrmId),
    /// The meeting is synced as this record.
    Goid(GlobalObjectId, CrmId),
}

/// A claim of the record with index `record` (in key order; see `Grouping::run_order`), whose
/// action sits at `position` in the plan; `key` is the record's key when it is not the action's.
struct PlacedClaim {
    record: u32,
    position: u32,
    claim: Claim,
    key: Option<RecordKey>,
}

impl<'m> Planner<'m> {
    /// Groups the queue by record; each record's sides are coalesced later, one record at a time.
    ///
    /// CRM entries, and Outlook entries of mapped items, are keyed by `CrmId`, so one sort brings
    /// both sides of a held record together. Outlook entries of unmapped items are keyed by
    /// `EntryId`, then joined to a new server record by the `CrmId` stamped on them, else (a new
    /// meeting) by GOID. Records come in `CrmId` order, then unmapped items in `EntryId` order,
    /// so later steps never depend on the queue's order.
    fn group(&self, queue: &'m Queue) -> Grouping<'m> {
        let mut by_record: Vec<Keyed<'m>> = Vec::with_capacity(queue.len());
        let mut unmapped: Vec<&QueueEntry> = Vec::new();
        // In id order, so a stable sort by (record, side) leaves each side in id order.
        let (mut items, mut keys): (Vec<&'m QueueEntry>, Vec<&EntryId>) = (Vec::new(), Vec::new());
        for entry in queue.iter() {
            match entry.change.key() {
                RecordKey::Crm(id) => by_record.push((id.as_u128(), Side::Crm, entry)),
                RecordKey::Outlook(entry_id) => {
                    items.push(entry);
                    keys.push(entry_id);
                }
            }
        }
        // The items' pairs, looked up in one batch that asks for its lines ahead.
        for (entry, crm_id) in items.into_iter().zip(self.mapping.crm_ids_of(&keys)) {
            match crm_id {
                Some(id) => by_record.push((id.as_u128(), Side::Outlook, entry)),
                None => unmapped.push(entry),
            }
        }
        by_record.sort_by_key(|&(record, side, _)| (record, side));
        unmapped.sort_unstable_by(|a, b| a.change.key().cmp(b.change.key()).then(a.id.cmp(&b.id)));

        let mut runs: Vec<Run> = Vec::with_capacity(by_record.len());
        let mut start = 0;
        for run in by_record.chunk_by(|a, b| a.0 == b.0) {
            let outlook = run.iter().position(|e| e.1 == Side::Outlook).unwrap_or(run.len());
            runs.push(Run {
                start: start as u32,
                outlook: (start + outlook) as u32,
                end: (start + run.len()) as u32,
            });
            start += run.len();
        }
        let run_ids: Vec<CrmId> =
            runs.iter().map(|run| CrmId::from_u128(by_record[run.start as usize].0)).collect();
        // The runs' pairs, looked up in one batch that asks for each bucket and pair ahead (the
        // pair, read to confirm the lookup, is read again when the record is decided).
        let mapped = self.mapping.slots_of(&run_ids);
        // Sized first: a group is large, and a vector grown by doubling would copy them all.
        let mut items = Vec::with_capacity(unmapped.len());
        items.extend(
            unmapped.chunk_by(|a, b| a.change.key() == b.change.key()).map(|run| Group::new(&[], run, None)),
        );
        let mut grouping = Grouping { by_record, runs, run_ids, mapped, items, joined: IdMap::default() };
        grouping.join_unmapped(self.mapping);
        grouping
    }

    /// Decides every record and every unjoined item, in run order (`run_order`, from
    /// `Grouping::run_order`), then settles the claims they made in key order.
    fn decide_all(&mut self, grouping: Grouping<'m>, run_order: &[u32]) -> Vec<Action> {
        let Grouping { by_record, runs, mapped, items, mut joined, .. } = grouping;
        let mapping = self.mapping;
        let mut items: Vec<Option<Group<'m>>> = items.into_iter().map(Some).collect();
        let mut actions = Vec::with_capacity(run_order.len());
        let mut claims: Vec<PlacedClaim> = Vec::new();
        let (mut crm, mut outlook): (Vec<&QueueEntry>, Vec<&QueueEntry>) = (Vec::new(), Vec::new());
        // Deciding a record reads its run, its queue entries, its pair, and the field blocks both
        // point to, all last touched long ago and, in run order, far apart: ask for those of the
        // records a little ahead (first the runs, then the entries and pairs they name, then,
        // nearer, the blocks those point to).
        let run_at = |j: usize| run_order.get(j).map(|&i| i as usize).filter(|&i| i < runs.len());
        let prefetch_runs = |j: usize| {
            let Some(r) = run_at(j) else { return };
            crate::prefetch::value(&runs[r]);
            crate::prefetch::value(&mapped[r]);
        };
        let prefetch_runs_entries = |j: usize| {
            let Some(r) = run_at(j) else { return };
            let run = &runs[r];
            crate::prefetch::line(&by_record[run.start as usize]);
            crate::prefetch::line(&by_record[run.end as usize - 1]);
        };
        let prefetch_entries = |j: usize| {
            let Some(r) = run_at(j) else { return };
            runs[r].prefetch_changes(&by_record);
            if let Some(slot) = mapped[r] {
                mapping.prefetch_slot(slot);
            }
        };
        let prefetch_blocks = |j: usize| {
            let Some(r) = run_at(j) else { return };
            for e in entries(runs[r].all(&by_record)) {
                if let Some(record) = e.change.record() {
                    record.fields.prefetch_all();
                }
                if let RecordKey::Outlook(key) = e.change.key() {
                    key.prefetch();
                }
            }
            if let Some(pair) = mapped[r].and_then(|slot| mapping.at_slot(slot)) {
                pair.base.prefetch_all();
                pair.entry_id.prefetch();
                if let Some(goid) = &pair.goid {
                    goid.prefetch();
                }
            }
        };
        for j in 0..PREFETCH_RUNS {
            prefetch_runs(j);
        }
        for j in 0..PREFETCH_RUN_ENTRIES {
            prefetch_runs_entries(j);
        }
        for j in 0..PREFETCH_ENTRIES {
            prefetch_entries(j);
        }
        for j in 0..PREFETCH_BLOCKS {
            prefetch_blocks(j);
        }
        for (j, &i) in run_order.iter().enumerate() {
            prefetch_runs(j + PREFETCH_RUNS);
            prefetch_runs_entries(j + PREFETCH_RUN_ENTRIES);
            prefetch_entries(j + PREFETCH_ENTRIES);
            prefetch_blocks(j + PREFETCH_BLOCKS);
            let r = i as usize;
            let group = match r.checked_sub(runs.len()) {
                None => {
                    let run = &runs[r];
                    crm.clear();
                    crm.extend(entries(run.crm(&by_record)));
                    outlook.clear();
                    outlook.extend(entries(run.outlook(&by_record)));
                    let pair = mapped[r].and_then(|slot| Some((slot, mapping.at_slot(slot)?)));
                    let mut group = Group::new(&crm, &outlook, pair);
                    let joined_side = if joined.is_empty() { None } else { joined.remove(&r) };
                    if let Some((net, mut consumed)) = joined_side {
                        group.outlook = Some(net);
                        group.consumed.append(&mut consumed);
                        group.consumed.sort_unstable();
                    }
                    group
                }
                Some(k) => items[k].take().expect("each item is ordered once"),
            };
            debug_assert!(group.order_parts().is_some(), "only records with a change are ordered");
            let position = actions.len() as u32;
            // Decided straight into its place: an action is large, and a copy of each adds up.
            actions.push(self.decide(group));
            claims.extend(self.claims.drain(..).map(|(claim, key)| PlacedClaim {
                record: i,
                position,
                claim,
                key,
            }));
        }
        self.settle_claims(&mut actions, claims);
        actions
    }

    /// Settles the claims the decisions made, in key order, as deciding the records in key order
    /// would have: a record's claims in the order it made them, none after one it loses; the
    /// action of a record that loses one becomes its rejection.
    fn settle_claims(&mut self, actions: &mut [Action], mut claims: Vec<PlacedClaim>) {
        // Stable: a record's claims stay in the order it made them.
        claims.sort_by_key(|c| c.record);
        let mut lost: Option<u32> = None;
        for PlacedClaim { record, position, claim, key } in claims {
            if lost == Some(record) {
                continue;
            }
            let action = &mut actions[position as usize];
            let key = || key.unwrap_or_else(|| action.order.key.clone());
            let refused = match claim {
                Claim::CreateInCrm(crm_id) => match self.created_in_crm.insert(crm_id, ()) {
                    Some(()) => match key() {
                        RecordKey::Outlook(entry_id) => Some(RecordError::StampInUse { entry_id, crm_id }),
                        RecordKey::Crm(_) => unreachable!("an item created in CRM is keyed by its EntryId"),
                    },
                    None => None,
                },
                Claim::Goid(goid, crm_id) => match self.claim_goid(&goid, crm_id) {
                    Err(holder) => Some(RecordError::DuplicateGoid { key: key(), goid, holder }),
                    Ok(()) => None,
                },
            };
            if let Some(error) = refused {
                lost = Some(record);
                *action = reject(action.order.clone(), action.object_type, action.consumed.clone(), error);
            }
        }
    }

    fn decide(&mut self, group: Group<'m>) -> Action {
        let Group { crm, outlook, mapped, slot, error, consumed, stamp } = group;
        if let Some((order, object_type, error)) = error.map(|e| *e) {
            return reject(order, object_type, consumed, error.into());
        }
        let primary = crm.as_ref().or(outlook.as_ref()).expect("a group has at least one side");
        // As `Group::order_parts`, which `Grouping::run_order` sorted the records by.
        let order = ActionOrder { kind: primary.net.kind(), stamp: primary.stamp, key: primary.key.clone() };
        let object_type = primary.object_type;
        let ctx = Ctx { order, object_type, consumed, slot };

        if let (Some(c), Some(o)) = (&crm, &outlook) {
            if c.object_type != o.object_type {
                let error = RecordError::TypeMismatch {
                    key: c.key.clone(),
                    crm: c.object_type,
                    outlook: o.object_type,
                };
                return ctx.reject(error);
            }
        }
        if let Some(m) = mapped {
            if m.object_type != object_type {
                let (crm_t, outlook_t) =
                    if crm.is_some() { (object_type, m.object_type) } else { (m.object_type, object_type) };
                let error =
                    RecordError::TypeMismatch { key: primary.key.clone(), crm: crm_t, outlook: outlook_t };
                return ctx.reject(error);
            }
        }
        if object_type.group() == EntityGroup::NotSynchronised {
            return ctx.reject(RecordError::NotSynchronised { key: primary.key.clone(), object_type });
        }

        let mut dropped = None;
        let crm_side = crm.as_ref().and_then(|c| self.normalise(c, mapped, Side::Crm, &mut dropped));
        let outlook_side = match &outlook {
            Some(o) if !object_type.syncs_outlook_to_crm() => match &o.net {
                Net::Create(_) => {
                    return ctx.reject(RecordError::OneWayEntity { key: o.key.clone(), object_type });
                }
                Net::Update(_) => {
                    dropped = Some(DropReason::OneWayEntity);
                    None
                }
                _ => self.normalise(o, mapped, Side::Outlook, &mut dropped),
            },
            Some(o) => self.normalise(o, mapped, Side::Outlook, &mut dropped),
            None => None,
        };
        let entry_id_of = |o: &Option<Coalesced>| match o.as_ref().map(|o| &o.key) {
            Some(RecordKey::Outlook(e)) => Some(e.clone()),
            _ => None,
        };

        use Upsert::*;
        match (crm_side, outlook_side, mapped) {
            (None, None, mapped) => {
                let why = dropped.unwrap_or(DropReason::NotHeld);
                // A CRM change dropped as an echo of the base still says a newer version holds
                // that base: the pair (and the item's copy of the base) moves to it. Kept
                // behind, the next write to CRM would be made over a version CRM has left, and
                // a new primary reading the item's base would merge against an older one (found
                // by crmsync-sim, seed 587: the base had taken a write whose answer was lost).
                let echoed = match (&crm, mapped) {
                    (Some(c), Some(m)) if crm_version(&crm) > m.crm_version => c.net.record().map(|r| (m, r)),
                    _ => None,
                };
                let link = match echoed {
                    Some((m, r)) => LinkChange::Link(pending(
                        m.crm_id,
                        Some(m.entry_id.clone()),
                        object_type,
                        m.base.clone(),
                        Some(r),
                        None,
                        m,
                        crm_version(&crm),
                    )),
                    None => LinkChange::Keep,
                };
                ctx.act(DecisionRow::NoChange, ActionOp::Drop { why }, link, FieldNames::default())
            }
            (Some(Write(c)), None, None) => self.create_in_outlook(ctx, &crm, c),
            (Some(Write(c)), None, Some(m)) => {
                self.update(ctx, DecisionRow::CrmChangeMapped, m, Some(c), None, crm_version(&crm))
            }
            (Some(Gone(_)), None, Some(m)) => self.crm_delete(ctx, DecisionRow::CrmDeleteMapped, m),
            (Some(Gone(_)), None, None) => ctx.act(
                DecisionRow::CrmDeleteUnmapped,
                ActionOp::Drop { why: DropReason::NotHeld },
                LinkChange::Keep,
                FieldNames::default(),
            ),
            (None, Some(Write(o)), None) => {
                let entry_id = entry_id_of(&outlook).expect("an Outlook net is keyed by EntryId");
                self.create_in_crm(ctx, entry_id, o, outlook.as_ref().and_then(|o| o.crm_id), stamp)
            }
            (None, Some(Write(o)), Some(m)) => {
                // A CRM change dropped as an echo still says which version holds the base:
                // the write to CRM is made over that version.
                let known = m.crm_version.max(crm_version(&crm));
                self.update(ctx, DecisionRow::OutlookChangeMapped, m, None, Some(o), known)
            }
            (None, Some(Gone(_)), Some(m)) => self.outlook_delete(ctx, DecisionRow::OutlookDeleteMapped, m),
            (None, Some(Gone(_)), None) => ctx.act(
                DecisionRow::OutlookDeleteUnmapped,
                ActionOp::Drop { why: DropReason::NotHeld },
                LinkChange::Keep,
                FieldNames::default(),
            ),
            (Some(Write(c)), Some(Write(o)), Some(m)) => {
                self.update(ctx, DecisionRow::BothUpdated, m, Some(c), Some(o), crm_version(&crm))
            }
            (Some(Write(c)), Some(Write(o)), None) => {
                let entry_id = entry_id_of(&outlook).expect("an Outlook net is keyed by EntryId");
                self.link_new(ctx, entry_id, c, o, crm_version(&crm))
            }
            (Some(Write(c)), Some(Gone(_)), Some(m)) => match self.policies.update_vs_delete {
                UpdateVsDeletePolicy::UpdateWins => {
                    let merged = merged_or_reject!(
                        ctx,
                        merge(&m.base, Some(&c.fields), None, object_type, self.policies)
                    );
                    let op = ActionOp::CreateInOutlook {
                        crm_id: m.crm_id,
                        fields: merged.fields.clone(),
                        goid_search: None,
                    };
                    let link = pending(
                        m.crm_id,
                        None,
                        object_type,
                        merged.fields,
                        Some(c),
                        None,
                        m,
                        crm_version(&crm),
                    );
                    ctx.act(DecisionRow::UpdateVsDelete, op, LinkChange::Link(link), FieldNames::default())
                }
                UpdateVsDeletePolicy::DeleteWins => self.outlook_delete(ctx, DecisionRow::UpdateVsDelete, m),
            },
            (Some(Gone(reason)), Some(Write(o)), Some(m)) => match (reason, self.policies.update_vs_delete) {
                // The record still exists in CRM, out of this user's filter: both copies stay,
                // the edited item untracked, so neither the edit nor the record is lost.
                (DeleteReason::LeftFilter, _) => ctx.act(
                    DecisionRow::UpdateVsDelete,
                    ActionOp::Untrack { crm_id: m.crm_id, entry_id: m.entry_id.clone() },
                    LinkChange::Remove(m.crm_id),
                    FieldNames::default(),
                ),
                (DeleteReason::Deleted, UpdateVsDeletePolicy::UpdateWins) => {
                    let last = written_before_delete(&crm, m);
                    let merged = merged_or_reject!(
                        ctx,
                        merge(&m.base, last, Some(&o.fields), object_type, self.policies)
                    );
                    let new_id = m.crm_id.successor();
                    let op = ActionOp::CreateInCrm {
                        crm_id: new_id,
                        entry_id: m.entry_id.clone(),
                        fields: merged.fields.clone(),
                        to_outlook: merged.to_outlook,
                    };
                    // A new record: the old record's versions say nothing about it.
                    let link = PendingLink {
                        crm_version: None,
                        ..pending(
                            new_id,
                            Some(m.entry_id.clone()),
                            object_type,
                            merged.fields,
                            None,
                            Some(o),
                            m,
                            None,
                        )
                    };
                    ctx.act(
                        DecisionRow::UpdateVsDelete,
                        op,
                        LinkChange::Replace { remove: m.crm_id, link: Box::new(link) },
                        merged.conflicts,
                    )
                }
                (DeleteReason::Deleted, UpdateVsDeletePolicy::DeleteWins) => {
                    self.crm_delete(ctx, DecisionRow::UpdateVsDelete, m)
                }
            },
            (Some(Gone(_)), Some(Gone(_)), Some(m)) => ctx.act(
                DecisionRow::BothDeleted,
                ActionOp::Untrack { crm_id: m.crm_id, entry_id: m.entry_id.clone() },
                LinkChange::Remove(m.crm_id),
                FieldNames::default(),
            ),
            // Joined by the stamp: the record was deleted in CRM before the item created for it
            // was ever mapped. The item stays, untracked.
            (Some(Gone(_)), Some(Write(_)), None) => {
                let crm_id = crm.as_ref().map(|c| crm_id_key(c.key)).expect("CRM side present");
                let entry_id = entry_id_of(&outlook).expect("Outlook side present");
                ctx.act(
                    DecisionRow::CrmDeleteUnmapped,
                    ActionOp::Untrack { crm_id, entry_id },
                    LinkChange::Keep,
                    FieldNames::default(),
                )
            }
            // Unmapped Outlook deletes are never joined, so these cannot meet; treat the CRM side
            // alone, consuming both.
            (Some(Write(c)), Some(Gone(_)), None) => self.create_in_outlook(ctx, &crm, c),
            (Some(Gone(_)), Some(Gone(_)), None) => ctx.act(
                DecisionRow::CrmDeleteUnmapped,
                ActionOp::Drop { why: DropReason::NotHeld },
                LinkChange::Keep,
                FieldNames::default(),
            ),
        }
    }

    /// Reduces one side's net change against the mapping: drops echoes and stale changes, turns a
    /// create of a held record into an update and a created-then-deleted held record into a delete.
    fn normalise<'c>(
        &self,
        net: &'c Coalesced,
        mapped: Option<&MappingEntry>,
        side: Side,
        dropped: &mut Option<DropReason>,
    ) -> Option<Upsert<'c>> {
        let mut drop = |why| {
            dropped.get_or_insert(why);
            None
        };
        match (&net.net, mapped) {
            (Net::Delete(why), _) => Some(Upsert::Gone(*why)),
            (Net::CreatedThenDeleted(why), Some(_)) => Some(Upsert::Gone(*why)),
            (Net::CreatedThenDeleted(_), None) => drop(DropReason::NeverSynced),
            (Net::Create(r) | Net::Update(r), None) => Some(Upsert::Write(r)),
            (Net::Create(r) | Net::Update(r), Some(m)) => {
                if let (ChangeStamp::Crm(v), Some(agreed)) = (net.stamp, m.crm_version) {
                    if v <= agreed {
                        return drop(DropReason::Stale);
                    }
                }
                if self.is_echo(&r.fields, m, side) {
                    return drop(DropReason::Echo);
                }
                Some(Upsert::Write(r))
            }
        }
    }

    /// Whether every field that flows out of `side` equals the base: the change changes nothing
    /// the other side would receive.
    fn is_echo(&self, fields: &Fields, m: &MappingEntry, side: Side) -> bool {
        let dirs = &self.policies.field_directions;
        if dirs.all_two_way(m.object_type) {
            return fields == &m.base;
        }
        let flows = |name: &str| {
            let d = dirs.get(m.object_type, name);
            match side {
                Side::Crm => d.flows_to_outlook(),
                Side::Outlook => d.flows_to_crm(),
            }
        };
        fields.filtered(flows) == m.base.filtered(flows)
    }

    fn create_in_outlook(&mut self, ctx: Ctx, crm: &Option<Coalesced>, record: &Record) -> Action {
        let crm_id = crm.as_ref().map(|c| crm_id_key(c.key)).expect("CRM side present");
        self.claim_goid_for(&ctx, record.goid.as_ref(), crm_id, &RecordKey::Crm(crm_id));
        let merged = merged_or_reject!(
            ctx,
            merge(&Fields::empty(), Some(&record.fields), None, ctx.object_type, self.policies)
        );
        let goid_search = record.goid.clone().filter(|_| ctx.object_type.is_calendar());
        let op = ActionOp::CreateInOutlook { crm_id, fields: merged.fields.clone(), goid_search };
        let link = PendingLink {
            crm_id,
            entry_id: None,
            object_type: ctx.object_type,
            base: merged.fields,
            goid: record.goid.clone(),
            role: record.role,
            status: record.status,
            crm_version: crm_version(crm),
        };
        ctx.act(DecisionRow::CrmChangeUnmapped, op, LinkChange::Link(link), FieldNames::default())
    }

    fn create_in_crm(
        &mut self,
        ctx: Ctx,
        entry_id: EntryId,
        record: &Record,
        stamp: Option<CrmId>,
        looked_up: Option<StampLookup<'m>>,
    ) -> Action {
        let Some(crm_id) = stamp else {
            return ctx.reject(RecordError::MissingCrmId { entry_id });
        };
        let StampLookup { holder, in_run } = looked_up.unwrap_or_else(|| StampLookup {
            holder: self.mapping.get(crm_id),
            in_run: self.run_crm_ids.binary_search(&crm_id).is_ok(),
        });
        if let Some(holder) = holder {
            let holder = holder.entry_id.clone();
            return ctx.reject(RecordError::StampTaken { entry_id, crm_id, holder });
        }
        // The id belongs to a record with changes in this run, or another item of this run is
        // created under it: creating it again would give one CrmId two records or two items.
        if in_run {
            return ctx.reject(RecordError::StampInUse { entry_id, crm_id });
        }
        let key = RecordKey::Outlook(entry_id);
        self.claim(&ctx, Claim::CreateInCrm(crm_id), &key);
        self.claim_goid_for(&ctx, record.goid.as_ref(), crm_id, &key);
        let RecordKey::Outlook(entry_id) = key else { unreachable!("made above") };
        let merged = merged_or_reject!(
            ctx,
            merge(&Fields::empty(), None, Some(&record.fields), ctx.object_type, self.policies)
        );
        let op = ActionOp::CreateInCrm {
            crm_id,
            entry_id: entry_id.clone(),
            fields: merged.fields.clone(),
            to_outlook: FieldPatch::default(),
        };
        let link = PendingLink {
            crm_id,
            entry_id: Some(entry_id),
            object_type: ctx.object_type,
            base: merged.fields,
            goid: record.goid.clone(),
            role: record.role,
            status: record.status,
            crm_version: None,
        };
        ctx.act(DecisionRow::OutlookChangeUnmapped, op, LinkChange::Link(link), FieldNames::default())
    }

    /// The create/create row: a new server record and a new Outlook item that are the same record
    /// (same GOID, or the item carries the record's stamp). Link them, merging with an empty base.
    fn link_new(
        &mut self,
        ctx: Ctx,
        entry_id: EntryId,
        crm: &Record,
        outlook: &Record,
        version: Option<VersionNumber>,
    ) -> Action {
        let RecordKey::Crm(crm_id) = ctx.order.key else {
            unreachable!("a joined group is keyed by its CRM side")
        };
        let goid = crm.goid.clone().or_else(|| outlook.goid.clone());
        self.claim_goid_for(&ctx, goid.as_ref(), crm_id, &RecordKey::Crm(crm_id));
        let merged = merged_or_reject!(
            ctx,
            merge(&Fields::empty(), Some(&crm.fields), Some(&outlook.fields), ctx.object_type, self.policies)
        );
        let conflicts = merged.conflicts;
        let op = ActionOp::Update {
            crm_id,
            entry_id: entry_id.clone(),
            to_crm: merged.to_crm,
            to_outlook: merged.to_outlook,
        };
        let link = PendingLink {
            crm_id,
            entry_id: Some(entry_id),
            object_type: ctx.object_type,
            base: merged.fields,
            goid,
            role: crm.role,
            status: crm.status,
            crm_version: version,
        };
        ctx.act(DecisionRow::BothCreatedLinked, op, LinkChange::Link(link), conflicts)
    }

    fn update(
        &mut self,
        ctx: Ctx,
        row: DecisionRow,
        m: &MappingEntry,
        crm: Option<&Record>,
        outlook: Option<&Record>,
        version: Option<VersionNumber>,
    ) -> Action {
        let merged = merged_or_reject!(
            ctx,
            merge(
                &m.base,
                crm.map(|r| &r.fields),
                outlook.map(|r| &r.fields),
                ctx.object_type,
                self.policies,
            )
        );
        let conflicts = merged.conflicts;
        let op = ActionOp::Update {
            crm_id: m.crm_id,
            entry_id: m.entry_id.clone(),
            to_crm: merged.to_crm,
            to_outlook: merged.to_outlook,
        };
        let link = pending(
            m.crm_id,
            Some(m.entry_id.clone()),
            ctx.object_type,
            merged.fields,
            crm,
            outlook,
            m,
            version,
        );
        ctx.act(row, op, LinkChange::Link(link), conflicts)
    }

    fn crm_delete(&self, ctx: Ctx, row: DecisionRow, m: &MappingEntry) -> Action {
        let (crm_id, entry_id) = (m.crm_id, m.entry_id.clone());
        let op = if self.policies.crm_delete.rule(ctx.object_type).carries(m.role, m.status) {
            ActionOp::DeleteInOutlook { crm_id, entry_id }
        } else {
            ActionOp::Untrack { crm_id, entry_id }
        };
        ctx.act(row, op, LinkChange::Remove(crm_id), FieldNames::default())
    }

    fn outlook_delete(&self, ctx: Ctx, row: DecisionRow, m: &MappingEntry) -> Action {
        let (crm_id, entry_id) = (m.crm_id, m.entry_id.clone());
        let op = if self.policies.outlook_delete.rule(ctx.object_type).carries(m.role, m.status) {
            ActionOp::DeleteInCrm { crm_id, entry_id }
        } else {
            ActionOp::Untrack { crm_id, entry_id }
        };
        ctx.act(row, op, LinkChange::Remove(crm_id), FieldNames::default())
    }

    /// Claims a meeting's GOID (if any) for `crm_id`, for the record `key` (settled later, in
    /// key order: `settle_claims`; a record that loses it gets its `DuplicateGoid` error).
    fn claim_goid_for(&mut self, ctx: &Ctx, goid: Option<&GlobalObjectId>, crm_id: CrmId, key: &RecordKey) {
        if let Some(goid) = goid {
            self.claim(ctx, Claim::Goid(goid.clone(), crm_id), key);
        }
    }

    /// Makes a claim for the record `key` (named in the error if the claim is lost), settled later
    /// (`settle_claims`). The key is kept only when it is not the action's own, which it always
    /// is but for a record no claim can be lost by: keeping it would cost a count on a shared
    /// string, and then, long after, another one to drop it.
    fn claim(&mut self, ctx: &Ctx, claim: Claim, key: &RecordKey) {
        let key = (*key != ctx.order.key).then(|| key.clone());
        self.claims.push((claim, key));
    }

    /// Claims a meeting's GOID for `crm_id`; fails with the holder when another record already
    /// holds it, in the mapping or earlier in this plan.
    fn claim_goid(&mut self, goid: &GlobalObjectId, crm_id: CrmId) -> Result<(), CrmId> {
        if let Some(holder) = self.mapping.crm_id_of_goid(goid) {
            if holder != crm_id {
                return Err(holder);
            }
        }
        match self.claimed_goids.get(goid) {
            // Claimed earlier in this plan by another record of the same meeting.
            Some(holder) if *holder != crm_id => Err(*holder),
            Some(_) => Ok(()),
            None => {
                self.claimed_goids.insert(goid.clone(), crm_id);
                Ok(())
            }
        }
    }
}

/// Unwraps a merge, or rejects the record when its merged fields pass a limit.
macro_rules! merged_or_reject {
    ($ctx:expr, $merge:expr) => {
        match $merge {
            Ok(merged) => merged,
            Err(error) => {
                let key = $ctx.order.key.clone();
                return $ctx.reject(RecordError::Fields { key, error });
            }
        }
    };
}
use merged_or_reject;

/// One side's change after normalising: something to write, or a delete.
enum Upsert<'c> {
    Write(&'c Record),
    Gone(DeleteReason),
}

/// What every action of one group shares.
struct Ctx {
    order: ActionOrder,
    object_type: ObjectTypeCode,
    consumed: QueueIds,
    slot: SlotHint,
}

impl Ctx {
    fn act(self, row: DecisionRow, op: ActionOp, link: LinkChange, conflicts: FieldNames) -> Action {
        Action {
            order: self.order,
            object_type: self.object_type,
            row,
            op,
            link,
            conflicts,
            consumed: self.consumed,
            slot: self.slot,
        }
    }

    fn reject(self, error: RecordError) -> Action {
        reject(self.order, self.object_type, self.consumed, error)
    }
}

fn reject(order: ActionOrder, object_type: ObjectTypeCode, consumed: QueueIds, error: RecordError) -> Action {
    Action {
        order,
        object_type,
        row: DecisionRow::Invalid,
        op: ActionOp::Reject { error },
        link: LinkChange::Keep,
        conflicts: FieldNames::default(),
        consumed,
        slot: SlotHint::default(),
    }
}

fn crm_id_key(key: &RecordKey) -> CrmId {
    match key {
        RecordKey::Crm(id) => *id,
        RecordKey::Outlook(_) => unreachable!("a CRM net is keyed by CrmId"),
    }
}

fn crm_version(crm: &Option<Coalesced>) -> Option<VersionNumber> {
    match crm.as_ref()?.stamp {
        ChangeStamp::Crm(v) => Some(v),
        ChangeStamp::Outlook(_) => None,
    }
}

/// What CRM held when a held record was deleted there, if it had changed since the pair's base
/// (a version newer than the pair's): update wins over the delete with the record's latest
/// values, merged with the item's edit like any update, so a CRM edit made before the delete
/// is not lost to the base (found by crmsync-sim, seed 853).
fn written_before_delete<'q>(crm: &Option<Coalesced<'q>>, m: &MappingEntry) -> Option<&'q Fields> {
    match crm.as_ref()?.before_delete? {
        (ChangeStamp::Crm(v), record) if Some(v) > m.crm_version => Some(&record.fields),
        _ => None,
    }
}

/// The mapping entry after a change of a held pair: the new base; the role from CRM (which
/// knows ownership and attendance); the status from the side that changed, CRM first; the newest
/// CRM version.
#[allow(clippy::too_many_arguments)]
fn pending(
    crm_id: CrmId,
    entry_id: Option<EntryId>,
    object_type: ObjectTypeCode,
    base: Fields,
    crm: Option<&Record>,
    outlook: Option<&Record>,
    m: &MappingEntry,
    version: Option<VersionNumber>,
) -> PendingLink {
    PendingLink {
        crm_id,
        entry_id,
        object_type,
        base,
        goid: m.goid.clone(),
        role: crm.map_or(m.role, |r| r.role),
        status: crm.or(outlook).map_or(m.status, |r| r.status),
        crm_version: version.max(m.crm_version),
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<String> = self.consumed.iter().map(|id| id.to_string()).collect();
        writeln!(f, "[{}] {} {} ({})", self.row.label(), self.object_type, self.order.key, ids.join(" "))?;
        match &self.op {
            ActionOp::CreateInOutlook { crm_id, fields, goid_search } => {
                if let Some(goid) = goid_search {
                    writeln!(f, "  search Outlook for meeting {goid}; link a hit, else")?;
                }
                writeln!(f, "  create in Outlook, stamped {crm_id}: {fields}")?;
            }
            ActionOp::CreateInCrm { crm_id, entry_id, fields, to_outlook } => {
                writeln!(f, "  create in CRM as {crm_id}, stamp {entry_id}: {fields}")?;
                if !to_outlook.is_empty() {
                    writeln!(f, "  update Outlook {entry_id}: {to_outlook}")?;
                }
            }
            ActionOp::Update { crm_id, entry_id, to_crm, to_outlook } => {
                let show = |p: &FieldPatch| if p.is_empty() { "nothing".to_owned() } else { p.to_string() };
                writeln!(f, "  update CRM {crm_id}: {}", show(to_crm))?;
                writeln!(f, "  update Outlook {entry_id}: {}", show(to_outlook))?;
            }
            ActionOp::DeleteInOutlook { crm_id, entry_id } => {
                writeln!(f, "  delete Outlook {entry_id} (of {crm_id})")?
            }
            ActionOp::DeleteInCrm { crm_id, entry_id } => {
                writeln!(f, "  delete CRM {crm_id} (of {entry_id})")?
            }
            ActionOp::Untrack { crm_id, entry_id } => {
                writeln!(f, "  untrack {crm_id} <-> {entry_id}: both copies stay")?;
            }
            ActionOp::Drop { why } => writeln!(f, "  nothing to write: {why:?}")?,
            ActionOp::Reject { error } => writeln!(f, "  rejected: {error}")?,
        }
        if !self.conflicts.is_empty() {
            writeln!(f, "  conflicts settled by policy: {}", self.conflicts)?;
        }
        match &self.link {
            LinkChange::Keep => writeln!(f, "  mapping: unchanged"),
            LinkChange::Link(l) => write_link(f, "link", l),
            LinkChange::Remove(id) => writeln!(f, "  mapping: remove {id}"),
            LinkChange::Replace { remove, link } => {
                writeln!(f, "  mapping: remove {remove}")?;
                write_link(f, "link", link)
            }
        }
    }
}

fn write_link(f: &mut fmt::Formatter<'_>, verb: &str, l: &PendingLink) -> fmt::Result {
    let entry = l.entry_id.as_ref().map_or("(the new item)".to_owned(), |e| e.to_string());
    let version = l.crm_version.map_or("-".to_owned(), |v| v.to_string());
    writeln!(
        f,
        "  mapping: {verb} {} <-> {entry} at {version}, {:?}/{:?}, base {}",
        l.crm_id, l.role, l.status, l.base
    )
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, action) in self.actions.iter().enumerate() {
            write!(f, "{}. {action}", i + 1)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hint gives back the slot it was made from (else settling would fall back to a lookup
    /// for every action: the same result, slower); the one slot it cannot hold is no hint.
    #[test]
    fn a_slot_hint_gives_back_its_slot() {
        for slot in [0, 1, 7, 1 << 20, u32::MAX - 1] {
            assert_eq!(SlotHint::new(Some(slot)).get(), Some(slot));
        }
        assert_eq!(SlotHint::new(None).get(), None);
        assert_eq!(SlotHint::new(Some(u32::MAX)).get(), None);
    }
}
