//! What the host reads from and asks of journald for project units (pure, unit tested): the
//! per-unit rate limit, and the start-failure reason taken from podman's own output only.
//!
//! A project unit's journal mixes podman's stderr (`_COMM=podman`, a field journald sets from
//! the sending process, which the tenant cannot forge) with the container's output (sent by
//! conmon, `_COMM=conmon`, with `CONTAINER_NAME`). A tenant printing `Error: …` must not write the
//! message the API returns, so only podman's lines are read, and the line is cut.
use serde_json::Value;

/// Longest start-failure reason returned (characters).
pub const MAX_REASON: usize = 300;

/// The unit properties of journald's per-unit rate limit (`LogRateLimitIntervalSec=`,
/// `LogRateLimitBurst=`): a flooding project loses its own lines, not other units'.
pub fn rate_limit_properties(
    interval: std::time::Duration,
    burst: u32,
) -> Vec<(&'static str, zbus::Variant<'static>)> {
    // microseconds, not whole seconds: "500ms" must not become 0 (no limit at all)
    let usec = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX);
    vec![
        ("LogRateLimitIntervalUSec", zbus::Variant::from(usec)),
        ("LogRateLimitBurst", zbus::Variant::from(burst)),
    ]
}

/// The `journalctl` arguments that read a unit's entries since `since_secs` as JSON lines.
pub fn journalctl_args(unit: &str, since_secs: u64) -> Vec<String> {
    [
        "-u",
        unit,
        "--since",
        &format!("@{since_secs}"),
        "-n",
        "200",
        "-o",
        "json",
        "--output-fields=MESSAGE,_COMM,CONTAINER_NAME",
        "--no-pager",
        "-q",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// podman's own `Error: …` line of the last start attempt in `json_lines` (journalctl `-o
/// json`), cut to [`MAX_REASON`] characters with control characters replaced; `None` if podman
/// said none. Lines of the container (conmon) are never read.
pub fn podman_error(json_lines: &str) -> Option<String> {
    let entries: Vec<(String, String, bool)> = json_lines
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            let msg = v.get("MESSAGE")?.as_str()?.to_string();
            let comm = v
                .get("_COMM")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            Some((comm, msg, v.get("CONTAINER_NAME").is_some()))
        })
        .collect();
    // only this attempt: from systemd's last "Starting …" on
    let from = entries
        .iter()
        .rposition(|(c, m, _)| c == "systemd" && m.starts_with("Starting "))
        .unwrap_or(0);
    entries[from..]
        .iter()
        .filter(|(comm, _, container)| comm == "podman" && !container)
        .find_map(|(_, m, _)| m.trim().strip_prefix("Error: ").map(cut))
}

fn cut(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(MAX_REASON)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.chars().count() > MAX_REASON {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(comm: &str, msg: &str, container: bool) -> String {
        let mut v = serde_json::json!({"MESSAGE": msg, "_COMM": comm});
        if container {
            v["CONTAINER_NAME"] = "project-x".into();
        }
        v.to_string()
    }

    #[test]
    fn only_podmans_own_error_line_is_taken() {
        let j = [
            line(
                "systemd",
                "Starting cocalc-project-x.service - old attempt",
                false,
            ),
            line("podman", "Error: from an older attempt", false),
            line(
                "systemd",
                "Starting cocalc-project-x.service - CoCalc project",
                false,
            ),
            line("conmon", "Error: forged by the tenant", true),
            line("podman", "Error: forged through a pipe", true),
            line("podman", "2026 container create", false),
            line(
                "podman",
                "Error: crun: cannot open `/nonexistent`: No such file",
                false,
            ),
        ]
        .join("\n");
        assert_eq!(
            podman_error(&j).as_deref(),
            Some("crun: cannot open `/nonexistent`: No such file")
        );
        let tenant_only = [
            line("systemd", "Starting x", false),
            line("conmon", "Error: forged", true),
        ]
        .join("\n");
        assert_eq!(podman_error(&tenant_only), None);
        assert_eq!(podman_error("not json\n{}"), None);
    }

    #[test]
    fn the_reason_is_cut_and_has_no_control_characters() {
        let long = format!("Error: {}\x1b[31m\nx", "a".repeat(5000));
        let r = podman_error(&line("podman", &long, false)).unwrap();
        assert_eq!(r.chars().count(), MAX_REASON + 1);
        assert!(r.ends_with('…'));
        let r = podman_error(&line("podman", "Error: a\x1b[31mb\rc", false)).unwrap();
        assert_eq!(r, "a [31mb c");
    }

    #[test]
    fn rate_limit_is_in_microseconds() {
        let p = rate_limit_properties(std::time::Duration::from_secs(30), 10_000);
        assert_eq!(p[0].0, "LogRateLimitIntervalUSec");
        assert_eq!(p[0].1, zbus::Variant::from(30_000_000u64));
        assert_eq!(p[1].1, zbus::Variant::from(10_000u32));
        let p = rate_limit_properties(std::time::Duration::from_millis(500), 1);
        assert_eq!(p[0].1, zbus::Variant::from(500_000u64));
    }
}
