//! Membership: who this node is, the peers it is linked to, the addresses
//! it should be linked to (and is dialing), the nodes discovery found, and
//! what each link measured. It decides admission and leadership; it does
//! not plan or route.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use scheduler::NodeId;

use super::discovery::{PeerAdvert, Verdict};
use super::link::{LinkId, LinkSender};
use super::protocol::{
    Frame, Hello, LinkMeasurement, ModelIdentity, NodeStatus, PROTOCOL_VERSION, PeerAddress,
    Resources,
};
use crate::limits::{
    HEARTBEAT_INTERVAL_MS, KEPT_LINK_WAIT_MS, MAX_NODES, MAX_REFUSED_PEERS, PEER_SILENCE_HEARTBEATS,
};
use crate::policy;

/// A node we are linked to.
pub(super) struct Member {
    pub hello: Hello,
    /// A short fingerprint of the long-term key its handshake proved.
    pub key_fingerprint: String,
    /// HOST:PORT where its API and link port is reached.
    pub address: String,
    pub link: LinkSender,
    pub rtt_micros: Option<u64>,
    /// Bytes per second received from it, smoothed over large frames.
    pub bandwidth: Option<u64>,
    /// Its last report of its links and its stage's load.
    pub status: Option<NodeStatus>,
    /// Why its stage was lost while it stayed linked (it stopped making
    /// progress): it is given no layers until it links again.
    pub stage_lost: Option<String>,
    /// Set when the peer closed `link` because it keeps another link to
    /// this node: it stays a member until then, waiting for that link.
    pub kept_link_due: Option<Instant>,
}

impl Member {
    /// Serves the same model file as `identity`, so it can be given layers.
    pub fn serves(&self, identity: &ModelIdentity) -> bool {
        self.hello.model.fingerprint == identity.fingerprint
    }
}

/// What this node is, as its peers see it.
pub(super) struct Myself {
    pub id: NodeId,
    /// A short fingerprint of this node's long-term key.
    pub key_fingerprint: String,
    pub name: String,
    /// The cluster name: peers with another one are not joined.
    pub cluster: String,
    pub listen: SocketAddr,
    pub resources: Resources,
    pub identity: ModelIdentity,
    /// When this node first served in an active plan (unix ms).
    pub serving_since_ms: Option<u64>,
    /// Why this node's own stage was lost (its thread stopped or stopped
    /// making progress): it takes no layers until it restarts.
    pub stage_lost: Option<String>,
    /// STUN and TURN servers for WebRTC links: this node's own, then
    /// those its peers shared.
    pub ice_servers: Vec<super::protocol::IceServer>,
}

/// Why a link was not kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// It is this node, reached through another address.
    #[error("it is this node itself")]
    Myself,
    /// It is in another cluster.
    #[error("it is in another cluster")]
    OtherCluster,
    /// A link to the peer exists and wins over this one.
    #[error("another link to it wins")]
    Duplicate,
    /// The cluster has `MAX_NODES` nodes.
    #[error("the cluster has {MAX_NODES} nodes")]
    Full,
    /// This node is stopping.
    #[error("this node is stopping")]
    Stopping,
    /// The link opened with the cluster secret an admin has since
    /// rotated (a removed node holds that one too).
    #[error(
        "the cluster secret changed while the link opened; it must link again with the new one"
    )]
    OldSecret,
}

pub(super) struct Membership {
    pub me: Myself,
    pub members: BTreeMap<NodeId, Member>,
    /// `--peer` addresses, which are dialed for as long as the node runs.
    configured_peers: HashSet<String>,
    /// Addresses to stay linked to: `--peer` ones and those peers told us.
    known_addresses: HashSet<String>,
    /// Addresses this node dialed that reached a member other than at the
    /// address it is known by (a `--peer` relay, a second address of it):
    /// not dialed again while that member stays, since each such link
    /// would only be a duplicate.
    reached_members: HashMap<String, NodeId>,
    dialing: HashSet<String>,
    /// Advertisements mDNS resolved, by service name.
    pub discovered: BTreeMap<String, (PeerAdvert, Verdict)>,
    /// Nodes that failed to prove they hold the cluster's key, by the
    /// address dialed or the IP address a link came from.
    pub refused: BTreeMap<String, RefusedPeer>,
    /// Increases with each refusal, to drop the oldest entries first.
    refusals: u64,
    /// Pairs of nodes that could not link to each other (the smaller id
    /// first), with why: no plan may hold both ends.
    pub unreachable: BTreeMap<(NodeId, NodeId), String>,
}

/// A node that failed to prove it holds the cluster's key.
pub(super) struct RefusedPeer {
    pub reason: String,
    /// Which refusal this was last, counted from the node's start.
    pub last: u64,
}

impl Membership {
    pub fn new(me: Myself, peers: Vec<String>) -> Self {
        Self {
            me,
            members: BTreeMap::new(),
            configured_peers: peers.iter().cloned().collect(),
            known_addresses: peers.into_iter().collect(),
            reached_members: HashMap::new(),
            dialing: HashSet::new(),
            discovered: BTreeMap::new(),
            refused: BTreeMap::new(),
            refusals: 0,
            unreachable: BTreeMap::new(),
        }
    }

