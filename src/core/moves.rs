//! Moving a project to another host (docs/moves.md). The source runs a move as a tracked
//! operation ([`Host::start_move`], [`Host::operation`], [`Host::cancel_operation`]): while the
//! project keeps running it sends its snapshots (in order, each incremental to the one before)
//! and a read-only snapshot of its live home (the pre-copy), then stops it, sends only the final
//! incremental delta, and deletes its copy only once the target answered that the project is
//! placed. Each subvolume travels in its own stream, bound to the move and its place in it
//! (`domain::moves`), so an interrupted move is resumed from what the target holds (nothing it
//! holds is sent again) or cancelled, which cleans both hosts. Any failure leaves the source
//! whole (and running again if it ran). The target ([`Host::receive_move`]) spools each
//! stream, checks its MAC and its place, receives it confined in the move's staging area,
//! checks it holds exactly what was announced, and on the final stream places the project and
//! records it; anything else is deleted and the stream refused.
use std::collections::HashMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::Mac as _;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{Error, Host, now_ms};
use crate::domain::moves::{self, Manifest, MoveId, TargetState, live_name};
use crate::domain::project::{ProjectId, ProjectState, RunConfig};
use crate::ports::Helper;

/// How long a state query or an abort waits for a stream of the same move being received.
const BUSY_WAIT: Duration = Duration::from_secs(600);

/// Where a move is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// sending the snapshots and a snapshot of the live state while the project runs
    Precopy,
    /// stopping the project (when it runs)
    Stopping,
    /// sending the final delta (the project is stopped)
    Sending,
    /// the target checks and places the project
    Importing,
    /// the target confirmed; deleting the source's copy
    DeletingSource,
    /// done: the project lives on the target only
    Done,
    /// failed or cancelled: the project is whole on the source
    Failed,
}

/// What a caller sees of an operation (`GET /operations/:op`).
#[derive(Debug, Clone, Serialize)]
pub struct OperationView {
    /// the operation (= the move id)
    pub op: String,
    /// always `move` for now
    pub kind: &'static str,
    /// the project
    pub project_id: String,
    /// the target's URL
    pub target: String,
    /// where it is
    pub phase: Phase,
    /// bytes of the streams sent so far (this attempt)
    pub bytes_sent: u64,
    /// of those, bytes sent after the stop (the final delta)
    pub final_bytes: u64,
    /// average bytes per second since the start (this attempt)
    pub rate: u64,
    /// subvolumes sent whole to the target (this attempt)
    pub sent: Vec<String>,
    /// subvolumes the target already held from an earlier attempt (not sent again)
    pub skipped: Vec<String>,
    /// milliseconds the project was not running (stop → running on the target), once known
    pub downtime_ms: Option<u64>,
    /// why it failed
    pub error: Option<String>,
    /// a failed move that `POST /projects/:id/move` to the same target resumes
    pub resumable: bool,
}

#[derive(Debug)]
struct Op {
    project: ProjectId,
    target: String,
    token: String,
    sender: Arc<dyn Sender>,
    phase: Mutex<Phase>,
    bytes: AtomicU64,
    final_bytes: AtomicU64,
    started: Instant,
    sent: Mutex<Vec<String>>,
    skipped: Mutex<Vec<String>>,
    downtime_ms: Mutex<Option<u64>>,
    error: Mutex<Option<String>>,
    resumable: AtomicBool,
    cancel: CancellationToken,
    /// whether the body of a stream is being sent (the stall watchdog looks then only)
    in_body: AtomicBool,
    /// set once the final stream went out: whether the target placed it may be unknown
    final_sent: AtomicBool,
}

