//! The synchronised entities: `ObjectTypeCode` with the real Dynamics CRM codes, and how each one
//! syncs (DOMAIN section 5, first paragraph).
//!
//! An unknown code is an error carrying the number, never silently dropped.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The entity of a record, with the codes Dynamics CRM uses.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub enum ObjectTypeCode {
    Contact,
    Appointment,
    Email,
    Fax,
    Letter,
    PhoneCall,
    Task,
    ServiceAppointment,
    RecurringAppointmentMaster,
}

/// An `ObjectTypeCode` number this crate does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown ObjectTypeCode {0}")]
pub struct UnknownObjectTypeCode(pub u32);

/// How an entity synchronises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EntityGroup {
    /// Contacts <-> Outlook contacts.
    Contact,
    /// Appointments and recurring appointment masters <-> Outlook calendar items.
    Appointment,
    /// Service appointments -> Outlook calendar items, CRM to Outlook only.
    ServiceAppointment,
    /// Tasks, phone calls, letters and faxes <-> Outlook tasks.
    Activity,
    /// Emails: tracked, not synchronised by this process. A sync change for one is an error.
    NotSynchronised,
}

impl ObjectTypeCode {
    /// Every known code, in code order.
    pub const ALL: [ObjectTypeCode; 9] = [
        ObjectTypeCode::Contact,
        ObjectTypeCode::Appointment,
        ObjectTypeCode::Email,
        ObjectTypeCode::Fax,
        ObjectTypeCode::Letter,
        ObjectTypeCode::PhoneCall,
        ObjectTypeCode::Task,
        ObjectTypeCode::ServiceAppointment,
        ObjectTypeCode::RecurringAppointmentMaster,
    ];

    pub const fn code(self) -> u32 {
        match self {
            ObjectTypeCode::Contact => 2,
            ObjectTypeCode::Appointment => 4201,
            ObjectTypeCode::Email => 4202,
            ObjectTypeCode::Fax => 4204,
            ObjectTypeCode::Letter => 4207,
            ObjectTypeCode::PhoneCall => 4210,
            ObjectTypeCode::Task => 4212,
            ObjectTypeCode::ServiceAppointment => 4214,
            ObjectTypeCode::RecurringAppointmentMaster => 4251,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            ObjectTypeCode::Contact => "contact",
            ObjectTypeCode::Appointment => "appointment",
            ObjectTypeCode::Email => "email",
            ObjectTypeCode::Fax => "fax",
            ObjectTypeCode::Letter => "letter",
            ObjectTypeCode::PhoneCall => "phonecall",
            ObjectTypeCode::Task => "task",
            ObjectTypeCode::ServiceAppointment => "serviceappointment",
            ObjectTypeCode::RecurringAppointmentMaster => "recurringappointmentmaster",
        }
    }

    pub const fn group(self) -> EntityGroup {
        match self {
            ObjectTypeCode::Contact => EntityGroup::Contact,
            ObjectTypeCode::Appointment | ObjectTypeCode::RecurringAppointmentMaster => {
                EntityGroup::Appointment
            }
            ObjectTypeCode::ServiceAppointment => EntityGroup::ServiceAppointment,
            ObjectTypeCode::Fax
            | ObjectTypeCode::Letter
            | ObjectTypeCode::PhoneCall
            | ObjectTypeCode::Task => EntityGroup::Activity,
            ObjectTypeCode::Email => EntityGroup::NotSynchronised,
        }
    }

    /// Calendar items: the only entities that carry a `GlobalObjectId`.
    pub const fn is_calendar(self) -> bool {
        matches!(self.group(), EntityGroup::Appointment | EntityGroup::ServiceAppointment)
    }

    /// Whether changes made in Outlook flow to CRM for this entity.
    pub const fn syncs_outlook_to_crm(self) -> bool {
        matches!(self.group(), EntityGroup::Contact | EntityGroup::Appointment | EntityGroup::Activity)
    }
}

impl TryFrom<u32> for ObjectTypeCode {
    type Error = UnknownObjectTypeCode;
    fn try_from(code: u32) -> Result<Self, UnknownObjectTypeCode> {
        ObjectTypeCode::ALL.into_iter().find(|otc| otc.code() == code).ok_or(UnknownObjectTypeCode(code))
    }
}

impl From<ObjectTypeCode> for u32 {
    fn from(otc: ObjectTypeCode) -> u32 {
        otc.code()
    }
}

impl fmt::Display for ObjectTypeCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Debug for ObjectTypeCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for otc in ObjectTypeCode::ALL {
            assert_eq!(ObjectTypeCode::try_from(otc.code()), Ok(otc));
        }
        assert_eq!(ObjectTypeCode::try_from(4201), Ok(ObjectTypeCode::Appointment));
    }

    #[test]
    fn unknown_code_is_an_error_carrying_the_number() {
        assert_eq!(ObjectTypeCode::try_from(4203), Err(UnknownObjectTypeCode(4203)));
        let err = serde_json::from_str::<ObjectTypeCode>("9999").unwrap_err();
        assert!(err.to_string().contains("unknown ObjectTypeCode 9999"), "{err}");
    }
}
