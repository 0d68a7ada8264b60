//! The core's hard cases, in process over the simulated backend (`backends::sim`): milliseconds
//! each. What systemd, podman and btrfs themselves do is proven by the e2e suite in the testbed.
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Error, Host};
use crate::backends::sim::{Sim, StartFault};
use crate::config::Settings;
use crate::domain::project::{ActiveState, ProjectId, ProjectState};

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

/// Waits (up to 2s) until `f` holds.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(2), "never: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn stored(sim: &Sim, id: ProjectId) -> Option<ProjectState> {
    sim.store.row(id).map(|r| r.state)
}

#[tokio::test]
async fn start_and_stop_are_idempotent() {
    let sim = Sim::new();
    let h = host(&sim).await;
    let p = id(1);
    assert_eq!(
        h.start(p, None).await.expect("start").state,
        ProjectState::Running
    );
    assert_eq!(
        h.start(p, None).await.expect("start again").state,
        ProjectState::Running
    );
    assert_eq!(
        sim.units.starts.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(stored(&sim, p), Some(ProjectState::Running));
    // the CPU quota goes on once the unit runs
    assert_eq!(
        sim.units.cpu.lock().expect("lock").get(&p),
        Some(&Some(1.0))
    );
    assert_eq!(
        h.stop(p, false).await.expect("stop").state,
        ProjectState::Opened
    );
    assert_eq!(
        h.stop(p, false).await.expect("stop again").state,
        ProjectState::Opened
    );
    assert_eq!(sim.units.stops.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(sim.units.state(p), None);
    assert_eq!(stored(&sim, p), Some(ProjectState::Opened));
    assert!(h.is_known(p));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_starts_and_stops_of_one_id_end_consistent() {
    let sim = Sim::new();
    sim.units.set_start_delay(Duration::from_millis(3));
    sim.units.set_stop_delay(Duration::from_millis(2));
    let h = host(&sim).await;
    let p = id(2);
    let mut calls = Vec::new();
    for i in 0..40 {
        let h = h.clone();
        calls.push(tokio::spawn(async move {
            if i % 2 == 0 {
                h.start(p, None).await.map(|s| s.state)
            } else {
                h.stop(p, i % 4 == 1).await.map(|s| s.state)
            }
        }));
    }
    for c in calls {
        let r = c.await.expect("no panic");
        // every call is served whole: never a half state, never an error
        assert!(
            matches!(r, Ok(ProjectState::Running | ProjectState::Opened)),
            "{r:?}"
        );
    }
    // the host's picture and the units agree, and so does the store
    let unit = sim.units.state(p).map(ProjectState::from_active_state);
    let want = unit.unwrap_or(ProjectState::Opened);
    eventually("status matches the unit", || h.peek_status(p).state == want).await;
    assert_eq!(stored(&sim, p), Some(want));
    // and it still starts and stops cleanly
    assert_eq!(
        h.start(p, None).await.expect("start").state,
        ProjectState::Running
    );
    assert_eq!(
        h.stop(p, false).await.expect("stop").state,
        ProjectState::Opened
    );
}

#[tokio::test]
async fn a_unit_that_vanishes_mid_start_leaves_the_project_stopped_and_startable() {
    let sim = Sim::new();
    let h = host(&sim).await;
    let p = id(3);
    sim.units.set_fault(p, Some(StartFault::Vanish));
    let st = h
        .start(p, None)
        .await
        .expect("the start job itself succeeded");
    assert_eq!(st.state, ProjectState::Opened);
    assert_eq!(h.peek_status(p).state, ProjectState::Opened);
    assert_eq!(stored(&sim, p), Some(ProjectState::Opened));
    sim.units.set_fault(p, None);
    assert_eq!(
        h.start(p, None).await.expect("start").state,
        ProjectState::Running
    );
}

#[tokio::test]
async fn a_crash_between_unit_started_and_store_written_is_adopted_by_the_next_host() {
    let sim = Sim::new();
    let p = id(4);
    {
        let h = host(&sim).await;
        sim.store.set_fail_upserts(true);
        let r = h.start(p, None).await;
        assert!(matches!(r, Err(Error::Store(_))), "{r:?}");
        assert_eq!(sim.units.state(p), Some(ActiveState::Active));
        assert_eq!(stored(&sim, p), None);
        h.shutdown(Duration::from_secs(1)).await;
    }
    // the daemon comes back: the store works again, the unit kept running
    sim.store.set_fail_upserts(false);
    let h = host(&sim).await;
    assert!(h.is_known(p));
    assert_eq!(h.status(p).state, ProjectState::Running);
    assert_eq!(stored(&sim, p), Some(ProjectState::Running));
    assert_eq!(h.list().len(), 1);
    // a start finds it running and starts nothing
    assert_eq!(
        h.start(p, None).await.expect("start").state,
        ProjectState::Running
    );
    assert_eq!(
        sim.units.starts.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

/// Every state the store may hold of a project, and every state its unit may be in (`None`:
/// none), for the reconcile tests' mixes.
const STORES: [Option<ProjectState>; 3] = [
    None,
    Some(ProjectState::Opened),
    Some(ProjectState::Running),
];
const UNITS: [Option<ActiveState>; 5] = [
    None,
    Some(ActiveState::Active),
    Some(ActiveState::Activating),
    Some(ActiveState::Deactivating),
    Some(ActiveState::Failed),
];

#[tokio::test]
async fn reconcile_agrees_with_every_mix_of_store_units_and_storage() {
    let (stores, units) = (STORES, UNITS);
    let mut cases = 0;
    for store in stores {
        for unit in units {
            for home in [false, true] {
                let case = format!("store {store:?}, unit {unit:?}, home {home}");
                let sim = Sim::new();
                let p = id(5);
                if let Some(s) = store {
                    sim.store.put(p, s, super::now_ms());
                }
                sim.units.set_external(p, unit);
                if home {
                    sim.storage.add_home(p);
                }
                let h = host(&sim).await;
                let state = unit.map_or(ProjectState::Opened, ProjectState::from_active_state);
                // every loaded unit and every stored row is known; nothing else
                assert_eq!(h.is_known(p), store.is_some() || unit.is_some(), "{case}");
                assert_eq!(h.peek_status(p).state, state, "{case}");
                // the store is corrected to what runs
                let want = (store.is_some() || unit.is_some()).then_some(state);
                assert_eq!(stored(&sim, p), want, "{case}");
                assert_eq!(
                    h.running_count(),
                    usize::from(state != ProjectState::Opened)
                );
                // the sweep sees the storage as it is
                let out = h.sweep_snapshots(None, Some(vec![p])).await.expect("sweep");
                let skipped = out.first().and_then(|o| o.skipped);
                if !home {
                    assert_eq!(skipped, Some("no_home"), "{case}");
                } else if h.is_known(p) {
                    assert!(out[0].created.is_some(), "{case}: {out:?}");
                } else {
                    // never seen by this host: not touched, so left alone
                    assert_eq!(skipped, Some("untouched"), "{case}");
                }
                h.shutdown(Duration::from_secs(1)).await;
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 30);
}

/// Many projects in one reconcile, every mix at once: the store writes go out together (not one
/// awaited round trip per project) and each project still ends where systemd says it is.
#[tokio::test]
async fn reconcile_of_many_projects_corrects_each_one() {
    let (stores, units) = (STORES, UNITS);
    let sim = Sim::new();
    let mut cases = Vec::new();
    for n in 0..300u32 {
        let p = id(1000 + n);
        let store = stores[n as usize % stores.len()];
        let unit = units[(n as usize / stores.len()) % units.len()];
        if let Some(s) = store {
            sim.store.put(p, s, super::now_ms());
        }
        sim.units.set_external(p, unit);
        cases.push((p, store, unit));
    }
    let h = host(&sim).await;
    let mut up = 0;
    for (p, store, unit) in cases {
        let case = format!("{p}: store {store:?}, unit {unit:?}");
        let state = unit.map_or(ProjectState::Opened, ProjectState::from_active_state);
        assert_eq!(h.is_known(p), store.is_some() || unit.is_some(), "{case}");
        assert_eq!(h.peek_status(p).state, state, "{case}");
        let want = (store.is_some() || unit.is_some()).then_some(state);
        assert_eq!(stored(&sim, p), want, "{case}");
        up += usize::from(state != ProjectState::Opened);
    }
    assert_eq!(h.running_count(), up);
    assert_eq!(up, 180);
    h.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_client_hanging_up_mid_start_does_not_cut_the_start_off() {
    let sim = Sim::new();
    sim.units.set_start_delay(Duration::from_millis(50));
    let h = host(&sim).await;
    let p = id(6);
    let call = {
        let h = h.clone();
        tokio::spawn(async move { h.start(p, None).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    // the HTTP connection closes: hyper drops the request's future
    call.abort();
    eventually("the start completes and is recorded", || {
        stored(&sim, p) == Some(ProjectState::Running)
    })
    .await;
    assert_eq!(h.peek_status(p).state, ProjectState::Running);
    assert!(h.is_known(p));
}

#[tokio::test]
async fn a_failed_start_cleans_up_and_records_nothing_new() {
    let sim = Sim::new();
    let h = host(&sim).await;
    let p = id(7);
    sim.units
        .set_fault(p, Some(StartFault::Fail("bad image".into())));
    match h.start(p, None).await {
        Err(Error::StartFailed {
            id,
            reason,
            journal,
        }) => {
            assert_eq!(id, p);
            assert_eq!(reason, "bad image");
            assert!(journal.contains("simulated failure"), "{journal}");
        }
        r => panic!("expected a failed start, got {r:?}"),
    }
    // the failed unit is reset, the container removed, nothing recorded for an unknown project
    assert_eq!(sim.units.state(p), None);
    assert!(
        sim.units
            .helpers
            .lock()
            .expect("lock")
            .contains(&crate::ports::Helper::RemoveContainer(p))
    );
    assert_eq!(h.peek_status(p).state, ProjectState::Opened);
    assert_eq!(stored(&sim, p), None);
    assert!(!h.is_known(p));
    // a known project that fails to start is recorded as stopped
    sim.units.set_fault(p, None);
    h.start(p, None).await.expect("start");
    h.stop(p, false).await.expect("stop");
    sim.units
        .set_fault(p, Some(StartFault::Fail("again".into())));
    assert!(h.start(p, None).await.is_err());
    assert_eq!(stored(&sim, p), Some(ProjectState::Opened));
}

#[tokio::test]
async fn random_ids_do_not_grow_memory() {
    let sim = Sim::new();
    let h = host(&sim).await;
    for n in 0..6000 {
        let p = id(1_000_000 + n);
        assert_eq!(h.status(p).state, ProjectState::Opened);
        assert_eq!(
            h.stop(p, false).await.expect("stop").state,
            ProjectState::Opened
        );
    }
    assert!(h.list().is_empty());
    assert!(h.read_entries().is_empty());
    assert!(h.locks.lock().expect("lock").len() <= 4097);
    assert!(sim.store.is_empty());
}

#[tokio::test]
async fn shutdown_waits_for_an_in_flight_start_then_stops_the_loops() {
    let sim = Sim::new();
    sim.units.set_start_delay(Duration::from_millis(100));
    let h = host(&sim).await;
    let p = id(8);
    let token = h.shutdown_token();
    let call = {
        let h = h.clone();
        tokio::spawn(async move { h.start(p, None).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(h.tasks.in_flight(), 1);
    assert!(!h.tasks.loops.is_empty());
    let t = Instant::now();
    // an Arc<Host> is still held here (as the D-Bus task holds one): the loops must end anyway
    h.shutdown(Duration::from_secs(5)).await;
    assert!(
        t.elapsed() >= Duration::from_millis(50),
        "shutdown did not wait"
    );
    // the start was finished and recorded before the loops stopped
    assert_eq!(sim.units.state(p), Some(ActiveState::Active));
    assert_eq!(stored(&sim, p), Some(ProjectState::Running));
    assert_eq!(
        call.await.expect("no panic").expect("start").state,
        ProjectState::Running
    );
    assert!(token.is_cancelled());
    assert!(h.tasks.loops.is_empty(), "loops still running");
    assert_eq!(h.tasks.in_flight(), 0);
}

#[tokio::test]
async fn a_drain_is_bounded() {
    let sim = Sim::new();
    sim.units.set_start_delay(Duration::from_secs(30));
    let h = host(&sim).await;
    let p = id(9);
    let h2 = h.clone();
    let _call = tokio::spawn(async move { h2.start(p, None).await });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let t = Instant::now();
    h.shutdown(Duration::from_millis(50)).await;
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(h.tasks.loops.is_empty());
}

#[tokio::test]
async fn below_the_reserve_cold_starts_and_quota_raises_are_refused() {
    let sim = Sim::new();
    let h = host(&sim).await;
    let (p, q) = (id(0x51), id(0x52));
    h.start(p, None).await.expect("start p");
    h.stop(p, false).await.expect("stop p");
    h.set_disk_quota(p, Some(2 << 30)).await.expect("quota");
    h.start(q, None).await.expect("start q");
    let starts = sim.units.starts.load(std::sync::atomic::Ordering::SeqCst);
    // 1 byte free of 1000: below the default reserve of 5% (50 bytes)
    sim.storage.set_space(1, 1000);
    match h.start(p, None).await {
        Err(Error::StorageFull { free, reserve }) => assert_eq!((free, reserve), (1, 50)),
        other => panic!("a cold start below the reserve: {other:?}"),
    }
    assert_eq!(
        sim.units.starts.load(std::sync::atomic::Ordering::SeqCst),
        starts,
        "no unit was started"
    );
    assert_eq!(sim.units.state(p), None);
    // a running project goes on, and its start is the idempotent answer
    assert_eq!(
        h.start(q, None).await.expect("q runs").state,
        ProjectState::Running
    );
    // lowering a quota frees nothing but harms nothing; raising or lifting one waits
    h.set_disk_quota(p, Some(1 << 30)).await.expect("lower");
    for raise in [Some(3 << 30), None] {
        assert!(
            matches!(
                h.set_disk_quota(p, raise).await,
                Err(Error::StorageFull { .. })
            ),
            "{raise:?}"
        );
    }
    // space freed: starts again
    sim.storage.set_space(1000, 1000);
    assert_eq!(
        h.start(p, None).await.expect("start after freeing").state,
        ProjectState::Running
    );
}

#[tokio::test]
async fn the_host_maxima_bind_start_configs_and_quota_changes() {
    use crate::domain::project::{NetworkMode, RunConfig};
    let mut settings = Settings::default();
    settings.limits.max.network = crate::domain::limits::Networks::NONE.with(NetworkMode::None);
    let sim = Sim::new();
    let h = Host::with_backends(settings, sim.backends())
        .await
        .expect("host");
    let p = id(0x53);
    for (cfg, field) in [
        (
            RunConfig {
                disk: Some(101 << 30),
                ..Default::default()
            },
            "disk",
        ),
        (
            RunConfig {
                network: Some(NetworkMode::Slirp4netns),
                ..Default::default()
            },
            "network",
        ),
    ] {
        match h.start(p, Some(cfg)).await {
            Err(Error::InvalidConfig(e)) => assert_eq!(e.field, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    assert_eq!(
        sim.units.starts.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    h.start(p, None).await.expect("start within the maxima");
    assert!(matches!(
        h.set_disk_quota(p, Some(101 << 30)).await,
        Err(Error::InvalidConfig(_))
    ));
}

fn plan_base(sim: &Sim, p: ProjectId) -> u32 {
    sim.units.plans.lock().expect("lock")[&p].id_base
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn id_ranges_are_allocated_once_distinct_and_kept_across_restarts() {
    let sim = Sim::new();
    // a host account's subordinate range where the pool's second slot would be
    let pool = 1u64 << 30;
    let mut reserved = crate::domain::ids::Forbidden::default();
    reserved.add_subid(&format!("alice:{}:10", pool + 65_536 + 5));
    sim.storage.set_reserved(reserved);
    let h = host(&sim).await;
    // concurrent first starts of many projects: every one its own slot, none reserved
    let ps: Vec<ProjectId> = (100..108).map(id).collect();
    let mut starts = Vec::new();
    for &p in &ps {
        let h = h.clone();
        starts.push(tokio::spawn(async move { h.start(p, None).await }));
    }
    for s in starts {
        s.await.expect("join").expect("start");
    }
    let mut bases: Vec<u32> = ps.iter().map(|&p| plan_base(&sim, p)).collect();
    for &b in &bases {
        assert!(
            u64::from(b) >= pool && (u64::from(b) - pool).is_multiple_of(65_536),
            "{b}"
        );
        assert_ne!(
            u64::from(b),
            pool + 65_536,
            "the reserved slot was given out"
        );
    }
    let before = bases.clone();
    bases.sort_unstable();
    bases.dedup();
    assert_eq!(
        bases.len(),
        ps.len(),
        "two projects share a range: {before:?}"
    );
    // each home (and a fresh scratch) belongs to base + user_uid
    for &p in &ps {
        assert_eq!(sim.storage.owner(p), Some(plan_base(&sim, p) + 1000));
    }
    // a restarted host gives each project the same range again
    for &p in &ps {
        h.stop(p, false).await.expect("stop");
    }
    drop(h);
    let h = host(&sim).await;
    for (&p, &b) in ps.iter().zip(&before) {
        h.start(p, None).await.expect("start again");
        assert_eq!(plan_base(&sim, p), b);
    }
}

#[tokio::test]
async fn a_home_of_the_old_shared_range_is_converted_and_a_foreign_one_refused() {
    let sim = Sim::new();
    let h = host(&sim).await;
    let (old, root_owned) = (id(120), id(121));
    sim.storage.add_home(old);
    sim.storage.set_owner(old, 101_000);
    h.start(old, None).await.expect("start");
    let base = plan_base(&sim, old);
    assert_eq!(sim.storage.owner(old), Some(base + 1000));
    // a scratch is given to the project's user too
    let cfg = crate::domain::project::RunConfig {
        scratch: Some(64 << 20),
        ..Default::default()
    };
    let p = id(122);
    h.start(p, Some(cfg)).await.expect("start with scratch");
    let scratch = sim.units.plans.lock().expect("lock")[&p]
        .scratch
        .clone()
        .expect("a scratch");
    assert_eq!(sim.storage.given(&scratch), Some(plan_base(&sim, p) + 1000));
    // a home owned by a uid below user_uid is nobody's project user: not touched, no start
    sim.storage.add_home(root_owned);
    sim.storage.set_owner(root_owned, 0);
    let e = h.start(root_owned, None).await.expect_err("refused");
    assert!(matches!(e, Error::StartFailed { .. }), "{e:?}");
    assert_eq!(sim.storage.owner(root_owned), Some(0));
    assert_eq!(sim.units.state(root_owned), None);
}

#[tokio::test]
async fn images_the_host_does_not_allow_never_reach_the_units() {
    let sim = Sim::new();
    let mut s = Settings::default();
    s.projects.images = vec!["docker.io/library/*:*".into()];
    let h = Host::with_backends(s, sim.backends()).await.expect("host");
    let p = id(130);
    for image in [
        "docker-archive:/etc/shadow",
        "dir:/root",
        "quay.io/evil/x:1",
        "docker.io/library/../x:1",
    ] {
        let cfg = crate::domain::project::RunConfig {
            image: Some(image.into()),
            ..Default::default()
        };
        let e = h.start(p, Some(cfg)).await.expect_err(image);
        assert_eq!(e.code(), "image_not_allowed", "{image}: {e}");
    }
    assert_eq!(
        sim.units.starts.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert!(
        sim.store.row(p).is_none(),
        "a refused start recorded nothing"
    );
    let cfg = crate::domain::project::RunConfig {
        image: Some("docker.io/library/debian:12".into()),
        ..Default::default()
    };
    h.start(p, Some(cfg))
        .await
        .expect("an allowed image starts");
    assert_eq!(
        sim.units.plans.lock().expect("lock")[&p].image.to_string(),
        "docker.io/library/debian:12"
    );
}

#[tokio::test]
async fn below_the_reserve_running_homes_are_held_at_their_usage_and_given_back() {
    let sim = Sim::new();
    let h = host(&sim).await;
    let (p, q, r) = (id(0x61), id(0x62), id(0x63));
    // p: the host default quota (10 GiB); q: its own 1 GiB, already above it; r: stopped
    h.start(p, None).await.expect("start p");
    h.start(q, None).await.expect("start q");
    h.set_disk_quota(q, Some(1 << 30)).await.expect("quota q");
    h.start(r, None).await.expect("start r");
    h.stop(r, false).await.expect("stop r");
    sim.storage.set_used(p, 5 << 20);
    sim.storage.set_used(q, 2 << 30);
    sim.storage.set_used(r, 7 << 20);
    let default = Some(10u64 << 30);
    assert_eq!(sim.storage.limit(p), Some(default));
    h.refresh_storage().await;
    assert_eq!(h.status(p).storage_full, None);

    sim.storage.set_space(1, 1000);
    h.refresh_storage().await;
    let st = h.status(p);
    assert_eq!(
        st.storage_full,
        Some(crate::domain::reserve::Shortfall {
            free: 1,
            reserve: 50
        })
    );
    assert_eq!(sim.storage.limit(p), Some(Some(5 << 20)), "held at usage");
    assert_eq!(st.disk.and_then(|d| d.quota), Some(5 << 20));
    assert_eq!(
        sim.storage.limit(q),
        Some(Some(1 << 30)),
        "never above its quota"
    );
    assert_eq!(sim.storage.limit(r), Some(default), "not running");
    // it deleted some: held at the lower usage
    sim.storage.set_used(p, 3 << 20);
    h.refresh_storage().await;
    assert_eq!(sim.storage.limit(p), Some(Some(3 << 20)));

    // space back: configured quotas again
    sim.storage.set_space(1000, 1000);
    h.refresh_storage().await;
    assert_eq!(h.status(p).storage_full, None);
    assert_eq!(sim.storage.limit(p), Some(default));
    assert_eq!(h.status(p).disk.and_then(|d| d.quota), default);
    assert_eq!(sim.storage.limit(q), Some(Some(1 << 30)));

    // held again, then the daemon restarts: the new one gives every home its quota back
    sim.storage.set_space(1, 1000);
    h.refresh_storage().await;
    assert_eq!(sim.storage.limit(p), Some(Some(3 << 20)));
    h.shutdown(Duration::from_millis(100)).await;
    drop(h);
    sim.storage.set_space(1000, 1000);
    let h = host(&sim).await;
    h.refresh_storage().await;
    assert_eq!(sim.storage.limit(p), Some(default));
    assert_eq!(sim.storage.limit(q), Some(Some(1 << 30)));
    assert_eq!(sim.storage.limit(r), Some(default));
}
