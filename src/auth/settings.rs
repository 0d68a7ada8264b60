//! The `[auth]` section of the host configuration. Auth owns it: the config loader embeds
//! [`AuthSettings`], merges each fragment's [`AuthFragment`] into it and asks it to validate itself,
//! so nothing here depends on `crate::config`.
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// HTTP API authentication settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthSettings {
    /// A root-only file of admin tokens (one per line), besides the systemd credential
    /// `admin-token`.
    pub admin_token_file: Option<PathBuf>,
    /// Ed25519 public keys of the master (PEM or base64 of the 32 raw bytes): master tokens signed
    /// by any of them are accepted. Empty: master tokens are refused.
    pub master_public_keys: Vec<String>,
    /// Longest lifetime of a master token accepted (`exp` - now, and `exp` - `iat`).
    pub max_token_lifetime: Duration,
    /// The master's `iss`: when set, master tokens must carry exactly this issuer.
    pub master_issuer: Option<String>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            admin_token_file: None,
            master_public_keys: Vec::new(),
            max_token_lifetime: Duration::from_secs(24 * 3600),
            master_issuer: None,
        }
    }
}

/// One fragment's `[auth]` table: every key optional. `max_token_lifetime` arrives already typed
/// (the config loader deserializes durations), so this module parses no units itself.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFragment {
    admin_token_file: Option<PathBuf>,
    master_public_keys: Option<Vec<String>>,
    #[serde(default, deserialize_with = "crate::units::opt_duration")]
    max_token_lifetime: Option<Duration>,
    master_issuer: Option<String>,
}

impl AuthSettings {
    /// Applies a fragment onto these settings; `mark` learns each dotted key it set (for errors
    /// that name the file that set a key last).
    pub fn merge(&mut self, f: AuthFragment, mark: &mut dyn FnMut(&'static str)) {
        if let Some(v) = f.admin_token_file {
            self.admin_token_file = Some(v);
            mark("auth.admin_token_file");
        }
        if let Some(v) = f.master_public_keys {
            self.master_public_keys = v;
            mark("auth.master_public_keys");
        }
        if let Some(v) = f.max_token_lifetime {
            self.max_token_lifetime = v;
            mark("auth.max_token_lifetime");
        }
        if let Some(v) = f.master_issuer {
            self.master_issuer = Some(v);
            mark("auth.master_issuer");
        }
    }

    /// Checks the merged settings: `Err((dotted key, what is wrong))`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(p) = &self.admin_token_file
            && !p.is_absolute()
        {
            return Err(("auth.admin_token_file", "must be an absolute path".into()));
        }
        for (i, k) in self.master_public_keys.iter().enumerate() {
            if let Err(e) = super::parse_public_key(k) {
                return Err(("auth.master_public_keys", format!("key {}: {e}", i + 1)));
            }
        }
        if let Some(i) = &self.master_issuer
            && (i.is_empty() || i.len() > 256 || i.chars().any(char::is_control))
        {
            return Err((
                "auth.master_issuer",
                "must be 1 to 256 characters without control characters".into(),
            ));
        }
        if !(60..=30 * 86400).contains(&self.max_token_lifetime.as_secs()) {
            return Err((
                "auth.max_token_lifetime",
                "must be 60 to 2592000 seconds (30 days)".into(),
            ));
        }
        Ok(())
    }
}
