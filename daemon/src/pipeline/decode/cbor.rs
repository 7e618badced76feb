//! CBOR frames (RFC 8949): the json frame's structure (`seq`, `ts`, `deadline_ms`, `data` or
//! `inputs`) in CBOR, decoded by a small pull reader written for this one job.
//!
//! Why hand-written rather than a crate: a frame needs a handful of CBOR items (maps with text
//! keys, unsigned/negative integers, half/single/double floats, booleans, arrays, byte strings
//! and the RFC 8746 typed-array tags), and the decoder must stream numbers straight into the
//! input's little-endian buffer, slice byte strings out of the packet without copying, and
//! never allocate by a length the payload claims. serde-based crates (ciborium) build values
//! or need a visitor per shape and do not expose tags on byte strings conveniently; minicbor's
//! decoder would fit, but what it would save is the ~150 lines of [`Reader`] below, and every
//! crate also lands in the device's supply chain (Yocto crate and license lists). The reader
//! is fuzzed (`tools/fuzz` target `decode_cbor`).
//!
//! A tensor may be written three ways:
//! - nested or flat arrays of numbers, exactly as in json (any CBOR number type; booleans for
//!   bool inputs);
//! - a byte string holding the little-endian tensor bytes (exactly the input's byte size);
//! - an RFC 8746 typed array (tag 64..=87 on a byte string) whose element type is the input's
//!   dtype, little-endian (tags 69-71, 77-79, 84-86; for u8/i8 the endianness-free 64, 68, 72).
//!
//! The last two are the efficient path: the bytes are sliced from the packet (zero-copy).
//! Other fields are skipped (nesting up to [`MAX_DEPTH`]); duplicate known fields, indefinite
//! byte/text strings and trailing bytes are `malformed`.

use bytes::Bytes;
use smallvec::SmallVec;

use super::sink::{Decoded, Num, Sink, check_finite};
use crate::config::NanPolicy;
use crate::model::{DType, TensorSpec};
use crate::reject::{Reject, RejectReason};

/// Deepest nesting of arrays/maps/tags skipped in fields the daemon does not read.
pub const MAX_DEPTH: usize = 32;

/// One CBOR data item's head.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Head {
    Uint(u64),
    /// The value is `-1 - n`.
    Neg(u64),
    /// Length (definite only; indefinite strings are refused).
    Bytes(usize),
    Text(usize),
    /// Element count; `None`: indefinite, ended by a break.
    Array(Option<u64>),
    Map(Option<u64>),
    Tag(u64),
    Bool(bool),
    /// null or undefined.
    Null,
    Float(f64),
    Simple(u8),
    Break,
}

fn malformed(detail: impl Into<String>) -> Reject {
    Reject::new(RejectReason::Malformed, detail)
}

