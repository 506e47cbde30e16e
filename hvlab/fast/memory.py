"""A GPU memory plan for the whole pipeline, and a check that fails *before* any weight is loaded.

The stages run one after another and only one model sits on the GPU at a time:

    1. text    the LLM (fp16) encodes, leaves the GPU; then CLIP-L encodes and leaves.   only the states stay
    2. DiT     weights (bf16 or FP8) + the activations of one block + latents and text states, per step
    3. VAE     weights (fp16) + one tile's activations + the decoded video (fp16)

So the peak is the largest stage, not the sum. The denoising loop keeps one latent and one velocity: its
memory does not grow with the number of steps.

Where the numbers come from:
- **weights**: parameter counts of the models built on the meta device (DiT) or known sizes (the LLM is
  llava-llama-3-8b's LlamaModel, 7.50e9 parameters; CLIP-L's text tower 1.23e8). FP8 stores the block
  linears in one byte each (`hvlab.fast.fp8.default_fp8_filter`), the rest in bf16.
- **DiT activations**: *traced*, not guessed. One double and one single block are run on the meta device
  (shapes only, no memory) at the real token count while a dispatch mode adds up the bytes of every live
  tensor; attention is replaced by an output-sized stub (fused kernels never build the L x L matrix). The
  trace therefore follows the code, token chunking included.
- **VAE decode**: the activation + output peaks per tile setting that ``benchmarks/bench_vae.py --meta``
  traced for 720x1280x129 (6.75 / 2.75 / 1.62 GiB) less that video's output, plus this video's output.
- A margin of ``slack`` (default 10%) on each stage for the allocator's rounding and cuDNN workspaces.

`check_fits` compares the plan's peak with the card's free memory (or a cap) and raises with the breakdown.
`check_load_plan` runs it for `hvlab.loading.load_pipeline`'s settings before any weight is read, naming
the loader settings that would fit.
For cards too small even for that, `hvlab.fast.offload.BlockOffloader` keeps the DiT blocks on the CPU and streams two at a time.

At 720x1280x129 (118,800 image tokens) the plan gives: text 15.6 GiB; DiT bf16 unchunked 40.8, FP8 unchunked
28.1, FP8 with 16,384-token chunks 22.2 (12.3 weights + 7.9 activations), with block offload 10.2; VAE at the
release's 256 px / 64-frame tiles 8.0 — all including the 10% margin. Measured peaks belong in
``benchmarks/e2e_720p.py``'s report; the plan is an estimate.
"""
from __future__ import annotations

import weakref
from dataclasses import replace

import torch
from torch import nn

from ..runs import RELEASE_DEFAULTS

GiB = 2**30
LLM_PARAMS = 7.504e9  # llava-llama-3-8b's LlamaModel (no lm_head): 32 layers x 4096, vocab 128,256
CLIP_PARAMS = 1.23e8  # CLIP-L text tower
LLM_INPUT_TOKENS = 351  # template prefix (crop_start 95) + 256 prompt tokens
# bench_vae.py --meta at 720x1280x129, fp16: activations + output, without weights (GiB), and the video it decoded
VAE_TRACED_PEAK_GiB = {(256, 64): 6.75, (128, 64): 2.75, (128, 32): 1.62}
VAE_TRACED_VIDEO = (129, 720, 1280)
VAE_PARAMS = 2.46e8  # AutoencoderKLCausal3D 884-16c-hy (encoder + decoder): 0.49 GB in fp16


class MemoryPlanError(RuntimeError):
    """The pipeline would not fit; the message carries the estimate and what to try."""


# ---------------------------------------------------------------------------------------- tracing
class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Adds up the bytes of the storages that tensors created inside the mode keep alive; records the peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.users: dict[int, int] = {}
        self.nbytes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage()._cdata
                if key not in self.nbytes:
                    self.nbytes[key], self.users[key] = t.untyped_storage().nbytes(), 0
                    self.live += self.nbytes[key]
                    self.peak = max(self.peak, self.live)
                self.users[key] += 1
                weakref.finalize(t, self._release, key)
        return out

    def _release(self, key):
        self.users[key] -= 1
        if not self.users[key]:
            self.live -= self.nbytes.pop(key)
            del self.users[key]


