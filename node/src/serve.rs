//! `ringlet serve`: join (or start) a cluster, serve the API.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use rand::Rng;
use scheduler::NodeId;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, AdminToken, ApiAccess, AppState, ServedModel};
use crate::cli::RuntimeConfig;
use crate::cli::ServeArgs;
use crate::cluster::{self, ClusterConfig, ModelOpener, SwitchedModel, resources};
use crate::current::Current;
use crate::engine::{Engine, EngineHandle, EngineModel, Scheduling};
use crate::hub::HubFiles;
use crate::identity::{self, Identity, JoinToken, Membership, PeerPass};
use crate::limits::{
    LINK_FAREWELL_MS, MAX_CLUSTER_NAME_BYTES, SHUTDOWN_GRACE_SECS, SHUTDOWN_LAST_EVENTS_SECS,
};
use crate::loaded_model::{LoadedModel, OpenedModel};
use crate::model_store::Downloads;
use crate::prompt::PromptBuilder;
use crate::stopping::Stopping;
use futures_util::FutureExt;
use kernels::ModelFile;

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut runtime = args.runtime.resolve()?;
    let listen = args.listen_addr()?;
    let peers = args.peer_addrs()?;
    let name = args.node_name();
    // Bind before loading so a taken port fails in a second, not after a load.
    let listener = TcpListener::bind(listen).await.with_context(|| {
        format!("cannot listen on {listen}; is another ringlet running there? Choose another address with --listen")
    })?;
    let listen = listener
        .local_addr()
        .context("cannot read the listening address")?;
    let me = NodeId(rand::rng().random());
    tracing::info!(version = env!("CARGO_PKG_VERSION"), node = %me, %name, threads = runtime.threads, "starting ringlet node");
    let identity = cluster_identity(&args)?;
    // Checked before anything loads: a wrong flag is said at once.
    let ice_servers = ice_servers(&args)?;
    let peer_pass = PeerPass::new(&identity.secret);

    let mdns = !args.no_mdns && !listen.ip().is_loopback();
    if args.no_mdns {
        tracing::info!("discovery is off (--no-mdns): joining only --peer nodes");
    } else if !mdns {
        tracing::info!(
            "discovery is off: {listen} is reachable from this machine only (listen on 0.0.0.0 to pool machines)"
        );
    }
    anyhow::ensure!(
        !args.cluster.trim().is_empty() && args.cluster.len() <= MAX_CLUSTER_NAME_BYTES,
        "--cluster `{}` must be 1 to {MAX_CLUSTER_NAME_BYTES} characters",
        args.cluster
    );

    runtime.hub.client_name = Some(name.clone());
    runtime.hub.peer_pass = Some(peer_pass.clone());
    let model = OpenedModel::open_with_peers(&runtime, &args.model, &peers).await?;
    let score = tokio::task::spawn_blocking(resources::measure_compute_score)
        .await
        .unwrap_or(0.0);
    let resources = resources::describe(&args.runtime.device, args.memory_budget, score);
    tracing::info!(
        device = %resources.device_name,
        memory_budget_mib = resources.memory_budget_bytes >> 20,
        compute_gflops = format!("{score:.1}"),
        model = %model.name,
        fingerprint = %model.file.fingerprint(),
        "node ready to join"
    );

    let (policy, policy_faults) =
        crate::policy::start().context("cannot start the scheduling policy")?;
    let (stage_loads_tx, stage_loads) = watch::channel(Vec::new());
    let (kv_room_tx, kv_room) = watch::channel(None);
    let (engine, pipeline) = Engine::start(
        engine_model(&model.file, &model.prompt, &runtime),
        Some(Scheduling {
            policy: policy.clone(),
            stages: stage_loads,
            kv_room,
        }),
    )
    .context("cannot start the request coordinator")?;
    let OpenedModel {
        name: model_name,
        file,
        prompt,
        hub_files,
    } = model;
    let grammars = Arc::clone(prompt.grammars());
    let served = Current::new(served_model(model_name.clone(), prompt, &file));
    let shared_files = Current::new(hub_files.clone());
    let open_model = model_opener(
        runtime.clone(),
        engine.handle.clone(),
        served.clone(),
        shared_files.clone(),
    );
    let cluster = cluster::start(
        ClusterConfig {
            me,
            identity,
            plaintext_frames: args.insecure_plaintext_links,
            peer_pass: peer_pass.clone(),
            admin_token: args.admin_token.clone().filter(|t| !t.is_empty()),
            name,
            cluster: args.cluster.clone(),
            mdns,
            listen,
            peers,
            resources,
            model_name,
            grammars,
            hub_files,
            model_store: runtime.store.clone(),
            downloads: Downloads::default(),
            device: runtime.device.clone(),
            policy,
            policy_faults,
            stage_loads: stage_loads_tx,
            kv_room: kv_room_tx,
            kv_cache_bytes: runtime.kv_cache_bytes,
            open_model,
            recovery_wait: Duration::from_secs(args.recovery_wait),
            link_mode: args.link,
            ice_servers,
            stage_fault: crate::stage::TestFault::from_env(),
        },
        Arc::new(file),
        pipeline,
    );
    let (stop_http, stopping) = Stopping::new();
    let state = AppState {
        engine: engine.handle.clone(),
        model: served,
        cluster: Some(cluster),
        hub_files: shared_files,
        admin_token: args.admin_token.as_deref().and_then(AdminToken::new),
        access: api_access(&args, listen)?,
        peer_pass: Some(peer_pass),
        stopping,
    };
    tracing::info!("listening on http://{listen} (OpenAI-compatible API at http://{listen}/v1)");
    serve_until_stopped(listener, state, engine, stop_http).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Loads (or creates) this node's key and its cluster's secret, and says
