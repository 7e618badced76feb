//! The optimized-model cache, for fast start: a model's decluttered graph in tract's NNEF form,
//! plus what the ONNX file told us about it, keyed by everything that decides the result.
//!
//! On a hit, start-up skips reading the ONNX protobuf, type inference and decluttering, and only
//! runs tract's optimizer (its plans depend on the CPU it runs on, so they are not cached).
//!
//! Key: the model file's SHA-256, the concrete input shapes, the f16 switch, the tract version
//! and edgeinfer's version (so an upgrade of either invalidates every entry), and the entry
//! format. Entries are written to a temporary file, fsync'd and renamed, so a crash leaves either
//! no entry or a whole one; an unreadable entry is ignored and rewritten.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tract_onnx::prelude::*;

use super::spec::{DType, Dim, Parsed, TensorSpec};
use crate::sys::fsutil;

/// Bumped when the entry layout changes.
const FORMAT: u32 = 1;

/// The tract version this binary was built with (from Cargo.lock, by build.rs).
pub const TRACT_FULL_VERSION: &str = match option_env!("EDGEINFER_TRACT_VERSION") {
    Some(v) => v,
    None => "unknown",
};

/// What the ONNX file said that the NNEF graph does not carry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub format: u32,
    /// ONNX `model_version` (0: none).
    pub onnx_version: i64,
    pub onnx_nodes: usize,
    pub op_histogram: BTreeMap<String, usize>,
    pub inputs: Vec<SpecMeta>,
    pub output_names: Vec<String>,
}

impl Meta {
    pub fn of(p: &Parsed) -> Meta {
        Meta {
            format: FORMAT,
            onnx_version: p.onnx_version,
            onnx_nodes: p.onnx_nodes,
            op_histogram: p.op_histogram.clone(),
            inputs: p.inputs.iter().map(SpecMeta::of).collect(),
            output_names: p.output_names.clone(),
        }
    }
}

/// A [`TensorSpec`] as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SpecMeta {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Declared dims: a number, a symbol name, or "?".
    pub declared: Vec<String>,
}

impl SpecMeta {
    pub fn of(t: &TensorSpec) -> SpecMeta {
        SpecMeta {
            name: t.name.clone(),
            dtype: t.dtype.name().to_string(),
            shape: t.shape.clone(),
            declared: t
                .declared
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => n.to_string(),
                    Dim::Symbol(s) => format!("sym:{s}"),
                    Dim::Unknown => "?".into(),
                })
                .collect(),
        }
    }

    pub fn to_spec(&self) -> Option<TensorSpec> {
        Some(TensorSpec {
            name: self.name.clone(),
            dtype: DType::from_name(&self.dtype)?,
            shape: self.shape.clone(),
            declared: self
                .declared
                .iter()
                .map(|d| match d.strip_prefix("sym:") {
                    Some(s) => Dim::Symbol(s.to_string()),
                    None => d.parse().map_or(Dim::Unknown, Dim::Fixed),
                })
                .collect(),
        })
    }
}

/// The cache key of a model file loaded with these options.
pub fn key(sha256: &str, input_shapes: &BTreeMap<String, Vec<usize>>, half: bool) -> String {
    key_with(sha256, input_shapes, half, TRACT_FULL_VERSION, env!("CARGO_PKG_VERSION"))
}

/// [`key`] with the versions as parameters (what an upgrade changes).
fn key_with(
    sha256: &str,
    input_shapes: &BTreeMap<String, Vec<usize>>,
    half: bool,
    tract: &str,
    edgeinfer: &str,
) -> String {
    let mut h = Sha256::new();
    h.update(sha256.as_bytes());
    h.update(format!(
        "{input_shapes:?}|half={half}|tract={tract}|edgeinfer={edgeinfer}|format={FORMAT}"
    ));
    fsutil::hex(&h.finalize()[..16])
}

fn nnef() -> tract_nnef::framework::Nnef {
    use tract_onnx::WithOnnx;
    tract_nnef::nnef().with_onnx()
}

fn paths(dir: &Path, key: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{key}.nnef.tar")), dir.join(format!("{key}.json")))
}

/// The cached decluttered model and its metadata, if there is a usable entry.
pub fn load(dir: &Path, key: &str) -> Result<Option<(TypedModel, Meta)>, String> {
    let (tar, json) = paths(dir, key);
    let Ok(meta_text) = std::fs::read(&json) else { return Ok(None) };
    let meta: Meta =
        serde_json::from_slice(&meta_text).map_err(|e| format!("{}: {e}", json.display()))?;
    if meta.format != FORMAT {
        return Ok(None);
    }
    let mut f = std::fs::File::open(&tar).map_err(|e| format!("{}: {e}", tar.display()))?;
    let model = nnef().model_for_read(&mut f).map_err(|e| format!("{}: {e:#}", tar.display()))?;
    Ok(Some((model, meta)))
}

