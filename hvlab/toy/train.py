"""Train hvlab's toy HunyuanVideo on synthetic video: the VAE first, then the DiT.

    python -m hvlab.toy.train --out runs/toy              # both phases, then export + evaluation
    python -m hvlab.toy.train --out runs/toy --resume     # continue from runs/toy/state.pt

The DiT objective is rectified flow in the official convention:
x_sigma = (1 - sigma) x0 + sigma noise, target v = noise - x0, sigma drawn uniformly and then shifted
(sigma' = shift s / (1 + (shift - 1) s)) so more of training sits at high noise, where the layout
(colour, shape, where it moves) is decided. Captions are dropped 10% of the time, for true CFG.

Everything is seeded: data order, initialisation and caption dropout come from one seed. (GPU kernels
are not bitwise deterministic; a re-run reproduces the model's quality, not its exact bits.)
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import save_safetensors
from ..model import HYVideoDiffusionTransformer
from ..scheduler import sample_training_sigmas
from ..vae import AutoencoderKLCausal3D
from . import data
from .model import TOY_DEFAULTS, TOY_DIT_CONFIG, WEIGHTS_DIR, build_text_encoders, toy_vae_config


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def vae_loss(vae, videos, generator, kl_weight):
    """Reconstruction loss that weights the object 10x: it is ~10% of the pixels and all of the meaning."""
    posterior = vae.encode(videos)
    rec = vae.decode(posterior.sample(generator=generator))
    weight = 1.0 + 9.0 * (videos > -0.9).any(dim=1, keepdim=True).float()
    err = rec.float() - videos
    rec_loss = (weight * (err.abs() + err.square())).mean()
    return rec_loss + kl_weight * posterior.kl().mean(), rec_loss


@torch.no_grad()
def encode_captions(llm, clip, captions: list[str], device):
    out = llm.encode(captions, device=device)
    pooled = clip.encode(captions, device=device).hidden_state
    return out.hidden_state.float(), out.attention_mask, pooled.float()


@torch.no_grad()
def latent_scale(vae, device, generator, batches=4, batch_size=8) -> float:
    """1 / std of the VAE's latent means over training videos: unit-variance latents for the DiT."""
    zs = []
    for _ in range(batches):
        videos, _, _ = data.sample_batch(batch_size, generator, split="train", device=device)
        zs.append(vae.encode(videos).mean.float())
    return float(1.0 / torch.cat(zs).std())


class Logger:
    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = path, fields
        new = not path.exists()
        self.f = open(path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=fields)
        if new:
            self.w.writeheader()

    def log(self, **row):
        self.w.writerow(row)
        self.f.flush()


