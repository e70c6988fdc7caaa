//! The sync engine end to end on the real server store, a mailbox and a cache: a first sync
//! brings both sides together, a second one writes nothing, edits on both sides converge, a
//! secondary machine does nothing, failures stay queued or are ignored, and unlinking keeps every
//! item and record.

use std::rc::Rc;

use chrono::{DateTime, Utc};
use crmsync::ObjectTypeCode::{Appointment, Contact, Email, Task};
use crmsync::cache::SyncCache;
use crmsync::clock::ManualClock;
use crmsync::engine::*;
use crmsync::mailbox::{Mailbox, MemoryMailbox, UserEdits};
use crmsync::server::*;
use crmsync::*;
use uuid::Uuid;

use crate::support::*;

fn user(n: u8) -> SystemUserId {
    SystemUserId::new(Uuid::from_u128(0x7700 + n as u128)).unwrap()
}

struct Machine {
    mailbox: MemoryMailbox,
    cache: SyncCache,
    ids: SeededIds,
    subscription: SubscriptionId,
}

impl Machine {
    /// One sync run of this machine through `server`, heard by `observer`.
    fn run<S: CrmService>(
        &mut self,
        server: &mut S,
        observer: &mut dyn StepObserver,
        config: &EngineConfig,
    ) -> Result<RunReport, EngineError> {
        let edges = Edges {
            server,
            mailbox: &mut self.mailbox,
            cache: &mut self.cache,
            ids: &mut self.ids,
            observer,
        };
        run_sync(edges, self.subscription, config)
    }
}

struct World {
    server: ServerStore,
    clock: Rc<ManualClock>,
}

impl World {
    fn new() -> Self {
        let clock = Rc::new(ManualClock::new(DateTime::<Utc>::UNIX_EPOCH));
        let mut server = ServerStore::in_memory(Box::new(clock.clone())).unwrap();
        for n in 0..2 {
            server.add_user(user(n), &format!("User {n}")).unwrap();
        }
        World { server, clock }
    }

    fn machine(&mut self, who: u8, name: &str, prefix: &str) -> Machine {
        Machine {
            mailbox: MemoryMailbox::new(prefix, Box::new(self.clock.clone())).unwrap(),
            cache: SyncCache::in_memory().unwrap(),
            ids: SeededIds::new(u64::from(who)),
            subscription: self.server.register_client(user(who), name, SubscriptionType::Outlook).unwrap(),
        }
    }

    fn sync(&mut self, m: &mut Machine, config: &EngineConfig) -> RunReport {
        m.run(&mut self.server, &mut NoObserver, config).unwrap()
    }

    fn put(&mut self, crm: u128, owner: u8, otc: ObjectTypeCode, fields: &[(&str, &str)], attendees: &[u8]) {
        self.server
            .put_record(&ServerRecord {
                crm_id: id(crm),
                object_type: otc,
                owner: user(owner),
                version: VersionNumber(0),
                fields: f(fields),
                goid: otc.is_calendar().then(|| goid(crm as u8)),
                status: ActivityStatus::Open,
                attendees: attendees.iter().map(|&n| user(n)).collect(),
            })
            .unwrap();
    }
}

/// A world with one contact (record 1, owned by user 0) synced to one laptop, and the laptop's
/// item of it.
fn one_synced_contact(fields: &[(&str, &str)]) -> (World, Machine, EntryId) {
    let mut world = World::new();
    let mut laptop = world.machine(0, "LAPTOP", "AA");
    world.put(1, 0, Contact, fields, &[]);
    world.sync(&mut laptop, &EngineConfig::default());
    let item = laptop.mailbox.find_by_stamp(id(1)).unwrap().unwrap();
    (world, laptop, item)
}

/// Every linked pair agrees field by field, and the mapping links exactly the stamped items.
fn assert_converged(world: &World, m: &Machine) {
    let state = m.cache.load().unwrap();
    assert!(state.queue.is_empty(), "queue left: {:?}", state.queue.entries());
    let items = m.mailbox.all_items().unwrap();
    let stamped: Vec<_> = items.iter().filter(|i| i.stamp().is_some()).collect();
    assert_eq!(state.mapping.len(), stamped.len());
    for item in stamped {
        let crm_id = item.stamp().unwrap();
        let pair = state.mapping.get(crm_id).expect("a stamped item is mapped");
        assert_eq!(pair.entry_id, item.entry_id);
        let record = world.server.record(crm_id).unwrap().expect("the record exists");
        assert_eq!(record.fields, item.fields, "{crm_id} differs");
        assert_eq!(pair.base, item.fields);
    }
}

