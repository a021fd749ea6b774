"""Stage C: the text-conditional prior in the 16-channel EfficientNet latent space (official `modules/stage_c.py`)."""

from __future__ import annotations

import torch
from torch import nn

from ..configs import StageCConfig
from ..errors import InputError
from .blocks import AttnBlock, CascadeUNet, LayerNorm2d, Linear, ResBlock, TimestepBlock


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
        self.clip_txt_mapper = Linear(cfg.c_clip_text, cfg.c_cond)
        self.clip_txt_pooled_mapper = Linear(cfg.c_clip_text_pooled, cfg.c_cond * cfg.c_clip_seq)
        self.clip_img_mapper = Linear(cfg.c_clip_img, cfg.c_cond * cfg.c_clip_seq)
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

    condition_inputs = ("clip_text", "clip_text_pooled", "clip_img")

    def condition(self, clip_text, clip_text_pooled, clip_img) -> torch.Tensor:
        """Condition tokens: 77 text tokens, `c_clip_seq` pooled-text tokens, `c_clip_seq` per image embedding."""
        b = clip_text.shape[0]
        tokens = torch.cat([
            self.clip_txt_mapper(clip_text),
            self.clip_txt_pooled_mapper(clip_text_pooled).reshape(b, -1, self.config.c_cond),
            self.clip_img_mapper(clip_img).reshape(b, -1, self.config.c_cond),
        ], dim=1)
        return self.clip_norm(tokens)

    def forward(self, x, r, clip_text=None, clip_text_pooled=None, clip_img=None, sca=None, crp=None, cnet=None,
                cond_kv=None):
        """x (B,16,h,w), r (B,), clip_text (B,77,1280), clip_text_pooled (B,1,1280), clip_img (B,n,768) -> ε.
        `cond_kv` (from `precompute`) replaces the three clip inputs.

        `cnet`: a ControlNet's output list, one entry (None or (B,c_hidden,h',w')) per ResBlock call in execution
        order; each non-None entry is resized to the features and added to them before that ResBlock."""
        if cnet is not None and any(c is not None for c in cnet[self.resblock_calls:]):
            raise InputError(f"the ControlNet output has {len(cnet)} entries but this Stage C makes only "
                             f"{self.resblock_calls} ResBlock calls: the ControlNet was made for a bigger Stage C "
                             "(the released ControlNets need the 3.6B Stage C)")
        r_embed = self.embed_r(r, sca=sca, crp=crp)
        cond = self.condition(clip_text, clip_text_pooled, clip_img) if cond_kv is None else cond_kv
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

    @torch.no_grad()
    def rescale_for_fp16(self, factor: float = 0.5) -> None:
        """Shrink the residual stream of the last block group, where the released weights grow it past float16's
        range (the black images fp16 users report), without changing the function.

        Every block of the group is homogeneous in its input x: LayerNorm ignores the scale of its input (once its
        eps is scaled by s²), so a ResBlock whose depthwise bias and output projection are scaled by s maps s·x to
        s·out, and likewise an AttnBlock with its out_proj scaled by s. The TimestepBlock x·(1+a)+b is not residual,
        so it can change the scale: mapping s·x to s·factor·out needs (1+a) scaled by factor and b by s·factor,
        i.e. the a-rows of its mappers scaled by factor, the main mapper's a-bias shifted by factor-1 and the b-rows
        scaled by s·factor. Each TimestepBlock thus shrinks the stream by `factor` (a power of two keeps the scaled
        weights exact); the final LayerNorm of `clf` undoes the accumulated scale. ControlNet inputs added before
        a ResBlock are scaled by the stream's scale there (`control_scale`)."""
        if getattr(self, "fp16_rescale", None) is not None:
            raise ValueError("this Stage C is already rescaled for float16")
        group = self.up_blocks[-1]
        if len(self.up_repeat_mappers[-1]) or not isinstance(self.up_upscalers[-1], nn.Identity):
            raise ValueError("the float16 rescale needs a last block group that runs once and ends at clf")
        scale = 1.0

        def mul_(t, s, rows=slice(None)):
            t[rows] = (t[rows].float() * s).to(t.dtype)  # in float32: one rounding per weight

        for block in group:
            if isinstance(block, ResBlock):
                block.norm.eps *= scale**2
                block.control_scale = scale
                mul_(block.depthwise.bias, scale)
                mul_(block.channelwise[-1].weight, scale)
                mul_(block.channelwise[-1].bias, scale)
            elif isinstance(block, AttnBlock):
                block.norm.eps *= scale**2
                mul_(block.attention.attn.out_proj.weight, scale)
                mul_(block.attention.attn.out_proj.bias, scale)
            elif isinstance(block, TimestepBlock):
                c = block.mapper.out_features // 2
                for mapper in [block.mapper] + [getattr(block, f"mapper_{n}") for n in block.conds]:
                    for t in (mapper.weight, mapper.bias):
                        mul_(t, factor, slice(None, c))
                        mul_(t, scale * factor, slice(c, None))
                block.mapper.bias[:c] = (block.mapper.bias[:c].float() + (factor - 1)).to(block.mapper.bias.dtype)
                scale *= factor
        self.clf[0].eps *= scale**2
        self.fp16_rescale = factor
