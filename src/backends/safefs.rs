//! File access under a project's home (and its snapshots) that a hostile project user cannot
//! redirect: every path is resolved by the kernel with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)` relative to a directory fd of the tree's root, so a
//! symlink (absolute, `..`, swapped during the call), a `/proc` magic link or a mount can never
//! take an operation outside the tree. Names are created, removed and renamed with `*at` calls on
//! a parent directory opened that way. New files and directories are given to the project user
//! (host uid) by `fchown` on the fd that was created. Writes go to a temporary file in the target
//! directory that is fsynced and renamed over the target: a failed write (quota) leaves nothing.
//!
//! Shared by the HTTP file server (`adapters::files`) and SFTP; free of HTTP types. Blocking
//! calls: run them on a blocking thread.
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timestamps};
use rustix::io::Errno;

/// The longest path accepted (bytes), as the kernel's `PATH_MAX`.
pub const MAX_PATH: usize = 4096;
/// The longest name of one path component (bytes), as btrfs's.
pub const MAX_NAME: usize = 255;
/// The name of the snapshots directory in a home (`~/.snapshots/<name>/…`, read-only).
pub const SNAPSHOTS: &str = ".snapshots";
/// The prefix of the temporary files of writes in progress.
pub const TEMP_PREFIX: &str = ".cocalc-upload-";

/// Every resolution stays beneath the tree's root, follows no magic link and crosses no mount.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);
/// openat2 may fail with EAGAIN when a rename raced the resolution of `..`: retried this often.
const EAGAIN_RETRIES: usize = 8;

/// Why a file operation failed. Adapters map the kinds to their own errors (HTTP status, SFTP
/// status code).
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The path is not acceptable (absolute, `..`, NUL, too long).
    #[error("invalid path: {0}")]
    InvalidPath(&'static str),
    /// Nothing there.
    #[error("no such file or directory")]
    NotFound,
    /// Resolving the path would leave the tree (a symlink pointing outside, a mount, a magic link).
    #[error("the path leads outside the project's files (a symlink or mount pointing elsewhere)")]
    Escapes,
    /// The tree (a snapshot) is read-only.
    #[error("read-only: snapshots cannot be changed")]
    ReadOnly,
    /// A directory where a file was wanted.
    #[error("is a directory")]
    IsDirectory,
    /// A file where a directory was wanted (also: a path component is not a directory).
    #[error("not a directory")]
    NotDirectory,
    /// Neither a regular file nor a directory (a fifo, socket or device): not served.
    #[error("not a regular file")]
    NotRegular,
    /// The directory is not empty.
    #[error("directory not empty")]
    NotEmpty,
    /// Something exists there already.
    #[error("already exists")]
    Exists,
    /// The project's quota (or the filesystem) is full.
    #[error("no space left: the project's disk quota is exceeded")]
    QuotaExceeded,
    /// The kernel refused (permissions, immutable file).
    #[error("permission denied")]
    PermissionDenied,
    /// Anything else.
    #[error("{0}")]
    Io(std::io::Error),
}

impl FsError {
    /// A stable machine-readable code for the kind.
    pub fn code(&self) -> &'static str {
        match self {
            FsError::InvalidPath(_) => "invalid_path",
            FsError::NotFound => "not_found",
            FsError::Escapes => "path_escapes",
            FsError::ReadOnly => "read_only",
            FsError::IsDirectory => "is_directory",
            FsError::NotDirectory => "not_directory",
            FsError::NotRegular => "not_regular_file",
            FsError::NotEmpty => "directory_not_empty",
            FsError::Exists => "already_exists",
            FsError::QuotaExceeded => "quota_exceeded",
            FsError::PermissionDenied => "permission_denied",
            FsError::Io(_) => "internal",
        }
    }
}

