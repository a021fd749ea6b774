"""Train the nano Stable Cascade (all three stages on tiny configs, 64 px shapes) and export it in the layout
`load_pipeline` reads: OUT/prior/{prior,text_encoder,tokenizer} and OUT/decoder/{decoder,vqgan}, plus the
NanoEncoder that defined the Stage C latent space (OUT/nano_encoder.safetensors), a small Previewer
(OUT/previewer.safetensors) and OUT/model.json, which tells `load_pipeline` about them and the native size.

    python scripts/train_nano.py --work runs/nano --out src/stablecascade/assets/nano [--scale 1.0]

The recipe (configs/nano/*.yaml) is the source of the Stage B and Stage C settings; `--scale` multiplies step counts.
The encoder and Previewer train first; then Stage C trains in one process while Stage A and then Stage B train in
another, a CPU thread each; Stage A's decoder is refined once Stage C is done.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# image pixels per Stage C latent cell (model.json "compression", configs/nano/*.yaml): 64 px pictures get 4x4
# latents, which hold a shape where the released models' 42.67 would leave a 2x2 latent that cannot
COMPRESSION = 16
# Stage B guidance (Stage C latent vs none) the nano model samples with by default: without it the small Stage B
# paints the backgrounds but only faint shapes (scripts/eval_nano.py --decoder-guidance measures it)
DECODER_GUIDANCE = 2.0
# prompts the UI and API offer as examples (model.json "examples"): the captions' exact wording
EXAMPLES = [("red", "circle", "top left", "blue"), ("yellow", "square", "centre", "black"),
            ("white", "triangle", "bottom right", "green"), ("blue", "circle", "top", "yellow")]
sys.path.insert(0, str(ROOT / "scripts"))


def _batches(data: Path, batch: int, seed: int):
    """An endless stream of ((B,3,64,64) training images in [0, 1], their captions)."""
    from stablecascade.train import data as D

    source = D.ImageSource(D.index_sources([str(data)]))
    sampler = D.Sampler(source, batch, [(64, 64)], seed=seed)
    while True:
        yield D.load_batch(source, next(sampler), slice(None), {})


def _fit(name: str, params, loss_of, batches, steps: int, lr: float) -> None:
    """AdamW on loss_of(images, captions): 50 warm-up steps, then a linear decay to a tenth of `lr`."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for step in range(steps):
        loss = loss_of(*next(batches))
        opt.zero_grad()
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / steps))
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"{name} step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)


def train_stage_a(data: Path, steps: int, batch: int, lr: float, seed: int = 0):
    """Stage A (tiny VQGAN) as a plain autoencoder on the unquantized latents (what Stage B models)."""
    from stablecascade import configs
    from stablecascade.models import StageA

    torch.manual_seed(seed)
    model = StageA(configs.STAGE_A["nano"]).train()
    batches = _batches(data, batch, seed)

    def loss_of(images, captions):
        latents = model.encode(images)
        return _reconstruction_loss(model.decode(latents), images) + 1e-3 * latents.pow(2).mean()

    _fit("stage A", model.parameters(), loss_of, batches, steps, lr)
    model.eval().requires_grad_(False)
    # Stage B diffuses encode()'s output, which divides by scale_factor: pick it so that output has unit std
    with torch.no_grad():
        spread = (model.encode(next(batches)[0]) * model.config.scale_factor).std().item()
    model.config = dataclasses.replace(model.config, scale_factor=round(spread, 4))
    return model


def _reconstruction_loss(recon, images):
    """L1 + L2 on the pixels and L1 on their gradients: the shapes are told apart by their edges, which a pixel loss
    lets blur."""
    edges = sum((torch.diff(recon, dim=d) - torch.diff(images, dim=d)).abs().mean() for d in (-1, -2))
    return (recon - images).abs().mean() + ((recon - images) ** 2).mean() + edges


def refine_stage_a_decoder(data: Path, stage_a_file: Path, steps: int, batch: int, lr: float, seed: int = 1):
    """Stage A's decoder trained on with its encoder frozen, so the latent space Stage B learns stays the same: with
    the joint training alone squares came back with round corners and triangles without tips (scripts/eval_nano.py
    read the shapes of 46 held-out pictures back through Stage A 0.89 of the time; after 1,500 decoder steps 0.96)."""
    from stablecascade import checkpoints

    model = checkpoints.load_official(stage_a_file).eval().requires_grad_(False)  # BatchNorm keeps its statistics
    decoder = [*model.up_blocks.parameters(), *model.out_block.parameters()]
    for p in decoder:
        p.requires_grad_(True)

    def loss_of(images, captions):
        with torch.no_grad():
            latents = model.encode(images)
        return _reconstruction_loss(model.decode(latents), images)

    _fit("stage A decoder", decoder, loss_of, _batches(data, batch, seed), steps, lr)
    return model.requires_grad_(False)


