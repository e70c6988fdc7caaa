//! The reference model: what the final state must be, worked out from the edits themselves and
//! DOMAIN's policies, independently of the engine (it never reads a queue, a plan or a mapping
//! base to decide what is right).
//!
//! Records are *handles*: one per record a person made, on either side, followed through its
//! `CrmId` (learnt from the stamp on the Outlook item once a sync links it, and through
//! [`CrmId::successor`] when an update wins over a delete and the record is made again).
//!
//! Field values. Every edit writes a value no other edit writes, so any value seen anywhere
//! names the edit that made it. A *place* is the CRM server or one user's mailbox. For each
//! field of each handle the model keeps the latest edit made at each place, and watches after
//! every sync run when each edit's value *arrives* at the other places. An edit `b` knew of an
//! edit `a` when `a` had arrived at `b`'s place before `b` was made (or `a` was made there
//! earlier). The edits nobody knew of are the *maximal* ones: with one, it is the final value
//! (a later edit overwrites an earlier one it knew of: no lost update); with two made without
//! knowing of each other (a conflict), `FieldConflictPolicy` picks: `CrmWins` takes the CRM
//! edit, `OutlookWins` an Outlook one (with several Outlook ones, any of them: which user's
//! run reaches the server first is scheduling, not policy).
//!
//! Existence. A handle that no one deleted, gave away or took out of a filter is *protected*:
//! its record must exist in CRM at every step, and at the end every user whose filter holds it
//! must hold it linked. Deleted records are judged by the structural checks (both sides agree,
//! nothing half-linked); their resurrection under `UpdateVsDeletePolicy` is not modelled yet.

use std::collections::BTreeMap;

use crmsync::ids::{CrmId, EntryId};
use crmsync::index::IdMap;
use crmsync::policy::FieldConflictPolicy;

/// Where an edit is made or arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Place {
    Crm,
    /// A user's mailbox, by user index.
    Outlook(usize),
}

/// A handle: one record as people know it.
pub type Handle = usize;

#[derive(Debug, Clone)]
struct EditAt {
    value: String,
    /// The event number it was made at.
    at: u64,
    /// When its value was first seen at each other place.
    arrived: BTreeMap<Place, u64>,
    /// Withdrawn by a policy (its copy was deleted, or its record left the user's filter, or
    /// was deleted in CRM before the edit reached anyone): not required in the final state, and
    /// tolerated there only if no required edit knew of it.
    withdrawn: bool,
}

#[derive(Debug, Clone, Default)]
pub struct HandleInfo {
    pub crm_id: Option<CrmId>,
    /// The user who made it and its first item, for a record made in Outlook.
    pub made_in: Option<(usize, EntryId)>,
    /// Someone deleted it, gave it to another owner, or took an attendee off it.
    pub unprotected: bool,
    /// Its record has been seen in CRM (an item may carry its stamp before the create lands).
    pub seen_in_crm: bool,
    /// Users who deleted their Outlook copy (the policy may untrack instead of deleting).
    pub deleted_in_outlook_by: Vec<usize>,
    /// Users whose filter it left (given away, uninvited): their copy is untracked and keeps
    /// their edits that had not reached CRM (README policy), so those no longer count.
    pub left_filter_of: Vec<usize>,
}

/// What the model expects of one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Exactly this value.
    Value(String),
    /// One of these (concurrent Outlook edits under `OutlookWins`, or no policy preference).
    OneOf(Vec<String>),
}

impl Expect {
    pub fn admits(&self, value: Option<&str>) -> bool {
        match self {
            Expect::Value(v) => value == Some(v.as_str()),
            Expect::OneOf(vs) => vs.iter().any(|v| value == Some(v.as_str())),
        }
    }
}

/// One user's items the model knows: in `EntryId` order to list, hashed to look up.
#[derive(Debug, Clone, Default)]
struct UserItems {
    ordered: BTreeMap<EntryId, Handle>,
    index: IdMap<EntryId, Handle>,
}

