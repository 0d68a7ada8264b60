//! Moves over the simulated backend: what the source does when the target refuses, when the
//! move is cancelled, that a delete cannot race a move's send, and the source's side of the
//! pre-copy and of a resume against a scripted target (the sim storage "sends" one chunk naming
//! the subvolume and its parent; the real streams are tested end to end, tests/e2e/moves.rs).
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Host;
use super::moves::{MoveRequest, Phase, Sender};
use crate::backends::sim::Sim;
use crate::config::Settings;
use crate::domain::moves::{self, Manifest, MoveId, TargetState};
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
    async fn state(&self, _id: ProjectId, _mv: MoveId, _t: &str) -> Result<TargetState, String> {
        Ok(TargetState::default())
    }
    async fn abort(&self, _id: ProjectId, _mv: MoveId, _t: &str) -> Result<(), String> {
        Ok(())
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
    phase(&h, &v.op, Phase::Precopy).await;
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
        h.cancel_operation("../x").await,
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
    phase(&h, &v.op, Phase::Precopy).await;
    h.cancel_operation(&v.op).await.expect("cancel");
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

/// A target that checks each stream's MAC and place as the real one does, records what it got
/// (and whether the project still ran on the source then), and fails as told.
#[derive(Debug, Default)]
struct Target {
    st: std::sync::Mutex<TargetState>,
    got: std::sync::Mutex<Vec<(Manifest, bool)>>,
    /// streams (by subvolume name) that fail once, as a connection cut midway
    fail: std::sync::Mutex<Vec<String>>,
    /// the final stream is placed but its answer is lost
    lose_final_answer: std::sync::atomic::AtomicBool,
    aborted: std::sync::atomic::AtomicU32,
    host: std::sync::OnceLock<std::sync::Weak<Host>>,
}

#[async_trait::async_trait]
impl Sender for Target {
    async fn send(
        &self,
        id: ProjectId,
        mv: MoveId,
        token: &str,
        mut body: tokio::sync::mpsc::Receiver<Vec<u8>>,
    ) -> Result<(), String> {
        let mut all = Vec::new();
        while let Some(c) = body.recv().await {
            all.extend_from_slice(&c);
        }
        let (data, tag) = all.split_at(all.len() - moves::MAC_LEN);
        let mut mac = moves::mac(token);
        hmac::Mac::update(&mut mac, data);
        assert!(moves::verify(mac, tag), "every stream carries its MAC");
        let nl = data
            .iter()
            .position(|b| *b == b'\n')
            .expect("a manifest line");
        let m = Manifest::parse(&data[..nl], mv, id).map_err(|e| e.to_string())?;
        // the source announces each subvolume's and its parent's UUID (the real target checks
        // them against what `btrfs receive` made: domain::moves::check_lineage)
        assert_eq!(m.uuid, crate::backends::sim::sim_uuid(id, &m.name), "{m:?}");
        assert_eq!(
            m.parent_uuid,
            m.parent
                .as_deref()
                .map(|p| crate::backends::sim::sim_uuid(id, p)),
            "{m:?}"
        );
        let running = self
            .host
            .get()
            .and_then(std::sync::Weak::upgrade)
            .is_some_and(|h| h.status(id).state == ProjectState::Running);
        self.got.lock().unwrap().push((m.clone(), running));
        {
            let mut f = self.fail.lock().unwrap();
            if let Some(i) = f.iter().position(|n| *n == m.name) {
                f.remove(i);
                return Err("connection reset by peer".into());
            }
        }
        let mut st = self.st.lock().unwrap();
        st.accept(&m)?;
        st.last_seq = m.seq;
        st.received.push(m.name.clone());
        if m.last.is_some() {
            st.placed = true;
            if self
                .lose_final_answer
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                return Err("connection reset by peer".into());
            }
        }
        Ok(())
    }
    async fn state(&self, _id: ProjectId, _mv: MoveId, _t: &str) -> Result<TargetState, String> {
        Ok(self.st.lock().unwrap().clone())
    }
    async fn abort(&self, _id: ProjectId, _mv: MoveId, _t: &str) -> Result<(), String> {
        self.aborted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self.st.lock().unwrap() = TargetState::default();
        Ok(())
    }
}

