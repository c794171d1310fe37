//! Command-line flags, parsed in two stages: clap reads the raw flags, then
//! [`RuntimeArgs::resolve`] turns them into a validated [`RuntimeConfig`]
//! with every default decided.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use kernels::Device;

use crate::limits::DEFAULT_KV_CACHE_BYTES;
use crate::model_store::{DEFAULT_MODEL, ModelStore};

const ABOUT: &str = "Run a large language model across the machines you already own.";

const LONG_ABOUT: &str = "\
Run a large language model across the machines you already own.

Start `ringlet` on each machine: the nodes find each other on the local
network (mDNS), split the model's layers between them, and each serves the
dashboard and an OpenAI-compatible API (POST /v1/chat/completions,
GET /v1/models) on port 52415. With no subcommand, `ringlet` runs `serve`.

Examples:
  ringlet                                  serve the default model (fetched on first start)
  ringlet invite                           print the token that admits another machine
  ringlet --join TOKEN                     on that machine: join the cluster
  ringlet --join TOKEN --peer 10.0.0.7:52415
                                           join a node multicast does not reach
  ringlet --listen 127.0.0.1:52415         this machine only, no discovery
  ringlet run --prompt \"Why is the sky blue?\"
  ringlet pull smollm2-135m                fetch a model into the cache
  ringlet --model bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M
                                           serve a model from Hugging Face; each
                                           node fetches only its layers
  ringlet bench --threads 2                compare speed with llama.cpp

Hugging Face: HF_ENDPOINT (default https://huggingface.co), HF_TOKEN (or the
token file of `huggingface-cli login`) for gated and private repositories,
HF_HOME and HF_HUB_CACHE for the cache, as huggingface_hub reads them.

Security: the first node creates a cluster secret in its config directory
(~/.config/ringlet, or --config-dir); nodes link only after proving they
hold it, and every frame between them is encrypted. `ringlet invite`
prints the token that carries it to a new machine.";

#[derive(Debug, Parser)]
#[command(name = "ringlet", version, about = ABOUT, long_about = LONG_ABOUT, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub serve: ServeArgs,
}

impl Cli {
    /// The command to run, `serve` when none was named.
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Serve(self.serve))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the model and serve the OpenAI-compatible API (the default).
    Serve(ServeArgs),
    /// Answer one prompt in the terminal, streaming the text to stdout.
    Run(RunArgs),
    /// Fetch a model (catalogue or Hugging Face) into its cache and verify it.
    Pull(PullArgs),
    /// Print the token that admits a new machine to this node's cluster:
    /// start the new node with `ringlet --join TOKEN`.
    Invite(InviteArgs),
    /// List the models ringlet knows and which are in the cache.
    Models(ModelsArgs),
    /// Measure prefill, decode, time to first token and memory, side by
    /// side with llama.cpp on the same model file.
    Bench(BenchArgs),
}

impl Command {
    /// Compute threads this command asked for, if it has that flag.
    pub fn threads(&self) -> Option<usize> {
        match self {
            Command::Serve(a) => a.runtime.threads,
            Command::Run(a) => a.runtime.threads,
            // The ring benchmarks compute in the node processes they start.
            Command::Bench(a) => match a.mode {
                Some(
                    BenchMode::Ring(_)
                    | BenchMode::Chunks(_)
                    | BenchMode::Recovery(_)
                    | BenchMode::Policy(_)
                    | BenchMode::Cluster(_),
                ) => None,
                Some(BenchMode::Structured(ref s)) => Some(s.threads),
                None => Some(a.engine.threads),
            },
            Command::Pull(_) | Command::Models(_) | Command::Invite(_) => None,
        }
    }
}

