//! Field values of a record (`Fields`) and the edits to write to one side (`FieldPatch`).
//!
//! `Fields` is an ordered map of field name to value, immutable and shared in one block: cloning
//! one is a reference-count increment and comparing two reads two blocks, which is what lets a
//! plan of a million changes carry and compare field sets without chasing a pointer per string.
//! Every limit here is checked when a value is built, including when it is deserialised.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Most fields one record may carry.
pub const FIELD_COUNT_MAX: usize = 128;
/// Longest field name, in bytes.
pub const FIELD_NAME_LEN_MAX: usize = 64;
/// Longest field value, in bytes (a body or description can be long; 512 KiB is far past any).
pub const FIELD_VALUE_LEN_MAX: usize = 512 << 10;

/// Why a field set was refused. Every variant carries the offending name or size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
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
    #[error("{0} bytes of names and values, more than the {FIELDS_DATA_LEN_MAX} one record may hold")]
    TooLarge(usize),
}

/// An ordered map of field name to value (subject, start, end, location, full name, ...).
///
/// Stored as one shared string, so that cloning is one reference-count increment, comparing two
/// field sets is one string comparison, and reading a record touches one allocation:
///
/// ```text
/// count (2 digits) | per field: name_end, value_end (4 digits each) | names and values
/// ```
///
/// Digits are base 32 written as the ASCII bytes `'0'..='O'`; offsets count from the start of the
/// names and values, which is why a field set holds at most [`FIELDS_DATA_LEN_MAX`] bytes.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Fields(Option<Arc<str>>);

/// Most bytes of names and values one field set may hold (the largest offset four base-32
/// digits can write).
pub const FIELDS_DATA_LEN_MAX: usize = (1 << 20) - 1;

const COUNT_DIGITS: usize = 2;
const OFFSET_DIGITS: usize = 4;
const SPAN_LEN: usize = 2 * OFFSET_DIGITS;

fn write_digits(out: &mut String, mut n: usize, digits: usize) {
    let mut buf = [b'0'; OFFSET_DIGITS];
    for slot in buf[..digits].iter_mut().rev() {
        *slot = b'0' + (n % 32) as u8;
        n /= 32;
    }
    debug_assert_eq!(n, 0, "number too large for its digits");
    buf[..digits].iter().for_each(|&b| out.push(b as char));
}

fn read_digits(bytes: &[u8]) -> usize {
    bytes.iter().fold(0, |n, &b| n * 32 + (b - b'0') as usize)
}

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
        let mut sorted: Vec<(N, V)> = Vec::new();
        for (name, value) in pairs {
            check_name(name.as_ref())?;
            if value.as_ref().len() > FIELD_VALUE_LEN_MAX {
                let name = name.as_ref().to_owned();
                return Err(FieldsError::ValueTooLong { name, len: value.as_ref().len() });
            }
            sorted.push((name, value));
            if sorted.len() > FIELD_COUNT_MAX {
                return Err(FieldsError::TooMany(sorted.len()));
            }
        }
        let data_len: usize = sorted.iter().map(|(n, v)| n.as_ref().len() + v.as_ref().len()).sum();
        if data_len > FIELDS_DATA_LEN_MAX {
            return Err(FieldsError::TooLarge(data_len));
        }
        sorted.sort_by(|a, b| a.0.as_ref().cmp(b.0.as_ref()));
        if let Some(dup) = sorted.windows(2).find(|w| w[0].0.as_ref() == w[1].0.as_ref()) {
            return Err(FieldsError::Duplicate(dup[0].0.as_ref().to_owned()));
        }
        let mut builder = FieldsBuilder::with_capacity(sorted.len());
        for (name, value) in &sorted {
            builder.push(name.as_ref(), value.as_ref());
        }
        builder.build()
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The fields in name order, decoding each offset once.
    pub fn iter(&self) -> FieldsIter<'_> {
        let text = self.0.as_deref().unwrap_or("");
        let len = self.len();
        FieldsIter { text, index: 0, len, data: COUNT_DIGITS + SPAN_LEN * len, prev_end: 0 }
    }

    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |text| read_digits(&text.as_bytes()[..COUNT_DIGITS]))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The fields for which `keep(name)` holds.
    pub(crate) fn filtered(&self, mut keep: impl FnMut(&str) -> bool) -> Fields {
        if self.iter().all(|(n, _)| keep(n)) {
            return self.clone();
        }
        let mut builder = FieldsBuilder::with_capacity(self.len());
        for (name, value) in self.iter().filter(|(n, _)| keep(n)) {
            builder.push(name, value);
        }
        builder.build().expect("a subset of a valid field set is valid")
    }

    /// Byte size of names and values, as the server's `DataSize` counts it.
    pub fn data_size(&self) -> usize {
        self.0.as_ref().map_or(0, |text| text.len() - COUNT_DIGITS - SPAN_LEN * self.len())
    }
}

