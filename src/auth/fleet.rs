//! What the master's register answer changes in who may call the API: a new set of master
//! public keys (replacing `auth.master_public_keys`, kept in the store so a restart offline
//! keeps it) and token ids to revoke (onto the revocation list). The core's master link hands
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
        let mut pems = configured;
        if let Some(json) = stored {
            match serde_json::from_str::<Vec<String>>(&json)
                .map_err(|e| e.to_string())
                .and_then(|v| parse_keys(&v).map(|k| (v, k)))
            {
                Ok((v, keys)) => {
                    auth.set_fleet_keys(keys);
                    tracing::info!(keys = v.len(), "using the master's stored public keys");
                    pems = v;
                }
                Err(e) => tracing::warn!(error = %e, "ignoring the master's stored public keys"),
            }
        }
        Ok(FleetTrust {
            auth,
            store,
            pems: Mutex::new(pems),
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
            let json = serde_json::to_string(pems).map_err(|e| e.to_string())?;
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
