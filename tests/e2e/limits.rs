//! Resource limits for real: unit properties that bind the container (OOM, fork loop, CPU quota),
//! live changes without a restart, the host config and its drop-ins, the host-wide slice, and
//! container defaults that hold against escape attempts.
use serde_json::Value;

use crate::tb::{self, STORAGE, http, new_id, ok, sh, start, status, stop, wait_for};

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

/// How many CFS periods the unit's cgroup was throttled in so far (cgroup v1 cpu or v2 cpu.stat).
fn throttled(id: &str) -> u64 {
    ok(&format!(
        "cg=$(systemctl show -p ControlGroup --value {u}); \
         f=/sys/fs/cgroup/cpu,cpuacct$cg/cpu.stat; [ -f $f ] || f=/sys/fs/cgroup/cpu$cg/cpu.stat; \
         [ -f $f ] || f=/sys/fs/cgroup$cg/cpu.stat; awk '/^nr_throttled/ {{print $2}}' $f",
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
    // a small quota: it binds on an idle machine (where two loops could take both cores) and on
    // a loaded one alike (where their fair share is still well above a tenth of a core)
    start(&id, Some(r#"{"cpu":0.1}"#));
    assert_eq!(prop(&unit(&id), "CPUQuotaPerSecUSec"), "100ms");
    for _ in 0..2 {
        ok(&format!(
            "podman exec -d project-{id} sh -c 'timeout 6 sh -c \"while :; do :; done\"'"
        ));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (t0, c0, th0) = (std::time::Instant::now(), cpu_ns(&id), throttled(&id));
    std::thread::sleep(std::time::Duration::from_secs(3));
    let cores = (cpu_ns(&id) - c0) as f64 / t0.elapsed().as_nanos() as f64;
    let periods = throttled(&id) - th0;
    let load = ok("cut -d' ' -f1 /proc/loadavg");
    println!(
        "two busy loops under cpu=0.1 used {cores:.3} cores, throttled in {periods} periods (load {load})"
    );
    // a band around the quota: above it the quota does not hold, well below it the loops did
    // not run
    assert!(
        (0.06..=0.13).contains(&cores),
        "two busy loops under cpu=0.1 used {cores:.3} cores (load {load})"
    );
    // and it is the quota that held them: throttled in most of the ~30 periods of 100 ms
    assert!(periods >= 15, "throttled in only {periods} periods");
    stop(&id, true);
}

#[test]
fn live_update_changes_limits_without_a_restart() {
    // swap is a host decision (limits.max.swap, off by default): this host allows it
    const SWAP: &str = "/etc/cocalc-project-host/config.d/70-e2e-swap.toml";
    let _cleanup = ConfigFiles(vec![SWAP]);
    ok(&format!(
        "mkdir -p $(dirname {SWAP}) && printf '[limits.max]\\nswap = true\\n' > {SWAP} && \
         systemctl restart cocalc-project-host.service"
    ));
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

    // swap on, live: the container's memory+swap limit is lifted (with `--memory-swap=-1` it
    // stayed, swap stayed off and a later raise of memory failed with 500), memory can then rise
    // past the old limit; off again, memory+swap is memory (cgroup v1 memsw, v2 swap.max)
    let swap_limit = || {
        ok(&format!(
            "cg=$(systemctl show -p ControlGroup --value {}); d=/sys/fs/cgroup/memory$cg; \
             if [ -d $d ]; then cat $d/libpod-payload-*/memory.memsw.limit_in_bytes; \
             else cat /sys/fs/cgroup$cg/libpod-payload-*/memory.swap.max; fi",
            unit(&id)
        ))
    };
    let (s, v) = patch(&id, r#"{"swap":true}"#);
    assert_eq!((s, &v["limits"]["swap"]), (200, &true.into()), "{v}");
    let on = swap_limit();
    // v1: memsw is the kernel's unlimited; v2: swap.max is that minus memory (beyond any machine)
    assert!(
        on == "max" || on.parse::<u64>().is_ok_and(|n| n >= 1 << 62),
        "swap on: {on}"
    );
    let (s, v) = patch(&id, r#"{"memory":536870912}"#);
    assert_eq!(s, 200, "raising memory with swap on: {v}");
    let (s, v) = patch(&id, r#"{"swap":false,"memory":268435456}"#);
    assert_eq!(s, 200, "{v}");
    let off = swap_limit();
    assert!(
        ["268435456", "0"].contains(&off.as_str()),
        "swap off: {off}"
    );
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
    // what the config says (check-config prints the merged settings, pretty-printed)
    let cfg = ok("cocalc-project-host check-config");
    let flat: String = cfg.split_whitespace().collect();
    assert!(
        flat.contains(
            "slice:SliceSettings{memory_max:Percent(90,),tasks_max:Percent(80,),cpu_weight:50,}"
        ),
        "check-config does not say 90% / 80% / 50:\n{cfg}"
    );
    // systemd turns the percentages into bytes and tasks of this machine
    let mem_total: u64 = ok("echo $(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 1024 ))")
        .parse()
        .unwrap();
    let kernel_tasks: u64 = ok(
        "p=$(cat /proc/sys/kernel/pid_max); t=$(cat /proc/sys/kernel/threads-max); echo $(( (p - 1) < t ? (p - 1) : t ))",
    )
    .parse()
    .unwrap();
    for (p, total, percent) in [("MemoryMax", mem_total, 90), ("TasksMax", kernel_tasks, 80)] {
        let v = prop("cocalc-projects.slice", p);
        let v: u64 = v
            .parse()
            .unwrap_or_else(|_| panic!("{p}={v}: not a finite limit"));
        let want = total as f64 * f64::from(percent) / 100.0;
        println!("cocalc-projects.slice {p}={v} ({percent}% of {total} = {want:.0})");
        assert!(
            (v as f64 - want).abs() <= want * 0.01,
            "{p}={v} is not {percent}% of {total}"
        );
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
    // drop-ins apply in file-name order across roots; a same-named file in a later root
    // replaces the earlier one; a symlink to /dev/null masks it
    const LIB: &str = "/usr/lib/cocalc-project-host/config.d/40-e2e.toml";
    const ETC: &str = "/etc/cocalc-project-host/config.d/50-e2e.toml";
    const LIB_SHADOWED: &str = "/usr/lib/cocalc-project-host/config.d/45-e2e-shadowed.toml";
    const RUN_OVERRIDE: &str = "/run/cocalc-project-host/config.d/45-e2e-shadowed.toml";
    const LIB_MASKED: &str = "/usr/lib/cocalc-project-host/config.d/46-e2e-masked.toml";
    const ETC_MASK: &str = "/etc/cocalc-project-host/config.d/46-e2e-masked.toml";
    const TYPO: &str = "/etc/cocalc-project-host/config.d/60-e2e-typo.toml";
    let _cleanup = ConfigFiles(vec![
        LIB,
        ETC,
        LIB_SHADOWED,
        RUN_OVERRIDE,
        LIB_MASKED,
        ETC_MASK,
        TYPO,
    ]);
    ok(&format!(
        "mkdir -p $(dirname {LIB}) $(dirname {ETC}) $(dirname {RUN_OVERRIDE}) && \
         printf '[limits]\\npids = 300\\nmemory = \"256M\"\\n[slice]\\nmemory_max = \"8G\"\\n' > {LIB} && \
         printf '[limits]\\npids = 400\\n' > {ETC} && \
         printf '[limits]\\ncpu_weight = 7\\n' > {LIB_SHADOWED} && \
         printf '[limits]\\nio_weight = 33\\n' > {RUN_OVERRIDE} && \
         printf '[limits]\\nmemroy = \"broken vendor file\"\\n' > {LIB_MASKED} && \
         ln -sf /dev/null {ETC_MASK}"
    ));
    let merged = ok("cocalc-project-host check-config");
    assert!(merged.contains(&format!("# read {LIB}")), "{merged}");
    assert!(merged.contains(&format!("# read {ETC}")), "{merged}");
    assert!(
        merged.contains(&format!("# read {RUN_OVERRIDE}")),
        "{merged}"
    );
    assert!(
        !merged.contains(LIB_SHADOWED),
        "replaced by /run's: {merged}"
    );
    assert!(!merged.contains("46-e2e-masked"), "masked: {merged}");
    assert!(merged.contains("pids: 400"), "{merged}");
    assert!(merged.contains("io_weight: 33"), "{merged}");
    assert!(!merged.contains("cpu_weight: 7,"), "{merged}");
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

    // even as container root, every one of these fails, each for the right reason: one direct
    // system call per attempt (tests/e2e/escape_probe.c), its errno compared (a refusal because
    // a path is missing, ENOENT, or a call the kernel lacks, ENOSYS, would prove nothing)
    // (through stdin into /tmp: container root may not even enter the user's home)
    let probe = std::fs::read(tb::static_helper("escape_probe")).unwrap();
    let got = tb::sh_in(
        &format!(
            "podman exec -i -u root project-{a} sh -c 'cat > /tmp/escape_probe && chmod 755 /tmp/escape_probe && /tmp/escape_probe'"
        ),
        &probe,
    );
    assert_eq!(got.code, 0, "{got:?}");
    let got: Vec<(&str, &str)> = got
        .stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .collect();
    println!("escape attempts as container root: {got:?}");
    let want = [
        ("mount_tmpfs", "EPERM"),
        ("mount_bind", "EPERM"),
        ("init_module", "EPERM"),
        ("finit_module", "EPERM"),
        ("chroot", "EPERM"),
        ("unshare_mount_ns", "EPERM"),
        ("mknod_block_device", "EPERM"),
        ("open_by_handle_at", "EPERM"),
        ("host_sysctl", "EACCES"),
        ("host_sysfs", "EACCES"),
        ("own_pids_limit", "EACCES"),
        ("own_memory_limit", "EACCES"),
        ("raise_nofile", "EPERM"),
        ("raise_nproc", "EPERM"),
        ("renice_below_0", "EACCES"),
        ("sethostname", "EPERM"),
        ("reboot", "EPERM"),
    ];
    assert_eq!(got, want, "escape attempts (got, want)");

    // no host storage is mounted in: the only btrfs mounts are the project's own home, its
    // snapshots (read-only) and scratch; nothing names the storage path or the other project
    let mountinfo = inside(&a, "root", "cat /proc/self/mountinfo").stdout;
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let (root, point) = (f[3], f[4]);
        let fstype = line.split(" - ").nth(1).unwrap_or("");
        assert!(
            !line.contains(&b) && !line.contains(STORAGE) && !point.starts_with("/var/lib"),
            "host storage in the container's mounts: {line}\n{mountinfo}"
        );
        if fstype.starts_with("btrfs ") {
            assert!(
                [
                    format!("/project-{a}"),
                    format!("/.snapshots/project-{a}"),
                    format!("/.scratch/project-{a}")
                ]
                .contains(&root.to_string()),
                "a btrfs mount other than the project's own: {line}\n{mountinfo}"
            );
        }
    }
    assert!(
        mountinfo.contains(&format!("/project-{a} /home/user ")),
        "the home is not the project's subvolume: {mountinfo}"
    );
    // the other project's processes (and so their /proc/<pid>/root) are not visible, and its
    // secret is nowhere in the container's file tree
    let ids = ok(&format!(
        "podman exec -u root project-{a} sh -c 'cat /proc/[0-9]*/environ 2>/dev/null | tr \"\\0\" \"\\n\" | grep ^COCALC_PROJECT_ID= | sort -u'"
    ));
    assert_eq!(ids, format!("COCALC_PROJECT_ID={a}"), "{ids}");
    ok(&format!(
        "podman exec project-{a} sh -c 'echo secret-of-a > /home/user/mine'"
    ));
    // (as the project's user: container root may not even enter the user's home)
    let found = inside(
        &a,
        "user",
        "find / \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -type f -exec grep -l secret-of- {} + 2>/dev/null; true",
    );
    // the search works (it finds the project's own file) and finds nothing of the other
    assert_eq!(found.stdout.trim(), "/home/user/mine", "{found:?}");

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
