//! The edges the engine runs through inside the simulator: the real `ServerStore` and
//! `MemoryMailbox`, wrapped so the fault catalogue can act on every call, an observer that kills
//! the "process" after a durable step, and a machine clock that can be skewed.
//!
//! The wrappers decide only *whether* a fault fires (from the fault streams); what a fault does
//! is what the real world would do: a lost request never reaches the store, a lost answer comes
//! after the store acted, a late page is a page the server really handed out before.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use chrono::{DateTime, Duration, Utc};
use crmsync::clock::{Clock, ManualClock};
use crmsync::engine::{DurableStep, Interrupt, StepObserver};
use crmsync::fields::FieldPatch;
use crmsync::ids::{CrmId, EntryId, GlobalObjectId, VersionNumber};
use crmsync::mailbox::SyncBase;
use crmsync::mailbox::{
    ChangePage, Mailbox, MailboxCursor, MailboxError, MailboxItem, MemoryMailbox, NewItem,
};
use crmsync::server::{
    CrmService, ServerError, ServerStore, SubscriptionId, SubscriptionType, SyncPage, SystemUserId, Updated,
};
use crmsync::summary::SyncSummary;
use crmsync::{Change, ObjectTypeCode, Record};

use crate::fault::{FaultKind, Faults};

/// The faults of the world and the notes the wrappers leave for the trace, shared by the
/// wrappers of one run (one thread; a `RefCell` is enough).
#[derive(Debug)]
pub struct FaultDesk {
    pub faults: Faults,
    /// What fired during the current run, in order, for the trace.
    pub notes: Vec<String>,
    /// Per subscription, a page handed out earlier: what a late delivery brings back.
    pub old_pages: BTreeMap<SubscriptionId, SyncPage>,
}

impl FaultDesk {
    fn fire(&mut self, kind: FaultKind, what: impl FnOnce() -> String) -> bool {
        let fired = self.faults.fire(kind);
        if fired {
            let note = format!("{kind}: {}", what());
            self.notes.push(note);
        }
        fired
    }
}

pub type Desk = Rc<RefCell<FaultDesk>>;

/// The server as one machine reaches it: over a network that loses requests and answers,
/// delivers pages twice or late, and loses acknowledgements.
pub struct SimServer<'a> {
    pub store: &'a mut ServerStore,
    pub desk: Desk,
    /// The page this run was handed last (what a duplicate delivery repeats).
    last_page: Option<SyncPage>,
}

impl<'a> SimServer<'a> {
    pub fn new(store: &'a mut ServerStore, desk: Desk) -> Self {
        SimServer { store, desk, last_page: None }
    }

    fn call<T>(
        &mut self,
        name: &str,
        act: impl FnOnce(&mut ServerStore) -> Result<T, ServerError>,
    ) -> Result<T, ServerError> {
        if self.desk.borrow_mut().fire(FaultKind::NetworkBeforeCall, || format!("{name} request lost")) {
            return Err(ServerError::Unreachable(format!("{name}: request lost")));
        }
        let answer = act(self.store);
        if self.desk.borrow_mut().fire(FaultKind::NetworkAfterCall, || format!("{name} answer lost")) {
            return Err(ServerError::Unreachable(format!("{name}: answer lost")));
        }
        answer
    }

    fn reject(&mut self, crm_id: CrmId) -> Result<(), ServerError> {
        if self.desk.borrow_mut().fire(FaultKind::ItemRejected, || format!("write of {crm_id} rejected")) {
            return Err(ServerError::Rejected { crm_id, reason: "refused by a plug-in (simulated)".into() });
        }
        Ok(())
    }
}

