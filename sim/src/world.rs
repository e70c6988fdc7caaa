//! The world: one CRM server (the real `ServerStore`, in memory), users with their mailboxes
//! (the real `MemoryMailbox`), client machines with their caches (the real `SyncCache`, in
//! memory), actors editing both sides, and sync runs of the real engine, all on one virtual
//! clock and driven by one seed.
//!
//! A user's machines share the user's mailbox, as Outlook machines share the user's Exchange
//! mailbox; each machine has its own cache and subscription, and only the primary one syncs.
//! That is what makes a switch of primary machine, or an unlink and relink, meet the items an
//! earlier machine made: the duplicate stories the seed's readers tell.
//!
//! One step is one event: an edit, a sync run (whole: edits never interleave with a run), a
//! switch of primary, an unlink and relink. After each sync run the safety checks run; after
//! the last event the faults and edits stop and the liveness phase runs the primaries until
//! nothing changes, then checks convergence against the reference model.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use crmsync::cache::SyncCache;
use crmsync::clock::{Clock, ManualClock};
use crmsync::engine::{Edges, EngineConfig, EngineError, SeededIds, run_sync, unlink};
use crmsync::fields::{FieldPatch, Fields};
use crmsync::ids::{CrmId, EntryId, GlobalObjectId};
use crmsync::mailbox::{Mailbox, MailboxItem, MemoryMailbox, UserEdits};
use crmsync::policy::{FieldConflictPolicy, MassDeleteGuard, Policies};
use crmsync::server::{
    CrmService, ServerError, ServerRecord, ServerStore, SubscriptionId, SubscriptionType, SystemUserId,
};
use crmsync::{ActivityStatus, ObjectTypeCode};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::check::{self, Violation};
use crate::edge::{CrashPoint, Desk, FaultDesk, MachineClock, SimMailbox, SimServer};
use crate::fault::{FaultCounts, FaultKind, Faults, Swarm};
use crate::mirror::{Live, Mirror};
use crate::model::{Handle, Model, Place};
use crate::rng::Rng;
use crate::trace::Timeline;

/// Seconds between the sync runs of one machine (DOMAIN: `SyncInterval`, 15 minutes).
pub const SYNC_INTERVAL_S: i64 = 15 * 60;
/// Most liveness rounds (every primary runs once per round) before "does not converge".
pub const LIVENESS_ROUNDS_MAX: usize = 8;
/// Limits of a world (TigerBeetle style: everything has a bound).
pub const USERS_MAX: usize = 64;
pub const MACHINES_PER_USER_MAX: usize = 3;
pub const RECORDS_MAX: usize = 100_000;
pub const RUNS_PER_MACHINE_MAX: usize = 1_000;

/// The shape of a world.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorldConfig {
    pub users: usize,
    /// Client machines in all; each user has one to three.
    pub machines: usize,
    /// Records in CRM at the start.
    pub records: usize,
    /// Scheduled sync runs per machine.
    pub runs_per_machine: usize,
    /// Edits per user per sync interval.
    pub edits_per_interval: usize,
    /// The field conflict policy (the rest are DOMAIN's defaults; the mass-delete guard is
    /// confirmed, since the actors delete on purpose).
    pub field_conflict: FieldConflictPolicy,
    /// Which faults are on.
    pub faults: FaultChoice,
}

/// Which faults a world turns on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultChoice {
    /// Each seed draws its own swarm.
    Swarm,
    /// These kinds, at the middle of their ranges.
    Only(Vec<FaultKind>),
}

impl FaultChoice {
    /// `swarm`, `none`, `all`, or kinds by name separated by commas.
    pub fn parse(text: &str) -> Result<FaultChoice, String> {
        match text {
            "swarm" => Ok(FaultChoice::Swarm),
            "none" => Ok(FaultChoice::Only(Vec::new())),
            "all" => Ok(FaultChoice::Only(FaultKind::ALL.to_vec())),
            list => list
                .split(',')
                .map(|name| {
                    FaultKind::ALL.iter().copied().find(|k| k.name() == name.trim()).ok_or_else(|| {
                        format!(
                            "no fault kind {name:?} (known: {})",
                            FaultKind::ALL.map(|k| k.name()).join(", ")
                        )
                    })
                })
                .collect::<Result<_, _>>()
                .map(FaultChoice::Only),
        }
    }

    pub fn swarm(&self, seed: u64) -> Swarm {
        match self {
            FaultChoice::Swarm => Swarm::draw(seed),
            FaultChoice::Only(kinds) => {
                let all = Swarm::all();
                Swarm { rates: all.rates.into_iter().filter(|(k, _)| kinds.contains(k)).collect() }
            }
        }
    }
}

