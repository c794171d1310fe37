//! Zero-config discovery on the local network with mDNS (DNS-SD).
//!
//! Each node advertises a `_ringlet._tcp.local.` service whose TXT record
//! carries its node id, name, cluster name and protocol version, and whose
//! SRV record carries its API port. It browses for the others and hands
//! each one it may join to the cluster actor, which links to it like a
//! `--peer`. Whether a peer is alive is the links' business (heartbeats),
//! not mDNS's: a killed node sends no goodbye and its records outlive it.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use scheduler::NodeId;
use tokio::sync::mpsc;

use super::ClusterEvent;
use super::protocol::PROTOCOL_VERSION;

/// The DNS-SD service type every ringlet node advertises.
pub const SERVICE_TYPE: &str = "_ringlet._tcp.local.";

/// TXT record keys.
const KEY_NODE: &str = "node";
const KEY_NAME: &str = "name";
const KEY_CLUSTER: &str = "cluster";
const KEY_PROTOCOL: &str = "protocol";
const KEY_VERSION: &str = "version";

/// What this node advertises.
#[derive(Debug, Clone)]
pub struct Advertisement {
    pub node: NodeId,
    pub name: String,
    pub cluster: String,
    /// The API address as bound; an unspecified IP advertises every
    /// address of the machine.
    pub listen: SocketAddr,
}

/// Another node's advertisement, as resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAdvert {
    pub node: NodeId,
    pub name: String,
    pub cluster: String,
    pub protocol_version: u32,
    /// Its ringlet version, for the log.
    pub version: String,
    pub addresses: Vec<SocketAddr>,
}

/// What to do with an advertisement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// This node's own.
    Myself,
    Join,
    /// Listed, not joined: the reason says why.
    Skip(String),
}

/// Decides about `peer` for node `me` of cluster `cluster`.
pub fn judge(me: NodeId, cluster: &str, peer: &PeerAdvert) -> Verdict {
    if peer.node == me {
        Verdict::Myself
    } else if peer.cluster != cluster {
        Verdict::Skip(format!(
            "it is in cluster `{}`, this node in `{cluster}` (start nodes with the same --cluster to pool them)",
            peer.cluster
        ))
    } else if peer.protocol_version != PROTOCOL_VERSION {
        Verdict::Skip(format!(
            "it speaks protocol version {} (ringlet {}), this node speaks {PROTOCOL_VERSION} (ringlet {}); run the same ringlet version on every node",
            peer.protocol_version,
            peer.version,
            env!("CARGO_PKG_VERSION")
        ))
    } else {
        Verdict::Join
    }
}

/// Reads a resolved service's TXT record; `None` when a field is missing
/// or malformed (not a ringlet node, or a broken one).
fn parse(service: &mdns_sd::ResolvedService) -> Option<PeerAdvert> {
    let node = u64::from_str_radix(service.get_property_val_str(KEY_NODE)?, 16).ok()?;
    let port = service.get_port();
    let mut addresses: Vec<SocketAddr> = service
        .get_addresses_v4()
        .into_iter()
        // Loopback reaches this machine, not the peer.
        .filter(|ip| !ip.is_loopback())
        .map(|ip| SocketAddr::new(IpAddr::V4(ip), port))
        .collect();
    addresses.sort();
    Some(PeerAdvert {
        node: NodeId(node),
        name: service.get_property_val_str(KEY_NAME)?.to_string(),
        cluster: service.get_property_val_str(KEY_CLUSTER)?.to_string(),
        protocol_version: service.get_property_val_str(KEY_PROTOCOL)?.parse().ok()?,
        version: service
            .get_property_val_str(KEY_VERSION)
            .unwrap_or("unknown")
            .to_string(),
        addresses,
    })
}

/// The running advertisement and browser; dropping it withdraws the
/// advertisement (peers see a goodbye) and stops the daemon.
pub struct Discovery {
    daemon: ServiceDaemon,
    fullname: String,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        let _ = self.daemon.unregister(&self.fullname);
        let _ = self.daemon.shutdown();
    }
}

