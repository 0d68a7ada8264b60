//! Idle freeze and idle stop (`domain::idle` has the rules): each project's activity kept in
//! atomics, connections into a project that count their bytes as activity and thaw a frozen
//! project when written to, the loop that samples CPU use and freezes or stops idle projects,
//! and the thaw every way in goes through first (`connect_port`, SSH sessions, start, stop).
//!
//! Freezing races with a connection arriving: the freeze announces itself (`freezing`) and
//! then re-reads the activity counter; a connection bumps the counter and then reads
//! `freezing` (both sequentially consistent). Either the freeze sees the new activity and gives
//! up, or the connection sees the freeze and takes the thaw path (which waits for the project's
//! lock, held by the freeze, and thaws).
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use super::{Error, Host, HostEvent, now_ms};
use crate::domain::idle::{Activity, ActivityStatus, IdleAction, IdlePolicy, cores};
use crate::domain::project::{ProjectId, ProjectState};

/// How often the idle loop looks at the running projects.
pub const TICK: Duration = Duration::from_secs(1);
/// A CPU sample older than this is not paired with the next one.
const SAMPLE_MAX_AGE: Duration = Duration::from_secs(5);

/// One project's activity, shared by its connections, its SSH sessions and the idle loop.
#[derive(Debug)]
pub struct ActivityCell {
    id: ProjectId,
    /// last activity, ms since the epoch
    last_ms: AtomicU64,
    /// bumped by every activity (the freeze's re-check)
    seq: AtomicU64,
    connections: AtomicU32,
    ssh_sessions: AtomicU32,
    /// a freeze is under way or done: a connection takes the thaw path
    freezing: AtomicBool,
    /// bytes went to the frozen project: the thaw loop was told
    thaw_requested: AtomicBool,
    /// an idle freeze or stop of it is running
    acting: AtomicBool,
    /// the last CPU sample found it busy
    cpu_busy: AtomicBool,
    /// the last CPU sample (ns, when)
    cpu_sample: Mutex<Option<(u64, Instant)>>,
    thaw_tx: mpsc::UnboundedSender<ProjectId>,
}

impl ActivityCell {
    fn new(id: ProjectId, thaw_tx: mpsc::UnboundedSender<ProjectId>) -> ActivityCell {
        ActivityCell {
            id,
            last_ms: AtomicU64::new(now_ms()),
            seq: AtomicU64::new(0),
            connections: AtomicU32::new(0),
            ssh_sessions: AtomicU32::new(0),
            freezing: AtomicBool::new(false),
            thaw_requested: AtomicBool::new(false),
            acting: AtomicBool::new(false),
            cpu_busy: AtomicBool::new(false),
            cpu_sample: Mutex::new(None),
            thaw_tx,
        }
    }

    /// Records activity now.
    pub fn bump(&self) {
        self.seq.fetch_add(1, SeqCst);
        self.last_ms.fetch_max(now_ms(), SeqCst);
    }

    /// Bytes went through a connection: activity, and a thaw if the project is frozen (the
    /// bytes wait in the socket's buffer meanwhile).
    fn on_io(&self) {
        self.bump();
        if self.freezing.load(SeqCst) && !self.thaw_requested.swap(true, SeqCst) {
            let _ = self.thaw_tx.send(self.id);
        }
    }

    fn activity(&self, frozen: bool) -> Activity {
        Activity {
            last_active_ms: self.last_ms.load(SeqCst),
            ssh_sessions: self.ssh_sessions.load(SeqCst),
            connections: self.connections.load(SeqCst),
            cpu_busy: self.cpu_busy.load(SeqCst),
            frozen,
        }
    }

    fn sample_cpu(&self, ns: Option<u64>, policy: &IdlePolicy) -> Option<bool> {
        let now = Instant::now();
        let mut s = self.cpu_sample.lock().unwrap_or_else(|p| p.into_inner());
        let prev = s.take();
        let ns = ns?;
        *s = Some((ns, now));
        let (p_ns, p_at) = prev?;
        let wall = now.duration_since(p_at);
        if wall > SAMPLE_MAX_AGE {
            return None;
        }
        Some(cores(p_ns, ns, wall) >= policy.cpu_busy)
    }

