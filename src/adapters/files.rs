//! `/<id>/files/<path>` on the proxy listener: a project's files over HTTP, whether or not it
//! runs. `GET`/`HEAD` a file (one byte range, ETag/Last-Modified and conditional requests,
//! `Content-Type` by extension) or a directory (JSON, or `?format=html`); `PUT` a file (streamed
//! to a temporary file, fsynced, renamed over the target; parents created; owned by the project
//! user; the quota applies and a failed write leaves nothing); `DELETE` a file or an empty
//! directory; `POST …?mkdir`. `~/.snapshots/<name>/…` is read-only. Every path goes through
//! `backends::safefs` (openat2 beneath the home); the proxy checked the caller (action `files`).
//! Memory stays bounded both ways: one buffer of at most [`CHUNK`] bytes per transfer.
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use crate::adapters::proxy::{Body, error_response, full};
use crate::api::types::{DirEntry, DirListing, FileInfo};
use crate::api::{ErrorKind, WireError};
use crate::backends::safefs::{AtomicFile, FsError, Kind, Listing, Meta, ProjectFs, RelPath};
use crate::core::Host;
use crate::domain::project::ProjectId;

#[cfg(test)]
mod tests;
mod wire;

/// Most entries a listing returns (`truncated` says when there were more).
const LIST_LIMIT: usize = 100_000;
/// Bytes read from a file, or gathered from an upload, per blocking call.
const CHUNK: usize = 256 * 1024;
/// An upload that sends nothing for this long is dropped (its temporary file removed).
const BODY_IDLE: Duration = Duration::from_secs(60);
/// After a failed write, this much of the rest of the upload is read (and dropped) so the client
/// gets the answer instead of a reset; more than that and the connection is closed. (With 16
/// MiB, a write refused at the quota 30 MiB before the end of an upload left curl racing: it
/// got the 507 only if it read it before its next write hit the closed socket.)
const DRAIN_LIMIT: u64 = 64 << 20;

/// Serves one request for a project's files (the caller is authorized for them).
pub async fn handle(
    host: &Arc<Host>,
    id: ProjectId,
    rest: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    match serve(host, id, rest, req).await {
        Ok(r) => r,
        Err(e) => {
            if e.kind == ErrorKind::Internal {
                tracing::warn!(project_id = %id, error = %e.message, "file request failed");
            }
            let mut r = error_response(&e);
            if e.kind == ErrorKind::MethodNotAllowed {
                r.headers_mut().insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, PUT, DELETE, POST"),
                );
            }
            r
        }
    }
}

async fn serve(
    host: &Arc<Host>,
    id: ProjectId,
    rest: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, WireError> {
    let path = RelPath::parse(rest)?;
    let q = wire::Query::parse(req.uri().query())
        .map_err(|m| WireError::new(ErrorKind::InvalidPath, m))?;
    let write = match *req.method() {
        Method::GET | Method::HEAD => false,
        Method::PUT | Method::DELETE => true,
        Method::POST if q.mkdir => true,
        Method::POST => {
            return Err(WireError::new(
                ErrorKind::MethodNotAllowed,
                "POST takes ?mkdir (to create a directory); upload a file with PUT",
            ));
        }
        _ => {
            return Err(WireError::new(
                ErrorKind::MethodNotAllowed,
                "the file server takes GET, HEAD, PUT, DELETE and POST ?mkdir",
            ));
        }
    };
    let fs = Arc::new(host.project_files(id).await?);
    if write && fs.locate(&path).0.is_read_only() {
        return Err(FsError::ReadOnly.into());
    }
    match *req.method() {
        Method::PUT => put(fs, path, req).await,
        Method::DELETE => {
            blocking(move || {
                let (t, p) = fs.locate(&path);
                t.remove(&p)
            })
            .await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Method::POST => mkdir(fs, path).await,
        _ => get(fs, path, q, req).await,
    }
}

/// Runs a file operation on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FsError> + Send + 'static,
) -> Result<T, WireError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| WireError::new(ErrorKind::Internal, format!("file task failed: {e}")))?
        .map_err(WireError::from)
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = status;
    r
}

