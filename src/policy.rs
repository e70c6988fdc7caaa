//! Every choice the decision table leaves open, as one `Policies` value with documented defaults
//! (DOMAIN section 5): field conflicts, the two delete matrices, update-versus-delete, per-field
//! sync direction and the mass-delete guard.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::change::{ActivityStatus, Role};
use crate::entity::{EntityGroup, ObjectTypeCode};

/// Which side wins a field changed on both sides since the last sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum FieldConflictPolicy {
    #[default]
    CrmWins,
    OutlookWins,
}

/// A record updated on one side and deleted on the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum UpdateVsDeletePolicy {
    /// The update wins: the deleted side gets the record back and the mapping is re-pointed, so
    /// no edit is lost.
    #[default]
    UpdateWins,
    /// The delete wins: the side's delete policy is applied as if there had been no update.
    DeleteWins,
}

/// One cell of a delete matrix: whether a delete on one side is carried to the other. Where it is
/// not, the pair is untracked: both copies stay and the mapping is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeleteRule {
    /// Never carried: untrack.
    Untrack,
    /// Always carried.
    Delete,
    /// Carried if the activity is still current (not completed or cancelled).
    DeleteIfCurrent,
    /// Carried if the user owns or organises the record.
    DeleteIfOwnerOrOrganizer,
    /// Carried if the activity is current and the user owns or organises it.
    DeleteIfCurrentAndOwnerOrOrganizer,
    /// Carried unless the user owns the record (the owner keeps an untracked copy).
    DeleteUnlessOwner,
}

impl DeleteRule {
    /// Whether the delete is carried to the other side, for a record the user holds in `role`
    /// and whose activity status is `status`.
    pub fn carries(self, role: Role, status: ActivityStatus) -> bool {
        match self {
            DeleteRule::Untrack => false,
            DeleteRule::Delete => true,
            DeleteRule::DeleteIfCurrent => status.is_current(),
            DeleteRule::DeleteIfOwnerOrOrganizer => role.owns_or_organises(),
            DeleteRule::DeleteIfCurrentAndOwnerOrOrganizer => status.is_current() && role.owns_or_organises(),
            DeleteRule::DeleteUnlessOwner => role != Role::Owner,
        }
    }
}

/// What a delete in CRM (or a record leaving the user's filter) does to the Outlook copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrmDeletePolicy {
    /// Default: the owner's Outlook copy stays, untracked; other users' copies are deleted.
    pub contact: DeleteRule,
    /// Default: deleted in Outlook if current and the user owns or organises it; else untracked.
    /// Also used for service appointments.
    pub appointment: DeleteRule,
    /// Tasks, phone calls, letters, faxes. Default: deleted in Outlook if still current.
    pub activity: DeleteRule,
}

impl Default for CrmDeletePolicy {
    fn default() -> Self {
        CrmDeletePolicy {
            contact: DeleteRule::DeleteUnlessOwner,
            appointment: DeleteRule::DeleteIfCurrentAndOwnerOrOrganizer,
            activity: DeleteRule::DeleteIfCurrent,
        }
    }
}

impl CrmDeletePolicy {
    pub fn rule(&self, object_type: ObjectTypeCode) -> DeleteRule {
        match object_type.group() {
            EntityGroup::Contact => self.contact,
            EntityGroup::Appointment | EntityGroup::ServiceAppointment => self.appointment,
            EntityGroup::Activity => self.activity,
            EntityGroup::NotSynchronised => DeleteRule::Untrack,
        }
    }
}

/// What a delete in Outlook does to the CRM record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutlookDeletePolicy {
    /// Default: untrack; the CRM record stays.
    pub contact: DeleteRule,
    /// Default: deleted in CRM if the user organises or owns it; an attendee's delete untracks.
    pub appointment: DeleteRule,
    /// Tasks, phone calls, letters, faxes. Default: deleted in CRM if current.
    pub activity: DeleteRule,
}

impl Default for OutlookDeletePolicy {
    fn default() -> Self {
        OutlookDeletePolicy {
            contact: DeleteRule::Untrack,
            appointment: DeleteRule::DeleteIfOwnerOrOrganizer,
            activity: DeleteRule::DeleteIfCurrent,
        }
    }
}

impl OutlookDeletePolicy {
    /// Service appointments flow CRM -> Outlook only, so an Outlook delete of one only untracks,
    /// whatever the policy says.
    pub fn rule(&self, object_type: ObjectTypeCode) -> DeleteRule {
        match object_type.group() {
            EntityGroup::Contact => self.contact,
            EntityGroup::Appointment => self.appointment,
            EntityGroup::Activity => self.activity,
            EntityGroup::ServiceAppointment | EntityGroup::NotSynchronised => DeleteRule::Untrack,
        }
    }
}

/// Which way one field flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum FieldSyncDirection {
    #[default]
    TwoWay,
    CrmToOutlook,
    OutlookToCrm,
    /// Not synchronised: each side keeps its own value.
    None,
}

impl FieldSyncDirection {
    pub fn flows_to_outlook(self) -> bool {
        matches!(self, FieldSyncDirection::TwoWay | FieldSyncDirection::CrmToOutlook)
    }
    pub fn flows_to_crm(self) -> bool {
        matches!(self, FieldSyncDirection::TwoWay | FieldSyncDirection::OutlookToCrm)
    }
}

