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
/// count (2 digits) | name_end per field (4 digits each) | names
///                  | value_end per field (4 digits each) | values
/// ```
///
/// Digits are base 32 written as the ASCII bytes `'0'..='O'`, most significant first; a name's
/// end counts from the start of the names, a value's from the start of the values, which is why
/// a field set holds at most [`FIELDS_DATA_LEN_MAX`] bytes.
///
/// Invariant: the names are distinct and in increasing order, and the encoding of a set is
/// unique. The part up to the end of the names (the *schema*: which fields, in which order) is
/// therefore byte-equal for two sets exactly when they name the same fields, which lets a diff
/// or merge of sets with the same fields compare values by position.
#[derive(Clone, Default, Eq)]
pub struct Fields(Option<Arc<str>>);

impl std::hash::Hash for Fields {
    /// As the derived hash (of the block), kept with the hand-written `PartialEq`.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}

impl PartialEq for Fields {
    /// Two clones of one set are equal without reading the block (an echo of the pair's own base
    /// is often that very block).
    #[inline]
    fn eq(&self, other: &Fields) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => crate::ids::same_shared(a, b),
            (a, b) => a.is_none() && b.is_none(),
        }
    }
}

/// Most bytes of names and values one field set may hold (the largest offset four base-32
/// digits can write).
pub const FIELDS_DATA_LEN_MAX: usize = (1 << 20) - 1;

const COUNT_DIGITS: usize = 2;
const OFFSET_DIGITS: usize = 4;

fn write_digits(out: &mut String, mut n: usize, digits: usize) {
    let mut buf = [b'0'; OFFSET_DIGITS];
    for slot in buf[..digits].iter_mut().rev() {
        *slot = b'0' + (n % 32) as u8;
        n /= 32;
    }
    debug_assert_eq!(n, 0, "number too large for its digits");
    buf[..digits].iter().for_each(|&b| out.push(b as char));
}

/// Whether two byte strings are equal. Inline for the short values most fields hold, where a
/// call to the library's `memcmp` costs more than the compare: two overlapping words of up to
/// eight bytes cover up to twice their width.
#[inline(always)]
pub(crate) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    fn word<const N: usize>(s: &[u8], at: usize) -> Option<&[u8; N]> {
        s.get(at..)?.first_chunk::<N>()
    }
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        0 => true,
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=8 => word::<4>(a, 0) == word::<4>(b, 0) && word::<4>(a, n - 4) == word::<4>(b, n - 4),
        9..=16 => word::<8>(a, 0) == word::<8>(b, 0) && word::<8>(a, n - 8) == word::<8>(b, n - 8),
        _ => a == b,
    }
}

/// Reads the four base-32 digits at `at`: each byte is `'0' + digit` with digit < 32, so one
/// subtraction without borrows leaves the four digits, which shifts put together.
#[inline(always)]
fn read4(bytes: &[u8], at: usize) -> usize {
    let Some(&digits) = bytes.get(at..at + OFFSET_DIGITS).and_then(|b| b.first_chunk::<OFFSET_DIGITS>())
    else {
        debug_assert!(false, "an offset past the block");
        return 0;
    };
    // Each byte holds one digit's five bits; gather them two bytes at a time, then both pairs.
    let x = u32::from_be_bytes(digits).wrapping_sub(0x3030_3030) & 0x1f1f_1f1f;
    let pairs = (x & 0x001f_001f) | (x >> 3 & 0x03e0_03e0);
    ((pairs >> 6 & 0x000f_fc00) | (pairs & 0x3ff)) as usize
}

/// A field set's block with its regions located: decoded once, then any field is read by
/// position.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    text: &'a str,
    len: usize,
    /// Where the names start.
    names: usize,
    /// Where the value ends start.
    value_ends: usize,
    /// Where the values start.
    values: usize,
}

impl<'a> View<'a> {
    fn new(fields: &'a Fields) -> Self {
        let text = fields.0.as_deref().unwrap_or("");
        if text.is_empty() {
            return View { text, len: 0, names: 0, value_ends: 0, values: 0 };
        }
        let bytes = text.as_bytes();
        let len = (bytes[0] - b'0') as usize * 32 + (bytes[1] - b'0') as usize;
        let names = COUNT_DIGITS + OFFSET_DIGITS * len;
        let value_ends = names + read4(bytes, names - OFFSET_DIGITS);
        View { text, len, names, value_ends, values: value_ends + OFFSET_DIGITS * len }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The encoded count, name ends and names: equal for two sets exactly when they name the
    /// same fields (see the invariant on [`Fields`]).
    pub(crate) fn schema(&self) -> &'a [u8] {
        &self.text.as_bytes()[..self.value_ends]
    }

