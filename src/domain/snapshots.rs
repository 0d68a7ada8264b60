//! Snapshot vocabulary and the rolling-snapshot retention, as pure functions: the validated
//! [`SnapshotName`], the names and instants of rolling (`auto-…`) snapshots, and which snapshots a
//! policy keeps. No I/O: `host` applies the plan with `btrfs`.
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use jiff::tz::Offset;
use jiff::{Timestamp, civil};
use serde::Serialize;

/// Prefix of the names of rolling snapshots; reserved (a user cannot create such a name).
pub const AUTO_PREFIX: &str = "auto-";
/// Prefix of the default names of snapshots created on request without a name.
pub const MANUAL_PREFIX: &str = "manual-";
/// Longest snapshot name.
pub const MAX_NAME_LEN: usize = 64;

/// A snapshot name: 1 to 64 of `A-Z a-z 0-9 . _ -`, starting with a letter or digit, never
/// containing `..`. Constructible only by parsing, so it is safe in a path, an argv and a URL.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotName(String);

/// Why a string is not a snapshot name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid snapshot name {0:?}: use 1 to 64 of A-Z a-z 0-9 . _ - starting with a letter or digit, without \"..\""
)]
pub struct InvalidSnapshotName(pub String);

impl FromStr for SnapshotName {
    type Err = InvalidSnapshotName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= MAX_NAME_LEN
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            && !s.contains("..");
        if ok {
            Ok(SnapshotName(s.to_owned()))
        } else {
            Err(InvalidSnapshotName(s.chars().take(80).collect()))
        }
    }
}

impl SnapshotName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Whether this is a rolling snapshot's name (`auto-…`).
    pub fn is_auto(&self) -> bool {
        self.0.starts_with(AUTO_PREFIX)
    }
    /// The name of a rolling snapshot taken at `ms`.
    pub fn auto_at(ms: u64) -> SnapshotName {
        SnapshotName(format!("{AUTO_PREFIX}{}", basic_iso(ms)))
    }
    /// The default name of a snapshot made on request at `ms`.
    pub fn manual_at(ms: u64) -> SnapshotName {
        SnapshotName(format!("{MANUAL_PREFIX}{}", basic_iso(ms)))
    }
    /// The instant (ms, whole seconds) a rolling snapshot was taken, read back from its name.
    pub fn auto_time(&self) -> Option<u64> {
        parse_basic_iso(self.0.strip_prefix(AUTO_PREFIX)?)
    }
}

impl fmt::Display for SnapshotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SnapshotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotName({})", self.0)
    }
}

impl Serialize for SnapshotName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

const DAY_MS: u64 = 86_400_000;

/// `ms` as a UTC civil date and time (by `jiff`; the one calendar of the crate: snapshot names,
/// retention windows, the CLI's times). Instants past jiff's range (year 9999) clamp to its end.
pub fn utc(ms: u64) -> civil::DateTime {
    let ts = i64::try_from(ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .unwrap_or(Timestamp::MAX);
    Offset::UTC.to_datetime(ts)
}

const BASIC_ISO: &str = "%Y%m%dT%H%M%SZ";

/// `ms` as ISO 8601 basic UTC, `20260102T030405Z` (URL- and file-name-safe).
pub fn basic_iso(ms: u64) -> String {
    utc(ms).strftime(BASIC_ISO).to_string()
}

/// Parses [`basic_iso`] back to ms; only that exact form (16 characters, a real date).
pub fn parse_basic_iso(s: &str) -> Option<u64> {
    let dt = civil::DateTime::strptime(BASIC_ISO, s).ok()?;
    let ms = u64::try_from(Offset::UTC.to_timestamp(dt).ok()?.as_millisecond()).ok()?;
    // strptime is lenient about widths and signs; the canonical form is what names hold
    (basic_iso(ms) == s).then_some(ms)
}

/// How many rolling snapshots to keep in each window. Counts, not ages: "daily = 7" keeps the
/// newest snapshot of each of the 7 most recent days (UTC) that have one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Retention {
    /// The newest N snapshots (the timer takes one every 15 minutes when something changed).
    pub frequent: usize,
    /// The newest snapshot of each of the N most recent days that have one.
    pub daily: usize,
    /// The newest snapshot of each of the N most recent ISO weeks (Monday–Sunday) that have one.
    pub weekly: usize,
    /// The newest snapshot of each of the N most recent calendar months that have one.
    pub monthly: usize,
}