impl CrmService for SimServer<'_> {
    fn register_client(
        &mut self,
        user: SystemUserId,
        machine: &str,
        kind: SubscriptionType,
    ) -> Result<SubscriptionId, ServerError> {
        self.store.register_client(user, machine, kind)
    }

    fn is_primary_client(&self, subscription: SubscriptionId) -> Result<bool, ServerError> {
        self.store.is_primary_client(subscription)
    }

    fn primary_term(&self, subscription: SubscriptionId) -> Result<Option<u64>, ServerError> {
        self.store.primary_term(subscription)
    }

    fn set_primary_client(&mut self, subscription: SubscriptionId) -> Result<(), ServerError> {
        self.store.set_primary_client(subscription)
    }

    fn unregister_client(&mut self, subscription: SubscriptionId) -> Result<(), ServerError> {
        self.store.unregister_client(subscription)
    }

    fn prepare_sync(&mut self, subscription: SubscriptionId) -> Result<SyncSummary, ServerError> {
        self.last_page = None;
        self.call("prepare_sync", |s| s.prepare_sync(subscription))
    }

    fn get_sync_data(
        &mut self,
        subscription: SubscriptionId,
        after: Option<u64>,
        page_size: usize,
    ) -> Result<SyncPage, ServerError> {
        if let Some(page) = self.last_page.clone() {
            let dup = self.desk.borrow_mut().fire(FaultKind::DuplicatePage, || {
                format!("page through seq {:?} delivered again", page.last_seq)
            });
            if dup {
                return Ok(page);
            }
        }
        let old = self.desk.borrow().old_pages.get(&subscription).cloned();
        if let Some(old) = old {
            let late = self.desk.borrow_mut().fire(FaultKind::LatePage, || {
                format!(
                    "an earlier page ({} changes, seq {:?}) arrives late",
                    old.changes.len(),
                    old.last_seq
                )
            });
            if late {
                return Ok(old);
            }
        }
        let page = self.call("get_sync_data", |s| s.get_sync_data(subscription, after, page_size))?;
        self.last_page = Some(page.clone());
        if !page.changes.is_empty() {
            self.desk.borrow_mut().old_pages.insert(subscription, page.clone());
        }
        Ok(page)
    }

    fn acknowledge(&mut self, subscription: SubscriptionId, through: u64) -> Result<(), ServerError> {
        if self
            .desk
            .borrow_mut()
            .fire(FaultKind::LostAcknowledge, || format!("acknowledge through {through} lost"))
        {
            return Ok(());
        }
        self.call("acknowledge", |s| s.acknowledge(subscription, through))
    }

    fn create_record(
        &mut self,
        subscription: SubscriptionId,
        crm_id: CrmId,
        object_type: ObjectTypeCode,
        record: &Record,
    ) -> Result<VersionNumber, ServerError> {
        self.reject(crm_id)?;
        self.call("create_record", |s| s.create_record(subscription, crm_id, object_type, record))
    }

    fn fetch_record(
        &mut self,
        subscription: SubscriptionId,
        crm_id: CrmId,
    ) -> Result<Option<Change>, ServerError> {
        self.call("fetch_record", |s| s.fetch_record(subscription, crm_id))
    }

    fn update_record(&mut self, crm_id: CrmId, patch: &FieldPatch) -> Result<Updated, ServerError> {
        self.reject(crm_id)?;
        self.call("update_record", |s| s.update_record(crm_id, patch))
    }

    fn update_record_if(
        &mut self,
        crm_id: CrmId,
        patch: &FieldPatch,
        expected: VersionNumber,
    ) -> Result<Updated, ServerError> {
        self.reject(crm_id)?;
        self.call("update_record", |s| s.update_record_if(crm_id, patch, expected))
    }

    fn delete_record(&mut self, crm_id: CrmId) -> Result<VersionNumber, ServerError> {
        self.reject(crm_id)?;
        self.call("delete_record", |s| s.delete_record(crm_id))
    }
}

/// Decides, at each sync write to an item, whether the item is locked (open in an editor).
pub trait ItemLocks {
    fn locked(&mut self, entry_id: &EntryId) -> bool;
}

/// The seed's faults: `ItemLocked` fires at its rate.
impl ItemLocks for Desk {
    fn locked(&mut self, entry_id: &EntryId) -> bool {
        self.borrow_mut().fire(FaultKind::ItemLocked, || format!("item {entry_id} locked"))
    }
}

