//! The Outlook side's edge (DOMAIN sections 4 and 6): the [`Mailbox`] trait the sync engine reads
//! user changes from and writes items through, the [`UserEdits`] a person makes in Outlook (used
//! by tests, the simulator and `crmsync demo`), and [`MemoryMailbox`], the in-memory mailbox. The
//! SQLite mailbox file is `mailbox_file` (feature `sqlite`); both behave identically, and the
//! tests drive both through the same functions.
//!
//! What a mailbox reports, and why it is echo-free (DOMAIN 6.8):
//! - the mailbox keeps a *change log* of user changes only. A write through [`Mailbox`] is the
//!   sync's own write: it changes the item and logs nothing, so it can never come back from
//!   [`Mailbox::changes_since`] as a user change. The origin is recorded by where the write
//!   comes in (the [`Mailbox`] trait or [`UserEdits`]), not by a flag a caller could get wrong;
//! - only tracked items are synchronised (DOMAIN step 3): a user change is logged only if its
//!   item is tracked when the change is made ([`Tracking::Pending`] or [`Tracking::Stamped`]).
//!   Marking an item "Track in CRM" ([`UserEdits::user_track`]) logs it as a create; a delete of
//!   a tracked item is logged as a delete;
//! - a logged create or update is reported with the item *as it is now* (Outlook hands out the
//!   current item, not a history), and only while the item exists and the sync has not untracked
//!   it since (`set_stamp(.., None)`): a change of an item deleted since is told by its delete,
//!   and an untracked item is not synchronised. A delete is reported with no item;
//! - a log position ([`MailboxCursor`]) counts logged changes, one mailbox-wide counter that only
//!   grows. A change hidden by the rule above stays hidden (EntryIds are never reused, and an
//!   untrack is never undone except by a new track, which logs a new create), so a page may skip
//!   it and paging loses and repeats nothing.
//!
//! Crash recovery (DOMAIN 6.4, 6.9): an item a sync creates carries the `CrmId` it was created
//! for (its stamp), and [`Mailbox::find_by_stamp`] finds it again, so a retried create finds its
//! earlier effect and a rebuilt cache relinks. A sync write never puts a stamp on a second item
//! ([`MailboxError::StampTaken`]); a user's copy of an item keeps its stamp, as Outlook's does.
//!
//! Everything a mailbox makes is deterministic: EntryIds are a per-mailbox prefix and a counter,
//! times come from the [`Clock`] it was given (a machine clock, which may be skewed).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::change::{ActivityStatus, ChangeKind, Role};
use crate::clock::Clock;
use crate::entity::ObjectTypeCode;
use crate::fields::{FieldPatch, Fields, FieldsError};
use crate::ids::{CrmId, EntryId, GlobalObjectId, VersionNumber};

/// Most changes one [`Mailbox::changes_since`] page may hold.
pub const CHANGES_PAGE_MAX: usize = 10_000;
/// Most items one mailbox may hold.
pub const ITEM_COUNT_MAX: usize = 16_000_000;
/// Longest EntryId prefix, in hex digits.
pub const ENTRY_ID_PREFIX_LEN_MAX: usize = 64;
/// Hex digits of the item number that follows the prefix in an EntryId.
pub const ENTRY_ID_NUMBER_DIGITS: usize = 48;

/// A position in a mailbox's change log: the number of user changes logged up to it. Changes
/// are numbered from 1; [`MailboxCursor::START`] is before the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct MailboxCursor(pub u64);

impl MailboxCursor {
    /// Before every change.
    pub const START: MailboxCursor = MailboxCursor(0);
}

impl fmt::Display for MailboxCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}", self.0)
    }
}

/// Whether an item is synchronised, and with which CRM record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Tracking {
    /// Not synchronised: the user's changes to it are not reported.
    Untracked,
    /// The user marked it "Track in CRM" and no sync has linked it to a record yet.
    Pending,
    /// Linked to the CRM record with this id: created or linked by a sync (or copied from such
    /// an item by the user).
    Stamped(CrmId),
}

impl Tracking {
    pub fn is_tracked(self) -> bool {
        self != Tracking::Untracked
    }

