//! The partitioning and scheduling policy: a WebAssembly component built
//! against `wit/scheduler.wit`, run by wasmtime in a sandbox.
//!
//! Every call gets a fresh instance in its own `Store`, bounded three ways:
//! fuel ([`POLICY_FUEL_PER_CALL`]) for computing, memory and table limits
//! ([`POLICY_MEMORY_BYTES`]), and a wall-clock deadline
//! ([`POLICY_CALL_TIMEOUT_MS`]) for anything else, such as waiting on a
//! WASI clock: calls run asynchronously and yield every few million
//! instructions, so the deadline always fires. WASI grants nothing (no
//! files, network or environment; stderr goes to the node's log). A trap,
//! an exhausted budget or a wrong interface is an ordinary error value,
//! and every plan is validated before anyone sees it.
//!
//! Policies run on one thread of their own ([`PolicyHost`]), which orders
//! installs and calls; callers use the async [`PolicyHandle`]. Compiling
//! an upload happens off that thread, so scheduling goes on meanwhile.
//!
//! When the active uploaded policy fails (a fault, not a refusal), the
//! host switches at once to the last good policy, or the built-in one,
//! answers with it, and reports a [`Fault`]; the cluster then makes that
//! switch on every node.

use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::cluster::protocol::PolicyRevision;
use crate::limits::{
    MAX_POLICY_BYTES, POLICY_CALL_TIMEOUT_MS, POLICY_FUEL_PER_CALL, POLICY_INSTANCES,
    POLICY_MEMORIES, POLICY_MEMORY_BYTES, POLICY_NAME_CHARS, POLICY_QUEUE_LEN, POLICY_STDERR_BYTES,
    POLICY_TABLE_ELEMENTS, POLICY_TABLES, POLICY_TEXT_BYTES, POLICY_YIELD_FUEL,
};

/// The bindings wasmtime generates from the contract. They stay in here:
/// the rest of the node uses the contract's plain records
/// (`scheduler::contract`), converted at each call.
mod wit {
    wasmtime::component::bindgen!({
        world: "policy",
        path: "../wit",
        exports: { default: async },
    });

    scheduler::contract_conversions!(ringlet::scheduler::types);
}

use wit::{Policy, PolicyPre};

pub use scheduler::contract::{
    Cluster, Link, Model, Node, Plan, PolicyInfo, Stage, StageLoad, WaitingRequest,
};

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
        "the policy tried to use more than {} of memory (or too large a table)",
        scheduler::human_bytes(POLICY_MEMORY_BYTES as u64)
    )]
    OutOfMemory,
    #[error(
        "the policy did not return within {} s (it waited on something?)",
        POLICY_CALL_TIMEOUT_MS as f64 / 1000.0
    )]
    TimedOut,
    #[error("the policy trapped: {0}")]
    Trap(String),
    /// The policy returned an error: it says the model cannot be placed.
    #[error("{0}")]
    Refused(String),
    /// The policy refused a placement the built-in policy can make.
    #[error("it refuses to place the model on a cluster where the built-in policy can: {0}")]
    RefusesPlaceable(String),
    #[error("the policy's plan is invalid: {0}")]
    InvalidPlan(String),
    #[error("a newer policy change reached this node first")]
    Outdated,
    #[error("{POLICY_QUEUE_LEN} policy calls are already waiting; retry shortly")]
    Busy,
    #[error("the policy thread has stopped")]
    Stopped,
}

impl PolicyError {
    /// True when the policy itself misbehaved (as opposed to answering,
    /// perhaps with a refusal): the node then falls back to the last good one.
    pub fn is_fault(&self) -> bool {
        !matches!(
            self,
            PolicyError::Refused(_)
                | PolicyError::Outdated
                | PolicyError::Busy
                | PolicyError::Stopped
        )
    }
}

// Where a policy came from, and a policy as people see it: part of the
// HTTP API, so defined in `api_types`.
pub use api_types::{PolicySource, PolicyView};

/// How a policy change came about, which decides what it is checked
/// against and what it falls back to.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// An upload through this node's API: tried on this cluster first, and
    /// the policy it replaces is kept to fall back to.
    Upload { cluster: Cluster, model: Model },
    /// Another node's upload, passed on (it ran there already).
    Propagated,
    /// A fallback after a policy failed: what it falls back to in turn is
    /// the built-in policy.
    Fallback,
}

/// The active uploaded policy failed. This node already runs `now_active`;
/// the cluster must follow.
#[derive(Debug, Clone)]
pub struct Fault {
    pub failed: PolicyView,
    pub error: PolicyError,
    pub now_active: PolicyView,
    /// The component now active; `None` for the built-in one.
    pub now_active_wasm: Option<Bytes>,
}

