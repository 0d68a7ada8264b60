//! The host's memory: SQLite (bundled, WAL) on a dedicated thread, so the async threads never
//! wait on a file lock. Callers send closures; answers come back on oneshot channels.
use std::path::Path;
use std::sync::mpsc;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use crate::backends::outbox_sql;
use crate::domain::master::{Report, ReportKind};
use crate::domain::project::{ProjectId, ProjectState, RunConfig};

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// Handle to the store thread. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    tx: mpsc::Sender<Job>,
    /// the master link's outbox (off until `[master]` turns it on)
    outbox: std::sync::Arc<crate::backends::outbox_sql::OutboxSettings>,
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The store thread is gone.
    #[error("store: the store thread has stopped")]
    Gone,
    /// A stored config no longer parses.
    #[error("store: bad config JSON for {0}: {1}")]
    BadConfig(String, serde_json::Error),
}

/// One project row.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectRow {
    /// The id.
    pub id: ProjectId,
    /// Last state the host recorded.
    pub state: ProjectState,
    /// Config of the last start.
    pub config: RunConfig,
    /// Created, ms since the epoch.
    pub created: u64,
    /// Last touched, ms since the epoch.
    pub last_touched: u64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS projects (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    config TEXT NOT NULL DEFAULT '{}',
    created INTEGER NOT NULL,
    last_touched INTEGER NOT NULL
);
-- revoked master tokens (crate::auth::revocation): kept until `until` (unix seconds)
CREATE TABLE IF NOT EXISTS revoked_tokens (jti TEXT PRIMARY KEY, until INTEGER NOT NULL);
-- a project's SSH public keys (PUT /projects/:id/authorized-keys), in the order given
CREATE TABLE IF NOT EXISTS ssh_keys (
    project TEXT NOT NULL, idx INTEGER NOT NULL, key TEXT NOT NULL, PRIMARY KEY (project, idx)
);
";

fn select_projects(
    c: &mut Connection,
    only: Option<ProjectId>,
) -> Result<Vec<ProjectRow>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT id, state, config, created, last_touched FROM projects
         WHERE ?1 IS NULL OR id = ?1 ORDER BY last_touched DESC, id",
    )?;
    let rows = st.query_map([only.map(|i| i.to_string())], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, i64>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, state, config, created, touched) = row?;
        // rows are written only by us from valid ids; skip anything else rather than fail
        let Ok(pid) = id.parse::<ProjectId>() else {
            continue;
        };
        let config = serde_json::from_str(&config).map_err(|e| StoreError::BadConfig(id, e))?;
        let state = serde_json::from_value(serde_json::Value::String(state))
            .unwrap_or(ProjectState::Opened);
        out.push(ProjectRow {
            id: pid,
            state,
            config,
            created: created as u64,
            last_touched: touched as u64,
        });
    }
    Ok(out)
}

