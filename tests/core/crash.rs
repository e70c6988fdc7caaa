//! Crash safety with real processes (DOMAIN 6.4): `crmsync sync` runs a sync of a few hundred
//! changes in a child process that stops at a chosen durable step (`CRMSYNC_PAUSE_AT_STEP`) and
//! is killed there with SIGKILL; the sync is then run again. Whatever the kill point, the final
//! server, mailbox and cache equal those of an uninterrupted run: no duplicate, nothing lost,
//! the queue empty.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;

use chrono::{DateTime, Utc};
use crmsync::ObjectTypeCode::{Appointment, Contact, Task};
use crmsync::cache::SyncCache;
use crmsync::clock::{ManualClock, SystemClock};
use crmsync::engine::*;
use crmsync::mailbox::{Mailbox, UserEdits};
use crmsync::mailbox_file::SqliteMailbox;
use crmsync::server::*;
use crmsync::*;
use uuid::Uuid;

use crate::support::*;

const FILES: [&str; 3] = ["server.sqlite", "mailbox.sqlite", "OutlookSyncCache.sqlite"];

fn user(n: u8) -> SystemUserId {
    SystemUserId::new(Uuid::from_u128(0xc4a5 + n as u128)).unwrap()
}

fn record(n: u128, owner: u8, otc: ObjectTypeCode, value: &str, attendees: &[u8]) -> ServerRecord {
    ServerRecord {
        crm_id: id(1000 + n),
        object_type: otc,
        owner: user(owner),
        version: VersionNumber(0),
        fields: f(&[("subject", value), ("note", &format!("record {n}"))]),
        goid: otc.is_calendar().then(|| GlobalObjectId::new(format!("meeting-{n}").into_bytes()).unwrap()),
        status: ActivityStatus::Open,
        attendees: attendees.iter().map(|&u| user(u)).collect(),
    }
}

/// A linked world with a pending sync of a few hundred changes on both sides.
fn build_world(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let clock = Rc::new(ManualClock::new(DateTime::<Utc>::UNIX_EPOCH));
    let mut server = ServerStore::open(&dir.join(FILES[0]), Box::new(clock.clone())).unwrap();
    let mut mailbox = SqliteMailbox::open(&dir.join(FILES[1]), "CC", Box::new(clock.clone())).unwrap();
    let mut cache = SyncCache::open(&dir.join(FILES[2])).unwrap();
    server.add_user(user(0), "Alice").unwrap();
    server.add_user(user(1), "Bob").unwrap();
    let kinds = [Contact, Task, Appointment];
    let first: Vec<ServerRecord> =
        (0..100).map(|n| record(n, (n % 4 == 3) as u8, kinds[(n % 3) as usize], "v0", &[0, 1])).collect();
    server.put_records(&first).unwrap();
    for n in 0..10 {
        let item = mailbox
            .user_create(Contact, f(&[("subject", &format!("outlook {n}"))]), None, ActivityStatus::Open)
            .unwrap();
        mailbox.user_track(&item).unwrap();
    }
    let subscription = server.register_client(user(0), "CRASH-PC", SubscriptionType::Outlook).unwrap();
    cache.set_meta("subscription", &subscription.to_string()).unwrap();
    cache.set_meta("user", &user(0).to_string()).unwrap();
    let edges = Edges {
        server: &mut server,
        mailbox: &mut mailbox,
        cache: &mut cache,
        ids: &mut SeededIds::new(1),
        observer: &mut NoObserver,
    };
    run_sync(edges, subscription, &EngineConfig::default()).unwrap();

    // Pending: 150 new records, 30 updates, 5 deletes in CRM; 20 new tracked items, 10 edits
    // (5 of them on records also edited in CRM: conflicts) and 3 deletes in Outlook.
    let more: Vec<ServerRecord> =
        (100..250).map(|n| record(n, 0, kinds[(n % 3) as usize], "v0", &[0])).collect();
    server.put_records(&more).unwrap();
    for n in 0..30u128 {
        let mut r = server.record(id(1000 + n)).unwrap().unwrap();
        r.fields = f(&[("subject", "crm edit"), ("note", &format!("record {n}"))]);
        server.put_record(&r).unwrap();
    }
    for n in 90..95u128 {
        server.delete_record(id(1000 + n)).unwrap();
    }
    for n in 0..20 {
        let item = mailbox
            .user_create(Task, f(&[("subject", &format!("new task {n}"))]), None, ActivityStatus::Open)
            .unwrap();
        mailbox.user_track(&item).unwrap();
    }
    for n in 25..35u128 {
        if let Some(item) = mailbox.find_by_stamp(id(1000 + n)).unwrap() {
            mailbox
                .user_update(&item, f(&[("subject", "outlook edit"), ("note", &format!("record {n}"))]))
                .unwrap();
        }
    }
    for n in 60..63u128 {
        if let Some(item) = mailbox.find_by_stamp(id(1000 + n)).unwrap() {
            mailbox.user_delete(&item).unwrap();
        }
    }
    mailbox.flush().unwrap();
}

