//! Command line, environment and config file, resolved into one [`Settings`].
//!
//! Every setting has one name in three spellings: the flag `--some-name`, the environment
//! variable `TRIBUTARY_SOME_NAME` and the config file key `some_name`. A flag beats the
//! environment, which beats the file, which beats the default. Unknown file keys and bad
//! values stop start-up with one line naming the setting.

use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use tributary_gateway_common::tls::ClientCerts;
use tributary_storage::local::FsyncPolicy;

#[derive(Debug, Parser)]
#[command(
    name = "tributary",
    version,
    about = "Converged message queue: MQTT, Kafka, AMQP 0-9-1, RocketMQ and SQS over one core"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub options: Options,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The core and every gateway in one process (the default).
    Standalone,
    /// The core alone, serving its gRPC API.
    Core,
    /// One protocol gateway in front of a core reached over gRPC.
    Gateway {
        /// kafka, mqtt, amqp, sqs or rocketmq.
        protocol: String,
    },
    /// Reads a password on stdin and prints the salted credentials for a `[[users]]` entry.
    Passwd,
    /// Streams (Kafka topics) of a running server: list, describe, create, delete, produce,
    /// consume. Reaches the core at --core with its token and TLS settings.
    Streams {
        #[command(subcommand)]
        what: crate::cli::StreamsCommand,
    },
    /// Consumer groups: list, describe with lag, reset offsets.
    Groups {
        #[command(subcommand)]
        what: crate::cli::GroupsCommand,
    },
    /// Queues: list, declare, purge, redrive dead letters.
    Queues {
        #[command(subcommand)]
        what: crate::cli::QueuesCommand,
    },
    /// MQTT sessions: list, kick.
    Sessions {
        #[command(subcommand)]
        what: crate::cli::SessionsCommand,
    },
    /// Users kept in the core (every gateway process logs them in): list, add, passwd,
    /// delete. The password is read from stdin.
    Users {
        #[command(subcommand)]
        what: crate::cli::UsersCommand,
    },
    /// Client connections of a running process: list, close.
    Connections {
        #[command(subcommand)]
        what: crate::cli::ConnectionsCommand,
    },
    /// Imports another broker's definitions (RabbitMQ's definitions.json, Kafka topics,
    /// SQS queues as the aws CLI prints them).
    Import {
        #[command(subcommand)]
        what: crate::cli::ImportCommand,
    },
    /// Exports definitions in another broker's format (RabbitMQ definitions, Kafka topics as
    /// kafka-topics.sh --describe text, SQS queues as the aws CLI prints them).
    Export {
        #[command(subcommand)]
        what: crate::cli::ExportCommand,
    },
    /// Load generators with real client libraries, for Tributary or any other broker.
    Bench {
        #[command(subcommand)]
        what: Box<BenchCommand>,
    },
}

/// `tributary bench <what>`.
#[derive(Debug, Clone, Subcommand)]
pub enum BenchCommand {
    /// Kafka producers and a consumer group (librdkafka); default target 127.0.0.1:9092.
    Kafka(LoadArgs),
    /// MQTT publishers and subscribers (rumqttc); default target 127.0.0.1:1883.
    Mqtt(LoadArgs),
    /// AMQP 0-9-1 publishers and consumers (amq-protocol frames); default target 127.0.0.1:5672.
    Amqp(LoadArgs),
    /// SQS producers and consumers (aws-sdk-sqs) on one queue it creates and deletes; default
    /// target http://127.0.0.1:9324.
    Sqs(LoadArgs),
    /// RocketMQ producers and pull consumers (Remoting, the gateway's codec) on a topic it
    /// creates and deletes; the target is the NameServer, default 127.0.0.1:9876.
    Rocketmq(LoadArgs),
    /// Medians and ratios of `--json` results (one per line) and a chart of them.
    Report(ReportArgs),
}

/// What a load run does. The first flags are the same for every protocol.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Broker address, HOST:PORT (default: the protocol's standard port on 127.0.0.1). SQS:
    /// also the endpoint URL, http://HOST:PORT (`--url` is the same flag).
    #[arg(long, alias = "url")]
    pub target: Option<String>,
    /// Producers / publishers, one connection each.
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Consumers / subscribers, one connection each (Kafka: members of one group).
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// Message size in bytes (at least 20: the stamp).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Seconds of measured traffic.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Stop after this many messages in all (the duration still bounds the run).
    #[arg(long)]
    pub count: Option<u64>,
    /// Seconds of traffic before the measured part.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Messages per second over all producers (default: as fast as possible).
    #[arg(long)]
    pub rate: Option<u64>,
    /// MQTT QoS 0/1/2; AMQP 1 = publisher confirms + manual acks, 0 = neither.
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// MQTT topics / AMQP queues; producer i sends to i % topics, consumer j reads j % topics.
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    /// Extra idle connections held open for the whole run.
    #[arg(long, default_value_t = 0)]
    pub connections: usize,
    /// Unacknowledged messages per producer (default: Kafka 1000, MQTT 100, AMQP 100,
    /// RocketMQ 128).
    #[arg(long)]
    pub inflight: Option<usize>,
    /// AMQP prefetch per consumer.
    #[arg(long, default_value_t = 100)]
    pub prefetch: u16,
    /// AMQP: transient queues and messages instead of durable queues and persistent messages.
    #[arg(long)]
    pub transient: bool,
    /// AMQP: publish to a fanout exchange bound to N queues (instead of --topics queues on the
    /// default exchange); consumer j reads queue j % N, so --consumers must be at least N.
    #[arg(long, default_value_t = 0)]
    pub fanout: usize,
    /// MQTT: the broker's Kafka address. The bench topic is then a Kafka topic MQTT
    /// publishers publish to, read by --consumers members of one Kafka consumer group.
    #[arg(long, value_name = "HOST:PORT")]
    pub kafka_consumers: Option<String>,
    /// Kafka (Tributary only): producers write a delay line of the bench topic, every record
    /// delayed this many ms (header tributary.delay-ms); consumers read the bench topic, so
    /// latencies include the delay.
    #[arg(long, value_name = "MS")]
    pub delay_ms: Option<u64>,
    /// Kafka acks: all, 1 or 0.
    #[arg(long, default_value = "all")]
    pub acks: String,
    /// Kafka partitions / RocketMQ queues of the bench topic (default: Kafka 6, RocketMQ 8).
    #[arg(long)]
    pub partitions: Option<i32>,
    /// Kafka compression: none, gzip, snappy, lz4, zstd.
    #[arg(long, default_value = "none")]
    pub compression: String,
    /// Kafka: produce first, then measure a consumer group reading from the start.
    #[arg(long)]
    pub from_start: bool,
    /// Kafka: transactional producers (one transactional id each) that commit every
    /// --commit-ms; the consumers read committed.
    #[arg(long)]
    pub transactional: bool,
    /// Kafka with --transactional: how often each producer commits, in ms.
    #[arg(long, default_value_t = 100)]
    pub commit_ms: u64,
    /// SQS: messages per request, 1 to 10 (1 = SendMessage / DeleteMessage, more = the Batch
    /// actions); also ReceiveMessage's MaxNumberOfMessages.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// SQS: a FIFO queue; each producer spreads its messages over --groups message groups.
    #[arg(long)]
    pub fifo: bool,
    /// SQS FIFO: message groups.
    #[arg(long, default_value_t = 4)]
    pub groups: usize,
    /// SQS: ReceiveMessage's WaitTimeSeconds (long polling), 1 to 20.
    #[arg(long, default_value_t = 20)]
    pub wait: u32,
    /// SQS: name of the queue to create (and delete at the end); default a fresh name.
    #[arg(long)]
    pub queue: Option<String>,
    /// Process id of the broker (same machine): report its resident memory per connection.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Name of the broker under test, copied into the report (for `bench report`).
    #[arg(long, default_value = "")]
    pub broker: String,
    /// Name of the workload, copied into the report (for `bench report`).
    #[arg(long, default_value = "")]
    pub label: String,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `tributary bench report`.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// Files of `--json` reports, one per line (`-` = stdin).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// The broker the others are compared with (ratios are SUBJECT / other).
    #[arg(long, default_value = "tributary")]
    pub subject: String,
    /// Write a chart of throughput and p99 latency per workload (SVG).
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Print the table as Markdown.
    #[arg(long)]
    pub markdown: bool,
}

