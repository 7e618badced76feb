//! The edgeinfer-v1 binary envelope: a fixed little-endian header in front of a binary frame
//! (raw, jpeg, png, pcm_s16le) carrying what json/cbor frames carry as fields: the device's
//! sequence number, its timestamp, a deadline, and for sample streams the channel count and
//! sample rate the device thinks it sends.
//!
//! Layout (`docs/messages.md` is the reference for device authors):
//!
//! ```text
//! offset size  field
//!  0     4     magic "EIF1" (45 49 46 31)
//!  4     1     version: 1
//!  5     1     flags: 0x01 seq, 0x02 ts, 0x04 deadline_ms, 0x08 stream (sample_rate + channels);
//!              other bits must be 0
//!  6     2     header_len, u16 LE: bytes before the payload, 40..=1024 (bytes 40.. are skipped:
//!              room for later fields)
//!  8     8     seq, u64 LE
//! 16     8     ts, f64 LE, milliseconds since the Unix epoch (finite)
//! 24     4     deadline_ms, u32 LE, milliseconds after arrival
//! 28     4     sample_rate, u32 LE, Hz
//! 32     2     channels, u16 LE
//! 34     6     reserved (write 0; ignored)
//! header_len   the payload, to the end of the message
//! ```
//!
//! A field whose flag is clear is ignored (write 0). Parsing never copies: the payload is the
//! rest of the message, sliced from the packet buffer.

use crate::reject::{Reject, RejectReason};

pub const MAGIC: [u8; 4] = *b"EIF1";
pub const VERSION: u8 = 1;
/// Size of the v1 header fields (the smallest valid `header_len`).
pub const HEADER_LEN: usize = 40;
/// Largest `header_len` accepted.
pub const MAX_HEADER_LEN: usize = 1024;

pub const FLAG_SEQ: u8 = 0x01;
pub const FLAG_TS: u8 = 0x02;
pub const FLAG_DEADLINE: u8 = 0x04;
pub const FLAG_STREAM: u8 = 0x08;
const KNOWN_FLAGS: u8 = FLAG_SEQ | FLAG_TS | FLAG_DEADLINE | FLAG_STREAM;

/// What an envelope says about its frame.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Meta {
    pub seq: Option<u64>,
    pub ts: Option<f64>,
    pub deadline_ms: Option<u32>,
    /// (sample_rate, channels) of a sample stream chunk.
    pub stream: Option<(u32, u16)>,
}

