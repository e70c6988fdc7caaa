//! The prepare-sync summary (DOMAIN section 2): how many creates, updates and deletes the server
//! has prepared for one client, per entity type, and the XML the server answers *prepare sync*
//! with.
//!
//! This module owns the summary value ([`SyncSummary`], [`Counts`]) and its public XML format. It
//! does not compute a summary (the server store does, from the filtered record set and
//! `SyncEntry_<guid>`) and does no IO: it turns a value into a string and a string into a value.
//!
//! # The XML format, version 1
//!
//! Element and attribute names are a public format: they are fixed, and snapshot-tested in
//! `snapshots/summary_*.snap`.
//!
//! ```xml
//! <SyncSummary Version="1"><Entity ObjectTypeCode="2" Name="contact" Create="3" Update="1" Delete="0"/><Entity ObjectTypeCode="4201" Name="appointment" Create="0" Update="2" Delete="5"/></SyncSummary>
//! ```
//!
//! - The root is `<SyncSummary>` with one attribute, `Version`, which must be `"1"`.
//! - It holds one `<Entity>` per entity type that has something to do. An `<Entity>` has exactly
//!   the five attributes `ObjectTypeCode` (the Dynamics CRM code, see [`ObjectTypeCode`]), `Name`,
//!   `Create`, `Update` and `Delete`, all required. `Name` is informational: it is written from
//!   [`ObjectTypeCode::name`], and when read it must be that name for the code. The counts are
//!   decimal digits (no sign, no space), at most [`COUNT_MAX`].
//! - An empty summary is `<SyncSummary Version="1"/>`.
//!
//! Written: one line, no XML declaration, no whitespace between elements, the entities in code
//! order, the attributes in the order above; entity types whose three counts are zero are omitted.
//!
//! Read: a leading byte-order mark, an optional XML declaration, whitespace and comments between
//! elements, either quote, a self-closing `<Entity/>` or an empty `<Entity></Entity>`, entities in
//! any order, and character references in attribute values are accepted. An `<Entity>` whose
//! counts are all zero is accepted and dropped (it still counts towards duplicates and
//! [`ENTITY_COUNT_MAX`]). Everything else is an error carrying the offending value
//! ([`SummaryError`]): a DOCTYPE (and so any entity declaration: there is no billion-laughs
//! expansion to bound), text, CDATA, processing instructions, entity references outside attribute
//! values, unknown elements and attributes, a code given twice, and input over
//! [`SUMMARY_XML_LEN_MAX`] bytes, which is refused before it is parsed.
//!
//! ```
//! use crmsync::{ChangeKind, ObjectTypeCode, SyncSummary};
//!
//! let mut summary = SyncSummary::new();
//! summary.add(ObjectTypeCode::Contact, ChangeKind::Create, 3)?;
//! let xml = summary.to_xml();
//! assert_eq!(
//!     xml,
//!     r#"<SyncSummary Version="1"><Entity ObjectTypeCode="2" Name="contact" Create="3" Update="0" Delete="0"/></SyncSummary>"#
//! );
//! assert_eq!(SyncSummary::from_xml(&xml)?, summary);
//! # Ok::<(), crmsync::SummaryError>(())
//! ```

use std::collections::BTreeMap;

use quick_xml::XmlVersion;
use quick_xml::events::{BytesStart, Event};
use quick_xml::reader::Reader;
use serde::{Deserialize, Serialize};

use crate::change::ChangeKind;
use crate::entity::{ObjectTypeCode, UnknownObjectTypeCode};

/// Longest summary document read, in bytes. A full summary (every entity type, every count at
/// [`COUNT_MAX`]) is about 1 KiB; the rest is room for whitespace and comments.
pub const SUMMARY_XML_LEN_MAX: usize = 64 * 1024;
/// Largest count of one kind for one entity type. Far past any mailbox, and small enough that
/// every sum of counts in a summary fits a `u32`.
pub const COUNT_MAX: u32 = 100_000_000;
/// Most `<Entity>` elements in one summary: one per known entity type.
pub const ENTITY_COUNT_MAX: usize = ObjectTypeCode::ALL.len();
/// The only format version written and read.
pub const SUMMARY_VERSION: &str = "1";
/// Longest piece of input text (a name, a value, unexpected content) an error carries, in
/// characters; longer text is cut.
pub const ERROR_TEXT_LEN_MAX: usize = 64;

// Every sum `Counts::sum` and `SyncSummary::total` computes fits a u32.
const _: () = assert!((COUNT_MAX as u64) * 3 * (ENTITY_COUNT_MAX as u64) <= u32::MAX as u64);

const ROOT: &str = "SyncSummary";
const ENTITY: &str = "Entity";
const VERSION: &str = "Version";
const ROOT_ATTRIBUTES: [&str; 1] = [VERSION];
/// The attributes of `<Entity>`, in the order they are written.
const ENTITY_ATTRIBUTES: [&str; 5] = ["ObjectTypeCode", "Name", "Create", "Update", "Delete"];
const KINDS: [ChangeKind; 3] = [ChangeKind::Create, ChangeKind::Update, ChangeKind::Delete];

