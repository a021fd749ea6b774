"""Shared fixtures: one tiny random Stable Cascade (the diffusers oracle) saved in diffusers layout per session."""

import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    import oracle

    tc = oracle.build_tiny_cascade()
    prior_dir, decoder_dir = oracle.save_diffusers_folders(tc, tmp_path_factory.mktemp("tiny"))
    return SimpleNamespace(tc=tc, prior=prior_dir, decoder=decoder_dir)


@pytest.fixture(scope="session")
def pipe(tiny):
    import stablecascade

    return stablecascade.load_pipeline(tiny.prior, tiny.decoder, device="cpu", dtype=torch.float32)
