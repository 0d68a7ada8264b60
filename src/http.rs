//! The HTTP API (hyper 1): a thin adapter over [`Host`]. `serve(listener, host, shutdown)` takes
//! its listener and shutdown signal from the caller, so socket activation and tests come free.
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
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::auth::{Action, Auth, Principal};
use crate::host::{self, Host};
use crate::limits::LimitsPatch;
use crate::project::{ProjectId, RunConfig};
use crate::snapshots::SnapshotName;

/// Largest request body accepted (a start config is a few hundred bytes).
pub const MAX_BODY: usize = 64 * 1024;
/// Most connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 4096;
/// A client gets this long to send its request head (and, idle, its next one): slowloris.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A client gets this long to send its body once the head is in.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Most request header fields.
const MAX_HEADERS: usize = 64;

/// An API error: status, machine code, message. Serialized as `{"error","code"}`.
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
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<host::Error> for ApiError {
    fn from(e: host::Error) -> ApiError {
        use host::Error as E;
        let status = match &e {
            E::InvalidProjectId(_) | E::InvalidConfig(_) | E::ImageNotAllowed(_) => {
                StatusCode::BAD_REQUEST
            }
            E::Storage(_) | E::Systemd(_) => StatusCode::SERVICE_UNAVAILABLE,
            E::StartFailed { .. } | E::StopFailed { .. } | E::Store(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            E::UpdateFailed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            E::InvalidSnapshotName(_) | E::ReservedSnapshotName(_) => StatusCode::BAD_REQUEST,
            E::NoSuchProject(_) | E::NoSuchSnapshot { .. } => StatusCode::NOT_FOUND,
            E::SnapshotExists { .. } | E::ProjectRunning(_) => StatusCode::CONFLICT,
        };
        ApiError::new(status, e.code(), e.to_string())
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
}

fn parse_id(id: &str) -> Result<ProjectId, ApiError> {
    id.parse().map_err(|e: crate::project::InvalidProjectId| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_project_id", e.to_string())
    })
}

fn parse_snapshot_name(name: &str) -> Result<SnapshotName, ApiError> {
    name.parse()
        .map_err(|e: crate::snapshots::InvalidSnapshotName| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_snapshot_name",
                e.to_string(),
            )
        })
}

/// Routes of the storage endpoints (snapshots, quota, sweep); `None` when the path is not one.
fn storage_route(method: &Method, segs: &[&str]) -> Option<Result<(Method, Route), ApiError>> {
    let r = match segs {
        ["snapshots", "sweep"] => Ok((Method::POST, Route::SweepSnapshots)),
        ["projects", id, "snapshots"] => parse_id(id).and_then(|id| match *method {
            Method::POST => Ok((Method::POST, Route::CreateSnapshot(id))),
            Method::GET => Ok((Method::GET, Route::Snapshots(id))),
            _ => Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
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
        ["projects", id, "config"] => {
            let id: ProjectId = id.parse().map_err(|e: crate::project::InvalidProjectId| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_project_id", e.to_string())
            })?;
            return match *method {
                Method::GET => Ok(Route::Config(id)),
                Method::PATCH => Ok(Route::SetConfig(id)),
                _ => Err(ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("{path} accepts GET and PATCH only"),
                )),
            };
        }
        ["projects", id, action @ ("status" | "start" | "stop")] => {
            let id: ProjectId = id.parse().map_err(|e: crate::project::InvalidProjectId| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_project_id", e.to_string())
            })?;
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
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no such endpoint: {path}"),
                ));
            }
        },
    };
    if *method != want {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{path} accepts {want} only"),
        ));
    }
    Ok(r)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    #[serde(default, deserialize_with = "object_or_null")]
    config: Option<RunConfig>,
}

/// serde's derived structs also take a JSON array (fields by position): the API takes objects.
fn object_or_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::de::Error as _;
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(None),
        v @ serde_json::Value::Object(_) => T::deserialize(v).map(Some).map_err(D::Error::custom),
        _ => Err(D::Error::custom("config must be an object")),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StopBody {
    #[serde(default)]
    force: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSnapshotBody {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaBody {
    /// required: bytes, or null for no limit
    #[serde(deserialize_with = "Option::deserialize")]
    disk: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepBody {
    /// the sweep's clock in ms (a test hook; default: now)
    #[serde(default)]
    now: Option<u64>,
    /// only these projects (default: every known project)
    #[serde(default)]
    projects: Option<Vec<String>>,
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

/// Reads a JSON body (empty = default), enforcing [`MAX_BODY`].
async fn read_json<T: for<'de> Deserialize<'de> + Default>(
    req: Request<Incoming>,
) -> Result<T, ApiError> {
    let too_big = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("body exceeds {MAX_BODY} bytes"),
        )
    };
    if let Some(len) = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && len > MAX_BODY as u64
    {
        return Err(too_big());
    }
    let body = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("body not received within {}s", BODY_TIMEOUT.as_secs()),
        )
    })?
    .map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            too_big()
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("cannot read body: {e}"),
            )
        }
    })?;
    let bytes = body.to_bytes();
    if bytes.is_empty() {
        return Ok(T::default());
    }
    let bad = |e: String| {
        let at = failing_field::<T>(&bytes)
            .map(|f| format!("{f}: "))
            .unwrap_or_default();
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("invalid JSON body: {at}{e}"),
        )
    };
    // an object, not an array that serde would map onto the fields by position
    match serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|e| bad(e.to_string()))? {
        v @ serde_json::Value::Object(_) => T::deserialize(v).map_err(|e| bad(e.to_string())),
        _ => Err(bad("the body must be a JSON object".into())),
    }
}