    /// The end of the `i`th name (from the start of the names), or of the `i`th value.
    #[inline(always)]
    fn ends(&self, i: usize, region: usize) -> (usize, usize) {
        let bytes = self.text.as_bytes();
        let at = region + OFFSET_DIGITS * i;
        let start = if i == 0 { 0 } else { read4(bytes, at - OFFSET_DIGITS) };
        (start, read4(bytes, at))
    }

    #[inline]
    pub(crate) fn name(&self, i: usize) -> &'a str {
        let (start, end) = self.ends(i, COUNT_DIGITS);
        &self.text[self.names + start..self.names + end]
    }

    #[inline]
    pub(crate) fn value(&self, i: usize) -> &'a str {
        let (start, end) = self.ends(i, self.value_ends);
        &self.text[self.values + start..self.values + end]
    }

    /// The positions at which the values of two sets of the same schema differ.
    pub(crate) fn values_differ(&self, other: &View<'_>) -> Mask {
        let (a, b) = (self.text.as_bytes(), other.text.as_bytes());
        let (mut start_a, mut start_b, mut differ): (usize, usize, Mask) = (0, 0, 0);
        for i in 0..self.len.min(other.len) {
            let end_a = read4(a, self.value_ends + OFFSET_DIGITS * i);
            let end_b = read4(b, other.value_ends + OFFSET_DIGITS * i);
            let same = match (
                a.get(self.values + start_a..self.values + end_a),
                b.get(other.values + start_b..other.values + end_b),
            ) {
                (Some(x), Some(y)) => same_bytes(x, y),
                (x, y) => x == y,
            };
            if !same {
                differ |= 1 << i;
            }
            (start_a, start_b) = (end_a, end_b);
        }
        differ
    }

    /// The `i`th value's bytes, for comparing (no character boundary to check).
    #[inline]
    pub(crate) fn value_bytes(&self, i: usize) -> &'a [u8] {
        let (start, end) = self.ends(i, self.value_ends);
        &self.text.as_bytes()[self.values + start..self.values + end]
    }
}

impl Fields {
    /// Asks for the line of the block's counts (what a clone or drop writes; an `Arc`'s counts sit
    /// in the 16 bytes before its data).
    #[inline(always)]
    pub(crate) fn prefetch(&self) {
        if let Some(block) = &self.0 {
            crate::prefetch::arc_counts(block);
        }
    }

    /// Asks for the block's counts and every line of its text (what a diff or merge reads).
    #[inline(always)]
    pub(crate) fn prefetch_all(&self) {
        if let Some(block) = &self.0 {
            let counts = crate::prefetch::arc_counts_ptr(block);
            crate::prefetch::line(counts);
            let mut offset = 64;
            while offset < block.len() + 16 {
                crate::prefetch::line(counts.wrapping_add(offset));
                offset += 64;
            }
        }
    }

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

    /// The fields in name order.
    pub fn iter(&self) -> FieldsIter<'_> {
        FieldsIter { view: self.view(), index: 0 }
    }

    /// Whether both are one block (clones of one set), without reading it.
    fn same_block(&self, other: &Fields) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (a, b) => a.is_none() && b.is_none(),
        }
    }

    pub(crate) fn view(&self) -> View<'_> {
        View::new(self)
    }

    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |text| {
            let bytes = text.as_bytes();
            (bytes[0] - b'0') as usize * 32 + (bytes[1] - b'0') as usize
        })
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
        self.0.as_ref().map_or(0, |text| text.len() - COUNT_DIGITS - 2 * OFFSET_DIGITS * self.len())
    }
}

/// The fields of a `Fields` in name order.
pub struct FieldsIter<'a> {
    view: View<'a>,
    index: usize,
}

impl<'a> Iterator for FieldsIter<'a> {
    type Item = (&'a str, &'a str);

    #[inline]
    fn next(&mut self) -> Option<(&'a str, &'a str)> {
        if self.index == self.view.len {
            return None;
        }
        let i = self.index;
        self.index += 1;
        Some((self.view.name(i), self.view.value(i)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.view.len - self.index, Some(self.view.len - self.index))
    }
}

impl ExactSizeIterator for FieldsIter<'_> {}

/// Builds a `Fields` from names pushed in strictly increasing order, taken from other field sets
/// or already checked against the limits (checked again in debug builds).
pub(crate) struct FieldsBuilder {
    names: String,
    values: String,
    ends: Vec<(u32, u32)>,
}

impl FieldsBuilder {
    pub(crate) fn with_capacity(fields: usize) -> Self {
        FieldsBuilder {
            names: String::with_capacity(fields * 12),
            values: String::with_capacity(fields * 16),
            ends: Vec::with_capacity(fields),
        }
    }

