"""Train hvlab's toy HunyuanVideo on synthetic video: the VAE first, then the DiT.

    python -m hvlab.toy.train --out runs/toy                 # both phases, then export
    python -m hvlab.toy.train --out runs/toy --resume        # continue from runs/toy/state.pt
    python -m hvlab.toy.train --world two-object --init-from hvlab/toy/weights --out runs/toy2 \
        --vae-minutes 5 --dit-minutes 10                     # the two-object world, warm-started

Phase 1 trains the causal 3D VAE on rendered clips (reconstruction loss weighted towards the object,
plus a tiny KL). Phase 2 encodes a pool of training videos once, then trains the DiT on them with
rectified flow in the official convention: x_sigma = (1 - sigma) x0 + sigma noise, target
v = noise - x0, sigma uniform then shifted (shift s / (1 + (shift - 1) s)) so more training sits at
high noise, where the layout (colour, shape, where it moves) is decided. Captions are dropped 10% of
the time so that true CFG works at sampling time.

Everything is seeded: data, initialisation and caption dropout come from one seed. GPU kernels are
not bitwise deterministic, so a re-run reproduces the model's quality, not its exact bits.
``--vae-minutes`` / ``--dit-minutes`` size a phase to a time budget by timing its first steps (the
summary records the step counts reached, so the run can then be repeated with fixed ``--*-steps``).

``--world two-object`` trains on a mix of one-object clips and two-object clips (``--pair-fraction``
of every batch, from `data.TRAIN_PAIRS`); the DiT learns every caption of that world. After the VAE
phase, ``--vae-check`` rendered two-object videos go through the VAE and the detector, so the summary
says whether the VAE keeps both objects (the one-object VAE shipped before loses the second object in
about half of them).
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

from ..checkpoint import load_state_dict_file, save_safetensors
from ..model import PRESETS, HYVideoDiffusionTransformer
from ..scheduler import sample_training_sigmas
from ..vae import AutoencoderKLCausal3D
from . import data
from .model import TOY_DEFAULTS, WEIGHTS_DIR, build_text_encoders, toy_vae_config


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def reconstruction_loss(rec, videos):
    """L1 + L2 that weights the object 10x: it is ~10% of the pixels and all of the meaning."""
    weight = 1.0 + 9.0 * (videos > -0.9).any(dim=1, keepdim=True).float()
    err = rec.float() - videos
    return (weight * (err.abs() + err.square())).mean()


def vae_loss(vae, videos, generator, kl_weight):
    """Reconstruction of a posterior sample, plus a small KL term."""
    posterior = vae.encode(videos)
    rec_loss = reconstruction_loss(vae.decode(posterior.sample(generator=generator)), videos)
    return rec_loss + kl_weight * posterior.kl().mean(), rec_loss


def warm_start(module, init_from, filename):
    """Load exported fp16 weights (not optimizer state) from a folder written by `export`."""
    sd = load_state_dict_file(Path(init_from) / filename)
    module.load_state_dict({k: v.float() for k, v in sd.items()})


class Logger:
    """Append-only CSV loss log (survives resumes)."""

    def __init__(self, path: Path, fields: list[str]):
        new = not path.exists()
        self.f = open(path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=fields)
        if new:
            self.w.writeheader()

    def log(self, **row):
        self.w.writerow(row)
        self.f.flush()


class Loop:
    """A training loop's bookkeeping: step count, time budget, LR schedule, logging and saving."""

    def __init__(self, name, total, budget_min, warmup, base_lr, out, start=0, seconds=0.0):
        self.name, self.total, self.budget, self.warmup, self.base_lr = name, total, budget_min, warmup, base_lr
        self.step, self.t0 = start, time.perf_counter() - seconds
        # the time budget is applied from the speed of steps 50..100 (after kernel warm-up)
        self.calib = (start + 50, start + 100) if budget_min else None
        self.t_mark = None
        self.frozen = None  # seconds at the end of the phase
        self.log = Logger(out / f"{name}_loss.csv", ["step", "loss", "lr", "seconds"])

    @property
    def seconds(self):
        return self.frozen if self.frozen is not None else time.perf_counter() - self.t0

    def finish(self):
        self.frozen = time.perf_counter() - self.t0

    def lr(self):
        return lr_at(self.step, self.total, self.base_lr, self.warmup)

    def advance(self, loss: torch.Tensor, lr: float) -> None:
        self.step += 1
        if self.calib and self.step == self.calib[0]:
            self.t_mark = self.seconds
        if self.calib and self.step == self.calib[1]:  # size the phase to its time budget
            rate = (self.seconds - self.t_mark) / (self.calib[1] - self.calib[0])
            self.total = max(self.step + 1, self.step + int((self.budget * 60 - self.seconds) / rate))
            print(f"[{self.name}] {rate * 1000:.1f} ms/step -> {self.total} steps in {self.budget} min", flush=True)
        if self.step % 50 == 0 or self.step == self.total:
            self.log.log(step=self.step, loss=f"{loss.item():.5f}", lr=f"{lr:.2e}", seconds=f"{self.seconds:.1f}")
        if self.step % 500 == 0:
            print(f"[{self.name}] step {self.step}/{self.total} loss {loss.item():.4f} {self.seconds:.0f}s", flush=True)

    def done(self):
        return self.step >= self.total


