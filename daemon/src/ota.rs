//! Model delivery over MQTT (OTA): a signed manifest, then numbered chunks, staged in the state
//! directory, verified, then handed to the hot swap.
//!
//! Protocol (topics under `ota.topic`, default `edgeinfer/{device}/ota`):
//! - `<base>/<pipeline>/manifest` (QoS 1, JSON): `{"pipeline", "version", "size", "sha256",
//!   "chunk_size", "key_id", "force", "signature"}`; `signature` is base64 of an ed25519
//!   signature, by the key `key_id` from `ota.trusted_keys`, over [`Manifest::signed_bytes`].
//! - `<base>/<pipeline>/chunk/<n>` (QoS 1, binary): chunk `n` (0-based) of the file, exactly
//!   `chunk_size` bytes except the last.
//! - `<base>/<pipeline>/status` (QoS 1, retained, JSON, from the daemon): `{"pipeline",
//!   "version", "sha256", "state", "received", "chunks", "missing", "reason"?}` with `state` one of
//!   `receiving`, `installing`, `installed`, `rejected`. `missing` lists up to 256 chunk numbers
//!   still needed: a sender that reconnects (or restarts) re-publishes the manifest and sends
//!   those. Staged chunks survive a daemon restart, which republishes the status.
//!
//! Checks, each with a `rejected` status and a reason, nothing half-installed: unknown pipeline,
//! bad fields, size above `ota.max_size`, unknown key, bad signature, a version that is not
//! newer than the running one (unless `force`, which is signed too), too little disk space, a
//! chunk of the wrong length or number, and a SHA-256 mismatch of the assembled file. A verified
//! file is fsync'd and renamed over the pipeline's model file; the hot swap (golden pairs,
//! signature, probation) then decides whether it runs.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::sys::fsutil;

/// Status message `missing` lists at most this many chunk numbers.
const MAX_MISSING_LISTED: usize = 256;
/// Chunk sizes accepted.
pub const MIN_CHUNK: u64 = 1024;
pub const MAX_CHUNK: u64 = 1 << 20;

/// A model offer, as signed by the publisher.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub pipeline: String,
    pub version: String,
    pub size: u64,
    pub sha256: String,
    pub chunk_size: u64,
    pub key_id: String,
    #[serde(default)]
    pub force: bool,
    /// Base64 ed25519 signature over [`Manifest::signed_bytes`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signature: String,
}