    fn forget_cpu(&self) {
        *self.cpu_sample.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.cpu_busy.store(false, SeqCst);
    }
}

/// The project's activity cells (one per project the host has seen up).
#[derive(Debug)]
pub struct Cells {
    map: Mutex<HashMap<ProjectId, Arc<ActivityCell>>>,
    thaw_tx: mpsc::UnboundedSender<ProjectId>,
}

impl Cells {
    /// The cells and the receiver of thaw requests (bytes written to a frozen project).
    pub fn new() -> (Cells, mpsc::UnboundedReceiver<ProjectId>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Cells {
                map: Mutex::new(HashMap::new()),
                thaw_tx: tx,
            },
            rx,
        )
    }

    /// The project's cell (made on first use).
    pub fn get(&self, id: ProjectId) -> Arc<ActivityCell> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(id)
            .or_insert_with(|| Arc::new(ActivityCell::new(id, self.thaw_tx.clone())))
            .clone()
    }

    fn peek(&self, id: ProjectId) -> Option<Arc<ActivityCell>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }
}

/// A connection into a project (`Host::connect_port`): a TCP stream whose bytes count as the
/// project's activity, open as long as it lives (a project is never stopped under an open
/// one), and which asks for a thaw when written to while the project is frozen.
#[derive(Debug)]
pub struct ProjectStream {
    inner: tokio::net::TcpStream,
    cell: Arc<ActivityCell>,
}

impl ProjectStream {
    fn new(inner: tokio::net::TcpStream, cell: Arc<ActivityCell>) -> ProjectStream {
        cell.connections.fetch_add(1, SeqCst);
        ProjectStream { inner, cell }
    }

    /// The TCP stream (its options, addresses).
    pub fn get_ref(&self) -> &tokio::net::TcpStream {
        &self.inner
    }
}

impl Drop for ProjectStream {
    fn drop(&mut self) {
        self.cell.bump();
        self.cell.connections.fetch_sub(1, SeqCst);
    }
}

impl AsyncRead for ProjectStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.cell.on_io();
        }
        r
    }
}

impl AsyncWrite for ProjectStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.cell.on_io();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.cell.on_io();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An SSH session open into a project (`Host::open_session`): while it lives the project is
/// neither frozen nor stopped for being idle.
#[derive(Debug)]
pub struct SessionGuard {
    cell: Arc<ActivityCell>,
}

impl SessionGuard {
    fn new(cell: Arc<ActivityCell>) -> SessionGuard {
        cell.ssh_sessions.fetch_add(1, SeqCst);
        cell.bump();
        SessionGuard { cell }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.cell.bump();
        self.cell.ssh_sessions.fetch_sub(1, SeqCst);
    }
}

impl Host {
    /// The project's idle policy: its run config's overrides over the host's.
    fn idle_policy(&self, id: ProjectId) -> IdlePolicy {
        let own = self
            .read_entries()
            .get(&id)
            .map(|e| e.idle_override)
            .unwrap_or_default();
        self.settings.projects.idle.for_project(own.0, own.1)
    }

    /// Tests: makes the project's last activity `ms` (the idle clock moved by hand).
    #[cfg(test)]
    pub(super) fn idle_since(&self, id: ProjectId, ms: u64) {
        let c = self.cells.get(id);
        c.last_ms.store(ms, SeqCst);
        c.seq.fetch_add(1, SeqCst);
    }

    /// Records activity of the project (an API call that touches it, a start).
    pub(super) fn bump_activity(&self, id: ProjectId) {
        self.cells.get(id).bump();
    }

    /// Wraps a connection into the project (its bytes are activity).
    pub(super) fn project_stream(&self, id: ProjectId, s: tokio::net::TcpStream) -> ProjectStream {
        ProjectStream::new(s, self.cells.get(id))
    }

