"""Step caching: on steps where the DiT's input barely moved, skip its blocks and reuse the last residual.

Neighbouring denoising steps feed the DiT almost the same latents at almost the same timestep, so the
60 blocks turn almost the same image tokens into almost the same output. A step cache measures, cheaply
and before the blocks run, how much the input changed; when the change is small it skips every block
and adds the *residual* the blocks made at the last step that ran them:

    img (B, L_img, D) --[blocks]--> out             computed step:  residual = out - img  (kept)
    img (B, L_img, D) ------------> img + residual  skipped step:   no block runs

The embedders, the token refiner and the final layer run on every step (they are cheap), so a skipped
step still gets its own timestep's modulation in the final layer. Two signals decide:

- **First-Block Cache** ("fbcache", ParaAttention's ``apply_cache_on_pipe``): run the first
  double-stream block, take its image residual ``block0(img) - img``, and compare it with the one of the
  last *computed* step. Skip the remaining blocks when the relative L1 change
  ``sum|r - r_prev| / sum|r_prev|`` is below the threshold; the cached residual is then the one of
  blocks 1.. (``out - block0(img)``). The first block always runs.
- **TeaCache** ("teacache", Liu et al. 2024, arXiv 2411.19108): the signal is the first double block's
  modulated input ``modulate(img_norm1(img), shift, scale)`` (shift, scale from ``img_mod(vec)``), which
  changes with both the latents and the timestep, and costs one LayerNorm and one small linear. Its
  relative L1 change from the *previous step* is rescaled by a polynomial fitted on HunyuanVideo
  (`TEACACHE_HUNYUAN_COEFFICIENTS`) into an estimate of the output's change, and accumulated over the
  steps skipped so far; a step is computed (and the sum reset) once the sum reaches the threshold.

Rules both follow: the first and the last step always run (the last one decides the final detail);
threshold 0 never skips, so it reproduces the uncached run bit for bit; the steps that ran are reported
(``StepCache.stats``, and ``out.timings["cache"]`` from the pipeline).

**Per row.** Every row of the DiT batch keeps its own signal, sum and residual. With true CFG the
pipeline batches [negative prompts | prompts] into one call, so the two branches never share state, and
a video is cached the same whether generated alone or in a batch. When rows disagree, the blocks run on
the rows that need them only.

**Plugged in from outside.** `StepCache` replaces the model's ``double_stream`` and ``single_stream`` by
instance attributes (``detach`` deletes them): the model's own ``forward`` (or `UlyssesDiT`'s) still runs
``embed`` and ``final``, and every block module is called unchanged, so FP8 linears and the fast blocks
work as they are. Under Ulysses each rank holds 1/N of the image tokens: the L1 sums are all-reduced over
the group before deciding, so every rank skips the same steps (and the per-rank residuals stay local).

Not handled: attention recording (`hvlab.inspection.hooks.AttentionRecorder` needs every row at every
step; refused), ``BlockOffloader`` with TeaCache (its signal reads block 0's weights outside the block's
hooks). Memory: two image-token tensors per row (signal and residual), ~1.5 GB at 720p in bf16.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from ..modulation import chunk_modulation, modulate

MODES = ("fbcache", "teacache")

# TeaCache's rescaling polynomial for HunyuanVideo, highest power first (numpy.poly1d order): the relative L1
# change x of the modulated input -> the estimated relative change of the output. Fitted by the TeaCache
# authors on the 13B release: ali-vilab/TeaCache, TeaCache4HunyuanVideo/teacache_sample_video.py (line 102 at
# commit 7c10efc). It never drops below 0.052 (its minimum, at x = 0.031): each step adds at least that much.
TEACACHE_HUNYUAN_COEFFICIENTS = (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02)

# Published HunyuanVideo thresholds: ParaAttention's default residual_diff_threshold for HunyuanVideo
# (doc/fastest_hunyuan_video.md: 1.62x at 720p, 30 steps) and TeaCache's rel_l1_thresh 0.1 ("1.6x speedup";
# 0.15 gives 2.1x). They are settings for the release checkpoint; the toy model has its own (docs/benchmarks.md).
DEFAULT_THRESHOLDS = {"fbcache": 0.06, "teacache": 0.1}

_L1_CHUNK = 16384  # tokens per chunk of the L1 sums: no full-size float32 copy at 720p


def check_cache_args(mode, threshold) -> tuple[str | None, float | None]:
    """Validate a (mode, threshold) pair as the CLI and `StepCache` take it; returns (mode, threshold) with
    mode None for "off"/None and the mode's published default when threshold is None."""
    if mode in (None, "off"):
        if threshold is not None:
            raise ValueError(f"a cache threshold ({threshold!r}) needs a cache mode: one of {MODES}")
        return None, None
    if mode not in MODES:
        raise ValueError(f"cache mode must be 'off', 'fbcache' or 'teacache', got {mode!r}")
    if threshold is None:
        return mode, DEFAULT_THRESHOLDS[mode]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or threshold < 0:
        raise ValueError(f"cache threshold must be a finite number >= 0 (0 = never skip; published HunyuanVideo "
                         f"values: fbcache 0.06, teacache 0.1-0.15), got {threshold!r}")
    return mode, float(threshold)


