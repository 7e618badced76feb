"""Helpers shared by service.py and ort_bench.py: onnxruntime sessions, dtypes, concrete shapes.

Kept dependency-free beyond numpy + onnxruntime so both scripts can be copied to a device as
one directory.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

# onnxruntime type strings -> numpy dtypes (little-endian: the wire format of raw frames).
ORT_DTYPES = {
    "tensor(float)": np.dtype("<f4"),
    "tensor(double)": np.dtype("<f8"),
    "tensor(float16)": np.dtype("<f2"),
    "tensor(int8)": np.dtype("i1"),
    "tensor(int16)": np.dtype("<i2"),
    "tensor(int32)": np.dtype("<i4"),
    "tensor(int64)": np.dtype("<i8"),
    "tensor(uint8)": np.dtype("u1"),
    "tensor(uint16)": np.dtype("<u2"),
    "tensor(uint32)": np.dtype("<u4"),
    "tensor(uint64)": np.dtype("<u8"),
    "tensor(bool)": np.dtype("?"),
}


class ModelError(Exception):
    """The model cannot be served as asked (unsupported dtype, unresolved shape...)."""


def parse_shape_overrides(items: list[str] | None) -> dict[str, list[int]]:
    """`["accel=1,3,128", ...]` -> `{"accel": [1, 3, 128]}` (argparse-friendly errors)."""
    out: dict[str, list[int]] = {}
    for item in items or []:
        name, sep, dims = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--input-shape {item!r}: expected NAME=D1,D2,...")
        try:
            shape = [int(d) for d in dims.split(",") if d.strip() != ""]
        except ValueError:
            raise ValueError(f"--input-shape {item!r}: dimensions must be integers") from None
        if any(d < 0 for d in shape):
            raise ValueError(f"--input-shape {item!r}: dimensions must be >= 0")
        out[name] = shape
    return out


def make_session(model: str, threads: int = 1) -> ort.InferenceSession:
    """A CPU session: `threads` intra-op threads, one inter-op thread, sequential execution."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # errors only: keep stdout/stderr clean for the harness
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


class InputSpec:
    """One model input with a concrete shape and a numpy dtype."""

    def __init__(self, name: str, dtype: np.dtype, shape: tuple[int, ...], declared: list):
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.declared = declared
        self.count = int(np.prod(shape, dtype=np.int64))
        self.nbytes = self.count * dtype.itemsize

    def describe(self) -> str:
        return f"{self.name} {self.dtype.name} {list(self.shape)} ({self.nbytes} bytes)"

    def zeros(self) -> np.ndarray:
        return np.zeros(self.shape, dtype=self.dtype.newbyteorder("="))


def input_specs(session: ort.InferenceSession, overrides: dict[str, list[int]] | None = None) -> list[InputSpec]:
    """Concrete input shapes: a symbolic/unknown leading (batch) dim becomes 1; any other
    symbolic dim must be given in `overrides` (as with the daemon's `input_shapes`)."""
    overrides = dict(overrides or {})
    specs = []
    for inp in session.get_inputs():
        if inp.type not in ORT_DTYPES:
            raise ModelError(f"input {inp.name!r}: unsupported type {inp.type}")
        declared = list(inp.shape)
        if inp.name in overrides:
            shape = overrides.pop(inp.name)
            if len(shape) != len(declared):
                raise ModelError(
                    f"input {inp.name!r}: override {shape} has rank {len(shape)}, model declares {declared}"
                )
            for want, have in zip(declared, shape, strict=True):
                if isinstance(want, int) and want >= 0 and want != have:
                    raise ModelError(f"input {inp.name!r}: override {shape} contradicts declared {declared}")
        else:
            shape = []
            for i, d in enumerate(declared):
                if isinstance(d, int) and d >= 0:
                    shape.append(d)
                elif i == 0:
                    shape.append(1)  # symbolic or unknown batch axis
                else:
                    raise ModelError(
                        f"input {inp.name!r}: dim {i} of {declared} is symbolic; "
                        f"give it with --input-shape {inp.name}=..."
                    )
        specs.append(InputSpec(inp.name, ORT_DTYPES[inp.type], tuple(shape), declared))
    if overrides:
        names = [s.name for s in specs]
        raise ModelError(f"--input-shape names unknown input(s) {sorted(overrides)}; model inputs: {names}")
    return specs
