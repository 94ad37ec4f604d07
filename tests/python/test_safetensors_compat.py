"""Cross-check of squeeze's safetensors reader/writer with the reference
Python implementation (the `safetensors` package, Rust underneath) and numpy.

Driven by scripts/pycheck.sh, which sets SQZ_PYCHECK_DIR and runs, in order:
  1. sqz_tools_tests --gtest_filter=PyCheck.WriteCppFiles
       C++ writes $SQZ_PYCHECK_DIR/cpp/*.safetensors and dumps of what its
       reader (SafetensorsFile) gets from them, listed in cpp/manifest.txt;
  2. this file (plain `python test_safetensors_compat.py`, or pytest):
       checks that Python reads the C++ files identically, that the C++
       float -> fp16/bf16 rounding matches numpy's, and writes
       $SQZ_PYCHECK_DIR/py/*.safetensors with their manifest;
  3. sqz_tools_tests --gtest_filter=PyCheck.ReadPythonFiles
       C++ reads the Python files and compares with that manifest.

Manifest lines (names and metadata hex-encoded, "-" for empty):
  tensor <file> <hex name> <dtype> <dims "a,b,c" or "-"> <f32 dump or "-"> <raw dump>
  meta <file> <hex key> <hex value>
"""

import os
import sys

import numpy as np
import safetensors
import safetensors.numpy
from safetensors import safe_open

NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I32": np.int32}
# Spelling of dtypes in safetensors.TensorSpec (>= 0.8).
LONG_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I32": "int32"}


def _dir(sub):
    root = os.environ.get("SQZ_PYCHECK_DIR")
    assert root, "SQZ_PYCHECK_DIR is not set (run scripts/pycheck.sh)"
    return os.path.join(root, sub)


def _hex(s):
    b = s.encode("utf-8") if isinstance(s, str) else s
    return b.hex() or "-"


def _unhex(h):
    return b"" if h == "-" else bytes.fromhex(h)


def read_manifest(d):
    tensors, metas = {}, {}
    with open(os.path.join(d, "manifest.txt")) as f:
        for line in f:
            parts = line.split()
            if parts[0] == "tensor":
                _, file, name, dtype, dims, f32, raw = parts
                shape = [] if dims == "-" else [int(x) for x in dims.split(",")]
                tensors.setdefault(file, {})[_unhex(name).decode("utf-8")] = (dtype, shape, f32, raw)
            elif parts[0] == "meta":
                _, file, k, v = parts
                metas.setdefault(file, {})[_unhex(k).decode("utf-8")] = _unhex(v).decode("utf-8")
            else:
                raise AssertionError("bad manifest line: " + line)
    return tensors, metas


def _load_dump(d, name, dtype=np.uint8):
    with open(os.path.join(d, name), "rb") as f:
        return np.frombuffer(f.read(), dtype=dtype)


