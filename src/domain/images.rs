//! Which container images a project may run (pure, unit tested).
//!
//! podman reads an image argument as a *transport* reference when it can (`docker-archive:PATH`,
//! `oci-archive:`, `dir:`, `containers-storage:`, `docker://`…), and `--pull=never` governs
//! registry pulls only: a tenant who can name an archive in its home makes podman import it,
//! under any tag it carries (the host's default image's tag included). So only plain references
//! `[registry/]name[:tag][@digest]` (the grammar of distribution/reference) reach an argv, as an
//! [`ImageRef`], and only those the host's `projects.images` allowlist matches.
use std::fmt;

/// podman's transports (containers/image `alltransports`): `NAME:` before anything else makes
/// podman read the rest as a path or a transport-specific reference.
const TRANSPORTS: [&str; 10] = [
    "docker",
    "docker-archive",
    "docker-daemon",
    "oci",
    "oci-archive",
    "dir",
    "containers-storage",
    "ostree",
    "sif",
    "tarball",
];

/// A plain image reference: `[registry[:port]/]path[:tag][@algorithm:hex]`. Constructible only
/// by parsing, so it never carries a transport, a flag or a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef(String);

/// Why an image is refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    /// Not a plain reference (a transport, a path, bad characters…).
    #[error("{0:?} is not a plain image reference ([registry/]name[:tag][@digest])")]
    NotPlain(String),
    /// A plain reference the host's `projects.images` does not allow.
    #[error("image {0} is not allowed on this host (projects.images)")]
    NotAllowed(String),
}

fn alnum_lower(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// `path-component := [a-z0-9]+ (separator [a-z0-9]+)*`, `separator := [_.] | __ | -+`.
fn path_component(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            i += 1;
            continue;
        }
        // a separator run, then an alphanumeric must follow (checked by the last-byte test)
        let start = i;
        while i < b.len() && matches!(b[i], b'_' | b'.' | b'-') {
            i += 1;
        }
        let sep = &s[start..i];
        let ok = matches!(sep, "_" | "." | "__") || sep.bytes().all(|c| c == b'-');
        if sep.is_empty() || !ok {
            return false;
        }
    }
    true
}

/// `domain := component ('.' component)* (':' port)?`, component `[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?`.
fn domain(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if let Some(p) = port
        && (p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    !host.is_empty()
        && host.split('.').all(|c| {
            let b = c.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-')
        })
}

/// `tag := [\w][\w.-]{0,127}`.
fn tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// `digest := algorithm ':' hex{32,}`, `algorithm := [a-z0-9]+ ([+._-][a-z0-9]+)*`.
fn digest(s: &str) -> bool {
    let Some((alg, hex)) = s.split_once(':') else {
        return false;
    };
    alg.split(['+', '.', '_', '-']).all(alnum_lower)
        && hex.len() >= 32
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

impl std::str::FromStr for ImageRef {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<ImageRef, ImageError> {
        let bad = || ImageError::NotPlain(s.chars().take(300).collect());
        if s.is_empty() || s.len() > 255 {
            return Err(bad());
        }
        let (rest, dig) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d)),
            None => (s, None),
        };
        if dig.is_some_and(|d| !digest(d)) {
            return Err(bad());
        }
        // a tag's ':' comes after the last '/'; one before it belongs to the registry's port
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tg) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if tg.is_some_and(|t| !tag(t)) {
            return Err(bad());
        }
        let mut parts: Vec<&str> = name.split('/').collect();
        let first = parts[0];
        let has_domain = parts.len() > 1
            && (first.contains(['.', ':'])
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()));
        if has_domain {
            if !domain(first) {
                return Err(bad());
            }
            parts.remove(0);
        }
        if parts.is_empty() || !parts.iter().all(|p| path_component(p)) {
            return Err(bad());
        }
        // `oci:x` is a well-formed name:tag, but podman reads it as the `oci` transport
        if !name.contains('/') && tg.is_some() && TRANSPORTS.contains(&name) {
            return Err(bad());
        }
        Ok(ImageRef(s.to_string()))
    }
}