/// A cursor over a CBOR message.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Reader { b, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Reject> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.b.len()).ok_or_else(|| {
            malformed(format!(
                "invalid CBOR frame: truncated (an item at byte {} needs {n} more bytes)",
                self.pos
            ))
        })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn arg(&mut self, info: u8) -> Result<Option<u64>, Reject> {
        Ok(Some(match info {
            0..=23 => u64::from(info),
            24 => u64::from(self.take(1)?[0]),
            25 => {
                let s = self.take(2)?;
                u64::from(u16::from_be_bytes([s[0], s[1]]))
            }
            26 => {
                let s = self.take(4)?;
                u64::from(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
            }
            27 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(self.take(8)?);
                u64::from_be_bytes(a)
            }
            31 => return Ok(None),
            _ => {
                return Err(malformed(format!(
                    "invalid CBOR frame: reserved additional information {info} at byte {}",
                    self.pos - 1
                )));
            }
        }))
    }

    fn head(&mut self) -> Result<Head, Reject> {
        let at = self.pos;
        let ib = self.take(1)?[0];
        let (major, info) = (ib >> 5, ib & 0x1f);
        if major == 7 {
            return Ok(match info {
                20 => Head::Bool(false),
                21 => Head::Bool(true),
                22 | 23 => Head::Null,
                24 => Head::Simple(self.take(1)?[0]),
                25 => {
                    let s = self.take(2)?;
                    Head::Float(f64::from(half_to_f32(u16::from_be_bytes([s[0], s[1]]))))
                }
                26 => {
                    let s = self.take(4)?;
                    Head::Float(f64::from(f32::from_be_bytes([s[0], s[1], s[2], s[3]])))
                }
                27 => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(self.take(8)?);
                    Head::Float(f64::from_be_bytes(a))
                }
                31 => Head::Break,
                0..=19 => Head::Simple(info),
                _ => {
                    return Err(malformed(format!(
                        "invalid CBOR frame: reserved simple value at byte {at}"
                    )));
                }
            });
        }
        let arg = self.arg(info)?;
        let len = |n: Option<u64>, what: &str| -> Result<usize, Reject> {
            match n {
                None => Err(malformed(format!(
                    "indefinite-length CBOR {what} (at byte {at}) are not supported; send a \
                     definite length"
                ))),
                Some(n) => usize::try_from(n)
                    .map_err(|_| malformed(format!("CBOR {what} length {n} at byte {at}"))),
            }
        };
        Ok(match (major, arg) {
            (0, Some(n)) => Head::Uint(n),
            (1, Some(n)) => Head::Neg(n),
            (2, n) => Head::Bytes(len(n, "byte strings")?),
            (3, n) => Head::Text(len(n, "text strings")?),
            (4, n) => Head::Array(n),
            (5, n) => Head::Map(n),
            (6, Some(t)) => Head::Tag(t),
            _ => {
                return Err(malformed(format!(
                    "invalid CBOR frame: indefinite length on major type {major} at byte {at}"
                )));
            }
        })
    }

    /// Skips one data item (and everything nested in it).
    fn skip(&mut self, depth: usize) -> Result<(), Reject> {
        if depth > MAX_DEPTH {
            return Err(malformed(format!("CBOR frame nested deeper than {MAX_DEPTH} levels")));
        }
        match self.head()? {
            Head::Bytes(n) | Head::Text(n) => {
                self.take(n)?;
            }
            Head::Array(n) => self.skip_items(n, 1, depth)?,
            Head::Map(n) => self.skip_items(n, 2, depth)?,
            Head::Tag(_) => self.skip(depth + 1)?,
            Head::Break => return Err(malformed("invalid CBOR frame: unexpected break")),
            _ => {}
        }
        Ok(())
    }

    /// Skips `n` entries of `per` items each (or up to a break when `n` is `None`).
    fn skip_items(&mut self, n: Option<u64>, per: u64, depth: usize) -> Result<(), Reject> {
        match n {
            // Every item takes at least one byte: a huge claimed count runs out of input.
            Some(n) => {
                for _ in 0..n.saturating_mul(per) {
                    self.skip(depth + 1)?;
                }
            }
            None => loop {
                if self.peek_break() {
                    self.pos += 1;
                    break;
                }
                for _ in 0..per {
                    self.skip(depth + 1)?;
                }
            },
        }
        Ok(())
    }

    fn peek_break(&self) -> bool {
        self.b.get(self.pos) == Some(&0xff)
    }

    /// Reads one item and returns the byte range it spans.
    fn span(&mut self) -> Result<(usize, usize), Reject> {
        let start = self.pos;
        self.skip(0)?;
        Ok((start, self.pos))
    }

    fn text(&mut self) -> Result<&'a str, Reject> {
        match self.head()? {
            Head::Text(n) => std::str::from_utf8(self.take(n)?)
                .map_err(|_| malformed("invalid CBOR frame: a text string is not UTF-8")),
            other => Err(malformed(format!("map keys must be text strings, found {other:?}"))),
        }
    }

    fn number(&mut self, field: &str) -> Result<f64, Reject> {
        match self.head()? {
            Head::Uint(n) => Ok(n as f64),
            Head::Neg(n) => Ok(-1.0 - n as f64),
            Head::Float(f) => Ok(f),
            other => Err(malformed(format!("`{field}` must be a number, found {other:?}"))),
        }
    }
}

/// IEEE 754 half precision to single (exact).
fn half_to_f32(h: u16) -> f32 {
    tract_onnx::prelude::f16::from_bits(h).to_f32()
}

