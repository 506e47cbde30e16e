"""Ulysses sequence parallelism for the DiT on plain ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

A 720p x 129-frame video is L_img = 33 * 45 * 80 = 118,800 image tokens; attention over them is ~87% of a
step's FLOPs. Ulysses (DeepSpeed-Ulysses, Jacobs et al. 2023) splits that work over N ranks:

- **Outside attention** every token is independent (linears, norms, modulation, RoPE), so each rank keeps
  L_img / N consecutive image tokens (a *sequence shard*) and the matching rows of the RoPE tables.
  Text tokens (L_txt <= 256) stay **replicated**: every rank holds all of them and updates them identically.
- **Inside attention** a token needs every other token, but a *head* does not need the other heads. One
  all-to-all turns image q, k, v from (B, L_img/N, nh, hd) "all heads of my tokens" into
  (B, L_img, nh/N, hd) "all tokens of my heads"; the text q, k, v are sliced to the same heads locally.
  The unchanged single-GPU attention then runs on [image, text] with the same ``txt_lens``, so padded text
  is handled exactly as on one GPU. A second all-to-all sends the image output back to sequence shards;
  an all-gather over heads rebuilds the full text output on every rank, keeping text replicated.
- The final layer runs on the local shard, and the image tokens are all-gathered before ``unpatchify``:
  **every rank returns the full velocity**, so every rank can run the same scheduler step.

Communication per block and rank is 4 all-to-alls' worth of image activations (q, k, v, out), each moving
(N-1)/N of B * L_img/N * D values: 4 * B * L_img * D * (N-1) / N^2 in all, ~0.73 GB per block at 720p in
bf16 for N = 2, against ~87 TFLOP of attention per block and GPU; notebook 12 works this through.

What differs from a vanilla DiT's Ulysses: the sequence is [image | text] with text replicated instead of
sharded (sharding 256 padded text tokens would change the padding segments of the varlen attention), and
only the image part goes through the all-to-all.

**Why plain torch.distributed, not yunchang / xfuser** (the official release's xDiT path): those packages
bring flash-attn and pinned torch/diffusers versions, and hide the two all-to-alls behind a generic
``LongContextAttention``. Here the whole mechanism is ~40 lines next to the model it parallelises, runs on
gloo for CPU tests, and reuses whatever kernel the blocks' ``attn_fn`` holds (hvlab's SDPA segments, or the
FlashAttention-3 / FP8 attention that ``hvlab.fast.accelerate`` installs, before or after the wrap) unchanged.
What it does not do: Ring attention (for degrees above heads_num) and overlap of communication with compute.

Inference only (the collectives carry no autograd). Launch with ``torchrun``; see ``init_ulysses_from_env``
and ``enable_ulysses`` for the pipeline and ``hvlab generate --ulysses-degree N``.
"""
from __future__ import annotations

import math
import os
import socket
import tempfile
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..model import HYVideoDiffusionTransformer, unpatchify


# --- validation ------------------------------------------------------------------------------------------

def valid_degrees(heads_num: int, n_video_tokens: int | None = None) -> list[int]:
    """Degrees that divide both the heads and (when given) the post-patch video tokens T*H*W."""
    g = heads_num if n_video_tokens is None else math.gcd(heads_num, n_video_tokens)
    return [d for d in range(1, g + 1) if g % d == 0]


def check_ulysses_degree(degree: int, heads_num: int, n_video_tokens: int | None = None,
                         grid_size: Sequence[int] | None = None) -> None:
    """Raise a ValueError naming the valid degrees unless ``degree`` divides heads and video tokens."""
    if degree < 1:
        raise ValueError(f"ulysses degree must be >= 1, got {degree}")
    if heads_num % degree:
        raise ValueError(f"ulysses degree {degree} does not divide heads_num {heads_num}; valid degrees: "
                         f"{', '.join(map(str, valid_degrees(heads_num)))}")
    if n_video_tokens is not None and n_video_tokens % degree:
        grid = f" (post-patch grid T x H x W = {' x '.join(map(str, grid_size))})" if grid_size else ""
        raise ValueError(f"ulysses degree {degree} does not divide the {n_video_tokens} video tokens{grid}; "
                         f"valid degrees for heads_num {heads_num} and this size: "
                         f"{', '.join(map(str, valid_degrees(heads_num, n_video_tokens)))}")


# --- the collectives --------------------------------------------------------------------------------------

