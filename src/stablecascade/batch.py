"""Batch generation: a prompt file in, a folder of PNGs or webdataset shards out, on one device or many.

    stablecascade batch PROMPTS --out DIR [--batch-size N] [--format png|webdataset] [generate's options]
    torchrun --nproc-per-node 8 -m stablecascade.cli batch PROMPTS --out DIR ...

PROMPTS is a text file (one prompt per line), JSONL (objects with a "prompt" and any row option) or CSV (a header
with a "prompt" column and option columns). Row options: negative, seed, width, height, steps, guidance,
decoder_steps, decoder_guidance, sampler, compression (generate's options, which are the defaults of every row) and
lora_scale (the scale of every loaded --lora for that row).

Image j of row i gets the row's own seed + j, else --seed + i x --num-images + j, so what a row makes depends on
the row alone. Rows with the same settings are generated together, up to --batch-size per pipeline call; the groups
are formed from the whole file, and under torchrun rank r runs groups r, r + world, ... . The same command with
another number of processes, or run again after an interruption, makes the same groups and so the same pixels.
(Batch sizes differ only by the rounding of batched matrix products: at most one level of 255 in a few pixels.)

Every output appears atomically (written aside, then renamed), a rerun skips the rows whose images exist, a row that
fails (a bad option, NaN values) goes to errors.jsonl while the batch goes on, and Ctrl-C (or SIGTERM) stops after
the current group. manifest.jsonl lists every image (file, row, prompt, seed and all settings), sorted by row.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import os
import signal
import sys
import tarfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .errors import InputError

ROW_OPTIONS = ("negative", "seed", "width", "height", "steps", "guidance", "decoder_steps", "decoder_guidance",
               "sampling", "compression")  # the argparse dests of generate's options a row may set
LORA_SCALE = "lora_scale"
MANIFEST, ERRORS = "manifest.jsonl", "errors.jsonl"
PARTS = ".parts"  # per-rank error logs and progress counters until rank 0 merges them at the end
TMP = ".tmp"  # suffix of a file being written; renamed when complete


# ------------------------------------------------------------------------------------------------ arguments
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The batch options; call after generate's sampling options are on `parser` (their types type the rows)."""
    parser.add_argument("prompts", type=Path, metavar="PROMPTS",
                        help="prompt file: .txt (one prompt per line), .jsonl or .csv (a 'prompt' plus row options)")
    g = parser.add_argument_group("batch")
    g.add_argument("--batch-size", type=int, default=1,
                   help="rows with the same settings generated in one pipeline call (default 1)")
    g.add_argument("--format", choices=["png", "webdataset"], default="png",
                   help="'png': one PNG per image (metadata in the file) + manifest.jsonl; 'webdataset': .tar shards "
                        "of (png, json, txt) samples, the txt being the prompt, for training (default png)")
    g.add_argument("--shard-size", type=int, default=1000, help="images per webdataset shard (default 1000)")
    row_options = {a.option_strings[0].lstrip("-").replace("-", "_"): (a.dest, a.type or str)
                   for a in parser._actions if a.dest in ROW_OPTIONS}  # named as on the command line
    parser.set_defaults(row_options={**row_options, LORA_SCALE: (LORA_SCALE, float)}, seed=0)
    for action in parser._actions:
        if action.dest == "seed":  # a fixed base seed: a rerun must make the same images
            action.help = "base seed: image j of row i gets SEED + i x --num-images + j unless the row sets its " \
                          "own seed (default 0)"


# ------------------------------------------------------------------------------------------------ rows
@dataclass
class Row:
    index: int
    prompt: str = ""
    options: dict = field(default_factory=dict)  # argparse dest (or lora_scale) -> value
    error: Optional[str] = None  # why the row cannot run (a parse problem)
    negative: str = ""  # set by `plan`, with the command's defaults applied
    seed: int = 0


