//! Routing: the requests owned here and those hosted on this node's stage,
//! where a job goes next, and the conversions between stage jobs and
//! results and their frames on the wire (each written once).

use std::collections::HashMap;
use std::time::Instant;

use kernels::{SequenceId, ShardInput, Tensor};
use scheduler::NodeId;

use super::planning::CurrentPlan;
use super::protocol::{Epoch, ForwardFrame, Frame, Payload, WireDType};
use crate::stage::{StageJob, StageOutput, StageResult};

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

/// Where a request owned here stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Owned {
    /// Its job runs on the plan of this epoch; results of other plans are
    /// late and dropped.
    Running(Epoch),
    /// Its plan was lost (since then): it waits for a new one, to be fed
    /// again from the start.
    Interrupted { since: Instant },
    /// A new plan is active and the coordinator was told (then) to feed
    /// it again; its next job (from position 0) runs on that plan.
    Resuming { since: Instant },
}

/// Requests this node owns and requests its stage hosts.
#[derive(Default)]
pub(super) struct Routing {
    /// Requests owned here that the coordinator runs.
    owned: HashMap<SequenceId, Owned>,
    /// Sequences on this node's stage and their owners, to release them if
    /// the owner dies.
    hosted: HashMap<SequenceId, NodeId>,
}

impl Routing {
    /// Where a request owned here stands, if it is one.
    pub fn owned(&self, sequence: SequenceId) -> Option<Owned> {
        self.owned.get(&sequence).copied()
    }

    /// A request owned here runs its next job on plan `epoch`.
    pub fn run(&mut self, sequence: SequenceId, epoch: Epoch) {
        self.owned.insert(sequence, Owned::Running(epoch));
    }

    /// The owner released a request it owns.
    pub fn disown(&mut self, sequence: SequenceId) {
        self.owned.remove(&sequence);
    }

    /// A request owned here lost its plan (or never had one): it waits.
    /// True if it was running until now.
    pub fn interrupt(&mut self, sequence: SequenceId) -> bool {
        let state = self.owned.entry(sequence).or_insert(Owned::Interrupted {
            since: Instant::now(),
        });
        match *state {
            Owned::Interrupted { .. } => false,
            Owned::Running(_) | Owned::Resuming { .. } => {
                *state = Owned::Interrupted {
                    since: Instant::now(),
                };
                true
            }
        }
    }

    /// Every request running here lost its plan; how many did.
    pub fn interrupt_running(&mut self) -> usize {
        let now = Instant::now();
        let mut count = 0;
        for state in self.owned.values_mut() {
            if matches!(state, Owned::Running(_) | Owned::Resuming { .. }) {
                *state = Owned::Interrupted { since: now };
                count += 1;
            }
        }
        count
    }

    /// A plan is active: the interrupted requests, now to be fed again.
    pub fn resume_interrupted(&mut self) -> Vec<SequenceId> {
        let mut resumed = Vec::new();
        let now = Instant::now();
        for (sequence, state) in &mut self.owned {
            if matches!(state, Owned::Interrupted { .. }) {
                *state = Owned::Resuming { since: now };
                resumed.push(*sequence);
            }
        }
        resumed
    }

    /// When the longest-waiting interrupted (or resuming) request started
    /// waiting.
    pub fn interrupted_since(&self) -> Option<Instant> {
        self.owned.values().filter_map(waiting_since).min()
    }

    /// The requests that have waited at least `wait` for a plan (or for
    /// their coordinator to feed them again, which takes milliseconds),
    /// which are forgotten here (their owner fails them).
    pub fn take_expired(&mut self, wait: std::time::Duration) -> Vec<SequenceId> {
        let expired: Vec<SequenceId> = self
            .owned
            .iter()
            .filter(|(_, state)| waiting_since(state).is_some_and(|since| since.elapsed() >= wait))
            .map(|(sequence, _)| *sequence)
            .collect();
        for sequence in &expired {
            self.owned.remove(sequence);
        }
        expired
    }

