//! The reverse proxy into a project: hyper's client over a connection made inside the project's
//! network namespace (`Host::connect_port`), pooled per project and port (idle connections are
//! kept while the project runs and dropped when it stops), bodies streamed both ways (hyper
//! polls a body only when the other side can take the bytes, so memory stays bounded), and
//! `Upgrade` (WebSocket) passed through: both sides' upgraded streams copied into each other.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::Body;
use crate::api::{ErrorKind, WireError};
use crate::core::Host;
use crate::domain::project::ProjectId;

/// Idle connections kept per project and port.
const MAX_IDLE: usize = 64;

type Sender = SendRequest<Body>;

/// Idle backend connections by project and port.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<HashMap<(ProjectId, u16), Vec<Sender>>>,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(ProjectId, u16), Vec<Sender>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, id: ProjectId, port: u16) -> Option<Sender> {
        let mut idle = self.lock();
        let v = idle.get_mut(&(id, port))?;
        while let Some(s) = v.pop() {
            if s.is_ready() && !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    /// Returns a connection to the pool once its response is read to the end (hyper's
    /// `ready()`), unless it closes first.
    fn give_back(self: &Arc<Self>, id: ProjectId, port: u16, mut s: Sender) {
        let pool = self.clone();
        tokio::spawn(async move {
            if s.ready().await.is_ok() {
                let mut idle = pool.lock();
                let v = idle.entry((id, port)).or_default();
                v.retain(|s| !s.is_closed());
                if v.len() < MAX_IDLE {
                    v.push(s);
                }
            }
        });
    }

    /// Closes every idle connection into the project (it stopped).
    pub fn drop_project(&self, id: ProjectId) {
        self.lock().retain(|(p, _), _| *p != id);
    }

    /// Idle connections into the project (tests, logs).
    pub fn idle(&self, id: ProjectId) -> usize {
        self.lock()
            .iter()
            .filter(|((p, _), _)| *p == id)
            .map(|(_, v)| v.len())
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

/// Sends `req` into the project and returns the answer with its body streaming. A pooled
/// connection the server closed meanwhile is replaced once, if the request was not sent on it.
pub async fn send(
    host: &Host,
    pool: &Arc<Pool>,
    id: ProjectId,
    port: u16,
    req: Request<Body>,
    timeout: Duration,
    upgrade: bool,
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
            None => (connect(host, id, port).await?, false),
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
            pool.give_back(id, port, sender);
        }
        Ok(resp)
    };
    tokio::time::timeout(timeout, work)
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
