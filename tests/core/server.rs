//! The SQLite server store: a model check of prepare / get / acknowledge against the filtered
//! record set under random edits and lost acknowledgements, the summary snapshot, subscriptions,
//! idempotent client writes, and files it must refuse without touching them.

use std::collections::BTreeMap;
use std::rc::Rc;

use chrono::{DateTime, Utc};
use crmsync::ObjectTypeCode::{Appointment, Contact, Task};
use crmsync::clock::ManualClock;
use crmsync::server::*;
use crmsync::*;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use uuid::Uuid;

use crate::snapshot;
use crate::support::*;

fn user(n: u8) -> SystemUserId {
    SystemUserId::new(Uuid::from_u128(0x5500 + n as u128)).unwrap()
}

fn store() -> ServerStore {
    let clock = Rc::new(ManualClock::new(DateTime::<Utc>::UNIX_EPOCH));
    let mut store = ServerStore::in_memory(Box::new(clock)).unwrap();
    for n in 0..3 {
        store.add_user(user(n), &format!("User {n}")).unwrap();
    }
    store
}

fn record(
    crm: u128,
    owner: u8,
    otc: ObjectTypeCode,
    fields: &[(&str, &str)],
    attendees: &[u8],
) -> ServerRecord {
    ServerRecord {
        crm_id: id(crm),
        object_type: otc,
        owner: user(owner),
        version: VersionNumber(0),
        fields: f(fields),
        goid: otc.is_calendar().then(|| goid(crm as u8)),
        status: ActivityStatus::Open,
        attendees: attendees.iter().map(|&n| user(n)).collect(),
    }
}

/// What a client holds: every record it was handed, as it was handed.
type Held = BTreeMap<CrmId, (ObjectTypeCode, Fields)>;

/// One full sync: prepare, every page, acknowledging each page unless `lose_ack`.
fn sync(
    store: &mut ServerStore,
    sub: SubscriptionId,
    held: &mut Held,
    page_size: usize,
    lose_ack: bool,
) -> SyncSummary {
    let summary = store.prepare_sync(sub).unwrap();
    let mut after = None;
    loop {
        let page = store.get_sync_data(sub, after, page_size).unwrap();
        for change in &page.changes {
            let RecordKey::Crm(crm_id) = change.key() else { panic!("server changes are keyed by CrmId") };
            match change.op() {
                ChangeOp::Create(r) | ChangeOp::Update(r) => {
                    held.insert(*crm_id, (change.object_type(), r.fields.clone()));
                }
                ChangeOp::Delete(_) => {
                    held.remove(crm_id);
                }
            }
        }
        if let (Some(last), false) = (page.last_seq, lose_ack) {
            store.acknowledge(sub, last).unwrap();
        }
        after = page.last_seq.or(after);
        if !page.more {
            return summary;
        }
    }
}

/// The records `who` should hold: owned, or appointments attended.
fn filtered(store: &ServerStore, who: SystemUserId, ids: impl Iterator<Item = CrmId>) -> Held {
    ids.filter_map(|crm_id| store.record(crm_id).unwrap())
        .filter(|r| r.owner == who || (r.object_type.is_calendar() && r.attendees.contains(&who)))
        .map(|r| (r.crm_id, (r.object_type, r.fields)))
        .collect()
}

#[derive(Debug, Clone)]
enum Edit {
    Put { n: u8, owner: u8, otc: ObjectTypeCode, value: u8, attendees: Vec<u8> },
    Update { n: u8, value: u8 },
    Delete { n: u8 },
    Owner { n: u8, owner: u8 },
    Attendees { n: u8, attendees: Vec<u8> },
    Sync { page_size: usize, lose_ack: bool },
}

