//! The mailbox edge, in memory and as an SQLite file, held to one behaviour: every test below
//! runs against both (`on_both!`), and a proptest model check drives both and a small reference
//! model with the same random user edits and sync writes. Then the file: refused files left
//! byte-for-byte untouched, and a reopen that keeps items, changes and the EntryId counter.

use std::collections::BTreeMap;
use std::rc::Rc;

use chrono::{DateTime, Duration, Utc};
use crmsync::ObjectTypeCode::{Appointment, Contact, Task};
use crmsync::clock::{Clock, ManualClock};
use crmsync::mailbox::{CHANGES_PAGE_MAX, ENTRY_ID_NUMBER_DIGITS, SyncBase};
use crmsync::*;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

use crate::snapshot;
use crate::support::*;

const PREFIX: &str = "00AB";
const OPEN: ActivityStatus = ActivityStatus::Open;
const START: MailboxCursor = MailboxCursor::START;

fn clock() -> Rc<ManualClock> {
    Rc::new(ManualClock::new(at(0)))
}

fn memory(clock: &Rc<ManualClock>) -> MemoryMailbox {
    MemoryMailbox::new(PREFIX, Box::new(clock.clone())).unwrap()
}

#[cfg(feature = "sqlite")]
fn sqlite(clock: &Rc<ManualClock>) -> SqliteMailbox {
    SqliteMailbox::in_memory(PREFIX, Box::new(clock.clone())).unwrap()
}

/// One test per implementation for each generic test function `name(mailbox, clock)`.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn memory() {
                let clock = super::clock();
                super::$name(super::memory(&clock), &clock);
            }

            #[cfg(feature = "sqlite")]
            #[test]
            fn sqlite() {
                let clock = super::clock();
                super::$name(super::sqlite(&clock), &clock);
            }
        }
    )*};
}

on_both!(
    sync_writes_are_never_reported,
    changes_of_untracked_items_are_not_reported,
    tracking_an_item_reports_it_as_a_create,
    a_delete_of_a_tracked_item_is_reported_without_the_item,
    an_untrack_by_the_sync_hides_the_items_earlier_changes,
    a_sync_delete_is_idempotent,
    find_by_goid_and_by_stamp,
    a_copy_keeps_the_stamp_and_a_sync_never_stamps_twice,
    paging_loses_and_repeats_nothing,
    bad_input_is_a_typed_error_and_changes_nothing,
    entry_ids_are_deterministic_and_never_reused,
    times_come_from_the_mailbox_clock,
    update_and_link_lands_whole_or_not_at_all,
);

fn update_and_link_lands_whole_or_not_at_all<M: Mailbox + UserEdits>(mut mb: M, _: &ManualClock) {
    let seen = mb.head().unwrap();
    let bob = mb.create(stamped(Contact, &[("fullname", "Bob")], 2)).unwrap();
    let carol = mb.create(stamped(Contact, &[("fullname", "Carol")], 3)).unwrap();
    let base = |name: &str, v: u64| SyncBase {
        fields: f(&[("fullname", name)]),
        crm_version: Some(VersionNumber(v)),
        role: Role::Owner,
        pending: None,
    };
    let to_bobby = FieldPatch::between(&f(&[("fullname", "Bob")]), &f(&[("fullname", "Bobby")]));
    // Fields and base together.
    mb.update_and_link(&bob, &to_bobby, id(2), base("Bobby", 7)).unwrap();
    let item = mb.get(&bob).unwrap().unwrap();
    assert_eq!(item.fields, f(&[("fullname", "Bobby")]));
    assert_eq!(item.synced, Some(base("Bobby", 7)));
    assert_eq!(item.stamp(), Some(id(2)));
    // A stamp another item carries: refused, and the fields are not written either.
    let before = mb.get(&bob).unwrap();
    let to_rob = FieldPatch::between(&f(&[("fullname", "Bobby")]), &f(&[("fullname", "Rob")]));
    assert!(matches!(
        mb.update_and_link(&bob, &to_rob, id(3), base("Rob", 8)),
        Err(MailboxError::StampTaken { stamp, entry_id }) if stamp == id(3) && entry_id == carol
    ));
    assert_eq!(mb.get(&bob).unwrap(), before);
    // A patch the item cannot take (a second field at the value limit makes it too large):
    // refused whole, its base not written either.
    let big = "v".repeat(crmsync::fields::FIELD_VALUE_LEN_MAX);
    let dave = mb.create(stamped(Task, &[("a", &big)], 4)).unwrap();
    let dave_before = mb.get(&dave).unwrap();
    let too_large = FieldPatch::between(&f(&[]), &f(&[("b", &big)]));
    assert!(matches!(
        mb.update_and_link(&dave, &too_large, id(4), base("Dave", 9)),
        Err(MailboxError::Fields(FieldsError::TooLarge(_)))
    ));
    assert_eq!(mb.get(&dave).unwrap(), dave_before);
    // An item that is not there.
    assert!(matches!(
        mb.update_and_link(&e("AA0000000000009999"), &to_rob, id(9), base("Rob", 8)),
        Err(MailboxError::NotFound(_))
    ));
    // Like every sync write, nothing is reported.
    mb.flush().unwrap();
    assert_eq!(all(&mb, seen).changes, []);
}

fn stamped(otc: ObjectTypeCode, fields: &[(&str, &str)], crm: u128) -> NewItem {
    let goid = otc.is_calendar().then(|| goid(crm as u8));
    NewItem {
        object_type: otc,
        fields: f(fields),
        goid,
        status: OPEN,
        stamp: id(crm),
        synced: base(f(fields), 1),
    }
}

fn base(fields: Fields, version: u64) -> SyncBase {
    SyncBase { fields, crm_version: Some(VersionNumber(version)), role: Role::Owner, pending: None }
}

fn all(mb: &impl Mailbox, from: MailboxCursor) -> ChangePage {
    mb.changes_since(from, CHANGES_PAGE_MAX).unwrap()
}

fn kinds(page: &ChangePage) -> Vec<(EntryId, ChangeKind)> {
    page.changes.iter().map(|c| (c.entry_id.clone(), c.kind)).collect()
}

/// A short name for an EntryId of `PREFIX`: `#` and its number.
fn short(e: &EntryId) -> String {
    match e.as_str().strip_prefix(PREFIX).and_then(|n| u64::from_str_radix(n, 16).ok()) {
        Some(n) => format!("#{n}"),
        None => e.to_string(),
    }
}

fn sync_writes_are_never_reported<M: Mailbox + UserEdits>(mut mb: M, _: &ManualClock) {
    let alice = mb.user_create(Contact, f(&[("fullname", "Alice")]), None, OPEN).unwrap();
    mb.user_track(&alice).unwrap();
    let page = all(&mb, START);
    assert_eq!(kinds(&page), [(alice.clone(), ChangeKind::Create)]);
    assert_eq!(page.cursor, mb.head().unwrap());
    let seen = page.cursor;

    // Every write through the trait, on a tracked and on a new item.
    let bob = mb.create(stamped(Contact, &[("fullname", "Bob")], 2)).unwrap();
    let to_bobby = FieldPatch::between(&f(&[("fullname", "Bob")]), &f(&[("fullname", "Bobby")]));
    mb.update(&bob, &to_bobby).unwrap();
    mb.set_stamp(&alice, Some(id(1))).unwrap();
    let phone = FieldPatch::between(&f(&[]), &f(&[("phone", "555")]));
    mb.update(&alice, &phone).unwrap();
    mb.set_stamp(&bob, None).unwrap();
    mb.set_stamp(&bob, Some(id(3))).unwrap();
    mb.delete(&bob).unwrap();
    mb.flush().unwrap();
    let page = all(&mb, seen);
    assert_eq!(page.changes, []);
    assert_eq!((page.cursor, page.more), (seen, false));
    assert_eq!(mb.head().unwrap(), seen, "a sync write logs nothing");

    // A user edit after them is reported, with the item as it is now (the sync's writes in it).
    mb.user_update(&alice, f(&[("fullname", "Alice B"), ("phone", "555")])).unwrap();
    let page = all(&mb, seen);
    assert_eq!(kinds(&page), [(alice.clone(), ChangeKind::Update)]);
    let item = page.changes[0].item.clone().unwrap();
    assert_eq!(item.tracking, Tracking::Stamped(id(1)));
    assert_eq!(Some(item), mb.get(&alice).unwrap());
}

