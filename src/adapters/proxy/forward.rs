//! The reverse proxy into a project: hyper's client over a connection made inside the project's
//! network namespace (`Host::connect_port`), pooled per project and port (idle connections are
//! kept while the project runs and dropped when it stops), bodies streamed both ways (hyper
//! polls a body only when the other side can take the bytes, so memory stays bounded), and
//! `Upgrade` (WebSocket) passed through: both sides' upgraded streams copied into each other.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::Body;
use crate::api::{ErrorKind, WireError};
use crate::core::Host;
use crate::domain::project::ProjectId;

/// Connections kept per project and port (busy or idle); one made while that many are kept
/// serves its request and closes.
const MAX_POOLED: usize = 256;

/// How long a pooled connection may sit idle before it is closed: an open connection into a
/// project counts as use of it, so idle ones must not keep it from its idle stop.
pub const POOL_IDLE: Duration = Duration::from_secs(30);

type Sender = SendRequest<Body>;
/// Pooled connections by project and port, each with when it went back.
type Conns = HashMap<(ProjectId, u16), Vec<(Sender, Instant)>>;

/// Backend connections by project and port. A connection goes back as soon as its response head
/// is in (no task per request waits for the end of its body): it is busy until hyper has read
/// that body, and [`Pool::take`] only hands out one that is ready for a new request. Busy ones
/// stay (a concurrent request must not open a new connection while another is finishing, then
/// close one when too many are idle), closed ones are dropped as they are found.
#[derive(Debug, Default)]
pub struct Pool {
    conns: Mutex<Conns>,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection ready for a request, taken out of the pool.
    fn take(&self, id: ProjectId, port: u16) -> Option<Sender> {
        let mut conns = self.lock();
        let v = conns.get_mut(&(id, port))?;
        v.retain(|(s, _)| !s.is_closed());
        // the most recently returned first: its buffers are warm
        let i = v.iter().rposition(|(s, _)| s.is_ready())?;
        Some(v.swap_remove(i).0)
    }

    /// Puts a connection (back) into the pool, unless it is full.
    fn put(&self, id: ProjectId, port: u16, s: Sender) {
        if s.is_closed() {
            return;
        }
        let mut conns = self.lock();
        let v = conns.entry((id, port)).or_default();
        if v.len() < MAX_POOLED {
            v.push((s, Instant::now()));
        }
    }

    /// Drops every connection into the project (it stopped): idle ones close at once, busy
    /// ones once their response is read.
    pub fn drop_project(&self, id: ProjectId) {
        self.lock().retain(|(p, _), _| *p != id);
    }

    /// Closes the connections idle for `max` or longer (a busy one stays, and counts from the
    /// time it went back).
    pub fn expire(&self, max: Duration) {
        self.lock().retain(|_, v| {
            v.retain(|(s, at)| !s.is_closed() && (!s.is_ready() || at.elapsed() < max));
            !v.is_empty()
        });
    }

    /// Idle connections into the project (tests, logs).
    pub fn idle(&self, id: ProjectId) -> usize {
        self.lock()
            .iter()
            .filter(|((p, _), _)| *p == id)
            .map(|(_, v)| {
                v.iter()
                    .filter(|(s, _)| s.is_ready() && !s.is_closed())
                    .count()
            })
            .sum()
    }
}

/// A new connection into the project, handshaken; its driver runs on its own task (with
/// upgrades, for WebSockets).
async fn connect(host: &Host, id: ProjectId, port: u16) -> Result<Sender, WireError> {
    let stream = host.connect_port(id, port).await.map_err(WireError::from)?;
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| {
            WireError::new(
                ErrorKind::BackendUnavailable,
                format!("project {id}: port {port}: {e}"),
            )
        })?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

fn backend_error(id: ProjectId, port: u16, e: &hyper::Error) -> WireError {
    WireError::new(
        ErrorKind::BackendUnavailable,
        format!("project {id}: the server on port {port} failed: {e}"),
    )
}

