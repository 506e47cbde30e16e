"""Peak CPU memory while loading a random-weight DiT from each checkpoint layout (issue 19).

For each layout this writes the same random-weight DiT (bf16, the release's dtype) to disk, then loads it in a
fresh child process through `hvlab.readers.load_dit` (what `load_pipeline` runs) and reads the child's memory
from /proc/self/status while it works: VmHWM (the peak resident set, file-backed pages of memory-mapped files
included) and the peak of RssAnon (anonymous memory: copies, conversions), sampled every 2 ms by a thread.

Layouts:
  official        hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt ({"module": state dict})
  diffusers       transformer/ with config.json and safetensors shards (--shard-gb, diffusers' 5 GB default)
                  under diffusers' names: q, k, v are fused back on the fly, shard after shard
  single          one safetensors file under official names (ComfyUI's hunyuan_video_*_bf16.safetensors)
  single-fp8      the same with every block Linear weight in float8_e4m3fn, no scales (Kijai's fp8 file)
  eager-official  the baseline: torch.load without mmap into a model built with real (bf16) parameters,
                  then load_state_dict: how a checkpoint is loaded without any of this

Each load is measured twice: "load" stops when load_dit returns (memory-mapped tensors are not read yet),
"load+touch" then reads every byte of every parameter (a checksum), which is what the first forward (or a
.to("cuda")) does; on CPU with the file's dtype the parameters *are* the file's pages. --dtype fp32 loads with a
conversion (every tensor copied once). --device cuda moves every tensor to the GPU as it is assigned.

    python benchmarks/bench_load.py --size mid                 # 1.46B parameters, 2.9 GB files (a 24 GB host)
    python benchmarks/bench_load.py --size 13b --device cuda   # the release DiT: 25.6 GB files, a big host
    python benchmarks/bench_load.py --size tiny                # seconds, a smoke test

Files go to --workdir (default a temporary folder) and are deleted after each layout. Prints a markdown table and
writes $OUT/bench_load.json (OUT defaults to ./outputs).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from hvlab.model import HYVIDEO_T2_CONFIG, TINY_CONFIG, HYVideoConfig, HYVideoDiffusionTransformer  # noqa: E402

SIZES = {
    "tiny": TINY_CONFIG,
    # the release's width (3072, 24 heads, head dim 128), refiner and embedders, 2 double + 3 single blocks:
    # 1.46B parameters, 2.9 GB in bf16 (one file fits beside its copies on a 24 GB host)
    "mid": replace(HYVIDEO_T2_CONFIG, mm_double_blocks_depth=2, mm_single_blocks_depth=3),
    "13b": HYVIDEO_T2_CONFIG,
}
LAYOUTS = ("official", "diffusers", "single", "single-fp8", "eager-official")
MiB = 2**20


# ----------------------------------------------------------------------------------------- writing
def random_state_dict(config: HYVideoConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """bf16 random weights for every tensor of the DiT (values do not matter for memory; shapes do)."""
    g = torch.Generator().manual_seed(seed)
    meta = HYVideoDiffusionTransformer(config, device="meta").state_dict()
    return {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) for k, v in meta.items()}


def write_layout(layout: str, sd: dict, config: HYVideoConfig, root: Path, shard_gb: float) -> Path:
    from hvlab.checkpoint import iter_official_to_diffusers, save_safetensors
    from hvlab.convert import _write_json, _write_shards, diffusers_transformer_config
    from hvlab.fast.fp8 import FP8_DTYPE, fp8_state_dict_filter
    from hvlab.layouts import RELEASE_FILES

    if layout in ("official", "eager-official"):
        path = root / RELEASE_FILES["dit"]
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"module": sd}, path)
        return path
    if layout == "diffusers":
        folder = root / "transformer"
        _write_json(folder / "config.json", diffusers_transformer_config(config))
        _write_shards(iter_official_to_diffusers(sd.items(), hidden_size=config.hidden_size), folder,
                      "diffusion_pytorch_model", int(shard_gb * 1e9))
        return folder
    path = root / f"hunyuan_video_dit_{'fp8_e4m3fn' if layout == 'single-fp8' else 'bf16'}.safetensors"
    root.mkdir(parents=True, exist_ok=True)
    if layout == "single-fp8":
        sd = {k: v.to(FP8_DTYPE) if fp8_state_dict_filter(k, v) else v for k, v in sd.items()}
    save_safetensors(sd, str(path))
    return path


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())


# ----------------------------------------------------------------------------------------- measuring
def status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+)", text, re.M).group(1)) * 1024 for k in ("VmHWM", "RssAnon", "RssFile")}


class AnonPeak(threading.Thread):
    """Samples RssAnon (and RssFile) every 2 ms: the kernel keeps no high-water mark for them."""

    def __init__(self):
        super().__init__(daemon=True)
        self.anon = self.file = 0
        self.running = True

    def run(self):
        while self.running:
            s = status()
            self.anon, self.file = max(self.anon, s["RssAnon"]), max(self.file, s["RssFile"])
            time.sleep(0.002)

    def stop(self) -> dict[str, int]:
        self.running = False
        self.join()
        s = status()
        return dict(peak_rss=s["VmHWM"], peak_anon=max(self.anon, s["RssAnon"]), peak_file=max(self.file, s["RssFile"]))


def child(layout: str, path: str, size: str, dtype: str, device: str) -> dict:
    """One load in this (fresh) process; returns what it measured."""
    import hvlab.fast.fp8  # noqa: F401  (imported before the baseline is read: only the load itself counts)
    from hvlab.layouts import component_from_path
    from hvlab.readers import load_dit

    config = SIZES[size]
    target = {"same": None, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    base = status()
    sampler = AnonPeak()
    sampler.start()
    t0 = time.perf_counter()
    if layout == "eager-official":  # the baseline: read everything, then copy into allocated parameters
        model = HYVideoDiffusionTransformer(config, dtype=target or torch.bfloat16)
        sd = torch.load(path, map_location="cpu", weights_only=True)["module"]
        model.load_state_dict(sd)
        del sd
        model.to(device)
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "without scales" / the CPU FP8 fallback: expected here
            model = load_dit(component_from_path("dit", path), config, device=device, dtype=target)
    load_s = time.perf_counter() - t0
    at_load = sampler.stop()
    sampler = AnonPeak()
    sampler.start()
    checksum = 0.0
    with torch.no_grad():
        for p in model.parameters():  # fault every page in (a forward reads them all), copying nothing:
            page = p.detach().reshape(-1).view(torch.uint8)[::4096]  # one byte per 4 KiB page, a strided view
            checksum += int(page.sum())
    touched = sampler.stop()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(layout=layout, load_s=load_s, model_bytes=nbytes, base_rss=base["VmHWM"], at_load=at_load,
                touched=touched, device=str(next(model.parameters()).device), checksum=checksum)


# ----------------------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="mid")
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    p.add_argument("--dtype", choices=("same", "fp32", "bf16"), default="same",
                   help="load dtype: same = keep the file's (no copy); fp32 = convert every tensor once")
    p.add_argument("--device", default="cpu", help="where the weights go (cuda: moved as they are assigned)")
    p.add_argument("--shard-gb", type=float, default=5.0, help="diffusers shard size (diffusers writes 5 GB)")
    p.add_argument("--workdir", default=None, help="where the files are written (default: a temporary folder)")
    p.add_argument("--child", nargs=2, metavar=("LAYOUT", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args.size, args.dtype, args.device)))
        return 0
    config = SIZES[args.size]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_load_"))
    work.mkdir(parents=True, exist_ok=True)
    params = sum(v.numel() for v in HYVideoDiffusionTransformer(config, device="meta").state_dict().values())
    print(f"DiT {args.size}: {params / 1e9:.2f}B parameters; torch {torch.__version__}; files in {work}", flush=True)
    sd = random_state_dict(config)
    rows = []
    out = Path(os.environ.get("OUT", "outputs"))
    out.mkdir(parents=True, exist_ok=True)
    for layout in args.layouts:
        root = work / layout
        shutil.rmtree(root, ignore_errors=True)
        path = write_layout(layout, sd, config, root, args.shard_gb)
        size = disk_bytes(path)
        cmd = [sys.executable, __file__, "--size", args.size, "--dtype", args.dtype, "--device", args.device,
               "--child", layout, str(path)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        shutil.rmtree(root, ignore_errors=True)
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if res.returncode or line is None:
            print(f"{layout}: failed\n{res.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(line[len("RESULT "):])
        r.update(file_bytes=size, size=args.size, dtype=args.dtype, params=params)
        rows.append(r)
        (out / "bench_load.json").write_text(json.dumps(rows, indent=2))
        print(f"{layout}: {size / MiB:,.0f} MiB on disk, loaded in {r['load_s']:.1f} s", flush=True)
    print(f"\n| layout | on disk MiB | loaded model MiB | process before MiB | peak RSS at load MiB | "
          f"peak RSS after touching every weight MiB | peak anon MiB | peak RSS / model |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = max(r["at_load"]["peak_rss"], r["touched"]["peak_rss"])
        anon = max(r["at_load"]["peak_anon"], r["touched"]["peak_anon"])
        extra = (peak - r["base_rss"]) / r["model_bytes"]
        print(f"| {r['layout']} | {r['file_bytes'] / MiB:,.0f} | {r['model_bytes'] / MiB:,.0f} | "
              f"{r['base_rss'] / MiB:,.0f} | {r['at_load']['peak_rss'] / MiB:,.0f} | {peak / MiB:,.0f} | "
              f"{anon / MiB:,.0f} | {extra:.2f} |")
    print("\npeak RSS / model = (peak RSS - the process's RSS before loading) / bytes of the loaded parameters")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
