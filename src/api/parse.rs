//! The parsers every adapter shares: ids, snapshot names and JSON bodies. A body (HTTP) and a
//! JSON argument (D-Bus) go through the same function, so both refuse the same inputs with the
//! same kind of error.
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::domain::limits::LimitsPatch;
use crate::domain::project::{ProjectId, RunConfig};
use crate::domain::snapshots::SnapshotName;

use super::error::{ErrorKind, WireError};

/// A project id from a path segment, a bus argument or the command line.
pub fn parse_id(s: &str) -> Result<ProjectId, WireError> {
    Ok(s.parse::<ProjectId>()?)
}

/// A snapshot name from a path segment, a body, a bus argument or the command line.
pub fn parse_snapshot_name(s: &str) -> Result<SnapshotName, WireError> {
    Ok(s.parse::<SnapshotName>()?)
}

/// A JSON request body: empty is `T::default()`; otherwise one JSON object (serde would map an
/// array onto a struct's fields by position: refused), with no unknown field. The message names
/// the failing field where it can.
pub fn parse_body<T: DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.is_empty() {
        return Ok(T::default());
    }
    let bad = |e: String| {
        let at = failing_field::<T>(bytes)
            .map(|f| format!("{f}: "))
            .unwrap_or_default();
        WireError::new(
            ErrorKind::InvalidBody,
            format!("invalid JSON body: {at}{e}"),
        )
    };
    match serde_json::from_slice::<serde_json::Value>(bytes).map_err(|e| bad(e.to_string()))? {
        v @ serde_json::Value::Object(_) => T::deserialize(v).map_err(|e| bad(e.to_string())),
        _ => Err(bad("the body must be a JSON object".into())),
    }
}

/// A start config given alone (the bus's `config_json`): empty or `null` is "the stored one";
/// otherwise exactly what `{"config": …}` accepts in `POST /projects/:id/start`.
pub fn parse_config_json(json: &str) -> Result<Option<RunConfig>, WireError> {
    if json.trim().is_empty() {
        return Ok(None);
    }
    let wrapped = format!("{{\"config\":{json}}}");
    // one JSON value on its own first, so the wrapping below cannot be broken out of
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| {
        WireError::new(
            ErrorKind::InvalidBody,
            format!("invalid JSON body: config: {e}"),
        )
    })?;
    if !matches!(v, serde_json::Value::Object(_) | serde_json::Value::Null) {
        return Err(WireError::new(
            ErrorKind::InvalidBody,
            "invalid JSON body: config: config must be an object",
        ));
    }
    Ok(parse_body::<super::StartRequest>(wrapped.as_bytes())?.config)
}

/// A limits change given alone (the bus's `limits_json`): as the body of
/// `PATCH /projects/:id/config`.
pub fn parse_limits_json(json: &str) -> Result<LimitsPatch, WireError> {
    parse_body(json.as_bytes())
}

/// serde's derived structs also take a JSON array (fields by position): the API takes objects.
pub(crate) fn config_object_or_null<'de, D>(d: D) -> Result<Option<RunConfig>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error as _;
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(None),
        v @ serde_json::Value::Object(_) => RunConfig::deserialize(v)
            .map(Some)
            .map_err(D::Error::custom),
        _ => Err(D::Error::custom("config must be an object")),
    }
}

