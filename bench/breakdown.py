"""Time in model arithmetic (forward and backward passes) versus everything else, per phase.

A :class:`ModelClock` adds up wall-clock seconds spent inside the forward calls of the models it
watches and inside ``torch.autograd.backward`` (what ``loss.backward()`` calls), and counts the
calls. Forward hooks nest (the trainer's value-head wrapper calls the LM): only the outermost
call is timed. Everything a phase spends outside those calls (sampling, tokenizing, padding,
loss math, the optimizer, gRPC, Python) is its "rest".

The hooks cost about a microsecond per call (two ``perf_counter`` reads and a dict lookup);
:func:`clock_cost_seconds` measures that per call on this machine so the bench can report the
most it can have distorted a phase (calls x cost).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class ModelClock:
    def __init__(self):
        self.forward_seconds = 0.0
        self.backward_seconds = 0.0
        self.forward_calls = 0
        self.backward_calls = 0
        self._depth = 0
        self._started = 0.0
        self._handles = []
        self._original_backward = None

    # ------------------------------------------------------------ installing

    def watch(self, *modules: torch.nn.Module) -> "ModelClock":
        """Time the forward calls of ``modules`` (outermost call only when they nest)."""
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))
        return self

    def _enter(self, module, args):
        if self._depth == 0:
            self._started = time.perf_counter()
        self._depth += 1

    def _leave(self, module, args, output):
        self._depth -= 1
        if self._depth == 0:
            self.forward_seconds += time.perf_counter() - self._started
            self.forward_calls += 1

    @contextmanager
    def backward_timed(self):
        """While open, every ``torch.autograd.backward`` (``Tensor.backward``) is timed."""
        original = torch.autograd.backward

        def timed_backward(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.backward_seconds += time.perf_counter() - start
                self.backward_calls += 1

        torch.autograd.backward = timed_backward
        try:
            yield self
        finally:
            torch.autograd.backward = original

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------ reading

    def read(self) -> dict[str, float]:
        """Seconds and calls since the last read, then starts counting afresh."""
        out = {"forward": self.forward_seconds, "backward": self.backward_seconds,
               "calls": self.forward_calls + self.backward_calls}
        self.forward_seconds = self.backward_seconds = 0.0
        self.forward_calls = self.backward_calls = 0
        return out


def phase_breakdown(phase_seconds: float, model: dict[str, float]) -> dict[str, float]:
    """{seconds, model (forward + backward), rest, model_share} for one phase."""
    arithmetic = model["forward"] + model["backward"]
    return {"seconds": phase_seconds, "forward": model["forward"], "backward": model["backward"],
            "model": arithmetic, "rest": phase_seconds - arithmetic,
            "model_share": arithmetic / phase_seconds if phase_seconds > 0 else 0.0, "calls": model["calls"]}


def clock_cost_seconds(calls: int = 2000) -> float:
    """What the clock adds to one timed call: a hooked vs an unhooked empty module, per call."""
    module = torch.nn.Identity()
    x = torch.zeros(1)

    def run() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            module(x)
        return time.perf_counter() - start

    plain = min(run() for _ in range(3))
    clock = ModelClock().watch(module)
    hooked = min(run() for _ in range(3))
    clock.remove()
    return max(0.0, (hooked - plain) / calls)
