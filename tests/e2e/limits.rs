//! Resource limits for real: unit properties that bind the container (OOM, fork loop, CPU quota),
//! live changes without a restart, the host config and its drop-ins, the host-wide slice, and
//! container defaults that hold against escape attempts.
use serde_json::Value;

use crate::tb::{STORAGE, http, new_id, ok, sh, start, status, stop, wait_for};

fn unit(id: &str) -> String {
    format!("cocalc-project-{id}.service")
}

fn prop(unit: &str, p: &str) -> String {
    ok(&format!("systemctl show -p {p} --value {unit}"))
}

fn main_pid(id: &str) -> u64 {
    status(id)["main_pid"].as_u64().unwrap()
}

/// Allocates `mb` MiB inside the project (as its user); the exit status of the allocating process
/// (137 = killed by SIGKILL, the OOM killer).
fn alloc(id: &str, mb: u32) -> i32 {
    ok(&format!(
        "podman exec project-{id} sh -c 'head -c {mb}m /dev/zero | tail >/dev/null; echo $?'"
    ))
    .parse()
    .unwrap()
}

/// Runs `cmd` with sh inside the project as `user` (`root`: as container root).
fn inside(id: &str, user: &str, cmd: &str) -> crate::tb::Out {
    let q = cmd.replace('\'', r"'\''");
    sh(&format!("podman exec -u {user} project-{id} sh -c '{q}'"))
}

#[track_caller]
fn patch(id: &str, body: &str) -> (u16, Value) {
    http("PATCH", &format!("/projects/{id}/config"), Some(body))
}

/// CPU time used by the unit's cgroup so far, in ns (cgroup v1 cpuacct or v2 cpu.stat).
fn cpu_ns(id: &str) -> u64 {
    ok(&format!(
        "cg=$(systemctl show -p ControlGroup --value {u}); \
         if [ -f /sys/fs/cgroup/cpuacct$cg/cpuacct.usage ]; then cat /sys/fs/cgroup/cpuacct$cg/cpuacct.usage; \
         else awk '/^usage_usec/ {{print $2 * 1000}}' /sys/fs/cgroup$cg/cpu.stat; fi",
        u = unit(id)
    ))
    .parse()
    .unwrap()
}

