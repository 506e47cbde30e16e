"""Concept maps in the attention *output* space, in the manner of ConceptAttention (Helbling et al., 2025).

Cross-attention maps (``AttentionRecorder``) ask where the video *reads* a word from. In a DiT whose text
joins the sequence, those columns of the softmax look alike for every word of a prompt: each video token
spends its probability mass on the prompt as a whole. ConceptAttention asks a different question. Chosen
words ("concepts") get a token stream of their own that runs through the **text stream's own weights** in
every block, as if they were prompt tokens:

    double block:  c_x = modulate(txt_norm1(c));  q_c, k_c, v_c = QK-norm(txt_attn_qkv(c_x))
                   o_c = softmax(q_c [k_c | k_video]^T / sqrt(hd)) [v_c | v_video]
                   c  += gate * txt_attn_proj(o_c);   c += gate * txt_mlp(modulate(txt_norm2(c)))
    single block:  the same with modulation / pre_norm / linear1 / q_norm, k_norm / linear2 (GELU MLP half)

The concepts attend to themselves and the video tokens, **never the other way round**: no video or prompt
token ever reads a concept, so the generated video is bit for bit the one without the recorder. The map of
concept n in a block is the dot product of its attention output with every video token's attention output,

    M[n, i] = o_c[n] . o_video[i]          (summed over heads: the full D-wide vectors)

and ``maps(softmax=True)`` normalises over the concepts per video token (the paper's reading: which concept
does this patch's output look most like). Concepts need not be in the prompt: "triangle" on a circle video
should light up little.

Where the concept tokens come from: each word is encoded alone by the pipeline's text encoder (inside the
same template as a prompt), refined by the DiT's token refiner ``txt_in`` at the step's timestep, and the
refined states of the word's own tokens are averaged: one D-vector per concept.

Memory: per block only q, k, v and outputs of the N concept tokens, one head's [concept | video] keys at a
time, and one (N, L_video) map: no L x L tensor, well under 1 GiB at 720p for a handful of words.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from ..blocks import MMDoubleStreamBlock
from ..modulation import apply_gate, chunk_modulation, modulate
from .attention_maps import AttentionMaps, resolve_blocks
from .hooks import PipelineHook
from .words import token_words


def concept_attention(q_c: torch.Tensor, k_c: torch.Tensor, v_c: torch.Tensor, k_video: torch.Tensor,
                      v_video: torch.Tensor) -> torch.Tensor:
    """Concept queries over [concept | video] keys, one head at a time: (B, N, nh, hd).

    q_c, k_c, v_c: (B, N, nh, hd); k_video, v_video: (B, L_img, nh, hd) (views into the block's own k, v).
    """
    out = torch.empty_like(q_c)
    for h in range(q_c.shape[2]):
        k = torch.cat([k_c[:, :, h], k_video[:, :, h]], dim=1)  # (B, N + L_img, hd): one head's keys
        v = torch.cat([v_c[:, :, h], v_video[:, :, h]], dim=1)
        out[:, :, h] = F.scaled_dot_product_attention(q_c[:, None, :, h], k[:, None], v[:, None])[:, 0]
    return out


class ConceptRecorder(PipelineHook):
    """Output-space concept maps for chosen words at chosen (step, block), recorded during a generation.

    Args:
        pipe: a `HunyuanVideoPipeline` (its text encoder encodes the concepts; only the prompt rows of the
            DiT batch are recorded, not the negative prompt's CFG rows).
        concepts: words, e.g. ``["red", "circle", "blue", "square"]``; they need not occur in the prompt.
        steps: step indices to record (None: every step). The concept stream itself runs at every block of
            every recorded step (it has to: each block reads the stream the previous one wrote).
        blocks: ("double", i) / ("single", j) pairs whose maps are kept (None: every block).
    """

    def __init__(self, pipe, concepts: Sequence[str], steps: Sequence[int] | None = None, blocks=None):
        super().__init__(pipe)
        if isinstance(concepts, str) or not concepts or not all(isinstance(w, str) and w.strip() for w in concepts):
            raise ValueError(f"concepts must be a non-empty list of words, got {concepts!r}")
        self.model = pipe.transformer
        self.concepts = [w.strip() for w in concepts]
        self.all_blocks = [("double", i) for i in range(len(self.model.double_blocks))] + \
                          [("single", j) for j in range(len(self.model.single_blocks))]
        self.blocks = self.all_blocks if blocks is None else resolve_blocks(self.model, blocks)
        self.steps = None if steps is None else sorted(int(s) for s in steps)
        self.records: dict[tuple, torch.Tensor] = {}  # (step, block) -> (B_sel, N, T, H, W) float32 on the CPU
        self.grid: tuple[int, int, int] | None = None
        self.rows: list[int] | None = None
        self.prompts: list[str] | None = None
        self._step, self._calls, self._driven, self._active = None, 0, False, False
        self._pending = None  # one block's concept q, k, v, modulation and attention output
        self._states = None  # the concepts' encoded text states and mask, computed once
        self._c = None  # the concept stream (B_sel, N, D) between blocks
        self._handles, self._originals = [], []

    # -- the concept tokens --
    def _encode_concepts(self, device, dtype):
        enc = self.pipe.text_encoder
        out = enc.encode(self.concepts, device=device)
        # which of each concept's tokens spell the word (not the closing special token)
        pick = torch.zeros(out.attention_mask.shape, dtype=torch.float32, device=device)
        for n, word in enumerate(self.concepts):
            _, word_of_token, _ = token_words(enc, word)
            idx = [j for j, w in enumerate(word_of_token[: pick.shape[1]]) if w == 0]
            if not idx:
                raise ValueError(f"concept {word!r} has no token of its own after the template crop")
            pick[n, idx] = 1.0 / len(idx)
        return out.hidden_state.to(dtype), out.attention_mask, pick

    def _start_stream(self, t: torch.Tensor, n_rows: int, dtype) -> torch.Tensor:
        states, mask, pick = self._states
        N = len(self.concepts)
        refined = self.model.txt_in(states, t[:1].expand(N), mask)  # (N, L_txt, D) at this step's t
        c = torch.einsum("nl,nld->nd", pick.to(refined.dtype), refined)  # mean of each word's own tokens
        return c[None].expand(n_rows, -1, -1).to(dtype).contiguous()  # (B_sel, N, D)

    # -- hooks --
    def on_generation_begin(self, info) -> None:
        self.records.clear()
        self._driven = True
        self.rows = list(info.cond_rows)
        self.prompts = list(info.prompts) if info.prompts is not None else None

    def on_step_begin(self, i: int) -> None:
        self._step = i

    def _model_pre(self, module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        t = args[1] if len(args) > 1 else kwargs["t"]
        self.grid = tuple(int(n) for n in module.grid_size(x.shape))
        if not self._driven:
            self._step, self._calls = self._calls, self._calls + 1
        self._active = self.steps is None or self._step in self.steps
        if not self._active:
            return
        if self.rows is None:
            self.rows = list(range(x.shape[0]))
        param = next(module.parameters())
        if self._states is None:
            self._states = self._encode_concepts(x.device, param.dtype)
        t = torch.as_tensor(t, device=x.device)
        t = (t.expand(x.shape[0]) if t.dim() == 0 else t)[self.rows]
        self._c = self._start_stream(t, len(self.rows), param.dtype)

    def _block_pre(self, block, block_id, vec):
        """Before a block: the concept stream's modulation, q, k, v with the text stream's weights."""
        c, vec = self._c, vec[self.rows]
        if isinstance(block, MMDoubleStreamBlock):
            mod1, mod2 = chunk_modulation(block.txt_mod(vec), 2)
            x = modulate(block.txt_norm1(c), shift=mod1.shift, scale=mod1.scale)
            q, k, v = rearrange(block.txt_attn_qkv(x), "B N (K nh hd) -> K B N nh hd", K=3, nh=block.heads_num)
            q, k = block.txt_attn_q_norm(q).to(v), block.txt_attn_k_norm(k).to(v)
            self._pending = dict(q=q, k=k, v=v, mods=(mod1, mod2))
        else:
            (mod,) = chunk_modulation(block.modulation(vec), 1)
            x = modulate(block.pre_norm(c), shift=mod.shift, scale=mod.scale)
            qkv, mlp_in = torch.split(block.linear1(x), [3 * block.hidden_size, block.mlp_hidden_dim], dim=-1)
            q, k, v = rearrange(qkv, "B N (K nh hd) -> K B N nh hd", K=3, nh=block.heads_num)
            q, k = block.q_norm(q).to(v), block.k_norm(k).to(v)
            self._pending = dict(q=q, k=k, v=v, mods=(mod,), mlp_in=mlp_in)

    def _attention(self, block_id, q, k, v, out, img_len: int) -> None:
        """Inside the block's attention call: the concepts attend to [concepts | video]; the map is o_c . o_video."""
        p = self._pending
        rows = self.rows
        o_c = concept_attention(p["q"], p["k"], p["v"], k[rows, :img_len], v[rows, :img_len])  # (B_sel, N, nh, hd)
        p["o_c"] = o_c
        if block_id in self.blocks:
            m = torch.einsum("bnhd,blhd->bnl", o_c.float(), out[rows, :img_len].float())  # (B_sel, N, L_img)
            self.records[(self._step, block_id)] = m.reshape(*m.shape[:2], *self.grid).cpu()

    def _block_post(self, block) -> None:
        """After a block: the concept stream's residual updates, with the text stream's projection and MLP."""
        p, c = self._pending, self._c
        o_c = rearrange(p.pop("o_c"), "B N nh hd -> B N (nh hd)")
        if isinstance(block, MMDoubleStreamBlock):
            mod1, mod2 = p["mods"]
            c = c + apply_gate(block.txt_attn_proj(o_c), gate=mod1.gate)
            c = c + apply_gate(block.txt_mlp(modulate(block.txt_norm2(c), shift=mod2.shift, scale=mod2.scale)),
                               gate=mod2.gate)
        else:
            (mod,) = p["mods"]
            c = c + apply_gate(block.linear2(torch.cat([o_c, block.mlp_act(p["mlp_in"])], dim=-1)), gate=mod.gate)
        self._c, self._pending = c, None

    # -- install / restore --
    def attach(self):
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        for kind, i in self.all_blocks:
            block = (self.model.double_blocks if kind == "double" else self.model.single_blocks)[i]
            vec_at = 2 if kind == "double" else 1  # forward(img, txt, vec, ...) / forward(x, vec, img_len, ...)

            def pre(module, args, kwargs, block_id=(kind, i), vec_at=vec_at):
                if self._active:
                    self._block_pre(module, block_id, args[vec_at] if len(args) > vec_at else kwargs["vec"])

            def post(module, args, output):
                if self._active:
                    self._block_post(module)

            self._handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(block.register_forward_hook(post))
            self._originals.append((block, block.attn_fn))
            block.attn_fn = self._wrap((kind, i), block.attn_fn)
        return super().attach()

    def _wrap(self, block_id, original):
        def attn_fn(q, k, v, *, img_len, txt_lens=None):
            out = original(q, k, v, img_len=img_len, txt_lens=txt_lens)  # the video's attention, unchanged
            if self._active:
                with torch.no_grad():
                    self._attention(block_id, q, k, v, out, img_len)
            return out

        attn_fn.__wrapped__ = original
        return attn_fn

    def detach(self) -> None:
        while self._originals:
            block, fn = self._originals.pop()
            block.attn_fn = fn
        while self._handles:
            self._handles.pop().remove()
        super().detach()

    # -- results --
    def maps(self, sample: int = 0, softmax: bool = False) -> AttentionMaps:
        """One map per concept for video ``sample``: (S, K, 1, N, T, H, W) on the post-patch grid.

        ``softmax=True`` normalises over the concepts at each video token (the paper's maps), so the
        values say which concept a token's attention output is most like; the raw dot products otherwise.
        """
        if not self.records:
            raise ValueError("nothing recorded: did a generation run inside `with ConceptRecorder(...)` at the "
                             f"recorded steps {self.steps}?")
        steps = sorted({s for s, _ in self.records})
        maps = torch.stack([torch.stack([self.records[(s, b)][sample] for b in self.blocks]) for s in steps])
        if softmax:
            maps = maps.softmax(dim=2)
        maps = maps[:, :, None]  # (S, K, 1, N, T, H, W): one "head", the full width
        agg = {"heads": "dot product over all heads (full width)",
               "words": "softmax over the concepts per video token" if softmax else "raw output-space dot products"}
        prompt = self.prompts[sample] if self.prompts is not None else None
        return AttentionMaps(maps, steps, list(self.blocks), ["all heads"], list(self.concepts), "concept", agg,
                             prompt)
