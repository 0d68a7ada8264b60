//! The core's ports: the few things it asks of the outside world, in its own words. The real
//! backends (`backends::{systemd, btrfs, sqlite}`) and the simulated one (`backends::sim`) answer
//! them; the core never names D-Bus, unit-name formats, `ActiveState` strings, journalctl,
//! podman's argv or btrfs paths.
use std::collections::HashMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;

use crate::domain::ids::Forbidden;
use crate::domain::images::ImageRef;
use crate::domain::limits::{Limits, SliceSettings};
use crate::domain::master::{Report, ReportKind};
use crate::domain::project::{ProjectId, ProjectState, RunConfig, UnitInfo};
use crate::domain::snapshots::SnapshotName;

pub use crate::backends::btrfs::{QuotaMode, Role, StorageError};
pub use crate::backends::journal_read::{LogLine, LogQuery, LogSince};
pub use crate::backends::sqlite::{ProjectRow, StoreError};
pub use crate::backends::systemd::SystemdError as UnitError;

/// A change to a project unit.
#[derive(Debug, Clone, PartialEq)]
pub enum UnitEvent {
    /// Some properties changed (absent ones did not).
    Changed {
        /// the project
        id: ProjectId,
        /// its activity
        active_state: Option<crate::domain::project::ActiveState>,
        /// the backend's finer state (`SubState`)
        sub_state: Option<String>,
        /// main process id
        main_pid: Option<u32>,
        /// when it last became active (µs since the epoch)
        active_enter_usec: Option<u64>,
    },
    /// The unit is gone (stopped and collected).
    Removed(ProjectId),
}

/// A stream of unit events, ending when the backend's source ends.
pub type UnitEvents = Pin<Box<dyn futures_util::Stream<Item = UnitEvent> + Send>>;

/// Everything a cold start of a project needs: what to run and where its storage is.
#[derive(Debug, Clone)]
pub struct StartPlan {
    /// The project.
    pub id: ProjectId,
    /// Its run config.
    pub config: RunConfig,
    /// The image it runs (allowed by the host's `projects.images`).
    pub image: ImageRef,
    /// The first host id of its own id range (`domain::ids`).
    pub id_base: u32,
    /// Its home (exists).
    pub home: PathBuf,
    /// Its snapshots directory (mounted read-only).
    pub snapshots: PathBuf,
    /// Its fresh scratch, if it has one.
    pub scratch: Option<PathBuf>,
    /// Size of each of its /tmp, /var/tmp, /dev/shm (`None`: the backend's default).
    pub tmp: Option<u64>,
    /// Its limits (the CPU quota is not put on by `start`: see [`Units::set_cpu_quota`]).
    pub limits: Limits,
}

/// Why a start failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartError {
    /// Preparing the start failed; nothing was started.
    Prepare(String),
    /// The unit did not come up. `reason` leads with the container's own error when it said one.
    Unit {
        /// what went wrong
        reason: String,
        /// the unit's journal of this attempt
        journal: String,
    },
}

/// How long the unit backend's part of a start took (see `domain::phases`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartTimings {
    /// until the backend had the unit's start job taken
    pub unit: Duration,
    /// from then until the unit was up
    pub podman: Duration,
}

/// A short-lived helper job run on behalf of a project (outside the daemon's sandbox).
#[derive(Debug, Clone, PartialEq)]
pub enum Helper {
    /// Remove the project's container (after a failed start).
    RemoveContainer(ProjectId),
    /// Change the memory limits of the project's running container.
    UpdateContainer(ProjectId, Limits),
    /// `btrfs receive` a spooled move stream into its staging area, confined to it.
    Receive {
        /// the move
        mv: crate::domain::moves::MoveId,
        /// the spooled stream (its MAC checked)
        spool: PathBuf,
        /// the staging area
        staging: PathBuf,
    },
}

fn no_moves<T>() -> Result<T, StorageError> {
    Err(StorageError::Io {
        path: PathBuf::new(),
        source: std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this storage backend does not move projects",
        ),
    })
}

