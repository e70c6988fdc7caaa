//! The `OutlookSyncTable` as a value (`Queue` of `QueueEntry`), and coalescing: folding the
//! changes of one record from one side into one net change (DOMAIN section 5, last paragraph).
//!
//! Order within one side: CRM changes by `VersionNumber` (the server's own order, so a page
//! delivered late or twice folds into the right place), then queue id; Outlook changes by queue id
//! (the order the mailbox reported them), never by `ModifiedAt`, which comes from a client clock
//! that may be skewed.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::change::{Change, ChangeKind, ChangeOp, ChangeStamp, DeleteReason, Record, RecordKey};
use crate::entity::ObjectTypeCode;
use crate::ids::{CrmId, VersionNumber};
use crate::mutant::{self, Mutant};

/// Most entries one queue may hold. A queue past this is refused rather than slowly processed.
pub const QUEUE_LEN_MAX: usize = 16_000_000;
/// Longest error text kept with a queue entry, in bytes; longer ones are cut.
pub const ERROR_TEXT_LEN_MAX: usize = 4096;

/// The id of a queue entry: assigned in the order changes were queued, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct QueueId(pub u64);

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A list of queue ids (the entries one action or net change consumes). Most records have one
/// or two changes in a run, so up to two ids are held inline and a plan of a million actions
/// allocates nothing for them; longer lists live in a vector. It reads as a slice.
#[derive(Clone, Default)]
pub struct QueueIds(IdsRepr);

#[derive(Clone)]
enum IdsRepr {
    One(QueueId),
    Two([QueueId; 2]),
    /// Any other length (the empty list too).
    Many(Vec<QueueId>),
}

impl Default for IdsRepr {
    fn default() -> Self {
        IdsRepr::Many(Vec::new())
    }
}

impl QueueIds {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, id: QueueId) {
        self.0 = match std::mem::take(&mut self.0) {
            IdsRepr::Many(ids) if ids.is_empty() => IdsRepr::One(id),
            IdsRepr::One(a) => IdsRepr::Two([a, id]),
            IdsRepr::Two([a, b]) => IdsRepr::Many(vec![a, b, id]),
            IdsRepr::Many(mut ids) => {
                ids.push(id);
                IdsRepr::Many(ids)
            }
        };
    }

    /// Moves every id of `other` to the end of this list.
    pub fn append(&mut self, other: &mut QueueIds) {
        for id in std::mem::take(other).iter() {
            self.push(*id);
        }
    }

    pub fn sort_unstable(&mut self) {
        match &mut self.0 {
            IdsRepr::One(_) => {}
            IdsRepr::Two(pair) => {
                if pair[1] < pair[0] {
                    pair.swap(0, 1);
                }
            }
            IdsRepr::Many(ids) => ids.sort_unstable(),
        }
    }
}

impl std::ops::Deref for QueueIds {
    type Target = [QueueId];

    fn deref(&self) -> &[QueueId] {
        match &self.0 {
            IdsRepr::One(a) => std::slice::from_ref(a),
            IdsRepr::Two(pair) => pair,
            IdsRepr::Many(ids) => ids,
        }
    }
}

impl From<Vec<QueueId>> for QueueIds {
    fn from(ids: Vec<QueueId>) -> Self {
        match ids[..] {
            [a] => QueueIds(IdsRepr::One(a)),
            [a, b] => QueueIds(IdsRepr::Two([a, b])),
            _ => QueueIds(IdsRepr::Many(ids)),
        }
    }
}

impl FromIterator<QueueId> for QueueIds {
    fn from_iter<I: IntoIterator<Item = QueueId>>(iter: I) -> Self {
        let mut ids = QueueIds::new();
        iter.into_iter().for_each(|id| ids.push(id));
        ids
    }
}

impl<'a> IntoIterator for &'a QueueIds {
    type Item = &'a QueueId;
    type IntoIter = std::slice::Iter<'a, QueueId>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl PartialEq for QueueIds {
    fn eq(&self, other: &QueueIds) -> bool {
        **self == **other
    }
}

impl Eq for QueueIds {}