/// Faults of the active policy, for the cluster to act on.
pub type Faults = mpsc::Receiver<Fault>;

/// The answer to a placement: a checked plan (or the policy's refusal),
/// and the policy that made it.
#[derive(Debug)]
pub struct Placed {
    pub result: Result<Plan, PolicyError>,
    pub policy: PolicyView,
}

/// A compiled policy, linked and ready to instantiate.
pub struct Compiled {
    pre: PolicyPre<HostState>,
    view: PolicyView,
    /// The component, for sending to peers; `None` for the built-in one.
    wasm: Option<Bytes>,
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

/// The wasmtime engine and linker shared by every policy; compiling needs
/// only these, so it can run on any thread.
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
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| anyhow::anyhow!("cannot link WASI: {e:#}"))?;
        Ok(Self { engine, linker })
    }

    /// Compiles and links a component; its name comes from `identify`.
    fn compile(&self, bytes: Bytes, source: PolicySource) -> Result<Compiled, PolicyError> {
        if bytes.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge { bytes: bytes.len() });
        }
        if !bytes.starts_with(b"\0asm") {
            return Err(PolicyError::NotAComponent(
                "it does not start with WebAssembly's magic bytes; upload the .wasm file that `cargo build --target wasm32-wasip2` wrote".into(),
            ));
        }
        let component = Component::new(&self.engine, &bytes)
            .map_err(|e| PolicyError::NotAComponent(first_line(&e)))?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(PolicyPre::new)
            .map_err(|e| PolicyError::WrongInterface(first_line(&e)))?;
        Ok(Compiled {
            pre,
            view: PolicyView {
                name: String::new(),
                version: String::new(),
                sha256: kernels::to_hex(&Sha256::digest(&bytes)),
                source,
                size_bytes: bytes.len() as u64,
            },
            wasm: (source == PolicySource::Uploaded).then_some(bytes),
        })
    }

    /// Asks a new policy its name and version.
    async fn identify(&self, compiled: &mut Compiled) -> Result<(), PolicyError> {
        let info = self
            .call(compiled, async |p, store| p.call_info(store).await)
            .await
            .map(PolicyInfo::from)?;
        let name = info.name.trim();
        if name.is_empty() {
            return Err(PolicyError::WrongInterface(
                "info() returned an empty name".into(),
            ));
        }
        let short = |text: &str| text.chars().take(POLICY_NAME_CHARS).collect::<String>();
        compiled.view.name = short(name);
        compiled.view.version = short(info.version.trim());
        Ok(())
    }

    /// Runs `f` on a fresh instance of `compiled` in a bounded store.
    async fn call<R>(
        &self,
        compiled: &Compiled,
        f: impl AsyncFnOnce(&Policy, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, PolicyError> {
        let stderr = MemoryOutputPipe::new(POLICY_STDERR_BYTES);
        let wasi = WasiCtxBuilder::new().stderr(stderr.clone()).build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(POLICY_MEMORY_BYTES)
            .table_elements(POLICY_TABLE_ELEMENTS)
            .instances(POLICY_INSTANCES)
            .tables(POLICY_TABLES)
            .memories(POLICY_MEMORIES)
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
            .and_then(|()| store.fuel_async_yield_interval(Some(POLICY_YIELD_FUEL)))
            .map_err(|e| PolicyError::Trap(first_line(&e)))?;
        let run = async {
            let policy = compiled.pre.instantiate_async(&mut store).await?;
            f(&policy, &mut store).await
        };
        let outcome =
            tokio::time::timeout(Duration::from_millis(POLICY_CALL_TIMEOUT_MS), run).await;
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
        match outcome {
            Err(_) => Err(PolicyError::TimedOut),
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(match classify(error) {
                // A Rust panic prints its message before trapping: show it.
                PolicyError::Trap(trap) if !printed.is_empty() => {
                    PolicyError::Trap(format!("{trap}; it printed: {}", capped(&printed)))
                }
                other => other,
            }),
        }
    }
}

fn classify(error: wasmtime::Error) -> PolicyError {
    // StoreLimits refuses the growth and, with trap_on_grow_failure, fails
    // the call with this message.
    if format!("{error:#}").contains("forcing trap when growing") {
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

/// Text from a policy, cut to [`POLICY_TEXT_BYTES`]: it goes into logs,
/// API answers and frames to every peer.
fn capped(text: &str) -> String {
    if text.len() <= POLICY_TEXT_BYTES {
        return text.to_string();
    }
    let mut end = POLICY_TEXT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
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
    /// Make `compiled` (the built-in policy for `None`) active as
    /// `revision`.
    Install {
        /// Boxed: a compiled policy is large beside the other requests.
        compiled: Option<Box<Compiled>>,
        revision: PolicyRevision,
        change: Change,
        reply: oneshot::Sender<Result<PolicyView, PolicyError>>,
    },
}

/// The thread that runs policies.
struct PolicyHost {
    sandbox: Arc<Sandbox>,
    default: Compiled,
    /// The uploaded policy in use; `None` means the built-in one.
    active: Option<Compiled>,
    /// What to fall back to if `active` fails; `None` means the built-in one.
    last_good: Option<Compiled>,
    revision: PolicyRevision,
    faults: mpsc::Sender<Fault>,
}

impl PolicyHost {
    fn current(&self) -> &Compiled {
        self.active.as_ref().unwrap_or(&self.default)
    }

    /// Places with the active policy; while it fails, with the one it falls
    /// back to. Ends with the built-in policy at the latest.
    async fn place(&mut self, cluster: &Cluster, model: &Model) -> Placed {
        loop {
            match self.try_place(self.current(), cluster, model).await {
                Err(error) if error.is_fault() && self.active.is_some() => self.fail_over(error),
                result => {
                    return Placed {
                        result,
                        policy: self.current().view.clone(),
                    };
                }
            }
        }
    }

    /// Runs `place` and checks the plan. An uploaded policy that refuses
    /// where the built-in one can place has failed.
    async fn try_place(
        &self,
        policy: &Compiled,
        cluster: &Cluster,
        model: &Model,
    ) -> Result<Plan, PolicyError> {
        let (wit_cluster, wit_model) = (cluster.clone().into(), model.clone().into());
        let answer = self
            .sandbox
            .call(policy, async |p, store| {
                p.call_place(store, &wit_cluster, &wit_model).await
            })
            .await?;
        let plan = match answer {
            Ok(plan) => Plan::from(plan),
            Err(reason) => {
                let reason = capped(&reason);
                let uploaded = policy.view.source == PolicySource::Uploaded;
                if uploaded
                    && Box::pin(self.try_place(&self.default, cluster, model))
                        .await
                        .is_ok()
                {
                    return Err(PolicyError::RefusesPlaceable(reason));
                }
                return Err(PolicyError::Refused(reason));
            }
        };
        scheduler::contract::check_plan(&plan, cluster, model)
            .map_err(|violation| PolicyError::InvalidPlan(violation.to_string()))?;
        Ok(plan)
    }

    async fn schedule(
        &mut self,
        queue: &[WaitingRequest],
        stages: &[StageLoad],
    ) -> Result<Vec<u64>, PolicyError> {
        let queue: Vec<_> = queue.iter().cloned().map(Into::into).collect();
        let stages: Vec<_> = stages.iter().copied().map(Into::into).collect();
        loop {
            let answer = self
                .sandbox
                .call(self.current(), async |p, store| {
                    p.call_schedule(store, &queue, &stages).await
                })
                .await;
            match answer {
                Err(error) if error.is_fault() && self.active.is_some() => self.fail_over(error),
                answer => return answer,
            }
        }
    }

    /// The active uploaded policy failed: use the last good one (or the
    /// built-in one) from now on, and tell the cluster.
    fn fail_over(&mut self, error: PolicyError) {
        let Some(failed) = self.active.take() else {
            return;
        };
        self.active = self.last_good.take();
        let now = self.current();
        tracing::warn!(
            failed = %failed.view.name, sha256 = %failed.view.sha256, %error, now = %now.view.name,
            "the scheduling policy failed; falling back"
        );
        let fault = Fault {
            failed: failed.view,
            error,
            now_active: now.view.clone(),
            now_active_wasm: now.wasm.clone(),
        };
        if self.faults.try_send(fault).is_err() {
            tracing::debug!("nobody takes policy faults (no cluster)");
        }
    }

    async fn install(
        &mut self,
        compiled: Option<Compiled>,
        revision: PolicyRevision,
        change: Change,
    ) -> Result<PolicyView, PolicyError> {
        if revision <= self.revision {
            return Err(PolicyError::Outdated);
        }
        match compiled {
            None => {
                self.active = None;
                self.last_good = None;
            }
            Some(mut compiled) => {
                self.sandbox.identify(&mut compiled).await?;
                if let Change::Upload { cluster, model } = &change {
                    self.dry_run(&compiled, cluster, model).await?;
                }
                let same = self
                    .active
                    .as_ref()
                    .is_some_and(|a| a.view.sha256 == compiled.view.sha256);
                match change {
                    // Falling back ends the chain: after this one, the
                    // built-in policy.
                    Change::Fallback => self.last_good = None,
                    // Keep the policy it replaces to fall back to (unless
                    // it is the same one again).
                    Change::Upload { .. } | Change::Propagated if !same => {
                        self.last_good = self.active.take();
                    }
                    Change::Upload { .. } | Change::Propagated => {}
                }
                self.active = Some(compiled);
            }
        }
        self.revision = revision;
        Ok(self.current().view.clone())
    }

    /// Runs a new policy's `place` and `schedule` on the current cluster,
    /// as they will run once it is active: idle, busy, and with a long queue.
    async fn dry_run(
        &self,
        candidate: &Compiled,
        cluster: &Cluster,
        model: &Model,
    ) -> Result<(), PolicyError> {
        let plan = match self.try_place(candidate, cluster, model).await {
            Ok(plan) => Some(plan),
            // A refusal is fine where the built-in policy refuses too.
            Err(PolicyError::Refused(_)) => None,
            Err(error) => return Err(error),
        };
        let nodes: Vec<u64> = match &plan {
            Some(plan) => plan.stages.iter().map(|s| s.node).collect(),
            None => cluster.nodes.iter().map(|n| n.id).collect(),
        };
        let stages = |in_flight: u32| -> Vec<StageLoad> {
            nodes
                .iter()
                .map(|&node| StageLoad {
                    node,
                    in_flight,
                    limit: crate::limits::STAGE_REQUEST_LIMIT,
                })
                .collect()
        };
        let queue = |len: u64| -> Vec<WaitingRequest> {
            (1..=len)
                .map(|id| WaitingRequest {
                    id,
                    prompt_tokens: 100 + (id as u32 * 37) % 900,
                    max_tokens: 256,
                    waited_millis: 10 * (len + 1 - id),
                })
                .collect()
        };
        for (waiting, in_flight) in [(4, 0), (64, 8), (0, 16)] {
            let queue: Vec<_> = queue(waiting).into_iter().map(Into::into).collect();
            let stages: Vec<_> = stages(in_flight).into_iter().map(Into::into).collect();
            self.sandbox
                .call(candidate, async |p, store| {
                    p.call_schedule(store, &queue, &stages).await
                })
                .await?;
        }
        Ok(())
    }

    fn run(mut self, runtime: &tokio::runtime::Runtime, requests: std_mpsc::Receiver<Request>) {
        while let Ok(request) = requests.recv() {
            runtime.block_on(self.handle(request));
        }
    }

    async fn handle(&mut self, request: Request) {
        match request {
            Request::Place {
                cluster,
                model,
                reply,
            } => {
                let _ = reply.send(self.place(&cluster, &model).await);
            }
            Request::Schedule {
                queue,
                stages,
                reply,
            } => {
                let _ = reply.send(self.schedule(&queue, &stages).await);
            }
            Request::Install {
                compiled,
                revision,
                change,
                reply,
            } => {
                let _ = reply.send(self.install(compiled.map(|c| *c), revision, change).await);
            }
        }
    }
}

/// An async handle to the policy thread.
#[derive(Clone)]
pub struct PolicyHandle {
    requests: std_mpsc::SyncSender<Request>,
    sandbox: Arc<Sandbox>,
    built_in: Arc<PolicyView>,
}

impl std::fmt::Debug for PolicyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyHandle").finish_non_exhaustive()
    }
}

/// Starts the policy thread with the built-in default policy. The thread
/// ends when the last handle is dropped; faults of uploaded policies come
/// out of the returned receiver.
pub fn start() -> anyhow::Result<(PolicyHandle, Faults)> {
    let not_loaded = |e: PolicyError| anyhow::anyhow!("the built-in policy does not load: {e}");
    let sandbox = Arc::new(Sandbox::new()?);
    let mut default = sandbox
        .compile(Bytes::from_static(DEFAULT_POLICY), PolicySource::BuiltIn)
        .map_err(not_loaded)?;
    let (faults_tx, faults) = mpsc::channel(POLICY_QUEUE_LEN);
    let (requests, requests_rx) = std_mpsc::sync_channel(POLICY_QUEUE_LEN);
    let (named_tx, named) = std_mpsc::sync_channel(1);
    let host_sandbox = Arc::clone(&sandbox);
    std::thread::Builder::new()
        .name("ringlet-policy".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = named_tx.send(Err(PolicyError::Trap(format!(
                        "cannot start the policy thread's runtime: {error}"
                    ))));
                    return;
                }
            };
            let identified = runtime.block_on(host_sandbox.identify(&mut default));
            let started = identified.is_ok();
            let _ = named_tx.send(identified.map(|()| default.view.clone()));
            if started {
                let host = PolicyHost {
                    sandbox: host_sandbox,
                    default,
                    active: None,
                    last_good: None,
                    revision: PolicyRevision::default(),
                    faults: faults_tx,
                };
                host.run(&runtime, requests_rx);
            }
        })?;
    let view = named
        .recv()
        .map_err(|_| anyhow::anyhow!("the policy thread ended while starting"))?
        .map_err(not_loaded)?;
    tracing::info!(policy = %view.name, version = %view.version, sha256 = %view.sha256, "scheduling policy loaded");
    let handle = PolicyHandle {
        requests,
        sandbox,
        built_in: Arc::new(view),
    };
    Ok((handle, faults))
}