#[test]
fn a_first_sync_brings_both_sides_together_and_a_second_writes_nothing() {
    let mut world = World::new();
    let mut laptop = world.machine(0, "LAPTOP", "AA");
    world.put(1, 0, Contact, &[("fullname", "Alice")], &[]);
    world.put(2, 1, Appointment, &[("subject", "Review")], &[0]);
    world.put(3, 0, Task, &[("subject", "Call back")], &[]);
    world.put(4, 1, Contact, &[("fullname", "Not ours")], &[]);
    let bob =
        laptop.mailbox.user_create(Contact, f(&[("fullname", "Bob")]), None, ActivityStatus::Open).unwrap();
    laptop.mailbox.user_track(&bob).unwrap();
    laptop.mailbox.user_create(Contact, f(&[("fullname", "Private")]), None, ActivityStatus::Open).unwrap();

    let first = world.sync(&mut laptop, &EngineConfig::default());
    assert!(first.primary);
    assert_eq!(first.server_changes, 3);
    assert_eq!(first.mailbox_changes, 1);
    assert_eq!(laptop.mailbox.all_items().unwrap().len(), 5, "three records came in; two items were there");
    let bob_id = laptop.mailbox.get(&bob).unwrap().unwrap().stamp().expect("Bob is linked");
    assert_eq!(world.server.record(bob_id).unwrap().unwrap().fields, f(&[("fullname", "Bob")]));
    assert_converged(&world, &laptop);

    let mapping = laptop.cache.load().unwrap().mapping;
    let second = world.sync(&mut laptop, &EngineConfig::default());
    // Bob's record came back as the server's view of a create made by this client: no write.
    let writes: u32 = second.by_entity.values().map(|c| c.created + c.updated + c.deleted + c.failed).sum();
    assert_eq!(writes, 0, "{second:?}");
    assert_eq!(laptop.cache.load().unwrap().mapping, mapping);
    let third = world.sync(&mut laptop, &EngineConfig::default());
    assert_eq!((third.server_changes, third.mailbox_changes), (0, 0), "echo-free: {third:?}");
}

#[test]
fn edits_on_both_sides_converge_with_crm_winning_a_conflict() {
    let mut world = World::new();
    let mut laptop = world.machine(0, "LAPTOP", "AA");
    world.put(1, 0, Contact, &[("fullname", "Alice"), ("jobtitle", "Dev"), ("telephone1", "100")], &[]);
    world.put(2, 0, Task, &[("subject", "Call back")], &[]);
    let config = EngineConfig { commit_every: 3, ..EngineConfig::default() };
    world.sync(&mut laptop, &config);
    let alice = laptop.mailbox.find_by_stamp(id(1)).unwrap().unwrap();
    let task = laptop.mailbox.find_by_stamp(id(2)).unwrap().unwrap();

    world.put(1, 0, Contact, &[("fullname", "Alice"), ("jobtitle", "Lead"), ("telephone1", "200")], &[]);
    laptop
        .mailbox
        .user_update(&alice, f(&[("fullname", "Alicia"), ("jobtitle", "Dev"), ("telephone1", "300")]))
        .unwrap();
    laptop.mailbox.user_delete(&task).unwrap();
    let report = world.sync(&mut laptop, &config);
    assert_eq!(report.by_entity[&Contact].merged_conflicts, 1);
    let merged = f(&[("fullname", "Alicia"), ("jobtitle", "Lead"), ("telephone1", "200")]);
    assert_eq!(laptop.mailbox.get(&alice).unwrap().unwrap().fields, merged);
    assert_eq!(world.server.record(id(1)).unwrap().unwrap().fields, merged);
    // A current task deleted in Outlook is deleted in CRM.
    assert_eq!(world.server.record(id(2)).unwrap(), None);
    assert_converged(&world, &laptop);
}