/// Every setting, as given on the command line or in the environment.
#[derive(Debug, Default, Args)]
pub struct Options {
    /// TOML config file (see tributary.example.toml).
    #[arg(long, env = "TRIBUTARY_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Where data lives.
    #[arg(long, env = "TRIBUTARY_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Core gRPC listener (HOST:PORT or off; default 127.0.0.1:7400, 0.0.0.0:7400 for
    /// `tributary core`).
    #[arg(long, env = "TRIBUTARY_CORE_LISTEN", global = true)]
    pub core_listen: Option<String>,
    /// Shared secret of the core gRPC API: the core requires it (`authorization: Bearer`)
    /// and gateways send it. Prefer --core-token-file: a flag shows in the process list.
    #[arg(long, env = "TRIBUTARY_CORE_TOKEN", global = true)]
    pub core_token: Option<String>,
    /// File holding the core token (one line).
    #[arg(long, env = "TRIBUTARY_CORE_TOKEN_FILE", global = true)]
    pub core_token_file: Option<PathBuf>,
    /// Let the core and admin APIs listen beyond loopback without a token (true/false).
    #[arg(long, env = "TRIBUTARY_CORE_INSECURE", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub core_insecure: Option<bool>,
    /// Admin HTTP listener: health, metrics, JSON API (HOST:PORT or off; default
    /// 127.0.0.1:7480, 0.0.0.0:7480 for `tributary core`).
    #[arg(long, env = "TRIBUTARY_ADMIN_LISTEN", global = true)]
    pub admin_listen: Option<String>,
    /// Kafka gateway listener (HOST:PORT or off).
    #[arg(long, env = "TRIBUTARY_KAFKA_LISTEN", global = true)]
    pub kafka_listen: Option<String>,
    /// MQTT over TCP listener (HOST:PORT or off).
    #[arg(long, env = "TRIBUTARY_MQTT_LISTEN", global = true)]
    pub mqtt_listen: Option<String>,
    /// MQTT over WebSocket listener (HOST:PORT or off).
    #[arg(long, env = "TRIBUTARY_MQTT_WS_LISTEN", global = true)]
    pub mqtt_ws_listen: Option<String>,
    /// MQTT over TLS listener (HOST:PORT or off; when --tls-cert is set the default is
    /// 127.0.0.1:8883, 0.0.0.0:8883 without anonymous clients).
    #[arg(long, env = "TRIBUTARY_MQTT_TLS_LISTEN", global = true)]
    pub mqtt_tls_listen: Option<String>,
    /// MQTT over secure WebSocket listener (wss://HOST:PORT/mqtt; HOST:PORT or off; when
    /// --tls-cert is set the default is 127.0.0.1:8084, 0.0.0.0:8084 without anonymous
    /// clients).
    #[arg(long, env = "TRIBUTARY_MQTT_WSS_LISTEN", global = true)]
    pub mqtt_wss_listen: Option<String>,
    /// AMQP over TLS listener (HOST:PORT or off; default 0.0.0.0:5671 when --tls-cert is set).
    #[arg(long, env = "TRIBUTARY_AMQP_TLS_LISTEN", global = true)]
    pub amqp_tls_listen: Option<String>,
    /// Kafka over TLS listener (security.protocol SSL, or SASL_SSL with --kafka-sasl;
    /// HOST:PORT or off; when --tls-cert is set the default is 127.0.0.1:9093, 0.0.0.0:9093
    /// with --kafka-sasl).
    #[arg(long, env = "TRIBUTARY_KAFKA_TLS_LISTEN", global = true)]
    pub kafka_tls_listen: Option<String>,
    /// Address given to Kafka clients of the TLS listener (HOST:PORT; default: that listen
    /// address, with 0.0.0.0 advertised as 127.0.0.1). Its host is what clients check the
    /// certificate against.
    #[arg(long, env = "TRIBUTARY_KAFKA_TLS_ADVERTISED", global = true)]
    pub kafka_tls_advertised: Option<String>,
    /// PEM certificate chain for the TLS listeners.
    #[arg(long, env = "TRIBUTARY_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    #[arg(long, env = "TRIBUTARY_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,
    /// PEM file of the CAs that sign client certificates, for --tls-client-auth.
    #[arg(long, env = "TRIBUTARY_TLS_CLIENT_CA", global = true)]
    pub tls_client_ca: Option<PathBuf>,
    /// Client certificates on the protocol TLS listeners: none (the default), requested
    /// (verified when sent; clients without one authenticate otherwise) or required (mutual
    /// TLS). Kafka's ssl.client.auth, with the same words.
    #[arg(long, env = "TRIBUTARY_TLS_CLIENT_AUTH", global = true)]
    pub tls_client_auth: Option<String>,
    /// How often the certificate files are checked for a change, in ms (0: only on SIGHUP).
    /// A changed certificate is served to new connections without a restart.
    #[arg(long, env = "TRIBUTARY_TLS_RELOAD_INTERVAL_MS", global = true)]
    pub tls_reload_interval_ms: Option<u64>,
    /// Serve the core gRPC API over TLS with --tls-cert (gateways then use https://).
    #[arg(long, env = "TRIBUTARY_CORE_TLS", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub core_tls: Option<bool>,
    /// With --core-tls: require client certificates signed by the CAs in this PEM file on
    /// the core gRPC API (mutual TLS); a verified client needs no core token.
    #[arg(long, env = "TRIBUTARY_CORE_TLS_CLIENT_CA", global = true)]
    pub core_tls_client_ca: Option<PathBuf>,
    /// Serve the admin HTTP API over TLS (https://) with --tls-cert.
    #[arg(long, env = "TRIBUTARY_ADMIN_TLS", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub admin_tls: Option<bool>,
    /// For a gateway reaching its core at https://: the PEM CAs that sign the core's
    /// certificate (default: the core's certificate is checked against nothing else).
    #[arg(long, env = "TRIBUTARY_CORE_CA", global = true)]
    pub core_ca: Option<PathBuf>,
    /// For a gateway reaching a core that requires client certificates: its certificate
    /// chain (PEM).
    #[arg(long, env = "TRIBUTARY_CORE_CLIENT_CERT", global = true)]
    pub core_client_cert: Option<PathBuf>,
    /// The private key of --core-client-cert (PEM).
    #[arg(long, env = "TRIBUTARY_CORE_CLIENT_KEY", global = true)]
    pub core_client_key: Option<PathBuf>,
    /// AMQP 0-9-1 listener (HOST:PORT or off).
    #[arg(long, env = "TRIBUTARY_AMQP_LISTEN", global = true)]
    pub amqp_listen: Option<String>,
    /// SQS-compatible HTTP listener (HOST:PORT or off).
    #[arg(long, env = "TRIBUTARY_SQS_LISTEN", global = true)]
    pub sqs_listen: Option<String>,
    /// The AWS region in SQS queue ARNs (and the one SigV4 signatures are scoped to).
    #[arg(long, env = "TRIBUTARY_SQS_REGION", global = true)]
    pub sqs_region: Option<String>,
    /// The account id in SQS queue URLs and ARNs (12 digits).
    #[arg(long, env = "TRIBUTARY_SQS_ACCOUNT_ID", global = true)]
    pub sqs_account_id: Option<String>,
    /// RocketMQ broker listener (HOST:PORT or off).
    #[arg(long, env = "TRIBUTARY_ROCKETMQ_LISTEN", global = true)]
    pub rocketmq_listen: Option<String>,
    /// RocketMQ NameServer listener (HOST:PORT or off).
    #[arg(long, env = "TRIBUTARY_NAMESRV_LISTEN", global = true)]
    pub namesrv_listen: Option<String>,
    /// Broker address given to RocketMQ clients in routes and message ids (IP:PORT;
    /// default: the RocketMQ listen address, with 0.0.0.0 advertised as 127.0.0.1).
    #[arg(long, env = "TRIBUTARY_ROCKETMQ_ADVERTISED", global = true)]
    pub rocketmq_advertised: Option<String>,
    /// Create a RocketMQ topic on its first send (autoCreateTopicEnable; true/false).
    #[arg(long, env = "TRIBUTARY_ROCKETMQ_AUTO_CREATE_TOPICS", global = true)]
    pub rocketmq_auto_create_topics: Option<bool>,
    /// How often unresolved RocketMQ half messages are checked back with their producer, in
    /// ms (transactionCheckInterval).
    #[arg(
        long,
        env = "TRIBUTARY_ROCKETMQ_TRANSACTION_CHECK_INTERVAL_MS",
        global = true
    )]
    pub rocketmq_transaction_check_interval_ms: Option<u64>,
    /// Age of a half message before its first check-back, in ms (transactionTimeOut).
    #[arg(long, env = "TRIBUTARY_ROCKETMQ_TRANSACTION_TIMEOUT_MS", global = true)]
    pub rocketmq_transaction_timeout_ms: Option<u64>,
    /// Check-backs without an answer before a half message is rolled back
    /// (transactionCheckMax).
    #[arg(long, env = "TRIBUTARY_ROCKETMQ_TRANSACTION_CHECK_MAX", global = true)]
    pub rocketmq_transaction_check_max: Option<u32>,
    /// Connections each gateway listener serves at once; more are closed as they are
    /// accepted (0 = no limit).
    #[arg(long, env = "TRIBUTARY_MAX_CONNECTIONS", global = true)]
    pub max_connections: Option<usize>,
    /// Core address a standalone gateway connects to; in cluster mode the core nodes'
    /// addresses, comma-separated (calls go to the one answering).
    #[arg(long, env = "TRIBUTARY_CORE", global = true)]
    pub core: Option<String>,
    /// Cluster mode (`tributary core` only): this node's name. Nodes sharing one metadata
    /// store (etcd or postgres) and one object store (storage = opendal, opendal_ack =
    /// shared) serve one at a time, under a lease with a fencing epoch; the others stand by
    /// and take over when it is lost.
    #[arg(long, env = "TRIBUTARY_CLUSTER_NODE", global = true)]
    pub cluster_node: Option<String>,
    /// Cluster mode: how long a lease outlives the active node's last heartbeat (ms); a
    /// standby takes over this long after the heartbeats stop.
    #[arg(long, env = "TRIBUTARY_CLUSTER_LEASE_TTL_MS", global = true)]
    pub cluster_lease_ttl_ms: Option<u64>,
    /// Cluster mode: the number of shards the deployment's namespaces are spread over (1 to
    /// 4096, fixed when the first node joins). Each node then serves its share of shards at
    /// once instead of one node serving everything; 0 or unset: one active node.
    #[arg(long, env = "TRIBUTARY_CLUSTER_SHARDS", global = true)]
    pub cluster_shards: Option<u32>,
    /// Cluster mode with shards: how units are placed on them (fixed when the first node
    /// joins). `namespace` (the default): every unit of a namespace in its shard. `stream`:
    /// streams (Kafka and RocketMQ topics) by namespace and name, so one namespace's topics
    /// spread over the nodes; it refuses what is not built across shards yet (Kafka
    /// transactions, delay lines, timers appending to topics, streams as MQTT topics or
    /// exchanges, mqtt_stream_rules; docs/cluster.md).
    #[arg(long, env = "TRIBUTARY_CLUSTER_SHARD_SCHEME", global = true)]
    pub cluster_shard_scheme: Option<String>,
    /// The namespace the Kafka, MQTT, SQS and RocketMQ gateways serve (AMQP clients name
    /// theirs as the virtual host). Made at start if missing. A cluster serving shards
    /// spreads namespaces over its nodes, so gateways serving different namespaces spread.
    #[arg(long, env = "TRIBUTARY_GATEWAY_NAMESPACE", global = true)]
    pub gateway_namespace: Option<String>,
    /// Kafka gateways as a fleet: this gateway's broker id (0 to 2147483647, unique in the
    /// fleet). Each gateway with one registers in the core, and clients are given every live
    /// one as a broker, partitions and coordinators spread over them. Unset: this gateway
    /// is the only broker clients see.
    #[arg(long, env = "TRIBUTARY_KAFKA_BROKER_ID", global = true)]
    pub kafka_broker_id: Option<i32>,
    /// Kafka gateways as a fleet in cluster shard mode: the core node (its --cluster-node
    /// name) this gateway runs beside. A partition's leader is then a gateway beside the node
    /// serving its shard, so clients follow the shards as they move. Needs
    /// --kafka-broker-id.
    #[arg(long, env = "TRIBUTARY_KAFKA_BROKER_NODE", global = true)]
    pub kafka_broker_node: Option<String>,
    /// Log storage: local (on disk, the default), memory (lost on exit) or opendal (an
    /// object store configured in the config file's [opendal] table, with a local cache).
    /// With an [opendal] table both local and opendal are available and this is the
    /// default; a stream or queue may choose the other when it is created.
    #[arg(long, env = "TRIBUTARY_STORAGE", global = true)]
    pub storage: Option<String>,
    /// With an [opendal] table: where appends are acknowledged, "local" (once the local
    /// cache has fsynced them) or "shared" (once the object store holds them too).
    #[arg(long, env = "TRIBUTARY_OPENDAL_ACK", global = true)]
    pub opendal_ack: Option<String>,
    /// With an [opendal] table: the object store's local cache directory (default: DATA_DIR/cache).
    #[arg(long, env = "TRIBUTARY_OPENDAL_CACHE_DIR", global = true)]
    pub opendal_cache_dir: Option<PathBuf>,
    /// With opendal_ack = shared: how long appends of every partition are gathered into
    /// one object (ms).
    #[arg(long, env = "TRIBUTARY_OPENDAL_UPLOAD_INTERVAL_MS", global = true)]
    pub opendal_upload_interval_ms: Option<u64>,
    /// With an [opendal] table: segments holding records older than this are sealed and
    /// uploaded (ms).
    #[arg(long, env = "TRIBUTARY_OPENDAL_SEAL_INTERVAL_MS", global = true)]
    pub opendal_seal_interval_ms: Option<u64>,
    /// Metadata store: redb (embedded, the default), etcd, postgres, mysql or redis.
    #[arg(long, env = "TRIBUTARY_META", global = true)]
    pub meta: Option<String>,
    /// Where the metadata store is (etcd: http://127.0.0.1:2379; postgres://user@host/db;
    /// mysql://user:password@host/db; redis://host:6379).
    #[arg(long, env = "TRIBUTARY_META_URL", global = true)]
    pub meta_url: Option<String>,
    /// Keeps this deployment's metadata apart from others in the same store (a key prefix
    /// or table name).
    #[arg(long, env = "TRIBUTARY_META_NAMESPACE", global = true)]
    pub meta_namespace: Option<String>,
    /// When the local log fsyncs: "always" (group commit) or an interval such as "5ms".
    #[arg(long, env = "TRIBUTARY_FSYNC", global = true)]
    pub fsync: Option<String>,
    /// Size at which the local log starts a new segment file.
    #[arg(long, env = "TRIBUTARY_SEGMENT_BYTES", global = true)]
    pub segment_bytes: Option<u64>,
    /// Partitions of a stream created without a count (and of auto-created ones).
    #[arg(long, env = "TRIBUTARY_DEFAULT_PARTITIONS", global = true)]
    pub default_partitions: Option<u32>,
    /// Whether appending to a missing stream may create it (true/false).
    #[arg(long, env = "TRIBUTARY_AUTO_CREATE_STREAMS", global = true)]
    pub auto_create_streams: Option<bool>,
    /// Default retention by age in ms (-1 = forever).
    #[arg(
        long,
        env = "TRIBUTARY_RETENTION_MS",
        global = true,
        allow_negative_numbers = true
    )]
    pub retention_ms: Option<i64>,
    /// Default retention by size per partition in bytes (-1 = unlimited).
    #[arg(
        long,
        env = "TRIBUTARY_RETENTION_BYTES",
        global = true,
        allow_negative_numbers = true
    )]
    pub retention_bytes: Option<i64>,
    /// Default largest batch a stream accepts, in bytes.
    #[arg(long, env = "TRIBUTARY_MAX_MESSAGE_BYTES", global = true)]
    pub max_message_bytes: Option<i64>,
    /// How often retention runs, in ms.
    #[arg(long, env = "TRIBUTARY_RETENTION_CHECK_INTERVAL_MS", global = true)]
    pub retention_check_interval_ms: Option<u64>,
    /// Address given to Kafka clients as the broker (HOST:PORT; default: the Kafka listen
    /// address, with 0.0.0.0 advertised as 127.0.0.1).
    #[arg(long, env = "TRIBUTARY_KAFKA_ADVERTISED", global = true)]
    pub kafka_advertised: Option<String>,
    /// Require SASL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) from Kafka clients, against [[users]].
    #[arg(long, env = "TRIBUTARY_KAFKA_SASL", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub kafka_sasl: Option<bool>,
    /// Create unknown topics when a Kafka client asks for their metadata (true/false).
    #[arg(long, env = "TRIBUTARY_KAFKA_AUTO_CREATE_TOPICS", global = true)]
    pub kafka_auto_create_topics: Option<bool>,
    /// Enforce Kafka ACLs (CreateAcls/DescribeAcls/DeleteAcls) on every Kafka request;
    /// needs --kafka-sasl (or --tls-client-auth required: certificate principals).
    #[arg(long, env = "TRIBUTARY_KAFKA_AUTHORIZER", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub kafka_authorizer: Option<bool>,
    /// [[users]] names allowed everything by the Kafka authorizer (comma-separated).
    #[arg(
        long,
        env = "TRIBUTARY_KAFKA_SUPER_USERS",
        global = true,
        value_delimiter = ','
    )]
    pub kafka_super_users: Option<Vec<String>>,
    /// Let everyone use a Kafka resource no ACL covers (allow.everyone.if.no.acl.found).
    #[arg(long, env = "TRIBUTARY_KAFKA_ALLOW_IF_NO_ACL", global = true)]
    pub kafka_allow_if_no_acl: Option<bool>,
    /// Kafka's ssl.principal.mapping.rules: how a client certificate's subject becomes the
    /// principal of a Kafka connection without SASL (e.g. "RULE:^CN=(.*?),.*$/$1/,DEFAULT").
    #[arg(
        long,
        env = "TRIBUTARY_KAFKA_SSL_PRINCIPAL_MAPPING_RULES",
        global = true
    )]
    pub kafka_ssl_principal_mapping_rules: Option<String>,
    /// Accept MQTT clients that give no user name (true/false).
    #[arg(long, env = "TRIBUTARY_MQTT_ALLOW_ANONYMOUS", global = true)]
    pub mqtt_allow_anonymous: Option<bool>,
    /// QoS 1/2 messages one MQTT session may hold (queued plus in flight); newer ones are
    /// dropped beyond it.
    #[arg(long, env = "TRIBUTARY_MQTT_MAX_QUEUED", global = true)]
    pub mqtt_max_queued: Option<usize>,
    /// Address (AMQP exchange or a stream's address, in each session's namespace) that QoS
    /// 1/2 messages a session drops go to, with the topic as routing key: those over
    /// mqtt_max_queued and those expired before delivery. Unset: they are only dropped.
    #[arg(long, env = "TRIBUTARY_MQTT_DEAD_LETTER_ADDRESS", global = true)]
    pub mqtt_dead_letter_address: Option<String>,
    /// Exchange MQTT topics are bridged to and from, as RabbitMQ's mqtt.exchange: MQTT
    /// publishes reach queues bound there (topic a/b as key a.b), publishes to it reach MQTT
    /// subscribers. Empty: no bridge.
    #[arg(long, env = "TRIBUTARY_MQTT_EXCHANGE", global = true)]
    pub mqtt_exchange: Option<String>,
    /// Longest MQTT keep-alive in seconds: a client asking for more (or for none) gets this
    /// one (announced as Server Keep Alive to 5.0 clients); 0 = take the client's.
    #[arg(long, env = "TRIBUTARY_MQTT_MAX_KEEP_ALIVE", global = true)]
    pub mqtt_max_keep_alive: Option<u16>,
    /// Streams double as MQTT topics of the same name: MQTT publishes to such a topic are
    /// appended to the stream, and records appended to it reach MQTT subscribers
    /// (true/false; docs/compat/mapping.md).
    #[arg(long, env = "TRIBUTARY_MQTT_STREAMS", global = true)]
    pub mqtt_streams: Option<bool>,
    /// Every stream is also an address (AMQP exchange of type x-stream) of its name:
    /// publishes to it append, queues bound to it get what the stream holds (true/false).
    #[arg(long, env = "TRIBUTARY_STREAM_EXCHANGES", global = true)]
    pub stream_exchanges: Option<bool>,
    /// Longest transaction timeout a transactional producer may ask for, in ms (Kafka's
    /// transaction.max.timeout.ms).
    #[arg(long, env = "TRIBUTARY_TRANSACTION_MAX_TIMEOUT_MS", global = true)]
    pub transaction_max_timeout_ms: Option<u64>,
    /// How long the first rebalance of an empty consumer group waits for more members, in ms.
    #[arg(
        long,
        env = "TRIBUTARY_GROUP_INITIAL_REBALANCE_DELAY_MS",
        global = true
    )]
    pub group_initial_rebalance_delay_ms: Option<u64>,
    /// Shortest session timeout a Kafka consumer may ask for in JoinGroup, in ms
    /// (group.min.session.timeout.ms); shorter ones get INVALID_SESSION_TIMEOUT.
    #[arg(long, env = "TRIBUTARY_GROUP_MIN_SESSION_TIMEOUT_MS", global = true)]
    pub group_min_session_timeout_ms: Option<u32>,
    /// Longest session timeout a Kafka consumer may ask for in JoinGroup, in ms
    /// (group.max.session.timeout.ms); longer ones get INVALID_SESSION_TIMEOUT.
    #[arg(long, env = "TRIBUTARY_GROUP_MAX_SESSION_TIMEOUT_MS", global = true)]
    pub group_max_session_timeout_ms: Option<u32>,
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "tributary_core=debug".
    #[arg(long, env = "TRIBUTARY_LOG", global = true)]
    pub log: Option<String>,
}

