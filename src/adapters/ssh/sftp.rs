//! `subsystem sftp`: not served yet (see the module doc of `adapters::ssh`).
use std::sync::Arc;

use russh::server::{Handle, Msg};
use russh::{ChannelReadHalf, ChannelWriteHalf};

use super::Ctx;
use crate::domain::project::ProjectId;

/// Refuses the subsystem with a message.
pub async fn run(
    _rd: ChannelReadHalf,
    wr: ChannelWriteHalf<Msg>,
    handle: Handle,
    _ctx: Arc<Ctx>,
    _id: ProjectId,
) {
    let chid = wr.id();
    super::session::refuse(&wr, &handle, chid, "sftp is not available on this host").await;
}
