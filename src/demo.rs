//! The demo world `crmsync demo` runs: a CRM server, one user's Outlook mailbox and its sync
//! cache as three SQLite files in one folder, filled with sample users, contacts, tasks and
//! shared meetings, edited on both sides (a conflict and an item that cannot sync included), and
//! synchronised three times. It shows a newcomer the whole process on their own machine.

use std::path::PathBuf;

use serde::Serialize;
use uuid::Uuid;

use crate::cache::{CacheOpenError, SyncCache};
use crate::change::ActivityStatus;
use crate::clock::SystemClock;
use crate::engine::{Edges, EngineConfig, EngineError, RunReport, SeededIds, StepObserver, run_sync};
use crate::entity::ObjectTypeCode;
use crate::fields::{FieldPatch, Fields};
use crate::ids::{CrmId, GlobalObjectId, VersionNumber};
use crate::mailbox::{Mailbox, MailboxError, UserEdits};
use crate::mailbox_file::{MailboxOpenError, SqliteMailbox};
use crate::server::{
    CrmService, OpenError, ServerError, ServerRecord, ServerStore, SubscriptionType, SystemUserId,
};

/// Most records a demo makes.
pub const DEMO_RECORDS_MAX: usize = 100_000;

/// The files of a demo, in its folder.
pub const DEMO_FILES: [&str; 3] = ["server.sqlite", "mailbox.sqlite", "OutlookSyncCache.sqlite"];

/// The cache metadata key of the subscription the cache is linked to (its `SubscriptionId`), so
/// `crmsync sync` and `crmsync unlink` can find it.
pub const SUBSCRIPTION_KEY: &str = "subscription";
/// The cache metadata key of the user the linked subscription belongs to (its `SystemUserId`).
pub const USER_KEY: &str = "user";

#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub dir: PathBuf,
    /// Records on the server (at least 8, at most [`DEMO_RECORDS_MAX`]).
    pub records: usize,
    pub seed: u64,
}

/// One sync run of the demo.
#[derive(Debug, Clone, Serialize)]
pub struct DemoRun {
    pub name: &'static str,
    pub report: RunReport,
}

