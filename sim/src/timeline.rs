//! A picture of a run: one self-contained HTML page (inline CSS, inline SVG, no script, nothing
//! fetched) with a timeline of a world's [`TraceEvent`]s, and the atomic write of that page.
//!
//! [`render_html`] is a pure function of a title, the events and a [`Verdict`], so any runner
//! that has events (`crmsync-sim run --html`, a scenario runner) draws the same picture, and
//! the same seed gives the same bytes (no clock, no hash-map order, fixed float precision).
//!
//! The picture:
//! - x is virtual time, with an axis of `hh:mm` ticks at the top; the page grows wider (and
//!   scrolls) for long runs so that one sync interval stays readable;
//! - one lane for the server, where edits made in CRM are ticks; then per user one lane for
//!   the user's mailbox, where edits made in Outlook are ticks (the user's machines share that
//!   mailbox, as they share an Exchange mailbox, and the trace does not say on which machine an
//!   Outlook edit was made), followed by one lane per machine of that user;
//! - a sync run is a bar on its machine's lane. Runs take no virtual time, so a bar is drawn a
//!   fixed 2.5 virtual minutes wide (4 to 12 pixels); its colour is its outcome: ok, ok with
//!   merged conflicts, ok with failed or ignored items, stopped, crashed; a secondary machine's
//!   run is a thin grey bar; a run with "ignore all errors" has a dashed outline;
//! - every fault fired is a diamond above the bar of the run it fired in, coloured by family
//!   (network, item, crash, user and machine); a switch of primary and an unlink and relink
//!   also mark their machine's lane with a purple stripe;
//! - the start of the liveness phase is a dashed line across all lanes, a violation a red one;
//! - hovering any mark shows its trace line (SVG `<title>`, no script).
//!
//! Below the picture: runs by outcome, faults by kind, and the whole trace (folded).
//!
//! Every text from the trace is escaped for HTML and XML ([`escape`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::fault::FaultKind;
use crate::trace::{EventKind, Lane, RunOutcome, TraceEvent, machine_number};
use crate::world::{Outcome, SYNC_INTERVAL_S};

/// What a run came to, shown at the top of the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Passed {
        summary: String,
    },
    /// `at_step`: the event number the failure was found at, if there is one (a red line).
    Failed {
        what: String,
        at_step: Option<u64>,
    },
}

impl Verdict {
    /// The verdict of a simulator run.
    pub fn of(outcome: &Outcome) -> Verdict {
        let swarm: Vec<&str> = outcome.swarm.rates.keys().map(|k| k.name()).collect();
        match &outcome.violation {
            None => Verdict::Passed {
                summary: format!(
                    "seed {}: {} sync runs; swarm: {}",
                    outcome.seed,
                    outcome.sync_runs,
                    swarm.join(", ")
                ),
            },
            Some(v) => Verdict::Failed {
                what: format!("seed {}: violation at {v}; swarm: {}", outcome.seed, swarm.join(", ")),
                at_step: Some(v.at),
            },
        }
    }
}

/// The page could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {source}", path.display())]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Writes `html` to `path` whole or not at all: into a temporary file in the same directory,
/// flushed, then renamed over `path`. On failure the temporary file is removed and `path` is
/// left as it was.
pub fn write_page(path: &Path, html: &str) -> Result<(), WriteError> {
    let fail = |source| WriteError { path: path.to_owned(), source };
    let Some(name) = path.file_name() else {
        return Err(fail(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name")));
    };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(html.as_bytes())?;
        f.sync_all()
    });
    match written.and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            // Nothing to do if the file was never made.
            let _ = std::fs::remove_file(&tmp);
            Err(fail(e))
        }
    }
}

/// `&`, `<`, `>`, `"` and `'` as entities; control characters other than tab and newline
/// (invalid in XML) as U+FFFD.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\t' | '\n' => out.push(c),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// Appends to a `String` (which cannot fail).
macro_rules! put {
    ($out:expr, $($arg:tt)*) => {{
        let _ = write!($out, $($arg)*);
    }};
}

