//! `cocalc-project-host top`: a live terminal view of the projects with a unit up (like
//! `systemd-cgtop` for projects), refreshed every second from the bus (`GetTop`: what the daemon
//! holds in memory; the daemon refreshes memory, CPU and disk every 5 s). Keys: `c` sorts by CPU,
//! `m` by memory, `q` (or Esc, Ctrl-C) quits.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Cell, Paragraph, Row, Table};

use super::cli::{CliError, fmt_bytes};
use crate::api::{ErrorKind, WireError};

const REFRESH: Duration = Duration::from_secs(1);

/// What the rows are sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortBy {
    /// CPU use, highest first
    Cpu,
    /// memory, highest first
    Memory,
}

/// One project as shown.
#[derive(Debug, Clone, PartialEq)]
pub struct TopRow {
    /// project id
    pub id: String,
    /// state
    pub state: String,
    /// when its unit became active (ms), 0 unknown
    pub started_at_ms: u64,
    /// bytes
    pub memory: u64,
    /// share of one core over the last refresh window, percent (`None`: not yet known)
    pub cpu_percent: Option<f64>,
    /// bytes used by its home
    pub disk_used: u64,
    /// its home's quota, 0 none
    pub disk_quota: u64,
}

/// CPU rates from the cumulative CPU times the daemon reports (which change every 5 s): the rate
/// over the last change, per project.
#[derive(Debug, Default)]
pub struct CpuRates {
    last: HashMap<String, (u64, Instant, Option<f64>)>,
}

impl CpuRates {
    /// Takes a CPU time reading of `id` at `now`; the current rate (percent of one core).
    pub fn update(&mut self, id: &str, cpu_nsec: u64, now: Instant) -> Option<f64> {
        match self.last.get_mut(id) {
            Some((v, t, rate)) if cpu_nsec != *v => {
                let dt = now.duration_since(*t).as_secs_f64();
                if dt > 0.0 && cpu_nsec > *v {
                    *rate = Some((cpu_nsec - *v) as f64 / 1e9 / dt * 100.0);
                }
                *v = cpu_nsec;
                *t = now;
                *rate
            }
            Some((_, _, rate)) => *rate,
            None => {
                self.last.insert(id.to_string(), (cpu_nsec, now, None));
                None
            }
        }
    }
}

/// Sorts rows, highest first (ties by id, so the order does not flicker).
pub fn sort(rows: &mut [TopRow], by: SortBy) {
    rows.sort_by(|a, b| {
        let key = |r: &TopRow| match by {
            SortBy::Cpu => r.cpu_percent.unwrap_or(-1.0),
            SortBy::Memory => r.memory as f64,
        };
        key(b).total_cmp(&key(a)).then(a.id.cmp(&b.id))
    });
}

/// `1d02h`, `3h04m`, `5m06s`, `7s`.
pub fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        s if s >= 86_400 => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

fn draw(f: &mut ratatui::Frame<'_>, rows: &[TopRow], by: SortBy, now_ms: u64, err: Option<&str>) {
    let [head, body] =
        Layout::vertical([Constraint::Length(2), Constraint::Min(0)]).areas(f.area());
    let sorted = match by {
        SortBy::Cpu => "CPU",
        SortBy::Memory => "memory",
    };
    let mut title = vec![Line::from(format!(
        "cocalc-project-host top: {} project(s) up, sorted by {sorted}  (c: CPU, m: memory, q: quit)",
        rows.len()
    ))];
    if let Some(e) = err {
        title.push(Line::from(format!("error: {e}")));
    }
    f.render_widget(Paragraph::new(title), head);
    let header = Row::new(["PROJECT", "STATE", "UPTIME", "CPU%", "MEMORY", "DISK"])
        .style(Style::default().add_modifier(Modifier::BOLD | Modifier::REVERSED));
    let lines = rows.iter().map(|r| {
        let up = if r.started_at_ms == 0 {
            "-".to_string()
        } else {
            uptime(now_ms.saturating_sub(r.started_at_ms))
        };
        let cpu = r.cpu_percent.map_or("-".to_string(), |c| format!("{c:.1}"));
        let disk = match r.disk_quota {
            0 => fmt_bytes(r.disk_used),
            q => format!("{}/{}", fmt_bytes(r.disk_used), fmt_bytes(q)),
        };
        Row::new([
            Cell::from(r.id.clone()),
            Cell::from(r.state.clone()),
            Cell::from(up),
            Cell::from(cpu),
            Cell::from(fmt_bytes(r.memory)),
            Cell::from(disk),
        ])
    });
    let table = Table::new(
        lines,
        [
            Constraint::Length(36),
            Constraint::Length(9),
            Constraint::Length(8),
            Constraint::Length(7),
            Constraint::Length(8),
            Constraint::Min(10),
        ],
    )
    .header(header);
    f.render_widget(table, body);
}

