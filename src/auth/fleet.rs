//! What the master's register answer changes in who may call the API: a new set of master
//! public keys (replacing `auth.master_public_keys`, kept in the store so a restart offline
//! keeps it, until the admin changes `auth.master_public_keys`) and token ids to revoke (onto
//! the revocation list). The core's master link hands
//! the answer over through [`crate::core::link::Trust`].
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::OptionalExtension as _;

use super::revocation::parse_list;
use super::{Auth, now_secs, parse_public_key};
use crate::api::master::RegisterAnswer;
use crate::backends::sqlite::{Store, StoreError};

/// The key set stored by the last answer that carried one.
const META_KEY: &str = "master_public_keys";

/// The host's trust as the master keeps it.
#[derive(Debug)]
pub struct FleetTrust {
    auth: Arc<Auth>,
    store: Store,
    /// the PEMs in force (the configured ones until the master sends its own)
    pems: Mutex<Vec<String>>,
    /// `auth.master_public_keys`, stored beside the master's set: a config change overrides it
    configured: Vec<String>,
}

/// What the store keeps: the master's set, and the configured keys it replaced.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Stored {
    keys: Vec<String>,
    configured: Vec<String>,
}

impl FleetTrust {
    /// Loads the key set a master sent before (if any) into `auth`; `configured` are the
    /// `auth.master_public_keys`.
    pub async fn load(
        auth: Arc<Auth>,
        store: Store,
        configured: Vec<String>,
    ) -> Result<FleetTrust, StoreError> {
        let stored: Option<String> = store
            .call(|c| {
                Ok(
                    c.query_row("SELECT value FROM meta WHERE key=?1", [META_KEY], |r| {
                        r.get(0)
                    })
                    .optional()?,
                )
            })
            .await?;
        let mut pems = configured.clone();
        if let Some(json) = stored {
            match serde_json::from_str::<Stored>(&json)
                .map_err(|e| e.to_string())
                .and_then(|v| parse_keys(&v.keys).map(|k| (v, k)))
            {
                // the admin's word is newer than the master's set when the config changed since
                Ok((v, _)) if v.configured != configured => tracing::info!(
                    "auth.master_public_keys changed since the master sent its keys: using the configured ones until it sends them again"
                ),
                Ok((v, keys)) => {
                    auth.set_fleet_keys(keys);
                    tracing::info!(keys = v.keys.len(), "using the master's stored public keys");
                    pems = v.keys;
                }
                Err(e) => tracing::warn!(error = %e, "ignoring the master's stored public keys"),
            }
        }
        Ok(FleetTrust {
            auth,
            store,
            pems: Mutex::new(pems),
            configured,
        })
    }
}

fn parse_keys(pems: &[String]) -> Result<Vec<jsonwebtoken::DecodingKey>, String> {
    if pems.is_empty() || pems.len() > 16 {
        return Err(format!("a key set has 1 to 16 keys, not {}", pems.len()));
    }
    pems.iter()
        .enumerate()
        .map(|(i, k)| parse_public_key(k).map_err(|e| format!("key {}: {e}", i + 1)))
        .collect()
}

#[async_trait]
impl crate::core::link::Trust for FleetTrust {
    fn public_keys(&self) -> Vec<String> {
        self.pems.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn apply(&self, answer: &RegisterAnswer) -> Result<(), String> {
        // revocations first: a token must not outlive the master's word because a key was bad
        for chunk in answer.revoked.chunks(super::revocation::MAX_PER_PUSH) {
            let jtis = parse_list(chunk).map_err(|e| format!("revoked: {e}"))?;
            let now = now_secs();
            let n = jtis.len();
            self.auth
                .revocations()
                .revoke(jtis, now, now + self.auth.max_lifetime_secs())
                .await
                .map_err(|e| format!("revoked: {e}"))?;
            tracing::info!(revoked = n, "master link: token ids revoked by the master");
        }
        if let Some(pems) = &answer.public_keys {
            let keys = parse_keys(pems).map_err(|e| format!("public_keys: {e}"))?;
            let stored = Stored {
                keys: pems.clone(),
                configured: self.configured.clone(),
            };
            let json = serde_json::to_string(&stored).map_err(|e| e.to_string())?;
            self.store
                .call(move |c| {
                    c.execute(
                        "INSERT INTO meta(key, value) VALUES(?1, ?2)
                         ON CONFLICT(key) DO UPDATE SET value=?2",
                        [META_KEY, json.as_str()],
                    )?;
                    Ok(())
                })
                .await
                .map_err(|e| e.to_string())?;
            let changed = {
                let mut cur = self.pems.lock().unwrap_or_else(|p| p.into_inner());
                std::mem::replace(&mut *cur, pems.clone()) != *pems
            };
            self.auth.set_fleet_keys(keys);
            if changed {
                tracing::info!(
                    keys = pems.len(),
                    "master link: the master's public keys replace the host's"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::link::Trust as _;
    use base64::Engine as _;

    const HOST: &str = "0b7e5b8e-1111-4222-8333-444455556666";

    fn b64(seed: u8) -> String {
        let vk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]).verifying_key();
        base64::engine::general_purpose::STANDARD.encode(vk.to_bytes())
    }

    fn accepts(auth: &Auth, seed: u8) -> bool {
        let now = now_secs();
        let claims = serde_json::json!({"aud": HOST, "sub": "s", "iat": now, "exp": now + 60,
            "scope": {"projects": "*", "actions": ["list"]}});
        let t = super::super::sign(&[seed; 32], &claims).unwrap();
        auth.verify(&t, now).is_ok()
    }

    async fn load(store: &Store, configured: u8) -> (Arc<Auth>, FleetTrust) {
        let key = parse_public_key(&b64(configured)).unwrap();
        let auth = Arc::new(Auth::new(&[], vec![key], HOST, 3600));
        let t = FleetTrust::load(auth.clone(), store.clone(), vec![b64(configured)])
            .await
            .unwrap();
        (auth, t)
    }

    #[tokio::test]
    async fn the_masters_key_set_replaces_the_configured_one_until_the_config_changes() {
        let dir = std::env::temp_dir().join(format!("cph-fleet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        let _ = std::fs::remove_file(&path);
        let store = Store::open(&path).unwrap();
        let (auth, trust) = load(&store, 1).await;
        assert!(accepts(&auth, 1) && !accepts(&auth, 2));
        let bad = RegisterAnswer {
            public_keys: Some(vec![b64(2), "not a key".into()]),
            revoked: vec![],
        };
        assert!(trust.apply(&bad).await.is_err());
        assert!(accepts(&auth, 1), "a set with a bad key is refused whole");
        let answer = RegisterAnswer {
            public_keys: Some(vec![b64(2)]),
            revoked: vec![],
        };
        trust.apply(&answer).await.unwrap();
        assert!(accepts(&auth, 2) && !accepts(&auth, 1));
        assert_eq!(trust.public_keys(), [b64(2)]);
        // a restart with the same config: the master's set holds
        let (auth, trust) = load(&store, 1).await;
        assert!(accepts(&auth, 2) && !accepts(&auth, 1));
        assert_eq!(trust.public_keys(), [b64(2)]);
        // the admin configured another key since: the config wins
        let (auth, trust) = load(&store, 3).await;
        assert!(accepts(&auth, 3) && !accepts(&auth, 2));
        assert_eq!(trust.public_keys(), [b64(3)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
