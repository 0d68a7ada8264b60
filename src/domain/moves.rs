//! Moving a project to another host (docs/moves.md): the move id, the streams' manifest, the
//! binding of each stream to one move and one place in it (an HMAC-SHA256 trailer keyed by the
//! move token), the target's record of a move in progress and the checks on what it receives,
//! and the source's plan of what is left to send. Pure logic; the core drives the move,
//! `backends::btrfs::sendrecv` runs `btrfs send`/`receive`.
//!
//! A move is a sequence of streams, each `POST /projects/:id/receive/:move`, each carrying ONE
//! subvolume: `manifest line (JSON, \n) · one btrfs send stream · 32-byte HMAC-SHA256`, where
//! the HMAC covers everything before it and is keyed by the bearer token the source was given
//! for the target (a secret only the master, the source and the target hold). The manifest
//! names the move id, the project, the stream's sequence number, the subvolume and its parent,
//! so a stream is bound to one move and one place in it: the target takes each sequence number
//! once and only increasing ([`TargetState::accept`]), wants the parent among what it already
//! holds, and runs `btrfs receive` only on a whole stream whose trailer checks out (a truncated,
//! tampered, replayed or reordered stream never reaches btrfs).
use std::fmt;
use std::str::FromStr;

use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};

use crate::domain::project::{ProjectId, RunConfig};
use crate::domain::snapshots::SnapshotName;

/// Length of the stream's trailer (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// Longest manifest line accepted.
pub const MAX_MANIFEST: usize = 64 * 1024;
/// Most snapshots one move carries.
pub const MAX_SNAPSHOTS: usize = 1024;
/// The name of a live-state subvolume of a move, taken before stream `seq` (`btrfs send` names a
/// subvolume by its path's last component; never a snapshot name: those cannot start with a
/// dot). A move has one while the project still runs (the pre-copy) and one after the stop.
pub fn live_name(mv: &MoveId, seq: u64) -> String {
    format!(".move-{mv}-{seq}")
}

/// Whether `name` is a live-state name of move `mv` ([`live_name`]).
pub fn is_live_name(mv: &MoveId, name: &str) -> bool {
    name.strip_prefix(&format!(".move-{mv}-"))
        .is_some_and(|n| !n.is_empty() && n.len() <= 20 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A btrfs subvolume's UUID (as `btrfs subvolume show` prints it: lowercase, hyphenated; never
/// the nil UUID, which btrfs prints as `-`). A stream announces the one `btrfs send` writes into
/// it for its subvolume and its parent (a subvolume's received UUID when it has one, else its
/// own: [`SubvolUuid::send_identity`]); after `btrfs receive` the target finds it as the new
/// subvolume's received UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SubvolUuid(uuid::Uuid);

impl SubvolUuid {
    /// The UUID `btrfs send` writes for a subvolume with these UUIDs: its received UUID when it
    /// has one (it was itself received), else its own.
    pub fn send_identity(uuid: SubvolUuid, received: Option<SubvolUuid>) -> SubvolUuid {
        received.unwrap_or(uuid)
    }

    /// A UUID read from a stream (the nil UUID is no subvolume's).
    pub fn from_stream(u: uuid::Uuid) -> Result<SubvolUuid, String> {
        if u.is_nil() {
            return Err("the stream names the nil UUID".into());
        }
        Ok(SubvolUuid(u))
    }
}

impl FromStr for SubvolUuid {
    type Err = String;
    fn from_str(s: &str) -> Result<SubvolUuid, String> {
        let bad = || {
            format!(
                "invalid subvolume UUID {:?}: expected a lowercase hyphenated UUID",
                s.chars().take(64).collect::<String>()
            )
        };
        if s.len() != 36 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad());
        }
        match uuid::Uuid::parse_str(s) {
            Ok(u) if !u.is_nil() => Ok(SubvolUuid(u)),
            _ => Err(bad()),
        }
    }
}

impl TryFrom<String> for SubvolUuid {
    type Error = String;
    fn try_from(s: String) -> Result<SubvolUuid, String> {
        s.parse()
    }
}

impl From<SubvolUuid> for String {
    fn from(u: SubvolUuid) -> String {
        u.to_string()
    }
}

impl fmt::Display for SubvolUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.hyphenated())
    }
}

/// What the target finds in a move's staging area, one entry (`backends::btrfs::sendrecv`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    /// The entry's name.
    pub name: String,
    /// Whether it is a subvolume.
    pub subvolume: bool,
    /// Whether it is a read-only subvolume.
    pub read_only: bool,
    /// Its own UUID (a subvolume's).
    pub uuid: Option<SubvolUuid>,
    /// The UUID of the subvolume it was received as (`btrfs receive` sets it).
    pub received_uuid: Option<SubvolUuid>,
    /// The UUID of the local subvolume it is a snapshot of (an incremental stream's parent).
    pub parent_uuid: Option<SubvolUuid>,
}

