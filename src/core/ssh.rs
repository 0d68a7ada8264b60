//! The host's side of SSH: a project's stored public keys (validated, at most
//! [`MAX_KEYS`](crate::domain::ssh_keys::MAX_KEYS)). The SSH server (`adapters::ssh`) asks here
//! which keys may log in.
use russh::keys::PublicKey;

use super::{Error, Host};
use crate::domain::project::ProjectId;
use crate::domain::ssh_keys;

impl Host {
    /// The project's stored SSH public keys (empty when none were set).
    pub async fn authorized_keys(&self, id: ProjectId) -> Result<Vec<String>, Error> {
        Ok(self.store.ssh_keys(id).await?)
    }

    /// Replaces the project's stored SSH public keys after validating every one (nothing is
    /// changed when one is refused); the keys as stored (normalized).
    pub async fn set_authorized_keys(
        &self,
        id: ProjectId,
        keys: &[String],
    ) -> Result<Vec<String>, Error> {
        let keys = ssh_keys::validate(keys)?;
        self.store.set_ssh_keys(id, keys.clone()).await?;
        Ok(keys)
    }

    /// The stored keys, parsed, for a login check.
    pub async fn login_keys(&self, id: ProjectId) -> Result<Vec<PublicKey>, Error> {
        Ok(ssh_keys::parse_stored(&self.store.ssh_keys(id).await?))
    }
}

#[cfg(test)]
mod tests {
    use crate::backends::sim::Sim;
    use crate::config::Settings;
    use crate::core::{Error, Host};
    use crate::domain::project::ProjectId;

    const K1: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHrkivy0+UVFGYDv11hiVT5n0uJUh1695nhM7H3MdrxZ alice@example";
    const K2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILv67CidDNqhU9dx/rymeMXW25Ln0Sb+r8LP01BTZLbX";

    fn id(n: u32) -> ProjectId {
        format!("6f1c2d3e-0000-4000-8000-{n:012x}")
            .parse()
            .expect("a valid id")
    }

    #[tokio::test]
    async fn keys_are_validated_stored_per_project_and_a_bad_list_changes_nothing() {
        let sim = Sim::new();
        let h = Host::with_backends(Settings::default(), sim.backends())
            .await
            .expect("host");
        assert!(h.authorized_keys(id(1)).await.expect("read").is_empty());
        let set = h
            .set_authorized_keys(id(1), &[format!(" {K1} "), K2.to_string()])
            .await
            .expect("set");
        assert_eq!(set, [K1, K2]);
        assert_eq!(h.authorized_keys(id(1)).await.expect("read"), [K1, K2]);
        assert_eq!(h.login_keys(id(1)).await.expect("keys").len(), 2);
        assert!(h.authorized_keys(id(2)).await.expect("read").is_empty());

        let e = h
            .set_authorized_keys(id(1), &[K2.to_string(), "ssh-ed25519 AAAA".into()])
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidSshKey(_)), "{e:?}");
        assert_eq!(e.code(), "invalid_ssh_key");
        assert_eq!(h.authorized_keys(id(1)).await.expect("read"), [K1, K2]);

        // an empty list removes every key
        h.set_authorized_keys(id(1), &[]).await.expect("clear");
        assert!(h.login_keys(id(1)).await.expect("keys").is_empty());
    }
}
