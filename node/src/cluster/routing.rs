//! Routing: the requests owned here and those hosted on this node's stage,
//! where a job goes next, and the conversions between stage jobs and
//! results and their frames on the wire (each written once).

use std::collections::{HashMap, HashSet};

use kernels::{SequenceId, ShardInput, Tensor};
use scheduler::NodeId;

use super::planning::CurrentPlan;
use super::protocol::{Epoch, ForwardFrame, Frame, Payload, WireDType};
use crate::stage::{StageJob, StageResult};

/// Where a job on a stage belongs: the node that owns the request (and
/// gets its tokens), the plan it runs under, and the index of the stage of
/// that plan the job is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route {
    pub owner: NodeId,
    pub epoch: Epoch,
    pub stage: u32,
}

impl Route {
    /// The route of a request's first job, owned by `owner`.
    pub fn first(owner: NodeId, epoch: Epoch) -> Self {
        Self {
            owner,
            epoch,
            stage: 0,
        }
    }

    /// The same job's route one stage further.
    pub fn next(self) -> Self {
        Self {
            stage: self.stage + 1,
            ..self
        }
    }
}

/// Requests this node owns and requests its stage hosts.
#[derive(Default)]
pub(super) struct Routing {
    /// Requests owned here that are in flight, to fail them if a stage dies.
    owned: HashSet<SequenceId>,
    /// Sequences on this node's stage and their owners, to release them if
    /// the owner dies.
    hosted: HashMap<SequenceId, NodeId>,
}

impl Routing {
    /// A request owned here starts its first job.
    pub fn own(&mut self, sequence: SequenceId) {
        self.owned.insert(sequence);
    }

    /// The owner released a request it owns.
    pub fn disown(&mut self, sequence: SequenceId) {
        self.owned.remove(&sequence);
    }

    /// Every request owned here, which fail together (their plan is gone).
    pub fn drain_owned(&mut self) -> Vec<SequenceId> {
        self.owned.drain().collect()
    }

    /// A result for a request owned here, to hand to the coordinator, or
    /// `None` for a late result of a request already ended. A failure ends
    /// the request here.
    pub fn deliver(&mut self, result: StageResult) -> Option<StageResult> {
        let sequence = result.sequence();
        let failed = matches!(result, StageResult::Failed { .. });
        if failed {
            self.owned.remove(&sequence);
            return Some(result);
        }
        self.owned.contains(&sequence).then_some(result)
    }

    /// This node's stage took a job of `sequence`, owned by `owner`.
    pub fn host(&mut self, sequence: SequenceId, owner: NodeId) {
        self.hosted.insert(sequence, owner);
    }

    /// The stage forgets `sequence`.
    pub fn unhost(&mut self, sequence: SequenceId) {
        self.hosted.remove(&sequence);
    }

    /// The stage is gone with its plan, and every sequence on it.
    pub fn clear_hosted(&mut self) {
        self.hosted.clear();
    }

    /// Sequences `owner` has on this node's stage, which it will never
    /// release now that it left; they are forgotten here.
    pub fn orphans_of(&mut self, owner: NodeId) -> Vec<SequenceId> {
        let orphans: Vec<SequenceId> = self
            .hosted
            .iter()
            .filter(|(_, o)| **o == owner)
            .map(|(s, _)| *s)
            .collect();
        for sequence in &orphans {
            self.hosted.remove(sequence);
        }
        orphans
    }

    /// True while requests owned here are in flight.
    pub fn owns_any(&self) -> bool {
        !self.owned.is_empty()
    }

    /// Requests going through this node's stage now.
    pub fn in_flight(&self) -> u32 {
        u32::try_from(self.hosted.len()).unwrap_or(u32::MAX)
    }
}

/// The node holding the stage `route` is for, if `plan` is the plan the
/// route runs under.
pub(super) fn target(plan: Option<&CurrentPlan>, route: Route) -> Option<NodeId> {
    let plan = plan.filter(|p| p.message.epoch == route.epoch)?;
    plan.message
        .stages
        .get(route.stage as usize)
        .map(|s| s.node)
}

/// A forward job as a frame for the node holding its stage.
pub(super) fn forward_frame(job: StageJob<Route>) -> Result<Frame, String> {
    let StageJob::Forward {
        sequence,
        position,
        input,
        sample,
        route,
    } = job
    else {
        return Err("only forward jobs travel between nodes".into());
    };
    let payload = match input {
        ShardInput::Tokens(tokens) => Payload::Tokens(tokens),
        ShardInput::Hidden(hidden) => hidden_payload(&hidden)?,
    };
    Ok(Frame::Forward(ForwardFrame {
        request: sequence,
        owner: route.owner,
        epoch: route.epoch,
        stage: route.stage,
        position: u32::try_from(position).unwrap_or(u32::MAX),
        payload,
        sample,
    }))
}

