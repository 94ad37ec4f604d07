"""The binding against independent references: dense attention in float64
numpy, the merge formula, and the library's errors as Python exceptions."""
import gc
import os

import numpy as np
import pytest

import squeeze

from conftest import need

torch = need("torch")

L, KVH, H, N, D = 2, 2, 4, 700, 64


def make_layers(rng, dtype=np.float32, n=N, window=40):
    layers = []
    for _ in range(L):
        k = rng.standard_normal((KVH, n, D)).astype(dtype)
        v = rng.standard_normal((KVH, n, D)).astype(dtype)
        qw = rng.standard_normal((H, window, D)).astype(np.float32)
        layers.append((k, v, qw))
    return layers


def dense_ref(q, k, v, scale=None):
    """float64 softmax attention: q [H, T, d], k/v [KVH, N, d] -> o, lse."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    g = q.shape[0] // k.shape[0]
    scale = scale or q.shape[-1] ** -0.5
    o = np.empty(q.shape)
    lse = np.empty(q.shape[:2])
    for h in range(q.shape[0]):
        s = q[h] @ k[h // g].T * scale
        m = s.max(axis=1, keepdims=True)
        p = np.exp(s - m)
        z = p.sum(axis=1, keepdims=True)
        o[h] = p / z @ v[h // g]
        lse[h] = (m + np.log(z))[:, 0]
    return o, lse


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def db(tmp_path):
    d = squeeze.open(tmp_path / "db")
    yield d
    gc.collect()
    if not d._h.closed:
        try:
            d.close()
        except squeeze.Error:
            pass


def test_build_list_describe_verify_drop(db, rng):
    layers = make_layers(rng)
    stats = db.build("c", layers=layers, n_q_heads=H, model="unit test", window=40)
    assert stats["keys_clustered"] == L * KVH * (N - 40 - 4)
    assert db.contexts() == ["c"]
    info = db.info("c")
    assert (info["n_layers"], info["n_kv_heads"], info["n_q_heads"], info["head_dim"], info["n_tokens"]) == \
        (L, KVH, H, D, N)
    assert info["model"] == "unit test" and info["dtype"] == "F32"
    assert info["calibration_queries"] == 40 and len(info["thresholds"]) == 5
    rep = db.verify("c")
    assert rep["kv_pages_checked"] > 0
    db.drop("c")
    assert db.contexts() == []
    with pytest.raises(squeeze.NotFoundError, match="'c'"):
        db.info("c")


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-5), (np.float16, 2e-3)])
def test_dense_equals_float64_reference(db, rng, dtype, tol):
    layers = make_layers(rng, dtype)
    db.build("c", layers=layers, n_q_heads=H)
    with db.context("c") as ctx:
        for T in (1, 5):
            for layer in range(L):
                q = rng.standard_normal((H, T, D)).astype(np.float32)
                o, lse = ctx.attend(layer, q, mode="dense")
                ro, rl = dense_ref(q, layers[layer][0], layers[layer][1])
                assert np.abs(o - ro).max() < tol
                assert np.abs(lse - rl).max() < tol
                assert o.dtype == np.float32 and lse.shape == (H, T)


def test_torch_bf16_build_and_zero_copy_outputs(db, rng):
    layers = [(torch.from_numpy(k).to(torch.bfloat16), torch.from_numpy(v).to(torch.bfloat16), None)
              for k, v, _ in make_layers(rng)]
    db.build("c", layers=layers, n_q_heads=H)
    assert db.info("c")["dtype"] == "BF16"
    with db.context("c") as ctx:
        q = torch.randn(H, 2, D)
        out = torch.empty(H, 2, D)
        lse = torch.empty(H, 2)
        o2, l2 = ctx.attend(1, q, out=out, lse=lse, mode="dense")
        assert o2 is out and l2 is lse  # written in place, no copy
        ro, rl = dense_ref(q.numpy(), layers[1][0].float().numpy(), layers[1][1].float().numpy())
        assert np.abs(out.numpy() - ro).max() < 1e-4
        assert np.abs(lse.numpy() - rl).max() < 1e-4


def test_budget_and_threshold_read_what_they_say(db, rng):
    layers = make_layers(rng)
    db.build("c", layers=layers, n_q_heads=H, window=40)
    n_clustered = db.info("c")["n_clustered"]
    with db.context("c") as ctx:
        q = rng.standard_normal((H, 1, D)).astype(np.float32)
        o, lse, st = ctx.attend(0, q, budget=0.125, stats=True)
        assert np.isfinite(o).all() and np.isfinite(lse).all()
        for h in st["heads"]:
            # whole clusters up to the budget: at most the budget plus one cluster
            assert 0 < h["keys_selected"] <= 0.125 * n_clustered + 200
        dense = ctx.attend(0, q, mode="dense", stats=True)[2]
        assert st["bytes_read"] < dense["bytes_read"]
        o, lse, st = ctx.attend(0, q, mode="threshold", threshold_quantile=0.9, stats=True)
        assert np.isfinite(o).all()
        with pytest.raises(squeeze.InvalidArgumentError, match="quantile"):
            ctx.attend(0, q, mode="threshold", threshold_quantile=0.33)


def test_merge_matches_formula():
    rng = np.random.default_rng(1)
    n, d = 6, 8
    oa, ob = rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32)
    la, lb = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    la[0] = -np.inf  # an empty state
    lse = np.logaddexp(la.astype(np.float64), lb)
    want = (np.exp(la - lse)[:, None] * oa + np.exp(lb - lse)[:, None] * ob)
    o, l = squeeze.merge(oa.copy(), la.copy(), ob, lb)
    assert np.abs(o - want).max() < 1e-6 and np.abs(l - lse).max() < 1e-6
    with pytest.raises(squeeze.InvalidArgumentError, match=r"lse_b: shape \[5\], expected \[6\]"):
        squeeze.merge(oa.copy(), la.copy(), ob, lb[:5])
    with pytest.raises(squeeze.InvalidArgumentError, match="o_a: expected \\[n, head_dim\\]"):
        squeeze.merge(oa.reshape(-1), la.copy(), ob, lb)


def test_build_from_file_matches_tensors(db, rng, tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    layers = make_layers(rng)
    tensors = {}
    for i, (k, v, qw) in enumerate(layers):
        tensors[f"layers.{i}.k"], tensors[f"layers.{i}.v"], tensors[f"layers.{i}.q_window"] = k, v, qw
    st.save_file(tensors, str(tmp_path / "kv.safetensors"), metadata={"n_q_heads": str(H), "model": "m"})
    db.build("file", kv=tmp_path / "kv.safetensors")
    db.build("mem", layers=layers, n_q_heads=H, model="m")
    q = rng.standard_normal((H, 3, D)).astype(np.float32)
    with db.context("file") as a, db.context("mem") as b:
        for mode in ("dense", "budget"):
            oa, la = a.attend(1, q, mode=mode)
            ob, lb = b.attend(1, q, mode=mode)
            np.testing.assert_array_equal(oa, ob)  # same bytes, same seed: the same context
            np.testing.assert_array_equal(la, lb)


def test_bad_arrays_raise_clear_errors(db, rng):
    db.build("c", layers=make_layers(rng), n_q_heads=H)
    ctx = db.context("c")
    q = rng.standard_normal((H, 2, D)).astype(np.float32)
    cases = [
        (q.astype(np.float16), "dtype"),
        (q.astype(np.float64), "dtype"),
        (np.ascontiguousarray(q.transpose(1, 0, 2)).transpose(1, 0, 2), "contiguous"),
        (q[:2], r"shape \[2, 2, 64\], expected \[4, 2, 64\]"),
        (q[..., :32], "shape"),
        (q[0], "expected"),
        (torch.from_numpy(q).to(torch.bfloat16), "dtype"),
    ]
    for bad, msg in cases:
        with pytest.raises(squeeze.InvalidArgumentError, match=msg):
            ctx.attend(0, bad)
    with pytest.raises(squeeze.InvalidArgumentError, match="out"):
        ctx.attend(0, q, out=np.empty((H, 2, D), dtype=np.float16))
    nan_q = q.copy()
    nan_q[1, 0, 3] = np.nan
    with pytest.raises(squeeze.InvalidArgumentError):
        ctx.attend(0, nan_q)
    with pytest.raises(squeeze.InvalidArgumentError, match="layer 7 out of range"):
        ctx.attend(7, q)
    with pytest.raises(squeeze.InvalidArgumentError, match="mode"):
        ctx.attend(0, q, mode="sparse")
    with pytest.raises(squeeze.InvalidArgumentError, match="host|CUDA"):
        ctx.attend(0, q, layout="token_major")
    with pytest.raises(TypeError):
        ctx.attend(0, "not an array")
    with pytest.raises(squeeze.InvalidArgumentError, match="still open"):
        db.close()
    ctx.close()
    with pytest.raises(squeeze.InvalidArgumentError, match="closed"):
        ctx.attend(0, q)


def test_library_errors_map_to_classes(db, rng, tmp_path):
    with pytest.raises(squeeze.NotFoundError) as e:
        db.context("missing")
    assert e.value.code == "NotFound" and isinstance(e.value, LookupError)
    with pytest.raises(squeeze.Error):
        db.build("x", kv=tmp_path / "no-such.safetensors")
    with pytest.raises(squeeze.InvalidArgumentError, match="exactly one"):
        db.build("x")
    db.build("c", layers=make_layers(rng), n_q_heads=H)
    with pytest.raises(squeeze.AlreadyExistsError):
        db.build("c", layers=make_layers(rng), n_q_heads=H)
    db.build("c", layers=make_layers(rng), n_q_heads=H, replace=True)
    bad = make_layers(rng)
    bad[1][0][0, 5, 5] = np.inf
    with pytest.raises(squeeze.InvalidArgumentError, match="layer 1"):
        db.build("inf", layers=bad, n_q_heads=H)
    assert db.contexts() == ["c"]  # nothing half-written
    with pytest.raises(squeeze.InvalidArgumentError, match="multiple|n_q_heads"):
        db.build("g", layers=make_layers(rng), n_q_heads=3)
    with pytest.raises(squeeze.InvalidArgumentError, match="host"):
        db.build("dev", layers=[(x, x) for x in [torch.zeros(1, 2, 3, device="meta")]], n_q_heads=1)
    with pytest.raises(squeeze.InvalidArgumentError, match="device must be"):
        db.context("c", device="tpu")
    with pytest.raises(squeeze.InvalidArgumentError, match="residency must be"):
        db.context("c", residency="disk")
    # a directory that is not a database is never created over
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(squeeze.Error):
        squeeze.open(foreign)
    assert os.listdir(foreign) == ["notes.txt"]


def test_progress_callback_and_interrupt(db, rng):
    seen = []
    db.build("c", layers=make_layers(rng), n_q_heads=H, progress=seen.append)
    assert [p["heads_done"] for p in seen] == list(range(1, L * KVH + 1))

    def stop(p):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        db.build("d", layers=make_layers(rng), n_q_heads=H, progress=stop)
    assert db.contexts() == ["c"]  # the interrupted build committed nothing


def test_read_only_and_lifetimes(tmp_path, rng):
    path = tmp_path / "db"
    with squeeze.open(path) as w:
        w.build("c", layers=make_layers(rng), n_q_heads=H)
        r = squeeze.open(path, read_only=True)
        assert r.read_only and r.contexts() == ["c"]
        with pytest.raises(squeeze.NotSupportedError):
            r.drop("c")
        ctx = r.context("c")
        del r  # the context keeps its database open
        gc.collect()
        q = rng.standard_normal((H, 1, D)).astype(np.float32)
        o, _ = ctx.attend(0, q)
        assert np.isfinite(o).all()
        ctx.close()
