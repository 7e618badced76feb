//! Allocation discipline: the daemon's own hot path (decode -> queue -> worker copy -> result
//! serialization -> hand-off to the publisher) allocates nothing per frame in steady state;
//! image frames add only the JPEG/PNG decoders' own state, never a pixel buffer.
//!
//! A counting global allocator counts every allocation in this process. The test drives one
//! pipeline on the `digits` fixture frame by frame on one thread, with a publisher that only
//! counts, and subtracts what tract's own `run` allocates (measured separately on the same
//! model). Its own binary, because a global allocator is process-wide.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use edgeinfer::config::{Config, Qos};
use edgeinfer::model::{LoadOptions, Model};
use edgeinfer::pipeline::output::ResultWriter;
use edgeinfer::pipeline::queue::Pop;
use edgeinfer::pipeline::{Pipeline, Scratch};
use edgeinfer::publish::{PublishError, Publisher};

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

/// Counts allocations and reallocations, then defers to the system allocator.
struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; counting is a
// relaxed atomic increment, which neither allocates nor touches the memory handed out.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(l.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged (see the impl comment).
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(l.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(n as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(p, l, n) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.load(Ordering::Relaxed)
}

fn bytes_allocated() -> u64 {
    BYTES.load(Ordering::Relaxed)
}

/// Takes results and counts them; allocates nothing.
struct CountingPublisher(AtomicU64);

impl Publisher for CountingPublisher {
    fn publish(&self, _: &str, payload: &[u8], _: Qos, _: bool) -> Result<(), PublishError> {
        assert!(!payload.is_empty());
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn try_publish(&self, _: &str, _: Vec<u8>, _: Qos, _: bool) -> Result<(), PublishError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn fixture(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models").join(rel)
}

/// One pipeline driven frame by frame on this thread: ingest, pop, serve, with a counting
/// publisher.
struct Rig {
    p: Pipeline,
    model: Model,
    filter: edgeinfer::topic::TopicFilter,
    session: edgeinfer::model::Session,
    writer: ResultWriter,
    scratch: Scratch,
    publisher: CountingPublisher,
}

impl Rig {
    /// The first pipeline of config `text`, with `labels`.
    fn new(text: &str, labels: Vec<String>) -> Rig {
        let cfg = Config::parse_str(text, "alloc test", None).expect("config");
        let pc = cfg.pipelines[0].clone();
        let model =
            Model::load(&pc.model, &LoadOptions { name: pc.name.clone(), ..Default::default() })
                .expect("model");
        let p = Pipeline::new(
            pc.clone(),
            model.clone(),
            labels.clone(),
            &cfg.device_id,
            &cfg.errors,
            cfg.metrics.max_clock_skew,
        )
        .expect("pipeline");
        Rig {
            session: model.session().expect("session"),
            writer: ResultWriter::new(pc.postprocess.clone(), labels, &model).expect("writer"),
            filter: pc.input.clone(),
            scratch: Scratch::default(),
            publisher: CountingPublisher(AtomicU64::new(0)),
            model,
            p,
        }
    }

    fn serve(&mut self, topic: String, payload: Bytes) {
        let caps = self.filter.matches(&topic).expect("match");
        assert!(self.p.ingest(topic, caps, payload, &self.publisher).is_none());
        match self.p.queue.pop(Duration::ZERO) {
            Pop::Item(frame) => self.p.serve_frame(
                &mut self.session,
                &mut self.writer,
                &mut self.scratch,
                frame,
                &self.publisher,
            ),
            other => panic!("expected a frame, got {other:?}"),
        }
        self.p.queue.done();
    }

    fn published(&self) -> usize {
        self.publisher.0.load(Ordering::Relaxed) as usize
    }

    /// (allocations, bytes) of `frames` runs of tract alone, on a second warmed session.
    fn tract(&self, frames: usize) -> (u64, u64) {
        let mut s2 = self.model.session().expect("session");
        for _ in 0..10 {
            s2.run().expect("run");
        }
        let (a, b) = (allocs(), bytes_allocated());
        for _ in 0..frames {
            s2.run().expect("run");
        }
        (allocs() - a, bytes_allocated() - b)
    }
}

/// Image frames on the mobilenet fixture: (allocations per frame, bytes per frame) of the
/// daemon's path (ingest, worker decode + pre-processing into the tensor, result), tract's own
/// run subtracted.
fn measure_image(format: &str, file: &str, extra: &str, frames: usize) -> (f64, f64) {
    let mut rig = Rig::new(
        &format!(
            "device_id = \"a\"\n[pipelines.cam]\nmodel = {:?}\ninput = \"s/+\"\noutput = \"r/{{1}}\"\n\
             format = \"{format}\"\nmax_payload = \"1MiB\"\n[pipelines.cam.preprocess]\n\
             resize = {{ width = 256, height = 256 }}\ncenter_crop = {{ width = 224, height = 224 }}\n\
             scale = 0.00392156862745098\n{extra}",
            fixture("mobilenet/model.onnx").display().to_string()
        ),
        Vec::new(),
    );
    let data =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/images").join(file))
            .expect("image");
    for _ in 0..5 {
        rig.serve("s/dev1".to_string(), Bytes::from(data.clone()));
    }
    let inputs: Vec<(String, Bytes)> =
        (0..frames).map(|_| ("s/dev1".to_string(), Bytes::from(data.clone()))).collect();
    let (a0, b0) = (allocs(), bytes_allocated());
    for (t, b) in inputs {
        rig.serve(t, b);
    }
    let (a1, b1) = (allocs(), bytes_allocated());
    assert_eq!(rig.published(), 5 + frames, "every frame served");
    let (ta, tb) = rig.tract(frames);
    let n = frames as f64;
    (((a1 - a0) as f64 - ta as f64) / n, ((b1 - b0) as f64 - tb as f64) / n)
}

/// (allocations per frame on the whole path, allocations per tract run) for `format`.
fn measure(format: &str, frames: usize) -> (f64, f64) {
    let mut rig = Rig::new(
        &format!(
            "device_id = \"a\"\n[pipelines.digits]\nmodel = {:?}\ninput = \"s/+\"\noutput = \"r/{{1}}\"\nformat = \"{format}\"\n\
             max_age = \"10s\"\ndeadline = \"10s\"\n\
             [pipelines.digits.slo]\nlatency = \"10s\"\nserved = 0.99\n\
             [pipelines.digits.overload]\nadaptive = true\n\
             [pipelines.digits.queue]\ncapacity = 8\n[pipelines.digits.postprocess]\nkind = \"classification\"\ntop_k = 3\n",
            fixture("digits/model.onnx").display().to_string()
        ),
        (0..10).map(|i| i.to_string()).collect(),
    );
    let input = std::fs::read(fixture("digits/samples/003/input.pixels.bin")).expect("input");
    let floats: Vec<f32> =
        input.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    // Everything that arrives from the network (topic string, payload buffer) is made before
    // counting: rumqttc allocates those when it reads a packet.
    let make = |seq: usize| -> (String, Bytes) {
        let payload = match format {
            "raw" => Bytes::from(input.clone()),
            _ => Bytes::from(serde_json::json!({"seq": seq, "data": floats}).to_string()),
        };
        ("s/dev1".to_string(), payload)
    };
    // Warm up: buffers reach their steady-state capacity.
    for seq in 0..50 {
        let (t, b) = make(seq);
        rig.serve(t, b);
    }
    // New seqs: the same seq and payload again would be a redelivery, dropped as a duplicate.
    let inputs: Vec<(String, Bytes)> = (50..50 + frames).map(make).collect();
    let before = allocs();
    for (t, b) in inputs {
        rig.serve(t, b);
    }
    let path = (allocs() - before) as f64 / frames as f64;
    assert_eq!(rig.published(), 50 + frames, "every frame served");
    // tract's own allocations per run, on a second session of the same model.
    let tract = rig.tract(frames).0 as f64 / frames as f64;
    (path, tract)
}

/// One test: the allocation counter is process-wide, so measurements must not overlap.
#[test]
fn hot_path_allocations() {
    let (path, tract) = measure("raw", 500);
    eprintln!("raw frames: {path:.2} allocations per frame in total, tract's run {tract:.2}");
    assert_eq!(
        path, tract,
        "the daemon's own raw path must not allocate per frame (total {path}, tract {tract})"
    );

    let (path, tract) = measure("json", 200);
    let own = path - tract;
    eprintln!(
        "json frames: {path:.2} allocations per frame in total, tract's run {tract:.2}, decoding {own:.2}"
    );
    // JSON decoding allocates its output buffer (and serde_json its scratch) per frame; keep it
    // small and visible rather than pretend it is zero.
    assert_eq!(own, 1.0, "JSON decoding should allocate exactly its output buffer per frame");

    // Raw image frames: the plan writes straight into the tensor from the packet buffer.
    let raw = "[pipelines.cam.raw]\nwidth = 300\nheight = 200\nchannels = 3\n";
    let (n, bytes) = measure_image("raw", "scene_png.pixels.u8", raw, 20);
    eprintln!("raw image frames: {n:.2} allocations ({bytes:.0} bytes) per frame besides tract");
    assert_eq!(n, 0.0, "raw image frames must not allocate per frame");
    // Encoded frames: the decoders build state of their own per image, but the decoded pixels
    // go into the worker's reused buffer. zune-jpeg: ~17 allocations, ~110 KB (Huffman and
    // component buffers) for a 640x480 frame whose pixels are 921,600 bytes. png: ~7
    // allocations, ~360 KB whatever the image size (its unfiltering buffer starts at 128 KiB,
    // plus the 32 KiB zlib window and inflate tables), freed after each frame.
    let (n, bytes) = measure_image("jpeg", "scene.jpg", "", 20);
    eprintln!("jpeg frames: {n:.1} allocations ({bytes:.0} bytes) per frame besides tract");
    assert!(bytes < 921_600.0 / 4.0, "jpeg: {bytes} bytes per frame, pixels are reused");
    let (n, bytes) = measure_image("png", "scene.png", "", 20);
    eprintln!("png frames: {n:.1} allocations ({bytes:.0} bytes) per frame besides tract");
    assert!(bytes < 512.0 * 1024.0, "png: {bytes} bytes per frame of decoder state");
}
