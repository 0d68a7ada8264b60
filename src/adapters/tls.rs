//! Optional TLS on the proxy listener (`proxy.tls_cert`, `proxy.tls_key`: PEM files) and on the
//! API's host-to-host connections (`http.tls_cert`, `http.tls_key`, `adapters::http`), with
//! rustls (ring provider, TLS 1.2 and 1.3, ALPN `http/1.1`). The files are re-read on SIGHUP; a
//! reload that fails keeps the configuration in force (and says why in the journal).
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The certificate and key in force, swapped whole on reload.
#[derive(Debug)]
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    config: RwLock<Arc<rustls::ServerConfig>>,
}

/// Reads the PEM files into a server configuration.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key_der)
    .map_err(|e| format!("{}: {e}", cert.display()))?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

impl Tls {
    /// The listener's TLS from its configured pair (`what`: the keys, for the error), `None`
    /// without one. Unloadable files are an error: a listener configured for TLS never falls
    /// back to plain HTTP. (Half a pair is refused when the config is checked.)
    pub fn from_pair(
        cert: &Option<PathBuf>,
        key: &Option<PathBuf>,
        what: &str,
    ) -> Result<Option<Arc<Tls>>, String> {
        match (cert, key) {
            (Some(c), Some(k)) => Tls::new(c.clone(), k.clone())
                .map(|t| Some(Arc::new(t)))
                .map_err(|e| format!("{what}: {e}")),
            _ => Ok(None),
        }
    }

    /// Loads the files once (an error here stops the daemon: a TLS listener without its
    /// certificate must not silently serve plain HTTP).
    pub fn new(cert: PathBuf, key: PathBuf) -> Result<Tls, String> {
        let config = load(&cert, &key)?;
        Ok(Tls {
            cert,
            key,
            config: RwLock::new(config),
        })
    }

    /// Re-reads the files; on failure the old configuration stays.
    pub fn reload(&self) -> Result<(), String> {
        let c = load(&self.cert, &self.key)?;
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = c;
        Ok(())
    }

    /// Re-reads the files on each SIGHUP until `stop` (the API's; `what` names the listener in
    /// the journal).
    pub fn reload_on_sighup(
        self: &Arc<Self>,
        what: &'static str,
        stop: tokio_util::sync::CancellationToken,
    ) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, listener = what, "cannot watch SIGHUP: the TLS certificate is not reloaded");
                return;
            }
        };
        let t = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = hup.recv() => match t.reload() {
                        Ok(()) => tracing::info!(listener = what, "TLS certificate and key reloaded (SIGHUP)"),
                        Err(e) => tracing::warn!(listener = what, error = %e, "TLS reload failed, the previous certificate stays"),
                    },
                    () = stop.cancelled() => return,
                }
            }
        });
    }

    /// An acceptor with the configuration in force now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(
            self.config
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_wrong_files_are_clear_errors() {
        let dir = std::env::temp_dir().join(format!("cph-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, k) = (dir.join("c.pem"), dir.join("k.pem"));
        let e = Tls::new(c.clone(), k.clone()).unwrap_err();
        assert!(e.contains("c.pem"), "{e}");
        std::fs::write(&c, "not pem").unwrap();
        std::fs::write(&k, "not pem").unwrap();
        let e = Tls::new(c.clone(), k.clone()).unwrap_err();
        assert!(e.contains("c.pem"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
