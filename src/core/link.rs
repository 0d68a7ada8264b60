//! The link to the fleet's master (`docs/master-protocol.md`): `register` on start and after
//! every failure, a `heartbeat` every `master.heartbeat_interval`, and the outbox's
//! project-state reports sent in sequence order until the master acknowledges them. The reports
//! are queued by the store in the same transaction as the state change they report
//! (`ports::Store::upsert`), so a crash or restart loses none (at-least-once; the master dedups
//! by sequence number). While the master is away the host serves on with what it has, and the
//! link retries with exponential backoff and jitter.
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;

use super::{Host, now_ms};
use crate::api::master::{
    Capacity, Heartbeat, HostView, LinkStatus, Pressure, ProjectStates, Register, RegisterAnswer,
};
use crate::domain::master::LinkState;
use crate::domain::project::ProjectState;
use crate::ports::{Master, MasterError};

/// Most reports sent in one `project-state` message.
pub const BATCH: usize = 100;
/// The first retry's delay.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest delay between retries (less with a shorter heartbeat interval).
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// What the host trusts, as the master may change it: the master's public keys and the revoked
/// token ids (the HTTP adapter's `auth` owns them; the core only passes them on).
#[async_trait]
pub trait Trust: Send + Sync + std::fmt::Debug {
    /// The master public keys (PEM) in force.
    fn public_keys(&self) -> Vec<String>;
    /// Stores and applies what the master's register answer carries.
    async fn apply(&self, answer: &RegisterAnswer) -> Result<(), String>;
}

/// The link's state, shared with the adapters.
#[derive(Debug, Default)]
pub struct Link {
    status: Mutex<LinkStatus>,
    /// homes at their quota as of the last disk refresh (a hit is reported once per crossing)
    at_quota: Mutex<std::collections::HashSet<crate::domain::project::ProjectId>>,
}

impl Link {
    /// The state now.
    pub fn status(&self) -> LinkStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut LinkStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn connected(&self) {
        let was = self.status().state;
        self.update(|s| {
            s.state = LinkState::Connected;
            s.last_error = None;
            s.last_contact_ms = Some(now_ms());
        });
        if was != LinkState::Connected {
            tracing::info!(
                message_id = "3f0c7e5a9b2d4c1e8a6f0b3d5c7e9a21",
                "master link: connected"
            );
        }
    }

    fn offline(&self, what: &str, e: &MasterError) {
        let was = self.status();
        let msg = format!("{what}: {e}");
        if was.state != LinkState::Offline || was.last_error.as_deref() != Some(&msg) {
            tracing::warn!(
                message_id = "a41d2c8e6f3b4b5a9c0d1e2f3a4b5c62",
                error = %msg,
                "master link: offline, serving on and retrying"
            );
        }
        self.update(|s| {
            s.state = LinkState::Offline;
            s.last_error = Some(msg);
        });
    }
}

/// Exponential backoff with jitter: each delay is uniformly random in [cap/2, cap], cap
/// doubling from `BACKOFF_MIN` up to `max`.
#[derive(Debug)]
pub struct Backoff {
    cap: Duration,
    max: Duration,
}

impl Backoff {
    /// From the first delay up to `max`.
    pub fn new(max: Duration) -> Backoff {
        Backoff {
            cap: BACKOFF_MIN,
            max: max.max(BACKOFF_MIN),
        }
    }
    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap;
        self.cap = (self.cap * 2).min(self.max);
        let r = (uuid::Uuid::new_v4().as_u128() % 1_000) as u32;
        cap / 2 + cap / 2 * r / 1_000
    }
    /// After a success.
    pub fn reset(&mut self) {
        self.cap = BACKOFF_MIN;
    }
}

/// What the link learns of the machine (none of it is the core's business otherwise).
fn machine() -> (u64, [f64; 3], u64, u64) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    match nix::sys::sysinfo::sysinfo() {
        Ok(i) => {
            let (a, b, c) = i.load_average();
            (cores, [a, b, c], i.ram_total(), i.ram_unused())
        }
        Err(_) => (cores, [0.0; 3], 0, 0),
    }
}

/// The 10 s "some" average of a PSI file (`/proc/pressure/<what>`, or the root cgroup's when
/// /proc hides it); `None` where the kernel has no PSI.
fn psi(what: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/pressure/{what}"))
        .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/{what}.pressure")))
        .ok()?;
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?
        .parse()
        .ok()
}

impl Host {
    /// A project's state as the host sees it now (`opened` for one it does not know).
    pub fn project_state(&self, id: crate::domain::project::ProjectId) -> ProjectState {
        self.read_entries()
            .get(&id)
            .map_or(ProjectState::Opened, |e| e.state())
    }

