//! The `IdMappingTable` as a value: `CrmId` <-> `EntryId`, with the field values both sides agreed
//! on at the last successful sync (the base of the three-way merge).
//!
//! Invariant: the mapping is a bijection. A `CrmId` maps to at most one `EntryId` and back, and no
//! two mapped calendar items share a `GlobalObjectId`. `insert` refuses anything that would break
//! it; `link` (used by `settle`) re-points instead, dropping the links it replaces.

use serde::{Deserialize, Serialize};

use crate::index::{SlotIndex, slot_hash};

use crate::change::{ActivityStatus, Role};
use crate::entity::ObjectTypeCode;
use crate::fields::Fields;
use crate::ids::{CrmId, EntryId, GlobalObjectId, VersionNumber};

/// One linked pair and what both sides last agreed on. (`MappingEntry<Option<EntryId>>` is the
/// `PendingLink` of an action whose Outlook item is known only once it ran.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingEntry<E = EntryId> {
    pub crm_id: CrmId,
    pub entry_id: E,
    pub object_type: ObjectTypeCode,
    /// The synchronised field values of the last agreed version.
    pub base: Fields,
    pub goid: Option<GlobalObjectId>,
    pub role: Role,
    pub status: ActivityStatus,
    /// The newest CRM `VersionNumber` this pair agrees with. A CRM change at or below it is older
    /// news (a late or repeated page) and is dropped.
    pub crm_version: Option<VersionNumber>,
}

impl MappingEntry<Option<EntryId>> {
    /// The entry with its Outlook item: `found` (the item the action's outcome reports, created
    /// or found again), else its own.
    pub fn resolve(&self, found: Option<&EntryId>) -> Option<MappingEntry> {
        // The item the engine reports (created, or found again) wins over the one planned for.
        let entry_id = found.or(self.entry_id.as_ref())?.clone();
        Some(MappingEntry {
            crm_id: self.crm_id,
            entry_id,
            object_type: self.object_type,
            base: self.base.clone(),
            goid: self.goid.clone(),
            role: self.role,
            status: self.status,
            crm_version: self.crm_version,
        })
    }

    /// [`resolve`](Self::resolve), moving the entry instead of cloning it.
    pub fn into_resolved(self, found: Option<&EntryId>) -> Option<MappingEntry> {
        let entry_id = match self.entry_id {
            Some(own) => own,
            None => found?.clone(),
        };
        Some(MappingEntry {
            crm_id: self.crm_id,
            entry_id,
            object_type: self.object_type,
            base: self.base,
            goid: self.goid,
            role: self.role,
            status: self.status,
            crm_version: self.crm_version,
        })
    }
}

/// Why a mapping entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("{crm_id} is already mapped (to {entry_id})")]
    CrmIdTaken { crm_id: CrmId, entry_id: EntryId },
    #[error("{entry_id} is already mapped (to {crm_id})")]
    EntryIdTaken { entry_id: EntryId, crm_id: CrmId },
    #[error("GlobalObjectId {goid} is already mapped (to {crm_id})")]
    GoidTaken { goid: GlobalObjectId, crm_id: CrmId },
}

/// The `IdMappingTable`. Lookups by `CrmId`, `EntryId` and `GlobalObjectId`.
///
/// Layout: the entries sit in one vector (`slots`, in the order they were first linked, a removed
/// entry's slot reused by the next link), read in the order they were made. `by_crm`, `by_entry`
/// and `by_goid` point a `CrmId`, an `EntryId` and a GOID at the slot, each holding only the
/// key's hash and the slot (8 bytes a bucket): a lookup confirms its candidate against the pair.
#[derive(Clone, Default)]
pub struct Mapping {
    slots: Vec<Slot>,
    /// The last emptied slot, which names the one emptied before it (reused last-freed first).
    free: Option<u32>,
    /// How many slots are empty.
    free_len: usize,
    by_crm: SlotIndex,
    by_entry: SlotIndex,
    by_goid: SlotIndex,
}