    /// Appends a field; `build` refuses the set if it grew past a limit.
    pub(crate) fn push(&mut self, name: &str, value: &str) {
        debug_assert!(self.last_name().is_none_or(|last| last < name), "names not sorted/distinct");
        debug_assert!(!name.is_empty() && name.len() <= FIELD_NAME_LEN_MAX);
        self.names.push_str(name);
        self.values.push_str(value);
        self.ends.push((self.names.len() as u32, self.values.len() as u32));
    }

    fn last_name(&self) -> Option<&str> {
        let (name_end, _) = *self.ends.last()?;
        let start = if self.ends.len() < 2 { 0 } else { self.ends[self.ends.len() - 2].0 };
        Some(&self.names[start as usize..name_end as usize])
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
        let data_len = self.names.len() + self.values.len();
        if data_len > FIELDS_DATA_LEN_MAX {
            return Err(FieldsError::TooLarge(data_len));
        }
        let n = self.ends.len();
        let mut block = String::with_capacity(COUNT_DIGITS + 2 * OFFSET_DIGITS * n + data_len);
        write_digits(&mut block, n, COUNT_DIGITS);
        for (name_end, _) in &self.ends {
            write_digits(&mut block, *name_end as usize, OFFSET_DIGITS);
        }
        block.push_str(&self.names);
        for (_, value_end) in &self.ends {
            write_digits(&mut block, *value_end as usize, OFFSET_DIGITS);
        }
        block.push_str(&self.values);
        Ok(Fields(Some(Arc::from(block))))
    }