/// A user's mailbox as the sync on one machine writes it: an item may be locked, as `locks`
/// decides (the seed's faults here, a script's in `scenario`). Reads and user edits pass
/// through.
pub struct LockingMailbox<'a, L: ItemLocks> {
    pub inner: &'a mut MemoryMailbox,
    pub locks: L,
}

/// The simulator's mailbox edge.
pub type SimMailbox<'a> = LockingMailbox<'a, Desk>;

impl<L: ItemLocks> LockingMailbox<'_, L> {
    fn lock(&mut self, entry_id: &EntryId) -> Result<(), MailboxError> {
        if self.locks.locked(entry_id) {
            return Err(MailboxError::Locked(entry_id.clone()));
        }
        Ok(())
    }
}

impl<L: ItemLocks> Mailbox for LockingMailbox<'_, L> {
    fn changes_since(&self, cursor: MailboxCursor, limit: usize) -> Result<ChangePage, MailboxError> {
        self.inner.changes_since(cursor, limit)
    }
    fn head(&self) -> Result<MailboxCursor, MailboxError> {
        self.inner.head()
    }
    fn get(&self, entry_id: &EntryId) -> Result<Option<MailboxItem>, MailboxError> {
        self.inner.get(entry_id)
    }
    fn create(&mut self, item: NewItem) -> Result<EntryId, MailboxError> {
        self.inner.create(item)
    }
    fn update(&mut self, entry_id: &EntryId, patch: &FieldPatch) -> Result<(), MailboxError> {
        self.lock(entry_id)?;
        self.inner.update(entry_id, patch)
    }
    fn delete(&mut self, entry_id: &EntryId) -> Result<(), MailboxError> {
        self.lock(entry_id)?;
        self.inner.delete(entry_id)
    }
    fn set_stamp(&mut self, entry_id: &EntryId, stamp: Option<CrmId>) -> Result<(), MailboxError> {
        self.lock(entry_id)?;
        self.inner.set_stamp(entry_id, stamp)
    }
    fn link(&mut self, entry_id: &EntryId, stamp: CrmId, base: SyncBase) -> Result<(), MailboxError> {
        self.lock(entry_id)?;
        self.inner.link(entry_id, stamp, base)
    }
    fn update_and_link(
        &mut self,
        entry_id: &EntryId,
        patch: &FieldPatch,
        stamp: CrmId,
        base: SyncBase,
    ) -> Result<(), MailboxError> {
        // One write, so one chance to find the item locked.
        self.lock(entry_id)?;
        self.inner.update_and_link(entry_id, patch, stamp, base)
    }
    fn find_by_goid(&self, goid: &GlobalObjectId) -> Result<Option<EntryId>, MailboxError> {
        self.inner.find_by_goid(goid)
    }
    fn find_by_stamp(&self, stamp: CrmId) -> Result<Option<EntryId>, MailboxError> {
        self.inner.find_by_stamp(stamp)
    }
    fn all_items(&self) -> Result<Vec<MailboxItem>, MailboxError> {
        self.inner.all_items()
    }
    fn flush(&mut self) -> Result<(), MailboxError> {
        self.inner.flush()
    }
}

/// Kills the "process" right after a durable step when the crash fault fires there.
pub struct CrashPoint {
    pub desk: Desk,
    pub steps: u64,
    pub crashed_at: Option<DurableStep>,
}

impl StepObserver for CrashPoint {
    fn after(&mut self, step: DurableStep) -> Result<(), Interrupt> {
        self.steps += 1;
        let n = self.steps;
        if self
            .desk
            .borrow_mut()
            .fire(FaultKind::Crash, || format!("killed after durable step {n} ({step:?})"))
        {
            self.crashed_at = Some(step);
            return Err(Interrupt);
        }
        Ok(())
    }
}

/// A machine's clock: the world's virtual clock plus the skew of the machine in use.
#[derive(Clone)]
pub struct MachineClock {
    pub world: Rc<ManualClock>,
    pub skew_s: Rc<Cell<i64>>,
}

impl Clock for MachineClock {
    fn now(&self) -> DateTime<Utc> {
        self.world.now() + Duration::seconds(self.skew_s.get())
    }
}
