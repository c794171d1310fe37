//! Talking to the Hugging Face Hub: where it is and who we are (the
//! `huggingface_hub` environment variables), which file a name means, the
//! file's size, ETag and commit, and byte ranges of it.
//!
//! hf-hub provides the repository listing, the names of things and the
//! cache layout; byte ranges, which it lacks, go through reqwest here,
//! with the checks that make a range safe to put beside others: the
//! server answered with exactly the bytes asked for, of the same file.

use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use hf_hub::api::RepoInfo;
use hf_hub::api::tokio::{Api, ApiBuilder};
use hf_hub::{Cache, Repo, RepoType};
use reqwest::header::{self, HeaderMap};
use reqwest::{StatusCode, Url};

use super::naming::{ChoiceError, HubModel, choose_file};
use super::ranges::RangeSet;
use crate::limits::{
    HUB_CHUNK_BYTES, HUB_CONNECT_TIMEOUT_SECS, HUB_MAX_REDIRECTS, HUB_PEER_QUERY_TIMEOUT_SECS,
    HUB_READ_TIMEOUT_SECS, MAX_MODEL_FILE_BYTES, MAX_PEER_ANSWER_BYTES,
};

/// Where the Hub is, the token and the cache, as `huggingface_hub` and
/// llama.cpp read them, so that all three share one cache.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// `HF_ENDPOINT`, default `https://huggingface.co`.
    pub endpoint: String,
    /// `HF_TOKEN`, else the file at `HF_TOKEN_PATH`, else `$HF_HOME/token`.
    pub token: Option<String>,
    /// `HF_HUB_CACHE`, else `$HF_HOME/hub`; `HF_HOME` defaults to
    /// `$XDG_CACHE_HOME/huggingface`.
    pub cache_dir: PathBuf,
    /// Added to the User-Agent, e.g. the node's name.
    pub client_name: Option<String>,
    /// Proves the cluster secret to peers that serve model files; `None`
    /// outside a cluster (`ringlet pull`).
    pub peer_pass: Option<crate::identity::PeerPass>,
}