/// The host's move operations (kept in memory; a daemon restart ends a move: the source still
/// has everything, the target keeps what it received until the move is cancelled there).
#[derive(Debug, Default)]
pub struct Moves {
    ops: Mutex<HashMap<MoveId, Arc<Op>>>,
    /// target: one stream (or state query, or abort) of a move at a time
    receiving: Mutex<HashMap<MoveId, Arc<tokio::sync::Mutex<()>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Op {
    fn set(&self, p: Phase) {
        *lock(&self.phase) = p;
    }
    fn active(&self) -> bool {
        !matches!(
            *lock(&self.phase),
            Phase::DeletingSource | Phase::Done | Phase::Failed
        )
    }
    fn view(&self, mv: MoveId) -> OperationView {
        let bytes = self.bytes.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        OperationView {
            op: mv.to_string(),
            kind: "move",
            project_id: self.project.to_string(),
            target: self.target.clone(),
            phase: *lock(&self.phase),
            bytes_sent: bytes,
            final_bytes: self.final_bytes.load(Ordering::Relaxed),
            rate: (bytes as f64 / secs) as u64,
            sent: lock(&self.sent).clone(),
            skipped: lock(&self.skipped).clone(),
            downtime_ms: *lock(&self.downtime_ms),
            error: lock(&self.error).clone(),
            resumable: self.resumable.load(Ordering::Relaxed),
        }
    }
}

/// Where and how a move sends its streams (the adapter opens the connections).
#[async_trait::async_trait]
pub trait Sender: Send + Sync + std::fmt::Debug {
    /// POSTs one stream read from `body` (ends when the sender drops) to the target's receive
    /// endpoint for `id` and `mv` with the bearer `token`; Ok when the target answered 2xx, the
    /// error says what it answered otherwise.
    async fn send(
        &self,
        id: ProjectId,
        mv: MoveId,
        token: &str,
        body: tokio::sync::mpsc::Receiver<Vec<u8>>,
    ) -> Result<(), String>;
    /// What the target holds of the move (`GET` on the same endpoint).
    async fn state(&self, id: ProjectId, mv: MoveId, token: &str) -> Result<TargetState, String>;
    /// Cancels the move on the target: it deletes what it received (`DELETE`).
    async fn abort(&self, id: ProjectId, mv: MoveId, token: &str) -> Result<(), String>;
}

/// What the source was asked.
#[derive(Debug, Clone)]
pub struct MoveRequest {
    /// the target's base URL (for the view)
    pub target: String,
    /// the move token for the target (`aud` = target host, action `move`)
    pub token: String,
    /// whether the target starts the project
    pub start: bool,
}

/// What the target answers to a stream.
#[derive(Debug, Clone, Serialize)]
pub struct Received {
    /// the project
    pub project_id: String,
    /// the move
    pub move_id: String,
    /// the stream's sequence number
    pub seq: u64,
    /// the subvolume it carried
    pub name: String,
    /// every subvolume of the move received so far, in order
    pub received: Vec<String>,
    /// the snapshots placed, oldest first (the final stream)
    pub snapshots: Vec<String>,
    /// stream bytes received
    pub bytes: u64,
    /// whether the project is placed (the final stream)
    pub placed: bool,
    /// whether it was started
    pub started: bool,
}

/// What a cancel says: `cancelled`, or that the target could not be told (what it received of
/// the move then stays until the move is cancelled there).
fn cancel_outcome(abort: Result<(), String>) -> String {
    match abort {
        Ok(()) => "cancelled".into(),
        Err(e) => {
            tracing::warn!(error = %e, "the target did not cancel the move");
            format!(
                "cancelled here; the target was not told ({e}): what it received stays until the move is cancelled there"
            )
        }
    }
}

/// What every stream of one attempt of a move shares.
struct Run<'a> {
    id: ProjectId,
    mv: MoveId,
    req: &'a MoveRequest,
    op: &'a Arc<Op>,
    sender: &'a Arc<dyn Sender>,
    config: RunConfig,
}

/// The chain of subvolumes a move sends: each stream incremental to the one before.
struct Chain<'a> {
    run: Run<'a>,
    /// what the target holds, in order
    held: Vec<String>,
    /// the newest subvolume the target holds (the next stream's parent)
    parent: Option<String>,
    /// the next stream's sequence number
    seq: u64,
}

/// A stream of a move the source is about to send.
struct Stream<'a> {
    seq: u64,
    name: &'a str,
    parent: Option<&'a str>,
    /// the final stream: the snapshots the target places
    last: Option<Vec<String>>,
}

impl Host {
    /// Whether a move holds the project's snapshots (a delete must not race a send).
    pub(super) fn moving(&self, id: ProjectId) -> bool {
        lock(&self.moves.ops)
            .values()
            .any(|o| o.project == id && o.active())
    }

    fn op(&self, op: &str) -> Result<(MoveId, Arc<Op>), Error> {
        let mv: MoveId = op
            .parse()
            .map_err(|_| Error::NoSuchOperation(op.chars().take(64).collect()))?;
        let o = lock(&self.moves.ops)
            .get(&mv)
            .cloned()
            .ok_or_else(|| Error::NoSuchOperation(op.to_string()))?;
        Ok((mv, o))
    }

    /// The view of an operation.
    pub fn operation(&self, op: &str) -> Result<OperationView, Error> {
        self.op(op).map(|(mv, o)| o.view(mv))
    }

