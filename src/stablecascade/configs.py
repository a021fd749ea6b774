"""Model configurations as data: the released variants and tiny ones for tests.

Field names follow the official constructors (`modules/stage_c.py`, `modules/stage_b.py`, `modules/stage_a.py` of the official repository). List conventions: `blocks[0]` and
`block_repeat[0]` are in down order (level 0 first), `blocks[1]`/`block_repeat[1]` in up order (deepest first).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class UNetConfig:
    """Fields shared by Stage C and Stage B (both are U-Nets of ResBlock/TimestepBlock/AttnBlock levels)."""

    c_in: int
    c_out: int
    c_r: int
    patch_size: int
    c_cond: int
    c_hidden: tuple[int, ...]
    nhead: tuple[int, ...]
    blocks: tuple[tuple[int, ...], tuple[int, ...]]
    block_repeat: tuple[tuple[int, ...], tuple[int, ...]]
    level_config: tuple[str, ...]
    t_conds: tuple[str, ...]
    dropout: tuple[float, ...]
    kernel_size: int = 3
    self_attn: bool = True

    def __post_init__(self):
        n = len(self.c_hidden)
        per_level = (self.nhead, self.blocks[0], self.blocks[1], self.block_repeat[0], self.block_repeat[1],
                     self.level_config, self.dropout)
        if any(len(v) != n for v in per_level):
            raise ValueError(f"{type(self).__name__}: every per-level list must have {n} entries")
        for c, h, kinds in zip(self.c_hidden, self.nhead, self.level_config):
            if "A" in kinds and (h <= 0 or c % h):
                raise ValueError(f"{type(self).__name__}: {c} channels cannot be split into {h} attention heads")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        def tup(v):
            return tuple(tup(x) for x in v) if isinstance(v, (list, tuple)) else v

        return cls(**{k: tup(v) for k, v in d.items()})


@dataclass(frozen=True)
class StageCConfig(UNetConfig):
    c_clip_text: int = 1280
    c_clip_text_pooled: int = 1280
    c_clip_img: int = 768
    c_clip_seq: int = 4


@dataclass(frozen=True)
class StageBConfig(UNetConfig):
    c_clip: int = 1280
    c_clip_seq: int = 4
    c_effnet: Optional[int] = 16
    c_pixels: Optional[int] = 3


@dataclass(frozen=True)
class StageAConfig:
    levels: int = 2
    bottleneck_blocks: int = 12
    c_hidden: int = 384
    c_latent: int = 4
    codebook_size: int = 8192
    scale_factor: float = 0.43

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EffnetConfig:
    c_latent: int = 16


@dataclass(frozen=True)
class PreviewerConfig:
    c_in: int = 16
    c_hidden: int = 512
    c_out: int = 3


def _stage_c(c, nhead, blocks, **kw) -> StageCConfig:
    return StageCConfig(
        c_in=16, c_out=16, c_r=64, patch_size=1, c_cond=kw.pop("c_cond", c), c_hidden=(c, c), nhead=(nhead, nhead),
        blocks=blocks, block_repeat=((1, 1), (1, 1)), level_config=("CTA", "CTA"), t_conds=("sca", "crp"),
        dropout=kw.pop("dropout", (0.1, 0.1)), **kw,
    )


def _stage_b(c_hidden, nhead, blocks, block_repeat, **kw) -> StageBConfig:
    return StageBConfig(
        c_in=kw.pop("c_in", 4), c_out=kw.pop("c_out", 4), c_r=64, patch_size=2, c_cond=kw.pop("c_cond", 1280),
        c_hidden=c_hidden, nhead=nhead, blocks=blocks, block_repeat=block_repeat,
        level_config=("CT", "CT", "CTA", "CTA"), t_conds=("sca",),
        dropout=kw.pop("dropout", (0.0, 0.0, 0.1, 0.1)), **kw,
    )


STAGE_C = {
    "3b": _stage_c(2048, 32, ((8, 24), (24, 8))),  # 3.6B parameters
    "1b": _stage_c(1536, 24, ((4, 12), (12, 4))),  # "lite"
    "nano": _stage_c(128, 4, ((2, 2), (2, 2)), c_cond=64, c_clip_text=32, c_clip_text_pooled=32, c_clip_img=24,
                     dropout=(0.0, 0.0)),  # the built-in model (scripts/train_nano.py)
    "tiny": _stage_c(64, 2, ((1, 2), (2, 1)), c_cond=32, c_clip_text=32, c_clip_text_pooled=32, c_clip_img=24),
}

STAGE_B = {
    "3b": _stage_b((320, 640, 1280, 1280), (-1, -1, 20, 20), ((2, 6, 28, 6), (6, 28, 6, 2)),
                   ((1, 1, 1, 1), (3, 3, 2, 2))),  # 1.5B parameters (the official config calls it 3B)
    "700m": _stage_b((320, 576, 1152, 1152), (-1, 9, 18, 18), ((2, 4, 14, 4), (4, 14, 4, 2)),
                     ((1, 1, 1, 1), (2, 2, 2, 2))),
    "nano": _stage_b((64, 96, 128, 128), (-1, -1, 4, 4), ((2, 2, 2, 1), (1, 2, 2, 2)), ((1, 1, 1, 1), (2, 2, 1, 1)),
                     c_cond=64, c_clip=32, dropout=(0.0, 0.0, 0.0, 0.0), c_in=8, c_out=8),  # nano Stage A's latent
    "tiny": _stage_b((16, 32, 48, 48), (-1, -1, 2, 2), ((1, 1, 1, 1), (1, 1, 1, 1)), ((1, 1, 1, 1), (3, 3, 2, 2)),
                     c_cond=48, c_clip=32),
}

STAGE_A = {"f4": StageAConfig(), "tiny": StageAConfig(bottleneck_blocks=1, c_hidden=32, codebook_size=16),
           # the built-in model's, 8 latent channels: with 4 (and a pixel loss alone) slanted edges came back as
           # 4 px steps, and scripts/eval_nano.py read 116 of 162 drawn shapes right through it; 8 and an edge loss: 135
           "nano": StageAConfig(bottleneck_blocks=2, c_hidden=64, c_latent=8, codebook_size=16)}
