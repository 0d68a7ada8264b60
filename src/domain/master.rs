//! The master link's vocabulary: what a project-state report says, and the link's state.
use serde::{Deserialize, Serialize};

use super::project::{ProjectId, ProjectState};

/// What happened to a project, as reported to the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportKind {
    /// It runs (it did not a moment ago).
    Started,
    /// It no longer runs (stopped by a call, or ended on its own).
    Stopped,
    /// A start failed; nothing of it runs.
    Failed,
    /// It was deleted from this host (`DELETE /projects/:id`).
    Removed,
    /// Its home reached its disk quota (writes fail until it shrinks or the quota grows).
    Quota,
}

impl ReportKind {
    /// The lowercase name used on the wire and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            ReportKind::Started => "started",
            ReportKind::Stopped => "stopped",
            ReportKind::Failed => "failed",
            ReportKind::Removed => "removed",
            ReportKind::Quota => "quota",
        }
    }
    /// The inverse of [`ReportKind::as_str`].
    pub fn parse(s: &str) -> Option<ReportKind> {
        [
            ReportKind::Started,
            ReportKind::Stopped,
            ReportKind::Failed,
            ReportKind::Removed,
            ReportKind::Quota,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// The report a recorded state change makes (`before`: the stored state, `None` for a new
    /// row): reaching `running` is a start, leaving it (or a start or stop in progress) for
    /// `opened` is a stop; the steps in between are not reported.
    pub fn of_change(before: Option<ProjectState>, after: ProjectState) -> Option<ReportKind> {
        match (before, after) {
            (Some(ProjectState::Running), ProjectState::Running) => None,
            (_, ProjectState::Running) => Some(ReportKind::Started),
            (
                Some(ProjectState::Running | ProjectState::Starting | ProjectState::Stopping),
                ProjectState::Opened,
            ) => Some(ReportKind::Stopped),
            _ => None,
        }
    }
}

/// One project-state report waiting in the outbox (or sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Per-host sequence number: increasing, never reused (the master dedups by it).
    pub seq: u64,
    /// The project.
    pub project_id: ProjectId,
    /// What happened.
    pub event: ReportKind,
    /// The state the host recorded with it.
    pub state: ProjectState,
    /// When (ms since the epoch).
    pub at_ms: u64,
}

/// Keeps `queue` (in sequence order) within `limit` as the store does: first the oldest reports
/// of projects that have a newer one go, then, if still over, the oldest. (coalesced, dropped).
pub fn bound(queue: &mut Vec<Report>, limit: usize) -> (usize, usize) {
    let mut excess = queue.len().saturating_sub(limit);
    let mut coalesced = 0;
    let mut i = 0;
    while excess > 0 && i < queue.len() {
        let p = queue[i].project_id;
        if queue[i + 1..].iter().any(|r| r.project_id == p) {
            queue.remove(i);
            excess -= 1;
            coalesced += 1;
        } else {
            i += 1;
        }
    }
    queue.drain(..excess);
    (coalesced, excess)
}

/// The state of the link to the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    /// No `[master]` configured, or no credential: the host runs on its own.
    #[default]
    Standalone,
    /// Registering (first contact, or after a failure).
    Connecting,
    /// Registered; heartbeats and reports go through.
    Connected,
    /// The master could not be reached or refused; retrying with backoff.
    Offline,
}

impl LinkState {
    /// The lowercase name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Standalone => "standalone",
            LinkState::Connecting => "connecting",
            LinkState::Connected => "connected",
            LinkState::Offline => "offline",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProjectState::*;

    #[test]
    fn only_reaching_running_and_leaving_it_are_reported() {
        assert_eq!(
            ReportKind::of_change(None, Running),
            Some(ReportKind::Started)
        );
        assert_eq!(
            ReportKind::of_change(Some(Opened), Running),
            Some(ReportKind::Started)
        );
        assert_eq!(
            ReportKind::of_change(Some(Starting), Running),
            Some(ReportKind::Started)
        );
        assert_eq!(ReportKind::of_change(Some(Running), Running), None);
        assert_eq!(
            ReportKind::of_change(Some(Running), Opened),
            Some(ReportKind::Stopped)
        );
        assert_eq!(
            ReportKind::of_change(Some(Stopping), Opened),
            Some(ReportKind::Stopped)
        );
        assert_eq!(ReportKind::of_change(Some(Opened), Opened), None);
        assert_eq!(ReportKind::of_change(None, Opened), None);
        assert_eq!(ReportKind::of_change(Some(Opened), Starting), None);
        for k in ["started", "stopped", "failed", "removed", "quota"] {
            assert_eq!(ReportKind::parse(k).map(ReportKind::as_str), Some(k));
        }
        assert_eq!(ReportKind::parse("x"), None);
    }

    #[test]
    fn over_the_limit_the_oldest_of_a_project_with_a_newer_one_go_first() {
        let a: ProjectId = "00000000-0000-4000-8000-00000000000a".parse().unwrap();
        let b: ProjectId = "00000000-0000-4000-8000-00000000000b".parse().unwrap();
        let r = |seq, project_id, event| Report {
            seq,
            project_id,
            event,
            state: Opened,
            at_ms: seq,
        };
        let mut q = vec![
            r(1, b, ReportKind::Started),
            r(2, a, ReportKind::Started),
            r(3, a, ReportKind::Stopped),
            r(4, b, ReportKind::Stopped),
            r(5, a, ReportKind::Started),
        ];
        assert_eq!(bound(&mut q, 5), (0, 0));
        assert_eq!(bound(&mut q, 3), (2, 0));
        assert_eq!(q.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(bound(&mut q, 1), (1, 1));
        assert_eq!(q.iter().map(|r| r.seq).collect::<Vec<_>>(), [5]);
    }
}
