//! The `[master]` section: the fleet's master this host registers with and reports to
//! (`docs/master-protocol.md`). No `url`: a standalone host.
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The master link's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MasterSettings {
    /// The master's base URL: `https://…`, or `http://` to a loopback address only.
    /// `None`: no master (standalone).
    pub url: Option<String>,
    /// PEM file of the CA(s) the master's certificate must chain to (default: the system's).
    pub ca_file: Option<PathBuf>,
    /// SHA-256 of the master's certificate (DER, hex): only that certificate is accepted.
    pub pin_sha256: Option<String>,
    /// The host's name in the fleet (default: the host id).
    pub name: Option<String>,
    /// Its region.
    pub region: Option<String>,
    /// Where its proxy is reached from outside.
    pub public_url: Option<String>,
    /// Where its SSH gateway is reached (`host:port`).
    pub ssh_endpoint: Option<String>,
    /// How often a heartbeat is sent.
    pub heartbeat_interval: Duration,
    /// Most reports queued while the master is away (the oldest are coalesced per project).
    pub outbox_limit: usize,
}

impl Default for MasterSettings {
    fn default() -> Self {
        MasterSettings {
            url: None,
            ca_file: None,
            pin_sha256: None,
            name: None,
            region: None,
            public_url: None,
            ssh_endpoint: None,
            heartbeat_interval: Duration::from_secs(30),
            outbox_limit: 10_000,
        }
    }
}

/// One fragment's `[master]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MasterFragment {
    url: Option<String>,
    ca_file: Option<PathBuf>,
    pin_sha256: Option<String>,
    name: Option<String>,
    region: Option<String>,
    public_url: Option<String>,
    ssh_endpoint: Option<String>,
    #[serde(default, deserialize_with = "crate::units::opt_duration")]
    heartbeat_interval: Option<Duration>,
    outbox_limit: Option<usize>,
}

impl MasterFragment {
    pub(super) fn apply(self, m: &mut MasterSettings, mark: &mut dyn FnMut(&'static str)) {
        let mut opt = |slot: &mut Option<String>, v: Option<String>, key: &'static str| {
            if let Some(v) = v {
                *slot = Some(v);
                mark(key);
            }
        };
        opt(&mut m.url, self.url, "master.url");
        opt(&mut m.pin_sha256, self.pin_sha256, "master.pin_sha256");
        opt(&mut m.name, self.name, "master.name");
        opt(&mut m.region, self.region, "master.region");
        opt(&mut m.public_url, self.public_url, "master.public_url");
        opt(
            &mut m.ssh_endpoint,
            self.ssh_endpoint,
            "master.ssh_endpoint",
        );
        if let Some(v) = self.ca_file {
            m.ca_file = Some(v);
            mark("master.ca_file");
        }
        if let Some(v) = self.heartbeat_interval {
            m.heartbeat_interval = v;
            mark("master.heartbeat_interval");
        }
        if let Some(v) = self.outbox_limit {
            m.outbox_limit = v;
            mark("master.outbox_limit");
        }
    }
}

/// The parts of `master.url` the client needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterUrl {
    /// https (else plain http to loopback)
    pub tls: bool,
    /// host name or address, as in the URL (no brackets)
    pub host: String,
    /// port
    pub port: u16,
    /// the base path, without a trailing `/`
    pub path: String,
}

/// Parses `master.url`: https anywhere, http only to loopback (`localhost`, 127.0.0.0/8, ::1).
pub fn parse_url(s: &str) -> Result<MasterUrl, String> {
    let uri: hyper::Uri = s.parse().map_err(|e| format!("not a URL: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("must start with https:// (or http:// to a loopback address)".into()),
    };
    let host = uri
        .host()
        .ok_or("has no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if uri.query().is_some() || s.contains('@') {
        return Err("must have no user info and no query".into());
    }
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    if !tls && !loopback {
        return Err("http:// is allowed only to a loopback address; use https://".into());
    }
    Ok(MasterUrl {
        tls,
        port: uri.port_u16().unwrap_or(if tls { 443 } else { 80 }),
        path: uri.path().trim_end_matches('/').to_string(),
        host,
    })
}

/// Parses a pinned certificate hash: 64 hex digits (colons allowed between bytes).
pub fn parse_pin(s: &str) -> Result<[u8; 32], String> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    let bad = || "must be the SHA-256 of the certificate: 64 hex digits".to_string();
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    Ok(out)
}

