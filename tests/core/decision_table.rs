//! One named test per row of DOMAIN's decision table (section 5), and per documented policy row,
//! each checking the plan against a snapshot of input and plan in `snapshots/` and asserting the
//! decisive part of it directly.

use crmsync::ObjectTypeCode::{Appointment, Contact, Email, PhoneCall, ServiceAppointment, Task};
use crmsync::*;

use crate::snapshot;
use crate::support::*;

fn ops(world: &World) -> Vec<ActionOp> {
    world.plan().expect("plan").actions.into_iter().map(|a| a.op).collect()
}

fn rows(world: &World) -> Vec<DecisionRow> {
    world.plan().expect("plan").actions.into_iter().map(|a| a.row).collect()
}

const ALICE: &[(&str, &str)] = &[("fullname", "Alice"), ("telephone1", "100")];

#[test]
fn row_crm_create_unmapped_creates_in_outlook_after_goid_search() {
    let world = World::new().crm(1, Contact, 11, ChangeOp::Create(rec(ALICE))).crm(
        2,
        Appointment,
        12,
        ChangeOp::Create(meeting(7, Role::Attendee, &[("subject", "Review")])),
    );
    let plan = world.plan().unwrap();
    assert!(
        matches!(&plan.actions[0].op, ActionOp::CreateInOutlook { crm_id, goid_search: None, .. } if *crm_id == id(1))
    );
    assert!(
        matches!(&plan.actions[1].op, ActionOp::CreateInOutlook { goid_search: Some(g), .. } if *g == goid(7))
    );
    assert!(plan.actions.iter().all(|a| a.row == DecisionRow::CrmChangeUnmapped));
    snapshot!("row01_crm_create_unmapped", world.render());
}

#[test]
fn row_crm_update_mapped_updates_outlook() {
    let world = World::new().map(1, "E1", Contact, ALICE).crm(
        1,
        Contact,
        11,
        ChangeOp::Update(rec(&[("fullname", "Alice"), ("telephone1", "200")])),
    );
    let [ActionOp::Update { to_crm, to_outlook, .. }] = &ops(&world)[..] else { panic!("one update") };
    assert!(to_crm.is_empty());
    assert_eq!(to_outlook.iter().collect::<Vec<_>>(), [("telephone1", Some("200"))]);
    snapshot!("row02_crm_update_mapped", world.render());
}

#[test]
fn row_crm_delete_mapped_follows_crm_delete_policy() {
    use ActivityStatus::*;
    let world = World::new()
        .map_as(1, "E1", Contact, ALICE, Role::Owner, Open)
        .map_as(2, "E2", Contact, ALICE, Role::Other, Open)
        .map_as(3, "E3", Appointment, &[("subject", "a")], Role::Organizer, Open)
        .map_as(4, "E4", Appointment, &[("subject", "b")], Role::Owner, Completed)
        .map_as(5, "E5", Task, &[("subject", "c")], Role::Owner, Open)
        .map_as(6, "E6", PhoneCall, &[("subject", "d")], Role::Owner, Cancelled)
        .map_as(7, "E7", Appointment, &[("subject", "e")], Role::Attendee, Open)
        .crm(1, Contact, 11, ChangeOp::Delete(DeleteReason::Deleted))
        .crm(2, Contact, 12, ChangeOp::Delete(DeleteReason::LeftFilter))
        .crm(3, Appointment, 13, ChangeOp::Delete(DeleteReason::Deleted))
        .crm(4, Appointment, 14, ChangeOp::Delete(DeleteReason::Deleted))
        .crm(5, Task, 15, ChangeOp::Delete(DeleteReason::Deleted))
        .crm(6, PhoneCall, 16, ChangeOp::Delete(DeleteReason::Deleted))
        .crm(7, Appointment, 17, ChangeOp::Delete(DeleteReason::LeftFilter))
        .with(deletes_confirmed());
    let deleted: Vec<bool> =
        ops(&world).iter().map(|op| matches!(op, ActionOp::DeleteInOutlook { .. })).collect();
    // owner's contact stays; another user's contact goes; current organised meeting goes;
    // completed meeting stays; current task goes; cancelled call stays; attendee's meeting stays.
    assert_eq!(deleted, [false, true, true, false, true, false, false]);
    assert!(rows(&world).iter().all(|r| *r == DecisionRow::CrmDeleteMapped));
    snapshot!("row03_crm_delete_mapped", world.render());
}

