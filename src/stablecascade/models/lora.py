"""LoRA for Stage C and the CLIP text encoder: read any common file format, apply several at once, save.

Formats `read_lora` understands (auto-detected; `official-spec.md` §1.9, `community.md` §1.7):

- official (Stability `train_c_lora.py`): `weights.{i}.lora_down` (r, in) / `weights.{i}.lora_up` (out, r), identified
  by position only: the AttnBlocks of Stage C in module order, even i = `attention.attn.out_proj.weight`, odd i =
  `attention.attn.in_proj_weight`; scale 1/r. Optional ReToken embeddings `embeddings.embeddings` (n, hidden) and
  `embeddings.indices` (n,): deltas for token rows. Ids past the tokenizer's vocabulary are tokens added in
  training; their strings are not in the file, so they come from `new_tokens=[(token, init_regex)]` or from the
  safetensors metadata key "new_tokens" (JSON) that `save_lora` writes.
- kohya (`lora_unet_<path>`, `lora_te_<path>`) and OneTrainer (`lora_prior_unet_`, `lora_prior_te_`): the module path
  with '.' -> '_', tensors `<name>.lora_down.weight`, `<name>.lora_up.weight`, optional `<name>.alpha` (scale
  alpha/r, default 1). Attention layers may use official names (`attention_attn_in_proj`, `attention_attn_out_proj`)
  or diffusers/ComfyUI names (`[attn_]to_q/to_k/to_v` = row blocks of the fused in_proj, `to_out_0`); any other
  Linear/Conv2d of Stage C or of the CLIP text model is addressed by its path. OneTrainer's bundled embeddings
  `bundle_emb.<name>.clip_g` become new tokens `<name>` (several vectors: `<name>`, `<name>_1`, ...).
- bare dotted keys (`[diffusion_model.]<path>.lora_down.weight`, `text_encoder.<path>...`; `lora_A`/`lora_B` too).

Applying (`LoRAManager`): "merge" adds Σ scale·Δ into the weights (computed in float32, rounded once to the weights'
dtype) after keeping a CPU copy of each touched tensor, so `unmerge` restores them bit for bit; "adapter" registers a
`torch.nn.utils.parametrize` parametrization computing the same sum on the fly, leaving the stored weights untouched,
with scales read live. Token embeddings are applied the same way in both modes: the tokenizer is replaced by an
extended copy and the embedding module by a new one; `unmerge` puts the original objects back.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from ..errors import CheckpointError, InputError

log = logging.getLogger(__name__)

__all__ = ["LayerDelta", "TokenEmbedding", "LoRAWeights", "LoRAManager", "read_lora", "save_lora",
           "official_layer_order"]

CLIP_VOCAB = 49408
STAGE_C, TEXT_ENCODER = "stage_c", "text_encoder"
MODES = ("merge", "adapter")


# ------------------------------------------------------------------------------------------------ data
@dataclass
class LayerDelta:
    """One low-rank update: `param` of `module` (rows `rows` only, if given) += scale · up @ down."""

    model: str  # STAGE_C or TEXT_ENCODER
    module: str  # dotted module path inside that model, e.g. "down_blocks.0.2.attention.attn"
    param: str  # "weight" or "in_proj_weight"
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    scale: float = 1.0  # alpha / rank
    rows: Optional[tuple[int, int]] = None  # q/k/v row block of a fused in_proj_weight
    key: str = ""  # the layer's name in the file, for messages

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """scale · up @ down, shaped like the target (rows)."""
        up = self.up.to(device=device, dtype=dtype).flatten(1)
        down = self.down.to(device=device, dtype=dtype).flatten(1)
        return (up @ down).mul(self.scale).view(self.shape)


@dataclass
class TokenEmbedding:
    """A token-embedding update: `vector` is added to the token's base row.

    `token` is an id of the existing vocabulary, or the string of a token to add; a new token's base row is the
    mean of the vocabulary rows whose token string matches `init_regex` (`re.match`), zeros if None or no match —
    so a full (textual-inversion) embedding is a new token without init regex."""

    token: Union[str, int]
    vector: torch.Tensor  # (hidden,)
    init_regex: Optional[str] = None


@dataclass
class LoRAWeights:
    """A LoRA file, parsed and checked against the models, independent of its format."""

    layers: list[LayerDelta] = field(default_factory=list)
    tokens: list[TokenEmbedding] = field(default_factory=list)
    source: str = "<state dict>"
    format: str = "official"  # "official", "kohya", "onetrainer", "bare" or a '+'-joined mix
    vocab_size: int = CLIP_VOCAB  # base vocabulary size of the tokenizer the token ids refer to

    @property
    def rank(self) -> int:
        return max((d.rank for d in self.layers), default=0)

    @property
    def new_tokens(self) -> list[tuple[str, Optional[str]]]:
        return [(t.token, t.init_regex) for t in self.tokens if isinstance(t.token, str)]

    @property
    def needs_text_encoder(self) -> bool:
        return bool(self.tokens) or any(d.model == TEXT_ENCODER for d in self.layers)


# ------------------------------------------------------------------------------------------- naming tables
def official_layer_order(stage_c: nn.Module) -> list[tuple[str, str]]:
    """(module, parameter) of the official format's `weights.{i}`: per attention layer out_proj, then in_proj."""
    order = []
    for name, m in stage_c.named_modules():
        if hasattr(m, "in_proj_weight") and hasattr(m, "out_proj"):
            order += [(f"{name}.out_proj", "weight"), (name, "in_proj_weight")]
    return order


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
            for i, part in enumerate("qkv"):  # diffusers / ComfyUI split names
                for alias in (f"attn.to_{part}", f"to_{part}"):
                    put(pre + alias, (name, "in_proj_weight", (i * c, (i + 1) * c)))
            for alias in ("attn.out_proj", "attn.to_out.0", "to_out.0", "out_proj"):
                put(pre + alias, (f"{name}.out_proj", "weight", None))
        elif isinstance(m, (nn.Linear, nn.Conv2d)) and name not in table:
            put(name, (name, "weight", None))
    return table