fn changes_of_untracked_items_are_not_reported<M: Mailbox + UserEdits>(mut mb: M, _: &ManualClock) {
    let note = mb.user_create(Task, f(&[("subject", "Buy milk")]), None, OPEN).unwrap();
    mb.user_update(&note, f(&[("subject", "Buy oat milk")])).unwrap();
    let copy = mb.user_copy(&note).unwrap();
    mb.user_delete(&note).unwrap();
    mb.user_update(&copy, f(&[("subject", "Buy bread")])).unwrap();
    assert_eq!(mb.head().unwrap(), START);
    assert_eq!(all(&mb, START).changes, []);
    assert_eq!(mb.get(&copy).unwrap().unwrap().tracking, Tracking::Untracked);
}

fn tracking_an_item_reports_it_as_a_create<M: Mailbox + UserEdits>(mut mb: M, _: &ManualClock) {
    let call = mb.user_create(Task, f(&[("subject", "Call")]), None, OPEN).unwrap();
    mb.user_update(&call, f(&[("subject", "Call Bob")])).unwrap();
    mb.user_track(&call).unwrap();
    let page = all(&mb, START);
    assert_eq!(kinds(&page), [(call.clone(), ChangeKind::Create)]);
    let item = page.changes[0].item.as_ref().unwrap();
    assert_eq!((item.tracking, item.fields.get("subject")), (Tracking::Pending, Some("Call Bob")));

    // Tracking a tracked item does nothing; later edits are updates.
    let head = mb.head().unwrap();
    mb.user_track(&call).unwrap();
    assert_eq!(mb.head().unwrap(), head);
    mb.user_update(&call, f(&[("subject", "Call Bob at 3")])).unwrap();
    assert_eq!(kinds(&all(&mb, head)), [(call.clone(), ChangeKind::Update)]);
    // Linking it (the sync's stamp) changes what it is, not what was reported.
    mb.set_stamp(&call, Some(id(9))).unwrap();
    assert_eq!(mb.head().unwrap(), MailboxCursor(head.0 + 1));
}

fn a_delete_of_a_tracked_item_is_reported_without_the_item<M: Mailbox + UserEdits>(
    mut mb: M,
    _: &ManualClock,
) {
    let synced = mb.create(stamped(Appointment, &[("subject", "Review")], 7)).unwrap();
    let pending = mb.user_create(Task, f(&[("subject", "Plan")]), None, OPEN).unwrap();
    mb.user_track(&pending).unwrap();
    mb.user_update(&synced, f(&[("subject", "Review (moved)")])).unwrap();
    mb.user_delete(&synced).unwrap();
    mb.user_delete(&pending).unwrap();
    // The creates and updates of items deleted since are told by their deletes.
    let page = all(&mb, START);
    assert_eq!(kinds(&page), [(synced.clone(), ChangeKind::Delete), (pending.clone(), ChangeKind::Delete)]);
    assert!(page.changes.iter().all(|c| c.item.is_none()));
    assert_eq!(page.changes[0].object_type, Appointment);
    assert_eq!(page.changes[1].object_type, Task);
    assert_eq!(page.cursor, MailboxCursor(4), "hidden changes are passed over, not lost");
}

fn an_untrack_by_the_sync_hides_the_items_earlier_changes<M: Mailbox + UserEdits>(
    mut mb: M,
    _: &ManualClock,
) {
    let c = mb.user_create(Contact, f(&[("fullname", "Carol")]), None, OPEN).unwrap();
    mb.user_track(&c).unwrap();
    mb.user_update(&c, f(&[("fullname", "Carol C")])).unwrap();
    mb.set_stamp(&c, None).unwrap();
    assert_eq!(all(&mb, START).changes, []);
    mb.user_update(&c, f(&[("fullname", "Carol D")])).unwrap();
    assert_eq!(all(&mb, START).changes, [], "an untracked item's edits are not logged");
    // Tracked again: one create, nothing of before.
    mb.user_track(&c).unwrap();
    let page = all(&mb, START);
    assert_eq!(kinds(&page), [(c.clone(), ChangeKind::Create)]);
    assert_eq!(page.changes[0].seq, MailboxCursor(3));
}

fn a_sync_delete_is_idempotent<M: Mailbox + UserEdits>(mut mb: M, _: &ManualClock) {
    let e = mb.create(stamped(Contact, &[("fullname", "Dan")], 4)).unwrap();
    mb.delete(&e).unwrap();
    mb.delete(&e).unwrap();
    mb.delete(&EntryId::new("00AC0001").unwrap()).unwrap();
    mb.flush().unwrap();
    assert_eq!(mb.get(&e).unwrap(), None);
    assert_eq!(mb.find_by_stamp(id(4)).unwrap(), None);
    let missing = |r: Result<(), MailboxError>| matches!(r, Err(MailboxError::NotFound(x)) if x == e);
    assert!(missing(mb.update(&e, &FieldPatch::between(&f(&[]), &f(&[("a", "1")])))));
    assert!(missing(mb.set_stamp(&e, None)));
    assert!(missing(mb.user_delete(&e)));
    assert!(missing(mb.user_track(&e)));
    assert!(missing(mb.user_update(&e, f(&[]))));
    assert!(matches!(mb.user_copy(&e), Err(MailboxError::NotFound(x)) if x == e));
    assert_eq!(mb.all_items().unwrap(), []);
}

fn find_by_goid_and_by_stamp<M: Mailbox + UserEdits>(mut mb: M, _: &ManualClock) {
    let synced = mb.create(stamped(Appointment, &[("subject", "Review")], 1)).unwrap();
    let own = mb.user_create(Appointment, f(&[("subject", "Lunch")]), Some(goid(2)), OPEN).unwrap();
    assert_eq!(mb.find_by_goid(&goid(1)).unwrap(), Some(synced.clone()));
    assert_eq!(mb.find_by_goid(&goid(2)).unwrap(), Some(own.clone()));
    assert_eq!(mb.find_by_goid(&goid(3)).unwrap(), None);
    assert_eq!(mb.find_by_stamp(id(1)).unwrap(), Some(synced.clone()));
    assert_eq!(mb.find_by_stamp(id(2)).unwrap(), None);
    // Linking the user's meeting found by GOID; untracking the other.
    mb.set_stamp(&own, Some(id(2))).unwrap();
    mb.set_stamp(&synced, None).unwrap();
    assert_eq!(mb.find_by_stamp(id(2)).unwrap(), Some(own.clone()));
    assert_eq!(mb.find_by_stamp(id(1)).unwrap(), None);
    assert_eq!(mb.find_by_goid(&goid(1)).unwrap(), Some(synced.clone()), "untracked items keep their GOID");
    mb.delete(&own).unwrap();
    assert_eq!(mb.find_by_stamp(id(2)).unwrap(), None);
    assert_eq!(mb.find_by_goid(&goid(2)).unwrap(), None);
}