/// The units of projects (systemd transient units running podman).
#[async_trait]
pub trait Units: Send + Sync + Debug {
    /// The unit's name, as the status reports it.
    fn unit_name(&self, id: ProjectId) -> String;
    /// Starts watching project units. Call before reading the initial state.
    async fn watch(&self) -> Result<UnitEvents, UnitError>;
    /// The project units up now.
    async fn list(&self) -> Result<Vec<(ProjectId, UnitInfo)>, UnitError>;
    /// A project unit's state; `None` when it is not loaded.
    async fn info(&self, id: ProjectId) -> Result<Option<UnitInfo>, UnitError>;
    /// Starts the project's unit and waits until it is up (or failed).
    async fn start(&self, plan: StartPlan) -> Result<StartTimings, StartError>;
    /// Stops the unit and waits (a unit that does not exist is stopped).
    async fn stop(&self, id: ProjectId, timeout: Duration) -> Result<(), UnitError>;
    /// Kills every process of the unit at once.
    async fn kill(&self, id: ProjectId) -> Result<(), UnitError>;
    /// Forgets a failed unit so it can be started again.
    async fn reset_failed(&self, id: ProjectId);
    /// Puts `limits` on the running unit (runtime, at once).
    async fn set_limits(&self, id: ProjectId, limits: &Limits) -> Result<(), UnitError>;
    /// Puts a CPU quota (`Some(cores)`) on the unit, or lifts it (`None`).
    async fn set_cpu_quota(&self, id: ProjectId, cores: Option<f64>) -> Result<(), UnitError>;
    /// Puts the host-wide limits on the projects' slice.
    async fn set_slice_limits(&self, s: &SliceSettings) -> Result<(), UnitError>;
    /// Memory in use by the unit, when known.
    async fn memory_current(&self, id: ProjectId) -> Option<u64>;
    /// Runs a helper job to completion; the error says why it failed, in the helper's words.
    async fn run_helper(&self, helper: Helper) -> Result<(), String>;
    /// Connects to `127.0.0.1:port` inside the network namespace of the running project whose
    /// unit's main process is `main_pid` (the socket keeps that namespace), within `timeout`.
    async fn connect(
        &self,
        id: ProjectId,
        main_pid: u32,
        port: u16,
        timeout: Duration,
    ) -> std::io::Result<tokio::net::TcpStream>;
    /// Forgets what `connect` cached about the project (its unit is gone).
    fn forget(&self, id: ProjectId);
    /// CPU time used by the unit (ns), when known.
    async fn cpu_usage_nsec(&self, id: ProjectId) -> Option<u64>;
    /// Freezes every process of the running unit (the cgroup freezer: memory kept, no CPU) and
    /// returns once they are frozen.
    async fn freeze(&self, id: ProjectId) -> Result<(), UnitError>;
    /// Thaws the unit's processes (a unit that is not frozen, or gone, is no error).
    async fn thaw(&self, id: ProjectId) -> Result<(), UnitError>;
    /// Whether the unit's processes are frozen now (`None`: no such unit, or unknown).
    fn is_frozen(&self, id: ProjectId) -> Option<bool>;
    /// The unit's journal entries `q` asks for, oldest first (the error says why it could not
    /// be read).
    async fn journal(&self, id: ProjectId, q: &LogQuery) -> Result<Vec<LogLine>, String>;
}

/// One subvolume of the project storage that belongs to a project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subvolume {
    /// The filesystem's id of it.
    pub id: u64,
    /// What it is.
    pub role: Role,
    /// Its generation (bumped by every write).
    pub generation: u64,
    /// The generation it was created at.
    pub created_generation: u64,
    /// When it was created (ms since the epoch), if known.
    pub otime: Option<u64>,
}

/// The quota and usage of a project's home.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// The limit (bytes), if any.
    pub quota: Option<u64>,
    /// Bytes referenced.
    pub used: u64,
}