/// Advertises this node and reports the nodes found to the cluster actor.
pub(crate) fn start(
    advert: Advertisement,
    events: mpsc::Sender<ClusterEvent>,
) -> Result<Discovery, mdns_sd::Error> {
    let daemon = ServiceDaemon::new()?;
    // Peers on other machines cannot use loopback addresses.
    daemon.disable_interface(vec![IfKind::LoopbackV4, IfKind::LoopbackV6])?;
    let id = format!("{:016x}", advert.node.0);
    // Instance names must be unique on the network; the name alone may
    // not be (two machines with one host name).
    let instance = format!("{}-{}", advert.name, &id[..8]);
    let host = format!("ringlet-{id}.local.");
    let protocol = PROTOCOL_VERSION.to_string();
    let properties = [
        (KEY_NODE, id.as_str()),
        (KEY_NAME, advert.name.as_str()),
        (KEY_CLUSTER, advert.cluster.as_str()),
        (KEY_PROTOCOL, protocol.as_str()),
        (KEY_VERSION, env!("CARGO_PKG_VERSION")),
    ];
    let ip = advert.listen.ip();
    let service = if ip.is_unspecified() {
        ServiceInfo::new(
            SERVICE_TYPE,
            &instance,
            &host,
            "",
            advert.listen.port(),
            &properties[..],
        )?
        .enable_addr_auto()
    } else {
        ServiceInfo::new(
            SERVICE_TYPE,
            &instance,
            &host,
            ip,
            advert.listen.port(),
            &properties[..],
        )?
    };
    let fullname = service.get_fullname().to_string();
    daemon.register(service)?;
    let browse = daemon.browse(SERVICE_TYPE)?;
    tracing::info!(service = SERVICE_TYPE, cluster = %advert.cluster, "looking for peers on the local network (mDNS)");
    tokio::spawn(follow(browse, advert, events));
    Ok(Discovery { daemon, fullname })
}

/// Turns browse events into cluster events, logging each peer once per
/// address.
async fn follow(
    browse: mdns_sd::Receiver<ServiceEvent>,
    advert: Advertisement,
    events: mpsc::Sender<ClusterEvent>,
) {
    // What was logged, by service name: each address set once. The actor
    // keeps the advertisements themselves.
    let mut logged: HashSet<(String, Vec<SocketAddr>)> = HashSet::new();
    while let Ok(event) = browse.recv_async().await {
        let event = match event {
            ServiceEvent::ServiceResolved(service) => {
                let Some(peer) = parse(&service) else {
                    tracing::debug!(service = %service.get_fullname(), "ignoring an advertisement without ringlet's fields");
                    continue;
                };
                let verdict = judge(advert.node, &advert.cluster, &peer);
                if verdict == Verdict::Myself || peer.addresses.is_empty() {
                    continue;
                }
                let fullname = service.get_fullname().to_string();
                let first = logged.insert((fullname.clone(), peer.addresses.clone()));
                let shown = describe(&peer.addresses);
                match &verdict {
                    Verdict::Join if first => {
                        tracing::info!(node = %peer.node, "discovered peer {} at {shown}", peer.name)
                    }
                    Verdict::Skip(reason) if first => {
                        tracing::warn!(node = %peer.node, "not joining peer {} at {shown}: {reason}", peer.name)
                    }
                    _ => {}
                }
                ClusterEvent::Discovered {
                    fullname,
                    peer,
                    verdict,
                }
            }
            ServiceEvent::ServiceRemoved(_, fullname) => {
                logged.retain(|(name, _)| *name != fullname);
                tracing::debug!(service = %fullname, "an advertisement was withdrawn");
                ClusterEvent::Withdrawn { fullname }
            }
            _ => continue,
        };
        if events.send(event).await.is_err() {
            break; // the cluster stopped
        }
    }
}

fn describe(addresses: &[SocketAddr]) -> String {
    addresses
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(cluster: &str, protocol_version: u32) -> PeerAdvert {
        PeerAdvert {
            node: NodeId(7),
            name: "attic".into(),
            cluster: cluster.into(),
            protocol_version,
            version: "0.1.0".into(),
            addresses: vec!["10.0.0.7:52415".parse().expect("address")],
        }
    }

    #[test]
    fn joins_only_its_own_cluster_and_protocol() {
        assert_eq!(
            judge(NodeId(1), "home", &peer("home", PROTOCOL_VERSION)),
            Verdict::Join
        );
        assert_eq!(
            judge(NodeId(7), "home", &peer("home", PROTOCOL_VERSION)),
            Verdict::Myself
        );
        let Verdict::Skip(reason) = judge(NodeId(1), "home", &peer("lab", PROTOCOL_VERSION)) else {
            panic!("another cluster is skipped");
        };
        assert!(
            reason.contains("cluster `lab`") && reason.contains("--cluster"),
            "{reason}"
        );
        let Verdict::Skip(reason) = judge(NodeId(1), "home", &peer("home", PROTOCOL_VERSION + 1))
        else {
            panic!("another protocol is skipped");
        };
        assert!(reason.contains("protocol version"), "{reason}");
    }
}