/// Why a summary was refused. Every variant carries the offending value (input text cut to
/// [`ERROR_TEXT_LEN_MAX`] characters) or the byte position in the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SummaryError {
    #[error("summary XML is {0} bytes, more than the {SUMMARY_XML_LEN_MAX} allowed")]
    TooLong(usize),
    /// Not well-formed XML, as the parser reports it (its message, and its byte position).
    #[error("malformed summary XML at byte {position}: {message}")]
    Malformed { position: u64, message: String },
    /// The input ended before `</SyncSummary>` (or before any root element).
    #[error("summary XML ends at byte {position} before </SyncSummary>")]
    Truncated { position: u64 },
    /// A `<!DOCTYPE ...>`, which is where entity declarations live: refused outright.
    #[error("summary XML has a DOCTYPE at byte {position}; DTDs and entity declarations are refused")]
    DocType { position: u64 },
    /// Text, CDATA, a processing instruction, an entity reference, a misplaced XML declaration or
    /// a second root element: content the format does not have. Carries the raw input.
    #[error("unexpected {content:?} at byte {position} of summary XML")]
    UnexpectedContent { content: String, position: u64 },
    #[error("root element is <{0}>, not <SyncSummary>")]
    WrongRoot(String),
    #[error("summary Version {0:?} is not supported (only {SUMMARY_VERSION:?})")]
    UnsupportedVersion(String),
    /// An element other than `<Entity>` inside `<SyncSummary>`, or any element inside `<Entity>`.
    #[error("unknown element <{name}> at byte {position} of summary XML")]
    UnknownElement { name: String, position: u64 },
    #[error("unknown attribute {attribute:?} on <{element}>")]
    UnknownAttribute { element: &'static str, attribute: String },
    #[error("attribute {attribute} is given twice on <{element}>")]
    DuplicateAttribute { element: &'static str, attribute: &'static str },
    #[error("<{element}> lacks the {attribute} attribute")]
    MissingAttribute { element: &'static str, attribute: &'static str },
    /// A count or code that is not decimal digits, or a code past `u32::MAX`.
    #[error("{attribute}={value:?} is not a decimal number")]
    NotANumber { attribute: &'static str, value: String },
    /// A count over [`COUNT_MAX`], read or reached by [`SyncSummary::add`]. `value` is
    /// `u64::MAX` for a number of more digits than a `u64` holds.
    #[error("{entity} {kind:?} count {value} is more than the {COUNT_MAX} allowed")]
    CountTooLarge { entity: ObjectTypeCode, kind: ChangeKind, value: u64 },
    #[error(transparent)]
    UnknownObjectTypeCode(#[from] UnknownObjectTypeCode),
    #[error("ObjectTypeCode {0:?} is given twice")]
    DuplicateEntity(ObjectTypeCode),
    /// Counted before the element's attributes are read, so it holds whatever the extra
    /// elements say.
    #[error("{0} <Entity> elements, more than the {ENTITY_COUNT_MAX} entity types there are")]
    TooManyEntities(usize),
    #[error("Name {name:?} does not match ObjectTypeCode {}, which is {:?}", entity.code(), entity.name())]
    NameMismatch { entity: ObjectTypeCode, name: String },
}

/// What prepare sync found for one entity type. Each count is at most [`COUNT_MAX`] in any
/// [`Counts`] a [`SyncSummary`] hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counts {
    pub create: u32,
    pub update: u32,
    pub delete: u32,
}

impl Counts {
    pub const ZERO: Counts = Counts { create: 0, update: 0, delete: 0 };

    pub const fn get(self, kind: ChangeKind) -> u32 {
        match kind {
            ChangeKind::Create => self.create,
            ChangeKind::Update => self.update,
            ChangeKind::Delete => self.delete,
        }
    }

    fn get_mut(&mut self, kind: ChangeKind) -> &mut u32 {
        match kind {
            ChangeKind::Create => &mut self.create,
            ChangeKind::Update => &mut self.update,
            ChangeKind::Delete => &mut self.delete,
        }
    }

    /// Creates, updates and deletes together. Saturates (unreachable for counts within
    /// [`COUNT_MAX`], which is all a summary holds).
    pub const fn sum(self) -> u32 {
        self.create.saturating_add(self.update).saturating_add(self.delete)
    }

    pub const fn is_zero(self) -> bool {
        self.create == 0 && self.update == 0 && self.delete == 0
    }
}

/// The prepare-sync summary: per entity type, how many creates, updates and deletes are waiting.
///
/// Entity types with nothing to do are not held: reading one back gives [`Counts::ZERO`], and two
/// summaries are equal when every entity type's counts are. Every count is at most [`COUNT_MAX`],
/// checked by [`add`](Self::add), [`from_xml`](Self::from_xml) and deserialisation.
///
/// Serialised (serde) as a map from `ObjectTypeCode` number to [`Counts`]; the XML form is
/// [`to_xml`](Self::to_xml).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "BTreeMap<ObjectTypeCode, Counts>", into = "BTreeMap<ObjectTypeCode, Counts>")]
pub struct SyncSummary {
    /// Only entity types with a non-zero count; keyed by code so iteration (and the XML) is in
    /// code order.
    entities: BTreeMap<ObjectTypeCode, Counts>,
}

impl SyncSummary {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `n` to the `kind` count of `entity` and returns the new count. A sum over
    /// [`COUNT_MAX`] is refused and leaves the summary as it was.
    pub fn add(&mut self, entity: ObjectTypeCode, kind: ChangeKind, n: u32) -> Result<u32, SummaryError> {
        let count = u64::from(self.counts(entity).get(kind)) + u64::from(n);
        if count > u64::from(COUNT_MAX) {
            return Err(SummaryError::CountTooLarge { entity, kind, value: count });
        }
        if n > 0 {
            // Within COUNT_MAX, so within u32.
            *self.entities.entry(entity).or_default().get_mut(kind) = count as u32;
        }
        Ok(count as u32)
    }

    /// The counts of `entity`; [`Counts::ZERO`] if it has nothing to do.
    pub fn counts(&self, entity: ObjectTypeCode) -> Counts {
        self.entities.get(&entity).copied().unwrap_or_default()
    }

    /// The entity types with something to do, in code order.
    pub fn iter(&self) -> impl Iterator<Item = (ObjectTypeCode, Counts)> + '_ {
        self.entities.iter().map(|(otc, counts)| (*otc, *counts))
    }

    /// The creates, updates and deletes of every entity type together.
    pub fn total(&self) -> Counts {
        self.entities.values().fold(Counts::ZERO, |total, c| Counts {
            create: total.create + c.create,
            update: total.update + c.update,
            delete: total.delete + c.delete,
        })
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.entities.is_empty()
    }

    /// The summary in the XML format of the module documentation.
    pub fn to_xml(&self) -> String {
        let mut xml = format!(r#"<{ROOT} {VERSION}="{SUMMARY_VERSION}""#);
        let entities = self.iter().filter(|(_, counts)| !counts.is_zero());
        let mut empty = true;
        for (otc, counts) in entities {
            debug_assert!(KINDS.iter().all(|&kind| counts.get(kind) <= COUNT_MAX));
            if empty {
                xml.push('>');
                empty = false;
            }
            let [code, name, create, update, delete] = ENTITY_ATTRIBUTES;
            xml.push_str(&format!(
                r#"<{ENTITY} {code}="{}" {name}="{}" {create}="{}" {update}="{}" {delete}="{}"/>"#,
                otc.code(),
                otc.name(),
                counts.create,
                counts.update,
                counts.delete,
            ));
        }
        if empty {
            xml.push_str("/>");
        } else {
            xml.push_str(&format!("</{ROOT}>"));
        }
        // The limit is checked when written as well as when read.
        debug_assert!(xml.len() <= SUMMARY_XML_LEN_MAX);
        xml
    }

    /// Reads a summary in the XML format of the module documentation. Never panics: any input is
    /// a summary or a [`SummaryError`].
    pub fn from_xml(xml: &str) -> Result<SyncSummary, SummaryError> {
        if xml.len() > SUMMARY_XML_LEN_MAX {
            return Err(SummaryError::TooLong(xml.len()));
        }
        // The parser skips a leading byte-order mark and counts its positions from after it.
        let bom_len = if xml.starts_with('\u{feff}') { '\u{feff}'.len_utf8() as u64 } else { 0 };
        Parser { xml, reader: Reader::from_str(xml), bom_len }.parse()
    }
}

impl TryFrom<BTreeMap<ObjectTypeCode, Counts>> for SyncSummary {
    type Error = SummaryError;

    /// Checks every count against [`COUNT_MAX`] and drops the all-zero entries.
    fn try_from(map: BTreeMap<ObjectTypeCode, Counts>) -> Result<Self, SummaryError> {
        let mut summary = SyncSummary::new();
        for (entity, counts) in map {
            for kind in KINDS {
                summary.add(entity, kind, counts.get(kind))?;
            }
        }
        Ok(summary)
    }
}

impl From<SyncSummary> for BTreeMap<ObjectTypeCode, Counts> {
    fn from(summary: SyncSummary) -> Self {
        summary.entities
    }
}

/// Where the parser is in the document.
#[derive(Clone, Copy, PartialEq, Eq)]
enum At {
    /// Before the root element.
    Prolog,
    /// Inside `<SyncSummary>`.
    Root,
    /// Inside an `<Entity>` written with an end tag.
    Entity,
    /// After `</SyncSummary>`.
    Epilog,
}

struct Parser<'a> {
    xml: &'a str,
    reader: Reader<&'a [u8]>,
    /// Added to the parser's positions to make them positions in `xml`.
    bom_len: u64,
}

