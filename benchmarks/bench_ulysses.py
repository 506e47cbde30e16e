"""Time one 720p DiT step with Ulysses sequence parallelism (hvlab.fast.parallel) at degrees 1, 2, 4, bf16 and FP8.

Every configuration runs in the same job on the same cards, so the speedup over degree 1 is measured, not
recalled: degree d uses ranks 0..d-1 (a `dist.new_group`) while the others wait; degree 1 is the plain model
on rank 0. Each rank builds the 13B model (random weights, bench_dit's `init_random_`: normal std 0.02, the
same seed on every rank so all ranks hold the same weights) directly on its GPU; FP8 converts the same model
in place after the bf16 rows (hvlab.fast.fp8.convert_to_fp8, then mode "scaled_mm" as in bench_dit).
Inputs are bench_dit's: latent 16 x 33 x 90 x 160 (720 x 1280, 129 frames; 118,800 video tokens), 256 text
tokens of which 24 are real, guidance 6016.

Per configuration: `--warmup` untimed steps, then `--steps` steps timed with CUDA events (the slowest rank
counts), peak memory (the largest over ranks), and the largest relative error of the velocity against
degree 1 of the same precision. Prints a markdown table; writes $OUT/bench_ulysses.json (OUT defaults to
./outputs) after every configuration, so a timeout still leaves numbers.

    torchrun --nproc_per_node 4 benchmarks/bench_ulysses.py                  # degrees 1, 2, 4; bf16 and fp8
    torchrun --nproc_per_node 2 benchmarks/bench_ulysses.py --degrees 1,2
    python benchmarks/bench_ulysses.py --quick                               # tiny model, 2 gloo CPU processes

Without torchrun the script spawns `--nproc` processes itself (default: every GPU, or 2 in --quick).
Expected cost on 4 H100s: build ~1 min, then per precision (1 + 1/2 + 1/4) x (warmup + steps) single-GPU
step times (~30-40 s bf16): about 4 min per precision with the defaults. Not yet run on GPUs (written in a
session without device time); the CPU --quick run only checks the mechanics.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from bench_dit import TEXT_LEN, TEXT_REAL, build_hvlab, make_inputs, sdpa_context, tokens  # noqa: E402

from hvlab.model import HYVIDEO_T2_CONFIG, TINY_CONFIG  # noqa: E402
from hvlab.fast.parallel import UlyssesDiT, check_ulysses_degree, free_port  # noqa: E402

GRID_720P = (33, 90, 160)  # latent T, H, W for 720 x 1280 x 129 frames
GRID_QUICK = (3, 8, 8)  # 3 x 4 x 4 = 48 tokens after the 1x2x2 patch


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--degrees", default=None, help="comma list (default 1,2,4 up to the world size)")
    p.add_argument("--precisions", default="bf16,fp8", help="comma list of bf16, fp8 (fp8 after bf16)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (cuDNN plans, NCCL setup, allocator)")
    p.add_argument("--quick", action="store_true", help="tiny model and latent on CPU with gloo: a smoke test")
    p.add_argument("--nproc", type=int, default=None, help="processes to spawn when not launched by torchrun")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else ./outputs)")
    args = p.parse_args(argv)
    precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    if not precisions or any(s not in ("bf16", "fp8") for s in precisions):
        p.error(f"--precisions must come from bf16, fp8, got {args.precisions!r}")
    if "fp8" in precisions and "bf16" in precisions and precisions.index("fp8") < precisions.index("bf16"):
        p.error("--precisions: bf16 must come before fp8 (fp8 converts the model in place)")
    args.precisions = precisions
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    return args


def _worker(local_rank: int, world: int, port: int, argv: list[str]) -> None:
    """Entry point of a spawned process: the environment torchrun would have set, then `run`."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run(parse(argv))