    /// Thaws the project if it is frozen (or being frozen: waits for that first), recording
    /// activity first so no freeze starts after this returns without seeing it.
    pub(super) async fn thaw_if_frozen(&self, id: ProjectId) -> Result<(), Error> {
        let cell = self.cells.get(id);
        cell.bump();
        if !cell.freezing.load(SeqCst) {
            return Ok(());
        }
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        self.thaw_locked(id).await
    }

    /// Thaws a frozen project; the caller holds its lock.
    pub(super) async fn thaw_locked(&self, id: ProjectId) -> Result<(), Error> {
        let cell = self.cells.get(id);
        if !cell.freezing.load(SeqCst) {
            return Ok(());
        }
        let t0 = Instant::now();
        self.units.thaw(id).await?;
        cell.freezing.store(false, SeqCst);
        cell.thaw_requested.store(false, SeqCst);
        cell.forget_cpu();
        cell.bump();
        self.set_frozen(id, false);
        let took = t0.elapsed();
        self.metrics.thaw(took);
        tracing::info!(project_id = %id, thaw_us = took.as_micros() as u64, "project thawed");
        Ok(())
    }

    /// Records whether the project is frozen, publishing the state change.
    pub(super) fn set_frozen(&self, id: ProjectId, frozen: bool) {
        let changed = {
            let mut map = self.entries();
            let Some(e) = map.get_mut(&id) else { return };
            let before = e.state();
            e.frozen = frozen;
            let after = e.state();
            (before != after).then_some(after)
        };
        if let Some(state) = changed {
            tracing::info!(project_id = %id, state = %state, "project state changed");
            self.emit(HostEvent::State(id, state));
        }
    }

    /// The unit is gone: nothing of it is frozen.
    pub(super) fn forget_frozen(&self, id: ProjectId) {
        if let Some(c) = self.cells.peek(id) {
            c.freezing.store(false, SeqCst);
            c.thaw_requested.store(false, SeqCst);
            c.forget_cpu();
        }
    }

    /// Reconcile: a unit found frozen (by a daemon before this one) is frozen here too.
    pub(super) fn adopt_frozen(&self, id: ProjectId) {
        if self.units.is_frozen(id) == Some(true) {
            self.cells.get(id).freezing.store(true, SeqCst);
            self.set_frozen(id, true);
        }
    }

    /// Freezes the project if it is still idle (nothing happened since `seq` was read).
    async fn idle_freeze(&self, id: ProjectId, seq: u64) {
        let cell = self.cells.get(id);
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        if self.project_state(id) != ProjectState::Running {
            return;
        }
        cell.thaw_requested.store(false, SeqCst);
        cell.freezing.store(true, SeqCst);
        if cell.seq.load(SeqCst) != seq || cell.ssh_sessions.load(SeqCst) > 0 {
            cell.freezing.store(false, SeqCst);
            return;
        }
        let idle = cell.activity(false).idle(now_ms());
        let t0 = Instant::now();
        match self.units.freeze(id).await {
            Ok(()) => {
                cell.forget_cpu();
                self.set_frozen(id, true);
                tracing::info!(
                    project_id = %id,
                    idle_s = idle.as_secs(),
                    freeze_ms = t0.elapsed().as_millis() as u64,
                    "project frozen for being idle"
                );
                // bytes written while it was being frozen: thaw at once
                if cell.thaw_requested.load(SeqCst)
                    && let Err(e) = self.thaw_locked(id).await
                {
                    tracing::warn!(project_id = %id, error = %e, "cannot thaw the project");
                }
            }
            Err(e) => {
                cell.freezing.store(false, SeqCst);
                // not again before another idle period
                cell.bump();
                tracing::warn!(project_id = %id, error = %e, "cannot freeze the idle project");
            }
        }
    }