impl HubConfig {
    pub fn from_env() -> Self {
        let var = |key: &str| std::env::var(key).ok().filter(|v| !v.trim().is_empty());
        let hf_home = var("HF_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::model_store::user_cache_dir().join("huggingface"));
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| {
            let path = var("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home.join("token"));
            std::fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let endpoint = var("HF_ENDPOINT")
            .unwrap_or_else(|| "https://huggingface.co".to_string())
            .trim_end_matches('/')
            .to_string();
        Self {
            endpoint,
            token,
            cache_dir,
            client_name: None,
            peer_pass: None,
        }
    }
}

/// One GGUF file on the Hub, pinned to a commit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteFile {
    /// `ORG/REPO`.
    pub repo: String,
    /// The revision asked for (`main` when none was).
    pub revision: String,
    /// The commit the revision pointed at.
    pub commit: String,
    /// The file's path in the repository.
    pub file: String,
    /// The quantization its name says, if it says.
    pub quant: Option<String>,
    pub size: u64,
    /// The Hub's ETag without quotes: the SHA-256 of the content for files
    /// stored with LFS, which GGUF files are.
    pub etag: String,
}

impl RemoteFile {
    /// The name API clients use: `ORG/REPO:QUANT`, plus `@REVISION` when
    /// one was asked for.
    pub fn model_name(&self) -> String {
        let mut name = self.repo.clone();
        if let Some(quant) = &self.quant {
            name = format!("{name}:{quant}");
        }
        if self.revision != "main" {
            name = format!("{name}@{}", self.revision);
        }
        name
    }

    /// Checks what the Hub or a peer said about the file before any of it
    /// names a path: the ETag and commit become file names in the cache,
    /// the file name a path below a snapshot.
    pub fn check(&self) -> Result<(), HubError> {
        let bad = |reason: String| HubError::BadAnswer {
            url: format!("{}/{}", self.repo, self.file),
            reason,
        };
        let hex = |s: &str, lengths: &[usize]| {
            lengths.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
        };
        if !hex(&self.etag, &[40, 64]) {
            return Err(bad(format!(
                "the ETag {:?} is not a git or SHA-256 hash",
                self.etag
            )));
        }
        if !hex(&self.commit, &[40]) {
            return Err(bad(format!(
                "the commit {:?} is not a git hash",
                self.commit
            )));
        }
        let safe_part = |p: &str| {
            !p.is_empty() && p != "." && p != ".." && !p.contains('\\') && !p.contains('\0')
        };
        if self.file.starts_with('/') || !self.file.split('/').all(safe_part) {
            return Err(bad(format!(
                "the file name {:?} is not a relative path",
                self.file
            )));
        }
        if self.size > MAX_MODEL_FILE_BYTES {
            return Err(bad(format!("the file claims {} bytes", self.size)));
        }
        Ok(())
    }

    /// True when the ETag is a SHA-256, against which the whole file can
    /// be checked.
    pub fn etag_is_sha256(&self) -> bool {
        self.etag.len() == 64 && self.etag.bytes().all(|b| b.is_ascii_hexdigit())
    }

    pub(super) fn repo(&self) -> Repo {
        Repo::with_revision(self.repo.clone(), RepoType::Model, self.revision.clone())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "the Hugging Face Hub has no repository {repo} (a private one needs HF_TOKEN set to a token that can read it); check the name at {endpoint}/{repo}"
    )]
    RepoNotFound { repo: String, endpoint: String },

    #[error("{repo} has no revision `{revision}`; name a branch, tag or commit that exists")]
    RevisionNotFound { repo: String, revision: String },

    #[error(
        "{repo} is gated: accept its licence at {endpoint}/{repo}, then set HF_TOKEN (or run `huggingface-cli login`) with a token of that account{}",
        if *.token_sent { "; the token sent was refused" } else { "; no token is set" }
    )]
    Gated {
        repo: String,
        endpoint: String,
        token_sent: bool,
    },

    #[error(
        "the Hub at {endpoint} refused the token in HF_TOKEN (or `huggingface-cli login`'s) for {repo} ({status}): check that it is valid and not expired, or unset it for a public model; a private or gated repository needs a token of an account with access"
    )]
    TokenRefused {
        repo: String,
        endpoint: String,
        status: StatusCode,
    },

    #[error("{repo} has no file {file} at revision {revision}")]
    FileNotFound {
        repo: String,
        file: String,
        revision: String,
    },

    #[error(transparent)]
    Choice(#[from] ChoiceError),

    #[error(
        "cannot reach the Hugging Face Hub at {url}: {reason}; check the network (or HF_ENDPOINT), or serve a model already in the cache"
    )]
    Unreachable { url: String, reason: String },

    #[error("the Hub answered {status} for {url}: {body}")]
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },

    #[error("the Hub sent an answer ringlet cannot read for {url}: {reason}")]
    BadAnswer { url: String, reason: String },

    #[error("the server refused bytes {}..{} of {file}: {reason}", .range.start, .range.end)]
    RangeRefused {
        file: String,
        range: Range<u64>,
        reason: String,
    },

    #[error(
        "{file} changed on the Hub while this node fetched it (ETag {expected}, now {got}); start the node again to fetch the new version"
    )]
    Changed {
        file: String,
        expected: String,
        got: String,
    },

    #[error(
        "{file} has SHA-256 {got}, but the Hub says {expected}: the bytes on disk are damaged; they were moved aside to {moved}, fetch again"
    )]
    WrongHash {
        file: String,
        expected: String,
        got: String,
        moved: PathBuf,
    },

    #[error("{file} is not a GGUF model file: {reason}")]
    NotGguf { file: String, reason: String },

    #[error(
        "{dir} has {free_mib} MiB free, but this node's part of {file} needs {needed_mib} MiB more; free some disk space or point HF_HUB_CACHE elsewhere"
    )]
    NoRoom {
        dir: PathBuf,
        file: String,
        needed_mib: u64,
        free_mib: u64,
    },

    #[error("model cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl HubError {
    /// Worth another try after a pause: the network or the server faltered.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            Self::BadAnswer { .. } => true,
            _ => false,
        }
    }
}