    pub fn stamp(self) -> Option<CrmId> {
        match self {
            Tracking::Stamped(id) => Some(id),
            Tracking::Untracked | Tracking::Pending => None,
        }
    }
}

/// What a sync last agreed on for an item, kept on the item itself (as Outlook items carry
/// CRM's properties): the fields both sides held, the CRM `VersionNumber` they reflect, and the
/// user's role. It is written together with the stamp, after the sync's writes and before the
/// cache records their outcome, so when a crash loses that record, or the cache is rebuilt
/// (another primary machine, an unlink and relink), the next run still merges against the
/// right base instead of an empty one, and an edit made in between is not lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncBase {
    pub fields: Fields,
    pub crm_version: Option<VersionNumber>,
    pub role: Role,
    /// A write of this patch to CRM whose outcome is unknown (its answer was lost, or the run
    /// stopped right after it). Kept with the item, so a cache rebuilt later (an unlink and
    /// relink, another primary) can still tell from CRM's next change that it landed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<FieldPatch>,
}

/// One Outlook item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MailboxItem {
    pub entry_id: EntryId,
    pub object_type: ObjectTypeCode,
    pub fields: Fields,
    /// Calendar items only.
    pub goid: Option<GlobalObjectId>,
    pub status: ActivityStatus,
    pub tracking: Tracking,
    /// When the item was last written, by the user or a sync, by the mailbox's clock (a machine
    /// clock: it may be skewed, and is never used to order anything).
    pub modified_at: DateTime<Utc>,
    /// The base the sync last agreed on for it (`None`: never synced, or untracked since).
    pub synced: Option<SyncBase>,
}

impl MailboxItem {
    /// The `CrmId` a sync stamped on it; `Some` means linked.
    pub fn stamp(&self) -> Option<CrmId> {
        self.tracking.stamp()
    }

    pub fn is_tracked(&self) -> bool {
        self.tracking.is_tracked()
    }
}

/// One user change to a tracked item, as [`Mailbox::changes_since`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MailboxChange {
    /// Its position in the change log.
    pub seq: MailboxCursor,
    pub entry_id: EntryId,
    pub object_type: ObjectTypeCode,
    pub kind: ChangeKind,
    /// When the change was made, by the mailbox's clock.
    pub modified_at: DateTime<Utc>,
    /// The item as it is now: `Some` for a create or an update, `None` for a delete.
    pub item: Option<MailboxItem>,
}

/// A page of [`Mailbox::changes_since`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChangePage {
    /// User changes of tracked items, oldest first.
    pub changes: Vec<MailboxChange>,
    /// Where the next page starts. Once a reader has durably recorded these changes it stores
    /// this cursor; without `more` it is the mailbox's [`Mailbox::head`].
    pub cursor: MailboxCursor,
    /// Whether changes remain after this page.
    pub more: bool,
}

impl ChangePage {
    /// A page of at most `limit` of the `reported` changes (in log order), ending at `head` when
    /// they all fit. `head` is read before the changes; if another writer of the same file
    /// logged more in between, the page ends after the last of them it reports.
    pub(crate) fn assemble(
        reported: impl Iterator<Item = Result<MailboxChange, MailboxError>>,
        limit: usize,
        head: MailboxCursor,
    ) -> Result<ChangePage, MailboxError> {
        let mut changes: Vec<MailboxChange> = Vec::with_capacity(limit.min(256));
        for change in reported {
            let change = change?;
            if let Some(last) = changes.last().filter(|_| changes.len() == limit) {
                let cursor = last.seq;
                return Ok(ChangePage { changes, cursor, more: true });
            }
            debug_assert!(changes.last().is_none_or(|last| last.seq < change.seq), "log order");
            changes.push(change);
        }
        let cursor = changes.last().map_or(head, |last| last.seq.max(head));
        Ok(ChangePage { changes, cursor, more: false })
    }
}

/// An item a sync creates: always stamped with the `CrmId` of the record it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewItem {
    pub object_type: ObjectTypeCode,
    pub fields: Fields,
    pub goid: Option<GlobalObjectId>,
    pub status: ActivityStatus,
    pub stamp: CrmId,
    /// The base the sync agreed on (its fields are normally `fields`).
    pub synced: SyncBase,
}

