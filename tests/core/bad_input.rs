//! Every typed error of the core, checked with the value it carries. (Ids, fields, entity codes
//! and change construction are covered next to their types in `src/`.)

use crmsync::ObjectTypeCode::{Appointment, Contact, Email, ServiceAppointment, Task};
use crmsync::fields::{FIELD_COUNT_MAX, FIELD_NAME_LEN_MAX};
use crmsync::*;

use crate::support::*;

fn entry(id: u64, change: Change) -> QueueEntry {
    QueueEntry { id: QueueId(id), change, attempts: 0, last_error: None }
}

fn crm(n: u128, otc: ObjectTypeCode, version: u64, op: ChangeOp) -> Change {
    Change::crm(id(n), otc, VersionNumber(version), op).unwrap()
}

fn rejected(world: &World) -> Vec<RecordError> {
    world
        .plan()
        .unwrap()
        .actions
        .into_iter()
        .filter_map(|a| match a.op {
            ActionOp::Reject { error } => Some(error),
            _ => None,
        })
        .collect()
}

#[test]
fn coalesce_refuses_a_change_after_a_delete() {
    let del = entry(1, crm(1, Contact, 5, ChangeOp::Delete(DeleteReason::Deleted)));
    let upd = entry(2, crm(1, Contact, 6, ChangeOp::Update(rec(&[("a", "1")]))));
    assert_eq!(
        coalesce(&[&del, &upd]),
        Err(CoalesceError::ChangeAfterDelete {
            key: RecordKey::Crm(id(1)),
            delete: QueueId(1),
            after: QueueId(2)
        })
    );
    // The same delete delivered twice is not "after" it.
    let again = entry(3, crm(1, Contact, 5, ChangeOp::Delete(DeleteReason::Deleted)));
    assert_eq!(coalesce(&[&del, &again]).unwrap().net, Net::Delete(DeleteReason::Deleted));
}

#[test]
fn coalesce_refuses_one_key_with_two_entity_types() {
    let a = entry(1, crm(1, Contact, 5, ChangeOp::Create(rec(&[("a", "1")]))));
    let b = entry(2, crm(1, Task, 6, ChangeOp::Update(rec(&[("a", "2")]))));
    assert_eq!(
        coalesce(&[&a, &b]),
        Err(CoalesceError::TypeMismatch {
            key: RecordKey::Crm(id(1)),
            first: Contact,
            first_id: QueueId(1),
            second: Task,
            second_id: QueueId(2)
        })
    );
}

/// Found by crmsync-sim (seed 209): a record that left the filter and was then deleted came
/// as two deletes, refused as "a change after a delete" forever. Leaving the filter does not
/// end a CrmId; a real delete still does.
#[test]
fn changes_after_leaving_the_filter_fold() {
    let left = entry(1, crm(1, Contact, 5, ChangeOp::Delete(DeleteReason::LeftFilter)));
    let deleted = entry(2, crm(1, Contact, 6, ChangeOp::Delete(DeleteReason::Deleted)));
    let back = entry(3, crm(1, Contact, 6, ChangeOp::Create(rec(&[("a", "2")]))));
    assert!(matches!(coalesce(&[&left, &deleted]).unwrap().net, Net::Delete(DeleteReason::Deleted)));
    assert!(matches!(coalesce(&[&left, &back]).unwrap().net, Net::Update(_)));
    let after = entry(4, crm(1, Contact, 7, ChangeOp::Update(rec(&[("a", "3")]))));
    assert!(matches!(coalesce(&[&deleted, &after]), Err(CoalesceError::ChangeAfterDelete { .. })));
}

/// Found by crmsync-sim (seed 93): one CRM version handed out as an update, then (its
/// acknowledge lost, the cache reconciled) as a create, is one change, not two contents.
#[test]
fn one_version_as_a_create_and_as_an_update_folds_once() {
    let a = entry(1, crm(1, Contact, 5, ChangeOp::Update(rec(&[("a", "1")]))));
    let b = entry(2, crm(1, Contact, 5, ChangeOp::Create(rec(&[("a", "1")]))));
    let folded = coalesce(&[&a, &b]).unwrap();
    assert_eq!(folded.consumed, vec![a.id, b.id]);
    assert!(matches!(folded.net, Net::Update(r) if r.fields == rec(&[("a", "1")]).fields));
}