impl PartialEq<Vec<QueueId>> for QueueIds {
    fn eq(&self, other: &Vec<QueueId>) -> bool {
        **self == other[..]
    }
}

impl fmt::Debug for QueueIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for QueueIds {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for QueueIds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<QueueId>::deserialize(d).map(QueueIds::from)
    }
}

/// One pending change with its retry history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    pub id: QueueId,
    pub change: Change,
    /// How many times applying it failed.
    pub attempts: u32,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
}

/// Why a queue operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("the queue already holds its maximum of {0} entries")]
    Full(usize),
    #[error("queue id {0} is already taken")]
    DuplicateId(QueueId),
}

/// The queue of pending changes from both sides (`OutlookSyncTable`).
///
/// Layout: the entries sit in one vector in id order (arrival order), so planning reads them
/// front to back and finds an id without hashing. A removed entry leaves an empty slot, swept out
/// once empty slots outnumber entries three to one. `push` appends; `insert` (loading a cache
/// file, in id order) appends too, and shifts the tail only for an id below the highest.
///
/// Invariant: `ids` is strictly increasing and `ids[i]` is the id of `slots[i]` (or of the entry
/// removed from it), `live` counts the filled slots, `next_id` is greater than every id, and the
/// queue holds at most `len_max` entries.
#[derive(Clone)]
pub struct Queue {
    ids: Vec<QueueId>,
    slots: Vec<Option<QueueEntry>>,
    live: usize,
    next_id: u64,
    len_max: usize,
}

impl Default for Queue {
    fn default() -> Self {
        Queue { ids: Vec::new(), slots: Vec::new(), live: 0, next_id: 0, len_max: QUEUE_LEN_MAX }
    }
}

impl PartialEq for Queue {
    /// Equal when they hold the same entries and would number the next change alike; where
    /// removed entries left empty slots does not matter.
    fn eq(&self, other: &Queue) -> bool {
        self.live == other.live
            && self.next_id == other.next_id
            && self.len_max == other.len_max
            && self.iter_unordered().eq(other.iter_unordered())
    }
}

impl Eq for Queue {}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("entries", &self.entries())
            .field("next_id", &self.next_id)
            .field("len_max", &self.len_max)
            .finish()
    }
}

impl Queue {
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty queue that holds at most `len_max` entries (at most [`QUEUE_LEN_MAX`]).
    pub fn with_len_max(len_max: usize) -> Self {
        Queue { len_max: len_max.min(QUEUE_LEN_MAX), ..Queue::default() }
    }

    /// Queues a change under the next id.
    pub fn push(&mut self, change: Change) -> Result<QueueId, QueueError> {
        let id = QueueId(self.next_id);
        self.insert(QueueEntry { id, change, attempts: 0, last_error: None })?;
        Ok(id)
    }

    /// Puts back an entry with its own id (loading a cache file).
    pub fn insert(&mut self, entry: QueueEntry) -> Result<(), QueueError> {
        if self.live >= self.len_max {
            return Err(QueueError::Full(self.len_max));
        }
        let id = entry.id;
        match self.ids.last() {
            Some(last) if *last >= id => match self.ids.binary_search(&id) {
                Ok(i) if self.slots[i].is_some() => return Err(QueueError::DuplicateId(id)),
                Ok(i) => self.slots[i] = Some(entry),
                Err(i) => {
                    self.ids.insert(i, id);
                    self.slots.insert(i, Some(entry));
                }
            },
            _ => {
                self.ids.push(id);
                self.slots.push(Some(entry));
            }
        }
        self.live += 1;
        self.next_id = self.next_id.max(id.0 + 1);
        Ok(())
    }

    /// The slot of `id`: where it would be if the ids since the first were consecutive, else found
    /// by bisection.
    fn slot(&self, id: QueueId) -> Option<usize> {
        let first = self.ids.first()?;
        let guess = id.0.checked_sub(first.0).and_then(|d| usize::try_from(d).ok());
        if let Some(i) = guess.filter(|&i| self.ids.get(i) == Some(&id)) {
            return Some(i);
        }
        self.ids.binary_search(&id).ok()
    }

