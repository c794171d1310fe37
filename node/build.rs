//! Builds the default scheduling policy (`scheduler-wasm`) as a
//! `wasm32-wasip2` component and hands it to the node, which embeds it:
//! part of the normal build, no manual step.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let workspace = manifest_dir.parent().unwrap_or(&manifest_dir).to_path_buf();
    for watched in ["scheduler-wasm/src", "scheduler-wasm/Cargo.toml", "wit"] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let target_dir = policy_target_dir(&out_dir);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    let mut command = Command::new(cargo);
    command
        .current_dir(&workspace)
        .args([
            "build",
            "--release",
            "--package",
            "ringlet-scheduler",
            "--lib",
            "--target",
            "wasm32-wasip2",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's flags (target-cpu=native) and target settings are
    // not for wasm.
    for variable in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        command.env_remove(variable);
    }
    let status = command.status();
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => fail(&format!(
            "building the default policy for wasm32-wasip2 failed ({status}). The target is listed in \
             rust-toolchain.toml; if rustup did not install it, run `rustup target add wasm32-wasip2`."
        )),
        Err(error) => fail(&format!(
            "cannot run cargo to build the default policy: {error}"
        )),
    }
    let built = target_dir.join("wasm32-wasip2/release/scheduler.wasm");
    if let Err(error) = std::fs::copy(&built, out_dir.join("default_policy.wasm")) {
        fail(&format!("cannot copy {}: {error}", built.display()));
    }
}

/// `<target>/policies`, beside the outer build's own directories: a separate
/// target directory, since the outer build holds the lock on its own.
fn policy_target_dir(out_dir: &Path) -> PathBuf {
    // OUT_DIR is <target>/<profile>/build/<package>-<hash>/out.
    out_dir.ancestors().nth(4).map_or_else(
        || out_dir.join("policies"),
        |target| target.join("policies"),
    )
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}
