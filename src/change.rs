//! One changed record seen by one side (`Change`), and the vocabulary around it: `Side`,
//! `ChangeKind`, `ChangeStamp`, `RecordKey`, and the body of a create or update (`Record`).
//!
//! A `Change` is valid by construction: its key and stamp belong to the same side, only calendar
//! items carry a `GlobalObjectId`, and an Outlook create carries the `CrmId` chosen for it.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::entity::ObjectTypeCode;
use crate::fields::Fields;
use crate::ids::{CrmId, EntryId, GlobalObjectId, VersionNumber};

/// The two sides of a sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Side {
    Crm,
    Outlook,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Crm => Side::Outlook,
            Side::Outlook => Side::Crm,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Crm => "CRM",
            Side::Outlook => "Outlook",
        })
    }
}

/// What happened to a record. The order (create, update, delete) is the order a plan runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ChangeKind {
    Create,
    Update,
    Delete,
}

/// A change's timestamp: the CRM `VersionNumber`, or the Outlook `ModifiedAt`. Outlook times come
/// from a client's clock and are never used to order events across machines; within one side's
/// coalescing the queue order is used instead (see `queue`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ChangeStamp {
    Crm(VersionNumber),
    Outlook(DateTime<Utc>),
}

impl ChangeStamp {
    pub fn side(&self) -> Side {
        match self {
            ChangeStamp::Crm(_) => Side::Crm,
            ChangeStamp::Outlook(_) => Side::Outlook,
        }
    }
}

impl fmt::Display for ChangeStamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChangeStamp::Crm(v) => v.fmt(f),
            ChangeStamp::Outlook(t) => f.write_str(&t.to_rfc3339()),
        }
    }
}

/// The key of a change: a `CrmId` for the CRM side, an `EntryId` for the Outlook side.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RecordKey {
    Crm(CrmId),
    Outlook(EntryId),
}

impl RecordKey {
    pub fn side(&self) -> Side {
        match self {
            RecordKey::Crm(_) => Side::Crm,
            RecordKey::Outlook(_) => Side::Outlook,
        }
    }
}

impl fmt::Display for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordKey::Crm(id) => write!(f, "crm:{id}"),
            RecordKey::Outlook(id) => write!(f, "outlook:{id}"),
        }
    }
}

/// The user's relation to a record; the delete matrix depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// The user owns the record (for an item created in Outlook, the user who created it).
    Owner,
    /// The user organises the meeting.
    Organizer,
    /// The user attends the meeting and neither owns nor organises it.
    Attendee,
    /// Someone else's record that is in the user's filter.
    Other,
}

impl Role {
    pub fn owns_or_organises(self) -> bool {
        matches!(self, Role::Owner | Role::Organizer)
    }
}

/// Whether an activity is still current. A delete of a completed or cancelled activity is not
/// carried to the other side. Contacts are always `Open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ActivityStatus {
    Open,
    Completed,
    Cancelled,
}

impl ActivityStatus {
    pub fn is_current(self) -> bool {
        self == ActivityStatus::Open
    }
}

/// Why the CRM side hands out a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DeleteReason {
    /// The record (or the Outlook item) was deleted.
    Deleted,
    /// The record still exists but no longer matches this user's sync filter (owner changed, user
    /// removed from the attendees).
    LeftFilter,
}

/// The body of a create or an update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The full set of the record's field values as the side holds them now.
    pub fields: Fields,
    /// The meeting's id shared by every attendee's copy (calendar items only).
    pub goid: Option<GlobalObjectId>,
    pub role: Role,
    pub status: ActivityStatus,
    /// Outlook side only: the `CrmId` stamped on the item when a sync created or linked it, or,
    /// for an item never synced, the id the client chose for its CRM create when it queued the
    /// change (the create's idempotency key). Always `None` on the CRM side.
    pub crm_id: Option<CrmId>,
}

impl Record {
    /// A record with the given fields, owned by the user, open, no GOID, no stamp.
    pub fn new(fields: Fields) -> Self {
        Record { fields, goid: None, role: Role::Owner, status: ActivityStatus::Open, crm_id: None }
    }
}

