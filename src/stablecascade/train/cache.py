"""On-disk caches of what the frozen encoders compute: an image's latents (EfficientNet's for Stage C; Stage A's and
EfficientNet's for Stage B) keyed by image content and bucket size, text embeddings keyed by caption.

A cache is a folder of safetensors shards named after a fingerprint of the encoder (its weights, dtype and the
autocast it ran under), so runs and epochs that use the same encoder reuse it, and a different encoder never
reads stale entries. Shards are written whole under a temporary name and renamed, so an interrupted run leaves
no half-written shard; each process writes its own shards.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

log = logging.getLogger(__name__)

SHARD_ENTRIES = 256
OPEN_SHARDS = 64


def fingerprint(model: torch.nn.Module, *extra: str) -> str:
    """A hash of a model's tensors (values and dtypes) and the given strings."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for text in extra:
        h.update(text.encode())
    return h.hexdigest()[:16]


class DiskCache:
    """Named tensors in safetensors shards under `folder`; `get` reads one entry, `put` buffers until `flush`."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.where: dict[str, Path] = {}
        for shard in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                for key in f.keys():
                    self.where[key] = shard
        self.pending: dict[str, torch.Tensor] = {}
        self.readers: OrderedDict = OrderedDict()  # (process, shard) -> open reader, least recently used first

    def __getstate__(self):  # open readers stay with the process that opened them
        return {**self.__dict__, "readers": OrderedDict()}

    def __contains__(self, key: str) -> bool:
        return key in self.where or key in self.pending

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key in self.pending:
            return self.pending[key]
        # opening a shard costs ~1 ms, as much as a small model's step spends on a batch's reads: keep recent
        # shards open, a bounded number of them (file handles)
        opened = (os.getpid(), self.where[key])
        reader = self.readers.pop(opened, None) or safe_open(str(opened[1]), "pt")
        self.readers[opened] = reader
        while len(self.readers) > OPEN_SHARDS:
            self.readers.popitem(last=False)
        return reader.get_tensor(key)

    def put(self, key: str, value: torch.Tensor) -> None:
        self.pending[key] = value.detach().float().cpu().contiguous()
        if len(self.pending) >= SHARD_ENTRIES:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"shard-{uuid.uuid4().hex[:12]}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file(self.pending, str(tmp))
        os.replace(tmp, self.folder / name)
        for key in self.pending:
            self.where[key] = self.folder / name
        self.pending = {}


def latent_key(content_key: str, size: tuple[int, int]) -> str:
    return f"{content_key}_{size[0]}x{size[1]}"


def has_latents(cache: DiskCache, key: str, names: Sequence[str]) -> bool:
    return all(f"{key}.{name}" in cache for name in names)


def read_latents(cache: DiskCache, key: str, names: Sequence[str]) -> Optional[dict[str, torch.Tensor]]:
    """The named latents cached for an image's key, or None when any is missing."""
    if not has_latents(cache, key, names):
        return None
    return {name: cache.get(f"{key}.{name}") for name in names}


def precompute_latents(source, sizes: Sequence[tuple[int, int]],
                       encode: Callable[[torch.Tensor], dict[str, torch.Tensor]], names: Sequence[str],
                       cache: DiskCache, part: tuple[int, int] = (0, 1), batch_size: int = 8) -> list[Optional[str]]:
    """Encode every readable image of `source` (those of this process's `part` = (rank, world)) at the centre
    crop of its nearest bucket into the latents `names` (`encode` returns a batch of each by name), skipping images
    already cached; returns each image's cache key (None where the image cannot be read: the sampler skips those).
    An image that fails to decode gets no entry."""
    from . import data as data_mod

    keys: list[Optional[str]] = []
    planned: set[str] = set()
    todo: dict[tuple[int, int], list[tuple[str, int]]] = {}
    rank, world = part
    for i in range(len(source)):
        try:
            width, height = source.size(i)
            content = source.content_key(i)
        except Exception:  # noqa: BLE001 - unreadable: the sampler counts and skips it
            keys.append(None)
            continue
        size = sizes[data_mod.nearest_bucket(sizes, width, height)]
        key = latent_key(content, size)
        keys.append(key)
        if not has_latents(cache, key, names) and key not in planned and i % world == rank:
            planned.add(key)
            todo.setdefault(size, []).append((key, i))
    centre = torch.tensor([0.5, 0.5])
    done = 0
    for size, items in todo.items():
        for start in range(0, len(items), batch_size):
            chunk, images = [], []
            for key, i in items[start:start + batch_size]:
                try:
                    images.append(data_mod.fit_crop(source.image(i), size, centre))
                    chunk.append(key)
                except Exception as e:  # noqa: BLE001 - a file that passes the header check but fails to decode
                    log.warning("not caching corrupt image %s: %s", source.entries[i], e)
            if images:
                encoded = encode(torch.stack(images))
                for j, key in enumerate(chunk):
                    for name in names:
                        cache.put(f"{key}.{name}", encoded[name][j])
                done += len(chunk)
    cache.flush()
    if done:
        log.info("cached %d latents in %s", done, cache.folder)
    return keys


class TextCache:
    """Text embeddings (hidden states, pooled) by caption, computed by `encode` for captions not yet cached."""

    def __init__(self, cache: DiskCache, encode: Callable[[list], tuple[torch.Tensor, torch.Tensor]]):
        self.cache, self.encode_fn = cache, encode

    @staticmethod
    def _key(caption: str) -> str:
        return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]

    def encode(self, captions: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        keys = [self._key(c) for c in captions]
        missing = sorted({c for c, k in zip(captions, keys) if f"{k}.text" not in self.cache})
        if missing:
            text, pooled = self.encode_fn(missing)
            for caption, t, p in zip(missing, text, pooled):
                self.cache.put(f"{self._key(caption)}.text", t)
                self.cache.put(f"{self._key(caption)}.pooled", p)
        text = torch.stack([self.cache.get(f"{k}.text") for k in keys]).to(device)
        pooled = torch.stack([self.cache.get(f"{k}.pooled") for k in keys]).to(device)
        return text, pooled
