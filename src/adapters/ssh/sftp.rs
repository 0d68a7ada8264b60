//! `subsystem sftp` (russh-sftp), served by the daemon from the project's home through
//! `backends::safefs`: every path is resolved by the kernel beneath the home (a symlink or
//! mount pointing elsewhere is refused), `.snapshots/…` is the read-only snapshots, and what is
//! created belongs to the project's user (so its quota counts it). Paths are the container's:
//! the home is `/home/user`, relative paths start there.
use std::collections::HashMap;
use std::os::unix::fs::FileExt as _;
use std::sync::Arc;

use russh::Channel;
use russh::server::{Handle, Msg};
use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle as SftpHandle, Name, OpenFlags, Status, StatusCode,
    Version,
};
use russh_sftp::server::StatusReply;

use super::Ctx;
use crate::backends::podman::HOME;
use crate::backends::safefs::{self, FsError, Kind, Meta, ProjectFs, RelPath};
use crate::domain::project::ProjectId;

/// Most handles open at once per session.
const MAX_HANDLES: usize = 1024;
/// Largest read answered (OpenSSH asks 32 KiB or 256 KiB).
const MAX_READ: u32 = 256 * 1024;
/// Names per READDIR answer.
const NAMES_PER_READDIR: usize = 128;
/// Most entries of one directory listed.
const MAX_LIST: usize = 100_000;

/// Serves SFTP on the channel until the client ends it.
pub async fn run(ch: Channel<Msg>, handle: Handle, ctx: Arc<Ctx>, id: ProjectId) {
    let chid = ch.id();
    let fs = match ctx.host.project_files(id).await {
        Ok(fs) => fs,
        Err(e) => {
            let _ = handle.channel_failure(chid).await;
            let _ = handle
                .extended_data(
                    chid,
                    1,
                    format!("cocalc-project-host: sftp: {e}\r\n").into_bytes(),
                )
                .await;
            let _ = handle.close(chid).await;
            return;
        }
    };
    let host_uid = ctx.host.project_user_uid(id).await.ok();
    let _ = handle.channel_success(chid).await;
    tracing::info!(project_id = %id, "ssh: sftp session started");
    let server = Sftp {
        fs: Arc::new(fs),
        handles: HashMap::new(),
        next: 0,
        host_uid,
        user_uid: ctx.host.settings().projects.user_uid,
    };
    // russh-sftp serves one end of a pipe, the channel is pumped through the other: when the
    // client ends its input the server ends, and the channel gets an exit status (scp fails
    // without one)
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    russh_sftp::server::run(theirs, server).await;
    let (mut rd, wr) = ch.split();
    let (mut from_sftp, mut to_sftp) = tokio::io::split(ours);
    let input = async {
        let _ = tokio::io::copy(&mut rd.make_reader(), &mut to_sftp).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut to_sftp).await;
    };
    let output = wr.data(&mut from_sftp);
    let _ = tokio::join!(input, output);
    let _ = wr.exit_status(0).await;
    let _ = wr.eof().await;
    let _ = wr.close().await;
    tracing::info!(project_id = %id, "ssh: sftp session ended");
}

enum Open {
    File(Arc<std::fs::File>),
    Dir(Vec<safefs::Entry>),
}

struct Sftp {
    fs: Arc<ProjectFs>,
    handles: HashMap<String, Open>,
    next: u64,
    /// the project user's host uid, shown as its uid inside (`user_uid`)
    host_uid: Option<u32>,
    user_uid: u32,
}

fn reply(e: FsError) -> StatusReply {
    let code = match e {
        FsError::NotFound => StatusCode::NoSuchFile,
        FsError::Escapes | FsError::ReadOnly | FsError::PermissionDenied | FsError::NotRegular => {
            StatusCode::PermissionDenied
        }
        _ => StatusCode::Failure,
    };
    StatusReply::new(code).with_message(e.to_string())
}

fn status(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".into(),
        language_tag: "en-US".into(),
    }
}

/// The path within the home a client's path names: absolute under `/home/user`, or relative to
/// it; `.` and `..` are resolved by name (`..` never above the home). The kernel still resolves
/// the result beneath the home (symlinks).
pub fn home_path(path: &str) -> Result<RelPath, FsError> {
    let rest = if path.starts_with('/') {
        match path.strip_prefix(HOME) {
            Some(r) if r.is_empty() || r.starts_with('/') => r,
            _ => return Err(FsError::Escapes),
        }
    } else {
        path
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in rest.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(FsError::Escapes);
                }
            }
            c => parts.push(c),
        }
    }
    RelPath::parse(&parts.join("/"))
}

/// Runs a blocking file operation off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FsError> + Send + 'static,
) -> Result<T, StatusReply> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StatusReply::new(StatusCode::Failure).with_message(e.to_string()))?
        .map_err(reply)
}