#[test]
fn coalesce_refuses_two_contents_for_one_version() {
    let a = entry(1, crm(1, Contact, 5, ChangeOp::Update(rec(&[("a", "1")]))));
    let b = entry(2, crm(1, Contact, 5, ChangeOp::Update(rec(&[("a", "2")]))));
    assert_eq!(
        coalesce(&[&a, &b]),
        Err(CoalesceError::ConflictingDuplicate {
            key: RecordKey::Crm(id(1)),
            version: VersionNumber(5),
            first_id: QueueId(1),
            second_id: QueueId(2)
        })
    );
}

#[test]
fn coalesce_refuses_mixed_keys_and_nothing() {
    let a = entry(1, crm(1, Contact, 5, ChangeOp::Update(rec(&[("a", "1")]))));
    let b = entry(2, crm(2, Contact, 6, ChangeOp::Update(rec(&[("a", "1")]))));
    assert_eq!(
        coalesce(&[&a, &b]),
        Err(CoalesceError::MixedKeys { first: RecordKey::Crm(id(1)), second: RecordKey::Crm(id(2)) })
    );
    assert_eq!(coalesce(&[]), Err(CoalesceError::Empty));
}

#[test]
fn queue_refuses_overflow_and_duplicate_ids() {
    let mut queue = Queue::with_len_max(1);
    let change = crm(1, Contact, 5, ChangeOp::Delete(DeleteReason::Deleted));
    assert_eq!(queue.push(change.clone()), Ok(QueueId(0)));
    assert_eq!(queue.push(change.clone()), Err(QueueError::Full(1)));
    let mut queue = Queue::new();
    queue.insert(entry(7, change.clone())).unwrap();
    assert_eq!(queue.insert(entry(7, change.clone())), Err(QueueError::DuplicateId(QueueId(7))));
    // The next pushed id is past every inserted one.
    assert_eq!(queue.push(change), Ok(QueueId(8)));
    // A serialised queue with a repeated id is refused on load.
    let json =
        serde_json::to_string(&vec![
            entry(1, crm(1, Contact, 5, ChangeOp::Delete(DeleteReason::Deleted)));
            2
        ])
        .unwrap();
    let err = serde_json::from_str::<Queue>(&json).unwrap_err();
    assert!(err.to_string().contains("queue id #1 is already taken"), "{err}");
}

#[test]
fn mapping_refuses_anything_that_breaks_the_bijection() {
    let world = World::new().map(1, "E1", Appointment, &[]);
    let mut mapping = world.mapping;
    let base = mapping.get(id(1)).unwrap().clone();
    let same_crm = MappingEntry { entry_id: e("E2"), goid: None, ..base.clone() };
    assert_eq!(mapping.insert(same_crm), Err(MappingError::CrmIdTaken { crm_id: id(1), entry_id: e("E1") }));
    let same_entry = MappingEntry { crm_id: id(2), goid: None, ..base.clone() };
    assert_eq!(
        mapping.insert(same_entry),
        Err(MappingError::EntryIdTaken { entry_id: e("E1"), crm_id: id(1) })
    );
    let same_goid = MappingEntry { crm_id: id(3), entry_id: e("E3"), ..base.clone() };
    assert_eq!(mapping.insert(same_goid), Err(MappingError::GoidTaken { goid: goid(1), crm_id: id(1) }));
    assert_eq!(mapping.len(), 1);
    mapping.check_invariants().unwrap();
    // The same check runs when a mapping is loaded.
    let json = serde_json::to_string(&vec![base.clone(), MappingEntry { crm_id: id(2), goid: None, ..base }])
        .unwrap();
    assert!(serde_json::from_str::<Mapping>(&json).unwrap_err().to_string().contains("already mapped"));
}

#[test]
fn plan_rejects_invalid_sequences_per_record_with_the_values() {
    let world = World::new()
        .crm(1, Contact, 5, ChangeOp::Delete(DeleteReason::Deleted))
        .crm(1, Contact, 6, ChangeOp::Update(rec(&[("a", "1")])))
        .crm(2, Contact, 7, ChangeOp::Create(rec(&[("a", "1")])));
    assert_eq!(
        rejected(&world),
        [RecordError::Coalesce(CoalesceError::ChangeAfterDelete {
            key: RecordKey::Crm(id(1)),
            delete: QueueId(0),
            after: QueueId(1)
        })]
    );
    // The valid record still plans.
    assert_eq!(world.plan().unwrap().actions.len(), 2);
}

