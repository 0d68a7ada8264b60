use super::*;
use std::io::Read as _;
use std::os::unix::fs::symlink;
use std::path::PathBuf;

/// A fresh directory with `home/` (the tree) and `outside/secret` beside it.
struct Fixture {
    base: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let base = std::env::temp_dir().join(format!("safefs-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(base.join("home")).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::fs::write(base.join("outside/secret"), b"SECRET").unwrap();
        Fixture { base }
    }
    fn home(&self) -> PathBuf {
        self.base.join("home")
    }
    fn tree(&self) -> Tree {
        Tree::open(&self.home(), Access::ReadWrite(None)).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn rel(s: &str) -> RelPath {
    RelPath::parse(s).unwrap()
}

fn read(t: &Tree, p: &str) -> Result<Vec<u8>, FsError> {
    let (mut f, _) = t.open_read(&rel(p))?;
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    Ok(v)
}

#[test]
fn paths_are_checked_and_normalized() {
    for bad in ["/etc/shadow", "..", "a/../../b", "a/..", "a\0b"] {
        assert!(
            matches!(RelPath::parse(bad), Err(FsError::InvalidPath(_))),
            "{bad:?}"
        );
    }
    assert!(RelPath::parse(&"a/".repeat(2049)).is_err());
    assert!(RelPath::parse(&"x".repeat(256)).is_err());
    assert!(RelPath::parse(&"x".repeat(255)).is_ok());
    assert_eq!(rel("a//b/./c/").as_str(), "a/b/c");
    assert_eq!(rel("").as_str(), ".");
    assert!(rel("./").is_root());
    let abc = rel("a/b/c");
    let (p, n) = abc.split_last().unwrap();
    assert_eq!((p.as_str(), n), ("a/b", "c"));
    let (f, r) = abc.split_first().unwrap();
    assert_eq!((f, r.as_str()), ("a", "b/c"));
    assert_eq!(rel("x").split_last().unwrap().0, RelPath::root());
    assert!(rel("a").join("..").is_err());
    assert!(rel("a").join("b/c").is_err());
}

#[test]
fn symlinks_out_of_the_tree_are_refused() {
    let fx = Fixture::new();
    let h = fx.home();
    symlink(fx.base.join("outside/secret"), h.join("abs")).unwrap();
    symlink("../outside/secret", h.join("rel")).unwrap();
    symlink("../outside", h.join("dir")).unwrap();
    symlink("/proc/self/root/etc/passwd", h.join("magic")).unwrap();
    symlink("/etc", h.join("etc")).unwrap();
    let t = fx.tree();
    for p in ["abs", "rel", "dir/secret", "magic", "etc/passwd"] {
        let r = read(&t, p);
        assert!(matches!(r, Err(FsError::Escapes)), "{p}: {r:?}");
        assert!(matches!(t.stat(&rel(p)), Err(FsError::Escapes)), "{p}");
    }
    assert!(matches!(t.list(&rel("dir"), 10), Err(FsError::Escapes)));
    // writing through a symlinked directory creates nothing outside
    assert!(matches!(
        t.create_atomic(&rel("dir/new"), true),
        Err(FsError::Escapes)
    ));
    assert!(matches!(
        t.mkdir_all(&rel("dir/a/b")),
        Err(FsError::Escapes)
    ));
    assert!(matches!(t.mkdir(&rel("dir/a")), Err(FsError::Escapes)));
    assert!(matches!(
        t.remove(&rel("dir/secret")),
        Err(FsError::Escapes)
    ));
    assert!(matches!(
        t.rename(&rel("dir/secret"), &rel("stolen"), true),
        Err(FsError::Escapes)
    ));
    assert_eq!(
        std::fs::read_dir(fx.base.join("outside")).unwrap().count(),
        1,
        "nothing was created or removed outside"
    );
    // the link itself is listed as a link, and can be removed (it is in the tree)
    let l = t.list(&RelPath::root(), 100).unwrap();
    assert!(l.entries.iter().all(|e| e.meta.kind == Kind::Symlink));
    assert_eq!(t.lstat(&rel("abs")).unwrap().kind, Kind::Symlink);
    t.remove(&rel("abs")).unwrap();
    assert!(fx.base.join("outside/secret").exists());
    // replacing a link by a file replaces the link, not its target
    let mut f = t.create_atomic(&rel("rel"), false).unwrap();
    f.write_all(b"mine").unwrap();
    f.commit().unwrap();
    assert_eq!(
        std::fs::read(fx.base.join("outside/secret")).unwrap(),
        b"SECRET"
    );
    assert_eq!(read(&t, "rel").unwrap(), b"mine");
}

#[test]
fn symlinks_inside_the_tree_are_followed() {
    let fx = Fixture::new();
    let h = fx.home();
    std::fs::create_dir(h.join("d")).unwrap();
    std::fs::write(h.join("d/f"), b"hello").unwrap();
    symlink("d/f", h.join("lf")).unwrap();
    symlink("d", h.join("ld")).unwrap();
    symlink("../d/f", h.join("d/up")).unwrap();
    let t = fx.tree();
    assert_eq!(read(&t, "lf").unwrap(), b"hello");
    assert_eq!(read(&t, "ld/f").unwrap(), b"hello");
    assert_eq!(read(&t, "d/up").unwrap(), b"hello");
    assert_eq!(t.stat(&rel("ld")).unwrap().kind, Kind::Dir);
}

#[test]
fn atomic_writes_leave_nothing_when_dropped_and_keep_modes() {
    let fx = Fixture::new();
    let t = fx.tree();
    let mut f = t.create_atomic(&rel("a/b/c.txt"), true).unwrap();
    f.write_all(b"part").unwrap();
    drop(f);
    assert_eq!(std::fs::read_dir(fx.home().join("a/b")).unwrap().count(), 0);
    let mut f = t.create_atomic(&rel("a/b/c.txt"), true).unwrap();
    f.write_all(b"whole").unwrap();
    let m = f.commit().unwrap();
    assert_eq!((m.size, m.mode), (5, 0o644));
    assert_eq!(
        std::fs::read(fx.home().join("a/b/c.txt")).unwrap(),
        b"whole"
    );
    assert_eq!(t.stat(&rel("a")).unwrap().mode, 0o755);
    // a replaced file keeps its mode
    t.set_mode(&rel("a/b/c.txt"), 0o600).unwrap();
    let mut f = t.create_atomic(&rel("a/b/c.txt"), false).unwrap();
    f.write_all(b"again").unwrap();
    assert_eq!(f.commit().unwrap().mode, 0o600);
    // no set-id bit is ever set
    t.set_mode(&rel("a/b/c.txt"), 0o6755).unwrap();
    assert_eq!(t.stat(&rel("a/b/c.txt")).unwrap().mode, 0o755);
    assert_eq!(std::fs::read_dir(fx.home().join("a/b")).unwrap().count(), 1);
    // parents are not created unless asked
    assert!(matches!(
        t.create_atomic(&rel("x/y"), false),
        Err(FsError::NotFound)
    ));
    // a directory is not overwritten; a file is not a parent
    assert!(matches!(
        t.create_atomic(&rel("a"), false),
        Err(FsError::IsDirectory)
    ));
    assert!(matches!(
        t.create_atomic(&RelPath::root(), false),
        Err(FsError::IsDirectory)
    ));
    assert!(matches!(
        t.create_atomic(&rel("a/b/c.txt/d"), true),
        Err(FsError::NotDirectory)
    ));
}

#[test]
fn mkdir_remove_and_rename() {
    let fx = Fixture::new();
    let t = fx.tree();
    t.mkdir(&rel("d")).unwrap();
    assert!(matches!(t.mkdir(&rel("d")), Err(FsError::Exists)));
    assert!(matches!(t.mkdir(&rel("no/d")), Err(FsError::NotFound)));
    t.mkdir_all(&rel("d/e/f")).unwrap();
    t.mkdir_all(&rel("d/e/f")).unwrap();
    std::fs::write(fx.home().join("d/file"), b"x").unwrap();
    assert!(matches!(
        t.mkdir_all(&rel("d/file/g")),
        Err(FsError::NotDirectory)
    ));
    assert!(matches!(t.remove(&rel("d/e")), Err(FsError::NotEmpty)));
    t.remove(&rel("d/e/f")).unwrap();
    t.remove(&rel("d/file")).unwrap();
    assert!(matches!(t.remove(&rel("d/file")), Err(FsError::NotFound)));
    assert!(matches!(
        t.remove(&RelPath::root()),
        Err(FsError::InvalidPath(_))
    ));
    std::fs::write(fx.home().join("a"), b"a").unwrap();
    std::fs::write(fx.home().join("b"), b"b").unwrap();
    assert!(matches!(
        t.rename(&rel("a"), &rel("b"), false),
        Err(FsError::Exists)
    ));
    t.rename(&rel("a"), &rel("d/e/a"), true).unwrap();
    assert_eq!(read(&t, "d/e/a").unwrap(), b"a");
    assert!(matches!(
        t.remove_dir(&rel("b")),
        Err(FsError::NotDirectory)
    ));
    t.remove_file(&rel("b")).unwrap();
}

#[test]
fn open_file_creates_and_respects_exclusive() {
    let fx = Fixture::new();
    let t = fx.tree();
    let w = OpenOptions {
        write: true,
        create: true,
        ..Default::default()
    };
    let (mut f, m) = t.open_file(&rel("n"), w).unwrap();
    assert_eq!((m.kind, m.mode), (Kind::File, 0o644));
    std::io::Write::write_all(&mut f, b"12345").unwrap();
    let excl = OpenOptions {
        exclusive: true,
        ..w
    };
    assert!(matches!(t.open_file(&rel("n"), excl), Err(FsError::Exists)));
    symlink("/nonexistent-target", fx.home().join("dangling")).unwrap();
    assert!(matches!(
        t.open_file(&rel("dangling"), excl),
        Err(FsError::Exists)
    ));
    assert!(matches!(
        t.open_file(&rel("dangling"), w),
        Err(FsError::Escapes)
    ));
    let (_, m) = t
        .open_file(
            &rel("n"),
            OpenOptions {
                write: true,
                truncate: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(m.size, 0);
    assert!(matches!(
        t.open_file(
            &RelPath::root(),
            OpenOptions {
                read: true,
                ..Default::default()
            }
        ),
        Err(FsError::IsDirectory)
    ));
}

#[test]
fn fifos_are_refused_without_blocking() {
    let fx = Fixture::new();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        fx.home().join("fifo").as_path(),
        FileType::Fifo,
        Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let t = fx.tree();
    assert!(matches!(read(&t, "fifo"), Err(FsError::NotRegular)));
    assert_eq!(
        t.list(&RelPath::root(), 10).unwrap().entries[0].meta.kind,
        Kind::Other
    );
}

#[test]
fn listings_are_sorted_and_limited() {
    let fx = Fixture::new();
    for n in ["c", "a", "b"] {
        std::fs::write(fx.home().join(n), n).unwrap();
    }
    let t = fx.tree();
    let l = t.list(&RelPath::root(), 10).unwrap();
    let names: Vec<_> = l.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert!(!l.truncated);
    let l = t.list(&RelPath::root(), 2).unwrap();
    assert_eq!((l.entries.len(), l.truncated), (2, true));
    assert!(matches!(t.list(&rel("a"), 10), Err(FsError::NotDirectory)));
}

#[test]
fn read_only_trees_refuse_every_change() {
    let fx = Fixture::new();
    std::fs::write(fx.home().join("f"), b"f").unwrap();
    let t = Tree::open(&fx.home(), Access::ReadOnly).unwrap();
    assert!(t.is_read_only());
    assert_eq!(read(&t, "f").unwrap(), b"f");
    assert!(matches!(
        t.create_atomic(&rel("g"), true),
        Err(FsError::ReadOnly)
    ));
    assert!(matches!(t.mkdir(&rel("g")), Err(FsError::ReadOnly)));
    assert!(matches!(t.mkdir_all(&rel("g")), Err(FsError::ReadOnly)));
    assert!(matches!(t.remove(&rel("f")), Err(FsError::ReadOnly)));
    assert!(matches!(
        t.rename(&rel("f"), &rel("g"), true),
        Err(FsError::ReadOnly)
    ));
    assert!(matches!(
        t.set_mode(&rel("f"), 0o777),
        Err(FsError::ReadOnly)
    ));
    assert!(matches!(t.symlink("f", &rel("g")), Err(FsError::ReadOnly)));
    let w = OpenOptions {
        write: true,
        ..Default::default()
    };
    assert!(matches!(t.open_file(&rel("f"), w), Err(FsError::ReadOnly)));
    assert_eq!(std::fs::read_dir(fx.home()).unwrap().count(), 1);
}

#[test]
fn project_fs_puts_snapshots_under_dot_snapshots() {
    let fx = Fixture::new();
    std::fs::create_dir_all(fx.base.join("snaps/s1")).unwrap();
    std::fs::write(fx.base.join("snaps/s1/f"), b"old").unwrap();
    std::fs::write(fx.home().join("f"), b"new").unwrap();
    let fs = ProjectFs::open(&fx.home(), &fx.base.join("snaps"), None).unwrap();
    let (t, p) = fs.locate(&rel(".snapshots/s1/f"));
    assert!(t.is_read_only());
    assert_eq!(read(t, p.as_str()).unwrap(), b"old");
    let (t, p) = fs.locate(&rel(".snapshots"));
    assert!(t.is_read_only() && p.is_root());
    assert!(matches!(t.remove(&p), Err(FsError::ReadOnly)));
    let (t, p) = fs.locate(&rel("f"));
    assert!(!t.is_read_only());
    assert_eq!(read(t, p.as_str()).unwrap(), b"new");
    let (t, p) = fs.locate(&rel(".snapshotsx/f"));
    assert!(!t.is_read_only() && p.as_str() == ".snapshotsx/f");
}

/// A symlink swapped between a file of the tree and one outside, as fast as a thread can,
/// while reads go through it: a read returns the file of the tree or an error, never the other.
#[test]
fn a_symlink_swapped_during_reads_never_leaks() {
    let fx = Fixture::new();
    let h = fx.home();
    std::fs::create_dir(h.join("in")).unwrap();
    std::fs::write(h.join("in/secret"), b"inside").unwrap();
    symlink("in", h.join("link")).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (stop, h, out) = (stop.clone(), h.clone(), fx.base.join("outside"));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let tmp = h.join("link.tmp");
                let _ = std::fs::remove_file(&tmp);
                if n.is_multiple_of(2) {
                    symlink(&out, &tmp).unwrap();
                } else {
                    symlink("in", &tmp).unwrap();
                }
                std::fs::rename(&tmp, h.join("link")).unwrap();
                n += 1;
            }
            n
        })
    };
    let t = fx.tree();
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..20_000 {
        match read(&t, "link/secret") {
            Ok(v) => {
                assert_eq!(v, b"inside");
                ok += 1;
            }
            Err(FsError::Escapes | FsError::NotFound) => refused += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 100, "the link was swapped {swaps} times");
    assert!(
        ok > 0 && refused > 0,
        "both sides were hit: {ok} ok, {refused} refused"
    );
}

#[test]
fn trees_are_send_and_sync() {
    fn is<T: Send + Sync>() {}
    is::<Tree>();
    is::<ProjectFs>();
    is::<AtomicFile>();
}