fn copy_world(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for file in FILES {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

fn sync_command(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crmsync"));
    cmd.arg("sync")
        .arg("--server")
        .arg(dir.join(FILES[0]))
        .arg("--mailbox")
        .arg(dir.join(FILES[1]))
        .arg("--cache")
        .arg(dir.join(FILES[2]))
        .args(["--commit-every", "5", "--json"])
        .env_remove(PAUSE_AT_STEP_VAR)
        .stdout(Stdio::null());
    cmd
}

fn sync_to_the_end(dir: &Path) {
    let out = sync_command(dir).stderr(Stdio::piped()).output().unwrap();
    assert!(
        out.status.success(),
        "sync failed in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a sync that stops after durable step `step`, and kills it there with SIGKILL.
fn sync_killed_at(dir: &Path, step: u64) {
    let mut child =
        sync_command(dir).env(PAUSE_AT_STEP_VAR, step.to_string()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut paused = false;
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        if line.contains("paused after durable step") {
            paused = true;
            break;
        }
    }
    assert!(paused, "the sync in {} never reached step {step}", dir.display());
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
}

/// The state that must match: record and item contents (ids aside: an item tracked in Outlook
/// gets a fresh CrmId from each process), counts, and consistency of every pair.
fn canonical(dir: &Path) -> (Vec<String>, Vec<String>, usize, usize, usize) {
    let server = ServerStore::open_existing(&dir.join(FILES[0]), Box::new(SystemClock)).unwrap();
    let mailbox = SqliteMailbox::open_existing(&dir.join(FILES[1]), Box::new(SystemClock)).unwrap();
    let cache = SyncCache::open_existing(&dir.join(FILES[2])).unwrap();
    let state = cache.load().unwrap();
    for pair in state.mapping.entries() {
        let item = mailbox.get(&pair.entry_id).unwrap().expect("a mapped item exists");
        assert_eq!(item.stamp(), Some(pair.crm_id), "the item carries its pair's stamp");
        let record = server.record(pair.crm_id).unwrap().expect("a mapped record exists");
        assert_eq!(record.fields, item.fields, "pair {} agrees", pair.crm_id);
    }
    let mut records: Vec<String> = server
        .all_records()
        .unwrap()
        .iter()
        .map(|r| format!("{} {:?} {}", r.object_type, r.owner, r.fields))
        .collect();
    records.sort();
    let mut items: Vec<String> = mailbox
        .all_items()
        .unwrap()
        .iter()
        .map(|i| format!("{} {} stamped={}", i.object_type, i.fields, i.stamp().is_some()))
        .collect();
    items.sort();
    (records, items, state.queue.len(), state.mapping.len(), state.ignored.len())
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("crmsync-crash-{name}-{}", std::process::id()))
}

#[test]
fn a_sync_killed_at_any_durable_step_and_run_again_ends_as_an_uninterrupted_one() {
    let root = temp("root");
    let pristine = root.join("pristine");
    build_world(&pristine);

    // The uninterrupted run (twice: the second takes the server's view of the first's writes).
    let reference = root.join("reference");
    copy_world(&pristine, &reference);
    sync_to_the_end(&reference);
    sync_to_the_end(&reference);
    let expected = canonical(&reference);
    assert_eq!(expected.2, 0, "the queue ends empty");

    // Where the kill points are: every durable step of the run, counted in process.
    let counted = root.join("counted");
    copy_world(&pristine, &counted);
    let steps = {
        let mut server = ServerStore::open_existing(&counted.join(FILES[0]), Box::new(SystemClock)).unwrap();
        let mut mailbox =
            SqliteMailbox::open_existing(&counted.join(FILES[1]), Box::new(SystemClock)).unwrap();
        let mut cache = SyncCache::open_existing(&counted.join(FILES[2])).unwrap();
        let subscription: SubscriptionId = cache.meta("subscription").unwrap().unwrap().parse().unwrap();
        let mut kinds = Recorder::default();
        let edges = Edges {
            server: &mut server,
            mailbox: &mut mailbox,
            cache: &mut cache,
            ids: &mut SeededIds::new(9),
            observer: &mut kinds,
        };
        let config = EngineConfig { commit_every: 5, ..EngineConfig::default() };
        let report = run_sync(edges, subscription, &config).unwrap();
        assert!(
            report.server_changes + report.mailbox_changes >= 200,
            "a sync of a few hundred changes: {report:?}"
        );
        kinds.0
    };
    // At least 50 kill points, spread over the run, and every kind of step among them.
    let total = steps.len() as u64;
    let mut points: Vec<u64> = (0..60).map(|i| 1 + i * (total - 1) / 59).collect();
    for kind in [
        DurableStep::QueueServerPage,
        DurableStep::AcknowledgeServerPage,
        DurableStep::QueueMailboxPage,
        DurableStep::ApplyAction,
        DurableStep::FlushMailbox,
        DurableStep::SettleAction,
        DurableStep::CommitGroup,
    ] {
        let at = steps.iter().position(|s| *s == kind).expect("the run has every kind of step");
        points.push(at as u64 + 1);
    }
    points.sort();
    points.dedup();
    assert!(points.len() >= 50, "{} kill points", points.len());

    for step in points {
        let dir = root.join(format!("killed-{step}"));
        copy_world(&pristine, &dir);
        sync_killed_at(&dir, step);
        sync_to_the_end(&dir);
        sync_to_the_end(&dir);
        assert_eq!(
            canonical(&dir),
            expected,
            "killed after durable step {step} ({:?})",
            steps[step as usize - 1]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// Records the kind of every durable step.
#[derive(Default)]
struct Recorder(Vec<DurableStep>);

impl StepObserver for Recorder {
    fn after(&mut self, step: DurableStep) -> Result<(), Interrupt> {
        self.0.push(step);
        Ok(())
    }
}