impl Sftp {
    fn attrs(&self, m: &Meta) -> FileAttributes {
        let kind = match m.kind {
            Kind::File => 0o100000,
            Kind::Dir => 0o040000,
            Kind::Symlink => 0o120000,
            Kind::Other => 0,
        };
        let id = |host: u32| {
            if Some(host) == self.host_uid {
                self.user_uid
            } else {
                host
            }
        };
        FileAttributes {
            size: Some(m.size),
            uid: Some(id(m.uid)),
            gid: Some(id(m.gid)),
            permissions: Some(kind | m.mode),
            atime: Some(m.mtime.clamp(0, u32::MAX as i64) as u32),
            mtime: Some(m.mtime.clamp(0, u32::MAX as i64) as u32),
            ..Default::default()
        }
    }

    fn add(&mut self, o: Open) -> Result<String, StatusReply> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(StatusReply::new(StatusCode::Failure).with_message("too many open handles"));
        }
        self.next += 1;
        let h = self.next.to_string();
        self.handles.insert(h.clone(), o);
        Ok(h)
    }

    fn file(&self, h: &str) -> Result<Arc<std::fs::File>, StatusReply> {
        match self.handles.get(h) {
            Some(Open::File(f)) => Ok(f.clone()),
            _ => Err(StatusReply::new(StatusCode::Failure).with_message("bad handle")),
        }
    }

    /// Runs `f` on the tree holding `path` and the path within it.
    async fn on<T: Send + 'static>(
        &self,
        path: &str,
        f: impl FnOnce(&safefs::Tree, &RelPath) -> Result<T, FsError> + Send + 'static,
    ) -> Result<T, StatusReply> {
        let rel = home_path(path).map_err(reply)?;
        let fs = self.fs.clone();
        blocking(move || {
            let (tree, p) = fs.locate(&rel);
            f(tree, &p)
        })
        .await
    }

    async fn set_attrs(&self, path: &str, attrs: FileAttributes) -> Result<(), StatusReply> {
        self.on(path, move |t, p| {
            if let Some(size) = attrs.size {
                let (f, _) = t.open_file(
                    p,
                    safefs::OpenOptions {
                        write: true,
                        ..Default::default()
                    },
                )?;
                f.set_len(size)?;
            }
            if let Some(mode) = attrs.permissions {
                t.set_mode(p, mode & 0o7777)?;
            }
            if let (Some(a), Some(m)) = (attrs.atime, attrs.mtime) {
                t.set_times(p, a.into(), m.into())?;
            }
            Ok(())
        })
        .await
    }
}

impl russh_sftp::server::Handler for Sftp {
    type Error = StatusReply;

