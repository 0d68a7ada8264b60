//! The HTTP API (hyper 1): a thin adapter over [`Host`]. `serve(listener, host, auth, tls, shutdown)`
//! takes its listener and shutdown signal from the caller, so socket activation and tests come free;
//! with `http.tls_cert`, connections to non-loopback addresses speak TLS (`wants_tls`).
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::net::TcpListener;

use crate::api::{self, ErrorKind, StatusAnswer, WireError};
use crate::auth::revocation;
use crate::auth::{Action, Auth, Principal};
use crate::core::{self, Host};
use crate::domain::limits::LimitsPatch;
use crate::domain::project::ProjectId;
use crate::domain::snapshots::SnapshotName;

use super::sse;

/// Largest request body accepted (a start config is a few hundred bytes).
pub const MAX_BODY: usize = 64 * 1024;
/// Most connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 4096;
/// Largest `PUT /projects/:id/authorized-keys` body: 1000 keys of up to ~1 KiB each.
pub const MAX_KEYS_BODY: usize = 1024 * 1024;
/// A client gets this long to send its request head (and, idle, its next one): slowloris.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A client gets this long to send its body once the head is in.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Most request header fields.
const MAX_HEADERS: usize = 64;

/// An API error as HTTP sends it: status and `code` from the error table, and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status
    pub status: StatusCode,
    /// machine-readable code
    pub code: &'static str,
    /// one-line message
    pub message: String,
}

impl ApiError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError::from(WireError::new(kind, message))
    }
}

impl From<WireError> for ApiError {
    fn from(e: WireError) -> ApiError {
        ApiError {
            status: StatusCode::from_u16(e.kind.status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code: e.kind.code(),
            message: e.message,
        }
    }
}

impl From<core::Error> for ApiError {
    fn from(e: core::Error) -> ApiError {
        ApiError::from(WireError::from(e))
    }
}

/// What a request asks for, decided from method and path alone (no I/O, unit tested).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /healthz`
    Health,
    /// `GET /projects`
    List,
    /// `GET /projects/:id/status`
    Status(ProjectId),
    /// `POST /projects/:id/start`
    Start(ProjectId),
    /// `POST /projects/:id/stop`
    Stop(ProjectId),
    /// `GET /projects/:id/config`
    Config(ProjectId),
    /// `PATCH /projects/:id/config`
    SetConfig(ProjectId),
    /// `GET /projects/:id/snapshots`
    Snapshots(ProjectId),
    /// `POST /projects/:id/snapshots`
    CreateSnapshot(ProjectId),
    /// `DELETE /projects/:id/snapshots/:name`
    DeleteSnapshot(ProjectId, SnapshotName),
    /// `POST /projects/:id/snapshots/:name/restore`
    RestoreSnapshot(ProjectId, SnapshotName),
    /// `POST /projects/:id/quota`
    SetQuota(ProjectId),
    /// `POST /snapshots/sweep` (admin: the snapshot timer's oneshot calls it)
    SweepSnapshots,
    /// `POST /auth/revoked` (admin, or a master token with the `revoke` action)
    Revoke,
    /// `GET /projects/:id/authorized-keys`
    AuthorizedKeys(ProjectId),
    /// `PUT /projects/:id/authorized-keys`
    SetAuthorizedKeys(ProjectId),
    /// `GET /host` (admin, or a master token with the `host` action)
    Host,
    /// `DELETE /projects/:id` (admin, or a master token with the `delete` action)
    Remove(ProjectId),
    /// `GET /projects/:id/logs` (JSON lines, or SSE with `follow=1`)
    Logs(ProjectId),
    /// `GET /events` (SSE)
    Events,
    /// `GET /metrics` (Prometheus/OpenMetrics text)
    Metrics,
    /// `POST /projects/:id/move` (the source: admin, or a master token with `move`)
    Move(ProjectId),
    /// `POST /projects/:id/receive/:move` (the target: a master token with `move`, `aud` = us)
    Receive(ProjectId, crate::domain::moves::MoveId),
    /// `GET /projects/:id/receive/:move`: what the target holds of the move (same token)
    ReceiveState(ProjectId, crate::domain::moves::MoveId),
    /// `DELETE /projects/:id/receive/:move`: cancels the move on the target (same token)
    ReceiveAbort(ProjectId, crate::domain::moves::MoveId),
    /// `GET /operations/:op` (admin)
    Operation(String),
    /// `DELETE /operations/:op` (admin)
    CancelOperation(String),
}

fn parse_id(id: &str) -> Result<ProjectId, ApiError> {
    Ok(api::parse_id(id)?)
}

fn parse_snapshot_name(name: &str) -> Result<SnapshotName, ApiError> {
    Ok(api::parse_snapshot_name(name)?)
}

