//! The proxy's session cookie: a browser cannot send `Authorization`, so a `?token=` is checked
//! once and exchanged for this cookie. Its value is `<payload>.<mac>` (both base64url): the
//! payload names the project, the expiry (the token's), what it grants (`proxy`, `files`) and the
//! token's `jti` (a revoked token's cookies die with it); the MAC is HMAC-SHA256 under a key kept
//! in the state directory (0600, made on first use), compared in constant time.
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;

use crate::domain::project::ProjectId;

/// The cookie's name (scoped by `Path=/<id>/`, so each project's is separate).
pub const NAME: &str = "cocalc_project_host";
/// Key file name in the state directory.
pub const KEY_FILE: &str = "proxy-cookie.key";
const KEY_LEN: usize = 32;
/// Longest cookie value looked at.
const MAX_LEN: usize = 1024;

/// What a valid cookie says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// the project it is for
    pub id: ProjectId,
    /// unix seconds after which it is refused
    pub exp: u64,
    /// the `proxy` action
    pub proxy: bool,
    /// the `files` action
    pub files: bool,
    /// the token's `jti`
    pub jti: Option<String>,
}

/// Why a cookie is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Not ours or tampered with.
    #[error("invalid session cookie")]
    Invalid,
    /// Past its expiry.
    #[error("session cookie expired")]
    Expired,
}

