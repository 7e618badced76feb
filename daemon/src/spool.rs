//! Result spool: results produced while the broker is unreachable go to disk in
//! `<state_dir>/spool` and are published in order once the broker is back.
//!
//! - While the link is down (and until everything spooled has been flushed after it comes back),
//!   QoS 1/2 results are *offered* to the spool instead of the MQTT client: a worker appends to
//!   an in-memory batch under a mutex, never touching the disk.
//! - The spool thread seals the batch into a segment file every `commit_interval` (or 256 KiB):
//!   temp file, fsync, rename, directory fsync (`sys::fsutil::write_atomic`), so a crash leaves
//!   whole segments only. Each record carries a CRC-32; a damaged segment is set aside as
//!   `*.corrupt` and counted.
//! - Over `max_size`, the oldest segments are deleted and their records counted as evicted.
//! - Once connected, the thread publishes segments oldest first through the MQTT publisher, then
//!   what is still in the batch, and only then switches workers back to publishing directly, so
//!   results reach the broker in the order they were produced.
//! - Segments left by a previous run are flushed at the first connection.
//!
//! A record is deleted from disk once handed to the MQTT client (whose session keeps it until the
//! broker acknowledges it). A crash after that hand-off can lose the records in flight; a crash
//! before a segment is written loses at most one `commit_interval` of results.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{Qos, SpoolConfig};
use crate::publish::{PublishError, Publisher};
use crate::sys::fsutil;

const MAGIC: &[u8; 8] = b"EISPOOL1";
/// Header: magic and the record count.
const HEADER: usize = 8 + 4;
/// Per record: qos (1), topic length (2), payload length (4), CRC-32 (4).
const RECORD_OVERHEAD: usize = 1 + 2 + 4 + 4;
/// A batch this large is sealed without waiting for the commit interval.
const SEAL_BYTES: u64 = 256 << 10;
/// Sequence numbers of new segments start here, leaving room below for records preserved at
/// shutdown (which are older than anything spooled).
const FIRST_SEQ: u64 = 1 << 40;

/// Counters and gauges, for health and metrics.
#[derive(Debug, Default)]
pub struct SpoolStats {
    /// Results accepted into the spool.
    pub spooled: AtomicU64,
    /// Results handed to the MQTT client from the spool.
    pub flushed: AtomicU64,
    /// Results deleted unpublished to stay within `max_size` (or unreadable segments).
    pub evicted: AtomicU64,
    /// Segments written.
    pub segments_written: AtomicU64,
    /// Write, read or delete failures.
    pub errors: AtomicU64,
    /// Results the segment format cannot hold (a topic above 65,535 bytes): counted and left
    /// out, never failing the rest of their batch.
    pub skipped: AtomicU64,
    /// Results found on disk at start-up (from a previous run).
    pub recovered: AtomicU64,
    /// Gauge: bytes held (on disk and in the batch).
    pub bytes: AtomicU64,
    /// Gauge: results held.
    pub records: AtomicU64,
}

/// One spooled message.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: Qos,
}

impl Record {
    fn size(&self) -> u64 {
        (RECORD_OVERHEAD + self.topic.len() + self.payload.len()) as u64
    }

    /// Whether the segment format can hold it (u16 topic length, u32 payload length).
    fn storable(topic: &str, payload: &[u8]) -> bool {
        topic.len() <= u16::MAX as usize && payload.len() <= u32::MAX as usize
    }
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    bytes: u64,
    records: u64,
}

struct State {
    /// Results go to the spool (link down, or spooled results not yet flushed).
    spooling: bool,
    connected: bool,
    batch: VecDeque<Record>,
    batch_bytes: u64,
    batch_since: Option<Instant>,
    segments: VecDeque<Segment>,
    next_seq: u64,
    /// Records of the oldest segment already handed to the client (a flush cut short).
    head_done: usize,
    stop: bool,
}

impl State {
    /// Takes everything in memory (oldest first), leaving an empty batch.
    fn take_batch(&mut self) -> Vec<Record> {
        self.batch_bytes = 0;
        self.batch_since = None;
        self.batch.drain(..).collect()
    }

    /// Puts `records` (oldest first) back in front of the batch: they are older than anything
    /// offered meanwhile.
    fn put_back(&mut self, records: impl DoubleEndedIterator<Item = Record>) {
        for r in records.rev() {
            self.batch_bytes += r.size();
            self.batch.push_front(r);
        }
        self.batch_since.get_or_insert_with(Instant::now);
    }
}

