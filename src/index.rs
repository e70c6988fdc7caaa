//! The hash maps behind the in-memory indexes (queue by id, mapping by `CrmId`, `EntryId` and
//! GOID): std's `HashMap` with a small multiply-rotate hasher (the FxHash scheme) in place of
//! SipHash, which dominated planning time on large queues. Its finaliser spreads every input bit,
//! so ids that differ only in their high bytes still land in different buckets.
//!
//! Architecture invariant: nothing iterates one of these maps in an order that reaches an output;
//! every caller that lists entries sorts them first, so the hasher never affects a decision.
//! The keys are GUIDs and ids made by the server and the mailbox, not chosen by an attacker, so a
//! DoS-resistant hasher buys nothing here.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

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

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn ids_differing_only_in_high_bytes_spread_over_low_bits() {
        let build = BuildHasherDefault::<IdHasher>::default();
        let low_bits: std::collections::HashSet<u64> =
            (0u64..1024).map(|n| build.hash_one(uuid::Uuid::from_u64_pair(7, n << 56 | n)) & 0x3ff).collect();
        assert!(low_bits.len() > 600, "only {} distinct buckets of 1024", low_bits.len());
    }
}