#[test]
fn row_crm_delete_unmapped_is_dropped_without_error() {
    let world = World::new().crm(1, Contact, 11, ChangeOp::Delete(DeleteReason::Deleted));
    assert_eq!(ops(&world), [ActionOp::Drop { why: DropReason::NotHeld }]);
    assert_eq!(rows(&world), [DecisionRow::CrmDeleteUnmapped]);
    snapshot!("row04_crm_delete_unmapped", world.render());
}

#[test]
fn row_outlook_create_unmapped_creates_in_crm_with_the_chosen_id() {
    let world = World::new().outlook("E1", Contact, 1, ChangeOp::Create(orec(9, ALICE)));
    let [ActionOp::CreateInCrm { crm_id, entry_id, fields, .. }] = &ops(&world)[..] else {
        panic!("one create")
    };
    assert_eq!((*crm_id, entry_id.as_str(), fields), (id(9), "E1", &f(ALICE)));
    snapshot!("row05_outlook_create_unmapped", world.render());
}

#[test]
fn row_outlook_update_mapped_updates_crm() {
    let world = World::new().map(1, "E1", Contact, ALICE).outlook(
        "E1",
        Contact,
        1,
        ChangeOp::Update(rec(&[("fullname", "Alice B"), ("telephone1", "100")])),
    );
    let [ActionOp::Update { to_crm, to_outlook, .. }] = &ops(&world)[..] else { panic!("one update") };
    assert_eq!(to_crm.iter().collect::<Vec<_>>(), [("fullname", Some("Alice B"))]);
    assert!(to_outlook.is_empty());
    snapshot!("row06_outlook_update_mapped", world.render());
}

#[test]
fn row_outlook_delete_mapped_follows_outlook_delete_policy() {
    use ActivityStatus::*;
    let world = World::new()
        .map_as(1, "E1", Contact, ALICE, Role::Owner, Open)
        .map_as(2, "E2", Appointment, &[("subject", "a")], Role::Organizer, Open)
        .map_as(3, "E3", Appointment, &[("subject", "b")], Role::Attendee, Open)
        .map_as(4, "E4", Task, &[("subject", "c")], Role::Owner, Open)
        .map_as(5, "E5", Task, &[("subject", "d")], Role::Owner, Completed)
        .map_as(6, "E6", ServiceAppointment, &[("subject", "e")], Role::Owner, Open)
        .outlook("E1", Contact, 1, ChangeOp::Delete(DeleteReason::Deleted))
        .outlook("E2", Appointment, 2, ChangeOp::Delete(DeleteReason::Deleted))
        .outlook("E3", Appointment, 3, ChangeOp::Delete(DeleteReason::Deleted))
        .outlook("E4", Task, 4, ChangeOp::Delete(DeleteReason::Deleted))
        .outlook("E5", Task, 5, ChangeOp::Delete(DeleteReason::Deleted))
        .outlook("E6", ServiceAppointment, 6, ChangeOp::Delete(DeleteReason::Deleted));
    let deleted: Vec<bool> =
        ops(&world).iter().map(|op| matches!(op, ActionOp::DeleteInCrm { .. })).collect();
    // contact: untrack; organiser's meeting: delete; attendee's: untrack; current task: delete;
    // completed task: untrack; service appointment (CRM -> Outlook only): untrack.
    assert_eq!(deleted, [false, true, false, true, false, false]);
    snapshot!("row07_outlook_delete_mapped", world.render());
}

fn both_updated() -> World {
    World::new()
        .map(1, "E1", Contact, &[("fullname", "Alice"), ("jobtitle", "Dev"), ("telephone1", "100")])
        .crm(
            1,
            Contact,
            11,
            ChangeOp::Update(rec(&[("fullname", "Alice"), ("jobtitle", "Lead"), ("telephone1", "200")])),
        )
        .outlook(
            "E1",
            Contact,
            1,
            ChangeOp::Update(rec(&[("fullname", "Alicia"), ("jobtitle", "Dev"), ("telephone1", "300")])),
        )
}

#[test]
fn row_both_updated_merges_fields_crm_wins_by_default() {
    let world = both_updated();
    let plan = world.plan().unwrap();
    let [action] = &plan.actions[..] else { panic!("one action") };
    assert_eq!(action.row, DecisionRow::BothUpdated);
    assert_eq!(action.conflicts, ["telephone1"]);
    let LinkChange::Link(link) = &action.link else { panic!("link") };
    assert_eq!(link.base, f(&[("fullname", "Alicia"), ("jobtitle", "Lead"), ("telephone1", "200")]));
    snapshot!("row08_both_updated_crm_wins", world.render());
}

