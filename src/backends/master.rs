//! The master's HTTP API as the host calls it (`ports::Master`): JSON over HTTP/1 (hyper), one
//! connection per call, TLS by rustls (`backends::tls_client`, shared with moves). The master's
//! certificate must chain to `master.ca_file` (else the system's CAs) and name the URL's host, or,
//! with `master.pin_sha256`, be exactly the pinned certificate (its SHA-256 over the DER). The
//! credential (`Authorization: Bearer …`) comes from the systemd credential `master-credential`.
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio_rustls::rustls;

use super::tls_client::{self, Trust};
use crate::api::master::{Heartbeat, ProjectStates, Register, RegisterAnswer, ReportAnswer};
use crate::config::{MasterSettings, MasterUrl, parse_pin, parse_url};
use crate::ports::{Master, MasterError};

/// Name of the systemd credential the host presents to the master.
pub const CREDENTIAL: &str = "master-credential";
/// One call, connect to answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest answer read.
const MAX_ANSWER: usize = 1 << 20;

/// Reads the credential from `$CREDENTIALS_DIRECTORY/master-credential`: its first line that is
/// neither empty nor a `#` comment (the unit's fallback is a comment). `Err`: why there is none.
pub fn load_credential() -> Result<String, String> {
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")
        .ok_or("no $CREDENTIALS_DIRECTORY (not started by systemd with LoadCredential=)")?;
    let path = std::path::Path::new(&dir).join(CREDENTIAL);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .ok_or_else(|| {
            format!(
                "{} is empty (install /etc/cocalc-project-host/{CREDENTIAL})",
                path.display()
            )
        })
}

/// The TLS client config `settings` ask for (`backends::tls_client`): the pin, else the CA
/// file, else the system's CAs.
fn tls_config(m: &MasterSettings) -> Result<rustls::ClientConfig, String> {
    let trust = match &m.pin_sha256 {
        Some(pin) => Trust::Pin {
            sha256: parse_pin(pin)?,
            source: "master.pin_sha256",
        },
        None => Trust::Cas(m.ca_file.clone()),
    };
    tls_client::config(&trust)
}

/// The master over HTTP(S).
#[derive(Clone)]
pub struct HttpMaster {
    url: MasterUrl,
    tls: Option<tokio_rustls::TlsConnector>,
    credential: Arc<str>,
}

impl std::fmt::Debug for HttpMaster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never the credential
        f.debug_struct("HttpMaster")
            .field("url", &self.url)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl HttpMaster {
    /// The client `[master]` describes (its `url` must be set), presenting `credential`.
    pub fn new(m: &MasterSettings, credential: String) -> Result<HttpMaster, String> {
        let url = parse_url(m.url.as_deref().ok_or("no master.url")?)?;
        let tls = if url.tls {
            Some(tokio_rustls::TlsConnector::from(Arc::new(tls_config(m)?)))
        } else {
            None
        };
        Ok(HttpMaster {
            url,
            tls,
            credential: credential.into(),
        })
    }

    async fn post<A: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<A, MasterError> {
        match tokio::time::timeout(CALL_TIMEOUT, self.post_now(path, body)).await {
            Ok(r) => r,
            Err(_) => Err(MasterError::Unreachable(format!(
                "no answer within {}s",
                CALL_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn post_now<A: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<A, MasterError> {
        let un = |what: &str, e: &dyn std::fmt::Display| {
            MasterError::Unreachable(format!("{what}: {e}"))
        };
        let json = serde_json::to_vec(body).map_err(|e| un("encoding", &e))?;
        let tcp = tokio::net::TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|e| un("connect", &e))?;
        let host = if self.url.host.contains(':') {
            format!("[{}]:{}", self.url.host, self.url.port)
        } else {
            format!("{}:{}", self.url.host, self.url.port)
        };
        let req = hyper::Request::post(format!("{}{path}", self.url.path))
            .header(hyper::header::HOST, host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.credential),
            )
            .body(Full::new(Bytes::from(json)))
            .map_err(|e| un("request", &e))?;
        let resp = match &self.tls {
            Some(tls) => {
                let name =
                    tls_client::server_name(&self.url.host).map_err(|e| un("server name", &e))?;
                let stream = tls.connect(name, tcp).await.map_err(|e| un("TLS", &e))?;
                send(TokioIo::new(stream), req).await?
            }
            None => send(TokioIo::new(tcp), req).await?,
        };
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| un("reading the answer", &e))?
            .to_bytes();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes);
            return Err(MasterError::Refused {
                status: status.as_u16(),
                message: text.chars().take(200).collect(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| un("the answer is not the protocol's JSON", &e))
    }
}

async fn send<S>(
    io: TokioIo<S>,
    req: hyper::Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, MasterError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| MasterError::Unreachable(format!("HTTP: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "master connection ended");
        }
    });
    sender
        .send_request(req)
        .await
        .map_err(|e| MasterError::Unreachable(format!("HTTP: {e}")))
}

/// The empty JSON object a heartbeat is answered with (anything else is ignored).
#[derive(Debug, serde::Deserialize)]
struct Ignored {}

#[async_trait]
impl Master for HttpMaster {
    async fn register(&self, msg: &Register) -> Result<RegisterAnswer, MasterError> {
        self.post("/register", msg).await
    }
    async fn heartbeat(&self, msg: &Heartbeat) -> Result<(), MasterError> {
        self.post::<Ignored>("/heartbeat", msg).await.map(drop)
    }
    async fn report(&self, msg: &ProjectStates) -> Result<ReportAnswer, MasterError> {
        self.post("/project-state", msg).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_that_cannot_work_are_refused_at_setup() {
        let mut m = MasterSettings {
            url: Some("https://127.0.0.1:9".into()),
            ..Default::default()
        };
        m.ca_file = Some("/no/such/ca.pem".into());
        let e = HttpMaster::new(&m, "c".into()).unwrap_err();
        assert!(e.contains("/no/such/ca.pem"), "{e}");
        let empty = std::env::temp_dir().join(format!("cph-empty-ca-{}", std::process::id()));
        std::fs::write(&empty, "not a certificate\n").unwrap();
        m.ca_file = Some(empty.clone());
        let e = HttpMaster::new(&m, "c".into()).unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
        std::fs::remove_file(&empty).unwrap();
        // a pin needs no CA file; plain http to loopback needs no TLS at all
        m.ca_file = None;
        m.pin_sha256 = Some("ab".repeat(32));
        let c = HttpMaster::new(&m, "secret-credential".into()).unwrap();
        assert!(!format!("{c:?}").contains("secret"), "never the credential");
        m.url = Some("http://127.0.0.1:9".into());
        assert!(HttpMaster::new(&m, "c".into()).unwrap().tls.is_none());
    }

    #[tokio::test]
    async fn a_master_that_is_not_there_is_unreachable_not_a_panic() {
        let m = MasterSettings {
            url: Some("http://127.0.0.1:1".into()),
            ..Default::default()
        };
        let c = HttpMaster::new(&m, "c".into()).unwrap();
        let e = c
            .report(&ProjectStates {
                host_id: "h".into(),
                session_id: "s".into(),
                reports: vec![],
            })
            .await
            .unwrap_err();
        assert!(
            matches!(e, MasterError::Unreachable(ref m) if m.contains("connect")),
            "{e}"
        );
    }
}
