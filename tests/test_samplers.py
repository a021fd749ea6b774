"""The k-style samplers against k-diffusion 0.1.1 (its `sampling.py`, loaded on its own: the package's __init__
imports evaluation code with dependencies we do not need), driving the same tiny random Stage C."""

import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path

import oracle
import pytest
import torch

from stablecascade import diffusion, sampling

STEPS, SHIFT = 6, 2.0


@pytest.fixture(scope="module")
def k_sampling():
    root = Path(importlib.metadata.distribution("k-diffusion").locate_file("k_diffusion"))
    saved = {name: sys.modules.get(name) for name in ("k_diffusion", "k_diffusion.sampling", "k_diffusion.utils")}
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(root)]  # lets `from . import utils` find its sibling without running __init__
    sys.modules["k_diffusion"] = package
    spec = importlib.util.spec_from_file_location("k_diffusion.sampling", root / "sampling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["k_diffusion.sampling"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


@pytest.fixture(scope="module")
def stage_c(pipe):
    text, pooled = pipe.text_encoder(["a red circle"])
    neg_text, neg_pooled = pipe.text_encoder([""])
    no_img = torch.zeros(1, 1, oracle.IMG_PROJ)
    return sampling.GuidedDenoiser(pipe.stage_c, dict(clip_text=text, clip_text_pooled=pooled, clip_img=no_img),
                                   dict(clip_text=neg_text, clip_text_pooled=neg_pooled, clip_img=no_img), 4.0, 0.7)


def k_model(denoise):
    """k-diffusion's denoiser interface: (x/a, σ) -> x0, with λ = -2 log σ."""

    def model(x, sigma, **_):
        lam = -2 * torch.log(sigma)
        a, _ = diffusion.scales(lam)
        x_vp = x * a.view(-1, 1, 1, 1)
        return diffusion.undiffuse(x_vp, lam, denoise(x_vp, diffusion.noise_cond(lam)))[0]

    return model


def sigmas():
    lams = diffusion.logsnr(torch.linspace(1, 0, STEPS + 1), SHIFT)[:STEPS]
    return torch.cat([torch.exp(-lams / 2), torch.zeros(1)])


@pytest.mark.parametrize(("ours", "theirs"), [("euler", "sample_euler"), ("ddim", "sample_euler"),
                                              ("euler_a", "sample_euler_ancestral"), ("dpmpp_2m", "sample_dpmpp_2m")])
def test_matches_k_diffusion(k_sampling, stage_c, ours, theirs):
    x = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(1))
    got = sampling.sample(stage_c, x, STEPS, sampler=ours, shift=SHIFT, generator=torch.Generator().manual_seed(2))
    s = sigmas()
    a0 = (1 / (1 + s[0] ** 2)).sqrt()  # a at σ0
    kwargs = {}
    if theirs == "sample_euler_ancestral":
        g = torch.Generator().manual_seed(2)
        kwargs["noise_sampler"] = lambda sigma, sigma_next: torch.randn(x.shape, generator=g)
    want = getattr(k_sampling, theirs)(k_model(stage_c), x / a0, s, disable=True, **kwargs)
    assert (got - want).abs().max() / want.abs().max() <= 1e-5
    other = sampling.sample(stage_c, x, STEPS, sampler="euler" if ours == "euler_a" else "official", shift=SHIFT,
                            generator=torch.Generator().manual_seed(2))
    assert (other - want).abs().max() / want.abs().max() > 1e-3  # the comparison can tell samplers apart


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_deterministic_samplers_draw_no_noise(stage_c, name):
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    sampling.sample(stage_c, torch.randn(1, 16, 6, 6), 3, sampler=name, shift=SHIFT, generator=g)
    assert torch.equal(g.get_state(), state)


def consistency_loop(model, x, steps, shift, generators):
    """Multistep consistency sampling written out from the LCM paper: at t_i = 1 - i/steps the model's ε gives
    x0 = (x - σ_t ε)/α_t, the consistency function mixes it with x as f = c_skip x + c_out x0 with
    c_skip = 0.25/((10⁴ t)² + 0.25), c_out = 10⁴ t/√((10⁴ t)² + 0.25) (LCM's σ_data 0.5 and timestep scaling 10 on a
    1000-step schedule), and all but the last estimate are noised again to t_{i+1} with each image's
    own generator. The schedule (λ of t, the network's r of λ) is the one `diffusion` pins against the official
    code; everything else is computed here in float64."""
    import math

    lams = diffusion.logsnr(torch.linspace(1, 0, steps + 1), shift).double()
    for i in range(steps):
        lam = lams[i]
        r = diffusion.noise_cond(lam.float())
        alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        eps = model(x, r.expand(x.shape[0])).double()
        x0 = (x.double() - sigma * eps) / alpha
        rr = 1e4 * (1 - i / steps)
        f = 0.25 / (rr**2 + 0.25) * x.double() + rr / math.sqrt(rr**2 + 0.25) * x0
        if i == steps - 1:
            return f
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).double()
        x = (torch.sigmoid(lams[i + 1]).sqrt() * f + torch.sigmoid(-lams[i + 1]).sqrt() * noise).float()


@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_matches_a_hand_written_consistency_loop(stage_c, steps):
    x = torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(1))
    denoise = sampling.GuidedDenoiser(stage_c.model, {k: v.expand(2, *v.shape[1:]) for k, v in stage_c.raw.items()})
    got = sampling.sample(denoise, x, steps, sampler="lcm", shift=SHIFT, generator=sampling.seeded([5, 6]))
    want = consistency_loop(denoise, x, steps, SHIFT, sampling.seeded([5, 6]))
    assert (got - want).abs().max() <= 1e-6 * max(1.0, want.abs().max())
    if steps > 1:  # fresh noise between steps: other seeds, another result
        other = sampling.sample(denoise, x, steps, sampler="lcm", shift=SHIFT, generator=sampling.seeded([7, 8]))
        assert (other - got).abs().max() > 1e-3


def test_consistency_boundary_condition():
    c_skip, c_out = sampling.consistency_scales(torch.tensor([0.0, 0.5, 1.0]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[1:].max() < 1e-6 and (c_out[1:] - 1).abs().max() < 1e-6
    x, pred = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    # at the schedule's clean end the estimate is x itself, whatever the network says
    f, _ = sampling.consistency_x0(x, torch.tensor([diffusion.LOGSNR_MAX]), torch.zeros(1), pred)
    assert torch.equal(f, x)
