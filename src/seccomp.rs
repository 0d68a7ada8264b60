//! The seccomp profile of project containers (pure): podman's default profile with the btrfs
//! ioctls that make subvolumes denied. A subvolume gets a qgroup of its own, so one created (or
//! snapshotted) inside a project's home would escape the home's quota; any user may call these
//! ioctls on a directory it can write. They fail with EPERM inside projects.
//!
//! libseccomp lets an unconditional rule win over conditional ones for the same syscall, so a
//! "deny ioctl when cmd == X" added beside the default "allow ioctl" does nothing (measured). The
//! profile therefore drops the unconditional allow of `ioctl` and allows instead every request
//! number except the denied ones, as a set of masked-equality rules on the low 32 bits (the kernel
//! truncates `cmd` to 32 bits, so high bits cannot smuggle a denied number past the filter).
//!
//! The same profile closes nested namespaces (podman's default allows `unshare`, `clone` and
//! `clone3` unconditionally, so `unshare -Ur` gave a tenant a user namespace where it is root,
//! the door to nf_tables and the other namespaced kernel code most escapes use): `clone` and
//! `unshare` with any `CLONE_NEW*` flag fail with EPERM; `clone3` fails with ENOSYS (its flags sit
//! in memory, out of seccomp's reach), so libc falls back to `clone`; `setns` and the mount
//! syscalls fail with EPERM. Plain fork, vfork and threads keep working.
use serde_json::{Value, json};

/// The denied ioctls: (request number, name). All `_IOW(0x94, nr, …)` of `linux/btrfs.h`.
pub const DENIED_IOCTLS: [(u32, &str); 7] = [
    (0x5000_9401, "BTRFS_IOC_SNAP_CREATE"),
    (0x5000_940e, "BTRFS_IOC_SUBVOL_CREATE"),
    (0x5000_940f, "BTRFS_IOC_SNAP_DESTROY"),
    (0x5000_9417, "BTRFS_IOC_SNAP_CREATE_V2"),
    (0x5000_9418, "BTRFS_IOC_SUBVOL_CREATE_V2"),
    (0x4008_941a, "BTRFS_IOC_SUBVOL_SETFLAGS"),
    (0x5000_943f, "BTRFS_IOC_SNAP_DESTROY_V2"),
];

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// The namespace flags of `clone` (its low byte is the exit signal, so `CLONE_NEWTIME`, 0x80,
/// cannot be told from a signal number there; the kernel takes it only from clone3/unshare).
pub const CLONE_NS_FLAGS: [(u64, &str); 7] = [
    (0x0002_0000, "CLONE_NEWNS"),
    (0x0200_0000, "CLONE_NEWCGROUP"),
    (0x0400_0000, "CLONE_NEWUTS"),
    (0x0800_0000, "CLONE_NEWIPC"),
    (0x1000_0000, "CLONE_NEWUSER"),
    (0x2000_0000, "CLONE_NEWPID"),
    (0x4000_0000, "CLONE_NEWNET"),
];
/// `unshare` takes `CLONE_NEWTIME` too.
pub const CLONE_NEWTIME: u64 = 0x80;

/// Syscalls refused outright (EPERM): joining namespaces and every mount call, old and new API.
pub const DENIED_SYSCALLS: [&str; 11] = [
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
];

/// Syscalls whose rules this profile writes itself: every rule of the base naming them goes.
fn replaced(name: &str) -> bool {
    matches!(name, "clone" | "clone3" | "unshare") || DENIED_SYSCALLS.contains(&name)
}

/// The rules for `clone` (flags: argument 0 on x86_64 and arm64, the architectures the package
/// is built for), `unshare`, `clone3` and the denied syscalls.
fn namespace_rules() -> Vec<Value> {
    let mut rules = Vec::new();
    let clone_mask: u64 = CLONE_NS_FLAGS.iter().map(|(f, _)| f).sum();
    for (name, mask, extra) in [
        ("clone", clone_mask, None),
        (
            "unshare",
            clone_mask | CLONE_NEWTIME,
            Some((CLONE_NEWTIME, "CLONE_NEWTIME")),
        ),
    ] {
        // allowed when no namespace flag is set; each flag that is set matches an EPERM rule
        rules.push(json!({
            "names": [name],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": mask, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
        }));
        for (flag, fname) in CLONE_NS_FLAGS.iter().copied().chain(extra) {
            rules.push(json!({
                "names": [name],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": EPERM,
                "comment": format!("cocalc-project-host: no nested namespaces ({fname})"),
                "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
            }));
        }
    }
    rules.push(json!({
        "names": ["clone3"],
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": ENOSYS,
        "comment": "cocalc-project-host: flags out of seccomp's reach; libc falls back to clone",
    }));
    rules.push(json!({
        "names": DENIED_SYSCALLS,
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": EPERM,
        "comment": "cocalc-project-host: no joining namespaces, no mounts",
    }));
    rules
}