/// The fields of a `Fields` in name order.
pub struct FieldsIter<'a> {
    text: &'a str,
    index: usize,
    len: usize,
    /// Where the names and values start.
    data: usize,
    /// Where the previous field's value ended, from `data`.
    prev_end: usize,
}

impl<'a> Iterator for FieldsIter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<(&'a str, &'a str)> {
        if self.index == self.len {
            return None;
        }
        let span = COUNT_DIGITS + SPAN_LEN * self.index;
        let bytes = &self.text.as_bytes()[span..span + SPAN_LEN];
        let name_end = read_digits(&bytes[..OFFSET_DIGITS]);
        let value_end = read_digits(&bytes[OFFSET_DIGITS..]);
        let (start, data) = (self.prev_end, self.data);
        self.index += 1;
        self.prev_end = value_end;
        Some((&self.text[data + start..data + name_end], &self.text[data + name_end..data + value_end]))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.len - self.index, Some(self.len - self.index))
    }
}

impl ExactSizeIterator for FieldsIter<'_> {}

/// Builds a `Fields` from names pushed in strictly increasing order, taken from other field sets
/// or already checked against the limits (checked again in debug builds).
pub(crate) struct FieldsBuilder {
    text: String,
    ends: Vec<(u32, u32)>,
}

impl FieldsBuilder {
    pub(crate) fn with_capacity(fields: usize) -> Self {
        FieldsBuilder { text: String::with_capacity(fields * 16), ends: Vec::with_capacity(fields) }
    }

    /// Appends a field; `build` refuses the set if it grew past a limit.
    pub(crate) fn push(&mut self, name: &str, value: &str) {
        debug_assert!(self.last_name().is_none_or(|last| last < name), "names not sorted/distinct");
        debug_assert!(!name.is_empty() && name.len() <= FIELD_NAME_LEN_MAX);
        self.text.push_str(name);
        let name_end = self.text.len() as u32;
        self.text.push_str(value);
        self.ends.push((name_end, self.text.len() as u32));
    }

    fn last_name(&self) -> Option<&str> {
        let (name_end, _) = *self.ends.last()?;
        let start = if self.ends.len() < 2 { 0 } else { self.ends[self.ends.len() - 2].1 };
        Some(&self.text[start as usize..name_end as usize])
    }

    /// The field set; an error if it holds more fields or bytes than one record may (a merge of
    /// two large sides can).
    pub(crate) fn build(self) -> Result<Fields, FieldsError> {
        if self.ends.is_empty() {
            return Ok(Fields(None));
        }
        if self.ends.len() > FIELD_COUNT_MAX {
            return Err(FieldsError::TooMany(self.ends.len()));
        }
        if self.text.len() > FIELDS_DATA_LEN_MAX {
            return Err(FieldsError::TooLarge(self.text.len()));
        }
        let mut block = String::with_capacity(COUNT_DIGITS + SPAN_LEN * self.ends.len() + self.text.len());
        write_digits(&mut block, self.ends.len(), COUNT_DIGITS);
        for (name_end, value_end) in &self.ends {
            write_digits(&mut block, *name_end as usize, OFFSET_DIGITS);
            write_digits(&mut block, *value_end as usize, OFFSET_DIGITS);
        }
        block.push_str(&self.text);
        Ok(Fields(Some(Arc::from(block))))
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
        write_edits(f, self.iter().map(|(n, v)| (n, Some(v))))
    }
}