#[test]
fn a_secondary_machine_never_writes() {
    let mut world = World::new();
    let mut laptop = world.machine(0, "LAPTOP", "AA");
    let mut desktop = world.machine(0, "DESKTOP", "BB");
    world.put(1, 0, Contact, &[("fullname", "Alice")], &[]);
    let tracked =
        desktop.mailbox.user_create(Contact, f(&[("fullname", "Desk")]), None, ActivityStatus::Open).unwrap();
    desktop.mailbox.user_track(&tracked).unwrap();
    let report = world.sync(&mut desktop, &EngineConfig::default());
    assert!(!report.primary);
    assert_eq!(desktop.mailbox.all_items().unwrap().len(), 1);
    assert!(desktop.cache.load().unwrap().queue.is_empty());
    // The primary machine still gets everything.
    world.sync(&mut laptop, &EngineConfig::default());
    assert_eq!(laptop.mailbox.all_items().unwrap().len(), 1);
}

#[test]
fn a_failure_stays_queued_unless_errors_are_ignored() {
    let mut world = World::new();
    let mut laptop = world.machine(0, "LAPTOP", "AA");
    world.put(1, 0, Email, &[("subject", "tracked, not synchronised")], &[]);
    world.put(2, 0, Contact, &[("fullname", "Alice")], &[]);
    let report = world.sync(&mut laptop, &EngineConfig::default());
    assert_eq!(report.by_entity[&Email].failed, 1);
    let state = laptop.cache.load().unwrap();
    assert_eq!(state.queue.len(), 1);
    assert_eq!(state.queue.entries()[0].attempts, 1);
    let ignoring = EngineConfig { ignore_all_errors: true, ..EngineConfig::default() };
    let report = world.sync(&mut laptop, &ignoring);
    assert_eq!(report.by_entity[&Email].ignored, 1);
    let state = laptop.cache.load().unwrap();
    assert!(state.queue.is_empty());
    assert_eq!(state.ignored.len(), 1);
    assert_eq!(state.ignored[0].entry.attempts, 2);
}

/// The real store, with someone else editing a record in CRM between the moment a run read its
/// pages and the moment it writes that record: the race a conditional write exists for.
struct EditedMeanwhile<'a> {
    inner: &'a mut ServerStore,
    edit: Option<(CrmId, Meanwhile)>,
}

/// What someone else does in CRM meanwhile (or what the network does to the answer).
enum Meanwhile {
    Update(FieldPatch),
    Delete,
    /// The run's own write lands, and its answer is lost.
    LoseAnswer,
}

impl EditedMeanwhile<'_> {
    fn race(&mut self, crm_id: CrmId) {
        match self.edit.take_if(|(id, _)| *id == crm_id) {
            Some((id, Meanwhile::Update(patch))) => drop(self.inner.update_record(id, &patch).unwrap()),
            Some((id, Meanwhile::Delete)) => drop(self.inner.delete_record(id).unwrap()),
            Some(other @ (_, Meanwhile::LoseAnswer)) => self.edit = Some(other),
            None => {}
        }
    }
}