/// A client of one Hub endpoint.
#[derive(Debug, Clone)]
pub struct HubClient {
    config: HubConfig,
    api: Api,
    /// Follows no redirect by itself: the token goes only to the Hub, and
    /// the Hub's own answer to a redirected request is checked first.
    http: reqwest::Client,
}

impl HubClient {
    pub fn new(config: HubConfig) -> Result<Self, HubError> {
        let user_agent = format!(
            "ringlet/{}{}",
            env!("CARGO_PKG_VERSION"),
            config
                .client_name
                .as_ref()
                .map(|name| format!("; node/{name}"))
                .unwrap_or_default()
        );
        let mut builder = ApiBuilder::from_cache(Cache::new(config.cache_dir.clone()))
            .with_endpoint(config.endpoint.clone())
            .with_token(config.token.clone())
            .with_progress(false)
            .with_user_agent("ringlet", env!("CARGO_PKG_VERSION"));
        if let Some(name) = &config.client_name {
            builder = builder.with_user_agent("node", name);
        }
        let unusable = |reason: String| HubError::Unreachable {
            url: config.endpoint.clone(),
            reason,
        };
        let api = builder
            .build()
            .map_err(|e| unusable(format!("cannot set up the client: {e}")))?;
        let http = reqwest::Client::builder()
            .user_agent(user_agent)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(HUB_CONNECT_TIMEOUT_SECS))
            .read_timeout(Duration::from_secs(HUB_READ_TIMEOUT_SECS))
            .build()
            .map_err(|e| unusable(format!("cannot set up the client: {e}")))?;
        Ok(Self { config, api, http })
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    pub fn cache(&self) -> Cache {
        Cache::new(self.config.cache_dir.clone())
    }

    /// Finds the file `model` names: lists the repository at its revision,
    /// chooses the GGUF file as llama.cpp does, and reads the size, ETag
    /// and commit of it, or of each of its parts when it is split.
    pub async fn resolve(&self, model: &HubModel) -> Result<Vec<RemoteFile>, HubError> {
        let revision = model.revision.clone().unwrap_or_else(|| "main".into());
        let repo = Repo::with_revision(model.repo.clone(), RepoType::Model, revision.clone());
        let request = self
            .api
            .repo(repo.clone())
            .info_request()
            .timeout(Duration::from_secs(HUB_READ_TIMEOUT_SECS));
        let url = format!("{}/api/{}", self.config.endpoint, repo.api_url());
        let response = request.send().await.map_err(|e| unreachable(&url, &e))?;
        if !response.status().is_success() {
            return Err(self.refusal(model, &revision, None, &url, response).await);
        }
        let info: RepoInfo = response.json().await.map_err(|e| HubError::BadAnswer {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        let chosen = choose_file(model, &files)?;
        let mut parts = Vec::with_capacity(chosen.parts.len());
        for file in chosen.parts {
            let mut remote = RemoteFile {
                repo: model.repo.clone(),
                revision: revision.clone(),
                commit: info.sha.clone(),
                file,
                quant: chosen.quant.clone(),
                size: 0,
                etag: String::new(),
            };
            self.head(model, &mut remote).await?;
            remote.check()?;
            parts.push(remote);
        }
        Ok(parts)
    }

    /// The file's URL, pinned to its commit so that a branch moving on
    /// cannot mix two versions.
    fn file_url(&self, remote: &RemoteFile) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            self.config.endpoint, remote.repo, remote.commit, remote.file
        )
    }