/// A `[[users]]` entry of the config file: a name and its salted credentials.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    pub name: String,
    /// As printed by `tributary passwd`.
    pub credentials: Vec<String>,
}

/// A `[[mqtt_acl]]` entry: allow or deny publish/subscribe on a filter, for a user, a
/// client id or everyone; `%u` and `%c` in the filter stand for the user and client id.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclEntry {
    pub user: Option<String>,
    pub client: Option<String>,
    /// publish, subscribe or all.
    pub action: String,
    pub filter: String,
    /// allow or deny.
    pub permission: String,
}

/// An `[[sqs_credentials]]` entry: an AWS access key SQS clients sign requests with.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqsCredentialEntry {
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// An `[[amqp_permissions]]` entry: a user may open a vhost (configure, write and read in
/// it). A user without an entry may open "/".
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpPermissionEntry {
    pub user: String,
    pub vhost: String,
}

/// An `[[mqtt_stream_rules]]` entry: MQTT publishes whose topic matches `filter` are
/// appended to `stream` (made if missing), the topic as key; its records whose key matches
/// reach MQTT subscribers on that topic (docs/compat/mapping.md, "Rules").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttStreamRuleEntry {
    pub filter: String,
    pub stream: String,
    /// Absent: the gateways' namespace (`gateway_namespace`, `default` unless set).
    pub namespace: Option<String>,
}

/// The config file: the same keys as the flags, snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub core_listen: Option<String>,
    pub core_token: Option<String>,
    pub core_token_file: Option<PathBuf>,
    pub core_insecure: Option<bool>,
    pub admin_listen: Option<String>,
    pub kafka_listen: Option<String>,
    pub mqtt_listen: Option<String>,
    pub mqtt_ws_listen: Option<String>,
    pub mqtt_tls_listen: Option<String>,
    pub mqtt_wss_listen: Option<String>,
    pub amqp_tls_listen: Option<String>,
    pub kafka_tls_listen: Option<String>,
    pub kafka_tls_advertised: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub tls_client_auth: Option<String>,
    pub tls_reload_interval_ms: Option<u64>,
    pub core_tls: Option<bool>,
    pub core_tls_client_ca: Option<PathBuf>,
    pub admin_tls: Option<bool>,
    pub core_ca: Option<PathBuf>,
    pub core_client_cert: Option<PathBuf>,
    pub core_client_key: Option<PathBuf>,
    pub amqp_listen: Option<String>,
    pub sqs_listen: Option<String>,
    pub sqs_region: Option<String>,
    pub sqs_account_id: Option<String>,
    /// Access keys SQS requests are signed with (file only); none: any signature is
    /// accepted, and the SQS listener stays on loopback unless given an address.
    #[serde(default)]
    pub sqs_credentials: Vec<SqsCredentialEntry>,
    pub rocketmq_listen: Option<String>,
    pub namesrv_listen: Option<String>,
    pub rocketmq_advertised: Option<String>,
    pub rocketmq_auto_create_topics: Option<bool>,
    pub rocketmq_transaction_check_interval_ms: Option<u64>,
    pub rocketmq_transaction_timeout_ms: Option<u64>,
    pub rocketmq_transaction_check_max: Option<u32>,
    pub max_connections: Option<usize>,
    pub core: Option<String>,
    pub cluster_node: Option<String>,
    pub cluster_lease_ttl_ms: Option<u64>,
    pub cluster_shards: Option<u32>,
    pub cluster_shard_scheme: Option<String>,
    pub gateway_namespace: Option<String>,
    pub kafka_broker_id: Option<i32>,
    pub kafka_broker_node: Option<String>,
    pub storage: Option<String>,
    pub opendal_ack: Option<String>,
    pub opendal_cache_dir: Option<PathBuf>,
    pub opendal_upload_interval_ms: Option<u64>,
    pub opendal_seal_interval_ms: Option<u64>,
    /// The object store backend (file only; the default with `storage = "opendal"`): `scheme` plus that OpenDAL
    /// service's own options (`bucket`, `endpoint`, `region`, `root`, ...).
    #[serde(default)]
    pub opendal: Option<toml::Table>,
    pub meta: Option<String>,
    pub meta_url: Option<String>,
    pub meta_namespace: Option<String>,
    pub fsync: Option<String>,
    pub segment_bytes: Option<u64>,
    pub default_partitions: Option<u32>,
    pub auto_create_streams: Option<bool>,
    pub retention_ms: Option<i64>,
    pub retention_bytes: Option<i64>,
    pub max_message_bytes: Option<i64>,
    pub retention_check_interval_ms: Option<u64>,
    pub kafka_advertised: Option<String>,
    pub kafka_sasl: Option<bool>,
    pub kafka_auto_create_topics: Option<bool>,
    pub kafka_authorizer: Option<bool>,
    pub kafka_super_users: Option<Vec<String>>,
    pub kafka_allow_if_no_acl: Option<bool>,
    pub kafka_ssl_principal_mapping_rules: Option<String>,
    pub transaction_max_timeout_ms: Option<u64>,
    pub group_initial_rebalance_delay_ms: Option<u64>,
    pub group_min_session_timeout_ms: Option<u32>,
    pub group_max_session_timeout_ms: Option<u32>,
    pub mqtt_allow_anonymous: Option<bool>,
    pub mqtt_max_queued: Option<usize>,
    pub mqtt_dead_letter_address: Option<String>,
    pub mqtt_exchange: Option<String>,
    pub mqtt_max_keep_alive: Option<u16>,
    pub mqtt_streams: Option<bool>,
    pub stream_exchanges: Option<bool>,
    pub log: Option<String>,
    /// MQTT topic access rules, first match wins (file only).
    #[serde(default)]
    pub mqtt_acl: Vec<AclEntry>,
    /// MQTT filters mapped onto streams (file only; also the core API's bindings of the
    /// address `$mqtt`).
    #[serde(default)]
    pub mqtt_stream_rules: Vec<MqttStreamRuleEntry>,
    /// AMQP vhosts clients may open (file only); default ["/"].
    pub amqp_vhosts: Option<Vec<String>>,
    /// Which user may open which AMQP vhost (file only).
    #[serde(default)]
    pub amqp_permissions: Vec<AmqpPermissionEntry>,
    /// Users for SASL and password logins (file only: a list does not fit a flag).
    #[serde(default)]
    pub users: Vec<UserEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; check the path given to --config")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value '{value}' for {setting}: {reason}")]
    Invalid {
        setting: String,
        value: String,
        reason: String,
    },
}

/// A listener that is either off or bound to an address (port 0 = pick a free one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    Off,
    At(SocketAddr),
}

impl Listen {
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Listen::Off => None,
            Listen::At(a) => Some(a),
        }
    }
}

/// Which process the settings are for: the core and admin listeners default to loopback
/// in the standalone server (its gateways reach the core in-process) and to every
/// interface for `tributary core`, which serves gateways on other machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    #[default]
    Standalone,
    Core,
    Gateway,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageKind {
    Local,
    Memory,
    Opendal,
}

/// Cluster mode: this node's name and the lease it serves under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    pub node: String,
    pub lease_ttl: Duration,
    /// Shards the namespaces are spread over, each node serving its share; `None`: one node
    /// serves everything at a time.
    pub shards: Option<u32>,
    /// How units are placed on the shards.
    pub scheme: tributary_core::Scheme,
}