def _attention_stub(q, k, v, *, img_len, txt_lens=None):
    # what a fused kernel allocates: the output (its fp32 log-sum-exp, B x nh x L, is < 1% of that)
    return torch.empty_like(q)


def trace_dit_block_peaks(config, L_img: int, L_txt: int = 256, chunk_tokens: int | None = None,
                          dtype: torch.dtype = torch.bfloat16, batch: int = 1, fast: bool = True) -> dict[str, float]:
    """Peak bytes allocated *inside* one double and one single block (inputs excluded), traced on meta.

    Returns ``{"double": bytes, "single": bytes, "stream": bytes}``; "stream" is one (B, L, D) token tensor.
    ``fast`` traces the fast wing's blocks (what runs on CUDA), else the reference blocks (the CPU's).
    """
    from ..model import HYVideoDiffusionTransformer
    from . import accelerate

    c = config
    one = replace(c, mm_double_blocks_depth=1, mm_single_blocks_depth=1, refiner_depth=0)
    model = HYVideoDiffusionTransformer(one, device="meta", dtype=dtype)
    if fast:
        accelerate(model, chunk_tokens=chunk_tokens)  # the blocks that run at 720p: buffers, chunks, fused GELU
    double, single = model.double_blocks[0], model.single_blocks[0]
    for b in (double, single):
        b.attn_fn = _attention_stub
    kw = dict(device="meta", dtype=dtype)
    img, txt = torch.empty(batch, L_img, c.hidden_size, **kw), torch.empty(batch, L_txt, c.hidden_size, **kw)
    vec = torch.empty(batch, c.hidden_size, **kw)
    freqs = tuple(torch.empty(L_img, c.head_dim, device="meta") for _ in range(2))  # fp32 cos, sin
    peaks = {}
    with torch.no_grad():
        track = _LiveBytes()
        with track:
            out = double(img, txt, vec, freqs)
            del out
        peaks["double"] = track.peak
        x = torch.empty(batch, L_img + L_txt, c.hidden_size, **kw)
        track = _LiveBytes()
        with track:
            out = single(x, vec, L_img, freqs)
            del out
        peaks["single"] = track.peak
    peaks["stream"] = batch * (L_img + L_txt) * c.hidden_size * torch.finfo(dtype).bits // 8
    return {k: float(v) for k, v in peaks.items()}


# ---------------------------------------------------------------------------------------- the parts
def dit_weight_bytes(config, fp8: bool, resident_blocks: int | None = None) -> float:
    """Bytes of the DiT's weights: bf16 everywhere, or 1 byte for the linears `convert_to_fp8` converts.

    ``resident_blocks``: with `BlockOffloader`, only that many blocks (the largest ones) plus everything
    outside the blocks are on the GPU at once.
    """
    from ..model import HYVideoDiffusionTransformer

    model = HYVideoDiffusionTransformer(config, device="meta")
    total = 0.0
    fp8_weights = set()
    if fp8:
        from .fp8 import default_fp8_filter

        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and default_fp8_filter(name, m):
                fp8_weights.add(name + ".weight")
                total += 4  # the float32 per-tensor scale
    per_block: dict[str, float] = {}
    for name, p in model.named_parameters():
        size = p.numel() * (1 if name in fp8_weights else 2)
        total += size
        if name.startswith(("double_blocks.", "single_blocks.")):
            key = ".".join(name.split(".")[:2])
            per_block[key] = per_block.get(key, 0.0) + size
    if resident_blocks is not None:
        biggest = sorted(per_block.values(), reverse=True)[:resident_blocks]
        total -= sum(per_block.values()) - sum(biggest)
    return total


def _vae_activation_extrapolated_GiB(frames: int, height: int, width: int) -> float:
    """Decode activations of a block of frames x height x width pixels (a whole video, or an untraced tile),
    scaled from the traced 256 px / 64-frame tile by voxel count: an estimate, not a trace."""
    return _vae_activation_GiB(256, 64) * frames * height * width / (64 * 256 * 256)


