//! Moves over the simulated backend: what the source does when the target refuses, when the
//! move is cancelled, and that a delete cannot race a move's send. (The sim storage has no
//! `btrfs send`: its send fails, as a real one failing midway does.)
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Host;
use super::moves::{MoveRequest, Phase, Sender};
use crate::backends::sim::Sim;
use crate::config::Settings;
use crate::domain::moves::MoveId;
use crate::domain::project::{ProjectId, ProjectState};

fn id(n: u32) -> ProjectId {
    format!("6f1c2d3e-0000-4000-8000-{n:012x}")
        .parse()
        .expect("a valid id")
}

/// A target that holds the stream until released, then answers `answer`.
#[derive(Debug)]
struct Gate {
    release: tokio::sync::Notify,
    answer: Result<(), String>,
}

#[async_trait::async_trait]
impl Sender for Gate {
    async fn send(
        &self,
        _id: ProjectId,
        _mv: MoveId,
        _token: &str,
        mut body: tokio::sync::mpsc::Receiver<Vec<u8>>,
    ) -> Result<(), String> {
        self.release.notified().await;
        while body.recv().await.is_some() {}
        self.answer.clone()
    }
}

fn req() -> MoveRequest {
    MoveRequest {
        target: "http://10.0.0.2:9002".into(),
        token: "t".into(),
        start: true,
    }
}

async fn phase(h: &Host, op: &str, want: Phase) {
    let t = Instant::now();
    while h.operation(op).expect("op").phase != want {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "never {want:?}: {:?}",
            h.operation(op)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn a_failed_move_leaves_the_project_whole_and_running_and_blocks_deletes_while_sending() {
    let sim = Sim::new();
    let h = Host::with_backends(Settings::default(), sim.backends())
        .await
        .expect("host");
    let p = id(1);
    h.start(p, None).await.expect("start");
    let gate = Arc::new(Gate {
        release: tokio::sync::Notify::new(),
        answer: Err("422: no".into()),
    });
    let v = h.start_move(p, req(), gate.clone()).await.expect("move");
    phase(&h, &v.op, Phase::Sending).await;
    // a second move and a delete are refused while the snapshots are being sent
    assert!(matches!(
        h.start_move(p, req(), gate.clone()).await,
        Err(super::Error::MoveRejected(_))
    ));
    assert!(matches!(
        h.remove(p).await,
        Err(super::Error::SnapshotsLocked(_))
    ));
    gate.release.notify_one();
    phase(&h, &v.op, Phase::Failed).await;
    let t = Instant::now();
    while h.status(p).state != ProjectState::Running {
        assert!(t.elapsed() < Duration::from_secs(2), "not running again");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(h.operation(&v.op).expect("op").error.is_some());
    assert!(
        crate::ports::Storage::has_home(sim.storage.as_ref(), p),
        "the source keeps its copy"
    );
    // the operation stays visible; unknown ones are no_such_operation
    assert!(matches!(
        h.operation(&MoveId::new().to_string()),
        Err(super::Error::NoSuchOperation(_))
    ));
    assert!(matches!(
        h.cancel_operation("../x"),
        Err(super::Error::NoSuchOperation(_))
    ));
}

#[tokio::test]
async fn a_cancelled_move_fails_and_the_project_runs_again() {
    let sim = Sim::new();
    let h = Host::with_backends(Settings::default(), sim.backends())
        .await
        .expect("host");
    let p = id(2);
    h.start(p, None).await.expect("start");
    let gate = Arc::new(Gate {
        release: tokio::sync::Notify::new(),
        answer: Ok(()),
    });
    let v = h.start_move(p, req(), gate).await.expect("move");
    phase(&h, &v.op, Phase::Sending).await;
    h.cancel_operation(&v.op).expect("cancel");
    phase(&h, &v.op, Phase::Failed).await;
    assert_eq!(
        h.operation(&v.op).expect("op").error.as_deref(),
        Some("cancelled")
    );
    let t = Instant::now();
    while h.status(p).state != ProjectState::Running {
        assert!(t.elapsed() < Duration::from_secs(2), "not running again");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(crate::ports::Storage::has_home(sim.storage.as_ref(), p));
    // a project this host has no home of cannot be moved
    assert!(matches!(
        h.start_move(
            id(3),
            req(),
            Arc::new(Gate {
                release: tokio::sync::Notify::new(),
                answer: Ok(())
            })
        )
        .await,
        Err(super::Error::NoSuchProject(_))
    ));
}
