//! Idle freeze and idle stop: what counts as activity, and the pure rules that turn a project's
//! activity into "freeze it", "stop it" or "leave it" (`core::idle` applies them).
//!
//! Activity is: an API call that touches the project, bytes through a connection into it (the
//! proxy's requests and WebSockets, SSH's `-L`), an SSH session being open, and CPU use above
//! [`IdlePolicy::cpu_busy`] cores. A project is frozen after `freeze_after` without activity
//! (never while an SSH session is open, never while its CPU is busy) and stopped after
//! `stop_after` (never while an SSH session or a connection is open).
use std::time::Duration;

use serde::Serialize;

/// Longest idle timeout accepted (host config or a project's run config).
pub const MAX_IDLE: Duration = Duration::from_secs(365 * 86_400);

/// When a project is frozen or stopped for being idle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdlePolicy {
    /// Freeze after this long without activity (`None`: never).
    pub freeze_after: Option<Duration>,
    /// Stop after this long without activity (`None`: never).
    pub stop_after: Option<Duration>,
    /// CPU use (cores, averaged between two samples) at or above which a project is busy.
    pub cpu_busy: f64,
}

impl Default for IdlePolicy {
    fn default() -> Self {
        IdlePolicy {
            freeze_after: None,
            stop_after: None,
            cpu_busy: 0.05,
        }
    }
}

impl IdlePolicy {
    /// The policy of a project: its run config's `idle_freeze`/`idle_stop` (seconds, 0: never)
    /// over the host's.
    pub fn for_project(&self, idle_freeze: Option<u64>, idle_stop: Option<u64>) -> IdlePolicy {
        let pick = |own: Option<u64>, host: Option<Duration>| match own {
            Some(0) => None,
            Some(s) => Some(Duration::from_secs(s)),
            None => host,
        };
        IdlePolicy {
            freeze_after: pick(idle_freeze, self.freeze_after),
            stop_after: pick(idle_stop, self.stop_after),
            cpu_busy: self.cpu_busy,
        }
    }

    /// Whether a project under this policy is ever frozen or stopped.
    pub fn acts(&self) -> bool {
        self.freeze_after.is_some() || self.stop_after.is_some()
    }

    /// The shortest idle time after which something may happen (CPU is sampled from half of it).
    pub fn first_deadline(&self) -> Option<Duration> {
        match (self.freeze_after, self.stop_after) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// A project's activity as the host sees it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Activity {
    /// Last activity (API touch, bytes through a connection, CPU busy, start, thaw), ms since
    /// the epoch.
    pub last_active_ms: u64,
    /// SSH sessions open into the project.
    pub ssh_sessions: u32,
    /// Connections into the project open (proxy, WebSocket tunnels, SSH `-L`).
    pub connections: u32,
    /// Whether its CPU use was at or above the policy's threshold at the last sample.
    pub cpu_busy: bool,
    /// Whether it is frozen now.
    pub frozen: bool,
}

/// What to do with a running project now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleAction {
    /// Nothing.
    Keep,
    /// Freeze it.
    Freeze,
    /// Stop it.
    Stop,
}

/// Why a project counts as active (the status's `activity.active`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// An SSH session is open: never frozen, never stopped.
    SshSession,
    /// A connection is open (a WebSocket, an SSH `-L`): never stopped.
    Connection,
    /// Its CPU is busy: never frozen.
    Cpu,
    /// Something touched it within the freeze (or stop) time.
    Recent,
}

impl Reason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::SshSession => "ssh_session",
            Reason::Connection => "connection",
            Reason::Cpu => "cpu",
            Reason::Recent => "recent",
        }
    }
}

impl Activity {
    /// How long it has been idle at `now_ms`.
    pub fn idle(&self, now_ms: u64) -> Duration {
        Duration::from_millis(now_ms.saturating_sub(self.last_active_ms))
    }

    /// What to do with the (running or frozen) project at `now_ms`.
    pub fn decide(&self, policy: &IdlePolicy, now_ms: u64) -> IdleAction {
        if self.ssh_sessions > 0 {
            return IdleAction::Keep;
        }
        let idle = self.idle(now_ms);
        if let Some(stop) = policy.stop_after
            && idle >= stop
            && self.connections == 0
            && !self.cpu_busy
        {
            return IdleAction::Stop;
        }
        if let Some(freeze) = policy.freeze_after
            && !self.frozen
            && idle >= freeze
            && !self.cpu_busy
        {
            return IdleAction::Freeze;
        }
        IdleAction::Keep
    }

    /// Why the project counts as active now (empty: idle, a candidate for freeze or stop).
    pub fn reasons(&self, policy: &IdlePolicy, now_ms: u64) -> Vec<Reason> {
        let mut r = Vec::new();
        if self.ssh_sessions > 0 {
            r.push(Reason::SshSession);
        }
        if self.connections > 0 {
            r.push(Reason::Connection);
        }
        if self.cpu_busy {
            r.push(Reason::Cpu);
        }
        let idle = self.idle(now_ms);
        if policy.first_deadline().is_none_or(|d| idle < d) {
            r.push(Reason::Recent);
        }
        r
    }
}

