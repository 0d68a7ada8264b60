//! Every key a config fragment accepts, read from the serde shape of [`Fragment`] itself, so that
//! the documentation (`packaging/config.toml`, the cocalc-project-host.toml(5) page made from it)
//! can be checked against the code: a key added to `fragments.rs` without documentation fails a
//! test (`docgen::tests`).
//!
//! How: a probing `Deserializer` walks the derived `Deserialize` impls. A struct tells serde its
//! field names (`deserialize_struct`'s `fields`); the probe hands back those names as its error.
//! To learn whether a field is itself a table, it is probed alone: a nested struct answers with its
//! own fields, anything else (a value) with [`Probe::Leaf`].
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};

use super::fragments::Fragment;

/// The dotted keys of a fragment (`state_dir`, `storage.mount`, `limits.max.memory`, …), in the
/// order the code declares them.
pub fn keys() -> Vec<String> {
    let mut out = Vec::new();
    walk::<Fragment>(&mut Vec::new(), &mut out);
    out
}

fn walk<'de, T: Deserialize<'de>>(path: &mut Vec<&'static str>, out: &mut Vec<String>) {
    let Probe::Fields(fields) = probe::<T>(path) else {
        return;
    };
    for f in fields {
        path.push(f);
        match probe::<T>(path) {
            Probe::Fields(_) => walk::<T>(path, out),
            _ => out.push(path.join(".")),
        }
        path.pop();
    }
}

/// What the table at `path` is: its fields, or a value.
fn probe<'de, T: Deserialize<'de>>(path: &[&'static str]) -> Probe {
    match T::deserialize(Prober { path, depth: 0 }) {
        Ok(_) => Probe::Other("deserialized without a value".into()),
        Err(p) => p,
    }
}

/// The probe's answer, carried as the deserializer's error.
#[derive(Debug)]
enum Probe {
    Fields(&'static [&'static str]),
    Leaf,
    Other(String),
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Other(m) => f.write_str(m),
            p => write!(f, "{p:?}"),
        }
    }
}

impl std::error::Error for Probe {}

impl de::Error for Probe {
    fn custom<M: fmt::Display>(msg: M) -> Self {
        Probe::Other(msg.to_string())
    }
}

/// Deserializes the table at `path[..depth]`; reports on `path` once `depth` reaches its end.
struct Prober<'p> {
    path: &'p [&'static str],
    depth: usize,
}

impl<'de> de::Deserializer<'de> for Prober<'_> {
    type Error = Probe;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Probe> {
        Err(Probe::Leaf)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Probe> {
        match self.path.get(self.depth) {
            None => Err(Probe::Fields(fields)),
            Some(&key) => visitor.visit_map(OneKey {
                key: Some(key),
                next: Prober {
                    path: self.path,
                    depth: self.depth + 1,
                },
            }),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// A table with the one key being probed.
struct OneKey<'p> {
    key: Option<&'static str>,
    next: Prober<'p>,
}

impl<'de, 'p> MapAccess<'de> for OneKey<'p> {
    type Error = Probe;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Probe> {
        match self.key.take() {
            Some(k) => seed.deserialize(k.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Probe> {
        seed.deserialize(Prober {
            path: self.next.path,
            depth: self.next.depth,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_nested_tables_are_dotted_and_complete() {
        let k = keys();
        for key in [
            "state_dir",
            "listen",
            "storage.mount",
            "projects.log_rate_limit_burst",
            "limits.memory",
            "limits.max.network",
            "auth.master_issuer",
            "http.max_connections_per_peer",
        ] {
            assert!(k.iter().any(|x| x == key), "{key} missing from {k:?}");
        }
        // tables are not keys themselves
        assert!(
            !k.iter().any(|x| x == "limits.max" || x == "storage"),
            "{k:?}"
        );
        // every key is accepted by the real parser (a value of the wrong type is refused with
        // "invalid type", never "unknown field")
        for key in &k {
            let (table, leaf) = key.rsplit_once('.').unwrap_or(("", key));
            let text = if table.is_empty() {
                format!("{leaf} = {{}}\n")
            } else {
                format!("[{table}]\n{leaf} = {{}}\n")
            };
            let e = super::super::merge([(std::path::Path::new("/x.toml"), text.as_str())])
                .expect_err(key)
                .to_string();
            assert!(!e.contains("unknown field"), "{key}: {e}");
        }
    }
}