/// Names the field a well-formed JSON body fails on (a negative memory, a string for a number):
/// the first top-level key that fails on its own, and within `config` the run config's key.
pub fn failing_field<T: DeserializeOwned>(bytes: &[u8]) -> Option<String> {
    fn first_bad<U: DeserializeOwned>(v: &serde_json::Value) -> Option<String> {
        v.as_object()?.iter().find_map(|(k, val)| {
            let alone = serde_json::Value::Object([(k.clone(), val.clone())].into_iter().collect());
            serde_json::from_value::<U>(alone)
                .is_err()
                .then(|| k.clone())
        })
    }
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let top = first_bad::<T>(&v)?;
    if top == "config"
        && let Some(inner) = first_bad::<RunConfig>(&v["config"])
    {
        return Some(format!("config.{inner}"));
    }
    Some(top)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        CreateSnapshotRequest, QuotaRequest, StartRequest, StopRequest, SweepRequest,
    };

    #[test]
    fn type_errors_name_the_field() {
        let f = |b: &str| failing_field::<StartRequest>(b.as_bytes());
        assert_eq!(
            f(r#"{"config":{"memory":-1}}"#).as_deref(),
            Some("config.memory")
        );
        assert_eq!(
            f(r#"{"config":{"image":"x","pids":1e99}}"#).as_deref(),
            Some("config.pids")
        );
        assert_eq!(f(r#"{"config":7}"#).as_deref(), Some("config"));
        assert_eq!(f("not json"), None);
        let p = |b: &str| failing_field::<LimitsPatch>(b.as_bytes());
        assert_eq!(p(r#"{"cpu":1,"memory":"2G"}"#).as_deref(), Some("memory"));
        assert_eq!(p(r#"{"swap":1}"#).as_deref(), Some("swap"));
        assert_eq!(p(r#"{"imgae":"x"}"#).as_deref(), Some("imgae"));
    }

    #[test]
    fn bodies_reject_unknown_fields_and_non_objects() {
        let k = |r: Result<StopRequest, WireError>| r.unwrap_err().kind;
        assert_eq!(k(parse_body(br#"{"forc":true}"#)), ErrorKind::InvalidBody);
        assert_eq!(k(parse_body(br#"{"force":"yes"}"#)), ErrorKind::InvalidBody);
        assert_eq!(k(parse_body(br#"[true]"#)), ErrorKind::InvalidBody);
        assert_eq!(k(parse_body(b"7")), ErrorKind::InvalidBody);
        assert!(!parse_body::<StopRequest>(b"").unwrap().force);
        assert!(
            parse_body::<StopRequest>(br#"{"force":true}"#)
                .unwrap()
                .force
        );
        for bad in [
            r#"{"config":[]}"#,
            r#"{"config":["x"]}"#,
            r#"{"config":{"bad":1}}"#,
        ] {
            assert!(parse_body::<StartRequest>(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(
            parse_body::<StartRequest>(br#"{"config":null}"#)
                .unwrap()
                .config
                .is_none()
        );
        assert!(parse_body::<Option<QuotaRequest>>(br#"{}"#).is_err());
        assert_eq!(
            parse_body::<Option<QuotaRequest>>(br#"{"disk":5}"#)
                .unwrap()
                .unwrap()
                .disk,
            Some(5)
        );
        assert!(parse_body::<Option<QuotaRequest>>(br#"{"disk":-5}"#).is_err());
        assert!(parse_body::<CreateSnapshotRequest>(br#"{"nam":"x"}"#).is_err());
        assert!(parse_body::<SweepRequest>(br#"{"now":"x"}"#).is_err());
    }

    /// The bus's config argument refuses exactly what the HTTP body's `config` refuses.
    #[test]
    fn bus_config_json_is_the_http_config() {
        for json in [
            "[]",
            r#"["busybox"]"#,
            "7",
            r#""x""#,
            "true",
            r#"{"imgae":"x"}"#,
            r#"{"memory":-1}"#,
            "{",
            r#"{}}"#,
            r#"{},{"x":1}"#,
            r#"{}, "extra": 1"#,
        ] {
            let bus = parse_config_json(json).map(|_| ()).map_err(|e| e.kind);
            let http = parse_body::<StartRequest>(format!("{{\"config\":{json}}}").as_bytes())
                .map(|_| ())
                .map_err(|e| e.kind);
            assert_eq!(bus, Err(ErrorKind::InvalidBody), "{json}");
            assert!(http.is_err(), "HTTP takes {json}");
        }
        assert_eq!(parse_config_json("").unwrap(), None);
        assert_eq!(parse_config_json(" null ").unwrap(), None);
        let c = parse_config_json(r#"{"memory":1048576000}"#)
            .unwrap()
            .unwrap();
        assert_eq!(c.memory, Some(1_048_576_000));
        let e = parse_config_json(r#"{"imgae":"x"}"#).unwrap_err();
        assert!(e.message.contains("imgae"), "{}", e.message);
    }

    #[test]
    fn bus_limits_json_is_the_http_body() {
        assert_eq!(parse_limits_json("").unwrap(), LimitsPatch::default());
        for bad in ["[1]", r#"{"cpuu":1}"#, r#"{"cpu":"x"}"#, "null"] {
            assert_eq!(
                parse_limits_json(bad).unwrap_err().kind,
                ErrorKind::InvalidBody,
                "{bad}"
            );
        }
        assert_eq!(
            parse_id("../x").unwrap_err().kind,
            ErrorKind::InvalidProjectId
        );
        assert_eq!(
            parse_snapshot_name("..").unwrap_err().kind,
            ErrorKind::InvalidSnapshotName
        );
    }
}