fn a_copy_keeps_the_stamp_and_a_sync_never_stamps_twice<M: Mailbox + UserEdits>(mut mb: M, _: &ManualClock) {
    let original = mb.create(stamped(Appointment, &[("subject", "Review")], 5)).unwrap();
    let copy = mb.user_copy(&original).unwrap();
    let (a, b) = (mb.get(&original).unwrap().unwrap(), mb.get(&copy).unwrap().unwrap());
    assert_eq!((b.stamp(), &b.goid, &b.fields), (Some(id(5)), &a.goid, &a.fields));
    // The copy is a user's create of a tracked item: reported, carrying the other item's stamp.
    let page = all(&mb, START);
    assert_eq!(kinds(&page), [(copy.clone(), ChangeKind::Create)]);
    assert_eq!(page.changes[0].item.as_ref().unwrap().stamp(), Some(id(5)));
    // Lookups find the original; a sync never puts the stamp on another item.
    assert_eq!(mb.find_by_stamp(id(5)).unwrap(), Some(original.clone()));
    assert_eq!(mb.find_by_goid(&goid(5)).unwrap(), Some(original.clone()));
    let taken = mb.create(stamped(Appointment, &[("subject", "again")], 5)).unwrap_err();
    assert!(
        matches!(taken, MailboxError::StampTaken { stamp, ref entry_id } if stamp == id(5) && *entry_id == original)
    );
    let other = mb.user_create(Contact, f(&[("fullname", "Eve")]), None, OPEN).unwrap();
    let taken = mb.set_stamp(&other, Some(id(5))).unwrap_err();
    assert!(matches!(taken, MailboxError::StampTaken { ref entry_id, .. } if *entry_id == original));
    mb.set_stamp(&copy, Some(id(5))).unwrap(); // its own stamp again: nothing to do
    mb.delete(&original).unwrap();
    assert_eq!(mb.find_by_stamp(id(5)).unwrap(), Some(copy));
}

fn paging_loses_and_repeats_nothing<M: Mailbox + UserEdits>(mut mb: M, clock: &ManualClock) {
    let mut items = Vec::new();
    for n in 0..10 {
        clock.advance(Duration::minutes(1));
        let e = mb.user_create(Task, f(&[("subject", &format!("t{n}"))]), None, OPEN).unwrap();
        mb.user_track(&e).unwrap();
        items.push(e);
    }
    for (n, e) in items.iter().enumerate() {
        mb.user_update(e, f(&[("subject", &format!("t{n}'"))])).unwrap();
        match n % 4 {
            0 => mb.user_delete(e).unwrap(),
            1 => mb.set_stamp(e, None).unwrap(),
            _ => {}
        }
    }
    let whole = all(&mb, START);
    assert!(!whole.more);
    assert_eq!(whole.cursor, mb.head().unwrap());
    assert_eq!(whole.changes.len(), 3 + 4 * 2, "deleted: their deletes; untracked: nothing; others: 2 each");
    for limit in 1..=7 {
        let (mut cursor, mut got) = (START, Vec::new());
        loop {
            let page = mb.changes_since(cursor, limit).unwrap();
            assert!(page.changes.len() <= limit);
            assert_eq!(page.more, page.changes.len() == limit && got.len() + limit < whole.changes.len());
            got.extend(page.changes);
            cursor = page.cursor;
            if !page.more {
                break;
            }
        }
        assert_eq!(got, whole.changes, "limit {limit}");
        assert_eq!(cursor, whole.cursor);
    }
    assert!(matches!(mb.changes_since(START, 0), Err(MailboxError::PageSize(0))));
    let too_big = CHANGES_PAGE_MAX + 1;
    assert!(matches!(mb.changes_since(START, too_big), Err(MailboxError::PageSize(n)) if n == too_big));
    let ahead = MailboxCursor(whole.cursor.0 + 1);
    assert!(matches!(
        mb.changes_since(ahead, 1),
        Err(MailboxError::CursorAhead { cursor, head }) if cursor == ahead && head == whole.cursor
    ));
}

fn bad_input_is_a_typed_error_and_changes_nothing<M: Mailbox + UserEdits>(mut mb: M, _: &ManualClock) {
    let goid_on =
        |r: Result<EntryId, MailboxError>| matches!(r, Err(MailboxError::GoidOnNonCalendar(Contact)));
    assert!(goid_on(mb.user_create(Contact, f(&[]), Some(goid(1)), OPEN)));
    assert!(goid_on(mb.create(NewItem { goid: Some(goid(1)), ..stamped(Contact, &[], 1) })));
    let big = "v".repeat(crmsync::fields::FIELD_VALUE_LEN_MAX);
    let e = mb.create(stamped(Task, &[("a", &big)], 2)).unwrap();
    let before = mb.get(&e).unwrap().unwrap();
    let patch = FieldPatch::between(&f(&[]), &f(&[("b", &big)]));
    assert!(matches!(mb.update(&e, &patch), Err(MailboxError::Fields(FieldsError::TooLarge(_)))));
    assert_eq!(mb.get(&e).unwrap(), Some(before));
    assert_eq!(mb.all_items().unwrap().len(), 1);
    assert_eq!(mb.head().unwrap(), START);
}

fn entry_ids_are_deterministic_and_never_reused<M: Mailbox + UserEdits>(mut mb: M, _: &ManualClock) {
    let a = mb.create(stamped(Contact, &[], 1)).unwrap();
    let b = mb.user_create(Contact, f(&[]), None, OPEN).unwrap();
    assert_eq!(a.as_str(), format!("{PREFIX}{:0w$X}", 1, w = ENTRY_ID_NUMBER_DIGITS));
    assert_eq!(b.as_str(), format!("{PREFIX}{:0w$X}", 2, w = ENTRY_ID_NUMBER_DIGITS));
    mb.delete(&b).unwrap();
    let c = mb.user_copy(&a).unwrap();
    assert_eq!(short(&c), "#3", "the newest item's number is not reused after its delete");
    let ids: Vec<EntryId> = mb.all_items().unwrap().into_iter().map(|i| i.entry_id).collect();
    assert_eq!(ids, [a, c]);
}

fn times_come_from_the_mailbox_clock<M: Mailbox + UserEdits>(mut mb: M, clock: &ManualClock) {
    let e = mb.user_create(Contact, f(&[("fullname", "Fay")]), None, OPEN).unwrap();
    clock.advance(Duration::minutes(5));
    mb.user_track(&e).unwrap();
    // The machine's clock is set back: times follow it, order does not.
    clock.set(at(-60));
    mb.user_update(&e, f(&[("fullname", "Fay G")])).unwrap();
    let page = all(&mb, START);
    let times: Vec<DateTime<Utc>> = page.changes.iter().map(|c| c.modified_at).collect();
    assert_eq!(times, [at(5), at(-60)]);
    assert_eq!(page.changes[1].item.as_ref().unwrap().modified_at, at(-60));
    clock.set(at(10));
    let p = FieldPatch::between(&f(&[("fullname", "Fay G")]), &f(&[("fullname", "Fay H")]));
    mb.update(&e, &p).unwrap();
    assert_eq!(mb.get(&e).unwrap().unwrap().modified_at, at(10));
    clock.set(at(20));
    mb.update(&e, &p).unwrap(); // changes nothing, so writes nothing
    assert_eq!(mb.get(&e).unwrap().unwrap().modified_at, at(10));
    mb.set_stamp(&e, None).unwrap();
    clock.set(at(30));
    mb.set_stamp(&e, None).unwrap(); // already untracked
    assert_eq!(mb.get(&e).unwrap().unwrap().modified_at, at(20));
}

