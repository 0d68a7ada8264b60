//! The numbered event ring behind `GET /events`: every [`HostEvent`] the core publishes gets the
//! next id and a time, and the last [`CAPACITY`] stay for clients that resume (`Last-Event-ID`).
//! A client further behind than the ring reaches gets an explicit gap ([`Replay::lost`]) instead
//! of silently missing events.
//!
//! Ids start at the daemon's start time in µs, so ids of a restarted daemon are above every id
//! of the last one: a client resuming across a restart sees the restart as a gap, never a replay.
use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::watch;

use super::HostEvent;

/// Events kept for resuming clients.
pub const CAPACITY: usize = 4096;

/// One event with its id and when it happened (ms since the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Numbered {
    /// monotonically increasing, never reused
    pub id: u64,
    /// ms since the epoch
    pub time_ms: u64,
    /// what happened
    pub event: HostEvent,
}

/// What a client that has seen up to some id gets next.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Replay {
    /// ids the ring no longer holds (first, last), when the client is behind it
    pub lost: Option<(u64, u64)>,
    /// the events after the client's id, in order
    pub events: Vec<Numbered>,
    /// the newest id at the time of the read (where the client is once it has these)
    pub newest: u64,
}

/// The ring (bounded; the oldest event goes first).
#[derive(Debug)]
pub struct EventRing {
    ring: Mutex<Inner>,
    latest: watch::Sender<u64>,
    capacity: usize,
}

#[derive(Debug)]
struct Inner {
    events: VecDeque<Numbered>,
    /// the id the next event gets
    next: u64,
}

impl EventRing {
    /// A ring of `capacity` events whose first id is `first_id` (at least 1).
    pub fn new(capacity: usize, first_id: u64) -> EventRing {
        let first_id = first_id.max(1);
        EventRing {
            ring: Mutex::new(Inner {
                events: VecDeque::with_capacity(capacity.min(CAPACITY)),
                next: first_id,
            }),
            latest: watch::Sender::new(first_id - 1),
            capacity: capacity.max(1),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Numbers and keeps `event`; its id.
    pub fn push(&self, event: HostEvent, time_ms: u64) -> u64 {
        let id = {
            let mut r = self.inner();
            let id = r.next;
            r.next += 1;
            if r.events.len() == self.capacity {
                r.events.pop_front();
            }
            r.events.push_back(Numbered { id, time_ms, event });
            id
        };
        self.latest.send_replace(id);
        id
    }

    /// The id of the newest event (one below the first id while there is none).
    pub fn latest(&self) -> u64 {
        *self.latest.borrow()
    }

    /// Wakes on every new event (the value is the newest id).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    /// What follows `seen` (the last id a client got; `None`: it got none, start at the ring's
    /// oldest). A `seen` the ring never handed out (above the newest) is answered like one below
    /// the ring: a gap up to the newest, then what the ring holds.
    pub fn since(&self, seen: Option<u64>) -> Replay {
        let r = self.inner();
        let newest = r.next - 1;
        let oldest = r.events.front().map_or(r.next, |e| e.id);
        let Some(seen) = seen else {
            return Replay {
                lost: None,
                events: r.events.iter().cloned().collect(),
                newest,
            };
        };
        if seen > newest {
            return Replay {
                lost: Some((seen, newest)),
                events: r.events.iter().cloned().collect(),
                newest,
            };
        }
        let lost = (seen + 1 < oldest).then_some((seen + 1, oldest - 1));
        // ids are consecutive: the events after `seen` start at a computed index
        let skip = (seen + 1).saturating_sub(oldest) as usize;
        Replay {
            lost,
            events: r.events.iter().skip(skip).cloned().collect(),
            newest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::project::{ProjectId, ProjectState};

    fn id(n: u8) -> ProjectId {
        format!("6f1c2d3e-0000-4000-8000-0000000000{n:02x}")
            .parse()
            .unwrap()
    }

    fn ids(r: &Replay) -> Vec<u64> {
        r.events.iter().map(|e| e.id).collect()
    }

    #[test]
    fn numbers_events_in_order_and_resumes_after_an_id() {
        let ring = EventRing::new(8, 100);
        assert_eq!(ring.latest(), 99);
        let empty = |newest| Replay {
            newest,
            ..Replay::default()
        };
        assert_eq!(ring.since(None), empty(99));
        assert_eq!(ring.since(Some(99)), empty(99));
        for n in 0..3 {
            ring.push(HostEvent::New(id(n)), 5);
        }
        assert_eq!(ring.latest(), 102);
        assert_eq!(ids(&ring.since(None)), [100, 101, 102]);
        let r = ring.since(Some(100));
        assert_eq!((r.lost, ids(&r)), (None, vec![101, 102]));
        assert_eq!(r.events[0].event, HostEvent::New(id(1)));
        assert_eq!(ring.since(Some(102)), empty(102));
    }

    #[test]
    fn a_client_behind_the_ring_gets_the_gap_then_the_rest() {
        let ring = EventRing::new(4, 1);
        for n in 0..10 {
            ring.push(HostEvent::State(id(n), ProjectState::Running), 0);
        }
        // holds 7..=10
        let r = ring.since(Some(2));
        assert_eq!(r.lost, Some((3, 6)));
        assert_eq!(ids(&r), [7, 8, 9, 10]);
        // exactly at the edge: nothing lost
        let r = ring.since(Some(6));
        assert_eq!((r.lost, ids(&r)), (None, vec![7, 8, 9, 10]));
        // an id from the future (another daemon's, a typo) is a gap, not silence
        let r = ring.since(Some(1_000));
        assert_eq!(r.lost, Some((1_000, 10)));
        assert_eq!(ids(&r), [7, 8, 9, 10]);
    }

    #[tokio::test]
    async fn watchers_wake_on_push() {
        let ring = EventRing::new(4, 1);
        let mut w = ring.watch();
        ring.push(HostEvent::New(id(1)), 0);
        w.changed().await.unwrap();
        assert_eq!(*w.borrow_and_update(), 1);
    }
}