impl Default for WorldConfig {
    fn default() -> Self {
        WorldConfig {
            users: 5,
            machines: 10,
            records: 500,
            runs_per_machine: 20,
            edits_per_interval: 2,
            field_conflict: FieldConflictPolicy::CrmWins,
            faults: FaultChoice::Swarm,
        }
    }
}

/// Why a world could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    #[error("{what} = {value} is outside {range}")]
    Limit { what: &'static str, value: usize, range: String },
    #[error("server: {0}")]
    Server(#[from] ServerError),
    #[error("cache: {0}")]
    Cache(#[from] crmsync::cache::CacheError),
    #[error("mailbox: {0}")]
    Mailbox(#[from] crmsync::mailbox::MailboxError),
    #[error("fields: {0}")]
    Fields(#[from] crmsync::fields::FieldsError),
}

impl WorldConfig {
    pub fn check(&self) -> Result<(), WorldError> {
        let limit = |what, value: usize, lo: usize, hi: usize| {
            if (lo..=hi).contains(&value) {
                Ok(())
            } else {
                Err(WorldError::Limit { what, value, range: format!("{lo}..={hi}") })
            }
        };
        limit("users", self.users, 1, USERS_MAX)?;
        limit("machines", self.machines, self.users, self.users * MACHINES_PER_USER_MAX)?;
        limit("records", self.records, 0, RECORDS_MAX)?;
        limit("runs_per_machine", self.runs_per_machine, 0, RUNS_PER_MACHINE_MAX)?;
        limit("edits_per_interval", self.edits_per_interval, 0, 100)?;
        Ok(())
    }
}

struct User {
    id: SystemUserId,
    mailbox: MemoryMailbox,
    machines: Vec<usize>,
    /// The machine the user last made primary (the server is the authority; this is a cache).
    primary: usize,
}

struct Machine {
    name: String,
    user: usize,
    cache: SyncCache,
    subscription: SubscriptionId,
    ids: SeededIds,
    skew_s: i64,
    page_size: usize,
    commit_every: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Sync(usize),
    Edit(usize),
    /// A chance for a user to switch primary machine or to unlink and relink one.
    Chance(usize),
}

/// One line of the trace per event: time, who, what, outcome.
#[derive(Debug, Default)]
pub struct Trace {
    pub lines: Option<Vec<String>>,
    hash: u64,
    pub events: u64,
    /// The lines as data (`trace::TraceEvent`), kept when the lines are.
    pub timeline: Option<Timeline>,
}

impl Trace {
    fn new(keep: bool) -> Trace {
        Trace {
            lines: keep.then(Vec::new),
            hash: 0xcbf2_9ce4_8422_2325,
            events: 0,
            timeline: keep.then(Timeline::default),
        }
    }

    fn push(&mut self, line: String) {
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            self.hash = (self.hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        if let Some(lines) = &mut self.lines {
            lines.push(line);
        }
    }

    /// FNV-1a of every line: equal hashes, equal traces (as far as a test needs).
    pub fn hash(&self) -> u64 {
        self.hash
    }
}

/// What one seed did.
#[derive(Debug)]
pub struct Outcome {
    pub seed: u64,
    pub swarm: Swarm,
    pub faults: FaultCounts,
    pub trace: Trace,
    /// Sync runs that did work (primary runs), the liveness phase included.
    pub sync_runs: u64,
    pub violation: Option<Violation>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.violation.is_none()
    }
}

const FIELDS_CONTACT: [&str; 3] = ["fullname", "emailaddress1", "telephone1"];
const FIELDS_TASK: [&str; 3] = ["subject", "description", "prioritycode"];
const FIELDS_APPOINTMENT: [&str; 3] = ["subject", "location", "description"];

fn field_names(otc: ObjectTypeCode) -> &'static [&'static str; 3] {
    match otc {
        ObjectTypeCode::Contact => &FIELDS_CONTACT,
        ObjectTypeCode::Appointment => &FIELDS_APPOINTMENT,
        _ => &FIELDS_TASK,
    }
}

pub struct World {
    pub seed: u64,
    config: WorldConfig,
    policies: Policies,
    clock: Rc<ManualClock>,
    start: DateTime<Utc>,
    skew_s: Rc<Cell<i64>>,
    server: ServerStore,
    /// The server's records as last read (the checks read them after every run).
    mirror: Mirror,
    users: Vec<User>,
    machines: Vec<Machine>,
    desk: Desk,
    model: Model,
    edits: Rng,
    chances: Rng,
    schedule: Vec<(i64, Event)>,
    pub trace: Trace,
    at: u64,
    sync_runs: u64,
    goids: u64,
}

impl World {
    /// Builds the world of `seed`: users, machines, the first records and items.
    pub fn new(seed: u64, config: WorldConfig, swarm: Swarm, keep_trace: bool) -> Result<World, WorldError> {
        config.check()?;
        let start = Utc.with_ymd_and_hms(2026, 1, 5, 8, 0, 0).single().expect("a valid date");
        let clock = Rc::new(ManualClock::new(start));
        let skew_s = Rc::new(Cell::new(0));
        let server = ServerStore::in_memory(Box::new(clock.clone())).map_err(ServerError::from)?;
        let policies = Policies {
            field_conflict: config.field_conflict,
            mass_delete: MassDeleteGuard { confirmed: true, ..MassDeleteGuard::default() },
            ..Policies::default()
        };
        let mut world = World {
            seed,
            config: config.clone(),
            policies,
            clock,
            start,
            skew_s,
            server,
            mirror: Mirror::default(),
            users: Vec::new(),
            machines: Vec::new(),
            desk: Rc::new(RefCell::new(FaultDesk {
                faults: Faults::new(seed, swarm),
                notes: Vec::new(),
                old_pages: BTreeMap::new(),
            })),
            model: Model::default(),
            edits: Rng::derive(seed, "edits"),
            chances: Rng::derive(seed, "chances"),
            schedule: Vec::new(),
            trace: Trace::new(keep_trace),
            at: 0,
            sync_runs: 0,
            goids: 0,
        };
        world.make_users_and_machines()?;
        world.make_records()?;
        world.make_schedule();
        Ok(world)
    }

    fn uuid(&self, what: &str, n: usize) -> Uuid {
        Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("crmsync-sim/{}/{what}/{n}", self.seed).as_bytes())
    }

    fn make_users_and_machines(&mut self) -> Result<(), WorldError> {
        let mut rng = Rng::derive(self.seed, "machines");
        let n = self.config.users;
        // Every user one machine, the rest spread with at most three each.
        let mut per_user = vec![1usize; n];
        let mut left = self.config.machines - n;
        while left > 0 {
            let u = rng.below(n as u64) as usize;
            if per_user[u] < MACHINES_PER_USER_MAX {
                per_user[u] += 1;
                left -= 1;
            }
        }
        for (u, &count) in per_user.iter().enumerate() {
            let id = SystemUserId::new(self.uuid("user", u)).expect("a v5 id is never nil");
            self.server.add_user(id, &format!("User {u}"))?;
            let clock = MachineClock { world: self.clock.clone(), skew_s: self.skew_s.clone() };
            let mailbox = MemoryMailbox::new(&format!("{:X}", u + 1), Box::new(clock))?;
            self.users.push(User { id, mailbox, machines: Vec::new(), primary: self.machines.len() });
            for k in 0..count {
                let m = self.machines.len();
                let name = format!("U{u}-PC{k}");
                let subscription = self.server.register_client(id, &name, SubscriptionType::Outlook)?;
                let mut cache = SyncCache::in_memory().map_err(crmsync::cache::CacheError::from)?;
                // The checks load the cache after every run and the engine again at the next.
                cache.reuse_loads(true);
                let page_size = *rng.pick(&[7usize, 50, 1000]).expect("not empty");
                let commit_every = *rng.pick(&[1usize, 10, 100]).expect("not empty");
                let ids = SeededIds::new(Rng::derive(self.seed, &format!("ids/{m}")).next_u64());
                self.machines.push(Machine {
                    name,
                    user: u,
                    cache,
                    subscription,
                    ids,
                    skew_s: 0,
                    page_size,
                    commit_every,
                });
                self.users[u].machines.push(m);
            }
        }
        Ok(())
    }

    fn new_goid(&mut self) -> GlobalObjectId {
        self.goids += 1;
        let mut bytes = self.seed.to_be_bytes().to_vec();
        bytes.extend_from_slice(&self.goids.to_be_bytes());
        GlobalObjectId::new(bytes).expect("sixteen bytes are a valid GOID")
    }

    fn pick_type(rng: &mut Rng) -> ObjectTypeCode {
        match rng.below(100) {
            0..40 => ObjectTypeCode::Contact,
            40..65 => ObjectTypeCode::Task,
            _ => ObjectTypeCode::Appointment,
        }
    }

    /// A record made in CRM by `owner`: fields with fresh values (each an edit at the server),
    /// and for a meeting its attendees, each of whom gets a copy from Exchange (untracked).
    fn new_server_record(
        &mut self,
        n: usize,
        owner: usize,
        otc: ObjectTypeCode,
        attendees: Vec<usize>,
    ) -> Result<ServerRecord, WorldError> {
        let crm_id = CrmId::new(self.uuid("record", n)).expect("a v5 id is never nil");
        let h = self.model.new_crm_record(crm_id);
        let mut pairs = Vec::new();
        for f in field_names(otc) {
            let v = self.model.fresh_value(f);
            self.model.edit(h, Place::Crm, f, v.clone(), self.at);
            pairs.push((*f, v));
        }
        let fields = Fields::try_from_pairs(pairs)?;
        let goid = (otc == ObjectTypeCode::Appointment).then(|| self.new_goid());
        for &a in &attendees {
            self.users[a].mailbox.user_create(otc, fields.clone(), goid.clone(), ActivityStatus::Open)?;
        }
        Ok(ServerRecord {
            crm_id,
            object_type: otc,
            owner: self.users[owner].id,
            version: crmsync::ids::VersionNumber(1),
            fields,
            goid,
            status: ActivityStatus::Open,
            attendees: attendees.iter().map(|&a| self.users[a].id).collect(),
        })
    }

    fn pick_attendees(&mut self, rng_label: &str, owner: usize) -> Vec<usize> {
        let mut rng = Rng::derive(self.seed ^ self.at, rng_label);
        let mut out = Vec::new();
        for _ in 0..rng.below(3) {
            let a = rng.below(self.users.len() as u64) as usize;
            if a != owner && !out.contains(&a) {
                out.push(a);
            }
        }
        out.sort_unstable();
        out
    }

    fn make_records(&mut self) -> Result<(), WorldError> {
        let mut rng = Rng::derive(self.seed, "records");
        let mut records = Vec::with_capacity(self.config.records);
        for n in 0..self.config.records {
            let owner = n % self.users.len();
            let otc = Self::pick_type(&mut rng);
            let attendees = if otc == ObjectTypeCode::Appointment {
                self.pick_attendees(&format!("attendees/{n}"), owner)
            } else {
                Vec::new()
            };
            records.push(self.new_server_record(n, owner, otc, attendees)?);
        }
        self.server.put_records(&records)?;
        // A few items each user made and tracked in Outlook before the first sync.
        for u in 0..self.users.len() {
            for _ in 0..self.config.records / (self.users.len() * 10) {
                let otc = Self::pick_type(&mut rng);
                self.outlook_create(u, otc)?;
            }
        }
        Ok(())
    }

    fn make_schedule(&mut self) {
        let mut rng = Rng::derive(self.seed, "schedule");
        let intervals = self.config.runs_per_machine as i64;
        for i in 0..intervals {
            let t0 = i * SYNC_INTERVAL_S;
            for m in 0..self.machines.len() {
                self.schedule.push((t0 + rng.below(600) as i64, Event::Sync(m)));
            }
            for u in 0..self.users.len() {
                for _ in 0..self.config.edits_per_interval {
                    self.schedule.push((t0 + rng.below(SYNC_INTERVAL_S as u64) as i64, Event::Edit(u)));
                }
                self.schedule.push((t0 + rng.below(SYNC_INTERVAL_S as u64) as i64, Event::Chance(u)));
            }
        }
        // Ties keep the order they were drawn in (a stable sort), so the schedule is a function
        // of the seed alone.
        self.schedule.sort_by_key(|(t, _)| *t);
    }

    fn time(&self) -> String {
        let s = (self.clock.now() - self.start).num_seconds();
        format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
    }

    fn log(&mut self, who: &str, what: &str, outcome: &str) {
        self.trace.events += 1;
        let line = format!("{} {:<8} {:<14} {}", self.time(), who, what, outcome);
        if let Some(timeline) = &mut self.trace.timeline {
            let at_s = (self.clock.now() - self.start).num_seconds();
            timeline.record(self.at, at_s, (who, what, outcome), &self.desk.borrow().faults.counts, &line);
        }
        self.trace.push(line);
    }

    /// Runs the schedule, then the liveness phase; stops at the first violation.
    pub fn run(mut self) -> Outcome {
        let violation = self.run_inner().err();
        if let Some(v) = &violation {
            let line = format!("VIOLATION at event {}: {}", v.at, v.what);
            self.trace.push(line);
        }
        let desk = self.desk.borrow();
        Outcome {
            seed: self.seed,
            swarm: desk.faults.swarm().clone(),
            faults: desk.faults.counts.clone(),
            sync_runs: self.sync_runs,
            trace: std::mem::take(&mut self.trace),
            violation,
        }
    }

    fn run_inner(&mut self) -> Result<(), Violation> {
        let schedule = std::mem::take(&mut self.schedule);
        for (t, event) in schedule {
            self.at += 1;
            self.clock.set(self.start + Duration::seconds(t));
            match event {
                Event::Sync(m) => {
                    self.sync(m)?;
                }
                Event::Edit(u) => self.edit(u).map_err(|e| self.violation(format!("edit failed: {e}")))?,
                Event::Chance(u) => self.chance(u)?,
            }
        }
        self.liveness()
    }

    pub(crate) fn violation(&self, what: String) -> Violation {
        Violation { at: self.at, what }
    }

    /// One scheduled sync run of machine `m`, then the safety checks. Returns whether the run
    /// saw any change (liveness uses it).
    fn sync(&mut self, m: usize) -> Result<bool, Violation> {
        let skew = self.desk.borrow_mut().faults.fire(FaultKind::ClockSkew);
        if skew {
            let minutes = self.desk.borrow_mut().faults.draw(FaultKind::ClockSkew, 1, 240) as i64;
            let sign = if minutes % 2 == 0 { 1 } else { -1 };
            self.machines[m].skew_s = sign * minutes * 60;
        }
        let ignore = self.desk.borrow_mut().faults.fire(FaultKind::IgnoreAllErrors);
        let u = self.machines[m].user;
        self.skew_s.set(self.machines[m].skew_s);
        self.desk.borrow_mut().notes.clear();
        let config = EngineConfig {
            policies: self.policies.clone(),
            page_size: self.machines[m].page_size,
            commit_every: self.machines[m].commit_every,
            ignore_all_errors: ignore,
        };
        let machine = &mut self.machines[m];
        let user = &mut self.users[u];
        let mut server = SimServer::new(&mut self.server, self.desk.clone());
        let mut mailbox = SimMailbox { inner: &mut user.mailbox, locks: self.desk.clone() };
        let mut observer = CrashPoint { desk: self.desk.clone(), steps: 0, crashed_at: None };
        let result = run_sync(
            Edges {
                server: &mut server,
                mailbox: &mut mailbox,
                cache: &mut machine.cache,
                ids: &mut machine.ids,
                observer: &mut observer,
            },
            machine.subscription,
            &config,
        );
        let who = machine.name.clone();
        let notes = std::mem::take(&mut self.desk.borrow_mut().notes);
        let mut changed = false;
        let outcome = match &result {
            Ok(report) if !report.primary => "secondary: nothing to do".to_owned(),
            Ok(report) => {
                self.sync_runs += 1;
                changed = report.server_changes + report.mailbox_changes > 0;
                crate::trace::completed_run_line(report)
            }
            Err(EngineError::Interrupted(step)) => {
                self.sync_runs += 1;
                changed = true;
                format!("crashed after {step:?}")
            }
            Err(EngineError::Server(ServerError::Unreachable(why))) => {
                self.sync_runs += 1;
                changed = true;
                format!("stopped: {why}")
            }
            Err(other) => {
                let what = format!("sync run of {who} failed: {other}");
                return Err(self.violation(what));
            }
        };
        let outcome = if notes.is_empty() { outcome } else { format!("{outcome} [{}]", notes.join("; ")) };
        let what = if ignore { "sync(ignore)" } else { "sync" };
        self.log(&who, what, &outcome);
        self.watch(m);
        if matches!(&result, Ok(report) if !report.primary) {
            // A secondary run reads and writes nothing: nothing to observe or check.
            return Ok(false);
        }
        let items = self.users[u].mailbox.all_items().map_err(|e| self.violation(format!("mailbox: {e}")))?;
        let records = self.records_in_filter(u).map_err(|e| self.violation(format!("server: {e}")))?;
        self.observe(u, &items, &records);
        check::after_run(self, m, result.is_ok(), &items, &records)?;
        Ok(changed)
    }

    /// With `CRMSYNC_SIM_WATCH=<CrmId>`, traces what machine `m` holds of that record after each
    /// of its runs (queue entries, mapping, item): why did it (not) sync?
    /// `CRMSYNC_SIM_WATCH` may also name an item (`EntryId`): its stamp is followed.
    fn watch(&mut self, m: usize) {
        let Ok(text) = std::env::var("CRMSYNC_SIM_WATCH") else { return };
        let u = self.machines[m].user;
        let id = match text.parse::<CrmId>() {
            Ok(id) => id,
            Err(_) => {
                let Ok(entry_id) = EntryId::new(text) else { return };
                let Ok(Some(item)) = self.users[u].mailbox.get(&entry_id) else { return };
                let Some(id) = item.stamp() else { return };
                id
            }
        };
        let Ok(state) = self.machines[m].cache.load() else { return };
        let mut seen = Vec::new();
        for e in state.queue.entries() {
            let hit = match e.change.key() {
                crmsync::RecordKey::Crm(c) => *c == id,
                crmsync::RecordKey::Outlook(_) => e.change.record().and_then(|r| r.crm_id) == Some(id),
            };
            if hit {
                let error = match &e.last_error {
                    Some(error) => format!(" ({} tries, last: {error})", e.attempts),
                    None => String::new(),
                };
                seen.push(format!(
                    "queued {:?} {:?} {:?}{error}",
                    e.change.key(),
                    e.change.kind(),
                    e.change.stamp()
                ));
            }
        }
        if let Some(entry) = state.mapping.get(id) {
            seen.push(format!("mapped to {} v{:?} base {:?}", entry.entry_id, entry.crm_version, entry.base));
        }
        if let Ok(Some(e)) = self.users[u].mailbox.find_by_stamp(id) {
            match self.users[u].mailbox.get(&e) {
                Ok(Some(item)) => {
                    let synced = item.synced.as_ref().map(|b| (b.crm_version, &b.fields));
                    seen.push(format!("item {e} stamped {:?} synced {synced:?}", item.fields));
                }
                _ => seen.push(format!("item {e} stamped")),
            }
        }
        if let Ok(Some(r)) = self.server.record(id) {
            seen.push(format!("server v{} {:?}", r.version.0, r.fields));
        }
        let name = self.machines[m].name.clone();
        self.log(&name, "watch", &format!("{id}: {}", seen.join("; ")));
    }

    /// Learns links from stamps and records where edits' values have arrived.
    fn observe(&mut self, u: usize, items: &[MailboxItem], records: &[Rc<ServerRecord>]) {
        let at = self.at;
        for item in items {
            if let Some(stamp) = item.stamp() {
                self.model.learn_link(u, &item.entry_id, stamp);
            }
        }
        for r in records {
            if let Some(h) = self.model.handle_of_crm_id(r.crm_id) {
                self.model.handles[h].seen_in_crm = true;
                self.model.observe_all(h, Place::Crm, &r.fields, at);
            }
        }
        for item in items {
            let h = match item.stamp() {
                Some(stamp) => self.model.handle_of_crm_id(stamp),
                None => self.model.handle_of_item(u, &item.entry_id),
            };
            if let Some(h) = h {
                self.model.observe_all(h, Place::Outlook(u), &item.fields, at);
            }
        }
    }

    /// An actor's edit: in CRM or in Outlook, for user `u`.
    fn edit(&mut self, u: usize) -> Result<(), WorldError> {
        if self.edits.chance(500) { self.crm_edit(u) } else { self.outlook_edit(u) }
    }

    fn crm_edit(&mut self, u: usize) -> Result<(), WorldError> {
        let who = format!("crm/u{u}");
        let user = self.users[u].id;
        let records = self.mirror.owned_by(&self.server, user)?;
        let roll = self.edits.below(100);
        let Some(record) = self.edits.pick(&records).cloned() else {
            return self.crm_create(u, &who);
        };
        let h = self.model.handle_of_crm_id(record.crm_id);
        match (roll, h) {
            (60..70, _) | (_, None) => self.crm_create(u, &who),
            (0..60, Some(h)) => {
                let f = *self.edits.pick(field_names(record.object_type)).expect("three fields");
                let v = self.model.fresh_value(f);
                let patch = FieldPatch::between(
                    &record.fields,
                    &Fields::try_from_pairs(
                        record.fields.iter().map(|(n, old)| (n, if n == f { v.as_str() } else { old })),
                    )?,
                );
                self.server.update_record(record.crm_id, &patch)?;
                self.model.edit(h, Place::Crm, f, v.clone(), self.at);
                self.log(&who, "update", &format!("{} {f}={v}", record.crm_id));
                Ok(())
            }
            (70..80, Some(h)) => {
                self.server.delete_record(record.crm_id)?;
                self.model.deleted_in_crm(h);
                self.log(&who, "delete", &record.crm_id.to_string());
                Ok(())
            }
            (80..90, Some(h)) if self.users.len() > 1 => {
                let to = (u + 1 + self.edits.below(self.users.len() as u64 - 1) as usize) % self.users.len();
                self.server.change_owner(record.crm_id, self.users[to].id)?;
                let attends = record.attendees.contains(&user);
                if !attends {
                    self.model.left_filter(h, u);
                }
                self.model.entered_filter(h, to);
                self.log(&who, "give", &format!("{} to u{to}", record.crm_id));
                Ok(())
            }
            (_, Some(h)) if !record.attendees.is_empty() => {
                let mut attendees = record.attendees.clone();
                let gone = attendees.remove(self.edits.below(attendees.len() as u64) as usize);
                self.server.set_attendees(record.crm_id, attendees)?;
                if let Some(a) = self.users.iter().position(|x| x.id == gone) {
                    if record.owner != gone {
                        self.model.left_filter(h, a);
                    }
                }
                self.log(&who, "uninvite", &format!("{} drops {gone}", record.crm_id));
                Ok(())
            }
            _ => self.crm_create(u, &who),
        }
    }

    fn crm_create(&mut self, u: usize, who: &str) -> Result<(), WorldError> {
        let otc = Self::pick_type(&mut self.edits);
        let attendees =
            if otc == ObjectTypeCode::Appointment { self.pick_attendees("attendees", u) } else { Vec::new() };
        let n = self.config.records + self.at as usize;
        let record = self.new_server_record(n, u, otc, attendees)?;
        self.server.put_record(&record)?;
        self.log(who, "create", &format!("{} {otc:?}", record.crm_id));
        Ok(())
    }

    /// Makes and tracks a new item in `u`'s mailbox.
    fn outlook_create(&mut self, u: usize, otc: ObjectTypeCode) -> Result<EntryId, WorldError> {
        let names = field_names(otc);
        let values: Vec<String> = names.iter().map(|f| self.model.fresh_value(f)).collect();
        let fields = Fields::try_from_pairs(names.iter().copied().zip(values.iter().map(String::as_str)))?;
        let goid = (otc == ObjectTypeCode::Appointment).then(|| self.new_goid());
        let mailbox = &mut self.users[u].mailbox;
        let entry_id = mailbox.user_create(otc, fields, goid, ActivityStatus::Open)?;
        mailbox.user_track(&entry_id)?;
        let h = self.model.new_outlook_item(u, entry_id.clone());
        for (f, v) in names.iter().zip(values) {
            self.model.edit(h, Place::Outlook(u), f, v, self.at);
        }
        Ok(entry_id)
    }

    fn handle_of(&self, u: usize, item: &MailboxItem) -> Option<Handle> {
        match item.stamp() {
            Some(stamp) => self.model.handle_of_crm_id(stamp),
            None => self.model.handle_of_item(u, &item.entry_id),
        }
    }

    fn outlook_edit(&mut self, u: usize) -> Result<(), WorldError> {
        let who = format!("outlook/u{u}");
        // The edit is made on one of the user's machines: its clock stamps it.
        let machines = self.users[u].machines.clone();
        let m = *self.edits.pick(&machines).expect("every user has a machine");
        self.skew_s.set(self.machines[m].skew_s);
        let items: Vec<MailboxItem> =
            self.users[u].mailbox.all_items()?.into_iter().filter(MailboxItem::is_tracked).collect();
        let roll = self.edits.below(100);
        let item = self.edits.pick(&items).cloned();
        let h = item.as_ref().and_then(|i| self.handle_of(u, i));
        match (roll, item, h) {
            (0..65, Some(item), Some(h)) => {
                let f = *self.edits.pick(field_names(item.object_type)).expect("three fields");
                let v = self.model.fresh_value(f);
                let fields = Fields::try_from_pairs(
                    item.fields.iter().map(|(n, old)| (n, if n == f { v.as_str() } else { old })),
                )?;
                self.users[u].mailbox.user_update(&item.entry_id, fields)?;
                self.model.edit(h, Place::Outlook(u), f, v.clone(), self.at);
                self.log(&who, "update", &format!("{} {f}={v}", item.entry_id));
            }
            (65..80, Some(item), Some(h)) => {
                self.users[u].mailbox.user_delete(&item.entry_id)?;
                // Whether DOMAIN's delete matrix may carry this delete to CRM: never for a
                // contact; for a meeting unless the user only attends it (an item never synced
                // has no known role: assume it may).
                let may_delete_in_crm = match item.object_type {
                    ObjectTypeCode::Contact => false,
                    otc if otc.is_calendar() => {
                        item.synced.as_ref().is_none_or(|b| b.role.owns_or_organises())
                    }
                    _ => true,
                };
                self.model.deleted_in_outlook(h, u, may_delete_in_crm);
                self.log(&who, "delete", &item.entry_id.to_string());
            }
            _ => {
                let otc = Self::pick_type(&mut self.edits);
                let e = self.outlook_create(u, otc)?;
                self.log(&who, "create", &format!("{e} {otc:?}"));
            }
        }
        Ok(())
    }

    /// A user may make another machine primary, or unlink a machine and link it again.
    fn chance(&mut self, u: usize) -> Result<(), Violation> {
        let machines = self.users[u].machines.clone();
        let switch = machines.len() > 1 && self.desk.borrow_mut().faults.fire(FaultKind::SwitchPrimary);
        if switch {
            let others: Vec<usize> =
                machines.iter().copied().filter(|&m| m != self.users[u].primary).collect();
            let m = *self.chances.pick(&others).expect("more than one machine");
            let sub = self.machines[m].subscription;
            self.server.set_primary_client(sub).map_err(|e| self.violation(format!("set primary: {e}")))?;
            self.users[u].primary = m;
            let name = self.machines[m].name.clone();
            self.log(&name, "make-primary", "ok");
        }
        let relink = self.desk.borrow_mut().faults.fire(FaultKind::UnlinkRelink);
        if relink {
            let m = *self.chances.pick(&machines).expect("every user has a machine");
            let user = self.users[u].id;
            let machine = &mut self.machines[m];
            unlink(&mut self.server, &mut machine.cache, machine.subscription)
                .map_err(|e| Violation { at: self.at, what: format!("unlink: {e}") })?;
            machine.subscription = self
                .server
                .register_client(user, &machine.name, SubscriptionType::Outlook)
                .map_err(|e| Violation { at: self.at, what: format!("relink: {e}") })?;
            let name = machine.name.clone();
            // The server makes a relinked machine primary when the user has none left.
            let primary = self.server.is_primary_client(self.machines[m].subscription).unwrap_or(false);
            if primary {
                self.users[u].primary = m;
            }
            self.log(&name, "unlink+relink", if primary { "primary" } else { "secondary" });
        }
        Ok(())
    }

    /// Faults and edits stop; each user's primary runs until a round changes nothing.
    fn liveness(&mut self) -> Result<(), Violation> {
        self.desk.borrow_mut().faults.enabled = false;
        self.log("world", "liveness", "faults off, edits off");
        for _ in 0..LIVENESS_ROUNDS_MAX {
            let mut changed = false;
            for u in 0..self.users.len() {
                self.at += 1;
                self.clock.advance(Duration::seconds(SYNC_INTERVAL_S));
                let m = self.primary_of(u)?;
                changed |= self.sync(m)?;
            }
            if !changed {
                return check::converged(self);
            }
        }
        Err(self.violation(format!("no convergence within {LIVENESS_ROUNDS_MAX} rounds of liveness")))
    }

    fn primary_of(&self, u: usize) -> Result<usize, Violation> {
        for &m in &self.users[u].machines {
            let sub = self.machines[m].subscription;
            if self.server.is_primary_client(sub).map_err(|e| self.violation(format!("server: {e}")))? {
                return Ok(m);
            }
        }
        Err(self.violation(format!("user {u} has no primary machine")))
    }

    // Read access for the checkers.
    pub(crate) fn server(&self) -> &ServerStore {
        &self.server
    }

    /// The live records in user `u`'s sync filter, in `CrmId` order (through the mirror).
    pub(crate) fn records_in_filter(&self, u: usize) -> Result<Vec<Rc<ServerRecord>>, ServerError> {
        self.mirror.in_filter(&self.server, self.users[u].id)
    }

    /// The ids of the server's live records (through the mirror).
    pub(crate) fn live(&self) -> Result<Live<'_>, ServerError> {
        self.mirror.live(&self.server)
    }
    pub(crate) fn model(&self) -> &Model {
        &self.model
    }
    pub(crate) fn policies(&self) -> &Policies {
        &self.policies
    }
    pub(crate) fn user_count(&self) -> usize {
        self.users.len()
    }

    pub(crate) fn mailbox(&self, u: usize) -> &MemoryMailbox {
        &self.users[u].mailbox
    }
    pub(crate) fn machine_user(&self, m: usize) -> usize {
        self.machines[m].user
    }
    pub(crate) fn subscription(&self, m: usize) -> SubscriptionId {
        self.machines[m].subscription
    }
    /// How many sync runs the world has made (checks spread their costlier comparisons by it).
    pub(crate) fn sync_runs(&self) -> u64 {
        self.sync_runs
    }

    pub(crate) fn cache(&self, m: usize) -> &SyncCache {
        &self.machines[m].cache
    }
    pub(crate) fn machines_of(&self, u: usize) -> &[usize] {
        &self.users[u].machines
    }
    pub(crate) fn primary(&self, u: usize) -> Result<usize, Violation> {
        self.primary_of(u)
    }
}

/// Runs one seed with the default world and its swarm.
pub fn run_seed(seed: u64, config: &WorldConfig, keep_trace: bool) -> Result<Outcome, WorldError> {
    Ok(World::new(seed, config.clone(), config.faults.swarm(seed), keep_trace)?.run())
}