/// A cluster node's name, as `cluster_node` takes it and as the shard keys store it.
fn valid_node_name(node: &str) -> bool {
    !node.is_empty()
        && node.len() <= 64
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Cluster mode needs shared storage for everything a takeover reads: metadata in etcd or
/// PostgreSQL (whose transactions fence a stale node) and every acknowledged record in the
/// object store.
fn resolve_cluster(
    o: &Options,
    f: &FileConfig,
    role: Role,
    storage: StorageKind,
    opendal: Option<&OpendalSettings>,
    meta: &MetaSettings,
) -> Result<Option<ClusterSettings>, ConfigError> {
    // Checked first, so that a wrong value is refused even where it would not apply.
    let scheme = match o
        .cluster_shard_scheme
        .clone()
        .or_else(|| f.cluster_shard_scheme.clone())
    {
        None => tributary_core::Scheme::Namespace,
        Some(s) => tributary_core::Scheme::parse(&s)
            .ok_or_else(|| invalid("cluster_shard_scheme", &s, "expected namespace or stream"))?,
    };
    let Some(node) = o
        .cluster_node
        .clone()
        .or_else(|| f.cluster_node.clone())
        .filter(|n| !n.is_empty())
    else {
        return Ok(None);
    };
    if role != Role::Core {
        return Err(invalid(
            "cluster_node",
            &node,
            "cluster mode is for `tributary core` nodes; gateways take the nodes' addresses in --core, comma-separated",
        ));
    }
    if !valid_node_name(&node) {
        return Err(invalid(
            "cluster_node",
            &node,
            "expected 1 to 64 characters of A-Z, a-z, 0-9, '-', '_' and '.'",
        ));
    }
    if !matches!(meta.kind, MetaKind::Etcd | MetaKind::Postgres) {
        return Err(invalid(
            "meta",
            format!("{:?}", meta.kind).to_lowercase(),
            "cluster mode keeps its lease and fencing epoch in the metadata store: use meta = etcd or postgres",
        ));
    }
    let shared = opendal.is_some_and(|o| o.ack == tributary_storage::object_log::AckPoint::Shared);
    if storage != StorageKind::Opendal || !shared {
        return Err(invalid(
            "storage",
            format!("{storage:?}").to_lowercase(),
            "cluster mode takes over from shared storage alone: use storage = opendal with an [opendal] table and opendal_ack = shared",
        ));
    }
    let ttl_ms = o
        .cluster_lease_ttl_ms
        .or(f.cluster_lease_ttl_ms)
        .unwrap_or(5_000);
    if !(1_000..=60_000).contains(&ttl_ms) {
        return Err(invalid(
            "cluster_lease_ttl_ms",
            ttl_ms,
            "expected 1000 to 60000",
        ));
    }
    // 0, like unset: one active node.
    let shards = o.cluster_shards.or(f.cluster_shards).filter(|&n| n > 0);
    if let Some(n) = shards
        && n > 4096
    {
        return Err(invalid(
            "cluster_shards",
            n,
            "expected 0 (one active node) or 1 to 4096",
        ));
    }
    if scheme == tributary_core::Scheme::Stream && shards.is_none() {
        return Err(invalid(
            "cluster_shard_scheme",
            scheme,
            "a placement scheme places units on shards: set cluster_shards too",
        ));
    }
    Ok(Some(ClusterSettings {
        node,
        lease_ttl: Duration::from_millis(ttl_ms),
        shards,
        scheme,
    }))
}

/// Where an OpenDAL-backed log keeps its objects and its cache.
#[derive(Clone, PartialEq, Eq)]
pub struct OpendalSettings {
    pub scheme: String,
    /// The service's own options, as OpenDAL names them.
    pub options: Vec<(String, String)>,
    pub cache_dir: PathBuf,
    pub ack: tributary_storage::object_log::AckPoint,
    pub upload_interval: Duration,
    pub seal_interval: Duration,
}

impl OpendalSettings {
    /// Names the store in logs and errors without credentials.
    pub fn describe(&self) -> String {
        let place = ["bucket", "container", "root", "endpoint"]
            .iter()
            .filter_map(|k| self.options.iter().find(|(n, _)| n == k))
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        format!("{} ({place})", self.scheme)
    }
}

impl std::fmt::Debug for OpendalSettings {
    // Options can hold secrets (secret_access_key, credential, sas_token...): only their
    // names are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpendalSettings")
            .field("store", &self.describe())
            .field(
                "options",
                &self.options.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("cache_dir", &self.cache_dir)
            .field("ack", &self.ack)
            .field("upload_interval", &self.upload_interval)
            .field("seal_interval", &self.seal_interval)
            .finish()
    }
}

/// Which metadata store the core uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaKind {
    Redb,
    Etcd,
    Postgres,
    Mysql,
    Redis,
}

#[derive(Clone, PartialEq, Eq)]
pub struct MetaSettings {
    pub kind: MetaKind,
    /// Required for every kind but redb.
    pub url: Option<String>,
    pub namespace: String,
}

impl std::fmt::Debug for MetaSettings {
    // The URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaSettings")
            .field("kind", &self.kind)
            .field(
                "url",
                &self.url.as_deref().map(tributary_storage::redact_url),
            )
            .field("namespace", &self.namespace)
            .finish()
    }
}

/// How a gateway process reaches its core at an `https://` address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CoreClientTls {
    /// PEM CAs the core's certificate is checked against.
    pub ca: Option<PathBuf>,
    /// Client certificate chain and key (PEM), for a core that requires one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// Everything resolved and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub core_listen: Listen,
    /// The shared secret of the core API (`core_token` or the file `core_token_file`).
    pub core_token: Option<crate::auth::CoreToken>,
    /// The core and admin APIs may listen beyond loopback without a token.
    pub core_insecure: bool,
    pub admin_listen: Listen,
    pub kafka_listen: Listen,
    pub mqtt_listen: Listen,
    pub mqtt_ws_listen: Listen,
    pub mqtt_tls_listen: Listen,
    /// MQTT over WebSocket inside TLS (`wss://`).
    pub mqtt_wss_listen: Listen,
    /// Certificate chain and key (PEM) for the TLS listeners.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Client certificates asked for on the protocol TLS listeners.
    pub tls_clients: ClientCerts,
    /// How often the certificate files are checked for a change (`None`: SIGHUP only).
    pub tls_reload_interval: Option<Duration>,
    /// The core gRPC API over TLS, and the CAs of the client certificates it then requires.
    pub core_tls: bool,
    pub core_tls_client_ca: Option<PathBuf>,
    /// The admin HTTP API over TLS.
    pub admin_tls: bool,
    /// How a gateway process reaches its core over TLS.
    pub core_client_tls: CoreClientTls,
    pub amqp_listen: Listen,
    pub amqp_tls_listen: Listen,
    pub amqp_vhosts: Vec<String>,
    pub amqp_permissions: Vec<tributary_gateway_amqp::Permission>,
    /// (namespace, filter, stream) per `[[mqtt_stream_rules]]` entry.
    pub mqtt_stream_rules: Vec<(String, String, String)>,
    pub sqs_listen: Listen,
    pub sqs: tributary_gateway_sqs::SqsConfig,
    pub rocketmq_listen: Listen,
    pub namesrv_listen: Listen,
    /// `None`: the RocketMQ listen address (0.0.0.0 as 127.0.0.1).
    pub rocketmq_advertised: Option<SocketAddr>,
    pub rocketmq_auto_create_topics: bool,
    pub rocketmq_transaction_check_interval: Duration,
    pub rocketmq_transaction_timeout: Duration,
    pub rocketmq_transaction_check_max: u32,
    /// Connections each gateway listener serves at once; `None`: no limit.
    pub max_connections: Option<NonZeroUsize>,
    pub core: String,
    /// Cluster mode (`tributary core --cluster-node NAME`); `None`: one node alone.
    pub cluster: Option<ClusterSettings>,
    pub storage: StorageKind,
    /// With an [opendal] table: the object store backend and its cache.
    pub opendal: Option<OpendalSettings>,
    pub meta: MetaSettings,
    pub fsync: FsyncPolicy,
    pub segment_bytes: u64,
    pub default_partitions: u32,
    pub auto_create_streams: bool,
    pub retention_ms: i64,
    pub retention_bytes: i64,
    pub max_message_bytes: i64,
    pub retention_check_interval: Duration,
    pub kafka_advertised: Option<(String, u16)>,
    /// The namespace the Kafka, MQTT, SQS and RocketMQ gateways serve.
    pub gateway_namespace: String,
    /// Kafka gateways as a fleet: this one's broker id.
    pub kafka_broker_id: Option<i32>,
    /// The cluster node this fleet gateway runs beside: partitions it leads follow it.
    pub kafka_broker_node: Option<String>,
    /// Kafka over TLS (`kafka_tls_listen`) and the address its clients are given.
    pub kafka_tls_listen: Listen,
    pub kafka_tls_advertised: Option<(String, u16)>,
    pub kafka_sasl: bool,
    pub kafka_auto_create_topics: bool,
    /// The Kafka ACL authorizer; `None` = off.
    pub kafka_authorizer: Option<tributary_gateway_kafka::acl::AuthorizerConfig>,
    pub kafka_ssl_principal_rules: tributary_gateway_kafka::principal::PrincipalRules,
    pub transaction_max_timeout: Duration,
    pub group_initial_rebalance_delay: Duration,
    /// The session timeouts JoinGroup accepts, in ms (Kafka's group.min/max.session.timeout.ms).
    pub group_session_timeout_ms: std::ops::RangeInclusive<i32>,
    pub mqtt_allow_anonymous: bool,
    pub mqtt_max_queued: usize,
    /// Empty: none.
    pub mqtt_dead_letter_address: Option<String>,
    /// Empty: no bridge.
    pub mqtt_exchange: Option<String>,
    pub mqtt_max_keep_alive: u16,
    pub mqtt_streams: bool,
    pub stream_exchanges: bool,
    pub mqtt_acl: tributary_gateway_mqtt::Acl,
    pub log: String,
    pub users: tributary_gateway_common::auth::Users,
}

/// The name of a setting in all three spellings, for error messages.
fn setting_name(key: &str) -> String {
    format!(
        "--{} / TRIBUTARY_{} / {key}",
        key.replace('_', "-"),
        key.to_uppercase()
    )
}

fn invalid(key: &str, value: impl ToString, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        setting: setting_name(key),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

fn parse_listen(key: &str, value: &str) -> Result<Listen, ConfigError> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(Listen::Off);
    }
    let mut addrs = value
        .to_socket_addrs()
        .map_err(|e| invalid(key, value, format!("expected HOST:PORT or off ({e})")))?;
    addrs
        .next()
        .map(Listen::At)
        .ok_or_else(|| invalid(key, value, "the host resolves to no address"))
}

fn parse_fsync(value: &str) -> Result<FsyncPolicy, ConfigError> {
    if value == "always" {
        return Ok(FsyncPolicy::Always);
    }
    let ms = value
        .strip_suffix("ms")
        .and_then(|n| n.trim().parse::<u64>().ok())
        .filter(|n| (1..=10_000).contains(n))
        .ok_or_else(|| {
            invalid(
                "fsync",
                value,
                "expected \"always\" or an interval of 1ms to 10000ms such as \"5ms\"",
            )
        })?;
    Ok(FsyncPolicy::Interval(Duration::from_millis(ms)))
}

fn resolve_opendal(
    o: &Options,
    f: &FileConfig,
    storage: StorageKind,
    data_dir: &std::path::Path,
) -> Result<Option<OpendalSettings>, ConfigError> {
    use tributary_storage::object_log::AckPoint;
    // With storage = local an [opendal] table adds the object store as a second backend
    // that streams and queues may choose; storage = memory has nowhere to keep that choice.
    match (storage, &f.opendal) {
        (StorageKind::Local, None) => return Ok(None),
        (StorageKind::Memory, None) => return Ok(None),
        (StorageKind::Memory, Some(_)) => {
            return Err(invalid(
                "storage",
                "memory",
                "cannot be combined with an [opendal] table (choose storage = local or opendal)",
            ));
        }
        _ => {}
    }
    let Some(table) = &f.opendal else {
        return Err(invalid(
            "storage",
            "opendal",
            "needs an [opendal] table in the config file with at least scheme = \"s3\" or \"fs\" and that service's options",
        ));
    };
    let mut scheme = None;
    let mut options = Vec::new();
    for (key, value) in table {
        let value = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(invalid(
                    "opendal",
                    format!("{key} = {other}"),
                    "expected a string, integer or boolean",
                ));
            }
        };
        if key == "scheme" {
            scheme = Some(value);
        } else {
            options.push((key.clone(), value));
        }
    }
    let Some(scheme) = scheme else {
        return Err(invalid(
            "opendal",
            "(no scheme)",
            "expected scheme = \"s3\", \"fs\", \"gcs\", \"azblob\" or \"memory\"",
        ));
    };
    let ack = match o
        .opendal_ack
        .clone()
        .or_else(|| f.opendal_ack.clone())
        .as_deref()
        .unwrap_or("local")
    {
        "local" => AckPoint::Local,
        "shared" => AckPoint::Shared,
        other => return Err(invalid("opendal_ack", other, "expected local or shared")),
    };
    let ms =
        |value: Option<u64>, default: u64, name: &str, range: std::ops::RangeInclusive<u64>| {
            let v = value.unwrap_or(default);
            if range.contains(&v) {
                Ok(Duration::from_millis(v))
            } else {
                Err(invalid(
                    name,
                    v,
                    format!("expected {} to {} ms", range.start(), range.end()),
                ))
            }
        };
    Ok(Some(OpendalSettings {
        scheme,
        options,
        cache_dir: o
            .opendal_cache_dir
            .clone()
            .or_else(|| f.opendal_cache_dir.clone())
            .unwrap_or_else(|| data_dir.join("cache")),
        ack,
        upload_interval: ms(
            o.opendal_upload_interval_ms
                .or(f.opendal_upload_interval_ms),
            100,
            "opendal_upload_interval_ms",
            1..=10_000,
        )?,
        seal_interval: ms(
            o.opendal_seal_interval_ms.or(f.opendal_seal_interval_ms),
            60_000,
            "opendal_seal_interval_ms",
            100..=86_400_000,
        )?,
    }))
}