/// Flags every command that runs a model shares.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// Compute threads for the model [default: every core]
    #[arg(long, env = "RINGLET_THREADS", value_parser = parse_threads)]
    pub threads: Option<usize>,

    #[command(flatten)]
    pub cache: CacheArgs,

    /// Compute device: cpu, cuda, cuda:N or metal (CUDA and Metal need a
    /// build with `--features cuda` or `--features metal`)
    #[arg(long, env = "RINGLET_DEVICE", default_value = "cpu")]
    pub device: String,

    /// Memory for the KV caches of requests in flight, e.g. 512MiB or 4GiB;
    /// requests wait for room beyond it. In a cluster it bounds this
    /// node's stage, which also keeps within what its memory budget leaves
    /// beside its weights, and the tightest stage bounds every node's
    /// requests [default: 2GiB]
    #[arg(long, env = "RINGLET_KV_CACHE", value_name = "SIZE", value_parser = parse_size)]
    pub kv_cache: Option<u64>,

    /// Prompt tokens read per step, 1 to 512. While a long prompt is read,
    /// streams already running wait about one chunk's time for each token:
    /// smaller chunks keep their pace, larger ones give the prompt its
    /// first token sooner. At 512, llama.cpp's micro-batch, outputs match
    /// llama.cpp's bit for bit for prompts of any length
    #[arg(long, env = "RINGLET_PREFILL_CHUNK", value_name = "TOKENS", default_value_t = crate::limits::PREFILL_CHUNK_TOKENS, value_parser = parse_prefill_chunk)]
    pub prefill_chunk: usize,
}

/// Where catalogue models live.
#[derive(Debug, Clone, Args)]
pub struct CacheArgs {
    /// Where catalogue models are cached [default: $RINGLET_HOME/models,
    /// else $XDG_CACHE_HOME/ringlet/models, else ~/.cache/ringlet/models]
    #[arg(long, env = "RINGLET_MODELS_DIR", value_name = "DIR")]
    pub models_dir: Option<PathBuf>,
}

impl CacheArgs {
    pub fn store(&self) -> ModelStore {
        ModelStore::new(
            self.models_dir
                .clone()
                .unwrap_or_else(ModelStore::default_dir),
        )
    }
}

/// [`RuntimeArgs`] with every default resolved and checked.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub threads: usize,
    pub store: ModelStore,
    pub device: Device,
    pub kv_cache_bytes: u64,
    /// Prompt tokens per step (`--prefill-chunk`).
    pub prefill_chunk_tokens: usize,
    /// The Hugging Face Hub and its cache, from the environment.
    pub hub: crate::hub::HubConfig,
}

impl RuntimeArgs {
    pub fn resolve(&self) -> anyhow::Result<RuntimeConfig> {
        Ok(RuntimeConfig {
            threads: self.threads.unwrap_or_else(default_threads),
            store: self.cache.store(),
            device: parse_device(&self.device)?,
            kv_cache_bytes: self.kv_cache.unwrap_or(DEFAULT_KV_CACHE_BYTES),
            prefill_chunk_tokens: self.prefill_chunk,
            hub: crate::hub::HubConfig::from_env(),
        })
    }
}

/// A size in bytes: `4096`, `40MiB`, `2GiB`, `1.5G` (binary), `40MB`
/// (decimal). Case does not matter.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let split = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(split);
    let scale: u64 = match unit.trim() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "`{text}` has an unknown unit; use bytes or KiB, MiB, GiB, TiB (or KB, MB, GB, TB)"
            ));
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size like 512MiB or 2GiB"))?;
    let bytes = value * scale as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("`{text}` is not a usable size"));
    }
    Ok(bytes as u64)
}

fn parse_threads(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=crate::limits::MAX_THREADS).contains(&n) => Ok(n),
        _ => Err(format!(
            "`{text}` is not a thread count from 1 to {}",
            crate::limits::MAX_THREADS
        )),
    }
}