/// The projects' storage: homes, quotas, snapshots, scratch.
#[async_trait]
pub trait Storage: Send + Sync + Debug {
    /// Whether the project has a home.
    fn has_home(&self, id: ProjectId) -> bool;
    /// Makes sure the project's home exists; its path.
    async fn ensure_home(&self, id: ProjectId) -> Result<PathBuf, StorageError>;
    /// Turns quotas on if they are off.
    async fn ensure_quotas(&self) -> Result<(), StorageError>;
    /// The quota mode, `None` while quotas are off.
    async fn quota_mode(&self) -> Option<QuotaMode>;
    /// Sets (or lifts) the quota of the project's home.
    async fn set_home_limit(&self, id: ProjectId, bytes: Option<u64>) -> Result<(), StorageError>;
    /// Quota and usage of every home.
    async fn home_usage(&self) -> Result<HashMap<ProjectId, Usage>, StorageError>;
    /// Free space and size of the filesystem holding the homes (for `storage.reserve`).
    fn space(&self) -> Result<crate::domain::reserve::Space, StorageError>;
    /// Makes sure the project's snapshots directory exists; its path.
    fn ensure_snapshots_dir(&self, id: ProjectId) -> Result<PathBuf, StorageError>;
    /// Moves aside what keeps `~/.snapshots` from taking the snapshots' mount.
    fn clear_snapshots_mountpoint(&self, id: ProjectId, now_ms: u64) -> Result<(), StorageError>;
    /// A fresh scratch for the project (`None`: it has none).
    async fn recreate_scratch(
        &self,
        id: ProjectId,
        limit: Option<u64>,
    ) -> Result<Option<PathBuf>, StorageError>;
    /// The projects' subvolumes (`snapshots_only`: just the snapshots).
    async fn subvolumes(&self, snapshots_only: bool) -> Result<Vec<Subvolume>, StorageError>;
    /// (exclusive, referenced) bytes by subvolume id, when quotas are on.
    async fn sizes(&self) -> Result<HashMap<u64, (u64, u64)>, StorageError>;
    /// Commits the filesystem (generations then include every write so far).
    async fn sync(&self) -> Result<(), StorageError>;
    /// Whether the snapshot exists.
    fn has_snapshot(&self, id: ProjectId, name: &SnapshotName) -> bool;
    /// Takes a read-only snapshot of the home.
    async fn create_snapshot(&self, id: ProjectId, name: &SnapshotName)
    -> Result<(), StorageError>;
    /// Deletes a snapshot.
    async fn delete_snapshot(&self, id: ProjectId, name: &SnapshotName)
    -> Result<(), StorageError>;
    /// Replaces the home by the snapshot, atomically.
    async fn restore(
        &self,
        id: ProjectId,
        name: &SnapshotName,
        limit: Option<u64>,
        quotas: bool,
    ) -> Result<(), StorageError>;
    /// Host ids no project range may overlap (the host's accounts and subordinate ranges).
    async fn reserved_ids(&self) -> Forbidden;
    /// The host uid owning the root of the project's home.
    async fn home_owner(&self, id: ProjectId) -> Result<u32, String>;
    /// Gives every file of the home owned by an id of `[from, from+count)` the same id of
    /// `[to, to+count)` (the project is stopped); how many entries changed.
    async fn convert_home_ids(
        &self,
        id: ProjectId,
        from: u32,
        to: u32,
        count: u32,
    ) -> Result<u64, String>;
    /// Gives a fresh directory of the project (its scratch) to host `uid`.
    async fn give_to(&self, path: &Path, uid: u32) -> Result<(), String>;
    /// The project's home and snapshots directory for file access (`None`: it has no home);
    /// makes sure the snapshots directory exists.
    fn file_roots(&self, id: ProjectId) -> Result<Option<(PathBuf, PathBuf)>, StorageError>;
    /// Deletes the project's home, snapshots and scratch (the project is stopped); deleting
    /// what is not there is no error.
    async fn delete_project(&self, id: ProjectId) -> Result<(), StorageError>;

