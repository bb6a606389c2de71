use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use tributary::cli::{self, AdminCommand};
#[cfg(feature = "bench")]
use tributary::config::ReportArgs;
use tributary::config::{BenchCommand, Cli, Command, Role, Settings};
use tributary::server::{self, Mode, Server};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let role = match &cli.command {
        Some(Command::Core) => Role::Core,
        Some(Command::Gateway { .. }) => Role::Gateway,
        _ => Role::Standalone,
    };
    let settings = match Settings::from_cli(&cli.options, role) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = match EnvFilter::try_new(&settings.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "error: invalid value '{}' for --log / TRIBUTARY_LOG / log: {e}",
                settings.log
            );
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mode = match cli.command.unwrap_or(Command::Standalone) {
        Command::Standalone => Mode::Standalone,
        Command::Core => Mode::CoreOnly,
        Command::Gateway { protocol } => {
            if !server::AVAILABLE_GATEWAYS.contains(&protocol.as_str()) {
                eprintln!("error: {}", server::gateway_unavailable(&protocol));
                return ExitCode::from(2);
            }
            Mode::Gateway(protocol)
        }
        Command::Passwd => return passwd(),
        Command::Streams { what } => return cli::run(&settings, AdminCommand::Streams(what)),
        Command::Groups { what } => return cli::run(&settings, AdminCommand::Groups(what)),
        Command::Queues { what } => return cli::run(&settings, AdminCommand::Queues(what)),
        Command::Sessions { what } => return cli::run(&settings, AdminCommand::Sessions(what)),
        Command::Users { what } => return cli::run(&settings, AdminCommand::Users(what)),
        Command::Connections { what } => {
            return cli::run(&settings, AdminCommand::Connections(what));
        }
        Command::Import { what } => return cli::run(&settings, AdminCommand::Import(what)),
        Command::Export { what } => return cli::run(&settings, AdminCommand::Export(what)),
        Command::Bench { what } => return bench(*what),
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(run(settings, mode))
}

/// The multi-threaded tokio runtime; on failure, says why on stderr.
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            None
        }
    }
}

/// SIGINT and SIGTERM handlers; on failure, says why on stderr.
fn install_signals() -> Result<server::ShutdownSignals, ExitCode> {
    server::ShutdownSignals::install().map_err(|e| {
        eprintln!("error: cannot install signal handlers: {e}");
        ExitCode::FAILURE
    })
}

async fn run(settings: Settings, mode: Mode) -> ExitCode {
    // A cluster node may stand by for hours before it serves: a stop meanwhile is a clean
    // one (nothing is open yet), not a death by signal, so its handlers go in first.
    let mut early_signals = None;
    if settings.cluster.is_some() && mode == Mode::CoreOnly {
        match install_signals() {
            Ok(s) => early_signals = Some(s),
            Err(code) => return code,
        }
    }
    let lease_slot = server::LeaseSlot::default();
    let start = Server::start(&settings, mode, &lease_slot);
    let started = match &mut early_signals {
        None => start.await,
        Some(signals) => tokio::select! {
            s = start => s,
            () = signals.recv() => {
                // Stopped while standing by, or while opening the core under a lease just
                // taken: that lease is given up, not left to run out.
                lease_slot.release().await;
                tracing::info!("stopped before serving");
                return ExitCode::SUCCESS;
            }
        },
    };
    let server = match started {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let signals = match early_signals.map_or_else(install_signals, Ok) {
        Ok(s) => s,
        Err(code) => return code,
    };
    // Machine-readable lines on stdout, so scripts and tests learn ports picked with port 0.
    if let Some(a) = server.bound.core {
        println!("listening core {a}");
    }
    if let Some(a) = server.bound.admin {
        println!("listening admin {a}");
    }
    if let Some(a) = server.bound.kafka {
        println!("listening kafka {a}");
    }
    if let Some(a) = server.bound.kafka_tls {
        println!("listening kafka-tls {a}");
    }
    if let Some(a) = server.bound.mqtt {
        println!("listening mqtt {a}");
    }
    if let Some(a) = server.bound.mqtt_ws {
        println!("listening mqtt-ws {a}");
    }
    if let Some(a) = server.bound.mqtt_tls {
        println!("listening mqtt-tls {a}");
    }
    if let Some(a) = server.bound.mqtt_wss {
        println!("listening mqtt-wss {a}");
    }
    if let Some(a) = server.bound.amqp {
        println!("listening amqp {a}");
    }
    if let Some(a) = server.bound.amqp_tls {
        println!("listening amqp-tls {a}");
    }
    if let Some(a) = server.bound.sqs {
        println!("listening sqs {a}");
    }
    if let Some(a) = server.bound.rocketmq_namesrv {
        println!("listening rocketmq-namesrv {a}");
    }
    if let Some(a) = server.bound.rocketmq {
        println!("listening rocketmq {a}");
    }
    println!("ready");
    signals.wait().await;
    let stopping = tokio::time::timeout(std::time::Duration::from_secs(9), server.shutdown()).await;
    match stopping {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: shutdown: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("error: shutdown took longer than 9 s");
            ExitCode::FAILURE
        }
    }
}