/// in the log which cluster it is and how to add machines.
fn cluster_identity(args: &ServeArgs) -> anyhow::Result<Identity> {
    let join = args
        .join
        .as_deref()
        .map(str::parse::<JoinToken>)
        .transpose()
        .context("--join")?;
    let dir = identity::config_dir(args.config_dir.as_deref())?;
    let (identity, membership) = Identity::load_or_create(&dir, join.as_ref())?;
    let secret = identity.secret.fingerprint();
    let key = identity::key_fingerprint(&identity.key.public);
    let dir = dir.display();
    match membership {
        Membership::Created => tracing::info!(
            %secret, %key,
            "created a new cluster secret in {dir}; to add a machine, run `ringlet invite` here and start it with --join TOKEN"
        ),
        Membership::Joined => {
            tracing::info!(%secret, %key, "joining the cluster of the --join token; stored it in {dir}")
        }
        Membership::Stored => tracing::info!(%secret, %key, "cluster secret from {dir}"),
    }
    if args.insecure_plaintext_links {
        tracing::warn!("frames between nodes travel unencrypted (--insecure-plaintext-links)");
    }
    Ok(identity)
}

/// The API keys from the flags and the key file, and whether a node
/// without one answers other machines; says in the log which applies.
/// The STUN and TURN servers of `--stun` and `--turn`, checked: a URL
/// with the wrong scheme, or TURN without its user and credential, is an
/// error that says what to pass.
fn ice_servers(args: &ServeArgs) -> anyhow::Result<Vec<cluster::protocol::IceServer>> {
    let mut servers = Vec::new();
    for url in &args.stun {
        anyhow::ensure!(
            url.starts_with("stun:"),
            "--stun {url}: a STUN server is given as stun:HOST:PORT"
        );
        servers.push(cluster::protocol::IceServer {
            url: url.clone(),
            username: String::new(),
            credential: String::new(),
        });
    }
    for url in &args.turn {
        anyhow::ensure!(
            url.starts_with("turn:"),
            "--turn {url}: a TURN server is given as turn:HOST:PORT (UDP; turns: is not supported)"
        );
        let (Some(username), Some(credential)) = (&args.turn_user, &args.turn_credential) else {
            anyhow::bail!(
                "--turn {url} needs --turn-user and --turn-credential (or RINGLET_TURN_USER and RINGLET_TURN_CREDENTIAL)"
            );
        };
        servers.push(cluster::protocol::IceServer {
            url: url.clone(),
            username: username.clone(),
            credential: credential.clone(),
        });
    }
    Ok(servers)
}

