//! A Hub model file held in part, in the Hugging Face cache.
//!
//! A complete file lives where `huggingface_hub` puts it
//! (`models--ORG--REPO/blobs/<etag>`, linked from
//! `snapshots/<commit>/<file>`), and one found there is used as it is. A
//! file this node holds only part of lives beside it, under
//! `models--ORG--REPO/.ringlet/`: `<etag>.partial`, a sparse file of the
//! full size where only the fetched bytes are written (the holes take no
//! disk), and `<etag>.ranges.json`, which bytes those are. A range is
//! recorded only after its bytes are written, so a killed node loses at
//! most the ranges in flight, and a later plan needing other layers
//! fetches only what the record lacks. The kernels open the partial file
//! like any GGUF file: they read the header, then only the tensors of the
//! layers asked for, which are the bytes fetched. A model split in parts
//! is one such file per part, each complete or partial on its own.

use std::collections::HashSet;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::{BoxFuture, FutureExt};
use hf_hub::Repo;

use super::client::{HubClient, HubError, RemoteFile};
use super::naming::{HubModel, choose_file};
use super::ranges::{self, RangeSet};
use crate::limits::{
    HUB_CHUNK_BYTES, HUB_CONCURRENT_RANGES, HUB_HEADER_FIRST_BYTES, HUB_HEADER_MAX_BYTES,
    HUB_RETRY_FIRST_MS, HUB_RETRY_MAX_MS, HUB_TRIES,
};

/// A Hub model ready to open.
#[derive(Debug, Clone)]
pub struct HubFile {
    /// The name API clients use (`ORG/REPO:QUANT`).
    pub name: String,
    /// The GGUF file to open, or its parts in order: complete, or partial
    /// with their headers.
    pub paths: Vec<PathBuf>,
    /// The files, to fetch the ranges a shard needs (nothing when they are
    /// complete) and to share them with peers.
    pub files: Arc<HubFiles>,
}

/// What a fetch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetched {
    /// Bytes wanted in all.
    pub wanted: u64,
    /// Bytes of those already on disk.
    pub on_disk: u64,
    /// Bytes downloaded now.
    pub downloaded: u64,
}

/// The files of a Hub model (one, or the parts of a split one), each
/// complete or held in part. Fetches what a shard needs, from peers first
/// and the Hub last, and tells peers what it holds.
#[derive(Debug)]
pub struct HubFiles {
    /// The name API clients use.
    name: String,
    parts: Vec<Part>,
    /// One fetch at a time: a second plan's fetch waits, then finds most of
    /// its bytes on disk instead of fetching them twice.
    fetching: tokio::sync::Mutex<()>,
}

/// One file of a model.
#[derive(Debug)]
enum Part {
    Complete { path: PathBuf, remote: RemoteFile },
    Partial(Box<PartialFile>),
}

/// One Hub file of which this node holds some ranges.
#[derive(Debug)]
struct PartialFile {
    client: HubClient,
    remote: RemoteFile,
    data_path: PathBuf,
    record_path: PathBuf,
    data: File,
    have: Mutex<RangeSet>,
}

