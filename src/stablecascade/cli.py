"""Command line: a thin shell over the pipeline (parsing, loading, saving, and readable errors)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from . import controlnets, limits
from .errors import InputError, StableCascadeError
from .hub import DECODER_REPO, NANO, PRIOR_REPO
from .sampling import SAMPLERS
from .settings import DEFAULTS

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ENV_PRIOR, ENV_DECODER = "STABLECASCADE_PRIOR", "STABLECASCADE_DECODER"


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--prior", default=os.environ.get(ENV_PRIOR, NANO), metavar="PATH_OR_ID",
                   help=f"Stage C: a diffusers prior folder, a Hub repo id (the released one is {PRIOR_REPO}), or "
                        f"an official file such as stage_c_bf16.safetensors (default: ${ENV_PRIOR}, else the "
                        f"built-in '{NANO}' model: 64x64 coloured shapes, offline, for trying things out)")
    g.add_argument("--decoder", default=os.environ.get(ENV_DECODER, NANO), metavar="PATH_OR_ID",
                   help=f"Stage B (+ Stage A): a diffusers decoder folder, a Hub repo id (the released one is "
                        f"{DECODER_REPO}), or an official file such as stage_b_bf16.safetensors (default: "
                        f"${ENV_DECODER}, else the built-in '{NANO}' model)")
    g.add_argument("--stage-a", metavar="FILE", help="Stage A file (stage_a.safetensors) when --decoder is an "
                                                     "official Stage B file (default: fetched from the Hub)")
    g.add_argument("--text-encoder", metavar="DIR", help="CLIP text encoder folder (transformers layout) when "
                                                         "--prior is an official Stage C file (default: from the Hub)")
    g.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the --text-encoder folder)")
    g.add_argument("--effnet", metavar="FILE", help="EfficientNet encoder (effnet_encoder.safetensors) for img2img "
                                                    "and reconstruct (default: fetched from the Hub when needed)")
    g.add_argument("--previewer", metavar="FILE", help="Previewer (previewer.safetensors) for --previews "
                                                       "(default: fetched from the Hub when needed)")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA (official, kohya or OneTrainer format) with an optional scale (default 1); "
                        "repeat for several")
    g.add_argument("--lora-token", action="append", default=[], metavar="TOKEN=REGEX",
                   help="a trained token of an official LoRA file and the vocabulary regex its embedding starts "
                        "from, e.g. '[fernando]=^dog</w>' (official files do not store them)")
    g.add_argument("--device", help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available)")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="weights and compute precision; fp16 is for GPUs without "
                                                           "bf16 (default: bf16 on GPUs that support it, else fp32)")
    g.add_argument("--offload", choices=["model", "sequential"],
                   help="keep the models in CPU memory: 'model' moves each stage to the GPU for its turn, "
                        "'sequential' one block at a time (for ~8 GB cards; slow) (default: all on the device)")


def _sampling_options(p: argparse.ArgumentParser, native_default: bool, prior: bool = True) -> None:
    g = p.add_argument_group("sampling")
    size_help = "(default: the model's native size, 1024 for the released models, 64 for nano)" if native_default \
        else "(default: from the input image)"
    g.add_argument("--negative", default="", help="what to steer away from (default: empty)")
    g.add_argument("--width", type=int, help=f"image width in pixels, a multiple of 8 {size_help}")
    g.add_argument("--height", type=int,
                   help=f"image height in pixels, a multiple of 8 {size_help}")
    if prior:
        g.add_argument("--steps", type=int, default=DEFAULTS.prior_steps,
                       help=f"Stage C (prior) sampling steps (default {DEFAULTS.prior_steps})")
        g.add_argument("--guidance", type=float, default=DEFAULTS.prior_guidance,
                       help=f"Stage C classifier-free guidance (default {DEFAULTS.prior_guidance})")
    g.add_argument("--decoder-steps", type=int, default=DEFAULTS.decoder_steps,
                   help=f"Stage B (decoder) sampling steps (default {DEFAULTS.decoder_steps})")
    g.add_argument("--decoder-guidance", type=float,
                   help="Stage B guidance; values <= 1 switch it off (default: the model's with the GDF samplers, "
                        "1.1 for the released models; 0 with --sampler diffusers)")
    g.add_argument("--seed", type=int, help="random seed; image i of a run gets seed + i, and that seed alone gives "
                                            "the same image again (default: random, "
                                            "printed and stored in the PNG)")
    g.add_argument("--num-images", type=int, default=DEFAULTS.num_images, help="images to generate per input (default 1)")
    g.add_argument("--sampler", "--sampling", dest="sampling", choices=list(SAMPLERS), default=DEFAULTS.sampler,
                   help="'official': the notebooks' DDPM sampler (the model's shifts, cfg rescale); 'diffusers': "
                        "reproduce diffusers' StableCascade pipelines exactly; 'ddim', 'euler', 'euler_a', "
                        f"'dpmpp_2m': other samplers on the official schedule (default {DEFAULTS.sampler})")
    g.add_argument("--compression", type=float, default=None,
                   help="image pixels per Stage C latent cell: lower is more detail and slower, ComfyUI users like "
                        "~32 (default the model's: 42.67 for the released ones, 1024 px -> 24 cells)")
    if prior:
        g.add_argument("--previews", metavar="DIR", help="save the Previewer's picture of every Stage C step here")
    g.add_argument("--out", default="outputs", help="folder for the PNG files (default ./outputs)")
    limits.add_arguments(p)


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


def _check_output_folder(folder: Path, option: str) -> None:
    """Create `folder` and write a probe file in it, so that an output path that is a file, lies under a file,
    or is read-only or full fails at once instead of after the images are made."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{option} {folder} is a file; give a folder (it is created when missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise InputError(f"{option} {folder} cannot hold the output files ({e.strerror or e}); give a writable "
                         "folder") from None