impl PolicyHandle {
    async fn ask<R>(
        &self,
        make: impl FnOnce(oneshot::Sender<R>) -> Request,
    ) -> Result<R, PolicyError> {
        let (reply, answer) = oneshot::channel();
        self.requests.try_send(make(reply)).map_err(|e| match e {
            std_mpsc::TrySendError::Full(_) => PolicyError::Busy,
            std_mpsc::TrySendError::Disconnected(_) => PolicyError::Stopped,
        })?;
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

    /// Makes `wasm` (the built-in policy for `None`) active as `revision`.
    /// It is compiled here, off the policy thread, then checked as `change`
    /// says. Fails with [`PolicyError::Outdated`] when a newer revision is
    /// active.
    pub async fn install(
        &self,
        wasm: Option<Bytes>,
        revision: PolicyRevision,
        change: Change,
    ) -> Result<PolicyView, PolicyError> {
        let compiled = match wasm {
            None => None,
            Some(wasm) => {
                let sandbox = Arc::clone(&self.sandbox);
                let compiling = tokio::task::spawn_blocking(move || {
                    sandbox.compile(wasm, PolicySource::Uploaded)
                });
                Some(Box::new(
                    compiling.await.map_err(|_| PolicyError::Stopped)??,
                ))
            }
        };
        self.ask(|reply| Request::Install {
            compiled,
            revision,
            change,
            reply,
        })
        .await?
    }

    /// The built-in policy's name, version and hash.
    pub fn built_in(&self) -> &PolicyView {
        &self.built_in
    }
}

impl crate::engine::AdmissionPolicy for PolicyHandle {
    fn schedule(
        &self,
        queue: Vec<WaitingRequest>,
        stages: Vec<StageLoad>,
    ) -> futures_util::future::BoxFuture<'static, Result<Vec<u64>, String>> {
        let handle = self.clone();
        Box::pin(async move {
            PolicyHandle::schedule(&handle, queue, stages)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wit::ringlet::scheduler::types as generated;

    #[test]
    fn contract_records_round_trip_through_the_generated_bindings() {
        let cluster = Cluster {
            nodes: vec![Node {
                id: 7,
                name: "a".into(),
                device: "cpu".into(),
                memory_budget_bytes: 300,
                compute_score: 2.5,
            }],
            links: vec![Link {
                from: 7,
                to: 8,
                latency_micros: 90,
                bandwidth_bytes_per_second: 1_000,
            }],
        };
        let there = generated::Cluster::from(cluster.clone());
        assert_eq!(there.nodes[0].memory_budget_bytes, 300);
        assert_eq!(there.links[0].latency_micros, 90);
        assert_eq!(Cluster::from(there), cluster);
        let model = Model {
            layer_count: 2,
            layer_bytes: vec![10, 20],
            embedding_bytes: 5,
            head_bytes: 6,
            tied_embeddings: true,
            kv_bytes_per_token_per_layer: 8,
            context_length: 512,
        };
        assert_eq!(Model::from(generated::Model::from(model.clone())), model);
        let plan = Plan {
            stages: vec![Stage {
                node: 7,
                start: 0,
                end: 2,
            }],
        };
        assert_eq!(Plan::from(generated::Plan::from(plan.clone())), plan);
        let waiting = WaitingRequest {
            id: 3,
            prompt_tokens: 4,
            max_tokens: 5,
            waited_millis: 6,
        };
        let back = WaitingRequest::from(generated::WaitingRequest::from(waiting.clone()));
        assert_eq!(back, waiting);
        let load = StageLoad {
            node: 7,
            in_flight: 1,
            limit: 16,
        };
        assert_eq!(StageLoad::from(generated::StageLoad::from(load)), load);
    }
}