/// Writes an entry (temporary files, fsync, rename: never a half-written entry).
pub fn store(dir: &Path, key: &str, model: &TypedModel, meta: &Meta) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let (tar, json) = paths(dir, key);
    // Model properties (the ONNX doc string, metadata) are not needed to run it, and tract
    // 0.23.9's NNEF reader fails on the properties fragment its writer produces for our
    // fixtures' doc strings ("Reading proto model: at line 5"): leave them out.
    let mut bare = model.clone();
    bare.properties.clear();
    // The graph first, the metadata last: an entry without its metadata is not one.
    fsutil::write_atomic(&tar, |out| {
        nnef()
            .write_to_tar(&bare, &mut *out)
            .map(|_| ())
            .map_err(|e| std::io::Error::other(format!("{e:#}")))
    })
    .map_err(|e| format!("{}: {e}", tar.display()))?;
    let text = serde_json::to_vec_pretty(meta).map_err(|e| e.to_string())?;
    fsutil::write_atomic(&json, |out| out.write_all(&text))
        .map_err(|e| format!("{}: {e}", json.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LoadOptions, Model};

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(rel)
    }

    fn run(m: &Model, input: &[u8]) -> Vec<u8> {
        let mut s = m.session().expect("session");
        s.input_mut(0).copy_from_slice(input);
        s.run().expect("run");
        s.output(0).expect("output").bytes().to_vec()
    }

    #[test]
    fn a_cached_model_loads_from_the_cache_and_gives_the_same_outputs() {
        let dir = tempfile::tempdir().expect("tmp");
        for case in ["digits", "sensor_cnn", "mobilenet"] {
            let path = fixture(&format!("{case}/model.onnx"));
            let opts =
                LoadOptions { cache_dir: Some(dir.path().to_path_buf()), ..Default::default() };
            let cold = Model::load(&path, &opts).expect("cold");
            assert!(!cold.from_cache, "{case}: first load parses the ONNX file");
            let warm = Model::load(&path, &opts).expect("cached");
            assert!(warm.from_cache, "{case}: second load comes from the cache");
            assert_eq!(
                (&warm.version, &warm.inputs, warm.outputs.len(), warm.onnx_nodes),
                (&cold.version, &cold.inputs, cold.outputs.len(), cold.onnx_nodes),
                "{case}"
            );
            assert_eq!(
                warm.outputs.iter().map(|o| &o.name).collect::<Vec<_>>(),
                cold.outputs.iter().map(|o| &o.name).collect::<Vec<_>>()
            );
            let input_name = &cold.inputs[0].name;
            let input =
                std::fs::read(fixture(&format!("{case}/samples/000/input.{input_name}.bin")))
                    .expect("sample");
            assert_eq!(run(&warm, &input), run(&cold, &input), "{case}: identical outputs");
        }
    }

    #[test]
    fn keys_change_with_the_model_the_shapes_and_precision() {
        let none = BTreeMap::new();
        let mut batch = BTreeMap::new();
        batch.insert("accel".to_string(), vec![4, 3, 128]);
        let k = key("aa", &none, false);
        assert_eq!(k, key("aa", &none, false), "deterministic");
        assert_ne!(k, key("ab", &none, false), "another file");
        assert_ne!(k, key("aa", &batch, false), "other input shapes");
        assert_ne!(k, key("aa", &none, true), "f16");
        let base = key_with("aa", &none, false, "0.23.9", "0.1.0");
        assert_ne!(base, key_with("aa", &none, false, "0.23.10", "0.1.0"), "a tract upgrade");
        assert_ne!(base, key_with("aa", &none, false, "0.23.9", "0.2.0"), "an edgeinfer upgrade");
        assert_ne!(TRACT_FULL_VERSION, "unknown", "build.rs read tract's version from Cargo.lock");
    }

    #[test]
    fn a_corrupt_entry_is_ignored_and_rewritten() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = fixture("digits/model.onnx");
        let opts = LoadOptions { cache_dir: Some(dir.path().to_path_buf()), ..Default::default() };
        Model::load(&path, &opts).expect("cold");
        let tar = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "tar"))
            .expect("entry");
        std::fs::write(&tar, b"garbage").expect("corrupt");
        let m = Model::load(&path, &opts).expect("falls back to the ONNX file");
        assert!(!m.from_cache);
        assert!(Model::load(&path, &opts).expect("again").from_cache, "entry rewritten");
    }
}
