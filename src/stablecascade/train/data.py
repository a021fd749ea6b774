"""Training data: image folders with `.txt` captions and webdataset `.tar` shards, aspect-ratio buckets, and a
deterministic, resumable batch order that is the same on every rank.

Every rank runs the same sampler (same seed) and so agrees on each *global* batch; a rank then loads only its
slice. Random choices that shape a batch (bucket jitter, crop offsets) are drawn for the whole global batch, so
N ranks see exactly the pixels one process would. Images that cannot be read are skipped and counted
(`Sampler.skipped`); they never stop a run.
"""

from __future__ import annotations

import glob
import io
import logging
import math
import os
import re
import tarfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class Entry:
    """One sample: an image file (or a member of a tar shard) and its caption."""

    source: str  # file path, or tar path
    image: str  # "" for a plain file, else the member name inside the tar
    caption: Optional[str]  # caption file path / member name, or None


def _scan_folder(folder: Path) -> list[Entry]:
    out = []
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTS and p.is_file():
            txt = p.with_suffix(".txt")
            out.append(Entry(str(p), "", str(txt) if txt.is_file() else None))
    return out


def _scan_tar(path: Path, caption_key: str) -> list[Entry]:
    """webdataset convention: members sharing a key (the name up to the first dot of the basename) form a sample."""
    groups: dict[str, dict[str, str]] = {}
    order = []
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                d, _, base = m.name.rpartition("/")
                key, dot, ext = base.partition(".")
                if not dot:
                    continue
                full_key = f"{d}/{key}" if d else key
                if full_key not in groups:
                    groups[full_key] = {}
                    order.append(full_key)
                groups[full_key][ext.lower()] = m.name
    except (tarfile.TarError, OSError) as e:
        log.warning("skipping unreadable shard %s: %s", path, e)
        return []
    out = []
    for key in order:
        members = groups[key]
        image = next((members[e] for e in ("jpg", "jpeg", "png", "webp", "bmp") if e in members), None)
        if image is not None:
            out.append(Entry(str(path), image, members.get(caption_key)))
    return out


