//! The request path through the cluster: jobs from this node's
//! coordinator, outputs of its stage and frames from peers go to the node
//! holding the next stage; results go back to the request's owner.

use kernels::{SequenceId, ShardInput};
use scheduler::NodeId;

use super::Cluster;
use crate::cluster::protocol::{ForwardFrame, Frame};
use crate::cluster::routing::{self, Route};
use crate::stage::{StageJob, StageOutput, StageResult};

impl Cluster {
    /// A job from this node's coordinator: the first step of a request it
    /// owns, or the release of one.
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
                route: (),
            } => {
                let Some(plan) = self.planning.active() else {
                    let message = format!(
                        "the cluster cannot run requests now: {}",
                        self.view.borrow().not_ready_reason()
                    );
                    self.deliver_to_coordinator(StageResult::Failed { sequence, message });
                    return;
                };
                let route = Route::first(self.me(), plan.message.epoch);
                self.routing.own(sequence);
                self.route(StageJob::Forward {
                    sequence,
                    position,
                    input,
                    sample,
                    route,
                });
            }
        }
    }

    /// An output of this node's stage: hidden states onward, or a result
    /// back to the request's owner.
    pub(super) fn on_stage_output(&mut self, output: StageOutput<Route>) {
        match output {
            StageOutput::Next {
                sequence,
                position,
                hidden,
                sample,
                route,
            } => self.route(StageJob::Forward {
                sequence,
                position,
                input: ShardInput::Hidden(hidden),
                sample,
                route: route.next(),
            }),
            StageOutput::Done { route, result } => self.send_result(route.owner, result),
        }
    }

    /// Sends a forward job to the node holding its stage: this node's own
    /// stage, or a peer over its link.
    pub(super) fn route(&mut self, job: StageJob<Route>) {
        let Some((sequence, route)) = job.forward_route() else {
            return;
        };
        let Some(target) = routing::target(self.planning.plan.as_ref(), route) else {
            self.fail_at_owner(
                route.owner,
                sequence,
                "the cluster re-planned; retry the request",
            );
            return;
        };
        if target == self.me() {
            self.run_on_stage(job);
            return;
        }
        let sent = match routing::forward_frame(job) {
            Ok(frame) => self.membership.send_to(target, frame),
            Err(message) => {
                self.fail_at_owner(route.owner, sequence, message);
                return;
            }
        };
        if !sent {
            // The link is gone (or was closed for falling behind): the node
            // left, though its departure may not have been handled yet.
            let message = format!(
                "node {} ({target}) left the cluster: its link closed while it held stage {}",
                self.membership.name_of(target),
                route.stage
            );
            self.fail_at_owner(route.owner, sequence, message);
        }
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
            self.fail_at_owner(
                route.owner,
                sequence,
                "this node's layers are not loaded for that plan; retry",
            );
            return;
        };
        if stage.jobs.try_send(job).is_err() {
            self.fail_at_owner(route.owner, sequence, "the stage is overloaded");
            return;
        }
        self.routing.host(sequence, route.owner);
    }

    /// A job from a peer: checked, then run on this node's stage.
    pub(super) fn forward_from_peer(&mut self, from: NodeId, forward: ForwardFrame) {
        let (owner, sequence) = (forward.owner, forward.request);
        match routing::forward_job(forward, self.model.config().hidden_size) {
            Ok(job) => self.run_on_stage(job),
            Err(message) => {
                tracing::warn!(peer = %from, %message, "refusing a job");
                self.fail_at_owner(owner, sequence, message);
            }
        }
    }

    /// Fails a request at the node that owns it.
    pub(super) fn fail_at_owner(
        &mut self,
        owner: NodeId,
        sequence: SequenceId,
        message: impl Into<String>,
    ) {
        let message = message.into();
        self.send_result(owner, StageResult::Failed { sequence, message });
    }

    pub(super) fn send_result(&mut self, owner: NodeId, result: StageResult) {
        if owner == self.me() {
            self.deliver_to_coordinator(result);
        } else {
            self.membership.send_to(owner, Frame::from(result));
        }
    }

    pub(super) fn deliver_to_coordinator(&mut self, result: StageResult) {
        let sequence = result.sequence();
        let Some(result) = self.routing.deliver(result) else {
            return; // a late result for a request already ended
        };
        // The channel has room for every request's one result in flight.
        if self.results.try_send(result).is_err() {
            tracing::error!(request = %sequence, "the coordinator's result queue is full; dropping a result");
        }
    }

    pub(super) fn release_on_stage(&mut self, sequence: SequenceId) {
        self.routing.unhost(sequence);
        if let Some(stage) = &self.planning.local_stage {
            let _ = stage.jobs.try_send(StageJob::Release { sequence });
        }
    }

    pub(super) fn fail_owned(&mut self, message: &str) {
        for sequence in self.routing.drain_owned() {
            let _ = self.results.try_send(StageResult::Failed {
                sequence,
                message: message.to_string(),
            });
        }
    }
}