impl From<Errno> for FsError {
    fn from(e: Errno) -> FsError {
        match e {
            Errno::NOENT => FsError::NotFound,
            // EXDEV: RESOLVE_BENEATH/NO_XDEV refused; ELOOP: a symlink where none may be followed
            // (or a loop); both mean the path does not lead to a file of the tree
            Errno::XDEV | Errno::LOOP => FsError::Escapes,
            Errno::NOTDIR => FsError::NotDirectory,
            Errno::ISDIR => FsError::IsDirectory,
            Errno::EXIST => FsError::Exists,
            Errno::NOTEMPTY => FsError::NotEmpty,
            Errno::DQUOT | Errno::NOSPC => FsError::QuotaExceeded,
            Errno::ROFS => FsError::ReadOnly,
            Errno::ACCESS | Errno::PERM => FsError::PermissionDenied,
            Errno::NAMETOOLONG => FsError::InvalidPath("too long"),
            Errno::INVAL => FsError::InvalidPath("not acceptable here"),
            e => FsError::Io(e.into()),
        }
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> FsError {
        match Errno::from_io_error(&e) {
            Some(errno) => errno.into(),
            None => FsError::Io(e),
        }
    }
}

/// A path relative to a tree's root, checked: no `..`, not absolute, no NUL, within the kernel's
/// limits; `.` and empty components (`a//b`, a trailing `/`) are dropped. Empty: the root.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RelPath(String);

impl RelPath {
    /// The root of the tree.
    pub fn root() -> RelPath {
        RelPath(String::new())
    }

    /// Checks `s` (already percent-decoded).
    pub fn parse(s: &str) -> Result<RelPath, FsError> {
        if s.len() > MAX_PATH {
            return Err(FsError::InvalidPath("longer than 4096 bytes"));
        }
        if s.contains('\0') {
            return Err(FsError::InvalidPath("contains a NUL byte"));
        }
        if s.starts_with('/') {
            return Err(FsError::InvalidPath("absolute paths are not accepted"));
        }
        let mut out: Vec<&str> = Vec::new();
        for c in s.split('/') {
            match c {
                "" | "." => {}
                ".." => return Err(FsError::InvalidPath("\"..\" is not accepted")),
                c if c.len() > MAX_NAME => {
                    return Err(FsError::InvalidPath("a name is longer than 255 bytes"));
                }
                c => out.push(c),
            }
        }
        Ok(RelPath(out.join("/")))
    }

    /// The path as the kernel gets it (`.` for the root).
    pub fn as_str(&self) -> &str {
        if self.0.is_empty() { "." } else { &self.0 }
    }

    /// Whether this is the root.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The components.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|c| !c.is_empty())
    }

    /// The parent and the last name (`None` for the root).
    pub fn split_last(&self) -> Option<(RelPath, &str)> {
        if self.0.is_empty() {
            return None;
        }
        Some(match self.0.rsplit_once('/') {
            Some((p, n)) => (RelPath(p.to_string()), n),
            None => (RelPath::root(), self.0.as_str()),
        })
    }

    /// The first name and the rest (`None` for the root).
    pub fn split_first(&self) -> Option<(&str, RelPath)> {
        if self.0.is_empty() {
            return None;
        }
        Some(match self.0.split_once('/') {
            Some((f, r)) => (f, RelPath(r.to_string())),
            None => (self.0.as_str(), RelPath::root()),
        })
    }

    /// This path with `name` (one component, checked) appended.
    pub fn join(&self, name: &str) -> Result<RelPath, FsError> {
        if name.contains('/') {
            return Err(FsError::InvalidPath("a name cannot contain \"/\""));
        }
        RelPath::parse(&if self.0.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.0)
        })
    }
}

impl std::fmt::Display for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (listed, never followed out of the tree).
    Symlink,
    /// A fifo, socket or device.
    Other,
}

impl Kind {
    fn of(mode: u32) -> Kind {
        match FileType::from_raw_mode(mode) {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        }
    }

    /// The word for it on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::Other => "other",
        }
    }
}

/// The metadata of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// What it is.
    pub kind: Kind,
    /// Size in bytes.
    pub size: u64,
    /// Modification time: seconds since the epoch.
    pub mtime: i64,
    /// Modification time: nanoseconds.
    pub mtime_nsec: u32,
    /// Permission bits (and setuid/setgid/sticky).
    pub mode: u32,
    /// Owner (host uid).
    pub uid: u32,
    /// Group (host gid).
    pub gid: u32,
    /// Inode number.
    pub ino: u64,
    /// Device.
    pub dev: u64,
}

impl Meta {
    #[allow(clippy::unnecessary_cast)] // the stat field types differ between architectures
    fn from_stat(st: &rustix::fs::Stat) -> Meta {
        Meta {
            kind: Kind::of(st.st_mode as u32),
            size: st.st_size.max(0) as u64,
            mtime: st.st_mtime as i64,
            mtime_nsec: st.st_mtime_nsec as u32,
            mode: (st.st_mode as u32) & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            ino: st.st_ino as u64,
            dev: st.st_dev as u64,
        }
    }
}

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its name (bytes that are not UTF-8 are replaced).
    pub name: String,
    /// Its metadata (of the entry itself: a symlink is not followed).
    pub meta: Meta,
}