impl Manifest {
    /// What the signature covers: every field but the signature, one per line, after a
    /// domain-separation tag (fields are validated to hold no newline).
    pub fn signed_bytes(&self) -> Vec<u8> {
        format!(
            "edgeinfer-ota-v1\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n",
            self.pipeline,
            self.version,
            self.size,
            self.sha256,
            self.chunk_size,
            self.key_id,
            self.force
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
}

/// The daemon's answer, published on the status topic.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    pub pipeline: String,
    pub version: String,
    pub sha256: String,
    pub state: &'static str,
    pub received: u64,
    pub chunks: u64,
    pub missing: Vec<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What the serving loop must do after a message.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Publish this status.
    Status(Status),
    /// The file is verified and in place: publish the status and start a swap of the pipeline.
    Install(Status),
    /// Every chunk is in: publish the status, then run the verification (hashing the whole
    /// file) off the serving task; it yields `Install` or a rejected `Status`.
    Verify(Box<Verify>),
    /// Nothing to say (e.g. a duplicate chunk).
    Quiet,
}

/// A complete staged file waiting for its hash check and placement.
#[derive(Debug, PartialEq)]
pub struct Verify {
    pub status: Status,
    part: PathBuf,
    manifest: Manifest,
    target: Option<Target>,
}

impl Verify {
    /// Hashes, fsyncs and places the file (blocking: seconds for a large model). The staged
    /// file is gone afterwards either way.
    pub fn run(self) -> Outcome {
        let result = verify_and_place(&self.part, &self.manifest, self.target.as_ref());
        let _ = fs::remove_file(&self.part);
        match result {
            Ok(()) => Outcome::Install(self.status),
            Err(reason) => rejected(Some(&self.manifest), &self.manifest.pipeline, reason),
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
}

impl Session {
    fn status(&self, state: &'static str, reason: Option<String>) -> Status {
        let missing: Vec<u64> = self
            .have
            .iter()
            .enumerate()
            .filter(|(_, h)| !**h)
            .map(|(i, _)| i as u64)
            .take(MAX_MISSING_LISTED)
            .collect();
        Status {
            pipeline: self.manifest.pipeline.clone(),
            version: self.manifest.version.clone(),
            sha256: self.manifest.sha256.clone(),
            state,
            received: self.have.iter().filter(|h| **h).count() as u64,
            chunks: self.have.len() as u64,
            missing,
            reason,
        }
    }
}

/// Per pipeline: where its model file lives and which version runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub model_path: PathBuf,
    pub running_version: String,
}

/// The receiving side of the protocol.
pub struct Receiver {
    settings: Settings,
    sessions: BTreeMap<String, Session>,
}

fn rejected(m: Option<&Manifest>, pipeline: &str, reason: String) -> Outcome {
    Outcome::Status(Status {
        pipeline: pipeline.to_string(),
        version: m.map(|m| m.version.clone()).unwrap_or_default(),
        sha256: m.map(|m| m.sha256.clone()).unwrap_or_default(),
        state: "rejected",
        received: 0,
        chunks: m.map_or(0, Manifest::chunks),
        missing: Vec::new(),
        reason: Some(reason),
    })
}

/// Orders dotted numeric versions numerically ("1.10" > "1.9"); other strings only by equality.
pub fn is_newer(candidate: &str, running: &str) -> bool {
    let parse = |v: &str| v.split('.').map(|p| p.parse::<u64>().ok()).collect::<Option<Vec<_>>>();
    match (parse(candidate), parse(running)) {
        (Some(a), Some(b)) => a > b,
        _ => candidate != running,
    }
}

fn valid_token(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
}

impl Receiver {
    /// Opens the staging directory and resumes the transfers staged there.
    pub fn open(settings: Settings) -> Result<Receiver, String> {
        fs::create_dir_all(&settings.dir)
            .map_err(|e| format!("cannot create {}: {e}", settings.dir.display()))?;
        let mut r = Receiver { settings, sessions: BTreeMap::new() };
        r.resume();
        Ok(r)
    }

    fn session_paths(&self, pipeline: &str) -> (PathBuf, PathBuf, PathBuf) {
        let d = &self.settings.dir;
        (
            d.join(format!("{pipeline}.manifest.json")),
            d.join(format!("{pipeline}.part")),
            d.join(format!("{pipeline}.chunks")),
        )
    }

    /// Reloads staged sessions (manifest + chunk bitmap) left by a previous run.
    fn resume(&mut self) {
        let Ok(entries) = fs::read_dir(&self.settings.dir) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pipeline) = name.strip_suffix(".manifest.json") else { continue };
            let (mpath, part, bitmap) = self.session_paths(pipeline);
            let manifest: Option<Manifest> =
                fs::read(&mpath).ok().and_then(|b| serde_json::from_slice(&b).ok());
            let Some(manifest) = manifest else { continue };
            let n = manifest.chunks() as usize;
            let bits = fs::read(&bitmap).unwrap_or_default();
            let have = (0..n).map(|i| bits.get(i).is_some_and(|b| *b == 1)).collect();
            if part.exists() {
                self.sessions.insert(pipeline.to_string(), Session { manifest, part, have });
            }
        }
    }

    /// Statuses of the transfers staged now (published at start-up so senders resume).
    pub fn pending(&self) -> Vec<Status> {
        self.sessions.values().map(|s| s.status("receiving", None)).collect()
    }

