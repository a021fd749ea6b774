"""A stand-in GPU on a CPU-only machine: the stage models on the `meta` device (shapes only, no data), the text
encoder on the CPU (with offload it visits the device too), and a TorchFunctionMode that flags what would crash or stall on a real accelerator:
- an op whose tensor arguments span two devices (a CPU tensor of rank >= 1 meeting a meta one);
- a random draw whose generator lives on another device than its output;
- a host sync on device data (`.item()`, `bool()`, `.tolist()`), which also stalls a GPU loop.
Copies of final results to the CPU are answered with zeros (a meta tensor holds no data), and so are host syncs:
those made by transformers' CLIP (its attention-mask shortcut reads the mask once per prompt batch, outside the
sampling loop; it works on a GPU) are not flagged, all others are."""

import contextlib
import copy
import sys

import pytest
import torch
from PIL import Image
from test_lora import _fernando_lora, official_lora
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from stablecascade.conditioning import ImageEncoder, TextEncoder
from stablecascade.models.controlnet import ControlNet, ControlNetConfig
from stablecascade.pipeline import StableCascadePipeline
from stablecascade.sampling import SAMPLERS

META = torch.device("meta")
FAST = dict(width=64, height=64, prior_steps=3, decoder_steps=2, progress=False, output_type="pt")
SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__}
SYNCING_LIBRARIES = {"transformers"}
RANDOM = {torch.randn, torch.rand, torch.randint, torch.normal, torch.randn_like, torch.rand_like}


def _caller_package() -> str:
    """The top-level package of the code that called into torch."""
    frame = sys._getframe(2)
    while frame.f_globals.get("__name__", "").split(".")[0] == "torch":
        frame = frame.f_back
    return frame.f_globals.get("__name__", "").split(".")[0]


