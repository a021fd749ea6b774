"""How the frozen models' weights are kept in memory during training (`frozen_dtype`).

When the weights are stored in the dtype the step computes in, the model is simply converted. Otherwise (bf16/fp16
storage with float32 compute, or int8 storage) the weight matrices of every Linear, convolution and fused attention
projection stay in their compact form and a parametrization turns each into the compute dtype when its layer runs,
so only one layer's expanded copy exists at a time (with gradient checkpointing also in the backward pass); LoRA
parametrizations registered afterwards see the expanded weight. Everything else (biases, norms, embeddings,
buffers: a small share of the bytes) is converted to the compute dtype.

int8 is symmetric per output channel: w ≈ q · scale, q in [-127, 127], scale = max|w| of the row / 127.
"""

from __future__ import annotations

import ctypes
import sys

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..models.lora import has_parameter

STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


class StoredWeight(nn.Module):
    """Parametrization: the stored weight (bf16/fp16, or int8 with its per-row `scale`) -> `dtype`."""

    def __init__(self, dtype: torch.dtype, scale: torch.Tensor | None = None):
        super().__init__()
        self.dtype = dtype
        self.register_buffer("scale", scale)

    def forward(self, stored):
        w = stored.to(self.dtype)
        return w if self.scale is None else w * self.scale.to(self.dtype)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8, scale float32 shaped (out, 1, ...)) with w ≈ q · scale, per output row."""
    w32 = w.detach().float()
    scale = w32.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp_min(1e-12) / 127
    return (w32 / scale).round_().clamp_(-127, 127).to(torch.int8), scale


def weight_matrices(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of the weight of every Linear and convolution and of every fused attention
    projection (`in_proj_weight`, as nn.MultiheadAttention and ours hold it): nearly all of a model's bytes."""
    found = []
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            found.append((m, "weight"))
        if has_parameter(m, "in_proj_weight"):
            found.append((m, "in_proj_weight"))
    return found


def load_dtype(storage: str) -> torch.dtype:
    """The dtype to read a frozen model's file in: its storage dtype; bf16 for int8 (quantized once loaded)."""
    return torch.bfloat16 if storage == "int8" else STORAGE_DTYPES[storage]


def needs_expansion(storage: str, compute: torch.dtype) -> bool:
    """Whether weights stored as `storage` must be turned into `compute` when used (autocast does not do it)."""
    return storage == "int8" or (storage in ("bf16", "fp16") and compute == torch.float32)


@torch.no_grad()
def store_frozen(model: nn.Module, storage: str, compute: torch.dtype) -> nn.Module:
    """Keep the frozen `model`'s weights as `storage` (a STORAGE_DTYPES name) for a step computing in `compute`.
    Tensors are converted one at a time, so a bf16 model never needs a float32 copy of itself."""
    if not needs_expansion(storage, compute):
        return model.to(STORAGE_DTYPES[storage])
    matrices = weight_matrices(model)
    kept = {id(getattr(m, name)) for m, name in matrices}
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point() and id(t) not in kept:
            t.data = t.data.to(compute)
    for m, name in matrices:
        w = getattr(m, name)
        q, scale = quantize_int8(w) if storage == "int8" else (w.detach().to(STORAGE_DTYPES[storage]), None)
        setattr(m, name, nn.Parameter(q, requires_grad=False))
        parametrize.register_parametrization(m, name, StoredWeight(compute, scale), unsafe=True)
    return model


MMAP_THRESHOLD = 1 << 20  # bytes


def mmap_large_allocations() -> bool:
    """Make glibc serve every allocation of 1 MiB or more by mmap, so that freeing it returns the memory to the
    system at once. By default glibc raises that threshold to the size of each large block freed (up to 32 MiB):
    after the first layer, the weight-sized temporaries of a CPU training step (expanded weights, LoRA sums, their
    gradients: 16-48 MiB each for the 3.6B Stage C) come from the heap, which fragments and keeps growing (measured:
    ~50 MiB more resident memory per attention block; a 3.6B LoRA step passed 13 GiB before its forward pass ended,
    against a 10.9 GiB peak for the whole step with the threshold pinned). Process-wide; False where the C library
    is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD (malloc.h); also stops its adjustment
