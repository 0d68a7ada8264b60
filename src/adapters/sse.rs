//! Server-Sent Events for the HTTP API: the framing, and the two streams (`GET /events`,
//! `GET /projects/:id/logs?follow=1`) with their query parsing. A stream is a task feeding a
//! bounded channel; it ends when the client goes (the body is dropped, the send fails), when
//! the daemon shuts down (`closing`), or for a replay (`follow=0`) when the replay is sent.
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::{Response, StatusCode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::{ErrorKind, EventAnswer, LogAnswer, WireError};
use crate::backends::journal_read::{self, Cursor};
use crate::core::Host;
use crate::domain::project::ProjectId;
use crate::ports::{LogQuery, LogSince};

/// A response body (whole or streamed).
pub type Body = BoxBody<Bytes, Infallible>;

/// A comment frame sent when nothing else was for this long: proxies keep the stream open and a
/// gone client is noticed.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// How often a followed journal is read again (a new line shows within this).
const LOG_POLL: Duration = Duration::from_millis(250);

/// One SSE frame. `data` may span lines (each becomes a `data:` line); `id` and `event` are ours
/// (no newline in them).
pub fn frame(id: Option<&str>, event: &str, data: &str) -> String {
    let mut f = String::with_capacity(data.len() + 48);
    if let Some(id) = id {
        f.push_str("id: ");
        f.push_str(id);
        f.push('\n');
    }
    f.push_str("event: ");
    f.push_str(event);
    f.push('\n');
    for l in data.split('\n') {
        f.push_str("data: ");
        f.push_str(l.strip_suffix('\r').unwrap_or(l));
        f.push('\n');
    }
    f.push('\n');
    f
}

fn stream_body(rx: mpsc::Receiver<Bytes>) -> Body {
    let s = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    BodyExt::boxed(StreamBody::new(s))
}

/// Sends a chunk; `false` when the stream is over (the client went, or the daemon stops: a client
/// that stopped reading must not hold a stream, and the core, past shutdown).
async fn send(tx: &mpsc::Sender<Bytes>, b: Bytes, closing: &CancellationToken) -> bool {
    tokio::select! {
        r = tx.send(b) => r.is_ok(),
        () = closing.cancelled() => false,
    }
}

fn sse_response(body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    r
}

/// The query parameters of the two streams, parsed (a repeated or unknown value is an error).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Params {
    /// `follow=0|1` (`None`: not given)
    pub follow: Option<bool>,
    /// `lines=N`
    pub lines: Option<u32>,
    /// `since=…`
    pub since: Option<String>,
}

fn bad(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorKind::InvalidQuery, msg)
}

/// Parses the query string (`None`: no query).
pub fn params(query: Option<&str>) -> Result<Params, WireError> {
    let mut p = Params::default();
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "follow" if p.follow.is_none() => {
                // exactly as documented (the fuzzer holds the API to its spec)
                p.follow = Some(match v.as_ref() {
                    "1" => true,
                    "0" => false,
                    _ => return Err(bad("follow: 0 or 1")),
                })
            }
            "lines" if p.lines.is_none() => {
                let n: u32 = v
                    .parse()
                    .map_err(|_| bad(format!("lines: a number 1..={}", journal_read::MAX_LINES)))?;
                if !(1..=journal_read::MAX_LINES).contains(&n) {
                    return Err(bad(format!(
                        "lines: a number 1..={}",
                        journal_read::MAX_LINES
                    )));
                }
                p.lines = Some(n);
            }
            "since" if p.since.is_none() => p.since = Some(v.into_owned()),
            "follow" | "lines" | "since" => {
                return Err(bad(format!("{k} given more than once")));
            }
            _ => return Err(bad(format!("unknown parameter {k}"))),
        }
    }
    Ok(p)
}

/// `since=`: an RFC 3339 time, µs since the epoch, or a journal cursor (after that line).
pub fn log_since(s: &str) -> Result<LogSince, WireError> {
    if s.starts_with("s=") {
        return Cursor::parse(s)
            .map(LogSince::Cursor)
            .map_err(|e| bad(format!("since: {e}")));
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .map(LogSince::Time)
            .map_err(|e| bad(format!("since: {e}")));
    }
    let t: jiff::Timestamp = s.parse().map_err(|e| {
        bad(format!(
            "since: an RFC 3339 time, µs since the epoch or a journal cursor ({e})"
        ))
    })?;
    // before 1970 is the start of the journal
    Ok(LogSince::Time(
        u64::try_from(t.as_microsecond()).unwrap_or(0),
    ))
}