def save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr


def train_vae(args, device, gen, state, out):
    vae = AutoencoderKLCausal3D(toy_vae_config()).to(device)
    if args.init_from and "vae" not in state:
        warm_start(vae, args.init_from, "vae.safetensors")
    if "vae" in state:
        vae.load_state_dict(state["vae"])
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    if "vae_opt" in state:
        opt.load_state_dict(state["vae_opt"])
    loop = Loop("vae", state.get("vae_total", args.vae_steps), args.vae_minutes, 200, args.vae_lr, out,
                state.get("vae_step", 0), state.get("vae_seconds", 0.0))
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    vae.train()
    while not loop.done():
        lr = loop.lr()
        set_lr(opt, lr)
        videos, _ = data.sample_world_batch(args.vae_batch, gen, args.world, device, pair_fraction=args.pair_fraction)
        videos = videos[:, :, : args.vae_frames]
        with torch.autocast(**amp):
            loss, rec = vae_loss(vae, videos, gen, args.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        loop.advance(rec, lr)
        if loop.step % args.save_every == 0 or loop.done():
            save_state(out / "state.pt", dict(vae=vae.state_dict(), vae_opt=opt.state_dict(), vae_step=loop.step,
                                              vae_total=loop.total, vae_seconds=loop.seconds, gen=gen.get_state()))
    loop.finish()
    return vae.eval().requires_grad_(False), loop


@torch.no_grad()
def vae_check(vae, n: int, device, seed: int = 7) -> dict:
    """Detector scores of ``n`` rendered two-object training videos after encoding and decoding (own seed:
    the training stream is untouched). 100% means the VAE keeps both objects legible."""
    from .detector import detect_scene, score_scenes

    device = torch.device(device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    gen = torch.Generator().manual_seed(seed)  # a CPU stream: the same videos on every device
    videos, captions, _ = data.sample_batch(n, gen, "train", device, objects=2)
    scenes = []
    for s in range(0, n, 16):
        with torch.autocast(**amp):
            rec = vae.decode(vae.encode(videos[s:s + 16]).mean).float().clamp(-1, 1).cpu()
        scenes += [detect_scene(v, c) for v, c in zip(rec, captions[s:s + 16])]
    result = score_scenes(scenes, captions)
    return {k: result[k] for k in ("colour_acc", "shape_acc", "direction_acc", "all_acc", "n")}


@torch.no_grad()
def build_latent_pool(vae, n, gen, device, batch=128, world="one-object", pair_fraction=0.5):
    """Encode ``n`` training videos of the world once (posterior means); the DiT then trains on the pool."""
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    zs, caps = [], []
    for s in range(0, n, batch):
        videos, c = data.sample_world_batch(min(batch, n - s), gen, world, device, pair_fraction=pair_fraction)
        with torch.autocast(**amp):
            zs.append(vae.encode(videos).mean.to(torch.bfloat16))
        caps += c
    return torch.cat(zs), caps  # (n, 16, 5, 16, 16)


def train_dit(args, device, gen, state, out, vae):
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    pool, pool_caps = build_latent_pool(vae, args.pool, gen, device, world=args.world,
                                        pair_fraction=args.pair_fraction)
    scale = state.get("vae_scaling_factor") or float(1.0 / pool.float().std())
    llm, clip = build_text_encoders()
    llm.to(device), clip.to(device)
    # the pool's captions (at full size, nearly every caption of the world), the last one for dropout
    captions = sorted(set(pool_caps)) + [""]
    with torch.no_grad():
        enc = llm.encode(captions, device=device)
        text, mask = enc.hidden_state.float(), enc.attention_mask
        pooled = clip.encode(captions, device=device).hidden_state.float()
    index = {c: i for i, c in enumerate(captions)}
    cap_ids = torch.tensor([index[c] for c in pool_caps], device=device)

    dit = HYVideoDiffusionTransformer(PRESETS["toy"]).to(device)
    if args.init_from and "dit" not in state:
        warm_start(dit, args.init_from, "dit.safetensors")
    if "dit" in state:
        dit.load_state_dict(state["dit"])
    ema = copy.deepcopy(dit).requires_grad_(False)
    if "ema" in state:
        ema.load_state_dict(state["ema"])
    opt = torch.optim.AdamW(dit.parameters(), lr=args.dit_lr, weight_decay=0.01)
    if "dit_opt" in state:
        opt.load_state_dict(state["dit_opt"])
    loop = Loop("dit", state.get("dit_total", args.dit_steps), args.dit_minutes, 300, args.dit_lr, out,
                state.get("dit_step", 0), state.get("dit_seconds", 0.0))
    dit.train()
    B = args.dit_batch
    while not loop.done():
        lr = loop.lr()
        set_lr(opt, lr)
        with torch.no_grad():
            idx = torch.randint(0, len(pool), (B,), generator=gen, device=device)
            x0 = pool[idx].float() * scale
            ids = cap_ids[idx]
            drop = torch.rand(B, generator=gen, device=device) < args.caption_dropout
            ids = torch.where(drop, torch.full_like(ids, len(captions) - 1), ids)
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
        with torch.no_grad():
            decay = min(args.ema, (1 + loop.step) / (10 + loop.step))
            torch._foreach_lerp_(list(ema.parameters()), list(dit.parameters()), 1 - decay)
        loop.advance(loss, lr)
        if loop.step % args.save_every == 0 or loop.done():
            save_state(out / "state.pt", dict(
                vae=vae.state_dict(), vae_step=state.get("vae_step"), vae_seconds=state.get("vae_seconds"),
                vae_total=state.get("vae_total"), vae_check=state.get("vae_check"), vae_scaling_factor=scale,
                dit=dit.state_dict(),
                ema=ema.state_dict(), dit_opt=opt.state_dict(), dit_step=loop.step, dit_total=loop.total,
                dit_seconds=loop.seconds, gen=gen.get_state()))
    loop.finish()
    return ema.eval(), llm, clip, scale, loop


def train(args) -> dict:
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)  # module initialisation
    state_path = out / "state.pt"
    state = torch.load(state_path, map_location="cpu", weights_only=False) if args.resume and state_path.exists() else {}
    gen = torch.Generator(device=device).manual_seed(args.seed)  # data, noise, sigmas, caption dropout
    if "gen" in state:
        gen.set_state(state["gen"])
    vae, vloop = train_vae(args, device, gen, state, out)
    state.update(vae_step=vloop.step, vae_total=vloop.total, vae_seconds=vloop.seconds)
    check = state.get("vae_check")
    if check is None and args.vae_check and args.world == "two-object":
        check = vae_check(vae, args.vae_check, device)
        print(f"[vae] two-object reconstructions read back: {check}", flush=True)
    state["vae_check"] = check
    dit, llm, clip, scale, dloop = train_dit(args, device, gen, state, out, vae)
    summary = dict(
        command="python -m hvlab.toy.train " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k not in ("resume", "out", "device", "vae_minutes", "dit_minutes", "vae_steps", "dit_steps", "vae_check")
            and v is not None),
        vae_steps=vloop.step, vae_seconds=round(vloop.seconds, 1), dit_steps=dloop.step,
        dit_seconds=round(dloop.seconds, 1), vae_scaling_factor=scale,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch=torch.__version__,
        dit_params=sum(p.numel() for p in dit.parameters()), vae_params=sum(p.numel() for p in vae.parameters()),
        world=args.world, vae_two_object_check=check)
    summary["command"] += f" --vae-steps {vloop.step} --dit-steps {dloop.step}"
    export(out / "weights", dit, vae, llm, clip, scale, summary)
    plot_losses(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def export(wd: Path, dit, vae, llm, clip, scale: float, summary: dict) -> None:
    """Write the shipped files: fp16 safetensors (loaded back in fp32), tokenizer and config."""
    wd.mkdir(parents=True, exist_ok=True)

    def half(sd):
        return {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}

    save_safetensors(half(dit.state_dict()), str(wd / "dit.safetensors"))
    save_safetensors(half(vae.state_dict()), str(wd / "vae.safetensors"))
    save_safetensors(half(llm.model.state_dict()), str(wd / "text_encoder.safetensors"))
    save_safetensors(half(clip.model.state_dict()), str(wd / "text_encoder_2.safetensors"))
    tok_src = WEIGHTS_DIR / "tokenizer"
    if tok_src.exists() and tok_src.resolve() != (wd / "tokenizer").resolve():
        shutil.copytree(tok_src, wd / "tokenizer", dirs_exist_ok=True)
    meta = dict(vae_scaling_factor=scale, defaults=TOY_DEFAULTS, latent_to_rgb=fit_toy_preview_map(vae, scale),
                training=summary)
    (wd / "config.json").write_text(json.dumps(meta, indent=2, default=str))


PREVIEW_MAP = dict(videos=42, hidden=32, foreground_weight=10.0, seed=99)  # how the shipped preview map is fitted


def fit_toy_preview_map(vae, scale: float, videos: int = PREVIEW_MAP["videos"], hidden: int = PREVIEW_MAP["hidden"],
                        foreground_weight: float = PREVIEW_MAP["foreground_weight"], seed: int = PREVIEW_MAP["seed"],
                        batch: int = 6) -> dict:
    """The toy's latent -> RGB preview map: `fit_latent_to_rgb` on the VAE's (scaled) latents of ``videos``
    rendered clips, every colour equally often (colour ``i % 7`` for clip ``i``; shape, direction, size and
    path drawn from ``seed``). One hidden layer: the toy VAE stores colour non-linearly (see
    `hvlab.inspection.preview`); the object's pixels weigh more because most of each frame is black."""
    from ..inspection.preview import fit_latent_to_rgb

    device = next(vae.parameters()).device
    attrs = data.sample_attributes(videos, torch.Generator(device=device).manual_seed(seed), split="all", device=device)
    colours = torch.arange(videos, device=device) % len(data.COLOURS)
    clips = data.render_videos(colours, attrs["shape"], attrs["direction"], radius=attrs["radius"],
                               start_xy=attrs["start_xy"], speed=attrs["speed"], device=device)
    with torch.no_grad():
        z = torch.cat([vae.encode(clips[i:i + batch]).mean.float() for i in range(0, videos, batch)]) * scale
    return fit_latent_to_rgb(z, clips, hidden=hidden, foreground_weight=foreground_weight, seed=seed)


def refit_preview_map(weights_dir=WEIGHTS_DIR, device: str = "cpu") -> dict:
    """Refit the preview map of exported toy weights and rewrite their config.json (atomically): the
    weights themselves are untouched. ``python -m hvlab.toy.train --refit-preview [--init-from DIR]``."""
    from ..vae import load_vae_checkpoint

    wd = Path(weights_dir)
    meta = json.loads((wd / "config.json").read_text())
    vae = AutoencoderKLCausal3D(toy_vae_config(meta["vae_scaling_factor"]))
    load_vae_checkpoint(vae, str(wd / "vae.safetensors"))
    vae.float().to(device).eval()
    meta["latent_to_rgb"] = fit_toy_preview_map(vae, meta["vae_scaling_factor"])
    meta["latent_to_rgb_fit"] = dict(PREVIEW_MAP, how="hvlab.toy.train.fit_toy_preview_map")
    tmp = wd / "config.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, wd / "config.json")
    return meta["latent_to_rgb"]


def plot_losses(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, name in zip(axes, ["vae", "dit"]):
        p = out / f"{name}_loss.csv"
        if p.exists():
            rows = list(csv.DictReader(open(p)))
            ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
        ax.set(title=f"{name.upper()} training loss (per logged step)", xlabel="step", yscale="log")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/toy")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init-from", default=None, help="warm start: a folder of exported toy weights")
    p.add_argument("--world", choices=data.WORLDS, default="one-object",
                   help="two-object: mix one- and two-object clips (see hvlab.toy.data)")
    p.add_argument("--pair-fraction", type=float, default=0.5, help="share of two-object clips (two-object world)")
    p.add_argument("--vae-check", type=int, default=64, metavar="N",
                   help="two-object videos read back through the trained VAE (two-object world; 0: skip)")
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-minutes", type=float, default=None, help="size the VAE phase to this budget")
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-frames", type=int, default=17,
                   help="clip length for VAE training (4k+1). Train on the full 17 frames the pipeline generates: "
                        "a VAE trained on 5-frame clips decoded the later latent frames of 17-frame videos badly "
                        "(its frame-causal attention and GroupNorm statistics did not extrapolate)")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--pool", type=int, default=32768, help="training videos encoded once for the DiT")
    p.add_argument("--dit-steps", type=int, default=4000)
    p.add_argument("--dit-minutes", type=float, default=None, help="size the DiT phase to this budget")
    p.add_argument("--dit-batch", type=int, default=256)
    p.add_argument("--dit-lr", type=float, default=5e-4)
    p.add_argument("--train-shift", type=float, default=3.0)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--refit-preview", action="store_true",
                   help="only refit the latent -> RGB preview map of --init-from's weights (default: the shipped "
                        "ones) and rewrite their config.json")
    p.add_argument("--finetune-decoder", type=int, default=0, metavar="STEPS",
                   help="only fine-tune the VAE decoder of --init-from's weights on full clips, writing to --out")
    args = p.parse_args(argv)
    if args.refit_preview:
        refit_preview_map(args.init_from or WEIGHTS_DIR, device=args.device)
        return
    if args.finetune_decoder:
        finetune_decoder(args.init_from, args.out, args.finetune_decoder, device=args.device)
        return
    summary = train(args)
    print(json.dumps(summary, indent=2))



