//! The dashboard in a real browser: headless Chromium, driven by
//! `tests/browser/dashboard.cjs` (playwright-core), against a real
//! two-node cluster. Screenshots are kept in
//! `<target>/test-artifacts/dashboard/`.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::Node;

const TOKEN: &str = "dashboard-admin-token";

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

    let nodes = Node::start_cluster(2, &["--admin-token", TOKEN]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/browser/dashboard.cjs");
    let output = Command::new("node")
        .arg(&script)
        .env("RINGLET_BROWSER_MODULES", modules)
        .env("RINGLET_URL", format!("http://{}", nodes[0].addr))
        .env("RINGLET_POLICY", &policy_path)
        .env("RINGLET_TOKEN", TOKEN)
        .env("RINGLET_SCREENSHOTS", &artifacts)
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