/// Masked-equality rules `(mask, value)` on a 32-bit number that together match exactly the
/// numbers not in `denied`, each number by exactly one rule (the leaves of a binary trie that
/// hold no denied number).
pub fn allowed_cover(denied: &[u32]) -> Vec<(u32, u32)> {
    fn walk(denied: &[u32], mask: u32, value: u32, bit: i32, out: &mut Vec<(u32, u32)>) {
        if !denied.iter().any(|d| d & mask == value) {
            out.push((mask, value));
            return;
        }
        if bit < 0 {
            return; // the one number `value`, which is denied
        }
        let b = 1u32 << bit;
        walk(denied, mask | b, value, bit - 1, out);
        walk(denied, mask | b, value | b, bit - 1, out);
    }
    let mut out = Vec::new();
    walk(denied, 0, 0, 31, &mut out);
    out
}

/// Why a base profile cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("seccomp profile: {0}")]
pub struct ProfileError(pub String);

fn is_unconditional_allow(rule: &Value) -> bool {
    rule.get("action").and_then(Value::as_str) == Some("SCMP_ACT_ALLOW")
        && rule
            .get("args")
            .is_none_or(|a| a.is_null() || a.as_array().is_some_and(Vec::is_empty))
}

/// The project profile made from podman's default profile (`/usr/share/containers/seccomp.json`).
pub fn project_profile(base: &Value) -> Result<Value, ProfileError> {
    let mut p = base.clone();
    let rules = p
        .get_mut("syscalls")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| ProfileError("no \"syscalls\" list".into()))?;
    let mut had_ioctl = false;
    for rule in rules.iter_mut() {
        if let Some(names) = rule.get_mut("names").and_then(Value::as_array_mut) {
            names.retain(|n| !n.as_str().is_some_and(replaced));
        }
        if !is_unconditional_allow(rule) {
            continue;
        }
        if let Some(names) = rule.get_mut("names").and_then(Value::as_array_mut) {
            let before = names.len();
            names.retain(|n| n.as_str() != Some("ioctl"));
            had_ioctl |= names.len() != before;
        }
    }
    if !had_ioctl {
        return Err(ProfileError(
            "the base profile does not allow ioctl unconditionally; refusing to guess".into(),
        ));
    }
    rules.retain(|r| {
        r.get("names")
            .and_then(Value::as_array)
            .is_none_or(|n| !n.is_empty())
    });
    rules.extend(namespace_rules());
    let denied: Vec<u32> = DENIED_IOCTLS.iter().map(|(n, _)| *n).collect();
    for (number, name) in DENIED_IOCTLS {
        rules.push(json!({
            "names": ["ioctl"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": EPERM,
            "comment": format!("cocalc-project-host: {name} would escape the project's quota"),
            "args": [{"index": 1, "value": 0xffff_ffffu32, "valueTwo": number, "op": "SCMP_CMP_MASKED_EQ"}],
        }));
    }
    for (mask, value) in allowed_cover(&denied) {
        rules.push(json!({
            "names": ["ioctl"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 1, "value": mask, "valueTwo": value, "op": "SCMP_CMP_MASKED_EQ"}],
        }));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied() -> Vec<u32> {
        DENIED_IOCTLS.iter().map(|(n, _)| *n).collect()
    }

    #[test]
    fn the_cover_allows_exactly_what_is_not_denied() {
        let d = denied();
        let cover = allowed_cover(&d);
        assert!(cover.len() < 100, "{} rules", cover.len());
        let matches = |x: u32| cover.iter().filter(|(m, v)| x & m == *v).count();
        for x in &d {
            assert_eq!(matches(*x), 0, "{x:#x} is allowed");
        }
        // the neighbourhood of the btrfs numbers, the ends, and a spread of others
        let mut probes: Vec<u32> = (0x5000_9400..=0x5000_94ff).collect();
        probes.extend(0x4008_9400..=0x4008_94ff);
        probes.extend([0, 1, u32::MAX, 0x5401, 0x8008_6601, 0xc004_94ff]);
        let mut x: u32 = 0x1234_5678;
        for _ in 0..200_000 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            probes.push(x);
        }
        for p in probes {
            let want = usize::from(!d.contains(&p));
            assert_eq!(matches(p), want, "{p:#x}");
        }
        assert_eq!(allowed_cover(&[]), vec![(0, 0)]);
    }

    fn base() -> Value {
        json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 38,
            "syscalls": [
                {"names": ["read", "ioctl", "write"], "action": "SCMP_ACT_ALLOW", "args": []},
                {"names": ["ioctl"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]},
            ]
        })
    }

    #[test]
    fn the_profile_drops_the_blanket_ioctl_allow_and_keeps_the_rest() {
        let p = project_profile(&base()).unwrap();
        let rules = p["syscalls"].as_array().unwrap();
        assert_eq!(rules[0]["names"], json!(["read", "write"]));
        assert_eq!(
            rules[1]["names"],
            json!(["personality"]),
            "emptied rule removed"
        );
        assert_eq!(p["defaultErrnoRet"], 38);
        let ioctl: Vec<&Value> = rules
            .iter()
            .filter(|r| r["names"] == json!(["ioctl"]))
            .collect();
        assert!(
            ioctl
                .iter()
                .all(|r| r["args"].as_array().unwrap().len() == 1)
        );
        let errno: Vec<u64> = ioctl
            .iter()
            .filter(|r| r["action"] == "SCMP_ACT_ERRNO")
            .map(|r| r["args"][0]["valueTwo"].as_u64().unwrap())
            .collect();
        assert_eq!(errno.len(), DENIED_IOCTLS.len());
        assert!(errno.contains(&0x5000_940e));
        assert_eq!(
            ioctl.len(),
            DENIED_IOCTLS.len() + allowed_cover(&denied()).len()
        );
    }

    #[test]
    fn a_profile_without_a_blanket_ioctl_allow_is_refused() {
        let b = json!({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]});
        assert!(project_profile(&b).is_err());
        assert!(project_profile(&json!({})).is_err());
    }

    /// What the profile's rules say for `name` with argument 0 = `arg0` (a tiny evaluator of the
    /// masked-equality rules this profile uses): the actions of every matching rule.
    fn actions(p: &Value, name: &str, arg0: u64) -> Vec<(String, Option<u64>)> {
        p["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["names"].as_array().unwrap().iter().any(|n| n == name))
            .filter(|r| {
                r["args"].as_array().is_none_or(|a| {
                    a.iter().all(|c| {
                        assert_eq!(c["op"], "SCMP_CMP_MASKED_EQ");
                        assert_eq!(c["index"], 0);
                        arg0 & c["value"].as_u64().unwrap() == c["valueTwo"].as_u64().unwrap()
                    })
                })
            })
            .map(|r| {
                (
                    r["action"].as_str().unwrap().to_string(),
                    r["errnoRet"].as_u64(),
                )
            })
            .collect()
    }

    #[test]
    fn namespaces_are_refused_and_plain_clones_allowed() {
        let mut b = base();
        b["syscalls"].as_array_mut().unwrap().push(json!({
            "names": ["clone", "clone3", "unshare", "setns", "mount", "getpid"],
            "action": "SCMP_ACT_ALLOW", "args": []
        }));
        let p = project_profile(&b).unwrap();
        let allow = || vec![("SCMP_ACT_ALLOW".to_string(), None)];
        // fork (SIGCHLD | CHILD_SETTID | CHILD_CLEARTID), pthread's clone, vfork
        for flags in [0x0120_0011u64, 0x003d_0f00, 0x0000_4111] {
            assert_eq!(actions(&p, "clone", flags), allow(), "{flags:#x}");
        }
        assert_eq!(actions(&p, "unshare", 0x0000_0400), allow(), "CLONE_FILES");
        for (flag, name) in CLONE_NS_FLAGS {
            for sys in ["clone", "unshare"] {
                let a = actions(&p, sys, flag | 0x11);
                assert!(!a.is_empty(), "{sys} {name}");
                assert!(
                    a.iter()
                        .all(|x| *x == ("SCMP_ACT_ERRNO".to_string(), Some(1))),
                    "{sys} {name}: {a:?}"
                );
            }
        }
        let t = actions(&p, "unshare", CLONE_NEWTIME);
        assert_eq!(t, [("SCMP_ACT_ERRNO".to_string(), Some(1))]);
        // clone's low byte is the exit signal: 0x80 there is not CLONE_NEWTIME
        assert_eq!(actions(&p, "clone", 0x80), allow());
        assert_eq!(
            actions(&p, "clone3", 0),
            [("SCMP_ACT_ERRNO".to_string(), Some(38))]
        );
        for sys in ["setns", "mount"] {
            assert_eq!(
                actions(&p, sys, 0),
                [("SCMP_ACT_ERRNO".to_string(), Some(1))]
            );
        }
        assert_eq!(actions(&p, "getpid", 0), allow());
    }
}