    /// Handles a manifest for `pipeline` (the topic level), whose model is `target`.
    pub fn on_manifest(
        &mut self,
        pipeline: &str,
        target: Option<&Target>,
        payload: &[u8],
    ) -> Outcome {
        let m: Manifest = match serde_json::from_slice(payload) {
            Ok(m) => m,
            Err(e) => return rejected(None, pipeline, format!("malformed manifest: {e}")),
        };
        let reject = |why: String| rejected(Some(&m), pipeline, why);
        let Some(target) = target else {
            return reject(format!("no pipeline named {pipeline:?} on this device"));
        };
        if m.pipeline != pipeline {
            return reject(format!(
                "manifest names pipeline {:?}, published for {pipeline:?}",
                m.pipeline
            ));
        }
        if !valid_token(&m.version, 64) || !valid_token(&m.key_id, 64) {
            return reject("version and key_id must be 1-64 characters of [A-Za-z0-9._+-]".into());
        }
        if m.sha256.len() != 64
            || !m.sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return reject("sha256 must be 64 lowercase hex digits".into());
        }
        if m.size == 0 || m.size > self.settings.max_size {
            return reject(format!(
                "size {} is not in 1..={} (ota.max_size)",
                m.size, self.settings.max_size
            ));
        }
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&m.chunk_size) {
            return reject(format!("chunk_size must be {MIN_CHUNK}..={MAX_CHUNK}"));
        }
        let Some(key) = self.settings.keys.get(&m.key_id) else {
            return reject(format!("unknown key {:?} (not in ota.trusted_keys)", m.key_id));
        };
        let sig = base64::engine::general_purpose::STANDARD
            .decode(m.signature.trim())
            .ok()
            .and_then(|b| Signature::from_slice(&b).ok());
        let Some(sig) = sig else {
            return reject("signature is not a base64 ed25519 signature".into());
        };
        if key.verify(&m.signed_bytes(), &sig).is_err() {
            return reject(format!("bad signature for key {:?}", m.key_id));
        }
        if !m.force && !is_newer(&m.version, &target.running_version) {
            return reject(format!(
                "version {} is not newer than the running {} (a replay? set force in the signed manifest to downgrade)",
                m.version, target.running_version
            ));
        }
        // Resume a transfer of the same file; otherwise start over.
        if let Some(s) = self.sessions.get(pipeline)
            && s.manifest.sha256 == m.sha256
            && s.manifest.chunk_size == m.chunk_size
            && s.manifest.size == m.size
        {
            return self.progress(pipeline);
        }
        self.discard(pipeline);
        if let Err(e) = self.stage(pipeline, &m) {
            self.discard(pipeline);
            return reject(e);
        }
        self.progress(pipeline)
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
            Session { manifest: m.clone(), part, have: vec![false; n] },
        );
        Ok(())
    }

    fn progress(&self, pipeline: &str) -> Outcome {
        match self.sessions.get(pipeline) {
            Some(s) => Outcome::Status(s.status("receiving", None)),
            None => Outcome::Quiet,
        }
    }

    fn discard(&mut self, pipeline: &str) {
        self.sessions.remove(pipeline);
        let (mpath, part, bitmap) = self.session_paths(pipeline);
        for p in [mpath, part, bitmap] {
            let _ = fs::remove_file(p);
        }
    }

    /// Handles chunk `n` for `pipeline`. Once every chunk is in, verifies the file and renames it
    /// over `target`'s model file.
    pub fn on_chunk(
        &mut self,
        pipeline: &str,
        target: Option<&Target>,
        n: &str,
        payload: &[u8],
    ) -> Outcome {
        let Some(s) = self.sessions.get_mut(pipeline) else {
            // A chunk without a manifest (e.g. after the transfer finished): the sender should
            // (re)send the manifest first; say so once per chunk at most.
            return rejected(
                None,
                pipeline,
                "chunk without a manifest: publish the manifest first".into(),
            );
        };
        let m = s.manifest.clone();
        let Ok(n) = n.parse::<u64>() else {
            return rejected(Some(&m), pipeline, format!("chunk number {n:?} is not a number"));
        };
        if n >= m.chunks() {
            return rejected(
                Some(&m),
                pipeline,
                format!("chunk {n} is beyond the {} chunks of the manifest", m.chunks()),
            );
        }
        if payload.len() as u64 != m.chunk_len(n) {
            return rejected(
                Some(&m),
                pipeline,
                format!(
                    "chunk {n} has {} bytes, the manifest says {}",
                    payload.len(),
                    m.chunk_len(n)
                ),
            );
        }
        if s.have[n as usize] {
            return Outcome::Quiet;
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
            self.discard(pipeline);
            return rejected(Some(&m), pipeline, reason);
        }
        s.have[n as usize] = true;
        let done = s.have.iter().all(|h| *h);
        // Progress every 16 chunks and at the end keeps the status topic quiet but live.
        if !done {
            return if n % 16 == 0 {
                Outcome::Status(s.status("receiving", None))
            } else {
                Outcome::Quiet
            };
        }
        let status = s.status("installing", None);
        // The session ends here; the staged file now belongs to the verification.
        let part = s.part.clone();
        self.sessions.remove(pipeline);
        let (mpath, _, bitmap) = self.session_paths(pipeline);
        let _ = fs::remove_file(mpath);
        let _ = fs::remove_file(bitmap);
        Outcome::Verify(Box::new(Verify { status, part, manifest: m, target: target.cloned() }))
    }
}