def train_encoder(data: Path, steps: int, batch: int, lr: float, seed: int = 0):
    """The nano image encoder (the EfficientNet's stand-in, defining the Stage C latent space) and a small Previewer,
    trained together as an autoencoder: image -> 16-channel latent at COMPRESSION px per cell (the encoder sees the
    image resized to 32 px per cell, as the pipeline feeds it) -> RGB at 8x the latent (the Previewer's), against
    the image resized to that, so the Previewer can show any Stage C latent as a picture during sampling. A shape
    head (per cell, then the most telling cell) names the caption's shape from the latent: the Previewer's 32 px
    picture cannot show a 15 px shape's outline, so without the head the latent keeps colours and places and loses
    the shapes (a probe named the shapes of held-out pictures 0.75 of the time without it, 1.00 with it). The head
    is not kept. Returns the encoder, the Previewer and how often the head names the drawn shape of held-out
    pictures: the check that the latent keeps shapes."""
    import torch.nn.functional as F
    from make_shapes import SHAPES

    from stablecascade import configs
    from stablecascade.geometry import EFFNET_FACTOR, latent_sizes
    from stablecascade.images import resize
    from stablecascade.models import NanoEncoder, Previewer

    torch.manual_seed(seed)
    encoder, previewer = NanoEncoder().train(), Previewer(configs.PreviewerConfig(c_hidden=64)).train()
    head = torch.nn.Sequential(torch.nn.Conv2d(16, 64, 1), torch.nn.GELU(), torch.nn.Conv2d(64, 64, 1), torch.nn.GELU(),
                               torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, len(SHAPES)))

    def latents_of(images):
        (h, w), _ = latent_sizes(*images.shape[-2:], COMPRESSION)
        return encoder(resize(images, h * EFFNET_FACTOR, w * EFFNET_FACTOR))

    def loss_of(images, captions):
        latents = latents_of(images)
        preview = previewer(latents)
        shapes = torch.tensor([SHAPES.index(c.split()[2]) for c in captions])  # "a {colour} {shape} ..."
        return F.mse_loss(preview, resize(images, *preview.shape[-2:])) + 0.3 * F.cross_entropy(head(latents), shapes)

    params = [*encoder.parameters(), *previewer.parameters(), *head.parameters()]
    _fit("encoder", params, loss_of, _batches(data, batch, seed), steps, lr)
    encoder.eval().requires_grad_(False), previewer.eval().requires_grad_(False), head.eval()
    images, cases = _heldout_pictures()
    with torch.no_grad():
        named = head(latents_of(images)).argmax(1)
    shapes = sum(SHAPES[int(k)] == case[1] for k, case in zip(named, cases)) / len(cases)
    print(f"encoder: its latent names the drawn shape of {shapes:.0%} of held-out pictures", flush=True)
    return encoder, previewer, shapes


def _heldout_pictures(n: int = 64) -> tuple:
    """(B,3,64,64) pictures in [0, 1] of held-out (colour, shape, position) combinations, and their cases."""
    import random

    import numpy as np
    from make_shapes import COLOURS, draw, heldout

    rng = random.Random(1)
    cases = [(c, s, p, rng.choice([b for b in COLOURS if b != c])) for c, s, p in sorted(heldout())][:n]
    images = torch.stack([torch.from_numpy(np.array(draw(*case, size=64, jitter=1.0, rng=rng))).permute(2, 0, 1)
                          for case in cases]).float() / 255
    return images, cases


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/nano"))
    p.add_argument("--out", type=Path, default=ROOT / "src/stablecascade/assets/nano")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--count", type=int, default=3000)
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from make_shapes import generate

    from stablecascade import checkpoints
    from stablecascade.train import load_config, train
    from stablecascade.train.text import clip_tokenizer, small_text_model

    data = a.work / "data"
    if not (data / "000000.png").exists():
        generate(data, a.count, 64, seed=0)
    a.work.mkdir(parents=True, exist_ok=True)

    parts_dir = a.work / "parts"
    parts_dir.mkdir(exist_ok=True)
    tokenizer, text_model = clip_tokenizer(), small_text_model(seed=0)
    text_dir = parts_dir / "text_encoder"
    text_model.save_pretrained(str(text_dir))
    tokenizer.save_pretrained(str(parts_dir / "tokenizer"))

    # a finished stage is kept when the script runs again (Stage B/C resume from their checkpoints as well), so a
    # changed recipe retrains only what it touches: delete a stage's output to retrain it
    times_file = a.work / "times.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}

    encoder_file, previewer_file = parts_dir / "nano_encoder.safetensors", parts_dir / "previewer.safetensors"
    if not encoder_file.is_file():
        from safetensors.torch import save_file

        (encoder, previewer, shapes), took = _timed("encoder_s",
                                                    lambda: train_encoder(data, int(1500 * a.scale), 32, 2e-3))
        times.update(took)
        times_file.write_text(json.dumps(times))
        (parts_dir / "encoder_check.json").write_text(json.dumps({"encoder_shape_agreement": shapes}))
        save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(encoder_file))
        checkpoints.save_official(previewer, previewer_file)

    stage_a_file = parts_dir / "stage_a.safetensors"
    common = [f"data=[{data}]", f"effnet=nano:{encoder_file}", f"text_encoder={text_dir}",
              f"tokenizer={parts_dir / 'tokenizer'}"]
    recipes = ROOT / "configs" / "nano"
    cfg_b = load_config(recipes / "stage_b.yaml", common + [f"output_dir={a.work / 'b'}", f"stage_a={stage_a_file}"],
                        task="b")
    cfg_c = load_config(recipes / "stage_c.yaml", common + [f"output_dir={a.work / 'c'}",
                                                            f"previewer={previewer_file}"], task="c")
    for cfg in (cfg_b, cfg_c):
        cfg.steps = max(1, int(cfg.steps * a.scale))
    # Stage C needs only the encoder and the text encoder, so it trains beside Stage A and then Stage B, a core
    # each (these small models gain little from a second thread); Stage A's decoder is refined on the core Stage C
    # frees, so the recipe takes as long as Stage A and Stage B
    refined_file = parts_dir / "stage_a_refined.safetensors"

    def record(job):
        times.update(job.result())
        times_file.write_text(json.dumps(times))

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        prior = pool.submit(_unless_done, "stage_c_s", Path(cfg_c.output_dir) / "final", train, cfg_c)
        record(pool.submit(_unless_done, "stage_a_s", stage_a_file, _save_stage_a, data, stage_a_file, a.scale))
        decoder = pool.submit(_unless_done, "stage_b_s", Path(cfg_b.output_dir) / "final", train, cfg_b)
        record(prior)
        record(pool.submit(_unless_done, "stage_a_decoder_s", refined_file, _save_refined_stage_a, data,
                           stage_a_file, refined_file, a.scale))
        record(decoder)
    export(a.work, parts_dir, a.out, cfg_b.noise_shift, (cfg_c.target or "eps", cfg_b.target or "eps"))
    (a.out / "training.json").write_text(json.dumps({"seconds": times, "images": a.count, "size": 64,
                                                     **json.loads((parts_dir / "encoder_check.json").read_text()),
                                                     "stage_b": cfg_b.to_dict(), "stage_c": cfg_c.to_dict()},
                                                    indent=1))
    print("times", times)