def _check_limits_before_loading(args, configured: limits.Limits) -> None:
    """What the options and input files show to be over the limits, or unreadable, fails before the models load
    (the pipeline checks again, with the model's default size)."""
    from .images import open_image

    inputs = [*getattr(args, "images", []), *(getattr(args, k, None) for k in ("image", "control", "mask"))]
    for path in filter(None, inputs):
        open_image(path, max_pixels=configured.max_input_pixels, name=str(path), limit_option="--max-input-pixels")
    steps = {k: v for k, v in (("--steps", getattr(args, "steps", None)), ("--decoder-steps", args.decoder_steps))
             if v is not None}
    configured.check_generation(width=args.width or 1, height=args.height or 1, images=args.num_images, steps=steps,
                                seed=args.seed)


def _free_path(out: Path, stem: str) -> Path:
    """The next unused numbered file name: existing pictures are never overwritten."""
    n = 1 + max((int(p.stem.rsplit("_", 1)[1]) for p in out.glob(f"{stem}_*.png")
                 if p.stem.rsplit("_", 1)[1].isdigit()), default=0)
    return out / f"{stem}_{n:05d}.png"


def _load(args):
    import torch

    from . import load_pipeline

    prior, decoder = _sources(args)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    started = time.perf_counter()
    pipe = load_pipeline(prior, decoder, device=args.device, dtype=dtype, effnet=args.effnet,
                         previewer=args.previewer, offload=args.offload)
    tokens = [tuple(t.split("=", 1)) if "=" in t else (t, None) for t in args.lora_token]
    for spec in args.lora:
        path, scale = _lora_spec(spec)
        pipe.load_lora(path, scale, new_tokens=tokens or None)
    print(f"loaded models in {time.perf_counter() - started:.1f}s ({pipe.device}, {pipe.dtype})", file=sys.stderr)
    return pipe


def _lora_spec(spec: str) -> tuple[str, float]:
    """FILE[:SCALE] (a Windows drive letter's colon is not a scale)."""
    path, sep, scale = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            value = float(scale)
        except ValueError:
            raise InputError(f"--lora {spec!r}: the scale after ':' must be a number") from None
        if not math.isfinite(value):
            raise InputError(f"--lora {spec!r}: the scale after ':' must be a finite number")
        return path, value
    return spec, 1.0


def _options(args) -> dict:
    """Keyword arguments of the pipeline's modes from the parsed options."""
    options = dict(negative_prompt=args.negative, num_images_per_prompt=args.num_images,
                   decoder_steps=args.decoder_steps, decoder_guidance=args.decoder_guidance, seed=args.seed,
                   sampling=args.sampling, compression=args.compression)
    if hasattr(args, "steps"):
        options.update(prior_steps=args.steps, prior_guidance=args.guidance)
    options.update({k: v for k, v in (("width", args.width), ("height", args.height)) if v is not None})
    if getattr(args, "previews", None):
        options["preview_callback"] = _preview_saver(Path(args.previews))
    return options


def _preview_saver(folder: Path):
    from .images import to_pil

    folder.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("preview_%Y%m%d-%H%M%S")

    def save(step, previews):
        for i, image in enumerate(to_pil(previews)):
            image.save(folder / f"{stem}_{i:02d}_step{step + 1:03d}.png")

    return save