/// Hashes the staged file, fsyncs it and renames it over the model file (copying across file
/// systems when the state directory is on another one).
fn verify_and_place(part: &Path, m: &Manifest, target: Option<&Target>) -> Result<(), String> {
    let target = target.ok_or("the pipeline is gone")?;
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
    let dest = &target.model_path;
    let placed = match fs::rename(part, dest) {
        Ok(()) => dest.parent().map_or(Ok(()), |d| File::open(d).and_then(|d| d.sync_all())),
        Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
            fsutil::write_atomic(dest, |out| std::io::copy(&mut File::open(part)?, out).map(|_| ()))
        }
        Err(e) => Err(e),
    };
    placed.map_err(|e| format!("cannot install {}: {e}", dest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};
    use sha2::Digest;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn manifest(bytes: &[u8], version: &str, sk: &SigningKey) -> Manifest {
        let mut m = Manifest {
            pipeline: "digits".into(),
            version: version.into(),
            size: bytes.len() as u64,
            sha256: fsutil::hex(&sha2::Sha256::digest(bytes)),
            chunk_size: 1024,
            key_id: "fleet".into(),
            force: false,
            signature: String::new(),
        };
        m.signature =
            base64::engine::general_purpose::STANDARD.encode(sk.sign(&m.signed_bytes()).to_bytes());
        m
    }

    struct Rig {
        _tmp: tempfile::TempDir,
        rx: Receiver,
        target: Target,
        settings: Settings,
    }

    fn rig() -> Rig {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut keys = BTreeMap::new();
        keys.insert("fleet".to_string(), key().verifying_key());
        let settings =
            Settings { dir: tmp.path().join("ota"), max_size: 1 << 20, min_free: 0, keys };
        let target =
            Target { model_path: tmp.path().join("digits.onnx"), running_version: "1".into() };
        fs::write(&target.model_path, b"old").expect("old model");
        Rig { rx: Receiver::open(settings.clone()).expect("open"), _tmp: tmp, target, settings }
    }

    fn body(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn send(
        r: &mut Rig,
        m: &Manifest,
        bytes: &[u8],
        chunks: impl Iterator<Item = u64>,
    ) -> Vec<Outcome> {
        chunks
            .map(|n| {
                let s = (n * m.chunk_size) as usize;
                let e = (s + m.chunk_size as usize).min(bytes.len());
                // The serving loop runs a verification off its task; here, inline.
                match r.rx.on_chunk("digits", Some(&r.target), &n.to_string(), &bytes[s..e]) {
                    Outcome::Verify(v) => v.run(),
                    o => o,
                }
            })
            .collect()
    }

    fn state(o: &Outcome) -> (&'static str, Option<String>) {
        match o {
            Outcome::Status(s) | Outcome::Install(s) => (s.state, s.reason.clone()),
            Outcome::Verify(v) => (v.status.state, None),
            Outcome::Quiet => ("quiet", None),
        }
    }

    #[test]
    fn a_signed_model_arrives_in_chunks_and_is_placed() {
        let mut r = rig();
        let bytes = body(5000);
        let m = manifest(&bytes, "2", &key());
        let o = r.rx.on_manifest("digits", Some(&r.target), &serde_json::to_vec(&m).expect("json"));
        let Outcome::Status(s) = o else { panic!("{o:?}") };
        assert_eq!((s.state, s.chunks, s.missing.clone()), ("receiving", 5, vec![0, 1, 2, 3, 4]));
        // Out of order, with a duplicate.
        let outs = send(&mut r, &m, &bytes, [4, 1, 1, 0, 3, 2].into_iter());
        assert_eq!(state(outs.last().expect("last")).0, "installing");
        assert!(matches!(outs.last(), Some(Outcome::Install(_))));
        assert_eq!(fs::read(&r.target.model_path).expect("model"), bytes);
        assert!(r.rx.pending().is_empty(), "staging cleaned up");
    }

    #[test]
    fn a_transfer_resumes_after_a_restart() {
        let mut r = rig();
        let bytes = body(5000);
        let m = manifest(&bytes, "2", &key());
        r.rx.on_manifest("digits", Some(&r.target), &serde_json::to_vec(&m).expect("json"));
        send(&mut r, &m, &bytes, [0, 2].into_iter());
        // The daemon restarts: staged chunks are still there.
        r.rx = Receiver::open(r.settings.clone()).expect("reopen");
        let p = r.rx.pending();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].missing, vec![1, 3, 4]);
        // The sender re-publishes the manifest and the missing chunks.
        let o = r.rx.on_manifest("digits", Some(&r.target), &serde_json::to_vec(&m).expect("json"));
        let Outcome::Status(s) = o else { panic!("{o:?}") };
        assert_eq!(s.missing, vec![1, 3, 4]);
        let outs = send(&mut r, &m, &bytes, [1, 3, 4].into_iter());
        assert!(matches!(outs.last(), Some(Outcome::Install(_))), "{outs:?}");
        assert_eq!(fs::read(&r.target.model_path).expect("model"), bytes);
    }

    #[test]
    fn every_reject_case_says_why_and_installs_nothing() {
        let bytes = body(3000);
        let good = manifest(&bytes, "2", &key());
        let cases: Vec<(&str, Manifest, &str)> = vec![
            ("bad signature", Manifest { version: "3".into(), ..good.clone() }, "bad signature"),
            (
                "unknown key",
                {
                    let mut m = manifest(&bytes, "2", &key());
                    m.key_id = "other".into();
                    m
                },
                "unknown key",
            ),
            (
                "foreign signer",
                manifest(&bytes, "2", &SigningKey::from_bytes(&[9u8; 32])),
                "bad signature",
            ),
            ("replay", manifest(&bytes, "1", &key()), "not newer"),
            ("older", manifest(&bytes, "0.9", &key()), "not newer"),
            (
                "path trick",
                {
                    let mut m = manifest(&bytes, "../2", &key());
                    m.pipeline = "digits".into();
                    m
                },
                "version and key_id",
            ),
            (
                "too big",
                {
                    let mut m = good.clone();
                    m.size = 2 << 20;
                    m
                },
                "ota.max_size",
            ),
            (
                "chunk size",
                {
                    let mut m = good.clone();
                    m.chunk_size = 10;
                    m
                },
                "chunk_size",
            ),
        ];
        for (what, m, expect) in cases {
            let mut r = rig();
            let o =
                r.rx.on_manifest("digits", Some(&r.target), &serde_json::to_vec(&m).expect("json"));
            let (st, reason) = state(&o);
            assert_eq!(st, "rejected", "{what}");
            assert!(reason.as_deref().unwrap_or("").contains(expect), "{what}: {reason:?}");
            assert_eq!(fs::read(&r.target.model_path).expect("model"), b"old", "{what}");
            assert!(r.rx.pending().is_empty(), "{what}: nothing staged");
        }
        // Not enough room left (min_free stands in for a full disk).
        let mut r = rig();
        r.settings.min_free = u64::MAX / 2;
        r.rx = Receiver::open(r.settings.clone()).expect("open");
        let (st, reason) = state(&r.rx.on_manifest(
            "digits",
            Some(&r.target),
            &serde_json::to_vec(&good).expect("json"),
        ));
        assert_eq!(st, "rejected");
        assert!(reason.unwrap_or_default().contains("disk full"));
        assert!(r.rx.pending().is_empty(), "nothing staged");
        // Unknown pipeline and malformed JSON.
        let mut r = rig();
        let (st, reason) =
            state(&r.rx.on_manifest("nope", None, &serde_json::to_vec(&good).expect("json")));
        assert_eq!(st, "rejected");
        assert!(reason.unwrap_or_default().contains("no pipeline"));
        assert_eq!(state(&r.rx.on_manifest("digits", Some(&r.target), b"{")).0, "rejected");
        // A forced downgrade is allowed (force is signed).
        let mut m = manifest(&bytes, "1", &key());
        m.force = true;
        m.signature = base64::engine::general_purpose::STANDARD
            .encode(key().sign(&m.signed_bytes()).to_bytes());
        assert_eq!(
            state(&r.rx.on_manifest(
                "digits",
                Some(&r.target),
                &serde_json::to_vec(&m).expect("json")
            ))
            .0,
            "receiving"
        );
    }

    #[test]
    fn wrong_chunks_and_a_hash_mismatch_are_rejected() {
        let mut r = rig();
        let bytes = body(3000);
        let m = manifest(&bytes, "2", &key());
        r.rx.on_manifest("digits", Some(&r.target), &serde_json::to_vec(&m).expect("json"));
        assert!(
            state(&r.rx.on_chunk("digits", Some(&r.target), "9", &bytes[..1024]))
                .1
                .unwrap_or_default()
                .contains("beyond")
        );
        assert!(
            state(&r.rx.on_chunk("digits", Some(&r.target), "0", &bytes[..10]))
                .1
                .unwrap_or_default()
                .contains("has 10 bytes")
        );
        assert!(
            state(&r.rx.on_chunk("digits", Some(&r.target), "x", &bytes[..10]))
                .1
                .unwrap_or_default()
                .contains("not a number")
        );
        // Chunks whose content differs from what was signed.
        let mut evil = bytes.clone();
        evil[5] ^= 1;
        let outs = send(&mut r, &m, &evil, 0..3);
        let (st, reason) = state(outs.last().expect("last"));
        assert_eq!(st, "rejected");
        assert!(reason.unwrap_or_default().contains("sha256 mismatch"));
        assert_eq!(fs::read(&r.target.model_path).expect("model"), b"old");
        assert!(r.rx.pending().is_empty());
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(is_newer("2", "1"));
        assert!(is_newer("1.10", "1.9"));
        assert!(!is_newer("1.9", "1.10"));
        assert!(!is_newer("1", "1"));
        assert!(is_newer("abc", "1"), "non-numeric: any different version");
        assert!(!is_newer("abc", "abc"));
    }
}