def bf16_bits_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x):
    """Round-to-nearest-even float32 -> bf16, NaN kept NaN (numpy has no bf16)."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)


def assert_same_floats(got, want, what):
    got = np.asarray(got, dtype=np.float32).ravel()
    want = np.asarray(want, dtype=np.float32).ravel()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    gn, wn = np.isnan(got), np.isnan(want)
    assert np.array_equal(gn, wn), (what, "NaN positions differ")
    same = got.view(np.uint32)[~gn] == want.view(np.uint32)[~wn]
    assert same.all(), (what, "first mismatch at", int(np.argmin(same)), got[~gn][~same][:5], want[~wn][~same][:5])


# ---------------------------------------------------------------------------
# 1. Files written by the C++ side
# ---------------------------------------------------------------------------


def test_cpp_files_read_by_safetensors():
    d = _dir("cpp")
    tensors, metas = read_manifest(d)
    assert {"cpp_F32.safetensors", "cpp_F16.safetensors", "cpp_BF16.safetensors", "synth.safetensors"} <= set(tensors)
    for file, expect in tensors.items():
        path = os.path.join(d, file)
        with open(path, "rb") as f:
            blob = f.read()
        # The Rust deserializer validates the header and the data layout
        # (contiguous, no holes, exact sizes) and returns every dtype raw.
        parsed = {name: info for name, info in safetensors.deserialize(blob)}
        assert set(parsed) == set(expect), (file, sorted(parsed), sorted(expect))
        with safe_open(path, framework="np") as f:
            assert (f.metadata() or {}) == metas.get(file, {}), (file, f.metadata(), metas.get(file))
        arrays = None
        if all(dt in NUMPY_DTYPES for dt, *_ in expect.values()):
            arrays = safetensors.numpy.load_file(path)
        for name, (dtype, shape, f32, raw) in expect.items():
            what = f"{file}:{name}"
            info = parsed[name]
            assert info["dtype"] == dtype, (what, info["dtype"], dtype)
            assert list(info["shape"]) == shape, (what, info["shape"], shape)
            assert bytes(info["data"]) == _load_dump(d, raw).tobytes(), (what, "raw bytes differ")
            if f32 == "-":
                continue
            want = _load_dump(d, f32, np.float32)  # what SafetensorsFile::ReadFloat returned
            if dtype == "BF16":
                bits = np.frombuffer(bytes(info["data"]), dtype=np.uint16)
                assert_same_floats(bf16_bits_to_f32(bits), want, what)
            else:
                a = arrays[name]
                assert a.dtype == NUMPY_DTYPES[dtype], (what, a.dtype)
                assert list(a.shape) == shape, (what, a.shape)
                # numpy's fp16 -> fp32 against our HalfToFloat.
                assert_same_floats(a.astype(np.float32), want, what)


def test_cpp_rounding_matches_numpy():
    """The C++ writer's float -> F16/BF16 rounding equals numpy's (F16) and
    the round-to-nearest-even definition (BF16), NaN positions included."""
    d = _dir("cpp")
    src = safetensors.numpy.load_file(os.path.join(d, "cpp_F32.safetensors"))
    f16 = safetensors.numpy.load_file(os.path.join(d, "cpp_F16.safetensors"))
    with open(os.path.join(d, "cpp_BF16.safetensors"), "rb") as f:
        bf16 = {n: i for n, i in safetensors.deserialize(f.read())}
    for name, x in src.items():
        with np.errstate(over="ignore", invalid="ignore"):
            want16 = x.astype(np.float16)
        got16 = f16[name]
        nan = np.isnan(want16)
        assert np.array_equal(np.isnan(got16), nan), name
        assert np.array_equal(got16.view(np.uint16)[~nan], want16.view(np.uint16)[~nan]), (name, got16, want16)
        gotbf = np.frombuffer(bytes(bf16[name]["data"]), dtype=np.uint16).reshape(x.shape)
        wantbf = f32_to_bf16_bits(x)
        nan = np.isnan(x)
        assert np.array_equal(gotbf[~nan], wantbf[~nan]), (name, gotbf, wantbf)
        assert np.isnan(bf16_bits_to_f32(gotbf[nan])).all(), name


def test_synthetic_file_layout():
    d = _dir("cpp")
    with safe_open(os.path.join(d, "synth.safetensors"), framework="np") as f:
        meta = f.metadata()
        keys = set(f.keys())
        assert meta["synthetic"] == "true" and meta["model"] == "synthetic", meta
        n_q = int(meta["n_q_heads"])
        kinds = meta["head_kinds"]
        n_layers = len({k.split(".")[1] for k in keys})
        assert len(kinds) == n_layers * n_q and set(kinds) <= {"C", "S"}, kinds
        for i in range(n_layers):
            k = f.get_tensor(f"layers.{i}.k")
            v = f.get_tensor(f"layers.{i}.v")
            qw = f.get_tensor(f"layers.{i}.q_window")
            assert k.shape == v.shape and k.ndim == 3 and k.dtype == np.float16, (k.shape, v.shape, k.dtype)
            assert qw.shape[0] == n_q and qw.shape[2] == k.shape[2] and n_q % k.shape[0] == 0, qw.shape
            assert np.isfinite(k.astype(np.float32)).all() and np.isfinite(v.astype(np.float32)).all()
    with safe_open(os.path.join(d, "synth_q.safetensors"), framework="np") as f:
        assert f.metadata()["synthetic"] == "true"
        assert {f"layers.{i}.q" for i in range(n_layers)} == set(f.keys())
        assert f.get_tensor("layers.0.q").shape[0] == n_q


# ---------------------------------------------------------------------------
# 2. Files written by Python, for the C++ side to read
# ---------------------------------------------------------------------------


def _serialize_bf16(path, tensors, metadata):
    """Writes raw-byte tensors (e.g. BF16, which numpy lacks) with the
    safetensors package's low-level API, whose form changed across versions."""
    keep = []
    try:
        specs = {}
        for name, (dtype, shape, data) in tensors.items():
            buf = np.frombuffer(data, dtype=np.uint8).copy()
            keep.append(buf)
            specs[name] = safetensors.TensorSpec(dtype=LONG_DTYPE_NAMES[dtype], shape=shape,
                                                 data_ptr=buf.ctypes.data, data_len=buf.nbytes)
        safetensors.serialize_file(specs, path, metadata=metadata)
    except (AttributeError, TypeError):  # safetensors < 0.8: plain dicts with bytes
        safetensors.serialize_file({n: {"dtype": dt, "shape": s, "data": b} for n, (dt, s, b) in tensors.items()},
                                   path, metadata=metadata)