fn resolve_meta(
    o: &Options,
    f: &FileConfig,
    storage: StorageKind,
) -> Result<MetaSettings, ConfigError> {
    let kind = match o
        .meta
        .clone()
        .or_else(|| f.meta.clone())
        .as_deref()
        .unwrap_or("redb")
    {
        "redb" => MetaKind::Redb,
        "etcd" => MetaKind::Etcd,
        "postgres" | "postgresql" => MetaKind::Postgres,
        "mysql" | "mariadb" => MetaKind::Mysql,
        "redis" => MetaKind::Redis,
        other => {
            return Err(invalid(
                "meta",
                other,
                "expected redb, etcd, postgres, mysql or redis",
            ));
        }
    };
    let url = o
        .meta_url
        .clone()
        .or_else(|| f.meta_url.clone())
        .filter(|u| !u.is_empty());
    match (kind, &url) {
        (MetaKind::Redb, Some(u)) => {
            return Err(invalid(
                "meta_url",
                tributary_storage::redact_url(u),
                "is only used with meta = etcd, postgres, mysql or redis",
            ));
        }
        (MetaKind::Redb, None) => {}
        (_, None) => {
            return Err(invalid(
                "meta_url",
                "(unset)",
                "is required with this meta store, for example http://127.0.0.1:2379 (etcd), postgres://user@host/db, mysql://user:password@host/db or redis://127.0.0.1:6379",
            ));
        }
        (_, Some(_)) => {}
    }
    if storage == StorageKind::Memory && kind != MetaKind::Redb {
        return Err(invalid(
            "meta",
            format!("{kind:?}").to_lowercase(),
            "storage = memory keeps its metadata in memory too; choose storage = local or opendal",
        ));
    }
    let namespace = o
        .meta_namespace
        .clone()
        .or_else(|| f.meta_namespace.clone())
        .unwrap_or_else(|| "tributary".into());
    if namespace.is_empty()
        || namespace.len() > 40
        || !namespace
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(invalid(
            "meta_namespace",
            &namespace,
            "expected 1 to 40 characters of a-z, 0-9 and _",
        ));
    }
    Ok(MetaSettings {
        kind,
        url,
        namespace,
    })
}

impl Settings {
    pub fn from_cli(options: &Options, role: Role) -> Result<Self, ConfigError> {
        let file = match &options.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        Self::resolve_for(options, &file, role)
    }

    /// The settings of the standalone server.
    pub fn resolve(o: &Options, f: &FileConfig) -> Result<Self, ConfigError> {
        Self::resolve_for(o, f, Role::Standalone)
    }

