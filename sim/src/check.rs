//! The checkers: safety after every sync run, convergence after the liveness phase (DOMAIN
//! section 6). Each check reads the world through the same public edges a support engineer has
//! (the server's records, the mailbox's items, the cache file) and the reference model; none
//! asks the engine what it meant to do.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::hash::BuildHasherDefault;
use std::rc::Rc;

use crmsync::ids::{CrmId, EntryId};
use crmsync::index::{IdHasher, IdMap};
use crmsync::mailbox::{Mailbox, MailboxItem, Tracking};
use crmsync::queue::QueueEntry;
use crmsync::server::{CrmService, ServerRecord};
use crmsync::settle::SyncState;
use crmsync::{ChangeOp, RecordKey};

use crate::world::World;

/// A broken invariant: which event, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub at: u64,
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "event {}: {}", self.at, self.what)
    }
}

/// A set to ask, never to list: the checks after every run look things up in these (no order
/// of theirs reaches a verdict: every check walks items and records in their own order).
type IdSet<K> = HashSet<K, BuildHasherDefault<IdHasher>>;

fn fail<T>(w: &World, what: String) -> Result<T, Violation> {
    Err(w.violation(what))
}

/// The cache's state as the engine left it (shared: a finished run's state is kept by the
/// cache, so the checks after every run need not read the file again).
fn load(w: &World, m: usize) -> Result<Rc<SyncState>, Violation> {
    let state = match w.cache(m).load_shared() {
        Ok(state) => state,
        Err(e) => return fail(w, format!("the cache of machine {m} does not load: {e}")),
    };
    if let Err(e) = state.mapping.check_invariants() {
        return fail(w, format!("the mapping of machine {m} is not a bijection: {e}"));
    }
    Ok(state)
}

/// Every [`FILE_CHECK_EVERY`]th run, the state kept from a run must be what the cache's file
/// holds: queue, mapping and ignored errors, entry by entry. A durable step that wrote other
/// rows than the engine settled would otherwise go unseen until a crash made a run read the
/// file. (After a stopped run the state loaded is a read of the file itself: nothing to
/// compare.)
const FILE_CHECK_EVERY: u64 = 4;

fn kept_state_is_the_files(w: &World, m: usize, kept: &Rc<SyncState>) -> Result<(), Violation> {
    if w.sync_runs() % FILE_CHECK_EVERY != 0 {
        return Ok(());
    }
    match w.cache(m).is_as_read_from_file(kept) {
        Ok(true) => return Ok(()),
        Ok(false) => {}
        Err(e) => return fail(w, format!("the cache of machine {m} does not answer: {e}")),
    }
    let file = match w.cache(m).load_from_file() {
        Ok(state) => state,
        Err(e) => return fail(w, format!("the cache file of machine {m} does not load: {e}")),
    };
    let mut kept_mapping = kept.mapping.entries();
    let mut file_mapping = file.mapping.entries();
    kept_mapping.sort_by_key(|e| e.crm_id);
    file_mapping.sort_by_key(|e| e.crm_id);
    let differs = |what: &str, detail: String| {
        fail(w, format!("machine {m}: the {what} the run left differs from its cache file: {detail}"))
    };
    let (kq, fq) = (kept.queue.entries(), file.queue.entries());
    if kq != fq {
        let first = kq.iter().zip(fq.iter()).find(|(a, b)| a != b);
        return differs(
            "queue",
            format!("{} entries vs {} in the file; first difference {first:?}", kq.len(), fq.len()),
        );
    }
    if kept_mapping != file_mapping {
        let first = kept_mapping.iter().zip(file_mapping.iter()).find(|(a, b)| a != b);
        return differs(
            "mapping",
            format!(
                "{} pairs vs {} in the file; first difference {first:?}",
                kept_mapping.len(),
                file_mapping.len()
            ),
        );
    }
    if kept.ignored != file.ignored {
        let first = kept.ignored.iter().zip(file.ignored.iter()).find(|(a, b)| a != b);
        return differs(
            "ignored errors",
            format!(
                "{} vs {} in the file; first difference {first:?}",
                kept.ignored.len(),
                file.ignored.len()
            ),
        );
    }
    Ok(())
}

fn items(w: &World, u: usize) -> Result<Vec<MailboxItem>, Violation> {
    w.mailbox(u).all_items().map_err(|e| w.violation(format!("mailbox of user {u}: {e}")))
}