/// Entries of a CBOR map, checked one by one.
fn map_len(r: &mut Reader<'_>, what: &str) -> Result<Option<u64>, Reject> {
    match r.head()? {
        Head::Map(n) => Ok(n),
        other => Err(malformed(format!("{what} must be a CBOR map, found {other:?}"))),
    }
}

/// Calls `f(key, reader)` for every entry of the map whose head was just read; `f` must read
/// (or skip) the value.
fn for_each_entry<'a>(
    r: &mut Reader<'a>,
    n: Option<u64>,
    mut f: impl FnMut(&'a str, &mut Reader<'a>) -> Result<(), Reject>,
) -> Result<(), Reject> {
    let mut i = 0u64;
    loop {
        match n {
            Some(n) if i >= n => return Ok(()),
            None if r.peek_break() => {
                r.pos += 1;
                return Ok(());
            }
            _ => {}
        }
        let key = r.text()?;
        f(key, r)?;
        i += 1;
    }
}

/// Decodes a CBOR frame for a model with inputs `specs`.
pub(super) fn decode(
    payload: &Bytes,
    specs: &[TensorSpec],
    nan: NanPolicy,
) -> Result<Decoded, Reject> {
    let mut r = Reader::new(payload);
    let n = map_len(&mut r, "a frame")?;
    let mut seq = None;
    let mut ts = None;
    let mut deadline = None;
    let mut data = None;
    let mut inputs = None;
    let mut seen: SmallVec<[&str; 5]> = SmallVec::new();
    for_each_entry(&mut r, n, |key, r| {
        if matches!(key, "seq" | "ts" | "deadline_ms" | "data" | "inputs") {
            if seen.contains(&key) {
                return Err(malformed(format!("duplicate field `{key}`")));
            }
            seen.push(key);
        }
        match key {
            "seq" => match r.head()? {
                Head::Uint(s) => seq = Some(s),
                other => {
                    return Err(malformed(format!(
                        "`seq` must be an unsigned integer, found {other:?}"
                    )));
                }
            },
            "ts" => ts = Some(r.number("ts")?),
            "deadline_ms" => deadline = Some(r.number("deadline_ms")?),
            "data" => data = Some(r.span()?),
            "inputs" => inputs = Some(r.span()?),
            _ => r.skip(0)?,
        }
        Ok(())
    })?;
    if r.pos != payload.len() {
        return Err(Reject {
            seq,
            ..malformed(format!("{} trailing bytes after the CBOR frame", payload.len() - r.pos))
        });
    }
    let with_seq = |mut e: Reject| {
        e.seq = seq;
        e
    };
    if ts.is_some_and(|t: f64| !t.is_finite()) {
        return Err(with_seq(malformed("`ts` must be a finite number")));
    }
    let mut out = SmallVec::new();
    match (data, inputs) {
        (Some(_), Some(_)) => {
            return Err(with_seq(malformed("give either `data` or `inputs`, not both")));
        }
        (None, None) => {
            return Err(with_seq(malformed(
                "missing `data` (single-input models) or `inputs` (named inputs)",
            )));
        }
        (Some(span), None) => {
            let [spec] = specs else {
                let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
                return Err(with_seq(malformed(format!(
                    "the model has {} inputs {names:?}: send them by name in `inputs`",
                    specs.len()
                ))));
            };
            out.push(tensor(payload, span, spec, nan).map_err(with_seq)?);
        }
        (None, Some((start, end))) => {
            let mut spans: SmallVec<[Option<(usize, usize)>; 4]> =
                SmallVec::from_elem(None, specs.len());
            let mut r = Reader::new(&payload[..end]);
            r.pos = start;
            let n = map_len(&mut r, "`inputs`").map_err(with_seq)?;
            for_each_entry(&mut r, n, |key, r| {
                let Some(i) = specs.iter().position(|s| s.name == key) else {
                    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
                    return Err(malformed(format!(
                        "unknown input `{key}`; the model's inputs are {names:?}"
                    )));
                };
                if spans[i].is_some() {
                    return Err(malformed(format!("input `{key}` given twice")));
                }
                spans[i] = Some(r.span()?);
                Ok(())
            })
            .map_err(with_seq)?;
            for (spec, span) in specs.iter().zip(&spans) {
                let Some(span) = span else {
                    return Err(with_seq(malformed(format!("missing input `{}`", spec.name))));
                };
                out.push(tensor(payload, *span, spec, nan).map_err(with_seq)?);
            }
        }
    }
    let deadline_ms = deadline.filter(|d| d.is_finite() && *d >= 0.0);
    Ok(Decoded { seq, ts, deadline_ms, inputs: out })
}