/// Writes `{name: "value", other: (cleared)}`.
fn write_edits<'a>(
    f: &mut fmt::Formatter<'_>,
    edits: impl Iterator<Item = (&'a str, Option<&'a str>)>,
) -> fmt::Result {
    f.write_str("{")?;
    for (i, (name, value)) in edits.enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        match value {
            Some(value) => write!(f, "{sep}{name}: {value:?}")?,
            None => write!(f, "{sep}{name}: (cleared)")?,
        }
    }
    f.write_str("}")
}

impl Serialize for Fields {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Fields {
    /// Reads a map of name to value straight into a field set: names and values are borrowed
    /// from the input where the format allows (no escapes), and every limit of
    /// [`Fields::try_from_pairs`] is checked. A name given twice is refused
    /// ([`FieldsError::Duplicate`]), not silently resolved to one of its values.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(FieldsVisitor)
    }
}

struct FieldsVisitor;

impl<'de> serde::de::Visitor<'de> for FieldsVisitor {
    type Value = Fields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of field name to value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut pairs: Vec<(Text<'de>, Text<'de>)> = Vec::with_capacity(map.size_hint().unwrap_or(0).min(16));
        while let Some(pair) = map.next_entry::<Text<'de>, Text<'de>>()? {
            if pairs.len() == FIELD_COUNT_MAX {
                // Refuse before reading (and allocating) any more of an oversized input.
                return Err(serde::de::Error::custom(FieldsError::TooMany(FIELD_COUNT_MAX + 1)));
            }
            pairs.push(pair);
        }
        Fields::try_from_pairs(pairs).map_err(serde::de::Error::custom)
    }
}

/// A string read by serde: borrowed from the input when it can be, owned when it must be.
struct Text<'de>(std::borrow::Cow<'de, str>);

impl AsRef<str> for Text<'_> {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> serde::de::Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(std::borrow::Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(std::borrow::Cow::Owned(v)))
            }
        }
        d.deserialize_str(TextVisitor)
    }
}

/// A set of field positions (a field set holds at most [`FIELD_COUNT_MAX`] = 128 fields).
pub(crate) type Mask = u128;
const _: () = assert!(FIELD_COUNT_MAX <= Mask::BITS as usize);

/// The edits to write to one side: each named field is set to a value, or cleared (`None`).
/// A field not named is left as the side has it. Serialised as a map whose cleared fields are
/// `null`.
///
/// Stored without copying: the values set are picked by position from one field set (`to`), the
/// names cleared from another (`from`).
#[derive(Clone, Default)]
pub struct FieldPatch {
    to: Fields,
    set: Mask,
    from: Fields,
    clear: Mask,
}

impl FieldPatch {
    /// Sets the fields of `to` at the positions in `set`; clears the names of `from` at the
    /// positions in `clear`. No name may be both set and cleared.
    pub(crate) fn new(to: Fields, set: Mask, from: Fields, clear: Mask) -> Self {
        let within = |mask: Mask, f: &Fields| f.len() >= 128 || mask >> f.len() == 0;
        debug_assert!(within(set, &to) && within(clear, &from), "positions past the field set");
        FieldPatch { to, set, from, clear }
    }

    /// The patch that turns `from` into `to`.
    pub fn between(from: &Fields, to: &Fields) -> FieldPatch {
        if from == to {
            return FieldPatch::default();
        }
        let (mut set, mut clear): (Mask, Mask) = (0, 0);
        let mut old = from.iter().enumerate().peekable();
        let mut new = to.iter().enumerate().peekable();
        loop {
            match (old.peek(), new.peek()) {
                (Some(&(i, (na, va))), Some(&(j, (nb, vb)))) => {
                    if na == nb {
                        if va != vb {
                            set |= 1 << j;
                        }
                        old.next();
                        new.next();
                    } else if na < nb {
                        clear |= 1 << i;
                        old.next();
                    } else {
                        set |= 1 << j;
                        new.next();
                    }
                }
                (Some(&(i, _)), None) => {
                    clear |= 1 << i;
                    old.next();
                }
                (None, Some(&(j, _))) => {
                    set |= 1 << j;
                    new.next();
                }
                (None, None) => break,
            }
        }
        FieldPatch::new(to.clone(), set, from.clone(), clear)
    }