#[test]
fn row_both_updated_outlook_wins_when_chosen() {
    let world = both_updated()
        .with(Policies { field_conflict: FieldConflictPolicy::OutlookWins, ..Default::default() });
    let plan = world.plan().unwrap();
    let LinkChange::Link(link) = &plan.actions[0].link else { panic!("link") };
    assert_eq!(link.base.get("telephone1"), Some("300"));
    snapshot!("row08_both_updated_outlook_wins", world.render());
}

fn update_vs_delete() -> World {
    World::new()
        .map(1, "E1", Contact, ALICE)
        .map(2, "E2", Task, &[("subject", "Call back")])
        .map(3, "E3", Contact, ALICE)
        .crm(1, Contact, 11, ChangeOp::Update(rec(&[("fullname", "Alice"), ("telephone1", "200")])))
        .outlook("E1", Contact, 1, ChangeOp::Delete(DeleteReason::Deleted))
        .crm(2, Task, 12, ChangeOp::Delete(DeleteReason::Deleted))
        .outlook("E2", Task, 2, ChangeOp::Update(rec(&[("subject", "Call back today")])))
        .crm(3, Contact, 13, ChangeOp::Delete(DeleteReason::LeftFilter))
        .outlook("E3", Contact, 3, ChangeOp::Update(rec(&[("fullname", "Alice"), ("telephone1", "999")])))
}

#[test]
fn row_update_vs_delete_update_wins_and_nothing_is_lost() {
    let world = update_vs_delete();
    let plan = world.plan().unwrap();
    assert!(plan.actions.iter().all(|a| a.row == DecisionRow::UpdateVsDelete));
    // CRM updated, Outlook deleted: the item comes back, stamped with the same CrmId.
    assert!(matches!(&plan.actions[0].op, ActionOp::CreateInOutlook { crm_id, .. } if *crm_id == id(1)));
    // Outlook updated, CRM deleted: the record comes back under a new id (ids are never reused).
    let ActionOp::CreateInCrm { crm_id, entry_id, .. } = &plan.actions[1].op else {
        panic!("re-create in CRM")
    };
    assert_eq!((*crm_id, entry_id), (id(2).successor(), &e("E2")));
    assert!(matches!(&plan.actions[1].link, LinkChange::Replace { remove, .. } if *remove == id(2)));
    // Outlook updated, record left the filter (still exists in CRM): both stay, untracked.
    assert!(matches!(&plan.actions[2].op, ActionOp::Untrack { .. }));
    snapshot!("row09_update_vs_delete_update_wins", world.render());
}

#[test]
fn update_wins_over_a_crm_delete_with_the_records_last_crm_values() {
    // CRM edited the task (v12) and then deleted it (v13); Outlook edited another field. The
    // record comes back with both edits; the item takes the CRM one. A CRM edit at or below
    // the pair's version (v9: already in the base) brings nothing back.
    let world = World::new()
        .map(2, "E2", Task, &[("subject", "Call back")])
        .crm(2, Task, 12, ChangeOp::Update(rec(&[("subject", "Call back"), ("description", "urgent")])))
        .crm(2, Task, 13, ChangeOp::Delete(DeleteReason::Deleted))
        .outlook("E2", Task, 2, ChangeOp::Update(rec(&[("subject", "Call back today")])))
        .map(3, "E3", Task, &[("subject", "Old")])
        .crm(3, Task, 9, ChangeOp::Update(rec(&[("subject", "Older")])))
        .crm(3, Task, 14, ChangeOp::Delete(DeleteReason::Deleted))
        .outlook("E3", Task, 3, ChangeOp::Update(rec(&[("subject", "New")])));
    let ops = ops(&world);
    let ActionOp::CreateInCrm { fields, to_outlook, .. } = &ops[0] else { panic!("re-create: {ops:?}") };
    assert_eq!(fields, &f(&[("subject", "Call back today"), ("description", "urgent")]));
    assert_eq!(to_outlook.iter().collect::<Vec<_>>(), [("description", Some("urgent"))]);
    let ActionOp::CreateInCrm { fields, to_outlook, .. } = &ops[1] else { panic!("re-create: {ops:?}") };
    assert_eq!(fields, &f(&[("subject", "New")]));
    assert!(to_outlook.is_empty());
    snapshot!("policy_update_wins_with_last_crm_values", world.render());
}

