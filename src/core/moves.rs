//! Moving a project to another host (docs/moves.md). The source runs a move as a tracked
//! operation ([`Host::start_move`], [`Host::operation`], [`Host::cancel_operation`]): it stops the
//! project, streams its snapshots (in order, each incremental to the one before) and its live
//! state to the target bound to the move (`domain::moves`), and deletes its copy only once the
//! target answered that the project is placed. Any failure or a cancel leaves the source whole
//! (and running again if it ran). The target ([`Host::receive_move`]) spools the stream, checks
//! its MAC, receives it confined in its staging area, checks it holds exactly what was announced,
//! places it and records the project; anything else is deleted and the move refused.
use std::collections::HashMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hmac::Mac as _;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{Error, Host, now_ms};
use crate::domain::moves::{self, Manifest, MoveId};
use crate::domain::project::{ProjectId, ProjectState, RunConfig};
use crate::domain::snapshots::SnapshotName;
use crate::ports::Helper;

/// Where a move is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// stopping the project (when it runs)
    Stopping,
    /// sending the snapshots and the live state
    Sending,
    /// the target checks and places what it received
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
    /// bytes of the stream sent so far
    pub bytes_sent: u64,
    /// average bytes per second since the start
    pub rate: u64,
    /// milliseconds the project was not running (stop → running on the target), once known
    pub downtime_ms: Option<u64>,
    /// why it failed
    pub error: Option<String>,
}

#[derive(Debug)]
struct Op {
    project: ProjectId,
    target: String,
    phase: Mutex<Phase>,
    bytes: AtomicU64,
    started: Instant,
    downtime_ms: Mutex<Option<u64>>,
    error: Mutex<Option<String>>,
    cancel: CancellationToken,
}

/// The host's move operations (kept in memory; a daemon restart ends a move as failed: the
/// source still has everything, the target's staging area is cleaned when its stream breaks).
#[derive(Debug, Default)]
pub struct Moves {
    ops: Mutex<HashMap<MoveId, Arc<Op>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Op {
    fn set(&self, p: Phase) {
        *lock(&self.phase) = p;
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
            rate: (bytes as f64 / secs) as u64,
            downtime_ms: *lock(&self.downtime_ms),
            error: lock(&self.error).clone(),
        }
    }
}

/// Where and how a move sends its stream (the adapter opens the connection).
#[async_trait::async_trait]
pub trait Sender: Send + Sync + std::fmt::Debug {
    /// POSTs the stream read from `body` (ends when the sender drops) to the target's receive
    /// endpoint for `id` and `mv` with the bearer `token`; Ok when the target answered 2xx, the
    /// error says what it answered otherwise.
    async fn send(
        &self,
        id: ProjectId,
        mv: MoveId,
        token: &str,
        body: tokio::sync::mpsc::Receiver<Vec<u8>>,
    ) -> Result<(), String>;
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

/// What the target answers once a project is placed.
#[derive(Debug, Clone, Serialize)]
pub struct Received {
    /// the project
    pub project_id: String,
    /// the move
    pub move_id: String,
    /// the snapshots placed, oldest first
    pub snapshots: Vec<String>,
    /// stream bytes received
    pub bytes: u64,
    /// whether it was started
    pub started: bool,
}

impl Host {
    /// Whether a move holds the project's snapshots (a delete must not race a send).
    pub(super) fn moving(&self, id: ProjectId) -> bool {
        lock(&self.moves.ops).values().any(|o| {
            o.project == id
                && !matches!(
                    *lock(&o.phase),
                    Phase::DeletingSource | Phase::Done | Phase::Failed
                )
        })
    }

    /// The view of an operation.
    pub fn operation(&self, op: &str) -> Result<OperationView, Error> {
        let mv: MoveId = op
            .parse()
            .map_err(|_| Error::NoSuchOperation(op.chars().take(64).collect()))?;
        lock(&self.moves.ops)
            .get(&mv)
            .map(|o| o.view(mv))
            .ok_or_else(|| Error::NoSuchOperation(op.to_string()))
    }

    /// Cancels a running operation (a finished one is left as it is); its view.
    pub fn cancel_operation(&self, op: &str) -> Result<OperationView, Error> {
        let mv: MoveId = op
            .parse()
            .map_err(|_| Error::NoSuchOperation(op.chars().take(64).collect()))?;
        let o = lock(&self.moves.ops)
            .get(&mv)
            .cloned()
            .ok_or_else(|| Error::NoSuchOperation(op.to_string()))?;
        o.cancel.cancel();
        Ok(o.view(mv))
    }

