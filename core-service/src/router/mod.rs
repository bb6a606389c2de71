//! The router: publishes to an address reach the queues and streams bound to it.
//!
//! The default address (the empty name) routes by routing key to the queue of that name,
//! as AMQP's default exchange and SQS's queue URLs do.

use tributary_proto::v1;

use crate::error::{CoreError, CoreResult};
use crate::queues::EnqueueMode;
use crate::{Core, streams::namespace_or_default};

impl Core {
    pub async fn publish(&self, req: v1::PublishRequest) -> CoreResult<v1::PublishResponse> {
        self.check_running()?;
        if !req.transaction_id.is_empty() {
            return Err(CoreError::Unsupported("transactional publish".into()));
        }
        if req.records.is_empty() {
            return Err(CoreError::InvalidArgument("a publish needs records".into()));
        }
        let ns = namespace_or_default(&req.namespace).to_string();
        self.require_namespace(&ns)?;
        if !req.address.is_empty() {
            return Err(CoreError::Unsupported(format!(
                "publishing to address '{}' (only the default address \"\" routes yet)",
                req.address.escape_debug()
            )));
        }
        let n = req.records.len();
        let queue = v1::QueueId {
            namespace: ns,
            name: req.routing_key.clone(),
        };
        let Ok(h) = self.queue(&queue) else {
            if req.mandatory {
                return Err(CoreError::QueueNotFound(req.routing_key));
            }
            return Ok(v1::PublishResponse { routed: vec![0; n] });
        };
        let resp = self
            .enqueue_records(&h, req.records, EnqueueMode::Client, None)
            .await?;
        Ok(v1::PublishResponse {
            routed: resp.duplicate.iter().map(|d| u32::from(!d)).collect(),
        })
    }
}
