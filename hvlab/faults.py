"""Pause points for the interruption tests: make ``hvlab generate`` stop at a chosen place and say so.

A Ctrl-C test must hit "during a DiT forward", "between two steps" or "during the decode" every time, not when
a timer happens to fire. With ``HVLAB_PAUSE_AT`` set, the command blocks at that point, writes the file named
by ``HVLAB_PAUSE_READY`` and sleeps until a signal (SIGINT) arrives, which then lands exactly there:

    HVLAB_PAUSE_AT=load          while the model loads (before any weight is read)
    HVLAB_PAUSE_AT=forward:K     inside the DiT's forward of denoising step K (at its first block)
    HVLAB_PAUSE_AT=step_end:K    after step K's update, in its on_step_end hook, before the loop moves on
    HVLAB_PAUSE_AT=step_begin:K  at the start of step K, before its DiT forward
    HVLAB_PAUSE_AT=decode        inside the VAE decoder
    HVLAB_PAUSE_AT=save          after the decode, while the output files are written

Unset (always, outside tests), `pause_point` and `install` do nothing.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .inspection.hooks import PipelineHook

ENV_AT, ENV_READY = "HVLAB_PAUSE_AT", "HVLAB_PAUSE_READY"


def _wanted() -> tuple[str, int | None] | None:
    spec = os.environ.get(ENV_AT)
    if not spec:
        return None
    name, _, k = spec.partition(":")
    return name, int(k) if k else None


def _pause(where: str) -> None:
    ready = os.environ.get(ENV_READY)
    if ready:
        Path(ready).write_text(where)
    while True:  # until a signal handler raises (KeyboardInterrupt) or ends the process
        time.sleep(0.05)


def pause_point(name: str) -> None:
    """Block here if ``HVLAB_PAUSE_AT`` names this point (``load``, ``save``)."""
    w = _wanted()
    if w is not None and w[0] == name:
        _pause(name)


class _PauseHook(PipelineHook):
    def __init__(self, pipe, name: str, k: int | None):
        super().__init__(pipe)
        self.name, self.k, self.step, self.handles = name, k, None, []
        if name == "forward":
            first = (list(pipe.transformer.double_blocks) + list(pipe.transformer.single_blocks))[0]
            self.handles.append(first.register_forward_pre_hook(self._in_forward))
        elif name == "decode":
            self.handles.append(pipe.vae.decoder.register_forward_pre_hook(lambda m, a: _pause("decode")))

    def _in_forward(self, module, args):
        if self.step == self.k:
            _pause(f"forward:{self.k}")

    def on_step_begin(self, i: int) -> None:
        self.step = i
        if self.name == "step_begin" and i == self.k:
            _pause(f"step_begin:{i}")

    def on_step_end(self, state) -> None:
        if self.name == "step_end" and state.i == self.k:
            _pause(f"step_end:{state.i}")


def install(pipe) -> None:
    """Attach the pause ``HVLAB_PAUSE_AT`` asks for to ``pipe`` (forward, step_begin, step_end, decode)."""
    w = _wanted()
    if w is not None and w[0] in ("forward", "step_begin", "step_end", "decode"):
        _PauseHook(pipe, *w).attach()
