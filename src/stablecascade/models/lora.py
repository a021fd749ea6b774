"""LoRA on Stage C and the CLIP text encoder, independent of any file format (`stablecascade.lora_formats` reads
and writes the files): the parsed form (`LoRAWeights`), the layer sets training may target, the adapter that
applies low-rank updates (at inference and, with trainable factors, in training), and `LoRAManager`, which applies
several LoRAs at once.

Applying (`LoRAManager`): "merge" adds Σ scale·Δ into the weights (computed in float32, rounded once to the weights'
dtype) after keeping a CPU copy of each touched tensor, so `unmerge` restores them bit for bit; "adapter" registers a
`torch.nn.utils.parametrize` parametrization computing the same sum on the fly, leaving the stored weights untouched,
with scales read live. Token embeddings are applied the same way in both modes: the tokenizer is replaced by an
extended copy and the embedding module by a new one; `unmerge` puts the original objects back. Output embeddings
(OneTrainer's) replace the text encoder's hidden states at their token's positions, through a forward hook.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import CheckpointError, InputError
from ..sampling import Consistency

log = logging.getLogger(__name__)

__all__ = ["LayerDelta", "TokenEmbedding", "LoRAWeights", "LoRAManager", "LoRAAdapter", "LAYER_PRESETS",
           "lora_targets", "official_layer_order", "check_layer", "matching_token_ids", "new_token_row"]

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
    output: bool = False  # an output embedding: the token's input row is zeros and `vector` replaces the text
    # encoder's last hidden state wherever the token appears (OneTrainer's "output embeddings")


@dataclass
class LoRAWeights:
    """A LoRA file, parsed and checked against the models, independent of its format."""

    layers: list[LayerDelta] = field(default_factory=list)
    tokens: list[TokenEmbedding] = field(default_factory=list)
    source: str = "<state dict>"
    format: str = "official"  # "official", "kohya", "onetrainer", "bare" or a '+'-joined mix
    vocab_size: int = CLIP_VOCAB  # base vocabulary size of the tokenizer the token ids refer to
    consistency: Optional[Consistency] = None  # a consistency-distilled Stage C (`train lcm`): how to sample it

    @property
    def rank(self) -> int:
        return max((d.rank for d in self.layers), default=0)

    @property
    def new_tokens(self) -> list[tuple[str, Optional[str]]]:
        return list(dict.fromkeys((t.token, t.init_regex) for t in self.tokens if isinstance(t.token, str)))

    @property
    def needs_text_encoder(self) -> bool:
        return bool(self.tokens) or any(d.model == TEXT_ENCODER for d in self.layers)


# ------------------------------------------------------------------------------------------- layer sets
def official_layer_order(stage_c: nn.Module) -> list[tuple[str, str]]:
    """(module, parameter) of the official format's `weights.{i}`: per attention layer out_proj, then in_proj."""
    order = []
    for name, m in stage_c.named_modules():
        if hasattr(m, "in_proj_weight") and hasattr(m, "out_proj"):
            order += [(f"{name}.out_proj", "weight"), (name, "in_proj_weight")]
    return order


# Named layer sets (regular expressions searched in module paths) that training may target. Stage C: "attention"
# (the official LoRA's in_proj/out_proj: the only layers its file format can hold), "attention_ff" (+ the
# ResBlocks' feed-forward channelwise Linears and the attention blocks' condition kv_mapper), "all" (every Linear
# and ungrouped Conv2d, mappers included). Text encoder: "attention" (q/k/v/out projections), "all".
LAYER_PRESETS = {
    STAGE_C: {"attention": [r"\.attention\.attn$", r"\.attention\.attn\.out_proj$"],
              "attention_ff": [r"\.attention\.attn$", r"\.attention\.attn\.out_proj$", r"\.kv_mapper\.1$",
                               r"\.channelwise\.[04]$"],
              "all": [r".*"]},
    TEXT_ENCODER: {"attention": [r"\.self_attn\.(q|k|v|out)_proj$"], "all": [r".*"]},
}