/// Why a mailbox operation was refused. Every variant carries the offending value.
#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    #[error("no item {0} in this mailbox")]
    NotFound(EntryId),
    /// The item is open or locked by another program: an item-level failure, retried later.
    #[error("item {0} is locked")]
    Locked(EntryId),
    #[error("EntryId prefix {0:?} is not 1 to {ENTRY_ID_PREFIX_LEN_MAX} upper-case hex digits")]
    BadPrefix(String),
    #[error("a {0} item carries no GlobalObjectId (only calendar items do)")]
    GoidOnNonCalendar(ObjectTypeCode),
    #[error("CrmId {stamp} is already stamped on {entry_id}; a sync stamps it on one item only")]
    StampTaken { stamp: CrmId, entry_id: EntryId },
    #[error("page size {0} is not within 1..={CHANGES_PAGE_MAX}")]
    PageSize(usize),
    #[error("cursor {cursor} is past the newest change {head} of this mailbox (another mailbox's cursor?)")]
    CursorAhead { cursor: MailboxCursor, head: MailboxCursor },
    #[error("the mailbox already holds its maximum of {0} items")]
    Full(usize),
    #[error(transparent)]
    Fields(#[from] FieldsError),
    #[error("{table}.{column} holds {value:?}, which is not valid")]
    Corrupt { table: &'static str, column: &'static str, value: String },
    #[cfg(feature = "sqlite")]
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

/// The edge the sync engine reads the mailbox and writes to it through. Every write here is the
/// sync's own write: it is never reported by [`changes_since`](Mailbox::changes_since).
///
/// Durability: a write is durable once [`flush`](Mailbox::flush) returns. Flush before recording
/// a write's outcome durably anywhere else (the cache), so that a crash never leaves a record of
/// a write the mailbox lost. (A mailbox may make writes durable earlier; that is always safe,
/// because a retried write finds its earlier effect.)
pub trait Mailbox {
    /// User changes of tracked items after `cursor`, oldest first, at most `limit` (see the
    /// module doc for which changes are reported, and how).
    fn changes_since(&self, cursor: MailboxCursor, limit: usize) -> Result<ChangePage, MailboxError>;
    /// The position after the newest logged change: where a reader that has seen everything is.
    fn head(&self) -> Result<MailboxCursor, MailboxError>;
    fn get(&self, entry_id: &EntryId) -> Result<Option<MailboxItem>, MailboxError>;
    /// Creates an item stamped with `item.stamp`. Refused if that `CrmId` is already stamped on
    /// an item (a retried create looks it up with [`find_by_stamp`](Mailbox::find_by_stamp)).
    fn create(&mut self, item: NewItem) -> Result<EntryId, MailboxError>;
    /// Writes `patch` over the item's fields; a patch that changes nothing writes nothing.
    fn update(&mut self, entry_id: &EntryId, patch: &FieldPatch) -> Result<(), MailboxError>;
    /// Deletes the item; deleting an item that is not there is a success (a retried delete).
    fn delete(&mut self, entry_id: &EntryId) -> Result<(), MailboxError>;
    /// Stamps the item with a `CrmId` (links it; refused if another item carries that stamp),
    /// or with `None` untracks it: its pending changes are no longer reported.
    fn set_stamp(&mut self, entry_id: &EntryId, stamp: Option<CrmId>) -> Result<(), MailboxError>;
    /// Links the item: stamps it with `stamp` (refused if another item carries it) and keeps
    /// `base` on it (see [`SyncBase`]).
    fn link(&mut self, entry_id: &EntryId, stamp: CrmId, base: SyncBase) -> Result<(), MailboxError>;
    /// [`update`](Mailbox::update) and [`link`](Mailbox::link) as one write: either both land
    /// or neither does, so an item never holds new fields under an old base (Outlook saves an
    /// item's fields and its CRM properties in one `Save`). Checked before anything is written.
    fn update_and_link(
        &mut self,
        entry_id: &EntryId,
        patch: &FieldPatch,
        stamp: CrmId,
        base: SyncBase,
    ) -> Result<(), MailboxError>;
    /// The item with this GOID (the lowest EntryId if a copy shares it): the only search DOMAIN
    /// allows a sync, for an appointment with no mapping.
    fn find_by_goid(&self, goid: &GlobalObjectId) -> Result<Option<EntryId>, MailboxError>;
    /// The item stamped with this `CrmId` (the lowest EntryId if a user's copy shares it): crash
    /// recovery and relinking.
    fn find_by_stamp(&self, stamp: CrmId) -> Result<Option<EntryId>, MailboxError>;
    /// Every item, in EntryId order (checks and reports).
    fn all_items(&self) -> Result<Vec<MailboxItem>, MailboxError>;
    /// Makes every write so far durable.
    fn flush(&mut self) -> Result<(), MailboxError>;
}

/// The rule every stamping write checks: `stamp` may go on an item that carries `current` only
/// if the item already carries it or no item does (one item per `CrmId`).
pub(crate) fn ensure_stamp_free<M: Mailbox + ?Sized>(
    mailbox: &M,
    current: Option<CrmId>,
    stamp: CrmId,
) -> Result<(), MailboxError> {
    if current == Some(stamp) {
        return Ok(());
    }
    match mailbox.find_by_stamp(stamp)? {
        Some(entry_id) => Err(MailboxError::StampTaken { stamp, entry_id }),
        None => Ok(()),
    }
}

/// What a person does in Outlook. These are user changes: reported when the item is tracked.
/// Each is durable when it returns.
pub trait UserEdits {
    /// A new item, untracked (only tracked items are synchronised).
    fn user_create(
        &mut self,
        object_type: ObjectTypeCode,
        fields: Fields,
        goid: Option<GlobalObjectId>,
        status: ActivityStatus,
    ) -> Result<EntryId, MailboxError>;
    /// "Track in CRM": from now on the item is reported, first as a create. Tracking a tracked
    /// item does nothing.
    fn user_track(&mut self, entry_id: &EntryId) -> Result<(), MailboxError>;
    /// Saves the item with these fields (a save that changes nothing is still a save).
    fn user_update(&mut self, entry_id: &EntryId, fields: Fields) -> Result<(), MailboxError>;
    fn user_delete(&mut self, entry_id: &EntryId) -> Result<(), MailboxError>;
    /// A copy of the item, keeping its fields, GOID, status and tracking, stamp included (as
    /// Outlook's copy does: a classic source of duplicates the planner must refuse).
    fn user_copy(&mut self, entry_id: &EntryId) -> Result<EntryId, MailboxError>;
}

/// The EntryIds of one mailbox: its prefix, then the item's number as
/// [`ENTRY_ID_NUMBER_DIGITS`] upper-case hex digits, so EntryId order is number order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntryIdFormat {
    prefix: Arc<str>,
}