/// Routes of the storage endpoints (snapshots, quota, sweep); `None` when the path is not one.
fn storage_route(method: &Method, segs: &[&str]) -> Option<Result<(Method, Route), ApiError>> {
    let r = match segs {
        ["snapshots", "sweep"] => Ok((Method::POST, Route::SweepSnapshots)),
        ["projects", id, "snapshots"] => parse_id(id).and_then(|id| match *method {
            Method::POST => Ok((Method::POST, Route::CreateSnapshot(id))),
            Method::GET => Ok((Method::GET, Route::Snapshots(id))),
            _ => Err(ApiError::new(
                ErrorKind::MethodNotAllowed,
                format!("/projects/{id}/snapshots accepts GET or POST only"),
            )),
        }),
        ["projects", id, "snapshots", name] => parse_id(id).and_then(|id| {
            let name = parse_snapshot_name(name)?;
            Ok((Method::DELETE, Route::DeleteSnapshot(id, name)))
        }),
        ["projects", id, "snapshots", name, "restore"] => parse_id(id).and_then(|id| {
            let name = parse_snapshot_name(name)?;
            Ok((Method::POST, Route::RestoreSnapshot(id, name)))
        }),
        ["projects", id, "quota"] => parse_id(id).map(|id| (Method::POST, Route::SetQuota(id))),
        ["projects", id, "authorized-keys"] => parse_id(id).and_then(|id| match *method {
            Method::PUT => Ok((Method::PUT, Route::SetAuthorizedKeys(id))),
            Method::GET => Ok((Method::GET, Route::AuthorizedKeys(id))),
            _ => Err(ApiError::new(
                ErrorKind::MethodNotAllowed,
                format!("/projects/{id}/authorized-keys accepts GET or PUT only"),
            )),
        }),
        _ => return None,
    };
    Some(r)
}

impl Route {
    /// What the route needs a token to allow: `None` for the open `/healthz`.
    pub fn permission(&self) -> Option<(Action, Option<ProjectId>)> {
        match self {
            Route::Health => None,
            Route::List => Some((Action::List, None)),
            Route::Status(id) => Some((Action::Status, Some(*id))),
            Route::Start(id) => Some((Action::Start, Some(*id))),
            Route::Stop(id) => Some((Action::Stop, Some(*id))),
            Route::Config(id) | Route::SetConfig(id) | Route::SetQuota(id) => {
                Some((Action::Config, Some(*id)))
            }
            Route::Snapshots(id)
            | Route::CreateSnapshot(id)
            | Route::DeleteSnapshot(id, _)
            | Route::RestoreSnapshot(id, _) => Some((Action::Snapshot, Some(*id))),
            Route::SweepSnapshots => Some((Action::Admin, None)),
            Route::Revoke => Some((Action::Revoke, None)),
            Route::AuthorizedKeys(id) | Route::SetAuthorizedKeys(id) => {
                Some((Action::SshKeys, Some(*id)))
            }
            Route::Host => Some((Action::Host, None)),
            Route::Remove(id) => Some((Action::Delete, Some(*id))),
            Route::Logs(id) => Some((Action::Logs, Some(*id))),
            // each event is filtered by the projects the token sees (as the list is)
            Route::Events => Some((Action::List, None)),
            Route::Metrics => Some((Action::Metrics, None)),
            Route::Move(id)
            | Route::Receive(id, _)
            | Route::ReceiveState(id, _)
            | Route::ReceiveAbort(id, _) => Some((Action::Move, Some(*id))),
            Route::Operation(_) | Route::CancelOperation(_) => Some((Action::Admin, None)),
        }
    }
}

/// The one endpoint that needs no token.
pub const OPEN_PATH: &str = "/healthz";

/// Maps method + path to a route. Paths are not percent-decoded: `%2e%2e` is just an invalid id.
pub fn route(method: &Method, path: &str) -> Result<Route, ApiError> {
    let segs: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let (want, r) = match segs.as_slice() {
        ["healthz"] => (Method::GET, Route::Health),
        ["projects"] => (Method::GET, Route::List),
        ["auth", "revoked"] => (Method::POST, Route::Revoke),
        ["host"] => (Method::GET, Route::Host),
        // only DELETE: any other method on it stays "no such endpoint", as before it existed
        ["projects", id] if *method == Method::DELETE && !id.is_empty() => {
            (Method::DELETE, Route::Remove(parse_id(id)?))
        }
        ["events"] => (Method::GET, Route::Events),
        ["metrics"] => (Method::GET, Route::Metrics),
        ["projects", id, "logs"] => (Method::GET, Route::Logs(parse_id(id)?)),
        ["projects", id, "move"] => (Method::POST, Route::Move(parse_id(id)?)),
        ["projects", id, "receive", mv] => {
            let id = parse_id(id)?;
            let mv = mv
                .parse()
                .map_err(|e: crate::domain::moves::InvalidMoveId| {
                    ApiError::new(ErrorKind::NotFound, e.to_string())
                })?;
            return match *method {
                Method::POST => Ok(Route::Receive(id, mv)),
                Method::GET => Ok(Route::ReceiveState(id, mv)),
                Method::DELETE => Ok(Route::ReceiveAbort(id, mv)),
                _ => Err(ApiError::new(
                    ErrorKind::MethodNotAllowed,
                    format!("{path} accepts POST, GET and DELETE only"),
                )),
            };
        }
        ["operations", op] if !op.is_empty() => {
            let op = (*op).to_string();
            return match *method {
                Method::GET => Ok(Route::Operation(op)),
                Method::DELETE => Ok(Route::CancelOperation(op)),
                _ => Err(ApiError::new(
                    ErrorKind::MethodNotAllowed,
                    format!("{path} accepts GET and DELETE only"),
                )),
            };
        }
        ["projects", id, "config"] => {
            let id = parse_id(id)?;
            return match *method {
                Method::GET => Ok(Route::Config(id)),
                Method::PATCH => Ok(Route::SetConfig(id)),
                _ => Err(ApiError::new(
                    ErrorKind::MethodNotAllowed,
                    format!("{path} accepts GET and PATCH only"),
                )),
            };
        }
        ["projects", id, action @ ("status" | "start" | "stop")] => {
            let id = parse_id(id)?;
            match *action {
                "status" => (Method::GET, Route::Status(id)),
                "start" => (Method::POST, Route::Start(id)),
                _ => (Method::POST, Route::Stop(id)),
            }
        }
        other => match storage_route(method, other) {
            Some(r) => r?,
            None => {
                return Err(ApiError::new(
                    ErrorKind::NotFound,
                    format!("no such endpoint: {path}"),
                ));
            }
        },
    };
    if *method != want {
        return Err(ApiError::new(
            ErrorKind::MethodNotAllowed,
            format!("{path} accepts {want} only"),
        ));
    }
    Ok(r)
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    let mut r = json_response(e.status, &json!({"error": e.message, "code": e.code}));
    if e.status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer realm=\"cocalc-project-host\""),
        );
    }
    r
}