def teacache_signal(block, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """The first double block's modulated image input, modulate(img_norm1(img), shift, scale): (B, L_img, D)."""
    msa, _ = chunk_modulation(block.img_mod(vec), 2)
    return modulate(block.img_norm1(img), shift=msa.shift, scale=msa.scale)


def l1_rows(x: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
    """Per row b: sum |x_b| (or sum |x_b - ref_b|) over tokens and channels, in float32, token chunk by chunk: (B,)."""
    total = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[1], _L1_CHUNK):
        part = x[:, s:s + _L1_CHUNK] if ref is None else x[:, s:s + _L1_CHUNK] - ref[:, s:s + _L1_CHUNK]
        total += part.float().abs().sum(dim=tuple(range(1, x.dim())))
    return total


def rescale(x: float, coefficients: Sequence[float] | None) -> float:
    """TeaCache's polynomial at x (Horner; highest power first), floored at 0; x itself when coefficients is None."""
    if coefficients is None:
        return x
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return max(y, 0.0)


@dataclass
class CacheStats:
    """What a `StepCache` decided in one generation: per logged step, per row of the DiT batch."""

    mode: str
    threshold: float
    num_steps: int  # steps of the schedule
    rows: list[str]  # one label per DiT batch row, e.g. "uncond 0", "cond 0" with true CFG
    steps: list[int] = field(default_factory=list)  # the steps that called the DiT, in order
    signal: list[list[float | None]] = field(default_factory=list)  # per step, per row: relative L1 change
    accumulated: list[list[float]] = field(default_factory=list)  # per step, per row: TeaCache's sum (fbcache: signal)
    computed: list[list[bool]] = field(default_factory=list)  # per step, per row: did the blocks run

    def computed_steps(self) -> dict[str, list[int]]:
        """Row label -> the steps whose blocks ran for that row."""
        return {r: [s for s, c in zip(self.steps, self.computed) if c[b]] for b, r in enumerate(self.rows)}

    @property
    def dit_forwards(self) -> int:
        """(row, step) pairs whose blocks ran: the work done, in units of one row's block stack."""
        return sum(sum(c) for c in self.computed)

    @property
    def dit_forwards_uncached(self) -> int:
        """(row, step) pairs an uncached run computes."""
        return len(self.steps) * len(self.rows)

    @property
    def forward_ratio(self) -> float:
        """Uncached / cached block-stack forwards (1.0 = nothing skipped)."""
        return self.dit_forwards_uncached / max(self.dit_forwards, 1)

    def report(self) -> dict:
        """A JSON-ready summary (what the pipeline puts in ``out.timings["cache"]``)."""
        return dict(mode=self.mode, threshold=self.threshold, dit_forwards=self.dit_forwards,
                    dit_forwards_uncached=self.dit_forwards_uncached, forward_ratio=round(self.forward_ratio, 4),
                    computed_steps=self.computed_steps())

    def to_dict(self) -> dict:
        return asdict(self)


class StepCache:
    """First-Block Cache or TeaCache for a `HYVideoDiffusionTransformer` (see the module docstring).

    Args:
        target: a `HunyuanVideoPipeline` (the cache becomes one of its hooks: steps and CFG rows come from the
            loop), a bare DiT, or a `UlyssesDiT` (the decision's sums are all-reduced over its group).
        mode: "fbcache" or "teacache".
        threshold: skip while the signal stays below it (`DEFAULT_THRESHOLDS` when None); 0 never skips.
        coefficients: TeaCache's rescaling polynomial (default HunyuanVideo's; None: the raw relative change).

    Use as a context manager, or ``attach()`` / ``detach()``. With a bare model, call ``begin(num_steps)``
    and ``set_step(i)`` around the model calls, as the pipeline's hooks do.
    """

    def __init__(self, target, mode: str = "teacache", threshold: float | None = None, *,
                 coefficients: Sequence[float] | None = TEACACHE_HUNYUAN_COEFFICIENTS):
        mode, threshold = check_cache_args(mode, threshold)
        if mode is None:
            raise ValueError("StepCache needs mode 'fbcache' or 'teacache' (for no cache, attach none)")
        if coefficients is not None:
            coefficients = tuple(coefficients)
            if not coefficients or not all(isinstance(c, (int, float)) and math.isfinite(c) for c in coefficients):
                raise ValueError(f"coefficients must be finite numbers, highest power first, or None, "
                                 f"got {coefficients!r}")
        self.mode, self.threshold, self.coefficients = mode, threshold, coefficients
        self.pipe = target if hasattr(target, "transformer") else None
        self._target = None if self.pipe is not None else target
        self.model, _ = self._resolve()
        if not len(self.model.double_blocks):
            raise ValueError(f"{mode} reads the first double-stream block; this model has mm_double_blocks_depth 0")
        self.stats: CacheStats | None = None
        self.num_steps: int | None = None
        self._attached = False
        self._step: int | None = None
        self._pending = None

    # ---- installing -------------------------------------------------------------------------------
    def _resolve(self):
        """(the plain DiT, its Ulysses wrapper or None) behind the target as it is now."""
        from .parallel import UlyssesDiT

        t = self.pipe.transformer if self.pipe is not None else self._target
        if isinstance(t, UlyssesDiT):
            return t.model, (t if t.degree > 1 else None)
        if not (hasattr(t, "double_blocks") and hasattr(t, "single_stream")):
            raise TypeError(f"StepCache needs a HYVideoDiffusionTransformer, a UlyssesDiT or a pipeline holding one, "
                            f"got {type(t).__name__}")
        return t, None

    def attach(self) -> "StepCache":
        m = self.model
        if "double_stream" in vars(m) or "single_stream" in vars(m):
            raise RuntimeError(f"this {type(m).__name__} already has its double_stream / single_stream replaced "
                               "(another StepCache?); detach that one first")
        self._orig_single = m.single_stream
        m.double_stream, m.single_stream = self._double_stream, self._single_stream
        if self.pipe is not None:
            self.pipe.hooks.append(self)
        self._attached = True
        return self

    def detach(self) -> None:
        if not self._attached:
            return
        for name in ("double_stream", "single_stream"):
            vars(self.model).pop(name, None)
        if self.pipe is not None and self in self.pipe.hooks:
            self.pipe.hooks.remove(self)
        self._attached, self._step, self._pending = False, None, None

    def __enter__(self) -> "StepCache":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # ---- the step clock (pipeline hooks, or by hand) -----------------------------------------------
    def begin(self, num_steps: int, start_step: int = 0, cond_rows: Sequence[int] | None = None) -> None:
        """A new generation of ``num_steps`` steps starting at ``start_step``: earlier state is dropped."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        if not 0 <= start_step < num_steps:
            raise ValueError(f"start_step must be in [0, {num_steps - 1}], got {start_step!r}")
        if self.pipe is not None and any(type(h).__name__ == "AttentionRecorder" for h in self.pipe.hooks):
            raise ValueError("StepCache skips the blocks (and runs row subsets) that AttentionRecorder records: "
                             "detach one of them (CLI: drop --cache or --record-attention)")
        model, self._ulysses = self._resolve()
        if model is not self.model:
            raise RuntimeError("the pipeline's transformer changed since this StepCache was attached; attach it again")
        self.num_steps, self.start_step = num_steps, start_step
        self._cond_rows = None if cond_rows is None else list(cond_rows)
        self._prev = self._residual = None  # (B, L_img, D): last signal, last residual
        self._acc: torch.Tensor | None = None  # (B,) float64: TeaCache's accumulated estimate
        self._step, self._called, self._pending = None, set(), None
        self.stats = None

    def set_step(self, i: int) -> None:
        if self.num_steps is None:
            raise RuntimeError("call begin(num_steps) before set_step")
        if not 0 <= i < self.num_steps:
            raise ValueError(f"step must be in [0, {self.num_steps - 1}], got {i!r}")
        self._step = i

    def on_generation_begin(self, info) -> None:
        self.begin(info.num_inference_steps, info.start_step, info.cond_rows)

    def on_step_begin(self, i: int) -> None:
        self.set_step(i)

    def on_generation_end(self) -> None:
        self._step = None

    def report(self) -> dict:
        """{"cache": summary} for the pipeline's ``out.timings`` (empty before the first DiT call)."""
        return {} if self.stats is None else {"cache": self.stats.report()}

    # ---- the replaced stack -------------------------------------------------------------------------
    def _row_labels(self, B: int) -> list[str]:
        if self._cond_rows is None or len(self._cond_rows) == B:
            return [f"cond {b}" if self._cond_rows is not None else f"row {b}" for b in range(B)]
        cond = set(self._cond_rows)
        n_uncond = B - len(cond)
        return [f"cond {b - n_uncond}" if b in cond else f"uncond {b}" for b in range(B)]

    def _double_stream(self, img, txt, vec, freqs_cis, txt_lens=None):
        i = self._step
        if i is None:
            raise RuntimeError("StepCache does not know the step: run the model inside the pipeline it is attached "
                               "to, or call cache.begin(num_steps) and cache.set_step(i) before each call")
        if i in self._called:
            raise RuntimeError(f"StepCache saw a second DiT call at step {i}: it caches one call per step (true CFG "
                               "batches both branches into one call); detach it for other uses")
        self._called.add(i)
        B, m = img.shape[0], self.model
        if self.stats is None:
            self.stats = CacheStats(self.mode, self.threshold, self.num_steps, self._row_labels(B))
        elif len(self.stats.rows) != B:
            raise RuntimeError(f"the DiT batch changed from {len(self.stats.rows)} to {B} rows within a generation")
        if self.mode == "fbcache":
            img0, txt0 = m.double_blocks[0](img, txt, vec, freqs_cis, txt_lens)
            signal, base, blocks = img0 - img, (img0, txt0), m.double_blocks[1:]
        else:
            signal, base, blocks = teacache_signal(m.double_blocks[0], img, vec), (img, txt), m.double_blocks
        compute = self._decide(i, signal)
        self._pending = self._run(compute, *base, blocks, vec, freqs_cis, txt_lens)
        return img, txt  # single_stream (replaced too) returns the stack's output

    def _single_stream(self, img, txt, vec, freqs_cis, txt_lens=None):
        out, self._pending = self._pending, None
        return self._orig_single(img, txt, vec, freqs_cis, txt_lens) if out is None else out

    def _decide(self, i: int, signal: torch.Tensor) -> list[bool]:
        """Which rows run the blocks at step i; updates the signal state and the log."""
        B = signal.shape[0]
        forced = i in (0, self.start_step, self.num_steps - 1) or self._prev is None
        rel = None
        if self._prev is not None:
            sums = torch.stack([l1_rows(signal, self._prev), l1_rows(self._prev)])  # (2, B)
            if self._ulysses is not None:  # each rank holds 1/N of the tokens: decide on the whole
                import torch.distributed as dist

                dist.all_reduce(sums, group=self._ulysses.group)  # group None: the default (world) group
            num, den = sums.double().cpu()
            rel = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.inf))
        if self.mode == "teacache":
            if self._acc is None or forced:
                self._acc = torch.zeros(B, dtype=torch.float64)
                compute = [True] * B
            else:
                self._acc += torch.tensor([rescale(float(r), self.coefficients) for r in rel], dtype=torch.float64)
                compute = (~(self._acc < self.threshold)).tolist()  # NaN computes
            acc_log = self._acc.tolist()
            self._acc[torch.tensor(compute)] = 0.0
            self._prev = signal  # TeaCache compares consecutive steps, computed or not
        else:
            compute = [True] * B if forced else (~(rel < self.threshold)).tolist()  # NaN computes
            acc_log = [math.nan] * B if rel is None else rel.tolist()
            if all(compute):
                self._prev = signal  # FBCache compares with the last *computed* step's first-block residual
            elif any(compute):
                rows = torch.tensor([b for b in range(B) if compute[b]], device=signal.device)
                self._prev[rows] = signal[rows]
        s = self.stats
        s.steps.append(i)
        s.signal.append([None] * B if rel is None else rel.tolist())
        s.accumulated.append(acc_log)
        s.computed.append(compute)
        return compute

    def _run(self, compute, img, txt, blocks, vec, freqs_cis, txt_lens):
        """The rest of the stack for the rows in ``compute``; the cached residual for the others."""
        if all(compute):  # the uncached path, exactly: the blocks on the whole batch
            out = self._stack(img, txt, blocks, vec, freqs_cis, txt_lens)
            self._residual = out - img
            return out
        skip = torch.tensor([not c for c in compute], device=img.device)
        out = torch.empty_like(img)
        out[skip] = img[skip] + self._residual[skip]
        if any(compute):
            rows = (~skip).nonzero().squeeze(1)
            sub = self._stack(img[rows], txt[rows], blocks, vec[rows], freqs_cis, None if txt_lens is None
                              else txt_lens[rows])
            out[rows] = sub
            self._residual[rows] = sub - img[rows]
        return out

    def _stack(self, img, txt, blocks, vec, freqs_cis, txt_lens):
        for block in blocks:
            img, txt = block(img, txt, vec, freqs_cis, txt_lens)
        return self._orig_single(img, txt, vec, freqs_cis, txt_lens)


