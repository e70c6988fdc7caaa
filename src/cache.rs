//! The client's durable state, the `OutlookSyncCache`, as one SQLite file (DOMAIN section 3):
//! `OutlookSyncTable` (the queue, with attempts and last error), `IdMappingTable` (with the base
//! fields both sides last agreed on), `IgnoredErrors`, and `SyncMeta` (cursors and the
//! subscription). It mirrors the pure `SyncState`: `load` reads one, and every durable step
//! writes exactly the rows a step of the pure core changed.
//!
//! The file carries `PRAGMA application_id` "CRMC" and `user_version` [`CACHE_SCHEMA_VERSION`].
//! Version 1 (no GOID, role, status or CRM version in the mapping, no `IgnoredErrors`, no
//! `SyncMeta`) is migrated in place in one transaction. A file that is not a cache, is corrupt,
//! or is of a newer version is refused with a typed error naming the file, before anything is
//! written to it.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::change::{ActivityStatus, Change, ChangeKind, Role, Side};
use crate::entity::ObjectTypeCode;
use crate::ids::{CrmId, EntryId};
use crate::mapping::{MappingEntry, MappingError};
use crate::plan::{Action, LinkChange};
use crate::queue::{QueueEntry, QueueError, QueueId};
use crate::settle::{IgnoredError, SyncState};

/// `PRAGMA application_id` of a sync cache ("CRMC").
pub const CACHE_APPLICATION_ID: i32 = 0x4352_4D43;
/// The schema version this build writes (`PRAGMA user_version`).
pub const CACHE_SCHEMA_VERSION: i32 = 2;

/// Why a cache file could not be opened. The file is left as it was.
#[derive(Debug, thiserror::Error)]
pub enum CacheOpenError {
    #[error("{path}: not an OutlookSyncCache (application_id {found:#x})")]
    NotACache { path: PathBuf, found: i32 },
    #[error("{path}: cache schema version {found} is newer than the {CACHE_SCHEMA_VERSION} this build reads")]
    NewerSchema { path: PathBuf, found: i32 },
    #[error("{path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
}