/// The outcome classes of a run: CSS class, colour, legend text.
const RUN_STYLES: [(&str, &str, &str); 7] = [
    ("ok", "#2f9e44", "ok"),
    ("conflict", "#f59f00", "ok, with merged conflicts"),
    ("failed", "#e8590c", "ok, with failed or ignored items"),
    ("stopped", "#c92a2a", "stopped: server unreachable"),
    ("crashed", "#212529", "crashed: process killed"),
    ("secondary", "#ced4da", "secondary machine: nothing to do"),
    ("unknown", "#ae3ec9", "outcome not understood"),
];

/// The fault families: CSS class, colour, legend text.
const FAULT_STYLES: [(&str, &str, &str); 4] = [
    ("f-net", "#1971c2", "network: request or answer lost, page twice or late, ack lost"),
    ("f-item", "#e64980", "item: write rejected, item locked"),
    ("f-crash", "#000000", "crash"),
    ("f-user", "#9c36b5", "user, machine: clock skew, ignore errors, switch, relink"),
];

/// The edit verbs: CSS class, colour, legend text.
const EDIT_STYLES: [(&str, &str, &str); 4] = [
    ("e-create", "#2b8a3e", "create"),
    ("e-update", "#495057", "update"),
    ("e-delete", "#e03131", "delete"),
    ("e-other", "#0c8599", "give or uninvite"),
];

fn fault_family(kind: FaultKind) -> &'static str {
    match kind {
        FaultKind::NetworkBeforeCall
        | FaultKind::NetworkAfterCall
        | FaultKind::DuplicatePage
        | FaultKind::LatePage
        | FaultKind::LostAcknowledge => "f-net",
        FaultKind::ItemRejected | FaultKind::ItemLocked => "f-item",
        FaultKind::Crash => "f-crash",
        FaultKind::ClockSkew
        | FaultKind::IgnoreAllErrors
        | FaultKind::SwitchPrimary
        | FaultKind::UnlinkRelink => "f-user",
    }
}

/// The CSS class of a run's outcome (one of [`RUN_STYLES`]).
pub fn run_class(outcome: &RunOutcome) -> &'static str {
    match outcome {
        RunOutcome::Ok(c) if c.failed + c.ignored > 0 => "failed",
        RunOutcome::Ok(c) if c.conflicts > 0 => "conflict",
        RunOutcome::Ok(_) => "ok",
        RunOutcome::Secondary => "secondary",
        RunOutcome::Stopped => "stopped",
        RunOutcome::Crashed => "crashed",
        RunOutcome::Unknown => "unknown",
    }
}

fn edit_class(op: &str) -> &'static str {
    match op {
        "create" => "e-create",
        "update" => "e-update",
        "delete" => "e-delete",
        _ => "e-other",
    }
}

const LABEL_W: f64 = 110.0;
const PAD_R: f64 = 20.0;
const AXIS_H: f64 = 30.0;
const LANE_H: f64 = 34.0;
const MAILBOX_H: f64 = 24.0;
const BOTTOM: f64 = 10.0;
/// The chart is at least this wide (a 1400-pixel window), and wider when one sync interval
/// would get fewer than [`PX_PER_INTERVAL`] pixels.
const CHART_W_MIN: f64 = 1230.0;
const CHART_W_MAX: f64 = 60_000.0;
const PX_PER_INTERVAL: f64 = 16.0;
/// How wide a run is drawn, in virtual seconds (runs take none).
const BAR_S: f64 = 150.0;

/// Lanes in drawing order: the server, then per user the mailbox and the machines, then
/// machines whose name says no user, in order of first appearance.
fn lanes(events: &[TraceEvent]) -> Vec<Lane> {
    let mut keyed: BTreeMap<(u8, usize, u8, usize, usize), Lane> = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        let key = match &e.lane {
            Lane::World => continue,
            Lane::Server => (0, 0, 0, 0, 0),
            Lane::Mailbox(u) => (1, *u, 0, 0, 0),
            Lane::Machine(name) => match machine_number(name) {
                Some((u, k)) => (1, u, 1, k, 0),
                None => (2, 0, 0, 0, i),
            },
        };
        if !keyed.values().any(|l| *l == e.lane) {
            keyed.entry(key).or_insert_with(|| e.lane.clone());
        }
    }
    keyed.into_values().collect()
}

