//! Who this node is and which cluster it belongs to: the node's long-term
//! key and the cluster secret, kept in ringlet's config directory (mode
//! 0700, files 0600), and the join token that carries the secret to a new
//! machine.
//!
//! The directory is `--config-dir` (or `RINGLET_CONFIG_DIR`), else
//! `$XDG_CONFIG_HOME/ringlet`, else `~/.config/ringlet`. Several nodes on
//! one machine each need their own: the key in it is the node's identity.
//!
//! Files:
//! - `node.key`: the node's X25519 static key pair (the Noise handshake
//!   proves it to peers), `private <base64>` and `public <base64>` lines.
//! - `cluster.token`: the join token, which holds the cluster secret.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Context;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// The Noise protocol every link speaks (see `cluster::secure`): here for
/// the key type it fixes.
pub const NOISE_PARAMS: &str = "Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s";

const NODE_KEY_FILE: &str = "node.key";
const TOKEN_FILE: &str = "cluster.token";
const TOKEN_PREFIX: &str = "ringlet1";
const SECRET_BYTES: usize = 32;
const CHECKSUM_BYTES: usize = 4;

/// The config directory: `flag` (`--config-dir`, `RINGLET_CONFIG_DIR`),
/// else `$XDG_CONFIG_HOME/ringlet`, else `~/.config/ringlet`.
pub fn config_dir(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = flag {
        return Ok(dir.to_path_buf());
    }
    if let Some(xdg) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("ringlet"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("cannot find a config directory: HOME is not set; name one with --config-dir")?;
    Ok(PathBuf::from(home).join(".config").join("ringlet"))
}

/// The secret every member of a cluster holds. Never printed: `Debug`
/// hides it, and only [`JoinToken`] writes it out.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret([u8; SECRET_BYTES]);

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    pub fn random() -> Self {
        let mut bytes = [0u8; SECRET_BYTES];
        rand::fill(&mut bytes);
        Self(bytes)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// A secret received from a peer (a rotation); `None` if not 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        <[u8; SECRET_BYTES]>::try_from(bytes).ok().map(Self)
    }

    /// The Noise pre-shared key: derived, not the secret itself, so that
    /// the secret serves one purpose only.
    pub fn link_key(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        hash.update(b"ringlet link psk v1\0");
        hash.update(self.0);
        hash.finalize().into()
    }

    /// A short, public fingerprint, to tell two secrets apart in logs.
    pub fn fingerprint(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(b"ringlet secret fingerprint v1\0");
        hash.update(self.0);
        URL_SAFE_NO_PAD.encode(&hash.finalize()[..6])
    }
}

/// What `ringlet invite` prints and `--join` takes: `ringlet1` followed by
/// the secret and a checksum, in URL-safe base64.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken(pub ClusterSecret);

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinToken(..)")
    }
}

fn checksum(secret: &[u8]) -> [u8; CHECKSUM_BYTES] {
    let digest = Sha256::digest(secret);
    let mut sum = [0u8; CHECKSUM_BYTES];
    sum.copy_from_slice(&digest[..CHECKSUM_BYTES]);
    sum
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut bytes = self.0.0.to_vec();
        bytes.extend_from_slice(&checksum(&self.0.0));
        write!(f, "{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "this is not a ringlet join token (they start with `{TOKEN_PREFIX}`); copy it again from `ringlet invite` on a node of the cluster"
    )]
    Prefix,
    #[error(
        "the join token is damaged (cut short, or a character changed); copy it again from `ringlet invite`"
    )]
    Damaged,
}

impl FromStr for JoinToken {
    type Err = TokenError;

    fn from_str(text: &str) -> Result<Self, TokenError> {
        let body = text
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenError::Prefix)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Damaged)?;
        if bytes.len() != SECRET_BYTES + CHECKSUM_BYTES {
            return Err(TokenError::Damaged);
        }
        let (secret, sum) = bytes.split_at(SECRET_BYTES);
        if checksum(secret) != sum {
            return Err(TokenError::Damaged);
        }
        let mut bytes = [0u8; SECRET_BYTES];
        bytes.copy_from_slice(secret);
        Ok(Self(ClusterSecret(bytes)))
    }
}

/// The node's long-term X25519 key pair.
#[derive(Clone)]
pub struct NodeKey {
    pub private: Vec<u8>,
    pub public: Vec<u8>,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({})", key_fingerprint(&self.public))
    }
}

impl NodeKey {
    fn generate() -> anyhow::Result<Self> {
        let params = NOISE_PARAMS.parse().context("the Noise parameters")?;
        let pair = snow::Builder::new(params)
            .generate_keypair()
            .context("cannot generate the node's key")?;
        Ok(Self {
            private: pair.private,
            public: pair.public,
        })
    }

    fn to_file(&self) -> String {
        format!(
            "private {}\npublic {}\n",
            URL_SAFE_NO_PAD.encode(&self.private),
            URL_SAFE_NO_PAD.encode(&self.public)
        )
    }

    fn from_file(text: &str) -> Option<Self> {
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|value| URL_SAFE_NO_PAD.decode(value.trim()).ok())
                .filter(|bytes| bytes.len() == 32)
        };
        Some(Self {
            private: field("private")?,
            public: field("public")?,
        })
    }
}

