"""The binding's GPU path (runs on the lent GPU machine; skips elsewhere).

The GPU machine cannot carry the 98 MB SmolLM2 file, so the model here is a
small randomly initialised Llama (GQA, head_dim 64): the device call against
the CPU handle, the device merge against the CPU merge, and generation with
a GPU model and a GPU context against the model's own generation.
"""
import os
import tempfile

import pytest

from conftest import need

torch = need("torch")
need("transformers")

import squeeze  # noqa: E402
from squeeze import hf  # noqa: E402

pytestmark = pytest.mark.skipif(not (squeeze.built_with_cuda and torch.cuda.is_available()),
                                reason="needs a CUDA build of squeeze and a GPU")


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=384, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama()
    ids = torch.randint(0, 512, (3000,), generator=torch.Generator().manual_seed(7)).tolist()
    d = tempfile.mkdtemp()
    db = squeeze.open(os.path.join(d, "db"))
    hf.export_context(model, None, token_ids=ids[:2900], db=db, name="c", kv_dtype="bfloat16", window=64)
    yield model, ids, db
    db.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["head_major", "token_major"])
def test_device_call_matches_cpu(setup, dtype, layout):
    _, _, db = setup
    with db.context("c") as cpu, db.context("c", device="cuda") as gpu:
        H, d = cpu.n_served_q_heads, cpu.info["head_dim"]
        for T, opts in ((1, {"mode": "dense"}), (1, {"budget": 0.125}), (4, {"budget": 0.25}),
                        (1, {"mode": "threshold", "threshold_quantile": 0.9, "hierarchical": True})):
            q = torch.randn(H, T, d, generator=torch.Generator().manual_seed(T))
            qd = q.to("cuda", dtype)
            qd = qd.transpose(0, 1).contiguous() if layout == "token_major" else qd
            out = torch.full_like(qd, float("nan"))  # poisoned
            o, lse = gpu.attend(1, qd, out=out, layout=layout, **opts)
            assert o is out
            torch.cuda.synchronize()
            if layout == "token_major":
                o, lse = o.transpose(0, 1), lse.transpose(0, 1)
            tol = 2e-4 if dtype == torch.float32 else 2e-2
            # the GPU reads q in its dtype: compare with the CPU over the same rounded queries
            o_ref, lse_ref = cpu.attend(1, qd.float().cpu().transpose(0, 1).contiguous() if layout == "token_major"
                                        else qd.float().cpu(), **opts)
            assert torch.isfinite(o.float()).all()
            assert (o.float().cpu() - o_ref).abs().max().item() < tol
            assert (lse.cpu() - lse_ref).abs().max().item() < 1e-3


def test_device_merge_matches_cpu():
    n, d = 40, 64
    g = torch.Generator().manual_seed(3)
    oa, ob = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    la, lb = torch.randn(n, generator=g), torch.randn(n, generator=g)
    la[0] = float("-inf")
    ref_o, ref_l = squeeze.merge(oa.clone(), la.clone(), ob, lb)
    o, l = squeeze.merge(oa.cuda(), la.cuda(), ob.cuda(), lb.cuda())
    torch.cuda.synchronize()
    assert (o.cpu() - ref_o).abs().max().item() < 1e-5 and (l.cpu() - ref_l).abs().max().item() < 1e-5


def test_bad_device_arguments(setup):
    _, _, db = setup
    with db.context("c", device="cuda") as gpu:
        H, d = gpu.n_served_q_heads, gpu.info["head_dim"]
        q = torch.randn(H, 1, d, device="cuda", dtype=torch.bfloat16)
        with pytest.raises(squeeze.InvalidArgumentError, match="out"):
            gpu.attend(0, q, out=torch.empty(H, 1, d, dtype=torch.bfloat16))  # host output for a device call
        with pytest.raises(squeeze.InvalidArgumentError, match="shape"):
            gpu.attend(0, q[:2])
        with pytest.raises(squeeze.InvalidArgumentError, match="contiguous"):
            gpu.attend(0, torch.randn(2, H, d, device="cuda", dtype=torch.bfloat16).transpose(0, 1))
        with pytest.raises(squeeze.InvalidArgumentError, match="dtype"):
            gpu.attend(0, q.to(torch.float64))
        with pytest.raises(squeeze.InvalidArgumentError, match="stats"):
            gpu.attend(0, q, stats=True)
    with db.context("c") as cpu:
        with pytest.raises(squeeze.Error):  # a CPU context has no device call
            cpu.attend(0, q)
    # The GPU engine stores F16/BF16 only: an F32 context is refused with the remedy.
    model, ids, _ = setup
    hf.export_context(model, None, token_ids=ids[:300], db=db, name="f32", kv_dtype="float32", window=16)
    with pytest.raises(squeeze.NotSupportedError, match="--kv-dtype float16"):
        db.context("f32", device="cuda")


def test_dense_logits_on_the_gpu_equal_the_models(setup):
    """A CUDA model attending a CUDA context (the GPU engine stores F16/BF16):
    the same logits as through the CPU engine over the same stored context,
    and the model's own logits within the fp16 rounding of the stored KV."""
    model, ids, db = setup
    hf.export_context(model, None, token_ids=ids[:2900], db=db, name="c16", kv_dtype="float16", window=64)
    model = model.to("cuda")
    try:
        with db.context("c16", device="cuda") as ctx, db.context("c16") as cpu_ctx:
            for own_len in (4, 40):  # the device call (T * G <= 64) and the host call on the GPU handle
                own = torch.tensor(ids[2900:2900 + own_len])
                logits, _ = hf.own_logits(model, ctx, own, mode="dense")
                via_cpu, _ = hf.own_logits(model, cpu_ctx, own, mode="dense")
                with torch.no_grad():
                    full = model(input_ids=torch.tensor([ids[:2900 + own_len]], device="cuda")).logits[0, 2900:]
                print(own_len, (logits - via_cpu).abs().max().item(), (logits - full).abs().max().item())
                assert (logits - via_cpu).abs().max().item() < 2e-3
                assert (logits - full).abs().max().item() < 3e-2
            new, _ = hf.generate(model, ctx, torch.tensor(ids[2900:2910]), max_new_tokens=6,
                                 query={"budget": 0.125})
            assert new.shape == (1, 6)
    finally:
        model.to("cpu")
        model.set_attn_implementation("sdpa")