/// A place in `Mapping::slots`: a pair, or empty and naming the next empty one.
#[derive(Clone)]
enum Slot {
    Used(MappingEntry),
    Free { next: Option<u32> },
}

impl Slot {
    fn used(&self) -> Option<&MappingEntry> {
        match self {
            Slot::Used(entry) => Some(entry),
            Slot::Free { .. } => None,
        }
    }
}

impl PartialEq for Mapping {
    /// Equal when they hold the same pairs, wherever each sits.
    fn eq(&self, other: &Mapping) -> bool {
        self.len() == other.len() && self.iter_unordered().all(|e| other.get(e.crm_id) == Some(e))
    }
}

impl Eq for Mapping {}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping").field("entries", &self.entries()).finish()
    }
}

impl Mapping {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a pair; refuses one that would break the bijection.
    pub fn insert(&mut self, entry: MappingEntry) -> Result<(), MappingError> {
        if let Some(old) = self.get(entry.crm_id) {
            return Err(MappingError::CrmIdTaken { crm_id: entry.crm_id, entry_id: old.entry_id.clone() });
        }
        if let Some(crm_id) = self.crm_id_of(&entry.entry_id) {
            return Err(MappingError::EntryIdTaken { entry_id: entry.entry_id, crm_id });
        }
        if let Some(goid) = &entry.goid {
            if let Some(crm_id) = self.crm_id_of_goid(goid) {
                return Err(MappingError::GoidTaken { goid: goid.clone(), crm_id });
            }
        }
        self.put(entry);
        Ok(())
    }

    /// Links a pair, first dropping every link it would collide with (same `CrmId`, same
    /// `EntryId`, same GOID). Returns the dropped entries other than an earlier version of this
    /// pair: re-pointing a `CrmId` to a re-created item drops its old pair by design; `plan`
    /// produces no other collision (property-tested).
    pub(crate) fn link(&mut self, entry: MappingEntry) -> Vec<MappingEntry> {
        self.link_at(None, entry)
    }

    /// [`Mapping::link`], looking first in `hint`, the slot the pair sat in when it was planned
    /// (used only if it still holds the pair: slots move when the mapping is compacted).
    pub(crate) fn link_at(&mut self, hint: Option<u32>, entry: MappingEntry) -> Vec<MappingEntry> {
        let hinted = hint.filter(|&slot| {
            matches!(self.slots.get(slot as usize), Some(Slot::Used(held)) if held.crm_id == entry.crm_id)
        });
        let old = match hinted {
            Some(slot) => match &mut self.slots[slot as usize] {
                Slot::Used(held) => Some(held),
                Slot::Free { .. } => None,
            },
            None => self.get_mut(entry.crm_id),
        };
        // The common case, a held pair with a new base: update it in place.
        let held = match old {
            Some(old) if old.entry_id == entry.entry_id && old.goid == entry.goid => {
                *old = entry;
                return Vec::new();
            }
            old => old.is_some(),
        };
        let mut displaced = Vec::new();
        let mut drop_crm = |this: &mut Self, crm_id: CrmId| {
            if let Some(old) = this.remove(crm_id) {
                if old.crm_id != entry.crm_id || old.entry_id != entry.entry_id {
                    displaced.push(old);
                }
            }
        };
        // A `CrmId` not held (a new pair, the common case of this path) has nothing to drop.
        if held {
            drop_crm(self, entry.crm_id);
        }
        if let Some(crm_id) = self.crm_id_of(&entry.entry_id) {
            drop_crm(self, crm_id);
        }
        if let Some(crm_id) = entry.goid.as_ref().and_then(|g| self.crm_id_of_goid(g)) {
            drop_crm(self, crm_id);
        }
        self.put(entry);
        displaced
    }

