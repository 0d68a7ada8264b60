//! Failed SSH logins, per source address: a token bucket per address (an IPv6 address counts by
//! its /64, what one client usually holds). Each connection that tried to authenticate and did
//! not succeed takes a token; with none left, that address's new connections are closed at
//! accept, before any key exchange (so a brute-forcer costs the server next to nothing and
//! every other address is served at normal speed). Tokens come back at a steady rate.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed logins an address may have in a burst.
pub const BURST: f64 = 20.0;
/// One failed login is forgiven every this long.
pub const REFILL_EVERY: Duration = Duration::from_secs(3);
/// Most addresses tracked; beyond that, full buckets are forgotten first.
const MAX_TRACKED: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refilled(self, now: Instant) -> Bucket {
        let gained =
            now.saturating_duration_since(self.at).as_secs_f64() / REFILL_EVERY.as_secs_f64();
        Bucket {
            tokens: (self.tokens + gained).min(BURST),
            at: now,
        }
    }
}

/// The failed-login buckets of every source address.
#[derive(Debug, Default)]
pub struct FailedLogins {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

/// The key an address is counted under.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut s = v6.segments();
                s[4..].fill(0);
                IpAddr::V6(s.into())
            }
        },
    }
}

impl FailedLogins {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Bucket>> {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a new connection from `ip` may try to log in (at `now`).
    pub fn allows(&self, ip: IpAddr, now: Instant) -> bool {
        self.lock()
            .get(&key(ip))
            .is_none_or(|b| b.refilled(now).tokens >= 1.0)
    }

    /// Records a failed login from `ip` (at `now`).
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let mut m = self.lock();
        if m.len() >= MAX_TRACKED {
            m.retain(|_, b| b.refilled(now).tokens < BURST);
        }
        let b = m.entry(key(ip)).or_insert(Bucket {
            tokens: BURST,
            at: now,
        });
        let mut r = b.refilled(now);
        r.tokens = (r.tokens - 1.0).max(0.0);
        *b = r;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_cut_off_after_its_burst_and_forgiven_over_time() {
        let f = FailedLogins::default();
        let bad: IpAddr = "127.0.0.1".parse().expect("ip");
        let good: IpAddr = "127.0.0.2".parse().expect("ip");
        let t0 = Instant::now();
        for _ in 0..BURST as usize {
            assert!(f.allows(bad, t0));
            f.failed(bad, t0);
        }
        assert!(!f.allows(bad, t0));
        // 500 more in a row change nothing for anyone else
        for _ in 0..500 {
            f.failed(bad, t0);
        }
        assert!(!f.allows(bad, t0));
        assert!(f.allows(good, t0));
        // one token back after REFILL_EVERY
        assert!(!f.allows(bad, t0 + REFILL_EVERY / 2));
        assert!(f.allows(bad, t0 + REFILL_EVERY));
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_v4_as_v4() {
        let f = FailedLogins::default();
        let t0 = Instant::now();
        for _ in 0..BURST as usize {
            f.failed("2001:db8::1".parse().expect("ip"), t0);
        }
        assert!(!f.allows("2001:db8::ffff:2".parse().expect("ip"), t0));
        assert!(f.allows("2001:db8:0:1::1".parse().expect("ip"), t0));
        for _ in 0..BURST as usize {
            f.failed("::ffff:10.0.0.1".parse().expect("ip"), t0);
        }
        assert!(!f.allows("10.0.0.1".parse().expect("ip"), t0));
    }
}