pub struct Spool {
    dir: PathBuf,
    cfg: SpoolConfig,
    /// Mirrors `State::spooling` for the workers' lock-free fast path.
    spooling: AtomicBool,
    connected: AtomicBool,
    state: Mutex<State>,
    wake: Condvar,
    pub stats: SpoolStats,
}

fn seg_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.seg"))
}

impl Spool {
    /// Opens (creating) the spool directory; segments from a previous run are kept and will be
    /// flushed at the first connection.
    pub fn open(dir: &Path, cfg: SpoolConfig) -> io::Result<Arc<Self>> {
        fs::create_dir_all(dir)?;
        let mut segments = Vec::new();
        let stats = SpoolStats::default();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".tmp") {
                // A segment whose write was cut short: never renamed, so never promised.
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Some(seq) = name.strip_suffix(".seg").and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            match read_header(&entry.path()) {
                Ok((records, bytes)) => segments.push(Segment { seq, bytes, records }),
                Err(e) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    set_aside(&entry.path(), &e);
                }
            }
        }
        segments.sort_by_key(|s| s.seq);
        let next_seq = segments.last().map_or(FIRST_SEQ, |s| s.seq + 1).max(FIRST_SEQ);
        let recovered: u64 = segments.iter().map(|s| s.records).sum();
        stats.recovered.store(recovered, Ordering::Relaxed);
        stats.records.store(recovered, Ordering::Relaxed);
        stats.bytes.store(segments.iter().map(|s| s.bytes).sum(), Ordering::Relaxed);
        if recovered > 0 {
            log::info!(
                "spool: {recovered} result(s) in {} segment(s) from a previous run, published once connected",
                segments.len()
            );
        }
        let spooling = !segments.is_empty();
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            cfg,
            spooling: AtomicBool::new(spooling),
            connected: AtomicBool::new(false),
            state: Mutex::new(State {
                spooling,
                connected: false,
                batch: VecDeque::new(),
                batch_bytes: 0,
                batch_since: None,
                segments: segments.into(),
                next_seq,
                head_done: 0,
                stop: false,
            }),
            wake: Condvar::new(),
            stats,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the message if results are being spooled; `false`: publish it directly. A message
    /// the segment format cannot hold is never taken (counted as `skipped`): the MQTT client
    /// refuses it too, so its publisher reports the failure.
    pub fn offer(&self, topic: &str, payload: &[u8], qos: Qos) -> bool {
        if !self.spooling.load(Ordering::Acquire) {
            return false;
        }
        if !Record::storable(topic, payload) {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let mut st = self.lock();
        if !st.spooling {
            return false;
        }
        self.push(&mut st, Record { topic: topic.to_string(), payload: payload.to_vec(), qos });
        true
    }

    fn push(&self, st: &mut State, r: Record) {
        let size = r.size();
        st.batch_bytes += size;
        st.batch.push_back(r);
        st.batch_since.get_or_insert_with(Instant::now);
        self.stats.spooled.fetch_add(1, Ordering::Relaxed);
        self.stats.records.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes.fetch_add(size, Ordering::Relaxed);
        if st.batch_bytes >= SEAL_BYTES {
            self.wake.notify_all();
        }
    }

    /// The serving loop reports the broker link: down switches results to the spool at once;
    /// up starts the flush.
    pub fn set_connected(&self, up: bool) {
        let mut st = self.lock();
        st.connected = up;
        self.connected.store(up, Ordering::Release);
        if !up {
            if !st.spooling {
                log::info!(
                    "spool: broker unreachable; results go to {} until it is back",
                    self.dir.display()
                );
            }
            st.spooling = true;
            self.spooling.store(true, Ordering::Release);
        }
        self.wake.notify_all();
    }

    /// Whether results currently go to the spool.
    pub fn is_spooling(&self) -> bool {
        self.spooling.load(Ordering::Acquire)
    }

    /// Writes `records`, older than anything spooled, to disk ahead of the rest (at shutdown:
    /// results the MQTT client still held when the broker was unreachable).
    pub fn preserve(&self, records: Vec<Record>) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut st = self.lock();
        let seq = st.segments.front().map_or(FIRST_SEQ - 1, |s| s.seq.saturating_sub(1));
        let (bytes, n) = write_segment(&seg_path(&self.dir, seq), records.iter())?;
        self.count_skipped(records.len() as u64 - n);
        st.segments.push_front(Segment { seq, bytes, records: n });
        st.head_done = 0;
        st.spooling = true;
        self.spooling.store(true, Ordering::Release);
        self.stats.segments_written.fetch_add(1, Ordering::Relaxed);
        self.stats.spooled.fetch_add(n, Ordering::Relaxed);
        self.stats.records.fetch_add(n, Ordering::Relaxed);
        self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Starts the spool thread, which writes batches and flushes through `publisher`.
    pub fn start(self: &Arc<Self>, publisher: Arc<dyn Publisher>) -> io::Result<JoinHandle<()>> {
        let me = Arc::clone(self);
        std::thread::Builder::new().name("spool".into()).spawn(move || me.run(&*publisher))
    }

    /// Asks the thread to write what is in memory and exit (join the handle afterwards).
    pub fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_all();
    }

    fn run(&self, publisher: &dyn Publisher) {
        let mut st = self.lock();
        loop {
            if st.stop {
                let batch = st.take_batch();
                drop(st);
                if !batch.is_empty() {
                    let n = batch.len();
                    let _ = self.seal(batch);
                    log::info!("spool: {n} result(s) written to disk at shutdown");
                }
                return;
            }
            let must_store = !st.connected || !st.segments.is_empty();
            let seal_due = !st.batch.is_empty()
                && must_store
                && (st.batch_bytes >= SEAL_BYTES
                    || st.batch_since.is_some_and(|t| t.elapsed() >= self.cfg.commit_interval));
            if seal_due {
                let batch = st.take_batch();
                drop(st);
                if let Err(batch) = self.seal(batch) {
                    // The disk refused: keep the results in memory, bounded by max_size.
                    st = self.lock();
                    st.put_back(batch.into_iter());
                    self.evict_memory(&mut st);
                    st = self.wait(st, Duration::from_secs(1));
                } else {
                    st = self.lock();
                }
                continue;
            }
            if st.connected && st.spooling {
                if let Some(head) = st.segments.front() {
                    let (seq, skip) = (head.seq, st.head_done);
                    drop(st);
                    let res = self.flush_segment(seq, skip, publisher);
                    st = self.lock();
                    match res {
                        Flush::Done { bytes, records } => {
                            if st.segments.front().is_some_and(|s| s.seq == seq) {
                                st.segments.pop_front();
                            }
                            st.head_done = 0;
                            self.sub_gauges(bytes, records);
                        }
                        Flush::Partial(done) => {
                            if st.segments.front().is_some_and(|s| s.seq == seq) {
                                self.stats
                                    .records
                                    .fetch_sub((done - st.head_done) as u64, Ordering::Relaxed);
                                st.head_done = done;
                            }
                            st = self.wait(st, Duration::from_millis(200));
                        }
                        Flush::Unreadable(records) => {
                            if let Some(s) = st.segments.pop_front() {
                                self.sub_gauges(
                                    s.bytes,
                                    records.saturating_sub(st.head_done as u64),
                                );
                            }
                            st.head_done = 0;
                        }
                    }
                    continue;
                }
                // Disk drained: publish what is in memory, then switch workers back.
                if st.batch.is_empty() {
                    st.spooling = false;
                    self.spooling.store(false, Ordering::Release);
                    log::info!("spool: flushed; publishing directly again");
                    continue;
                }
                let batch = st.take_batch();
                drop(st);
                let mut rest = batch.into_iter();
                let mut failed = None;
                for r in rest.by_ref() {
                    if !self.connected.load(Ordering::Acquire) {
                        failed = Some(r);
                        break;
                    }
                    let size = r.size();
                    match publisher.publish(&r.topic, &r.payload, r.qos, false) {
                        Ok(()) => {
                            self.stats.flushed.fetch_add(1, Ordering::Relaxed);
                            self.sub_gauges(size, 1);
                        }
                        Err(e) => {
                            log::debug!("spool: flush paused: {e}");
                            failed = Some(r);
                            break;
                        }
                    }
                }
                st = self.lock();
                if let Some(first) = failed {
                    // Back in front, in order: the next attempt starts with them.
                    let left: Vec<Record> = std::iter::once(first).chain(rest).collect();
                    st.put_back(left.into_iter());
                    st = self.wait(st, Duration::from_millis(200));
                }
                continue;
            }
            let timeout = match st.batch_since {
                Some(t) if must_store => self.cfg.commit_interval.saturating_sub(t.elapsed()),
                _ => Duration::from_secs(1),
            };
            st = self.wait(st, timeout.max(Duration::from_millis(1)));
        }
    }

    fn wait<'a>(&self, st: MutexGuard<'a, State>, d: Duration) -> MutexGuard<'a, State> {
        match self.wake.wait_timeout(st, d) {
            Ok((g, _)) => g,
            Err(e) => e.into_inner().0,
        }
    }

    fn sub_gauges(&self, bytes: u64, records: u64) {
        let _ = self
            .stats
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(bytes)));
        let _ = self.stats.records.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(records))
        });
    }

    /// Writes `batch` as the next segment and evicts the oldest beyond `max_size`. On failure
    /// the batch comes back.
    fn seal(&self, batch: Vec<Record>) -> Result<(), Vec<Record>> {
        let seq = {
            let mut st = self.lock();
            let s = st.next_seq;
            st.next_seq += 1;
            s
        };
        let path = seg_path(&self.dir, seq);
        match write_segment(&path, batch.iter()) {
            Ok((bytes, written)) => {
                let skipped = batch.len() as u64 - written;
                if skipped > 0 {
                    // The gauges counted them when they were offered.
                    let skipped_bytes: u64 = batch
                        .iter()
                        .filter(|r| !Record::storable(&r.topic, &r.payload))
                        .map(Record::size)
                        .sum();
                    self.sub_gauges(skipped_bytes, skipped);
                    self.count_skipped(skipped);
                }
                // The gauges counted record sizes; the file adds its header.
                self.stats.bytes.fetch_add(HEADER as u64, Ordering::Relaxed);
                self.stats.segments_written.fetch_add(1, Ordering::Relaxed);
                let mut st = self.lock();
                st.segments.push_back(Segment { seq, bytes, records: written });
                self.evict_disk(&mut st);
                Ok(())
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                log::error!(
                    "spool: cannot write {} ({e}); {} result(s) kept in memory",
                    path.display(),
                    batch.len()
                );
                Err(batch)
            }
        }
    }

    fn count_skipped(&self, n: u64) {
        if n > 0 {
            self.stats.skipped.fetch_add(n, Ordering::Relaxed);
            log::error!(
                "spool: {n} result(s) with a topic above 65,535 bytes cannot be stored; left out"
            );
        }
    }

    fn held_bytes(st: &State) -> u64 {
        st.segments.iter().map(|s| s.bytes).sum::<u64>() + st.batch_bytes
    }

    /// Deletes the oldest segments while over `max_size` (the newest is always kept).
    fn evict_disk(&self, st: &mut State) {
        while Self::held_bytes(st) > self.cfg.max_size && st.segments.len() > 1 {
            let Some(s) = st.segments.pop_front() else { break };
            let lost = s.records.saturating_sub(st.head_done as u64);
            st.head_done = 0;
            if let Err(e) = fs::remove_file(seg_path(&self.dir, s.seq)) {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                log::error!("spool: cannot delete segment {}: {e}", s.seq);
            }
            self.stats.evicted.fetch_add(lost, Ordering::Relaxed);
            self.sub_gauges(s.bytes, lost);
            log::warn!(
                "spool: over spool.max_size ({} bytes): {lost} oldest result(s) evicted unpublished",
                self.cfg.max_size
            );
        }
    }

    /// When the disk refuses writes: drops the oldest in-memory results beyond `max_size`.
    fn evict_memory(&self, st: &mut State) {
        let mut lost = 0;
        while st.batch_bytes > self.cfg.max_size {
            let Some(r) = st.batch.pop_front() else { break };
            st.batch_bytes -= r.size();
            self.sub_gauges(r.size(), 1);
            lost += 1;
        }
        if lost > 0 {
            self.stats.evicted.fetch_add(lost, Ordering::Relaxed);
            log::warn!("spool: disk unavailable and memory share full: {lost} result(s) evicted");
        }
    }

    /// Publishes segment `seq` from record `skip` on; deletes it when every record was handed
    /// over.
    fn flush_segment(&self, seq: u64, skip: usize, publisher: &dyn Publisher) -> Flush {
        let path = seg_path(&self.dir, seq);
        let (records, bytes) = match read_segment(&path) {
            Ok(r) => r,
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                let n = read_header(&path).map_or(0, |(n, _)| n);
                self.stats.evicted.fetch_add(n.saturating_sub(skip as u64), Ordering::Relaxed);
                set_aside(&path, &e);
                return Flush::Unreadable(n);
            }
        };
        for (i, r) in records.iter().enumerate().skip(skip) {
            if !self.connected.load(Ordering::Acquire) {
                return Flush::Partial(i);
            }
            if let Err(e) = publisher.publish(&r.topic, &r.payload, r.qos, false) {
                log::debug!("spool: flush paused at record {i} of segment {seq}: {e}");
                return Flush::Partial(i);
            }
            self.stats.flushed.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = fs::remove_file(&path) {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            log::error!("spool: cannot delete flushed segment {}: {e}", path.display());
        }
        // Gauges for the records already counted out by earlier partial flushes stay as they are.
        Flush::Done { bytes, records: (records.len() - skip) as u64 }
    }
}

