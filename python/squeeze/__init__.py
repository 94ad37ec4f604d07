"""squeeze: a persistent context index database for sparse attention.

The Python face of the C++ library (include/sqz/*.h); docs/PYTHON.md is the
guide. A database holds fixed contexts (a model's KV cache over a document)
with a centroid index over their keys; attention of new queries over a
context reads only the key/value blocks that get attention mass and returns
the output and its log-sum-exp (natural log), to be merged with attention
over the caller's own tokens (:func:`merge`).

    import squeeze
    with squeeze.open("my.db") as db:
        db.build("doc", kv="doc.safetensors")
        with db.context("doc") as ctx:
            o, lse = ctx.attend(layer=0, q=q)          # q: [heads, T, head_dim] float32

Arrays cross without copies: numpy arrays and torch tensors in host memory,
torch CUDA tensors for contexts opened with ``device="cuda"``. Errors raise
:class:`squeeze.Error` subclasses carrying the library's message.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Sequence

# libgomp (loaded with _core, through FAISS) reads its wait policy when it is
# loaded: passive waiting keeps its idle threads off the cores OpenBLAS's
# threads need during index builds (as sqctl does; docs/PERFORMANCE.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import _core  # noqa: E402
from ._core import (  # noqa: F401  (re-exported)
    AbortedError,
    AlreadyExistsError,
    CorruptionError,
    Error,
    InvalidArgumentError,
    NotFoundError,
    NotSupportedError,
    StorageIOError,
)

__version__ = "0.1.0"
built_with_cuda: bool = _core.built_with_cuda

__all__ = [
    "DB", "Context", "open", "merge", "query_options", "build_options", "built_with_cuda",
    "Error", "NotFoundError", "CorruptionError", "InvalidArgumentError", "StorageIOError",
    "AlreadyExistsError", "NotSupportedError", "AbortedError",
]

_MODES = {"dense": _core.SelectionMode.dense, "budget": _core.SelectionMode.budget,
          "threshold": _core.SelectionMode.threshold}
_GQA = {"union": _core.GqaPolicy.union, "per_head": _core.GqaPolicy.per_head}


def query_options(mode: str = "budget", budget: float = 0.125, threshold_quantile: float | None = None,
                  threshold: float = 0.0, threshold_coarse: float = 0.0, hierarchical: bool = False,
                  coarse_budget_factor: float = 2.0, gqa: str = "union", per_query_selection: bool = False,
                  softmax_scale: float | None = None) -> _core.QueryOptions:
    """A QueryOptions (include/sqz/query.h documents each field).

    mode: "budget" (keep clusters by estimated mass up to `budget` of the
    clustered keys), "threshold" (a calibrated `threshold_quantile`, or explicit
    `threshold` / `threshold_coarse`) or "dense" (every key: exact attention).
    softmax_scale: None means 1/sqrt(head_dim).
    """
    if mode not in _MODES:
        raise InvalidArgumentError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
    if gqa not in _GQA:
        raise InvalidArgumentError(f"gqa must be one of {sorted(_GQA)}, got {gqa!r}")
    o = _core.QueryOptions()
    o.mode = _MODES[mode]
    o.budget = float(budget)
    o.threshold_quantile = -1.0 if threshold_quantile is None else float(threshold_quantile)
    o.threshold = float(threshold)
    o.threshold_coarse = float(threshold_coarse)
    o.hierarchical = bool(hierarchical)
    o.coarse_budget_factor = float(coarse_budget_factor)
    o.gqa = _GQA[gqa]
    o.per_query_selection = bool(per_query_selection)
    o.softmax_scale = 0.0 if softmax_scale is None else float(softmax_scale)
    return o


def build_options(window: int = 100, n_sinks: int = 4, fine_ratio: float = 0.05, coarse_ratio: float = 0.01,
                  page_rows: int = 16, kmeans_iters: int = 10, seed: int = 1234,
                  quantiles: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95), coarse_share: float = 0.5,
                  replace: bool = False) -> _core.BuildOptions:
    """A BuildOptions (include/sqz/build.h documents each field)."""
    o = _core.BuildOptions()
    o.window = int(window)
    o.n_sinks = int(n_sinks)
    o.fine_ratio = float(fine_ratio)
    o.coarse_ratio = float(coarse_ratio)
    o.page_rows = int(page_rows)
    o.kmeans_iters = int(kmeans_iters)
    o.seed = int(seed)
    o.quantiles = [float(q) for q in quantiles]
    o.coarse_share = float(coarse_share)
    o.replace = bool(replace)
    return o


def _is_torch(x: Any) -> bool:
    return type(x).__module__.partition(".")[0] == "torch"


def _options(options: _core.QueryOptions | None, kw: dict) -> _core.QueryOptions:
    if options is not None and kw:
        raise InvalidArgumentError("pass either options= or keyword options, not both")
    return options if options is not None else query_options(**kw)


def _progress_printer(name: str) -> Callable[[dict], None]:
    """A one-line progress display on stderr (tqdm when installed)."""
    try:
        from tqdm import tqdm  # type: ignore
    except ImportError:  # pragma: no cover - tqdm ships with the hf extra
        tqdm = None
    state: dict = {}

    def show(p: dict) -> None:
        if tqdm is not None:
            bar = state.get("bar")
            if bar is None:
                bar = state["bar"] = tqdm(total=p["heads_total"], desc=f"indexing {name}", unit="head")
            bar.update(p["heads_done"] - bar.n)
            if p["heads_done"] == p["heads_total"]:
                bar.close()
        else:
            import sys
            print(f"\rindexing {name}: {p['heads_done']}/{p['heads_total']} heads", end="", file=sys.stderr)
    return show


class Context:
    """An open context (sqz::ContextHandle): attention of queries over it.

    Opened with :meth:`DB.context`. Immutable and thread-safe; it reads the
    version of the context that existed when it was opened, whatever happens
    to the context afterwards.
    """

    def __init__(self, handle: _core.Context):
        self._h = handle
        self._workspaces: dict = {}

    @property
    def info(self) -> dict:
        """Shapes, index sizes, thresholds, model identity (ContextInfo)."""
        return self._h.info

    @property
    def n_served_q_heads(self) -> int:
        return self._h.n_served_q_heads

    @property
    def device_id(self) -> int:
        """CUDA device of a GPU context, -1 for a CPU one."""
        return self._h.device_id

    def attend(self, layer: int, q: Any, *, out: Any = None, lse: Any = None,
               options: _core.QueryOptions | None = None, stats: bool = False, layout: str = "head_major",
               lse_base2: bool = False, **kw: Any):
        """Attention of `q` over the context's layer `layer`: returns (o, lse[, stats]).

        Host memory (numpy or torch CPU): q is float32 [n_served_q_heads, T,
        head_dim]; o has its shape, lse is [heads, T] (natural log). CUDA
        tensors (a context opened with device="cuda"): q is float32, float16 or
        bfloat16 in `layout` ("head_major" [heads, T, d] or "token_major"
        [T, heads, d]), o is q's dtype, lse float32 (log2 with lse_base2);
        enqueued on torch's current stream. Keyword options are those of
        :func:`query_options`. `out` / `lse` may be given to write in place.
        """
        opts = _options(options, kw)
        if not hasattr(q, "shape") or not hasattr(q, "ndim"):
            raise TypeError(f"q must be a numpy array or a torch tensor, got {type(q).__name__}")
        if _is_torch(q) and q.is_cuda:
            return self._attend_cuda(layer, q, out, lse, opts, layout, lse_base2, stats)
        if layout != "head_major" or lse_base2:
            raise InvalidArgumentError("layout and lse_base2 apply to CUDA tensors only")
        if q.ndim != 3:
            raise InvalidArgumentError(f"q: expected [heads, T, head_dim], got {tuple(q.shape)}")
        if _is_torch(q):
            import torch
            if out is None:
                out = torch.empty(tuple(q.shape), dtype=torch.float32)
            if lse is None:
                lse = torch.empty(tuple(q.shape[:2]), dtype=torch.float32)
        else:
            import numpy as np
            if out is None:
                out = np.empty(q.shape, dtype=np.float32)
            if lse is None:
                lse = np.empty(q.shape[:2], dtype=np.float32)
        st = self._h.attend(layer, q, out, lse, opts, stats)
        return (out, lse, st) if stats else (out, lse)

    def _attend_cuda(self, layer, q, out, lse, opts, layout, lse_base2, stats):
        import torch
        if stats:
            raise InvalidArgumentError("stats are returned by host calls only (the device call never syncs)")
        if layout not in ("head_major", "token_major"):
            raise InvalidArgumentError(f"layout must be 'head_major' or 'token_major', got {layout!r}")
        if q.ndim != 3:
            raise InvalidArgumentError(f"q: expected 3 dimensions, got {tuple(q.shape)}")
        T = q.shape[0] if layout == "token_major" else q.shape[1]
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        if lse is None:
            lse = torch.empty(tuple(q.shape[:2]), dtype=torch.float32, device=q.device)
        ws = self.workspace(T, opts, q.device)
        self._h.attend_device(layer, q, out, lse, ws, torch.cuda.current_stream(q.device).cuda_stream, layout,
                              lse_base2, opts)
        return out, lse

    def workspace_bytes(self, T: int, options: _core.QueryOptions | None = None, **kw: Any) -> int:
        """Bytes of GPU workspace one device call with T queries needs."""
        return self._h.workspace_bytes(T, _options(options, kw))

    def workspace(self, T: int, options: _core.QueryOptions, device: Any):
        """A cached torch uint8 CUDA buffer big enough for T queries (one per
        context and size: calls on one stream may share it)."""
        import torch
        nbytes = max(1, self._h.workspace_bytes(T, options))
        ws = self._workspaces.get(device)
        if ws is None or ws.numel() < nbytes:
            ws = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._workspaces[device] = ws
        return ws

    def close(self) -> None:
        self._workspaces.clear()
        self._h.close()

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class DB:
    """A squeeze database directory (sqz::DB). Use :func:`open`."""

    def __init__(self, handle: _core.DB):
        self._h = handle

    @property
    def path(self) -> str:
        return self._h.path

    @property
    def read_only(self) -> bool:
        return self._h.read_only

    def contexts(self) -> list[str]:
        """Names of the committed contexts, sorted."""
        return self._h.contexts()

    def info(self, name: str) -> dict:
        """The context's ContextInfo as a dict (NotFoundError if absent)."""
        return self._h.describe(name)

    def drop(self, name: str) -> None:
        """Removes a context atomically; its space is reclaimed afterwards."""
        self._h.drop(name)

    def verify(self, name: str) -> dict:
        """Re-reads every record and page of a context against its checksums."""
        return self._h.verify(name)

    def refresh(self) -> None:
        """Read-only opens: see what the writer committed since."""
        self._h.refresh()

    def build(self, name: str, kv: str | os.PathLike | None = None, *,
              layers: Iterable[Sequence[Any]] | None = None, n_q_heads: int | None = None, model: str = "",
              options: _core.BuildOptions | None = None, progress: bool | Callable[[dict], None] = False,
              **kw: Any) -> dict:
        """Builds and commits context `name`; returns the build statistics.

        Either `kv`, a safetensors KV file (docs/FORMAT.md), or `layers`, one
        (k, v) or (k, v, q_window) per layer with k, v [n_kv_heads, n_tokens,
        head_dim] (float32, float16 or bfloat16, host memory) and q_window
        [n_q_heads, W, head_dim] float32 (window queries, for calibrated
        thresholds), plus `n_q_heads` and a `model` string. Keyword options
        are those of :func:`build_options`. `progress`: True for a progress bar,
        or a callable given a dict after each (layer, KV head); an exception
        it raises (Ctrl-C included) stops the build and nothing is committed.
        """
        opts = options if options is not None else build_options(**kw)
        if options is not None and kw:
            raise InvalidArgumentError("pass either options= or keyword options, not both")
        cb = _progress_printer(name) if progress is True else (progress or None)
        if (kv is None) == (layers is None):
            raise InvalidArgumentError("give exactly one of kv= (a file) or layers= (tensors)")
        if kv is not None:
            return _core.build_from_file(self._h, name, os.fspath(kv), opts, cb)
        if n_q_heads is None:
            raise InvalidArgumentError("layers= needs n_q_heads=")
        return _core.build_from_tensors(self._h, name, int(n_q_heads), list(layers), model, opts, cb)

    def context(self, name: str, device: str = "cpu", device_id: int = 0, kv_heads: tuple[int, int] = (0, -1),
                residency: str | None = None) -> Context:
        """Opens context `name` for attention.

        device: "cpu" or "cuda" (the GPU engine: the index and every KV page
        of the served heads are copied to GPU `device_id`). kv_heads: the
        [begin, end) KV heads a tensor-parallel rank serves (-1: to the last).
        """
        res = residency or ("device" if device == "cuda" else "storage")
        return Context(_core.Context.open(self._h, name, device, device_id, kv_heads[0], kv_heads[1], res, 0))

    def close(self) -> None:
        """Closes the database (every context opened on it must be closed first)."""
        self._h.close()

    def __enter__(self) -> "DB":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open(path: str | os.PathLike, read_only: bool = False, create: bool = True,
         block_cache_bytes: int = 512 << 20) -> DB:  # noqa: A001  (mirrors sqz::DB::Open)
    """Opens (or creates, with `create`) the database at `path`.

    read_only: no lock and no write of any kind, so any number of processes may
    read while one writes. squeeze never creates a database over a directory
    that holds other files.
    """
    return DB(_core.DB.open(os.fspath(path), read_only, create, False, int(block_cache_bytes)))


def merge(o_a: Any, lse_a: Any, o_b: Any, lse_b: Any, lse_base2: bool = False):
    """Merges attention state (o_b, lse_b) into (o_a, lse_a) in place and returns them.

    o: [n, head_dim], lse: [n] (float32; host arrays, or CUDA tensors of
    float32/float16/bfloat16 with float32 lse, enqueued on torch's current
    stream). An empty state has lse = -inf.
    """
    if _is_torch(o_a) and o_a.is_cuda:
        import torch
        _core.merge_states_device(o_a, lse_a, o_b, lse_b, lse_base2,
                                  torch.cuda.current_stream(o_a.device).cuda_stream)
    else:
        if lse_base2:
            raise InvalidArgumentError("lse_base2 applies to CUDA tensors only")
        _core.merge_states(o_a, lse_a, o_b, lse_b)
    return o_a, lse_a
