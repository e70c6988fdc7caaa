//! The trace as data: one [`TraceEvent`] per trace line (when a trace is kept), for pictures of a
//! run ([`crate::timeline`]) and for tests that ask what happened rather than grep lines.
//!
//! The world records events at one place, `World::log`, from the same pieces the line is made of
//! (who, what, outcome) plus the fault counters: the faults an event carries are the ones that
//! fired since the previous event, so a sync run gets every fault injected during it (clock
//! skew and "ignore all errors" included, which its line does not name), a switch of primary
//! its `switch-primary`, a relink its `unlink-relink`. The printed lines and their hash are not
//! touched; in swarm mode (no trace kept) nothing here runs.
//!
//! The counts of a sync run are read back from its outcome text (`ok in 3/out 1 created 0 ...`),
//! the format [`completed_run_line`] writes; a line that does not match is kept with
//! [`RunOutcome::Unknown`] rather than guessed at, and `sim/tests/timeline.rs` checks real seeds
//! never produce one.

use crate::fault::{FaultCounts, FaultKind};

/// Where an event happened: the picture draws one lane per value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lane {
    /// The CRM server: edits made in CRM (by any user).
    Server,
    /// User `n`'s mailbox, shared by that user's machines: edits made in Outlook.
    Mailbox(usize),
    /// A client machine by name (`U0-PC1`): its sync runs, the faults injected into them, a
    /// switch of primary to it, its unlink and relink.
    Machine(String),
    /// The world itself (the start of the liveness phase).
    World,
}

impl Lane {
    /// The lane of a trace line's `who` column.
    pub fn of_who(who: &str) -> Lane {
        let user = |rest: &str| rest.strip_prefix('u').and_then(|n| n.parse::<usize>().ok());
        if who == "world" {
            Lane::World
        } else if who.starts_with("crm/") {
            Lane::Server
        } else if let Some(u) = who.strip_prefix("outlook/").and_then(user) {
            Lane::Mailbox(u)
        } else {
            Lane::Machine(who.to_owned())
        }
    }

    /// The user a lane belongs to, for grouping: `Mailbox(u)`, or a machine named `U<u>-PC<k>`.
    pub fn user(&self) -> Option<usize> {
        match self {
            Lane::Mailbox(u) => Some(*u),
            Lane::Machine(name) => machine_number(name).map(|(u, _)| u),
            Lane::Server | Lane::World => None,
        }
    }
}

/// `U<u>-PC<k>` as `(u, k)`.
pub fn machine_number(name: &str) -> Option<(usize, usize)> {
    let (u, k) = name.strip_prefix('U')?.split_once("-PC")?;
    Some((u.parse().ok()?, k.parse().ok()?))
}

/// Which side an edit was made on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Crm,
    Outlook,
}

/// The totals of a completed primary run, as its line states them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunCounts {
    /// Changes the server handed out (`in`).
    pub server_changes: u64,
    /// Changes read from the mailbox (`out`).
    pub mailbox_changes: u64,
    pub created: u64,
    pub updated: u64,
    pub deleted: u64,
    pub untracked: u64,
    /// Field conflicts merged by policy.
    pub conflicts: u64,
    /// Items that failed and stay queued.
    pub failed: u64,
    /// Items that failed and were ignored ("ignore all errors").
    pub ignored: u64,
}

/// How a sync run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// A primary run that completed.
    Ok(RunCounts),
    /// A secondary machine's run: it reads and writes nothing.
    Secondary,
    /// The server could not be reached: the run stopped, its work stays queued.
    Stopped,
    /// The process was killed after a durable step.
    Crashed,
    /// An outcome text this module does not know.
    Unknown,
}

/// What kind of event a line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    SyncRun {
        outcome: RunOutcome,
        ignore_all_errors: bool,
    },
    /// An actor's edit: `op` is the line's verb (`create`, `update`, `delete`, `give`,
    /// `uninvite`).
    Edit {
        side: Side,
        op: String,
    },
    /// The machine of the lane was made primary.
    MakePrimary,
    /// The machine of the lane was unlinked and linked again; `primary` if the server made it
    /// primary.
    Relink {
        primary: bool,
    },
    /// Faults and edits stop; the primaries run until nothing changes.
    Liveness,
    /// A `CRMSYNC_SIM_WATCH` note.
    Watch,
    /// A line of a kind this module does not know (kept, drawn nowhere).
    Other,
}

/// One trace line as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    /// The world's event number (a `Violation`'s `at` refers to it).
    pub step: u64,
    /// Virtual seconds since the world started.
    pub at_s: i64,
    pub lane: Lane,
    pub kind: EventKind,
    /// The faults that fired during this event, in catalogue order.
    pub faults: Vec<FaultKind>,
    /// The trace line, as printed.
    pub line: String,
}