    /// Reads size and ETag with `HEAD`, following the Hub's redirects as
    /// `huggingface_hub` does: an LFS file's redirect carries its
    /// `X-Linked-Size` and `X-Linked-Etag`.
    async fn head(&self, model: &HubModel, remote: &mut RemoteFile) -> Result<(), HubError> {
        let mut url = self.file_url(remote);
        for _ in 0..HUB_MAX_REDIRECTS {
            let response = self
                .authorized(self.http.head(&url), &url)
                .send()
                .await
                .map_err(|e| unreachable(&url, &e))?;
            let status = response.status();
            let headers = response.headers();
            if let Some(commit) = text_in(headers, "x-repo-commit") {
                remote.commit = commit;
            }
            let linked_etag = etag_in(headers, "x-linked-etag");
            let linked_size = number_in(headers, "x-linked-size");
            if status.is_success() {
                let etag = linked_etag.or_else(|| etag_in(headers, "etag"));
                let size = linked_size.or_else(|| number_in(headers, "content-length"));
                let (Some(etag), Some(size)) = (etag, size) else {
                    return Err(HubError::BadAnswer {
                        url,
                        reason: "no ETag or size for the file".into(),
                    });
                };
                (remote.etag, remote.size) = (etag, size);
                return Ok(());
            }
            if status.is_redirection() {
                if let (Some(etag), Some(size)) = (linked_etag, linked_size) {
                    (remote.etag, remote.size) = (etag, size);
                    return Ok(());
                }
                url = next_url(&url, headers)?;
                continue;
            }
            let revision = remote.revision.clone();
            return Err(self
                .refusal(model, &revision, Some(&remote.file), &url, response)
                .await);
        }
        Err(HubError::BadAnswer {
            url,
            reason: format!("more than {HUB_MAX_REDIRECTS} redirects"),
        })
    }

    /// Bytes `range` of `remote`, checked: a 206 answer whose
    /// `Content-Range` is the range asked for, of a file of the expected
    /// size and ETag, and a body of exactly that many bytes.
    pub async fn fetch_range(
        &self,
        remote: &RemoteFile,
        range: Range<u64>,
    ) -> Result<Vec<u8>, HubError> {
        let refused = |reason: String| HubError::RangeRefused {
            file: remote.file.clone(),
            range: range.clone(),
            reason,
        };
        let check_etag = |got: Option<String>| match got {
            Some(got) if got != remote.etag => Err(HubError::Changed {
                file: remote.file.clone(),
                expected: remote.etag.clone(),
                got,
            }),
            _ => Ok(()),
        };
        let mut url = self.file_url(remote);
        let mut redirected = false;
        for _ in 0..HUB_MAX_REDIRECTS {
            let request = self.http.get(&url).header(
                header::RANGE,
                format!("bytes={}-{}", range.start, range.end - 1),
            );
            let response = self
                .authorized(request, &url)
                .send()
                .await
                .map_err(|e| unreachable(&url, &e))?;
            let status = response.status();
            if status.is_redirection() {
                // The Hub names the file it redirects to; a CDN's own ETag
                // is of its storage, not the content, so only this one counts.
                check_etag(etag_in(response.headers(), "x-linked-etag"))?;
                url = next_url(&url, response.headers())?;
                redirected = true;
                continue;
            }
            match status {
                StatusCode::PARTIAL_CONTENT => {}
                StatusCode::OK => {
                    return Err(refused(
                        "it sent the whole file instead (no byte ranges)".into(),
                    ));
                }
                StatusCode::RANGE_NOT_SATISFIABLE => {
                    return Err(refused(
                        "it is past the end of the file, which must have changed".into(),
                    ));
                }
                _ => {
                    let model = HubModel {
                        repo: remote.repo.clone(),
                        quant: None,
                        revision: Some(remote.revision.clone()),
                    };
                    return Err(self
                        .refusal(&model, &remote.revision, Some(&remote.file), &url, response)
                        .await);
                }
            }
            return checked_range(response, remote, range, !redirected, &url).await;
        }
        Err(HubError::BadAnswer {
            url,
            reason: format!("more than {HUB_MAX_REDIRECTS} redirects"),
        })
    }