    /// Cancels an operation: a running move stops and, like a failed one that could be resumed,
    /// is cancelled on the target too (it deletes what it received); the source deletes its
    /// live-state snapshots. A finished move is left as it is. Its view.
    pub async fn cancel_operation(&self, op: &str) -> Result<OperationView, Error> {
        let (mv, o) = self.op(op)?;
        if o.active() {
            o.cancel.cancel();
            // the task cleans both sides once the send has stopped
            let t = Instant::now();
            while o.active() && t.elapsed() < Duration::from_secs(30) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            return Ok(o.view(mv));
        }
        if o.resumable.swap(false, Ordering::Relaxed) {
            // cancelled here whatever the target says: a target gone for good must not keep the
            // project from moving elsewhere
            *lock(&o.error) = Some(cancel_outcome(
                o.sender.abort(o.project, mv, &o.token).await,
            ));
            self.storage.drop_move_snapshots(o.project, mv, None).await;
        }
        Ok(o.view(mv))
    }

    /// Starts moving the project to another host; the operation's view (it runs on). A failed,
    /// resumable move of the project to the same target is resumed (same operation id); one to
    /// another target must be cancelled first.
    pub async fn start_move(
        self: &Arc<Self>,
        id: ProjectId,
        req: MoveRequest,
        sender: Arc<dyn Sender>,
    ) -> Result<OperationView, Error> {
        if !self.storage.has_home(id) {
            return Err(Error::NoSuchProject(id));
        }
        let (mv, op) = {
            let mut ops = lock(&self.moves.ops);
            if ops.values().any(|o| o.project == id && o.active()) {
                return Err(Error::MoveRejected(format!(
                    "project {id} is already being moved"
                )));
            }
            let earlier = ops
                .iter()
                .find(|(_, o)| o.project == id && o.resumable.load(Ordering::Relaxed))
                .map(|(mv, o)| (*mv, o.target.clone()));
            let mv = match earlier {
                Some((mv, t)) if t == req.target => mv,
                Some((mv, t)) => {
                    return Err(Error::MoveRejected(format!(
                        "project {id} has an interrupted move to {t} (operation {mv}): resume it (the same target) or cancel it first (DELETE /operations/{mv})"
                    )));
                }
                None => MoveId::new(),
            };
            let op = Arc::new(Op {
                project: id,
                target: req.target.clone(),
                token: req.token.clone(),
                sender: sender.clone(),
                phase: Mutex::new(Phase::Precopy),
                bytes: AtomicU64::new(0),
                final_bytes: AtomicU64::new(0),
                started: Instant::now(),
                sent: Mutex::new(Vec::new()),
                skipped: Mutex::new(Vec::new()),
                downtime_ms: Mutex::new(None),
                error: Mutex::new(None),
                resumable: AtomicBool::new(false),
                cancel: CancellationToken::new(),
                in_body: AtomicBool::new(false),
                final_sent: AtomicBool::new(false),
            });
            ops.insert(mv, op.clone());
            (mv, op)
        };
        let host = self.clone();
        let o = op.clone();
        drop(self.tasks.spawn_work(async move {
            let was_running = host.status(id).state.is_up();
            let r = tokio::select! {
                r = host.run_move(id, mv, &req, &o, &sender) => r,
                () = o.cancel.cancelled() => Err("cancelled".to_string()),
            };
            o.in_body.store(false, Ordering::Relaxed);
            let r = match r {
                Err(e) if o.final_sent.load(Ordering::Relaxed) => {
                    host.settle_final(id, mv, &req, &o, &sender, e).await
                }
                r => r.map_err(|e| (e, false)),
            };
            match r {
                Ok(()) => {
                    tracing::info!(project_id = %id, move_id = %mv, bytes = o.bytes.load(Ordering::Relaxed), downtime_ms = ?*lock(&o.downtime_ms), "project moved to {}", o.target);
                    o.set(Phase::Done);
                }
                Err((e, unknown)) => {
                    let cancelled = o.cancel.is_cancelled();
                    tracing::warn!(project_id = %id, move_id = %mv, error = %e, "move failed; the project stays here");
                    let e = if cancelled {
                        // cancel cleans both sides
                        host.storage.drop_move_snapshots(id, mv, None).await;
                        cancel_outcome(sender.abort(id, mv, &req.token).await)
                    } else {
                        // keep the newest live snapshot the target holds: a resume sends from it
                        let keep = lock(&o.sent)
                            .iter()
                            .rev()
                            .find(|n| moves::is_live_name(&mv, n))
                            .cloned();
                        host.storage
                            .drop_move_snapshots(id, mv, keep.as_deref())
                            .await;
                        e
                    };
                    o.resumable.store(!cancelled, Ordering::Relaxed);
                    *lock(&o.error) = Some(e);
                    o.set(Phase::Failed);
                    if was_running
                        && !unknown
                        && !host.status(id).state.is_up()
                        && let Err(e) = host.start(id, None).await
                    {
                        tracing::warn!(project_id = %id, error = %e, "cannot start the project again after a failed move");
                    }
                }
            }
        }));
        Ok(op.view(mv))
    }