impl TraceEvent {
    /// Classifies a line from its pieces: `who`, `what` and `outcome` as `World::log` has them.
    pub fn classify(who: &str, what: &str, outcome: &str) -> (Lane, EventKind) {
        let lane = Lane::of_who(who);
        let kind = match (&lane, what) {
            (Lane::Machine(_), "sync" | "sync(ignore)") => EventKind::SyncRun {
                outcome: parse_run_outcome(outcome),
                ignore_all_errors: what == "sync(ignore)",
            },
            (Lane::Machine(_), "make-primary") => EventKind::MakePrimary,
            (Lane::Machine(_), "unlink+relink") => EventKind::Relink { primary: outcome == "primary" },
            (Lane::Machine(_), "watch") => EventKind::Watch,
            (Lane::Server, op) => EventKind::Edit { side: Side::Crm, op: op.to_owned() },
            (Lane::Mailbox(_), op) => EventKind::Edit { side: Side::Outlook, op: op.to_owned() },
            (Lane::World, "liveness") => EventKind::Liveness,
            _ => EventKind::Other,
        };
        (lane, kind)
    }
}

/// `ok in 3/out 1 created 0 updated 2 deleted 0 untracked 0 conflicts 0 failed 0 ignored 0
/// [notes]`, `secondary: ...`, `stopped: ...`, `crashed after ...`.
/// The outcome text of a primary run that completed: `ok in S/out M created ... ignored N`,
/// the counts summed over entity types. Written by both the world and the scenario runner,
/// and read back by [`parse_run_outcome`].
pub fn completed_run_line(report: &crmsync::engine::RunReport) -> String {
    let mut t = crmsync::engine::RunCounts::default();
    for c in report.by_entity.values() {
        t.created += c.created;
        t.updated += c.updated;
        t.deleted += c.deleted;
        t.untracked += c.untracked;
        t.merged_conflicts += c.merged_conflicts;
        t.failed += c.failed;
        t.ignored += c.ignored;
    }
    format!(
        "ok in {}/out {} created {} updated {} deleted {} untracked {} conflicts {} failed {} ignored {}",
        report.server_changes,
        report.mailbox_changes,
        t.created,
        t.updated,
        t.deleted,
        t.untracked,
        t.merged_conflicts,
        t.failed,
        t.ignored
    )
}

fn parse_run_outcome(outcome: &str) -> RunOutcome {
    if outcome.starts_with("secondary") {
        return RunOutcome::Secondary;
    }
    if outcome.starts_with("stopped:") {
        return RunOutcome::Stopped;
    }
    if outcome.starts_with("crashed after") {
        return RunOutcome::Crashed;
    }
    let Some(rest) = outcome.strip_prefix("ok in ") else { return RunOutcome::Unknown };
    // The notes in brackets are free text: only the part before them is read.
    let counts = rest.split(" [").next().unwrap_or(rest);
    let mut words = counts.split(' ');
    let Some(server) = words.next().and_then(|w| w.strip_suffix("/out")) else {
        return RunOutcome::Unknown;
    };
    let (Ok(server_changes), Some(Ok(mailbox_changes))) = (server.parse(), words.next().map(str::parse))
    else {
        return RunOutcome::Unknown;
    };
    let mut c = RunCounts { server_changes, mailbox_changes, ..RunCounts::default() };
    let mut seen = 0;
    while let (Some(label), Some(value)) = (words.next(), words.next()) {
        let Ok(n) = value.parse::<u64>() else { return RunOutcome::Unknown };
        let slot = match label {
            "created" => &mut c.created,
            "updated" => &mut c.updated,
            "deleted" => &mut c.deleted,
            "untracked" => &mut c.untracked,
            "conflicts" => &mut c.conflicts,
            "failed" => &mut c.failed,
            "ignored" => &mut c.ignored,
            _ => return RunOutcome::Unknown,
        };
        *slot = n;
        seen += 1;
    }
    if seen == 7 { RunOutcome::Ok(c) } else { RunOutcome::Unknown }
}

/// The events of one world, and the fault counts as of the last one (what the next event's
/// faults are counted from).
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    pub events: Vec<TraceEvent>,
    seen: FaultCounts,
}