    /// Stores a pair that collides with none.
    fn put(&mut self, entry: MappingEntry) {
        let (crm_id, entry_hash) = (entry.crm_id, slot_hash(&entry.entry_id));
        let goid_hash = entry.goid.as_ref().map(slot_hash);
        let slot = match self.free {
            Some(slot) => {
                let Slot::Free { next } =
                    std::mem::replace(&mut self.slots[slot as usize], Slot::Used(entry))
                else {
                    unreachable!("the free list names only empty slots")
                };
                self.free = next;
                self.free_len -= 1;
                slot
            }
            None => {
                // Fewer than 2^32 - 1 pairs (so a slot plus one fits 32 bits): far past any
                // mailbox (and memory).
                let slot = u32::try_from(self.slots.len())
                    .ok()
                    .filter(|&slot| slot < u32::MAX)
                    .expect("fewer than 2^32 - 1 mapped pairs");
                self.slots.push(Slot::Used(entry));
                slot
            }
        };
        self.by_crm.insert(slot_hash(&crm_id), slot);
        self.by_entry.insert(entry_hash, slot);
        if let Some(hash) = goid_hash {
            self.by_goid.insert(hash, slot);
        }
    }

    pub fn remove(&mut self, crm_id: CrmId) -> Option<MappingEntry> {
        let hash = slot_hash(&crm_id);
        let slot = self.find_crm(hash, crm_id)?;
        self.by_crm.remove(hash, slot);
        let freed = Slot::Free { next: self.free };
        let Slot::Used(old) = std::mem::replace(&mut self.slots[slot as usize], freed) else {
            unreachable!("the index names only used slots")
        };
        self.free = Some(slot);
        self.free_len += 1;
        self.by_entry.remove(slot_hash(&old.entry_id), slot);
        if let Some(goid) = &old.goid {
            self.by_goid.remove(slot_hash(goid), slot);
        }
        if self.free_len > 64 && self.free_len > 2 * self.by_crm.len() {
            self.compact();
        }
        Some(old)
    }

    /// Drops the empty slots and re-points the index.
    fn compact(&mut self) {
        let mut new_slot = vec![u32::MAX; self.slots.len()];
        let mut next = 0;
        for (old, slot) in self.slots.iter().enumerate() {
            if let Slot::Used(_) = slot {
                new_slot[old] = next;
                next += 1;
            }
        }
        self.slots.retain(|slot| matches!(slot, Slot::Used(_)));
        self.free = None;
        self.free_len = 0;
        self.by_crm.renumber(&new_slot);
        self.by_entry.renumber(&new_slot);
        self.by_goid.renumber(&new_slot);
    }

    /// Prefetches slot `slot`.
    #[inline(always)]
    pub(crate) fn prefetch_slot(&self, slot: u32) {
        if let Some(s) = self.slots.get(slot as usize) {
            crate::prefetch::value(s);
        }
    }

    /// Asks for the buckets that linking or removing the pair `crm_id` -> `entry_id` (with
    /// `goid`) reads and writes. Hashing reads the ids' text: ask for it first.
    #[inline(always)]
    pub(crate) fn prefetch_buckets(
        &self,
        crm_id: CrmId,
        entry_id: Option<&EntryId>,
        goid: Option<&GlobalObjectId>,
    ) {
        self.by_crm.prefetch(slot_hash(&crm_id));
        if let Some(entry_id) = entry_id {
            self.by_entry.prefetch(slot_hash(entry_id));
        }
        if let Some(goid) = goid {
            self.by_goid.prefetch(slot_hash(goid));
        }
    }

    /// The entry in `slot`, if any (for prefetching what settling it will touch).
    #[inline(always)]
    pub(crate) fn at_slot(&self, slot: u32) -> Option<&MappingEntry> {
        self.slots.get(slot as usize)?.used()
    }

    fn get_mut(&mut self, crm_id: CrmId) -> Option<&mut MappingEntry> {
        let slot = self.slot_of(crm_id)?;
        match &mut self.slots[slot as usize] {
            Slot::Used(entry) => Some(entry),
            Slot::Free { .. } => None,
        }
    }