    pub fn resolve_for(o: &Options, f: &FileConfig, role: Role) -> Result<Self, ConfigError> {
        macro_rules! pick {
            ($field:ident, $default:expr) => {
                o.$field
                    .clone()
                    .or_else(|| f.$field.clone())
                    .unwrap_or_else(|| $default.into())
            };
        }
        macro_rules! listen {
            ($field:ident, $default:expr) => {
                parse_listen(stringify!($field), &pick!($field, $default))?
            };
        }
        let storage = match pick!(storage, "local").as_str() {
            "local" => StorageKind::Local,
            "memory" => StorageKind::Memory,
            "opendal" => StorageKind::Opendal,
            other => {
                return Err(invalid(
                    "storage",
                    other,
                    "expected local, memory or opendal",
                ));
            }
        };
        let data_dir: PathBuf = pick!(data_dir, PathBuf::from("./data"));
        let opendal = resolve_opendal(o, f, storage, &data_dir)?;
        let meta = resolve_meta(o, f, storage)?;
        let cluster = resolve_cluster(o, f, role, storage, opendal.as_ref(), &meta)?;
        let segment_bytes: u64 = pick!(segment_bytes, 1u64 << 30);
        if !(1 << 20..=1 << 40).contains(&segment_bytes) {
            return Err(invalid(
                "segment_bytes",
                segment_bytes,
                "expected 1 MiB to 1 TiB",
            ));
        }
        let default_partitions: u32 = pick!(default_partitions, 1u32);
        if !(1..=10_000).contains(&default_partitions) {
            return Err(invalid(
                "default_partitions",
                default_partitions,
                "expected 1 to 10000",
            ));
        }
        let retention_ms: i64 = pick!(retention_ms, 7 * 24 * 3600 * 1000i64);
        if retention_ms < -1 {
            return Err(invalid(
                "retention_ms",
                retention_ms,
                "expected -1 (forever) or a number of ms",
            ));
        }
        let retention_bytes: i64 = pick!(retention_bytes, -1i64);
        if retention_bytes < -1 {
            return Err(invalid(
                "retention_bytes",
                retention_bytes,
                "expected -1 (unlimited) or a number of bytes",
            ));
        }
        let max_message_bytes: i64 = pick!(max_message_bytes, 1_048_588i64);
        if !(1..=1 << 30).contains(&max_message_bytes) {
            return Err(invalid(
                "max_message_bytes",
                max_message_bytes,
                "expected 1 to 1073741824",
            ));
        }
        let check_ms: u64 = pick!(retention_check_interval_ms, 300_000u64);
        if check_ms < 10 {
            return Err(invalid(
                "retention_check_interval_ms",
                check_ms,
                "expected at least 10",
            ));
        }
        let core_token = resolve_core_token(o, f)?;
        let (core_listen_default, admin_listen_default) = match role {
            Role::Core => ("0.0.0.0:7400", "0.0.0.0:7480"),
            Role::Standalone => ("127.0.0.1:7400", "127.0.0.1:7480"),
            // A gateway process serves no core; its admin listener (health, metrics, its
            // connections) is opt-in, so that several gateways on one host do not contend
            // for one default port.
            Role::Gateway => ("127.0.0.1:7400", "off"),
        };
        let core = pick!(core, "http://127.0.0.1:7400");
        if !(core.starts_with("http://") || core.starts_with("https://")) {
            return Err(invalid(
                "core",
                &core,
                "expected a URL such as http://127.0.0.1:7400",
            ));
        }
        let advertised = |key: &str, given: Option<String>| -> Result<_, ConfigError> {
            let Some(v) = given.filter(|v| !v.is_empty()) else {
                return Ok(None);
            };
            {
                let (host, port) = v
                    .rsplit_once(':')
                    .and_then(|(h, p)| {
                        Some((
                            h.trim_matches(|c| c == '[' || c == ']'),
                            p.parse::<u16>().ok()?,
                        ))
                    })
                    .filter(|(h, p)| !h.is_empty() && *p != 0)
                    .ok_or_else(|| invalid(key, &v, "expected HOST:PORT with a non-zero port"))?;
                Ok(Some((host.to_string(), port)))
            }
        };
        // -1 (the example's default): not part of a fleet.
        let kafka_broker_id = o
            .kafka_broker_id
            .or(f.kafka_broker_id)
            .filter(|id| *id != -1);
        if let Some(id) = kafka_broker_id
            && id < 0
        {
            return Err(invalid(
                "kafka_broker_id",
                id,
                "expected 0 to 2147483647 (or -1: not part of a fleet)",
            ));
        }
        let kafka_broker_node = o
            .kafka_broker_node
            .clone()
            .or_else(|| f.kafka_broker_node.clone())
            .filter(|n| !n.is_empty());
        if let Some(node) = &kafka_broker_node {
            if kafka_broker_id.is_none() {
                return Err(invalid(
                    "kafka_broker_node",
                    node,
                    "the node a fleet gateway runs beside: give kafka_broker_id too",
                ));
            }
            if !valid_node_name(node) {
                return Err(invalid(
                    "kafka_broker_node",
                    node,
                    "expected a cluster_node name: 1 to 64 characters of A-Z, a-z, 0-9, '-', '_' and '.'",
                ));
            }
        }
        let kafka_advertised = advertised(
            "kafka_advertised",
            o.kafka_advertised
                .clone()
                .or_else(|| f.kafka_advertised.clone()),
        )?;
        let kafka_tls_advertised = advertised(
            "kafka_tls_advertised",
            o.kafka_tls_advertised
                .clone()
                .or_else(|| f.kafka_tls_advertised.clone()),
        )?;
        let mut users = tributary_gateway_common::auth::Users::new();
        for u in &f.users {
            if u.name.is_empty() || u.credentials.is_empty() {
                return Err(invalid(
                    "users",
                    &u.name,
                    "each [[users]] entry needs a name and credentials",
                ));
            }
            // SCRAM credentials (`tributary passwd`) and, from `tributary import rabbitmq`,
            // RabbitMQ password hashes (plain-password logins only).
            users
                .add_credential_texts(&u.name, &u.credentials)
                .map_err(|e| invalid("users", &u.name, e))?;
        }
        let kafka_sasl = pick!(kafka_sasl, false);
        // No [[users]] with SASL on is allowed: users may live in the core (`tributary users
        // add`), and until one exists nobody logs in, which is the safe side.
        let kafka_ssl_principal_rules =
            match pick!(kafka_ssl_principal_mapping_rules, String::new()) {
                r if r.trim().is_empty() => {
                    tributary_gateway_kafka::principal::PrincipalRules::default()
                }
                r => tributary_gateway_kafka::principal::PrincipalRules::parse(&r)
                    .map_err(|e| invalid("kafka_ssl_principal_mapping_rules", &r, e.to_string()))?,
            };
        let transaction_max_timeout = match pick!(transaction_max_timeout_ms, 900_000u64) {
            0 => {
                return Err(invalid(
                    "transaction_max_timeout_ms",
                    "0",
                    "must be at least 1".to_string(),
                ));
            }
            ms => Duration::from_millis(ms.min(i32::MAX as u64)),
        };
        // Whether Kafka connections have users is known once tls_client_auth is read below.
        let kafka_authorizer = if pick!(kafka_authorizer, false) {
            let super_users: Vec<String> = pick!(kafka_super_users, Vec::<String>::new())
                .into_iter()
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect();
            // Super users may name users kept in the core, which the file does not know.
            Some(tributary_gateway_kafka::acl::AuthorizerConfig::new(
                super_users,
                pick!(kafka_allow_if_no_acl, false),
            ))
        } else {
            None
        };
        let mut mqtt_acl = tributary_gateway_mqtt::Acl::default();
        for (i, a) in f.mqtt_acl.iter().enumerate() {
            let what = format!("entry {}", i + 1);
            let action = match a.action.as_str() {
                "publish" => tributary_gateway_mqtt::Action::Publish,
                "subscribe" => tributary_gateway_mqtt::Action::Subscribe,
                "all" => tributary_gateway_mqtt::Action::Both,
                other => {
                    return Err(invalid(
                        "mqtt_acl",
                        format!("{what}: action {other}"),
                        "expected publish, subscribe or all",
                    ));
                }
            };
            let allow = match a.permission.as_str() {
                "allow" => true,
                "deny" => false,
                other => {
                    return Err(invalid(
                        "mqtt_acl",
                        format!("{what}: permission {other}"),
                        "expected allow or deny",
                    ));
                }
            };
            if !tributary_gateway_mqtt::topic::valid_filter(&a.filter) {
                return Err(invalid(
                    "mqtt_acl",
                    format!("{what}: filter {}", a.filter),
                    "expected a topic filter such as sensors/%u/#",
                ));
            }
            mqtt_acl.rules.push(tributary_gateway_mqtt::AclRule {
                user: a.user.clone(),
                client: a.client.clone(),
                action,
                filter: a.filter.clone(),
                allow,
            });
        }
        let non_empty = |p: Option<PathBuf>| p.filter(|p| !p.as_os_str().is_empty());
        let tls = match (
            non_empty(o.tls_cert.clone().or_else(|| f.tls_cert.clone())),
            non_empty(o.tls_key.clone().or_else(|| f.tls_key.clone())),
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "tls_key",
                    "",
                    "tls_cert is set: give its private key too",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tls_cert",
                    "",
                    "tls_key is set: give the certificate too",
                ));
            }
        };
        // A TLS listener is on by default once a certificate is given, and refused without one.
        let tls_listener =
            |key: &str, given: String, default: &str| -> Result<Listen, ConfigError> {
                match (given.as_str(), &tls) {
                    ("", Some(_)) => parse_listen(key, default),
                    ("", None) => Ok(Listen::Off),
                    (v, tls) => {
                        let l = parse_listen(key, v)?;
                        if l != Listen::Off && tls.is_none() {
                            return Err(invalid(
                                key,
                                v,
                                "a TLS listener needs tls_cert and tls_key (PEM files)",
                            ));
                        }
                        Ok(l)
                    }
                }
            };
        let tls_client_ca = non_empty(o.tls_client_ca.clone().or_else(|| f.tls_client_ca.clone()));
        let tls_clients = match (pick!(tls_client_auth, "none").as_str(), tls_client_ca) {
            ("none", _) => ClientCerts::None,
            ("requested", Some(ca)) => ClientCerts::Optional(ca),
            ("required", Some(ca)) => ClientCerts::Required(ca),
            (v @ ("requested" | "required"), None) => {
                return Err(invalid(
                    "tls_client_auth",
                    v,
                    "client certificates are verified against tls_client_ca: give that PEM file",
                ));
            }
            (v, _) => {
                return Err(invalid(
                    "tls_client_auth",
                    v,
                    "expected none, requested or required",
                ));
            }
        };
        if kafka_authorizer.is_some()
            && !kafka_sasl
            && !matches!(tls_clients, ClientCerts::Required(_))
        {
            return Err(invalid(
                "kafka_authorizer",
                "true",
                "Kafka ACLs are per user: set kafka_sasl = true (SASL users), or tls_client_auth = \"required\" (certificate principals on the Kafka TLS listener)",
            ));
        }
        let needs_cert = |key: &str, on: bool| -> Result<(), ConfigError> {
            if on && tls.is_none() {
                return Err(invalid(
                    key,
                    "true",
                    "TLS needs tls_cert and tls_key (PEM files)",
                ));
            }
            Ok(())
        };
        let core_tls = pick!(core_tls, false);
        needs_cert("core_tls", core_tls)?;
        let admin_tls = pick!(admin_tls, false);
        needs_cert("admin_tls", admin_tls)?;
        let core_tls_client_ca = non_empty(
            o.core_tls_client_ca
                .clone()
                .or_else(|| f.core_tls_client_ca.clone()),
        );
        if core_tls_client_ca.is_some() && !core_tls {
            return Err(invalid(
                "core_tls_client_ca",
                "",
                "client certificates need the core API over TLS: set core_tls too",
            ));
        }
        let reload_ms: u64 = pick!(tls_reload_interval_ms, 10_000u64);
        let core_client_tls = CoreClientTls {
            ca: non_empty(o.core_ca.clone().or_else(|| f.core_ca.clone())),
            identity: match (
                non_empty(
                    o.core_client_cert
                        .clone()
                        .or_else(|| f.core_client_cert.clone()),
                ),
                non_empty(
                    o.core_client_key
                        .clone()
                        .or_else(|| f.core_client_key.clone()),
                ),
            ) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                _ => {
                    return Err(invalid(
                        "core_client_cert",
                        "",
                        "give both core_client_cert and core_client_key, or neither",
                    ));
                }
            },
        };
        let mqtt_allow_anonymous = pick!(mqtt_allow_anonymous, true);
        let mqtt_tls_listen = tls_listener(
            "mqtt_tls_listen",
            pick!(mqtt_tls_listen, ""),
            &default_listen(!mqtt_allow_anonymous, 8883),
        )?;
        let mqtt_wss_listen = tls_listener(
            "mqtt_wss_listen",
            pick!(mqtt_wss_listen, ""),
            &default_listen(!mqtt_allow_anonymous, 8084),
        )?;
        let amqp_tls_listen = tls_listener(
            "amqp_tls_listen",
            pick!(amqp_tls_listen, ""),
            "0.0.0.0:5671",
        )?;
        let kafka_tls_listen = tls_listener(
            "kafka_tls_listen",
            pick!(kafka_tls_listen, ""),
            &default_listen(kafka_sasl, 9093),
        )?;
        let amqp_vhosts = f.amqp_vhosts.clone().unwrap_or_else(|| vec!["/".into()]);
        if let Some(v) = amqp_vhosts.iter().find(|v| v.is_empty() || v.len() > 255) {
            return Err(invalid("amqp_vhosts", v, "a vhost name is 1 to 255 bytes"));
        }
        let mut amqp_permissions = Vec::new();
        for p in &f.amqp_permissions {
            if !amqp_vhosts.contains(&p.vhost) {
                return Err(invalid(
                    "amqp_permissions",
                    &p.vhost,
                    "the vhost is not listed in amqp_vhosts",
                ));
            }
            amqp_permissions.push(tributary_gateway_amqp::Permission {
                user: p.user.clone(),
                vhost: p.vhost.clone(),
            });
        }
        let gateway_namespace = o
            .gateway_namespace
            .clone()
            .or_else(|| f.gateway_namespace.clone())
            .unwrap_or_else(|| tributary_core::DEFAULT_NAMESPACE.into());
        tributary_core::meta::validate_name("namespace", &gateway_namespace)
            .map_err(|e| invalid("gateway_namespace", &gateway_namespace, e.to_string()))?;
        let mut mqtt_stream_rules = Vec::new();
        for (i, r) in f.mqtt_stream_rules.iter().enumerate() {
            let what = format!("entry {}", i + 1);
            if !tributary_gateway_mqtt::topic::valid_filter(&r.filter)
                || r.filter.starts_with("$share/")
            {
                return Err(invalid(
                    "mqtt_stream_rules",
                    format!("{what}: filter {}", r.filter),
                    "expected a topic filter such as sensors/#",
                ));
            }
            if r.stream.is_empty() || r.stream.len() > 255 {
                return Err(invalid(
                    "mqtt_stream_rules",
                    format!("{what}: stream {}", r.stream),
                    "a stream name is 1 to 255 bytes",
                ));
            }
            mqtt_stream_rules.push((
                r.namespace
                    .clone()
                    .unwrap_or_else(|| gateway_namespace.clone()),
                r.filter.clone(),
                r.stream.clone(),
            ));
        }
        let kafka_listen_default = default_listen(kafka_sasl, 9092);
        let mqtt_listen_default = default_listen(!mqtt_allow_anonymous, 1883);
        let mqtt_ws_listen_default = default_listen(!mqtt_allow_anonymous, 8083);
        let sqs = sqs_settings(o, f)?;
        let sqs_listen_default = default_listen(!sqs.credentials.is_empty(), 9324);
        let group_session_timeout_ms = {
            let min: u32 = pick!(group_min_session_timeout_ms, 6_000u32);
            let max: u32 = pick!(group_max_session_timeout_ms, 1_800_000u32);
            if min == 0 {
                return Err(invalid(
                    "group_min_session_timeout_ms",
                    0,
                    "expected at least 1",
                ));
            }
            if max > i32::MAX as u32 {
                return Err(invalid(
                    "group_max_session_timeout_ms",
                    max,
                    format!("expected at most {}", i32::MAX),
                ));
            }
            if max < min {
                return Err(invalid(
                    "group_max_session_timeout_ms",
                    max,
                    format!("expected at least group_min_session_timeout_ms ({min})"),
                ));
            }
            min as i32..=max as i32
        };
        let mqtt_max_queued: usize = pick!(mqtt_max_queued, 100_000usize);
        if mqtt_max_queued == 0 {
            return Err(invalid("mqtt_max_queued", 0, "expected at least 1"));
        }
        let mqtt_dead_letter_address = o
            .mqtt_dead_letter_address
            .clone()
            .or_else(|| f.mqtt_dead_letter_address.clone())
            .filter(|a| !a.is_empty());
        let mqtt_exchange = Some(pick!(mqtt_exchange, "amq.topic")).filter(|e| !e.is_empty());
        // Streams spread over shards cannot double as their namespace's MQTT topics or
        // exchanges yet (both live at the namespace's home): off, and refused when asked for.
        let streams_spread = cluster
            .as_ref()
            .is_some_and(|c| c.scheme == tributary_core::Scheme::Stream);
        if streams_spread {
            for (key, asked) in [
                ("mqtt_streams", o.mqtt_streams.or(f.mqtt_streams)),
                (
                    "stream_exchanges",
                    o.stream_exchanges.or(f.stream_exchanges),
                ),
            ] {
                if asked == Some(true) {
                    return Err(invalid(
                        key,
                        true,
                        "not with cluster_shard_scheme = stream (a stream is not in its namespace's shard)",
                    ));
                }
            }
            if !mqtt_stream_rules.is_empty() {
                return Err(invalid(
                    "mqtt_stream_rules",
                    format!("{} entries", mqtt_stream_rules.len()),
                    "not with cluster_shard_scheme = stream (a rule's stream is not in its namespace's shard)",
                ));
            }
        }
        Ok(Self {
            mqtt_dead_letter_address,
            mqtt_exchange,
            mqtt_max_keep_alive: pick!(mqtt_max_keep_alive, 0u16),
            mqtt_streams: !streams_spread && pick!(mqtt_streams, true),
            stream_exchanges: !streams_spread && pick!(stream_exchanges, true),
            mqtt_tls_listen,
            mqtt_wss_listen,
            tls,
            tls_clients,
            tls_reload_interval: (reload_ms > 0).then(|| Duration::from_millis(reload_ms)),
            core_tls,
            core_tls_client_ca,
            admin_tls,
            core_client_tls,
            mqtt_allow_anonymous,
            mqtt_max_queued,
            mqtt_acl,
            kafka_advertised,
            gateway_namespace,
            kafka_broker_id,
            kafka_broker_node,
            kafka_tls_listen,
            kafka_tls_advertised,
            kafka_sasl,
            kafka_auto_create_topics: pick!(kafka_auto_create_topics, true),
            kafka_authorizer,
            kafka_ssl_principal_rules,
            transaction_max_timeout,
            group_initial_rebalance_delay: Duration::from_millis(pick!(
                group_initial_rebalance_delay_ms,
                3000u64
            )),
            group_session_timeout_ms,
            users,
            amqp_vhosts,
            amqp_permissions,
            mqtt_stream_rules,
            amqp_tls_listen,
            data_dir,
            core_listen: listen!(core_listen, core_listen_default),
            core_token,
            core_insecure: pick!(core_insecure, false),
            admin_listen: listen!(admin_listen, admin_listen_default),
            kafka_listen: listen!(kafka_listen, kafka_listen_default.as_str()),
            mqtt_listen: listen!(mqtt_listen, mqtt_listen_default.as_str()),
            mqtt_ws_listen: listen!(mqtt_ws_listen, mqtt_ws_listen_default.as_str()),
            amqp_listen: listen!(amqp_listen, "0.0.0.0:5672"),
            sqs_listen: listen!(sqs_listen, sqs_listen_default.as_str()),
            sqs,
            // No RocketMQ ACL here: loopback unless an address is given.
            rocketmq_listen: listen!(rocketmq_listen, "127.0.0.1:10911"),
            namesrv_listen: listen!(namesrv_listen, "127.0.0.1:9876"),
            rocketmq_advertised: match pick!(rocketmq_advertised, String::new()) {
                a if a.is_empty() => None,
                a => Some(a.parse().map_err(|_| {
                    invalid(
                        "rocketmq_advertised",
                        &a,
                        "expected IP:PORT (RocketMQ message ids carry the broker's IP address)",
                    )
                })?),
            },
            rocketmq_auto_create_topics: pick!(rocketmq_auto_create_topics, true),
            rocketmq_transaction_check_interval: Duration::from_millis(
                pick!(rocketmq_transaction_check_interval_ms, 60_000u64).max(1),
            ),
            rocketmq_transaction_timeout: Duration::from_millis(pick!(
                rocketmq_transaction_timeout_ms,
                6_000u64
            )),
            rocketmq_transaction_check_max: pick!(rocketmq_transaction_check_max, 15u32),
            max_connections: NonZeroUsize::new(pick!(max_connections, 0usize)),
            core,
            cluster,
            storage,
            opendal,
            meta,
            fsync: parse_fsync(&pick!(fsync, "always"))?,
            segment_bytes,
            default_partitions,
            auto_create_streams: pick!(auto_create_streams, true),
            retention_ms,
            retention_bytes,
            max_message_bytes,
            retention_check_interval: Duration::from_millis(check_ms),
            log: pick!(log, "info"),
        })
    }

    /// The gateway listeners, by protocol name and the flag that sets each.
    pub fn gateway_listeners(&self) -> [(&'static str, &'static str, Listen); 11] {
        [
            ("kafka", "--kafka-listen", self.kafka_listen),
            ("kafka-tls", "--kafka-tls-listen", self.kafka_tls_listen),
            ("mqtt", "--mqtt-listen", self.mqtt_listen),
            ("mqtt-ws", "--mqtt-ws-listen", self.mqtt_ws_listen),
            ("mqtt-tls", "--mqtt-tls-listen", self.mqtt_tls_listen),
            ("mqtt-wss", "--mqtt-wss-listen", self.mqtt_wss_listen),
            ("amqp", "--amqp-listen", self.amqp_listen),
            ("amqp-tls", "--amqp-tls-listen", self.amqp_tls_listen),
            ("sqs", "--sqs-listen", self.sqs_listen),
            ("rocketmq", "--rocketmq-listen", self.rocketmq_listen),
            ("rocketmq-namesrv", "--namesrv-listen", self.namesrv_listen),
        ]
    }
}