/// Runs the view until `q`.
pub async fn run(mut by: SortBy) -> Result<(), CliError> {
    let p = super::observe_cli::proxy().await?;
    // fails without a terminal (before the screen is taken over)
    let mut term = ratatui::try_init().map_err(|e| {
        CliError::from(WireError::new(
            ErrorKind::Internal,
            format!("top needs a terminal: {e}"),
        ))
    })?;
    let mut rates = CpuRates::default();
    let result = async {
        loop {
            let now = Instant::now();
            let (mut rows, err) = match p.get_top().await {
                Ok(v) => (
                    v.into_iter()
                        .map(|(id, state, started, memory, cpu, used, quota)| TopRow {
                            cpu_percent: rates.update(&id, cpu, now),
                            id,
                            state,
                            started_at_ms: started,
                            memory,
                            disk_used: used,
                            disk_quota: quota,
                        })
                        .collect::<Vec<_>>(),
                    None,
                ),
                Err(e) => (Vec::new(), Some(CliError::from(e).message)),
            };
            sort(&mut rows, by);
            let now_ms = crate::core::now_ms();
            term.draw(|f| draw(f, &rows, by, now_ms, err.as_deref()))
                .map_err(|e| WireError::new(ErrorKind::Internal, e.to_string()))?;
            // keys until the next refresh
            while let Some(left) = REFRESH.checked_sub(now.elapsed()) {
                if !event::poll(left).unwrap_or(false) {
                    break;
                }
                if let Ok(Event::Key(k)) = event::read() {
                    if k.kind != KeyEventKind::Press {
                        continue;
                    }
                    match k.code {
                        KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                            return Ok(());
                        }
                        KeyCode::Char('c') => by = SortBy::Cpu,
                        KeyCode::Char('m') => by = SortBy::Memory,
                        _ => continue,
                    }
                    break;
                }
            }
        }
    }
    .await;
    ratatui::restore();
    result.map_err(|e: WireError| CliError::from(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, cpu: Option<f64>, memory: u64) -> TopRow {
        TopRow {
            id: id.into(),
            state: "running".into(),
            started_at_ms: 0,
            memory,
            cpu_percent: cpu,
            disk_used: 0,
            disk_quota: 0,
        }
    }

    #[test]
    fn cpu_rates_come_from_changes_of_the_cumulative_time() {
        let mut r = CpuRates::default();
        let t0 = Instant::now();
        assert_eq!(r.update("a", 1_000_000_000, t0), None);
        // the daemon's value has not moved: no rate yet
        assert_eq!(
            r.update("a", 1_000_000_000, t0 + Duration::from_secs(1)),
            None
        );
        // 2.5 s of CPU over 5 s: 50 %
        let v = r
            .update("a", 3_500_000_000, t0 + Duration::from_secs(5))
            .unwrap();
        assert!((v - 50.0).abs() < 1e-9, "{v}");
        // unchanged since: the last rate holds
        assert_eq!(
            r.update("a", 3_500_000_000, t0 + Duration::from_secs(6)),
            Some(v)
        );
    }

    #[test]
    fn sorts_highest_first_and_unknown_cpu_last() {
        let mut rows = vec![
            row("b", Some(5.0), 10),
            row("a", None, 30),
            row("c", Some(50.0), 20),
        ];
        sort(&mut rows, SortBy::Cpu);
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["c", "b", "a"]);
        sort(&mut rows, SortBy::Memory);
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a", "c", "b"]);
    }

    #[test]
    fn uptimes_read_like_top() {
        assert_eq!(uptime(7_000), "7s");
        assert_eq!(uptime(306_000), "5m06s");
        assert_eq!(uptime(3 * 3_600_000 + 240_000), "3h04m");
        assert_eq!(uptime(93_600_000), "1d02h");
    }

    #[test]
    fn draws_every_project_in_a_test_terminal() {
        let backend = ratatui::backend::TestBackend::new(120, 10);
        let mut t = ratatui::Terminal::new(backend).unwrap();
        let id = "6f1c2d3e-0000-4000-8000-000000000001";
        let mut r = row(id, Some(12.5), 3 << 20);
        r.started_at_ms = 1_000;
        r.disk_used = 1 << 20;
        r.disk_quota = 1 << 30;
        t.draw(|f| draw(f, &[r], SortBy::Cpu, 61_000, None))
            .unwrap();
        let screen: String = t
            .backend()
            .buffer()
            .content()
            .iter()
            .map(|c| c.symbol())
            .collect();
        for want in [
            id,
            "running",
            "1m00s",
            "12.5",
            "3.0M",
            "1.0M/1.0G",
            "1 project(s) up",
        ] {
            assert!(screen.contains(want), "{want} not on screen:\n{screen}");
        }
    }
}