def test_write_python_files():
    d = _dir("py")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(1234)
    lines = []

    def dump(file, name, dtype, shape, raw_bytes, f32):
        base = f"{file}.{len(lines)}"
        with open(os.path.join(d, base + ".raw"), "wb") as f:
            f.write(raw_bytes)
        f32_name = "-"
        if f32 is not None:
            f32_name = base + ".f32"
            with open(os.path.join(d, f32_name), "wb") as f:
                f.write(np.ascontiguousarray(f32, dtype=np.float32).tobytes())
        dims = ",".join(str(x) for x in shape) or "-"
        lines.append(f"tensor {file} {_hex(name)} {dtype} {dims} {f32_name} {base}.raw")

    def metas(file, meta):
        for k, v in meta.items():
            lines.append(f"meta {file} {_hex(k)} {_hex(v)}")

    # numpy arrays through the high-level API: F16 / F32 / I32, odd shapes.
    special = np.array([0.0, -0.0, 1.0, 65504.0, 6e-8, -3.5, np.inf, -np.inf, np.nan, 1e-3], dtype=np.float32)
    arrays = {
        "layers.0.k": rng.standard_normal((2, 5, 8)).astype(np.float16),
        "layers.0.v": rng.standard_normal((2, 5, 8)).astype(np.float32),
        "layers.0.q_window": (rng.standard_normal((4, 3, 8)) * 30).astype(np.float16),
        "special16": special.astype(np.float16),
        "special32": special,
        "scalar": np.array(7.25, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "ids": np.array([1, -2, 3, 2**31 - 1], dtype=np.int32),
        "w\u00e9ird \"name\" \\": np.arange(6, dtype=np.float16).reshape(2, 3),
    }
    meta = {"n_q_heads": "4", "model": "python \"writer\" \\ \u00fcn\u00efc\u00f6de\nline", "empty": ""}
    file = "py_numpy.safetensors"
    safetensors.numpy.save_file(arrays, os.path.join(d, file), metadata=meta)
    metas(file, meta)
    for name, a in arrays.items():
        dtype = {np.float16: "F16", np.float32: "F32", np.int32: "I32"}[a.dtype.type]
        f32 = a.astype(np.float32) if dtype != "I32" else None
        dump(file, name, dtype, list(a.shape), a.tobytes(), f32)

    # Raw bytes through the low-level API: BF16 (numpy has none) and F64.
    x = (rng.standard_normal((3, 7)) * 100).astype(np.float32)
    x[0, 0], x[0, 1], x[0, 2] = np.inf, -np.inf, np.nan
    bits = f32_to_bf16_bits(x)
    f64 = np.array([1.5, -2.25], dtype=np.float64)
    raw = {"layers.1.k": ("BF16", [3, 7], bits.tobytes()), "f64": ("F64", [2], f64.tobytes())}
    file = "py_raw.safetensors"
    meta = {"n_q_heads": "2"}
    _serialize_bf16(os.path.join(d, file), raw, meta)
    metas(file, meta)
    dump(file, "layers.1.k", "BF16", [3, 7], bits.tobytes(), bf16_bits_to_f32(bits))
    dump(file, "f64", "F64", [2], f64.tobytes(), None)

    with open(os.path.join(d, "manifest.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    tests = [test_cpp_files_read_by_safetensors, test_cpp_rounding_matches_numpy, test_synthetic_file_layout,
             test_write_python_files]
    failed = 0
    for t in tests:
        try:
            t()
            print(f"[ OK ] {t.__name__}")
        except Exception as e:  # report every failure, then fail
            failed += 1
            print(f"[FAIL] {t.__name__}: {type(e).__name__}: {e}")
    print(f"python cross-check (numpy {np.__version__}, safetensors {safetensors.__version__}): "
          f"{len(tests) - failed}/{len(tests)} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
