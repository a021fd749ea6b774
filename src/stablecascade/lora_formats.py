"""LoRA files: reading every common format into `models.lora.LoRAWeights`, and writing the official and kohya
formats.

Formats `read_lora` understands (auto-detected):

- official (Stability `train_c_lora.py`): `weights.{i}.lora_down` (r, in) / `weights.{i}.lora_up` (out, r), identified
  by position only: the AttnBlocks of Stage C in module order, even i = `attention.attn.out_proj.weight`, odd i =
  `attention.attn.in_proj_weight`; scale 1/r. Optional ReToken embeddings `embeddings.embeddings` (n, hidden) and
  `embeddings.indices` (n,): deltas for token rows. Ids past the tokenizer's vocabulary are tokens added in
  training; their strings are not in the file, so they come from `new_tokens=[(token, init_regex)]` or from the
  safetensors metadata key "new_tokens" (JSON) that `save_lora` writes.
- kohya (`lora_unet_<path>`, `lora_te_<path>`) and OneTrainer's legacy form (`lora_prior_unet_`, `lora_prior_te_`):
  the module path with '.' -> '_', tensors `<name>.lora_down.weight`, `<name>.lora_up.weight`, optional
  `<name>.alpha` (scale alpha/r, default 1). Attention layers may use official names (`attention_attn_in_proj`,
  `attention_attn_out_proj`) or diffusers/ComfyUI names (`[attn_]to_q/to_k/to_v` = row blocks of the fused in_proj,
  `to_out_0`); any other Linear/Conv2d of Stage C or of the CLIP text model is addressed by its path.
- OneTrainer's OMI form (`unet.<official path>`, the fused attention's q/k/v rows as `attention.attn.in_proj.0/1/2`;
  `clip_g.<text model path>`) and its dotted internal form (`lora_prior_unet.<path>` with diffusers attention
  names, `lora_prior_te.<path>`).
- OneTrainer's bundled embeddings `bundle_emb.<placeholder>.clip_g` (new tokens) and `.clip_g_out` (output
  embeddings); other encoders' entries (clip_l, t5) are skipped with a warning.
- bare dotted keys (`[diffusion_model.]<path>.lora_down.weight`, `text_encoder.<path>...`; `lora_A`/`lora_B` too).

What cannot apply is skipped with a warning, never the whole file: layers this model lacks (as long as some layers
match; a file none of whose layers match was made for another model and is refused) and LoRAs on grouped
(depthwise) convolutions that OneTrainer's all-layer files hold as full convolutions.

Writing (`save_lora`): "official" holds only Stage C attention layers and token embeddings; "kohya" holds any layer
(`lora_unet_<path>` with the fused attention split into ComfyUI's `attention_attn_to_q/k/v`, `lora_prior_te_<path>`
for the text encoder, the key names ComfyUI maps for Stable Cascade) and new tokens as bundled embeddings.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from .checkpoints import read_state_dict
from .errors import CheckpointError, InputError
from .models.lora import (STAGE_C, TEXT_ENCODER, LayerDelta, LoRAWeights, TokenEmbedding, check_layer,
                          official_layer_order)
from .sampling import read_consistency

log = logging.getLogger(__name__)

__all__ = ["read_lora", "save_lora", "official_fits", "SAVE_FORMATS"]

SAVE_FORMATS = ("official", "kohya")


# ------------------------------------------------------------------------------------------- naming tables
def _layer_table(model: nn.Module) -> dict[str, tuple[str, str, Optional[tuple[int, int]]]]:
    """Every accepted layer name (dotted and kohya '_' form) -> (module path, parameter, rows)."""
    table = {}

    def put(alias, target):
        table[alias] = table[alias.replace(".", "_")] = target

    for name, m in model.named_modules():
        if hasattr(m, "in_proj_weight") and hasattr(m, "out_proj"):  # fused attention, official names
            base, c = name.rsplit(".", 1)[0] if "." in name else "", m.in_proj_weight.shape[1]
            pre = f"{base}." if base else ""
            for alias in ("attn.in_proj", "attn.in_proj_weight", "in_proj"):
                put(pre + alias, (name, "in_proj_weight", None))
            for i, part in enumerate("qkv"):  # diffusers / ComfyUI split names, OMI's numbered row blocks
                for alias in (f"attn.to_{part}", f"to_{part}", f"attn.in_proj.{i}"):
                    put(pre + alias, (name, "in_proj_weight", (i * c, (i + 1) * c)))
            for alias in ("attn.out_proj", "attn.to_out.0", "to_out.0", "out_proj"):
                put(pre + alias, (f"{name}.out_proj", "weight", None))
        elif isinstance(m, (nn.Linear, nn.Conv2d)) and name and name not in table:
            put(name, (name, "weight", None))
    return table


_OFFICIAL_KEY = re.compile(r"weights\.(\d+)\.(lora_down|lora_up)")
_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
             ".alpha": "alpha"}
_UNDERSCORE_PREFIXES = (("lora_prior_unet_", STAGE_C, "onetrainer"), ("lora_prior_te_", TEXT_ENCODER, "onetrainer"),
                        ("lora_unet_", STAGE_C, "kohya"), ("lora_te_", TEXT_ENCODER, "kohya"))
# dotted forms: OneTrainer's OMI files (`unet.` + official module paths with the fused attention's rows numbered
# `attn.in_proj.0/1/2`, `clip_g.` + transformers paths) and its internal form (`lora_prior_unet.` + diffusers names
# such as `attention.to_q`, `lora_prior_te.`); then bare paths
_DOTTED_PREFIXES = (("lora_prior_unet.", STAGE_C, "onetrainer-internal"),
                    ("lora_prior_te.", TEXT_ENCODER, "onetrainer-internal"),
                    ("unet.", STAGE_C, "omi"), ("clip_g.", TEXT_ENCODER, "omi"),
                    ("text_encoder.", TEXT_ENCODER, "bare"), ("model.diffusion_model.", STAGE_C, "bare"),
                    ("diffusion_model.", STAGE_C, "bare"), ("prior.", STAGE_C, "bare"), ("", STAGE_C, "bare"))
_VARIANT_HINTS = ("hada_", "lokr_", "lora_mid", "dora_scale", ".diff", "oft_")


# ------------------------------------------------------------------------------------------------ reading
def read_lora(source, stage_c: nn.Module, text_encoder=None, *, new_tokens: Optional[Sequence] = None,
              metadata: Optional[dict] = None) -> LoRAWeights:
    """Parse and check a LoRA file (path) or state dict against `stage_c` (and the `TextEncoder`, needed for
    text-encoder layers and token embeddings). `new_tokens`: [(token string, init regex or None)] for the tokens an
    official file adds (ids from the tokenizer's vocabulary size on, in this order), e.g. [("[fernando]", "^dog</w>")].
    Raises CheckpointError (file unreadable, unknown format, made for another model) naming the file and key."""
    if isinstance(source, dict):
        state, meta, name = source, dict(metadata or {}), "<state dict>"
    else:
        state, meta = read_state_dict(source)
        meta.update(metadata or {})
        name = str(source)
    if not state:
        raise CheckpointError(f"{name}: the file holds no tensors; it is not a LoRA")
    if new_tokens is None and meta.get("new_tokens"):
        try:
            new_tokens = [(str(t), r) for t, r in json.loads(meta["new_tokens"])]
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{name}: metadata 'new_tokens' is not a JSON list of [token, regex] pairs ({e})")
    if any(_OFFICIAL_KEY.fullmatch(k) or k.startswith("embeddings.") for k in state):
        pairs = [(t, None) if isinstance(t, str) else (str(t[0]), t[1]) for t in new_tokens or []]
        lora = _read_official(state, stage_c, text_encoder, name, pairs)
    else:
        lora = _read_named(state, stage_c, text_encoder, name)
    lora.source = name
    lora.consistency = read_consistency(meta, name)
    if text_encoder is not None:
        lora.vocab_size = text_encoder.tokenizer.vocab_size
    return lora


def _require_te(text_encoder, source, key):
    if text_encoder is None:
        raise InputError(f"{source}: {key!r} is for the text encoder; pass text_encoder= to read this LoRA")


def _read_official(state, stage_c, text_encoder, source, new_tokens) -> LoRAWeights:
    order = official_layer_order(stage_c)
    found: dict[int, dict] = {}
    for key, t in state.items():
        m = _OFFICIAL_KEY.fullmatch(key)
        if m:
            found.setdefault(int(m[1]), {})[m[2]] = t
        elif key not in ("embeddings.embeddings", "embeddings.indices"):
            raise CheckpointError(f"{source}: unexpected key {key!r} in an official-format LoRA (weights.N.lora_down/"
                                  "lora_up, embeddings.embeddings/indices)")
    if found and sorted(found) != list(range(len(order))):
        raise CheckpointError(
            f"{source}: the LoRA has {len(found)} layers (weights.{min(found)}..weights.{max(found)}) but this Stage C "
            f"has {len(order)} attention layers (2 per AttnBlock: 128 in the 3.6B model, 64 in the lite 1B); "
            "the LoRA was made for a different Stage C")
    lora = LoRAWeights(format="official")
    for i, (module, param) in enumerate(order[: len(found)]):
        parts, key = found[i], f"weights.{i}"
        if set(parts) != {"lora_down", "lora_up"}:
            raise CheckpointError(f"{source}: {key} has only {sorted(parts)}; lora_down and lora_up are both needed")
        d = LayerDelta(STAGE_C, module, param, parts["lora_down"], parts["lora_up"], 1.0, key=key)
        check_layer(d, stage_c, source)
        d.scale = 1.0 / d.rank
        lora.layers.append(d)
    emb, idx = state.get("embeddings.embeddings"), state.get("embeddings.indices")
    if emb is None and idx is None:
        return lora
    _require_te(text_encoder, source, "embeddings.embeddings")
    hidden = text_encoder.model.get_input_embeddings().weight.shape[1]
    vocab = text_encoder.tokenizer.vocab_size
    if emb is None or idx is None or emb.ndim != 2 or idx.ndim != 1 or emb.shape[0] != idx.shape[0] \
            or idx.is_floating_point():
        raise CheckpointError(f"{source}: embeddings.embeddings (n, hidden) and embeddings.indices (n,) integer ids "
                              "must come together")
    if emb.shape[1] != hidden:
        raise CheckpointError(f"{source}: 'embeddings.embeddings' rows are {emb.shape[1]} wide but the text encoder's "
                              f"token embeddings are {hidden} wide; the LoRA was made for a different text encoder")
    for i, row in sorted(zip(idx.tolist(), emb), key=lambda pair: pair[0]):
        if i < 0:
            raise CheckpointError(f"{source}: 'embeddings.indices' holds a negative token id {i}")
        if i < vocab:
            lora.tokens.append(TokenEmbedding(int(i), row))
        elif i - vocab < len(new_tokens):
            token, regex = new_tokens[i - vocab]
            lora.tokens.append(TokenEmbedding(str(token), row, regex))
        else:
            raise CheckpointError(
                f"{source}: 'embeddings.indices' holds token id {i}, past the tokenizer's {vocab} entries: a token "
                "added in training, whose string the official format does not store. Pass its string and init regex, "
                "e.g. new_tokens=[(\"[fernando]\", \"^dog</w>\")] for the official example (one pair per added token, "
                f"in id order from {vocab})")
    return lora


def _resolve(name: str, tables: dict) -> Optional[tuple[str, Optional[tuple], str]]:
    """(model, (module, param, rows), format) of a layer name in the file; target None when that model was not
    given; None when the name matches no layer."""
    for prefix, model, fmt in _UNDERSCORE_PREFIXES:
        if name.startswith(prefix):
            if tables[model] is None:
                return model, None, fmt
            target = tables[model].get(name[len(prefix):])
            return (model, target, fmt) if target else None
    for prefix, model, fmt in _DOTTED_PREFIXES:
        if name.startswith(prefix):
            if tables[model] is None:
                return model, None, fmt
            if name[len(prefix):] in tables[model]:
                return model, tables[model][name[len(prefix):]], fmt
    return None


def _read_named(state, stage_c, text_encoder, source) -> LoRAWeights:
    tables = {STAGE_C: _layer_table(stage_c), TEXT_ENCODER: _layer_table(text_encoder.model) if text_encoder else None}
    groups: dict[str, dict] = {}
    tokens: list[TokenEmbedding] = []
    formats = []
    for key, t in state.items():
        if key.startswith("bundle_emb."):
            tokens += _bundle_embedding(key, t, text_encoder, source)
            formats.append("onetrainer")
            continue
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            if any(h in key for h in _VARIANT_HINTS):
                raise CheckpointError(f"{source}: {key!r} belongs to a LoRA variant (LoHa/LoKr/DoRA/...) that is not "
                                      "supported; only plain LoRA (lora_down/lora_up) is")
            raise CheckpointError(f"{source}: unknown LoRA key format, e.g. {key!r}: expected the official "
                                  "(weights.N.lora_down), kohya (lora_unet_...), OneTrainer (lora_prior_unet_...) or "
                                  "'<layer>.lora_down.weight' keys")
        groups.setdefault(key[: -len(suffix)], {})[_SUFFIXES[suffix]] = (key, t)
    lora = LoRAWeights(tokens=tokens)
    unmatched, skipped = [], []
    for name, parts in groups.items():
        first_key = next(iter(parts.values()))[0]
        hit = _resolve(name, tables)
        if hit is None:
            unmatched.append(first_key)
            continue
        model, target, fmt = hit
        if target is None:
            _require_te(None, source, first_key)
        if "down" not in parts or "up" not in parts:
            raise CheckpointError(f"{source}: layer {name!r} lacks its {'lora_up' if 'down' in parts else 'lora_down'} "
                                  "tensor; the file is incomplete")
        module, param, rows = target
        d = LayerDelta(model, module, param, parts["down"][1], parts["up"][1], 1.0, rows, key=parts["down"][0])
        owner = stage_c if model == STAGE_C else text_encoder.model
        try:
            check_layer(d, owner, source)
        except CheckpointError:
            # a LoRA trained as a full convolution beside a grouped (depthwise) one, as OneTrainer's all-layer
            # LoRAs are, is no update of that convolution's weight: it cannot apply here, the rest of the file can
            if getattr(owner.get_submodule(module), "groups", 1) == 1:
                raise
            skipped.append(first_key)
            continue
        if "alpha" in parts:
            d.scale = float(parts["alpha"][1].float().reshape(-1)[0]) / d.rank
        lora.layers.append(d)
        formats.append(fmt)
    if unmatched and not lora.layers:
        raise CheckpointError(
            f"{source}: {unmatched[0]!r} matches no layer of this Stage C or text encoder; the LoRA was made for a "
            "different model (an SD 1.x/SDXL or Stage B LoRA?)")
    if unmatched:
        log.warning("%s: skipping %d layers that this Stage C or text encoder does not have, e.g. %r", source,
                    len(unmatched), unmatched[0])
    if skipped:
        log.warning("%s: skipping %d LoRA layers on grouped (depthwise) convolutions, which a weight update cannot "
                    "express, e.g. %r; the other %d layers apply", source, len(skipped), skipped[0], len(lora.layers))
    lora.format = "+".join(dict.fromkeys(formats)) or "bare"
    return lora


def _bundle_embedding(key, t, text_encoder, source) -> list[TokenEmbedding]:
    """OneTrainer's bundled embedding `bundle_emb.<placeholder>.clip_g` (input embedding: the rows of new tokens) or
    `.clip_g_out` (output embedding: replaces the text encoder's last hidden state at those tokens). The placeholder
    is the prompt text OneTrainer trained it with, so it becomes the token as written; a second and further vector
    become `<placeholder>_1`, ..."""
    placeholder, encoder = key[len("bundle_emb."):].rpartition(".")[::2]
    if not placeholder or encoder not in ("clip_g", "clip_g_out"):
        log.warning("%s: ignoring embedding %r (Stable Cascade uses only clip_g embeddings)", source, key)
        return []
    _require_te(text_encoder, source, key)
    hidden = text_encoder.model.get_input_embeddings().weight.shape[1]
    vectors = t.reshape(-1, t.shape[-1]) if t.ndim else t
    if t.ndim == 0 or vectors.shape[1] != hidden:
        raise CheckpointError(f"{source}: {key!r} has shape {tuple(t.shape)}; this text encoder needs (n, {hidden})")
    names = [placeholder] + [f"{placeholder}_{i}" for i in range(1, len(vectors))]
    if len(vectors) > 1:
        log.warning("%s: embedding %r has %d vectors; write all of %s in the prompt", source, placeholder,
                    len(vectors), " ".join(names))
    return [TokenEmbedding(n, v, output=encoder == "clip_g_out") for n, v in zip(names, vectors)]


# ------------------------------------------------------------------------------------------------ saving
def official_fits(layers: Sequence[tuple[str, str, str]], stage_c: nn.Module) -> bool:
    """Whether LoRAs on `layers` ((model, module, parameter) triples) fit the official format: Stage C attention
    in_proj/out_proj only."""
    order = set(official_layer_order(stage_c))
    return all(model == STAGE_C and (module, param) in order for model, module, param in layers)


def save_lora(path, lora: LoRAWeights, stage_c: nn.Module, *, format: str = "official",
              metadata: Optional[dict] = None) -> None:
    """Write `lora` in `format` ("official" or "kohya", see the module docstring) as safetensors, with metadata
    (string values, plus "format"). InputError when the format cannot hold a layer or token of `lora`."""
    if format not in SAVE_FORMATS:
        raise InputError(f"LoRA file format must be one of {', '.join(SAVE_FORMATS)}, not {format!r}")
    state, meta = (_official_state if format == "official" else _kohya_state)(lora, stage_c)
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def _official_state(lora: LoRAWeights, stage_c: nn.Module) -> tuple[dict, dict]:
    """The official format (loadable by the official code), plus metadata: "rank", "new_tokens" ([[token, init
    regex], ...] in id order from "vocab_size", JSON) and "format".

    Only Stage C attention layers (in_proj / out_proj, whole or q/k/v rows) can be stored. Ranks and scales are
    folded into one rank R for all layers (scale 1/R as the official loader assumes): layers with a lower rank are
    zero-padded, q/k/v row deltas are stacked into one in_proj update, absent layers are zeros."""
    order = official_layer_order(stage_c)
    index = {target: i for i, target in enumerate(order)}
    downs: dict[int, list] = {}
    ups: dict[int, list] = {}
    for d in lora.layers:
        i = index.get((d.module, d.param)) if d.model == STAGE_C else None
        if i is None or d.down.ndim != 2:
            raise InputError(f"{d.key or d.module}: only Stage C attention layers (in_proj/out_proj) can be saved in "
                             "the official LoRA format; save in the kohya format")
        up = d.up.detach().float() * d.scale
        if d.rows is not None:
            full = torch.zeros(getattr(stage_c.get_submodule(d.module), d.param).shape[0], d.rank)
            full[d.rows[0]: d.rows[1]] = up
            up = full
        downs.setdefault(i, []).append(d.down.detach().float().cpu())
        ups.setdefault(i, []).append(up.cpu())
    rank = max([sum(t.shape[0] for t in v) for v in downs.values()] + [1])
    state = {}
    for i, (module, param) in enumerate(order):
        out_dim, in_dim = getattr(stage_c.get_submodule(module), param).shape
        down, up = torch.zeros(rank, in_dim), torch.zeros(out_dim, rank)
        if i in downs:
            d_cat, u_cat = torch.cat(downs[i]), torch.cat(ups[i], dim=1)
            down[: d_cat.shape[0]], up[:, : u_cat.shape[1]] = d_cat, u_cat * rank
        state[f"weights.{i}.lora_down"], state[f"weights.{i}.lora_up"] = down.contiguous(), up.contiguous()
    rows: dict[int, torch.Tensor] = {}
    new: dict[str, tuple[int, Optional[str]]] = {}
    for t in lora.tokens:
        if isinstance(t.token, str):
            if t.token not in new:
                new[t.token] = (lora.vocab_size + len(new), t.init_regex)
            i = new[t.token][0]
        else:
            i = t.token
        rows[i] = rows.get(i, 0) + t.vector.detach().float().cpu()
    if rows:
        ids = sorted(rows)
        state["embeddings.embeddings"] = torch.stack([rows[i] for i in ids]).contiguous()
        state["embeddings.indices"] = torch.tensor(ids, dtype=torch.int64)
    meta = {"format": "stablecascade-lora", "rank": str(rank), "alpha": "1", "vocab_size": str(lora.vocab_size),
            "new_tokens": json.dumps([[tok, regex] for tok, (_, regex) in new.items()])}
    return state, meta


def _kohya_state(lora: LoRAWeights, stage_c: nn.Module) -> tuple[dict, dict]:
    state = {}

    def put(name, down, up, scale):
        state[f"{name}.lora_down.weight"] = down.detach().float().cpu().clone()  # q, k, v share one down
        state[f"{name}.lora_up.weight"] = up.detach().float().cpu().clone()
        state[f"{name}.alpha"] = torch.tensor(scale * down.shape[0])

    for d in lora.layers:
        prefix = "lora_unet_" if d.model == STAGE_C else "lora_prior_te_"
        if d.param == "in_proj_weight":  # ComfyUI splits the fused attention into to_q/to_k/to_v
            c = d.shape[1]
            blocks = [(i, (i * c, (i + 1) * c)) for i in range(3)] if d.rows is None else [(d.rows[0] // c, None)]
            for i, rows in blocks:
                up = d.up if rows is None else d.up[rows[0]: rows[1]]
                put(f"{prefix}{d.module}.to_{'qkv'[i]}".replace(".", "_"), d.down, up, d.scale)
        else:
            put(f"{prefix}{d.module}".replace(".", "_"), d.down, d.up, d.scale)
    for t in lora.tokens:
        if t.init_regex:
            raise InputError(f"{t.token}: bundled embeddings are whole rows; give the token's full row (its init "
                             "row plus the learned change) without an init regex")
        if not isinstance(t.token, str) or t.output:
            raise InputError(f"the kohya LoRA format stores new tokens only (as bundled embeddings), not a change to "
                             f"the existing token {t.token!r}; save in the official format")
        key = f"bundle_emb.{t.token}.clip_g"
        state[key] = torch.cat([state[key], t.vector[None].float()]) if key in state else t.vector[None].float()
    return state, {"format": "kohya", "ss_network_module": "networks.lora"}