/// A story told through a mailbox: user edits and sync writes, then what the sync would read.
fn story<M: Mailbox + UserEdits>(mb: &mut M, clock: &ManualClock) -> String {
    let tick = || clock.advance(Duration::minutes(1));
    let mut out = String::from("story:\n");
    let mut step = |s: &str| out += &format!("  {s}\n");
    let alice = mb.user_create(Contact, f(&[("fullname", "Alice")]), None, OPEN).unwrap();
    tick();
    mb.user_update(&alice, f(&[("fullname", "Alice A")])).unwrap();
    step("user creates contact #1 Alice and edits it (untracked: not logged)");
    tick();
    mb.user_track(&alice).unwrap();
    step("user tracks #1 (logged as a create)");
    let review = mb.create(stamped(Appointment, &[("subject", "Review")], 7)).unwrap();
    step("sync creates appointment #2 stamped ...07 (not logged)");
    tick();
    mb.user_update(&review, f(&[("subject", "Review (moved)")])).unwrap();
    step("user edits #2 (logged as an update)");
    let location = FieldPatch::between(&f(&[]), &f(&[("location", "Room 1")]));
    mb.update(&review, &location).unwrap();
    step("sync writes a location to #2 (not logged; #2's update reports it, being the item now)");
    tick();
    mb.user_copy(&review).unwrap();
    step("user copies #2 to #3 (logged as a create; the copy keeps the stamp and the GOID)");
    let task = mb.user_create(Task, f(&[("subject", "Plan")]), None, OPEN).unwrap();
    mb.user_track(&task).unwrap();
    tick();
    mb.user_delete(&task).unwrap();
    step("user creates task #4, tracks it and deletes it (its create is told by its delete)");
    mb.user_update(&alice, f(&[("fullname", "Alice B")])).unwrap();
    mb.set_stamp(&alice, None).unwrap();
    step("user edits #1, then the sync untracks it (its create and update are no longer reported)");
    mb.flush().unwrap();

    out += "changes since the start:\n";
    let page = all(mb, START);
    for c in &page.changes {
        let item = c.item.as_ref().map_or("no item".into(), |i| format!("{} {:?}", i.fields, i.tracking));
        out += &format!(
            "  {} {:?} {} {} at {}: {item}\n",
            c.seq,
            c.kind,
            short(&c.entry_id),
            c.object_type,
            c.modified_at
        );
    }
    out += &format!("cursor {} more {}\nitems:\n", page.cursor, page.more);
    for i in mb.all_items().unwrap() {
        let g = i.goid.as_ref().map_or(String::new(), |g| format!(" goid={g}"));
        out += &format!(
            "  {} {}{g} {} {:?} modified {}\n",
            short(&i.entry_id),
            i.object_type,
            i.fields,
            i.tracking,
            i.modified_at
        );
    }
    out
}

#[test]
fn a_story_of_user_edits_and_sync_writes() {
    let clock = self::clock();
    let text = story(&mut memory(&clock), &clock);
    #[cfg(feature = "sqlite")]
    {
        let clock = self::clock();
        assert_eq!(story(&mut sqlite(&clock), &clock), text);
    }
    snapshot!("mailbox_story", text);
}

#[test]
fn the_item_limit_is_a_typed_error() {
    fn check<M: Mailbox + UserEdits>(mut mb: M) {
        let a = mb.user_create(Contact, f(&[]), None, OPEN).unwrap();
        mb.create(stamped(Contact, &[], 1)).unwrap();
        assert!(matches!(mb.user_create(Contact, f(&[]), None, OPEN), Err(MailboxError::Full(2))));
        assert!(matches!(mb.create(stamped(Contact, &[], 2)), Err(MailboxError::Full(2))));
        assert!(matches!(mb.user_copy(&a), Err(MailboxError::Full(2))));
        mb.user_delete(&a).unwrap();
        mb.user_create(Contact, f(&[]), None, OPEN).unwrap();
        assert_eq!(mb.all_items().unwrap().len(), 2);
    }
    let clock = self::clock();
    check(memory(&clock).with_item_count_max(2));
    #[cfg(feature = "sqlite")]
    check(sqlite(&clock).with_item_count_max(2));
}

// ---------------------------------------------------------------------------------------------
// The model check: random user edits and sync writes on both mailboxes and a reference model.

/// The reference: items, the change log, and the untracks, with the reporting rule written
/// out as DOMAIN words it, by linear search.
#[derive(Default)]
struct Model {
    last: u64,
    items: BTreeMap<u64, MailboxItem>,
    log: Vec<(u64, ObjectTypeCode, ChangeKind, DateTime<Utc>)>,
    /// (item, log head when the sync untracked it)
    untracks: Vec<(u64, u64)>,
}

type Res<T> = Result<T, String>;

fn err<T>(e: MailboxError) -> Res<T> {
    Err(e.to_string())
}

fn entry(n: u64) -> EntryId {
    EntryId::new(format!("{PREFIX}{n:0w$X}", w = ENTRY_ID_NUMBER_DIGITS)).unwrap()
}

impl Model {
    fn number(&self, e: &EntryId) -> Res<u64> {
        match self.items.iter().find(|(_, i)| i.entry_id == *e) {
            Some((&n, _)) => Ok(n),
            None => err(MailboxError::NotFound(e.clone())),
        }
    }

    fn first_with(&self, pick: impl Fn(&MailboxItem) -> bool) -> Option<EntryId> {
        self.items.values().find(|i| pick(i)).map(|i| i.entry_id.clone())
    }

    fn insert(&mut self, item: MailboxItem) -> EntryId {
        self.last += 1;
        let e = entry(self.last);
        self.items.insert(self.last, MailboxItem { entry_id: e.clone(), ..item });
        e
    }

    fn goid_ok(otc: ObjectTypeCode, goid: &Option<GlobalObjectId>) -> Res<()> {
        if goid.is_some() && !otc.is_calendar() {
            return err(MailboxError::GoidOnNonCalendar(otc));
        }
        Ok(())
    }

    fn create(&mut self, new: NewItem, now: DateTime<Utc>) -> Res<EntryId> {
        Self::goid_ok(new.object_type, &new.goid)?;
        if let Some(entry_id) = self.first_with(|i| i.stamp() == Some(new.stamp)) {
            return err(MailboxError::StampTaken { stamp: new.stamp, entry_id });
        }
        Ok(self.insert(MailboxItem {
            entry_id: entry(1),
            object_type: new.object_type,
            fields: new.fields,
            goid: new.goid,
            status: new.status,
            tracking: Tracking::Stamped(new.stamp),
            modified_at: now,
            synced: Some(new.synced),
        }))
    }

    fn update(&mut self, e: &EntryId, patch: &FieldPatch, now: DateTime<Utc>) -> Res<()> {
        let n = self.number(e)?;
        let item = self.items.get_mut(&n).unwrap();
        let fields = patch.apply(&item.fields).map_err(|x| x.to_string())?;
        if fields != item.fields {
            (item.fields, item.modified_at) = (fields, now);
        }
        Ok(())
    }

