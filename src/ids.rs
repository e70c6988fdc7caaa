//! Identifiers of the domain (DOMAIN section 1): `CrmId`, `EntryId`, `GlobalObjectId` and
//! `VersionNumber`.
//!
//! Each is a newtype with a validating constructor, so a value that exists is a valid one: no nil
//! `CrmId`, no empty or oversized `EntryId`, no empty or oversized `GlobalObjectId`. Deserialising
//! goes through the same constructors.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest `EntryId` accepted, in bytes. Outlook entry ids are about 140 hex characters; anything
/// far longer is not an entry id.
pub const ENTRY_ID_LEN_MAX: usize = 512;
/// Longest `GlobalObjectId` accepted, in bytes (real ones are 56 to about 112 bytes).
pub const GLOBAL_OBJECT_ID_LEN_MAX: usize = 256;

/// Why an identifier was refused. Every variant carries the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("a CrmId must not be the nil GUID")]
    NilCrmId,
    #[error("{0:?} is not a GUID")]
    NotAGuid(String),
    #[error("an EntryId must not be empty")]
    EmptyEntryId,
    #[error("EntryId of {len} bytes is longer than the {ENTRY_ID_LEN_MAX} allowed (starts {prefix:?})")]
    EntryIdTooLong { len: usize, prefix: String },
    #[error("a GlobalObjectId must not be empty")]
    EmptyGlobalObjectId,
    #[error("GlobalObjectId of {0} bytes is longer than the {GLOBAL_OBJECT_ID_LEN_MAX} allowed")]
    GlobalObjectIdTooLong(usize),
    #[error("{0:?} is not a hex-encoded GlobalObjectId")]
    NotHex(String),
}

/// A CRM record's id: a GUID, never nil, never reused after the record is deleted.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "Uuid", into = "Uuid")]
pub struct CrmId(Uuid);

impl CrmId {
    /// Namespace of the ids that [`CrmId::successor`] derives (a fixed, random v4 GUID).
    const SUCCESSOR_NAMESPACE: Uuid = Uuid::from_u128(0x6d1c_57c4_3c4e_4a7e_9f0b_2a51_8c3e_70d1);

    pub fn new(uuid: Uuid) -> Result<Self, IdError> {
        if uuid.is_nil() {
            return Err(IdError::NilCrmId);
        }
        Ok(Self(uuid))
    }

    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// The id as one number, ordered as the `CrmId`s are (a cheap sort key).
    pub fn as_u128(&self) -> u128 {
        self.0.as_u128()
    }

    /// The inverse of [`CrmId::as_u128`], for a number taken from a valid `CrmId`.
    pub(crate) fn from_u128(n: u128) -> CrmId {
        debug_assert_ne!(n, 0, "taken from a valid CrmId, so never nil");
        CrmId(Uuid::from_u128(n))
    }

    /// The id of the record that replaces this one when a deleted CRM record is created again
    /// (`UpdateVsDeletePolicy::UpdateWins`). A CrmId is never reused, so the new record needs a
    /// new id; deriving it (UUID v5 of this id) keeps planning pure and makes a retried re-create
    /// use the same id, which is its idempotency key.
    pub fn successor(&self) -> CrmId {
        let id = Uuid::new_v5(&Self::SUCCESSOR_NAMESPACE, self.0.as_bytes());
        // v5 output sets version bits, so it is never nil.
        CrmId(id)
    }
}

impl TryFrom<Uuid> for CrmId {
    type Error = IdError;
    fn try_from(uuid: Uuid) -> Result<Self, IdError> {
        Self::new(uuid)
    }
}

impl From<CrmId> for Uuid {
    fn from(id: CrmId) -> Uuid {
        id.0
    }
}

impl FromStr for CrmId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let uuid = Uuid::parse_str(s).map_err(|_| IdError::NotAGuid(s.to_owned()))?;
        Self::new(uuid)
    }
}

impl fmt::Display for CrmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for CrmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CrmId({})", self.0)
    }
}

/// Whether two shared values are equal: at once when they are one value (no read of it, which
/// may sit on a line last touched long ago), else by their contents.
#[inline]
pub(crate) fn same_shared<T: ?Sized + PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// An Outlook item's id within one mailbox: opaque, non-empty, at most [`ENTRY_ID_LEN_MAX`] bytes.
/// Cheap to clone (shared string).
#[derive(Clone, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EntryId(Arc<str>);

impl PartialEq for EntryId {
    /// Two clones of one id are equal without reading the text (which, for a pair's id met again
    /// while settling, sits on a line last touched long ago).
    #[inline]
    fn eq(&self, other: &EntryId) -> bool {
        same_shared(&self.0, &other.0)
    }
}

impl std::hash::Hash for EntryId {
    /// As the derived hash (of the text), kept with the hand-written `PartialEq`.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}

impl EntryId {
    pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
        Self::from_str_checked(&id.into())
    }

    /// As [`EntryId::new`], copying the text once (into the shared string) instead of first
    /// into an owned `String`.
    pub fn from_str_checked(id: &str) -> Result<Self, IdError> {
        if id.is_empty() {
            return Err(IdError::EmptyEntryId);
        }
        if id.len() > ENTRY_ID_LEN_MAX {
            let prefix = id.chars().take(16).collect();
            return Err(IdError::EntryIdTooLong { len: id.len(), prefix });
        }
        Ok(Self(id.into()))
    }

