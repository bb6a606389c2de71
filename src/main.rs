use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use tributary::config::{BenchArgs, Cli, Command, Settings};
use tributary::server::{self, Mode, Server};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::from_cli(&cli.options) {
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
        Command::Bench(args) => return bench(args),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(settings, mode))
}

async fn run(settings: Settings, mode: Mode) -> ExitCode {
    let server = match Server::start(&settings, mode).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let signals = match server::ShutdownSignals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
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

/// `tributary bench <protocol>`: one line and a non-zero exit on any failure, never a hang.
fn bench(args: BenchArgs) -> ExitCode {
    use std::io::IsTerminal;
    let opts = tributary_bench::BenchOptions {
        target: args.target.clone(),
        producers: args.producers,
        consumers: args.consumers,
        size: args.size,
        duration: std::time::Duration::from_secs(args.duration),
        rate: args.rate,
        acks: args.acks.clone(),
        partitions: args.partitions,
        compression: args.compression.clone(),
        warmup: std::time::Duration::from_secs(args.warmup),
        progress: !args.json && std::io::stderr().is_terminal(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.protocol.as_str() {
        "kafka" => runtime.block_on(tributary_bench::kafka::run(&opts)),
        other => {
            eprintln!("error: no bench for '{other}' in this build (available: kafka)");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(report) if args.json => {
            println!(
                "{}",
                serde_json::to_string(&report).expect("report serialises")
            );
            ExitCode::SUCCESS
        }
        Ok(report) => {
            println!("{}", report.table());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}
