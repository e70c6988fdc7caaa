//! The edges a scenario's sync run goes through: the real `ServerStore` and `MemoryMailbox`,
//! wrapped so that the faults the script names fire exactly where it says (the `nth` call of a
//! kind, after the `nth` durable step of a kind), with the same effects as the simulator's
//! random faults in [`crate::edge`]: a lost request never reaches the store, a lost answer comes
//! after the store acted, a locked item refuses the sync's writes.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use crmsync::engine::{DurableStep, Interrupt, StepObserver};
use crmsync::fields::FieldPatch;
use crmsync::ids::{CrmId, EntryId, VersionNumber};
use crmsync::server::{
    CrmService, ServerError, ServerStore, SubscriptionId, SubscriptionType, SyncPage, SystemUserId, Updated,
};
use crmsync::summary::SyncSummary;
use crmsync::{Change, ObjectTypeCode, Record};

use super::format::{DurableStepName, Lost, ServerCall};
use crate::fault::FaultKind;

/// A fault of one run, its labels resolved.
#[derive(Debug, Clone)]
pub(crate) enum Fault {
    Crash { step: DurableStepName, nth: u32 },
    Network { call: ServerCall, lost: Lost, nth: u32 },
    Reject { record: Option<CrmId>, call: Option<ServerCall>, nth: Option<u32> },
    Lock { entry: EntryId },
    LoseAcknowledge { nth: u32 },
    DuplicatePage { nth: u32 },
}

/// What the wrappers of one run share: the faults, what fired, and what the server said.
#[derive(Debug, Default)]
pub(crate) struct Desk {
    pub faults: Vec<Fault>,
    /// Per fault, how often it fired.
    pub fired: Vec<u32>,
    /// Per fault, how many calls it matched so far (`Reject` with `nth`).
    matched: Vec<u32>,
    calls: BTreeMap<ServerCall, u32>,
    steps: BTreeMap<String, u32>,
    /// What fired, in order, for the run's line.
    pub notes: Vec<String>,
    pub kinds: Vec<FaultKind>,
    /// The summary of the run's prepare sync.
    pub summary: Option<SyncSummary>,
    /// Pages of get sync data the client received, acknowledges the server heard.
    pub pages: u32,
    pub acks: u32,
}

impl Desk {
    pub(crate) fn new(faults: Vec<Fault>) -> Desk {
        let n = faults.len();
        Desk { faults, fired: vec![0; n], matched: vec![0; n], ..Desk::default() }
    }

    fn note(&mut self, i: usize, kind: FaultKind, what: String) {
        self.fired[i] += 1;
        self.kinds.push(kind);
        self.notes.push(format!("{kind}: {what}"));
    }

    fn count(&mut self, call: ServerCall) -> u32 {
        let n = self.calls.entry(call).or_default();
        *n += 1;
        *n
    }

    /// The network fault of the `n`th `call`, if one is scripted (and notes it).
    fn network(&mut self, call: ServerCall, n: u32) -> Option<Lost> {
        let i = self
            .faults
            .iter()
            .position(|f| matches!(f, Fault::Network { call: c, nth, .. } if *c == call && *nth == n))?;
        let Fault::Network { lost, .. } = self.faults[i] else { return None };
        let (kind, what) = match lost {
            Lost::Request => (FaultKind::NetworkBeforeCall, "request lost"),
            Lost::Answer => (FaultKind::NetworkAfterCall, "answer lost"),
        };
        self.note(i, kind, format!("{} #{n} {what}", call_name(call)));
        Some(lost)
    }

    fn nth_fault(&mut self, n: u32, pick: impl Fn(&Fault) -> Option<u32>) -> Option<usize> {
        self.faults.iter().position(|f| pick(f) == Some(n))
    }

    fn rejects(&mut self, call: ServerCall, crm_id: CrmId) -> bool {
        for i in 0..self.faults.len() {
            let Fault::Reject { record, call: c, nth } = self.faults[i] else { continue };
            if record.is_some_and(|r| r != crm_id) || c.is_some_and(|c| c != call) {
                continue;
            }
            self.matched[i] += 1;
            if nth.is_none_or(|nth| nth == self.matched[i]) {
                self.note(i, FaultKind::ItemRejected, format!("{} of {crm_id} rejected", call_name(call)));
                return true;
            }
        }
        false
    }

