"""LoRAs and ControlNets through the pipeline and the command line (tiny random weights)."""

import numpy as np
import oracle
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from stablecascade import CheckpointError, InputError, checkpoints
from stablecascade.cli import main
from stablecascade.images import read_parameters
from stablecascade.models import ControlNet
from stablecascade.models.controlnet import ControlNetConfig
from stablecascade.models.lora import official_layer_order

FAST = dict(prior_steps=2, decoder_steps=1, seed=5, output_type="pt", progress=False)
CHANNELS = {"canny": 1, "inpaint": 4, "sr": 16}


def picture(width=64, height=64, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(autouse=True)
def forget_controlnets(pipe):
    """The session's pipeline is shared with other test files: leave it without the ControlNets loaded here."""
    before = dict(pipe._controlnets)
    yield
    pipe._controlnets.clear()
    pipe._controlnets.update(before)


@pytest.fixture(scope="module")
def lora_file(pipe, tmp_path_factory):
    """An official-format LoRA (positional rank-2 pairs over every attention projection) for the tiny Stage C."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for i, (module, param) in enumerate(official_layer_order(pipe.stage_c)):
        out_features, in_features = pipe.stage_c.get_submodule(module).get_parameter(param).shape
        state[f"weights.{i}.lora_down"] = torch.randn(2, in_features, generator=g)
        state[f"weights.{i}.lora_up"] = torch.randn(out_features, 2, generator=g)
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def controlnet_files(pipe, tmp_path_factory):
    """Small ControlNets (simple bottleneck) for the tiny Stage C, one per kind, controlling ResBlock calls 0, 2, 5."""
    folder = tmp_path_factory.mktemp("cnet")
    paths = {}
    for seed, (kind, c_in) in enumerate(CHANNELS.items()):
        config = ControlNetConfig(c_in=c_in, c_proj=pipe.stage_c.config.c_hidden[0], proj_blocks=(0, 2, 5),
                                  bottleneck_mode="simple")
        paths[kind] = folder / f"{kind}.safetensors"
        checkpoints.save_official(oracle.randomize_(ControlNet(config), seed, std=0.5).eval(), paths[kind])
    return paths


def generate(pipe, **kw):
    return pipe("a house", width=64, height=64, **{**FAST, **kw})


def test_lora_changes_output_and_unloads_exactly(pipe, lora_file):
    base = generate(pipe)
    try:
        name = pipe.load_lora(lora_file, 0.8)
        assert pipe.loras == {name: 0.8}
        merged = generate(pipe)
        assert not torch.equal(merged, base)
        pipe.set_lora_scale(name, 0.0)
        assert torch.equal(generate(pipe), base)
    finally:
        pipe.unload_loras()
    assert pipe.loras == {} and torch.equal(generate(pipe), base)


def test_lora_adapter_mode_equals_merge(pipe, lora_file):
    try:
        pipe.load_lora(lora_file, 0.5)
        merged = generate(pipe)
        pipe.unload_loras()
        pipe.load_lora(lora_file, 0.5, mode="adapter")
        assert torch.allclose(generate(pipe), merged, atol=1e-5)
        with pytest.raises(InputError, match="mode"):
            pipe.load_lora(lora_file, mode="fuse")
    finally:
        pipe.unload_loras()


def test_controlnet_strength_0_is_text_to_image(pipe, controlnet_files):
    pipe.load_controlnet("canny", controlnet_files["canny"])
    images, controls = pipe.controlnet("canny", picture(), "a house", control_strength=0.0, width=64, height=64,
                                       **FAST)
    assert torch.equal(images, generate(pipe))
    controlled, _ = pipe.controlnet("canny", picture(), "a house", width=64, height=64, **FAST)
    assert not torch.equal(controlled, images)
    assert controls.shape[:2] == (1, 3) and 0 <= controls.min() and controls.max() <= 1


def test_controlnet_canny_returns_the_edge_map(pipe, controlnet_files):
    pipe.load_controlnet("canny", controlnet_files["canny"])
    square = Image.new("RGB", (384, 256))
    square.paste((255, 255, 255), (128, 64, 256, 192))
    images, controls = pipe.controlnet("canny", square, "a box", prior_steps=1, decoder_steps=1, seed=0,
                                       progress=False)
    assert images[0].size == controls[0].size == (384, 256)
    assert images[0].info["parameters"]["controlnet"] == "canny"
    edges = np.asarray(controls[0].convert("L")).astype(int)
    border = np.zeros_like(edges, dtype=bool)
    border[56:200, 120:264] = True
    border[72:184, 136:248] = False  # a band around the square's outline
    assert edges[border].max() > 100 and edges[~border].max() < 30


def test_controlnet_inpaint_and_outpaint(pipe, controlnet_files):
    pipe.load_controlnet("inpaint", controlnet_files["inpaint"])
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    images, controls = pipe.controlnet("inpaint", picture(), "a window", mask=mask, **FAST)
    assert images.shape == (1, 3, 64, 64)
    assert controls[0, :, 40, 40].eq(1).all()  # masked pixels are white in what the ControlNet sees
    grown, _ = pipe.controlnet("inpaint", picture(), "a window", outpaint=16, **FAST)
    assert grown.shape == (1, 3, 96, 96)
    with pytest.raises(InputError, match="mask"):
        pipe.controlnet("inpaint", picture(), "a window", **FAST)


def test_controlnet_sr_doubles_the_size(pipe, controlnet_files):
    pipe.load_controlnet("sr", controlnet_files["sr"])
    images, controls = pipe.controlnet("sr", picture(64, 48), "", **FAST)
    assert images.shape == (1, 3, 96, 128) and controls.shape == (1, 3, 96, 128)


def test_controlnet_errors(pipe, controlnet_files):
    with pytest.raises(CheckpointError, match="not the inpaint ControlNet"):
        pipe.load_controlnet("inpaint", controlnet_files["canny"])
    with pytest.raises(CheckpointError, match="never released|no released weights"):
        pipe.load_controlnet("face")
    with pytest.raises(InputError, match="kind"):
        pipe.controlnet("depth", picture(), "x", **FAST)


def test_cli_lora_and_controlnet(tiny, small_parts, lora_file, controlnet_files, tmp_path):
    common = ["--prior", tiny.prior, "--decoder", tiny.decoder, "--dtype", "fp32", "--device", "cpu", "--steps", 1,
              "--decoder-steps", 1, "--seed", 1, "--effnet", small_parts.effnet]
    out = tmp_path / "out"
    assert main([str(a) for a in ["generate", "x", "--width", 64, "--height", 64, "--lora", f"{lora_file}:0.5",
                                  "--out", out, *common]]) == 0
    (file,) = out.glob("*.png")
    assert read_parameters(file)["loras"] == {"style": 0.5}

    control = tmp_path / "control.png"
    picture(80, 64).save(control)
    out = tmp_path / "cnet"
    assert main([str(a) for a in ["controlnet", "a house", "--kind", "canny", "--control", control, "--controlnet",
                                  controlnet_files["canny"], "--control-strength", 0.7, "--out", out, *common]]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["control_canny_00001.png", "stablecascade_00001.png"]
    params = read_parameters(out / "stablecascade_00001.png")
    assert params["controlnet"] == "canny" and params["control_strength"] == 0.7
    assert Image.open(out / "stablecascade_00001.png").size == (80, 64)
