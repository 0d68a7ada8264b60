//! The one error table: every kind of failure a caller can see, with its HTTP status and JSON
//! `code`, its D-Bus error name and the CLI's exit code. The adapters only look answers up here.
use crate::core;

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: the operation failed.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: bad usage (invalid id, bad option value, bad config).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: no such project (or snapshot).
pub const EXIT_NO_SUCH_PROJECT: u8 = 4;

/// Prefix of this interface's own D-Bus error names.
pub const DBUS_ERROR_PREFIX: &str = "com.cocalc.ProjectHost1.Error.";

/// Every kind of error the API answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The id is not a lowercase UUID.
    InvalidProjectId,
    /// A query parameter is not valid (`lines`, `since`, `follow`, `Last-Event-ID`).
    InvalidQuery,
    /// The run config or a limit is not acceptable (the core's validation).
    InvalidConfig,
    /// The JSON body (or a D-Bus JSON argument) is malformed, of the wrong shape or has an
    /// unknown field.
    InvalidBody,
    /// The body could not be read.
    BadBody,
    /// The body is larger than the API takes.
    BodyTooLarge,
    /// The body did not arrive in time.
    BodyTimeout,
    /// The snapshot name is not valid or is reserved.
    InvalidSnapshotName,
    /// No such project on this host.
    NoSuchProject,
    /// No such snapshot.
    NoSuchSnapshot,
    /// A snapshot of that name exists.
    SnapshotExists,
    /// The operation needs the project stopped.
    ProjectRunning,
    /// The image is not a plain reference the host allows.
    ImageNotAllowed,
    /// The project could not be started.
    StartFailed,
    /// The project could not be stopped.
    StopFailed,
    /// New limits could not be applied; the project keeps its old ones.
    UpdateFailed,
    /// Project storage is not usable.
    StorageUnavailable,
    /// The project storage is below its reserve (`storage.reserve`): no cold starts or quota
    /// raises until space is freed; running projects go on, held at their usage.
    StorageFull,
    /// systemd could not be reached or refused.
    SystemdUnavailable,
    /// The store failed.
    StoreFailed,
    /// No credential, or a malformed one.
    Unauthorized,
    /// The token is not valid here.
    InvalidToken,
    /// The master revoked the token (its `jti` is on the revocation list).
    TokenRevoked,
    /// The revocation list is full (a push would exceed its bound): nothing was revoked.
    RevocationListFull,
    /// The credential does not allow this.
    Forbidden,
    /// A local D-Bus caller that is neither root nor in group `cocalc-project-host` (the
    /// daemon's own check behind the bus policy; never an HTTP answer).
    AccessDenied,
    /// No such endpoint.
    NotFound,
    /// The endpoint does not take this method.
    MethodNotAllowed,
    /// The answer could not be encoded (a bug: never a `200 null`).
    Internal,
    /// An SSH public key list is not acceptable (not OpenSSH public keys, or too many).
    InvalidSshKey,
    /// The project is not running (the proxy needs it running).
    ProjectNotRunning,
    /// Nothing answers on the port inside the project (the proxy's 502).
    BackendUnavailable,
    /// The server inside the project did not answer in time (`proxy.timeout`, the proxy's 504).
    BackendTimeout,
    /// A proxy path that is not one (bad port, `.` or `..` segments, …).
    InvalidPath,
    /// A project file path leads outside the home (a symlink or mount pointing elsewhere).
    PathEscapes,
    /// The file is in a snapshot (read-only).
    ReadOnly,
    /// A directory where the file server wants a file.
    IsDirectory,
    /// A file where the file server wants a directory (also a path component).
    NotDirectory,
    /// Neither a regular file nor a directory (fifo, socket, device): not served.
    NotRegularFile,
    /// The directory to delete is not empty.
    DirectoryNotEmpty,
    /// Something exists at the path already.
    AlreadyExists,
    /// A write of a project's file ran past its disk quota (or the disk is full): nothing was
    /// written.
    QuotaExceeded,
    /// The `Range` asked for lies outside the file.
    RangeNotSatisfiable,
    /// The filesystem refused the operation on a project's file.
    PermissionDenied,
    /// The project's snapshots are locked by a move to another host: it cannot be deleted.
    SnapshotsLocked,
    /// A move was refused or failed: a stream that is not exactly what was announced, a move id
    /// used before, a project the target already has (nothing was placed).
    MoveRejected,
    /// No such operation (`GET`/`DELETE /operations/:op`).
    NoSuchOperation,
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// HTTP status
    pub status: u16,
    /// the JSON `code` (unique per kind)
    pub code: &'static str,
    /// the D-Bus error name: a bare name is under [`DBUS_ERROR_PREFIX`], a dotted one is full
    pub dbus: &'static str,
    /// the CLI's exit code
    pub exit: u8,
}

