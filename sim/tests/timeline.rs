//! The picture of a run, end to end: the structured trace of real seeds accounts for every line,
//! run and fault; `crmsync-sim run --html` writes the page without changing what it prints and
//! fails cleanly on a path it cannot write; and the page renders in headless Chromium (skipped,
//! with a message, where `/usr/bin/chromium` is not installed; `.ci/run` installs it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crmsync_sim::FaultKind;
use crmsync_sim::timeline::{Verdict, render_html};
use crmsync_sim::trace::{EventKind, RunOutcome, TraceEvent};
use crmsync_sim::world::{FaultChoice, WorldConfig, run_seed};

const CHROMIUM: &str = "/usr/bin/chromium";
const BIN: &str = env!("CARGO_BIN_EXE_crmsync-sim");

/// A fresh directory of this test process under the system's temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("crmsync-sim-timeline-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn small_world() -> [&'static str; 8] {
    ["--users", "2", "--machines", "4", "--records", "60", "--runs", "5"]
}

fn check_events_against_outcome(seed: u64, config: &WorldConfig) -> Vec<TraceEvent> {
    let outcome = run_seed(seed, config, true).unwrap();
    assert!(outcome.passed(), "seed {seed}: {:?}", outcome.violation);
    let events = outcome.trace.timeline.as_ref().unwrap().events.clone();
    let lines = outcome.trace.lines.as_ref().unwrap();
    // One event per line, carrying that line.
    assert_eq!(events.iter().map(|e| &e.line).collect::<Vec<_>>(), lines.iter().collect::<Vec<_>>());
    // Every line understood.
    for e in &events {
        assert!(
            !matches!(e.kind, EventKind::Other | EventKind::SyncRun { outcome: RunOutcome::Unknown, .. }),
            "not understood: {}",
            e.line
        );
        assert!(e.at_s >= 0);
    }
    assert!(events.windows(2).all(|w| w[0].at_s <= w[1].at_s && w[0].step <= w[1].step));
    // The runs that did work are the world's count of them.
    let worked = events
        .iter()
        .filter(
            |e| matches!(&e.kind, EventKind::SyncRun { outcome, .. } if *outcome != RunOutcome::Secondary),
        )
        .count() as u64;
    assert_eq!(worked, outcome.sync_runs, "seed {seed}");
    // Every fault that fired is carried by exactly one event.
    for kind in FaultKind::ALL {
        let carried = events.iter().flat_map(|e| &e.faults).filter(|k| **k == kind).count() as u64;
        assert_eq!(carried, outcome.faults.get(kind), "seed {seed}: {kind}");
    }
    events
}

#[test]
fn the_structured_trace_accounts_for_every_line_run_and_fault() {
    let events = check_events_against_outcome(3, &WorldConfig::default());
    assert!(events.len() > 400);
    // Every fault kind on, in a small world: crashes, skews and switches land on machine lanes.
    let config = WorldConfig {
        users: 3,
        machines: 7,
        records: 60,
        runs_per_machine: 6,
        faults: FaultChoice::Only(FaultKind::ALL.to_vec()),
        ..WorldConfig::default()
    };
    let events = check_events_against_outcome(5, &config);
    for kind in [FaultKind::Crash, FaultKind::ClockSkew, FaultKind::ItemLocked] {
        assert!(events.iter().any(|e| e.faults.contains(&kind)), "{kind} never fired");
    }
    let crashed =
        events.iter().filter(|e| matches!(e.kind, EventKind::SyncRun { outcome: RunOutcome::Crashed, .. }));
    assert!(crashed.clone().count() > 0);
    assert!(crashed.clone().all(|e| e.faults.contains(&FaultKind::Crash)), "a crash is on its run");
    let page = render_html("t", &events, &Verdict::Passed { summary: String::new() });
    let runs = events.iter().filter(|e| matches!(e.kind, EventKind::SyncRun { .. })).count();
    assert_eq!(page.matches("<rect class=\"run ").count(), runs);
    let faults: usize = events.iter().map(|e| e.faults.len()).sum();
    assert_eq!(page.matches("<path class=\"fault ").count(), faults);
    for m in 0..3 {
        assert!(page.contains(&format!(">U{m}-PC0</text>")));
        assert!(page.contains(&format!(">mailbox u{m}</text>")));
    }
    // Without a trace nothing is kept.
    assert!(run_seed(5, &config, false).unwrap().trace.timeline.is_none());
}

