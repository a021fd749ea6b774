"""Offline diffusers reference ("oracle") for Stable Cascade on tiny random configs.

Not a test file: tests import these helpers. Everything is built from configs and seeds; nothing is
downloaded. The CLIP BPE vocabulary comes from the ``openai-clip`` package (located without importing it).

Pinned oracle versions: diffusers 0.42.1, transformers 5.23.0.
Tests should ``pytest.importorskip("diffusers")`` before importing this module.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import functools
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import (
    DDPMWuerstchenScheduler,
    StableCascadeCombinedPipeline,
    StableCascadeDecoderPipeline,
    StableCascadePriorPipeline,
    StableCascadeUNet,
)
from stablecascade.train.text import clip_tokenizer
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

try:  # moved to the deprecated package in recent diffusers releases
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
except ImportError:  # pragma: no cover
    from diffusers.pipelines.wuerstchen import PaellaVQModel

diffusers.utils.logging.set_verbosity_error()
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()  # "Writing model shards" / "Loading weights" bars

__all__ = [
    "TXT_HIDDEN", "TXT_PROJ", "IMG_PROJ", "CT", "CTA", "PRIOR_CONFIGS", "DECODER_CONFIGS", "VQ_CONFIG",
    "build_tokenizer", "tiny_text_encoder", "tiny_image_encoder", "randomize_", "diffusers_unet",
    "diffusers_vqgan", "TinyCascade", "build_tiny_cascade", "prior_pipeline", "decoder_pipeline",
    "combined_pipeline", "save_diffusers_folders", "official_state_dict", "official_vqgan_state_dict",
]

# ------------------------------------------------------------------------------------------ tokenizer


@functools.lru_cache(maxsize=None)
def build_tokenizer() -> CLIPTokenizer:
    """The laion bigG CLIP tokenizer rebuilt offline (the product's builder; both sides of a comparison must
    tokenize alike). Cached: the same object is returned on every call (do not mutate it)."""
    return clip_tokenizer()


# ------------------------------------------------------------------------------------------ encoders

TXT_HIDDEN = 32  # text encoder hidden size  -> prior clip_text_in_channels
TXT_PROJ = 32  # text encoder projection   -> clip_text_pooled_in_channels (prior and decoder)
IMG_PROJ = 24  # vision encoder projection -> prior clip_image_in_channels


def tiny_text_encoder(seed: int = 0) -> CLIPTextModelWithProjection:
    """Tiny CLIP text encoder compatible with the real tokenizer (vocab 49408, EOS 49407 pooling), eval mode."""
    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=TXT_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=TXT_PROJ, hidden_act="gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(cfg).eval()


def tiny_image_encoder(seed: int = 1) -> CLIPVisionModelWithProjection:
    """Tiny CLIP vision encoder (224 px, patch 32, projection IMG_PROJ), eval mode."""
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=224, patch_size=32, projection_dim=IMG_PROJ,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPVisionModelWithProjection(cfg).eval()


# ------------------------------------------------------------------------------------------ UNet / VQ configs

CT = ("SDCascadeResBlock", "SDCascadeTimestepBlock")
CTA = ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock")

_PRIOR_COMMON = dict(
    in_channels=16, out_channels=16, patch_size=1, clip_text_in_channels=TXT_HIDDEN,
    clip_text_pooled_in_channels=TXT_PROJ, clip_image_in_channels=IMG_PROJ, clip_seq=4, kernel_size=3,
    self_attn=True, timestep_conditioning_type=("sca", "crp"), switch_level=(False,),
    down_blocks_repeat_mappers=(1, 1), up_blocks_repeat_mappers=(1, 1), block_types_per_layer=(CTA, CTA),
    dropout=(0.1, 0.1),
)
_DECODER_COMMON = dict(
    in_channels=4, out_channels=4, timestep_ratio_embedding_dim=64, patch_size=2, clip_text_pooled_in_channels=TXT_PROJ,
    clip_seq=4, effnet_in_channels=16, pixel_mapper_in_channels=3, kernel_size=3, self_attn=True,
    timestep_conditioning_type=("sca",), switch_level=None, down_blocks_repeat_mappers=(1, 1, 1, 1),
    dropout=(0.0, 0.0, 0.1, 0.1),
)

#: Stage-C-like StableCascadeUNet kwargs (2 levels at one resolution, CTA blocks, text+pooled+image conditioning).
PRIOR_CONFIGS: dict[str, dict] = {
    "c_tiny": dict(_PRIOR_COMMON, timestep_ratio_embedding_dim=64, conditioning_dim=64, block_out_channels=(64, 64),
                   num_attention_heads=(2, 2), down_num_layers_per_block=(1, 2), up_num_layers_per_block=(2, 1)),
    # conditioning_dim != channels, 3 heads of 32, r-embedding 32 wide, layer counts swapped
    "c_tiny_wide": dict(_PRIOR_COMMON, timestep_ratio_embedding_dim=32, conditioning_dim=48,
                        block_out_channels=(96, 96), num_attention_heads=(3, 3), down_num_layers_per_block=(2, 1),
                        up_num_layers_per_block=(1, 2)),
}

#: Stage-B-like StableCascadeUNet kwargs (4 levels, patch 2, effnet + pixel mappers, pooled text only).
DECODER_CONFIGS: dict[str, dict] = {
    "b_tiny": dict(_DECODER_COMMON, conditioning_dim=48, block_out_channels=(16, 32, 48, 48),
                   num_attention_heads=(0, 0, 2, 2), down_num_layers_per_block=(1, 1, 1, 1),
                   up_num_layers_per_block=(1, 1, 1, 1), up_blocks_repeat_mappers=(3, 3, 2, 2),
                   block_types_per_layer=(CT, CT, CTA, CTA)),
    "b_tiny_deep": dict(_DECODER_COMMON, conditioning_dim=32, block_out_channels=(16, 24, 32, 32),
                        num_attention_heads=(0, 2, 2, 2), down_num_layers_per_block=(1, 2, 2, 1),
                        up_num_layers_per_block=(1, 2, 2, 1), up_blocks_repeat_mappers=(2, 2, 2, 2),
                        block_types_per_layer=(CT, CTA, CTA, CTA)),
}

#: PaellaVQModel kwargs (Stage A); scale_factor 0.43 as in the official Stage A.
VQ_CONFIG: dict = dict(in_channels=3, out_channels=3, up_down_scale_factor=2, levels=2, bottleneck_blocks=1,
                       embed_dim=32, latent_channels=4, num_vq_embeddings=16, scale_factor=0.43)


# ------------------------------------------------------------------------------------------ models


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Overwrite every parameter and floating buffer with seeded N(0, std^2) values, in place.

    diffusers leaves GRN gamma/beta at zero (GRN = identity); this makes every path matter. BatchNorm
    ``running_var`` becomes ``|N(0, std^2)| + 0.5`` so it stays positive. Integer buffers are untouched.
    """
    g = torch.Generator().manual_seed(seed)
    for _, p in module.named_parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
    for name, b in module.named_buffers():
        if b.is_floating_point():
            v = torch.randn(b.shape, generator=g, dtype=torch.float32) * std
            b.copy_(v.abs() + 0.5 if name.endswith("running_var") else v)
    return module