    pub fn hello(&self) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            node: self.me.id,
            name: self.me.name.clone(),
            cluster: self.me.cluster.clone(),
            address: self.me.listen.to_string(),
            resources: self.me.resources.clone(),
            model: self.me.identity.clone(),
            serving_since_ms: self.me.serving_since_ms,
            ice_servers: self.me.ice_servers.clone(),
            dtls_fingerprints: None,
            peers: self
                .members
                .iter()
                .map(|(id, m)| PeerAddress {
                    node: *id,
                    address: m.address.clone(),
                })
                .collect(),
        }
    }

    /// Known addresses not linked or being dialed yet; they count as being
    /// dialed from now until [`Self::dial_ended`].
    pub fn start_dialing(&mut self) -> Vec<String> {
        self.reached_members
            .retain(|_, node| self.members.contains_key(node));
        let linked: HashSet<&String> = self.members.values().map(|m| &m.address).collect();
        let own = self.me.listen.to_string();
        let to_dial: Vec<String> = self
            .known_addresses
            .iter()
            .filter(|a| {
                !linked.contains(a)
                    && !self.reached_members.contains_key(*a)
                    && !self.dialing.contains(*a)
                    && **a != own
            })
            .cloned()
            .collect();
        self.dialing.extend(to_dial.iter().cloned());
        to_dial
    }

    pub fn dial_ended(&mut self, address: &str) {
        self.dialing.remove(address);
    }

    /// Whether `address` was given with `--peer`.
    pub fn is_configured(&self, address: &str) -> bool {
        self.configured_peers.contains(address)
    }

    /// Adopts the STUN and TURN servers a peer shared that this node lacks;
    /// returns the new ones.
    pub fn adopt_ice_servers(
        &mut self,
        servers: &[super::protocol::IceServer],
    ) -> Vec<super::protocol::IceServer> {
        let new: Vec<_> = servers
            .iter()
            .filter(|s| !self.me.ice_servers.contains(s))
            .take(crate::limits::MAX_ICE_SERVERS.saturating_sub(self.me.ice_servers.len()))
            .cloned()
            .collect();
        self.me.ice_servers.extend(new.iter().cloned());
        new
    }

    /// The addresses (HOST:PORT) of the nodes linked to this one.
    pub fn peer_addresses(&self) -> Vec<String> {
        self.members.values().map(|m| m.address.clone()).collect()
    }

    /// Remembers addresses to link to (a plan's stages).
    pub fn remember(&mut self, peers: impl IntoIterator<Item = (NodeId, String)>) {
        for (node, address) in peers {
            if node != self.me.id && !self.members.contains_key(&node) {
                self.known_addresses.insert(address);
            }
        }
    }

    /// A link's handshake failed because one end lacks the cluster's key:
    /// the peer is listed as refused and logged the first time. An
    /// address only a peer or discovery named is not dialed again; a
    /// `--peer` one is, in case it joins later.
    pub fn refuse(&mut self, address: &str, dialed: bool, reason: &str) {
        let who = if dialed {
            address.to_string()
        } else {
            address
                .parse::<SocketAddr>()
                .map_or(address.to_string(), |a| a.ip().to_string())
        };
        self.refusals += 1;
        let first = !self.refused.contains_key(&who);
        self.refused.insert(
            who.clone(),
            RefusedPeer {
                reason: reason.to_string(),
                last: self.refusals,
            },
        );
        if self.refused.len() > MAX_REFUSED_PEERS
            && let Some(oldest) = self
                .refused
                .iter()
                .min_by_key(|(_, p)| p.last)
                .map(|(k, _)| k.clone())
        {
            self.refused.remove(&oldest);
        }
        if dialed && !self.configured_peers.contains(address) {
            self.known_addresses.remove(address);
        }
        if first {
            let direction = if dialed {
                format!("the node at {who}")
            } else {
                format!("a node connecting from {who}")
            };
            tracing::warn!(
                peer = %who,
                %reason,
                "refused {direction}: {reason}. To add a machine, run `ringlet invite` on a member and start the new node with --join TOKEN"
            );
        } else {
            tracing::debug!(peer = %who, %reason, "refused again");
        }
    }

    /// Admits the peer of a new link, or says why not. A duplicate link
    /// that wins replaces the member's link, and the peer is told so on
    /// the replaced one.
    pub fn admit(&mut self, hello: Hello, key: Vec<u8>, link: LinkSender) -> Result<(), Refusal> {
        let peer = hello.node;
        let address = advertised_address(&hello.address, &link.observed_address);
        if peer == self.me.id {
            self.known_addresses.remove(&link.observed_address);
            return Err(Refusal::Myself);
        }
        if hello.cluster != self.me.cluster {
            tracing::warn!(
                node = %peer,
                "not joining peer {} at {address}: it is in cluster `{}`, this node in `{}`; start both with the same --cluster",
                hello.name,
                hello.cluster,
                self.me.cluster
            );
            // Dialing it again would be refused again.
            self.known_addresses.remove(&address);
            self.known_addresses.remove(&link.observed_address);
            return Err(Refusal::OtherCluster);
        }
        if link.dialed && link.observed_address != address {
            self.reached_members
                .insert(link.observed_address.clone(), peer);
        }
        if let Some(existing) = self.members.get(&peer) {
            // Two links to one peer: a link from the same key while the
            // peer's kept link is awaited is that link; otherwise both
            // sides keep the one `keeps` picks, whichever came up first.
            let replaced_by_peer = existing.kept_link_due.is_some()
                && crate::identity::key_fingerprint(&key) == existing.key_fingerprint;
            if !replaced_by_peer && !keeps(self.me.id, peer, &link, &existing.link) {
                return Err(Refusal::Duplicate);
            }
            existing.link.replace();
        } else if self.members.len() + 1 >= MAX_NODES {
            tracing::warn!(peer = %hello.name, "refusing a peer: the cluster has {MAX_NODES} nodes");
            return Err(Refusal::Full);
        }
        for told in &hello.peers {
            if told.node != self.me.id && !self.members.contains_key(&told.node) {
                self.known_addresses.insert(told.address.clone());
            }
        }
        self.known_addresses.insert(address.clone());
        if hello.model.fingerprint != self.me.identity.fingerprint {
            tracing::warn!(
                peer = %hello.name,
                their_model = %hello.model.name,
                their_fingerprint = %hello.model.fingerprint,
                our_fingerprint = %self.me.identity.fingerprint,
                "peer has a different model file; it will not be given layers"
            );
        } else {
            tracing::info!(node = %peer, "peer {} joined from {address}", hello.name);
        }
        self.refused.remove(&address);
        if let Ok(observed) = link.observed_address.parse::<SocketAddr>() {
            self.refused.remove(&observed.ip().to_string());
        }
        self.members.insert(
            peer,
            Member {
                hello,
                key_fingerprint: crate::identity::key_fingerprint(&key),
                address,
                link,
                rtt_micros: None,
                bandwidth: None,
                status: None,
                stage_lost: None,
                kept_link_due: None,
            },
        );
        Ok(())
    }

    /// Removes the peer whose link `link` closed; `None` when that link was
    /// a replaced duplicate (the peer stays).
    pub fn remove(&mut self, node: NodeId, link: LinkId) -> Option<Member> {
        if self.members.get(&node).is_none_or(|m| m.link.id != link) {
            return None;
        }
        self.members.remove(&node)
    }

    /// The peer closed `link` because it keeps another link to this node:
    /// when `link` is the member's, the member stays for
    /// [`KEPT_LINK_WAIT_MS`] while that other link comes up. False when
    /// `link` was already replaced here.
    pub fn await_kept_link(&mut self, node: NodeId, link: LinkId, now: Instant) -> bool {
        let Some(member) = self.members.get_mut(&node).filter(|m| m.link.id == link) else {
            return false;
        };
        tracing::debug!(node = %node, link, "the peer keeps another link to this node; waiting for it");
        member.kept_link_due = Some(now + Duration::from_millis(KEPT_LINK_WAIT_MS));
        true
    }

    /// Members whose kept link did not come up in time, with the closed
    /// link they still hold.
    pub fn kept_links_overdue(&self, now: Instant) -> Vec<(NodeId, LinkId)> {
        self.members
            .iter()
            .filter(|(_, m)| m.kept_link_due.is_some_and(|due| now >= due))
            .map(|(node, m)| (*node, m.link.id))
            .collect()
    }

    /// An admin removed `node`: its link closes and its address is not
    /// dialed again (unless it is a `--peer` one, which stays refused).
    pub fn forget_node(&mut self, node: NodeId) {
        self.close_link(node);
        if let Some(member) = self.members.get(&node)
            && !self.configured_peers.contains(&member.address)
        {
            self.known_addresses.remove(&member.address);
        }
    }

    /// mDNS found a node: true when it should be dialed now.
    pub fn discovered(&mut self, fullname: String, peer: PeerAdvert, verdict: Verdict) -> bool {
        let dial = verdict == Verdict::Join && !self.members.contains_key(&peer.node);
        if dial {
            self.known_addresses
                .extend(peer.addresses.iter().map(ToString::to_string));
        }
        self.discovered.insert(fullname, (peer, verdict));
        dial
    }

    /// A node withdrew its advertisement: stop dialing its addresses
    /// (unless they are `--peer` ones); its links end by themselves.
    pub fn withdrawn(&mut self, fullname: &str) {
        let Some((peer, _)) = self.discovered.remove(fullname) else {
            return;
        };
        let linked: HashSet<&String> = self.members.values().map(|m| &m.address).collect();
        for address in peer.addresses.iter().map(ToString::to_string) {
            if !self.configured_peers.contains(&address) && !linked.contains(&address) {
                self.known_addresses.remove(&address);
            }
        }
    }

    /// This node was frozen: what it did not hear meanwhile says nothing
    /// of its peers, so their silence counts from now.
    pub fn heard_from_all(&mut self) {
        for member in self.members.values() {
            member.link.heard_now();
        }
    }

    /// Of `nodes`, the peers that have sent nothing (no frame at all,
    /// heartbeats included) for longer than
    /// [`PEER_SILENCE_HEARTBEATS`] heartbeats plus the time their link
    /// takes to carry `largest_frame_bytes` at its measured bandwidth (a
    /// heartbeat's answer may queue behind such a frame); how long each
    /// has been silent. A link whose bandwidth is unknown is left to its
    /// own heartbeat timeout.
    pub fn silent_peers(
        &self,
        nodes: &[NodeId],
        largest_frame_bytes: u64,
    ) -> Vec<(NodeId, std::time::Duration)> {
        nodes
            .iter()
            .filter_map(|node| {
                let member = self.members.get(node)?;
                let bandwidth = member.bandwidth.filter(|b| *b > 0)?;
                let carry = std::time::Duration::from_secs_f64(
                    largest_frame_bytes as f64 / bandwidth as f64,
                );
                let limit = std::time::Duration::from_millis(
                    HEARTBEAT_INTERVAL_MS * PEER_SILENCE_HEARTBEATS,
                ) + carry;
                let silent = member.link.silent_for();
                (silent > limit).then_some((*node, silent))
            })
            .collect()
    }

    /// Closes the link to `node` (it is lost); its departure follows as a
    /// link going down, or, when the peer's kept link is awaited (the
    /// member's link is closed already), at the next [`kept_links_overdue`](Self::kept_links_overdue).
    pub fn close_link(&mut self, node: NodeId) {
        if let Some(member) = self.members.get_mut(&node) {
            member.link.close();
            if member.kept_link_due.is_some() {
                member.kept_link_due = Some(Instant::now());
            }
        }
    }

    /// `node`'s stage was lost while it stays linked: no layers for it
    /// until it links again.
    pub fn stage_lost(&mut self, node: NodeId, reason: &str) {
        if let Some(member) = self.members.get_mut(&node) {
            member.stage_lost = Some(reason.to_string());
        }
    }

    pub fn record_rtt(&mut self, node: NodeId, rtt_micros: u64) {
        if let Some(member) = self.members.get_mut(&node) {
            member.rtt_micros = Some(rtt_micros);
        }
    }

    pub fn record_bandwidth(&mut self, node: NodeId, bytes_per_second: u64) {
        if let Some(member) = self.members.get_mut(&node) {
            // Smoothed: one slow frame (a busy moment) does not halve the
            // estimate.
            member.bandwidth = Some(match member.bandwidth {
                Some(old) => (old * 3 + bytes_per_second) / 4,
                None => bytes_per_second,
            });
        }
    }

    /// A peer serves another model now (it switched).
    pub fn record_model(&mut self, node: NodeId, identity: ModelIdentity) {
        if let Some(member) = self.members.get_mut(&node) {
            member.hello.model = identity;
        }
    }

    /// Records a node's report; true when it shows a link between a pair
    /// known as unreachable (so plans may hold both again).
    pub fn record_status(&mut self, node: NodeId, status: NodeStatus) -> bool {
        let mut relinked = false;
        for link in &status.links {
            relinked |= self.unreachable.remove(&pair(node, link.to)).is_some();
        }
        if let Some(member) = self.members.get_mut(&node) {
            member.hello.serving_since_ms = status.serving_since_ms;
            member.status = Some(status);
        }
        relinked
    }

    /// `a` cannot link to `b`: true when this is news.
    pub fn record_unreachable(&mut self, a: NodeId, b: NodeId, reason: &str) -> bool {
        if a == b || self.linked_pair(a, b) {
            return false;
        }
        self.unreachable
            .insert(pair(a, b), reason.to_string())
            .is_none()
    }

    /// Whether `a` and `b` are linked (as far as this node knows).
    fn linked_pair(&self, a: NodeId, b: NodeId) -> bool {
        let reports = |x: NodeId, y: NodeId| {
            (x == self.me.id && self.members.contains_key(&y))
                || self
                    .members
                    .get(&x)
                    .and_then(|m| m.status.as_ref())
                    .is_some_and(|s| s.links.iter().any(|l| l.to == y))
        };
        reports(a, b) || reports(b, a)
    }

    /// `a` and `b` linked: a plan may hold both again.
    pub fn relinked(&mut self, a: NodeId, b: NodeId) {
        self.unreachable.remove(&pair(a, b));
    }

    /// Forgets the unreachable pairs a node is part of (it left, or it
    /// linked to this one anew).
    pub fn forget_unreachable(&mut self, node: NodeId) {
        self.unreachable
            .retain(|(a, b), _| *a != node && *b != node);
    }

    /// The nodes left out of plans so that no two unreachable nodes are in
    /// one: repeatedly the node in the most such pairs (among equals, the
    /// highest id, which is the newest as often as not).
    fn left_out(&self) -> BTreeSet<NodeId> {
        let mut pairs: Vec<(NodeId, NodeId)> = self.unreachable.keys().copied().collect();
        let mut out = BTreeSet::new();
        while !pairs.is_empty() {
            let mut count: BTreeMap<NodeId, usize> = BTreeMap::new();
            for (a, b) in &pairs {
                *count.entry(*a).or_default() += 1;
                *count.entry(*b).or_default() += 1;
            }
            let Some(worst) = count
                .iter()
                .max_by_key(|(id, n)| (**n, **id))
                .map(|(id, _)| *id)
            else {
                break;
            };
            out.insert(worst);
            pairs.retain(|(a, b)| *a != worst && *b != worst);
        }
        out
    }

    /// Nodes serving the same model file, this one included, by id.
    pub fn compatible(&self) -> Vec<policy::Node> {
        let node = |id: NodeId, name: &str, resources: &Resources| policy::Node {
            id: id.0,
            name: name.to_string(),
            device: resources.device.clone(),
            memory_budget_bytes: resources.memory_budget_bytes,
            compute_score: resources.compute_score,
        };
        let left_out = self.left_out();
        let mut nodes = Vec::new();
        if self.me.stage_lost.is_none() && !left_out.contains(&self.me.id) {
            nodes.push(node(self.me.id, &self.me.name, &self.me.resources));
        }
        nodes.extend(
            self.members
                .values()
                .filter(|m| {
                    m.serves(&self.me.identity)
                        && m.stage_lost.is_none()
                        && !left_out.contains(&m.hello.node)
                })
                .map(|m| node(m.hello.node, &m.hello.name, &m.hello.resources)),
        );
        nodes.sort_by_key(|n| n.id);
        nodes
    }

    /// The most senior node serving this model file: the one that has
    /// served in an active plan the longest, so a node that joins a
    /// running cluster never takes it over whatever its id; among nodes
    /// equally senior (the first plan of a fresh cluster), the lowest id.
    pub fn leader(&self) -> NodeId {
        let seniority = |since: Option<u64>, id: NodeId| (since.unwrap_or(u64::MAX), id);
        self.members
            .values()
            .filter(|m| m.serves(&self.me.identity))
            .map(|m| seniority(m.hello.serving_since_ms, m.hello.node))
            .chain([seniority(self.me.serving_since_ms, self.me.id)])
            .min()
            .map_or(self.me.id, |(_, id)| id)
    }

    /// This node serves in a plan activated at `since_ms`: the first such
    /// plan dates its seniority.
    pub fn serving_in_plan(&mut self, since_ms: u64) {
        let since = self
            .me
            .serving_since_ms
            .map_or(since_ms, |s| s.min(since_ms));
        self.me.serving_since_ms = Some(since);
    }

    /// What this node measured of its links.
    pub fn measurements(&self) -> Vec<LinkMeasurement> {
        self.members
            .iter()
            .filter_map(|(id, m)| {
                Some(LinkMeasurement {
                    to: *id,
                    rtt_micros: m.rtt_micros?,
                    bandwidth_bytes_per_second: m.bandwidth.unwrap_or(0),
                    transport: m.link.transport,
                    handshake_micros: m
                        .link
                        .handshake
                        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                })
            })
            .collect()
    }

    /// The cluster as the policy sees it: the compatible nodes, and every
    /// link between two of them that one end has measured.
    pub fn policy_cluster(&self) -> policy::Cluster {
        let nodes = self.compatible();
        let known: HashSet<u64> = nodes.iter().map(|n| n.id).collect();
        let link = |from: NodeId, m: &LinkMeasurement| policy::Link {
            from: from.0,
            to: m.to.0,
            latency_micros: m.rtt_micros,
            bandwidth_bytes_per_second: m.bandwidth_bytes_per_second,
        };
        let mut links: Vec<policy::Link> = self
            .measurements()
            .iter()
            .map(|m| link(self.me.id, m))
            .collect();
        for (id, member) in &self.members {
            if let Some(status) = &member.status {
                links.extend(status.links.iter().map(|m| link(*id, m)));
            }
        }
        links.retain(|l| known.contains(&l.from) && known.contains(&l.to));
        policy::Cluster { nodes, links }
    }

    /// Requests on a peer's stage as it last reported them.
    pub fn reported_in_flight(&self, node: NodeId) -> u32 {
        self.members
            .get(&node)
            .and_then(|m| m.status.as_ref())
            .map_or(0, |s| s.in_flight)
    }

    /// Bytes a peer's stage has for KV cache, as it last reported them.
    pub fn reported_stage_kv_budget(&self, node: NodeId) -> Option<u64> {
        self.members
            .get(&node)
            .and_then(|m| m.status.as_ref())
            .and_then(|s| s.stage_kv_budget_bytes)
    }

    /// KV cache, in tokens, the requests every peer owns reserve, as they
    /// last reported it.
    pub fn reported_kv_reserved_tokens(&self) -> u64 {
        self.members
            .values()
            .filter_map(|m| m.status.as_ref())
            .map(|s| s.kv_reserved_tokens)
            .sum()
    }

    /// True while some peer reports requests on its stage (a node that
    /// just joined knows this from the status each peer sends first).
    pub fn peers_busy(&self) -> bool {
        self.members
            .values()
            .any(|m| m.status.as_ref().is_some_and(|s| s.in_flight > 0))
    }

    /// Whether every node in `nodes` is this one or a member.
    pub fn linked_to_all(&self, mut nodes: impl Iterator<Item = NodeId>) -> bool {
        nodes.all(|n| n == self.me.id || self.members.contains_key(&n))
    }

    /// Sends a frame to a member; false if it is not linked.
    pub fn send_to(&self, node: NodeId, frame: Frame) -> bool {
        node != self.me.id && self.members.get(&node).is_some_and(|m| m.link.send(frame))
    }

    /// Sends a frame to every member.
    pub fn broadcast(&self, frame: &Frame) {
        for member in self.members.values() {
            member.link.send(frame.clone());
        }
    }

    /// The node is stopping: every member hears why, and its link closes
    /// once that is written.
    pub fn say_goodbye(&self, reason: &str) {
        self.broadcast(&Frame::Bye {
            reason: reason.to_string(),
        });
        for member in self.members.values() {
            member.link.leave();
        }
    }

    pub fn address_of(&self, node: NodeId) -> String {
        if node == self.me.id {
            return self.me.listen.to_string();
        }
        self.members
            .get(&node)
            .map_or_else(String::new, |m| m.address.clone())
    }

    pub fn name_of(&self, node: NodeId) -> String {
        if node == self.me.id {
            return self.me.name.clone();
        }
        self.members
            .get(&node)
            .map_or_else(|| node.to_string(), |m| m.hello.name.clone())
    }
}

