"""Command line: a thin shell over the pipeline (parsing, loading, saving, and readable errors)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .errors import InputError, StableCascadeError
from .hub import DECODER_REPO, PRIOR_REPO

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
ENV_PRIOR, ENV_DECODER = "STABLECASCADE_PRIOR", "STABLECASCADE_DECODER"


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--prior", default=os.environ.get(ENV_PRIOR, PRIOR_REPO), metavar="PATH_OR_ID",
                   help="Stage C: a diffusers prior folder, a Hub repo id, or an official file such as "
                        f"stage_c_bf16.safetensors (default: ${ENV_PRIOR} or {PRIOR_REPO})")
    g.add_argument("--decoder", default=os.environ.get(ENV_DECODER, DECODER_REPO), metavar="PATH_OR_ID",
                   help="Stage B (+ Stage A): a diffusers decoder folder, a Hub repo id, or an official file such as "
                        f"stage_b_bf16.safetensors (default: ${ENV_DECODER} or {DECODER_REPO})")
    g.add_argument("--stage-a", metavar="FILE", help="Stage A file (stage_a.safetensors) when --decoder is an "
                                                     "official Stage B file (default: fetched from the Hub)")
    g.add_argument("--text-encoder", metavar="DIR", help="CLIP text encoder folder (transformers layout) when "
                                                         "--prior is an official Stage C file (default: from the Hub)")
    g.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the --text-encoder folder)")
    g.add_argument("--device", help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available)")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="weights and compute precision "
                                                           "(default: bf16 on GPUs that support it, else fp32)")


def _sources(args) -> tuple:
    prior, decoder = args.prior, args.decoder
    extra_prior = {k: v for k, v in (("text_encoder", args.text_encoder), ("tokenizer", args.tokenizer or
                                                                             args.text_encoder)) if v}
    if extra_prior:
        if not Path(prior).is_file():
            raise InputError("--text-encoder/--tokenizer go with an official Stage C file given as --prior")
        prior = {"stage_c": prior, **extra_prior}
    if args.stage_a:
        if not Path(decoder).is_file():
            raise InputError("--stage-a goes with an official Stage B file given as --decoder")
        decoder = {"stage_b": decoder, "stage_a": args.stage_a}
    return prior, decoder


def _free_path(out: Path, stem: str) -> Path:
    """The next unused numbered file name: existing pictures are never overwritten."""
    n = 1 + max((int(p.stem.rsplit("_", 1)[1]) for p in out.glob(f"{stem}_*.png")
                 if p.stem.rsplit("_", 1)[1].isdigit()), default=0)
    return out / f"{stem}_{n:05d}.png"


def _generate(args) -> int:
    import torch

    from . import load_pipeline
    from .images import save_png

    prior, decoder = _sources(args)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    started = time.perf_counter()
    pipe = load_pipeline(prior, decoder, device=args.device, dtype=dtype)
    print(f"loaded models in {time.perf_counter() - started:.1f}s ({pipe.device}, {pipe.dtype})", file=sys.stderr)
    started = time.perf_counter()
    images = pipe(args.prompt, negative_prompt=args.negative, width=args.width, height=args.height,
                  num_images_per_prompt=args.num_images, prior_steps=args.steps, prior_guidance=args.guidance,
                  decoder_steps=args.decoder_steps, decoder_guidance=args.decoder_guidance, seed=args.seed,
                  sampling=args.sampling)
    elapsed = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for image in images:
        parameters = {**image.info["parameters"], "prior": str(args.prior), "decoder": str(args.decoder),
                      "dtype": str(pipe.dtype).replace("torch.", "")}
        print(save_png(image, _free_path(out, "stablecascade"), parameters))
    print(f"generated {len(images)} image(s) in {elapsed:.1f}s, seed {images[0].info['parameters']['seed']}",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablecascade", description="Stable Cascade (Würstchen v3) image generation.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text-to-image", description="Generate images from a text prompt. "
                       "Each PNG carries its generation parameters in its text metadata.")
    g.add_argument("prompt", help="what to draw")
    g.add_argument("--negative", default="", help="what to steer away from (default: empty)")
    g.add_argument("--width", type=int, default=1024, help="image width in pixels, a multiple of 8 (default 1024)")
    g.add_argument("--height", type=int, default=1024, help="image height in pixels, a multiple of 8 (default 1024)")
    g.add_argument("--steps", type=int, default=20, help="Stage C (prior) sampling steps (default 20)")
    g.add_argument("--guidance", type=float, default=4.0, help="Stage C classifier-free guidance (default 4.0)")
    g.add_argument("--decoder-steps", type=int, default=10, help="Stage B (decoder) sampling steps (default 10)")
    g.add_argument("--decoder-guidance", type=float, default=0.0,
                   help="Stage B guidance; values <= 1 switch it off (default 0.0)")
    g.add_argument("--seed", type=int, help="random seed; the same seed gives the same image (default: random, "
                                            "printed and stored in the PNG)")
    g.add_argument("--num-images", type=int, default=1, help="images to generate for the prompt (default 1)")
    g.add_argument("--sampling", choices=["official", "diffusers"], default="official",
                   help="'official': the notebooks' sampler (shift 2, cfg rescale); 'diffusers': reproduce "
                        "diffusers' StableCascade pipelines exactly (default official)")
    g.add_argument("--out", default="outputs", help="folder for the PNG files (default ./outputs)")
    _model_options(g)
    g.set_defaults(run=_generate)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except StableCascadeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