fn lane_label(lane: &Lane) -> String {
    match lane {
        Lane::Server => "server (CRM)".to_owned(),
        Lane::Mailbox(u) => format!("mailbox u{u}"),
        Lane::Machine(name) => name.clone(),
        Lane::World => "world".to_owned(),
    }
}

fn hms(s: i64) -> String {
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// Where the lanes and the time axis are.
struct Layout {
    t_end: f64,
    chart_w: f64,
    /// Per lane: top y and height.
    rows: Vec<(Lane, f64, f64)>,
    height: f64,
}

impl Layout {
    fn new(events: &[TraceEvent]) -> Layout {
        let last = events.iter().map(|e| e.at_s).max().unwrap_or(0).max(0) as f64;
        let t_end = (last + 2.0 * BAR_S).max(SYNC_INTERVAL_S as f64);
        let chart_w = (t_end / SYNC_INTERVAL_S as f64 * PX_PER_INTERVAL).clamp(CHART_W_MIN, CHART_W_MAX);
        let mut y = AXIS_H;
        let mut rows = Vec::new();
        for lane in lanes(events) {
            let h = if matches!(lane, Lane::Mailbox(_)) { MAILBOX_H } else { LANE_H };
            rows.push((lane, y, h));
            y += h;
        }
        Layout { t_end, chart_w, rows, height: y + BOTTOM }
    }

    fn width(&self) -> f64 {
        LABEL_W + self.chart_w + PAD_R
    }

    fn x(&self, at_s: i64) -> f64 {
        LABEL_W + (at_s.max(0) as f64 / self.t_end) * self.chart_w
    }

    fn bar_w(&self) -> f64 {
        (BAR_S / self.t_end * self.chart_w).clamp(4.0, 12.0)
    }

    fn row(&self, lane: &Lane) -> Option<(f64, f64)> {
        self.rows.iter().find(|(l, _, _)| l == lane).map(|&(_, y, h)| (y, h))
    }

    /// Seconds between axis ticks: the smallest of a few round steps giving at most 16 ticks
    /// per 1,230 pixels.
    fn tick_s(&self) -> i64 {
        let most = (16.0 * self.chart_w / CHART_W_MIN).floor();
        [300, 600, 900, 1800, 3600, 7200, 10_800, 21_600, 43_200, 86_400]
            .into_iter()
            .find(|&s| self.t_end / s as f64 <= most)
            .unwrap_or(86_400 * 7)
    }
}

/// The page for `events` under `title`, with `verdict` at the top.
pub fn render_html(title: &str, events: &[TraceEvent], verdict: &Verdict) -> String {
    let layout = Layout::new(events);
    let mut out = String::with_capacity(4096 + events.len() * 400);
    put!(out, "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    put!(out, "<title>{}</title>\n<style>\n{}</style>\n</head>\n<body>\n", escape(title), css());
    put!(out, "<h1>{}</h1>\n", escape(title));
    match verdict {
        Verdict::Passed { summary } => put!(out, "<p class=\"verdict pass\">PASS: {}</p>\n", escape(summary)),
        Verdict::Failed { what, .. } => put!(out, "<p class=\"verdict fail\">FAIL: {}</p>\n", escape(what)),
    }
    let runs = events.iter().filter(|e| matches!(e.kind, EventKind::SyncRun { .. })).count();
    let faults: usize = events.iter().map(|e| e.faults.len()).sum();
    let last = events.iter().map(|e| e.at_s).max().unwrap_or(0);
    put!(
        out,
        "<p class=\"meta\">{} events, {runs} sync runs, {faults} faults fired, virtual time 00:00:00 to {}. \
         Hover a mark for its trace line.</p>\n",
        events.len(),
        hms(last)
    );
    legend(&mut out);
    put!(out, "<div class=\"chart\">\n");
    svg(&mut out, &layout, events, verdict);
    put!(out, "</div>\n");
    tables(&mut out, events);
    put!(out, "<details>\n<summary>Trace ({} lines)</summary>\n<pre>", events.len());
    for e in events {
        put!(out, "{}\n", escape(&e.line));
    }
    put!(out, "</pre>\n</details>\n</body>\n</html>\n");
    out
}

fn css() -> String {
    let mut css = String::from(
        "body{font-family:'DejaVu Sans',Verdana,sans-serif;font-size:13px;margin:8px;color:#212529}\n\
         h1{font-size:17px;margin:4px 0}\n\
         .verdict{font-weight:bold;padding:4px 8px;margin:4px 0;border-radius:3px}\n\
         .pass{background:#d3f9d8;color:#2b8a3e}\n\
         .fail{background:#ffe3e3;color:#c92a2a}\n\
         .meta{margin:4px 0;color:#495057}\n\
         .legend{display:flex;flex-wrap:wrap;gap:4px 14px;margin:4px 0 6px}\n\
         .legend span{white-space:nowrap}\n\
         .sw{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-2px;border-radius:2px}\n\
         .sw.dia{transform:rotate(45deg) scale(.75)}\n\
         .chart{overflow-x:auto}\n\
         svg text{font-family:'DejaVu Sans',Verdana,sans-serif;font-size:11px;fill:#343a40}\n\
         .lane-a{fill:#f1f3f5}\n.lane-b{fill:#ffffff}\n\
         .grid{stroke:#dee2e6;stroke-width:1}\n\
         .sep{stroke:#adb5bd;stroke-width:1}\n\
         .ignore{stroke:#000;stroke-width:1.2;stroke-dasharray:2 1.5}\n\
         .switch{fill:#9c36b5;opacity:.45}\n\
         .note{fill:#868e96}\n\
         .phase{stroke:#343a40;stroke-width:1.5;stroke-dasharray:6 4}\n\
         .violation{stroke:#e03131;stroke-width:2.5}\n\
         text.violation{stroke:none;fill:#e03131;font-weight:bold}\n\
         table{border-collapse:collapse;margin:6px 16px 6px 0;display:inline-table;vertical-align:top}\n\
         td,th{border:1px solid #dee2e6;padding:2px 8px;text-align:left}\n\
         td.n{text-align:right}\n\
         pre{font-size:11px}\n",
    );
    for (class, colour, _) in RUN_STYLES.iter().chain(&FAULT_STYLES).chain(&EDIT_STYLES) {
        put!(css, ".{class}{{fill:{colour}}}\n.sw.{class}{{background:{colour}}}\n");
    }
    css
}

fn legend(out: &mut String) {
    put!(out, "<div class=\"legend\"><b>Sync runs:</b>");
    for (class, _, text) in RUN_STYLES.iter().filter(|(c, _, _)| *c != "unknown") {
        put!(out, "<span><i class=\"sw {class}\"></i>{}</span>", escape(text));
    }
    put!(
        out,
        "<span><i class=\"sw ok\" style=\"outline:1.5px dashed #000\"></i>with ignore all errors</span>"
    );
    put!(out, "</div>\n<div class=\"legend\"><b>Faults:</b>");
    for (class, _, text) in &FAULT_STYLES {
        put!(out, "<span><i class=\"sw dia {class}\"></i>{}</span>", escape(text));
    }
    put!(
        out,
        "<span><i class=\"sw switch\" style=\"background:#9c36b5;opacity:.45\"></i>switch or relink</span>"
    );
    put!(out, "</div>\n<div class=\"legend\"><b>Edits:</b>");
    for (class, _, text) in &EDIT_STYLES {
        put!(out, "<span><i class=\"sw {class}\" style=\"width:3px\"></i>{}</span>", escape(text));
    }
    put!(out, "<span>dashed line: liveness phase (faults and edits off)</span>");
    put!(out, "<span style=\"color:#e03131\">red line: violation</span></div>\n");
}

fn svg(out: &mut String, layout: &Layout, events: &[TraceEvent], verdict: &Verdict) {
    let (w, h) = (layout.width(), layout.height);
    put!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w:.0}\" height=\"{h:.0}\" viewBox=\"0 0 {w:.0} {h:.0}\" \
         role=\"img\" aria-label=\"timeline\">\n"
    );
    // Lane backgrounds (one shade per user group) and labels.
    let mut shade = false;
    let mut group: Option<Option<usize>> = None;
    for (lane, y, lh) in &layout.rows {
        if group != Some(lane.user()) {
            if group.is_some() {
                put!(out, "<line class=\"sep\" x1=\"0\" y1=\"{y:.1}\" x2=\"{w:.0}\" y2=\"{y:.1}\"/>\n");
            }
            group = Some(lane.user());
            shade = !shade;
        }
        let class = if shade { "lane-a" } else { "lane-b" };
        put!(
            out,
            "<rect class=\"lane {class}\" x=\"0\" y=\"{y:.1}\" width=\"{w:.0}\" height=\"{lh:.1}\"/>\n"
        );
        put!(
            out,
            "<text class=\"label\" x=\"6\" y=\"{:.1}\">{}</text>\n",
            y + lh / 2.0 + 4.0,
            escape(&lane_label(lane))
        );
    }
    // The axis.
    let tick = layout.tick_s();
    let mut t = 0;
    while (t as f64) <= layout.t_end {
        let x = layout.x(t);
        put!(
            out,
            "<line class=\"grid\" x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\"/>\n",
            AXIS_H - 6.0,
            h - BOTTOM
        );
        put!(
            out,
            "<text class=\"tick\" x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            AXIS_H - 10.0,
            &hms(t)[..5]
        );
        t += tick;
    }
    let bar_w = layout.bar_w();
    for e in events {
        let x = layout.x(e.at_s);
        let row = layout.row(&e.lane);
        let title = escape(&e.line);
        match (&e.kind, row) {
            (EventKind::SyncRun { outcome, ignore_all_errors }, Some((y, lh))) => {
                let class = run_class(outcome);
                let ignore = if *ignore_all_errors { " ignore" } else { "" };
                let (by, bh) =
                    if class == "secondary" { (y + lh / 2.0 - 3.0, 6.0) } else { (y + lh / 2.0 - 5.0, 14.0) };
                put!(
                    out,
                    "<rect class=\"run {class}{ignore}\" x=\"{x:.1}\" y=\"{by:.1}\" width=\"{bar_w:.1}\" height=\"{bh:.1}\"><title>{title}</title></rect>\n"
                );
            }
            (EventKind::Edit { op, .. }, Some((y, lh))) => {
                put!(
                    out,
                    "<rect class=\"edit {}\" x=\"{:.1}\" y=\"{:.1}\" width=\"2\" height=\"{:.1}\"><title>{title}</title></rect>\n",
                    edit_class(op),
                    x - 1.0,
                    y + 4.0,
                    lh - 8.0
                );
            }
            (EventKind::MakePrimary | EventKind::Relink { .. }, Some((y, lh))) => {
                put!(
                    out,
                    "<rect class=\"switch\" x=\"{:.1}\" y=\"{:.1}\" width=\"4\" height=\"{lh:.1}\"><title>{title}</title></rect>\n",
                    x - 2.0,
                    y
                );
            }
            (EventKind::Watch, Some((y, lh))) => {
                put!(
                    out,
                    "<circle class=\"note\" cx=\"{x:.1}\" cy=\"{:.1}\" r=\"2.5\"><title>{title}</title></circle>\n",
                    y + lh - 5.0
                );
            }
            (kind, None) if e.lane == Lane::World => {
                let label = if *kind == EventKind::Liveness { "liveness" } else { "world" };
                put!(
                    out,
                    "<line class=\"phase\" x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\"><title>{title}</title></line>\n",
                    AXIS_H - 4.0,
                    h - BOTTOM
                );
                put!(out, "<text x=\"{:.1}\" y=\"{:.1}\">{label}</text>\n", x + 4.0, AXIS_H - 1.0);
            }
            _ => {}
        }
        // The faults of the event, centred above its mark.
        if let Some((y, _)) = row {
            let n = e.faults.len() as f64;
            let centre = if matches!(e.kind, EventKind::SyncRun { .. }) { x + bar_w / 2.0 } else { x };
            for (i, kind) in e.faults.iter().enumerate() {
                let cx = centre + (i as f64 - (n - 1.0) / 2.0) * 7.0;
                put!(
                    out,
                    "<path class=\"fault {}\" d=\"M{cx:.1},{:.1}l3.5,3.5l-3.5,3.5l-3.5,-3.5z\"><title>{kind}: {title}</title></path>\n",
                    fault_family(*kind),
                    y + 1.0
                );
            }
        }
    }
    if let Verdict::Failed { at_step: Some(at), .. } = verdict {
        let at_s = events.iter().filter(|e| e.step <= *at).map(|e| e.at_s).max().unwrap_or(0);
        let x = layout.x(at_s) + bar_w;
        put!(
            out,
            "<line class=\"violation\" x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\"><title>violation at event {at}</title></line>\n",
            AXIS_H - 4.0,
            h - BOTTOM
        );
        // The label on the side of the line that has room.
        let (lx, anchor) = if x > w - 80.0 { (x - 4.0, "end") } else { (x + 4.0, "start") };
        put!(
            out,
            "<text class=\"violation\" x=\"{lx:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\">violation</text>\n",
            AXIS_H - 1.0
        );
    }
    put!(out, "</svg>\n");
}

