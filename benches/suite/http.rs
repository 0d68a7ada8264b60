//! HTTP for the suite: one-shot requests (a fresh connection each, as curl would) and a load
//! generator (N keep-alive connections, fixed duration, latency percentiles), over TCP or a unix
//! socket. hyper's client on tokio: the same stack as the daemon, no wrk/oha to install.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};

use crate::stats::Summary;

/// Where a server listens.
#[derive(Debug, Clone)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp(a) => write!(f, "tcp {a}"),
            Target::Unix(p) => write!(f, "unix {}", p.display()),
        }
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(t: &Target) -> Result<Sender> {
    macro_rules! hs {
        ($s:expr) => {{
            let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new($s)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            tx
        }};
    }
    Ok(match t {
        Target::Tcp(a) => {
            let s = TcpStream::connect(a).await?;
            s.set_nodelay(true)?;
            hs!(s)
        }
        Target::Unix(p) => hs!(UnixStream::connect(p).await?),
    })
}

/// The daemon's admin token (every endpoint but /healthz needs one); sent to the baselines too,
/// where it is ignored, so every target parses the same request.
fn bearer() -> Option<&'static str> {
    static TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    TOKEN
        .get_or_init(|| {
            std::fs::read_to_string("/etc/cocalc-project-host/admin-token")
                .ok()
                .map(|t| format!("Bearer {}", t.trim()))
        })
        .as_deref()
}

fn request(method: &str, path: &str, body: Option<&str>) -> Result<Request<Full<Bytes>>> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(t) = bearer() {
        b = b.header("authorization", t);
    }
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    Ok(b.body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))?)
}

/// One request on a fresh connection; returns status and body.
pub async fn call(
    t: &Target,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(StatusCode, Bytes)> {
    let mut tx = connect(t).await.with_context(|| format!("connect {t}"))?;
    let resp = tx.send_request(request(method, path, body)?).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Like [`call`] with another bearer token (another host's API).
pub async fn call_as(
    t: &Target,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: &str,
) -> Result<(StatusCode, Bytes)> {
    let mut tx = connect(t).await.with_context(|| format!("connect {t}"))?;
    let mut req = request(method, path, body)?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let resp = tx.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Like [`call`], failing unless the status is 2xx; returns the body as JSON.
pub async fn json(
    t: &Target,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<serde_json::Value> {
    let (s, b) = call(t, method, path, body).await?;
    if !s.is_success() {
        bail!(
            "{method} {path} on {t}: {s}: {}",
            String::from_utf8_lossy(&b)
        );
    }
    if b.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(&b).with_context(|| format!("{method} {path}: body is not JSON"))
}

/// What a load run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Load {
    pub target: String,
    pub path: String,
    pub connections: usize,
    pub secs: f64,
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub bytes_per_response: usize,
    /// latency in milliseconds
    pub latency_ms: Summary,
    /// CPU seconds used during the measured window by the load generator's process (first), then
    /// by each watched process ([`load_watching`]; empty when unknown)
    pub cpu_secs: Vec<f64>,
}

/// `conns` keep-alive connections each sending `GET path` back to back for `warmup` + `secs`;
/// only requests started after the warm-up count. A non-200 answer or a failed connection counts
/// as an error (the connection is then made anew).
pub async fn load(
    t: &Target,
    path: &str,
    conns: usize,
    warmup: Duration,
    secs: Duration,
) -> Result<Load> {
    load_watching(t, path, conns, warmup, secs, &[]).await
}

/// CPU seconds (user + system) of each process, 0 when unreadable.
fn cpu_of(pids: &[u32]) -> Vec<f64> {
    pids.iter()
        .map(|p| crate::stats::cpu_secs(*p).unwrap_or(0.0))
        .collect()
}

/// [`load`], also measuring the CPU time the load generator and the `watch` processes use during
/// the measured window (`Load::cpu_secs`): the cost per request of each hop, whatever else
/// the machine runs meanwhile.
pub async fn load_watching(
    t: &Target,
    path: &str,
    conns: usize,
    warmup: Duration,
    secs: Duration,
    watch: &[u32],
) -> Result<Load> {
    let mut pids = vec![std::process::id()];
    pids.extend_from_slice(watch);
    // a first request proves the target answers, and gives the response size
    let (s, first) = call(t, "GET", path, None).await?;
    if s != StatusCode::OK {
        bail!("GET {path} on {t}: {s}");
    }
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + secs;
    let mut tasks = Vec::with_capacity(conns);
    for _ in 0..conns {
        let t = t.clone();
        let path = path.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            let mut tx: Option<Sender> = None;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                if tx.is_none() {
                    match connect(&t).await {
                        Ok(c) => tx = Some(c),
                        Err(_) => {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                let Some(s) = tx.as_mut() else { continue };
                let ok = async {
                    s.ready().await?;
                    let req = request("GET", &path, None)?;
                    let resp = s.send_request(req).await?;
                    let st = resp.status();
                    let _ = resp.into_body().collect().await?;
                    anyhow::Ok(st == StatusCode::OK)
                }
                .await;
                let dt = t0.elapsed();
                match ok {
                    Ok(true) => {
                        if t0 >= measure_from {
                            lat.push(dt.as_micros().min(u32::MAX as u128) as u32);
                        }
                    }
                    Ok(false) => {
                        if t0 >= measure_from {
                            errors += 1;
                        }
                    }
                    Err(_) => {
                        if t0 >= measure_from {
                            errors += 1;
                        }
                        tx = None;
                    }
                }
            }
            (lat, errors)
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu0 = cpu_of(&pids);
    tokio::time::sleep_until(end.into()).await;
    let cpu1 = cpu_of(&pids);
    let cpu_secs = cpu0.iter().zip(&cpu1).map(|(a, b)| b - a).collect();
    let mut all: Vec<u32> = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await?;
        all.extend(l);
        errors += e;
    }
    let elapsed = (Instant::now().max(end) - measure_from).as_secs_f64();
    let ms: Vec<f64> = all.iter().map(|u| f64::from(*u) / 1000.0).collect();
    Ok(Load {
        target: t.to_string(),
        path: path.to_owned(),
        connections: conns,
        secs: elapsed,
        requests: all.len() as u64,
        errors,
        rps: all.len() as f64 / elapsed,
        bytes_per_response: first.len(),
        latency_ms: Summary::of(&ms),
        cpu_secs,
    })
}
