//! Model delivery over MQTT (OTA): a signed manifest, then numbered chunks, staged in the state
//! directory, verified, then handed to the hot swap, which checks the candidate while it is
//! still staged and puts it in place only once accepted.
//!
//! Protocol (topics under `ota.topic`, default `edgeinfer/{device}/ota`):
//! - `<base>/<pipeline>/manifest` (QoS 1, JSON): `{"pipeline", "version", "release", "target",
//!   "expires", "size", "sha256", "chunk_size", "chunk_sha256", "key_id", "force", "nonce",
//!   "signature"}`; `signature` is base64 of an ed25519 signature, by the key `key_id` from
//!   `ota.trusted_keys`, over [`Manifest::signed_bytes`] (every other field).
//! - `<base>/<pipeline>/chunk/<n>` (QoS 1, binary): chunk `n` (0-based) of the file, exactly
//!   `chunk_size` bytes except the last, whose SHA-256 is `chunk_sha256[n]`.
//! - `<base>/<pipeline>/status` (QoS 1, JSON, from the daemon): `{"pipeline", "version",
//!   "release", "sha256", "state", "received", "chunks", "missing", "accepted_release",
//!   "nonce", "refused_chunks"?, "reason"?}` with `state` one of `receiving`, `installing`,
//!   `installed`, `rejected`. `missing` lists up to 256 chunk numbers still needed: a sender that
//!   reconnects (or restarts) re-publishes the manifest and sends those. Staged chunks survive a
//!   daemon restart, which republishes the status. The statuses of a transfer are retained; the
//!   answer to a refused manifest is not (a stranger's manifests never replace the retained
//!   status of a real transfer, and topics of unknown pipelines keep nothing).
//!
//! Replay protection (threat model in docs/models.md): the device keeps, per pipeline and
//! crash-safe in `<state_dir>/ota/releases.json`, the highest `release` it has accepted and a
//! random `nonce`. A manifest is accepted only when signed by a trusted key, for this device
//! (`target`: its id or one of `ota.groups`), before `expires`, with a `release` above the
//! accepted one. A downgrade (or a reinstall) needs `force`, which must carry the device's
//! current nonce; the nonce changes as soon as it is used, so a forced manifest works once.
//! A release is consumed when its last chunk arrives, whatever the swap then decides.
//!
//! Checks, each with a reason and nothing half-installed: unknown pipeline, bad fields, size
//! above `ota.max_size`, unknown key, bad signature, another target, expired, a release not
//! above the accepted one, a stale nonce, an offer older than the transfer in progress, too
//! little disk space, a chunk of the wrong length, number or hash (refused alone: the real
//! chunk is still accepted after a forged one), and a SHA-256 mismatch of the assembled file.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::sys::fsutil;

/// Domain separation of what the signature covers (and the protocol version).
const TAG: &str = "edgeinfer-ota-v2";
/// Status message `missing` lists at most this many chunk numbers.
const MAX_MISSING_LISTED: usize = 256;
/// Chunk sizes accepted.
pub const MIN_CHUNK: u64 = 1024;
pub const MAX_CHUNK: u64 = 1 << 20;
/// Chunks per file (the manifest lists a hash for each: at most ~270 KiB of JSON).
pub const MAX_CHUNKS: u64 = 4096;
/// The per-pipeline release counters and nonces, in the staging directory.
const RELEASES: &str = "releases.json";

/// A model offer, as signed by the publisher.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub pipeline: String,
    /// A label for people (health reports the model's own version once it runs).
    pub version: String,
    /// Release number: above every release this device accepted for the pipeline (the
    /// publisher's build number or a timestamp: anything that only grows).
    pub release: u64,
    /// The device id, or one of the groups in the device's `ota.groups`.
    pub target: String,
    /// Unix time in seconds after which the device refuses the manifest.
    pub expires: u64,
    pub size: u64,
    pub sha256: String,
    pub chunk_size: u64,
    /// SHA-256 of every chunk, in order (a forged chunk is refused on arrival).
    pub chunk_sha256: Vec<String>,
    pub key_id: String,
    /// Allow a release that is not above the accepted one (a downgrade); needs `nonce`.
    #[serde(default)]
    pub force: bool,
    /// With `force`: the device's current nonce (its status field `nonce`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub nonce: String,
    /// Base64 ed25519 signature over [`Manifest::signed_bytes`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signature: String,
}

impl Manifest {
    /// An unsigned manifest for `bytes` (the file's and every chunk's SHA-256 computed).
    #[allow(clippy::too_many_arguments)]
    pub fn for_file(
        pipeline: &str,
        version: &str,
        release: u64,
        target: &str,
        expires: u64,
        bytes: &[u8],
        chunk_size: u64,
        key_id: &str,
    ) -> Manifest {
        let chunk = usize::try_from(chunk_size.max(1)).unwrap_or(usize::MAX);
        Manifest {
            pipeline: pipeline.into(),
            version: version.into(),
            release,
            target: target.into(),
            expires,
            size: bytes.len() as u64,
            sha256: fsutil::hex(&sha2::Sha256::digest(bytes)),
            chunk_size,
            chunk_sha256: bytes
                .chunks(chunk)
                .map(|c| fsutil::hex(&sha2::Sha256::digest(c)))
                .collect(),
            key_id: key_id.into(),
            force: false,
            nonce: String::new(),
            signature: String::new(),
        }
    }