    /// Every request owned here, which fail together (their model is gone).
    pub fn drain_owned(&mut self) -> Vec<SequenceId> {
        self.owned.drain().map(|(sequence, _)| sequence).collect()
    }

    /// A result for a request owned here, from a job of plan `epoch`, to
    /// hand to the coordinator; `None` for a late result (the request
    /// ended, or runs on another plan now). A failure ends the request here.
    pub fn deliver(&mut self, result: StageResult, epoch: Epoch) -> Option<StageResult> {
        let sequence = result.sequence();
        if self.owned.get(&sequence) != Some(&Owned::Running(epoch)) {
            return None;
        }
        if matches!(result, StageResult::Failed { .. }) {
            self.owned.remove(&sequence);
        }
        Some(result)
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

    /// True while requests owned here run on a plan.
    pub fn owns_running(&self) -> bool {
        self.owned
            .values()
            .any(|state| matches!(state, Owned::Running(_) | Owned::Resuming { .. }))
    }

    /// Requests going through this node's stage now.
    pub fn in_flight(&self) -> u32 {
        u32::try_from(self.hosted.len()).unwrap_or(u32::MAX)
    }
}

/// Since when a request owned here waits, if it does.
fn waiting_since(state: &Owned) -> Option<Instant> {
    match state {
        Owned::Interrupted { since } | Owned::Resuming { since } => Some(*since),
        Owned::Running(_) => None,
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

/// Where an output of a stage goes on: hidden states as the job of the
/// stage after it, or a result (with when it was ready) for its owner.
pub(super) fn onward(
    output: StageOutput<Route>,
) -> Result<StageJob<Route>, (Route, StageResult, u64)> {
    match output {
        StageOutput::Next {
            sequence,
            position,
            hidden,
            sample,
            token_by_token,
            route,
            ready_at,
            batch,
        } => Ok(StageJob::Forward {
            sequence,
            position,
            input: ShardInput::Hidden(hidden),
            sample,
            token_by_token,
            route: route.next(),
            sent_at: Some(ready_at),
            batch,
        }),
        StageOutput::Done {
            route,
            result,
            ready_at,
        } => Err((route, result, ready_at)),
    }
}

/// A forward job as a frame for the node holding its stage.
pub(super) fn forward_frame(job: StageJob<Route>) -> Result<Frame, String> {
    let StageJob::Forward {
        sequence,
        position,
        input,
        sample,
        token_by_token,
        route,
        sent_at,
        batch,
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
        token_by_token,
        sent_at: sent_at.unwrap_or(0),
        batch,
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
        token_by_token: forward.token_by_token,
        route: Route {
            owner: forward.owner,
            epoch: forward.epoch,
            stage: forward.stage,
        },
        sent_at: (forward.sent_at != 0).then_some(forward.sent_at),
        batch: forward.batch,
    })
}

/// A result of a job of plan `epoch` as a frame for the request's owner.
/// `ready_at` is when the stage had it (Unix µs), for the token's hop.
pub(super) fn result_frame(result: StageResult, epoch: Epoch, ready_at: u64) -> Option<Frame> {
    Some(match result {
        StageResult::Token {
            sequence,
            token,
            logprobs,
            batch,
        } => Frame::Token {
            request: sequence,
            epoch,
            token,
            logprobs,
            sent_at: ready_at,
            batch,
        },
        StageResult::ChunkDone { sequence } => Frame::ChunkDone {
            request: sequence,
            epoch,
        },
        StageResult::Failed { sequence, message } => Frame::Failed {
            request: sequence,
            epoch,
            error: message,
        },
        // Said by an owner's cluster to its own coordinator only.
        StageResult::Resume { .. } => return None,
    })
}

/// A result frame from a peer, with the epoch of the plan its job ran on;
/// `None` for any other frame.
pub(super) fn frame_result(frame: Frame) -> Option<(StageResult, Epoch)> {
    match frame {
        Frame::Token {
            request,
            epoch,
            token,
            logprobs,
            batch,
            ..
        } => Some((
            StageResult::Token {
                sequence: request,
                token,
                logprobs,
                batch,
            },
            epoch,
        )),
        Frame::ChunkDone { request, epoch } => {
            Some((StageResult::ChunkDone { sequence: request }, epoch))
        }
        Frame::Failed {
            request,
            epoch,
            error,
        } => Some((
            StageResult::Failed {
                sequence: request,
                message: error,
            },
            epoch,
        )),
        _ => None,
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
        routing.run(a, Epoch(3));
        let token = |sequence| StageResult::Token {
            sequence,
            token: 7,
            logprobs: None,
            batch: None,
        };
        assert!(routing.deliver(token(a), Epoch(3)).is_some());
        assert!(
            routing.deliver(token(b), Epoch(3)).is_none(),
            "not owned here"
        );
        assert!(
            routing.deliver(token(a), Epoch(2)).is_none(),
            "from an older plan"
        );
        let failed = StageResult::Failed {
            sequence: a,
            message: "x".into(),
        };
        assert!(routing.deliver(failed, Epoch(3)).is_some());
        assert!(!routing.owns_running(), "a failure ends the request");
        let after = StageResult::ChunkDone { sequence: a };
        assert!(routing.deliver(after, Epoch(3)).is_none(), "late result");
    }

    #[test]
    fn interrupted_requests_wait_drop_late_results_and_resume_once() {
        let mut routing = Routing::default();
        let (a, b, c) = (SequenceId(1), SequenceId(2), SequenceId(3));
        routing.run(a, Epoch(1));
        routing.run(b, Epoch(1));
        assert_eq!(routing.interrupt_running(), 2);
        assert!(!routing.interrupt(a), "already waiting");
        assert!(!routing.owns_running());
        let late = StageResult::Token {
            sequence: a,
            token: 7,
            logprobs: None,
            batch: None,
        };
        assert!(routing.deliver(late, Epoch(1)).is_none(), "the old plan's");
        // A request that started with no plan waits too.
        routing.interrupt(c);
        assert!(routing.interrupted_since().is_some());
        let mut resumed = routing.resume_interrupted();
        resumed.sort();
        assert_eq!(resumed, vec![a, b, c]);
        assert!(routing.resume_interrupted().is_empty(), "told once");
        assert!(matches!(routing.owned(a), Some(Owned::Resuming { .. })));
        routing.run(a, Epoch(2));
        let token = StageResult::Token {
            sequence: a,
            token: 8,
            logprobs: None,
            batch: None,
        };
        assert!(routing.deliver(token, Epoch(2)).is_some());
        // Waiting too long: forgotten here, for the owner to fail.
        routing.interrupt(b);
        assert_eq!(
            routing.take_expired(std::time::Duration::from_secs(3600)),
            vec![]
        );
        // c was told to resume and never fed again: it expires too.
        let mut expired = routing.take_expired(std::time::Duration::ZERO);
        expired.sort();
        assert_eq!(expired, vec![b, c]);
        assert_eq!(routing.owned(b), None);
        assert_eq!(routing.owned(a), Some(Owned::Running(Epoch(2))), "running");
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
            token_by_token: false,
            route: route.next(),
            sent_at: Some(1_700_000_000_000_000),
            batch: None,
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
            logprobs: None,
            batch: None,
        };
        let frame = result_frame(result, Epoch(4), 7).expect("a frame");
        assert!(matches!(
            frame_result(frame),
            Some((StageResult::Token { token: 9, .. }, Epoch(4)))
        ));
        assert!(
            frame_result(Frame::Bye {
                reason: String::new()
            })
            .is_none()
        );
        assert!(
            result_frame(
                StageResult::Resume {
                    sequence: SequenceId(5)
                },
                Epoch(4),
                7
            )
            .is_none(),
            "never sent"
        );
    }
}
