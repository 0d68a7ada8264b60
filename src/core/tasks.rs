//! Every task of the core has an owner. Two trackers and one token:
//! - `work`: starts, stops and limit changes, spawned so a caller that goes away (an HTTP client
//!   hanging up, a dropped D-Bus call) cannot cut them off half-done;
//! - `loops`: the unit watcher and the refresh loops, which run until the token is cancelled.
//!
//! [`Tasks::shutdown`] drains `work` (bounded), then cancels the token and waits for `loops`:
//! nothing is left to be cut off by the runtime's drop.
use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The owner of the core's tasks.
#[derive(Debug, Default)]
pub struct Tasks {
    pub(super) work: TaskTracker,
    pub(super) loops: TaskTracker,
    cancel: CancellationToken,
}

impl Tasks {
    /// No tasks yet.
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// A token cancelled when the loops are to end (after the drain of in-flight work).
    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Spawns work that runs to completion whoever waits for it; shutdown waits for it.
    pub fn spawn_work<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.work.spawn(f)
    }

    /// Spawns a loop that ends when its future ends or the token is cancelled.
    pub fn spawn_loop<F>(&self, name: &'static str, f: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        self.loops.spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => tracing::debug!(task = name, "loop cancelled"),
                () = f => tracing::debug!(task = name, "loop ended"),
            }
        });
    }

    /// How many starts, stops and limit changes are in flight.
    pub fn in_flight(&self) -> usize {
        self.work.len()
    }

    /// Drains in-flight work (at most `drain`), then cancels the loops and waits for them.
    pub async fn shutdown(&self, drain: Duration) {
        let in_flight = self.work.len();
        tracing::info!(
            in_flight,
            "shutdown: draining in-flight starts, stops and limit changes"
        );
        self.work.close();
        if tokio::time::timeout(drain, self.work.wait()).await.is_err() {
            tracing::warn!(
                left = self.work.len(),
                drain_secs = drain.as_secs(),
                "shutdown: in-flight work did not finish in time"
            );
        }
        tracing::info!(
            loops = self.loops.len(),
            "shutdown: stopping the core's loops"
        );
        self.cancel.cancel();
        self.loops.close();
        if tokio::time::timeout(Duration::from_secs(5), self.loops.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown: some loops did not end within 5s");
        }
        tracing::info!("shutdown: core stopped");
    }
}
