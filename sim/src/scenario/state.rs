//! The canonical final state of a scenario: every list sorted, every id shown by its label (or,
//! for what the sync made, a short stable name), so two runs print the same bytes and a snapshot
//! diff reads as a story.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// Everything a scenario ends with, and the verdicts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FinalState {
    /// Live CRM records, by label.
    pub records: Vec<RecordState>,
    /// Labels of records that were deleted in CRM.
    pub deleted_records: Vec<String>,
    /// Each user's mailbox.
    pub mailboxes: Vec<MailboxState>,
    /// Each machine's sync cache.
    pub machines: Vec<MachineState>,
    /// The server's subscriptions.
    pub subscriptions: Vec<SubscriptionState>,
    /// What the orphans report lists as duplicate subscriptions (one user, one machine).
    pub duplicate_subscriptions: Vec<String>,
    /// Each sync run, in order.
    pub runs: Vec<RunLog>,
    pub verdicts: Vec<VerdictLine>,
}

impl FinalState {
    /// Whether every verdict holds.
    pub fn passed(&self) -> bool {
        self.verdicts.iter().all(|v| v.ok)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordState {
    pub label: String,
    pub entity: String,
    pub owner: String,
    pub version: u64,
    pub status: String,
    pub goid: Option<String>,
    pub attendees: Vec<String>,
    pub fields: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MailboxState {
    pub user: String,
    pub items: Vec<ItemState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ItemState {
    /// Its label, or `#n` (the mailbox's item number) for an item a sync or a copy made.
    pub item: String,
    pub entity: String,
    /// `untracked`, `pending` (tracked, not linked yet) or `linked <record>`.
    pub tracking: String,
    pub goid: Option<String>,
    pub status: String,
    pub fields: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MachineState {
    pub machine: String,
    pub user: String,
    pub linked: bool,
    pub primary: bool,
    pub mapping: Vec<PairState>,
    pub queue: Vec<QueueLine>,
    pub ignored: Vec<QueueLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PairState {
    pub record: String,
    pub item: String,
    pub entity: String,
    pub role: String,
    pub crm_version: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueLine {
    /// `crm:<record>` or `outlook:<item>`.
    pub key: String,
    pub kind: String,
    pub entity: String,
    pub attempts: u32,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubscriptionState {
    pub user: String,
    pub machine: String,
    pub kind: String,
    /// `IsPrimaryClient`; `None` when it has no client row.
    pub primary: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunLog {
    /// The step's index in `steps`.
    pub step: usize,
    pub machine: String,
    /// As the simulator's trace writes it: `ok in 1/out 0 created 1 ...`, `secondary: nothing to
    /// do`, `stopped: ...`, `crashed after ...`, with the faults fired in brackets.
    pub outcome: String,
    /// The prepare-sync summary, per entity: `contact +1 ~0 -0`.
    pub prepared: Vec<String>,
    /// Pages of get sync data received, acknowledges the server heard.
    pub pages: u32,
    pub acks: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerdictLine {
    pub name: String,
    pub ok: bool,
    /// What does not hold (empty when `ok`).
    pub detail: Vec<String>,
}

impl VerdictLine {
    pub fn of(name: &str, detail: Vec<String>) -> VerdictLine {
        VerdictLine { name: name.to_owned(), ok: detail.is_empty(), detail }
    }
}

fn fields_text(out: &mut String, indent: &str, fields: &BTreeMap<String, String>) {
    for (name, value) in fields {
        let _ = writeln!(out, "{indent}{name} = {value:?}");
    }
}

/// The state as stable text (the default output and the snapshots).
pub fn render_text(s: &FinalState) -> String {
    let mut out = String::new();
    out += "== records (CRM) ==\n";
    if s.records.is_empty() {
        out += "(none)\n";
    }
    for r in &s.records {
        let _ = write!(out, "{} {} owner={} v{} {}", r.label, r.entity, r.owner, r.version, r.status);
        if let Some(g) = &r.goid {
            let _ = write!(out, " goid={g}");
        }
        if !r.attendees.is_empty() {
            let _ = write!(out, " attendees={}", r.attendees.join(","));
        }
        out += "\n";
        fields_text(&mut out, "  ", &r.fields);
    }
    if !s.deleted_records.is_empty() {
        let _ = writeln!(out, "deleted: {}", s.deleted_records.join(", "));
    }
    out += "\n== mailboxes (Outlook) ==\n";
    for m in &s.mailboxes {
        let _ = writeln!(out, "{}: {} item(s)", m.user, m.items.len());
        for i in &m.items {
            let _ = write!(out, "  {} {} {} {}", i.item, i.entity, i.tracking, i.status);
            if let Some(g) = &i.goid {
                let _ = write!(out, " goid={g}");
            }
            out += "\n";
            fields_text(&mut out, "    ", &i.fields);
        }
    }
    out += "\n== machines (sync caches) ==\n";
    for m in &s.machines {
        let _ = writeln!(
            out,
            "{} (user {}): {}, {}",
            m.machine,
            m.user,
            if m.linked { "linked" } else { "unlinked" },
            if m.primary { "primary" } else { "not primary" }
        );
        let _ = writeln!(out, "  mapping: {} pair(s)", m.mapping.len());
        for p in &m.mapping {
            let v = p.crm_version.map_or("-".to_owned(), |v| format!("v{v}"));
            let _ = writeln!(out, "    {} <-> {} {} {} {}", p.record, p.item, p.entity, p.role, v);
        }
        for (name, lines) in [("queue", &m.queue), ("ignored errors", &m.ignored)] {
            let _ = writeln!(out, "  {name}: {}", lines.len());
            for q in lines.iter() {
                let _ = write!(out, "    {} {} {} attempts={}", q.key, q.kind, q.entity, q.attempts);
                if let Some(e) = &q.error {
                    let _ = write!(out, " error={e:?}");
                }
                out += "\n";
            }
        }
    }
    out += "\n== subscriptions (server) ==\n";
    for sub in &s.subscriptions {
        let primary = if sub.primary { "primary" } else { "secondary" };
        let _ = writeln!(out, "{} on {} {} {}", sub.user, sub.machine, sub.kind, primary);
    }
    for d in &s.duplicate_subscriptions {
        let _ = writeln!(out, "duplicate: {d}");
    }
    out += "\n== sync runs ==\n";
    for r in &s.runs {
        let _ = writeln!(out, "steps[{}] {}: {}", r.step, r.machine, r.outcome);
        if !r.prepared.is_empty() {
            let _ = writeln!(out, "  prepared: {}", r.prepared.join("; "));
        }
        let _ = writeln!(out, "  pages {} acks {}", r.pages, r.acks);
    }
    out += "\n== verdicts ==\n";
    for v in &s.verdicts {
        let _ = writeln!(out, "{} {}", if v.ok { "ok  " } else { "FAIL" }, v.name);
        for d in &v.detail {
            let _ = writeln!(out, "     {d}");
        }
    }
    out
}