/// Why reading or writing the cache failed. Every variant carries the offending value.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("{table}.{column} holds {value:?}, which is not valid")]
    Corrupt { table: &'static str, column: &'static str, value: String },
    #[error("the queue in the cache is inconsistent: {0}")]
    Queue(#[from] QueueError),
    #[error("the mapping in the cache is inconsistent: {0}")]
    Mapping(#[from] MappingError),
}

fn corrupt(table: &'static str, column: &'static str, value: impl ToString) -> CacheError {
    CacheError::Corrupt { table, column, value: value.to_string() }
}

const SCHEMA_V1: &str = "
CREATE TABLE OutlookSyncTable (
    Id INTEGER PRIMARY KEY AUTOINCREMENT,
    Side TEXT NOT NULL,
    Kind TEXT NOT NULL,
    RecordKey TEXT NOT NULL,
    ObjectTypeCode INTEGER NOT NULL,
    Change TEXT NOT NULL,
    Attempts INTEGER NOT NULL DEFAULT 0,
    LastError TEXT
);
CREATE TABLE IdMappingTable (
    CrmId TEXT PRIMARY KEY,
    EntryId TEXT NOT NULL UNIQUE,
    ObjectTypeCode INTEGER NOT NULL,
    Base TEXT NOT NULL
);
";

/// From version 1 to 2: the mapping learns GOID, role, status and CRM version; ignored errors
/// and sync metadata get their tables.
const MIGRATE_V1_TO_V2: &str = "
ALTER TABLE IdMappingTable ADD COLUMN Goid TEXT;
ALTER TABLE IdMappingTable ADD COLUMN Role TEXT NOT NULL DEFAULT '\"Owner\"';
ALTER TABLE IdMappingTable ADD COLUMN Status TEXT NOT NULL DEFAULT '\"Open\"';
ALTER TABLE IdMappingTable ADD COLUMN CrmVersion INTEGER;
CREATE UNIQUE INDEX IdMappingTable_Goid ON IdMappingTable (Goid);
CREATE TABLE IgnoredErrors (
    Id INTEGER PRIMARY KEY,
    Change TEXT NOT NULL,
    Attempts INTEGER NOT NULL,
    LastError TEXT,
    Error TEXT NOT NULL
);
CREATE TABLE SyncMeta (Key TEXT PRIMARY KEY, Value TEXT NOT NULL);
";

/// Makes the current schema in an empty database, in one transaction.
fn create_schema(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.execute_batch(&format!(
        "BEGIN; {SCHEMA_V1} {MIGRATE_V1_TO_V2} PRAGMA application_id = {CACHE_APPLICATION_ID}; \
         PRAGMA user_version = {CACHE_SCHEMA_VERSION}; COMMIT;"
    ))
}

/// The `OutlookSyncCache` file.
pub struct SyncCache {
    conn: Connection,
    /// Whether a group of durable steps is open (see [`SyncCache::begin`]).
    in_group: bool,
    /// Whether [`SyncCache::load`] may answer from `last_load` (see [`SyncCache::reuse_loads`]).
    reuse_loads: bool,
    /// What the last committed-state load read (or a finished run left, see
    /// [`SyncCache::remember`]), with SQLite's `data_version` at the time and whether it was
    /// read from the file. Emptied by every method that writes (they all take `&mut self` and
    /// go through [`SyncCache::writer`]), so it can only be stale if another connection wrote
    /// the file, which `data_version` reveals.
    last_load: RefCell<Option<(i64, Rc<SyncState>, bool)>>,
    /// The rows the last read of the file decoded, with the values each was decoded from (see
    /// [`Decoded`]); kept only while loads may be reused ([`SyncCache::reuse_loads`]).
    decoded: RefCell<Decoded>,
    /// Queue rows a settle in the open group removed, not yet deleted from the file: deleted
    /// together, a range of consecutive ids per statement, before the group commits and before
    /// anything reads the queue table (`SyncCache::delete_settled`). Ids are never reused, so no
    /// write in between can touch these rows.
    settled_rows: RefCell<Vec<i64>>,
}

/// Rows [`SyncCache::read_state`] decoded, each with its key and the exact values it was
/// decoded from, in the order the read returns them (by key). Decoding is a pure function of
/// the stored values, so a row read again with byte-equal values is the same value: the next
/// read clones it instead of parsing its JSON again (a queue entry's `Change`, a pair's base
/// fields). A row that changed (written by this connection or another) is decoded afresh; a
/// read keeps only the rows it saw, so this holds no more than one state's rows.
#[derive(Default)]
struct Decoded {
    queue: Vec<(i64, (String, Change))>,
    ignored: Vec<(i64, (String, Change))>,
    mapping: Vec<(String, (MappingText, MappingEntry))>,
}

/// The previous read's rows of one table, walked in key order beside the rows of this read.
struct Known<K, T>(std::iter::Peekable<std::vec::IntoIter<(K, T)>>);

impl<K, T> Known<K, T> {
    fn new(rows: Vec<(K, T)>) -> Self {
        Known(rows.into_iter().peekable())
    }

    /// The row whose key `order` finds equal (it orders a known key against the key sought),
    /// passing over the rows before it: keys come in ascending order in both reads. A key out
    /// of order only misses, and its row is decoded afresh.
    fn take(&mut self, order: impl Fn(&K) -> std::cmp::Ordering) -> Option<(K, T)> {
        while self.0.next_if(|(k, _)| order(k).is_lt()).is_some() {}
        self.0.next_if(|(k, _)| order(k).is_eq())
    }
}

/// Whether column `i` of `row` is the text `known`, byte for byte (so valid UTF-8).
fn same_text(row: &rusqlite::Row<'_>, i: usize, known: &str) -> bool {
    matches!(row.get_ref(i), Ok(ValueRef::Text(b)) if b == known.as_bytes())
}

/// Whether column `i` of `row` is NULL for `None`, else the text `known`, byte for byte.
fn same_optional_text(row: &rusqlite::Row<'_>, i: usize, known: Option<&str>) -> bool {
    match (row.get_ref(i), known) {
        (Ok(ValueRef::Null), None) => true,
        (Ok(ValueRef::Text(b)), Some(known)) => b == known.as_bytes(),
        _ => false,
    }
}

/// Whether column `i` of `row` is NULL for `None`, else the integer `known`.
fn same_optional_integer(row: &rusqlite::Row<'_>, i: usize, known: Option<i64>) -> bool {
    match (row.get_ref(i), known) {
        (Ok(ValueRef::Null), None) => true,
        (Ok(ValueRef::Integer(v)), Some(known)) => v == known,
        _ => false,
    }
}

/// The columns of an `IdMappingTable` row as stored (the key, `CrmId`, aside).
struct MappingText {
    entry_id: String,
    otc: i64,
    base: String,
    goid: Option<String>,
    role: String,
    status: String,
    version: Option<i64>,
}

impl MappingText {
    /// Whether `row` holds exactly these values.
    fn is_in(&self, row: &rusqlite::Row<'_>) -> bool {
        same_text(row, 1, &self.entry_id)
            && same_optional_integer(row, 2, Some(self.otc))
            && same_text(row, 3, &self.base)
            && same_optional_text(row, 4, self.goid.as_deref())
            && same_text(row, 5, &self.role)
            && same_text(row, 6, &self.status)
            && same_optional_integer(row, 7, self.version)
    }
}

/// One `IdMappingTable` row as SQLite holds it, borrowed.
struct MappingRow<'r> {
    crm_id: &'r str,
    entry_id: &'r str,
    otc: i64,
    base: &'r str,
    goid: Option<&'r str>,
    role: &'r str,
    status: &'r str,
    version: Option<i64>,
}

