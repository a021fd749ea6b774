"""Model offload: keep weights in CPU memory and bring them to the accelerator only while they compute.

- "model": a whole stage (text encoder, Stage C, Stage B, Stage A) moves to the device for its turn and back after.
- "sequential": hooks move one block at a time (for ~8 GB cards); slow, as every step streams all the weights.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from .errors import InputError
from .models.blocks import AttnBlock, ResBlock, TimestepBlock
from .models.stage_a import ResBlock as StageAResBlock

MODES = (None, "model", "sequential")
# moved as one piece: their forward reads their children's weights directly (fused kernels, precomputed keys)
WHOLE_UNITS = (ResBlock, TimestepBlock, AttnBlock, StageAResBlock)


def check_mode(offload) -> None:
    if offload not in MODES:
        raise InputError(f"offload must be None, 'model' or 'sequential', got {offload!r}")


def move(module: nn.Module, device) -> None:
    """Every move goes through here (tests count them). Weights keep their CPU copy while they visit an accelerator:
    the way out is an asynchronous copy from pinned memory, the way home drops the device copy instead of copying
    unchanged weights back (the offloaded models are frozen; a dtype change made on the visit is undone before)."""
    device = torch.device(device)
    for t in _tensors(module):
        home = getattr(t, "_offload_home", None)
        if device.type == "cpu":
            t.data = home if home is not None else _pinned(t.data.to("cpu"))
            t._offload_home = None
        elif t.device != device:
            t._offload_home = t.data if t.device.type == "cpu" else None
            t.data = t.data.to(device, non_blocking=True)


def _tensors(module: nn.Module):
    yield from module.parameters()
    yield from module.buffers()


def _pinned(t: torch.Tensor) -> torch.Tensor:
    """Page-locked when a CUDA device can read it asynchronously; as it is otherwise."""
    return t.pin_memory() if torch.cuda.is_available() and not t.is_pinned() else t


@contextlib.contextmanager
def running(module: nn.Module, device, home="cpu"):
    """Model offload: `module` on `device` for the duration of the block, back `home` afterwards."""
    move(module, device)
    try:
        yield module
    finally:
        move(module, home)


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _units(module: nn.Module):
    """The modules that move one at a time: our blocks whole, else the smallest modules holding tensors."""
    if isinstance(module, WHOLE_UNITS) or not any(True for _ in module.children()):
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            yield module
        return
    for child in module.children():
        yield from _units(child)


def sequential(module: nn.Module, device, home="cpu") -> nn.Module:
    """Sequential offload: each unit's weights stay `home` and visit `device` for each call (inputs are moved
    there too). Tensors held directly by container modules (rare and small) live on `device` for good."""
    unit_ids = {id(u) for u in _units(module)}
    for m in module.modules():
        if id(m) in unit_ids:
            continue
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None:
                t.data = t.data.to(device)
    for unit in (u for u in module.modules() if id(u) in unit_ids):
        move(unit, home)

        def pre(m, args, kwargs):
            move(m, device)
            return _to(args, device), _to(kwargs, device)

        unit.register_forward_pre_hook(pre, with_kwargs=True)
        unit.register_forward_hook(lambda m, args, out: move(m, home))
        if isinstance(unit, AttnBlock):  # the condition keys/values are computed outside forward
            unit.condition_kv = _visiting(unit, unit.condition_kv, device, home)
    return module


def _visiting(unit, method, device, home):
    @functools.wraps(method)
    def call(*args, **kwargs):
        with running(unit, device, home):
            return method(*_to(args, device), **_to(kwargs, device))

    return call
