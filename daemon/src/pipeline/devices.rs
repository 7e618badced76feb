//! Per-device state tables (duplicate detection, event mode, fair shedding, window assembly),
//! bounded in entries *and* bytes, whatever the topics say.
//!
//! - A device is known by a [`DeviceKey`]: a 128-bit keyed hash of its topic (two SipHash
//!   instances with random keys drawn at start-up), not the topic itself, so an entry costs the
//!   same for a 10-byte and a 1-KiB topic. Two devices would share state only if their keys
//!   collided: with 128 bits and keys an attacker cannot see, about 1 in 10^30 for 10,000
//!   devices, and nothing an attacker can aim for.
//! - A [`Table`] holds at most `capacity` devices and, when full, forgets the least recently
//!   used one (counted), so a flood of new ids can never lock a real device out; every
//!   operation is O(1) (a hash map into a slab with an intrusive recency list).
//!
//! It owns no locking: each user keeps its table behind its own mutex.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

/// A device's identity in the tables: a keyed 128-bit hash of its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey(u128);

fn hashers()
-> &'static (std::collections::hash_map::RandomState, std::collections::hash_map::RandomState) {
    static H: OnceLock<(
        std::collections::hash_map::RandomState,
        std::collections::hash_map::RandomState,
    )> = OnceLock::new();
    H.get_or_init(|| (Default::default(), Default::default()))
}

impl DeviceKey {
    pub fn of(topic: &str) -> DeviceKey {
        let (a, b) = hashers();
        let half = |s: &std::collections::hash_map::RandomState| {
            let mut h = s.build_hasher();
            h.write(topic.as_bytes());
            h.finish()
        };
        DeviceKey((u128::from(half(a)) << 64) | u128::from(half(b)))
    }
}

const NIL: usize = usize::MAX;

struct Node<V> {
    key: DeviceKey,
    value: V,
    /// Toward the most recently used end.
    newer: usize,
    /// Toward the least recently used end.
    older: usize,
}

/// A bounded map from devices to `V` that evicts the least recently used device when full.
pub struct Table<V> {
    index: HashMap<DeviceKey, usize>,
    /// Dense: a removed node's slot is filled by the last one.
    nodes: Vec<Node<V>>,
    /// Most recently used.
    newest: usize,
    /// Least recently used: the next to go.
    oldest: usize,
    capacity: usize,
    evicted: u64,
}

impl<V> std::fmt::Debug for Table<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("len", &self.len())
            .field("capacity", &self.capacity)
            .field("evicted", &self.evicted)
            .finish()
    }
}

