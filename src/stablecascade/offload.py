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
    unchanged weights back (the offloaded models are frozen; a dtype change made on the visit is undone before).
    Each tensor object stays the one its module holds and only its contents are swapped (`torch.utils.swap_tensors`),
    which works between any two devices (a CPU parameter's `.data` cannot take a `meta` tensor, for one)."""
    device = torch.device(device)
    for m in module.modules():
        homes = m.__dict__.setdefault("_offload_homes", {})  # name -> the tensor holding the CPU contents
        for name, t in _own_tensors(m):
            if device.type == "cpu":
                home = homes.pop(name, None)
                if home is None and t.device.type == "cpu" and not _can_pin(t):
                    continue
                _swap(t, home if home is not None else _pinned(t.to("cpu")))
            elif t.device != device:
                previous = _swap(t, t.to(device, non_blocking=True))
                if previous.device.type == "cpu":
                    homes[name] = previous


def _own_tensors(m: nn.Module):
    """(name, tensor) of the parameters and buffers `m` holds itself (not its children's)."""
    for table in (m._parameters, m._buffers):
        yield from ((name, t) for name, t in table.items() if t is not None)


def _swap(t: torch.Tensor, contents: torch.Tensor) -> torch.Tensor:
    """Give `t` the contents of `contents` (keeping `t`'s kind: parameter or buffer); returns the object now holding
    `t`'s former contents."""
    if isinstance(t, nn.Parameter) and not isinstance(contents, nn.Parameter):
        contents = nn.Parameter(contents, requires_grad=t.requires_grad)
    torch.utils.swap_tensors(t, contents)
    return contents


def _can_pin(t: torch.Tensor) -> bool:
    """Whether page-locking `t` would let a CUDA device read it asynchronously (and it is not locked yet)."""
    return torch.cuda.is_available() and not t.is_pinned()


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if _can_pin(t) else t


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
    there too). Tensors held directly by container modules (rare and small) live on `device` for good. Calling it
    again on the same module sets up only the units added since (e.g. the embedding a token LoRA swaps in)."""
    units = list(_units(module))
    unit_ids, in_units = {id(u) for u in units}, {id(m) for u in units for m in u.modules()}
    for m in module.modules():
        if id(m) in in_units:
            continue
        for _, t in _own_tensors(m):
            if t.device != torch.device(device):
                _swap(t, t.to(device))
    for unit in (u for u in module.modules() if id(u) in unit_ids and not hasattr(u, "_offload_device")):
        unit._offload_device = torch.device(device)  # units set up before (a second call) keep their hooks
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