fn bad(detail: impl Into<String>) -> Reject {
    Reject::new(RejectReason::BadEnvelope, detail)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Reads the header of `msg`; returns what it says and the offset of the payload.
pub fn parse(msg: &[u8]) -> Result<(Meta, usize), Reject> {
    if msg.len() < MAGIC.len() || msg[..4] != MAGIC {
        let head: Vec<String> = msg.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Err(bad(format!(
            "no edgeinfer-v1 envelope: the message starts with [{}], not \"EIF1\" (45 49 46 31); \
             hint: the pipeline has envelope = \"edgeinfer-v1\"",
            head.join(" ")
        )));
    }
    if msg.len() < HEADER_LEN {
        return Err(bad(format!(
            "envelope header is {HEADER_LEN} bytes, the message has only {}",
            msg.len()
        )));
    }
    let b = &msg[..HEADER_LEN];
    if b[4] != VERSION {
        return Err(bad(format!(
            "unknown envelope version {} (this daemon reads {VERSION})",
            b[4]
        )));
    }
    let flags = b[5];
    if flags & !KNOWN_FLAGS != 0 {
        return Err(bad(format!(
            "unknown envelope flags 0x{:02x} (known: 0x{KNOWN_FLAGS:02x})",
            flags & !KNOWN_FLAGS
        )));
    }
    let header_len = usize::from(u16_at(b, 6));
    if !(HEADER_LEN..=MAX_HEADER_LEN).contains(&header_len) {
        return Err(bad(format!(
            "envelope header_len {header_len} is outside {HEADER_LEN}..={MAX_HEADER_LEN}"
        )));
    }
    if header_len > msg.len() {
        return Err(bad(format!(
            "envelope header_len {header_len} is past the end of the {}-byte message",
            msg.len()
        )));
    }
    let mut meta = Meta::default();
    if flags & FLAG_SEQ != 0 {
        meta.seq = Some(u64_at(b, 8));
    }
    if flags & FLAG_TS != 0 {
        let ts = f64::from_bits(u64_at(b, 16));
        if !ts.is_finite() {
            return Err(Reject { seq: meta.seq, ..bad("envelope ts is not a finite number") });
        }
        meta.ts = Some(ts);
    }
    if flags & FLAG_DEADLINE != 0 {
        meta.deadline_ms = Some(u32_at(b, 24));
    }
    if flags & FLAG_STREAM != 0 {
        meta.stream = Some((u32_at(b, 28), u16_at(b, 32)));
    }
    Ok((meta, header_len))
}

/// Writes an envelope for `meta` followed by `payload` (devices, tests, tools).
pub fn encode(meta: &Meta, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    let mut flags = 0;
    flags |= if meta.seq.is_some() { FLAG_SEQ } else { 0 };
    flags |= if meta.ts.is_some() { FLAG_TS } else { 0 };
    flags |= if meta.deadline_ms.is_some() { FLAG_DEADLINE } else { 0 };
    flags |= if meta.stream.is_some() { FLAG_STREAM } else { 0 };
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(flags);
    out.extend_from_slice(&(HEADER_LEN as u16).to_le_bytes());
    out.extend_from_slice(&meta.seq.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&meta.ts.unwrap_or(0.0).to_le_bytes());
    out.extend_from_slice(&meta.deadline_ms.unwrap_or(0).to_le_bytes());
    let (rate, ch) = meta.stream.unwrap_or((0, 0));
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&ch.to_le_bytes());
    out.extend_from_slice(&[0u8; 6]);
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_byte_layout() {
        let meta = Meta {
            seq: Some(0x0102_0304_0506_0708),
            ts: Some(1_764_270_000_123.5),
            deadline_ms: Some(250),
            stream: Some((16_000, 2)),
        };
        let msg = encode(&meta, b"payload");
        assert_eq!(msg.len(), HEADER_LEN + 7);
        // The documented offsets, byte by byte.
        assert_eq!(&msg[0..4], b"EIF1");
        assert_eq!(msg[4], 1);
        assert_eq!(msg[5], 0x0f);
        assert_eq!(&msg[6..8], &[40, 0]);
        assert_eq!(&msg[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&msg[16..24], &1_764_270_000_123.5f64.to_le_bytes());
        assert_eq!(&msg[24..28], &[250, 0, 0, 0]);
        assert_eq!(&msg[28..32], &16_000u32.to_le_bytes());
        assert_eq!(&msg[32..34], &[2, 0]);
        assert_eq!(&msg[34..40], &[0; 6]);
        let (got, at) = parse(&msg).expect("valid");
        assert_eq!((got, &msg[at..]), (meta, &b"payload"[..]));
        // Flags clear: the fields are ignored whatever they hold.
        let mut bare = msg.clone();
        bare[5] = 0;
        assert_eq!(parse(&bare).expect("valid").0, Meta::default());
    }

    #[test]
    fn a_longer_header_is_skipped() {
        let mut msg = encode(&Meta { seq: Some(3), ..Meta::default() }, b"");
        msg[6..8].copy_from_slice(&48u16.to_le_bytes());
        msg.extend_from_slice(&[0xee; 8]);
        msg.extend_from_slice(b"data");
        let (meta, at) = parse(&msg).expect("valid");
        assert_eq!((meta.seq, &msg[at..]), (Some(3), &b"data"[..]));
    }

    #[test]
    fn every_bad_header_is_a_bad_envelope_with_a_reason() {
        let good = encode(&Meta { seq: Some(9), ts: Some(1.0), ..Meta::default() }, b"xy");
        let with = |at: usize, bytes: &[u8]| {
            let mut m = good.clone();
            m[at..at + bytes.len()].copy_from_slice(bytes);
            m
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"".to_vec(), "not \"EIF1\""),
            (b"EIF".to_vec(), "not \"EIF1\""),
            (b"\xff\xd8\xff\xe0 a jpeg".to_vec(), "starts with [ff d8 ff e0]"),
            (good[..39].to_vec(), "40 bytes, the message has only 39"),
            (with(4, &[2]), "unknown envelope version 2"),
            (with(5, &[0x13]), "unknown envelope flags 0x10"),
            (with(6, &[39, 0]), "header_len 39 is outside"),
            (with(6, &[0, 8]), "header_len 2048 is outside"),
            (with(6, &[50, 0]), "past the end of the 42-byte message"),
            (with(16, &f64::NAN.to_le_bytes()), "ts is not a finite number"),
        ];
        for (msg, needle) in cases {
            let r = parse(&msg).expect_err(needle);
            assert_eq!(r.reason, RejectReason::BadEnvelope, "{needle}");
            assert!(r.detail.contains(needle), "{needle:?} not in {:?}", r.detail);
        }
    }
}
