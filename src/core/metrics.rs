//! The host's Prometheus metrics (`prometheus-client`): the core and the HTTP adapter record
//! into [`Metrics`] as things happen; a scrape adds what the core already holds in memory
//! (project states, memory, CPU, disk from the refresh loops; the daemon's own /proc/self
//! figures) and encodes both. A scrape never forks or calls D-Bus.
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::domain::project::{ProjectId, ProjectState};

/// The content type of [`Metrics::render`]'s text (OpenMetrics, which Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: String,
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectLabel {
    project_id: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// 1 ms .. ~65 s: HTTP requests, store writes.
fn fast() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// 50 ms .. ~200 s: starts, stops, snapshots (a cold start pulls an image).
fn slow() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 13))
}

/// What the core and adapters record. Cheap to share (`Arc` inside every family).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    http: Family<HttpLabels, Counter>,
    http_latency: Histograms<RouteLabels>,
    start: Histograms<Outcome>,
    stop: Histograms<Outcome>,
    snapshot: Histograms<Outcome>,
    store_write: Histogram,
    thaw: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// What a scrape reads of one project (from the core's memory).
#[derive(Debug, Clone, Copy)]
pub struct ProjectSample {
    /// the project
    pub id: ProjectId,
    /// its state
    pub state: ProjectState,
    /// when its unit became active (ms since the epoch)
    pub started_at_ms: Option<u64>,
    /// memory of its unit, bytes (running projects)
    pub memory: Option<u64>,
    /// CPU time of its unit (running projects)
    pub cpu_nsec: Option<u64>,
    /// its home's usage and quota, bytes
    pub disk_used: Option<u64>,
    /// its home's quota, bytes
    pub disk_quota: Option<u64>,
}

/// The daemon's own figures (from /proc/self).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcSelf {
    /// resident set, bytes
    pub rss: u64,
    /// open file descriptors
    pub fds: u64,
    /// threads
    pub tasks: u64,
}

fn outcome(ok: bool) -> Outcome {
    Outcome {
        outcome: if ok { "ok" } else { "failed" },
    }
}

