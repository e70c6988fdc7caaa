//! Settings every SQLite store of this crate (server, cache, mailbox file) puts on its
//! connection, so the three behave alike under load; and in-memory stores copied from a
//! per-thread template instead of built statement by statement.

use std::cell::RefCell;
use std::thread::LocalKey;

use rusqlite::Connection;
use rusqlite::backup::{Backup, StepResult};
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

/// A per-thread template of one kind of in-memory store: the empty database its schema makes.
pub(crate) type Template = LocalKey<RefCell<Option<Connection>>>;

/// A new in-memory database holding a copy of `template`: the database `create` makes on an
/// empty in-memory connection, made once per thread and then copied page by page (SQLite's
/// backup), the header's `application_id` and `user_version` included. Building a schema runs
/// its DDL (an `ALTER TABLE` parses the whole schema again); a copy only moves a few pages, and
/// the simulator makes eleven stores per seed. The copy is the database `create` would have
/// made; the connection's own settings are the caller's to put on it.
pub(crate) fn in_memory_from(
    template: &'static Template,
    create: impl FnOnce(&Connection) -> rusqlite::Result<()>,
) -> rusqlite::Result<Connection> {
    let mut conn = Connection::open_in_memory()?;
    template.with(|cell| {
        let mut kept = cell.borrow_mut();
        let source: &Connection = match &mut *kept {
            Some(source) => source,
            empty => {
                let fresh = Connection::open_in_memory()?;
                create(&fresh)?;
                empty.insert(fresh)
            }
        };
        match Backup::new(source, &mut conn)?.step(-1)? {
            StepResult::Done => Ok(()),
            // A private in-memory database is never busy or locked, and -1 copies every page.
            stopped => Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                Some(format!("copying the template stopped: {stopped:?}")),
            )),
        }
    })?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static TEMPLATE: RefCell<Option<Connection>> = const { RefCell::new(None) };
    }

    fn make(conn: &Connection) -> rusqlite::Result<()> {
        conn.execute_batch("CREATE TABLE t (x); PRAGMA user_version = 7; PRAGMA application_id = 5;")
    }

    #[test]
    fn copies_hold_the_template_and_are_independent() {
        let a = in_memory_from(&TEMPLATE, make).unwrap();
        let b = in_memory_from(&TEMPLATE, |_| panic!("the template is made once per thread")).unwrap();
        a.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let count =
            |c: &Connection| c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0)).unwrap();
        assert_eq!((count(&a), count(&b)), (1, 0));
        for pragma in ["user_version", "application_id"] {
            let value: i64 = b.query_row(&format!("PRAGMA {pragma}"), [], |r| r.get(0)).unwrap();
            assert_eq!(value, if pragma == "user_version" { 7 } else { 5 });
        }
        let c = in_memory_from(&TEMPLATE, make).unwrap();
        assert_eq!(count(&c), 0, "a copy made after a write to another copy");
    }
}