#[derive(Debug, Clone, Default)]
pub struct Model {
    pub handles: Vec<HandleInfo>,
    /// Looked up, never iterated (the checks ask it about every record after every run).
    by_crm_id: IdMap<CrmId, Handle>,
    /// By user: the user's items the model knows (one set per user, so a lookup borrows the
    /// `EntryId` instead of building a `(user, EntryId)` key).
    by_item: Vec<UserItems>,
    /// By handle: field -> every edit made, with its place, in the order made. Earlier edits at
    /// a place are kept: when a later one is withdrawn (its copy left the filter), an earlier one
    /// that reached CRM is what CRM rightly keeps.
    edits: Vec<BTreeMap<String, Vec<(Place, EditAt)>>>,
    /// By place ([`Model::place_slot`]), then by handle: the fields last seen of it there
    /// (looked up, never iterated).
    last_seen: Vec<Vec<Option<crmsync::Fields>>>,
    next_value: u64,
}

impl Model {
    /// A new record made in CRM.
    pub fn new_crm_record(&mut self, crm_id: CrmId) -> Handle {
        let h = self.handles.len();
        self.handles.push(HandleInfo { crm_id: Some(crm_id), ..HandleInfo::default() });
        self.index_crm_id(crm_id, h);
        h
    }

    /// A new item made and tracked in Outlook by `user`.
    pub fn new_outlook_item(&mut self, user: usize, entry_id: EntryId) -> Handle {
        let h = self.handles.len();
        self.handles.push(HandleInfo { made_in: Some((user, entry_id.clone())), ..HandleInfo::default() });
        self.index_item(user, entry_id, h);
        h
    }

    fn index_item(&mut self, user: usize, entry_id: EntryId, h: Handle) {
        if self.by_item.len() <= user {
            self.by_item.resize_with(user + 1, UserItems::default);
        }
        let items = &mut self.by_item[user];
        items.index.insert(entry_id.clone(), h);
        items.ordered.insert(entry_id, h);
    }

    fn index_crm_id(&mut self, crm_id: CrmId, h: Handle) {
        self.by_crm_id.insert(crm_id, h);
        // A record made again after an update won over its delete carries this id.
        self.by_crm_id.insert(crm_id.successor(), h);
    }

    /// The handle of a `CrmId` (or of the record it is the successor of).
    pub fn handle_of_crm_id(&self, crm_id: CrmId) -> Option<Handle> {
        self.by_crm_id.get(&crm_id).copied()
    }

    /// The items of `user` the model knows, with their handles.
    pub fn items_of(&self, user: usize) -> impl Iterator<Item = (&EntryId, Handle)> {
        self.by_item.get(user).into_iter().flat_map(|items| items.ordered.iter().map(|(e, h)| (e, *h)))
    }

    pub fn handle_of_item(&self, user: usize, entry_id: &EntryId) -> Option<Handle> {
        self.by_item.get(user)?.index.get(entry_id).copied()
    }

    /// What a sync run showed: `user`'s item `entry_id` is stamped with `crm_id`.
    pub fn learn_link(&mut self, user: usize, entry_id: &EntryId, crm_id: CrmId) {
        let by_item = self.handle_of_item(user, entry_id);
        let by_id = self.handle_of_crm_id(crm_id);
        match (by_item, by_id) {
            (Some(h), None) => {
                self.handles[h].crm_id.get_or_insert(crm_id);
                self.index_crm_id(crm_id, h);
            }
            (None, Some(h)) => self.index_item(user, entry_id.clone(), h),
            _ => {}
        }
    }

    /// A fresh value for an edit of `field` (unique in the world).
    pub fn fresh_value(&mut self, field: &str) -> String {
        self.next_value += 1;
        format!("{field}#{}", self.next_value)
    }

