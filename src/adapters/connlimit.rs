//! Connections per peer address, capped before anything is read from them (before
//! authentication): one address cannot take all of the daemon's connection slots. Every client
//! of a real deployment (the master, the local proxy) has an address of its own; a peer over the
//! cap has its new connection closed at once, unanswered, while other addresses are served.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Open connections per peer address, at most `max` each.
#[derive(Debug)]
pub struct PeerLimiter {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; its slot is freed when this is dropped.
#[derive(Debug)]
pub struct PeerSlot {
    limiter: Arc<PeerLimiter>,
    ip: IpAddr,
}

impl PeerLimiter {
    /// A limiter allowing `max` connections per address.
    pub fn new(max: usize) -> Arc<PeerLimiter> {
        Arc::new(PeerLimiter {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a new connection from `ip`, or `None` when that address has `max` open.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        // ::ffff:127.0.0.1 and 127.0.0.1 are one peer
        let ip = ip.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            limiter: self.clone(),
            ip,
        })
    }

    /// Open connections of `ip`.
    pub fn open(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(&ip.to_canonical()).copied().unwrap_or(0)
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.limiter.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            // no entry for addresses that are gone: the map is as big as the peers connected now
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_own_cap_and_slots_come_back() {
        let l = PeerLimiter::new(2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let s1 = l.admit(a).unwrap();
        let _s2 = l.admit(mapped).unwrap();
        assert!(l.admit(a).is_none(), "third from one address");
        assert!(l.admit(mapped).is_none(), "the same peer in IPv6 form");
        let _b1 = l.admit(b).expect("another address is served");
        drop(s1);
        assert_eq!(l.open(a), 1);
        let _s3 = l.admit(a).expect("a freed slot is reused");
        drop(_s3);
        drop(_s2);
        assert_eq!(l.open(a), 0);
        assert!(!l.open.lock().unwrap().contains_key(&a), "no entry left");
    }
}