def finetune_decoder(weights_dir: str, out_dir: str, steps: int, batch: int = 1, frames: int = 17,
                     lr: float = 3e-4, seed: int = 1, device: str = "cpu", save_every: int = 10) -> None:
    """Fine-tune only the VAE decoder (and post_quant_conv) on full-length clips; the encoder is frozen.

    The encoder defines the latent space the DiT was trained in, so freezing it keeps the DiT valid,
    while the decoder learns to decode clips as long as the ones the pipeline generates. (The shipped
    toy needed this: its VAE had been trained on 5-frame clips, and its mid-block attention, causal
    over frames, did not extrapolate to 5 latent frames.)
    """
    from ..vae import load_vae_checkpoint

    wd, out = Path(weights_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((wd / "config.json").read_text())
    vae = AutoencoderKLCausal3D(toy_vae_config(meta["vae_scaling_factor"]))
    src = out / "vae.safetensors" if (out / "vae.safetensors").exists() else wd / "vae.safetensors"
    load_vae_checkpoint(vae, str(src))
    vae.float().to(device)
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    done = int(meta.get("decoder_finetune_steps", 0)) if src.parent == out else 0
    gen = torch.Generator(device=device).manual_seed(seed + done)
    log = Logger(out / "decoder_finetune_loss.csv", ["step", "loss", "lr", "seconds"])
    t0 = time.perf_counter()
    vae.decoder.train()
    for step in range(done + 1, steps + 1):
        videos, _, _ = data.sample_batch(batch, gen, split="train", device=device, frames=frames)
        with torch.no_grad():
            z = vae.encode(videos).mean
        loss = reconstruction_loss(vae.decode(z), videos)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.log(step=step, loss=f"{loss.item():.5f}", lr=f"{lr:.2e}", seconds=f"{time.perf_counter() - t0:.1f}")
        if step % save_every == 0 or step == steps:
            save_safetensors({k: v.half() for k, v in vae.state_dict().items()}, str(out / "vae.safetensors"))
            meta["decoder_finetune_steps"] = step
            meta.setdefault("training", {})["decoder_finetune"] = dict(
                steps=step, batch=batch, frames=frames, lr=lr, device=device, seconds=round(time.perf_counter() - t0, 1))
            (out / "config.json").write_text(json.dumps(meta, indent=2, default=str))
            print(f"[decoder] step {step}/{steps} loss {loss.item():.4f} {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
