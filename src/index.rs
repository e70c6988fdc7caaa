//! The in-memory indexes: [`IdMap`], std's `HashMap` with a small multiply-rotate hasher (the
//! FxHash scheme) in place of SipHash, which dominated planning time on large queues (its
//! finaliser spreads every input bit, so ids that differ only in their high bytes still land in
//! different buckets), for the planner's own tables; and [`SlotIndex`], which finds keys kept in
//! a vector of slots elsewhere (the mapping's pairs by `CrmId`, `EntryId` and GOID) and can be
//! asked for a lookup's line ahead.
//!
//! Architecture invariant: nothing iterates one of these maps in an order that reaches an output;
//! every caller that lists entries sorts them first, so the hasher never affects a decision.
//! The keys are GUIDs and ids made by the server and the mailbox, not chosen by an attacker, so a
//! DoS-resistant hasher buys nothing here.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};

/// A `HashMap` keyed with [`IdHasher`].
pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// FxHash: one multiply and rotate per machine word.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl IdHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for IdHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64);
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    /// Mixes every input bit into the low bits the table indexes by (murmur3's finaliser): the
    /// multiply in `add` only carries bits upwards, and GUIDs often differ only in high bytes.
    #[inline]
    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

/// The hash a [`SlotIndex`] files a key under: the high half of its [`IdHasher`] hash.
#[inline]
pub(crate) fn slot_hash<K: Hash + ?Sized>(key: &K) -> u32 {
    (BuildHasherDefault::<IdHasher>::default().hash_one(key) >> 32) as u32
}

/// An index from keys kept elsewhere, in a vector of slots, to their slot: open addressing with
/// linear probing, one word a bucket holding the key's [`slot_hash`] and its slot. A lookup
/// compares hashes first and confirms a candidate with the caller's test of its slot, so the
/// index holds no key: no count of a shared string to write, no copy of its text, 8 bytes a
/// bucket however long the keys. And since a key's bucket is known from its hash alone, a lookup
/// can be asked for ahead ([`SlotIndex::prefetch`]), which `HashMap` cannot.
///
/// Invariants: at most half the buckets are filled (so a probe always meets an empty one, and
/// probes stay short); a filed entry sits at its home bucket or after it with no empty bucket
/// in between (removal shifts the rest of the cluster back instead of leaving a tombstone).
/// Slots are below `u32::MAX`.
#[derive(Clone, Default)]
pub(crate) struct SlotIndex {
    /// Empty (0), or a key's hash in the high half and its slot plus one in the low half. A
    /// power of two long, or empty.
    buckets: Vec<u64>,
    /// How many buckets are filled.
    len: usize,
}

impl SlotIndex {
    const MIN_BUCKETS: usize = 16;

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn home(&self, hash: u32) -> usize {
        hash as usize & (self.buckets.len() - 1)
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        (i + 1) & (self.buckets.len() - 1)
    }

    #[inline]
    fn bucket(hash: u32, slot: u32) -> u64 {
        debug_assert!(slot < u32::MAX, "slots are below u32::MAX");
        (hash as u64) << 32 | (slot as u64 + 1)
    }

    /// The hash a filled bucket holds.
    #[inline]
    fn hash_in(bucket: u64) -> u32 {
        (bucket >> 32) as u32
    }

    /// The slot a filled bucket holds.
    #[inline]
    fn slot_in(bucket: u64) -> u32 {
        bucket as u32 - 1
    }

    /// How many buckets past its home bucket the filled bucket `i` sits.
    #[inline]
    fn distance_from_home(&self, i: usize) -> usize {
        i.wrapping_sub(self.home(Self::hash_in(self.buckets[i]))) & (self.buckets.len() - 1)
    }

    /// The slot filed under `hash` whose key `is_key` accepts (the caller compares the key it
    /// looks for with the one in the slot).
    #[inline]
    pub(crate) fn find(&self, hash: u32, mut is_key: impl FnMut(u32) -> bool) -> Option<u32> {
        if self.buckets.is_empty() {
            return None;
        }
        let mut i = self.home(hash);
        loop {
            let b = self.buckets[i];
            if b == 0 {
                return None;
            }
            if Self::hash_in(b) == hash {
                let slot = Self::slot_in(b);
                if is_key(slot) {
                    return Some(slot);
                }
            }
            i = self.next(i);
        }
    }