#[test]
fn plan_rejects_unsynchronised_and_one_way_entities() {
    let world = World::new().crm(1, Email, 5, ChangeOp::Create(rec(&[("subject", "hi")]))).outlook(
        "E2",
        ServiceAppointment,
        1,
        ChangeOp::Create(orec(2, &[("subject", "x")])),
    );
    assert_eq!(
        rejected(&world),
        [
            RecordError::NotSynchronised { key: RecordKey::Crm(id(1)), object_type: Email },
            RecordError::OneWayEntity { key: RecordKey::Outlook(e("E2")), object_type: ServiceAppointment },
        ]
    );
}

#[test]
fn plan_rejects_two_entity_types_across_sides() {
    let world = World::new().map(1, "E1", Contact, &[("a", "1")]).outlook(
        "E1",
        Task,
        1,
        ChangeOp::Update(rec(&[("a", "2")])),
    );
    assert_eq!(
        rejected(&world),
        [RecordError::TypeMismatch { key: RecordKey::Outlook(e("E1")), crm: Contact, outlook: Task }]
    );
}

#[test]
fn plan_rejects_a_second_copy_of_a_meeting() {
    let world = World::new()
        .map(1, "E1", Appointment, &[("subject", "s")]) // holds goid(1)
        .crm(2, Appointment, 5, ChangeOp::Create(meeting(1, Role::Attendee, &[("subject", "s")])))
        .crm(3, Appointment, 6, ChangeOp::Create(meeting(9, Role::Attendee, &[("subject", "t")])))
        .crm(4, Appointment, 7, ChangeOp::Create(meeting(9, Role::Attendee, &[("subject", "t")])));
    assert_eq!(
        rejected(&world),
        [
            RecordError::DuplicateGoid { key: RecordKey::Crm(id(2)), goid: goid(1), holder: id(1) },
            RecordError::DuplicateGoid { key: RecordKey::Crm(id(4)), goid: goid(9), holder: id(3) },
        ]
    );
}

#[test]
fn a_meeting_goes_to_the_first_record_in_key_order_whatever_runs_first() {
    // Record 4 runs first (an older version), but claims are settled in key order: record 3
    // keeps the meeting, as it does when it also runs first (above).
    let world = World::new()
        .crm(3, Appointment, 7, ChangeOp::Create(meeting(9, Role::Attendee, &[("subject", "t")])))
        .crm(4, Appointment, 6, ChangeOp::Create(meeting(9, Role::Attendee, &[("subject", "t")])));
    let plan = world.plan().unwrap();
    let keys: Vec<&RecordKey> = plan.actions.iter().map(|a| &a.order.key).collect();
    assert_eq!(keys, [&RecordKey::Crm(id(4)), &RecordKey::Crm(id(3))]);
    assert_eq!(
        rejected(&world),
        [RecordError::DuplicateGoid { key: RecordKey::Crm(id(4)), goid: goid(9), holder: id(3) }]
    );
}

#[test]
fn plan_rejects_a_copied_stamp_and_a_missing_id() {
    let world = World::new()
        .map(1, "E1", Contact, &[("a", "1")])
        .outlook("E2", Contact, 1, ChangeOp::Create(orec(1, &[("a", "1")])))
        .outlook("E3", Contact, 2, ChangeOp::Update(rec(&[("a", "1")])));
    assert_eq!(
        rejected(&world),
        [
            RecordError::StampTaken { entry_id: e("E2"), crm_id: id(1), holder: e("E1") },
            RecordError::MissingCrmId { entry_id: e("E3") },
        ]
    );
}