#[test]
fn update_wins_over_a_crm_delete_ignores_an_edit_at_the_pairs_own_version() {
    // The pair agrees with version 10; a page re-delivering version 10 before the delete says
    // nothing the base does not: the record comes back with the item's edit alone.
    let world = World::new()
        .map(4, "E4", Task, &[("subject", "Old")])
        .crm(4, Task, 10, ChangeOp::Update(rec(&[("subject", "Old"), ("description", "stale page")])))
        .crm(4, Task, 15, ChangeOp::Delete(DeleteReason::Deleted))
        .outlook("E4", Task, 4, ChangeOp::Update(rec(&[("subject", "New")])));
    let ops = ops(&world);
    let ActionOp::CreateInCrm { fields, to_outlook, .. } = &ops[0] else { panic!("re-create: {ops:?}") };
    assert_eq!(fields, &f(&[("subject", "New")]));
    assert!(to_outlook.is_empty(), "{to_outlook:?}");
}

#[test]
fn row_update_vs_delete_delete_wins_when_chosen() {
    let world = update_vs_delete()
        .with(Policies { update_vs_delete: UpdateVsDeletePolicy::DeleteWins, ..Default::default() });
    let ops = ops(&world);
    // Contact deleted in Outlook: the contact policy untracks. Task deleted in CRM: deleted in Outlook.
    assert!(matches!(ops[0], ActionOp::Untrack { .. }));
    assert!(matches!(ops[1], ActionOp::DeleteInOutlook { .. }));
    snapshot!("row09_update_vs_delete_delete_wins", world.render());
}

#[test]
fn row_both_deleted_drops_the_mapping_only() {
    let world = World::new()
        .map(1, "E1", Task, &[("subject", "x")])
        .crm(1, Task, 11, ChangeOp::Delete(DeleteReason::Deleted))
        .outlook("E1", Task, 1, ChangeOp::Delete(DeleteReason::Deleted));
    let plan = world.plan().unwrap();
    let [action] = &plan.actions[..] else { panic!("one action") };
    assert_eq!(action.row, DecisionRow::BothDeleted);
    assert!(matches!(action.op, ActionOp::Untrack { .. }));
    assert_eq!(action.link, LinkChange::Remove(id(1)));
    snapshot!("row10_both_deleted", world.render());
}

#[test]
fn row_both_created_same_goid_are_linked_with_merged_fields() {
    let world = World::new()
        .crm(
            1,
            Appointment,
            11,
            ChangeOp::Create(meeting(5, Role::Organizer, &[("subject", "Kick-off"), ("location", "R1")])),
        )
        .outlook(
            "E9",
            Appointment,
            1,
            ChangeOp::Create(Record {
                crm_id: Some(id(77)),
                ..meeting(5, Role::Owner, &[("subject", "Kick-off"), ("location", "R2")])
            }),
        );
    let plan = world.plan().unwrap();
    let [action] = &plan.actions[..] else { panic!("one action: the two creates are one meeting") };
    assert_eq!(action.row, DecisionRow::BothCreatedLinked);
    let LinkChange::Link(link) = &action.link else { panic!("link") };
    assert_eq!((link.crm_id, link.entry_id.clone()), (id(1), Some(e("E9"))));
    assert_eq!(action.conflicts, ["location"]);
    snapshot!("row11_both_created_same_goid", world.render());
}

#[test]
fn policy_outlook_delete_of_untracked_item_is_dropped() {
    let world = World::new().outlook("E1", Contact, 1, ChangeOp::Delete(DeleteReason::Deleted));
    assert_eq!(rows(&world), [DecisionRow::OutlookDeleteUnmapped]);
    snapshot!("policy_outlook_delete_unmapped", world.render());
}

#[test]
fn policy_no_change_echo_stale_and_never_synced_write_nothing() {
    let world = World::new()
        .map(1, "E1", Contact, ALICE)
        .map(2, "E2", Contact, ALICE)
        // echo of the engine's own write: equal to the base
        .crm(1, Contact, 11, ChangeOp::Update(rec(ALICE)))
        .outlook("E1", Contact, 1, ChangeOp::Update(rec(ALICE)))
        // a late page: at or below the version the mapping agrees with
        .crm(2, Contact, 9, ChangeOp::Update(rec(&[("fullname", "Old")])))
        // created and deleted before any sync
        .crm(3, Contact, 12, ChangeOp::Create(rec(ALICE)))
        .crm(3, Contact, 13, ChangeOp::Delete(DeleteReason::Deleted))
        // an Outlook edit of a CRM -> Outlook only entity
        .map(4, "E4", ServiceAppointment, &[("subject", "Repair")])
        .outlook("E4", ServiceAppointment, 2, ChangeOp::Update(rec(&[("subject", "Repair!")])));
    let ops = ops(&world);
    use DropReason::*;
    let whys: Vec<DropReason> =
        ops.iter().map(|op| if let ActionOp::Drop { why } = op { *why } else { panic!("{op:?}") }).collect();
    // In plan order: updates by stamp (CRM versions, then Outlook times), then deletes.
    assert_eq!(whys, [Stale, Echo, OneWayEntity, NeverSynced]);
    snapshot!("policy_no_change", world.render());
}