    /// Prefetches the slot of `id`.
    #[inline(always)]
    pub(crate) fn prefetch(&self, id: QueueId) {
        if let Some(i) = self.slot(id) {
            crate::prefetch::value(&self.slots[i]);
        }
    }

    pub fn get(&self, id: QueueId) -> Option<&QueueEntry> {
        self.slots[self.slot(id)?].as_ref()
    }

    pub(crate) fn get_mut(&mut self, id: QueueId) -> Option<&mut QueueEntry> {
        let i = self.slot(id)?;
        self.slots[i].as_mut()
    }

    pub fn remove(&mut self, id: QueueId) -> Option<QueueEntry> {
        let i = self.slot(id)?;
        let entry = self.slots[i].take()?;
        self.emptied();
        Some(entry)
    }

    /// Removes an entry without handing it back (settling a success): it is dropped where it
    /// lies instead of being moved out first, and the slots are not swept, so the ids after it
    /// are still found at their offset from the first; the caller sweeps once it is done
    /// (`sweep_if_sparse`). Whether it was there.
    pub(crate) fn discard(&mut self, id: QueueId) -> bool {
        let Some(i) = self.slot(id) else { return false };
        if self.slots[i].is_none() {
            return false;
        }
        self.slots[i] = None;
        self.live -= 1;
        true
    }

    /// Counts a slot just emptied, and sweeps if that made the slots sparse.
    fn emptied(&mut self) {
        self.live -= 1;
        self.sweep_if_sparse();
    }

    /// Sweeps out the empty slots when they outnumber entries 3 to 1.
    pub(crate) fn sweep_if_sparse(&mut self) {
        let empty = self.slots.len() - self.live;
        if empty > 3 * self.live && empty >= 64 {
            self.sweep();
        }
    }

    /// Drops the empty slots.
    fn sweep(&mut self) {
        let mut keep = self.slots.iter().map(Option::is_some);
        self.ids.retain(|_| keep.next().unwrap_or(false));
        self.slots.retain(Option::is_some);
        debug_assert_eq!(self.slots.len(), self.live);
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The entries in no guaranteed order (callers that need an order sort, or use `iter`).
    pub fn iter_unordered(&self) -> impl Iterator<Item = &QueueEntry> {
        self.slots.iter().flatten()
    }

    /// The entries in id order, without collecting them.
    pub fn iter(&self) -> impl Iterator<Item = &QueueEntry> {
        self.slots.iter().flatten()
    }

    /// The entries in id order.
    pub fn entries(&self) -> Vec<&QueueEntry> {
        self.slots.iter().flatten().collect()
    }
}

impl Serialize for Queue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.entries())
    }
}

impl<'de> Deserialize<'de> for Queue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut queue = Queue::new();
        for entry in Vec::<QueueEntry>::deserialize(d)? {
            queue.insert(entry).map_err(serde::de::Error::custom)?;
        }
        Ok(queue)
    }
}

