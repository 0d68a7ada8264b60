//! Socket activation (listenfd) and service-manager notifications (sd-notify): READY/STATUS,
//! the watchdog, STOPPING.
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use sd_notify::NotifyState;

/// The listening sockets systemd passed (by `FileDescriptorName=`), or the API's own bound one.
#[derive(Debug)]
pub struct Listeners {
    /// The HTTP API (`http`; the first passed fd when none is named).
    pub http: TcpListener,
    /// `true` when systemd passed them (socket activation), `false` when we bound `http`.
    pub activated: bool,
    /// The other named sockets (`proxy`, `ssh`), taken by their servers with [`Listeners::take`].
    others: Vec<(String, TcpListener)>,
}

impl Listeners {
    /// Takes the listener systemd passed under `name` (its socket unit's `FileDescriptorName=`).
    pub fn take(&mut self, name: &str) -> Option<TcpListener> {
        let i = self.others.iter().position(|(n, _)| n == name)?;
        Some(self.others.swap_remove(i).1)
    }

    /// Names of the passed sockets nobody took (logged: a socket unit without a server).
    pub fn untaken(&self) -> Vec<&str> {
        self.others.iter().map(|(n, _)| n.as_str()).collect()
    }
}

/// Takes the sockets systemd passed: `http` (or the first one if none is named) and any other
/// named TCP listener; binds `fallback` for `http` when the process was not socket-activated.
/// Must run before any thread exists: it reads and clears the `LISTEN_*` variables.
pub fn take_listeners(fallback: SocketAddr) -> std::io::Result<Listeners> {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|v| v.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() == 0 {
        let l = TcpListener::bind(fallback)?;
        l.set_nonblocking(true)?;
        return Ok(Listeners {
            http: l,
            activated: false,
            others: Vec::new(),
        });
    }
    let http_idx = names.iter().position(|n| n == "http").unwrap_or(0);
    let mut http = None;
    let mut others = Vec::new();
    for idx in 0..fds.len() {
        let Some(l) = fds.take_tcp_listener(idx)? else {
            continue;
        };
        l.set_nonblocking(true)?;
        if idx == http_idx {
            http = Some(l);
        } else {
            let name = names
                .get(idx)
                .cloned()
                .unwrap_or_else(|| format!("fd{idx}"));
            others.push((name, l));
        }
    }
    let http = http.ok_or_else(|| {
        std::io::Error::other(format!(
            "socket activation passed {} fd(s) ({names:?}) but none is a TCP listener for http",
            fds.len()
        ))
    })?;
    Ok(Listeners {
        http,
        activated: true,
        others,
    })
}

/// Tells the service manager we are ready, with a status line.
pub fn notify_ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells the service manager we are shutting down.
pub fn notify_stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Pets the watchdog at half its interval, if the unit has one (`WatchdogSec=`).
pub fn spawn_watchdog() -> Option<Duration> {
    let every = sd_notify::watchdog_enabled()? / 2;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
        }
    });
    Some(every)
}