fn api_access(args: &ServeArgs, listen: SocketAddr) -> anyhow::Result<ApiAccess> {
    let mut keys = args.api_keys.clone();
    if let Some(path) = &args.api_key_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the API key file {}", path.display()))?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
    }
    let loopback = listen.ip().is_loopback();
    let access = ApiAccess::new(&keys, args.open_api || loopback);
    if access.requires_key() {
        tracing::info!("the API requires a key (Authorization: Bearer KEY)");
    } else if args.open_api && !loopback {
        tracing::warn!(
            "the API is open to anyone who reaches {listen} (--open-api); set --api-key to require a key"
        );
    } else if !loopback {
        tracing::warn!(
            "the API answers this machine only, because it has no key: start with --api-key KEY (or RINGLET_API_KEY) to serve other machines, or --open-api to serve them without one. Nodes link to each other either way."
        );
    }
    Ok(access)
}

/// What the coordinator needs to know of `file`.
fn engine_model(file: &ModelFile, prompt: &PromptBuilder, runtime: &RuntimeConfig) -> EngineModel {
    let config = file.config();
    EngineModel {
        context_length: config.context_length,
        stop_tokens: prompt.tokenizer().stop_tokens().clone(),
        kv_bytes_per_token: config.kv_bytes_per_token_per_layer() * config.n_layers as u64,
        kv_budget_bytes: runtime.kv_cache_bytes,
        prefill_chunk_tokens: runtime.prefill_chunk_tokens,
    }
}

/// What the API needs to know of the model `name` in `file`.
fn served_model(name: String, prompt: PromptBuilder, file: &ModelFile) -> ServedModel {
    let fingerprint = short_fingerprint(file.fingerprint());
    ServedModel {
        system_fingerprint: format!("ringlet-{}-{fingerprint}", env!("CARGO_PKG_VERSION")),
        name,
        prompt,
        created: crate::unix_seconds(),
    }
}

/// Opens the model a cluster switch names, for the cluster actor to swap
/// in; the actor commits the engine and the API to it at the same time.
fn model_opener(
    runtime: RuntimeConfig,
    engine: EngineHandle,
    served: Current<ServedModel>,
    shared_files: Current<Option<Arc<HubFiles>>>,
) -> ModelOpener {
    Arc::new(move |model: String, peers: Vec<String>| {
        let (runtime, engine) = (runtime.clone(), engine.clone());
        let (served, shared_files) = (served.clone(), shared_files.clone());
        async move {
            let opened = OpenedModel::open_with_peers(&runtime, &model, &peers)
                .await
                .map_err(|error| format!("{error:#}"))?;
            let for_engine = engine_model(&opened.file, &opened.prompt, &runtime);
            let OpenedModel {
                name,
                file,
                prompt,
                hub_files,
            } = opened;
            let grammars = Arc::clone(prompt.grammars());
            let for_api = served_model(name.clone(), prompt, &file);
            let files = hub_files.clone();
            let commit = Box::new(move || {
                engine.set_model(for_engine);
                served.set(for_api);
                shared_files.set(files);
            });
            Ok(SwitchedModel {
                name,
                file: Arc::new(file),
                grammars,
                hub_files,
                commit,
            })
        }
        .boxed()
    })
}