def _parameters(image, args, pipe, **extra) -> dict:
    """An image's PNG metadata: the pipeline's parameters and the models that made it."""
    return {**image.info["parameters"], "prior": str(args.prior), "decoder": str(args.decoder),
            "dtype": str(pipe.dtype).replace("torch.", ""), "loras": pipe.loras, **extra}


def _save(images, args, pipe, started, **extra) -> list:
    from .images import save_png

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for image in images:
        paths.append(save_png(image, _free_path(out, "stablecascade"), _parameters(image, args, pipe, **extra)))
        print(paths[-1])
    seeds = [im.info["parameters"]["seed"] for im in images]
    print(f"made {len(images)} image(s) in {time.perf_counter() - started:.1f}s, seed{'s' * (len(seeds) > 1)} "
          f"{', '.join(map(str, seeds))}", file=sys.stderr)
    return paths


def _generate(args) -> int:
    pipe = _load(args)
    started = time.perf_counter()
    _save(pipe(args.prompt, **_options(args)), args, pipe, started)
    return 0


def _variation(args) -> int:
    pipe = _load(args)
    started = time.perf_counter()
    images = pipe.variation(args.images, prompt=args.prompt, weights=args.weights, **_options(args))
    _save(images, args, pipe, started, inputs=[str(p) for p in args.images])
    return 0


def _img2img(args) -> int:
    pipe = _load(args)
    started = time.perf_counter()
    images = pipe.img2img(args.image, args.prompt, strength=args.strength, **_options(args))
    _save(images, args, pipe, started, input=str(args.image))
    return 0


def _controlnet(args) -> int:
    pipe = _load(args)
    if args.controlnet:
        pipe.load_controlnet(args.kind, args.controlnet)
    started = time.perf_counter()
    outpaint = args.outpaint[0] if args.outpaint and len(args.outpaint) == 1 else args.outpaint
    images, controls = pipe.controlnet(args.kind, args.control, args.prompt, mask=args.mask, outpaint=outpaint,
                                       control_strength=args.control_strength, saliency=args.saliency,
                                       face_models=args.face_models, **_options(args))
    _save(images, args, pipe, started, control=str(args.control), mask=str(args.mask) if args.mask else None)
    for control in controls:
        path = _free_path(Path(args.out), f"control_{args.kind}")
        control.save(path)
        print(path)
    return 0


def _reconstruct(args) -> int:
    from .images import load_image, psnr, resize
    from .geometry import round8

    pipe = _load(args)
    for path in args.images:
        started = time.perf_counter()
        original = load_image(path)[None]
        latents = pipe.encode(original, compression=args.compression)
        options = {"width": round8(original.shape[-1]), "height": round8(original.shape[-2]), **_options(args)}
        images = pipe.decode(latents, prompt=args.prompt, **options)
        saved = _save(images, args, pipe, started, input=str(path), latent_shape=list(latents.shape[1:]))
        for image, file in zip(images, saved):
            out = load_image(image)[None]
            print(f"{file}: Stage C latent {tuple(latents.shape[1:])}, "
                  f"PSNR {psnr(out, resize(original, *out.shape[-2:])):.2f} dB against the input")
    return 0


def _batch(args) -> int:
    from . import batch

    return batch.run(args, _load, _options, _parameters)


def _serve(args) -> int:
    from . import server

    return server.main(args, _load)


def _ui(args) -> int:
    from . import webui

    return webui.main(args, _load)