    /// Bytes `range` of `remote` from the peer node at `peer` (HOST:PORT),
    /// with the same checks as from the Hub: a peer that sends anything
    /// but exactly those bytes of that file is refused.
    pub async fn fetch_from_peer(
        &self,
        peer: &str,
        remote: &RemoteFile,
        range: Range<u64>,
    ) -> Result<Vec<u8>, HubError> {
        let url = format!("http://{peer}/v1/ring/files/{}", remote.etag);
        let response = self
            .to_peer(self.http.get(&url), &url)
            .header(
                header::RANGE,
                format!("bytes={}-{}", range.start, range.end - 1),
            )
            .send()
            .await
            .map_err(|e| unreachable(&url, &e))?;
        if response.status() != StatusCode::PARTIAL_CONTENT {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            return Err(HubError::Status {
                url,
                status,
                body: body.chars().take(200).collect(),
            });
        }
        checked_range(response, remote, range, true, &url).await
    }

    /// Which bytes of `remote` the peer at `peer` holds; `None` when it
    /// holds none or does not answer in time.
    pub async fn peer_holds(&self, peer: &str, remote: &RemoteFile) -> Option<RangeSet> {
        let url = format!("http://{peer}/v1/ring/files/{}/held", remote.etag);
        let held: HeldRanges = self.peer_json(&url).await?;
        (held.size == remote.size).then_some(held.held)
    }

    /// The Hub model the peer at `peer` serves, if any: how a node that
    /// cannot reach the Hub learns which files a name means.
    pub async fn peer_model(&self, peer: &str) -> Option<PeerModel> {
        let model: PeerModel = self
            .peer_json(&format!("http://{peer}/v1/ring/model"))
            .await?;
        // Its files name paths here: the same checks as the Hub's answers.
        model
            .parts
            .iter()
            .all(|part| part.check().is_ok())
            .then_some(model)
    }

    /// A peer's JSON answer at `url`, within [`HUB_PEER_QUERY_TIMEOUT_SECS`]
    /// and [`MAX_PEER_ANSWER_BYTES`]; `None` for anything else.
    async fn peer_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Option<T> {
        let response = self
            .to_peer(self.http.get(url), url)
            .timeout(Duration::from_secs(HUB_PEER_QUERY_TIMEOUT_SECS))
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body = read_at_most(response, MAX_PEER_ANSWER_BYTES, url)
            .await
            .ok()?;
        serde_json::from_slice(&body).ok()
    }

    /// Adds the peer pass to a request for a peer's files at `url`.
    fn to_peer(&self, request: reqwest::RequestBuilder, url: &str) -> reqwest::RequestBuilder {
        let Some(pass) = &self.config.peer_pass else {
            return request;
        };
        let path = url
            .split_once("://")
            .and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..]))
            .unwrap_or("/");
        request.header(
            crate::identity::PEER_PASS_HEADER,
            pass.header_value(path, crate::unix_seconds()),
        )
    }

    /// Adds the token to requests for the Hub itself, never to another
    /// host (a storage redirect is signed already).
    fn authorized(&self, request: reqwest::RequestBuilder, url: &str) -> reqwest::RequestBuilder {
        match &self.config.token {
            Some(token) if same_origin(url, &self.config.endpoint) => request.bearer_auth(token),
            _ => request,
        }
    }

    /// The error a refusing answer means, from its status and the Hub's
    /// `X-Error-Code`.
    async fn refusal(
        &self,
        model: &HubModel,
        revision: &str,
        file: Option<&str>,
        url: &str,
        response: reqwest::Response,
    ) -> HubError {
        let status = response.status();
        let code = text_in(response.headers(), "x-error-code").unwrap_or_default();
        let repo = model.repo.clone();
        let endpoint = self.config.endpoint.clone();
        match (status, code.as_str()) {
            (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, "GatedRepo") => HubError::Gated {
                repo,
                endpoint,
                token_sent: self.config.token.is_some(),
            },
            // Not a gate: the token itself (revoked, expired, mistyped,
            // or without access to a private repository).
            (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, _)
                if self.config.token.is_some() =>
            {
                HubError::TokenRefused {
                    repo,
                    endpoint,
                    status,
                }
            }
            (StatusCode::FORBIDDEN, _) => HubError::Gated {
                repo,
                endpoint,
                token_sent: false,
            },
            (StatusCode::UNAUTHORIZED, _) | (StatusCode::NOT_FOUND, "RepoNotFound") => {
                HubError::RepoNotFound { repo, endpoint }
            }
            (StatusCode::NOT_FOUND, "RevisionNotFound") => HubError::RevisionNotFound {
                repo,
                revision: revision.to_string(),
            },
            (StatusCode::NOT_FOUND, _) if file.is_some() => HubError::FileNotFound {
                repo,
                file: file.unwrap_or_default().to_string(),
                revision: revision.to_string(),
            },
            (StatusCode::NOT_FOUND, _) => HubError::RepoNotFound { repo, endpoint },
            _ => {
                let body = response.text().await.unwrap_or_default();
                HubError::Status {
                    url: url.to_string(),
                    status,
                    body: body.chars().take(200).collect(),
                }
            }
        }
    }
}