def _time_steps(step, n: int, device, group) -> list[float]:
    times = []
    for _ in range(n):
        if group is not None:  # start together (degree 1 runs on rank 0 alone: no group to wait for)
            dist.barrier(group=group)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def run(args) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available() and not args.quick
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo")
    config, grid = (TINY_CONFIG, GRID_QUICK) if args.quick else (HYVIDEO_T2_CONFIG, GRID_720P)
    degrees = ([int(d) for d in args.degrees.split(",")] if args.degrees
               else [d for d in (1, 2, 4) if d <= world])
    if any(d > world for d in degrees) or 1 not in degrees:
        raise SystemExit(f"--degrees {degrees} must include 1 (the baseline) and stay <= the world size {world}")
    L_img = tokens(config, grid)
    for d in degrees:
        check_ulysses_degree(d, config.heads_num, L_img, [n // p for n, p in zip(grid, config.patch_size)])
    groups = {d: dist.new_group(list(range(d))) for d in degrees if d > 1}  # every rank must call new_group

    try:
        from hvlab.attention import set_attention_backend

        set_attention_backend("sdpa")  # as bench_dit: SDPA (cuDNN first) on the real and padding segments
    except (ImportError, ValueError):
        pass
    t0 = time.perf_counter()
    model = build_hvlab(config, device, args.seed)  # bf16, same seed on every rank -> same weights
    inp = make_inputs(config, grid, device)
    build_s = time.perf_counter() - t0
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "world_size": world,
           "card": torch.cuda.get_device_name(device) if cuda else "cpu",
           "backend": dist.get_backend(), "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None}
    report = {"env": env, "config": "tiny" if args.quick else "HYVideo-T/2-cfgdistill",
              "latent": [config.in_channels, *grid], "L_img": L_img, "text": {"padded": TEXT_LEN, "real": TEXT_REAL},
              "steps": args.steps, "warmup": args.warmup, "build_s": round(build_s, 1), "results": []}
    out_dir = args.out or os.environ.get("OUT") or "outputs"
    path = os.path.join(out_dir, "bench_ulysses.json")
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        print(json.dumps(env), flush=True)

    for precision in args.precisions:
        row_fp8 = {}
        if precision == "fp8":
            from hvlab.fast.fp8 import convert_to_fp8, set_fp8_mode

            convert_to_fp8(model, mode="weight_only")
            row_fp8["fp8_mode"] = set_fp8_mode(model, "scaled_mm")  # falls back (with a warning) off FP8 GPUs
        baseline = None  # rank 0's degree-1 velocity, for the error column
        for d in degrees:
            member = rank < d
            stats = torch.zeros(3, dtype=torch.float64, device=device)  # s/step, peak GiB, rel err (MAX-reduced)
            if member:
                group = groups.get(d)
                sp = model if d == 1 else UlyssesDiT(model, group)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                out = None

                def step():
                    nonlocal out
                    out = sp(**inp)

                with torch.no_grad(), sdpa_context(device):
                    _time_steps(step, args.warmup, device, group)
                    times = _time_steps(step, args.steps, device, group)
                stats[0] = sum(times) / len(times)
                stats[1] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
                if rank == 0:
                    if d == 1:
                        baseline = out.float()
                    stats[2] = float((out.float() - baseline).abs().max() / baseline.abs().max())
                if d > 1:
                    sp.close()
                del out
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank, the fullest card
            if rank == 0:
                s = stats.tolist()
                base = next((r["s_per_step"] for r in report["results"]
                             if r["precision"] == precision and r["degree"] == 1), s[0])
                row = dict(precision=precision, degree=d, s_per_step=s[0], speedup=base / s[0],
                           efficiency=base / s[0] / d, peak_gib=s[1] if cuda else None, max_rel_err_vs_degree1=s[2],
                           **row_fp8)
                report["results"].append(row)
                print(json.dumps(row), flush=True)
                with open(path, "w") as f:
                    json.dump(report, f, indent=1)
            dist.barrier()
    if rank == 0:
        print(markdown_table(report))
        print(f"wrote {path}")
    dist.destroy_process_group()


def markdown_table(report: dict) -> str:
    env = report["env"]
    lines = [f"DiT step with Ulysses sequence parallelism, latent {' x '.join(map(str, report['latent']))} "
             f"({report['L_img']} video tokens), {env['card']} x {env['world_size']}, torch {env['torch']}, "
             f"{env['backend']} (mean of {report['steps']} step(s) after {report['warmup']} warm-up; slowest rank)",
             "", "| precision | GPUs | s/step | speedup | efficiency | peak GiB | max rel err vs 1 GPU |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        prec = r["precision"] + (f" ({r['fp8_mode']})" if "fp8_mode" in r else "")
        lines.append(f"| {prec} | {r['degree']} | {r['s_per_step']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['efficiency']:.0%} | {peak} | {r['max_rel_err_vs_degree1']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if "RANK" in os.environ:  # launched by torchrun
        run(args)
        return
    nproc = args.nproc or (2 if args.quick or not torch.cuda.is_available() else torch.cuda.device_count())
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(nproc, free_port(), argv), nprocs=nproc, join=True)


if __name__ == "__main__":
    main()