/// Finds the file `model` names and makes it ready to open: a complete
/// file already in the cache as it is; otherwise a partial file holding
/// (at least) the header. The same for each part of a split model. When
/// the Hub cannot be reached, a complete file cached earlier for the same
/// name serves, else the files a peer (`peers`, HOST:PORT) serves under
/// that name, fetched from the peers.
pub async fn open(
    client: &HubClient,
    model: &HubModel,
    peers: &[String],
) -> Result<HubFile, HubError> {
    let remotes = match client.resolve(model).await {
        Ok(remotes) => remotes,
        Err(error @ HubError::Unreachable { .. }) => {
            if let Some(remotes) = cached_offline(client, model) {
                tracing::warn!(%error, "the Hub is unreachable; serving the file cached for this name");
                remotes
            } else if let Some((peer, remotes)) = from_peers(client, model, peers).await {
                tracing::warn!(%error, %peer, "the Hub is unreachable; fetching the model from peers, as {peer} serves it");
                remotes
            } else {
                return Err(error);
            }
        }
        Err(error) => return Err(error),
    };
    let Some(first) = remotes.first() else {
        return Err(HubError::Choice(super::naming::ChoiceError::NoGguf {
            repo: model.repo.clone(),
        }));
    };
    let name = first.model_name();
    tracing::info!(
        repo = %first.repo,
        file = %first.file,
        parts = remotes.len(),
        quant = first.quant.as_deref().unwrap_or("unknown"),
        commit = %first.commit,
        size_mib = remotes.iter().map(|r| r.size).sum::<u64>() >> 20,
        "chose the model file on the Hugging Face Hub"
    );
    let mut parts = Vec::with_capacity(remotes.len());
    for remote in remotes {
        let cache = CachePaths::new(client, &remote);
        if std::fs::metadata(&cache.blob).is_ok_and(|m| m.len() == remote.size) {
            cache.link_snapshot(client, &remote)?;
            tracing::info!(path = %cache.snapshot.display(), "the model file is in the Hugging Face cache already");
            parts.push(Part::Complete {
                path: cache.snapshot,
                remote,
            });
            continue;
        }
        let partial = PartialFile::create(client.clone(), remote, &cache)?;
        let holders = partial.holders(peers).await;
        partial.fetch_header(&holders).await?;
        if partial.have().covers(partial.remote.size) {
            let path = partial.finish().await?;
            parts.push(Part::Complete {
                path,
                remote: partial.remote,
            });
        } else {
            parts.push(Part::Partial(Box::new(partial)));
        }
    }
    let files = HubFiles {
        name: name.clone(),
        parts,
        fetching: tokio::sync::Mutex::new(()),
    };
    Ok(HubFile {
        name,
        paths: files.paths(),
        files: Arc::new(files),
    })
}

/// The files of a snapshot as the Hub lists a repository's: paths from
/// its top, `/` between folders (large repositories keep each
/// quantization's parts in a folder of its own). `None` when there is no
/// such snapshot.
fn snapshot_files(snapshot: &Path) -> Option<Vec<String>> {
    let mut files = Vec::new();
    let mut folders = vec![(snapshot.to_path_buf(), String::new())];
    while let Some((folder, prefix)) = folders.pop() {
        let entries = std::fs::read_dir(&folder).ok()?;
        for entry in entries.filter_map(Result::ok) {
            let Ok(name) = entry.file_name().into_string() else {
                continue; // not a name the Hub gives
            };
            // A link to a blob is a file; only a real folder is entered.
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                folders.push((entry.path(), format!("{prefix}{name}/")));
            } else {
                files.push(format!("{prefix}{name}"));
            }
        }
    }
    files.sort();
    Some(files)
}

/// The files of a complete model in the cache for `model` at its
/// revision, found without the Hub: `refs/<revision>` names the commit,
/// whose snapshot's files are chosen from as the Hub's list would be, and
/// each link's blob name is the file's ETag.
fn cached_offline(client: &HubClient, model: &HubModel) -> Option<Vec<RemoteFile>> {
    let revision = model.revision.clone().unwrap_or_else(|| "main".into());
    let repo = Repo::with_revision(
        model.repo.clone(),
        hf_hub::RepoType::Model,
        revision.clone(),
    );
    let folder = client.config().cache_dir.join(repo.folder_name());
    let commit = std::fs::read_to_string(folder.join("refs").join(&revision))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| revision.clone());
    let snapshot = folder.join("snapshots").join(&commit);
    let files = snapshot_files(&snapshot)?;
    let chosen = choose_file(model, &files).ok()?;
    chosen
        .parts
        .into_iter()
        .map(|file| {
            let path = snapshot.join(&file);
            let etag = std::fs::read_link(&path)
                .ok()?
                .file_name()?
                .to_str()?
                .to_string();
            let remote = RemoteFile {
                repo: model.repo.clone(),
                revision: revision.clone(),
                commit: commit.clone(),
                quant: chosen.quant.clone(),
                size: std::fs::metadata(&path).ok()?.len(),
                etag,
                file,
            };
            remote.check().ok().map(|()| remote)
        })
        .collect()
}

