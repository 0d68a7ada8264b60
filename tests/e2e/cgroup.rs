//! The limits that only cgroup v2 enforces: `IOWeight` (no io controller under systemd on the v1
//! build hosts) and `MemorySwapMax` (v1 has no per-cgroup swap limit systemd can set). On v2 (the
//! VM testbed, and the distributions real runner nodes use) the values must reach the project's
//! cgroup files and hold; on v1 the unit properties are still checked. In the VM flavour a v1
//! machine fails the test ([`tb::cgroup_v2`]), so the v2 checks cannot be passed by skipping.
use crate::tb::{self, DropIn, http, new_id, ok, start, status, stop};

fn unit(id: &str) -> String {
    format!("cocalc-project-{id}.service")
}

fn prop(id: &str, p: &str) -> String {
    ok(&format!("systemctl show -p {p} --value {}", unit(id)))
}

/// A file of the unit's own cgroup (v2 path).
fn unit_cg(id: &str, file: &str) -> String {
    ok(&format!(
        "cat /sys/fs/cgroup$(systemctl show -p ControlGroup --value {})/{file}",
        unit(id)
    ))
}

/// A file of the container's cgroup (v2 path; podman's `libpod-payload-*` below the unit).
fn payload_cg(id: &str, file: &str) -> String {
    ok(&format!(
        "pid=$(podman inspect -f '{{{{.State.Pid}}}}' project-{id}) && \
         cat /sys/fs/cgroup$(sed -n 's/^0:://p' /proc/$pid/cgroup)/{file}"
    ))
}

/// Exit status of a process inside the project that holds `mb` MiB (137: OOM-killed).
fn alloc(id: &str, mb: u32) -> i32 {
    ok(&format!(
        "podman exec project-{id} sh -c 'head -c {mb}m /dev/zero | tail >/dev/null; echo $?'"
    ))
    .parse()
    .unwrap()
}

#[test]
fn io_weight_and_swap_reach_the_cgroup_and_move_live() {
    let v2 = tb::cgroup_v2();
    // swap is a host decision (limits.max.swap, off by default): this host allows it
    let _swap = DropIn::install(
        "/etc/cocalc-project-host/config.d/70-e2e-swap.toml",
        "[limits.max]\nswap = true\n",
    );
    let id = new_id();
    start(
        &id,
        Some(r#"{"memory":67108864,"swap":false,"io_weight":500}"#),
    );
    let pid = status(&id)["main_pid"].clone();
    assert_eq!(prop(&id, "IOWeight"), "500");
    assert_eq!(prop(&id, "MemorySwapMax"), "0");
    if v2 {
        assert_eq!(unit_cg(&id, "io.weight"), "default 500");
        assert_eq!(unit_cg(&id, "memory.swap.max"), "0");
        assert_eq!(payload_cg(&id, "memory.swap.max"), "0");
        // the VM has a swap disk, so "no swap" is a real constraint: 100 MiB in 64 MiB dies
        assert_ne!(
            ok("tail -n +2 /proc/swaps | wc -l"),
            "0",
            "no swap in the VM"
        );
        assert_eq!(alloc(&id, 100), 137, "100M in a 64M project without swap");
    }

    // both move live, without a restart
    let (s, v) = http(
        "PATCH",
        &format!("/projects/{id}/config"),
        Some(r#"{"swap":true,"io_weight":50}"#),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["live"], true, "{v}");
    assert_eq!(prop(&id, "IOWeight"), "50");
    assert_eq!(prop(&id, "MemorySwapMax"), "infinity");
    if v2 {
        assert_eq!(unit_cg(&id, "io.weight"), "default 50");
        assert_eq!(unit_cg(&id, "memory.swap.max"), "max");
        // podman writes "max" at `run`, and the kernel's unlimited byte count at a live `update`
        // (SWAP_UNLIMITED − memory): both are no limit
        let ctr = payload_cg(&id, "memory.swap.max");
        assert!(
            ctr == "max" || ctr.parse::<u64>().is_ok_and(|b| b >= 1 << 60),
            "the container's own swap limit stayed: memory.swap.max={ctr}"
        );
        // 100 MiB cannot fit in 64 MiB of RAM: it lives only because part of it is swapped out
        assert_eq!(alloc(&id, 100), 0, "with swap, 100M fits in 64M of RAM");
    }
    assert_eq!(status(&id)["main_pid"], pid, "no restart");

    let (s, v) = http(
        "PATCH",
        &format!("/projects/{id}/config"),
        Some(r#"{"swap":false}"#),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(prop(&id, "MemorySwapMax"), "0");
    if v2 {
        assert_eq!(unit_cg(&id, "memory.swap.max"), "0");
        assert_eq!(payload_cg(&id, "memory.swap.max"), "0");
        assert_eq!(alloc(&id, 100), 137, "swap is off again");
    }
    stop(&id, false);
}