/// The body of a 206 answer for `range` of `remote`, checked: its
/// `Content-Range` is the range asked for of a file of the expected size,
/// its ETag (when `etag_is_the_files`: not from a storage redirect) is the
/// file's, and the body has exactly that many bytes.
async fn checked_range(
    response: reqwest::Response,
    remote: &RemoteFile,
    range: Range<u64>,
    etag_is_the_files: bool,
    url: &str,
) -> Result<Vec<u8>, HubError> {
    let refused = |reason: String| HubError::RangeRefused {
        file: remote.file.clone(),
        range: range.clone(),
        reason,
    };
    if etag_is_the_files
        && let Some(got) = etag_in(response.headers(), "etag")
        && got != remote.etag
    {
        return Err(HubError::Changed {
            file: remote.file.clone(),
            expected: remote.etag.clone(),
            got,
        });
    }
    let content_range = text_in(response.headers(), header::CONTENT_RANGE.as_str());
    let expected = format!("bytes {}-{}/{}", range.start, range.end - 1, remote.size);
    if content_range.as_deref() != Some(expected.as_str()) {
        return Err(refused(format!(
            "it answered with Content-Range {content_range:?}, not {expected:?}"
        )));
    }
    let wanted = range.end - range.start;
    let body = read_at_most(response, wanted, url).await?;
    if body.len() as u64 != wanted {
        return Err(HubError::BadAnswer {
            url: url.to_string(),
            reason: format!(
                "{} bytes arrived of the {} asked for (the connection dropped?)",
                body.len(),
                range.end - range.start
            ),
        });
    }
    Ok(body)
}

/// The body of `response`, failing once it passes `most` bytes: a server
/// cannot make the node hold more than it asked for.
async fn read_at_most(
    response: reqwest::Response,
    most: u64,
    url: &str,
) -> Result<Vec<u8>, HubError> {
    let too_long = || HubError::BadAnswer {
        url: url.to_string(),
        reason: format!("the answer is longer than the {most} bytes asked for"),
    };
    if response.content_length().is_some_and(|len| len > most) {
        return Err(too_long());
    }
    let mut body = Vec::with_capacity(most.min(HUB_CHUNK_BYTES) as usize);
    let mut stream = response.bytes_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| unreachable(url, &e))?;
        if body.len() as u64 + piece.len() as u64 > most {
            return Err(too_long());
        }
        body.extend_from_slice(&piece);
    }
    Ok(body)
}

/// What a node answers at `GET /v1/ring/files/{etag}/held`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HeldRanges {
    pub size: u64,
    pub held: RangeSet,
}

/// What a node answers at `GET /v1/ring/model`: the Hub model it serves.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PeerModel {
    pub name: String,
    pub parts: Vec<RemoteFile>,
}

fn unreachable(url: &str, error: &reqwest::Error) -> HubError {
    // reqwest's own message names only the outermost cause.
    let mut reason = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        reason = format!("{reason}: {cause}");
        source = cause.source();
    }
    HubError::Unreachable {
        url: url.to_string(),
        reason,
    }
}

