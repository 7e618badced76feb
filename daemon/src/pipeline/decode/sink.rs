//! The typed buffer JSON and CBOR frames decode into, element by element, with the first
//! reason to refuse the frame; and the non-finite check every float tensor goes through.

use bytes::Bytes;
use serde::de;
use smallvec::SmallVec;
use tract_onnx::prelude::f16;

use crate::config::NanPolicy;
use crate::model::{DType, TensorSpec};
use crate::reject::{Reject, RejectReason};

/// Input buffers in model input order, plus the frame metadata the device sent.
#[derive(Debug, Clone, Default)]
pub struct Decoded {
    pub seq: Option<u64>,
    /// Device timestamp, milliseconds since the Unix epoch.
    pub ts: Option<f64>,
    /// The frame's own deadline, milliseconds after arrival.
    pub deadline_ms: Option<f64>,
    pub inputs: SmallVec<[Bytes; 2]>,
}

/// Refuses `b` when it holds a non-finite float and the policy is `reject`; `what(i)` names
/// element `i` in the error.
pub(super) fn check_finite(
    nan: NanPolicy,
    dt: DType,
    b: &[u8],
    what: impl FnOnce(usize) -> String,
) -> Result<(), Reject> {
    match first_non_finite(dt, b) {
        Some(i) if nan == NanPolicy::Reject => Err(Reject::new(
            RejectReason::NonFinite,
            format!("{} is not finite (nan = \"reject\")", what(i)),
        )),
        _ => Ok(()),
    }
}

/// Index of the first NaN/inf element of a float tensor in little-endian bytes.
pub(super) fn first_non_finite(dt: DType, b: &[u8]) -> Option<usize> {
    match dt {
        DType::F32 => b
            .chunks_exact(4)
            .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
        DType::F64 => b.chunks_exact(8).position(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            !f64::from_le_bytes(a).is_finite()
        }),
        DType::F16 => b
            .chunks_exact(2)
            .position(|c| !f16::from_bits(u16::from_le_bytes([c[0], c[1]])).is_finite()),
        _ => None,
    }
}

/// Accumulates decoded elements and the first reason to reject (JSON and CBOR frames).
pub(super) struct Sink<'s> {
    pub(super) out: Vec<u8>,
    pub(super) spec: &'s TensorSpec,
    pub(super) nan: NanPolicy,
    pub(super) total: usize,
    pub(super) leaves: usize,
    /// Nesting depth of the first number seen: `rank` (nested form) or 1 (flat form).
    pub(super) leaf_depth: Option<usize>,
    pub(super) reject: Option<Reject>,
}

impl<'s> Sink<'s> {
    /// An empty sink for one input (its buffer sized once, from the model's signature).
    pub(super) fn new(spec: &'s TensorSpec, nan: NanPolicy) -> Self {
        Sink {
            out: Vec::with_capacity(spec.byte_len()),
            spec,
            nan,
            total: spec.len(),
            leaves: 0,
            leaf_depth: None,
            reject: None,
        }
    }

    pub(super) fn shape_error(&self, what: String) -> Reject {
        Reject::new(
            RejectReason::WrongShape,
            format!(
                "input `{}` {what}; expected shape {:?} ({} elements), nested or flat",
                self.spec.name, self.spec.shape, self.total
            ),
        )
    }

    pub(super) fn fail<E: de::Error>(&mut self, r: Reject) -> E {
        let msg = r.detail.clone();
        self.reject.get_or_insert(r);
        E::custom(msg)
    }

    pub(super) fn leaf<E: de::Error>(&mut self, depth: usize, v: Num) -> Result<(), E> {
        self.push(depth, v).map_err(|r| self.fail(r))
    }

    /// Appends one element found at nesting `depth`, or says why it does not fit.
    pub(super) fn push(&mut self, depth: usize, v: Num) -> Result<(), Reject> {
        let rank = self.spec.shape.len();
        match self.leaf_depth {
            None if depth == rank || depth == 1 || (rank == 0 && depth == 0) => {
                self.leaf_depth = Some(depth)
            }
            None => {
                return Err(self.shape_error(format!("has a number at nesting depth {depth}")));
            }
            Some(d) if d != depth => {
                return Err(self.shape_error("mixes numbers and arrays at one level".into()));
            }
            Some(_) => {}
        }
        if self.leaves >= self.total {
            // Stop early: never let an oversized array grow the buffer past the input's size.
            return Err(self.shape_error(format!("has more than {} elements", self.total)));
        }
        self.leaves += 1;
        let spec: &TensorSpec = self.spec;
        let name = &spec.name;
        let idx = self.leaves - 1;
        let dt = spec.dtype;
        let wrong = |what: String| {
            Reject::new(
                RejectReason::WrongDtype,
                format!("input `{name}` ({dt}) element {idx}: {what}"),
            )
        };
        macro_rules! int {
            ($t:ty) => {{
                let x: $t = match v {
                    Num::U(u) => {
                        <$t>::try_from(u).map_err(|_| wrong(format!("{u} is out of range")))?
                    }
                    Num::I(i) => {
                        <$t>::try_from(i).map_err(|_| wrong(format!("{i} is out of range")))?
                    }
                    Num::F(f)
                        if f.fract() == 0.0 && f >= <$t>::MIN as f64 && f <= <$t>::MAX as f64 =>
                    {
                        f as $t
                    }
                    Num::F(f) => return Err(wrong(format!("{f} is not an integer in range"))),
                    Num::B(b) => return Err(wrong(format!("{b} is a boolean"))),
                };
                self.out.extend_from_slice(&x.to_le_bytes());
            }};
        }
        let res: Result<(), Reject> = (|| {
            match dt {
                DType::F16 | DType::F32 | DType::F64 => {
                    let f = match v {
                        Num::U(u) => u as f64,
                        Num::I(i) => i as f64,
                        Num::F(f) => f,
                        Num::B(b) => return Err(wrong(format!("{b} is a boolean"))),
                    };
                    let finite = match dt {
                        DType::F16 => f16::from_f64(f).is_finite(),
                        DType::F32 => (f as f32).is_finite(),
                        _ => f.is_finite(),
                    };
                    if !finite && self.nan == NanPolicy::Reject {
                        return Err(Reject::new(
                            RejectReason::NonFinite,
                            format!(
                                "input `{name}` element {idx}: {f} overflows {dt} (nan = \"reject\")"
                            ),
                        ));
                    }
                    match dt {
                        DType::F16 => {
                            self.out.extend_from_slice(&f16::from_f64(f).to_bits().to_le_bytes())
                        }
                        DType::F32 => self.out.extend_from_slice(&(f as f32).to_le_bytes()),
                        _ => self.out.extend_from_slice(&f.to_le_bytes()),
                    }
                }
                DType::Bool => match v {
                    Num::B(b) => self.out.push(u8::from(b)),
                    Num::U(u @ (0 | 1)) => self.out.push(u as u8),
                    _ => return Err(wrong("expected true/false or 0/1".into())),
                },
                DType::I8 => int!(i8),
                DType::I16 => int!(i16),
                DType::I32 => int!(i32),
                DType::I64 => int!(i64),
                DType::U8 => int!(u8),
                DType::U16 => int!(u16),
                DType::U32 => int!(u32),
                DType::U64 => int!(u64),
            }
            Ok(())
        })();
        res
    }
}

#[derive(Clone, Copy)]
pub(super) enum Num {
    U(u64),
    I(i64),
    F(f64),
    B(bool),
}