    /// Starts moving the project to another host; the operation's view (it runs on).
    pub async fn start_move(
        self: &Arc<Self>,
        id: ProjectId,
        req: MoveRequest,
        sender: Arc<dyn Sender>,
    ) -> Result<OperationView, Error> {
        if !self.storage.has_home(id) {
            return Err(Error::NoSuchProject(id));
        }
        if self.moving(id) {
            return Err(Error::MoveRejected(format!(
                "project {id} is already being moved"
            )));
        }
        let mv = MoveId::new();
        let op = Arc::new(Op {
            project: id,
            target: req.target.clone(),
            phase: Mutex::new(Phase::Stopping),
            bytes: AtomicU64::new(0),
            started: Instant::now(),
            downtime_ms: Mutex::new(None),
            error: Mutex::new(None),
            cancel: CancellationToken::new(),
        });
        lock(&self.moves.ops).insert(mv, op.clone());
        let host = self.clone();
        let o = op.clone();
        drop(self.tasks.spawn_work(async move {
            let was_running = host.status(id).state.is_up();
            let r = tokio::select! {
                r = host.run_move(id, mv, &req, &o, sender) => r,
                () = o.cancel.cancelled() => Err("cancelled".to_string()),
            };
            match r {
                Ok(()) => {
                    tracing::info!(project_id = %id, move_id = %mv, bytes = o.bytes.load(Ordering::Relaxed), "project moved to {}", o.target);
                    o.set(Phase::Done);
                }
                Err(e) => {
                    tracing::warn!(project_id = %id, move_id = %mv, error = %e, "move failed; the project stays here");
                    // a cancel drops the send midway: its live snapshot may be left
                    host.storage.drop_move_snapshot(id, mv).await;
                    *lock(&o.error) = Some(e);
                    o.set(Phase::Failed);
                    if was_running
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

    async fn run_move(
        self: &Arc<Self>,
        id: ProjectId,
        mv: MoveId,
        req: &MoveRequest,
        op: &Arc<Op>,
        sender: Arc<dyn Sender>,
    ) -> Result<(), String> {
        let mut snaps = self.snapshots(id).await.map_err(|e| e.to_string())?;
        snaps.sort_by(|a, b| a.created.cmp(&b.created).then(a.name.cmp(&b.name)));
        let names: Vec<SnapshotName> = snaps.into_iter().map(|s| s.name).collect();
        let config = self.stored_config(id).await.map_err(|e| e.to_string())?;
        op.set(Phase::Stopping);
        let stopped_at = Instant::now();
        self.stop(id, false).await.map_err(|e| e.to_string())?;
        op.set(Phase::Sending);
        let manifest = Manifest {
            move_id: mv.to_string(),
            project_id: id.to_string(),
            snapshots: names.iter().map(|n| n.to_string()).collect(),
            config,
            start: req.start,
        };
        let mut line = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
        line.push(b'\n');
        // btrfs send → (MAC, count) → the connection
        let (raw_tx, mut raw_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        let (net_tx, net_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        let token = req.token.clone();
        let counter = op.clone();
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
        let produce = async move {
            raw_tx
                .send(line)
                .await
                .map_err(|_| "the connection to the target ended".to_string())?;
            storage.send_for_move(id, mv, &names, &raw_tx).await
            // raw_tx drops here: the pump appends the MAC and ends the body
        };
        let push = sender.send(id, mv, &req.token, net_rx);
        let (sent, (), pushed) = tokio::join!(produce, pump, push);
        // the target's answer first: a refusal also ends the connection under the send
        pushed.map_err(|e| format!("the target refused the move: {e}"))?;
        if let Err(e) = sent {
            return Err(format!("sending: {e}"));
        }
        op.set(Phase::Importing);
        *lock(&op.downtime_ms) = req.start.then(|| stopped_at.elapsed().as_millis() as u64);
        // the target has it whole: only now is the source's copy deleted
        op.set(Phase::DeletingSource);
        self.remove(id)
            .await
            .map_err(|e| format!("moved, but deleting the source's copy failed: {e}"))?;
        Ok(())
    }

    /// Receives a move stream for `id` (the target side). `body` yields the request body's
    /// chunks, an `Err` when the connection broke. Everything received is deleted unless the
    /// project ends up placed and recorded. Runs to completion on its own task: a client gone
    /// midway cannot leave a staging area behind.
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
        let Some((staging, spool)) = self.storage.take_move(mv).await? else {
            return Err(Error::MoveRejected(format!(
                "move {mv} was received before: a stream is taken once"
            )));
        };
        let r = self
            .receive_into(id, mv, token, body, &staging, &spool)
            .await;
        if r.is_err() {
            self.storage.clean_move(mv).await;
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

    async fn receive_into(
        self: &Arc<Self>,
        id: ProjectId,
        mv: MoveId,
        token: &str,
        mut body: tokio::sync::mpsc::Receiver<Result<Vec<u8>, String>>,
        staging: &std::path::Path,
        spool: &std::path::Path,
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
        while let Some(chunk) = body.recv().await {
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
                    // the spool and the received copy both take room: half of what is free
                    // beyond the reserve
                    let free = self.storage.space().map_or(0, |s| {
                        let reserve = crate::domain::reserve::required(
                            self.settings.storage.reserve,
                            s.total,
                        );
                        s.available.saturating_sub(reserve) / 2
                    });
                    max = moves::max_stream_bytes(m.config.disk, m.expected(&mv).len(), free);
                    manifest = Some(m);
                }
            }
            if bytes > max.saturating_add(head.len() as u64 + moves::MAC_LEN as u64) {
                return Err(reject(format!(
                    "stream larger than the project may hold here ({max} bytes: its disk quota per subvolume, within the free space)"
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
        self.units
            .run_helper(Helper::Receive {
                mv,
                spool: spool.to_path_buf(),
                staging: staging.to_path_buf(),
            })
            .await
            .map_err(|e| reject(format!("receiving the stream: {e}")))?;
        let found = self.storage.inspect_move(mv).await?;
        moves::check_received(&m.expected(&mv), &found).map_err(reject)?;
        let snapshots = m.snapshot_names().map_err(|e| reject(e.to_string()))?;
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        if self.is_known(id) || self.storage.has_home(id) {
            return Err(reject(format!("project {id} already exists on this host")));
        }
        self.storage.place_move(id, mv, &snapshots).await?;
        let config: RunConfig = m.config.clone();
        if self.storage.quota_mode().await.is_some() {
            self.storage.set_home_limit(id, config.disk).await?;
        }
        self.store
            .upsert(id, ProjectState::Opened, Some(config), now_ms())
            .await?;
        self.mark_known(id, now_ms());
        tracing::info!(project_id = %id, move_id = %mv, bytes, snapshots = snapshots.len(), "moved project received and placed");
        Ok(Received {
            project_id: id.to_string(),
            move_id: mv.to_string(),
            snapshots: m.snapshots.clone(),
            bytes,
            started: m.start,
        })
    }
}