enum Flush {
    Done {
        bytes: u64,
        records: u64,
    },
    /// Records before this index have been handed over.
    Partial(usize),
    /// Set aside; its header's record count.
    Unreadable(u64),
}

fn set_aside(path: &Path, e: &io::Error) {
    let bad = path.with_extension("corrupt");
    log::error!(
        "spool: unreadable segment {} ({e}); its results are lost, the file is kept as {}",
        path.display(),
        bad.display()
    );
    if fs::rename(path, &bad).is_err() {
        let _ = fs::remove_file(path);
    }
}

fn qos_byte(q: Qos) -> u8 {
    match q {
        Qos::AtMostOnce => 0,
        Qos::AtLeastOnce => 1,
        Qos::ExactlyOnce => 2,
    }
}

/// Writes a whole segment crash-safely; returns its size and the number of records written.
/// Records the format cannot hold are left out (the caller counts them): one of them must
/// never make the whole batch fail on every retry.
fn write_segment<'a>(
    path: &Path,
    records: impl Iterator<Item = &'a Record>,
) -> io::Result<(u64, u64)> {
    let mut buf = Vec::with_capacity(1 << 16);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&[0; 4]);
    let mut n: u32 = 0;
    for r in records {
        let (Ok(topic_len), Ok(payload_len)) =
            (u16::try_from(r.topic.len()), u32::try_from(r.payload.len()))
        else {
            continue;
        };
        let start = buf.len();
        buf.push(qos_byte(r.qos));
        buf.extend_from_slice(&topic_len.to_le_bytes());
        buf.extend_from_slice(&payload_len.to_le_bytes());
        buf.extend_from_slice(r.topic.as_bytes());
        buf.extend_from_slice(&r.payload);
        let crc = crc32(&buf[start..]);
        buf.extend_from_slice(&crc.to_le_bytes());
        n += 1;
    }
    buf[8..12].copy_from_slice(&n.to_le_bytes());
    fsutil::write_atomic(path, |f| f.write_all(&buf))?;
    Ok((buf.len() as u64, u64::from(n)))
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Record count and file size from a segment's header.
fn read_header(path: &Path) -> io::Result<(u64, u64)> {
    use std::io::Read;
    let mut f = fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut h = [0u8; HEADER];
    f.read_exact(&mut h).map_err(|_| bad("shorter than its header"))?;
    if &h[..8] != MAGIC {
        return Err(bad("not a spool segment (bad magic)"));
    }
    Ok((u64::from(u32::from_le_bytes([h[8], h[9], h[10], h[11]])), len))
}

