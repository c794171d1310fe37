//! The cluster actor: the single owner of membership, plans and routing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kernels::{Device, LayerRange, ModelFile, SequenceId, ShardInput, Tensor};
use scheduler::NodeId;
use tokio::sync::{mpsc, oneshot, watch};

use super::discovery::{Discovery, PeerAdvert, Verdict};
use super::link::{self, LinkContext, LinkId, LinkSender};
use super::protocol::{
    Epoch, ForwardFrame, Frame, Hello, LinkMeasurement, ModelAvailability, ModelIdentity,
    ModelState, NodeStatus, PROTOCOL_VERSION, Payload, PeerAddress, PlanMessage, PlanStage,
    PolicyMessage, PolicyRevision, RequestId, Resources, WireDType, WireSample,
};
use super::resources::{process_memory, system_memory};
use super::{
    ClusterConfig, ClusterEvent, ClusterView, LinkView, NodeView, NotJoinedView, PlanState,
    PlanView, PolicyStatus, StageView, view_id, view_layers,
};
use crate::engine::PipelineEnds;
use crate::engine::stage::{self, Route, Sample, StageJob, StageOutput, StageResult};
use crate::limits::{
    MAX_ACTIVE_SEQUENCES, MAX_NODES, NODE_STATUS_INTERVAL_MS, PLAN_SETTLE_MS, REDIAL_INTERVAL_MS,
    REPLAN_DEFER_MAX_MS, REPLAN_RECHECK_MS, STAGE_REQUEST_LIMIT,
};
use crate::limits::{MAX_POLICY_BYTES, POLICY_CHUNK_BYTES, POLICY_RETRY_MS};
use crate::model_store::{
    CATALOGUE, CatalogueEntry, Download, Downloads, ModelStore, catalogue_entry,
};
use crate::policy::{
    self, Change, Fault, Faults, Placed, PolicyError, PolicyHandle, PolicyView, StageLoad,
};

/// A node we are linked to.
struct Member {
    hello: Hello,
    /// HOST:PORT where its API and link port is reached.
    address: String,
    link: LinkSender,
    rtt_micros: Option<u64>,
    /// Bytes per second received from it, smoothed over large frames.
    bandwidth: Option<u64>,
    /// Its last report of its links and its stage's load.
    status: Option<NodeStatus>,
}

/// The plan being loaded or in use.
struct CurrentPlan {
    message: PlanMessage,
    /// Weight bytes each stage's node reported after loading.
    ready: HashMap<NodeId, u64>,
    active: bool,
}

impl CurrentPlan {
    fn stage_of(&self, node: NodeId) -> Option<(usize, LayerRange)> {
        self.message
            .stages
            .iter()
            .enumerate()
            .find(|(_, s)| s.node == node)
            .map(|(i, s)| (i, s.layers))
    }
}

/// An uploaded policy on its way from a peer.
struct IncomingPolicy {
    from: NodeId,
    message: PolicyMessage,
    size: usize,
    data: Vec<u8>,
}

/// This machine's available memory and models: read once per status
/// interval rather than at every publish, which follows every token.
#[derive(Default)]
struct LocalFigures {
    memory_available_bytes: u64,
    models: Vec<ModelAvailability>,
}

/// This node's stage: a thread running its shard.
struct LocalStage {
    epoch: Epoch,
    index: usize,
    jobs: mpsc::Sender<StageJob>,
    weight_bytes: u64,
}

pub(super) struct Cluster {
    me: NodeId,
    name: String,
    /// The cluster name: peers with another one are not joined.
    cluster: String,
    /// The mDNS advertisement and browser, withdrawn when the actor ends.
    _discovery: Option<Discovery>,
    /// Advertisements mDNS resolved, by service name.
    discovered: BTreeMap<String, (PeerAdvert, Verdict)>,
    /// `--peer` addresses, which are dialed for as long as the node runs.
    configured_peers: HashSet<String>,
    listen: SocketAddr,
    resources: Resources,
    identity: ModelIdentity,
    model: Arc<ModelFile>,
    /// The model as the policy sees it.
    policy_model: policy::Model,
    model_store: ModelStore,
    downloads: Downloads,
    local: LocalFigures,
    device: Device,
    members: BTreeMap<NodeId, Member>,
    /// Addresses to stay linked to: `--peer` ones and those peers told us.
    known_addresses: HashSet<String>,
    dialing: HashSet<String>,
    plan: Option<CurrentPlan>,
    highest_epoch: Epoch,
    plan_error: Option<String>,
    /// When the leader should (re)plan, after membership settles.
    replan_at: Option<Instant>,
    /// Since when a wanted re-plan waits for running requests to finish.
    replan_waiting_since: Option<Instant>,
    local_stage: Option<LocalStage>,
    /// This node's layers for the current plan are loaded (with these
    /// weight bytes) but a link to some stage node is still missing.
    ready_pending: Option<(Epoch, u64)>,
    /// Requests owned here that are in flight, to fail them if a stage dies.
    owned: HashSet<SequenceId>,
    /// Sequences on this node's stage and their owners, to release them if
    /// the owner dies.
    hosted: HashMap<SequenceId, NodeId>,
    jobs: mpsc::Receiver<StageJob>,
    results: mpsc::Sender<StageResult>,
    events_tx: mpsc::Sender<ClusterEvent>,
    events: mpsc::Receiver<ClusterEvent>,
    view: watch::Sender<ClusterView>,
    policy: PolicyHandle,
    /// The policy change in force here, and the highest one seen or made.
    policy_revision: PolicyRevision,
    highest_policy_revision: PolicyRevision,
    /// The uploaded component in force, for new peers (`None`: built-in).
    policy_wasm: Option<Bytes>,
    /// A component arriving from a peer in chunks.
    incoming_policy: Option<IncomingPolicy>,
    policy_faults: Faults,
    policy_status: PolicyStatus,
    /// Numbers placements; an answer for an older one is dropped.
    placement: u64,
    stage_loads: watch::Sender<Vec<StageLoad>>,
    /// The stage load last reported to peers.
    reported_in_flight: Option<u32>,
}

impl Cluster {
    pub(super) fn new(
        config: ClusterConfig,
        model: Arc<ModelFile>,
        pipeline: PipelineEnds,
        events_tx: mpsc::Sender<ClusterEvent>,
        events: mpsc::Receiver<ClusterEvent>,
        view: watch::Sender<ClusterView>,
        discovery: Option<Discovery>,
    ) -> Self {
        let policy_model = policy_model(&model);
        let identity = ModelIdentity {
            name: config.model_name,
            fingerprint: model.fingerprint().to_string(),
        };
        Self {
            me: config.me,
            name: config.name,
            cluster: config.cluster,
            _discovery: discovery,
            discovered: BTreeMap::new(),
            configured_peers: config.peers.iter().cloned().collect(),
            listen: config.listen,
            resources: config.resources,
            identity,
            model,
            policy_model,
            model_store: config.model_store,
            downloads: config.downloads,
            local: LocalFigures::default(),
            device: config.device,
            members: BTreeMap::new(),
            known_addresses: config.peers.into_iter().collect(),
            dialing: HashSet::new(),
            plan: None,
            highest_epoch: Epoch(0),
            plan_error: None,
            replan_at: Some(Instant::now()),
            replan_waiting_since: None,
            local_stage: None,
            ready_pending: None,
            owned: HashSet::new(),
            hosted: HashMap::new(),
            jobs: pipeline.jobs,
            results: pipeline.results,
            events_tx,
            events,
            view,
            policy_status: PolicyStatus {
                policy: config.policy.built_in().clone(),
                revision: 0,
                changed_by: None,
                warning: None,
            },
            policy: config.policy,
            policy_revision: PolicyRevision::default(),
            highest_policy_revision: PolicyRevision::default(),
            policy_wasm: None,
            incoming_policy: None,
            policy_faults: config.policy_faults,
            placement: 0,
            stage_loads: config.stage_loads,
            reported_in_flight: None,
        }
    }

