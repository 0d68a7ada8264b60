//! The `[proxy]` section of the host configuration. The proxy owns it (as auth owns `[auth]`):
//! the config loader embeds [`ProxySettings`], merges each fragment's [`ProxyFragment`] and asks
//! it to validate itself.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The proxy's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxySettings {
    /// Address bound when the daemon is not socket-activated (unset: no proxy then). Under
    /// systemd the proxy listens on `cocalc-project-host-proxy.socket` (8080) instead.
    pub listen: Option<SocketAddr>,
    /// How long a server in a project may take to send its response head (then 504).
    pub timeout: Duration,
    /// Whether an authorized request for a stopped project starts it (and waits for it).
    pub autostart: bool,
    /// How long such a request waits for the start.
    pub autostart_timeout: Duration,
    /// Most connections open at once from one peer address.
    pub max_connections_per_peer: usize,
    /// PEM certificate chain for TLS on the proxy listener (with `tls_key`; reloaded on SIGHUP).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    pub tls_key: Option<PathBuf>,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            listen: None,
            timeout: Duration::from_secs(60),
            autostart: false,
            autostart_timeout: Duration::from_secs(60),
            max_connections_per_peer: 256,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// One fragment's `[proxy]` table: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyFragment {
    listen: Option<SocketAddr>,
    #[serde(default, deserialize_with = "crate::units::opt_duration")]
    timeout: Option<Duration>,
    autostart: Option<bool>,
    #[serde(default, deserialize_with = "crate::units::opt_duration")]
    autostart_timeout: Option<Duration>,
    max_connections_per_peer: Option<usize>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

impl ProxySettings {
    /// Applies a fragment onto these settings; `mark` learns each dotted key it set.
    pub fn merge(&mut self, f: ProxyFragment, mark: &mut dyn FnMut(&'static str)) {
        fn put<T>(
            slot: &mut T,
            v: Option<T>,
            key: &'static str,
            mark: &mut dyn FnMut(&'static str),
        ) {
            if let Some(v) = v {
                *slot = v;
                mark(key);
            }
        }
        put(&mut self.listen, f.listen.map(Some), "proxy.listen", mark);
        put(&mut self.timeout, f.timeout, "proxy.timeout", mark);
        put(&mut self.autostart, f.autostart, "proxy.autostart", mark);
        put(
            &mut self.autostart_timeout,
            f.autostart_timeout,
            "proxy.autostart_timeout",
            mark,
        );
        put(
            &mut self.max_connections_per_peer,
            f.max_connections_per_peer,
            "proxy.max_connections_per_peer",
            mark,
        );
        put(
            &mut self.tls_cert,
            f.tls_cert.map(Some),
            "proxy.tls_cert",
            mark,
        );
        put(
            &mut self.tls_key,
            f.tls_key.map(Some),
            "proxy.tls_key",
            mark,
        );
    }

    /// Checks the merged settings: `Err((dotted key, what is wrong))`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=3600).contains(&self.timeout.as_secs()) {
            return Err(("proxy.timeout", "must be 1 to 3600 seconds".into()));
        }
        if !(1..=600).contains(&self.autostart_timeout.as_secs()) {
            return Err(("proxy.autostart_timeout", "must be 1 to 600 seconds".into()));
        }
        if !(1..=65536).contains(&self.max_connections_per_peer) {
            return Err((
                "proxy.max_connections_per_peer",
                "must be 1 to 65536".into(),
            ));
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => {
                for (key, p) in [("proxy.tls_cert", c), ("proxy.tls_key", k)] {
                    if !p.is_absolute() {
                        return Err((key, "must be an absolute path".into()));
                    }
                }
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(("proxy.tls_key", "must be set with proxy.tls_cert".into()));
            }
            (None, Some(_)) => {
                return Err(("proxy.tls_cert", "must be set with proxy.tls_key".into()));
            }
        }
        Ok(())
    }
}
