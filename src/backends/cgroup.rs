//! A project unit's cgroup files, read (and on cgroup v1 the freezer written) directly: memory and
//! CPU use without a D-Bus round trip to PID 1 per project, and the freezer state.
//!
//! Layouts: on the unified hierarchy (v2) the unit's cgroup is
//! `/sys/fs/cgroup/cocalc.slice/cocalc-projects.slice/<unit>` with `memory.current`, `cpu.stat`
//! (`usage_usec`), `cgroup.events` (`frozen 0|1`); systemd freezes it (`FreezeUnit`), which
//! freezes the whole subtree: conmon in `<unit>/runtime` and the container in
//! `<unit>/libpod-payload-<id>` (`--cgroups=split`). On the v1 "hybrid" layout each controller
//! has its own hierarchy: `memory/…/<unit>/memory.usage_in_bytes`, `cpuacct/…/<unit>/cpuacct.usage`,
//! and systemd cannot freeze units there, so the v1 freezer is written directly:
//! `freezer/…/<unit>/freezer.state` (the container runtime creates the container's cgroup below
//! the unit's path in every hierarchy, the freezer's too; freezing the parent freezes it).
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The slice path of the projects' units below a hierarchy's root.
const SLICE_PATH: &str = "cocalc.slice/cocalc-projects.slice";

/// Which cgroup layout the host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The unified hierarchy only.
    V2,
    /// Controllers on v1 hierarchies (systemd's "hybrid" or "legacy").
    V1,
}

/// The cgroup files of project units under a root (`/sys/fs/cgroup`, or a test directory).
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
    layout: Layout,
}

/// A freezer state as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freezer {
    /// Running.
    Thawed,
    /// Being frozen (v1 only: some tasks not yet).
    Freezing,
    /// Every task frozen.
    Frozen,
}

impl Cgroups {
    /// The host's cgroups (`/sys/fs/cgroup`), layout detected.
    pub fn host() -> Cgroups {
        Cgroups::at(Path::new("/sys/fs/cgroup"))
    }

    /// The cgroups under `root`: v2 when `root/cgroup.controllers` exists.
    pub fn at(root: &Path) -> Cgroups {
        let layout = if root.join("cgroup.controllers").exists() {
            Layout::V2
        } else {
            Layout::V1
        };
        Cgroups {
            root: root.to_path_buf(),
            layout,
        }
    }

    /// The layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The unit's directory in the hierarchy of `controller` (ignored on v2).
    pub fn unit_dir(&self, controller: &str, unit: &str) -> PathBuf {
        match self.layout {
            Layout::V2 => self.root.join(SLICE_PATH).join(unit),
            Layout::V1 => self.root.join(controller).join(SLICE_PATH).join(unit),
        }
    }

    /// Memory in use by the unit's cgroup (bytes), as systemd's `MemoryCurrent` reads it.
    pub fn memory_current(&self, unit: &str) -> Option<u64> {
        let f = match self.layout {
            Layout::V2 => self.unit_dir("", unit).join("memory.current"),
            Layout::V1 => self.unit_dir("memory", unit).join("memory.usage_in_bytes"),
        };
        read_u64(&f)
    }