def read_rows(path: Path, types: dict) -> list:
    """The rows of a prompt file, numbered from 0; unreadable rows carry their error. `types`: row option name ->
    (argparse dest, type)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"prompt file not found: {path}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        records = [_json_record(line) for line in text.splitlines() if line.strip()]
    elif suffix == ".csv":
        records = _csv_records(text, path, types)
    else:
        records = [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]
    if not records:
        raise InputError(f"{path} holds no prompts")
    return [_row(i, record, types) for i, record in enumerate(records)]


def _json_record(line: str):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e})"
    return record if isinstance(record, dict) else f"a row must be a JSON object, got {line.strip()[:40]!r}"


def _csv_records(text: str, path: Path, types: dict) -> list:
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    if "prompt" not in header:
        raise InputError(f"{path}: the CSV header needs a 'prompt' column (it has {header})")
    unknown = [h for h in header if h != "prompt" and h not in types]
    if unknown:
        raise InputError(f"{path}: unknown column(s) {unknown}; {_allowed(types)}")
    return [record if None not in record else "the row has more cells than the header" for record in reader]


def _allowed(types: dict) -> str:
    return "rows may set prompt, " + ", ".join(sorted(types))


def _row(index: int, record, types: dict) -> Row:
    if isinstance(record, str):
        return Row(index, error=record)
    try:
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the row has no 'prompt' text")
        for key in record:
            if key != "prompt" and key not in types:
                near = difflib.get_close_matches(key, list(types), 1)
                raise InputError(f"unknown option {key!r}" + (f" (did you mean {near[0]!r}?)" if near else "") +
                                 f"; {_allowed(types)}")
        options = {types[k][0]: _value(k, v, types[k][1]) for k, v in record.items()
                   if k != "prompt" and v not in (None, "")}
    except InputError as e:
        return Row(index, error=str(e))
    return Row(index, prompt, options)


def _value(name: str, value, kind):
    """A row value of the option's type: CSV cells are text, JSON values must already be of the right kind."""
    if isinstance(value, str) and kind is not str:
        try:
            return kind(value)
        except ValueError:
            raise InputError(f"{name}={value!r} is not a {'whole number' if kind is int else 'number'}") from None
    if kind is str and not isinstance(value, str):
        raise InputError(f"{name} must be text, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------ groups
@dataclass
class Group:
    rows: list  # Rows with their `negative` and `seed` set
    settings: dict = field(default_factory=dict)  # pipeline keyword arguments the rows share
    lora_scale: Optional[float] = None


def plan(rows: list, args: argparse.Namespace, options: Callable, batch_size: int) -> list:
    """Groups of up to `batch_size` rows with the same settings, ordered by their first row; a row that cannot run
    is a group of its own. Depends only on the rows and the options, never on the process count or past runs."""
    groups, open_groups = [], {}
    n = args.num_images
    for row in rows:
        if row.error:
            groups.append(Group([row]))
            continue
        settings = options(argparse.Namespace(**{**vars(args), **row.options}))
        row.negative = settings.pop("negative_prompt")
        row.seed = row.options.get("seed", args.seed + row.index * n)
        del settings["seed"]
        lora_scale = row.options.get(LORA_SCALE)
        key = (tuple(sorted(settings.items())), lora_scale)
        group = open_groups.get(key)
        if group is None:
            group = open_groups[key] = Group([], settings, lora_scale)
            groups.append(group)
        group.rows.append(row)
        if len(group.rows) == batch_size:
            del open_groups[key]
    return groups


def image_keys(row: Row, n: int) -> list:
    """Output names (without extension) of a row's images; webdataset sample keys too (no dots)."""
    return [f"{row.index:08d}_{j:02d}" for j in range(n)]


def _generate(pipe, group: Group, n: int, base_scales: dict) -> list:
    """One pipeline call for the group: per row, (its n PIL images, None) or (None, error)."""
    import torch

    scales = base_scales if group.lora_scale is None else {name: group.lora_scale for name in base_scales}
    if group.lora_scale is not None and not base_scales:
        raise InputError(f"{LORA_SCALE} needs a LoRA: pass --lora FILE")
    for name, scale in scales.items():
        if pipe.loras[name] != scale:
            pipe.set_lora_scale(name, scale)
    finite = {}

    def watch(event):  # the last step's estimate of each stage (a float16 retry overwrites its first try)
        if event.step == event.total:
            finite[event.stage] = torch.isfinite(event.x0).flatten(1).all(1)

    rows = group.rows
    with warnings.catch_warnings():  # a NaN image's conversion warns; its row goes to errors.jsonl instead
        warnings.filterwarnings("ignore", "invalid value encountered in cast", RuntimeWarning)
        images = pipe([r.prompt for r in rows], negative_prompt=[r.negative for r in rows],
                      seed=[r.seed + j for r in rows for j in range(n)], progress=False, step_callback=watch,
                      **group.settings)
    ok = torch.stack([f.cpu() for f in finite.values()]).all(0).tolist()
    out = []
    for k in range(len(rows)):
        if all(ok[k * n:(k + 1) * n]):
            out.append((images[k * n:(k + 1) * n], None))
        else:
            out.append((None, "sampling produced NaN or infinite values; lower the guidance, or use --dtype bf16 "
                              "or fp32"))
    return out


# ------------------------------------------------------------------------------------------------ outputs
def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + TMP)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _png(image, parameters: dict) -> bytes:
    from .images import save_png

    buffer = io.BytesIO()
    save_png(image, buffer, parameters)
    return buffer.getvalue()


