"""Hooks that look inside a generation while it runs: latents and attention maps at every step.

A hook is an object in ``pipe.hooks``. The pipeline calls, when a hook has them,

    on_generation_begin(info: GenerationInfo)   # sizes, steps, prompts, which batch rows are conditional
    on_step_begin(i)                            # before the DiT evaluation of step i
    on_step_end(state: StepState)               # after the Euler update of step i
    on_generation_end()

Hooks are installed with ``with``, and the model is restored on exit, exception or not::

    with LatentRecorder(pipe, rgb_map=...) as lat, AttentionRecorder(pipe, steps=[10], blocks=[("double", 1)]) as att:
        out = pipe("a red circle moving right", seed=0)
    maps = att.text_maps()            # one heat map per prompt word, (T, H, W) on the post-patch grid

**Which attention is recorded.** The DiT's attention matrix over the joint sequence [video | text] is
``A[i, j] = softmax_j(q_i . k_j / sqrt(hd))`` (rows = queries). hvlab's default text -> video heat map
for a text token j is the *column* ``A[i, j]`` over the video query rows i: how much each video token
reads from that word ("text token as key"). The other reading, ``direction="query"``, is the *row* of
text token j over the video keys: where that word looks in the video. Subword tokens are merged into
words: columns are **summed** (the probability mass a video token puts on the word), rows are
**averaged** (the mean distribution of the word's tokens). Padded text tokens never take part: like
the official varlen kernel, a sample's real tokens attend only among themselves.

**No L x L tensor.** At 720p the sequence has ~119k tokens and one head's matrix would be 56 GB.
The recorder lets the block's fast attention compute the output unchanged and, on the side, computes
each video row's exact normaliser ``lse_i = logsumexp_j (q_i . k_j / sqrt(hd))`` over all keys, in
chunks of rows, then only the requested columns ``exp(score - lse)``. Memory: one chunk of scores
(``max_elements`` floats, 256 MB by default) plus the maps that are kept.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

DIRECTIONS = ("key", "query")
_DIRECTION_TEXT = {"key": "text token as key, video tokens as queries (column of A)",
                   "query": "text token as query, video tokens as keys (row of A)",
                   "video_query": "one video token as query, over the video keys (row of A)"}


class PipelineHook:
    """Base class: registers itself in ``pipe.hooks`` inside ``with`` and removes itself on exit."""

    def __init__(self, pipe=None):
        self.pipe = pipe

    def on_generation_begin(self, info) -> None:
        pass

    def on_step_begin(self, i: int) -> None:
        pass

    def on_step_end(self, state) -> None:
        pass

    def on_generation_end(self) -> None:
        pass

    def attach(self):
        if self.pipe is not None:
            self.pipe.hooks.append(self)
        return self

    def detach(self) -> None:
        if self.pipe is not None and self in self.pipe.hooks:
            self.pipe.hooks.remove(self)

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


# ---- latents ----------------------------------------------------------------------------------------

def channel_stats(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel mean and std of latents (B, C, T, H, W) over T, H, W: each (B, C), float32."""
    z = z.float()
    return {"mean": z.mean(dim=(2, 3, 4)), "std": z.std(dim=(2, 3, 4))}


