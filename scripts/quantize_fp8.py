"""Quantize a bf16 DiT checkpoint into the official FP8 pair (see hvlab/fp8.py for the format).

    python scripts/quantize_fp8.py ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt \
        --out ckpts/hunyuan-video-t2v-720p/transformers [--per-channel]

writes mp_rank_00_model_states_fp8.pt and mp_rank_00_model_states_fp8_map.pt into --out. The 13B checkpoint
is read memory-mapped, one tensor at a time; the fp8 result (~13 GB) is held in memory until written.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from hvlab.checkpoint import load_state_dict_file  # noqa: E402
from hvlab.fast.fp8 import FP8_DTYPE, save_fp8_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> tuple[str, str]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint",
                   help="bf16 mp_rank_00_model_states.pt (weights under 'module'), safetensors, or a folder")
    p.add_argument("--out", required=True, help="folder for the FP8 pair")
    p.add_argument("--per-channel", action="store_true",
                   help="one scale per output row (an hvlab extension; the official loader reads per-tensor only)")
    args = p.parse_args(argv)

    sd = load_state_dict_file(args.checkpoint)
    ckpt, smap = save_fp8_checkpoint(sd, args.out, per_channel=args.per_channel)
    written = torch.load(ckpt, weights_only=True, mmap=True)["module"]
    n8 = sum(v.numel() for v in written.values() if v.dtype == FP8_DTYPE)
    total = sum(v.numel() for v in sd.values())
    n_layers = len(torch.load(smap, weights_only=True))
    print(f"{n_layers} layers in fp8 ({n8 / total:.1%} of {total:,} parameters)\n  {ckpt}\n  {smap}")
    return ckpt, smap


if __name__ == "__main__":
    main()
