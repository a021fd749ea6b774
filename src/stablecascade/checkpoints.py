"""Checkpoint formats: official single files and diffusers-layout folders, both ways.

- Official files are flat safetensors state dicts whose keys are our module names.
- diffusers splits the fused attention projection into `to_q/to_k/to_v`, renames `out_proj` to `to_out.0`, Stage B's
  `clip_mapper` to `clip_txt_pooled_mapper` and Stage A's codebook to `vquantizer.embedding`
  (diffusers' `scripts/convert_stable_cascade.py`), and keeps the model config in a `config.json` beside the weights.
- Models are built on the meta device and the file's tensors are assigned straight in the target dtype and
  device, so loading never holds two copies of the weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .configs import (STAGE_B, STAGE_C, EffnetConfig, PreviewerConfig, StageAConfig, StageBConfig, StageCConfig,
                      UNetConfig)
from .errors import CheckpointError
from .models import ControlNet, EfficientNetEncoder, Previewer, StageA, StageB, StageC
from .models.controlnet import RELEASED_BLOCKS, ControlNetConfig

log = logging.getLogger(__name__)
PathLike = Union[str, Path]
KIND_NAMES = {"stage_c": "Stage C (prior)", "stage_b": "Stage B (decoder)", "stage_a": "Stage A (VQGAN)",
              "effnet": "EfficientNet encoder", "previewer": "Previewer", "controlnet": "ControlNet",
              "lora": "LoRA", "text_encoder": "CLIP text encoder"}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
_SIMPLE_CONFIGS = {"stage_a": StageAConfig, "effnet": EffnetConfig, "previewer": PreviewerConfig}
CONFIG_METADATA_KEY = "stablecascade_config"


# ----------------------------------------------------------------------------------------------- reading files
_FILE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


def read_state_dict(path: PathLike, dtype: Optional[torch.dtype] = None, device="cpu") -> tuple[dict, dict]:
    """(state dict, metadata) of a safetensors file; floating tensors are cast to `dtype` one at a time.

    safetensors checks the file; the tensors are then read with plain reads into fresh tensors, not through a
    memory map, whose touched pages would count in the process's memory beside the tensors (peak RSS 2x the
    weights instead of ~1x, bench/bench_load.py)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle checkpoints ({path.suffix}) can run arbitrary code when loaded and are refused. "
            "Use the .safetensors release of this model, or convert the file once in a trusted environment "
            "(torch.load + safetensors.torch.save_file)."
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}. Check the path, or run `stablecascade download`.")
    state = {}
    try:
        with safe_open(str(path), framework="pt") as checked, open(path, "rb") as f:
            metadata = checked.metadata() or {}
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size))
            for key in checked.keys():
                info = header[key]
                if info["dtype"] in _FILE_DTYPES:
                    t = torch.empty(info["shape"], dtype=_FILE_DTYPES[info["dtype"]])
                    start, end = info["data_offsets"]
                    f.seek(8 + header_size + start)
                    if f.readinto(t.reshape(-1).view(torch.uint8).numpy()) != end - start:
                        raise ValueError(f"tensor {key} is cut short")
                else:  # rare dtypes (fp8...): safetensors' own reader
                    t = checked.get_tensor(key)
                t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
                state[key] = t.to(device)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}). It may be truncated or corrupt: download it again."
        ) from None
    return state, metadata


def detect_kind(state: dict) -> str:
    """Which component a state dict (official or diffusers naming) holds."""
    keys = state.keys()
    if "clip_txt_mapper.weight" in keys:
        return "stage_c"
    if "effnet_mapper.0.weight" in keys or "clip_mapper.weight" in keys or "clip_txt_pooled_mapper.weight" in keys:
        return "stage_b"
    if "vquantizer.codebook.weight" in keys or "vquantizer.embedding.weight" in keys:
        return "stage_a"
    if any(k.startswith("projections.") for k in keys):
        return "controlnet"
    if "mapper.0.weight" in keys and any(k.startswith("backbone.") for k in keys):
        return "effnet"
    if keys and all(k.startswith("blocks.") for k in keys):
        return "previewer"
    if any(".lora_down" in k or "lora_up" in k for k in keys):
        return "lora"
    if any(k.startswith("text_model.") for k in keys):
        return "text_encoder"
    raise CheckpointError("the file holds no Stable Cascade component that this package recognises")


# ------------------------------------------------------------------------------------------ key mapping
_ATTN = re.compile(r"^(.*\.attention)\.(?:attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"
                   r"|(to_q|to_k|to_v|to_out\.0)\.(weight|bias))$")


