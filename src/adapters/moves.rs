//! The HTTP side of moves (docs/moves.md): the source's request body and its connections to the
//! target (each stream a `POST /projects/:id/receive/:move`, the move's state a `GET` and its
//! cancel a `DELETE` there), and the target's reading of a stream's body into the core.
use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::{BodyExt as _, Empty, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use crate::core::moves::{MoveRequest, Sender};
use crate::domain::moves::{MoveId, TargetState};
use crate::domain::project::ProjectId;

/// `POST /projects/:id/move` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveBody {
    /// the target host's API, `http://host:port`
    pub target: String,
    /// the master's move token for the target
    pub token: String,
    /// start the project on the target
    #[serde(default)]
    pub start: bool,
}

/// A target's address: `http://<host>:<port>[/]` only (no path, query or user info).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port`
    pub authority: String,
}

/// Parses a target URL.
pub fn parse_target(s: &str) -> Result<Target, String> {
    let bad = |why: &str| format!("target {s:?}: {why} (expected http://host:port)");
    let uri: hyper::Uri = s.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("the scheme must be http"));
    }
    let a = uri.authority().ok_or_else(|| bad("no host"))?;
    if a.as_str().contains('@') || a.port_u16().is_none() || a.host().is_empty() {
        return Err(bad("host and port required, no user info"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("no path or query"));
    }
    Ok(Target {
        authority: a.as_str().to_string(),
    })
}

impl MoveBody {
    /// The core's request, with the target checked.
    pub fn into_request(self) -> Result<(MoveRequest, Target), String> {
        let t = parse_target(&self.target)?;
        if self.token.is_empty()
            || self.token.len() > crate::auth::MAX_TOKEN_LEN
            || !self.token.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err("token: expected the master's move token for the target".into());
        }
        Ok((
            MoveRequest {
                target: self.target,
                token: self.token,
                start: self.start,
            },
            t,
        ))
    }
}

/// Sends a move's stream over plain HTTP/1.1 (chunked) to the target.
#[derive(Debug)]
pub struct HttpSender {
    /// the target
    pub target: Target,
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
        let tcp = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            tokio::net::TcpStream::connect(&self.target.authority),
        )
        .await
        .map_err(|_| format!("cannot connect to {}: timed out", self.target.authority))?
        .map_err(|e| format!("cannot connect to {}: {e}", self.target.authority))?;
        let _ = tcp.set_nodelay(true);
        watch_peer(&tcp, self.stall)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        let conn = tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(format!("/projects/{id}/receive/{mv}"))
            .header(hyper::header::HOST, &self.target.authority)
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
            .body(body)
            .map_err(|e| e.to_string())?;
        // the answer to a whole stream comes once the target received (and maybe placed) it
        let resp = tokio::time::timeout(
            std::time::Duration::from_secs(3600),
            sender.send_request(req),
        )
        .await
        .map_err(|_| format!("no answer from {}", self.target.authority))?
        .map_err(|e| {
            let cause = std::error::Error::source(&e).map_or(String::new(), |c| format!(" ({c})"));
            format!(
                "the connection to {} broke: {e}{cause}",
                self.target.authority
            )
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
pub fn sender(target: Target, stall: std::time::Duration) -> Arc<dyn Sender> {
    Arc::new(HttpSender { target, stall })
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
        assert_eq!(
            parse_target("http://10.213.0.2:9002").unwrap().authority,
            "10.213.0.2:9002"
        );
        assert!(parse_target("http://h:1/").is_ok());
        for bad in [
            "",
            "ftp://h:1",
            "http://h",
            "http://u@h:1",
            "http://h:1/x",
            "http://h:1/?a=b",
            "https://h:1",
            "h:1",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }
}
