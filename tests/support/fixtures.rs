//! The fixture models with their onnxruntime reference outputs (`tests/fixtures/models`), and
//! the comparison tolerance.

use std::collections::BTreeMap;
use std::fs;

use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use serde_json::Value;

use crate::fixtures;

/// Max |a-b| allowed relative to max(1, max|ref|): 1e-4, or `EDGEINFER_TOLERANCE` (other
/// architectures' kernels round differently).
pub fn tolerance() -> f64 {
    std::env::var("EDGEINFER_TOLERANCE").ok().and_then(|t| t.parse().ok()).unwrap_or(1e-4)
}

/// Tensor metadata from a fixture's `meta.json`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct Meta {
    pub inputs: Vec<TensorMeta>,
    pub outputs: Vec<TensorMeta>,
    pub samples: usize,
}

/// One fixture sample: input bytes by name and reference outputs (as f64) by name.
#[derive(Debug, Clone)]
pub struct Sample {
    pub inputs: BTreeMap<String, Vec<u8>>,
    pub outputs: BTreeMap<String, Vec<f64>>,
}

/// A fixture model case under `tests/fixtures/models/<name>`.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub name: String,
    pub dir: PathBuf,
    pub meta: Meta,
    pub samples: Vec<Sample>,
}

fn decode(dtype: &str, b: &[u8]) -> Vec<f64> {
    fn chunks<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        b.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            a
        })
    }
    match dtype {
        "f32" => chunks::<4>(b).map(|a| f32::from_le_bytes(a) as f64).collect(),
        "f64" => chunks::<8>(b).map(f64::from_le_bytes).collect(),
        "i64" => chunks::<8>(b).map(|a| i64::from_le_bytes(a) as f64).collect(),
        "i32" => chunks::<4>(b).map(|a| i32::from_le_bytes(a) as f64).collect(),
        "u8" => b.iter().map(|x| *x as f64).collect(),
        other => panic!("fixture dtype {other} not handled by the test harness"),
    }
}

impl Fixture {
    pub fn load(name: &str) -> Result<Self> {
        let dir = fixtures().join("models").join(name);
        let meta: Meta = serde_json::from_slice(&fs::read(dir.join("meta.json"))?)?;
        let mut samples = Vec::new();
        for i in 0..meta.samples {
            let sdir = dir.join(format!("samples/{i:03}"));
            let mut inputs = BTreeMap::new();
            for t in &meta.inputs {
                inputs
                    .insert(t.name.clone(), fs::read(sdir.join(format!("input.{}.bin", t.name)))?);
            }
            let mut outputs = BTreeMap::new();
            for t in &meta.outputs {
                let b = fs::read(sdir.join(format!("output.{}.bin", t.name)))?;
                outputs.insert(t.name.clone(), decode(&t.dtype, &b));
            }
            samples.push(Sample { inputs, outputs });
        }
        Ok(Fixture { name: name.into(), dir, meta, samples })
    }

    pub fn model_path(&self) -> PathBuf {
        self.dir.join("model.onnx")
    }

    /// A `[pipelines.NAME]` table serving this fixture on `input`, results on `output`, plus
    /// `extra` TOML lines (keys of the pipeline table, then any sub-tables).
    pub fn pipeline(&self, name: &str, input: &str, output: &str, extra: &str) -> String {
        // EDGEINFER_TEST_PRECISION (test-only knob): pins `precision` for every fixture pipeline,
        // so tools/test-aarch64.sh can run the same tests once in f32 and once as `auto` picks
        // (f16 under qemu -cpu max).
        let precision = match std::env::var("EDGEINFER_TEST_PRECISION") {
            Ok(p) if !p.is_empty() && !extra.contains("precision =") => {
                format!("precision = {p:?}\n")
            }
            _ => String::new(),
        };
        format!(
            "[pipelines.{name}]\nmodel = {:?}\ninput = {input:?}\noutput = {output:?}\n{precision}{extra}\n",
            self.model_path().display().to_string()
        )
    }

    /// A sample as a JSON frame: `data` for single-input models, named `inputs` otherwise.
    pub fn json_frame(&self, sample: usize, seq: u64) -> String {
        let s = &self.samples[sample];
        let value = |t: &TensorMeta| -> Value {
            let vals = decode(&t.dtype, &s.inputs[&t.name]);
            if t.dtype.starts_with('f') {
                Value::from(vals)
            } else {
                Value::from(vals.into_iter().map(|v| v as i64).collect::<Vec<_>>())
            }
        };
        let v = if self.meta.inputs.len() == 1 {
            serde_json::json!({"seq": seq, "ts": 1.0e12, "data": value(&self.meta.inputs[0])})
        } else {
            let named: serde_json::Map<String, Value> =
                self.meta.inputs.iter().map(|t| (t.name.clone(), value(t))).collect();
            serde_json::json!({"seq": seq, "inputs": named})
        };
        v.to_string()
    }

    /// Checks a result message's outputs against the reference: every output present with the
    /// right shape, and max |a-b| <= tolerance() * max(1, max|ref|).
    pub fn check_result(&self, sample: usize, result: &Value) -> Result<()> {
        let outs = result["outputs"].as_array().ok_or_else(|| anyhow!("no outputs in {result}"))?;
        for t in &self.meta.outputs {
            let o = outs
                .iter()
                .find(|o| o["name"] == t.name.as_str())
                .ok_or_else(|| anyhow!("output {} missing", t.name))?;
            let shape: Vec<usize> = serde_json::from_value(o["shape"].clone())?;
            if shape != t.shape {
                bail!("output {} shape {:?} != {:?}", t.name, shape, t.shape);
            }
            let got: Vec<f64> = o["data"]
                .as_array()
                .ok_or_else(|| anyhow!("no data"))?
                .iter()
                .map(|x| x.as_f64().unwrap_or(f64::NAN))
                .collect();
            let want = &self.samples[sample].outputs[&t.name];
            if got.len() != want.len() {
                bail!("output {} has {} values, want {}", t.name, got.len(), want.len());
            }
            let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
            let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
            let tol = tolerance() * scale;
            if worst.is_nan() || worst > tol {
                bail!(
                    "{} sample {sample} output {}: max abs diff {worst} > {tol}",
                    self.name,
                    t.name
                );
            }
        }
        Ok(())
    }
}