/// The signing key.
pub struct Key([u8; KEY_LEN]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A key from bytes (tests).
    pub fn from_bytes(b: [u8; KEY_LEN]) -> Key {
        Key(b)
    }

    /// Reads the key in `dir`, creating it (0600, random) on first use.
    pub fn load_or_create(dir: &Path) -> std::io::Result<Key> {
        let path = dir.join(KEY_FILE);
        match std::fs::read(&path) {
            Ok(b) => {
                return b.try_into().map(Key).map_err(|b: Vec<u8>| {
                    std::io::Error::other(format!(
                        "{}: {} bytes, expected {KEY_LEN}",
                        path.display(),
                        b.len()
                    ))
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut k = [0u8; KEY_LEN];
        getrandom::fill(&mut k).map_err(|e| std::io::Error::other(e.to_string()))?;
        // written under a temporary name and linked in place: a concurrent first start keeps
        // whichever key landed first, and nobody reads a half-written key
        let tmp = dir.join(format!("{KEY_FILE}.{}.tmp", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&k)?;
        f.sync_all()?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(Key(k)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Key::load_or_create(dir),
            Err(e) => Err(e),
        }
    }

    fn mac(&self, payload: &[u8]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256>>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(payload);
        m
    }

    /// The cookie value for `g`.
    pub fn sign(&self, g: &Grant) -> String {
        let acts = match (g.proxy, g.files) {
            (true, true) => "pf",
            (true, false) => "p",
            (false, true) => "f",
            (false, false) => "-",
        };
        let payload = format!(
            "v1|{}|{}|{acts}|{}",
            g.id,
            g.exp,
            g.jti.as_deref().unwrap_or("")
        );
        let tag = self.mac(payload.as_bytes()).finalize().into_bytes();
        format!("{}.{}", B64.encode(payload), B64.encode(tag))
    }

    /// Checks a cookie value as of `now`.
    pub fn verify(&self, value: &str, now: u64) -> Result<Grant, Refused> {
        if value.len() > MAX_LEN {
            return Err(Refused::Invalid);
        }
        let (p, t) = value.split_once('.').ok_or(Refused::Invalid)?;
        let payload = B64.decode(p).map_err(|_| Refused::Invalid)?;
        let tag = B64.decode(t).map_err(|_| Refused::Invalid)?;
        // constant time (hmac's verify_slice)
        self.mac(&payload)
            .verify_slice(&tag)
            .map_err(|_| Refused::Invalid)?;
        let payload = String::from_utf8(payload).map_err(|_| Refused::Invalid)?;
        let f: Vec<&str> = payload.split('|').collect();
        let ["v1", id, exp, acts, jti] = f.as_slice() else {
            return Err(Refused::Invalid);
        };
        let g = Grant {
            id: id.parse().map_err(|_| Refused::Invalid)?,
            exp: exp.parse().map_err(|_| Refused::Invalid)?,
            proxy: acts.contains('p'),
            files: acts.contains('f'),
            jti: (!jti.is_empty()).then(|| jti.to_string()),
        };
        if now > g.exp {
            return Err(Refused::Expired);
        }
        Ok(g)
    }
}

/// The value of our cookie in a `Cookie` header, if it is there.
pub fn find(cookie_header: &str) -> Option<&str> {
    cookie_header
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == NAME)
        .map(|(_, v)| v)
}

/// A `Cookie` header without our cookie (the rest is the project's own and goes on); `None`
/// when nothing is left.
pub fn strip(cookie_header: &str) -> Option<String> {
    let kept: Vec<&str> = cookie_header
        .split(';')
        .map(str::trim)
        .filter(|c| !c.is_empty() && c.split_once('=').is_none_or(|(n, _)| n != NAME))
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

/// The `Set-Cookie` value for a grant.
pub fn set_cookie(value: &str, id: ProjectId, max_age: u64, secure: bool) -> String {
    format!(
        "{NAME}={value}; Path=/{id}/; Max-Age={max_age}; HttpOnly; SameSite=Lax{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "6f1c2d3e-0000-4000-8000-00000000000a";
    const B: &str = "6f1c2d3e-0000-4000-8000-00000000000b";

    fn grant() -> Grant {
        Grant {
            id: A.parse().unwrap(),
            exp: 1000,
            proxy: true,
            files: false,
            jti: Some("t-1".into()),
        }
    }

    #[test]
    fn signed_cookies_verify_and_tampered_ones_do_not() {
        let k = Key::from_bytes([7; 32]);
        let v = k.sign(&grant());
        assert_eq!(k.verify(&v, 999), Ok(grant()));
        assert_eq!(k.verify(&v, 1001), Err(Refused::Expired));
        // another key
        assert_eq!(
            Key::from_bytes([8; 32]).verify(&v, 1),
            Err(Refused::Invalid)
        );
        // the payload changed to another project, the tag kept
        let (_, tag) = v.split_once('.').unwrap();
        let forged = format!("{}.{tag}", B64.encode(format!("v1|{B}|1000|pf|t-1")));
        assert_eq!(k.verify(&forged, 1), Err(Refused::Invalid));
        for bad in ["", ".", "x.y", &"a".repeat(2000), &v[..v.len() - 2]] {
            assert_eq!(k.verify(bad, 1), Err(Refused::Invalid), "{bad}");
        }
        let mut g = grant();
        g.jti = None;
        g.files = true;
        assert_eq!(k.verify(&k.sign(&g), 1), Ok(g));
    }

    #[test]
    fn the_key_is_made_once_private_and_kept() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("cph-cookie-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let k1 = Key::load_or_create(&dir).unwrap();
        let k2 = Key::load_or_create(&dir).unwrap();
        assert_eq!(k1.0, k2.0);
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temp left");
        std::fs::write(dir.join(KEY_FILE), b"short").unwrap();
        assert!(Key::load_or_create(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cookie_headers() {
        assert_eq!(find("a=1; cocalc_project_host=xyz; b=2"), Some("xyz"));
        assert_eq!(find("a=1"), None);
        assert_eq!(
            strip("a=1; cocalc_project_host=xyz; b=2").as_deref(),
            Some("a=1; b=2")
        );
        assert_eq!(strip("cocalc_project_host=xyz"), None);
        let s = set_cookie("v", A.parse().unwrap(), 60, true);
        assert!(s.contains(&format!("Path=/{A}/")), "{s}");
        assert!(s.contains("HttpOnly") && s.contains("SameSite=Lax") && s.ends_with("Secure"));
        assert!(!set_cookie("v", A.parse().unwrap(), 60, false).contains("Secure"));
    }
}
