//! Switching the cluster's model without restarting a node: the node an
//! admin asked tells every peer, each node opens the new model (its header
//! only, from the Hub or from peers), swaps it in, drops the old plan and
//! says which model it serves now; the leader then plans the new model on
//! the nodes that serve it.

use std::sync::Arc;

use scheduler::NodeId;

use super::{Cluster, policy_model};
use crate::cluster::protocol::{Frame, ModelIdentity};
use crate::cluster::{ClusterEvent, SwitchedModel};

impl Cluster {
    /// An admin asked this node to switch the cluster to `model`: tell
    /// every peer, and switch here. Returns the names of the nodes told.
    pub(super) fn switch_cluster(&mut self, model: String) -> Vec<String> {
        let proof = self.admin_proof(&super::trust::switch_change(&model));
        self.membership.broadcast(&Frame::SwitchModel {
            model: model.clone(),
            proof,
        });
        let mut told = vec![self.membership.me.name.clone()];
        told.extend(
            self.membership
                .members
                .values()
                .map(|m| m.hello.name.clone()),
        );
        tracing::info!(%model, nodes = ?told, "switching the cluster's model");
        self.switch_here(model);
        told
    }

    /// Opens `model` here unless it is served already or being opened.
    pub(super) fn switch_here(&mut self, model: String) {
        if model == self.membership.me.identity.name {
            // Back to the model served: a switch still opening is void.
            self.switching = None;
            return;
        }
        if self.switching.as_ref() == Some(&model) {
            return;
        }
        self.switching = Some(model.clone());
        self.downloads.running(&model, 0, 0);
        let open = Arc::clone(&self.open_model);
        let peers = self.membership.peer_addresses();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let result = open(model.clone(), peers).await;
            let _ = events
                .send(ClusterEvent::ModelOpened { model, result })
                .await;
        });
    }

    /// The model asked for is open: swap it in (with the engine and the
    /// API), drop the old plan, and tell the peers. A model a newer switch
    /// replaced meanwhile is dropped.
    pub(super) fn model_opened(&mut self, model: String, result: Result<SwitchedModel, String>) {
        if self.switching.as_ref() != Some(&model) {
            tracing::info!(%model, "a newer switch replaced this one; not swapping it in");
            self.downloads.ended(&model, Ok(()));
            return;
        }
        self.switching = None;
        let switched = match result {
            Ok(switched) => switched,
            Err(error) => {
                tracing::error!(%model, %error, "cannot switch to the model; still serving the old one");
                self.downloads.ended(&model, Err(error));
                return;
            }
        };
        self.downloads.ended(&model, Ok(()));
        (switched.commit)();
        let identity = ModelIdentity {
            name: switched.name.clone(),
            fingerprint: switched.file.fingerprint().to_string(),
        };
        let old = std::mem::replace(&mut self.membership.me.identity, identity.clone());
        let reason = format!(
            "the cluster switched from {} to {}; retry the request",
            old.name, identity.name
        );
        self.fail_owned(&reason);
        self.routing.clear_hosted();
        self.planning
            .forget_plan(format!("switching to {}", identity.name));
        self.stop_loading();
        // A fetch of the old model's layers stopped: it reports no more.
        self.downloads.ended(&old.name, Ok(()));
        self.policy_model = policy_model(&switched.file);
        self.model = switched.file;
        self.grammars = switched.grammars;
        self.hub_files = switched.hub_files;
        self.local.set_serving(identity.name.clone());
        tracing::info!(from = %old.name, to = %identity.name, fingerprint = %identity.fingerprint, "now serving another model");
        self.membership.broadcast(&Frame::ModelChanged { identity });
    }

    /// A peer serves another model now.
    pub(super) fn peer_switched(&mut self, from: NodeId, identity: ModelIdentity) {
        tracing::info!(peer = %self.membership.name_of(from), model = %identity.name, "a peer switched models");
        self.membership.record_model(from, identity);
        self.planning.replan_soon();
    }
}
