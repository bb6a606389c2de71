//! The gRPC face of the core: thin handlers that turn requests into [`Core`] calls.
//!
//! [`routes`] is the whole API as one tower service. The standalone server hands that same
//! service to in-process clients as their transport, so gateways run identical code paths
//! whether the core is across the network or in the same process.

use std::collections::BTreeMap;
use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::service::Routes;
use tonic::{Request, Response, Status, Streaming};
use tributary_proto::v1::*;

use crate::Core;
use crate::error::CoreError;
use crate::meta::StreamSettings;

/// Largest gRPC message either way: big enough for a fetch of many partitions.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

#[derive(Clone)]
pub struct CoreGrpc {
    core: Core,
}

/// Every service of the API, ready to serve over HTTP/2 or to use in-process.
pub fn routes(core: Core) -> Routes {
    let svc = CoreGrpc { core };
    macro_rules! server {
        ($server:ty) => {
            <$server>::new(svc.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
        };
    }
    Routes::new(server!(admin_server::AdminServer<CoreGrpc>))
        .add_service(server!(streams_server::StreamsServer<CoreGrpc>))
        .add_service(server!(offsets_server::OffsetsServer<CoreGrpc>))
        .add_service(server!(groups_server::GroupsServer<CoreGrpc>))
        .add_service(server!(queues_server::QueuesServer<CoreGrpc>))
        .add_service(server!(sessions_server::SessionsServer<CoreGrpc>))
        .add_service(server!(timers_server::TimersServer<CoreGrpc>))
        .add_service(server!(transactions_server::TransactionsServer<CoreGrpc>))
        .add_service(cluster_server::ClusterServer::new(svc.clone()))
}

type GrpcResult<T> = Result<Response<T>, Status>;

fn ok<T>(v: T) -> GrpcResult<T> {
    Ok(Response::new(v))
}

fn unsupported<T>(what: &str) -> GrpcResult<T> {
    Err(CoreError::Unsupported(what.into()).into())
}

fn required<T>(v: Option<T>, what: &str) -> Result<T, Status> {
    v.ok_or_else(|| CoreError::InvalidArgument(format!("{what} is required")).into())
}

#[tonic::async_trait]
impl admin_server::Admin for CoreGrpc {
    async fn create_namespace(
        &self,
        r: Request<CreateNamespaceRequest>,
    ) -> GrpcResult<CreateNamespaceResponse> {
        let r = r.into_inner();
        let labels: BTreeMap<_, _> = r.labels.into_iter().collect();
        let (ns, created) = self
            .core
            .create_namespace(&r.name, labels, r.if_not_exists)
            .await?;
        ok(CreateNamespaceResponse {
            namespace: Some(ns.to_proto()),
            created,
        })
    }
    async fn delete_namespace(
        &self,
        r: Request<DeleteNamespaceRequest>,
    ) -> GrpcResult<DeleteNamespaceResponse> {
        self.core.delete_namespace(&r.into_inner().name).await?;
        ok(DeleteNamespaceResponse {})
    }
    async fn list_namespaces(
        &self,
        _: Request<ListNamespacesRequest>,
    ) -> GrpcResult<ListNamespacesResponse> {
        ok(ListNamespacesResponse {
            namespaces: self
                .core
                .list_all_namespaces()
                .await?
                .iter()
                .map(|n| n.to_proto())
                .collect(),
        })
    }
    async fn create_stream(
        &self,
        r: Request<CreateStreamRequest>,
    ) -> GrpcResult<CreateStreamResponse> {
        let r = r.into_inner();
        let id = required(r.id, "id")?;
        let settings = r
            .config
            .as_ref()
            .map(StreamSettings::from_proto)
            .unwrap_or_default();
        let (stream, created) = self
            .core
            .create_stream(id, r.partitions, settings, r.if_not_exists, r.validate_only)
            .await?;
        ok(CreateStreamResponse {
            stream: Some(stream),
            created,
        })
    }
    async fn delete_stream(
        &self,
        r: Request<DeleteStreamRequest>,
    ) -> GrpcResult<DeleteStreamResponse> {
        self.core
            .delete_stream(&required(r.into_inner().id, "id")?)
            .await?;
        ok(DeleteStreamResponse {})
    }
    async fn list_streams(
        &self,
        r: Request<ListStreamsRequest>,
    ) -> GrpcResult<ListStreamsResponse> {
        ok(ListStreamsResponse {
            streams: self.core.list_streams(&r.into_inner().namespace).await?,
        })
    }
    async fn describe_stream(
        &self,
        r: Request<DescribeStreamRequest>,
    ) -> GrpcResult<DescribeStreamResponse> {
        let stream = self
            .core
            .describe_stream(&required(r.into_inner().id, "id")?)
            .await?;
        ok(DescribeStreamResponse {
            stream: Some(stream),
        })
    }
    async fn create_partitions(
        &self,
        r: Request<CreatePartitionsRequest>,
    ) -> GrpcResult<CreatePartitionsResponse> {
        let r = r.into_inner();
        let stream = self
            .core
            .create_partitions(&required(r.id, "id")?, r.total_partitions, r.validate_only)
            .await?;
        ok(CreatePartitionsResponse {
            stream: Some(stream),
        })
    }
    async fn update_stream_config(
        &self,
        r: Request<UpdateStreamConfigRequest>,
    ) -> GrpcResult<UpdateStreamConfigResponse> {
        let r = r.into_inner();
        let set = r
            .set
            .as_ref()
            .map(StreamSettings::from_proto)
            .unwrap_or_default();
        let stream = self
            .core
            .update_stream_config(&required(r.id, "id")?, set, &r.reset, r.validate_only)
            .await?;
        ok(UpdateStreamConfigResponse {
            stream: Some(stream),
        })
    }
    async fn delete_records(
        &self,
        r: Request<DeleteRecordsRequest>,
    ) -> GrpcResult<DeleteRecordsResponse> {
        let r = r.into_inner();
        let start = self
            .core
            .delete_records(&required(r.id, "id")?, r.partition, r.before_offset)
            .await?;
        ok(DeleteRecordsResponse {
            start_offset: start,
        })
    }
    async fn declare_queue(
        &self,
        r: Request<DeclareQueueRequest>,
    ) -> GrpcResult<DeclareQueueResponse> {
        let (queue, created) = self.core.declare_queue(r.into_inner()).await?;
        ok(DeclareQueueResponse {
            queue: Some(queue),
            created,
        })
    }
    async fn delete_queue(
        &self,
        r: Request<DeleteQueueRequest>,
    ) -> GrpcResult<DeleteQueueResponse> {
        ok(DeleteQueueResponse {
            messages_deleted: self.core.delete_queue(r.into_inner()).await?,
        })
    }
    async fn update_queue(
        &self,
        r: Request<UpdateQueueRequest>,
    ) -> GrpcResult<UpdateQueueResponse> {
        let r = r.into_inner();
        let id = required(r.id, "id")?;
        ok(UpdateQueueResponse {
            queue: Some(
                self.core
                    .update_queue(&id, &r.config.unwrap_or_default())
                    .await?,
            ),
        })
    }
    async fn purge_queue(&self, r: Request<PurgeQueueRequest>) -> GrpcResult<PurgeQueueResponse> {
        let id = required(r.into_inner().id, "id")?;
        ok(PurgeQueueResponse {
            messages_purged: self.core.purge_queue(&id).await?,
        })
    }
    async fn list_queues(&self, r: Request<ListQueuesRequest>) -> GrpcResult<ListQueuesResponse> {
        ok(ListQueuesResponse {
            queues: self.core.list_queues(&r.into_inner().namespace).await?,
        })
    }
    async fn declare_address(
        &self,
        r: Request<DeclareAddressRequest>,
    ) -> GrpcResult<DeclareAddressResponse> {
        ok(self.core.declare_address(r.into_inner()).await?)
    }
    async fn delete_address(
        &self,
        r: Request<DeleteAddressRequest>,
    ) -> GrpcResult<DeleteAddressResponse> {
        let r = r.into_inner();
        self.core
            .delete_address(&r.namespace, &r.name, r.if_unused)
            .await?;
        ok(DeleteAddressResponse {})
    }
    async fn bind(&self, r: Request<BindRequest>) -> GrpcResult<BindResponse> {
        let binding = required(r.into_inner().binding, "binding")?;
        self.core.bind(binding).await?;
        ok(BindResponse {})
    }
    async fn unbind(&self, r: Request<UnbindRequest>) -> GrpcResult<UnbindResponse> {
        let binding = required(r.into_inner().binding, "binding")?;
        self.core.unbind(binding).await?;
        ok(UnbindResponse {})
    }
    async fn list_bindings(
        &self,
        r: Request<ListBindingsRequest>,
    ) -> GrpcResult<ListBindingsResponse> {
        let r = r.into_inner();
        ok(ListBindingsResponse {
            bindings: self.core.list_bindings(&r.namespace, &r.source_address),
        })
    }
    async fn list_addresses(
        &self,
        r: Request<ListAddressesRequest>,
    ) -> GrpcResult<ListAddressesResponse> {
        let namespace = r.into_inner().namespace;
        ok(ListAddressesResponse {
            addresses: self
                .core
                .list_addresses(&namespace)
                .into_iter()
                .map(|a| AddressInfo {
                    namespace: a.namespace,
                    name: a.name,
                    kind: a.kind as i32,
                    durable: a.durable,
                    auto_delete: a.auto_delete,
                    internal: a.internal,
                    arguments: a.arguments.into_iter().collect(),
                })
                .collect(),
        })
    }
    async fn list_groups(&self, r: Request<ListGroupsRequest>) -> GrpcResult<ListGroupsResponse> {
        ok(ListGroupsResponse {
            groups: self.core.list_groups(&r.into_inner().namespace).await?,
        })
    }
    async fn delete_group(
        &self,
        r: Request<DeleteGroupRequest>,
    ) -> GrpcResult<DeleteGroupResponse> {
        let r = r.into_inner();
        self.core.delete_group(&r.namespace, &r.group).await?;
        ok(DeleteGroupResponse {})
    }
    async fn create_access_rules(
        &self,
        r: Request<CreateAccessRulesRequest>,
    ) -> GrpcResult<CreateAccessRulesResponse> {
        let r = r.into_inner();
        let (version, created) = self
            .core
            .create_access_rules(&r.namespace, &r.rules)
            .await?;
        ok(CreateAccessRulesResponse { version, created })
    }
    async fn delete_access_rules(
        &self,
        r: Request<DeleteAccessRulesRequest>,
    ) -> GrpcResult<DeleteAccessRulesResponse> {
        let r = r.into_inner();
        let (deleted, version) = self
            .core
            .delete_access_rules(&r.namespace, &r.rules)
            .await?;
        ok(DeleteAccessRulesResponse { deleted, version })
    }
    async fn list_sessions(
        &self,
        r: Request<ListSessionsRequest>,
    ) -> GrpcResult<ListSessionsResponse> {
        let ns = r.into_inner().namespace;
        let sessions = self
            .core
            .list_sessions()
            .into_iter()
            .filter(|s| ns.is_empty() || s.namespace == ns)
            .map(|s| SessionInfo {
                namespace: s.namespace,
                client_id: s.client_id,
                connected: s.connected,
                expiry_ms: s.expiry_ms,
                subscriptions: s.subscriptions,
                inflight: s.inflight as u64,
                queued: s.queued as u64,
            })
            .collect();
        ok(ListSessionsResponse { sessions })
    }

    async fn kick_session(
        &self,
        r: Request<KickSessionRequest>,
    ) -> GrpcResult<KickSessionResponse> {
        let r = r.into_inner();
        let was_connected = self.core.kick_session(&r.namespace, &r.client_id)?;
        ok(KickSessionResponse { was_connected })
    }

    async fn put_user(&self, r: Request<PutUserRequest>) -> GrpcResult<PutUserResponse> {
        let (version, created) = self.core.put_user(&r.into_inner()).await?;
        ok(PutUserResponse { version, created })
    }

    async fn delete_user(&self, r: Request<DeleteUserRequest>) -> GrpcResult<DeleteUserResponse> {
        let r = r.into_inner();
        let version = self.core.delete_user(&r.name, &r.only_mechanisms).await?;
        ok(DeleteUserResponse { version })
    }

    async fn list_users(&self, r: Request<ListUsersRequest>) -> GrpcResult<ListUsersResponse> {
        let r = r.into_inner();
        let (version, users) = self
            .core
            .list_users(r.known_version, r.include_credentials)
            .await?;
        ok(ListUsersResponse {
            version,
            unchanged: users.is_none(),
            users: users.unwrap_or_default(),
        })
    }

    async fn list_access_rules(
        &self,
        r: Request<ListAccessRulesRequest>,
    ) -> GrpcResult<ListAccessRulesResponse> {
        let r = r.into_inner();
        let (version, rules) = self
            .core
            .list_access_rules(&r.namespace, r.known_version)
            .await?;
        ok(ListAccessRulesResponse {
            version,
            unchanged: rules.is_none(),
            rules: rules.unwrap_or_default(),
        })
    }
}

#[tonic::async_trait]
impl streams_server::Streams for CoreGrpc {
    async fn append(&self, r: Request<AppendRequest>) -> GrpcResult<AppendResponse> {
        let mut r = r.into_inner();
        if let Some(b) = r.batch.as_mut() {
            // Only the timer service may stamp a timer id (it proves a timer's delivery).
            b.timer_id.clear();
        }
        ok(self.core.append(r).await?)
    }
    async fn wait_durable(
        &self,
        r: Request<WaitDurableRequest>,
    ) -> GrpcResult<WaitDurableResponse> {
        ok(self.core.wait_durable(r.into_inner()).await?)
    }
    async fn fetch(&self, r: Request<FetchRequest>) -> GrpcResult<FetchResponse> {
        ok(self.core.fetch(r.into_inner()).await?)
    }
    async fn list_offsets(
        &self,
        r: Request<ListOffsetsRequest>,
    ) -> GrpcResult<ListOffsetsResponse> {
        ok(self.core.list_offsets(r.into_inner()).await?)
    }
    async fn init_producer(
        &self,
        r: Request<InitProducerRequest>,
    ) -> GrpcResult<InitProducerResponse> {
        ok(self.core.init_producer(r.into_inner()).await?)
    }
    async fn publish(&self, r: Request<PublishRequest>) -> GrpcResult<PublishResponse> {
        ok(self.core.publish(r.into_inner()).await?)
    }
}

#[tonic::async_trait]
impl offsets_server::Offsets for CoreGrpc {
    async fn commit_offsets(
        &self,
        r: Request<CommitOffsetsRequest>,
    ) -> GrpcResult<CommitOffsetsResponse> {
        ok(CommitOffsetsResponse {
            rejected: self.core.commit_offsets(r.into_inner()).await?,
        })
    }
    async fn fetch_offsets(
        &self,
        r: Request<FetchOffsetsRequest>,
    ) -> GrpcResult<FetchOffsetsResponse> {
        let r = r.into_inner();
        let unstable = if r.require_stable {
            self.core.unstable_offsets(&r)
        } else {
            Vec::new()
        };
        ok(FetchOffsetsResponse {
            offsets: self.core.fetch_offsets(r).await?,
            unstable,
        })
    }
}

#[tonic::async_trait]
impl groups_server::Groups for CoreGrpc {
    async fn join_group(&self, r: Request<JoinGroupRequest>) -> GrpcResult<JoinGroupResponse> {
        ok(self.core.join_group(r.into_inner()).await?)
    }
    async fn sync_group(&self, r: Request<SyncGroupRequest>) -> GrpcResult<SyncGroupResponse> {
        ok(self.core.sync_group(r.into_inner()).await?)
    }
    async fn heartbeat(&self, r: Request<HeartbeatRequest>) -> GrpcResult<HeartbeatResponse> {
        ok(self.core.heartbeat(r.get_ref())?)
    }
    async fn leave_group(&self, r: Request<LeaveGroupRequest>) -> GrpcResult<LeaveGroupResponse> {
        ok(self.core.leave_group(r.get_ref()))
    }
    async fn describe_group(
        &self,
        r: Request<DescribeGroupRequest>,
    ) -> GrpcResult<DescribeGroupResponse> {
        let r = r.into_inner();
        ok(self.core.describe_group(&r.namespace, &r.group).await?)
    }
    async fn register_member(
        &self,
        r: Request<RegisterMemberRequest>,
    ) -> GrpcResult<RegisterMemberResponse> {
        ok(self.core.register_member(r.into_inner())?)
    }
    async fn unregister_member(
        &self,
        r: Request<UnregisterMemberRequest>,
    ) -> GrpcResult<UnregisterMemberResponse> {
        ok(self.core.unregister_member(r.get_ref())?)
    }
    async fn list_members(
        &self,
        r: Request<ListMembersRequest>,
    ) -> GrpcResult<ListMembersResponse> {
        ok(self.core.list_members(r.get_ref())?)
    }
}

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<SubscribeEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl queues_server::Queues for CoreGrpc {
    type SubscribeStream = SubscribeStream;
    async fn receive(&self, r: Request<ReceiveRequest>) -> GrpcResult<ReceiveResponse> {
        ok(ReceiveResponse {
            messages: self.core.receive(r.into_inner()).await?,
        })
    }
    async fn ack(&self, r: Request<AckRequest>) -> GrpcResult<AckResponse> {
        let r = r.into_inner();
        let queue = required(r.queue, "queue")?;
        ok(AckResponse {
            expired: self
                .core
                .settle_leases(&queue, &r.lease_ids, !r.no_wait_durable)
                .await?,
        })
    }
    async fn nack(&self, r: Request<NackRequest>) -> GrpcResult<NackResponse> {
        let r = r.into_inner();
        let queue = required(r.queue, "queue")?;
        self.core
            .nack(&queue, &r.lease_ids, r.requeue, r.delay_ms)
            .await?;
        ok(NackResponse {})
    }
    async fn change_lease(
        &self,
        r: Request<ChangeLeaseRequest>,
    ) -> GrpcResult<ChangeLeaseResponse> {
        let r = r.into_inner();
        let queue = required(r.queue, "queue")?;
        self.core
            .change_lease(&queue, &r.lease_ids, r.visibility_timeout_ms)
            .await?;
        ok(ChangeLeaseResponse {})
    }
    async fn enqueue(&self, r: Request<EnqueueRequest>) -> GrpcResult<EnqueueResponse> {
        ok(self.core.enqueue(r.into_inner()).await?)
    }
    async fn start_redrive(
        &self,
        r: Request<StartRedriveRequest>,
    ) -> GrpcResult<StartRedriveResponse> {
        ok(StartRedriveResponse {
            task_id: self.core.start_redrive(r.into_inner()).await?,
        })
    }
    async fn list_redrives(
        &self,
        r: Request<ListRedrivesRequest>,
    ) -> GrpcResult<ListRedrivesResponse> {
        ok(ListRedrivesResponse {
            tasks: self.core.list_redrives(r.into_inner().source.as_ref()),
        })
    }
    async fn cancel_redrive(
        &self,
        r: Request<CancelRedriveRequest>,
    ) -> GrpcResult<CancelRedriveResponse> {
        ok(CancelRedriveResponse {
            task: Some(self.core.cancel_redrive(&r.into_inner().task_id)?),
        })
    }
    async fn subscribe(
        &self,
        r: Request<Streaming<SubscribeRequest>>,
    ) -> GrpcResult<SubscribeStream> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let core = self.core.clone();
        let requests = r.into_inner();
        tokio::spawn(async move { core.run_subscription(requests, tx).await });
        ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

type AttachStream = Pin<Box<dyn Stream<Item = Result<SessionEvent, Status>> + Send>>;

#[tonic::async_trait]
impl sessions_server::Sessions for CoreGrpc {
    type AttachStream = AttachStream;

    async fn attach(&self, req: Request<Streaming<SessionCommand>>) -> GrpcResult<AttachStream> {
        let events = self.core.attach_session(req.into_inner());
        ok(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(events).map(|event| Ok(*event)),
        ))
    }
}

#[tonic::async_trait]
impl timers_server::Timers for CoreGrpc {
    async fn schedule_timer(
        &self,
        r: Request<ScheduleTimerRequest>,
    ) -> GrpcResult<ScheduleTimerResponse> {
        let timer = required(r.into_inner().timer, "timer")?;
        ok(ScheduleTimerResponse {
            id: self.core.schedule_timer(timer).await?,
        })
    }
    async fn cancel_timer(
        &self,
        r: Request<CancelTimerRequest>,
    ) -> GrpcResult<CancelTimerResponse> {
        let r = r.into_inner();
        ok(CancelTimerResponse {
            cancelled: self.core.cancel_timer(&r.namespace, &r.id).await?,
        })
    }
    async fn list_timers(&self, r: Request<ListTimersRequest>) -> GrpcResult<ListTimersResponse> {
        let r = r.into_inner();
        ok(ListTimersResponse {
            timers: self
                .core
                .list_timers(&r.namespace, r.limit as usize)
                .await?,
        })
    }
}

/// A core on its own serves no shards; in shard mode the node answers this itself
/// ([`crate::cluster::shard_router`]) before any shard's core sees the call.
#[tonic::async_trait]
impl cluster_server::Cluster for CoreGrpc {
    async fn describe_shards(
        &self,
        _: Request<DescribeShardsRequest>,
    ) -> GrpcResult<DescribeShardsResponse> {
        ok(DescribeShardsResponse::default())
    }
}

#[tonic::async_trait]
impl transactions_server::Transactions for CoreGrpc {
    async fn begin_transaction(
        &self,
        _: Request<BeginTransactionRequest>,
    ) -> GrpcResult<BeginTransactionResponse> {
        unsupported("BeginTransaction (a transaction begins with AddPartitions or AddGroup)")
    }
    async fn end_transaction(
        &self,
        r: Request<EndTransactionRequest>,
    ) -> GrpcResult<EndTransactionResponse> {
        self.core.end_transaction(r.into_inner()).await?;
        ok(EndTransactionResponse {})
    }
    async fn add_partitions(
        &self,
        r: Request<AddPartitionsRequest>,
    ) -> GrpcResult<AddPartitionsResponse> {
        ok(self.core.add_txn_partitions(r.into_inner()).await?)
    }
    async fn add_group(&self, r: Request<AddGroupRequest>) -> GrpcResult<AddGroupResponse> {
        self.core.add_txn_group(r.into_inner()).await?;
        ok(AddGroupResponse {})
    }
    async fn commit_txn_offsets(
        &self,
        r: Request<CommitTxnOffsetsRequest>,
    ) -> GrpcResult<CommitTxnOffsetsResponse> {
        self.core.commit_txn_offsets(r.into_inner()).await?;
        ok(CommitTxnOffsetsResponse::default())
    }
    async fn describe_transactions(
        &self,
        r: Request<DescribeTransactionsRequest>,
    ) -> GrpcResult<DescribeTransactionsResponse> {
        let r = r.into_inner();
        ok(self
            .core
            .describe_transactions(&r.namespace, &r.transactional_ids)
            .await?)
    }
    async fn list_transactions(
        &self,
        r: Request<ListTransactionsRequest>,
    ) -> GrpcResult<ListTransactionsResponse> {
        ok(ListTransactionsResponse {
            transactions: self.core.list_transactions(&r.into_inner()).await?,
        })
    }
    async fn stage_messages(
        &self,
        r: Request<StageMessagesRequest>,
    ) -> GrpcResult<StageMessagesResponse> {
        ok(self.core.stage_messages(r.into_inner()).await?)
    }
    async fn resolve_staged(
        &self,
        r: Request<ResolveStagedRequest>,
    ) -> GrpcResult<ResolveStagedResponse> {
        ok(self.core.resolve_staged(r.into_inner()).await?)
    }
    async fn claim_staged_checks(
        &self,
        r: Request<ClaimStagedChecksRequest>,
    ) -> GrpcResult<ClaimStagedChecksResponse> {
        ok(self.core.claim_staged_checks(r.into_inner()).await?)
    }
}
