"""Evaluate the nano model: prompt alignment on held-out (colour, shape, position) combinations and
reconstruction PSNR.

Alignment: each generated 64 px image is analysed without any learned model: the background colour is the
palette colour nearest the border pixels, the shape's colour that of the pixels farthest from it; the shape is the
largest connected region of pixels nearer its colour than the background's; the 3x3 cell of its centroid gives the
position, and which of the three drawn shapes of its area, placed at its centroid, overlaps it most gives the shape.
It reads every drawn combination right, blurred by one or two pixels too (tests/test_train.py). Reconstruction:
held-out pictures are encoded to Stage C latents (the nano encoder) and decoded by Stage B + Stage A without a prompt
(`pipe.encode` / `pipe.decode`), and compared with the originals (PSNR, and how often the detector reads the drawn
shape back); Stage A alone is reported too. Image-to-image: strength 0 must return the picture (PSNR), strength 0.5
with a prompt naming another colour must keep its position and background; how often it takes the asked colour and
keeps the picture's shape is reported too.

    python scripts/eval_nano.py [--model nano|FOLDER] [--n 60] [--split heldout|train] [--json FILE]
                                [--lora FILE] [--sampler NAME] [--prior-steps N] [--prior-guidance G]
                                [--decoder-steps N] [--decoder-guidance G] [--decoder FILE]

A consistency LoRA (`--lora`, e.g. the shipped nano_lcm_c.safetensors) switches Stage C to its sampler, steps and
guidance unless the options say otherwise; so does a consistency Stage B (`--decoder`, a `train lcm` student of
Stage B) for Stage B.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from make_shapes import COLOURS, POSITIONS, caption, draw, heldout  # noqa: E402

PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
NAMES = list(COLOURS)


def nearest(rgb) -> str:
    return NAMES[int(np.argmin(((PALETTE - np.asarray(rgb, dtype=np.float32)) ** 2).sum(1)))]


def analyse(image: np.ndarray) -> dict:
    """image (H,W,3) uint8 -> detected background, colour, shape, position (None where nothing is found)."""
    h, w, _ = image.shape
    img = image.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.sqrt(((img - bg) ** 2).sum(-1))
    out = {"background": nearest(bg), "colour": None, "shape": None, "position": None}
    if (dist > 60).sum() < 0.01 * h * w:
        return out
    # the shape's colour from its core (the pixels farthest from the background), not from a soft edge's halo
    fg = np.median(img[dist >= 0.75 * dist.max()], axis=0)
    out["colour"] = nearest(fg)
    # a pixel belongs to the shape when it is nearer the shape's colour than the background's: a blurred edge then
    # keeps the shape's outline (a fixed distance would widen it by the blur, rounding a triangle into a "circle")
    along = ((img - bg) @ (fg - bg)) / max(float(((fg - bg) ** 2).sum()), 1e-6)
    mask = largest_region(along > 0.5)
    ys, xs = np.nonzero(mask)
    row, col = min(2, int(ys.mean() / h * 3)), min(2, int(xs.mean() / w * 3))
    out["position"] = next(k for k, v in POSITIONS.items() if v == (row, col))
    out["shape"] = nearest_shape(mask)
    return out


def nearest_shape(mask: np.ndarray) -> str:
    """The drawn shape (make_shapes.draw's proportions: an upright triangle of base 2r and height 1.8r, an
    axis-aligned square) of the mask's area, placed at its centroid, that overlaps the mask most (intersection over
    union). Unlike the fill of the bounding box it does not hinge on a triangle's one-pixel apex, which a decoder
    blunts (the box then shrinks and the fill reads "circle"); a shapeless blob reads as the circle."""
    ys, xs = np.nonzero(mask)
    area, cy, cx = len(ys), ys.mean() + 0.5, xs.mean() + 0.5
    y, x = np.mgrid[0:mask.shape[0], 0:mask.shape[1]] + 0.5
    r = np.sqrt(area / np.pi)
    half = np.sqrt(area) / 2
    t = np.sqrt(area / 1.8)  # the triangle's r; its centroid lies 0.2 r below its centre, its apex r above that
    down = (y - (cy - 1.2 * t)) / (1.8 * t)  # 0 at the apex, 1 at the base
    ideal = {"circle": (y - cy) ** 2 + (x - cx) ** 2 <= r * r,
             "square": (abs(y - cy) <= half) & (abs(x - cx) <= half),
             "triangle": (down >= 0) & (down <= 1) & (abs(x - cx) <= down * t)}
    overlap = {k: (mask & m).sum() / (mask | m).sum() for k, m in ideal.items()}
    return max(overlap, key=overlap.get)


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask: the shape without stray pixels elsewhere (a decoder's
    specks at the border would otherwise move its centroid and add to its area)."""
    label = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, region, (h, w) = 0, 0, 0, mask.shape
    for start in zip(*np.nonzero(mask)):
        if label[start]:
            continue
        region, n = region + 1, 0
        label[start], stack = region, [start]
        while stack:
            y, x = stack.pop()
            n += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not label[ny, nx]:
                    label[ny, nx] = region
                    stack.append((ny, nx))
        if n > best_size:
            best, best_size = region, n
    return label == best


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3,H,W) in [0, 1] -> (H,W,3) uint8, as a saved picture holds it."""
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="nano", help="the built-in model, or a folder written by train_nano.py")
    p.add_argument("--n", type=int, default=60, help="prompts to generate")
    p.add_argument("--pictures", type=int, default=16, help="held-out pictures to reconstruct and vary (0: none)")
    p.add_argument("--split", choices=("heldout", "train"), default="heldout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--decoder-guidance", type=float, help="Stage B guidance (default: the model's)")
    p.add_argument("--decoder-steps", type=int, help="Stage B steps (default: the pipeline's)")
    p.add_argument("--decoder", type=Path, help="a Stage B file to use instead of the model's")
    p.add_argument("--lora", type=Path, help="a LoRA file to load (merged) before generating")
    p.add_argument("--sampler", default=None, help="the sampler (default: the pipeline's)")
    p.add_argument("--prior-steps", type=int, help="Stage C steps (default: the pipeline's)")
    p.add_argument("--prior-guidance", type=float, help="Stage C guidance (default: the pipeline's)")
    a = p.parse_args(argv)
    import stablecascade
    from stablecascade.loading import NANO_DIR

    folder = NANO_DIR if a.model == "nano" else Path(a.model)
    decoder = a.model if a.decoder is None else {"stage_b": str(a.decoder),
                                                 "stage_a": str(folder / "decoder" / "vqgan")}
    pipe = stablecascade.load_pipeline(a.model, decoder, device="cpu", dtype=torch.float32)
    if a.lora:
        pipe.load_lora(a.lora)
    chosen = {k: v for k, v in (("sampling", a.sampler), ("prior_steps", a.prior_steps),
                                ("prior_guidance", a.prior_guidance)) if v is not None}
    decoding = {k: v for k, v in (("decoder_steps", a.decoder_steps), ("decoder_guidance", a.decoder_guidance))
                if v is not None}
    rng = random.Random(a.seed)
    held = heldout()
    triples = sorted(held) if a.split == "heldout" else sorted(
        set(itertools.product(COLOURS, ("circle", "square", "triangle"), POSITIONS)) - held)
    cases = []
    for i in range(a.n):
        colour, shape, position = triples[i % len(triples)]
        background = rng.choice([c for c in COLOURS if c != colour])
        cases.append((colour, shape, position, background))
    hits = {k: 0 for k in ("colour", "shape", "position", "background", "all")}
    for i, (colour, shape, position, background) in enumerate(cases):
        prompt = caption(colour, shape, position, background)
        image = pipe(prompt, width=64, height=64, seed=a.seed + i, progress=False, **decoding, **chosen)[0]
        used = image.info["parameters"]  # the settings the pipeline ran with (a consistency stage's, say)
        found = analyse(np.asarray(image.convert("RGB")))
        truth = {"colour": colour, "shape": shape, "position": position, "background": background}
        ok = {k: found[k] == truth[k] for k in truth}
        for k, v in ok.items():
            hits[k] += v
        hits["all"] += all(ok.values())
    alignment = {k: round(v / len(cases), 3) for k, v in hits.items()}

    figures = {"split": a.split, "prompts": len(cases), "lora": a.lora and a.lora.name,
               "decoder": a.decoder and a.decoder.name,
               **{k: used[k] for k in ("sampling", "prior_steps", "prior_guidance", "decoder_steps",
                                       "decoder_guidance")},
               "decoder_sampling": used.get("decoder_sampling", used["sampling"]), "alignment": alignment,
               **(round_trips(pipe, cases[:a.pictures], a.seed, decoding, chosen) if a.pictures else {})}
    print(json.dumps(figures, indent=1))
    if a.json:
        a.json.write_text(json.dumps(figures, indent=1))


def round_trips(pipe, pictures: list, seed: int, decoding: dict, chosen: dict) -> dict:
    """Reconstruction (Stage A alone, and Stage B + Stage A from the Stage C latents) and image-to-image at
    strength 0 and 0.5 of the given (colour, shape, position, background) pictures, drawn as in training."""
    from stablecascade.images import psnr

    images = torch.stack([torch.from_numpy(np.array(draw(*c, size=64, jitter=1.0, rng=random.Random(j))))
                          .permute(2, 0, 1).float() / 255 for j, c in enumerate(pictures)])
    with torch.no_grad():
        stage_a_only = pipe.stage_a.decode(pipe.stage_a.encode(images)).clamp(0, 1)
    latents = pipe.encode(list(images))
    full = torch.cat([pipe.decode(latents[i:i + 16], width=64, height=64, seed=seed + i, output_type="pt",
                                  progress=False, **decoding) for i in range(0, len(latents), 16)])  # 16 a call at most
    shapes_kept, shapes_stage_a = (np.mean([analyse(to_uint8(f))["shape"] == c[1] for f, c in zip(out, pictures)])
                                   for out in (full, stage_a_only))
    kept, layout, recoloured, reshaped = [], [], [], []
    for j, (picture, (colour, shape, position, background)) in enumerate(zip(images, pictures)):
        same = pipe.img2img(picture, caption(colour, shape, position, background), strength=0.0, seed=seed + j,
                            **decoding, output_type="pt", progress=False)
        other = next(c for c in NAMES[NAMES.index(colour) + 1:] + NAMES if c not in (colour, background))
        half = pipe.img2img(picture, caption(other, shape, position, background), strength=0.5, seed=seed + j,
                            **decoding, output_type="pt", progress=False, **chosen)
        kept.append(same)
        found = analyse(to_uint8(half[0]))
        layout.append(found["position"] == position and found["background"] == background)
        recoloured.append(found["colour"] == other)
        reshaped.append(found["shape"] == shape)
    return {"pictures": len(pictures), "psnr_stage_a": round(psnr(stage_a_only, images), 2),
            "stage_a_shape": round(shapes_stage_a, 3),
            "psnr_reconstruction": round(psnr(full, images), 2), "reconstruction_shape": round(shapes_kept, 3),
            "psnr_img2img_strength_0": round(psnr(torch.cat(kept), images), 2),
            "img2img_strength_half_keeps_layout": round(float(np.mean(layout)), 3),
            "img2img_strength_half_takes_the_colour": round(float(np.mean(recoloured)), 3),
            "img2img_strength_half_keeps_the_shape": round(float(np.mean(reshaped)), 3)}


if __name__ == "__main__":
    main()
