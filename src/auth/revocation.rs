//! Revoked master tokens: the `jti`s the master pushes (`POST /auth/revoked`), kept in the store
//! (table `revoked_tokens`) and in memory, where every token check looks. An entry is kept as long
//! as a token carrying it could still be accepted: `auth.max_token_lifetime` (plus the clock
//! leeway) after it was revoked, since no token accepted here lives longer. Expired entries are
//! pruned at load and at each push.
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rusqlite::params;

use crate::backends::sqlite::{Store, StoreError};

/// Most `jti`s one push may carry (a full push of the longest ids fits the 64 KiB body limit).
pub const MAX_PER_PUSH: usize = 200;
/// Longest `jti` accepted (bytes).
pub const MAX_JTI_LEN: usize = 128;
/// Most entries kept at once (a master revoking more within one token lifetime is refused).
pub const MAX_ENTRIES: usize = 1_000_000;

/// A token id (`jti`): 1 to [`MAX_JTI_LEN`] printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Jti(String);

impl std::str::FromStr for Jti {
    type Err = String;
    fn from_str(s: &str) -> Result<Jti, String> {
        if s.is_empty() || s.len() > MAX_JTI_LEN || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "a jti is 1 to {MAX_JTI_LEN} printable ASCII characters without spaces, not {:?}",
                s.chars().take(40).collect::<String>()
            ));
        }
        Ok(Jti(s.to_owned()))
    }
}

impl Jti {
    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Parses the `jti` list of a push: 1 to [`MAX_PER_PUSH`] valid ids (duplicates are one).
pub fn parse_list(list: &[String]) -> Result<Vec<Jti>, String> {
    if list.is_empty() || list.len() > MAX_PER_PUSH {
        return Err(format!(
            "jti must list 1 to {MAX_PER_PUSH} token ids, not {}",
            list.len()
        ));
    }
    let mut v = list
        .iter()
        .map(|s| s.parse::<Jti>())
        .collect::<Result<Vec<_>, _>>()?;
    v.sort();
    v.dedup();
    Ok(v)
}

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// The store failed: nothing was revoked.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The list is full.
    #[error("the revocation list holds {MAX_ENTRIES} live entries already")]
    Full,
}

/// The revoked `jti`s, each with the unix time until which it is kept, and the store they are
/// kept in (the sqlite backend directly: the core has no use for them). Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Revocations {
    map: Arc<RwLock<HashMap<Jti, u64>>>,
    /// `None` only for a verifier without a store (nothing can be revoked then)
    store: Option<Store>,
}

impl Revocations {
    /// Whether a token with this `jti` is revoked (as of `now`, unix seconds).
    pub fn is_revoked(&self, jti: &str, now: u64) -> bool {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.get(&Jti(jti.to_owned()))
            .is_some_and(|until| *until >= now)
    }

    /// How many entries are kept.
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the list from the store, pruning what expired before `now`.
    pub async fn load(store: Store, now: u64) -> Result<Revocations, StoreError> {
        let rows = store
            .call(move |c| {
                c.execute(
                    "DELETE FROM revoked_tokens WHERE until < ?1",
                    params![now as i64],
                )?;
                let mut st = c.prepare("SELECT jti, until FROM revoked_tokens")?;
                let rows = st
                    .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?;
        let map = rows
            .into_iter()
            // rows are written only by us from valid ids; skip anything else
            .filter_map(|(j, u)| Some((j.parse::<Jti>().ok()?, u.max(0) as u64)))
            .collect();
        Ok(Revocations {
            map: Arc::new(RwLock::new(map)),
            store: Some(store),
        })
    }

    /// Revokes `jtis` until `until` (unix seconds): stored first (in one transaction), then in
    /// memory, so an answer of success means it survives a restart. Returns how many are kept.
    pub async fn revoke(&self, jtis: Vec<Jti>, now: u64, until: u64) -> Result<usize, RevokeError> {
        {
            let map = self.map.read().unwrap_or_else(|p| p.into_inner());
            let live = map.values().filter(|u| **u >= now).count();
            if live + jtis.len() > MAX_ENTRIES {
                return Err(RevokeError::Full);
            }
        }
        let store = self.store.as_ref().ok_or(StoreError::Gone)?;
        let ids: Vec<String> = jtis.iter().map(|j| j.0.clone()).collect();
        store
            .call(move |c| {
                let tx = c.transaction()?;
                tx.execute(
                    "DELETE FROM revoked_tokens WHERE until < ?1",
                    params![now as i64],
                )?;
                for j in &ids {
                    tx.execute(
                        "INSERT INTO revoked_tokens(jti, until) VALUES(?1, ?2)
                         ON CONFLICT(jti) DO UPDATE SET until=MAX(until, ?2)",
                        params![j, until as i64],
                    )?;
                }
                tx.commit()?;
                Ok(())
            })
            .await?;
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, u| *u >= now);
        for j in jtis {
            let e = map.entry(j).or_insert(until);
            *e = (*e).max(until);
        }
        Ok(map.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jti_lists_are_bounded_and_validated() {
        let l = |v: &[&str]| parse_list(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(l(&["b", "a", "b"]).unwrap().len(), 2);
        assert!(l(&[]).unwrap_err().contains("1 to 200"));
        assert!(l(&["ok", ""]).unwrap_err().contains("printable"));
        assert!(l(&["with space"]).unwrap_err().contains("printable"));
        assert!(l(&["é"]).unwrap_err().contains("printable"));
        let long = "x".repeat(MAX_JTI_LEN + 1);
        assert!(l(&[&long]).unwrap_err().contains("128"));
        let many: Vec<String> = (0..=MAX_PER_PUSH).map(|i| i.to_string()).collect();
        assert!(parse_list(&many).unwrap_err().contains("201"));
    }

    #[tokio::test]
    async fn revoked_ids_survive_a_reopen_and_expire() {
        let dir = std::env::temp_dir().join(format!("cph-revoke-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        let _ = std::fs::remove_file(&path);
        let store = Store::open(&path).unwrap();
        let r = Revocations::load(store.clone(), 1000).await.unwrap();
        assert!(r.is_empty());
        let ids = parse_list(&["t-1".into(), "t-2".into()]).unwrap();
        assert_eq!(r.revoke(ids, 1000, 2000).await.unwrap(), 2);
        assert!(r.is_revoked("t-1", 1500));
        assert!(!r.is_revoked("t-3", 1500));
        assert!(
            !r.is_revoked("t-1", 2001),
            "kept only while a token could live"
        );
        drop(store);
        let store = Store::open(&path).unwrap();
        let r = Revocations::load(store.clone(), 1500).await.unwrap();
        assert!(r.is_revoked("t-2", 1500), "survives a reopen");
        // pruned once expired
        let r = Revocations::load(store.clone(), 2001).await.unwrap();
        assert!(r.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