    /// The set with the schema of `like` (its names, in its order) and the value of each field
    /// picked by `value(i)` (called more than once per field, giving the same value each time):
    /// only the value ends and values are written anew. An error if the values pass the size limit.
    pub(crate) fn same_schema<'a>(
        like: &View<'a>,
        mut value: impl FnMut(usize) -> &'a str,
    ) -> Result<Fields, FieldsError> {
        if like.len == 0 {
            return Ok(Fields(None));
        }
        let names_len = like.value_ends - like.names;
        let values_len: usize = (0..like.len).map(&mut value).map(str::len).sum();
        // Values from two sets within the limits can together pass them.
        if names_len + values_len > FIELDS_DATA_LEN_MAX {
            return Err(FieldsError::TooLarge(names_len + values_len));
        }
        let mut values_len = 0;
        let mut block = String::with_capacity(like.text.len() + 64);
        block.push_str(&like.text[..like.value_ends]);
        for i in 0..like.len {
            values_len += value(i).len();
            write_digits(&mut block, values_len, OFFSET_DIGITS);
        }
        for i in 0..like.len {
            block.push_str(value(i));
        }
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
/// names cleared from another (`from`). A plan holds two patches per update, so the rare parts
/// (clearing, and setting a field past the 64th) are boxed and a patch that sets nothing holds
/// no field set: a patch is 32 bytes.
#[derive(Clone, Default)]
pub struct FieldPatch {
    /// Where the values set come from; empty when nothing is set.
    to: Fields,
    /// The positions set among the first 64 of `to`.
    set: u64,
    /// Present only when a field is cleared or one past the 64th is set.
    rare: Option<Box<RareEdits>>,
}

/// The edits few patches make.
#[derive(Clone)]
struct RareEdits {
    /// The positions set past the 64th of `to` (bit 0: the 65th).
    set_high: u64,
    /// The names cleared and the set they are named in (`from`), when any are.
    clears: Option<(Fields, Mask)>,
}

impl FieldPatch {
    /// Sets the fields of `to` at the positions in `set`; clears the names of `from` at the
    /// positions in `clear`. No name may be both set and cleared.
    pub(crate) fn new(to: &Fields, set: Mask, from: &Fields, clear: Mask) -> Self {
        let within = |mask: Mask, f: &Fields| f.len() >= 128 || mask >> f.len() == 0;
        debug_assert!(within(set, to) && within(clear, from), "positions past the field set");
        let set_high = (set >> 64) as u64;
        let rare = (set_high != 0 || clear != 0)
            .then(|| Box::new(RareEdits { set_high, clears: (clear != 0).then(|| (from.clone(), clear)) }));
        FieldPatch { to: if set == 0 { Fields::empty() } else { to.clone() }, set: set as u64, rare }
    }

    /// The positions of `to` set.
    fn set_mask(&self) -> Mask {
        let high = self.rare.as_ref().map_or(0, |rare| rare.set_high);
        (high as Mask) << 64 | self.set as Mask
    }

    /// The names cleared: the set they are named in, and their positions in it.
    fn clears(&self) -> Option<(&Fields, Mask)> {
        self.rare.as_ref()?.clears.as_ref().map(|(from, clear)| (from, *clear))
    }

    /// The patch that turns `from` into `to`.
    pub fn between(from: &Fields, to: &Fields) -> FieldPatch {
        // One block: nothing to write. Two equal blocks are not compared whole first: they have
        // one schema, and the values compared below all agree.
        if from.same_block(to) {
            return FieldPatch::default();
        }
        let (a, b) = (from.view(), to.view());
        // Every field set, or every field cleared (a create; a record emptied).
        let all = |n: usize| if n >= 128 { Mask::MAX } else { (1 << n) - 1 };
        if a.len() == 0 || b.len() == 0 {
            return FieldPatch::new(to, all(b.len()), from, all(a.len()));
        }
        if a.schema() == b.schema() {
            // The same fields in the same positions: only values can differ.
            let set = a.values_differ(&b);
            return FieldPatch::new(to, set, from, 0);
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
        FieldPatch::new(to, set, from, clear)
    }

    #[inline(always)]
    pub(crate) fn prefetch(&self) {
        self.to.prefetch();
    }

    pub fn is_empty(&self) -> bool {
        self.set == 0 && self.rare.is_none()
    }

    pub fn len(&self) -> usize {
        let cleared = self.clears().map_or(0, |c| c.1.count_ones());
        (self.set_mask().count_ones() + cleared) as usize
    }

    /// The edits in name order.
    pub fn iter<'a>(&'a self) -> impl Iterator<Item = (&'a str, Option<&'a str>)> {
        let picked =
            |mask: Mask| move |(i, field): (usize, (&'a str, &'a str))| (mask >> i & 1 == 1).then_some(field);
        let set = self.to.iter().enumerate().filter_map(picked(self.set_mask())).map(|(n, v)| (n, Some(v)));
        let clears = self.clears().map(|(from, clear)| (from.iter(), clear));
        let clear = clears
            .into_iter()
            .flat_map(move |(from, clear)| from.enumerate().filter_map(picked(clear)))
            .map(|(n, _)| (n, None));
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
        Ok(FieldPatch::new(&set, set_mask, &cleared, clear_mask))
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

/// Names of some fields of one set, picked by position: the fields a merge found changed on both
/// sides. Stored without copying, as a `FieldPatch` is (a shared set and a mask of its first 64
/// positions; names past those are copied into a set of their own); reads as a list of names in
/// name order.
#[derive(Clone, Default)]
pub struct FieldNames {
    /// The set the names are picked from; empty when none is.
    from: Fields,
    /// The positions picked, or [`FieldNames::ALL`]: every name of `from`.
    picked: u64,
}

impl FieldNames {
    /// Every name of `from` (for a set of up to 64 fields, the same as picking each position).
    const ALL: u64 = u64::MAX;

    /// The names of `from` at the positions in `picked`.
    pub(crate) fn new(from: &Fields, picked: Mask) -> Self {
        debug_assert!(from.len() >= 128 || picked >> from.len() == 0, "positions past the field set");
        if picked == 0 {
            return FieldNames::default();
        }
        // Past the 64th position, or every one of the first 64 of a larger set (which `ALL`
        // would read as every name): the names go into a set of their own.
        if picked >> 64 != 0 || (picked as u64 == FieldNames::ALL && from.len() > 64) {
            let names: Vec<&str> = from
                .iter()
                .enumerate()
                .filter(|(i, _)| picked >> i & 1 == 1)
                .map(|(_, (name, _))| name)
                .collect();
            return FieldNames::of_sorted(&names);
        }
        FieldNames { from: from.clone(), picked: picked as u64 }
    }

    /// These names, distinct and in increasing order (checked again in debug builds).
    pub(crate) fn of_sorted(names: &[&str]) -> Self {
        if names.is_empty() {
            return FieldNames::default();
        }
        let mut builder = FieldsBuilder::with_capacity(names.len());
        for name in names {
            builder.push(name, "");
        }
        let from = builder.build().expect("names of one valid field set fit in one");
        FieldNames { from, picked: FieldNames::ALL }
    }

    pub fn is_empty(&self) -> bool {
        self.picked == 0
    }

    pub fn len(&self) -> usize {
        if self.picked == FieldNames::ALL { self.from.len() } else { self.picked.count_ones() as usize }
    }

    /// The names in name order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let picked = self.picked;
        let all = picked == FieldNames::ALL;
        self.from
            .iter()
            .enumerate()
            .filter(move |&(i, _)| all || (i < 64 && picked >> i & 1 == 1))
            .map(|(_, (name, _))| name)
    }

    pub fn to_vec(&self) -> Vec<String> {
        self.iter().map(str::to_owned).collect()
    }
}

impl PartialEq for FieldNames {
    fn eq(&self, other: &FieldNames) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for FieldNames {}

impl<const N: usize> PartialEq<[&str; N]> for FieldNames {
    fn eq(&self, other: &[&str; N]) -> bool {
        self.iter().eq(other.iter().copied())
    }
}

impl PartialEq<[String]> for FieldNames {
    fn eq(&self, other: &[String]) -> bool {
        self.iter().eq(other.iter().map(String::as_str))
    }
}

impl fmt::Debug for FieldNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl fmt::Display for FieldNames {
    /// `a, b, c`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, name) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(name)?;
        }
        Ok(())
    }
}

impl Serialize for FieldNames {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for FieldNames {
    /// A list of names, each checked as a field name; given in any order, kept in name order.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        let from = Fields::try_from_pairs(names.iter().map(|n| (n, ""))).map_err(serde::de::Error::custom)?;
        let picked = if from.is_empty() { 0 } else { FieldNames::ALL };
        Ok(FieldNames { from, picked })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Short values are compared inline: equal exactly when the slices are, whatever the length
    /// and wherever they differ.
    #[test]
    fn same_bytes_agrees_with_slice_equality() {
        for len in 0..=40usize {
            let a: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(37)).collect();
            assert!(same_bytes(&a, &a.clone()), "len {len}");
            for at in 0..len {
                let mut b = a.clone();
                b[at] ^= 0x20;
                assert!(!same_bytes(&a, &b), "len {len}, differing at {at}");
            }
            let longer: Vec<u8> = a.iter().copied().chain([0]).collect();
            assert!(!same_bytes(&a, &longer) && !same_bytes(&longer, &a), "len {len}");
        }
    }

    /// Every offset four digits can write reads back as itself, wherever it sits in a block.
    #[test]
    fn every_offset_reads_back_as_written() {
        let mut block = String::from("x");
        for n in 0..=FIELDS_DATA_LEN_MAX {
            block.truncate(1);
            write_digits(&mut block, n, OFFSET_DIGITS);
            assert_eq!(read4(block.as_bytes(), 1), n, "{block:?}");
        }
    }

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

    #[test]
    fn patches_and_names_past_the_64th_field() {
        // 100 fields: positions past 64 live in the boxed part of a patch, and conflict names
        // past them in a set of their own.
        let names: Vec<String> = (0..100).map(|i| format!("f{i:03}")).collect();
        let old = Fields::try_from_pairs(names.iter().map(|n| (n.as_str(), "x"))).unwrap();
        let new = Fields::try_from_pairs(names.iter().enumerate().map(|(i, n)| {
            let value = if i % 9 == 0 { "y" } else { "x" };
            (n.as_str(), value)
        }))
        .unwrap();
        let patch = FieldPatch::between(&old, &new);
        assert_eq!(patch.len(), 12);
        assert_eq!(patch.iter().last(), Some(("f099", Some("y"))));
        assert_eq!(patch.apply(&old).unwrap(), new);
        let json = serde_json::to_string(&patch).unwrap();
        assert_eq!(serde_json::from_str::<FieldPatch>(&json).unwrap(), patch);

        let picked: Mask = 1 << 3 | 1 << 70 | 1 << 99;
        let conflicts = FieldNames::new(&old, picked);
        assert_eq!(conflicts, ["f003", "f070", "f099"]);
        assert_eq!(conflicts.len(), 3);
        assert_eq!(FieldNames::new(&old, 1 << 5), ["f005"]);
        let first_64 = FieldNames::new(&old, (1 << 64) - 1);
        assert_eq!((first_64.len(), first_64.iter().last()), (64, Some("f063")));
        assert!(FieldNames::new(&old, 0).is_empty());
        let json = serde_json::to_string(&conflicts).unwrap();
        assert_eq!(json, r#"["f003","f070","f099"]"#);
        assert_eq!(serde_json::from_str::<FieldNames>(&json).unwrap(), conflicts);
        assert_eq!(conflicts.to_string(), "f003, f070, f099");
    }
}