/// Per entity and field, the direction; fields not named are `TwoWay`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldDirections(pub BTreeMap<ObjectTypeCode, BTreeMap<String, FieldSyncDirection>>);

impl FieldDirections {
    /// The direction of `field` for `object_type`. Service appointments flow CRM -> Outlook only:
    /// a two-way field of theirs is `CrmToOutlook`, an Outlook-to-CRM one is `None`.
    pub fn get(&self, object_type: ObjectTypeCode, field: &str) -> FieldSyncDirection {
        let configured =
            self.0.get(&object_type).and_then(|fields| fields.get(field)).copied().unwrap_or_default();
        if object_type.syncs_outlook_to_crm() {
            return configured;
        }
        match configured {
            FieldSyncDirection::TwoWay | FieldSyncDirection::CrmToOutlook => FieldSyncDirection::CrmToOutlook,
            FieldSyncDirection::OutlookToCrm | FieldSyncDirection::None => FieldSyncDirection::None,
        }
    }

    /// Whether every field of `object_type` is two-way (the common, fast case).
    pub fn all_two_way(&self, object_type: ObjectTypeCode) -> bool {
        object_type.syncs_outlook_to_crm()
            && self
                .0
                .get(&object_type)
                .is_none_or(|fields| fields.values().all(|d| *d == FieldSyncDirection::TwoWay))
    }
}

/// Stops a run that would delete too much before it writes anything.
///
/// It trips when one side would see at least `records_min` deletes and more than `percent_max`
/// percent of the mapped records deleted, unless the user `confirmed` the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MassDeleteGuard {
    pub percent_max: u8,
    pub records_min: usize,
    pub confirmed: bool,
}

impl Default for MassDeleteGuard {
    fn default() -> Self {
        MassDeleteGuard { percent_max: 50, records_min: 10, confirmed: false }
    }
}

impl MassDeleteGuard {
    /// Whether deleting `deletes` of `mapped` records on one side trips the guard.
    pub fn trips(&self, deletes: usize, mapped: usize) -> bool {
        !self.confirmed
            && deletes >= self.records_min
            && (deletes as u128) * 100 > (self.percent_max as u128) * (mapped as u128)
    }
}

/// Every policy of a sync, with the defaults Dynamics CRM documents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Policies {
    pub field_conflict: FieldConflictPolicy,
    pub crm_delete: CrmDeletePolicy,
    pub outlook_delete: OutlookDeletePolicy,
    pub update_vs_delete: UpdateVsDeletePolicy,
    pub field_directions: FieldDirections,
    pub mass_delete: MassDeleteGuard,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_matrix_defaults_follow_the_documented_table() {
        let crm = CrmDeletePolicy::default();
        let outlook = OutlookDeletePolicy::default();
        use ActivityStatus::*;
        use ObjectTypeCode as T;
        use Role::*;
        // contact: deleted in Outlook -> untrack; deleted in CRM -> owner keeps, others deleted.
        assert!(!outlook.rule(T::Contact).carries(Owner, Open));
        assert!(!crm.rule(T::Contact).carries(Owner, Open));
        assert!(crm.rule(T::Contact).carries(Other, Open));
        // appointment: an attendee's Outlook delete untracks; organiser's is carried.
        assert!(!outlook.rule(T::Appointment).carries(Attendee, Open));
        assert!(outlook.rule(T::Appointment).carries(Organizer, Open));
        assert!(crm.rule(T::Appointment).carries(Owner, Open));
        assert!(!crm.rule(T::Appointment).carries(Owner, Completed));
        assert!(!crm.rule(T::Appointment).carries(Attendee, Open));
        // activities: carried if current.
        for t in [T::Task, T::PhoneCall, T::Letter, T::Fax] {
            assert!(crm.rule(t).carries(Owner, Open));
            assert!(!crm.rule(t).carries(Owner, Cancelled));
            assert!(outlook.rule(t).carries(Other, Open));
            assert!(!outlook.rule(t).carries(Owner, Completed));
        }
        // service appointments never flow Outlook -> CRM.
        assert_eq!(
            OutlookDeletePolicy { appointment: DeleteRule::Delete, ..outlook }.rule(T::ServiceAppointment),
            DeleteRule::Untrack
        );
    }

    #[test]
    fn mass_delete_guard_needs_both_thresholds() {
        let guard = MassDeleteGuard::default();
        assert!(!guard.trips(9, 10)); // 90% but fewer than 10 records
        assert!(!guard.trips(10, 20)); // 10 records but exactly 50%
        assert!(guard.trips(11, 20));
        assert!(!MassDeleteGuard { confirmed: true, ..guard }.trips(11, 20));
    }

    #[test]
    fn service_appointment_fields_flow_crm_to_outlook_only() {
        let mut dirs = FieldDirections::default();
        assert_eq!(dirs.get(ObjectTypeCode::ServiceAppointment, "subject"), FieldSyncDirection::CrmToOutlook);
        dirs.0
            .entry(ObjectTypeCode::ServiceAppointment)
            .or_default()
            .insert("x".into(), FieldSyncDirection::OutlookToCrm);
        assert_eq!(dirs.get(ObjectTypeCode::ServiceAppointment, "x"), FieldSyncDirection::None);
        assert!(dirs.all_two_way(ObjectTypeCode::Contact));
        assert!(!dirs.all_two_way(ObjectTypeCode::ServiceAppointment));
    }
}
