//! Builds what the node embeds, as part of the normal build with no manual
//! step: the default scheduling policy (`scheduler-wasm`) as a
//! `wasm32-wasip2` component, and the dashboard (`web-ui`) for
//! `wasm32-unknown-unknown`, with its JavaScript glue from
//! wasm-bindgen's library (no CLI to install).

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let workspace = manifest_dir.parent().unwrap_or(&manifest_dir).to_path_buf();
    for watched in [
        "api-types/src",
        "api-types/Cargo.toml",
        "scheduler-wasm/src",
        "scheduler-wasm/Cargo.toml",
        "wit",
        "web-ui/src",
        "web-ui/Cargo.toml",
        "web-ui/Cargo.lock",
        "web-ui/index.html",
        "web-ui/style.css",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    build_default_policy(&workspace, &out_dir);
    build_dashboard(&workspace, &out_dir);
}

fn build_default_policy(workspace: &Path, out_dir: &Path) {
    let target_dir = nested_target_dir(out_dir, "policies");
    let mut command = nested_cargo(workspace);
    command
        .args([
            "--package",
            "ringlet-scheduler",
            "--lib",
            "--target",
            "wasm32-wasip2",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    run(command, "the default policy", "wasm32-wasip2");
    let built = target_dir.join("wasm32-wasip2/release/scheduler.wasm");
    if let Err(error) = std::fs::copy(&built, out_dir.join("default_policy.wasm")) {
        fail(&format!("cannot copy {}: {error}", built.display()));
    }
}

/// Builds `web-ui`, generates its JavaScript glue, and writes the files
/// the node serves under content-hashed names (so browsers may cache them
/// for good) with an `index.html` that loads them, plus `dashboard.rs`,
/// which lists them for `include_bytes!`.
fn build_dashboard(workspace: &Path, out_dir: &Path) {
    let web_ui = workspace.join("web-ui");
    let target_dir = nested_target_dir(out_dir, "web-ui");
    let mut command = nested_cargo(workspace);
    command
        .arg("--manifest-path")
        .arg(web_ui.join("Cargo.toml"))
        .args(["--locked", "--target", "wasm32-unknown-unknown"])
        .arg("--target-dir")
        .arg(&target_dir);
    run(command, "the dashboard", "wasm32-unknown-unknown");

    let glue_dir = out_dir.join("dashboard-glue");
    let built = target_dir.join("wasm32-unknown-unknown/release/ringlet_web_ui.wasm");
    let generated = wasm_bindgen_cli_support::Bindgen::new()
        .input_path(&built)
        .web(true)
        .and_then(|b| {
            b.typescript(false)
                .out_name("ringlet_ui")
                .generate(&glue_dir)
        });
    if let Err(error) = generated {
        fail(&format!(
            "wasm-bindgen failed on {}: {error:#}. web-ui/Cargo.toml pins wasm-bindgen to the \
             version of wasm-bindgen-cli-support in node/Cargo.toml; keep the two equal.",
            built.display()
        ));
    }

    let read = |path: PathBuf| {
        std::fs::read(&path)
            .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", path.display())))
    };
    let assets_dir = out_dir.join("dashboard");
    let _ = std::fs::remove_dir_all(&assets_dir);
    if let Err(error) = std::fs::create_dir_all(&assets_dir) {
        fail(&format!("cannot create {}: {error}", assets_dir.display()));
    }
    let mut assets = Vec::new();
    let mut place = |stem: &str, extension: &str, content_type: &str, bytes: Vec<u8>| {
        let digest = Sha256::digest(&bytes);
        let hash: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
        let name = format!("{stem}-{hash}.{extension}");
        let path = assets_dir.join(&name);
        if let Err(error) = std::fs::write(&path, &bytes) {
            fail(&format!("cannot write {}: {error}", path.display()));
        }
        assets.push((name.clone(), content_type.to_string(), path));
        name
    };
    let wasm = place(
        "ringlet-ui",
        "wasm",
        "application/wasm",
        read(glue_dir.join("ringlet_ui_bg.wasm")),
    );
    let js = place(
        "ringlet-ui",
        "js",
        "text/javascript; charset=utf-8",
        read(glue_dir.join("ringlet_ui.js")),
    );
    let css = place(
        "style",
        "css",
        "text/css; charset=utf-8",
        read(web_ui.join("style.css")),
    );
    // A file, not an inline script, so the page's Content-Security-Policy
    // can forbid inline scripts.
    let boot = format!(
        "import init from \"/assets/{js}\";\n\
         init({{ module_or_path: \"/assets/{wasm}\" }}).catch((error) => {{\n  \
         document.body.textContent = \"The dashboard failed to start: \" + error;\n}});\n"
    );
    let boot = place(
        "boot",
        "js",
        "text/javascript; charset=utf-8",
        boot.into_bytes(),
    );
    let template = String::from_utf8(read(web_ui.join("index.html")))
        .unwrap_or_else(|_| fail("web-ui/index.html is not UTF-8"));
    let index = template
        .replace("{{wasm}}", &wasm)
        .replace("{{js}}", &js)
        .replace("{{css}}", &css)
        .replace("{{boot}}", &boot);
    let index_path = assets_dir.join("index.html");
    if let Err(error) = std::fs::write(&index_path, index) {
        fail(&format!("cannot write {}: {error}", index_path.display()));
    }

    let mut listing = String::from(
        "/// The dashboard's page.\n\
         pub const INDEX_HTML: &[u8] = include_bytes!(",
    );
    listing.push_str(&format!("{:?});\n", index_path.display().to_string()));
    listing.push_str(
        "/// The files it loads: name, content type, bytes.\n\
         pub const ASSETS: &[(&str, &str, &[u8])] = &[\n",
    );
    for (name, content_type, path) in &assets {
        listing.push_str(&format!(
            "    ({name:?}, {content_type:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        ));
    }
    listing.push_str("];\n");
    let listing_path = out_dir.join("dashboard.rs");
    if let Err(error) = std::fs::write(&listing_path, listing) {
        fail(&format!("cannot write {}: {error}", listing_path.display()));
    }
}

/// `cargo build --release` for a wasm target, run from the workspace.
fn nested_cargo(workspace: &Path) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(workspace).args(["build", "--release"]);
    // The outer build's flags (target-cpu=native) and target settings are
    // not for wasm; nor is `cargo clippy`'s wrapper, which would lint the
    // policy's generated bindings with the outer run's `-D warnings`.
    for variable in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
    ] {
        command.env_remove(variable);
    }
    command
}

fn run(mut command: Command, what: &str, target: &str) {
    ensure_target(target);
    match command.status() {
        Ok(status) if status.success() => {}
        Ok(status) => fail(&format!(
            "building {what} for {target} failed ({status}); the messages above say why"
        )),
        Err(error) => fail(&format!("cannot run cargo to build {what}: {error}")),
    }
}

/// Installs the standard library for `target` when the toolchain lacks it.
/// rustup installs the targets of `rust-toolchain.toml` only when it
/// installs the toolchain itself, so a machine that already had this
/// toolchain can lack them; `cargo build` then works there too.
fn ensure_target(target: &str) {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let libdir = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", target])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()));
    let installed = libdir
        .and_then(|dir| std::fs::read_dir(dir).ok())
        .is_some_and(|mut entries| {
            entries.any(|entry| {
                entry.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("libstd-"))
            })
        });
    if installed {
        return;
    }
    println!(
        "cargo:warning=the Rust standard library for {target} is missing; installing it with `rustup target add {target}`"
    );
    let mut rustup = Command::new("rustup");
    rustup.args(["target", "add", target]);
    if let Some(toolchain) = std::env::var_os("RUSTUP_TOOLCHAIN") {
        rustup.arg("--toolchain").arg(toolchain);
    }
    match rustup.status() {
        Ok(status) if status.success() => {}
        Ok(status) => fail(&format!(
            "`rustup target add {target}` failed ({status}); run it by hand, then build again"
        )),
        Err(error) => fail(&format!(
            "the Rust standard library for {target} is missing and rustup cannot be run ({error}); \
             install the target for this toolchain (rust-toolchain.toml), then build again"
        )),
    }
}

/// `<target>/<name>`, beside the outer build's own directories: a separate
/// target directory, since the outer build holds the lock on its own.
fn nested_target_dir(out_dir: &Path, name: &str) -> PathBuf {
    // OUT_DIR is <target>/<profile>/build/<package>-<hash>/out.
    out_dir
        .ancestors()
        .nth(4)
        .map_or_else(|| out_dir.join(name), |target| target.join(name))
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}
