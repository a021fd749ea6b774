"""The training loop for Stage C, Stage B, Stage C LoRAs and Stage C ControlNets (`official-spec.md` §6).

One process or many (torchrun: DDP, or FSDP for the big Stage C). All randomness that shapes a global batch
(timesteps, noise, dropout masks, crops) is drawn for the whole global batch from one seeded generator and sliced
per rank, so N ranks compute the same losses as one process with the same global batch. A checkpoint holds the
model, EMA, optimizer, adaptive loss buckets, every RNG and the data position, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import copy
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
from torch import nn

from .. import checkpoints, configs, diffusion, sampling
from ..geometry import EFFNET_FACTOR, latent_sizes
from ..settings import DEFAULTS, RELEASED_DECODER_GUIDANCE, RELEASED_SHIFTS
from ..models import StageA, StageB, StageC
from . import data as data_mod
from .config import TrainConfig
from .objectives import AdaptiveLossWeight, ema_update_, init_unet_, p2_weight, pyramid_noise, training_logsnr
from .text import encode_text, load_text_encoder

log = logging.getLogger("stablecascade.train")

KIND = {"c": "stage_c", "b": "stage_b", "lora": "stage_c", "controlnet": "stage_c"}


# ---------------------------------------------------------------------------------------------- distributed
class Dist:
    """Rank/world from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); gloo on CPU, NCCL on GPU."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend)
            self.owned = True

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

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


# ---------------------------------------------------------------------------------------------- model helpers
def build_or_load(spec: str, kind: str) -> nn.Module:
    """"new:<config>" -> a freshly initialised model of a named config; otherwise a checkpoint path."""
    if spec.startswith("new:"):
        name = spec[4:]
        if kind == "stage_c":
            return init_unet_(StageC(configs.STAGE_C[name]))
        if kind == "stage_b":
            return init_unet_(StageB(configs.STAGE_B[name]))
        if kind == "stage_a":
            return StageA(configs.STAGE_A[name])
        raise ValueError(f"cannot create a new {kind}")
    return checkpoints.load_component(spec, kind, dtype=torch.float32)


def load_effnet(spec: Optional[str]) -> Optional[nn.Module]:
    if spec is None:
        return None
    if spec.startswith("nano"):
        from ..models.effnet import load_nano_encoder

        return load_nano_encoder(None if spec == "nano" else spec.split(":", 1)[1])
    return checkpoints.load_official(spec, "effnet", dtype=torch.float32)


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


class LoRAParam(nn.Module):
    """W + scale · up @ down (a parametrization): down starts at zero, up ~ N(0,1), as the official LoRA."""

    def __init__(self, out_dim: int, in_dim: int, rank: int, scale: float):
        super().__init__()
        self.down = nn.Parameter(torch.zeros(rank, in_dim))
        self.up = nn.Parameter(torch.randn(out_dim, rank))
        self.scale = scale

    def forward(self, w):
        return w + (self.up @ self.down).mul(self.scale).view(w.shape).to(w.dtype)


class TokenDelta(nn.Module):
    """Learned additions to selected rows of the token-embedding matrix."""

    def __init__(self, indices: list[int], hidden: int):
        super().__init__()
        self.register_buffer("indices", torch.tensor(indices, dtype=torch.long))
        self.delta = nn.Parameter(torch.zeros(len(indices), hidden))

    def forward(self, w):
        return w.index_add(0, self.indices.to(w.device), self.delta.to(w.dtype))


