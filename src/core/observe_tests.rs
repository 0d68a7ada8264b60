//! Events, phase timings, logs and metrics of the core, in process over the simulated backend.
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Host, HostEvent};
use crate::backends::sim::{Sim, StartFault};
use crate::config::Settings;
use crate::domain::project::{ProjectId, ProjectState};
use crate::ports::{LogQuery, LogSince};

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

#[tokio::test]
async fn lifecycle_events_are_numbered_in_order() {
    let sim = Sim::new();
    let h = host(&sim).await;
    let before = h.events().latest();
    let (a, b) = (id(1), id(2));
    h.start(a, None).await.expect("start a");
    h.start(b, None).await.expect("start b");
    h.stop(a, false).await.expect("stop a");
    let name = "before-x".parse().expect("a name");
    h.create_snapshot(b, Some(name)).await.expect("snapshot");
    sim.units
        .set_fault(a, Some(StartFault::Fail("boom".into())));
    h.start(a, None).await.expect_err("a start that fails");
    let r = h.events().since(Some(before));
    assert_eq!(r.lost, None);
    let ids: Vec<u64> = r.events.iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    let evs: Vec<HostEvent> = r.events.into_iter().map(|e| e.event).collect();
    let pos = |e: &HostEvent| {
        evs.iter()
            .position(|x| x == e)
            .unwrap_or_else(|| panic!("{e:?} missing from {evs:?}"))
    };
    assert!(pos(&HostEvent::State(a, ProjectState::Running)) < pos(&HostEvent::New(b)));
    assert!(
        pos(&HostEvent::State(b, ProjectState::Running))
            < pos(&HostEvent::State(a, ProjectState::Opened))
    );
    pos(&HostEvent::SnapshotCreated(
        b,
        "before-x".parse().expect("a name"),
    ));
    assert!(
        matches!(evs.last(), Some(HostEvent::StartFailed(p, r)) if *p == a && r.contains("boom"))
    );
}

#[tokio::test]
async fn a_start_reports_its_phases_and_they_add_up() {
    let sim = Sim::new();
    sim.units.set_start_delay(Duration::from_millis(40));
    let h = host(&sim).await;
    let p = id(3);
    let st = h.start(p, None).await.expect("start");
    let ph = st
        .phase_timings_ms
        .expect("phase timings in the start answer");
    assert!(ph.podman >= 40, "{ph:?}");
    // the phases follow each other: their sum is the total, but for ms rounding and the checks
    // between them
    assert!(
        ph.sum() <= ph.total && ph.total - ph.sum() <= 4 + ph.total / 20,
        "{ph:?}"
    );
    assert_eq!(h.status(p).phase_timings_ms, Some(ph));
    h.stop(p, false).await.expect("stop");
    assert_eq!(h.status(p).phase_timings_ms, None);
}

#[tokio::test]
async fn logs_resume_after_a_cursor_and_keep_the_newest() {
    let sim = Sim::new();
    let h = host(&sim).await;
    let p = id(4);
    for n in 1..=5 {
        sim.units.log(p, &format!("line {n}"));
    }
    sim.units.log(id(5), "another project's");
    let all = h.logs(p, &LogQuery::default()).await.expect("logs");
    let msgs: Vec<&str> = all.iter().map(|l| l.message.as_str()).collect();
    assert_eq!(msgs, ["line 1", "line 2", "line 3", "line 4", "line 5"]);
    let last2 = h
        .logs(
            p,
            &LogQuery {
                lines: 2,
                since: None,
            },
        )
        .await
        .expect("logs");
    assert_eq!(last2[0].message, "line 4");
    let cursor = crate::backends::journal_read::Cursor::parse(&all[2].cursor).expect("a cursor");
    let after = h
        .logs(
            p,
            &LogQuery {
                lines: 100,
                since: Some(LogSince::Cursor(cursor)),
            },
        )
        .await
        .expect("logs");
    assert_eq!(after.len(), 2);
    assert_eq!(after[0].message, "line 4");
}

#[tokio::test]
async fn metrics_count_starts_and_report_projects() {
    let sim = Sim::new();
    let h = host(&sim).await;
    h.start(id(6), None).await.expect("start");
    h.refresh_memory().await;
    let text = h.render_metrics();
    for want in [
        "cocalc_project_start_duration_seconds_count{outcome=\"ok\"} 1",
        "cocalc_projects{state=\"running\"} 1",
        "cocalc_project_memory_bytes{project_id=\"6f1c2d3e-0000-4000-8000-000000000006\"} 1048576",
        "cocalc_project_cpu_seconds_total{project_id=\"6f1c2d3e-0000-4000-8000-000000000006\"} 0.25",
        "cocalc_store_write_duration_seconds_count",
    ] {
        assert!(text.contains(want), "{want} missing from\n{text}");
    }
}

/// The figure the issue asks for (a 500-project scrape < 20 ms): printed, not asserted on time
/// (a timed assert would be flaky on a loaded machine).
/// `cargo test --release --lib scrape_of_500 -- --nocapture` prints it.
#[tokio::test]
async fn scrape_of_500_projects_over_the_sim() {
    let sim = Sim::new();
    let h = host(&sim).await;
    for n in 0..500 {
        h.start(id(1000 + n), None).await.expect("start");
    }
    h.refresh_memory().await;
    let t = Instant::now();
    let mut text = String::new();
    for _ in 0..10 {
        text = h.render_metrics();
    }
    println!(
        "metrics scrape over the sim, 500 running projects: {:?} each, {} bytes",
        t.elapsed() / 10,
        text.len()
    );
    assert!(text.contains("cocalc_projects{state=\"running\"} 500"));
    assert_eq!(text.matches("cocalc_project_memory_bytes{").count(), 500);
}

#[tokio::test]
async fn a_home_reaching_its_quota_is_one_event_per_crossing() {
    let sim = Sim::new();
    let h = host(&sim).await;
    let p = id(7);
    h.start(p, None).await.expect("start");
    h.set_disk_quota(p, Some(1 << 30)).await.expect("quota");
    let hits = |h: &Host| {
        h.events()
            .since(None)
            .events
            .into_iter()
            .filter(|e| matches!(e.event, HostEvent::QuotaHit { id, .. } if id == p))
            .count()
    };
    sim.storage.set_used(p, 5 << 20);
    h.refresh_storage().await;
    assert_eq!(hits(&h), 0);
    sim.storage.set_used(p, 1 << 30);
    h.refresh_storage().await;
    h.refresh_storage().await;
    assert_eq!(hits(&h), 1, "still full: no second event");
    let last = h.events().since(None).events.pop().map(|e| e.event);
    assert_eq!(
        last,
        Some(HostEvent::QuotaHit {
            id: p,
            used: 1 << 30,
            quota: 1 << 30
        })
    );
    sim.storage.set_used(p, 5 << 20);
    h.refresh_storage().await;
    sim.storage.set_used(p, 1 << 30);
    h.refresh_storage().await;
    assert_eq!(hits(&h), 2, "a new crossing");
}