impl ErrorKind {
    /// Every kind, for tests and reverse look-ups.
    pub const ALL: [ErrorKind; 47] = [
        ErrorKind::InvalidProjectId,
        ErrorKind::InvalidQuery,
        ErrorKind::InvalidConfig,
        ErrorKind::InvalidBody,
        ErrorKind::BadBody,
        ErrorKind::BodyTooLarge,
        ErrorKind::BodyTimeout,
        ErrorKind::InvalidSnapshotName,
        ErrorKind::NoSuchProject,
        ErrorKind::NoSuchSnapshot,
        ErrorKind::SnapshotExists,
        ErrorKind::ProjectRunning,
        ErrorKind::ImageNotAllowed,
        ErrorKind::StartFailed,
        ErrorKind::StopFailed,
        ErrorKind::UpdateFailed,
        ErrorKind::StorageUnavailable,
        ErrorKind::StorageFull,
        ErrorKind::SystemdUnavailable,
        ErrorKind::StoreFailed,
        ErrorKind::Unauthorized,
        ErrorKind::InvalidToken,
        ErrorKind::TokenRevoked,
        ErrorKind::RevocationListFull,
        ErrorKind::Forbidden,
        ErrorKind::AccessDenied,
        ErrorKind::NotFound,
        ErrorKind::MethodNotAllowed,
        ErrorKind::Internal,
        ErrorKind::InvalidSshKey,
        ErrorKind::ProjectNotRunning,
        ErrorKind::BackendUnavailable,
        ErrorKind::BackendTimeout,
        ErrorKind::InvalidPath,
        ErrorKind::PathEscapes,
        ErrorKind::ReadOnly,
        ErrorKind::IsDirectory,
        ErrorKind::NotDirectory,
        ErrorKind::NotRegularFile,
        ErrorKind::DirectoryNotEmpty,
        ErrorKind::AlreadyExists,
        ErrorKind::QuotaExceeded,
        ErrorKind::RangeNotSatisfiable,
        ErrorKind::PermissionDenied,
        ErrorKind::SnapshotsLocked,
        ErrorKind::MoveRejected,
        ErrorKind::NoSuchOperation,
    ];