    /// The slot of the pair of `crm_id` (read it with [`Mapping::at_slot`]; a hint for
    /// [`Mapping::link_at`]).
    pub(crate) fn slot_of(&self, crm_id: CrmId) -> Option<u32> {
        self.find_crm(slot_hash(&crm_id), crm_id)
    }

    pub fn get(&self, crm_id: CrmId) -> Option<&MappingEntry> {
        self.at_slot(self.slot_of(crm_id)?)
    }

    pub fn crm_id_of(&self, entry_id: &EntryId) -> Option<CrmId> {
        self.find_entry(slot_hash(entry_id), entry_id)
    }

    pub fn crm_id_of_goid(&self, goid: &GlobalObjectId) -> Option<CrmId> {
        let slot =
            self.by_goid.find(slot_hash(goid), |slot| self.holds(slot, |e| e.goid.as_ref() == Some(goid)))?;
        self.at_slot(slot).map(|entry| entry.crm_id)
    }

    /// [`Mapping::slot_of`] for many ids at once, in their order. Each lookup waits for two lines
    /// in turn (its bucket, then the pair it names), likely far from cache: each is asked for
    /// some lookups ahead.
    pub(crate) fn slots_of(&self, crm_ids: &[CrmId]) -> Vec<Option<u32>> {
        // How far ahead of the lookup its bucket, then its candidate pair, is asked for.
        const BUCKET: usize = 16;
        const PAIR: usize = 8;
        let hashes: Vec<u32> = crm_ids.iter().map(slot_hash).collect();
        let mut found = Vec::with_capacity(crm_ids.len());
        for (i, (&crm_id, &hash)) in crm_ids.iter().zip(&hashes).enumerate() {
            if let Some(&hash) = hashes.get(i + BUCKET) {
                self.by_crm.prefetch(hash);
            }
            if let Some(slot) = hashes.get(i + PAIR).and_then(|&hash| self.by_crm.candidate(hash)) {
                self.prefetch_slot(slot);
            }
            found.push(self.find_crm(hash, crm_id));
        }
        found
    }

    /// [`Mapping::crm_id_of`] for many ids at once, in their order. Each lookup waits for three
    /// lines in turn (its bucket, the pair it names, that pair's id text), all likely far from
    /// cache: each is asked for some lookups ahead, as soon as the line before it is in.
    pub(crate) fn crm_ids_of(&self, keys: &[&EntryId]) -> Vec<Option<CrmId>> {
        // How far ahead of the lookup each line is asked for: the key's text (hashed next),
        // its bucket, the candidate pair, and that pair's id text.
        const TEXT: usize = 24;
        const BUCKET: usize = 16;
        const PAIR: usize = 8;
        const PAIR_TEXT: usize = 4;
        // Each key's hash, made when its bucket is asked for (the first ones' right away).
        let mut hashes: Vec<u32> = keys.iter().take(BUCKET).map(|key| slot_hash(*key)).collect();
        hashes.reserve_exact(keys.len().saturating_sub(BUCKET));
        let mut found = Vec::with_capacity(keys.len());
        for (i, &key) in keys.iter().enumerate() {
            if let Some(key) = keys.get(i + TEXT) {
                key.prefetch();
            }
            if let Some(key) = keys.get(i + BUCKET) {
                let hash = slot_hash(*key);
                hashes.push(hash);
                self.by_entry.prefetch(hash);
            }
            if let Some(slot) = hashes.get(i + PAIR).and_then(|&hash| self.by_entry.candidate(hash)) {
                self.prefetch_slot(slot);
            }
            let pair = hashes.get(i + PAIR_TEXT).and_then(|&hash| self.by_entry.candidate(hash));
            if let Some(pair) = pair.and_then(|slot| self.at_slot(slot)) {
                pair.entry_id.prefetch();
            }
            found.push(self.find_entry(hashes[i], key));
        }
        found
    }