_OFFICIAL_KEY = re.compile(r"weights\.(\d+)\.(lora_down|lora_up)")
_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
             ".alpha": "alpha"}
_UNDERSCORE_PREFIXES = (("lora_prior_unet_", STAGE_C, "onetrainer"), ("lora_prior_te_", TEXT_ENCODER, "onetrainer"),
                        ("lora_unet_", STAGE_C, "kohya"), ("lora_te_", TEXT_ENCODER, "kohya"))
_DOTTED_PREFIXES = (("text_encoder.", TEXT_ENCODER), ("model.diffusion_model.", STAGE_C), ("diffusion_model.", STAGE_C),
                    ("prior.", STAGE_C), ("unet.", STAGE_C), ("", STAGE_C))
_VARIANT_HINTS = ("hada_", "lokr_", "lora_mid", "dora_scale", ".diff", "oft_")


# ------------------------------------------------------------------------------------------------ reading
def read_lora(source, stage_c: nn.Module, text_encoder=None, *, new_tokens: Optional[Sequence] = None,
              metadata: Optional[dict] = None) -> LoRAWeights:
    """Parse and check a LoRA file (path) or state dict against `stage_c` (and the `TextEncoder`, needed for
    text-encoder layers and token embeddings). `new_tokens`: [(token string, init regex or None)] for the tokens an
    official file adds (ids from the tokenizer's vocabulary size on, in this order), e.g. [("[fernando]", "^dog</w>")].
    Raises CheckpointError (file unreadable, unknown format, made for another model) naming the file and key."""
    from ..checkpoints import read_state_dict

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
        _check_layer(d, stage_c, source)
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
    for prefix, model in _DOTTED_PREFIXES:
        if name.startswith(prefix):
            if tables[model] is None:
                return model, None, "bare"
            if name[len(prefix):] in tables[model]:
                return model, tables[model][name[len(prefix):]], "bare"
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
    for name, parts in groups.items():
        first_key = next(iter(parts.values()))[0]
        hit = _resolve(name, tables)
        if hit is None:
            raise CheckpointError(
                f"{source}: {first_key!r} matches no layer of this Stage C or text encoder; the LoRA was made for a "
                "different model (an SD 1.x/SDXL or Stage B LoRA?)")
        model, target, fmt = hit
        if target is None:
            _require_te(None, source, first_key)
        if "down" not in parts or "up" not in parts:
            raise CheckpointError(f"{source}: layer {name!r} lacks its {'lora_up' if 'down' in parts else 'lora_down'} "
                                  "tensor; the file is incomplete")
        module, param, rows = target
        d = LayerDelta(model, module, param, parts["down"][1], parts["up"][1], 1.0, rows, key=parts["down"][0])
        _check_layer(d, stage_c if model == STAGE_C else text_encoder.model, source)
        if "alpha" in parts:
            d.scale = float(parts["alpha"][1].float().reshape(-1)[0]) / d.rank
        lora.layers.append(d)
        formats.append(fmt)
    lora.format = "+".join(dict.fromkeys(formats)) or "bare"
    return lora


