//! Planning: the plan being loaded or in use, plan epochs, when the leader
//! asks the policy for a placement again, and the lifecycle of this node's
//! own stage under the plan. It decides; the actor sends the frames and
//! starts the loads.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kernels::LayerRange;
use scheduler::NodeId;
use tokio::sync::mpsc;

use super::protocol::{Epoch, ModelIdentity, PlanMessage, PlanStage};
use super::routing::Route;
use crate::limits::{PLAN_SETTLE_MS, POLICY_RETRY_MS, REPLAN_DEFER_MAX_MS, REPLAN_RECHECK_MS};
use crate::policy::{Placed, PolicyError};
use crate::stage::StageJob;

/// The plan being loaded or in use.
pub(super) struct CurrentPlan {
    pub message: PlanMessage,
    /// Weight bytes each stage's node reported after loading.
    pub ready: HashMap<NodeId, u64>,
    pub active: bool,
}

impl CurrentPlan {
    /// The index and layers of `node`'s stage.
    pub fn stage_of(&self, node: NodeId) -> Option<(usize, LayerRange)> {
        self.message
            .stages
            .iter()
            .enumerate()
            .find(|(_, s)| s.node == node)
            .map(|(i, s)| (i, s.layers))
    }
}

/// This node's stage: a thread running its shard for one plan.
pub(super) struct LocalStage {
    pub epoch: Epoch,
    pub index: usize,
    pub jobs: mpsc::Sender<StageJob<Route>>,
    pub weight_bytes: u64,
    /// How its thread is doing, for the watchdog.
    pub progress: std::sync::Arc<crate::stage::StageProgress>,
}

/// What to do with a plan from the leader.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PlanCheck {
    Adopt,
    /// Its epoch is not newer than one followed here: the leader must plan
    /// past `highest`.
    Stale {
        highest: Epoch,
    },
    /// It is for another model file; this node cannot take part.
    WrongModel(String),
}

/// Tells the leader this node is ready for a plan.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Ready {
    pub leader: NodeId,
    pub epoch: Epoch,
    pub weight_bytes: u64,
}

pub(super) struct Planning {
    pub plan: Option<CurrentPlan>,
    highest_epoch: Epoch,
    /// Why there is no usable plan, when there is none.
    pub error: Option<String>,
    /// When the leader should (re)plan, after membership settles.
    pub replan_at: Option<Instant>,
    /// Since when a wanted re-plan waits for running requests to finish.
    replan_waiting_since: Option<Instant>,
    /// Numbers placements; an answer for an older one is dropped.
    placement: u64,
    /// This node's layers for the current plan are loaded (with these
    /// weight bytes) but a link to some stage node is still missing.
    ready_pending: Option<(Epoch, u64)>,
    pub local_stage: Option<LocalStage>,
}

impl Planning {
    pub fn new() -> Self {
        Self {
            plan: None,
            highest_epoch: Epoch(0),
            error: None,
            replan_at: Some(Instant::now()),
            replan_waiting_since: None,
            placement: 0,
            ready_pending: None,
            local_stage: None,
        }
    }

    /// The plan requests can run on now.
    pub fn active(&self) -> Option<&CurrentPlan> {
        self.plan.as_ref().filter(|p| p.active)
    }

    /// Membership or the policy changed: plan again once things settle; a
    /// placement under way is for the old state.
    pub fn replan_soon(&mut self) {
        self.replan_at = Some(Instant::now() + Duration::from_millis(PLAN_SETTLE_MS));
        self.placement += 1;
    }

    /// A node of the plan was lost: plan at once (no settling: the plan
    /// is broken and requests wait for the next one).
    pub fn replan_now(&mut self) {
        self.replan_at = Some(Instant::now());
        self.placement += 1;
    }

    /// A plan was adopted and is loading, without a failure so far.
    pub fn loading(&self) -> bool {
        self.plan.as_ref().is_some_and(|p| !p.active) && self.error.is_none()
    }

    /// The re-plan timer fired: the generation of a placement to ask the
    /// policy for, or `None` (not the leader, or waiting for the running
    /// requests to finish, since a new plan fails them).
    pub fn placement_due(&mut self, leader: bool, requests_running: bool) -> Option<u64> {
        self.replan_at = None;
        if !leader {
            self.replan_waiting_since = None;
            return None;
        }
        if requests_running {
            if self.replan_waiting_since.is_none() {
                tracing::info!("re-planning once the running requests finish");
            }
            let since = *self.replan_waiting_since.get_or_insert_with(Instant::now);
            if since.elapsed() < Duration::from_millis(REPLAN_DEFER_MAX_MS) {
                self.replan_at = Some(Instant::now() + Duration::from_millis(REPLAN_RECHECK_MS));
                return None;
            }
            tracing::warn!(
                "re-planning although requests still run after {} s; they fail and can be retried",
                REPLAN_DEFER_MAX_MS / 1000
            );
        }
        self.replan_waiting_since = None;
        self.placement += 1;
        Some(self.placement)
    }

