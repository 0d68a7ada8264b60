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