    // Moves between hosts (`core::moves`).
    /// Source: takes a read-only snapshot of the live home named `name` (a move's live-state
    /// name) beside the project's snapshots, committed so that it can be sent.
    async fn move_snapshot(&self, _id: ProjectId, _name: &str) -> Result<(), String> {
        Err("this storage backend does not move projects".into())
    }
    /// Source: whether the project has the subvolume `name` (a snapshot or a move's live state).
    fn has_move_subvolume(&self, _id: ProjectId, _name: &str) -> bool {
        false
    }
    /// Source: sends the subvolume `name` of the project (incremental to `parent`) into `sink`;
    /// bytes sent. Dropping the future stops the send.
    async fn send_subvolume(
        &self,
        _id: ProjectId,
        _name: &str,
        _parent: Option<&str>,
        _sink: &tokio::sync::mpsc::Sender<Vec<u8>>,
    ) -> Result<u64, String> {
        Err("this storage backend does not move projects".into())
    }
    /// Source: the identity `btrfs send` writes for the project's subvolume `name` (its received
    /// UUID when it has one, else its own): the stream's manifest announces it.
    async fn move_subvolume_uuid(
        &self,
        _id: ProjectId,
        _name: &str,
    ) -> Result<crate::domain::moves::SubvolUuid, String> {
        Err("this storage backend does not move projects".into())
    }
    /// Source: deletes the move's live-state snapshots but `keep`.
    async fn drop_move_snapshots(
        &self,
        _id: ProjectId,
        _mv: crate::domain::moves::MoveId,
        _keep: Option<&str>,
    ) {
    }
    /// Target: the record of a move (`None`: none; `Some(None)`: the move id was used and the
    /// move was cancelled).
    async fn move_record(
        &self,
        _mv: crate::domain::moves::MoveId,
    ) -> Result<Option<Option<crate::domain::moves::TargetState>>, StorageError> {
        no_moves()
    }
    /// Target: writes a move's record (atomically); the first write takes the move id for good
    /// and makes the staging area. Returns (staging area, spool file).
    async fn save_move_record(
        &self,
        _mv: crate::domain::moves::MoveId,
        _st: &crate::domain::moves::TargetState,
    ) -> Result<(PathBuf, PathBuf), StorageError> {
        no_moves()
    }
    /// Target: checks a move's spooled stream (`m` announced it) before `btrfs receive` reads
    /// it: what it creates, what it clones from and the paths it names
    /// (`domain::moves::StreamCheck`), and that the UUIDs it names are no other subvolume's.
    async fn check_move_stream(
        &self,
        _mv: crate::domain::moves::MoveId,
        _m: &crate::domain::moves::Manifest,
    ) -> Result<(), String> {
        Err("this storage backend does not move projects".into())
    }
    /// Target: what the staging area holds (names, kinds, read-only flags, UUIDs).
    async fn inspect_move(
        &self,
        _mv: crate::domain::moves::MoveId,
    ) -> Result<Vec<crate::domain::moves::Staged>, StorageError> {
        no_moves()
    }
    /// Target: deletes the spool and everything in the staging area but `keep` (what a broken
    /// or refused stream left).
    async fn sweep_move(&self, _mv: crate::domain::moves::MoveId, _keep: &[String]) {}
    /// Target: puts the checked snapshots and the live state `live` in place as the project's.
    async fn place_move(
        &self,
        _id: ProjectId,
        _mv: crate::domain::moves::MoveId,
        _snapshots: &[SnapshotName],
        _live: &str,
    ) -> Result<(), StorageError> {
        no_moves()
    }
    /// Target: deletes a move's staging area, spool and record (the used id stays taken).
    async fn clean_move(&self, _mv: crate::domain::moves::MoveId) {}
    /// Target: the moves with a staging area or a record (to sweep at start).
    fn open_moves(&self) -> Vec<crate::domain::moves::MoveId> {
        Vec::new()
    }
    /// Target: when anything of a move (its record, spool or staging area) last changed, in
    /// ms since the epoch (`None`: nothing of it is there).
    fn move_touched_ms(&self, _mv: crate::domain::moves::MoveId) -> Option<u64> {
        None
    }
}

