"""Train the nano Stable Cascade (all three stages on tiny configs, 64 px shapes) and export it in the layout
`load_pipeline` reads: OUT/prior/{prior,text_encoder,tokenizer} and OUT/decoder/{decoder,vqgan}, plus the
NanoEncoder that defined the Stage C latent space (OUT/nano_encoder.safetensors), a small Previewer
(OUT/previewer.safetensors) and OUT/model.json, which tells `load_pipeline` about them and the native size.

    python scripts/train_nano.py --work runs/nano --out src/stablecascade/assets/nano [--scale 1.0]

The recipe (configs/nano/*.yaml) is the source of the Stage B and Stage C settings; `--scale` multiplies step counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def train_stage_a(data: Path, steps: int, batch: int, lr: float, seed: int = 0):
    """Stage A (tiny VQGAN) as a plain autoencoder on the unquantized latents (what Stage B models)."""
    from stablecascade import configs
    from stablecascade.models import StageA
    from stablecascade.train import data as D

    torch.manual_seed(seed)
    model = StageA(configs.STAGE_A["tiny"]).train()
    source = D.ImageSource(D.index_sources([str(data)]))
    sampler = D.Sampler(source, batch, [(64, 64)], seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        images, _ = D.load_batch(source, next(sampler), slice(None), {})
        latents = model.encode(images)
        recon = model.decode(latents)
        loss = (recon - images).abs().mean() + ((recon - images) ** 2).mean() + 1e-3 * latents.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / steps))
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"stage A step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    model.eval().requires_grad_(False)
    # Stage B diffuses encode()'s output, which divides by scale_factor: pick it so that output has unit std
    with torch.no_grad():
        images, _ = D.load_batch(source, next(sampler), slice(None), {})
        spread = (model.encode(images) * model.config.scale_factor).std().item()
    model.config = dataclasses.replace(model.config, scale_factor=round(spread, 4))
    return model


def train_previewer(data: Path, encoder, steps: int, batch: int, lr: float, seed: int = 0):
    """A small Previewer (Stage C latent -> RGB at 8x) for live previews, fitted to the encoder's latents of the
    training images against the images downscaled to the preview size."""
    import torch.nn.functional as F

    from stablecascade import configs
    from stablecascade.models import Previewer
    from stablecascade.train import data as D

    torch.manual_seed(seed)
    model = Previewer(configs.PreviewerConfig(c_hidden=64)).train()
    source = D.ImageSource(D.index_sources([str(data)]))
    sampler = D.Sampler(source, batch, [(64, 64)], seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        images, _ = D.load_batch(source, next(sampler), slice(None), {})
        with torch.no_grad():
            latents = encoder(images)
            target = F.interpolate(images, scale_factor=latents.shape[-1] * 8 / images.shape[-1], mode="area")
        loss = F.mse_loss(model(latents), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"previewer step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    return model.eval().requires_grad_(False)


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
    from stablecascade.models.effnet import load_nano_encoder
    from stablecascade.train.text import clip_tokenizer, small_text_model

    times = {}
    data = a.work / "data"
    if not (data / "000000.png").exists():
        generate(data, a.count, 64, seed=0)
    a.work.mkdir(parents=True, exist_ok=True)

    parts_dir = a.work / "parts"
    parts_dir.mkdir(exist_ok=True)
    encoder = load_nano_encoder(seed=0)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(parts_dir / "nano_encoder.safetensors"))
    tokenizer, text_model = clip_tokenizer(), small_text_model(seed=0)
    text_dir = parts_dir / "text_encoder"
    text_model.save_pretrained(str(text_dir))
    tokenizer.save_pretrained(str(parts_dir / "tokenizer"))

    t0 = time.time()
    stage_a = train_stage_a(data, int(1200 * a.scale), 32, 2e-3)
    times["stage_a_s"] = round(time.time() - t0, 1)
    checkpoints.save_official(stage_a, parts_dir / "stage_a.safetensors")

    common = [f"data=[{data}]", f"effnet=nano:{parts_dir / 'nano_encoder.safetensors'}",
              f"text_encoder={text_dir}", f"tokenizer={parts_dir / 'tokenizer'}"]
    recipes = ROOT / "configs" / "nano"
    t0 = time.time()
    cfg_b = load_config(recipes / "stage_b.yaml", common + [f"output_dir={a.work / 'b'}",
                        f"stage_a={parts_dir / 'stage_a.safetensors'}"], task="b")
    cfg_b.steps = max(1, int(cfg_b.steps * a.scale))
    train(cfg_b)
    times["stage_b_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    cfg_c = load_config(recipes / "stage_c.yaml", common + [f"output_dir={a.work / 'c'}",
                        f"stage_b={a.work / 'b/final/stage_b_ema.safetensors'}",
                        f"stage_a={parts_dir / 'stage_a.safetensors'}"], task="c")
    cfg_c.steps = max(1, int(cfg_c.steps * a.scale))
    train(cfg_c)
    times["stage_c_s"] = round(time.time() - t0, 1)

    t0 = time.time()
    previewer = train_previewer(data, encoder, int(600 * a.scale), 64, 2e-3)
    times["previewer_s"] = round(time.time() - t0, 1)
    checkpoints.save_official(previewer, parts_dir / "previewer.safetensors")

    export(a.work, parts_dir, a.out)
    (a.out / "training.json").write_text(json.dumps({"seconds": times, "images": a.count, "size": 64,
                                                     "stage_b": cfg_b.to_dict(), "stage_c": cfg_c.to_dict()},
                                                    indent=1))
    print("times", times)


def export(work: Path, parts_dir: Path, out: Path):
    import shutil

    from stablecascade import checkpoints

    out.mkdir(parents=True, exist_ok=True)
    best = lambda stage: work / stage / "final" / (f"stage_{stage}_ema.safetensors" if (  # noqa: E731
        work / stage / "final" / f"stage_{stage}_ema.safetensors").is_file() else f"stage_{stage}.safetensors")
    stage_c = checkpoints.load_official(best("c")).half()
    stage_b = checkpoints.load_official(best("b")).half()
    stage_a = checkpoints.load_official(parts_dir / "stage_a.safetensors")
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
    (out / "model.json").write_text(json.dumps({"native_size": 64, "effnet": "nano_encoder.safetensors",
                                                "previewer": "previewer.safetensors"}, indent=1))


if __name__ == "__main__":
    main()
