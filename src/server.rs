//! The CRM server side on SQLite (DOMAIN section 2): the records of every synchronised entity,
//! the users, `Subscription`, `SubscriptionClients`, `SubscriptionSyncInfo` and one
//! `SyncEntry_<guid>` table per subscription, behind the [`CrmService`] trait the client talks
//! through.
//!
//! How a change reaches a client:
//! - every write to a record (create, update, delete, owner change, attendee change) stamps it
//!   with the next value of one organisation-wide counter (`VersionNumber`); a deleted record
//!   leaves a tombstone with its delete's version, and its `CrmId` is never used again;
//! - *prepare sync* looks only at records and tombstones newer than the subscription's
//!   watermark (`AckedVersion`), decides per record create / update / delete against the sync
//!   filter and `SyncEntry_<guid>`, stores the result in `PreparedChange` in (`VersionNumber`,
//!   `CrmId`) order and answers the XML summary;
//! - *get sync data* pages through `PreparedChange`, handing out each record as it is now; a
//!   record the client never confirmed holding gets a `SyncEntry` row in `State` 1;
//! - *acknowledge* (through a page's last sequence number) moves those `SyncEntry` rows to
//!   `State` 0 (held) or 2 (deleted on the client) and raises the watermark. What was handed out
//!   and not acknowledged stays above the watermark, so the next prepare hands it out again.
//!
//! A file that is not a crmsync server store, or is of a newer schema, is refused with a typed
//! error before anything is written to it.

use std::cell::RefCell;
use std::fmt;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::change::{ActivityStatus, Change, ChangeError, ChangeKind, ChangeOp, DeleteReason, Record, Role};
use crate::clock::Clock;
use crate::entity::{ObjectTypeCode, UnknownObjectTypeCode};
use crate::fields::{FieldPatch, Fields, FieldsError};
use crate::ids::{CrmId, GlobalObjectId, IdError, VersionNumber};
use crate::summary::{SummaryError, SyncSummary};

/// `PRAGMA application_id` of a crmsync server store ("CRMS").
pub const SERVER_APPLICATION_ID: i32 = 0x4352_4D53;
/// The schema version this build writes and reads (`PRAGMA user_version`).
pub const SERVER_SCHEMA_VERSION: i32 = 2;
/// Largest page *get sync data* hands out.
pub const PAGE_SIZE_MAX: usize = 10_000;
/// Longest machine name, in bytes.
pub const MACHINE_NAME_LEN_MAX: usize = 256;

macro_rules! uuid_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "Uuid", into = "Uuid")]
        pub struct $name(Uuid);

        impl $name {
            pub fn new(uuid: Uuid) -> Result<Self, IdError> {
                if uuid.is_nil() {
                    return Err(IdError::NilCrmId);
                }
                Ok(Self(uuid))
            }

            pub fn as_uuid(&self) -> &Uuid {
                &self.0
            }
        }

        impl TryFrom<Uuid> for $name {
            type Error = IdError;
            fn try_from(uuid: Uuid) -> Result<Self, IdError> {
                Self::new(uuid)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Uuid {
                id.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(Uuid::parse_str(s).map_err(|_| IdError::NotAGuid(s.to_owned()))?)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

uuid_newtype!(
    /// A CRM user (`SystemUserId`).
    SystemUserId
);
uuid_newtype!(
    /// One subscription of one user on one machine (`SubscriptionId`).
    SubscriptionId
);

impl SubscriptionId {
    /// `SyncEntry_<guid without dashes>`.
    pub fn sync_entry_table(&self) -> String {
        format!("SyncEntry_{}", self.0.simple())
    }
}

/// The kind of sync a subscription is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SubscriptionType {
    Offline = 0,
    Outlook = 1,
    /// Kept and reported, never synchronised (the address book is synced by MAPI).
    AddressBookProvider = 2,
}

impl SubscriptionType {
    pub fn code(self) -> i64 {
        self as i64
    }

    pub fn from_code(code: i64) -> Option<SubscriptionType> {
        match code {
            0 => Some(SubscriptionType::Offline),
            1 => Some(SubscriptionType::Outlook),
            2 => Some(SubscriptionType::AddressBookProvider),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SubscriptionType::Offline => "Offline",
            SubscriptionType::Outlook => "Outlook",
            SubscriptionType::AddressBookProvider => "AddressBookProvider",
        }
    }
}

/// Why a server store file could not be opened. The file is left as it was.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: not a crmsync server store (application_id {found:#x})")]
    NotAServerStore { path: PathBuf, found: i32 },
    #[error("{path}: schema version {found} is newer than the {SERVER_SCHEMA_VERSION} this build reads")]
    NewerSchema { path: PathBuf, found: i32 },
    #[error("{path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
}

/// Why a server operation failed. Every variant carries the offending value.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("no user {0}")]
    UnknownUser(SystemUserId),
    #[error("no subscription {0}")]
    UnknownSubscription(SubscriptionId),
    #[error("machine {client:?} is not a client of subscription {subscription}")]
    UnknownClient { subscription: SubscriptionId, client: String },
    #[error("machine name {0:?} is empty or longer than {MACHINE_NAME_LEN_MAX} bytes")]
    BadMachineName(String),
    #[error("subscription {subscription} is an {kind:?} subscription, which is never synchronised")]
    NotSynchronised { subscription: SubscriptionId, kind: SubscriptionType },
    #[error("no record {0}")]
    UnknownRecord(CrmId),
    #[error("record {0} was deleted; a CrmId is never used again")]
    RecordDeleted(CrmId),
    #[error("record {crm_id} already exists with other values; a retried create must repeat them")]
    CreateConflict { crm_id: CrmId },
    /// A create of a meeting that another user's client already created under this id (both
    /// brought back one meeting deleted in CRM). Nothing was created; the creating user is now
    /// an attendee, so the meeting is in their filter and their edit can be merged into it.
    #[error("meeting {crm_id} was already created by another attendee (at v{version}); joined it")]
    MeetingJoined { crm_id: CrmId, version: VersionNumber },
    #[error("page size {0} is not within 1..={PAGE_SIZE_MAX}")]
    PageSize(usize),
    #[error("{table}.{column} holds {value:?}, which is not valid")]
    Corrupt { table: &'static str, column: &'static str, value: String },
    #[error(transparent)]
    Fields(#[from] FieldsError),
    #[error(transparent)]
    Summary(#[from] SummaryError),
    #[error(transparent)]
    Change(#[from] ChangeError),
    /// The service could not be reached, or its answer was lost on the way back (the call may
    /// or may not have taken effect). A network fault: the run stops and the next one retries.
    #[error("the CRM service could not be reached or its answer was lost: {0}")]
    Unreachable(String),
    /// The service refused this record's write (a validation rule, a plug-in, a lock): an
    /// item-level failure, retried by the next run.
    #[error("the CRM service rejected the write of record {crm_id}: {reason}")]
    Rejected { crm_id: CrmId, reason: String },
    /// A conditional write found the record at another version than the one its merge
    /// started from: someone wrote in between, and nothing was written.
    #[error("record {crm_id} changed since {expected} (it is at {current}); nothing was written")]
    ChangedSince { crm_id: CrmId, expected: VersionNumber, current: VersionNumber },
}

/// A page of *get sync data*.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncPage {
    /// The changes, in (`VersionNumber`, `CrmId`) order.
    pub changes: Vec<Change>,
    /// The sequence number of the last change; acknowledge through it once the page is queued.
    pub last_seq: Option<u64>,
    /// Whether prepared changes remain after this page.
    pub more: bool,
    /// Bytes of field data handed out in this page.
    pub data_size: u64,
}

/// The edge the client talks through. `ServerStore` implements it; the simulator wraps it with
/// faults.
pub trait CrmService {
    /// Creates the user's subscription of `kind` on `machine`, its SyncEntry table and its
    /// SubscriptionClients row. A machine's first Outlook subscription of a user with no primary
    /// client becomes primary.
    fn register_client(
        &mut self,
        user: SystemUserId,
        machine: &str,
        kind: SubscriptionType,
    ) -> Result<SubscriptionId, ServerError>;
    /// Whether `subscription`'s machine is the user's primary client: only that one syncs.
    fn is_primary_client(&self, subscription: SubscriptionId) -> Result<bool, ServerError>;
    /// `None` for a secondary client; for the primary, its *term*: a number that changes each
    /// time a machine becomes primary. A client that finds a term it has not synced under knows
    /// another machine may have synced the mailbox meanwhile, and reconciles.
    fn primary_term(&self, subscription: SubscriptionId) -> Result<Option<u64>, ServerError>;
    /// Makes `subscription`'s machine the user's primary client (an explicit, logged act).
    fn set_primary_client(&mut self, subscription: SubscriptionId) -> Result<(), ServerError>;
    /// Removes the subscription, its client row and its SyncEntry table (desynchronise).
    fn unregister_client(&mut self, subscription: SubscriptionId) -> Result<(), ServerError>;
    fn prepare_sync(&mut self, subscription: SubscriptionId) -> Result<SyncSummary, ServerError>;
    /// The prepared changes after sequence number `after`, at most `page_size` of them.
    fn get_sync_data(
        &mut self,
        subscription: SubscriptionId,
        after: Option<u64>,
        page_size: usize,
    ) -> Result<SyncPage, ServerError>;
    /// The client holds every change through `through` durably.
    fn acknowledge(&mut self, subscription: SubscriptionId, through: u64) -> Result<(), ServerError>;
    /// Creates a record with the client-chosen id, owned by the subscription's user, and notes
    /// that this subscription's client holds it. A retry with the same values is a success
    /// (returns the record's version); a retry with other values updates the record if no one
    /// changed it since this client's create, else it is a `CreateConflict`. A meeting (same
    /// type and GOID) another user created under this id is joined instead: `MeetingJoined`.
    fn create_record(
        &mut self,
        subscription: SubscriptionId,
        crm_id: CrmId,
        object_type: ObjectTypeCode,
        record: &Record,
    ) -> Result<VersionNumber, ServerError>;
    /// One record as this subscription's client should hold it now, for an item stamped with
    /// it that the client found without the server having handed it out (a rebuilt cache, a
    /// relinked machine): a create with the record as it is when it is in the user's filter, a
    /// delete (`Deleted`, `LeftFilter`) when it is not; `None` if it never existed. The server
    /// notes the answer as held by the client, as an acknowledged page would.
    fn fetch_record(
        &mut self,
        subscription: SubscriptionId,
        crm_id: CrmId,
    ) -> Result<Option<Change>, ServerError>;
    /// Writes `patch` over the record. The answer says which version the patch was written
    /// over: a client that last knew another one learns that someone else wrote in between.
    fn update_record(&mut self, crm_id: CrmId, patch: &FieldPatch) -> Result<Updated, ServerError>;
    /// Writes `patch` over the record only if it is still at version `expected` (the version
    /// the client's merge started from). If someone wrote since and the patch would change
    /// anything, nothing is written and the answer is [`ServerError::ChangedSince`]: the
    /// client merges that change first instead of overwriting it. A patch that changes nothing
    /// succeeds whatever the version.
    fn update_record_if(
        &mut self,
        crm_id: CrmId,
        patch: &FieldPatch,
        expected: VersionNumber,
    ) -> Result<Updated, ServerError>;
    /// Deletes a record; deleting a deleted record is a success.
    fn delete_record(&mut self, crm_id: CrmId) -> Result<VersionNumber, ServerError>;
}

/// What [`CrmService::update_record`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Updated {
    /// The record's version now.
    pub version: VersionNumber,
    /// Its version just before the write (equal to `version` when nothing changed).
    pub previous: VersionNumber,
}

/// One record as the server holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    pub crm_id: CrmId,
    pub object_type: ObjectTypeCode,
    pub owner: SystemUserId,
    pub version: VersionNumber,
    pub fields: Fields,
    pub goid: Option<GlobalObjectId>,
    pub status: ActivityStatus,
    pub attendees: Vec<SystemUserId>,
}

