//! The binary: parse the command line and config, set up logging, bind the
//! two listeners, and hand over to `turnstile::run` with a shutdown future fed by
//! SIGTERM/SIGINT. Exit codes: 0 clean stop, 1 runtime failure, 2 bad config.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use turnstile::{backup, Config, Listeners};

#[global_allocator]
static GLOBAL: turnstile::heap::Counting<mimalloc::MiMalloc> = turnstile::heap::Counting(mimalloc::MiMalloc);

#[derive(Parser)]
#[command(
    name = "turnstile",
    version,
    about = "Durable per-phone batching between WhatsApp and an AI assistant"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        /// TOML config file; without one every key takes its default
        /// (TURNSTILE_<SECTION>_<KEY> variables still apply).
        #[arg(long, env = "TURNSTILE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Load the config exactly as `serve` would, validate it, and print what
    /// it would start as (secrets masked) and warnings. Exit 0: it would
    /// start; 2: it would not (the message names the key).
    Check {
        #[arg(long, env = "TURNSTILE_CONFIG")]
        config: Option<PathBuf>,
        /// The systemd unit to compare server.stop_timeout_ms with (its
        /// drop-ins in <unit>.d/ too); default: the installed one.
        #[arg(long)]
        unit: Option<PathBuf>,
        /// Print only warnings and errors (for ExecStartPre).
        #[arg(long)]
        quiet: bool,
    },
    /// Write a backup of a data directory that no daemon is running on.
    Backup {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Rebuild a data directory from a backup (checked first; the target is
    /// left untouched if anything fails).
    Restore {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        data: PathBuf,
        /// Replace a non-empty data directory.
        #[arg(long)]
        force: bool,
    },
    /// Check a backup file (format, checksum, counts; records and bytes per
    /// tree), or a stopped daemon's data directory: every check the daemon's
    /// start makes of its files, changing nothing. Exit 1 if it would not
    /// start (each damaged file named, with its offset).
    Verify { file: PathBuf },
    /// Rewrite a stopped daemon's data directory without the space its
    /// store has not reclaimed (through a backup; switched in atomically).
    Compact {
        #[arg(long)]
        data: PathBuf,
    },
    /// Replay a trace (JSON lines; .gz inflated) through the batcher and a
    /// cut policy on simulated time; prints the waits and split requests as JSON.
    Replay {
        trace: PathBuf,
        /// The policy to replay (default: the config's `batching.policy`).
        #[arg(long, value_enum)]
        policy: Option<PolicyArg>,
        /// A config file whose `[batching]` keys set the rules (and
        /// `[turns] on_new_message`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// What to do with a message that comes while its turn's handler
        /// runs (default: the config's `turns.on_new_message`).
        #[arg(long, value_enum)]
        on_new_message: Option<OnNewArg>,
        /// How long the handler takes: ms, or a range drawn from uniformly.
        #[arg(long, default_value = "5000-35000")]
        handler_ms: turnstile::replay::Latency,
        /// Seeds the handler's latencies.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Write a synthetic trace for `replay` (see the distributions' flags).
    GenTrace {
        /// Where to write it (`.gz` deflates); standard output without it.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        params: turnstile::replay::generate::Params,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PolicyArg {
    Fixed,
    Adaptive,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OnNewArg {
    Queue,
    Restart,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::Check { config, unit, quiet } => check(config, unit, quiet),
        Command::Backup { data, out } => {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            report(
                runtime.block_on(backup::backup_offline(&data, &out)),
                &format!("backup written to {}", out.display()),
            )
        }
        Command::Restore { from, data, force } => {
            report(backup::restore(&from, &data, force), &format!("restored into {}", data.display()))
        }
        Command::Verify { file } if file.is_dir() => verify_data(&file),
        Command::Verify { file } => match backup::verify_sizes(&file) {
            Ok((manifest, bytes)) => {
                for (tree, n) in &manifest.counts {
                    println!(
                        "  {tree:<14} {n:>10} records {:>14} bytes",
                        bytes.get(tree).copied().unwrap_or(0)
                    );
                }
                report(Ok(manifest), &format!("{} is intact", file.display()))
            }
            Err(e) => report(Err(e), ""),
        },
        Command::Replay { trace, policy, config, on_new_message, handler_ms, seed } => {
            replay(&trace, policy, config, on_new_message, handler_ms, seed)
        }
        Command::GenTrace { out, params } => gen_trace(out, &params),
        Command::Compact { data } => {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            match runtime.block_on(backup::compact(&data)) {
                Ok(c) => {
                    let mb = |b: u64| b as f64 / 1048576.0;
                    let done = format!(
                        "compacted {}: {:.1} MB -> {:.1} MB",
                        data.display(),
                        mb(c.before),
                        mb(c.after)
                    );
                    report(Ok(c.manifest), &done)
                }
                Err(e) => report(Err(e), ""),
            }
        }
    }
}

fn replay(
    trace: &std::path::Path,
    policy: Option<PolicyArg>,
    config: Option<PathBuf>,
    on_new: Option<OnNewArg>,
    handler: turnstile::replay::Latency,
    seed: u64,
) -> ExitCode {
    // Only the file's keys count here: the replay is about the file, not the host.
    let mut config = match Config::load(config.as_deref(), std::iter::empty()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("turnstile: {e}");
            return ExitCode::from(2);
        }
    };
    match policy {
        Some(PolicyArg::Fixed) => config.batching.policy = turnstile::config::CutPolicy::Fixed,
        Some(PolicyArg::Adaptive) => config.batching.policy = turnstile::config::CutPolicy::Adaptive,
        None => {}
    }
    match turnstile::replay::read(trace) {
        Ok(events) => {
            let restart = match on_new {
                Some(OnNewArg::Restart) => true,
                Some(OnNewArg::Queue) => false,
                None => config.turns.on_new_message == turnstile::config::OnNewMessage::Restart,
            };
            let setup = turnstile::replay::Setup { rules: config.batching.rules(), restart, handler, seed };
            let report = turnstile::replay::run(&events, &setup);
            println!("{}", serde_json::to_string_pretty(&report).expect("JSON"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("turnstile: {}: {e}", trace.display());
            ExitCode::from(2)
        }
    }
}

fn gen_trace(out: Option<PathBuf>, params: &turnstile::replay::generate::Params) -> ExitCode {
    use std::io::Write;
    let events = turnstile::replay::generate::generate(params);
    let mut text = String::new();
    for e in &events {
        text.push_str(&serde_json::to_string(e).expect("JSON"));
        text.push('\n');
    }
    let written = match &out {
        None => std::io::stdout().write_all(text.as_bytes()),
        Some(path) if path.extension().is_some_and(|e| e == "gz") => {
            std::fs::File::create(path).and_then(|f| {
                let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::best());
                gz.write_all(text.as_bytes())?;
                gz.finish().map(drop)
            })
        }
        Some(path) => std::fs::write(path, text),
    };
    match written {
        Ok(()) => {
            if let Some(path) = out {
                eprintln!("{} events written to {}", events.len(), path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("turnstile: writing the trace: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `verify DIR`: what the store's open would refuse, and what it would
/// repair; exit 1 if it would not open.
fn verify_data(dir: &std::path::Path) -> ExitCode {
    match turnstile::store::verify(dir) {
        Ok(findings) => {
            for f in &findings {
                println!("  {} {}", if f.refuses { "damaged: " } else { "repairs: " }, f.what);
            }
            if findings.iter().any(|f| f.refuses) {
                eprintln!("turnstile: {} would not open: damaged files (above)", dir.display());
                ExitCode::FAILURE
            } else {
                println!("{} opens ({} to repair on the next start)", dir.display(), findings.len());
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("turnstile: {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

/// Prints what a backup command did (or why not); exit 0 or 1.
fn report(result: Result<backup::Manifest, backup::BackupError>, done: &str) -> ExitCode {
    match result {
        Ok(m) => {
            let counts: Vec<String> = m.counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("{done}: {} records ({}), sha256 {}", m.records, counts.join(", "), m.sha256);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("turnstile: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: Option<PathBuf>, unit: Option<PathBuf>, quiet: bool) -> ExitCode {
    let config = match Config::load(path.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("turnstile check: {e}");
            eprintln!("turnstile check: this config would not start (exit 2)");
            return ExitCode::from(2);
        }
    };
    let overlay: Vec<String> = std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("TURNSTILE_") && k != "TURNSTILE_CONFIG")
        .collect();
    let host = turnstile::check::Host { overlay, config_file: path, unit };
    let report = turnstile::check::check(&config, &host);
    if !quiet {
        print!("{}", report.text);
        println!();
    }
    for w in &report.warnings {
        eprintln!("turnstile check: warning: {w}");
    }
    if !quiet {
        let n = report.warnings.len();
        println!("ok: this config would start ({n} warning{})", if n == 1 { "" } else { "s" });
    }
    ExitCode::SUCCESS
}

fn serve(path: Option<PathBuf>) -> ExitCode {
    let config = match Config::load(path.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("turnstile: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.filter));
    // Plain text when not on a terminal: the journal (and grep) get no colour codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let stop_timeout = Duration::from_millis(config.server.stop_timeout_ms);
    let result = runtime.block_on(async {
        let listeners = Listeners::bind(&config.server).await?;
        let faults = std::env::var(turnstile::config::TEST_FAULTS_ENV)
            .map(|spec| turnstile::server::TestFaults::parse(&spec))
            .unwrap_or_default();
        let deps = turnstile::Deps { faults, ..Default::default() };
        turnstile::run(config, listeners, shutdown_signal(stop_timeout), deps)
            .await
            .map_err(anyhow::Error::from)
    });
    // Nothing left to wait for: a blocking call still running (a sync on a
    // sick disk) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Every error's own message already ends in its cause (`{source}`):
        // printing the chain as well would say the cause twice.
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("turnstile: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT. A second one exits at once:
/// every acknowledged message is already on disk, and running turns re-run
/// on the next start under the same turn_id.
async fn shutdown_signal(stop_timeout: Duration) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; stopping (a second signal exits at once)"),
        _ = int.recv() => tracing::info!("SIGINT received; stopping (a second signal exits at once)"),
    }
    // The stop is bounded by `server.stop_timeout_ms` step by step; this is
    // the backstop, on a thread of its own, should anything still hang.
    std::thread::spawn(move || {
        std::thread::sleep(stop_timeout + Duration::from_millis(700));
        eprintln!("turnstile: the stop deadline passed; exiting now (acknowledged messages are on disk)");
        std::process::exit(0);
    });
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting now; running turns re-run on the next start");
        std::process::exit(0);
    });
}
