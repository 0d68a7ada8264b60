//! The server's host key: ed25519, in OpenSSH's private key format at
//! `<state_dir>/ssh_host_ed25519_key` (0600), made on the daemon's first start when missing.
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use russh::keys::ssh_key::private::{Ed25519Keypair, PrivateKey};
use russh::keys::ssh_key::{HashAlg, LineEnding};

/// The host key's file name in the state directory.
pub const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";

/// Where the host key lives.
pub fn host_key_path(state_dir: &Path) -> PathBuf {
    state_dir.join(HOST_KEY_FILE)
}

/// Reads the host key, creating it (0600, never replacing a file) when missing.
pub fn load_or_create_host_key(state_dir: &Path) -> anyhow::Result<PrivateKey> {
    let path = host_key_path(state_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            return PrivateKey::from_openssh(text.as_bytes())
                .with_context(|| format!("{}: not an OpenSSH private key", path.display()));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .context("cannot read /dev/urandom")?;
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    let text = key
        .to_openssh(LineEnding::LF)
        .context("cannot encode the host key")?;
    // a complete file under its final name or none: write aside, then link (fails if another
    // start made one meanwhile: that one wins)
    let tmp = state_dir.join(format!(".{HOST_KEY_FILE}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), fingerprint = %fingerprint(&key), "ssh: host key created");
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            load_or_create_host_key(state_dir)
        }
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

fn fingerprint(key: &PrivateKey) -> String {
    key.public_key().fingerprint(HashAlg::Sha256).to_string()
}

/// The host key's fingerprint as `ssh-keygen -l` shows it (`SHA256:…`), for `GET /host` and
/// `cocalc-project-host ssh-host-key`. Does not create the key.
pub fn host_key_fingerprint(state_dir: &Path) -> anyhow::Result<String> {
    let path = host_key_path(state_dir);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (the daemon makes it on its first start)",
            path.display()
        )
    })?;
    let key = PrivateKey::from_openssh(text.as_bytes())
        .with_context(|| format!("{}: not an OpenSSH private key", path.display()))?;
    Ok(fingerprint(&key))
}

/// The host key's public half, one OpenSSH line (for `known_hosts`).
pub fn host_public_key(state_dir: &Path) -> anyhow::Result<String> {
    let path = host_key_path(state_dir);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let key = PrivateKey::from_openssh(text.as_bytes())
        .with_context(|| format!("{}: not an OpenSSH private key", path.display()))?;
    Ok(key.public_key().to_openssh()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn made_once_0600_and_read_back() {
        let dir = std::env::temp_dir().join(format!("cph-hostkey-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        assert!(host_key_fingerprint(&dir).is_err());
        let k1 = load_or_create_host_key(&dir).expect("create");
        let mode = std::fs::metadata(host_key_path(&dir))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let k2 = load_or_create_host_key(&dir).expect("read");
        assert_eq!(k1.public_key(), k2.public_key());
        let fp = host_key_fingerprint(&dir).expect("fingerprint");
        assert!(fp.starts_with("SHA256:") && fp.len() == 50, "{fp}");
        assert!(
            host_public_key(&dir)
                .expect("pub")
                .starts_with("ssh-ed25519 AAAA")
        );
        // a damaged key is an error, never silently replaced
        std::fs::write(host_key_path(&dir), "junk").expect("write");
        assert!(load_or_create_host_key(&dir).is_err());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
