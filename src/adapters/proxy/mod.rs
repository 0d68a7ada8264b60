//! The public side (`cocalc-project-host-proxy.socket`, port 8080): the HTTP/WebSocket proxy into
//! running projects and the files of every project, on a listener of its own (hyper 1 server,
//! hyper client). `run(listener, host, auth, shutdown)` serves it as `http::serve` serves the API.
//!
//! - `route`: the paths (`/<id>/port/<p>/…`, `/<id>/server/<p>/…`, `/<id>/files/…`);
//! - `cookie`: the session cookie a `?token=` is exchanged for;
//! - `headers`: hop-by-hop removal, credentials kept from projects, `X-Forwarded-*`;
//! - `forward`: the client side (pool, streaming, WebSocket tunnels);
//! - `settings`: the `[proxy]` config section.
//!
//! Auth: the API's tokens with the actions `proxy` and `files`, as `Authorization: Bearer`
//! (never forwarded), `?token=` (exchanged for the cookie with a `303` to the URL without it) or
//! the cookie. A project's files are served by [`crate::adapters::files`].
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{ErrorKind, WireError};
use crate::auth::{Action, Auth, Principal};
use crate::core::{Host, HostEvent};
use crate::domain::project::{ProjectId, ProjectState};

pub mod cookie;
pub mod forward;
pub mod headers;
pub mod route;
mod settings;
#[cfg(test)]
mod tests;
pub use settings::{ProxyFragment, ProxySettings};

/// The proxy's response body: streamed from a project, or built here.
pub type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// Most connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 8192;
/// A client gets this long to send a request head (and, idle, its next one).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Most request header fields.
const MAX_HEADERS: usize = 100;
/// How long a cookie made from an admin token lives (admin tokens do not expire).
const ADMIN_COOKIE_SECS: u64 = 12 * 3600;

