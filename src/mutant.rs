//! Deliberately broken variants of the engine, for the simulator to prove that it catches bugs
//! (`sim/tests/mutants.rs`, results in `sim/MUTANTS.md`).
//!
//! Each [`Mutant`] is one plausible bug a developer could write: skipping the GOID search,
//! dequeuing a change before applying it, retrying a create without its idempotency key, and so
//! on. The engine (and, for coalescing, the queue) holds one hook per mutant:
//! `if mutant::active(Mutant::X) { ...the broken behaviour... }`.
//!
//! Without the cargo feature `mutants` (off by default, never in a release build), [`active`]
//! is a `const fn` returning `false`: every hook is dead code the compiler removes, and there is
//! no way to switch one on. With it, [`with`] switches one mutant on for the current thread
//! while a closure runs (tests running in parallel on other threads do not see it), and
//! restores the previous state on exit, also when the closure panics.

/// One deliberately broken variant of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mutant {
    /// A CRM meeting is created in Outlook without first looking for the attendee's copy with
    /// the same GOID (`engine::create_in_outlook`): a duplicate meeting.
    SkipGoidSearch,
    /// An action's queue entries are removed (durably) before its writes are made
    /// (`engine::run`): a write that fails, or a crash before it, loses the change.
    DequeueBeforeApply,
    /// The mapping of a create in CRM is written before the record exists (`engine::run`): a
    /// create that fails leaves the item linked to a record that was never made.
    MapBeforeItemExists,
    /// The item a create in CRM was made from is not stamped with the new record's `CrmId`
    /// (`engine::apply`): the item looks tracked and never synced.
    NoStamp,
    /// Coalescing folds a create followed by a delete into the create (`queue::coalesce`): the
    /// delete is lost and the record or item comes back.
    CoalesceCreateDeleteWrongly,
    /// A create in CRM whose item already carries the stamp of an earlier try (an attempt that
    /// failed or whose answer was lost) is retried under a fresh `CrmId` (`engine::run`): the
    /// earlier record, if it landed, is duplicated.
    RetryWithoutIdempotencyKey,
    /// The Outlook changes of one item are folded in the order of a hash of their queue ids,
    /// not in queue order (`queue::coalesce`): an older snapshot can win over a newer one.
    HashOrderOutlookChanges,
    /// The engine remembers the highest page sequence number it has queued, across runs, and
    /// skips (while acknowledging) any page at or below it as a re-delivery (`engine::run`).
    /// Sequence numbers restart at every *prepare sync*, so the next runs' pages are lost.
    DropRedeliveredPage,
    /// A page of *get sync data* is acknowledged before it is queued (`engine::run`): a crash in
    /// between loses it, since the server will not hand it out again.
    AcknowledgeBeforeQueue,
    /// A CRM update is written unconditionally instead of on the version its merge started from
    /// (`engine::apply`): a CRM edit made in between is overwritten.
    UnconditionalCrmUpdate,
}

impl Mutant {
    /// Every mutant, in declaration order.
    pub const ALL: [Mutant; 10] = [
        Mutant::SkipGoidSearch,
        Mutant::DequeueBeforeApply,
        Mutant::MapBeforeItemExists,
        Mutant::NoStamp,
        Mutant::CoalesceCreateDeleteWrongly,
        Mutant::RetryWithoutIdempotencyKey,
        Mutant::HashOrderOutlookChanges,
        Mutant::DropRedeliveredPage,
        Mutant::AcknowledgeBeforeQueue,
        Mutant::UnconditionalCrmUpdate,
    ];
}

impl std::fmt::Display for Mutant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[cfg(feature = "mutants")]
thread_local! {
    static ACTIVE: std::cell::Cell<Option<Mutant>> = const { std::cell::Cell::new(None) };
}

/// Whether `m` is switched on for this thread. Always `false` without the feature `mutants`.
#[cfg(not(feature = "mutants"))]
#[inline(always)]
pub const fn active(m: Mutant) -> bool {
    let _ = m;
    false
}

/// Whether `m` is switched on for this thread.
#[cfg(feature = "mutants")]
#[inline]
pub fn active(m: Mutant) -> bool {
    ACTIVE.with(|a| a.get() == Some(m))
}