/// Names the field a well-formed JSON body fails on (a negative memory, a string for a number):
/// the first top-level key that fails on its own, and within `config` the run config's key.
fn failing_field<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Option<String> {
    fn first_bad<U: for<'de> Deserialize<'de>>(v: &serde_json::Value) -> Option<String> {
        v.as_object()?.iter().find_map(|(k, val)| {
            let alone = serde_json::Value::Object([(k.clone(), val.clone())].into_iter().collect());
            serde_json::from_value::<U>(alone)
                .is_err()
                .then(|| k.clone())
        })
    }
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let top = first_bad::<T>(&v)?;
    if top == "config"
        && let Some(inner) = first_bad::<RunConfig>(&v["config"])
    {
        return Some(format!("config.{inner}"));
    }
    Some(top)
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
                .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, e.code(), e.to_string()))?,
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
            StatusCode::FORBIDDEN,
            "forbidden",
            match project {
                Some(id) => format!("token does not allow {} on project {id}", action.as_str()),
                None => format!("token does not allow {}", action.as_str()),
            },
        ));
    }
    Ok((r, principal))
}

async fn dispatch(
    host: &Arc<Host>,
    auth: &Auth,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let (r, principal) = admit(auth, &req)?;
    let ok = |v: serde_json::Value| Ok(json_response(StatusCode::OK, &v));
    match r {
        Route::Health => ok(json!({"ok": true})),
        Route::List => {
            // written out directly: ids are hex and dashes, times are numbers (no escaping)
            let list = host.list();
            let mut body = String::with_capacity(16 + list.len() * 72);
            body.push_str("{\"projects\":[");
            for (id, last) in list
                .iter()
                .filter(|(id, _)| principal.as_ref().is_none_or(|p| p.sees(id)))
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
        Route::Status(id) => ok(serde_json::to_value(host.status(id)).unwrap_or_default()),
        Route::Start(id) => {
            let body: StartBody = read_json(req).await?;
            let st = host.start(id, body.config).await?;
            ok(serde_json::to_value(st).unwrap_or_default())
        }
        Route::Stop(id) => {
            let body: StopBody = read_json(req).await?;
            let st = host.stop(id, body.force).await?;
            ok(serde_json::to_value(st).unwrap_or_default())
        }
        Route::Config(id) => ok(serde_json::to_value(host.config(id).await?).unwrap_or_default()),
        Route::SetConfig(id) => {
            let patch: LimitsPatch = read_json(req).await?;
            let r = host.set_limits(id, patch).await?;
            ok(serde_json::to_value(r).unwrap_or_default())
        }
        Route::Snapshots(id) => ok(json!({ "snapshots": host.snapshots(id).await? })),
        Route::CreateSnapshot(id) => {
            let body: CreateSnapshotBody = read_json(req).await?;
            let name = body.name.as_deref().map(parse_snapshot_name).transpose()?;
            let info = host.create_snapshot(id, name).await?;
            Ok(json_response(
                StatusCode::CREATED,
                &serde_json::to_value(info).unwrap_or_default(),
            ))
        }
        Route::DeleteSnapshot(id, name) => {
            host.delete_snapshot(id, &name).await?;
            ok(json!({ "deleted": name }))
        }
        Route::RestoreSnapshot(id, name) => {
            host.restore_snapshot(id, &name).await?;
            ok(json!({ "restored": name }))
        }
        Route::SetQuota(id) => {
            let body: Option<QuotaBody> = read_json(req).await?;
            let body = body.ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    "body required: {\"disk\": <bytes> | null}",
                )
            })?;
            host.set_disk_quota(id, body.disk).await?;
            ok(serde_json::to_value(host.status(id)).unwrap_or_default())
        }
        Route::SweepSnapshots => {
            let body: SweepBody = read_json(req).await?;
            let only = body
                .projects
                .map(|v| v.iter().map(|s| parse_id(s)).collect::<Result<Vec<_>, _>>())
                .transpose()?;
            let now = body.now.unwrap_or_else(host::now_ms);
            if now > i64::MAX as u64 {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    format!("now: {now} is above the maximum of {}", i64::MAX),
                ));
            }
            let outcomes = host.sweep_snapshots(Some(now), only).await?;
            ok(json!({ "now": now, "projects": outcomes }))
        }
    }
}

