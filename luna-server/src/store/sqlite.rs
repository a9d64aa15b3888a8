//! The embedded store: one SQLite file (WAL), one table, one transaction per batch.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{Collection, Expect, Record, Result, Store, StoreError, Write};

pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`; `:memory:` gives a private in-memory store.
    pub fn open(path: &str) -> Result<Self> {
        let conn = if path == ":memory:" {
            Connection::open_in_memory()?
        } else {
            // It holds BMC passwords: owner-only directory and files (created so, or tightened).
            crate::fsperm::secure_sqlite(Path::new(path))?;
            Connection::open(path)?
        };
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS records (
                 collection TEXT NOT NULL,
                 key TEXT NOT NULL,
                 rev INTEGER NOT NULL,
                 doc TEXT NOT NULL,
                 PRIMARY KEY (collection, key)
             ) WITHOUT ROWID;",
        )?;
        if path != ":memory:" {
            // The WAL and shm files exist now; one left loose by an older luna is tightened too.
            crate::fsperm::secure_sqlite(Path::new(path))?;
        }
        Ok(SqliteStore { conn: Arc::new(Mutex::new(conn)) })
    }

    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| StoreError::Task("sqlite connection lock poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

fn decode(collection: Collection, key: String, rev: i64, doc: String) -> Result<Record> {
    let doc = serde_json::from_str(&doc).map_err(|e| StoreError::Corrupt {
        collection,
        key: key.clone(),
        reason: e.to_string(),
    })?;
    Ok(Record { collection, key, rev: rev as u64, doc })
}

fn describe(rev: Option<u64>) -> String {
    rev.map_or_else(|| "absent".to_string(), |r| format!("rev {r}"))
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn get(&self, collection: Collection, key: &str) -> Result<Option<Record>> {
        let key = key.to_string();
        self.with_conn(move |c| {
            let row = c
                .prepare_cached("SELECT rev, doc FROM records WHERE collection = ?1 AND key = ?2")?
                .query_row(params![collection.as_str(), key], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
                .optional()?;
            row.map(|(rev, doc)| decode(collection, key, rev, doc)).transpose()
        })
        .await
    }

    async fn list(&self, collection: Collection, prefix: &str) -> Result<Vec<Record>> {
        let prefix = prefix.to_string();
        self.with_conn(move |c| {
            // A range scan on the primary key: [prefix, prefix + U+10FFFF).
            let upper = format!("{prefix}\u{10FFFF}");
            let mut stmt = c.prepare_cached(
                "SELECT key, rev, doc FROM records WHERE collection = ?1 AND key >= ?2 AND key < ?3 ORDER BY key",
            )?;
            let rows = stmt.query_map(params![collection.as_str(), prefix, upper], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (key, rev, doc) = row?;
                out.push(decode(collection, key, rev, doc)?);
            }
            Ok(out)
        })
        .await
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<()> {
        self.with_conn(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for w in &writes {
                let (collection, key, expect) = w.target();
                let current: Option<u64> = tx
                    .prepare_cached("SELECT rev FROM records WHERE collection = ?1 AND key = ?2")?
                    .query_row(params![collection.as_str(), key], |r| r.get::<_, i64>(0))
                    .optional()?
                    .map(|r| r as u64);
                let ok = match expect {
                    Expect::Absent => current.is_none(),
                    Expect::Rev(r) => current == Some(r),
                };
                if !ok {
                    let expected = match expect {
                        Expect::Absent => "absent".to_string(),
                        Expect::Rev(r) => format!("rev {r}"),
                    };
                    // Dropping `tx` rolls everything back.
                    return Err(StoreError::Conflict {
                        collection,
                        key: key.to_string(),
                        expected,
                        found: describe(current),
                    });
                }
                match w {
                    Write::Put { doc, .. } => {
                        let next = current.unwrap_or(0) + 1;
                        tx.prepare_cached(
                            "INSERT INTO records (collection, key, rev, doc) VALUES (?1, ?2, ?3, ?4)
                             ON CONFLICT (collection, key) DO UPDATE SET rev = excluded.rev, doc = excluded.doc",
                        )?
                        .execute(params![
                            collection.as_str(),
                            key,
                            next as i64,
                            doc.to_string()
                        ])?;
                    }
                    Write::Delete { .. } => {
                        tx.prepare_cached("DELETE FROM records WHERE collection = ?1 AND key = ?2")?
                            .execute(params![collection.as_str(), key])?;
                    }
                    // Checked above, inside this `BEGIN IMMEDIATE` transaction: no other writer
                    // can change the record before the commit.
                    Write::Check { .. } => {}
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }
}