impl Metrics {
    /// Empty metrics, registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cocalc");
        let http = Family::<HttpLabels, Counter>::default();
        let http_latency: Histograms<RouteLabels> = Family::new_with_constructor(fast);
        let start: Histograms<Outcome> = Family::new_with_constructor(slow);
        let stop: Histograms<Outcome> = Family::new_with_constructor(slow);
        let snapshot: Histograms<Outcome> = Family::new_with_constructor(slow);
        let store_write = fast();
        let thaw = fast();
        registry.register_with_unit(
            "project_thaw_duration",
            "How long thawing a project frozen for being idle took (the cgroup freezer)",
            Unit::Seconds,
            thaw.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP API requests by method, route template and status",
            http.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "HTTP API request latency by method and route template",
            Unit::Seconds,
            http_latency.clone(),
        );
        registry.register_with_unit(
            "project_start_duration",
            "Project start latency (the whole start call)",
            Unit::Seconds,
            start.clone(),
        );
        registry.register_with_unit(
            "project_stop_duration",
            "Project stop latency",
            Unit::Seconds,
            stop.clone(),
        );
        registry.register_with_unit(
            "snapshot_duration",
            "Snapshot creation latency",
            Unit::Seconds,
            snapshot.clone(),
        );
        registry.register_with_unit(
            "store_write_duration",
            "Latency of writes to the host's store (SQLite)",
            Unit::Seconds,
            store_write.clone(),
        );
        Metrics {
            registry,
            http,
            http_latency,
            start,
            stop,
            snapshot,
            store_write,
            thaw,
        }
    }

    /// A frozen project was thawed.
    pub fn thaw(&self, took: Duration) {
        self.thaw.observe(took.as_secs_f64());
    }

    /// One HTTP request: `route` is a template (`/projects/:id/status`), never a raw path.
    pub fn http(&self, method: &str, route: &'static str, status: u16, took: Duration) {
        let method = method.to_string();
        self.http
            .get_or_create(&HttpLabels {
                method: method.clone(),
                route,
                status,
            })
            .inc();
        self.http_latency
            .get_or_create(&RouteLabels { method, route })
            .observe(took.as_secs_f64());
    }

    /// A start call finished.
    pub fn start(&self, ok: bool, took: Duration) {
        self.start
            .get_or_create(&outcome(ok))
            .observe(took.as_secs_f64());
    }

    /// A stop call finished.
    pub fn stop(&self, ok: bool, took: Duration) {
        self.stop
            .get_or_create(&outcome(ok))
            .observe(took.as_secs_f64());
    }

    /// A snapshot creation finished.
    pub fn snapshot(&self, ok: bool, took: Duration) {
        self.snapshot
            .get_or_create(&outcome(ok))
            .observe(took.as_secs_f64());
    }

    /// A store write finished.
    pub fn store_write(&self, took: Duration) {
        self.store_write.observe(took.as_secs_f64());
    }

    /// The exposition: what was recorded, plus the samples of this scrape.
    pub fn render(&self, projects: &[ProjectSample], proc_self: Option<ProcSelf>) -> String {
        let mut now = Registry::with_prefix("cocalc");
        let states = Family::<StateLabel, Gauge>::default();
        for s in [
            ProjectState::Opened,
            ProjectState::Starting,
            ProjectState::Running,
            ProjectState::Stopping,
            ProjectState::Frozen,
        ] {
            states
                .get_or_create(&StateLabel { state: s.as_str() })
                .set(0);
        }
        let memory = Family::<ProjectLabel, Gauge>::default();
        let cpu = Family::<ProjectLabel, Counter<f64>>::default();
        let used = Family::<ProjectLabel, Gauge>::default();
        let quota = Family::<ProjectLabel, Gauge>::default();
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for p in projects {
            states
                .get_or_create(&StateLabel {
                    state: p.state.as_str(),
                })
                .inc();
            let label = || ProjectLabel {
                project_id: p.id.to_string(),
            };
            if let Some(m) = p.memory {
                memory.get_or_create(&label()).set(gauge(m));
            }
            if let Some(n) = p.cpu_nsec {
                cpu.get_or_create(&label()).inc_by(n as f64 / 1e9);
            }
            if let Some(u) = p.disk_used {
                used.get_or_create(&label()).set(gauge(u));
            }
            if let Some(q) = p.disk_quota {
                quota.get_or_create(&label()).set(gauge(q));
            }
        }
        now.register("projects", "Known projects by state", states);
        now.register_with_unit(
            "project_memory",
            "Memory in use by a running project's unit",
            Unit::Bytes,
            memory,
        );
        now.register_with_unit(
            "project_cpu",
            "CPU time used by a running project's unit",
            Unit::Seconds,
            cpu,
        );
        now.register_with_unit(
            "project_disk_used",
            "Bytes referenced by a project's home",
            Unit::Bytes,
            used,
        );
        now.register_with_unit(
            "project_disk_quota",
            "Quota of a project's home",
            Unit::Bytes,
            quota,
        );
        if let Some(p) = proc_self {
            let g = |v: u64| {
                let g = Gauge::<i64>::default();
                g.set(gauge(v));
                g
            };
            now.register_with_unit(
                "daemon_resident_memory",
                "Resident memory of the daemon",
                Unit::Bytes,
                g(p.rss),
            );
            now.register(
                "daemon_open_fds",
                "Open file descriptors of the daemon",
                g(p.fds),
            );
            now.register("daemon_tasks", "Threads of the daemon", g(p.tasks));
        }
        let mut out = String::with_capacity(4096 + projects.len() * 400);
        // a String never fails to be written to
        let _ = encode_registry(&mut out, &self.registry);
        let _ = encode_registry(&mut out, &now);
        let _ = encode_eof(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: u32, state: ProjectState) -> ProjectSample {
        ProjectSample {
            id: format!("6f1c2d3e-0000-4000-8000-{n:012x}").parse().unwrap(),
            state,
            started_at_ms: None,
            memory: Some(1 << 20),
            cpu_nsec: Some(1_500_000_000),
            disk_used: Some(4096),
            disk_quota: Some(1 << 30),
        }
    }

    #[test]
    fn renders_recorded_and_sampled_figures() {
        let m = Metrics::new();
        m.http("GET", "/projects/:id/status", 200, Duration::from_millis(3));
        m.http("GET", "/projects/:id/status", 200, Duration::from_millis(3));
        m.start(true, Duration::from_secs(2));
        m.store_write(Duration::from_micros(300));
        let text = m.render(
            &[
                sample(1, ProjectState::Running),
                sample(2, ProjectState::Opened),
            ],
            Some(ProcSelf {
                rss: 10,
                fds: 7,
                tasks: 3,
            }),
        );
        for want in [
            "cocalc_http_requests_total{method=\"GET\",route=\"/projects/:id/status\",status=\"200\"} 2",
            "cocalc_project_start_duration_seconds_count{outcome=\"ok\"} 1",
            "cocalc_store_write_duration_seconds_count 1",
            "cocalc_projects{state=\"running\"} 1",
            "cocalc_projects{state=\"stopping\"} 0",
            "cocalc_project_cpu_seconds_total{project_id=\"6f1c2d3e-0000-4000-8000-000000000001\"} 1.5",
            "cocalc_daemon_open_fds 7",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(text.matches("# EOF").count(), 1);
    }

    /// Not a timed assert (that would be flaky): prints what a 500-project scrape takes, for the
    /// figure the issue asks for (< 20 ms). `cargo test --release metrics_scrape -- --nocapture`.
    #[test]
    fn metrics_scrape_of_500_projects() {
        let m = Metrics::new();
        for i in 0..50 {
            m.http(
                "GET",
                "/projects/:id/status",
                200 + i % 2,
                Duration::from_millis(1),
            );
        }
        let projects: Vec<_> = (0..500).map(|n| sample(n, ProjectState::Running)).collect();
        let t = std::time::Instant::now();
        let mut len = 0;
        for _ in 0..10 {
            len = m.render(&projects, Some(ProcSelf::default())).len();
        }
        let each = t.elapsed() / 10;
        println!("metrics scrape, 500 projects: {each:?} per scrape, {len} bytes");
        assert!(len > 500 * 4 * 60, "{len}");
    }
}

/// The store with its writes timed into [`Metrics::store_write`] (reads pass through).
#[derive(Debug)]
pub(super) struct TimedStore {
    pub(super) inner: std::sync::Arc<dyn crate::ports::Store>,
    pub(super) metrics: std::sync::Arc<Metrics>,
}

#[async_trait::async_trait]
impl crate::ports::Store for TimedStore {
    async fn host_id(&self) -> Result<String, crate::ports::StoreError> {
        self.inner.host_id().await
    }
    async fn projects(&self) -> Result<Vec<crate::ports::ProjectRow>, crate::ports::StoreError> {
        self.inner.projects().await
    }
    async fn project(
        &self,
        id: ProjectId,
    ) -> Result<Option<crate::ports::ProjectRow>, crate::ports::StoreError> {
        self.inner.project(id).await
    }
    async fn upsert(
        &self,
        id: ProjectId,
        state: ProjectState,
        config: Option<crate::domain::project::RunConfig>,
        now_ms: u64,
    ) -> Result<(), crate::ports::StoreError> {
        let t = std::time::Instant::now();
        // a frozen project is running for the store and the master
        let r = self.inner.upsert(id, state.stored(), config, now_ms).await;
        self.metrics.store_write(t.elapsed());
        r
    }
    fn touch(&self, id: ProjectId, now_ms: u64) {
        // queued, not waited for: its latency is the store's own business
        self.inner.touch(id, now_ms)
    }
    async fn id_range(
        &self,
        id: ProjectId,
        alloc: crate::ports::IdAlloc,
    ) -> Result<Option<u32>, crate::ports::StoreError> {
        let t = std::time::Instant::now();
        let r = self.inner.id_range(id, alloc).await;
        self.metrics.store_write(t.elapsed());
        r
    }
    async fn ssh_keys(&self, id: ProjectId) -> Result<Vec<String>, crate::ports::StoreError> {
        self.inner.ssh_keys(id).await
    }
    async fn set_ssh_keys(
        &self,
        id: ProjectId,
        keys: Vec<String>,
    ) -> Result<(), crate::ports::StoreError> {
        let t = std::time::Instant::now();
        let r = self.inner.set_ssh_keys(id, keys).await;
        self.metrics.store_write(t.elapsed());
        r
    }
    async fn report(
        &self,
        id: ProjectId,
        kind: crate::domain::master::ReportKind,
        state: ProjectState,
        now_ms: u64,
    ) -> Result<(), crate::ports::StoreError> {
        let t = std::time::Instant::now();
        let r = self.inner.report(id, kind, state, now_ms).await;
        self.metrics.store_write(t.elapsed());
        r
    }
    async fn remove(&self, id: ProjectId, now_ms: u64) -> Result<bool, crate::ports::StoreError> {
        let t = std::time::Instant::now();
        let r = self.inner.remove(id, now_ms).await;
        self.metrics.store_write(t.elapsed());
        r
    }
    fn enable_outbox(&self, limit: usize) {
        self.inner.enable_outbox(limit)
    }
    async fn outbox_batch(
        &self,
        max: usize,
    ) -> Result<Vec<crate::domain::master::Report>, crate::ports::StoreError> {
        self.inner.outbox_batch(max).await
    }
    async fn outbox_ack(&self, seq: u64) -> Result<(), crate::ports::StoreError> {
        let t = std::time::Instant::now();
        let r = self.inner.outbox_ack(seq).await;
        self.metrics.store_write(t.elapsed());
        r
    }
    async fn outbox_depth(&self) -> Result<u64, crate::ports::StoreError> {
        self.inner.outbox_depth().await
    }
    async fn outbox_wait(&self) {
        self.inner.outbox_wait().await
    }
}