impl<'a> Parser<'a> {
    /// One pass over the events; the nesting is at most two deep, so there is no recursion and
    /// nothing grows with the input but the error text, which is cut.
    fn parse(mut self) -> Result<SyncSummary, SummaryError> {
        let mut summary = SyncSummary::new();
        let mut seen: Vec<ObjectTypeCode> = Vec::with_capacity(ENTITY_COUNT_MAX);
        let mut at = At::Prolog;
        let mut first = true;
        loop {
            let start = self.position();
            let event = self.reader.read_event().map_err(|err| SummaryError::Malformed {
                position: self.reader.error_position() + self.bom_len,
                message: err.to_string(),
            })?;
            let unexpected =
                || SummaryError::UnexpectedContent { content: shown(self.raw(start)), position: start };
            match event {
                Event::Eof if at == At::Epilog => return Ok(summary),
                Event::Eof => return Err(SummaryError::Truncated { position: start }),
                Event::DocType(_) => return Err(SummaryError::DocType { position: start }),
                Event::Decl(_) if first => {}
                Event::Comment(_) => {}
                Event::Text(text) if text.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n')) => {}
                // The parser has matched the end tag to its start tag.
                Event::End(_) if at == At::Entity => at = At::Root,
                Event::End(_) if at == At::Root => at = At::Epilog,
                Event::Decl(_)
                | Event::Text(_)
                | Event::CData(_)
                | Event::PI(_)
                | Event::GeneralRef(_)
                | Event::End(_) => return Err(unexpected()),
                Event::Start(ref element) | Event::Empty(ref element) => {
                    let has_end = matches!(event, Event::Start(_));
                    at = match at {
                        At::Prolog => {
                            self.root(element, start)?;
                            if has_end { At::Root } else { At::Epilog }
                        }
                        At::Root => {
                            self.entity(element, start, &mut seen, &mut summary)?;
                            if has_end { At::Entity } else { At::Root }
                        }
                        At::Entity => return Err(unknown_element(element, start)),
                        At::Epilog => return Err(unexpected()),
                    };
                }
            }
            first = false;
        }
    }

    /// The byte position in the input just after the last event read.
    fn position(&self) -> u64 {
        self.reader.buffer_position() + self.bom_len
    }