_RENAMES = {  # kind -> (official key prefix, diffusers key prefix), besides the attention layout
    "stage_b": ("clip_mapper.", "clip_txt_pooled_mapper."),
    "stage_a": ("vquantizer.codebook.", "vquantizer.embedding."),
}


def _rename(key: str, kind: str, to_diffusers: bool) -> str:
    if kind not in _RENAMES:
        return key
    old, new = _RENAMES[kind] if to_diffusers else _RENAMES[kind][::-1]
    return new + key[len(old):] if key.startswith(old) else key


def official_to_diffusers(state: dict, kind: str) -> dict:
    out = {}
    for key, t in state.items():
        m = _ATTN.match(key)
        if m and m.group(2):
            prefix, name = m.group(1), m.group(2)
            if name.startswith("in_proj"):
                suffix = "weight" if name.endswith("weight") else "bias"
                for part, chunk in zip(("to_q", "to_k", "to_v"), t.chunk(3, dim=0)):
                    out[f"{prefix}.{part}.{suffix}"] = chunk
            else:
                out[f"{prefix}.to_out.0.{name.split('.')[-1]}"] = t
        else:
            out[_rename(key, kind, to_diffusers=True)] = t
    return out


def diffusers_to_official(state: dict, kind: str) -> dict:
    out, qkv = {}, {}
    for key, t in state.items():
        m = _ATTN.match(key)
        if m and m.group(3):
            prefix, part, suffix = m.group(1), m.group(3), m.group(4)
            if part == "to_out.0":
                out[f"{prefix}.attn.out_proj.{suffix}"] = t
            else:
                qkv.setdefault((prefix, suffix), {})[part] = t
        else:
            out[_rename(key, kind, to_diffusers=False)] = t
    for (prefix, suffix), parts in qkv.items():
        if set(parts) != {"to_q", "to_k", "to_v"}:
            raise CheckpointError(f"attention weights of {prefix} are incomplete: found only {sorted(parts)}")
        out[f"{prefix}.attn.in_proj_{suffix}"] = torch.cat([parts["to_q"], parts["to_k"], parts["to_v"]])
    return out


# ---------------------------------------------------------------------------------------------- configs
_BLOCK_TYPES = {"SDCascadeResBlock": "C", "SDCascadeTimestepBlock": "T", "SDCascadeAttnBlock": "A"}


def config_from_diffusers(cfg: dict, kind: str):
    """Our config from a diffusers `config.json` (StableCascadeUNet or PaellaVQModel)."""
    if kind == "stage_a":
        return StageAConfig(levels=cfg.get("levels", 2), bottleneck_blocks=cfg.get("bottleneck_blocks", 12),
                            c_hidden=cfg.get("embed_dim", 384), c_latent=cfg.get("latent_channels", 4),
                            codebook_size=cfg.get("num_vq_embeddings", 8192),
                            scale_factor=cfg.get("scale_factor", 0.3764))
    common = dict(
        c_in=cfg["in_channels"], c_out=cfg["out_channels"], c_r=cfg.get("timestep_ratio_embedding_dim", 64),
        patch_size=cfg["patch_size"], c_cond=cfg["conditioning_dim"], c_hidden=tuple(cfg["block_out_channels"]),
        nhead=tuple(cfg["num_attention_heads"]),
        blocks=(tuple(cfg["down_num_layers_per_block"]), tuple(cfg["up_num_layers_per_block"])),
        block_repeat=(tuple(cfg["down_blocks_repeat_mappers"]), tuple(cfg["up_blocks_repeat_mappers"])),
        level_config=tuple("".join(_BLOCK_TYPES[b] for b in level) for level in cfg["block_types_per_layer"]),
        t_conds=tuple(cfg.get("timestep_conditioning_type", ())), dropout=tuple(cfg["dropout"]),
        kernel_size=cfg.get("kernel_size", 3), self_attn=cfg.get("self_attn", True),
    )
    if kind == "stage_c":
        return StageCConfig(**common, c_clip_text=cfg["clip_text_in_channels"],
                            c_clip_text_pooled=cfg["clip_text_pooled_in_channels"],
                            c_clip_img=cfg["clip_image_in_channels"], c_clip_seq=cfg.get("clip_seq", 4))
    return StageBConfig(**common, c_clip=cfg["clip_text_pooled_in_channels"], c_clip_seq=cfg.get("clip_seq", 4),
                        c_effnet=cfg.get("effnet_in_channels"), c_pixels=cfg.get("pixel_mapper_in_channels"))