    /// Signs the manifest (every field but the signature) with `sk`.
    pub fn sign(&mut self, sk: &SigningKey) {
        self.signature = base64::engine::general_purpose::STANDARD
            .encode(sk.sign(&self.signed_bytes()).to_bytes());
    }

    /// What the signature covers: every field but the signature, one per line (the chunk hashes
    /// on one line, comma-separated), after a domain-separation tag. Fields are validated to
    /// hold no newline or comma before a signature is checked.
    pub fn signed_bytes(&self) -> Vec<u8> {
        format!(
            "{TAG}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n",
            self.pipeline,
            self.version,
            self.release,
            self.target,
            self.expires,
            self.size,
            self.sha256,
            self.chunk_size,
            self.chunk_sha256.join(","),
            self.key_id,
            self.force,
            self.nonce,
        )
        .into_bytes()
    }

    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size.max(1))
    }

    /// Expected length of chunk `n`.
    pub fn chunk_len(&self, n: u64) -> u64 {
        let start = n.saturating_mul(self.chunk_size);
        self.chunk_size.min(self.size.saturating_sub(start))
    }

    /// The checks that need no key and no device state: field formats and limits.
    fn check_fields(&self, max_size: u64) -> Result<(), String> {
        if !valid_token(&self.version, 64) || !valid_token(&self.key_id, 64) {
            return Err("version and key_id must be 1-64 characters of [A-Za-z0-9._+-]".into());
        }
        if !valid_token(&self.target, 64) {
            return Err(
                "target must be a device id or group: 1-64 characters of [A-Za-z0-9._+-]".into()
            );
        }
        if !is_sha256_hex(&self.sha256) {
            return Err("sha256 must be 64 lowercase hex digits".into());
        }
        if self.size == 0 || self.size > max_size {
            return Err(format!("size {} is not in 1..={max_size} (ota.max_size)", self.size));
        }
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&self.chunk_size) {
            return Err(format!("chunk_size must be {MIN_CHUNK}..={MAX_CHUNK}"));
        }
        if self.chunks() > MAX_CHUNKS {
            return Err(format!(
                "{} chunks: at most {MAX_CHUNKS} (use a larger chunk_size)",
                self.chunks()
            ));
        }
        if self.chunk_sha256.len() as u64 != self.chunks()
            || !self.chunk_sha256.iter().all(|h| is_sha256_hex(h))
        {
            return Err(format!(
                "chunk_sha256 must list {} SHA-256 hashes (64 lowercase hex digits each)",
                self.chunks()
            ));
        }
        if self.nonce.len() > 64 || !self.nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("nonce must be at most 64 hex digits".into());
        }
        Ok(())
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The daemon's answer, published on the status topic.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    pub pipeline: String,
    pub version: String,
    /// The offer's release (0 when the manifest could not be read).
    pub release: u64,
    pub sha256: String,
    pub state: &'static str,
    pub received: u64,
    pub chunks: u64,
    pub missing: Vec<u64>,
    /// The highest release this device has accepted for the pipeline.
    pub accepted_release: u64,
    /// The nonce a forced manifest must carry now (empty for unknown pipelines).
    pub nonce: String,
    /// Chunks of this transfer refused on arrival (wrong hash, length or number).
    #[serde(skip_serializing_if = "is_zero")]
    pub refused_chunks: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Published retained (the state of a transfer) or not (the answer to a refused offer).
    #[serde(skip)]
    pub retain: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What the serving loop must do after a message.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Publish this status.
    Status(Status),
    /// The file is verified and staged: publish the status and start a swap of the pipeline
    /// from the staged file (placed over the model only if the swap accepts it).
    Install(Install),
    /// Every chunk is in: publish the status, then run the verification (hashing the whole
    /// file) off the serving task; it yields `Install` or a rejected `Status`.
    Verify(Box<Verify>),
    /// Nothing to say (e.g. a duplicate chunk).
    Quiet,
}

/// A verified delivery waiting for the swap.
#[derive(Debug, PartialEq)]
pub struct Install {
    pub status: Status,
    /// The verified file, still in the staging directory.
    pub staged: PathBuf,
}

/// A complete staged file waiting for its hash check.
#[derive(Debug, PartialEq)]
pub struct Verify {
    pub status: Status,
    part: PathBuf,
    manifest: Manifest,
}

impl Verify {
    /// Hashes and fsyncs the staged file (blocking: seconds for a large model) and renames it
    /// to the candidate the swap loads. On a mismatch the staged file is deleted.
    pub fn run(self) -> Outcome {
        let staged = self.part.with_extension(format!("{}.candidate", self.manifest.release));
        match verify(&self.part, &self.manifest, &staged) {
            Ok(()) => Outcome::Install(Install { status: self.status, staged }),
            Err(reason) => {
                let _ = fs::remove_file(&self.part);
                let mut st = self.status;
                st.state = "rejected";
                st.reason = Some(reason);
                Outcome::Status(st)
            }
        }
    }
}

/// Configuration the receiver needs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Staging directory (`<state_dir>/ota`).
    pub dir: PathBuf,
    pub max_size: u64,
    /// Free space to leave on the state directory's file system after staging and installing.
    pub min_free: u64,
    /// key_id -> ed25519 public key.
    pub keys: BTreeMap<String, VerifyingKey>,
    /// This device's id and groups: the targets it accepts.
    pub device_id: String,
    pub groups: Vec<String>,
    /// The configured pipelines (each gets a release counter and a nonce).
    pub pipelines: Vec<String>,
}

