//! The `podman` command lines of a project's unit: pure functions of the settings and the run
//! config, unit tested; the unit (systemd.rs) runs them.
use std::path::Path;

use crate::config::Settings;
use crate::domain::images::ImageRef;
use crate::domain::limits;
use crate::domain::project::{NetworkMode, ProjectId, RunConfig};

/// Path of the podman binary (what the unit's Exec* lines run).
pub const PODMAN: &str = "/usr/bin/podman";

/// Where a project's container id file lives: the unit's own RuntimeDirectory, so systemd
/// creates it on start and removes it once the unit has stopped.
pub fn cidfile(id: &ProjectId) -> String {
    format!("/run/cocalc-project-{id}/ctr-id")
}

/// The home directory inside the container.
pub const HOME: &str = "/home/user";

/// `ExecStart`: run the container detached; conmon reports READY (`--sdnotify=conmon`) and is the
/// unit's main process. `--cgroups=split` keeps conmon (`<unit>/runtime`) and the container
/// (`<unit>/libpod-payload-…`) inside the unit's cgroup, so the unit's limits bind the container
/// (see `limits`). The security flags: a user namespace onto the reserved range, every
/// capability dropped but the configured ones (none by default), no-new-privileges; the only
/// host path inside is the project's own home; podman mounts /sys, /proc/sys and cgroups read-only.
pub fn run_argv(
    id: &ProjectId,
    settings: &Settings,
    cfg: &RunConfig,
    image: &ImageRef,
    id_base: u32,
    home: &Path,
) -> Vec<String> {
    let p = &settings.projects;
    // the project's own range of host ids (idmap.rs)
    let map = format!("0:{id_base}:{}", p.uid_count);
    let mut a: Vec<String> = vec![
        PODMAN.into(),
        "run".into(),
        format!("--cidfile={}", cidfile(id)),
        "--cgroups=split".into(),
        "--rm".into(),
        "--sdnotify=conmon".into(),
        "-d".into(),
        "--replace".into(),
        format!("--name={}", id.container_name()),
        "--init".into(),
        "--log-driver=journald".into(),
        network_flag(cfg.network.unwrap_or(p.network)),
        // container root is never host root: a user namespace onto the reserved range
        format!("--uidmap={map}"),
        format!("--gidmap={map}"),
        format!("--user={}:{}", p.user_uid, p.user_uid),
        format!("--volume={}:{HOME}", home.display()),
        format!("--workdir={HOME}"),
        format!("--env=HOME={HOME}"),
        format!("--env=COCALC_PROJECT_ID={id}"),
        "--pull=never".into(),
    ];
    if cfg.network.unwrap_or(p.network) == NetworkMode::Slirp4netns {
        // the egress rules (egress.rs): a prestart hook selected by this annotation
        a.push(format!(
            "--hooks-dir={}",
            settings.state_dir.join("hooks.d").display()
        ));
        a.push(format!(
            "--annotation={}=slirp4netns",
            crate::backends::egress::ANNOTATION
        ));
    }
    for (k, v) in &cfg.env {
        a.push(format!("--env={k}={v}"));
    }
    a.extend(security_flags(settings));
    let lim = limits::resolve(cfg, &settings.limits.default);
    a.extend(limits::podman_flags(&lim, &settings.limits.max));
    // `--` ends podman's options: neither the image nor the command can be read as a flag
    a.push("--".into());
    a.push(image.to_string());
    if let Some(cmd) = cfg.cmd.as_ref().or(p.cmd.as_ref()) {
        a.extend(cmd.iter().cloned());
    }
    a
}

/// podman's `--network`: slirp4netns never with the host's loopback (its default, said aloud).
fn network_flag(mode: NetworkMode) -> String {
    match mode {
        NetworkMode::None => "--network=none".into(),
        NetworkMode::Slirp4netns => "--network=slirp4netns:allow_host_loopback=false".into(),
    }
}