def config_to_diffusers(config) -> dict:
    if isinstance(config, StageAConfig):
        return {"_class_name": "PaellaVQModel", "in_channels": 3, "out_channels": 3, "up_down_scale_factor": 2,
                "levels": config.levels, "bottleneck_blocks": config.bottleneck_blocks, "embed_dim": config.c_hidden,
                "latent_channels": config.c_latent, "num_vq_embeddings": config.codebook_size,
                "scale_factor": config.scale_factor}
    names = {v: k for k, v in _BLOCK_TYPES.items()}
    out = {
        "_class_name": "StableCascadeUNet", "in_channels": config.c_in, "out_channels": config.c_out,
        "timestep_ratio_embedding_dim": config.c_r, "patch_size": config.patch_size, "conditioning_dim": config.c_cond,
        "block_out_channels": list(config.c_hidden), "num_attention_heads": list(config.nhead),
        "down_num_layers_per_block": list(config.blocks[0]), "up_num_layers_per_block": list(config.blocks[1]),
        "down_blocks_repeat_mappers": list(config.block_repeat[0]),
        "up_blocks_repeat_mappers": list(config.block_repeat[1]),
        "block_types_per_layer": [[names[k] for k in level] for level in config.level_config],
        "kernel_size": config.kernel_size, "dropout": list(config.dropout), "self_attn": config.self_attn,
        "timestep_conditioning_type": list(config.t_conds), "clip_seq": config.c_clip_seq,
    }
    if isinstance(config, StageCConfig):
        out.update(clip_text_in_channels=config.c_clip_text, clip_text_pooled_in_channels=config.c_clip_text_pooled,
                   clip_image_in_channels=config.c_clip_img, switch_level=[False] * (len(config.c_hidden) - 1),
                   effnet_in_channels=None, pixel_mapper_in_channels=None)
    else:
        out.update(clip_text_in_channels=None, clip_text_pooled_in_channels=config.c_clip, clip_image_in_channels=None,
                   switch_level=None, effnet_in_channels=config.c_effnet, pixel_mapper_in_channels=config.c_pixels)
    return out