    fn set_stamp(&mut self, e: &EntryId, stamp: Option<CrmId>, now: DateTime<Utc>) -> Res<()> {
        let n = self.number(e)?;
        let tracking = stamp.map_or(Tracking::Untracked, Tracking::Stamped);
        if self.items[&n].tracking == tracking {
            return Ok(());
        }
        if let Some(stamp) = stamp {
            if let Some(entry_id) = self.first_with(|i| i.stamp() == Some(stamp)) {
                return err(MailboxError::StampTaken { stamp, entry_id });
            }
        }
        if stamp.is_none() {
            self.untracks.push((n, self.log.len() as u64));
        }
        let item = self.items.get_mut(&n).unwrap();
        (item.tracking, item.modified_at) = (tracking, now);
        if stamp.is_none() {
            item.synced = None;
        }
        Ok(())
    }

    fn link(&mut self, e: &EntryId, stamp: CrmId, synced: SyncBase, now: DateTime<Utc>) -> Res<()> {
        self.set_stamp(e, Some(stamp), now)?;
        let n = self.number(e)?;
        self.items.get_mut(&n).unwrap().synced = Some(synced);
        Ok(())
    }

    fn user_create(
        &mut self,
        otc: ObjectTypeCode,
        fields: Fields,
        goid: Option<GlobalObjectId>,
        now: DateTime<Utc>,
    ) -> Res<EntryId> {
        Self::goid_ok(otc, &goid)?;
        let item = MailboxItem {
            entry_id: entry(1),
            object_type: otc,
            fields,
            goid,
            status: OPEN,
            tracking: Tracking::Untracked,
            modified_at: now,
            synced: None,
        };
        Ok(self.insert(item))
    }

    fn user_track(&mut self, e: &EntryId, now: DateTime<Utc>) -> Res<()> {
        let n = self.number(e)?;
        let item = self.items.get_mut(&n).unwrap();
        if item.tracking == Tracking::Untracked {
            (item.tracking, item.modified_at) = (Tracking::Pending, now);
            self.log.push((n, item.object_type, ChangeKind::Create, now));
        }
        Ok(())
    }

    fn user_update(&mut self, e: &EntryId, fields: Fields, now: DateTime<Utc>) -> Res<()> {
        let n = self.number(e)?;
        let item = self.items.get_mut(&n).unwrap();
        (item.fields, item.modified_at) = (fields, now);
        if item.is_tracked() {
            self.log.push((n, item.object_type, ChangeKind::Update, now));
        }
        Ok(())
    }

    fn user_delete(&mut self, e: &EntryId, now: DateTime<Utc>) -> Res<()> {
        let n = self.number(e)?;
        let item = self.items.remove(&n).unwrap();
        if item.is_tracked() {
            self.log.push((n, item.object_type, ChangeKind::Delete, now));
        }
        Ok(())
    }

    fn user_copy(&mut self, e: &EntryId, now: DateTime<Utc>) -> Res<EntryId> {
        let n = self.number(e)?;
        let original = self.items[&n].clone();
        let copy = self.insert(MailboxItem { modified_at: now, ..original.clone() });
        if original.is_tracked() {
            self.log.push((self.last, original.object_type, ChangeKind::Create, now));
        }
        Ok(copy)
    }

    /// A logged change is reported if it is a delete, or its item still exists and the sync
    /// has not untracked it since.
    fn reported(&self, seq: u64) -> Option<MailboxChange> {
        let (n, object_type, kind, modified_at) = self.log[seq as usize - 1];
        let item = if kind == ChangeKind::Delete {
            None
        } else {
            let untracked_since = self.untracks.iter().any(|&(u, head)| u == n && head >= seq);
            Some(self.items.get(&n).filter(|_| !untracked_since)?.clone())
        };
        Some(MailboxChange {
            seq: MailboxCursor(seq),
            entry_id: entry(n),
            object_type,
            kind,
            modified_at,
            item,
        })
    }

    fn changes_since(&self, cursor: MailboxCursor, limit: usize) -> Res<ChangePage> {
        let head = MailboxCursor(self.log.len() as u64);
        if limit == 0 || limit > CHANGES_PAGE_MAX {
            return err(MailboxError::PageSize(limit));
        }
        if cursor > head {
            return err(MailboxError::CursorAhead { cursor, head });
        }
        let all: Vec<MailboxChange> = (cursor.0 + 1..=head.0).filter_map(|seq| self.reported(seq)).collect();
        if all.len() > limit {
            let changes = all[..limit].to_vec();
            return Ok(ChangePage { cursor: changes[limit - 1].seq, changes, more: true });
        }
        Ok(ChangePage { changes: all, cursor: head, more: false })
    }
}

#[derive(Debug, Clone)]
enum Op {
    UserCreate { otc: ObjectTypeCode, value: u8, goid: Option<u8> },
    UserTrack(usize),
    UserUpdate(usize, u8),
    UserDelete(usize),
    UserCopy(usize),
    Create { otc: ObjectTypeCode, value: u8, goid: Option<u8>, stamp: u8 },
    Update(usize, u8),
    Delete(usize),
    SetStamp(usize, Option<u8>),
    Link(usize, u8, u8),
    Clock(i64),
    Read(usize),
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    let which = 0usize..64;
    let value = 0u8..6;
    let stamp = 0u8..4;
    // Mostly a GOID on calendar items only; sometimes anywhere (an error).
    let item = prop_oneof![
        4 => (Just(Appointment), proptest::option::weighted(0.8, 0u8..3)),
        4 => (prop_oneof![Just(Contact), Just(Task)], Just(None)),
        1 => (prop_oneof![Just(Contact), Just(Appointment), Just(Task)], proptest::option::of(0u8..3)),
    ];
    prop_oneof![
        3 => (item.clone(), value.clone()).prop_map(|((otc, goid), value)| Op::UserCreate { otc, value, goid }),
        3 => which.clone().prop_map(Op::UserTrack),
        3 => (which.clone(), value.clone()).prop_map(|(i, v)| Op::UserUpdate(i, v)),
        1 => which.clone().prop_map(Op::UserDelete),
        1 => which.clone().prop_map(Op::UserCopy),
        3 => (item, value.clone(), stamp.clone()).prop_map(|((otc, goid), value, stamp)| Op::Create { otc, value, goid, stamp }),
        3 => (which.clone(), value.clone()).prop_map(|(i, v)| Op::Update(i, v)),
        1 => which.clone().prop_map(Op::Delete),
        2 => (which.clone(), proptest::option::of(stamp.clone())).prop_map(|(i, s)| Op::SetStamp(i, s)),
        2 => (which, stamp, value).prop_map(|(i, s, v)| Op::Link(i, s, v)),
        1 => (-30i64..60).prop_map(Op::Clock),
        2 => (1usize..5).prop_map(Op::Read),
        1 => Just(Op::Flush),
    ]
}

fn value_fields(v: u8) -> Fields {
    let subject = format!("s{v}");
    if v % 3 == 0 { f(&[("subject", &subject), ("body", "b")]) } else { f(&[("subject", &subject)]) }
}

fn stamp_id(s: u8) -> CrmId {
    id(0x100 + s as u128)
}