def _read_jsonl(path: Path) -> list:
    """Records of a JSONL file; a line cut short by a kill is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class PngStore:
    """One PNG per image, named <row>_<image>.png, its parameters in the file."""

    def __init__(self, out: Path, rank: int, shard_size: int):
        self.out = out

    def records(self, known: list) -> list:
        """Manifest records of every PNG present: `known` ones reused, the others read from their files."""
        from .images import read_parameters

        present = {p.name for p in self.out.glob("*.png")}
        by_file = {r["file"]: r for r in known if r.get("file") in present}
        return [by_file.get(name) or {"file": name, **read_parameters(self.out / name)} for name in sorted(present)]

    def add(self, key: str, png: bytes, parameters: dict) -> None:
        _write_atomic(self.out / f"{key}.png", png)

    def close(self) -> None:
        pass


class ShardStore:
    """webdataset .tar shards of <key>.png, <key>.json (the parameters) and <key>.txt (the prompt: the caption our
    trainer and most webdataset loaders read); a shard appears under its name only once complete."""

    def __init__(self, out: Path, rank: int, shard_size: int):
        self.out, self.rank, self.shard_size = out, rank, shard_size
        self.tar, self.path, self.count = None, None, 0

    def records(self, known: list) -> list:
        present = sorted(p.name for p in self.out.glob("*.tar"))
        by_shard = {}
        for r in known:
            by_shard.setdefault(r.get("file"), []).append(r)
        records = []
        for name in present:
            records += by_shard.get(name) or self._read(name)
        return records

    def _read(self, name: str) -> list:
        with tarfile.open(self.out / name) as tar:
            return [{"file": name, "key": m.name[:-5], **json.load(tar.extractfile(m))}
                    for m in tar if m.name.endswith(".json")]

    def add(self, key: str, png: bytes, parameters: dict) -> None:
        if self.tar is None:
            taken = [int(p.name.split("-")[2].split(".")[0]) for p in self.out.glob(f"shard-{self.rank:05d}-*.tar")]
            self.path = self.out / f"shard-{self.rank:05d}-{1 + max(taken, default=-1):06d}.tar"
            self.tar, self.count = tarfile.open(self.path.with_name(self.path.name + TMP), "w"), 0
        now = time.time()
        for ext, data in (("png", png), ("json", json.dumps(parameters, sort_keys=True).encode()),
                          ("txt", parameters["prompt"].encode())):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime = len(data), now
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1
        if self.count >= self.shard_size:
            self.close()

    def close(self) -> None:
        """Finish the open shard (also a partial one at the end or on Ctrl-C) and give it its name."""
        if self.tar is None:
            return
        tmp = self.tar.name
        self.tar.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.tar = None


STORES = {"png": PngStore, "webdataset": ShardStore}


# ------------------------------------------------------------------------------------------------ running
class _StopRequest:
    """The first Ctrl-C or SIGTERM asks to stop after the current group; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nstopping after the current group (Ctrl-C again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Progress:
    """A bar of this rank's rows with images/s and ETA; rank 0 adds the total of all ranks (counters in PARTS)."""

    def __init__(self, parts: Path, rank: int, local_rank: int, world: int, rows: int, all_rows: int):
        from tqdm.auto import tqdm

        self.parts, self.rank, self.world, self.all_rows = parts, rank, world, all_rows
        self.images, self.started = 0, time.perf_counter()
        self.bar = tqdm(total=rows, unit="row", desc=f"rank {rank}" if world > 1 else "batch", position=local_rank,
                        dynamic_ncols=True)

    def update(self, rows: int, images: int) -> None:
        self.images += images
        self.bar.update(rows)
        postfix = {"img/s": f"{self.rate:.2f}"}
        if self.world > 1:
            _write_atomic(self.parts / f"progress-{self.rank}", str(self.bar.n).encode())
            if self.rank == 0:
                done = sum(int(p.read_text() or 0) for p in self.parts.glob("progress-*") if not p.name.endswith(TMP))
                postfix["all ranks"] = f"{done}/{self.all_rows}"
        self.bar.set_postfix(postfix)

    @property
    def rate(self) -> float:
        return self.images / max(time.perf_counter() - self.started, 1e-9)

    def close(self):
        self.bar.close()


def run(args: argparse.Namespace, load: Callable, options: Callable, parameters: Callable) -> int:
    """The `batch` command. `load(args)` -> pipeline, `options(args)` -> pipeline keyword arguments, and
    `parameters(image, args, pipe, **extra)` -> an image's metadata: the CLI's own helpers."""
    from .train.trainer import Dist

    if getattr(args, "previews", None):
        raise InputError("--previews is not available in batch (it would save every step of every row)")
    for name in ("batch_size", "shard_size", "num_images"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    rows = read_rows(args.prompts, args.row_options)
    groups = plan(rows, args, options, args.batch_size)
    out, n = Path(args.out), args.num_images
    dist = Dist()
    try:
        parts = out / PARTS
        if dist.main:
            parts.mkdir(parents=True, exist_ok=True)
            for stale in list(out.glob(f"*{TMP}")) + list(parts.glob("progress-*")):
                stale.unlink()  # left by a killed run; nothing is writing yet (the barrier below)
        store = STORES[args.format](out, dist.rank, args.shard_size)
        done = {r.get("key") or r["file"][:-4] for r in store.records(_read_jsonl(out / MANIFEST))}

        def finished(row: Row) -> bool:
            return all(k in done for k in image_keys(row, n))

        todo = [g for i, g in enumerate(groups) if i % dist.world == dist.rank and not all(map(finished, g.rows))]
        if dist.world > 1 and args.device in (None, "cuda"):
            import torch

            args.device = f"cuda:{dist.local_rank}" if torch.cuda.is_available() else args.device
        dist.barrier()
        pipe = load(args) if any(not r.error for g in todo for r in g.rows) else None
        base_scales = pipe.loras if pipe is not None else {}
        progress = _Progress(parts, dist.rank, dist.local_rank, dist.world,
                             sum(not finished(r) for g in todo for r in g.rows), sum(not finished(r) for r in rows))
        failed = 0
        with _StopRequest() as stop, open(parts / f"errors-{dist.rank}.jsonl", "a", encoding="utf-8") as errors:
            for group in todo:
                if stop.requested:
                    break
                made = 0
                pending = [not finished(r) for r in group.rows]  # a group runs whole: its pixels stay the same
                for row, todo_row, (images, error) in zip(group.rows, pending, _run_group(pipe, group, n, base_scales)):
                    if not todo_row:
                        continue
                    if error is not None:
                        failed += 1
                        errors.write(json.dumps({"row": row.index, "prompt": row.prompt, "error": error}) + "\n")
                        errors.flush()
                        continue
                    for j, (key, image) in enumerate(zip(image_keys(row, n), images)):
                        meta = parameters(image, args, pipe, row=row.index, index_in_row=j)
                        del meta["index_in_batch"]  # it depends on the grouping; the output must not
                        store.add(key, _png(image, meta), meta)
                    made += len(images)
                progress.update(sum(pending), made)
            store.close()
        progress.close()
        print(f"rank {dist.rank}: {progress.images} image(s) in {time.perf_counter() - progress.started:.1f}s "
              f"({progress.rate:.2f} images/s), {failed} row(s) failed", file=sys.stderr)
        dist.barrier()
        if dist.main:
            remaining = _finish(out, store, n)
            if remaining:
                print(f"{remaining} row(s) failed: see {out / ERRORS}", file=sys.stderr)
        if stop.requested:
            print("stopped; run the same command again to continue", file=sys.stderr)
            return 130
        return 1 if failed else 0
    finally:
        dist.close()


def _run_group(pipe, group: Group, n: int, base_scales: dict) -> list:
    """Per row: (images, None) or (None, error). Any failure of the call fails its rows, not the batch."""
    if group.rows[0].error:
        return [(None, group.rows[0].error)]
    try:
        return _generate(pipe, group, n, base_scales)
    except Exception as e:  # noqa: BLE001 - a bad size, an out-of-memory... is recorded and the batch goes on
        message = str(e) if isinstance(e, InputError) else f"{type(e).__name__}: {e}"
        return [(None, message)] * len(group.rows)


def _finish(out: Path, store, n: int) -> int:
    """Rank 0, after every rank is done: manifest.jsonl from the outputs present, errors.jsonl of the rows still
    missing (the latest error of each), per-rank files removed. Returns the number of failed rows."""
    records = store.records(_read_jsonl(out / MANIFEST))
    records.sort(key=lambda r: (r["row"], r["index_in_row"]))
    _write_atomic(out / MANIFEST, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
    made = {(r["row"], r["index_in_row"]) for r in records}
    parts = out / PARTS
    latest = {e["row"]: e for e in _read_jsonl(out / ERRORS)}
    for log in sorted(parts.glob("errors-*.jsonl")):
        latest.update({e["row"]: e for e in _read_jsonl(log)})
    still = [latest[i] for i in sorted(latest) if not all((i, j) in made for j in range(n))]
    if still:
        _write_atomic(out / ERRORS, "".join(json.dumps(e) + "\n" for e in still).encode())
    elif (out / ERRORS).exists():
        (out / ERRORS).unlink()
    for f in parts.iterdir():
        f.unlink()
    parts.rmdir()
    return len(still)
