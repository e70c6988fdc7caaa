//! The simulator's copy of the server's records, as the checks and actors read them after every
//! run. The copy keeps the newest server version it saw and reads only what the server wrote or
//! deleted since (`ServerStore::changed_since`), instead of decoding a user's whole filter again
//! after every run.
//!
//! Sound because every server write and delete takes a new, never reused version number (the
//! server's `Counter`), attendees included, and a deleted record never comes back (its
//! tombstone refuses it).

use std::cell::{Ref, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use crmsync::ids::{CrmId, VersionNumber};
use crmsync::index::IdMap;
use crmsync::server::{ServerError, ServerRecord, ServerStore, SystemUserId};

/// Every live record as of `seen`, by `CrmId`. Records are shared (`Rc`): a reader after every
/// run gets the user's filter as handles, not as copies of every record.
#[derive(Debug, Default)]
pub struct Mirror {
    inner: RefCell<Held>,
}

#[derive(Debug, Default)]
struct Held {
    records: BTreeMap<CrmId, Kept>,
    /// The keys of `records`, to ask (the checks ask about every record the model knows after
    /// every run; never iterated).
    live: IdMap<CrmId, ()>,
    seen: VersionNumber,
}

impl Mirror {
    /// The live records in `user`'s filter, in `CrmId` order: equal to
    /// `server.records_in_filter(user)` (the tests below hold it to that).
    pub fn in_filter(
        &self,
        server: &ServerStore,
        user: SystemUserId,
    ) -> Result<Vec<Rc<ServerRecord>>, ServerError> {
        self.records_where(server, |k| k.is_in_filter_of(user))
    }

    /// The live records `user` owns, in `CrmId` order: the records of
    /// [`in_filter`](Mirror::in_filter) whose owner is `user`.
    pub fn owned_by(
        &self,
        server: &ServerStore,
        user: SystemUserId,
    ) -> Result<Vec<Rc<ServerRecord>>, ServerError> {
        self.records_where(server, |k| k.owner == user)
    }

    /// The ids of the server's live records, as a set to ask (equal to `server.record_ids()`).
    pub fn live(&self, server: &ServerStore) -> Result<Live<'_>, ServerError> {
        self.refresh(server)?;
        Ok(Live(self.inner.borrow()))
    }

    /// The live records `keep` selects, in `CrmId` order.
    fn records_where(
        &self,
        server: &ServerStore,
        keep: impl Fn(&Kept) -> bool,
    ) -> Result<Vec<Rc<ServerRecord>>, ServerError> {
        self.refresh(server)?;
        let held = self.inner.borrow();
        Ok(held.records.values().filter(|k| keep(k)).map(|k| k.record.clone()).collect())
    }

    /// Reads what the server wrote and deleted since the newest version seen.
    fn refresh(&self, server: &ServerStore) -> Result<(), ServerError> {
        let mut held = self.inner.borrow_mut();
        let changed = server.changed_since(held.seen)?;
        for record in changed.written {
            held.seen = held.seen.max(record.version);
            held.live.insert(record.crm_id, ());
            held.records.insert(record.crm_id, Kept::new(record));
        }
        for (crm_id, version) in changed.deleted {
            held.seen = held.seen.max(version);
            held.live.remove(&crm_id);
            held.records.remove(&crm_id);
        }
        Ok(())
    }
}

/// A record as the mirror keeps it: beside it, what the filter asks of every record, so that
/// listing a user's filter reads the record itself only for a meeting with attendees.
#[derive(Debug)]
struct Kept {
    owner: SystemUserId,
    /// A calendar item with attendees: whether it is in a filter depends on them.
    attended: bool,
    record: Rc<ServerRecord>,
}

impl Kept {
    fn new(record: ServerRecord) -> Kept {
        let attended = record.object_type.is_calendar() && !record.attendees.is_empty();
        Kept { owner: record.owner, attended, record: Rc::new(record) }
    }

    /// [`ServerRecord::is_in_filter_of`].
    fn is_in_filter_of(&self, user: SystemUserId) -> bool {
        self.owner == user || (self.attended && self.record.is_in_filter_of(user))
    }
}

/// The live records' ids as the mirror held them when asked.
pub struct Live<'a>(Ref<'a, Held>);

impl Live<'_> {
    pub fn contains(&self, crm_id: CrmId) -> bool {
        self.0.live.contains_key(&crm_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use crmsync::ObjectTypeCode;
    use crmsync::clock::ManualClock;
    use crmsync::fields::{FieldPatch, Fields};
    use crmsync::ids::VersionNumber;
    use crmsync::server::CrmService;
    use uuid::Uuid;

    fn user(n: u128) -> SystemUserId {
        SystemUserId::new(Uuid::from_u128(n)).unwrap()
    }

    fn record(
        n: u128,
        otc: ObjectTypeCode,
        owner: SystemUserId,
        attendees: Vec<SystemUserId>,
    ) -> ServerRecord {
        ServerRecord {
            crm_id: CrmId::new(Uuid::from_u128(n)).unwrap(),
            object_type: otc,
            owner,
            version: VersionNumber(0),
            fields: Fields::try_from_pairs([("subject", "first")]).unwrap(),
            goid: None,
            status: crmsync::ActivityStatus::Open,
            attendees,
        }
    }

    #[test]
    fn the_mirror_reads_what_the_server_holds_after_every_kind_of_write() {
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 1, 5, 8, 0, 0).unwrap());
        let mut server = ServerStore::in_memory(Box::new(clock)).unwrap();
        let (a, b) = (user(1), user(2));
        server.add_user(a, "A").unwrap();
        server.add_user(b, "B").unwrap();
        let mirror = Mirror::default();
        let check = |server: &ServerStore| {
            for u in [a, b] {
                let mirrored: Vec<ServerRecord> =
                    mirror.in_filter(server, u).unwrap().into_iter().map(Rc::unwrap_or_clone).collect();
                assert_eq!(mirrored, server.records_in_filter(u).unwrap());
                let owned: Vec<ServerRecord> = mirrored.into_iter().filter(|r| r.owner == u).collect();
                let mirrored: Vec<ServerRecord> =
                    mirror.owned_by(server, u).unwrap().into_iter().map(Rc::unwrap_or_clone).collect();
                assert_eq!(mirrored, owned);
            }
            for n in [10, 11, 12] {
                let crm_id = CrmId::new(Uuid::from_u128(n)).unwrap();
                assert_eq!(
                    mirror.live(server).unwrap().contains(crm_id),
                    server.record_ids().unwrap().contains(&crm_id)
                );
            }
        };
        let task = record(10, ObjectTypeCode::Task, a, vec![]);
        let meeting = record(11, ObjectTypeCode::Appointment, a, vec![a, b]);
        server.put_record(&task).unwrap();
        server.put_record(&meeting).unwrap();
        check(&server);
        assert_eq!(mirror.in_filter(&server, b).unwrap().len(), 1, "b attends the meeting");
        // A field edit, an owner change, an uninvite, a delete: each seen on the next read.
        let patch =
            FieldPatch::between(&task.fields, &Fields::try_from_pairs([("subject", "second")]).unwrap());
        server.update_record(task.crm_id, &patch).unwrap();
        check(&server);
        server.change_owner(task.crm_id, b).unwrap();
        check(&server);
        server.set_attendees(meeting.crm_id, vec![a]).unwrap();
        check(&server);
        assert_eq!(mirror.in_filter(&server, b).unwrap().len(), 1, "b holds only the task");
        server.delete_record(task.crm_id).unwrap();
        check(&server);
        assert!(mirror.in_filter(&server, b).unwrap().is_empty());
    }
}