/// Applies `op` to a mailbox; the result as text, to compare with the other mailbox and the model.
fn apply<M: Mailbox + UserEdits>(
    mb: &mut M,
    op: &Op,
    e: &EntryId,
    patch: &FieldPatch,
    cursor: &mut MailboxCursor,
) -> String {
    fn show<T: std::fmt::Debug>(r: Result<T, MailboxError>) -> String {
        match r {
            Ok(v) => format!("ok {v:?}"),
            Err(e) => format!("error {e}"),
        }
    }
    match op {
        Op::UserCreate { otc, value, goid: g } => {
            show(mb.user_create(*otc, value_fields(*value), g.map(goid), OPEN))
        }
        Op::UserTrack(_) => show(mb.user_track(e)),
        Op::UserUpdate(_, v) => show(mb.user_update(e, value_fields(*v))),
        Op::UserDelete(_) => show(mb.user_delete(e)),
        Op::UserCopy(_) => show(mb.user_copy(e)),
        Op::Create { otc, value, goid: g, stamp } => show(mb.create(NewItem {
            object_type: *otc,
            fields: value_fields(*value),
            goid: g.map(goid),
            status: OPEN,
            stamp: stamp_id(*stamp),
            synced: base(value_fields(*value), 1),
        })),
        Op::Update(..) => show(mb.update(e, patch)),
        Op::Delete(_) => show(mb.delete(e)),
        Op::SetStamp(_, s) => show(mb.set_stamp(e, s.map(stamp_id))),
        Op::Link(_, s, v) => show(mb.link(e, stamp_id(*s), base(value_fields(*v), u64::from(*v)))),
        Op::Clock(_) | Op::Flush => show(mb.flush()),
        Op::Read(limit) => {
            let page = mb.changes_since(*cursor, *limit);
            if let Ok(page) = &page {
                *cursor = page.cursor;
            }
            show(page)
        }
    }
}

fn model_apply(
    m: &mut Model,
    op: &Op,
    e: &EntryId,
    patch: &FieldPatch,
    cursor: &mut MailboxCursor,
    now: DateTime<Utc>,
) -> String {
    fn show<T: std::fmt::Debug>(r: Res<T>) -> String {
        match r {
            Ok(v) => format!("ok {v:?}"),
            Err(e) => format!("error {e}"),
        }
    }
    match op {
        Op::UserCreate { otc, value, goid: g } => {
            show(m.user_create(*otc, value_fields(*value), g.map(goid), now))
        }
        Op::UserTrack(_) => show(m.user_track(e, now)),
        Op::UserUpdate(_, v) => show(m.user_update(e, value_fields(*v), now)),
        Op::UserDelete(_) => show(m.user_delete(e, now)),
        Op::UserCopy(_) => show(m.user_copy(e, now)),
        Op::Create { otc, value, goid: g, stamp } => show(m.create(
            NewItem {
                object_type: *otc,
                fields: value_fields(*value),
                goid: g.map(goid),
                status: OPEN,
                stamp: stamp_id(*stamp),
                synced: base(value_fields(*value), 1),
            },
            now,
        )),
        Op::Update(..) => show(m.update(e, patch, now)),
        Op::Delete(_) => show(m.number(e).map(|n| m.items.remove(&n)).map(|_| ()).or(Ok(()))),
        Op::SetStamp(_, s) => show(m.set_stamp(e, s.map(stamp_id), now)),
        Op::Link(_, s, v) => show(m.link(e, stamp_id(*s), base(value_fields(*v), u64::from(*v)), now)),
        Op::Clock(_) | Op::Flush => show(Ok(())),
        Op::Read(limit) => {
            let page = m.changes_since(*cursor, *limit);
            if let Ok(page) = &page {
                *cursor = page.cursor;
            }
            show(page)
        }
    }
}

/// Everything a reader can see of a mailbox, as text.
fn observe<M: Mailbox>(mb: &M, known: &[EntryId]) -> String {
    let mut out = format!("head {:?}\nitems {:?}\n", mb.head().unwrap(), mb.all_items().unwrap());
    out += &format!("changes {:?}\n", mb.changes_since(START, CHANGES_PAGE_MAX).unwrap());
    for s in 0..4 {
        out += &format!("stamp {s}: {:?}\n", mb.find_by_stamp(stamp_id(s)).unwrap());
    }
    for g in 0..3 {
        out += &format!("goid {g}: {:?}\n", mb.find_by_goid(&goid(g)).unwrap());
    }
    for e in known {
        out += &format!("get {e}: {:?}\n", mb.get(e).unwrap());
    }
    out
}

fn observe_model(m: &Model, known: &[EntryId]) -> String {
    let head = MailboxCursor(m.log.len() as u64);
    let mut out = format!("head {head:?}\nitems {:?}\n", m.items.values().collect::<Vec<_>>());
    out += &format!("changes {:?}\n", m.changes_since(START, CHANGES_PAGE_MAX).unwrap());
    for s in 0..4 {
        out += &format!("stamp {s}: {:?}\n", m.first_with(|i| i.stamp() == Some(stamp_id(s))));
    }
    for g in 0..3 {
        out += &format!("goid {g}: {:?}\n", m.first_with(|i| i.goid == Some(goid(g))));
    }
    for e in known {
        out += &format!("get {e}: {:?}\n", m.number(e).ok().map(|n| &m.items[&n]));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/mailbox.txt"))),
        ..ProptestConfig::with_cases(512)
    })]

    /// Any sequence of user edits and sync writes leaves both mailboxes and the model with the
    /// same results, items, lookups and change stream, read in random pages as it grows.
    #[test]
    fn both_mailboxes_behave_as_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let clock = self::clock();
        let mut model = Model::default();
        let mut mem = memory(&clock);
        #[cfg(feature = "sqlite")]
        let mut sql = sqlite(&clock);
        let mut cursors = [START; 3];
        // An id of another mailbox and one this mailbox has not made yet are never found.
        let mut known = vec![EntryId::new("00AC0001").unwrap(), entry(1000)];
        for op in &ops {
            if let Op::Clock(minutes) = op {
                clock.advance(Duration::minutes(*minutes));
            }
            let e = match op {
                Op::UserTrack(i) | Op::UserUpdate(i, _) | Op::UserDelete(i) | Op::UserCopy(i)
                | Op::Update(i, _) | Op::Delete(i) | Op::SetStamp(i, _) | Op::Link(i, ..) => known[i % known.len()].clone(),
                _ => known[0].clone(),
            };
            let patch = match op {
                Op::Update(_, v) => {
                    let now = model.number(&e).map(|n| model.items[&n].fields.clone()).unwrap_or_default();
                    FieldPatch::between(&now, &value_fields(*v))
                }
                _ => FieldPatch::default(),
            };
            let expected = model_apply(&mut model, op, &e, &patch, &mut cursors[0], clock.now());
            prop_assert_eq!(&apply(&mut mem, op, &e, &patch, &mut cursors[1]), &expected, "memory, {:?}", op);
            #[cfg(feature = "sqlite")]
            prop_assert_eq!(&apply(&mut sql, op, &e, &patch, &mut cursors[2]), &expected, "sqlite, {:?}", op);
            if let (Op::UserCreate { .. } | Op::Create { .. } | Op::UserCopy(_), Some(made)) =
                (op, expected.strip_prefix("ok EntryId(").and_then(|s| s.strip_suffix(')')))
            {
                known.push(EntryId::new(made).unwrap());
            }
        }
        let expected = observe_model(&model, &known);
        prop_assert_eq!(&observe(&mem, &known), &expected);
        #[cfg(feature = "sqlite")]
        prop_assert_eq!(&observe(&sql, &known), &expected);
    }
}

// ---------------------------------------------------------------------------------------------
// The mailbox file.

#[cfg(feature = "sqlite")]
mod file {
    use std::path::{Path, PathBuf};

