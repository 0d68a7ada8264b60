//! The HTTP side of moves (docs/moves.md): the source's request body and its connections to the
//! target (each stream a `POST /projects/:id/receive/:move`, the move's state a `GET` and its
//! cancel a `DELETE` there), and the target's reading of a stream's body into the core.
use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::{BodyExt as _, Empty, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::backends::tls_client::{self, Trust};
use crate::core::moves::{MoveRequest, Sender};
use crate::domain::moves::{MoveId, TargetState};
use crate::domain::project::ProjectId;

/// `POST /projects/:id/move` body (also D-Bus `MoveProjectWith`'s JSON argument).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MoveBody {
    /// the target host's API, `https://host:port` (or `http://` to loopback, or anywhere with
    /// `moves.allow_http`)
    pub target: String,
    /// the master's move token for the target
    pub token: String,
    /// start the project on the target
    #[serde(default)]
    pub start: bool,
    /// SHA-256 of the target's certificate (`master.pin_sha256`'s format): only that
    /// certificate is accepted (wins over `moves.pin_sha256`; https targets only)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_sha256: Option<String>,
}

/// A target's address: `https://<host>:<port>[/]` or `http://…` (no path, query or user info).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port` as in the URL (IPv6 hosts in brackets)
    pub authority: String,
    /// the host, without brackets
    pub host: String,
    /// `https://`
    pub https: bool,
}

impl Target {
    /// `localhost`, 127.0.0.0/8 or ::1.
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|a| a.to_canonical().is_loopback())
    }
}

