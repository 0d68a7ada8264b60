//! Egress policy of `network: slirp4netns` projects: the project reaches the outside world, but
//! not the host itself — its loopback (slirp's `10.0.2.2`, and podman's `allow_host_loopback` is
//! off too), its own addresses (slirp connects from the host, so a service of the host listening
//! on 0.0.0.0 would answer), link-local `169.254.0.0/16` (cloud metadata) and `fe80::/10`.
//!
//! The rules live in the project's network namespace, put there by an OCI `prestart` hook (this
//! binary's hidden `egress-hook` subcommand, run by podman as root in the host's namespaces
//! after the namespace exists and before the project's first process starts: no window). The
//! namespace belongs to the host's user namespace, so nobody inside — container root included,
//! without capabilities and without nested user namespaces — can change them. The host's
//! addresses are read at each start; one added later is not covered until the next start.
//! To widen the policy, an admin adds rules after these (see docs/security.md).
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cmd;

/// The annotation that selects the hook (set on slirp4netns projects only).
pub const ANNOTATION: &str = "com.cocalc.egress";
/// The installed binary the hook runs.
pub const BINARY: &str = "/usr/bin/cocalc-project-host";
/// slirp4netns's address of the host (its loopback when `allow_host_loopback` is on).
pub const SLIRP_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

/// The hook's configuration (podman hooks schema 1.0.0).
pub fn hook_config() -> String {
    serde_json::json!({
        "version": "1.0.0",
        "hook": {"path": BINARY, "args": [BINARY, "egress-hook"], "timeout": 20},
        "when": {"annotations": {format!("^{}$", ANNOTATION.replace('.', "\\.")): "^slirp4netns$"}},
        "stages": ["prestart"],
    })
    .to_string()
}

/// Writes the hooks directory (`<state_dir>/hooks.d`) when missing or out of date; returns it.
pub fn ensure_hooks_dir(state_dir: &Path) -> Result<PathBuf, String> {
    let dir = state_dir.join("hooks.d");
    let file = dir.join("cocalc-egress.json");
    let text = hook_config();
    if std::fs::read_to_string(&file).ok().as_deref() != Some(text.as_str()) {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let tmp = file.with_extension(format!("{}.tmp", uuid::Uuid::new_v4().simple()));
        std::fs::write(&tmp, &text)
            .and_then(|()| std::fs::rename(&tmp, &file))
            .map_err(|e| format!("{}: {e}", file.display()))?;
    }
    Ok(dir)
}

fn reject(out: &mut String, dest: &str, tcp_reset: &str, other: &str) {
    // TCP gets a reset (connect fails at once with ECONNREFUSED), the rest an ICMP error
    let _ = writeln!(
        out,
        "-A OUTPUT -d {dest} -p tcp -j REJECT --reject-with {tcp_reset}"
    );
    let _ = writeln!(out, "-A OUTPUT -d {dest} -j REJECT --reject-with {other}");
}

/// `iptables-restore` input for the project's namespace.
pub fn rules_v4(host: &[Ipv4Addr]) -> String {
    let mut r = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -o lo -j ACCEPT\n",
    );
    let mut dests = vec![
        "127.0.0.0/8".to_string(),
        "169.254.0.0/16".to_string(),
        format!("{SLIRP_HOST}/32"),
    ];
    dests.extend(host.iter().map(|a| format!("{a}/32")));
    dests.dedup();
    for d in &dests {
        reject(&mut r, d, "tcp-reset", "icmp-port-unreachable");
    }
    r.push_str("COMMIT\n");
    r
}

/// `ip6tables-restore` input for the project's namespace.
pub fn rules_v6(host: &[Ipv6Addr]) -> String {
    let mut r = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -o lo -j ACCEPT\n",
    );
    // fd00::2: slirp's IPv6 address of the host (podman enables IPv6 in slirp4netns)
    let mut dests = vec![
        "::1/128".to_string(),
        "fe80::/10".to_string(),
        "fd00::2/128".to_string(),
    ];
    dests.extend(host.iter().map(|a| format!("{a}/128")));
    dests.dedup();
    for d in &dests {
        reject(&mut r, d, "tcp-reset", "icmp6-port-unreachable");
    }
    r.push_str("COMMIT\n");
    r
}

