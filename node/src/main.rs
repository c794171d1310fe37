//! The `ringlet` binary.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use ringlet_node::cli::{Cli, default_threads};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let command = Cli::parse().into_command();
    let threads = command.threads().unwrap_or_else(default_threads);
    // Candle and rayon read the compute thread count from the environment.
    // SAFETY: no other thread exists yet, so nothing reads the environment
    // concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };

    // The WebRTC stack logs through `log` (forwarded here) and is chatty at
    // info and warn (state changes, stray STUN packets): kept to what
    // matters unless RUST_LOG names it.
    let quiet = "webrtc=warn,rtc=error,rtc_ice=warn,rtc_turn=warn,rtc_sctp=warn,rtc_dtls=warn";
    let directives = match std::env::var("RUST_LOG") {
        Ok(set) if set.contains("rtc") => set,
        Ok(set) => format!("{set},{quiet}"),
        Err(_) => format!("info,{quiet}"),
    };
    let filter = EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(ringlet_node::commands::dispatch(command));
    // The command is done, and whatever needed an end had its grace in it
    // (`serve` gives open requests theirs): blocking work still running
    // (an engine that did not stop, a read of a model file) must not keep
    // the process alive, as dropping the runtime would.
    runtime.shutdown_timeout(std::time::Duration::from_millis(
        ringlet_node::limits::EXIT_WAIT_MS,
    ));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