/// Parses a target URL.
pub fn parse_target(s: &str) -> Result<Target, String> {
    let bad = |why: &str| format!("target {s:?}: {why} (expected https://host:port)");
    let uri: hyper::Uri = s.parse().map_err(|_| bad("not a URL"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(bad("the scheme must be https (or http)")),
    };
    let a = uri.authority().ok_or_else(|| bad("no host"))?;
    if a.as_str().contains('@') || a.port_u16().is_none() || a.host().is_empty() {
        return Err(bad("host and port required, no user info"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("no path or query"));
    }
    Ok(Target {
        authority: a.as_str().to_string(),
        host: a
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        https,
    })
}

/// Where and how the source connects: the target, and TLS to it unless plain HTTP was allowed.
#[derive(Clone)]
pub struct Link {
    /// the target
    pub target: Target,
    /// TLS, for an `https://` target
    pub tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("target", &self.target)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// How the certificate of an `https://` target is checked: the request's pin, else
/// `moves.pin_sha256`, else a chain to `moves.ca_file` (or the system's CAs) naming the host.
/// `Err` for a plain `http://` target that is neither loopback nor allowed by
/// `moves.allow_http`, or a pin with it.
pub fn trust(
    t: &Target,
    pin: Option<&str>,
    m: &crate::config::MoveSettings,
) -> Result<Option<Trust>, String> {
    let pin = pin
        .map(|p| crate::config::parse_pin(p).map_err(|e| format!("pin_sha256: {e}")))
        .transpose()?;
    if !t.https {
        if pin.is_some() {
            return Err(format!(
                "pin_sha256: a pin needs an https:// target, not {}",
                t.authority
            ));
        }
        if !t.is_loopback() && !m.allow_http {
            return Err(format!(
                "target http://{}: plain HTTP would carry the project's files in clear text to \
                 a host that is not loopback; use https:// (the target's http.tls_cert and \
                 http.tls_key, with pin_sha256 or a CA), or set moves.allow_http = true on this \
                 host for a trusted network",
                t.authority
            ));
        }
        return Ok(None);
    }
    Ok(Some(match (pin, &m.pin_sha256) {
        (Some(sha256), _) => Trust::Pin {
            sha256,
            source: "the move's pin_sha256",
        },
        (None, Some(p)) => Trust::Pin {
            sha256: crate::config::parse_pin(p).map_err(|e| format!("moves.pin_sha256: {e}"))?,
            source: "moves.pin_sha256",
        },
        (None, None) => Trust::Cas(m.ca_file.clone()),
    }))
}

impl MoveBody {
    /// The core's request and the link to the target, checked against `moves`' settings.
    pub fn into_request(
        self,
        m: &crate::config::MoveSettings,
    ) -> Result<(MoveRequest, Link), String> {
        let t = parse_target(&self.target)?;
        if self.token.is_empty()
            || self.token.len() > crate::auth::MAX_TOKEN_LEN
            || !self.token.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err("token: expected the master's move token for the target".into());
        }
        let tls = match trust(&t, self.pin_sha256.as_deref(), m)? {
            Some(trust) => Some(tls_client::connector(&trust).map_err(|e| format!("moves: {e}"))?),
            None => None,
        };
        Ok((
            MoveRequest {
                target: self.target,
                token: self.token,
                start: self.start,
            },
            Link { target: t, tls },
        ))
    }
}

/// Sends a move's stream over HTTP/1.1 (chunked) to the target, in TLS for an `https://` one.
#[derive(Debug)]
pub struct HttpSender {
    /// the target and TLS to it
    pub link: Link,
    /// `moves.stall_timeout`: a connection whose peer acknowledges nothing for this long is
    /// dead (TCP keepalive and user timeout on its socket)
    pub stall: std::time::Duration,
}

/// Makes the kernel end a connection to the target whose peer acknowledges nothing for `stall`
/// (a cut network), also while the source only waits for the answer to a whole stream (the
/// target may work long on it, but its kernel answers keepalive probes meanwhile): keepalive
/// probes after `stall / 2` idle, every `stall / 4`, and `TCP_USER_TIMEOUT` = `stall`.
pub fn watch_peer(tcp: &tokio::net::TcpStream, stall: std::time::Duration) -> Result<(), String> {
    use nix::sys::socket::{setsockopt, sockopt};
    let secs = |d: std::time::Duration| (d.as_secs() as u32).max(1);
    let e = |what: &str, e: nix::Error| format!("setting {what} on the connection: {e}");
    setsockopt(tcp, sockopt::KeepAlive, &true).map_err(|x| e("SO_KEEPALIVE", x))?;
    setsockopt(tcp, sockopt::TcpKeepIdle, &secs(stall / 2)).map_err(|x| e("TCP_KEEPIDLE", x))?;
    setsockopt(tcp, sockopt::TcpKeepInterval, &secs(stall / 4))
        .map_err(|x| e("TCP_KEEPINTVL", x))?;
    setsockopt(tcp, sockopt::TcpKeepCount, &3).map_err(|x| e("TCP_KEEPCNT", x))?;
    setsockopt(
        tcp,
        sockopt::TcpUserTimeout,
        &(stall.as_millis().min(u32::MAX as u128) as u32),
    )
    .map_err(|x| e("TCP_USER_TIMEOUT", x))?;
    Ok(())
}

impl HttpSender {
    /// One request to the target's receive endpoint for the move; (status, body text).
    async fn call<B>(
        &self,
        method: hyper::Method,
        id: ProjectId,
        mv: MoveId,
        token: &str,
        body: B,
    ) -> Result<(StatusCode, String), String>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let target = &self.link.target;
        let tcp = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            tokio::net::TcpStream::connect(&target.authority),
        )
        .await
        .map_err(|_| format!("cannot connect to {}: timed out", target.authority))?
        .map_err(|e| format!("cannot connect to {}: {e}", target.authority))?;
        let _ = tcp.set_nodelay(true);
        // on the TCP socket under TLS too: the kernel watches the peer either way
        watch_peer(&tcp, self.stall)?;
        let req = Request::builder()
            .method(method)
            .uri(format!("/projects/{id}/receive/{mv}"))
            .header(hyper::header::HOST, &target.authority)
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
            .body(body)
            .map_err(|e| e.to_string())?;
        match &self.link.tls {
            None => exchange(TokioIo::new(tcp), req, &target.authority).await,
            Some(tls) => {
                let name = tls_client::server_name(&target.host)?;
                let stream = tokio::time::timeout(
                    std::time::Duration::from_secs(30),
                    tls.connect(name, tcp),
                )
                .await
                .map_err(|_| format!("TLS handshake with {}: timed out", target.authority))?
                .map_err(|e| format!("TLS handshake with {}: {e}", target.authority))?;
                exchange(TokioIo::new(stream), req, &target.authority).await
            }
        }
    }
}

/// One request over an open connection (plain or TLS) to `authority`; (status, body text).
async fn exchange<I, B>(
    io: I,
    req: Request<B>,
    authority: &str,
) -> Result<(StatusCode, String), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    // the answer to a whole stream comes once the target received (and maybe placed) it
    let resp = tokio::time::timeout(
        std::time::Duration::from_secs(3600),
        sender.send_request(req),
    )
    .await
    .map_err(|_| format!("no answer from {authority}"))?
    .map_err(|e| {
        let cause = std::error::Error::source(&e).map_or(String::new(), |c| format!(" ({c})"));
        format!("the connection to {authority} broke: {e}{cause}")
    })?;
    let status = resp.status();
    let text = match tokio::time::timeout(
        std::time::Duration::from_secs(30),
        resp.into_body().collect(),
    )
    .await
    {
        Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes())
            .chars()
            .take(2000)
            .collect(),
        _ => String::new(),
    };
    conn.abort();
    Ok((status, text))
}

