//! The partitioning and scheduling policy: a WebAssembly component built
//! against `wit/scheduler.wit`, run by wasmtime in a sandbox.
//!
//! Every call gets a fresh instance in its own `Store` with a fuel budget
//! ([`POLICY_FUEL_PER_CALL`]) and memory limits ([`POLICY_MEMORY_BYTES`]),
//! and WASI with nothing granted (no files, network, environment; stderr
//! goes to the node's log). A trap, an exhausted budget or a wrong
//! interface is an ordinary error value. Plans are checked by the caller
//! with `scheduler::validate`.
//!
//! Policies live on one thread of their own ([`PolicyHost`]): WASI's sync
//! bindings must not run on an async runtime's thread, and one thread also
//! orders installs and calls. Callers use the async [`PolicyHandle`].

use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::cluster::protocol::PolicyRevision;
use crate::limits::{
    MAX_POLICY_BYTES, POLICY_FUEL_PER_CALL, POLICY_MEMORY_BYTES, POLICY_QUEUE_LEN,
    POLICY_STDERR_BYTES,
};

wasmtime::component::bindgen!({ world: "policy", path: "../wit", additional_derives: [PartialEq] });

// The world's `use` already defines Cluster, Model, Plan, StageLoad,
// WaitingRequest and PolicyInfo here.
pub use ringlet::scheduler::types::{Link, Node, Stage};

/// The default policy, built from `scheduler-wasm` by `build.rs`.
const DEFAULT_POLICY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/default_policy.wasm"));

/// What went wrong with a policy.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("the upload is {bytes} bytes; policies are limited to {MAX_POLICY_BYTES} bytes")]
    TooLarge { bytes: usize },
    #[error("not a WebAssembly component: {0}")]
    NotAComponent(String),
    #[error("the component does not implement the ringlet:scheduler/policy world: {0}")]
    WrongInterface(String),
    #[error(
        "the policy used up its fuel ({} million Wasm instructions) without returning: an endless loop?",
        POLICY_FUEL_PER_CALL / 1_000_000
    )]
    OutOfFuel,
    #[error(
        "the policy tried to use more than {} of memory",
        scheduler::human_bytes(POLICY_MEMORY_BYTES as u64)
    )]
    OutOfMemory,
    #[error("the policy trapped: {0}")]
    Trap(String),
    /// The policy returned an error: it says the model cannot be placed.
    #[error("{0}")]
    Refused(String),
    #[error("the policy's plan is invalid: {0}")]
    InvalidPlan(String),
    #[error("a newer policy change reached this node first")]
    Outdated,
    #[error("the policy thread has stopped")]
    Stopped,
}

impl PolicyError {
    /// True when the policy itself misbehaved (as opposed to answering,
    /// perhaps with a refusal): the node then falls back to the last good one.
    pub fn is_fault(&self) -> bool {
        !matches!(
            self,
            PolicyError::Refused(_) | PolicyError::Outdated | PolicyError::Stopped
        )
    }
}

/// Where a policy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicySource {
    BuiltIn,
    Uploaded,
}

/// A policy as people see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyView {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub source: PolicySource,
    pub size_bytes: usize,
}

/// A compiled policy, linked and ready to instantiate.
struct Compiled {
    pre: PolicyPre<HostState>,
    view: PolicyView,
    /// The component, for sending to peers; `None` for the built-in one.
    wasm: Option<Arc<Vec<u8>>>,
}

struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The wasmtime engine and linker shared by every policy.
struct Sandbox {
    engine: Engine,
    linker: Linker<HostState>,
}