def _bundle_embedding(key, t, text_encoder, source) -> list[TokenEmbedding]:
    parts = key.split(".")
    if len(parts) != 3 or parts[2] != "clip_g":
        log.warning("%s: ignoring embedding %r (only clip_g embeddings are used by Stable Cascade)", source, key)
        return []
    _require_te(text_encoder, source, key)
    hidden = text_encoder.model.get_input_embeddings().weight.shape[1]
    vectors = t.reshape(-1, t.shape[-1]) if t.ndim else t
    if t.ndim == 0 or vectors.shape[1] != hidden:
        raise CheckpointError(f"{source}: {key!r} has shape {tuple(t.shape)}; this text encoder needs (n, {hidden})")
    names = [f"<{parts[1]}>"] + [f"<{parts[1]}>_{i}" for i in range(1, len(vectors))]
    if len(vectors) > 1:
        log.warning("%s: embedding %r has %d vectors; write all of %s in the prompt", source, parts[1], len(vectors),
                    " ".join(names))
    return [TokenEmbedding(n, v) for n, v in zip(names, vectors)]


MAX_DELTA = 1e3  # bound on |scale·up@down|: real LoRAs change weights by ~0.01; more is a broken file


def _check_finite_scale(scale) -> float:
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InputError(f"a LoRA scale must be a finite number, got {scale!r}")
    return float(scale)


def _check_layer(d: LayerDelta, model: nn.Module, source: str) -> None:
    where = f"{source}: {d.key!r}"
    if d.down.ndim not in (2, 4) or d.up.ndim != d.down.ndim or d.up.shape[1] != d.down.shape[0] \
            or any(s != 1 for s in d.up.shape[2:]) or d.rank == 0:
        raise CheckpointError(f"{where} has inconsistent LoRA shapes: down {tuple(d.down.shape)}, up "
                              f"{tuple(d.up.shape)} (expected (r, in[, k, k]) and (out, r[, 1, 1]))")
    if not (math.isfinite(d.scale) and torch.isfinite(d.down).all() and torch.isfinite(d.up).all()):
        raise CheckpointError(f"{where} holds NaN or infinite values (or its alpha is one); the file is broken: "
                              "re-download or re-train it")
    bound = float(d.up.abs().max()) * float(d.down.abs().max()) * d.rank * abs(d.scale)
    if bound > MAX_DELTA:
        raise CheckpointError(f"{where} can change weights by up to {bound:.3g} (real LoRAs: ~0.01); the file is "
                              "broken: re-download or re-train it")
    weight = getattr(model.get_submodule(d.module), d.param)
    want = tuple(weight.shape) if d.rows is None else (d.rows[1] - d.rows[0], *weight.shape[1:])
    if d.shape != want:
        raise CheckpointError(f"{where} does not fit this model: it changes a {d.shape} weight, but {d.module}."
                              f"{d.param}{'' if d.rows is None else f'[{d.rows[0]}:{d.rows[1]}]'} is {want}. The "
                              "LoRA was made for a different model (e.g. the other Stage C size)")


# ------------------------------------------------------------------------------------------------ applying
def _lora_sum(w: torch.Tensor, terms) -> torch.Tensor:
    """w + Σ s·Δ over terms (delta_fn, scale, rows) with s != 0, in float32 and rounded once; w itself if none."""
    active = [(fn, s, rows) for fn, s, rows in terms if s != 0]
    if not active:
        return w
    out = w.float()
    for fn, s, rows in active:
        delta = fn() * s
        if rows is None:
            out = out + delta
        else:
            out = torch.cat([out[: rows[0]], out[rows[0]: rows[1]] + delta, out[rows[1]:]])
    return out.to(w.dtype)


