//! The target's check of a spooled move stream before `btrfs receive` reads it
//! (`domain::moves::StreamCheck` says what is allowed; here the stream is read with the
//! `btrfs-stream` parser and the filesystem is asked which subvolumes hold the UUIDs it names).
//!
//! Why: `btrfs receive -m` finds an incremental stream's parent and every `clone` command's
//! source by *received* UUID anywhere on the filesystem (a parent also by UUID). A stream from a
//! compromised source that the master still authorised could otherwise clone the extents of a
//! subvolume moved here earlier (it knows its UUID: it sent it) into the project it moves, and
//! so read another project's data. So a stream may clone only from itself and its announced
//! parent, and those UUIDs must belong to nothing else on the filesystem.
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use btrfs_stream::{StreamCommand, StreamReader};

use super::sendrecv::subvolume_show;
use super::{BTRFS, Storage};
use crate::cmd;
use crate::domain::moves::{Manifest, MoveId, StreamCheck, StreamOp, SubvolUuid};

/// The largest command a stream may hold. `btrfs send` writes at most 64 KiB (protocol 1) or
/// 16 KiB + 128 KiB of encoded data (2 and 3); a larger length is refused before the parser
/// would allocate a buffer of it.
pub const MAX_COMMAND: u64 = 1 << 20;

/// The stream header: the magic `btrfs-stream\0` and a u32 version.
const HEADER: u64 = 17;
/// A command's header: u32 length, u16 command, u32 CRC.
const COMMAND_HEADER: u64 = 10;
/// The end command's number (btrfs send.h `BTRFS_SEND_C_END`).
const END: u16 = 21;

/// Walks the commands' lengths (not their contents): every one within [`MAX_COMMAND`], the
/// last one ending exactly at the end of the file.
fn frames_bounded(f: &std::fs::File) -> Result<(), String> {
    let len = f
        .metadata()
        .map_err(|e| format!("cannot read the spooled stream: {e}"))?
        .len();
    let mut magic = [0u8; 13];
    if len < HEADER || f.read_exact_at(&mut magic, 0).is_err() || &magic != b"btrfs-stream\0" {
        return Err("not a btrfs send stream (no stream header)".into());
    }
    let mut off = HEADER;
    let mut hdr = [0u8; COMMAND_HEADER as usize];
    while off < len {
        if len - off < COMMAND_HEADER {
            return Err(format!("a truncated command at byte {off}"));
        }
        f.read_exact_at(&mut hdr, off)
            .map_err(|e| format!("cannot read the spooled stream: {e}"))?;
        let n = u64::from(u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]));
        if n > MAX_COMMAND {
            return Err(format!(
                "a command of {n} bytes at byte {off}: more than btrfs send writes"
            ));
        }
        off += COMMAND_HEADER + n;
        // END: a stream ends there (`btrfs receive` would read a second stream after it)
        if u16::from_le_bytes([hdr[4], hdr[5]]) == END && off < len {
            return Err(format!(
                "{} extra bytes after the stream's end command (an extra stream?)",
                len - off
            ));
        }
    }
    if off != len {
        return Err(format!(
            "the last command runs past the end of the stream ({off} > {len} bytes)"
        ));
    }
    Ok(())
}

/// The ops `check` sees of one parsed command.
fn feed(check: &mut StreamCheck<'_>, c: &StreamCommand) -> Result<(), String> {
    use StreamCommand as C;
    let uuid = |u: &uuid::Uuid| SubvolUuid::from_stream(*u);
    match c {
        C::Subvol { path, uuid: u, .. } => check.op(StreamOp::Begin {
            path,
            uuid: uuid(u)?,
            parent: None,
        }),
        C::Snapshot {
            path,
            uuid: u,
            clone_uuid,
            ..
        } => check.op(StreamOp::Begin {
            path,
            uuid: uuid(u)?,
            parent: Some(uuid(clone_uuid)?),
        }),
        C::Clone {
            path,
            clone_uuid,
            clone_path,
            ..
        } => {
            check.op(StreamOp::Path(path))?;
            check.op(StreamOp::Path(clone_path))?;
            check.op(StreamOp::Clone(uuid(clone_uuid)?))
        }
        // a symlink's target is its content, not a path the receive follows
        C::Symlink { path, .. } => check.op(StreamOp::Path(path)),
        C::Rename { from, to } => {
            check.op(StreamOp::Path(from))?;
            check.op(StreamOp::Path(to))
        }
        C::Link { path, target } => {
            check.op(StreamOp::Path(path))?;
            check.op(StreamOp::Path(target))
        }
        C::Mkfile { path }
        | C::Mkdir { path }
        | C::Mknod { path, .. }
        | C::Mkfifo { path }
        | C::Mksock { path }
        | C::Unlink { path }
        | C::Rmdir { path }
        | C::Write { path, .. }
        | C::SetXattr { path, .. }
        | C::RemoveXattr { path, .. }
        | C::Truncate { path, .. }
        | C::Chmod { path, .. }
        | C::Chown { path, .. }
        | C::Utimes { path, .. }
        | C::UpdateExtent { path, .. }
        | C::EncodedWrite { path, .. }
        | C::Fallocate { path, .. }
        | C::Fileattr { path, .. }
        | C::EnableVerity { path, .. } => check.op(StreamOp::Path(path)),
        C::End => check.op(StreamOp::End),
    }
}