    /// The first slot filed under `hash`, unconfirmed: what a lookup of a key with this hash
    /// will most likely read (for asking for its lines ahead).
    #[inline]
    pub(crate) fn candidate(&self, hash: u32) -> Option<u32> {
        self.find(hash, |_| true)
    }

    /// Asks for the line of the bucket a lookup of `hash` reads first.
    #[inline(always)]
    pub(crate) fn prefetch(&self, hash: u32) {
        if !self.buckets.is_empty() {
            crate::prefetch::line(&self.buckets[self.home(hash)]);
        }
    }

    /// Files `slot` under `hash`. The caller makes sure the slot's key is not filed yet.
    pub(crate) fn insert(&mut self, hash: u32, slot: u32) {
        if (self.len + 1) * 2 > self.buckets.len() {
            self.grow();
        }
        self.place(Self::bucket(hash, slot));
        self.len += 1;
    }

    fn place(&mut self, bucket: u64) {
        let mut i = self.home(Self::hash_in(bucket));
        while self.buckets[i] != 0 {
            i = self.next(i);
        }
        self.buckets[i] = bucket;
    }

    fn grow(&mut self) {
        let len = (self.buckets.len() * 2).max(Self::MIN_BUCKETS);
        let old = std::mem::replace(&mut self.buckets, vec![0; len]);
        for bucket in old.into_iter().filter(|&b| b != 0) {
            self.place(bucket);
        }
    }

    /// Unfiles `slot` from under `hash`. Whether it was filed there.
    pub(crate) fn remove(&mut self, hash: u32, slot: u32) -> bool {
        if self.buckets.is_empty() {
            return false;
        }
        let wanted = Self::bucket(hash, slot);
        let mut hole = self.home(hash);
        loop {
            match self.buckets[hole] {
                0 => return false,
                b if b == wanted => break,
                _ => hole = self.next(hole),
            }
        }
        // Shift back each later entry of the cluster whose home is not after the hole, so no
        // probe that passed the hole meets an empty bucket before its entry.
        let mask = self.buckets.len() - 1;
        let mut j = hole;
        loop {
            j = self.next(j);
            let b = self.buckets[j];
            if b == 0 {
                break;
            }
            if j.wrapping_sub(hole) & mask <= self.distance_from_home(j) {
                self.buckets[hole] = b;
                hole = j;
            }
        }
        self.buckets[hole] = 0;
        self.len -= 1;
        true
    }