/// The files of the model a peer serves under the name `model` means, and
/// that peer.
async fn from_peers(
    client: &HubClient,
    model: &HubModel,
    peers: &[String],
) -> Option<(String, Vec<RemoteFile>)> {
    for peer in peers {
        let Some(served) = client.peer_model(peer).await else {
            continue;
        };
        let Some(first) = served.parts.first() else {
            continue;
        };
        let same_quant = match (&model.quant, &first.quant) {
            (None, _) => true,
            (Some(asked), Some(theirs)) => asked.eq_ignore_ascii_case(theirs),
            (Some(_), None) => false,
        };
        let same_revision = model
            .revision
            .as_ref()
            .is_none_or(|r| *r == first.revision || *r == first.commit);
        let same_repo = served
            .parts
            .iter()
            .all(|part| part.repo.eq_ignore_ascii_case(&model.repo));
        if same_repo && same_quant && same_revision {
            return Some((peer.clone(), served.parts));
        }
        tracing::info!(%peer, serves = %served.name, "a peer serves another model");
    }
    None
}

/// Where one remote file's pieces live in the cache.
struct CachePaths {
    blob: PathBuf,
    snapshot: PathBuf,
    work_dir: PathBuf,
}

impl CachePaths {
    fn new(client: &HubClient, remote: &RemoteFile) -> Self {
        let folder = client.config().cache_dir.join(remote.repo().folder_name());
        Self {
            blob: folder.join("blobs").join(&remote.etag),
            snapshot: folder
                .join("snapshots")
                .join(&remote.commit)
                .join(&remote.file),
            work_dir: folder.join(".ringlet"),
        }
    }

    /// Links `snapshots/<commit>/<file>` to the blob, relatively, as
    /// `huggingface_hub` does, and points `refs/<revision>` at the commit.
    fn link_snapshot(&self, client: &HubClient, remote: &RemoteFile) -> Result<(), HubError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| HubError::Io { path, source }
        };
        if !self.snapshot.exists() {
            let parent = self.snapshot.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(parent).map_err(io(parent))?;
            // From snapshots/<commit>/<dirs...>/ up to the repo folder.
            let depth = 2 + remote.file.matches('/').count();
            let target = PathBuf::from("../".repeat(depth))
                .join("blobs")
                .join(&remote.etag);
            let _ = std::fs::remove_file(&self.snapshot); // a dangling link
            std::os::unix::fs::symlink(&target, &self.snapshot).map_err(io(&self.snapshot))?;
        }
        if remote.revision != remote.commit {
            client
                .cache()
                .repo(remote.repo())
                .create_ref(&remote.commit)
                .map_err(io(&client.config().cache_dir))?;
        }
        Ok(())
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    file: String,
    etag: String,
    size: u64,
    have: RangeSet,
}

