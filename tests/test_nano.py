"""The built-in nano model: shipped weights, the default of the CLI, and that it draws what it is asked for."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import stablecascade
from stablecascade.cli import ENV_DECODER, ENV_PRIOR, main
from stablecascade.images import psnr
from stablecascade.loading import NANO_DIR

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from eval_nano import analyse  # noqa: E402
from make_shapes import draw  # noqa: E402

# trained combinations with varied colours, shapes, positions and backgrounds
PROMPTS = [("red", "circle", "top left", "blue"), ("yellow", "square", "centre", "black"),
           ("green", "triangle", "bottom right", "white"), ("blue", "circle", "right", "yellow"),
           ("white", "square", "top", "red"), ("black", "circle", "bottom left", "green")]


@pytest.fixture(scope="module")
def nano():
    return stablecascade.load_pipeline("nano", "nano", device="cpu", dtype=torch.float32)


def test_weights_are_small_safetensors_files():
    files = [p for p in NANO_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 7  # Stage C, Stage B, Stage A, text encoder, image encoder, Previewer, LCM LoRA
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    assert json.loads((NANO_DIR / "model.json").read_text())["native_size"] == 64


def test_generate_uses_the_nano_model_when_no_checkpoint_is_configured(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(ENV_PRIOR, raising=False)
    monkeypatch.delenv(ENV_DECODER, raising=False)
    assert main(["generate", "a red circle at the top left on a blue background", "--seed", "0",
                 "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("*.png")
    image = Image.open(path)
    assert image.size == (64, 64)
    parameters = json.loads(image.text["stablecascade"])
    assert parameters["prior"] == "nano" and parameters["seed"] == 0
    found = analyse(np.asarray(image.convert("RGB")))
    assert found["background"] == "blue"


def test_nano_draws_what_the_prompt_asks_for(nano):
    hits = {"colour": 0, "shape": 0, "position": 0, "background": 0}
    for i, (colour, shape, position, background) in enumerate(PROMPTS):
        where = f"at the {position}" if position != "centre" else "in the centre"
        image = nano(f"a {colour} {shape} {where} on a {background} background", seed=i, progress=False)[0]
        found = analyse(np.asarray(image))
        truth = {"colour": colour, "shape": shape, "position": position, "background": background}
        for key in hits:
            hits[key] += found[key] == truth[key]
    # measured here: 6/6 colours, positions and backgrounds (README: 60 held-out prompts); chance is 1/6, 1/9, 1/6
    assert hits["background"] >= 5 and hits["colour"] >= 4 and hits["position"] >= 5, hits


def test_nano_reconstruction_and_img2img(nano):
    picture = torch.from_numpy(np.array(draw("yellow", "circle", "centre", "blue", 64))).permute(2, 0, 1) / 255
    latents = nano.encode(picture)
    assert latents.shape == (1, 16, 2, 2)
    back = nano.decode(latents, width=64, height=64, seed=0, output_type="pt", progress=False)
    assert back.shape == (1, 3, 64, 64)
    assert psnr(back, picture[None]) > 14
    kept = nano.img2img(picture, "", strength=0.0, seed=0, output_type="pt", progress=False)
    assert psnr(kept, picture[None]) > 14


def test_nano_previews(nano):
    seen = []
    nano("a green square in the centre on a white background", seed=0, prior_steps=4, progress=False,
         preview_callback=lambda step, preview: seen.append((step, tuple(preview.shape))))
    assert seen == [(i, (1, 3, 16, 16)) for i in range(4)]


def test_nano_variation_says_it_has_no_image_encoder(nano):
    with pytest.raises(stablecascade.CheckpointError, match="image variation cannot run here: needs a CLIP image encoder"):
        nano.variation(Image.new("RGB", (64, 64), "red"), progress=False)