/// Reads a stream from `r` through `check` (blocking). `frames_bounded` must have passed on the
/// same bytes when they come from a file.
pub fn check_stream<R: Read>(r: R, check: &mut StreamCheck<'_>) -> Result<(), String> {
    let mut s = StreamReader::new(BufReader::with_capacity(256 * 1024, r))
        .map_err(|e| format!("not a btrfs send stream: {e}"))?;
    while let Some(c) = s
        .next_command()
        .map_err(|e| format!("the stream does not parse: {e}"))?
    {
        feed(check, &c)?;
    }
    Ok(())
}

/// Checks the spooled stream file against its manifest (blocking).
pub fn check_spool(spool: &Path, m: &Manifest) -> Result<(), String> {
    let f = std::fs::File::open(spool).map_err(|e| format!("cannot open the spool: {e}"))?;
    frames_bounded(&f)?;
    let mut check = StreamCheck::new(m);
    check_stream(f, &mut check)?;
    check.finish()
}

/// One subvolume of `btrfs subvolume list -R -u`: its received UUID, its UUID and its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// `received_uuid` (`-`: none)
    pub received_uuid: Option<SubvolUuid>,
    /// `uuid`
    pub uuid: Option<SubvolUuid>,
    /// `path` (relative to the filesystem's top level)
    pub path: String,
}

/// Parses `btrfs subvolume list -R -u` (btrfs-progs 6.x: `ID … received_uuid <u|-> uuid <u>
/// path <p>`).
pub fn parse_list(out: &str) -> Vec<Listed> {
    out.lines()
        .filter_map(|l| {
            let (head, path) = l.split_once(" path ")?;
            let f: Vec<&str> = head.split_whitespace().collect();
            let after = |key: &str| -> Option<SubvolUuid> {
                let i = f.iter().position(|w| *w == key)?;
                f.get(i + 1)?.parse().ok()
            };
            Some(Listed {
                received_uuid: after("received_uuid"),
                uuid: after("uuid"),
                path: path.to_string(),
            })
        })
        .collect()
}

/// Checks the UUIDs a stream names against what the filesystem holds: its own UUID is nobody's
/// received UUID (else `btrfs receive` could take another subvolume for it), and its parent's
/// is exactly the staged parent's (`parent_own`: that subvolume's own UUID). `Err` holds why,
/// without naming the other subvolume (the sender reads it), and that subvolume's path (for
/// the journal).
pub fn unique_uuids(
    listed: &[Listed],
    m: &Manifest,
    parent_own: Option<SubvolUuid>,
) -> Result<(), (String, String)> {
    if let Some(other) = listed.iter().find(|s| s.received_uuid == Some(m.uuid)) {
        return Err((
            format!(
                "the stream's subvolume UUID {} is already the received UUID of another subvolume on this host",
                m.uuid
            ),
            other.path.clone(),
        ));
    }
    if let Some(pu) = m.parent_uuid
        && let Some(other) = listed
            .iter()
            .find(|s| s.received_uuid == Some(pu) && s.uuid != parent_own)
    {
        return Err((
            format!(
                "the announced parent UUID {pu} is also the received UUID of another subvolume on this host, outside this move"
            ),
            other.path.clone(),
        ));
    }
    Ok(())
}