impl EntryIdFormat {
    pub(crate) fn new(prefix: &str) -> Result<Self, MailboxError> {
        let hex = prefix.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b));
        if prefix.is_empty() || prefix.len() > ENTRY_ID_PREFIX_LEN_MAX || !hex {
            let shown = prefix.chars().take(ENTRY_ID_PREFIX_LEN_MAX + 1).collect();
            return Err(MailboxError::BadPrefix(shown));
        }
        Ok(EntryIdFormat { prefix: prefix.into() })
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn render(&self, number: u64) -> EntryId {
        // Written by hand into a buffer on the stack: every item a sync creates or reads gets its
        // id here, and `format!` with a width was a tenth of a 100,000-item run.
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let mut buf = [b'0'; ENTRY_ID_PREFIX_LEN_MAX + ENTRY_ID_NUMBER_DIGITS];
        let len = self.prefix.len() + ENTRY_ID_NUMBER_DIGITS;
        buf[..self.prefix.len()].copy_from_slice(self.prefix.as_bytes());
        for (i, slot) in buf[len - 16..len].iter_mut().enumerate() {
            *slot = HEX[((number >> (60 - 4 * i)) & 0xF) as usize];
        }
        let text = std::str::from_utf8(&buf[..len]).expect("a hex prefix and hex digits are ASCII");
        EntryId::from_str_checked(text).expect("a prefix of at most 64 and 48 digits fit an EntryId")
    }

    /// The item number of an EntryId this mailbox made; `None` for any other id (no item).
    pub(crate) fn parse(&self, id: &EntryId) -> Option<u64> {
        let digits = id.as_str().strip_prefix(&*self.prefix)?;
        let upper_hex = |b: u8| b.is_ascii_digit() || (b'A'..=b'F').contains(&b);
        if digits.len() != ENTRY_ID_NUMBER_DIGITS || !digits.bytes().all(upper_hex) {
            return None;
        }
        let (high, low) = digits.split_at(ENTRY_ID_NUMBER_DIGITS - 16);
        if high.bytes().any(|b| b != b'0') {
            return None;
        }
        u64::from_str_radix(low, 16).ok().filter(|&n| n > 0)
    }
}