/// An unordered pair of nodes, as a key.
fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    if a < b { (a, b) } else { (b, a) }
}

/// Whether this node (`me`) keeps link `new` to `peer` over `existing`,
/// as the peer decides about the same two links. Links dialed from
/// opposite sides (both nodes dialed at once): the one the smaller node
/// id dialed. Links dialed from the same side (it knew two addresses of
/// the other): the one whose session binding is smaller, a value both
/// ends of a link share.
fn keeps(me: NodeId, peer: NodeId, new: &LinkSender, existing: &LinkSender) -> bool {
    let smaller_dialed =
        |link: &LinkSender| (link.dialed && me < peer) || (!link.dialed && peer < me);
    match (smaller_dialed(new), smaller_dialed(existing)) {
        (true, false) => true,
        (false, true) => false,
        _ => new.binding < existing.binding,
    }
}

/// Where a peer is reached: its own address, unless it listens on all
/// interfaces, in which case the IP we see it from and its port.
fn advertised_address(announced: &str, observed: &str) -> String {
    match (
        announced.parse::<SocketAddr>(),
        observed.parse::<SocketAddr>(),
    ) {
        (Ok(a), Ok(o)) if a.ip().is_unspecified() => SocketAddr::new(o.ip(), a.port()).to_string(),
        _ => announced.to_string(),
    }
}