    /// The slot of the pair of `crm_id`, whose [`slot_hash`] is `hash`.
    #[inline]
    fn find_crm(&self, hash: u32, crm_id: CrmId) -> Option<u32> {
        self.by_crm.find(hash, |slot| self.holds(slot, |e| e.crm_id == crm_id))
    }

    /// The `CrmId` paired with `entry_id`, whose [`slot_hash`] is `hash`.
    #[inline]
    fn find_entry(&self, hash: u32, entry_id: &EntryId) -> Option<CrmId> {
        let slot = self.by_entry.find(hash, |slot| self.holds(slot, |e| e.entry_id == *entry_id))?;
        self.at_slot(slot).map(|entry| entry.crm_id)
    }

    /// Whether `slot` holds a pair that `is` accepts (an index's candidate confirmed).
    #[inline]
    fn holds(&self, slot: u32, is: impl FnOnce(&MappingEntry) -> bool) -> bool {
        self.at_slot(slot).is_some_and(is)
    }

    pub fn len(&self) -> usize {
        self.by_crm.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_crm.len() == 0
    }

    /// The entries in no particular order (callers that need an order sort).
    pub fn iter_unordered(&self) -> impl Iterator<Item = &MappingEntry> {
        self.slots.iter().filter_map(Slot::used)
    }

    /// The entries in `CrmId` order.
    pub fn entries(&self) -> Vec<&MappingEntry> {
        let mut all: Vec<&MappingEntry> = self.iter_unordered().collect();
        all.sort_unstable_by_key(|e| e.crm_id);
        all
    }

    /// Checks the bijection invariant across the three indexes (for tests and debug assertions).
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.by_entry.len() != self.by_crm.len() {
            return Err(format!("{} CrmIds but {} EntryIds", self.by_crm.len(), self.by_entry.len()));
        }
        if self.iter_unordered().count() != self.by_crm.len() {
            return Err(format!("{} CrmIds indexed but {} entries", self.by_crm.len(), self.len()));
        }
        let goids = self.iter_unordered().filter(|e| e.goid.is_some()).count();
        if goids != self.by_goid.len() {
            return Err(format!("{goids} entries with a GOID but {} in the index", self.by_goid.len()));
        }
        for e in self.iter_unordered() {
            if self.get(e.crm_id) != Some(e) {
                return Err(format!("{} is not indexed to its slot", e.crm_id));
            }
            if self.crm_id_of(&e.entry_id) != Some(e.crm_id) {
                return Err(format!("{} -> {} has no way back", e.crm_id, e.entry_id));
            }
            if let Some(goid) = &e.goid {
                if self.crm_id_of_goid(goid) != Some(e.crm_id) {
                    return Err(format!("GOID {goid} of {} is not indexed to it", e.crm_id));
                }
            }
        }
        Ok(())
    }
}

impl Serialize for Mapping {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.entries())
    }
}

impl<'de> Deserialize<'de> for Mapping {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut mapping = Mapping::new();
        for entry in Vec::<MappingEntry>::deserialize(d)? {
            mapping.insert(entry).map_err(serde::de::Error::custom)?;
        }
        Ok(mapping)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(n: u128) -> MappingEntry {
        MappingEntry {
            crm_id: CrmId::from_u128(n + 1),
            entry_id: EntryId::new(format!("E{n:05}")).expect("valid"),
            object_type: ObjectTypeCode::Appointment,
            base: Fields::empty(),
            goid: (n % 2 == 0).then(|| GlobalObjectId::new(n.to_be_bytes().to_vec()).expect("valid")),
            role: Role::Owner,
            status: ActivityStatus::Open,
            crm_version: None,
        }
    }