    pub(super) async fn run(mut self) {
        self.refresh_local();
        self.redial();
        self.publish();
        let mut redial = tokio::time::interval(Duration::from_millis(REDIAL_INTERVAL_MS));
        let mut status = tokio::time::interval(Duration::from_millis(NODE_STATUS_INTERVAL_MS));
        loop {
            let replan = self.replan_at;
            tokio::select! {
                event = self.events.recv() => match event {
                    Some(event) => self.on_event(event),
                    None => break,
                },
                job = self.jobs.recv() => match job {
                    Some(job) => self.on_coordinator_job(job),
                    None => break, // the coordinator stopped: the node is stopping
                },
                () = sleep_until(replan) => {
                    self.replan_at = None;
                    self.plan_if_leader();
                }
                _ = redial.tick() => self.redial(),
                _ = status.tick() => {
                    self.refresh_local();
                    self.send_status();
                }
                Some(fault) = self.policy_faults.recv() => self.on_policy_fault(fault),
            }
            self.track_load();
            self.publish();
        }
        for member in self.members.values() {
            member.link.send(Frame::Bye {
                reason: "the node is stopping".into(),
            });
        }
    }

    fn on_event(&mut self, event: ClusterEvent) {
        match event {
            ClusterEvent::LinkUp {
                hello,
                sender,
                accepted,
            } => {
                let keep = self.link_up(*hello, sender);
                let _ = accepted.send(keep);
            }
            ClusterEvent::LinkDown { node, link, reason } => self.link_down(node, link, &reason),
            ClusterEvent::LinkRtt { node, rtt_micros } => {
                if let Some(member) = self.members.get_mut(&node) {
                    member.rtt_micros = Some(rtt_micros);
                }
            }
            ClusterEvent::LinkBandwidth {
                node,
                bytes_per_second,
            } => {
                if let Some(member) = self.members.get_mut(&node) {
                    // Smoothed: one slow frame (a busy moment) does not
                    // halve the estimate.
                    member.bandwidth = Some(match member.bandwidth {
                        Some(old) => (old * 3 + bytes_per_second) / 4,
                        None => bytes_per_second,
                    });
                }
            }
            ClusterEvent::Placed { generation, placed } => self.on_placed(generation, placed),
            ClusterEvent::SetPolicy { wasm, reply } => self.set_policy(wasm, reply),
            ClusterEvent::Discovered {
                fullname,
                peer,
                verdict,
            } => self.discovered(fullname, peer, verdict),
            ClusterEvent::Withdrawn { fullname } => self.withdrawn(&fullname),
            ClusterEvent::FetchModel { entry, reply } => {
                let _ = reply.send(self.fetch_model(entry));
            }
            ClusterEvent::PolicyInstalled {
                revision,
                wasm,
                result,
                reply,
                warning,
            } => self.policy_installed(revision, wasm, result, warning, reply),
            ClusterEvent::Frame { from, frame } => self.on_frame(from, frame),
            ClusterEvent::FromStage(output) => self.on_stage_output(output),
            ClusterEvent::ShardLoaded { epoch, result } => self.shard_loaded(epoch, result),
            ClusterEvent::DialEnded { address } => {
                self.dialing.remove(&address);
            }
            ClusterEvent::Accept { stream, remote } => {
                self.spawn_link(stream, remote.to_string(), false)
            }
        }
    }

    // -----------------------------------------------------------------------
    // Membership
    // -----------------------------------------------------------------------