impl Default for Retention {
    /// CoCalc's defaults.
    fn default() -> Self {
        Retention {
            frequent: 4,
            daily: 7,
            weekly: 4,
            monthly: 2,
        }
    }
}

fn day(ms: u64) -> u64 {
    ms / DAY_MS
}
fn iso_week(ms: u64) -> u64 {
    // ISO weeks run Monday to Sunday; the ISO week-year keeps a week that spans New Year whole
    let w = utc(ms).date().iso_week_date();
    u64::try_from(w.year()).unwrap_or(0) * 53 + u64::from(w.week().unsigned_abs())
}
fn month(ms: u64) -> u64 {
    let d = utc(ms);
    u64::try_from(d.year()).unwrap_or(0) * 12 + u64::from(d.month().unsigned_abs())
}

/// The instants (ms) among `times` that `policy` keeps. Only a function of the set of instants:
/// running it again, or on its own result, keeps the same snapshots.
pub fn keep(times: &[u64], policy: &Retention) -> BTreeSet<u64> {
    let mut desc: Vec<u64> = times.to_vec();
    desc.sort_unstable_by(|a, b| b.cmp(a));
    desc.dedup();
    let mut kept: BTreeSet<u64> = desc.iter().take(policy.frequent).copied().collect();
    type Bucket = fn(u64) -> u64;
    let windows: [(usize, Bucket); 3] = [
        (policy.daily, day),
        (policy.weekly, iso_week),
        (policy.monthly, month),
    ];
    for (count, bucket) in windows {
        let mut seen = 0;
        let mut last = None;
        for &t in &desc {
            if seen == count {
                break;
            }
            let b = bucket(t);
            if last != Some(b) {
                // the newest snapshot of a bucket not seen yet
                last = Some(b);
                seen += 1;
                kept.insert(t);
            }
        }
    }
    kept
}

/// What one sweep does to one project's rolling snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepPlan {
    /// Rolling snapshots to delete first (expired by the policy).
    pub delete: Vec<SnapshotName>,
    /// The rolling snapshot to take afterwards, if any.
    pub create: Option<SnapshotName>,
}