impl Sandbox {
    fn new() -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.consume_fuel(true);
        config.wasm_component_model(true);
        let engine =
            Engine::new(&config).map_err(|e| anyhow::anyhow!("cannot start wasmtime: {e:#}"))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| anyhow::anyhow!("cannot link WASI: {e:#}"))?;
        Ok(Self { engine, linker })
    }

    fn compile(&self, bytes: &[u8], source: PolicySource) -> Result<Compiled, PolicyError> {
        if bytes.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge { bytes: bytes.len() });
        }
        if !bytes.starts_with(b"\0asm") {
            return Err(PolicyError::NotAComponent(
                "it does not start with WebAssembly's magic bytes; upload the .wasm file that `cargo build --target wasm32-wasip2` wrote".into(),
            ));
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| PolicyError::NotAComponent(first_line(&e)))?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(PolicyPre::new)
            .map_err(|e| PolicyError::WrongInterface(first_line(&e)))?;
        let sha256 = kernels::to_hex(&Sha256::digest(bytes));
        let mut compiled = Compiled {
            pre,
            view: PolicyView {
                name: String::new(),
                version: String::new(),
                sha256,
                source,
                size_bytes: bytes.len(),
            },
            wasm: (source == PolicySource::Uploaded).then(|| Arc::new(bytes.to_vec())),
        };
        let info = self.call(&compiled, |policy, store| policy.call_info(store))?;
        if info.name.trim().is_empty() {
            return Err(PolicyError::WrongInterface(
                "info() returned an empty name".into(),
            ));
        }
        compiled.view.name = info.name;
        compiled.view.version = info.version;
        Ok(compiled)
    }

    /// Runs `f` on a fresh instance of `compiled` in a bounded store.
    fn call<R>(
        &self,
        compiled: &Compiled,
        f: impl FnOnce(&Policy, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, PolicyError> {
        let stderr = MemoryOutputPipe::new(POLICY_STDERR_BYTES);
        let wasi = WasiCtxBuilder::new().stderr(stderr.clone()).build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(POLICY_MEMORY_BYTES)
            .instances(16)
            .tables(16)
            .memories(4)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            &self.engine,
            HostState {
                wasi,
                table: ResourceTable::new(),
                limits,
            },
        );
        store.limiter(|state| &mut state.limits);
        store
            .set_fuel(POLICY_FUEL_PER_CALL)
            .map_err(|e| PolicyError::Trap(e.to_string()))?;
        let policy = compiled.pre.instantiate(&mut store).map_err(classify)?;
        let result = f(&policy, &mut store);
        // Without the hint about RUST_BACKTRACE, which the node cannot set.
        let printed = String::from_utf8_lossy(&stderr.contents())
            .lines()
            .filter(|l| !l.starts_with("note: run with `RUST_BACKTRACE"))
            .collect::<Vec<_>>()
            .join(" ")
            .trim()
            .to_string();
        if !printed.is_empty() {
            tracing::info!(policy = %compiled.view.name, "policy stderr: {printed}");
        }
        result.map_err(|error| match classify(error) {
            // A Rust panic prints its message before trapping: show it.
            PolicyError::Trap(trap) if !printed.is_empty() => {
                PolicyError::Trap(format!("{trap}; it printed: {printed}"))
            }
            other => other,
        })
    }
}

fn classify(error: wasmtime::Error) -> PolicyError {
    // StoreLimits refuses the growth and, with trap_on_grow_failure, fails
    // the call with this message.
    if format!("{error:#}").contains("forcing trap when growing memory") {
        return PolicyError::OutOfMemory;
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => PolicyError::OutOfFuel,
        // The trap alone: the Wasm backtrace means nothing to the reader.
        Some(trap) => PolicyError::Trap(trap.to_string()),
        None => PolicyError::Trap(first_line(&error)),
    }
}

/// The first line of an error's innermost cause: wasmtime's messages may
/// go on with a multi-line dump.
fn first_line(error: &wasmtime::Error) -> String {
    let cause = error.root_cause().to_string();
    cause.lines().next().unwrap_or_default().trim().to_string()
}

enum Request {
    Place {
        cluster: Cluster,
        model: Model,
        reply: oneshot::Sender<Placed>,
    },
    Schedule {
        queue: Vec<WaitingRequest>,
        stages: Vec<StageLoad>,
        reply: oneshot::Sender<Result<Vec<u64>, PolicyError>>,
    },
    /// Make `wasm` (or the built-in policy, for `None`) active as
    /// `revision`, after a dry run on `dry_run` when given.
    Install {
        wasm: Option<Arc<Vec<u8>>>,
        revision: PolicyRevision,
        dry_run: Option<(Cluster, Model)>,
        reply: oneshot::Sender<Result<PolicyView, PolicyError>>,
    },
}

/// The answer to a placement: a checked plan (or the policy's refusal)
/// and the policy that produced it, which may be a fallback.
#[derive(Debug)]
pub struct Placed {
    pub result: Result<Plan, PolicyError>,
    pub policy: PolicyView,
    /// Set when the active policy failed and the node fell back.
    pub fallback: Option<Fallback>,
}

/// The active policy failed; the node went back to the last good one.
#[derive(Debug)]
pub struct Fallback {
    pub failed: PolicyView,
    pub error: PolicyError,
    /// The policy now active: its component, `None` for the built-in one.
    pub now_active: Option<Arc<Vec<u8>>>,
}