impl<'r> MappingRow<'r> {
    /// Reads the row's columns, checking each one's type.
    fn read(row: &'r rusqlite::Row<'_>) -> Result<MappingRow<'r>, CacheError> {
        let t = "IdMappingTable";
        let (crm_id, entry_id, base) =
            (text(row, 0, t, "CrmId")?, text(row, 1, t, "EntryId")?, text(row, 3, t, "Base")?);
        let (otc, goid, version) = (row.get(2)?, optional_text(row, 4)?, row.get(7)?);
        let (role, status) = (text(row, 5, t, "Role")?, text(row, 6, t, "Status")?);
        Ok(MappingRow { crm_id, entry_id, otc, base, goid, role, status, version })
    }

    fn to_text(&self) -> MappingText {
        MappingText {
            entry_id: self.entry_id.to_owned(),
            otc: self.otc,
            base: self.base.to_owned(),
            goid: self.goid.map(str::to_owned),
            role: self.role.to_owned(),
            status: self.status.to_owned(),
            version: self.version,
        }
    }

    fn decode(&self) -> Result<MappingEntry, CacheError> {
        let t = "IdMappingTable";
        let (crm_id, entry_id, base, otc) = (self.crm_id, self.entry_id, self.base, self.otc);
        let (role, status) = (self.role, self.status);
        Ok(MappingEntry {
            crm_id: crm_id.parse::<CrmId>().map_err(|_| corrupt(t, "CrmId", crm_id))?,
            entry_id: EntryId::new(entry_id.to_owned()).map_err(|_| corrupt(t, "EntryId", entry_id))?,
            object_type: u32::try_from(otc)
                .ok()
                .and_then(|c| ObjectTypeCode::try_from(c).ok())
                .ok_or_else(|| corrupt(t, "ObjectTypeCode", otc))?,
            base: serde_json::from_str(base).map_err(|_| corrupt(t, "Base", base))?,
            goid: self
                .goid
                .map(|g| crate::ids::GlobalObjectId::from_hex(g).map_err(|_| corrupt(t, "Goid", g)))
                .transpose()?,
            role: serde_json::from_str(role).map_err(|_| corrupt(t, "Role", role))?,
            status: serde_json::from_str(status).map_err(|_| corrupt(t, "Status", status))?,
            crm_version: self
                .version
                .map(|v| {
                    u64::try_from(v).map(crate::ids::VersionNumber).map_err(|_| corrupt(t, "CrmVersion", v))
                })
                .transpose()?,
        })
    }
}

/// A queue or ignored-error row as [`change_row`] reads it: its id, its change (as decoded
/// before from byte-equal text, or the text to decode), its attempts and its last error.
type ChangeRow<'r> = (i64, Result<(String, Change), &'r str>, i64, Option<String>);

/// Reads a queue or ignored-error row, its columns in the order the rows were always read.
/// The change is decoded later, by [`decode_change`] from within [`queue_entry`], so that a
/// corrupt row fails on the same column as before (the id first).
fn change_row<'r>(
    table: &'static str,
    row: &'r rusqlite::Row<'_>,
    known: &mut Known<i64, (String, Change)>,
) -> Result<ChangeRow<'r>, CacheError> {
    let id: i64 = row.get(0)?;
    let known = known.take(|k| k.cmp(&id)).filter(|(_, (text, _))| same_text(row, 1, text));
    let change = match known {
        Some((_, kept)) => Ok(kept),
        None => Err(text(row, 1, table, "Change")?),
    };
    Ok((id, change, row.get(2)?, row.get(3)?))
}

/// The change of a row read by [`change_row`], kept in `next` under `id`.
fn decode_change(
    table: &'static str,
    id: i64,
    change: Result<(String, Change), &str>,
    next: Option<&mut Vec<(i64, (String, Change))>>,
) -> Result<Change, CacheError> {
    let (text, change) = match change {
        Ok(kept) => kept,
        Err(text) => {
            let change = serde_json::from_str::<Change>(text).map_err(|_| corrupt(table, "Change", text))?;
            let Some(_) = next else { return Ok(change) };
            (text.to_owned(), change)
        }
    };
    if let Some(next) = next {
        next.push((id, (text, change.clone())));
    }
    Ok(change)
}

impl std::fmt::Debug for SyncCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncCache").field("in_group", &self.in_group).finish_non_exhaustive()
    }
}

impl SyncCache {
    /// Opens the cache at `path`, creating it when the file does not exist or is empty, and
    /// migrating a version-1 cache.
    pub fn open(path: &Path) -> Result<SyncCache, CacheOpenError> {
        Self::open_with(path, true)
    }

    /// Opens an existing cache; a missing path is an error and no file is created.
    pub fn open_existing(path: &Path) -> Result<SyncCache, CacheOpenError> {
        Self::open_with(path, false)
    }

