//! The cluster actor: the one task that owns all cluster state, split by
//! concern into [`Membership`], [`Planning`], [`Routing`], [`PolicySync`]
//! and [`LocalStatus`]. The sub-states never call each other: the actor
//! feeds each event to the ones it concerns, and writes every transition
//! that crosses concerns here, once, in order (a link going down, a new
//! plan, a shard loaded), along with the IO the sub-states decide on
//! (frames, spawned loads and placements).

mod plans;
mod policies;
mod reports;
mod requests;
mod switch;
mod trust;
mod webrtc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kernels::{Device, ModelFile};
use scheduler::NodeId;
use tokio::sync::{mpsc, watch};

use super::admin_proof::AdminKey;
use super::discovery::Discovery;
use super::events::LinkEnd;
use super::hops::{HopTable, Hops, LocalEntry};
use super::link::{self, LinkContext, LinkId, LinkSender, OpenLinks};
use super::membership::{Membership, Myself, Refusal};
use super::planning::Planning;
use super::policy_sync::PolicySync;
use super::protocol::{Frame, Hello, ModelIdentity};
use super::recovery::Recoveries;
use super::routing;
use super::routing::Routing;
use super::secure::LinkKeys;
use super::signaling::Signaling;
use super::status::LocalStatus;
use super::view::Parts;
use super::{ClusterConfig, ClusterEvent, ClusterView};
use crate::engine::PipelineEnds;
use crate::hub::HubFiles;
use crate::limits::{
    FROZEN_AFTER_MS, KEPT_LINK_WAIT_MS, MAX_MODEL_NAME_BYTES, NODE_STATUS_INTERVAL_MS,
    REDIAL_INTERVAL_MS, WATCHDOG_INTERVAL_MS,
};
use crate::model_store::Downloads;
use crate::policy::{self, Faults, PolicyHandle, StageLoad};
use crate::stage::{StageJob, StageResult};

/// The channels the actor is fed by and publishes to.
pub(super) struct Channels {
    pub events_tx: mpsc::Sender<ClusterEvent>,
    pub events: mpsc::Receiver<ClusterEvent>,
    pub view: watch::Sender<ClusterView>,
    pub open_links: OpenLinks,
}

pub(super) struct Cluster {
    membership: Membership,
    /// WebRTC links: nodes told of, attempts, signals.
    signaling: Signaling,
    /// This node's key and the cluster's secret, for every link.
    keys: Arc<LinkKeys>,
    /// What the stage thread and the link readers read to route a
    /// request's frames without the actor; published here.
    hops: Arc<Hops>,
    /// The links that may still write, which a stopping node waits for.
    open_links: OpenLinks,
    /// The last plan ignored because its sender did not lead in this
    /// node's view; followed if the sender turns out to lead.
    passed_over_plan: Option<super::protocol::PlanMessage>,
    /// Where they are kept: a rotation writes the new secret there.
    identity: crate::identity::Identity,
    /// Proves the secret on requests for model files; a rotation renews it.
    peer_pass: crate::identity::PeerPass,
    /// Makes and checks admins' authorizations; `None` without a token.
    admin: Option<AdminKey>,
    planning: Planning,
    routing: Routing,
    /// Losses of the plan's nodes and the recoveries from them.
    recoveries: Recoveries,
    /// How long interrupted requests wait for a new plan (`--recovery-wait`).
    recovery_wait: Duration,
    /// A fault a test asked this node's stage to have.
    stage_fault: Option<crate::stage::TestFault>,
    /// When the watchdog last ran, to notice that this process was frozen.
    last_watchdog: Instant,
    policy_sync: PolicySync,
    local: LocalStatus,
    /// The mDNS advertisement and browser, withdrawn when the actor ends.
    _discovery: Option<Discovery>,
    model: Arc<ModelFile>,
    /// The model's vocabulary for the grammar engine, for the last stage.
    grammars: Arc<kernels::Grammars>,
    /// For a Hub model: fetches a new shard's bytes.
    hub_files: Option<Arc<HubFiles>>,
    /// Where the fetch of this node's slice reports its progress.
    downloads: Downloads,
    /// Opens the model a switch names.
    open_model: super::ModelOpener,
    /// The model this node is opening for a switch.
    switching: Option<String>,
    /// The task fetching and loading this node's layers for the plan
    /// followed, stopped when another plan or model replaces it.
    loading: Option<tokio::task::AbortHandle>,
    /// The model as the policy sees it.
    policy_model: policy::Model,
    device: Device,
    policy: PolicyHandle,
    policy_faults: Faults,
    /// Where the actor publishes each stage's load for the coordinator.
    stage_loads: watch::Sender<Vec<StageLoad>>,
    /// Where it publishes the plan's room for KV cache.
    kv_room: watch::Sender<Option<crate::engine::KvRoom>>,
    /// The most this node's stage gives to KV cache (`--kv-cache`).
    kv_cache_bytes: u64,
    /// The KV cache the requests owned here reserve, in tokens.
    reserved_tokens: watch::Receiver<u64>,
    /// Jobs from this node's coordinator, and its results.
    jobs: mpsc::Receiver<StageJob>,
    results: mpsc::Sender<StageResult>,
    events_tx: mpsc::Sender<ClusterEvent>,
    events: mpsc::Receiver<ClusterEvent>,
    view: watch::Sender<ClusterView>,
}

