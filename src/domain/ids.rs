//! One host id range per project.
//!
//! Every project used to run with the same `0:100000:65536` map: all project users were host uid
//! 101000 — which is also the first subordinate range Debian's `useradd` gives the first human
//! account (`/etc/subuid`), so that account could `podman unshare` into it and read every
//! project, and all projects shared the per-uid kernel limits (inotify, user namespaces,
//! keyrings, RLIMIT_NPROC). Now each project gets its own range of `projects.uid_count` ids
//! (podman `--uidmap 0:<base>:<count>`, same for gids), slots of a pool that starts at
//! `projects.uid_base`, kept in the store (table `id_ranges`) so it is the same after restarts
//! and restores. A slot is never one that overlaps `/etc/subuid`, `/etc/subgid`, or any uid of
//! `/etc/passwd` or gid of `/etc/group`.
//!
//! A home whose root is not owned by its project's user (a home of the shared range after an
//! upgrade, a home restored from an old snapshot, a home moved from another host) is converted
//! before its container starts: every file owned by an id of the old range (found from the
//! home's owner) is given the same id of the new range (`backends::ids::convert_tree`).
//!
//! This module is the pure part (slots, remapping); reading the host's files and walking a home
//! are `backends::ids`, behind the `Storage` port; the table is the `Store`'s.
/// Id ranges of the host that no project range may overlap: `[start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forbidden(pub Vec<(u64, u64)>);

impl Forbidden {
    /// Adds the ranges of a `/etc/subuid`-style file (`name:start:count` lines).
    pub fn add_subid(&mut self, text: &str) {
        for l in text.lines() {
            let mut f = l.trim().split(':');
            let (Some(_), Some(start), Some(count)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            if let (Ok(s), Ok(c)) = (start.parse::<u64>(), count.parse::<u64>()) {
                self.0.push((s, s + c));
            }
        }
    }

    /// Adds the ids (third field) of a `/etc/passwd` or `/etc/group` file.
    pub fn add_ids(&mut self, text: &str) {
        for l in text.lines() {
            if let Some(Ok(id)) = l.split(':').nth(2).map(str::parse::<u64>) {
                self.0.push((id, id + 1));
            }
        }
    }

    /// Whether `[start, end)` overlaps a forbidden range.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.0.iter().any(|&(s, e)| s < end && start < e)
    }
}

/// The lowest free slot of the pool `[pool_start, 2^32 - 1)` in steps of `count`: not in `taken`
/// and overlapping nothing `forbidden`. `None` when the pool is full.
pub fn allocate(taken: &[u32], forbidden: &Forbidden, pool_start: u32, count: u32) -> Option<u32> {
    // (uid_t)-1 is "no change" to chown and never a valid id
    let end_of_ids = u64::from(u32::MAX);
    let mut base = u64::from(pool_start);
    let count = u64::from(count.max(1));
    while base + count <= end_of_ids {
        let b = base as u32;
        if !taken.contains(&b) && !forbidden.overlaps(base, base + count) {
            return Some(b);
        }
        base += count;
    }
    None
}

/// The id of `id` moved from the range at `from` to the one at `to` (both `count` long); ids
/// outside the old range are left as they are.
pub fn remap(id: u32, from: u32, to: u32, count: u32) -> u32 {
    match id.checked_sub(from) {
        Some(off) if off < count => to + off,
        _ => id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN_SUBUID: &str = "alice:100000:65536\nbob:165536:65536\n";

    #[test]
    fn slots_avoid_subordinate_ranges_host_ids_and_each_other() {
        let mut f = Forbidden::default();
        f.add_subid(DEBIAN_SUBUID);
        f.add_ids("root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\nodd:x:300000:1::/:/bin/sh\n# junk\n");
        // a pool starting where Debian's first subordinate range is: both ranges are skipped
        assert_eq!(allocate(&[], &f, 100_000, 65_536), Some(231_072));
        // the next slot, 296608.., holds uid 300000 of passwd
        assert_eq!(allocate(&[231_072], &f, 100_000, 65_536), Some(362_144));
        // the default pool
        let b = allocate(&[], &f, 1 << 30, 65_536).unwrap();
        assert_eq!(b, 1 << 30);
        assert_eq!(
            allocate(&[b], &f, 1 << 30, 65_536),
            Some((1 << 30) + 65_536)
        );
        // the last slot ends just below (uid_t)-1; then the pool is full
        let last = u32::MAX - 65_536;
        assert_eq!(allocate(&[], &f, last, 65_536), Some(last));
        assert_eq!(allocate(&[last], &f, last, 65_536), None);
        assert_eq!(allocate(&[], &f, last + 1, 65_536), None);
    }

    #[test]
    fn remap_moves_only_the_old_range() {
        assert_eq!(remap(101_000, 100_000, 1 << 30, 65_536), (1 << 30) + 1000);
        assert_eq!(remap(100_000, 100_000, 500_000, 65_536), 500_000);
        assert_eq!(remap(165_535, 100_000, 500_000, 65_536), 565_535);
        assert_eq!(remap(165_536, 100_000, 500_000, 65_536), 165_536);
        assert_eq!(remap(0, 100_000, 500_000, 65_536), 0);
        assert_eq!(remap(99_999, 100_000, 500_000, 65_536), 99_999);
    }
}