#[async_trait::async_trait]
impl Sender for HttpSender {
    async fn send(
        &self,
        id: ProjectId,
        mv: MoveId,
        token: &str,
        body: tokio::sync::mpsc::Receiver<Vec<u8>>,
    ) -> Result<(), String> {
        let stream = futures_util::stream::unfold(body, |mut rx| async move {
            rx.recv()
                .await
                .map(|c| (Ok::<_, Infallible>(Frame::data(Bytes::from(c))), rx))
        });
        let (status, text) = self
            .call(hyper::Method::POST, id, mv, token, StreamBody::new(stream))
            .await?;
        if status == StatusCode::OK {
            Ok(())
        } else {
            Err(format!("{status}: {text}"))
        }
    }

    async fn state(&self, id: ProjectId, mv: MoveId, token: &str) -> Result<TargetState, String> {
        let (status, text) = self
            .call(hyper::Method::GET, id, mv, token, Empty::<Bytes>::new())
            .await?;
        if status != StatusCode::OK {
            return Err(format!("{status}: {text}"));
        }
        serde_json::from_str(&text).map_err(|e| format!("the target's move state: {e}"))
    }

    async fn abort(&self, id: ProjectId, mv: MoveId, token: &str) -> Result<(), String> {
        let (status, text) = self
            .call(hyper::Method::DELETE, id, mv, token, Empty::<Bytes>::new())
            .await?;
        if status == StatusCode::OK {
            Ok(())
        } else {
            Err(format!("{status}: {text}"))
        }
    }
}

/// Feeds a request body into the core's channel, chunk by chunk; an `Err` when the connection
/// breaks before the body's end.
pub fn pump(body: Incoming) -> tokio::sync::mpsc::Receiver<Result<Vec<u8>, String>> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        let mut body = body;
        loop {
            match body.frame().await {
                None => return,
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data()
                        && tx.send(Ok(d.to_vec())).await.is_err()
                    {
                        return;
                    }
                }
                Some(Err(e)) => {
                    let _ = tx.send(Err(e.to_string())).await;
                    return;
                }
            }
        }
    });
    rx
}

/// The bearer token of an `Authorization` header (already authenticated by the router).
pub fn bearer(h: Option<&hyper::header::HeaderValue>) -> Option<String> {
    let s = h?.to_str().ok()?;
    let (scheme, t) = s.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| t.trim_matches(' ').to_string())
}