/// Serves until a signal, then gives open streams SHUTDOWN_GRACE_SECS,
/// then stops `engine`, and with it the cluster, whose links say goodbye.
/// `stop_http` sets `state.stopping` at the signal.
async fn serve_until_stopped(
    listener: TcpListener,
    state: AppState,
    engine: Engine,
    stop_http: tokio::sync::watch::Sender<bool>,
) -> anyhow::Result<()> {
    let mut stopping = state.stopping.clone();
    let cluster = state.cluster.clone();
    let app = api::router(state).into_make_service_with_connect_info::<SocketAddr>();
    // Every connection unbuffered: a link carries one small frame per
    // token each way and the API streams one small event per token, and
    // with Nagle's algorithm a frame written while the last one waits for
    // the peer's delayed ACK waits too (up to 40 ms). Dialed links set
    // the same (link::dial).
    let listener = listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot turn off Nagle's algorithm on a connection");
        }
    });
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        tracing::info!("stopping: finishing open requests for up to {SHUTDOWN_GRACE_SECS} s");
        stop_http.send_replace(true);
    });
    let mut server = std::pin::pin!(server.into_future());
    // The server ends once stopping has begun (with nothing open, as soon
    // as the flag is set: the two are ready together), or when it fails.
    let ended = tokio::select! {
        served = &mut server => Some(served),
        () = stopping.wait() => None,
    };
    let grace = Duration::from_secs(SHUTDOWN_GRACE_SECS);
    let drained = match ended {
        Some(served) => {
            served.context("the HTTP server failed")?;
            true
        }
        // Stopping: open streams get a deadline.
        None => match tokio::time::timeout(grace, &mut server).await {
            Ok(served) => {
                served.context("the HTTP server failed")?;
                true
            }
            Err(_) => {
                tracing::warn!(
                    "open requests did not finish within {SHUTDOWN_GRACE_SECS} s; ending them"
                );
                false
            }
        },
    };
    // The engine fails what is still queued or running, with a message
    // that says to send it again...
    let joined = tokio::task::spawn_blocking(move || engine.shutdown());
    let engine_stopped = tokio::time::timeout(grace, joined).await.is_ok();
    if !engine_stopped {
        tracing::warn!(
            "the inference engine did not stop within {SHUTDOWN_GRACE_SECS} s; exiting anyway"
        );
    }
    // ...which the connections still open deliver before they close.
    if !drained
        && engine_stopped
        && tokio::time::timeout(Duration::from_secs(SHUTDOWN_LAST_EVENTS_SECS), server)
            .await
            .is_err()
    {
        tracing::warn!("some clients did not take their last event; closing their connections");
    }
    // The engine's end also ended the cluster actor: each link tells its peer
    // that this node is stopping, and closes.
    if engine_stopped && let Some(cluster) = cluster {
        let farewell = Duration::from_millis(LINK_FAREWELL_MS);
        if tokio::time::timeout(farewell, cluster.links_closed())
            .await
            .is_err()
        {
            tracing::warn!(
                open = cluster.open_links(),
                "some links did not close within {LINK_FAREWELL_MS} ms; their peers see the connection drop, not this node's goodbye"
            );
        }
    }
    Ok(())
}

fn short_fingerprint(fingerprint: &str) -> String {
    fingerprint
        .trim_start_matches("sha256:")
        .get(..12)
        .unwrap_or_default()
        .to_string()
}

/// Starts an engine over a whole model loaded in this process, with no
/// cluster (in-process API tests).
pub fn start_local_engine(
    model: LoadedModel,
    kv_budget_bytes: u64,
) -> anyhow::Result<(Engine, AppState)> {
    let engine = Engine::start_local(
        model.shard,
        &model.prompt,
        kv_budget_bytes,
        crate::limits::PREFILL_CHUNK_TOKENS,
    )
    .context("cannot start the inference engine threads")?;
    let served = served_model(model.name, model.prompt, &model.file);
    let state = AppState {
        engine: engine.handle.clone(),
        model: Current::new(served),
        cluster: None,
        hub_files: Current::new(None),
        admin_token: None,
        access: ApiAccess::open(),
        peer_pass: None,
        stopping: Stopping::never(),
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
