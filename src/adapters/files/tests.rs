//! The file server in process over the simulated backend (homes are real directories of the
//! test): statuses, headers and bodies of every method. The proxy's routing and auth are its own
//! tests'; btrfs quotas, ownership inside a container and the attacks from inside a project are
//! the e2e suite's (`tests/e2e/files.rs`).
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

use crate::backends::sim::Sim;
use crate::config::Settings;
use crate::core::Host;
use crate::domain::project::ProjectId;

struct Bed {
    addr: std::net::SocketAddr,
    id: ProjectId,
    home: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A host over the simulation with one project (started and stopped: it has a home), and a
/// plain HTTP server handing every `/<id>/files/<rest>` to the handler.
async fn bed() -> Bed {
    let dir = std::env::temp_dir().join(format!("cph-files-{}", uuid::Uuid::new_v4()));
    let sim = Sim::new();
    sim.storage.set_files_dir(dir.clone());
    let host = Host::with_backends(Settings::default(), sim.backends())
        .await
        .unwrap();
    let id: ProjectId = "6f1c2d3e-0000-4000-8000-000000000001".parse().unwrap();
    host.start(id, None).await.unwrap();
    host.stop(id, false).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let host = host.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let host = host.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let prefix = format!("/{id}/files/");
                        let rest = path.strip_prefix(&prefix).unwrap_or("").to_string();
                        Ok::<_, std::convert::Infallible>(
                            super::handle(&host, id, &rest, req).await,
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let home = dir.join(format!("project-{id}"));
    std::fs::create_dir_all(&home).unwrap();
    Bed {
        addr,
        id,
        home,
        dir,
    }
}

struct Answer {
    status: StatusCode,
    headers: hyper::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
    fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_string()
    }
    fn header(&self, n: &str) -> &str {
        self.headers.get(n).map_or("", |v| v.to_str().unwrap())
    }
}

impl Bed {
    async fn call(
        &self,
        method: &str,
        rest: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Answer {
        let s = TcpStream::connect(self.addr).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut b = Request::builder()
            .method(method)
            .uri(format!("/{}/files/{rest}", self.id))
            .header("host", "test");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let r = tx
            .send_request(b.body(Full::new(Bytes::copy_from_slice(body))).unwrap())
            .await
            .unwrap();
        let (parts, body) = r.into_parts();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }
    async fn get(&self, rest: &str) -> Answer {
        self.call("GET", rest, &[], b"").await
    }
}

#[tokio::test]
async fn put_get_ranges_list_delete_and_mkdir() {
    let b = bed().await;
    let a = b.call("PUT", "d/e/f.txt", &[], b"0123456789").await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(a.json()["path"], "d/e/f.txt");
    assert_eq!(a.json()["size"], 10);
    assert_eq!(
        std::fs::read(b.home.join("d/e/f.txt")).unwrap(),
        b"0123456789"
    );
    let a = b.call("PUT", "d/e/f.txt", &[], b"abcdefghij").await;
    assert_eq!(a.status, StatusCode::OK, "replaced");

    let a = b.get("d/e/f.txt").await;
    assert_eq!(
        (a.status, &a.body[..]),
        (StatusCode::OK, &b"abcdefghij"[..])
    );
    assert_eq!(a.header("content-type"), "text/plain");
    assert_eq!(a.header("content-length"), "10");
    assert_eq!(a.header("content-security-policy"), "sandbox");
    let etag = a.header("etag").to_string();
    let a = b
        .call("GET", "d/e/f.txt", &[("range", "bytes=2-4")], b"")
        .await;
    assert_eq!(
        (a.status, &a.body[..]),
        (StatusCode::PARTIAL_CONTENT, &b"cde"[..])
    );
    assert_eq!(a.header("content-range"), "bytes 2-4/10");
    let a = b
        .call("GET", "d/e/f.txt", &[("range", "bytes=-3")], b"")
        .await;
    assert_eq!(&a.body[..], b"hij");
    let a = b
        .call("GET", "d/e/f.txt", &[("range", "bytes=10-")], b"")
        .await;
    assert_eq!(a.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        (a.code().as_str(), a.header("content-range")),
        ("range_not_satisfiable", "bytes */10")
    );
    let a = b
        .call("GET", "d/e/f.txt", &[("if-none-match", &etag)], b"")
        .await;
    assert_eq!((a.status, a.body.len()), (StatusCode::NOT_MODIFIED, 0));
    let a = b.call("HEAD", "d/e/f.txt", &[], b"").await;
    assert_eq!((a.status, a.body.len()), (StatusCode::OK, 0));
    assert_eq!(a.header("content-length"), "10");

    let a = b.get("d").await;
    assert_eq!(a.status, StatusCode::OK);
    let v = a.json();
    assert_eq!(
        (v["path"].as_str(), v["entries"][0]["name"].as_str()),
        (Some("d"), Some("e"))
    );
    assert_eq!(v["entries"][0]["type"], "dir");
    let a = b.call("GET", "d/?format=html", &[], b"").await;
    assert!(a.header("content-type").starts_with("text/html"));
    assert!(String::from_utf8_lossy(&a.body).contains("href=\"e/\""));

    let a = b.call("POST", "x/y?mkdir", &[], b"").await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(a.json()["type"], "dir");
    assert_eq!(
        b.call("POST", "x/y?mkdir", &[], b"").await.status,
        StatusCode::OK
    );
    assert_eq!(
        b.call("POST", "d/e/f.txt?mkdir", &[], b"").await.code(),
        "already_exists"
    );
    assert_eq!(
        b.call("DELETE", "x", &[], b"").await.code(),
        "directory_not_empty"
    );
    assert_eq!(
        b.call("DELETE", "x/y", &[], b"").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        b.call("DELETE", "d/e/f.txt", &[], b"").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(b.get("d/e/f.txt").await.code(), "not_found");
    assert!(
        std::fs::read_dir(b.home.join("d/e"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[tokio::test]
async fn refusals_are_clear_and_change_nothing() {
    let b = bed().await;
    std::os::unix::fs::symlink("/etc", b.home.join("etc")).unwrap();
    std::fs::create_dir_all(b.dir.join(format!(".snapshots/project-{}/s1", b.id))).unwrap();
    std::fs::write(
        b.dir.join(format!(".snapshots/project-{}/s1/old", b.id)),
        b"old",
    )
    .unwrap();
    let cases: &[(&str, &str, u16, &str)] = &[
        ("GET", "etc/passwd", 403, "path_escapes"),
        ("PUT", "etc/planted", 403, "path_escapes"),
        ("GET", "a/../../x", 400, "invalid_path"),
        ("GET", "nothing", 404, "not_found"),
        ("PUT", "", 409, "is_directory"),
        ("DELETE", "", 400, "invalid_path"),
        ("PUT", ".snapshots/s1/old", 403, "read_only"),
        ("DELETE", ".snapshots/s1", 403, "read_only"),
        ("POST", ".snapshots/n?mkdir", 403, "read_only"),
        ("POST", "x", 405, "method_not_allowed"),
        ("PATCH", "x", 405, "method_not_allowed"),
        ("GET", "?format=xml", 400, "invalid_path"),
    ];
    for (m, p, status, code) in cases {
        let a = b.call(m, p, &[], b"data").await;
        assert_eq!(
            (a.status.as_u16(), a.code().as_str()),
            (*status, *code),
            "{m} {p}"
        );
    }
    assert_eq!(
        b.call("PATCH", "x", &[], b"").await.header("allow"),
        "GET, HEAD, PUT, DELETE, POST"
    );
    assert!(!std::path::Path::new("/etc/planted").exists());
    assert_eq!(&b.get(".snapshots/s1/old").await.body[..], b"old");
    // nothing was left behind by the refused writes
    let left: Vec<_> = std::fs::read_dir(&b.home)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["etc"]);
}