    fn hello(&self) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            node: self.me,
            name: self.name.clone(),
            cluster: self.cluster.clone(),
            address: self.listen.to_string(),
            resources: self.resources.clone(),
            model: self.identity.clone(),
            peers: self
                .members
                .iter()
                .map(|(id, m)| PeerAddress {
                    node: *id,
                    address: m.address.clone(),
                })
                .collect(),
        }
    }

    /// Links to every known address not linked yet.
    fn redial(&mut self) {
        let linked: HashSet<&String> = self.members.values().map(|m| &m.address).collect();
        let own = self.listen.to_string();
        let to_dial: Vec<String> = self
            .known_addresses
            .iter()
            .filter(|a| !linked.contains(a) && !self.dialing.contains(*a) && **a != own)
            .cloned()
            .collect();
        for address in to_dial {
            self.dialing.insert(address.clone());
            let hello = self.hello();
            let events = self.events_tx.clone();
            let me = self.me;
            tokio::spawn(async move {
                match link::dial(&address).await {
                    Ok(stream) => {
                        let context = LinkContext {
                            me,
                            events: events.clone(),
                            observed_address: address.clone(),
                        };
                        let _ = events.send(ClusterEvent::DialEnded { address }).await;
                        link::run(stream, hello, true, context).await;
                    }
                    Err(error) => {
                        tracing::debug!(%error, "dial failed; will retry");
                        let _ = events.send(ClusterEvent::DialEnded { address }).await;
                    }
                }
            });
        }
    }

    fn spawn_link(&self, stream: link::AcceptedStream, observed_address: String, dialed: bool) {
        let hello = self.hello();
        let context = LinkContext {
            me: self.me,
            events: self.events_tx.clone(),
            observed_address,
        };
        tokio::spawn(link::run(stream, hello, dialed, context));
    }

    /// Registers a new link; false to close it (a duplicate, or too many).
    fn link_up(&mut self, hello: Hello, link: LinkSender) -> bool {
        let peer = hello.node;
        let address = advertised_address(&hello.address, &link.observed_address);
        if peer == self.me {
            // This node's own address, reached through another interface.
            self.known_addresses.remove(&link.observed_address);
            return false;
        }
        if hello.cluster != self.cluster {
            tracing::warn!(
                node = %peer,
                "not joining peer {} at {address}: it is in cluster `{}`, this node in `{}`; start both with the same --cluster",
                hello.name,
                hello.cluster,
                self.cluster
            );
            // Dialing it again would be refused again.
            self.known_addresses.remove(&address);
            self.known_addresses.remove(&link.observed_address);
            return false;
        }
        if let Some(existing) = self.members.get(&peer) {
            // Two links to one peer (both dialed at once): both sides keep
            // the one the smaller node id dialed.
            let smaller_dialed =
                |dialed: bool| (dialed && self.me < peer) || (!dialed && peer < self.me);
            if !smaller_dialed(link.dialed) || smaller_dialed(existing.link.dialed) {
                return false;
            }
            existing.link.close();
        } else if self.members.len() + 1 >= MAX_NODES {
            tracing::warn!(peer = %hello.name, "refusing a peer: the cluster has {MAX_NODES} nodes");
            return false;
        }
        for peer in &hello.peers {
            if peer.node != self.me && !self.members.contains_key(&peer.node) {
                self.known_addresses.insert(peer.address.clone());
            }
        }
        self.known_addresses.insert(address.clone());
        if hello.model.fingerprint != self.identity.fingerprint {
            tracing::warn!(
                peer = %hello.name,
                their_model = %hello.model.name,
                their_fingerprint = %hello.model.fingerprint,
                our_fingerprint = %self.identity.fingerprint,
                "peer has a different model file; it will not be given layers"
            );
        } else {
            tracing::info!(node = %peer, "peer {} joined from {address}", hello.name);
        }
        // A newcomer learns the cluster's policy (if it has a newer one,
        // it sends it here the same way and it wins).
        if self.policy_revision != PolicyRevision::default() {
            self.send_policy(&link);
        }
        link.send(Frame::NodeStatus(self.node_status()));
        self.members.insert(
            peer,
            Member {
                hello,
                address,
                link,
                rtt_micros: None,
                bandwidth: None,
                status: None,
            },
        );
        self.membership_changed();
        true
    }

    fn link_down(&mut self, node: NodeId, link: LinkId, reason: &str) {
        if self.members.get(&node).is_none_or(|m| m.link.id != link) {
            return; // a replaced duplicate link closing
        }
        let Some(member) = self.members.remove(&node) else {
            return;
        };
        tracing::info!(node = %node, address = %member.address, %reason, "peer {} left", member.hello.name);
        if self
            .incoming_policy
            .as_ref()
            .is_some_and(|i| i.from == node)
        {
            self.incoming_policy = None;
        }
        // Requests owned here cannot finish if the peer held a stage.
        let in_plan = self
            .plan
            .as_ref()
            .is_some_and(|p| p.stage_of(node).is_some());
        if in_plan {
            let message = format!(
                "node {} ({node}) left the cluster: {reason}",
                member.hello.name
            );
            for sequence in self.owned.drain().collect::<Vec<_>>() {
                let _ = self.results.try_send(StageResult::Failed {
                    sequence,
                    message: message.clone(),
                });
            }
            if let Some(plan) = &mut self.plan {
                plan.active = false;
            }
            self.plan_error = Some(format!("{message}; re-planning"));
        }
        // Sequences it owned on our stage will never be released by it.
        let orphans: Vec<SequenceId> = self
            .hosted
            .iter()
            .filter(|(_, o)| **o == node)
            .map(|(s, _)| *s)
            .collect();
        for sequence in orphans {
            self.release_local(sequence);
        }
        self.membership_changed();
    }

    /// mDNS found a node: dial it if it may be joined, list it if not.
    fn discovered(&mut self, fullname: String, peer: PeerAdvert, verdict: Verdict) {
        if verdict == Verdict::Join && !self.members.contains_key(&peer.node) {
            for address in &peer.addresses {
                self.known_addresses.insert(address.to_string());
            }
            self.redial();
        }
        self.discovered.insert(fullname, (peer, verdict));
    }

    /// A node withdrew its advertisement: stop dialing its addresses
    /// (unless they are `--peer` ones); its links end by themselves.
    fn withdrawn(&mut self, fullname: &str) {
        let Some((peer, _)) = self.discovered.remove(fullname) else {
            return;
        };
        let linked: HashSet<&String> = self.members.values().map(|m| &m.address).collect();
        for address in peer.addresses.iter().map(ToString::to_string) {
            if !self.configured_peers.contains(&address) && !linked.contains(&address) {
                self.known_addresses.remove(&address);
            }
        }
    }

    fn membership_changed(&mut self) {
        self.replan_at = Some(Instant::now() + Duration::from_millis(PLAN_SETTLE_MS));
        self.placement += 1; // a placement under way is for the old members
    }

    /// Nodes serving the same model file, this one included, by id.
    fn compatible(&self) -> Vec<policy::Node> {
        let mut nodes = vec![policy::Node {
            id: self.me.0,
            name: self.name.clone(),
            device: self.resources.device.clone(),
            memory_budget_bytes: self.resources.memory_budget_bytes,
            compute_score: self.resources.compute_score,
        }];
        nodes.extend(
            self.members
                .values()
                .filter(|m| m.hello.model.fingerprint == self.identity.fingerprint)
                .map(|m| policy::Node {
                    id: m.hello.node.0,
                    name: m.hello.name.clone(),
                    device: m.hello.resources.device.clone(),
                    memory_budget_bytes: m.hello.resources.memory_budget_bytes,
                    compute_score: m.hello.resources.compute_score,
                }),
        );
        nodes.sort_by_key(|n| n.id);
        nodes
    }

    fn leader(&self) -> NodeId {
        self.compatible().first().map_or(self.me, |n| NodeId(n.id))
    }

    /// What this node measured of its links.
    fn measurements(&self) -> Vec<LinkMeasurement> {
        self.members
            .iter()
            .filter_map(|(id, m)| {
                Some(LinkMeasurement {
                    to: *id,
                    rtt_micros: m.rtt_micros?,
                    bandwidth_bytes_per_second: m.bandwidth.unwrap_or(0),
                })
            })
            .collect()
    }

    /// The cluster as the policy sees it: the compatible nodes, and every
    /// link between two of them that one end has measured.
    fn policy_cluster(&self) -> policy::Cluster {
        let nodes = self.compatible();
        let known: HashSet<u64> = nodes.iter().map(|n| n.id).collect();
        let link = |from: NodeId, m: &LinkMeasurement| policy::Link {
            from: from.0,
            to: m.to.0,
            latency_micros: m.rtt_micros,
            bandwidth_bytes_per_second: m.bandwidth_bytes_per_second,
        };
        let mut links: Vec<policy::Link> = self
            .measurements()
            .iter()
            .map(|m| link(self.me, m))
            .collect();
        for (id, member) in &self.members {
            if let Some(status) = &member.status {
                links.extend(status.links.iter().map(|m| link(*id, m)));
            }
        }
        links.retain(|l| known.contains(&l.from) && known.contains(&l.to));
        policy::Cluster { nodes, links }
    }

    /// Requests going through this node's stage now.
    fn in_flight(&self) -> u32 {
        u32::try_from(self.hosted.len()).unwrap_or(u32::MAX)
    }

    fn node_status(&self) -> NodeStatus {
        NodeStatus {
            in_flight: self.in_flight(),
            links: self.measurements(),
            memory_available_bytes: self.local.memory_available_bytes,
            rss_bytes: process_memory().0,
            models: self.local.models.clone(),
        }
    }

    fn refresh_local(&mut self) {
        self.local = LocalFigures {
            memory_available_bytes: self.memory_available(),
            models: self.model_availability(),
        };
    }

    /// Available memory now (as at the start where it cannot be read).
    fn memory_available(&self) -> u64 {
        system_memory().map_or(self.resources.memory_available_bytes, |(_, available)| {
            available
        })
    }

    /// Which catalogue models are in this node's cache or on their way,
    /// and the one it serves (which may be a file outside the catalogue).
    fn model_availability(&self) -> Vec<ModelAvailability> {
        let serving = &self.identity.name;
        let mut models: Vec<ModelAvailability> = CATALOGUE
            .iter()
            .map(|entry| {
                let download = self.downloads.state(entry.name);
                if entry.name == serving {
                    ModelAvailability::new(entry.name, ModelState::Loaded)
                } else if let Some(Download::Running {
                    done_bytes,
                    total_bytes,
                }) = download
                {
                    ModelAvailability {
                        downloaded_bytes: Some(done_bytes),
                        total_bytes: Some(total_bytes),
                        ..ModelAvailability::new(entry.name, ModelState::Downloading)
                    }
                } else if self.model_store.is_present(entry) {
                    ModelAvailability::new(entry.name, ModelState::Present)
                } else {
                    ModelAvailability {
                        error: match download {
                            Some(Download::Failed(error)) => Some(error),
                            _ => None,
                        },
                        ..ModelAvailability::new(entry.name, ModelState::Missing)
                    }
                }
            })
            .collect();
        if catalogue_entry(serving).is_none() {
            models.push(ModelAvailability::new(serving.clone(), ModelState::Loaded));
        }
        models
    }

    /// Starts fetching `entry` here and asks every peer to do the same;
    /// returns the names of the nodes that lack it.
    fn fetch_model(&mut self, entry: &'static CatalogueEntry) -> Vec<String> {
        let mut fetching = Vec::new();
        let started = self.downloads.start(&self.model_store, entry);
        if started
            || matches!(
                self.downloads.state(entry.name),
                Some(Download::Running { .. })
            )
        {
            fetching.push(self.name.clone());
        }
        for member in self.members.values() {
            member.link.send(Frame::FetchModel {
                name: entry.name.to_string(),
            });
            let has_it = member.status.as_ref().is_some_and(|status| {
                status.models.iter().any(|m| {
                    m.name == entry.name
                        && matches!(m.state, ModelState::Loaded | ModelState::Present)
                })
            });
            if !has_it {
                fetching.push(member.hello.name.clone());
            }
        }
        tracing::info!(model = entry.name, nodes = ?fetching, "fetching model onto the nodes that lack it");
        self.refresh_local();
        fetching
    }

    fn send_status(&mut self) {
        let status = self.node_status();
        self.reported_in_flight = Some(status.in_flight);
        for member in self.members.values() {
            member.link.send(Frame::NodeStatus(status.clone()));
        }
    }

    /// Tells peers at once when this stage's load changed, and the local
    /// coordinator what every stage carries.
    fn track_load(&mut self) {
        if self.reported_in_flight != Some(self.in_flight()) {
            self.send_status();
        }
        let loads: Vec<StageLoad> = self
            .plan
            .as_ref()
            .filter(|p| p.active)
            .map(|p| {
                p.message
                    .stages
                    .iter()
                    .map(|s| StageLoad {
                        node: s.node.0,
                        in_flight: self.stage_in_flight(s.node),
                        limit: STAGE_REQUEST_LIMIT,
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.stage_loads.send_if_modified(|current| {
            let changed = *current != loads;
            if changed {
                *current = loads;
            }
            changed
        });
    }

    /// True while requests run anywhere in the cluster: owned here, on
    /// this node's stage, or on a peer's as it last reported (a node that
    /// just joined knows this from the status each peer sends first).
    fn requests_running(&self) -> bool {
        !self.owned.is_empty()
            || self.in_flight() > 0
            || self
                .members
                .values()
                .any(|m| m.status.as_ref().is_some_and(|s| s.in_flight > 0))
    }

    fn stage_in_flight(&self, node: NodeId) -> u32 {
        if node == self.me {
            return self.in_flight();
        }
        self.members
            .get(&node)
            .and_then(|m| m.status.as_ref())
            .map_or(0, |s| s.in_flight)
    }

    // -----------------------------------------------------------------------
    // Planning
    // -----------------------------------------------------------------------

    /// Leader: asks the policy for a placement of the current members; the
    /// answer comes back as [`ClusterEvent::Placed`].
    fn plan_if_leader(&mut self) {
        if self.leader() != self.me {
            self.replan_waiting_since = None;
            return;
        }
        // A new plan fails the requests running on the old one: let them
        // finish first, for a while.
        if self.requests_running() {
            if self.replan_waiting_since.is_none() {
                tracing::info!("re-planning once the running requests finish");
            }
            let since = *self.replan_waiting_since.get_or_insert_with(Instant::now);
            if since.elapsed() < Duration::from_millis(REPLAN_DEFER_MAX_MS) {
                self.replan_at = Some(Instant::now() + Duration::from_millis(REPLAN_RECHECK_MS));
                return;
            }
            tracing::warn!(
                "re-planning although requests still run after {} s; they fail and can be retried",
                REPLAN_DEFER_MAX_MS / 1000
            );
        }
        self.replan_waiting_since = None;
        self.placement += 1;
        let generation = self.placement;
        let cluster = self.policy_cluster();
        let model = self.policy_model.clone();
        let policy = self.policy.clone();
        let current = self.policy_status.policy.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let placed = match policy.place(cluster, model).await {
                Ok(placed) => placed,
                Err(error) => Placed {
                    result: Err(error),
                    policy: current,
                },
            };
            let _ = events
                .send(ClusterEvent::Placed { generation, placed })
                .await;
        });
    }

    fn on_placed(&mut self, generation: u64, placed: Placed) {
        if generation != self.placement || self.leader() != self.me {
            return; // membership changed meanwhile; a newer placement follows
        }
        let plan = match placed.result {
            Ok(plan) => plan,
            Err(error) => {
                let message = format!(
                    "cannot place model {} (policy {}): {error}",
                    self.identity.name, placed.policy.name
                );
                if self.plan_error.as_deref() != Some(&message) {
                    tracing::error!("{message}");
                }
                self.plan_error = Some(message);
                if matches!(error, PolicyError::Busy | PolicyError::Stopped) {
                    // Not the policy's answer: ask again shortly.
                    self.replan_at = Some(Instant::now() + Duration::from_millis(POLICY_RETRY_MS));
                }
                return;
            }
        };
        let stages: Vec<PlanStage> = plan
            .stages
            .iter()
            .map(|s| PlanStage {
                node: NodeId(s.node),
                address: self.address_of(NodeId(s.node)),
                layers: LayerRange::new(s.start as usize, s.end as usize),
            })
            .collect();
        // The same stages again change nothing, whether the plan is active
        // or still loading (unless it failed: then it is tried again).
        let unchanged = self
            .plan
            .as_ref()
            .is_some_and(|p| p.message.stages == stages && (p.active || self.plan_error.is_none()));
        if unchanged {
            self.plan_error = None;
            return;
        }
        let message = PlanMessage {
            epoch: Epoch(self.highest_epoch.0 + 1),
            leader: self.me,
            model: self.identity.clone(),
            stages,
        };
        tracing::info!(epoch = message.epoch.0, policy = %placed.policy.name, stages = %describe_stages(&message.stages, self), "new plan");
        for member in self.members.values() {
            member.link.send(Frame::Plan(message.clone()));
        }
        self.on_plan(message);
    }

    /// Adopts a plan: drop the old stage, load this node's layers (if any).
    fn on_plan(&mut self, message: PlanMessage) {
        let leader = message.leader;
        if message.epoch <= self.highest_epoch {
            // Another node led earlier with higher epochs; tell the leader
            // so that its next plan is newer than anything followed here.
            self.send_to(
                leader,
                Frame::PlanStale {
                    epoch: message.epoch,
                    highest: self.highest_epoch,
                },
            );
            return;
        }
        // A plan this node cannot follow changes nothing here, not even the
        // epoch: the real leader's next plan must still be taken.
        if message.model.fingerprint != self.identity.fingerprint {
            let error = format!(
                "this node serves {} ({}), the plan is for {} ({}); it cannot take part",
                self.identity.name,
                self.identity.fingerprint,
                message.model.name,
                message.model.fingerprint
            );
            tracing::error!("{error}");
            self.send_to(
                leader,
                Frame::PlanFailed {
                    epoch: message.epoch,
                    node: self.me,
                    error,
                },
            );
            return;
        }
        self.highest_epoch = message.epoch;
        self.ready_pending = None;
        for stage in &message.stages {
            if stage.node != self.me && !self.members.contains_key(&stage.node) {
                self.known_addresses.insert(stage.address.clone());
            }
        }
        self.redial();
        self.fail_owned("the cluster re-planned; retry the request");
        self.local_stage = None; // dropping the job sender stops the thread
        self.hosted.clear();
        let epoch = message.epoch;
        let mine = message
            .stages
            .iter()
            .position(|s| s.node == self.me)
            .map(|i| (i, message.stages[i].layers));
        self.plan = Some(CurrentPlan {
            message,
            ready: HashMap::new(),
            active: false,
        });
        self.plan_error = None;
        match mine {
            Some((_, layers)) => {
                tracing::info!(epoch = epoch.0, %layers, "loading layers for the new plan");
                let model = Arc::clone(&self.model);
                let device = self.device.clone();
                let events = self.events_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let result = model.load_shard(layers, &device).map_err(|e| e.to_string());
                    let _ = events.blocking_send(ClusterEvent::ShardLoaded { epoch, result });
                });
            }
            None => self.report_ready(epoch, 0),
        }
    }

    fn shard_loaded(&mut self, epoch: Epoch, result: Result<kernels::Shard, String>) {
        let Some(plan) = &self.plan else { return };
        if plan.message.epoch != epoch {
            return; // a newer plan replaced it while it loaded
        }
        let leader = plan.message.leader;
        let Some((index, _)) = plan.stage_of(self.me) else {
            return;
        };
        let shard = match result {
            Ok(shard) => shard,
            Err(error) => {
                tracing::error!(%error, "cannot load this node's layers");
                self.send_to(
                    leader,
                    Frame::PlanFailed {
                        epoch,
                        node: self.me,
                        error,
                    },
                );
                return;
            }
        };
        let weight_bytes = shard.weight_bytes();
        tracing::info!(
            epoch = epoch.0,
            layers = %shard.range(),
            weight_mib = format!("{:.1}", weight_bytes as f64 / (1 << 20) as f64),
            "layers loaded"
        );
        let (jobs_tx, jobs_rx) = mpsc::channel(MAX_ACTIVE_SEQUENCES * MAX_NODES);
        let events = self.events_tx.clone();
        let spawned = stage::spawn(shard, jobs_rx, move |output| {
            events
                .blocking_send(ClusterEvent::FromStage(output))
                .is_ok()
        });
        if let Err(error) = spawned {
            self.send_to(
                leader,
                Frame::PlanFailed {
                    epoch,
                    node: self.me,
                    error: format!("cannot start the stage thread: {error}"),
                },
            );
            return;
        }
        self.local_stage = Some(LocalStage {
            epoch,
            index,
            jobs: jobs_tx,
            weight_bytes,
        });
        self.report_ready(epoch, weight_bytes);
    }

    /// Tells the leader this node is ready for plan `epoch`: its layers are
    /// loaded and it is linked to every stage node (so activations and
    /// tokens can reach them). Until then the report waits.
    fn report_ready(&mut self, epoch: Epoch, weight_bytes: u64) {
        let Some(plan) = &self.plan else { return };
        let unlinked = plan
            .message
            .stages
            .iter()
            .any(|s| s.node != self.me && !self.members.contains_key(&s.node));
        if unlinked {
            self.ready_pending = Some((epoch, weight_bytes));
            return;
        }
        self.ready_pending = None;
        let leader = plan.message.leader;
        if leader == self.me {
            self.on_ready(epoch, self.me, weight_bytes);
        } else {
            self.send_to(
                leader,
                Frame::PlanReady {
                    epoch,
                    node: self.me,
                    weight_bytes,
                },
            );
        }
    }

    /// Leader: a node loaded its layers; activate once all have.
    fn on_ready(&mut self, epoch: Epoch, node: NodeId, weight_bytes: u64) {
        let Some(plan) = &mut self.plan else { return };
        if plan.message.epoch != epoch || plan.message.leader != self.me {
            return;
        }
        plan.ready.insert(node, weight_bytes);
        if !plan
            .message
            .stages
            .iter()
            .all(|s| plan.ready.contains_key(&s.node))
        {
            return;
        }
        let weights: Vec<(NodeId, u64)> = plan.ready.iter().map(|(n, b)| (*n, *b)).collect();
        for member in self.members.values() {
            member.link.send(Frame::PlanActive {
                epoch,
                weights: weights.clone(),
            });
        }
        self.on_active(epoch, weights);
    }

    fn on_active(&mut self, epoch: Epoch, weights: Vec<(NodeId, u64)>) {
        let Some(plan) = &mut self.plan else { return };
        if plan.message.epoch != epoch {
            return;
        }
        plan.ready.extend(weights);
        plan.active = true;
        self.plan_error = None;
        let stages = plan.message.stages.len();
        // Publish before announcing it: whoever reacts to the log line must
        // find the plan active.
        self.publish();
        tracing::info!(epoch = epoch.0, stages, "plan active: {stages} stages");
    }

    // -----------------------------------------------------------------------
    // Policy changes
    // -----------------------------------------------------------------------

    /// An upload (or reset) through this node's API.
    fn set_policy(
        &mut self,
        wasm: Option<Vec<u8>>,
        reply: oneshot::Sender<Result<PolicyStatus, PolicyError>>,
    ) {
        let change = match wasm {
            Some(_) => Change::Upload {
                cluster: self.policy_cluster(),
                model: self.policy_model.clone(),
            },
            // Back to the built-in policy: nothing to check or keep.
            None => Change::Fallback,
        };
        self.change_policy(wasm.map(Bytes::from), change, Some(reply), None);
    }

    /// The active policy failed here; this node runs the fallback already.
    /// Every node follows, as with any change.
    fn on_policy_fault(&mut self, fault: Fault) {
        if fault.failed.sha256 != self.policy_status.policy.sha256 {
            return; // a policy already replaced
        }
        let warning = capped_warning(format!(
            "policy {} ({}) failed and was replaced by {}: {}",
            fault.failed.name,
            short_hash(&fault.failed.sha256),
            fault.now_active.name,
            fault.error
        ));
        tracing::warn!("{warning}");
        self.change_policy(fault.now_active_wasm, Change::Fallback, None, Some(warning));
    }

    /// Starts a policy change made here: a new revision, installed here
    /// first and then sent to every peer.
    fn change_policy(
        &mut self,
        wasm: Option<Bytes>,
        change: Change,
        reply: Option<oneshot::Sender<Result<PolicyStatus, PolicyError>>>,
        warning: Option<String>,
    ) {
        let revision = PolicyRevision {
            counter: self.highest_policy_revision.counter + 1,
            origin: self.me,
        };
        self.highest_policy_revision = revision;
        self.install_policy(revision, wasm, change, reply, warning);
    }

    fn install_policy(
        &self,
        revision: PolicyRevision,
        wasm: Option<Bytes>,
        change: Change,
        reply: Option<oneshot::Sender<Result<PolicyStatus, PolicyError>>>,
        warning: Option<String>,
    ) {
        let policy = self.policy.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let result = policy.install(wasm.clone(), revision, change).await;
            let _ = events
                .send(ClusterEvent::PolicyInstalled {
                    revision,
                    wasm,
                    result,
                    warning,
                    reply,
                })
                .await;
        });
    }

    fn policy_installed(
        &mut self,
        revision: PolicyRevision,
        wasm: Option<Bytes>,
        result: Result<PolicyView, PolicyError>,
        warning: Option<String>,
        reply: Option<oneshot::Sender<Result<PolicyStatus, PolicyError>>>,
    ) {
        let view = match result {
            Ok(view) => view,
            Err(error) => {
                if reply.is_none() && error != PolicyError::Outdated {
                    tracing::error!(revision = revision.counter, %error, "cannot run the cluster's new policy; keeping the current one");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(Err(error));
                }
                return;
            }
        };
        let status = PolicyStatus {
            policy: view,
            revision: revision.counter,
            changed_by: Some(view_id(revision.origin)),
            warning,
        };
        // Installs finish in order on the policy thread, but their events
        // may arrive here out of order: a newer one already applied wins.
        if revision < self.policy_revision {
            if let Some(reply) = reply {
                let _ = reply.send(Ok(status));
            }
            return;
        }
        self.policy_revision = revision;
        self.highest_policy_revision = self.highest_policy_revision.max(revision);
        self.policy_wasm = wasm;
        self.policy_status = status;
        tracing::info!(
            policy = %self.policy_status.policy.name,
            version = %self.policy_status.policy.version,
            sha256 = %self.policy_status.policy.sha256,
            "scheduling policy changed (revision {})",
            revision.counter
        );
        if revision.origin == self.me {
            for member in self.members.values() {
                self.send_policy(&member.link);
            }
        }
        if let Some(reply) = reply {
            let _ = reply.send(Ok(self.policy_status.clone()));
        }
        // The new policy decides the placement from now on.
        self.membership_changed();
    }

    /// Sends the policy in force to a peer: the message, then the component
    /// in chunks (which share this node's one copy of it).
    fn send_policy(&self, link: &LinkSender) {
        let wasm = self.policy_wasm.clone();
        link.send(Frame::Policy(PolicyMessage {
            revision: self.policy_revision,
            wasm_bytes: wasm
                .as_ref()
                .map(|w| u32::try_from(w.len()).unwrap_or(u32::MAX)),
            warning: self.policy_status.warning.clone(),
        }));
        let Some(wasm) = wasm else { return };
        for offset in (0..wasm.len()).step_by(POLICY_CHUNK_BYTES) {
            let end = (offset + POLICY_CHUNK_BYTES).min(wasm.len());
            link.send(Frame::PolicyChunk {
                revision: self.policy_revision,
                offset: u32::try_from(offset).unwrap_or(u32::MAX),
                data: wasm.slice(offset..end),
            });
        }
    }

    /// A policy change from a peer: adopted when newer than ours. An
    /// uploaded component follows in chunks.
    fn on_policy_message(&mut self, from: NodeId, message: PolicyMessage) {
        let older_than_incoming = self
            .incoming_policy
            .as_ref()
            .is_some_and(|i| message.revision < i.message.revision);
        if message.revision <= self.policy_revision || older_than_incoming {
            return;
        }
        match message.wasm_bytes.map(|b| b as usize) {
            None => {
                self.incoming_policy = None;
                self.adopt_policy(from, message, None);
            }
            Some(size) if size == 0 || size > MAX_POLICY_BYTES => {
                tracing::warn!(peer = %self.node_name(from), size, "ignoring a policy of an impossible size");
            }
            Some(size) => {
                self.incoming_policy = Some(IncomingPolicy {
                    from,
                    message,
                    size,
                    data: Vec::with_capacity(size),
                });
            }
        }
    }

    fn on_policy_chunk(
        &mut self,
        from: NodeId,
        revision: PolicyRevision,
        offset: u32,
        data: Bytes,
    ) {
        let Some(incoming) = &mut self.incoming_policy else {
            return;
        };
        if incoming.from != from || incoming.message.revision != revision {
            return;
        }
        if offset as usize != incoming.data.len()
            || incoming.data.len() + data.len() > incoming.size
        {
            tracing::warn!(peer = %self.node_name(from), "a policy transfer arrived out of order; dropping it");
            self.incoming_policy = None;
            return;
        }
        incoming.data.extend_from_slice(&data);
        if incoming.data.len() == incoming.size
            && let Some(complete) = self.incoming_policy.take()
        {
            self.adopt_policy(from, complete.message, Some(Bytes::from(complete.data)));
        }
    }

    fn adopt_policy(&mut self, from: NodeId, message: PolicyMessage, wasm: Option<Bytes>) {
        tracing::info!(peer = %self.node_name(from), revision = message.revision.counter, "the cluster's policy changed; installing it");
        self.highest_policy_revision = self.highest_policy_revision.max(message.revision);
        // A change that replaced a failing policy says why; it ends a
        // fallback chain here as it did there.
        let change = if message.warning.is_some() || wasm.is_none() {
            Change::Fallback
        } else {
            Change::Propagated
        };
        let warning = message.warning.map(capped_warning);
        self.install_policy(message.revision, wasm, change, None, warning);
    }

    // -----------------------------------------------------------------------
    // Frames from peers
    // -----------------------------------------------------------------------

    fn on_frame(&mut self, from: NodeId, frame: Frame) {
        match frame {
            Frame::Plan(message) => {
                // Only the leader in this node's view plans for it: while
                // nodes are still meeting, two may each think they lead.
                if message.leader != from || from != self.leader() {
                    tracing::debug!(peer = %from, "ignoring a plan from a node that is not the leader here");
                    return;
                }
                self.on_plan(message);
            }
            Frame::PlanStale { epoch, highest } => {
                if self
                    .plan
                    .as_ref()
                    .is_some_and(|p| p.message.epoch == epoch && p.message.leader == self.me)
                {
                    self.highest_epoch = self.highest_epoch.max(highest);
                    self.plan = None;
                    self.membership_changed();
                }
            }
            Frame::PlanReady {
                epoch,
                node,
                weight_bytes,
            } => self.on_ready(epoch, node, weight_bytes),
            Frame::PlanFailed { epoch, node, error } => {
                let name = self
                    .members
                    .get(&node)
                    .map_or_else(|| node.to_string(), |m| m.hello.name.clone());
                let message = format!("node {name} cannot take part in plan {}: {error}", epoch.0);
                tracing::error!("{message}");
                self.plan_error = Some(message);
            }
            Frame::PlanActive { epoch, weights } => self.on_active(epoch, weights),
            Frame::Forward(forward) => self.forward_from_peer(from, forward),
            Frame::Token { request, token } => self.deliver_to_coordinator(StageResult::Token {
                sequence: SequenceId(request.0),
                token,
            }),
            Frame::ChunkDone { request } => self.deliver_to_coordinator(StageResult::ChunkDone {
                sequence: SequenceId(request.0),
            }),
            Frame::Failed { request, error } => self.deliver_to_coordinator(StageResult::Failed {
                sequence: SequenceId(request.0),
                message: error,
            }),
            Frame::Release { request } => self.release_local(SequenceId(request.0)),
            Frame::NodeStatus(status) => {
                if let Some(member) = self.members.get_mut(&from) {
                    member.status = Some(status);
                }
            }
            Frame::Policy(message) => self.on_policy_message(from, message),
            Frame::FetchModel { name } => match catalogue_entry(&name) {
                Some(entry) => {
                    if self.downloads.start(&self.model_store, entry) {
                        tracing::info!(model = entry.name, asked_by = %self.node_name(from), "fetching model");
                        self.refresh_local();
                    }
                }
                None => {
                    tracing::warn!(model = %name, asked_by = %self.node_name(from), "a peer asked for a model this node does not know; is it a newer ringlet?")
                }
            },
            Frame::PolicyChunk {
                revision,
                offset,
                data,
            } => self.on_policy_chunk(from, revision, offset, data),
            // Handled by the link itself.
            Frame::Hello(_)
            | Frame::Heartbeat { .. }
            | Frame::HeartbeatAck { .. }
            | Frame::Probe { .. }
            | Frame::Bye { .. } => {}
        }
    }

    // -----------------------------------------------------------------------
    // Routing
    // -----------------------------------------------------------------------

    /// A job from this node's coordinator: the first step of a request, or
    /// the release of one.
    fn on_coordinator_job(&mut self, job: StageJob) {
        match job {
            StageJob::Release { sequence } => {
                self.owned.remove(&sequence);
                let nodes: Vec<NodeId> = self
                    .plan
                    .as_ref()
                    .map(|p| p.message.stages.iter().map(|s| s.node).collect())
                    .unwrap_or_default();
                for node in nodes {
                    if node == self.me {
                        self.release_local(sequence);
                    } else {
                        self.send_to(
                            node,
                            Frame::Release {
                                request: RequestId(sequence.0),
                            },
                        );
                    }
                }
            }
            StageJob::Forward {
                sequence,
                position,
                input,
                sample,
                ..
            } => {
                let Some(plan) = self.plan.as_ref().filter(|p| p.active) else {
                    let message = format!(
                        "the cluster cannot run requests now: {}",
                        self.view.borrow().not_ready_reason()
                    );
                    self.deliver_to_coordinator(StageResult::Failed { sequence, message });
                    return;
                };
                self.owned.insert(sequence);
                let route = Route {
                    owner: self.me.0,
                    epoch: plan.message.epoch.0,
                    stage: 0,
                };
                self.route_forward(sequence, position, input, sample, route);
            }
        }
    }

    /// An output of this node's stage: hidden states onward, or a result
    /// back to the request's owner.
    fn on_stage_output(&mut self, output: StageOutput) {
        match output {
            StageOutput::Next {
                sequence,
                position,
                hidden,
                sample,
                route,
            } => {
                self.route_forward(
                    sequence,
                    position,
                    ShardInput::Hidden(hidden),
                    sample,
                    route,
                );
            }
            StageOutput::Done { route, result } => {
                self.send_result_to_owner(NodeId(route.owner), result)
            }
        }
    }

    /// Sends a job to the node holding stage `route.stage`.
    fn route_forward(
        &mut self,
        sequence: SequenceId,
        position: usize,
        input: ShardInput,
        sample: Sample,
        route: Route,
    ) {
        let owner = NodeId(route.owner);
        let target = self
            .plan
            .as_ref()
            .filter(|p| p.message.epoch.0 == route.epoch)
            .and_then(|p| p.message.stages.get(route.stage as usize));
        let Some(target) = target.map(|s| s.node) else {
            self.fail_at_owner(owner, sequence, "the cluster re-planned; retry the request");
            return;
        };
        if target == self.me {
            self.forward_local(sequence, position, input, sample, route);
            return;
        }
        let payload = match input {
            ShardInput::Tokens(tokens) => Payload::Tokens(tokens),
            ShardInput::Hidden(hidden) => match hidden_payload(&hidden) {
                Ok(payload) => payload,
                Err(message) => {
                    self.fail_at_owner(owner, sequence, message);
                    return;
                }
            },
        };
        let frame = Frame::Forward(ForwardFrame {
            request: RequestId(sequence.0),
            owner,
            epoch: Epoch(route.epoch),
            stage: route.stage,
            position: u32::try_from(position).unwrap_or(u32::MAX),
            payload,
            sample: match sample {
                Sample::No => WireSample::No,
                Sample::Start(params) => WireSample::Start(params),
                Sample::Continue => WireSample::Continue,
            },
        });
        if !self.send_to(target, frame) {
            let name = self.node_name(target);
            self.fail_at_owner(
                owner,
                sequence,
                format!(
                    "cannot reach node {name}, which holds stage {}",
                    route.stage
                ),
            );
        }
    }

    /// Hands a job to this node's stage, if the route is for it.
    fn forward_local(
        &mut self,
        sequence: SequenceId,
        position: usize,
        input: ShardInput,
        sample: Sample,
        route: Route,
    ) {
        let owner = NodeId(route.owner);
        let stage = self
            .local_stage
            .as_ref()
            .filter(|s| s.epoch.0 == route.epoch && s.index == route.stage as usize);
        let Some(stage) = stage else {
            self.fail_at_owner(
                owner,
                sequence,
                "this node's layers are not loaded for that plan; retry",
            );
            return;
        };
        let job = StageJob::Forward {
            sequence,
            position,
            input,
            sample,
            route,
        };
        if stage.jobs.try_send(job).is_err() {
            self.fail_at_owner(owner, sequence, "the stage is overloaded");
            return;
        }
        self.hosted.insert(sequence, owner);
    }

    /// A job from a peer: check it, turn its payload into an input, run it.
    fn forward_from_peer(&mut self, from: NodeId, forward: ForwardFrame) {
        let sequence = SequenceId(forward.request.0);
        let route = Route {
            owner: forward.owner.0,
            epoch: forward.epoch.0,
            stage: forward.stage,
        };
        let input = match forward.payload {
            Payload::Tokens(tokens) if !tokens.is_empty() => ShardInput::Tokens(tokens),
            Payload::Tokens(_) => {
                self.fail_at_owner(forward.owner, sequence, "an empty token payload");
                return;
            }
            Payload::Hidden {
                tokens,
                hidden,
                dtype: WireDType::F32,
                data,
            } => match hidden_input(tokens, hidden, &data, self.model.config().hidden_size) {
                Ok(tensor) => ShardInput::Hidden(tensor),
                Err(message) => {
                    tracing::warn!(peer = %from, %message, "refusing activations");
                    self.fail_at_owner(forward.owner, sequence, message);
                    return;
                }
            },
        };
        let sample = match forward.sample {
            WireSample::No => Sample::No,
            WireSample::Start(params) => Sample::Start(params),
            WireSample::Continue => Sample::Continue,
        };
        self.forward_local(sequence, forward.position as usize, input, sample, route);
    }

    /// Fails a request at the node that owns it.
    fn fail_at_owner(&mut self, owner: NodeId, sequence: SequenceId, message: impl Into<String>) {
        let message = message.into();
        self.send_result_to_owner(owner, StageResult::Failed { sequence, message });
    }

    fn send_result_to_owner(&mut self, owner: NodeId, result: StageResult) {
        if owner == self.me {
            self.deliver_to_coordinator(result);
            return;
        }
        let frame = match result {
            StageResult::Token { sequence, token } => Frame::Token {
                request: RequestId(sequence.0),
                token,
            },
            StageResult::ChunkDone { sequence } => Frame::ChunkDone {
                request: RequestId(sequence.0),
            },
            StageResult::Failed { sequence, message } => Frame::Failed {
                request: RequestId(sequence.0),
                error: message,
            },
        };
        self.send_to(owner, frame);
    }

    fn deliver_to_coordinator(&mut self, result: StageResult) {
        let sequence = match &result {
            StageResult::Token { sequence, .. }
            | StageResult::ChunkDone { sequence }
            | StageResult::Failed { sequence, .. } => *sequence,
        };
        if !self.owned.contains(&sequence) && !matches!(result, StageResult::Failed { .. }) {
            return; // a late result for a request already ended
        }
        if let StageResult::Failed { .. } = result {
            self.owned.remove(&sequence);
        }
        // The channel has room for every request's one result in flight.
        if self.results.try_send(result).is_err() {
            tracing::error!(request = %sequence, "the coordinator's result queue is full; dropping a result");
        }
    }

    fn release_local(&mut self, sequence: SequenceId) {
        self.hosted.remove(&sequence);
        if let Some(stage) = &self.local_stage {
            let _ = stage.jobs.try_send(StageJob::Release { sequence });
        }
    }

    fn fail_owned(&mut self, message: &str) {
        for sequence in self.owned.drain().collect::<Vec<_>>() {
            let _ = self.results.try_send(StageResult::Failed {
                sequence,
                message: message.to_string(),
            });
        }
    }

    /// Sends a frame to a member; false if it is not linked.
    fn send_to(&mut self, node: NodeId, frame: Frame) -> bool {
        if node == self.me {
            return false;
        }
        self.members.get(&node).is_some_and(|m| m.link.send(frame))
    }

    fn address_of(&self, node: NodeId) -> String {
        if node == self.me {
            return self.listen.to_string();
        }
        self.members
            .get(&node)
            .map_or_else(String::new, |m| m.address.clone())
    }

    fn node_name(&self, node: NodeId) -> String {
        if node == self.me {
            return self.name.clone();
        }
        self.members
            .get(&node)
            .map_or_else(|| node.to_string(), |m| m.hello.name.clone())
    }

    // -----------------------------------------------------------------------
    // The published view
    // -----------------------------------------------------------------------

    fn publish(&self) {
        let plan_layers = |node: NodeId| {
            self.plan
                .as_ref()
                .and_then(|p| p.stage_of(node))
                .map(|(_, l)| view_layers(l))
        };
        let reported = |node: NodeId| self.plan.as_ref().and_then(|p| p.ready.get(&node).copied());
        let (rss, peak) = process_memory();
        let mut nodes = vec![NodeView {
            id: view_id(self.me),
            name: self.name.clone(),
            address: self.listen.to_string(),
            status: "self".into(),
            resources: Resources {
                memory_available_bytes: self.local.memory_available_bytes,
                ..self.resources.clone()
            },
            model: self.identity.clone(),
            layers: plan_layers(self.me),
            weight_bytes: self
                .local_stage
                .as_ref()
                .map(|s| s.weight_bytes)
                .or_else(|| reported(self.me)),
            rss_bytes: Some(rss),
            peak_rss_bytes: Some(peak),
            models: self.local.models.clone(),
        }];
        for (id, member) in &self.members {
            let r = &member.hello.resources;
            let status = if member.hello.model.fingerprint == self.identity.fingerprint {
                "linked".to_string()
            } else {
                format!(
                    "not used: it serves another model file ({})",
                    member.hello.model.fingerprint
                )
            };
            nodes.push(NodeView {
                id: view_id(*id),
                name: member.hello.name.clone(),
                address: member.address.clone(),
                status,
                resources: Resources {
                    memory_available_bytes: member
                        .status
                        .as_ref()
                        .map_or(r.memory_available_bytes, |s| s.memory_available_bytes),
                    ..r.clone()
                },
                model: member.hello.model.clone(),
                layers: plan_layers(*id),
                weight_bytes: reported(*id),
                rss_bytes: member.status.as_ref().map(|s| s.rss_bytes),
                peak_rss_bytes: None,
                models: member
                    .status
                    .as_ref()
                    .map(|s| s.models.clone())
                    .unwrap_or_default(),
            });
        }
        let mut links: Vec<LinkView> = self
            .members
            .iter()
            .map(|(id, m)| LinkView {
                from: view_id(self.me),
                to: view_id(*id),
                rtt_ms: m.rtt_micros.map(|us| us as f64 / 1000.0),
                bandwidth_bytes_per_second: m.bandwidth,
            })
            .collect();
        for (id, member) in &self.members {
            let reported = member.status.iter().flat_map(|s| &s.links);
            links.extend(reported.filter(|m| m.to != self.me).map(|m| LinkView {
                from: view_id(*id),
                to: view_id(m.to),
                rtt_ms: Some(m.rtt_micros as f64 / 1000.0),
                bandwidth_bytes_per_second:
                    (m.bandwidth_bytes_per_second > 0).then_some(m.bandwidth_bytes_per_second),
            }));
        }
        let plan = self.plan.as_ref().map(|p| PlanView {
            epoch: p.message.epoch.0,
            leader: view_id(p.message.leader),
            state: if p.active {
                PlanState::Active
            } else {
                PlanState::Loading
            },
            stages: p
                .message
                .stages
                .iter()
                .map(|s| StageView {
                    node: view_id(s.node),
                    layers: view_layers(s.layers),
                    weight_bytes: p.ready.get(&s.node).copied(),
                    in_flight: self.stage_in_flight(s.node),
                })
                .collect(),
        });
        let view = ClusterView {
            node: Some(view_id(self.me)),
            leader: Some(view_id(self.leader())),
            model: Some(self.identity.clone()),
            nodes,
            links,
            plan,
            plan_error: self.plan_error.clone(),
            policy: Some(self.policy_status.clone()),
            not_joined: self
                .discovered
                .values()
                .filter_map(|(peer, verdict)| match verdict {
                    Verdict::Skip(reason) => Some(NotJoinedView {
                        node: view_id(peer.node),
                        name: peer.name.clone(),
                        addresses: peer.addresses.iter().map(ToString::to_string).collect(),
                        cluster: peer.cluster.clone(),
                        protocol_version: peer.protocol_version,
                        reason: reason.clone(),
                    }),
                    _ => None,
                })
                .collect(),
        };
        self.view.send_replace(view);
    }
}