def seq_to_heads(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-to-all (K, B, L/N, nh, hd) -> (K, B, L, nh/N, hd): my tokens' heads -> all tokens of my heads.

    K stacks q, k, v so one collective carries all three. Rank r receives head group r of every shard,
    shards concatenated in rank order, which is the original token order.
    """
    N = dist.get_world_size(group)
    K, B, L_loc, nh, hd = x.shape
    send = x.reshape(K, B, L_loc, N, nh // N, hd).permute(3, 0, 1, 2, 4, 5).contiguous()  # (N, K, B, L/N, h, hd)
    recv = torch.empty_like(send)  # recv[j] = rank j's token shard, my heads
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4, 5).reshape(K, B, N * L_loc, nh // N, hd)


def heads_to_seq(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-to-all (B, L, nh/N, hd) -> (B, L/N, nh, hd): the inverse of ``seq_to_heads`` (K = 1)."""
    N = dist.get_world_size(group)
    B, L, h, hd = x.shape
    send = x.reshape(B, N, L // N, h, hd).permute(1, 0, 2, 3, 4).contiguous()  # (N, B, L/N, h, hd)
    recv = torch.empty_like(send)  # recv[j] = my token shard, rank j's heads
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(B, L // N, N * h, hd)


def all_gather_cat(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order (the same result on every rank)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class UlyssesAttention:
    """Replacement for a block's ``attn_fn``: same call, image tokens sharded over the group's ranks.

    Takes q, k, v (B, L_img/N + L_txt, nh, hd) = [local image shard | all text] and returns the output in
    the same layout, equal to the rows the single-GPU attention would give for these tokens.
    """

    def __init__(self, attn_fn, group=None):
        self.attn_fn = attn_fn  # the block's kernel (hvlab.attention.attention, or accelerate's FastAttention)
        self.group = group

    def __call__(self, q, k, v, *, img_len: int, txt_lens: torch.Tensor | None = None) -> torch.Tensor:
        N, r = dist.get_world_size(self.group), dist.get_rank(self.group)
        nh = q.shape[2]
        h = nh // N
        img_q, img_k, img_v = seq_to_heads(torch.stack([q[:, :img_len], k[:, :img_len], v[:, :img_len]]),
                                           self.group)  # each (B, L_img, nh/N, hd)
        heads = slice(r * h, (r + 1) * h)  # text is replicated: take my heads locally, no communication
        L_img = img_q.shape[1]
        out = self.attn_fn(torch.cat([img_q, q[:, img_len:, heads]], dim=1),
                           torch.cat([img_k, k[:, img_len:, heads]], dim=1),
                           torch.cat([img_v, v[:, img_len:, heads]], dim=1),
                           img_len=L_img, txt_lens=txt_lens)  # (B, L_img + L_txt, nh/N, hd)
        img_out = heads_to_seq(out[:, :L_img], self.group)  # (B, L_img/N, nh, hd)
        txt_out = all_gather_cat(out[:, L_img:], dim=2, group=self.group)  # (B, L_txt, nh, hd) on every rank
        return torch.cat([img_out, txt_out], dim=1)


class UlyssesDiT(nn.Module):
    """Sequence-parallel wrapper around a `HYVideoDiffusionTransformer`, with the model's forward signature.

    Every rank of ``group`` (default: the world) holds the whole model and calls forward with the same
    inputs; each computes the blocks for 1/N of the image tokens and all ranks return the full velocity.
    Installs `UlyssesAttention` in every double- and single-stream block on construction (the token
    refiner runs on text only and keeps its own); ``close()`` or leaving a ``with`` block restores them.
    """

    def __init__(self, model: HYVideoDiffusionTransformer, group=None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("UlyssesDiT needs torch.distributed initialised: launch with torchrun "
                               "--nproc_per_node N and call hvlab.fast.parallel.init_ulysses_from_env (or "
                               "dist.init_process_group) first")
        self.model = model
        self.group = group
        self.degree = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        check_ulysses_degree(self.degree, model.config.heads_num)
        self._originals = []
        for block in [*model.double_blocks, *model.single_blocks]:
            self._originals.append((block, block.attn_fn))
            block.attn_fn = UlyssesAttention(block.attn_fn, group)

    # what the pipeline reads from its transformer
    @property
    def config(self):
        return self.model.config

    def grid_size(self, latent_shape):
        return self.model.grid_size(latent_shape)

    def close(self) -> None:
        """Give the blocks their original attention back (the model works on one process again)."""
        for block, fn in self._originals:
            block.attn_fn = fn
        self._originals = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous 1/N slice of ``x`` along ``dim`` (tokens, or rows of a RoPE table)."""
        n = x.shape[dim] // self.degree
        return x.narrow(dim, self.rank * n, n)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor,
                text_states_2: torch.Tensor, guidance: torch.Tensor | None = None,
                freqs_cis: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """As `HYVideoDiffusionTransformer.forward`; ``freqs_cis`` (if given) are the full (T*H*W, hd) tables."""
        if not self._originals:
            raise RuntimeError("this UlyssesDiT was closed; call the wrapped model directly or wrap it again")
        m = self.model
        t, guidance = m.check_inputs(x, t, text_states, text_mask, text_states_2, guidance)
        grid = m.grid_size(x.shape)
        check_ulysses_degree(self.degree, m.config.heads_num, math.prod(grid), grid)
        if freqs_cis is None:
            freqs_cis = m.rope(grid, device=x.device)
        freqs_local = tuple(self.shard(f, dim=0) for f in freqs_cis)  # (L_img/N, hd) each
        img, txt, vec, txt_lens = m.embed(x, t, text_states, text_mask, text_states_2, guidance)
        img = self.shard(img).clone()  # (B, L_img/N, D); every rank embeds all (cheap), keeps 1/N (a copy,
        # so the full tensor is freed)
        img, txt = m.double_stream(img, txt, vec, freqs_local, txt_lens)
        img = m.single_stream(img, txt, vec, freqs_local, txt_lens)  # cat(img shard, txt) per rank
        out = all_gather_cat(m.final_layer(img, vec), dim=1, group=self.group)  # (B, L_img, pt*ph*pw*C)
        return unpatchify(out, grid, m.config.patch_size, m.config.out_channels)


# --- pipeline and CLI -------------------------------------------------------------------------------------

def init_ulysses_from_env(degree: int, device: str = "cuda") -> int:
    """Initialise the default process group from torchrun's environment; returns this process's rank.

    NCCL when ``device`` is CUDA (each rank takes GPU LOCAL_RANK, so "cuda" then means that GPU), else gloo.
    The world must be exactly ``degree`` processes (one Ulysses group, no data parallelism).
    """
    if degree < 1:
        raise ValueError(f"--ulysses-degree must be >= 1 (1 = one process, no parallelism), got {degree}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ or world != degree:
        raise ValueError(f"--ulysses-degree {degree} needs {degree} processes launched by torchrun "
                         f"(torchrun --nproc_per_node {degree} -m hvlab.cli generate ...); found WORLD_SIZE = {world}")
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank()


def broadcast_from_rank0(obj):
    """Rank 0's ``obj`` on every rank (e.g. generation settings with a randomly drawn seed)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def enable_ulysses(pipe, group=None) -> UlyssesDiT:
    """Make a `HunyuanVideoPipeline` sequence-parallel: wrap its transformer, decode only on rank 0.

    Every rank runs the same text encoding (cheap, and simpler than broadcasting the states) and the same
    denoising loop on the same latents (same seeds), each rank computing 1/N of every DiT step. Only rank 0
    runs the VAE; on other ranks ``pipe.decode`` returns an empty (B, 3, 0, 0, 0) video and nothing should
    be written there (the CLI writes files on rank 0 only).
    """
    wrapped = UlyssesDiT(pipe.transformer, group)
    pipe.transformer = wrapped
    if dist.get_rank() != 0:
        pipe.decode = lambda latents, progress=False: torch.empty(latents.shape[0], 3, 0, 0, 0)
    return wrapped


# --- CPU demo and test harness ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_worker(rank: int, world_size: int, port: int, config, state_dict, inputs: dict, out_dir: str,
                  accelerate_kwargs: dict | None = None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model = HYVideoDiffusionTransformer(config)
        model.load_state_dict(state_dict)
        if accelerate_kwargs is not None:
            from . import accelerate

            accelerate(model, **accelerate_kwargs)  # before the wrap: Ulysses runs the chosen kernel inside
        with torch.no_grad(), UlyssesDiT(model.eval()) as sp:
            out = sp(**inputs)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_ulysses_forward(model: HYVideoDiffusionTransformer, inputs: dict, world_size: int,
                          accelerate_kwargs: dict | None = None) -> list[torch.Tensor]:
    """Run ``UlyssesDiT(model)(**inputs)`` in ``world_size`` gloo CPU processes; returns every rank's output.
    ``accelerate_kwargs``: each worker first calls ``hvlab.fast.accelerate(model, **accelerate_kwargs)``."""
    import torch.multiprocessing as mp

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_spawn_worker, args=(world_size, free_port(), model.config, state, inputs, tmp, accelerate_kwargs),
                 nprocs=world_size, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world_size)]


def demo_model_and_inputs(seed: int = 0):
    """A small DiT (4 heads, every block type, random weights incl. zero-init gates) and inputs for it:
    a batch of 2 with padded text of different lengths (5 and 9 real tokens of 12), 24 video tokens."""
    from ..model import HYVideoConfig, randomize_weights_

    config = HYVideoConfig(hidden_size=64, heads_num=4, rope_dim_list=(4, 6, 6), mm_double_blocks_depth=2,
                           mm_single_blocks_depth=2, text_states_dim=32, text_states_dim_2=16, refiner_depth=1)
    model = randomize_weights_(HYVideoDiffusionTransformer(config), seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    mask = torch.zeros(2, 12)
    mask[0, :5], mask[1, :9] = 1, 1
    inputs = dict(x=torch.randn(2, 16, 3, 4, 8, generator=g), t=torch.tensor([900.0, 250.0]),
                  text_states=torch.randn(2, 12, 32, generator=g), text_mask=mask,
                  text_states_2=torch.randn(2, 16, generator=g), guidance=torch.tensor([6016.0, 3000.0]))
    return model, inputs


def run_ulysses_demo(world_size: int = 2, seed: int = 0) -> float:
    """Sequence-parallel forward of the demo model on ``world_size`` gloo processes vs one process.

    Returns the largest relative error max|out_r - ref| / max|ref| over all ranks (fp32: ~1e-7).
    """
    model, inputs = demo_model_and_inputs(seed)
    with torch.no_grad():
        ref = model(**inputs)
    outs = spawn_ulysses_forward(model, inputs, world_size)
    return max(float((o - ref).abs().max() / ref.abs().max()) for o in outs)
