"""End-to-end text-to-image against diffusers' pipelines and a hand-written official (GDF) sampler."""

import dataclasses
import math

import oracle
import pytest
import torch

import stablecascade
from stablecascade import InputError

PROMPTS = ["a red circle on a blue background", "a green square at the top left"]


def ours(pipe, **kw):
    args = dict(prior_steps=4, decoder_steps=3, sampling="diffusers", output_type="pt", progress=False,
                generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return pipe(**args)


def reference(tiny, prompt, width, height, prior_guidance=4.0, decoder_guidance=0.0, n=1, negative=None):
    combined = oracle.combined_pipeline(tiny.tc)
    return combined(prompt=prompt, negative_prompt=negative, width=width, height=height, prior_num_inference_steps=4,
                    num_inference_steps=3, prior_guidance_scale=prior_guidance,
                    decoder_guidance_scale=decoder_guidance, num_images_per_prompt=n,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images


@pytest.mark.parametrize("width,height", [(256, 256), (256, 384)])
def test_matches_diffusers_combined_pipeline(tiny, pipe, width, height):
    got = ours(pipe, prompt=PROMPTS, width=width, height=height)
    want = reference(tiny, PROMPTS, width, height)
    assert got.shape == want.shape == (2, 3, height, width)
    assert (got - want).abs().max() <= 1e-4


def test_matches_diffusers_with_negative_prompt_decoder_guidance_and_copies(tiny, pipe):
    got = ours(pipe, prompt=PROMPTS, negative_prompt=["blurry", "dark"], width=256, height=256,
               num_images_per_prompt=2, decoder_guidance=2.0)
    want = reference(tiny, PROMPTS, 256, 256, decoder_guidance=2.0, n=2, negative=["blurry", "dark"])
    assert got.shape == (4, 3, 256, 256)
    assert (got - want).abs().max() <= 1e-4


def test_prior_latents_match_diffusers_prior(tiny, pipe):
    """Images saturate with random weights, so also compare the Stage C latents themselves."""
    import stablecascade.sampling as S

    prior = oracle.prior_pipeline(tiny.tc)
    want = prior(prompt=PROMPTS, width=256, height=256, num_inference_steps=5, guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(3)).image_embeddings
    text, pooled = pipe.text_encoder(PROMPTS)
    neg_text, neg_pooled = pipe.text_encoder(["", ""])
    no_img = torch.zeros(2, 1, oracle.IMG_PROJ)
    denoise = S.GuidedDenoiser(pipe.stage_c, dict(clip_text=text, clip_text_pooled=pooled, clip_img=no_img),
                             dict(clip_text=neg_text, clip_text_pooled=neg_pooled, clip_img=no_img), 4.0, 0.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(want.shape, generator=g)
    got = S.sample(denoise, x, 5, sampler="diffusers", generator=g)
    assert (got - want).abs().max() / want.abs().max() <= 1e-5


def test_official_mode_matches_hand_written_gdf_loop(tiny, pipe):
    """Stage C in official mode: the diffusers UNet driven by GDF's formulas written out here in float64 maths."""
    prompt, steps, cfg, rho, shift = PROMPTS[:1], 3, 4.0, 0.7, 2.0
    text, pooled = pipe.text_encoder(prompt)
    neg_text, neg_pooled = pipe.text_encoder([""])
    no_img = torch.zeros(1, 1, oracle.IMG_PROJ)

    def lam(t):
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        ab = min(max(f(t) / f(0.0), 1e-4), 0.9999)
        return min(max(math.log(ab / (1 - ab)) - 2 * math.log(shift), -9.2102), 9.2102)

    def r_of(lmb):
        var = 1 / (1 + math.exp(-lmb))
        return math.acos(math.sqrt(var * math.cos(0.008 / 1.008 * math.pi / 2) ** 2)) / (math.pi / 2) * 1.008 - 0.008

    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 16, 6, 6, generator=g)
    want_x0 = None
    ts = [1 - i / steps for i in range(steps + 1)]
    unet = tiny.tc.prior
    for i in range(steps):
        lm = lam(ts[i])
        r = torch.full((2,), r_of(lm))
        both = unet(torch.cat([x, x]), r, clip_text_pooled=torch.cat([pooled, neg_pooled]),
                    clip_text=torch.cat([text, neg_text]), clip_img=torch.cat([no_img, no_img])).sample
        c, u = both.chunk(2)
        eps = u + cfg * (c - u)
        eps = rho * eps * c.std() / (eps.std() + 1e-9) + (1 - rho) * eps
        a, b = math.sqrt(1 / (1 + math.exp(-lm))), math.sqrt(1 / (1 + math.exp(lm)))
        want_x0 = (x - b * eps) / a
        if i < steps - 1:
            ln = lam(ts[i + 1])
            a2, b2 = math.sqrt(1 / (1 + math.exp(-ln))), math.sqrt(1 / (1 + math.exp(ln)))
            sigma = math.sqrt(b2**2 / b**2) * math.sqrt(1 - a**2 / a2**2)
            x = a2 * want_x0 + math.sqrt(b2**2 - sigma**2) * eps + sigma * torch.randn(x.shape, generator=g)

    import stablecascade.sampling as S

    denoise = S.GuidedDenoiser(pipe.stage_c, dict(clip_text=text, clip_text_pooled=pooled, clip_img=no_img),
                             dict(clip_text=neg_text, clip_text_pooled=neg_pooled, clip_img=no_img), cfg, rho)
    g = torch.Generator().manual_seed(7)
    got = S.sample(denoise, torch.randn(1, 16, 6, 6, generator=g), steps, shift=shift, sampler="official", generator=g)
    assert (got - want_x0).abs().max() / want_x0.abs().max() <= 1e-4


def test_same_seed_same_image_and_sizes(pipe):
    kw = dict(prompt="a cat", width=136, height=80, prior_steps=2, decoder_steps=2, progress=False)
    a = pipe(seed=5, output_type="pt", **kw)
    b = pipe(seed=5, output_type="pt", **kw)
    c = pipe(seed=6, output_type="pt", **kw)
    assert a.shape == (1, 3, 80, 136)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("width,height", [(576, 64), (720, 64), (72, 64)])
def test_sizes_diffusers_cannot_do(pipe, width, height):
    """diffusers crashes on odd Stage B latents (e.g. 576 or 720 wide); any multiple of 8 works here."""
    out = pipe("x", width=width, height=height, prior_steps=1, decoder_steps=1, seed=0, output_type="pt",
               progress=False)
    assert out.shape == (1, 3, height, width)
    assert torch.isfinite(out).all()


def test_pil_output_carries_parameters(pipe):
    images = pipe(["a", "b"], num_images_per_prompt=2, width=64, height=64, prior_steps=1, decoder_steps=1, seed=11,
                  progress=False)
    assert len(images) == 4 and images[0].size == (64, 64) and images[0].mode == "RGB"
    params = [im.info["parameters"] for im in images]
    assert [p["prompt"] for p in params] == ["a", "a", "b", "b"]
    assert [p["seed"] for p in params] == [11, 12, 13, 14] and all(p["prior_steps"] == 1 for p in params)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(width=1001), "multiples of 8"),
    (dict(height=-16), "multiples of 8"),
    (dict(width=1024.5), "multiples of 8"),
    (dict(width=8, height=8), "at least 64 pixels"),
    (dict(prior_steps=0), "prior_steps"),
    (dict(decoder_steps=-3), "decoder_steps"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(prior_guidance=float("nan")), "prior_guidance"),
    (dict(sampling="heun"), "sampling"),
    (dict(seed=-1), "seed -1 is out of range"),
    (dict(seed=[1, 2]), "2 seeds for 1 images"),
    (dict(generator=[torch.Generator()] * 3), "3 generators"),
    (dict(output_type="np"), "output_type"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=["a", "b"], negative_prompt=["only one"]), "negative_prompt"),
])
def test_bad_arguments_give_clear_errors(pipe, kwargs, needle):
    args = dict(prompt="a cat", width=64, height=64, prior_steps=1, decoder_steps=1, progress=False)
    args.update(kwargs)
    with pytest.raises(InputError, match=needle):
        pipe(**args)


def test_mismatched_parts_are_refused(tiny, tmp_path):
    from stablecascade import checkpoints
    from stablecascade.configs import STAGE_B
    from stablecascade.models import StageB

    other = StageB(dataclasses.replace(STAGE_B["tiny"], c_clip=64)).eval()
    path = tmp_path / "stage_b.safetensors"
    checkpoints.save_official(other, path)
    with pytest.raises(stablecascade.CheckpointError, match="pooled text of width 64"):
        stablecascade.load_pipeline(tiny.prior, {"stage_b": path, "stage_a": tiny.decoder / "vqgan"}, device="cpu",
                                    dtype=torch.float32)