impl Timeline {
    /// Records the line `line` made of `who`, `what`, `outcome` at event `step`, `at_s` virtual
    /// seconds in; `counts` are the world's fault counts now.
    pub fn record(
        &mut self,
        step: u64,
        at_s: i64,
        (who, what, outcome): (&str, &str, &str),
        counts: &FaultCounts,
        line: &str,
    ) {
        let mut faults = Vec::new();
        for kind in FaultKind::ALL {
            let fired = counts.get(kind).saturating_sub(self.seen.get(kind));
            faults.extend(std::iter::repeat_n(kind, fired as usize));
        }
        self.seen = counts.clone();
        let (lane, kind) = TraceEvent::classify(who, what, outcome);
        self.events.push(TraceEvent { step, at_s, lane, kind, faults, line: line.to_owned() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_names_the_lane() {
        assert_eq!(Lane::of_who("crm/u3"), Lane::Server);
        assert_eq!(Lane::of_who("outlook/u12"), Lane::Mailbox(12));
        assert_eq!(Lane::of_who("U1-PC2"), Lane::Machine("U1-PC2".into()));
        assert_eq!(Lane::of_who("world"), Lane::World);
        assert_eq!(Lane::Machine("U10-PC2".into()).user(), Some(10));
        assert_eq!(Lane::Machine("laptop".into()).user(), None);
        assert_eq!(Lane::Mailbox(4).user(), Some(4));
    }

    #[test]
    fn a_completed_run_reads_back_its_counts_and_ignores_its_notes() {
        let (lane, kind) = TraceEvent::classify(
            "U2-PC0",
            "sync(ignore)",
            "ok in 129/out 11 created 136 updated 2 deleted 3 untracked 4 conflicts 5 failed 6 ignored 7 \
             [item-locked: item 2 locked; late-page: an earlier page (7 changes, seq Some(28)) arrives late]",
        );
        assert_eq!(lane, Lane::Machine("U2-PC0".into()));
        let counts = RunCounts {
            server_changes: 129,
            mailbox_changes: 11,
            created: 136,
            updated: 2,
            deleted: 3,
            untracked: 4,
            conflicts: 5,
            failed: 6,
            ignored: 7,
        };
        assert_eq!(kind, EventKind::SyncRun { outcome: RunOutcome::Ok(counts), ignore_all_errors: true });
    }

    #[test]
    fn every_run_outcome_is_told_apart_and_a_strange_one_is_unknown() {
        let outcome = |text: &str| match TraceEvent::classify("U0-PC0", "sync", text).1 {
            EventKind::SyncRun { outcome, ignore_all_errors: false } => outcome,
            other => panic!("{other:?}"),
        };
        assert_eq!(outcome("secondary: nothing to do"), RunOutcome::Secondary);
        assert_eq!(
            outcome("stopped: acknowledge: request lost [network-before-call: x]"),
            RunOutcome::Stopped
        );
        assert_eq!(outcome("crashed after MailboxWrite [crash: killed]"), RunOutcome::Crashed);
        assert_eq!(outcome("ok in 1/out 2 created 3"), RunOutcome::Unknown);
        assert_eq!(outcome("ok in x/out 2"), RunOutcome::Unknown);
        assert_eq!(
            outcome(
                "ok in 1/out 2 created 3 updated 0 deleted 0 untracked 0 conflicts 0 failed 0 surprised 0"
            ),
            RunOutcome::Unknown
        );
        assert_eq!(outcome("finished"), RunOutcome::Unknown);
    }

    #[test]
    fn edits_switches_and_phases_are_classified() {
        let kind = |who: &str, what: &str, outcome: &str| TraceEvent::classify(who, what, outcome).1;
        assert_eq!(kind("crm/u1", "give", "x to u2"), EventKind::Edit { side: Side::Crm, op: "give".into() });
        assert_eq!(
            kind("outlook/u0", "delete", "x"),
            EventKind::Edit { side: Side::Outlook, op: "delete".into() }
        );
        assert_eq!(kind("U0-PC1", "make-primary", "ok"), EventKind::MakePrimary);
        assert_eq!(kind("U0-PC1", "unlink+relink", "primary"), EventKind::Relink { primary: true });
        assert_eq!(kind("U0-PC1", "unlink+relink", "secondary"), EventKind::Relink { primary: false });
        assert_eq!(kind("world", "liveness", "faults off, edits off"), EventKind::Liveness);
        assert_eq!(kind("U0-PC1", "dance", "ok"), EventKind::Other);
    }

    #[test]
    fn an_event_carries_the_faults_fired_since_the_previous_one() {
        let mut timeline = Timeline::default();
        let mut counts = FaultCounts::default();
        counts.0.insert(FaultKind::ItemLocked, 2);
        counts.0.insert(FaultKind::ClockSkew, 1);
        timeline.record(1, 10, ("U0-PC0", "sync", "secondary: nothing to do"), &counts, "line 1");
        timeline.record(2, 20, ("crm/u0", "create", "x Task"), &counts, "line 2");
        counts.0.insert(FaultKind::ItemLocked, 3);
        counts.0.insert(FaultKind::SwitchPrimary, 1);
        timeline.record(3, 30, ("U0-PC1", "make-primary", "ok"), &counts, "line 3");
        let faults: Vec<&[FaultKind]> = timeline.events.iter().map(|e| &e.faults[..]).collect();
        assert_eq!(
            faults,
            [
                &[FaultKind::ItemLocked, FaultKind::ItemLocked, FaultKind::ClockSkew][..],
                &[],
                &[FaultKind::ItemLocked, FaultKind::SwitchPrimary]
            ]
        );
        assert_eq!(timeline.events[2].step, 3);
        assert_eq!(timeline.events[2].at_s, 30);
        assert_eq!(timeline.events[2].line, "line 3");
    }
}