impl ServerRecord {
    /// Whether the record is in `user`'s sync filter: owned, or a calendar item attended. The
    /// same rule as the SQL of [`ServerStore::records_in_filter`], for a reader holding copies.
    pub fn is_in_filter_of(&self, user: SystemUserId) -> bool {
        self.owner == user || (self.object_type.is_calendar() && self.attendees.contains(&user))
    }
}

/// The answer of [`ServerStore::changed_since`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedSince {
    /// Records written since, as they are now, in version order.
    pub written: Vec<ServerRecord>,
    /// Records deleted since, with the version of their delete, in version order.
    pub deleted: Vec<(CrmId, VersionNumber)>,
}

/// The server's database.
pub struct ServerStore {
    conn: Connection,
    clock: Box<dyn Clock>,
}

const SCHEMA: &str = "
CREATE TABLE SystemUser (SystemUserId TEXT PRIMARY KEY, FullName TEXT NOT NULL);
CREATE TABLE Counter (Name TEXT PRIMARY KEY, Value INTEGER NOT NULL);
INSERT INTO Counter VALUES ('VersionNumber', 0);
CREATE TABLE Record (
    ObjectId TEXT PRIMARY KEY,
    ObjectTypeCode INTEGER NOT NULL,
    OwnerId TEXT NOT NULL,
    VersionNumber INTEGER NOT NULL UNIQUE,
    Fields TEXT NOT NULL,
    GlobalObjectId TEXT,
    StateCode INTEGER NOT NULL
);
CREATE INDEX Record_Owner ON Record (OwnerId);
CREATE TABLE Attendee (ObjectId TEXT NOT NULL, SystemUserId TEXT NOT NULL, PRIMARY KEY (ObjectId, SystemUserId));
CREATE INDEX Attendee_User ON Attendee (SystemUserId);
CREATE TABLE Tombstone (ObjectId TEXT PRIMARY KEY, ObjectTypeCode INTEGER NOT NULL, VersionNumber INTEGER NOT NULL UNIQUE);
CREATE TABLE Subscription (
    SubscriptionId TEXT PRIMARY KEY,
    SystemUserId TEXT NOT NULL,
    MachineName TEXT NOT NULL,
    SubscriptionType INTEGER NOT NULL,
    SyncEntryTableName TEXT NOT NULL UNIQUE,
    LastSyncStartedOn TEXT,
    CompletedSyncStartedOn TEXT,
    CreatedOn TEXT NOT NULL,
    AckedVersion INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE SubscriptionClients (
    SubscriptionId TEXT NOT NULL,
    ClientId TEXT NOT NULL,
    IsPrimaryClient INTEGER NOT NULL,
    PRIMARY KEY (SubscriptionId, ClientId)
);
CREATE TABLE SubscriptionSyncInfo (
    SyncInfoId INTEGER PRIMARY KEY,
    SubscriptionId TEXT NOT NULL,
    StartTime TEXT NOT NULL,
    EndTime TEXT,
    DataSize INTEGER NOT NULL DEFAULT 0,
    InsertObjectCount INTEGER NOT NULL DEFAULT 0,
    UpdateObjectCount INTEGER NOT NULL DEFAULT 0,
    DeleteObjectCount INTEGER NOT NULL DEFAULT 0,
    ErrorCount INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE PreparedChange (
    SubscriptionId TEXT NOT NULL,
    Seq INTEGER NOT NULL,
    ObjectId TEXT NOT NULL,
    ObjectTypeCode INTEGER NOT NULL,
    VersionNumber INTEGER NOT NULL,
    Kind INTEGER NOT NULL,
    HandedOutKind INTEGER,
    PRIMARY KEY (SubscriptionId, Seq)
);
";

/// From version 1 to 2: a primary client's *term*, the `VersionNumber` counter when it became
/// primary, so a client can tell that another machine may have synced since its last run.
const MIGRATE_V1_TO_V2: &str = "
ALTER TABLE SubscriptionClients ADD COLUMN PrimaryTerm INTEGER NOT NULL DEFAULT 0;
UPDATE SubscriptionClients SET PrimaryTerm = 1 WHERE IsPrimaryClient = 1;
";

/// Makes the current schema in an empty database, in one transaction.
fn create_schema(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.execute_batch(&format!(
        "BEGIN; {SCHEMA} {MIGRATE_V1_TO_V2} PRAGMA application_id = {SERVER_APPLICATION_ID}; \
         PRAGMA user_version = {SERVER_SCHEMA_VERSION}; COMMIT;"
    ))
}

/// A record with its attendees, one row per record (ids are fixed-width GUIDs with no comma,
/// so the attendee list folds into one column). Callers add `WHERE` and `ORDER BY`.
const RECORD_SELECT: &str = "SELECT r.ObjectId, r.ObjectTypeCode, r.OwnerId, r.VersionNumber, r.Fields, \
     r.GlobalObjectId, r.StateCode, (SELECT group_concat(x.SystemUserId) FROM \
     (SELECT SystemUserId FROM Attendee WHERE ObjectId = r.ObjectId ORDER BY 1) x) FROM Record r";

/// One row of [`RECORD_SELECT`], read as stored and checked by [`RecordRow::decode`].
struct RecordRow {
    id: String,
    otc: i64,
    owner: String,
    version: i64,
    fields: String,
    goid: Option<String>,
    state: i64,
    attendees: Option<String>,
}

impl RecordRow {
    fn read(r: &rusqlite::Row<'_>) -> rusqlite::Result<RecordRow> {
        Ok(RecordRow {
            id: r.get(0)?,
            otc: r.get(1)?,
            owner: r.get(2)?,
            version: r.get(3)?,
            fields: r.get(4)?,
            goid: r.get(5)?,
            state: r.get(6)?,
            attendees: r.get(7)?,
        })
    }

    fn decode(self) -> Result<ServerRecord, ServerError> {
        let mut attendees = match self.attendees.as_deref() {
            Some(list) => {
                list.split(',').map(|u| parse_user("Attendee", u)).collect::<Result<Vec<_>, _>>()?
            }
            None => Vec::new(),
        };
        // group_concat does not promise the inner order: keep the attendees sorted regardless.
        attendees.sort_unstable();
        Ok(ServerRecord {
            crm_id: parse_crm_id("Record", &self.id)?,
            object_type: parse_otc("Record", self.otc)?,
            owner: parse_user("Record", &self.owner)?,
            version: version("Record", self.version)?,
            fields: serde_json::from_str(&self.fields)
                .map_err(|_| corrupt("Record", "Fields", &self.fields))?,
            goid: self
                .goid
                .map(|g| GlobalObjectId::from_hex(&g).map_err(|_| corrupt("Record", "GlobalObjectId", &g)))
                .transpose()?,
            status: status_from_code(self.state)?,
            attendees,
        })
    }
}

/// The entity codes of calendar items, for SQL (a macro, so `concat!` can splice it too).
macro_rules! calendar_codes {
    () => {
        "4201, 4214, 4251"
    };
}
/// The ids of the live records in the sync filter of user `?1`: owned, or calendar items
/// attended. A UNION, not an OR, so each half uses its index instead of scanning every record.
const FILTER_IDS: &str = concat!(
    "SELECT ObjectId FROM Record WHERE OwnerId = ?1 \
     UNION SELECT a.ObjectId FROM Attendee a JOIN Record c ON c.ObjectId = a.ObjectId \
     WHERE a.SystemUserId = ?1 AND c.ObjectTypeCode IN (",
    calendar_codes!(),
    ")"
);

/// In `ServerStore::diff`: whether row `x` (a record, or a tombstone with no owner) is in the
/// sync filter of user `?2`, as 1 or 0.
const WANTED: &str = concat!(
    "COALESCE(x.OwnerId = ?2 OR (x.ObjectTypeCode IN (",
    calendar_codes!(),
    ") AND EXISTS (SELECT 1 FROM Attendee a WHERE a.ObjectId = x.ObjectId AND a.SystemUserId = ?2)), 0)"
);

/// One prepared change joined with its record as it is now.
struct PreparedRow {
    seq: i64,
    object: String,
    otc: i64,
    prepared: i64,
    kind: i64,
    owner: Option<String>,
    version: Option<i64>,
    fields: Option<String>,
    goid: Option<String>,
    state: Option<i64>,
    attends: bool,
    deleted: bool,
}

fn status_from_code(code: i64) -> Result<ActivityStatus, ServerError> {
    match code {
        0 => Ok(ActivityStatus::Open),
        1 => Ok(ActivityStatus::Completed),
        2 => Ok(ActivityStatus::Cancelled),
        other => Err(corrupt("Record", "StateCode", other)),
    }
}

fn kind_code(kind: ChangeKind) -> i64 {
    match kind {
        ChangeKind::Create => 0,
        ChangeKind::Update => 1,
        ChangeKind::Delete => 2,
    }
}

fn status_code(status: ActivityStatus) -> i64 {
    match status {
        ActivityStatus::Open => 0,
        ActivityStatus::Completed => 1,
        ActivityStatus::Cancelled => 2,
    }
}

/// Removes a subscription: its `SubscriptionClients`, `PreparedChange` and `Subscription` rows and
/// its SyncEntry table, inside the caller's transaction. Its `SubscriptionSyncInfo` history stays.
/// The one place that knows every table keyed by `SubscriptionId` (unlink and cleanup both use it).
pub(crate) fn remove_subscription_rows(conn: &Connection, id: SubscriptionId) -> Result<(), rusqlite::Error> {
    let text = id.to_string();
    conn.prepare_cached("DELETE FROM SubscriptionClients WHERE SubscriptionId = ?1")?.execute([&text])?;
    conn.prepare_cached("DELETE FROM PreparedChange WHERE SubscriptionId = ?1")?.execute([&text])?;
    conn.prepare_cached("DELETE FROM Subscription WHERE SubscriptionId = ?1")?.execute([&text])?;
    // Spelled from the id: `SyncEntry_` and 32 hex digits, nothing else.
    conn.execute_batch(&format!("DROP TABLE IF EXISTS {}", id.sync_entry_table()))
}

fn corrupt(table: &'static str, column: &'static str, value: impl fmt::Display) -> ServerError {
    ServerError::Corrupt { table, column, value: value.to_string() }
}

fn parse_crm_id(table: &'static str, text: &str) -> Result<CrmId, ServerError> {
    text.parse().map_err(|_| corrupt(table, "ObjectId", text))
}

fn parse_user(table: &'static str, text: &str) -> Result<SystemUserId, ServerError> {
    text.parse().map_err(|_| corrupt(table, "SystemUserId", text))
}

fn parse_otc(table: &'static str, code: i64) -> Result<ObjectTypeCode, ServerError> {
    u32::try_from(code).map_err(|_| corrupt(table, "ObjectTypeCode", code)).and_then(|c| {
        ObjectTypeCode::try_from(c).map_err(|UnknownObjectTypeCode(n)| corrupt(table, "ObjectTypeCode", n))
    })
}

fn version(table: &'static str, v: i64) -> Result<VersionNumber, ServerError> {
    u64::try_from(v).map(VersionNumber).map_err(|_| corrupt(table, "VersionNumber", v))
}

impl ServerStore {
    /// Opens the store at `path`, creating it when the file does not exist or is empty.
    pub fn open(path: &Path, clock: Box<dyn Clock>) -> Result<ServerStore, OpenError> {
        Self::open_with(path, clock, true)
    }

    /// Opens an existing store; a missing path is an error and no file is created.
    pub fn open_existing(path: &Path, clock: Box<dyn Clock>) -> Result<ServerStore, OpenError> {
        Self::open_with(path, clock, false)
    }

    fn open_with(path: &Path, clock: Box<dyn Clock>, create: bool) -> Result<ServerStore, OpenError> {
        let sqlite = |source| OpenError::Sqlite { path: path.to_owned(), source };
        let fresh = create && std::fs::metadata(path).map(|m| m.len() == 0).unwrap_or(true);
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let conn = Connection::open_with_flags(path, flags).map_err(sqlite)?;
        if !fresh {
            // Read the header before anything writes to the file.
            let found: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0)).map_err(sqlite)?;
            if found != SERVER_APPLICATION_ID {
                return Err(OpenError::NotAServerStore { path: path.to_owned(), found });
            }
            let version: i32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sqlite)?;
            if version > SERVER_SCHEMA_VERSION {
                return Err(OpenError::NewerSchema { path: path.to_owned(), found: version });
            }
            if version < 1 {
                // Our id but no schema version: not a file this project wrote.
                return Err(OpenError::NotAServerStore { path: path.to_owned(), found });
            }
        }
        conn.pragma_update(None, "journal_mode", "WAL").map_err(sqlite)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(sqlite)?;
        crate::sqlite::keep_plans(&conn).map_err(sqlite)?;
        let store = ServerStore { conn, clock };
        if fresh {
            create_schema(&store.conn).map_err(sqlite)?;
        } else {
            let version: i32 =
                store.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sqlite)?;
            if version == 1 {
                store
                    .conn
                    .execute_batch(&format!(
                        "BEGIN IMMEDIATE; {MIGRATE_V1_TO_V2} PRAGMA user_version = {SERVER_SCHEMA_VERSION}; COMMIT;"
                    ))
                    .map_err(sqlite)?;
            }
        }
        Ok(store)
    }

    /// A store in memory (tests, the simulator).
    pub fn in_memory(clock: Box<dyn Clock>) -> Result<ServerStore, rusqlite::Error> {
        thread_local! {
            static TEMPLATE: RefCell<Option<Connection>> = const { RefCell::new(None) };
        }
        let conn = crate::sqlite::in_memory_from(&TEMPLATE, create_schema)?;
        crate::sqlite::keep_plans(&conn)?;
        Ok(ServerStore { conn, clock })
    }

    /// The current time as the store writes it (RFC 3339, UTC).
    pub(crate) fn now(&self) -> String {
        self.clock.now().to_rfc3339()
    }

    /// The database, for the support reports that read it (`reports`).
    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Takes the next version. Every caller is inside its transaction, which holds the write
    /// lock from the `UPDATE` on, so the `SELECT` reads the value this `UPDATE` wrote. (Two
    /// statements rather than `UPDATE ... RETURNING`, which fills a temporary table for its one
    /// row: every server write takes a version.)
    fn next_version(&self) -> Result<VersionNumber, ServerError> {
        debug_assert!(!self.conn.is_autocommit(), "a version is taken inside a transaction");
        self.conn
            .prepare_cached("UPDATE Counter SET Value = Value + 1 WHERE Name = 'VersionNumber'")?
            .execute([])?;
        let v: i64 = self
            .conn
            .prepare_cached("SELECT Value FROM Counter WHERE Name = 'VersionNumber'")?
            .query_row([], |r| r.get(0))?;
        version("Counter", v)
    }

    pub fn add_user(&mut self, user: SystemUserId, full_name: &str) -> Result<(), ServerError> {
        self.conn
            .prepare_cached(
                "INSERT INTO SystemUser VALUES (?1, ?2) \
                 ON CONFLICT (SystemUserId) DO UPDATE SET FullName = ?2",
            )?
            .execute(params![user.to_string(), full_name])?;
        Ok(())
    }

    fn check_user(&self, user: SystemUserId) -> Result<(), ServerError> {
        let found: Option<i64> = self
            .conn
            .prepare_cached("SELECT 1 FROM SystemUser WHERE SystemUserId = ?1")?
            .query_row([user.to_string()], |r| r.get(0))
            .optional()?;
        found.map(|_| ()).ok_or(ServerError::UnknownUser(user))
    }

    /// The record as it is now, or `None` if there is none (never created, or deleted).
    pub fn record(&self, crm_id: CrmId) -> Result<Option<ServerRecord>, ServerError> {
        let row = self
            .conn
            .prepare_cached(&format!("{RECORD_SELECT} WHERE r.ObjectId = ?1"))?
            .query_row([crm_id.to_string()], RecordRow::read)
            .optional()?;
        row.map(RecordRow::decode).transpose()
    }

    /// The ids of every live record, in order (checks, the simulator: one query).
    pub fn record_ids(&self) -> Result<std::collections::BTreeSet<CrmId>, ServerError> {
        let mut stmt = self.conn.prepare_cached("SELECT ObjectId FROM Record")?;
        let ids: Vec<String> = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        ids.iter().map(|id| parse_crm_id("Record", id)).collect()
    }

    /// The live records in `user`'s sync filter (owned, or appointments attended), in `CrmId`
    /// order: what a converged client of that user holds (checks, the simulator).
    pub fn records_in_filter(&self, user: SystemUserId) -> Result<Vec<ServerRecord>, ServerError> {
        // One query (checks run it after every simulated sync).
        let mut stmt = self.conn.prepare_cached(&format!(
            "{RECORD_SELECT} WHERE r.ObjectId IN ({FILTER_IDS}) ORDER BY r.ObjectId"
        ))?;
        let rows = stmt.query_map([user.to_string()], RecordRow::read)?;
        rows.map(|row| row?.decode()).collect()
    }

    /// What the server wrote after version `since`: the records written since, as they are now,
    /// and the records deleted since, as `(CrmId, version of the delete)`, each in version order.
    /// Every write and every delete takes a new, never reused version, so a reader that keeps
    /// the newest version it saw keeps a copy of every record current by reading only the
    /// difference (the simulator's checks, after every run).
    pub fn changed_since(&self, since: VersionNumber) -> Result<ChangedSince, ServerError> {
        let since = since.0 as i64;
        let written = {
            let mut stmt = self.conn.prepare_cached(&format!(
                "{RECORD_SELECT} WHERE r.VersionNumber > ?1 ORDER BY r.VersionNumber"
            ))?;
            let rows = stmt.query_map([since], RecordRow::read)?;
            rows.map(|row| row?.decode()).collect::<Result<Vec<_>, _>>()?
        };
        let mut stmt = self.conn.prepare_cached(
            "SELECT ObjectId, VersionNumber FROM Tombstone WHERE VersionNumber > ?1 ORDER BY VersionNumber",
        )?;
        let rows = stmt.query_map([since], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let deleted = rows
            .map(|row| {
                let (id, v) = row?;
                Ok((parse_crm_id("Tombstone", &id)?, version("Tombstone", v)?))
            })
            .collect::<Result<Vec<_>, ServerError>>()?;
        Ok(ChangedSince { written, deleted })
    }

    /// Every record, in `CrmId` order (checks and reports).
    pub fn all_records(&self) -> Result<Vec<ServerRecord>, ServerError> {
        let ids: Vec<String> = {
            let mut stmt = self.conn.prepare("SELECT ObjectId FROM Record ORDER BY ObjectId")?;
            stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(record) = self.record(parse_crm_id("Record", &id)?)? {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn is_tombstoned(&self, crm_id: CrmId) -> Result<bool, ServerError> {
        let found: Option<i64> = self
            .conn
            .prepare_cached("SELECT 1 FROM Tombstone WHERE ObjectId = ?1")?
            .query_row([crm_id.to_string()], |r| r.get(0))
            .optional()?;
        Ok(found.is_some())
    }

    fn existing(&self, crm_id: CrmId) -> Result<ServerRecord, ServerError> {
        if self.is_tombstoned(crm_id)? {
            return Err(ServerError::RecordDeleted(crm_id));
        }
        self.record(crm_id)?.ok_or(ServerError::UnknownRecord(crm_id))
    }

    /// Stamps a record with the next version and writes its row.
    fn write(&self, r: &ServerRecord) -> Result<VersionNumber, ServerError> {
        let v = self.next_version()?;
        let fields = serde_json::to_string(&r.fields).map_err(|e| corrupt("Record", "Fields", e))?;
        self.conn.prepare_cached("INSERT INTO Record VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (ObjectId) DO UPDATE SET \
             ObjectTypeCode = ?2, OwnerId = ?3, VersionNumber = ?4, Fields = ?5, GlobalObjectId = ?6, StateCode = ?7")?.execute(params![
                r.crm_id.to_string(),
                r.object_type.code(),
                r.owner.to_string(),
                v.0 as i64,
                fields,
                r.goid.as_ref().map(|g| g.to_hex()),
                status_code(r.status),
            ],
        )?;
        self.conn
            .prepare_cached("DELETE FROM Attendee WHERE ObjectId = ?1")?
            .execute([r.crm_id.to_string()])?;
        for user in &r.attendees {
            self.conn
                .prepare_cached("INSERT OR IGNORE INTO Attendee VALUES (?1, ?2)")?
                .execute(params![r.crm_id.to_string(), user.to_string()])?;
        }
        Ok(v)
    }

    /// Creates or replaces a record as a server-side edit (an actor editing in CRM).
    pub fn put_record(&mut self, record: &ServerRecord) -> Result<VersionNumber, ServerError> {
        self.check_user(record.owner)?;
        if self.is_tombstoned(record.crm_id)? {
            return Err(ServerError::RecordDeleted(record.crm_id));
        }
        let tx = self.conn.unchecked_transaction()?;
        let v = self.write(record)?;
        tx.commit()?;
        Ok(v)
    }

    /// Creates or replaces many records in one transaction (a bulk import, the demo, benches).
    pub fn put_records(&mut self, records: &[ServerRecord]) -> Result<(), ServerError> {
        let tx = self.conn.unchecked_transaction()?;
        for record in records {
            if self.is_tombstoned(record.crm_id)? {
                return Err(ServerError::RecordDeleted(record.crm_id));
            }
            self.write(record)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Writes `patch` over the record; with `expected`, only over that version.
    fn write_patch(
        &mut self,
        crm_id: CrmId,
        patch: &FieldPatch,
        expected: Option<VersionNumber>,
    ) -> Result<Updated, ServerError> {
        let record = self.existing(crm_id)?;
        let previous = record.version;
        let fields = patch.apply(&record.fields)?;
        if fields == record.fields {
            return Ok(Updated { version: previous, previous });
        }
        if let Some(expected) = expected.filter(|&v| v != previous) {
            return Err(ServerError::ChangedSince { crm_id, expected, current: previous });
        }
        let version = self.put_record(&ServerRecord { fields, ..record })?;
        Ok(Updated { version, previous })
    }

    /// Gives a record to another owner (it leaves the old owner's filter).
    pub fn change_owner(&mut self, crm_id: CrmId, owner: SystemUserId) -> Result<VersionNumber, ServerError> {
        self.check_user(owner)?;
        let record = ServerRecord { owner, ..self.existing(crm_id)? };
        self.put_record(&record)
    }

    /// Sets an appointment's attendees (those removed leave its filter).
    pub fn set_attendees(
        &mut self,
        crm_id: CrmId,
        attendees: Vec<SystemUserId>,
    ) -> Result<VersionNumber, ServerError> {
        let record = ServerRecord { attendees, ..self.existing(crm_id)? };
        self.put_record(&record)
    }

    fn subscription(
        &self,
        id: SubscriptionId,
    ) -> Result<(SystemUserId, SubscriptionType, String, u64), ServerError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT SystemUserId, SubscriptionType, SyncEntryTableName, AckedVersion FROM Subscription \
                 WHERE SubscriptionId = ?1",
            )?
            .query_row([id.to_string()], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?))
            })
            .optional()?
            .ok_or(ServerError::UnknownSubscription(id))?;
        let kind = SubscriptionType::from_code(row.1)
            .ok_or_else(|| corrupt("Subscription", "SubscriptionType", row.1))?;
        if row.2 != id.sync_entry_table() {
            return Err(corrupt("Subscription", "SyncEntryTableName", &row.2));
        }
        Ok((parse_user("Subscription", &row.0)?, kind, row.2, version("Subscription", row.3)?.0))
    }

    /// Notes in a subscription's SyncEntry table that its client holds `crm_id` at `version`.
    fn mark_held(
        &self,
        table: &str,
        crm_id: CrmId,
        object_type: ObjectTypeCode,
        version: VersionNumber,
    ) -> Result<(), ServerError> {
        self.conn
            .prepare_cached(&format!(
                "INSERT INTO {table} VALUES (?1, ?2, ?3, 0) ON CONFLICT (ObjectId) DO UPDATE SET \
                 VersionNumber = ?3, State = 0"
            ))?
            .execute(params![crm_id.to_string(), object_type.code(), version.0 as i64])?;
        Ok(())
    }

    /// Notes that a subscription's client no longer holds `crm_id`.
    fn forget_held(&self, table: &str, crm_id: CrmId) -> Result<(), ServerError> {
        self.conn
            .prepare_cached(&format!("DELETE FROM {table} WHERE ObjectId = ?1"))?
            .execute([crm_id.to_string()])?;
        Ok(())
    }

    fn term(&self, id: SubscriptionId) -> Result<Option<u64>, ServerError> {
        let row: Option<(i64, i64)> = self
            .conn
            .prepare_cached(
                "SELECT IsPrimaryClient, PrimaryTerm FROM SubscriptionClients WHERE SubscriptionId = ?1",
            )?
            .query_row([id.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(match row {
            Some((1, term)) => {
                Some(u64::try_from(term).map_err(|_| corrupt("SubscriptionClients", "PrimaryTerm", term))?)
            }
            _ => None,
        })
    }

    fn is_primary(&self, id: SubscriptionId) -> Result<bool, ServerError> {
        let primary: Option<i64> = self
            .conn
            .prepare_cached("SELECT IsPrimaryClient FROM SubscriptionClients WHERE SubscriptionId = ?1")?
            .query_row([id.to_string()], |r| r.get(0))
            .optional()?;
        Ok(primary == Some(1))
    }

    /// The changes prepare sync would hand out to `user` above `acked`, in order.
    fn diff(
        &self,
        user: SystemUserId,
        table: &str,
        acked: u64,
    ) -> Result<Vec<(String, ObjectTypeCode, u64, ChangeKind)>, ServerError> {
        // One pass over what changed above the watermark, with whether the record is in the
        // user's filter and the state of its SyncEntry row. Rows neither wanted nor held (mostly
        // other users' records) are left out in SQL, before the sort: the loop below would skip
        // them anyway.
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT x.ObjectId, x.ObjectTypeCode, x.VersionNumber, {WANTED}, s.State \
             FROM (SELECT ObjectId, ObjectTypeCode, VersionNumber, OwnerId FROM Record WHERE VersionNumber > ?1 \
                   UNION ALL \
                   SELECT ObjectId, ObjectTypeCode, VersionNumber, NULL FROM Tombstone WHERE VersionNumber > ?1) x \
             LEFT JOIN {table} s ON s.ObjectId = x.ObjectId \
             WHERE s.State IN (0, 1) OR {WANTED} \
             ORDER BY x.VersionNumber, x.ObjectId"
        ))?;
        let rows = stmt.query_map(params![acked as i64, user.to_string()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, bool>(3)?,
                r.get::<_, Option<i64>>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, otc, v, wanted, state) = row?;
            // State 0: the client holds it. State 1: handed out and never acknowledged, so the
            // client may hold it (a delete must reach it) or not (it is still a create).
            let kind = match (wanted, state) {
                (true, Some(0)) => ChangeKind::Update,
                (true, _) => ChangeKind::Create,
                (false, Some(0 | 1)) => ChangeKind::Delete,
                (false, _) => continue,
            };
            out.push((id, parse_otc("Record", otc)?, version("Record", v)?.0, kind));
        }
        Ok(out)
    }
}

