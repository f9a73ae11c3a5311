use std::{io::Write, process::ExitCode};

use clap::Parser;
use tracing_subscriber::{EnvFilter, fmt};

use chiller_metrics::cli::{Cli, Command, LogFormat, check, explain, offline, serve, uninstall};

/// mimalloc: a quarter to a third of a request's cycles went to glibc's malloc and free.
/// The `system-allocator` feature leaves it out, for heap profilers.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// The async commands' runtime; they run on it through their `run_blocking`
/// (or `run_until_signal`), which the library compiles once.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(error) => {
            // Our error messages already carry their causes: print one line, not a chain.
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    init_logging(match &cli.command {
        Command::Serve(args) => args.log_format,
        _ => LogFormat::Text,
    });
    match cli.command {
        Command::Serve(args) => {
            args.require_cert_files()?;
            serve::run_until_signal(&runtime()?, args)?;
        }
        Command::Inject(args) => {
            let yaml = offline::inject(&args, &mut |note| eprintln!("{note}"))?;
            std::io::stdout().lock().write_all(yaml.as_bytes())?;
        }
        Command::Uninject(args) => {
            let yaml = offline::uninject(&args, &mut |note| eprintln!("{note}"))?;
            std::io::stdout().lock().write_all(yaml.as_bytes())?;
        }
        Command::Render(args) => print(&offline::render(&args)?)?,
        Command::Certs(args) => {
            let bundle = offline::certs(&args)?;
            eprintln!(
                "wrote ca.crt, tls.crt and tls.key to {}",
                args.out.display()
            );
            print(&bundle)?;
        }
        Command::Mapping(args) => print(&offline::mapping(&args)?)?,
        Command::Config(args) => print(&offline::config(&args)?)?,
        Command::Check(args) => {
            let report = check::run_blocking(&runtime()?, &args)?;
            print(&check::render(&report, args.output))?;
            if !report.ok {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Explain(args) => {
            let explanation = explain::run_blocking(&runtime()?, &args)?;
            print(&explain::render(&explanation, args.output))?;
        }
        Command::Uninstall(args) => {
            for line in uninstall::run_blocking(&runtime()?, &args)? {
                println!("{line}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