/// A body of bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// The JSON error answer `{error, code}` with the table's status.
pub fn error_response(e: &WireError) -> Response<Body> {
    let body = json!({"error": e.message, "code": e.kind.code()}).to_string();
    let mut r = Response::new(full(body));
    *r.status_mut() =
        StatusCode::from_u16(e.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Whether the client is a browser (it asks for HTML): a 401 then is a page, not JSON.
fn is_browser(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"))
}

fn unauthorized(e: &WireError, browser: bool) -> Response<Body> {
    if !browser {
        let mut r = error_response(e);
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"cocalc-project-host\""),
        );
        return r;
    }
    // nothing of the request is echoed: the page is fixed text
    let page = "<!doctype html><html><head><meta charset=\"utf-8\"><title>Sign-in needed</title></head>\
        <body><h1>Sign-in needed</h1><p>This project is reached through a link with a token \
        (<code>?token=…</code>) from CoCalc. Open the project from CoCalc again to get a fresh link.</p>\
        </body></html>";
    let mut r = Response::new(full(page));
    *r.status_mut() = StatusCode::UNAUTHORIZED;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

/// What the proxy shares between connections.
#[derive(Debug)]
pub struct Proxy {
    host: Arc<Host>,
    auth: Arc<Auth>,
    key: cookie::Key,
    pool: Arc<forward::Pool>,
    tls: Option<Arc<super::tls::Tls>>,
    stop: CancellationToken,
}

/// Who the request is from, once a credential checked out.
#[derive(Debug)]
enum Caller {
    /// a bearer token (header or `?token=`)
    Token(Principal),
    /// the session cookie
    Cookie(cookie::Grant),
}

impl Caller {
    fn allows(&self, action: Action, id: ProjectId) -> bool {
        match self {
            Caller::Token(p) => p.allows(action, Some(&id)),
            Caller::Cookie(g) => {
                g.id == id
                    && match action {
                        Action::Proxy => g.proxy,
                        Action::Files => g.files,
                        _ => false,
                    }
            }
        }
    }
}

impl Proxy {
    /// The proxy over `host`, with its cookie key from the state directory (made on first use),
    /// serving TLS with `tls` when given.
    pub fn new(
        host: Arc<Host>,
        auth: Arc<Auth>,
        tls: Option<Arc<super::tls::Tls>>,
    ) -> std::io::Result<Arc<Proxy>> {
        let key = cookie::Key::load_or_create(&host.settings().state_dir)?;
        Ok(Arc::new(Proxy {
            host,
            auth,
            key,
            pool: Arc::new(forward::Pool::default()),
            tls,
            stop: CancellationToken::new(),
        }))
    }

    /// The connection pool (tests).
    pub fn pool(&self) -> &Arc<forward::Pool> {
        &self.pool
    }

    fn forbidden(action: Action, id: ProjectId) -> WireError {
        WireError::new(
            ErrorKind::Forbidden,
            format!("token does not allow {} on project {id}", action.as_str()),
        )
    }

    /// Checks the credential: `?token=`, then `Authorization`, then the cookie. Returns the caller
    /// and, for a `?token=`, the `Set-Cookie` value to hand out.
    fn authenticate(
        &self,
        req: &Request<Incoming>,
        r: &route::ProxyRoute,
        query_token: Option<&str>,
    ) -> Result<(Caller, Option<String>), WireError> {
        let now = crate::auth::now_secs();
        let action = r.action();
        if let Some(t) = query_token {
            let v = self.auth.verify_token(t, now).map_err(WireError::from)?;
            if !v.principal.allows(action, Some(&r.id)) {
                return Err(Self::forbidden(action, r.id));
            }
            let exp = v.exp.unwrap_or(now + ADMIN_COOKIE_SECS);
            let grant = cookie::Grant {
                id: r.id,
                exp,
                proxy: v.principal.allows(Action::Proxy, Some(&r.id)),
                files: v.principal.allows(Action::Files, Some(&r.id)),
                jti: v.jti,
            };
            let set = cookie::set_cookie(
                &self.key.sign(&grant),
                r.id,
                exp.saturating_sub(now),
                self.tls.is_some(),
            );
            return Ok((Caller::Token(v.principal), Some(set)));
        }
        if let Some(h) = req.headers().get(header::AUTHORIZATION) {
            let p = self
                .auth
                .authenticate(Some(h.as_bytes()))
                .map_err(WireError::from)?;
            return Ok((Caller::Token(p), None));
        }
        let value = req
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(cookie::find);
        let Some(value) = value else {
            return Err(WireError::new(
                ErrorKind::Unauthorized,
                "no credential: open the link with ?token=<token>, or send Authorization: Bearer <token>",
            ));
        };
        let g = self
            .key
            .verify(value, now)
            .map_err(|e| WireError::new(ErrorKind::InvalidToken, e.to_string()))?;
        if let Some(j) = &g.jti
            && self.auth.revocations().is_revoked(j, now)
        {
            return Err(WireError::new(
                ErrorKind::TokenRevoked,
                "the token of this session was revoked",
            ));
        }
        Ok((Caller::Cookie(g), None))
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, Infallible> {
        let browser = is_browser(&req);
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        match self.dispatch(req, peer).await {
            Ok(r) => Ok(r),
            Err(e) => {
                // a stopped project or an app not listening are the users' everyday cases
                if e.kind.status() >= 500
                    && !matches!(
                        e.kind,
                        ErrorKind::ProjectNotRunning | ErrorKind::BackendUnavailable
                    )
                {
                    tracing::info!(%method, %path, code = e.kind.code(), error = %e.message, "proxy request failed");
                }
                Ok(match e.kind {
                    ErrorKind::Unauthorized | ErrorKind::InvalidToken | ErrorKind::TokenRevoked => {
                        unauthorized(&e, browser)
                    }
                    _ => error_response(&e),
                })
            }
        }
    }

    async fn dispatch(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, WireError> {
        let r = route::parse(req.uri().path())?;
        let (query, token) = route::split_token(req.uri().query());
        let (caller, set_cookie) = self.authenticate(&req, &r, token.as_deref())?;
        let action = r.action();
        if !caller.allows(action, r.id) {
            return Err(Self::forbidden(action, r.id));
        }
        // the URL without the token: where the exchange redirects to, and what goes on
        let clean = match &query {
            Some(q) => format!("{}?{q}", req.uri().path()),
            None => req.uri().path().to_owned(),
        };
        if let Some(c) = &set_cookie
            && matches!(*req.method(), Method::GET | Method::HEAD)
        {
            let mut resp = Response::new(full(""));
            *resp.status_mut() = StatusCode::SEE_OTHER;
            let h = resp.headers_mut();
            if let (Ok(loc), Ok(c)) = (HeaderValue::from_str(&clean), HeaderValue::from_str(c)) {
                h.insert(header::LOCATION, loc);
                h.insert(header::SET_COOKIE, c);
            }
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return Ok(resp);
        }
        if token.is_some() {
            *req.uri_mut() = clean.parse().map_err(|_| {
                WireError::new(
                    ErrorKind::InvalidPath,
                    "the URL without its token is not valid",
                )
            })?;
        }
        let mut resp = match r.target {
            route::Target::Files(rest) => {
                crate::adapters::files::handle(&self.host, r.id, &rest, req).await
            }
            route::Target::Port { port, path, .. } => {
                let pq = match &query {
                    Some(q) => format!("{path}?{q}"),
                    None => path,
                };
                self.forward(req, r.id, port, &r.prefix, &pq, peer).await?
            }
        };
        // a non-GET request with ?token= is served at once and gets its cookie with the answer
        if let Some(c) = set_cookie
            && let Ok(c) = HeaderValue::from_str(&c)
        {
            resp.headers_mut().append(header::SET_COOKIE, c);
        }
        Ok(resp)
    }

    /// Waits for the project to run: at once when it does, after a start with `proxy.autostart`
    /// (a project this host knows only), else `503 project_not_running`. After a start, the
    /// time until which its server may take to listen (the rest of `proxy.autostart_timeout`).
    async fn ensure_running(
        &self,
        id: ProjectId,
    ) -> Result<Option<tokio::time::Instant>, WireError> {
        if self.host.is_running(id) {
            return Ok(None);
        }
        let s = &self.host.settings().proxy;
        if !s.autostart || !self.host.is_known(id) {
            return Err(WireError::new(
                ErrorKind::ProjectNotRunning,
                format!("project {id} is not running"),
            ));
        }
        tracing::info!(project_id = %id, "proxy: starting the project for a request (proxy.autostart)");
        let deadline = tokio::time::Instant::now() + s.autostart_timeout;
        match tokio::time::timeout_at(deadline, self.host.start(id, None)).await {
            Ok(Ok(st)) if st.state == ProjectState::Running => Ok(Some(deadline)),
            Ok(Ok(st)) => Err(WireError::new(
                ErrorKind::ProjectNotRunning,
                format!("project {id} is {} after its start", st.state),
            )),
            Ok(Err(e)) => Err(WireError::from(e)),
            Err(_) => Err(WireError::new(
                ErrorKind::ProjectNotRunning,
                format!(
                    "project {id} did not start within {}s (proxy.autostart_timeout)",
                    s.autostart_timeout.as_secs()
                ),
            )),
        }
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        id: ProjectId,
        port: u16,
        prefix: &str,
        path_and_query: &str,
        peer: SocketAddr,
    ) -> Result<Response<Body>, WireError> {
        let listen_by = self.ensure_running(id).await?;
        let upgrade = headers::wants_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        headers::to_backend(
            &mut parts.headers,
            &headers::Forwarded {
                peer: peer.ip(),
                proto: if self.tls.is_some() { "https" } else { "http" },
                prefix,
                upgrade,
            },
        );
        parts.uri = path_and_query.parse().map_err(|_| {
            WireError::new(
                ErrorKind::InvalidPath,
                "the path is not a valid request target",
            )
        })?;
        parts.version = hyper::Version::HTTP_11;
        let out = Request::from_parts(parts, forward::stream_body(body));
        let timeout = self.host.settings().proxy.timeout;
        let resp = forward::send(
            &self.host, &self.pool, id, port, out, timeout, upgrade, listen_by,
        )
        .await?;
        let switched = forward::is_switch(resp.status());
        let resp = match (switched, client_upgrade) {
            (true, Some(c)) => forward::tunnel(c, resp, self.stop.clone(), id),
            (true, None) => return Err(forward::unexpected_switch(id, port)),
            (false, _) => resp,
        };
        let (mut parts, body) = resp.into_parts();
        headers::to_client(&mut parts.headers, switched);
        Ok(Response::from_parts(parts, forward::stream_body(body)))
    }

    /// Drops the pooled connections of projects that stop (their namespaces go with them), and
    /// those idle for [`forward::POOL_IDLE`].
    fn watch_projects(self: &Arc<Self>) {
        let mut events = self.host.subscribe();
        let weak = Arc::downgrade(self);
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(forward::POOL_IDLE / 3);
            loop {
                let ev = tokio::select! {
                    ev = events.recv() => ev,
                    _ = sweep.tick() => {
                        let Some(px) = weak.upgrade() else { return };
                        px.pool.expire(forward::POOL_IDLE);
                        continue;
                    }
                    () = stop.cancelled() => return,
                };
                let Some(px) = weak.upgrade() else { return };
                match ev {
                    Ok(HostEvent::State(id, s)) if s != ProjectState::Running => {
                        px.pool.drop_project(id);
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // some events were missed: keep only pools of running projects
                        let ids: Vec<ProjectId> = px
                            .host
                            .list()
                            .iter()
                            .map(|(id, _)| *id)
                            .filter(|id| !px.host.is_running(*id))
                            .collect();
                        for id in ids {
                            px.pool.drop_project(id);
                        }
                    }
                    Err(_) => return,
                }
            }
        });
    }
}

/// Serves the proxy on `listener` until `shutdown` resolves, then lets in-flight requests finish
/// (up to 30 s; WebSocket tunnels are closed) before returning.
pub async fn run(
    listener: TcpListener,
    host: Arc<Host>,
    auth: Arc<Auth>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let px = Proxy::new(host, auth, None)?;
    serve(listener, px, shutdown).await;
    Ok(())
}

/// Serves one connection (plain or TLS) until it ends, or gracefully once `closing` fires.
async fn serve_conn<I>(io: I, px: Arc<Proxy>, peer: SocketAddr, closing: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| px.clone().handle(req, peer));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_headers(MAX_HEADERS)
        .serve_connection(io, svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = closing.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Serves an already built proxy (see [`run`]).
pub async fn serve(listener: TcpListener, px: Arc<Proxy>, shutdown: impl Future<Output = ()>) {
    px.watch_projects();
    if let Some(t) = &px.tls {
        t.reload_on_sighup("proxy", px.stop.clone());
    }
    let conns = TaskTracker::new();
    let closing = CancellationToken::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let peers =
        super::connlimit::PeerLimiter::new(px.host.settings().proxy.max_connections_per_peer);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(slot) = peers.admit(peer.ip()) else {
            tracing::debug!(peer = %peer.ip(), "proxy: connection refused: too many from this address");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let px = px.clone();
        let closing = closing.clone();
        conns.spawn(async move {
            match px.tls.as_ref().map(|t| t.acceptor()) {
                None => serve_conn(TokioIo::new(stream), px, peer, closing).await,
                // the handshake is bounded like a request head (slowloris)
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => serve_conn(TokioIo::new(s), px, peer, closing).await,
                        Ok(Err(e)) => tracing::debug!(peer = %peer.ip(), error = %e, "proxy: TLS handshake failed"),
                        Err(_) => tracing::debug!(peer = %peer.ip(), "proxy: TLS handshake timed out"),
                    }
                }
            }
            drop(slot);
            drop(permit);
        });
    }
    drop(listener);
    conns.close();
    if permits.available_permits() < MAX_CONNECTIONS {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    closing.cancel();
    px.stop.cancel();
    if tokio::time::timeout(Duration::from_secs(30), conns.wait())
        .await
        .is_err()
    {
        tracing::warn!("proxy: some connections did not finish within 30s of shutdown");
    }
}