fn tables(out: &mut String, events: &[TraceEvent]) {
    let mut by_class: BTreeMap<&str, u64> = BTreeMap::new();
    let mut by_fault: BTreeMap<FaultKind, u64> = BTreeMap::new();
    for e in events {
        if let EventKind::SyncRun { outcome, .. } = &e.kind {
            *by_class.entry(run_class(outcome)).or_default() += 1;
        }
        for k in &e.faults {
            *by_fault.entry(*k).or_default() += 1;
        }
    }
    put!(out, "<table><tr><th>sync runs</th><th>count</th></tr>\n");
    for (class, _, text) in &RUN_STYLES {
        if let Some(n) = by_class.get(class) {
            put!(
                out,
                "<tr><td><i class=\"sw {class}\"></i>{}</td><td class=\"n\">{n}</td></tr>\n",
                escape(text)
            );
        }
    }
    put!(out, "</table>\n<table><tr><th>faults fired</th><th>count</th></tr>\n");
    for (kind, n) in &by_fault {
        put!(
            out,
            "<tr><td><i class=\"sw dia {}\"></i>{kind}</td><td class=\"n\">{n}</td></tr>\n",
            fault_family(*kind)
        );
    }
    put!(out, "</table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(step: u64, at_s: i64, who: &str, what: &str, outcome: &str, faults: &[FaultKind]) -> TraceEvent {
        let (lane, kind) = TraceEvent::classify(who, what, outcome);
        let line = format!("{} {:<8} {:<14} {}", hms(at_s), who, what, outcome);
        TraceEvent { step, at_s, lane, kind, faults: faults.to_vec(), line }
    }

    const OK: &str = "ok in 3/out 1 created 1 updated 2 deleted 0 untracked 0 conflicts 0 failed 0 ignored 0";
    const CONFLICT: &str =
        "ok in 3/out 1 created 1 updated 2 deleted 0 untracked 0 conflicts 1 failed 0 ignored 0";
    const FAILED: &str =
        "ok in 3/out 1 created 1 updated 2 deleted 0 untracked 0 conflicts 0 failed 2 ignored 0";

    /// Two users, three machines, every kind of mark.
    fn small() -> Vec<TraceEvent> {
        use FaultKind::*;
        vec![
            event(1, 60, "crm/u0", "update", "a1 subject=<b>&\"x\"", &[]),
            event(2, 120, "outlook/u1", "create", "e1 Task", &[]),
            event(3, 300, "U0-PC0", "sync", CONFLICT, &[]),
            event(4, 310, "U0-PC1", "sync", "secondary: nothing to do", &[ClockSkew]),
            event(
                5,
                400,
                "U1-PC0",
                "sync(ignore)",
                "stopped: get_sync_data: request lost [network-before-call: get_sync_data request lost]",
                &[IgnoreAllErrors, NetworkBeforeCall],
            ),
            event(6, 900, "U0-PC1", "make-primary", "ok", &[SwitchPrimary]),
            event(
                7,
                1200,
                "U1-PC0",
                "sync",
                "crashed after MailboxWrite [crash: killed after durable step 3]",
                &[Crash],
            ),
            event(8, 1250, "U0-PC1", "sync", FAILED, &[ItemLocked, ItemLocked]),
            event(9, 1800, "world", "liveness", "faults off, edits off", &[]),
            event(10, 2700, "U0-PC1", "sync", OK, &[]),
        ]
    }

    fn passed() -> Verdict {
        Verdict::Passed { summary: "seed 0: 5 sync runs".into() }
    }

    #[test]
    fn one_lane_per_machine_after_the_server_and_each_users_mailbox() {
        let page = render_html("t", &small(), &passed());
        let at =
            |label: &str| page.find(&format!(">{label}</text>")).unwrap_or_else(|| panic!("no lane {label}"));
        let order = ["server (CRM)", "U0-PC0", "U0-PC1", "mailbox u1", "U1-PC0"].map(at);
        assert!(order.is_sorted(), "{order:?}");
        assert_eq!(page.matches("class=\"lane ").count(), 5);
        // Users are ordered by number, not by name.
        let events = [
            event(1, 0, "U10-PC0", "sync", OK, &[]),
            event(2, 0, "U2-PC1", "sync", OK, &[]),
            event(3, 0, "U2-PC0", "sync", OK, &[]),
        ];
        let lanes = lanes(&events);
        assert_eq!(lanes, ["U2-PC0", "U2-PC1", "U10-PC0"].map(|n| Lane::Machine(n.into())));
    }

    #[test]
    fn one_bar_per_sync_run_coloured_by_outcome() {
        let events = small();
        let page = render_html("t", &events, &passed());
        let runs = events.iter().filter(|e| matches!(e.kind, EventKind::SyncRun { .. })).count();
        assert_eq!(runs, 6);
        assert_eq!(page.matches("<rect class=\"run ").count(), runs);
        for (class, n) in [
            ("conflict", 1),
            ("secondary", 1),
            ("stopped ignore", 1),
            ("crashed", 1),
            ("failed", 1),
            ("ok", 1),
        ] {
            assert_eq!(page.matches(&format!("<rect class=\"run {class}\"")).count(), n, "{class}");
        }
        assert_eq!(page.matches("<rect class=\"edit ").count(), 2);
        assert_eq!(page.matches("<rect class=\"switch\"").count(), 1);
        assert_eq!(page.matches("<line class=\"phase\"").count(), 1);
    }

    #[test]
    fn one_mark_per_fault_fired() {
        let events = small();
        let page = render_html("t", &events, &passed());
        let faults: usize = events.iter().map(|e| e.faults.len()).sum();
        assert_eq!(faults, 7);
        assert_eq!(page.matches("<path class=\"fault ").count(), faults);
        assert_eq!(page.matches("<path class=\"fault f-item\"").count(), 2);
        assert_eq!(page.matches("<path class=\"fault f-crash\"").count(), 1);
        assert_eq!(page.matches("<path class=\"fault f-net\"").count(), 1);
        assert_eq!(page.matches("<path class=\"fault f-user\"").count(), 3);
        // Hover text names the fault and the line.
        assert!(page.contains("<title>crash: 00:20:00 U1-PC0   sync           crashed after MailboxWrite"));
    }

    #[test]
    fn every_text_is_escaped() {
        let mut events = small();
        events.push(event(11, 2800, "U0-PC1", "sync", "stopped: <script>alert('x')</script> & \"so\"", &[]));
        let verdict = Verdict::Failed { what: "a <u> & \"c\"".into(), at_step: Some(11) };
        let page = render_html("seed <1> & \"2\"", &events, &verdict);
        assert!(!page.contains("<script>"));
        assert!(!page.contains("<u>"));
        assert!(
            page.contains("stopped: &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;so&quot;")
        );
        assert!(page.contains("subject=&lt;b&gt;&amp;&quot;x&quot;"));
        assert!(page.contains("<title>seed &lt;1&gt; &amp; &quot;2&quot;</title>"));
        assert!(page.contains("FAIL: a &lt;u&gt; &amp; &quot;c&quot;"));
        assert_eq!(escape("tab\tnew\nbell\u{7}"), "tab\tnew\nbell\u{fffd}");
    }

    #[test]
    fn a_violation_is_a_red_line_at_its_event_and_the_page_is_deterministic() {
        let events = small();
        let failed = Verdict::Failed { what: "lost update".into(), at_step: Some(8) };
        let page = render_html("t", &events, &failed);
        assert_eq!(page, render_html("t", &events, &failed));
        assert!(page.contains("<p class=\"verdict fail\">FAIL: lost update</p>"));
        let layout = Layout::new(&events);
        let x = layout.x(1250) + layout.bar_w();
        assert!(page.contains(&format!("<line class=\"violation\" x1=\"{x:.1}\"")), "{page}");
        let page = render_html("t", &events, &passed());
        assert!(!page.contains("class=\"violation\" x1"));
        assert!(page.contains("<p class=\"verdict pass\">PASS: seed 0: 5 sync runs</p>"));
    }

    #[test]
    fn no_events_still_make_a_page() {
        let page = render_html("empty", &[], &passed());
        assert!(page.starts_with("<!DOCTYPE html>") && page.ends_with("</html>\n"));
        assert!(page.contains("0 events, 0 sync runs, 0 faults fired"));
    }

    #[test]
    fn a_long_run_widens_the_chart_and_spaces_the_ticks() {
        let events =
            [event(1, 0, "U0-PC0", "sync", OK, &[]), event(2, 1000 * 900, "U0-PC0", "sync", OK, &[])];
        let layout = Layout::new(&events);
        assert!(layout.chart_w > 15_000.0, "{}", layout.chart_w);
        let ticks = layout.t_end / layout.tick_s() as f64;
        assert!(ticks <= 16.0 * layout.chart_w / CHART_W_MIN, "{ticks}");
        assert_eq!(Layout::new(&events[..1]).chart_w, CHART_W_MIN);
    }

    #[test]
    fn the_page_writes_whole_or_not_at_all() {
        let dir = std::env::temp_dir().join(format!("crmsync-sim-timeline-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("page.html");
        write_page(&path, "<p>one</p>").unwrap();
        write_page(&path, "<p>two</p>").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "<p>two</p>");
        // Onto a directory: an error naming the path, the directory untouched, no temp file.
        let err = write_page(&dir, "<p>three</p>").unwrap_err();
        assert_eq!(err.path, dir);
        assert!(err.to_string().starts_with(&format!("cannot write {}: ", dir.display())), "{err}");
        let missing = dir.join("no-such-dir").join("page.html");
        assert!(write_page(&missing, "x").is_err());
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["page.html"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn snapshot_of_a_small_run() {
        let events = small();
        let verdict = Verdict::Failed { what: "event 8: a lost update".into(), at_step: Some(8) };
        insta::with_settings!({ snapshot_path => "../../snapshots", prepend_module_to_snapshot => false }, {
            insta::assert_snapshot!("timeline_small", render_html("crmsync-sim small", &events, &verdict));
        });
    }
}
