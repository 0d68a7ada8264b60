//! The master link's hard cases over the simulated backend and master (paused time: backoff
//! and heartbeats take no real time): ordered reports, the master away during changes and a
//! restart, the outbox's bound, failed starts, deletes, and the register answer handed over.
use std::sync::Arc;
use std::time::Duration;

use super::Host;
use crate::api::master::RegisterAnswer;
use crate::backends::sim::{Sim, StartFault};
use crate::backends::sim_master::{SimMaster, SimTrust};
use crate::config::Settings;
use crate::domain::master::{LinkState, ReportKind};
use crate::domain::project::{ProjectId, ProjectState};

fn id(n: u32) -> ProjectId {
    format!("6f1c2d3e-0000-4000-8000-{n:012x}")
        .parse()
        .expect("a valid id")
}

fn settings() -> Settings {
    let mut s = Settings::default();
    s.master.url = Some("http://127.0.0.1:9".into());
    s.master.heartbeat_interval = Duration::from_secs(1);
    s
}

/// A host with the outbox on (as the daemon turns it on before building the host) and its
/// link to `master` started.
async fn linked(sim: &Sim, master: &Arc<SimMaster>, trust: &Arc<SimTrust>) -> Arc<Host> {
    crate::ports::Store::enable_outbox(&*sim.store, settings().master.outbox_limit);
    let h = Host::with_backends(settings(), sim.backends())
        .await
        .expect("a host over the simulation");
    h.start_link(master.clone(), trust.clone());
    h
}

/// Waits (up to 120 s of paused time) until `f` holds.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..12_000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