/// Cuts an error text to [`ERROR_TEXT_LEN_MAX`] bytes at a character boundary.
pub(crate) fn clip_error(text: &str) -> String {
    if text.len() <= ERROR_TEXT_LEN_MAX {
        return text.to_owned();
    }
    let mut end = ERROR_TEXT_LEN_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// The net effect of the changes of one record from one side, borrowing the latest record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Net<'q> {
    Create(&'q Record),
    Update(&'q Record),
    Delete(DeleteReason),
    /// Created and then deleted. For a record this client never held it is nothing; for one it
    /// holds (a create handed out again) it is a delete. The plan decides, knowing the mapping.
    CreatedThenDeleted(DeleteReason),
}

impl<'q> Net<'q> {
    pub fn kind(&self) -> ChangeKind {
        match self {
            Net::Create(_) => ChangeKind::Create,
            Net::Update(_) => ChangeKind::Update,
            Net::Delete(_) | Net::CreatedThenDeleted(_) => ChangeKind::Delete,
        }
    }

    pub fn record(&self) -> Option<&'q Record> {
        match *self {
            Net::Create(r) | Net::Update(r) => Some(r),
            Net::Delete(_) | Net::CreatedThenDeleted(_) => None,
        }
    }
}

/// The changes of one record from one side, folded into one. Borrows the queue entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Coalesced<'q> {
    pub key: &'q RecordKey,
    pub object_type: ObjectTypeCode,
    /// The stamp of the latest change folded in.
    pub stamp: ChangeStamp,
    pub net: Net<'q>,
    /// Outlook side: the `CrmId` of the first record that carries one. An item queued for
    /// creation under a chosen id and edited before it synced keeps that id.
    pub crm_id: Option<CrmId>,
    /// The queue entries folded in, in id order. Settling the decision removes exactly these.
    pub consumed: QueueIds,
    /// A net delete's last record before it, with that change's stamp: what the record held
    /// when it was deleted, so "update wins over delete" brings back its latest values, not the
    /// ones last synced.
    pub before_delete: Option<(ChangeStamp, &'q Record)>,
}

/// Why the changes of one record could not be folded. Every variant names the record and the
/// offending queue entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CoalesceError {
    #[error("nothing to coalesce")]
    Empty,
    #[error("{after} changes {key} after its delete {delete}: a deleted key is never reused")]
    ChangeAfterDelete { key: RecordKey, delete: QueueId, after: QueueId },
    #[error("{key} is queued as a {first} ({first_id}) and as a {second} ({second_id})")]
    TypeMismatch {
        key: RecordKey,
        first: ObjectTypeCode,
        first_id: QueueId,
        second: ObjectTypeCode,
        second_id: QueueId,
    },
    #[error("{key} has two different changes with one VersionNumber {version} ({first_id}, {second_id})")]
    ConflictingDuplicate { key: RecordKey, version: VersionNumber, first_id: QueueId, second_id: QueueId },
    #[error("entries of different records given together: {first} and {second}")]
    MixedKeys { first: RecordKey, second: RecordKey },
}

