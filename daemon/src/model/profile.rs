//! Where a model's inference time goes: tract's optimized plan run node by node with a timer
//! around each node's evaluation (the same hook tract's own `--profile` uses), medians over runs,
//! grouped by operator type. What `edgeinfer inspect --profile` prints.
//!
//! It times the plan the daemon runs (same load options, same executor), on a deterministic
//! sample input (see [`super::Session::fill_sample`]) rather than zeros, so data-dependent ops
//! (NMS, TopK, non-zero) do representative work. The timer costs two clock reads per node
//! (tens of nanoseconds), which the whole-run median includes and the per-node figures do not.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{Model, ModelError};

/// One node of the optimized plan with its median evaluation time.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeTime {
    /// Node id in the optimized plan.
    pub id: usize,
    pub name: String,
    /// tract's operator name in the optimized plan (`OptMatMul`, `DepthWise`, `Add`...), not the
    /// ONNX operator the node came from.
    pub op: String,
    pub median: Duration,
}

/// Time of all nodes of one operator type.
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    pub op: String,
    pub nodes: usize,
    /// Sum of the nodes' medians.
    pub time: Duration,
}

/// Per-node timing of a plan over `runs` runs.
#[derive(Debug, Clone)]
pub struct Profile {
    pub runs: usize,
    /// Every run timed end to end (node timers included), in run order.
    pub run_times: Vec<Duration>,
    /// Evaluated nodes in plan order.
    pub nodes: Vec<NodeTime>,
}

fn median(v: &mut [Duration]) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    v[v.len() / 2]
}

impl Profile {
    /// Median whole-run time.
    pub fn median_run(&self) -> Duration {
        median(&mut self.run_times.clone())
    }

    /// Sum of the per-node medians: what the shares are relative to.
    pub fn node_total(&self) -> Duration {
        self.nodes.iter().map(|n| n.median).sum()
    }

    /// `d` as a fraction of [`Profile::node_total`].
    pub fn share(&self, d: Duration) -> f64 {
        d.as_secs_f64() / self.node_total().as_secs_f64().max(1e-12)
    }

    /// Time per operator type, most expensive first (ties by name).
    pub fn by_op(&self) -> Vec<OpTime> {
        let mut m: BTreeMap<&str, (usize, Duration)> = BTreeMap::new();
        for n in &self.nodes {
            let e = m.entry(n.op.as_str()).or_default();
            e.0 += 1;
            e.1 += n.median;
        }
        let mut v: Vec<OpTime> = m
            .into_iter()
            .map(|(op, (nodes, time))| OpTime { op: op.to_string(), nodes, time })
            .collect();
        v.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| a.op.cmp(&b.op)));
        v
    }

    /// The `n` most expensive nodes, most expensive first (ties in plan order).
    pub fn top(&self, n: usize) -> Vec<&NodeTime> {
        let mut v: Vec<&NodeTime> = self.nodes.iter().collect();
        v.sort_by_key(|n| std::cmp::Reverse(n.median));
        v.truncate(n);
        v
    }

    /// Machine-readable form (`inspect --profile --json`): times in microseconds, with every
    /// node so tools can compare with onnxruntime's per-node profile.
    pub fn to_json(&self, top: usize) -> serde_json::Value {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let node = |n: &NodeTime| {
            serde_json::json!({
                "id": n.id, "name": n.name, "op": n.op, "us": us(n.median),
                "share": self.share(n.median),
            })
        };
        serde_json::json!({
            "runs": self.runs,
            "median_run_us": us(self.median_run()),
            "node_total_us": us(self.node_total()),
            "by_op": self.by_op().iter().map(|o| serde_json::json!({
                "op": o.op, "nodes": o.nodes, "us": us(o.time), "share": self.share(o.time),
            })).collect::<Vec<_>>(),
            "top": self.top(top).into_iter().map(node).collect::<Vec<_>>(),
            "nodes": self.nodes.iter().map(node).collect::<Vec<_>>(),
        })
    }

    /// The human-readable table: operator types, then the `top` most expensive nodes.
    pub fn text(&self, top: usize) -> String {
        use std::fmt::Write;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "profile   {} runs: median run {:.3} ms, sum of node medians {:.3} ms, {} nodes",
            self.runs,
            ms(self.median_run()),
            ms(self.node_total()),
            self.nodes.len()
        );
        let _ = writeln!(s, "  by operator type        time (ms)   share  nodes");
        for o in self.by_op() {
            let _ = writeln!(
                s,
                "    {:<22} {:>9.3}  {:>5.1}%  {:>5}",
                o.op,
                ms(o.time),
                100.0 * self.share(o.time),
                o.nodes
            );
        }
        let _ = writeln!(s, "  top {} nodes", top.min(self.nodes.len()));
        for n in self.top(top) {
            let _ = writeln!(
                s,
                "    #{:<5} {:<40} {:<16} {:>9.3} ms  {:>5.1}%",
                n.id,
                n.name,
                n.op,
                ms(n.median),
                100.0 * self.share(n.median)
            );
        }
        s
    }
}