/// Refuses a GOID on anything but a calendar item.
pub(crate) fn check_goid(
    object_type: ObjectTypeCode,
    goid: &Option<GlobalObjectId>,
) -> Result<(), MailboxError> {
    if goid.is_some() && !object_type.is_calendar() {
        return Err(MailboxError::GoidOnNonCalendar(object_type));
    }
    Ok(())
}

/// Refuses a page size outside `1..=CHANGES_PAGE_MAX` and a cursor past the log.
pub(crate) fn check_page(
    cursor: MailboxCursor,
    limit: usize,
    head: MailboxCursor,
) -> Result<(), MailboxError> {
    if limit == 0 || limit > CHANGES_PAGE_MAX {
        return Err(MailboxError::PageSize(limit));
    }
    if cursor > head {
        return Err(MailboxError::CursorAhead { cursor, head });
    }
    Ok(())
}

/// An item and when the sync last untracked it.
#[derive(Debug, Clone)]
struct Slot {
    item: MailboxItem,
    /// The log head when a sync last cleared the item's stamp: its changes at or before it are
    /// not reported.
    untracked_at: u64,
}

/// One logged user change.
#[derive(Debug, Clone)]
struct LogRow {
    number: u64,
    object_type: ObjectTypeCode,
    kind: ChangeKind,
    modified_at: DateTime<Utc>,
}

/// A mailbox in memory: tests and the simulator.
pub struct MemoryMailbox {
    ids: EntryIdFormat,
    clock: Box<dyn Clock>,
    item_count_max: usize,
    items: BTreeMap<u64, Slot>,
    /// The number of the newest item ever made; numbers are never reused.
    last_number: u64,
    /// The change log; the change at position `n` is `log[n - 1]`.
    log: Vec<LogRow>,
    by_stamp: BTreeMap<CrmId, BTreeSet<u64>>,
    by_goid: BTreeMap<GlobalObjectId, BTreeSet<u64>>,
}

impl MemoryMailbox {
    /// An empty mailbox whose EntryIds start with `prefix` (1 to 64 upper-case hex digits).
    pub fn new(prefix: &str, clock: Box<dyn Clock>) -> Result<MemoryMailbox, MailboxError> {
        Ok(MemoryMailbox {
            ids: EntryIdFormat::new(prefix)?,
            clock,
            item_count_max: ITEM_COUNT_MAX,
            items: BTreeMap::new(),
            last_number: 0,
            log: Vec::new(),
            by_stamp: BTreeMap::new(),
            by_goid: BTreeMap::new(),
        })
    }

    /// The same mailbox holding at most `max` items (at most [`ITEM_COUNT_MAX`]).
    pub fn with_item_count_max(mut self, max: usize) -> MemoryMailbox {
        self.item_count_max = max.min(ITEM_COUNT_MAX);
        self
    }

    pub fn prefix(&self) -> &str {
        self.ids.prefix()
    }

    fn head_seq(&self) -> u64 {
        self.log.len() as u64
    }

    fn slot(&self, entry_id: &EntryId) -> Option<&Slot> {
        self.items.get(&self.ids.parse(entry_id)?)
    }

    fn number_of(&self, entry_id: &EntryId) -> Result<u64, MailboxError> {
        let number = self.ids.parse(entry_id).filter(|n| self.items.contains_key(n));
        number.ok_or_else(|| MailboxError::NotFound(entry_id.clone()))
    }

    fn check_room(&self) -> Result<(), MailboxError> {
        if self.items.len() >= self.item_count_max {
            return Err(MailboxError::Full(self.item_count_max));
        }
        Ok(())
    }