    /// An edit: `place` wrote `value` into `field` of `h` at event `at`.
    pub fn edit(&mut self, h: Handle, place: Place, field: &str, value: String, at: u64) {
        if let Place::Outlook(u) = place {
            if self.handles[h].left_filter_of.contains(&u) {
                // An edit of a copy whose record left the user's filter stays in that copy.
                return;
            }
        }
        if self.edits.len() <= h {
            self.edits.resize_with(h + 1, BTreeMap::new);
        }
        let by_place = self.edits[h].entry(field.to_owned()).or_default();
        by_place.push((place, EditAt { value, at, arrived: BTreeMap::new(), withdrawn: false }));
    }

    /// `h` left `user`'s filter: the user's edits that have not reached CRM stay in the
    /// user's (untracked) copy, by policy.
    pub fn left_filter(&mut self, h: Handle, user: usize) {
        self.handles[h].unprotected = true;
        if !self.handles[h].left_filter_of.contains(&user) {
            self.handles[h].left_filter_of.push(user);
        }
        self.withdraw_unsent(h, user);
    }

    /// `h` entered `user`'s filter (given to them).
    pub fn entered_filter(&mut self, h: Handle, user: usize) {
        self.handles[h].left_filter_of.retain(|&u| u != user);
    }

    pub fn unprotect(&mut self, h: Handle) {
        self.handles[h].unprotected = true;
    }

    /// `user` deleted their copy of `h`. Their edits that had not reached CRM go with it: a
    /// queued update followed by a delete folds into the delete (DOMAIN's coalescing).
    ///
    /// When the delete may reach CRM (`may_delete_in_crm`: DOMAIN's delete matrix deletes the
    /// record for the organiser of a meeting, the owner, or a current task), it also overrides
    /// every edit its author had seen: those values were in the copy the user deleted. If
    /// another user's concurrent update then wins over the delete, the record comes back as
    /// that user's copy holds it, without them; so they are no longer required, only tolerated.
    pub fn deleted_in_outlook(&mut self, h: Handle, user: usize, may_delete_in_crm: bool) {
        self.handles[h].unprotected = true;
        self.handles[h].deleted_in_outlook_by.push(user);
        self.withdraw_unsent(h, user);
        if may_delete_in_crm {
            let place = Place::Outlook(user);
            for by_place in self.edits_of_mut(h) {
                for (origin, e) in by_place.iter_mut() {
                    if *origin == place || e.arrived.contains_key(&place) {
                        e.withdrawn = true;
                    }
                }
            }
        }
    }

    /// `h` was deleted in CRM. If an Outlook update wins over the delete, the record comes back
    /// as that copy holds it (DOMAIN: "the deleted side gets the record back"), and CRM hands a
    /// deleted record out as a delete only, so a copy that had not received a value CRM held
    /// cannot bring it back. Like an owner's delete in Outlook, the delete overrides every value
    /// its author saw: each edit CRM held (made there, or arrived there) is no longer required,
    /// only tolerated. A copy's own edits that had not reached CRM stay required (seed 1659:
    /// the organiser's edit reached CRM and the organiser then deleted the meeting there; an
    /// attendee who never received that edit brought the meeting back without it).
    pub fn deleted_in_crm(&mut self, h: Handle) {
        self.handles[h].unprotected = true;
        for by_place in self.edits_of_mut(h) {
            let held_in_crm =
                |(p, e): &&mut (Place, EditAt)| *p == Place::Crm || e.arrived.contains_key(&Place::Crm);
            for (_, e) in by_place.iter_mut().filter(held_in_crm) {
                e.withdrawn = true;
            }
        }
    }

    fn withdraw_unsent(&mut self, h: Handle, user: usize) {
        for by_place in self.edits_of_mut(h) {
            let unsent = |(p, e): &&mut (Place, EditAt)| {
                *p == Place::Outlook(user) && !e.arrived.contains_key(&Place::Crm)
            };
            for (_, e) in by_place.iter_mut().filter(unsent) {
                e.withdrawn = true;
            }
        }
    }

    fn edits_of_mut(&mut self, h: Handle) -> impl Iterator<Item = &mut Vec<(Place, EditAt)>> {
        self.edits.get_mut(h).into_iter().flat_map(|by_field| by_field.values_mut())
    }