/// The model as the policy sees it.
fn policy_model(model: &ModelFile) -> policy::Model {
    let config = model.config();
    let layer_bytes = model.layer_weight_bytes().unwrap_or_default();
    policy::Model {
        layer_count: u32::try_from(layer_bytes.len()).unwrap_or(u32::MAX),
        layer_bytes,
        embedding_bytes: model.embedding_bytes().unwrap_or(0),
        head_bytes: model.head_bytes().unwrap_or(0),
        tied_embeddings: model.ties_embeddings(),
        kv_bytes_per_token_per_layer: config.kv_bytes_per_token_per_layer(),
        context_length: u32::try_from(config.context_length).unwrap_or(u32::MAX),
    }
}

/// A warning about a failed policy, short enough to pass around.
fn capped_warning(warning: String) -> String {
    warning
        .chars()
        .take(2 * crate::limits::POLICY_TEXT_BYTES)
        .collect()
}

/// The first 12 hex digits of a SHA-256, for messages.
fn short_hash(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}

/// Where a peer is reached: its own address, unless it listens on all
/// interfaces, in which case the IP we see it from and its port.
fn advertised_address(announced: &str, observed: &str) -> String {
    match (
        announced.parse::<SocketAddr>(),
        observed.parse::<SocketAddr>(),
    ) {
        (Ok(a), Ok(o)) if a.ip().is_unspecified() => SocketAddr::new(o.ip(), a.port()).to_string(),
        _ => announced.to_string(),
    }
}

