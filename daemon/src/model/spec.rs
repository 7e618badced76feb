//! What a model looks like from outside: its tensors' element types, dimensions and shapes,
//! and what parsing the ONNX file produced besides the graph. Shared by the loader and its cache
//! (`cache`), so the cache does not depend on the loader.

use std::collections::BTreeMap;
use std::fmt;

use tract_onnx::prelude::*;

/// Element types edgeinfer moves across the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    F32,
    F64,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    Bool,
}

impl DType {
    /// Every element type, in declaration order.
    pub const ALL: [DType; 12] = [
        DType::F16,
        DType::F32,
        DType::F64,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::Bool,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::F16 | DType::I16 | DType::U16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }

    /// Short name used in config, meta files and messages (`f32`, `i64`, ...).
    /// The inverse of [`DType::name`].
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::U16 => "u16",
            DType::U32 => "u32",
            DType::U64 => "u64",
            DType::Bool => "bool",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::F32 | DType::F64)
    }

    pub(super) fn from_tract(dt: DatumType) -> Option<DType> {
        Some(match dt {
            DatumType::F16 => DType::F16,
            DatumType::F32 => DType::F32,
            DatumType::F64 => DType::F64,
            DatumType::I8 => DType::I8,
            DatumType::I16 => DType::I16,
            DatumType::I32 => DType::I32,
            DatumType::I64 => DType::I64,
            DatumType::U8 => DType::U8,
            DatumType::U16 => DType::U16,
            DatumType::U32 => DType::U32,
            DatumType::U64 => DType::U64,
            DatumType::Bool => DType::Bool,
            _ => return None,
        })
    }

    pub(super) fn to_tract(self) -> DatumType {
        match self {
            DType::F16 => DatumType::F16,
            DType::F32 => DatumType::F32,
            DType::F64 => DatumType::F64,
            DType::I8 => DatumType::I8,
            DType::I16 => DatumType::I16,
            DType::I32 => DatumType::I32,
            DType::I64 => DatumType::I64,
            DType::U8 => DatumType::U8,
            DType::U16 => DatumType::U16,
            DType::U32 => DatumType::U32,
            DType::U64 => DatumType::U64,
            DType::Bool => DatumType::Bool,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One dimension as stored in the ONNX file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    Symbol(String),
    Unknown,
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbol(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

pub(super) fn dims_to_string(d: &[Dim]) -> String {
    let parts: Vec<String> = d.iter().map(ToString::to_string).collect();
    format!("[{}]", parts.join(", "))
}

/// A model input or output with its concrete shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// The shape as stored in the file (may contain symbols), for `inspect`.
    pub declared: Vec<Dim>,
}

impl TensorSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Size of the tensor in bytes.
    pub fn byte_len(&self) -> usize {
        self.len() * self.dtype.size()
    }

    pub fn shape_string(&self) -> String {
        format!("{:?}", self.shape)
    }
}

/// What parsing the ONNX file produced besides the graph (also what the cache stores).
pub struct Parsed {
    pub inputs: Vec<TensorSpec>,
    pub output_names: Vec<String>,
    pub onnx_version: i64,
    pub onnx_nodes: usize,
    pub op_histogram: BTreeMap<String, usize>,
}