impl CrmService for EditedMeanwhile<'_> {
    fn register_client(
        &mut self,
        user: SystemUserId,
        machine: &str,
        kind: SubscriptionType,
    ) -> Result<SubscriptionId, ServerError> {
        self.inner.register_client(user, machine, kind)
    }
    fn is_primary_client(&self, s: SubscriptionId) -> Result<bool, ServerError> {
        self.inner.is_primary_client(s)
    }
    fn primary_term(&self, s: SubscriptionId) -> Result<Option<u64>, ServerError> {
        self.inner.primary_term(s)
    }
    fn set_primary_client(&mut self, s: SubscriptionId) -> Result<(), ServerError> {
        self.inner.set_primary_client(s)
    }
    fn unregister_client(&mut self, s: SubscriptionId) -> Result<(), ServerError> {
        self.inner.unregister_client(s)
    }
    fn prepare_sync(&mut self, s: SubscriptionId) -> Result<SyncSummary, ServerError> {
        self.inner.prepare_sync(s)
    }
    fn get_sync_data(
        &mut self,
        s: SubscriptionId,
        after: Option<u64>,
        size: usize,
    ) -> Result<SyncPage, ServerError> {
        self.inner.get_sync_data(s, after, size)
    }
    fn acknowledge(&mut self, s: SubscriptionId, through: u64) -> Result<(), ServerError> {
        self.inner.acknowledge(s, through)
    }
    fn create_record(
        &mut self,
        s: SubscriptionId,
        crm_id: CrmId,
        otc: ObjectTypeCode,
        record: &Record,
    ) -> Result<VersionNumber, ServerError> {
        self.inner.create_record(s, crm_id, otc, record)
    }
    fn fetch_record(&mut self, s: SubscriptionId, crm_id: CrmId) -> Result<Option<Change>, ServerError> {
        self.inner.fetch_record(s, crm_id)
    }
    fn update_record(&mut self, crm_id: CrmId, patch: &FieldPatch) -> Result<Updated, ServerError> {
        self.race(crm_id);
        self.inner.update_record(crm_id, patch)
    }
    fn update_record_if(
        &mut self,
        crm_id: CrmId,
        patch: &FieldPatch,
        expected: VersionNumber,
    ) -> Result<Updated, ServerError> {
        self.race(crm_id);
        let written = self.inner.update_record_if(crm_id, patch, expected);
        match self.edit.take_if(|(id, m)| *id == crm_id && matches!(m, Meanwhile::LoseAnswer)) {
            Some(_) => Err(ServerError::Unreachable("the answer was lost".into())),
            None => written,
        }
    }
    fn delete_record(&mut self, crm_id: CrmId) -> Result<VersionNumber, ServerError> {
        self.inner.delete_record(crm_id)
    }
}

#[test]
fn a_crm_edit_made_while_a_run_writes_is_merged_not_overwritten() {
    // Under "ignore all errors" too: a write that waits for a merge is no error to ignore.
    for ignore_all_errors in [false, true] {
        let mut world = World::new();
        let mut laptop = world.machine(0, "LAPTOP", "AA");
        world.put(1, 0, Contact, &[("fullname", "Alice"), ("jobtitle", "Dev")], &[]);
        world.sync(&mut laptop, &EngineConfig::default());
        let item = laptop.mailbox.find_by_stamp(id(1)).unwrap().unwrap();
        // In Outlook the name changes; in CRM, while the run is on its way, name and title.
        laptop
            .mailbox
            .user_update(&item, f(&[("fullname", "Alice (Outlook)"), ("jobtitle", "Dev")]))
            .unwrap();
        let theirs = FieldPatch::between(
            &f(&[("fullname", "Alice"), ("jobtitle", "Dev")]),
            &f(&[("fullname", "Alice (CRM)"), ("jobtitle", "Lead")]),
        );
        let config = EngineConfig { ignore_all_errors, ..EngineConfig::default() };
        let mut racing =
            EditedMeanwhile { inner: &mut world.server, edit: Some((id(1), Meanwhile::Update(theirs))) };
        let raced = laptop.run(&mut racing, &mut NoObserver, &config).unwrap();
        assert_eq!(raced.by_entity[&Contact].failed, 1, "the write waits: {raced:?}");
        assert_eq!(
            world.server.record(id(1)).unwrap().unwrap().fields,
            f(&[("fullname", "Alice (CRM)"), ("jobtitle", "Lead")]),
            "nothing was written over the CRM edit"
        );
        let state = laptop.cache.load().unwrap();
        assert!(state.ignored.is_empty(), "not ignored: {:?}", state.ignored);
        // The next run merges both edits: the name conflicts (CRM wins by default), the title
        // changed in CRM only.
        let merged = world.sync(&mut laptop, &config);
        assert_eq!(merged.by_entity[&Contact].failed, 0, "{merged:?}");
        assert_eq!(
            laptop.mailbox.get(&item).unwrap().unwrap().fields,
            f(&[("fullname", "Alice (CRM)"), ("jobtitle", "Lead")])
        );
        assert_converged(&world, &laptop);
    }
}

