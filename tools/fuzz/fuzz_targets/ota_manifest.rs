//! OTA manifests as they arrive over MQTT: parsed or refused; chunk arithmetic never panics and
//! the chunks add up to the declared size.
#![no_main]
use edgeinfer::ota::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = serde_json::from_slice::<Manifest>(data) else { return };
    let _ = m.signed_bytes();
    let n = m.chunks();
    if m.chunk_size > 0 && n > 0 && n < 1 << 20 {
        let total: u64 = (0..n).map(|i| m.chunk_len(i)).sum();
        assert_eq!(total, m.size, "chunks of {m:?}");
    }
});
