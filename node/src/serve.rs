//! `ringlet serve`: load the model, start the engine, serve the API.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::net::TcpListener;

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
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}; is another ringlet running there? Choose another address with --listen"))?;
    let model = LoadedModel::load_whole(&runtime, &args.model).await?;
    let (engine, state) = start_engine(model)?;
    let addr = listener
        .local_addr()
        .context("cannot read the listening address")?;
    tracing::info!("listening on http://{addr} (OpenAI-compatible API at http://{addr}/v1)");

    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the HTTP server failed")?;
    tracing::info!("stopping");
    // In-flight generations end when their clients' streams close; give the
    // engine a bounded time to wind down.
    let joined = tokio::task::spawn_blocking(move || engine.shutdown());
    let _ = tokio::time::timeout(Duration::from_secs(SHUTDOWN_GRACE_SECS), joined).await;
    Ok(())
}

/// Starts the engine over a loaded model and builds the API state.
pub fn start_engine(model: LoadedModel) -> anyhow::Result<(Engine, AppState)> {
    let context_length = model.file.config().context_length;
    let fingerprint = model.file.fingerprint();
    let served = ServedModel {
        system_fingerprint: format!(
            "ringlet-{}-{}",
            env!("CARGO_PKG_VERSION"),
            fingerprint
                .trim_start_matches("sha256:")
                .get(..12)
                .unwrap_or_default()
        ),
        name: model.name,
        tokenizer: Arc::clone(&model.tokenizer),
        template: model.template,
        context_length,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let engine = Engine::start_local(model.shard, model.tokenizer.stop_tokens().clone())
        .context("cannot start the inference engine threads")?;
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
