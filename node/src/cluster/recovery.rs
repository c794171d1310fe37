//! Recoveries: a node of the plan was lost, the requests on it wait, and
//! the cluster goes on with a new plan. This part only keeps the record:
//! when the loss was noticed, when the new plan was sent and activated,
//! how many requests resumed, and the latest recoveries for the view. The
//! actor does the re-planning and the resuming.

use std::collections::VecDeque;
use std::time::Instant;

use scheduler::NodeId;

use super::protocol::Epoch;
use super::{RecoveryView, view_id};
use crate::limits::RECOVERIES_SHOWN;

/// A loss being recovered from.
struct Loss {
    node: NodeId,
    name: String,
    reason: String,
    noticed: Instant,
    noticed_unix_ms: u64,
    /// Requests of this node interrupted by it (and by later losses
    /// before the recovery ended).
    interrupted: usize,
    /// The epoch and time of the first plan adopted after the loss.
    plan: Option<(Epoch, Instant)>,
}

/// A recovery that ended, for the log.
pub(super) struct Recovered {
    pub view: RecoveryView,
    /// From the loss being noticed to the plan being active.
    pub pause_ms: u64,
}

/// A plan adopted without a loss noticed here that interrupted requests
/// of this node and left nodes of the running plan out: the leader may
/// have re-planned for a loss before this node noticed it.
struct Replan {
    epoch: Epoch,
    adopted: Instant,
    adopted_unix_ms: u64,
    interrupted: usize,
    left_out: Vec<NodeId>,
}

#[derive(Default)]
pub(super) struct Recoveries {
    current: Option<Loss>,
    recent: VecDeque<RecoveryView>,
    /// Requests interrupted by the plan being adopted, with no loss.
    interrupted_by_plan: usize,
    replan: Option<Replan>,
}

impl Recoveries {
    /// A node of the plan was lost; `interrupted` of this node's requests
    /// now wait. A loss during a recovery joins it (one pause).
    pub fn lost(&mut self, node: NodeId, name: String, reason: String, interrupted: usize) {
        match &mut self.current {
            Some(loss) => loss.interrupted += interrupted,
            None => {
                self.current = Some(Loss {
                    node,
                    name,
                    reason,
                    noticed: Instant::now(),
                    noticed_unix_ms: crate::unix_millis(),
                    interrupted,
                    plan: None,
                })
            }
        }
    }

    /// Requests interrupted by a new plan (not a loss) join a recovery
    /// under way; without one they are the cost of a re-plan, not a loss.
    pub fn interrupted(&mut self, count: usize) {
        match &mut self.current {
            Some(loss) => loss.interrupted += count,
            None => self.interrupted_by_plan += count,
        }
    }

    /// A plan was adopted: the first one after a loss is its re-plan.
    /// `left_out`: the nodes of the plan it replaces that it has no stage
    /// for.
    pub fn plan_adopted(&mut self, epoch: Epoch, left_out: Vec<NodeId>) {
        let interrupted = std::mem::take(&mut self.interrupted_by_plan);
        match &mut self.current {
            Some(loss) => {
                loss.plan.get_or_insert((epoch, Instant::now()));
            }
            None if interrupted > 0 && !left_out.is_empty() => {
                self.replan = Some(Replan {
                    epoch,
                    adopted: Instant::now(),
                    adopted_unix_ms: crate::unix_millis(),
                    interrupted,
                    left_out,
                });
            }
            None => self.replan = None,
        }
    }

    /// A node left that the plan being adopted had already left out: the
    /// leader re-planned for its loss before this node noticed it. The
    /// requests that plan interrupted wait for it, as after a loss noticed
    /// here; the pause counts from the plan's adoption. False if the node
    /// was not left out by a re-plan under way.
    pub fn lost_before_noticed(&mut self, node: NodeId, name: String, reason: String) -> bool {
        if self.current.is_some() {
            return false;
        }
        let Some(replan) = self.replan.take_if(|r| r.left_out.contains(&node)) else {
            return false;
        };
        self.current = Some(Loss {
            node,
            name,
            reason,
            noticed: replan.adopted,
            noticed_unix_ms: replan.adopted_unix_ms,
            interrupted: replan.interrupted,
            plan: Some((replan.epoch, replan.adopted)),
        });
        true
    }

    /// Plan `epoch` is active with `stages` (as `name layers`) and
    /// `resumed` requests of this node go on: the recovery under way, if
    /// any, ended.
    pub fn plan_active(
        &mut self,
        epoch: Epoch,
        stages: Vec<String>,
        resumed: usize,
    ) -> Option<Recovered> {
        self.replan = None;
        let loss = self.current.take()?;
        let now = Instant::now();
        let (replan, load) = match loss.plan {
            Some((_, adopted)) => (adopted - loss.noticed, now - adopted),
            None => (now - loss.noticed, std::time::Duration::ZERO),
        };
        let view = RecoveryView {
            lost_node: view_id(loss.node),
            lost_name: loss.name,
            reason: loss.reason,
            at_unix_ms: loss.noticed_unix_ms,
            outcome: "resumed".into(),
            plan_epoch: Some(epoch.0),
            plan: stages,
            resumed_requests: u32::try_from(resumed.max(loss.interrupted)).unwrap_or(u32::MAX),
            replan_ms: millis(replan),
            load_ms: millis(load),
            error: None,
        };
        self.remember(view.clone());
        Some(Recovered {
            view,
            pause_ms: millis(now - loss.noticed),
        })
    }