fn json(status: StatusCode, v: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn info(path: &RelPath, m: &Meta) -> FileInfo {
    FileInfo {
        path: path.to_string(),
        kind: m.kind.as_str().to_string(),
        size: m.size,
        mtime: wire::mtime_ms(m),
    }
}

fn header_str(req: &Request<Incoming>, name: header::HeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

enum Got {
    File(std::fs::File, Meta),
    Dir(Listing),
}

async fn get(
    fs: Arc<ProjectFs>,
    path: RelPath,
    q: wire::Query,
    req: Request<Incoming>,
) -> Result<Response<Body>, WireError> {
    let p = path.clone();
    let got = blocking(move || {
        let (t, p) = fs.locate(&p);
        match t.open_read(&p) {
            Ok((f, m)) => Ok(Got::File(f, m)),
            Err(FsError::IsDirectory) => Ok(Got::Dir(t.list(&p, LIST_LIMIT)?)),
            Err(e) => Err(e),
        }
    })
    .await?;
    let head = req.method() == Method::HEAD;
    let (file, m) = match got {
        Got::Dir(l) => return Ok(listing(&path, l, q, &req, head)),
        Got::File(f, m) => (f, m),
    };
    let tag = wire::etag(&m);
    let mut r = if wire::not_modified(
        header_str(&req, header::IF_NONE_MATCH),
        header_str(&req, header::IF_MODIFIED_SINCE),
        &m,
    ) {
        empty(StatusCode::NOT_MODIFIED)
    } else {
        let range = match header_str(&req, header::RANGE) {
            Some(h) if wire::if_range_holds(header_str(&req, header::IF_RANGE), &m) => {
                wire::parse_range(h, m.size)
            }
            _ => wire::Range::Full,
        };
        let (status, start, len) = match range {
            wire::Range::Unsatisfiable => {
                let mut r = error_response(&WireError::new(
                    ErrorKind::RangeNotSatisfiable,
                    format!("the file has {} bytes", m.size),
                ));
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", m.size)) {
                    r.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return Ok(r);
            }
            wire::Range::Part(s, e) => (StatusCode::PARTIAL_CONTENT, s, e - s + 1),
            wire::Range::Full => (StatusCode::OK, 0, m.size),
        };
        let body = if head {
            full(Bytes::new())
        } else {
            file_body(file, start, len)
        };
        let mut r = Response::new(body);
        *r.status_mut() = status;
        let h = r.headers_mut();
        if status == StatusCode::PARTIAL_CONTENT {
            let cr = format!("bytes {start}-{}/{}", start + len - 1, m.size);
            if let Ok(v) = HeaderValue::from_str(&cr) {
                h.insert(header::CONTENT_RANGE, v);
            }
        }
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        let mime = path
            .split_last()
            .map(|(_, n)| mime_guess::from_path(n).first_or_octet_stream())
            .unwrap_or(mime_guess::mime::APPLICATION_OCTET_STREAM);
        if let Ok(v) = HeaderValue::from_str(mime.as_ref()) {
            h.insert(header::CONTENT_TYPE, v);
        }
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        r
    };
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&tag) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&wire::last_modified(&m)) {
        h.insert(header::LAST_MODIFIED, v);
    }
    untrusted_content(h);
    Ok(r)
}

/// What the project's users wrote is served as an opaque, sandboxed document: a page of one
/// project never runs script with the proxy's origin (and the cookies of other projects).
fn untrusted_content(h: &mut hyper::HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache"),
    );
}

fn listing(
    path: &RelPath,
    l: Listing,
    q: wire::Query,
    req: &Request<Incoming>,
    head: bool,
) -> Response<Body> {
    let mut r = if q.html {
        // links relative to the directory: its own last segment first when the URL has no `/`
        let base = if req.uri().path().ends_with('/') {
            String::new()
        } else {
            let last = path.split_last().map_or("files", |(_, n)| n);
            format!("{}/", wire::encode_segment(last))
        };
        let page = wire::listing_html(&format!("/{path}"), &base, &l.entries, l.truncated);
        let mut r = Response::new(full(page));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        r
    } else {
        json(
            StatusCode::OK,
            &DirListing {
                path: path.to_string(),
                entries: l
                    .entries
                    .iter()
                    .map(|e| DirEntry {
                        name: e.name.clone(),
                        kind: e.meta.kind.as_str().to_string(),
                        size: e.meta.size,
                        mtime: wire::mtime_ms(&e.meta),
                    })
                    .collect(),
                truncated: l.truncated,
            },
        )
    };
    if head {
        *r.body_mut() = full(Bytes::new());
    }
    untrusted_content(r.headers_mut());
    r
}

