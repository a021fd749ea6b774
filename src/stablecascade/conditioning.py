"""Text conditioning: the CLIP tokenizer and text encoder (transformers), as Stage C and Stage B consume them."""

from __future__ import annotations

import logging
from typing import Sequence

import torch

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
