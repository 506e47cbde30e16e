"""The whole pipeline at 720x1280x129 on one GPU: per-stage time and peak memory, uncapped and under a 24 GiB cap.

Stages, one model on the GPU at a time (the plan of `hvlab.fast.memory`):
  text    the LLM (fp16) encodes the prompt and is freed; then CLIP-L likewise
  dit     the DiT is materialised block by block (bf16 -> FP8 per block, so the bf16 model never exists whole),
          token chunking on, N denoising steps through `HunyuanVideoPipeline.denoise` (default 2; the loop's
          memory does not grow with steps), then the DiT is freed
  vae     the causal VAE (fp16) decodes the latents in tiles
Weights are random (seeded) unless ``--ckpts`` holds the release layout; the output says which. ``--fast-text``
swaps the 8B LLM for a 3-layer Llama with the same 4096-wide output. Each stage records seconds and
``torch.cuda.max_memory_allocated`` (reset per stage). The whole run repeats under
``torch.cuda.set_per_process_memory_fraction(cap / total)`` (default cap 24 GiB). Writes $OUT/e2e_720p.json and
$OUT/e2e_720p.md (OUT defaults to ./outputs).

    python benchmarks/e2e_720p.py                     # 720x1280x129, 2 steps, FP8, chunks of 16384 tokens
    python benchmarks/e2e_720p.py --steps 50          # the real step count (same memory, ~50x the DiT time)
    python benchmarks/e2e_720p.py --quick             # tiny configs on the CPU: the same code path, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from bench_dit import free, init_random_, sync  # noqa: E402
from hvlab.fast.memory import GiB, check_fits, cuda_index, describe, estimate_pipeline_memory  # noqa: E402
from hvlab.model import HYVIDEO_T2_CONFIG, TINY_CONFIG, HYVideoDiffusionTransformer  # noqa: E402

PROMPT = "A cat walks on the grass, realistic style."


class Stage:
    """``with Stage("dit", rec, device):`` records seconds and the peak allocated memory of the block."""

    def __init__(self, name, record, device):
        self.name, self.record, self.device = name, record, device

    def __enter__(self):
        free(self.device)
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        row = {"seconds": round(time.perf_counter() - self.t0, 3)}
        if self.device.type == "cuda":
            row["peak_GiB"] = round(torch.cuda.max_memory_allocated(self.device) / GiB, 3)
        self.record[self.name] = row
        return False


# ------------------------------------------------------------------------------------------- text
LLM_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=8, rope_theta=500000.0)  # llava-llama-3-8b's language model


def random_llm_8b(device, seed, **overrides):
    """llava-llama-3-8b's LlamaModel shape with random weights, built on meta and materialised on ``device``.

    ``overrides`` change the LlamaConfig (tests build a small one on the CPU through the same code).
    """
    from transformers import LlamaConfig, LlamaModel
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from hvlab.prompts import PROMPT_TEMPLATE
    from hvlab.text_encoder import TextEncoder
    from hvlab.tokenizers import llama3_tokenizer

    tok = llama3_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=8192, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **{**LLM_8B, **overrides})
    with torch.device("meta"):
        model = LlamaModel(cfg).to(torch.float16)
    model.to_empty(device=device)
    init_random_(model, seed)
    model.rotary_emb = LlamaRotaryEmbedding(cfg).to(device)  # its inv_freq buffer: to_empty left it garbage
    left = [n for n, b in model.named_buffers() if not n.startswith("rotary_emb.")]
    if left:
        raise RuntimeError(f"buffers {left} were left uninitialised by to_empty; initialise them here")
    return TextEncoder(model, tok, "llm", 256, template=PROMPT_TEMPLATE["dit-llm-encode-video"],
                       hidden_state_skip_layer=2)


def text_encoders(args, device, release):
    """(build_llm, build_clip) callables; each returns a TextEncoder on ``device``."""
    from hvlab.text_encoder import load_clip_encoder, load_llm_encoder, tiny_clip_encoder, tiny_llm_encoder

    if release:
        return (lambda: load_llm_encoder(str(release["text_encoder"].parent), device=device),
                lambda: load_clip_encoder(str(release["text_encoder_2"].parent), device=device))
    if args.quick:
        from hvlab.toy.tokenizer import load_toy_tokenizer

        c = TINY_CONFIG
        return (lambda: tiny_llm_encoder(load_toy_tokenizer(), hidden=c.text_states_dim, layers=3, heads=2,
                                         max_length=32).to(device),
                lambda: tiny_clip_encoder(load_toy_tokenizer(kind="clip"), hidden=c.text_states_dim_2, layers=1,
                                          heads=2).to(device))
    dt = torch.float16
    clip = lambda: tiny_clip_encoder(hidden=768, layers=12, heads=12).to(device, dt)  # CLIP-L's text tower shape
    if args.fast_text:
        return (lambda: tiny_llm_encoder(hidden=4096, layers=3, heads=32).to(device, dt), clip)
    return (lambda: random_llm_8b(device, args.seed), clip)


# -------------------------------------------------------------------------------------------- DiT
def build_dit(config, device, dtype, fp8: bool, seed: int, release,
              block_offload: bool = False) -> HYVideoDiffusionTransformer:
    """Random weights materialised one block at a time (each block turned FP8 before the next), or the release.

    With ``block_offload`` every block goes to the CPU once built and a `BlockOffloader` streams it back.
    """
    from hvlab.fast.fp8 import convert_to_fp8, default_fp8_filter, load_fp8_checkpoint, set_fp8_mode

    model = HYVideoDiffusionTransformer(config, device="meta", dtype=dtype)
    target = "cpu" if block_offload else device
    if release and release["use_fp8_file"]:
        load_fp8_checkpoint(model, release["dit_fp8"], release["dit_fp8_map"], device=target)
        model.to(target)
    elif release:
        from hvlab.checkpoint import load_dit_checkpoint

        load_dit_checkpoint(model, str(release["dit"]))  # on the CPU, then FP8 there, then to the GPU
        model.to(dtype=dtype)
        if fp8:
            convert_to_fp8(model, mode="weight_only")
        model.to(target)
    else:
        for name, child in list(model.named_children()):
            parts = list(enumerate(child)) if isinstance(child, nn.ModuleList) else [(None, child)]
            for i, block in parts:
                block.to_empty(device=device)
                init_random_(block, seed + hash((name, i)) % 10_000)
                if fp8 and i is not None:
                    prefix = f"{name}.{i}."
                    convert_to_fp8(block, mode="weight_only",
                                   include=lambda n, m, p=prefix: default_fp8_filter(p + n, m))
                if block_offload and i is not None:
                    block.to("cpu")
    if fp8:
        set_fp8_mode(model, "auto", device=device)  # FP8 GEMMs where the card has them, else weight-only
    if block_offload:
        from hvlab.fast.offload import BlockOffloader

        model.block_offloader = BlockOffloader(model, device)  # the non-block parts go to the device
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------- runs
def run_pipeline(args, device, config, vae_config, size, cap_GiB, release) -> dict:
    from hvlab.fast import accelerate
    from hvlab.pipeline import HunyuanVideoPipeline
    from hvlab.runs import RELEASE_DEFAULTS
    from hvlab.vae import AutoencoderKLCausal3D

    H, W, F = size
    rec: dict = {"cap_GiB": cap_GiB}
    if device.type == "cuda" and cap_GiB is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_GiB * GiB / total), cuda_index(device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    build_llm, build_clip = text_encoders(args, device, release)

    with Stage("text", rec, device):
        llm = build_llm()
        out = llm.encode([PROMPT], device=device)
        text, mask = out.hidden_state.to(dtype), out.attention_mask
        del llm, out  # the LLM leaves the GPU before anything else comes
        free(device)
        clip = build_clip()
        pooled = clip.encode([PROMPT], device=device).hidden_state.to(dtype)
        del clip
    with Stage("dit_build", rec, device):
        dit = build_dit(config, device, dtype, not args.no_fp8, args.seed, release, args.block_offload)
        accelerate(dit, chunk_tokens=args.chunk_tokens or None)  # fused blocks (FP8 was set by build_dit)
    vae = AutoencoderKLCausal3D(vae_config, device="cpu", dtype=torch.float16 if device.type == "cuda" else None)
    vae.enable_tiling(args.vae_tile_px, args.vae_tile_frames, 0.25)
    pipe = HunyuanVideoPipeline(dit, vae.eval().requires_grad_(False), None, None, device=device, dtype=dtype)
    step_times = []
    with Stage("denoise", rec, device):
        latents = pipe.prepare_latents([args.seed], H, W, F)
        t_last = [time.perf_counter()]

        def on_step(state):
            sync(device)
            now = time.perf_counter()
            step_times.append(round(now - t_last[0], 3))
            t_last[0] = now

        latents = pipe.denoise(latents, text, mask, pooled, num_inference_steps=args.steps,
                               embedded_guidance_scale=RELEASE_DEFAULTS["embedded_guidance_scale"],
                               flow_shift=RELEASE_DEFAULTS["flow_shift"], callback=on_step)
    rec["denoise"]["step_s"] = step_times
    rec["denoise"]["finite"] = bool(torch.isfinite(latents).all())
    pipe.transformer = None
    del dit
    with Stage("vae_decode", rec, device):
        vae.to(device)
        video = pipe.decode(latents)
        vae.to("cpu")
    rec["video_shape"] = list(video.shape)
    rec["video_finite"] = bool(torch.isfinite(video).all())
    if device.type == "cuda":
        rec["peak_GiB"] = max(r["peak_GiB"] for r in rec.values() if isinstance(r, dict) and "peak_GiB" in r)
        torch.cuda.set_per_process_memory_fraction(1.0, cuda_index(device))
    return rec


def markdown(report) -> str:
    env = report["env"]
    lines = [f"# End-to-end {report['size']} ({report['weights']}), {env['card']}, torch {env['torch']}", "",
             f"Plan: {report['estimate']['describe']}", "",
             "| run | stage | seconds | peak GiB | note |", "| --- | --- | ---: | ---: | --- |"]
    for run in report["runs"]:
        name = "uncapped" if run.get("cap_GiB") is None else f"cap {run['cap_GiB']} GiB"
        if "error" in run:
            lines.append(f"| {name} | - | - | - | {run['error'][:100]} |")
            continue
        for stage in ("text", "dit_build", "denoise", "vae_decode"):
            r = run.get(stage, {})
            note = ""
            if stage == "denoise":
                note = f"s/step {r.get('step_s')}, finite {r.get('finite')}"
            peak = r.get("peak_GiB", "-")
            lines.append(f"| {name} | {stage} | {r.get('seconds', '-')} | {peak} | {note} |")
        total = sum(run[k]["seconds"] for k in ("text", "dit_build", "denoise", "vae_decode"))
        verdict = "" if run.get("cap_GiB") is None or "peak_GiB" not in run else (
            "within the cap" if run["peak_GiB"] <= run["cap_GiB"] else "OVER the cap")
        lines.append(f"| {name} | **whole run** | {total:.1f} | {run.get('peak_GiB', '-')} | {verdict} |")
    planned = ", ".join(f"{k} {v:.1f}" for k, v in report["estimate"]["stages_GiB"].items())
    lines += ["", f"Planned GiB per stage (incl. margin): {planned}. Steps: {report['steps']}; FP8: {report['fp8']}; "
              f"chunk_tokens: {report['chunk_tokens']}; VAE tiles: {report['vae_tiles']}; "
              f"block offload: {report['block_offload']}."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2, help="denoising steps (50 for a real video; memory is the same)")
    p.add_argument("--no-fp8", action="store_true", help="keep the DiT in bf16")
    p.add_argument("--chunk-tokens", type=int, default=16384, help="token chunk for MLPs / fused linears (0 = off)")
    p.add_argument("--vae-tile-px", type=int, default=None, help="VAE tile size in pixels (default 256; quick 32)")
    p.add_argument("--vae-tile-frames", type=int, default=None, help="VAE tile frames (default 64; quick 16)")
    p.add_argument("--block-offload", action="store_true",
                   help="DiT blocks on the CPU, two at a time on the GPU (hvlab.fast.offload.BlockOffloader)")
    p.add_argument("--fast-text", action="store_true", help="a 3-layer 4096-wide Llama instead of the random 8B one")
    p.add_argument("--cap-gib", type=float, default=24.0, help="the capped run's memory cap (0 = skip that run)")
    p.add_argument("--ckpts", default="ckpts", help="release layout folder; random weights if it is not there")
    p.add_argument("--quick", action="store_true", help="tiny configs at 64x64x9 on the CPU: the same code path")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else ./outputs)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")

    from hvlab.loading import CheckpointLayoutError, check_release_layout
    from hvlab.runs import RELEASE_DEFAULTS
    from hvlab.vae import TINY_VAE_CONFIG, VAE_884_16C_HY_CONFIG

    if args.quick:
        device = torch.device(args.device or "cpu")
        config, vae_config, size = TINY_CONFIG, TINY_VAE_CONFIG, (64, 64, 9)
        args.vae_tile_px, args.vae_tile_frames = args.vae_tile_px or 32, args.vae_tile_frames or 16
        release = None
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        config, vae_config, size = HYVIDEO_T2_CONFIG, VAE_884_16C_HY_CONFIG, tuple(
            RELEASE_DEFAULTS[k] for k in ("height", "width", "video_length"))
        args.vae_tile_px, args.vae_tile_frames = args.vae_tile_px or 256, args.vae_tile_frames or 64
        try:
            release = check_release_layout(args.ckpts, fp8=not args.no_fp8)
        except CheckpointLayoutError:
            release = None
    weights = f"release weights from {args.ckpts}" if release else "RANDOM weights (no release checkpoint found)"
    print(f"e2e: {size[0]}x{size[1]}x{size[2]} on {device}, {weights}", flush=True)

    known_tiles = not args.quick
    est = estimate_pipeline_memory(config, *size, fp8=not args.no_fp8, chunk_tokens=args.chunk_tokens or None,
                                   vae_tile_px=args.vae_tile_px, vae_tile_frames=args.vae_tile_frames,
                                   text_len=32 if args.quick else 256,
                                   vae_activation_GiB=None if known_tiles else 0.0, block_offload=args.block_offload,
                                   **(dict(llm_params=0.0, clip_params=0.0, vae_params=0.0) if args.quick else {}))
    print("plan:", describe(est), *est["plan"], sep="\n  ", flush=True)
    caps = [None] + ([args.cap_gib] if args.cap_gib else [])
    for cap in caps:  # fail before loading anything if the plan cannot fit
        if device.type == "cuda" or cap is not None:
            check_fits(est, device, cap_GiB=cap)

    env = {"torch": torch.__version__, "device": str(device),
           "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    report = {"env": env, "size": "x".join(map(str, size)), "weights": weights, "steps": args.steps,
              "fp8": not args.no_fp8, "chunk_tokens": args.chunk_tokens, "fast_text": args.fast_text,
              "block_offload": args.block_offload,
              "vae_tiles": [args.vae_tile_px, args.vae_tile_frames],
              "estimate": {"stages_GiB": est["stages"], "parts_GiB": est["parts"], "describe": describe(est),
                           "plan": est["plan"]}, "runs": []}
    out_dir = Path(args.out or os.environ.get("OUT") or "outputs")
    out_dir.mkdir(parents=True, exist_ok=True)
    for cap in caps:
        try:
            rec = run_pipeline(args, device, config, vae_config, size, cap, release)
        except Exception as e:  # an OOM under the cap is a result: record it and go on
            rec = {"cap_GiB": cap, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            if device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, cuda_index(device))
        report["runs"].append(rec)
        print(json.dumps(rec), flush=True)
        (out_dir / "e2e_720p.json").write_text(json.dumps(report, indent=1))
        free(device)
    md = markdown(report)
    (out_dir / "e2e_720p.md").write_text(md + "\n")
    print(md)
    return report


if __name__ == "__main__":
    main()