/// `tributary passwd`: one password on stdin, the `credentials = [...]` line on stdout.
fn passwd() -> ExitCode {
    use tributary_gateway_common::auth::{DEFAULT_ITERATIONS, ScramCredential, ScramHash};
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("error: cannot read the password from stdin: {e}");
        return ExitCode::FAILURE;
    }
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        eprintln!(
            "error: empty password (give it on stdin, e.g. `echo secret | tributary passwd`)"
        );
        return ExitCode::from(2);
    }
    let creds: Vec<String> = [ScramHash::Sha256, ScramHash::Sha512]
        .into_iter()
        .map(|h| {
            format!(
                "\"{}\"",
                ScramCredential::derive(h, password, DEFAULT_ITERATIONS).to_text()
            )
        })
        .collect();
    println!("credentials = [{}]", creds.join(", "));
    ExitCode::SUCCESS
}

/// `tributary bench` in a build without the load generators: the server binary does not link
/// librdkafka and the bench's other clients unless asked to.
#[cfg(not(feature = "bench"))]
fn bench(_what: BenchCommand) -> ExitCode {
    eprintln!(
        "error: this build has no load generators: build with `--features bench` (e.g. \
         `cargo run --release --features bench -- bench ...`)"
    );
    ExitCode::from(2)
}

/// `tributary bench <what>`: one line and a non-zero exit on any failure, never a hang.
#[cfg(feature = "bench")]
fn bench(what: BenchCommand) -> ExitCode {
    use std::io::IsTerminal;
    let (protocol, args) = match what {
        BenchCommand::Kafka(a) => ("kafka", a),
        BenchCommand::Mqtt(a) => ("mqtt", a),
        BenchCommand::Amqp(a) => ("amqp", a),
        BenchCommand::Sqs(a) => ("sqs", a),
        BenchCommand::Rocketmq(a) => ("rocketmq", a),
        BenchCommand::Report(r) => return bench_report(&r),
    };
    let default_target = match protocol {
        "kafka" => "127.0.0.1:9092",
        "mqtt" => "127.0.0.1:1883",
        "sqs" => "http://127.0.0.1:9324",
        "rocketmq" => "127.0.0.1:9876",
        _ => "127.0.0.1:5672",
    };
    let opts = tributary_bench::BenchOptions {
        target: args.target.unwrap_or_else(|| default_target.to_string()),
        producers: args.producers,
        consumers: args.consumers,
        size: args.size,
        duration: std::time::Duration::from_secs(args.duration),
        count: args.count,
        rate: args.rate,
        warmup: std::time::Duration::from_secs(args.warmup),
        progress: !args.json && std::io::stderr().is_terminal(),
        acks: args.acks.clone(),
        partitions: args
            .partitions
            .unwrap_or(if protocol == "rocketmq" { 8 } else { 6 }),
        compression: args.compression.clone(),
        from_start: args.from_start,
        transaction_commit: args
            .transactional
            .then(|| std::time::Duration::from_millis(args.commit_ms)),
        qos: args.qos,
        topics: args.topics,
        idle_connections: args.connections,
        inflight: args.inflight,
        prefetch: args.prefetch,
        durable: !args.transient,
        fanout: args.fanout,
        broker_pid: args.broker_pid,
        batch: args.batch,
        fifo: args.fifo,
        groups: args.groups,
        wait_seconds: args.wait,
        queue: args.queue.clone(),
        kafka_consumers: args.kafka_consumers.clone(),
        delay_ms: args.delay_ms,
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let result = runtime.block_on(async {
        match protocol {
            "kafka" => tributary_bench::kafka::run(&opts).await,
            "mqtt" => tributary_bench::mqtt::run(&opts).await,
            "sqs" => tributary_bench::sqs::run(&opts).await,
            "rocketmq" => tributary_bench::rocketmq::run(&opts).await,
            _ => tributary_bench::amqp::run(&opts).await,
        }
    });
    // librdkafka's threads may still be winding down; the verdict is already known.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(mut report) => {
            report.broker = args.broker;
            report.label = args.label;
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&report).expect("report serialises")
                );
            } else {
                println!("{}", report.table());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {protocol} bench against {}: {e}", opts.target);
            ExitCode::FAILURE
        }
    }
}

/// `tributary bench report`: the comparison table (and chart) of saved `--json` results.
#[cfg(feature = "bench")]
fn bench_report(args: &ReportArgs) -> ExitCode {
    let mut reports = Vec::new();
    for path in &args.inputs {
        let text = if path.as_os_str() == "-" {
            let mut s = String::new();
            match std::io::Read::read_to_string(&mut std::io::stdin(), &mut s) {
                Ok(_) => s,
                Err(e) => {
                    eprintln!("error: cannot read stdin: {e}");
                    return ExitCode::FAILURE;
                }
            }
        } else {
            match std::fs::read_to_string(path) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: cannot read {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
        };
        match tributary_bench::report::parse_lines(&text) {
            Ok(mut r) => reports.append(&mut r),
            Err(e) => {
                eprintln!("error: {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    let summary = tributary_bench::report::Summary::new(&reports, &args.subject);
    if args.markdown {
        print!("{}", summary.markdown());
    } else {
        print!("{}", summary.table());
    }
    if let Some(svg) = &args.svg
        && let Err(e) = summary.chart(svg)
    {
        eprintln!("error: cannot write {}: {e}", svg.display());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