/// Safety after a run of machine `m`: no duplicates, the mapping a bijection of real links,
/// nothing the model protects lost.
///
/// A run that stopped (crash, network) may leave a pair half-applied (an item untracked whose
/// pair the cache still holds): that is checked only after a run that completed, which must
/// have repaired it.
pub fn after_run(
    w: &World,
    m: usize,
    completed: bool,
    items: &[MailboxItem],
    records: &[Rc<ServerRecord>],
) -> Result<(), Violation> {
    let u = w.machine_user(m);
    // No two items carry one stamp; no two linked items share a GOID (a duplicate meeting).
    let mut stamps = IdMap::default();
    let mut goids = IdMap::default();
    for item in items {
        if let Some(stamp) = item.stamp() {
            if let Some(other) = stamps.insert(stamp, &item.entry_id) {
                return fail(
                    w,
                    format!("user {u}: items {other} and {} both stamped {stamp}", item.entry_id),
                );
            }
            if let Some(goid) = &item.goid {
                if let Some(other) = goids.insert(goid, &item.entry_id) {
                    return fail(
                        w,
                        format!("user {u}: linked items {other} and {} share a GOID", item.entry_id),
                    );
                }
            }
        }
    }
    // No linked meeting sits beside an unlinked copy of itself: Exchange gives a mailbox one
    // copy of a meeting, and a sync that creates a meeting the mailbox already holds must find
    // that copy by GOID and link it, not add a second (a duplicate meeting in the calendar).
    for item in items.iter().filter(|i| i.stamp().is_none()) {
        if let Some(linked) = item.goid.as_ref().and_then(|g| goids.get(g)) {
            return fail(
                w,
                format!("user {u}: linked item {linked} and unlinked item {} share a GOID", item.entry_id),
            );
        }
    }
    // No two records in the user's filter share a GOID (a duplicate meeting in CRM).
    let mut goids = IdMap::default();
    for r in records {
        if let Some(goid) = &r.goid {
            if let Some(other) = goids.insert(goid, r.crm_id) {
                return fail(w, format!("records {other} and {} share a GOID", r.crm_id));
            }
        }
    }
    // Nothing protected is lost: its record is in CRM, and its items are in their mailboxes.
    let live = w.live().map_err(|e| w.violation(format!("server: {e}")))?;
    let model = w.model();
    for (h, info) in model.handles.iter().enumerate() {
        if info.unprotected {
            continue;
        }
        if let (Some(c), true) = (info.crm_id, info.seen_in_crm) {
            if !live.contains(c) {
                return fail(w, format!("record {c} (handle {h}) was lost: no one deleted it"));
            }
        }
    }
    let present: IdSet<&EntryId> = items.iter().map(|i| &i.entry_id).collect();
    for (e, h) in model.items_of(u) {
        if !model.handles[h].unprotected && !present.contains(e) {
            return fail(w, format!("user {u}: item {e} (handle {h}) was lost: no one deleted it"));
        }
    }
    // The primary's mapping links items that carry the mapped stamp.
    // The cache must load (and be a bijection) after every run, crashed or not.
    let state = load(w, m)?;
    kept_state_is_the_files(w, m, &state)?;
    let primary = w.server().is_primary_client(w.subscription(m)).unwrap_or(false);
    if primary && completed {
        let by_entry: IdMap<&EntryId, &MailboxItem> = items.iter().map(|i| (&i.entry_id, i)).collect();
        // A pair with changes still queued is not settled yet (its action failed this run, after
        // an earlier try may have half-applied it): the run that settles it must repair it, and
        // convergence checks that it did.
        // Likewise a pair whose failed change the user chose to ignore ("ignored errors aside").
        let ignored = state.ignored.iter().map(|i| &i.entry);
        let (unsettled_ids, unsettled_entries): (IdSet<CrmId>, IdSet<&EntryId>) =
            keys_of(state.queue.iter_unordered().chain(ignored));
        for entry in state.mapping.entries() {
            if unsettled_ids.contains(&entry.crm_id) || unsettled_entries.contains(&entry.entry_id) {
                continue;
            }
            if let Some(item) = by_entry.get(&entry.entry_id) {
                if item.stamp() != Some(entry.crm_id) {
                    return fail(
                        w,
                        format!(
                            "machine {m}: maps {} to {}, which is stamped {:?}",
                            entry.crm_id,
                            entry.entry_id,
                            item.stamp()
                        ),
                    );
                }
            }
        }
    }
    Ok(())
}

/// The records and items an ignored error of any of `u`'s machines names: left out of
/// convergence by DOMAIN's "ignored errors aside".
fn ignored(w: &World, u: usize) -> Result<(BTreeSet<CrmId>, BTreeSet<EntryId>), Violation> {
    let mut ids = BTreeSet::new();
    let mut entries = BTreeSet::new();
    for &m in w.machines_of(u) {
        let ignored: Vec<QueueEntry> = load(w, m)?.ignored.iter().map(|i| i.entry.clone()).collect();
        let (keyed_ids, keyed_entries): (Vec<CrmId>, Vec<&EntryId>) = keys_of(ignored.iter());
        ids.extend(keyed_ids);
        entries.extend(keyed_entries.into_iter().cloned());
        for entry in &ignored {
            if let ChangeOp::Create(r) | ChangeOp::Update(r) = entry.change.op() {
                ids.extend(r.crm_id);
            }
        }
    }
    Ok((ids, entries))
}