#[test]
fn an_edit_of_a_record_deleted_in_crm_meanwhile_brings_it_back() {
    // DOMAIN: update against delete, the update wins by default and CRM gets the record back.
    let (mut world, mut laptop, item) = one_synced_contact(&[("fullname", "Alice")]);
    laptop.mailbox.user_update(&item, f(&[("fullname", "Alice B")])).unwrap();
    let config = EngineConfig { ignore_all_errors: true, ..EngineConfig::default() };
    let mut racing = EditedMeanwhile { inner: &mut world.server, edit: Some((id(1), Meanwhile::Delete)) };
    let raced = laptop.run(&mut racing, &mut NoObserver, &config).unwrap();
    assert_eq!(raced.by_entity[&Contact].failed, 1, "the write waits for the delete: {raced:?}");
    assert!(laptop.cache.load().unwrap().ignored.is_empty());
    world.sync(&mut laptop, &config);
    let stamp = laptop.mailbox.get(&item).unwrap().unwrap().stamp().expect("linked again");
    assert_eq!(
        stamp,
        id(1).successor(),
        "a CrmId is never used again: the record comes back as its successor"
    );
    assert_eq!(world.server.record(stamp).unwrap().unwrap().fields, f(&[("fullname", "Alice B")]));
    assert_converged(&world, &laptop);
}

#[test]
fn a_record_brought_back_by_an_edit_keeps_its_last_crm_values() {
    // CRM edits one field, the client queues that edit and stops before applying it, then CRM
    // deletes the record; the item's edit of another field wins over the delete. The record
    // comes back with both edits, and the item takes the CRM edit it never received.
    let (mut world, mut laptop, item) = one_synced_contact(&[("fullname", "Alice"), ("jobtitle", "Dev")]);
    let alice = f(&[("fullname", "Alice"), ("jobtitle", "Dev")]);
    let lead = f(&[("fullname", "Alice"), ("jobtitle", "Lead")]);
    world.server.update_record(id(1), &FieldPatch::between(&alice, &lead)).unwrap();
    laptop.mailbox.user_update(&item, f(&[("fullname", "Alice B"), ("jobtitle", "Dev")])).unwrap();
    assert!(laptop.run(&mut world.server, &mut KillAfterQueueingOutlook, &EngineConfig::default()).is_err());
    world.server.delete_record(id(1)).unwrap();
    world.sync(&mut laptop, &EngineConfig::default());
    let both = f(&[("fullname", "Alice B"), ("jobtitle", "Lead")]);
    let back = laptop.mailbox.get(&item).unwrap().unwrap();
    assert_eq!(back.stamp(), Some(id(1).successor()));
    assert_eq!(world.server.record(id(1).successor()).unwrap().unwrap().fields, both);
    assert_eq!(back.fields, both);
    assert_converged(&world, &laptop);
}

#[test]
fn an_echo_moves_the_items_base_to_the_version_crm_holds() {
    // A write whose answer was lost: the next run learns from CRM's change that it landed (the
    // pair's base takes it) and drops that change as an echo. The pair and the item's copy of
    // the base still move to the version CRM holds, so the next write is made over it and a
    // machine that reads the item's base later (a new primary) merges against the right one.
    let (mut world, mut laptop, item) = one_synced_contact(&[("fullname", "Alice")]);
    laptop.mailbox.user_update(&item, f(&[("fullname", "Alice B")])).unwrap();
    let mut lossy = EditedMeanwhile { inner: &mut world.server, edit: Some((id(1), Meanwhile::LoseAnswer)) };
    assert!(laptop.run(&mut lossy, &mut NoObserver, &EngineConfig::default()).is_err());
    let v = world.server.record(id(1)).unwrap().unwrap().version;
    let report = world.sync(&mut laptop, &EngineConfig::default());
    assert_eq!(report.by_entity[&Contact].updated, 0, "nothing left to write: {report:?}");
    let state = laptop.cache.load().unwrap();
    assert_eq!(state.mapping.get(id(1)).unwrap().crm_version, Some(v));
    let synced = laptop.mailbox.get(&item).unwrap().unwrap().synced.expect("a base on the item");
    assert_eq!((synced.crm_version, synced.fields), (Some(v), f(&[("fullname", "Alice B")])));
    assert_converged(&world, &laptop);
}