    /// Reports the homes that reached their disk quota since the last disk refresh (`usage`),
    /// once per crossing; homes held at their usage by the storage reserve are not hits.
    pub(super) async fn note_quota_hits(
        &self,
        usage: &std::collections::HashMap<crate::domain::project::ProjectId, crate::ports::Usage>,
        held: &std::collections::HashSet<crate::domain::project::ProjectId>,
    ) {
        let Some(link) = self.link.get() else { return };
        let mut hits = Vec::new();
        {
            let mut at = link.at_quota.lock().unwrap_or_else(|p| p.into_inner());
            for (id, u) in usage {
                let Some(q) = u.quota else {
                    at.remove(id);
                    continue;
                };
                // btrfs refuses a write that would cross the limit: "at" it is within 1% (1 MiB
                // at least); back below 95% it may hit again
                let slack = (q / 100).max(1 << 20);
                if u.used.saturating_add(slack) >= q {
                    if !held.contains(id) && at.insert(*id) {
                        hits.push(*id);
                    }
                } else if u.used < q / 100 * 95 {
                    at.remove(id);
                }
            }
        }
        for id in hits {
            let state = self.project_state(id);
            tracing::info!(project_id = %id, "project home at its disk quota");
            if let Err(e) = self
                .store
                .report(
                    id,
                    crate::domain::master::ReportKind::Quota,
                    state,
                    now_ms(),
                )
                .await
            {
                tracing::warn!(project_id = %id, error = %e, "cannot queue the quota report");
            }
        }
    }

    /// The master link's state (standalone when no link runs).
    pub fn link_status(&self) -> LinkStatus {
        self.link.get().map(|l| l.status()).unwrap_or_default()
    }

    /// What the host has: cores, memory, the project storage's size and free space.
    pub fn capacity(&self) -> Capacity {
        let (cores, _, memory, _) = machine();
        let space = self.storage.space().ok();
        Capacity {
            cores,
            memory_bytes: memory,
            disk_total_bytes: space.map_or(0, |s| s.total),
            disk_free_bytes: space.map_or(0, |s| s.available),
        }
    }

    /// `GET /host`.
    pub fn host_view(&self) -> HostView {
        HostView {
            host_id: self.host_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            capacity: self.capacity(),
            running: self.running_count() as u64,
            known: self.list().len() as u64,
            master: self.link_status(),
            // TODO(merge): the SSH gateway's host key (the SSH helper's function fills it)
            ssh_host_key: None,
        }
    }

    /// The `register` message.
    pub fn register_message(
        &self,
        session_id: &str,
        boot_id: &str,
        public_keys: Vec<String>,
    ) -> Register {
        let m = &self.settings.master;
        Register {
            host_id: self.host_id.clone(),
            session_id: session_id.into(),
            boot_id: boot_id.into(),
            name: m.name.clone().unwrap_or_else(|| self.host_id.clone()),
            region: m.region.clone(),
            public_url: m.public_url.clone(),
            ssh_endpoint: m.ssh_endpoint.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            capacity: self.capacity(),
            public_keys,
            // TODO(merge): the SSH gateway's host key
            ssh_host_key: None,
            sent_at_ms: now_ms(),
        }
    }

    /// The `heartbeat` message.
    pub fn heartbeat_message(&self, session_id: &str, outbox_depth: u64) -> Heartbeat {
        let (_, load, total, unused) = machine();
        Heartbeat {
            host_id: self.host_id.clone(),
            session_id: session_id.into(),
            running: self.running_count() as u64,
            known: self.list().len() as u64,
            load,
            memory_total_bytes: total,
            memory_available_bytes: unused,
            pressure: Pressure {
                cpu: psi("cpu"),
                memory: psi("memory"),
                io: psi("io"),
            },
            disk_free_bytes: self.storage.space().map_or(0, |s| s.available),
            outbox_depth,
            sent_at_ms: now_ms(),
        }
    }

    /// Starts the master link (once; the store's outbox must be on already, before the host
    /// was built, so reconcile's changes are queued too). Runs until shutdown.
    pub fn start_link(self: &Arc<Self>, master: Arc<dyn Master>, trust: Arc<dyn Trust>) {
        let link = Arc::new(Link::default());
        link.update(|s| {
            s.state = LinkState::Connecting;
            s.url = self.settings.master.url.clone();
        });
        if self.link.set(link.clone()).is_err() {
            return;
        }
        let host = Arc::downgrade(self);
        self.tasks.spawn_loop("master link", async move {
            run(host, link, master, trust).await;
        });
        self.spawn_recorder();
    }

