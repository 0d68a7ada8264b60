//! Header rewriting between the public side and a project's server (pure, unit tested):
//! hop-by-hop fields removed per RFC 9110 §7.6.1 (the fixed list and whatever `Connection`
//! names), the host's own credentials (`Authorization`, our session cookie) never forwarded,
//! `X-Forwarded-For/Proto/Host/Prefix` set.
use std::net::IpAddr;

use hyper::HeaderMap;
use hyper::header::{self, HeaderName, HeaderValue};

use super::cookie;

/// Hop-by-hop fields (RFC 9110 §7.6.1, plus the historical `Keep-Alive`/`Proxy-Connection`).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether the request asks for a protocol upgrade (`Connection: upgrade` + `Upgrade: …`).
pub fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && connection_tokens(h).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(h: &HeaderMap) -> impl Iterator<Item = &str> {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes the hop-by-hop fields; with `upgrade`, `Upgrade` stays and `Connection: upgrade` is
/// put back (the one hop-by-hop exchange a proxy must pass on for WebSockets).
pub fn remove_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let upgrade_to = h.get(header::UPGRADE).cloned();
    let named: Vec<HeaderName> = connection_tokens(h)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    if upgrade && let Some(u) = upgrade_to {
        h.insert(header::UPGRADE, u);
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// What the proxy knows about the client's request.
#[derive(Debug, Clone)]
pub struct Forwarded<'a> {
    /// the client's address
    pub peer: IpAddr,
    /// `https` under TLS, else `http`
    pub proto: &'static str,
    /// the route's prefix (`/<id>/port/<p>` or `/<id>/server/<p>`)
    pub prefix: &'a str,
    /// whether the request is an upgrade passed through
    pub upgrade: bool,
}

/// Rewrites the client's request headers into what the project's server gets.
pub fn to_backend(h: &mut HeaderMap, f: &Forwarded<'_>) {
    remove_hop_by_hop(h, f.upgrade);
    // the host's credentials are for the host only
    h.remove(header::AUTHORIZATION);
    let kept = h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(cookie::strip)
        .collect::<Vec<_>>()
        .join("; ");
    h.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept)
    {
        h.insert(header::COOKIE, v);
    }
    let peer = f.peer.to_canonical().to_string();
    let xff = match h
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
    {
        Some(prev) => format!("{prev}, {peer}"),
        None => peer,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static(f.proto));
    match h.get(header::HOST).cloned() {
        Some(host) => {
            h.insert("x-forwarded-host", host);
        }
        None => {
            h.remove("x-forwarded-host");
        }
    }
    if let Ok(v) = HeaderValue::from_str(f.prefix) {
        h.insert("x-forwarded-prefix", v);
    }
}

/// Rewrites the project server's response headers into what the client gets: hop-by-hop fields
/// go (but those of a `101` upgrade), and so does any `Set-Cookie` of the host's session cookie
/// (a project cannot replace or shadow it).
pub fn to_client(h: &mut HeaderMap, upgrade: bool) {
    remove_hop_by_hop(h, upgrade);
    let cookies: Vec<HeaderValue> = h
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| {
            v.to_str().map_or(true, |s| {
                s.split_once('=')
                    .is_none_or(|(n, _)| n.trim() != cookie::NAME)
            })
        })
        .cloned()
        .collect();
    h.remove(header::SET_COOKIE);
    for c in cookies {
        h.append(header::SET_COOKIE, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn fwd(upgrade: bool) -> Forwarded<'static> {
        Forwarded {
            peer: "::ffff:10.1.2.3".parse().unwrap(),
            proto: "http",
            prefix: "/p/server/80",
            upgrade,
        }
    }

    #[test]
    fn hop_by_hop_and_credentials_never_reach_the_backend() {
        let mut h = map(&[
            ("host", "example.org:8080"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("authorization", "Bearer host-token"),
            ("cookie", "a=1; cocalc_project_host=sig; b=2"),
            ("cookie", "cocalc_project_host=other"),
            ("x-forwarded-for", "192.0.2.1"),
            ("accept", "*/*"),
        ]);
        to_backend(&mut h, &fwd(false));
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "te",
            "transfer-encoding",
            "proxy-authorization",
            "authorization",
            "upgrade",
        ] {
            assert!(!h.contains_key(gone), "{gone} forwarded");
        }
        assert_eq!(h["cookie"], "a=1; b=2");
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "192.0.2.1, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.org:8080");
        assert_eq!(h["x-forwarded-prefix"], "/p/server/80");
        assert_eq!(h["accept"], "*/*");
        let mut only_ours = map(&[("cookie", "cocalc_project_host=sig")]);
        to_backend(&mut only_ours, &fwd(false));
        assert!(!only_ours.contains_key("cookie"));
    }

    #[test]
    fn upgrades_pass_their_two_fields() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
        ]);
        assert!(wants_upgrade(&h));
        to_backend(&mut h, &fwd(true));
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["sec-websocket-key"], "k");
        assert!(!wants_upgrade(&map(&[("upgrade", "websocket")])));
        assert!(!wants_upgrade(&map(&[("connection", "upgrade")])));
    }

    #[test]
    fn the_backend_cannot_set_the_host_cookie() {
        let mut h = map(&[
            ("set-cookie", "cocalc_project_host=evil; Path=/"),
            ("set-cookie", "app=1; Path=/"),
            ("connection", "close"),
            ("x-app", "y"),
        ]);
        to_client(&mut h, false);
        let c: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(c, ["app=1; Path=/"]);
        assert!(!h.contains_key("connection"));
        assert_eq!(h["x-app"], "y");
    }
}