/// The container's pid from the OCI state podman gives a hook on stdin.
pub fn state_pid(state: &str) -> Result<u32, String> {
    let v: serde_json::Value =
        serde_json::from_str(state).map_err(|e| format!("OCI state: {e}"))?;
    v.get("pid")
        .and_then(serde_json::Value::as_u64)
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p > 1)
        .ok_or_else(|| "OCI state has no container pid".to_string())
}

/// Every address of the host's interfaces (the hook runs in the host's network namespace).
fn host_addresses() -> Result<(Vec<Ipv4Addr>, Vec<Ipv6Addr>), String> {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for a in nix::ifaddrs::getifaddrs().map_err(|e| format!("getifaddrs: {e}"))? {
        let Some(addr) = a.address else { continue };
        if let Some(s) = addr.as_sockaddr_in() {
            v4.push(s.ip());
        } else if let Some(s) = addr.as_sockaddr_in6() {
            v6.push(s.ip());
        }
    }
    v4.sort();
    v4.dedup();
    v6.sort();
    v6.dedup();
    Ok((v4, v6))
}

/// The hook: reads the OCI state from `state`, installs the rules in the container's network
/// namespace. Any failure fails the container's start (fail closed).
pub async fn run_hook(state: &str) -> Result<(), String> {
    let pid = state_pid(state)?;
    let (v4, v6) = host_addresses()?;
    let netns = format!("--net=/proc/{pid}/ns/net");
    for (tool, rules) in [
        ("/usr/sbin/iptables-restore", rules_v4(&v4)),
        ("/usr/sbin/ip6tables-restore", rules_v6(&v6)),
    ] {
        let file = std::env::temp_dir().join(format!(
            "cocalc-egress-{pid}-{}.rules",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&file, &rules).map_err(|e| format!("{}: {e}", file.display()))?;
        let r = cmd::run(
            "/usr/bin/nsenter",
            // (no -w: it takes the next argument as its value and reads stdin instead)
            [netns.as_str(), tool, &file.to_string_lossy()],
            Duration::from_secs(15),
        )
        .await;
        let _ = std::fs::remove_file(&file);
        r.map_err(|e| e.to_string())?;
    }
    tracing::info!(pid, host_v4 = ?v4, host_v6 = v6.len(), "egress rules installed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_reject_the_host_and_keep_loopback() {
        let r = rules_v4(&["192.0.2.1".parse().unwrap(), "127.0.0.1".parse().unwrap()]);
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(lines[0], "*filter");
        assert_eq!(lines[4], "-A OUTPUT -o lo -j ACCEPT", "loopback first");
        for d in [
            "127.0.0.0/8",
            "169.254.0.0/16",
            "10.0.2.2/32",
            "192.0.2.1/32",
        ] {
            assert!(
                r.contains(&format!(
                    "-A OUTPUT -d {d} -p tcp -j REJECT --reject-with tcp-reset\n"
                )),
                "{d}: {r}"
            );
            assert!(r.contains(&format!(
                "-A OUTPUT -d {d} -j REJECT --reject-with icmp-port-unreachable\n"
            )));
        }
        assert!(
            !r.contains("ACCEPT\n-A OUTPUT -j"),
            "nothing else is refused"
        );
        assert!(r.ends_with("COMMIT\n"));
        let r6 = rules_v6(&["2001:db8::1".parse().unwrap()]);
        for d in ["::1/128", "fe80::/10", "2001:db8::1/128"] {
            assert!(r6.contains(&format!(
                "-d {d} -j REJECT --reject-with icmp6-port-unreachable"
            )));
        }
    }

    #[test]
    fn the_hook_reads_the_pid_and_is_selected_by_annotation() {
        assert_eq!(
            state_pid(r#"{"ociVersion":"1.0","id":"x","pid":4520,"status":"created"}"#),
            Ok(4520)
        );
        assert!(state_pid(r#"{"pid":0}"#).is_err());
        assert!(state_pid(r#"{"pid":1}"#).is_err());
        assert!(state_pid("not json").is_err());
        let c: serde_json::Value = serde_json::from_str(&hook_config()).unwrap();
        assert_eq!(c["stages"], serde_json::json!(["prestart"]));
        assert_eq!(
            c["hook"]["args"],
            serde_json::json!([BINARY, "egress-hook"])
        );
        assert_eq!(
            c["when"]["annotations"]["^com\\.cocalc\\.egress$"],
            "^slirp4netns$"
        );
    }
}