/// Every record of a segment, each checked against its CRC; returns them and the file size.
fn read_segment(path: &Path) -> io::Result<(Vec<Record>, u64)> {
    let data = fs::read(path)?;
    Ok((decode_segment(&data)?, data.len() as u64))
}

/// Parses a segment file's bytes; any damage is an error, never a panic (fuzzed:
/// tools/fuzz, target `spool_segment`).
pub fn decode_segment(data: &[u8]) -> io::Result<Vec<Record>> {
    if data.len() < HEADER || &data[..8] != MAGIC {
        return Err(bad("not a spool segment (bad magic)"));
    }
    let count = u32::from_le_bytes([data[8], data[9], data[10], data[11]]) as usize;
    let mut out = Vec::with_capacity(count.min(1 << 16));
    let mut at = HEADER;
    for i in 0..count {
        let rest = &data[at..];
        if rest.len() < RECORD_OVERHEAD {
            return Err(bad(format!("record {i} truncated")));
        }
        let qos = match rest[0] {
            0 => Qos::AtMostOnce,
            1 => Qos::AtLeastOnce,
            2 => Qos::ExactlyOnce,
            q => return Err(bad(format!("record {i}: bad qos {q}"))),
        };
        let tl = u16::from_le_bytes([rest[1], rest[2]]) as usize;
        let pl = u32::from_le_bytes([rest[3], rest[4], rest[5], rest[6]]) as usize;
        let body = 7 + tl + pl;
        if rest.len() < body + 4 {
            return Err(bad(format!("record {i} truncated")));
        }
        let crc = u32::from_le_bytes([rest[body], rest[body + 1], rest[body + 2], rest[body + 3]]);
        if crc32(&rest[..body]) != crc {
            return Err(bad(format!("record {i}: checksum mismatch")));
        }
        let topic = std::str::from_utf8(&rest[7..7 + tl])
            .map_err(|_| bad(format!("record {i}: topic is not UTF-8")))?
            .to_string();
        out.push(Record { topic, payload: rest[7 + tl..body].to_vec(), qos });
        at += body + 4;
    }
    if at != data.len() {
        return Err(bad("trailing bytes after the last record"));
    }
    Ok(out)
}

