"""Teach the built-in nano model a new token with a LoRA, and measure what it learned.

The token ("[zorb]" by default) means one colour ("yellow"): half the training images are shapes of that colour
captioned with the token instead of the colour word ("a [zorb] circle at the top left on a blue background"), the
other half ordinary captioned shapes of the other colours, so the LoRA learns the token rather than "everything is
yellow". The measurement generates one image per seed for prompts that use the token (random shape, position and
background), and counts the images whose shape the nano evaluation's detector (`eval_nano.analyse`) finds in the
token's colour, with and without the LoRA; it also counts how often prompts naming the other colours get them,
with and without the LoRA (what the LoRA must not break).

    python scripts/nano_token.py data runs/nano_token/data [--count 512]
    stablecascade train lora --config configs/nano/lora.yaml
    python scripts/nano_token.py eval runs/nano_token/final/lora.safetensors [--seeds 16]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from eval_nano import analyse  # noqa: E402
from make_shapes import COLOURS, POSITIONS, SHAPES, caption, draw  # noqa: E402

TOKEN, COLOUR = "[zorb]", "yellow"


def make_data(out: Path, count: int, token: str = TOKEN, colour: str = COLOUR, size: int = 64,
              seed: int = 0) -> None:
    """`count` PNG + caption pairs: even ones in `colour` captioned with `token`, odd ones in other colours."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    others = [c for c in COLOURS if c != colour]
    for i in range(count):
        fg = colour if i % 2 == 0 else rng.choice(others)
        shape, position = rng.choice(SHAPES), rng.choice(list(POSITIONS))
        background = rng.choice([c for c in COLOURS if c != fg])
        draw(fg, shape, position, background, size, jitter=1.0, rng=rng).save(out / f"{i:05d}.png")
        text = caption(fg, shape, position, background)
        (out / f"{i:05d}.txt").write_text(text.replace(f"a {colour} ", f"a {token} ", 1) if fg == colour else text)


def prompts(n: int, word: str, colour: str, seed: int = 0) -> list[str]:
    """n prompts "a <word> <shape> <where> on a <background> background" (backgrounds other than `colour`)."""
    rng = random.Random(seed)
    return [caption(word, rng.choice(SHAPES), rng.choice(list(POSITIONS)),
                    rng.choice([c for c in COLOURS if c != colour])) for _ in range(n)]


def colour_share(pipe, texts: list[str], colour: str, seed: int = 0) -> float:
    """Share of images (seed + i for prompt i) whose detected shape colour is `colour`."""
    images = pipe(texts, width=64, height=64, seed=seed, progress=False)
    return sum(analyse(np.asarray(im.convert("RGB")))["colour"] == colour for im in images) / len(texts)


def measure(pipe, lora, seeds: int = 16, token: str = TOKEN, colour: str = COLOUR) -> dict:
    """Shares of `colour` for token prompts without and with the LoRA (path or state dict), and of the named
    colour for prompts naming the other colours with the LoRA."""
    token_prompts = prompts(seeds, token, colour)
    others = [c for c in COLOURS if c != colour]
    other_prompts = [(prompts(seeds // len(others) or 1, c, c, seed=j), c) for j, c in enumerate(others)]

    def kept():
        return sum(colour_share(pipe, texts, c) * len(texts) for texts, c in other_prompts) / sum(
            len(texts) for texts, _ in other_prompts)

    without, kept_without = colour_share(pipe, token_prompts, colour), kept()
    pipe.load_lora(lora)
    with_lora, kept_with = colour_share(pipe, token_prompts, colour), kept()
    pipe.unload_loras()
    return {"token": token, "colour": colour, "seeds": seeds, "share_without_lora": round(without, 3),
            "share_with_lora": round(with_lora, 3), "other_colours_right_without_lora": round(kept_without, 3),
            "other_colours_right_with_lora": round(kept_with, 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="write the training images")
    d.add_argument("out", type=Path)
    d.add_argument("--count", type=int, default=512)
    e = sub.add_parser("eval", help="measure a trained LoRA")
    e.add_argument("lora", type=Path)
    e.add_argument("--seeds", type=int, default=16)
    e.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args(argv)
    if a.command == "data":
        make_data(a.out, a.count)
        print(f"wrote {a.count} images to {a.out}")
        return
    import torch

    import stablecascade

    pipe = stablecascade.load_pipeline("nano", "nano", device="cpu", dtype=torch.float32)
    figures = measure(pipe, a.lora, a.seeds)
    print(json.dumps(figures, indent=1))
    if a.json:
        a.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