/// What one change did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeOp {
    Create(Record),
    Update(Record),
    Delete(DeleteReason),
}

impl ChangeOp {
    pub fn kind(&self) -> ChangeKind {
        match self {
            ChangeOp::Create(_) => ChangeKind::Create,
            ChangeOp::Update(_) => ChangeKind::Update,
            ChangeOp::Delete(_) => ChangeKind::Delete,
        }
    }

    pub fn record(&self) -> Option<&Record> {
        match self {
            ChangeOp::Create(r) | ChangeOp::Update(r) => Some(r),
            ChangeOp::Delete(_) => None,
        }
    }
}

/// Why a change was refused. Every variant carries the offending values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("key {key} and stamp {stamp} belong to different sides")]
    SideMismatch { key: RecordKey, stamp: ChangeStamp },
    #[error("{key}: only calendar items carry a GlobalObjectId, not a {object_type}")]
    GoidOnNonCalendar { key: RecordKey, object_type: ObjectTypeCode },
    #[error("{key}: a CRM change must not carry a stamped CrmId ({crm_id})")]
    CrmIdOnCrmChange { key: RecordKey, crm_id: CrmId },
    #[error("{key}: an Outlook create must carry the CrmId chosen for it")]
    OutlookCreateWithoutCrmId { key: RecordKey },
    #[error("{key}: an Outlook item cannot leave a sync filter ({reason:?} is a CRM-side reason)")]
    OutlookLeftFilter { key: RecordKey, reason: DeleteReason },
}

/// One changed record seen by one side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ChangeFields")]
pub struct Change {
    key: RecordKey,
    object_type: ObjectTypeCode,
    stamp: ChangeStamp,
    op: ChangeOp,
}

/// The serialised shape of a `Change`, validated into one by `Change::new`.
#[derive(Deserialize)]
struct ChangeFields {
    key: RecordKey,
    object_type: ObjectTypeCode,
    stamp: ChangeStamp,
    op: ChangeOp,
}

impl TryFrom<ChangeFields> for Change {
    type Error = ChangeError;
    fn try_from(c: ChangeFields) -> Result<Self, ChangeError> {
        Change::new(c.key, c.object_type, c.stamp, c.op)
    }
}

impl Change {
    pub fn new(
        key: RecordKey,
        object_type: ObjectTypeCode,
        stamp: ChangeStamp,
        op: ChangeOp,
    ) -> Result<Self, ChangeError> {
        if key.side() != stamp.side() {
            return Err(ChangeError::SideMismatch { key, stamp });
        }
        if let Some(record) = op.record() {
            if record.goid.is_some() && !object_type.is_calendar() {
                return Err(ChangeError::GoidOnNonCalendar { key, object_type });
            }
            if let (Side::Crm, Some(crm_id)) = (key.side(), record.crm_id) {
                return Err(ChangeError::CrmIdOnCrmChange { key, crm_id });
            }
        }
        match (&op, key.side()) {
            (ChangeOp::Create(r), Side::Outlook) if r.crm_id.is_none() => {
                return Err(ChangeError::OutlookCreateWithoutCrmId { key });
            }
            (ChangeOp::Delete(reason @ DeleteReason::LeftFilter), Side::Outlook) => {
                return Err(ChangeError::OutlookLeftFilter { key, reason: *reason });
            }
            _ => {}
        }
        Ok(Change { key, object_type, stamp, op })
    }

    /// A change handed out by the server.
    pub fn crm(
        id: CrmId,
        object_type: ObjectTypeCode,
        version: VersionNumber,
        op: ChangeOp,
    ) -> Result<Self, ChangeError> {
        Change::new(RecordKey::Crm(id), object_type, ChangeStamp::Crm(version), op)
    }

    /// A change tracked in the mailbox.
    pub fn outlook(
        id: EntryId,
        object_type: ObjectTypeCode,
        modified_at: DateTime<Utc>,
        op: ChangeOp,
    ) -> Result<Self, ChangeError> {
        Change::new(RecordKey::Outlook(id), object_type, ChangeStamp::Outlook(modified_at), op)
    }