    /// Asks for the line of the string's counts (what a clone or drop writes).
    #[inline(always)]
    pub(crate) fn prefetch(&self) {
        crate::prefetch::arc_counts(&self.0);
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for EntryId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::new(s)
    }
}

impl From<EntryId> for String {
    fn from(id: EntryId) -> String {
        id.0.to_string()
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryId({})", self.0)
    }
}

/// A meeting's id shared by every attendee's copy of it. Bytes; written as lower-case hex.
#[derive(Clone, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GlobalObjectId(Arc<[u8]>);

impl PartialEq for GlobalObjectId {
    /// Two clones of one id are equal without reading the bytes.
    #[inline]
    fn eq(&self, other: &GlobalObjectId) -> bool {
        same_shared(&self.0, &other.0)
    }
}

impl std::hash::Hash for GlobalObjectId {
    /// As the derived hash (of the bytes), kept with the hand-written `PartialEq`.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}

impl GlobalObjectId {
    /// Asks for the line of the id's counts (what a clone or drop writes).
    #[inline(always)]
    pub(crate) fn prefetch(&self) {
        crate::prefetch::arc_counts(&self.0);
    }
}

impl GlobalObjectId {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, IdError> {
        let bytes: Vec<u8> = bytes.into();
        if bytes.is_empty() {
            return Err(IdError::EmptyGlobalObjectId);
        }
        if bytes.len() > GLOBAL_OBJECT_ID_LEN_MAX {
            return Err(IdError::GlobalObjectIdTooLong(bytes.len()));
        }
        Ok(Self(bytes.into()))
    }

    pub fn from_hex(hex: &str) -> Result<Self, IdError> {
        let not_hex = || IdError::NotHex(hex.chars().take(64).collect());
        if hex.len() % 2 != 0 {
            return Err(not_hex());
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| hex.get(i..i + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok()))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(not_hex)?;
        Self::new(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl TryFrom<String> for GlobalObjectId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::from_hex(&s)
    }
}

impl From<GlobalObjectId> for String {
    fn from(id: GlobalObjectId) -> String {
        id.to_hex()
    }
}

impl fmt::Display for GlobalObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for GlobalObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GlobalObjectId({})", self.to_hex())
    }
}

/// The CRM side's change timestamp: a per-organisation, strictly increasing counter stamped on a
/// record at each write (SQL Server `rowversion`). Comparable across the records of one server.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug, Default)]
#[serde(transparent)]
pub struct VersionNumber(pub u64);

impl fmt::Display for VersionNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nil_crm_id_is_refused() {
        assert_eq!(CrmId::new(Uuid::nil()), Err(IdError::NilCrmId));
        assert_eq!("00000000-0000-0000-0000-000000000000".parse::<CrmId>(), Err(IdError::NilCrmId));
        assert_eq!("zz".parse::<CrmId>(), Err(IdError::NotAGuid("zz".into())));
    }

    #[test]
    fn entry_id_limits() {
        assert_eq!(EntryId::new(""), Err(IdError::EmptyEntryId));
        let long = "A".repeat(ENTRY_ID_LEN_MAX + 1);
        assert_eq!(
            EntryId::new(long),
            Err(IdError::EntryIdTooLong { len: ENTRY_ID_LEN_MAX + 1, prefix: "A".repeat(16) })
        );
        assert!(EntryId::new("A".repeat(ENTRY_ID_LEN_MAX)).is_ok());
    }

    #[test]
    fn goid_hex_round_trip_and_errors() {
        let goid = GlobalObjectId::new(vec![0x04, 0x00, 0xab]).unwrap();
        assert_eq!(goid.to_hex(), "0400ab");
        assert_eq!(GlobalObjectId::from_hex("0400ab").unwrap(), goid);
        assert_eq!(GlobalObjectId::from_hex("0g"), Err(IdError::NotHex("0g".into())));
        assert_eq!(GlobalObjectId::from_hex("abc"), Err(IdError::NotHex("abc".into())));
        assert_eq!(GlobalObjectId::from_hex(""), Err(IdError::EmptyGlobalObjectId));
        assert_eq!(
            GlobalObjectId::new(vec![1; GLOBAL_OBJECT_ID_LEN_MAX + 1]),
            Err(IdError::GlobalObjectIdTooLong(GLOBAL_OBJECT_ID_LEN_MAX + 1))
        );
    }

    #[test]
    fn deserialising_validates() {
        let nil = "\"00000000-0000-0000-0000-000000000000\"";
        assert!(serde_json::from_str::<CrmId>(nil).is_err());
        assert!(serde_json::from_str::<EntryId>("\"\"").is_err());
        assert!(serde_json::from_str::<GlobalObjectId>("\"xyz\"").is_err());
        let id: EntryId = serde_json::from_str("\"00AB\"").unwrap();
        assert_eq!(id.as_str(), "00AB");
    }

    #[test]
    fn successor_is_stable_and_distinct() {
        let id: CrmId = "6f9619ff-8b86-d011-b42d-00c04fc964ff".parse().unwrap();
        assert_eq!(id.successor(), id.successor());
        assert_ne!(id.successor(), id);
        assert_ne!(id.successor().successor(), id.successor());
    }
}
