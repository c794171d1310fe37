//! The planning transitions: the leader asks the policy for a placement,
//! every node follows the plan, loads its layers, starts its stage and
//! reports ready, and the leader activates the plan.

use std::sync::Arc;

use scheduler::NodeId;
use tokio::sync::mpsc;

use super::Cluster;
use crate::cluster::ClusterEvent;
use crate::cluster::planning::{LocalStage, PlanCheck, Ready};
use crate::cluster::protocol::{Epoch, Frame, PlanMessage};
use crate::limits::STAGE_QUEUE_LEN;
use crate::loaded_model::{SliceFetch, load_layers};
use crate::policy::Placed;
use crate::stage;

impl Cluster {
    /// The re-plan timer fired: the leader asks the policy for a placement,
    /// whose answer comes back as [`ClusterEvent::Placed`].
    pub(super) fn replan_due(&mut self) {
        let leader = self.membership.leader() == self.me();
        // A new plan interrupts the requests running on the active one
        // (they pause and replay), so it waits for them a while; with no
        // active plan, nothing runs that it could interrupt.
        let running = self.planning.active().is_some()
            && (self.routing.owns_running()
                || self.routing.in_flight() > 0
                || self.membership.peers_busy());
        let Some(generation) = self.planning.placement_due(leader, running) else {
            return;
        };
        let cluster = self.membership.policy_cluster();
        let model = self.policy_model.clone();
        let policy = self.policy.clone();
        let current = self.policy_sync.status.policy.clone();
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

    pub(super) fn on_placed(&mut self, generation: u64, placed: Placed) {
        let me = self.me();
        if self.membership.leader() != me {
            return; // membership changed meanwhile; the new leader plans
        }
        let policy_name = placed.policy.name.clone();
        let membership = &self.membership;
        let Some(message) =
            self.planning
                .placed(generation, me, &membership.me.identity, placed, |node| {
                    membership.address_of(node)
                })
        else {
            return;
        };
        let stages = self.stage_names(&message);
        tracing::info!(epoch = message.epoch.0, policy = %policy_name, stages = %stages.join(", "), "new plan");
        self.membership.broadcast(&Frame::Plan(message.clone()));
        self.on_plan(message);
    }

    /// Follows a plan from the leader (or made here): the requests on the
    /// old one wait for it (to be fed again), its stage goes, and this
    /// node loads its layers (if it has any) while linking to every stage
    /// node.
    pub(super) fn on_plan(&mut self, message: PlanMessage) {
        let (me, leader, epoch) = (self.me(), message.leader, message.epoch);
        match self.planning.check(&message, &self.membership.me.identity) {
            PlanCheck::Adopt => {}
            PlanCheck::Stale { highest } => {
                // Another node led earlier with higher epochs; the leader's
                // next plan must be newer than anything followed here.
                self.tell_leader(leader, Frame::PlanStale { epoch, highest });
                return;
            }
            PlanCheck::WrongModel(error) => {
                tracing::error!("{error}");
                self.tell_leader(
                    leader,
                    Frame::PlanFailed {
                        epoch,
                        node: me,
                        error,
                    },
                );
                return;
            }
        }
        self.membership
            .remember(message.stages.iter().map(|s| (s.node, s.address.clone())));
        for stage in &message.stages {
            // The leader is linked to every stage: it relays signals.
            self.signaling
                .told(stage.node, stage.address.clone(), message.leader);
        }
        self.redial();
        let interrupted = self.routing.interrupt_running();
        if interrupted > 0 {
            tracing::info!(
                epoch = epoch.0,
                interrupted,
                "a new plan: {interrupted} requests of this node pause until it is active, then replay"
            );
            self.recoveries.interrupted(interrupted);
        }
        let left_out = self
            .planning
            .plan
            .as_ref()
            .map_or_else(Vec::new, |running| {
                running
                    .message
                    .stages
                    .iter()
                    .map(|s| s.node)
                    .filter(|node| !message.stages.iter().any(|s| s.node == *node))
                    .collect()
            });
        self.recoveries.plan_adopted(epoch, left_out);
        self.routing.clear_hosted();
        match self.planning.adopt(message, me) {
            Some(layers) => {
                tracing::info!(epoch = epoch.0, %layers, "loading layers for the new plan");
                let model = Arc::clone(&self.model);
                let device = self.device.clone();
                let events = self.events_tx.clone();
                let fetch = self.hub_files.clone().map(|files| SliceFetch {
                    files,
                    name: self.membership.me.identity.name.clone(),
                    downloads: self.downloads.clone(),
                    peers: self.membership.peer_addresses(),
                });
                let loading = tokio::spawn(async move {
                    let result = load_layers(model, layers, device, fetch).await;
                    let _ = events
                        .send(ClusterEvent::ShardLoaded { epoch, result })
                        .await;
                });
                self.stop_loading();
                self.loading = Some(loading.abort_handle());
            }
            None => self.report_ready(epoch, 0),
        }
    }

    /// This node's layers for plan `epoch` loaded (or failed): start its
    /// stage thread and tell the leader.
    pub(super) fn shard_loaded(&mut self, epoch: Epoch, result: Result<kernels::Shard, String>) {
        let me = self.me();
        let Some((index, leader)) = self.planning.loaded_for(epoch, me) else {
            return; // a newer plan replaced it while it loaded
        };
        let failed = |error: String| Frame::PlanFailed {
            epoch,
            node: me,
            error,
        };
        let shard = match result {
            Ok(shard) => shard,
            Err(error) => {
                tracing::error!(%error, "cannot load this node's layers");
                self.planning.error = Some(format!("this node cannot load its layers: {error}"));
                self.tell_leader(leader, failed(error));
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
        let (jobs, jobs_rx) = mpsc::channel(STAGE_QUEUE_LEN);
        let events = self.events_tx.clone();
        let hops = Arc::clone(&self.hops);
        // As many micro-batches as the ring has stages, so that each has one.
        let stages = self
            .planning
            .plan
            .as_ref()
            .map_or(1, |p| p.message.stages.len());
        let spawned = stage::spawn(
            shard,
            Arc::clone(&self.grammars),
            jobs_rx,
            stages,
            self.stage_fault,
            move |outputs| hops.emit(outputs, &events),
        );
        let progress = match spawned {
            Ok(spawned) => spawned.progress,
            Err(error) => {
                self.tell_leader(
                    leader,
                    failed(format!("cannot start the stage thread: {error}")),
                );
                return;
            }
        };
        self.planning.local_stage = Some(LocalStage {
            epoch,
            index,
            jobs,
            weight_bytes,
            progress,
        });
        self.report_ready(epoch, weight_bytes);
    }

    /// Tells the leader this node is ready for plan `epoch`, once it is
    /// linked to every stage node.
    pub(super) fn report_ready(&mut self, epoch: Epoch, weight_bytes: u64) {
        let membership = &self.membership;
        let ready = self.planning.ready(epoch, weight_bytes, |stages| {
            membership.linked_to_all(stages.iter().map(|s| s.node))
        });
        if let Some(Ready {
            leader,
            epoch,
            weight_bytes,
        }) = ready
        {
            let node = self.me();
            self.tell_leader(
                leader,
                Frame::PlanReady {
                    epoch,
                    node,
                    weight_bytes,
                },
            );
        }
    }

    /// A plan's stages as `name layers`, for the log and the view.
    fn stage_names(&self, message: &PlanMessage) -> Vec<String> {
        message
            .stages
            .iter()
            .map(|s| format!("{} {}", self.membership.name_of(s.node), s.layers))
            .collect()
    }

    /// Sends a frame about a plan to its leader, which may be this node.
    pub(super) fn tell_leader(&mut self, leader: NodeId, frame: Frame) {
        if leader == self.me() {
            self.on_frame(leader, frame);
        } else {
            self.membership.send_to(leader, frame);
        }
    }

    /// Leader: a node is ready; once all are, the plan is active.
    pub(super) fn on_ready(&mut self, epoch: Epoch, node: NodeId, weight_bytes: u64) {
        let me = self.me();
        if let Some(weights) = self.planning.node_ready(epoch, node, weight_bytes, me) {
            let since_ms = crate::unix_millis();
            self.membership.broadcast(&Frame::PlanActive {
                epoch,
                weights: weights.clone(),
                since_ms,
            });
            self.on_active(me, epoch, weights, since_ms);
        }
    }

    /// `leader` says plan `epoch` is active.
    pub(super) fn on_active(
        &mut self,
        leader: NodeId,
        epoch: Epoch,
        weights: Vec<(NodeId, u64)>,
        since_ms: u64,
    ) {
        if let Some(stages) = self.planning.activate(epoch, leader, weights) {
            // The requests that waited for a plan go on: their coordinator
            // feeds each one's history again.
            let resumed = self.routing.resume_interrupted();
            for sequence in &resumed {
                self.deliver_resume(*sequence);
            }
            let plan = self
                .planning
                .plan
                .as_ref()
                .map(|p| self.stage_names(&p.message))
                .unwrap_or_default();
            if let Some(recovered) = self.recoveries.plan_active(epoch, plan, resumed.len()) {
                let view = &recovered.view;
                tracing::warn!(
                    lost = %view.lost_name,
                    epoch = epoch.0,
                    plan = %view.plan.join(", "),
                    resumed = resumed.len(),
                    pause_ms = recovered.pause_ms,
                    replan_ms = view.replan_ms,
                    load_ms = view.load_ms,
                    "recovered from the loss of node {}: plan {} ({}) is active, {} requests of this node resume after a pause of {} ms (re-plan {} ms, layer load {} ms) and replay their history",
                    view.lost_name,
                    epoch.0,
                    view.plan.join(", "),
                    resumed.len(),
                    recovered.pause_ms,
                    view.replan_ms,
                    view.load_ms
                );
            } else if !resumed.is_empty() {
                tracing::info!(
                    epoch = epoch.0,
                    resumed = resumed.len(),
                    "{} requests of this node resume on plan {}",
                    resumed.len(),
                    epoch.0
                );
            }
            // Seniority: the first plan this node serves in dates it.
            let leader_before = self.membership.leader();
            self.membership.serving_in_plan(since_ms);
            self.leader_may_have_changed(leader_before);
            // Publish before announcing it: whoever reacts to the log line
            // must find the plan active.
            self.track_load();
            self.publish();
            tracing::info!(epoch = epoch.0, stages, "plan active: {stages} stages");
        }
    }
}