/// Decodes a base64 ed25519 public key (32 bytes).
pub fn parse_public_key(b64: &str) -> Result<VerifyingKey, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| format!("not base64: {e}"))?;
    let arr: [u8; 32] =
        bytes.try_into().map_err(|_| "an ed25519 public key is 32 bytes".to_string())?;
    VerifyingKey::from_bytes(&arr).map_err(|e| format!("not an ed25519 public key: {e}"))
}

/// A transfer in progress for one pipeline.
#[derive(Debug)]
struct Session {
    manifest: Manifest,
    part: PathBuf,
    have: Vec<bool>,
    refused: u64,
}

/// Per pipeline, kept crash-safe in `releases.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Accepted {
    /// The highest release accepted (consumed when its last chunk arrived).
    release: u64,
    /// What a forced manifest must carry; replaced once used.
    nonce: String,
}

/// The receiving side of the protocol.
pub struct Receiver {
    settings: Settings,
    sessions: BTreeMap<String, Session>,
    accepted: BTreeMap<String, Accepted>,
}

fn valid_token(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
}

/// 128 random bits from the kernel, as hex.
fn new_nonce() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(fsutil::hex(&b))
}

/// Seconds since the epoch by the system clock.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Receiver {
    /// Opens the staging directory, reads the release counters (a damaged counter file keeps
    /// OTA off rather than forgetting what was accepted), gives every pipeline a nonce, removes
    /// candidates a crash left behind, and resumes the transfers staged there.
    pub fn open(settings: Settings) -> Result<Receiver, String> {
        fs::create_dir_all(&settings.dir)
            .map_err(|e| format!("cannot create {}: {e}", settings.dir.display()))?;
        let path = settings.dir.join(RELEASES);
        let mut accepted: BTreeMap<String, Accepted> = match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                format!(
                    "{} is damaged ({e}); OTA stays off rather than forget which releases were accepted. \
                     hint: restore it, or delete it to accept any release again",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let mut changed = false;
        for p in &settings.pipelines {
            let a = accepted.entry(p.clone()).or_default();
            if a.nonce.is_empty() {
                a.nonce = new_nonce().map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
                changed = true;
            }
        }
        let mut r = Receiver { settings, sessions: BTreeMap::new(), accepted };
        if changed {
            r.save()?;
        }
        r.resume();
        Ok(r)
    }

    fn save(&self) -> Result<(), String> {
        let path = self.settings.dir.join(RELEASES);
        let json = serde_json::to_vec_pretty(&self.accepted).map_err(|e| e.to_string())?;
        fsutil::write_atomic(&path, |f| f.write_all(&json))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    fn session_paths(&self, pipeline: &str) -> (PathBuf, PathBuf, PathBuf) {
        let d = &self.settings.dir;
        (
            d.join(format!("{pipeline}.manifest.json")),
            d.join(format!("{pipeline}.part")),
            d.join(format!("{pipeline}.chunks")),
        )
    }

    /// Reloads staged sessions (manifest + chunk bitmap) left by a previous run; deletes
    /// verified candidates whose swap a crash interrupted (their release is consumed: the
    /// publisher sends a new one).
    fn resume(&mut self) {
        let Ok(entries) = fs::read_dir(&self.settings.dir) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".candidate") {
                log::warn!(
                    "OTA: removing {name}, a delivery whose swap did not finish before a restart"
                );
                let _ = fs::remove_file(e.path());
                continue;
            }
            let Some(pipeline) = name.strip_suffix(".manifest.json") else { continue };
            let (mpath, part, bitmap) = self.session_paths(pipeline);
            let manifest: Option<Manifest> =
                fs::read(&mpath).ok().and_then(|b| serde_json::from_slice(&b).ok());
            let Some(manifest) = manifest else { continue };
            let n = manifest.chunks() as usize;
            let bits = fs::read(&bitmap).unwrap_or_default();
            let have = (0..n).map(|i| bits.get(i).is_some_and(|b| *b == 1)).collect();
            if part.exists() {
                self.sessions
                    .insert(pipeline.to_string(), Session { manifest, part, have, refused: 0 });
            }
        }
    }

    /// A status of `pipeline` about the offer `m` (or none).
    fn status(
        &self,
        pipeline: &str,
        m: Option<&Manifest>,
        state: &'static str,
        reason: Option<String>,
        retain: bool,
    ) -> Status {
        let a = self.accepted.get(pipeline);
        let session =
            self.sessions.get(pipeline).filter(|s| m.is_none_or(|m| s.manifest.sha256 == m.sha256));
        let m = m.or(session.map(|s| &s.manifest));
        let (received, missing, refused) = match session {
            Some(s) => (
                s.have.iter().filter(|h| **h).count() as u64,
                s.have
                    .iter()
                    .enumerate()
                    .filter(|(_, h)| !**h)
                    .map(|(i, _)| i as u64)
                    .take(MAX_MISSING_LISTED)
                    .collect(),
                s.refused,
            ),
            None => (0, Vec::new(), 0),
        };
        Status {
            pipeline: pipeline.to_string(),
            version: m.map(|m| m.version.clone()).unwrap_or_default(),
            release: m.map_or(0, |m| m.release),
            sha256: m.map(|m| m.sha256.clone()).unwrap_or_default(),
            state,
            received,
            chunks: m.map_or(0, Manifest::chunks),
            missing,
            accepted_release: a.map_or(0, |a| a.release),
            nonce: a.map(|a| a.nonce.clone()).unwrap_or_default(),
            refused_chunks: refused,
            reason,
            retain,
        }
    }

    /// An answer to an offer that is refused before it touches any transfer: not retained.
    fn refuse(&self, pipeline: &str, m: Option<&Manifest>, reason: String) -> Outcome {
        Outcome::Status(Status {
            received: 0,
            missing: Vec::new(),
            refused_chunks: 0,
            ..self.status(pipeline, m, "rejected", Some(reason), false)
        })
    }

    /// Statuses of the transfers staged now (published at start-up so senders resume).
    pub fn pending(&self) -> Vec<Status> {
        self.sessions.keys().map(|p| self.status(p, None, "receiving", None, true)).collect()
    }

    /// Handles a manifest for `pipeline` (the topic level); `known`: the pipeline exists here.
    /// `now`: unix seconds (the system clock; a parameter for tests).
    pub fn on_manifest(
        &mut self,
        pipeline: &str,
        known: bool,
        payload: &[u8],
        now: u64,
    ) -> Outcome {
        let m: Manifest = match serde_json::from_slice(payload) {
            Ok(m) => m,
            Err(e) => return self.refuse(pipeline, None, format!("malformed manifest: {e}")),
        };
        if !known {
            return self.refuse(
                pipeline,
                Some(&m),
                format!("no pipeline named {pipeline:?} on this device"),
            );
        }
        if m.pipeline != pipeline {
            return self.refuse(
                pipeline,
                Some(&m),
                format!("manifest names pipeline {:?}, published for {pipeline:?}", m.pipeline),
            );
        }
        if let Err(why) = m.check_fields(self.settings.max_size) {
            return self.refuse(pipeline, Some(&m), why);
        }
        let Some(key) = self.settings.keys.get(&m.key_id) else {
            return self.refuse(
                pipeline,
                Some(&m),
                format!("unknown key {:?} (not in ota.trusted_keys)", m.key_id),
            );
        };
        let sig = base64::engine::general_purpose::STANDARD
            .decode(m.signature.trim())
            .ok()
            .and_then(|b| Signature::from_slice(&b).ok());
        let Some(sig) = sig else {
            return self.refuse(
                pipeline,
                Some(&m),
                "signature is not a base64 ed25519 signature".into(),
            );
        };
        if key.verify(&m.signed_bytes(), &sig).is_err() {
            return self.refuse(
                pipeline,
                Some(&m),
                format!("bad signature for key {:?}", m.key_id),
            );
        }
        // Authentic from here on; what follows guards against replays.
        if m.target != self.settings.device_id && !self.settings.groups.contains(&m.target) {
            return self.refuse(
                pipeline,
                Some(&m),
                format!(
                    "signed for target {:?}, not for this device ({:?}) or its groups {:?}",
                    m.target, self.settings.device_id, self.settings.groups
                ),
            );
        }
        if now >= m.expires {
            return self.refuse(
                pipeline,
                Some(&m),
                format!("expired: valid until {} (unix seconds), now {now}", m.expires),
            );
        }
        // The same file and release as the transfer in progress: carry on where it stands
        // (a sender that reconnected, or the daemon restarted).
        if let Some(s) = self.sessions.get(pipeline)
            && s.manifest.sha256 == m.sha256
            && s.manifest.chunk_size == m.chunk_size
            && s.manifest.size == m.size
            && s.manifest.release == m.release
        {
            return Outcome::Status(self.status(pipeline, Some(&m), "receiving", None, true));
        }
        let accepted = self.accepted.get(pipeline).cloned().unwrap_or_default();
        if m.force {
            if m.nonce.is_empty() || m.nonce != accepted.nonce {
                return self.refuse(
                    pipeline,
                    Some(&m),
                    "force needs the device's current nonce (the `nonce` of this status): sign the manifest again with it".into(),
                );
            }
        } else if m.release <= accepted.release {
            return self.refuse(
                pipeline,
                Some(&m),
                format!(
                    "release {} is not above the last accepted release {} (a replay or a downgrade; \
                     a deliberate downgrade needs force with the device's nonce)",
                    m.release, accepted.release
                ),
            );
        }
        if let Some(s) = self.sessions.get(pipeline)
            && m.release <= s.manifest.release
            && !m.force
        {
            return self.refuse(
                pipeline,
                Some(&m),
                format!(
                    "release {} is not above release {} whose transfer is in progress",
                    m.release, s.manifest.release
                ),
            );
        }
        self.discard(pipeline);
        if m.force {
            // Used once: a replay of this forced manifest carries a stale nonce.
            match new_nonce() {
                Ok(n) => {
                    if let Some(a) = self.accepted.get_mut(pipeline) {
                        a.nonce = n;
                    }
                }
                Err(e) => {
                    return self.refuse(
                        pipeline,
                        Some(&m),
                        format!("cannot read /dev/urandom: {e}"),
                    );
                }
            }
            if let Err(e) = self.save() {
                return self.refuse(pipeline, Some(&m), e);
            }
        }
        if let Err(e) = self.stage(pipeline, &m) {
            self.discard(pipeline);
            return Outcome::Status(self.status(pipeline, Some(&m), "rejected", Some(e), true));
        }
        Outcome::Status(self.status(pipeline, Some(&m), "receiving", None, true))
    }

    fn stage(&mut self, pipeline: &str, m: &Manifest) -> Result<(), String> {
        // fsblkcnt_t and c_ulong are not u64 on every target.
        #[allow(clippy::unnecessary_cast)]
        let free = nix::sys::statvfs::statvfs(&self.settings.dir)
            .map(|s| (s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
            .map_err(|e| {
                format!("cannot check free space in {}: {e}", self.settings.dir.display())
            })?;
        // Room for the staged file and the installed copy, and what must stay free.
        let needed = m.size.saturating_mul(2).saturating_add(self.settings.min_free);
        if free < needed {
            return Err(format!(
                "disk full: {free} bytes free in {}, {needed} needed (twice the model plus ota.min_free)",
                self.settings.dir.display()
            ));
        }
        let (mpath, part, bitmap) = self.session_paths(pipeline);
        let f =
            File::create(&part).map_err(|e| format!("cannot create {}: {e}", part.display()))?;
        f.set_len(m.size).map_err(|e| format!("cannot size {}: {e}", part.display()))?;
        f.sync_all().map_err(|e| format!("cannot sync {}: {e}", part.display()))?;
        let n = m.chunks() as usize;
        // Durable before the manifest names them: a crash never pairs a new manifest with the
        // previous transfer's chunk map.
        fsutil::write_atomic(&bitmap, |f| f.write_all(&vec![0u8; n]))
            .map_err(|e| format!("cannot write {}: {e}", bitmap.display()))?;
        let json = serde_json::to_vec(m).map_err(|e| e.to_string())?;
        fsutil::write_atomic(&mpath, |f| f.write_all(&json))
            .map_err(|e| format!("cannot write {}: {e}", mpath.display()))?;
        self.sessions.insert(
            pipeline.to_string(),
            Session { manifest: m.clone(), part, have: vec![false; n], refused: 0 },
        );
        Ok(())
    }

    fn discard(&mut self, pipeline: &str) {
        self.sessions.remove(pipeline);
        let (mpath, part, bitmap) = self.session_paths(pipeline);
        for p in [mpath, part, bitmap] {
            let _ = fs::remove_file(p);
        }
    }

    /// A chunk refused on arrival: counted in the transfer, answered (not retained); the
    /// transfer goes on and the real chunk is still accepted.
    fn refuse_chunk(&mut self, pipeline: &str, why: String) -> Outcome {
        let Some(s) = self.sessions.get_mut(pipeline) else { return Outcome::Quiet };
        s.refused += 1;
        let m = s.manifest.clone();
        Outcome::Status(self.status(pipeline, Some(&m), "receiving", Some(why), false))
    }

    /// Handles chunk `n` for `pipeline`. Once every chunk is in, the release is consumed and
    /// the file goes to verification.
    pub fn on_chunk(&mut self, pipeline: &str, n: &str, payload: &[u8]) -> Outcome {
        let Some(s) = self.sessions.get(pipeline) else {
            // A chunk without a transfer (a finished one, an unknown pipeline, a stranger): the
            // sender offers the manifest first. Nothing to publish on a topic it chose.
            log::debug!("OTA chunk for {pipeline:?} without a transfer in progress; ignored");
            return Outcome::Quiet;
        };
        let m = s.manifest.clone();
        let Ok(n) = n.parse::<u64>() else {
            return self.refuse_chunk(pipeline, format!("chunk number {n:?} is not a number"));
        };
        if n >= m.chunks() {
            return self.refuse_chunk(
                pipeline,
                format!("chunk {n} is beyond the {} chunks of the manifest", m.chunks()),
            );
        }
        if s.have[n as usize] {
            return Outcome::Quiet;
        }
        if payload.len() as u64 != m.chunk_len(n) {
            return self.refuse_chunk(
                pipeline,
                format!(
                    "chunk {n} has {} bytes, the manifest says {}",
                    payload.len(),
                    m.chunk_len(n)
                ),
            );
        }
        if fsutil::hex(&sha2::Sha256::digest(payload)) != m.chunk_sha256[n as usize] {
            return self.refuse_chunk(
                pipeline,
                format!("chunk {n} refused: its SHA-256 is not the manifest's (forged or damaged)"),
            );
        }
        let (_, _, bitmap) = self.session_paths(pipeline);
        let Some(s) = self.sessions.get_mut(pipeline) else { return Outcome::Quiet };
        let write = || -> std::io::Result<()> {
            let f = OpenOptions::new().write(true).open(&s.part)?;
            f.write_all_at(payload, n * m.chunk_size)?;
            // The chunk is on disk before the map says so: after a power cut a marked chunk is
            // never a hole (an unmarked one is simply asked for again).
            f.sync_data()?;
            let b = OpenOptions::new().write(true).open(&bitmap)?;
            b.write_all_at(&[1], n)?;
            Ok(())
        };
        if let Err(e) = write() {
            let reason = format!("cannot stage chunk {n}: {e}");
            let st = self.status(pipeline, Some(&m), "rejected", Some(reason), true);
            self.discard(pipeline);
            return Outcome::Status(st);
        }
        s.have[n as usize] = true;
        let done = s.have.iter().all(|h| *h);
        // Progress every 16 chunks and at the end keeps the status topic quiet but live.
        if !done {
            return if n % 16 == 0 {
                Outcome::Status(self.status(pipeline, Some(&m), "receiving", None, true))
            } else {
                Outcome::Quiet
            };
        }
        // The release is consumed now, before anything is verified or placed: a crash from here
        // on never lets this manifest in again (the publisher sends a new release).
        let mut status = self.status(pipeline, Some(&m), "installing", None, true);
        let previous = self.accepted.get(pipeline).map_or(0, |a| a.release);
        if let Some(a) = self.accepted.get_mut(pipeline) {
            a.release = a.release.max(m.release);
        }
        if let Err(e) = self.save() {
            if let Some(a) = self.accepted.get_mut(pipeline) {
                a.release = previous;
            }
            status.state = "rejected";
            status.reason = Some(e);
            self.discard(pipeline);
            return Outcome::Status(status);
        }
        status.accepted_release = self.accepted.get(pipeline).map_or(0, |a| a.release);
        // The session ends here; the staged file now belongs to the verification.
        let Some(s) = self.sessions.remove(pipeline) else { return Outcome::Quiet };
        let (mpath, _, bitmap) = self.session_paths(pipeline);
        let _ = fs::remove_file(mpath);
        let _ = fs::remove_file(bitmap);
        Outcome::Verify(Box::new(Verify { status, part: s.part, manifest: m }))
    }
}

/// Hashes the staged file, fsyncs it and renames it to `candidate`.
fn verify(part: &Path, m: &Manifest, candidate: &Path) -> Result<(), String> {
    let staged = |e: std::io::Error| format!("cannot read the staged file: {e}");
    let mut f = File::open(part).map_err(staged)?;
    let sha = fsutil::sha256_hex(&mut f).map_err(staged)?;
    if sha != m.sha256 {
        return Err(format!(
            "sha256 mismatch: the chunks assemble to {sha}, the manifest says {}",
            m.sha256
        ));
    }
    f.sync_all().map_err(|e| format!("cannot sync the staged file: {e}"))?;
    fs::rename(part, candidate).map_err(|e| format!("cannot stage the candidate: {e}"))
}

/// Puts an accepted candidate in place of the model file: a rename (and a directory fsync), or
/// a crash-safe copy when the state directory is on another file system.
pub fn place(candidate: &Path, dest: &Path) -> Result<(), String> {
    let placed = match fs::rename(candidate, dest) {
        Ok(()) => dest.parent().map_or(Ok(()), |d| File::open(d).and_then(|d| d.sync_all())),
        Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
            let r = fsutil::write_atomic(dest, |out| {
                std::io::copy(&mut File::open(candidate)?, out).map(|_| ())
            });
            let _ = fs::remove_file(candidate);
            r
        }
        Err(e) => Err(e),
    };
    placed.map_err(|e| format!("cannot install {}: {e}", dest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn manifest(bytes: &[u8], release: u64, sk: &SigningKey) -> Manifest {
        let mut m = Manifest::for_file(
            "digits",
            &release.to_string(),
            release,
            "edge-01",
            NOW + 3600,
            bytes,
            1024,
            "fleet",
        );
        m.sign(sk);
        m
    }

    fn json(m: &Manifest) -> Vec<u8> {
        serde_json::to_vec(m).expect("json")
    }

    struct Rig {
        _tmp: tempfile::TempDir,
        rx: Receiver,
        settings: Settings,
    }

    fn rig() -> Rig {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut keys = BTreeMap::new();
        keys.insert("fleet".to_string(), key().verifying_key());
        let settings = Settings {
            dir: tmp.path().join("ota"),
            max_size: 1 << 20,
            min_free: 0,
            keys,
            device_id: "edge-01".into(),
            groups: vec!["lab".into()],
            pipelines: vec!["digits".into()],
        };
        Rig { rx: Receiver::open(settings.clone()).expect("open"), _tmp: tmp, settings }
    }

    fn body(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Feeds chunks; a verification runs inline (the serving loop runs it off its task).
    fn send(r: &mut Rig, bytes: &[u8], chunks: impl Iterator<Item = u64>) -> Vec<Outcome> {
        chunks
            .map(|n| {
                let s = (n * 1024) as usize;
                let e = (s + 1024).min(bytes.len());
                match r.rx.on_chunk("digits", &n.to_string(), &bytes[s..e]) {
                    Outcome::Verify(v) => v.run(),
                    o => o,
                }
            })
            .collect()
    }

    fn offer(r: &mut Rig, m: &Manifest) -> Outcome {
        r.rx.on_manifest("digits", true, &json(m), NOW)
    }

    fn state(o: &Outcome) -> (&'static str, Option<String>, bool) {
        match o {
            Outcome::Status(s) => (s.state, s.reason.clone(), s.retain),
            Outcome::Install(i) => (i.status.state, None, true),
            Outcome::Verify(v) => (v.status.state, None, true),
            Outcome::Quiet => ("quiet", None, false),
        }
    }

    fn deliver(r: &mut Rig, m: &Manifest, bytes: &[u8]) -> Outcome {
        assert_eq!(state(&offer(r, m)).0, "receiving");
        send(r, bytes, 0..m.chunks()).pop().expect("last")
    }

    #[test]
    fn a_signed_model_arrives_in_chunks_and_is_verified_but_not_placed() {
        let mut r = rig();
        let bytes = body(5000);
        let m = manifest(&bytes, 2, &key());
        let Outcome::Status(s) = offer(&mut r, &m) else { panic!() };
        assert_eq!((s.state, s.chunks, s.missing.clone()), ("receiving", 5, vec![0, 1, 2, 3, 4]));
        assert!(s.retain && s.nonce.len() == 32, "{s:?}");
        // Out of order, with a duplicate.
        let mut outs = send(&mut r, &bytes, [4, 1, 1, 0, 3, 2].into_iter());
        let Some(Outcome::Install(i)) = outs.pop() else { panic!("{outs:?}") };
        assert_eq!((i.status.state, i.status.accepted_release), ("installing", 2));
        assert_eq!(fs::read(&i.staged).expect("candidate"), bytes, "verified, still staged");
        assert!(i.staged.starts_with(&r.settings.dir));
        assert!(r.rx.pending().is_empty(), "the transfer is over");
        // The swap places it only once it accepts it.
        let dest = r._tmp.path().join("digits.onnx");
        place(&i.staged, &dest).expect("place");
        assert_eq!(fs::read(&dest).expect("model"), bytes);
    }

    #[test]
    fn a_transfer_resumes_after_a_restart() {
        let mut r = rig();
        let bytes = body(5000);
        let m = manifest(&bytes, 2, &key());
        offer(&mut r, &m);
        send(&mut r, &bytes, [0, 2].into_iter());
        // The daemon restarts: staged chunks are still there.
        r.rx = Receiver::open(r.settings.clone()).expect("reopen");
        let p = r.rx.pending();
        assert_eq!((p.len(), p[0].missing.clone()), (1, vec![1, 3, 4]));
        // The sender re-publishes the manifest (signed again: a later expiry) and the rest.
        let mut again = m.clone();
        again.expires += 10;
        again.sign(&key());
        let Outcome::Status(s) = offer(&mut r, &again) else { panic!() };
        assert_eq!(s.missing, vec![1, 3, 4]);
        let outs = send(&mut r, &bytes, [1, 3, 4].into_iter());
        assert!(matches!(outs.last(), Some(Outcome::Install(_))), "{outs:?}");
    }

    #[test]
    fn refused_offers_say_why_stage_nothing_and_are_not_retained() {
        let bytes = body(3000);
        let good = manifest(&bytes, 2, &key());
        let resign = |f: &dyn Fn(&mut Manifest)| {
            let mut m = good.clone();
            f(&mut m);
            m.sign(&key());
            m
        };
        let cases: Vec<(&str, Manifest, &str)> = vec![
            ("tampered after signing", Manifest { release: 3, ..good.clone() }, "bad signature"),
            ("unknown key", resign(&|m| m.key_id = "other".into()), "unknown key"),
            (
                "foreign signer",
                manifest(&bytes, 2, &SigningKey::from_bytes(&[9u8; 32])),
                "bad signature",
            ),
            ("another device", resign(&|m| m.target = "edge-02".into()), "signed for target"),
            ("expired", resign(&|m| m.expires = NOW - 1), "expired"),
            ("release zero", resign(&|m| m.release = 0), "not above"),
            ("path trick", resign(&|m| m.version = "../2".into()), "version and key_id"),
            ("too big", resign(&|m| m.size = 2 << 20), "ota.max_size"),
            ("chunk size", resign(&|m| m.chunk_size = 10), "chunk_size"),
            (
                "hash list",
                resign(&|m| {
                    m.chunk_sha256.pop();
                }),
                "chunk_sha256",
            ),
            ("force without nonce", resign(&|m| m.force = true), "nonce"),
        ];
        for (what, m, expect) in cases {
            let mut r = rig();
            let (st, reason, retain) = state(&offer(&mut r, &m));
            assert_eq!(st, "rejected", "{what}");
            assert!(reason.as_deref().unwrap_or("").contains(expect), "{what}: {reason:?}");
            assert!(!retain, "{what}: an answer, not the retained state of a transfer");
            assert!(r.rx.pending().is_empty(), "{what}: nothing staged");
        }
        // A group target is accepted.
        let mut r = rig();
        assert_eq!(state(&offer(&mut r, &resign(&|m| m.target = "lab".into()))).0, "receiving");
        // Unknown pipeline and malformed JSON: answered, never retained.
        let mut r = rig();
        let (st, reason, retain) = state(&r.rx.on_manifest("nope", false, &json(&good), NOW));
        assert_eq!((st, retain), ("rejected", false));
        assert!(reason.unwrap_or_default().contains("no pipeline"));
        assert!(!state(&r.rx.on_manifest("digits", true, b"{", NOW)).2);
        // Not enough room left (min_free stands in for a full disk): a real transfer's failure.
        let mut r = rig();
        r.settings.min_free = u64::MAX / 2;
        r.rx = Receiver::open(r.settings.clone()).expect("open");
        let (st, reason, _) = state(&offer(&mut r, &good));
        assert_eq!(st, "rejected");
        assert!(reason.unwrap_or_default().contains("disk full"));
        assert!(r.rx.pending().is_empty(), "nothing staged");
    }

    #[test]
    fn replays_and_downgrades_are_refused_across_restarts() {
        let mut r = rig();
        let (b1, b2) = (body(3000), body(2500));
        let (r1, r2) = (manifest(&b1, 1, &key()), manifest(&b2, 2, &key()));
        assert!(matches!(deliver(&mut r, &r1, &b1), Outcome::Install(_)));
        assert!(matches!(deliver(&mut r, &r2, &b2), Outcome::Install(_)));
        for m in [&r1, &r2] {
            let (st, reason, _) = state(&offer(&mut r, m));
            assert_eq!(st, "rejected", "replay of release {}", m.release);
            assert!(reason.unwrap_or_default().contains("not above the last accepted release 2"));
        }
        // The counter is on disk: a restart remembers it.
        r.rx = Receiver::open(r.settings.clone()).expect("reopen");
        assert_eq!(state(&offer(&mut r, &r1)).0, "rejected");
        // A damaged counter file keeps OTA off instead of forgetting.
        fs::write(r.settings.dir.join(RELEASES), b"{not json").expect("damage");
        let e = Receiver::open(r.settings.clone()).err().expect("refused");
        assert!(e.contains("damaged"), "{e}");
    }

    #[test]
    fn a_replay_never_disturbs_a_transfer_in_progress() {
        let mut r = rig();
        let (b1, b3) = (body(3000), body(4000));
        let r1 = manifest(&b1, 1, &key());
        assert!(matches!(deliver(&mut r, &r1, &b1), Outcome::Install(_)));
        let r3 = manifest(&b3, 3, &key());
        offer(&mut r, &r3);
        send(&mut r, &b3, [0, 1].into_iter());
        // Replays of an old release, and an older but never-installed release 2.
        let r2 = manifest(&body(1500), 2, &key());
        for m in [&r1, &r2] {
            let (st, _, retain) = state(&offer(&mut r, m));
            assert_eq!((st, retain), ("rejected", false), "release {}", m.release);
        }
        let p = r.rx.pending();
        assert_eq!((p.len(), p[0].release, p[0].received), (1, 3, 2), "the transfer is intact");
        assert!(matches!(send(&mut r, &b3, [2, 3].into_iter()).pop(), Some(Outcome::Install(_))));
    }

    #[test]
    fn force_needs_the_current_nonce_and_works_once() {
        let mut r = rig();
        let (b5, b4) = (body(3000), body(2000));
        assert!(matches!(deliver(&mut r, &manifest(&b5, 5, &key()), &b5), Outcome::Install(_)));
        // A downgrade to release 4: refused, the answer carries the nonce to sign.
        let Outcome::Status(s) = offer(&mut r, &manifest(&b4, 4, &key())) else { panic!() };
        assert_eq!((s.state, s.accepted_release), ("rejected", 5));
        let mut forced = manifest(&b4, 4, &key());
        forced.force = true;
        forced.nonce = s.nonce.clone();
        forced.sign(&key());
        assert!(matches!(deliver(&mut r, &forced, &b4), Outcome::Install(_)));
        // The nonce changed when it was used: the forced manifest cannot be replayed.
        let (st, reason, _) = state(&offer(&mut r, &forced));
        assert_eq!(st, "rejected");
        assert!(reason.unwrap_or_default().contains("nonce"));
        // The high-water mark stays at 5: release 5 again is a replay, 6 is new.
        assert_eq!(state(&offer(&mut r, &manifest(&b5, 5, &key()))).0, "rejected");
        assert_eq!(state(&offer(&mut r, &manifest(&b5, 6, &key()))).0, "receiving");
    }

    #[test]
    fn a_forged_chunk_is_refused_and_the_real_one_accepted() {
        let mut r = rig();
        let bytes = body(3000);
        let m = manifest(&bytes, 2, &key());
        offer(&mut r, &m);
        let mut forged = bytes[..1024].to_vec();
        forged[5] ^= 1;
        let (st, reason, retain) = state(&r.rx.on_chunk("digits", "0", &forged));
        assert_eq!((st, retain), ("receiving", false));
        assert!(reason.unwrap_or_default().contains("SHA-256"));
        for (n, payload, expect) in [
            ("9", &bytes[..1024], "beyond"),
            ("0", &bytes[..10], "has 10 bytes"),
            ("x", &bytes[..10], "not a number"),
        ] {
            let (_, reason, _) = state(&r.rx.on_chunk("digits", n, payload));
            assert!(reason.unwrap_or_default().contains(expect), "{n}");
        }
        assert_eq!(r.rx.pending()[0].refused_chunks, 4);
        let outs = send(&mut r, &bytes, 0..3);
        assert!(matches!(outs.last(), Some(Outcome::Install(_))), "{outs:?}");
        // Chunks for no transfer are ignored without an answer.
        assert_eq!(r.rx.on_chunk("nope", "0", b"x"), Outcome::Quiet);
    }

    #[test]
    fn a_file_that_does_not_hash_to_the_manifest_is_rejected() {
        let mut r = rig();
        let bytes = body(3000);
        let m = manifest(&bytes, 2, &key());
        offer(&mut r, &m);
        let outs = send(&mut r, &bytes, 0..3);
        let Some(Outcome::Install(i)) = outs.into_iter().last() else { panic!() };
        // Damage on disk between the chunks and the verification (fault injection).
        let mut other = manifest(&bytes, 3, &key());
        other.sha256 = "0".repeat(64);
        let part = r.settings.dir.join("digits.part");
        fs::rename(&i.staged, &part).expect("back to part");
        let v = Verify { status: i.status, part: part.clone(), manifest: other };
        let (st, reason, _) = state(&v.run());
        assert_eq!(st, "rejected");
        assert!(reason.unwrap_or_default().contains("sha256 mismatch"));
        assert!(!part.exists(), "deleted");
    }
}