/// Never privileged, no new privileges, every capability dropped but the configured ones.
pub fn security_flags(settings: &Settings) -> Vec<String> {
    let mut f = vec![
        "--security-opt=no-new-privileges".to_string(),
        "--cap-drop=all".to_string(),
    ];
    for c in &settings.projects.capabilities {
        f.push(format!("--cap-add={c}"));
    }
    f
}

/// `podman update` of a running project's container to `lim` (what the unit cannot change).
pub fn update_argv(id: &ProjectId, lim: &limits::Limits) -> Vec<String> {
    let mut a = vec!["update".to_string()];
    a.extend(limits::podman_update_flags(lim));
    a.push(id.container_name());
    a
}

/// `ExecStop`: a graceful stop with the configured timeout (SIGTERM, SIGKILL after
/// `timeout_secs`) and the removal, in one podman process, as a raw `podman rm -f` does.
pub fn stop_argv(id: &ProjectId, timeout_secs: u64) -> Vec<String> {
    vec![
        PODMAN.into(),
        "rm".into(),
        "--force".into(),
        "--ignore".into(),
        format!("--time={timeout_secs}"),
        format!("--cidfile={}", cidfile(id)),
    ]
}

/// `ExecStopPost`: the removal again, but only when the unit's main process did not exit by
/// itself (`$EXIT_CODE` is not `exited`: conmon killed, or a stop while `podman run` was still
/// starting — systemd runs `ExecStop` only after a successful start and a clean exit). After a
/// normal stop conmon exits once `ExecStop` removed the container, and this is a shell's test,
/// not a second podman process.
pub fn stop_post_argv(id: &ProjectId) -> Vec<String> {
    let rm = rm_argv(id).join(" ");
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("[ \"$EXIT_CODE\" = exited ] || exec {rm}"),
    ]
}

/// `podman rm` of the unit's container through its cidfile, at once.
fn rm_argv(id: &ProjectId) -> Vec<String> {
    vec![
        PODMAN.into(),
        "rm".into(),
        "--force".into(),
        "--ignore".into(),
        "--time=0".into(),
        format!("--cidfile={}", cidfile(id)),
    ]
}

/// Removes a container by name, for cleaning up after a failed start or a delete.
pub fn rm_by_name_argv(id: &ProjectId) -> Vec<String> {
    vec![
        "rm".into(),
        "--force".into(),
        "--ignore".into(),
        "--time=0".into(),
        id.container_name(),
    ]
}

/// Where a project's snapshots appear inside its container (read-only).
pub const SNAPSHOTS_MOUNT: &str = "/home/user/.snapshots";
/// Where a project's scratch subvolume is mounted.
pub const SCRATCH_MOUNT: &str = "/scratch";

/// Size of each of /tmp, /var/tmp and /dev/shm when neither the config nor the host sets `tmp`.
pub const DEFAULT_TMP: u64 = 128 << 20;
/// Size of /run (container root's; the user cannot write it).
pub const RUN_SIZE: u64 = 16 << 20;

/// The storage options of a project's container: the seccomp profile that keeps it from making
/// btrfs subvolumes (quota escape) and namespaces, its snapshots read-only, its scratch, and a
/// bound on every other writable place. The image's root filesystem is read-only (a write there
/// would land in podman's storage on the host's root filesystem, outside any quota); /tmp,
/// /var/tmp and /dev/shm are tmpfs of `tmp` bytes each (default [`DEFAULT_TMP`]) and /run one of
/// [`RUN_SIZE`]: tmpfs pages are charged to the project's memory cgroup, so they count in its
/// memory limit too. podman's own unsized tmpfs for a read-only container are off.
pub fn storage_options(
    seccomp: &Path,
    snapshots: &Path,
    scratch: Option<&Path>,
    tmp: Option<u64>,
) -> Vec<String> {
    let tmp = tmp.unwrap_or(DEFAULT_TMP);
    let mut a = vec![
        format!("--security-opt=seccomp={}", seccomp.display()),
        format!("--volume={}:{SNAPSHOTS_MOUNT}:ro", snapshots.display()),
    ];
    if let Some(s) = scratch {
        a.push(format!("--volume={}:{SCRATCH_MOUNT}", s.display()));
    }
    a.extend([
        "--read-only".to_string(),
        "--read-only-tmpfs=false".to_string(),
        format!("--tmpfs=/tmp:rw,nosuid,nodev,size={tmp},mode=1777"),
        format!("--tmpfs=/var/tmp:rw,nosuid,nodev,size={tmp},mode=1777"),
        format!("--tmpfs=/run:rw,nosuid,nodev,size={RUN_SIZE},mode=755"),
        format!("--shm-size={tmp}"),
    ]);
    a
}