def _timed(name: str, run) -> tuple:
    """(run's result, {name: its seconds})."""
    t0 = time.time()
    result = run()
    return result, {name: round(time.time() - t0, 1)}


def _unless_done(key: str, done: Path, run, *args) -> dict:
    """run(*args) on one thread unless `done` exists (a stage finished before); returns {key: its seconds}."""
    torch.set_num_threads(1)
    return {} if done.exists() else _timed(key, lambda: run(*args))[1]


def _save_stage_a(data: Path, stage_a_file: Path, scale: float) -> None:
    from stablecascade import checkpoints

    checkpoints.save_official(train_stage_a(data, int(2500 * scale), 32, 2e-3), stage_a_file)


def _save_refined_stage_a(data: Path, stage_a_file: Path, refined_file: Path, scale: float) -> None:
    from stablecascade import checkpoints

    checkpoints.save_official(refine_stage_a_decoder(data, stage_a_file, int(1500 * scale), 32, 1e-3), refined_file)


def export(work: Path, parts_dir: Path, out: Path, noise_shift_b: float, predictions: tuple[str, str]):
    import shutil

    from make_shapes import caption

    from stablecascade import checkpoints

    out.mkdir(parents=True, exist_ok=True)
    best = lambda stage: work / stage / "final" / (f"stage_{stage}_ema.safetensors" if (  # noqa: E731
        work / stage / "final" / f"stage_{stage}_ema.safetensors").is_file() else f"stage_{stage}.safetensors")
    stage_c = checkpoints.load_official(best("c")).half()
    stage_b = checkpoints.load_official(best("b")).half()
    stage_a = checkpoints.load_official(parts_dir / "stage_a_refined.safetensors")
    checkpoints.save_diffusers(stage_c, out / "prior" / "prior")
    checkpoints.save_diffusers(stage_b, out / "decoder" / "decoder")
    checkpoints.save_diffusers(stage_a, out / "decoder" / "vqgan")
    from transformers import CLIPTextModelWithProjection

    te = CLIPTextModelWithProjection.from_pretrained(str(parts_dir / "text_encoder")).half()
    te.save_pretrained(str(out / "prior" / "text_encoder"))
    shutil.rmtree(out / "prior" / "tokenizer", ignore_errors=True)
    shutil.copytree(parts_dir / "tokenizer", out / "prior" / "tokenizer")
    for name in ("nano_encoder.safetensors", "previewer.safetensors"):
        shutil.copy(parts_dir / name, out / name)
    # what load_pipeline("nano", "nano") needs beyond the diffusers-layout folders
    (out / "model.json").write_text(json.dumps({"native_size": 64, "compression": COMPRESSION,
                                                "shifts": [2.0, noise_shift_b], "predictions": list(predictions),
                                                "decoder_guidance": DECODER_GUIDANCE,
                                                "effnet": "nano_encoder.safetensors",
                                                "previewer": "previewer.safetensors",
                                                "examples": [caption(*e) for e in EXAMPLES]}, indent=1))


if __name__ == "__main__":
    main()