    /// Sees `value` of `field` of `h` at `place` at event `at`: the edits whose value it is have
    /// arrived there.
    pub fn observe(&mut self, h: Handle, field: &str, place: Place, value: Option<&str>, at: u64) {
        let Some(value) = value else { return };
        let Some(by_place) = self.edits.get_mut(h).and_then(|by_field| by_field.get_mut(field)) else {
            return;
        };
        for (origin, edit) in by_place.iter_mut() {
            if *origin != place && edit.value == value {
                edit.arrived.entry(place).or_insert(at);
            }
        }
    }

    /// Sees every field of `h` the model knows edits of, as `fields` holds it at `place`.
    ///
    /// Fields seen unchanged at a place since the last look are skipped: an edit's value is
    /// unique, so a value that arrives changes the fields where it arrives.
    pub fn observe_all(&mut self, h: Handle, place: Place, fields: &crmsync::Fields, at: u64) {
        let Some(by_field) = self.edits.get_mut(h) else { return };
        // Mostly the very same shared field set as last time: equal by pointer, no compare.
        let slot = Self::place_slot(place);
        if self.last_seen.len() <= slot {
            self.last_seen.resize_with(slot + 1, Vec::new);
        }
        let seen = &mut self.last_seen[slot];
        if seen.len() <= h {
            seen.resize_with(h + 1, || None);
        }
        match &mut seen[h] {
            Some(last) if last == fields => return,
            last => *last = Some(fields.clone()),
        }
        for (field, by_place) in by_field.iter_mut() {
            let Some(value) = fields.get(field) else { continue };
            for (origin, edit) in by_place.iter_mut() {
                if *origin != place && edit.value == value {
                    edit.arrived.entry(place).or_insert(at);
                }
            }
        }
    }

    /// Where a place's last-seen fields are kept: CRM first, then each user's mailbox.
    fn place_slot(place: Place) -> usize {
        match place {
            Place::Crm => 0,
            Place::Outlook(u) => u + 1,
        }
    }

    /// The fields of `h` the model knows edits of.
    pub fn fields_of(&self, h: Handle) -> impl Iterator<Item = &str> {
        self.edits.get(h).into_iter().flat_map(|by_field| by_field.keys().map(String::as_str))
    }