class _Adapter(nn.Module):
    """Parametrization: weight -> weight + Σ scale[name]·Δ, with the scales read live from the manager."""

    def __init__(self, items: list[tuple[str, LayerDelta]], scales: dict, device):
        super().__init__()
        self.items, self.scales = [], scales
        for i, (name, d) in enumerate(items):
            self.register_buffer(f"down{i}", d.down.detach().to(device, torch.float32).flatten(1), persistent=False)
            self.register_buffer(f"up{i}", d.up.detach().to(device, torch.float32).flatten(1), persistent=False)
            self.items.append((name, d.scale, d.rows, d.shape))

    def _delta(self, i, shape):
        return lambda: (getattr(self, f"up{i}") @ getattr(self, f"down{i}")).view(shape)

    def forward(self, w):
        return _lora_sum(w, [(self._delta(i, shape), self.scales.get(name, 0.0) * scale, rows)
                             for i, (name, scale, rows, shape) in enumerate(self.items)])


class LoRAManager:
    """Several LoRAs on one Stage C (+ text encoder), each with its own scale.

    `add`/`set_scale`/`remove` re-apply at once when LoRAs are applied. `merge()` / `apply("adapter")` apply all LoRAs;
    `unmerge()` restores the base models exactly (weights bit for bit, the original tokenizer and embedding objects).
    In adapter mode `set_scale` changes only a number read at each forward; scale 0 switches a LoRA off. Unmerge before
    changing the models' dtype or device with merged LoRAs (the saved copies are put back with `copy_`)."""

    def __init__(self, stage_c: nn.Module, text_encoder=None):
        self.stage_c, self.text_encoder = stage_c, text_encoder
        self.loras: dict[str, LoRAWeights] = {}
        self.scales: dict[str, float] = {}
        self.mode: Optional[str] = None  # None (base weights), "merge" or "adapter"
        self._originals: dict[tuple[str, str, str], torch.Tensor] = {}
        self._parametrized: list[tuple[nn.Module, str]] = []
        self._base_text = None  # (tokenizer, embedding module) replaced while tokens are applied
        self._tokenizer_cache: Optional[tuple[tuple, object]] = None

    # ---------------------------------------------------------------- the set of LoRAs
    def add(self, lora: LoRAWeights, scale: float = 1.0, name: Optional[str] = None) -> str:
        if name is None:
            name = next(f"lora{i}" for i in range(len(self.loras) + 1) if f"lora{i}" not in self.loras)
        if name in self.loras:
            raise InputError(f"a LoRA named {name!r} is already loaded; remove it first or pick another name")
        if lora.needs_text_encoder and self.text_encoder is None:
            raise InputError(f"{lora.source} changes the text encoder, but this LoRAManager has none")
        for d in lora.layers:  # a LoRA read against another model must not half-apply
            _check_layer(d, self._model(d.model), lora.source)
        if not all(torch.isfinite(t.vector).all() for t in lora.tokens):
            raise CheckpointError(f"{lora.source}: a token embedding holds NaN or infinite values; the file is broken")
        self.loras[name], self.scales[name] = lora, _check_finite_scale(scale)
        self._refresh()
        return name

    def set_scale(self, name: str, scale: float) -> None:
        self._get(name)
        self.scales[name] = _check_finite_scale(scale)
        if self.mode == "adapter":  # layers read the scale live; only token rows need rebuilding
            if self.loras[name].tokens:
                self._restore_tokens()
                self._apply_tokens()
        else:
            self._refresh()

    def remove(self, name: str) -> None:
        self._get(name)
        del self.loras[name], self.scales[name]
        self._refresh()

    def _get(self, name):
        if name not in self.loras:
            raise InputError(f"no LoRA named {name!r} is loaded (loaded: {sorted(self.loras) or 'none'})")
        return self.loras[name]

    def _refresh(self):
        if self.mode is not None:
            self.apply(self.mode)

    # ---------------------------------------------------------------- applying
    def merge(self) -> None:
        self.apply("merge")

    def apply(self, mode: str = "merge") -> None:
        """Apply every LoRA at its scale: "merge" into the weights, or "adapter" (parametrizations)."""
        if mode not in MODES:
            raise InputError(f"LoRA mode must be one of {MODES}, not {mode!r}")
        self.unmerge()
        self.mode = mode
        groups: dict[tuple[str, str, str], list[tuple[str, LayerDelta]]] = {}
        for name, lora in self.loras.items():
            for d in lora.layers:
                groups.setdefault((d.model, d.module, d.param), []).append((name, d))
        with torch.no_grad():
            for (model, module_path, param), items in groups.items():
                module = self._model(model).get_submodule(module_path)
                weight = getattr(module, param)
                if mode == "adapter":
                    parametrize.register_parametrization(module, param, _Adapter(items, self.scales, weight.device))
                    self._parametrized.append((module, param))
                    continue
                terms = [(lambda d=d: d.delta(torch.float32, weight.device), self.scales[n], d.rows) for n, d in items]
                if all(s == 0 for _, s, _ in terms):
                    continue
                self._originals[(model, module_path, param)] = weight.detach().to("cpu", copy=True)
                weight.copy_(_lora_sum(weight, terms))
        self._apply_tokens()

    def unmerge(self) -> None:
        """Back to the base models: parametrizations removed, weights restored exactly, tokenizer/embedding put back."""
        with torch.no_grad():
            for module, param in self._parametrized:
                parametrize.remove_parametrizations(module, param, leave_parametrized=False)
            for (model, module_path, param), original in self._originals.items():
                getattr(self._model(model).get_submodule(module_path), param).copy_(original)
        self._parametrized, self._originals = [], {}
        self._restore_tokens()
        self.mode = None

    def _model(self, which: str) -> nn.Module:
        return self.stage_c if which == STAGE_C else self.text_encoder.model

    # ---------------------------------------------------------------- tokens
    def _apply_tokens(self) -> None:
        items = [(t, self.scales[name]) for name, lora in self.loras.items() for t in lora.tokens]
        if not items:
            return
        te = self.text_encoder
        tokenizer0, emb0 = te.tokenizer, te.model.get_input_embeddings()
        vocab = tokenizer0.get_vocab()
        new = list(dict.fromkeys(t.token for t, _ in items if isinstance(t.token, str) and t.token not in vocab))
        tokenizer = tokenizer0
        if new:
            if self._tokenizer_cache is None or self._tokenizer_cache[0] != (id(tokenizer0), *new):
                tokenizer = copy.deepcopy(tokenizer0)
                tokenizer.add_tokens(new)
                self._tokenizer_cache = ((id(tokenizer0), *new), tokenizer)
            tokenizer = self._tokenizer_cache[1]
        base = emb0.weight.detach()
        rows: dict[int, torch.Tensor] = {}  # float32 rows that change
        for t, s in items:
            i = t.token if isinstance(t.token, int) else tokenizer.convert_tokens_to_ids(t.token)
            if i not in rows:  # a new token's first mention: its base row from the init regex
                new_token = isinstance(t.token, str) and t.token in new
                rows[i] = (self._init_row(t.init_regex, vocab, tokenizer0.vocab_size, base) if new_token
                           else base[i].float())
            if s != 0:
                rows[i] = rows[i] + s * t.vector.to(rows[i])
        weight = torch.cat([base, base.new_zeros(max(0, len(tokenizer) - base.shape[0]), base.shape[1])])
        for i, row in rows.items():
            weight[i] = row.to(weight.dtype)
        emb = nn.Embedding.from_pretrained(weight, freeze=True, padding_idx=emb0.padding_idx)
        self._base_text = (tokenizer0, emb0)
        te.model.set_input_embeddings(emb)
        te.tokenizer = tokenizer

    @staticmethod
    def _init_row(regex, vocab, vocab_size, base) -> torch.Tensor:
        if not regex:
            return torch.zeros(base.shape[1], device=base.device)
        pattern = re.compile(regex)
        ids = [i for tok, i in vocab.items() if i < vocab_size and pattern.match(tok)]
        if not ids:
            log.warning("no vocabulary token matches the init regex %r; the new token starts from zeros", regex)
            return torch.zeros(base.shape[1], device=base.device)
        return base[sorted(ids)].float().mean(0)

    def _restore_tokens(self) -> None:
        if self._base_text is not None:
            tokenizer0, emb0 = self._base_text
            self.text_encoder.model.set_input_embeddings(emb0)
            self.text_encoder.tokenizer = tokenizer0
            self._base_text = None


# ------------------------------------------------------------------------------------------------ saving
def save_lora(path, lora: LoRAWeights, stage_c: nn.Module, *, metadata: Optional[dict] = None) -> None:
    """Write `lora` in the official format (loadable by the official code), plus metadata: JSON strings "rank",
    "new_tokens" ([[token, init regex], ...] in id order from "vocab_size") and "format".

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
                             "the official LoRA format")
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
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
