//! SSH public keys of a project and the SSH user names that name a project: pure parsing with the
//! `ssh-key` crate, no I/O.
use russh::keys::ssh_key::{AuthorizedKeys, PublicKey};

use crate::domain::project::ProjectId;

/// Most keys the host keeps for one project (`PUT /projects/:id/authorized-keys`).
pub const MAX_KEYS: usize = 1000;
/// Longest key line taken (an RSA-16384 key is ~2.8 KiB in OpenSSH form).
pub const MAX_KEY_LEN: usize = 8192;
/// Most bytes of a project's own `~/.ssh/authorized_keys` read.
pub const MAX_AUTHORIZED_KEYS_FILE: u64 = 256 * 1024;

/// Why a key list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// More than [`MAX_KEYS`].
    #[error("at most {MAX_KEYS} keys per project ({0} given)")]
    TooMany(usize),
    /// One entry is not an OpenSSH public key line.
    #[error("keys[{index}] is not an OpenSSH public key (\"ssh-ed25519 AAAA… comment\"): {reason}")]
    Invalid {
        /// its position in the list
        index: usize,
        /// what the parser said
        reason: String,
    },
}

/// Validates a key list and returns it normalized (`algorithm base64 [comment]`, one line each).
pub fn validate(keys: &[String]) -> Result<Vec<String>, KeyError> {
    if keys.len() > MAX_KEYS {
        return Err(KeyError::TooMany(keys.len()));
    }
    keys.iter()
        .enumerate()
        .map(|(index, k)| {
            let bad = |reason: String| KeyError::Invalid { index, reason };
            let k = k.trim();
            if k.len() > MAX_KEY_LEN {
                return Err(bad(format!("longer than {MAX_KEY_LEN} bytes")));
            }
            if k.contains(['\n', '\r', '\0']) {
                return Err(bad("one key per entry, on one line".into()));
            }
            let key = PublicKey::from_openssh(k).map_err(|e| bad(e.to_string()))?;
            key.to_openssh().map_err(|e| bad(e.to_string()))
        })
        .collect()
}

/// Parses stored (already validated) key lines; a line that no longer parses is skipped.
pub fn parse_stored(keys: &[String]) -> Vec<PublicKey> {
    keys.iter()
        .filter_map(|k| PublicKey::from_openssh(k).ok())
        .collect()
}

/// The keys of an `authorized_keys` file's text. Lines with options (`command="…"`,
/// `restrict`, `from=…`) are skipped: this server would not enforce them, and a key its owner
/// restricted must not log in unrestricted. Unparsable lines are skipped too (as sshd does).
pub fn parse_authorized_keys(text: &str) -> Vec<PublicKey> {
    AuthorizedKeys::new(text)
        .filter_map(Result::ok)
        .filter(|e| e.config_opts().is_empty())
        .map(|e| e.public_key().clone())
        .collect()
}

/// Whether `offered` is one of `keys` (the key material; comments do not matter).
pub fn contains(keys: &[PublicKey], offered: &PublicKey) -> bool {
    keys.iter().any(|k| k.key_data() == offered.key_data())
}

/// The project an SSH user name names: `<uuid>`, `project-<uuid>`, or the 32 hex digits of the
/// uuid without dashes (all lowercase). `None` for anything else.
pub fn project_of_user(user: &str) -> Option<ProjectId> {
    let u = user.strip_prefix("project-").unwrap_or(user);
    if u.len() == 32
        && u.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        let dashed = format!(
            "{}-{}-{}-{}-{}",
            &u[0..8],
            &u[8..12],
            &u[12..16],
            &u[16..20],
            &u[20..32]
        );
        return dashed.parse().ok();
    }
    u.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHrkivy0+UVFGYDv11hiVT5n0uJUh1695nhM7H3MdrxZ alice@example";
    const ED2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILv67CidDNqhU9dx/rymeMXW25Ln0Sb+r8LP01BTZLbX";

    #[test]
    fn valid_keys_are_normalized() {
        let got = validate(&[format!("  {ED}  "), ED2.to_string()]).unwrap();
        assert_eq!(got, [ED.to_string(), ED2.to_string()]);
        assert_eq!(parse_stored(&got).len(), 2);
    }

    #[test]
    fn bad_keys_are_refused_with_their_index() {
        for bad in [
            "",
            "ssh-ed25519",
            "ssh-ed25519 AAAA",
            "ssh-ed25519 !!!notbase64",
            "hello world",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHrkivy0+UVFGYDv11hiVT5n0uJUh1695nhM7H3MdrxZ a\nssh-rsa x",
        ] {
            let e = validate(&[ED.to_string(), bad.to_string()]).unwrap_err();
            assert!(
                matches!(e, KeyError::Invalid { index: 1, .. }),
                "{bad:?}: {e:?}"
            );
        }
        let long = format!("{ED} {}", "x".repeat(MAX_KEY_LEN));
        assert!(validate(&[long]).is_err());
    }

    #[test]
    fn more_than_the_maximum_is_refused() {
        let keys = vec![ED.to_string(); MAX_KEYS];
        assert_eq!(validate(&keys).unwrap().len(), MAX_KEYS);
        let keys = vec![ED.to_string(); MAX_KEYS + 1];
        assert_eq!(validate(&keys), Err(KeyError::TooMany(MAX_KEYS + 1)));
    }

    #[test]
    fn authorized_keys_file_skips_options_and_junk() {
        let text =
            format!("# comment\n\n{ED}\ncommand=\"/bin/false\" {ED2}\nnot a key\nrestrict {ED2}\n");
        let keys = parse_authorized_keys(&text);
        assert_eq!(keys.len(), 1);
        let ed = PublicKey::from_openssh(ED).unwrap();
        let ed2 = PublicKey::from_openssh(ED2).unwrap();
        assert!(contains(&keys, &ed));
        assert!(!contains(&keys, &ed2));
    }

    #[test]
    fn user_names_name_projects() {
        let id = "6f1c2d3e-0000-4000-8000-000000000001";
        let want: ProjectId = id.parse().unwrap();
        assert_eq!(project_of_user(id), Some(want));
        assert_eq!(project_of_user(&format!("project-{id}")), Some(want));
        assert_eq!(project_of_user(&id.replace('-', "")), Some(want));
        assert_eq!(
            project_of_user(&format!("project-{}", id.replace('-', ""))),
            Some(want)
        );
        for bad in [
            "root",
            "",
            "project-",
            "6F1C2D3E-0000-4000-8000-000000000001",
            "6F1C2D3E000040008000000000000001",
            "6f1c2d3e00004000800000000000000",
            "project-project-6f1c2d3e-0000-4000-8000-000000000001",
            "../6f1c2d3e-0000-4000-8000-000000000001",
        ] {
            assert_eq!(project_of_user(bad), None, "{bad:?}");
        }
    }
}
