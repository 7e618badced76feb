#!/usr/bin/env python3
"""Train the bundled edgeinfer demo model (8x8 handwritten digits) and export it to ONNX.

Outputs (in daemon/assets/demo/, relative to the repo root):
  digits.onnx      MLP classifier: pixels f32[1,64] -> probabilities f32[1,10]
  labels.txt       class labels, one per line ("0".."9")
  samples.f32      held-out test images, raw little-endian f32, shape [N,64], scaled to [0,1]
  samples.labels   N bytes, u8 true label of each test image
  README.md        description of the above

The ONNX graph is assembled by hand with onnx.helper (no skl2onnx) so that it only
contains MatMul/Add/Relu/Softmax, has a fixed (non-symbolic) input shape and no ZipMap.

Usage: python tools/demo-model/train_digits.py
"""

import os

# Pin BLAS to one thread before numpy is imported: multi-threaded GEMM may split
# reductions differently between runs, and we want byte-identical weights on re-runs.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pathlib
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT_DIR = REPO_ROOT / "daemon" / "assets" / "demo"

SEED = 0
HIDDEN = 64
OPSET = 13
# Kept at 8 so older ONNX consumers (tract included) accept the file regardless of
# which onnx package version writes it.
IR_VERSION = 8


def load_split():
    """Stratified 75/25 split of sklearn's bundled digits, pixels scaled to [0,1]."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)


def train(x_train, y_train):
    clf = MLPClassifier(
        hidden_layer_sizes=(HIDDEN,),
        activation="relu",
        solver="adam",
        alpha=1e-4,
        max_iter=400,
        random_state=SEED,
    )
    # A capped iteration count is fine for this demo; don't spam the console about it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, y_train)
    return clf


def build_onnx(clf) -> onnx.ModelProto:
    """Re-express the fitted MLP as a plain ONNX graph."""
    w1, w2 = (w.astype(np.float32) for w in clf.coefs_)
    b1, b2 = (b.astype(np.float32) for b in clf.intercepts_)
    n_in, n_out = w1.shape[0], w2.shape[1]
    assert (n_in, n_out) == (64, 10), (n_in, n_out)

    initializers = [
        numpy_helper.from_array(w1, "fc1.weight"),
        numpy_helper.from_array(b1, "fc1.bias"),
        numpy_helper.from_array(w2, "fc2.weight"),
        numpy_helper.from_array(b2, "fc2.bias"),
    ]
    nodes = [
        helper.make_node("MatMul", ["pixels", "fc1.weight"], ["fc1.mm"], name="fc1_matmul"),
        helper.make_node("Add", ["fc1.mm", "fc1.bias"], ["fc1.out"], name="fc1_add"),
        helper.make_node("Relu", ["fc1.out"], ["hidden"], name="relu"),
        helper.make_node("MatMul", ["hidden", "fc2.weight"], ["fc2.mm"], name="fc2_matmul"),
        helper.make_node("Add", ["fc2.mm", "fc2.bias"], ["logits"], name="fc2_add"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        inputs=[helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, n_in])],
        outputs=[helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, n_out])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edgeinfer-tools",
        producer_version="1",
        model_version=1,
        doc_string=(
            "edgeinfer demo: MLP (64-64-10, ReLU) classifying 8x8 handwritten digits "
            "(scikit-learn load_digits). Input 'pixels': f32[1,64], row-major 8x8 image, "
            "values in [0,1] (raw 0..16 intensities divided by 16). Output "
            "'probabilities': f32[1,10], softmax over digits 0..9."
        ),
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"name": "digits"})
    onnx.checker.check_model(model, full_check=True)
    return model


def ort_session(model_bytes: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def main() -> int:
    x_train, x_test, y_train, y_test = load_split()
    clf = train(x_train, y_train)
    sk_acc = float(clf.score(x_test, y_test))

    model = build_onnx(clf)
    model_bytes = model.SerializeToString()

    # The model has a fixed batch of 1, so evaluate one image at a time.
    sess = ort_session(model_bytes)
    probs = np.concatenate([sess.run(None, {"pixels": row[None, :]})[0] for row in x_test])
    ort_pred = probs.argmax(axis=1)
    ort_acc = float((ort_pred == y_test).mean())
    agree = float((ort_pred == clf.predict(x_test)).mean())
    max_prob_diff = float(np.abs(probs - clf.predict_proba(x_test)).max())

    print(f"train samples: {len(x_train)}, test samples: {len(x_test)}")
    print(f"sklearn test accuracy:     {sk_acc:.4f}")
    print(f"onnxruntime test accuracy: {ort_acc:.4f}")
    print(f"prediction agreement: {agree:.4f}, max |p_ort - p_sklearn| = {max_prob_diff:.2e}")
    if agree != 1.0 or max_prob_diff > 1e-4:
        print("ERROR: ONNX export disagrees with sklearn", file=sys.stderr)
        return 1

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "digits.onnx").write_bytes(model_bytes)
    (OUT_DIR / "labels.txt").write_text("".join(f"{d}\n" for d in range(10)))
    # Explicit '<f4' so the file is little-endian regardless of the host.
    (OUT_DIR / "samples.f32").write_bytes(np.ascontiguousarray(x_test, dtype="<f4").tobytes())
    (OUT_DIR / "samples.labels").write_bytes(y_test.astype(np.uint8).tobytes())
    (OUT_DIR / "README.md").write_text(readme(len(x_test), ort_acc))
    print(f"wrote {OUT_DIR.relative_to(REPO_ROOT)}/")
    return 0


def readme(n_test: int, acc: float) -> str:
    return f"""# edgeinfer demo model: handwritten digits

Generated by `tools/demo-model/train_digits.py` — do not edit by hand.

| File | Contents |
|------|----------|
| `digits.onnx` | MLP classifier (64 → 64 ReLU → 10 softmax), ONNX opset {OPSET}. Input `pixels`: f32 `[1,64]` (an 8×8 image, row-major, values in [0,1]). Output `probabilities`: f32 `[1,10]`, softmax over the digits 0–9. Metadata: producer `edgeinfer-tools`, model_version 1, property `name`=`digits`. |
| `labels.txt` | The 10 class labels, one per line, in output order (`0` … `9`). |
| `samples.f32` | The {n_test} held-out test images: raw little-endian f32, C-order, shape `[{n_test},64]`, already scaled to [0,1]. Each 256-byte record is one model input. |
| `samples.labels` | {n_test} bytes: the true digit (u8) of each image in `samples.f32`, same order. |

Training data: scikit-learn's bundled `load_digits` (1797 8×8 images, pixel
intensities 0–16, divided by 16). Stratified 75/25 train/test split
(`random_state=0`); scikit-learn `MLPClassifier(hidden_layer_sizes=(64,),
activation="relu", max_iter=400, random_state=0)`. The weights are then written into a
hand-built ONNX graph (MatMul+Add, Relu, MatMul+Add, Softmax).

Test accuracy (onnxruntime, on `samples.f32`): **{acc:.4f}** ({round(acc * n_test)}/{n_test}).

## Regenerating

From the repository root, with the pinned environment from
`tests/fixtures/models/requirements.txt`:

```sh
python3 -m venv .venv
.venv/bin/pip install -r tests/fixtures/models/requirements.txt
.venv/bin/python tools/demo-model/train_digits.py
```

The output is deterministic (fixed seeds, single-threaded BLAS). If you regenerate,
also re-run `tests/fixtures/models/generate.py`, since the `digits` test fixture is
a byte-for-byte copy of `digits.onnx`.
"""


if __name__ == "__main__":
    sys.exit(main())
