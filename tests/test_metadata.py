"""PNG metadata other tools read: AUTOMATIC1111 infotext in the `parameters` chunk, parsed back by the sd-parsers
package (what image browsers use), and the full JSON in the `stablecascade` chunk."""

import pytest
import torch
from PIL import Image
from sd_parsers import ParserManager

import stablecascade
from stablecascade.errors import InputError
from stablecascade.images import infotext, png_bytes, read_parameters
from stablecascade.sampling import SAMPLERS


@pytest.fixture(scope="module")
def nano():
    return stablecascade.load_pipeline("nano", "nano", device="cpu", dtype=torch.float32)


def parsed(path):
    info = ParserManager().parse(str(path))
    assert info is not None, f"sd-parsers could not read {path}"
    return info


def test_images_saved_by_the_user_carry_infotext_that_sd_parsers_reads(nano, tmp_path):
    prompt, negative = "a red circle at the top left on a blue background", "blurry, dark: low"
    images = nano(prompt, negative_prompt=negative, prior_steps=3, decoder_steps=2, prior_guidance=3.5, seed=11,
                  progress=False)
    path = stablecascade.save_with_metadata(images[0], tmp_path / "mine.png")
    info = parsed(path)
    assert info.generator.value == "AUTOMATIC1111"
    assert info.full_prompt == prompt and info.full_negative_prompt == negative  # the comma and colon survive
    sampler = info.samplers[0]
    assert sampler.name == SAMPLERS[images[0].info["parameters"]["sampling"]].label
    assert sampler.parameters["seed"] == "11" and sampler.parameters["steps"] == "3"
    assert sampler.parameters["cfg_scale"] == "3.5"
    assert info.metadata["Size"] == "64x64" and info.metadata["Decoder steps"] == "2"
    assert read_parameters(path) == images[0].info["parameters"]  # the full JSON, unchanged


def test_infotext_of_every_mode_and_bytes_for_the_api():
    params = {"prompt": "a cat\nin a hat", "negative_prompt": "", "prior_steps": 20, "prior_guidance": 4.0,
              "decoder_steps": 10, "decoder_guidance": 1.1, "seed": 3, "width": 1024, "height": 768,
              "sampling": "euler_a", "mode": "image-to-image", "strength": 0.6, "prior": "models/stage_c.safetensors"}
    text = infotext(params)
    assert "Negative prompt" not in text  # empty negatives are left out, as AUTOMATIC1111 does
    assert text.splitlines()[-1] == ("Steps: 20, Sampler: Euler a, CFG scale: 4, Seed: 3, Size: 1024x768, "
                                     "Model: models/stage_c.safetensors, Denoising strength: 0.6, Decoder steps: 10, "
                                     "Decoder CFG: 1.1, Mode: image-to-image")
    import io

    data = png_bytes(Image.new("RGB", (8, 8)), params)
    with Image.open(io.BytesIO(data)) as im:
        assert im.text["parameters"] == text
        assert im.text["stablecascade"].startswith("{")


def test_save_with_metadata_refuses_foreign_images(tmp_path):
    with pytest.raises(InputError, match="save_png"):
        stablecascade.save_with_metadata(Image.new("RGB", (8, 8)), tmp_path / "x.png")