fn run_cli(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

#[test]
fn run_html_writes_the_page_and_prints_the_same_trace() {
    let dir = temp_dir("cli");
    let page = dir.join("seed 11.html");
    let page_str = page.to_str().unwrap();
    let mut args = vec!["run", "--seed", "11"];
    args.extend(small_world());
    let plain = run_cli(&args);
    args.extend(["--html", page_str]);
    let with_html = run_cli(&args);
    assert_eq!(plain.status.code(), with_html.status.code());
    assert_eq!(String::from_utf8_lossy(&plain.stdout), String::from_utf8_lossy(&with_html.stdout));
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.ends_with("</html>\n"));
    assert!(html.contains("<title>crmsync-sim run --seed 11 --users 2 --machines 4 --records 60"));
    // Self-contained: nothing to fetch, nothing to run.
    for outside in ["src=", "href=", "url(", "@import", "<script"] {
        assert!(!html.contains(outside), "{outside}");
    }
    let stdout = String::from_utf8_lossy(&plain.stdout);
    let events = stdout
        .lines()
        .take_while(|l| !l.starts_with("swarm: "))
        .filter(|l| !l.starts_with("VIOLATION"))
        .count();
    assert!(html.contains(&format!("<p class=\"meta\">{events} events, ")), "every trace line is an event");
    // Same seed, same bytes; nothing else left in the directory.
    let again = dir.join("again.html");
    args.pop();
    args.push(again.to_str().unwrap());
    assert!(run_cli(&args).status.success());
    assert_eq!(std::fs::read(&again).unwrap(), html.as_bytes());
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["again.html", "seed 11.html"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn run_html_to_a_path_it_cannot_write_fails_with_a_message_and_no_file() {
    let dir = temp_dir("bad");
    let missing = dir.join("no-such-dir").join("page.html");
    for target in [missing.as_path(), dir.as_path()] {
        let mut args = vec!["run", "--seed", "1"];
        args.extend(small_world());
        args.extend(["--html", target.to_str().unwrap()]);
        let out = run_cli(&args);
        assert_eq!(out.status.code(), Some(2), "{}", target.display());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("cannot write {}", target.display())), "{stderr}");
        // The trace was still printed.
        assert!(String::from_utf8_lossy(&out.stdout).contains("trace hash: "));
    }
    assert!(!missing.exists());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "no temporary file left behind");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The width and height in a PNG's IHDR chunk, if `bytes` start like a PNG.
fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
    let signature = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
    if bytes.len() < 24 || bytes[..8] != signature || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let word = |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    Some((word(16), word(20)))
}

/// Runs headless Chromium on `html`, writing `png`; kills it after two minutes.
fn screenshot(html: &Path, png: &Path, profile: &Path) -> std::process::ExitStatus {
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", profile.display()),
            &format!("--screenshot={}", png.display()),
            "--window-size=1400,900",
            &format!("file://{}", html.display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("chromium took more than two minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_page_renders_in_headless_chromium() {
    if !Path::new(CHROMIUM).exists() {
        println!("SKIPPED: {CHROMIUM} is not installed (`apt-get install -y chromium`; .ci/run does it)");
        return;
    }
    let dir = temp_dir("chromium");
    let html = dir.join("seed-3.html");
    let png = dir.join("seed-3.png");
    let blank = dir.join("blank.html");
    let blank_png = dir.join("blank.png");
    let out = run_cli(&["run", "--seed", "3", "--html", html.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&blank, "<!DOCTYPE html><html><body></body></html>").unwrap();
    assert!(screenshot(&html, &png, &dir.join("profile")).success());
    assert!(screenshot(&blank, &blank_png, &dir.join("profile-blank")).success());
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(png_size(&bytes), Some((1400, 900)), "{}", png.display());
    // A page of lanes, bars and text compresses far worse than an empty one.
    let blank_len = std::fs::metadata(&blank_png).unwrap().len();
    assert!(bytes.len() > 40_000, "{} bytes", bytes.len());
    assert!(bytes.len() as u64 > 8 * blank_len, "{} bytes against a blank page's {blank_len}", bytes.len());
    println!("screenshot: {} ({} bytes)", png.display(), bytes.len());
    // Kept for a look when asked to.
    if let Some(keep) = std::env::var_os("CRMSYNC_SIM_SCREENSHOT") {
        std::fs::copy(&png, keep).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