    #[test]
    fn emptied_slots_are_reused_and_swept_without_losing_a_pair() {
        let mut mapping = Mapping::new();
        for n in 0..300 {
            mapping.insert(pair(n)).unwrap();
        }
        // Remove most pairs (the slots are swept on the way), then link new ones into the gaps.
        for n in (0..300).filter(|n| n % 5 != 0) {
            assert_eq!(mapping.remove(pair(n).crm_id), Some(pair(n)));
            mapping.check_invariants().unwrap();
        }
        // 60 pairs left in 300 slots: swept (the indexes re-pointed), not merely reused.
        assert!(mapping.slots.len() < 200, "{} slots for 60 pairs", mapping.slots.len());
        for n in 300..340 {
            assert!(mapping.link(pair(n)).is_empty());
        }
        mapping.check_invariants().unwrap();
        let kept: Vec<u128> = (0..300).filter(|n| n % 5 == 0).chain(300..340).collect();
        assert_eq!(mapping.len(), kept.len());
        let mut fresh = Mapping::new();
        for &n in kept.iter().rev() {
            fresh.insert(pair(n)).unwrap();
            assert_eq!(mapping.get(pair(n).crm_id), Some(&pair(n)));
            assert_eq!(mapping.crm_id_of(&pair(n).entry_id), Some(pair(n).crm_id));
        }
        assert_eq!(mapping, fresh, "equality ignores where pairs sit");
        assert_eq!(mapping.entries(), fresh.entries());
        assert_eq!(mapping.remove(pair(1).crm_id), None);
    }

    /// A held pair without a GOID re-pointed to another item: found by its `CrmId` alone (no
    /// GOID leads to it), replaced, and handed back.
    #[test]
    fn re_pointing_a_pair_without_a_goid_replaces_it() {
        let mut mapping = Mapping::new();
        let held = pair(1);
        assert_eq!(held.goid, None);
        mapping.insert(held.clone()).unwrap();
        let moved = MappingEntry { entry_id: EntryId::new("E-moved").unwrap(), ..held.clone() };
        assert_eq!(mapping.link(moved.clone()), std::slice::from_ref(&held));
        assert_eq!(mapping.len(), 1);
        assert_eq!(mapping.get(held.crm_id), Some(&moved));
        assert_eq!(mapping.crm_id_of(&held.entry_id), None);
        mapping.check_invariants().unwrap();
    }

    /// Two ids whose hashes collide: the index files both under one hash, and a lookup takes a
    /// candidate only once its pair holds the very id asked for.
    #[test]
    fn a_lookup_confirms_its_candidate_against_the_pair() {
        let mut seen = std::collections::HashMap::new();
        let (a, b) = (0u64..)
            .map(|n| EntryId::new(format!("E{n}")).expect("valid"))
            .find_map(|id| seen.insert(slot_hash(&id), id.clone()).map(|earlier| (earlier, id)))
            .expect("32-bit hashes collide within a few hundred thousand ids");
        assert_eq!(slot_hash(&a), slot_hash(&b));
        let mut mapping = Mapping::new();
        assert!(mapping.is_empty());
        let held = MappingEntry { entry_id: a.clone(), ..pair(1) };
        mapping.insert(held.clone()).unwrap();
        assert!(!mapping.is_empty());
        assert_eq!(mapping.crm_id_of(&a), Some(held.crm_id));
        assert_eq!(mapping.crm_id_of(&b), None, "{b} shares {a}'s hash, not its pair");
        assert_eq!(mapping.crm_ids_of(&[&b, &a]), [None, Some(held.crm_id)]);
        let other = MappingEntry { entry_id: b.clone(), ..pair(2) };
        mapping.insert(other.clone()).unwrap();
        assert_eq!(mapping.crm_id_of(&b), Some(other.crm_id));
        assert_eq!(mapping.remove(held.crm_id), Some(held));
        assert_eq!(mapping.crm_id_of(&a), None);
        assert_eq!(mapping.crm_id_of(&b), Some(other.crm_id));
        mapping.check_invariants().unwrap();
    }