    /// CPU time used by the unit's cgroup (ns), as systemd's `CPUUsageNSec` reads it.
    pub fn cpu_usage_nsec(&self, unit: &str) -> Option<u64> {
        match self.layout {
            Layout::V2 => {
                let text =
                    std::fs::read_to_string(self.unit_dir("", unit).join("cpu.stat")).ok()?;
                text.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|us| us.saturating_mul(1000))
            }
            Layout::V1 => ["cpuacct", "cpu,cpuacct"]
                .iter()
                .find_map(|c| read_u64(&self.unit_dir(c, unit).join("cpuacct.usage"))),
        }
    }

    /// The unit's freezer state; `None` when it has no cgroup (not running).
    pub fn freezer(&self, unit: &str) -> Option<Freezer> {
        match self.layout {
            Layout::V2 => {
                let text =
                    std::fs::read_to_string(self.unit_dir("", unit).join("cgroup.events")).ok()?;
                let frozen = text.lines().find_map(|l| l.strip_prefix("frozen "))?;
                Some(if frozen.trim() == "1" {
                    Freezer::Frozen
                } else {
                    Freezer::Thawed
                })
            }
            Layout::V1 => {
                let text = std::fs::read_to_string(self.v1_freezer_file(unit)).ok()?;
                match text.trim() {
                    "FROZEN" => Some(Freezer::Frozen),
                    "FREEZING" => Some(Freezer::Freezing),
                    _ => Some(Freezer::Thawed),
                }
            }
        }
    }

    fn v1_freezer_file(&self, unit: &str) -> PathBuf {
        self.unit_dir("freezer", unit).join("freezer.state")
    }

    /// v1: freezes the unit's freezer cgroup (and so every cgroup below it) and waits until
    /// the kernel reports it `FROZEN` (at most `wait`; a task in an uninterruptible sleep can
    /// hold it in `FREEZING`, then it is thawed again and the error says so).
    pub async fn v1_freeze(&self, unit: &str, wait: Duration) -> Result<(), String> {
        let f = self.v1_freezer_file(unit);
        std::fs::write(&f, "FROZEN").map_err(|e| format!("{}: {e}", f.display()))?;
        let t0 = std::time::Instant::now();
        loop {
            match self.freezer(unit) {
                Some(Freezer::Frozen) => return Ok(()),
                None => return Err(format!("{}: gone while freezing", f.display())),
                _ if t0.elapsed() >= wait => {
                    let _ = std::fs::write(&f, "THAWED");
                    return Err(format!(
                        "{}: not frozen within {} ms",
                        f.display(),
                        wait.as_millis()
                    ));
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// v1: thaws the unit's freezer cgroup (at once).
    pub fn v1_thaw(&self, unit: &str) -> Result<(), String> {
        let f = self.v1_freezer_file(unit);
        match std::fs::write(&f, "THAWED") {
            Ok(()) => Ok(()),
            // no cgroup: nothing frozen
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("{}: {e}", f.display())),
        }
    }
}

fn read_u64(f: &Path) -> Option<u64> {
    std::fs::read_to_string(f)
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|v| *v != u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIT: &str = "cocalc-project-6f1c2d3e-0000-4000-8000-000000000001.service";

    struct Dir(PathBuf);
    impl Dir {
        fn new() -> Dir {
            let p = std::env::temp_dir().join(format!("cgroup-test-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn put(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn v2_files_are_read_from_the_unit_cgroup() {
        let d = Dir::new();
        put(d.path(), "cgroup.controllers", "cpu memory\n");
        let u = format!("{SLICE_PATH}/{UNIT}");
        put(d.path(), &format!("{u}/memory.current"), "12345\n");
        put(
            d.path(),
            &format!("{u}/cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
        );
        put(
            d.path(),
            &format!("{u}/cgroup.events"),
            "populated 1\nfrozen 1\n",
        );
        let c = Cgroups::at(d.path());
        assert_eq!(c.layout(), Layout::V2);
        assert_eq!(c.memory_current(UNIT), Some(12345));
        assert_eq!(c.cpu_usage_nsec(UNIT), Some(1_500_000));
        assert_eq!(c.freezer(UNIT), Some(Freezer::Frozen));
        assert_eq!(c.memory_current("other.service"), None);
        assert_eq!(c.freezer("other.service"), None);
    }

    #[tokio::test]
    async fn v1_files_per_controller_and_the_freezer_written() {
        let d = Dir::new();
        put(
            d.path(),
            &format!("memory/{SLICE_PATH}/{UNIT}/memory.usage_in_bytes"),
            "4096\n",
        );
        put(
            d.path(),
            &format!("cpu,cpuacct/{SLICE_PATH}/{UNIT}/cpuacct.usage"),
            "777\n",
        );
        put(
            d.path(),
            &format!("freezer/{SLICE_PATH}/{UNIT}/freezer.state"),
            "THAWED\n",
        );
        let c = Cgroups::at(d.path());
        assert_eq!(c.layout(), Layout::V1);
        assert_eq!(c.memory_current(UNIT), Some(4096));
        assert_eq!(c.cpu_usage_nsec(UNIT), Some(777));
        assert_eq!(c.freezer(UNIT), Some(Freezer::Thawed));
        // a plain file "freezes" at once (the kernel's answer is what is written)
        c.v1_freeze(UNIT, Duration::from_millis(50)).await.unwrap();
        assert_eq!(c.freezer(UNIT), Some(Freezer::Frozen));
        c.v1_thaw(UNIT).unwrap();
        assert_eq!(c.freezer(UNIT), Some(Freezer::Thawed));
        // no cgroup: thawing is nothing to do, freezing fails
        assert!(c.v1_thaw("gone.service").is_ok());
        assert!(c.v1_freeze("gone.service", Duration::ZERO).await.is_err());
    }
}