    fn unimplemented(&self) -> StatusReply {
        StatusReply::new(StatusCode::OpUnsupported)
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, StatusReply> {
        Ok(Version::new())
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, StatusReply> {
        let rel = home_path(&path).map_err(reply)?;
        let full = if rel.is_root() {
            HOME.to_string()
        } else {
            format!("{HOME}/{rel}")
        };
        Ok(Name {
            id,
            files: vec![File::dummy(full)],
        })
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<SftpHandle, StatusReply> {
        let o = safefs::OpenOptions {
            read: pflags.contains(OpenFlags::READ),
            write: pflags.contains(OpenFlags::WRITE),
            append: pflags.contains(OpenFlags::APPEND),
            truncate: pflags.contains(OpenFlags::TRUNCATE),
            create: pflags.contains(OpenFlags::CREATE),
            exclusive: pflags.contains(OpenFlags::EXCLUDE),
        };
        // a new file gets safefs' mode (0644); a client that wants another sets it after
        let _ = attrs;
        let f = self
            .on(&filename, move |t, p| Ok(t.open_file(p, o)?.0))
            .await?;
        let handle = self.add(Open::File(Arc::new(f)))?;
        Ok(SftpHandle { id, handle })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, StatusReply> {
        match self.handles.remove(&handle) {
            Some(_) => Ok(status(id)),
            None => Err(StatusReply::new(StatusCode::Failure).with_message("bad handle")),
        }
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, StatusReply> {
        let f = self.file(&handle)?;
        let len = len.min(MAX_READ) as usize;
        let data = blocking(move || {
            let mut buf = vec![0u8; len];
            let mut got = 0;
            while got < len {
                match f.read_at(&mut buf[got..], offset + got as u64)? {
                    0 => break,
                    n => got += n,
                }
            }
            buf.truncate(got);
            Ok(buf)
        })
        .await?;
        if data.is_empty() {
            return Err(StatusReply::new(StatusCode::Eof));
        }
        Ok(Data { id, data })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, StatusReply> {
        let f = self.file(&handle)?;
        blocking(move || Ok(f.write_all_at(&data, offset)?)).await?;
        Ok(status(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, StatusReply> {
        let m = self.on(&path, |t, p| t.lstat(p)).await?;
        Ok(Attrs {
            id,
            attrs: self.attrs(&m),
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, StatusReply> {
        let m = self.on(&path, |t, p| t.stat(p)).await?;
        Ok(Attrs {
            id,
            attrs: self.attrs(&m),
        })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, StatusReply> {
        let f = self.file(&handle)?;
        let m = blocking(move || {
            use std::os::unix::fs::MetadataExt as _;
            let md = f.metadata()?;
            Ok(Meta {
                kind: if md.is_dir() { Kind::Dir } else { Kind::File },
                size: md.len(),
                mtime: md.mtime(),
                mtime_nsec: md.mtime_nsec().clamp(0, 999_999_999) as u32,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                ino: md.ino(),
                dev: md.dev(),
            })
        })
        .await?;
        Ok(Attrs {
            id,
            attrs: self.attrs(&m),
        })
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, StatusReply> {
        self.set_attrs(&path, attrs).await?;
        Ok(status(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, StatusReply> {
        let f = self.file(&handle)?;
        blocking(move || {
            if let Some(size) = attrs.size {
                f.set_len(size)?;
            }
            if let Some(mode) = attrs.permissions {
                rustix::fs::fchmod(&*f, rustix::fs::Mode::from_raw_mode(mode & 0o7777))?;
            }
            if let (Some(a), Some(m)) = (attrs.atime, attrs.mtime) {
                let ts = |s: u32| rustix::fs::Timespec {
                    tv_sec: s.into(),
                    tv_nsec: 0,
                };
                rustix::fs::futimens(
                    &*f,
                    &rustix::fs::Timestamps {
                        last_access: ts(a),
                        last_modification: ts(m),
                    },
                )?;
            }
            Ok(())
        })
        .await?;
        Ok(status(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<SftpHandle, StatusReply> {
        let listing = self.on(&path, |t, p| t.list(p, MAX_LIST)).await?;
        let handle = self.add(Open::Dir(listing.entries))?;
        Ok(SftpHandle { id, handle })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, StatusReply> {
        let chunk: Vec<safefs::Entry> = match self.handles.get_mut(&handle) {
            Some(Open::Dir(entries)) => {
                let n = entries.len().min(NAMES_PER_READDIR);
                entries.drain(..n).collect()
            }
            _ => return Err(StatusReply::new(StatusCode::Failure).with_message("bad handle")),
        };
        if chunk.is_empty() {
            return Err(StatusReply::new(StatusCode::Eof));
        }
        let files = chunk
            .iter()
            .map(|e| File::new(e.name.clone(), self.attrs(&e.meta)))
            .collect();
        Ok(Name { id, files })
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, StatusReply> {
        self.on(&filename, |t, p| t.remove_file(p)).await?;
        Ok(status(id))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        _attrs: FileAttributes,
    ) -> Result<Status, StatusReply> {
        self.on(&path, |t, p| t.mkdir(p)).await?;
        Ok(status(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, StatusReply> {
        self.on(&path, |t, p| t.remove_dir(p)).await?;
        Ok(status(id))
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, StatusReply> {
        let from = home_path(&oldpath).map_err(reply)?;
        let to = home_path(&newpath).map_err(reply)?;
        let fs = self.fs.clone();
        blocking(move || {
            let (ft, fp) = fs.locate(&from);
            let (tt, tp) = fs.locate(&to);
            if !std::ptr::eq(ft, tt) {
                return Err(FsError::ReadOnly);
            }
            ft.rename(&fp, &tp, false)
        })
        .await?;
        Ok(status(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, StatusReply> {
        let target = self.on(&path, |t, p| t.readlink(p)).await?;
        Ok(Name {
            id,
            files: vec![File::dummy(target)],
        })
    }

    async fn symlink(
        &mut self,
        id: u32,
        linkpath: String,
        targetpath: String,
    ) -> Result<Status, StatusReply> {
        self.on(&linkpath, move |t, p| t.symlink(&targetpath, p))
            .await?;
        Ok(status(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_paths_stay_in_the_home() {
        for (given, want) in [
            (".", ""),
            ("", ""),
            ("/home/user", ""),
            ("/home/user/", ""),
            ("/home/user/a/b", "a/b"),
            ("a/./b/../c", "a/c"),
            ("/home/user/a/..", ""),
            (".snapshots/x", ".snapshots/x"),
        ] {
            assert_eq!(home_path(given).expect(given).to_string(), want, "{given}");
        }
        for bad in [
            "/",
            "/etc/passwd",
            "/home/userx",
            "..",
            "a/../..",
            "/home/user/../x",
        ] {
            assert!(home_path(bad).is_err(), "{bad}");
        }
    }
}