/// The thread that runs policies.
struct PolicyHost {
    sandbox: Sandbox,
    default: Compiled,
    /// The uploaded policy in use; `None` means the built-in one.
    active: Option<Compiled>,
    /// What to fall back to if `active` fails; `None` means the built-in one.
    last_good: Option<Compiled>,
    revision: PolicyRevision,
}

impl PolicyHost {
    fn current(&self) -> &Compiled {
        self.active.as_ref().unwrap_or(&self.default)
    }

    fn place(&mut self, cluster: &Cluster, model: &Model) -> Placed {
        let first = self.try_place(self.current(), cluster, model);
        match first {
            Err(error) if error.is_fault() && self.active.is_some() => {
                let failed = self.current().view.clone();
                tracing::warn!(policy = %failed.name, sha256 = %failed.sha256, %error, "the scheduling policy failed; falling back to the last good one");
                self.active = self.last_good.take();
                let result = self.try_place(self.current(), cluster, model);
                let now_active = self.current().wasm.clone();
                Placed {
                    result,
                    policy: self.current().view.clone(),
                    fallback: Some(Fallback {
                        failed,
                        error,
                        now_active,
                    }),
                }
            }
            result => Placed {
                result,
                policy: self.current().view.clone(),
                fallback: None,
            },
        }
    }

    /// Runs `place` and checks the plan.
    fn try_place(
        &self,
        policy: &Compiled,
        cluster: &Cluster,
        model: &Model,
    ) -> Result<Plan, PolicyError> {
        let plan = self
            .sandbox
            .call(policy, |p, store| p.call_place(store, cluster, model))?
            .map_err(PolicyError::Refused)?;
        validate_plan(&plan, cluster, model).map_err(PolicyError::InvalidPlan)?;
        Ok(plan)
    }

    fn install(
        &mut self,
        wasm: Option<Arc<Vec<u8>>>,
        revision: PolicyRevision,
        dry_run: Option<(Cluster, Model)>,
    ) -> Result<PolicyView, PolicyError> {
        if revision <= self.revision {
            return Err(PolicyError::Outdated);
        }
        let Some(wasm) = wasm else {
            self.active = None;
            self.last_good = None;
            self.revision = revision;
            return Ok(self.default.view.clone());
        };
        let compiled = self.sandbox.compile(&wasm, PolicySource::Uploaded)?;
        if let Some((cluster, model)) = dry_run {
            self.dry_run(&compiled, &cluster, &model)?;
        }
        let view = compiled.view.clone();
        // Keep an uploaded predecessor to fall back to; after the built-in
        // one, `None` falls back to it.
        self.last_good = self.active.take();
        self.active = Some(compiled);
        self.revision = revision;
        Ok(view)
    }

