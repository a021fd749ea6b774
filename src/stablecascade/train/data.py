"""Training data: image folders with `.txt` captions and webdataset `.tar` shards, aspect-ratio buckets (given or
derived from the data), caption tag shuffling, and a deterministic, resumable batch order that is the same on every
rank, loaded ahead by DataLoader workers.

A folder named `N_name` (kohya's convention) repeats its images N times per epoch.

Every rank runs the same sampler (same seed) and so agrees on each *global* batch; a rank then loads only its
slice. Random choices that shape a batch (bucket jitter, crop offsets) are drawn for the whole global batch, so
N ranks see exactly the pixels one process would. Images that cannot be read are skipped and counted
(`Sampler.skipped`); they never stop a run.
"""

from __future__ import annotations

import copy
import glob
import io
import logging
import math
import os
import re
import tarfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import cache as cache_mod

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class Entry:
    """One sample: an image file (or a member of a tar shard) and its caption."""

    source: str  # file path, or tar path
    image: str  # "" for a plain file, else the member name inside the tar
    caption: Optional[str]  # caption file path / member name, or None


REPEAT_FOLDER = re.compile(r"^(\d+)_.")


def folder_repeats(image: Path, root: Path) -> int:
    """N for an image under a folder named `N_name` (the nearest such folder, `root` included), else 1."""
    for folder in (image.parent, *image.parent.parents):
        match = REPEAT_FOLDER.match(folder.name)
        if match:
            return int(match.group(1))
        if folder == root:
            break
    return 1


def _scan_folder(folder: Path) -> list[Entry]:
    out = []
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTS and p.is_file():
            txt = p.with_suffix(".txt")
            out += [Entry(str(p), "", str(txt) if txt.is_file() else None)] * folder_repeats(p, folder)
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
        self._sizes: dict[int, tuple[int, int]] = {}

    def reopen(self) -> None:
        """Forget the open tar files (a DataLoader worker must not share the parent's file offsets)."""
        self._tars = _TarCache()

    def content_key(self, i: int) -> str:
        """A hash of the image file's bytes: the same picture has the same key in any folder or shard."""
        import hashlib

        return hashlib.sha256(self._bytes(self.entries[i])).hexdigest()[:32]

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
        """(width, height) from the header, after a structural check (remembered once it passed)."""
        from PIL import Image

        if i not in self._sizes:
            data = self._bytes(self.entries[i])
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
            with Image.open(io.BytesIO(data)) as im:
                self._sizes[i] = im.size
        return self._sizes[i]

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


def nearest_bucket(sizes: Sequence[tuple[int, int]], width: int, height: int) -> int:
    """The bucket (h, w) whose aspect ratio w/h is closest to the image's."""
    ratio = width / height
    return min(range(len(sizes)), key=lambda k: abs(sizes[k][1] / sizes[k][0] - ratio))


def auto_bucket_sizes(source: ImageSource, image_size: int, min_size: int, max_size: int,
                      factor: int = 32) -> list[tuple[int, int]]:
    """Buckets from the data: of every (h, w) with sides multiples of `factor` in [min_size, max_size] and the
    widest w for its h within image_size² pixels, the ones that are the nearest in aspect ratio to some image
    (unreadable images are left to the sampler to count)."""
    area = image_size**2
    candidates = []
    for h in range(math.ceil(min_size / factor) * factor, max_size + 1, factor):
        w = min(max_size, area // h // factor * factor)
        if w >= min_size and (h, w) not in candidates:
            candidates.append((h, w))
    used = set()
    for i in range(len(source)):
        try:
            width, height = source.size(i)
        except Exception:  # noqa: BLE001 - skipped (and counted) by the sampler
            continue
        used.add(candidates[nearest_bucket(candidates, width, height)])
    return sorted(used) or [(image_size, image_size)]


@dataclass
class Batch:
    indices: list  # dataset indices of the global batch
    size: tuple  # (h, w) of the bucket
    crops: torch.Tensor  # (B, 2) crop offsets as fractions in [0, 1)
    number: int = 0  # how many global batches the sampler made before this one (seeds the caption shuffles)


class Sampler:
    """Deterministic epoch permutations, bucketing, global batches; `state_dict()` captures the exact position."""

    def __init__(self, source: ImageSource, batch_size: int, sizes: list[tuple[int, int]], seed: int = 0,
                 random_ratio: float = 0.05):
        if len(source) == 0:
            raise ValueError("the training data holds no images")
        self.source, self.batch_size, self.sizes = source, batch_size, sizes
        self.seed, self.random_ratio = seed, random_ratio
        self.epoch, self.cursor, self.batches = 0, 0, 0
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
        return nearest_bucket(self.sizes, w, h)

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
                self.batches += 1
                return Batch(indices, self.sizes[k], crops, self.batches - 1)

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "batches": self.batches, "pending": {str(k): list(v) for k, v in self.pending.items()},
                "skipped": dict(self.skipped), "bad": sorted(self.bad), "gen": self.gen.get_state()}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.cursor, self.batches = s["epoch"], s["cursor"], s.get("batches", 0)
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


@dataclass(frozen=True)
class CaptionRule:
    """Tag shuffling: captions are `separator`-separated tags; all but the first `keep` are put in a new order
    each time a sample is drawn (the order depends only on the seed, the batch number and the position, so a
    resumed run and every DataLoader worker draw the same)."""

    shuffle: bool = False
    keep: int = 0
    separator: str = ","
    seed: int = 0

    def apply(self, caption: str, batch_number: int, position: int) -> str:
        if not self.shuffle:
            return caption
        tags = [t.strip() for t in caption.split(self.separator)]
        head, tail = tags[: self.keep], tags[self.keep:]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + batch_number) * 4099 + position)
        tail = [tail[k] for k in torch.randperm(len(tail), generator=g).tolist()]
        joiner = self.separator + " " if self.separator.strip() else self.separator
        return joiner.join(head + tail)


