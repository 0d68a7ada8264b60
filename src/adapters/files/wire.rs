//! The file server's HTTP details that need no I/O: the query, single byte ranges (RFC 9110
//! §14), validators (ETag, Last-Modified, conditional requests) and the HTML listing.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::backends::safefs::{Entry, Kind, Meta};

/// What the query asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Query {
    /// `?mkdir` (POST): create the directory.
    pub mkdir: bool,
    /// `?format=html`: a directory listing as a page.
    pub html: bool,
}

impl Query {
    /// Reads the parameters it knows; others (a cache buster) are ignored.
    pub fn parse(q: Option<&str>) -> Result<Query, &'static str> {
        let mut out = Query::default();
        for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "mkdir" => out.mkdir = true,
                "format" => match v {
                    "html" => out.html = true,
                    "json" => out.html = false,
                    _ => return Err("format must be json or html"),
                },
                _ => {}
            }
        }
        Ok(out)
    }
}

/// What a `Range` header asks of a representation of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// No (usable) range: the whole representation, `200`.
    Full,
    /// Bytes `start..=end`, `206`.
    Part(u64, u64),
    /// No byte of it can be served: `416` with `Content-Range: bytes */size`.
    Unsatisfiable,
}

fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // more digits than u64 holds: as large as can be (a last-pos past the end is clamped anyway)
    Some(s.parse().unwrap_or(u64::MAX))
}

/// RFC 9110 §14.1.2 for one `bytes` range. A header that is not a valid single byte range is
/// ignored (`Full`), as §14.2 allows; several ranges are also answered with the whole file.
pub fn parse_range(header: &str, size: u64) -> Range {
    let Some((unit, set)) = header.trim().split_once('=') else {
        return Range::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || set.contains(',') {
        return Range::Full;
    }
    let Some((first, last)) = set.trim().split_once('-') else {
        return Range::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // suffix: the last N bytes (all of them when shorter)
        return match digits(last) {
            None => Range::Full,
            Some(0) => Range::Unsatisfiable,
            Some(_) if size == 0 => Range::Unsatisfiable,
            Some(n) => Range::Part(size - n.min(size), size - 1),
        };
    }
    let Some(first) = digits(first) else {
        return Range::Full;
    };
    let last = if last.is_empty() {
        None
    } else {
        match digits(last) {
            Some(l) if l >= first => Some(l),
            _ => return Range::Full,
        }
    };
    if first >= size {
        return Range::Unsatisfiable;
    }
    Range::Part(first, last.map_or(size - 1, |l| l.min(size - 1)))
}

/// A strong validator: inode, size and modification time (to the nanosecond).
pub fn etag(m: &Meta) -> String {
    format!(
        "\"{:x}-{:x}-{:x}.{:x}\"",
        m.ino, m.size, m.mtime, m.mtime_nsec
    )
}

/// The modification time.
pub fn mtime(m: &Meta) -> SystemTime {
    if m.mtime >= 0 {
        UNIX_EPOCH + Duration::new(m.mtime as u64, m.mtime_nsec)
    } else {
        UNIX_EPOCH
    }
}

/// Milliseconds since the epoch (0 before it).
pub fn mtime_ms(m: &Meta) -> u64 {
    (m.mtime.max(0) as u64) * 1000 + u64::from(m.mtime_nsec) / 1_000_000
}

/// `Last-Modified`.
pub fn last_modified(m: &Meta) -> String {
    httpdate::fmt_http_date(mtime(m))
}

fn etag_matches(list: &str, tag: &str, weak: bool) -> bool {
    list.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t == tag || (weak && t.strip_prefix("W/").is_some_and(|t| t == tag)))
}

/// Whether a GET/HEAD with these conditions gets `304` (RFC 9110 §13.2.2: If-None-Match wins
/// over If-Modified-Since).
pub fn not_modified(
    if_none_match: Option<&str>,
    if_modified_since: Option<&str>,
    m: &Meta,
) -> bool {
    if let Some(inm) = if_none_match {
        return etag_matches(inm, &etag(m), true);
    }
    match if_modified_since.and_then(|d| httpdate::parse_http_date(d).ok()) {
        // HTTP dates have whole seconds
        Some(since) => m.mtime >= 0 && UNIX_EPOCH + Duration::from_secs(m.mtime as u64) <= since,
        None => false,
    }
}

/// Whether `If-Range` lets the Range apply (absent: yes; a strong ETag or the exact date).
pub fn if_range_holds(if_range: Option<&str>, m: &Meta) -> bool {
    match if_range.map(str::trim) {
        None => true,
        Some(v) if v.starts_with('"') => v == etag(m),
        Some(v) if v.starts_with("W/") => false,
        Some(v) => v == last_modified(m),
    }
}

