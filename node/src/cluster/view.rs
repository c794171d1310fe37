//! The published view: the cluster as this node sees it, built from the
//! actor's state for `GET /v1/cluster`, the dashboard and the coordinator's
//! readiness checks. Built only after something in it may have changed.

use scheduler::NodeId;

use super::discovery::Verdict;
use super::membership::Membership;
use super::planning::Planning;
use super::protocol::Resources;
use super::status::LocalFigures;
use super::{
    ClusterView, LinkView, NodeView, NotJoinedView, PlanState, PlanView, PolicyStatus, StageView,
    view_id, view_layers,
};

/// The parts of the actor's state the view shows.
pub(super) struct Parts<'a> {
    pub membership: &'a Membership,
    pub planning: &'a Planning,
    pub policy: &'a PolicyStatus,
    pub local: &'a LocalFigures,
    /// Requests going through this node's stage now.
    pub in_flight: u32,
    /// The latest recoveries from a lost node.
    pub recoveries: Vec<super::RecoveryView>,
    /// Nodes a WebRTC link to failed, and why.
    pub webrtc_failures: &'a std::collections::HashMap<NodeId, super::signaling::Failure>,
    /// The plan's room for KV cache, and the tokens every owner reserves.
    pub kv_capacity_tokens: Option<u64>,
    pub kv_reserved_tokens: u64,
}

impl Parts<'_> {
    fn stage_in_flight(&self, node: NodeId) -> u32 {
        if node == self.membership.me.id {
            self.in_flight
        } else {
            self.membership.reported_in_flight(node)
        }
    }

    pub fn build(&self) -> ClusterView {
        let me = &self.membership.me;
        ClusterView {
            node: Some(view_id(me.id)),
            leader: Some(view_id(self.membership.leader())),
            model: Some(me.identity.clone()),
            nodes: self.nodes(),
            links: self.links(),
            plan: self.plan(),
            plan_error: self.planning.error.clone(),
            policy: Some(self.policy.clone()),
            not_joined: self
                .membership
                .discovered
                .values()
                .filter_map(|(peer, verdict)| match verdict {
                    Verdict::Skip(reason) => Some(NotJoinedView {
                        node: Some(view_id(peer.node)),
                        name: peer.name.clone(),
                        addresses: peer.addresses.iter().map(ToString::to_string).collect(),
                        cluster: Some(peer.cluster.clone()),
                        protocol_version: Some(peer.protocol_version),
                        reason: reason.clone(),
                    }),
                    _ => None,
                })
                .chain(
                    self.membership
                        .refused
                        .iter()
                        .map(|(who, refused)| NotJoinedView {
                            node: None,
                            name: who.clone(),
                            addresses: vec![who.clone()],
                            cluster: None,
                            protocol_version: None,
                            reason: refused.reason.clone(),
                        }),
                )
                .chain(
                    self.webrtc_failures
                        .iter()
                        .filter(|(node, _)| !self.membership.members.contains_key(node))
                        .map(|(node, failure)| NotJoinedView {
                            node: Some(view_id(*node)),
                            name: failure.address.clone(),
                            addresses: vec![failure.address.clone()],
                            cluster: None,
                            protocol_version: None,
                            reason: failure.reason.clone(),
                        }),
                )
                .collect(),
            stage_error: me.stage_lost.clone(),
            recoveries: self.recoveries.clone(),
        }
    }

    fn nodes(&self) -> Vec<NodeView> {
        let plan = self.planning.plan.as_ref();
        let plan_layers = |node: NodeId| {
            plan.and_then(|p| p.stage_of(node))
                .map(|(_, l)| view_layers(l))
        };
        let reported = |node: NodeId| plan.and_then(|p| p.ready.get(&node).copied());
        let me = &self.membership.me;
        let mut nodes = vec![NodeView {
            id: view_id(me.id),
            name: me.name.clone(),
            address: me.listen.to_string(),
            key: me.key_fingerprint.clone(),
            status: "self".into(),
            resources: Resources {
                memory_available_bytes: self.local.memory_available_bytes,
                ..me.resources.clone()
            },
            model: me.identity.clone(),
            layers: plan_layers(me.id),
            weight_bytes: self
                .planning
                .local_stage
                .as_ref()
                .map(|s| s.weight_bytes)
                .or_else(|| reported(me.id)),
            rss_bytes: Some(self.local.rss_bytes),
            peak_rss_bytes: Some(self.local.peak_rss_bytes),
            models: self.local.models.clone(),
        }];
        for (id, member) in &self.membership.members {
            let r = &member.hello.resources;
            let status = if member.serves(&me.identity) {
                "linked".to_string()
            } else {
                format!(
                    "not used: it serves another model file ({})",
                    member.hello.model.fingerprint
                )
            };
            nodes.push(NodeView {
                id: view_id(*id),
                name: member.hello.name.clone(),
                address: member.address.clone(),
                key: member.key_fingerprint.clone(),
                status,
                resources: Resources {
                    memory_available_bytes: member
                        .status
                        .as_ref()
                        .map_or(r.memory_available_bytes, |s| s.memory_available_bytes),
                    ..r.clone()
                },
                model: member.hello.model.clone(),
                layers: plan_layers(*id),
                weight_bytes: reported(*id),
                rss_bytes: member.status.as_ref().map(|s| s.rss_bytes),
                peak_rss_bytes: None,
                models: member
                    .status
                    .as_ref()
                    .map(|s| s.models.clone())
                    .unwrap_or_default(),
            });
        }
        nodes
    }

    fn links(&self) -> Vec<LinkView> {
        let me = self.membership.me.id;
        let members = &self.membership.members;
        let mut links: Vec<LinkView> = members
            .iter()
            .map(|(id, m)| LinkView {
                from: view_id(me),
                to: view_id(*id),
                rtt_ms: m.rtt_micros.map(|us| us as f64 / 1000.0),
                bandwidth_bytes_per_second: m.bandwidth,
                transport: m.link.transport,
                handshake_ms: m.link.handshake.map(|d| d.as_secs_f64() * 1000.0),
            })
            .collect();
        for (id, member) in members {
            let reported = member.status.iter().flat_map(|s| &s.links);
            links.extend(reported.filter(|m| m.to != me).map(|m| LinkView {
                from: view_id(*id),
                to: view_id(m.to),
                rtt_ms: Some(m.rtt_micros as f64 / 1000.0),
                bandwidth_bytes_per_second:
                    (m.bandwidth_bytes_per_second > 0).then_some(m.bandwidth_bytes_per_second),
                transport: m.transport,
                handshake_ms: m.handshake_micros.map(|us| us as f64 / 1000.0),
            }));
        }
        links
    }

    fn plan(&self) -> Option<PlanView> {
        self.planning.plan.as_ref().map(|p| PlanView {
            epoch: p.message.epoch.0,
            leader: view_id(p.message.leader),
            state: if p.active {
                PlanState::Active
            } else {
                PlanState::Loading
            },
            stages: p
                .message
                .stages
                .iter()
                .map(|s| StageView {
                    node: view_id(s.node),
                    layers: view_layers(s.layers),
                    weight_bytes: p.ready.get(&s.node).copied(),
                    in_flight: self.stage_in_flight(s.node),
                })
                .collect(),
            kv_capacity_tokens: self.kv_capacity_tokens,
            kv_reserved_tokens: self.kv_reserved_tokens,
        })
    }
}