impl Model {
    /// Runs the plan `runs` times (after one untimed run) with a timer around every node, on
    /// the sample input. Medians per node.
    pub fn profile(&self, runs: usize) -> Result<Profile, ModelError> {
        let runs = runs.max(1);
        let mut session = self.session()?;
        session.fill_sample();
        session.run()?;
        let n = self.plan.model().nodes().len();
        let mut per_run = vec![Duration::ZERO; n];
        let mut evaluated = vec![false; n];
        let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(runs); n];
        let mut run_times = Vec::with_capacity(runs);
        for _ in 0..runs {
            per_run.fill(Duration::ZERO);
            let t = Instant::now();
            session.run_timed(&mut per_run, &mut evaluated)?;
            run_times.push(t.elapsed());
            for (s, d) in samples.iter_mut().zip(&per_run) {
                s.push(*d);
            }
        }
        let model = self.plan.model();
        let nodes = (0..n)
            .filter(|id| evaluated[*id])
            .map(|id| {
                let node = model.node(id);
                NodeTime {
                    id,
                    name: node.name.clone(),
                    op: node.op.name().to_string(),
                    median: median(&mut samples[id]),
                }
            })
            .collect();
        Ok(Profile { runs, run_times, nodes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LoadOptions;
    use std::path::Path;

    fn node(id: usize, op: &str, us: u64) -> NodeTime {
        NodeTime { id, name: format!("n{id}"), op: op.into(), median: Duration::from_micros(us) }
    }

    #[test]
    fn grouping_shares_and_top_nodes() {
        let p = Profile {
            runs: 3,
            run_times: vec![
                Duration::from_micros(120),
                Duration::from_micros(100),
                Duration::from_micros(500),
            ],
            nodes: vec![
                node(0, "Conv", 30),
                node(1, "Add", 10),
                node(2, "Conv", 50),
                node(3, "Relu", 10),
            ],
        };
        assert_eq!(p.median_run(), Duration::from_micros(120));
        assert_eq!(p.node_total(), Duration::from_micros(100));
        let ops = p.by_op();
        assert_eq!(
            ops.iter().map(|o| (o.op.as_str(), o.nodes, o.time.as_micros())).collect::<Vec<_>>(),
            vec![("Conv", 2, 80), ("Add", 1, 10), ("Relu", 1, 10)]
        );
        assert!((p.share(ops[0].time) - 0.8).abs() < 1e-9);
        assert_eq!(p.top(2).iter().map(|n| n.id).collect::<Vec<_>>(), vec![2, 0]);
        let text = p.text(2);
        assert!(text.contains("Conv") && text.contains("80.0%"), "{text}");
        let j = p.to_json(1);
        assert_eq!(j["top"].as_array().map(Vec::len), Some(1));
        assert_eq!(j["nodes"].as_array().map(Vec::len), Some(4));
    }

    #[test]
    fn profiling_a_real_model_times_every_evaluated_node() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/sensor_cnn/model.onnx");
        let m = Model::load(&path, &LoadOptions::default()).expect("load");
        let p = m.profile(5).expect("profile");
        assert_eq!((p.runs, p.run_times.len()), (5, 5));
        assert!(p.nodes.len() >= 5, "{:?}", p.nodes);
        assert!(p.nodes.iter().all(|n| n.id < m.optimized_nodes));
        // Nodes are timed inside the runs: a node's median is at most the sum of its times over
        // the runs at or above the median (runs - runs/2 of them), so the medians add up to at
        // most all run time over that count.
        let bound = p.run_times.iter().sum::<Duration>() / (5 - 5 / 2);
        assert!(p.node_total() <= bound, "{:?} > {bound:?}", p.node_total());
        assert!(p.node_total() > Duration::ZERO);
        assert!(p.by_op().iter().map(|o| o.nodes).sum::<usize>() == p.nodes.len());
    }
}