impl Cluster {
    pub(super) fn new(
        config: ClusterConfig,
        model: Arc<ModelFile>,
        pipeline: PipelineEnds,
        channels: Channels,
        discovery: Option<Discovery>,
    ) -> Self {
        let identity = ModelIdentity {
            name: config.model_name,
            fingerprint: model.fingerprint().to_string(),
        };
        let local = LocalStatus::new(
            identity.name.clone(),
            &config.resources,
            config.model_store,
            config.downloads.clone(),
        );
        let myself = Myself {
            id: config.me,
            key_fingerprint: crate::identity::key_fingerprint(&config.identity.key.public),
            name: config.name,
            cluster: config.cluster,
            listen: config.listen,
            resources: config.resources,
            identity,
            serving_since_ms: None,
            stage_lost: None,
            ice_servers: config.ice_servers,
        };
        Self {
            signaling: Signaling::new(config.me, config.link_mode),
            membership: Membership::new(myself, config.peers),
            keys: Arc::new(LinkKeys::new(
                config.identity.key.clone(),
                &config.identity.secret,
                config.plaintext_frames,
            )),
            hops: Arc::new(Hops::default()),
            passed_over_plan: None,
            identity: config.identity,
            peer_pass: config.peer_pass,
            admin: config.admin_token.as_deref().map(AdminKey::from_token),
            planning: Planning::new(),
            routing: Routing::default(),
            recoveries: Recoveries::default(),
            recovery_wait: config.recovery_wait,
            stage_fault: config.stage_fault,
            last_watchdog: Instant::now(),
            policy_sync: PolicySync::new(config.policy.built_in().clone()),
            local,
            _discovery: discovery,
            policy_model: policy_model(&model),
            model,
            grammars: config.grammars,
            hub_files: config.hub_files,
            open_model: config.open_model,
            switching: None,
            loading: None,
            downloads: config.downloads,
            device: config.device,
            policy: config.policy,
            policy_faults: config.policy_faults,
            stage_loads: config.stage_loads,
            kv_room: config.kv_room,
            kv_cache_bytes: config.kv_cache_bytes,
            reserved_tokens: pipeline.reserved_tokens,
            jobs: pipeline.jobs,
            results: pipeline.results,
            events_tx: channels.events_tx,
            events: channels.events,
            view: channels.view,
            open_links: channels.open_links,
        }
    }

    fn me(&self) -> NodeId {
        self.membership.me.id
    }

    /// Stops fetching the layers of a plan no longer followed: a fetch
    /// stopped between pieces keeps what it recorded (a piece is written
    /// and recorded with no pause between), and a load already reading
    /// runs out with its result dropped.
    fn stop_loading(&mut self) {
        if let Some(loading) = self.loading.take() {
            loading.abort();
        }
    }

    /// Publishes what the hops read: the plan followed, this node's
    /// stage in it, and the links to the plan's other nodes.
    fn publish_hops(&self) {
        let plan = self.planning.plan.as_ref().map(|p| {
            let nodes: Vec<NodeId> = p.message.stages.iter().map(|s| s.node).collect();
            (p.message.epoch, nodes)
        });
        let links = plan
            .iter()
            .flat_map(|(_, nodes)| nodes)
            .filter_map(|node| {
                let member = self.membership.members.get(node)?;
                Some((*node, member.link.clone()))
            })
            .collect();
        let stage = self.planning.local_stage.as_ref().map(|s| LocalEntry {
            epoch: s.epoch,
            index: u32::try_from(s.index).unwrap_or(u32::MAX),
            jobs: s.jobs.clone(),
            hidden_size: self.model.config().hidden_size,
        });
        self.hops.publish(HopTable {
            me: Some(self.me()),
            plan,
            stage,
            links,
        });
    }

