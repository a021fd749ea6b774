"""`stablecascade download`: the official `models/download_models.sh` choices, fetched with huggingface_hub.

    stablecascade download                              essential files + big-big (Stage B + Stage C), bf16
    stablecascade download essential                    stage_a, previewer, effnet_encoder only
    stablecascade download --variant small-small        Stage B lite + Stage C lite only (B size - C size)
    stablecascade download essential --variant big-small --dtype fp32 --dir models

Files go to --dir (default ./models, the folder the official configs read). huggingface_hub resumes interrupted
transfers, reuses files already in --dir or in its cache, and checks sizes; on top of that each file's SHA-256 is
compared with the Hub's (the ETag of LFS files), once per file. Offline (HF_HUB_OFFLINE=1 or no connection), files
already present are kept and missing ones are reported with a clear message (exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .controlnets import KINDS, RELEASED
from .errors import StableCascadeError

REPO = "stabilityai/stable-cascade"
ESSENTIAL = ("stage_a.safetensors", "previewer.safetensors", "effnet_encoder.safetensors")
VARIANTS = {  # download_models.sh: "<Stage B size>-<Stage C size>"
    "big-big": ("stage_b", "stage_c"),
    "big-small": ("stage_b", "stage_c_lite"),
    "small-big": ("stage_b_lite", "stage_c"),
    "small-small": ("stage_b_lite", "stage_c_lite"),
}
DTYPES = ("bf16", "fp32")
DEFAULT_DIR = "models"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_VERIFIED = ".cache/stablecascade/verified.json"  # inside --dir: files whose checksum was already checked


class DownloadError(StableCascadeError):
    """A file could not be fetched (offline, not found, no access, corrupt)."""


def files_for(essential: bool = False, variant: Optional[str] = None, dtype: str = "bf16",
              controlnets: Iterable[str] = ()) -> list[str]:
    """Repository file names for a download_models.sh choice (`essential`, a `variant`, the precision), plus
    optional ControlNets. With neither `essential` nor `variant`: everything to run (essential + big-big)."""
    if variant is not None and variant not in VARIANTS:
        raise DownloadError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
    if dtype not in DTYPES:
        raise DownloadError(f"unknown dtype {dtype!r}; use bf16 or fp32")
    controlnets = list(controlnets)
    if not essential and variant is None and not controlnets:
        essential, variant = True, "big-big"
    files = list(ESSENTIAL) if essential else []
    if variant is not None:
        suffix = "_bf16" if dtype == "bf16" else ""
        files += [f"{stage}{suffix}.safetensors" for stage in VARIANTS[variant]]
    for name in controlnets:
        if name not in RELEASED:
            raise DownloadError(f"unknown ControlNet {name!r}; use one of {', '.join(RELEASED)} (the released ones)")
        files.append(KINDS[name].released_file)
    return files


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _sha256(path: Path, progress: bool) -> str:
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"checking {path.name}", disable=not progress, leave=False) as bar:
        for chunk in iter(lambda: f.read(8 * 1024 * 1024), b""):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


class _Verified:
    """Remembers (size, mtime, sha256) of files whose checksum matched, so later runs skip re-hashing."""

    def __init__(self, directory: Path):
        self.path = directory / _VERIFIED
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}

    @staticmethod
    def _stamp(path: Path) -> list:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]

    def ok(self, name: str, path: Path, sha: str) -> bool:
        entry = self.data.get(name)
        return bool(entry) and entry["sha256"] == sha and entry["stamp"] == self._stamp(path)

    def add(self, name: str, path: Path, sha: str):
        self.data[name] = {"sha256": sha, "stamp": self._stamp(path)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True))


def _offline_message(missing: Sequence[str], repo: str, directory: Path, reason: str) -> str:
    return (f"cannot download {', '.join(missing)} from {repo}: {reason}. They are neither in {directory} nor in "
            "the Hugging Face cache. Connect to the network (and unset HF_HUB_OFFLINE) and run the command again; "
            "files already downloaded are kept and interrupted ones resume.")


def _from_cache(repo: str, name: str, revision: str, cache_dir, target: Path) -> bool:
    """Copy a file from the huggingface_hub cache into the target folder (offline use)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo, name, cache_dir=cache_dir, revision=revision)
    if not isinstance(cached, str):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, target)
    return True


