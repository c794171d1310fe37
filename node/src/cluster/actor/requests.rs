//! The request path through the cluster: jobs from this node's
//! coordinator, outputs of its stage and frames from peers go to the node
//! holding the next stage; results go back to the request's owner. A job
//! that cannot go on because its plan is gone (a stage's node left, a new
//! plan came) interrupts its request at the owner, which replays it on the
//! next plan; only a job that is wrong in itself fails its request.

use kernels::SequenceId;
use scheduler::NodeId;
use tokio::sync::mpsc;

use super::Cluster;
use crate::cluster::hops::HopFailure;
use crate::cluster::protocol::{Epoch, ForwardFrame, Frame};
use crate::cluster::routing::{self, Owned, Route};
use crate::stage::{StageJob, StageOutput, StageResult};

impl Cluster {
    /// A job from this node's coordinator: a step of a request it owns,
    /// or the release of one. A step runs on the active plan if the
    /// request runs there (or starts there: position 0); else the request
    /// waits for the next plan.
    pub(super) fn on_coordinator_job(&mut self, job: StageJob) {
        match job {
            StageJob::Release { sequence } => {
                self.routing.disown(sequence);
                for node in self.planning.stage_nodes() {
                    if node == self.me() {
                        self.release_on_stage(sequence);
                    } else {
                        self.membership
                            .send_to(node, Frame::Release { request: sequence });
                    }
                }
            }
            StageJob::Forward {
                sequence,
                position,
                input,
                sample,
                token_by_token,
                route: (),
                sent_at,
                batch,
            } => {
                let active = self.planning.active().map(|p| p.message.epoch);
                let state = self.routing.owned(sequence);
                let epoch = match (active, state) {
                    // A new request, or one told to feed its history again.
                    (Some(epoch), None | Some(Owned::Resuming { .. })) if position == 0 => epoch,
                    (Some(epoch), Some(Owned::Running(running))) if running == epoch => epoch,
                    // A second start of a history already being fed again
                    // (two plans activated before the coordinator heard of
                    // the first): the same job as the one running.
                    (Some(_), Some(Owned::Running(_))) if position == 0 => return,
                    // A step sent before the coordinator heard that the
                    // request waits for a plan, or is fed again from 0.
                    (_, Some(Owned::Resuming { .. } | Owned::Interrupted { .. })) => return,
                    _ => {
                        self.routing.interrupt(sequence);
                        return;
                    }
                };
                self.routing.run(sequence, epoch);
                self.route(StageJob::Forward {
                    sequence,
                    position,
                    input,
                    sample,
                    token_by_token,
                    route: Route::first(self.me(), epoch),
                    sent_at,
                    batch,
                });
            }
        }
    }

    /// The outputs of one step of this node's stage that the hops left
    /// to the actor (already tagged with their batches): hidden states
    /// onward, results back to the requests' owners.
    pub(super) fn on_stage_outputs(&mut self, outputs: Vec<StageOutput<Route>>) {
        for output in outputs {
            match routing::onward(output) {
                Ok(job) => self.route(job),
                Err((route, result, ready_at)) => self.send_result(route, result, ready_at),
            }
        }
    }

    /// Sends a forward job to the node holding its stage: this node's own
    /// stage, or a peer over its link.
    pub(super) fn route(&mut self, job: StageJob<Route>) {
        let Some((sequence, route)) = job.forward_route() else {
            return;
        };
        let Some(target) = routing::target(self.planning.plan.as_ref(), route) else {
            self.interrupt_at_owner(route, sequence, "the cluster planned anew");
            return;
        };
        if target == self.me() {
            self.run_on_stage(job);
            return;
        }
        let sent = match routing::forward_frame(job) {
            Ok(frame) => self.membership.send_to(target, frame),
            Err(message) => {
                self.fail_at_owner(route, sequence, message);
                return;
            }
        };
        if !sent {
            self.unreachable(route, sequence, target);
        }
    }

    /// The link to `target`, which holds the stage of `route`, is gone (or
    /// was closed for falling behind): the node left, though its departure
    /// may not have been handled yet.
    fn unreachable(&mut self, route: Route, sequence: SequenceId, target: NodeId) {
        let reason = format!(
            "node {} ({target}) left while it held stage {}",
            self.membership.name_of(target),
            route.stage
        );
        self.interrupt_at_owner(route, sequence, &reason);
    }

