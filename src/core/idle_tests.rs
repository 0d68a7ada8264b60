//! Idle freeze and stop over the simulated backend: the rules of `domain::idle` applied by the
//! core (activity accounting, the thaw on the way in, what holds a project awake). The idle
//! clock is moved by hand ([`Host::idle_since`]) and the idle loop ticked by hand.
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Host;
use crate::backends::sim::Sim;
use crate::config::Settings;
use crate::domain::project::{ProjectId, ProjectState, RunConfig};

fn id(n: u32) -> ProjectId {
    format!("6f1c2d3e-0000-4000-8000-{n:012x}")
        .parse()
        .expect("a valid id")
}

async fn host(sim: &Sim) -> Arc<Host> {
    Host::with_backends(Settings::default(), sim.backends())
        .await
        .expect("a host over the simulation")
}

fn config(freeze: u64, stop: u64) -> RunConfig {
    RunConfig {
        idle_freeze: Some(freeze),
        idle_stop: Some(stop),
        ..Default::default()
    }
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(3), "never: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Makes the project idle for `secs` and ticks the idle loop twice (two CPU samples).
async fn idle_for(h: &Arc<Host>, p: ProjectId, secs: u64) {
    h.idle_since(p, super::now_ms() - secs * 1000);
    h.idle_tick().await;
    h.idle_tick().await;
}

#[tokio::test]
async fn an_idle_project_freezes_and_a_connection_thaws_it() {
    let sim = Sim::new();
    let h = host(&sim).await;
    let p = id(1);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    sim.units.listen(p, 8000, l.local_addr().unwrap());
    h.start(p, Some(config(60, 0))).await.expect("start");
    idle_for(&h, p, 59).await;
    assert_eq!(
        h.status(p).state,
        ProjectState::Running,
        "not idle long enough"
    );
    idle_for(&h, p, 61).await;
    eventually("frozen", || h.status(p).state == ProjectState::Frozen).await;
    assert!(sim.units.frozen(p));
    assert!(
        h.is_running(p),
        "a frozen project counts as running for the proxy"
    );
    // the store and the master see it running
    assert_eq!(
        sim.store.row(p).map(|r| r.state),
        Some(ProjectState::Running)
    );
    let st = h.status(p);
    let a = st.activity.expect("activity while up");
    assert!(a.active.is_empty(), "{a:?}");
    assert_eq!(a.freeze_after_s, Some(60));
    assert_eq!(a.stop_after_s, None);
    // a status read is no activity; a connection is, and thaws it before connecting
    let mut c = h.connect_port(p, 8000).await.expect("connect thaws");
    assert!(!sim.units.frozen(p));
    assert_eq!(h.status(p).state, ProjectState::Running);
    let (mut s, _) = l.accept().await.unwrap();
    c.write_all(b"hi").await.unwrap();
    let mut b = [0u8; 2];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(
        *sim.units.freezes.lock().unwrap(),
        [(p, true), (p, false)],
        "one freeze, one thaw"
    );
    let a = h.status(p).activity.expect("activity");
    assert_eq!(a.connections, 1);
    assert!(a.active.iter().any(|r| r.as_str() == "connection"), "{a:?}");
}

#[tokio::test]
async fn bytes_written_to_a_frozen_project_thaw_it() {
    let sim = Sim::new();
    let h = host(&sim).await;
    let p = id(2);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    sim.units.listen(p, 8000, l.local_addr().unwrap());
    h.start(p, Some(config(60, 0))).await.expect("start");
    // a WebSocket-like connection stays open while the project freezes
    let mut c = h.connect_port(p, 8000).await.expect("connect");
    idle_for(&h, p, 120).await;
    eventually("frozen", || h.status(p).state == ProjectState::Frozen).await;
    c.write_all(b"ping").await.unwrap();
    eventually("thawed by the write", || {
        h.status(p).state == ProjectState::Running
    })
    .await;
    assert!(!sim.units.frozen(p));
}

#[tokio::test]
async fn a_busy_cpu_is_never_frozen() {
    let sim = Sim::new();
    let h = host(&sim).await;
    let p = id(3);
    h.start(p, Some(config(60, 0))).await.expect("start");
    h.idle_since(p, super::now_ms() - 120_000);
    h.idle_tick().await;
    // a whole core between the two samples
    sim.units.burn(p, 2_000_000_000);
    h.idle_tick().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.status(p).state, ProjectState::Running);
    let a = h.status(p).activity.expect("activity");
    assert!(a.active.iter().any(|r| r.as_str() == "cpu"), "{a:?}");
    assert!(a.idle_s < 5, "CPU use is activity: {a:?}");
    // once it is quiet and idle again, it freezes
    idle_for(&h, p, 120).await;
    eventually("frozen", || h.status(p).state == ProjectState::Frozen).await;
}