    /// The final stream failed (`e`): whether the target placed the project anyway (the answer
    /// may be what was lost) decides between finishing the move and failing it. When the target
    /// cannot tell, the move fails with the project started nowhere here (`(e, true)`): a
    /// resume or a cancel settles it.
    async fn settle_final(
        self: &Arc<Self>,
        id: ProjectId,
        mv: MoveId,
        req: &MoveRequest,
        op: &Arc<Op>,
        sender: &Arc<dyn Sender>,
        e: String,
    ) -> Result<(), (String, bool)> {
        let mut last = String::new();
        for _ in 0..5 {
            match sender.state(id, mv, &req.token).await {
                Ok(st) if st.placed => {
                    op.set(Phase::DeletingSource);
                    return self.remove(id).await.map(|_| ()).map_err(|e| {
                        (
                            format!("moved, but deleting the source's copy failed: {e}"),
                            true,
                        )
                    });
                }
                Ok(_) => return Err((e, false)),
                Err(err) => last = err,
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Err((
            format!(
                "{e}; the target cannot tell whether it placed the project ({last}): not started again here; resume or cancel the move to settle it"
            ),
            true,
        ))
    }

    async fn run_move(
        self: &Arc<Self>,
        id: ProjectId,
        mv: MoveId,
        req: &MoveRequest,
        op: &Arc<Op>,
        sender: &Arc<dyn Sender>,
    ) -> Result<(), String> {
        let config = self.stored_config(id).await.map_err(|e| e.to_string())?;
        let st = sender
            .state(id, mv, &req.token)
            .await
            .map_err(|e| format!("the target refused the move: {e}"))?;
        if st.placed {
            // a resume of a move whose final answer was lost: the target has the project
            op.set(Phase::DeletingSource);
            return self
                .remove(id)
                .await
                .map(|_| ())
                .map_err(|e| format!("moved, but deleting the source's copy failed: {e}"));
        }
        *lock(&op.skipped) = st.received.clone();
        let storage = self.storage.clone();
        let snaps = self.snapshot_names(id).await?;
        let (todo, parent) =
            moves::plan(&snaps, &st.received, |n| storage.has_move_subvolume(id, n));
        let mut chain = Chain {
            run: Run {
                id,
                mv,
                req,
                op,
                sender,
                config,
            },
            held: st.received,
            parent,
            seq: st.last_seq + 1,
        };
        let running = self.status(id).state.is_up();
        op.set(if running {
            Phase::Precopy
        } else {
            Phase::Sending
        });
        for s in &todo {
            self.push(&mut chain, s, None).await?;
        }
        if running {
            // the live state while it keeps running: the bulk of what changed since the newest
            // snapshot goes now, not during the downtime
            let name = live_name(&mv, chain.seq);
            self.storage.move_snapshot(id, &name).await?;
            self.push(&mut chain, &name, None).await?;
            self.storage.drop_move_snapshots(id, mv, Some(&name)).await;
        }
        op.set(Phase::Stopping);
        let stopped_at = Instant::now();
        self.stop(id, false).await.map_err(|e| e.to_string())?;
        op.set(Phase::Sending);
        let bytes_at_stop = op.bytes.load(Ordering::Relaxed);
        // snapshots taken during the pre-copy go now (small: incremental)
        let snaps = self.snapshot_names(id).await?;
        let (todo, _) = moves::plan(&snaps, &chain.held, |_| true);
        for s in &todo {
            self.push(&mut chain, s, None).await?;
        }
        let name = live_name(&mv, chain.seq);
        self.storage.move_snapshot(id, &name).await?;
        op.final_sent.store(true, Ordering::Relaxed);
        self.push(&mut chain, &name, Some(snaps)).await?;
        op.final_bytes.store(
            op.bytes.load(Ordering::Relaxed) - bytes_at_stop,
            Ordering::Relaxed,
        );
        *lock(&op.downtime_ms) = req.start.then(|| stopped_at.elapsed().as_millis() as u64);
        // the target has it whole: only now is the source's copy deleted
        op.set(Phase::DeletingSource);
        self.remove(id)
            .await
            .map_err(|e| format!("moved, but deleting the source's copy failed: {e}"))?;
        Ok(())
    }

    /// The project's snapshots, oldest first.
    async fn snapshot_names(&self, id: ProjectId) -> Result<Vec<String>, String> {
        let mut snaps = self.snapshots(id).await.map_err(|e| e.to_string())?;
        snaps.sort_by(|a, b| a.created.cmp(&b.created).then(a.name.cmp(&b.name)));
        Ok(snaps.into_iter().map(|s| s.name.to_string()).collect())
    }

    /// Sends the subvolume `name` as the next stream of the chain (incremental to the chain's
    /// newest subvolume; `last`: the final stream with the snapshots the target places), and
    /// makes it the chain's newest.
    async fn push(
        self: &Arc<Self>,
        chain: &mut Chain<'_>,
        name: &str,
        last: Option<Vec<String>>,
    ) -> Result<(), String> {
        self.stream(
            &chain.run,
            Stream {
                seq: chain.seq,
                name,
                parent: chain.parent.as_deref(),
                last,
            },
        )
        .await?;
        chain.held.push(name.to_string());
        chain.parent = Some(name.to_string());
        chain.seq += 1;
        Ok(())
    }

    /// Sends one stream: manifest line, the subvolume's `btrfs send`, the MAC; Ok once the
    /// target answered that it received (and, for the final one, placed) it.
    async fn stream(self: &Arc<Self>, run: &Run<'_>, s: Stream<'_>) -> Result<(), String> {
        let Run {
            id,
            mv,
            req,
            op,
            sender,
            config,
        } = run;
        let (id, mv) = (*id, *mv);
        let last = s.last.is_some();
        let uuid = self.storage.move_subvolume_uuid(id, s.name).await?;
        let parent_uuid = match s.parent {
            Some(p) => Some(self.storage.move_subvolume_uuid(id, p).await?),
            None => None,
        };
        let manifest = Manifest {
            move_id: mv.to_string(),
            project_id: id.to_string(),
            seq: s.seq,
            name: s.name.to_string(),
            parent: s.parent.map(str::to_string),
            uuid,
            parent_uuid,
            config: config.clone(),
            start: req.start,
            last: s.last,
        };
        let mut line = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
        line.push(b'\n');
        // btrfs send → (MAC, count) → the connection
        let (raw_tx, mut raw_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        let (net_tx, net_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        let token = req.token.clone();
        let counter = (*op).clone();
        let pump = async move {
            let mut mac = moves::mac(&token);
            while let Some(chunk) = raw_rx.recv().await {
                mac.update(&chunk);
                counter
                    .bytes
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                if net_tx.send(chunk).await.is_err() {
                    return;
                }
            }
            let _ = net_tx.send(mac.finalize().into_bytes().to_vec()).await;
        };
        let storage = self.storage.clone();
        let (name, parent) = (s.name.to_string(), s.parent.map(str::to_string));
        let o = (*op).clone();
        let produce = async move {
            raw_tx
                .send(line)
                .await
                .map_err(|_| "the connection to the target ended".to_string())?;
            let r = storage
                .send_subvolume(id, &name, parent.as_deref(), &raw_tx)
                .await;
            if last {
                o.set(Phase::Importing);
            }
            r
            // raw_tx drops here: the pump appends the MAC and ends the body
        };
        let push = sender.send(id, mv, &req.token, net_rx);
        op.in_body.store(true, Ordering::Relaxed);
        let all = async {
            let (sent, (), pushed) = tokio::join!(
                produce,
                async {
                    pump.await;
                    op.in_body.store(false, Ordering::Relaxed);
                },
                push
            );
            (sent, pushed)
        };
        let (sent, pushed) = tokio::select! {
            r = all => r,
            e = self.stall_watchdog(op) => return Err(e),
        };
        // the target's answer first: a refusal also ends the connection under the send
        pushed.map_err(|e| format!("stream {} ({}) to the target failed: {e}", s.seq, s.name))?;
        sent.map_err(|e| format!("sending {}: {e}", s.name))?;
        lock(&op.sent).push(s.name.to_string());
        Ok(())
    }

    /// Ends when a stream's body moved no byte for `moves.stall_timeout` (never while the target
    /// works on a whole body: then the sender's connection is watched by the kernel, TCP
    /// keepalive and user timeout, `adapters::moves::watch_peer`); what to report.
    async fn stall_watchdog(&self, op: &Arc<Op>) -> String {
        let stall = self.settings.moves.stall_timeout;
        let tick = (stall / 4).clamp(Duration::from_millis(100), Duration::from_millis(500));
        let mut seen = op.bytes.load(Ordering::Relaxed);
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(tick).await;
            let now = op.bytes.load(Ordering::Relaxed);
            if now != seen || !op.in_body.load(Ordering::Relaxed) {
                seen = now;
                since = Instant::now();
            } else if since.elapsed() >= stall {
                return format!(
                    "the connection to the target stalled ({}s without progress)",
                    stall.as_secs_f64()
                );
            }
        }
    }

    fn receive_lock(&self, mv: MoveId) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.moves.receiving).entry(mv).or_default().clone()
    }

    /// The target: what it holds of a move (`GET /projects/:id/receive/:move`); a move it never
    /// saw holds nothing. Waits for a stream of the move being received.
    pub async fn move_state(&self, id: ProjectId, mv: MoveId) -> Result<TargetState, Error> {
        let l = self.receive_lock(mv);
        let _g = tokio::time::timeout(BUSY_WAIT, l.lock())
            .await
            .map_err(|_| Error::MoveRejected(format!("move {mv} is busy here")))?;
        match self.storage.move_record(mv).await? {
            None => Ok(TargetState::new(&mv, &id)),
            Some(None) => Err(Error::MoveRejected(format!(
                "move {mv} was cancelled or expired (moves.staging_ttl) on this host: start a new move"
            ))),
            Some(Some(st)) if st.project_id != id.to_string() => Err(Error::MoveRejected(format!(
                "move {mv} is not for project {id}"
            ))),
            Some(Some(st)) => Ok(st),
        }
    }

    /// The target: cancels a move (`DELETE /projects/:id/receive/:move`): deletes what it
    /// received; the id stays taken. A placed project is not undone.
    pub async fn abort_receive(&self, id: ProjectId, mv: MoveId) -> Result<TargetState, Error> {
        let l = self.receive_lock(mv);
        let _g = tokio::time::timeout(BUSY_WAIT, l.lock())
            .await
            .map_err(|_| Error::MoveRejected(format!("move {mv} is busy here")))?;
        let st = match self.storage.move_record(mv).await? {
            Some(Some(st)) if st.project_id != id.to_string() => {
                return Err(Error::MoveRejected(format!(
                    "move {mv} is not for project {id}"
                )));
            }
            Some(Some(st)) if st.placed => {
                return Err(Error::MoveRejected(format!(
                    "move {mv} is done: project {id} lives on this host now"
                )));
            }
            Some(Some(st)) => st,
            _ => TargetState::new(&mv, &id),
        };
        self.storage.clean_move(mv).await;
        tracing::info!(project_id = %id, move_id = %mv, received = st.received.len(), "move cancelled; what it received is deleted");
        Ok(TargetState {
            received: Vec::new(),
            ..st
        })
    }

    /// The target, at start: what a stream broken by a crash left (its spool, a subvolume not
    /// recorded as received whole) is deleted; what moves received whole stays for a resume.
    pub(super) async fn recover_moves(&self) {
        for mv in self.storage.open_moves() {
            match self.storage.move_record(mv).await {
                Ok(Some(Some(st))) if !st.placed => {
                    self.storage.sweep_move(mv, &st.received).await;
                }
                Ok(Some(Some(_))) => {}
                Ok(_) => self.storage.clean_move(mv).await,
                Err(e) => {
                    tracing::warn!(move_id = %mv, error = %e, "unreadable move record; its staging area is deleted");
                    self.storage.clean_move(mv).await;
                }
            }
        }
    }

    /// The target: deletes what moves neither finished nor cancelled left (staging area, spool,
    /// record) once idle longer than `moves.staging_ttl`; their ids stay taken (a replay is
    /// still refused). A move whose stream is being received is left alone. How many went.
    pub async fn expire_moves(&self) -> usize {
        let ttl = self.settings.moves.staging_ttl;
        let mut n = 0;
        for mv in self.storage.open_moves() {
            let l = self.receive_lock(mv);
            let Ok(_g) = l.try_lock() else { continue };
            match self.storage.move_record(mv).await {
                // a done move's record stays: the source may still ask whether it was placed
                Ok(Some(Some(st))) if st.placed => continue,
                Ok(_) | Err(_) => {}
            }
            let Some(touched) = self.storage.move_touched_ms(mv) else {
                continue;
            };
            if !moves::expired(touched, now_ms(), ttl) {
                continue;
            }
            self.storage.clean_move(mv).await;
            n += 1;
            tracing::info!(move_id = %mv, idle_s = now_ms().saturating_sub(touched) / 1000, "an unfinished move's staging area expired (moves.staging_ttl): deleted; its id stays taken");
        }
        if n > 0 {
            lock(&self.moves.receiving).retain(|_, l| Arc::strong_count(l) > 1);
        }
        n
    }

    /// Receives one stream of a move for `id` (the target side). `body` yields the request
    /// body's chunks, an `Err` when the connection broke. What the stream brought is deleted
    /// unless it was received whole and checked; the final stream places the project. Runs to
    /// completion on its own task: a client gone midway cannot leave a staging area behind.
    pub async fn receive_move(
        self: &Arc<Self>,
        id: ProjectId,
        mv: MoveId,
        token: &str,
        body: tokio::sync::mpsc::Receiver<Result<Vec<u8>, String>>,
    ) -> Result<Received, Error> {
        let host = self.clone();
        let token = token.to_string();
        match self
            .tasks
            .spawn_work(async move { host.receive_move_now(id, mv, &token, body).await })
            .await
        {
            Ok(r) => r,
            Err(e) => Err(Error::MoveRejected(format!("receive task failed: {e}"))),
        }
    }

    async fn receive_move_now(
        self: &Arc<Self>,
        id: ProjectId,
        mv: MoveId,
        token: &str,
        body: tokio::sync::mpsc::Receiver<Result<Vec<u8>, String>>,
    ) -> Result<Received, Error> {
        if self.is_known(id) || self.storage.has_home(id) {
            return Err(Error::MoveRejected(format!(
                "project {id} already exists on this host"
            )));
        }
        let l = self.receive_lock(mv);
        let Ok(_g) = l.try_lock() else {
            return Err(Error::MoveRejected(format!(
                "a stream of move {mv} is being received"
            )));
        };
        let st = match self.storage.move_record(mv).await? {
            None => TargetState::new(&mv, &id),
            Some(None) => {
                return Err(Error::MoveRejected(format!(
                    "move {mv} was received before and finished, cancelled or expired: a stream is taken once"
                )));
            }
            Some(Some(st)) if st.project_id != id.to_string() => {
                return Err(Error::MoveRejected(format!(
                    "move {mv} is not for project {id}"
                )));
            }
            Some(Some(st)) if st.placed => {
                return Err(Error::MoveRejected(format!(
                    "move {mv} was received before and is done: a stream is taken once"
                )));
            }
            Some(Some(st)) => st,
        };
        let (staging, spool) = self.storage.save_move_record(mv, &st).await?;
        // what a stream broken before this one left
        self.storage.sweep_move(mv, &st.received).await;
        let mut st = st;
        let r = self
            .receive_into(id, mv, token, body, &staging, &spool, &mut st)
            .await;
        if r.is_err() {
            self.storage.sweep_move(mv, &st.received).await;
        }
        let received = r?;
        if received.started
            && let Err(e) = self.start(id, None).await
        {
            tracing::warn!(project_id = %id, error = %e, "moved project placed but its start failed");
            return Ok(Received {
                started: false,
                ..received
            });
        }
        Ok(received)
    }

    #[allow(clippy::too_many_arguments)]
    async fn receive_into(
        self: &Arc<Self>,
        id: ProjectId,
        mv: MoveId,
        token: &str,
        mut body: tokio::sync::mpsc::Receiver<Result<Vec<u8>, String>>,
        staging: &std::path::Path,
        spool: &std::path::Path,
        st: &mut TargetState,
    ) -> Result<Received, Error> {
        let reject = Error::MoveRejected;
        let mut mac = moves::mac(token);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(spool)
            .map_err(|e| reject(format!("cannot spool the stream: {e}")))?;
        let mut head: Vec<u8> = Vec::new();
        let mut manifest: Option<Manifest> = None;
        // the last MAC_LEN bytes seen are the trailer candidate, not yet MAC'd or written
        let mut tail: Vec<u8> = Vec::new();
        let mut bytes = 0u64;
        let mut max = u64::MAX;
        let idle = self.settings.moves.receive_idle;
        loop {
            let chunk = match tokio::time::timeout(idle, body.recv()).await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(_) => {
                    return Err(reject(format!(
                        "stream stalled ({}s without data)",
                        idle.as_secs_f64()
                    )));
                }
            };
            let chunk = chunk.map_err(|e| reject(format!("stream broken: {e}")))?;
            bytes += chunk.len() as u64;
            tail.extend_from_slice(&chunk);
            if tail.len() <= moves::MAC_LEN {
                continue;
            }
            let data: Vec<u8> = tail.drain(..tail.len() - moves::MAC_LEN).collect();
            mac.update(&data);
            let mut rest = &data[..];
            if manifest.is_none() {
                let nl = rest.iter().position(|b| *b == b'\n');
                let take = nl.map_or(rest.len(), |n| n + 1);
                head.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if head.len() > moves::MAX_MANIFEST {
                    return Err(reject("manifest line too long".into()));
                }
                if nl.is_some() {
                    let m = Manifest::parse(&head[..head.len() - 1], mv, id)
                        .map_err(|e| reject(e.to_string()))?;
                    // its place in the move, before its bytes are spooled (the MAC is checked
                    // once it is whole, before the place is taken)
                    st.accept(&m).map_err(reject)?;
                    // the spool and the received copy both take room: half of what is free
                    // beyond the reserve
                    let free = self.storage.space().map_or(0, |s| {
                        let reserve = crate::domain::reserve::required(
                            self.settings.storage.reserve,
                            s.total,
                        );
                        s.available.saturating_sub(reserve) / 2
                    });
                    max = moves::max_stream_bytes(m.config.disk, 1, free);
                    manifest = Some(m);
                }
            }
            if bytes > max.saturating_add(head.len() as u64 + moves::MAC_LEN as u64) {
                return Err(reject(format!(
                    "stream larger than the project may hold here ({max} bytes: its disk quota, within the free space)"
                )));
            }
            file.write_all(rest)
                .map_err(|e| reject(format!("cannot spool the stream: {e}")))?;
        }
        drop(file);
        let Some(m) = manifest else {
            return Err(reject("stream without a manifest".into()));
        };
        if !moves::verify(mac, &tail) {
            return Err(reject(
                "the stream's MAC does not check out with this move token (truncated, tampered, or for another move): nothing placed"
                    .into(),
            ));
        }
        // whole and authentic: its number is taken, whatever comes next (no replay of it)
        st.last_seq = m.seq;
        self.storage.save_move_record(mv, st).await?;
        // what it creates, clones from and names, before btrfs reads it (`btrfs receive -m`
        // would find a clone source anywhere on the filesystem by its UUID)
        self.storage
            .check_move_stream(mv, &m)
            .await
            .map_err(|e| reject(format!("stream refused before receive: {e}")))?;
        self.units
            .run_helper(Helper::Receive {
                mv,
                spool: spool.to_path_buf(),
                staging: staging.to_path_buf(),
            })
            .await
            .map_err(|e| reject(format!("receiving the stream: {e}")))?;
        let found = self.storage.inspect_move(mv).await?;
        let expected: Vec<String> = st
            .received
            .iter()
            .cloned()
            .chain(std::iter::once(m.name.clone()))
            .collect();
        moves::check_received(&expected, &found).map_err(reject)?;
        moves::check_lineage(&m, &found).map_err(reject)?;
        st.received.push(m.name.clone());
        self.storage.save_move_record(mv, st).await?;
        self.storage.sweep_move(mv, &st.received).await;
        let Some(snaps) = &m.last else {
            tracing::info!(project_id = %id, move_id = %mv, seq = m.seq, name = %m.name, bytes, "move stream received");
            return Ok(Received {
                project_id: id.to_string(),
                move_id: mv.to_string(),
                seq: m.seq,
                name: m.name.clone(),
                received: st.received.clone(),
                snapshots: Vec::new(),
                bytes,
                placed: false,
                started: false,
            });
        };
        let snapshots = m.snapshot_names().map_err(|e| reject(e.to_string()))?;
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        if self.is_known(id) || self.storage.has_home(id) {
            return Err(reject(format!("project {id} already exists on this host")));
        }
        self.storage.place_move(id, mv, &snapshots, &m.name).await?;
        let config: RunConfig = m.config.clone();
        if self.storage.quota_mode().await.is_some() {
            self.storage.set_home_limit(id, config.disk).await?;
        }
        self.store
            .upsert(id, ProjectState::Opened, Some(config), now_ms())
            .await?;
        self.mark_known(id, now_ms());
        // the source deletes its copy on this record (or the answer below)
        st.placed = true;
        st.received.clear();
        if let Err(e) = self.storage.save_move_record(mv, st).await {
            tracing::warn!(move_id = %mv, error = %e, "cannot record the move as done");
        }
        tracing::info!(project_id = %id, move_id = %mv, bytes, snapshots = snapshots.len(), "moved project received and placed");
        Ok(Received {
            project_id: id.to_string(),
            move_id: mv.to_string(),
            seq: m.seq,
            name: m.name.clone(),
            received: Vec::new(),
            snapshots: snaps.clone(),
            bytes,
            placed: true,
            started: m.start,
        })
    }
}