fn short_text(key: &'static str, v: &Option<String>) -> Result<(), (&'static str, String)> {
    match v {
        Some(v) if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) => Err((
            key,
            "must be 1 to 256 characters without control characters".into(),
        )),
        _ => Ok(()),
    }
}

impl MasterSettings {
    /// Checks the merged settings: `Err((dotted key, what is wrong))`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(u) = &self.url {
            parse_url(u).map_err(|e| ("master.url", e))?;
        }
        if let Some(p) = &self.ca_file
            && !p.is_absolute()
        {
            return Err(("master.ca_file", "must be an absolute path".into()));
        }
        if let Some(p) = &self.pin_sha256 {
            parse_pin(p).map_err(|e| ("master.pin_sha256", e))?;
            if self.ca_file.is_some() {
                return Err((
                    "master.pin_sha256",
                    "set either master.ca_file or master.pin_sha256, not both".into(),
                ));
            }
        }
        short_text("master.name", &self.name)?;
        short_text("master.region", &self.region)?;
        short_text("master.public_url", &self.public_url)?;
        short_text("master.ssh_endpoint", &self.ssh_endpoint)?;
        if !(1..=3600).contains(&self.heartbeat_interval.as_secs()) {
            return Err(("master.heartbeat_interval", "must be 1 s to 1 h".into()));
        }
        if !(1..=1_000_000).contains(&self.outbox_limit) {
            return Err(("master.outbox_limit", "must be 1 to 1000000".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_https_or_loopback_http() {
        let u = parse_url("https://master.example.org:8443/fleet/").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (true, "master.example.org", 8443, "/fleet")
        );
        assert_eq!(parse_url("https://m.example").unwrap().port, 443);
        assert!(parse_url("http://127.0.0.1:9000").is_ok());
        assert!(parse_url("http://[::1]:9000").is_ok());
        assert!(parse_url("http://localhost").is_ok());
        assert!(
            parse_url("http://10.0.0.1")
                .unwrap_err()
                .contains("loopback")
        );
        assert!(parse_url("http://127.0.0.1.example.org").is_err());
        assert!(parse_url("ftp://m.example").is_err());
        assert!(parse_url("https://u:p@m.example").is_err());
        assert!(parse_url("nonsense").is_err());
    }

    #[test]
    fn pins_are_64_hex_digits() {
        let h = "ab".repeat(32);
        assert_eq!(parse_pin(&h).unwrap(), [0xab; 32]);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_pin(&colons).unwrap(), [0xab; 32]);
        assert!(parse_pin("abcd").is_err());
        assert!(parse_pin(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn validation_names_the_key() {
        let mut m = MasterSettings::default();
        assert!(m.validate().is_ok());
        m.url = Some("http://192.0.2.1".into());
        assert_eq!(m.validate().unwrap_err().0, "master.url");
        m.url = Some("https://m.example".into());
        m.pin_sha256 = Some("00".repeat(32));
        m.ca_file = Some("/etc/ca.pem".into());
        assert_eq!(m.validate().unwrap_err().0, "master.pin_sha256");
        m.ca_file = None;
        m.heartbeat_interval = Duration::ZERO;
        assert_eq!(m.validate().unwrap_err().0, "master.heartbeat_interval");
        m.heartbeat_interval = Duration::from_secs(1);
        m.outbox_limit = 0;
        assert_eq!(m.validate().unwrap_err().0, "master.outbox_limit");
    }
}