/// Secure by default: the default address of a protocol listener is loopback while the
/// protocol lets clients in without credentials (Mosquitto 2 does the same; TLS encrypts,
/// it does not authenticate), every interface once they must authenticate, as the
/// protocol's own brokers do. An address given explicitly is used as given.
fn default_listen(authenticated: bool, port: u16) -> String {
    if authenticated {
        format!("0.0.0.0:{port}")
    } else {
        format!("127.0.0.1:{port}")
    }
}

/// The SQS gateway's account, region and access keys.
fn sqs_settings(
    o: &Options,
    f: &FileConfig,
) -> Result<tributary_gateway_sqs::SqsConfig, ConfigError> {
    let region = o
        .sqs_region
        .clone()
        .or_else(|| f.sqs_region.clone())
        .unwrap_or_else(|| "us-east-1".into());
    if region.is_empty()
        || !region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(
            "sqs_region",
            &region,
            "expected a region name such as us-east-1",
        ));
    }
    let account_id = o
        .sqs_account_id
        .clone()
        .or_else(|| f.sqs_account_id.clone())
        .unwrap_or_else(|| "000000000000".into());
    if account_id.len() != 12 || !account_id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("sqs_account_id", &account_id, "expected 12 digits"));
    }
    let mut credentials = Vec::new();
    for c in &f.sqs_credentials {
        if c.access_key_id.is_empty() || c.secret_access_key.is_empty() {
            return Err(invalid(
                "sqs_credentials",
                &c.access_key_id,
                "an access key needs access_key_id and secret_access_key",
            ));
        }
        if credentials
            .iter()
            .any(|k: &tributary_gateway_sqs::Credential| k.access_key_id == c.access_key_id)
        {
            return Err(invalid("sqs_credentials", &c.access_key_id, "listed twice"));
        }
        credentials.push(tributary_gateway_sqs::Credential {
            access_key_id: c.access_key_id.clone(),
            secret_access_key: c.secret_access_key.clone(),
        });
    }
    Ok(tributary_gateway_sqs::SqsConfig {
        region,
        account_id,
        credentials,
        ..Default::default()
    })
}

