//! Connections into a running project's network namespace (the proxy's and SSH's way in): the
//! container's init is found as the child of the unit's main process (conmon), its
//! `/proc/<pid>/ns/net` is opened once per start and cached, and sockets are made inside it by
//! one long-lived thread of the daemon's own, the *socket factory* (not a runtime thread): it
//! `setns`es into a project's namespace only when the namespace differs from the one it is in,
//! creates an unconnected non-blocking TCP socket there (a socket keeps the namespace it was
//! created in) and hands it back; the connect then runs on the runtime like any other. The
//! factory does nothing else, so nothing of the daemon's own can leak into a project's network,
//! and no runtime thread ever changes namespace. When a project stops, the factory leaves its
//! namespace (back to the daemon's) and drops its handle, so a stopped project's namespace is not
//! kept alive by the daemon.
//!
//! Works for every network mode (`none` too): the target is always the project's own loopback.
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

use crate::domain::project::ProjectId;

/// A project's network namespace: the open `/proc/<pid>/ns/net` and its identity (nsfs device
/// and inode: two handles with the same identity are the same namespace).
#[derive(Debug)]
struct Ns {
    fd: OwnedFd,
    key: (u64, u64),
}

impl Ns {
    fn new(fd: OwnedFd) -> io::Result<Ns> {
        let st = nix::sys::stat::fstat(fd.as_fd()).map_err(io::Error::from)?;
        Ok(Ns {
            fd,
            key: (st.st_dev, st.st_ino),
        })
    }
}

/// The cached network namespace of each running project, keyed by its unit's main pid (a new
/// start has a new conmon, so a stale namespace is never used), and the socket factory.
#[derive(Debug, Default)]
pub struct Netns {
    cache: Mutex<HashMap<ProjectId, (u32, Arc<Ns>)>>,
    factory: OnceLock<Factory>,
}

impl Netns {
    /// An empty cache (the factory thread starts with the first connection).
    pub fn new() -> Netns {
        Netns::default()
    }

    /// Connects to `127.0.0.1:port` in the namespace of the container under `conmon`.
    pub async fn connect(
        &self,
        id: ProjectId,
        conmon: u32,
        port: u16,
        timeout: Duration,
    ) -> io::Result<tokio::net::TcpStream> {
        let ns = self.netns(id, conmon)?;
        connect_in(self.factory()?, ns, port, timeout).await
    }

    /// Drops the project's cached namespace; the factory leaves it if it is in it.
    pub fn forget(&self, id: ProjectId) {
        let gone = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let (Some((_, ns)), Some(f)) = (gone, self.factory.get()) {
            f.leave(ns.key);
        }
    }

    /// The factory, started on first use (a failed start is tried again by the next
    /// connection; of two racing starts, the loser's thread ends with its handle).
    fn factory(&self) -> io::Result<&Factory> {
        if let Some(f) = self.factory.get() {
            return Ok(f);
        }
        let f = Factory::start()
            .map_err(|e| io::Error::new(e.kind(), format!("the netns socket factory: {e}")))?;
        Ok(self.factory.get_or_init(|| f))
    }

    fn netns(&self, id: ProjectId, conmon: u32) -> io::Result<Arc<Ns>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((pid, ns)) = cache.get(&id)
            && *pid == conmon
        {
            return Ok(ns.clone());
        }
        let ns = Arc::new(Ns::new(open_netns(conmon)?)?);
        if let Some((_, old)) = cache.insert(id, (conmon, ns.clone()))
            && old.key != ns.key
            && let Some(f) = self.factory.get()
        {
            f.leave(old.key);
        }
        Ok(ns)
    }
}