impl ImageRef {
    /// The reference as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The host's allowlist: glob patterns (`*`, `?`, `[…]`; `*` does not cross `/`) over plain
/// references as written. Empty: only the default image.
#[derive(Debug, Clone)]
pub struct Allowlist {
    default: ImageRef,
    patterns: Vec<glob::Pattern>,
}

const MATCH: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

impl Allowlist {
    /// Builds the allowlist from the config (`projects.image`, `projects.images`).
    pub fn new(default: &str, patterns: &[String]) -> Result<Allowlist, String> {
        let default = default.parse::<ImageRef>().map_err(|e| e.to_string())?;
        let patterns = patterns
            .iter()
            .map(|p| glob::Pattern::new(p).map_err(|e| format!("{p:?}: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Allowlist { default, patterns })
    }

    /// The image a project runs: `asked` (or the default), when it is plain and allowed.
    pub fn resolve(&self, asked: Option<&str>) -> Result<ImageRef, ImageError> {
        let Some(asked) = asked else {
            return Ok(self.default.clone());
        };
        let r: ImageRef = asked.parse()?;
        let allowed = if self.patterns.is_empty() {
            r == self.default
        } else {
            self.patterns
                .iter()
                .any(|p| p.matches_with(r.as_str(), MATCH))
        };
        if allowed {
            Ok(r)
        } else {
            Err(ImageError::NotAllowed(r.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_references_parse() {
        for ok in [
            "busybox",
            "localhost/cocalc-project:latest",
            "docker.io/library/ubuntu:22.04",
            "registry.example.com:5000/team/img_a__b.c-d:v1.2-rc_3",
            "quay.io/x/y@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "quay.io/x/y:1@sha256:0123456789abcdef0123456789abcdef",
            "Host.Example/x",
            "a--b",
        ] {
            assert!(ok.parse::<ImageRef>().is_ok(), "{ok}");
        }
    }

    #[test]
    fn transports_paths_and_junk_are_refused() {
        for bad in [
            "",
            "docker-archive:/var/lib/cocalc-project-host/projects/project-x/x.tar",
            "docker-archive:x.tar",
            "oci-archive:/x",
            "oci:x",
            "dir:/home/user/img",
            "containers-storage:localhost/x",
            "containers-storage:[overlay@/x]y",
            "docker://quay.io/x",
            "docker-daemon:x:1",
            "sif:x",
            "/abs/path",
            "./rel",
            "x/../y",
            "-privileged",
            "--privileged",
            "Upper",
            "a b",
            "x:",
            ":x",
            "x@",
            "x@sha256:zz",
            "x@sha256:abc",
            "x/",
            "/x",
            "x//y",
            "a_-b",
            "localhost:/x",
            "localhost:99999x/x",
            "x:-t",
            "x\n",
        ] {
            assert!(
                matches!(bad.parse::<ImageRef>(), Err(ImageError::NotPlain(_))),
                "{bad:?} accepted"
            );
        }
        assert!("a".repeat(256).parse::<ImageRef>().is_err());
    }

    #[test]
    fn the_allowlist_defaults_to_the_default_image() {
        let a = Allowlist::new("localhost/cocalc-project:latest", &[]).unwrap();
        assert_eq!(
            a.resolve(None).unwrap().as_str(),
            "localhost/cocalc-project:latest"
        );
        assert_eq!(
            a.resolve(Some("localhost/cocalc-project:latest"))
                .unwrap()
                .as_str(),
            "localhost/cocalc-project:latest"
        );
        assert!(matches!(
            a.resolve(Some("localhost/cocalc-project:other")),
            Err(ImageError::NotAllowed(_))
        ));
        assert!(matches!(
            a.resolve(Some("docker-archive:/x.tar")),
            Err(ImageError::NotPlain(_))
        ));
    }

    #[test]
    fn globs_match_within_a_path_component() {
        let a = Allowlist::new(
            "localhost/cocalc-project:latest",
            &["localhost/cocalc-*:*".into(), "quay.io/team/*".into()],
        )
        .unwrap();
        for ok in [
            "localhost/cocalc-project:2",
            "localhost/cocalc-x:y",
            "quay.io/team/a",
            "quay.io/team/a:1",
        ] {
            assert!(a.resolve(Some(ok)).is_ok(), "{ok}");
        }
        for no in [
            "localhost/cocalc-project:latest/x",
            "quay.io/team/a/b",
            "localhost/other:1",
            // a pattern never admits a transport: parsing comes first
            "containers-storage:localhost/cocalc-x:y",
        ] {
            assert!(a.resolve(Some(no)).is_err(), "{no}");
        }
        assert!(Allowlist::new("x", &["[".into()]).is_err());
        assert!(Allowlist::new("docker-archive:/x", &[]).is_err());
    }
}
