"""The training loop for Stage C, Stage B, Stage C LoRAs and Stage C ControlNets (the official `train/` scripts), and
latent consistency distillation of Stage C (LCM: a few-step student, by default a LoRA).

One process or many (torchrun: DDP, or FSDP2 for the big Stage C). All randomness that shapes a global batch
(timesteps, dropout masks, crops, one noise seed per sample) is drawn for the whole global batch from one seeded
generator and sliced per rank; each rank then draws only its own samples' noise from their seeds. So N ranks
compute the same losses as one process with the same global batch. A checkpoint (safetensors + JSON, no pickle)
holds the model, EMA, optimizer, adaptive loss buckets, every RNG and the data position, so a resumed run continues
exactly.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from .. import checkpoints, configs, diffusion, sampling
from ..errors import CheckpointError, InputError
from ..geometry import EFFNET_FACTOR, latent_sizes, round8
from ..images import resize
from ..settings import DEFAULTS, RELEASED_DECODER_GUIDANCE, RELEASED_SHIFTS
from ..models import StageA, StageB, StageC
from . import cache as cache_mod
from . import data as data_mod
from ..models.lora import (STAGE_C, TEXT_ENCODER, LayerDelta, LoRAAdapter, LoRAWeights, TokenEmbedding,
                           lora_targets, matching_token_ids, new_token_row)
from .config import ConfigError, TrainConfig, resume_differences
from .objectives import AdaptiveLossWeight, ema_update_, init_unet_, p2_weight, pyramid_noise, training_logsnr
from .statefile import read_state, write_state
from .storage import load_dtype, mmap_large_allocations, store_frozen
from .text import clip_tokenizer, encode_text, small_text_model

log = logging.getLogger("stablecascade.train")


# ---------------------------------------------------------------------------------------------- distributed
class Dist:
    """Rank/world from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); gloo on CPU, NCCL on GPU.

    `timeout_minutes` bounds every collective, barriers included: rank 0 alone writes checkpoints and exports
    while the other ranks wait at a barrier, which for the 3.6B Stage C can outlast NCCL's 10-minute default."""

    def __init__(self, timeout_minutes: float = 60):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
            self.owned = True
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) \
            if self.world > 1 and dist.get_backend() == "nccl" else torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True when `ok` holds on every rank (so all ranks take the same branch after a local check)."""
        if not self.enabled:
            return ok
        flag = torch.tensor([int(ok)], device=self.comm_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-rank tensor (same shape on every rank) in rank order."""
        if not self.enabled:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def close(self):
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def output_dir_problem(out: Path) -> Optional[str]:
    """Why training cannot write into `out` (not a folder, read-only, no permission), or None: checked before the
    models load, so a run never trains for hours and then fails at its first checkpoint."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as e:
        return (f"output_dir {out} cannot be written ({e.strerror or e}); choose a writable folder with "
                "--set output_dir=PATH")
    return None


def free_space_problem(out: Path, needed: int) -> Optional[str]:
    """Why a checkpoint of `needed` bytes will not fit in `out`'s free disk space, or None."""
    free = shutil.disk_usage(out).free
    if free >= needed:
        return None
    return (f"output_dir {out} has {free / 2**30:.2f} GiB free, but a checkpoint and the final export of this "
            f"model need about {needed / 2**30:.2f} GiB; free space there or choose another output_dir")


# ---------------------------------------------------------------------------------------------- model helpers
NANO_PARTS = {"stage_c": "prior/prior", "text_encoder": "prior/text_encoder", "stage_b": "decoder/decoder",
              "stage_a": "decoder/vqgan", "effnet": "nano_encoder.safetensors", "previewer": "previewer.safetensors"}


def nano_part(spec: Optional[str], part: str) -> Optional[str]:
    """"nano" names a part of the built-in nano model, so recipes for it need no paths; other specs pass through."""
    if spec != "nano":
        return spec
    from ..loading import NANO_DIR

    return str(NANO_DIR / NANO_PARTS[part])


def nano_manifest() -> dict:
    """The built-in nano model's model.json (what it was trained at)."""
    from ..loading import NANO_DIR

    return checkpoints.read_bundle_manifest(NANO_DIR / "model.json")


def effnet_compression(cfg: TrainConfig) -> Optional[float]:
    """Image pixels per Stage C latent cell: the config's, else the built-in nano model's when its encoder is used
    (model.json), else None (the effnet sees images as they are, 32 px per cell)."""
    if cfg.compression is not None or cfg.effnet != "nano":
        return cfg.compression
    return nano_manifest().get("compression")


def recorded_settings(spec: Optional[str], kind: str) -> dict:
    """What a model to train on says of itself: {"prediction": "eps" or "v", "shift": the schedule shift it samples
    at} as far as the built-in nano's model.json or our trainer's metadata in a safetensors file record them; {}
    for a new model or the released files."""
    if spec == "nano":
        manifest, i = nano_manifest(), 0 if kind == "stage_c" else 1
        return {"prediction": manifest.get("predictions", ("eps", "eps"))[i], "shift": float(manifest["shifts"][i])}
    if spec and not spec.startswith("new:"):
        return {k: v for k, v in sampling.read_model_metadata(spec).items() if k in ("prediction", "shift")}
    return {}


def build_or_load(spec: str, kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """"new:<config>" -> a freshly initialised model of a named config (float32); "nano" -> the built-in nano
    model's part; otherwise a checkpoint path, read in `dtype` one tensor at a time."""
    if spec.startswith("new:"):
        name = spec[4:]
        if kind == "stage_c":
            return init_unet_(StageC(configs.STAGE_C[name]))
        if kind == "stage_b":
            return init_unet_(StageB(configs.STAGE_B[name]))
        if kind == "stage_a":
            return StageA(configs.STAGE_A[name])
        raise ValueError(f"cannot create a new {kind}")
    return checkpoints.load_component(nano_part(spec, kind), kind, dtype=dtype)


def load_effnet(spec: Optional[str], dtype: torch.dtype = torch.float32) -> Optional[nn.Module]:
    """"nano" is the built-in nano model's trained encoder; "nano:<file>" another NanoEncoder; else an official
    EfficientNet file."""
    if spec is None:
        return None
    if spec == "nano" or spec.startswith("nano:"):
        from ..models.effnet import load_nano_encoder

        return load_nano_encoder(nano_part(spec, "effnet") if spec == "nano" else spec.split(":", 1)[1])
    return checkpoints.load_official(spec, "effnet", dtype=dtype)


def load_training_text_encoder(spec: Optional[str], tokenizer: Optional[str] = None,
                               dtype: torch.dtype = torch.float32):
    """(tokenizer, model) in `dtype`, whatever dtype the file stores (token embeddings and text-encoder LoRAs
    train in float32 over it): "tiny" is the seeded 32-wide test model, anything else a transformers folder."""
    if spec is None:
        return None
    if spec == "tiny":
        return clip_tokenizer(), small_text_model()
    from ..conditioning import load_text_encoder

    te = load_text_encoder(nano_part(spec, "text_encoder"), tokenizer, dtype=dtype)
    return te.tokenizer, te.model


def load_imagenet_backbone(backbone: nn.Module, path: Optional[str]) -> None:
    """Start an effnet-bottleneck ControlNet from torchvision's ImageNet EfficientNetV2-S features, as the released
    ControlNets were: from `path` (torchvision's .pth, read with torch's tensors-only loader, or a safetensors copy)
    or, without one, from torchvision's download cache. A stem conv of another input width stays random."""
    from torchvision.models import EfficientNet_V2_S_Weights

    if path is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / EfficientNet_V2_S_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
        if not cached.is_file():
            log.warning("the ControlNet's EfficientNet backbone starts from RANDOM weights: torchvision's ImageNet "
                        "efficientnet_v2_s weights are not at %s; set controlnet_backbone_weights=PATH to use them",
                        cached)
            return
        path = str(cached)
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"controlnet_backbone_weights: {file} not found")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:  # weights_only: tensors and containers only, never code
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader error means the same thing to the user
        raise CheckpointError(f"controlnet_backbone_weights: {file} cannot be read ({e})") from None
    own = backbone.state_dict()
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    usable = {k: v for k, v in features.items() if k in own and own[k].shape == v.shape}
    random_left = sorted(set(own) - set(usable))
    if len(random_left) > 1:  # at most the stem conv of a control input that is not RGB
        raise CheckpointError(f"controlnet_backbone_weights: {file} is not torchvision's efficientnet_v2_s "
                              f"(no match for {random_left[:3]}...)")
    backbone.load_state_dict(usable, strict=False)
    log.info("ControlNet backbone: ImageNet EfficientNetV2-S weights from %s%s", file,
             f" ({random_left[0]} random: the control input is not RGB)" if random_left else "")


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute every U-Net block's activations in the backward pass (memory for compute)."""
    from torch.utils.checkpoint import checkpoint

    for level in (*model.down_blocks, *model.up_blocks):
        for block in level:
            forward = block.forward

            def wrapped(*args, _f=forward, **kw):
                if torch.is_grad_enabled():
                    return checkpoint(_f, *args, use_reentrant=False, **kw)
                return _f(*args, **kw)

            block.forward = wrapped