/// Inserts options into a `podman run` argv just before the `--` that ends its options.
pub fn insert_options(argv: &mut Vec<String>, options: Vec<String>) {
    let at = argv.iter().position(|a| a == "--").unwrap_or(argv.len());
    argv.splice(at..at, options);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::project::NetworkMode;

    fn img(s: &str) -> ImageRef {
        s.parse().unwrap()
    }

    fn default_image() -> ImageRef {
        img("localhost/cocalc-project:latest")
    }

    fn id() -> ProjectId {
        "6f1c2d3e-0000-4000-8000-000000000001".parse().unwrap()
    }

    #[test]
    fn run_argv_has_the_recipe_and_the_user_namespace() {
        let s = Settings::default();
        let a = run_argv(
            &id(),
            &s,
            &RunConfig::default(),
            &default_image(),
            1 << 30,
            Path::new("/srv/p/project-x"),
        );
        let has = |x: &str| a.iter().any(|y| y == x);
        assert_eq!(a[0], PODMAN);
        assert_eq!(a[1], "run");
        for f in [
            "--cgroups=split",
            "--security-opt=no-new-privileges",
            "--cap-drop=all",
            "--memory=1073741824",
            "--memory-swap=1073741824",
            "--pids-limit=16384",
            "--sdnotify=conmon",
            "--rm",
            "-d",
            "--replace",
            "--init",
            // the project's own range
            "--uidmap=0:1073741824:65536",
            "--gidmap=0:1073741824:65536",
            "--user=1000:1000",
            "--volume=/srv/p/project-x:/home/user",
            "--env=HOME=/home/user",
            "--env=COCALC_PROJECT_ID=6f1c2d3e-0000-4000-8000-000000000001",
            "--network=none",
            "--cidfile=/run/cocalc-project-6f1c2d3e-0000-4000-8000-000000000001/ctr-id",
        ] {
            assert!(has(f), "missing {f} in {a:?}");
        }
        // image last, after `--`, and no command: the image's CMD runs
        assert_eq!(&a[a.len() - 2..], ["--", "localhost/cocalc-project:latest"]);
        for never in ["--privileged", "--cap-add", "--cpus", "--cgroups=no-conmon"] {
            assert!(!a.iter().any(|x| x.starts_with(never)), "{never} in {a:?}");
        }
    }

    #[test]
    fn configured_capabilities_are_the_only_ones_kept() {
        let mut s = Settings::default();
        s.projects.capabilities = vec!["NET_RAW".into()];
        let a = run_argv(
            &id(),
            &s,
            &RunConfig::default(),
            &default_image(),
            100_000,
            Path::new("/h"),
        );
        let caps: Vec<&String> = a.iter().filter(|x| x.starts_with("--cap-")).collect();
        assert_eq!(caps, ["--cap-drop=all", "--cap-add=NET_RAW"]);
    }

    #[test]
    fn update_moves_memory_and_swap_of_the_container() {
        let lim = limits::Limits {
            memory: 256 << 20,
            ..Default::default()
        };
        assert_eq!(
            update_argv(&id(), &lim),
            [
                "update",
                "--memory=268435456",
                "--memory-swap=268435456",
                "project-6f1c2d3e-0000-4000-8000-000000000001"
            ]
        );
    }

    #[test]
    fn run_config_reaches_the_argv() {
        let s = Settings::default();
        let cfg = RunConfig {
            image: Some("localhost/other:2".into()),
            env: [("A".to_string(), "b c".to_string())].into(),
            cmd: Some(vec!["sleep".into(), "9".into()]),
            network: Some(NetworkMode::Slirp4netns),
            memory: Some(64 << 20),
            cpu: Some(0.5),
            pids: Some(50),
            ..Default::default()
        };
        let a = run_argv(
            &id(),
            &s,
            &cfg,
            &img("localhost/other:2"),
            100_000,
            Path::new("/h"),
        );
        let has = |x: &str| a.iter().any(|y| y == x);
        for f in [
            "--env=A=b c",
            "--network=slirp4netns:allow_host_loopback=false",
            "--hooks-dir=/var/lib/cocalc-project-host/hooks.d",
            "--annotation=com.cocalc.egress=slirp4netns",
            "--memory=67108864",
            "--memory-swap=67108864",
            // the unit's TasksMax binds; the container's own limit is the host's ceiling
            "--pids-limit=16384",
        ] {
            assert!(has(f), "missing {f} in {a:?}");
        }
        assert_eq!(&a[a.len() - 4..], ["--", "localhost/other:2", "sleep", "9"]);
    }

    #[test]
    fn stop_removes_with_the_timeout_through_the_cidfile() {
        assert_eq!(
            stop_argv(&id(), 7),
            [
                PODMAN,
                "rm",
                "--force",
                "--ignore",
                "--time=7",
                "--cidfile=/run/cocalc-project-6f1c2d3e-0000-4000-8000-000000000001/ctr-id"
            ]
        );
    }

    #[test]
    fn stop_post_removes_only_after_an_unclean_end() {
        let a = stop_post_argv(&id());
        assert_eq!(&a[..2], ["/bin/sh", "-c"]);
        assert_eq!(
            a[2],
            "[ \"$EXIT_CODE\" = exited ] || exec /usr/bin/podman rm --force --ignore --time=0 \
             --cidfile=/run/cocalc-project-6f1c2d3e-0000-4000-8000-000000000001/ctr-id"
        );
    }

    #[test]
    fn storage_options_go_before_the_image() {
        let mut a = run_argv(
            &id(),
            &Settings::default(),
            &RunConfig::default(),
            &default_image(),
            100_000,
            Path::new("/h"),
        );
        let n = a.len();
        let o = storage_options(
            Path::new("/var/lib/x/seccomp.json"),
            Path::new("/s/.snapshots/p"),
            Some(Path::new("/s/.scratch/p")),
            Some(64 << 20),
        );
        assert_eq!(
            o,
            [
                "--security-opt=seccomp=/var/lib/x/seccomp.json",
                "--volume=/s/.snapshots/p:/home/user/.snapshots:ro",
                "--volume=/s/.scratch/p:/scratch",
                "--read-only",
                "--read-only-tmpfs=false",
                "--tmpfs=/tmp:rw,nosuid,nodev,size=67108864,mode=1777",
                "--tmpfs=/var/tmp:rw,nosuid,nodev,size=67108864,mode=1777",
                "--tmpfs=/run:rw,nosuid,nodev,size=16777216,mode=755",
                "--shm-size=67108864",
            ]
        );
        insert_options(&mut a, o);
        assert_eq!(a.len(), n + 9);
        let dash = a.iter().position(|x| x == "--").unwrap();
        assert_eq!(a[dash - 1], "--shm-size=67108864");
        assert_eq!(a[dash + 1], "localhost/cocalc-project:latest");
        // no tmp configured: every writable tmpfs still has a size
        let d = storage_options(Path::new("/p.json"), Path::new("/s"), None, None);
        assert_eq!(d.len(), 8);
        assert!(d.contains(&"--tmpfs=/tmp:rw,nosuid,nodev,size=134217728,mode=1777".to_string()));
        assert!(d.contains(&"--shm-size=134217728".to_string()));
    }
}