    /// What the final value of `field` of `h` must be under `policy`.
    pub fn expect(&self, h: Handle, field: &str, policy: FieldConflictPolicy) -> Option<Expect> {
        let by_place = self.edits.get(h)?.get(field)?;
        let knew = |b_place: Place, b: &EditAt, a_place: Place, a: &EditAt| {
            if a_place == b_place { a.at < b.at } else { a.arrived.get(&b_place).is_some_and(|&t| t < b.at) }
        };
        let dominated = |pa: Place, a: &EditAt, only_required: bool| {
            by_place.iter().any(|(pb, b)| {
                (*pb, b.at) != (pa, a.at) && !(only_required && b.withdrawn) && knew(*pb, b, pa, a)
            })
        };
        let maximal: Vec<(Place, &EditAt)> = by_place
            .iter()
            .filter(|(pa, a)| !a.withdrawn && !dominated(*pa, a, true))
            .map(|(p, e)| (*p, e))
            .collect();
        let tolerated: Vec<String> = by_place
            .iter()
            .filter(|(pa, a)| a.withdrawn && !dominated(*pa, a, true))
            .map(|(_, e)| e.value.clone())
            .collect();
        let crm = maximal.iter().find(|(p, _)| *p == Place::Crm).map(|(_, e)| e.value.clone());
        let outlook: Vec<String> =
            maximal.iter().filter(|(p, _)| *p != Place::Crm).map(|(_, e)| e.value.clone()).collect();
        let expect = match (policy, crm, outlook.as_slice()) {
            (_, None, []) => None,
            (_, Some(c), []) => Some(Expect::Value(c)),
            (_, None, [o]) => Some(Expect::Value(o.clone())),
            (FieldConflictPolicy::CrmWins, Some(c), _) => Some(Expect::Value(c)),
            (FieldConflictPolicy::OutlookWins, _, [o]) => Some(Expect::Value(o.clone())),
            (FieldConflictPolicy::OutlookWins, _, os) => Some(Expect::OneOf(os.to_vec())),
            (_, c, os) => Some(Expect::OneOf(c.into_iter().chain(os.iter().cloned()).collect())),
        };
        match (expect, tolerated.is_empty()) {
            (expect, true) => expect,
            // Only a withdrawn edit is left: the model keeps the latest edit per place, so the
            // value it replaced (which the sides may rightly keep) is not known here.
            (None, false) => None,
            (Some(Expect::Value(v)), false) => {
                Some(Expect::OneOf(std::iter::once(v).chain(tolerated).collect()))
            }
            (Some(Expect::OneOf(vs)), false) => {
                Some(Expect::OneOf(vs.into_iter().chain(tolerated).collect()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> CrmId {
        CrmId::new(uuid::Uuid::from_u128(n)).unwrap()
    }

    #[test]
    fn a_later_edit_that_knew_of_the_earlier_one_wins() {
        let mut m = Model::default();
        let h = m.new_crm_record(id(1));
        m.edit(h, Place::Crm, "subject", "a".into(), 1);
        m.observe(h, "subject", Place::Outlook(0), Some("a"), 2);
        m.edit(h, Place::Outlook(0), "subject", "b".into(), 3);
        assert_eq!(m.expect(h, "subject", FieldConflictPolicy::CrmWins), Some(Expect::Value("b".into())));
    }

    #[test]
    fn concurrent_edits_follow_the_policy() {
        let mut m = Model::default();
        let h = m.new_crm_record(id(1));
        m.edit(h, Place::Crm, "subject", "a".into(), 1);
        m.edit(h, Place::Outlook(0), "subject", "b".into(), 2);
        assert_eq!(m.expect(h, "subject", FieldConflictPolicy::CrmWins), Some(Expect::Value("a".into())));
        assert_eq!(m.expect(h, "subject", FieldConflictPolicy::OutlookWins), Some(Expect::Value("b".into())));
        // Arrival after the other edit was made does not make it known to it.
        m.observe(h, "subject", Place::Outlook(0), Some("a"), 3);
        assert_eq!(m.expect(h, "subject", FieldConflictPolicy::OutlookWins), Some(Expect::Value("b".into())));
    }

    #[test]
    fn an_earlier_edit_that_reached_crm_stands_when_the_later_one_is_withdrawn() {
        // Seed 447: the first edit reached CRM, the second had not when the record left the
        // user's filter; the second stays in the user's copy, CRM rightly keeps the first.
        let mut m = Model::default();
        let h = m.new_crm_record(id(1));
        m.edit(h, Place::Crm, "subject", "a".into(), 1);
        m.observe(h, "subject", Place::Outlook(0), Some("a"), 2);
        m.edit(h, Place::Outlook(0), "subject", "b".into(), 3);
        m.observe(h, "subject", Place::Crm, Some("b"), 4);
        m.edit(h, Place::Outlook(0), "subject", "c".into(), 5);
        assert_eq!(m.expect(h, "subject", FieldConflictPolicy::CrmWins), Some(Expect::Value("c".into())));
        m.left_filter(h, 0);
        let expect = m.expect(h, "subject", FieldConflictPolicy::CrmWins).expect("an expectation");
        assert!(expect.admits(Some("b")), "{expect:?}");
        assert!(!expect.admits(Some("a")), "the first CRM value was overwritten knowingly: {expect:?}");
    }

    #[test]
    fn a_successor_id_finds_its_handle() {
        let mut m = Model::default();
        let h = m.new_crm_record(id(9));
        assert_eq!(m.handle_of_crm_id(id(9).successor()), Some(h));
    }
}