    pub fn is_empty(&self) -> bool {
        self.set == 0 && self.clear == 0
    }

    pub fn len(&self) -> usize {
        (self.set.count_ones() + self.clear.count_ones()) as usize
    }

    /// The edits in name order.
    pub fn iter<'a>(&'a self) -> impl Iterator<Item = (&'a str, Option<&'a str>)> {
        let picked =
            |mask: Mask| move |(i, field): (usize, (&'a str, &'a str))| (mask >> i & 1 == 1).then_some(field);
        let set = self.to.iter().enumerate().filter_map(picked(self.set)).map(|(n, v)| (n, Some(v)));
        let clear = self.from.iter().enumerate().filter_map(picked(self.clear)).map(|(n, _)| (n, None));
        let mut edits: Vec<(&str, Option<&str>)> = set.chain(clear).collect();
        edits.sort_unstable_by(|a, b| a.0.cmp(b.0));
        edits.into_iter()
    }

    /// `fields` with this patch written over it; an error if the result would pass a limit.
    pub fn apply(&self, fields: &Fields) -> Result<Fields, FieldsError> {
        let mut map: BTreeMap<&str, &str> = fields.iter().collect();
        for (name, value) in self.iter() {
            match value {
                Some(value) => map.insert(name, value),
                None => map.remove(name),
            };
        }
        let mut builder = FieldsBuilder::with_capacity(map.len());
        for (name, value) in map {
            builder.push(name, value);
        }
        builder.build()
    }
}

impl PartialEq for FieldPatch {
    fn eq(&self, other: &FieldPatch) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for FieldPatch {}

impl Serialize for FieldPatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for FieldPatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, Option<String>>::deserialize(d)?;
        let set = Fields::try_from_pairs(map.iter().filter_map(|(n, v)| Some((n, v.as_ref()?))))
            .map_err(serde::de::Error::custom)?;
        let cleared = Fields::try_from_pairs(map.iter().filter(|(_, v)| v.is_none()).map(|(n, _)| (n, "")))
            .map_err(serde::de::Error::custom)?;
        let all = |f: &Fields| if f.len() == 128 { Mask::MAX } else { (1 << f.len()) - 1 };
        let (set_mask, clear_mask) = (all(&set), all(&cleared));
        Ok(FieldPatch::new(set, set_mask, cleared, clear_mask))
    }
}

impl fmt::Debug for FieldPatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl fmt::Display for FieldPatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_edits(f, self.iter())
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
        let big = "v".repeat(FIELD_VALUE_LEN_MAX);
        assert_eq!(
            Fields::try_from_pairs([("a", big.as_str()), ("b", big.as_str())]),
            Err(FieldsError::TooLarge(2 * FIELD_VALUE_LEN_MAX + 2))
        );
    }

    #[test]
    fn the_block_reads_back_every_field_at_the_limits() {
        let names: Vec<String> = (0..FIELD_COUNT_MAX).map(|i| format!("field{i:03}")).collect();
        let value = "é".repeat(3000);
        let f = Fields::try_from_pairs(names.iter().map(|n| (n.as_str(), value.as_str()))).unwrap();
        assert_eq!(f.len(), FIELD_COUNT_MAX);
        assert!(f.iter().zip(&names).all(|((n, v), name)| n == name && v == value));
        assert_eq!(f.get("field127"), Some(value.as_str()));
        assert_eq!(f.data_size(), names.iter().map(|n| n.len() + value.len()).sum::<usize>());
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
        let g0 = Fields::try_from_pairs([("b", "2"), ("c", "3")]).unwrap();
        let patch = FieldPatch::between(&f, &g0);
        let g = patch.apply(&f).unwrap();
        assert_eq!(g, Fields::try_from_pairs([("b", "2"), ("c", "3")]).unwrap());
        let json = serde_json::to_string(&patch).unwrap();
        assert_eq!(json, r#"{"a":null,"c":"3"}"#);
        assert_eq!(serde_json::from_str::<FieldPatch>(&json).unwrap(), patch);
        assert!(serde_json::from_str::<FieldPatch>(r#"{"":"x"}"#).is_err());
    }
}
