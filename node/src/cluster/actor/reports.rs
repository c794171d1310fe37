//! This node's reports: its status to peers, each stage's load to the
//! coordinator, and model downloads across the cluster.

use super::Cluster;
use crate::cluster::protocol::Frame;
use crate::cluster::status::reports_model;
use crate::limits::STAGE_REQUEST_LIMIT;
use crate::model_store::CatalogueEntry;
use crate::policy::StageLoad;

impl Cluster {
    pub(super) fn send_status(&mut self) {
        let in_flight = self.routing.in_flight();
        let status = self.local.report(
            in_flight,
            self.membership.measurements(),
            self.membership.me.serving_since_ms,
        );
        self.local.reported(in_flight);
        self.membership.broadcast(&Frame::NodeStatus(status));
    }

    /// Tells peers at once when this stage's load changed, and the local
    /// coordinator what every stage carries; true when the load changed.
    pub(super) fn track_load(&mut self) -> bool {
        let in_flight = self.routing.in_flight();
        let changed = self.local.load_changed(in_flight);
        if changed {
            self.send_status();
        }
        let me = self.me();
        let loads: Vec<StageLoad> = self
            .planning
            .active()
            .map(|p| {
                p.message
                    .stages
                    .iter()
                    .map(|s| StageLoad {
                        node: s.node.0,
                        in_flight: if s.node == me {
                            in_flight
                        } else {
                            self.membership.reported_in_flight(s.node)
                        },
                        limit: STAGE_REQUEST_LIMIT,
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.stage_loads.send_if_modified(|current| {
            let modified = *current != loads;
            if modified {
                *current = loads;
            }
            modified
        });
        changed
    }

    /// Starts fetching `entry` here and asks every peer to do the same;
    /// returns the names of the nodes that lack it.
    pub(super) fn fetch_model(&mut self, entry: &'static CatalogueEntry) -> Vec<String> {
        let mut fetching = Vec::new();
        if self.local.fetch(entry) {
            fetching.push(self.membership.me.name.clone());
        }
        let proof = self.admin_proof(&super::trust::fetch_change(entry.name));
        self.membership.broadcast(&Frame::FetchModel {
            name: entry.name.to_string(),
            proof,
        });
        for member in self.membership.members.values() {
            if !reports_model(member.status.as_ref(), entry.name) {
                fetching.push(member.hello.name.clone());
            }
        }
        tracing::info!(model = entry.name, nodes = ?fetching, "fetching model onto the nodes that lack it");
        fetching
    }
}