/// A shared sender for the core; `stall`: `moves.stall_timeout`.
pub fn sender(link: Link, stall: std::time::Duration) -> Arc<dyn Sender> {
    Arc::new(HttpSender { link, stall })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_to_the_target_is_watched_by_the_kernel() {
        use nix::sys::socket::{getsockopt, sockopt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        watch_peer(&tcp, std::time::Duration::from_secs(8)).unwrap();
        assert!(getsockopt(&tcp, sockopt::KeepAlive).unwrap());
        assert_eq!(getsockopt(&tcp, sockopt::TcpKeepIdle).unwrap(), 4);
        assert_eq!(getsockopt(&tcp, sockopt::TcpKeepInterval).unwrap(), 2);
        assert_eq!(getsockopt(&tcp, sockopt::TcpKeepCount).unwrap(), 3);
        assert_eq!(getsockopt(&tcp, sockopt::TcpUserTimeout).unwrap(), 8000);
        // a short stall still probes every second at most
        watch_peer(&tcp, std::time::Duration::from_secs(1)).unwrap();
        assert_eq!(getsockopt(&tcp, sockopt::TcpKeepInterval).unwrap(), 1);
    }

    #[test]
    fn targets() {
        let t = parse_target("https://10.213.0.2:9002").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.host.as_str(), t.https),
            ("10.213.0.2:9002", "10.213.0.2", true)
        );
        let t = parse_target("http://[::1]:9002/").unwrap();
        assert_eq!((t.host.as_str(), t.https), ("::1", false));
        assert!(t.is_loopback());
        for (u, lo) in [
            ("http://127.0.0.1:1", true),
            ("http://127.9.9.9:1", true),
            ("http://LOCALHOST:1", true),
            ("http://[::ffff:127.0.0.1]:1", true),
            ("http://10.0.0.1:1", false),
            ("http://h.example:1", false),
            ("http://[::2]:1", false),
        ] {
            assert_eq!(parse_target(u).unwrap().is_loopback(), lo, "{u}");
        }
        for bad in [
            "",
            "ftp://h:1",
            "http://h",
            "https://h",
            "http://u@h:1",
            "https://u:p@h:1",
            "http://h:1/x",
            "https://h:1/?a=b",
            "h:1",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }

    fn body(target: &str, pin: Option<&str>) -> MoveBody {
        MoveBody {
            target: target.into(),
            token: "t".into(),
            start: true,
            pin_sha256: pin.map(str::to_string),
        }
    }

    #[test]
    fn plain_http_goes_only_to_loopback_unless_allowed() {
        let mut m = crate::config::MoveSettings::default();
        let (_, l) = body("http://127.0.0.1:9002", None)
            .into_request(&m)
            .unwrap();
        assert!(l.tls.is_none());
        let e = body("http://10.213.0.2:9002", None)
            .into_request(&m)
            .unwrap_err();
        assert!(
            e.contains("clear text") && e.contains("https://") && e.contains("moves.allow_http"),
            "{e}"
        );
        m.allow_http = true;
        let (r, l) = body("http://10.213.0.2:9002", None)
            .into_request(&m)
            .unwrap();
        assert!(l.tls.is_none());
        assert_eq!(r.target, "http://10.213.0.2:9002");
        // a pin means TLS: never with plain http
        let e = body("http://127.0.0.1:9002", Some(&"ab".repeat(32)))
            .into_request(&m)
            .unwrap_err();
        assert!(e.contains("https"), "{e}");
    }

    #[test]
    fn https_trusts_the_requests_pin_then_the_configured_one_then_the_cas() {
        let mut m = crate::config::MoveSettings::default();
        let t = parse_target("https://10.213.0.2:9002").unwrap();
        let ab = "ab".repeat(32);
        let cd = "cd:".repeat(31) + "cd";
        assert_eq!(trust(&t, None, &m).unwrap(), Some(Trust::Cas(None)));
        m.ca_file = Some("/etc/x/ca.pem".into());
        assert_eq!(
            trust(&t, None, &m).unwrap(),
            Some(Trust::Cas(Some("/etc/x/ca.pem".into())))
        );
        m.ca_file = None;
        m.pin_sha256 = Some(ab.clone());
        assert_eq!(
            trust(&t, None, &m).unwrap(),
            Some(Trust::Pin {
                sha256: [0xab; 32],
                source: "moves.pin_sha256"
            })
        );
        // the body wins
        assert_eq!(
            trust(&t, Some(&cd), &m).unwrap(),
            Some(Trust::Pin {
                sha256: [0xcd; 32],
                source: "the move's pin_sha256"
            })
        );
        // a pin that is not one: a clear 400, not a connection
        for bad in ["", "abcd", &"zz".repeat(32), &"ab".repeat(33)] {
            let e = body("https://10.213.0.2:9002", Some(bad))
                .into_request(&m)
                .unwrap_err();
            assert!(
                e.contains("pin_sha256") && e.contains("64 hex"),
                "{bad}: {e}"
            );
        }
        let (_, l) = body("https://10.213.0.2:9002", Some(&ab))
            .into_request(&m)
            .unwrap();
        assert!(l.tls.is_some());
        // an unreadable CA file is said, before anything is sent
        m.pin_sha256 = None;
        m.ca_file = Some("/no/such/ca.pem".into());
        let e = body("https://10.213.0.2:9002", None)
            .into_request(&m)
            .unwrap_err();
        assert!(e.contains("/no/such/ca.pem"), "{e}");
    }

    #[test]
    fn the_body_takes_a_pin_and_nothing_unknown() {
        let b: MoveBody =
            serde_json::from_str(r#"{"target":"https://h:1","token":"t","pin_sha256":"ab"}"#)
                .unwrap();
        assert_eq!(b.pin_sha256.as_deref(), Some("ab"));
        assert!(
            serde_json::from_str::<MoveBody>(r#"{"target":"h","token":"t","pin":"ab"}"#).is_err()
        );
        // the D-Bus argument is the same JSON
        let back: MoveBody = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        assert_eq!(back.pin_sha256.as_deref(), Some("ab"));
    }
}