def expand_braces(pattern: str) -> list[str]:
    """webdataset's shard lists: "shard-{000..099}.tar" (zero-padded numeric ranges) and "{a,b}" alternatives."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[:m.start()], pattern[m.end():], m.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        if int(hi) - int(lo) > 10**6:
            raise ValueError(f"training data pattern {pattern}: the range {{{body}}} is too long")
        options = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(f"training data pattern {pattern}: {{{body}}} is neither a range like {{000..099}} nor "
                         "alternatives like {a,b}")
    return [out for option in options for out in expand_braces(head + option + tail)]


def _paths(src: str) -> list[Path]:
    """The files and folders one `data` entry names: a path, a glob (absolute or relative) or a brace pattern."""
    paths = []
    for pattern in expand_braces(os.path.expanduser(str(src))):
        if any(ch in pattern for ch in "*?["):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise FileNotFoundError(f"training data pattern {pattern} matches no file")
            paths += [Path(p) for p in matches]
        else:
            paths.append(Path(pattern))
    return paths


def index_sources(sources: Sequence[str], caption_key: str = "txt") -> list[Entry]:
    """All samples of the given folders, tar shards, globs and brace patterns, in a stable order."""
    entries: list[Entry] = []
    for src in sources:
        for p in _paths(src):
            if not p.exists():
                raise FileNotFoundError(f"training data not found: {p}")
            if p.is_dir():
                entries += _scan_folder(p)
                for shard in sorted(p.rglob("*.tar")):
                    entries += _scan_tar(shard, caption_key)
            elif p.suffix == ".tar":
                entries += _scan_tar(p, caption_key)
    return entries


class _TarCache:
    """Open tar files, kept per process (reading members by name)."""

    def __init__(self):
        self.open: dict[str, tarfile.TarFile] = {}

    def read(self, path: str, member: str) -> bytes:
        tar = self.open.get(path)
        if tar is None:
            tar = self.open[path] = tarfile.open(path)
        f = tar.extractfile(member)
        if f is None:
            raise OSError(f"{member} is not a file in {path}")
        return f.read()


class ImageSource:
    """Reads entries; any failure raises (the sampler/loader count and skip)."""

    def __init__(self, entries: list[Entry]):
        self.entries = entries
        self._tars = _TarCache()

    def __len__(self):
        return len(self.entries)

    def _bytes(self, e: Entry) -> bytes:
        return Path(e.source).read_bytes() if not e.image else self._tars.read(e.source, e.image)

    def caption(self, i: int) -> str:
        e = self.entries[i]
        if e.caption is None:
            return ""
        raw = Path(e.caption).read_bytes() if not e.image else self._tars.read(e.source, e.caption)
        return raw.decode("utf-8", errors="replace").strip()

    def size(self, i: int) -> tuple[int, int]:
        """(width, height) from the header, after a structural check."""
        from PIL import Image

        data = self._bytes(self.entries[i])
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            return im.size

    def image(self, i: int) -> torch.Tensor:
        """(3,H,W) float in [0,1]."""
        import numpy as np
        from PIL import Image

        with Image.open(io.BytesIO(self._bytes(self.entries[i]))) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        return torch.from_numpy(arr).permute(2, 0, 1).float() / 255


# ------------------------------------------------------------------------------------------------ buckets
def bucket_sizes(image_size: int, ratios: Sequence[str], factor: int = 32) -> list[tuple[int, int]]:
    """(h, w) per bucket for the given w/h ratios (and their reciprocals), area ≈ image_size² (the official
    `DataCore` buckets): h = ⌊sqrt(d/r)/f⌋·f, w = ⌊sqrt(d·r)/f⌋·f. No ratios: one square bucket."""
    if not ratios:
        return [(image_size, image_size)]
    d = image_size**2
    values = []
    for text in ratios:
        r = Fraction(str(text))
        for v in (r, 1 / r):
            if v not in values:
                values.append(v)
    sizes = []
    for r in values:
        size = (max(factor, int(math.sqrt(d / r) / factor) * factor), max(factor, int(math.sqrt(d * r) / factor) * factor))
        if size not in sizes:
            sizes.append(size)
    return sizes


@dataclass
class Batch:
    indices: list  # dataset indices of the global batch
    size: tuple  # (h, w) of the bucket
    crops: torch.Tensor  # (B, 2) crop offsets as fractions in [0, 1)


class Sampler:
    """Deterministic epoch permutations, bucketing, global batches; `state_dict()` captures the exact position."""

    def __init__(self, source: ImageSource, batch_size: int, sizes: list[tuple[int, int]], seed: int = 0,
                 random_ratio: float = 0.05):
        if len(source) == 0:
            raise ValueError("the training data holds no images")
        self.source, self.batch_size, self.sizes = source, batch_size, sizes
        self.seed, self.random_ratio = seed, random_ratio
        self.epoch, self.cursor = 0, 0
        self.pending: dict[int, list[int]] = {i: [] for i in range(len(sizes))}
        self.skipped: dict[str, int] = {"unreadable": 0}
        self.bad: set[int] = set()
        self.gen = torch.Generator().manual_seed(seed + 7919)

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(len(self.source), generator=g).tolist()

    def _bucket(self, i: int) -> Optional[int]:
        try:
            w, h = self.source.size(i)
        except Exception as e:  # noqa: BLE001 - any decoder error means "skip this image"
            self.skipped["unreadable"] += 1
            self.bad.add(i)
            log.warning("skipping unreadable image %s: %s", self.source.entries[i], e)
            return None
        if len(self.sizes) == 1:
            return 0
        if torch.rand((), generator=self.gen).item() < self.random_ratio:
            return int(torch.randint(len(self.sizes), (), generator=self.gen))
        ratio = w / h
        return min(range(len(self.sizes)), key=lambda k: abs(self.sizes[k][1] / self.sizes[k][0] - ratio))

    def __next__(self) -> Batch:
        order = self._order()
        seen_any = False
        while True:
            if self.cursor >= len(order):
                if not seen_any and self.cursor == 0:
                    raise ValueError("no readable images in the training data")
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self._order()
                seen_any = False
            i = order[self.cursor]
            self.cursor += 1
            if i in self.bad:
                continue
            k = self._bucket(i)
            if k is None:
                if len(self.bad) == len(self.source):
                    raise ValueError("no readable images in the training data")
                continue
            seen_any = True
            self.pending[k].append(i)
            if len(self.pending[k]) == self.batch_size:
                indices, self.pending[k] = self.pending[k], []
                crops = torch.rand(self.batch_size, 2, generator=self.gen)
                return Batch(indices, self.sizes[k], crops)

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "pending": {str(k): list(v) for k, v in self.pending.items()},
                "skipped": dict(self.skipped), "bad": sorted(self.bad), "gen": self.gen.get_state()}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.cursor = s["epoch"], s["cursor"]
        self.pending = {int(k): list(v) for k, v in s["pending"].items()}
        self.skipped, self.bad = dict(s["skipped"]), set(s["bad"])
        self.gen.set_state(s["gen"])


def fit_crop(image: torch.Tensor, size: tuple[int, int], crop: torch.Tensor) -> torch.Tensor:
    """Resize (bilinear, antialiased) so the image covers `size` (h, w), then crop at the given fractional offset."""
    h, w = size
    ih, iw = image.shape[-2:]
    scale = max(h / ih, w / iw)
    nh, nw = max(h, round(ih * scale)), max(w, round(iw * scale))
    if (nh, nw) != (ih, iw):
        image = F.interpolate(image[None], (nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = int(crop[0] * (nh - h + 1)), int(crop[1] * (nw - w + 1))
    return image[:, top:top + h, left:left + w].clamp(0, 1)


def load_batch(source: ImageSource, batch: Batch, part: slice, skipped: dict) -> tuple[torch.Tensor, list[str]]:
    """Pixels (b,3,h,w) and captions of `batch.indices[part]`. An image that fails to decode is replaced by
    another image of the same slice (counted in `skipped['corrupt']`); if none decodes, grey images with empty
    captions keep the ranks in step."""
    images, captions, failed = [], [], []
    idx = list(range(len(batch.indices)))[part]
    for j in idx:
        i = batch.indices[j]
        try:
            images.append(fit_crop(source.image(i), batch.size, batch.crops[j]))
            captions.append(source.caption(i))
        except Exception as e:  # noqa: BLE001
            skipped["corrupt"] = skipped.get("corrupt", 0) + 1
            log.warning("skipping corrupt image %s: %s", source.entries[i], e)
            failed.append(len(images) + len(failed))
    if not images:
        h, w = batch.size
        return torch.full((len(idx), 3, h, w), 0.5), [""] * len(idx)
    for pos in failed:
        images.insert(pos, images[pos % len(images)])
        captions.insert(pos, captions[pos % len(captions)])
    return torch.stack(images), captions
