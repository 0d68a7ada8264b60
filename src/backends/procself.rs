//! The daemon's own resource figures for `/metrics`, from /proc/self (readable under the
//! service's `ProcSubset=pid`): resident memory, open file descriptors, threads.
use crate::core::metrics::ProcSelf;

/// Reads /proc/self; `None` when it cannot be read.
pub fn read() -> Option<ProcSelf> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let mut p = parse_status(&status)?;
    p.fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(p)
}

/// RSS and threads from the text of /proc/self/status.
pub fn parse_status(status: &str) -> Option<ProcSelf> {
    let value = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(ProcSelf {
        rss: value("VmRSS:")? * 1024,
        fds: 0,
        tasks: value("Threads:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rss_and_threads() {
        let p = parse_status("Name:\tx\nVmRSS:\t  2048 kB\nThreads:\t5\n").unwrap();
        assert_eq!((p.rss, p.tasks), (2 << 20, 5));
        assert!(parse_status("Name:\tx\n").is_none());
        let me = read().unwrap();
        assert!(me.rss > 0 && me.fds > 0 && me.tasks > 0, "{me:?}");
    }
}