class LoRAModel(nn.Module):
    """What LoRA training optimises: the LoRA factors of Stage C's matching layers and the token deltas; its
    forward runs the (frozen, eval-mode) Stage C and text encoder through them."""

    def __init__(self, stage_c: nn.Module, text_model, tokenizer, cfg: TrainConfig):
        super().__init__()
        from torch.nn.utils import parametrize

        self.__dict__["stage_c"], self.__dict__["text_model"], self.tokenizer = stage_c, text_model, tokenizer
        rank, alpha = cfg.lora_rank, cfg.lora_alpha if cfg.lora_alpha is not None else 1.0
        self.layers = nn.ModuleDict()
        self.targets: list[tuple[str, str]] = []
        found = [(n, m) for n, m in stage_c.named_modules() if any(f in n for f in cfg.lora_filters)]
        for name, m in found:
            param = "weight" if isinstance(getattr(m, "weight", None), nn.Parameter) else (
                "in_proj_weight" if isinstance(getattr(m, "in_proj_weight", None), nn.Parameter) else None)
            if param is None:
                continue
            w = getattr(m, param)
            if w.dim() != 2:
                continue
            lora = LoRAParam(w.shape[0], w.shape[1], rank, alpha / rank)
            self.layers[str(len(self.targets))] = lora
            self.targets.append((name, param))
            parametrize.register_parametrization(m, param, lora)
        if not self.targets:
            raise ValueError(f"no Stage C layer matches lora_filters {cfg.lora_filters}")
        self.base_vocab = len(tokenizer)
        self.tokens: list[tuple] = []  # (token str or id, init regex, id)
        self.tokens_delta = None
        if cfg.train_tokens:
            self._prepare_tokens(cfg.train_tokens)

    def _prepare_tokens(self, entries):
        import re

        from torch.nn.utils import parametrize

        emb = self.text_model.get_input_embeddings()
        vocab = sorted(self.tokenizer.get_vocab().items(), key=lambda kv: kv[1])[: self.base_vocab]
        ids, new_rows = [], []
        for token, init in entries:
            if (token.startswith("[") and token.endswith("]")) or (token.startswith("<") and token.endswith(">")):
                self.tokenizer.add_tokens([token])
                new_id = self.tokenizer.convert_tokens_to_ids(token)
                matches = [i for s, i in vocab if init is not None and re.match(init, s)]
                base = emb.weight[matches].mean(0) if matches else torch.zeros(emb.weight.shape[1])
                new_rows.append(base.detach())
                ids.append(new_id)
                self.tokens.append((token, init, new_id))
            else:
                for s, i in vocab:
                    if re.match(token, s):
                        ids.append(i)
                        self.tokens.append((i, None, i))
        if new_rows:
            old = emb.weight.data
            self.text_model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
            emb = self.text_model.get_input_embeddings()
            emb.weight.data[: old.shape[0]] = old
            emb.weight.data[old.shape[0]:] = torch.stack(new_rows)
            emb.weight.requires_grad_(False)
        if ids:
            self.tokens_delta = TokenDelta(ids, emb.weight.shape[1])
            parametrize.register_parametrization(emb, "weight", self.tokens_delta)

    def encode(self, prompts, device):
        return encode_text(self.text_model, self.tokenizer, prompts, device)

    def forward(self, x, r, prompts, clip_img):
        text, pooled = self.encode(prompts, x.device)
        return self.stage_c(x, r, clip_text=text, clip_text_pooled=pooled, clip_img=clip_img)

    def lora_weights(self):
        from ..models.lora import LayerDelta, LoRAWeights, TokenEmbedding

        layers = [LayerDelta("stage_c", module, param, lora.down.detach().cpu(), lora.up.detach().cpu(),
                             scale=lora.scale) for (module, param), lora in zip(self.targets, self.layers.values())]
        tokens = []
        if self.tokens_delta is not None:
            for (token, init, _), vec in zip(self.tokens, self.tokens_delta.delta.detach().cpu()):
                tokens.append(TokenEmbedding(token, vec, init))
        return LoRAWeights(layers=layers, tokens=tokens, vocab_size=self.base_vocab)


