//! `ringlet serve`: load the model, start the engine, serve the API.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::api::{self, AppState, ServedModel};
use crate::cli::ServeArgs;
use crate::engine::Engine;
use crate::limits::SHUTDOWN_GRACE_SECS;
use crate::loaded_model::LoadedModel;

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = args.runtime.resolve()?;
    let listen = args.listen_addr()?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        threads = runtime.threads,
        "starting ringlet node"
    );
    // Bind before loading so a taken port fails in a second, not after a load.
    let listener = TcpListener::bind(listen).await.with_context(|| {
        format!("cannot listen on {listen}; is another ringlet running there? Choose another address with --listen")
    })?;
    let model = LoadedModel::load_whole(&runtime, &args.model).await?;
    let (engine, state) = start_engine(model, runtime.kv_cache_bytes)?;
    let addr = listener
        .local_addr()
        .context("cannot read the listening address")?;
    tracing::info!("listening on http://{addr} (OpenAI-compatible API at http://{addr}/v1)");

    // On a signal, stop accepting connections, then give open streams
    // SHUTDOWN_GRACE_SECS to finish before closing them.
    let stopping = Arc::new(Notify::new());
    let server = axum::serve(listener, api::router(state)).with_graceful_shutdown({
        let stopping = Arc::clone(&stopping);
        async move {
            shutdown_signal().await;
            tracing::info!("stopping: finishing open requests for up to {SHUTDOWN_GRACE_SECS} s");
            stopping.notify_one();
        }
    });
    let grace = async {
        stopping.notified().await;
        tokio::time::sleep(Duration::from_secs(SHUTDOWN_GRACE_SECS)).await;
    };
    tokio::select! {
        served = server => served.context("the HTTP server failed")?,
        () = grace => tracing::warn!("open requests did not finish in time; closing them"),
    }
    let joined = tokio::task::spawn_blocking(move || engine.shutdown());
    let _ = tokio::time::timeout(Duration::from_secs(SHUTDOWN_GRACE_SECS), joined).await;
    tracing::info!("stopped");
    Ok(())
}

/// Starts the engine over a loaded model and builds the API state.
pub fn start_engine(
    model: LoadedModel,
    kv_budget_bytes: u64,
) -> anyhow::Result<(Engine, AppState)> {
    let fingerprint = model
        .file
        .fingerprint()
        .trim_start_matches("sha256:")
        .get(..12)
        .unwrap_or_default()
        .to_string();
    let stop_tokens = model.prompt.tokenizer().stop_tokens().clone();
    let engine = Engine::start_local(model.shard, stop_tokens, kv_budget_bytes)
        .context("cannot start the inference engine threads")?;
    let served = ServedModel {
        system_fingerprint: format!("ringlet-{}-{fingerprint}", env!("CARGO_PKG_VERSION")),
        name: model.name,
        prompt: model.prompt,
        created: crate::unix_seconds(),
    };
    let state = AppState {
        engine: engine.handle.clone(),
        model: Arc::new(served),
    };
    Ok((engine, state))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