    /// Moves every filed slot to `new_slot[slot]` (after the slots were compacted); hashes, and
    /// so buckets, stay.
    pub(crate) fn renumber(&mut self, new_slot: &[u32]) {
        for b in self.buckets.iter_mut().filter(|b| **b != 0) {
            *b = Self::bucket(Self::hash_in(*b), new_slot[Self::slot_in(*b) as usize]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_differing_only_in_high_bytes_spread_over_low_bits() {
        let build = BuildHasherDefault::<IdHasher>::default();
        let low_bits: std::collections::HashSet<u64> =
            (0u64..1024).map(|n| build.hash_one(uuid::Uuid::from_u64_pair(7, n << 56 | n)) & 0x3ff).collect();
        assert!(low_bits.len() > 600, "only {} distinct buckets of 1024", low_bits.len());
    }
}

#[cfg(test)]
mod slot_index_tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// Keys as the mapping keeps them: in slots, the index holding only their hashes.
    #[derive(Default)]
    struct Model {
        index: SlotIndex,
        slots: Vec<Option<u64>>,
        reference: BTreeMap<u64, u32>,
    }

    impl Model {
        /// A hash with few bits, so that many keys collide and clusters grow long.
        fn hash(key: u64) -> u32 {
            slot_hash(&(key % 97)) & 0xf000_00ff
        }

        fn find(&self, key: u64) -> Option<u32> {
            self.index.find(Self::hash(key), |slot| self.slots[slot as usize] == Some(key))
        }

        fn insert(&mut self, key: u64) {
            if self.reference.contains_key(&key) {
                return;
            }
            let slot = self.slots.len() as u32;
            self.slots.push(Some(key));
            self.index.insert(Self::hash(key), slot);
            self.reference.insert(key, slot);
        }

        fn remove(&mut self, key: u64) {
            let Some(slot) = self.reference.remove(&key) else {
                assert!(!self.index.remove(Self::hash(key), u32::MAX - 1));
                return;
            };
            assert!(self.index.remove(Self::hash(key), slot), "{key} was filed");
            self.slots[slot as usize] = None;
        }

        /// Drops the empty slots, as the mapping compacts.
        fn compact(&mut self) {
            let mut new_slot = vec![u32::MAX; self.slots.len()];
            let mut next = 0;
            for (old, key) in self.slots.iter().enumerate() {
                if key.is_some() {
                    new_slot[old] = next;
                    next += 1;
                }
            }
            self.slots.retain(Option::is_some);
            self.index.renumber(&new_slot);
            for slot in self.reference.values_mut() {
                *slot = new_slot[*slot as usize];
            }
        }

        fn check(&self, probes: impl Iterator<Item = u64>) {
            assert_eq!(self.index.len(), self.reference.len());
            assert!(self.index.len() * 2 <= self.index.buckets.len().max(1));
            for key in probes {
                assert_eq!(self.find(key), self.reference.get(&key).copied(), "key {key}");
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        Remove(u64),
        Compact,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0u64..400).prop_map(Op::Insert),
            4 => (0u64..400).prop_map(Op::Remove),
            1 => Just(Op::Compact),
        ]
    }

    proptest! {
        /// Whatever the inserts, removes and compactions, and however keys collide, the index
        /// finds exactly the keys a map holds, at their slots, and stays at most half full.
        #[test]
        fn finds_what_a_map_holds(ops in prop::collection::vec(op(), 1..600)) {
            let mut model = Model::default();
            for op in ops {
                match op {
                    Op::Insert(key) => model.insert(key),
                    Op::Remove(key) => model.remove(key),
                    Op::Compact => model.compact(),
                }
            }
            model.check(0..400);
        }
    }

    /// Real ids spread over the buckets: no entry sits far from its home, so a lookup reads one
    /// line or two (a constant hash, or every probe starting at one bucket, would still find
    /// everything, slowly).
    #[test]
    fn entries_sit_near_their_home_bucket() {
        let mut index = SlotIndex::default();
        let ids: Vec<uuid::Uuid> = (0..4096u64).map(|n| uuid::Uuid::from_u64_pair(0x5eed, n + 1)).collect();
        for (slot, id) in ids.iter().enumerate() {
            index.insert(slot_hash(id), slot as u32);
        }
        let farthest = (0..index.buckets.len())
            .filter(|&i| index.buckets[i] != 0)
            .map(|i| index.distance_from_home(i))
            .max();
        assert!(farthest.is_some_and(|d| d < 32), "an entry sits {farthest:?} buckets past its home");
        for (slot, id) in ids.iter().enumerate() {
            assert_eq!(index.find(slot_hash(id), |s| s == slot as u32), Some(slot as u32));
        }
    }

    #[test]
    fn an_empty_index_finds_nothing_and_removes_nothing() {
        let mut index = SlotIndex::default();
        assert_eq!(index.find(7, |_| true), None);
        assert_eq!(index.candidate(7), None);
        assert!(!index.remove(7, 0));
        index.prefetch(7);
        assert_eq!(index.len(), 0);
    }

    /// A candidate is the first slot filed under a hash, whatever its key.
    #[test]
    fn a_candidate_is_the_first_slot_under_its_hash() {
        let mut index = SlotIndex::default();
        index.insert(5, 10);
        index.insert(5, 11);
        index.insert(21, 12);
        assert_eq!(index.candidate(5), Some(10));
        assert_eq!(index.find(5, |slot| slot == 11), Some(11));
        assert_eq!(index.find(5, |slot| slot == 12), None);
        assert!(index.remove(5, 10));
        assert_eq!(index.candidate(5), Some(11));
    }
}