    /// Stores a new item under the next number.
    fn insert(&mut self, make: impl FnOnce(EntryId) -> MailboxItem) -> EntryId {
        self.last_number += 1;
        let number = self.last_number;
        let item = make(self.ids.render(number));
        let entry_id = item.entry_id.clone();
        self.index(number, &item);
        self.items.insert(number, Slot { item, untracked_at: 0 });
        entry_id
    }

    fn index(&mut self, number: u64, item: &MailboxItem) {
        if let Some(stamp) = item.stamp() {
            self.by_stamp.entry(stamp).or_default().insert(number);
        }
        if let Some(goid) = &item.goid {
            self.by_goid.entry(goid.clone()).or_default().insert(number);
        }
    }

    fn unindex(&mut self, number: u64, item: &MailboxItem) {
        fn remove<K: Ord>(index: &mut BTreeMap<K, BTreeSet<u64>>, key: K, number: u64) {
            if let Some(numbers) = index.get_mut(&key) {
                numbers.remove(&number);
                if numbers.is_empty() {
                    index.remove(&key);
                }
            }
        }
        if let Some(stamp) = item.stamp() {
            remove(&mut self.by_stamp, stamp, number);
        }
        if let Some(goid) = &item.goid {
            remove(&mut self.by_goid, goid.clone(), number);
        }
    }

    fn log(
        &mut self,
        number: u64,
        object_type: ObjectTypeCode,
        kind: ChangeKind,
        modified_at: DateTime<Utc>,
    ) {
        self.log.push(LogRow { number, object_type, kind, modified_at });
    }

    /// The logged change at `seq`, as reported, or `None` if it is hidden.
    fn report(&self, seq: u64, row: &LogRow) -> Option<MailboxChange> {
        let item = match row.kind {
            ChangeKind::Delete => None,
            ChangeKind::Create | ChangeKind::Update => {
                let slot = self.items.get(&row.number).filter(|slot| seq > slot.untracked_at)?;
                Some(slot.item.clone())
            }
        };
        Some(MailboxChange {
            seq: MailboxCursor(seq),
            entry_id: self.ids.render(row.number),
            object_type: row.object_type,
            kind: row.kind,
            modified_at: row.modified_at,
            item,
        })
    }
}

impl Mailbox for MemoryMailbox {
    fn changes_since(&self, cursor: MailboxCursor, limit: usize) -> Result<ChangePage, MailboxError> {
        let head = MailboxCursor(self.head_seq());
        check_page(cursor, limit, head)?;
        // cursor <= head = log.len(), so it indexes the log.
        let after = &self.log[cursor.0 as usize..];
        let reported =
            after.iter().zip(cursor.0 + 1..).filter_map(|(row, seq)| self.report(seq, row)).map(Ok);
        ChangePage::assemble(reported, limit, head)
    }

    fn head(&self) -> Result<MailboxCursor, MailboxError> {
        Ok(MailboxCursor(self.head_seq()))
    }

    fn get(&self, entry_id: &EntryId) -> Result<Option<MailboxItem>, MailboxError> {
        Ok(self.slot(entry_id).map(|slot| slot.item.clone()))
    }

    fn create(&mut self, new: NewItem) -> Result<EntryId, MailboxError> {
        check_goid(new.object_type, &new.goid)?;
        ensure_stamp_free(self, None, new.stamp)?;
        self.check_room()?;
        let modified_at = self.clock.now();
        Ok(self.insert(|entry_id| MailboxItem {
            entry_id,
            object_type: new.object_type,
            fields: new.fields,
            goid: new.goid,
            status: new.status,
            tracking: Tracking::Stamped(new.stamp),
            modified_at,
            synced: Some(new.synced),
        }))
    }

    fn update(&mut self, entry_id: &EntryId, patch: &FieldPatch) -> Result<(), MailboxError> {
        let number = self.number_of(entry_id)?;
        let now = self.clock.now();
        let slot = self.items.get_mut(&number).expect("number_of found it");
        let fields = patch.apply(&slot.item.fields)?;
        if fields != slot.item.fields {
            slot.item.fields = fields;
            slot.item.modified_at = now;
        }
        Ok(())
    }