    fn open_with(path: &Path, create: bool) -> Result<SyncCache, CacheOpenError> {
        let sqlite = |source| CacheOpenError::Sqlite { path: path.to_owned(), source };
        let fresh = create && std::fs::metadata(path).map(|m| m.len() == 0).unwrap_or(true);
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let conn = Connection::open_with_flags(path, flags).map_err(sqlite)?;
        let mut version = 0;
        if !fresh {
            // Read the header before anything writes to the file.
            let found: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0)).map_err(sqlite)?;
            version = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sqlite)?;
            if found != CACHE_APPLICATION_ID || version < 1 {
                return Err(CacheOpenError::NotACache { path: path.to_owned(), found });
            }
            if version > CACHE_SCHEMA_VERSION {
                return Err(CacheOpenError::NewerSchema { path: path.to_owned(), found: version });
            }
            // A corrupt file fails here, still unwritten.
            let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(sqlite)?;
            if check != "ok" {
                return Err(sqlite(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                    Some(check),
                )));
            }
        }
        conn.pragma_update(None, "journal_mode", "WAL").map_err(sqlite)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(sqlite)?;
        crate::sqlite::keep_plans(&conn).map_err(sqlite)?;
        let cache = SyncCache::on(conn);
        if fresh {
            create_schema(&cache.conn).map_err(sqlite)?;
        } else if version == 1 {
            cache.migrate_v1().map_err(sqlite)?;
        }
        Ok(cache)
    }

    /// A cache in memory (tests, the simulator).
    pub fn in_memory() -> Result<SyncCache, rusqlite::Error> {
        thread_local! {
            static TEMPLATE: RefCell<Option<Connection>> = const { RefCell::new(None) };
        }
        let conn = crate::sqlite::in_memory_from(&TEMPLATE, create_schema)?;
        crate::sqlite::keep_plans(&conn)?;
        Ok(SyncCache::on(conn))
    }

    /// A cache on an open connection whose schema is (or is about to be) current: no group open,
    /// nothing kept from earlier reads.
    fn on(conn: Connection) -> SyncCache {
        SyncCache {
            conn,
            in_group: false,
            reuse_loads: false,
            last_load: RefCell::new(None),
            decoded: RefCell::new(Decoded::default()),
            settled_rows: RefCell::new(Vec::new()),
        }
    }

    fn migrate_v1(&self) -> Result<(), rusqlite::Error> {
        self.conn.execute_batch(&format!("BEGIN; {MIGRATE_V1_TO_V2} PRAGMA user_version = 2; COMMIT;"))
    }

    /// Reads the whole state: queue, mapping and ignored errors, each row validated. Text
    /// columns are read in place (borrowed from SQLite's row), not copied first.
    pub fn load(&self) -> Result<SyncState, CacheError> {
        match self.kept()? {
            Some(state) => Ok((*state).clone()),
            None => self.read_and_keep().map(|state| (*state).clone()),
        }
    }

    /// [`load`](SyncCache::load) without the copy: the kept state itself, shared (a reader that
    /// only looks, such as the simulator's checks).
    pub fn load_shared(&self) -> Result<Rc<SyncState>, CacheError> {
        match self.kept()? {
            Some(state) => Ok(state),
            None => self.read_and_keep(),
        }
    }

    /// Reads the state from the file, whatever is kept: what a checker compares the kept state
    /// with, to see that what the engine holds is what the file holds.
    pub fn load_from_file(&self) -> Result<SyncState, CacheError> {
        self.read_state()
    }

    /// After a run that finished (everything committed), keeps its final state as the answer to
    /// the next loads, so that they need not read the file again (with reuse on; else nothing).
    /// The engine's state mirrors every durable step it made, so it is the file's state.
    pub fn remember(&mut self, state: SyncState) -> Result<(), CacheError> {
        if self.settled() {
            let version = self.data_version()?;
            *self.last_load.get_mut() = Some((version, Rc::new(state), false));
        }
        Ok(())
    }

    /// Whether loads may be kept and answered from what was kept: reuse is on, and only a load
    /// outside any transaction reads committed state that a later rollback cannot take back.
    fn settled(&self) -> bool {
        self.reuse_loads && !self.in_group && self.conn.is_autocommit()
    }

    fn data_version(&self) -> Result<i64, CacheError> {
        Ok(self.conn.prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get(0))?)
    }

    /// The kept state, if it may answer a load now.
    fn kept(&self) -> Result<Option<Rc<SyncState>>, CacheError> {
        if !self.settled() {
            return Ok(None);
        }
        let version = self.data_version()?;
        Ok(self.last_load.borrow().as_ref().filter(|(seen, ..)| *seen == version).map(|(_, s, _)| s.clone()))
    }

    /// Whether `state` (from [`load_shared`](SyncCache::load_shared)) is what a read of the file
    /// returned, with nothing written since: then [`load_from_file`](SyncCache::load_from_file)
    /// would read the same rows again, and a checker comparing the two has nothing to compare.
    /// `false` for a state a finished run left ([`remember`](SyncCache::remember)).
    pub fn is_as_read_from_file(&self, state: &Rc<SyncState>) -> Result<bool, CacheError> {
        if !self.settled() {
            return Ok(false);
        }
        let version = self.data_version()?;
        Ok(self
            .last_load
            .borrow()
            .as_ref()
            .is_some_and(|(seen, kept, read)| *seen == version && *read && Rc::ptr_eq(kept, state)))
    }

    /// Reads the state, and keeps it when loads may be kept.
    fn read_and_keep(&self) -> Result<Rc<SyncState>, CacheError> {
        // The version before the read: a write by another connection in between then shows.
        let version = if self.settled() { Some(self.data_version()?) } else { None };
        let state = Rc::new(self.read_state()?);
        if let Some(version) = version {
            *self.last_load.borrow_mut() = Some((version, state.clone(), true));
        }
        Ok(state)
    }

    /// Lets [`SyncCache::load`] answer a repeated load with a copy of the state it last read,
    /// as long as nothing wrote the cache in between (this connection or another: SQLite's
    /// `data_version`). For a caller that loads the same cache often, such as the simulator's
    /// checks between sync runs; it keeps one more copy of the state in memory. Off by default.
    pub fn reuse_loads(&mut self, on: bool) {
        self.reuse_loads = on;
        self.last_load.get_mut().take();
    }

    /// The connection, for a method about to write: forgets the kept load first.
    fn writer(&mut self) -> &Connection {
        self.last_load.get_mut().take();
        &self.conn
    }

    fn read_state(&self) -> Result<SyncState, CacheError> {
        self.delete_settled()?;
        // Decoded rows are kept only where reads repeat (`reuse_loads`, the simulator): a client
        // reads its cache once a run, and keeping them would only cost it memory.
        let keep = self.reuse_loads;
        let before = self.decoded.take();
        let mut next = Decoded::default();
        let mut state = SyncState::default();
        let mut known = Known::new(before.queue);
        let mut stmt = self
            .conn
            .prepare_cached("SELECT Id, Change, Attempts, LastError FROM OutlookSyncTable ORDER BY Id")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let t = "OutlookSyncTable";
            let (id, change, attempts, last_error) = change_row(t, row, &mut known)?;
            let change = || decode_change(t, id, change, keep.then_some(&mut next.queue));
            state.queue.insert(queue_entry(t, id, change, attempts, last_error)?)?;
        }
        let mut known = Known::new(before.mapping);
        let mut stmt = self.conn.prepare_cached(
            "SELECT CrmId, EntryId, ObjectTypeCode, Base, Goid, Role, Status, CrmVersion FROM IdMappingTable \
             ORDER BY CrmId",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            if !keep {
                state.mapping.insert(MappingRow::read(row)?.decode()?)?;
                continue;
            }
            let kept = match row.get_ref(0)? {
                ValueRef::Text(key) => known.take(|k| k.as_bytes().cmp(key)),
                _ => None,
            };
            let (key, (text, entry)) = match kept.filter(|(_, (text, _))| text.is_in(row)) {
                Some(kept) => kept,
                None => {
                    let read = MappingRow::read(row)?;
                    (read.crm_id.to_owned(), (read.to_text(), read.decode()?))
                }
            };
            state.mapping.insert(entry.clone())?;
            next.mapping.push((key, (text, entry)));
        }
        let mut known = Known::new(before.ignored);
        let mut stmt = self
            .conn
            .prepare_cached("SELECT Id, Change, Attempts, LastError, Error FROM IgnoredErrors ORDER BY Id")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let t = "IgnoredErrors";
            let (id, change, attempts, last_error) = change_row(t, row, &mut known)?;
            let change = || decode_change(t, id, change, keep.then_some(&mut next.ignored));
            let entry = queue_entry(t, id, change, attempts, last_error)?;
            state.ignored.push(IgnoredError { entry, error: row.get(4)? });
        }
        *self.decoded.borrow_mut() = next;
        Ok(state)
    }

    /// Durable step *queue*: appends changes to the queue (the cache's ids are the queue's ids)
    /// and to `state`, in one transaction unless a group is open.
    pub fn enqueue(&mut self, state: &mut SyncState, changes: &[Change]) -> Result<Vec<QueueId>, CacheError> {
        self.step(|conn| {
            let mut insert = conn.prepare_cached(
                "INSERT INTO OutlookSyncTable (Side, Kind, RecordKey, ObjectTypeCode, Change) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut ids = Vec::with_capacity(changes.len());
            for change in changes {
                let json = serde_json::to_string(change).map_err(|e| corrupt("OutlookSyncTable", "Change", e))?;
                insert.execute(params![
                    side_name(change.side()),
                    kind_name(change.kind()),
                    change.key().to_string(),
                    change.object_type().code(),
                    json
                ])?;
                // The row's `INTEGER PRIMARY KEY` (no trigger inserts elsewhere): what a
                // `RETURNING Id` reads, without the temporary table SQLite fills for it.
                let id = conn.last_insert_rowid();
                ids.push(QueueId(u64::try_from(id).map_err(|_| corrupt("OutlookSyncTable", "Id", id))?));
            }
            Ok(ids)
        })
        .and_then(|ids| {
            for (id, change) in ids.iter().zip(changes) {
                state.queue.insert(QueueEntry { id: *id, change: change.clone(), attempts: 0, last_error: None })?;
            }
            Ok(ids)
        })
    }

    /// Durable step *settle*: writes what settling `action` changed, reading the rows from the
    /// state after `settle`: its queue entries (gone, retried or ignored) and the mapping entries
    /// its link change touches. In one transaction unless a group is open.
    pub fn record_settled(&mut self, after: &SyncState, action: &Action) -> Result<(), CacheError> {
        let in_group = self.in_group;
        let mut settled_rows = std::mem::take(self.settled_rows.get_mut());
        let written = self.step(|conn| {
            for &id in &action.consumed {
                // Inside a group, a row that simply leaves the queue (neither retried nor
                // ignored) is deleted with its neighbours before the commit.
                let deferred = in_group
                    && after.queue.get(id).is_none()
                    && !after.ignored.iter().rev().any(|i| i.entry.id == id);
                if deferred {
                    settled_rows.push(id.0 as i64);
                } else {
                    write_queue_row(conn, after, id)?;
                }
            }
            let touched = match &action.link {
                LinkChange::Keep => [None, None],
                LinkChange::Link(p) => [Some(p.crm_id), None],
                LinkChange::Remove(id) => [Some(*id), None],
                LinkChange::Replace { remove, link } => [Some(*remove), Some(link.crm_id)],
            };
            for crm_id in touched.into_iter().flatten() {
                write_mapping_row(conn, after.mapping.get(crm_id), crm_id)?;
            }
            Ok(())
        });
        *self.settled_rows.get_mut() = settled_rows;
        written
    }

    /// Drops queue entries (in `state` and the file) that will be read again from their side.
    pub fn drop_entries(&mut self, state: &mut SyncState, ids: &[QueueId]) -> Result<(), CacheError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.step(|conn| {
            for &id in ids {
                state.queue.remove(id);
                write_queue_row(conn, state, id)?;
            }
            Ok(())
        })
    }

    /// Forgets the links `crm_ids` (in `state` and the file): pairs another machine unlinked.
    pub fn forget_links(&mut self, state: &mut SyncState, crm_ids: &[CrmId]) -> Result<(), CacheError> {
        if crm_ids.is_empty() {
            return Ok(());
        }
        self.step(|conn| {
            for &crm_id in crm_ids {
                state.mapping.remove(crm_id);
                write_mapping_row(conn, None, crm_id)?;
            }
            Ok(())
        })
    }

    /// Durable step *restore links*: puts mapping entries the mailbox kept on its items (see
    /// `mailbox::SyncBase`) into `state` and the file, replacing an older base of the same pair.
    pub fn restore_links(
        &mut self,
        state: &mut SyncState,
        entries: Vec<MappingEntry>,
    ) -> Result<(), CacheError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.step(|conn| {
            for entry in entries {
                let crm_id = entry.crm_id;
                for displaced in state.mapping.link(entry) {
                    write_mapping_row(conn, state.mapping.get(displaced.crm_id), displaced.crm_id)?;
                }
                write_mapping_row(conn, state.mapping.get(crm_id), crm_id)?;
            }
            Ok(())
        })
    }

    /// Groups the following durable steps into one transaction, until [`SyncCache::commit`]
    /// (commit every N outcomes). A crash loses the open group, never part of a step.
    pub fn begin(&mut self) -> Result<(), CacheError> {
        if !self.in_group {
            self.writer().execute_batch("BEGIN IMMEDIATE")?;
            self.in_group = true;
        }
        Ok(())
    }

    /// Makes the open group durable.
    pub fn commit(&mut self) -> Result<(), CacheError> {
        if self.in_group {
            self.delete_settled()?;
            self.writer().execute_batch("COMMIT")?;
            self.in_group = false;
        }
        Ok(())
    }

    /// What a crash does to the open group: it is lost, as if the process died before
    /// [`SyncCache::commit`]. Everything committed stays. (The simulator's "process killed".)
    pub fn abandon_group(&mut self) -> Result<(), CacheError> {
        if self.in_group {
            self.in_group = false;
            self.settled_rows.get_mut().clear();
            self.writer().execute_batch("ROLLBACK")?;
        }
        Ok(())
    }

    /// Deletes the queue rows settles in the open group removed (`settled_rows`): each run of
    /// consecutive ids in one statement. Inside the group, so a crash loses them with it.
    fn delete_settled(&self) -> Result<(), CacheError> {
        let mut ids = self.settled_rows.take();
        if ids.is_empty() {
            return Ok(());
        }
        ids.sort_unstable();
        ids.dedup();
        let mut range =
            self.conn.prepare_cached("DELETE FROM OutlookSyncTable WHERE Id BETWEEN ?1 AND ?2")?;
        for run in ids.chunk_by(|a, b| a + 1 == *b) {
            range.execute([run[0], run[run.len() - 1]])?;
        }
        Ok(())
    }

    /// Runs one durable step: in its own transaction, or inside the open group.
    fn step<T>(&mut self, write: impl FnOnce(&Connection) -> Result<T, CacheError>) -> Result<T, CacheError> {
        let in_group = self.in_group;
        let conn = self.writer();
        if in_group {
            return write(conn);
        }
        let tx = conn.unchecked_transaction()?;
        let value = write(&tx)?;
        tx.commit()?;
        Ok(value)
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, CacheError> {
        Ok(self
            .conn
            .prepare_cached("SELECT Value FROM SyncMeta WHERE Key = ?1")?
            .query_row([key], |r| r.get(0))
            .optional()?)
    }

    /// Every metadata entry whose key starts with `prefix`, in key order.
    pub fn meta_with_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>, CacheError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT Key, Value FROM SyncMeta WHERE substr(Key, 1, ?2) = ?1 ORDER BY Key")?;
        let rows = stmt.query_map(params![prefix, prefix.len() as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn delete_meta(&mut self, key: &str) -> Result<(), CacheError> {
        self.step(|conn| {
            conn.prepare_cached("DELETE FROM SyncMeta WHERE Key = ?1")?.execute([key])?;
            Ok(())
        })
    }

    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<(), CacheError> {
        self.step(|conn| {
            conn.prepare_cached(
                "INSERT INTO SyncMeta VALUES (?1, ?2) ON CONFLICT (Key) DO UPDATE SET Value = ?2",
            )?
            .execute(params![key, value])?;
            Ok(())
        })
    }

    /// Desynchronise: forgets the queue, the mapping, the ignored errors and the metadata, in one
    /// transaction. Items and records are not the cache's to touch.
    pub fn clear(&mut self) -> Result<(), CacheError> {
        self.step(|conn| {
            conn.execute_batch(
                "DELETE FROM OutlookSyncTable; DELETE FROM IdMappingTable; DELETE FROM IgnoredErrors; \
                 DELETE FROM SyncMeta;",
            )?;
            Ok(())
        })
    }
}

/// The `Side` column: the side's name as `Debug` spells it.
fn side_name(side: Side) -> &'static str {
    match side {
        Side::Crm => "Crm",
        Side::Outlook => "Outlook",
    }
}

/// The `Kind` column: the kind's name as `Debug` spells it.
fn kind_name(kind: ChangeKind) -> &'static str {
    match kind {
        ChangeKind::Create => "Create",
        ChangeKind::Update => "Update",
        ChangeKind::Delete => "Delete",
    }
}