    use crmsync::mailbox_file::{MAILBOX_APPLICATION_ID, MAILBOX_SCHEMA_VERSION};
    use crmsync::server::{SERVER_APPLICATION_ID, ServerStore};

    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("crmsync-mailbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn boxed(clock: &Rc<ManualClock>) -> Box<dyn Clock> {
        Box::new(clock.clone())
    }

    /// The file's bytes, and which files are beside it (no journal or WAL left behind).
    fn snapshot_of(path: &Path) -> (Vec<u8>, Vec<String>) {
        let mut names: Vec<String> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        (std::fs::read(path).unwrap(), names)
    }

    /// Opening `path` both ways fails as `refused` says, and leaves it exactly as it was, with
    /// nothing new beside it. (A valid mailbox of another prefix is read through SQLite, which
    /// may leave the WAL's `-shm` beside it; its bytes are still checked.)
    fn refused(path: &Path, prefix: &str, refused: impl Fn(&MailboxOpenError) -> bool) {
        let clock = self::clock();
        let before = snapshot_of(path);
        let err = SqliteMailbox::open(path, prefix, boxed(&clock)).unwrap_err();
        assert!(refused(&err), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()), "names the file: {err}");
        if matches!(err, MailboxOpenError::PrefixMismatch { .. }) {
            assert_eq!(std::fs::read(path).unwrap(), before.0, "open left {} untouched", path.display());
            return;
        }
        assert_eq!(snapshot_of(path), before, "open left {} untouched", path.display());
        let err = SqliteMailbox::open_existing(path, boxed(&clock)).unwrap_err();
        assert!(refused(&err), "{err:?}");
        assert_eq!(snapshot_of(path), before, "open_existing left {} untouched", path.display());
    }

    /// Runs `sql` on the file through a connection of its own (another program, an older build).
    fn rewrite(path: &Path, sql: &str) {
        rusqlite::Connection::open(path).unwrap().execute_batch(sql).unwrap();
    }

    /// The schema version the file says it is.
    fn stored_version(path: &Path) -> i32 {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap()
    }

    fn set_header(path: &Path, application_id: i32, user_version: i32) {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
        conn.pragma_update(None, "application_id", application_id).unwrap();
        conn.pragma_update(None, "user_version", user_version).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_mailbox_is_refused_and_left_untouched() {
        let dir = dir("refused");
        let clock = self::clock();

        let text = dir.join("notes.txt");
        std::fs::write(&text, b"not a database at all, just some text that is long enough").unwrap();
        refused(&text, PREFIX, |e| matches!(e, MailboxOpenError::NotADatabase { .. }));

        let big_text = dir.join("big.txt");
        std::fs::write(&big_text, "SQLite format 2 and more text ".repeat(20)).unwrap();
        refused(&big_text, PREFIX, |e| matches!(e, MailboxOpenError::NotADatabase { .. }));

        let other = dir.join("other.db");
        {
            let conn = rusqlite::Connection::open(&other).unwrap();
            conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);").unwrap();
        }
        refused(&other, PREFIX, |e| matches!(e, MailboxOpenError::NotAMailbox { found: 0, .. }));

        // Another application's WAL-mode file, closed, and one still open with its WAL full.
        let foreign_wal = dir.join("foreign-wal.db");
        {
            let conn = rusqlite::Connection::open(&foreign_wal).unwrap();
            conn.pragma_update(None, "journal_mode", "WAL").unwrap();
            conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);").unwrap();
        }
        refused(&foreign_wal, PREFIX, |e| matches!(e, MailboxOpenError::NotAMailbox { found: 0, .. }));
        let live_wal = dir.join("live-wal.db");
        let conn = rusqlite::Connection::open(&live_wal).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);").unwrap();
        refused(&live_wal, PREFIX, |e| matches!(e, MailboxOpenError::NotAMailbox { found: 0, .. }));
        drop(conn);

        let server = dir.join("server.db");
        drop(ServerStore::open(&server, boxed(&clock)).unwrap());
        refused(
            &server,
            PREFIX,
            |e| matches!(e, MailboxOpenError::NotAMailbox { found, .. } if *found == SERVER_APPLICATION_ID),
        );

        let newer = dir.join("newer.db");
        drop(SqliteMailbox::open(&newer, PREFIX, boxed(&clock)).unwrap());
        set_header(&newer, MAILBOX_APPLICATION_ID, MAILBOX_SCHEMA_VERSION + 1);
        refused(
            &newer,
            PREFIX,
            |e| matches!(e, MailboxOpenError::NewerSchema { found, .. } if *found == MAILBOX_SCHEMA_VERSION + 1),
        );

        let unversioned = dir.join("unversioned.db");
        drop(SqliteMailbox::open(&unversioned, PREFIX, boxed(&clock)).unwrap());
        set_header(&unversioned, MAILBOX_APPLICATION_ID, 0);
        refused(&unversioned, PREFIX, |e| matches!(e, MailboxOpenError::NotAMailbox { .. }));

        let corrupt = dir.join("corrupt.db");
        drop(SqliteMailbox::open(&corrupt, PREFIX, boxed(&clock)).unwrap());
        {
            let conn = rusqlite::Connection::open(&corrupt).unwrap();
            conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
            conn.execute("UPDATE Meta SET Value = 'not hex'", []).unwrap();
        }
        refused(
            &corrupt,
            PREFIX,
            |e| matches!(e, MailboxOpenError::Corrupt { table: "Meta", value, .. } if value == "not hex"),
        );

        let theirs = dir.join("theirs.db");
        drop(SqliteMailbox::open(&theirs, "00CD", boxed(&clock)).unwrap());
        refused(
            &theirs,
            PREFIX,
            |e| matches!(e, MailboxOpenError::PrefixMismatch { stored, given, .. } if stored == "00CD" && given == PREFIX),
        );

        // Opening an existing mailbox never creates one; a bad prefix creates nothing either.
        let missing = dir.join("missing.db");
        assert!(matches!(
            SqliteMailbox::open_existing(&missing, boxed(&clock)),
            Err(MailboxOpenError::Missing { path }) if path == missing
        ));
        assert!(matches!(
            SqliteMailbox::open(&missing, "xyz", boxed(&clock)),
            Err(MailboxOpenError::BadPrefix(p)) if p == "xyz"
        ));
        assert!(!missing.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A process killed before the first checkpoint leaves the mailbox's header in its WAL: the
    /// file itself still says `application_id` 0. It is a mailbox all the same.
    #[test]
    fn a_mailbox_killed_before_its_first_checkpoint_reopens() {
        let dir = dir("killed");
        let path = dir.join("mailbox.db");
        let clock = self::clock();
        let mut mb = SqliteMailbox::open(&path, PREFIX, boxed(&clock)).unwrap();
        let a = mb.user_create(Contact, f(&[("fullname", "Alice")]), None, OPEN).unwrap();
        mb.user_track(&a).unwrap();
        mb.create(stamped(Contact, &[("fullname", "Bob")], 2)).unwrap();
        mb.flush().unwrap();
        let items = mb.all_items().unwrap();
        std::mem::forget(mb); // as if killed: no close, no checkpoint
        let header = std::fs::read(&path).unwrap();
        assert_eq!(header[68..72], [0; 4], "the file's own header is not yet a mailbox's");

        let mb = SqliteMailbox::open_existing(&path, boxed(&clock)).unwrap();
        assert_eq!(mb.all_items().unwrap(), items);
        assert_eq!(kinds(&all(&mb, START)), [(a, ChangeKind::Create)]);
        drop(mb);
        drop(SqliteMailbox::open(&path, PREFIX, boxed(&clock)).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_version_1_mailbox_file_migrates_and_keeps_its_items() {
        let dir = dir("migrate");
        let path = dir.join("mailbox.db");
        let clock = self::clock();
        std::fs::write(&path, b"").unwrap();
        {
            let mut mb = SqliteMailbox::open(&path, PREFIX, boxed(&clock)).unwrap();
            let a = mb.user_create(Contact, f(&[("fullname", "Alice")]), None, OPEN).unwrap();
            mb.user_track(&a).unwrap();
            mb.create(stamped(Task, &[("subject", "Plan")], 8)).unwrap();
        }
        // Make it what version 1 wrote: no Synced column.
        rewrite(&path, "ALTER TABLE Item DROP COLUMN Synced; PRAGMA user_version = 1;");
        let mb = SqliteMailbox::open_existing(&path, boxed(&clock)).unwrap();
        let items = mb.all_items().unwrap();
        assert_eq!(items.len(), 2);
        assert!(items.iter().all(|i| i.synced.is_none()), "{items:?}");
        assert_eq!(items[1].stamp(), Some(id(8)));
        drop(mb);
        assert_eq!(stored_version(&path), MAILBOX_SCHEMA_VERSION);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_version_2_mailbox_file_migrates_and_keeps_its_bases() {
        let dir = dir("migrate-v2");
        let path = dir.join("mailbox.db");
        let clock = self::clock();
        let (synced, edited);
        {
            let mut mb = SqliteMailbox::open(&path, PREFIX, boxed(&clock)).unwrap();
            synced = mb.create(stamped(Task, &[("subject", "Plan")], 8)).unwrap();
            edited = mb.create(stamped(Contact, &[("fullname", "Bob")], 9)).unwrap();
            mb.user_update(&edited, f(&[("fullname", "Robert")])).unwrap();
        }
        // Make it what version 2 wrote: every base with its fields.
        rewrite(
            &path,
            "UPDATE Item SET Synced = json_set(Synced, '$.fields', json(Fields)) \
             WHERE Synced IS NOT NULL AND json_extract(Synced, '$.fields') IS NULL; \
             PRAGMA user_version = 2;",
        );
        let mb = SqliteMailbox::open_existing(&path, boxed(&clock)).unwrap();
        let base_of = |e: &EntryId| mb.get(e).unwrap().unwrap().synced.unwrap().fields;
        assert_eq!(base_of(&synced), f(&[("subject", "Plan")]));
        assert_eq!(base_of(&edited), f(&[("fullname", "Bob")]));
        drop(mb);
        assert_eq!(stored_version(&path), MAILBOX_SCHEMA_VERSION);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A sync write leaves the item's fields and its base equal: the row holds them once. An edit
    /// that changes the fields writes the base out in full first, so it never follows the edit.
    #[test]
    fn an_item_row_holds_a_base_equal_to_its_fields_once() {
        let dir = dir("base-once");
        let path = dir.join("mailbox.db");
        let clock = self::clock();
        let mut mb = SqliteMailbox::open(&path, PREFIX, boxed(&clock)).unwrap();
        let by_user = mb.create(stamped(Contact, &[("fullname", "Bob")], 9)).unwrap();
        let by_sync = mb.create(stamped(Task, &[("subject", "Plan")], 8)).unwrap();
        mb.flush().unwrap();
        let stored = |e: &EntryId| -> String {
            let conn = rusqlite::Connection::open(&path).unwrap();
            let number = i64::from_str_radix(&e.as_str()[PREFIX.len()..], 16).unwrap();
            conn.query_row("SELECT Synced FROM Item WHERE Number = ?1", [number], |r| r.get(0)).unwrap()
        };
        assert!(!stored(&by_user).contains("fullname"), "{}", stored(&by_user));
        mb.user_update(&by_user, f(&[("fullname", "Robert")])).unwrap();
        assert!(stored(&by_user).contains("Bob"), "{}", stored(&by_user));
        mb.update(&by_sync, &FieldPatch::between(&f(&[("subject", "Plan")]), &f(&[("subject", "Plan B")])))
            .unwrap();
        mb.flush().unwrap();
        assert!(stored(&by_sync).contains("\"Plan\""), "{}", stored(&by_sync));
        let base_of = |mb: &SqliteMailbox, e: &EntryId| mb.get(e).unwrap().unwrap().synced.unwrap().fields;
        assert_eq!(base_of(&mb, &by_user), f(&[("fullname", "Bob")]));
        assert_eq!(base_of(&mb, &by_sync), f(&[("subject", "Plan")]));
        // Left out is not the same as null: a base whose fields are null is refused.
        rewrite(&path, r#"UPDATE Item SET Synced = '{"fields":null,"crm_version":1,"role":"Owner"}'"#);
        let read = mb.get(&by_sync).unwrap_err();
        assert!(
            matches!(&read, MailboxError::Corrupt { table: "Item", column: "Synced", value } if value.contains("null")),
            "{read:?}"
        );
        drop(mb);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_mailbox_file_reopens_with_its_items_changes_and_counter() {
        let dir = dir("reopen");
        let path = dir.join("mailbox.db");
        let clock = self::clock();
        // An empty file is a new mailbox.
        std::fs::write(&path, b"").unwrap();
        let (items, first_page, last) = {
            let mut mb = SqliteMailbox::open(&path, PREFIX, boxed(&clock)).unwrap();
            assert_eq!(mb.path(), Some(path.as_path()));
            let a = mb.user_create(Contact, f(&[("fullname", "Alice")]), None, OPEN).unwrap();
            mb.user_track(&a).unwrap();
            let first_page = mb.changes_since(START, 1).unwrap();
            mb.user_update(&a, f(&[("fullname", "Alice B")])).unwrap();
            // Sync writes, not flushed: a graceful close keeps them.
            mb.create(stamped(Appointment, &[("subject", "Review")], 7)).unwrap();
            let last = mb.create(stamped(Task, &[("subject", "Plan")], 8)).unwrap();
            mb.delete(&last).unwrap();
            (mb.all_items().unwrap(), first_page, last)
        };
        let conn = rusqlite::Connection::open(&path).unwrap();
        let pragma = |name: &str| {
            conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, rusqlite::types::Value>(0)).unwrap()
        };
        assert_eq!(pragma("journal_mode"), rusqlite::types::Value::Text("wal".into()));
        assert_eq!(pragma("application_id"), rusqlite::types::Value::Integer(MAILBOX_APPLICATION_ID.into()));
        assert_eq!(pragma("user_version"), rusqlite::types::Value::Integer(MAILBOX_SCHEMA_VERSION.into()));
        drop(conn);

        let mut mb = SqliteMailbox::open_existing(&path, boxed(&clock)).unwrap();
        assert_eq!(mb.prefix(), PREFIX);
        assert_eq!(mb.all_items().unwrap(), items);
        assert_eq!(mb.head().unwrap(), MailboxCursor(2));
        // A reader's cursor from before the close goes on where it was.
        let rest = mb.changes_since(first_page.cursor, 10).unwrap();
        assert_eq!(
            rest.changes.iter().map(|c| (c.seq, c.kind)).collect::<Vec<_>>(),
            [(MailboxCursor(2), ChangeKind::Update)]
        );
        // The newest item was deleted before the close; its number is still never reused.
        let next = mb.user_create(Task, f(&[]), None, OPEN).unwrap();
        assert_eq!(short(&last), "#3");
        assert_eq!(short(&next), "#4");
        assert_eq!(mb.find_by_stamp(id(7)).unwrap(), Some(items[1].entry_id.clone()));
        drop(mb);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