/// `GET /events`: resumes after `seen` (`Last-Event-ID`), else follows from now (replays the
/// whole ring with `follow=0`); `sees` filters the projects the caller may see (a `lost` gap is
/// always sent: the caller may have missed its own projects' events in it).
pub fn events(
    host: &Arc<Host>,
    seen: Option<u64>,
    follow: bool,
    sees: impl Fn(&ProjectId) -> bool + Send + 'static,
    closing: CancellationToken,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let ring_host = host.clone();
    // subscribed before the first read: nothing falls between the replay and the wake-ups
    let mut wake = host.events().watch();
    let mut seen = match (seen, follow) {
        (Some(s), _) => Some(s),
        (None, true) => Some(host.events().latest()),
        (None, false) => None,
    };
    tokio::spawn(async move {
        loop {
            let r = ring_host.events().since(seen);
            let mut out = String::new();
            if let Some((from, to)) = r.lost {
                let e = EventAnswer::lost(from, to, crate::core::now_ms());
                out.push_str(&frame(
                    Some(&to.to_string()),
                    "lost",
                    &serde_json::to_string(&e).unwrap_or_default(),
                ));
                seen = Some(to);
            }
            for n in &r.events {
                seen = Some(n.id);
                let e = EventAnswer::from(n);
                let visible = e
                    .project_id
                    .as_deref()
                    .and_then(|p| p.parse::<ProjectId>().ok())
                    .is_none_or(|p| sees(&p));
                if visible {
                    out.push_str(&frame(
                        Some(&n.id.to_string()),
                        &e.kind,
                        &serde_json::to_string(&e).unwrap_or_default(),
                    ));
                }
            }
            if seen.is_none() {
                seen = Some(r.newest);
            }
            if !out.is_empty() && !send(&tx, Bytes::from(out), &closing).await {
                return;
            }
            if !follow {
                return;
            }
            tokio::select! {
                c = wake.changed() => if c.is_err() { return },
                () = tokio::time::sleep(KEEPALIVE) => {
                    if !send(&tx, Bytes::from_static(b": keepalive\n\n"), &closing).await {
                        return;
                    }
                }
                () = closing.cancelled() => return,
            }
        }
    });
    sse_response(stream_body(rx))
}

fn log_frame(l: &crate::ports::LogLine) -> String {
    let a = LogAnswer::from(l);
    frame(
        Some(&a.cursor),
        "log",
        &serde_json::to_string(&a).unwrap_or_default(),
    )
}