def has_parameter(module: nn.Module, name: str) -> bool:
    """Whether `module` holds the parameter `name` itself, plain or parametrized (without computing it)."""
    return parametrize.is_parametrized(module, name) or isinstance(module._parameters.get(name), nn.Parameter)


def lora_targets(model: nn.Module, layers: Union[str, Sequence[str]], which: str = STAGE_C) -> list[tuple[str, str]]:
    """(module, parameter) of every layer of `model` a LoRA on `layers` changes: a preset name of LAYER_PRESETS or
    a list of regular expressions searched in module paths. Fused attention changes `in_proj_weight`; a Linear or
    Conv2d its `weight`; grouped (depthwise) convolutions are left out: tools disagree on what a LoRA on them is
    (OneTrainer trains a full convolution beside them, which no weight update expresses)."""
    presets = LAYER_PRESETS[which]
    if isinstance(layers, str):
        if layers not in presets:
            raise InputError(f"unknown LoRA layer set {layers!r}: use one of {', '.join(presets)} or a list of "
                             "regular expressions matching module paths")
        layers = presets[layers]
    try:
        patterns = [re.compile(p) for p in layers]
    except re.error as e:
        raise InputError(f"LoRA layer pattern is not a valid regular expression: {e}") from None
    targets = []
    for name, m in model.named_modules():
        if not name or not any(p.search(name) for p in patterns):
            continue
        if has_parameter(m, "in_proj_weight"):
            targets.append((name, "in_proj_weight"))
        elif isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1):
            targets.append((name, "weight"))
    return targets


MAX_DELTA = 1e3  # bound on |scale·up@down|: real LoRAs change weights by ~0.01; more is a broken file


def _check_finite_scale(scale) -> float:
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InputError(f"a LoRA scale must be a finite number, got {scale!r}")
    return float(scale)


def check_layer(d: LayerDelta, model: nn.Module, source: str) -> None:
    """Raise CheckpointError naming `source` and the layer's key unless `d` fits `model`."""
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


def matching_token_ids(regex: str, vocab: dict, vocab_size: int) -> list[int]:
    """Ids below `vocab_size` (the base vocabulary) of the tokens whose string matches `regex` (`re.match`)."""
    pattern = re.compile(regex)
    return sorted(i for tok, i in vocab.items() if i < vocab_size and pattern.match(tok))


def new_token_row(ids: Sequence[int], base: torch.Tensor) -> torch.Tensor:
    """A new token's starting row: the float32 mean of the rows `ids` of the embedding matrix `base`, zeros (on
    `base`'s device) if there are none. Used by LoRA loading and training alike."""
    if not ids:
        return torch.zeros(base.shape[1], device=base.device)
    return base[list(ids)].float().mean(0)


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