    /// The table.
    pub const fn row(self) -> Row {
        use ErrorKind as K;
        const fn r(status: u16, code: &'static str, dbus: &'static str, exit: u8) -> Row {
            Row {
                status,
                code,
                dbus,
                exit,
            }
        }
        const DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";
        const UNKNOWN: &str = "org.freedesktop.DBus.Error.UnknownMethod";
        match self {
            K::InvalidProjectId => r(400, "invalid_project_id", "InvalidProjectId", EXIT_USAGE),
            K::InvalidQuery => r(400, "invalid_query", "InvalidConfig", EXIT_USAGE),
            K::InvalidConfig => r(400, "invalid_config", "InvalidConfig", EXIT_USAGE),
            K::InvalidBody => r(400, "invalid_body", "InvalidConfig", EXIT_USAGE),
            K::BadBody => r(400, "bad_body", "Failed", EXIT_FAILURE),
            K::BodyTooLarge => r(
                413,
                "body_too_large",
                "org.freedesktop.DBus.Error.LimitsExceeded",
                EXIT_FAILURE,
            ),
            K::BodyTimeout => r(
                408,
                "body_timeout",
                "org.freedesktop.DBus.Error.Timeout",
                EXIT_FAILURE,
            ),
            K::InvalidSnapshotName => r(
                400,
                "invalid_snapshot_name",
                "InvalidSnapshotName",
                EXIT_USAGE,
            ),
            K::NoSuchProject => r(404, "no_such_project", "NotFound", EXIT_NO_SUCH_PROJECT),
            K::NoSuchSnapshot => r(
                404,
                "no_such_snapshot",
                "NoSuchSnapshot",
                EXIT_NO_SUCH_PROJECT,
            ),
            K::SnapshotExists => r(409, "snapshot_exists", "SnapshotExists", EXIT_FAILURE),
            K::ProjectRunning => r(409, "project_running", "ProjectRunning", EXIT_FAILURE),
            K::ImageNotAllowed => r(400, "image_not_allowed", "ImageNotAllowed", EXIT_USAGE),
            K::StartFailed => r(500, "start_failed", "StartFailed", EXIT_FAILURE),
            K::StopFailed => r(500, "stop_failed", "StopFailed", EXIT_FAILURE),
            K::UpdateFailed => r(500, "update_failed", "UpdateFailed", EXIT_FAILURE),
            K::StorageUnavailable => r(503, "storage_unavailable", "Unavailable", EXIT_FAILURE),
            K::StorageFull => r(507, "storage_full", "StorageFull", EXIT_FAILURE),
            K::SystemdUnavailable => r(503, "systemd_unavailable", "Unavailable", EXIT_FAILURE),
            K::StoreFailed => r(500, "store_failed", "Failed", EXIT_FAILURE),
            K::Unauthorized => r(401, "unauthorized", DENIED, EXIT_FAILURE),
            K::InvalidToken => r(401, "invalid_token", DENIED, EXIT_FAILURE),
            K::TokenRevoked => r(401, "token_revoked", DENIED, EXIT_FAILURE),
            K::RevocationListFull => r(507, "revocation_list_full", "Failed", EXIT_FAILURE),
            K::Forbidden => r(403, "forbidden", DENIED, EXIT_FAILURE),
            K::AccessDenied => r(403, "access_denied", "AccessDenied", EXIT_FAILURE),
            K::NotFound => r(404, "not_found", UNKNOWN, EXIT_FAILURE),
            K::MethodNotAllowed => r(405, "method_not_allowed", UNKNOWN, EXIT_FAILURE),
            K::Internal => r(500, "internal", "Failed", EXIT_FAILURE),
            K::InvalidSshKey => r(400, "invalid_ssh_key", "InvalidConfig", EXIT_USAGE),
            K::ProjectNotRunning => r(503, "project_not_running", "Unavailable", EXIT_FAILURE),
            K::BackendUnavailable => r(502, "backend_unavailable", "Failed", EXIT_FAILURE),
            K::BackendTimeout => r(
                504,
                "backend_timeout",
                "org.freedesktop.DBus.Error.Timeout",
                EXIT_FAILURE,
            ),
            K::InvalidPath => r(400, "invalid_path", "Failed", EXIT_FAILURE),
            K::PathEscapes => r(403, "path_escapes", DENIED, EXIT_FAILURE),
            K::ReadOnly => r(403, "read_only", DENIED, EXIT_FAILURE),
            K::IsDirectory => r(409, "is_directory", "Failed", EXIT_FAILURE),
            K::NotDirectory => r(409, "not_directory", "Failed", EXIT_FAILURE),
            K::NotRegularFile => r(403, "not_regular_file", DENIED, EXIT_FAILURE),
            K::DirectoryNotEmpty => r(409, "directory_not_empty", "Failed", EXIT_FAILURE),
            K::AlreadyExists => r(409, "already_exists", "Failed", EXIT_FAILURE),
            K::QuotaExceeded => r(507, "quota_exceeded", "Failed", EXIT_FAILURE),
            K::RangeNotSatisfiable => r(416, "range_not_satisfiable", "Failed", EXIT_FAILURE),
            K::PermissionDenied => r(403, "permission_denied", DENIED, EXIT_FAILURE),
            K::SnapshotsLocked => r(409, "snapshots_locked", "SnapshotsLocked", EXIT_FAILURE),
            K::MoveRejected => r(409, "move_rejected", "Failed", EXIT_FAILURE),
            K::NoSuchOperation => r(404, "no_such_operation", "NotFound", EXIT_NO_SUCH_PROJECT),
        }
    }

    /// HTTP status.
    pub fn status(self) -> u16 {
        self.row().status
    }

    /// The JSON `code`.
    pub fn code(self) -> &'static str {
        self.row().code
    }

    /// The full D-Bus error name.
    pub fn dbus_name(self) -> String {
        let n = self.row().dbus;
        if n.contains('.') {
            n.to_string()
        } else {
            format!("{DBUS_ERROR_PREFIX}{n}")
        }
    }

    /// The CLI's exit code.
    pub fn exit_code(self) -> u8 {
        self.row().exit
    }

    /// The kind a D-Bus error name stands for (kinds sharing a name share an exit code; a
    /// unit test keeps it so). `None` for names not in the table.
    pub fn from_dbus_name(name: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.dbus_name() == name)
    }

    /// The kind of a JSON `code`.
    pub fn from_code(code: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.code() == code)
    }
}

