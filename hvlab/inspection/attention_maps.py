"""Attention heat maps: the recorder that captures them during a generation, and the result it returns.

**Which attention is recorded.** The DiT's attention matrix over the joint sequence [video | text] is
``A[i, j] = softmax_j(q_i . k_j / sqrt(hd))`` (rows = queries). hvlab's default text -> video heat map
for a text token j is the *column* ``A[i, j]`` over the video query rows i: how much each video token
reads from that word ("text token as key"). The other reading, ``direction="query"``, is the *row* of
text token j over the video keys: where that word looks in the video. Subword tokens are merged into
words: columns are **summed** (the probability mass a video token puts on the word), rows are
**averaged** (the mean distribution of the word's tokens). Padded text tokens never take part: like
the official varlen kernel, a sample's real tokens attend only among themselves.

**No L x L tensor.** The recorder lets the block's attention compute the output unchanged and, on the side,
asks `hvlab.attention.text_video_probs` / `video_query_probs` for the wanted columns or rows (exact, chunked
log-sum-exp; see `hvlab.attention`). Memory: one chunk of scores (``max_elements`` floats, 256 MB by default)
plus the maps that are kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from ..attention import DIRECTIONS, text_video_probs, video_query_probs
from .hooks import PipelineHook
from .words import token_words


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