/// What the demo did and left behind.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub dir: PathBuf,
    pub runs: Vec<DemoRun>,
    pub mailbox_items: usize,
    pub mapped_pairs: usize,
    pub queue_left: usize,
    pub ignored_errors: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}: already holds a demo file; give an empty or new folder (nothing was changed)")]
    NotEmpty(PathBuf),
    #[error("--records {0} is not within 8..={DEMO_RECORDS_MAX}")]
    Records(usize),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    ServerOpen(#[from] OpenError),
    #[error(transparent)]
    MailboxOpen(#[from] MailboxOpenError),
    #[error(transparent)]
    CacheOpen(#[from] CacheOpenError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Mailbox(#[from] MailboxError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// SplitMix64: the demo's only source of variety, so a seed gives one demo.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

const FIRST: &[&str] = &["Ada", "Ben", "Chloe", "Dev", "Eva", "Finn", "Grace", "Hugo", "Iris", "Jon"];
const LAST: &[&str] = &["Ng", "Okafor", "Diaz", "Smith", "Kowalski", "Haddad", "Lund", "Moreau"];
const TOPICS: &[&str] = &["Quarterly review", "Contract renewal", "Site visit", "Kick-off", "Pricing call"];

fn user(n: u8) -> SystemUserId {
    SystemUserId::new(Uuid::from_u128(0xa11ce + n as u128)).expect("non-nil")
}

fn crm_id(seed: u64, n: usize) -> CrmId {
    let name = format!("crmsync-demo/{seed}/record/{n}");
    CrmId::new(Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes())).expect("a v5 id is never nil")
}

fn fields(pairs: &[(&str, String)]) -> Fields {
    Fields::try_from_pairs(pairs.iter().map(|(n, v)| (*n, v.as_str()))).expect("demo fields are small")
}

/// Builds the demo world in `config.dir`, runs it, and reports. `observer` hears every durable
/// step (the CLI draws its progress bar from it).
pub fn run_demo(config: &DemoConfig, observer: &mut dyn StepObserver) -> Result<DemoReport, DemoError> {
    if !(8..=DEMO_RECORDS_MAX).contains(&config.records) {
        return Err(DemoError::Records(config.records));
    }
    std::fs::create_dir_all(&config.dir)
        .map_err(|source| DemoError::Io { path: config.dir.clone(), source })?;
    let path = |name: &str| config.dir.join(name);
    if let Some(taken) = DEMO_FILES.iter().map(|f| path(f)).find(|p| p.exists()) {
        return Err(DemoError::NotEmpty(taken));
    }
    let mut server = ServerStore::open(&path(DEMO_FILES[0]), Box::new(SystemClock))?;
    let mut mailbox = SqliteMailbox::open(&path(DEMO_FILES[1]), "DE", Box::new(SystemClock))?;
    let mut cache = SyncCache::open(&path(DEMO_FILES[2]))?;
    let mut rng = Rng(config.seed);
    let (alice, bob) = (user(0), user(1));
    server.add_user(alice, "Alice Ng")?;
    server.add_user(bob, "Bob Okafor")?;

    // The server: contacts and tasks Alice owns, meetings she organises and meetings Bob
    // organises with her as an attendee (one GOID each, shared), and some of Bob's own records.
    let mut records = Vec::with_capacity(config.records);
    for n in 0..config.records {
        let name = format!("{} {}", rng.pick(FIRST), rng.pick(LAST));
        let topic = rng.pick(TOPICS).to_owned();
        let (object_type, owner, attendees, fields) = match n % 5 {
            0 | 1 => (
                ObjectTypeCode::Contact,
                alice,
                vec![],
                fields(&[
                    ("fullname", name.clone()),
                    ("emailaddress1", format!("{}@example.com", name.to_lowercase().replace(' ', "."))),
                ]),
            ),
            2 => (
                ObjectTypeCode::Task,
                alice,
                vec![],
                fields(&[("subject", format!("Call {name}")), ("prioritycode", "1".into())]),
            ),
            3 => (
                ObjectTypeCode::Appointment,
                if n % 2 == 0 { alice } else { bob },
                vec![alice, bob],
                fields(&[("subject", topic), ("location", format!("Room {}", n % 7))]),
            ),
            _ => (ObjectTypeCode::Contact, bob, vec![], fields(&[("fullname", name)])),
        };
        records.push(ServerRecord {
            crm_id: crm_id(config.seed, n),
            object_type,
            owner,
            version: VersionNumber(0),
            fields,
            goid: object_type
                .is_calendar()
                .then(|| GlobalObjectId::new(format!("demo-meeting-{n}").into_bytes()).expect("valid")),
            status: ActivityStatus::Open,
            attendees,
        });
    }
    server.put_records(&records)?;

    // Alice's Outlook: contacts she tracks, one she keeps private, and the invitation to one of
    // Bob's meetings, already in her calendar (the sync links it by GOID instead of copying it).
    for name in ["Kim Park", "Lee Chan", "Max Weber"] {
        let item = mailbox.user_create(
            ObjectTypeCode::Contact,
            fields(&[("fullname", name.into())]),
            None,
            ActivityStatus::Open,
        )?;
        mailbox.user_track(&item)?;
    }
    mailbox.user_create(
        ObjectTypeCode::Contact,
        fields(&[("fullname", "My dentist".into())]),
        None,
        ActivityStatus::Open,
    )?;
    if let Some(invite) =
        records.iter().find(|r| r.object_type == ObjectTypeCode::Appointment && r.owner == bob)
    {
        mailbox.user_create(
            ObjectTypeCode::Appointment,
            invite.fields.clone(),
            invite.goid.clone(),
            ActivityStatus::Open,
        )?;
    }

    let subscription = server.register_client(alice, "ALICE-LAPTOP", SubscriptionType::Outlook)?;
    // The cache remembers what it is linked to, for the runs after the demo.
    cache.begin().map_err(EngineError::from)?;
    cache.set_meta(SUBSCRIPTION_KEY, &subscription.to_string()).map_err(EngineError::from)?;
    cache.set_meta(USER_KEY, &alice.to_string()).map_err(EngineError::from)?;
    cache.commit().map_err(EngineError::from)?;
    let mut ids = SeededIds::new(config.seed);
    let mut runs = Vec::new();
    let mut sync =
        |name, server: &mut ServerStore, mailbox: &mut SqliteMailbox, cache: &mut SyncCache, ignore| {
            let engine =
                EngineConfig { commit_every: 50, ignore_all_errors: ignore, ..EngineConfig::default() };
            let edges = Edges { server, mailbox, cache, ids: &mut ids, observer: &mut *observer };
            let report = run_sync(edges, subscription, &engine)?;
            runs.push(DemoRun { name, report });
            Ok::<(), DemoError>(())
        };
    sync("first sync", &mut server, &mut mailbox, &mut cache, false)?;

    // Edits on both sides: a tenth of Alice's records in CRM, a few items in Outlook, one contact
    // on both sides (a conflict), a task done in Outlook, a contact deleted in CRM, and an email
    // that is tracked but never synchronised (it fails).
    let alices: Vec<&ServerRecord> = records.iter().filter(|r| r.owner == alice).collect();
    for (i, record) in alices.iter().enumerate().filter(|(i, _)| i % 10 == 0) {
        let patch = FieldPatch::between(&record.fields, &edit(&record.fields, &format!("edited in CRM {i}")));
        server.update_record(record.crm_id, &patch)?;
    }
    let conflict = alices[0].crm_id;
    if let Some(item) = mailbox.find_by_stamp(conflict)? {
        let current = mailbox.get(&item)?.map(|i| i.fields).unwrap_or_default();
        mailbox.user_update(&item, edit(&current, "edited in Outlook"))?;
    }
    for record in alices.iter().skip(1).filter(|r| r.object_type == ObjectTypeCode::Contact).take(3) {
        if let Some(item) = mailbox.find_by_stamp(record.crm_id)? {
            let current = mailbox.get(&item)?.map(|i| i.fields).unwrap_or_default();
            mailbox.user_update(&item, edit(&current, "phoned, new number"))?;
        }
    }
    if let Some(task) = alices.iter().find(|r| r.object_type == ObjectTypeCode::Task) {
        if let Some(item) = mailbox.find_by_stamp(task.crm_id)? {
            mailbox.user_delete(&item)?;
        }
    }
    if let Some(gone) = alices.iter().rev().find(|r| r.object_type == ObjectTypeCode::Contact) {
        server.delete_record(gone.crm_id)?;
    }
    server.put_record(&ServerRecord {
        crm_id: crm_id(config.seed, config.records),
        object_type: ObjectTypeCode::Email,
        owner: alice,
        version: VersionNumber(0),
        fields: fields(&[("subject", "Re: pricing".into())]),
        goid: None,
        status: ActivityStatus::Open,
        attendees: vec![],
    })?;
    sync("after edits", &mut server, &mut mailbox, &mut cache, false)?;
    sync("ignore all errors", &mut server, &mut mailbox, &mut cache, true)?;

    let state = cache.load().map_err(EngineError::from)?;
    Ok(DemoReport {
        dir: config.dir.clone(),
        runs,
        mailbox_items: mailbox.all_items()?.len(),
        mapped_pairs: state.mapping.len(),
        queue_left: state.queue.len(),
        ignored_errors: state.ignored.len(),
    })
}

/// `fields` with its first field's value replaced by `note`.
fn edit(fields: &Fields, note: &str) -> Fields {
    let pairs: Vec<(String, String)> = fields
        .iter()
        .enumerate()
        .map(|(i, (n, v))| (n.to_owned(), if i == 0 { format!("{v} ({note})") } else { v.to_owned() }))
        .collect();
    Fields::try_from_pairs(pairs).unwrap_or_else(|_| fields.clone())
}

/// The demo's default folder: a new one under the system's temporary folder.
pub fn default_dir(seed: u64) -> PathBuf {
    std::env::temp_dir().join(format!("crmsync-demo-{seed}-{}", std::process::id()))
}