    /// The input from `start` to the end of the last event read.
    fn raw(&self, start: u64) -> &'a str {
        let end = self.position();
        let range = usize::try_from(start).unwrap_or(usize::MAX)..usize::try_from(end).unwrap_or(usize::MAX);
        self.xml.get(range).unwrap_or_default()
    }

    fn root(&self, element: &BytesStart<'_>, position: u64) -> Result<(), SummaryError> {
        if element.name().as_ref() != ROOT.as_bytes() {
            return Err(SummaryError::WrongRoot(shown_bytes(element.name().as_ref())));
        }
        let [version] = self.attributes(element, ROOT, ROOT_ATTRIBUTES, position)?;
        let version = required(version, ROOT, VERSION)?;
        if version != SUMMARY_VERSION {
            return Err(SummaryError::UnsupportedVersion(shown(&version)));
        }
        Ok(())
    }

    fn entity(
        &self,
        element: &BytesStart<'_>,
        position: u64,
        seen: &mut Vec<ObjectTypeCode>,
        summary: &mut SyncSummary,
    ) -> Result<(), SummaryError> {
        if element.name().as_ref() != ENTITY.as_bytes() {
            return Err(unknown_element(element, position));
        }
        if seen.len() >= ENTITY_COUNT_MAX {
            return Err(SummaryError::TooManyEntities(seen.len() + 1));
        }
        let [code, name, create, update, delete] =
            self.attributes(element, ENTITY, ENTITY_ATTRIBUTES, position)?;
        let [code_attr, name_attr, create_attr, update_attr, delete_attr] = ENTITY_ATTRIBUTES;

        let code = required(code, ENTITY, code_attr)?;
        let code = u32::try_from(digits(code_attr, &code)?)
            .map_err(|_| SummaryError::NotANumber { attribute: code_attr, value: shown(&code) })?;
        let entity = ObjectTypeCode::try_from(code)?;
        if seen.contains(&entity) {
            return Err(SummaryError::DuplicateEntity(entity));
        }
        seen.push(entity);

        let name = required(name, ENTITY, name_attr)?;
        if name != entity.name() {
            return Err(SummaryError::NameMismatch { entity, name: shown(&name) });
        }

        let mut counts = Counts::ZERO;
        let kinds = [
            (ChangeKind::Create, create_attr, create),
            (ChangeKind::Update, update_attr, update),
            (ChangeKind::Delete, delete_attr, delete),
        ];
        for (kind, attribute, value) in kinds {
            let value = digits(attribute, &required(value, ENTITY, attribute)?)?;
            if value > u64::from(COUNT_MAX) {
                return Err(SummaryError::CountTooLarge { entity, kind, value });
            }
            *counts.get_mut(kind) = value as u32;
        }
        if !counts.is_zero() {
            summary.entities.insert(entity, counts);
        }
        Ok(())
    }

    /// The values of `element`'s attributes, in the order of `names`; an attribute not in `names`
    /// or given twice is an error. Values are normalised and unescaped (predefined entities and
    /// character references only).
    fn attributes<const N: usize>(
        &self,
        element: &BytesStart<'_>,
        element_name: &'static str,
        names: [&'static str; N],
        position: u64,
    ) -> Result<[Option<String>; N], SummaryError> {
        let malformed = |message: String| SummaryError::Malformed { position, message };
        let mut values: [Option<String>; N] = std::array::from_fn(|_| None);
        // Duplicates are reported below as a typed error rather than the parser's message.
        for attribute in element.attributes().with_checks(false) {
            let attribute = attribute.map_err(|err| malformed(err.to_string()))?;
            let key = attribute.key.as_ref();
            let Some(i) = names.iter().position(|name| name.as_bytes() == key) else {
                let attribute = shown_bytes(key);
                return Err(SummaryError::UnknownAttribute { element: element_name, attribute });
            };
            if values[i].is_some() {
                return Err(SummaryError::DuplicateAttribute { element: element_name, attribute: names[i] });
            }
            let value = attribute
                .decoded_and_normalized_value(XmlVersion::Implicit1_0, self.reader.decoder())
                .map_err(|err| malformed(err.to_string()))?;
            values[i] = Some(value.into_owned());
        }
        Ok(values)
    }
}

fn required(
    value: Option<String>,
    element: &'static str,
    attribute: &'static str,
) -> Result<String, SummaryError> {
    value.ok_or(SummaryError::MissingAttribute { element, attribute })
}

/// A number of decimal digits only (no sign, no space), saturating at `u64::MAX`.
fn digits(attribute: &'static str, value: &str) -> Result<u64, SummaryError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SummaryError::NotANumber { attribute, value: shown(value) });
    }
    Ok(value.bytes().fold(0u64, |n, b| n.saturating_mul(10).saturating_add(u64::from(b - b'0'))))
}

fn unknown_element(element: &BytesStart<'_>, position: u64) -> SummaryError {
    SummaryError::UnknownElement { name: shown_bytes(element.name().as_ref()), position }
}

/// Input text as an error carries it: at most [`ERROR_TEXT_LEN_MAX`] characters.
fn shown(text: &str) -> String {
    text.chars().take(ERROR_TEXT_LEN_MAX).collect()
}

fn shown_bytes(bytes: &[u8]) -> String {
    shown(&String::from_utf8_lossy(bytes))
}

#[cfg(test)]
mod tests {
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;
    use proptest::sample::{Index, select};
    use proptest::test_runner::FileFailurePersistence;

    use super::*;
    use ObjectTypeCode::*;

    fn summary_of(entries: &[(ObjectTypeCode, u32, u32, u32)]) -> SyncSummary {
        let mut summary = SyncSummary::new();
        for &(otc, create, update, delete) in entries {
            summary.add(otc, ChangeKind::Create, create).unwrap();
            summary.add(otc, ChangeKind::Update, update).unwrap();
            summary.add(otc, ChangeKind::Delete, delete).unwrap();
        }
        summary
    }