/// Streams `len` bytes of `file` from `start`: one chunk read at a time on a blocking thread,
/// at most one more queued; a client that stops reading holds no thread.
fn file_body(file: std::fs::File, start: u64, len: u64) -> Body {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    let file = Arc::new(file);
    tokio::spawn(async move {
        let (mut off, end) = (start, start + len);
        while off < end {
            let n = usize::try_from(end - off).unwrap_or(CHUNK).min(CHUNK);
            let f = file.clone();
            let read = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt as _;
                let mut buf = vec![0u8; n];
                let k = f.read_at(&mut buf, off)?;
                buf.truncate(k);
                Ok::<_, std::io::Error>(buf)
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            let frame = match read {
                Ok(b) if b.is_empty() => Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file shrank while it was sent",
                )),
                Ok(b) => {
                    off += b.len() as u64;
                    Ok(Frame::data(Bytes::from(b)))
                }
                Err(e) => Err(e),
            };
            let failed = frame.is_err();
            if tx.send(frame).await.is_err() || failed {
                return;
            }
        }
    });
    StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))).boxed()
}

async fn put(
    fs: Arc<ProjectFs>,
    path: RelPath,
    req: Request<Incoming>,
) -> Result<Response<Body>, WireError> {
    let (f2, p) = (fs.clone(), path.clone());
    let mut file = blocking(move || {
        let (t, p) = f2.locate(&p);
        t.create_atomic(&p, true)
    })
    .await?;
    let created = !file.replaces();
    let mut body = req.into_body();
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
    loop {
        let frame = match tokio::time::timeout(BODY_IDLE, body.frame()).await {
            Err(_) => {
                return Err(WireError::new(
                    ErrorKind::BodyTimeout,
                    "the upload stalled; nothing was written",
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(WireError::new(
                    ErrorKind::BadBody,
                    format!("the upload broke off ({e}); nothing was written"),
                ));
            }
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        if buf.len() >= CHUNK {
            match write(file, buf).await {
                Ok((f, b)) => (file, buf) = (f, b),
                Err(e) => {
                    drain(&mut body).await;
                    return Err(e);
                }
            }
        }
    }
    if !buf.is_empty() {
        (file, _) = write(file, buf).await?;
    }
    let m = blocking(move || file.commit()).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(status, &info(&path, &m)))
}

/// Writes `buf` on a blocking thread; gives the file and the emptied buffer back. On failure the
/// file is dropped there (its temporary file removed).
async fn write(mut file: AtomicFile, mut buf: Vec<u8>) -> Result<(AtomicFile, Vec<u8>), WireError> {
    blocking(move || {
        file.write_all(&buf)?;
        buf.clear();
        Ok((file, buf))
    })
    .await
}

/// Reads what is left of an upload (up to [`DRAIN_LIMIT`], briefly) so the error answer gets
/// to a client that is still sending.
async fn drain(body: &mut Incoming) {
    let mut n = 0u64;
    while n < DRAIN_LIMIT {
        match tokio::time::timeout(Duration::from_secs(5), body.frame()).await {
            Ok(Some(Ok(f))) => n += f.data_ref().map_or(0, |d| d.len() as u64),
            _ => return,
        }
    }
}

async fn mkdir(fs: Arc<ProjectFs>, path: RelPath) -> Result<Response<Body>, WireError> {
    let p = path.clone();
    let (created, m) = blocking(move || {
        let (t, p) = fs.locate(&p);
        let created = match t.stat(&p) {
            Ok(m) if m.kind == Kind::Dir => false,
            Ok(_) => return Err(FsError::Exists),
            Err(FsError::NotFound) => {
                t.mkdir_all(&p)?;
                true
            }
            Err(e) => return Err(e),
        };
        Ok((created, t.stat(&p)?))
    })
    .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(status, &info(&path, &m)))
}