/// Reads a JSON body (empty = default), enforcing [`MAX_BODY`] and [`BODY_TIMEOUT`], and parses
/// it with the parser the D-Bus adapter uses too.
async fn read_json<T: DeserializeOwned + Default>(req: Request<Incoming>) -> Result<T, ApiError> {
    read_json_max(req, MAX_BODY).await
}

async fn read_json_max<T: DeserializeOwned + Default>(
    req: Request<Incoming>,
    max_body: usize,
) -> Result<T, ApiError> {
    let too_big = || {
        ApiError::new(
            ErrorKind::BodyTooLarge,
            format!("body exceeds {max_body} bytes"),
        )
    };
    if let Some(len) = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && len > max_body as u64
    {
        return Err(too_big());
    }
    let body = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), max_body).collect(),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            ErrorKind::BodyTimeout,
            format!("body not received within {}s", BODY_TIMEOUT.as_secs()),
        )
    })?
    .map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            too_big()
        } else {
            ApiError::new(ErrorKind::BadBody, format!("cannot read body: {e}"))
        }
    })?;
    Ok(api::parse_body(&body.to_bytes())?)
}

/// Authenticates (every path but [`OPEN_PATH`], before routing: without a token nothing about
/// the API is revealed), routes, then authorizes the route for the caller.
fn admit(auth: &Auth, req: &Request<Incoming>) -> Result<(Route, Option<Principal>), ApiError> {
    let path = req.uri().path();
    let principal = if path == OPEN_PATH {
        None
    } else {
        let h = req.headers().get(hyper::header::AUTHORIZATION);
        Some(
            auth.authenticate(h.map(|v| v.as_bytes()))
                .map_err(WireError::from)?,
        )
    };
    let r = route(req.method(), path)?;
    if let (Some(p), Some((action, project))) = (&principal, r.permission())
        && !p.allows(action, project.as_ref())
    {
        tracing::info!(
            principal = p.name(),
            action = action.as_str(),
            project_id = project.map(|i| i.to_string()),
            "request forbidden"
        );
        return Err(ApiError::new(
            ErrorKind::Forbidden,
            match project {
                Some(id) => format!("token does not allow {} on project {id}", action.as_str()),
                None => format!("token does not allow {}", action.as_str()),
            },
        ));
    }
    Ok((r, principal))
}

/// Refuses (403) a part of a request that needs `action` on `id` beyond what the route needed.
fn require(
    principal: Option<&Principal>,
    action: Action,
    id: ProjectId,
    what: &str,
) -> Result<(), ApiError> {
    match principal {
        Some(p) if !p.allows(action, Some(&id)) => {
            tracing::info!(principal = p.name(), action = action.as_str(), project_id = %id, "request forbidden: {what}");
            Err(ApiError::new(
                ErrorKind::Forbidden,
                format!(
                    "{what} needs the {} action: token does not allow it on project {id}",
                    action.as_str()
                ),
            ))
        }
        _ => Ok(()),
    }
}