    pub(super) async fn run(mut self) {
        self.redial();
        self.publish();
        let mut redial = tokio::time::interval(Duration::from_millis(REDIAL_INTERVAL_MS));
        let mut status = tokio::time::interval(Duration::from_millis(NODE_STATUS_INTERVAL_MS));
        let mut watchdog = tokio::time::interval(Duration::from_millis(WATCHDOG_INTERVAL_MS));
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let replan = self.planning.replan_at;
            // Whether the plan, the links or the peers' reports may have
            // changed (what the hops and the KV room are made of): after
            // anything but a request's jobs and frames.
            let mut beyond_requests = true;
            // Whether the view may have changed: not for the frames and
            // jobs of each token, which only move requests along.
            let changed = tokio::select! {
                event = self.events.recv() => match event {
                    Some(event) => {
                        beyond_requests = !event.moves_requests();
                        self.on_event(event)
                    }
                    None => break,
                },
                job = self.jobs.recv() => match job {
                    Some(job) => {
                        beyond_requests = false;
                        self.on_coordinator_job(job);
                        false
                    }
                    None => break, // the coordinator stopped: the node is stopping
                },
                () = sleep_until(replan) => {
                    self.replan_due();
                    false
                }
                _ = redial.tick() => {
                    self.redial();
                    false
                }
                _ = status.tick() => {
                    let changed = self.local.refresh();
                    self.send_status();
                    changed
                }
                _ = watchdog.tick() => self.watchdog(),
                Some(fault) = self.policy_faults.recv() => {
                    self.on_policy_fault(fault);
                    false
                }
                // The owned requests' KV reservations changed: peers hear
                // it at once (`track_load`, below).
                Ok(()) = self.reserved_tokens.changed() => false,
            };
            if beyond_requests {
                self.publish_hops();
                self.publish_kv_room();
            }
            let load_changed = self.track_load();
            if changed || load_changed {
                self.publish();
            }
        }
        self.membership.say_goodbye("the node is stopping");
    }

    /// Handles one event; true when the view may have changed.
    fn on_event(&mut self, event: ClusterEvent) -> bool {
        match event {
            ClusterEvent::LinkUp {
                hello,
                key,
                keys,
                sender,
                accepted,
            } => {
                // A link that opened before the secret was rotated proved
                // only the old secret, which a removed node holds too.
                let admitted = if Arc::ptr_eq(&keys, &self.keys) {
                    self.link_up(*hello, key, sender)
                } else {
                    tracing::info!(peer = %hello.name, "refused a link that opened with the cluster's previous secret");
                    Err(Refusal::OldSecret)
                };
                let kept = admitted.is_ok();
                let _ = accepted.send(admitted);
                kept
            }
            ClusterEvent::Refused {
                address,
                dialed,
                reason,
                wrong_key,
            } => {
                if wrong_key {
                    self.membership.refuse(&address, dialed, &reason);
                    return true;
                }
                // The network's problems: a dial is retried; a connection
                // that came in and failed is a stranger's business.
                if dialed {
                    tracing::warn!(peer = %address, %reason, "link handshake failed; will retry");
                } else {
                    tracing::debug!(peer = %address, %reason, "an incoming link failed its handshake");
                }
                false
            }
            ClusterEvent::LinkDown {
                node,
                link,
                end: LinkEnd::PeerKeptAnother,
            } => {
                self.membership.await_kept_link(node, link, Instant::now());
                false
            }
            ClusterEvent::LinkDown {
                node,
                link,
                end: LinkEnd::Goodbye(reason),
            } => {
                let left = self.link_down(node, link, &format!("the peer said goodbye: {reason}"));
                if left {
                    self.signaling.forget(node);
                }
                left
            }
            ClusterEvent::LinkDown {
                node,
                link,
                end: LinkEnd::Closed(reason),
            } => self.link_down(node, link, &reason),
            ClusterEvent::LinkRtt { node, rtt_micros } => {
                self.membership.record_rtt(node, rtt_micros);
                true
            }
            ClusterEvent::LinkBandwidth {
                node,
                bytes_per_second,
            } => {
                self.membership.record_bandwidth(node, bytes_per_second);
                true
            }
            ClusterEvent::Placed { generation, placed } => {
                self.on_placed(generation, placed);
                true
            }
            ClusterEvent::SetPolicy { wasm, reply } => {
                self.set_policy(wasm, reply);
                false
            }
            ClusterEvent::Discovered {
                fullname,
                peer,
                verdict,
            } => {
                if self.membership.discovered(fullname, peer, verdict) {
                    self.redial();
                }
                true
            }
            ClusterEvent::Withdrawn { fullname } => {
                self.membership.withdrawn(&fullname);
                true
            }
            ClusterEvent::FetchModel { entry, reply } => {
                let _ = reply.send(self.fetch_model(entry));
                true
            }
            ClusterEvent::Invite { reply } => {
                let _ = reply.send(self.invite());
                false
            }
            ClusterEvent::RotateSecret { removed, reply } => {
                let _ = reply.send(self.rotate_secret(removed));
                true
            }
            ClusterEvent::SwitchModel { model, reply } => {
                let _ = reply.send(self.switch_cluster(model));
                true
            }
            ClusterEvent::ModelOpened { model, result } => {
                self.model_opened(model, result);
                true
            }
            ClusterEvent::PolicyInstalled {
                revision,
                wasm,
                result,
                reply,
                warning,
                proof,
            } => {
                self.policy_installed(revision, wasm, result, warning, proof, reply);
                true
            }
            ClusterEvent::Frame { from, frame } => self.on_frame(from, frame),
            ClusterEvent::FromStage(outputs) => {
                self.on_stage_outputs(outputs);
                false
            }
            ClusterEvent::ForStage(job) => {
                self.run_on_stage(job);
                false
            }
            ClusterEvent::HopFailed {
                route,
                sequence,
                failure,
            } => {
                self.hop_failed(route, sequence, failure);
                false
            }
            ClusterEvent::ShardLoaded { epoch, result } => {
                self.shard_loaded(epoch, result);
                true
            }
            ClusterEvent::DialEnded { address, failed } => {
                self.membership.dial_ended(&address);
                if failed {
                    self.tcp_dial_failed(&address);
                }
                false
            }
            ClusterEvent::SignalOut(signal) => {
                self.send_signal(signal);
                false
            }
            ClusterEvent::WebrtcEnded {
                node,
                session,
                error,
                no_path,
            } => self.webrtc_ended(node, session, error, no_path),
            ClusterEvent::Accept { stream, remote } => {
                self.spawn_link(stream, remote.to_string());
                false
            }
        }
    }

    // -----------------------------------------------------------------------
    // Links: the transitions that cross every concern
    // -----------------------------------------------------------------------

    /// Links to every known address not linked yet.
    fn redial(&mut self) {
        for address in self.membership.start_dialing() {
            if let Some(node) = self.webrtc_instead_of_tcp(&address) {
                self.membership.dial_ended(&address);
                self.want_webrtc(node);
                continue;
            }
            let hello = self.membership.hello();
            let events = self.events_tx.clone();
            let me = self.me();
            let keys = Arc::clone(&self.keys);
            let hops = Arc::clone(&self.hops);
            let open_links = self.open_links.clone();
            tokio::spawn(async move {
                match link::dial(&address).await {
                    Ok(stream) => {
                        let context = LinkContext::tcp(
                            me,
                            events.clone(),
                            address.clone(),
                            keys,
                            hops,
                            open_links,
                        );
                        let ended = ClusterEvent::DialEnded {
                            address,
                            failed: false,
                        };
                        let _ = events.send(ended).await;
                        link::run(stream, hello, true, context).await;
                    }
                    Err(error) => {
                        tracing::debug!(%error, "dial failed; will retry");
                        // A peer that accepted the connection but did not
                        // answer (a frozen process) is no case for WebRTC.
                        let failed = matches!(error, link::LinkError::NoConnection { .. });
                        let _ = events
                            .send(ClusterEvent::DialEnded { address, failed })
                            .await;
                    }
                }
            });
        }
    }

    fn spawn_link(&self, stream: link::AcceptedStream, observed_address: String) {
        let context = LinkContext::tcp(
            self.me(),
            self.events_tx.clone(),
            observed_address,
            Arc::clone(&self.keys),
            Arc::clone(&self.hops),
            self.open_links.clone(),
        );
        tokio::spawn(link::run(stream, self.membership.hello(), false, context));
    }

    /// A link finished its handshake: membership admits the peer (or says
    /// why the link closes); the peer hears the policy and this node's
    /// status; planning re-plans; a readiness report waiting for this link
    /// goes out.
    fn link_up(&mut self, hello: Hello, key: Vec<u8>, link: LinkSender) -> Result<(), Refusal> {
        let peer = hello.node;
        let told: Vec<_> = hello
            .peers
            .iter()
            .map(|p| (p.node, p.address.clone()))
            .collect();
        let servers = hello.ice_servers.clone();
        self.membership.admit(hello, key, link)?;
        self.peer_linked(peer, told, &servers);
        // A newcomer learns the cluster's policy (if it has a newer one,
        // it sends it here the same way and it wins).
        if self.policy_sync.changed() {
            for frame in self.policy_sync.frames() {
                self.membership.send_to(peer, frame);
            }
        }
        let status = self.local.report(
            self.load(),
            self.membership.measurements(),
            self.membership.me.serving_since_ms,
        );
        self.membership.send_to(peer, Frame::NodeStatus(status));
        self.planning.replan_soon();
        if let Some((epoch, weight_bytes)) = self.planning.pending_ready() {
            self.report_ready(epoch, weight_bytes);
        }
        Ok(())
    }

    /// A link closed: membership drops the peer, policy sync forgets its
    /// transfer, the requests it broke wait for a new plan, the sequences
    /// it owned here are released, and planning re-plans.
    fn link_down(&mut self, node: NodeId, link: LinkId, reason: &str) -> bool {
        let Some(member) = self.membership.remove(node, link) else {
            return false; // a replaced duplicate link closing
        };
        tracing::info!(node = %node, address = %member.address, %reason, "peer {} left", member.hello.name);
        self.membership.forget_unreachable(node);
        self.policy_sync.forget(node);
        for sequence in self.routing.orphans_of(node) {
            self.release_on_stage(sequence);
        }
        if self.planning.in_plan(node) {
            self.lost_plan_node(node, member.hello.name, reason.to_string());
        } else {
            let name = member.hello.name.clone();
            if self
                .recoveries
                .lost_before_noticed(node, name.clone(), reason.to_string())
            {
                tracing::warn!(node = %node, "lost node {name}: {reason}; the leader re-planned without it already, and the requests of this node wait for that plan");
            }
            self.planning.replan_soon();
        }
        true
    }

    /// A node holding a stage of the plan is lost: requests owned here
    /// that ran on the plan wait for the next one, and the leader plans
    /// at once on the nodes left (nothing runs on a broken plan, so there
    /// is nothing to wait for).
    fn lost_plan_node(&mut self, node: NodeId, name: String, reason: String) {
        let Some(plan) = self.planning.plan.as_ref() else {
            return;
        };
        let (epoch, layers) = (
            plan.message.epoch,
            plan.stage_of(node).map(|(_, layers)| layers.to_string()),
        );
        let Some(layers) = layers else {
            return;
        };
        // The leader plans; one that still sees the node must hear that
        // this node lost it.
        let leader = self.membership.leader();
        if leader != self.me() && leader != node {
            self.membership.send_to(
                leader,
                Frame::PlanBroken {
                    epoch,
                    node,
                    reason: reason.clone(),
                },
            );
        }
        let interrupted = self.routing.interrupt_running();
        tracing::warn!(
            node = %node,
            epoch = epoch.0,
            %layers,
            interrupted,
            "lost node {name}, which held layers {layers}: {reason}; re-planning on the nodes left, {interrupted} requests of this node wait"
        );
        self.planning.lost_stage(format!(
            "node {name} ({node}) was lost: {reason}; re-planning"
        ));
        self.recoveries.lost(node, name, reason, interrupted);
        self.planning.replan_now();
    }

    /// Runs every [`WATCHDOG_INTERVAL_MS`]: this node's stage, the peers
    /// of the plan while requests of this node run through them, and the
    /// requests waiting for a plan; true when the view may have changed.
    fn watchdog(&mut self) -> bool {
        // A tick far later than due means this process (or its machine)
        // was frozen (a stopped process, a suspended laptop): nothing here
        // could run, so neither its own stage nor its peers' silence is
        // judged on that time.
        let gap = self.last_watchdog.elapsed();
        self.last_watchdog = Instant::now();
        if gap > Duration::from_millis(FROZEN_AFTER_MS) {
            tracing::warn!(
                gap_ms = gap.as_millis() as u64,
                "this node was frozen for {} ms (stopped or suspended); restarting its progress clocks",
                gap.as_millis()
            );
            if let Some(stage) = &self.planning.local_stage {
                stage.progress.restart_clock();
            }
            self.membership.heard_from_all();
            return false;
        }
        let mut changed = false;
        // This node's stage: a dead thread, or a step far slower than its
        // measured steps of that size.
        let stalled = self
            .planning
            .local_stage
            .as_ref()
            .and_then(|stage| stage.progress.stalled().map(|reason| (stage.epoch, reason)));
        if let Some((epoch, reason)) = stalled {
            self.own_stage_lost(epoch, reason);
            changed = true;
        }
        // Peers of the plan that fell silent while they carry our requests
        // (a stopped process, a frozen machine, a cable pulled): each node
        // that sees the silence closes its link, so all of them re-plan.
        if self.routing.owns_running() {
            let nodes = self.planning.stage_nodes();
            let largest = self.largest_activation_frame();
            for (node, silent) in self.membership.silent_peers(&nodes, largest) {
                tracing::warn!(node = %node, silent_ms = silent.as_millis() as u64, "node {} holds a stage of the plan and has sent nothing for {} ms, not even a heartbeat's answer; counting it as lost", self.membership.name_of(node), silent.as_millis());
                self.membership.broadcast(&Frame::PeerSilent { node });
                self.membership.close_link(node);
            }
        }
        // Peers that said they keep another link to this node, which
        // never came up.
        for (node, link) in self.membership.kept_links_overdue(Instant::now()) {
            let reason = format!(
                "it closed a duplicate link, and the link it kept did not come up within {KEPT_LINK_WAIT_MS} ms"
            );
            changed |= self.link_down(node, link, &reason);
        }
        changed | self.expire_interrupted()
    }

    /// The largest activation frame a link carries: a prompt chunk's
    /// hidden states.
    fn largest_activation_frame(&self) -> u64 {
        (crate::limits::PREFILL_CHUNK_TOKENS * self.model.config().hidden_size * 4) as u64
    }

    /// This node's stage thread died or stopped making progress: the
    /// stage is lost here and everywhere (peers treat it as if the node
    /// had left), and this node takes no layers until it restarts.
    pub(super) fn own_stage_lost(&mut self, epoch: super::protocol::Epoch, reason: String) {
        tracing::error!(epoch = epoch.0, %reason, "this node's stage is lost: {reason}; the cluster plans without it (restart this node to give it layers again)");
        self.membership.me.stage_lost = Some(reason.clone());
        self.planning.local_stage = None;
        self.membership.broadcast(&Frame::StageLost {
            epoch,
            reason: reason.clone(),
        });
        let (me, name) = (self.me(), self.membership.me.name.clone());
        self.lost_plan_node(me, name, format!("its stage {reason}"));
    }

    /// A peer says its stage of plan `epoch` was lost.
    fn peer_stage_lost(&mut self, from: NodeId, epoch: super::protocol::Epoch, reason: &str) {
        let current = self
            .planning
            .plan
            .as_ref()
            .is_some_and(|p| p.message.epoch == epoch);
        self.membership.stage_lost(from, reason);
        if current {
            let name = self.membership.name_of(from);
            self.lost_plan_node(from, name, format!("its stage {reason}"));
        } else {
            self.planning.replan_soon();
        }
    }

    /// A peer counted `node` as lost for silence: if this node has not
    /// heard from it for a while either, it closes its link too, so the
    /// leader and every owner re-plan; if it has, the silence was only
    /// between those two and the link here stays.
    fn peer_silent(&mut self, from: NodeId, node: NodeId) {
        if node == self.me() {
            return;
        }
        let largest = self.largest_activation_frame();
        if let Some((_, silent)) = self
            .membership
            .silent_peers(&[node], largest)
            .into_iter()
            .next()
        {
            tracing::warn!(node = %node, silent_ms = silent.as_millis() as u64, "node {} says node {} fell silent, and it has been silent here too; counting it as lost", self.membership.name_of(from), self.membership.name_of(node));
            self.membership.close_link(node);
        }
    }

    /// Fails the interrupted requests that waited longer than
    /// `--recovery-wait` for a plan, unless one is loading (loading is
    /// progress), and then at most twice as long; true when some failed.
    fn expire_interrupted(&mut self) -> bool {
        let Some(since) = self.routing.interrupted_since() else {
            return false;
        };
        let waited = since.elapsed();
        let wait = if self.planning.loading() {
            self.recovery_wait * 2
        } else {
            self.recovery_wait
        };
        if waited < wait {
            return false;
        }
        let expired = self.routing.take_expired(wait);
        if expired.is_empty() {
            return false;
        }
        let lost = self
            .recoveries
            .describe_current()
            .unwrap_or_else(|| "the cluster has no plan".into());
        let shortfall = self
            .planning
            .error
            .clone()
            .unwrap_or_else(|| "no plan was made".into());
        let message = format!(
            "{lost}, and the nodes left cannot hold the model: {shortfall}; waited {} s (--recovery-wait) for a node to join or return",
            wait.as_secs()
        );
        tracing::error!(requests = expired.len(), "{message}");
        self.recoveries.failed(expired.len(), message.clone());
        for sequence in expired {
            self.deliver_failure(sequence, message.clone());
        }
        true
    }

    // -----------------------------------------------------------------------
    // Frames from peers
    // -----------------------------------------------------------------------

    /// Handles a frame from a peer; true when the view may have changed.
    fn on_frame(&mut self, from: NodeId, frame: Frame) -> bool {
        match frame {
            Frame::Plan(message) => {
                // Only the leader in this node's view plans for it: while
                // nodes are still meeting, two may each think they lead.
                if message.leader != from || from != self.membership.leader() {
                    tracing::debug!(peer = %from, "ignoring a plan from a node that is not the leader here (yet)");
                    // Kept: if this node learns that the sender is senior
                    // after all, the plan is followed then.
                    self.passed_over_plan = (message.leader == from).then_some(message);
                    return false;
                }
                self.passed_over_plan = None;
                self.on_plan(message);
                true
            }
            Frame::PlanStale { epoch, highest } => {
                let me = self.me();
                self.planning.stale(epoch, highest, me)
            }
            // A node reports for itself: another's word about a third
            // node (a bug, or a peer that lies) is not taken.
            Frame::PlanReady { node, .. } | Frame::PlanFailed { node, .. } if node != from => {
                tracing::warn!(peer = %self.membership.name_of(from), about = %self.membership.name_of(node), "ignoring a plan report a peer sent about another node");
                false
            }
            Frame::PlanReady {
                epoch,
                node,
                weight_bytes,
            } => {
                self.on_ready(epoch, node, weight_bytes);
                true
            }
            Frame::PlanFailed { epoch, node, error } => {
                let message = format!(
                    "node {} cannot take part in plan {}: {error}",
                    self.membership.name_of(node),
                    epoch.0
                );
                tracing::error!("{message}");
                self.planning.error = Some(message);
                true
            }
            Frame::PlanActive {
                epoch,
                weights,
                since_ms,
            } => {
                // Only from the leader of the plan here (`activate` checks).
                self.on_active(from, epoch, weights, since_ms);
                true
            }
            Frame::Forward(forward) => {
                self.forward_from_peer(from, forward);
                false
            }
            frame @ (Frame::Token { .. } | Frame::ChunkDone { .. } | Frame::Failed { .. }) => {
                if let Frame::Token { sent_at, .. } = &frame
                    && *sent_at != 0
                {
                    crate::metrics::observe_hop(&crate::metrics::global().hop_to_owner, *sent_at);
                }
                if let Some((result, epoch)) = routing::frame_result(frame) {
                    self.deliver_to_coordinator(result, epoch);
                }
                false
            }
            Frame::Interrupted {
                request,
                epoch,
                reason,
            } => {
                self.interrupt_owned(request, epoch, &reason);
                false
            }
            Frame::StageLost { epoch, reason } => {
                self.peer_stage_lost(from, epoch, &reason);
                true
            }
            Frame::PeerSilent { node } => {
                self.peer_silent(from, node);
                false
            }
            Frame::PlanBroken {
                epoch,
                node,
                reason,
            } => {
                let current = self
                    .planning
                    .active()
                    .is_some_and(|p| p.message.epoch == epoch);
                if current && self.membership.leader() == self.me() {
                    let (name, by) = (self.membership.name_of(node), self.membership.name_of(from));
                    self.lost_plan_node(
                        node,
                        name,
                        format!("node {by} lost its link to it: {reason}"),
                    );
                }
                true
            }
            Frame::Release { request } => {
                self.release_on_stage(request);
                false
            }
            Frame::NodeStatus(status) => {
                let leader = self.membership.leader();
                if self.membership.record_status(from, status) {
                    // Two nodes left apart linked after all.
                    self.planning.replan_soon();
                }
                self.leader_may_have_changed(leader);
                true
            }
            Frame::Unreachable { node, reason } => {
                self.peer_unreachable(from, node, &reason);
                true
            }
            frame @ (Frame::Policy(_) | Frame::PolicyChunk { .. }) => {
                self.on_policy_frame(from, frame);
                false
            }
            Frame::SwitchModel { model, proof } => {
                let asked_by = self.membership.name_of(from);
                if model.is_empty() || model.len() > MAX_MODEL_NAME_BYTES {
                    tracing::warn!(%asked_by, bytes = model.len(), "a peer asked to switch to a model name of impossible length; ignored");
                    return false;
                }
                let change = trust::switch_change(&model);
                if !self.authorized("a model switch", &change, from, from, proof.as_ref(), false) {
                    return false;
                }
                tracing::info!(%model, %asked_by, "asked to switch models");
                self.switch_here(model);
                true
            }
            Frame::RotateSecret {
                removed,
                secret,
                proof,
            } => {
                self.on_rotation(from, removed, &secret, proof.as_ref());
                true
            }
            Frame::ModelChanged { identity } => {
                self.peer_switched(from, identity);
                true
            }
            Frame::Signal(signal) => self.on_signal(from, signal),
            Frame::FetchModel { name, proof } => {
                let asked_by = self.membership.name_of(from);
                let change = trust::fetch_change(&name);
                if !self.authorized(
                    "a model download",
                    &change,
                    from,
                    from,
                    proof.as_ref(),
                    false,
                ) {
                    return false;
                }
                match self.local.fetch_for_peer(&name) {
                    Some(true) => tracing::info!(model = %name, %asked_by, "fetching model"),
                    Some(false) => {}
                    None => {
                        tracing::warn!(model = %name, %asked_by, "a peer asked for a model this node does not know; is it a newer ringlet?")
                    }
                }
                true
            }
            // Handled by the link itself.
            Frame::Hello(_)
            | Frame::Heartbeat { .. }
            | Frame::HeartbeatAck { .. }
            | Frame::Probe { .. }
            | Frame::Bye { .. }
            | Frame::LinkReplaced => false,
        }
    }

    /// Seniority moved (a node's first plan activated, here or at a peer)
    /// and with it, perhaps, the leader. With no active plan the new one
    /// plans, so nodes that met while each served alone converge on one
    /// plan; an active plan stays until membership changes (re-planning
    /// would only interrupt requests).
    pub(super) fn leader_may_have_changed(&mut self, before: NodeId) {
        let now = self.membership.leader();
        if now != before {
            tracing::info!(leader = %now, "the leader is now {}: it has served the longest", self.membership.name_of(now));
            if self.planning.active().is_none() {
                self.planning.replan_soon();
            }
            // Its plan may have come while another node seemed to lead.
            if let Some(plan) = self.passed_over_plan.take_if(|p| p.leader == now) {
                self.on_plan(plan);
            }
        }
    }

    // -----------------------------------------------------------------------
    // The published view
    // -----------------------------------------------------------------------

    /// Publishes the view if it differs from the one published last.
    fn publish(&self) {
        let view = Parts {
            membership: &self.membership,
            planning: &self.planning,
            policy: &self.policy_sync.status,
            local: &self.local.figures,
            in_flight: self.routing.in_flight(),
            recoveries: self.recoveries.recent(),
            webrtc_failures: &self.signaling.failures,
            kv_capacity_tokens: self.kv_room.borrow().as_ref().map(|r| r.capacity_tokens),
            kv_reserved_tokens: *self.reserved_tokens.borrow()
                + self.membership.reported_kv_reserved_tokens(),
        }
        .build();
        self.view.send_if_modified(|current| {
            let modified = *current != view;
            if modified {
                *current = view;
            }
            modified
        });
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

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
