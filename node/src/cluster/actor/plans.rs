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
        let running =
            self.routing.owns_any() || self.routing.in_flight() > 0 || self.membership.peers_busy();
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
        let stages: Vec<String> = message
            .stages
            .iter()
            .map(|s| format!("{} {}", self.membership.name_of(s.node), s.layers))
            .collect();
        tracing::info!(epoch = message.epoch.0, policy = %policy_name, stages = %stages.join(", "), "new plan");
        self.membership.broadcast(&Frame::Plan(message.clone()));
        self.on_plan(message);
    }

    /// Follows a plan from the leader (or made here): the requests on the
    /// old one fail, its stage goes, and this node loads its layers (if it
    /// has any) while linking to every stage node.
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
        self.redial();
        self.fail_owned("the cluster re-planned; retry the request");
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
        let spawned = stage::spawn(shard, jobs_rx, move |output| {
            events
                .blocking_send(ClusterEvent::FromStage(output))
                .is_ok()
        });
        if let Err(error) = spawned {
            self.tell_leader(
                leader,
                failed(format!("cannot start the stage thread: {error}")),
            );
            return;
        }
        self.planning.local_stage = Some(LocalStage {
            epoch,
            index,
            jobs,
            weight_bytes,
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
            self.on_active(epoch, weights, since_ms);
        }
    }

    pub(super) fn on_active(&mut self, epoch: Epoch, weights: Vec<(NodeId, u64)>, since_ms: u64) {
        if let Some(stages) = self.planning.activate(epoch, weights) {
            // Seniority: the first plan this node serves in dates it.
            let leader = self.membership.leader();
            self.membership.serving_in_plan(since_ms);
            self.leader_may_have_changed(leader);
            // Publish before announcing it: whoever reacts to the log line
            // must find the plan active.
            self.track_load();
            self.publish();
            tracing::info!(epoch = epoch.0, stages, "plan active: {stages} stages");
        }
    }
}