async fn dispatch(
    host: &Arc<Host>,
    auth: &Auth,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let (r, principal) = admit(auth, &req)?;
    match r {
        Route::Health => Ok(json_response(StatusCode::OK, &json!({"ok": true}))),
        Route::List => {
            // written out directly: ids are hex and dashes, times are numbers (no escaping)
            let only = api::master::parse_list_query(req.uri().query())?;
            let list = host.list();
            let mut body = String::with_capacity(16 + list.len() * 72);
            body.push_str("{\"projects\":[");
            for (id, last) in list
                .iter()
                .filter(|(id, _)| principal.as_ref().is_none_or(|p| p.sees(id)))
                .filter(|(id, _)| only.is_none_or(|s| host.project_state(*id) == s))
            {
                if !body.ends_with('[') {
                    body.push(',');
                }
                let _ = write!(body, "{{\"project_id\":\"{id}\",\"last\":{last}}}");
            }
            body.push_str("]}");
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            Ok(r)
        }
        Route::Status(id) => answer(StatusCode::OK, &StatusAnswer::from(&host.status(id))),
        Route::Host => answer(StatusCode::OK, &host.host_view()),
        Route::Remove(id) => {
            let r = host.remove(id).await?;
            tracing::info!(
                principal = principal.as_ref().map(Principal::name),
                project_id = %id,
                removed = r.removed,
                "project delete"
            );
            answer(StatusCode::OK, &r)
        }
        Route::Move(id) => {
            let body: super::moves::MoveBody = read_json(req).await?;
            let (r, link) = body
                .into_request(&host.settings().moves)
                .map_err(|e| ApiError::new(ErrorKind::InvalidBody, e))?;
            let stall = host.settings().moves.stall_timeout;
            let view = host
                .start_move(id, r, super::moves::sender(link, stall))
                .await?;
            tracing::info!(principal = principal.as_ref().map(Principal::name), project_id = %id, op = %view.op, target = %view.target, "move started");
            answer(StatusCode::ACCEPTED, &view)
        }
        Route::Receive(id, mv) => {
            let token = super::moves::bearer(req.headers().get(hyper::header::AUTHORIZATION))
                .unwrap_or_default();
            let body = super::moves::pump(req.into_body());
            let r = host.receive_move(id, mv, &token, body).await?;
            answer(StatusCode::OK, &r)
        }
        Route::Operation(op) => answer(StatusCode::OK, &host.operation(&op)?),
        Route::CancelOperation(op) => answer(StatusCode::OK, &host.cancel_operation(&op).await?),
        Route::ReceiveState(id, mv) => answer(StatusCode::OK, &host.move_state(id, mv).await?),
        Route::ReceiveAbort(id, mv) => answer(StatusCode::OK, &host.abort_receive(id, mv).await?),
        Route::Start(id) => {
            let body: api::StartRequest = read_json(req).await?;
            // a start-only token starts with the stored config; sending one replaces it (and
            // whatever limits an admin stored), which is the `config` action's to do
            if body.config.is_some() {
                require(
                    principal.as_ref(),
                    Action::Config,
                    id,
                    "sending a start config",
                )?;
            }
            let st = host.start(id, body.config).await?;
            answer(StatusCode::OK, &StatusAnswer::from(&st))
        }
        Route::Stop(id) => {
            let body: api::StopRequest = read_json(req).await?;
            let st = host.stop(id, body.force).await?;
            answer(StatusCode::OK, &StatusAnswer::from(&st))
        }
        Route::Config(id) => answer(
            StatusCode::OK,
            &api::ConfigAnswer::from(&host.config(id).await?),
        ),
        Route::SetConfig(id) => {
            let patch: LimitsPatch = read_json(req).await?;
            let r = host.set_limits(id, patch).await?;
            answer(StatusCode::OK, &api::LimitsAnswer::from(&r))
        }
        Route::Snapshots(id) => {
            let list = host.snapshots(id).await?;
            let snapshots = list.iter().map(api::SnapshotAnswer::from).collect();
            answer(StatusCode::OK, &api::SnapshotList { snapshots })
        }
        Route::CreateSnapshot(id) => {
            let body: api::CreateSnapshotRequest = read_json(req).await?;
            let name = body.name.as_deref().map(parse_snapshot_name).transpose()?;
            let info = host.create_snapshot(id, name).await?;
            answer(StatusCode::CREATED, &api::SnapshotAnswer::from(&info))
        }
        Route::DeleteSnapshot(id, name) => {
            host.delete_snapshot(id, &name).await?;
            answer(
                StatusCode::OK,
                &api::SnapshotDone::Deleted(name.to_string()),
            )
        }
        Route::RestoreSnapshot(id, name) => {
            host.restore_snapshot(id, &name).await?;
            answer(
                StatusCode::OK,
                &api::SnapshotDone::Restored(name.to_string()),
            )
        }
        Route::SetQuota(id) => {
            let body: Option<api::QuotaRequest> = read_json(req).await?;
            let body = body.ok_or_else(|| {
                ApiError::new(
                    ErrorKind::InvalidBody,
                    "body required: {\"disk\": <bytes> | null}",
                )
            })?;
            if body.disk.is_none() && principal.as_ref().is_some_and(|p| *p != Principal::Admin) {
                return Err(ApiError::new(
                    ErrorKind::Forbidden,
                    "only an admin token may lift a disk quota (disk: null)",
                ));
            }
            host.set_disk_quota(id, body.disk).await?;
            answer(StatusCode::OK, &StatusAnswer::from(&host.status(id)))
        }
        Route::AuthorizedKeys(id) => answer(
            StatusCode::OK,
            &api::AuthorizedKeys {
                keys: host.authorized_keys(id).await?,
            },
        ),
        Route::SetAuthorizedKeys(id) => {
            let body: Option<api::AuthorizedKeys> = read_json_max(req, MAX_KEYS_BODY).await?;
            let body = body.ok_or_else(|| {
                ApiError::new(
                    ErrorKind::InvalidBody,
                    "body required: {\"keys\": [\"ssh-ed25519 AAAA… comment\", …]}",
                )
            })?;
            let keys = host.set_authorized_keys(id, &body.keys).await?;
            answer(StatusCode::OK, &api::AuthorizedKeys { keys })
        }
        Route::Revoke => {
            let body: api::RevokeRequest = read_json(req).await?;
            let ids = revocation::parse_list(&body.jti)
                .map_err(|e| ApiError::new(ErrorKind::InvalidBody, format!("jti: {e}")))?;
            let now = crate::auth::now_secs();
            let until = now.saturating_add(auth.max_lifetime_secs());
            let count = ids.len();
            let kept = auth
                .revocations()
                .revoke(ids, now, until)
                .await
                .map_err(|e| match e {
                    revocation::RevokeError::Full => {
                        ApiError::new(ErrorKind::RevocationListFull, e.to_string())
                    }
                    revocation::RevokeError::Store(e) => {
                        ApiError::new(ErrorKind::StoreFailed, e.to_string())
                    }
                })?;
            tracing::info!(
                principal = principal.as_ref().map(Principal::name),
                revoked = count,
                kept,
                "master tokens revoked"
            );
            answer(
                StatusCode::OK,
                &api::RevokeAnswer {
                    revoked: count,
                    until,
                    kept,
                },
            )
        }
        Route::SweepSnapshots => {
            let body: api::SweepRequest = read_json(req).await?;
            let only = body
                .projects
                .map(|v| v.iter().map(|s| parse_id(s)).collect::<Result<Vec<_>, _>>())
                .transpose()?;
            let now = body.now.unwrap_or_else(core::now_ms);
            if now > i64::MAX as u64 {
                return Err(ApiError::new(
                    ErrorKind::InvalidBody,
                    format!("now: {now} is above the maximum of {}", i64::MAX),
                ));
            }
            let outcomes = host.sweep_snapshots(Some(now), only).await?;
            let projects = outcomes.iter().map(api::SweepProject::from).collect();
            answer(StatusCode::OK, &api::SweepAnswer { now, projects })
        }
        // answered by `observe` before dispatch
        Route::Logs(_) | Route::Events | Route::Metrics => Err(ApiError::new(
            ErrorKind::Internal,
            "observation routes are not dispatched",
        )),
    }
}