# ---------------------------------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, *, parts: Optional[dict] = None):
        """`parts` may supply ready models instead of config paths: stage_c, stage_b, stage_a, effnet, previewer,
        text (a (tokenizer, model) pair), image_encoder (a `conditioning.ImageEncoder`), controlnet."""
        self.cfg, parts = cfg, dict(parts or {})
        self.dist = Dist()
        if cfg.device:
            self.device = torch.device(cfg.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", self.dist.local_rank)
        else:
            self.device = torch.device("cpu")
        self.out = Path(cfg.output_dir)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
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
        params = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay)
        self.step = 0
        self.history: list[dict] = []
        self.ema = None
        if cfg.ema_beta is not None:
            self.ema = _strip_checkpointing(copy.deepcopy(self.trained)).requires_grad_(False)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
        self._resume()

    # ----------------------------------------------------------------------------------------- setup
    def _setup_models(self, parts):
        cfg, task = self.cfg, self.cfg.task
        self.stage_c = parts.get("stage_c") or (build_or_load(cfg.stage_c, "stage_c") if cfg.stage_c else None)
        self.stage_b = parts.get("stage_b") or (build_or_load(cfg.stage_b, "stage_b") if cfg.stage_b else None)
        self.stage_a = parts.get("stage_a") or (build_or_load(cfg.stage_a, "stage_a") if cfg.stage_a else None)
        self.effnet = parts.get("effnet") or load_effnet(cfg.effnet)
        self.previewer = parts.get("previewer") or (
            checkpoints.load_official(cfg.previewer, "previewer", dtype=torch.float32) if cfg.previewer else None)
        text = parts.get("text") or (load_text_encoder(cfg.text_encoder, cfg.tokenizer) if cfg.text_encoder else None)
        self.tokenizer, self.text_model = text if text else (None, None)
        self.image_encoder = parts.get("image_encoder")
        if self.image_encoder is None and cfg.image_encoder:
            from ..conditioning import ImageEncoder
            from transformers import CLIPVisionModelWithProjection

            self.image_encoder = ImageEncoder(CLIPVisionModelWithProjection.from_pretrained(cfg.image_encoder))
        needs = {"c": ("stage_c", "effnet", "text_model"), "b": ("stage_b", "stage_a", "effnet", "text_model"),
                 "lora": ("stage_c", "effnet", "text_model"), "controlnet": ("stage_c", "effnet", "text_model")}[task]
        for name in needs:
            if getattr(self, name) is None:
                raise ValueError(f"training task {task!r} needs {name.replace('text_model', 'text_encoder')} "
                                 "(set it in the config)")
        for m in (self.stage_c, self.stage_b, self.stage_a, self.effnet, self.previewer, self.text_model):
            if m is not None:
                m.to(self.device).eval().requires_grad_(False)
        if task in ("c", "b"):
            trained = self.stage_c if task == "c" else self.stage_b
            if cfg.model_dropout is not None:
                set_dropout(trained, cfg.model_dropout)
            if cfg.gradient_checkpointing:
                enable_checkpointing(trained)
        elif task == "lora":
            trained = LoRAModel(self.stage_c, self.text_model, self.tokenizer, cfg).to(self.device)
        else:
            trained = parts.get("controlnet") or self._controlnet()
            trained.to(self.device)
        trained.train().requires_grad_(True)
        if task == "lora":
            for p in (*self.stage_c.parameters(), *self.text_model.parameters()):
                p.requires_grad_(False)
            for p in trained.parameters():
                p.requires_grad_(True)
        self.trained = trained
        self.net = self._wrap(trained)

    def _controlnet(self) -> nn.Module:
        from ..models.controlnet import CONTROLNET, ControlNet, ControlNetConfig

        cfg = self.cfg
        if cfg.controlnet:
            return checkpoints.load_controlnet(cfg.controlnet, dtype=torch.float32)
        base = CONTROLNET[cfg.controlnet_kind]
        calls = self.stage_c.resblock_calls
        blocks = cfg.controlnet_blocks or (list(base.proj_blocks) if calls == 64 else
                                           sorted({0, calls // 4, calls // 2, calls - 1}))
        return ControlNet(ControlNetConfig(c_in=base.c_in, c_proj=self.stage_c.config.c_hidden[0],
                                           proj_blocks=tuple(blocks),
                                           bottleneck_mode=cfg.controlnet_bottleneck or base.bottleneck_mode))

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return model
        dev = [self.device.index] if self.device.type == "cuda" else None
        if self.cfg.use_fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            from ..models.blocks import AttnBlock, ResBlock, TimestepBlock

            mp = MixedPrecision(torch.bfloat16, torch.bfloat16, torch.bfloat16) if self.cfg.dtype == "bf16" else None
            return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({ResBlock, AttnBlock, TimestepBlock}),
                        sharding_strategy=ShardingStrategy.SHARD_GRAD_OP, mixed_precision=mp, use_orig_params=True,
                        limit_all_gathers=True, device_id=self.device if self.device.type == "cuda" else None)
        return nn.parallel.DistributedDataParallel(model, device_ids=dev)

    def _setup_data(self, parts):
        cfg = self.cfg
        source = parts.get("data")
        if source is None:
            if not cfg.data:
                raise ValueError("no training data: set `data` to image folders and/or .tar shards")
            source = data_mod.ImageSource(data_mod.index_sources(cfg.data, cfg.caption_key))
        self.source = source
        sizes = data_mod.bucket_sizes(cfg.image_size, cfg.multi_aspect, cfg.bucket_factor)
        self.sampler = data_mod.Sampler(source, self.micro, sizes, seed=cfg.seed, random_ratio=cfg.bucket_random_ratio)
        self.skipped = self.sampler.skipped

    # ----------------------------------------------------------------------------------------- conditioning
    def _text(self, prompts):
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
        g, n = self.gen, self.micro
        eps = pyramid_noise((n, *shape), g) if pyramid else torch.randn((n, *shape), generator=g)
        if self.cfg.offset_noise > 0:
            eps = eps + self.cfg.offset_noise * torch.randn(n, shape[0], 1, 1, generator=g)
        return eps

    def _loss(self, images: torch.Tensor, captions: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weighted loss to backpropagate (local mean), raw per-sample losses (local), λ (local))."""
        cfg, task, sl, g, n = self.cfg, self.cfg.task, self._rank_slice(), self.gen, self.micro
        images = images.to(self.device)
        drop_text = (torch.rand(n, generator=g) < cfg.caption_dropout)[sl]
        captions = ["" if d else c for c, d in zip(captions, drop_text.tolist())]
        lam = training_logsnr(n, g, cfg.noise_shift)[sl].to(self.device)
        with torch.no_grad():
            if task == "b":
                keep_effnet = (torch.rand(n, generator=g) >= cfg.effnet_dropout)[sl]
                f = cfg.effnet_resize[0] + (cfg.effnet_resize[1] - cfg.effnet_resize[0]) * torch.rand((), generator=g).item()
                latents = self.stage_a.encode(images)
                h, w = images.shape[-2:]
                size = (max(32, int(h * f) // 32 * 32), max(32, int(w * f) // 32 * 32))
                small = F.interpolate(images, size, mode="nearest")
                effnet = self.effnet(small) * keep_effnet.view(-1, 1, 1, 1).to(self.device)
                _, pooled = self._text(captions)
                cond = dict(effnet=effnet, clip=pooled)
                eps = self._noise(latents.shape[1:], pyramid=cfg.pyramid_noise)[sl].to(self.device)
            else:
                use_img = (torch.rand(n, generator=g) > 1 - cfg.image_embed_prob)[sl]
                latents = self.effnet(images)
                c_img = self.stage_c.config.c_clip_img
                clip_img = torch.zeros(len(images), 1, c_img, device=self.device)
                if self.image_encoder is not None and use_img.any():
                    emb = self.image_encoder(images).to(self.device, torch.float32)
                    clip_img = torch.where(use_img.view(-1, 1, 1).to(self.device), emb, clip_img)
                eps = self._noise(latents.shape[1:])[sl].to(self.device)
                if task != "lora":
                    text, pooled = self._text(captions)
                    cond = dict(clip_text=text, clip_text_pooled=pooled, clip_img=clip_img)
                control = self._control(images) if task == "controlnet" else None
        latents, eps = latents.float(), eps.float()
        noised = diffusion.diffuse(latents, eps, lam)
        tgt = diffusion.target(latents, eps, lam, cfg.target)
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
        w = self.cfg.warmup_steps
        return self.cfg.lr * (min(1.0, (self.step + 1) / w) if w > 0 else 1.0)

    def train_step(self) -> dict:
        cfg = self.cfg
        self.net.train()
        if cfg.task == "controlnet":
            self._set_backbone_eval()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self._lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        raws, lams = [], []
        for k in range(cfg.grad_accum_steps):
            batch = next(self.sampler)
            images, captions = data_mod.load_batch(self.source, batch, self._rank_slice(), self.skipped)
            sync = self.dist.enabled and k < cfg.grad_accum_steps - 1 and hasattr(self.net, "no_sync")
            with self.net.no_sync() if sync else contextlib.nullcontext():
                loss, raw, lam = self._loss(images, captions)
                (loss / cfg.grad_accum_steps).backward()
            raw, lam = self.dist.gather_cat(raw.float()), self.dist.gather_cat(lam.float())
            if self.loss_weight is not None:
                self.loss_weight.update(lam, raw)
            raws.append(raw)
            lams.append(lam)
        params = [p for p in self.net.parameters() if p.requires_grad]
        if hasattr(self.net, "clip_grad_norm_"):
            gnorm = self.net.clip_grad_norm_(cfg.max_grad_norm)
        else:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        if self.ema is not None and self.step % cfg.ema_every == 0:
            beta = 0.0 if self.step <= cfg.ema_start else cfg.ema_beta
            ema_update_(self.ema, self._full_module(), beta)
        record = {"step": self.step, "loss": float(torch.cat(raws).mean()), "lr": lr, "grad_norm": float(gnorm),
                  "skipped": sum(self.skipped.values())}
        self.history.append(record)
        return record

    def _set_backbone_eval(self):
        for m in self.trained.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()

    def _full_module(self) -> nn.Module:
        return self.trained

    def fit(self, progress: bool = True) -> list[dict]:
        cfg = self.cfg
        start, t0 = self.step, time.time()
        while self.step < cfg.steps:
            rec = self.train_step()
            if self.dist.main and (self.step % cfg.log_every == 0 or self.step == cfg.steps or self.step == start + 1):
                rate = (self.step - start) / max(1e-9, time.time() - t0)
                log.info("step %d/%d loss %.4f lr %.2e grad %.3f skipped %d (%.2f it/s)", self.step, cfg.steps,
                         rec["loss"], rec["lr"], rec["grad_norm"], rec["skipped"], rate)
                with open(self.out / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
            if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step != cfg.steps:
                self.sample()
        self.export()
        self.sample()
        self.dist.barrier()
        return self.history

    # ----------------------------------------------------------------------------------------- checkpoints
    def _model_state(self) -> dict:
        if self.cfg.use_fsdp and self.dist.enabled:
            from torch.distributed.fsdp import FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with FSDP.state_dict_type(self.net, StateDictType.FULL_STATE_DICT,
                                      FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
                return self.net.state_dict()
        return self.trained.state_dict()

    def _optim_state(self) -> dict:
        if self.cfg.use_fsdp and self.dist.enabled:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            return FSDP.optim_state_dict(self.net, self.optimizer)
        return self.optimizer.state_dict()

    def save_checkpoint(self) -> Path:
        from safetensors.torch import save_file

        folder = self.out / "checkpoints" / f"step_{self.step:07d}"
        model_state, optim_state = self._model_state(), self._optim_state()
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "gen": self.gen.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        if self.dist.main:
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(folder / "model.safetensors"))
            if self.ema is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()},
                          str(folder / "ema.safetensors"))
            torch.save({"step": self.step, "optimizer": optim_state, "sampler": self.sampler.state_dict(),
                        "loss_weight": self.loss_weight.state_dict() if self.loss_weight else None,
                        "history": self.history}, folder / "state.pt")
            (folder / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
        self.dist.barrier()
        torch.save(rng, folder / f"rng_rank{self.dist.rank}.pt")
        self.dist.barrier()
        if self.dist.main:
            (folder / "done").write_text("ok")
            kept = sorted((self.out / "checkpoints").glob("step_*"))
            for old in kept[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return folder

    def _find_resume(self) -> Optional[Path]:
        r = self.cfg.resume
        if r == "never":
            return None
        if r != "auto":
            return Path(r)
        done = sorted(p.parent for p in (self.out / "checkpoints").glob("step_*/done"))
        return done[-1] if done else None

    def _resume(self):
        from safetensors.torch import load_file

        folder = self._find_resume()
        if folder is None:
            return
        state = torch.load(folder / "state.pt", weights_only=False)
        model_state = load_file(str(folder / "model.safetensors"))
        if self.cfg.use_fsdp and self.dist.enabled:
            from torch.distributed.fsdp import FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with FSDP.state_dict_type(self.net, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
                self.net.load_state_dict(model_state)
            optim = FSDP.optim_state_dict_to_load(self.net, self.optimizer, state["optimizer"])
            self.optimizer.load_state_dict(optim)
        else:
            self.trained.load_state_dict(model_state)
            self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and (folder / "ema.safetensors").is_file():
            self.ema.load_state_dict(load_file(str(folder / "ema.safetensors")))
        self.sampler.load_state_dict(state["sampler"])
        self.skipped = self.sampler.skipped
        if self.loss_weight is not None and state["loss_weight"] is not None:
            self.loss_weight.load_state_dict(state["loss_weight"])
        self.step, self.history = state["step"], state["history"]
        rng_file = folder / f"rng_rank{self.dist.rank}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            self.gen.set_state(rng["gen"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        if self.dist.main:
            log.info("resumed from %s at step %d", folder, self.step)

    # ----------------------------------------------------------------------------------------- outputs
    def export(self) -> Optional[Path]:
        """Write the trained weights in the formats the pipeline loads (official single files, LoRA files)."""
        model_state = self._model_state()
        if not self.dist.main:
            return None
        final = self.out / "final"
        final.mkdir(parents=True, exist_ok=True)
        task = self.cfg.task
        if task == "lora":
            from ..models.lora import save_lora

            self.trained.load_state_dict(model_state)
            save_lora(final / "lora.safetensors", self.trained.lora_weights(), self.stage_c,
                      metadata={"steps": self.step})
            return final / "lora.safetensors"
        name = {"c": "stage_c", "b": "stage_b", "controlnet": "controlnet"}[task]
        model = copy.deepcopy(self.trained).cpu()
        _strip_checkpointing(model)
        model.load_state_dict({k: v.cpu() for k, v in model_state.items()})
        recorded = sampling.model_metadata(self.cfg.target, self.sampling_shift()) if task != "controlnet" else None
        checkpoints.save_official(model, final / f"{name}.safetensors", recorded)
        if self.ema is not None:
            checkpoints.save_official(_strip_checkpointing(copy.deepcopy(self.ema).cpu()),
                                      final / f"{name}_ema.safetensors", recorded)
        return final / f"{name}.safetensors"

    @torch.no_grad()
    def sample(self) -> Optional[Path]:
        """A preview grid under samples/: Stage C/LoRA/ControlNet samples for `sample_prompts` (decoded by the
        Previewer, or by Stage B + Stage A when given, else the first three latent channels); Stage B:
        originals above reconstructions of the last batch."""
        if self.dist.enabled and not self.dist.main and not self.cfg.use_fsdp:
            return None
        cfg, dev = self.cfg, self.device
        model = self.net if (self.cfg.use_fsdp and self.dist.enabled) else self.trained
        was_training = model.training
        model.eval()
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        size = cfg.sample_size or cfg.image_size
        try:
            if cfg.task == "b":
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
        """The schedule shift the trained model samples at (previews, and what `export` records): the released
        models' inference shift for its stage times the training shift (released Stage C: 2 x 1, Stage B: 1 x 1;
        nano Stage B: 1 x 4)."""
        return RELEASED_SHIFTS[1 if self.cfg.task == "b" else 0] * self.cfg.noise_shift

    def _guided(self, model, cond, uncond, scale):
        return sampling.GuidedDenoiser(model, cond, uncond, scale, sampling.get("official").rho, precompute=False,
                                       context=lambda: self.autocast)

    def sample_c(self, prompts, size, gen, model=None, steps=None, cfg_scale=None):
        """Stage C latents for the prompts with the official sampler at the inference shift."""
        model = model or self.trained
        n, dev = len(prompts), self.device
        if self.cfg.task == "lora":
            text, pooled = model.encode(prompts, dev)
            neg_text, neg_pooled = model.encode([""] * n, dev)
            stage = self.stage_c
        else:
            text, pooled = self._text(prompts)
            neg_text, neg_pooled = self._text([""] * n)
            stage = self.stage_c if self.cfg.task == "controlnet" else model
        img = torch.zeros(n, 1, self.stage_c.config.c_clip_img, device=dev)
        scale = self.cfg.sample_cfg if cfg_scale is None else cfg_scale
        denoise = self._guided(stage, dict(clip_text=text, clip_text_pooled=pooled, clip_img=img),
                               dict(clip_text=neg_text, clip_text_pooled=neg_pooled, clip_img=img), scale)
        (hc, wc), _ = latent_sizes(size, size, EFFNET_FACTOR)
        x = sampling.randn((n, self.stage_c.config.c_out, hc, wc), gen, device=dev)
        return sampling.sample(denoise, x, steps or self.cfg.sample_steps, shift=self.sampling_shift(),
                               target=self.cfg.target, generator=gen)

    def decode_c(self, latents, prompts, gen):
        if self.previewer is not None:
            return self.previewer(latents).float().clamp(0, 1).cpu()
        if self.stage_b is not None and self.stage_a is not None:
            h, w = (side * EFFNET_FACTOR for side in latents.shape[-2:])
            return self._stage_b_images(self.stage_b, latents, prompts, gen, h, w, RELEASED_SHIFTS[1], "eps")
        lat = latents[:, :3].float()
        lo, hi = lat.amin(dim=(1, 2, 3), keepdim=True), lat.amax(dim=(1, 2, 3), keepdim=True)
        return ((lat - lo) / (hi - lo + 1e-6)).cpu()

    def reconstruct(self, images, captions, gen):
        return self._stage_b_images(self.trained, self.effnet(images), captions, gen, *images.shape[-2:],
                                    self.sampling_shift(), self.cfg.target)

    def _stage_b_images(self, stage_b, effnet, prompts, gen, height, width, shift, target):
        """Stage B sampling with the official sampler and settings (guidance 1.1, 10 steps) and Stage A decoding
        -> images in [0, 1]."""
        _, pooled = self._text(prompts)
        _, neg_pooled = self._text([""] * len(prompts))
        denoise = self._guided(stage_b, dict(effnet=effnet, clip=pooled),
                               dict(effnet=torch.zeros_like(effnet), clip=neg_pooled), RELEASED_DECODER_GUIDANCE)
        _, (hb, wb) = latent_sizes(height, width)
        x = sampling.randn((len(prompts), stage_b.config.c_out, hb, wb), gen, device=self.device)
        latents = sampling.sample(denoise, x, DEFAULTS.decoder_steps, shift=shift, target=target, generator=gen)
        return self.stage_a.decode(latents).float().clamp(0, 1).cpu()


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