/// Picks a free id range base given every base taken (`None`: none free).
pub type IdAlloc = Box<dyn FnOnce(&[u32]) -> Option<u32> + Send>;

/// The host's memory of its projects.
#[async_trait]
pub trait Store: Send + Sync + Debug {
    /// This host's id (made on first use).
    async fn host_id(&self) -> Result<String, StoreError>;
    /// Every known project.
    async fn projects(&self) -> Result<Vec<ProjectRow>, StoreError>;
    /// One project.
    async fn project(&self, id: ProjectId) -> Result<Option<ProjectRow>, StoreError>;
    /// Records a project's state (and config, when given) and touch time.
    async fn upsert(
        &self,
        id: ProjectId,
        state: ProjectState,
        config: Option<RunConfig>,
        now_ms: u64,
    ) -> Result<(), StoreError>;
    /// Records a touch, without waiting.
    fn touch(&self, id: ProjectId, now_ms: u64);
    /// The base of the project's host id range: the stored one, or the first time the one
    /// `alloc` picks given every base taken, in one transaction (two starts never share one).
    /// `None`: `alloc` found none free.
    async fn id_range(&self, id: ProjectId, alloc: IdAlloc) -> Result<Option<u32>, StoreError>;
    /// The project's SSH public keys (OpenSSH lines, validated before they were stored).
    async fn ssh_keys(&self, id: ProjectId) -> Result<Vec<String>, StoreError>;
    /// Replaces the project's SSH public keys.
    async fn set_ssh_keys(&self, id: ProjectId, keys: Vec<String>) -> Result<(), StoreError>;
    /// Queues a report to the master that comes with no state change (a failed start).
    async fn report(
        &self,
        id: ProjectId,
        kind: ReportKind,
        state: ProjectState,
        now_ms: u64,
    ) -> Result<(), StoreError>;
    /// Forgets a project and queues its `removed` report, in one transaction; whether it was
    /// known.
    async fn remove(&self, id: ProjectId, now_ms: u64) -> Result<bool, StoreError>;
    /// Starts keeping reports to the master (at most `limit`): `upsert`s that change whether a
    /// project runs queue one in the same transaction. Off by default (a standalone host).
    fn enable_outbox(&self, limit: usize);
    /// The oldest `max` queued reports, in sequence order.
    async fn outbox_batch(&self, max: usize) -> Result<Vec<Report>, StoreError>;
    /// Forgets the reports up to `seq` (the master has them).
    async fn outbox_ack(&self, seq: u64) -> Result<(), StoreError>;
    /// How many reports are queued.
    async fn outbox_depth(&self) -> Result<u64, StoreError>;
    /// Returns once a report was queued since the last call (or at once if one was before).
    async fn outbox_wait(&self);
}

/// Why a call to the master failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MasterError {
    /// It could not be reached (connect, TLS, timeout, a broken answer).
    #[error("master unreachable: {0}")]
    Unreachable(String),
    /// It answered with an error status.
    #[error("master refused ({status}): {message}")]
    Refused {
        /// the HTTP status
        status: u16,
        /// its answer, shortened
        message: String,
    },
}

/// The fleet's master (`docs/master-protocol.md`): the host reports to it.
#[async_trait]
pub trait Master: Send + Sync + Debug {
    /// `POST /register`; the master's answer.
    async fn register(
        &self,
        msg: &crate::api::master::Register,
    ) -> Result<crate::api::master::RegisterAnswer, MasterError>;
    /// `POST /heartbeat`.
    async fn heartbeat(&self, msg: &crate::api::master::Heartbeat) -> Result<(), MasterError>;
    /// `POST /project-state`; the highest sequence number the master acknowledges.
    async fn report(
        &self,
        msg: &crate::api::master::ProjectStates,
    ) -> Result<crate::api::master::ReportAnswer, MasterError>;
}
