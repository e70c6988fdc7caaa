//! Running a scenario: the setup, each step through the real edges, the final state and the
//! verdicts.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use crmsync::cache::SyncCache;
use crmsync::clock::ManualClock;
use crmsync::engine::{Edges, EngineConfig, EngineError, SeededIds, run_sync, unlink};
use crmsync::fields::Fields;
use crmsync::ids::{CrmId, EntryId, GlobalObjectId};
use crmsync::mailbox::{Mailbox, MailboxItem, MemoryMailbox, Tracking, UserEdits};
use crmsync::policy::{
    CrmDeletePolicy, DeleteRule, FieldConflictPolicy, FieldSyncDirection, OutlookDeletePolicy, Policies,
    UpdateVsDeletePolicy,
};
use crmsync::server::{
    CrmService, ServerError, ServerRecord, ServerStore, SubscriptionId, SubscriptionType, SystemUserId,
};
use crmsync::settle::SyncState;
use crmsync::{ActivityStatus, ChangeKind, ObjectTypeCode, RecordKey};
use uuid::Uuid;

use super::ScenarioError;
use super::edges::{Desk, Fault, ScriptCrash, ScriptMailbox, ScriptServer};
use super::format::*;
use super::state::*;
use crate::trace::TraceEvent;

/// Seconds the virtual clock advances before each step.
const STEP_S: i64 = 60;

/// A scenario that ran: its final state (with the verdicts) and its timeline events.
#[derive(Debug)]
pub struct Ran {
    pub state: FinalState,
    /// One event per step but `check` (the step number is the index in `steps` plus one).
    pub events: Vec<TraceEvent>,
    /// The event number of the first `check` step that failed, for the timeline's red line.
    pub failed_at_step: Option<u64>,
}

/// Runs `scenario`. A bad reference or an impossible step is an error naming its path; a check
/// or an invariant that does not hold is a failed verdict in the state.
pub fn run(scenario: &Scenario) -> Result<Ran, ScenarioError> {
    let mut r = Runner::new(scenario)?;
    for (i, step) in scenario.steps.iter().enumerate() {
        r.step = i;
        r.clock.set(r.start + Duration::seconds(STEP_S * (i as i64 + 1)));
        r.do_step(i, step)?;
    }
    let state = r.final_state()?;
    Ok(Ran { state, events: r.events, failed_at_step: r.failed_at_step })
}

struct UserRt {
    label: String,
    id: SystemUserId,
    mailbox: MemoryMailbox,
}

struct MachineRt {
    label: String,
    user: usize,
    cache: SyncCache,
    subscription: Option<SubscriptionId>,
    ids: SeededIds,
    page_size: usize,
    commit_every: usize,
}

struct Runner<'s> {
    clock: Rc<ManualClock>,
    start: DateTime<Utc>,
    server: ServerStore,
    policies: Policies,
    users: Vec<UserRt>,
    machines: Vec<MachineRt>,
    records: BTreeMap<String, CrmId>,
    record_names: BTreeMap<CrmId, String>,
    items: BTreeMap<String, (usize, EntryId)>,
    item_names: BTreeMap<(usize, EntryId), String>,
    goids: BTreeMap<Vec<u8>, String>,
    /// The record each item was last seen linked to.
    last_stamps: BTreeMap<(usize, EntryId), CrmId>,
    /// Every subscription registered, with its machine.
    subscriptions: Vec<(SubscriptionId, usize)>,
    step: usize,
    events: Vec<TraceEvent>,
    runs: Vec<RunLog>,
    check_failures: Vec<String>,
    /// The event number of the first check that failed.
    failed_at_step: Option<u64>,
    unfired: Vec<String>,
    _scenario: std::marker::PhantomData<&'s Scenario>,
}

fn store_err(path: &str, e: impl std::fmt::Display) -> ScenarioError {
    ScenarioError::Store { path: path.to_owned(), message: e.to_string() }
}

fn impossible(path: &str, why: String) -> ScenarioError {
    ScenarioError::Impossible { path: path.to_owned(), why }
}

fn v5(what: &str, label: &str) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("crmsync-scenario/{what}/{label}").as_bytes())
}

/// FNV-1a of a label: the seed of a machine's id source.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

pub(crate) fn otc(e: EntityType) -> ObjectTypeCode {
    match e {
        EntityType::Contact => ObjectTypeCode::Contact,
        EntityType::Appointment => ObjectTypeCode::Appointment,
        EntityType::Email => ObjectTypeCode::Email,
        EntityType::Fax => ObjectTypeCode::Fax,
        EntityType::Letter => ObjectTypeCode::Letter,
        EntityType::PhoneCall => ObjectTypeCode::PhoneCall,
        EntityType::Task => ObjectTypeCode::Task,
        EntityType::ServiceAppointment => ObjectTypeCode::ServiceAppointment,
        EntityType::RecurringAppointmentMaster => ObjectTypeCode::RecurringAppointmentMaster,
    }
}

fn status(s: StatusSpec) -> ActivityStatus {
    match s {
        StatusSpec::Open => ActivityStatus::Open,
        StatusSpec::Completed => ActivityStatus::Completed,
        StatusSpec::Cancelled => ActivityStatus::Cancelled,
    }
}

fn status_name(s: ActivityStatus) -> String {
    format!("{s:?}").to_lowercase()
}

fn rule(r: DeleteRuleSpec) -> DeleteRule {
    match r {
        DeleteRuleSpec::Untrack => DeleteRule::Untrack,
        DeleteRuleSpec::Delete => DeleteRule::Delete,
        DeleteRuleSpec::DeleteIfCurrent => DeleteRule::DeleteIfCurrent,
        DeleteRuleSpec::DeleteIfOwnerOrOrganizer => DeleteRule::DeleteIfOwnerOrOrganizer,
        DeleteRuleSpec::DeleteIfCurrentAndOwnerOrOrganizer => DeleteRule::DeleteIfCurrentAndOwnerOrOrganizer,
        DeleteRuleSpec::DeleteUnlessOwner => DeleteRule::DeleteUnlessOwner,
    }
}