/// Plans a sweep at `now` (ms): `existing` are the project's rolling snapshots, `changed` says
/// whether the subvolume changed since the newest of them. A new snapshot is planned only when
/// something changed; expired snapshots are chosen with the new one counted, so deleting them
/// first never leaves more than the policy allows.
pub fn plan_sweep(
    existing: &[SnapshotName],
    changed: bool,
    now: u64,
    policy: &Retention,
) -> SweepPlan {
    let mut times: Vec<u64> = existing.iter().filter_map(|n| n.auto_time()).collect();
    let new = SnapshotName::auto_at(now);
    let new_time = new.auto_time();
    let create = match new_time {
        Some(t) if changed && !times.contains(&t) => {
            times.push(t);
            Some((new, t))
        }
        _ => None,
    };
    let kept = keep(&times, policy);
    let delete = existing
        .iter()
        .filter(|n| n.auto_time().is_some_and(|t| !kept.contains(&t)))
        .cloned()
        .collect();
    let create = create.and_then(|(n, t)| kept.contains(&t).then_some(n));
    SweepPlan { delete, create }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> u64 {
        parse_basic_iso(s).unwrap()
    }

    #[test]
    fn names_are_validated() {
        for ok in [
            "a",
            "before-upgrade",
            "v1.2_final",
            "auto-20260102T030405Z",
            &"x".repeat(64),
        ] {
            assert!(ok.parse::<SnapshotName>().is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a..b",
            "../etc",
            "a/b",
            "/a",
            ".hidden",
            "-rf",
            "_x",
            "a b",
            "a\0b",
            "a:b",
            "%2e%2e",
            "é",
            &"x".repeat(65),
        ] {
            assert!(bad.parse::<SnapshotName>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn auto_names_round_trip_their_instant() {
        let t = at("20260102T030405Z");
        assert_eq!(basic_iso(t), "20260102T030405Z");
        let n = SnapshotName::auto_at(t + 999);
        assert_eq!(n.as_str(), "auto-20260102T030405Z");
        assert!(n.is_auto());
        assert_eq!(n.auto_time(), Some(t));
        assert!(!SnapshotName::manual_at(t).is_auto());
        assert_eq!(SnapshotName::manual_at(t).auto_time(), None);
        assert_eq!(basic_iso(0), "19700101T000000Z");
        assert_eq!(at("20000229T235959Z"), 951_868_799_000);
        for bad in [
            "20250229T000000Z",
            "20251301T000000Z",
            "20250101T240000Z",
            "2025010T1000000Z",
            "20250101 000000Z",
            "2025+101T000000Z",
        ] {
            assert_eq!(parse_basic_iso(bad), None, "{bad}");
        }
        // every day over 30 years goes through the calendar and back
        for d in 0..(366 * 30) {
            let ms = at("20000101T120000Z") + d * DAY_MS;
            assert_eq!(parse_basic_iso(&basic_iso(ms)), Some(ms));
        }
    }

    #[test]
    fn buckets_change_exactly_at_monday_and_the_first_of_the_month() {
        // 60 years of consecutive days: a new week exactly on Mondays (1970-01-05 was one),
        // a new month exactly on the 1st
        let mut prev = at("19700101T120000Z");
        for _ in 1..(366 * 60) {
            let t = prev + DAY_MS;
            let day_no = t / DAY_MS;
            assert_eq!(
                iso_week(t) != iso_week(prev),
                (day_no + 3).is_multiple_of(7),
                "{}",
                basic_iso(t)
            );
            assert!(iso_week(t) >= iso_week(prev));
            let first = basic_iso(t)[6..8] == *"01";
            assert_eq!(month(t) != month(prev), first, "{}", basic_iso(t));
            prev = t;
        }
    }

    #[test]
    fn weeks_start_on_monday_and_months_are_calendar_months() {
        // 2025-01-05 is a Sunday, 2025-01-06 a Monday
        assert_ne!(
            iso_week(at("20250105T235959Z")),
            iso_week(at("20250106T000000Z"))
        );
        assert_eq!(
            iso_week(at("20250106T000000Z")),
            iso_week(at("20250112T235959Z"))
        );
        assert_eq!(month(at("20250201T000000Z")), month(at("20250228T235959Z")));
        assert_ne!(month(at("20250131T235959Z")), month(at("20250201T000000Z")));
        assert_eq!(
            month(at("20241231T000000Z")) + 1,
            month(at("20250101T000000Z"))
        );
    }

    fn names(v: &[u64]) -> Vec<String> {
        v.iter().map(|t| basic_iso(*t)).collect()
    }

    #[test]
    fn frequent_keeps_the_newest() {
        let p = Retention {
            frequent: 2,
            daily: 0,
            weekly: 0,
            monthly: 0,
        };
        let t: Vec<u64> = (0..5)
            .map(|i| at("20250106T000000Z") + i * 900_000)
            .collect();
        let k: Vec<u64> = keep(&t, &p).into_iter().collect();
        assert_eq!(k, [t[3], t[4]]);
        assert!(keep(&t, &Retention { frequent: 0, ..p }).is_empty());
        assert!(keep(&[], &Retention::default()).is_empty());
    }

    #[test]
    fn ten_weeks_of_daily_changes_keep_exactly_the_policy() {
        // the scenario of the e2e test: a snapshot every day at 12:00 from Monday 2025-01-06 for
        // 70 days, then four more on the last day (Sunday 2025-03-16) every 15 minutes
        let t0 = at("20250106T120000Z");
        let mut t: Vec<u64> = (0..70).map(|d| t0 + d * DAY_MS).collect();
        let last = t0 + 69 * DAY_MS;
        t.extend((1..=4).map(|i| last + i * 900_000));
        let k: Vec<u64> = keep(&t, &Retention::default()).into_iter().collect();
        let want = [
            "20250223T120000Z", // weekly (4th most recent week, its Sunday)
            "20250228T120000Z", // monthly (February's newest)
            "20250302T120000Z", // weekly
            "20250309T120000Z", // weekly
            "20250310T120000Z", // daily ×6
            "20250311T120000Z",
            "20250312T120000Z",
            "20250313T120000Z",
            "20250314T120000Z",
            "20250315T120000Z",
            // 2025-03-16 12:00 is gone: not the day's newest, not among the 4 newest
            "20250316T121500Z", // frequent ×4; 13:00 is also the daily, weekly and monthly
            "20250316T123000Z",
            "20250316T124500Z",
            "20250316T130000Z",
        ];
        assert_eq!(names(&k), want);
        // keeping is stable: the kept set keeps itself
        assert_eq!(
            keep(&k, &Retention::default())
                .into_iter()
                .collect::<Vec<_>>(),
            k
        );
    }

    #[test]
    fn pruning_as_you_go_ends_where_pruning_once_does() {
        let p = Retention::default();
        let t0 = at("20250106T120000Z");
        // irregular: every 7 hours for 9 weeks
        let all: Vec<u64> = (0..(9 * 24)).map(|i| t0 + i * 7 * 3_600_000).collect();
        let mut have: Vec<SnapshotName> = Vec::new();
        for &now in &all {
            let plan = plan_sweep(&have, true, now, &p);
            have.retain(|n| !plan.delete.contains(n));
            have.extend(plan.create);
            assert!(have.len() <= p.frequent + p.daily + p.weekly + p.monthly);
        }
        let got: Vec<u64> = have.iter().filter_map(SnapshotName::auto_time).collect();
        let want: Vec<u64> = keep(&all, &p).into_iter().collect();
        assert_eq!(names(&got), names(&want));
    }

    #[test]
    fn sweep_plans() {
        let p = Retention::default();
        let now = at("20250106T120000Z");
        // nothing changed: nothing new, nothing to delete
        let e = [SnapshotName::auto_at(now - 900_000)];
        assert_eq!(
            plan_sweep(&e, false, now, &p),
            SweepPlan {
                delete: vec![],
                create: None
            }
        );
        // changed: a new one
        assert_eq!(
            plan_sweep(&e, true, now, &p).create,
            Some(SnapshotName::auto_at(now))
        );
        // the same second again: no duplicate
        let e2 = [SnapshotName::auto_at(now)];
        assert_eq!(plan_sweep(&e2, true, now + 10, &p).create, None);
        // expired ones are named for deletion, the new one counted; manual names are never touched
        let p1 = Retention {
            frequent: 1,
            daily: 0,
            weekly: 0,
            monthly: 0,
        };
        let manual: SnapshotName = "mine".parse().unwrap();
        let e3 = [SnapshotName::auto_at(now - 1000), manual];
        let plan = plan_sweep(&e3, true, now, &p1);
        assert_eq!(plan.delete, vec![SnapshotName::auto_at(now - 1000)]);
        assert_eq!(plan.create, Some(SnapshotName::auto_at(now)));
        // a policy of all zeros keeps no rolling snapshot and takes none
        let p0 = Retention { frequent: 0, ..p1 };
        let plan = plan_sweep(&e3, true, now, &p0);
        assert_eq!(plan.create, None);
        assert_eq!(plan.delete.len(), 1);
    }
}
