//! A model's inputs and outputs as the ONNX file declares them, without fixing shapes or
//! building a plan: what `inspect` prints for a model it cannot time yet (symbolic input
//! dimensions beyond the batch axis), with the `--input-shape` arguments it needs.

use std::path::Path;

use tract_onnx::pb::tensor_shape_proto::dimension;
use tract_onnx::pb::type_proto;
use tract_onnx::prelude::Framework;

use super::{DType, Dim, ModelError};

/// One declared input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredTensor {
    pub name: String,
    /// `None`: an element type edgeinfer does not handle (or none declared); `elem_type` has
    /// the ONNX code.
    pub dtype: Option<DType>,
    pub elem_type: i32,
    /// Empty when the file declares no shape.
    pub dims: Vec<Dim>,
}

impl DeclaredTensor {
    /// Dimensions other than a leading batch axis that have no fixed size: what inference
    /// needs to be told.
    pub fn unresolved(&self) -> bool {
        self.dims.is_empty()
            || self.dims.iter().enumerate().any(|(i, d)| match d {
                Dim::Fixed(_) => false,
                // A symbolic leading (batch) axis defaults to 1.
                Dim::Symbol(_) => i > 0,
                Dim::Unknown => true,
            })
    }

    /// The `--input-shape` argument to pass, with placeholders in capitals for the sizes only
    /// the user knows (`images=1,3,HEIGHT,WIDTH`); the batch axis is 1.
    pub fn shape_hint(&self) -> String {
        if self.dims.is_empty() {
            return format!("{}=D1,D2,..", self.name);
        }
        let dims: Vec<String> = self
            .dims
            .iter()
            .enumerate()
            .map(|(i, d)| match d {
                Dim::Fixed(n) => n.to_string(),
                Dim::Symbol(_) if i == 0 => "1".into(),
                Dim::Symbol(s) => {
                    let t: String =
                        s.chars()
                            .map(|c| {
                                if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }
                            })
                            .collect();
                    if t.is_empty() { format!("D{i}") } else { t }
                }
                Dim::Unknown => format!("D{i}"),
            })
            .collect();
        format!("{}={}", self.name, dims.join(","))
    }
}

/// Inputs (initializers excluded) and outputs of an ONNX file, in declaration order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    pub inputs: Vec<DeclaredTensor>,
    pub outputs: Vec<DeclaredTensor>,
    pub opset: Option<i64>,
    pub nodes: usize,
}

/// ONNX `TensorProto.DataType` codes.
fn dtype_of(code: i32) -> Option<DType> {
    Some(match code {
        1 => DType::F32,
        2 => DType::U8,
        3 => DType::I8,
        4 => DType::U16,
        5 => DType::I16,
        6 => DType::I32,
        7 => DType::I64,
        9 => DType::Bool,
        10 => DType::F16,
        11 => DType::F64,
        12 => DType::U32,
        13 => DType::U64,
        _ => return None,
    })
}

fn tensor(v: &tract_onnx::pb::ValueInfoProto) -> DeclaredTensor {
    let (elem_type, dims) = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => {
            let dims = t
                .shape
                .as_ref()
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match &d.value {
                            Some(dimension::Value::DimValue(n)) if *n >= 0 => {
                                Dim::Fixed(*n as usize)
                            }
                            Some(dimension::Value::DimParam(p)) if !p.is_empty() => {
                                Dim::Symbol(p.clone())
                            }
                            _ => Dim::Unknown,
                        })
                        .collect()
                })
                .unwrap_or_default();
            (t.elem_type, dims)
        }
        None => (0, Vec::new()),
    };
    DeclaredTensor { name: v.name.clone(), dtype: dtype_of(elem_type), elem_type, dims }
}

/// Reads the declared inputs and outputs of the ONNX file at `path`.
pub fn describe(path: &Path) -> Result<Declared, ModelError> {
    let bytes =
        std::fs::read(path).map_err(|source| ModelError::Read { path: path.into(), source })?;
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut bytes.as_slice())
        .map_err(|e| ModelError::Parse { path: path.into(), detail: format!("{e:#}") })?;
    let graph = proto.graph.as_ref().ok_or_else(|| ModelError::Parse {
        path: path.into(),
        detail: "the file has no graph".into(),
    })?;
    let init: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    Ok(Declared {
        inputs: graph
            .input
            .iter()
            .filter(|i| !init.contains(i.name.as_str()))
            .map(tensor)
            .collect(),
        outputs: graph.output.iter().map(tensor).collect(),
        opset: proto.opset_import.iter().find(|o| o.domain.is_empty()).map(|o| o.version),
        nodes: graph.node.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(case: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models")
            .join(case)
            .join("model.onnx")
    }

    #[test]
    fn declared_inputs_keep_their_symbols() {
        let d = describe(&fixture("sensor_cnn")).expect("describe");
        assert_eq!(d.inputs.len(), 1);
        let x = &d.inputs[0];
        assert_eq!(x.name, "accel");
        assert_eq!(x.dtype, Some(DType::F32));
        assert_eq!(x.dims, vec![Dim::Symbol("batch".into()), Dim::Fixed(3), Dim::Fixed(128)]);
        assert!(!x.unresolved(), "a symbolic batch axis alone defaults to 1");
        assert_eq!(d.outputs[0].name, "logits");
        let two = describe(&fixture("two_inputs")).expect("describe");
        assert_eq!(
            two.inputs.iter().map(|t| (t.name.as_str(), t.dtype)).collect::<Vec<_>>(),
            vec![("x", Some(DType::F32)), ("k", Some(DType::I64))]
        );
    }

    #[test]
    fn shape_hints_name_what_the_user_must_choose() {
        let t = DeclaredTensor {
            name: "images".into(),
            dtype: Some(DType::F32),
            elem_type: 1,
            dims: vec![
                Dim::Symbol("batch".into()),
                Dim::Fixed(3),
                Dim::Symbol("height".into()),
                Dim::Symbol("width".into()),
            ],
        };
        assert!(t.unresolved());
        assert_eq!(t.shape_hint(), "images=1,3,HEIGHT,WIDTH");
        let open = DeclaredTensor { dims: vec![], ..t.clone() };
        assert!(open.unresolved());
        assert_eq!(open.shape_hint(), "images=D1,D2,..");
        let unknown = DeclaredTensor { dims: vec![Dim::Fixed(1), Dim::Unknown], ..t };
        assert_eq!(unknown.shape_hint(), "images=1,D1");
    }

    #[test]
    fn a_file_that_is_not_onnx_is_a_parse_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("x.onnx");
        std::fs::write(&p, b"\x08\x07garbage").expect("write");
        assert!(matches!(describe(&p), Err(ModelError::Parse { .. })));
    }
}
