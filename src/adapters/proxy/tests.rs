//! The proxy in process, over the simulated backend (a project's ports are local listeners of
//! the test): routing, auth and the cookie exchange, header rewriting, errors, pooling and a
//! WebSocket-style upgrade. The real netns connection and real clients are the e2e suite's
//! (`tests/e2e/proxy.rs`).
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::auth::Auth;
use crate::backends::sim::Sim;
use crate::config::Settings;
use crate::core::Host;
use crate::domain::project::ProjectId;

const ADMIN: &str = "s3cr3t-admin-token-0123456789";
const SEED: [u8; 32] = [9; 32];

fn id(n: u32) -> ProjectId {
    format!("6f1c2d3e-0000-4000-8000-{n:012x}").parse().unwrap()
}

struct Bed {
    sim: Sim,
    host: Arc<Host>,
    px: Arc<super::Proxy>,
    addr: SocketAddr,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A master token for `projects` with `actions`.
fn master(host_id: &str, projects: &[ProjectId], actions: &[&str], jti: &str) -> String {
    let now = crate::auth::now_secs();
    crate::auth::sign(
        &SEED,
        &json!({"aud": host_id, "sub": "u", "exp": now + 600, "jti": jti,
                "scope": {"projects": projects.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                          "actions": actions}}),
    )
    .unwrap()
}

async fn bed(tweak: impl FnOnce(&mut Settings)) -> Bed {
    let dir = std::env::temp_dir().join(format!("cph-proxy-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut settings = Settings {
        state_dir: dir.clone(),
        ..Default::default()
    };
    tweak(&mut settings);
    let sim = Sim::new();
    let host = Host::with_backends(settings, sim.backends()).await.unwrap();
    let vk = ed25519_dalek::SigningKey::from_bytes(&SEED).verifying_key();
    use base64::Engine as _;
    let key = crate::auth::parse_public_key(
        &base64::engine::general_purpose::STANDARD.encode(vk.to_bytes()),
    )
    .unwrap();
    let auth = Arc::new(Auth::new(
        &[ADMIN.to_string()],
        vec![key],
        host.host_id(),
        3600,
    ));
    let px = super::Proxy::new(host.clone(), auth, None).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(super::serve(
        l,
        px.clone(),
        async move { s.cancelled().await },
    ));
    Bed {
        sim,
        host,
        px,
        addr,
        stop,
        task,
        _dir: TempDir(dir),
    }
}

/// A server in "the project": answers every request with what it got, as JSON; `/slow` sleeps
/// first; a body is echoed back in `body_len`.
async fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            n += 1;
            let conn_no = n;
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: Request<hyper::body::Incoming>| async move {
                        let path = req.uri().to_string();
                        let method = req.method().to_string();
                        let headers: HashMap<String, String> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                            .collect();
                        if path.starts_with("/slow") {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                        }
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes().len())
                            .unwrap_or(0);
                        let v = json!({"path": path, "method": method, "headers": headers,
                                   "body_len": body, "conn": conn_no});
                        let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
                        r.headers_mut().insert(
                            "set-cookie",
                            "cocalc_project_host=evil; Path=/".parse().unwrap(),
                        );
                        r.headers_mut()
                            .append("set-cookie", "app=1".parse().unwrap());
                        Ok::<_, std::convert::Infallible>(r)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

struct Answer {
    status: u16,
    headers: hyper::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn call(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "px.example");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let r = send
        .send_request(b.body(Full::new(Bytes::from_static(b"hello"))).unwrap())
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.into_body().collect().await.unwrap().to_bytes().to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

fn bearer() -> String {
    format!("Bearer {ADMIN}")
}

#[tokio::test]
async fn forwards_both_path_forms_with_clean_headers() {
    let b = bed(|_| {}).await;
    let p = id(1);
    let backend = echo_backend().await;
    b.sim.units.listen(p, 8000, backend);
    b.host.start(p, None).await.unwrap();
    let auth = bearer();
    let a = call(
        b.addr,
        "POST",
        &format!("/{p}/port/8000/a/b?x=1"),
        &[
            ("authorization", &auth),
            ("cookie", "app=2; cocalc_project_host=zzz"),
            ("connection", "x-drop"),
            ("x-drop", "1"),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let v = a.json();
    assert_eq!(v["path"], format!("/{p}/port/8000/a/b?x=1"));
    assert_eq!(v["method"], "POST");
    assert_eq!(v["body_len"], 5);
    let h = &v["headers"];
    assert_eq!(h["authorization"], Value::Null);
    assert_eq!(h["x-drop"], Value::Null);
    assert_eq!(h["cookie"], "app=2");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "px.example");
    assert_eq!(h["x-forwarded-prefix"], format!("/{p}/port/8000"));
    assert_eq!(h["host"], "px.example");
    let cookies: Vec<_> = a.headers.get_all("set-cookie").iter().collect();
    assert_eq!(
        cookies,
        ["app=1"],
        "the project cannot set the host's cookie"
    );

    let a = call(
        b.addr,
        "GET",
        &format!("/{p}/server/8000/a/b"),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["path"], "/a/b");
    assert_eq!(
        a.json()["headers"]["x-forwarded-prefix"],
        format!("/{p}/server/8000")
    );
    b.stop.cancel();
    b.task.await.unwrap();
}

#[tokio::test]
async fn token_exchange_cookie_and_refusals() {
    let b = bed(|_| {}).await;
    let (pa, pb) = (id(0xa), id(0xb));
    let backend = echo_backend().await;
    b.sim.units.listen(pa, 8000, backend);
    b.host.start(pa, None).await.unwrap();
    let hid = b.host.host_id().to_string();
    let tok = master(&hid, &[pa], &["proxy"], "j-1");

    // no credential: JSON for API clients, a page for browsers
    let a = call(b.addr, "GET", &format!("/{pa}/port/8000/"), &[]).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.json()["code"], "unauthorized");
    let a = call(
        b.addr,
        "GET",
        &format!("/{pa}/port/8000/"),
        &[("accept", "text/html")],
    )
    .await;
    assert_eq!(a.status, 401);
    assert!(
        a.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(String::from_utf8_lossy(&a.body).contains("token"));

    // ?token= → 303 to the URL without it, with the cookie
    let a = call(
        b.addr,
        "GET",
        &format!("/{pa}/port/8000/x?a=1&token={tok}&b=2"),
        &[],
    )
    .await;
    assert_eq!(a.status, 303);
    assert_eq!(a.headers["location"], format!("/{pa}/port/8000/x?a=1&b=2"));
    let set = a.headers["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set.contains(&format!("Path=/{pa}/"))
            && set.contains("HttpOnly")
            && set.contains("SameSite=Lax"),
        "{set}"
    );
    assert!(!set.contains("Secure"), "no TLS here: {set}");
    let cookie = set.split(';').next().unwrap().to_string();
    let a = call(
        b.addr,
        "GET",
        &format!("/{pa}/port/8000/x"),
        &[("cookie", &cookie)],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.json()["headers"]["cookie"],
        Value::Null,
        "the session cookie stays here"
    );
    // the cookie grants proxy only (the token had no files), and only on its project
    let a = call(
        b.addr,
        "GET",
        &format!("/{pa}/files/x"),
        &[("cookie", &cookie)],
    )
    .await;
    assert_eq!(a.status, 403);
    let a = call(
        b.addr,
        "GET",
        &format!("/{pb}/port/8000/x"),
        &[("cookie", &cookie)],
    )
    .await;
    assert_eq!(a.status, 403, "a cookie of A is not a credential on B");
    // a token of A on B
    let a = call(b.addr, "GET", &format!("/{pb}/port/8000/?token={tok}"), &[]).await;
    assert_eq!(a.status, 403);
    assert_eq!(a.json()["code"], "forbidden");
    // a token without the proxy action
    let t2 = master(&hid, &[pa], &["status"], "j-2");
    let a = call(b.addr, "GET", &format!("/{pa}/port/8000/?token={t2}"), &[]).await;
    assert_eq!(a.status, 403);
    // tampered cookie, garbage token
    let a = call(
        b.addr,
        "GET",
        &format!("/{pa}/port/8000/"),
        &[("cookie", &format!("{cookie}x"))],
    )
    .await;
    assert_eq!(a.status, 401);
    let a = call(b.addr, "GET", &format!("/{pa}/port/8000/?token=nope"), &[]).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.json()["code"], "invalid_token");
    b.stop.cancel();
    b.task.await.unwrap();
}

#[tokio::test]
async fn not_running_closed_port_hanging_server_and_bad_paths() {
    let b = bed(|s| s.proxy.timeout = Duration::from_secs(1)).await;
    let p = id(2);
    let auth = bearer();
    let h = [("authorization", auth.as_str())];
    let a = call(b.addr, "GET", &format!("/{p}/port/8000/"), &h).await;
    assert_eq!(
        (a.status, a.json()["code"].clone()),
        (503, json!("project_not_running"))
    );
    let backend = echo_backend().await;
    b.sim.units.listen(p, 8000, backend);
    b.host.start(p, None).await.unwrap();
    let t = Instant::now();
    let a = call(b.addr, "GET", &format!("/{p}/port/8001/"), &h).await;
    assert_eq!(
        (a.status, a.json()["code"].clone()),
        (502, json!("backend_unavailable"))
    );
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let t = Instant::now();
    let a = call(b.addr, "GET", &format!("/{p}/server/8000/slow"), &h).await;
    assert_eq!(
        (a.status, a.json()["code"].clone()),
        (504, json!("backend_timeout"))
    );
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    for (path, status) in [
        (format!("/{p}/port/0/"), 400),
        (format!("/{p}/port/65536/"), 400),
        (format!("/{p}/port/http/"), 400),
        (format!("/{p}/server/80/../x"), 400),
        ("/not-an-id/port/80/".to_string(), 400),
        ("/".to_string(), 404),
        (format!("/{p}/nope/1"), 404),
    ] {
        let a = call(b.addr, "GET", &path, &h).await;
        assert_eq!(a.status, status, "{path}");
        assert!(a.json()["code"].is_string(), "{path}");
    }
    b.stop.cancel();
    b.task.await.unwrap();
}

#[tokio::test]
async fn connections_are_pooled_and_dropped_when_the_project_stops() {
    let b = bed(|_| {}).await;
    let p = id(3);
    let backend = echo_backend().await;
    b.sim.units.listen(p, 8000, backend);
    b.host.start(p, None).await.unwrap();
    let auth = bearer();
    let h = [("authorization", auth.as_str())];
    let first = call(b.addr, "GET", &format!("/{p}/port/8000/"), &h)
        .await
        .json()["conn"]
        .clone();
    // the connection goes back once its answer is read
    for _ in 0..100 {
        if b.px_idle(p) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = call(b.addr, "GET", &format!("/{p}/port/8000/"), &h)
        .await
        .json()["conn"]
        .clone();
    assert_eq!(first, second, "the second request reused the connection");
    for _ in 0..100 {
        if b.px_idle(p) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(b.px_idle(p), 1);
    // an idle connection outlives a sweep younger than it, not one older
    b.px.pool().expire(Duration::from_secs(60));
    assert_eq!(b.px_idle(p), 1);
    b.px.pool().expire(Duration::ZERO);
    assert_eq!(b.px_idle(p), 0, "idle past the limit: closed");
    let third = call(b.addr, "GET", &format!("/{p}/port/8000/"), &h)
        .await
        .json()["conn"]
        .clone();
    assert_ne!(third, first, "a new connection after the expiry");
    for _ in 0..100 {
        if b.px_idle(p) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(b.px_idle(p), 1);
    b.host.stop(p, false).await.unwrap();
    for _ in 0..100 {
        if b.px_idle(p) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        b.px_idle(p),
        0,
        "the stopped project's connections are dropped"
    );
    let a = call(b.addr, "GET", &format!("/{p}/port/8000/"), &h).await;
    assert_eq!(a.status, 503);
    b.stop.cancel();
    b.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_reuse_backend_connections_without_churn() {
    let b = bed(|_| {}).await;
    let p = id(4);
    let backend = echo_backend().await;
    b.sim.units.listen(p, 8000, backend);
    b.host.start(p, None).await.unwrap();
    let auth = bearer();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (addr, auth) = (b.addr, auth.clone());
        tasks.push(tokio::spawn(async move {
            let h = [("authorization", auth.as_str())];
            let mut seen = Vec::new();
            for _ in 0..30 {
                let a = call(addr, "GET", &format!("/{p}/port/8000/"), &h).await;
                assert_eq!(a.status, 200);
                seen.push(a.json()["conn"].to_string());
            }
            seen
        }));
    }
    let mut conns = std::collections::HashSet::new();
    for t in tasks {
        conns.extend(t.await.unwrap());
    }
    // 8 at a time: a connection goes back with its response head and is reused once its
    // body is read, so the backend sees about 8 connections for 240 requests (not one per
    // request that came while another was finishing)
    assert!(conns.len() <= 16, "{} backend connections", conns.len());
    b.stop.cancel();
    b.task.await.unwrap();
}

impl Bed {
    fn px_idle(&self, p: ProjectId) -> usize {
        self.px.pool().idle(p)
    }
}

#[tokio::test]
async fn upgrades_are_tunnelled() {
    let b = bed(|_| {}).await;
    let p = id(4);
    // a server that switches to an echo protocol
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    b.sim.units.listen(p, 9000, l.local_addr().unwrap());
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap().to_lowercase();
        assert!(head.contains("upgrade: websocket"), "{head}");
        assert!(!head.contains("authorization"), "{head}");
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                return;
            }
            s.write_all(&buf[..n]).await.unwrap();
        }
    });
    b.host.start(p, None).await.unwrap();
    let mut c = TcpStream::connect(b.addr).await.unwrap();
    c.write_all(
        format!(
            "GET /{p}/server/9000/ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        c.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for msg in [&b"ping"[..], b"second frame"] {
        c.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
    b.stop.cancel();
    b.task.await.unwrap();
}

#[tokio::test]
async fn autostart_starts_a_known_project_only_when_configured() {
    let b = bed(|s| s.proxy.autostart = true).await;
    let (known, unknown) = (id(5), id(6));
    let backend = echo_backend().await;
    b.sim.units.listen(known, 8000, backend);
    b.sim.units.listen(unknown, 8000, backend);
    b.host.start(known, None).await.unwrap();
    b.host.stop(known, false).await.unwrap();
    let auth = bearer();
    let h = [("authorization", auth.as_str())];
    let a = call(b.addr, "GET", &format!("/{known}/server/8000/x"), &h).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert!(b.host.is_running(known));
    // a project whose server listens only a while after its start: the request waits for it
    let late = id(7);
    b.host.start(late, None).await.unwrap();
    b.host.stop(late, false).await.unwrap();
    let units = b.sim.units.clone();
    let t = tokio::time::Instant::now();
    let opens = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(350)).await;
        units.listen(late, 8000, backend);
    });
    let a = call(b.addr, "GET", &format!("/{late}/server/8000/x"), &h).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert!(
        t.elapsed() >= Duration::from_millis(350),
        "{:?}",
        t.elapsed()
    );
    opens.await.unwrap();
    // a running project's closed port is still a 502 at once: only a start waits
    let t = tokio::time::Instant::now();
    let a = call(b.addr, "GET", &format!("/{late}/server/8001/x"), &h).await;
    assert_eq!(a.status, 502, "{}", String::from_utf8_lossy(&a.body));
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    // a project this host never ran is not created by a proxy request
    let a = call(b.addr, "GET", &format!("/{unknown}/server/8000/x"), &h).await;
    assert_eq!(a.status, 503);
    assert!(!b.host.is_known(unknown));
    // and without the setting, a stopped project is a 503 (the other tests' default)
    b.stop.cancel();
    b.task.await.unwrap();
    let b = bed(|_| {}).await;
    b.sim.units.listen(known, 8000, backend);
    b.host.start(known, None).await.unwrap();
    b.host.stop(known, false).await.unwrap();
    let a = call(b.addr, "GET", &format!("/{known}/server/8000/x"), &h).await;
    assert_eq!(a.status, 503);
    assert!(!b.host.is_running(known));
    b.stop.cancel();
    b.task.await.unwrap();
}
