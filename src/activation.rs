//! Socket activation (listenfd) and service-manager notifications (sd-notify): READY/STATUS,
//! the watchdog, STOPPING.
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use sd_notify::NotifyState;

/// Where the HTTP listener came from.
#[derive(Debug)]
pub struct HttpListener {
    /// The listening socket.
    pub listener: TcpListener,
    /// `true` when systemd passed it (socket activation), `false` when we bound it.
    pub activated: bool,
}

/// Takes the listener named `http` from systemd (or the first one if none is named), or binds
/// `fallback` when the process was not socket-activated. Must run before any thread exists:
/// it reads and clears the `LISTEN_*` variables.
pub fn take_http_listener(fallback: SocketAddr) -> std::io::Result<HttpListener> {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|v| v.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() > 0 {
        let idx = names.iter().position(|n| n == "http").unwrap_or(0);
        if let Some(l) = fds.take_tcp_listener(idx)? {
            l.set_nonblocking(true)?;
            return Ok(HttpListener {
                listener: l,
                activated: true,
            });
        }
        return Err(std::io::Error::other(format!(
            "socket activation passed {} fd(s) ({names:?}) but none is a TCP listener for http",
            fds.len()
        )));
    }
    let l = TcpListener::bind(fallback)?;
    l.set_nonblocking(true)?;
    Ok(HttpListener {
        listener: l,
        activated: false,
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