    pub fn key(&self) -> &RecordKey {
        &self.key
    }
    pub fn side(&self) -> Side {
        self.key.side()
    }
    pub fn kind(&self) -> ChangeKind {
        self.op.kind()
    }
    pub fn object_type(&self) -> ObjectTypeCode {
        self.object_type
    }
    pub fn stamp(&self) -> ChangeStamp {
        self.stamp
    }
    pub fn op(&self) -> &ChangeOp {
        &self.op
    }
    pub fn record(&self) -> Option<&Record> {
        self.op.record()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crm_id() -> CrmId {
        "6f9619ff-8b86-d011-b42d-00c04fc964ff".parse().unwrap()
    }
    fn entry() -> EntryId {
        EntryId::new("00AB").unwrap()
    }
    fn record() -> Record {
        Record::new(Fields::try_from_pairs([("subject", "x")]).unwrap())
    }

    #[test]
    fn side_mismatch_is_refused() {
        let err = Change::new(
            RecordKey::Crm(crm_id()),
            ObjectTypeCode::Contact,
            ChangeStamp::Outlook(DateTime::UNIX_EPOCH),
            ChangeOp::Delete(DeleteReason::Deleted),
        )
        .unwrap_err();
        assert_eq!(
            err,
            ChangeError::SideMismatch {
                key: RecordKey::Crm(crm_id()),
                stamp: ChangeStamp::Outlook(DateTime::UNIX_EPOCH)
            }
        );
    }

    #[test]
    fn goid_only_on_calendar_items() {
        let mut r = record();
        r.goid = Some(GlobalObjectId::new(vec![1, 2]).unwrap());
        let err = Change::crm(crm_id(), ObjectTypeCode::Task, VersionNumber(1), ChangeOp::Create(r.clone()))
            .unwrap_err();
        assert_eq!(
            err,
            ChangeError::GoidOnNonCalendar {
                key: RecordKey::Crm(crm_id()),
                object_type: ObjectTypeCode::Task
            }
        );
        assert!(
            Change::crm(crm_id(), ObjectTypeCode::Appointment, VersionNumber(1), ChangeOp::Create(r)).is_ok()
        );
    }

    #[test]
    fn stamp_rules() {
        let mut r = record();
        r.crm_id = Some(crm_id());
        assert_eq!(
            Change::crm(crm_id(), ObjectTypeCode::Contact, VersionNumber(1), ChangeOp::Update(r))
                .unwrap_err(),
            ChangeError::CrmIdOnCrmChange { key: RecordKey::Crm(crm_id()), crm_id: crm_id() }
        );
        assert_eq!(
            Change::outlook(
                entry(),
                ObjectTypeCode::Contact,
                DateTime::UNIX_EPOCH,
                ChangeOp::Create(record())
            )
            .unwrap_err(),
            ChangeError::OutlookCreateWithoutCrmId { key: RecordKey::Outlook(entry()) }
        );
        assert_eq!(
            Change::outlook(
                entry(),
                ObjectTypeCode::Contact,
                DateTime::UNIX_EPOCH,
                ChangeOp::Delete(DeleteReason::LeftFilter)
            )
            .unwrap_err(),
            ChangeError::OutlookLeftFilter {
                key: RecordKey::Outlook(entry()),
                reason: DeleteReason::LeftFilter
            }
        );
    }

    #[test]
    fn deserialising_validates() {
        let ok = Change::crm(crm_id(), ObjectTypeCode::Contact, VersionNumber(3), ChangeOp::Create(record()))
            .unwrap();
        let json = serde_json::to_string(&ok).unwrap();
        assert_eq!(serde_json::from_str::<Change>(&json).unwrap(), ok);
        let bad = json.replace(r#"{"Crm":3}"#, r#"{"Outlook":"2020-01-01T00:00:00Z"}"#);
        let err = serde_json::from_str::<Change>(&bad).unwrap_err();
        assert!(err.to_string().contains("belong to different sides"), "{err}");
    }
}