fn parse_prefill_chunk(text: &str) -> Result<usize, String> {
    let most = crate::limits::PREFILL_CHUNK_TOKENS;
    match text.parse::<usize>() {
        Ok(n) if (1..=most).contains(&n) => Ok(n),
        _ => Err(format!(
            "`{text}` is not a chunk size from 1 to {most} tokens (a stage step holds one chunk beside the running streams' tokens)"
        )),
    }
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn parse_device(text: &str) -> anyhow::Result<Device> {
    let rebuild = |feature: &str| {
        format!(
            "this ringlet was built without {feature} support; rebuild with `cargo build --release --features {feature}` or use --device cpu"
        )
    };
    match text {
        "cpu" => Ok(Device::Cpu),
        "metal" if !cfg!(feature = "metal") => bail!(rebuild("metal")),
        "metal" => Device::new_metal(0).context("cannot open the Metal device"),
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => {
            let ordinal = match cuda.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().with_context(|| {
                    format!("`{cuda}`: the GPU number after `cuda:` must be an integer")
                })?,
                None => 0,
            };
            if !cfg!(feature = "cuda") {
                bail!(rebuild("cuda"));
            }
            Device::new_cuda(ordinal).with_context(|| format!("cannot open CUDA device {ordinal}"))
        }
        other => bail!("unknown device `{other}`: use cpu, cuda, cuda:N or metal"),
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Model to serve: a catalogue name (see `ringlet models`), the path of
    /// a GGUF file, or a Hugging Face repository ORG/REPO[:QUANT][@REVISION]
    /// (QUANT picks the file, e.g. Q4_K_M, the default, or Q8_0). A
    /// catalogue model missing from the cache is fetched; of a Hub model,
    /// each node fetches only the layers it holds
    #[arg(long, env = "RINGLET_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,

    /// Address for the HTTP API, which peers also link to; port 0 picks a
    /// free port. On 127.0.0.1 only this machine can reach the node, and
    /// discovery is off
    #[arg(
        long,
        env = "RINGLET_LISTEN",
        default_value = "0.0.0.0:52415",
        value_name = "HOST:PORT"
    )]
    pub listen: String,

    /// The cluster to join: nodes find each other on the local network
    /// (mDNS) and join only nodes with the same cluster name
    #[arg(
        long,
        env = "RINGLET_CLUSTER",
        default_value = "default",
        value_name = "NAME"
    )]
    pub cluster: String,

    /// Do not advertise this node or look for others on the local network;
    /// join only `--peer` nodes (and the nodes they know)
    #[arg(long, env = "RINGLET_NO_MDNS")]
    pub no_mdns: bool,

    /// Another node to join, as HOST:PORT (its API address); repeat for
    /// more. Nodes a peer knows are joined too. Needed only where multicast
    /// does not reach (another subnet, a VPN) or with --no-mdns.
    #[arg(
        long = "peer",
        env = "RINGLET_PEERS",
        value_delimiter = ',',
        value_name = "HOST:PORT"
    )]
    pub peers: Vec<String>,

    /// How this node links to peers: `auto` dials TCP and, when a dial
    /// fails or times out (the peer is behind a NAT), opens a WebRTC data
    /// channel through the NAT instead, signaled through a node both are
    /// linked to; `tcp` never uses WebRTC; `webrtc` uses it for every node
    /// learned of through a peer (`--peer` addresses still use TCP)
    #[arg(long = "link", env = "RINGLET_LINK", value_enum, default_value_t = crate::cluster::LinkMode::Auto)]
    pub link: crate::cluster::LinkMode,

    /// A STUN server for WebRTC links, as stun:HOST:PORT; repeat for more.
    /// It tells a node behind a NAT its public address. Shared with the
    /// cluster: nodes started without one use their peers'
    #[arg(
        long = "stun",
        env = "RINGLET_STUN",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub stun: Vec<String>,

    /// A TURN server for WebRTC links, as turn:HOST:PORT (UDP). Nodes that
    /// cannot reach each other directly (a symmetric NAT, a firewall that
    /// blocks UDP between them) link through it. Needs --turn-user and
    /// --turn-credential. Shared with the cluster like --stun
    #[arg(
        long = "turn",
        env = "RINGLET_TURN",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub turn: Vec<String>,

    /// The user name for --turn
    #[arg(long, env = "RINGLET_TURN_USER", value_name = "USER")]
    pub turn_user: Option<String>,

    /// The credential (password) for --turn. Prefer the environment
    /// variable: other users can read a command line
    #[arg(
        long,
        env = "RINGLET_TURN_CREDENTIAL",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub turn_credential: Option<String>,

    /// This node's name in logs and the dashboard [default: the host name]
    #[arg(long, env = "RINGLET_NAME")]
    pub name: Option<String>,

    /// Memory the planner may fill with this node's share of the model,
    /// e.g. 40MiB or 12GiB [default: available memory less 1 GiB]
    #[arg(long, env = "RINGLET_MEMORY_BUDGET", value_name = "SIZE", value_parser = parse_size)]
    pub memory_budget: Option<u64>,

    /// A key API clients must send as `Authorization: Bearer KEY` (the
    /// openai client's api_key) for /v1; repeat for more. Without one, a
    /// node listening on the network answers API requests from its own
    /// machine only (see --open-api). Prefer the environment variable
    /// (comma-separated) or --api-key-file: other users can read a
    /// command line
    #[arg(
        long = "api-key",
        env = "RINGLET_API_KEY",
        value_delimiter = ',',
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// A file of API keys, one per line (blank lines and lines starting
    /// with # are skipped)
    #[arg(long, env = "RINGLET_API_KEY_FILE", value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,

    /// Let every address that reaches this node use its API without a key
    /// (for a network where everyone is trusted)
    #[arg(long, env = "RINGLET_OPEN_API")]
    pub open_api: bool,

    /// Join the cluster this token admits to (from `ringlet invite` on a
    /// member); it is stored in the config directory, so later starts
    /// need no token. Prefer the environment variable: other users can
    /// read a command line
    #[arg(
        long,
        env = "RINGLET_JOIN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub join: Option<String>,

    /// Where this node keeps its key and its cluster's secret (mode 0600)
    /// [default: $XDG_CONFIG_HOME/ringlet, else ~/.config/ringlet]. Each
    /// node on one machine needs its own
    #[arg(long, env = "RINGLET_CONFIG_DIR", value_name = "DIR")]
    pub config_dir: Option<PathBuf>,

    /// Seconds a request waits for the cluster when it cannot run now: a
    /// request that arrives while no plan is active, and one interrupted
    /// mid-answer by a lost node when the nodes left cannot hold the
    /// model (a laptop that closed its lid may come back). A plan that is
    /// loading when the time runs out is waited for. Then the request
    /// fails with an error naming the lost node
    #[arg(
        long,
        env = "RINGLET_RECOVERY_WAIT",
        value_name = "SECONDS",
        default_value_t = crate::limits::DEFAULT_RECOVERY_WAIT_SECS,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub recovery_wait: u64,

    /// Send frames between nodes unencrypted after the handshake (which
    /// still proves the cluster's key). For measuring what encryption
    /// costs; every node of the cluster must be started with it
    #[arg(long, hide = true)]
    pub insecure_plaintext_links: bool,

    /// Secret that `PUT` and `DELETE /v1/cluster/policy` must send as
    /// `Authorization: Bearer <TOKEN>` to change the scheduling policy.
    /// Without one, policy changes are refused on this node. Prefer the
    /// environment variable: other users can read a command line.
    #[arg(
        long,
        env = "RINGLET_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