fn edit() -> impl Strategy<Value = Edit> {
    let n = 0u8..24;
    let who = 0u8..3;
    let otc = prop_oneof![Just(Contact), Just(Appointment), Just(Task)];
    prop_oneof![
        3 => (n.clone(), who.clone(), otc, 0u8..4, proptest::collection::vec(0u8..3, 0..3))
            .prop_map(|(n, owner, otc, value, attendees)| Edit::Put { n, owner, otc, value, attendees }),
        3 => (n.clone(), 0u8..4).prop_map(|(n, value)| Edit::Update { n, value }),
        1 => n.clone().prop_map(|n| Edit::Delete { n }),
        1 => (n.clone(), who).prop_map(|(n, owner)| Edit::Owner { n, owner }),
        1 => (n, proptest::collection::vec(0u8..3, 0..3)).prop_map(|(n, attendees)| Edit::Attendees { n, attendees }),
        2 => (1usize..6, proptest::bool::weighted(0.3)).prop_map(|(page_size, lose_ack)| Edit::Sync { page_size, lose_ack }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/server.txt"))),
        ..ProptestConfig::with_cases(96)
    })]

    /// After any edits interleaved with syncs (some acknowledgements lost), one more full sync
    /// leaves the client holding exactly the filtered server set, and a sync after that hands out
    /// nothing.
    #[test]
    fn a_client_that_applies_what_it_is_handed_holds_the_filtered_set(edits in proptest::collection::vec(edit(), 1..60)) {
        let mut store = store();
        let sub = store.register_client(user(0), "LAPTOP", SubscriptionType::Outlook).unwrap();
        let mut held = Held::new();
        for e in &edits {
            // Edits the server refuses (a record that does not exist, an id that was deleted)
            // change nothing, which is what the model expects too.
            let _ = match e.clone() {
                Edit::Put { n, owner, otc, value, attendees } => {
                    let v = value.to_string();
                    store.put_record(&record(n as u128 + 1, owner, otc, &[("subject", &v)], &attendees)).map(|_| ())
                }
                Edit::Update { n, value } => {
                    let before = store.record(id(n as u128 + 1)).unwrap().map(|r| r.fields);
                    let after = f(&[("subject", &value.to_string())]);
                    match before {
                        Some(b) => store.update_record(id(n as u128 + 1), &FieldPatch::between(&b, &after)).map(|_| ()),
                        None => Ok(()),
                    }
                }
                Edit::Delete { n } => store.delete_record(id(n as u128 + 1)).map(|_| ()),
                Edit::Owner { n, owner } => store.change_owner(id(n as u128 + 1), user(owner)).map(|_| ()),
                Edit::Attendees { n, attendees } => {
                    store.set_attendees(id(n as u128 + 1), attendees.into_iter().map(user).collect()).map(|_| ())
                }
                Edit::Sync { page_size, lose_ack } => {
                    sync(&mut store, sub, &mut held, page_size, lose_ack);
                    Ok(())
                }
            };
        }
        sync(&mut store, sub, &mut held, 4, false);
        let expected = filtered(&store, user(0), (1..=24).map(id));
        prop_assert_eq!(&held, &expected);
        // The one-query filter read (checks, the simulator) says the same as the rule.
        let read: Held = store
            .records_in_filter(user(0))
            .unwrap()
            .into_iter()
            .map(|r| (r.crm_id, (r.object_type, r.fields)))
            .collect();
        prop_assert_eq!(&read, &expected);
        let again = store.prepare_sync(sub).unwrap();
        prop_assert!(again.is_empty(), "a sync after a full sync hands out {:?}", again);
    }
}

#[test]
fn a_lost_acknowledge_hands_the_same_changes_out_again() {
    let mut store = store();
    let sub = store.register_client(user(0), "LAPTOP", SubscriptionType::Outlook).unwrap();
    store.put_record(&record(1, 0, Contact, &[("fullname", "Alice")], &[])).unwrap();
    let mut held = Held::new();
    let first = sync(&mut store, sub, &mut held, 10, true);
    let second = sync(&mut store, sub, &mut held, 10, false);
    assert_eq!(first, second);
    assert_eq!(second.counts(Contact).create, 1);
    assert!(store.prepare_sync(sub).unwrap().is_empty());
}