/// Connects to `127.0.0.1:port` inside `ns` with a socket from the factory; the connect runs
/// on the runtime.
async fn connect_in(
    f: &Factory,
    ns: Arc<Ns>,
    port: u16,
    timeout: Duration,
) -> io::Result<tokio::net::TcpStream> {
    let fd = f.socket(ns).await?;
    let sock = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let s = tokio::time::timeout(timeout, sock.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connection timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// What the factory thread is asked.
enum Job {
    /// a new unconnected non-blocking TCP socket inside `ns`
    Socket(Arc<Ns>, tokio::sync::oneshot::Sender<io::Result<OwnedFd>>),
    /// go back to the daemon's namespace if in this one (the project stopped)
    Leave((u64, u64)),
}

/// The handle on the socket factory thread (it ends when this is dropped).
#[derive(Debug)]
struct Factory {
    jobs: mpsc::Sender<Job>,
}

impl Factory {
    fn start() -> io::Result<Factory> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("netns-sockets".into())
            .spawn(move || {
                // the daemon's own namespace, opened before any setns: where `Leave` returns
                let home = std::fs::File::open("/proc/thread-self/ns/net")
                    .and_then(|f| Ns::new(OwnedFd::from(f)));
                match home {
                    Ok(home) => {
                        let _ = ready_tx.send(Ok(()));
                        factory_loop(&home, &rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("the factory thread died"))??;
        Ok(Factory { jobs: tx })
    }

    fn send(&self, job: Job) -> io::Result<()> {
        self.jobs
            .send(job)
            .map_err(|_| io::Error::other("the netns socket factory stopped"))
    }

    async fn socket(&self, ns: Arc<Ns>) -> io::Result<OwnedFd> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Job::Socket(ns, tx))?;
        rx.await
            .map_err(|_| io::Error::other("the netns socket factory stopped"))?
    }

    fn leave(&self, key: (u64, u64)) {
        let _ = self.send(Job::Leave(key));
    }
}

/// The factory thread: serves jobs until every sender is gone. `at` is the identity of the
/// namespace the thread is in (first the daemon's own). It changes only after a `setns` that
/// succeeded, and a failed `setns` leaves the thread where it was (the kernel's rule), so a
/// socket is only ever made in the namespace it was asked for. The identity cannot be reused
/// by another namespace meanwhile: the thread being in it keeps it alive.
fn factory_loop(home: &Ns, jobs: &mpsc::Receiver<Job>) {
    let mut at = home.key;
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Socket(ns, reply) => {
                let _ = reply.send(socket_in(&mut at, &ns));
            }
            Job::Leave(key) => {
                if at == key && key != home.key {
                    match nix::sched::setns(&home.fd, nix::sched::CloneFlags::CLONE_NEWNET) {
                        Ok(()) => at = home.key,
                        // still in the project's namespace: later jobs setns as needed
                        Err(e) => {
                            tracing::warn!(error = %e, "netns factory: cannot return to the daemon's namespace")
                        }
                    }
                }
            }
        }
    }
}

/// A socket made in `ns`, after a `setns` when the thread is elsewhere (`at`).
fn socket_in(at: &mut (u64, u64), ns: &Ns) -> io::Result<OwnedFd> {
    if *at != ns.key {
        nix::sched::setns(&ns.fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| io::Error::other(format!("setns into the project's network: {e}")))?;
        *at = ns.key;
    }
    new_socket()
}

/// An unconnected TCP/IPv4 socket, non-blocking and close-on-exec, in the calling thread's
/// network namespace.
fn new_socket() -> io::Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

/// Opens the network namespace of the container whose conmon is `conmon`.
fn open_netns(conmon: u32) -> io::Result<OwnedFd> {
    let pid = container_pid(conmon)?;
    let f = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    // the pid was conmon's child before the open; still being it after means the open got the
    // container's namespace, not that of a process that reused the pid in between
    if parent_of(pid)? != conmon {
        return Err(io::Error::other(format!(
            "process {pid} left conmon {conmon} while its namespace was opened"
        )));
    }
    Ok(OwnedFd::from(f))
}

/// The container's init: conmon's child (conmon is its subreaper, and has no other child for the
/// life of a container started with `podman run -d`).
pub fn container_pid(conmon: u32) -> io::Result<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{conmon}/task"))?;
    for t in tasks {
        let t = t?;
        let children = std::fs::read_to_string(t.path().join("children"))?;
        if let Some(pid) = first_pid(&children) {
            return Ok(pid);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("conmon {conmon} has no child: the container is not running"),
    ))
}