    /// The policy answered placement `generation`: the plan to send out,
    /// unless the answer is stale, a refusal, or the plan in force again.
    pub fn placed(
        &mut self,
        generation: u64,
        leader: NodeId,
        identity: &ModelIdentity,
        placed: Placed,
        address_of: impl Fn(NodeId) -> String,
    ) -> Option<PlanMessage> {
        if generation != self.placement {
            return None; // membership changed meanwhile; a newer placement follows
        }
        let plan = match placed.result {
            Ok(plan) => plan,
            Err(error) => {
                let message = format!(
                    "cannot place model {} (policy {}): {error}",
                    identity.name, placed.policy.name
                );
                if self.error.as_deref() != Some(&message) {
                    tracing::error!("{message}");
                }
                self.error = Some(message);
                if matches!(error, PolicyError::Busy | PolicyError::Stopped) {
                    // Not the policy's answer: ask again shortly.
                    self.replan_at = Some(Instant::now() + Duration::from_millis(POLICY_RETRY_MS));
                }
                return None;
            }
        };
        let stages: Vec<PlanStage> = plan
            .stages
            .iter()
            .map(|s| PlanStage {
                node: NodeId(s.node),
                address: address_of(NodeId(s.node)),
                layers: LayerRange::new(s.start as usize, s.end as usize),
            })
            .collect();
        // The same stages again change nothing, whether the plan is active
        // or still loading (unless it failed: then it is tried again).
        let unchanged = self
            .plan
            .as_ref()
            .is_some_and(|p| p.message.stages == stages && (p.active || self.error.is_none()));
        if unchanged {
            self.error = None;
            return None;
        }
        Some(PlanMessage {
            epoch: Epoch(self.highest_epoch.0 + 1),
            leader,
            model: identity.clone(),
            stages,
        })
    }

    /// Whether this node can follow `message`. A plan it cannot follow
    /// changes nothing here, not even the epoch: the real leader's next
    /// plan must still be taken.
    pub fn check(&self, message: &PlanMessage, identity: &ModelIdentity) -> PlanCheck {
        if message.epoch <= self.highest_epoch {
            return PlanCheck::Stale {
                highest: self.highest_epoch,
            };
        }
        if message.model.fingerprint != identity.fingerprint {
            return PlanCheck::WrongModel(format!(
                "this node serves {} ({}), the plan is for {} ({}); it cannot take part",
                identity.name, identity.fingerprint, message.model.name, message.model.fingerprint
            ));
        }
        PlanCheck::Adopt
    }

    /// Follows a checked plan: the old stage goes (dropping its job sender
    /// stops its thread); returns this node's layers in it, if any.
    pub fn adopt(&mut self, message: PlanMessage, me: NodeId) -> Option<LayerRange> {
        self.highest_epoch = message.epoch;
        self.ready_pending = None;
        self.local_stage = None;
        self.error = None;
        let plan = CurrentPlan {
            message,
            ready: HashMap::new(),
            active: false,
        };
        let mine = plan.stage_of(me).map(|(_, layers)| layers);
        self.plan = Some(plan);
        mine
    }

    /// The leader hears its plan `epoch` was stale: plan again past
    /// `highest`.
    pub fn stale(&mut self, epoch: Epoch, highest: Epoch, me: NodeId) -> bool {
        let ours = self
            .plan
            .as_ref()
            .is_some_and(|p| p.message.epoch == epoch && p.message.leader == me);
        if ours {
            self.highest_epoch = self.highest_epoch.max(highest);
            self.plan = None;
            self.replan_soon();
        }
        ours
    }

    /// This node's layers for `epoch` finished loading: its stage index and
    /// the plan's leader, unless a newer plan replaced it meanwhile.
    pub fn loaded_for(&self, epoch: Epoch, me: NodeId) -> Option<(usize, NodeId)> {
        let plan = self.plan.as_ref().filter(|p| p.message.epoch == epoch)?;
        let (index, _) = plan.stage_of(me)?;
        Some((index, plan.message.leader))
    }