/// The MAC of a move stream.
pub type StreamMac = hmac::Hmac<sha2::Sha256>;

/// A move's id: a lowercase UUID (the source makes it; the target takes each one once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MoveId(uuid::Uuid);

/// Why a string is not a move id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid move id {0:?}: expected a lowercase UUID")]
pub struct InvalidMoveId(pub String);

impl MoveId {
    /// A fresh random id.
    pub fn new() -> MoveId {
        MoveId(uuid::Uuid::new_v4())
    }
}

impl Default for MoveId {
    fn default() -> MoveId {
        MoveId::new()
    }
}

impl FromStr for MoveId {
    type Err = InvalidMoveId;
    fn from_str(s: &str) -> Result<MoveId, InvalidMoveId> {
        let bad = || InvalidMoveId(s.chars().take(64).collect());
        if s.len() != 36 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad());
        }
        uuid::Uuid::parse_str(s).map(MoveId).map_err(|_| bad())
    }
}

impl fmt::Display for MoveId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.hyphenated())
    }
}

/// The first line of a move stream: which move, which place in it, which subvolume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The move.
    pub move_id: String,
    /// The project moved.
    pub project_id: String,
    /// The stream's sequence number in the move: the target takes each once, increasing only.
    pub seq: u64,
    /// The subvolume the stream creates: a snapshot's name, or a live state's ([`live_name`]).
    pub name: String,
    /// The subvolume it is incremental to (`btrfs send -p`): one the target already holds for
    /// this move; `None`: a whole subvolume.
    #[serde(default)]
    pub parent: Option<String>,
    /// The subvolume's identity in the stream ([`SubvolUuid::send_identity`]): the target
    /// wants it as the received subvolume's received UUID.
    pub uuid: SubvolUuid,
    /// The parent's identity in the stream (with `parent` only): the target wants it as the
    /// received UUID of the parent it holds, and the new subvolume a snapshot of that one.
    #[serde(default)]
    pub parent_uuid: Option<SubvolUuid>,
    /// The project's run config on the source (limits, image, disk quota).
    pub config: RunConfig,
    /// Whether the target starts the project once placed.
    #[serde(default)]
    pub start: bool,
    /// Set on the final stream (whose subvolume is the live state after the stop): the project's
    /// snapshots, oldest first, all already received; the target then places the project.
    #[serde(default)]
    pub last: Option<Vec<String>>,
}

/// Why a manifest is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// Not valid JSON of the manifest's shape.
    #[error("manifest: {0}")]
    Shape(String),
    /// It names another move or project than the request.
    #[error("manifest is for {what} {got}, not {want}")]
    Mismatch {
        /// which field
        what: &'static str,
        /// what the manifest says
        got: String,
        /// what the request says
        want: String,
    },
    /// A subvolume name is not valid, repeated, or there are too many.
    #[error("manifest snapshots: {0}")]
    Snapshots(String),
}

impl Manifest {
    /// Parses and checks a manifest line against the move and project of the request.
    pub fn parse(line: &[u8], move_id: MoveId, id: ProjectId) -> Result<Manifest, ManifestError> {
        let m: Manifest =
            serde_json::from_slice(line).map_err(|e| ManifestError::Shape(e.to_string()))?;
        if m.move_id != move_id.to_string() {
            return Err(ManifestError::Mismatch {
                what: "move",
                got: m.move_id.chars().take(64).collect(),
                want: move_id.to_string(),
            });
        }
        if m.project_id != id.to_string() {
            return Err(ManifestError::Mismatch {
                what: "project",
                got: m.project_id.chars().take(64).collect(),
                want: id.to_string(),
            });
        }
        let valid = |n: &str| n.parse::<SnapshotName>().is_ok() || is_live_name(&move_id, n);
        if !valid(&m.name) {
            return Err(ManifestError::Snapshots(format!(
                "{:?} is neither a snapshot name nor this move's live state",
                m.name.chars().take(80).collect::<String>()
            )));
        }
        if let Some(p) = &m.parent
            && !valid(p)
        {
            return Err(ManifestError::Snapshots(format!(
                "parent {:?} is neither a snapshot name nor this move's live state",
                p.chars().take(80).collect::<String>()
            )));
        }
        if m.parent.is_some() != m.parent_uuid.is_some() {
            return Err(ManifestError::Shape(
                "parent and parent_uuid go together (an incremental stream names both)".into(),
            ));
        }
        if m.last.is_some() && !is_live_name(&move_id, &m.name) {
            return Err(ManifestError::Snapshots(
                "the final stream must carry the live state".into(),
            ));
        }
        m.snapshot_names()?;
        m.config
            .validate()
            .map_err(|e| ManifestError::Shape(format!("config: {e}")))?;
        Ok(m)
    }