/// Serves the observation routes (logs, events, metrics: their bodies may stream); `None` for
/// every other request (it goes to `dispatch`).
async fn observe(
    host: &Arc<Host>,
    auth: &Auth,
    closing: &tokio_util::sync::CancellationToken,
    req: &Request<Incoming>,
) -> Option<Result<Response<sse::Body>, ApiError>> {
    // a string test first: every other request goes on to `dispatch` without a second parse
    let path = req.uri().path();
    if !(path == "/events" || path == "/metrics" || path.ends_with("/logs"))
        || !matches!(
            route(req.method(), path),
            Ok(Route::Logs(_) | Route::Events | Route::Metrics)
        )
    {
        return None;
    }
    let r = async {
        let (r, principal) = admit(auth, req)?;
        let p = sse::params(req.uri().query())?;
        let last_id = req
            .headers()
            .get("last-event-id")
            .map(|v| {
                v.to_str()
                    .map(str::to_owned)
                    .map_err(|_| ApiError::new(ErrorKind::InvalidQuery, "Last-Event-ID: not text"))
            })
            .transpose()?;
        let only = |what: &str| {
            ApiError::new(
                ErrorKind::InvalidQuery,
                format!("{} takes {what} only", req.uri().path()),
            )
        };
        match r {
            Route::Metrics => {
                if p != sse::Params::default() {
                    return Err(only("no parameters"));
                }
                let mut resp = Response::new(BodyExt::boxed(Full::new(Bytes::from(
                    host.render_metrics(),
                ))));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(core::metrics::CONTENT_TYPE),
                );
                Ok(resp)
            }
            Route::Events => {
                if p.lines.is_some() || p.since.is_some() {
                    return Err(only("follow"));
                }
                let seen = last_id
                    .map(|s| {
                        s.trim().parse::<u64>().map_err(|_| {
                            ApiError::new(ErrorKind::InvalidQuery, "Last-Event-ID: an event id")
                        })
                    })
                    .transpose()?;
                let sees = move |id: &ProjectId| principal.as_ref().is_none_or(|p| p.sees(id));
                Ok(sse::events(
                    host,
                    seen,
                    p.follow.unwrap_or(true),
                    sees,
                    closing.clone(),
                ))
            }
            Route::Logs(id) => {
                // Last-Event-ID (an SSE client reconnecting) wins over `since`
                let since = match last_id.as_deref().or(p.since.as_deref()) {
                    Some(s) => Some(sse::log_since(s)?),
                    None => None,
                };
                let q = crate::ports::LogQuery {
                    lines: p
                        .lines
                        .unwrap_or(crate::backends::journal_read::DEFAULT_LINES),
                    since,
                };
                if p.follow == Some(true) {
                    return Ok(sse::follow_logs(host, id, q, closing.clone()).await?);
                }
                let lines = host.logs(id, &q).await?;
                let mut body = String::with_capacity(lines.len() * 160);
                for l in &lines {
                    let line = serde_json::to_string(&api::LogAnswer::from(l)).map_err(|e| {
                        ApiError::new(ErrorKind::Internal, format!("cannot encode: {e}"))
                    })?;
                    body.push_str(&line);
                    body.push('\n');
                }
                let mut resp = Response::new(BodyExt::boxed(Full::new(Bytes::from(body))));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/x-ndjson"),
                );
                Ok(resp)
            }
            _ => Err(ApiError::new(
                ErrorKind::Internal,
                "not an observation route",
            )),
        }
    }
    .await;
    Some(r)
}

/// The route template of a path for metrics (`/projects/:id/status`): ids and snapshot names
/// replaced, so labels stay few; paths that route nowhere are all `unmatched`.
fn route_template(method: &Method, path: &str) -> &'static str {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static TEMPLATES: OnceLock<Mutex<HashMap<String, &'static str>>> = OnceLock::new();
    if route(method, path).is_err() {
        return "unmatched";
    }
    let mut t = String::with_capacity(path.len());
    let segs: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    for (i, s) in segs.iter().enumerate() {
        t.push('/');
        let name = i >= 1 && segs[i - 1] == "snapshots" && segs[0] == "projects";
        if (i == 1 && segs[0] == "projects") || name {
            t.push_str(if name { ":name" } else { ":id" });
        } else {
            t.push_str(s);
        }
    }
    // the templates are the router's few shapes: interned once each
    let mut map = TEMPLATES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(s) = map.get(&t) {
        return s;
    }
    let s: &'static str = Box::leak(t.clone().into_boxed_str());
    map.insert(t, s);
    s
}

