//! The master's HTTP API as the host calls it (`ports::Master`): JSON over HTTP/1 (hyper), one
//! connection per call, TLS by rustls (ring). The master's certificate must chain to
//! `master.ca_file` (else the system's CAs) and name the URL's host, or, with
//! `master.pin_sha256`, be exactly the pinned certificate (its SHA-256 over the DER). The
//! credential (`Authorization: Bearer …`) comes from the systemd credential `master-credential`.
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest as _, Sha256};
use tokio_rustls::rustls;

use crate::api::master::{Heartbeat, ProjectStates, Register, RegisterAnswer, ReportAnswer};
use crate::config::{MasterSettings, MasterUrl, parse_pin, parse_url};
use crate::ports::{Master, MasterError};

/// Name of the systemd credential the host presents to the master.
pub const CREDENTIAL: &str = "master-credential";
/// The system's CA bundle (Debian's), when no `master.ca_file` is set.
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";
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

/// Accepts exactly the pinned certificate (the chain and name are not looked at: the pin
/// says which certificate the master has), then checks the handshake's signatures as usual.
#[derive(Debug)]
struct Pinned {
    pin: [u8; 32],
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if bool::from(subtle::ConstantTimeEq::ct_eq(&got[..], &self.pin[..])) {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the master's certificate (SHA-256 {}) is not the pinned one (master.pin_sha256)",
                hex(&got)
            )))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The TLS client config `settings` ask for.
fn tls_config(m: &MasterSettings) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    if let Some(pin) = &m.pin_sha256 {
        let pin = parse_pin(pin)?;
        let verifier = Pinned {
            pin,
            algs: provider.signature_verification_algorithms,
        };
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth());
    }
    let file = m
        .ca_file
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from(SYSTEM_CAS));
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&file)
        .map_err(|e| format!("cannot read CA file {}: {e}", file.display()))?;
    for c in certs {
        let c = c.map_err(|e| format!("CA file {}: {e}", file.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("CA file {}: {e}", file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("CA file {} holds no certificate", file.display()));
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
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
                let name = ServerName::try_from(self.url.host.clone())
                    .map_err(|e| un("server name", &e))?;
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

    #[test]
    fn the_pin_is_the_certificates_sha256() {
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        let der = CertificateDer::from(vec![1u8, 2, 3]);
        let pin: [u8; 32] = Sha256::digest([1u8, 2, 3]).into();
        let v = Pinned { pin, algs };
        use rustls::client::danger::ServerCertVerifier as _;
        let name = ServerName::try_from("m.example").unwrap();
        assert!(
            v.verify_server_cert(&der, &[], &name, &[], UnixTime::now())
                .is_ok()
        );
        let other = CertificateDer::from(vec![1u8, 2, 4]);
        let e = v
            .verify_server_cert(&other, &[], &name, &[], UnixTime::now())
            .unwrap_err();
        assert!(e.to_string().contains("pinned"), "{e}");
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
