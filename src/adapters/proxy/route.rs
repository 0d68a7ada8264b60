//! The public side's paths, decided from the path alone (no I/O, unit tested):
//! `/<id>/port/<p>/<rest>` (forwarded with the path kept: the app is base-url aware),
//! `/<id>/server/<p>/<rest>` (forwarded as `/<rest>`: the prefix is stripped) and
//! `/<id>/files/<path>` (the files handler, with the path percent-decoded).
use crate::api::{ErrorKind, WireError};
use crate::auth::Action;
use crate::domain::project::ProjectId;

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A port inside the project; `path` is what the backend gets (from `/`, query not included).
    Port {
        /// the port, 1–65535
        port: u16,
        /// the path sent to the backend
        path: String,
        /// `true` for `/server/` (prefix stripped), `false` for `/port/` (path kept)
        stripped: bool,
    },
    /// The project's files; the percent-decoded path under the home (may be empty).
    Files(String),
}

/// A parsed public path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyRoute {
    /// the project
    pub id: ProjectId,
    /// `/<id>/port/<p>` or `/<id>/server/<p>` (`X-Forwarded-Prefix`), `/<id>/files` for files
    pub prefix: String,
    /// where it goes
    pub target: Target,
}

impl ProxyRoute {
    /// The action a token needs for this route.
    pub fn action(&self) -> Action {
        match self.target {
            Target::Port { .. } => Action::Proxy,
            Target::Files(_) => Action::Files,
        }
    }
}

fn bad(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorKind::InvalidPath, msg)
}

/// A port: decimal digits only, 1–65535.
pub fn parse_port(s: &str) -> Result<u16, WireError> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(format!("{s:?} is not a port (1 to 65535)")));
    }
    match s.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err(bad(format!("{s:?} is not a port (1 to 65535)"))),
    }
}

/// Parses a request path (without the query).
pub fn parse(path: &str) -> Result<ProxyRoute, WireError> {
    let Some(p) = path.strip_prefix('/') else {
        return Err(bad("the path must start with /"));
    };
    let (id, rest) = p.split_once('/').unwrap_or((p, ""));
    if id.is_empty() {
        return Err(WireError::new(
            ErrorKind::NotFound,
            "nothing here: the proxy serves /<project_id>/port/<port>/…, /<project_id>/server/<port>/… and /<project_id>/files/…",
        ));
    }
    let id: ProjectId = id.parse().map_err(WireError::from)?;
    let (kind, rest) = rest.split_once('/').unwrap_or((rest, ""));
    match kind {
        "port" | "server" => {
            let (port, tail) = match rest.split_once('/') {
                Some((p, t)) => (p, Some(t)),
                None => (rest, None),
            };
            let port = parse_port(port)?;
            let tail = tail.unwrap_or("");
            // the proxy's own prefix must not be walked out of: `..` would reach another
            // project's path form on a base-url aware app, and no browser sends one
            if tail
                .split('/')
                .any(|s| s == "." || s == ".." || s.eq_ignore_ascii_case("%2e%2e"))
            {
                return Err(bad("the path has . or .. segments"));
            }
            let prefix = format!("/{id}/{kind}/{port}");
            let stripped = kind == "server";
            let path = if stripped {
                format!("/{tail}")
            } else {
                // kept as the client sent it (with or without the trailing slash)
                path.to_string()
            };
            Ok(ProxyRoute {
                id,
                prefix,
                target: Target::Port {
                    port,
                    path,
                    stripped,
                },
            })
        }
        "files" => {
            let decoded = percent_encoding::percent_decode_str(rest)
                .decode_utf8()
                .map_err(|_| bad("the file path is not UTF-8"))?;
            if decoded.contains('\0') {
                return Err(bad("the file path has a NUL byte"));
            }
            Ok(ProxyRoute {
                id,
                prefix: format!("/{id}/files"),
                target: Target::Files(decoded.into_owned()),
            })
        }
        "" => Err(WireError::new(
            ErrorKind::NotFound,
            format!(
                "nothing at /{id}/: use /{id}/port/<port>/, /{id}/server/<port>/ or /{id}/files/"
            ),
        )),
        other => Err(WireError::new(
            ErrorKind::NotFound,
            format!("no such route /{id}/{other}: use port, server or files"),
        )),
    }
}