    /// This node is ready for plan `epoch` once it is linked to every stage
    /// node (so activations and tokens can reach them): the report to make,
    /// or `None` while a link is missing (the report waits for it).
    pub fn ready(
        &mut self,
        epoch: Epoch,
        weight_bytes: u64,
        linked_to: impl Fn(&[PlanStage]) -> bool,
    ) -> Option<Ready> {
        let plan = self.plan.as_ref().filter(|p| p.message.epoch == epoch)?;
        if !linked_to(&plan.message.stages) {
            self.ready_pending = Some((epoch, weight_bytes));
            return None;
        }
        self.ready_pending = None;
        Some(Ready {
            leader: plan.message.leader,
            epoch,
            weight_bytes,
        })
    }

    /// A report that waited for a link, to try again now that links changed.
    pub fn pending_ready(&self) -> Option<(Epoch, u64)> {
        self.ready_pending
    }

    /// Leader: `node` is ready for `epoch`; the weights of every stage once
    /// all are, to activate the plan.
    pub fn node_ready(
        &mut self,
        epoch: Epoch,
        node: NodeId,
        weight_bytes: u64,
        me: NodeId,
    ) -> Option<Vec<(NodeId, u64)>> {
        let plan = self.plan.as_mut()?;
        if plan.message.epoch != epoch || plan.message.leader != me || plan.stage_of(node).is_none()
        {
            return None;
        }
        plan.ready.insert(node, weight_bytes);
        let all = plan
            .message
            .stages
            .iter()
            .all(|s| plan.ready.contains_key(&s.node));
        all.then(|| plan.ready.iter().map(|(n, b)| (*n, *b)).collect())
    }

    /// Plan `epoch` is active everywhere, says `leader`: its number of
    /// stages, if it is the plan here and `leader` leads it. Another node
    /// may have a plan of the same number (one that leads itself alone,
    /// such as a node with another model file), and its word is not ours.
    pub fn activate(
        &mut self,
        epoch: Epoch,
        leader: NodeId,
        weights: Vec<(NodeId, u64)>,
    ) -> Option<usize> {
        let plan = self
            .plan
            .as_mut()
            .filter(|p| p.message.epoch == epoch && p.message.leader == leader)?;
        plan.ready.extend(weights);
        plan.active = true;
        self.error = None;
        Some(plan.message.stages.len())
    }

    /// A node of the plan left: requests cannot run on it any more.
    pub fn lost_stage(&mut self, error: String) {
        if let Some(plan) = &mut self.plan {
            plan.active = false;
        }
        self.error = Some(error);
    }

    /// The cluster switched models: the plan and this node's stage are of
    /// the old one. The next plan's epoch is still past every old one.
    pub fn forget_plan(&mut self, reason: String) {
        self.plan = None;
        self.local_stage = None;
        self.ready_pending = None;
        self.error = Some(reason);
        self.replan_soon();
    }

    /// Whether `node` holds a stage of the current plan.
    pub fn in_plan(&self, node: NodeId) -> bool {
        self.plan
            .as_ref()
            .is_some_and(|p| p.stage_of(node).is_some())
    }