def _infer_unet_config(shapes: dict, kind: str) -> UNetConfig:
    """Reconstruct a Stage B/C config from official key shapes. Head counts are not stored in weights: the
    released models all use 64-channel heads, which is assumed unless the file carries our config metadata."""

    def block_types(prefix):
        types = {}
        for key in shapes:
            if key.startswith(prefix):
                i = int(key[len(prefix):].split(".")[0])
                rest = key[len(prefix):].split(".", 1)[1]
                types[i] = "C" if rest.startswith("depthwise") else "A" if rest.startswith(("attention", "kv_mapper")) \
                    else "T" if rest.startswith("mapper") else types.get(i, "?")
        return [types[i] for i in sorted(types)]

    n_levels = len({k.split(".")[1] for k in shapes if k.startswith("down_blocks.")})
    c_hidden, level_config, down, up, rep_down, rep_up = [], [], [], [], [], []
    for i in range(n_levels):
        seq = block_types(f"down_blocks.{i}.")
        unit = "C" + "".join(seq[1:]).split("C")[0]
        level_config.append(unit)
        c_hidden.append(shapes[f"down_blocks.{i}.0.depthwise.weight"][0])
        down.append(len(seq) // len(unit))
        up.append(len(block_types(f"up_blocks.{n_levels - 1 - i}.")) // len(unit))
        rep_down.append(1 + len({k.split(".")[2] for k in shapes if k.startswith(f"down_repeat_mappers.{i}.")}))
        rep_up.append(1 + len({k.split(".")[2] for k in shapes if k.startswith(f"up_repeat_mappers.{n_levels - 1 - i}.")}))
    t_key = next(k for k in shapes if re.match(r"down_blocks\.0\.\d+\.mapper\.weight$", k))
    t_prefix = t_key[: -len("mapper.weight")]
    found = {k[len(t_prefix) + len("mapper_"):].split(".")[0] for k in shapes if k.startswith(t_prefix + "mapper_")}
    t_conds = tuple(c for c in ("sca", "crp") if c in found) + tuple(sorted(found - {"sca", "crp"}))
    kv = next((k for k in shapes if k.endswith("kv_mapper.1.weight")), None)
    patch = 1 if kind == "stage_c" else 2
    common = dict(
        c_in=shapes["embedding.1.weight"][1] // patch**2, c_out=shapes["clf.1.weight"][0] // patch**2,
        c_r=shapes[t_key][1], patch_size=patch, c_hidden=tuple(c_hidden),
        nhead=tuple(_guess_heads(c) if "A" in lc else -1 for c, lc in zip(c_hidden, level_config)),
        blocks=(tuple(down), tuple(up[::-1])), block_repeat=(tuple(rep_down), tuple(rep_up[::-1])),
        level_config=tuple(level_config), t_conds=t_conds, dropout=(0.0,) * n_levels,
        kernel_size=shapes["down_blocks.0.0.depthwise.weight"][-1],
    )
    if kind == "stage_c":
        c_cond = shapes["clip_txt_mapper.weight"][0]
        return StageCConfig(**common, c_cond=c_cond, c_clip_text=shapes["clip_txt_mapper.weight"][1],
                            c_clip_text_pooled=shapes["clip_txt_pooled_mapper.weight"][1],
                            c_clip_img=shapes["clip_img_mapper.weight"][1],
                            c_clip_seq=shapes["clip_txt_pooled_mapper.weight"][0] // c_cond)
    c_cond = shapes[kv][1] if kv else shapes["clip_mapper.weight"][0] // 4
    return StageBConfig(**common, c_cond=c_cond, c_clip=shapes["clip_mapper.weight"][1],
                        c_clip_seq=shapes["clip_mapper.weight"][0] // c_cond,
                        c_effnet=shapes["effnet_mapper.0.weight"][1] if "effnet_mapper.0.weight" in shapes else None,
                        c_pixels=shapes["pixels_mapper.0.weight"][1] if "pixels_mapper.0.weight" in shapes else None)


def _guess_heads(c: int) -> int:
    if c % 64:
        log.warning("%d-channel attention: head count unknown without a config, assuming 1 head. Save custom models "
                    "with save_official or in diffusers layout to keep their config.", c)
        return 1
    return c // 64


def _same_structure(a: UNetConfig, b: UNetConfig) -> bool:
    ignore = {"nhead", "dropout"}  # not visible in the weights
    da, db = a.to_dict(), b.to_dict()
    return all(da[k] == db[k] for k in da if k not in ignore)


def infer_config(state: dict, kind: str, metadata: Optional[dict] = None):
    """The config of an official-format state dict: from our metadata if present, else a released variant with
    the same structure, else reconstructed from the shapes."""
    if kind == "controlnet":
        return infer_controlnet_config(state, metadata)
    cls = {"stage_c": StageCConfig, "stage_b": StageBConfig}.get(kind)
    if metadata and CONFIG_METADATA_KEY in metadata:
        d = _metadata_config(metadata, cls or _SIMPLE_CONFIGS[kind])
        return cls.from_dict(d) if cls else _simple_config(kind, d)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if kind in ("stage_c", "stage_b"):
        inferred = _infer_unet_config(shapes, kind)
        named = STAGE_C if kind == "stage_c" else STAGE_B
        return next((cfg for cfg in named.values() if _same_structure(cfg, inferred)), inferred)
    if kind == "stage_a":
        c_hidden = shapes["up_blocks.0.0.weight"][0]
        n_up = len({k.split(".")[1] for k in shapes if k.startswith("up_blocks.")})
        levels = 1 + sum(1 for k in shapes if re.match(r"down_blocks\.\d+\.weight$", k) and len(shapes[k]) == 4
                         and shapes[k][-1] == 4)
        return StageAConfig(levels=levels, bottleneck_blocks=n_up - 1 - (levels - 1) * 2, c_hidden=c_hidden,
                            c_latent=shapes["vquantizer.codebook.weight"][1],
                            codebook_size=shapes["vquantizer.codebook.weight"][0])
    return _simple_config(kind, None)


def infer_controlnet_config(state: dict, metadata: Optional[dict] = None,
                            proj_blocks: Optional[tuple[int, ...]] = None) -> ControlNetConfig:
    """The config of an official-format ControlNet state dict (keys/shapes), or of one we saved (metadata).

    The controlled block indices are not stored in the weights: 8 projections mean the released
    (0, 4, 8, 12, 51, 55, 59, 63), 64 mean all blocks; any other count needs `proj_blocks`."""
    if metadata and CONFIG_METADATA_KEY in metadata and proj_blocks is None:
        return ControlNetConfig.from_dict(_metadata_config(metadata, ControlNetConfig))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if "backbone.0.0.weight" in shapes:
        mode, c_in = "effnet", shapes["backbone.0.0.weight"][1]
    elif "backbone.3.blocks.0.weight" in shapes and "backbone.0.weight" in shapes:
        mode, c_in = "large", shapes["backbone.0.weight"][1]
    elif "backbone.0.weight" in shapes:
        mode, c_in = "simple", shapes["backbone.0.weight"][1]
    else:
        raise CheckpointError("not a Stable Cascade ControlNet: no 'backbone.0.0.weight' / 'backbone.0.weight' key")
    n_proj = len({k.split(".")[1] for k in shapes if k.startswith("projections.")})
    if n_proj == 0 or "projections.0.2.weight" not in shapes:
        raise CheckpointError("not a Stable Cascade ControlNet: it has no 'projections.N.2.weight' keys")
    if proj_blocks is None:
        if n_proj == len(RELEASED_BLOCKS):
            proj_blocks = RELEASED_BLOCKS
        elif n_proj == 64:
            proj_blocks = tuple(range(64))
        else:
            raise CheckpointError(f"this ControlNet has {n_proj} projections; the ResBlock indices they control are "
                                  "not stored in the weights: pass proj_blocks explicitly")
    if len(proj_blocks) != n_proj:
        raise CheckpointError(f"proj_blocks has {len(proj_blocks)} entries but the file has {n_proj} projections")
    return ControlNetConfig(c_in=c_in, c_proj=shapes["projections.0.2.weight"][0], proj_blocks=tuple(proj_blocks),
                            bottleneck_mode=mode)


def _simple_config(kind: str, d: Optional[dict]):
    return _SIMPLE_CONFIGS[kind](**(d or {}))


def _metadata_config(metadata: dict, cls) -> dict:
    """The `stablecascade_config` metadata as a dict of `cls`'s fields: JSON, an object, no unknown keys."""
    try:
        d = json.loads(metadata[CONFIG_METADATA_KEY])
    except ValueError as e:
        raise ValueError(f"its {CONFIG_METADATA_KEY} metadata is not JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"its {CONFIG_METADATA_KEY} metadata is a JSON {type(d).__name__}, not an object")
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"its {CONFIG_METADATA_KEY} metadata has unknown keys {_show(unknown)} for a "
                         f"{cls.__name__}")
    return d


# ------------------------------------------------------------------------------------- config validation
MAX_CHANNELS = 1 << 16
MAX_LEVELS = 16
MAX_BLOCKS_PER_LEVEL = 256  # the released Stage C has 24
MAX_REPEATS = 16  # the released Stage B repeats its up levels 3 times
UNET_SIZES = {"c_in": (1, 1024), "c_out": (1, 1024), "c_r": (2, 4096), "patch_size": (1, 16),
              "c_cond": (1, MAX_CHANNELS), "kernel_size": (1, 31), "c_clip_text": (1, MAX_CHANNELS),
              "c_clip_text_pooled": (1, MAX_CHANNELS), "c_clip_img": (1, MAX_CHANNELS), "c_clip_seq": (1, 1024),
              "c_clip": (1, MAX_CHANNELS), "c_effnet": (1, 1024), "c_pixels": (1, 1024)}
SIMPLE_SIZES = {"levels": (1, 8), "bottleneck_blocks": (0, 256), "c_hidden": (1, MAX_CHANNELS),
                "c_latent": (1, 1024), "codebook_size": (1, 1 << 20), "c_in": (1, 4096), "c_out": (1, 4096),
                "c_proj": (1, MAX_CHANNELS)}


def _show(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def validate_config(config) -> None:
    """Raise ValueError naming every field of a model config that has the wrong type or an absurd value, so that
    a crafted config (a hundred million blocks...) is refused before anything is built from it."""
    problems = []

    def whole(name, value, low, high):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            problems.append(f"{name}={_show(value)} (expected a whole number from {low} to {high})")

    def per_level(name, values, low, high, n):
        if not isinstance(values, tuple) or len(values) != n:
            problems.append(f"{name}={_show(values)} (expected {n} values, one per level)")
            return
        for i, v in enumerate(values):
            whole(f"{name}[{i}]", v, low, high)

    if isinstance(config, UNetConfig):
        n = len(config.c_hidden) if isinstance(config.c_hidden, tuple) else 0
        if not 1 <= n <= MAX_LEVELS:
            raise ValueError(f"c_hidden={_show(config.c_hidden)} (expected 1 to {MAX_LEVELS} channel counts)")
        per_level("c_hidden", config.c_hidden, 1, MAX_CHANNELS, n)
        for i, (kinds, heads) in enumerate(zip(config.level_config, config.nhead)):
            if not isinstance(kinds, str) or not 1 <= len(kinds) <= 8 or set(kinds) - set(_BLOCK_TYPES.values()):
                problems.append(f"level_config[{i}]={_show(kinds)} (expected 1 to 8 of the letters C, T, A)")
            elif "A" in kinds:
                whole(f"nhead[{i}]", heads, 1, MAX_CHANNELS)
        for side, name in enumerate(("down", "up")):
            per_level(f"blocks[{side}] ({name})", config.blocks[side], 0, MAX_BLOCKS_PER_LEVEL, n)
            per_level(f"block_repeat[{side}] ({name})", config.block_repeat[side], 1, MAX_REPEATS, n)
        if not all(isinstance(d, (int, float)) and 0 <= d < 1 for d in config.dropout):
            problems.append(f"dropout={_show(config.dropout)} (expected numbers in [0, 1))")
        if not (isinstance(config.t_conds, tuple) and len(config.t_conds) <= 8
                and all(isinstance(t, str) and t.isidentifier() for t in config.t_conds)):
            problems.append(f"t_conds={_show(config.t_conds)} (expected up to 8 names such as 'sca')")
        if not isinstance(config.self_attn, bool):
            problems.append(f"self_attn={_show(config.self_attn)} (expected true or false)")
        for name, (low, high) in UNET_SIZES.items():
            if hasattr(config, name) and not (name in ("c_effnet", "c_pixels") and getattr(config, name) is None):
                whole(name, getattr(config, name), low, high)
    elif isinstance(config, ControlNetConfig):
        whole("c_in", config.c_in, 1, 4096)
        whole("c_proj", config.c_proj, 1, MAX_CHANNELS)
        if len(config.proj_blocks) > 4096 or max(config.proj_blocks) >= 4096:
            problems.append(f"proj_blocks={_show(config.proj_blocks)} (expected at most 4096 indices below 4096)")
    else:
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            if f.name in SIMPLE_SIZES:
                whole(f.name, value, *SIMPLE_SIZES[f.name])
            elif f.type in (float, "float") and not (isinstance(value, (int, float)) and 0 < value < 1e6):
                problems.append(f"{f.name}={_show(value)} (expected a positive number)")
    if problems:
        raise ValueError("; ".join(problems))


def _block_counts(state: dict, prefix: str) -> dict:
    """{level: number of distinct sub-module indices} of the keys `prefix.<level>.<index>.*`."""
    found: dict = {}
    for key in state:
        if key.startswith(prefix):
            parts = key[len(prefix):].split(".")
            if len(parts) > 2 and parts[0].isdigit() and parts[1].isdigit():
                found.setdefault(int(parts[0]), set()).add(int(parts[1]))
    return {level: len(indices) for level, indices in found.items()}


def check_structure(config, state: dict) -> None:
    """Raise ValueError unless the blocks a U-Net config implies are the blocks the file's tensors hold, level by
    level: a config cannot make the loader build more than the file has weights for."""
    if not isinstance(config, UNetConfig):
        return
    n = len(config.c_hidden)
    expected = {}
    for i in range(n):
        up = n - 1 - i  # up levels run deepest first
        expected[f"down_blocks.{i}"] = config.blocks[0][i] * len(config.level_config[i])
        expected[f"up_blocks.{up}"] = config.blocks[1][up] * len(config.level_config[i])
        expected[f"down_repeat_mappers.{i}"] = config.block_repeat[0][i] - 1
        expected[f"up_repeat_mappers.{up}"] = config.block_repeat[1][up] - 1
    found = {f"{prefix}.{level}": count for prefix in ("down_blocks", "up_blocks", "down_repeat_mappers",
                                                        "up_repeat_mappers")
             for level, count in _block_counts(state, prefix + ".").items()}
    wrong = [f"{name}: the config implies {count} blocks, the file holds {found.get(name, 0)}"
             for name, count in expected.items() if found.get(name, 0) != count]
    extra = sorted(set(found) - set(expected))
    if wrong or extra:
        raise ValueError("; ".join(wrong[:3] + [f"the file has levels the config lacks: {extra[:3]}"] * bool(extra)))


# ---------------------------------------------------------------------------------------- building models
MODEL_CLASSES = {"stage_c": StageC, "stage_b": StageB, "stage_a": StageA, "effnet": EfficientNetEncoder,
                 "previewer": Previewer, "controlnet": ControlNet}


def build_model(kind: str, config, state: dict, *, source: str, device=None) -> nn.Module:
    """Instantiate on the meta device and assign `state` (official names) into it, with clear errors. The config
    is validated (types, ranges, the blocks it implies against the file's tensors) before anything is built."""
    try:
        validate_config(config)
        check_structure(config, state)
    except ValueError as e:
        raise CheckpointError(f"{source}: the {KIND_NAMES[kind]} config is not valid: {e}") from None
    with torch.device("meta"):
        model = MODEL_CLASSES[kind](config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        lines = [f"{source} does not fit the {KIND_NAMES[kind]} model it describes:"]
        if missing:
            lines.append(f"  {len(missing)} missing keys, e.g. {missing[0]!r} (expected shape "
                         f"{tuple(expected[missing[0]].shape)})")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys, e.g. {unexpected[0]!r}")
        for k, got, want in wrong[:3]:
            lines.append(f"  {k!r} has shape {got}, expected {want}")
        lines.append("  The file may be from another model, or truncated; pass the matching config or re-download it.")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=True, assign=True)
    if device is not None:
        model.to(device)
    return model.eval().requires_grad_(False)


def _config_or_error(make, source, kind: str):
    """`make()`'s config, or one CheckpointError saying why the file's config or tensors give none."""
    try:
        return make()
    except KeyError as e:
        problem = f"{_show(e.args[0])} is missing or unknown"
    except (StopIteration, IndexError, ValueError, TypeError, AttributeError) as e:
        problem = f"{type(e).__name__}: {_show(str(e), 300)}"
    raise CheckpointError(f"{source}: cannot work out the {KIND_NAMES[kind]} layout ({problem}); the file is "
                          f"incomplete, not a Stable Cascade checkpoint, or its config is wrong.")


def load_official(path: PathLike, kind: Optional[str] = None, *, dtype=None, device=None, config=None) -> nn.Module:
    """Load an official single-file checkpoint; `kind` (e.g. "stage_c") is checked against the file's content."""
    state, metadata = read_state_dict(path, dtype)
    found = detect_kind(state)
    if kind is not None and found != kind:
        raise CheckpointError(f"{path} holds a {KIND_NAMES[found]} checkpoint, but a {KIND_NAMES[kind]} "
                              "checkpoint was expected here. Check which file goes to which stage.")
    if any(k.endswith(("to_q.weight", "to_out.0.weight")) for k in state) or "vquantizer.embedding.weight" in state:
        state = diffusers_to_official(state, found)
    if config is None:
        config = _config_or_error(lambda: infer_config(state, found, metadata), path, found)
    return build_model(found, config, state, source=str(path), device=device)


def load_controlnet(path: PathLike, *, dtype=None, device=None,
                    proj_blocks: Optional[tuple[int, ...]] = None) -> ControlNet:
    """A ControlNet from an official (or `save_official`-written) file; `proj_blocks` names the controlled
    ResBlock calls when the file has neither 8 (the released nets) nor 64 projections."""
    state, metadata = read_state_dict(path, dtype)
    found = detect_kind(state) if state else None
    if found != "controlnet":
        what = KIND_NAMES.get(found, "nothing recognisable")
        raise CheckpointError(f"{path} holds {what}, not a ControlNet (expected keys 'backbone.*' and "
                              "'projections.N.0.weight'). Check which file you passed.")
    config = _config_or_error(lambda: infer_controlnet_config(state, metadata, proj_blocks), path, "controlnet")
    return build_model("controlnet", config, state, source=str(path), device=device)


MAX_JSON_BYTES = 16 * 2**20  # config.json, index.json and model.json are kilobytes


def read_json_object(path: Path, what: str) -> dict:
    """A small JSON file that must hold an object (config.json, an index, model.json); CheckpointError otherwise."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes, over {MAX_JSON_BYTES}")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable {what} ({_show(str(e), 200)}); restore or re-download "
                              "it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: a {what} is a JSON object, this file holds a {type(data).__name__}")
    return data


def read_bundle_manifest(path: Path) -> dict:
    """A model bundle's model.json (see loading.load_pipeline), checked: sizes and numbers in range, part files
    inside the bundle."""
    manifest = read_json_object(path, "model bundle manifest")
    problems = []
    size = manifest.get("native_size")
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 16384 or size % 8:
        problems.append(f"native_size={_show(size)} (expected a multiple of 8 from 8 to 16384)")
    shifts = manifest.get("shifts")
    if not (isinstance(shifts, list) and len(shifts) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e3 for v in shifts)):
        problems.append(f"shifts={_show(shifts)} (expected two positive numbers: Stage C's and Stage B's)")
    guidance = manifest.get("decoder_guidance")
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not 0 <= guidance < 1e3:
        problems.append(f"decoder_guidance={_show(guidance)} (expected a number >= 0)")
    compression = manifest.get("compression")  # optional: absent, the released models' default
    if "compression" in manifest and (not isinstance(compression, (int, float)) or isinstance(compression, bool)
                                      or not 8 <= compression <= 128):
        problems.append(f"compression={_show(compression)} (expected image pixels per Stage C latent cell, "
                        "8 to 128)")
    for part in ("effnet", "previewer"):
        name = manifest.get(part)
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{part}={_show(name)} (expected a file name inside the bundle)")
    if problems:
        raise CheckpointError(f"{path} is not a valid model bundle manifest: {'; '.join(problems)}")
    return manifest


def _diffusers_weight_files(folder: Path, variant: Optional[str]) -> list[Path]:
    stems = ([f"diffusion_pytorch_model.{variant}", f"model.{variant}"] if variant else []) + \
            ["diffusion_pytorch_model", "model"]
    for stem in stems:
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single]
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            weight_map = read_json_object(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or not all(
                    isinstance(v, str) and v == Path(v).name and v.endswith(".safetensors")
                    for v in weight_map.values()):
                raise CheckpointError(f"{index}: its \"weight_map\" must map tensor names to .safetensors file "
                                      "names in the same folder; download the model again")
            return [folder / s for s in sorted(set(weight_map.values()))]
    pickles = [p.name for p in folder.glob("*.bin")]
    hint = f" (found pickle weights {pickles}, which are refused)" if pickles else ""
    raise CheckpointError(f"no safetensors weights in {folder}{hint}. Expected diffusion_pytorch_model.safetensors.")


def load_diffusers(folder: PathLike, kind: str, *, dtype=None, device=None, variant: Optional[str] = None) -> nn.Module:
    """Load a diffusers model folder (config.json + safetensors weights, possibly sharded)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} has no config.json; expected a diffusers model folder for "
                              f"{KIND_NAMES[kind]}.")
    raw = read_json_object(cfg_path, "diffusers config")
    found = {"StableCascadeUNet": "stage_c" if raw.get("clip_text_in_channels") else "stage_b",
             "PaellaVQModel": "stage_a"}.get(raw.get("_class_name"))
    if found != kind:
        raise CheckpointError(f"{folder} holds a {raw.get('_class_name')} ({KIND_NAMES.get(found, 'unknown')}); "
                              f"expected {KIND_NAMES[kind]}.")
    state = {}
    for file in _diffusers_weight_files(folder, variant):
        state.update(read_state_dict(file, dtype)[0])
    config = _config_or_error(lambda: config_from_diffusers(raw, kind), cfg_path, kind)
    return build_model(kind, config, diffusers_to_official(state, kind), source=str(folder), device=device)


def load_component(path: PathLike, kind: str, *, dtype=None, device=None) -> nn.Module:
    """A component from an official single file or a diffusers model folder."""
    path = Path(path)
    if path.is_dir():
        return load_diffusers(path, kind, dtype=dtype, device=device)
    return load_official(path, kind, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------ writing
def _kind_of(model: nn.Module) -> str:
    return next(k for k, cls in MODEL_CLASSES.items() if isinstance(model, cls))


def save_official(model: nn.Module, path: PathLike, metadata: Optional[dict] = None) -> None:
    """Write an official-format single file; our config (and `metadata`, strings) ride along in the metadata."""
    meta = {**(metadata or {}), CONFIG_METADATA_KEY: json.dumps(dataclasses.asdict(model.config))}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)


def save_diffusers(model: nn.Module, folder: PathLike) -> None:
    """Write a diffusers model folder (config.json + diffusion_pytorch_model.safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind = _kind_of(model)
    if kind not in ("stage_c", "stage_b", "stage_a"):
        raise CheckpointError(f"diffusers has no format for the {KIND_NAMES[kind]}; use save_official")
    (folder / "config.json").write_text(json.dumps(config_to_diffusers(model.config), indent=2))
    state = official_to_diffusers({k: v.detach().contiguous() for k, v in model.state_dict().items()}, kind)
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