/// Column `i` of `row` as text, borrowed from the row; anything else is a corrupt value.
fn text<'r>(
    row: &'r rusqlite::Row<'_>,
    i: usize,
    table: &'static str,
    column: &'static str,
) -> Result<&'r str, CacheError> {
    let value = row.get_ref(i)?;
    value.as_str().map_err(|_| corrupt(table, column, format!("{value:?}")))
}

/// Column `i` of `row` as text or NULL, borrowed from the row. Anything else fails as reading it
/// as an `Option<String>` does (the same error).
fn optional_text<'r>(row: &'r rusqlite::Row<'_>, i: usize) -> Result<Option<&'r str>, CacheError> {
    if let Ok(text) = row.get_ref(i)?.as_str_or_null() {
        return Ok(text);
    }
    let typed: Option<String> = row.get(i)?;
    Err(CacheError::Sqlite(rusqlite::Error::InvalidColumnType(
        i,
        format!("text read as {typed:?}, not as text"),
        rusqlite::types::Type::Text,
    )))
}

/// A queue entry from its row's columns; `change` decodes the `Change` (checked after the id,
/// before the attempts).
fn queue_entry(
    table: &'static str,
    id: i64,
    change: impl FnOnce() -> Result<Change, CacheError>,
    attempts: i64,
    last_error: Option<String>,
) -> Result<QueueEntry, CacheError> {
    Ok(QueueEntry {
        id: QueueId(u64::try_from(id).map_err(|_| corrupt(table, "Id", id))?),
        change: change()?,
        attempts: u32::try_from(attempts).map_err(|_| corrupt(table, "Attempts", attempts))?,
        last_error,
    })
}

