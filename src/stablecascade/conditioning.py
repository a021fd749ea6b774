"""Conditioning: the CLIP tokenizer and text encoder, and the CLIP image encoder (transformers), as Stage C and
Stage B consume them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence, Union

import torch

from .errors import CheckpointError

log = logging.getLogger(__name__)


class TextEncoder:
    """Tokenizer + `CLIPTextModelWithProjection` (bigG in the releases).

    Returns the last layer's hidden states *before* the final LayerNorm (what Stage C was trained on) and the
    projected pooled embedding; the attention mask is passed, as in the official code."""

    def __init__(self, tokenizer, model):
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False)
        self.max_length = min(int(getattr(tokenizer, "model_max_length", 77)), 77)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> hidden (B,77,hidden), pooled (B,1,projection)."""
        for p in prompts:
            n = len(self.tokenizer(p, truncation=False).input_ids)
            if n > self.max_length:
                log.warning("prompt is %d tokens long; CLIP reads only the first %d: %r", n, self.max_length, p[:80])
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        device = self.model.device
        out = self.model(ids.input_ids.to(device), attention_mask=ids.attention_mask.to(device),
                         output_hidden_states=True)
        return out.hidden_states[-1], out.text_embeds.unsqueeze(1)

    def to(self, device=None, dtype=None) -> "TextEncoder":
        self.model.to(device=device, dtype=dtype)
        return self


def from_pretrained(cls, path, dtype):
    """A transformers model from a folder, in `dtype`; only from safetensors files: a pickle `.bin` can run code
    when loaded, so it is refused (as a missing file)."""
    try:
        return cls.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        return cls.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True)


def load_text_encoder(model_path: Union[str, Path], tokenizer_path: Union[str, Path, None] = None, *,
                      dtype: torch.dtype = torch.float32, device=None) -> TextEncoder:
    """The CLIP text encoder of a transformers folder, in `dtype` whatever dtype its file stores (the nano model's is
    float16), on `device`. The tokenizer comes from `tokenizer_path`, else the folder itself or a sibling
    `tokenizer/` folder (the diffusers layout). Used by the pipeline and by training alike."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    model_path = Path(model_path)
    candidates = [Path(tokenizer_path)] if tokenizer_path else [model_path, model_path.parent / "tokenizer"]
    files = ("tokenizer_config.json", "tokenizer.json", "vocab.json")
    found = next((c for c in candidates if any((c / f).is_file() for f in files)), None)
    if found is None:
        raise CheckpointError(f"no CLIP tokenizer found at {' or '.join(map(str, candidates))}: give the tokenizer "
                              "folder (tokenizer_config.json) as well")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(found))
        model = from_pretrained(CLIPTextModelWithProjection, model_path, dtype)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not load the CLIP text encoder/tokenizer from {model_path}: {e}") from None
    return TextEncoder(tokenizer, model.to(device=device, dtype=dtype))


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageEncoder:
    """`CLIPVisionModelWithProjection` (ViT-L/14 in the releases) with the official preprocessing: torchvision's
    Resize of the shorter side to the model's input size (bicubic, antialiased), CenterCrop, CLIP normalisation."""

    def __init__(self, model):
        self.model = model.eval().requires_grad_(False)
        self.size = int(model.config.image_size)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] (B,3,H,W) -> image embeddings (B,1,projection)."""
        import torch.nn.functional as F

        h, w = images.shape[-2:]
        # as torchvision's Resize(size) + CenterCrop(size): the long side truncated, the crop offset rounded
        size = (self.size, int(self.size * w / h)) if h <= w else (int(self.size * h / w), self.size)
        x = F.interpolate(images.float(), size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (int(round((side - self.size) / 2)) for side in x.shape[-2:])
        x = x[..., top:top + self.size, left:left + self.size]
        mean = torch.tensor(CLIP_MEAN, device=x.device)[:, None, None]
        std = torch.tensor(CLIP_STD, device=x.device)[:, None, None]
        x = ((x - mean) / std).to(device=self.model.device, dtype=self.model.dtype)
        return self.model(pixel_values=x).image_embeds.unsqueeze(1)


def load_image_encoder(path: Union[str, Path], dtype: torch.dtype = torch.float32, device=None) -> ImageEncoder:
    """The CLIP image encoder of a transformers folder (safetensors only), in `dtype`, on `device`. Used by the
    pipeline (image variation) and by training alike."""
    from transformers import CLIPVisionModelWithProjection

    try:
        model = from_pretrained(CLIPVisionModelWithProjection, path, dtype)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not load the CLIP image encoder from {path}: {e}") from None
    return ImageEncoder(model.to(device))
