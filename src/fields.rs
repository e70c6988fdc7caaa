//! Field values of a record (`Fields`) and the edits to write to one side (`FieldPatch`).
//!
//! `Fields` is an ordered map of field name to value, immutable and shared: cloning one is a
//! reference-count increment, which is what lets a plan of a million changes carry field sets
//! around without copying strings. Every limit here is checked when a value is built, including
//! when it is deserialised.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Most fields one record may carry.
pub const FIELD_COUNT_MAX: usize = 128;
/// Longest field name, in bytes.
pub const FIELD_NAME_LEN_MAX: usize = 64;
/// Longest field value, in bytes (a body or description can be long; 1 MiB is far past any).
pub const FIELD_VALUE_LEN_MAX: usize = 1 << 20;

/// Why a field set was refused. Every variant carries the offending name or size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldsError {
    #[error("a field name must not be empty")]
    EmptyName,
    #[error("field name {0:?} is longer than {FIELD_NAME_LEN_MAX} bytes")]
    NameTooLong(String),
    #[error("field {name:?} holds {len} bytes, more than the {FIELD_VALUE_LEN_MAX} allowed")]
    ValueTooLong { name: String, len: usize },
    #[error("{0} fields, more than the {FIELD_COUNT_MAX} allowed")]
    TooMany(usize),
    #[error("field {0:?} is given twice")]
    Duplicate(String),
}

type Pair = (Arc<str>, Arc<str>);

/// An ordered map of field name to value (subject, start, end, location, full name, ...).
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Fields(Arc<[Pair]>);

impl Fields {
    pub fn empty() -> Self {
        Self::default()
    }

    /// Builds a field set, checking every limit. Names must be distinct.
    pub fn try_from_pairs<N, V>(pairs: impl IntoIterator<Item = (N, V)>) -> Result<Self, FieldsError>
    where
        N: AsRef<str>,
        V: AsRef<str>,
    {
        let mut sorted: Vec<Pair> = Vec::new();
        for (name, value) in pairs {
            let (name, value) = (name.as_ref(), value.as_ref());
            check_name(name)?;
            if value.len() > FIELD_VALUE_LEN_MAX {
                return Err(FieldsError::ValueTooLong { name: name.to_owned(), len: value.len() });
            }
            sorted.push((name.into(), value.into()));
            if sorted.len() > FIELD_COUNT_MAX {
                return Err(FieldsError::TooMany(sorted.len()));
            }
        }
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(dup) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(FieldsError::Duplicate(dup[0].0.to_string()));
        }
        Ok(Self(sorted.into()))
    }

    /// Builds from pairs already sorted by name, distinct and within limits (taken from other
    /// `Fields`). Checked in debug builds.
    pub(crate) fn from_sorted(pairs: Vec<Pair>) -> Self {
        debug_assert!(pairs.windows(2).all(|w| w[0].0 < w[1].0), "fields not sorted/distinct");
        debug_assert!(pairs.len() <= FIELD_COUNT_MAX);
        Self(pairs.into())
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.binary_search_by(|(n, _)| n.as_ref().cmp(name)).ok().map(|i| self.0[i].1.as_ref())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_ref(), v.as_ref()))
    }

    pub(crate) fn pairs(&self) -> &[Pair] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether both are the same shared value (a cheap first test before comparing contents).
    pub(crate) fn ptr_eq(&self, other: &Fields) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The fields for which `keep(name)` holds.
    pub(crate) fn filtered(&self, mut keep: impl FnMut(&str) -> bool) -> Fields {
        if self.0.iter().all(|(n, _)| keep(n)) {
            return self.clone();
        }
        Fields::from_sorted(self.0.iter().filter(|(n, _)| keep(n)).cloned().collect())
    }

    /// Byte size of names and values, as the server's `DataSize` counts it.
    pub fn data_size(&self) -> usize {
        self.0.iter().map(|(n, v)| n.len() + v.len()).sum()
    }
}

fn check_name(name: &str) -> Result<(), FieldsError> {
    if name.is_empty() {
        return Err(FieldsError::EmptyName);
    }
    if name.len() > FIELD_NAME_LEN_MAX {
        return Err(FieldsError::NameTooLong(name.chars().take(FIELD_NAME_LEN_MAX).collect()));
    }
    Ok(())
}

impl fmt::Debug for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl fmt::Display for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (name, value)) in self.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{name}: {value:?}")?;
        }
        f.write_str("}")
    }
}

impl Serialize for Fields {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A map format cannot carry a name twice past serde (the last wins), so duplicates in the
        // input are caught by formats that report them and otherwise collapse here.
        let map = BTreeMap::<String, String>::deserialize(d)?;
        Fields::try_from_pairs(map).map_err(serde::de::Error::custom)
    }
}

