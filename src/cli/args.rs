//! The admin subcommands' arguments (`tributary streams|groups|queues ...`).

use clap::{Args, Subcommand};

/// What every admin subcommand shares.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Namespace (the Kafka, MQTT, SQS and RocketMQ gateways serve `gateway_namespace`,
    /// `default` unless set; an AMQP vhost is its own).
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// One JSON document on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum StreamsCommand {
    /// Every stream of the namespace with its partitions and offsets.
    List(Common),
    /// One stream: configs and per-partition offsets and sizes.
    Describe {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Creates a stream.
    Create {
        name: String,
        #[arg(long, short = 'p', default_value_t = 1)]
        partitions: u32,
        /// A stream config, KEY=VALUE (retention.ms, retention.bytes, max.message.bytes,
        /// cleanup.policy); repeatable.
        #[arg(long = "topic-config", short = 'c')]
        configs: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Deletes a stream and its data.
    Delete {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Appends records: each VALUE given, or each line of stdin when none is.
    Produce {
        name: String,
        values: Vec<String>,
        #[arg(long, default_value_t = 0)]
        partition: u32,
        /// The key of every record.
        #[arg(long, short = 'k')]
        key: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Reads records of one partition, from `--offset` (earliest, latest or a number), until
    /// `--count` records or the end of the partition.
    Consume {
        name: String,
        #[arg(long, default_value_t = 0)]
        partition: u32,
        #[arg(long, short = 'o', default_value = "earliest")]
        offset: String,
        #[arg(long, default_value_t = 10)]
        count: usize,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum GroupsCommand {
    /// Every consumer group of the namespace.
    List(Common),
    /// A group's state and members, and per partition its committed offset, the end offset
    /// and the lag between them.
    Describe {
        group: String,
        #[command(flatten)]
        common: Common,
    },
    /// Moves a group's committed offsets on one stream (the group must have no members, as
    /// with kafka-consumer-groups --reset-offsets).
    ResetOffsets {
        group: String,
        #[arg(long)]
        stream: String,
        /// earliest, latest, timestamp:MILLISECONDS or offset:N.
        #[arg(long)]
        to: String,
        /// Shows what would change without committing it.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum ImportCommand {
    /// RabbitMQ definitions (`rabbitmqctl export_definitions FILE`, or the management API's
    /// GET /api/definitions): vhosts, exchanges, queues with their arguments and bindings into
    /// the core; the policies applied, once, to the queues they match (RabbitMQ's
    /// precedence); users with their password hashes, vhost access and the vhost list as a
    /// config snippet; a report of everything, including what is not carried.
    Rabbitmq {
        file: std::path::PathBuf,
        /// Checks every definition and reports what would be created; changes nothing.
        #[arg(long)]
        dry_run: bool,
        /// Where to write the config snippet (users, amqp_permissions, amqp_vhosts); it is
        /// also in the `--json` report.
        #[arg(long)]
        config_out: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Kafka topics with their partition counts and configs, from what
    /// `kafka-topics.sh --describe --bootstrap-server HOST:9092` prints (or
    /// `tributary export kafka` writes). A topic that exists is left as it is; configs with no
    /// meaning here are reported as not carried.
    Kafka {
        file: std::path::PathBuf,
        /// Checks every topic and config and reports what would be created.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        common: Common,
    },
    /// SQS queues with their attributes, redrive policies and tags, from the JSON the aws CLI
    /// prints: an array of {"QueueUrl", "Attributes", "Tags"} (README: the loop that makes
    /// it; `tributary export sqs` writes it too), one {"Attributes": ...} with --name, or
    /// `aws sqs list-queues` output (names only). Every queue goes to the namespace -n; a
    /// report row per queue and attribute says what was carried, stored or not carried.
    Sqs {
        file: std::path::PathBuf,
        /// Checks every queue and attribute and reports what would be created.
        #[arg(long)]
        dry_run: bool,
        /// The queue's name, for one queue's `get-queue-attributes` output (no QueueUrl).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum ExportCommand {
    /// The namespace's streams as `kafka-topics.sh --describe` text (what `tributary import
    /// kafka` reads), or JSON with --json.
    Kafka(Common),
    /// RabbitMQ definitions (what `rabbitmqctl import_definitions` reads) of every
    /// namespace: vhosts, exchanges, queues with their arguments, bindings, the policies
    /// `import rabbitmq` applied; users with a RabbitMQ password hash in the config file and
    /// their vhost access. What cannot be written is listed on stderr (in the document
    /// with --json).
    Rabbitmq {
        #[arg(long)]
        json: bool,
    },
    /// The namespace's queues as the JSON `tributary import sqs` reads (QueueUrl,
    /// Attributes, Tags); settings SQS has no attribute for are listed on stderr.
    Sqs(Common),
}

#[derive(Debug, Clone, Subcommand)]
pub enum SessionsCommand {
    /// MQTT sessions: connected or not, expiry, subscriptions, in-flight and queued messages.
    List(Common),
    /// Closes a session's connection (MQTT 5 clients get DISCONNECT 0x98); the session stays
    /// as its expiry says. Exit code 1 for an unknown client id.
    Kick {
        client_id: String,
        #[command(flatten)]
        common: Common,
    },
}

/// Where `tributary connections` asks, and how it prints.
#[derive(Debug, Clone, Args)]
pub struct AdminApi {
    /// The admin HTTP API of the process whose connections these are: the standalone
    /// server's, or a gateway process's own (`tributary gateway ... --admin-listen`).
    #[arg(long, default_value = "http://127.0.0.1:7480")]
    pub admin: String,
    /// One JSON document on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ConnectionsCommand {
    /// The process's open client connections: id, listener, peer, TLS, user, client id,
    /// namespace, since when.
    List(AdminApi),
    /// Closes a connection the way its protocol's brokers do (AMQP connection.close 320,
    /// MQTT 5 DISCONNECT 0x98, Kafka closes the socket); needs the core token. Exit code 1
    /// for an unknown id.
    Close {
        id: u64,
        #[command(flatten)]
        api: AdminApi,
    },
}

impl ConnectionsCommand {
    pub fn api(&self) -> &AdminApi {
        match self {
            ConnectionsCommand::List(api) | ConnectionsCommand::Close { api, .. } => api,
        }
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum QueuesCommand {
    /// Every queue of the namespace with its depth, leased and delayed messages and consumers.
    List(Common),
    /// Declares a durable queue (an existing one with the same settings is left as it is).
    Declare {
        name: String,
        /// Lost at restart (transient) rather than durable.
        #[arg(long)]
        transient: bool,
        /// Dead-letter queue for messages over --max-deliveries.
        #[arg(long)]
        dead_letter_queue: Option<String>,
        #[arg(long)]
        max_deliveries: Option<u32>,
        #[command(flatten)]
        common: Common,
    },
    /// Removes every ready message of a queue.
    Purge {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Moves the messages of a dead-letter queue back to where they died (or to --to), and
    /// waits for the move to finish.
    Redrive {
        name: String,
        /// Destination queue; default: each message's source.
        #[arg(long, conflicts_with = "to_address")]
        to: Option<String>,
        /// Publish each message to this address instead (an AMQP exchange, a stream's
        /// address: a Kafka topic), in the queue's namespace.
        #[arg(long)]
        to_address: Option<String>,
        /// Routing key with --to-address; default: the key each message was first
        /// published with.
        #[arg(long, requires = "to_address")]
        key: Option<String>,
        #[command(flatten)]
        common: Common,
    },
}

impl StreamsCommand {
    pub fn common(&self) -> &Common {
        match self {
            StreamsCommand::List(common) => common,
            StreamsCommand::Describe { common, .. }
            | StreamsCommand::Create { common, .. }
            | StreamsCommand::Delete { common, .. }
            | StreamsCommand::Produce { common, .. }
            | StreamsCommand::Consume { common, .. } => common,
        }
    }
}

impl GroupsCommand {
    pub fn common(&self) -> &Common {
        match self {
            GroupsCommand::List(common) => common,
            GroupsCommand::Describe { common, .. } | GroupsCommand::ResetOffsets { common, .. } => {
                common
            }
        }
    }
}

/// How a user's password is kept (`users add` and `users passwd`).
#[derive(Debug, Clone, Args)]
pub struct PasswordArgs {
    /// Credential kinds to derive from the password: SCRAM-SHA-256, SCRAM-SHA-512 (both by
    /// default; each checks plain-password logins too); repeatable.
    #[arg(long = "mechanism", short = 'm')]
    pub mechanisms: Vec<String>,
    /// PBKDF2 iterations of the SCRAM credentials (Kafka's minimum is 4096).
    #[arg(long, default_value_t = tributary_gateway_common::auth::DEFAULT_ITERATIONS)]
    pub iterations: u32,
}

#[derive(Debug, Clone, Subcommand)]
pub enum UsersCommand {
    /// The users kept in the core with their credential kinds and namespaces, and the config
    /// file's users (which `tributary users` cannot change).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Adds a user; its password is the first line of stdin. Exit code 1 if it exists.
    Add {
        name: String,
        /// A namespace (AMQP vhost) the user may open, besides those the config file grants;
        /// repeatable.
        #[arg(long = "namespace", short = 'n')]
        namespaces: Vec<String>,
        #[command(flatten)]
        password: PasswordArgs,
        #[arg(long)]
        json: bool,
    },
    /// Changes a user's password (stdin's first line); its namespaces stay.
    Passwd {
        name: String,
        #[command(flatten)]
        password: PasswordArgs,
        #[arg(long)]
        json: bool,
    },
    /// Deletes a user. Connections it opened stay open; new logins are refused.
    Delete {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

impl UsersCommand {
    pub fn json(&self) -> bool {
        match self {
            UsersCommand::List { json }
            | UsersCommand::Add { json, .. }
            | UsersCommand::Passwd { json, .. }
            | UsersCommand::Delete { json, .. } => *json,
        }
    }
}

impl SessionsCommand {
    pub fn common(&self) -> &Common {
        match self {
            SessionsCommand::List(common) | SessionsCommand::Kick { common, .. } => common,
        }
    }
}

impl QueuesCommand {
    pub fn common(&self) -> &Common {
        match self {
            QueuesCommand::List(common) => common,
            QueuesCommand::Declare { common, .. }
            | QueuesCommand::Purge { common, .. }
            | QueuesCommand::Redrive { common, .. } => common,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        // clap checks names and shorts across the subcommands and the global options.
        <crate::config::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