/// Runs `f` with `m` switched on for this thread only, then restores what was on before (also
/// when `f` panics).
#[cfg(feature = "mutants")]
pub fn with<R>(m: Mutant, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Mutant>);
    impl Drop for Restore {
        fn drop(&mut self) {
            ACTIVE.with(|a| a.set(self.0));
        }
    }
    let _restore = Restore(ACTIVE.with(|a| a.replace(Some(m))));
    f()
}

/// The fresh id a non-idempotent retry uses instead of `crm_id` (deterministic, so a seed
/// replays).
#[cfg(feature = "sqlite")]
pub(crate) fn fresh_id(crm_id: crate::ids::CrmId) -> crate::ids::CrmId {
    let id = uuid::Uuid::new_v5(crm_id.as_uuid(), b"crmsync/mutant/retry");
    crate::ids::CrmId::new(id).unwrap_or(crm_id)
}

/// A hash of a queue id (the hash order of [`Mutant::HashOrderOutlookChanges`]; SipHash with
/// fixed keys, so a seed replays).
pub(crate) fn hash_of(id: crate::queue::QueueId) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// [`Mutant::DropRedeliveredPage`]: whether a page's sequence number is at or below the highest
/// one this cache has queued (kept in the cache, across runs), else remembers it.
#[cfg(feature = "sqlite")]
pub(crate) fn page_seen(
    cache: &mut crate::cache::SyncCache,
    last_seq: Option<u64>,
) -> Result<bool, crate::engine::EngineError> {
    const KEY: &str = "mutant:highest_seq";
    let Some(seq) = last_seq else { return Ok(false) };
    let highest = cache.meta(KEY)?.and_then(|v| v.parse::<u64>().ok());
    if highest.is_some_and(|h| seq <= h) {
        return Ok(true);
    }
    cache.set_meta(KEY, &seq.to_string())?;
    Ok(false)
}

/// [`Mutant::RetryWithoutIdempotencyKey`]: a create in CRM whose item already carries the
/// action's stamp (an earlier try got that far) is retried as a new create under a fresh id.
#[cfg(feature = "sqlite")]
pub(crate) fn retry_under_new_id<M: crate::mailbox::Mailbox>(
    action: &crate::plan::Action,
    mailbox: &M,
) -> Result<Option<crate::plan::Action>, crate::engine::EngineError> {
    use crate::plan::{ActionOp, LinkChange};
    let ActionOp::CreateInCrm { crm_id, entry_id, fields, to_outlook } = &action.op else { return Ok(None) };
    if mailbox.get(entry_id)?.and_then(|i| i.stamp()) != Some(*crm_id) {
        return Ok(None);
    }
    let fresh = fresh_id(*crm_id);
    let mut renamed = action.clone();
    renamed.op = ActionOp::CreateInCrm {
        crm_id: fresh,
        entry_id: entry_id.clone(),
        fields: fields.clone(),
        to_outlook: to_outlook.clone(),
    };
    match &mut renamed.link {
        LinkChange::Link(p) => p.crm_id = fresh,
        LinkChange::Replace { link, .. } => link.crm_id = fresh,
        LinkChange::Keep | LinkChange::Remove(_) => {}
    }
    Ok(Some(renamed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_active_by_default() {
        for m in Mutant::ALL {
            assert!(!active(m), "{m}");
        }
    }

    #[cfg(feature = "mutants")]
    #[test]
    fn with_switches_one_on_for_this_thread_and_restores() {
        with(Mutant::NoStamp, || {
            assert!(active(Mutant::NoStamp));
            assert!(!active(Mutant::SkipGoidSearch));
            let other = std::thread::spawn(|| active(Mutant::NoStamp)).join().unwrap();
            assert!(!other, "another thread sees nothing switched on");
            with(Mutant::SkipGoidSearch, || assert!(active(Mutant::SkipGoidSearch)));
            assert!(active(Mutant::NoStamp), "the outer mutant is back");
        });
        assert!(!active(Mutant::NoStamp));
        let caught = std::panic::catch_unwind(|| with(Mutant::NoStamp, || panic!("boom")));
        assert!(caught.is_err());
        assert!(!active(Mutant::NoStamp), "restored after a panic");
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn a_fresh_id_differs_and_replays() {
        use crate::ids::CrmId;
        let id = CrmId::new(uuid::Uuid::from_u128(7)).unwrap();
        assert_ne!(fresh_id(id), id);
        assert_eq!(fresh_id(id), fresh_id(id));
    }
}
