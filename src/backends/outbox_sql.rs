//! The master link's persisted outbox in the SQLite store (`crate::backends::sqlite`): one row
//! per project-state report, written in the same transaction as the state change it reports,
//! deleted when the master acknowledges its sequence number. `AUTOINCREMENT` keeps the sequence
//! increasing across deletes and restarts (the master dedups by it).
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rusqlite::{Connection, Transaction, params};

use crate::domain::master::{Report, ReportKind};
use crate::domain::project::{ProjectId, ProjectState};

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    project TEXT NOT NULL,
    event TEXT NOT NULL,
    state TEXT NOT NULL,
    at INTEGER NOT NULL
);
";

/// Whether reports are kept (only with a `[master]`: a standalone host keeps none) and how
/// many at most; woken on every new report. Shared by every clone of the store.
#[derive(Debug, Default)]
pub struct OutboxSettings {
    /// 0: reports are not kept
    limit: AtomicUsize,
    /// notified after a report is committed
    pub(crate) notify: tokio::sync::Notify,
}

impl OutboxSettings {
    /// Keeps reports, at most `limit` (at least 1).
    pub fn enable(&self, limit: usize) {
        self.limit.store(limit.max(1), Ordering::Relaxed);
    }
    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }
}

/// Appends a report in `tx` when reports are kept, then keeps the outbox within its limit:
/// first the oldest reports of projects that have a newer one are dropped (the newer one says
/// where the project is), then, only if every project has one report left, the oldest.
/// Returns whether a report was appended.
pub(crate) fn append(
    tx: &Transaction<'_>,
    cfg: &Arc<OutboxSettings>,
    id: ProjectId,
    event: ReportKind,
    state: ProjectState,
    now_ms: u64,
) -> rusqlite::Result<bool> {
    let limit = cfg.limit();
    if limit == 0 {
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO outbox(project, event, state, at) VALUES(?1, ?2, ?3, ?4)",
        params![
            id.to_string(),
            event.as_str(),
            state.as_str(),
            now_ms as i64
        ],
    )?;
    let depth: i64 = tx.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?;
    let excess = depth - limit as i64;
    if excess > 0 {
        let coalesced = tx.execute(
            "DELETE FROM outbox WHERE seq IN (
                SELECT o.seq FROM outbox o
                WHERE EXISTS (SELECT 1 FROM outbox n WHERE n.project = o.project AND n.seq > o.seq)
                ORDER BY o.seq LIMIT ?1)",
            [excess],
        )?;
        let left = excess - coalesced as i64;
        let dropped = if left > 0 {
            tx.execute(
                "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?1)",
                [left],
            )?
        } else {
            0
        };
        tracing::warn!(
            limit,
            coalesced,
            dropped,
            "master outbox over its limit (master.outbox_limit): oldest reports coalesced per project"
        );
    }
    Ok(true)
}

/// The oldest `max` reports, in order.
pub(crate) fn batch(c: &mut Connection, max: usize) -> rusqlite::Result<Vec<Report>> {
    let mut st = c.prepare_cached(
        "SELECT seq, project, event, state, at FROM outbox ORDER BY seq LIMIT ?1",
    )?;
    let rows = st.query_map([max as i64], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, i64>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, project, event, state, at) = row?;
        // rows are written only by us; skip anything that no longer parses rather than block
        let (Ok(project_id), Some(event), Ok(state)) = (
            project.parse::<ProjectId>(),
            ReportKind::parse(&event),
            serde_json::from_value::<ProjectState>(serde_json::Value::String(state)),
        ) else {
            continue;
        };
        out.push(Report {
            seq: seq as u64,
            project_id,
            event,
            state,
            at_ms: at.max(0) as u64,
        });
    }
    Ok(out)
}

/// Forgets every report up to `seq` (acknowledged by the master).
pub(crate) fn ack(c: &mut Connection, seq: u64) -> rusqlite::Result<usize> {
    c.execute("DELETE FROM outbox WHERE seq <= ?1", [seq as i64])
}

/// How many reports wait.
pub(crate) fn depth(c: &mut Connection) -> rusqlite::Result<u64> {
    c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0))
        .map(|n| n.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use crate::backends::sqlite::Store;
    use crate::domain::master::ReportKind;
    use crate::domain::project::{ProjectId, ProjectState};
    use crate::ports::Store as _;

    fn id(n: u8) -> ProjectId {
        format!("00000000-0000-4000-8000-0000000000{n:02x}")
            .parse()
            .unwrap()
    }

    fn events(v: &[crate::domain::master::Report]) -> Vec<(u64, ProjectId, ReportKind)> {
        v.iter().map(|r| (r.seq, r.project_id, r.event)).collect()
    }

    #[tokio::test]
    async fn reports_commit_with_their_state_change_survive_a_reopen_and_are_bounded() {
        let dir = std::env::temp_dir().join(format!("cph-outbox-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        let _ = std::fs::remove_file(&path);
        let s = Store::open(&path).unwrap();
        // standalone: nothing is kept
        s.upsert(id(1), ProjectState::Running, None, 1)
            .await
            .unwrap();
        assert_eq!(s.outbox_depth().await.unwrap(), 0);
        s.enable_outbox(4);
        s.upsert(id(1), ProjectState::Opened, None, 2)
            .await
            .unwrap();
        s.upsert(id(1), ProjectState::Opened, None, 3)
            .await
            .unwrap(); // no change: no report
        s.upsert(id(2), ProjectState::Starting, None, 4)
            .await
            .unwrap(); // a step: no report
        s.upsert(id(2), ProjectState::Running, None, 5)
            .await
            .unwrap();
        s.report(id(3), ReportKind::Failed, ProjectState::Opened, 6)
            .await
            .unwrap();
        let q = s.outbox_batch(10).await.unwrap();
        assert_eq!(
            events(&q),
            [
                (1, id(1), ReportKind::Stopped),
                (2, id(2), ReportKind::Started),
                (3, id(3), ReportKind::Failed)
            ]
        );
        drop(s);
        // reopened (a restart): still there, the sequence goes on
        let s = Store::open(&path).unwrap();
        s.enable_outbox(4);
        assert_eq!(s.outbox_depth().await.unwrap(), 3);
        s.outbox_ack(1).await.unwrap();
        assert!(s.remove(id(2), 7).await.unwrap());
        assert!(
            !s.remove(id(2), 8).await.unwrap(),
            "gone: nothing to report"
        );
        assert_eq!(s.project(id(2)).await.unwrap(), None);
        s.upsert(id(1), ProjectState::Running, None, 9)
            .await
            .unwrap();
        s.upsert(id(1), ProjectState::Opened, None, 10)
            .await
            .unwrap(); // 5 waiting: over 4
        let q = s.outbox_batch(10).await.unwrap();
        assert_eq!(
            events(&q),
            [
                (3, id(3), ReportKind::Failed),
                (4, id(2), ReportKind::Removed),
                (5, id(1), ReportKind::Started),
                (6, id(1), ReportKind::Stopped)
            ],
            "the oldest report of a project with a newer one went"
        );
        assert_eq!(events(&s.outbox_batch(1).await.unwrap()).len(), 1);
        s.outbox_ack(6).await.unwrap();
        assert_eq!(s.outbox_depth().await.unwrap(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
