//! Reading a project unit's journal for `GET /projects/:id/logs`: `journalctl -u <unit> -o json`
//! through the command runner (the daemon already reads the journal that way for start
//! failures; its sandbox allows it, and no journal file format is parsed here).
//!
//! `-u` also matches what journald writes *about* the unit (`OBJECT_SYSTEMD_UNIT=` with `_UID=0`):
//! the "Suppressed N messages from <unit>" entry journald logs when the unit floods past its rate
//! limit (`LogRateLimit*=`, set on every project unit) carries `N_DROPPED=N`; it is turned into an
//! explicit "suppressed N lines" entry so lost lines never go unnoticed.
use std::time::Duration;

use serde_json::Value;

/// Most lines one read returns.
pub const MAX_LINES: u32 = 10_000;
/// Lines a read returns when the caller gives no count.
pub const DEFAULT_LINES: u32 = 200;
/// Longest journal cursor accepted (journald's are ~120 characters).
const MAX_CURSOR: usize = 512;

/// Where a read starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogSince {
    /// entries at or after this time (µs since the epoch)
    Time(u64),
    /// entries after this journal cursor
    Cursor(Cursor),
}

/// A journal cursor as journald writes them (`s=…;i=…;…`): only `[0-9a-z=;]`, so it is safe in
/// an argv (it also never starts with `-`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(String);

impl Cursor {
    /// Checks a cursor a client sent: journald's shape exactly (`s=<32 hex>;i=<hex>;b=<32
    /// hex>;m=<hex>;t=<hex>;x=<hex>`), which journalctl can always seek to (a cursor of another
    /// journal seeks to the nearest entry).
    pub fn parse(s: &str) -> Result<Cursor, String> {
        let keys = ["s", "i", "b", "m", "t", "x"];
        let hex = |v: &str, exact: Option<usize>| {
            !v.is_empty()
                && v.len() <= 32
                && exact.is_none_or(|n| v.len() == n)
                && v.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let parts: Vec<&str> = s.split(';').collect();
        let ok = s.len() <= MAX_CURSOR
            && parts.len() == keys.len()
            && parts.iter().zip(keys).all(|(p, k)| {
                p.split_once('=')
                    .is_some_and(|(pk, v)| pk == k && hex(v, matches!(k, "s" | "b").then_some(32)))
            });
        if ok {
            Ok(Cursor(s.to_string()))
        } else {
            Err(
                "not a journal cursor (s=<32 hex>;i=<hex>;b=<32 hex>;m=<hex>;t=<hex>;x=<hex>)"
                    .into(),
            )
        }
    }

    /// The cursor.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogQuery {
    /// at most this many (the newest of the range)
    pub lines: u32,
    /// from where (`None`: the newest `lines`)
    pub since: Option<LogSince>,
}

impl Default for LogQuery {
    fn default() -> Self {
        LogQuery {
            lines: DEFAULT_LINES,
            since: None,
        }
    }
}

/// One journal entry of a project unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// where to resume after this entry
    pub cursor: String,
    /// µs since the epoch
    pub time_usec: u64,
    /// syslog priority (0 emerg … 7 debug)
    pub priority: u8,
    /// the message (invalid UTF-8 replaced)
    pub message: String,
    /// lines journald dropped under the unit's rate limit, when this entry says so
    pub suppressed: Option<u64>,
}

/// The `journalctl` arguments for `q` on `unit`.
pub fn journalctl_args(unit: &str, q: &LogQuery) -> Vec<String> {
    let mut a: Vec<String> = [
        "-u",
        unit,
        "-o",
        "json",
        "--output-fields=MESSAGE,PRIORITY,N_DROPPED",
        "--no-pager",
        "-q",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(format!("--lines={}", q.lines.clamp(1, MAX_LINES)));
    match &q.since {
        None => {}
        // whole seconds here; `parse` drops what is before the µs asked for
        Some(LogSince::Time(us)) => a.push(format!("--since=@{}", us / 1_000_000)),
        Some(LogSince::Cursor(c)) => a.push(format!("--after-cursor={}", c.as_str())),
    }
    a
}

fn field<'a>(v: &'a Value, k: &str) -> Option<&'a Value> {
    v.get(k).filter(|v| !v.is_null())
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        // journald gives binary (or non-UTF-8) fields as byte arrays
        Value::Array(bytes) => {
            let b: Vec<u8> = bytes
                .iter()
                .filter_map(|x| x.as_u64().and_then(|n| u8::try_from(n).ok()))
                .collect();
            String::from_utf8_lossy(&b).into_owned()
        }
        other => other.to_string(),
    }
}