impl Store {
    /// Opens (creating) the database at `path` and starts its thread.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(crate::backends::ids::SCHEMA)?;
        conn.execute_batch(crate::backends::outbox_sql::SCHEMA)?;
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("store".into())
            .spawn(move || {
                for job in rx {
                    job(&mut conn);
                }
            })
            .map_err(|_| StoreError::Gone)?;
        Ok(Store {
            tx,
            outbox: Default::default(),
        })
    }

    pub(crate) async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (otx, orx) = oneshot::channel();
        self.tx
            .send(Box::new(move |c| {
                let _ = otx.send(f(c));
            }))
            .map_err(|_| StoreError::Gone)?;
        orx.await.map_err(|_| StoreError::Gone)?
    }

    /// The host id, generated once and kept forever.
    pub async fn host_id(&self) -> Result<String, StoreError> {
        self.call(|c| {
            let tx = c.transaction()?;
            let got: Option<String> = tx
                .query_row("SELECT value FROM meta WHERE key='host_id'", [], |r| {
                    r.get(0)
                })
                .optional()?;
            let id = match got {
                Some(id) => id,
                None => {
                    let id = uuid::Uuid::new_v4().hyphenated().to_string();
                    tx.execute("INSERT INTO meta(key, value) VALUES('host_id', ?1)", [&id])?;
                    id
                }
            };
            tx.commit()?;
            Ok(id)
        })
        .await
    }

    /// The base of a project's host id range: the stored one, or the first time the one `alloc`
    /// picks given every base taken (in one transaction, so two starts never share one).
    /// `None`: `alloc` found none free.
    pub async fn id_range(
        &self,
        id: ProjectId,
        alloc: impl FnOnce(&[u32]) -> Option<u32> + Send + 'static,
    ) -> Result<Option<u32>, StoreError> {
        self.call(move |c| {
            let tx = c.transaction()?;
            let got: Option<i64> = tx
                .query_row(
                    "SELECT base FROM id_ranges WHERE project=?1",
                    [id.to_string()],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(b) = got {
                return Ok(u32::try_from(b).ok());
            }
            let taken: Vec<u32> = tx
                .prepare("SELECT base FROM id_ranges")?
                .query_map([], |r| r.get::<_, i64>(0))?
                .filter_map(|b| b.ok().and_then(|b| u32::try_from(b).ok()))
                .collect();
            let Some(base) = alloc(&taken) else {
                return Ok(None);
            };
            tx.execute(
                "INSERT INTO id_ranges(project, base) VALUES(?1, ?2)",
                params![id.to_string(), i64::from(base)],
            )?;
            tx.commit()?;
            Ok(Some(base))
        })
        .await
    }

    /// All projects, most recently touched first.
    pub async fn projects(&self) -> Result<Vec<ProjectRow>, StoreError> {
        self.call(|c| select_projects(c, None)).await
    }

    /// One project's row.
    pub async fn project(&self, id: ProjectId) -> Result<Option<ProjectRow>, StoreError> {
        Ok(self
            .call(move |c| select_projects(c, Some(id)))
            .await?
            .pop())
    }

    /// Inserts or updates a project's state, config and touch time.
    pub async fn upsert(
        &self,
        id: ProjectId,
        state: ProjectState,
        config: Option<RunConfig>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let config = match config {
            Some(c) => Some(
                serde_json::to_string(&c).map_err(|e| StoreError::BadConfig(id.to_string(), e))?,
            ),
            None => None,
        };
        let outbox = self.outbox.clone();
        self.call(move |c| {
            // the state change and its report to the master commit together (or neither)
            let tx = c.transaction()?;
            let before: Option<String> = tx
                .query_row(
                    "SELECT state FROM projects WHERE id=?1",
                    [id.to_string()],
                    |r| r.get(0),
                )
                .optional()?;
            tx.execute(
                "INSERT INTO projects(id, state, config, created, last_touched) VALUES(?1, ?2, COALESCE(?3, '{}'), ?4, ?4)
                 ON CONFLICT(id) DO UPDATE SET state=?2, config=COALESCE(?3, config), last_touched=MAX(last_touched, ?4)",
                params![id.to_string(), state.as_str(), config, now_ms as i64],
            )?;
            let before = before.and_then(|b| {
                serde_json::from_value::<ProjectState>(serde_json::Value::String(b)).ok()
            });
            let reported = match ReportKind::of_change(before, state) {
                Some(kind) => outbox_sql::append(&tx, &outbox, id, kind, state, now_ms)?,
                None => false,
            };
            tx.commit()?;
            if reported {
                outbox.notify.notify_one();
            }
            Ok(())
        })
        .await
    }

    /// Queues a report that comes with no state change (a failed start), when reports are kept.
    pub async fn report(
        &self,
        id: ProjectId,
        kind: ReportKind,
        state: ProjectState,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let outbox = self.outbox.clone();
        self.call(move |c| {
            let tx = c.transaction()?;
            let reported = outbox_sql::append(&tx, &outbox, id, kind, state, now_ms)?;
            tx.commit()?;
            if reported {
                outbox.notify.notify_one();
            }
            Ok(())
        })
        .await
    }

    /// Forgets a project (its row and id range) and queues its `removed` report, in one
    /// transaction. Whether it was known.
    pub async fn remove(&self, id: ProjectId, now_ms: u64) -> Result<bool, StoreError> {
        let outbox = self.outbox.clone();
        self.call(move |c| {
            let tx = c.transaction()?;
            let n = tx.execute("DELETE FROM projects WHERE id=?1", [id.to_string()])?;
            tx.execute("DELETE FROM id_ranges WHERE project=?1", [id.to_string()])?;
            let reported = n > 0
                && outbox_sql::append(
                    &tx,
                    &outbox,
                    id,
                    ReportKind::Removed,
                    ProjectState::Opened,
                    now_ms,
                )?;
            tx.commit()?;
            if reported {
                outbox.notify.notify_one();
            }
            Ok(n > 0)
        })
        .await
    }

    /// The outbox's switch, limit and wake-up (shared by every clone).
    pub fn outbox(&self) -> &std::sync::Arc<outbox_sql::OutboxSettings> {
        &self.outbox
    }

    /// Records a touch without waiting for it (coalesced by SQLite's MAX).
    pub fn touch(&self, id: ProjectId, now_ms: u64) {
        let _ = self.tx.send(Box::new(move |c| {
            let r = c.execute(
                "UPDATE projects SET last_touched=MAX(last_touched, ?2) WHERE id=?1",
                params![id.to_string(), now_ms as i64],
            );
            if let Err(e) = r {
                tracing::warn!(project_id = %id, error = %e, "store: touch failed");
            }
        }));
    }

    /// A project's SSH public keys, in the order they were set.
    pub async fn ssh_keys(&self, id: ProjectId) -> Result<Vec<String>, StoreError> {
        self.call(move |c| {
            let mut st =
                c.prepare_cached("SELECT key FROM ssh_keys WHERE project=?1 ORDER BY idx")?;
            let keys = st
                .query_map([id.to_string()], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(keys)
        })
        .await
    }

    /// Replaces a project's SSH public keys (one transaction: readers see the old or the new set).
    pub async fn set_ssh_keys(&self, id: ProjectId, keys: Vec<String>) -> Result<(), StoreError> {
        self.call(move |c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM ssh_keys WHERE project=?1", [id.to_string()])?;
            for (i, k) in keys.iter().enumerate() {
                tx.execute(
                    "INSERT INTO ssh_keys(project, idx, key) VALUES(?1, ?2, ?3)",
                    params![id.to_string(), i as i64, k],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Waits until every job sent before this call has run.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.call(|_| Ok(())).await
    }
}

#[async_trait::async_trait]
impl crate::ports::Store for Store {
    async fn id_range(
        &self,
        id: ProjectId,
        alloc: crate::ports::IdAlloc,
    ) -> Result<Option<u32>, StoreError> {
        Store::id_range(self, id, alloc).await
    }
    async fn host_id(&self) -> Result<String, StoreError> {
        Store::host_id(self).await
    }
    async fn projects(&self) -> Result<Vec<ProjectRow>, StoreError> {
        Store::projects(self).await
    }
    async fn project(&self, id: ProjectId) -> Result<Option<ProjectRow>, StoreError> {
        Store::project(self, id).await
    }
    async fn upsert(
        &self,
        id: ProjectId,
        state: ProjectState,
        config: Option<RunConfig>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        Store::upsert(self, id, state, config, now_ms).await
    }
    fn touch(&self, id: ProjectId, now_ms: u64) {
        Store::touch(self, id, now_ms)
    }
    async fn ssh_keys(&self, id: ProjectId) -> Result<Vec<String>, StoreError> {
        Store::ssh_keys(self, id).await
    }
    async fn set_ssh_keys(&self, id: ProjectId, keys: Vec<String>) -> Result<(), StoreError> {
        Store::set_ssh_keys(self, id, keys).await
    }
    async fn report(
        &self,
        id: ProjectId,
        kind: ReportKind,
        state: ProjectState,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        Store::report(self, id, kind, state, now_ms).await
    }
    async fn remove(&self, id: ProjectId, now_ms: u64) -> Result<bool, StoreError> {
        Store::remove(self, id, now_ms).await
    }
    fn enable_outbox(&self, limit: usize) {
        self.outbox.enable(limit)
    }
    async fn outbox_batch(&self, max: usize) -> Result<Vec<Report>, StoreError> {
        self.call(move |c| Ok(outbox_sql::batch(c, max)?)).await
    }
    async fn outbox_ack(&self, seq: u64) -> Result<(), StoreError> {
        self.call(move |c| Ok(outbox_sql::ack(c, seq).map(|_| ())?))
            .await
    }
    async fn outbox_depth(&self) -> Result<u64, StoreError> {
        self.call(|c| Ok(outbox_sql::depth(c)?)).await
    }
    async fn outbox_wait(&self) {
        self.outbox.notify.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ProjectId {
        format!("00000000-0000-4000-8000-0000000000{n:02x}")
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn host_id_is_stable_and_projects_round_trip() {
        let dir = std::env::temp_dir().join(format!("cph-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        let _ = std::fs::remove_file(&path);
        let s = Store::open(&path).unwrap();
        let h = s.host_id().await.unwrap();
        assert_eq!(s.host_id().await.unwrap(), h);

        let cfg = RunConfig {
            memory: Some(64 << 20),
            ..Default::default()
        };
        s.upsert(id(1), ProjectState::Running, Some(cfg.clone()), 1000)
            .await
            .unwrap();
        s.upsert(id(2), ProjectState::Opened, None, 2000)
            .await
            .unwrap();
        s.touch(id(1), 3000);
        s.touch(id(1), 2500); // an older touch never moves time back
        s.upsert(id(1), ProjectState::Opened, None, 1500)
            .await
            .unwrap(); // keeps config
        let rows = s.projects().await.unwrap();
        assert_eq!(
            rows.iter().map(|r| r.id).collect::<Vec<_>>(),
            [id(1), id(2)]
        );
        assert_eq!(rows[0].last_touched, 3000);
        assert_eq!(rows[0].created, 1000);
        assert_eq!(rows[0].state, ProjectState::Opened);
        assert_eq!(rows[0].config, cfg);
        assert_eq!(
            s.project(id(2)).await.unwrap().map(|r| r.created),
            Some(2000)
        );
        assert_eq!(s.project(id(3)).await.unwrap(), None);
        drop(s);

        // reopened: same host id, same rows
        let s = Store::open(&path).unwrap();
        assert_eq!(s.host_id().await.unwrap(), h);
        assert_eq!(s.projects().await.unwrap().len(), 2);

        // SSH keys: replaced as a whole, in order, per project
        assert!(s.ssh_keys(id(1)).await.unwrap().is_empty());
        s.set_ssh_keys(id(1), vec!["b".into(), "a".into(), "c".into()])
            .await
            .unwrap();
        s.set_ssh_keys(id(2), vec!["x".into()]).await.unwrap();
        s.set_ssh_keys(id(1), vec!["c".into(), "a".into()])
            .await
            .unwrap();
        assert_eq!(s.ssh_keys(id(1)).await.unwrap(), ["c", "a"]);
        assert_eq!(s.ssh_keys(id(2)).await.unwrap(), ["x"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