#[tokio::test]
async fn an_ssh_session_holds_the_project_and_thaws_it() {
    let sim = Sim::new();
    let h = host(&sim).await;
    let p = id(4);
    h.start(p, Some(config(60, 120))).await.expect("start");
    idle_for(&h, p, 61).await;
    eventually("frozen", || h.status(p).state == ProjectState::Frozen).await;
    // a login thaws it
    let g = h.open_session(p, false).await.expect("session");
    assert_eq!(h.status(p).state, ProjectState::Running);
    // neither frozen nor stopped while the session is open, however long idle
    idle_for(&h, p, 3600).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.status(p).state, ProjectState::Running);
    let a = h.status(p).activity.expect("activity");
    assert_eq!(a.active.first().map(|r| r.as_str()), Some("ssh_session"));
    drop(g);
    idle_for(&h, p, 3600).await;
    eventually("stopped", || h.status(p).state == ProjectState::Opened).await;
    // a stopped project: no session without autostart
    let e = h.open_session(p, false).await.unwrap_err();
    assert_eq!(e.code(), "project_not_running");
    // with autostart, a known project starts
    let _g = h.open_session(p, true).await.expect("autostart");
    assert_eq!(h.status(p).state, ProjectState::Running);
    // an unknown one is not created
    let e = h.open_session(id(99), true).await.unwrap_err();
    assert_eq!(e.code(), "project_not_running");
}

#[tokio::test]
async fn idle_stop_happens_but_never_under_an_open_connection() {
    let sim = Sim::new();
    let h = host(&sim).await;
    let p = id(5);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    sim.units.listen(p, 8000, l.local_addr().unwrap());
    h.start(p, Some(config(0, 30))).await.expect("start");
    let c = h.connect_port(p, 8000).await.expect("connect");
    idle_for(&h, p, 600).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        h.status(p).state,
        ProjectState::Running,
        "held by the connection"
    );
    assert!(
        sim.units.freezes.lock().unwrap().is_empty(),
        "freeze is off"
    );
    drop(c);
    idle_for(&h, p, 600).await;
    eventually("stopped", || h.status(p).state == ProjectState::Opened).await;
    assert_eq!(
        sim.store.row(p).map(|r| r.state),
        Some(ProjectState::Opened)
    );
}

#[tokio::test]
async fn a_frozen_project_is_thawed_to_stop_and_by_start_and_adopted_frozen() {
    let sim = Sim::new();
    let h = host(&sim).await;
    let (p, q) = (id(6), id(7));
    h.start(p, Some(config(60, 0))).await.expect("start");
    h.start(q, Some(config(60, 0))).await.expect("start");
    idle_for(&h, p, 61).await;
    idle_for(&h, q, 61).await;
    eventually("frozen", || {
        h.status(p).state == ProjectState::Frozen && h.status(q).state == ProjectState::Frozen
    })
    .await;
    // a restarted daemon finds them frozen
    let h2 = host(&sim).await;
    assert_eq!(h2.status(p).state, ProjectState::Frozen);
    // start thaws
    assert_eq!(
        h2.start(p, None).await.expect("start").state,
        ProjectState::Running
    );
    assert!(!sim.units.frozen(p));
    // stop thaws first (a frozen process cannot take its SIGTERM), then stops
    h2.stop(q, false).await.expect("stop");
    assert_eq!(
        sim.units.freezes.lock().unwrap().last(),
        Some(&(q, false)),
        "thawed before the stop"
    );
    assert_eq!(h2.status(q).state, ProjectState::Opened);
}

#[tokio::test]
async fn a_failing_freezer_leaves_the_project_running() {
    let sim = Sim::new();
    let h = host(&sim).await;
    let p = id(8);
    h.start(p, Some(config(60, 0))).await.expect("start");
    sim.units
        .freeze_fails
        .store(true, std::sync::atomic::Ordering::SeqCst);
    idle_for(&h, p, 61).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.status(p).state, ProjectState::Running);
    // not tried again before another idle period
    let a = h.status(p).activity.expect("activity");
    assert!(a.idle_s < 5, "{a:?}");
}

#[tokio::test]
async fn host_defaults_apply_and_a_project_may_turn_them_off() {
    let sim = Sim::new();
    let mut s = Settings::default();
    s.projects.idle.freeze_after = Some(Duration::from_secs(60));
    let h = Host::with_backends(s, sim.backends()).await.expect("host");
    let (p, q) = (id(9), id(10));
    h.start(p, None).await.expect("start");
    h.start(
        q,
        Some(RunConfig {
            idle_freeze: Some(0),
            ..Default::default()
        }),
    )
    .await
    .expect("start");
    idle_for(&h, p, 61).await;
    idle_for(&h, q, 6100).await;
    eventually("p frozen", || h.status(p).state == ProjectState::Frozen).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.status(q).state, ProjectState::Running);
    assert_eq!(h.status(q).activity.expect("a").freeze_after_s, None);
}