impl Storage {
    /// The target's check of a move's spooled stream before `btrfs receive` (module doc): the
    /// staged parent is the announced one, the UUIDs the stream names are unique on the
    /// filesystem, and the stream's commands pass [`StreamCheck`].
    pub async fn check_spooled(&self, mv: &MoveId, m: &Manifest) -> Result<(), String> {
        let parent_own = match (&m.parent, m.parent_uuid) {
            (Some(p), Some(pu)) => {
                let path = self.staging(mv).join(p);
                let show = subvolume_show(&path)
                    .await
                    .map_err(|e| format!("the parent {p:?} held here: {e}"))?;
                if show.received_uuid != Some(pu) {
                    return Err(format!(
                        "the parent {p:?} held here is not the announced one (received UUID {}, announced {pu})",
                        show.received_uuid
                            .map_or_else(|| "none".to_string(), |u| u.to_string())
                    ));
                }
                show.uuid
            }
            _ => None,
        };
        let out = cmd::run(
            BTRFS,
            [
                "subvolume".as_ref(),
                "list".as_ref(),
                "-R".as_ref(),
                "-u".as_ref(),
                self.root.as_os_str(),
            ],
            super::TIMEOUT,
        )
        .await
        .map_err(|e| format!("cannot list the subvolumes: {e}"))?;
        if let Err((why, other)) = unique_uuids(&parse_list(&out), m, parent_own) {
            tracing::warn!(move_id = %mv, other = %other, "{why}");
            return Err(why);
        }
        let spool = self.spool(mv);
        let m = m.clone();
        tokio::task::spawn_blocking(move || check_spool(&spool, &m))
            .await
            .map_err(|e| format!("the stream check failed: {e}"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U1: &str = "9f033f7c-c278-f546-90d1-8031e25169aa";
    const U2: &str = "28fa7aea-bd46-e149-bd3b-d6af8a6703bb";
    const U3: &str = "46395fec-05eb-f744-a9a3-3a194cd757b5";

    fn manifest(uuid: &str, parent: Option<&str>) -> Manifest {
        serde_json::from_value(serde_json::json!({
            "move_id": "0b5c3d9e-1111-4a2b-9c3d-000000000001",
            "project_id": "6f1c2d3e-0000-4000-8000-000000000001",
            "seq": 1,
            "name": "s",
            "parent": parent.map(|_| "p"),
            "uuid": uuid,
            "parent_uuid": parent,
            "config": {},
        }))
        .unwrap()
    }

    #[test]
    fn subvolume_list_parses() {
        // btrfs-progs 6.2, `btrfs subvolume list -R -u`
        let out = "ID 256 gen 7 top level 5 received_uuid -                                    uuid 46395fec-05eb-f744-a9a3-3a194cd757b5 path a\n\
ID 258 gen 8 top level 5 received_uuid 9f033f7c-c278-f546-90d1-8031e25169aa uuid 28fa7aea-bd46-e149-bd3b-d6af8a6703bb path r/s 1\n";
        let l = parse_list(out);
        assert_eq!(l.len(), 2);
        assert_eq!(
            (l[0].received_uuid, l[0].uuid, l[0].path.as_str()),
            (None, Some(U3.parse().unwrap()), "a")
        );
        assert_eq!(
            (l[1].received_uuid, l[1].uuid, l[1].path.as_str()),
            (
                Some(U1.parse().unwrap()),
                Some(U2.parse().unwrap()),
                "r/s 1"
            )
        );
    }

    #[test]
    fn a_streams_uuids_must_be_nobody_elses() {
        let held = |r: &str, u: &str| Listed {
            received_uuid: Some(r.parse().unwrap()),
            uuid: Some(u.parse().unwrap()),
            path: format!("other/{u}"),
        };
        // its own UUID received elsewhere: refused (receive could clone from that one)
        let e = unique_uuids(&[held(U1, U2)], &manifest(U1, None), None).unwrap_err();
        assert!(e.0.contains("already the received UUID"), "{e:?}");
        assert!(
            !e.0.contains("other/"),
            "the path stays in the journal: {e:?}"
        );
        // the parent's UUID held by the staged parent only: fine; by another one too: refused
        let parent_own = Some(U3.parse().unwrap());
        assert_eq!(
            unique_uuids(&[held(U2, U3)], &manifest(U1, Some(U2)), parent_own),
            Ok(())
        );
        let e = unique_uuids(
            &[held(U2, U3), held(U2, U1)],
            &manifest(U1, Some(U2)),
            parent_own,
        )
        .unwrap_err();
        assert!(e.0.contains("outside this move"), "{e:?}");
        assert_eq!(unique_uuids(&[], &manifest(U1, None), None), Ok(()));
    }

    /// One raw command: its number and its attributes (type, value).
    type Raw = (u16, Vec<(u16, Vec<u8>)>);

    /// A stream made of raw commands (protocol 1), CRCs as btrfs computes them.
    fn stream(cmds: &[Raw]) -> Vec<u8> {
        let mut out = b"btrfs-stream\0".to_vec();
        out.extend_from_slice(&1u32.to_le_bytes());
        for (cmd, attrs) in cmds {
            let mut payload = Vec::new();
            for (t, v) in attrs {
                payload.extend_from_slice(&t.to_le_bytes());
                payload.extend_from_slice(&(v.len() as u16).to_le_bytes());
                payload.extend_from_slice(v);
            }
            let mut hdr = Vec::new();
            hdr.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            hdr.extend_from_slice(&cmd.to_le_bytes());
            hdr.extend_from_slice(&0u32.to_le_bytes());
            let mut all = hdr.clone();
            all.extend_from_slice(&payload);
            let crc = crc32c_raw(&all);
            out.extend_from_slice(&hdr[..6]);
            out.extend_from_slice(&crc.to_le_bytes());
            out.extend_from_slice(&payload);
        }
        out
    }

    /// CRC-32C with seed 0 and no final xor (the send stream's).
    fn crc32c_raw(data: &[u8]) -> u32 {
        let mut crc: u32 = 0;
        for b in data {
            crc ^= u32::from(*b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82f6_3b78
                } else {
                    crc >> 1
                };
            }
        }
        crc
    }

    fn uuid_bytes(s: &str) -> Vec<u8> {
        uuid::Uuid::parse_str(s).unwrap().as_bytes().to_vec()
    }

    // command and attribute numbers of the send stream (btrfs send.h)
    const SUBVOL: u16 = 1;
    const CLONE: u16 = 16;
    const A_UUID: u16 = 1;
    const A_CTRANSID: u16 = 2;
    const A_PATH: u16 = 15;
    const A_FILE_OFFSET: u16 = 18;
    const A_CLONE_UUID: u16 = 20;
    const A_CLONE_CTRANSID: u16 = 21;
    const A_CLONE_PATH: u16 = 22;
    const A_CLONE_OFFSET: u16 = 23;
    const A_CLONE_LEN: u16 = 24;

    fn subvol(name: &str, uuid: &str) -> Raw {
        (
            SUBVOL,
            vec![
                (A_PATH, name.as_bytes().to_vec()),
                (A_UUID, uuid_bytes(uuid)),
                (A_CTRANSID, 7u64.to_le_bytes().to_vec()),
            ],
        )
    }

    fn clone(from: &str) -> Raw {
        (
            CLONE,
            vec![
                (A_PATH, b"stolen".to_vec()),
                (A_FILE_OFFSET, 0u64.to_le_bytes().to_vec()),
                (A_CLONE_LEN, 4096u64.to_le_bytes().to_vec()),
                (A_CLONE_UUID, uuid_bytes(from)),
                (A_CLONE_CTRANSID, 7u64.to_le_bytes().to_vec()),
                (A_CLONE_PATH, b"secret".to_vec()),
                (A_CLONE_OFFSET, 0u64.to_le_bytes().to_vec()),
            ],
        )
    }

    fn check_bytes(bytes: &[u8], m: &Manifest) -> Result<(), String> {
        let p = std::env::temp_dir().join(format!("stream-check-{}.stream", uuid::Uuid::new_v4()));
        std::fs::write(&p, bytes).unwrap();
        let r = check_spool(&p, m);
        let _ = std::fs::remove_file(&p);
        r
    }

    #[test]
    fn spooled_streams_are_checked_command_by_command() {
        let m = manifest(U1, None);
        let end = (END, vec![]);
        // a whole stream that clones from itself: accepted
        let ok = stream(&[subvol("s", U1), clone(U1), end.clone()]);
        assert_eq!(check_bytes(&ok, &m), Ok(()));
        // a clone from another subvolume's UUID: refused
        let bad = stream(&[subvol("s", U1), clone(U2), end.clone()]);
        let e = check_bytes(&bad, &m).unwrap_err();
        assert!(e.contains("clones data from"), "{e}");
        // a second stream concatenated after the end: refused
        let mut two = ok.clone();
        two.extend_from_slice(&ok[17..]);
        let e = check_bytes(&two, &m).unwrap_err();
        assert!(e.contains("extra bytes after the stream's end"), "{e}");
        // truncated, a flipped bit (CRC), a huge length, not a stream at all: refused
        let e = check_bytes(&ok[..ok.len() - 3], &m).unwrap_err();
        assert!(e.contains("a truncated command"), "{e}");
        let e = check_bytes(&ok[..ok.len() - 12], &m).unwrap_err();
        assert!(e.contains("past the end"), "{e}");
        let mut flipped = ok.clone();
        let n = flipped.len();
        flipped[n - 20] ^= 1;
        let e = check_bytes(&flipped, &m).unwrap_err();
        assert!(e.contains("does not parse"), "{e}");
        let mut huge = ok[..17].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[1, 0, 0, 0, 0, 0]);
        let e = check_bytes(&huge, &m).unwrap_err();
        assert!(e.contains("more than btrfs send writes"), "{e}");
        let e = check_bytes(b"hello, not a stream at all", &m).unwrap_err();
        assert!(e.contains("not a btrfs send stream"), "{e}");
        // no end command: refused
        let e = check_bytes(&stream(&[subvol("s", U1)]), &m).unwrap_err();
        assert!(e.contains("stops before its end"), "{e}");
    }
}
