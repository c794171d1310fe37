//! The WIT glue that makes this crate the default policy component: the
//! contract's records in, the built-in policy ([`crate::contract`]), the
//! records out. No logic here.

wit_bindgen::generate!({ world: "policy", path: "../wit" });

crate::contract_conversions!(ringlet::scheduler::types);

struct DefaultPolicy;

impl Guest for DefaultPolicy {
    fn info() -> PolicyInfo {
        PolicyInfo {
            name: "memory-weighted".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn place(cluster: Cluster, model: Model) -> Result<Plan, String> {
        crate::contract::place(&cluster.into(), &model.into())
            .map(Into::into)
            .map_err(|e| e.to_string())
    }

    fn schedule(queue: Vec<WaitingRequest>, stages: Vec<StageLoad>) -> Vec<u64> {
        let queue: Vec<crate::contract::WaitingRequest> =
            queue.into_iter().map(Into::into).collect();
        let stages: Vec<crate::contract::StageLoad> = stages.into_iter().map(Into::into).collect();
        crate::contract::schedule(&queue, &stages)
    }
}

export!(DefaultPolicy);