/// The records (by `CrmId`) and items (by `EntryId`) some entries are keyed by, gathered into
/// the collections the caller asks for.
fn keys_of<'e, I, E>(entries: impl Iterator<Item = &'e QueueEntry>) -> (I, E)
where
    I: Default + Extend<CrmId>,
    E: Default + Extend<&'e EntryId>,
{
    let (mut ids, mut items) = (I::default(), E::default());
    for entry in entries {
        match entry.change.key() {
            RecordKey::Crm(c) => ids.extend([*c]),
            RecordKey::Outlook(e) => items.extend([e]),
        }
    }
    (ids, items)
}

/// Convergence (DOMAIN 6.1 and 6.3): every user's primary holds exactly its filtered records,
/// linked, equal field by field, with the values the reference model says; queue empty.
pub fn converged(w: &World) -> Result<(), Violation> {
    let policy = w.policies().field_conflict;
    let model = w.model();
    let live = w.server().record_ids().map_err(|e| w.violation(format!("server: {e}")))?;
    // What any machine ignored is left out everywhere: a shared meeting one attendee's
    // machine gave up on reaches the others only as far as CRM got it.
    let mut all_ignored = BTreeSet::new();
    let mut all_ignored_entries = BTreeSet::new();
    for u in 0..w.user_count() {
        let (ids, entries) = ignored(w, u)?;
        all_ignored.extend(ids);
        all_ignored_entries.extend(entries);
    }
    for u in 0..w.user_count() {
        let m = w.primary(u)?;
        let state = load(w, m)?;
        if let Some(entry) = state.queue.entries().first() {
            return fail(
                w,
                format!("user {u}: the queue of machine {m} still holds {:?}", entry.change.key()),
            );
        }
        let (ignored_ids, ignored_entries) = (&all_ignored, &all_ignored_entries);
        let items = items(w, u)?;
        let by_stamp: BTreeMap<CrmId, &MailboxItem> =
            items.iter().filter_map(|i| i.stamp().map(|s| (s, i))).collect();
        let records = w.records_in_filter(u).map_err(|e| w.violation(format!("server: {e}")))?;
        let in_filter: BTreeSet<CrmId> = records.iter().map(|r| r.crm_id).collect();
        for r in &records {
            let h = model.handle_of_crm_id(r.crm_id);
            let exempt = ignored_ids.contains(&r.crm_id)
                || h.is_some_and(|h| model.handles[h].deleted_in_outlook_by.contains(&u));
            if exempt {
                continue;
            }
            let Some(entry) = state.mapping.get(r.crm_id) else {
                return fail(w, format!("user {u}: record {} is in the filter and not linked", r.crm_id));
            };
            let Some(item) = by_stamp.get(&r.crm_id) else {
                return fail(w, format!("user {u}: record {} has no item stamped with it", r.crm_id));
            };
            if item.entry_id != entry.entry_id {
                return fail(
                    w,
                    format!(
                        "user {u}: record {} maps to {} but {} carries it",
                        r.crm_id, entry.entry_id, item.entry_id
                    ),
                );
            }
            if item.fields != r.fields {
                return fail(
                    w,
                    format!(
                        "user {u}: record {} differs: CRM {:?}, Outlook {:?}",
                        r.crm_id, r.fields, item.fields
                    ),
                );
            }
            if let Some(h) = h {
                for f in model.fields_of(h) {
                    if let Some(expect) = model.expect(h, f, policy) {
                        if !expect.admits(r.fields.get(f)) {
                            return fail(
                                w,
                                format!(
                                    "lost update: record {} field {f} is {:?}, the model expects {expect:?}",
                                    r.crm_id,
                                    r.fields.get(f)
                                ),
                            );
                        }
                    }
                }
            }
        }
        for entry in state.mapping.entries() {
            if ignored_ids.contains(&entry.crm_id) {
                continue;
            }
            if !in_filter.contains(&entry.crm_id) {
                return fail(
                    w,
                    format!("user {u}: maps {}, which is not in the user's filter", entry.crm_id),
                );
            }
        }
        for item in &items {
            if ignored_entries.contains(&item.entry_id) {
                continue;
            }
            match item.tracking {
                Tracking::Stamped(c) if !ignored_ids.contains(&c) && state.mapping.get(c).is_none() => {
                    return fail(
                        w,
                        format!("user {u}: item {} is stamped {c} and not linked", item.entry_id),
                    );
                }
                Tracking::Pending => {
                    return fail(
                        w,
                        format!("user {u}: item {} is tracked and never reached CRM", item.entry_id),
                    );
                }
                _ => {}
            }
        }
    }
    for (h, info) in model.handles.iter().enumerate() {
        if info.unprotected {
            continue;
        }
        match info.crm_id {
            Some(c) if !live.contains(&c) && !all_ignored.contains(&c) => {
                return fail(w, format!("record {c} (handle {h}) was lost: no one deleted it"));
            }
            _ => {}
        }
    }
    Ok(())
}