/// Members and hellos for the cluster's unit tests.
#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::cluster::protocol::Resources;

    fn resources() -> Resources {
        Resources {
            device: "cpu".into(),
            device_name: "test".into(),
            memory_total_bytes: 1 << 30,
            memory_available_bytes: 1 << 30,
            memory_budget_bytes: 1 << 29,
            compute_score: 1.0,
        }
    }

    fn identity(fingerprint: &str) -> ModelIdentity {
        ModelIdentity {
            name: "m".into(),
            fingerprint: fingerprint.into(),
        }
    }

    fn membership(me: u64) -> Membership {
        let myself = Myself {
            id: NodeId(me),
            key_fingerprint: String::new(),
            name: format!("node-{me}"),
            cluster: "default".into(),
            listen: "127.0.0.1:5000".parse().expect("address"),
            resources: resources(),
            identity: identity("sha256:a"),
            serving_since_ms: None,
            stage_lost: None,
            ice_servers: Vec::new(),
        };
        Membership::new(myself, vec!["10.0.0.9:52415".into()])
    }

    /// A node's hello in `cluster`, serving the file `fingerprint`.
    pub(in crate::cluster) fn hello(node: u64, cluster: &str, fingerprint: &str) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            node: NodeId(node),
            name: format!("node-{node}"),
            cluster: cluster.into(),
            address: "0.0.0.0:52415".into(),
            resources: resources(),
            model: identity(fingerprint),
            peers: vec![PeerAddress {
                node: NodeId(77),
                address: "10.0.0.77:52415".into(),
            }],
            serving_since_ms: None,
            ice_servers: Vec::new(),
            dtls_fingerprints: None,
        }
    }

    /// Node 3's hello in this node's cluster, over `link` proven with `key`.
    fn admit_node_3(
        members: &mut Membership,
        key: Vec<u8>,
        link: LinkSender,
    ) -> Result<(), Refusal> {
        members.admit(hello(3, "default", "sha256:a"), key, link)
    }

    fn link(dialed: bool) -> LinkSender {
        LinkSender::detached(dialed, "10.0.0.7:40123").0
    }

    #[test]
    fn addresses_of_peers_listening_everywhere_use_the_observed_ip() {
        assert_eq!(
            advertised_address("0.0.0.0:52415", "10.0.0.7:40123"),
            "10.0.0.7:52415"
        );
        assert_eq!(
            advertised_address("10.0.0.9:52415", "10.0.0.7:40123"),
            "10.0.0.9:52415"
        );
        assert_eq!(advertised_address("hostname:1", "10.0.0.7:2"), "hostname:1");
    }

    #[test]
    fn admission_refuses_itself_other_clusters_and_losing_duplicates() {
        let mut members = membership(5);
        assert_eq!(
            members.admit(hello(5, "default", "sha256:a"), Vec::new(), link(true)),
            Err(Refusal::Myself)
        );
        assert_eq!(
            members.admit(hello(3, "lab", "sha256:a"), Vec::new(), link(true)),
            Err(Refusal::OtherCluster)
        );
        assert!(members.members.is_empty());

        // Node 3 < 5: the link node 3 dialed (accepted here) wins.
        let (dialed, mut dialed_frames) = LinkSender::detached(true, "10.0.0.7:40123");
        admit_node_3(&mut members, Vec::new(), dialed).expect("first link");
        assert_eq!(
            admit_node_3(&mut members, Vec::new(), link(true)),
            Err(Refusal::Duplicate),
            "another link dialed by the larger id, over a later session, is refused"
        );
        let accepted = link(false);
        let accepted_id = accepted.id;
        admit_node_3(&mut members, Vec::new(), accepted)
            .expect("the link the smaller id dialed replaces the other");
        assert_eq!(members.members[&NodeId(3)].link.id, accepted_id);
        assert_eq!(members.address_of(NodeId(3)), "10.0.0.7:52415");
        assert!(
            matches!(dialed_frames.try_recv(), Ok(Frame::LinkReplaced)),
            "the peer hears that its link was replaced, so it does not count this node as lost"
        );
    }

    #[test]
    fn two_links_one_side_dialed_end_as_one_at_both_sides_in_either_order() {
        // Node 5 knew two addresses of node 3 and dialed both. Each link's
        // two ends share its session binding; the links came up in one
        // order at node 5 and in the other at node 3.
        let (node_3, node_5) = (NodeId(3), NodeId(5));
        let (mut at_3, mut at_5) = (membership(3), membership(5));
        let end = |dialed: bool, binding: u64| {
            let (mut link, frames) = LinkSender::detached(dialed, "10.0.0.7:40123");
            link.binding = binding;
            (link, frames)
        };
        let ((first_at_5, mut first_at_5_frames), (second_at_5, _)) = (end(true, 40), end(true, 7));
        let ((first_at_3, mut first_at_3_frames), (second_at_3, _)) =
            (end(false, 7), end(false, 40));
        let (kept_at_5, kept_at_3) = (second_at_5.id, first_at_3.id);

        at_5.admit(hello(3, "default", "sha256:a"), Vec::new(), first_at_5)
            .expect("node 5's first link");
        at_5.admit(hello(3, "default", "sha256:a"), Vec::new(), second_at_5)
            .expect("the link with the smaller binding replaces it");
        at_3.admit(hello(5, "default", "sha256:a"), Vec::new(), first_at_3)
            .expect("node 3's first link");
        assert_eq!(
            at_3.admit(hello(5, "default", "sha256:a"), Vec::new(), second_at_3),
            Err(Refusal::Duplicate),
            "the link with the larger binding is refused"
        );
        assert_eq!(at_5.members[&node_3].link.id, kept_at_5);
        assert_eq!(at_3.members[&node_5].link.id, kept_at_3);
        assert_eq!(
            (
                at_5.members[&node_3].link.binding,
                at_3.members[&node_5].link.binding
            ),
            (7, 7),
            "both ends keep the same link"
        );
        assert!(
            matches!(first_at_5_frames.try_recv(), Ok(Frame::LinkReplaced)),
            "node 3 hears that node 5 let the other link go"
        );
        assert!(
            first_at_3_frames.try_recv().is_err(),
            "the kept link carries no word of replacement"
        );
    }

    #[test]
    fn an_address_that_reached_a_member_under_another_is_not_dialed_while_it_stays() {
        // Node 5 dials its --peer (a relay, say) and reaches node 3, which
        // says it is at another address: node 5 dials neither again while
        // node 3 stays, since every such link would be a duplicate.
        let mut members = membership(5);
        let relay = "10.0.0.9:52415";
        assert!(members.start_dialing().contains(&relay.to_string()));
        members.dial_ended(relay);
        let at_its_own = Hello {
            address: "10.0.0.3:52415".into(),
            ..hello(3, "default", "sha256:a")
        };
        members
            .admit(
                at_its_own.clone(),
                Vec::new(),
                LinkSender::detached(true, relay).0,
            )
            .expect("admitted");
        let dialing = members.start_dialing();
        assert!(!dialing.contains(&relay.to_string()), "{dialing:?}");
        assert!(
            !dialing.contains(&"10.0.0.3:52415".to_string()),
            "{dialing:?}"
        );
        for address in &dialing {
            members.dial_ended(address);
        }

        // A second address of it that a peer named: dialed once, then not
        // again while node 3 stays.
        let second = "10.0.1.3:52415";
        members.remember([(NodeId(77), second.to_string())]);
        assert!(members.start_dialing().contains(&second.to_string()));
        members.dial_ended(second);
        assert_eq!(
            members.admit(at_its_own, Vec::new(), LinkSender::detached(true, second).0),
            Err(Refusal::Duplicate),
            "a later session's binding is larger"
        );
        assert!(!members.start_dialing().contains(&second.to_string()));

        // Once node 3 is gone, both are dialed again.
        let link = members.members[&NodeId(3)].link.id;
        members.remove(NodeId(3), link).expect("a member");
        let dialing = members.start_dialing();
        assert!(dialing.contains(&relay.to_string()), "{dialing:?}");
        assert!(dialing.contains(&second.to_string()), "{dialing:?}");
    }

    #[test]
    fn a_peer_that_kept_another_link_stays_a_member_while_that_link_comes_up() {
        // Nodes 3 and 5 dialed each other at once. Here (node 5) the link
        // node 5 dialed came up first; node 3 kept the one it dialed and
        // closed this one before that link's LinkUp reached node 5.
        let mut members = membership(5);
        let ours = link(true);
        let ours_id = ours.id;
        admit_node_3(&mut members, Vec::new(), ours).expect("first link");
        let now = Instant::now();
        let wait = Duration::from_millis(KEPT_LINK_WAIT_MS);
        assert!(members.await_kept_link(NodeId(3), ours_id, now));
        assert!(members.members.contains_key(&NodeId(3)), "still a member");
        assert!(members.kept_links_overdue(now).is_empty());

        // The kept link comes up and takes the closed one's place.
        let kept = link(false);
        let kept_id = kept.id;
        admit_node_3(&mut members, Vec::new(), kept).expect("the kept link");
        assert_eq!(members.members[&NodeId(3)].link.id, kept_id);
        assert!(members.kept_links_overdue(now + wait).is_empty());
        assert!(
            members.remove(NodeId(3), ours_id).is_none(),
            "the closed link's end loses nothing"
        );
        assert!(
            !members.await_kept_link(NodeId(3), ours_id, now),
            "a link already replaced here is not waited on"
        );

        // Even a link the rule would refuse is the one the peer kept while
        // its word is awaited (the peer dialed twice), if the same key
        // proved it; another key's is refused as the rule says.
        assert!(members.await_kept_link(NodeId(3), kept_id, now));
        assert_eq!(
            admit_node_3(&mut members, vec![7; 32], link(true)),
            Err(Refusal::Duplicate),
            "another key does not take the awaited link's place"
        );
        let again = link(true);
        let again_id = again.id;
        admit_node_3(&mut members, Vec::new(), again).expect("the link the peer kept");
        assert_eq!(members.members[&NodeId(3)].link.id, again_id);

        // A kept link that never comes: the member is lost at the end of
        // the wait, not before.
        assert!(members.await_kept_link(NodeId(3), again_id, now));
        assert!(
            members
                .kept_links_overdue(now + wait - Duration::from_millis(1))
                .is_empty()
        );
        assert_eq!(
            members.kept_links_overdue(now + wait),
            vec![(NodeId(3), again_id)]
        );

        // Closing a member whose link is closed already (it fell silent,
        // an admin removed it) ends the wait at once.
        members.close_link(NodeId(3));
        assert_eq!(
            members.kept_links_overdue(Instant::now()),
            vec![(NodeId(3), again_id)]
        );
        assert!(members.remove(NodeId(3), again_id).is_some());
    }

    #[test]
    fn admission_stops_at_the_node_limit_and_learns_peer_addresses() {
        let mut members = membership(1_000);
        for node in 0..MAX_NODES as u64 - 1 {
            members
                .admit(hello(node, "default", "sha256:a"), Vec::new(), link(false))
                .expect("room");
        }
        assert_eq!(
            members.admit(hello(999, "default", "sha256:a"), Vec::new(), link(false)),
            Err(Refusal::Full)
        );
        let dialing = members.start_dialing();
        assert!(
            dialing.contains(&"10.0.0.77:52415".to_string()),
            "{dialing:?}"
        );
        assert!(dialing.contains(&"10.0.0.9:52415".to_string()), "--peer");
        assert!(members.start_dialing().is_empty(), "already dialing");
    }

    #[test]
    fn the_leader_is_the_lowest_id_serving_the_same_file() {
        let mut members = membership(5);
        assert_eq!(members.leader(), NodeId(5));
        members
            .admit(hello(2, "default", "sha256:other"), Vec::new(), link(false))
            .expect("admitted");
        assert_eq!(members.leader(), NodeId(5), "another model file");
        members
            .admit(hello(4, "default", "sha256:a"), Vec::new(), link(false))
            .expect("admitted");
        assert_eq!(members.leader(), NodeId(4));
        let ids: Vec<u64> = members.compatible().iter().map(|n| n.id).collect();
        assert_eq!(ids, vec![4, 5]);
        let gone = members.members[&NodeId(4)].link.id;
        assert!(
            members.remove(NodeId(4), gone + 1_000).is_none(),
            "old link"
        );
        assert!(members.remove(NodeId(4), gone).is_some());
        assert_eq!(members.leader(), NodeId(5));
    }

    #[test]
    fn a_newcomer_does_not_take_over_a_serving_cluster_whatever_its_id() {
        let mut members = membership(5);
        members.serving_in_plan(1_000);
        members
            .admit(hello(1, "default", "sha256:a"), Vec::new(), link(true))
            .expect("admitted");
        assert_eq!(members.leader(), NodeId(5), "the serving node leads");
        // It serves from the joint plan on, later than this node.
        let mut status = NodeStatus {
            in_flight: 0,
            links: Vec::new(),
            memory_available_bytes: 0,
            rss_bytes: 0,
            models: Vec::new(),
            serving_since_ms: Some(2_000),
            kv_reserved_tokens: 0,
            stage_kv_budget_bytes: None,
        };
        members.record_status(NodeId(1), status.clone());
        assert_eq!(members.leader(), NodeId(5));
        // The first plan this node serves in dates it; later ones do not.
        members.serving_in_plan(3_000);
        assert_eq!(members.me.serving_since_ms, Some(1_000));
        // A node that has served longer than this one leads it.
        status.serving_since_ms = Some(500);
        members.record_status(NodeId(1), status);
        assert_eq!(members.leader(), NodeId(1));
    }
}