def enable_step_cache(pipe, mode: str | None, threshold: float | None = None) -> StepCache | None:
    """Attach a `StepCache` to ``pipe`` for ``mode`` "fbcache" / "teacache" (None or "off": nothing); returns it."""
    mode, threshold = check_cache_args(mode, threshold)
    return None if mode is None else StepCache(pipe, mode, threshold).attach()


# --- CPU test harness (gloo), as in hvlab.fast.parallel -------------------------------------------------

def run_cached_loop(model, steps: Sequence[dict], mode: str, threshold: float) -> tuple[list[torch.Tensor], dict]:
    """``model(**steps[i])`` for i = 0, 1, ... under one `StepCache`; returns (outputs, ``stats.to_dict()``)."""
    cache = StepCache(model, mode, threshold)
    outs = []
    with torch.no_grad(), cache:
        cache.begin(len(steps))
        for i, inputs in enumerate(steps):
            cache.set_step(i)
            outs.append(model(**inputs))
    return outs, cache.stats.to_dict()


def _spawn_worker(rank, world_size, port, config, state_dict, steps, configs, out_dir) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from ..model import HYVideoDiffusionTransformer
    from .parallel import UlyssesDiT

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))  # ranks that disagree fail instead of hanging
    try:
        model = HYVideoDiffusionTransformer(config)
        model.load_state_dict(state_dict)
        with UlyssesDiT(model.eval()) as sp:
            runs = [run_cached_loop(sp, steps, mode, threshold) for mode, threshold in configs]
        torch.save([dict(outs=outs, stats=stats) for outs, stats in runs], f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_cached_loop(model, steps: Sequence[dict], configs: Sequence[tuple[str, float]],
                      world_size: int) -> list[list[dict]]:
    """`run_cached_loop` on a `UlyssesDiT` over ``world_size`` gloo CPU processes, once per (mode, threshold) of
    ``configs``: per rank, per config, {"outs", "stats"}."""
    import tempfile

    import torch.multiprocessing as mp

    from .parallel import free_port

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_spawn_worker, args=(world_size, free_port(), model.config, state, list(steps), list(configs), tmp),
                 nprocs=world_size, join=True)
        return [torch.load(f"{tmp}/rank{r}.pt") for r in range(world_size)]


__all__ = ["MODES", "DEFAULT_THRESHOLDS", "TEACACHE_HUNYUAN_COEFFICIENTS", "StepCache", "CacheStats",
           "check_cache_args", "enable_step_cache", "teacache_signal", "l1_rows", "rescale"]