def load_batch(source: ImageSource, batch: Batch, part: slice, skipped: dict,
               captions_rule: Optional[CaptionRule] = None) -> tuple[torch.Tensor, list[str]]:
    """Pixels (b,3,h,w) and captions of `batch.indices[part]`. An image that fails to decode is replaced by
    another image of the same slice (counted in `skipped['corrupt']`); if none decodes, grey images with empty
    captions keep the ranks in step."""
    rule = captions_rule or CaptionRule()
    images, captions, failed = [], [], []
    idx = list(range(len(batch.indices)))[part]
    for j in idx:
        i = batch.indices[j]
        try:
            images.append(fit_crop(source.image(i), batch.size, batch.crops[j]))
            captions.append(rule.apply(source.caption(i), batch.number, j))
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


# ------------------------------------------------------------------------------------------------ loading ahead
@dataclass
class Loaded:
    """One rank's part of a global batch, as a DataLoader worker prepared it."""

    batch: Batch
    captions: list
    images: Optional[torch.Tensor] = None  # (b,3,h,w) in [0, 1], or None when `latents` come from the cache
    latents: Optional[dict] = None  # name -> (b,c,h,w): the cached latents of each image
    corrupt: int = 0  # images of this part that failed to decode (replaced by others of the part)
    position: dict = field(default_factory=dict)  # the sampler's state right after this batch


class BatchReader(torch.utils.data.Dataset):
    """Reads a planned batch: pixels and captions, or cached latents (centre crops) and captions."""

    def __init__(self, source: ImageSource, part: slice, captions_rule: CaptionRule, latents=None,
                 latent_keys: Optional[list] = None, latent_names: tuple = ()):
        self.source, self.part, self.rule = source, part, captions_rule
        self.latents, self.latent_keys, self.latent_names = latents, latent_keys, latent_names

    def __getitem__(self, planned) -> Loaded:
        batch, position = planned
        if self.latents is None:
            skipped: dict = {}
            images, captions = load_batch(self.source, batch, self.part, skipped, self.rule)
            return Loaded(batch, captions, images=images, corrupt=skipped.get("corrupt", 0), position=position)
        found, captions, missing = [], [], 0
        for j in list(range(len(batch.indices)))[self.part]:
            i = batch.indices[j]
            key = self.latent_keys[i]
            entry = None if key is None else cache_mod.read_latents(self.latents, key, self.latent_names)
            if entry is None:
                missing += 1  # failed to decode when the cache was built
                continue
            found.append(entry)  # the key names the image's (only) bucket: no jitter with a cache
            captions.append(self.rule.apply(self.source.caption(i), batch.number, j))
        if not found:
            raise ValueError(f"no image of batch {batch.number} has a cached latent")
        for pos in range(missing):  # keep the batch size: repeat images of the same part
            found.append(found[pos % len(found)])
            captions.append(captions[pos % len(captions)])
        latents = {name: torch.stack([entry[name] for entry in found]) for name in self.latent_names}
        return Loaded(batch, captions, latents=latents, corrupt=missing, position=position)


class _Plan:
    """The DataLoader's index stream: each planned batch with the sampler's state after it."""

    def __init__(self, sampler: "Sampler"):
        self.sampler = sampler

    def __iter__(self):
        while True:
            batch = next(self.sampler)
            yield batch, self.sampler.state_dict()


def _first(item):
    return item


def _reopen_source(worker_id: int) -> None:
    torch.utils.data.get_worker_info().dataset.source.reopen()


class Loader:
    """Batches of `sampler`, read ahead by DataLoader workers (`workers` = 0: in this process).

    The workers plan from a copy of the sampler; taking a batch moves `sampler` to the position right after that
    batch, so a checkpoint of `sampler` records what training consumed, never what was read ahead. If `sampler`
    is moved from outside (a resume), the read-ahead restarts from its new position."""

    def __init__(self, sampler: Sampler, reader: BatchReader, workers: int = 2, prefetch: int = 2):
        self.sampler, self.reader, self.workers, self.prefetch = sampler, reader, workers, prefetch
        self._it, self._expected = None, None

    def _where(self) -> tuple:
        return self.sampler.epoch, self.sampler.cursor, self.sampler.batches, sorted(self.sampler.bad)

    def _start(self) -> None:
        self.close()
        plan = Sampler(self.sampler.source, self.sampler.batch_size, self.sampler.sizes, self.sampler.seed,
                       self.sampler.random_ratio)
        plan.load_state_dict(copy.deepcopy(self.sampler.state_dict()))
        extra = dict(prefetch_factor=self.prefetch, worker_init_fn=_reopen_source) if self.workers else {}
        # its own generator: starting workers must not draw from the global RNG that dropout uses (exact resume)
        loader = torch.utils.data.DataLoader(self.reader, sampler=_Plan(plan), batch_size=None, collate_fn=_first,
                                             num_workers=self.workers, generator=torch.Generator(), **extra)
        self._it = iter(loader)

    def __next__(self) -> Loaded:
        if self._it is None or self._expected != self._where():
            self._start()
        item = next(self._it)
        corrupt = self.sampler.skipped.get("corrupt", 0) + item.corrupt
        self.sampler.load_state_dict(item.position)
        if corrupt:
            self.sampler.skipped["corrupt"] = corrupt
        self._expected = self._where()
        return item

    def __iter__(self):
        return self

    def close(self) -> None:
        """Stop the workers (they restart on the next batch)."""
        self._it = None