async fn handle(
    host: Arc<Host>,
    auth: Arc<Auth>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let resp = match dispatch(&host, &auth, req).await {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(%method, %path, status = e.status.as_u16(), code = e.code, error = %e.message, "request failed");
            }
            let mut r = error_response(&e);
            // RFC 9110: a 405 names the method the resource does accept
            let allowed: Vec<&str> = [Method::GET, Method::POST, Method::PATCH, Method::DELETE]
                .iter()
                .filter(|m| route(m, &path).is_ok())
                .map(Method::as_str)
                .collect();
            if e.status == StatusCode::METHOD_NOT_ALLOWED
                && let Ok(v) = hyper::header::HeaderValue::from_str(&allowed.join(", "))
            {
                r.headers_mut().insert(hyper::header::ALLOW, v);
            }
            r
        }
    };
    Ok(resp)
}

/// Serves the API on `listener` until `shutdown` resolves, then lets in-flight requests finish
/// (up to 30 s) before returning. `auth` decides who may call what.
pub async fn serve(
    listener: TcpListener,
    host: Arc<Host>,
    auth: Arc<Auth>,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = &mut shutdown => break,
        };
        let (stream, _peer) = tokio::select! {
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
        let (host, auth) = (host.clone(), auth.clone());
        let svc = hyper::service::service_fn(move |req| handle(host.clone(), auth.clone(), req));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_headers(MAX_HEADERS)
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
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
    fn type_errors_name_the_field() {
        let f = |b: &str| failing_field::<StartBody>(b.as_bytes());
        assert_eq!(
            f(r#"{"config":{"memory":-1}}"#).as_deref(),
            Some("config.memory")
        );
        assert_eq!(
            f(r#"{"config":{"image":"x","pids":1e99}}"#).as_deref(),
            Some("config.pids")
        );
        assert_eq!(f(r#"{"config":7}"#).as_deref(), Some("config"));
        assert_eq!(f("not json"), None);
        let p = |b: &str| failing_field::<LimitsPatch>(b.as_bytes());
        assert_eq!(p(r#"{"cpu":1,"memory":"2G"}"#).as_deref(), Some("memory"));
        assert_eq!(p(r#"{"swap":1}"#).as_deref(), Some("swap"));
        assert_eq!(p(r#"{"imgae":"x"}"#).as_deref(), Some("imgae"));
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
    }

    /// docs/openapi.yaml and the router describe the same endpoints.
    #[test]
    fn openapi_documents_every_route() {
        let spec = include_str!("../docs/openapi.yaml");
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
                    documented.push((m, p.replace("{id}", ID).replace("{name}", "snap-1")));
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
        ] {
            assert!(
                documented
                    .iter()
                    .any(|(m, p)| route(m, p).as_ref() == Ok(&r)),
                "routed but not documented: {r:?}"
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
    fn storage_bodies() {
        assert!(serde_json::from_str::<QuotaBody>(r#"{}"#).is_err());
        assert_eq!(
            serde_json::from_str::<QuotaBody>(r#"{"disk":null}"#)
                .unwrap()
                .disk,
            None
        );
        assert_eq!(
            serde_json::from_str::<QuotaBody>(r#"{"disk":5}"#)
                .unwrap()
                .disk,
            Some(5)
        );
        assert!(serde_json::from_str::<QuotaBody>(r#"{"disk":-5}"#).is_err());
        assert!(serde_json::from_str::<CreateSnapshotBody>(r#"{"nam":"x"}"#).is_err());
        assert!(serde_json::from_str::<SweepBody>(r#"{"now":"x"}"#).is_err());
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
        assert_eq!(route(&Method::GET, OPEN_PATH), Ok(Route::Health));
    }

    #[test]
    fn bodies_reject_unknown_fields() {
        assert!(serde_json::from_str::<StopBody>(r#"{"forc":true}"#).is_err());
        assert!(serde_json::from_str::<StopBody>(r#"{"force":"yes"}"#).is_err());
        assert!(serde_json::from_str::<StartBody>(r#"{"config":[]}"#).is_err());
        assert!(serde_json::from_str::<StartBody>(r#"{"config":["x"]}"#).is_err());
        assert!(serde_json::from_str::<StartBody>(r#"{"config":{"bad":1}}"#).is_err());
        assert!(
            serde_json::from_str::<StartBody>(r#"{"config":null}"#)
                .unwrap()
                .config
                .is_none()
        );
    }
}
