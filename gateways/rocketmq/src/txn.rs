//! Transactional messages: refused until the core's staged transactions are wired in.

use std::sync::Arc;

use bytes::Bytes;

use crate::Gateway;
use crate::conn::{ConnState, Refusal, Reply};
use crate::frame::Command;
use crate::send::SendHeader;

#[allow(clippy::too_many_arguments)]
pub(crate) async fn stage_half_message(
    _gw: &Gateway,
    _conn: &Arc<ConnState>,
    _cmd: &Command,
    _h: &SendHeader,
    _queue_id: u32,
    _body: Bytes,
    _due: Option<i64>,
    _create: Option<u32>,
) -> Reply {
    Err(Refusal::system(
        "transactional messages are not supported yet",
    ))
}

pub(crate) async fn end_transaction(_gw: &Gateway, _cmd: &Command) -> Reply {
    Err(Refusal::system(
        "transactional messages are not supported yet",
    ))
}

pub(crate) async fn check_back(_gw: &Gateway) {}