class LatentRecorder(PipelineHook):
    """Records, every ``every`` steps (and always the last): the latent x after the step, the predicted
    clean latent x0 = x_in - sigma * v, per-channel mean/std of both and an RGB preview of x0 through a
    16 -> 3 linear map (``rgb_map``, see `hvlab.inspection.preview`; default ``pipe.latent_rgb_map``); and, every
    ``decode_every`` steps (and the last), a true VAE decode of x0. Everything is stored on the CPU in
    float32.

    Results: ``steps``, ``sigmas`` (the step's starting noise level), ``latents`` / ``x0`` (S, B, C, T, H, W),
    ``stats[name]`` (S, B, C) for name in latent_mean, latent_std, x0_mean, x0_std, ``previews``
    (S, B, 3, T, H, W) in [0, 1], ``decoded`` {step: (B, 3, F, H, W)}.
    """

    def __init__(self, pipe, every: int = 1, rgb_map: dict | None = None, decode_every: int | None = None,
                 keep_latents: bool = True):
        super().__init__(pipe)
        if every < 1:
            raise ValueError(f"every must be >= 1 (record every k-th step), got {every}")
        if decode_every is not None and decode_every < 1:
            raise ValueError(f"decode_every must be None or >= 1, got {decode_every}")
        self.every, self.decode_every, self.keep_latents = every, decode_every, keep_latents
        self.rgb_map = rgb_map if rgb_map is not None else getattr(pipe, "latent_rgb_map", None)
        self.steps: list[int] = []
        self.sigmas: list[float] = []
        self._latents, self._x0, self._previews = [], [], []
        self._stats: dict[str, list[torch.Tensor]] = {}
        self.decoded: dict[int, torch.Tensor] = {}

    def on_step_end(self, state) -> None:
        i, last = state.i, state.i == state.n - 1
        x0 = state.x0  # (B, C, T, H, W) float32
        if self.decode_every is not None and (i % self.decode_every == 0 or last):
            self.decoded[i] = self.pipe.decode(x0, progress=False)
        if i % self.every and not last:
            return
        self.steps.append(i)
        self.sigmas.append(state.sigma)
        for name, z in (("latent", state.latents), ("x0", x0)):
            for stat, value in channel_stats(z).items():
                self._stats.setdefault(f"{name}_{stat}", []).append(value.cpu())
        if self.keep_latents:
            self._latents.append(state.latents.float().cpu())
            self._x0.append(x0.cpu())
        if self.rgb_map is not None:
            from .preview import latent_to_rgb

            self._previews.append(latent_to_rgb(x0, self.rgb_map).cpu())

    @property
    def latents(self) -> torch.Tensor:
        return torch.stack(self._latents)

    @property
    def x0(self) -> torch.Tensor:
        return torch.stack(self._x0)

    @property
    def previews(self) -> torch.Tensor | None:
        return torch.stack(self._previews) if self._previews else None

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        return {k: torch.stack(v) for k, v in self._stats.items()}


# ---- prompt words -------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")


def token_words(text_encoder, prompt: str) -> tuple[list[str], list[int], list[str]]:
    """Which prompt word each of the DiT's text tokens belongs to.

    Tokenizes the prompt inside the encoder's template exactly as `TextEncoder.encode` does, drops
    the ``crop_start`` template tokens, and maps each remaining token to the word (a run of letters /
    digits, or one punctuation mark) its character span overlaps, using the fast tokenizer's offsets.
    Returns ``(words, word_of_token, tokens)``: ``word_of_token[j]`` indexes ``words`` or is -1 for a
    token outside the prompt (e.g. the closing ``<|eot_id|>``); ``tokens`` are the token strings.
    """
    from ..prompts import split_template

    tok = text_encoder.tokenizer
    if not getattr(tok, "is_fast", False):
        raise TypeError(f"token_words needs a fast tokenizer (character offsets); got {type(tok).__name__}")
    prefix, suffix = split_template(text_encoder.template) if text_encoder.template is not None else ("", "")
    enc = tok(prefix + prompt + suffix, add_special_tokens=True, return_offsets_mapping=True, truncation=True,
              max_length=text_encoder.max_length + text_encoder.crop_start)
    c = text_encoder.crop_start
    offsets, ids = enc["offset_mapping"][c:], enc["input_ids"][c:]
    spans = [(m.start(), m.end()) for m in _WORD.finditer(prompt)]
    words = [prompt[a:b] for a, b in spans]
    word_of_token = []
    for a, b in offsets:
        a, b = a - len(prefix), b - len(prefix)
        hit = [w for w, (s, e) in enumerate(spans) if a < e and s < b and b > a]
        word_of_token.append(hit[0] if hit else -1)
    return words, word_of_token, tok.convert_ids_to_tokens(ids)


# ---- attention probabilities without an L x L tensor -------------------------------------------------