    fn delete(&mut self, entry_id: &EntryId) -> Result<(), MailboxError> {
        let Some(number) = self.ids.parse(entry_id) else { return Ok(()) };
        if let Some(slot) = self.items.remove(&number) {
            self.unindex(number, &slot.item);
        }
        Ok(())
    }

    fn set_stamp(&mut self, entry_id: &EntryId, stamp: Option<CrmId>) -> Result<(), MailboxError> {
        let number = self.number_of(entry_id)?;
        let tracking = stamp.map_or(Tracking::Untracked, Tracking::Stamped);
        let old = self.items[&number].item.clone();
        if old.tracking == tracking {
            return Ok(());
        }
        if let Some(stamp) = stamp {
            ensure_stamp_free(self, old.stamp(), stamp)?;
        }
        let (now, head) = (self.clock.now(), self.head_seq());
        self.unindex(number, &old);
        let slot = self.items.get_mut(&number).expect("number_of found it");
        slot.item.tracking = tracking;
        slot.item.modified_at = now;
        if stamp.is_none() {
            slot.untracked_at = head;
            slot.item.synced = None;
        }
        let item = slot.item.clone();
        self.index(number, &item);
        Ok(())
    }

    fn link(&mut self, entry_id: &EntryId, stamp: CrmId, base: SyncBase) -> Result<(), MailboxError> {
        self.set_stamp(entry_id, Some(stamp))?;
        let number = self.number_of(entry_id)?;
        let slot = self.items.get_mut(&number).expect("number_of found it");
        slot.item.synced = Some(base);
        Ok(())
    }

    fn update_and_link(
        &mut self,
        entry_id: &EntryId,
        patch: &FieldPatch,
        stamp: CrmId,
        base: SyncBase,
    ) -> Result<(), MailboxError> {
        // Everything that can refuse is checked first; then neither write can fail.
        let number = self.number_of(entry_id)?;
        patch.apply(&self.items[&number].item.fields)?;
        ensure_stamp_free(self, self.items[&number].item.stamp(), stamp)?;
        self.update(entry_id, patch)?;
        self.link(entry_id, stamp, base)
    }

    fn find_by_goid(&self, goid: &GlobalObjectId) -> Result<Option<EntryId>, MailboxError> {
        let first = self.by_goid.get(goid).and_then(|numbers| numbers.first());
        Ok(first.map(|&n| self.ids.render(n)))
    }

    fn find_by_stamp(&self, stamp: CrmId) -> Result<Option<EntryId>, MailboxError> {
        let first = self.by_stamp.get(&stamp).and_then(|numbers| numbers.first());
        Ok(first.map(|&n| self.ids.render(n)))
    }

    fn all_items(&self) -> Result<Vec<MailboxItem>, MailboxError> {
        Ok(self.items.values().map(|slot| slot.item.clone()).collect())
    }

    fn flush(&mut self) -> Result<(), MailboxError> {
        Ok(())
    }
}

impl UserEdits for MemoryMailbox {
    fn user_create(
        &mut self,
        object_type: ObjectTypeCode,
        fields: Fields,
        goid: Option<GlobalObjectId>,
        status: ActivityStatus,
    ) -> Result<EntryId, MailboxError> {
        check_goid(object_type, &goid)?;
        self.check_room()?;
        let modified_at = self.clock.now();
        Ok(self.insert(|entry_id| MailboxItem {
            entry_id,
            object_type,
            fields,
            goid,
            status,
            tracking: Tracking::Untracked,
            modified_at,
            synced: None,
        }))
    }

    fn user_track(&mut self, entry_id: &EntryId) -> Result<(), MailboxError> {
        let number = self.number_of(entry_id)?;
        let now = self.clock.now();
        let slot = self.items.get_mut(&number).expect("number_of found it");
        if slot.item.is_tracked() {
            return Ok(());
        }
        slot.item.tracking = Tracking::Pending;
        slot.item.modified_at = now;
        let object_type = slot.item.object_type;
        self.log(number, object_type, ChangeKind::Create, now);
        Ok(())
    }