/// An error answer: its kind (which decides status, name and exit code) and a one-line message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct WireError {
    /// what kind of failure
    pub kind: ErrorKind,
    /// one line for a person
    pub message: String,
}

impl WireError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> WireError {
        WireError {
            kind,
            message: message.into(),
        }
    }
}

impl From<core::Error> for WireError {
    fn from(e: core::Error) -> WireError {
        use core::Error as E;
        let kind = match &e {
            E::InvalidProjectId(_) => ErrorKind::InvalidProjectId,
            E::InvalidConfig(_) => ErrorKind::InvalidConfig,
            E::StartFailed { .. } => ErrorKind::StartFailed,
            E::StopFailed { .. } => ErrorKind::StopFailed,
            E::UpdateFailed { .. } => ErrorKind::UpdateFailed,
            E::Storage(_) => ErrorKind::StorageUnavailable,
            E::Systemd(_) => ErrorKind::SystemdUnavailable,
            E::Store(_) => ErrorKind::StoreFailed,
            E::NoSuchProject(_) => ErrorKind::NoSuchProject,
            E::InvalidSnapshotName(_) | E::ReservedSnapshotName(_) => {
                ErrorKind::InvalidSnapshotName
            }
            E::NoSuchSnapshot { .. } => ErrorKind::NoSuchSnapshot,
            E::SnapshotExists { .. } => ErrorKind::SnapshotExists,
            E::ProjectRunning(_) => ErrorKind::ProjectRunning,
            E::StorageFull { .. } => ErrorKind::StorageFull,
            E::ImageNotAllowed(_) => ErrorKind::ImageNotAllowed,
            E::InvalidSshKey(_) => ErrorKind::InvalidSshKey,
            E::ProjectNotRunning(_) => ErrorKind::ProjectNotRunning,
            E::BackendUnavailable { .. } => ErrorKind::BackendUnavailable,
            E::SnapshotsLocked(_) => ErrorKind::SnapshotsLocked,
            E::Journal { .. } => ErrorKind::SystemdUnavailable,
            E::MoveRejected(_) => ErrorKind::MoveRejected,
            E::NoSuchOperation(_) => ErrorKind::NoSuchOperation,
        };
        WireError::new(kind, e.to_string())
    }
}

impl From<crate::domain::project::InvalidProjectId> for WireError {
    fn from(e: crate::domain::project::InvalidProjectId) -> WireError {
        WireError::new(ErrorKind::InvalidProjectId, e.to_string())
    }
}

impl From<crate::domain::snapshots::InvalidSnapshotName> for WireError {
    fn from(e: crate::domain::snapshots::InvalidSnapshotName) -> WireError {
        WireError::new(ErrorKind::InvalidSnapshotName, e.to_string())
    }
}

impl From<crate::backends::safefs::FsError> for WireError {
    fn from(e: crate::backends::safefs::FsError) -> WireError {
        use crate::backends::safefs::FsError as F;
        let kind = match &e {
            F::InvalidPath(_) => ErrorKind::InvalidPath,
            F::NotFound => ErrorKind::NotFound,
            F::Escapes => ErrorKind::PathEscapes,
            F::ReadOnly => ErrorKind::ReadOnly,
            F::IsDirectory => ErrorKind::IsDirectory,
            F::NotDirectory => ErrorKind::NotDirectory,
            F::NotRegular => ErrorKind::NotRegularFile,
            F::NotEmpty => ErrorKind::DirectoryNotEmpty,
            F::Exists => ErrorKind::AlreadyExists,
            F::QuotaExceeded => ErrorKind::QuotaExceeded,
            F::PermissionDenied => ErrorKind::PermissionDenied,
            F::Io(_) => ErrorKind::Internal,
        };
        WireError::new(kind, e.to_string())
    }
}