#[test]
fn prepare_sync_summary_of_a_named_state() {
    let mut store = store();
    let sub = store.register_client(user(0), "LAPTOP", SubscriptionType::Outlook).unwrap();
    store.put_record(&record(1, 0, Contact, &[("fullname", "Alice")], &[])).unwrap();
    store.put_record(&record(2, 0, Contact, &[("fullname", "Bob")], &[])).unwrap();
    store.put_record(&record(3, 1, Appointment, &[("subject", "Review")], &[0])).unwrap();
    store.put_record(&record(4, 1, Task, &[("subject", "not ours")], &[])).unwrap();
    let mut held = Held::new();
    sync(&mut store, sub, &mut held, 10, false);
    // Then: Alice edited, Bob deleted, the meeting drops user 0, a new task.
    store
        .update_record(
            id(1),
            &FieldPatch::between(&f(&[("fullname", "Alice")]), &f(&[("fullname", "Alicia")])),
        )
        .unwrap();
    store.delete_record(id(2)).unwrap();
    store.set_attendees(id(3), vec![user(2)]).unwrap();
    store.put_record(&record(5, 0, Task, &[("subject", "Call")], &[])).unwrap();
    let summary = store.prepare_sync(sub).unwrap();
    assert_eq!(summary.counts(Contact), Counts { create: 0, update: 1, delete: 1 });
    assert_eq!(summary.counts(Appointment), Counts { create: 0, update: 0, delete: 1 });
    assert_eq!(summary.counts(Task), Counts { create: 1, update: 0, delete: 0 });
    snapshot!("server_prepare_sync_summary", summary.to_xml());
    let page = store.get_sync_data(sub, None, 10).unwrap();
    let kinds: Vec<(ChangeKind, Option<DeleteReason>)> = page
        .changes
        .iter()
        .map(|c| {
            (
                c.kind(),
                match c.op() {
                    ChangeOp::Delete(why) => Some(*why),
                    _ => None,
                },
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            (ChangeKind::Update, None),
            (ChangeKind::Delete, Some(DeleteReason::Deleted)),
            (ChangeKind::Delete, Some(DeleteReason::LeftFilter)),
            (ChangeKind::Create, None),
        ]
    );
}

#[test]
fn only_the_primary_client_is_handed_changes() {
    let mut store = store();
    let laptop = store.register_client(user(0), "LAPTOP", SubscriptionType::Outlook).unwrap();
    let desktop = store.register_client(user(0), "DESKTOP", SubscriptionType::Outlook).unwrap();
    store.put_record(&record(1, 0, Contact, &[("fullname", "Alice")], &[])).unwrap();
    assert!(store.prepare_sync(desktop).unwrap().is_empty());
    assert_eq!(store.prepare_sync(laptop).unwrap().counts(Contact).create, 1);
    store.set_primary_client(desktop).unwrap();
    assert!(store.prepare_sync(laptop).unwrap().is_empty());
    assert_eq!(store.prepare_sync(desktop).unwrap().counts(Contact).create, 1);
    let abp = store.register_client(user(0), "LAPTOP", SubscriptionType::AddressBookProvider).unwrap();
    assert!(matches!(
        store.prepare_sync(abp),
        Err(ServerError::NotSynchronised { subscription, kind: SubscriptionType::AddressBookProvider }) if subscription == abp
    ));
}

#[test]
fn a_conditional_update_never_overwrites_a_version_it_did_not_start_from() {
    let mut store = store();
    let v1 =
        store.put_record(&record(1, 0, Contact, &[("fullname", "Alice"), ("jobtitle", "Dev")], &[])).unwrap();
    let alice = f(&[("fullname", "Alice"), ("jobtitle", "Dev")]);
    // Someone else writes: the record moves past v1.
    let v2 = store
        .update_record(
            id(1),
            &FieldPatch::between(&alice, &f(&[("fullname", "Alice"), ("jobtitle", "Lead")])),
        )
        .unwrap()
        .version;
    let lead = store.record(id(1)).unwrap().unwrap();
    // A write over v1 is refused, naming both versions, and writes nothing.
    let mine = FieldPatch::between(&alice, &f(&[("fullname", "Alice B"), ("jobtitle", "Dev")]));
    match store.update_record_if(id(1), &mine, v1) {
        Err(ServerError::ChangedSince { crm_id, expected, current }) => {
            assert_eq!((crm_id, expected, current), (id(1), v1, v2));
        }
        other => panic!("expected ChangedSince, got {other:?}"),
    }
    assert_eq!(store.record(id(1)).unwrap().unwrap(), lead);
    // A patch that changes nothing succeeds whatever the version, writing nothing.
    let same = FieldPatch::between(&alice, &f(&[("fullname", "Alice"), ("jobtitle", "Lead")]));
    assert_eq!(store.update_record_if(id(1), &same, v1).unwrap(), Updated { version: v2, previous: v2 });
    // Over the version it started from, the write lands.
    let v3 = store.update_record_if(id(1), &mine, v2).unwrap();
    assert_eq!(v3.previous, v2);
    assert!(v3.version > v2);
    assert_eq!(store.record(id(1)).unwrap().unwrap().fields.get("fullname"), Some("Alice B"));
}

#[test]
fn client_creates_are_idempotent_and_ids_are_never_reused() {
    let mut store = store();
    let sub = store.register_client(user(0), "LAPTOP", SubscriptionType::Outlook).unwrap();
    let r = Record::new(f(&[("fullname", "Alice")]));
    let v = store.create_record(sub, id(9), Contact, &r).unwrap();
    assert_eq!(store.create_record(sub, id(9), Contact, &r).unwrap(), v);
    // A retry with newer values (the item was edited while the answer was lost), nobody else
    // having touched the record: the creating client's update.
    let newer = Record::new(f(&[("fullname", "Alice B")]));
    let v2 = store.create_record(sub, id(9), Contact, &newer).unwrap();
    assert!(v2 > v);
    assert_eq!(store.record(id(9)).unwrap().unwrap().fields, newer.fields);
    // Someone else changed it since: a retry with other values is a conflict.
    store.update_record(id(9), &FieldPatch::between(&newer.fields, &f(&[("fullname", "Carol")]))).unwrap();
    let other = Record::new(f(&[("fullname", "Bob")]));
    assert!(
        matches!(store.create_record(sub, id(9), Contact, &other), Err(ServerError::CreateConflict { crm_id }) if crm_id == id(9))
    );
    let deleted = store.delete_record(id(9)).unwrap();
    assert_eq!(store.delete_record(id(9)).unwrap(), deleted);
    assert!(
        matches!(store.create_record(sub, id(9), Contact, &r), Err(ServerError::RecordDeleted(crm_id)) if crm_id == id(9))
    );
    assert!(matches!(store.update_record(id(9), &FieldPatch::default()), Err(ServerError::RecordDeleted(_))));
    assert!(matches!(
        store.update_record(id(10), &FieldPatch::default()),
        Err(ServerError::UnknownRecord(_))
    ));
}

#[test]
fn a_second_attendee_creating_the_same_meeting_joins_it() {
    // Two attendees' clients bring back one deleted meeting under the same successor id: the
    // first creates it; the second's create writes none of its values, makes that user an
    // attendee (so the meeting is in their filter) and says so.
    let mut store = store();
    let first = store.register_client(user(0), "A", SubscriptionType::Outlook).unwrap();
    let second = store.register_client(user(1), "B", SubscriptionType::Outlook).unwrap();
    let meeting = |subject| Record { goid: Some(goid(7)), ..Record::new(f(&[("subject", subject)])) };
    let v = store.create_record(first, id(7), Appointment, &meeting("Review")).unwrap();
    match store.create_record(second, id(7), Appointment, &meeting("Review!")) {
        Err(ServerError::MeetingJoined { crm_id, version }) => {
            assert_eq!(crm_id, id(7));
            assert!(version > v, "adding the attendee is a change");
        }
        other => panic!("expected MeetingJoined, got {other:?}"),
    }
    let now = store.record(id(7)).unwrap().unwrap();
    assert_eq!((now.owner, now.fields.get("subject")), (user(0), Some("Review")));
    assert_eq!(now.attendees, [user(1)]);
    assert!(now.is_in_filter_of(user(1)));
    // Joining again adds nothing; a contact (no meeting to join) is still a conflict.
    assert!(matches!(
        store.create_record(second, id(7), Appointment, &meeting("Review!")),
        Err(ServerError::MeetingJoined { version, .. }) if version == now.version
    ));
    store.create_record(first, id(8), Contact, &Record::new(f(&[("fullname", "Alice")]))).unwrap();
    assert!(matches!(
        store.create_record(second, id(8), Contact, &Record::new(f(&[("fullname", "Bob")]))),
        Err(ServerError::CreateConflict { .. })
    ));
}

#[test]
fn bad_arguments_are_typed_errors() {
    let mut store = store();
    let stranger = SystemUserId::new(Uuid::from_u128(0xdead)).unwrap();
    assert!(
        matches!(store.register_client(stranger, "PC", SubscriptionType::Outlook), Err(ServerError::UnknownUser(u)) if u == stranger)
    );
    assert!(matches!(
        store.register_client(user(0), "", SubscriptionType::Outlook),
        Err(ServerError::BadMachineName(_))
    ));
    let sub = store.register_client(user(0), "PC", SubscriptionType::Outlook).unwrap();
    assert!(matches!(store.get_sync_data(sub, None, 0), Err(ServerError::PageSize(0))));
    store.unregister_client(sub).unwrap();
    assert!(matches!(store.prepare_sync(sub), Err(ServerError::UnknownSubscription(s)) if s == sub));
}

#[test]
fn a_file_that_is_not_a_server_store_is_refused_and_left_untouched() {
    let dir = std::env::temp_dir().join(format!("crmsync-server-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let clock = || Box::new(ManualClock::new(DateTime::<Utc>::UNIX_EPOCH)) as Box<dyn crmsync::clock::Clock>;

    let text = dir.join("notes.txt");
    std::fs::write(&text, b"not a database at all, just some text that is long enough").unwrap();
    let before = std::fs::read(&text).unwrap();
    assert!(matches!(ServerStore::open(&text, clock()), Err(OpenError::Sqlite { .. })));
    assert_eq!(std::fs::read(&text).unwrap(), before);

    let other = dir.join("other.db");
    {
        let conn = rusqlite::Connection::open(&other).unwrap();
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);").unwrap();
    }
    let before = std::fs::read(&other).unwrap();
    assert!(matches!(ServerStore::open(&other, clock()), Err(OpenError::NotAServerStore { found: 0, .. })));
    assert_eq!(std::fs::read(&other).unwrap(), before);

    let newer = dir.join("newer.db");
    drop(ServerStore::open(&newer, clock()).unwrap());
    {
        let conn = rusqlite::Connection::open(&newer).unwrap();
        conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
        conn.pragma_update(None, "user_version", SERVER_SCHEMA_VERSION + 1).unwrap();
    }
    let before = std::fs::read(&newer).unwrap();
    assert!(
        matches!(ServerStore::open(&newer, clock()), Err(OpenError::NewerSchema { found, .. }) if found == SERVER_SCHEMA_VERSION + 1)
    );
    assert_eq!(std::fs::read(&newer).unwrap(), before);

    // Opening an existing store never creates one.
    let missing = dir.join("missing.db");
    assert!(matches!(ServerStore::open_existing(&missing, clock()), Err(OpenError::Sqlite { .. })));
    assert!(!missing.exists());

    // And a store reopens with its data.
    let path = dir.join("server.db");
    {
        let mut s = ServerStore::open(&path, clock()).unwrap();
        s.add_user(user(0), "User 0").unwrap();
        s.put_record(&record(1, 0, Contact, &[("fullname", "Alice")], &[])).unwrap();
    }
    let s = ServerStore::open(&path, clock()).unwrap();
    assert_eq!(s.record(id(1)).unwrap().unwrap().fields, f(&[("fullname", "Alice")]));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn prepare_sync_summary_of_a_first_sync() {
    let mut store = store();
    store.put_record(&record(1, 0, Contact, &[("fullname", "Alice")], &[])).unwrap();
    store.put_record(&record(2, 0, Task, &[("subject", "Call back")], &[])).unwrap();
    store.put_record(&record(3, 1, Appointment, &[("subject", "Review")], &[0, 2])).unwrap();
    store.put_record(&record(4, 1, Appointment, &[("subject", "Not invited")], &[2])).unwrap();
    store.put_record(&record(5, 2, Contact, &[("fullname", "Someone else's")], &[])).unwrap();
    let sub = store.register_client(user(0), "LAPTOP", SubscriptionType::Outlook).unwrap();
    let summary = store.prepare_sync(sub).unwrap();
    assert_eq!(summary.total(), Counts { create: 3, update: 0, delete: 0 });
    snapshot!("server_prepare_sync_first_sync", summary.to_xml());
    // The attended meeting comes to the attendee with the attendee's role.
    let page = store.get_sync_data(sub, None, 10).unwrap();
    let roles: Vec<Role> = page.changes.iter().filter_map(|c| c.record()).map(|r| r.role).collect();
    assert_eq!(roles, [Role::Owner, Role::Owner, Role::Attendee]);
}

/// Found by the simulator (`crmsync-sim run --seed 1 --faults network-before-call`): a record a
/// client created, deleted in CRM before that client's next prepare, must still reach the client
/// as a delete; the server used to know only what it had handed out.
#[test]
fn a_delete_of_a_record_the_client_created_reaches_that_client() {
    let mut store = store();
    let sub = store.register_client(user(0), "LAPTOP", SubscriptionType::Outlook).unwrap();
    store.create_record(sub, id(9), Contact, &Record::new(f(&[("fullname", "Alice")]))).unwrap();
    store.delete_record(id(9)).unwrap();
    let summary = store.prepare_sync(sub).unwrap();
    assert_eq!(summary.counts(Contact).delete, 1, "{summary:?}");
}
