//! Connections into running projects (the proxy's backends, SSH's `-L`): the core checks the
//! project runs and touches it; the backend makes the connection inside its network namespace.
use std::time::Duration;

use super::{Error, Host, ProjectStream};
use crate::domain::project::{ProjectId, ProjectState};

/// How long a connection to a project's port may take: on loopback it is at once or refused, so
/// anything longer is a backend too busy to take it (the proxy answers 502 within this).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(900);

impl Host {
    /// Connects to `127.0.0.1:port` inside the running project's network namespace (it works
    /// with `network: none`; no container address or published port is involved).
    /// `ProjectNotRunning` when it is not running, `BackendUnavailable` when nothing answers.
    ///
    /// A frozen project is thawed first (the client only sees the thaw's latency); the stream's
    /// bytes count as the project's activity, and while it is open the project is not stopped
    /// for being idle (`core::idle`).
    pub async fn connect_port(&self, id: ProjectId, port: u16) -> Result<ProjectStream, Error> {
        if self.is_known(id) {
            // traffic into a project is use of it (recorded before the freezer is looked at)
            self.thaw_if_frozen(id).await?;
        }
        let main_pid = {
            let map = self.read_entries();
            map.get(&id)
                .filter(|e| e.state() == ProjectState::Running)
                .and_then(|e| e.unit.as_ref())
                .map(|u| u.main_pid)
                .filter(|p| *p != 0)
        };
        let Some(main_pid) = main_pid else {
            return Err(Error::ProjectNotRunning(id));
        };
        self.touch(id);
        let s = self
            .units
            .connect(id, main_pid, port, CONNECT_TIMEOUT)
            .await
            .map_err(|e| Error::BackendUnavailable {
                id,
                port,
                reason: e.to_string(),
            })?;
        Ok(self.project_stream(id, s))
    }

    /// Whether the project runs now (frozen or not: a connection into it thaws it).
    pub fn is_running(&self, id: ProjectId) -> bool {
        self.read_entries()
            .get(&id)
            .is_some_and(|e| e.state().is_up())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::sim::Sim;
    use crate::config::Settings;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn id(n: u32) -> ProjectId {
        format!("6f1c2d3e-0000-4000-8000-{n:012x}")
            .parse()
            .expect("a valid id")
    }

    #[tokio::test]
    async fn connects_only_into_a_running_project_and_forgets_it_on_stop() {
        let sim = Sim::new();
        let h = Host::with_backends(Settings::default(), sim.backends())
            .await
            .expect("host");
        let p = id(7);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        sim.units.listen(p, 8000, l.local_addr().unwrap());
        let e = h.connect_port(p, 8000).await.unwrap_err();
        assert!(matches!(e, Error::ProjectNotRunning(x) if x == p), "{e}");
        h.start(p, None).await.expect("start");
        let mut c = h.connect_port(p, 8000).await.expect("connect");
        let (mut s, _) = l.accept().await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        let e = h.connect_port(p, 8001).await.unwrap_err();
        assert_eq!(e.code(), "backend_unavailable", "{e}");
        h.stop(p, false).await.expect("stop");
        assert!(sim.units.forgotten.lock().unwrap().contains(&p));
        let e = h.connect_port(p, 8000).await.unwrap_err();
        assert_eq!(e.code(), "project_not_running");
    }
}