/// The element type and byte order of an RFC 8746 typed-array tag: (dtype, little-endian or
/// single-byte). `None`: not a typed-array tag this daemon knows.
fn typed_array(tag: u64) -> Option<(DType, bool)> {
    Some(match tag {
        64 | 68 => (DType::U8, true),
        72 => (DType::I8, true),
        65 => (DType::U16, false),
        66 => (DType::U32, false),
        67 => (DType::U64, false),
        69 => (DType::U16, true),
        70 => (DType::U32, true),
        71 => (DType::U64, true),
        73 => (DType::I16, false),
        74 => (DType::I32, false),
        75 => (DType::I64, false),
        77 => (DType::I16, true),
        78 => (DType::I32, true),
        79 => (DType::I64, true),
        80 => (DType::F16, false),
        81 => (DType::F32, false),
        82 => (DType::F64, false),
        84 => (DType::F16, true),
        85 => (DType::F32, true),
        86 => (DType::F64, true),
        _ => return None,
    })
}

/// The RFC 8746 little-endian tag for `dt` (encoders, tests, docs).
pub fn typed_array_tag(dt: DType) -> Option<u64> {
    (64..=87).find(|t| typed_array(*t) == Some((dt, true)) && *t != 68)
}

/// One tensor value at `span` of `payload` into `spec`'s little-endian bytes.
fn tensor(
    payload: &Bytes,
    (start, end): (usize, usize),
    spec: &TensorSpec,
    nan: NanPolicy,
) -> Result<Bytes, Reject> {
    let mut r = Reader::new(&payload[..end]);
    r.pos = start;
    let at = r.pos;
    let head = r.head()?;
    // Byte string or typed array: the tensor bytes themselves, sliced (zero-copy).
    let bytes = match head {
        Head::Bytes(n) => Some((n, None)),
        Head::Tag(tag) => {
            let Some((dt, le)) = typed_array(tag) else {
                return Err(malformed(format!(
                    "input `{}`: CBOR tag {tag} is not a typed array this daemon reads \
                     (RFC 8746 tags 64-86)",
                    spec.name
                )));
            };
            match r.head()? {
                Head::Bytes(n) => Some((n, Some((tag, dt, le)))),
                other => {
                    return Err(malformed(format!(
                        "input `{}`: typed-array tag {tag} on {other:?}, not a byte string",
                        spec.name
                    )));
                }
            }
        }
        _ => None,
    };
    if let Some((n, typed)) = bytes {
        if let Some((tag, dt, le)) = typed {
            if dt != spec.dtype || !le {
                let hint = match typed_array_tag(spec.dtype) {
                    Some(t) => format!("send tag {t} ({} little-endian)", spec.dtype),
                    None => format!("{} has no typed-array tag; send numbers", spec.dtype),
                };
                return Err(Reject::new(
                    RejectReason::WrongDtype,
                    format!(
                        "input `{}` is {}, the typed array (tag {tag}) holds {dt} {}; {hint}",
                        spec.name,
                        spec.dtype,
                        if le { "little-endian" } else { "big-endian" },
                    ),
                ));
            }
            let size = dt.size();
            if n % size != 0 || n / size != spec.len() {
                return Err(Reject::new(
                    RejectReason::WrongShape,
                    format!(
                        "input `{}` {:?} takes {} elements, the typed array holds {} bytes \
                         ({} {dt})",
                        spec.name,
                        spec.shape,
                        spec.len(),
                        n,
                        n as f64 / size as f64
                    ),
                ));
            }
        } else if n != spec.byte_len() {
            return Err(Reject::new(
                RejectReason::WrongSize,
                format!(
                    "input `{}`: a byte string of {n} bytes; expected {} ({} {:?} little-endian)",
                    spec.name,
                    spec.byte_len(),
                    spec.dtype,
                    spec.shape
                ),
            ));
        }
        let from = r.pos;
        r.take(n)?;
        if r.pos != end {
            return Err(malformed(format!("input `{}`: more than one item", spec.name)));
        }
        let b = payload.slice(from..r.pos);
        check_finite(nan, spec.dtype, &b, |i| format!("element {i} of input `{}`", spec.name))?;
        return Ok(b);
    }
    // Numbers, nested or flat: streamed into the input's buffer like json.
    let mut sink = Sink::new(spec, nan);
    let mut r = Reader::new(&payload[..end]);
    r.pos = at;
    walk(&mut r, &mut sink, 0)?;
    if sink.leaves != sink.total {
        return Err(sink.shape_error(format!("has {} elements", sink.leaves)));
    }
    Ok(Bytes::from(sink.out))
}