def _vae_activation_GiB(tile_px: int | None, tile_frames: int | None,
                        video: tuple[int, int, int] | None = None) -> float:
    """One tile setting's decode peak without its output: the tiles, not the video size, set it.

    ``tile_px=None`` (no tiling, the whole ``video`` = (frames, height, width) at once) is *extrapolated*: the
    256 px / 64-frame tile's activations scaled by the video's voxels over the tile's (an estimate, not a trace).
    """
    if tile_px is None:
        return _vae_activation_extrapolated_GiB(*video)
    if (tile_px, tile_frames) not in VAE_TRACED_PEAK_GiB:
        raise ValueError(f"VAE tiles must be one of the traced settings (tile_px, tile_frames) "
                         f"{sorted(VAE_TRACED_PEAK_GiB)}, got {(tile_px, tile_frames)}; trace others with "
                         f"benchmarks/bench_vae.py --meta and pass vae_activation_GiB")
    out_traced = 3 * 2 * VAE_TRACED_VIDEO[0] * VAE_TRACED_VIDEO[1] * VAE_TRACED_VIDEO[2] / GiB
    return VAE_TRACED_PEAK_GiB[(tile_px, tile_frames)] - out_traced


def estimate_pipeline_memory(config, height: int, width: int, video_length: int, fp8: bool = True,
                             chunk_tokens: int | None = 16384, vae_tile_px: int = 256, vae_tile_frames: int = 64,
                             text_encoders_on_gpu: bool = True, text_len: int = 256, batch: int = 1,
                             slack: float = 0.10, vae_activation_GiB: float | None = None,
                             block_offload: bool = False, resident: tuple[str, ...] = (),
                             llm_params: float = LLM_PARAMS, clip_params: float = CLIP_PARAMS,
                             vae_params: float = VAE_PARAMS) -> dict:
    """GiB per stage for text -> DiT -> VAE on one GPU, run one stage at a time (see the module docstring).

    Returns ``{"stages": {name: GiB}, "parts": {name: GiB}, "peak_GiB", "peak_stage", "plan": [str], "inputs"}``.
    ``parts`` names each term, so a failure message can say where the memory goes.

    ``vae_tile_px=None``: no VAE tiling (extrapolated, see `_vae_activation_GiB`). ``resident``: the models
    ("llm", "clip", "dit", "vae") whose weights stay on the GPU through every stage instead of leaving after
    theirs; `HunyuanVideoPipeline` keeps the DiT there, and without ``cpu_offload`` all four.
    """
    from ..video import check_video_length, latent_shape

    check_video_length(video_length)
    C, T, h, w = latent_shape(height, width, video_length, config.in_channels)
    pt, ph, pw = config.patch_size
    L_img = (T // pt) * (h // ph) * (w // pw)
    peaks = trace_dit_block_peaks(config, L_img, text_len, chunk_tokens, batch=batch)
    rope = 2 * L_img * config.head_dim * 4  # fp32 cos and sin
    latents = batch * C * T * h * w * 4 * 3  # float32 latents, velocity, next latents
    text_states = batch * text_len * (config.text_states_dim + 1) * 2 + batch * config.text_states_dim_2 * 2
    # single stream: x = cat(img, txt) plus the img, txt the caller still holds; double: img and txt in and out
    held = max(2 * peaks["stream"] + peaks["double"], 2 * peaks["stream"] + peaks["single"])
    parts = {
        "LLM fp16 weights": llm_params * 2 / GiB if text_encoders_on_gpu else 0.0,
        "LLM activations": (33 * LLM_INPUT_TOKENS * 4096 * 2 * batch + 2**27) / GiB if text_encoders_on_gpu else 0.0,
        "CLIP fp16 weights": clip_params * 2 / GiB if text_encoders_on_gpu else 0.0,
        f"DiT {'fp8' if fp8 else 'bf16'} weights": dit_weight_bytes(config, fp8, 2 if block_offload else None) / GiB,
        "DiT activations": (held + rope) / GiB,
        "latents + text states": (latents + text_states) / GiB,
        "VAE fp16 weights": vae_params * 2 / GiB,
        "VAE tile activations": (vae_activation_GiB if vae_activation_GiB is not None else
                                 _vae_activation_GiB(vae_tile_px, vae_tile_frames, (video_length, height, width))),
        "decoded video fp16": batch * 3 * video_length * height * width * 2 / GiB,
    }
    dit_w = next(k for k in parts if k.startswith("DiT") and k.endswith("weights"))
    members = {
        "text": ["LLM fp16 weights", "LLM activations"],  # CLIP runs after the LLM left: the smaller of the two
        "dit": [dit_w, "DiT activations", "latents + text states"],
        "vae": ["VAE fp16 weights", "VAE tile activations", "decoded video fp16", "latents + text states"],
    }
    weights = {"llm": "LLM fp16 weights", "clip": "CLIP fp16 weights", "dit": dit_w, "vae": "VAE fp16 weights"}
    unknown = sorted(set(resident) - set(weights))
    if unknown:
        raise ValueError(f"resident names models among {sorted(weights)}, got {unknown}")
    for ks in members.values():  # weights that stay on the GPU count in every stage
        ks += [weights[m] for m in weights if m in resident and weights[m] not in ks]
    stages = {s: (1 + slack) * sum(parts[k] for k in ks) for s, ks in members.items()}
    peak_stage = max(stages, key=stages.get)
    plan = [
        ("1. text: LLM fp16 on the GPU, encode, move to the CPU; then CLIP-L the same way"
         if text_encoders_on_gpu else "1. text: both encoders run on the CPU"),
        f"2. DiT {'FP8' if fp8 else 'bf16'} "
        + ("stays on the CPU, two blocks at a time on the GPU (BlockOffloader)" if block_offload
           else "moves to the GPU") + f"; {L_img:,} image + {text_len} text tokens; "
        + (f"MLPs / fused linears in chunks of {chunk_tokens:,} tokens" if chunk_tokens else "no token chunking")
        + "; the loop holds one latent, so any step count fits",
        ("3. DiT stays on the GPU" if "dit" in resident else "3. DiT leaves the GPU") + "; VAE fp16 decodes "
        + (f"in tiles of {vae_tile_px} px x {vae_tile_frames} frames" if vae_tile_px else "the whole video at once"),
    ]
    return {
        "stages": stages, "parts": parts, "members": members, "peak_GiB": stages[peak_stage],
        "peak_stage": peak_stage, "plan": plan,
        "inputs": dict(height=height, width=width, video_length=video_length, fp8=fp8, chunk_tokens=chunk_tokens,
                       vae_tile_px=vae_tile_px, vae_tile_frames=vae_tile_frames, L_img=L_img, text_len=text_len,
                       batch=batch, slack=slack, text_encoders_on_gpu=text_encoders_on_gpu,
                       block_offload=block_offload, resident=tuple(resident)),
    }


def describe(estimate: dict, stage: str | None = None) -> str:
    """'~20.1 GiB (DiT fp8 weights 12.0 + DiT activations 6.2 + ...)' for the peak stage (or ``stage``)."""
    stage = stage or estimate["peak_stage"]
    terms = " + ".join(f"{k} {estimate['parts'][k]:.1f}" for k in estimate["members"][stage]
                       if estimate["parts"][k] >= 0.05)
    slack = estimate["inputs"]["slack"]
    return f"~{estimate['stages'][stage]:.1f} GiB in the {stage} stage ({terms}, + {slack:.0%} allocator margin)"


def card_memory(device: torch.device | str) -> tuple[int, int]:
    """(free, total) bytes of a CUDA card (``torch.cuda.mem_get_info``); tests replace this to fake a card."""
    return torch.cuda.mem_get_info(torch.device(device))


def cuda_index(device: torch.device | str) -> int:
    """The card's index: torch's memory-fraction calls refuse a bare ``torch.device("cuda")`` (the current card)."""
    d = torch.device(device)
    return d.index if d.index is not None else torch.cuda.current_device()


def memory_fraction(device: torch.device | str) -> float:
    """The cap ``torch.cuda.set_per_process_memory_fraction`` put on this process (1.0 when none is readable)."""
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if get is None or not torch.cuda.is_initialized():  # setting a fraction initialises CUDA
        return 1.0
    return float(get(cuda_index(device)))


def available_GiB(device: torch.device | str | None = None, cap_GiB: float | None = None) -> tuple[float, str]:
    """What the plan may use: the card's free memory (`card_memory`), lowered to the process's memory
    fraction of the card and to ``cap_GiB``."""
    if device is not None and torch.device(device).type == "cuda":
        free, total = card_memory(device)
        have, where = free / GiB, f"the card has {free / GiB:.1f} GiB free (of {total / GiB:.1f})"
        fraction = memory_fraction(device)
        if fraction * total / GiB < have:
            have, where = fraction * total / GiB, (f"set_per_process_memory_fraction({fraction:g}) allows "
                                                   f"{fraction * total / GiB:.1f} GiB ({where})")
        if cap_GiB is not None and cap_GiB < have:
            have, where = cap_GiB, f"the cap is {cap_GiB:.1f} GiB ({where})"
        return have, where
    if cap_GiB is None:
        return float("inf"), "no GPU and no cap"
    return cap_GiB, f"the cap is {cap_GiB:.1f} GiB"


def check_fits(estimate: dict, device: torch.device | str | None = None, cap_GiB: float | None = None,
               free_GiB: float | None = None, advice: str | None = None) -> float:
    """Raise `MemoryPlanError` if the plan's peak exceeds the memory available; return the headroom in GiB.

    ``free_GiB`` overrides the measured free memory (tests, or planning for another card). ``advice``
    replaces the generic "try ..." clause (`check_load_plan` passes the settings that would fit).
    """
    if free_GiB is not None:
        have, where = free_GiB, f"the card has {free_GiB:.1f} GiB free"
        if cap_GiB is not None and cap_GiB < have:
            have, where = cap_GiB, f"the cap is {cap_GiB:.1f} GiB"
    else:
        have, where = available_GiB(device, cap_GiB)
    need = estimate["peak_GiB"]
    if need <= have:
        return have - need
    i = estimate["inputs"]
    tips = []
    if not i["fp8"]:
        tips.append("--fp8")
    if estimate["peak_stage"] == "dit" and not i["chunk_tokens"]:
        tips.append("token chunking (--chunk-tokens 16384)")
    if estimate["peak_stage"] == "vae" or not i["vae_tile_px"] or i["vae_tile_px"] > 128:
        tips.append("lower VAE tiles (128 px, 32 frames)")
    if estimate["peak_stage"] == "text":
        tips.append("running the text encoders on the CPU (--cpu-offload)")
    if estimate["peak_stage"] == "dit" and not i["block_offload"]:
        tips.append("block-wise CPU offload (--block-offload)")
    tips.append("--cpu-offload")
    stages = ", ".join(f"{k} {v:.1f}" for k, v in estimate["stages"].items())
    raise MemoryPlanError(
        f"{i['height']}x{i['width']}x{i['video_length']} needs {describe(estimate)} but {where}; "
        f"GiB per stage: {stages}; {advice or 'try ' + ', '.join(dict.fromkeys(tips))}")


# ---------------------------------------------------------------------------------------- before loading
RELEASE_PLAN_SIZE = tuple(RELEASE_DEFAULTS[k] for k in ("video_length", "height", "width"))  # 129, 720, 1280


def _load_estimate(config, plan_size, fp8: bool, cpu_offload: bool, vae_tile: tuple[int, int] | None) -> dict:
    """The estimate for `hvlab.loading.load_pipeline`'s settings: no token chunking; the DiT never leaves the
    GPU, and without ``cpu_offload`` neither do the text encoders and the VAE."""
    if len(plan_size) != 3:
        raise ValueError(f"plan_size must be (video_length, height, width), got {plan_size!r}")
    video_length, height, width = plan_size
    tile_px, tile_frames = vae_tile or (None, None)
    extra = {}
    if vae_tile is not None and tuple(vae_tile) not in VAE_TRACED_PEAK_GiB:  # scale the traced 256 px tile
        extra["vae_activation_GiB"] = _vae_activation_extrapolated_GiB(tile_frames, tile_px, tile_px)
    return estimate_pipeline_memory(config, height, width, video_length, fp8=fp8, chunk_tokens=None,
                                    vae_tile_px=tile_px, vae_tile_frames=tile_frames, block_offload=False,
                                    resident=("dit",) if cpu_offload else ("llm", "clip", "dit", "vae"), **extra)


def _flags(change: dict) -> str:
    out = []
    for k, v in change.items():
        if k == "vae_tile":
            out.append(f"--vae-tile-size {v[0]} {v[1]} (vae_tile_size={v})" if v != (256, 64) else
                       "--vae-tiling (vae_tiling=True)")
        else:
            out.append(f"--{k.replace('_', '-')} ({k}=True)")
    return " + ".join(out)


def check_load_plan(config, device: torch.device | str, plan_size: tuple[int, int, int] = RELEASE_PLAN_SIZE,
                    fp8: bool = False, cpu_offload: bool = False, vae_tile: tuple[int, int] | None = (256, 64),
                    cap_GiB: float | None = None) -> dict:
    """The check `hvlab.loading.load_pipeline` runs before it reads a weight; returns the estimate.

    ``plan_size`` = (video_length, height, width) to be generated; ``vae_tile`` = (px, frames), None without
    tiling. When the peak exceeds `available_GiB`, raises `MemoryPlanError` with the per-stage estimate and
    the smallest changes of the loader's own settings (FP8, CPU offload, VAE tiles) that would fit, each
    estimated the same way; when none does, what lies beyond the loader.
    """
    est = _load_estimate(config, plan_size, fp8, cpu_offload, vae_tile)
    have, _ = available_GiB(device, cap_GiB)
    if est["peak_GiB"] <= have:
        return est
    tiles = [t for t in [(256, 64), (128, 64), (128, 32)]
             if vae_tile is None or t[0] * t[1] < vae_tile[0] * vae_tile[1]]
    options = []  # (changes, estimate) for every combination of the loader's memory savers
    for f in dict.fromkeys((fp8, True)):
        for o in dict.fromkeys((cpu_offload, True)):
            for t in [vae_tile] + tiles:
                change = {k: v for k, v, now in (("fp8", f, fp8), ("cpu_offload", o, cpu_offload),
                                                 ("vae_tile", t, vae_tile)) if v != now}
                if change:
                    options.append((change, _load_estimate(config, plan_size, f, o, t)))
    options.sort(key=lambda c: (len(c[0]), c[1]["peak_GiB"]))
    fits = []
    for change, e in options:  # the minimal sets: no fitting set of fewer changes is contained in this one
        if e["peak_GiB"] <= have and not any(c.items() <= change.items() for c, _ in fits):
            fits.append((change, e))
    if fits:
        advice = "settings that would fit: " + "; ".join(f"{_flags(c)} (~{e['peak_GiB']:.1f} GiB)" for c, e in fits[:3])
    else:
        change, e = min(options, key=lambda c: c[1]["peak_GiB"]) if options else ({}, est)
        advice = (f"none of load_pipeline's settings fits (the smallest plan, {_flags(change) or 'the current one'}, "
                  f"needs ~{e['peak_GiB']:.1f} GiB); beyond them try a smaller --video-size / --video-length, token "
                  f"chunking (hvlab.fast.accelerate(dit, chunk_tokens=...)), hvlab.fast.offload.BlockOffloader, or check_memory=False "
                  f"(--no-memory-check) to load anyway")
    check_fits(est, device, cap_GiB, advice=advice)
    return est