/// The query without `token=…` (what is forwarded, and where a token exchange redirects to),
/// and the token if there was one.
pub fn split_token(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(q) = query else {
        return (None, None);
    };
    let mut token = None;
    let kept: Vec<&str> = q
        .split('&')
        .filter(|kv| {
            if let Some(v) = kv.strip_prefix("token=") {
                token = Some(
                    percent_encoding::percent_decode_str(v)
                        .decode_utf8_lossy()
                        .into_owned(),
                );
                false
            } else {
                !kv.is_empty()
            }
        })
        .collect();
    ((!kept.is_empty()).then(|| kept.join("&")), token)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "6f1c2d3e-0000-4000-8000-000000000001";

    fn port(path: &str) -> (u16, String, bool) {
        match parse(path).unwrap().target {
            Target::Port {
                port,
                path,
                stripped,
            } => (port, path, stripped),
            t => panic!("{t:?}"),
        }
    }

    #[test]
    fn both_port_forms() {
        assert_eq!(
            port(&format!("/{ID}/port/8000/a/b")),
            (8000, format!("/{ID}/port/8000/a/b"), false)
        );
        assert_eq!(
            port(&format!("/{ID}/server/8000/a/b")),
            (8000, "/a/b".into(), true)
        );
        assert_eq!(port(&format!("/{ID}/server/1")), (1, "/".into(), true));
        assert_eq!(
            port(&format!("/{ID}/server/65535/")),
            (65535, "/".into(), true)
        );
        let r = parse(&format!("/{ID}/server/80/x")).unwrap();
        assert_eq!(r.prefix, format!("/{ID}/server/80"));
        assert_eq!(r.action(), Action::Proxy);
    }

    #[test]
    fn files_paths_are_decoded() {
        let r = parse(&format!("/{ID}/files/a%20b/c.txt")).unwrap();
        assert_eq!(r.target, Target::Files("a b/c.txt".into()));
        assert_eq!(r.action(), Action::Files);
        assert_eq!(
            parse(&format!("/{ID}/files")).unwrap().target,
            Target::Files(String::new())
        );
        let e = parse(&format!("/{ID}/files/a%00")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidPath);
        let e = parse(&format!("/{ID}/files/%ff")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidPath);
    }

    #[test]
    fn bad_paths_are_400_or_404() {
        for p in ["0", "65536", "-1", "+80", "80a", "", "999999", "0x50"] {
            let e = parse(&format!("/{ID}/port/{p}/x")).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidPath, "{p}");
        }
        for p in ["..", "x/../y", ".", "%2E%2E"] {
            let e = parse(&format!("/{ID}/server/80/{p}")).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidPath, "{p}");
        }
        for id in ["x", "..", "6F1C2D3E-0000-4000-8000-000000000001"] {
            let e = parse(&format!("/{id}/port/80/")).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidProjectId, "{id}");
        }
        for p in [
            "/",
            &format!("/{ID}"),
            &format!("/{ID}/"),
            &format!("/{ID}/api/x"),
        ] {
            let e = parse(p).unwrap_err();
            assert_eq!(e.kind, ErrorKind::NotFound, "{p}");
        }
    }

    #[test]
    fn the_token_is_taken_out_of_the_query() {
        assert_eq!(split_token(None), (None, None));
        assert_eq!(
            split_token(Some("a=1&token=x%2Ey&b=2")),
            (Some("a=1&b=2".into()), Some("x.y".into()))
        );
        assert_eq!(split_token(Some("token=t")), (None, Some("t".into())));
        assert_eq!(
            split_token(Some("tokens=1")),
            (Some("tokens=1".into()), None)
        );
    }
}
