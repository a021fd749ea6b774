"""Training state on disk without pickle: the tensors in a safetensors file, everything else in a JSON file.

A state is a tree of dicts, lists, tuples, numbers, strings, None and tensors (an optimizer's `state_dict()`, a
sampler position, RNG states, the step history). `write_state(folder, "state", tree)` writes `state.json` (the tree
with each tensor replaced by a reference) and `state.safetensors` (the tensors); `read_state` rebuilds the tree.
Neither file can carry code, so a checkpoint folder from anywhere is safe to resume from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

FORMAT = "stablecascade-train-state"
VERSION = 1
MAX_JSON_BYTES = 256 * 2**20  # the history of a long run is a few MB; refuse absurd files before parsing them


def _encode(value: Any, tensors: dict) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, dict):
        items = [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]
        return {"__dict__": items}  # keys keep their type (optimizer states are keyed by int)
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}  # inf / nan: not JSON numbers
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a training state file")


def _decode(node: Any, tensors: dict, where: Path) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors, where) for v in node]
    if isinstance(node, dict):
        if len(node) == 1:
            (tag, payload), = node.items()
            if tag == "__tensor__" and isinstance(payload, str) and payload in tensors:
                return tensors[payload]
            if tag == "__dict__" and isinstance(payload, list) and all(
                    isinstance(kv, list) and len(kv) == 2 for kv in payload):
                return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in payload}
            if tag == "__tuple__" and isinstance(payload, list):
                return tuple(_decode(v, tensors, where) for v in payload)
            if tag == "__float__" and isinstance(payload, str) and payload in ("inf", "-inf", "nan"):
                return float(payload)
        raise CheckpointError(f"{where}: unexpected entry {str(node)[:80]} (the file is damaged)")
    return node


def write_state(folder: Path, name: str, tree: Any) -> None:
    """`folder/name.json` and `folder/name.safetensors` (the latter only when the tree holds tensors)."""
    from safetensors.torch import save_file

    tensors: dict = {}
    doc = {"format": FORMAT, "version": VERSION, "tree": _encode(tree, tensors)}
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(doc))


def read_state(folder: Path, name: str) -> Any:
    """The tree `write_state` wrote; CheckpointError (naming the file) if it is missing, damaged or foreign."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / f"{name}.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path} is {path.stat().st_size} bytes, more than a training state can be")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the file is damaged") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "tree" not in doc:
        raise CheckpointError(f"{path} is not a stablecascade training state file")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{path} has training state format version {doc.get('version')!r}; this version of "
                              f"stablecascade reads version {VERSION}")
    tensors = {}
    weights = folder / f"{name}.safetensors"
    if weights.is_file():
        try:
            tensors = load_file(str(weights), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{weights} cannot be read ({e}): the file is damaged") from None
    return _decode(doc["tree"], tensors, path)