/// Mirrors one queue entry of `after`: still queued (attempts, error), ignored, or gone.
fn write_queue_row(conn: &Connection, after: &SyncState, id: QueueId) -> Result<(), CacheError> {
    let key = id.0 as i64;
    if let Some(entry) = after.queue.get(id) {
        conn.prepare_cached("UPDATE OutlookSyncTable SET Attempts = ?2, LastError = ?3 WHERE Id = ?1")?
            .execute(params![key, entry.attempts, entry.last_error])?;
        return Ok(());
    }
    conn.prepare_cached("DELETE FROM OutlookSyncTable WHERE Id = ?1")?.execute([key])?;
    // Ignored entries are few and recent: look from the end.
    if let Some(ignored) = after.ignored.iter().rev().find(|i| i.entry.id == id) {
        let change = serde_json::to_string(&ignored.entry.change)
            .map_err(|e| corrupt("IgnoredErrors", "Change", e))?;
        conn.prepare_cached("INSERT OR REPLACE INTO IgnoredErrors VALUES (?1, ?2, ?3, ?4, ?5)")?
            .execute(params![key, change, ignored.entry.attempts, ignored.entry.last_error, ignored.error])?;
    }
    Ok(())
}

/// Mirrors one mapping entry of the state after a settle: present (upsert) or gone (delete).
fn write_mapping_row(
    conn: &Connection,
    entry: Option<&MappingEntry>,
    crm_id: CrmId,
) -> Result<(), CacheError> {
    let Some(m) = entry else {
        conn.prepare_cached("DELETE FROM IdMappingTable WHERE CrmId = ?1")?.execute([crm_id.to_string()])?;
        return Ok(());
    };
    // OR REPLACE: the row replaces its earlier version and any row that held its EntryId or
    // GOID a moment ago (a re-pointed pair), as the pure mapping's link did, in one statement.
    let mut crm_id_text = uuid::Uuid::encode_buffer();
    conn.prepare_cached(
        "INSERT OR REPLACE INTO IdMappingTable \
         (CrmId, EntryId, ObjectTypeCode, Base, Goid, Role, Status, CrmVersion) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        &*crm_id.as_uuid().hyphenated().encode_lower(&mut crm_id_text),
        m.entry_id.as_str(),
        m.object_type.code(),
        to_json(&m.base)?,
        m.goid.as_ref().map(|g| g.to_hex()),
        role_json(m.role),
        status_json(m.status),
        m.crm_version.map(|v| v.0 as i64),
    ])?;
    Ok(())
}