/// DOMAIN's default policies with what the scenario changes.
fn policies(spec: Option<&PoliciesSpec>) -> Policies {
    let mut p = Policies::default();
    let Some(spec) = spec else { return p };
    if let Some(c) = spec.field_conflict {
        p.field_conflict = match c {
            FieldConflictSpec::CrmWins => FieldConflictPolicy::CrmWins,
            FieldConflictSpec::OutlookWins => FieldConflictPolicy::OutlookWins,
        };
    }
    if let Some(u) = spec.update_vs_delete {
        p.update_vs_delete = match u {
            UpdateVsDeleteSpec::UpdateWins => UpdateVsDeletePolicy::UpdateWins,
            UpdateVsDeleteSpec::DeleteWins => UpdateVsDeletePolicy::DeleteWins,
        };
    }
    if let Some(m) = spec.crm_delete {
        let d = CrmDeletePolicy::default();
        p.crm_delete = CrmDeletePolicy {
            contact: m.contact.map_or(d.contact, rule),
            appointment: m.appointment.map_or(d.appointment, rule),
            activity: m.activity.map_or(d.activity, rule),
        };
    }
    if let Some(m) = spec.outlook_delete {
        let d = OutlookDeletePolicy::default();
        p.outlook_delete = OutlookDeletePolicy {
            contact: m.contact.map_or(d.contact, rule),
            appointment: m.appointment.map_or(d.appointment, rule),
            activity: m.activity.map_or(d.activity, rule),
        };
    }
    for (entity, fields) in &spec.field_directions {
        let map = p.field_directions.0.entry(otc(*entity)).or_default();
        for (name, dir) in fields {
            let dir = match dir {
                DirectionSpec::TwoWay => FieldSyncDirection::TwoWay,
                DirectionSpec::CrmToOutlook => FieldSyncDirection::CrmToOutlook,
                DirectionSpec::OutlookToCrm => FieldSyncDirection::OutlookToCrm,
                DirectionSpec::None => FieldSyncDirection::None,
            };
            map.insert(name.clone(), dir);
        }
    }
    if let Some(m) = spec.mass_delete {
        p.mass_delete.percent_max = m.percent_max.unwrap_or(p.mass_delete.percent_max);
        p.mass_delete.records_min = m.records_min.unwrap_or(p.mass_delete.records_min);
        p.mass_delete.confirmed = m.confirmed.unwrap_or(p.mass_delete.confirmed);
    }
    p
}

fn check_label(path: &str, label: &str) -> Result<(), ScenarioError> {
    if label.is_empty() || label.len() > 64 || label.chars().any(char::is_whitespace) {
        return Err(ScenarioError::Invalid {
            path: path.to_owned(),
            value: label.to_owned(),
            why: "is not a label (1 to 64 characters, no spaces)".into(),
        });
    }
    Ok(())
}

fn fields_of(path: &str, map: &BTreeMap<String, String>) -> Result<Fields, ScenarioError> {
    Fields::try_from_pairs(map.iter().map(|(k, v)| (k.as_str(), v.as_str()))).map_err(|e| {
        ScenarioError::Invalid { path: path.to_owned(), value: format!("{map:?}"), why: e.to_string() }
    })
}