def _rows(max_elements: int, n_keys: int) -> int:
    return max(1, max_elements // max(1, n_keys))


@torch.no_grad()
def text_video_probs(q: torch.Tensor, k: torch.Tensor, *, img_len: int, txt_lens: torch.Tensor | None = None,
                     direction: str = "key", rows: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                     max_elements: int = 2**26) -> torch.Tensor:
    """Exact attention probabilities between every real text token and the video tokens.

    q, k: (B, L, nh, hd) as a block passes them to ``attn_fn`` ([video | text], text padded right).
    ``direction="key"``: ``P[b, h, j, i] = A[i, img_len + j]``, video query i's weight on text key j,
    normalised over all of row i's keys with a chunked log-sum-exp (``max_elements`` scores at a time).
    ``direction="query"``: ``P[b, h, j, i] = A[img_len + j, i]``, text query j's weight on video key i.
    Returns (len(rows), len(heads), n_txt, img_len) float32 on q's device, n_txt = the largest real text
    length among ``rows``; entries of padded text tokens are 0.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    B, L, nh, hd = q.shape
    rows = list(range(B)) if rows is None else list(rows)
    heads = list(range(nh)) if heads is None else list(heads)
    lens = [L - img_len] * B if txt_lens is None else [int(n) for n in txt_lens.tolist()]
    n_txt = max(lens[b] for b in rows)
    out = torch.zeros(len(rows), len(heads), n_txt, img_len, device=q.device)
    scale = hd ** -0.5
    for bi, b in enumerate(rows):
        n, tl = img_len + lens[b], lens[b]
        for hi, h in enumerate(heads):
            kh = k[b, :n, h].float()  # (n, hd): the sample's real keys only
            if direction == "query":
                s = (q[b, img_len:n, h].float() @ kh.T) * scale  # (tl, n): tl rows are cheap
                out[bi, hi, :tl] = s.softmax(dim=-1)[:, :img_len]
                continue
            chunk = _rows(max_elements, n)
            for r0 in range(0, img_len, chunk):
                r1 = min(r0 + chunk, img_len)
                s = (q[b, r0:r1, h].float() @ kh.T) * scale  # (c, n) one chunk of video rows
                lse = torch.logsumexp(s, dim=-1, keepdim=True)  # exact normaliser of each row
                out[bi, hi, :tl, r0:r1] = (s[:, img_len:n] - lse).exp().T
    return out


@torch.no_grad()
def video_query_probs(q: torch.Tensor, k: torch.Tensor, query_index: Sequence[int], *, img_len: int,
                      txt_lens: torch.Tensor | None = None, rows: Sequence[int] | None = None,
                      heads: Sequence[int] | None = None) -> torch.Tensor:
    """Rows of A for chosen video query tokens, restricted to the video keys:
    (len(rows), len(heads), len(query_index), img_len) float32 (normalised over all real keys)."""
    B, L, nh, hd = q.shape
    rows = list(range(B)) if rows is None else list(rows)
    heads = list(range(nh)) if heads is None else list(heads)
    lens = [L - img_len] * B if txt_lens is None else [int(n) for n in txt_lens.tolist()]
    idx = torch.as_tensor(list(query_index), device=q.device, dtype=torch.long)
    out = torch.zeros(len(rows), len(heads), len(idx), img_len, device=q.device)
    for bi, b in enumerate(rows):
        n = img_len + lens[b]
        for hi, h in enumerate(heads):
            s = (q[b, idx, h].float() @ k[b, :n, h].float().T) * hd ** -0.5
            out[bi, hi] = s.softmax(dim=-1)[:, :img_len]
    return out


# ---- the result -------------------------------------------------------------------------------------

@dataclass
class AttentionMaps:
    """Heat maps indexed by (step, block, head, label) on the post-patch grid (T, H, W).

    ``maps`` is (S, K, NH, N, T, H, W) float32 on the CPU. Reduced axes keep size 1 and their label
    says what was done (e.g. ``heads == ["mean of heads 0-2"]``); ``aggregation`` repeats it in words.
    """

    maps: torch.Tensor
    steps: list
    blocks: list
    heads: list
    labels: list[str]
    direction: str
    aggregation: dict = field(default_factory=dict)
    prompt: str | None = None

    _AXES = ("steps", "blocks", "heads")

    def _index(self, axis: str, value) -> int:
        values = getattr(self, axis)
        if value is None:
            if len(values) != 1:
                raise ValueError(f"several {axis} were recorded ({values}): pass {axis[:-1]}=...")
            return 0
        if axis == "blocks" and isinstance(value, list):
            value = tuple(value)
        if value not in values:
            raise KeyError(f"{axis[:-1]} {value!r} was not recorded; available: {values}")
        return values.index(value)

    def get(self, label: str | int, step=None, block=None, head=None) -> torch.Tensor:
        """One (T, H, W) map; ``label`` is a word (or its index)."""
        n = label if isinstance(label, int) else self.label_index(label)
        return self.maps[self._index("steps", step), self._index("blocks", block), self._index("heads", head), n]

    def label_index(self, label: str) -> int:
        if label not in self.labels:
            raise KeyError(f"{label!r} is not among the recorded words {self.labels}")
        return self.labels.index(label)

    def mean(self, over: str | Sequence[str]) -> "AttentionMaps":
        """Average over "steps", "blocks" and/or "heads"; the labels and ``aggregation`` say so."""
        out = self
        for axis in [over] if isinstance(over, str) else over:
            if axis not in self._AXES:
                raise ValueError(f"can average over {self._AXES}, got {axis!r}")
            dim = self._AXES.index(axis)
            values = getattr(out, axis)
            label = f"mean of {axis} {_fmt(values)}"
            out = replace(out, maps=out.maps.mean(dim=dim, keepdim=True), **{axis: [label]},
                          aggregation={**out.aggregation, axis: label})
        return out

    def describe(self, step=None, block=None, head=None) -> str:
        """A title fragment stating what a map is and every aggregation in it."""
        s = self.steps[self._index("steps", step)]
        b = self.blocks[self._index("blocks", block)]
        h = self.heads[self._index("heads", head)]
        parts = [f"step {s}" if isinstance(s, int) else s,
                 f"block {b[0]} {b[1]}" if isinstance(b, tuple) else b,
                 f"head {h}" if isinstance(h, int) else h]
        if "words" in self.aggregation:
            parts.append(self.aggregation["words"])
        return ", ".join(parts)


def _fmt(values) -> str:
    if all(isinstance(v, int) for v in values) and values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
        return f"{values[0]}-{values[-1]}"
    return ", ".join(str(v) for v in values)


def upsample_to_video(maps: torch.Tensor, video_length: int, height: int, width: int) -> torch.Tensor:
    """Maps (..., T, H, W) on the post-patch grid -> (..., F, height, width) per video frame, nearest.

    The causal VAE puts video frame 0 alone in latent frame 0 and frames 4k-3 .. 4k in latent frame k,
    so frame f reads latent frame ceil(f / r) with r = (F - 1) / (T - 1) (4 for the release VAE).
    """
    T, H, W = maps.shape[-3:]
    if height % H or width % W:
        raise ValueError(f"frame size {height}x{width} must be a multiple of the map grid {H}x{W}")
    r = (video_length - 1) // (T - 1) if T > 1 else 1
    t_idx = torch.tensor([-(-f // r) if T > 1 else 0 for f in range(video_length)])  # ceil(f / r)
    if int(t_idx.max()) >= T:
        raise ValueError(f"video_length {video_length} does not match {T} latent frames (expected {(T - 1) * r + 1})")
    out = maps.index_select(-3, t_idx.to(maps.device))
    return out.repeat_interleave(height // H, dim=-2).repeat_interleave(width // W, dim=-1)


# ---- the attention recorder --------------------------------------------------------------------------

def resolve_blocks(model, blocks) -> list[tuple[str, int]]:
    """("double", i) / ("single", j) pairs, negative indices allowed, checked against the model."""
    counts = {"double": len(model.double_blocks), "single": len(model.single_blocks)}
    out = []
    for b in blocks:
        if not (isinstance(b, (tuple, list)) and len(b) == 2 and b[0] in counts and isinstance(b[1], int)):
            raise ValueError(f'blocks must be ("double", i) or ("single", j) pairs, got {b!r}')
        n = counts[b[0]]
        if not -n <= b[1] < n:
            raise IndexError(f"{b[0]} block index must be in [{-n}, {n - 1}]: the model has {n} {b[0]}-stream "
                             f"blocks; got {b[1]}")
        out.append((b[0], b[1] % n))
    return out


class AttentionRecorder(PipelineHook):
    """Text <-> video attention heat maps at chosen (step, block, head), without an L x L tensor.

    Args:
        target: a `HunyuanVideoPipeline` (steps come from the pipeline; only the rows of the DiT batch
            that hold the prompts are recorded, not the negative prompt's CFG rows), or a bare DiT (a
            step is counted per forward call; all rows are recorded).
        steps: step indices to record (None: every step).
        blocks: ("double", i) / ("single", j) pairs; default the last double-stream block.
        heads: head indices (None: all).
        direction: "key" (default), "query" or "both"; see the module docstring.
        query_tokens: video query tokens, as (t, h, w) on the post-patch grid or flat indices, whose
            attention over the video is recorded too (`query_maps`).
        reduce_heads / reduce_steps: "none" or "mean": average while recording (saves memory at 720p);
            the results' labels and ``aggregation`` say so.
        max_elements: scores held at once per chunk of query rows.
    """

    def __init__(self, target, steps: Sequence[int] | None = None, blocks=(("double", -1),),
                 heads: Sequence[int] | None = None, direction: str = "key", query_tokens=(),
                 reduce_heads: str = "none", reduce_steps: str = "none", max_elements: int = 2**26):
        is_pipe = hasattr(target, "transformer")
        super().__init__(target if is_pipe else None)
        self.model = target.transformer if is_pipe else target
        for name, value in (("reduce_heads", reduce_heads), ("reduce_steps", reduce_steps)):
            if value not in ("none", "mean"):
                raise ValueError(f'{name} must be "none" or "mean", got {value!r}')
        if direction not in DIRECTIONS + ("both",):
            raise ValueError(f'direction must be "key", "query" or "both", got {direction!r}')
        self.directions = DIRECTIONS if direction == "both" else (direction,)
        self.blocks = resolve_blocks(self.model, blocks)
        nh = self.model.config.heads_num
        self.heads = list(range(nh)) if heads is None else [int(h) for h in heads]
        if any(not 0 <= h < nh for h in self.heads):
            raise IndexError(f"heads must lie in [0, {nh - 1}] (the model has {nh} heads), got {self.heads}")
        self.steps = None if steps is None else sorted(int(s) for s in steps)
        self.query_tokens = list(query_tokens)
        self.reduce_heads, self.reduce_steps, self.max_elements = reduce_heads, reduce_steps, max_elements
        # records[(kind, step or "mean", block)] = (B_sel, NH', N, T, H, W) float32 on the CPU (a sum when averaging)
        self.records: dict[tuple, torch.Tensor] = {}
        self.counts: dict[tuple, int] = {}
        self.grid: tuple[int, int, int] | None = None
        self.prompts: list[str] | None = None
        self.rows: list[int] | None = None
        self.txt_lens: list[int] | None = None
        self._step, self._calls, self._driven = None, 0, False
        self._originals: list = []
        self._pre_hook = None

    # -- step tracking --
    def on_generation_begin(self, info) -> None:
        """A new generation: earlier records are dropped."""
        self.records.clear()
        self.counts.clear()
        self.txt_lens = None
        self._driven = True
        self.rows = list(info.cond_rows)
        self.prompts = list(info.prompts) if info.prompts is not None else None
        self.steps_total = info.num_inference_steps

    def on_step_begin(self, i: int) -> None:
        self._step = i

    def _forward_pre_hook(self, module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        self.grid = tuple(int(n) for n in module.grid_size(x.shape))
        if not self._driven:
            self._step, self._calls = self._calls, self._calls + 1

    # -- install / restore --
    def attach(self):
        self._pre_hook = self.model.register_forward_pre_hook(self._forward_pre_hook, with_kwargs=True)
        for kind, i in self.blocks:
            block = (self.model.double_blocks if kind == "double" else self.model.single_blocks)[i]
            self._originals.append((block, block.attn_fn))
            block.attn_fn = self._wrap((kind, i), block.attn_fn)
        return super().attach()

    def detach(self) -> None:
        while self._originals:
            block, fn = self._originals.pop()
            block.attn_fn = fn
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None
        super().detach()

    def _wrap(self, block_id, original):
        def attn_fn(q, k, v, *, img_len, txt_lens=None):
            out = original(q, k, v, img_len=img_len, txt_lens=txt_lens)  # the output is the fast path's
            if self.steps is None or self._step in self.steps:
                self._capture(block_id, q, k, img_len, txt_lens)
            return out

        attn_fn.__wrapped__ = original
        return attn_fn

    def _capture(self, block_id, q, k, img_len, txt_lens) -> None:
        rows = self.rows if self.rows is not None else list(range(q.shape[0]))
        if self.txt_lens is None:
            L_txt = q.shape[1] - img_len
            self.txt_lens = [L_txt] * len(rows) if txt_lens is None else [int(txt_lens[b]) for b in rows]
        step = "mean" if self.reduce_steps == "mean" else self._step
        jobs = [(d, lambda h, d=d: text_video_probs(q, k, img_len=img_len, txt_lens=txt_lens, direction=d,
                                                     rows=rows, heads=[h], max_elements=self.max_elements))
                for d in self.directions]
        if self.query_tokens:
            idx = [self._flat(t) for t in self.query_tokens]
            jobs.append(("video_query", lambda h: video_query_probs(q, k, idx, img_len=img_len, txt_lens=txt_lens,
                                                                     rows=rows, heads=[h])))
        for kind, fn in jobs:
            per_head = []
            for h in self.heads:  # one head at a time bounds the device memory at 720p
                p = fn(h)  # (B_sel, 1, N, L_img)
                per_head.append(p.cpu() if self.reduce_heads == "none" else p)
            p = torch.cat(per_head, 1) if self.reduce_heads == "none" else torch.stack(per_head).mean(0).cpu()
            p = p.reshape(*p.shape[:3], *self.grid)  # (B_sel, NH', N, T, H, W)
            key = (kind, step, block_id)
            self.records[key] = self.records[key] + p if key in self.records else p
            self.counts[key] = self.counts.get(key, 0) + 1

    def _flat(self, token) -> int:
        if isinstance(token, int):
            return token
        T, H, W = self.grid
        t, h, w = token
        if not (0 <= t < T and 0 <= h < H and 0 <= w < W):
            raise IndexError(f"query token {token} is outside the post-patch grid (T, H, W) = {self.grid}")
        return (t * H + h) * W + w

    # -- results --
    def _assemble(self, kind: str, sample: int) -> tuple[torch.Tensor, list]:
        steps = sorted({s for (k, s, _) in self.records if k == kind}, key=lambda s: (s == "mean", s))
        if not steps:
            raise ValueError(f"nothing recorded for {kind!r}: did a generation run inside `with` at the recorded "
                             f"steps {self.steps} (directions {self.directions}, query_tokens {self.query_tokens})?")
        maps = torch.stack([torch.stack([self.records[(kind, s, b)][sample] / self.counts[(kind, s, b)]
                                         for b in self.blocks]) for s in steps])  # (S, K, NH', N, T, H, W)
        if "mean" in steps:
            recorded = self.steps if self.steps is not None else list(range(self.counts[(kind, "mean", self.blocks[0])]))
            steps = [f"mean of steps {_fmt(recorded)}"]
        return maps, steps

    def _meta(self, steps) -> tuple[list, dict]:
        heads = self.heads if self.reduce_heads == "none" else [f"mean of heads {_fmt(self.heads)}"]
        agg = {"steps": steps[0] if self.reduce_steps == "mean" else "none",
               "heads": heads[0] if self.reduce_heads == "mean" else "none"}
        return heads, agg

    def text_maps(self, sample: int = 0, direction: str | None = None, merge_words: bool = True,
                  include_special: bool = False, text_encoder=None) -> AttentionMaps:
        """One map per prompt word (or per token with ``merge_words=False``) for video ``sample``.

        Words come from the pipeline's LLM tokenizer (``text_encoder`` for a bare model).
        ``include_special`` adds tokens outside the prompt (e.g. ``<|eot_id|>``) as their own labels.
        """
        direction = direction or self.directions[0]
        maps, steps = self._assemble(direction, sample)
        heads, agg = self._meta(steps)
        n = self.txt_lens[sample]
        maps = maps[:, :, :, :n]
        prompt = self.prompts[sample] if self.prompts is not None else None
        encoder = text_encoder or (self.pipe.text_encoder if self.pipe is not None else None)
        if not merge_words or prompt is None or encoder is None:
            agg["words"] = "one map per text token"
            return AttentionMaps(maps, steps, list(self.blocks), heads, [f"token {j}" for j in range(n)],
                                 direction, agg, prompt)
        words, word_of_token, tokens = token_words(encoder, prompt)
        word_of_token = (word_of_token + [-1] * n)[:n]
        groups = [[j for j in range(n) if word_of_token[j] == w] for w in range(len(words))]
        labels = list(words)
        if include_special:
            for j in range(n):
                if word_of_token[j] == -1:
                    groups.append([j])
                    labels.append(tokens[j] if j < len(tokens) else f"token {j}")
        keep = [(g, lab) for g, lab in zip(groups, labels) if g]  # a word cut off by truncation has no token
        how = "sum" if direction == "key" else "mean"
        merged = [maps[:, :, :, g].sum(3) if how == "sum" else maps[:, :, :, g].mean(3) for g, _ in keep]
        agg["words"] = (f"subword tokens {'summed' if how == 'sum' else 'averaged'} per word")
        return AttentionMaps(torch.stack(merged, 3), steps, list(self.blocks), heads, [lab for _, lab in keep],
                             direction, agg, prompt)

    def query_maps(self, sample: int = 0) -> AttentionMaps:
        """Each recorded video query token's attention over the video keys, labelled "query (t, h, w)"."""
        maps, steps = self._assemble("video_query", sample)
        heads, agg = self._meta(steps)
        labels = [f"query {tuple(t) if not isinstance(t, int) else t}" for t in self.query_tokens]
        prompt = self.prompts[sample] if self.prompts is not None else None
        return AttentionMaps(maps, steps, list(self.blocks), heads, labels, "video_query", agg, prompt)