def set_dropout(model: nn.Module, p: float) -> None:
    from ..models.blocks import MultiheadAttention

    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(m, MultiheadAttention):
            m.dropout = p


class TokenDelta(nn.Module):
    """Learned additions to selected rows of the token-embedding matrix (a parametrization), on its device."""

    def __init__(self, indices: list[int], hidden: int, device):
        super().__init__()
        self.register_buffer("indices", torch.tensor(indices, dtype=torch.long, device=device))
        self.delta = nn.Parameter(torch.zeros(len(indices), hidden, device=device))

    def forward(self, w):
        return w.index_add(0, self.indices, self.delta.to(w.dtype))


def _is_new_token(token: str) -> bool:
    return (token.startswith("[") and token.endswith("]")) or (token.startswith("<") and token.endswith(">"))


class LoRAModel(nn.Module):
    """What LoRA training optimises: LoRA factors on the chosen layers of Stage C (`lora_layers`) and of the text
    encoder (`lora_text_layers`), the inference adapter (`models.lora.LoRAAdapter`) with trainable factors, and the
    rows of the trained tokens; its forward runs the frozen, eval-mode Stage C and text encoder through them.
    Everything is built on the device of the weights it changes. The file format of the export is decided here,
    before training: official when it can hold every layer, kohya otherwise (`lora_format` may insist on one)."""

    def __init__(self, stage_c: nn.Module, text_model, tokenizer, cfg: TrainConfig,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.__dict__["stage_c"], self.__dict__["text_model"], self.tokenizer = stage_c, text_model, tokenizer
        generator = generator or torch.Generator().manual_seed(cfg.seed)
        self.base_vocab = len(tokenizer)
        self.tokens: list[tuple] = []  # (token str or id, init regex, id)
        self.init_rows: dict[int, torch.Tensor] = {}  # new token id -> its starting row (float32)
        self.tokens_delta = None
        if cfg.train_tokens:
            self._prepare_tokens(cfg.train_tokens)
        rank, alpha = cfg.lora_rank, cfg.lora_alpha if cfg.lora_alpha is not None else 1.0
        self.scales = {"lora": 1.0}  # read live by every layer: 0 runs the base models (`base_only`)
        self.layers = nn.ModuleDict()
        self.targets: list[tuple[str, str, str]] = []  # (model, module, parameter) per entry of self.layers
        for which, model, layers in ((STAGE_C, stage_c, cfg.lora_layers), (TEXT_ENCODER, text_model,
                                                                            cfg.lora_text_layers)):
            chosen = lora_targets(model, layers, which) if layers else []
            if layers and not chosen:
                raise ConfigError(f"lora_{'text_' if which == TEXT_ENCODER else ''}layers: {layers!r} matches no "
                                  f"layer of the {which.replace('_', ' ')}")
            for module, param in chosen:
                self._add_layer(which, model, module, param, rank, alpha / rank, generator)
        if not self.targets and self.tokens_delta is None:
            raise ConfigError("a LoRA run needs lora_layers, lora_text_layers or train_tokens")
        self.export_format = self._export_format(cfg.lora_format)

    def _add_layer(self, which, model, module, param, rank, scale, generator):
        """A LoRA on `module.param`: down starts at zero, up ~ N(0, 1), as the official LoRA (drawn on the CPU)."""
        from torch.nn.utils import parametrize

        m = model.get_submodule(module)
        w = getattr(m, param)
        down = torch.zeros(rank, *w.shape[1:])
        up = torch.randn(w.shape[0], rank, *[1] * (w.dim() - 2), generator=generator)
        adapter = LoRAAdapter([("lora", LayerDelta(which, module, param, down, up, scale))], self.scales, w.device,
                              trainable=True)
        self.layers[str(len(self.targets))] = adapter
        self.targets.append((which, module, param))
        parametrize.register_parametrization(m, param, adapter)

    def _prepare_tokens(self, entries):
        from torch.nn.utils import parametrize

        emb = self.text_model.get_input_embeddings()
        base = emb.weight.detach()
        vocab = self.tokenizer.get_vocab()
        ids, new_rows = [], []
        for token, init in entries:
            if _is_new_token(token):
                if token in vocab:
                    raise ConfigError(f"train_tokens: {token!r} is already in the tokenizer's vocabulary")
                init_ids = matching_token_ids(init, vocab, self.base_vocab) if init else []
                if init and not init_ids:
                    raise ConfigError(f"train_tokens: the init regex {init!r} of {token!r} matches no vocabulary token "
                                      "(they look like 'dog</w>'); fix it, or use null to start from zeros")
                self.tokenizer.add_tokens([token])
                new_id = self.tokenizer.convert_tokens_to_ids(token)
                new_rows.append(new_token_row(init_ids, base))
                self.init_rows[new_id] = new_rows[-1]
                ids.append(new_id)
                self.tokens.append((token, init, new_id))
            else:
                matched = matching_token_ids(token, vocab, self.base_vocab)
                if not matched:
                    raise ConfigError(f"train_tokens: {token!r} matches no vocabulary token (they look like "
                                      "'dog</w>'); to add a new token write it in brackets, e.g. [mytoken]")
                ids += matched
                self.tokens += [(i, None, i) for i in matched]
        if new_rows:
            weight = torch.cat([base, torch.stack(new_rows).to(base.dtype)])
            emb = nn.Embedding.from_pretrained(weight, freeze=True, padding_idx=emb.padding_idx)
            self.text_model.set_input_embeddings(emb)
        self.tokens_delta = TokenDelta(ids, base.shape[1], base.device)
        parametrize.register_parametrization(emb, "weight", self.tokens_delta)

    def _export_format(self, wanted: str) -> str:
        from ..lora_formats import official_fits

        fits = official_fits(self.targets, self.stage_c)
        vocab_rows = [t for t, _, _ in self.tokens if isinstance(t, int)]
        if wanted == "official" and not fits:
            other = next(t for t in self.targets if not official_fits([t], self.stage_c))
            raise ConfigError(f"lora_format: official holds only Stage C attention layers (lora_layers: attention, no "
                              f"lora_text_layers), but {other[1]} of the {other[0].replace('_', ' ')} is trained; use "
                              "lora_format: kohya (or auto)")
        fmt = "official" if wanted == "auto" and fits else ("kohya" if wanted == "auto" else wanted)
        if fmt == "kohya" and vocab_rows:
            raise ConfigError("train_tokens that change existing vocabulary rows can only be saved in the official "
                              "LoRA format, which holds only Stage C attention layers; train new tokens ([name]) "
                              "instead, or use lora_layers: attention without lora_text_layers")
        return fmt

    def param_groups(self, lr: float, token_lr: Optional[float]) -> list[dict]:
        """The LoRA factors at `lr`; the token rows at `token_lr` (default `lr`), as a "lr_scale" the schedule keeps."""
        groups = [{"params": [p for p in self.layers.parameters()]}] if self.targets else []
        if self.tokens_delta is not None:
            groups.append({"params": [self.tokens_delta.delta], "lr_scale": (token_lr or lr) / lr})
        return groups

    @contextlib.contextmanager
    def base_only(self):
        """The models without the LoRA (exactly: a layer at scale 0 uses its stored weight), e.g. as a teacher."""
        self.scales["lora"] = 0.0
        try:
            yield
        finally:
            self.scales["lora"] = 1.0

    def trainable(self) -> nn.Module:
        """The trained parts alone (same state-dict keys as this module), e.g. to keep an EMA of them."""
        return nn.ModuleDict(dict(self.named_children()))

    def encode(self, prompts, device):
        return encode_text(self.text_model, self.tokenizer, prompts, device)

    def forward(self, x, r, prompts, clip_img):
        text, pooled = self.encode(prompts, x.device)
        return self.stage_c(x, r, clip_text=text, clip_text_pooled=pooled, clip_img=clip_img)

    def lora_weights(self, source: Optional[nn.Module] = None) -> LoRAWeights:
        """The trained LoRA (of `source`, e.g. the EMA from `trainable()`, default this module) as the files hold it:
        for the kohya format new tokens carry their whole row (starting row + learned change)."""
        source = source or self
        layers = []
        for (which, module, param), adapter in zip(self.targets, source.layers.values()):
            down, up = adapter.factors()
            layers.append(LayerDelta(which, module, param, down.detach().cpu(), up.detach().cpu(),
                                     scale=adapter.items[0][1]))
        tokens = []
        delta = getattr(source, "tokens_delta", None)
        if delta is not None:
            for (token, init, i), vec in zip(self.tokens, delta.delta.detach().float().cpu()):
                if self.export_format == "kohya":
                    tokens.append(TokenEmbedding(token, self.init_rows[i].cpu() + vec))
                else:
                    tokens.append(TokenEmbedding(token, vec, init))
        return LoRAWeights(layers=layers, tokens=tokens, vocab_size=self.base_vocab)

    def save(self, path, source: Optional[nn.Module] = None, metadata: Optional[dict] = None) -> Path:
        from ..lora_formats import save_lora

        save_lora(path, self.lora_weights(source), self.stage_c, format=self.export_format, metadata=metadata)
        return Path(path)


# ---------------------------------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, *, parts: Optional[dict] = None):
        """`parts` may supply ready models instead of config paths: stage_c, stage_b, stage_a, effnet, previewer,
        text (a (tokenizer, model) pair), image_encoder (a `conditioning.ImageEncoder`), controlnet."""
        self.cfg, parts = cfg, dict(parts or {})
        self.dist = Dist(cfg.dist_timeout_minutes)
        if cfg.device:
            self.device = torch.device(cfg.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", self.dist.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.device.type == "cpu":
            mmap_large_allocations()  # else the heap fragments and a step's resident memory keeps growing
        self.out = Path(cfg.output_dir)
        self._agree(output_dir_problem(self.out) if self.dist.main else None)  # before any model is loaded
        self.local_batch = cfg.batch_size // cfg.grad_accum_steps
        if self.local_batch % self.dist.world:
            raise ValueError(f"batch_size {cfg.batch_size} / grad_accum_steps {cfg.grad_accum_steps} = "
                             f"{self.local_batch} is not divisible by the {self.dist.world} ranks")
        self.micro = self.local_batch  # global micro-batch
        self.local_batch //= self.dist.world
        torch.manual_seed(cfg.seed)  # same fresh weights on every rank
        random.seed(cfg.seed)
        self._setup_models(parts)
        self._setup_data(parts)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # global-batch randomness (same on every rank)
        torch.manual_seed(cfg.seed * 1000 + 17 + self.dist.rank)  # model dropout: per rank
        self.loss_weight = AdaptiveLossWeight(cfg.adaptive_buckets, beta=cfg.adaptive_beta) \
            if cfg.loss_weight == "adaptive" else None
        params = self.trained.param_groups(cfg.lr, cfg.token_lr) if isinstance(self.trained, LoRAModel) else \
            [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = self._make_optimizer(params)
        self.step = 0
        self.history: list[dict] = []
        self._agree(free_space_problem(self.out, self._checkpoint_bytes()) if self.dist.main else None)
        self._resume()

    @property
    def compute_dtype(self) -> torch.dtype:
        """What the models' matmuls run in: bf16 for `dtype: bf16`, fp16 for frozen models stored in fp16, else
        float32 (frozen weights stored in bf16 or int8 are then expanded to float32 one layer at a time)."""
        if self.cfg.dtype == "bf16":
            return torch.bfloat16
        return torch.float16 if self.cfg.frozen_dtype == "fp16" else torch.float32

    @property
    def autocast(self):
        """A fresh autocast context in `compute_dtype` (norms and the trained fp32 parameters' updates stay fp32)."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()  # an autocast of a device without one fails even when disabled
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _make_optimizer(self, params) -> torch.optim.Optimizer:
        cfg = self.cfg
        kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(params, **kw)
        if self.device.type != "cuda":
            raise InputError(f"optimizer adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit states), but training runs "
                             f"on {self.device}: use optimizer: adamw")
        try:
            import bitsandbytes
        except ImportError:
            raise InputError("optimizer adamw8bit needs the bitsandbytes package: pip install bitsandbytes "
                             "(or use optimizer: adamw)") from None
        return bitsandbytes.optim.AdamW8bit(params, **kw)

    # ----------------------------------------------------------------------------------------- setup
    def _setup_models(self, parts):
        cfg, task = self.cfg, self.cfg.task
        trained_name = {"c": "stage_c", "b": "stage_b"}.get(task)
        # frozen models are read in their storage dtype (a bf16 Stage C never exists in float32 here)
        dtype = {name: torch.float32 if name == trained_name else load_dtype(cfg.frozen_dtype)
                 for name in ("stage_c", "stage_b", "stage_a")}
        self.stage_c = parts.get("stage_c") or (
            build_or_load(cfg.stage_c, "stage_c", dtype["stage_c"]) if cfg.stage_c else None)
        self.stage_b = parts.get("stage_b") or (
            build_or_load(cfg.stage_b, "stage_b", dtype["stage_b"]) if cfg.stage_b else None)
        self.stage_a = parts.get("stage_a") or (
            build_or_load(cfg.stage_a, "stage_a", dtype["stage_a"]) if cfg.stage_a else None)
        self.effnet = parts.get("effnet") or load_effnet(cfg.effnet, load_dtype(cfg.frozen_dtype))
        self.compression = effnet_compression(cfg)
        kind = cfg.trains
        settings = recorded_settings(getattr(cfg, kind), kind)
        recorded = settings.get("prediction")
        # a consistency student samples on its teacher's schedule: the shift the teacher's file records, if any
        self.teacher_shift = settings.get("shift") if task == "lcm" else None
        if cfg.target and recorded and cfg.target != recorded:
            log.warning("%s predicts %s (its file says so) but target is %s: training changes what it predicts",
                        kind, recorded, cfg.target)
        self.target = cfg.target or recorded or "eps"
        self.previewer = parts.get("previewer") or (
            checkpoints.load_official(nano_part(cfg.previewer, "previewer"), "previewer", dtype=torch.float32)
            if cfg.previewer else None)
        text = parts.get("text") or load_training_text_encoder(cfg.text_encoder, cfg.tokenizer,
                                                               load_dtype(cfg.frozen_dtype))
        self.tokenizer, self.text_model = text if text else (None, None)
        self.image_encoder = parts.get("image_encoder")
        if self.image_encoder is None and cfg.image_encoder:
            from ..conditioning import load_image_encoder

            self.image_encoder = load_image_encoder(cfg.image_encoder)
        needs = {"c": ("stage_c", "effnet", "text_model"), "b": ("stage_b", "stage_a", "effnet", "text_model"),
                 "lora": ("stage_c", "effnet", "text_model"), "controlnet": ("stage_c", "effnet", "text_model"),
                 "lcm": ("stage_c", "effnet", "text_model") if cfg.lcm_stage == "c" else
                 ("stage_b", "stage_a", "effnet", "text_model")}[task]
        for name in needs:
            if getattr(self, name) is None:
                raise ValueError(f"training task {task!r} needs {name.replace('text_model', 'text_encoder')} "
                                 "(set it in the config)")
        # a full-weight consistency student starts as a float32 copy of the teacher, before the teacher is frozen
        student = copy.deepcopy(getattr(self, cfg.trains)).float() if task == "lcm" and cfg.lcm_student == "full" \
            else None
        for name in ("stage_c", "stage_b", "stage_a", "effnet", "previewer", "text_model"):
            m = getattr(self, name)
            if m is not None:
                m.to(self.device).eval().requires_grad_(False)
                if name != trained_name:
                    store_frozen(m, cfg.frozen_dtype, self.compute_dtype)
        if cfg.gradient_checkpointing:  # the trained U-Net, or the frozen Stage C that LoRA/ControlNet grads cross
            enable_checkpointing(student if student is not None else getattr(self, trained_name or "stage_c"))
        if task in ("c", "b"):
            trained = self.stage_c if task == "c" else self.stage_b
            if cfg.model_dropout is not None:
                set_dropout(trained, cfg.model_dropout)
        elif student is not None:
            trained = student
        elif task in ("lora", "lcm"):
            trained = LoRAModel(self.stage_c, self.text_model, self.tokenizer, cfg)
            if self.dist.main:
                counts = {w: sum(t[0] == w for t in trained.targets) for w in (STAGE_C, TEXT_ENCODER)}
                log.info("LoRA on %d Stage C and %d text-encoder layers, %d trained tokens; it will be saved in the %s "
                         "format", counts[STAGE_C], counts[TEXT_ENCODER], len(trained.tokens), trained.export_format)
        else:
            trained = parts.get("controlnet") or self._controlnet()
            trained.to(self.device)
        trained.train().requires_grad_(True)
        if isinstance(trained, LoRAModel):
            for p in (*self.stage_c.parameters(), *self.text_model.parameters()):
                p.requires_grad_(False)
            for p in trained.parameters():
                p.requires_grad_(True)
        self.trained = trained
        self.ema = None
        if cfg.ema_beta is not None:
            averaged = trained.trainable() if isinstance(trained, LoRAModel) else trained  # not the frozen base
            self.ema = _strip_checkpointing(copy.deepcopy(averaged)).requires_grad_(False)
        if self.image_encoder is not None:
            self.image_encoder.model.to(self.device)
        self.net = self._wrap(trained)

    def _controlnet(self) -> nn.Module:
        from ..controlnets import KINDS
        from ..models.controlnet import ControlNet, ControlNetConfig

        cfg = self.cfg
        if cfg.controlnet:
            return checkpoints.load_controlnet(cfg.controlnet, dtype=torch.float32)
        base = KINDS[cfg.controlnet_kind].config
        calls = self.stage_c.resblock_calls
        blocks = cfg.controlnet_blocks or (list(base.proj_blocks) if calls == 64 else
                                           sorted({0, calls // 4, calls // 2, calls - 1}))
        cnet = ControlNet(ControlNetConfig(c_in=base.c_in, c_proj=self.stage_c.config.c_hidden[0],
                                           proj_blocks=tuple(blocks),
                                           bottleneck_mode=cfg.controlnet_bottleneck or base.bottleneck_mode))
        if cnet.config.bottleneck_mode == "effnet":
            load_imagenet_backbone(cnet.backbone, cfg.controlnet_backbone_weights)
        return cnet

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return model
        dev = [self.device.index] if self.device.type == "cuda" else None
        if self.cfg.use_fsdp:
            # FSDP2 shards in place and keeps every module's class, so the U-Net's isinstance dispatch still works;
            # each block is one unit (its condition keys/values are computed inside it), the EMA copy is sharded
            # alike so that its update stays local to each rank's shard.
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            from ..models.blocks import AttnBlock, ResBlock, TimestepBlock

            policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if self.cfg.dtype == "bf16" \
                else MixedPrecisionPolicy()
            for module in (model, self.ema):
                if module is None:
                    continue
                for block in module.modules():
                    if isinstance(block, (ResBlock, AttnBlock, TimestepBlock)):
                        fully_shard(block, mp_policy=policy, reshard_after_forward=False)
                fully_shard(module, mp_policy=policy, reshard_after_forward=False)
            return model
        return nn.parallel.DistributedDataParallel(model, device_ids=dev)

    def _setup_data(self, parts):
        cfg = self.cfg
        source = parts.get("data")
        if source is None:
            if not cfg.data:
                raise ValueError("no training data: set `data` to image folders and/or .tar shards")
            source = data_mod.ImageSource(data_mod.index_sources(cfg.data, cfg.caption_key))
        self.source = source
        if cfg.multi_aspect == ["auto"]:
            sizes = data_mod.auto_bucket_sizes(source, cfg.image_size, cfg.bucket_min_size or cfg.image_size // 2,
                                               cfg.bucket_max_size or cfg.image_size * 2, cfg.bucket_factor)
            if self.dist.main:
                log.info("buckets from the data (h x w): %s", ", ".join(f"{h}x{w}" for h, w in sizes))
        else:
            sizes = data_mod.bucket_sizes(cfg.image_size, cfg.multi_aspect, cfg.bucket_factor)
        # cached latents are centre crops of each image's nearest bucket: no random bucket choice then
        jitter = 0.0 if cfg.cache_latents else cfg.bucket_random_ratio
        self.sampler = data_mod.Sampler(source, self.micro, sizes, seed=cfg.seed, random_ratio=jitter)
        self.skipped = self.sampler.skipped
        rule = data_mod.CaptionRule(cfg.shuffle_tags, cfg.keep_tokens, cfg.tag_separator, cfg.seed)
        if cfg.cache_latents and self.image_encoder is not None and cfg.image_embed_prob > 0:
            raise ValueError("cache_latents keeps no pixels for the CLIP image encoder: set image_embed_prob: 0 "
                             "or cache_latents: false")
        latents, keys = self._latent_cache(sizes) if cfg.cache_latents else (None, None)
        self.text_cache = None
        if cfg.cache_text:
            self.text_cache = cache_mod.TextCache(self._cache_folder("text", self.text_model), self._encode_text)
        reader = data_mod.BatchReader(source, self._rank_slice(), rule, latents, keys, self._latent_names())
        self.loader = data_mod.Loader(self.sampler, reader, cfg.num_workers, cfg.prefetch_batches)

    def _cache_folder(self, kind: str, model: nn.Module) -> "cache_mod.DiskCache":
        root = Path(self.cfg.cache_dir) if self.cfg.cache_dir else self.out / "cache"
        # the autocast the encoder runs under changes its outputs as much as its weights do
        how = f"dtype={self.cfg.dtype}:frozen={self.cfg.frozen_dtype}" + (
            f":compression={self.compression}" if self.compression else "") + (
            f":effnet_resize={self.cfg.effnet_resize[0]}" if kind == "latents" and self.cfg.trains == "stage_b" else "")
        return cache_mod.DiskCache(root / f"{kind}-{cache_mod.fingerprint(model, how)}")

    def _latent_names(self) -> tuple:
        """What a cached image holds: Stage C's latent (`latent`), or for Stage B its Stage A latent (`latent`) and
        the Stage C latent it is conditioned on (`effnet`)."""
        return ("latent", "effnet") if self.cfg.trains == "stage_b" else ("latent",)

    def _latent_cache(self, sizes):
        def encode(images):
            images = images.to(self.device)
            with torch.no_grad(), self.autocast:
                if self.cfg.trains == "stage_b":
                    return {"latent": self.stage_a.encode(images).float(),
                            "effnet": self._stage_b_effnet(images, self.cfg.effnet_resize[0]).float()}
                return {"latent": self._encode_c(images).float()}

        encoders = nn.ModuleList([self.effnet, self.stage_a]) if self.cfg.trains == "stage_b" else self.effnet
        cache = self._cache_folder("latents", encoders)
        keys = cache_mod.precompute_latents(self.source, sizes, encode, self._latent_names(), cache,
                                            (self.dist.rank, self.dist.world), batch_size=self.micro)
        self.dist.barrier()
        return (cache_mod.DiskCache(cache.folder) if self.dist.enabled else cache), keys

    def _encode_text(self, prompts):
        with torch.no_grad(), self.autocast:
            text, pooled = encode_text(self.text_model, self.tokenizer, prompts, self.device)
        return text.float(), pooled.float()

    # ----------------------------------------------------------------------------------------- conditioning
    def _text(self, prompts):
        if self.text_cache is not None:
            return self.text_cache.encode(prompts, self.device)
        with torch.no_grad():
            return encode_text(self.text_model, self.tokenizer, prompts, self.device)

    def _rank_slice(self) -> slice:
        return slice(self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch)

    def _weights(self, lam):
        if self.loss_weight is not None:
            return self.loss_weight(lam)
        if self.cfg.loss_weight == "p2":
            return p2_weight(lam)
        return torch.ones_like(lam)

    def _noise(self, shape, pyramid=False):
        """This rank's share of the global batch's noise. The global generator draws one seed per sample, and each
        sample's noise comes from its own seed: the same whatever the number of ranks, drawn only by its rank."""
        seeds = torch.randint(2**62, (self.micro,), generator=self.gen)[self._rank_slice()].tolist()
        parts = []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            eps = pyramid_noise((1, *shape), g) if pyramid else torch.randn((1, *shape), generator=g)
            if self.cfg.offset_noise > 0:
                eps = eps + self.cfg.offset_noise * torch.randn(1, shape[0], 1, 1, generator=g)
            parts.append(eps)
        return torch.cat(parts)

    def _loss(self, images: Optional[torch.Tensor], captions: list, cached: Optional[dict] = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weighted loss to backpropagate (local mean), raw per-sample losses (local), λ (local)). `cached` (the
        latents by name, from the cache) replaces `images`."""
        cfg, task, sl, g, n = self.cfg, self.cfg.task, self._rank_slice(), self.gen, self.micro
        images = None if images is None else images.to(self.device)
        drop_text = (torch.rand(n, generator=g) < cfg.caption_dropout)[sl]
        captions = ["" if d else c for c, d in zip(captions, drop_text.tolist())]
        if task == "lcm":
            (t, t_earlier), (lam, lam_earlier) = self._lcm_levels()
        else:
            lam = training_logsnr(n, g, cfg.noise_shift)[sl].to(self.device)
        with torch.no_grad(), self.autocast:
            if cfg.trains == "stage_b":
                distil = task == "lcm"  # the teacher sees the whole effnet latent, and its unconditional half
                keep_effnet = (torch.rand(n, generator=g) >= cfg.effnet_dropout)[sl]
                f = cfg.effnet_resize[0] + (cfg.effnet_resize[1] - cfg.effnet_resize[0]) * torch.rand((), generator=g).item()
                if cached is None:
                    latents, effnet = self.stage_a.encode(images), self._stage_b_effnet(images, f)
                else:
                    latents, effnet = cached["latent"].to(self.device), cached["effnet"].to(self.device)
                if not distil:
                    effnet = effnet * keep_effnet.view(-1, 1, 1, 1).to(self.device)
                _, pooled = self._text(captions)
                cond = dict(effnet=effnet, clip=pooled)
                if distil:
                    _, neg_pooled = self._text([""] * len(captions))
                    uncond = dict(effnet=torch.zeros_like(effnet), clip=neg_pooled)
                # sampling starts from white noise, so distillation diffuses with it
                eps = self._noise(latents.shape[1:], pyramid=cfg.pyramid_noise and not distil).to(self.device)
            else:
                use_img = (torch.rand(n, generator=g) > 1 - cfg.image_embed_prob)[sl]
                latents = self._encode_c(images) if cached is None else cached["latent"].to(self.device)
                c_img = self.stage_c.config.c_clip_img
                clip_img = torch.zeros(len(captions), 1, c_img, device=self.device)
                if self.image_encoder is not None and use_img.any():
                    emb = self.image_encoder(images).to(self.device, torch.float32)
                    clip_img = torch.where(use_img.view(-1, 1, 1).to(self.device), emb, clip_img)
                eps = self._noise(latents.shape[1:]).to(self.device)
                if task != "lora":
                    text, pooled = self._text(captions)
                    cond = dict(clip_text=text, clip_text_pooled=pooled, clip_img=clip_img)
                if task == "lcm":
                    neg_text, neg_pooled = self._text([""] * len(captions))
                    uncond = dict(clip_text=neg_text, clip_text_pooled=neg_pooled, clip_img=torch.zeros_like(clip_img))
                control = self._control(images) if task == "controlnet" else None
        latents, eps = latents.float(), eps.float()
        noised = diffusion.diffuse(latents, eps, lam)
        if task == "lcm":
            return self._consistency_loss(noised, (t, t_earlier), (lam, lam_earlier), captions, cond, uncond)
        tgt = diffusion.target(latents, eps, lam, self.target)
        r = diffusion.noise_cond(lam)
        with self.autocast:
            if task == "lora":
                pred = self.net(noised, r, captions, clip_img)
            elif task == "controlnet":
                cnet = self.net(control)
                pred = self.stage_c(noised, r, cnet=cnet, **cond)
            else:
                pred = self.net(noised, r, **cond)
        raw = F.mse_loss(pred.float(), tgt, reduction="none").mean(dim=(1, 2, 3))
        weighted = (raw * self._weights(lam)).mean()
        return weighted, raw.detach(), lam

    # ------------------------------------------------------------------------------ consistency distillation
    def _lcm_levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Schedule positions t and levels λ (each (2, local batch): the student's, then one teacher step earlier)
        for this rank's samples: start positions t = j·k/T for j = 1..T/k (k = lcm_skip, T = lcm_timesteps), the
        earlier ones at t - k/T, on the schedule the stage samples at (its shift), so the grid holds the few-step
        sampler's own levels when T/k is a multiple of its steps."""
        cfg = self.cfg
        j = torch.randint(1, cfg.lcm_timesteps // cfg.lcm_skip + 1, (self.micro,), generator=self.gen)[self._rank_slice()]
        start = j * cfg.lcm_skip
        t = torch.stack([start, start - cfg.lcm_skip]).float() / cfg.lcm_timesteps
        return t.to(self.device), diffusion.logsnr(t, self.sampling_shift()).to(self.device)

    def _teacher(self):
        """The frozen stage as it was loaded (a LoRA student switched off)."""
        return self.trained.base_only() if isinstance(self.trained, LoRAModel) else contextlib.nullcontext()

    def _student_prediction(self, x, r, captions, cond):
        if isinstance(self.trained, LoRAModel):
            return self.net(x, r, captions, cond["clip_img"])
        return self.net(x, r, **cond)

    def _target_prediction(self, x, r, captions, cond):
        """The target network: the student's architecture with the EMA weights."""
        if isinstance(self.trained, LoRAModel):
            return torch.func.functional_call(self.trained, dict(self.ema.named_parameters()),
                                              (x, r, captions, cond["clip_img"]), strict=False)
        return self.ema(x, r, **cond)

    def _consistency_loss(self, noised, ts, lams, captions, cond, uncond):
        """LCM's loss: the student's consistency estimate at (t, λ) against the target network's at the level the
        teacher reaches from the same point in one guided DDIM step (its ODE solver in GDF terms)."""
        cfg, (t, t_earlier), (lam, lam_earlier) = self.cfg, ts, lams
        with torch.no_grad():
            teacher = self._guided(getattr(self, cfg.trains), cond, uncond, cfg.lcm_guidance)
            with self._teacher():
                x0, eps = diffusion.undiffuse(noised, lam, teacher(noised, diffusion.noise_cond(lam)), self.target)
            earlier = diffusion.diffuse(x0, eps, lam_earlier)
            with self.autocast:
                pred = self._target_prediction(earlier, diffusion.noise_cond(lam_earlier), captions, cond)
            aim, _ = sampling.consistency_x0(earlier, lam_earlier, t_earlier, pred.float(), self.target)
        with self.autocast:
            pred = self._student_prediction(noised, diffusion.noise_cond(lam), captions, cond)
        estimate, _ = sampling.consistency_x0(noised, lam, t, pred.float(), self.target)
        squared = (estimate - aim) ** 2
        if cfg.lcm_loss == "huber":
            squared = (squared + cfg.lcm_huber_c**2).sqrt() - cfg.lcm_huber_c
        raw = squared.mean(dim=(1, 2, 3))
        return (raw * self._weights(lam)).mean(), raw.detach(), lam

    def consistency_metadata(self) -> dict:
        """What an exported consistency student records: its stage, sampled at `lcm_steps` and `lcm_sample_guidance`
        (1: none, the teacher's guidance being distilled into it)."""
        cfg = self.cfg
        stage = "prior" if cfg.trains == "stage_c" else "decoder"
        return sampling.consistency_metadata(stage, cfg.lcm_steps, cfg.lcm_sample_guidance, cfg.lcm_guidance)

    def _control(self, images):
        from .. import controlnet_filters as cf

        kind, n, g, sl = self.cfg.controlnet_kind, self.micro, self.gen, self._rank_slice()
        if kind == "canny":
            return cf.canny_control(images.cpu()).to(self.device)
        if kind == "sr":
            return cf.sr_control(self.effnet, images, 0.5).to(self.device)
        # inpaint: random rectangles (the saliency-based masks need the saliency model's weights)
        h, w = images.shape[-2:]
        box = torch.rand(n, 4, generator=g)[sl]
        ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
        y0, x0 = (box[:, 0] * h * 0.6).long().view(-1, 1, 1), (box[:, 1] * w * 0.6).long().view(-1, 1, 1)
        y1, x1 = y0 + (h * (0.2 + 0.4 * box[:, 2])).long().view(-1, 1, 1), x0 + (w * (0.2 + 0.4 * box[:, 3])).long().view(-1, 1, 1)
        mask = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).float()[:, None]
        return cf.inpaint_control(images, mask.to(self.device))

    # ----------------------------------------------------------------------------------------- the loop
    def _lr(self) -> float:
        return self.cfg.lr * lr_factor(self.step, self.cfg.steps, self.cfg.warmup_steps, self.cfg.lr_schedule)

    def train_step(self) -> dict:
        cfg = self.cfg
        self.net.train()
        if cfg.task == "controlnet":
            self._set_backbone_eval()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self._lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        raws, lams = [], []
        for k in range(cfg.grad_accum_steps):
            item = next(self.loader)
            sync = self.dist.enabled and k < cfg.grad_accum_steps - 1 and hasattr(self.net, "no_sync")
            with self.net.no_sync() if sync else contextlib.nullcontext():
                loss, raw, lam = self._loss(item.images, item.captions, item.latents)
                (loss / cfg.grad_accum_steps).backward()
            raw, lam = self.dist.gather_cat(raw.float()), self.dist.gather_cat(lam.float())
            if self.loss_weight is not None:
                self.loss_weight.update(lam, raw)
            raws.append(raw)
            lams.append(lam)
        params = [p for p in self.net.parameters() if p.requires_grad]
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if hasattr(gnorm, "full_tensor"):  # FSDP2: a norm over every rank's shards
            gnorm = gnorm.full_tensor()
        self.optimizer.step()
        self.step += 1
        if self.ema is not None and self.step % cfg.ema_every == 0:
            beta = 0.0 if self.step <= cfg.ema_start else cfg.ema_beta
            ema_update_(self.ema, self._full_module(), beta)
        record = {"step": self.step, "loss": float(torch.cat(raws).mean()), "lr": lr, "grad_norm": float(gnorm),
                  "skipped": sum(self.sampler.skipped.values())}
        self.history.append(record)
        return record

    def _set_backbone_eval(self):
        for m in self.trained.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()

    def _full_module(self) -> nn.Module:
        return self.trained

    def fit(self, progress: bool = True) -> list[dict]:
        """Train to `steps`, with a progress bar (ETA) on the main rank when `progress`; log.jsonl and TensorBoard
        (`log_with`) get the loss (raw and smoothed), learning rate, grad norm and the sample grids."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        start, t0 = self.step, time.time()
        board = TrainLog(self.out, cfg.log_with) if self.dist.main else None
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (progress and self.dist.main), unit="step",
                   dynamic_ncols=True)
        try:
            while self.step < cfg.steps:
                rec = self.train_step()
                bar.update(1)
                if board is not None:
                    rec["loss_smooth"] = board.smooth(rec["loss"])
                    bar.set_postfix(loss=f"{rec['loss_smooth']:.4f}", lr=f"{rec['lr']:.2e}", refresh=False)
                if self.dist.main and (self.step % cfg.log_every == 0 or self.step == cfg.steps or self.step == start + 1):
                    rate = (self.step - start) / max(1e-9, time.time() - t0)
                    log.info("step %d/%d loss %.4f lr %.2e grad %.3f skipped %d (%.2f it/s)", self.step, cfg.steps,
                             rec["loss"], rec["lr"], rec["grad_norm"], rec["skipped"], rate)
                    board.write(rec)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step != cfg.steps:
                    self._sample_and_log(board)
            bar.close()
            self.export()
            self._sample_and_log(board)
        finally:
            bar.close()
            self.loader.close()
            if self.text_cache is not None:
                self.text_cache.cache.flush()
            if board is not None:
                board.close()
        self.dist.barrier()
        return self.history

    def _sample_and_log(self, board: Optional["TrainLog"]) -> None:
        with self.autocast:  # frozen models stored in bf16/fp16 run under autocast
            path = self.sample()
        if board is not None and path is not None:
            board.image(path, self.step)

    # ----------------------------------------------------------------------------------------- checkpoints
    # A checkpoint folder holds model.safetensors (+ ema.safetensors), optimizer.{json,safetensors},
    # state.{json,safetensors} (step, data position, loss buckets, history), rng_rank{r}.{json,safetensors},
    # config.json, and `done` once every part is written. Nothing in it is a pickle.
    def _agree(self, problem: Optional[str]) -> None:
        """Raise `problem` (found by rank 0) on every rank, so no rank waits forever at the next collective."""
        if not self.dist.all_ok(problem is None):
            raise CheckpointError(problem or "rank 0 stopped the run (its error says why)")

    def _full_state(self, module: nn.Module) -> dict:
        """`module`'s parameters and buffers as whole CPU tensors (under FSDP a collective; rank 0 gets them)."""
        if not self._sharded:
            return {k: v.detach().cpu() for k, v in module.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _checkpoint_bytes(self) -> int:
        """About what one checkpoint and the export take on disk: weights, EMA, AdamW's two moments, final files."""
        weights = sum(t.numel() * t.element_size() for t in self.trained.state_dict().values())
        return weights * (2 + 2 * (self.ema is not None) + 2)

    def _rng_state(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}  # per rank (dropout draws differ)
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _sampler_state(self) -> dict:
        """The sampler's position, with unreadable images named by file (and tar member), not by their index,
        which shifts when files are added to the data."""
        state = self.sampler.state_dict()
        state["bad"] = [[self.source.entries[i].source, self.source.entries[i].image] for i in state["bad"]]
        return state

    def save_checkpoint(self) -> Path:
        from safetensors.torch import save_file

        folder = self.out / "checkpoints" / f"step_{self.step:07d}"
        model_state = self._full_state(self.trained)
        ema_state = self._full_state(self.ema) if self.ema is not None else None
        optim_state = self._optimizer_state()
        problem = None
        if self.dist.main:
            try:
                if folder.exists():  # left by a save of this step that did not finish
                    shutil.rmtree(folder)
                folder.mkdir(parents=True)
                save_file({k: v.contiguous() for k, v in model_state.items()}, str(folder / "model.safetensors"))
                if ema_state is not None:
                    save_file({k: v.contiguous() for k, v in ema_state.items()}, str(folder / "ema.safetensors"))
                write_state(folder, "optimizer", optim_state)
                write_state(folder, "state", {
                    "step": self.step, "sampler": self._sampler_state(), "history": self.history,
                    "gen": self.gen.get_state(),  # the global-batch generator: the same on every rank
                    "loss_weight": self.loss_weight.state_dict() if self.loss_weight else None})
                (folder / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
            except (OSError, SafetensorError) as e:
                problem = str(e)
        self._check_saved(folder, problem)
        try:
            write_state(folder, f"rng_rank{self.dist.rank}", self._rng_state())
            problem = None
        except (OSError, SafetensorError) as e:
            problem = str(e)
        self._check_saved(folder, problem)
        if self.dist.main:
            (folder / "done").write_text("ok")
            kept = sorted(p.parent for p in (self.out / "checkpoints").glob("step_*/done"))
            for old in kept[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return folder

    def _check_saved(self, folder: Path, problem: Optional[str]) -> None:
        """A failed write (disk full, read-only): drop the partial folder and stop with the way back."""
        if self.dist.all_ok(problem is None):
            return
        if self.dist.main:
            shutil.rmtree(folder, ignore_errors=True)
        done = sorted(p.parent for p in (self.out / "checkpoints").glob("step_*/done"))
        back = (f"the run is kept up to its last checkpoint {done[-1]}, and rerunning the same command resumes "
                "from there" if done else "no earlier checkpoint exists, so a rerun starts over")
        raise CheckpointError(f"cannot write the checkpoint {folder}: {problem or 'another rank failed to write'}. "
                              f"Free disk space in {self.out} (or make it writable); {back}.")

    def _optimizer_state(self) -> dict:
        """The optimizer's state; under FSDP gathered whole (keyed by parameter name) on rank 0."""
        if not self._sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.trained, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _resume_candidates(self) -> list[Path]:
        r = self.cfg.resume
        if r == "never":
            return []
        if r != "auto":
            if not (Path(r) / "done").is_file():
                raise CheckpointError(f"resume={r}: not a finished checkpoint folder (it has no `done` file); give "
                                      f"one of {self.out / 'checkpoints'}/step_*, or resume=auto / resume=never")
            return [Path(r)]
        return sorted((p.parent for p in (self.out / "checkpoints").glob("step_*/done")), reverse=True)

    def _read_checkpoint(self, folder: Path) -> dict:
        """Every file of `folder` this rank needs, read and checked before any state is touched; CheckpointError
        if one is missing or damaged. Under FSDP only rank 0 reads the weights and the optimizer (it sends them)."""
        from safetensors.torch import load_file

        try:
            saved_cfg = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{folder / 'config.json'} cannot be read ({e})") from None
        rng = f"rng_rank{self.dist.rank}"  # absent when the run now has more ranks: they start fresh streams
        out = {"config": saved_cfg, "state": read_state(folder, "state"),
               "rng": read_state(folder, rng) if (folder / f"{rng}.json").is_file() else None}
        if self.dist.main or not self._sharded:
            for name in ("model", "ema"):
                path = folder / f"{name}.safetensors"
                if name == "ema" and (self.ema is None or not path.is_file()):
                    continue
                try:
                    out[name] = load_file(str(path), device="cpu")
                except (OSError, SafetensorError) as e:
                    raise CheckpointError(f"{path} cannot be read ({e})") from None
            out["optimizer"] = read_state(folder, "optimizer")
        return out

    @property
    def _sharded(self) -> bool:
        return self.cfg.use_fsdp and self.dist.enabled

    def _resume(self):
        candidates = self._resume_candidates()
        for k, folder in enumerate(candidates):
            if (folder / "state.pt").exists() and not (folder / "state.json").exists():
                raise CheckpointError(
                    f"{folder} was written by an older stablecascade, whose state.pt is a pickle file (loading one "
                    "can run code, so it is never read). Start a new run (resume=never or another output_dir), or "
                    "train on from its model.safetensors (stage_c/stage_b/controlnet = that file).")
            try:
                saved, problem = self._read_checkpoint(folder), None
            except CheckpointError as e:
                saved, problem = None, e
            if not self.dist.all_ok(problem is None):
                if self.cfg.resume != "auto":
                    raise problem or CheckpointError(f"{folder}: another rank cannot read its part")
                log.warning("checkpoint %s is damaged (%s); trying the one before it", folder,
                            problem or "another rank cannot read its part")
                continue
            differences = resume_differences(saved["config"], self.cfg)
            if differences:
                raise CheckpointError(
                    f"{folder} was trained with a different config:\n  " + "\n  ".join(differences) +
                    "\nResume with the same values, start a new run (resume=never or another output_dir), or accept "
                    "the changes with --set resume_allow_changes=[" +
                    ", ".join(d.split(":")[0] for d in differences) + "]")
            self._load(saved)
            if self.dist.main:
                if k:
                    log.warning("resumed from %s at step %d: the newer checkpoints %s are damaged", folder, self.step,
                                ", ".join(p.name for p in candidates[:k]))
                else:
                    log.info("resumed from %s at step %d", folder, self.step)
                self._trim_log()
            return
        if candidates:
            raise CheckpointError(f"no checkpoint under {self.out / 'checkpoints'} can be read (all are damaged); "
                                  "start over with resume=never")

    def _load(self, saved: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        try:  # everything was read onto the CPU: loading copies it to the trainer's device (or rank 0 sends it)
            if self._sharded:
                options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
                set_model_state_dict(self.trained, saved.get("model", {}), options=options)
                if self.ema is not None:
                    set_model_state_dict(self.ema, saved.get("ema", {}), options=options)
                set_optimizer_state_dict(self.trained, self.optimizer, saved.get("optimizer", {}), options=options)
            else:
                self.trained.load_state_dict(saved["model"])
                if self.ema is not None and "ema" in saved:
                    self.ema.load_state_dict(saved["ema"])
                self.optimizer.load_state_dict(saved["optimizer"])
            state, rng = saved["state"], saved["rng"]
            ids = {(e.source, e.image): i for i, e in enumerate(self.source.entries)}
            sampler = dict(state["sampler"])
            sampler["bad"] = [ids[tuple(key)] for key in sampler["bad"] if tuple(key) in ids]
            self.sampler.load_state_dict(sampler)
            self.skipped = self.sampler.skipped
            if self.loss_weight is not None and state["loss_weight"] is not None:
                self.loss_weight.load_state_dict(state["loss_weight"])
            self.step, self.history = int(state["step"]), list(state["history"])
            self.gen.set_state(state["gen"])
            if rng is not None:
                torch.set_rng_state(rng["torch"])
                random.setstate(rng["python"])
                if self.device.type == "cuda" and "cuda" in rng:
                    torch.cuda.set_rng_state(rng["cuda"], self.device)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            raise CheckpointError(f"the checkpoint does not fit the run being resumed: {e!r}") from None

    def _trim_log(self) -> None:
        """Drop log.jsonl records past the resumed step: the steps after it are trained (and logged) again."""
        path = self.out / "log.jsonl"
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= self.step]
        path.write_text("".join(line + "\n" for line in kept))

    # ----------------------------------------------------------------------------------------- outputs
    def export(self) -> Optional[Path]:
        """Write the trained weights in the formats the pipeline loads (official single files, LoRA files)."""
        model_state = self._full_state(self.trained)  # collectives first: every rank takes part under FSDP
        ema_state = self._full_state(self.ema) if self.ema is not None else None
        if not self.dist.main:
            return None
        final = self.out / "final"
        final.mkdir(parents=True, exist_ok=True)
        task = self.cfg.task
        extra = self.consistency_metadata() if task == "lcm" else {}
        if isinstance(self.trained, LoRAModel):  # lora.safetensors, with ema_beta also lora_ema.safetensors (the EMA)
            self.trained.load_state_dict(model_state)
            meta = {"steps": self.step, **extra}
            if self.ema is not None:
                self.trained.save(final / "lora_ema.safetensors", self.ema,
                                  metadata={**meta, "ema_beta": self.cfg.ema_beta})
            return self.trained.save(final / "lora.safetensors", metadata=meta)
        name = "controlnet" if task == "controlnet" else self.cfg.trains
        recorded = {**sampling.model_metadata(self.target, self.sampling_shift()), **extra} \
            if task != "controlnet" else None
        for state, file in ((model_state, f"{name}.safetensors"), (ema_state, f"{name}_ema.safetensors")):
            if state is not None:
                checkpoints.save_official(self._unsharded_copy(state), final / file, recorded)
        return final / f"{name}.safetensors"

    def _unsharded_copy(self, state: dict) -> nn.Module:
        """A plain module of the trained kind holding `state` (FSDP2 shards the trained one in place)."""
        from torch.distributed.fsdp import FSDPModule

        kind = next(c for c in type(self.trained).__mro__ if not issubclass(c, FSDPModule))
        with torch.device("meta"):
            model = kind(self.trained.config)
        model.load_state_dict(state, assign=True)
        return model

    @torch.no_grad()
    def sample(self) -> Optional[Path]:
        """A preview grid under samples/: Stage C/LoRA/ControlNet samples for `sample_prompts` (decoded by the
        Previewer, or by Stage B + Stage A when given, else the first three latent channels); Stage B (trained or
        distilled): originals above reconstructions of the last batch."""
        if self.dist.enabled and not self.dist.main and not self.cfg.use_fsdp:
            return None
        cfg, dev = self.cfg, self.device
        model = self.net if (self.cfg.use_fsdp and self.dist.enabled) else self.trained
        was_training = model.training
        model.eval()
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        size = cfg.sample_size or cfg.image_size
        try:
            if cfg.trains == "stage_b":
                batch = data_mod.Batch(self.sampler._order()[: min(4, len(self.source))], (size, size),
                                       torch.full((4, 2), 0.5))
                images, captions = data_mod.load_batch(self.source, batch, slice(None), {})
                images = images.to(dev)
                recon = self.reconstruct(images, captions, gen)
                grid = torch.cat([images.cpu(), recon.cpu()])
                nrow = len(images)
            else:
                latents = self.sample_c(cfg.sample_prompts, size, gen, model)
                grid, nrow = self.decode_c(latents, cfg.sample_prompts, gen), len(cfg.sample_prompts)
        finally:
            model.train(was_training)
        if not self.dist.main:
            return None
        path = self.out / "samples" / f"step_{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(grid, nrow, path)
        return path

    def sampling_shift(self) -> float:
        """The schedule shift the trained model samples at (previews, and what `export` records): a consistency
        student's teacher's, where its file records one; else the released models' inference shift for its stage
        times the training shift (released Stage C: 2 x 1, Stage B: 1 x 1; nano Stage B: 1 x 4)."""
        if self.teacher_shift is not None:
            return self.teacher_shift
        return RELEASED_SHIFTS[1 if self.cfg.trains == "stage_b" else 0] * self.cfg.noise_shift

    def _guided(self, model, cond, uncond, scale):
        return sampling.GuidedDenoiser(model, cond, uncond, scale, sampling.get("official").rho, precompute=False,
                                       context=lambda: self.autocast)

    def sample_c(self, prompts, size, gen, model=None, steps=None, cfg_scale=None, sampler=None):
        """Stage C latents for the prompts at the inference shift: with the official sampler (`sample_steps`,
        `sample_cfg`), or for a consistency student with "lcm" (`lcm_steps`, `lcm_sample_guidance`)."""
        model = model or self.trained
        n, dev = len(prompts), self.device
        consistency = self.cfg.task == "lcm" and sampler in (None, "lcm")
        sampler = sampler or ("lcm" if consistency else "official")
        if cfg_scale is None:
            cfg_scale = self.cfg.lcm_sample_guidance if consistency else self.cfg.sample_cfg
        steps = steps or (self.cfg.lcm_steps if consistency else self.cfg.sample_steps)
        if isinstance(model, LoRAModel):
            text, pooled = model.encode(prompts, dev)
            neg_text, neg_pooled = model.encode([""] * n, dev)
            stage = self.stage_c
        else:
            text, pooled = self._text(prompts)
            neg_text, neg_pooled = self._text([""] * n)
            stage = self.stage_c if self.cfg.task == "controlnet" else model
        img = torch.zeros(n, 1, self.stage_c.config.c_clip_img, device=dev)
        denoise = self._guided(stage, dict(clip_text=text, clip_text_pooled=pooled, clip_img=img),
                               dict(clip_text=neg_text, clip_text_pooled=neg_pooled, clip_img=img), cfg_scale)
        (hc, wc), _ = latent_sizes(size, size, self.compression or EFFNET_FACTOR)
        x = sampling.randn((n, self.stage_c.config.c_out, hc, wc), gen, device=dev)
        return sampling.sample(denoise, x, steps, sampler=sampler, shift=self.sampling_shift(), target=self.target,
                               generator=gen)

    def decode_c(self, latents, prompts, gen):
        if self.previewer is not None:
            return self.previewer(latents).float().clamp(0, 1).cpu()
        if self.stage_b is not None and self.stage_a is not None:
            h, w = (round8(side * (self.compression or EFFNET_FACTOR)) for side in latents.shape[-2:])
            return self._stage_b_images(self.stage_b, latents, prompts, gen, h, w, RELEASED_SHIFTS[1], "eps",
                                        "official", DEFAULTS.decoder_steps, RELEASED_DECODER_GUIDANCE)
        lat = latents[:, :3].float()
        lo, hi = lat.amin(dim=(1, 2, 3), keepdim=True), lat.amax(dim=(1, 2, 3), keepdim=True)
        return ((lat - lo) / (hi - lo + 1e-6)).cpu()

    def reconstruct(self, images, captions, gen):
        """Images through the effnet and back through the trained Stage B and Stage A: a consistency student with
        "lcm" at its recommended steps and guidance, else as the official code samples."""
        plan = ("lcm", self.cfg.lcm_steps, self.cfg.lcm_sample_guidance) if self.cfg.task == "lcm" else \
            ("official", DEFAULTS.decoder_steps, RELEASED_DECODER_GUIDANCE)
        return self._stage_b_images(self.trained, self._encode_c(images), captions, gen, *images.shape[-2:],
                                    self.sampling_shift(), self.target, *plan)

    def _stage_b_effnet(self, images, scale: float):
        """The Stage C latent Stage B is conditioned on: the pipeline's encoding of the images scaled by `scale`
        (without a nano `compression`: the effnet on them resized to a multiple of 32 px)."""
        if self.compression:
            return self._encode_c(images, scale)
        h, w = images.shape[-2:]
        size = (max(32, int(h * scale) // 32 * 32), max(32, int(w * scale) // 32 * 32))
        return self.effnet(F.interpolate(images, size, mode="nearest"))

    def _encode_c(self, images, scale: float = 1.0):
        """Stage C latents of images: the effnet sees them resized to ceil(side * scale / compression) * 32 px, as
        the pipeline encodes (`compression` None: as they are)."""
        if self.compression:
            h, w = images.shape[-2:]
            (hc, wc), _ = latent_sizes(int(h * scale), int(w * scale), self.compression)
            images = resize(images, hc * EFFNET_FACTOR, wc * EFFNET_FACTOR)
        return self.effnet(images)

    def _stage_b_images(self, stage_b, effnet, prompts, gen, height, width, shift, target, sampler, steps, guidance):
        """Stage B sampling and Stage A decoding -> images in [0, 1]."""
        _, pooled = self._text(prompts)
        _, neg_pooled = self._text([""] * len(prompts))
        denoise = self._guided(stage_b, dict(effnet=effnet, clip=pooled),
                               dict(effnet=torch.zeros_like(effnet), clip=neg_pooled), guidance)
        _, (hb, wb) = latent_sizes(height, width)
        x = sampling.randn((len(prompts), stage_b.config.c_out, hb, wb), gen, device=self.device)
        latents = sampling.sample(denoise, x, steps, sampler=sampler, shift=shift, target=target, generator=gen)
        return self.stage_a.decode(latents).float().clamp(0, 1).cpu()


class TrainLog:
    """log.jsonl lines, and TensorBoard scalars and sample images when `log_with: tensorboard` (imported only
    then). The smoothed loss is an exponential moving average (weight 0.9 on the past), debiased for the first
    steps."""

    SMOOTHING = 0.9

    def __init__(self, out: Path, log_with: str):
        self.out, self.average, self.seen = out, 0.0, 0
        self.board = None
        if log_with == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise InputError("log_with: tensorboard needs the tensorboard package: pip install tensorboard "
                                 "(or log_with: none)") from None
            self.board = SummaryWriter(str(out / "tensorboard"))

    def smooth(self, loss: float) -> float:
        self.seen += 1
        self.average = self.SMOOTHING * self.average + (1 - self.SMOOTHING) * loss
        return self.average / (1 - self.SMOOTHING**self.seen)

    def write(self, record: dict) -> None:
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:
            for key, tag in (("loss", "loss/raw"), ("loss_smooth", "loss/smoothed"), ("lr", "lr"),
                             ("grad_norm", "grad_norm"), ("skipped", "data/skipped")):
                self.board.add_scalar(tag, record[key], record["step"])

    def image(self, path: Path, step: int) -> None:
        if self.board is None:
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            self.board.add_image("samples", np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """The share of `lr` that update `step` (0-based) uses: linear warmup reaching 1 at update `warmup` - 1 (the
    first update already moves), then 1 (constant_with_warmup) or a half cosine that would reach 0 one update after
    the last (cosine: the last update still learns)."""
    done = step + 1
    if done < warmup:
        return done / warmup
    if schedule == "constant_with_warmup":
        return 1.0
    progress = (done - max(warmup, 1)) / max(1, steps + 1 - max(warmup, 1))
    return 0.5 * (1.0 + math.cos(math.pi * progress))



def _strip_checkpointing(model: nn.Module) -> nn.Module:
    for m in model.modules():
        m.__dict__.pop("forward", None)
    return model


def save_grid(images: torch.Tensor, nrow: int, path: Path) -> None:
    from PIL import Image

    images = images.float().clamp(0, 1)
    n, c, h, w = images.shape
    if c == 1:
        images = images.expand(-1, 3, -1, -1)
    rows = math.ceil(n / nrow)
    grid = torch.zeros(3, rows * h, nrow * w)
    for i, im in enumerate(images):
        r, col = divmod(i, nrow)
        grid[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = im[:3]
    arr = (grid.permute(1, 2, 0) * 255).round().byte().numpy()
    Image.fromarray(arr).save(path)