/// A JSON answer; a value that cannot be encoded is a 500 `internal`, never a `200 null`.
fn answer<T: Serialize>(status: StatusCode, v: &T) -> Result<Response<Full<Bytes>>, ApiError> {
    let v = serde_json::to_value(v).map_err(|e| {
        ApiError::new(
            ErrorKind::Internal,
            format!("cannot encode the answer: {e}"),
        )
    })?;
    Ok(json_response(status, &v))
}

async fn handle(
    host: Arc<Host>,
    auth: Arc<Auth>,
    closing: tokio_util::sync::CancellationToken,
    req: Request<Incoming>,
) -> Result<Response<sse::Body>, Infallible> {
    let t0 = std::time::Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let observed = observe(&host, &auth, &closing, &req).await;
    let result = match observed {
        Some(r) => r,
        None => dispatch(&host, &auth, req)
            .await
            .map(|r| r.map(BodyExt::boxed)),
    };
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(%method, %path, status = e.status.as_u16(), code = e.code, error = %e.message, "request failed");
            }
            let mut r = error_response(&e);
            // RFC 9110: a 405 names the method the resource does accept
            let allowed: Vec<&str> = [
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ]
            .iter()
            .filter(|m| route(m, &path).is_ok())
            .map(Method::as_str)
            .collect();
            if e.status == StatusCode::METHOD_NOT_ALLOWED
                && let Ok(v) = hyper::header::HeaderValue::from_str(&allowed.join(", "))
            {
                r.headers_mut().insert(hyper::header::ALLOW, v);
            }
            r.map(BodyExt::boxed)
        }
    };
    // a stream counts when its head is sent (its length is the client's)
    host.metrics().http(
        method.as_str(),
        route_template(&method, &path),
        resp.status().as_u16(),
        t0.elapsed(),
    );
    Ok(resp)
}

/// Whether a connection speaks TLS: with `http.tls_cert`/`tls_key` set, every connection that
/// reached a non-loopback address of this host (host-to-host traffic: moves); connections to
/// loopback stay plain (local tools). Decided by the connection's own local address, so one
/// `0.0.0.0:9002` socket serves both.
pub fn wants_tls(local: std::net::SocketAddr) -> bool {
    !local.ip().to_canonical().is_loopback()
}

/// The first byte of a TLS client's first record (content type handshake).
const TLS_HANDSHAKE: u8 = 0x16;