impl<'s> Runner<'s> {
    fn new(sc: &'s Scenario) -> Result<Runner<'s>, ScenarioError> {
        let start = Utc.with_ymd_and_hms(2026, 1, 5, 8, 0, 0).single().expect("a valid date");
        let clock = Rc::new(ManualClock::new(start));
        let server = ServerStore::in_memory(Box::new(clock.clone())).map_err(|e| store_err("", e))?;
        let mut r = Runner {
            clock,
            start,
            server,
            policies: policies(sc.policies.as_ref()),
            users: Vec::new(),
            machines: Vec::new(),
            records: BTreeMap::new(),
            record_names: BTreeMap::new(),
            items: BTreeMap::new(),
            item_names: BTreeMap::new(),
            goids: BTreeMap::new(),
            last_stamps: BTreeMap::new(),
            subscriptions: Vec::new(),
            step: 0,
            events: Vec::new(),
            runs: Vec::new(),
            check_failures: Vec::new(),
            failed_at_step: None,
            unfired: Vec::new(),
            _scenario: std::marker::PhantomData,
        };
        for (i, label) in sc.users.iter().enumerate() {
            let path = format!("users[{i}]");
            check_label(&path, label)?;
            if r.users.iter().any(|u| &u.label == label) {
                return Err(ScenarioError::Duplicate { path, kind: "user", label: label.clone() });
            }
            let id = SystemUserId::new(v5("user", label)).expect("a v5 id is never nil");
            r.server.add_user(id, label).map_err(|e| store_err(&path, e))?;
            let mailbox = MemoryMailbox::new(&format!("{:X}", i + 1), Box::new(r.clock.clone()))
                .map_err(|e| store_err(&path, e))?;
            r.users.push(UserRt { label: label.clone(), id, mailbox });
        }
        for (i, spec) in sc.records.iter().enumerate() {
            let record = r.new_record(
                &format!("records[{i}]"),
                &spec.label,
                spec.entity,
                &spec.owner,
                &spec.fields,
                &spec.attendees,
                spec.goid.as_deref(),
                spec.status,
            )?;
            r.server.put_record(&record).map_err(|e| store_err(&format!("records[{i}]"), e))?;
        }
        for (i, spec) in sc.items.iter().enumerate() {
            r.new_item(
                &format!("items[{i}]"),
                &spec.label,
                &spec.user,
                spec.entity,
                &spec.fields,
                spec.goid.as_deref(),
                spec.status,
                spec.track,
            )?;
        }
        for (i, spec) in sc.machines.iter().enumerate() {
            let path = format!("machines[{i}]");
            check_label(&format!("{path}.name"), &spec.name)?;
            if r.machines.iter().any(|m| m.label == spec.name) {
                return Err(ScenarioError::Duplicate { path, kind: "machine", label: spec.name.clone() });
            }
            let user = r.user(&format!("{path}.user"), &spec.user)?;
            for (what, value) in [("page_size", spec.page_size), ("commit_every", spec.commit_every)] {
                if value == Some(0) {
                    return Err(ScenarioError::Invalid {
                        path: format!("{path}.{what}"),
                        value: "0".into(),
                        why: "must be at least 1".into(),
                    });
                }
            }
            let cache = SyncCache::in_memory().map_err(|e| store_err(&path, e))?;
            let m = r.machines.len();
            r.machines.push(MachineRt {
                label: spec.name.clone(),
                user,
                cache,
                subscription: None,
                ids: SeededIds::new(fnv(&spec.name)),
                page_size: spec.page_size.unwrap_or(1000),
                commit_every: spec.commit_every.unwrap_or(1),
            });
            r.register(&path, m)?;
        }
        Ok(r)
    }

    fn register(&mut self, path: &str, m: usize) -> Result<(), ScenarioError> {
        let user = self.users[self.machines[m].user].id;
        let sub = self
            .server
            .register_client(user, &self.machines[m].label, SubscriptionType::Outlook)
            .map_err(|e| store_err(path, e))?;
        self.machines[m].subscription = Some(sub);
        self.subscriptions.push((sub, m));
        Ok(())
    }

    fn user(&self, path: &str, label: &str) -> Result<usize, ScenarioError> {
        self.users.iter().position(|u| u.label == label).ok_or_else(|| ScenarioError::Unknown {
            path: path.to_owned(),
            kind: "user",
            label: label.to_owned(),
        })
    }

    fn machine(&self, path: &str, label: &str) -> Result<usize, ScenarioError> {
        self.machines.iter().position(|m| m.label == label).ok_or_else(|| ScenarioError::Unknown {
            path: path.to_owned(),
            kind: "machine",
            label: label.to_owned(),
        })
    }

    fn record_id(&self, path: &str, label: &str) -> Result<CrmId, ScenarioError> {
        self.records.get(label).copied().ok_or_else(|| ScenarioError::Unknown {
            path: path.to_owned(),
            kind: "record",
            label: label.to_owned(),
        })
    }

    fn item(&self, path: &str, label: &str) -> Result<(usize, EntryId), ScenarioError> {
        self.items.get(label).cloned().ok_or_else(|| ScenarioError::Unknown {
            path: path.to_owned(),
            kind: "item",
            label: label.to_owned(),
        })
    }

    fn goid(
        &mut self,
        path: &str,
        label: &str,
        object_type: ObjectTypeCode,
    ) -> Result<GlobalObjectId, ScenarioError> {
        if !object_type.is_calendar() {
            return Err(ScenarioError::Invalid {
                path: path.to_owned(),
                value: label.to_owned(),
                why: format!("is a GOID, and only calendar items carry one (not a {object_type})"),
            });
        }
        check_label(path, label)?;
        let goid = GlobalObjectId::new(label.as_bytes().to_vec()).map_err(|e| ScenarioError::Invalid {
            path: path.to_owned(),
            value: label.to_owned(),
            why: e.to_string(),
        })?;
        self.goids.insert(label.as_bytes().to_vec(), label.to_owned());
        Ok(goid)
    }

    fn fresh_label(&self, path: &str, kind: &'static str, label: &str) -> Result<(), ScenarioError> {
        check_label(path, label)?;
        if self.records.contains_key(label) || self.items.contains_key(label) {
            return Err(ScenarioError::Duplicate { path: path.to_owned(), kind, label: label.to_owned() });
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn new_record(
        &mut self,
        path: &str,
        label: &str,
        entity: EntityType,
        owner: &str,
        fields: &BTreeMap<String, String>,
        attendees: &[String],
        goid: Option<&str>,
        st: StatusSpec,
    ) -> Result<ServerRecord, ScenarioError> {
        self.fresh_label(&format!("{path}.label"), "record", label)?;
        let object_type = otc(entity);
        let owner = self.users[self.user(&format!("{path}.owner"), owner)?].id;
        let mut ids = Vec::new();
        for (k, a) in attendees.iter().enumerate() {
            let apath = format!("{path}.attendees[{k}]");
            if !object_type.is_calendar() {
                return Err(ScenarioError::Invalid {
                    path: apath,
                    value: a.clone(),
                    why: format!("attends a {object_type}; only calendar items have attendees"),
                });
            }
            ids.push(self.users[self.user(&apath, a)?].id);
        }
        let goid = match goid {
            Some(g) => Some(self.goid(&format!("{path}.goid"), g, object_type)?),
            None if object_type.is_calendar() => {
                Some(self.goid(&format!("{path}.label"), label, object_type)?)
            }
            None => None,
        };
        let crm_id = CrmId::new(v5("record", label)).expect("a v5 id is never nil");
        let record = ServerRecord {
            crm_id,
            object_type,
            owner,
            version: crmsync::ids::VersionNumber(1),
            fields: fields_of(&format!("{path}.fields"), fields)?,
            goid,
            status: status(st),
            attendees: ids,
        };
        self.records.insert(label.to_owned(), crm_id);
        self.record_names.insert(crm_id, label.to_owned());
        Ok(record)
    }

    #[allow(clippy::too_many_arguments)]
    fn new_item(
        &mut self,
        path: &str,
        label: &str,
        user: &str,
        entity: EntityType,
        fields: &BTreeMap<String, String>,
        goid: Option<&str>,
        st: StatusSpec,
        track: bool,
    ) -> Result<(), ScenarioError> {
        self.fresh_label(&format!("{path}.label"), "item", label)?;
        let u = self.user(&format!("{path}.user"), user)?;
        let object_type = otc(entity);
        let goid = goid.map(|g| self.goid(&format!("{path}.goid"), g, object_type)).transpose()?;
        let fields = fields_of(&format!("{path}.fields"), fields)?;
        let mailbox = &mut self.users[u].mailbox;
        let entry =
            mailbox.user_create(object_type, fields, goid, status(st)).map_err(|e| store_err(path, e))?;
        if track {
            mailbox.user_track(&entry).map_err(|e| store_err(path, e))?;
        }
        self.items.insert(label.to_owned(), (u, entry.clone()));
        self.item_names.insert((u, entry), label.to_owned());
        Ok(())
    }

    fn time(&self) -> (i64, String) {
        let s = (crmsync::clock::Clock::now(&*self.clock) - self.start).num_seconds();
        (s, format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60))
    }

    fn log(&mut self, who: &str, what: &str, outcome: &str, faults: Vec<crate::fault::FaultKind>) {
        let (at_s, time) = self.time();
        let line = format!("{time} {who:<12} {what:<14} {outcome}");
        let (lane, kind) = TraceEvent::classify(who, what, outcome);
        self.events.push(TraceEvent { step: self.step as u64 + 1, at_s, lane, kind, faults, line });
    }

    fn crm_who(&self, owner: SystemUserId) -> String {
        let label = self.users.iter().find(|u| u.id == owner).map_or("?", |u| u.label.as_str());
        format!("crm/{label}")
    }

    fn record_name(&self, id: CrmId) -> String {
        self.record_names.get(&id).cloned().unwrap_or_else(|| {
            let hex = id.as_uuid().simple().to_string();
            format!("crm#{}", &hex[..8])
        })
    }

    fn item_name(&self, u: usize, entry: &EntryId) -> String {
        if let Some(label) = self.item_names.get(&(u, entry.clone())) {
            return label.clone();
        }
        let prefix = self.users[u].mailbox.prefix();
        let digits = entry.as_str().strip_prefix(prefix).unwrap_or(entry.as_str());
        match u64::from_str_radix(digits, 16) {
            Ok(n) => format!("#{n}"),
            Err(_) => entry.to_string(),
        }
    }

    fn goid_name(&self, goid: &GlobalObjectId) -> String {
        self.goids.get(goid.as_bytes()).cloned().unwrap_or_else(|| goid.to_hex())
    }

    /// The CRM record a step names: by its label, or the record an item is linked to.
    fn target_record(
        &self,
        path: &str,
        record: Option<&str>,
        item: Option<&str>,
    ) -> Result<CrmId, ScenarioError> {
        match (record, item) {
            (Some(label), None) => self.record_id(&format!("{path}.record"), label),
            (None, Some(label)) => {
                let (u, entry) = self.item(&format!("{path}.item"), label)?;
                let found = self.users[u].mailbox.get(&entry).map_err(|e| store_err(path, e))?;
                match found.and_then(|i| i.stamp()) {
                    Some(id) => Ok(id),
                    None => Err(impossible(path, format!("item {label:?} is not linked to a CRM record"))),
                }
            }
            _ => Err(impossible(path, "name exactly one of \"record\" and \"item\"".into())),
        }
    }

    /// The Outlook item a step names: by its label, or the item in `user`'s mailbox (default:
    /// the record owner's) linked to a record.
    fn target_item(
        &self,
        path: &str,
        record: Option<&str>,
        item: Option<&str>,
        user: Option<&str>,
    ) -> Result<(usize, EntryId), ScenarioError> {
        match (record, item) {
            (None, Some(label)) => {
                let (u, entry) = self.item(&format!("{path}.item"), label)?;
                match self.users[u].mailbox.get(&entry).map_err(|e| store_err(path, e))? {
                    Some(_) => Ok((u, entry)),
                    None => Err(impossible(path, format!("item {label:?} was deleted"))),
                }
            }
            (Some(label), None) => {
                let id = self.record_id(&format!("{path}.record"), label)?;
                let u = match user {
                    Some(user) => self.user(&format!("{path}.user"), user)?,
                    None => self.default_user(path, id)?,
                };
                match self.users[u].mailbox.find_by_stamp(id).map_err(|e| store_err(path, e))? {
                    Some(entry) => Ok((u, entry)),
                    None => Err(impossible(
                        path,
                        format!("{}'s mailbox holds no item linked to record {label:?}", self.users[u].label),
                    )),
                }
            }
            _ => Err(impossible(path, "name exactly one of \"record\" and \"item\"".into())),
        }
    }

    /// Whose item a step means when it names a record and no user: the record's owner, or for
    /// a deleted record the first user (in declaration order) holding an item linked to it.
    fn default_user(&self, path: &str, id: CrmId) -> Result<usize, ScenarioError> {
        let owner = self.server.record(id).map_err(|e| store_err(path, e))?.map(|r| r.owner);
        if let Some(u) = owner.and_then(|o| self.users.iter().position(|u| u.id == o)) {
            return Ok(u);
        }
        for (u, user) in self.users.iter().enumerate() {
            if user.mailbox.find_by_stamp(id).map_err(|e| store_err(path, e))?.is_some() {
                return Ok(u);
            }
        }
        Err(impossible(path, format!("no mailbox holds an item linked to record {}", self.record_name(id))))
    }

    /// A fault note with ids replaced by the labels they have in the scenario.
    fn named(&self, u: usize, note: &str) -> String {
        let mut out = note.to_owned();
        for (id, name) in &self.record_names {
            out = out.replace(&id.to_string(), name);
        }
        for item in self.items_of(u) {
            let name = self.item_name(u, &item.entry_id);
            out = out.replace(item.entry_id.as_str(), &name);
        }
        out
    }

    fn live_record(&self, path: &str, id: CrmId) -> Result<ServerRecord, ScenarioError> {
        match self.server.record(id).map_err(|e| store_err(path, e))? {
            Some(r) => Ok(r),
            None => Err(impossible(path, format!("record {} is deleted", self.record_name(id)))),
        }
    }

    fn do_step(&mut self, i: usize, step: &Step) -> Result<(), ScenarioError> {
        match step {
            Step::Edit(e) => self.edit(&format!("steps[{i}].edit"), e),
            Step::Delete(t) => self.delete(&format!("steps[{i}].delete"), t),
            Step::Create(c) => self.create(&format!("steps[{i}].create"), c),
            Step::Track(t) => {
                let path = format!("steps[{i}].track");
                if t.side != SideSpec::Outlook {
                    return Err(impossible(&path, "only Outlook items are tracked".into()));
                }
                let (u, entry) =
                    self.target_item(&path, t.record.as_deref(), t.item.as_deref(), t.user.as_deref())?;
                self.users[u].mailbox.user_track(&entry).map_err(|e| store_err(&path, e))?;
                let name = self.item_name(u, &entry);
                self.log(&format!("outlook/u{u}"), "track", &name, Vec::new());
                Ok(())
            }
            Step::Copy(c) => {
                let path = format!("steps[{i}].copy");
                let (u, entry) = self.target_item(&path, None, Some(&c.item), None)?;
                self.fresh_label(&format!("{path}.label"), "item", &c.label)?;
                let copy = self.users[u].mailbox.user_copy(&entry).map_err(|e| store_err(&path, e))?;
                self.items.insert(c.label.clone(), (u, copy.clone()));
                self.item_names.insert((u, copy), c.label.clone());
                self.log(&format!("outlook/u{u}"), "copy", &format!("{} as {}", c.item, c.label), Vec::new());
                Ok(())
            }
            Step::Give(g) => {
                let path = format!("steps[{i}].give");
                let id = self.record_id(&format!("{path}.record"), &g.record)?;
                let before = self.live_record(&path, id)?;
                let to = self.users[self.user(&format!("{path}.to"), &g.to)?].id;
                self.server.change_owner(id, to).map_err(|e| store_err(&path, e))?;
                let who = self.crm_who(before.owner);
                self.log(&who, "give", &format!("{} to {}", g.record, g.to), Vec::new());
                Ok(())
            }
            Step::Uninvite(g) => {
                let path = format!("steps[{i}].uninvite");
                let id = self.record_id(&format!("{path}.record"), &g.record)?;
                let before = self.live_record(&path, id)?;
                let gone = self.users[self.user(&format!("{path}.user"), &g.user)?].id;
                if !before.attendees.contains(&gone) {
                    return Err(impossible(&path, format!("{} does not attend {}", g.user, g.record)));
                }
                let attendees = before.attendees.iter().copied().filter(|a| *a != gone).collect();
                self.server.set_attendees(id, attendees).map_err(|e| store_err(&path, e))?;
                let who = self.crm_who(before.owner);
                self.log(&who, "uninvite", &format!("{} drops {}", g.record, g.user), Vec::new());
                Ok(())
            }
            Step::Sync(SyncArg(spec)) => self.sync(i, spec),
            Step::SwitchPrimary(name) => {
                let path = format!("steps[{i}].switch_primary");
                let (m, sub) = self.linked(&path, name)?;
                self.server.set_primary_client(sub).map_err(|e| store_err(&path, e))?;
                let label = self.machines[m].label.clone();
                self.log(&label, "make-primary", "ok", Vec::new());
                Ok(())
            }
            Step::Unlink(name) => {
                let path = format!("steps[{i}].unlink");
                let (m, sub) = self.linked(&path, name)?;
                let machine = &mut self.machines[m];
                unlink(&mut self.server, &mut machine.cache, sub).map_err(|e| store_err(&path, e))?;
                machine.subscription = None;
                let label = machine.label.clone();
                self.log(&label, "unlink", "subscription, queue and mapping removed", Vec::new());
                Ok(())
            }
            Step::Link(name) => {
                let path = format!("steps[{i}].link");
                let m = self.machine(&path, name)?;
                if self.machines[m].subscription.is_some() {
                    return Err(impossible(&path, format!("machine {name:?} is linked already")));
                }
                self.register(&path, m)?;
                let primary = self.is_primary(m);
                self.log(name, "link", if primary { "primary" } else { "secondary" }, Vec::new());
                Ok(())
            }
            Step::Reinstall(name) => {
                let path = format!("steps[{i}].reinstall");
                let (m, _) = self.linked(&path, name)?;
                self.machines[m].cache = SyncCache::in_memory().map_err(|e| store_err(&path, e))?;
                self.register(&path, m)?;
                let primary = self.is_primary(m);
                self.log(name, "reinstall", if primary { "primary" } else { "secondary" }, Vec::new());
                Ok(())
            }
            Step::Check(c) => {
                let path = format!("steps[{i}].check");
                let failures = self.check(&path, c)?;
                // A check is not an event of the world (the timeline's world lane draws the
                // liveness phase); a failed one is the verdict's red line.
                if !failures.is_empty() && self.failed_at_step.is_none() {
                    self.failed_at_step = Some(i as u64 + 1);
                }
                self.check_failures.extend(failures);
                Ok(())
            }
        }
    }

    fn is_primary(&self, m: usize) -> bool {
        self.machines[m].subscription.is_some_and(|s| self.server.is_primary_client(s).unwrap_or(false))
    }

    fn linked(&self, path: &str, name: &str) -> Result<(usize, SubscriptionId), ScenarioError> {
        let m = self.machine(path, name)?;
        match self.machines[m].subscription {
            Some(sub) => Ok((m, sub)),
            None => Err(impossible(path, format!("machine {name:?} is unlinked"))),
        }
    }

    fn edit(&mut self, path: &str, e: &EditStep) -> Result<(), ScenarioError> {
        let patch = |fields: &Fields| -> Result<Fields, ScenarioError> {
            let mut map: BTreeMap<String, String> =
                fields.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
            for name in &e.unset {
                map.remove(name);
            }
            map.extend(e.set.clone());
            fields_of(&format!("{path}.set"), &map)
        };
        match e.side {
            SideSpec::Crm => {
                let id = self.target_record(path, e.record.as_deref(), e.item.as_deref())?;
                let before = self.live_record(path, id)?;
                let record = ServerRecord {
                    fields: patch(&before.fields)?,
                    status: e.status.map_or(before.status, status),
                    ..before.clone()
                };
                self.server.put_record(&record).map_err(|err| store_err(path, err))?;
                let who = self.crm_who(before.owner);
                let what = self.edit_text(&self.record_name(id), e);
                self.log(&who, "update", &what, Vec::new());
            }
            SideSpec::Outlook => {
                if e.status.is_some() {
                    return Err(impossible(
                        path,
                        "an Outlook edit cannot change an activity's state here".into(),
                    ));
                }
                let (u, entry) =
                    self.target_item(path, e.record.as_deref(), e.item.as_deref(), e.user.as_deref())?;
                let item = self.users[u].mailbox.get(&entry).map_err(|err| store_err(path, err))?;
                let Some(item) = item else { return Err(impossible(path, "the item is gone".into())) };
                let fields = patch(&item.fields)?;
                self.users[u].mailbox.user_update(&entry, fields).map_err(|err| store_err(path, err))?;
                let what = self.edit_text(&self.item_name(u, &entry), e);
                self.log(&format!("outlook/u{u}"), "update", &what, Vec::new());
            }
        }
        Ok(())
    }

    fn edit_text(&self, name: &str, e: &EditStep) -> String {
        let mut parts = vec![name.to_owned()];
        parts.extend(e.set.iter().map(|(k, v)| format!("{k}={v:?}")));
        parts.extend(e.unset.iter().map(|k| format!("-{k}")));
        if let Some(s) = e.status {
            parts.push(format!("status={}", status_name(status(s))));
        }
        parts.join(" ")
    }

    fn delete(&mut self, path: &str, t: &TargetStep) -> Result<(), ScenarioError> {
        match t.side {
            SideSpec::Crm => {
                let id = self.target_record(path, t.record.as_deref(), t.item.as_deref())?;
                let before = self.live_record(path, id)?;
                self.server.delete_record(id).map_err(|e| store_err(path, e))?;
                let who = self.crm_who(before.owner);
                let name = self.record_name(id);
                self.log(&who, "delete", &name, Vec::new());
            }
            SideSpec::Outlook => {
                let (u, entry) =
                    self.target_item(path, t.record.as_deref(), t.item.as_deref(), t.user.as_deref())?;
                self.users[u].mailbox.user_delete(&entry).map_err(|e| store_err(path, e))?;
                let name = self.item_name(u, &entry);
                self.log(&format!("outlook/u{u}"), "delete", &name, Vec::new());
            }
        }
        Ok(())
    }

    fn create(&mut self, path: &str, c: &CreateStep) -> Result<(), ScenarioError> {
        match c.side {
            SideSpec::Crm => {
                if c.track {
                    return Err(impossible(path, "\"track\" is for Outlook items".into()));
                }
                let record = self.new_record(
                    path,
                    &c.label,
                    c.entity,
                    &c.user,
                    &c.fields,
                    &c.attendees,
                    c.goid.as_deref(),
                    c.status,
                )?;
                self.server.put_record(&record).map_err(|e| store_err(path, e))?;
                let who = self.crm_who(record.owner);
                self.log(&who, "create", &format!("{} {}", c.label, record.object_type), Vec::new());
            }
            SideSpec::Outlook => {
                if !c.attendees.is_empty() {
                    return Err(impossible(path, "attendees are set in CRM".into()));
                }
                self.new_item(
                    path,
                    &c.label,
                    &c.user,
                    c.entity,
                    &c.fields,
                    c.goid.as_deref(),
                    c.status,
                    c.track,
                )?;
                let u = self.user(path, &c.user)?;
                self.log(
                    &format!("outlook/u{u}"),
                    "create",
                    &format!("{} {}", c.label, otc(c.entity)),
                    Vec::new(),
                );
            }
        }
        Ok(())
    }

    fn faults(&self, path: &str, m: usize, spec: &SyncSpec) -> Result<Vec<Fault>, ScenarioError> {
        let mut out = Vec::new();
        for (k, f) in spec.fail.iter().enumerate() {
            let fpath = format!("{path}.fail[{k}]");
            let nth_ok = |n: u32, what: &str| {
                if n == 0 {
                    Err(ScenarioError::Invalid {
                        path: format!("{fpath}.{what}.nth"),
                        value: "0".into(),
                        why: "counts from 1".into(),
                    })
                } else {
                    Ok(n)
                }
            };
            out.push(match f {
                FaultSpec::Crash { after_step, nth } => {
                    Fault::Crash { step: *after_step, nth: nth_ok(*nth, "crash")? }
                }
                FaultSpec::Network { call, lost, nth } => {
                    Fault::Network { call: *call, lost: *lost, nth: nth_ok(*nth, "network")? }
                }
                FaultSpec::Reject { record, call, nth } => Fault::Reject {
                    record: record
                        .as_deref()
                        .map(|r| self.record_id(&format!("{fpath}.reject.record"), r))
                        .transpose()?,
                    call: *call,
                    nth: nth.map(|n| nth_ok(n, "reject")).transpose()?,
                },
                FaultSpec::Lock { item, record } => {
                    let user = self.users[self.machines[m].user].label.clone();
                    let (u, entry) = self.target_item(
                        &format!("{fpath}.lock"),
                        record.as_deref(),
                        item.as_deref(),
                        Some(&user),
                    )?;
                    if u != self.machines[m].user {
                        return Err(impossible(&fpath, format!("the item is not in {user}'s mailbox")));
                    }
                    Fault::Lock { entry }
                }
                FaultSpec::LoseAcknowledge { nth } => {
                    Fault::LoseAcknowledge { nth: nth_ok(*nth, "lose_acknowledge")? }
                }
                FaultSpec::DuplicatePage { nth } => {
                    Fault::DuplicatePage { nth: nth_ok(*nth, "duplicate_page")? }
                }
            });
        }
        Ok(out)
    }

    fn sync(&mut self, i: usize, spec: &SyncSpec) -> Result<(), ScenarioError> {
        let path = format!("steps[{i}].sync");
        let (m, sub) = self.linked(&format!("{path}.machine"), &spec.machine)?;
        for (what, value) in [("page_size", spec.page_size), ("commit_every", spec.commit_every)] {
            if value == Some(0) {
                return Err(ScenarioError::Invalid {
                    path: format!("{path}.{what}"),
                    value: "0".into(),
                    why: "must be at least 1".into(),
                });
            }
        }
        let faults = self.faults(&path, m, spec)?;
        let fault_count = faults.len();
        let desk = Rc::new(RefCell::new(Desk::new(faults)));
        let mut policies = self.policies.clone();
        if spec.confirm_mass_delete {
            policies.mass_delete.confirmed = true;
        }
        let config = EngineConfig {
            policies,
            page_size: spec.page_size.unwrap_or(self.machines[m].page_size),
            commit_every: spec.commit_every.unwrap_or(self.machines[m].commit_every),
            ignore_all_errors: spec.ignore_all_errors,
        };
        let u = self.machines[m].user;
        let machine = &mut self.machines[m];
        let result = {
            let mut server = ScriptServer::new(&mut self.server, desk.clone());
            let mut mailbox = ScriptMailbox { inner: &mut self.users[u].mailbox, locks: desk.clone() };
            let mut observer = ScriptCrash { desk: desk.clone() };
            run_sync(
                Edges {
                    server: &mut server,
                    mailbox: &mut mailbox,
                    cache: &mut machine.cache,
                    ids: &mut machine.ids,
                    observer: &mut observer,
                },
                sub,
                &config,
            )
        };
        let label = machine.label.clone();
        let desk = Rc::try_unwrap(desk).map(RefCell::into_inner).unwrap_or_default();
        let outcome = match &result {
            Ok(report) if !report.primary => "secondary: nothing to do".to_owned(),
            Ok(report) => crate::trace::completed_run_line(report),
            Err(EngineError::Interrupted(step)) => format!("crashed after {step:?}"),
            Err(EngineError::Server(ServerError::Unreachable(why))) => format!("stopped: {why}"),
            Err(other) => format!("stopped: {other}"),
        };
        let notes: Vec<String> = desk.notes.iter().map(|n| self.named(u, n)).collect();
        let outcome = if notes.is_empty() { outcome } else { format!("{outcome} [{}]", notes.join("; ")) };
        for k in 0..fault_count {
            if desk.fired.get(k).copied().unwrap_or(0) == 0 {
                self.unfired.push(format!("{path}.fail[{k}] never fired"));
            }
        }
        let prepared = desk
            .summary
            .as_ref()
            .map(|s| {
                s.iter().map(|(otc, c)| format!("{otc} +{} ~{} -{}", c.create, c.update, c.delete)).collect()
            })
            .unwrap_or_default();
        self.runs.push(RunLog {
            step: i,
            machine: label.clone(),
            outcome: outcome.clone(),
            prepared,
            pages: desk.pages,
            acks: desk.acks,
        });
        let what = if spec.ignore_all_errors { "sync(ignore)" } else { "sync" };
        self.log(&label, what, &outcome, desk.kinds.clone());
        self.learn_names();
        Ok(())
    }

    /// A record created from a labelled item takes the item's label; one re-created for an item
    /// linked before (a new id derived from the old) takes the old record's name with a prime.
    fn learn_names(&mut self) {
        for u in 0..self.users.len() {
            for item in self.items_of(u) {
                let Some(id) = item.stamp() else { continue };
                let key = (u, item.entry_id.clone());
                if !self.record_names.contains_key(&id) {
                    let label = self.item_names.get(&key).filter(|l| !self.records.contains_key(*l)).cloned();
                    let before = self.last_stamps.get(&key).and_then(|old| self.record_names.get(old));
                    let name = label.or_else(|| before.map(|b| format!("{b}'")));
                    if let Some(name) = name.filter(|n| !self.records.contains_key(n)) {
                        self.records.insert(name.clone(), id);
                        self.record_names.insert(id, name);
                    }
                }
                self.last_stamps.insert(key, id);
            }
        }
    }

    fn load(&self, m: usize) -> Result<SyncState, String> {
        self.machines[m]
            .cache
            .load()
            .map_err(|e| format!("the cache of {} does not load: {e}", self.machines[m].label))
    }

    fn items_of(&self, u: usize) -> Vec<MailboxItem> {
        self.users[u].mailbox.all_items().unwrap_or_default()
    }

    /// No two items with one stamp, no two linked items or CRM meetings with one GOID, every
    /// mapping a bijection.
    fn duplicates(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (u, user) in self.users.iter().enumerate() {
            let mut stamps: BTreeMap<CrmId, String> = BTreeMap::new();
            let mut goids: BTreeMap<GlobalObjectId, String> = BTreeMap::new();
            for item in self.items_of(u) {
                let name = self.item_name(u, &item.entry_id);
                let Some(stamp) = item.stamp() else { continue };
                if let Some(other) = stamps.insert(stamp, name.clone()) {
                    out.push(format!(
                        "{}: items {other} and {name} both linked to {}",
                        user.label,
                        self.record_name(stamp)
                    ));
                }
                if let Some(g) = &item.goid {
                    if let Some(other) = goids.insert(g.clone(), name.clone()) {
                        out.push(format!(
                            "{}: linked items {other} and {name} share GOID {}",
                            user.label,
                            self.goid_name(g)
                        ));
                    }
                }
            }
        }
        let mut goids: BTreeMap<GlobalObjectId, String> = BTreeMap::new();
        for r in self.server.all_records().unwrap_or_default() {
            if let Some(g) = &r.goid {
                let name = self.record_name(r.crm_id);
                if let Some(other) = goids.insert(g.clone(), name.clone()) {
                    out.push(format!("CRM records {other} and {name} share GOID {}", self.goid_name(g)));
                }
            }
        }
        for m in 0..self.machines.len() {
            match self.load(m) {
                Ok(state) => {
                    if let Err(e) = state.mapping.check_invariants() {
                        out.push(format!(
                            "the mapping of {} is not a bijection: {e}",
                            self.machines[m].label
                        ));
                    }
                }
                Err(e) => out.push(e),
            }
        }
        out
    }

    fn check(&self, path: &str, c: &CheckSpec) -> Result<Vec<String>, ScenarioError> {
        let mut fail = Vec::new();
        let note = c.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
        for (label, want) in &c.records {
            let rpath = format!("{path}.records.{label}");
            let id = self.record_id(&rpath, label)?;
            let got = self.server.record(id).map_err(|e| store_err(&rpath, e))?;
            if let Some(exists) = want.exists {
                if exists != got.is_some() {
                    fail.push(format!(
                        "{rpath}: record {label} exists is {}, expected {exists}",
                        got.is_some()
                    ));
                }
            }
            if let Some(owner) = &want.owner {
                let o = self.users[self.user(&format!("{rpath}.owner"), owner)?].id;
                if got.as_ref().is_some_and(|r| r.owner != o) {
                    fail.push(format!("{rpath}: record {label} is not owned by {owner}"));
                }
            }
            if let Some(r) = &got {
                expect_fields(&mut fail, &rpath, &format!("record {label}"), &r.fields, &want.fields);
            } else if !want.fields.is_empty() {
                fail.push(format!("{rpath}: record {label} is deleted, its fields cannot be checked"));
            }
        }
        for (k, want) in c.items.iter().enumerate() {
            let ipath = format!("{path}.items[{k}]");
            let (u, entry, name) = match (&want.item, &want.record) {
                (Some(label), None) => {
                    let (u, e) = self.item(&format!("{ipath}.item"), label)?;
                    (u, Some(e), label.clone())
                }
                (None, Some(label)) => {
                    let id = self.record_id(&format!("{ipath}.record"), label)?;
                    let Some(user) = &want.user else {
                        return Err(impossible(&ipath, "an item found by record needs a \"user\"".into()));
                    };
                    let u = self.user(&format!("{ipath}.user"), user)?;
                    let e = self.users[u].mailbox.find_by_stamp(id).map_err(|e| store_err(&ipath, e))?;
                    (u, e, format!("{user}'s item of {label}"))
                }
                _ => return Err(impossible(&ipath, "name exactly one of \"item\" and \"record\"".into())),
            };
            let got = match entry {
                Some(e) => self.users[u].mailbox.get(&e).map_err(|err| store_err(&ipath, err))?,
                None => None,
            };
            if let Some(exists) = want.exists {
                if exists != got.is_some() {
                    fail.push(format!("{ipath}: {name} exists is {}, expected {exists}", got.is_some()));
                }
            }
            match &got {
                Some(item) => {
                    if let Some(linked) = want.linked {
                        if linked != item.stamp().is_some() {
                            fail.push(format!("{ipath}: {name} linked is {}, expected {linked}", !linked));
                        }
                    }
                    expect_fields(&mut fail, &ipath, &name, &item.fields, &want.fields);
                }
                None if !want.fields.is_empty() || want.linked.is_some() => {
                    fail.push(format!("{ipath}: {name} does not exist"));
                }
                None => {}
            }
        }
        if let Some(counts) = &c.counts {
            self.check_counts(path, counts, &mut fail)?;
        }
        if c.no_duplicates {
            fail.extend(self.duplicates().into_iter().map(|d| format!("{path}.no_duplicates: {d}")));
        }
        for (k, name) in c.queue_empty.iter().enumerate() {
            let m = self.machine(&format!("{path}.queue_empty[{k}]"), name)?;
            let state = self.load(m).map_err(|e| store_err(path, e))?;
            if !state.queue.is_empty() {
                fail.push(format!(
                    "{path}.queue_empty[{k}]: {name} holds {} queued change(s)",
                    state.queue.len()
                ));
            }
        }
        Ok(fail.into_iter().map(|f| format!("{f}{note}")).collect())
    }

    fn check_counts(
        &self,
        path: &str,
        c: &CountsExpect,
        fail: &mut Vec<String>,
    ) -> Result<(), ScenarioError> {
        let path = format!("{path}.counts");
        let mut expect = |what: String, got: usize, want: usize| {
            if got != want {
                fail.push(format!("{path}.{what} is {got}, expected {want}"));
            }
        };
        if let Some(want) = c.records {
            expect("records".into(), self.server.record_ids().map_err(|e| store_err(&path, e))?.len(), want);
        }
        for (user, want) in &c.items {
            let u = self.user(&format!("{path}.items.{user}"), user)?;
            expect(format!("items.{user}"), self.items_of(u).len(), *want);
        }
        for (what, map) in [("mapping", &c.mapping), ("queue", &c.queue), ("ignored", &c.ignored)] {
            for (name, want) in map {
                let m = self.machine(&format!("{path}.{what}.{name}"), name)?;
                let state = self.load(m).map_err(|e| store_err(&path, e))?;
                let got = match what {
                    "mapping" => state.mapping.len(),
                    "queue" => state.queue.len(),
                    _ => state.ignored.len(),
                };
                expect(format!("{what}.{name}"), got, *want);
            }
        }
        if let Some(want) = c.subscriptions {
            expect("subscriptions".into(), self.live_subscriptions().len(), want);
        }
        if let Some(want) = c.duplicate_subscriptions {
            expect("duplicate_subscriptions".into(), self.duplicate_subscriptions(&path)?.len(), want);
        }
        Ok(())
    }

    fn live_subscriptions(&self) -> Vec<(SubscriptionId, usize, bool)> {
        self.subscriptions
            .iter()
            .filter_map(|&(s, m)| self.server.is_primary_client(s).ok().map(|p| (s, m, p)))
            .collect()
    }

    fn duplicate_subscriptions(&self, path: &str) -> Result<Vec<String>, ScenarioError> {
        let orphans = crmsync::reports::orphans(&self.server).map_err(|e| store_err(path, e))?;
        Ok(orphans
            .duplicates
            .iter()
            .map(|d| {
                let user = d.full_name.clone().unwrap_or_else(|| d.user.to_string());
                format!(
                    "{user} on {}: {} {} subscriptions",
                    d.machine,
                    d.subscriptions.len(),
                    d.subscription_type.name()
                )
            })
            .collect())
    }

    fn final_state(&mut self) -> Result<FinalState, ScenarioError> {
        let path = "(final state)";
        let users_by_id: BTreeMap<SystemUserId, String> =
            self.users.iter().map(|u| (u.id, u.label.clone())).collect();
        let who = |id: &SystemUserId| users_by_id.get(id).cloned().unwrap_or_else(|| id.to_string());
        let all = self.server.all_records().map_err(|e| store_err(path, e))?;
        let mut records: Vec<RecordState> = all
            .iter()
            .map(|r| RecordState {
                label: self.record_name(r.crm_id),
                entity: r.object_type.to_string(),
                owner: who(&r.owner),
                version: r.version.0,
                status: status_name(r.status),
                goid: r.goid.as_ref().map(|g| self.goid_name(g)),
                attendees: r.attendees.iter().map(who).collect::<BTreeSet<_>>().into_iter().collect(),
                fields: r.fields.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
            })
            .collect();
        records.sort_by(|a, b| a.label.cmp(&b.label));
        let live: BTreeSet<CrmId> = all.iter().map(|r| r.crm_id).collect();
        let deleted_records: Vec<String> =
            self.records.iter().filter(|(_, id)| !live.contains(id)).map(|(l, _)| l.clone()).collect();
        let mut mailboxes = Vec::new();
        for (u, user) in self.users.iter().enumerate() {
            let mut items: Vec<ItemState> = self
                .items_of(u)
                .iter()
                .map(|i| ItemState {
                    item: self.item_name(u, &i.entry_id),
                    entity: i.object_type.to_string(),
                    tracking: match i.tracking {
                        Tracking::Untracked => "untracked".into(),
                        Tracking::Pending => "pending".into(),
                        Tracking::Stamped(id) => format!("linked {}", self.record_name(id)),
                    },
                    goid: i.goid.as_ref().map(|g| self.goid_name(g)),
                    status: status_name(i.status),
                    fields: i.fields.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
                })
                .collect();
            items.sort_by(|a, b| a.item.cmp(&b.item));
            mailboxes.push(MailboxState { user: user.label.clone(), items });
        }
        let mut machines = Vec::new();
        let mut bijection = Vec::new();
        let mut queue_empty = Vec::new();
        let mut converged = Vec::new();
        let records_by_id: BTreeMap<CrmId, &ServerRecord> = all.iter().map(|r| (r.crm_id, r)).collect();
        for (m, machine) in self.machines.iter().enumerate() {
            let state = self.load(m).map_err(|e| store_err(path, e))?;
            let u = machine.user;
            let primary = self.is_primary(m);
            let mut mapping: Vec<PairState> = state
                .mapping
                .entries()
                .iter()
                .map(|p| PairState {
                    record: self.record_name(p.crm_id),
                    item: self.item_name(u, &p.entry_id),
                    entity: p.object_type.to_string(),
                    role: format!("{:?}", p.role).to_lowercase(),
                    crm_version: p.crm_version.map(|v| v.0),
                })
                .collect();
            mapping.sort_by(|a, b| (&a.record, &a.item).cmp(&(&b.record, &b.item)));
            let line = |e: &crmsync::queue::QueueEntry, error: Option<String>| QueueLine {
                key: match e.change.key() {
                    RecordKey::Crm(id) => format!("crm:{}", self.record_name(*id)),
                    RecordKey::Outlook(entry) => format!("outlook:{}", self.item_name(u, entry)),
                },
                kind: match e.change.kind() {
                    ChangeKind::Create => "create".into(),
                    ChangeKind::Update => "update".into(),
                    ChangeKind::Delete => "delete".into(),
                },
                entity: e.change.object_type().to_string(),
                attempts: e.attempts,
                error,
            };
            let mut queue: Vec<QueueLine> =
                state.queue.entries().iter().map(|e| line(e, e.last_error.clone())).collect();
            queue.sort_by(|a, b| (&a.key, &a.kind).cmp(&(&b.key, &b.kind)));
            let mut ignored: Vec<QueueLine> =
                state.ignored.iter().map(|i| line(&i.entry, Some(i.error.clone()))).collect();
            ignored.sort_by(|a, b| (&a.key, &a.kind).cmp(&(&b.key, &b.kind)));
            if let Err(e) = state.mapping.check_invariants() {
                bijection.push(format!("{}: {e}", machine.label));
            }
            if primary {
                if !state.queue.is_empty() {
                    queue_empty.push(format!(
                        "{} holds {} queued change(s)",
                        machine.label,
                        state.queue.len()
                    ));
                }
                for p in state.mapping.entries() {
                    let name = self.record_name(p.crm_id);
                    let item = self.users[u].mailbox.get(&p.entry_id).ok().flatten();
                    let Some(item) = item.filter(|i| i.stamp() == Some(p.crm_id)) else {
                        bijection
                            .push(format!("{}: pair {name} names an item not linked to it", machine.label));
                        continue;
                    };
                    let Some(record) = records_by_id.get(&p.crm_id) else {
                        bijection.push(format!("{}: pair {name} names a deleted record", machine.label));
                        continue;
                    };
                    let names: BTreeSet<&str> =
                        record.fields.iter().chain(item.fields.iter()).map(|(k, _)| k).collect();
                    for f in names {
                        let dir = self.policies.field_directions.get(p.object_type, f);
                        if dir != FieldSyncDirection::None && record.fields.get(f) != item.fields.get(f) {
                            converged.push(format!(
                                "{}: {name}.{f} is {:?} in CRM and {:?} in Outlook",
                                machine.label,
                                record.fields.get(f),
                                item.fields.get(f)
                            ));
                        }
                    }
                }
            }
            machines.push(MachineState {
                machine: machine.label.clone(),
                user: self.users[u].label.clone(),
                linked: machine.subscription.is_some(),
                primary,
                mapping,
                queue,
                ignored,
            });
        }
        let mut subscriptions: Vec<SubscriptionState> = self
            .live_subscriptions()
            .into_iter()
            .map(|(_, m, primary)| SubscriptionState {
                user: self.users[self.machines[m].user].label.clone(),
                machine: self.machines[m].label.clone(),
                kind: SubscriptionType::Outlook.name().to_owned(),
                primary,
            })
            .collect();
        subscriptions
            .sort_by(|a, b| (&a.user, &a.machine, !a.primary).cmp(&(&b.user, &b.machine, !b.primary)));
        let duplicate_subscriptions = self.duplicate_subscriptions(path)?;
        let verdicts = vec![
            VerdictLine::of("no duplicates (stamps, GOIDs, CRM meetings)", self.duplicates()),
            VerdictLine::of("mapping is a bijection of real links", bijection),
            VerdictLine::of("primary queues empty", queue_empty),
            VerdictLine::of("linked pairs converged", converged),
            VerdictLine::of("every scripted fault fired", self.unfired.clone()),
            VerdictLine::of("checks", self.check_failures.clone()),
        ];
        Ok(FinalState {
            records,
            deleted_records,
            mailboxes,
            machines,
            subscriptions,
            duplicate_subscriptions,
            runs: self.runs.clone(),
            verdicts,
        })
    }
}

fn expect_fields(
    fail: &mut Vec<String>,
    path: &str,
    name: &str,
    got: &Fields,
    want: &BTreeMap<String, Option<String>>,
) {
    for (field, value) in want {
        let have = got.get(field);
        if have != value.as_deref() {
            fail.push(format!("{path}: {name}.{field} is {have:?}, expected {value:?}"));
        }
    }
}