class LoRAAdapter(nn.Module):
    """Parametrization: weight -> weight + Σ scale[name]·Δ, with the scales read live from `scales` (the manager's).

    At inference the factors are buffers; `trainable=True` makes them float32 parameters (`down{i}`, `up{i}`),
    which is how training builds its LoRA layers. The factors live on `device` (the weight's)."""

    def __init__(self, items: list[tuple[str, LayerDelta]], scales: dict, device, trainable: bool = False):
        super().__init__()
        self.items, self.scales = [], scales
        for i, (name, d) in enumerate(items):
            for part, t in (("down", d.down), ("up", d.up)):
                t = t.detach().to(device, torch.float32).flatten(1)
                if trainable:
                    setattr(self, f"{part}{i}", nn.Parameter(t))
                else:
                    self.register_buffer(f"{part}{i}", t, persistent=False)
            self.items.append((name, d.scale, d.rows, d.shape))

    def factors(self, i: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) of term i, shaped as a LoRA file stores them ((r, in[, k, k]), (out, r[, 1, 1]))."""
        shape = self.items[i][3]
        down, up = getattr(self, f"down{i}"), getattr(self, f"up{i}")
        return down.view(down.shape[0], *shape[1:]), up.view(up.shape[0], up.shape[1], *[1] * (len(shape) - 2))

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
        self._output_hook = None  # the forward hook applying output embeddings

    # ---------------------------------------------------------------- the set of LoRAs
    def add(self, lora: LoRAWeights, scale: float = 1.0, name: Optional[str] = None) -> str:
        if name is None:
            name = next(f"lora{i}" for i in range(len(self.loras) + 1) if f"lora{i}" not in self.loras)
        if name in self.loras:
            raise InputError(f"a LoRA named {name!r} is already loaded; remove it first or pick another name")
        if lora.needs_text_encoder and self.text_encoder is None:
            raise InputError(f"{lora.source} changes the text encoder, but this LoRAManager has none")
        for d in lora.layers:  # a LoRA read against another model must not half-apply
            check_layer(d, self._model(d.model), lora.source)
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

    @property
    def consistency(self):
        """The `Consistency` of the first loaded consistency LoRA of Stage C at a non-zero scale, else None."""
        return next((lora.consistency for name, lora in self.loras.items()
                     if lora.consistency is not None and lora.consistency.stage == "prior" and self.scales[name] != 0),
                    None)

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
                    parametrize.register_parametrization(module, param, LoRAAdapter(items, self.scales, weight.device))
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
        outputs: dict[int, list] = {}  # token id -> [(scale, hidden-state vector)] of output embeddings
        for t, s in items:
            i = t.token if isinstance(t.token, int) else tokenizer.convert_tokens_to_ids(t.token)
            if i not in rows:  # a new token's first mention: its base row from the init regex
                new_token = isinstance(t.token, str) and t.token in new
                ids = matching_token_ids(t.init_regex, vocab, tokenizer0.vocab_size) if new_token and t.init_regex \
                    else []
                if new_token and t.init_regex and not ids:
                    log.warning("no vocabulary token matches the init regex %r; %s starts from zeros", t.init_regex,
                                t.token)
                rows[i] = new_token_row(ids, base) if new_token else base[i].float()
            if t.output:
                outputs.setdefault(i, []).append((s, t.vector))
            elif s != 0:
                rows[i] = rows[i] + s * t.vector.to(rows[i])
        weight = torch.cat([base, base.new_zeros(max(0, len(tokenizer) - base.shape[0]), base.shape[1])])
        for i, row in rows.items():
            weight[i] = row.to(weight.dtype)
        emb = nn.Embedding.from_pretrained(weight, freeze=True, padding_idx=emb0.padding_idx)
        self._base_text = (tokenizer0, emb0)
        te.model.set_input_embeddings(emb)
        te.tokenizer = tokenizer
        if outputs:
            self._output_hook = te.model.register_forward_hook(_output_embedding_hook(outputs), with_kwargs=True)

    def _restore_tokens(self) -> None:
        if self._output_hook is not None:
            self._output_hook.remove()
            self._output_hook = None
        if self._base_text is not None:
            tokenizer0, emb0 = self._base_text
            self.text_encoder.model.set_input_embeddings(emb0)
            self.text_encoder.tokenizer = tokenizer0
            self._base_text = None


def _output_embedding_hook(outputs: dict):
    """A forward hook on the CLIP text model: the last hidden state (what Stage C reads) at each position holding
    one of `outputs`' token ids becomes (1 − s)·h + s·vector, summed over the LoRAs that set it."""

    def hook(module, args, kwargs, out):
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None or not out.hidden_states:
            return out
        h = out.hidden_states[-1]
        new = h.float()
        for i, terms in outputs.items():
            where = (ids == i).unsqueeze(-1)
            for s, vector in terms:
                new = torch.where(where, (1 - s) * new + s * vector.to(new), new)
        out.hidden_states = (*out.hidden_states[:-1], new.to(h.dtype))
        return out

    return hook