/// A directory listing, possibly cut at the limit asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The entries (without `.` and `..`), sorted by name.
    pub entries: Vec<Entry>,
    /// Whether entries were left out (the limit was reached).
    pub truncated: bool,
}

/// Who new files and directories belong to (host ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Host uid.
    pub uid: u32,
    /// Host gid.
    pub gid: u32,
}

/// How a tree may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read-only (snapshots): every change is refused before touching anything.
    ReadOnly,
    /// Read-write; what is created is given to `Owner` (`None`: left to the caller's ids).
    ReadWrite(Option<Owner>),
}

/// How `Tree::open_file` opens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Open for reading.
    pub read: bool,
    /// Open for writing.
    pub write: bool,
    /// Writes go to the end.
    pub append: bool,
    /// Truncate to 0 on open.
    pub truncate: bool,
    /// Create when missing.
    pub create: bool,
    /// Fail when it exists (with `create`).
    pub exclusive: bool,
}

/// A directory tree: a home or a project's snapshots. Every operation resolves beneath its root.
#[derive(Debug)]
pub struct Tree {
    root: OwnedFd,
    access: Access,
}

/// Files written by the file server get these permissions (a new file; an existing one keeps its own).
const FILE_MODE: u32 = 0o644;
/// Directories created get these (the daemon's umask is 0077).
const DIR_MODE: u32 = 0o755;