/// A forward frame from a peer, checked, as a job for this node's stage;
/// the error says what is wrong with it.
pub(super) fn forward_job(
    forward: ForwardFrame,
    hidden_size: usize,
) -> Result<StageJob<Route>, String> {
    let input = match forward.payload {
        Payload::Tokens(tokens) if !tokens.is_empty() => ShardInput::Tokens(tokens),
        Payload::Tokens(_) => return Err("an empty token payload".into()),
        Payload::Hidden {
            tokens,
            hidden,
            dtype: WireDType::F32,
            data,
        } => ShardInput::Hidden(hidden_input(tokens, hidden, &data, hidden_size)?),
    };
    Ok(StageJob::Forward {
        sequence: forward.request,
        position: forward.position as usize,
        input,
        sample: forward.sample,
        route: Route {
            owner: forward.owner,
            epoch: forward.epoch,
            stage: forward.stage,
        },
    })
}

impl From<StageResult> for Frame {
    fn from(result: StageResult) -> Self {
        match result {
            StageResult::Token { sequence, token } => Frame::Token {
                request: sequence,
                token,
            },
            StageResult::ChunkDone { sequence } => Frame::ChunkDone { request: sequence },
            StageResult::Failed { sequence, message } => Frame::Failed {
                request: sequence,
                error: message,
            },
        }
    }
}

impl TryFrom<Frame> for StageResult {
    /// A frame that is not a result, returned as it was.
    type Error = Frame;

    fn try_from(frame: Frame) -> Result<Self, Frame> {
        match frame {
            Frame::Token { request, token } => Ok(StageResult::Token {
                sequence: request,
                token,
            }),
            Frame::ChunkDone { request } => Ok(StageResult::ChunkDone { sequence: request }),
            Frame::Failed { request, error } => Ok(StageResult::Failed {
                sequence: request,
                message: error,
            }),
            other => Err(other),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::protocol::{ModelIdentity, PlanMessage, PlanStage};
    use crate::stage::Sample;
    use kernels::LayerRange;

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

    #[test]
    fn results_reach_their_owner_once_and_late_ones_are_dropped() {
        let mut routing = Routing::default();
        let (a, b) = (SequenceId(1), SequenceId(2));
        routing.own(a);
        let token = StageResult::Token {
            sequence: a,
            token: 7,
        };
        assert!(routing.deliver(token).is_some());
        let late = StageResult::Token {
            sequence: b,
            token: 7,
        };
        assert!(routing.deliver(late).is_none(), "not owned here");
        let failed = StageResult::Failed {
            sequence: a,
            message: "x".into(),
        };
        assert!(routing.deliver(failed).is_some());
        assert!(!routing.owns_any(), "a failure ends the request");
        let after = StageResult::ChunkDone { sequence: a };
        assert!(routing.deliver(after).is_none(), "late result");
    }

    #[test]
    fn hosted_sequences_of_a_lost_owner_are_released() {
        let mut routing = Routing::default();
        routing.host(SequenceId(1), NodeId(5));
        routing.host(SequenceId(2), NodeId(6));
        routing.host(SequenceId(3), NodeId(5));
        assert_eq!(routing.in_flight(), 3);
        let mut orphans = routing.orphans_of(NodeId(5));
        orphans.sort();
        assert_eq!(orphans, vec![SequenceId(1), SequenceId(3)]);
        assert_eq!(routing.in_flight(), 1);
    }

    #[test]
    fn jobs_go_to_the_stage_of_their_plan_and_survive_the_wire() {
        let plan = CurrentPlan {
            message: PlanMessage {
                epoch: Epoch(4),
                leader: NodeId(1),
                model: ModelIdentity {
                    name: "m".into(),
                    fingerprint: "f".into(),
                },
                stages: vec![
                    PlanStage {
                        node: NodeId(1),
                        address: String::new(),
                        layers: LayerRange::new(0, 10),
                    },
                    PlanStage {
                        node: NodeId(2),
                        address: String::new(),
                        layers: LayerRange::new(10, 30),
                    },
                ],
            },
            ready: HashMap::new(),
            active: true,
        };
        let route = Route::first(NodeId(9), Epoch(4));
        assert_eq!(target(Some(&plan), route), Some(NodeId(1)));
        assert_eq!(target(Some(&plan), route.next()), Some(NodeId(2)));
        assert_eq!(
            target(Some(&plan), route.next().next()),
            None,
            "past the end"
        );
        assert_eq!(target(Some(&plan), Route::first(NodeId(9), Epoch(3))), None);

        let job = StageJob::Forward {
            sequence: SequenceId(5),
            position: 12,
            input: ShardInput::Tokens(vec![1, 2, 3]),
            sample: Sample::Continue,
            route: route.next(),
        };
        let Ok(Frame::Forward(frame)) = forward_frame(job) else {
            panic!("a forward frame")
        };
        let Ok(StageJob::Forward {
            sequence,
            position,
            route: back,
            ..
        }) = forward_job(frame, 576)
        else {
            panic!("a job")
        };
        assert_eq!(
            (sequence, position, back),
            (SequenceId(5), 12, route.next())
        );

        let result = StageResult::Token {
            sequence: SequenceId(5),
            token: 9,
        };
        let frame = Frame::from(result);
        assert!(matches!(
            StageResult::try_from(frame),
            Ok(StageResult::Token { token: 9, .. })
        ));
        assert!(
            StageResult::try_from(Frame::Bye {
                reason: String::new()
            })
            .is_err()
        );
    }
}
