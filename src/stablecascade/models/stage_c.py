"""Stage C: the text-conditional prior in the 16-channel EfficientNet latent space (`official-spec.md` §1.2, §2.2)."""

from __future__ import annotations

import torch
from torch import nn

from ..configs import StageCConfig
from ..errors import InputError
from .blocks import CascadeUNet, LayerNorm2d


class UpDownBlock2d(nn.Module):
    """A 1x1 conv between Stage C levels. The released models switch the resampling off (`switch_level=False`);
    the identity keeps the conv at the official key index (`blocks.0` going down, `blocks.1` going up)."""

    def __init__(self, c_in: int, c_out: int, mode: str):
        super().__init__()
        conv = nn.Conv2d(c_in, c_out, 1)
        self.blocks = nn.ModuleList([conv, nn.Identity()] if mode == "down" else [nn.Identity(), conv])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class StageC(CascadeUNet):
    def __init__(self, config: StageCConfig):
        super().__init__()
        self.config = cfg = config
        c0, p = cfg.c_hidden[0], cfg.patch_size
        self.clip_txt_mapper = nn.Linear(cfg.c_clip_text, cfg.c_cond)
        self.clip_txt_pooled_mapper = nn.Linear(cfg.c_clip_text_pooled, cfg.c_cond * cfg.c_clip_seq)
        self.clip_img_mapper = nn.Linear(cfg.c_clip_img, cfg.c_cond * cfg.c_clip_seq)
        self.clip_norm = nn.LayerNorm(cfg.c_cond, elementwise_affine=False, eps=1e-6)
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(p), nn.Conv2d(cfg.c_in * p**2, c0, 1), LayerNorm2d(c0, elementwise_affine=False, eps=1e-6)
        )
        ch = cfg.c_hidden
        self._build_levels(
            cfg,
            downscaler=lambda i: nn.Sequential(
                LayerNorm2d(ch[i - 1], elementwise_affine=False, eps=1e-6), UpDownBlock2d(ch[i - 1], ch[i], "down")
            ),
            upscaler=lambda i: nn.Sequential(
                LayerNorm2d(ch[i], elementwise_affine=False, eps=1e-6), UpDownBlock2d(ch[i], ch[i - 1], "up")
            ),
        )
        self.clf = nn.Sequential(
            LayerNorm2d(c0, elementwise_affine=False, eps=1e-6), nn.Conv2d(c0, cfg.c_out * p**2, 1), nn.PixelShuffle(p)
        )

    def condition(self, clip_text, clip_text_pooled, clip_img) -> torch.Tensor:
        """Condition tokens: 77 text tokens, `c_clip_seq` pooled-text tokens, `c_clip_seq` per image embedding."""
        b = clip_text.shape[0]
        tokens = torch.cat([
            self.clip_txt_mapper(clip_text),
            self.clip_txt_pooled_mapper(clip_text_pooled).reshape(b, -1, self.config.c_cond),
            self.clip_img_mapper(clip_img).reshape(b, -1, self.config.c_cond),
        ], dim=1)
        return self.clip_norm(tokens)

    def forward(self, x, r, clip_text, clip_text_pooled, clip_img, sca=None, crp=None, cnet=None):
        """x (B,16,h,w), r (B,), clip_text (B,77,1280), clip_text_pooled (B,1,1280), clip_img (B,n,768) -> ε.

        `cnet`: a ControlNet's output list, one entry (None or (B,c_hidden,h',w')) per ResBlock call in execution
        order; each non-None entry is resized to the features and added to them before that ResBlock."""
        if cnet is not None and any(c is not None for c in cnet[self.resblock_calls:]):
            raise InputError(f"the ControlNet output has {len(cnet)} entries but this Stage C makes only "
                             f"{self.resblock_calls} ResBlock calls: the ControlNet was made for a bigger Stage C "
                             "(the released ControlNets need the 3.6B Stage C)")
        r_embed = self.embed_r(r, sca=sca, crp=crp)
        cond = self.condition(clip_text, clip_text_pooled, clip_img)
        x = self.embedding(x)
        controls = None if cnet is None else iter(cnet)
        return self.clf(self._up(self._down(x, r_embed, cond, controls), r_embed, cond, controls))

    @property
    def resblock_calls(self) -> int:
        """ResBlock calls per forward pass (64 for the 3.6B model): the length of a full ControlNet output list."""
        cfg = self.config
        down = zip(cfg.blocks[0], cfg.block_repeat[0], cfg.level_config)
        up = zip(cfg.blocks[1], cfg.block_repeat[1], cfg.level_config[::-1])  # up lists run deepest level first
        return sum(n * rep * kinds.count("C") for n, rep, kinds in (*down, *up))