def download(files: Sequence[str], directory=DEFAULT_DIR, *, repo: str = REPO, revision: str = "main",
             endpoint: Optional[str] = None, token=None, cache_dir=None, verify: bool = True,
             progress: bool = True, log=print) -> list[Path]:
    """Fetch `files` of the Hub repo into `directory` and return their paths.

    Resumes, reuses complete files (in `directory` or the huggingface_hub cache) and checks each file's SHA-256
    against the Hub's (once; remembered in `directory`/.cache). `endpoint` defaults to $HF_ENDPOINT. Raises
    `DownloadError` when offline with files missing, on a missing file or repo, missing access, or a bad checksum."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    verified = _Verified(directory)
    offline_reason = "offline mode is on (HF_HUB_OFFLINE)" if _offline() else None
    paths, missing = [], []
    for n, name in enumerate(files, 1):
        target = directory / name
        log(f"[{n}/{len(files)}] {name}")
        etag = None
        if offline_reason is None:
            try:
                meta = get_hf_file_metadata(hf_hub_url(repo, name, revision=revision, endpoint=endpoint), token=token)
                etag = meta.etag
            except GatedRepoError as e:
                raise DownloadError(f"{repo} is gated: accept its licence at https://huggingface.co/{repo} and log in "
                                    f"(`hf auth login`) or set HF_TOKEN ({type(e).__name__})") from None
            except RepositoryNotFoundError:
                raise DownloadError(f"{repo} was not found or needs a login: check the name, accept its licence at "
                                    f"https://huggingface.co/{repo} and log in (`hf auth login`) or set HF_TOKEN") \
                    from None
            except RevisionNotFoundError:
                raise DownloadError(f"{repo} has no revision {revision!r}") from None
            except EntryNotFoundError:
                raise DownloadError(f"{repo} has no file {name} (revision {revision})") from None
            except HfHubHTTPError as e:
                raise DownloadError(f"the Hub refused {name}: {e}") from None
            except Exception as e:  # connection refused, DNS, timeouts, proxies; or not a Hub at all
                if not _is_connection_error(e):
                    raise DownloadError(f"unusable answer from the Hub for {name} ({type(e).__name__}: {e})") from None
                offline_reason = f"the Hub cannot be reached ({type(e).__name__})"
                log(f"  {offline_reason}; using local files only")
        if offline_reason is not None:
            if target.is_file() or _from_cache(repo, name, revision, cache_dir, target):
                log(f"  {target} (local copy; not checked against the Hub while offline)")
                paths.append(target)
            else:
                missing.append(name)
            continue
        try:
            with _progress_bars(progress):
                path = Path(hf_hub_download(repo, name, revision=revision, local_dir=directory, endpoint=endpoint,
                                            token=token, cache_dir=cache_dir))
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
            raise DownloadError(_offline_message([name], repo, directory, f"the transfer failed ({e})")) from None
        except HfHubHTTPError as e:
            raise DownloadError(f"downloading {name} failed: {e}") from None
        except OSError as e:  # size check failed after retries, disk full...
            raise DownloadError(f"downloading {name} failed: {e}") from None
        if verify and etag and _SHA256.match(etag) and not verified.ok(name, path, etag):
            actual = _sha256(path, progress)
            if actual != etag:
                path.unlink(missing_ok=True)
                raise DownloadError(f"{name} is corrupt (SHA-256 {actual[:12]}…, the Hub says {etag[:12]}…); "
                                    "it was deleted: run the command again to fetch it anew")
            verified.add(name, path, etag)
            log(f"  {path} (SHA-256 checked)")
        else:
            log(f"  {path}")
        paths.append(path)
    if missing:
        raise DownloadError(_offline_message(missing, repo, directory, offline_reason))
    return paths


def _is_connection_error(e: BaseException) -> bool:
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return True
    names = {cls.__name__ for cls in type(e).__mro__}
    return bool(names & {"ConnectError", "TimeoutException", "ConnectionError", "NetworkError", "ProxyError",
                         "RemoteProtocolError", "ConnectTimeout", "ReadTimeout"})


@contextlib.contextmanager
def _progress_bars(shown: bool):
    """huggingface_hub's progress bars on or off for one transfer (its global switch, put back afterwards)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hidden_before = are_progress_bars_disabled()
    if not shown:
        disable_progress_bars()
    try:
        yield
    finally:
        if not shown and not hidden_before:
            enable_progress_bars()


