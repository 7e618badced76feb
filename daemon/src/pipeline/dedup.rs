//! Duplicate frames: a QoS 1 message can be delivered twice (the broker resends it when the
//! acknowledgement was lost in a dropped connection). A redelivery carries the same topic, the
//! same `seq` and the same payload; it is dropped as `duplicate` instead of being served and
//! counted twice.
//!
//! Each topic (a device's stream; the whole topic, since which wildcard names the device varies
//! by filter) keeps its last [`WINDOW`] (seq, payload fingerprint) pairs. The fingerprint (the
//! payload length and its first and last 256 bytes) tells a redelivery from a device that
//! restarted its sequence numbers with new data. At most [`MAX_DEVICES`] topics are tracked, in
//! a [`devices::Table`] keyed by a hash of the topic: a new topic in a full table evicts the
//! least recently used one (counted), so a flood of new topics cannot make a busy device's
//! redeliveries count twice, and the memory is the same for short and long topics (about
//! 600 bytes a device: 2.4 MiB at most per pipeline).

use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use super::devices::{self, DeviceKey};

/// Recent frames remembered per device.
pub const WINDOW: usize = 64;
/// Devices tracked.
pub const MAX_DEVICES: usize = 4096;

struct Recent {
    keys: [u64; WINDOW],
    next: usize,
}

/// Per-pipeline duplicate detector.
pub struct Dedup {
    devices: Mutex<devices::Table<Recent>>,
}

impl Default for Dedup {
    fn default() -> Self {
        Dedup { devices: Mutex::new(devices::Table::new(MAX_DEVICES)) }
    }
}

/// A cheap fingerprint of a payload: its length and its first and last 256 bytes.
pub fn fingerprint(payload: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    payload.len().hash(&mut h);
    payload[..payload.len().min(256)].hash(&mut h);
    payload[payload.len().saturating_sub(256)..].hash(&mut h);
    h.finish()
}

impl Dedup {
    /// True when `device` sent (`seq`, `fingerprint`) recently; otherwise records it.
    pub fn is_duplicate(&self, device: &str, seq: u64, fingerprint: u64) -> bool {
        let key = seq.rotate_left(32) ^ fingerprint;
        let mut g = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let (recent, _, _) = g.get_or_insert_with(DeviceKey::of(device), || Recent {
            keys: [u64::MAX; WINDOW],
            next: 0,
        });
        if recent.keys.contains(&key) {
            return true;
        }
        recent.keys[recent.next] = key;
        recent.next = (recent.next + 1) % WINDOW;
        false
    }

    /// (devices tracked, devices evicted to make room) for health.
    pub fn table(&self) -> (usize, u64) {
        let g = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        (g.len(), g.evicted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redelivery_is_a_duplicate_and_new_data_with_an_old_seq_is_not() {
        let d = Dedup::default();
        let (a, b) = (fingerprint(b"frame one"), fingerprint(b"frame two"));
        assert!(!d.is_duplicate("dev1", 7, a));
        assert!(d.is_duplicate("dev1", 7, a), "same device, seq and payload");
        assert!(!d.is_duplicate("dev1", 7, b), "a restarted device's new data");
        assert!(!d.is_duplicate("dev2", 7, a), "devices are independent");
        assert!(!d.is_duplicate("dev1", 8, a), "another seq");
    }

    #[test]
    fn the_window_forgets_old_frames_and_the_table_is_bounded() {
        let d = Dedup::default();
        let f = fingerprint(b"x");
        for seq in 0..=WINDOW as u64 {
            assert!(!d.is_duplicate("dev", seq, f));
        }
        assert!(!d.is_duplicate("dev", 0, f), "seq 0 fell out of the window");
        for i in 0..MAX_DEVICES + 10 {
            d.is_duplicate(&format!("d{i}"), 1, f);
        }
        assert_eq!(d.table(), (MAX_DEVICES, 11), "the least recently used were evicted");
    }

    /// Regression: after 4,096 other topics, a busy device's QoS 1 redelivery was served twice
    /// (a full table refused new devices and a forgotten one was never tracked again).
    #[test]
    fn a_flood_of_topics_does_not_make_a_busy_devices_redelivery_count_twice() {
        let d = Dedup::default();
        let f = fingerprint(b"frame");
        for i in 0..3 * MAX_DEVICES {
            d.is_duplicate(&format!("attacker/{i}/{}", "x".repeat(1000)), 1, f);
            if i % 1000 == 0 {
                assert!(!d.is_duplicate("real", i as u64, f));
                assert!(d.is_duplicate("real", i as u64, f), "redelivery {i} recognised");
            }
        }
        assert_eq!(d.table().0, MAX_DEVICES);
    }

    #[test]
    fn fingerprints_see_length_head_and_tail() {
        let mut big = vec![0u8; 4096];
        let base = fingerprint(&big);
        big[4000] = 1;
        assert_ne!(fingerprint(&big), base, "tail");
        big[4000] = 0;
        big[10] = 1;
        assert_ne!(fingerprint(&big), base, "head");
        assert_ne!(fingerprint(&big[..4095]), fingerprint(&big), "length");
    }
}
