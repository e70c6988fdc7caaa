//! A small vocabulary for writing sync states by hand: readable ids, fields and times, and a
//! `World` that renders its input and its plan as text for snapshots.

use std::fmt::Write;

use chrono::{DateTime, Duration, Utc};
use crmsync::*;

pub fn id(n: u128) -> CrmId {
    CrmId::new(uuid::Uuid::from_u128(n)).expect("non-nil")
}

pub fn e(s: &str) -> EntryId {
    EntryId::new(s).expect("valid entry id")
}

pub fn goid(n: u8) -> GlobalObjectId {
    GlobalObjectId::new(vec![0x04, 0x00, n]).expect("valid goid")
}

pub fn f(pairs: &[(&str, &str)]) -> Fields {
    Fields::try_from_pairs(pairs.iter().copied()).expect("valid fields")
}

/// Minutes after a fixed Outlook clock origin.
pub fn at(minute: i64) -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH + Duration::days(20_000) + Duration::minutes(minute)
}

pub fn rec(fields: &[(&str, &str)]) -> Record {
    Record::new(f(fields))
}

/// An Outlook record carrying the `CrmId` chosen for (or stamped on) its item.
pub fn orec(crm: u128, fields: &[(&str, &str)]) -> Record {
    Record { crm_id: Some(id(crm)), ..rec(fields) }
}

pub fn meeting(g: u8, role: Role, fields: &[(&str, &str)]) -> Record {
    Record { goid: Some(goid(g)), role, ..rec(fields) }
}

/// The default policies with the mass-delete guard confirmed (for runs that delete much on
/// purpose; the guard has tests of its own).
pub fn deletes_confirmed() -> Policies {
    Policies { mass_delete: MassDeleteGuard { confirmed: true, ..Default::default() }, ..Default::default() }
}

#[derive(Default)]
pub struct World {
    pub queue: Queue,
    pub mapping: Mapping,
    pub policies: Policies,
}

impl World {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `crm` <-> `entry` with `base`, owned by the user, open, agreed at CRM version 10.
    pub fn map(self, crm: u128, entry: &str, otc: ObjectTypeCode, base: &[(&str, &str)]) -> Self {
        self.map_as(crm, entry, otc, base, Role::Owner, ActivityStatus::Open)
    }

    pub fn map_as(
        mut self,
        crm: u128,
        entry: &str,
        otc: ObjectTypeCode,
        base: &[(&str, &str)],
        role: Role,
        status: ActivityStatus,
    ) -> Self {
        let goid = otc.is_calendar().then(|| goid(crm as u8));
        let m = MappingEntry {
            crm_id: id(crm),
            entry_id: e(entry),
            object_type: otc,
            base: f(base),
            goid,
            role,
            status,
            crm_version: Some(VersionNumber(10)),
        };
        self.mapping.insert(m).expect("distinct mapping");
        self
    }

    pub fn crm(mut self, crm: u128, otc: ObjectTypeCode, version: u64, op: ChangeOp) -> Self {
        let change = Change::crm(id(crm), otc, VersionNumber(version), op).expect("valid change");
        self.queue.push(change).expect("room");
        self
    }

    pub fn outlook(mut self, entry: &str, otc: ObjectTypeCode, minute: i64, op: ChangeOp) -> Self {
        let change = Change::outlook(e(entry), otc, at(minute), op).expect("valid change");
        self.queue.push(change).expect("room");
        self
    }

    pub fn with(mut self, policies: Policies) -> Self {
        self.policies = policies;
        self
    }

    pub fn plan(&self) -> Result<Plan, PlanError> {
        plan(&self.queue, &self.mapping, &self.policies)
    }

    /// The input (mapping, queue, non-default policies) and the plan, as a reviewer reads them.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.policies != Policies::default() {
            let _ = writeln!(out, "policies: {:?}", self.policies);
        }
        let _ = writeln!(out, "mapping:");
        for m in self.mapping.entries() {
            let v = m.crm_version.map_or("-".into(), |v| v.to_string());
            let _ = writeln!(
                out,
                "  {} <-> {} {} at {v}, {:?}/{:?}, base {}",
                m.crm_id, m.entry_id, m.object_type, m.role, m.status, m.base
            );
        }
        let _ = writeln!(out, "queue:");
        for q in self.queue.entries() {
            let c = &q.change;
            let what = match c.op() {
                ChangeOp::Create(r) | ChangeOp::Update(r) => {
                    let stamp = r.crm_id.map_or(String::new(), |id| format!(" crm_id={id}"));
                    let g = r.goid.as_ref().map_or(String::new(), |g| format!(" goid={g}"));
                    format!("{:?} {}{g}{stamp} {:?}/{:?}", c.kind(), r.fields, r.role, r.status)
                }
                ChangeOp::Delete(why) => format!("Delete ({why:?})"),
            };
            let _ = writeln!(out, "  {} {} {} @{}: {what}", q.id, c.key(), c.object_type(), c.stamp());
        }
        let _ = writeln!(out, "plan:");
        match self.plan() {
            Ok(plan) => {
                let _ = write!(out, "{plan}");
            }
            Err(err) => {
                let _ = writeln!(out, "  refused: {err}");
            }
        }
        out
    }
}

/// Asserts `value` against `snapshots/<name>.snap` at the top of the repository.
#[macro_export]
macro_rules! snapshot {
    ($name:expr, $value:expr) => {
        insta::with_settings!({ snapshot_path => "../../snapshots", prepend_module_to_snapshot => false }, {
            insta::assert_snapshot!($name, $value);
        })
    };
}