fn describe_stages(stages: &[PlanStage], cluster: &Cluster) -> String {
    stages
        .iter()
        .map(|s| format!("{} {}", cluster.node_name(s.node), s.layers))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Hidden states as a wire payload: `[tokens, hidden]` little-endian f32.
fn hidden_payload(hidden: &Tensor) -> Result<Payload, String> {
    let (tokens, width) = hidden.dims2().map_err(|e| e.to_string())?;
    let values = hidden
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| e.to_string())?;
    let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(Payload::Hidden {
        tokens: tokens as u32,
        hidden: width as u32,
        dtype: WireDType::F32,
        data,
    })
}

/// Checks a hidden-state payload from a peer and makes it a tensor.
fn hidden_input(
    tokens: u32,
    hidden: u32,
    data: &[u8],
    hidden_size: usize,
) -> Result<Tensor, String> {
    let (tokens, hidden) = (tokens as usize, hidden as usize);
    if hidden != hidden_size {
        return Err(format!(
            "activations are {hidden} wide, this model's hidden size is {hidden_size}"
        ));
    }
    if tokens == 0 || Some(data.len()) != tokens.checked_mul(hidden).and_then(|n| n.checked_mul(4))
    {
        return Err(format!(
            "{} bytes of activations do not hold {tokens} × {hidden} f32",
            data.len()
        ));
    }
    let values: Vec<f32> = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Tensor::from_vec(values, (tokens, hidden), &kernels::Device::Cpu).map_err(|e| e.to_string())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_of_peers_listening_everywhere_use_the_observed_ip() {
        assert_eq!(
            advertised_address("0.0.0.0:52415", "10.0.0.7:40123"),
            "10.0.0.7:52415"
        );
        assert_eq!(
            advertised_address("10.0.0.9:52415", "10.0.0.7:40123"),
            "10.0.0.9:52415"
        );
        assert_eq!(advertised_address("hostname:1", "10.0.0.7:2"), "hostname:1");
    }

    #[test]
    fn activations_round_trip_and_bad_ones_are_refused() {
        let t = Tensor::from_vec(
            vec![1.0f32, -2.5, 3.25, 0.0, 7.0, -1e-3],
            (2, 3),
            &kernels::Device::Cpu,
        )
        .expect("tensor");
        let Ok(Payload::Hidden {
            tokens,
            hidden,
            data,
            ..
        }) = hidden_payload(&t)
        else {
            panic!("payload")
        };
        let back = hidden_input(tokens, hidden, &data, 3).expect("input");
        assert_eq!(
            back.to_vec2::<f32>().expect("values"),
            t.to_vec2::<f32>().expect("values")
        );
        assert!(hidden_input(2, 4, &data, 3).is_err(), "wrong width");
        assert!(hidden_input(3, 3, &data, 3).is_err(), "too few bytes");
        assert!(hidden_input(0, 3, &[], 3).is_err(), "no tokens");
        assert!(
            hidden_input(u32::MAX, u32::MAX, &data, u32::MAX as usize).is_err(),
            "overflow"
        );
    }
}