fn number(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::String(s) => s.trim().parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// Entries of `journalctl -o json` output, oldest first; entries before `since` (µs) dropped.
pub fn parse(json_lines: &str, since: Option<u64>) -> Vec<LogLine> {
    json_lines
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            let cursor = field(&v, "__CURSOR")?.as_str()?.to_string();
            let time_usec = number(field(&v, "__REALTIME_TIMESTAMP"))?;
            let priority = number(field(&v, "PRIORITY"))
                .and_then(|p| u8::try_from(p).ok())
                .filter(|p| *p <= 7)
                .unwrap_or(6);
            let suppressed = number(field(&v, "N_DROPPED"));
            let message = match suppressed {
                Some(n) => format!("suppressed {n} lines (journald rate limit)"),
                None => {
                    let mut m = field(&v, "MESSAGE").map(text).unwrap_or_default();
                    // conmon passes the container's line with its newline
                    if m.ends_with('\n') {
                        m.pop();
                        if m.ends_with('\r') {
                            m.pop();
                        }
                    }
                    m
                }
            };
            Some(LogLine {
                cursor,
                time_usec,
                priority,
                message,
                suppressed,
            })
        })
        .filter(|l| since.is_none_or(|s| l.time_usec >= s))
        .collect()
}

/// Reads `q` of `unit`'s journal.
pub async fn read(unit: &str, q: &LogQuery) -> Result<Vec<LogLine>, String> {
    let args = journalctl_args(unit, q);
    let out = crate::cmd::run("/usr/bin/journalctl", &args, Duration::from_secs(20))
        .await
        .map_err(|e| format!("cannot read the journal: {e}"))?;
    let since = match q.since {
        Some(LogSince::Time(us)) => Some(us),
        _ => None,
    };
    Ok(parse(&out, since))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIT: &str = "cocalc-project-6f1c2d3e-0000-4000-8000-000000000001.service";
    const CURSOR: &str =
        "s=0123456789abcdef0123456789abcdef;i=1f;b=fedcba9876543210fedcba9876543210;m=9;t=5ee;x=77";

    #[test]
    fn args_bound_the_read_and_resume_after_a_cursor() {
        let a = journalctl_args(UNIT, &LogQuery::default());
        assert_eq!(&a[..2], ["-u", UNIT]);
        assert!(a.contains(&"--lines=200".to_string()), "{a:?}");
        let c = Cursor::parse(CURSOR).unwrap();
        let a = journalctl_args(
            UNIT,
            &LogQuery {
                lines: 0,
                since: Some(LogSince::Cursor(c)),
            },
        );
        assert!(a.contains(&"--lines=1".to_string()), "{a:?}");
        assert!(a.contains(&format!("--after-cursor={CURSOR}")));
        let a = journalctl_args(
            UNIT,
            &LogQuery {
                lines: 1_000_000,
                since: Some(LogSince::Time(1_700_000_000_123_456)),
            },
        );
        assert!(a.contains(&"--lines=10000".to_string()), "{a:?}");
        assert!(a.contains(&"--since=@1700000000".to_string()), "{a:?}");
    }

    #[test]
    fn cursors_are_checked() {
        for bad in [
            "",
            "-n",
            "--since=x",
            "s=a b",
            "s=A",
            "x=1",
            "s=1;i=2\n",
            "s=0123abcd;i=9;b=ff;m=1;t=2;x=3",
            &CURSOR.replace("x=77", "x=7g"),
            &CURSOR.replace("i=1f", "i="),
            &format!("{CURSOR};y=1"),
            &CURSOR.replace(";i", ";;i"),
        ] {
            assert!(Cursor::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Cursor::parse(CURSOR).is_ok());
    }

    #[test]
    fn parses_entries_binary_messages_and_suppression_notices() {
        let out = [
            r#"{"__CURSOR":"s=1;i=1","__REALTIME_TIMESTAMP":"1700000000000001","PRIORITY":"6","MESSAGE":"line 1\r\n"}"#,
            r#"{"__CURSOR":"s=1;i=2","__REALTIME_TIMESTAMP":"1700000000000002","PRIORITY":"3","MESSAGE":[104,105,255]}"#,
            r#"{"__CURSOR":"s=1;i=3","__REALTIME_TIMESTAMP":"1700000000000003","PRIORITY":"4","MESSAGE":"Suppressed 1234 messages from x.service","N_DROPPED":"1234"}"#,
            "not json",
            r#"{"MESSAGE":"no cursor"}"#,
            r#"{"__CURSOR":"s=1;i=4","__REALTIME_TIMESTAMP":"1700000000000004","MESSAGE":null}"#,
        ]
        .join("\n");
        let l = parse(&out, None);
        assert_eq!(l.len(), 4);
        assert_eq!(
            l[0],
            LogLine {
                cursor: "s=1;i=1".into(),
                time_usec: 1_700_000_000_000_001,
                priority: 6,
                message: "line 1".into(),
                suppressed: None,
            }
        );
        assert_eq!((l[1].priority, l[1].message.as_str()), (3, "hi\u{fffd}"));
        assert_eq!(l[2].suppressed, Some(1234));
        assert_eq!(l[2].message, "suppressed 1234 lines (journald rate limit)");
        assert_eq!((l[3].priority, l[3].message.as_str()), (6, ""));
        let l = parse(&out, Some(1_700_000_000_000_003));
        assert_eq!(l.len(), 2);
    }
}