#[test]
fn a_rejected_record_stays_queued_with_its_error_and_can_be_ignored() {
    let world = World::new().crm(1, Email, 5, ChangeOp::Create(rec(&[("subject", "hi")])));
    let plan = world.plan().unwrap();
    let action = &plan.actions[0];
    let state = SyncState { queue: world.queue.clone(), mapping: world.mapping.clone(), ignored: vec![] };
    // Even a success reported for it cannot remove it.
    let kept = settle(state.clone(), action, Outcome::Applied(Applied::default()));
    let entry = kept.queue.get(QueueId(0)).unwrap();
    assert_eq!(entry.attempts, 1);
    assert!(entry.last_error.as_deref().unwrap().contains("email is tracked, not synchronised"));
    let error = ItemError::new(ItemErrorKind::Invalid, "email");
    let ignored = settle(state, action, Outcome::FailedIgnored(error));
    assert!(ignored.queue.is_empty());
    assert_eq!(ignored.ignored.len(), 1);
    assert_eq!(ignored.ignored[0].entry.id, QueueId(0));
}

#[test]
fn ignored_errors_are_listed_in_queue_order_whatever_order_they_failed_in() {
    // As the cache's IgnoredErrors table lists them: a state kept in memory after a run and
    // the state read back from the file must agree.
    let world = World::new()
        .crm(1, Contact, 5, ChangeOp::Create(rec(&[("a", "1")])))
        .crm(2, Contact, 6, ChangeOp::Create(rec(&[("a", "2")])))
        .crm(3, Contact, 7, ChangeOp::Create(rec(&[("a", "3")])));
    let plan = world.plan().unwrap();
    let mut state = SyncState { queue: world.queue.clone(), mapping: world.mapping.clone(), ignored: vec![] };
    for i in [2, 0, 1] {
        let error = ItemError::new(ItemErrorKind::Locked, format!("locked {i}"));
        state = settle(state, &plan.actions[i], Outcome::FailedIgnored(error));
    }
    let ids: Vec<QueueId> = state.ignored.iter().map(|i| i.entry.id).collect();
    assert_eq!(ids, [QueueId(0), QueueId(1), QueueId(2)]);
}

#[test]
fn a_success_without_the_created_item_is_kept_as_a_failure() {
    let world = World::new().crm(1, Contact, 5, ChangeOp::Create(rec(&[("a", "1")])));
    let plan = world.plan().unwrap();
    let state = SyncState { queue: world.queue.clone(), mapping: world.mapping.clone(), ignored: vec![] };
    let after = settle(state, &plan.actions[0], Outcome::Applied(Applied::default()));
    assert!(after.mapping.is_empty());
    let entry = after.queue.get(QueueId(0)).unwrap();
    assert!(entry.last_error.as_deref().unwrap().contains("without the Outlook item's EntryId"));
}

// Regressions found by the property tests (minimal cases as proptest shrank them).

#[test]
fn an_item_edited_before_its_first_sync_keeps_its_chosen_id() {
    let world = World::new().outlook("E0", Contact, 1, ChangeOp::Create(orec(100, &[("a", "1")]))).outlook(
        "E0",
        Contact,
        2,
        ChangeOp::Update(rec(&[("a", "2")])),
    );
    let plan = world.plan().unwrap();
    let [action] = &plan.actions[..] else { panic!("one action") };
    assert!(matches!(&action.op, ActionOp::CreateInCrm { crm_id, fields, .. }
        if *crm_id == id(100) && fields.get("a") == Some("2")));
}

#[test]
fn two_items_stamped_with_one_id_get_one_record() {
    let world = World::new().outlook("E2", Contact, 1, ChangeOp::Create(orec(381, &[("a", "1")]))).outlook(
        "E1",
        Contact,
        2,
        ChangeOp::Create(orec(381, &[("a", "1")])),
    );
    let plan = world.plan().unwrap();
    let creates = plan.actions.iter().filter(|a| matches!(a.op, ActionOp::CreateInCrm { .. })).count();
    assert_eq!(creates, 1);
    assert_eq!(rejected(&world), [RecordError::StampInUse { entry_id: e("E2"), crm_id: id(381) }]);
}

#[test]
fn a_stamp_joined_record_is_not_created_again_for_a_copy() {
    let world = World::new()
        .crm(137, Contact, 5, ChangeOp::Create(rec(&[("a", "1")])))
        .outlook("E137", Contact, 1, ChangeOp::Create(orec(137, &[("a", "1")])))
        .outlook("E000", Contact, 2, ChangeOp::Create(orec(137, &[("a", "1")])));
    let plan = world.plan().unwrap();
    assert_eq!(plan.actions.iter().filter(|a| a.row == DecisionRow::BothCreatedLinked).count(), 1);
    assert!(!plan.actions.iter().any(|a| matches!(a.op, ActionOp::CreateInCrm { .. })));
    assert_eq!(rejected(&world).len(), 1);
}