impl ServeArgs {
    /// The node's name: `--name`, else the host name.
    pub fn node_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "ringlet".into())
        })
    }

    /// `--peer` addresses, checked to be HOST:PORT.
    pub fn peer_addrs(&self) -> anyhow::Result<Vec<String>> {
        self.peers
            .iter()
            .map(|p| {
                let p = p.trim();
                let valid = p
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
                if valid {
                    Ok(p.to_string())
                } else {
                    bail!("--peer `{p}` is not HOST:PORT, like 192.168.1.20:52415")
                }
            })
            .collect()
    }

    pub fn listen_addr(&self) -> anyhow::Result<SocketAddr> {
        self.listen.parse().with_context(|| {
            format!(
                "--listen `{}` is not HOST:PORT with an IP address, like 127.0.0.1:52415",
                self.listen
            )
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Model: a catalogue name, the path of a GGUF file, or a Hugging Face
    /// repository ORG/REPO[:QUANT][@REVISION]
    #[arg(default_value = DEFAULT_MODEL)]
    pub model: String,

    /// The user's message; `-` reads it from standard input
    #[arg(long, short)]
    pub prompt: String,

    /// A system message to put before the prompt
    #[arg(long)]
    pub system: Option<String>,

    /// Most tokens to generate
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,

    /// Sampling temperature; 0 is greedy and always gives the same answer
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,

    /// Nucleus sampling: keep the most likely tokens up to this probability mass
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,

    /// Keep only the K most likely tokens
    #[arg(long)]
    pub top_k: Option<usize>,

    /// Random seed; the same seed and prompt give the same answer
    #[arg(long)]
    pub seed: Option<u64>,

    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Clone, Args)]
pub struct PullArgs {
    /// Model to fetch: a catalogue name, or a Hugging Face repository
    /// ORG/REPO[:QUANT][@REVISION], whose GGUF file goes into the Hugging
    /// Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
    /// ~/.cache/huggingface/hub), shared with huggingface_hub and llama.cpp
    #[arg(default_value = DEFAULT_MODEL)]
    pub model: String,

    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Debug, Clone, Args)]
pub struct InviteArgs {
    /// The node's config directory [default: $XDG_CONFIG_HOME/ringlet,
    /// else ~/.config/ringlet]; a cluster secret is created there if it
    /// has none
    #[arg(long, env = "RINGLET_CONFIG_DIR", value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct ModelsArgs {
    #[command(flatten)]
    pub cache: CacheArgs,
}