impl Tree {
    /// Opens the tree rooted at `path` (a trusted path given by the core).
    pub fn open(path: &Path, access: Access) -> Result<Tree, FsError> {
        let root = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Tree { root, access })
    }

    /// Whether the tree is read-only.
    pub fn is_read_only(&self) -> bool {
        self.access == Access::ReadOnly
    }

    fn writable(&self) -> Result<Option<Owner>, FsError> {
        match self.access {
            Access::ReadOnly => Err(FsError::ReadOnly),
            Access::ReadWrite(owner) => Ok(owner),
        }
    }

    /// `openat2` beneath `dir` (retrying the EAGAIN of a racing rename).
    fn openat(
        dir: impl AsFd,
        path: &str,
        flags: OFlags,
        mode: u32,
        extra: ResolveFlags,
    ) -> Result<OwnedFd, FsError> {
        // openat2 refuses (EINVAL) O_PATH with any flag it ignores, O_NOCTTY among them
        let flags = if flags.contains(OFlags::PATH) {
            flags | OFlags::CLOEXEC
        } else {
            flags | OFlags::CLOEXEC | OFlags::NOCTTY
        };
        let mut tries = 0;
        loop {
            match rustix::fs::openat2(
                dir.as_fd(),
                path,
                flags,
                Mode::from_raw_mode(mode),
                RESOLVE | extra,
            ) {
                Err(Errno::AGAIN) if tries < EAGAIN_RETRIES => tries += 1,
                r => return Ok(r?),
            }
        }
    }

    /// Resolves `p` beneath the root to an fd (`flags` decide what kind).
    fn resolve(&self, p: &RelPath, flags: OFlags) -> Result<OwnedFd, FsError> {
        Self::openat(&self.root, p.as_str(), flags, 0, ResolveFlags::empty())
    }

    /// The directory holding `p`'s last name, opened for `*at` calls, and that name.
    fn parent<'a>(&self, p: &'a RelPath) -> Result<(OwnedFd, &'a str), FsError> {
        let (parent, name) = p
            .split_last()
            .ok_or(FsError::InvalidPath("the root itself cannot be changed"))?;
        let fd = self.resolve(&parent, OFlags::RDONLY | OFlags::DIRECTORY)?;
        Ok((fd, name))
    }

    /// Metadata of what `p` leads to (a symlink inside the tree is followed).
    pub fn stat(&self, p: &RelPath) -> Result<Meta, FsError> {
        let fd = self.resolve(p, OFlags::PATH)?;
        Ok(Meta::from_stat(&rustix::fs::fstat(&fd)?))
    }

    /// Metadata of `p` itself (a final symlink is not followed).
    pub fn lstat(&self, p: &RelPath) -> Result<Meta, FsError> {
        if p.is_root() {
            return self.stat(p);
        }
        let (dir, name) = self.parent(p)?;
        Ok(Meta::from_stat(&rustix::fs::statat(
            &dir,
            name,
            AtFlags::SYMLINK_NOFOLLOW,
        )?))
    }

    /// Opens a regular file for reading; its metadata from the open fd.
    pub fn open_read(&self, p: &RelPath) -> Result<(File, Meta), FsError> {
        // O_NONBLOCK: a fifo planted by the user must not hang the daemon's thread
        let fd = self.resolve(p, OFlags::RDONLY | OFlags::NONBLOCK)?;
        let meta = Meta::from_stat(&rustix::fs::fstat(&fd)?);
        match meta.kind {
            Kind::File => {}
            Kind::Dir => return Err(FsError::IsDirectory),
            _ => return Err(FsError::NotRegular),
        }
        rustix::fs::fcntl_setfl(&fd, OFlags::RDONLY)?;
        Ok((File::from(fd), meta))
    }

    /// Lists the directory `p` (at most `limit` entries, by name).
    pub fn list(&self, p: &RelPath, limit: usize) -> Result<Listing, FsError> {
        let fd = self.resolve(p, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let mut dir = rustix::fs::Dir::read_from(&fd)?;
        let mut entries = Vec::new();
        let mut truncated = false;
        while let Some(ent) = dir.read() {
            let ent = ent?;
            let name = ent.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            if entries.len() >= limit {
                truncated = true;
                break;
            }
            let st = match rustix::fs::statat(&fd, ent.file_name(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                // removed since it was read
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            entries.push(Entry {
                name: String::from_utf8_lossy(name).into_owned(),
                meta: Meta::from_stat(&st),
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Listing { entries, truncated })
    }

    /// Gives what was just created as `name` in `dir` to the owner, with `mode`. Only an entry the
    /// daemon's own uid owns is changed: the user may have swapped the name meanwhile, and then
    /// what is there already belongs to someone in the project.
    fn adopt(dir: impl AsFd, name: &str, owner: Option<Owner>, mode: u32) -> Result<(), FsError> {
        let fd = Self::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK,
            0,
            ResolveFlags::NO_SYMLINKS,
        )?;
        Self::adopt_fd(&fd, owner, mode)
    }

    fn adopt_fd(fd: impl AsFd, owner: Option<Owner>, mode: u32) -> Result<(), FsError> {
        let st = rustix::fs::fstat(&fd)?;
        if st.st_uid != rustix::process::geteuid().as_raw() {
            return Ok(());
        }
        if let Some(o) = owner {
            rustix::fs::fchown(
                &fd,
                Some(rustix::fs::Uid::from_raw(o.uid)),
                Some(rustix::fs::Gid::from_raw(o.gid)),
            )?;
        }
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
        Ok(())
    }

    /// Creates the directory `p` (its parent must exist).
    pub fn mkdir(&self, p: &RelPath) -> Result<(), FsError> {
        let owner = self.writable()?;
        let (dir, name) = self.parent(p)?;
        rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(DIR_MODE))?;
        Self::adopt(&dir, name, owner, DIR_MODE)
    }

    /// Creates `p` and its missing parents (existing directories are fine).
    pub fn mkdir_all(&self, p: &RelPath) -> Result<(), FsError> {
        let owner = self.writable()?;
        let mut at = RelPath::root();
        for name in p.components() {
            // each parent is resolved from the root again: a symlink among them stays beneath
            let dir = self.resolve(&at, OFlags::RDONLY | OFlags::DIRECTORY)?;
            match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(DIR_MODE)) {
                Ok(()) => Self::adopt(&dir, name, owner, DIR_MODE)?,
                Err(Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            at = at.join(name)?;
        }
        // what exists there must be a directory (beneath the root)
        self.resolve(&at, OFlags::PATH | OFlags::DIRECTORY)?;
        Ok(())
    }

    /// Removes the file (or symlink) or the empty directory `p`.
    pub fn remove(&self, p: &RelPath) -> Result<(), FsError> {
        self.writable()?;
        let (dir, name) = self.parent(p)?;
        match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
            Err(Errno::ISDIR) => Ok(rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR)?),
            r => Ok(r?),
        }
    }

    /// Removes the file (or symlink) `p`; a directory is refused.
    pub fn remove_file(&self, p: &RelPath) -> Result<(), FsError> {
        self.writable()?;
        let (dir, name) = self.parent(p)?;
        Ok(rustix::fs::unlinkat(&dir, name, AtFlags::empty())?)
    }

    /// Removes the empty directory `p`.
    pub fn remove_dir(&self, p: &RelPath) -> Result<(), FsError> {
        self.writable()?;
        let (dir, name) = self.parent(p)?;
        Ok(rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR)?)
    }

    /// Renames `from` to `to` (`replace`: an existing `to` is replaced, else refused).
    pub fn rename(&self, from: &RelPath, to: &RelPath, replace: bool) -> Result<(), FsError> {
        self.writable()?;
        let (fdir, fname) = self.parent(from)?;
        let (tdir, tname) = self.parent(to)?;
        let flags = if replace {
            rustix::fs::RenameFlags::empty()
        } else {
            rustix::fs::RenameFlags::NOREPLACE
        };
        Ok(rustix::fs::renameat_with(
            &fdir, fname, &tdir, tname, flags,
        )?)
    }

    /// Creates the symlink `link` pointing at `target` (stored as given: every resolution of it
    /// by this module stays beneath the root anyway).
    pub fn symlink(&self, target: &str, link: &RelPath) -> Result<(), FsError> {
        let owner = self.writable()?;
        if target.contains('\0') || target.len() > MAX_PATH {
            return Err(FsError::InvalidPath("bad symlink target"));
        }
        let (dir, name) = self.parent(link)?;
        rustix::fs::symlinkat(target, &dir, name)?;
        if let Some(o) = owner {
            rustix::fs::chownat(
                &dir,
                name,
                Some(rustix::fs::Uid::from_raw(o.uid)),
                Some(rustix::fs::Gid::from_raw(o.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )?;
        }
        Ok(())
    }

    /// The target of the symlink `p`.
    pub fn readlink(&self, p: &RelPath) -> Result<String, FsError> {
        let (dir, name) = self.parent(p)?;
        let t = rustix::fs::readlinkat(&dir, name, Vec::new())?;
        Ok(String::from_utf8_lossy(t.as_bytes()).into_owned())
    }

    /// Opens (or creates) the file `p` as `o` says; a file created is given to the owner.
    pub fn open_file(&self, p: &RelPath, o: OpenOptions) -> Result<(File, Meta), FsError> {
        let writes = o.write || o.append || o.truncate || o.create;
        let owner = if writes { self.writable()? } else { None };
        let mut flags = match (o.read, o.write || o.append) {
            (_, false) => OFlags::RDONLY,
            (false, true) => OFlags::WRONLY,
            (true, true) => OFlags::RDWR,
        };
        if o.append {
            flags |= OFlags::APPEND;
        }
        if o.truncate {
            flags |= OFlags::TRUNC;
        }
        flags |= OFlags::NONBLOCK;
        let mut tries = 0;
        let (fd, created) = loop {
            if !(o.create && o.exclusive) {
                match self.resolve(p, flags) {
                    Ok(fd) => break (fd, false),
                    Err(FsError::NotFound) if o.create => {}
                    Err(e) => return Err(e),
                }
            }
            let (dir, name) = self.parent(p)?;
            match Self::openat(
                &dir,
                name,
                flags | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW,
                FILE_MODE,
                ResolveFlags::NO_SYMLINKS,
            ) {
                Ok(fd) => break (fd, true),
                // created by someone else meanwhile: open that one (unless exclusive)
                Err(FsError::Exists) if !o.exclusive && tries < EAGAIN_RETRIES => tries += 1,
                // a dangling symlink: O_EXCL never follows it
                Err(FsError::Escapes) if o.exclusive => return Err(FsError::Exists),
                Err(e) => return Err(e),
            }
        };
        let meta = Meta::from_stat(&rustix::fs::fstat(&fd)?);
        match meta.kind {
            Kind::File => {}
            Kind::Dir => return Err(FsError::IsDirectory),
            _ => return Err(FsError::NotRegular),
        }
        if created {
            Self::adopt_fd(&fd, owner, FILE_MODE)?;
        }
        rustix::fs::fcntl_setfl(&fd, flags & !OFlags::NONBLOCK)?;
        Ok((File::from(fd), meta))
    }

    /// Sets the permission bits of `p` (followed beneath the root). Setuid and setgid bits are
    /// dropped: the daemon never makes a set-id file (it runs without `RestrictSUIDSGID=`).
    pub fn set_mode(&self, p: &RelPath, mode: u32) -> Result<(), FsError> {
        self.writable()?;
        let fd = self.resolve(p, OFlags::RDONLY | OFlags::NONBLOCK)?;
        Ok(rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode & 0o1777))?)
    }

    /// Sets the access and modification times of `p` (seconds since the epoch).
    pub fn set_times(&self, p: &RelPath, atime: i64, mtime: i64) -> Result<(), FsError> {
        self.writable()?;
        let fd = self.resolve(p, OFlags::RDONLY | OFlags::NONBLOCK)?;
        let ts = |s| rustix::fs::Timespec {
            tv_sec: s,
            tv_nsec: 0,
        };
        Ok(rustix::fs::futimens(
            &fd,
            &Timestamps {
                last_access: ts(atime),
                last_modification: ts(mtime),
            },
        )?)
    }

    /// Starts an atomic write of the file `p`: a temporary file next to it, renamed over it by
    /// [`AtomicFile::commit`]; dropped without commit, it is removed. `parents`: missing parent
    /// directories are created. A new file gets mode 0644, a replaced one keeps its mode.
    pub fn create_atomic(&self, p: &RelPath, parents: bool) -> Result<AtomicFile, FsError> {
        let owner = self.writable()?;
        let (parent, name) = p.split_last().ok_or(FsError::IsDirectory)?;
        if parents {
            self.mkdir_all(&parent)?;
        }
        let dir = self.resolve(&parent, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let (mode, replaces) = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => match Kind::of(st.st_mode) {
                Kind::Dir => return Err(FsError::IsDirectory),
                Kind::File => (st.st_mode & 0o777, true),
                // a symlink or fifo there is replaced by the file
                _ => (FILE_MODE, true),
            },
            Err(Errno::NOENT) => (FILE_MODE, false),
            Err(e) => return Err(e.into()),
        };
        let tmp = format!("{TEMP_PREFIX}{}", uuid::Uuid::new_v4().simple());
        let fd = Self::openat(
            &dir,
            &tmp,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW,
            FILE_MODE,
            ResolveFlags::NO_SYMLINKS,
        )?;
        let file = AtomicFile {
            file: Some(File::from(fd)),
            dir,
            tmp,
            name: name.to_string(),
            replaces,
        };
        if let Some(f) = &file.file {
            Self::adopt_fd(f, owner, mode)?;
        }
        Ok(file)
    }
}

