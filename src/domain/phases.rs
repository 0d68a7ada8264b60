//! How long each phase of a project's start took (`phase_timings_ms` of the start answer and
//! the status): storage preparation, creating the unit, podman bringing the container up, the
//! host recording it running; and the whole start.
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Milliseconds per start phase. The phases follow each other, so they add up to about `total`
/// (`total` also holds the few checks between them: the lock, the unit look-up).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseTimings {
    /// home, id range, snapshots dir, scratch
    pub storage: u64,
    /// until systemd has taken the unit's start job
    pub unit: u64,
    /// from the job taken to the unit up (podman pulled if needed, created and started the
    /// container, conmon said ready)
    pub podman: u64,
    /// from the unit up to the host recording it running (CPU quota on, state, store)
    pub ready: u64,
    /// the whole start
    pub total: u64,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl PhaseTimings {
    /// From the phases' durations.
    pub fn new(
        storage: Duration,
        unit: Duration,
        podman: Duration,
        ready: Duration,
        total: Duration,
    ) -> PhaseTimings {
        PhaseTimings {
            storage: ms(storage),
            unit: ms(unit),
            podman: ms(podman),
            ready: ms(ready),
            total: ms(total),
        }
    }

    /// The sum of the phases.
    pub fn sum(&self) -> u64 {
        self.storage + self.unit + self.podman + self.ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_in_ms_and_their_sum() {
        let d = Duration::from_micros;
        let p = PhaseTimings::new(d(1_500), d(20_000), d(300_999), d(4_000), d(327_000));
        assert_eq!(
            (p.storage, p.unit, p.podman, p.ready, p.total),
            (1, 20, 300, 4, 327)
        );
        assert_eq!(p.sum(), 325);
        assert_eq!(
            serde_json::to_value(p).unwrap(),
            serde_json::json!({"storage": 1, "unit": 20, "podman": 300, "ready": 4, "total": 327})
        );
    }
}