/// `ringlet bench` (the engine against llama.cpp) or `ringlet bench ring`.
#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub mode: Option<BenchMode>,

    #[command(flatten)]
    pub engine: EngineBenchArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum BenchMode {
    /// Decode speed and time to first token of 1-, 2- and 3-node rings of
    /// real node processes on loopback, and the aggregate speed of
    /// concurrent streams on the largest ring.
    Ring(RingBenchArgs),
    /// How the prompt chunk size (`--prefill-chunk`) trades a long
    /// prompt's time to first token against the pace of the streams
    /// already running: one node per chunk size, real processes.
    Chunks(ChunkBenchArgs),
    /// How long an answer pauses when a node of a ring of real processes
    /// is killed while it streams: detection, re-plan, layer load and
    /// replay, against restarting the cluster by hand.
    Recovery(RecoveryBenchArgs),
    /// What the scheduling policy costs: compile time, and the latency of
    /// `place` and `schedule` calls as the node makes them.
    Policy(PolicyBenchArgs),
    /// Decode speed, time to first token and each link's transport,
    /// handshake time, RTT and measured throughput, of a cluster that is
    /// already running, through one of its nodes' API.
    Cluster(ClusterBenchArgs),
    /// The cost of constrained decoding on one node: decode speed with a
    /// JSON schema against without, the time to compile schemas, and how
    /// many of a run of forced tool calls are well formed.
    Structured(StructuredBenchArgs),
}

#[derive(Debug, Clone, Args)]
pub struct StructuredBenchArgs {
    /// Model: a catalogue name or the path of a GGUF file
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,

    /// Compute threads
    #[arg(long, default_value_t = 2, value_parser = parse_threads)]
    pub threads: usize,

    /// Tokens to generate per decode measurement
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,

    /// Rounds of each decode measurement; the report shows medians
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,

    /// Forced tool calls to make (at temperature 1, one seed each)
    #[arg(long, default_value_t = 50)]
    pub calls: usize,

    /// Also write the results as JSON to this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ClusterBenchArgs {
    /// The API address of a node of the cluster (its API must be open:
    /// `--open-api`)
    #[arg(long, value_name = "HOST:PORT")]
    pub node: SocketAddr,

    /// Tokens to generate per request
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,

    /// Rounds of the decode measurement; the report shows medians
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,

    /// First time one prompt of about this many tokens, then read the
    /// activation throughput the links measured (0: skip)
    #[arg(long, default_value_t = 2048, value_name = "TOKENS")]
    pub prefill_tokens: usize,

    /// Also write the results as JSON to this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct PolicyBenchArgs {
    /// A policy component (.wasm) to measure [default: the built-in one]
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,

    /// Cluster sizes to place a 80-layer model on, e.g. 3,16,64
    #[arg(long, value_delimiter = ',', default_value = "3,16,64")]
    pub nodes: Vec<usize>,

    /// Waiting requests in each `schedule` call
    #[arg(long, default_value_t = 64)]
    pub queue: usize,

    /// Calls of each kind
    #[arg(long, default_value_t = 500)]
    pub calls: usize,

    /// Also write the results as JSON to this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct RecoveryBenchArgs {
    /// Model: a catalogue name or the path of a GGUF file
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,

    /// Compute threads of each node
    #[arg(long, default_value_t = 1, value_parser = parse_threads)]
    pub threads: usize,

    /// Nodes in the ring (the first owns the request and is never killed)
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,

    /// Kills, each of another node in turn, each followed by its restart
    #[arg(long, default_value_t = 4)]
    pub kills: usize,

    /// Tokens the client has when a node is killed
    #[arg(long, default_value_t = 16)]
    pub kill_after: usize,

    /// Tokens to generate per request
    #[arg(long, default_value_t = 48)]
    pub decode_tokens: usize,

    /// Each node's --memory-budget (the nodes left after a kill must hold
    /// the model)
    #[arg(long, value_name = "BYTES")]
    pub memory_budget: Option<String>,

    /// Also write the results as JSON to this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ChunkBenchArgs {
    /// Model: a catalogue name or the path of a GGUF file
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,

    /// Compute threads of each node
    #[arg(long, default_value_t = 2, value_parser = parse_threads)]
    pub threads: usize,

    /// Chunk sizes to compare, in tokens (1 to 512), e.g. 64,128,256,512
    #[arg(long, value_delimiter = ',', default_value = "64,128,256,512")]
    pub chunks: Vec<usize>,

