//! The TLS client side shared by the master link (`backends::master`) and moves
//! (`adapters::moves`): rustls with the ring provider. A peer's certificate either chains to a
//! CA file (default: the system's CAs) and names the host the URL names, or is exactly a pinned
//! certificate (its SHA-256 over the DER; chain and name are then not looked at).
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest as _, Sha256};
use tokio_rustls::rustls;

/// The system's CA bundle (Debian's), when no CA file is configured.
pub const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What a peer's certificate is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Exactly this certificate (SHA-256 of its DER); `source` names where the pin came from
    /// (`master.pin_sha256`, `the move's pin_sha256`, …) for the error a mismatch gives.
    Pin {
        /// the certificate's hash
        sha256: [u8; 32],
        /// where it was configured
        source: &'static str,
    },
    /// A chain to one of the CAs in this PEM file (`None`: [`SYSTEM_CAS`]) naming the host.
    Cas(Option<PathBuf>),
}

/// Accepts exactly the pinned certificate (the chain and name are not looked at: the pin says
/// which certificate the peer has), then checks the handshake's signatures as usual.
#[derive(Debug)]
pub(crate) struct Pinned {
    pub(crate) pin: [u8; 32],
    pub(crate) source: &'static str,
    pub(crate) algs: rustls::crypto::WebPkiSupportedAlgorithms,
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
                "the peer's certificate (SHA-256 {}) is not the pinned one ({})",
                hex(&got),
                self.source
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

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn roots(file: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(file)
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
    Ok(roots)
}

/// The client configuration `trust` asks for (TLS 1.2 and 1.3, no client certificate); an
/// unreadable or empty CA file is an error here, before any connection.
pub fn config(trust: &Trust) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    match trust {
        Trust::Pin { sha256, source } => {
            let verifier = Pinned {
                pin: *sha256,
                source,
                algs: provider.signature_verification_algorithms,
            };
            Ok(builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth())
        }
        Trust::Cas(file) => {
            let file = file.clone().unwrap_or_else(|| PathBuf::from(SYSTEM_CAS));
            Ok(builder
                .with_root_certificates(roots(&file)?)
                .with_no_client_auth())
        }
    }
}

/// A connector for `trust` (see [`config`]).
pub fn connector(trust: &Trust) -> Result<tokio_rustls::TlsConnector, String> {
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config(trust)?)))
}

/// The name a certificate must carry for `host` (a DNS name or an IP address, IPv6 with or
/// without brackets).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(h.to_string()).map_err(|e| format!("server name {h:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pin_is_the_certificates_sha256() {
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        let der = CertificateDer::from(vec![1u8, 2, 3]);
        let pin: [u8; 32] = Sha256::digest([1u8, 2, 3]).into();
        let v = Pinned {
            pin,
            source: "x.pin_sha256",
            algs,
        };
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
        assert!(
            e.to_string().contains("pinned") && e.to_string().contains("x.pin_sha256"),
            "{e}"
        );
    }

    #[test]
    fn ca_files_that_cannot_work_are_refused_before_connecting() {
        let e = config(&Trust::Cas(Some("/no/such/ca.pem".into()))).unwrap_err();
        assert!(e.contains("/no/such/ca.pem"), "{e}");
        let empty = std::env::temp_dir().join(format!("cph-tlsc-empty-{}", std::process::id()));
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = config(&Trust::Cas(Some(empty.clone()))).unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
        std::fs::remove_file(&empty).unwrap();
        assert!(
            config(&Trust::Pin {
                sha256: [0; 32],
                source: "p"
            })
            .is_ok()
        );
    }

    #[test]
    fn server_names_are_dns_names_or_addresses() {
        assert!(matches!(
            server_name("10.213.0.2").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("h.example").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name("bad name!").is_err());
    }
}