#[test]
fn two_attendees_bringing_back_one_deleted_meeting_keep_both_edits() {
    // The organiser's and an attendee's clients both hold the meeting; each user edits another
    // field of their copy; the meeting is deleted in CRM. Each client's edit wins over the
    // delete and brings it back under the same successor id: the first creates it, the second
    // joins it (the server makes that user an attendee) and merges its edit on the next run.
    let mut world = World::new();
    let mut organiser = world.machine(0, "ORGANISER", "AA");
    let mut attendee = world.machine(1, "ATTENDEE", "BB");
    let base = [("location", "Room 1"), ("subject", "Review")];
    world.put(1, 0, Appointment, &base, &[1]);
    world.sync(&mut organiser, &EngineConfig::default());
    world.sync(&mut attendee, &EngineConfig::default());
    let mine = organiser.mailbox.find_by_stamp(id(1)).unwrap().unwrap();
    let theirs = attendee.mailbox.find_by_stamp(id(1)).unwrap().unwrap();
    organiser.mailbox.user_update(&mine, f(&[("location", "Room 1"), ("subject", "Review v2")])).unwrap();
    attendee.mailbox.user_update(&theirs, f(&[("location", "Room 9"), ("subject", "Review")])).unwrap();
    world.server.delete_record(id(1)).unwrap();
    world.sync(&mut organiser, &EngineConfig::default());
    let joined = world.sync(&mut attendee, &EngineConfig::default());
    assert_eq!(joined.by_entity[&Appointment].failed, 1, "the join waits for a merge: {joined:?}");
    world.sync(&mut attendee, &EngineConfig::default());
    world.sync(&mut organiser, &EngineConfig::default());
    let back = world.server.record(id(1).successor()).unwrap().expect("the meeting is back");
    let both = f(&[("location", "Room 9"), ("subject", "Review v2")]);
    assert_eq!(back.fields, both);
    assert!(back.attendees.contains(&user(1)), "the joining user attends: {:?}", back.attendees);
    assert_eq!(attendee.mailbox.get(&theirs).unwrap().unwrap().fields, both);
    assert_eq!(organiser.mailbox.get(&mine).unwrap().unwrap().fields, both);
    assert_converged(&world, &attendee);
    assert_converged(&world, &organiser);
}

#[test]
fn a_write_whose_answer_was_lost_is_still_known_after_the_cache_is_rebuilt() {
    // The item's edit reaches CRM but the answer is lost; then the machine is unlinked and
    // linked again (a new, empty cache) and the user edits the item once more. The item itself
    // keeps the note of the uncertain write, so the rebuilt cache learns from CRM's change that
    // the write landed: the later edit is no conflict with the user's own earlier one.
    let (mut world, mut laptop, item) = one_synced_contact(&[("fullname", "Alice")]);
    laptop.mailbox.user_update(&item, f(&[("fullname", "Alice B")])).unwrap();
    let mut lossy = EditedMeanwhile { inner: &mut world.server, edit: Some((id(1), Meanwhile::LoseAnswer)) };
    assert!(laptop.run(&mut lossy, &mut NoObserver, &EngineConfig::default()).is_err());
    unlink(&mut world.server, &mut laptop.cache, laptop.subscription).unwrap();
    laptop.subscription = world.server.register_client(user(0), "LAPTOP", SubscriptionType::Outlook).unwrap();
    laptop.mailbox.user_update(&item, f(&[("fullname", "Alice C")])).unwrap();
    let report = world.sync(&mut laptop, &EngineConfig::default());
    assert_eq!(report.by_entity[&Contact].merged_conflicts, 0, "{report:?}");
    assert_eq!(world.server.record(id(1)).unwrap().unwrap().fields, f(&[("fullname", "Alice C")]));
    assert_converged(&world, &laptop);
}

/// Stops the run once the mailbox's changes are queued, before anything is applied.
struct KillAfterQueueingOutlook;

impl StepObserver for KillAfterQueueingOutlook {
    fn after(&mut self, step: DurableStep) -> Result<(), Interrupt> {
        if step == DurableStep::QueueMailboxPage { Err(Interrupt) } else { Ok(()) }
    }
}

