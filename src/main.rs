use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use tributary::config::{Cli, Command, Settings};
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
            eprintln!("error: {}", server::gateway_unavailable(&protocol));
            return ExitCode::from(2);
        }
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
    // Machine-readable lines on stdout, so scripts and tests learn ports picked with port 0.
    if let Some(a) = server.bound.core {
        println!("listening core {a}");
    }
    if let Some(a) = server.bound.admin {
        println!("listening admin {a}");
    }
    println!("ready");
    server::shutdown_signal().await;
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
