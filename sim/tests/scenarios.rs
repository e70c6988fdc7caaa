//! Scenario files: every file of the library (`sim/scenarios/*.json`) runs, passes its verdicts
//! and matches its snapshot (`snapshots/scenario_<name>.snap`); the committed JSON Schema is the
//! one the types generate; every kind of bad file is refused with the JSON path of the problem;
//! the command line prints, exits and writes the timeline as documented.

use std::path::{Path, PathBuf};
use std::process::Command;

use crmsync_sim::scenario::{self, ScenarioError, state::render_text};

fn sim_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn library() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(sim_dir().join("scenarios"))
        .expect("sim/scenarios exists")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_library_scenario_passes_and_matches_its_snapshot() {
    let files = library();
    assert!(!files.is_empty(), "sim/scenarios holds no scenario");
    for file in files {
        let name = file.file_stem().and_then(|s| s.to_str()).expect("a file name").to_owned();
        let scenario = scenario::load(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(!scenario.description.trim().is_empty(), "{name}: a scenario says what it shows");
        let ran = scenario::run(&scenario).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let text = render_text(&ran.state);
        // Same scenario, same bytes.
        let again = scenario::run(&scenario).expect("it ran once");
        assert_eq!(render_text(&again.state), text, "{name}: a scenario is deterministic");
        let body = format!("{}\n\n{text}", scenario.description.trim());
        insta::with_settings!({
            snapshot_path => "../../snapshots",
            prepend_module_to_snapshot => false,
            omit_expression => true,
        }, {
            insta::assert_snapshot!(format!("scenario_{name}"), body);
        });
        assert!(ran.state.passed(), "{name}: a verdict fails:\n{text}");
    }
}

#[test]
fn the_committed_schema_is_the_generated_one() {
    let committed = std::fs::read_to_string(sim_dir().join("scenario.schema.json")).expect("the schema file");
    assert!(
        committed == scenario::schema_json(),
        "sim/scenario.schema.json is stale: run `cargo run -p crmsync-sim -- scenario-schema > sim/scenario.schema.json`"
    );
}

#[test]
fn every_library_scenario_names_the_schema() {
    for file in library() {
        let text = std::fs::read_to_string(&file).expect("readable");
        assert!(text.contains("\"$schema\": \"../scenario.schema.json\""), "{}: no $schema", file.display());
    }
}

/// Parses and runs `text`; the error it must fail with.
fn error_of(text: &str) -> ScenarioError {
    match scenario::parse(text).and_then(|s| scenario::run(&s)) {
        Ok(_) => panic!("accepted: {text}"),
        Err(e) => e,
    }
}

const WORLD: &str = r#""description": "x", "users": ["alice"],
    "machines": [{"name": "pc1", "user": "alice"}],
    "records": [{"label": "c1", "type": "contact", "owner": "alice", "fields": {"fullname": "Ann"}}],
    "items": [{"label": "i1", "user": "alice", "type": "task", "fields": {"subject": "S"}}]"#;

fn with_steps(steps: &str) -> String {
    format!("{{{WORLD}, \"steps\": [{steps}]}}")
}

#[test]
fn format_errors_carry_the_json_path() {
    let cases = [
        (format!("{{{WORLD}, \"steps\": [], \"colour\": 1}}"), "colour", "unknown field `colour`"),
        (with_steps(r#"{"sync": {"machine": "pc1", "colour": 1}}"#), "steps[0].sync.colour", "unknown field"),
        (with_steps(r#"{"dance": "pc1"}"#), "steps[0]", "unknown variant `dance`"),
        (
            with_steps(
                r#"{"sync": {"machine": "pc1", "fail": [{"crash": {"after_step": "Nap", "nth": 1}}]}}"#,
            ),
            "steps[0].sync.fail[0].crash.after_step",
            "unknown variant `Nap`",
        ),
        (with_steps(r#"{"sync": 7}"#), "steps[0].sync", "a machine name or an object"),
        ("{\"users\": []}".to_owned(), ".", "missing field `description`"),
        ("not json".to_owned(), ".", "expected"),
        (with_steps("") + " trailing", ".", "trailing"),
    ];
    for (text, path, message) in cases {
        match error_of(&text) {
            ScenarioError::Format { path: p, message: m } => {
                assert_eq!(p, path, "{text}");
                assert!(m.contains(message), "{m:?} lacks {message:?}");
            }
            other => panic!("{text}: {other:?}"),
        }
    }
}

#[test]
fn dangling_references_name_the_path_and_the_label() {
    let cases = [
        (with_steps(r#"{"sync": "pc9"}"#), "steps[0].sync.machine", "machine", "pc9"),
        (
            with_steps(r#"{"edit": {"side": "crm", "record": "c9", "set": {}}}"#),
            "steps[0].edit.record",
            "record",
            "c9",
        ),
        (
            with_steps(r#"{"delete": {"side": "outlook", "item": "i9"}}"#),
            "steps[0].delete.item",
            "item",
            "i9",
        ),
        (with_steps(r#"{"give": {"record": "c1", "to": "bob"}}"#), "steps[0].give.to", "user", "bob"),
        (
            with_steps(r#"{"check": {"counts": {"queue": {"pc2": 0}}}}"#),
            "steps[0].check.counts.queue.pc2",
            "machine",
            "pc2",
        ),
        (
            r#"{"description": "x", "users": ["a"], "machines": [{"name": "m", "user": "b"}], "steps": []}"#
                .to_owned(),
            "machines[0].user",
            "user",
            "b",
        ),
    ];
    for (text, path, kind, label) in cases {
        match error_of(&text) {
            ScenarioError::Unknown { path: p, kind: k, label: l } => {
                assert_eq!((p.as_str(), k, l.as_str()), (path, kind, label), "{text}");
            }
            other => panic!("{text}: {other:?}"),
        }
    }
}

#[test]
fn impossible_steps_are_refused_with_their_path() {
    let cases = [
        (with_steps(r#"{"unlink": "pc1"}, {"sync": "pc1"}"#), "steps[1].sync.machine", "unlinked"),
        (
            with_steps(
                r#"{"delete": {"side": "crm", "record": "c1"}}, {"edit": {"side": "crm", "record": "c1"}}"#,
            ),
            "steps[1].edit",
            "deleted",
        ),
        (
            with_steps(r#"{"edit": {"side": "outlook", "record": "c1"}}"#),
            "steps[0].edit",
            "holds no item linked",
        ),
        (with_steps(r#"{"edit": {"side": "crm", "item": "i1"}}"#), "steps[0].edit", "not linked"),
        (with_steps(r#"{"delete": {"side": "crm"}}"#), "steps[0].delete", "exactly one"),
        (with_steps(r#"{"link": "pc1"}"#), "steps[0].link", "linked already"),
        (
            with_steps(
                r#"{"delete": {"side": "outlook", "item": "i1"}}, {"track": {"side": "outlook", "item": "i1"}}"#,
            ),
            "steps[1].track",
            "was deleted",
        ),
    ];
    for (text, path, why) in cases {
        match error_of(&text) {
            ScenarioError::Impossible { path: p, why: w } => {
                assert_eq!(p, path, "{text}");
                assert!(w.contains(why), "{w:?} lacks {why:?}");
            }
            other => panic!("{text}: {other:?}"),
        }
    }
}

#[test]
fn duplicate_labels_and_invalid_values_are_refused() {
    let dup = r#"{"description": "x", "users": ["a", "a"], "steps": []}"#;
    assert!(
        matches!(error_of(dup), ScenarioError::Duplicate { path, kind: "user", label } if path == "users[1]" && label == "a")
    );
    let dup =
        with_steps(r#"{"create": {"side": "outlook", "label": "c1", "type": "task", "user": "alice"}}"#);
    assert!(
        matches!(error_of(&dup), ScenarioError::Duplicate { path, label, .. } if path == "steps[0].create.label" && label == "c1")
    );
    let goid = r#"{"description": "x", "users": ["a"],
        "records": [{"label": "c", "type": "contact", "owner": "a", "goid": "m"}], "steps": []}"#;
    assert!(
        matches!(error_of(goid), ScenarioError::Invalid { path, value, .. } if path == "records[0].goid" && value == "m")
    );
    let label = r#"{"description": "x", "users": ["a b"], "steps": []}"#;
    assert!(matches!(error_of(label), ScenarioError::Invalid { path, .. } if path == "users[0]"));
    let nth = with_steps(r#"{"sync": {"machine": "pc1", "fail": [{"duplicate_page": {"nth": 0}}]}}"#);
    assert!(
        matches!(error_of(&nth), ScenarioError::Invalid { path, .. } if path == "steps[0].sync.fail[0].duplicate_page.nth")
    );
    let long = format!(
        r#"{{"description": "x", "users": ["a"], "records": [{{"label": "c", "type": "contact", "owner": "a", "fields": {{"f": "{}"}}}}], "steps": []}}"#,
        "x".repeat(1_000_000)
    );
    assert!(matches!(error_of(&long), ScenarioError::Invalid { path, .. } if path == "records[0].fields"));
    let missing = scenario::load(Path::new("/nonexistent/scenario.json")).expect_err("no such file");
    assert!(matches!(missing, ScenarioError::Read { .. }));
}

#[test]
fn a_failed_check_or_an_unfired_fault_fails_the_verdicts() {
    let text = with_steps(
        r#"{"sync": {"machine": "pc1", "fail": [{"crash": {"after_step": "Reconcile", "nth": 5}}]}},
           {"check": {"records": {"c1": {"fields": {"fullname": "Bob"}}}}}"#,
    );
    let ran = scenario::run(&scenario::parse(&text).expect("valid")).expect("runs");
    assert!(!ran.state.passed());
    let failed: Vec<&str> = ran.state.verdicts.iter().filter(|v| !v.ok).map(|v| v.name.as_str()).collect();
    assert_eq!(failed, ["every scripted fault fired", "checks"]);
    let text = render_text(&ran.state);
    assert!(
        text.contains(
            "steps[1].check.records.c1: record c1.fullname is Some(\"Ann\"), expected Some(\"Bob\")"
        ),
        "{text}"
    );
}

fn sim_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_crmsync-sim"))
}

#[test]
fn the_command_prints_text_or_json_exits_by_verdict_and_writes_the_timeline() {
    let file = sim_dir().join("scenarios").join("row01_crm_create_unmapped.json");
    let out = sim_bin().arg("scenario").arg(&file).output().expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let scenario = scenario::load(&file).expect("loads");
    assert_eq!(text, render_text(&scenario::run(&scenario).expect("runs").state));

    let out = sim_bin().arg("scenario").arg(&file).arg("--json").output().expect("runs");
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(json["verdicts"].as_array().is_some_and(|v| v.iter().all(|v| v["ok"] == true)));

    let dir = std::env::temp_dir().join(format!("crmsync-scenario-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let page = dir.join("t.html");
    let out = sim_bin().arg("scenario").arg(&file).arg("--html").arg(&page).output().expect("runs");
    assert!(out.status.success());
    let html = std::fs::read_to_string(&page).expect("the page");
    assert!(html.contains("<svg") && html.contains("pc1"), "a timeline with the machine's lane");

    let bad = dir.join("bad.json");
    std::fs::write(&bad, with_steps(r#"{"sync": "pc9"}"#)).expect("written");
    let out = sim_bin().arg("scenario").arg(&bad).output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("steps[0].sync.machine: no machine named \"pc9\""));

    let failing = dir.join("failing.json");
    std::fs::write(&failing, with_steps(r#"{"check": {"counts": {"records": 5}}}"#)).expect("written");
    let out = sim_bin().arg("scenario").arg(&failing).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let _ = std::fs::remove_dir_all(&dir);

    let out = sim_bin().arg("scenario-schema").output().expect("runs");
    assert_eq!(String::from_utf8(out.stdout).expect("utf-8"), scenario::schema_json());
}