/// One value of a tensor at nesting `depth` (0 = the input's top-level value).
fn walk(r: &mut Reader<'_>, sink: &mut Sink<'_>, depth: usize) -> Result<(), Reject> {
    let name = &sink.spec.name;
    let num = match r.head()? {
        Head::Uint(u) => Num::U(u),
        Head::Neg(n) => match i64::try_from(n) {
            Ok(i) => Num::I(-1 - i),
            Err(_) => Num::F(-1.0 - n as f64),
        },
        Head::Float(f) => Num::F(f),
        Head::Bool(b) => Num::B(b),
        Head::Null => {
            return Err(Reject::new(
                RejectReason::WrongDtype,
                format!("input `{name}` contains null where a number belongs"),
            ));
        }
        Head::Text(_) => {
            return Err(Reject::new(
                RejectReason::WrongDtype,
                format!("input `{name}` contains a string where a number belongs"),
            ));
        }
        Head::Map(_) => {
            return Err(Reject::new(
                RejectReason::WrongShape,
                format!("input `{name}` contains a map where a number or array belongs"),
            ));
        }
        Head::Bytes(_) | Head::Tag(_) => {
            return Err(malformed(format!(
                "input `{name}`: byte strings and typed arrays are taken only as the whole tensor"
            )));
        }
        Head::Simple(v) => {
            return Err(malformed(format!("input `{name}`: CBOR simple value {v}")));
        }
        Head::Break => return Err(malformed("invalid CBOR frame: unexpected break")),
        Head::Array(n) => {
            let rank = sink.spec.shape.len();
            if depth >= rank.max(1) {
                return Err(sink.shape_error(format!("is nested deeper than its rank {rank}")));
            }
            // A claimed count larger than the tensor fails before any element is read.
            if n.is_some_and(|n| n > sink.total as u64) {
                return Err(sink.shape_error(format!("has more than {} elements", sink.total)));
            }
            let mut count = 0usize;
            loop {
                match n {
                    Some(n) if count as u64 >= n => break,
                    None if r.peek_break() => {
                        r.pos += 1;
                        break;
                    }
                    _ => {}
                }
                walk(r, sink, depth + 1)?;
                count += 1;
            }
            let flat = sink.leaf_depth == Some(1) && rank != 1;
            let expected = if flat { sink.total } else { sink.spec.shape[depth] };
            if count != expected {
                return Err(if flat {
                    sink.shape_error(format!("has {count} elements"))
                } else {
                    sink.shape_error(format!(
                        "has {count} entries on axis {depth} (expected {expected})"
                    ))
                });
            }
            return Ok(());
        }
    };
    sink.push(depth, num)
}