/// A role as its JSON text (what `serde_json` writes for it), without serialising per row.
fn role_json(role: Role) -> &'static str {
    match role {
        Role::Owner => "\"Owner\"",
        Role::Organizer => "\"Organizer\"",
        Role::Attendee => "\"Attendee\"",
        Role::Other => "\"Other\"",
    }
}

/// A status as its JSON text (what `serde_json` writes for it).
fn status_json(status: ActivityStatus) -> &'static str {
    match status {
        ActivityStatus::Open => "\"Open\"",
        ActivityStatus::Completed => "\"Completed\"",
        ActivityStatus::Cancelled => "\"Cancelled\"",
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, CacheError> {
    serde_json::to_string(value).map_err(|e| corrupt("IdMappingTable", "Base", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{ChangeOp, DeleteReason};
    use crate::ids::VersionNumber;

    fn deleted(version: u64) -> Change {
        let id = CrmId::new(uuid::Uuid::from_u128(7)).unwrap();
        Change::crm(id, ObjectTypeCode::Task, VersionNumber(version), ChangeOp::Delete(DeleteReason::Deleted))
            .unwrap()
    }

    #[test]
    fn a_row_read_again_is_decoded_again_once_its_text_changed() {
        let mut cache = SyncCache::in_memory().unwrap();
        cache.reuse_loads(true);
        let mut state = SyncState::default();
        cache.enqueue(&mut state, &[deleted(1)]).unwrap();
        assert_eq!(cache.load_from_file().unwrap(), state);
        assert_eq!(cache.decoded.borrow().queue.len(), 1, "the decoded row is kept");
        assert_eq!(cache.load_from_file().unwrap(), state, "a row read again with the same text");
        // Another writer (here: behind the cache's back) changes the row's text.
        let newer = serde_json::to_string(&deleted(2)).unwrap();
        cache.conn.execute("UPDATE OutlookSyncTable SET Change = ?1", [&newer]).unwrap();
        let loaded = cache.load_from_file().unwrap();
        assert_eq!(loaded.queue.entries()[0].change, deleted(2));
        // And a corrupt text is refused as before, naming the value.
        cache.conn.execute("UPDATE OutlookSyncTable SET Change = 'nope'", []).unwrap();
        assert!(matches!(cache.load_from_file(), Err(CacheError::Corrupt { column: "Change", .. })));
    }

    #[test]
    fn decoded_rows_are_kept_only_where_loads_are_reused() {
        let mut cache = SyncCache::in_memory().unwrap();
        let mut state = SyncState::default();
        cache.enqueue(&mut state, &[deleted(1)]).unwrap();
        assert_eq!(cache.load_from_file().unwrap(), state);
        let decoded = cache.decoded.borrow();
        assert!(decoded.queue.is_empty() && decoded.mapping.is_empty(), "a client's read keeps nothing");
    }

    #[test]
    fn side_and_kind_columns_hold_the_debug_names() {
        for side in [Side::Crm, Side::Outlook] {
            assert_eq!(side_name(side), format!("{side:?}"));
        }
        for kind in [ChangeKind::Create, ChangeKind::Update, ChangeKind::Delete] {
            assert_eq!(kind_name(kind), format!("{kind:?}"));
        }
    }

    #[test]
    fn role_and_status_texts_are_their_json() {
        for role in [Role::Owner, Role::Organizer, Role::Attendee, Role::Other] {
            assert_eq!(role_json(role), serde_json::to_string(&role).unwrap());
        }
        for status in [ActivityStatus::Open, ActivityStatus::Completed, ActivityStatus::Cancelled] {
            assert_eq!(status_json(status), serde_json::to_string(&status).unwrap());
        }
    }
}
