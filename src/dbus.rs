//! The D-Bus interface `com.cocalc.ProjectHost1` on the system bus: a thin adapter over [`Host`].
use std::sync::Arc;

use zbus::Connection;

use crate::host::Host;

/// Well-known bus name.
pub const BUS_NAME: &str = "com.cocalc.ProjectHost1";
/// Path of the manager object.
pub const MANAGER_PATH: &str = "/com/cocalc/ProjectHost1";

/// `com.cocalc.ProjectHost1.Manager` on [`MANAGER_PATH`].
#[derive(Debug)]
pub struct Manager {
    host: Arc<Host>,
}

#[zbus::interface(name = "com.cocalc.ProjectHost1.Manager")]
impl Manager {
    /// Version of the daemon.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    /// This host's id.
    #[zbus(property(emits_changed_signal = "const"))]
    fn host_id(&self) -> String {
        self.host.host_id().to_string()
    }
}

/// Connects to the system bus, exports the objects and takes the bus name.
pub async fn serve(host: Arc<Host>) -> zbus::Result<Connection> {
    zbus::connection::Builder::system()
        .serve_at(MANAGER_PATH, Manager { host })
        .name(BUS_NAME)
        .build()
        .await
}