/// `core_token`, or the first line of the file `core_token_file` (not both).
fn resolve_core_token(
    o: &Options,
    f: &FileConfig,
) -> Result<Option<crate::auth::CoreToken>, ConfigError> {
    let token = o
        .core_token
        .clone()
        .or_else(|| f.core_token.clone())
        .filter(|t| !t.is_empty());
    let file = o
        .core_token_file
        .clone()
        .or_else(|| f.core_token_file.clone())
        .filter(|p| !p.as_os_str().is_empty());
    let (key, text) = match (token, file) {
        (None, None) => return Ok(None),
        (Some(_), Some(p)) => {
            return Err(invalid(
                "core_token_file",
                p.display(),
                "core_token is set too: give one of them",
            ));
        }
        (Some(t), None) => ("core_token", t),
        (None, Some(p)) => {
            let text = std::fs::read_to_string(&p)
                .map_err(|e| invalid("core_token_file", p.display(), e))?;
            let first = text.lines().next().unwrap_or_default().trim().to_string();
            ("core_token_file", first)
        }
    };
    // Never echo the secret in the error.
    crate::auth::CoreToken::new(&text)
        .map(Some)
        .map_err(|reason| invalid(key, "<redacted>", reason))
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.into(),
        // toml's message names the key and line; keep it to one line.
        message: e
            .to_string()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join(" "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_beats_file_beats_default() {
        let file = FileConfig {
            kafka_listen: Some("127.0.0.1:1".into()),
            mqtt_listen: Some("off".into()),
            ..Default::default()
        };
        let opts = Options {
            kafka_listen: Some("127.0.0.1:2".into()),
            ..Default::default()
        };
        let s = Settings::resolve(&opts, &file).unwrap();
        assert_eq!(s.core_listen, Listen::At("127.0.0.1:7400".parse().unwrap()));
        assert_eq!(
            s.admin_listen,
            Listen::At("127.0.0.1:7480".parse().unwrap())
        );
        assert_eq!(s.kafka_listen, Listen::At("127.0.0.1:2".parse().unwrap()));
        assert_eq!(s.mqtt_listen, Listen::Off);
        assert_eq!(s.amqp_listen, Listen::At("0.0.0.0:5672".parse().unwrap()));
        assert_eq!(s.fsync, FsyncPolicy::Always);
    }

    #[test]
    fn the_kafka_authorizer_needs_sasl_and_known_super_users() {
        use tributary_gateway_common::auth::{ScramCredential, ScramHash};
        let credential = ScramCredential::derive(ScramHash::Sha256, "secret", 4096).to_text();
        let users = format!("[[users]]\nname = \"admin\"\ncredentials = [\"{credential}\"]\n");
        let file: FileConfig =
            toml::from_str(&format!("kafka_authorizer = true\n{users}")).unwrap();
        let e = Settings::resolve(&Options::default(), &file)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("kafka_authorizer") && e.contains("kafka_sasl"),
            "{e}"
        );
        // A super user need not be in the file: it may be a user kept in the core.
        let file: FileConfig = toml::from_str(&format!(
            "kafka_sasl = true\nkafka_authorizer = true\nkafka_super_users = [\"root\"]\n{users}"
        ))
        .unwrap();
        let s = Settings::resolve(&Options::default(), &file).unwrap();
        assert_eq!(
            s.kafka_authorizer.expect("authorizer on").super_users,
            vec!["root".to_string()]
        );
        let file: FileConfig = toml::from_str(&format!(
            "kafka_sasl = true\nkafka_authorizer = true\nkafka_super_users = [\"admin\"]\n{users}"
        ))
        .unwrap();
        let s = Settings::resolve(&Options::default(), &file).unwrap();
        let a = s.kafka_authorizer.expect("authorizer on");
        assert_eq!(a.super_users, vec!["admin".to_string()]);
        assert!(!a.allow_if_no_acl);
        // Off by default, so existing deployments keep working.
        let s = Settings::resolve(&Options::default(), &FileConfig::default()).unwrap();
        assert!(s.kafka_authorizer.is_none());
    }

    #[test]
    fn protocols_without_client_authentication_default_to_loopback() {
        let s = Settings::resolve(&Options::default(), &FileConfig::default()).unwrap();
        assert_eq!(
            s.kafka_listen,
            Listen::At("127.0.0.1:9092".parse().unwrap())
        );
        assert_eq!(s.mqtt_listen, Listen::At("127.0.0.1:1883".parse().unwrap()));
        assert_eq!(
            s.mqtt_ws_listen,
            Listen::At("127.0.0.1:8083".parse().unwrap())
        );
        // AMQP always authenticates (guest only from loopback).
        assert_eq!(s.amqp_listen, Listen::At("0.0.0.0:5672".parse().unwrap()));

        use tributary_gateway_common::auth::{ScramCredential, ScramHash};
        let credential = ScramCredential::derive(ScramHash::Sha256, "secret", 4096).to_text();
        let file: FileConfig = toml::from_str(&format!(
            "kafka_sasl = true\nmqtt_allow_anonymous = false\n\
             [[users]]\nname = \"app\"\ncredentials = [\"{credential}\"]\n"
        ))
        .unwrap();
        let s = Settings::resolve(&Options::default(), &file).unwrap();
        assert_eq!(s.kafka_listen, Listen::At("0.0.0.0:9092".parse().unwrap()));
        assert_eq!(s.mqtt_listen, Listen::At("0.0.0.0:1883".parse().unwrap()));
        assert_eq!(
            s.mqtt_ws_listen,
            Listen::At("0.0.0.0:8083".parse().unwrap())
        );
        // Asked for explicitly: taken as asked.
        let opts = Options {
            kafka_listen: Some("0.0.0.0:9093".into()),
            ..Default::default()
        };
        let s = Settings::resolve(&opts, &FileConfig::default()).unwrap();
        assert_eq!(s.kafka_listen, Listen::At("0.0.0.0:9093".parse().unwrap()));
    }

    #[test]
    fn sqs_listens_on_loopback_until_it_has_access_keys() {
        let s = Settings::resolve(&Options::default(), &FileConfig::default()).unwrap();
        assert_eq!(s.sqs_listen, Listen::At("127.0.0.1:9324".parse().unwrap()));
        assert_eq!(
            (s.sqs.region.as_str(), s.sqs.account_id.as_str()),
            ("us-east-1", "000000000000")
        );
        let file: FileConfig = toml::from_str(
            "sqs_region = \"eu-west-1\"\n[[sqs_credentials]]\naccess_key_id = \"AK\"\nsecret_access_key = \"s\"\n",
        )
        .unwrap();
        let s = Settings::resolve(&Options::default(), &file).unwrap();
        assert_eq!(s.sqs_listen, Listen::At("0.0.0.0:9324".parse().unwrap()));
        assert_eq!(s.sqs.region, "eu-west-1");
        assert_eq!(s.sqs.credentials[0].access_key_id, "AK");
        for bad in [
            "sqs_account_id = \"12\"",
            "sqs_region = \"Not A Region\"",
            "[[sqs_credentials]]\naccess_key_id = \"AK\"\nsecret_access_key = \"\"",
        ] {
            let file: FileConfig = toml::from_str(bad).unwrap();
            let e = Settings::resolve(&Options::default(), &file).unwrap_err();
            assert!(e.to_string().contains("sqs_"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_fleet_gateway_names_the_node_it_runs_beside() {
        let resolve = |toml: &str| {
            let file: FileConfig = toml::from_str(toml).unwrap();
            Settings::resolve(&Options::default(), &file)
        };
        let s = resolve("kafka_broker_id = 2\nkafka_broker_node = \"core-2\"").unwrap();
        assert_eq!(
            (s.kafka_broker_id, s.kafka_broker_node.as_deref()),
            (Some(2), Some("core-2"))
        );
        for bad in [
            "kafka_broker_node = \"core-2\"",
            "kafka_broker_id = 2\nkafka_broker_node = \"core 2\"",
        ] {
            let e = resolve(bad).unwrap_err();
            assert!(e.to_string().contains("kafka_broker_node"), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_values_name_the_setting() {
        let opts = Options {
            fsync: Some("sometimes".into()),
            ..Default::default()
        };
        let e = Settings::resolve(&opts, &FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--fsync / TRIBUTARY_FSYNC / fsync"), "{e}");
        let opts = Options {
            core_listen: Some("nonsense".into()),
            ..Default::default()
        };
        let e = Settings::resolve(&opts, &FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--core-listen"), "{e}");
        assert_eq!(
            parse_fsync("5ms").unwrap(),
            FsyncPolicy::Interval(Duration::from_millis(5))
        );
    }

    #[test]
    fn group_session_timeouts_default_to_kafkas_and_must_form_a_range() {
        let s = Settings::resolve(&Options::default(), &FileConfig::default()).unwrap();
        assert_eq!(s.group_session_timeout_ms, 6_000..=1_800_000);
        let file = FileConfig {
            group_min_session_timeout_ms: Some(1_000),
            group_max_session_timeout_ms: Some(60_000),
            ..Default::default()
        };
        let s = Settings::resolve(&Options::default(), &file).unwrap();
        assert_eq!(s.group_session_timeout_ms, 1_000..=60_000);
        let opts = Options {
            group_min_session_timeout_ms: Some(500),
            ..Default::default()
        };
        let s = Settings::resolve(&opts, &file).unwrap();
        assert_eq!(s.group_session_timeout_ms, 500..=60_000);
        for (min, max, key) in [
            (Some(0), None, "group_min_session_timeout_ms"),
            (Some(10_000), Some(9_999), "group_max_session_timeout_ms"),
            (None, Some(u32::MAX), "group_max_session_timeout_ms"),
        ] {
            let opts = Options {
                group_min_session_timeout_ms: min,
                group_max_session_timeout_ms: max,
                ..Default::default()
            };
            let e = Settings::resolve(&opts, &FileConfig::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn the_split_core_listens_on_every_interface_by_default() {
        let s =
            Settings::resolve_for(&Options::default(), &FileConfig::default(), Role::Core).unwrap();
        assert_eq!(s.core_listen, Listen::At("0.0.0.0:7400".parse().unwrap()));
        assert_eq!(s.admin_listen, Listen::At("0.0.0.0:7480".parse().unwrap()));
        assert!(s.core_token.is_none() && !s.core_insecure);
    }

    #[test]
    fn a_gateway_process_opens_an_admin_listener_only_when_given_one() {
        let s = Settings::resolve_for(&Options::default(), &FileConfig::default(), Role::Gateway)
            .unwrap();
        assert_eq!(s.admin_listen, Listen::Off);
        let s = Settings::resolve_for(
            &Options::default(),
            &FileConfig::default(),
            Role::Standalone,
        )
        .unwrap();
        assert_eq!(
            s.admin_listen,
            Listen::At("127.0.0.1:7480".parse().unwrap())
        );
    }

    #[test]
    fn the_core_token_comes_from_a_value_or_a_file_never_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        let opts = Options {
            core_token_file: Some(path.clone()),
            ..Default::default()
        };
        let s = Settings::resolve(&opts, &FileConfig::default()).unwrap();
        assert_eq!(s.core_token.unwrap().expose(), "0123456789abcdef0123");
        let file = FileConfig {
            core_token: Some("0123456789abcdef0123".into()),
            ..Default::default()
        };
        let e = Settings::resolve(&opts, &file).unwrap_err().to_string();
        assert!(
            e.contains("core_token_file") && e.contains("one of them"),
            "{e}"
        );
        let opts = Options {
            core_token: Some("tooshort".into()),
            ..Default::default()
        };
        let e = Settings::resolve(&opts, &FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--core-token / TRIBUTARY_CORE_TOKEN / core_token"),
            "{e}"
        );
        assert!(!e.contains("tooshort"), "the secret is not echoed: {e}");
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(&path, "data_dir = \"x\"\nkafka_lisen = \"0.0.0.0:1\"\n").unwrap();
        let e = load_file(&path).unwrap_err().to_string();
        assert!(e.contains("kafka_lisen"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn opendal_and_meta_settings() {
        use tributary_storage::object_log::AckPoint;
        let file: FileConfig = toml::from_str(
            "storage = \"opendal\"\nopendal_ack = \"shared\"\nmeta = \"etcd\"\nmeta_url = \"http://127.0.0.1:2379\"\n\
             [opendal]\nscheme = \"s3\"\nbucket = \"b\"\nsecret_access_key = \"hush\"\nenable_virtual_host_style = false\n",
        )
        .unwrap();
        let s = Settings::resolve(&Options::default(), &file).unwrap();
        let o = s.opendal.as_ref().unwrap();
        assert_eq!(o.scheme, "s3");
        assert_eq!(o.ack, AckPoint::Shared);
        assert_eq!(o.cache_dir, PathBuf::from("./data/cache"));
        assert!(o.options.contains(&("bucket".into(), "b".into())));
        assert!(
            o.options
                .contains(&("enable_virtual_host_style".into(), "false".into()))
        );
        assert!(
            !format!("{s:?}").contains("hush"),
            "secrets stay out of Debug"
        );
        assert_eq!(s.meta.kind, MetaKind::Etcd);
        assert_eq!(s.meta.namespace, "tributary");
        // A flag beats the file.
        let opts = Options {
            opendal_ack: Some("local".into()),
            meta_namespace: Some("blue_2".into()),
            ..Default::default()
        };
        let s = Settings::resolve(&opts, &file).unwrap();
        assert_eq!(s.opendal.unwrap().ack, AckPoint::Local);
        assert_eq!(s.meta.namespace, "blue_2");

        let refused = |text: &str, opts: Options, key: &str| {
            let file: FileConfig = toml::from_str(text).unwrap();
            let e = Settings::resolve(&opts, &file).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        };
        refused("storage = \"opendal\"\n", Options::default(), "[opendal]");
        refused(
            "storage = \"opendal\"\n[opendal]\nbucket = \"b\"\n",
            Options::default(),
            "scheme",
        );
        refused("storage = \"s4\"\n", Options::default(), "opendal");
        refused("meta = \"etcd\"\n", Options::default(), "meta_url");
        refused("meta = \"zookeeper\"\n", Options::default(), "redis");
        refused("meta_url = \"redis://x\"\n", Options::default(), "meta_url");
        refused(
            "storage = \"memory\"\nmeta = \"redis\"\nmeta_url = \"redis://x\"\n",
            Options::default(),
            "storage = memory",
        );
        refused(
            "",
            Options {
                meta_namespace: Some("Has-Caps".into()),
                ..Default::default()
            },
            "meta_namespace",
        );
        refused(
            "storage = \"opendal\"\nopendal_ack = \"remote\"\n[opendal]\nscheme = \"fs\"\n",
            Options::default(),
            "opendal_ack",
        );
        refused(
            "storage = \"memory\"\n[opendal]\nscheme = \"fs\"\n",
            Options::default(),
            "[opendal]",
        );
        // With storage = local, an [opendal] table makes the object store a second backend.
        let file: FileConfig =
            toml::from_str("opendal_ack = \"shared\"\n[opendal]\nscheme = \"fs\"\n").unwrap();
        let s = Settings::resolve(&Options::default(), &file).unwrap();
        assert_eq!(s.storage, StorageKind::Local);
        assert_eq!(s.opendal.unwrap().ack, AckPoint::Shared);
    }

    #[test]
    fn cluster_mode_needs_shared_storage_and_the_core_role() {
        let base = "storage = \"opendal\"\nopendal_ack = \"shared\"\nmeta = \"etcd\"\nmeta_url = \"http://127.0.0.1:2379\"\ncluster_node = \"core-1\"\n[opendal]\nscheme = \"fs\"\nroot = \"/tmp/x\"\n";
        let file: FileConfig = toml::from_str(base).unwrap();
        let s = Settings::resolve_for(&Options::default(), &file, Role::Core).unwrap();
        assert_eq!(
            s.cluster,
            Some(ClusterSettings {
                node: "core-1".into(),
                lease_ttl: Duration::from_secs(5),
                shards: None,
                scheme: tributary_core::Scheme::Namespace,
            })
        );
        let file: FileConfig = toml::from_str(&format!("cluster_shards = 12\n{base}")).unwrap();
        let s = Settings::resolve_for(&Options::default(), &file, Role::Core).unwrap();
        assert_eq!(s.cluster.unwrap().shards, Some(12));
        let refused = |text: &str, role: Role, key: &str| {
            let file: FileConfig = toml::from_str(text).unwrap();
            let e = Settings::resolve_for(&Options::default(), &file, role).unwrap_err();
            assert!(e.to_string().contains(key), "{key}: {e}");
        };
        refused(base, Role::Standalone, "cluster_node");
        refused(base, Role::Gateway, "cluster_node");
        refused(&base.replace("\"etcd\"", "\"redis\""), Role::Core, "meta");
        refused(
            &base.replace("\"shared\"", "\"local\""),
            Role::Core,
            "storage",
        );
        refused(
            &base.replace("core-1", "core 1"),
            Role::Core,
            "cluster_node",
        );
        refused(
            &format!("cluster_lease_ttl_ms = 10\n{base}"),
            Role::Core,
            "cluster_lease_ttl_ms",
        );
        refused(
            &format!("cluster_shards = 4097\n{base}"),
            Role::Core,
            "cluster_shards",
        );
        // Streams spread over shards: only with shards, and the stream-as-topic features off
        // (refused when asked for).
        let spread = format!("cluster_shards = 12\ncluster_shard_scheme = \"stream\"\n{base}");
        let file: FileConfig = toml::from_str(&spread).unwrap();
        let s = Settings::resolve_for(&Options::default(), &file, Role::Core).unwrap();
        assert_eq!(
            s.cluster.as_ref().unwrap().scheme,
            tributary_core::Scheme::Stream
        );
        assert!(!s.mqtt_streams && !s.stream_exchanges);
        refused(
            &format!("cluster_shard_scheme = \"stream\"\n{base}"),
            Role::Core,
            "cluster_shard_scheme",
        );
        refused(
            &format!("cluster_shard_scheme = \"partition\"\ncluster_shards = 12\n{base}"),
            Role::Core,
            "cluster_shard_scheme",
        );
        refused(
            &format!("mqtt_streams = true\n{spread}"),
            Role::Core,
            "mqtt_streams",
        );
        refused(
            &format!("{spread}[[mqtt_stream_rules]]\nfilter = \"a/#\"\nstream = \"s\"\n"),
            Role::Core,
            "mqtt_stream_rules",
        );
        // Empty: not a cluster node.
        let file: FileConfig = toml::from_str(&base.replace("core-1", "")).unwrap();
        let s = Settings::resolve_for(&Options::default(), &file, Role::Core).unwrap();
        assert_eq!(s.cluster, None);
    }

    #[test]
    fn the_example_config_lists_every_key_with_its_default() {
        let text = include_str!("../tributary.example.toml");
        let uncommented: String = text
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|r| {
                        r.split_once(" = ").is_some_and(|(k, _)| {
                            k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                        })
                    })
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        let file: FileConfig =
            toml::from_str(&uncommented).expect("example parses with every key uncommented");
        let from_example = Settings::resolve(&Options::default(), &file).unwrap();
        let defaults = Settings::resolve(&Options::default(), &FileConfig::default()).unwrap();
        assert_eq!(format!("{from_example:?}"), format!("{defaults:?}"));
        for key in [
            "data_dir",
            "core_listen",
            "core_token",
            "core_token_file",
            "core_insecure",
            "admin_listen",
            "kafka_listen",
            "mqtt_listen",
            "mqtt_ws_listen",
            "mqtt_tls_listen",
            "mqtt_wss_listen",
            "tls_cert",
            "tls_key",
            "amqp_listen",
            "amqp_tls_listen",
            "kafka_tls_listen",
            "kafka_tls_advertised",
            "sqs_listen",
            "sqs_region",
            "sqs_account_id",
            "rocketmq_listen",
            "namesrv_listen",
            "rocketmq_advertised",
            "rocketmq_auto_create_topics",
            "rocketmq_transaction_check_interval_ms",
            "rocketmq_transaction_timeout_ms",
            "rocketmq_transaction_check_max",
            "max_connections",
            "core",
            "cluster_node",
            "cluster_lease_ttl_ms",
            "cluster_shards",
            "cluster_shard_scheme",
            "kafka_broker_id",
            "kafka_broker_node",
            "storage",
            "opendal_ack",
            "opendal_cache_dir",
            "opendal_upload_interval_ms",
            "opendal_seal_interval_ms",
            "meta",
            "meta_url",
            "meta_namespace",
            "fsync",
            "segment_bytes",
            "default_partitions",
            "auto_create_streams",
            "retention_ms",
            "retention_bytes",
            "max_message_bytes",
            "retention_check_interval_ms",
            "kafka_advertised",
            "kafka_sasl",
            "kafka_auto_create_topics",
            "kafka_authorizer",
            "kafka_super_users",
            "kafka_allow_if_no_acl",
            "kafka_ssl_principal_mapping_rules",
            "transaction_max_timeout_ms",
            "group_initial_rebalance_delay_ms",
            "group_min_session_timeout_ms",
            "group_max_session_timeout_ms",
            "mqtt_allow_anonymous",
            "mqtt_max_queued",
            "mqtt_dead_letter_address",
            "mqtt_exchange",
            "mqtt_max_keep_alive",
            "mqtt_streams",
            "stream_exchanges",
            "log",
        ] {
            assert!(text.contains(&format!("# {key} = ")), "example lacks {key}");
        }
    }
}