/// Why a running project counts as active, and when it would be frozen or stopped (the
/// status's `activity`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActivityStatus {
    /// Its last activity, ms since the epoch.
    pub last_active_at: u64,
    /// Seconds since then.
    pub idle_s: u64,
    /// Why it counts as active now (empty: idle).
    pub active: Vec<Reason>,
    /// SSH sessions open.
    pub ssh_sessions: u32,
    /// Connections open into it (proxy, WebSockets, SSH `-L`).
    pub connections: u32,
    /// Seconds of idleness after which it is frozen (absent: never).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freeze_after_s: Option<u64>,
    /// Seconds of idleness after which it is stopped (absent: never).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_after_s: Option<u64>,
}

/// CPU use in cores between two samples (ns of CPU time, ms of wall time).
pub fn cores(prev_ns: u64, now_ns: u64, wall: Duration) -> f64 {
    if wall.is_zero() {
        return 0.0;
    }
    now_ns.saturating_sub(prev_ns) as f64 / wall.as_nanos() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(freeze: u64, stop: u64) -> IdlePolicy {
        IdlePolicy::default().for_project(Some(freeze), Some(stop))
    }

    #[test]
    fn idle_projects_freeze_then_stop() {
        let p = policy(60, 600);
        let a = Activity {
            last_active_ms: 1_000,
            ..Default::default()
        };
        assert_eq!(a.decide(&p, 1_000 + 59_999), IdleAction::Keep);
        assert_eq!(a.decide(&p, 1_000 + 60_000), IdleAction::Freeze);
        let frozen = Activity { frozen: true, ..a };
        assert_eq!(frozen.decide(&p, 1_000 + 599_999), IdleAction::Keep);
        assert_eq!(frozen.decide(&p, 1_000 + 600_000), IdleAction::Stop);
        // stop comes first when it is due (a stop timeout shorter than the freeze one)
        assert_eq!(a.decide(&policy(600, 60), 61_000), IdleAction::Stop);
    }

    #[test]
    fn ssh_sessions_connections_and_cpu_hold_what_they_must() {
        let p = policy(60, 600);
        let now = 10_000_000;
        let base = Activity::default();
        let ssh = Activity {
            ssh_sessions: 1,
            ..base
        };
        assert_eq!(ssh.decide(&p, now), IdleAction::Keep);
        let conn = Activity {
            connections: 2,
            ..base
        };
        // a connection does not keep a project from freezing (bytes through it thaw it), but it
        // is never stopped under it
        assert_eq!(conn.decide(&p, now), IdleAction::Freeze);
        let conn_frozen = Activity {
            frozen: true,
            ..conn
        };
        assert_eq!(conn_frozen.decide(&p, now), IdleAction::Keep);
        let busy = Activity {
            cpu_busy: true,
            ..base
        };
        assert_eq!(busy.decide(&p, now), IdleAction::Keep);
        assert_eq!(
            ssh.reasons(&p, now),
            [Reason::SshSession],
            "only the session makes it active"
        );
        assert_eq!(
            Activity {
                last_active_ms: now,
                ..conn
            }
            .reasons(&p, now),
            [Reason::Connection, Reason::Recent]
        );
    }

    #[test]
    fn zero_means_never_and_the_host_default_applies_otherwise() {
        let host = IdlePolicy {
            freeze_after: Some(Duration::from_secs(1800)),
            stop_after: None,
            cpu_busy: 0.1,
        };
        let own = host.for_project(Some(0), Some(30));
        assert_eq!(own.freeze_after, None);
        assert_eq!(own.stop_after, Some(Duration::from_secs(30)));
        assert_eq!(own.cpu_busy, 0.1);
        assert_eq!(host.for_project(None, None), host);
        assert!(!IdlePolicy::default().acts());
        let a = Activity::default();
        assert_eq!(a.decide(&IdlePolicy::default(), u64::MAX), IdleAction::Keep);
        assert_eq!(
            a.reasons(&IdlePolicy::default(), u64::MAX),
            [Reason::Recent]
        );
    }

    #[test]
    fn cores_from_two_samples() {
        assert_eq!(cores(0, 1_000_000_000, Duration::from_secs(1)), 1.0);
        assert_eq!(cores(5, 1, Duration::from_secs(1)), 0.0);
        assert_eq!(cores(0, 10, Duration::ZERO), 0.0);
    }
}

#[cfg(test)]
mod config_tests {
    use crate::domain::project::RunConfig;

    #[test]
    fn run_configs_take_seconds_or_durations_and_refuse_the_rest() {
        let c: RunConfig =
            serde_json::from_str(r#"{"idle_freeze":"15m","idle_stop":90}"#).expect("parse");
        assert_eq!((c.idle_freeze, c.idle_stop), (Some(900), Some(90)));
        let c: RunConfig = serde_json::from_str(r#"{"idle_freeze":null}"#).expect("null");
        assert_eq!(c.idle_freeze, None);
        for bad in [
            r#"{"idle_freeze":"soon"}"#,
            r#"{"idle_freeze":-1}"#,
            r#"{"idle_freeze":1.5}"#,
            r#"{"idle_stop":"1 month"}"#,
        ] {
            assert!(serde_json::from_str::<RunConfig>(bad).is_err(), "{bad}");
        }
        let c: RunConfig = serde_json::from_str(r#"{"idle_stop":"400d"}"#).expect("parse");
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "idle_stop");
        // the stored config keeps seconds
        let c: RunConfig = serde_json::from_str(r#"{"idle_freeze":"1m"}"#).expect("parse");
        assert_eq!(serde_json::to_string(&c).unwrap(), r#"{"idle_freeze":60}"#);
    }
}