/// A public key as logs and the API show it: short, URL-safe.
pub fn key_fingerprint(public: &[u8]) -> String {
    let digest = Sha256::digest(public);
    URL_SAFE_NO_PAD.encode(&digest[..9])
}

/// The header a node's requests for model files carry to a peer.
pub const PEER_PASS_HEADER: &str = "x-ringlet-peer";

/// How far a peer pass may be from the receiving node's clock, in seconds.
const PEER_PASS_MAX_AGE_SECS: u64 = 120;

/// Proof of the cluster secret on the HTTP requests a node makes for a
/// peer's model files (`/v1/ring/model`, `/v1/ring/files`), which travel
/// outside the links: an HMAC-SHA256 (ring) of the path and the time
/// under a key derived from the secret, so a node without it learns
/// nothing of the model there either. Shared by the node's HTTP client and
/// its API; a rotation replaces the key in place.
#[derive(Clone)]
pub struct PeerPass(std::sync::Arc<std::sync::RwLock<ring::hmac::Key>>);

impl fmt::Debug for PeerPass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PeerPass(..)")
    }
}

fn peer_pass_key(secret: &ClusterSecret) -> ring::hmac::Key {
    let mut hash = Sha256::new();
    hash.update(b"ringlet peer files v1\0");
    hash.update(secret.bytes());
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &hash.finalize())
}

fn peer_pass_message(path: &str, time: u64) -> Vec<u8> {
    format!("{time}\0{path}").into_bytes()
}

impl PeerPass {
    pub fn new(secret: &ClusterSecret) -> Self {
        Self(std::sync::Arc::new(std::sync::RwLock::new(peer_pass_key(
            secret,
        ))))
    }

    /// The cluster's secret changed.
    pub fn rotate(&self, secret: &ClusterSecret) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = peer_pass_key(secret);
    }

    /// The header value for a request for `path`, made at `now`.
    pub fn header_value(&self, path: &str, now: u64) -> String {
        let key = self.0.read().unwrap_or_else(|p| p.into_inner());
        let tag = ring::hmac::sign(&key, &peer_pass_message(path, now));
        format!("{now}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// Whether `value` proves the secret for `path`, made near `now`.
    pub fn check(&self, path: &str, value: Option<&str>, now: u64) -> bool {
        let Some((time, tag)) = value.and_then(|v| v.split_once('.')) else {
            return false;
        };
        let (Ok(time), Ok(tag)) = (time.parse::<u64>(), URL_SAFE_NO_PAD.decode(tag)) else {
            return false;
        };
        if now.abs_diff(time) > PEER_PASS_MAX_AGE_SECS {
            return false;
        }
        let key = self.0.read().unwrap_or_else(|p| p.into_inner());
        ring::hmac::verify(&key, &peer_pass_message(path, time), &tag).is_ok()
    }
}

/// How this start came by its cluster secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// It was in the config directory.
    Stored,
    /// This start created a new cluster.
    Created,
    /// `--join` gave it (and it is stored now).
    Joined,
}

/// The node's key and its cluster's secret, loaded from (or written to)
/// the config directory.
#[derive(Debug, Clone)]
pub struct Identity {
    pub dir: PathBuf,
    pub key: NodeKey,
    pub secret: ClusterSecret,
}

impl Identity {
    /// Loads the identity in `dir`, creating the key and the secret where
    /// missing; `join` replaces the stored secret.
    pub fn load_or_create(
        dir: &Path,
        join: Option<&JoinToken>,
    ) -> anyhow::Result<(Self, Membership)> {
        ensure_private_dir(dir)?;
        let key_path = dir.join(NODE_KEY_FILE);
        let key = match read_private(&key_path)? {
            Some(text) => NodeKey::from_file(&text).with_context(|| {
                format!(
                    "{} is damaged; delete it to give this node a new identity",
                    key_path.display()
                )
            })?,
            None => {
                let key = NodeKey::generate()?;
                write_private(&key_path, &key.to_file())?;
                key
            }
        };
        let token_path = dir.join(TOKEN_FILE);
        let stored = match read_private(&token_path)? {
            Some(text) => Some(text.parse::<JoinToken>().map_err(|error| {
                anyhow::anyhow!(
                    "{}: {error}; or delete the file and join again with --join",
                    token_path.display()
                )
            })?),
            None => None,
        };
        let (token, membership) = match (join, stored) {
            (Some(join), Some(stored)) if *join == stored => (stored, Membership::Stored),
            (Some(join), stored) => {
                if let Some(stored) = stored {
                    // A --join left in a service's environment would undo
                    // a rotation at every restart: say so.
                    tracing::warn!(
                        replaced = %stored.0.fingerprint(),
                        now = %join.0.fingerprint(),
                        "--join replaces the cluster secret this node had; if its cluster rotated the secret since that token was made, drop --join (RINGLET_JOIN): the stored secret is kept across starts"
                    );
                }
                write_private(&token_path, &join.to_string())?;
                (join.clone(), Membership::Joined)
            }
            (None, Some(stored)) => (stored, Membership::Stored),
            (None, None) => {
                let token = JoinToken(ClusterSecret::random());
                write_private(&token_path, &token.to_string())?;
                (token, Membership::Created)
            }
        };
        Ok((
            Self {
                dir: dir.to_path_buf(),
                key,
                secret: token.0,
            },
            membership,
        ))
    }