    /// Stops the project if it is still idle with nothing open into it.
    async fn idle_stop(self: &Arc<Self>, id: ProjectId, seq: u64) {
        let cell = self.cells.get(id);
        let idle = cell.activity(false).idle(now_ms());
        let still_idle = move || {
            cell.seq.load(SeqCst) == seq
                && cell.ssh_sessions.load(SeqCst) == 0
                && cell.connections.load(SeqCst) == 0
        };
        if !still_idle.clone()() {
            return;
        }
        tracing::info!(project_id = %id, idle_s = idle.as_secs(), "stopping the project for being idle");
        if let Err(e) = self.stop_if(id, still_idle).await {
            tracing::warn!(project_id = %id, error = %e, "idle stop failed");
        }
    }

    /// One look at every running project: CPU sampled for those near a deadline, idle ones
    /// frozen or stopped (each on the work tracker, one at a time per project).
    pub(super) async fn idle_tick(self: &Arc<Self>) {
        let now = now_ms();
        let up: Vec<(ProjectId, bool)> = self
            .read_entries()
            .iter()
            .filter(|(_, e)| e.known)
            .filter_map(|(id, e)| match e.state() {
                ProjectState::Running => Some((*id, false)),
                ProjectState::Frozen => Some((*id, true)),
                _ => None,
            })
            .collect();
        for (id, frozen) in up {
            let policy = self.idle_policy(id);
            let Some(deadline) = policy.first_deadline() else {
                continue;
            };
            let cell = self.cells.get(id);
            if cell.acting.load(SeqCst) {
                continue;
            }
            let seq = cell.seq.load(SeqCst);
            let mut a = cell.activity(frozen);
            if !frozen && a.idle(now) >= deadline / 2 {
                // a project is busy when its CPU use between two samples is at the threshold
                match cell.sample_cpu(self.units.cpu_usage_nsec(id).await, &policy) {
                    Some(busy) => {
                        cell.cpu_busy.store(busy, SeqCst);
                        if busy {
                            cell.bump();
                            continue;
                        }
                    }
                    // no pair of samples yet: no decision on a project that may be busy
                    None => continue,
                }
                a = cell.activity(frozen);
            }
            let action = a.decide(&policy, now);
            if action == IdleAction::Keep || cell.acting.swap(true, SeqCst) {
                continue;
            }
            let host = self.clone();
            let c = cell.clone();
            drop(self.tasks.spawn_work(async move {
                match action {
                    IdleAction::Freeze => host.idle_freeze(id, seq).await,
                    IdleAction::Stop => host.idle_stop(id, seq).await,
                    IdleAction::Keep => {}
                }
                c.acting.store(false, SeqCst);
            }));
        }
    }

    /// Why the project counts as active, with its idle timeouts (while its unit is up).
    pub(super) fn activity_status(&self, id: ProjectId, frozen: bool) -> Option<ActivityStatus> {
        let cell = self.cells.peek(id)?;
        let policy = self.idle_policy(id);
        let now = now_ms();
        let a = cell.activity(frozen);
        Some(ActivityStatus {
            last_active_at: a.last_active_ms,
            idle_s: a.idle(now).as_secs(),
            active: a.reasons(&policy, now),
            ssh_sessions: a.ssh_sessions,
            connections: a.connections,
            freeze_after_s: policy.freeze_after.map(|d| d.as_secs()),
            stop_after_s: policy.stop_after.map(|d| d.as_secs()),
        })
    }

    /// Opens an SSH session's hold on the project: thaws it when frozen, starts it when it is
    /// stopped and `autostart` says so (a project this host knows only); while the guard lives
    /// the project is neither frozen nor stopped for being idle.
    pub async fn open_session(
        self: &Arc<Self>,
        id: ProjectId,
        autostart: bool,
    ) -> Result<SessionGuard, Error> {
        let guard = SessionGuard::new(self.cells.get(id));
        self.thaw_if_frozen(id).await?;
        if self.is_running(id) {
            return Ok(guard);
        }
        if !autostart || !self.is_known(id) {
            return Err(Error::ProjectNotRunning(id));
        }
        let st = self.start(id, None).await?;
        if st.state.is_up() {
            Ok(guard)
        } else {
            Err(Error::ProjectNotRunning(id))
        }
    }
}
