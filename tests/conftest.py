"""Shared fixtures: one tiny random Stable Cascade (the diffusers oracle) saved in diffusers layout per session."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
torch.set_num_threads(min(2, torch.get_num_threads()))


def training_image(seed, size=(64, 64)):
    """A seeded picture for training tests: a plain background with a rectangle of another colour."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[:] = rng.integers(0, 255, 3)
    x, y = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
    arr[y:y + size[1] // 2, x:x + size[0] // 2] = rng.integers(0, 255, 3)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Eight captioned training pictures."""
    root = tmp_path_factory.mktemp("imgs")
    for i in range(8):
        training_image(i).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a picture number {i}")
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine 2 threads are many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    import oracle

    tc = oracle.build_tiny_cascade()
    prior_dir, decoder_dir = oracle.save_diffusers_folders(tc, tmp_path_factory.mktemp("tiny"))
    return SimpleNamespace(tc=tc, prior=prior_dir, decoder=decoder_dir)


@pytest.fixture(scope="session")
def small_parts(tmp_path_factory):
    """Official-format EfficientNet encoder and Previewer files with seeded random weights."""
    import oracle

    from stablecascade import checkpoints
    from stablecascade.models import EfficientNetEncoder, Previewer

    folder = tmp_path_factory.mktemp("parts")
    paths = SimpleNamespace(effnet=folder / "effnet_encoder.safetensors", previewer=folder / "previewer.safetensors")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(40)  # torchvision's own init keeps activations alive through the deep backbone
        effnet = EfficientNetEncoder().eval()
    checkpoints.save_official(effnet, paths.effnet)
    checkpoints.save_official(oracle.randomize_(Previewer(), 41).eval(), paths.previewer)
    return paths


@pytest.fixture(scope="session")
def pipe(tiny, small_parts):
    import stablecascade

    return stablecascade.load_pipeline(tiny.prior, tiny.decoder, device="cpu", dtype=torch.float32,
                                       effnet=small_parts.effnet, previewer=small_parts.previewer)
