//! OTA offers as they arrive over MQTT, through the real receiver: the input is split at NUL
//! bytes into a manifest and chunks. The manifest is parsed (or refused), then signed with the
//! trusted key so that every check behind the signature (target, expiry, release counter,
//! nonce, transfer in progress, disk) runs too, then the chunks are fed as chunks 0, 1, ….
//! Nothing may panic; chunk arithmetic adds up to the declared size; state stays bounded
//! (`max_size` 64 KiB, one receiver in a temporary directory for the whole run).
#![no_main]
use std::cell::RefCell;
use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use edgeinfer::ota::{Manifest, Outcome, Receiver, Settings};
use libfuzzer_sys::fuzz_target;

struct Rig {
    _dir: tempfile::TempDir,
    rx: Receiver,
    sk: SigningKey,
}

thread_local! {
    static RIG: RefCell<Option<Rig>> = const { RefCell::new(None) };
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().expect("tmp");
    let sk = SigningKey::from_bytes(&[7u8; 32]);
    let mut keys = BTreeMap::new();
    keys.insert("fleet".to_string(), sk.verifying_key());
    let settings = Settings {
        dir: dir.path().join("ota"),
        max_size: 64 << 10,
        min_free: 0,
        keys,
        device_id: "edge-01".into(),
        groups: vec!["lab".into()],
        pipelines: vec!["digits".into()],
    };
    Rig { rx: Receiver::open(settings).expect("open"), _dir: dir, sk }
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|b| *b == 0);
    let Some(first) = parts.next() else { return };
    if let Ok(m) = serde_json::from_slice::<Manifest>(first) {
        let _ = m.signed_bytes();
        let n = m.chunks();
        if m.chunk_size > 0 && n > 0 && n < 1 << 20 {
            let total: u64 = (0..n).map(|i| m.chunk_len(i)).sum();
            assert_eq!(total, m.size, "chunks of {m:?}");
        }
    }
    RIG.with(|cell| {
        let mut cell = cell.borrow_mut();
        let r = cell.get_or_insert_with(rig);
        // As sent (mostly refused at the signature), then signed (deeper checks).
        let _ = r.rx.on_manifest("digits", true, first, 1_800_000_000);
        if let Ok(mut m) = serde_json::from_slice::<Manifest>(first) {
            m.sign(&r.sk);
            let signed = serde_json::to_vec(&m).unwrap_or_default();
            let _ = r.rx.on_manifest("digits", true, &signed, 1_800_000_000);
        }
        for (n, chunk) in parts.enumerate() {
            if let Outcome::Verify(v) = r.rx.on_chunk("digits", &n.to_string(), chunk) {
                if let Outcome::Install(i) = v.run() {
                    let _ = std::fs::remove_file(i.staged);
                }
            }
        }
    });
});