    /// Runs a new policy's `place` and `schedule` on the current cluster,
    /// as they will run once it is active.
    fn dry_run(
        &self,
        candidate: &Compiled,
        cluster: &Cluster,
        model: &Model,
    ) -> Result<(), PolicyError> {
        let plan = match self.try_place(candidate, cluster, model) {
            Ok(plan) => Some(plan),
            // A refusal is a fine answer only where the built-in policy
            // refuses too (the model does not fit).
            Err(PolicyError::Refused(reason)) => {
                match self.try_place(&self.default, cluster, model) {
                    Ok(_) => {
                        return Err(PolicyError::Refused(format!(
                            "it refuses to place the model on the current cluster, which the built-in policy can: {reason}"
                        )));
                    }
                    Err(_) => None,
                }
            }
            Err(error) => return Err(error),
        };
        let stages: Vec<StageLoad> = plan
            .map(|p| {
                p.stages
                    .iter()
                    .map(|s| StageLoad {
                        node: s.node,
                        in_flight: 0,
                        limit: 16,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let queue: Vec<WaitingRequest> = (1..=4)
            .map(|id| WaitingRequest {
                id,
                prompt_tokens: 100 * id as u32,
                max_tokens: 256,
                waited_millis: 10 * id,
            })
            .collect();
        self.sandbox.call(candidate, |p, store| {
            p.call_schedule(store, &queue, &stages)
        })?;
        Ok(())
    }

    fn run(mut self, requests: std_mpsc::Receiver<Request>) {
        while let Ok(request) = requests.recv() {
            match request {
                Request::Place {
                    cluster,
                    model,
                    reply,
                } => {
                    let _ = reply.send(self.place(&cluster, &model));
                }
                Request::Schedule {
                    queue,
                    stages,
                    reply,
                } => {
                    let result = self.sandbox.call(self.current(), |p, store| {
                        p.call_schedule(store, &queue, &stages)
                    });
                    let _ = reply.send(result);
                }
                Request::Install {
                    wasm,
                    revision,
                    dry_run,
                    reply,
                } => {
                    let _ = reply.send(self.install(wasm, revision, dry_run));
                }
            }
        }
    }
}

/// Checks a plan from the policy against the cluster and model it was
/// given: every layer once, in order, on known nodes, within budgets.
pub fn validate_plan(plan: &Plan, cluster: &Cluster, model: &Model) -> Result<(), String> {
    let nodes: Vec<scheduler::NodeResources> = cluster
        .nodes
        .iter()
        .map(|n| scheduler::NodeResources {
            id: scheduler::NodeId(n.id),
            memory_budget_bytes: n.memory_budget_bytes,
            compute_score: n.compute_score,
        })
        .collect();
    let shape = shape_of(model);
    let plan = to_scheduler_plan(plan);
    scheduler::validate(&plan, &nodes, &shape).map_err(|e| e.to_string())
}

/// The scheduler crate's view of a WIT model.
pub fn shape_of(model: &Model) -> scheduler::ModelShape {
    scheduler::ModelShape::new(
        model.layer_bytes.clone(),
        model.embedding_bytes,
        model.head_bytes,
        model.tied_embeddings,
    )
}

pub fn to_scheduler_plan(plan: &Plan) -> scheduler::Plan {
    scheduler::Plan {
        stages: plan
            .stages
            .iter()
            .map(|s| scheduler::Stage {
                node: scheduler::NodeId(s.node),
                layers: scheduler::Layers {
                    start: s.start,
                    end: s.end,
                },
                bytes: 0,
            })
            .collect(),
    }
}

/// An async handle to the policy thread.
#[derive(Clone)]
pub struct PolicyHandle {
    requests: std_mpsc::SyncSender<Request>,
    built_in: Arc<PolicyView>,
}

impl std::fmt::Debug for PolicyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyHandle").finish_non_exhaustive()
    }
}

/// Starts the policy thread with the built-in default policy.
pub fn start() -> anyhow::Result<(PolicyHandle, JoinHandle<()>)> {
    let sandbox = Sandbox::new()?;
    let default = sandbox
        .compile(DEFAULT_POLICY, PolicySource::BuiltIn)
        .map_err(|e| anyhow::anyhow!("the built-in policy does not load: {e}"))?;
    tracing::info!(policy = %default.view.name, version = %default.view.version, sha256 = %default.view.sha256, "scheduling policy loaded");
    let built_in = Arc::new(default.view.clone());
    let host = PolicyHost {
        sandbox,
        default,
        active: None,
        last_good: None,
        revision: PolicyRevision::default(),
    };
    let (tx, rx) = std_mpsc::sync_channel(POLICY_QUEUE_LEN);
    let thread = std::thread::Builder::new()
        .name("ringlet-policy".into())
        .spawn(move || host.run(rx))?;
    Ok((
        PolicyHandle {
            requests: tx,
            built_in,
        },
        thread,
    ))
}

impl PolicyHandle {
    async fn ask<R>(
        &self,
        make: impl FnOnce(oneshot::Sender<R>) -> Request,
    ) -> Result<R, PolicyError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .try_send(make(reply))
            .map_err(|_| PolicyError::Stopped)?;
        answer.await.map_err(|_| PolicyError::Stopped)
    }

    /// Places the model with the active policy (falling back if it fails).
    pub async fn place(&self, cluster: Cluster, model: Model) -> Result<Placed, PolicyError> {
        self.ask(|reply| Request::Place {
            cluster,
            model,
            reply,
        })
        .await
    }

    /// Which waiting requests start now, in order.
    pub async fn schedule(
        &self,
        queue: Vec<WaitingRequest>,
        stages: Vec<StageLoad>,
    ) -> Result<Vec<u64>, PolicyError> {
        self.ask(|reply| Request::Schedule {
            queue,
            stages,
            reply,
        })
        .await?
    }

    /// Makes `wasm` (the built-in policy for `None`) active as `revision`:
    /// compiled, and with `dry_run`, tried on that cluster first. Fails
    /// with [`PolicyError::Outdated`] when a newer revision is active.
    pub async fn install(
        &self,
        wasm: Option<Arc<Vec<u8>>>,
        revision: PolicyRevision,
        dry_run: Option<(Cluster, Model)>,
    ) -> Result<PolicyView, PolicyError> {
        self.ask(|reply| Request::Install {
            wasm,
            revision,
            dry_run,
            reply,
        })
        .await?
    }

    /// The built-in policy's name, version and hash.
    pub fn built_in(&self) -> &PolicyView {
        &self.built_in
    }
}