/// The first pid of a `/proc/<pid>/task/<tid>/children` list.
fn first_pid(children: &str) -> Option<u32> {
    children.split_ascii_whitespace().next()?.parse().ok()
}

fn parent_of(pid: u32) -> io::Result<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_ppid(&stat).ok_or_else(|| io::Error::other(format!("/proc/{pid}/stat: unparsable")))
}

/// The parent pid from `/proc/<pid>/stat` (the field after `comm`, which may hold spaces and
/// parentheses, so it is found from the last `)`).
fn parse_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_children_and_stat() {
        assert_eq!(first_pid("4242 4250 "), Some(4242));
        assert_eq!(first_pid(""), None);
        assert_eq!(parse_ppid("17 (a b) c) S 9 17 17 0"), Some(9));
        assert_eq!(parse_ppid("17 (x) R"), None);
    }

    fn ns_of(path: &str) -> Arc<Ns> {
        Arc::new(Ns::new(OwnedFd::from(std::fs::File::open(path).unwrap())).unwrap())
    }

    /// The identities of the namespaces the factory threads of this process are in.
    fn factory_threads_netns() -> Vec<String> {
        let mut v = Vec::new();
        for t in std::fs::read_dir("/proc/self/task").unwrap() {
            let t = t.unwrap().path();
            if std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == "netns-sockets") {
                v.push(
                    std::fs::read_link(t.join("ns/net"))
                        .unwrap()
                        .display()
                        .to_string(),
                );
            }
        }
        v
    }

    #[tokio::test]
    async fn a_factory_socket_connects_in_the_daemons_own_namespace_without_setns() {
        // no privilege needed: the factory starts in the daemon's namespace and stays there
        let f = Factory::start().unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let own = ns_of("/proc/self/ns/net");
        for _ in 0..3 {
            let c = connect_in(&f, own.clone(), port, Duration::from_secs(2))
                .await
                .unwrap();
            let (s, _) = l.accept().await.unwrap();
            assert_eq!(s.peer_addr().unwrap(), c.local_addr().unwrap());
            assert!(c.nodelay().unwrap());
        }
        // nothing listens: refused at once, not a timeout
        drop(l);
        let e = connect_in(&f, own, port, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    }

    #[tokio::test]
    async fn a_factory_socket_lives_in_the_asked_namespace_and_the_factory_leaves_it() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test makes a network namespace: run the unit tests as root (scripts/test does)"
        );
        // a fresh namespace (its loopback down), made on a thread that exits after opening it
        let other = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            ns_of("/proc/thread-self/ns/net")
        })
        .join()
        .unwrap();
        let own = ns_of("/proc/self/ns/net");
        assert_ne!(other.key, own.key);
        let f = Factory::start().unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        // the daemon's listener is out of reach from the other namespace
        let e = connect_in(&f, other.clone(), port, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(nix::libc::ENETUNREACH), "{e}");
        assert!(factory_threads_netns().contains(&format!("net:[{}]", other.key.1)));
        // and back: a socket for the daemon's own namespace reaches it
        connect_in(&f, own.clone(), port, Duration::from_secs(2))
            .await
            .unwrap();
        l.accept().await.unwrap();
        // in the other namespace again, then told to leave it (its project stopped)
        let _ = connect_in(&f, other.clone(), port, Duration::from_secs(2)).await;
        assert!(factory_threads_netns().contains(&format!("net:[{}]", other.key.1)));
        f.leave(other.key);
        // no other job: the thread goes home on its own
        let own_link = format!("net:[{}]", own.key.1);
        let t = std::time::Instant::now();
        while !factory_threads_netns().iter().all(|n| *n == own_link) {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the factory stayed in {:?}",
                factory_threads_netns()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn own_parent_is_read() {
        let me = std::process::id();
        let parent = parent_of(me).unwrap();
        assert_eq!(parent, nix::unistd::getppid().as_raw() as u32);
    }
}