#[test]
fn crm_holding_a_value_the_item_has_since_moved_on_from_is_no_conflict() {
    // What a write whose outcome was lost leaves behind: CRM holds the item's earlier value,
    // the pair's base predates it, and the item's earlier and newer snapshots are both queued.
    let (mut world, mut laptop, item) = one_synced_contact(&[("fullname", "Alice"), ("jobtitle", "Dev")]);
    laptop.mailbox.user_update(&item, f(&[("fullname", "Alice B"), ("jobtitle", "Dev")])).unwrap();
    assert!(laptop.run(&mut world.server, &mut KillAfterQueueingOutlook, &EngineConfig::default()).is_err());
    let alice = f(&[("fullname", "Alice"), ("jobtitle", "Dev")]);
    world
        .server
        .update_record(
            id(1),
            &FieldPatch::between(&alice, &f(&[("fullname", "Alice B"), ("jobtitle", "Dev")])),
        )
        .unwrap();
    laptop.mailbox.user_update(&item, f(&[("fullname", "Alice C"), ("jobtitle", "Dev")])).unwrap();
    let report = world.sync(&mut laptop, &EngineConfig::default());
    // Against the old base, "Alice B" in CRM and "Alice C" in Outlook would be a conflict, and
    // CRM would win with a value the item had already left behind.
    assert_eq!(report.by_entity[&Contact].merged_conflicts, 0, "{report:?}");
    assert_eq!(world.server.record(id(1)).unwrap().unwrap().fields.get("fullname"), Some("Alice C"));
    assert_converged(&world, &laptop);
}

#[test]
fn unlinking_keeps_every_item_and_record() {
    let mut world = World::new();
    let mut laptop = world.machine(0, "LAPTOP", "AA");
    world.put(1, 0, Appointment, &[("subject", "Review")], &[]);
    world.put(2, 0, Contact, &[("fullname", "Alice")], &[]);
    world.sync(&mut laptop, &EngineConfig::default());
    let items = laptop.mailbox.all_items().unwrap();
    unlink(&mut world.server, &mut laptop.cache, laptop.subscription).unwrap();
    assert_eq!(laptop.mailbox.all_items().unwrap(), items, "every appointment stays in Outlook");
    assert!(world.server.record(id(1)).unwrap().is_some() && world.server.record(id(2)).unwrap().is_some());
    let state = laptop.cache.load().unwrap();
    assert!(state.queue.is_empty() && state.mapping.is_empty());
    assert!(world.server.prepare_sync(laptop.subscription).is_err(), "the subscription is gone");
    // Unlinking again (the server forgot it already, as after a cleanup) still succeeds.
    unlink(&mut world.server, &mut laptop.cache, laptop.subscription).unwrap();

    // Re-linking the machine relinks by the stamps: no second copy of anything.
    laptop.subscription = world.server.register_client(user(0), "LAPTOP", SubscriptionType::Outlook).unwrap();
    world.sync(&mut laptop, &EngineConfig::default());
    assert_eq!(laptop.mailbox.all_items().unwrap().len(), 2);
    assert_converged(&world, &laptop);
}

#[test]
fn the_demo_runs_to_a_settled_state_and_never_overwrites_a_folder() {
    use crmsync::demo::*;
    let dir = std::env::temp_dir().join(format!("crmsync-demo-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = DemoConfig { dir: dir.clone(), records: 40, seed: 7 };
    let report = run_demo(&config, &mut NoObserver).unwrap();
    assert_eq!(report.runs.len(), 3);
    assert_eq!((report.queue_left, report.ignored_errors), (0, 1), "only the email is left, ignored");
    let second = &report.runs[1].report;
    assert_eq!(second.by_entity[&Contact].merged_conflicts, 1);
    assert_eq!(second.by_entity[&Email].failed, 1);
    // A second demo in the same folder is refused and changes nothing.
    let before: Vec<Vec<u8>> = DEMO_FILES.iter().map(|f| std::fs::read(dir.join(f)).unwrap()).collect();
    assert!(matches!(run_demo(&config, &mut NoObserver), Err(DemoError::NotEmpty(_))));
    let after: Vec<Vec<u8>> = DEMO_FILES.iter().map(|f| std::fs::read(dir.join(f)).unwrap()).collect();
    assert_eq!(before, after);
    assert!(matches!(
        run_demo(&DemoConfig { records: 3, ..config }, &mut NoObserver),
        Err(DemoError::Records(3))
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(feature = "cli")]
#[test]
fn crmsync_demo_runs_from_the_command_line() {
    let dir = std::env::temp_dir().join(format!("crmsync-demo-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_crmsync"))
        .args(["demo", "--records", "20", "--json", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["queue_left"], 0);
    assert_eq!(report["runs"].as_array().unwrap().len(), 3);
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_crmsync"))
        .args(["demo", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a demo file"));
    std::fs::remove_dir_all(&dir).unwrap();
}