/// `GET /projects/:id/logs?follow=1`: the lines `q` asks for, then every new line as it comes
/// (the journal read again every [`LOG_POLL`], after the last cursor sent).
pub async fn follow_logs(
    host: &Arc<Host>,
    id: ProjectId,
    q: LogQuery,
    closing: CancellationToken,
) -> Result<Response<Body>, WireError> {
    let connected_us = crate::core::now_ms() * 1000;
    let first = host.logs(id, &q).await.map_err(WireError::from)?;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let host = host.clone();
    tokio::spawn(async move {
        let mut cursor = first.last().map(|l| l.cursor.clone());
        let out: String = first.iter().map(log_frame).collect();
        if !out.is_empty() && !send(&tx, Bytes::from(out), &closing).await {
            return;
        }
        let mut quiet = Duration::ZERO;
        loop {
            tokio::select! {
                () = tokio::time::sleep(LOG_POLL) => {}
                () = closing.cancelled() => return,
                () = tx.closed() => return,
            }
            let since = match cursor.as_deref().map(Cursor::parse) {
                Some(Ok(c)) => LogSince::Cursor(c),
                // nothing sent yet: what came since the client connected (or its cursor)
                _ => q.since.clone().unwrap_or(LogSince::Time(connected_us)),
            };
            let next = LogQuery {
                lines: journal_read::MAX_LINES,
                since: Some(since),
            };
            let lines = match host.logs(id, &next).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(project_id = %id, error = %e, "following logs");
                    Vec::new()
                }
            };
            let out: String = if lines.is_empty() {
                quiet += LOG_POLL;
                if quiet < KEEPALIVE {
                    continue;
                }
                quiet = Duration::ZERO;
                ": keepalive\n\n".to_string()
            } else {
                quiet = Duration::ZERO;
                cursor = lines.last().map(|l| l.cursor.clone());
                lines.iter().map(log_frame).collect()
            };
            if !send(&tx, Bytes::from(out), &closing).await {
                return;
            }
        }
    });
    Ok(sse_response(stream_body(rx)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_id_event_and_every_data_line() {
        assert_eq!(
            frame(Some("7"), "state", "{\"a\":1}"),
            "id: 7\nevent: state\ndata: {\"a\":1}\n\n"
        );
        // a newline in the data cannot end the frame or forge a field
        assert_eq!(
            frame(None, "log", "x\n\nid: 99\r\ny"),
            "event: log\ndata: x\ndata: \ndata: id: 99\ndata: y\n\n"
        );
    }

    #[test]
    fn query_parameters_are_checked() {
        assert_eq!(params(None).unwrap(), Params::default());
        let p = params(Some("lines=5&follow=1&since=s%3D1%3Bi%3D2")).unwrap();
        // parsed later by `log_since`
        assert_eq!(
            p,
            Params {
                follow: Some(true),
                lines: Some(5),
                since: Some("s=1;i=2".into()),
            }
        );
        for bad in [
            "lines=0",
            "lines=x",
            "lines=10001",
            "follow=yes",
            "follow=true",
            "follow=1&follow=0",
            "nope=1",
        ] {
            let e = params(Some(bad)).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidQuery, "{bad}");
        }
    }

    #[test]
    fn since_takes_times_microseconds_and_cursors() {
        assert_eq!(
            log_since("2026-12-02T00:00:00Z").unwrap(),
            LogSince::Time(1_796_169_600_000_000)
        );
        assert_eq!(
            log_since("1700000000123456").unwrap(),
            LogSince::Time(1_700_000_000_123_456)
        );
        let c =
            "s=0123456789abcdef0123456789abcdef;i=1;b=0123456789abcdef0123456789abcdef;m=2;t=3;x=4";
        assert!(matches!(log_since(c).unwrap(), LogSince::Cursor(_)));
        assert_eq!(
            log_since("1969-01-01T00:00:00Z").unwrap(),
            LogSince::Time(0)
        );
        for bad in [
            "",
            "yesterday",
            "s=AB",
            "s=ab;i=1",
            "99999999999999999999999",
        ] {
            assert_eq!(
                log_since(bad).unwrap_err().kind,
                ErrorKind::InvalidQuery,
                "{bad}"
            );
        }
    }

    async fn next_chunk(body: &mut Body) -> String {
        let f = tokio::time::timeout(Duration::from_secs(2), body.frame())
            .await
            .expect("a frame within 2 s")
            .expect("the stream goes on")
            .expect("no error");
        String::from_utf8(f.into_data().expect("data").to_vec()).expect("utf-8")
    }

    #[tokio::test]
    async fn the_event_stream_follows_resumes_and_reports_gaps() {
        let sim = crate::backends::sim::Sim::new();
        let host = Host::with_backends(crate::config::Settings::default(), sim.backends())
            .await
            .expect("a host");
        let id: ProjectId = "6f1c2d3e-0000-4000-8000-000000000001".parse().unwrap();
        let closing = CancellationToken::new();
        let r = events(&host, None, true, |_| true, closing.clone());
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let mut live = r.into_body();
        host.start(id, None).await.expect("start");
        let mut got = String::new();
        while !got.contains("\"state\":\"running\"") {
            got.push_str(&next_chunk(&mut live).await);
        }
        let first: u64 = got
            .lines()
            .find_map(|l| l.strip_prefix("id: "))
            .and_then(|v| v.parse().ok())
            .expect("an id");
        assert!(got.contains("event: new\n"), "{got}");
        // a replay after the first event holds the rest, and ends
        let mut replay = events(&host, Some(first), false, |_| true, closing.clone()).into_body();
        let rest = next_chunk(&mut replay).await;
        assert!(!rest.contains(&format!("id: {first}\n")), "{rest}");
        assert!(rest.contains("event: state"), "{rest}");
        assert!(replay.frame().await.is_none(), "a replay ends");
        // far behind: `lost` first
        let mut behind = events(&host, Some(1), false, |_| true, closing.clone()).into_body();
        let b = next_chunk(&mut behind).await;
        assert!(
            b.starts_with(&format!("id: {}\nevent: lost\n", first - 1)),
            "{b}"
        );
        // a token that does not see the project gets none of its events
        let mut other =
            events(&host, Some(first - 1), false, |_| false, closing.clone()).into_body();
        assert!(other.frame().await.is_none());
        // shutdown ends a live stream
        closing.cancel();
        let end = tokio::time::timeout(Duration::from_secs(2), async {
            while live.frame().await.is_some() {}
        })
        .await;
        assert!(end.is_ok(), "the stream ended at shutdown");
    }
}
