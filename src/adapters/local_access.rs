//! Who may read project ids and states over D-Bus: root and members of group
//! [`OPERATORS_GROUP`]. The bus policy (`dbus/com.cocalc.ProjectHost1.conf`) refuses everyone else
//! already; this is the daemon's own check behind it (a policy file can be edited, a bus daemon may
//! be another implementation). The caller's uid and groups come from the bus
//! (`GetConnectionCredentials`), never from the message.
use zbus::Connection;
use zbus::message::Header;

/// The group whose members may read and act on projects over D-Bus (as the bus policy says).
pub const OPERATORS_GROUP: &str = "cocalc-project-host";

/// Whether a caller with this uid and these groups may see projects (pure, unit tested).
pub fn may_read(uid: u32, groups: &[u32], operators_gid: Option<u32>) -> bool {
    uid == 0 || operators_gid.is_some_and(|g| groups.contains(&g))
}

/// The groups of a user from the user database (what dbus-daemon's `<policy group=…>` uses
/// when the bus does not report the caller's groups).
fn groups_of(uid: u32) -> Vec<u32> {
    use nix::unistd::{Uid, User, getgrouplist};
    let Ok(Some(u)) = User::from_uid(Uid::from_raw(uid)) else {
        return Vec::new();
    };
    let Ok(name) = std::ffi::CString::new(u.name) else {
        return Vec::new();
    };
    getgrouplist(&name, u.gid)
        .map(|v| v.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_default()
}

/// Refuses (`Err(reason)`) a caller that is neither root nor in [`OPERATORS_GROUP`]. A call the
/// daemon makes itself (no header: a property read for a change signal) is allowed.
pub async fn check(conn: &Connection, header: Option<&Header<'_>>) -> Result<(), String> {
    let Some(h) = header else { return Ok(()) };
    let sender = h
        .sender()
        .ok_or_else(|| "the call has no sender".to_string())?;
    let dbus = zbus::fdo::DBusProxy::new(conn)
        .await
        .map_err(|e| format!("cannot ask the bus who is calling: {e}"))?;
    let creds = dbus
        .get_connection_credentials(sender.clone().into())
        .await
        .map_err(|e| format!("cannot ask the bus who is calling: {e}"))?;
    let uid = creds
        .unix_user_id()
        .ok_or_else(|| "the bus does not know the caller's uid".to_string())?;
    let groups = match creds.unix_group_ids() {
        Some(g) => g.clone(),
        None => groups_of(uid),
    };
    let gid = nix::unistd::Group::from_name(OPERATORS_GROUP)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw());
    if may_read(uid, &groups, gid) {
        Ok(())
    } else {
        tracing::info!(
            uid,
            "D-Bus read of projects refused: not root nor in group {OPERATORS_GROUP}"
        );
        Err(format!(
            "access denied: reading projects needs root or membership in group {OPERATORS_GROUP}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_operators_only() {
        assert!(may_read(0, &[], None));
        assert!(may_read(1000, &[100, 999], Some(999)));
        assert!(!may_read(1000, &[100], Some(999)));
        assert!(!may_read(1000, &[100], None), "no such group: root only");
        assert!(!may_read(65534, &[], Some(999)));
    }
}