fn kinds(m: &SimMaster) -> Vec<(ProjectId, ReportKind)> {
    m.deduped()
        .into_iter()
        .map(|r| (r.project_id, r.event))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn register_heartbeats_and_ordered_reports() {
    let (sim, master, trust) = (Sim::new(), SimMaster::new(), Arc::new(SimTrust::default()));
    let h = linked(&sim, &master, &trust).await;
    eventually("registered", || {
        h.link_status().state == LinkState::Connected
    })
    .await;
    let reg = master.received().registers[0].clone();
    assert_eq!(reg.host_id, h.host_id());
    assert_eq!(reg.public_keys, ["sim-key"]);
    let (a, b) = (id(1), id(2));
    h.start(a, None).await.expect("start a");
    h.start(b, None).await.expect("start b");
    h.stop(a, false).await.expect("stop a");
    eventually("3 reports", || master.deduped().len() == 3).await;
    assert_eq!(
        kinds(&master),
        [
            (a, ReportKind::Started),
            (b, ReportKind::Started),
            (a, ReportKind::Stopped)
        ]
    );
    let seqs: Vec<u64> = master.deduped().iter().map(|r| r.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    eventually("acked", || sim.store.outbox().is_empty()).await;
    eventually("heartbeats", || master.received().heartbeats.len() >= 3).await;
    let hb = master
        .received()
        .heartbeats
        .last()
        .cloned()
        .expect("a heartbeat");
    assert_eq!((hb.running, hb.known), (1, 2));
    // same session for every message of this daemon start
    assert!(
        master
            .received()
            .heartbeats
            .iter()
            .all(|x| x.session_id == reg.session_id)
    );
}

#[tokio::test(start_paused = true)]
async fn master_down_during_changes_and_a_restart_loses_nothing() {
    let (sim, master, trust) = (Sim::new(), SimMaster::new(), Arc::new(SimTrust::default()));
    master.set_down(true);
    let h = linked(&sim, &master, &trust).await;
    eventually("offline", || h.link_status().state == LinkState::Offline).await;
    let (a, b) = (id(1), id(2));
    h.start(a, None).await.expect("1");
    h.start(b, None).await.expect("2");
    h.stop(a, false).await.expect("3");
    h.start(a, None).await.expect("4");
    h.stop(b, false).await.expect("5");
    assert_eq!(sim.store.outbox().len(), 5);
    eventually("depth seen", || h.link_status().outbox_depth == 5).await;
    // the daemon restarts (a new host over the same store and units), the master still away
    h.shutdown(Duration::from_secs(1)).await;
    drop(h);
    let h = linked(&sim, &master, &trust).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.link_status().state, LinkState::Offline);
    assert!(master.received().reports.is_empty());
    master.set_down(false);
    eventually("delivered", || sim.store.outbox().is_empty()).await;
    assert_eq!(
        kinds(&master),
        [
            (a, ReportKind::Started),
            (b, ReportKind::Started),
            (a, ReportKind::Stopped),
            (a, ReportKind::Started),
            (b, ReportKind::Stopped),
        ]
    );
    assert_eq!(h.link_status().state, LinkState::Connected);
    assert_eq!(
        master.received().registers.len(),
        1,
        "one register, once up"
    );
}

#[tokio::test(start_paused = true)]
async fn a_project_ending_on_its_own_is_reported() {
    let (sim, master, trust) = (Sim::new(), SimMaster::new(), Arc::new(SimTrust::default()));
    let h = linked(&sim, &master, &trust).await;
    let a = id(1);
    h.start(a, None).await.expect("start");
    // the container exits (outside the host's calls): the unit fails, then is collected
    sim.units
        .set_external(a, Some(crate::domain::project::ActiveState::Failed));
    eventually("stopped", || h.project_state(a) == ProjectState::Opened).await;
    eventually("2 reports", || master.deduped().len() == 2).await;
    assert_eq!(
        kinds(&master),
        [(a, ReportKind::Started), (a, ReportKind::Stopped)]
    );
    assert_eq!(
        sim.store.row(a).map(|r| r.state),
        Some(ProjectState::Opened)
    );
    // and started again by hand, outside the host
    sim.units
        .set_external(a, Some(crate::domain::project::ActiveState::Active));
    eventually("3 reports", || master.deduped().len() == 3).await;
    assert_eq!(master.deduped()[2].event, ReportKind::Started);
}

#[tokio::test(start_paused = true)]
async fn a_home_reaching_its_quota_is_reported_once_per_crossing() {
    let (sim, master, trust) = (Sim::new(), SimMaster::new(), Arc::new(SimTrust::default()));
    let h = linked(&sim, &master, &trust).await;
    let a = id(1);
    h.start(a, None).await.expect("start");
    let quota = sim
        .storage
        .limit(a)
        .flatten()
        .expect("the default quota is on the home");
    sim.storage.set_used(a, quota);
    eventually("a quota report", || {
        kinds(&master).contains(&(a, ReportKind::Quota))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let hits = |m: &SimMaster| {
        kinds(m)
            .iter()
            .filter(|k| **k == (a, ReportKind::Quota))
            .count()
    };
    assert_eq!(hits(&master), 1, "once while it stays there");
    sim.storage.set_used(a, quota / 2);
    tokio::time::sleep(Duration::from_secs(10)).await;
    sim.storage.set_used(a, quota);
    eventually("a second hit", || hits(&master) == 2).await;
}

#[tokio::test(start_paused = true)]
async fn over_its_limit_the_outbox_coalesces_the_oldest_per_project() {
    let sim = Sim::new();
    crate::ports::Store::enable_outbox(&*sim.store, 3);
    let h = Host::with_backends(settings(), sim.backends())
        .await
        .expect("host");
    let (a, b) = (id(1), id(2));
    h.start(a, None).await.expect("a started");
    h.start(b, None).await.expect("b started");
    h.stop(a, false).await.expect("a stopped");
    h.start(a, None).await.expect("a started again");
    let q: Vec<(ProjectId, ReportKind)> = sim
        .store
        .outbox()
        .into_iter()
        .map(|r| (r.project_id, r.event))
        .collect();
    // a's first start went: its later reports say where it is
    assert_eq!(
        q,
        [
            (b, ReportKind::Started),
            (a, ReportKind::Stopped),
            (a, ReportKind::Started)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_start_and_a_delete_are_reported() {
    let (sim, master, trust) = (Sim::new(), SimMaster::new(), Arc::new(SimTrust::default()));
    let h = linked(&sim, &master, &trust).await;
    let (a, b) = (id(1), id(2));
    sim.units
        .set_fault(a, Some(StartFault::Fail("bad image".into())));
    assert!(h.start(a, None).await.is_err());
    h.start(b, None).await.expect("start b");
    let r = h.remove(b).await.expect("delete b");
    assert!(r.removed);
    assert!(!crate::ports::Storage::has_home(&*sim.storage, b));
    assert_eq!(sim.units.state(b), None);
    assert_eq!(sim.store.row(b), None);
    assert!(!h.is_known(b));
    // again: nothing left, nothing reported
    assert!(!h.remove(b).await.expect("delete again").removed);
    eventually("4 reports", || master.deduped().len() == 4).await;
    assert_eq!(
        kinds(&master),
        [
            (a, ReportKind::Failed),
            (b, ReportKind::Started),
            (b, ReportKind::Stopped),
            (b, ReportKind::Removed)
        ]
    );
    let removed = master.deduped().pop().expect("removed");
    assert_eq!(removed.state, ProjectState::Opened);
}

#[tokio::test(start_paused = true)]
async fn the_register_answer_is_handed_to_the_trust_and_standalone_hosts_keep_nothing() {
    let (sim, master, trust) = (Sim::new(), SimMaster::new(), Arc::new(SimTrust::default()));
    master.set_answer(RegisterAnswer {
        public_keys: None,
        revoked: vec!["t-1".into()],
    });
    let h = linked(&sim, &master, &trust).await;
    eventually("applied", || {
        !trust.applied.lock().expect("lock").is_empty()
    })
    .await;
    assert_eq!(trust.applied.lock().expect("lock")[0].revoked, ["t-1"]);
    drop(h);

    // no master: no outbox, the link is standalone
    let sim = Sim::new();
    let h = Host::with_backends(Settings::default(), sim.backends())
        .await
        .expect("host");
    h.start(id(3), None).await.expect("start");
    assert!(sim.store.outbox().is_empty());
    assert_eq!(h.link_status().state, LinkState::Standalone);
    assert_eq!(h.host_view().master.state, LinkState::Standalone);
}

/// Checks `v` against `$defs/<def>` of the checked-in schema of the master protocol.
fn check_schema(def: &str, v: &serde_json::Value) {
    let mut schema: serde_json::Value =
        serde_json::from_str(include_str!("../../docs/master-protocol.schema.json"))
            .expect("the schema is JSON");
    schema["$ref"] = format!("#/$defs/{def}").into();
    let validator = jsonschema::validator_for(&schema).expect("the schema compiles");
    let errors: Vec<String> = validator.iter_errors(v).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{def}: {errors:?} in {v}");
}

#[tokio::test(start_paused = true)]
async fn what_the_host_sends_matches_the_checked_in_schema() {
    let (sim, master, trust) = (Sim::new(), SimMaster::new(), Arc::new(SimTrust::default()));
    let h = linked(&sim, &master, &trust).await;
    h.start(id(1), None).await.expect("start");
    sim.units
        .set_fault(id(2), Some(StartFault::Fail("x".into())));
    let _ = h.start(id(2), None).await;
    h.stop(id(1), false).await.expect("stop");
    h.remove(id(1)).await.expect("delete");
    eventually("4 reports", || master.deduped().len() == 4).await;
    eventually("a heartbeat", || !master.received().heartbeats.is_empty()).await;
    let got = master.received();
    check_schema("RegisterRequest", &json(&got.registers[0]));
    check_schema("Heartbeat", &json(&got.heartbeats[0]));
    let states = crate::api::master::ProjectStates {
        host_id: h.host_id().into(),
        session_id: got.registers[0].session_id.clone(),
        reports: master.deduped(),
    };
    check_schema("ProjectStates", &json(&states));
    // what a master may answer parses, and the schema's answers are the host's
    let answer = serde_json::json!({"public_keys": ["k"], "revoked": ["t-1"]});
    check_schema("RegisterAnswer", &answer);
    let parsed: RegisterAnswer = serde_json::from_value(answer).expect("parses");
    check_schema("RegisterAnswer", &json(&parsed));
    check_schema("RegisterAnswer", &serde_json::json!({}));
    check_schema("ReportAnswer", &serde_json::json!({"acked": 4}));
    // and the schema is not a yes to everything
    let mut bad = json(&got.heartbeats[0]);
    bad["running"] = (-1).into();
    let mut schema: serde_json::Value =
        serde_json::from_str(include_str!("../../docs/master-protocol.schema.json")).expect("json");
    schema["$ref"] = "#/$defs/Heartbeat".into();
    assert!(!jsonschema::is_valid(&schema, &bad));
}

fn json(v: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(v).expect("serializes")
}