impl PartialFile {
    /// Opens (or starts) the partial file of `remote`, with the record of
    /// what an earlier run fetched.
    fn create(client: HubClient, remote: RemoteFile, cache: &CachePaths) -> Result<Self, HubError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| HubError::Io { path, source }
        };
        std::fs::create_dir_all(&cache.work_dir).map_err(io(&cache.work_dir))?;
        let data_path = cache.work_dir.join(format!("{}.partial", remote.etag));
        let record_path = cache.work_dir.join(format!("{}.ranges.json", remote.etag));
        let data = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(io(&data_path))?;
        let len = data.metadata().map_err(io(&data_path))?.len();
        let recorded = std::fs::read(&record_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Record>(&bytes).ok())
            .filter(|r| r.etag == remote.etag && r.size == remote.size && len == remote.size);
        let have = match recorded {
            Some(record) => {
                tracing::info!(
                    file = %remote.file,
                    on_disk_mib = record.have.bytes() >> 20,
                    "resuming a partial download"
                );
                record.have
            }
            None => {
                // Sparse: the length costs no disk until bytes are written.
                data.set_len(remote.size).map_err(io(&data_path))?;
                RangeSet::default()
            }
        };
        Ok(Self {
            client,
            remote,
            data_path,
            record_path,
            data,
            have: Mutex::new(have),
        })
    }

    fn have(&self) -> std::sync::MutexGuard<'_, RangeSet> {
        // Every write is one insert: the set stays consistent.
        self.have.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The peers (HOST:PORT) holding bytes of this file, with those bytes.
    async fn holders(&self, peers: &[String]) -> Vec<(String, RangeSet)> {
        let asked = peers.iter().map(|peer| async move {
            let held = self.client.peer_holds(peer, &self.remote).await;
            held.filter(|held| held.bytes() > 0)
                .map(|held| (peer.clone(), held))
        });
        futures_util::future::join_all(asked)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Fetches the GGUF header: a first piece, grown until it holds the
    /// whole header. Returns its length.
    async fn fetch_header(&self, holders: &[(String, RangeSet)]) -> Result<u64, HubError> {
        let size = self.remote.size;
        let mut want = HUB_HEADER_FIRST_BYTES.min(size);
        loop {
            let missing = self.have().missing(&[0..want]);
            let failed_peers = Mutex::new(HashSet::new());
            for chunk in ranges::chunks(&missing, HUB_CHUNK_BYTES) {
                self.fetch_chunk(chunk, holders, &failed_peers).await?;
            }
            let prefix = self.read(0..want)?;
            if let Some(len) = kernels::header_len_in(&prefix) {
                return Ok(len);
            }
            if want >= size || want >= HUB_HEADER_MAX_BYTES {
                return Err(HubError::NotGguf {
                    file: self.remote.file.clone(),
                    reason: format!("no GGUF header fits in its first {want} bytes"),
                });
            }
            want = (want * 4).min(size).min(HUB_HEADER_MAX_BYTES);
        }
    }

    fn read(&self, range: Range<u64>) -> Result<Vec<u8>, HubError> {
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        self.data
            .read_exact_at(&mut buf, range.start)
            .map_err(|source| HubError::Io {
                path: self.data_path.clone(),
                source,
            })?;
        Ok(buf)
    }

    /// Downloads one range, writes it and records it: from the first peer
    /// in `holders` that holds all of it, else the next, else the Hub, with
    /// pauses between tries when the Hub falters. A peer's failure of any
    /// kind (down, refusing, or sending other bytes than asked) moves on to
    /// the next source. Returns the range's length and where it came from.
    async fn fetch_chunk(
        &self,
        range: Range<u64>,
        holders: &[(String, RangeSet)],
        failed_peers: &Mutex<HashSet<String>>,
    ) -> Result<(u64, Source), HubError> {
        let mut fetched = None;
        for (peer, held) in holders {
            let failed = failed_peers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(peer);
            if failed || !held.missing(std::slice::from_ref(&range)).is_empty() {
                continue;
            }
            match self
                .client
                .fetch_from_peer(peer, &self.remote, range.clone())
                .await
            {
                Ok(bytes) => {
                    fetched = Some((bytes, Source::Peer(peer.clone())));
                    break;
                }
                Err(error) => {
                    // Not asked again in this fetch: a peer that failed
                    // once (down, slow, or sending other bytes) would only
                    // cost each later piece a timeout.
                    tracing::warn!(%peer, %error, start = range.start, end = range.end, "a peer failed to send a range; trying the next source, and not this peer again in this fetch");
                    failed_peers
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(peer.clone());
                }
            }
        }
        let (bytes, source) = match fetched {
            Some(fetched) => fetched,
            None => (self.fetch_from_hub(range.clone()).await?, Source::Hub),
        };
        // On disk before the record says so: a crash, even of the machine,
        // never leaves a recorded range unwritten.
        self.data
            .write_all_at(&bytes, range.start)
            .and_then(|()| self.data.sync_data())
            .map_err(|source| HubError::Io {
                path: self.data_path.clone(),
                source,
            })?;
        // Where each range came from, when more than the Hub could send it.
        if holders.is_empty() {
            tracing::debug!(file = %self.remote.file, %source, start = range.start, end = range.end, "range fetched");
        } else {
            tracing::info!(file = %self.remote.file, %source, start = range.start, end = range.end, "range fetched from {source}");
        }
        self.record(range.clone())?;
        Ok((range.end - range.start, source))
    }

    /// Downloads one range from the Hub, trying again after a pause while
    /// the network or the server falters.
    async fn fetch_from_hub(&self, range: Range<u64>) -> Result<Vec<u8>, HubError> {
        let mut pause = Duration::from_millis(HUB_RETRY_FIRST_MS);
        let mut tries = 1;
        loop {
            match self.client.fetch_range(&self.remote, range.clone()).await {
                Ok(bytes) => return Ok(bytes),
                Err(error) if error.is_transient() && tries < HUB_TRIES => {
                    tracing::warn!(%error, start = range.start, end = range.end, try_again_ms = pause.as_millis() as u64, "a range request failed; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(HUB_RETRY_MAX_MS));
                    tries += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Bytes `range` of this file when all of them are on disk.
    fn read_held(&self, range: Range<u64>) -> Result<Option<Vec<u8>>, HubError> {
        if !self.have().missing(std::slice::from_ref(&range)).is_empty() {
            return Ok(None);
        }
        self.read(range).map(Some)
    }

    /// Adds `range` to the record on disk (written aside, then renamed, so
    /// that a crash leaves the old record or the new one).
    fn record(&self, range: Range<u64>) -> Result<(), HubError> {
        let mut have = self.have();
        have.insert(range);
        let record = Record {
            file: self.remote.file.clone(),
            etag: self.remote.etag.clone(),
            size: self.remote.size,
            have: have.clone(),
        };
        let io = |source| HubError::Io {
            path: self.record_path.clone(),
            source,
        };
        let json = serde_json::to_vec(&record).map_err(|e| io(std::io::Error::other(e)))?;
        // A name of this process's own: another process fetching the same
        // file (a `pull` beside a node) must not rename it away.
        let aside = self
            .record_path
            .with_extension(format!("json.{}.new", std::process::id()));
        std::fs::write(&aside, json).map_err(io)?;
        std::fs::rename(&aside, &self.record_path).map_err(io)
    }

    /// The whole file is on disk: check it and move it into place.
    async fn finish(&self) -> Result<PathBuf, HubError> {
        let cache = CachePaths::new(&self.client, &self.remote);
        let remote = &self.remote;
        if remote.etag_is_sha256() {
            let path = self.data_path.clone();
            let hashed =
                tokio::task::spawn_blocking(move || crate::model_store::sha256_file(&path))
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|r| r);
            let (_, sha256) = hashed.map_err(|source| HubError::Io {
                path: self.data_path.clone(),
                source,
            })?;
            if sha256 != remote.etag {
                let moved = self.data_path.with_extension("damaged");
                let _ = std::fs::rename(&self.data_path, &moved);
                let _ = std::fs::remove_file(&self.record_path);
                return Err(HubError::WrongHash {
                    file: remote.file.clone(),
                    expected: remote.etag.clone(),
                    got: sha256,
                    moved,
                });
            }
        } else {
            tracing::warn!(file = %remote.file, etag = %remote.etag, "the Hub gives no SHA-256 for this file: only its size and each range were checked");
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| HubError::Io { path, source }
        };
        let blobs = cache.blob.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(blobs).map_err(io(blobs))?;
        std::fs::rename(&self.data_path, &cache.blob).map_err(io(&cache.blob))?;
        let _ = std::fs::remove_file(&self.record_path);
        cache.link_snapshot(&self.client, remote)?;
        tracing::info!(file = %remote.file, path = %cache.snapshot.display(), "model file complete and verified");
        Ok(cache.snapshot)
    }
}

/// Where a range came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    Peer(String),
    Hub,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Peer(peer) => write!(f, "peer {peer}"),
            Self::Hub => f.write_str("the Hub"),
        }
    }
}

impl HubFiles {
    /// The name API clients use.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The files to open, in order.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.parts
            .iter()
            .map(|part| match part {
                Part::Complete { path, .. } => path.clone(),
                Part::Partial(file) => file.data_path.clone(),
            })
            .collect()
    }

    /// The files as the Hub names them, in order.
    pub fn remotes(&self) -> Vec<RemoteFile> {
        self.parts
            .iter()
            .map(|part| part.remote().clone())
            .collect()
    }

    /// Which bytes of the file with ETag `etag` are on disk here, and its
    /// size; `None` when it is none of this model's files.
    pub fn held(&self, etag: &str) -> Option<(u64, RangeSet)> {
        let part = self.parts.iter().find(|p| p.remote().etag == etag)?;
        let size = part.remote().size;
        let held = match part {
            Part::Complete { .. } => RangeSet::from(vec![(0, size)]),
            Part::Partial(file) => file.have().clone(),
        };
        Some((size, held))
    }

    /// Bytes `range` of the file with ETag `etag`, when they are all on
    /// disk here; `Ok(None)` when they are not (or it is no file of this
    /// model).
    pub fn read_held(&self, etag: &str, range: Range<u64>) -> Result<Option<Vec<u8>>, HubError> {
        let Some(part) = self.parts.iter().find(|p| p.remote().etag == etag) else {
            return Ok(None);
        };
        if range.is_empty() || range.end > part.remote().size {
            return Ok(None);
        }
        match part {
            Part::Complete { path, .. } => {
                let io = |source| HubError::Io {
                    path: path.clone(),
                    source,
                };
                let file = File::open(path).map_err(io)?;
                let mut buf = vec![0u8; (range.end - range.start) as usize];
                file.read_exact_at(&mut buf, range.start).map_err(io)?;
                Ok(Some(buf))
            }
            Part::Partial(file) => file.read_held(range),
        }
    }

    /// Makes `wanted` (byte ranges per part, in part order) present on
    /// disk, downloading only what is not: from the peers (HOST:PORT) that
    /// hold it, else from the Hub, in pieces of at most
    /// [`HUB_CHUNK_BYTES`], at most [`HUB_CONCURRENT_RANGES`] at once.
    /// Calls `progress(done, total)` over the bytes of `wanted`.
    pub async fn ensure(
        &self,
        wanted: &[Vec<Range<u64>>],
        peers: &[String],
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<Fetched, HubError> {
        let _one_at_a_time = self.fetching.lock().await;
        let mut total = 0;
        let mut jobs = Vec::new();
        let mut holders = Vec::new();
        for (part, wanted) in self.parts.iter().zip(wanted) {
            total += ranges::total(wanted);
            if let Part::Partial(file) = part {
                let missing = file.have().missing(wanted);
                if !missing.is_empty() {
                    holders.push(file.holders(peers).await);
                    let index = holders.len() - 1;
                    jobs.extend(
                        ranges::chunks(&missing, HUB_CHUNK_BYTES)
                            .into_iter()
                            .map(|chunk| (&**file, index, chunk)),
                    );
                }
            }
        }
        let missing_bytes: u64 = jobs.iter().map(|(_, _, c)| c.end - c.start).sum();
        let on_disk = total - missing_bytes;
        progress(on_disk, total);
        let mut by_source: Vec<(Source, u64)> = Vec::new();
        if let Some((file, _, _)) = jobs.first() {
            check_room(file, missing_bytes)?;
            // Boxed: the compiler cannot otherwise prove the unboxed futures
            // `Send` for every lifetime, which spawning the caller needs.
            let holders = &holders;
            let failed_peers = &Mutex::new(HashSet::new());
            let fetches: Vec<BoxFuture<'_, Result<(u64, Source), HubError>>> = jobs
                .into_iter()
                .map(|(file, index, chunk)| {
                    file.fetch_chunk(chunk, &holders[index], failed_peers)
                        .boxed()
                })
                .collect();
            let mut fetches =
                futures_util::stream::iter(fetches).buffer_unordered(HUB_CONCURRENT_RANGES);
            let mut done = on_disk;
            while let Some(fetched) = fetches.next().await {
                let (bytes, source) = fetched?;
                done += bytes;
                match by_source.iter_mut().find(|(s, _)| *s == source) {
                    Some((_, sum)) => *sum += bytes,
                    None => by_source.push((source, bytes)),
                }
                progress(done, total);
            }
        }
        for (source, bytes) in &by_source {
            tracing::info!(model = %self.name, %source, mib = format!("{:.1}", *bytes as f64 / (1 << 20) as f64), "fetched ranges from {source}");
        }
        Ok(Fetched {
            wanted: total,
            on_disk,
            downloaded: missing_bytes,
        })
    }

    /// Downloads whatever of the model is missing, checks each whole file
    /// against the Hub's SHA-256 and moves it into the cache proper.
    /// Returns the paths to open it by.
    pub async fn complete(
        &self,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<(Vec<PathBuf>, Fetched), HubError> {
        let wanted: Vec<Vec<Range<u64>>> = self
            .parts
            .iter()
            .map(|part| match part {
                Part::Complete { .. } => Vec::new(),
                Part::Partial(file) => vec![0..file.remote.size],
            })
            .collect();
        let fetched = self.ensure(&wanted, &[], progress).await?;
        let mut paths = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            paths.push(match part {
                Part::Complete { path, .. } => path.clone(),
                Part::Partial(file) => file.finish().await?,
            });
        }
        Ok((paths, fetched))
    }

    /// True when every file is complete: nothing to fetch.
    pub fn is_complete(&self) -> bool {
        self.parts
            .iter()
            .all(|p| matches!(p, Part::Complete { .. }))
    }
}

impl Part {
    fn remote(&self) -> &RemoteFile {
        match self {
            Part::Complete { remote, .. } => remote,
            Part::Partial(file) => &file.remote,
        }
    }
}

/// Refuses when the disk holding `file` cannot take `bytes` more.
fn check_room(file: &PartialFile, bytes: u64) -> Result<(), HubError> {
    let dir = file.data_path.parent().unwrap_or(Path::new("."));
    let Ok(stats) = rustix::fs::statvfs(dir) else {
        return Ok(()); // unknown: the write will say
    };
    let free = stats.f_bavail.saturating_mul(stats.f_frsize);
    if bytes > free {
        return Err(HubError::NoRoom {
            dir: dir.to_path_buf(),
            file: file.remote.file.clone(),
            needed_mib: bytes.div_ceil(1 << 20),
            free_mib: free >> 20,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_lists_files_in_folders_as_the_hub_does() {
        let snapshot =
            std::env::temp_dir().join(format!("ringlet-snapshot-{}", std::process::id()));
        let blobs = snapshot.join("blobs");
        std::fs::create_dir_all(snapshot.join("Q4_K_M")).unwrap();
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::write(blobs.join("etag"), b"gguf").unwrap();
        std::os::unix::fs::symlink(
            blobs.join("etag"),
            snapshot.join("Q4_K_M/m-00001-of-00002.gguf"),
        )
        .unwrap();
        std::fs::write(snapshot.join("README.md"), b"").unwrap();
        let files = snapshot_files(&snapshot);
        std::fs::remove_dir_all(&snapshot).unwrap();
        assert_eq!(
            files.as_deref(),
            Some(
                &[
                    "Q4_K_M/m-00001-of-00002.gguf".to_string(),
                    "README.md".into(),
                    "blobs/etag".into()
                ][..]
            )
        );
        assert_eq!(snapshot_files(&snapshot), None);
    }
}