    /// Hands a job to this node's stage, if the job's route is for it.
    pub(super) fn run_on_stage(&mut self, job: StageJob<Route>) {
        let Some((sequence, route)) = job.forward_route() else {
            return;
        };
        let stage = self
            .planning
            .local_stage
            .as_ref()
            .filter(|s| s.epoch == route.epoch && s.index == route.stage as usize);
        let Some(stage) = stage else {
            let reason = format!(
                "node {} has no stage of plan {} (any more)",
                self.membership.me.name, route.epoch.0
            );
            self.interrupt_at_owner(route, sequence, &reason);
            return;
        };
        let epoch = stage.epoch;
        match stage.jobs.try_send(job) {
            Ok(()) => self.routing.host(sequence, route.owner),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.fail_at_owner(route, sequence, "the stage is overloaded");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                let reason = format!(
                    "the stage thread of node {} stopped",
                    self.membership.me.name
                );
                self.interrupt_at_owner(route, sequence, &reason);
                self.own_stage_lost(epoch, "its stage thread stopped".into());
            }
        }
    }

    /// A job from a peer: checked, then run on this node's stage.
    pub(super) fn forward_from_peer(&mut self, from: NodeId, forward: ForwardFrame) {
        let route = Route {
            owner: forward.owner,
            epoch: forward.epoch,
            stage: forward.stage,
        };
        let sequence = forward.request;
        match routing::forward_job(forward, self.model.config().hidden_size) {
            Ok(job) => self.run_on_stage(job),
            Err(message) => self.refuse_job(from, route, sequence, message),
        }
    }

    /// A job the hops (see [`crate::cluster::hops`]) could not take on.
    pub(super) fn hop_failed(&mut self, route: Route, sequence: SequenceId, failure: HopFailure) {
        match failure {
            HopFailure::Refused { from, message } => {
                self.refuse_job(from, route, sequence, message);
            }
            HopFailure::Unreachable { target } => self.unreachable(route, sequence, target),
        }
    }

    /// A job from `from` is wrong in itself: it fails its request.
    fn refuse_job(&mut self, from: NodeId, route: Route, sequence: SequenceId, message: String) {
        tracing::warn!(peer = %from, %message, "refusing a job");
        self.fail_at_owner(route, sequence, message);
    }

    /// Fails a request at the node that owns it: its job was wrong.
    pub(super) fn fail_at_owner(
        &mut self,
        route: Route,
        sequence: SequenceId,
        message: impl Into<String>,
    ) {
        let message = message.into();
        self.send_result(
            route,
            StageResult::Failed { sequence, message },
            crate::unix_micros(),
        );
    }

    /// Tells a request's owner that its job could not go on under the
    /// plan it ran on: the owner replays it on the next plan.
    fn interrupt_at_owner(&mut self, route: Route, sequence: SequenceId, reason: &str) {
        if route.owner == self.me() {
            self.interrupt_owned(sequence, route.epoch, reason);
        } else {
            self.membership.send_to(
                route.owner,
                Frame::Interrupted {
                    request: sequence,
                    epoch: route.epoch,
                    reason: reason.to_string(),
                },
            );
        }
    }

    /// A request owned here lost its job on plan `epoch` (unless it runs on
    /// another plan by now): it waits for the next plan.
    pub(super) fn interrupt_owned(&mut self, sequence: SequenceId, epoch: Epoch, reason: &str) {
        if self.routing.owned(sequence) == Some(Owned::Running(epoch)) {
            tracing::info!(request = %sequence, epoch = epoch.0, %reason, "a request's step was interrupted; it replays on the next plan");
            self.routing.interrupt(sequence);
        }
    }

    pub(super) fn send_result(&mut self, route: Route, result: StageResult, ready_at: u64) {
        if route.owner == self.me() {
            if matches!(result, StageResult::Token { .. }) {
                // The last stage is here: its hop to the owner is the
                // hand-off to this actor.
                crate::metrics::observe_hop(&crate::metrics::global().hop_to_owner, ready_at);
            }
            self.deliver_to_coordinator(result, route.epoch);
        } else if let Some(frame) = routing::result_frame(result, route.epoch, ready_at) {
            self.membership.send_to(route.owner, frame);
        }
    }

    /// A result of a job of plan `epoch` for a request owned here.
    pub(super) fn deliver_to_coordinator(&mut self, result: StageResult, epoch: Epoch) {
        if let Some(result) = self.routing.deliver(result, epoch) {
            self.hand_to_coordinator(result);
        }
    }

    /// A new plan is active: the coordinator feeds `sequence` again (or,
    /// if its queue is full, the request waits for the next plan).
    pub(super) fn deliver_resume(&mut self, sequence: SequenceId) {
        if !self.hand_to_coordinator(StageResult::Resume { sequence }) {
            self.routing.interrupt(sequence);
        }
    }

    /// Fails a request owned here that is no longer routed (it waited too
    /// long, or its model is gone).
    pub(super) fn deliver_failure(&mut self, sequence: SequenceId, message: String) {
        self.hand_to_coordinator(StageResult::Failed { sequence, message });
    }

    /// False when the coordinator's queue was full (it has room for a
    /// result, two resumptions and a failure of every request it runs).
    fn hand_to_coordinator(&mut self, result: StageResult) -> bool {
        let sequence = result.sequence();
        let sent = self.results.try_send(result).is_ok();
        if !sent {
            tracing::error!(request = %sequence, "the coordinator's result queue is full; dropping a result");
        }
        sent
    }

    pub(super) fn release_on_stage(&mut self, sequence: SequenceId) {
        self.routing.unhost(sequence);
        if let Some(stage) = &self.planning.local_stage {
            let _ = stage.jobs.try_send(StageJob::Release { sequence });
        }
    }

    /// Fails every request owned here: the model they ran on is gone.
    pub(super) fn fail_owned(&mut self, message: &str) {
        for sequence in self.routing.drain_owned() {
            self.deliver_failure(sequence, message.to_string());
        }
    }
}
