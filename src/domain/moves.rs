//! Moving a project to another host (docs/moves.md): the move id, the stream's manifest and the
//! stream's binding to one move (an HMAC-SHA256 trailer keyed by the move token). Pure logic; the
//! core drives the move, `backends::btrfs::sendrecv` runs `btrfs send`/`receive`.
//!
//! A move stream is `manifest line (JSON, \n) · btrfs send streams, concatenated · 32-byte
//! HMAC-SHA256` where the HMAC covers everything before it and is keyed by the bearer token the
//! source was given for the target (a secret only the master, the source and the target hold).
//! The manifest names the move id and the project, so a stream is bound to one move: the target
//! accepts each move id once, checks the manifest against the URL and the token's scope, and runs
//! `btrfs receive` only on a whole stream whose trailer checks out (a truncated, tampered or
//! replayed stream never reaches btrfs).
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
/// The name of the live state's subvolume in a move's stream (`btrfs send` names a subvolume
/// by its path's last component; never a snapshot name: those cannot start with a dot).
pub fn live_name(mv: &MoveId) -> String {
    format!(".move-{mv}")
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

/// The first line of a move stream: what follows, for which move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The move.
    pub move_id: String,
    /// The project moved.
    pub project_id: String,
    /// The snapshots, oldest first; each is sent incremental to the one before it, and the live
    /// state ([`live_name`]) last, incremental to the newest snapshot.
    pub snapshots: Vec<String>,
    /// The project's run config on the source (limits, image, disk quota).
    pub config: RunConfig,
    /// Whether the target starts the project once placed.
    #[serde(default)]
    pub start: bool,
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
    /// A snapshot name is not valid, repeated, or there are too many.
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
        m.snapshot_names()?;
        m.config
            .validate()
            .map_err(|e| ManifestError::Shape(format!("config: {e}")))?;
        Ok(m)
    }

    /// The snapshot names, validated (no repeats, at most [`MAX_SNAPSHOTS`]).
    pub fn snapshot_names(&self) -> Result<Vec<SnapshotName>, ManifestError> {
        if self.snapshots.len() > MAX_SNAPSHOTS {
            return Err(ManifestError::Snapshots(format!(
                "{} snapshots, at most {MAX_SNAPSHOTS}",
                self.snapshots.len()
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        self.snapshots
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

    /// Every subvolume the stream must create, in stream order (the snapshots, then the live
    /// state, [`live_name`]).
    pub fn expected(&self, mv: &MoveId) -> Vec<String> {
        self.snapshots
            .iter()
            .cloned()
            .chain(std::iter::once(live_name(mv)))
            .collect()
    }
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
/// names, each a read-only subvolume. `found` is (name, is_subvolume, read_only).
pub fn check_received(expected: &[String], found: &[(String, bool, bool)]) -> Result<(), String> {
    let mut want: Vec<&str> = expected.iter().map(String::as_str).collect();
    want.sort_unstable();
    let mut got: Vec<&str> = found.iter().map(|(n, _, _)| n.as_str()).collect();
    got.sort_unstable();
    if want != got {
        let extra: Vec<&&str> = got.iter().filter(|n| !want.contains(n)).collect();
        let missing: Vec<&&str> = want.iter().filter(|n| !got.contains(n)).collect();
        return Err(format!(
            "the stream did not create exactly the announced subvolumes (unexpected: {extra:?}, missing: {missing:?})"
        ));
    }
    for (n, subvol, ro) in found {
        if !subvol {
            return Err(format!("{n:?} is not a subvolume"));
        }
        if !ro {
            return Err(format!("{n:?} is not read-only (not a received snapshot)"));
        }
    }
    Ok(())
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

    fn manifest(mv: &MoveId) -> Vec<u8> {
        serde_json::to_vec(&Manifest {
            move_id: mv.to_string(),
            project_id: P.into(),
            snapshots: vec!["a".into(), "b".into()],
            config: RunConfig::default(),
            start: false,
        })
        .unwrap()
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
    }

    #[test]
    fn manifest_is_bound_to_the_move_and_project() {
        let mv = MoveId::new();
        let id: ProjectId = P.parse().unwrap();
        let m = Manifest::parse(&manifest(&mv), mv, id).unwrap();
        assert_eq!(
            m.expected(&mv),
            vec!["a".to_string(), "b".into(), live_name(&mv)]
        );
        let other = MoveId::new();
        assert!(matches!(
            Manifest::parse(&manifest(&mv), other, id),
            Err(ManifestError::Mismatch { what: "move", .. })
        ));
        let id2: ProjectId = "6f1c2d3e-0000-4000-8000-000000000002".parse().unwrap();
        assert!(matches!(
            Manifest::parse(&manifest(&mv), mv, id2),
            Err(ManifestError::Mismatch {
                what: "project",
                ..
            })
        ));
        assert!(matches!(
            Manifest::parse(b"{\"move_id\":1}", mv, id),
            Err(ManifestError::Shape(_))
        ));
        // snapshot names that could name a path, the live state, or a repeat
        for bad in [
            r#"["../x"]"#,
            r#"[".move-x"]"#,
            r#"["a","a"]"#,
            r#"["a/b"]"#,
        ] {
            let line = format!(
                r#"{{"move_id":"{mv}","project_id":"{P}","snapshots":{bad},"config":{{}}}}"#
            );
            assert!(
                matches!(
                    Manifest::parse(line.as_bytes(), mv, id),
                    Err(ManifestError::Snapshots(_))
                ),
                "{bad}"
            );
        }
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
        let ok = |n: &str| (n.to_string(), true, true);
        assert!(check_received(&want, &[ok(LIVE), ok("a")]).is_ok());
        let e = check_received(&want, &[ok("a"), ok(LIVE), ok("evil")]).unwrap_err();
        assert!(e.contains("evil"), "{e}");
        assert!(check_received(&want, &[ok("a")]).is_err());
        assert!(check_received(&want, &[ok("a"), (LIVE.into(), false, true)]).is_err());
        assert!(check_received(&want, &[ok("a"), (LIVE.into(), true, false)]).is_err());
    }

    #[test]
    fn stream_size_bound() {
        assert_eq!(max_stream_bytes(Some(10), 3, 100), 30);
        assert_eq!(max_stream_bytes(Some(10), 3, 20), 20);
        assert_eq!(max_stream_bytes(None, 3, 20), 20);
        assert_eq!(max_stream_bytes(Some(u64::MAX), 3, 20), 20);
    }
}