    /// Records in the store the changes no call of the host made (a project that ended or
    /// failed on its own, one started outside the host), so that they are reported too: the
    /// store's upsert queues the report in the same transaction. A project whose lock is held
    /// is skipped: the start, stop or delete in progress records its own outcome.
    fn spawn_recorder(self: &Arc<Self>) {
        let mut events = self.changes.subscribe();
        let host = Arc::downgrade(self);
        self.tasks.spawn_loop("state recorder", async move {
            loop {
                let id = match events.recv().await {
                    Ok(super::HostEvent::State(id, _)) => id,
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "state recorder: missed unit changes");
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let Some(h) = host.upgrade() else { return };
                if !h.is_known(id) {
                    continue;
                }
                let lock = h.lock(id);
                let Ok(_guard) = lock.try_lock() else {
                    continue;
                };
                // the state now, not the event's: a late event never writes an old state
                let state = h.project_state(id);
                if matches!(state, ProjectState::Running | ProjectState::Opened)
                    && let Err(e) = h.store.upsert(id, state, None, now_ms()).await
                {
                    tracing::warn!(project_id = %id, error = %e, "state recorder: cannot record a change");
                }
            }
        });
    }
}

/// The kernel's boot id: from systemd (`%b` in the unit, as /proc/sys is hidden from the
/// daemon), else from /proc.
fn boot_id() -> String {
    std::env::var("COCALC_BOOT_ID")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

async fn run(host: Weak<Host>, link: Arc<Link>, master: Arc<dyn Master>, trust: Arc<dyn Trust>) {
    let session_id = uuid::Uuid::new_v4().hyphenated().to_string();
    let boot = boot_id();
    let Some(h) = host.upgrade() else { return };
    let interval = h.settings.master.heartbeat_interval;
    let store = h.store.clone();
    drop(h);
    let mut backoff = Backoff::new(BACKOFF_MAX.min(interval * 2));
    loop {
        let Some(h) = host.upgrade() else { return };
        if let Ok(d) = store.outbox_depth().await {
            link.update(|s| s.outbox_depth = d);
        }
        let msg = h.register_message(&session_id, &boot, trust.public_keys());
        drop(h);
        match master.register(&msg).await {
            Ok(answer) => {
                if let Err(e) = trust.apply(&answer).await {
                    tracing::warn!(error = %e, "master link: cannot apply the master's keys or revocations");
                }
                link.connected();
                backoff.reset();
                let e = session(&host, &link, &*master, &session_id, interval).await;
                if let Some((what, e)) = e {
                    link.offline(what, &e);
                } else {
                    return;
                }
            }
            Err(e) => link.offline("register", &e),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// One registered session: reports and heartbeats until a call fails (the failure) or the host
/// is gone (`None`).
async fn session(
    host: &Weak<Host>,
    link: &Link,
    master: &dyn Master,
    session_id: &str,
    interval: Duration,
) -> Option<(&'static str, MasterError)> {
    let mut next_beat = tokio::time::Instant::now();
    loop {
        let h = host.upgrade()?;
        let store = h.store.clone();
        loop {
            let batch = match store.outbox_batch(BATCH).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "master link: cannot read the outbox");
                    break;
                }
            };
            let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
                break;
            };
            let (first, last) = (first.seq, last.seq);
            let msg = ProjectStates {
                host_id: h.host_id.clone(),
                session_id: session_id.into(),
                reports: batch,
            };
            match master.report(&msg).await {
                Ok(a) if a.acked >= first => {
                    if let Err(e) = store.outbox_ack(a.acked.min(last)).await {
                        tracing::warn!(error = %e, "master link: cannot forget acknowledged reports");
                        break;
                    }
                    link.update(|s| s.last_contact_ms = Some(now_ms()));
                }
                Ok(a) => {
                    return Some((
                        "project-state",
                        MasterError::Refused {
                            status: 200,
                            message: format!(
                                "acknowledged {} of reports {first}..={last}",
                                a.acked
                            ),
                        },
                    ));
                }
                Err(e) => return Some(("project-state", e)),
            }
        }
        let depth = store.outbox_depth().await.unwrap_or(0);
        link.update(|s| s.outbox_depth = depth);
        if tokio::time::Instant::now() >= next_beat {
            let msg = h.heartbeat_message(session_id, depth);
            if let Err(e) = master.heartbeat(&msg).await {
                return Some(("heartbeat", e));
            }
            link.update(|s| s.last_contact_ms = Some(now_ms()));
            next_beat = tokio::time::Instant::now() + interval;
        }
        drop(h);
        tokio::select! {
            () = store.outbox_wait() => {}
            () = tokio::time::sleep_until(next_beat) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(8));
        for cap in [1, 2, 4, 8, 8, 8] {
            let d = b.next_delay();
            let cap = Duration::from_secs(cap);
            assert!(
                d >= cap / 2 && d <= cap,
                "{d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
        // never below the first delay, whatever the heartbeat
        let mut b = Backoff::new(Duration::ZERO);
        assert!(b.next_delay() <= Duration::from_secs(1));
        assert!(b.next_delay() >= Duration::from_millis(500));
    }

    #[test]
    fn psi_lines_are_read_when_the_kernel_has_them() {
        // on a kernel without PSI (or a sandbox hiding it) this is None, never a panic
        if let Some(v) = psi("cpu") {
            assert!(v >= 0.0);
        }
        assert_eq!(psi("no-such-resource"), None);
    }
}