/// A minimal CBOR writer for tests, tools and fuzz seeds (definite lengths, shortest heads).
pub mod write {
    fn head(out: &mut Vec<u8>, major: u8, n: u64) {
        let m = major << 5;
        match n {
            0..=23 => out.push(m | n as u8),
            24..=0xff => out.extend_from_slice(&[m | 24, n as u8]),
            0x100..=0xffff => {
                out.push(m | 25);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                out.push(m | 26);
                out.extend_from_slice(&(n as u32).to_be_bytes());
            }
            _ => {
                out.push(m | 27);
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
    }
    pub fn uint(out: &mut Vec<u8>, n: u64) {
        head(out, 0, n)
    }
    pub fn int(out: &mut Vec<u8>, i: i64) {
        if i >= 0 { head(out, 0, i as u64) } else { head(out, 1, (-1 - i) as u64) }
    }
    pub fn f64(out: &mut Vec<u8>, f: f64) {
        out.push(0xfb);
        out.extend_from_slice(&f.to_be_bytes());
    }
    pub fn f32(out: &mut Vec<u8>, f: f32) {
        out.push(0xfa);
        out.extend_from_slice(&f.to_be_bytes());
    }
    pub fn text(out: &mut Vec<u8>, s: &str) {
        head(out, 3, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }
    pub fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        head(out, 2, b.len() as u64);
        out.extend_from_slice(b);
    }
    pub fn array(out: &mut Vec<u8>, n: usize) {
        head(out, 4, n as u64)
    }
    pub fn map(out: &mut Vec<u8>, n: usize) {
        head(out, 5, n as u64)
    }
    pub fn tag(out: &mut Vec<u8>, t: u64) {
        head(out, 6, t)
    }
}

#[cfg(test)]
mod tests {
    use super::write as w;
    use super::*;
    use crate::config::PayloadFormat;
    use crate::model::Dim;
    use crate::pipeline::decode::Decoder;

    fn spec(name: &str, dtype: DType, shape: &[usize]) -> TensorSpec {
        TensorSpec { name: name.into(), dtype, shape: shape.to_vec(), declared: vec![Dim::Unknown] }
    }

    fn dec(specs: Vec<TensorSpec>) -> Decoder {
        Decoder::new(PayloadFormat::Cbor, specs, 1 << 20, NanPolicy::Reject).expect("decoder")
    }

    /// {"seq": 9, "ts": 1.5, "data": <value written by `f`>}
    fn frame(f: impl FnOnce(&mut Vec<u8>)) -> Bytes {
        let mut o = Vec::new();
        w::map(&mut o, 3);
        w::text(&mut o, "seq");
        w::uint(&mut o, 9);
        w::text(&mut o, "ts");
        w::f64(&mut o, 1.5);
        w::text(&mut o, "data");
        f(&mut o);
        Bytes::from(o)
    }

    fn f32s(b: &Bytes) -> Vec<f32> {
        b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    fn reject(d: &Decoder, b: Bytes) -> Reject {
        match d.decode(b) {
            Ok(x) => panic!("expected a reject, decoded {x:?}"),
            Err(r) => r,
        }
    }

    #[test]
    fn nested_flat_bytes_and_typed_arrays_give_the_json_bytes() {
        let d = dec(vec![spec("x", DType::F32, &[1, 2, 3])]);
        let vals = [1.0f32, 2.0, -3.0, 4.0, 5.0, 6.5];
        let json = Decoder::new(
            PayloadFormat::Json,
            vec![spec("x", DType::F32, &[1, 2, 3])],
            1 << 20,
            NanPolicy::Reject,
        )
        .expect("json")
        .decode(Bytes::from_static(br#"{"seq":9,"ts":1.5,"data":[[[1,2,-3],[4,5,6.5]]]}"#))
        .expect("json frame");
        let nested = frame(|o| {
            w::array(o, 1);
            w::array(o, 2);
            for row in vals.chunks(3) {
                w::array(o, 3);
                for v in row {
                    // Mixed number types: unsigned, negative, half, single, double.
                    match *v {
                        1.0 => w::uint(o, 1),
                        -3.0 => w::int(o, -3),
                        2.0 => o.extend_from_slice(&[0xf9, 0x40, 0x00]), // f16 2.0
                        6.5 => w::f32(o, 6.5),
                        x => w::f64(o, f64::from(x)),
                    }
                }
            }
        });
        let flat = frame(|o| {
            w::array(o, 6);
            for v in vals {
                w::f64(o, f64::from(v));
            }
        });
        let le: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bytes = frame(|o| w::bytes(o, &le));
        let typed = frame(|o| {
            w::tag(o, 85);
            w::bytes(o, &le);
        });
        for (what, b) in [("nested", nested), ("flat", flat), ("bytes", bytes), ("typed", typed)] {
            let out = d.decode(b.clone()).unwrap_or_else(|e| panic!("{what}: {e:?}"));
            assert_eq!(f32s(&out.inputs[0]), vals, "{what}");
            assert_eq!(out.inputs[0], json.inputs[0], "{what}");
            assert_eq!((out.seq, out.ts), (Some(9), Some(1.5)), "{what}");
            if what == "bytes" || what == "typed" {
                // Zero-copy: the tensor is a slice of the message.
                let range = b.as_ptr() as usize..b.as_ptr() as usize + b.len();
                assert!(range.contains(&(out.inputs[0].as_ptr() as usize)), "{what} was copied");
            }
        }
    }

    #[test]
    fn named_inputs_with_integers_and_indefinite_containers() {
        let d = dec(vec![spec("x", DType::F32, &[1, 2]), spec("k", DType::I64, &[1])]);
        let mut o = Vec::new();
        o.push(0xbf); // indefinite map
        w::text(&mut o, "extra");
        w::map(&mut o, 1);
        w::text(&mut o, "ignored");
        w::array(&mut o, 0);
        w::text(&mut o, "inputs");
        w::map(&mut o, 2);
        w::text(&mut o, "k");
        w::tag(&mut o, 79);
        w::bytes(&mut o, &(-7i64).to_le_bytes());
        w::text(&mut o, "x");
        o.push(0x9f); // indefinite array
        w::f32(&mut o, 0.25);
        w::int(&mut o, -2);
        o.push(0xff);
        w::text(&mut o, "deadline_ms");
        w::uint(&mut o, 40);
        o.push(0xff);
        let out = d.decode(Bytes::from(o)).expect("valid");
        assert_eq!(f32s(&out.inputs[0]), vec![0.25, -2.0]);
        assert_eq!(out.inputs[1].as_ref(), (-7i64).to_le_bytes());
        assert_eq!((out.seq, out.deadline_ms), (None, Some(40.0)));
    }

    #[test]
    fn the_json_reasons_for_the_same_mistakes() {
        let d = dec(vec![spec("x", DType::F32, &[2, 2])]);
        let shape = |f: &dyn Fn(&mut Vec<u8>)| reject(&d, frame(f)).reason;
        let nums = |o: &mut Vec<u8>, n: usize| {
            w::array(o, n);
            for i in 0..n {
                w::uint(o, i as u64);
            }
        };
        assert_eq!(shape(&|o| nums(o, 3)), RejectReason::WrongShape);
        assert_eq!(shape(&|o| nums(o, 5)), RejectReason::WrongShape);
        assert_eq!(
            shape(&|o| {
                w::array(o, 2);
                nums(o, 2);
                nums(o, 1);
            }),
            RejectReason::WrongShape
        );
        assert_eq!(shape(&|o| w::uint(o, 5)), RejectReason::WrongShape);
        assert_eq!(
            shape(&|o| {
                w::array(o, 4);
                for _ in 0..4 {
                    w::text(o, "1");
                }
            }),
            RejectReason::WrongDtype
        );
        assert_eq!(
            shape(&|o| {
                w::array(o, 4);
                for _ in 0..3 {
                    w::uint(o, 1);
                }
                w::f64(o, f64::NAN);
            }),
            RejectReason::NonFinite
        );
        // Bytes of the wrong size, typed arrays of the wrong type or length, big-endian.
        assert_eq!(shape(&|o| w::bytes(o, &[0; 15])), RejectReason::WrongSize);
        let typed = |tag: u64, n: usize| {
            move |o: &mut Vec<u8>| {
                w::tag(o, tag);
                w::bytes(o, &vec![0u8; n]);
            }
        };
        assert_eq!(shape(&typed(85, 12)), RejectReason::WrongShape);
        assert_eq!(shape(&typed(86, 32)), RejectReason::WrongDtype);
        let be = reject(&d, frame(typed(81, 16)));
        assert_eq!(be.reason, RejectReason::WrongDtype);
        assert!(
            be.detail.contains("big-endian") && be.detail.contains("send tag 85"),
            "{}",
            be.detail
        );
        assert_eq!(shape(&typed(40, 16)), RejectReason::Malformed);
        let nan: Vec<u8> =
            [1f32, 2., f32::INFINITY, 4.].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(shape(&|o| w::bytes(o, &nan)), RejectReason::NonFinite);
        // Integer inputs: fractions and out-of-range values.
        let k = dec(vec![spec("k", DType::U8, &[1])]);
        for v in [256.0, -1.0, 0.5] {
            let b = frame(|o| {
                w::array(o, 1);
                w::f64(o, v);
            });
            assert_eq!(reject(&k, b).reason, RejectReason::WrongDtype, "{v}");
        }
    }

    #[test]
    fn malformed_frames_are_rejected_without_panics_and_keep_seq() {
        let d = dec(vec![spec("x", DType::F32, &[1])]);
        let good = frame(|o| {
            w::array(o, 1);
            w::uint(o, 1);
        });
        assert!(d.decode(good.clone()).is_ok());
        // Every truncation of a good frame is a clean reject.
        for n in 1..good.len() {
            let r = reject(&d, good.slice(..n));
            assert_eq!(r.reason, RejectReason::Malformed, "prefix {n}: {}", r.detail);
        }
        let mut trailing = good.to_vec();
        trailing.push(0);
        let r = reject(&d, Bytes::from(trailing));
        assert!(r.detail.contains("1 trailing bytes"), "{}", r.detail);
        assert_eq!(r.seq, Some(9));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x83, 1, 2, 3], "must be a CBOR map"),
            (vec![0xa1, 0x01, 0x01], "map keys must be text"),
            (vec![0xa1, 0x63, b's', b'e', b'q', 0x20], "`seq` must be an unsigned"),
            (vec![0xa1, 0x64, b'd', b'a', b't', b'a', 0x5f, 0xff], "indefinite-length"),
            (vec![0xa1, 0x61, b'z', 0x1c], "reserved additional information"),
            (vec![0xbf, 0x61, b'z', 0xff], "unexpected break"),
            (vec![0xa0], "missing `data`"),
            // A map claiming 2^64-1 entries runs out of input, never allocates by the claim.
            (
                vec![0xbb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x61, b'z', 0],
                "truncated",
            ),
        ];
        for (b, needle) in cases {
            let r = reject(&d, Bytes::from(b.clone()));
            assert_eq!(r.reason, RejectReason::Malformed, "{b:02x?}");
            assert!(r.detail.contains(needle), "{needle:?} not in {:?}", r.detail);
        }
        // Deep nesting in an ignored field stops at MAX_DEPTH instead of recursing on.
        let mut deep = vec![0xa2, 0x61, b'z'];
        deep.extend(std::iter::repeat_n(0x81, 10_000));
        deep.push(0);
        let r = reject(&d, Bytes::from(deep));
        assert!(r.detail.contains("nested deeper than 32"), "{}", r.detail);
        // Duplicate fields.
        let mut dup = Vec::new();
        w::map(&mut dup, 2);
        w::text(&mut dup, "seq");
        w::uint(&mut dup, 1);
        w::text(&mut dup, "seq");
        w::uint(&mut dup, 2);
        assert!(reject(&d, Bytes::from(dup)).detail.contains("duplicate field `seq`"));
    }

    #[test]
    fn claimed_counts_are_checked_before_reading_on() {
        let d = dec(vec![spec("x", DType::F32, &[4])]);
        // 2^64-1 claimed elements: the input runs out, nothing is allocated by the claim.
        let huge = frame(|o| {
            o.push(0x9b);
            o.extend_from_slice(&u64::MAX.to_be_bytes());
        });
        let r = reject(&d, huge);
        assert_eq!(r.reason, RejectReason::Malformed);
        assert!(r.detail.contains("truncated"), "{}", r.detail);
        // A well-formed array longer than the tensor fails on its count, before its elements.
        let five = frame(|o| {
            w::array(o, 5);
            for _ in 0..5 {
                w::uint(o, 1);
            }
        });
        let r = reject(&d, five);
        assert_eq!(r.reason, RejectReason::WrongShape);
        assert!(r.detail.contains("more than 4 elements"), "{}", r.detail);
    }
}