    /// Greedy answers running when the long prompt arrives
    #[arg(long, default_value_t = 4)]
    pub streams: usize,

    /// Tokens each running answer generates (enough to outlast the
    /// prompt)
    #[arg(long, default_value_t = 256)]
    pub decode_tokens: usize,

    /// Length of the prompt that arrives, in tokens
    #[arg(long, default_value_t = 2048)]
    pub prompt_tokens: usize,

    /// Rounds on each node, alternated; the table shows medians
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,

    /// Also write the results as JSON to this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Debug, Clone, Args)]
pub struct RingBenchArgs {
    /// Model: a catalogue name or the path of a GGUF file
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,

    /// Compute threads of each node
    #[arg(long, default_value_t = 2, value_parser = parse_threads)]
    pub threads: usize,

    /// Ring sizes to compare, e.g. 1,2,3
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub nodes: Vec<usize>,

    /// Concurrent streams to run on the largest ring, e.g. 1,2,4
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub streams: Vec<usize>,

    /// Tokens to generate per request
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,

    /// Rounds of each measurement, alternated; the table shows medians
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,

    /// Also run the largest ring with WebRTC data channels between its
    /// nodes (on loopback; a relay node that holds no layers signals)
    #[arg(long)]
    pub webrtc: bool,

    /// Also time one prompt of about this many tokens on each ring and
    /// show the activation throughput its links measured (0: skip)
    #[arg(long, default_value_t = 0, value_name = "TOKENS")]
    pub prefill_tokens: usize,

    /// Python with llama-cpp-python installed, for llama.cpp's batched
    /// decoding of as many sequences beside each concurrency round, or
    /// `off`
    #[arg(long, default_value = "python3", value_name = "PYTHON|off")]
    pub llama_cpp: String,

    /// Also write the results as JSON to this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Debug, Clone, Args)]
pub struct EngineBenchArgs {
    /// Model: a catalogue name or the path of a GGUF file
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,

    /// Compute threads, for ringlet and llama.cpp alike
    #[arg(long, default_value_t = 2, value_parser = parse_threads)]
    pub threads: usize,

    /// Prompt length in tokens
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,

    /// Tokens decoded after the first one
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,

    /// Rounds of each engine, alternated; the table shows medians
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,

    /// Python with llama-cpp-python installed, or `off` to measure ringlet alone
    #[arg(long, default_value = "python3", value_name = "PYTHON|off")]
    pub llama_cpp: String,

    /// Also show where ringlet's time goes, per kind of op, for prefill and
    /// for each decoded token
    #[arg(long)]
    pub profile: bool,

    /// Also write the results as JSON to this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    #[command(flatten)]
    pub cache: CacheArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_subcommand_means_serve_with_defaults() {
        let cli = Cli::try_parse_from(["ringlet"]).expect("parse");
        match cli.into_command() {
            Command::Serve(args) => {
                assert_eq!(args.model, DEFAULT_MODEL);
                assert_eq!(args.listen_addr().expect("addr").port(), 52415);
            }
            other => panic!("expected serve, got {other:?}"),
        }
    }

    #[test]
    fn sizes() {
        let cases: &[(&str, Option<u64>)] = &[
            ("4096", Some(4096)),
            ("40MiB", Some(40 << 20)),
            ("40mib", Some(40 << 20)),
            ("2GiB", Some(2 << 30)),
            ("1.5G", Some(3 << 29)),
            ("40MB", Some(40_000_000)),
            (" 512 K ", Some(512 << 10)),
            ("", None),
            ("MiB", None),
            ("12 parsecs", None),
            ("-3GiB", None),
            ("0", None),
            ("1e400", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_size(text).ok(), *expected, "{text:?}");
        }
    }

    #[test]
    fn bad_values_are_explained() {
        let args = ServeArgs {
            listen: "localhost".into(),
            ..ServeArgs::parse_from_defaults()
        };
        let err = args.listen_addr().expect_err("no port").to_string();
        assert!(err.contains("HOST:PORT"), "{err}");
        assert!(parse_device("tpu").is_err());
        assert!(parse_device("cuda:x").is_err());
        assert!(Cli::try_parse_from(["ringlet", "--threads", "0"]).is_err());
    }

    impl ServeArgs {
        fn parse_from_defaults() -> Self {
            match Cli::try_parse_from(["ringlet"])
                .expect("parse")
                .into_command()
            {
                Command::Serve(args) => args,
                _ => unreachable!(),
            }
        }
    }
}