/// Folds the changes of one record from one side into one (see the module doc for the order).
///
/// create+update = create with the latest fields; update+update = the latest update; create+delete
/// = `CreatedThenDeleted`; update+delete = delete; anything after a delete is an error, except
/// after a CRM record left the filter (it may come back, or leave again, or be deleted). A change
/// repeated with the same stamp (at-least-once delivery) is folded in once, also when one CRM
/// version came once as a create and once as an update; a CRM change with the same
/// `VersionNumber` as another but a different content is an error.
pub fn coalesce<'q>(entries: &[&'q QueueEntry]) -> Result<Coalesced<'q>, CoalesceError> {
    let first = entries.first().ok_or(CoalesceError::Empty)?;
    let key = first.change.key();
    let order = |a: &&QueueEntry, b: &&QueueEntry| match (a.change.stamp(), b.change.stamp()) {
        (ChangeStamp::Crm(va), ChangeStamp::Crm(vb)) => (va, a.id).cmp(&(vb, b.id)),
        _ if mutant::active(Mutant::HashOrderOutlookChanges) => {
            mutant::hash_of(a.id).cmp(&mutant::hash_of(b.id))
        }
        _ => a.id.cmp(&b.id),
    };
    let sorted: Vec<&QueueEntry>;
    let ordered: &[&QueueEntry] = if entries.is_sorted_by(|a, b| order(a, b).is_le()) {
        entries
    } else {
        let mut copy = entries.to_vec();
        copy.sort_unstable_by(order);
        sorted = copy;
        &sorted
    };

    let head = ordered[0];
    let mut acc = Coalesced {
        key,
        object_type: head.change.object_type(),
        stamp: head.change.stamp(),
        net: match head.change.op() {
            ChangeOp::Create(r) => Net::Create(r),
            ChangeOp::Update(r) => Net::Update(r),
            ChangeOp::Delete(why) => Net::Delete(*why),
        },
        crm_id: head.change.record().and_then(|r| r.crm_id),
        consumed: QueueIds::new(),
        before_delete: None,
    };
    acc.consumed.push(head.id);
    let mut prev = head;
    for &entry in &ordered[1..] {
        let change = &entry.change;
        if change.key() != key {
            return Err(CoalesceError::MixedKeys { first: key.clone(), second: change.key().clone() });
        }
        if change.object_type() != acc.object_type {
            return Err(CoalesceError::TypeMismatch {
                key: key.clone(),
                first: acc.object_type,
                first_id: head.id,
                second: change.object_type(),
                second_id: entry.id,
            });
        }
        acc.consumed.push(entry.id);
        if change.stamp() == prev.change.stamp() {
            if change.op() == prev.change.op() {
                continue; // the same change delivered again
            }
            // One CRM version handed out once as a create and once as an update (the server's
            // view of what the client holds changed between the two: a lost acknowledge, a
            // rebuilt cache): the same record, folded in once.
            if let (ChangeStamp::Crm(_), Some(a), Some(b)) =
                (change.stamp(), change.record(), prev.change.record())
            {
                if a == b {
                    continue;
                }
            }
            if let ChangeStamp::Crm(version) = change.stamp() {
                return Err(CoalesceError::ConflictingDuplicate {
                    key: key.clone(),
                    version,
                    first_id: prev.id,
                    second_id: entry.id,
                });
            }
        }
        let (before, before_stamp) = (acc.net, acc.stamp);
        acc.net = match (&acc.net, change.op()) {
            // Leaving the filter is not the end of a CrmId: the record may come back into the
            // filter (given back, invited again) or leave it again, or be deleted.
            (Net::Delete(DeleteReason::LeftFilter), ChangeOp::Create(r) | ChangeOp::Update(r)) => {
                Net::Update(r)
            }
            (
                Net::CreatedThenDeleted(DeleteReason::LeftFilter),
                ChangeOp::Create(r) | ChangeOp::Update(r),
            ) => Net::Create(r),
            (Net::Delete(DeleteReason::LeftFilter), ChangeOp::Delete(why)) => Net::Delete(*why),
            (Net::CreatedThenDeleted(DeleteReason::LeftFilter), ChangeOp::Delete(why)) => {
                Net::CreatedThenDeleted(*why)
            }
            (Net::Delete(_) | Net::CreatedThenDeleted(_), _) => {
                return Err(CoalesceError::ChangeAfterDelete {
                    key: key.clone(),
                    delete: prev.id,
                    after: entry.id,
                });
            }
            (Net::Create(_), ChangeOp::Create(r) | ChangeOp::Update(r)) => Net::Create(r),
            (Net::Create(r), ChangeOp::Delete(_)) if mutant::active(Mutant::CoalesceCreateDeleteWrongly) => {
                Net::Create(r)
            }
            (Net::Create(_), ChangeOp::Delete(why)) => Net::CreatedThenDeleted(*why),
            (Net::Update(_), ChangeOp::Create(r) | ChangeOp::Update(r)) => Net::Update(r),
            (Net::Update(_), ChangeOp::Delete(why)) => Net::Delete(*why),
        };
        acc.before_delete = match (acc.net, before) {
            (Net::Delete(_) | Net::CreatedThenDeleted(_), Net::Create(r) | Net::Update(r)) => {
                Some((before_stamp, r))
            }
            // A delete after leaving the filter: the record was last seen before it left.
            (Net::Delete(_) | Net::CreatedThenDeleted(_), _) => acc.before_delete,
            _ => None,
        };
        acc.stamp = change.stamp();
        // The first id is the create's idempotency key: a later change of the same item may
        // carry another freshly chosen one, and using it after a create under the first had
        // reached the server would make a second record.
        if acc.crm_id.is_none() {
            acc.crm_id = change.record().and_then(|r| r.crm_id);
        }
        prev = entry;
    }
    acc.consumed.sort_unstable();
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fields::Fields;

    fn change(n: u64) -> Change {
        let id = CrmId::new(uuid::Uuid::from_u64_pair(1, n + 1)).expect("not nil");
        let op = ChangeOp::Update(Record::new(Fields::empty()));
        Change::crm(id, ObjectTypeCode::Contact, VersionNumber(n), op).expect("valid")
    }

    fn entry(id: u64) -> QueueEntry {
        QueueEntry { id: QueueId(id), change: change(id), attempts: 0, last_error: None }
    }

    /// `QueueIds` reads as the slice of its ids, whichever way it was built (pushed one by one,
    /// appended, collected, or from a vector) and however it holds them: equal exactly when the
    /// ids are, printed and serialised as the slice, and sorted in place.
    #[test]
    fn queue_id_lists_read_as_their_ids() {
        let lists: Vec<Vec<QueueId>> = vec![
            vec![],
            vec![QueueId(1)],
            vec![QueueId(2)],
            vec![QueueId(1), QueueId(2)],
            vec![QueueId(2), QueueId(1)],
            vec![QueueId(1), QueueId(2), QueueId(3)],
            vec![QueueId(1), QueueId(2), QueueId(3), QueueId(4)],
        ];
        let built = |ids: &[QueueId]| {
            let mut pushed = QueueIds::new();
            ids.iter().for_each(|id| pushed.push(*id));
            let (head, tail) = ids.split_at(ids.len() / 2);
            let mut appended: QueueIds = head.iter().copied().collect();
            appended.append(&mut tail.iter().copied().collect());
            let collected: QueueIds = ids.iter().copied().collect();
            [pushed, appended, collected, QueueIds::from(ids.to_vec())]
        };
        for a in &lists {
            for x in built(a) {
                assert_eq!(&x[..], &a[..]);
                assert_eq!((&x).into_iter().copied().collect::<Vec<_>>(), *a);
                assert_eq!(format!("{x:?}"), format!("{a:?}"));
                assert_eq!(serde_json::to_string(&x).unwrap(), serde_json::to_string(a).unwrap());
                let back: QueueIds = serde_json::from_str(&serde_json::to_string(a).unwrap()).unwrap();
                assert!(back == x && x == *a);
                let mut sorted_ids = a.clone();
                sorted_ids.sort_unstable();
                let mut sorted = x.clone();
                sorted.sort_unstable();
                assert!(sorted == sorted_ids);
                for b in &lists {
                    assert_eq!(x == *b, a == b, "{a:?} against {b:?}");
                    for y in built(b) {
                        assert_eq!(x == y, a == b, "{a:?} against {b:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn ids_are_found_across_gaps_sweeps_and_out_of_order_inserts() {
        let mut queue = Queue::new();
        for n in 0..400 {
            assert_eq!(queue.push(change(n)), Ok(QueueId(n)));
        }
        // Remove most entries: the empty slots are swept on the way, leaving gaps in the ids.
        for n in (0..400).filter(|n| n % 7 != 0) {
            assert_eq!(queue.remove(QueueId(n)), Some(entry(n)));
            assert_eq!(queue.get(QueueId(n)), None);
        }
        assert_eq!(queue.remove(QueueId(1)), None);
        // Put some back below the highest id, in no order.
        for n in [398, 3, 200, 1, 2] {
            queue.insert(entry(n)).unwrap();
        }
        assert_eq!(queue.insert(entry(3)), Err(QueueError::DuplicateId(QueueId(3))));
        let expected: Vec<u64> = (0..400).filter(|n| n % 7 == 0 || [1, 2, 3, 200, 398].contains(n)).collect();
        assert_eq!(queue.len(), expected.len());
        assert_eq!(queue.entries().iter().map(|e| e.id.0).collect::<Vec<_>>(), expected);
        for &n in &expected {
            assert_eq!(queue.get(QueueId(n)), Some(&entry(n)));
        }
        assert_eq!(queue.push(change(400)), Ok(QueueId(400)));
        let mut fresh = Queue::new();
        for &n in expected.iter().rev() {
            fresh.insert(entry(n)).unwrap();
        }
        fresh.insert(entry(400)).unwrap();
        assert_eq!(queue, fresh, "equality ignores empty slots");
        assert_eq!(queue.iter().collect::<Vec<_>>(), queue.entries());
        assert!(queue.discard(QueueId(398)));
        assert!(!queue.discard(QueueId(398)));
        assert!(!queue.discard(QueueId(5000)));
        assert_eq!(queue.get(QueueId(398)), None);
        assert_eq!(queue.len(), expected.len());
    }
}
