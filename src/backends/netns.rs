//! Connections into a running project's network namespace (the proxy's and SSH's way in): the
//! container's init is found as the child of the unit's main process (conmon), its
//! `/proc/<pid>/ns/net` is opened once per start and cached, and each connection is made on a
//! short-lived thread of its own that `setns`es into that namespace, creates the socket there (a
//! socket keeps the namespace it was created in) and exits. No thread of the daemon's runtime
//! ever changes namespace, so nothing else can leak into a project's network.
//!
//! Works for every network mode (`none` too): the target is always the project's own loopback.
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::domain::project::ProjectId;

/// The cached network namespace of each running project, keyed by its unit's main pid (a new
/// start has a new conmon, so a stale namespace is never used).
#[derive(Debug, Default)]
pub struct Netns {
    cache: Mutex<HashMap<ProjectId, (u32, Arc<OwnedFd>)>>,
}

impl Netns {
    /// An empty cache.
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
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("netns-connect".into())
            .spawn(move || {
                let r = connect_in(&ns, port, timeout);
                let _ = tx.send(r);
            })?;
        let s = rx
            .await
            .map_err(|_| io::Error::other("the netns connect thread died"))??;
        s.set_nonblocking(true)?;
        s.set_nodelay(true)?;
        tokio::net::TcpStream::from_std(s)
    }

    /// Drops the project's cached namespace.
    pub fn forget(&self, id: ProjectId) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    fn netns(&self, id: ProjectId, conmon: u32) -> io::Result<Arc<OwnedFd>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((pid, fd)) = cache.get(&id)
            && *pid == conmon
        {
            return Ok(fd.clone());
        }
        let fd = Arc::new(open_netns(conmon)?);
        cache.insert(id, (conmon, fd.clone()));
        Ok(fd)
    }
}

/// Runs on a thread of its own, which ends right after: it is never used in the host's namespace
/// again.
fn connect_in(ns: &OwnedFd, port: u16, timeout: Duration) -> io::Result<std::net::TcpStream> {
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| io::Error::other(format!("setns into the project's network: {e}")))?;
    std::net::TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), timeout)
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

    #[test]
    fn own_parent_is_read() {
        let me = std::process::id();
        let parent = parent_of(me).unwrap();
        assert_eq!(parent, nix::unistd::getppid().as_raw() as u32);
    }
}