def diffusers_unet(config: dict, seed: int) -> StableCascadeUNet:
    """A diffusers StableCascadeUNet from ``config`` with all weights randomized from ``seed``, eval mode."""
    with torch.random.fork_rng(devices=[]):
        model = StableCascadeUNet(**config)
    return randomize_(model, seed).eval()  # direct construction leaves train mode (dropout)


def diffusers_vqgan(seed: int) -> PaellaVQModel:
    """A diffusers PaellaVQModel (VQ_CONFIG) with all weights/BatchNorm stats randomized from ``seed``, eval."""
    with torch.random.fork_rng(devices=[]):
        model = PaellaVQModel(**VQ_CONFIG)
    return randomize_(model, seed, std=0.1).eval()


@dataclass
class TinyCascade:
    """All components of a tiny Stable Cascade (shared text encoder/tokenizer for prior and decoder)."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModelWithProjection
    image_encoder: CLIPVisionModelWithProjection
    feature_extractor: CLIPImageProcessor
    prior: StableCascadeUNet
    decoder: StableCascadeUNet
    vqgan: PaellaVQModel


def build_tiny_cascade(prior: str = "c_tiny", decoder: str = "b_tiny", seed: int = 0) -> TinyCascade:
    """Build every component; seeds are derived from ``seed`` (text +0, image +1, prior +10, decoder +20, VQ +30)."""
    return TinyCascade(
        tokenizer=build_tokenizer(),
        text_encoder=tiny_text_encoder(seed),
        image_encoder=tiny_image_encoder(seed + 1),
        feature_extractor=CLIPImageProcessor(),
        prior=diffusers_unet(PRIOR_CONFIGS[prior], seed + 10),
        decoder=diffusers_unet(DECODER_CONFIGS[decoder], seed + 20),
        vqgan=diffusers_vqgan(seed + 30),
    )


# ------------------------------------------------------------------------------------------ pipelines


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prior_pipeline(tc: TinyCascade) -> StableCascadePriorPipeline:
    """diffusers StableCascadePriorPipeline (Stage C) over the tiny components."""
    return _quiet(StableCascadePriorPipeline(
        tokenizer=tc.tokenizer, text_encoder=tc.text_encoder, prior=tc.prior, scheduler=DDPMWuerstchenScheduler(),
        feature_extractor=tc.feature_extractor, image_encoder=tc.image_encoder))


def decoder_pipeline(tc: TinyCascade) -> StableCascadeDecoderPipeline:
    """diffusers StableCascadeDecoderPipeline (Stage B + A) over the tiny components."""
    return _quiet(StableCascadeDecoderPipeline(
        decoder=tc.decoder, tokenizer=tc.tokenizer, text_encoder=tc.text_encoder, scheduler=DDPMWuerstchenScheduler(),
        vqgan=tc.vqgan))


def combined_pipeline(tc: TinyCascade) -> StableCascadeCombinedPipeline:
    """diffusers StableCascadeCombinedPipeline; prior and decoder share tokenizer and text encoder."""
    pipe = StableCascadeCombinedPipeline(
        tokenizer=tc.tokenizer, text_encoder=tc.text_encoder, decoder=tc.decoder, scheduler=DDPMWuerstchenScheduler(),
        vqgan=tc.vqgan, prior_prior=tc.prior, prior_text_encoder=tc.text_encoder, prior_tokenizer=tc.tokenizer,
        prior_scheduler=DDPMWuerstchenScheduler(), prior_feature_extractor=tc.feature_extractor,
        prior_image_encoder=tc.image_encoder)
    for p in (pipe, pipe.prior_pipe, pipe.decoder_pipe):
        _quiet(p)
    return pipe


def save_diffusers_folders(tc: TinyCascade, root: Path) -> tuple[Path, Path]:
    """Write diffusers-format folders ``root/prior`` and ``root/decoder`` (safetensors); return both paths.

    prior/:   model_index.json, prior/, text_encoder/, tokenizer/, scheduler/, image_encoder/, feature_extractor/
    decoder/: model_index.json, decoder/, text_encoder/, tokenizer/, scheduler/, vqgan/
    Note: diffusers 0.42.1 cannot reload the decoder folder itself (model_index names PaellaVQModel).
    """
    root = Path(root)
    prior_dir, decoder_dir = root / "prior", root / "decoder"
    prior_pipeline(tc).save_pretrained(prior_dir, safe_serialization=True)
    decoder_pipeline(tc).save_pretrained(decoder_dir, safe_serialization=True)
    return prior_dir, decoder_dir


# ------------------------------------------------------------------------------------------ official key names

_QKV = (".attention.to_q.", ".attention.to_k.", ".attention.to_v.")


def official_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The diffusers UNet's state dict under OFFICIAL (Stability) key names.

    Inverse of ``convert_stable_cascade_unet_single_file_to_diffusers``: q/k/v Linears are concatenated
    (rows q, k, v) into ``attention.attn.in_proj_{weight,bias}``, ``attention.to_out.0`` becomes
    ``attention.attn.out_proj``, and for Stage B (no ``clip_txt_mapper``) ``clip_txt_pooled_mapper``
    becomes ``clip_mapper``. Tensors are detached, contiguous clones.
    """
    sd = unet.state_dict()
    stage_b = "clip_txt_mapper.weight" not in sd
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if _QKV[0] in key:
            base, kind = key.split(_QKV[0])
            out[f"{base}.attention.attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{base}{q}{kind}"] for q in _QKV], dim=0)
            continue
        if _QKV[1] in key or _QKV[2] in key:
            continue
        if ".attention.to_out.0." in key:
            key = key.replace(".attention.to_out.0.", ".attention.attn.out_proj.")
        elif stage_b and key.startswith("clip_txt_pooled_mapper."):
            key = "clip_mapper." + key[len("clip_txt_pooled_mapper."):]
        out[key] = value
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def official_vqgan_state_dict(vq: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PaellaVQModel state dict under official Stage A names (only the codebook key differs)."""
    return {k.replace("vquantizer.embedding.weight", "vquantizer.codebook.weight"): v.detach().clone().contiguous()
            for k, v in vq.state_dict().items()}


def released_variants():
    """The released variants: (component kind, our config, name of its key list in tests/data/official-keys)."""
    from stablecascade import configs

    return [
        ("stage_c", configs.STAGE_C["3b"], "stage_c_3b"),
        ("stage_c", configs.STAGE_C["1b"], "stage_c_1b"),
        ("stage_b", configs.STAGE_B["3b"], "stage_b_3b"),
        ("stage_b", configs.STAGE_B["700m"], "stage_b_700m"),
        ("stage_a", configs.STAGE_A["f4"], "stage_a"),
        ("effnet", configs.EffnetConfig(), "effnet"),
        ("previewer", configs.PreviewerConfig(), "previewer"),
    ]