#[test]
fn a_crm_change_at_the_pairs_own_version_keeps_the_pair() {
    // The pair agrees with version 10; a page re-delivering version 10 (equal to the base or
    // not) is no newer than what the pair holds: dropped, and the pair is left as it is (only a
    // newer echo moves the pair to its version).
    let world = World::new()
        .map(1, "E1", Contact, ALICE)
        .map(2, "E2", Contact, ALICE)
        .crm(1, Contact, 10, ChangeOp::Update(rec(ALICE)))
        .crm(2, Contact, 10, ChangeOp::Update(rec(&[("fullname", "Old")])));
    let plan = world.plan().expect("plan");
    assert_eq!(plan.actions.len(), 2);
    for action in &plan.actions {
        assert!(matches!(action.op, ActionOp::Drop { .. }), "{action}");
        assert_eq!(action.link, LinkChange::Keep, "{action}");
    }
}

#[test]
fn policy_invalid_records_are_rejected_alone() {
    let world = World::new()
        .crm(1, Email, 11, ChangeOp::Create(rec(&[("subject", "hi")])))
        .outlook("E2", ServiceAppointment, 1, ChangeOp::Create(orec(2, &[("subject", "x")])))
        .crm(3, Contact, 12, ChangeOp::Create(rec(ALICE)));
    let plan = world.plan().unwrap();
    let rejected = plan.actions.iter().filter(|a| a.row == DecisionRow::Invalid).count();
    assert_eq!(rejected, 2);
    assert!(plan.actions.iter().any(|a| matches!(a.op, ActionOp::CreateInOutlook { .. })));
    snapshot!("policy_invalid_rejected_alone", world.render());
}

#[test]
fn policy_mass_delete_guard_stops_the_run() {
    let mut world = World::new();
    for n in 1..=12 {
        world = world.map(n, &format!("E{n}"), Task, &[("subject", "s")]);
    }
    for n in 1..=11 {
        world = world.crm(n, Task, 10 + n as u64, ChangeOp::Delete(DeleteReason::Deleted));
    }
    assert_eq!(
        world.plan().unwrap_err(),
        PlanError::MassDelete { side: Side::Outlook, deletes: 11, mapped: 12, percent_max: 50 }
    );
    snapshot!("policy_mass_delete_guard", world.render());
}

/// The guard counts each side's deletes: Outlook deletes of current tasks delete in CRM, and
/// deleting 11 of 12 mapped records there stops the run as surely as in Outlook.
#[test]
fn policy_mass_delete_guard_counts_deletes_in_crm() {
    let mut world = World::new();
    for n in 1..=12 {
        world = world.map(n, &format!("E{n}"), Task, &[("subject", "s")]);
    }
    for n in 1..=11 {
        world = world.outlook(&format!("E{n}"), Task, n, ChangeOp::Delete(DeleteReason::Deleted));
    }
    assert_eq!(
        world.plan().unwrap_err(),
        PlanError::MassDelete { side: Side::Crm, deletes: 11, mapped: 12, percent_max: 50 }
    );
}

/// Run order breaks a tie of kind and stamp by key: two mapped items edited in the same minute
/// run in `EntryId` order, whatever the order of the `CrmId`s they are mapped to.
#[test]
fn run_order_breaks_ties_of_kind_and_stamp_by_key() {
    let world = World::new()
        .map(1, "E2", Task, &[("subject", "a")])
        .map(2, "E1", Task, &[("subject", "b")])
        .outlook("E2", Task, 5, ChangeOp::Update(orec(1, &[("subject", "a2")])))
        .outlook("E1", Task, 5, ChangeOp::Update(orec(2, &[("subject", "b2")])));
    let keys: Vec<RecordKey> = world.plan().unwrap().actions.into_iter().map(|a| a.order.key).collect();
    assert_eq!(keys, [RecordKey::Outlook(e("E1")), RecordKey::Outlook(e("E2"))]);
}