/// CRC-32 (IEEE 802.3, the zlib/PNG one).
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// Publisher that sends QoS 1/2 results to the spool while it is active, else straight on.
pub struct SpoolingPublisher {
    inner: Arc<dyn Publisher>,
    spool: Arc<Spool>,
}

impl SpoolingPublisher {
    pub fn new(inner: Arc<dyn Publisher>, spool: Arc<Spool>) -> Self {
        Self { inner, spool }
    }

    fn spooled(&self, topic: &str, payload: &[u8], qos: Qos, retain: bool) -> bool {
        // Retained state (health) and QoS 0 (errors, metrics) are not worth replaying late.
        qos != Qos::AtMostOnce && !retain && self.spool.offer(topic, payload, qos)
    }
}

impl Publisher for SpoolingPublisher {
    fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        qos: Qos,
        retain: bool,
    ) -> Result<(), PublishError> {
        if self.spooled(topic, payload, qos, retain) {
            return Ok(());
        }
        self.inner.publish(topic, payload, qos, retain)
    }

    fn try_publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        qos: Qos,
        retain: bool,
    ) -> Result<(), PublishError> {
        if self.spooled(topic, &payload, qos, retain) {
            return Ok(());
        }
        self.inner.try_publish(topic, payload, qos, retain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fault injection: a publisher that records what it is given and can be told to refuse.
    #[derive(Default)]
    struct FakePublisher {
        got: Mutex<Vec<(String, Vec<u8>)>>,
        refuse_after: Mutex<Option<usize>>,
    }

    impl Publisher for FakePublisher {
        fn publish(&self, t: &str, p: &[u8], _q: Qos, _r: bool) -> Result<(), PublishError> {
            let mut got = self.got.lock().expect("lock");
            if self.refuse_after.lock().expect("lock").is_some_and(|n| got.len() >= n) {
                return Err(PublishError::Full);
            }
            got.push((t.to_string(), p.to_vec()));
            Ok(())
        }
        fn try_publish(&self, t: &str, p: Vec<u8>, q: Qos, r: bool) -> Result<(), PublishError> {
            self.publish(t, &p, q, r)
        }
    }

    fn cfg(max_size: u64) -> SpoolConfig {
        SpoolConfig { enabled: true, max_size, commit_interval: Duration::from_millis(20) }
    }

    fn wait_until(mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    fn segs(dir: &Path) -> usize {
        fs::read_dir(dir)
            .map(|d| {
                d.filter(|e| {
                    e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                })
                .count()
            })
            .unwrap_or(0)
    }

    #[test]
    fn crc_matches_the_reference() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn direct_while_connected_and_nothing_spooled() {
        let dir = tempfile::tempdir().expect("tmp");
        let spool = Spool::open(dir.path(), cfg(1 << 20)).expect("open");
        spool.set_connected(true);
        assert!(!spool.offer("t", b"x", Qos::AtLeastOnce));
        let fake = Arc::new(FakePublisher::default());
        let p = SpoolingPublisher::new(fake.clone(), Arc::clone(&spool));
        p.publish("t", b"x", Qos::AtLeastOnce, false).expect("publish");
        assert_eq!(fake.got.lock().expect("lock").len(), 1);
    }

    /// Seals what is in memory now (as the thread would after `commit_interval`).
    fn seal_now(spool: &Spool) {
        let batch = spool.lock().take_batch();
        assert!(spool.seal(batch).is_ok());
    }

    fn payloads_u32(fake: &FakePublisher) -> Vec<u32> {
        fake.got
            .lock()
            .expect("lock")
            .iter()
            .map(|(_, p)| u32::from_le_bytes([p[0], p[1], p[2], p[3]]))
            .collect()
    }

    #[test]
    fn spooled_results_survive_a_restart_and_flush_in_order() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let spool = Spool::open(dir.path(), cfg(1 << 20)).expect("open");
            let fake = Arc::new(FakePublisher::default());
            spool.set_connected(false);
            let p = SpoolingPublisher::new(fake.clone(), Arc::clone(&spool));
            for i in 0..50u32 {
                p.publish("r", &i.to_le_bytes(), Qos::AtLeastOnce, false).expect("spool");
                if i == 20 {
                    seal_now(&spool);
                }
            }
            // QoS 0 and retained messages are never spooled.
            p.publish("h", b"retained", Qos::AtLeastOnce, true).expect("direct");
            p.publish("m", b"qos0", Qos::AtMostOnce, false).expect("direct");
            assert_eq!(fake.got.lock().expect("lock").len(), 2);
            // Stopping writes the rest (the thread seals what is in memory, then exits).
            spool.stop();
            spool.start(fake.clone()).expect("thread").join().expect("join");
            assert_eq!(segs(dir.path()), 2);
        }
        let spool = Spool::open(dir.path(), cfg(1 << 20)).expect("reopen");
        assert_eq!(spool.stats.recovered.load(Ordering::Relaxed), 50);
        assert!(spool.is_spooling(), "recovered results are flushed before new ones");
        let fake = Arc::new(FakePublisher::default());
        let t = spool.start(fake.clone()).expect("thread");
        // New results while still disconnected queue behind the recovered ones.
        let p = SpoolingPublisher::new(fake.clone(), Arc::clone(&spool));
        p.publish("r", &50u32.to_le_bytes(), Qos::AtLeastOnce, false).expect("spool");
        spool.set_connected(true);
        assert!(wait_until(|| !spool.is_spooling()));
        assert_eq!(payloads_u32(&fake), (0..=50).collect::<Vec<_>>());
        assert_eq!(segs(dir.path()), 0, "flushed segments are deleted");
        assert_eq!(spool.stats.records.load(Ordering::Relaxed), 0);
        assert_eq!(spool.stats.bytes.load(Ordering::Relaxed), 0);
        spool.stop();
        t.join().expect("join");
    }

    #[test]
    fn an_interrupted_flush_resumes_without_loss_or_repeats() {
        let dir = tempfile::tempdir().expect("tmp");
        let spool = Spool::open(dir.path(), cfg(1 << 20)).expect("open");
        let fake = Arc::new(FakePublisher::default());
        *fake.refuse_after.lock().expect("lock") = Some(7);
        spool.set_connected(false);
        for i in 0..20u32 {
            assert!(spool.offer("r", &i.to_le_bytes(), Qos::ExactlyOnce));
        }
        seal_now(&spool);
        let t = spool.start(fake.clone()).expect("thread");
        spool.set_connected(true);
        assert!(wait_until(|| spool.stats.flushed.load(Ordering::Relaxed) == 7));
        assert!(spool.is_spooling());
        *fake.refuse_after.lock().expect("lock") = None;
        assert!(wait_until(|| !spool.is_spooling()));
        assert_eq!(payloads_u32(&fake), (0..20).collect::<Vec<_>>());
        spool.stop();
        t.join().expect("join");
    }

    #[test]
    fn oldest_results_are_evicted_and_counted_over_the_limit() {
        let dir = tempfile::tempdir().expect("tmp");
        // Each record is 11 + 1 + 1000 bytes: about four segments of 2 records fit.
        let spool = Spool::open(dir.path(), cfg(9_000)).expect("open");
        spool.set_connected(false);
        for i in 0..20u8 {
            assert!(spool.offer("r", &[i; 1000], Qos::AtLeastOnce));
            if i % 2 == 1 {
                seal_now(&spool);
            }
        }
        let evicted = spool.stats.evicted.load(Ordering::Relaxed);
        assert!(evicted >= 10, "evicted {evicted}");
        assert!(spool.stats.bytes.load(Ordering::Relaxed) <= 9_000);
        let fake = Arc::new(FakePublisher::default());
        let t = spool.start(fake.clone()).expect("thread");
        spool.set_connected(true);
        assert!(wait_until(|| !spool.is_spooling()));
        let got: Vec<u8> = fake.got.lock().expect("lock").iter().map(|(_, p)| p[0]).collect();
        // The newest survive, in order; nothing is both evicted and published.
        assert_eq!(got.len() as u64 + evicted, 20);
        assert!(got.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(got.last(), Some(&19));
        spool.stop();
        t.join().expect("join");
    }

    #[test]
    fn a_record_the_format_cannot_hold_is_skipped_and_the_batch_still_lands() {
        let dir = tempfile::tempdir().expect("tmp");
        let spool = Spool::open(dir.path(), cfg(1 << 20)).expect("open");
        spool.set_connected(false);
        let long = "t".repeat(70_000);
        assert!(spool.offer("r", b"1", Qos::AtLeastOnce));
        assert!(!spool.offer(&long, b"x", Qos::AtLeastOnce), "refused at the door");
        assert!(spool.offer("r", b"2", Qos::AtLeastOnce));
        // One that got in anyway (e.g. held by the MQTT client at shutdown) is left out of its
        // segment instead of failing it.
        let preserved = vec![
            Record { topic: long.clone(), payload: b"y".to_vec(), qos: Qos::AtLeastOnce },
            Record { topic: "r".into(), payload: b"0".to_vec(), qos: Qos::AtLeastOnce },
        ];
        spool.preserve(preserved).expect("preserve");
        seal_now(&spool);
        assert_eq!(spool.stats.skipped.load(Ordering::Relaxed), 2);
        assert_eq!(spool.stats.errors.load(Ordering::Relaxed), 0);
        let fake = Arc::new(FakePublisher::default());
        let t = spool.start(fake.clone()).expect("thread");
        spool.set_connected(true);
        assert!(wait_until(|| !spool.is_spooling()));
        let got: Vec<u8> = fake.got.lock().expect("lock").iter().map(|(_, p)| p[0]).collect();
        assert_eq!(got, b"012".to_vec());
        spool.stop();
        t.join().expect("join");
    }

    #[test]
    fn damaged_segments_are_set_aside_and_counted() {
        let dir = tempfile::tempdir().expect("tmp");
        let recs = [
            Record { topic: "a".into(), payload: b"one".to_vec(), qos: Qos::AtLeastOnce },
            Record { topic: "a".into(), payload: b"two".to_vec(), qos: Qos::AtLeastOnce },
        ];
        let good = seg_path(dir.path(), FIRST_SEQ + 1);
        write_segment(&good, recs.iter()).expect("write");
        let damaged = seg_path(dir.path(), FIRST_SEQ);
        write_segment(&damaged, recs.iter()).expect("write");
        let mut bytes = fs::read(&damaged).expect("read");
        let last = bytes.len() - 6;
        bytes[last] ^= 0xFF;
        fs::write(&damaged, bytes).expect("write");
        fs::write(dir.path().join(".00000000000000000009.seg.tmp"), b"half").expect("write");
        let spool = Spool::open(dir.path(), cfg(1 << 20)).expect("open");
        assert!(!dir.path().join(".00000000000000000009.seg.tmp").exists());
        let fake = Arc::new(FakePublisher::default());
        let t = spool.start(fake.clone()).expect("thread");
        spool.set_connected(true);
        assert!(wait_until(|| !spool.is_spooling()));
        let got: Vec<Vec<u8>> =
            fake.got.lock().expect("lock").iter().map(|r| r.1.clone()).collect();
        assert_eq!(got, vec![b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(spool.stats.evicted.load(Ordering::Relaxed), 2);
        assert_eq!(spool.stats.errors.load(Ordering::Relaxed), 1);
        assert!(damaged.with_extension("corrupt").exists());
        spool.stop();
        t.join().expect("join");
    }

    #[test]
    fn preserved_records_come_before_spooled_ones() {
        let dir = tempfile::tempdir().expect("tmp");
        let spool = Spool::open(dir.path(), cfg(1 << 20)).expect("open");
        spool.set_connected(false);
        assert!(spool.offer("r", b"2", Qos::AtLeastOnce));
        seal_now(&spool);
        let fake = Arc::new(FakePublisher::default());
        let t = spool.start(fake.clone()).expect("thread");
        spool
            .preserve(vec![Record {
                topic: "r".into(),
                payload: b"1".to_vec(),
                qos: Qos::AtLeastOnce,
            }])
            .expect("preserve");
        spool.set_connected(true);
        assert!(wait_until(|| !spool.is_spooling()));
        let got: Vec<Vec<u8>> =
            fake.got.lock().expect("lock").iter().map(|r| r.1.clone()).collect();
        assert_eq!(got, vec![b"1".to_vec(), b"2".to_vec()]);
        spool.stop();
        t.join().expect("join");
    }

    #[test]
    fn read_segment_rejects_garbage_without_panicking() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("x.seg");
        for data in [
            &b""[..],
            b"EISPOOL1",
            b"EISPOOL1\xff\xff\xff\xff",
            b"EISPOOL1\x01\0\0\0\x01\xff\xff\xff\xff\xff\xff",
            b"NOTSPOOL\0\0\0\0",
        ] {
            fs::write(&p, data).expect("write");
            assert!(read_segment(&p).is_err(), "{data:?}");
        }
    }
}