fn text_in(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// An ETag without its weak marker and quotes.
fn etag_in(headers: &HeaderMap, name: &str) -> Option<String> {
    text_in(headers, name).map(|v| v.trim_start_matches("W/").trim_matches('"').to_string())
}

fn number_in(headers: &HeaderMap, name: &str) -> Option<u64> {
    text_in(headers, name).and_then(|v| v.parse().ok())
}

fn next_url(url: &str, headers: &HeaderMap) -> Result<String, HubError> {
    let bad = |reason: &str| HubError::BadAnswer {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let location = text_in(headers, header::LOCATION.as_str())
        .ok_or_else(|| bad("a redirect without a Location"))?;
    let base = Url::parse(url).map_err(|_| bad("the URL does not parse"))?;
    base.join(&location)
        .map(String::from)
        .map_err(|_| bad("the redirect's Location does not parse"))
}

fn same_origin(url: &str, endpoint: &str) -> bool {
    match (Url::parse(url), Url::parse(endpoint)) {
        (Ok(a), Ok(b)) => a.origin() == b.origin(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the report

    use super::*;

    fn remote() -> RemoteFile {
        RemoteFile {
            repo: "org/repo".into(),
            revision: "main".into(),
            commit: "a".repeat(40),
            file: "model-Q4_K_M.gguf".into(),
            quant: Some("Q4_K_M".into()),
            size: 100,
            etag: "b".repeat(64),
        }
    }

    fn answer(content_range: &str, etag: &str, body: &'static [u8]) -> reqwest::Response {
        let response = axum::http::Response::builder()
            .status(206)
            .header("content-range", content_range)
            .header("etag", format!("\"{etag}\""))
            .body(body)
            .expect("a response");
        reqwest::Response::from(response)
    }

    #[tokio::test]
    async fn only_exactly_the_bytes_asked_for_of_the_same_file_are_taken() {
        let remote = remote();
        let etag = remote.etag.clone();
        let ok = answer("bytes 10-13/100", &etag, b"abcd");
        assert_eq!(
            checked_range(ok, &remote, 10..14, true, "u")
                .await
                .expect("taken"),
            b"abcd"
        );
        let shifted = answer("bytes 11-14/100", &etag, b"abcd");
        let refused = checked_range(shifted, &remote, 10..14, true, "u").await;
        assert!(
            matches!(refused, Err(HubError::RangeRefused { .. })),
            "{refused:?}"
        );
        let other_file = answer("bytes 10-13/100", &"c".repeat(64), b"abcd");
        let changed = checked_range(other_file, &remote, 10..14, true, "u").await;
        assert!(
            matches!(changed, Err(HubError::Changed { .. })),
            "{changed:?}"
        );
        let other_size = answer("bytes 10-13/101", &etag, b"abcd");
        assert!(
            checked_range(other_size, &remote, 10..14, true, "u")
                .await
                .is_err()
        );
        let long = answer("bytes 10-13/100", &etag, b"abcdef");
        assert!(matches!(
            checked_range(long, &remote, 10..14, true, "u").await,
            Err(HubError::BadAnswer { .. })
        ));
        let short = answer("bytes 10-13/100", &etag, b"ab");
        assert!(
            checked_range(short, &remote, 10..14, true, "u")
                .await
                .is_err()
        );
    }

    #[test]
    fn file_names_etags_and_commits_that_would_escape_the_cache_are_refused() {
        assert!(remote().check().is_ok());
        let with = |change: fn(&mut RemoteFile)| {
            let mut remote = remote();
            change(&mut remote);
            remote.check()
        };
        assert!(with(|r| r.etag = "../../../etc/passwd".into()).is_err());
        assert!(with(|r| r.etag = "b".repeat(63)).is_err());
        assert!(with(|r| r.commit = "main/../..".into()).is_err());
        assert!(with(|r| r.file = "/etc/passwd".into()).is_err());
        assert!(with(|r| r.file = "sub/../../x.gguf".into()).is_err());
        assert!(with(|r| r.file = "sub//x.gguf".into()).is_err());
        assert!(with(|r| r.size = u64::MAX).is_err());
        assert!(with(|r| r.file = "sub/dir/x.gguf".into()).is_ok());
        assert!(with(|r| r.etag = "d".repeat(40)).is_ok());
    }
}