    /// The nodes of the current plan's stages, in ring order.
    pub fn stage_nodes(&self) -> Vec<NodeId> {
        self.plan
            .as_ref()
            .map(|p| p.message.stages.iter().map(|s| s.node).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Plan, PolicySource, PolicyView, Stage};

    fn identity(fingerprint: &str) -> ModelIdentity {
        ModelIdentity {
            name: "m".into(),
            fingerprint: fingerprint.into(),
        }
    }

    fn plan(epoch: u64, leader: u64, stages: &[(u64, usize, usize)]) -> PlanMessage {
        PlanMessage {
            epoch: Epoch(epoch),
            leader: NodeId(leader),
            model: identity("sha256:a"),
            stages: stages
                .iter()
                .map(|&(node, start, end)| PlanStage {
                    node: NodeId(node),
                    address: format!("10.0.0.{node}:52415"),
                    layers: LayerRange::new(start, end),
                })
                .collect(),
        }
    }

    fn placed(stages: &[(u64, u32, u32)]) -> Placed {
        Placed {
            result: Ok(Plan {
                stages: stages
                    .iter()
                    .map(|&(node, start, end)| Stage { node, start, end })
                    .collect(),
            }),
            policy: PolicyView {
                name: "test".into(),
                version: "1".into(),
                sha256: String::new(),
                source: PolicySource::BuiltIn,
                size_bytes: 0,
            },
        }
    }

    #[test]
    fn plans_are_followed_only_with_newer_epochs_and_the_same_file() {
        let mut planning = Planning::new();
        let first = plan(3, 1, &[(1, 0, 10), (2, 10, 30)]);
        assert_eq!(
            planning.check(&first, &identity("sha256:a")),
            PlanCheck::Adopt
        );
        assert!(matches!(
            planning.check(&first, &identity("sha256:b")),
            PlanCheck::WrongModel(_)
        ));
        assert_eq!(
            planning.adopt(first.clone(), NodeId(2)),
            Some(LayerRange::new(10, 30))
        );
        assert_eq!(
            planning.check(&first, &identity("sha256:a")),
            PlanCheck::Stale { highest: Epoch(3) }
        );
        let older = plan(2, 0, &[(0, 0, 30)]);
        assert_eq!(
            planning.check(&older, &identity("sha256:a")),
            PlanCheck::Stale { highest: Epoch(3) }
        );
        // The leader of a stale plan plans past the highest epoch.
        let mut leader = Planning::new();
        leader.adopt(older, NodeId(0));
        assert!(leader.stale(Epoch(2), Epoch(3), NodeId(0)));
        assert!(leader.plan.is_none());
        let next = leader
            .placed(
                leader.placement,
                NodeId(0),
                &identity("sha256:a"),
                placed(&[(0, 0, 30)]),
                |_| String::new(),
            )
            .expect("a new plan");
        assert_eq!(next.epoch, Epoch(4));
    }

    #[test]
    fn a_plan_activates_once_every_stage_is_ready() {
        let me = NodeId(1);
        let mut planning = Planning::new();
        planning.adopt(plan(1, 1, &[(1, 0, 10), (2, 10, 30)]), me);
        assert!(planning.active().is_none());
        assert_eq!(planning.node_ready(Epoch(1), NodeId(1), 5, me), None);
        assert_eq!(
            planning.node_ready(Epoch(0), NodeId(2), 7, me),
            None,
            "old epoch"
        );
        assert_eq!(
            planning.node_ready(Epoch(1), NodeId(3), 9, me),
            None,
            "not a stage of the plan"
        );
        let weights = planning
            .node_ready(Epoch(1), NodeId(2), 7, me)
            .expect("all ready");
        assert!(!weights.iter().any(|(node, _)| *node == NodeId(3)));
        // Another node's plan of the same number (it leads only itself)
        // does not activate this one.
        assert_eq!(
            planning.activate(Epoch(1), NodeId(3), weights.clone()),
            None
        );
        assert!(planning.active().is_none());
        assert_eq!(planning.activate(Epoch(1), me, weights), Some(2));
        assert!(planning.active().is_some());
        planning.lost_stage("node 2 left".into());
        assert!(planning.active().is_none());
        assert!(planning.in_plan(NodeId(2)));
    }

    #[test]
    fn readiness_waits_for_links_to_every_stage() {
        let mut planning = Planning::new();
        planning.adopt(plan(1, 9, &[(1, 0, 10), (9, 10, 30)]), NodeId(1));
        assert_eq!(planning.ready(Epoch(1), 42, |_| false), None);
        assert_eq!(planning.pending_ready(), Some((Epoch(1), 42)));
        assert_eq!(
            planning.ready(Epoch(1), 42, |_| true),
            Some(Ready {
                leader: NodeId(9),
                epoch: Epoch(1),
                weight_bytes: 42
            })
        );
        assert_eq!(planning.pending_ready(), None);
        assert_eq!(
            planning.ready(Epoch(2), 42, |_| true),
            None,
            "not this plan"
        );
    }

    #[test]
    fn stale_placements_and_unchanged_plans_send_nothing() {
        let mut planning = Planning::new();
        let generation = planning
            .placement_due(true, false)
            .expect("the leader places");
        planning.replan_soon();
        let answer = planning.placed(
            generation,
            NodeId(1),
            &identity("sha256:a"),
            placed(&[(1, 0, 30)]),
            |_| String::new(),
        );
        assert!(answer.is_none(), "membership changed meanwhile");
        assert_eq!(planning.placement_due(false, false), None, "not the leader");
        let generation = planning.placement_due(true, false).expect("places");
        let message = planning
            .placed(
                generation,
                NodeId(1),
                &identity("sha256:a"),
                placed(&[(1, 0, 30)]),
                |_| String::new(),
            )
            .expect("a plan");
        planning.adopt(message, NodeId(1));
        let again = planning.placed(
            generation,
            NodeId(1),
            &identity("sha256:a"),
            placed(&[(1, 0, 30)]),
            |_| String::new(),
        );
        assert!(again.is_none(), "the same stages change nothing");
    }
}