    /// `check_invariants` (which the property tests lean on) notices an index out of step.
    #[test]
    fn check_invariants_notices_an_index_out_of_step() {
        let mut mapping = Mapping::new();
        for n in 0..3 {
            mapping.insert(pair(n)).unwrap();
        }
        mapping.check_invariants().unwrap();
        let (entry_id, slot) = (pair(1).entry_id, mapping.slot_of(pair(1).crm_id).unwrap());
        assert!(mapping.by_entry.remove(slot_hash(&entry_id), slot));
        let error = mapping.check_invariants().unwrap_err();
        assert!(error.contains("EntryIds"), "{error}");
    }

    /// The batched lookups (which ask for lines ahead) answer what one-by-one lookups do, for
    /// lists shorter and longer than how far they look ahead, with ids mapped, never mapped,
    /// removed and repeated.
    #[test]
    fn batched_lookups_agree_with_one_by_one() {
        let mut mapping = Mapping::new();
        for n in 0..200 {
            mapping.insert(pair(n)).unwrap();
        }
        for n in (0..200).filter(|n| n % 7 == 0) {
            mapping.remove(pair(n).crm_id).unwrap();
        }
        let ns: Vec<u128> = (0..260).chain([3, 3, 14, 199, 250]).collect();
        for len in [0, 1, 5, 17, 30, ns.len()] {
            let crm_ids: Vec<CrmId> = ns[..len].iter().map(|&n| pair(n).crm_id).collect();
            let one_by_one: Vec<Option<u32>> = crm_ids.iter().map(|id| mapping.slot_of(*id)).collect();
            assert_eq!(mapping.slots_of(&crm_ids), one_by_one);
            let entry_ids: Vec<EntryId> = ns[..len].iter().map(|&n| pair(n).entry_id).collect();
            let keys: Vec<&EntryId> = entry_ids.iter().collect();
            let one_by_one: Vec<Option<CrmId>> = keys.iter().map(|key| mapping.crm_id_of(key)).collect();
            assert_eq!(mapping.crm_ids_of(&keys), one_by_one);
            if len == ns.len() {
                let held = one_by_one.iter().flatten().count();
                let extra = "3 (twice) and 199 held; 14 removed; 250 never mapped";
                assert_eq!(held, (0..200).filter(|n| n % 7 != 0).count() + 3, "{extra}");
            }
        }
    }

    /// Linking a held pair again keeps every index in step with it: a new base updates it where
    /// it sits; a new GOID or a new item re-indexes it, and the old key finds nothing.
    #[test]
    fn linking_a_held_pair_again_keeps_the_indexes_in_step() {
        let mut mapping = Mapping::new();
        for n in 0..4 {
            mapping.insert(pair(n)).unwrap();
        }
        let held = pair(2);
        let goid = |n: u128| GlobalObjectId::new(n.to_be_bytes().to_vec()).expect("valid");
        let rebased =
            MappingEntry { base: Fields::try_from_pairs([("subject", "b")]).unwrap(), ..held.clone() };
        assert!(mapping.link(rebased.clone()).is_empty());
        assert_eq!(mapping.get(held.crm_id), Some(&rebased));
        let regoided = MappingEntry { goid: Some(goid(77)), ..rebased.clone() };
        assert!(mapping.link(regoided.clone()).is_empty());
        assert_eq!(mapping.crm_id_of_goid(&goid(77)), Some(held.crm_id));
        assert_eq!(mapping.crm_id_of_goid(&goid(2)), None);
        let moved = MappingEntry { entry_id: EntryId::new("E-moved").unwrap(), ..regoided.clone() };
        // Re-pointed to another item: the pair it replaces is handed back.
        assert_eq!(mapping.link(moved.clone()), [regoided]);
        assert_eq!(mapping.crm_id_of(&moved.entry_id), Some(held.crm_id));
        assert_eq!(mapping.crm_id_of(&held.entry_id), None);
        assert_eq!(mapping.get(held.crm_id), Some(&moved));
        assert_eq!(mapping.len(), 4);
        mapping.check_invariants().unwrap();
    }
}