#[test]
fn a_goid_join_never_takes_the_record_another_item_is_stamped_with() {
    let world = World::new()
        .outlook(
            "E0",
            Appointment,
            1,
            ChangeOp::Create(Record { crm_id: Some(id(50)), ..meeting(3, Role::Owner, &[]) }),
        )
        .crm(1, Appointment, 5, ChangeOp::Create(meeting(3, Role::Owner, &[])))
        .outlook(
            "E1",
            Appointment,
            2,
            ChangeOp::Create(Record { crm_id: Some(id(1)), ..meeting(3, Role::Owner, &[]) }),
        );
    let plan = world.plan().unwrap();
    let linked: Vec<_> = plan
        .actions
        .iter()
        .filter_map(|a| match (&a.row, &a.link) {
            (DecisionRow::BothCreatedLinked, LinkChange::Link(l)) => Some((l.crm_id, l.entry_id.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(linked, [(id(1), Some(e("E1")))]);
    assert_eq!(
        rejected(&world),
        [RecordError::DuplicateGoid { key: RecordKey::Outlook(e("E0")), goid: goid(3), holder: id(1) }]
    );
}

#[test]
fn plan_rejects_a_merge_past_the_field_limit() {
    let many = |prefix: &str| -> Vec<(String, String)> {
        (0..100).map(|i| (format!("{prefix}{i:03}"), "x".into())).collect()
    };
    let record = |pairs: Vec<(String, String)>| Record::new(Fields::try_from_pairs(pairs).unwrap());
    let world = World::new()
        .map(1, "E1", Contact, &[])
        .crm(1, Contact, 11, ChangeOp::Update(record(many("a"))))
        .outlook("E1", Contact, 1, ChangeOp::Update(record(many("b"))));
    assert_eq!(
        rejected(&world),
        [RecordError::Fields { key: RecordKey::Crm(id(1)), error: FieldsError::TooMany(200) }]
    );
}

#[test]
fn an_item_keeps_the_first_id_chosen_for_it_when_a_later_change_carries_another() {
    // A create under id 100 may have reached the server before a crash; the item's next change
    // was queued with a freshly chosen id 200. Creating under 200 would make a second record.
    let world = World::new().outlook("E0", Contact, 1, ChangeOp::Create(orec(100, &[("a", "1")]))).outlook(
        "E0",
        Contact,
        2,
        ChangeOp::Update(orec(200, &[("a", "2")])),
    );
    let plan = world.plan().unwrap();
    assert!(matches!(&plan.actions[0].op, ActionOp::CreateInCrm { crm_id, .. } if *crm_id == id(100)));
}

#[test]
fn fields_read_from_json_refuse_a_name_given_twice_and_every_limit() {
    let read = |json: &str| serde_json::from_str::<Fields>(json).map_err(|e| e.to_string());
    // Escaped and plain strings read alike.
    let fields = read(r#"{"b":"two","a":"line\none"}"#).unwrap();
    assert_eq!(fields, Fields::try_from_pairs([("a", "line\none"), ("b", "two")]).unwrap());
    // A name given twice is refused, naming it, rather than resolved to either value.
    let twice = read(r#"{"a":"1","a":"2"}"#).unwrap_err();
    assert!(twice.contains(r#"field "a" is given twice"#), "{twice}");
    assert!(read(r#"{"":"x"}"#).unwrap_err().contains("must not be empty"));
    let long_name = format!(r#"{{"{}":"x"}}"#, "n".repeat(FIELD_NAME_LEN_MAX + 1));
    assert!(read(&long_name).unwrap_err().contains("longer than"));
    let many: Vec<String> = (0..=FIELD_COUNT_MAX).map(|i| format!(r#""f{i:03}":"x""#)).collect();
    let too_many = read(&format!("{{{}}}", many.join(","))).unwrap_err();
    assert!(too_many.contains(&format!("{} fields, more than", FIELD_COUNT_MAX + 1)), "{too_many}");
    // Not a map, or a value that is not a string: a clear error, no panic.
    assert!(read(r#"["a","b"]"#).unwrap_err().contains("a map of field name to value"));
    assert!(read(r#"{"a":1}"#).is_err());
}