    /// The final stream's snapshot names, validated (no repeats, at most [`MAX_SNAPSHOTS`]);
    /// empty for another stream.
    pub fn snapshot_names(&self) -> Result<Vec<SnapshotName>, ManifestError> {
        let Some(snaps) = &self.last else {
            return Ok(Vec::new());
        };
        if snaps.len() > MAX_SNAPSHOTS {
            return Err(ManifestError::Snapshots(format!(
                "{} snapshots, at most {MAX_SNAPSHOTS}",
                snaps.len()
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        snaps
            .iter()
            .map(|s| {
                let n: SnapshotName = s
                    .parse()
                    .map_err(|e| ManifestError::Snapshots(format!("{e}")))?;
                if !seen.insert(s.clone()) {
                    return Err(ManifestError::Snapshots(format!("{s} twice")));
                }
                Ok(n)
            })
            .collect()
    }
}

/// What the target holds of a move in progress (kept beside its staging area, so a move
/// survives a broken connection or a daemon restart): `GET /projects/:id/receive/:move`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetState {
    /// The move.
    pub move_id: String,
    /// The project.
    pub project_id: String,
    /// The highest sequence number taken (0: none): the next stream must carry a higher one.
    pub last_seq: u64,
    /// The subvolumes received whole and checked, in the order they arrived.
    pub received: Vec<String>,
    /// The final stream was received and the project placed here (the move is done).
    #[serde(default)]
    pub placed: bool,
}

impl TargetState {
    /// A move's record before its first stream.
    pub fn new(mv: &MoveId, id: &ProjectId) -> TargetState {
        TargetState {
            move_id: mv.to_string(),
            project_id: id.to_string(),
            last_seq: 0,
            received: Vec::new(),
            placed: false,
        }
    }

    /// Whether a stream with manifest `m` may be received next (its MAC already checked): a
    /// sequence number never taken and above every one taken (no replay, no reordering), a
    /// subvolume not held yet, a parent held, and for the final stream every announced
    /// snapshot held.
    pub fn accept(&self, m: &Manifest) -> Result<(), String> {
        if m.seq <= self.last_seq {
            return Err(format!(
                "stream {} of this move comes after stream {}: a stream is taken once and in order (a replay?)",
                m.seq, self.last_seq
            ));
        }
        if self.received.contains(&m.name) {
            return Err(format!("{} was received before", m.name));
        }
        if self.received.len() >= MAX_SNAPSHOTS + 16 {
            return Err("too many subvolumes in one move".into());
        }
        if let Some(p) = &m.parent
            && !self.received.contains(p)
        {
            return Err(format!(
                "the stream is incremental to {p}, which this host did not receive"
            ));
        }
        if let Some(snaps) = &m.last
            && let Some(s) = snaps.iter().find(|s| !self.received.contains(s))
        {
            return Err(format!("snapshot {s} was announced but never received"));
        }
        Ok(())
    }
}

/// What the source still has to send of its snapshots (oldest first) given what the target
/// holds (`received`, in arrival order), and the parent of the first of them: the newest
/// subvolume the target holds that the source still has (`source_has`). A resumed move sends
/// nothing the target holds.
pub fn plan(
    snapshots: &[String],
    received: &[String],
    source_has: impl Fn(&str) -> bool,
) -> (Vec<String>, Option<String>) {
    let parent = received.iter().rev().find(|r| source_has(r)).cloned();
    let todo = snapshots
        .iter()
        .filter(|s| !received.contains(s))
        .cloned()
        .collect();
    (todo, parent)
}

/// The MAC of a stream bound to a move token.
pub fn mac(token: &str) -> StreamMac {
    // HMAC takes a key of any length
    <StreamMac as KeyInit>::new_from_slice(token.as_bytes()).unwrap_or_else(|_| unreachable!())
}

/// Whether `trailer` is the MAC of what `m` saw (constant time).
pub fn verify(m: StreamMac, trailer: &[u8]) -> bool {
    m.verify_slice(trailer).is_ok()
}

/// Compares what the staging area holds with what the manifest announced: exactly the expected
/// names, each a read-only subvolume.
pub fn check_received(expected: &[String], found: &[Staged]) -> Result<(), String> {
    let mut want: Vec<&str> = expected.iter().map(String::as_str).collect();
    want.sort_unstable();
    let mut got: Vec<&str> = found.iter().map(|s| s.name.as_str()).collect();
    got.sort_unstable();
    if want != got {
        let extra: Vec<&&str> = got.iter().filter(|n| !want.contains(n)).collect();
        let missing: Vec<&&str> = want.iter().filter(|n| !got.contains(n)).collect();
        return Err(format!(
            "the stream did not create exactly the announced subvolumes (unexpected: {extra:?}, missing: {missing:?})"
        ));
    }
    for s in found {
        let n = &s.name;
        if !s.subvolume {
            return Err(format!("{n:?} is not a subvolume"));
        }
        if !s.read_only {
            return Err(format!("{n:?} is not read-only (not a received snapshot)"));
        }
    }
    Ok(())
}

/// Checks the lineage of the subvolume a stream created (`m.name`, found in `found` with what
/// was received before): it is the announced subvolume (its received UUID is `m.uuid`), and it
/// was received against the announced parent: a snapshot of the staged parent whose received
/// UUID is `m.parent_uuid`; a whole stream's subvolume is a snapshot of nothing.
pub fn check_lineage(m: &Manifest, found: &[Staged]) -> Result<(), String> {
    let get = |n: &str| {
        found
            .iter()
            .find(|s| s.name == n)
            .ok_or_else(|| format!("{n:?} is not in the staging area"))
    };
    let show = |u: Option<SubvolUuid>| u.map_or_else(|| "none".to_string(), |u| u.to_string());
    let new = get(&m.name)?;
    if new.received_uuid != Some(m.uuid) {
        return Err(format!(
            "{:?} is not the announced subvolume (received UUID {}, announced {}): an unrelated stream under its name?",
            m.name,
            show(new.received_uuid),
            m.uuid
        ));
    }
    match (&m.parent, m.parent_uuid) {
        (Some(p), Some(pu)) => {
            let parent = get(p)?;
            if parent.received_uuid != Some(pu) {
                return Err(format!(
                    "the parent {p:?} held here is not the announced one (received UUID {}, announced {pu})",
                    show(parent.received_uuid)
                ));
            }
            if parent.uuid.is_none() || new.parent_uuid != parent.uuid {
                return Err(format!(
                    "{:?} was not received against its announced parent {p:?} (its parent UUID {}, {p:?} is {})",
                    m.name,
                    show(new.parent_uuid),
                    show(parent.uuid)
                ));
            }
        }
        (None, None) => {
            if let Some(pu) = new.parent_uuid {
                return Err(format!(
                    "{:?} was announced whole but was received as a snapshot of {pu}",
                    m.name
                ));
            }
        }
        _ => return Err("parent and parent_uuid go together".into()),
    }
    Ok(())
}

/// One command of a `btrfs send` stream as the target's check before `btrfs receive` sees it
/// (`backends::btrfs` reads the spooled stream into these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamOp<'a> {
    /// `subvol` (whole, `parent: None`) or `snapshot` (incremental to `parent`): the subvolume
    /// the stream creates, under `path` in the staging area
    Begin {
        /// its name
        path: &'a str,
        /// its identity in the stream (the received UUID it gets)
        uuid: SubvolUuid,
        /// the subvolume it is a snapshot of
        parent: Option<SubvolUuid>,
    },
    /// `clone`: extents copied from the subvolume that `btrfs receive` finds by this UUID
    Clone(SubvolUuid),
    /// a path a command names inside the subvolume (a symlink's target is not one)
    Path(&'a str),
    /// `end`
    End,
}

/// Checks a stream's commands against its manifest before `btrfs receive` reads it: it creates
/// exactly the announced subvolume (name, UUID, whole or a snapshot of the announced parent),
/// it clones only from that subvolume or that parent, every path stays inside it (relative, no
/// `..`), and nothing follows its end. `btrfs receive -m` finds a clone source by UUID anywhere
/// on the filesystem, so without this a stream could copy extents of any subvolume whose UUID
/// it knows (with [`SubvolUuid`]s unique on the target, which the backend checks).
#[derive(Debug)]
pub struct StreamCheck<'m> {
    m: &'m Manifest,
    commands: u64,
    begun: bool,
    ended: bool,
}

impl<'m> StreamCheck<'m> {
    /// A check of the stream `m` announces.
    pub fn new(m: &'m Manifest) -> StreamCheck<'m> {
        StreamCheck {
            m,
            commands: 0,
            begun: false,
            ended: false,
        }
    }

    /// Takes the next command.
    pub fn op(&mut self, op: StreamOp<'_>) -> Result<(), String> {
        let m = self.m;
        if self.ended {
            return Err("an extra command after the stream's end command".into());
        }
        self.commands += 1;
        if !self.begun && !matches!(op, StreamOp::Begin { .. }) {
            return Err("the stream does not begin with the subvolume it creates".into());
        }
        match op {
            StreamOp::Begin { path, uuid, parent } => {
                if self.begun {
                    return Err(format!(
                        "an extra subvolume {:?} in the stream: one stream creates one subvolume",
                        trunc(path)
                    ));
                }
                self.begun = true;
                if path != m.name {
                    return Err(format!(
                        "the stream creates {:?}, not the announced {:?}",
                        trunc(path),
                        m.name
                    ));
                }
                if uuid != m.uuid {
                    return Err(format!(
                        "{:?} is not the announced subvolume (the stream's UUID {uuid}, announced {}): an unrelated stream under its name?",
                        m.name, m.uuid
                    ));
                }
                match (parent, m.parent_uuid) {
                    (None, None) => {}
                    (Some(got), Some(want)) if got == want => {}
                    (None, Some(_)) => {
                        return Err(format!(
                            "{:?} was not received against its announced parent {:?}: the stream is whole",
                            m.name,
                            m.parent.as_deref().unwrap_or_default()
                        ));
                    }
                    (Some(got), _) => {
                        return Err(format!(
                            "{:?} is a snapshot of {got} in the stream, not of the announced parent ({})",
                            m.name,
                            m.parent_uuid
                                .map_or_else(|| "none".to_string(), |u| u.to_string())
                        ));
                    }
                }
            }
            StreamOp::Clone(from) => {
                if from != m.uuid && Some(from) != m.parent_uuid {
                    return Err(format!(
                        "the stream clones data from subvolume {from}, neither its own nor its announced parent: a stream may not copy another subvolume's data"
                    ));
                }
            }
            StreamOp::Path(p) => {
                let bad = p.starts_with('/') || p.split('/').any(|c| c == "..") || p.contains('\0');
                if bad {
                    return Err(format!(
                        "the stream names the path {:?}, outside its subvolume",
                        trunc(p)
                    ));
                }
            }
            StreamOp::End => self.ended = true,
        }
        Ok(())
    }

    /// The stream is over: it must have created its subvolume and ended.
    pub fn finish(self) -> Result<(), String> {
        if !self.begun {
            return Err("the stream creates no subvolume".into());
        }
        if !self.ended {
            return Err("the stream stops before its end command".into());
        }
        Ok(())
    }
}

/// At most 64 characters of a name from a stream, for an error message.
fn trunc(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Whether a move's staging area, last touched at `touched_ms`, has been idle longer than `ttl`
/// at `now_ms` (the sweep deletes it then).
pub fn expired(touched_ms: u64, now_ms: u64, ttl: std::time::Duration) -> bool {
    now_ms.saturating_sub(touched_ms) > ttl.as_millis() as u64
}

/// The most bytes a stream may hold: the disk quota once per subvolume it carries (each
/// snapshot and the live state may at worst hold the whole quota), bounded by `free` (the space
/// the target can give without touching its reserve). Without a quota, `free` alone.
pub fn max_stream_bytes(quota: Option<u64>, subvolumes: usize, free: u64) -> u64 {
    match quota {
        Some(q) => q.saturating_mul(subvolumes as u64).min(free),
        None => free,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "6f1c2d3e-0000-4000-8000-000000000001";

    const U1: &str = "0b5c3d9e-1111-4a2b-9c3d-000000000001";
    const U2: &str = "0b5c3d9e-1111-4a2b-9c3d-000000000002";
    const U3: &str = "0b5c3d9e-1111-4a2b-9c3d-000000000003";
    const U4: &str = "0b5c3d9e-1111-4a2b-9c3d-000000000004";

    fn u(s: &str) -> SubvolUuid {
        s.parse().unwrap()
    }

    fn m(mv: &MoveId, seq: u64, name: &str, parent: Option<&str>) -> Manifest {
        Manifest {
            move_id: mv.to_string(),
            project_id: P.into(),
            seq,
            name: name.into(),
            parent: parent.map(Into::into),
            uuid: u(U1),
            parent_uuid: parent.map(|_| u(U2)),
            config: RunConfig::default(),
            start: false,
            last: None,
        }
    }

    /// Runs `ops` through a [`StreamCheck`] of `m`: the first error, else `finish`'s answer.
    fn check(m: &Manifest, ops: &[StreamOp<'_>]) -> Result<(), String> {
        let mut c = StreamCheck::new(m);
        for op in ops {
            c.op(*op)?;
        }
        c.finish()
    }

    #[test]
    fn a_stream_creates_exactly_its_announced_subvolume_and_clones_only_from_its_lineage() {
        use StreamOp::{Begin, Clone, End, Path};
        let mv = MoveId::new();
        let whole = m(&mv, 1, "snap1", None);
        let inc = m(&mv, 2, "snap2", Some("snap1"));
        let begin_whole = Begin {
            path: "snap1",
            uuid: u(U1),
            parent: None,
        };
        let begin_inc = Begin {
            path: "snap2",
            uuid: u(U1),
            parent: Some(u(U2)),
        };
        // what btrfs send writes: accepted (clones from itself, and from the parent when
        // incremental; the root's own path is empty; a symlink's target is not a path)
        let ok = [
            begin_whole,
            Path(""),
            Path("o257-7-0"),
            Path("dir/f"),
            Clone(u(U1)),
            End,
        ];
        assert_eq!(check(&whole, &ok), Ok(()));
        assert_eq!(
            check(
                &inc,
                &[begin_inc, Path("f"), Clone(u(U2)), Clone(u(U1)), End]
            ),
            Ok(())
        );
        let err = |m: &Manifest, ops: &[StreamOp<'_>], want: &str| {
            let e = check(m, ops).expect_err(want);
            assert!(e.contains(want), "{want:?} not in {e:?}");
        };
        // a clone source outside its lineage: the attack this check exists for
        err(
            &whole,
            &[begin_whole, Clone(u(U3)), End],
            "clones data from",
        );
        err(&inc, &[begin_inc, Clone(u(U3)), End], "clones data from");
        // a whole stream may not clone from a parent it does not have
        err(
            &whole,
            &[begin_whole, Clone(u(U2)), End],
            "clones data from",
        );
        // one subvolume per stream, created first, under its name, with its UUID and parent
        err(
            &whole,
            &[begin_whole, End, begin_whole],
            "after the stream's end",
        );
        err(
            &whole,
            &[
                begin_whole,
                Begin {
                    path: "extra",
                    uuid: u(U3),
                    parent: None,
                },
                End,
            ],
            "extra subvolume",
        );
        err(&whole, &[Path("f"), begin_whole, End], "does not begin");
        err(
            &whole,
            &[
                Begin {
                    path: "../../escape",
                    uuid: u(U1),
                    parent: None,
                },
                End,
            ],
            "not the announced",
        );
        err(
            &whole,
            &[
                Begin {
                    path: "snap1",
                    uuid: u(U4),
                    parent: None,
                },
                End,
            ],
            "not the announced subvolume",
        );
        err(&inc, &[begin_whole, End], "not the announced");
        err(
            &inc,
            &[
                Begin {
                    path: "snap2",
                    uuid: u(U1),
                    parent: None,
                },
                End,
            ],
            "not received against",
        );
        err(
            &inc,
            &[
                Begin {
                    path: "snap2",
                    uuid: u(U1),
                    parent: Some(u(U3)),
                },
                End,
            ],
            "snapshot of",
        );
        err(&whole, &[begin_inc, End], "not the announced");
        // paths stay inside the subvolume
        for p in ["/etc/shadow", "../x", "a/../../x", "..", "a\0b"] {
            err(
                &whole,
                &[begin_whole, Path(p), End],
                "outside its subvolume",
            );
        }
        // whole: begun and ended
        err(&whole, &[], "creates no subvolume");
        err(&whole, &[begin_whole, Path("f")], "stops before its end");
    }

    #[test]
    fn move_ids_are_lowercase_uuids() {
        let m = MoveId::new();
        assert_eq!(m.to_string().parse::<MoveId>(), Ok(m));
        for bad in [
            "",
            "x",
            "../etc",
            &m.to_string().to_uppercase(),
            "6f1c2d3e00004000800000000000000001",
        ] {
            assert!(bad.parse::<MoveId>().is_err(), "{bad}");
        }
        assert!(is_live_name(&m, &live_name(&m, 7)));
        let other = MoveId::new();
        for bad in [
            live_name(&other, 7),
            format!(".move-{m}-"),
            format!(".move-{m}-1/x"),
            format!(".move-{m}"),
        ] {
            assert!(!is_live_name(&m, &bad), "{bad}");
        }
    }

    #[test]
    fn manifest_is_bound_to_the_move_and_project() {
        let mv = MoveId::new();
        let id: ProjectId = P.parse().unwrap();
        let line = |m: &Manifest| serde_json::to_vec(m).unwrap();
        let a = m(&mv, 1, "a", None);
        assert_eq!(Manifest::parse(&line(&a), mv, id), Ok(a.clone()));
        let other = MoveId::new();
        assert!(matches!(
            Manifest::parse(&line(&a), other, id),
            Err(ManifestError::Mismatch { what: "move", .. })
        ));
        let id2: ProjectId = "6f1c2d3e-0000-4000-8000-000000000002".parse().unwrap();
        assert!(matches!(
            Manifest::parse(&line(&a), mv, id2),
            Err(ManifestError::Mismatch {
                what: "project",
                ..
            })
        ));
        assert!(matches!(
            Manifest::parse(b"{\"move_id\":1}", mv, id),
            Err(ManifestError::Shape(_))
        ));
        // names that could name a path, another move's live state, a repeat
        let live = live_name(&mv, 3);
        let bad: Vec<Manifest> = vec![
            m(&mv, 1, "../x", None),
            m(&mv, 1, "a/b", None),
            m(&mv, 1, &live_name(&other, 1), None),
            m(&mv, 1, "a", Some("../../etc")),
            Manifest {
                last: Some(vec!["a".into()]),
                ..m(&mv, 2, "b", None)
            },
            Manifest {
                last: Some(vec!["a".into(), "a".into()]),
                ..m(&mv, 2, &live, None)
            },
            Manifest {
                last: Some(vec!["../a".into()]),
                ..m(&mv, 2, &live, None)
            },
        ];
        for b in bad {
            assert!(
                matches!(
                    Manifest::parse(&line(&b), mv, id),
                    Err(ManifestError::Snapshots(_))
                ),
                "{b:?}"
            );
        }
        let fin = Manifest {
            last: Some(vec!["a".into()]),
            ..m(&mv, 2, &live, Some("a"))
        };
        assert!(Manifest::parse(&line(&fin), mv, id).is_ok());
    }

    #[test]
    fn the_target_takes_streams_once_in_order_with_a_parent_it_holds() {
        let mv = MoveId::new();
        let id: ProjectId = P.parse().unwrap();
        let mut st = TargetState::new(&mv, &id);
        assert!(st.accept(&m(&mv, 1, "a", None)).is_ok());
        // a parent never received
        assert!(st.accept(&m(&mv, 1, "b", Some("a"))).is_err());
        st.last_seq = 1;
        st.received.push("a".into());
        // replayed or reordered: seq not above the last taken
        assert!(st.accept(&m(&mv, 1, "b", Some("a"))).is_err());
        assert!(st.accept(&m(&mv, 0, "b", Some("a"))).is_err());
        // the same subvolume twice
        assert!(st.accept(&m(&mv, 2, "a", None)).is_err());
        assert!(st.accept(&m(&mv, 2, "b", Some("a"))).is_ok());
        // a gap is fine (a stream that broke took its number)
        assert!(st.accept(&m(&mv, 5, "b", Some("a"))).is_ok());
        let live = live_name(&mv, 6);
        let fin = |snaps: &[&str]| Manifest {
            last: Some(snaps.iter().map(|s| s.to_string()).collect()),
            ..m(&mv, 6, &live, Some("a"))
        };
        assert!(st.accept(&fin(&["a"])).is_ok());
        assert!(st.accept(&fin(&["a", "b"])).is_err(), "b never received");
    }

    #[test]
    fn a_resumed_move_sends_only_what_the_target_lacks() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let all = |_: &str| true;
        assert_eq!(
            plan(&s(&["a", "b", "c"]), &[], all),
            (s(&["a", "b", "c"]), None)
        );
        assert_eq!(
            plan(&s(&["a", "b", "c"]), &s(&["a", "b"]), all),
            (s(&["c"]), Some("b".into()))
        );
        // the target holds a pre-copied live state the source still has: the parent of what
        // follows; one the source lost is skipped for the newest it has
        assert_eq!(
            plan(&s(&["a", "b"]), &s(&["a", "b", ".m-1"]), all),
            (vec![], Some(".m-1".into()))
        );
        assert_eq!(
            plan(&s(&["a", "b"]), &s(&["a", "b", ".m-1"]), |n| n != ".m-1"),
            (vec![], Some("b".into()))
        );
        // a snapshot made after the interruption is sent incremental to what the target holds
        assert_eq!(
            plan(&s(&["a", "b", "n"]), &s(&["a", "b"]), all),
            (s(&["n"]), Some("b".into()))
        );
    }

    #[test]
    fn mac_detects_tampering_truncation_and_another_key() {
        let data = b"manifest\nstream bytes";
        let mut m = mac("token-1");
        m.update(data);
        let tag = m.finalize().into_bytes();
        let check = |key: &str, d: &[u8]| {
            let mut m = mac(key);
            m.update(d);
            verify(m, &tag)
        };
        assert!(check("token-1", data));
        assert!(!check("token-2", data));
        assert!(!check("token-1", &data[..data.len() - 1]));
        let mut t = data.to_vec();
        t[3] ^= 1;
        assert!(!check("token-1", &t));
    }

    #[test]
    fn received_must_be_exactly_the_announced_read_only_subvolumes() {
        const LIVE: &str = ".move-x";
        let want = vec!["a".to_string(), LIVE.to_string()];
        let st = |n: &str, subvolume: bool, read_only: bool| Staged {
            name: n.into(),
            subvolume,
            read_only,
            uuid: None,
            received_uuid: None,
            parent_uuid: None,
        };
        let ok = |n: &str| st(n, true, true);
        assert!(check_received(&want, &[ok(LIVE), ok("a")]).is_ok());
        let e = check_received(&want, &[ok("a"), ok(LIVE), ok("evil")]).unwrap_err();
        assert!(e.contains("evil"), "{e}");
        assert!(check_received(&want, &[ok("a")]).is_err());
        assert!(check_received(&want, &[ok("a"), st(LIVE, false, true)]).is_err());
        assert!(check_received(&want, &[ok("a"), st(LIVE, true, false)]).is_err());
    }

    #[test]
    fn subvolume_uuids_are_validated() {
        assert_eq!(u(U1).to_string(), U1);
        for bad in [
            "",
            "-",
            &U1.to_uppercase(),
            "00000000-0000-0000-0000-000000000000",
            "x",
        ] {
            assert!(bad.parse::<SubvolUuid>().is_err(), "{bad}");
        }
        let j: Result<SubvolUuid, _> = serde_json::from_str("\"../etc\"");
        assert!(j.is_err());
        assert_eq!(serde_json::to_string(&u(U1)).unwrap(), format!("\"{U1}\""));
        assert_eq!(SubvolUuid::send_identity(u(U1), None), u(U1));
        assert_eq!(SubvolUuid::send_identity(u(U1), Some(u(U2))), u(U2));
        // a manifest names parent and parent_uuid together
        let mv = MoveId::new();
        let id: ProjectId = P.parse().unwrap();
        let half = Manifest {
            parent_uuid: None,
            ..m(&mv, 2, "b", Some("a"))
        };
        let line = serde_json::to_vec(&half).unwrap();
        assert!(matches!(
            Manifest::parse(&line, mv, id),
            Err(ManifestError::Shape(_))
        ));
        let orphan = Manifest {
            parent_uuid: Some(u(U2)),
            ..m(&mv, 2, "b", None)
        };
        let line = serde_json::to_vec(&orphan).unwrap();
        assert!(Manifest::parse(&line, mv, id).is_err());
    }

    /// The target's staging area after receiving `b` incremental to `a`: `a` (local U3,
    /// received as U2) and `b` (local U4, received as U1, a snapshot of U3).
    fn staged_chain() -> Vec<Staged> {
        vec![
            Staged {
                name: "a".into(),
                subvolume: true,
                read_only: true,
                uuid: Some(u(U3)),
                received_uuid: Some(u(U2)),
                parent_uuid: None,
            },
            Staged {
                name: "b".into(),
                subvolume: true,
                read_only: true,
                uuid: Some(u(U4)),
                received_uuid: Some(u(U1)),
                parent_uuid: Some(u(U3)),
            },
        ]
    }

    #[test]
    fn the_received_subvolume_must_be_the_announced_one_against_the_announced_parent() {
        let mv = MoveId::new();
        let good = m(&mv, 2, "b", Some("a"));
        assert_eq!(check_lineage(&good, &staged_chain()), Ok(()));
        // an unrelated subvolume under the announced name
        let e = check_lineage(
            &Manifest {
                uuid: u(U3),
                ..good.clone()
            },
            &staged_chain(),
        )
        .unwrap_err();
        assert!(e.contains("not the announced subvolume"), "{e}");
        // never received (a plain directory or a subvolume made otherwise)
        let mut f = staged_chain();
        f[1].received_uuid = None;
        assert!(check_lineage(&good, &f).is_err());
        // the parent held is not the announced one
        let e = check_lineage(
            &Manifest {
                parent_uuid: Some(u(U4)),
                ..good.clone()
            },
            &staged_chain(),
        )
        .unwrap_err();
        assert!(e.contains("parent"), "{e}");
        // received against another subvolume than the announced parent
        let mut f = staged_chain();
        f[1].parent_uuid = Some(u(U2));
        let e = check_lineage(&good, &f).unwrap_err();
        assert!(e.contains("not received against"), "{e}");
        // announced incremental, received whole
        let mut f = staged_chain();
        f[1].parent_uuid = None;
        assert!(check_lineage(&good, &f).is_err());
        // announced whole, received as a snapshot of something
        let whole = m(&mv, 2, "b", None);
        let e = check_lineage(&whole, &staged_chain()).unwrap_err();
        assert!(e.contains("announced whole"), "{e}");
        let mut f = staged_chain();
        f[1].parent_uuid = None;
        assert_eq!(check_lineage(&whole, &f), Ok(()));
        // the subvolume is missing
        assert!(check_lineage(&m(&mv, 3, "c", None), &f).is_err());
    }

    #[test]
    fn staging_expires_after_its_ttl_idle() {
        let ttl = std::time::Duration::from_secs(10);
        assert!(!expired(1_000, 1_000, ttl));
        assert!(!expired(1_000, 11_000, ttl));
        assert!(expired(1_000, 11_001, ttl));
        // touched in the future (a clock step back): not expired
        assert!(!expired(20_000, 11_001, ttl));
    }

    #[test]
    fn stream_size_bound() {
        assert_eq!(max_stream_bytes(Some(10), 3, 100), 30);
        assert_eq!(max_stream_bytes(Some(10), 3, 20), 20);
        assert_eq!(max_stream_bytes(None, 3, 20), 20);
        assert_eq!(max_stream_bytes(Some(u64::MAX), 3, 20), 20);
    }
}