    /// Requests waited longer than allowed and failed with `error`; the
    /// recovery under way ends as failed (a later plan starts afresh).
    pub fn failed(&mut self, failed: usize, error: String) {
        let Some(loss) = self.current.take() else {
            return;
        };
        let waited = millis(loss.noticed.elapsed());
        self.remember(RecoveryView {
            lost_node: view_id(loss.node),
            lost_name: loss.name,
            reason: loss.reason,
            at_unix_ms: loss.noticed_unix_ms,
            outcome: "failed".into(),
            plan_epoch: None,
            plan: Vec::new(),
            resumed_requests: 0,
            replan_ms: waited,
            load_ms: 0,
            error: Some(format!("{failed} requests failed: {error}")),
        });
    }

    /// The loss being recovered from, as `name (id): reason`.
    pub fn describe_current(&self) -> Option<String> {
        self.current.as_ref().map(|loss| {
            format!(
                "node {} ({}) was lost: {}",
                loss.name, loss.node, loss.reason
            )
        })
    }

    pub fn recent(&self) -> Vec<RecoveryView> {
        self.recent.iter().cloned().collect()
    }

    fn remember(&mut self, view: RecoveryView) {
        if self.recent.len() == RECOVERIES_SHOWN {
            self.recent.pop_front();
        }
        self.recent.push_back(view);
    }
}

fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loss_ends_in_the_plan_after_it_and_is_remembered() {
        let mut recoveries = Recoveries::default();
        assert!(
            recoveries.plan_active(Epoch(1), vec![], 0).is_none(),
            "no loss: a first plan is no recovery"
        );
        recoveries.lost(NodeId(7), "b".into(), "its link closed".into(), 2);
        recoveries.lost(NodeId(8), "c".into(), "fell silent".into(), 1);
        assert!(
            recoveries
                .describe_current()
                .is_some_and(|d| d.contains("node b"))
        );
        recoveries.plan_adopted(Epoch(5), Vec::new());
        recoveries.plan_adopted(Epoch(6), Vec::new());
        let done = recoveries
            .plan_active(Epoch(6), vec!["a 0..30".into()], 3)
            .expect("recovered");
        assert_eq!(done.view.lost_name, "b");
        assert_eq!(done.view.resumed_requests, 3);
        assert_eq!(done.view.plan_epoch, Some(6));
        assert!(recoveries.describe_current().is_none());
        for i in 0..RECOVERIES_SHOWN + 2 {
            recoveries.lost(NodeId(i as u64), "x".into(), "gone".into(), 0);
            recoveries.failed(1, "no plan".into());
        }
        let recent = recoveries.recent();
        assert_eq!(recent.len(), RECOVERIES_SHOWN, "bounded");
        assert_eq!(recent.last().map(|r| r.outcome.as_str()), Some("failed"));
    }

    #[test]
    fn a_loss_the_leader_re_planned_for_first_is_still_this_node_s_recovery() {
        let mut recoveries = Recoveries::default();
        // The leader's plan 3 leaves node 7 out and interrupts 1 request
        // here; then node 7's link closes here.
        recoveries.interrupted(1);
        recoveries.plan_adopted(Epoch(3), vec![NodeId(7)]);
        assert!(
            !recoveries.lost_before_noticed(NodeId(8), "c".into(), "gone".into()),
            "node 8 was not left out: its leaving explains nothing"
        );
        assert!(recoveries.lost_before_noticed(NodeId(7), "a".into(), "closed".into()));
        let done = recoveries
            .plan_active(Epoch(3), vec!["b 0..30".into()], 1)
            .expect("recovered");
        assert_eq!(done.view.lost_name, "a");
        assert_eq!(done.view.resumed_requests, 1);

        // A plan that interrupts requests for no loss (a node joined) is
        // no recovery, and a node leaving after it is active explains none.
        recoveries.interrupted(2);
        recoveries.plan_adopted(Epoch(4), Vec::new());
        assert!(recoveries.plan_active(Epoch(4), vec![], 2).is_none());
        recoveries.interrupted(1);
        recoveries.plan_adopted(Epoch(5), vec![NodeId(9)]);
        assert!(recoveries.plan_active(Epoch(5), vec![], 1).is_none());
        assert!(!recoveries.lost_before_noticed(NodeId(9), "d".into(), "gone".into()));
    }
}