/// An accepted connection, plain or in TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Serves the API on `listener` until `shutdown` resolves, then lets in-flight requests finish
/// (up to 30 s) before returning. `auth` decides who may call what; with `tls`
/// (`http.tls_cert`), connections to non-loopback addresses speak TLS ([`wants_tls`]).
pub async fn serve(
    listener: TcpListener,
    host: Arc<Host>,
    auth: Arc<Auth>,
    tls: Option<Arc<super::tls::Tls>>,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let peers = super::connlimit::PeerLimiter::new(host.settings().http.max_connections_per_peer);
    // ends the event and log streams at shutdown (they would hold the graceful wait)
    let closing = tokio_util::sync::CancellationToken::new();
    if let Some(t) = &tls {
        t.reload_on_sighup("API", closing.clone());
    }
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
                    // e.g. EMFILE: back off instead of spinning
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // before reading a byte (before authentication): one address cannot take every slot
        let Some(slot) = peers.admit(peer.ip()) else {
            tracing::debug!(peer = %peer.ip(), "connection refused: too many from this address");
            drop(stream);
            continue;
        };
        let (host, auth, closing) = (host.clone(), auth.clone(), closing.clone());
        let svc = hyper::service::service_fn(move |req| {
            handle(host.clone(), auth.clone(), closing.clone(), req)
        });
        // an unknown local address (cannot happen on an accepted socket) is not trusted plain
        let acceptor = tls
            .as_ref()
            .filter(|_| stream.local_addr().map_or(true, wants_tls))
            .map(|t| t.acceptor());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let io: Box<dyn Io> = match acceptor {
                None => Box::new(stream),
                // a client that does not open with a TLS handshake record gets not a byte (not
                // even an alert), only the close; the handshake is bounded like a request head
                // (slowloris)
                Some(a) => match tokio::time::timeout(HEADER_TIMEOUT, async {
                    let mut first = [0u8; 1];
                    match stream.peek(&mut first).await {
                        Ok(1) if first[0] == TLS_HANDSHAKE => a.accept(stream).await,
                        _ => Err(std::io::Error::other("not a TLS handshake")),
                    }
                })
                .await
                {
                    Ok(Ok(s)) => Box::new(s),
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %peer.ip(), error = %e, "API: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(peer = %peer.ip(), "API: TLS handshake timed out");
                        return;
                    }
                },
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_headers(MAX_HEADERS)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(io), svc);
            let _ = watcher.watch(conn).await;
            drop(slot);
            drop(permit);
        });
    }
    drop(listener);
    closing.cancel();
    // A connection accepted just before shutdown may not have sent its request yet; hyper counts
    // it idle and would close it unanswered. Give such clients a moment to be read first (only
    // when there are connections: a restart of an idle daemon does not wait).
    if permits.available_permits() < MAX_CONNECTIONS {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish within 30s of shutdown");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "6f1c2d3e-0000-4000-8000-000000000001";
    const MV: &str = "0b7e2f4a-1111-4000-8000-00000000000a";

    #[test]
    fn only_connections_to_loopback_stay_plain_when_tls_is_on() {
        for (a, tls) in [
            ("127.0.0.1:9002", false),
            ("127.1.2.3:9002", false),
            ("[::1]:9002", false),
            ("[::ffff:127.0.0.1]:9002", false),
            ("10.213.0.2:9002", true),
            ("[::ffff:10.213.0.2]:9002", true),
            ("[fe80::1]:9002", true),
            ("0.0.0.0:9002", true),
        ] {
            assert_eq!(wants_tls(a.parse().unwrap()), tls, "{a}");
        }
    }

    #[test]
    fn routes() {
        let id: ProjectId = ID.parse().unwrap();
        assert_eq!(route(&Method::GET, "/healthz"), Ok(Route::Health));
        assert_eq!(route(&Method::GET, "/projects"), Ok(Route::List));
        assert_eq!(
            route(&Method::GET, &format!("/projects/{ID}/status")),
            Ok(Route::Status(id))
        );
        assert_eq!(
            route(&Method::POST, &format!("/projects/{ID}/start")),
            Ok(Route::Start(id))
        );
        assert_eq!(
            route(&Method::POST, &format!("/projects/{ID}/stop")),
            Ok(Route::Stop(id))
        );
        assert_eq!(
            route(&Method::GET, &format!("/projects/{ID}/config")),
            Ok(Route::Config(id))
        );
        assert_eq!(
            route(&Method::PATCH, &format!("/projects/{ID}/config")),
            Ok(Route::SetConfig(id))
        );
        let e = route(&Method::POST, &format!("/projects/{ID}/config")).unwrap_err();
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
        let e = route(&Method::PATCH, "/projects/x/config").unwrap_err();
        assert_eq!(e.code, "invalid_project_id");
    }

    #[test]
    fn bad_requests_get_clear_errors() {
        let code = |m: Method, p: &str| route(&m, p).map(|_| ()).unwrap_err();
        for p in [
            "/",
            "/nope",
            "/projects/",
            "/healthz/",
            &format!("/projects/{ID}/rm"),
            &format!("/projects/{ID}"),
        ] {
            let e = code(Method::GET, p);
            assert_eq!(
                (e.status, e.code),
                (StatusCode::NOT_FOUND, "not_found"),
                "{p}"
            );
        }
        for id in ["..", "%2e%2e", "x", "6F1C2D3E-0000-4000-8000-000000000001"] {
            let e = code(Method::GET, &format!("/projects/{id}/status"));
            assert_eq!(
                (e.status, e.code),
                (StatusCode::BAD_REQUEST, "invalid_project_id"),
                "{id}"
            );
        }
        let e = code(Method::GET, &format!("/projects/{ID}/start"));
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
        let e = code(Method::POST, "/healthz");
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
        // a project itself only takes DELETE (anything else: no such endpoint, as before)
        let e = code(Method::GET, &format!("/projects/{ID}"));
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        let e = code(Method::DELETE, "/projects/..");
        assert_eq!(e.code, "invalid_project_id");
        assert_eq!(
            route(&Method::DELETE, &format!("/projects/{ID}")),
            Ok(Route::Remove(ID.parse().unwrap()))
        );
        assert_eq!(route(&Method::GET, "/host"), Ok(Route::Host));
    }

    /// docs/openapi.yaml and the router describe the same endpoints.
    #[test]
    fn openapi_documents_every_route() {
        let spec = include_str!("../../docs/openapi.yaml");
        let mut documented = Vec::new();
        let mut path = None;
        for line in spec.lines() {
            if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
                path = Some(format!("/{p}"));
            } else if let (Some(p), Some(m)) = (
                &path,
                line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')),
            ) {
                if let Ok(m) = m.to_uppercase().parse::<Method>() {
                    documented.push((
                        m,
                        p.replace("{id}", ID)
                            .replace("{name}", "snap-1")
                            .replace("{move}", MV)
                            .replace("{op}", MV),
                    ));
                }
            } else if !line.starts_with("    ") {
                path = None;
            }
        }
        assert!(documented.len() >= 5, "{documented:?}");
        for (m, p) in &documented {
            assert!(route(m, p).is_ok(), "documented but not routed: {m} {p}");
        }
        let id: ProjectId = ID.parse().unwrap();
        for r in [
            Route::Health,
            Route::List,
            Route::Status(id),
            Route::Start(id),
            Route::Stop(id),
            Route::Config(id),
            Route::SetConfig(id),
            Route::Snapshots(id),
            Route::CreateSnapshot(id),
            Route::DeleteSnapshot(id, "snap-1".parse().unwrap()),
            Route::RestoreSnapshot(id, "snap-1".parse().unwrap()),
            Route::SetQuota(id),
            Route::SweepSnapshots,
            Route::Revoke,
            Route::Host,
            Route::Remove(id),
            Route::Logs(id),
            Route::Events,
            Route::Metrics,
            Route::Move(id),
            Route::Receive(id, MV.parse().unwrap()),
            Route::ReceiveState(id, MV.parse().unwrap()),
            Route::ReceiveAbort(id, MV.parse().unwrap()),
            Route::Operation(MV.into()),
            Route::CancelOperation(MV.into()),
        ] {
            assert!(
                documented
                    .iter()
                    .any(|(m, p)| route(m, p).as_ref() == Ok(&r)),
                "routed but not documented: {r:?}"
            );
        }
    }

    /// Every code of the error table is documented, with its status.
    #[test]
    fn openapi_documents_every_error_code() {
        let spec = include_str!("../../docs/openapi.yaml");
        let start = spec.find("An error. Codes:").unwrap();
        let text: String = spec[start..].lines().take(6).collect::<Vec<_>>().join(" ");
        for k in ErrorKind::ALL {
            // "code, code (status)": the code is listed in a group that ends with its status
            let at = text
                .find(&format!(" {}", k.code()))
                .unwrap_or_else(|| panic!("{} is not documented", k.code()));
            let status = text[at..].split('(').nth(1).unwrap_or_default();
            assert!(
                status.starts_with(&k.status().to_string()),
                "{} documented with another status: {status}",
                k.code()
            );
        }
    }

    #[test]
    fn storage_routes() {
        let id: ProjectId = ID.parse().unwrap();
        let n: SnapshotName = "before-x".parse().unwrap();
        let r = |m: Method, p: &str| route(&m, p);
        assert_eq!(
            r(Method::GET, &format!("/projects/{ID}/snapshots")),
            Ok(Route::Snapshots(id))
        );
        assert_eq!(
            r(Method::POST, &format!("/projects/{ID}/snapshots")),
            Ok(Route::CreateSnapshot(id))
        );
        assert_eq!(
            r(
                Method::DELETE,
                &format!("/projects/{ID}/snapshots/before-x")
            ),
            Ok(Route::DeleteSnapshot(id, n.clone()))
        );
        assert_eq!(
            r(
                Method::POST,
                &format!("/projects/{ID}/snapshots/before-x/restore")
            ),
            Ok(Route::RestoreSnapshot(id, n))
        );
        assert_eq!(
            r(Method::POST, &format!("/projects/{ID}/quota")),
            Ok(Route::SetQuota(id))
        );
        assert_eq!(
            r(Method::POST, "/snapshots/sweep"),
            Ok(Route::SweepSnapshots)
        );
        for bad in ["..", "%2e%2e", ".x", "a%2fb", "-rf", &"x".repeat(65)] {
            let e = r(Method::DELETE, &format!("/projects/{ID}/snapshots/{bad}")).unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (StatusCode::BAD_REQUEST, "invalid_snapshot_name"),
                "{bad}"
            );
        }
        let e = r(Method::GET, &format!("/projects/{ID}/snapshots/x")).unwrap_err();
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
        let e = r(Method::PUT, &format!("/projects/{ID}/snapshots")).unwrap_err();
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(e.message.contains("GET or POST"), "{}", e.message);
        let e = r(Method::GET, "/snapshots/sweep").unwrap_err();
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
        let e = r(Method::GET, "/projects/x/snapshots").unwrap_err();
        assert_eq!(e.code, "invalid_project_id");
        let e = r(Method::GET, "/snapshots").unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn every_route_but_health_needs_a_permission() {
        let id: ProjectId = ID.parse().unwrap();
        assert_eq!(Route::Health.permission(), None);
        assert_eq!(Route::List.permission(), Some((Action::List, None)));
        assert_eq!(
            Route::Status(id).permission(),
            Some((Action::Status, Some(id)))
        );
        assert_eq!(
            Route::Start(id).permission(),
            Some((Action::Start, Some(id)))
        );
        assert_eq!(Route::Stop(id).permission(), Some((Action::Stop, Some(id))));
        assert_eq!(Route::Logs(id).permission(), Some((Action::Logs, Some(id))));
        assert_eq!(Route::Events.permission(), Some((Action::List, None)));
        assert_eq!(Route::Metrics.permission(), Some((Action::Metrics, None)));
        assert_eq!(route(&Method::GET, OPEN_PATH), Ok(Route::Health));
    }

    #[test]
    fn observation_routes_and_their_metric_templates() {
        let id: ProjectId = ID.parse().unwrap();
        assert_eq!(route(&Method::GET, "/events"), Ok(Route::Events));
        assert_eq!(route(&Method::GET, "/metrics"), Ok(Route::Metrics));
        assert_eq!(
            route(&Method::GET, &format!("/projects/{ID}/logs")),
            Ok(Route::Logs(id))
        );
        let e = route(&Method::POST, "/events").unwrap_err();
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
        let e = route(&Method::GET, "/projects/x/logs").unwrap_err();
        assert_eq!(e.code, "invalid_project_id");
        let t = |m: Method, p: &str| route_template(&m, p);
        assert_eq!(
            t(Method::GET, &format!("/projects/{ID}/status")),
            "/projects/:id/status"
        );
        assert_eq!(
            t(
                Method::DELETE,
                &format!("/projects/{ID}/snapshots/before-x")
            ),
            "/projects/:id/snapshots/:name"
        );
        assert_eq!(
            t(Method::POST, &format!("/projects/{ID}/snapshots/a/restore")),
            "/projects/:id/snapshots/:name/restore"
        );
        assert_eq!(t(Method::GET, "/metrics"), "/metrics");
        assert_eq!(t(Method::GET, "/projects"), "/projects");
        // random paths and bad ids cannot grow the label set
        assert_eq!(t(Method::GET, "/x/y/z"), "unmatched");
        assert_eq!(t(Method::GET, "/projects/x/status"), "unmatched");
        // interned: the same template is the same string
        assert!(std::ptr::eq(
            t(Method::GET, &format!("/projects/{ID}/logs")),
            t(
                Method::GET,
                "/projects/6f1c2d3e-0000-4000-8000-000000000002/logs"
            )
        ));
    }
}