def save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(args) -> dict:
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    state_path = out / "state.pt"
    state = torch.load(state_path, map_location="cpu", weights_only=False) if args.resume and state_path.exists() else {}
    summary = state.get("summary", {"args": vars(args)})

    # ---------------- phase 1: the VAE ----------------
    vae = AutoencoderKLCausal3D(toy_vae_config()).to(device)
    if "vae" in state:
        vae.load_state_dict(state["vae"])
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    if "vae_opt" in state:
        vae_opt.load_state_dict(state["vae_opt"])
    gen = torch.Generator(device=device).manual_seed(args.seed)
    if "gen" in state:
        gen.set_state(state["gen"])
    step = state.get("vae_step", 0)
    log = Logger(out / "vae_loss.csv", ["step", "loss", "rec", "lr", "seconds"])
    t0 = time.perf_counter() - state.get("vae_seconds", 0.0)
    vae.train()
    while step < args.vae_steps:
        lr = lr_at(step, args.vae_steps, args.vae_lr, 200)
        for g in vae_opt.param_groups:
            g["lr"] = lr
        videos, _, _ = data.sample_batch(args.vae_batch, gen, split="train", device=device)
        with torch.autocast(**amp):
            loss, rec = vae_loss(vae, videos, gen, args.kl_weight)
        vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        vae_opt.step()
        step += 1
        if step % 50 == 0 or step == args.vae_steps:
            log.log(step=step, loss=f"{loss.item():.5f}", rec=f"{rec.item():.5f}", lr=f"{lr:.2e}",
                    seconds=f"{time.perf_counter() - t0:.1f}")
        if step % args.save_every == 0 or step == args.vae_steps:
            save_state(state_path, dict(vae=vae.state_dict(), vae_opt=vae_opt.state_dict(), vae_step=step,
                                        gen=gen.get_state(), vae_seconds=time.perf_counter() - t0,
                                        summary=summary))
    summary["vae_steps"] = step
    summary["vae_seconds"] = state.get("vae_seconds") if "dit_step" in state else round(time.perf_counter() - t0, 1)
    vae.eval().requires_grad_(False)
    del vae_opt

    # ---------------- phase 2: the DiT ----------------
    scale = state.get("vae_scaling_factor") or latent_scale(vae, device, gen)
    summary["vae_scaling_factor"] = scale
    llm, clip = build_text_encoders()
    llm.to(device), clip.to(device)
    captions = [data.caption(*a) for a in data.TRAIN] + [""]
    text, mask, pooled = encode_captions(llm, clip, captions, device)
    null_id = len(captions) - 1
    caption_id = {c: i for i, c in enumerate(captions)}

    dit = HYVideoDiffusionTransformer(TOY_DIT_CONFIG).to(device)
    if "dit" in state:
        dit.load_state_dict(state["dit"])
    ema = copy.deepcopy(dit).requires_grad_(False)
    if "ema" in state:
        ema.load_state_dict(state["ema"])
    opt = torch.optim.AdamW(dit.parameters(), lr=args.dit_lr, weight_decay=0.01)
    if "dit_opt" in state:
        opt.load_state_dict(state["dit_opt"])
    step = state.get("dit_step", 0)
    log = Logger(out / "dit_loss.csv", ["step", "loss", "lr", "seconds"])
    t0 = time.perf_counter() - state.get("dit_seconds", 0.0)
    dit.train()
    while step < args.dit_steps:
        lr = lr_at(step, args.dit_steps, args.dit_lr, 500)
        for g in opt.param_groups:
            g["lr"] = lr
        B = args.dit_batch
        with torch.no_grad():
            videos, caps, _ = data.sample_batch(B, gen, split="train", device=device)
            with torch.autocast(**amp):
                x0 = vae.encode(videos).mean.float() * scale  # (B, 16, 5, 16, 16)
            ids = torch.tensor([caption_id[c] for c in caps], device=device)
            drop = torch.rand(B, generator=gen, device=device) < args.caption_dropout
            ids = torch.where(drop, torch.full_like(ids, null_id), ids)
            sigma = sample_training_sigmas(B, args.train_shift, gen, device=device)
            noise = torch.randn(x0.shape, generator=gen, device=device)
            s = sigma.view(B, 1, 1, 1, 1)
            x_t = (1 - s) * x0 + s * noise
            target = noise - x0
        with torch.autocast(**amp):
            v = dit(x_t, sigma * 1000, text[ids], mask[ids], pooled[ids])
        loss = F.mse_loss(v.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        step += 1
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), dit.parameters()):
                pe.lerp_(p, 1 - d)
        if step % 50 == 0 or step == args.dit_steps:
            log.log(step=step, loss=f"{loss.item():.5f}", lr=f"{lr:.2e}", seconds=f"{time.perf_counter() - t0:.1f}")
        if step % args.save_every == 0 or step == args.dit_steps:
            save_state(state_path, dict(vae=vae.state_dict(), vae_step=summary["vae_steps"],
                                        vae_seconds=summary["vae_seconds"], vae_scaling_factor=scale,
                                        dit=dit.state_dict(), ema=ema.state_dict(), dit_opt=opt.state_dict(),
                                        dit_step=step, gen=gen.get_state(),
                                        dit_seconds=time.perf_counter() - t0, summary=summary))
    summary["dit_steps"], summary["dit_seconds"] = step, round(time.perf_counter() - t0, 1)
    summary["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    summary["torch"] = torch.__version__
    export(out / "weights", ema, vae, llm, clip, scale, summary)
    plot_losses(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def export(wd: Path, dit, vae, llm, clip, scale: float, summary: dict) -> None:
    """Write the shipped files: fp16 safetensors (loaded back in fp32), tokenizer and config."""
    from ..preview import fit_latent_to_rgb

    wd.mkdir(parents=True, exist_ok=True)
    half = lambda sd: {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    save_safetensors(half(dit.state_dict()), str(wd / "dit.safetensors"))
    save_safetensors(half(vae.state_dict()), str(wd / "vae.safetensors"))
    save_safetensors(half(llm.model.state_dict()), str(wd / "text_encoder.safetensors"))
    save_safetensors(half(clip.model.state_dict()), str(wd / "text_encoder_2.safetensors"))
    tok_src = WEIGHTS_DIR / "tokenizer"
    if tok_src.exists() and tok_src.resolve() != (wd / "tokenizer").resolve():
        shutil.copytree(tok_src, wd / "tokenizer", dirs_exist_ok=True)
    device = next(vae.parameters()).device
    gen = torch.Generator(device=device).manual_seed(99)
    videos, _, _ = data.sample_batch(8, gen, split="train", device=device)
    with torch.no_grad():
        z = vae.encode(videos).mean.float() * scale
    rgb = fit_latent_to_rgb(z, videos)
    meta = dict(vae_scaling_factor=scale, defaults=TOY_DEFAULTS, latent_to_rgb=rgb,
                training={k: v for k, v in summary.items() if k != "args"}, args=summary.get("args"))
    (wd / "config.json").write_text(json.dumps(meta, indent=2, default=str))


def plot_losses(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, name in zip(axes, ["vae_loss.csv", "dit_loss.csv"]):
        p = out / name
        if not p.exists():
            continue
        rows = list(csv.DictReader(open(p)))
        ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
        ax.set(title=name.replace("_loss.csv", "").upper() + " training loss", xlabel="step", yscale="log")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/toy")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--dit-steps", type=int, default=12000)
    p.add_argument("--dit-batch", type=int, default=64)
    p.add_argument("--dit-lr", type=float, default=5e-4)
    p.add_argument("--train-shift", type=float, default=3.0)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--save-every", type=int, default=1000)
    args = p.parse_args(argv)
    summary = train(args)
    print(json.dumps({k: v for k, v in summary.items() if k != "args"}, indent=2))


if __name__ == "__main__":
    main()