    fn user_update(&mut self, entry_id: &EntryId, fields: Fields) -> Result<(), MailboxError> {
        let number = self.number_of(entry_id)?;
        let now = self.clock.now();
        let slot = self.items.get_mut(&number).expect("number_of found it");
        slot.item.fields = fields;
        slot.item.modified_at = now;
        if slot.item.is_tracked() {
            let object_type = slot.item.object_type;
            self.log(number, object_type, ChangeKind::Update, now);
        }
        Ok(())
    }

    fn user_delete(&mut self, entry_id: &EntryId) -> Result<(), MailboxError> {
        let number = self.number_of(entry_id)?;
        let now = self.clock.now();
        let slot = self.items.remove(&number).expect("number_of found it");
        self.unindex(number, &slot.item);
        if slot.item.is_tracked() {
            self.log(number, slot.item.object_type, ChangeKind::Delete, now);
        }
        Ok(())
    }

    fn user_copy(&mut self, entry_id: &EntryId) -> Result<EntryId, MailboxError> {
        let number = self.number_of(entry_id)?;
        self.check_room()?;
        let now = self.clock.now();
        let original = self.items[&number].item.clone();
        let tracked = original.is_tracked();
        let copy = self.insert(|entry_id| MailboxItem { entry_id, modified_at: now, ..original.clone() });
        if tracked {
            self.log(self.last_number, original.object_type, ChangeKind::Create, now);
        }
        Ok(copy)
    }
}

impl fmt::Debug for MemoryMailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryMailbox")
            .field("prefix", &self.ids.prefix())
            .field("items", &self.items.len())
            .field("head", &self.head_seq())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_render_and_parse_back() {
        let ids = EntryIdFormat::new("00AB").unwrap();
        let id = ids.render(0x1F);
        assert_eq!(id.as_str().len(), 4 + ENTRY_ID_NUMBER_DIGITS);
        assert_eq!(id.as_str(), format!("00AB{}1F", "0".repeat(ENTRY_ID_NUMBER_DIGITS - 2)));
        assert_eq!(ids.parse(&id), Some(0x1F));
        for n in [0, 1, 0xF0, 0xDEAD_BEEF, 1 << 63, u64::MAX] {
            assert_eq!(ids.render(n).as_str(), format!("00AB{n:048X}"), "number {n:#x}");
        }
        let longest = EntryIdFormat::new(&"F".repeat(ENTRY_ID_PREFIX_LEN_MAX)).unwrap();
        assert_eq!(longest.render(7).as_str(), format!("{}{:048X}", "F".repeat(ENTRY_ID_PREFIX_LEN_MAX), 7));
        assert!(ids.render(9) < ids.render(10), "EntryId order is number order");
        assert_eq!(ids.parse(&ids.render(u64::MAX)), Some(u64::MAX));
        // Ids this mailbox never made are no item.
        let other = EntryIdFormat::new("00AC").unwrap();
        assert_eq!(ids.parse(&other.render(1)), None);
        assert_eq!(ids.parse(&EntryId::new("00AB1F").unwrap()), None);
        assert_eq!(ids.parse(&ids.render(1).as_str().to_lowercase().try_into().unwrap()), None);
        let zero = EntryId::new(format!("00AB{}", "0".repeat(ENTRY_ID_NUMBER_DIGITS))).unwrap();
        assert_eq!(ids.parse(&zero), None);
        let huge = EntryId::new(format!("00AB1{}", "0".repeat(ENTRY_ID_NUMBER_DIGITS - 1))).unwrap();
        assert_eq!(ids.parse(&huge), None);
    }

    #[test]
    fn a_prefix_is_upper_case_hex_of_bounded_length() {
        for bad in ["", "00ab", "XYZ", "00 AB"] {
            assert!(
                matches!(EntryIdFormat::new(bad), Err(MailboxError::BadPrefix(p)) if p == bad),
                "{bad:?}"
            );
        }
        let long = "A".repeat(ENTRY_ID_PREFIX_LEN_MAX + 1);
        assert!(matches!(EntryIdFormat::new(&long), Err(MailboxError::BadPrefix(p)) if p == long));
        assert!(EntryIdFormat::new(&"A".repeat(ENTRY_ID_PREFIX_LEN_MAX)).is_ok());
    }
}
