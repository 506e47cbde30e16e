"""Offloading: keep weights in CPU memory and give them GPU memory only while they run.

Two granularities, both plugged in from outside (the models do not know about them):

- ``on_device(module, device)``: a whole model (a text encoder, the VAE) visits the GPU for one stage and
  goes back to the CPU, as the pipeline's ``cpu_offload`` does (the official ``--use-cpu-offload`` idea).
- ``BlockOffloader``: the DiT's blocks stay on the CPU and are streamed to the GPU two at a time.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device | str, enabled: bool = True):
    """``with on_device(vae, "cuda"): ...``: move ``module`` to ``device`` for the block, then back to the CPU.

    With ``enabled=False`` nothing moves (the module stays wherever it is).
    """
    if not enabled:
        yield module
        return
    device = torch.device(device)
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


class BlockOffloader:
    """Keep the DiT's 60 blocks in (pinned) CPU memory and give each one GPU copy only while it runs.

    A forward pre-hook on block i makes sure its weights are on ``device`` and starts copying block i+1 on a
    side CUDA stream, so the copy overlaps block i's compute; a forward hook drops block i's GPU copy. At most
    two blocks are on the GPU at a time (``max_resident`` records it); after the last block the first is
    prefetched, ready for the next step. Everything outside the blocks (embedders, refiner, final layer) lives
    on ``device``. The maths is unchanged: each block sees exactly its own weights.

    Cost: each step copies all block weights once over PCIe (~13 GB in FP8: ~0.5 s at ~25 GB/s), hidden behind
    compute when a block takes longer than its copy, which holds at 720p (~0.3 s of compute per block).
    """

    def __init__(self, model: nn.Module, device: torch.device | str, prefetch: bool = True):
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.blocks = [*model.double_blocks, *model.single_blocks]
        for name, child in model.named_children():
            if name not in ("double_blocks", "single_blocks"):
                child.to(self.device)
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self._host: list[list] = []  # per block: [(module, "p" or "b", name, host tensor)]
        for block in self.blocks:
            entries = []
            for mod in block.modules():
                for kind, table in (("p", mod._parameters), ("b", mod._buffers)):
                    for n, t in table.items():
                        if t is not None:
                            host = t.data.to("cpu")
                            entries.append((mod, kind, n, host.pin_memory() if cuda else host))
            self._host.append(entries)
            self._set(len(self._host) - 1, [e[3] for e in entries])
        self._ready: dict[int, object] = {}  # block index -> CUDA event (None on CPU) of its finished copy
        self.max_resident = 0
        self._handles = []
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(lambda m, a, i=i: self._before(i)))
            self._handles.append(block.register_forward_hook(lambda m, a, o, i=i: self._after(i)))

    def _set(self, i: int, tensors) -> None:
        for (mod, kind, n, _), t in zip(self._host[i], tensors):
            if kind == "p":
                mod._parameters[n].data = t
            else:
                mod._buffers[n] = t

    def _load(self, i: int) -> None:
        """Start copying block i to the device (on the side stream when there is one)."""
        if i in self._ready:
            return
        if self.stream is None:
            self._set(i, [h.clone() if self.device.type == "cpu" else h.to(self.device) for *_, h in self._host[i]])
            self._ready[i] = None
        else:
            with torch.cuda.stream(self.stream):
                self._set(i, [h.to(self.device, non_blocking=True) for *_, h in self._host[i]])
                event = torch.cuda.Event()
                event.record(self.stream)
            self._ready[i] = event
        self.max_resident = max(self.max_resident, len(self._ready))

    def _before(self, i: int) -> None:
        self._load(i)
        event = self._ready[i]
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for mod, kind, n, _ in self._host[i]:  # allocated on the side stream, used on this one
                (mod._parameters[n].data if kind == "p" else mod._buffers[n]).record_stream(current)
        if self.prefetch:
            self._load((i + 1) % len(self.blocks))

    def _after(self, i: int) -> None:
        self._set(i, [h for *_, h in self._host[i]])  # the device copy is freed (after this stream's use)
        self._ready.pop(i, None)

    def remove(self) -> None:
        """Detach the hooks and leave every block on the CPU."""
        for h in self._handles:
            h.remove()
        for i in list(self._ready):
            self._after(i)