impl<V> Table<V> {
    /// A table of at most `capacity` devices (at least one).
    pub fn new(capacity: usize) -> Self {
        Table {
            index: HashMap::new(),
            nodes: Vec::new(),
            newest: NIL,
            oldest: NIL,
            capacity: capacity.max(1),
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Devices forgotten to make room since the table was made.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    fn unlink(&mut self, i: usize) {
        let (newer, older) = (self.nodes[i].newer, self.nodes[i].older);
        match newer {
            NIL => self.newest = older,
            n => self.nodes[n].older = older,
        }
        match older {
            NIL => self.oldest = newer,
            o => self.nodes[o].newer = newer,
        }
    }

    fn push_newest(&mut self, i: usize) {
        self.nodes[i].newer = NIL;
        self.nodes[i].older = self.newest;
        if self.newest != NIL {
            self.nodes[self.newest].newer = i;
        }
        self.newest = i;
        if self.oldest == NIL {
            self.oldest = i;
        }
    }

    fn touch(&mut self, i: usize) {
        if self.newest != i {
            self.unlink(i);
            self.push_newest(i);
        }
    }

    /// The state of `key`, marked as the most recently used.
    pub fn get_mut(&mut self, key: DeviceKey) -> Option<&mut V> {
        let i = *self.index.get(&key)?;
        self.touch(i);
        Some(&mut self.nodes[i].value)
    }

    /// Looks at `key` without changing the recency order.
    pub fn peek(&self, key: DeviceKey) -> Option<&V> {
        self.index.get(&key).map(|i| &self.nodes[*i].value)
    }

    /// The state of `key` (now the most recently used), created by `make` when it is new (`.1`
    /// true); a new device in a full table first evicts the least recently used one, whose
    /// state is returned (`.2`).
    pub fn get_or_insert_with(
        &mut self,
        key: DeviceKey,
        make: impl FnOnce() -> V,
    ) -> (&mut V, bool, Option<V>) {
        if let Some(&i) = self.index.get(&key) {
            self.touch(i);
            return (&mut self.nodes[i].value, false, None);
        }
        let mut evicted = None;
        if self.nodes.len() >= self.capacity && self.oldest != NIL {
            evicted = Some(self.take(self.oldest).1);
            self.evicted += 1;
        }
        self.nodes.push(Node { key, value: make(), newer: NIL, older: NIL });
        let i = self.nodes.len() - 1;
        self.index.insert(key, i);
        self.push_newest(i);
        (&mut self.nodes[i].value, true, evicted)
    }

    /// Removes slot `i`, moving the last node into it.
    fn take(&mut self, i: usize) -> (DeviceKey, V) {
        self.unlink(i);
        let removed = self.nodes.swap_remove(i);
        self.index.remove(&removed.key);
        if i < self.nodes.len() {
            // The former last node now lives at `i`: point its neighbours and the index at it.
            let (newer, older, k) = (self.nodes[i].newer, self.nodes[i].older, self.nodes[i].key);
            match newer {
                NIL => self.newest = i,
                n => self.nodes[n].older = i,
            }
            match older {
                NIL => self.oldest = i,
                o => self.nodes[o].newer = i,
            }
            self.index.insert(k, i);
        }
        (removed.key, removed.value)
    }

    /// Removes `key`'s state (not counted as an eviction).
    pub fn remove(&mut self, key: DeviceKey) -> Option<V> {
        let i = *self.index.get(&key)?;
        Some(self.take(i).1)
    }

    /// Keeps the devices for which `keep` says so (e.g. dropping idle ones); returns the states
    /// removed (not counted as evictions).
    pub fn retain(&mut self, mut keep: impl FnMut(&mut V) -> bool) -> Vec<V> {
        let doomed: Vec<DeviceKey> =
            self.nodes.iter_mut().filter_map(|n| (!keep(&mut n.value)).then_some(n.key)).collect();
        doomed.into_iter().filter_map(|k| self.remove(k)).collect()
    }

    /// Every device's state, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.nodes.iter().map(|n| &n.value)
    }

    /// Keys from the least to the most recently used (tests and diagnostics).
    #[cfg(test)]
    fn order(&self) -> Vec<DeviceKey> {
        let mut out = Vec::new();
        let mut i = self.oldest;
        while i != NIL {
            out.push(self.nodes[i].key);
            i = self.nodes[i].newer;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: u128) -> DeviceKey {
        DeviceKey(n)
    }

    #[test]
    fn keys_are_stable_and_distinct() {
        assert_eq!(DeviceKey::of("s/dev1"), DeviceKey::of("s/dev1"));
        assert_ne!(DeviceKey::of("s/dev1"), DeviceKey::of("s/dev2"));
        let long = "x".repeat(60_000);
        assert_eq!(std::mem::size_of_val(&DeviceKey::of(&long)), 16, "an entry's key is 16 bytes");
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_used_device() {
        let mut t = Table::new(3);
        for n in 1..=3 {
            assert!(t.get_or_insert_with(k(n), || n).1);
        }
        // 1 is used again: 2 is now the least recently used.
        assert_eq!(t.get_mut(k(1)).copied(), Some(1));
        let (v, new, evicted) = t.get_or_insert_with(k(4), || 4);
        assert_eq!((*v, new, evicted), (4, true, Some(2)));
        assert_eq!(t.order(), vec![k(3), k(1), k(4)]);
        assert_eq!((t.len(), t.evicted()), (3, 1));
        assert!(t.peek(k(2)).is_none(), "forgotten");
        let (_, new, evicted) = t.get_or_insert_with(k(3), || 99);
        assert_eq!((new, evicted), (false, None), "a known device is not new");
    }

    #[test]
    fn remove_and_retain_keep_the_links_consistent() {
        let mut t = Table::new(100);
        for n in 0..50 {
            t.get_or_insert_with(k(n), || n);
        }
        assert_eq!(t.remove(k(0)), Some(0));
        assert_eq!(t.remove(k(25)), Some(25));
        assert_eq!(t.remove(k(49)), Some(49));
        let gone = t.retain(|v| *v % 2 == 0);
        assert_eq!(gone.len(), 23);
        let order: Vec<u128> = t.order().into_iter().map(|d| d.0).collect();
        let want: Vec<u128> = (1..49).filter(|n| n % 2 == 0 && *n != 0).collect();
        assert_eq!(order, want, "oldest to newest, survivors only");
        for n in &want {
            assert_eq!(t.peek(k(*n)).copied(), Some(*n));
        }
        assert_eq!(t.evicted(), 0, "removals are not evictions");
    }

    #[test]
    fn a_flood_of_new_devices_costs_o1_each_and_stays_bounded() {
        let mut t = Table::new(64);
        t.get_or_insert_with(k(u128::MAX), || 0u64);
        for n in 0..100_000 {
            // The real device keeps talking between the attacker's ids.
            if n % 32 == 0 {
                assert!(t.get_mut(k(u128::MAX)).is_some(), "the real device is never locked out");
            }
            t.get_or_insert_with(k(n), || 0);
        }
        assert_eq!(t.len(), 64);
        assert_eq!(t.evicted(), 100_000 + 1 - 64);
    }
}