    /// A document with the given `<Entity>` attribute strings inside a version 1 root.
    fn doc(entities: &[&str]) -> String {
        let entities: String = entities.iter().map(|attributes| format!("<Entity {attributes}/>")).collect();
        format!(r#"<SyncSummary Version="1">{entities}</SyncSummary>"#)
    }

    const CONTACT: &str = r#"ObjectTypeCode="2" Name="contact" Create="3" Update="1" Delete="0""#;

    fn read(xml: &str) -> Result<SyncSummary, SummaryError> {
        SyncSummary::from_xml(xml)
    }

    fn snapshot(name: &str, xml: &str) {
        insta::with_settings!({ snapshot_path => "../snapshots", prepend_module_to_snapshot => false }, {
            insta::assert_snapshot!(name, xml);
        });
    }

    // ---- The format, snapshot-tested ----

    #[test]
    fn snapshot_empty() {
        let summary = SyncSummary::new();
        assert!(summary.is_empty());
        snapshot("summary_empty", &summary.to_xml());
        assert_eq!(read(&summary.to_xml()), Ok(summary));
    }

    #[test]
    fn snapshot_one_contact_create() {
        let summary = summary_of(&[(Contact, 1, 0, 0)]);
        snapshot("summary_one_contact_create", &summary.to_xml());
        assert_eq!(read(&summary.to_xml()), Ok(summary));
    }

    #[test]
    fn snapshot_mixed() {
        let mut summary = summary_of(&[
            (Task, 1, 0, 0),
            (Contact, 3, 1, 0),
            (RecurringAppointmentMaster, 7, 7, 7),
            (Appointment, 0, 2, 5),
            (PhoneCall, 0, 0, COUNT_MAX),
        ]);
        // Nothing to do for letters: not written.
        summary.add(Letter, ChangeKind::Update, 0).unwrap();
        snapshot("summary_mixed", &summary.to_xml());
        assert_eq!(read(&summary.to_xml()), Ok(summary));
    }

    // ---- The value ----

    #[test]
    fn add_counts_total_and_is_empty() {
        let mut summary = SyncSummary::new();
        assert_eq!(summary.add(Contact, ChangeKind::Create, 0), Ok(0));
        assert!(summary.is_empty(), "adding zero holds nothing");
        assert_eq!(summary, SyncSummary::new());
        assert_eq!(summary.add(Contact, ChangeKind::Create, 2), Ok(2));
        assert_eq!(summary.add(Contact, ChangeKind::Create, 3), Ok(5));
        assert_eq!(summary.add(Task, ChangeKind::Delete, 4), Ok(4));
        assert!(!summary.is_empty());
        assert_eq!(summary.counts(Contact), Counts { create: 5, update: 0, delete: 0 });
        assert_eq!(summary.counts(Fax), Counts::ZERO);
        assert_eq!(summary.total(), Counts { create: 5, update: 0, delete: 4 });
        assert_eq!(summary.total().sum(), 9);
        assert_eq!(summary.iter().map(|(otc, _)| otc).collect::<Vec<_>>(), [Contact, Task]);
    }

    #[test]
    fn add_past_count_max_is_refused_and_changes_nothing() {
        let mut summary = summary_of(&[(Contact, COUNT_MAX - 1, 0, 0)]);
        assert_eq!(summary.add(Contact, ChangeKind::Create, 1), Ok(COUNT_MAX));
        let before = summary.clone();
        assert_eq!(
            summary.add(Contact, ChangeKind::Create, u32::MAX),
            Err(SummaryError::CountTooLarge {
                entity: Contact,
                kind: ChangeKind::Create,
                value: u64::from(COUNT_MAX) + u64::from(u32::MAX),
            })
        );
        assert_eq!(summary, before);
    }

    #[test]
    fn the_largest_summary_is_far_under_the_length_limit() {
        let all: Vec<_> =
            ObjectTypeCode::ALL.iter().map(|&otc| (otc, COUNT_MAX, COUNT_MAX, COUNT_MAX)).collect();
        let summary = summary_of(&all);
        assert!(summary.to_xml().len() * 16 < SUMMARY_XML_LEN_MAX, "{}", summary.to_xml().len());
        assert_eq!(summary.total().sum(), COUNT_MAX * 3 * ENTITY_COUNT_MAX as u32);
        assert_eq!(read(&summary.to_xml()), Ok(summary));
    }

    #[test]
    fn serde_is_a_map_of_code_to_counts_and_checks_the_limit() {
        let summary = summary_of(&[(Contact, 3, 1, 0), (Task, 0, 0, 2)]);
        let json = serde_json::to_string(&summary).unwrap();
        assert_eq!(
            json,
            r#"{"2":{"create":3,"update":1,"delete":0},"4212":{"create":0,"update":0,"delete":2}}"#
        );
        assert_eq!(serde_json::from_str::<SyncSummary>(&json).unwrap(), summary);

        let zero = r#"{"2":{"create":0,"update":0,"delete":0}}"#;
        assert_eq!(serde_json::from_str::<SyncSummary>(zero).unwrap(), SyncSummary::new());
        let huge = r#"{"2":{"create":100000001,"update":0,"delete":0}}"#;
        let err = serde_json::from_str::<SyncSummary>(huge).unwrap_err();
        assert!(err.to_string().contains("contact Create count 100000001 is more than"), "{err}");
        let unknown = r#"{"4203":{"create":1,"update":0,"delete":0}}"#;
        let err = serde_json::from_str::<SyncSummary>(unknown).unwrap_err();
        assert!(err.to_string().contains("unknown ObjectTypeCode 4203"), "{err}");
    }

    // ---- What the reader accepts ----

    #[test]
    fn reads_what_other_writers_may_write() {
        let xml = "\u{feff}<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<!-- prepare sync -->\n\
            <SyncSummary Version='1'>\n  \
              <Entity Delete=\"0\" Update=\"0\" Create=\"&#50;\" Name=\"task\" ObjectTypeCode=\"4212\">\
              </Entity>\n  \
              <Entity ObjectTypeCode=\"2\" Name=\"contact\" Create=\"007\" Update=\"0\" Delete=\"0\" />\n\
            </SyncSummary>\n<!-- end -->\n";
        assert_eq!(read(xml), Ok(summary_of(&[(Contact, 7, 0, 0), (Task, 2, 0, 0)])));
    }

    #[test]
    fn positions_count_a_byte_order_mark() {
        let xml = "\u{feff}<SyncSummary Version=\"1\"/>x";
        let expected = SummaryError::UnexpectedContent { content: "x".to_owned(), position: 29 };
        assert_eq!(read(xml), Err(expected));
        let twice = "\u{feff}\u{feff}<SyncSummary Version=\"1\"/>";
        let expected = SummaryError::UnexpectedContent { content: "\u{feff}".to_owned(), position: 3 };
        assert_eq!(read(twice), Err(expected));
        let broken = "\u{feff}<SyncSummary Version=\"1\"></Other>";
        let Err(SummaryError::Malformed { position, .. }) = read(broken) else {
            panic!("{:?}", read(broken))
        };
        assert_eq!(position, 28);
    }

    #[test]
    fn an_all_zero_entity_is_accepted_and_dropped() {
        let zero = r#"ObjectTypeCode="4201" Name="appointment" Create="0" Update="0" Delete="0""#;
        let summary = read(&doc(&[zero, CONTACT])).unwrap();
        assert_eq!(summary, summary_of(&[(Contact, 3, 1, 0)]));
        assert_eq!(summary.counts(Appointment), Counts::ZERO);
        assert!(!summary.to_xml().contains("appointment"));
    }

    // ---- One test per error, checking the value it carries ----

    #[test]
    fn oversized_input_is_refused_before_parsing() {
        let mut xml = SyncSummary::new().to_xml();
        xml.push_str(&" ".repeat(SUMMARY_XML_LEN_MAX - xml.len()));
        assert_eq!(read(&xml), Ok(SyncSummary::new()), "exactly at the limit is read");
        xml.push(' ');
        assert_eq!(read(&xml), Err(SummaryError::TooLong(SUMMARY_XML_LEN_MAX + 1)));
    }

    #[test]
    fn malformed_xml_carries_the_parser_position() {
        let xml = r#"<SyncSummary Version="1"><Entity ObjectTypeCode="2"</SyncSummary>"#;
        let Err(SummaryError::Malformed { position, message }) = read(xml) else { panic!("{:?}", read(xml)) };
        assert_eq!(position, 25, "the <Entity> whose attributes are broken");
        assert!(message.contains("attribute"), "{message}");

        let xml = r#"<SyncSummary Version="1"></Summary>"#;
        let Err(SummaryError::Malformed { position, message }) = read(xml) else { panic!("{:?}", read(xml)) };
        assert_eq!(position, 25);
        assert!(message.contains("</Summary>"), "{message}");

        // An undeclared entity in an attribute value is not expanded.
        let xml = doc(&[r#"ObjectTypeCode="2" Name="&lol;" Create="1" Update="0" Delete="0""#]);
        let Err(SummaryError::Malformed { position, message }) = read(&xml) else {
            panic!("{:?}", read(&xml))
        };
        assert_eq!(position, 25);
        assert!(message.contains("lol"), "{message}");
    }

    #[test]
    fn truncated_xml_is_an_error_at_every_cut() {
        assert_eq!(read(""), Err(SummaryError::Truncated { position: 0 }));
        let one = doc(&[CONTACT]);
        let unclosed = &one[..one.len() - "</SyncSummary>".len()];
        assert_eq!(read(unclosed), Err(SummaryError::Truncated { position: unclosed.len() as u64 }));
        let full = summary_of(&[(Contact, 3, 1, 0), (Appointment, 0, 2, 5)]).to_xml();
        for cut in 0..full.len() {
            let result = read(&full[..cut]);
            assert!(
                matches!(result, Err(SummaryError::Truncated { .. } | SummaryError::Malformed { .. })),
                "cut at {cut}: {result:?}"
            );
        }
    }

    #[test]
    fn doctype_and_billion_laughs_are_refused() {
        let lol = concat!(
            r#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">"#,
            r#"<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">"#,
            r#"<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>"#,
            r#"<SyncSummary Version="1"><Entity ObjectTypeCode="2" Name="&lol3;" "#,
            r#"Create="1" Update="0" Delete="0"/></SyncSummary>"#,
        );
        assert_eq!(read(lol), Err(SummaryError::DocType { position: 21 }));
        let external = r#"<!DOCTYPE SyncSummary SYSTEM "file:///etc/passwd"><SyncSummary Version="1"/>"#;
        assert_eq!(read(external), Err(SummaryError::DocType { position: 0 }));
    }

    #[test]
    fn content_the_format_does_not_have_is_unexpected() {
        let cases = [
            (r#"<SyncSummary Version="1">hello</SyncSummary>"#, "hello", 25),
            (r#"<SyncSummary Version="1">&amp;</SyncSummary>"#, "&amp;", 25),
            (r#"<SyncSummary Version="1"><![CDATA[x]]></SyncSummary>"#, "<![CDATA[x]]>", 25),
            (r#"<SyncSummary Version="1"><?pi x?></SyncSummary>"#, "<?pi x?>", 25),
            (r#"<SyncSummary Version="1"/> trailing"#, " trailing", 26),
            (r#"<SyncSummary Version="1"/><SyncSummary Version="1"/>"#, r#"<SyncSummary Version="1"/>"#, 26),
            (r#" <?xml version="1.0"?><SyncSummary Version="1"/>"#, r#"<?xml version="1.0"?>"#, 1),
        ];
        for (xml, content, position) in cases {
            let expected = SummaryError::UnexpectedContent { content: content.to_owned(), position };
            assert_eq!(read(xml), Err(expected), "{xml}");
        }
        let long = format!(r#"<SyncSummary Version="1">{}</SyncSummary>"#, "x".repeat(1000));
        let content = "x".repeat(ERROR_TEXT_LEN_MAX);
        assert_eq!(read(&long), Err(SummaryError::UnexpectedContent { content, position: 25 }));
    }

    #[test]
    fn wrong_root_is_refused() {
        assert_eq!(read(r#"<Summary Version="1"/>"#), Err(SummaryError::WrongRoot("Summary".to_owned())));
        let prefixed = r#"<crm:SyncSummary Version="1"/>"#;
        assert_eq!(read(prefixed), Err(SummaryError::WrongRoot("crm:SyncSummary".to_owned())));
        assert_eq!(read(&format!("<Entity {CONTACT}/>")), Err(SummaryError::WrongRoot("Entity".to_owned())));
    }

    #[test]
    fn unsupported_version_is_refused() {
        for version in ["2", "1.0", " 1", ""] {
            let xml = format!(r#"<SyncSummary Version="{version}"/>"#);
            let normalised = version.to_owned();
            assert_eq!(read(&xml), Err(SummaryError::UnsupportedVersion(normalised)), "{xml}");
        }
    }

    #[test]
    fn unknown_elements_are_refused() {
        let xml = r#"<SyncSummary Version="1"><Entities/></SyncSummary>"#;
        let expected = SummaryError::UnknownElement { name: "Entities".to_owned(), position: 25 };
        assert_eq!(read(xml), Err(expected));
        let nested = format!(r#"<SyncSummary Version="1"><Entity {CONTACT}><Count/></Entity></SyncSummary>"#);
        let position = nested.find("<Count").unwrap() as u64;
        assert_eq!(read(&nested), Err(SummaryError::UnknownElement { name: "Count".to_owned(), position }));
    }

    #[test]
    fn unknown_attributes_are_refused() {
        let xml = doc(&[&format!(r#"{CONTACT} Extra="1""#)]);
        let expected = SummaryError::UnknownAttribute { element: "Entity", attribute: "Extra".to_owned() };
        assert_eq!(read(&xml), Err(expected));
        let xml = r#"<SyncSummary xmlns="urn:crm" Version="1"/>"#;
        let expected =
            SummaryError::UnknownAttribute { element: "SyncSummary", attribute: "xmlns".to_owned() };
        assert_eq!(read(xml), Err(expected));
    }

    #[test]
    fn an_attribute_given_twice_is_refused() {
        let xml = doc(&[&format!(r#"{CONTACT} Create="3""#)]);
        let expected = SummaryError::DuplicateAttribute { element: "Entity", attribute: "Create" };
        assert_eq!(read(&xml), Err(expected));
    }

    #[test]
    fn missing_attributes_are_refused() {
        let expected = SummaryError::MissingAttribute { element: "SyncSummary", attribute: "Version" };
        assert_eq!(read("<SyncSummary/>"), Err(expected));
        let no_delete = doc(&[r#"ObjectTypeCode="2" Name="contact" Create="3" Update="1""#]);
        let expected = SummaryError::MissingAttribute { element: "Entity", attribute: "Delete" };
        assert_eq!(read(&no_delete), Err(expected));
        let no_name = doc(&[r#"ObjectTypeCode="2" Create="3" Update="1" Delete="0""#]);
        let expected = SummaryError::MissingAttribute { element: "Entity", attribute: "Name" };
        assert_eq!(read(&no_name), Err(expected));
        let no_code = doc(&[r#"Name="contact" Create="3" Update="1" Delete="0""#]);
        let expected = SummaryError::MissingAttribute { element: "Entity", attribute: "ObjectTypeCode" };
        assert_eq!(read(&no_code), Err(expected));
    }

    #[test]
    fn counts_and_codes_that_are_not_numbers_are_refused() {
        for value in ["", "-1", "+1", "1.5", "1e3", "three", " 1", "0x10", "١"] {
            let xml = doc(&[&format!(
                r#"ObjectTypeCode="2" Name="contact" Create="0" Update="{value}" Delete="0""#
            )]);
            // Read after normalisation, where a tab or newline in a value is a space.
            let expected = SummaryError::NotANumber { attribute: "Update", value: value.to_owned() };
            assert_eq!(read(&xml), Err(expected), "{xml}");
        }
        for value in ["contact", "-2", "4294967296"] {
            let xml = doc(&[&format!(
                r#"ObjectTypeCode="{value}" Name="contact" Create="0" Update="0" Delete="0""#
            )]);
            let expected = SummaryError::NotANumber { attribute: "ObjectTypeCode", value: value.to_owned() };
            assert_eq!(read(&xml), Err(expected), "{xml}");
        }
    }

    #[test]
    fn huge_counts_are_refused() {
        let over = doc(&[r#"ObjectTypeCode="4212" Name="task" Create="0" Update="0" Delete="100000001""#]);
        let expected =
            SummaryError::CountTooLarge { entity: Task, kind: ChangeKind::Delete, value: 100_000_001 };
        assert_eq!(read(&over), Err(expected));
        let at = doc(&[r#"ObjectTypeCode="4212" Name="task" Create="0" Update="0" Delete="100000000""#]);
        assert_eq!(read(&at), Ok(summary_of(&[(Task, 0, 0, COUNT_MAX)])));
        let digits = "9".repeat(40);
        let past_u64 =
            doc(&[&format!(r#"ObjectTypeCode="2" Name="contact" Create="{digits}" Update="0" Delete="0""#)]);
        let expected =
            SummaryError::CountTooLarge { entity: Contact, kind: ChangeKind::Create, value: u64::MAX };
        assert_eq!(read(&past_u64), Err(expected));
    }

    #[test]
    fn an_unknown_object_type_code_carries_the_number() {
        let xml = doc(&[r#"ObjectTypeCode="4203" Name="contact" Create="1" Update="0" Delete="0""#]);
        assert_eq!(read(&xml), Err(SummaryError::UnknownObjectTypeCode(UnknownObjectTypeCode(4203))));
        assert_eq!(read(&xml).unwrap_err().to_string(), "unknown ObjectTypeCode 4203");
    }

    #[test]
    fn an_object_type_code_given_twice_is_refused() {
        assert_eq!(read(&doc(&[CONTACT, CONTACT])), Err(SummaryError::DuplicateEntity(Contact)));
        // Even when one of them has nothing to do.
        let zero = r#"ObjectTypeCode="2" Name="contact" Create="0" Update="0" Delete="0""#;
        assert_eq!(read(&doc(&[zero, CONTACT])), Err(SummaryError::DuplicateEntity(Contact)));
    }

    #[test]
    fn more_entities_than_entity_types_are_refused() {
        let every: Vec<String> = ObjectTypeCode::ALL
            .iter()
            .map(|otc| {
                format!(r#"ObjectTypeCode="{}" Name="{}" Create="1" Update="0" Delete="0""#, otc.code(), otc)
            })
            .collect();
        let mut entities: Vec<&str> = every.iter().map(String::as_str).collect();
        assert_eq!(read(&doc(&entities)).map(|s| s.iter().count()), Ok(ENTITY_COUNT_MAX));
        entities.push(CONTACT);
        assert_eq!(read(&doc(&entities)), Err(SummaryError::TooManyEntities(ENTITY_COUNT_MAX + 1)));
    }

    #[test]
    fn a_name_that_does_not_match_the_code_is_refused() {
        let xml = doc(&[r#"ObjectTypeCode="2" Name="task" Create="1" Update="0" Delete="0""#]);
        let err = read(&xml).unwrap_err();
        assert_eq!(err, SummaryError::NameMismatch { entity: Contact, name: "task".to_owned() });
        assert_eq!(err.to_string(), r#"Name "task" does not match ObjectTypeCode 2, which is "contact""#);
        let cased = doc(&[r#"ObjectTypeCode="2" Name="Contact" Create="1" Update="0" Delete="0""#]);
        assert_eq!(
            read(&cased),
            Err(SummaryError::NameMismatch { entity: Contact, name: "Contact".to_owned() })
        );
    }

    // ---- Properties ----

    fn config(cases: u32) -> ProptestConfig {
        ProptestConfig {
            // Failing cases are kept, committed, and replayed first on every run.
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
                "proptest-regressions/summary.txt",
            ))),
            ..ProptestConfig::with_cases(cases)
        }
    }

    fn count() -> impl Strategy<Value = u32> {
        prop_oneof![Just(0), 1..10u32, 0..=COUNT_MAX, Just(COUNT_MAX)]
    }

    fn summary() -> impl Strategy<Value = SyncSummary> {
        let counts = (count(), count(), count()).prop_map(|(create, update, delete)| Counts {
            create,
            update,
            delete,
        });
        btree_map(select(ObjectTypeCode::ALL.to_vec()), counts, 0..=ENTITY_COUNT_MAX)
            .prop_map(|map| SyncSummary::try_from(map).unwrap())
    }

    /// Pieces of summaries and of hostile XML, so that generated strings get past the first byte.
    const TOKENS: &[&str] = &[
        "<SyncSummary",
        "</SyncSummary>",
        " Version=\"1\"",
        " Version='2'",
        "<Entity",
        "</Entity>",
        " ObjectTypeCode=\"2\"",
        " ObjectTypeCode=\"4201\"",
        " ObjectTypeCode=\"99999999999\"",
        " Name=\"contact\"",
        " Name=\"appointment\"",
        " Create=\"3\"",
        " Update=\"100000001\"",
        " Delete=\"0\"",
        " Delete=\"-1\"",
        ">",
        "/>",
        "<",
        "\"",
        "'",
        "=",
        " ",
        "\n",
        "&amp;",
        "&lol;",
        "&#50;",
        "&#xFFFFFFFF;",
        "<!DOCTYPE x [<!ENTITY lol \"lol\">]>",
        "<!--",
        "-->",
        "<![CDATA[",
        "]]>",
        "<?xml version=\"1.0\"?>",
        "<?pi",
        "?>",
        "\u{feff}",
        "é",
        "\0",
    ];

    #[derive(Debug, Clone)]
    enum Mutation {
        Delete(Index, usize),
        Insert(Index, String),
        Replace(Index, u8),
        Truncate(Index),
        Repeat(Index, usize),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        let insert = prop_oneof![select(TOKENS).prop_map(str::to_owned), any::<String>()];
        prop_oneof![
            (any::<Index>(), 1..20usize).prop_map(|(at, len)| Mutation::Delete(at, len)),
            (any::<Index>(), insert).prop_map(|(at, text)| Mutation::Insert(at, text)),
            (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Replace(at, byte)),
            any::<Index>().prop_map(Mutation::Truncate),
            (any::<Index>(), 1..200usize).prop_map(|(at, len)| Mutation::Repeat(at, len)),
        ]
    }

    fn mutate(xml: &str, mutations: &[Mutation]) -> String {
        let mut bytes = xml.as_bytes().to_vec();
        for mutation in mutations {
            let len = bytes.len();
            let at = |index: &Index| if len == 0 { 0 } else { index.index(len) };
            match mutation {
                Mutation::Delete(index, n) => {
                    let start = at(index);
                    bytes.drain(start..(start + n).min(len));
                }
                Mutation::Insert(index, text) => {
                    let start = at(index);
                    bytes.splice(start..start, text.bytes());
                }
                Mutation::Replace(index, byte) if len > 0 => bytes[at(index)] = *byte,
                Mutation::Replace(..) => {}
                Mutation::Truncate(index) => bytes.truncate(at(index)),
                Mutation::Repeat(index, n) => {
                    let start = at(index);
                    let piece = bytes[start..(start + n).min(len)].to_vec();
                    bytes.splice(start..start, piece);
                }
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Any input is read to a summary or an error without panicking; a summary read is one the
    /// writer writes back to itself, and an error's position points at what it names.
    fn read_never_panics(xml: &str) -> Result<(), TestCaseError> {
        let at = |position: u64| xml.get(usize::try_from(position).unwrap()..).unwrap_or("(not a boundary)");
        match SyncSummary::from_xml(xml) {
            Ok(summary) => prop_assert_eq!(SyncSummary::from_xml(&summary.to_xml()), Ok(summary)),
            Err(SummaryError::UnexpectedContent { content, position }) => {
                let found = !content.is_empty() && at(position).starts_with(&content);
                prop_assert!(found, "{:?} at {}", content, position);
            }
            Err(SummaryError::UnknownElement { name, position }) => {
                prop_assert!(at(position).starts_with(&format!("<{name}")), "{:?} at {}", name, position);
            }
            Err(SummaryError::DocType { position }) => {
                prop_assert!(at(position).starts_with("<!"), "{}", position)
            }
            Err(_) => {}
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(config(512))]

        #[test]
        fn write_then_read_is_the_same_summary(summary in summary()) {
            let xml = summary.to_xml();
            prop_assert!(xml.len() <= SUMMARY_XML_LEN_MAX);
            prop_assert_eq!(SyncSummary::from_xml(&xml), Ok(summary.clone()));
            let json = serde_json::to_string(&summary).unwrap();
            prop_assert_eq!(serde_json::from_str::<SyncSummary>(&json).unwrap(), summary.clone());
            let total = summary.iter().fold(0u64, |n, (_, c)| n + u64::from(c.sum()));
            prop_assert_eq!(u64::from(summary.total().sum()), total);
            prop_assert_eq!(summary.is_empty(), total == 0);
        }

        #[test]
        fn arbitrary_strings_never_panic(xml in any::<String>()) {
            read_never_panics(&xml)?;
        }

        #[test]
        fn arbitrary_token_strings_never_panic(tokens in vec(select(TOKENS), 0..60)) {
            read_never_panics(&tokens.concat())?;
        }

        #[test]
        fn mutated_documents_never_panic(summary in summary(), mutations in vec(mutation(), 1..5)) {
            read_never_panics(&mutate(&summary.to_xml(), &mutations))?;
        }
    }
}