def usage_hint(directory: Path, files: Sequence[str]) -> Optional[str]:
    """The generate command that uses downloaded official files, when a full set was fetched."""
    stage_c = next((f for f in files if f.startswith("stage_c")), None)
    stage_b = next((f for f in files if f.startswith("stage_b")), None)
    have = {f for f in files} | {p.name for p in directory.glob("*.safetensors")}
    if not (stage_c and stage_b and "stage_a.safetensors" in have):
        return None
    d = str(directory)
    hint = (f'stablecascade generate "a photo of a cat" --prior {d}/{stage_c} --decoder {d}/{stage_b} '
            f"--stage-a {d}/stage_a.safetensors")
    for flag, name in (("--effnet", "effnet_encoder.safetensors"), ("--previewer", "previewer.safetensors")):
        if name in have:
            hint += f" {flag} {d}/{name}"
    return hint


# ------------------------------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `stablecascade download`."""
    p.add_argument("essential", nargs="?", choices=["essential"],
                   help="fetch Stage A, the Previewer and the EfficientNet encoder (with no variant: only those)")
    p.add_argument("--variant", choices=list(VARIANTS),
                   help="Stage B size - Stage C size, as in the official download_models.sh (big: 1.5B/3.6B, "
                        "small: 700M/1B). Without 'essential' and --variant: essential + big-big")
    p.add_argument("--dtype", choices=DTYPES, default="bf16",
                   help="precision of the Stage B/C files: bf16 (*_bf16.safetensors, half the size) or fp32 "
                        "(default bf16)")
    p.add_argument("--controlnet", nargs="+", choices=RELEASED, default=[], metavar="NAME",
                   help=f"also fetch released ControlNets: {', '.join(RELEASED)}")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"folder to put the files in (default ./{DEFAULT_DIR})")
    p.add_argument("--repo", default=REPO, help=f"Hugging Face repo to fetch from (default {REPO})")
    p.add_argument("--revision", default="main", help="branch, tag or commit of the repo (default main)")
    p.add_argument("--endpoint", default=None, help="Hub address (default: $HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the SHA-256 check of downloaded files (sizes are still checked)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    """Run a parsed `stablecascade download` command. Raises DownloadError (exit status 2 in the CLI)."""
    files = files_for(essential=bool(args.essential), variant=args.variant, dtype=args.dtype,
                      controlnets=args.controlnet)
    directory = Path(args.dir).expanduser()
    paths = download(files, directory, repo=args.repo, revision=args.revision, endpoint=args.endpoint,
                     verify=args.verify, progress=not args.quiet,
                     log=lambda msg: print(msg, file=sys.stderr))
    total = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} file(s), {total / 1e9:.2f} GB in {directory}", file=sys.stderr)
    for p in paths:
        print(p)
    hint = usage_hint(directory, files)
    if hint:
        print(f"generate with them:\n  {hint}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry point (`python -m stablecascade.download`); `stablecascade download` uses `run`."""
    parser = argparse.ArgumentParser(prog="stablecascade download", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except StableCascadeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