impl CrmService for ServerStore {
    fn register_client(
        &mut self,
        user: SystemUserId,
        machine: &str,
        kind: SubscriptionType,
    ) -> Result<SubscriptionId, ServerError> {
        if machine.is_empty() || machine.len() > MACHINE_NAME_LEN_MAX {
            return Err(ServerError::BadMachineName(machine.chars().take(MACHINE_NAME_LEN_MAX).collect()));
        }
        self.check_user(user)?;
        // The subscription id is derived from the next version, so ids are deterministic under a
        // deterministic clock and never repeat.
        let tx = self.conn.unchecked_transaction()?;
        let seed = self.next_version()?;
        let id =
            SubscriptionId(Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("subscription/{}", seed.0).as_bytes()));
        let table = id.sync_entry_table();
        self.conn.prepare_cached("INSERT INTO Subscription (SubscriptionId, SystemUserId, MachineName, SubscriptionType, SyncEntryTableName, \
             CreatedOn) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?.execute(params![id.to_string(), user.to_string(), machine, kind.code(), table, self.now()],
        )?;
        self.conn.execute_batch(&format!(
            "CREATE TABLE {table} (ObjectId TEXT PRIMARY KEY, ObjectTypeCode INTEGER NOT NULL, \
             VersionNumber INTEGER NOT NULL, State INTEGER NOT NULL)"
        ))?;
        let has_primary: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT 1 FROM SubscriptionClients c JOIN Subscription s USING (SubscriptionId) \
                 WHERE s.SystemUserId = ?1 AND s.SubscriptionType = ?2 AND c.IsPrimaryClient = 1",
            )?
            .query_row(params![user.to_string(), kind.code()], |r| r.get(0))
            .optional()?;
        let primary = has_primary.is_none();
        self.conn
            .prepare_cached(
                "INSERT INTO SubscriptionClients (SubscriptionId, ClientId, IsPrimaryClient, PrimaryTerm) \
             VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                id.to_string(),
                machine,
                i64::from(primary),
                if primary { seed.0 as i64 } else { 0 }
            ])?;
        tx.commit()?;
        Ok(id)
    }

    fn is_primary_client(&self, subscription: SubscriptionId) -> Result<bool, ServerError> {
        self.subscription(subscription)?;
        self.is_primary(subscription)
    }

    fn primary_term(&self, subscription: SubscriptionId) -> Result<Option<u64>, ServerError> {
        self.subscription(subscription)?;
        self.term(subscription)
    }

    fn set_primary_client(&mut self, subscription: SubscriptionId) -> Result<(), ServerError> {
        let (user, kind, _, _) = self.subscription(subscription)?;
        let tx = self.conn.unchecked_transaction()?;
        let term = self.next_version()?;
        self.conn
            .prepare_cached(
                "UPDATE SubscriptionClients SET IsPrimaryClient = (SubscriptionId = ?1), \
             PrimaryTerm = CASE WHEN SubscriptionId = ?1 THEN ?4 ELSE 0 END WHERE SubscriptionId IN \
             (SELECT SubscriptionId FROM Subscription WHERE SystemUserId = ?2 AND SubscriptionType = ?3)",
            )?
            .execute(params![subscription.to_string(), user.to_string(), kind.code(), term.0 as i64])?;
        tx.commit()?;
        Ok(())
    }

    fn unregister_client(&mut self, subscription: SubscriptionId) -> Result<(), ServerError> {
        self.subscription(subscription)?;
        let tx = self.conn.unchecked_transaction()?;
        remove_subscription_rows(&tx, subscription)?;
        tx.commit()?;
        Ok(())
    }

    fn prepare_sync(&mut self, subscription: SubscriptionId) -> Result<SyncSummary, ServerError> {
        let (user, kind, table, acked) = self.subscription(subscription)?;
        if kind == SubscriptionType::AddressBookProvider {
            return Err(ServerError::NotSynchronised { subscription, kind });
        }
        let id = subscription.to_string();
        let now = self.now();
        let tx = self.conn.unchecked_transaction()?;
        self.conn.prepare_cached("DELETE FROM PreparedChange WHERE SubscriptionId = ?1")?.execute([&id])?;
        let mut summary = SyncSummary::new();
        // A secondary client reads: nothing to do.
        if self.is_primary(subscription)? {
            let changes = self.diff(user, &table, acked)?;
            let mut insert =
                self.conn.prepare_cached("INSERT INTO PreparedChange VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")?;
            for (seq, (object, otc, v, kind)) in changes.iter().enumerate() {
                insert.execute(params![
                    &id,
                    seq as i64 + 1,
                    object,
                    otc.code(),
                    *v as i64,
                    kind_code(*kind),
                    None::<i64>
                ])?;
                summary.add(*otc, *kind, 1)?;
            }
        }
        let total = summary.total();
        self.conn
            .prepare_cached("UPDATE Subscription SET LastSyncStartedOn = ?2 WHERE SubscriptionId = ?1")?
            .execute(params![&id, &now])?;
        self.conn.prepare_cached("INSERT INTO SubscriptionSyncInfo (SubscriptionId, StartTime, InsertObjectCount, UpdateObjectCount, \
             DeleteObjectCount) VALUES (?1, ?2, ?3, ?4, ?5)")?.execute(params![&id, &now, total.create, total.update, total.delete],
        )?;
        tx.commit()?;
        Ok(summary)
    }

    fn get_sync_data(
        &mut self,
        subscription: SubscriptionId,
        after: Option<u64>,
        page_size: usize,
    ) -> Result<SyncPage, ServerError> {
        if page_size == 0 || page_size > PAGE_SIZE_MAX {
            return Err(ServerError::PageSize(page_size));
        }
        let (user, _, table, _) = self.subscription(subscription)?;
        let id = subscription.to_string();
        let who = user.to_string();
        let rows: Vec<PreparedRow> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT p.Seq, p.ObjectId, p.ObjectTypeCode, p.VersionNumber, p.Kind, \
                        r.OwnerId, r.VersionNumber, r.Fields, r.GlobalObjectId, r.StateCode, \
                        EXISTS (SELECT 1 FROM Attendee a WHERE a.ObjectId = p.ObjectId AND a.SystemUserId = ?4), \
                        EXISTS (SELECT 1 FROM Tombstone t WHERE t.ObjectId = p.ObjectId) \
                 FROM PreparedChange p LEFT JOIN Record r ON r.ObjectId = p.ObjectId \
                 WHERE p.SubscriptionId = ?1 AND p.Seq > ?2 ORDER BY p.Seq LIMIT ?3",
            )?;
            stmt.query_map(params![&id, after.unwrap_or(0) as i64, page_size as i64 + 1, &who], |r| {
                Ok(PreparedRow {
                    seq: r.get(0)?,
                    object: r.get(1)?,
                    otc: r.get(2)?,
                    prepared: r.get(3)?,
                    kind: r.get(4)?,
                    owner: r.get(5)?,
                    version: r.get(6)?,
                    fields: r.get(7)?,
                    goid: r.get(8)?,
                    state: r.get(9)?,
                    attends: r.get(10)?,
                    deleted: r.get(11)?,
                })
            })?
            .collect::<Result<_, _>>()?
        };
        let more = rows.len() > page_size;
        let tx = self.conn.unchecked_transaction()?;
        let mut page = SyncPage { changes: Vec::new(), last_seq: None, more, data_size: 0 };
        let mut hold = self.conn.prepare_cached(&format!(
            "INSERT INTO {table} VALUES (?1, ?2, ?3, 1) ON CONFLICT (ObjectId) DO UPDATE SET \
             VersionNumber = ?3, State = CASE WHEN State = 2 THEN 1 ELSE State END"
        ))?;
        let mut handed = self.conn.prepare_cached(
            "UPDATE PreparedChange SET HandedOutKind = ?3 WHERE SubscriptionId = ?1 AND Seq = ?2",
        )?;
        for row in rows.into_iter().take(page_size) {
            let crm_id = parse_crm_id("PreparedChange", &row.object)?;
            let otc = parse_otc("PreparedChange", row.otc)?;
            // Hand out the record as it is now: newer than prepared is better, and a record
            // deleted or gone out of the filter since is a delete.
            let owned = row.owner.as_deref() == Some(who.as_str());
            let in_filter = row.owner.is_some() && (owned || (otc.is_calendar() && row.attends));
            let (op, v) = if in_filter {
                let (Some(fields), Some(v), Some(state)) = (&row.fields, row.version, row.state) else {
                    return Err(corrupt("Record", "Fields", &row.object));
                };
                let fields: Fields =
                    serde_json::from_str(fields).map_err(|_| corrupt("Record", "Fields", fields))?;
                let goid = row
                    .goid
                    .as_deref()
                    .map(|g| GlobalObjectId::from_hex(g).map_err(|_| corrupt("Record", "GlobalObjectId", g)))
                    .transpose()?;
                page.data_size += fields.data_size() as u64;
                let role = if owned {
                    Role::Owner
                } else if row.attends {
                    Role::Attendee
                } else {
                    Role::Other
                };
                let body = Record { fields, goid, role, status: status_from_code(state)?, crm_id: None };
                let op = if row.kind == kind_code(ChangeKind::Create) {
                    ChangeOp::Create(body)
                } else {
                    ChangeOp::Update(body)
                };
                (op, version("Record", v)?)
            } else {
                let why = if row.deleted { DeleteReason::Deleted } else { DeleteReason::LeftFilter };
                (ChangeOp::Delete(why), version("PreparedChange", row.prepared)?)
            };
            hold.execute(params![&row.object, otc.code(), v.0 as i64])?;
            handed.execute(params![&id, row.seq, kind_code(op.kind())])?;
            page.changes.push(Change::crm(crm_id, otc, v, op)?);
            page.last_seq = Some(row.seq as u64);
        }
        drop((hold, handed));
        self.conn
            .prepare_cached(
                "UPDATE SubscriptionSyncInfo SET DataSize = DataSize + ?2 WHERE SyncInfoId = \
             (SELECT MAX(SyncInfoId) FROM SubscriptionSyncInfo WHERE SubscriptionId = ?1)",
            )?
            .execute(params![&id, page.data_size as i64])?;
        tx.commit()?;
        Ok(page)
    }

    fn acknowledge(&mut self, subscription: SubscriptionId, through: u64) -> Result<(), ServerError> {
        let (_, _, table, acked) = self.subscription(subscription)?;
        let id = subscription.to_string();
        let now = self.now();
        let tx = self.conn.unchecked_transaction()?;
        // Only what was handed out can be acknowledged: stop at the first row never handed out.
        let rows: Vec<(i64, String, i64, Option<i64>)> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT Seq, ObjectId, VersionNumber, HandedOutKind FROM PreparedChange \
                 WHERE SubscriptionId = ?1 AND Seq <= ?2 ORDER BY Seq",
            )?;
            stmt.query_map(params![&id, through as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<Result<_, _>>()?
        };
        let mut watermark = acked;
        let mut through = 0;
        for (seq, object, v, handed_out) in &rows {
            let Some(handed_out) = handed_out else { break };
            // A delete handed out is held no more (2); anything else is held (0).
            let state = if *handed_out == kind_code(ChangeKind::Delete) { 2 } else { 0 };
            self.conn
                .prepare_cached(&format!("UPDATE {table} SET State = ?2 WHERE ObjectId = ?1"))?
                .execute(params![object, state])?;
            watermark = watermark.max(version("PreparedChange", *v)?.0);
            through = *seq;
        }
        self.conn
            .prepare_cached("DELETE FROM PreparedChange WHERE SubscriptionId = ?1 AND Seq <= ?2")?
            .execute(params![&id, through])?;
        let remaining: i64 = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM PreparedChange WHERE SubscriptionId = ?1")?
            .query_row([&id], |r| r.get(0))?;
        self.conn
            .prepare_cached("UPDATE Subscription SET AckedVersion = ?2 WHERE SubscriptionId = ?1")?
            .execute(params![&id, watermark as i64])?;
        if remaining == 0 {
            self.conn
                .prepare_cached(
                    "UPDATE Subscription SET CompletedSyncStartedOn = LastSyncStartedOn \
                     WHERE SubscriptionId = ?1",
                )?
                .execute([&id])?;
            self.conn
                .prepare_cached(
                    "UPDATE SubscriptionSyncInfo SET EndTime = ?2 WHERE SyncInfoId = \
                 (SELECT MAX(SyncInfoId) FROM SubscriptionSyncInfo WHERE SubscriptionId = ?1)",
                )?
                .execute(params![&id, &now])?;
        }
        tx.commit()?;
        Ok(())
    }

    fn create_record(
        &mut self,
        subscription: SubscriptionId,
        crm_id: CrmId,
        object_type: ObjectTypeCode,
        record: &Record,
    ) -> Result<VersionNumber, ServerError> {
        let (user, _, table, _) = self.subscription(subscription)?;
        if self.is_tombstoned(crm_id)? {
            return Err(ServerError::RecordDeleted(crm_id));
        }
        let tx = self.conn.unchecked_transaction()?;
        let version = match self.record(crm_id)? {
            Some(existing) => {
                let same_record = existing.object_type == object_type && existing.goid == record.goid;
                let held: Option<i64> = self
                    .conn
                    .prepare_cached(&format!("SELECT VersionNumber FROM {table} WHERE ObjectId = ?1"))?
                    .query_row([crm_id.to_string()], |r| r.get(0))
                    .optional()?;
                // Untouched since this client's own create: a retry carrying the item's newer
                // values (the user edited it while the answer was lost) is that client's update.
                let untouched = held == Some(existing.version.0 as i64);
                let another_attendee = same_record
                    && object_type.is_calendar()
                    && existing.goid.is_some()
                    && existing.owner != user
                    && held.is_none();
                if same_record && existing.fields == record.fields && !another_attendee {
                    existing.version
                } else if same_record && untouched {
                    self.write(&ServerRecord { fields: record.fields.clone(), ..existing })?
                } else if another_attendee {
                    // Nothing of this client's values is written: its edit is merged into the
                    // meeting as it is (the client queues it and merges on its next run).
                    let version = if existing.attendees.contains(&user) {
                        existing.version
                    } else {
                        let mut attendees = existing.attendees.clone();
                        attendees.push(user);
                        self.write(&ServerRecord { attendees, ..existing })?
                    };
                    tx.commit()?;
                    return Err(ServerError::MeetingJoined { crm_id, version });
                } else {
                    return Err(ServerError::CreateConflict { crm_id });
                }
            }
            None => {
                self.check_user(user)?;
                self.write(&ServerRecord {
                    crm_id,
                    object_type,
                    owner: user,
                    version: VersionNumber(0),
                    fields: record.fields.clone(),
                    goid: record.goid.clone(),
                    status: record.status,
                    attendees: Vec::new(),
                })?
            }
        };
        // The creating client holds the record: without this row, a delete before its next
        // prepare would never be handed out to it.
        self.mark_held(&table, crm_id, object_type, version)?;
        tx.commit()?;
        Ok(version)
    }

    fn fetch_record(
        &mut self,
        subscription: SubscriptionId,
        crm_id: CrmId,
    ) -> Result<Option<Change>, ServerError> {
        let (user, _, table, _) = self.subscription(subscription)?;
        let tx = self.conn.unchecked_transaction()?;
        let change = match self.record(crm_id)? {
            Some(record) => {
                let role = if record.owner == user {
                    Role::Owner
                } else if record.object_type.is_calendar() && record.attendees.contains(&user) {
                    Role::Attendee
                } else {
                    Role::Other
                };
                if role == Role::Other {
                    self.forget_held(&table, crm_id)?;
                    let op = ChangeOp::Delete(DeleteReason::LeftFilter);
                    Some(Change::crm(crm_id, record.object_type, record.version, op)?)
                } else {
                    self.mark_held(&table, crm_id, record.object_type, record.version)?;
                    let body = Record {
                        fields: record.fields,
                        goid: record.goid,
                        role,
                        status: record.status,
                        crm_id: None,
                    };
                    Some(Change::crm(crm_id, record.object_type, record.version, ChangeOp::Create(body))?)
                }
            }
            None => {
                let tomb: Option<(i64, i64)> = self
                    .conn
                    .prepare_cached(
                        "SELECT ObjectTypeCode, VersionNumber FROM Tombstone WHERE ObjectId = ?1",
                    )?
                    .query_row([crm_id.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                self.forget_held(&table, crm_id)?;
                match tomb {
                    Some((otc, v)) => Some(Change::crm(
                        crm_id,
                        parse_otc("Tombstone", otc)?,
                        version("Tombstone", v)?,
                        ChangeOp::Delete(DeleteReason::Deleted),
                    )?),
                    None => None,
                }
            }
        };
        tx.commit()?;
        Ok(change)
    }

    fn update_record(&mut self, crm_id: CrmId, patch: &FieldPatch) -> Result<Updated, ServerError> {
        self.write_patch(crm_id, patch, None)
    }

    fn update_record_if(
        &mut self,
        crm_id: CrmId,
        patch: &FieldPatch,
        expected: VersionNumber,
    ) -> Result<Updated, ServerError> {
        self.write_patch(crm_id, patch, Some(expected))
    }

    fn delete_record(&mut self, crm_id: CrmId) -> Result<VersionNumber, ServerError> {
        if let Some(v) = self
            .conn
            .prepare_cached("SELECT VersionNumber FROM Tombstone WHERE ObjectId = ?1")?
            .query_row([crm_id.to_string()], |r| r.get::<_, i64>(0))
            .optional()?
        {
            return version("Tombstone", v);
        }
        let record = self.record(crm_id)?.ok_or(ServerError::UnknownRecord(crm_id))?;
        let tx = self.conn.unchecked_transaction()?;
        let v = self.next_version()?;
        let id = crm_id.to_string();
        self.conn.prepare_cached("DELETE FROM Record WHERE ObjectId = ?1")?.execute([&id])?;
        self.conn.prepare_cached("DELETE FROM Attendee WHERE ObjectId = ?1")?.execute([&id])?;
        self.conn.prepare_cached("INSERT INTO Tombstone VALUES (?1, ?2, ?3)")?.execute(params![
            &id,
            record.object_type.code(),
            v.0 as i64
        ])?;
        tx.commit()?;
        Ok(v)
    }
}

impl fmt::Debug for ServerStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerStore").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_codes_for_sql_are_the_calendar_entities() {
        let listed: Vec<u32> = calendar_codes!().split(", ").map(|c| c.parse().unwrap()).collect();
        let calendar: Vec<u32> =
            ObjectTypeCode::ALL.iter().filter(|o| o.is_calendar()).map(|o| o.code()).collect();
        assert_eq!(listed, calendar);
    }
}