/// Escapes text for HTML (content and quoted attributes).
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes one path segment (everything but RFC 3986's unreserved characters).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The plain HTML listing of a directory. `base`: what a link is relative to (the directory's
/// own last segment and a `/` when the URL did not end with one; empty when it did).
pub fn listing_html(title: &str, base: &str, entries: &[Entry], truncated: bool) -> String {
    let mut s = String::new();
    let t = html_escape(title);
    s.push_str(&format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head><body><h1>{t}</h1><ul>\n"
    ));
    for e in entries {
        let slash = if e.meta.kind == Kind::Dir { "/" } else { "" };
        let href = html_escape(&format!("{base}{}{slash}", encode_segment(&e.name)));
        let size = if e.meta.kind == Kind::File {
            format!(" ({} bytes)", e.meta.size)
        } else {
            String::new()
        };
        s.push_str(&format!(
            "<li><a href=\"{href}\">{}{slash}</a>{size}</li>\n",
            html_escape(&e.name)
        ));
    }
    s.push_str("</ul>");
    if truncated {
        s.push_str("<p>(more entries not shown)</p>");
    }
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(size: u64) -> Meta {
        Meta {
            kind: Kind::File,
            size,
            mtime: 1_700_000_000,
            mtime_nsec: 5,
            mode: 0o644,
            uid: 1,
            gid: 1,
            ino: 42,
            dev: 1,
        }
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        use Range::*;
        assert_eq!(parse_range("bytes=0-0", 10), Part(0, 0));
        assert_eq!(parse_range("bytes=2-5", 10), Part(2, 5));
        assert_eq!(parse_range("bytes=2-", 10), Part(2, 9));
        assert_eq!(parse_range("bytes=2-100", 10), Part(2, 9));
        assert_eq!(
            parse_range("bytes=2-99999999999999999999999", 10),
            Part(2, 9)
        );
        assert_eq!(parse_range("bytes=-3", 10), Part(7, 9));
        assert_eq!(parse_range("bytes=-30", 10), Part(0, 9));
        assert_eq!(parse_range("BYTES = 1-2", 10), Part(1, 2));
        assert_eq!(parse_range("bytes=10-", 10), Unsatisfiable);
        assert_eq!(parse_range("bytes=10-20", 10), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 10), Unsatisfiable);
        assert_eq!(parse_range("bytes=-5", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        // not a valid single byte range: ignored
        for h in [
            "bytes=5-2",
            "bytes=a-b",
            "bytes=",
            "bytes=-",
            "items=0-1",
            "bytes=0-1,3-4",
            "0-1",
            "bytes=+1-2",
            "bytes=1--2",
        ] {
            assert_eq!(parse_range(h, 10), Full, "{h}");
        }
    }

    #[test]
    fn conditions() {
        let m = meta(3);
        let tag = etag(&m);
        assert!(not_modified(Some(&tag), None, &m));
        assert!(not_modified(Some(&format!("W/{tag}")), None, &m));
        assert!(not_modified(Some(&format!("\"x\", {tag}")), None, &m));
        assert!(not_modified(Some("*"), None, &m));
        assert!(!not_modified(
            Some("\"other\""),
            Some(&last_modified(&m)),
            &m
        ));
        assert!(not_modified(None, Some(&last_modified(&m)), &m));
        assert!(!not_modified(
            None,
            Some("Sun, 06 Nov 1994 08:49:37 GMT"),
            &m
        ));
        assert!(!not_modified(None, Some("garbage"), &m));
        assert!(!not_modified(None, None, &m));
        assert!(if_range_holds(None, &m));
        assert!(if_range_holds(Some(&tag), &m));
        assert!(!if_range_holds(Some(&format!("W/{tag}")), &m));
        assert!(!if_range_holds(Some("\"other\""), &m));
        assert!(if_range_holds(Some(&last_modified(&m)), &m));
        assert!(!if_range_holds(Some("Sun, 06 Nov 1994 08:49:37 GMT"), &m));
        assert_ne!(etag(&m), etag(&meta(4)));
        assert_eq!(mtime_ms(&m), 1_700_000_000_000);
    }

    #[test]
    fn queries() {
        assert_eq!(Query::parse(None), Ok(Query::default()));
        let q = Query::parse(Some("mkdir&x=1")).unwrap();
        assert!(q.mkdir && !q.html);
        assert!(Query::parse(Some("format=html")).unwrap().html);
        assert!(Query::parse(Some("format=xml")).is_err());
    }

    #[test]
    fn listings_escape_names() {
        let e = Entry {
            name: "<script>&\"x\" y".into(),
            meta: meta(1),
        };
        let d = Entry {
            name: "d".into(),
            meta: Meta {
                kind: Kind::Dir,
                ..meta(0)
            },
        };
        let h = listing_html("/a<b>", "", &[e, d], true);
        assert!(!h.contains("<script>"));
        assert!(h.contains("&lt;script&gt;&amp;&quot;x&quot; y"));
        assert!(h.contains("href=\"%3Cscript%3E%26%22x%22%20y\""));
        assert!(h.contains("href=\"d/\""));
        assert!(h.contains("<title>/a&lt;b&gt;</title>"));
        assert!(h.contains("more entries"));
        assert_eq!(encode_segment("a b/ü"), "a%20b%2F%C3%BC");
    }
}
