"""Generate the nano model's dataset: one coloured shape at one of nine positions on a plain background, with a
caption like "a red circle at the top left on a blue background" (PNG + .txt pairs).

Some (colour, shape, position) combinations are held out of training (`heldout()`), so the evaluation can ask
for combinations the model never saw.

    python scripts/make_shapes.py OUT_DIR [--count 4000] [--size 64] [--seed 0] [--split train|heldout]
"""

from __future__ import annotations

import argparse
import itertools
import random
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30),
           "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0, 0), "top": (0, 1), "top right": (0, 2), "left": (1, 0), "centre": (1, 1),
             "right": (1, 2), "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2)}


# how people write the middle cell; training captions use each, so every one of them works in a prompt
CENTRE_WORDINGS = ("in the centre", "in the center", "in the middle", "at the centre", "at the center")


def caption(colour, shape, position, background, wording: int = 0) -> str:
    """The caption; `wording` picks one of CENTRE_WORDINGS for the middle cell (0: "in the centre")."""
    where = f"at the {position}" if position != "centre" else CENTRE_WORDINGS[wording % len(CENTRE_WORDINGS)]
    return f"a {colour} {shape} {where} on a {background} background"


def heldout() -> set:
    """Every 7th (colour, shape, position) triple in a fixed order: about 14 % of the 162, never trained on."""
    triples = list(itertools.product(COLOURS, SHAPES, POSITIONS))
    return {t for i, t in enumerate(triples) if i % 7 == 3}


def draw(colour, shape, position, background, size=64, jitter=0.0, rng=None):
    from PIL import Image, ImageDraw

    rng = rng or random.Random(0)
    im = Image.new("RGB", (size, size), COLOURS[background])
    d = ImageDraw.Draw(im)
    row, col = POSITIONS[position]
    cell = size / 3
    r = cell * (0.36 + jitter * rng.uniform(-0.06, 0.06))
    # centred at a quarter, half and three quarters of the picture (inside its thirds): at the nano model's 16 px per
    # Stage C latent cell (and Stage A's 4 px) every position then puts its shape at the same place relative to the
    # cells, so a shape is one latent pattern wherever it is drawn. Centred in the thirds, each position had its own
    # offset, and the encoder's latent named the shapes of held-out combinations only 0.38 of the time, not 0.75
    cx = size / 4 * (col + 1) + jitter * rng.uniform(-0.08, 0.08) * cell
    cy = size / 4 * (row + 1) + jitter * rng.uniform(-0.08, 0.08) * cell
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    return im


def combos(split: str):
    held = heldout()
    for colour, shape, position in itertools.product(COLOURS, SHAPES, POSITIONS):
        if ((colour, shape, position) in held) == (split == "heldout"):
            for background in COLOURS:
                if background != colour:
                    yield colour, shape, position, background


def generate(out: Path, count: int, size: int = 64, seed: int = 0, split: str = "train") -> list[tuple]:
    rng, wordings = random.Random(seed), random.Random(seed + 1)  # a second stream: the pictures stay as they were
    pool = list(combos(split))
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(count):
        colour, shape, position, background = pool[i % len(pool)] if i < len(pool) else rng.choice(pool)
        draw(colour, shape, position, background, size, jitter=1.0, rng=rng).save(out / f"{i:06d}.png")
        (out / f"{i:06d}.txt").write_text(caption(colour, shape, position, background,
                                                  wordings.randrange(len(CENTRE_WORDINGS))))
        made.append((colour, shape, position, background))
    return made


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--count", type=int, default=4000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=("train", "heldout"), default="train")
    a = p.parse_args(argv)
    generate(a.out, a.count, a.size, a.seed, a.split)
    print(f"wrote {a.count} images to {a.out}")


if __name__ == "__main__":
    main()
