//! The `crmsync` commands over a demo's files, as a user runs them: `sync`, `inspect` and
//! `unlink` as real processes, their exit codes, their JSON, and what they leave on disk.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crmsync::clock::SystemClock;
use crmsync::demo::DEMO_FILES;
use crmsync::{ActivityStatus, Fields, Mailbox, ObjectTypeCode, SqliteMailbox, UserEdits};
use serde_json::Value;

/// A folder of its own, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("crmsync-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A demo's three files, closed.
struct Demo {
    _dir: TempDir,
    server: PathBuf,
    mailbox: PathBuf,
    cache: PathBuf,
}

impl Demo {
    fn new(name: &str) -> Demo {
        let dir = TempDir::new(name);
        let out = crmsync(&["demo", "--records", "20", "--json", "--dir", s(&dir.0)]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let [server, mailbox, cache] = DEMO_FILES.map(|f| dir.join(f));
        Demo { _dir: dir, server, mailbox, cache }
    }

    fn sync(&self, extra: &[&str]) -> Output {
        let mut args = vec!["sync", "--server", s(&self.server), "--mailbox", s(&self.mailbox)];
        args.extend(["--cache", s(&self.cache)]);
        args.extend(extra);
        crmsync(&args)
    }

    fn inspect(&self) -> Value {
        let out = crmsync(&["inspect", "--json", "--cache", s(&self.cache)]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn mailbox_items(&self) -> usize {
        let mailbox = SqliteMailbox::open_existing(&self.mailbox, Box::new(SystemClock)).unwrap();
        mailbox.all_items().unwrap().len()
    }
}

fn crmsync(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_crmsync")).args(args).output().unwrap()
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Created, updated and deleted over every entity type of a `sync --json` report.
fn writes(report: &Value) -> u64 {
    let by_entity = report["by_entity"].as_object().unwrap();
    by_entity
        .values()
        .map(|c| ["created", "updated", "deleted"].iter().map(|k| c[k].as_u64().unwrap()).sum::<u64>())
        .sum()
}

#[test]
fn sync_after_the_demo_takes_a_new_tracked_item_to_crm_then_has_nothing_to_do() {
    let demo = Demo::new("sync");
    // The user tracks a new contact in Outlook: the next sync creates it in CRM under a new id.
    {
        let mut mailbox = SqliteMailbox::open_existing(&demo.mailbox, Box::new(SystemClock)).unwrap();
        let fields = Fields::try_from_pairs([("fullname", "Nia Kerr")]).unwrap();
        let item = mailbox.user_create(ObjectTypeCode::Contact, fields, None, ActivityStatus::Open).unwrap();
        mailbox.user_track(&item).unwrap();
    }
    let out = demo.sync(&["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let first: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(first["primary"], true);
    assert_eq!(first["mailbox_changes"], 1);
    // The report keys entity types by their ObjectTypeCode (contact: 2).
    let contact = ObjectTypeCode::Contact.code().to_string();
    assert_eq!(first["by_entity"][&contact]["created"], 1, "{first:#}");
    assert_eq!(writes(&first), 1);

    let out = demo.sync(&["--json", "--commit-every", "10", "--ignore-all-errors"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let second: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(writes(&second), 0, "{second:#}");

    let out = demo.sync(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("Synchronised subscription "), "{}", text(&out.stdout));

    let state = demo.inspect();
    assert_eq!(state["queue"].as_array().unwrap().len(), 0);
    let linked = state["mapping"].as_array().unwrap();
    assert!(linked.iter().any(|m| m["entity"] == "contact" && m["crm_version"].is_u64()));
}

#[test]
fn inspect_shows_the_demo_cache_and_leaves_its_bytes_unchanged() {
    let demo = Demo::new("inspect");
    let before = std::fs::read(&demo.cache).unwrap();
    assert!(!sidecar(&demo.cache, "-wal").exists(), "the demo closed its cache");

    let state = demo.inspect();
    assert_eq!(state["queue"], Value::Array(vec![]));
    let ignored = state["ignored"].as_array().unwrap();
    assert_eq!(ignored.len(), 1, "{state:#}");
    assert!(ignored[0]["key"].as_str().unwrap().starts_with("crm:"));
    assert!(ignored[0]["error"].as_str().unwrap().contains("email"), "{state:#}");
    assert!(!state["mapping"].as_array().unwrap().is_empty());
    assert!(state["subscription"].is_string() && state["user"].is_string());

    let out = crmsync(&["inspect", "--cache", s(&demo.cache)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    for heading in ["Queue: 0 change(s)", "linked pair(s)", "Ignored errors: 1", "CRMID", "ERROR"] {
        assert!(table.contains(heading), "{heading:?} in\n{table}");
    }

    assert_eq!(std::fs::read(&demo.cache).unwrap(), before, "inspect changed the cache file");
    assert!(!sidecar(&demo.cache, "-wal").exists() && !sidecar(&demo.cache, "-shm").exists());
}

#[test]
fn unlink_forgets_the_link_and_keeps_every_item() {
    let demo = Demo::new("unlink");
    let items = demo.mailbox_items();
    let mailbox_before = std::fs::read(&demo.mailbox).unwrap();
    let pairs = demo.inspect()["mapping"].as_array().unwrap().len();

    let out = crmsync(&["unlink", "--json", "--server", s(&demo.server), "--cache", s(&demo.cache)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let removed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(removed["mapping_forgotten"], pairs);
    assert_eq!(removed["ignored_forgotten"], 1);
    assert!(removed["sync_entry_table"].as_str().unwrap().starts_with("SyncEntry_"));

    let state = demo.inspect();
    assert_eq!(state["mapping"], Value::Array(vec![]));
    assert_eq!(state["queue"], Value::Array(vec![]));
    assert_eq!(state["ignored"], Value::Array(vec![]));
    assert_eq!(state["subscription"], Value::Null);

    let out = demo.sync(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("the cache was not linked to a subscription"),
        "{}",
        text(&out.stderr)
    );
    let out = crmsync(&["unlink", "--server", s(&demo.server), "--cache", s(&demo.cache)]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));

    assert_eq!(std::fs::read(&demo.mailbox).unwrap(), mailbox_before, "unlink or sync touched the mailbox");
    assert_eq!(demo.mailbox_items(), items);
}

#[test]
fn bad_paths_are_refused_with_exit_2_and_no_file_is_created_or_changed() {
    let demo = Demo::new("paths");
    let dir = TempDir::new("paths-bad");
    let missing = dir.join("missing.sqlite");
    let empty = dir.join("empty.sqlite");
    std::fs::write(&empty, b"").unwrap();
    let text_file = dir.join("notes.txt");
    std::fs::write(&text_file, b"not a database at all, just some text that is long enough").unwrap();
    let cases: [(&Path, &str); 4] = [
        (&missing, "no such file"),
        (&dir.0, "is a directory"),
        (&empty, "empty file"),
        (&text_file, "not a"),
    ];
    let good = [s(&demo.server), s(&demo.mailbox), s(&demo.cache)];
    let files_before: Vec<Vec<u8>> = good.iter().map(|f| std::fs::read(f).unwrap()).collect();
    for (bad, message) in cases {
        let bad = s(bad);
        let before = std::fs::read(bad).ok();
        let [server, mailbox, cache] = good;
        let commands: [Vec<&str>; 6] = [
            vec!["sync", "--server", bad, "--mailbox", mailbox, "--cache", cache],
            vec!["sync", "--server", server, "--mailbox", bad, "--cache", cache],
            vec!["sync", "--server", server, "--mailbox", mailbox, "--cache", bad],
            vec!["inspect", "--cache", bad],
            vec!["unlink", "--server", bad, "--cache", cache],
            vec!["unlink", "--server", server, "--cache", bad],
        ];
        for args in commands {
            let out = crmsync(&args);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(stderr.contains(bad) && stderr.contains(message), "{args:?}: {stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
            assert_eq!(std::fs::read(bad).ok(), before, "{args:?} changed {bad}");
            assert!(!sidecar(Path::new(bad), "-wal").exists(), "{args:?}");
            assert!(!sidecar(Path::new(bad), "-shm").exists(), "{args:?}");
        }
    }
    assert!(!missing.exists());
    let files_after: Vec<Vec<u8>> = good.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(files_before == files_after, "a refused command changed a demo file");
    // The demo's files are no substitute for one another.
    let out = crmsync(&["inspect", "--cache", good[0]]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not an OutlookSyncCache"), "{}", text(&out.stderr));
    let out = crmsync(&["sync", "--server", good[0], "--mailbox", good[2], "--cache", good[2]]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not a crmsync mailbox"), "{}", text(&out.stderr));
    assert_eq!(crmsync(&["sync", "--server", good[0]]).status.code(), Some(2));
    let out = demo.sync(&["--commit-every", "0"]);
    assert_eq!(out.status.code(), Some(2));
}
