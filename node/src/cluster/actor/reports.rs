//! This node's reports: its status to peers, each stage's load to the
//! coordinator, and model downloads across the cluster.

use super::Cluster;
use crate::cluster::protocol::Frame;
use crate::cluster::status::{Load, reports_model};
use crate::engine::KvRoom;
use crate::limits::STAGE_REQUEST_LIMIT;
use crate::model_store::CatalogueEntry;
use crate::policy::StageLoad;

impl Cluster {
    pub(super) fn send_status(&mut self) {
        let load = self.load();
        let status = self.local.report(
            load,
            self.membership.measurements(),
            self.membership.me.serving_since_ms,
        );
        self.local.reported(load);
        self.membership.broadcast(&Frame::NodeStatus(status));
    }

    /// What this node tells peers of its load.
    pub(super) fn load(&self) -> Load {
        Load {
            in_flight: self.routing.in_flight(),
            kv_reserved_tokens: *self.reserved_tokens.borrow(),
            stage_kv_budget_bytes: self.stage_kv_budget(),
        }
    }

    /// Bytes this node's stage has for KV cache: what its memory budget
    /// leaves beside its weights, at most `--kv-cache`.
    fn stage_kv_budget(&self) -> Option<u64> {
        let stage = self.planning.local_stage.as_ref()?;
        let budget = self.membership.me.resources.memory_budget_bytes;
        Some(
            budget
                .saturating_sub(stage.weight_bytes)
                .min(self.kv_cache_bytes),
        )
    }

    /// The active plan's room for KV cache: the stage whose budget holds
    /// the fewest tokens over its layers, and what the other owners'
    /// requests reserve. `None` until a stage has said its budget.
    fn kv_room(&self) -> Option<KvRoom> {
        let plan = self.planning.active()?;
        let me = self.me();
        let per_layer = self.model.config().kv_bytes_per_token_per_layer().max(1);
        let mut tightest = None;
        for stage in &plan.message.stages {
            let budget = if stage.node == me {
                self.stage_kv_budget()
            } else {
                self.membership.reported_stage_kv_budget(stage.node)
            };
            let Some(budget) = budget else {
                continue; // not said yet: it reports within a status interval
            };
            let layers = stage.layers.len().max(1) as u64;
            let capacity_tokens = budget / (layers * per_layer);
            if tightest
                .as_ref()
                .is_none_or(|&(tokens, _, _)| capacity_tokens < tokens)
            {
                tightest = Some((capacity_tokens, stage, budget));
            }
        }
        let (capacity_tokens, stage, budget) = tightest?;
        let others_tokens = self.membership.reported_kv_reserved_tokens();
        Some(KvRoom {
            capacity_tokens,
            stage: format!(
                "node {} (layers {}, {:.1} MiB for KV cache)",
                self.membership.name_of(stage.node),
                stage.layers,
                budget as f64 / (1u64 << 20) as f64
            ),
            others_tokens,
        })
    }

    /// Publishes the plan's room for KV cache for the coordinator. It
    /// changes only with the plan, this node's stage and the peers'
    /// reports, so the actor calls this after those, not per token.
    pub(super) fn publish_kv_room(&self) {
        let room = self.kv_room();
        self.kv_room.send_if_modified(|current| {
            let modified = *current != room;
            if modified {
                *current = room;
            }
            modified
        });
    }

    /// Tells peers at once when this node's load changed, and the local
    /// coordinator what every stage carries; true when the load changed.
    pub(super) fn track_load(&mut self) -> bool {
        let load = self.load();
        let in_flight = load.in_flight;
        let changed = self.local.load_changed(load);
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