class StandInGPU(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.problems = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        name = getattr(func, "__name__", str(func))
        if func in (torch.Tensor.cpu, torch.Tensor.numpy) or (
                func is torch.Tensor.to and any(a in ("cpu", torch.device("cpu")) for a in (*args[1:], kwargs.get(
                    "device")))):
            if args[0].is_meta:  # the final copy back to the host: zeros of the right shape
                dtype = next((a for a in args[1:] if isinstance(a, torch.dtype)), kwargs.get("dtype", args[0].dtype))
                return torch.zeros(args[0].shape, dtype=dtype)
        if func in SYNCS and tensors and tensors[0].is_meta:
            if _caller_package() not in SYNCING_LIBRARIES:
                self.problems.append(f"host sync: {name}")
            return func(torch.zeros(tensors[0].shape, dtype=tensors[0].dtype))
        devices = {t.device.type for t in tensors if t.dim() >= 1}
        if func not in (torch.Tensor.to, torch.Tensor.copy_) and {"cpu", "meta"} <= devices:
            self.problems.append(f"{name} mixes cpu and meta tensors {[tuple(t.shape) for t in tensors]}")
        generator = kwargs.get("generator")
        if func in RANDOM and generator is not None:
            out = torch.device(kwargs.get("device") or (tensors[0].device if tensors else "cpu"))
            if generator.device.type != out.type:
                self.problems.append(f"{name}: a {generator.device.type} generator drawing on {out.type}")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def meta_pipe(pipe):
    parts = [copy.deepcopy(m).to(META) for m in (pipe.stage_c, pipe.stage_b, pipe.stage_a)]
    effnet = copy.deepcopy(pipe.effnet).to(META)
    image_encoder = ImageEncoder(copy.deepcopy(pipe.image_encoder.model).to(META))
    return StableCascadePipeline(*parts, pipe.text_encoder, device=META, effnet=effnet, image_encoder=image_encoder)


def offloaded(pipe, mode):
    """The parts in CPU memory, as `load_pipeline(..., offload=mode)` leaves them, running on the stand-in GPU."""
    parts = [copy.deepcopy(m) for m in (pipe.stage_c, pipe.stage_b, pipe.stage_a)]
    text_encoder = TextEncoder(pipe.text_encoder.tokenizer, copy.deepcopy(pipe.text_encoder.model))
    return StableCascadePipeline(*parts, text_encoder, device=META, effnet=copy.deepcopy(pipe.effnet).to(META),
                                 offload=mode)


def run_checked(call):
    mode = StandInGPU()
    with mode:
        out = call()
    assert mode.problems == [], "\n".join(dict.fromkeys(mode.problems))
    return out


def test_the_harness_catches_the_crashes_it_stands_in_for():
    mode = StandInGPU()
    x = torch.zeros(2, 3, device=META)
    crashes = [lambda: x + torch.ones(2, 3),  # a CPU tensor meeting a device one
               lambda: torch.randn(3, generator=torch.Generator(), device=META),  # a CPU generator on the device
               lambda: x.sum().item()]  # a host sync
    for crash in crashes:
        with mode, contextlib.suppress(RuntimeError, NotImplementedError):  # meta itself refuses some of them
            crash()
    assert len(mode.problems) == 3


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_txt2img_with_each_sampler_stays_on_the_device(meta_pipe, sampler):
    events = []
    out = run_checked(lambda: meta_pipe(["a cat", "a dog"], num_images_per_prompt=2, seed=1, sampling=sampler,
                                        step_callback=events.append, **FAST))
    assert out.shape == (4, 3, 64, 64)
    assert len(events) == 5 and all(e.x0.is_meta for e in events)


def test_img2img_and_decode_stay_on_the_device(meta_pipe):
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    assert run_checked(lambda: meta_pipe.img2img(image, "a cat", strength=0.6, seed=2, **FAST)).shape == (1, 3, 64, 64)
    latents = torch.zeros(2, 16, 2, 2)
    assert run_checked(lambda: meta_pipe.decode(latents, seed=3, **{**FAST, "width": 64, "height": 64})).shape == \
        (2, 3, 64, 64)


def test_variation_stays_on_the_device(meta_pipe):
    images = [Image.new("RGB", (96, 64), (20, 200, 30)), Image.new("RGB", (64, 64), (0, 0, 250))]
    out = run_checked(lambda: meta_pipe.variation(images, weights=[1.0, 0.5], prompt="a boat", seed=4, **FAST))
    assert out.shape == (1, 3, 64, 64)


def test_controlnet_stays_on_the_device(meta_pipe):
    c = meta_pipe.stage_c.config
    net = ControlNet(ControlNetConfig(c_in=4, c_proj=c.c_hidden[0], proj_blocks=(0, 1), bottleneck_mode="simple"))
    meta_pipe._controlnets["inpaint"] = net.to(META).eval()
    image, mask = Image.new("RGB", (64, 64), (90, 90, 200)), Image.new("L", (64, 64), 255)
    try:
        images, control = run_checked(lambda: meta_pipe.controlnet("inpaint", image, "a cat", mask=mask, seed=5,
                                                                   **FAST))
    finally:
        del meta_pipe._controlnets["inpaint"]
    assert images.shape == (1, 3, 64, 64) and control.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("mode", ["merge", "adapter"])
def test_a_batch_with_a_lora_and_a_token_lora_stays_on_the_device(meta_pipe, mode):
    stage_c, text_encoder = meta_pipe.stage_c, meta_pipe.text_encoder
    tokens = {"embeddings.embeddings": _fernando_lora(stage_c, text_encoder)["embeddings.embeddings"],
              "embeddings.indices": torch.tensor([1929, 49408, 49409])}
    new_tokens = [("[fernando]", "^dog</w>"), ("<zed>", None)]
    try:
        def generate():
            meta_pipe.load_lora(official_lora(stage_c, seed=3), 0.8, mode=mode, name="style")
            meta_pipe.load_lora(tokens, 1.0, mode=mode, new_tokens=new_tokens, name="fernando")
            meta_pipe.set_lora_scale("fernando", 0.5)
            return meta_pipe(["a photo of [fernando]", "<zed> in the snow"], num_images_per_prompt=2, seed=6, **FAST)

        out = run_checked(generate)
    finally:
        meta_pipe.unload_loras()
    assert out.shape == (4, 3, 64, 64)


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_stays_on_the_device_and_leaves_the_weights_home(pipe, mode):
    """The parts live in CPU memory and visit the device: every op of a visit sees device weights only, and
    afterwards every weight is back in CPU memory (with sequential offload, the small tensors held by container
    modules live on the device for good)."""
    off = offloaded(pipe, mode)
    tokens = _fernando_lora(off.stage_c, off.text_encoder)
    new_tokens = [("[fernando]", "^dog</w>"), ("<zed>", None)]

    def generate():
        off.load_lora(tokens, 1.0, new_tokens=new_tokens)  # swaps a new embedding module into the text encoder
        image = Image.new("RGB", (64, 64), (200, 30, 30))  # img2img: Stage A's encoder visits too
        assert off.img2img(image, "<zed>", strength=0.5, seed=7, **FAST).shape == (1, 3, 64, 64)
        return off(["a photo of [fernando]", "<zed>"], seed=7, **FAST)

    parts = (off.stage_c, off.stage_b, off.stage_a)
    home = {p: p.data_ptr() for part in parts for p in part.parameters()}
    assert run_checked(generate).shape == (2, 3, 64, 64)
    assert off.text_encoder.model.get_input_embeddings().weight.shape[0] == 49410  # the new embedding ran
    assert {p: p.data_ptr() for p in home} == home  # the same objects, their CPU memory kept: nothing copied back
    parts += (off.text_encoder.model,)
    if mode == "model":
        assert all(t.device.type == "cpu" for part in parts for t in [*part.parameters(), *part.buffers()])
    else:
        assert all(t.device.type == "cpu" for part in parts for t in part.parameters())


class OtherDeviceGenerator(torch.Generator):
    """A generator that says it lives on `meta`. PyTorch makes generators only for devices this machine has, so it
    stands for the caller's `torch.Generator("cuda")` of the diffusers idiom; drawing from it on the CPU is what the
    guard flags (a CUDA generator refuses to fill a CPU tensor)."""

    device = property(lambda self: META)


def test_a_callers_generator_of_another_device_gives_the_image_of_its_seed(pipe):
    want = pipe(["a cat", "a dog"], seed=[11, 12], **FAST)
    per_image = [OtherDeviceGenerator().manual_seed(11), OtherDeviceGenerator().manual_seed(12)]
    assert torch.equal(run_checked(lambda: pipe(["a cat", "a dog"], generator=per_image, **FAST)), want)
    one = OtherDeviceGenerator().manual_seed(11)
    assert torch.equal(run_checked(lambda: pipe("a cat", generator=one, **FAST)), pipe("a cat", seed=11, **FAST))