impl From<crate::auth::Denied> for WireError {
    fn from(e: crate::auth::Denied) -> WireError {
        let kind = match e {
            crate::auth::Denied::Missing | crate::auth::Denied::Malformed(_) => {
                ErrorKind::Unauthorized
            }
            crate::auth::Denied::Invalid(_) => ErrorKind::InvalidToken,
            crate::auth::Denied::Revoked => ErrorKind::TokenRevoked,
        };
        WireError::new(kind, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    #[test]
    fn every_kind_has_a_status_a_unique_code_a_bus_name_and_an_exit_code() {
        let mut codes = HashSet::new();
        for k in ErrorKind::ALL {
            let r = k.row();
            assert!((400..600).contains(&r.status), "{k:?}");
            assert!(codes.insert(r.code), "code {} used twice", r.code);
            assert!(
                r.code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{k:?}"
            );
            assert!(
                [EXIT_FAILURE, EXIT_USAGE, EXIT_NO_SUCH_PROJECT].contains(&r.exit),
                "{k:?}"
            );
            let name = k.dbus_name();
            assert!(
                zbus::names::ErrorName::try_from(name.as_str()).is_ok(),
                "{name}"
            );
            assert_eq!(ErrorKind::from_code(r.code), Some(k));
            // bad input is the caller's (4xx), never a server error
            if r.exit == EXIT_USAGE {
                assert_eq!(r.status, 400, "{k:?}");
            }
        }
        assert_eq!(codes.len(), ErrorKind::ALL.len());
    }

    #[test]
    fn kinds_sharing_a_bus_name_share_an_exit_code() {
        let mut by_name: HashMap<String, u8> = HashMap::new();
        for k in ErrorKind::ALL {
            let e = *by_name.entry(k.dbus_name()).or_insert(k.exit_code());
            assert_eq!(e, k.exit_code(), "{k:?}");
            let back = ErrorKind::from_dbus_name(&k.dbus_name()).unwrap();
            assert_eq!(back.exit_code(), k.exit_code());
        }
        assert_eq!(ErrorKind::from_dbus_name("org.example.Nope"), None);
    }

    /// The bus names clients have seen since the first release stay (plus StorageFull and
    /// AccessDenied, new with the storage reserve and the D-Bus readers' check, and
    /// SnapshotsLocked, new with the master's deletes).
    #[test]
    fn bus_names_are_the_published_ones() {
        let ours: HashSet<String> = ErrorKind::ALL
            .iter()
            .map(|k| k.row().dbus)
            .filter(|n| !n.contains('.'))
            .map(str::to_string)
            .collect();
        let published: HashSet<String> = [
            "InvalidProjectId",
            "InvalidConfig",
            "NotFound",
            "StartFailed",
            "StopFailed",
            "UpdateFailed",
            "InvalidSnapshotName",
            "NoSuchSnapshot",
            "SnapshotExists",
            "ProjectRunning",
            "ImageNotAllowed",
            "Unavailable",
            "StorageFull",
            "AccessDenied",
            "Failed",
            "SnapshotsLocked",
        ]
        .map(str::to_string)
        .into();
        assert_eq!(ours, published);
    }

    #[test]
    fn file_errors_keep_their_codes() {
        use crate::backends::safefs::FsError as F;
        for e in [
            F::InvalidPath("x"),
            F::NotFound,
            F::Escapes,
            F::ReadOnly,
            F::IsDirectory,
            F::NotDirectory,
            F::NotRegular,
            F::NotEmpty,
            F::Exists,
            F::QuotaExceeded,
            F::PermissionDenied,
            F::Io(std::io::Error::other("x")),
        ] {
            let code = e.code();
            let w = WireError::from(e);
            assert_eq!(w.kind.code(), code);
            // bad paths and refusals are the caller's; only an unexpected I/O error is a 500
            assert!(w.kind.status() < 500 || code == "internal" || code == "quota_exceeded");
        }
    }

    #[test]
    fn core_errors_keep_their_codes() {
        let id: crate::domain::project::ProjectId =
            "6f1c2d3e-0000-4000-8000-000000000001".parse().unwrap();
        for e in [
            core::Error::NoSuchProject(id),
            core::Error::ProjectRunning(id),
            core::Error::ImageNotAllowed(crate::domain::images::ImageError::NotAllowed("x".into())),
            core::Error::StopFailed {
                id,
                reason: "x".into(),
            },
            core::Error::StorageFull {
                free: 1,
                reserve: 2,
            },
            core::Error::InvalidSshKey(crate::domain::ssh_keys::KeyError::TooMany(1001)),
        ] {
            let code = e.code();
            assert_eq!(WireError::from(e).kind.code(), code);
        }
        for d in [
            crate::auth::Denied::Missing,
            crate::auth::Denied::Malformed("x"),
            crate::auth::Denied::Invalid("x".into()),
            crate::auth::Denied::Revoked,
        ] {
            let code = d.code();
            assert_eq!(WireError::from(d).kind.code(), code);
        }
        let e: WireError = "X"
            .parse::<crate::domain::project::ProjectId>()
            .unwrap_err()
            .into();
        assert_eq!(e.kind, ErrorKind::InvalidProjectId);
    }
}