/// A file being written atomically (see [`Tree::create_atomic`]).
#[derive(Debug)]
pub struct AtomicFile {
    file: Option<File>,
    dir: OwnedFd,
    tmp: String,
    name: String,
    replaces: bool,
}

impl AtomicFile {
    /// Whether something was at the target when the write began (it is replaced on commit).
    pub fn replaces(&self) -> bool {
        self.replaces
    }

    fn file(&mut self) -> std::io::Result<&mut File> {
        self.file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("already committed"))
    }

    /// Writes all of `buf`.
    pub fn write_all(&mut self, buf: &[u8]) -> Result<(), FsError> {
        use std::io::Write as _;
        Ok(self.file()?.write_all(buf)?)
    }

    /// Flushes to disk and renames the file over the target; its metadata.
    pub fn commit(mut self) -> Result<Meta, FsError> {
        let file = self.file()?;
        file.sync_all()?;
        let meta = Meta::from_stat(&rustix::fs::fstat(&*file)?);
        rustix::fs::renameat(&self.dir, self.tmp.as_str(), &self.dir, self.name.as_str())?;
        self.file = None;
        // the rename itself durable too; a failure here loses nothing that was written
        let _ = rustix::fs::fsync(&self.dir);
        Ok(meta)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = rustix::fs::unlinkat(&self.dir, self.tmp.as_str(), AtFlags::empty());
        }
    }
}

/// A project's files as its container sees them: the home, with its snapshots (read-only) at
/// `~/.snapshots/<name>/…`.
#[derive(Debug)]
pub struct ProjectFs {
    /// The home.
    pub home: Tree,
    /// The snapshots directory (one subdirectory per snapshot).
    pub snapshots: Tree,
}

impl ProjectFs {
    /// Opens the home (read-write, new files given to `owner`) and the snapshots (read-only).
    pub fn open(home: &Path, snapshots: &Path, owner: Option<Owner>) -> Result<ProjectFs, FsError> {
        Ok(ProjectFs {
            home: Tree::open(home, Access::ReadWrite(owner))?,
            snapshots: Tree::open(snapshots, Access::ReadOnly)?,
        })
    }

    /// The tree holding `p` and the path within it: `.snapshots/…` is in the snapshots.
    pub fn locate(&self, p: &RelPath) -> (&Tree, RelPath) {
        match p.split_first() {
            Some((SNAPSHOTS, rest)) => (&self.snapshots, rest),
            _ => (&self.home, p.clone()),
        }
    }
}

#[cfg(test)]
mod tests;