    fn locked(&mut self, entry_id: &EntryId) -> bool {
        let i = self.faults.iter().position(|f| matches!(f, Fault::Lock { entry } if entry == entry_id));
        if let Some(i) = i {
            self.note(i, FaultKind::ItemLocked, format!("item {entry_id} locked"));
        }
        i.is_some()
    }
}

pub(crate) fn call_name(call: ServerCall) -> &'static str {
    match call {
        ServerCall::PrepareSync => "prepare_sync",
        ServerCall::GetSyncData => "get_sync_data",
        ServerCall::Acknowledge => "acknowledge",
        ServerCall::CreateRecord => "create_record",
        ServerCall::UpdateRecord => "update_record",
        ServerCall::DeleteRecord => "delete_record",
        ServerCall::FetchRecord => "fetch_record",
    }
}

pub(crate) fn step_of(name: DurableStepName) -> DurableStep {
    match name {
        DurableStepName::QueueServerPage => DurableStep::QueueServerPage,
        DurableStepName::AcknowledgeServerPage => DurableStep::AcknowledgeServerPage,
        DurableStepName::QueueMailboxPage => DurableStep::QueueMailboxPage,
        DurableStepName::ApplyAction => DurableStep::ApplyAction,
        DurableStepName::FlushMailbox => DurableStep::FlushMailbox,
        DurableStepName::SettleAction => DurableStep::SettleAction,
        DurableStepName::CommitGroup => DurableStep::CommitGroup,
        DurableStepName::RestoreLinks => DurableStep::RestoreLinks,
        DurableStepName::Reconcile => DurableStep::Reconcile,
    }
}

pub(crate) type SharedDesk = Rc<RefCell<Desk>>;

/// The server as a scripted network reaches it.
pub(crate) struct ScriptServer<'a> {
    pub store: &'a mut ServerStore,
    pub desk: SharedDesk,
    last_page: Option<SyncPage>,
}

impl<'a> ScriptServer<'a> {
    pub(crate) fn new(store: &'a mut ServerStore, desk: SharedDesk) -> Self {
        ScriptServer { store, desk, last_page: None }
    }

    fn call<T>(
        &mut self,
        call: ServerCall,
        n: u32,
        act: impl FnOnce(&mut ServerStore) -> Result<T, ServerError>,
    ) -> Result<T, ServerError> {
        let lost = self.desk.borrow_mut().network(call, n);
        let name = call_name(call);
        if lost == Some(Lost::Request) {
            return Err(ServerError::Unreachable(format!("{name}: request lost")));
        }
        let answer = act(self.store);
        if lost == Some(Lost::Answer) {
            return Err(ServerError::Unreachable(format!("{name}: answer lost")));
        }
        answer
    }

    fn write<T>(
        &mut self,
        call: ServerCall,
        crm_id: CrmId,
        act: impl FnOnce(&mut ServerStore) -> Result<T, ServerError>,
    ) -> Result<T, ServerError> {
        let n = self.desk.borrow_mut().count(call);
        if self.desk.borrow_mut().rejects(call, crm_id) {
            return Err(ServerError::Rejected { crm_id, reason: "refused by a plug-in (scenario)".into() });
        }
        self.call(call, n, act)
    }
}