async fn running_with_snapshots(sim: &Sim, p: ProjectId, target: &Arc<Target>) -> Arc<Host> {
    let h = Host::with_backends(Settings::default(), sim.backends())
        .await
        .expect("host");
    let _ = target.host.set(Arc::downgrade(&h));
    h.start(p, None).await.expect("start");
    for n in ["a", "b"] {
        h.create_snapshot(p, Some(n.parse().unwrap()))
            .await
            .expect("snapshot");
        // distinct creation times: the order is the snapshots' age
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    h
}

async fn settled(h: &Host, op: &str) -> super::moves::OperationView {
    let t = Instant::now();
    loop {
        let v = h.operation(op).expect("op");
        if matches!(v.phase, Phase::Done | Phase::Failed) {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "never settled: {v:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn streams(t: &Target) -> Vec<(u64, String, Option<String>, bool, bool)> {
    t.got
        .lock()
        .unwrap()
        .iter()
        .map(|(m, running)| {
            (
                m.seq,
                m.name.clone(),
                m.parent.clone(),
                m.last.is_some(),
                *running,
            )
        })
        .collect()
}

#[tokio::test]
async fn a_running_project_is_precopied_and_stopped_only_for_the_final_delta() {
    let sim = Sim::new();
    let target = Arc::new(Target::default());
    let p = id(10);
    let h = running_with_snapshots(&sim, p, &target).await;
    let v = h.start_move(p, req(), target.clone()).await.expect("move");
    let v = settled(&h, &v.op).await;
    assert_eq!(v.phase, Phase::Done, "{v:?}");
    let mv: MoveId = v.op.parse().unwrap();
    let (l3, l4) = (moves::live_name(&mv, 3), moves::live_name(&mv, 4));
    assert_eq!(
        streams(&target),
        vec![
            (1, "a".into(), None, false, true),
            (2, "b".into(), Some("a".into()), false, true),
            // the live state while it still runs, then the final delta after the stop
            (3, l3.clone(), Some("b".into()), false, true),
            (4, l4.clone(), Some(l3), true, false),
        ]
    );
    let last = target.got.lock().unwrap()[3].0.last.clone();
    assert_eq!(last, Some(vec!["a".to_string(), "b".into()]));
    assert!(v.downtime_ms.is_some() && v.final_bytes > 0 && v.final_bytes < v.bytes_sent);
    assert!(!crate::ports::Storage::has_home(sim.storage.as_ref(), p));
    assert!(sim.storage.move_snapshots(p).is_empty());
}

#[tokio::test]
async fn an_interrupted_move_leaves_the_source_running_and_resumes_without_resending() {
    let sim = Sim::new();
    let target = Arc::new(Target::default());
    let p = id(11);
    let h = running_with_snapshots(&sim, p, &target).await;
    let mv_first = {
        // cut during the pre-copy of the live state: a and b are held by the target
        let v = h.start_move(p, req(), target.clone()).await.expect("move");
        let mv: MoveId = v.op.parse().unwrap();
        target.fail.lock().unwrap().push(moves::live_name(&mv, 3));
        let v = settled(&h, &v.op).await;
        assert_eq!(v.phase, Phase::Failed, "{v:?}");
        assert!(v.resumable, "{v:?}");
        assert!(v.error.unwrap().contains("connection reset"));
        mv
    };
    let t = Instant::now();
    while h.status(p).state != ProjectState::Running {
        assert!(t.elapsed() < Duration::from_secs(2), "not running again");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(crate::ports::Storage::has_home(sim.storage.as_ref(), p));
    assert!(
        sim.storage.move_snapshots(p).is_empty(),
        "a live snapshot the target does not hold is dropped"
    );
    // another target is refused while the interrupted move stands
    let other = MoveRequest {
        target: "http://10.0.0.3:9002".into(),
        ..req()
    };
    assert!(matches!(
        h.start_move(p, other, target.clone()).await,
        Err(super::Error::MoveRejected(_))
    ));
    // the retry resumes the same move: a and b are not sent again
    target.got.lock().unwrap().clear();
    let v = h
        .start_move(p, req(), target.clone())
        .await
        .expect("resume");
    assert_eq!(v.op, mv_first.to_string());
    let v = settled(&h, &v.op).await;
    assert_eq!(v.phase, Phase::Done, "{v:?}");
    assert_eq!(v.skipped, vec!["a".to_string(), "b".into()]);
    // the cut stream never took its number (its MAC was not checked): 3 is sent again, anew
    let (l3, l4) = (
        moves::live_name(&mv_first, 3),
        moves::live_name(&mv_first, 4),
    );
    assert_eq!(
        streams(&target),
        vec![
            (3, l3.clone(), Some("b".into()), false, true),
            (4, l4, Some(l3), true, false),
        ]
    );
    assert!(!crate::ports::Storage::has_home(sim.storage.as_ref(), p));
}

#[tokio::test]
async fn a_lost_final_answer_is_settled_by_asking_the_target() {
    let sim = Sim::new();
    let target = Arc::new(Target::default());
    target
        .lose_final_answer
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let p = id(12);
    let h = running_with_snapshots(&sim, p, &target).await;
    let v = h.start_move(p, req(), target.clone()).await.expect("move");
    let v = settled(&h, &v.op).await;
    // the target placed it: the source deletes its copy and does not start it again
    assert_eq!(v.phase, Phase::Done, "{v:?}");
    assert!(!crate::ports::Storage::has_home(sim.storage.as_ref(), p));
    assert_ne!(h.status(p).state, ProjectState::Running);
}

#[tokio::test]
async fn cancelling_an_interrupted_move_cleans_the_target_and_the_source() {
    let sim = Sim::new();
    let target = Arc::new(Target::default());
    let p = id(13);
    let h = running_with_snapshots(&sim, p, &target).await;
    let v = h.start_move(p, req(), target.clone()).await.expect("move");
    let mv: MoveId = v.op.parse().unwrap();
    // cut at the final stream: the pre-copied live snapshot is kept for a resume
    target.fail.lock().unwrap().push(moves::live_name(&mv, 4));
    let v = settled(&h, &v.op).await;
    assert_eq!(v.phase, Phase::Failed, "{v:?}");
    assert!(v.resumable);
    assert_eq!(
        sim.storage.move_snapshots(p),
        vec![moves::live_name(&mv, 3)]
    );
    let t = Instant::now();
    while h.status(p).state != ProjectState::Running {
        assert!(t.elapsed() < Duration::from_secs(2), "not running again");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let v = h.cancel_operation(&v.op).await.expect("cancel");
    assert!(!v.resumable);
    assert_eq!(v.error.as_deref(), Some("cancelled"));
    assert_eq!(target.aborted.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(sim.storage.move_snapshots(p).is_empty());
    // a new move (another id) is possible now, to anywhere
    let v2 = h.start_move(p, req(), target.clone()).await.expect("move");
    assert_ne!(v2.op, v.op);
    assert_eq!(settled(&h, &v2.op).await.phase, Phase::Done);
}

/// A target that cannot be reached at all.
#[derive(Debug)]
struct Unreachable;

#[async_trait::async_trait]
impl Sender for Unreachable {
    async fn send(
        &self,
        _id: ProjectId,
        _mv: MoveId,
        _t: &str,
        _body: tokio::sync::mpsc::Receiver<Vec<u8>>,
    ) -> Result<(), String> {
        Err("cannot connect: connection refused".into())
    }
    async fn state(&self, _id: ProjectId, _mv: MoveId, _t: &str) -> Result<TargetState, String> {
        Err("cannot connect: connection refused".into())
    }
    async fn abort(&self, _id: ProjectId, _mv: MoveId, _t: &str) -> Result<(), String> {
        Err("cannot connect: connection refused".into())
    }
}

#[tokio::test]
async fn a_move_to_a_target_gone_for_good_can_be_cancelled_and_the_project_moved_elsewhere() {
    let sim = Sim::new();
    let target = Arc::new(Target::default());
    let p = id(14);
    let h = running_with_snapshots(&sim, p, &target).await;
    let v = h
        .start_move(p, req(), Arc::new(Unreachable))
        .await
        .expect("move");
    let v = settled(&h, &v.op).await;
    assert_eq!(v.phase, Phase::Failed);
    assert!(v.resumable);
    // the cancel cannot reach the target: it is cancelled here anyway, and says so
    let v = h.cancel_operation(&v.op).await.expect("cancel");
    assert!(!v.resumable);
    assert!(v.error.as_deref().unwrap().contains("not told"), "{v:?}");
    let elsewhere = MoveRequest {
        target: "http://10.0.0.3:9002".into(),
        ..req()
    };
    let v2 = h
        .start_move(p, elsewhere, target.clone())
        .await
        .expect("move");
    assert_eq!(settled(&h, &v2.op).await.phase, Phase::Done);
}