    pub fn token(&self) -> JoinToken {
        JoinToken(self.secret.clone())
    }

    /// Stores a new cluster secret (after a rotation) in place of the old.
    pub fn store_secret(&mut self, secret: ClusterSecret) -> anyhow::Result<()> {
        let token = JoinToken(secret);
        write_private(&self.dir.join(TOKEN_FILE), &token.to_string())?;
        self.secret = token.0;
        Ok(())
    }
}

/// Creates `dir` readable by its owner only, or tightens an existing one.
fn ensure_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create the config directory {}", dir.display()))?;
        return Ok(());
    }
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private (chmod 700)", dir.display()))?;
        tracing::warn!(dir = %dir.display(), "the config directory was readable by others; it is private now (mode 0700)");
    }
    Ok(())
}

/// Reads a secret file, `None` when it does not exist; one that others
/// could read is made private first, with a warning.
fn read_private(path: &Path) -> anyhow::Result<Option<String>> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
    };
    if metadata.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot make {} private (chmod 600)", path.display()))?;
        tracing::warn!(file = %path.display(), "a secret file was readable by others; it is private now (mode 0600)");
    }
    std::fs::read_to_string(path)
        .map(Some)
        .with_context(|| format!("cannot read {}", path.display()))
}

/// Writes a secret file with mode 0600 from the start: a temporary file
/// created private, then renamed over the old one.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let temporary = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let _ = std::fs::remove_file(&temporary);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ringlet-identity-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn peer_passes_bind_the_secret_the_path_and_the_time() {
        let secret = ClusterSecret::random();
        let pass = PeerPass::new(&secret);
        let value = pass.header_value("/v1/ring/model", 1_000);
        assert!(pass.check("/v1/ring/model", Some(&value), 1_050));
        assert!(
            !pass.check("/v1/ring/files/x", Some(&value), 1_050),
            "another path"
        );
        assert!(
            !pass.check("/v1/ring/model", Some(&value), 2_000),
            "too old"
        );
        assert!(!pass.check("/v1/ring/model", None, 1_000));
        assert!(!pass.check("/v1/ring/model", Some("1000.zz"), 1_000));
        let stranger = PeerPass::new(&ClusterSecret::random());
        assert!(!stranger.check("/v1/ring/model", Some(&value), 1_000));
        pass.rotate(&ClusterSecret::random());
        assert!(
            !pass.check("/v1/ring/model", Some(&value), 1_000),
            "rotated"
        );
    }

    #[test]
    fn tokens_round_trip_and_damage_is_named() {
        let token = JoinToken(ClusterSecret::random());
        let text = token.to_string();
        assert_eq!(text.parse::<JoinToken>(), Ok(token));
        assert_eq!("hello".parse::<JoinToken>(), Err(TokenError::Prefix));
        let mut flipped: Vec<char> = text.chars().collect();
        let last = flipped.len() - 3;
        flipped[last] = if flipped[last] == 'A' { 'B' } else { 'A' };
        let flipped: String = flipped.into_iter().collect();
        assert_eq!(flipped.parse::<JoinToken>(), Err(TokenError::Damaged));
        assert_eq!(
            text[..text.len() - 2].parse::<JoinToken>(),
            Err(TokenError::Damaged)
        );
    }

    #[test]
    fn first_start_creates_private_files_and_later_starts_keep_them() {
        let dir = scratch("create");
        let (first, how) = Identity::load_or_create(&dir, None).expect("create");
        assert_eq!(how, Membership::Created);
        for file in [NODE_KEY_FILE, TOKEN_FILE] {
            let mode = std::fs::metadata(dir.join(file))
                .expect("file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        let mode = std::fs::metadata(&dir).expect("dir").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let (again, how) = Identity::load_or_create(&dir, None).expect("load");
        assert_eq!(how, Membership::Stored);
        assert_eq!(again.key.public, first.key.public);
        assert_eq!(again.secret, first.secret);

        let other = JoinToken(ClusterSecret::random());
        let (joined, how) = Identity::load_or_create(&dir, Some(&other)).expect("join");
        assert_eq!(how, Membership::Joined);
        assert_eq!(joined.secret, other.0);
        assert_eq!(
            joined.key.public, first.key.public,
            "joining keeps the node's key"
        );
        let (stored, how) = Identity::load_or_create(&dir, Some(&other)).expect("rejoin");
        assert_eq!(how, Membership::Stored);
        assert_eq!(stored.secret, other.0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_secret_file_others_can_read_is_made_private() {
        let dir = scratch("loose");
        Identity::load_or_create(&dir, None).expect("create");
        let token = dir.join(TOKEN_FILE);
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        Identity::load_or_create(&dir, None).expect("load");
        let mode = std::fs::metadata(&token)
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