/// A new connection as [`connect`]; until `listen_by` (a project just started for this request:
/// its server may not listen yet), a port that refuses is tried again every 100 ms.
async fn connect_waiting(
    host: &Host,
    id: ProjectId,
    port: u16,
    listen_by: Option<Instant>,
) -> Result<Sender, WireError> {
    loop {
        match connect(host, id, port).await {
            Err(e)
                if matches!(e.kind, ErrorKind::BackendUnavailable)
                    && listen_by.is_some_and(|t| Instant::now() + LISTEN_RETRY < t) =>
            {
                tokio::time::sleep(LISTEN_RETRY).await;
            }
            r => return r,
        }
    }
}

/// How often a port of a project just started is tried until its server listens.
const LISTEN_RETRY: Duration = Duration::from_millis(100);

/// Sends `req` into the project and returns the answer with its body streaming. A pooled
/// connection the server closed meanwhile is replaced once, if the request was not sent on it.
/// `listen_by`: the project was just started for this request, and its server gets until then
/// to listen (on top of `timeout`).
#[allow(clippy::too_many_arguments)]
pub async fn send(
    host: &Host,
    pool: &Arc<Pool>,
    id: ProjectId,
    port: u16,
    req: Request<Body>,
    timeout: Duration,
    upgrade: bool,
    listen_by: Option<Instant>,
) -> Result<Response<Incoming>, WireError> {
    let timed_out = || {
        WireError::new(
            ErrorKind::BackendTimeout,
            format!(
                "project {id}: the server on port {port} did not answer within {}s (proxy.timeout)",
                timeout.as_secs()
            ),
        )
    };
    let work = async {
        // an upgrade's connection becomes the tunnel: never a pooled one
        let pooled = if upgrade { None } else { pool.take(id, port) };
        let (mut sender, reused) = match pooled {
            Some(s) => (s, true),
            None => (connect_waiting(host, id, port, listen_by).await?, false),
        };
        let resp = match sender.try_send_request(req).await {
            Ok(r) => r,
            Err(mut e) if reused && e.message().is_some() => {
                // not sent: the idle connection was closed by the server, take a fresh one
                let req = e
                    .take_message()
                    .ok_or_else(|| backend_error(id, port, e.error()))?;
                sender = connect(host, id, port).await?;
                sender
                    .try_send_request(req)
                    .await
                    .map_err(|e| backend_error(id, port, e.error()))?
            }
            Err(e) => return Err(backend_error(id, port, e.error())),
        };
        if !upgrade {
            pool.put(id, port, sender);
        }
        Ok(resp)
    };
    let waiting = listen_by.map_or(Duration::ZERO, |t| {
        t.saturating_duration_since(Instant::now())
    });
    tokio::time::timeout(timeout + waiting, work)
        .await
        .map_err(|_| timed_out())?
}

/// The client side of an upgrade: once the client's and the server's connections have both
/// switched, bytes are copied both ways until either side closes. The task ends at shutdown.
pub fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    mut server: Response<Incoming>,
    stop: tokio_util::sync::CancellationToken,
    id: ProjectId,
) -> Response<Incoming> {
    let server_up = hyper::upgrade::on(&mut server);
    tokio::spawn(async move {
        let (c, s) = match tokio::join!(client, server_up) {
            (Ok(c), Ok(s)) => (c, s),
            (c, s) => {
                tracing::debug!(project_id = %id, client = c.is_ok(), server = s.is_ok(), "upgrade not completed");
                return;
            }
        };
        let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut c, &mut s) => {
                if let Err(e) = r {
                    tracing::debug!(project_id = %id, error = %e, "tunnel ended");
                }
            }
            () = stop.cancelled() => {}
        }
    });
    server
}

/// A backend's body as the proxy's body type (streamed, errors as I/O errors).
pub fn stream_body(b: Incoming) -> Body {
    b.map_err(std::io::Error::other).boxed()
}

/// The response to a request the backend answered `101` to but the client did not ask to
/// upgrade (a misbehaving server): a 502.
pub fn unexpected_switch(id: ProjectId, port: u16) -> WireError {
    WireError::new(
        ErrorKind::BackendUnavailable,
        format!("project {id}: the server on port {port} switched protocols unasked"),
    )
}

/// Whether the status switches protocols.
pub fn is_switch(s: StatusCode) -> bool {
    s == StatusCode::SWITCHING_PROTOCOLS
}