/// The edits to write to one side: each named field is set to a value, or cleared (`None`).
/// Sorted by name; a field not named is left as the side has it. Serialised as a map whose
/// cleared fields are `null`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct FieldPatch(Vec<(Arc<str>, Option<Arc<str>>)>);

impl Serialize for FieldPatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for FieldPatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, Option<String>>::deserialize(d)?;
        let mut edits = Vec::with_capacity(map.len());
        for (name, value) in map {
            check_name(&name).map_err(serde::de::Error::custom)?;
            if let Some(v) = &value {
                if v.len() > FIELD_VALUE_LEN_MAX {
                    let err = FieldsError::ValueTooLong { name, len: v.len() };
                    return Err(serde::de::Error::custom(err));
                }
            }
            edits.push((Arc::from(name), value.map(Arc::from)));
        }
        if edits.len() > FIELD_COUNT_MAX {
            return Err(serde::de::Error::custom(FieldsError::TooMany(edits.len())));
        }
        Ok(FieldPatch(edits))
    }
}

impl FieldPatch {
    pub(crate) fn from_sorted(edits: Vec<(Arc<str>, Option<Arc<str>>)>) -> Self {
        debug_assert!(edits.windows(2).all(|w| w[0].0 < w[1].0), "patch not sorted/distinct");
        Self(edits)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.0.iter().map(|(n, v)| (n.as_ref(), v.as_deref()))
    }

    /// `fields` with this patch written over it.
    pub fn apply(&self, fields: &Fields) -> Fields {
        let mut map: BTreeMap<Arc<str>, Arc<str>> = fields.pairs().iter().cloned().collect();
        for (name, value) in &self.0 {
            match value {
                Some(value) => map.insert(name.clone(), value.clone()),
                None => map.remove(name),
            };
        }
        Fields::from_sorted(map.into_iter().collect())
    }
}

impl fmt::Debug for FieldPatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl fmt::Display for FieldPatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (name, value)) in self.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            match value {
                Some(value) => write!(f, "{sep}{name}: {value:?}")?,
                None => write!(f, "{sep}{name}: (cleared)")?,
            }
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_sorted_and_reads_back() {
        let f = Fields::try_from_pairs([("subject", "Lunch"), ("location", "Room 1")]).unwrap();
        assert_eq!(f.iter().map(|(n, _)| n).collect::<Vec<_>>(), ["location", "subject"]);
        assert_eq!(f.get("subject"), Some("Lunch"));
        assert_eq!(f.get("body"), None);
        assert_eq!(f.data_size(), "location".len() + 6 + "subject".len() + 5);
    }

    #[test]
    fn every_limit_is_a_typed_error_with_the_value() {
        assert_eq!(Fields::try_from_pairs([("", "x")]), Err(FieldsError::EmptyName));
        let long_name = "n".repeat(FIELD_NAME_LEN_MAX + 1);
        assert_eq!(
            Fields::try_from_pairs([(long_name.as_str(), "x")]),
            Err(FieldsError::NameTooLong("n".repeat(FIELD_NAME_LEN_MAX)))
        );
        let long_value = "v".repeat(FIELD_VALUE_LEN_MAX + 1);
        assert_eq!(
            Fields::try_from_pairs([("body", long_value.as_str())]),
            Err(FieldsError::ValueTooLong { name: "body".into(), len: FIELD_VALUE_LEN_MAX + 1 })
        );
        let many = (0..=FIELD_COUNT_MAX).map(|i| (format!("f{i}"), String::new()));
        assert_eq!(Fields::try_from_pairs(many), Err(FieldsError::TooMany(FIELD_COUNT_MAX + 1)));
        assert_eq!(Fields::try_from_pairs([("a", "1"), ("a", "2")]), Err(FieldsError::Duplicate("a".into())));
    }

    #[test]
    fn serde_round_trip_checks_limits() {
        let f = Fields::try_from_pairs([("subject", "Lunch")]).unwrap();
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(json, r#"{"subject":"Lunch"}"#);
        assert_eq!(serde_json::from_str::<Fields>(&json).unwrap(), f);
        assert!(serde_json::from_str::<Fields>(r#"{"":"x"}"#).is_err());
    }

    #[test]
    fn patch_sets_and_clears() {
        let f = Fields::try_from_pairs([("a", "1"), ("b", "2")]).unwrap();
        let patch = FieldPatch::from_sorted(vec![("a".into(), None), ("c".into(), Some("3".into()))]);
        let g = patch.apply(&f);
        assert_eq!(g, Fields::try_from_pairs([("b", "2"), ("c", "3")]).unwrap());
        let json = serde_json::to_string(&patch).unwrap();
        assert_eq!(json, r#"{"a":null,"c":"3"}"#);
        assert_eq!(serde_json::from_str::<FieldPatch>(&json).unwrap(), patch);
        assert!(serde_json::from_str::<FieldPatch>(r#"{"":"x"}"#).is_err());
    }
}
