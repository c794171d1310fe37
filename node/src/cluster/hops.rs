//! The hops of a decode step between nodes, taken without the cluster
//! actor: a stage's outputs for a peer go from the stage thread straight
//! onto that peer's link, and a link's reader hands a job for this node's
//! stage straight to the stage's queue.
//!
//! Why: every hand-off between threads costs a wake-up, tens to hundreds
//! of microseconds on a loaded host. Through the actor a hop between two
//! stages took four (stage → actor → link writer; link reader → actor →
//! stage); this way it takes two, and the actor, which also plans,
//! measures and publishes the view, is not woken by each token's frames.
//!
//! The actor still owns every decision: it publishes a [`HopTable`], a
//! snapshot of what the hops read (the plan followed, this node's stage,
//! the links to the plan's nodes), each time it handles anything but a
//! request's frames. What the table cannot settle goes the actor's way,
//! as before: a request's first job at this stage (position 0, which the
//! actor records as hosted here), a token for a request owned here, a job
//! for another plan or stage, a stage queue that is full or closed, and a
//! job that cannot be sent or read.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use scheduler::NodeId;
use tokio::sync::mpsc;

use super::ClusterEvent;
use super::link::LinkSender;
use super::protocol::{Epoch, ForwardFrame, Frame};
use super::routing::{self, Route};
use crate::stage::{self, StageJob, StageOutput};

/// What the hops read, as the actor last published it.
#[derive(Default)]
pub(crate) struct HopTable {
    pub me: Option<NodeId>,
    /// The plan followed: its epoch and the node of each stage.
    pub plan: Option<(Epoch, Vec<NodeId>)>,
    /// This node's stage in that plan.
    pub stage: Option<LocalEntry>,
    /// The links to the plan's other nodes.
    pub links: HashMap<NodeId, LinkSender>,
}

/// Where jobs for this node's stage go.
pub(crate) struct LocalEntry {
    pub epoch: Epoch,
    pub index: u32,
    pub jobs: mpsc::Sender<StageJob<Route>>,
    /// The model's hidden size, to check the activations that come in.
    pub hidden_size: usize,
}

impl HopTable {
    /// The node holding the stage `route` is for, under the plan followed.
    fn node_of(&self, route: Route) -> Option<NodeId> {
        let (epoch, nodes) = self.plan.as_ref()?;
        if *epoch != route.epoch {
            return None;
        }
        nodes.get(route.stage as usize).copied()
    }

    /// The link to `node`, if it is a peer this node is linked to.
    fn link_to(&self, node: NodeId) -> Option<&LinkSender> {
        (Some(node) != self.me)
            .then(|| self.links.get(&node))
            .flatten()
    }
}

/// Why a job the hops took could not go on; the actor acts on it as it
/// would have had the job come its way.
#[derive(Debug)]
pub(crate) enum HopFailure {
    /// The job is wrong in itself (bad activations): it fails its request.
    Refused { from: NodeId, message: String },
    /// The link to the next stage's node closed under it: the request is
    /// interrupted and replays on the next plan.
    Unreachable { target: NodeId },
}

/// The table, shared by the actor (which writes it), the stage thread and
/// every link reader.
#[derive(Default)]
pub(crate) struct Hops {
    table: RwLock<Arc<HopTable>>,
}

impl Hops {
    pub fn publish(&self, table: HopTable) {
        // A poisoned lock only means a reader panicked mid-clone of an
        // Arc; the table itself is whole.
        let mut current = self.table.write().unwrap_or_else(|e| e.into_inner());
        *current = Arc::new(table);
    }

    fn current(&self) -> Arc<HopTable> {
        Arc::clone(&self.table.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Sends the outputs of one step of this node's stage on their way:
    /// tags the step's batches, puts what goes to a peer on its link, and
    /// hands the rest to the actor. False when the actor is gone (the
    /// node is stopping). Runs on the stage thread.
    pub fn emit(
        &self,
        mut outputs: Vec<StageOutput<Route>>,
        events: &mpsc::Sender<ClusterEvent>,
    ) -> bool {
        stage::tag_batches(&mut outputs, |route| route.owner);
        let table = self.current();
        let mut for_actor = Vec::new();
        for output in outputs {
            match send_to_peer(&table, output) {
                Sent::Done => {}
                Sent::Failed(event) => {
                    if events.blocking_send(*event).is_err() {
                        return false;
                    }
                }
                Sent::NotMine(output) => for_actor.push(output),
            }
        }
        for_actor.is_empty()
            || events
                .blocking_send(ClusterEvent::FromStage(for_actor))
                .is_ok()
    }

    /// A forward job from the peer `from`, read by its link: put on this
    /// node's stage queue if the table says it runs here; else the event
    /// that hands it to the actor.
    pub fn take_forward(&self, from: NodeId, forward: ForwardFrame) -> Option<ClusterEvent> {
        let table = self.current();
        let Some(stage) = table
            .stage
            .as_ref()
            .filter(|s| s.epoch == forward.epoch && s.index == forward.stage)
            .filter(|_| forward.position != 0)
        else {
            return Some(ClusterEvent::Frame {
                from,
                frame: Frame::Forward(forward),
            });
        };
        let route = Route {
            owner: forward.owner,
            epoch: forward.epoch,
            stage: forward.stage,
        };
        let sequence = forward.request;
        let job = match routing::forward_job(forward, stage.hidden_size) {
            Ok(job) => job,
            Err(message) => {
                return Some(ClusterEvent::HopFailed {
                    route,
                    sequence,
                    failure: HopFailure::Refused { from, message },
                });
            }
        };
        match stage.jobs.try_send(job) {
            Ok(()) => None,
            // The actor says what a full or stopped stage means.
            Err(mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job)) => {
                Some(ClusterEvent::ForStage(job))
            }
        }
    }
}

/// What became of one output of the stage.
enum Sent {
    /// It is on a peer's link (or was for a peer that has gone, as the
    /// actor would drop it).
    Done,
    /// It was for a peer and could not go: the actor must know (boxed:
    /// rare, and an event is large).
    Failed(Box<ClusterEvent>),
    /// The actor routes it.
    NotMine(StageOutput<Route>),
}

fn send_to_peer(table: &HopTable, output: StageOutput<Route>) -> Sent {
    let target = match &output {
        StageOutput::Next { route, .. } => table.node_of(route.next()),
        StageOutput::Done { route, .. } => Some(route.owner),
    };
    let Some((target, link)) = target.and_then(|t| Some((t, table.link_to(t)?))) else {
        return Sent::NotMine(output);
    };
    match routing::onward(output) {
        Ok(job) => {
            let Some((sequence, route)) = job.forward_route() else {
                return Sent::Done;
            };
            let failure = match routing::forward_frame(job) {
                Ok(frame) => {
                    if link.send(frame) {
                        return Sent::Done;
                    }
                    HopFailure::Unreachable { target }
                }
                Err(message) => HopFailure::Refused {
                    from: table.me.unwrap_or(target),
                    message,
                },
            };
            Sent::Failed(Box::new(ClusterEvent::HopFailed {
                route,
                sequence,
                failure,
            }))
        }
        Err((route, result, ready_at)) => {
            // As the actor does: a result for an owner whose link just
            // closed is dropped (its request went with it).
            if let Some(frame) = routing::result_frame(result, route.epoch, ready_at) {
                link.send(frame);
            }
            Sent::Done
        }
    }
}
