"""A stand-in GPU on a CPU-only machine: the stage models on the `meta` device (shapes only, no data), the text
encoder on the CPU, and a TorchFunctionMode that flags what would crash or stall on a real accelerator:
- an op whose tensor arguments span two devices (a CPU tensor of rank >= 1 meeting a meta one);
- a random draw whose generator lives on another device than its output;
- a host sync on device data (`.item()`, `bool()`, `.tolist()`), which also stalls a GPU loop.
Copies of final results to the CPU are answered with zeros (a meta tensor holds no data)."""

import contextlib
import copy

import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from stablecascade.pipeline import StableCascadePipeline
from stablecascade.sampling import SAMPLERS

META = torch.device("meta")
FAST = dict(width=64, height=64, prior_steps=3, decoder_steps=2, progress=False, output_type="pt")
SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__}
RANDOM = {torch.randn, torch.rand, torch.randint, torch.normal, torch.randn_like, torch.rand_like}


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
            self.problems.append(f"host sync: {name}")
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
    return StableCascadePipeline(*parts, pipe.text_encoder, device=META, effnet=effnet)


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
