"""Hugging Face Hub access: download when online, use the local cache when offline, clear errors otherwise."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

from .errors import CheckpointError

PRIOR_REPO = "stabilityai/stable-cascade-prior"
DECODER_REPO = "stabilityai/stable-cascade"
NANO = "nano"  # the built-in model (loading.NANO_DIR): not a Hub repo, never downloaded
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and not Path(source).exists()


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def snapshot(repo_id: str, subfolders: Sequence[str], variant: Optional[str] = None) -> Path:
    """The given subfolders of a diffusers-layout repo, with the `variant` weights (e.g. "bf16") when the repo
    has them, else the default ones. Falls back to the local cache when the Hub cannot be reached."""
    from huggingface_hub import snapshot_download

    base = ["model_index.json"] + [f"{s}/*.json" for s in subfolders] + [f"{s}/*.txt" for s in subfolders]
    wanted = [f"{s}/*.{variant}.safetensors*" for s in subfolders] if variant else []
    everything = [f"{s}/*.safetensors*" for s in subfolders]
    last_error = None
    for local_only in (False, True):
        try:
            root = Path(snapshot_download(repo_id, allow_patterns=base + (wanted or everything),
                                          local_files_only=local_only))
            missing = [s for s in subfolders if (root / s).is_dir() and not _has_weights(root / s)
                       and s not in ("tokenizer", "feature_extractor", "scheduler")]
            if missing:
                root = Path(snapshot_download(repo_id, allow_patterns=base + everything, local_files_only=local_only))
            return root
        except Exception as e:  # network errors, missing cache entries, gated repos: all end the same way
            last_error = e
    raise CheckpointError(
        f"could not get {repo_id} ({', '.join(subfolders)}) from the Hugging Face Hub, and it is not in the local "
        f"cache ({type(last_error).__name__}: {last_error}). Connect to the network (and run `huggingface-cli login` "
        "if the repo is gated), or pass local folders or files instead."
    )


def file(repo_id: str, filename: str) -> Path:
    """One file of a Hub repo (downloaded or from the cache)."""
    from huggingface_hub import hf_hub_download

    last_error = None
    for local_only in (False, True):
        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=local_only))
        except Exception as e:
            last_error = e
    raise CheckpointError(f"could not get {filename} from {repo_id} on the Hugging Face Hub, and it is not in the "
                          f"local cache ({type(last_error).__name__}). Connect to the network or pass a local file.")
