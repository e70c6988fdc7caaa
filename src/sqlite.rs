//! Settings every SQLite store of this crate (server, cache, mailbox file) puts on its
//! connection, so the three behave alike under load.

use rusqlite::Connection;
use rusqlite::config::DbConfig;

/// Prepared statements kept per connection. The server keeps one set per `SyncEntry` table in
/// use, so it needs more than rusqlite's default of 16 (which made every run parse its SQL
/// again).
pub(crate) const STATEMENT_CACHE_CAPACITY: usize = 256;

/// Keeps compiled statements and their plans for the life of the connection:
///
/// - a statement cache large enough for every statement a store runs;
/// - SQLite's query planner stability guarantee (`SQLITE_DBCONFIG_ENABLE_QPSG`). Without it
///   SQLite marks a statement whose plan may depend on a bound value (a `LIMIT ?`, a range over
///   an indexed column) as expired every time its bindings are cleared, which rusqlite does on
///   each return to the cache: every page of `get_sync_data` and of the mailbox log was then
///   compiled again (found profiling crmsync-sim: a tenth of its time). The plans do not need
///   the values: every query here has one good plan.
pub(crate) fn keep_plans(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(())
}