impl CrmService for ScriptServer<'_> {
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
        let n = self.desk.borrow_mut().count(ServerCall::PrepareSync);
        let summary = self.call(ServerCall::PrepareSync, n, |s| s.prepare_sync(subscription))?;
        self.desk.borrow_mut().summary = Some(summary.clone());
        Ok(summary)
    }

    fn get_sync_data(
        &mut self,
        subscription: SubscriptionId,
        after: Option<u64>,
        page_size: usize,
    ) -> Result<SyncPage, ServerError> {
        let n = self.desk.borrow_mut().count(ServerCall::GetSyncData);
        if let Some(page) = self.last_page.clone() {
            let mut desk = self.desk.borrow_mut();
            let dup = desk.nth_fault(n, |f| match f {
                Fault::DuplicatePage { nth } => Some(*nth),
                _ => None,
            });
            if let Some(i) = dup {
                desk.note(
                    i,
                    FaultKind::DuplicatePage,
                    format!("page through seq {:?} delivered again", page.last_seq),
                );
                desk.pages += 1;
                return Ok(page);
            }
        }
        let page =
            self.call(ServerCall::GetSyncData, n, |s| s.get_sync_data(subscription, after, page_size))?;
        self.desk.borrow_mut().pages += 1;
        self.last_page = Some(page.clone());
        Ok(page)
    }

    fn acknowledge(&mut self, subscription: SubscriptionId, through: u64) -> Result<(), ServerError> {
        let n = self.desk.borrow_mut().count(ServerCall::Acknowledge);
        {
            let mut desk = self.desk.borrow_mut();
            let lost = desk.nth_fault(n, |f| match f {
                Fault::LoseAcknowledge { nth } => Some(*nth),
                _ => None,
            });
            if let Some(i) = lost {
                desk.note(i, FaultKind::LostAcknowledge, format!("acknowledge through {through} lost"));
                return Ok(());
            }
        }
        self.call(ServerCall::Acknowledge, n, |s| s.acknowledge(subscription, through))?;
        self.desk.borrow_mut().acks += 1;
        Ok(())
    }

    fn create_record(
        &mut self,
        subscription: SubscriptionId,
        crm_id: CrmId,
        object_type: ObjectTypeCode,
        record: &Record,
    ) -> Result<VersionNumber, ServerError> {
        self.write(ServerCall::CreateRecord, crm_id, |s| {
            s.create_record(subscription, crm_id, object_type, record)
        })
    }

    fn fetch_record(
        &mut self,
        subscription: SubscriptionId,
        crm_id: CrmId,
    ) -> Result<Option<Change>, ServerError> {
        let n = self.desk.borrow_mut().count(ServerCall::FetchRecord);
        self.call(ServerCall::FetchRecord, n, |s| s.fetch_record(subscription, crm_id))
    }

    fn update_record(&mut self, crm_id: CrmId, patch: &FieldPatch) -> Result<Updated, ServerError> {
        self.write(ServerCall::UpdateRecord, crm_id, |s| s.update_record(crm_id, patch))
    }

    fn update_record_if(
        &mut self,
        crm_id: CrmId,
        patch: &FieldPatch,
        expected: VersionNumber,
    ) -> Result<Updated, ServerError> {
        // The same call as far as a script's faults go.
        self.write(ServerCall::UpdateRecord, crm_id, |s| s.update_record_if(crm_id, patch, expected))
    }

    fn delete_record(&mut self, crm_id: CrmId) -> Result<VersionNumber, ServerError> {
        self.write(ServerCall::DeleteRecord, crm_id, |s| s.delete_record(crm_id))
    }
}

/// A script's locked items: the sync finds an item locked where the script says.
impl crate::edge::ItemLocks for SharedDesk {
    fn locked(&mut self, entry_id: &EntryId) -> bool {
        self.borrow_mut().locked(entry_id)
    }
}

/// A user's mailbox as the sync writes it: a scripted item may be locked.
pub(crate) type ScriptMailbox<'a> = crate::edge::LockingMailbox<'a, SharedDesk>;

/// Kills the "process" after the `nth` durable step of a scripted kind.
pub(crate) struct ScriptCrash {
    pub desk: SharedDesk,
}

impl StepObserver for ScriptCrash {
    fn after(&mut self, step: DurableStep) -> Result<(), Interrupt> {
        let mut desk = self.desk.borrow_mut();
        let key = format!("{step:?}");
        let n = {
            let n = desk.steps.entry(key).or_default();
            *n += 1;
            *n
        };
        let hit = desk
            .faults
            .iter()
            .position(|f| matches!(f, Fault::Crash { step: s, nth } if step_of(*s) == step && *nth == n));
        if let Some(i) = hit {
            desk.note(i, FaultKind::Crash, format!("killed after {step:?} #{n}"));
            return Err(Interrupt);
        }
        Ok(())
    }
}