def _download(args) -> int:
    from . import download

    return download.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stablecascade", description="Stable Cascade (Würstchen v3) image generation.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text-to-image", description="Generate images from a text prompt. "
                       "Each PNG carries its generation parameters in its text metadata.")
    g.add_argument("prompt", help="what to draw")
    _sampling_options(g, True)
    _model_options(g)
    g.set_defaults(run=_generate)

    v = sub.add_parser("variation", help="variations of images (CLIP image embeddings)",
                       description="Generate variations of one or more images; several images are mixed.")
    v.add_argument("images", nargs="+", type=Path, help="input images")
    v.add_argument("--prompt", default="", help="optional text to steer the variation")
    v.add_argument("--weights", type=float, nargs="+", help="one weight per image for mixing (default 1 each)")
    _sampling_options(v, True)
    _model_options(v)
    v.set_defaults(run=_variation)

    i = sub.add_parser("img2img", help="image-to-image", description="Redraw an image with a prompt: its Stage C "
                       "and Stage A latents are noised to --strength and denoised.")
    i.add_argument("image", type=Path, help="input image")
    i.add_argument("prompt", help="what to draw")
    i.add_argument("--strength", type=float, default=0.8,
                   help="0 keeps the input, 1 ignores it (default 0.8, the official example)")
    _sampling_options(i, False)
    _model_options(i)
    i.set_defaults(run=_img2img)

    c = sub.add_parser("controlnet", help=f"generate under a ControlNet ({', '.join(controlnets.KINDS)})",
                       description="Generate under a ControlNet. Saves the control image the filter made beside "
                                   "the results.")
    c.add_argument("prompt", help="what to draw")
    c.add_argument("--kind", required=True, choices=list(controlnets.KINDS), help=controlnets.summary())
    c.add_argument("--control", required=True, type=Path, help="the control image")
    c.add_argument("--mask", type=Path, help="inpaint: mask image, white = area to generate")
    c.add_argument("--outpaint", type=int, nargs="+", metavar="PIXELS",
                   help="inpaint: extend the image by PIXELS on every side, or LEFT TOP RIGHT BOTTOM")
    c.add_argument("--saliency", type=Path, help="inpaint without --mask: safetensors weights of the official "
                                                 "saliency model, which picks the area to regenerate")
    c.add_argument("--face-models", type=Path, help="face: folder with insightface's buffalo_l det_10g.onnx and "
                                                    "w600k_r50.onnx")
    c.add_argument("--control-strength", type=float, default=1.0,
                   help="multiplier of the ControlNet's features (default 1; 0.8 or 0.3 loosen the control)")
    c.add_argument("--controlnet", type=Path, help="ControlNet weights (default: the released file from the Hub)")
    _sampling_options(c, False)
    _model_options(c)
    c.set_defaults(run=_controlnet)

    r = sub.add_parser("reconstruct", help="encode images to Stage C latents and decode them back",
                       description="Encode each image to a Stage C latent (16x24x24 for 1024 px) and decode it with "
                                   "Stage B and Stage A; prints the PSNR of each reconstruction.")
    r.add_argument("images", nargs="+", type=Path, help="input images")
    r.add_argument("--prompt", default="", help="optional caption given to Stage B")
    _sampling_options(r, False, prior=False)
    _model_options(r)
    r.set_defaults(run=_reconstruct)

    from . import batch

    b = sub.add_parser("batch", help="generate a dataset from a prompt file, on one device or many (torchrun)",
                       description=batch.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _sampling_options(b, True)
    batch.add_arguments(b)
    _model_options(b)
    b.set_defaults(run=_batch)

    from . import download, server, webui  # light imports: FastAPI/Gradio load only when a command runs

    s = sub.add_parser("serve", help="HTTP API over one shared model (FastAPI)",
                       description="Serve a JSON API with a bounded job queue; OpenAPI docs at /docs. Needs the "
                                   "web extra (pip install 'stablecascade[web]').")
    server.add_arguments(s)
    _model_options(s)
    s.set_defaults(run=_serve)

    u = sub.add_parser("ui", help="web UI (Gradio)",
                       description="Web UI with text-to-image, variation, image-to-image, ControlNet and LoRA tabs, "
                                   "live previews, a gallery and a shared queue. Needs the web extra.")
    webui.add_arguments(u)
    _model_options(u)
    u.set_defaults(run=_ui)

    d = sub.add_parser("download", help="fetch the official weights from the Hugging Face Hub",
                       description="Fetch the official model files (the download_models.sh choices) with resume, "
                                   "cache, offline mode and checksums.")
    download.add_arguments(d)
    d.set_defaults(run=_download)

    from . import train

    t = sub.add_parser("train", help="finetune Stage C or Stage B, train a LoRA or a ControlNet",
                       description=train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(t)
    t.set_defaults(run=train.run)
    return parser


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (argparse prints the whole usage block, which buries the message)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    previous = limits.current()  # restored on return: main() may run inside a longer-lived process (tests)
    try:
        configured = limits.from_args(args)
        if configured is not None:
            limits.set_current(configured)
            _check_limits_before_loading(args, configured)
        for spec in getattr(args, "lora", []):  # a bad scale fails before the models load
            _lora_spec(spec)
        for option, folder in (("--out", getattr(args, "out", None)), ("--previews", getattr(args, "previews", None))):
            if folder:  # before loading anything, so that no work is lost
                _check_output_folder(Path(folder), option)
        return args.run(args)
    except StableCascadeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        limits.set_current(previous)


if __name__ == "__main__":
    sys.exit(main())
