//! Free space kept on the project storage (`storage.reserve`) and on the host's root filesystem
//! for the default storage image. Below the reserve, cold starts and quota raises are refused
//! (507 `storage_full`) and the homes of running projects are held at their usage (`clamp_to`),
//! so one project filling the shared filesystem cannot take the last bytes that btrfs metadata
//! and snapshots need; running projects go on, but cannot grow.
//! Pure arithmetic: the storage backend measures the space (`Storage::space`).
use serde::Serialize;

use super::limits::Amount;

/// The project storage is below its reserve: what the status says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shortfall {
    /// bytes free
    pub free: u64,
    /// bytes the reserve keeps
    pub reserve: u64,
}

/// The limit that stops a home growing below the reserve: its usage, unless its limit already
/// holds it there (`None`: leave it).
pub fn clamp_to(quota: Option<u64>, used: u64) -> Option<u64> {
    match quota {
        Some(q) if q <= used => None,
        _ => Some(used),
    }
}

/// Free space of a filesystem: what an unprivileged writer may still use, and its size (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// `f_bavail × f_frsize`
    pub available: u64,
    /// `f_blocks × f_frsize`
    pub total: u64,
}

/// The bytes `reserve` keeps free on a filesystem of `total` bytes.
pub fn required(reserve: Amount, total: u64) -> u64 {
    match reserve {
        Amount::Absolute(n) => n,
        Amount::Percent(p) => (u128::from(total) * u128::from(p.min(100)) / 100) as u64,
    }
}

/// `Err((available, required))` when less than the reserve is free.
pub fn check(s: Space, reserve: Amount) -> Result<(), (u64, u64)> {
    let need = required(reserve, s.total);
    if s.available < need {
        Err((s.available, need))
    } else {
        Ok(())
    }
}

/// For `storage-setup`: whether the host filesystem with `available` bytes free can hold a sparse
/// image that may grow to `image_size` (plus `margin` left to the host). `Err(message)` if not.
pub fn check_image_fits(available: u64, image_size: u64, margin: u64) -> Result<(), String> {
    let need = image_size.saturating_add(margin);
    if available < need {
        return Err(format!(
            "the storage image may grow to storage.image_size = {} bytes, but its filesystem has \
             only {available} bytes free ({margin} more are kept for the host): set a smaller \
             storage.image_size, or storage.mount to a dedicated btrfs filesystem",
            image_size
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_in_bytes_or_percent() {
        let s = Space {
            available: 300,
            total: 4000,
        };
        assert_eq!(required(Amount::Percent(5), 4000), 200);
        assert_eq!(required(Amount::Absolute(1 << 30), 4000), 1 << 30);
        assert_eq!(required(Amount::Percent(5), u64::MAX), u64::MAX / 20);
        assert_eq!(check(s, Amount::Percent(5)), Ok(()));
        assert_eq!(check(s, Amount::Percent(10)), Err((300, 400)));
        assert_eq!(check(s, Amount::Absolute(301)), Err((300, 301)));
        assert_eq!(check(s, Amount::Absolute(0)), Ok(()), "0 turns it off");
    }

    #[test]
    fn a_clamp_never_raises_a_limit() {
        assert_eq!(clamp_to(None, 7), Some(7));
        assert_eq!(clamp_to(Some(10), 7), Some(7));
        assert_eq!(clamp_to(Some(7), 7), None, "already held");
        assert_eq!(clamp_to(Some(5), 7), None, "over quota: stays lower");
    }

    #[test]
    fn the_image_must_fit_on_the_host() {
        assert!(check_image_fits(30 << 30, 20 << 30, 1 << 30).is_ok());
        let e = check_image_fits(20 << 30, 20 << 30, 1 << 30).unwrap_err();
        assert!(e.contains("storage.image_size"), "{e}");
        assert!(check_image_fits(0, u64::MAX, u64::MAX).is_err());
    }
}