#[test]
fn memory_limit_oom_kills_only_the_offender() {
    let (a, b) = (new_id(), new_id());
    start(&a, Some(r#"{"memory":67108864}"#));
    start(&b, None);
    assert_eq!(prop(&unit(&a), "MemoryMax"), "67108864");
    assert_eq!(prop(&unit(&a), "MemorySwapMax"), "0");
    assert_eq!(prop(&unit(&a), "OOMPolicy"), "continue");
    // the container itself is inside the unit's cgroup, so the unit's limit is the container's
    let ctr = ok(&format!(
        "podman inspect -f '{{{{.State.Pid}}}}' project-{a}"
    ));
    let cg = ok(&format!("cat /proc/{ctr}/cgroup"));
    assert!(
        cg.lines().any(|l| l.contains(&format!(
            "/cocalc-projects.slice/{}/libpod-payload-",
            unit(&a)
        ))),
        "container not in the unit's cgroup: {cg}"
    );
    let pid_a = main_pid(&a);
    let pid_b = main_pid(&b);

    assert_eq!(alloc(&a, 200), 137, "200M in a 64M project is OOM-killed");
    // only the offender died: the project runs on, same main process, still answering
    assert_eq!(ok(&format!("systemctl is-active {}", unit(&a))), "active");
    assert_eq!(main_pid(&a), pid_a);
    assert_eq!(ok(&format!("podman exec project-{a} echo alive")), "alive");
    assert_eq!(alloc(&a, 16), 0, "small allocations still work");
    // the project beside it is unaffected and has its own (default) limit
    assert_eq!(alloc(&b, 200), 0);
    assert_eq!(ok(&format!("systemctl is-active {}", unit(&b))), "active");
    assert_eq!(main_pid(&b), pid_b);
    assert_eq!(prop(&unit(&b), "MemoryMax"), (1u64 << 30).to_string());
    stop(&a, false);
    stop(&b, false);
}

#[test]
fn pids_limit_stops_a_fork_loop() {
    let (a, b) = (new_id(), new_id());
    start(&a, Some(r#"{"pids":50}"#));
    start(&b, None);
    assert_eq!(prop(&unit(&a), "TasksMax"), "50");
    let o = inside(
        &a,
        "user",
        "i=0; while [ $i -lt 500 ]; do sleep 8 & i=$((i+1)); done; echo made $i",
    );
    assert!(
        o.stderr.contains("can't fork") || o.stderr.contains("Resource temporarily unavailable"),
        "the fork loop was not stopped: {o:?}"
    );
    assert!(!o.stdout.contains("made 500"), "{o:?}");
    let tasks: u64 = prop(&unit(&a), "TasksCurrent").parse().unwrap();
    println!("fork loop stopped at {tasks} tasks (TasksMax=50)");
    assert!((40..=50).contains(&tasks), "{tasks}");
    // the host and the other project are fine meanwhile
    assert_eq!(ok(&format!("podman exec project-{b} echo fine")), "fine");
    assert_eq!(
        ok("sh -c 'for i in 1 2 3 4 5; do true & done; wait; echo forks'"),
        "forks"
    );
    assert_eq!(http("GET", "/healthz", None).0, 200);
    // once the sleepers are gone, the project itself works again
    wait_for("the fork loop's sleepers to end", 30, || {
        (sh(&format!("podman exec project-{a} echo back"))
            .stdout
            .trim()
            == "back")
            .then_some(())
    });
    assert_eq!(ok(&format!("systemctl is-active {}", unit(&a))), "active");
    stop(&a, false);
    stop(&b, false);
}

#[test]
fn cpu_quota_caps_a_busy_loop() {
    let id = new_id();
    start(&id, Some(r#"{"cpu":0.5}"#));
    assert_eq!(prop(&unit(&id), "CPUQuotaPerSecUSec"), "500ms");
    // two busy loops: unlimited they could take both cores
    for _ in 0..2 {
        ok(&format!(
            "podman exec -d project-{id} sh -c 'timeout 6 sh -c \"while :; do :; done\"'"
        ));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (t0, c0) = (std::time::Instant::now(), cpu_ns(&id));
    std::thread::sleep(std::time::Duration::from_secs(3));
    let cores = (cpu_ns(&id) - c0) as f64 / t0.elapsed().as_nanos() as f64;
    println!("two busy loops under cpu=0.5 used {cores:.2} cores");
    assert!(cores < 0.8, "the quota does not hold: {cores:.2} cores");
    stop(&id, true);
}

#[test]
fn live_update_changes_limits_without_a_restart() {
    let id = new_id();
    start(&id, Some(r#"{"memory":67108864,"pids":100,"cpu":1}"#));
    let pid = main_pid(&id);
    assert_eq!(alloc(&id, 100), 137);

    let (s, v) = patch(&id, r#"{"memory":268435456}"#);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["live"], true, "{v}");
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["limits"]["memory"], 268_435_456u64, "{v}");
    assert_eq!(v["limits"]["pids"], 100, "{v}");
    assert_eq!(prop(&unit(&id), "MemoryMax"), "268435456");
    assert_eq!(
        alloc(&id, 100),
        0,
        "the allocation that failed now succeeds"
    );
    assert_eq!(main_pid(&id), pid, "no restart");

    // cpu and pids move live too, and lowering works
    let (s, v) = patch(&id, r#"{"cpu":0.25,"pids":64,"cpu_weight":50}"#);
    assert_eq!(s, 200, "{v}");
    assert_eq!(prop(&unit(&id), "CPUQuotaPerSecUSec"), "250ms");
    assert_eq!(prop(&unit(&id), "TasksMax"), "64");
    assert_eq!(prop(&unit(&id), "CPUWeight"), "50");
    assert_eq!(main_pid(&id), pid);

    // bad values: 400 with the field named, nothing changed
    for (body, code, field) in [
        (r#"{"memory":-1}"#, "invalid_body", "memory"),
        (r#"{"memory":1099511627776}"#, "invalid_config", "memory"),
        (r#"{"cpu":0}"#, "invalid_config", "cpu"),
        (r#"{"cpu":1e6}"#, "invalid_config", "cpu"),
        (r#"{"pids":0}"#, "invalid_config", "pids"),
        (r#"{"io_weight":99999}"#, "invalid_config", "io_weight"),
        (r#"{"swap":"yes"}"#, "invalid_body", "swap"),
        (r#"{"image":"x"}"#, "invalid_body", "image"),
    ] {
        let (s, v) = patch(&id, body);
        assert_eq!((s, v["code"].as_str()), (400, Some(code)), "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(field), "{body}: {v}");
    }
    assert_eq!(prop(&unit(&id), "MemoryMax"), "268435456");

    // stored for the next start
    let (s, v) = http("GET", &format!("/projects/{id}/config"), None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["config"]["memory"], 268_435_456u64, "{v}");
    assert_eq!(v["limits"]["cpu"], 0.25, "{v}");
    stop(&id, false);
    // a stopped project: stored, applied at its next start
    let (s, v) = patch(&id, r#"{"pids":77}"#);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["live"], false, "{v}");
    assert_eq!(v["state"], "opened", "{v}");
    start(&id, None);
    assert_eq!(prop(&unit(&id), "MemoryMax"), "268435456");
    assert_eq!(prop(&unit(&id), "CPUQuotaPerSecUSec"), "250ms");
    assert_eq!(prop(&unit(&id), "TasksMax"), "77");
    stop(&id, false);

    // a start config above the host's maxima is refused, naming the field
    let (s, v) = http(
        "POST",
        &format!("/projects/{}/start", new_id()),
        Some(r#"{"config":{"memory":1099511627776}}"#),
    );
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("invalid_config")),
        "{v}"
    );
    assert!(
        v["error"].as_str().unwrap().contains("config.memory"),
        "{v}"
    );
    let (s, v) = http(
        "POST",
        &format!("/projects/{}/start", new_id()),
        Some(r#"{"config":{"pids":-5}}"#),
    );
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("config.pids"), "{v}");
}

#[test]
fn host_wide_limits_are_on_the_projects_slice() {
    // package defaults: 90% of memory, 80% of the kernel's tasks, CPU weight 50 (system.slice: 100)
    http("GET", "/healthz", None);
    assert_eq!(prop("cocalc-projects.slice", "CPUWeight"), "50");
    assert_eq!(prop("cocalc.slice", "CPUWeight"), "50");
    for p in ["MemoryMax", "TasksMax"] {
        let v = prop("cocalc-projects.slice", p);
        assert!(v.parse::<u64>().is_ok(), "{p}={v}: not a finite limit");
    }
}

/// Removes the e2e config files and brings the daemon back, even when a test fails midway.
struct ConfigFiles(Vec<&'static str>);

impl Drop for ConfigFiles {
    fn drop(&mut self) {
        sh(&format!("rm -f {}", self.0.join(" ")));
        sh(
            "systemctl reset-failed cocalc-project-host.service cocalc-project-host.socket; \
            systemctl restart cocalc-project-host.socket; systemctl restart cocalc-project-host.service",
        );
    }
}

#[test]
fn config_drop_ins_override_and_typos_are_refused() {
    const LIB: &str = "/usr/lib/cocalc-project-host/config.d/50-e2e.toml";
    const ETC: &str = "/etc/cocalc-project-host/config.d/50-e2e.toml";
    const TYPO: &str = "/etc/cocalc-project-host/config.d/60-e2e-typo.toml";
    let _cleanup = ConfigFiles(vec![LIB, ETC, TYPO]);
    ok(&format!(
        "mkdir -p $(dirname {LIB}) $(dirname {ETC}) && \
         printf '[limits]\\npids = 300\\nmemory = \"256M\"\\n[slice]\\nmemory_max = \"8G\"\\n' > {LIB} && \
         printf '[limits]\\npids = 400\\n' > {ETC}"
    ));
    let merged = ok("cocalc-project-host check-config");
    assert!(merged.contains(&format!("# read {LIB}")), "{merged}");
    assert!(merged.contains(&format!("# read {ETC}")), "{merged}");
    assert!(merged.contains("pids: 400"), "{merged}");
    ok("systemctl restart cocalc-project-host.service");
    assert_eq!(prop("cocalc-projects.slice", "MemoryMax"), "8589934592");
    let id = new_id();
    start(&id, None);
    assert_eq!(
        prop(&unit(&id), "TasksMax"),
        "400",
        "/etc wins over /usr/lib"
    );
    assert_eq!(
        prop(&unit(&id), "MemoryMax"),
        "268435456",
        "/usr/lib applies"
    );
    stop(&id, false);

    // a typo'd key: check-config and the daemon both refuse, naming file and key
    ok(&format!("printf '[limits]\\nmemroy = \"1G\"\\n' > {TYPO}"));
    let o = sh("cocalc-project-host check-config");
    assert_ne!(o.code, 0, "{o:?}");
    assert!(
        o.stderr.contains(TYPO) && o.stderr.contains("memroy"),
        "check-config: {o:?}"
    );
    let since = ok("date +%s");
    let o = sh("systemctl restart cocalc-project-host.service");
    assert_ne!(
        o.code, 0,
        "the daemon started with a typo in its config: {o:?}"
    );
    let journal = ok(&format!(
        "journalctl -u cocalc-project-host.service --since @{since} -o cat --no-pager"
    ));
    let line = journal
        .lines()
        .find(|l| l.contains("invalid configuration") && l.contains(TYPO) && l.contains("memroy"))
        .unwrap_or_else(|| panic!("no config error naming file and key in the journal: {journal}"));
    println!("daemon refused to start: {line}");
}

#[test]
fn container_defaults_hold_against_escape_attempts() {
    let (a, b) = (new_id(), new_id());
    start(&a, None);
    start(&b, None);
    ok(&format!(
        "podman exec project-{b} sh -c 'echo secret-of-b > /home/user/secret'"
    ));
    let inspect = ok(&format!(
        "podman inspect -f '{{{{.HostConfig.Privileged}}}} {{{{.HostConfig.SecurityOpt}}}}' project-{a}"
    ));
    // never privileged; no new privileges; the projects' seccomp profile (btrfs ioctls denied)
    assert!(
        inspect.starts_with("false [no-new-privileges seccomp=")
            && inspect.ends_with("/seccomp-projects.json]"),
        "{inspect}"
    );

    // the user and container root alike: no capabilities at all, no new privileges
    for (user, uid) in [("user", "1000"), ("root", "0")] {
        let st = inside(&a, user, "cat /proc/self/status").stdout;
        let field = |k: &str| {
            st.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}:")))
                .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
                .unwrap_or_else(|| panic!("no {k} in {st}"))
        };
        println!(
            "as {user}: {}",
            st.lines()
                .filter(|l| l.starts_with("Cap") || l.starts_with("NoNewPrivs"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        assert_eq!(field("Uid"), uid);
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(field(cap), "0000000000000000", "{user} {cap}");
        }
        assert_eq!(field("NoNewPrivs"), "1", "{user}");
    }

    // even as container root, every one of these fails
    for (what, cmd) in [
        ("mount", "mount -t tmpfs none /tmp"),
        ("bind mount", "mount -o bind /home/user /tmp"),
        ("load a module", "insmod /bin/busybox"),
        ("chroot", "chroot / true"),
        (
            "host sysctl",
            "cat /proc/sys/vm/overcommit_memory > /proc/sys/vm/overcommit_memory",
        ),
        (
            "host sysfs",
            "echo never > /sys/kernel/mm/transparent_hugepage/enabled",
        ),
        (
            "own cgroup limits",
            "for f in /sys/fs/cgroup/pids.max /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes; do [ -e $f ] || continue; echo max > $f || exit 1; done; exit 0",
        ),
        ("raise nofile", "ulimit -n $(( $(ulimit -Hn) + 1 ))"),
        ("raise nproc", "ulimit -u $(( $(ulimit -Hu) + 1 ))"),
        ("renice below 0", "renice -n -5 $$"),
        (
            "another project's home",
            &format!(
                "cat {STORAGE}/project-{b}/secret /proc/*/root/home/user/secret 2>/dev/null | grep -q secret-of-b"
            ),
        ),
        ("the host's storage", &format!("ls {STORAGE}")),
    ] {
        let o = inside(&a, "root", cmd);
        assert_ne!(o.code, 0, "{what} succeeded as container root: {o:?}");
        println!(
            "{what}: refused ({})",
            o.stderr.trim().lines().last().unwrap_or("")
        );
    }

    // seen from the host, container root is an unprivileged uid of the reserved range
    ok(&format!("podman exec -d -u root project-{a} sleep 30"));
    let top = ok(&format!("podman top project-{a} user huser args"));
    let row = top
        .lines()
        .find(|l| l.contains("sleep 30"))
        .unwrap_or_else(|| panic!("{top}"));
    let f: Vec<&str> = row.split_whitespace().collect();
    // the base of the project's own range: its home's owner is base + 1000
    let base = ok(&format!("stat -c %u {STORAGE}/project-{a}"))
        .parse::<u32>()
        .unwrap()
        - 1000;
    assert!(base >= 1 << 30, "{base}");
    assert_eq!(&f[..2], ["root", &base.to_string()], "{top}");
    let host_pid = ok(&format!(
        "for p in $(cat /sys/fs/cgroup/systemd$(systemctl show -p ControlGroup --value {u})/*/cgroup.procs 2>/dev/null || cat /sys/fs/cgroup$(systemctl show -p ControlGroup --value {u})/*/cgroup.procs); do \
           [ \"$(cat /proc/$p/cmdline | tr '\\0' ' ')\" = 'sleep 30 ' ] && echo $p; done; true",
        u = unit(&a)
    ));
    let st = ok(&format!("grep -E '^(Uid|CapEff)' /proc/{host_pid}/status"));
    assert!(st.contains(&format!("Uid:\t{base}\t{base}")), "{st}");
    assert!(st.contains("CapEff:\t0000000000000000"), "{st}");
    // and the other project's files are intact
    assert_eq!(
        ok(&format!("cat {STORAGE}/project-{b}/secret")),
        "secret-of-b"
    );
    stop(&a, true);
    stop(&b, false);
}
