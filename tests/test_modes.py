"""Image variation, image-to-image, reconstruction, the compression setting, previews and image inputs."""

import numpy as np
import oracle
import pytest
import torch
from PIL import Image

from stablecascade import InputError
from stablecascade.images import load_image

FAST = dict(prior_steps=2, decoder_steps=1, progress=False)


def picture(width=96, height=64, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("width,height,compression", [(256, 256, 42.67), (384, 256, 42.67), (128, 320, 32.0),
                                                      (200, 136, 16.0)])
def test_previews_once_per_step_with_latent_shapes(pipe, width, height, compression):
    seen = []
    out = pipe("a cat", width=width, height=height, compression=compression, seed=0, output_type="pt",
               preview_callback=lambda step, preview: seen.append((step, tuple(preview.shape), preview)), **FAST)
    h, w = -(-height // compression), -(-width // compression)
    assert [s for s, _, _ in seen] == [0, 1]
    assert all(shape == (1, 3, 8 * h, 8 * w) for _, shape, _ in seen)
    assert all(0 <= p.min() and p.max() <= 1 for _, _, p in seen)
    assert out.shape == (1, 3, height, width)


def test_encode_decode_round_trip_shapes(pipe):
    assert pipe.encode(picture(1024, 1024)).shape == (1, 16, 24, 24)  # the default compression of the releases
    latents = pipe.encode([picture(256, 256, 1), picture(256, 256, 2)])
    assert latents.shape == (2, 16, 6, 6)  # ceil(256 / 42.67)
    assert pipe.encode(picture(256, 256), compression=32).shape == (1, 16, 8, 8)
    images = pipe.decode(latents, seed=0, **FAST)
    assert [im.size for im in images] == [(256, 256), (256, 256)]
    assert pipe.decode(latents[:1], width=128, height=96, seed=0, output_type="pt", **FAST).shape == (1, 3, 96, 128)


def test_encode_is_the_effnet_of_the_resized_image(pipe):
    image = picture(300, 200)
    latents = pipe.encode(image)
    resized = torch.nn.functional.interpolate(load_image(image)[None], (5 * 32, 8 * 32), mode="bilinear",
                                              antialias=True, align_corners=False).clamp(0, 1)
    assert torch.allclose(latents, pipe.effnet(resized), atol=1e-6)


def stage_a_round_trip(pipe, image):
    return pipe.stage_a.decode(pipe.stage_a.encode(load_image(image)[None])).clamp(0, 1)


def test_img2img_strength_0_is_stage_a_round_trip_of_the_input(pipe):
    image = picture(256, 192)
    kept = pipe.img2img(image, "a dog", strength=0.0, seed=4, output_type="pt", **FAST)
    round_trip = stage_a_round_trip(pipe, image)
    assert kept.shape == (1, 3, 192, 256) and torch.allclose(kept, round_trip, atol=1e-6)


def test_img2img_stage_b_starts_from_the_input(pipe):
    """At low strength the output stays near Stage A's round trip of the input, as Stage B starts from its Stage A
    latent (measured mean difference 0.005 at strength 0.2, 0.45 at strength 1, where Stage B starts from noise)."""
    image = picture(256, 256, seed=3)
    round_trip = stage_a_round_trip(pipe, image)
    args = dict(seed=2, output_type="pt", **{**FAST, "decoder_steps": 4})
    low, full = ((pipe.img2img(image, "x", strength=s, **args) - round_trip).abs().mean() for s in (0.2, 1.0))
    assert 0 < low < 0.1 * full


def test_img2img_strength_1_is_text_to_image(pipe):
    image = picture(256, 192)
    a = pipe.img2img(image, "a dog", strength=1.0, seed=4, output_type="pt", **FAST)
    b = pipe("a dog", width=256, height=192, seed=4, output_type="pt", **FAST)
    assert torch.equal(a, b)


def test_img2img_partial_strength_runs_that_fraction_of_steps(pipe):
    steps = []
    image = picture(128, 128)
    out = pipe.img2img(image, "x", strength=0.5, prior_steps=8, decoder_steps=1, seed=1, progress=False,
                       preview_callback=lambda i, p: steps.append(i), output_type="pt")
    assert steps == [0, 1, 2, 3] and out.shape == (1, 3, 128, 128)
    other = pipe.img2img(picture(128, 128, seed=9), "x", strength=0.5, prior_steps=8, decoder_steps=1, seed=1,
                         progress=False, output_type="pt")
    assert not torch.equal(out, other)  # the input image matters


def test_img2img_default_size_follows_the_input(pipe):
    assert pipe.img2img(picture(110, 60), "x", strength=0.5, seed=0, **FAST)[0].size == (112, 64)
    big = pipe.img2img(picture(2000, 1000), "x", strength=0.5, seed=0, output_type="pt", **FAST)
    assert big.shape[-1] * big.shape[-2] <= 1024 * 1024 and abs(big.shape[-1] / big.shape[-2] - 2) < 0.02


def test_variation_matches_diffusers_prior_with_the_same_image_embeddings(tiny, pipe):
    image = picture(256, 256)
    embeds = pipe.image_encoder(load_image(image)[None])
    assert embeds.shape == (1, 1, oracle.IMG_PROJ)
    want = oracle.prior_pipeline(tiny.tc)(prompt="", image_embeds=embeds, width=256, height=256,
                                          num_inference_steps=3, guidance_scale=4.0,
                                          generator=torch.Generator().manual_seed(2)).image_embeddings
    run = pipe._settings(prompt="", width=256, height=256, prior_steps=3, sampling="diffusers",
                         generator=torch.Generator().manual_seed(2), progress=False)
    got = pipe._prior(run, clip_img=embeds)[0]
    assert (got - want).abs().max() / want.abs().max() <= 1e-5


def test_variation_mixes_several_images_by_weight(pipe):
    a, b = picture(64, 64, 1), picture(64, 64, 2)
    kw = dict(width=64, height=64, seed=3, output_type="pt", **FAST)
    one = pipe.variation(a, **kw)
    mixed = pipe.variation([a, b], weights=[1.0, 0.5], **kw)
    reweighted = pipe.variation([a, b], weights=[1.0, 1.0], **kw)
    assert one.shape == mixed.shape == (1, 3, 64, 64)
    assert not torch.equal(one, mixed) and not torch.equal(mixed, reweighted)
    assert torch.equal(pipe.variation([a, b], weights=[1.0, 0.5], **kw), mixed)
    with pytest.raises(InputError, match="one weight per image"):
        pipe.variation([a, b], weights=[1.0], **kw)
    texted = pipe.variation(a, prompt="a boat", **kw)
    assert not torch.equal(texted, one)


def test_bad_mode_arguments(pipe):
    with pytest.raises(InputError, match="strength"):
        pipe.img2img(picture(), "x", strength=1.5)
    with pytest.raises(InputError, match="compression"):
        pipe("x", compression=0, **FAST)
    with pytest.raises(InputError, match="one size"):
        pipe.encode([picture(64, 64), picture(96, 64)])
    with pytest.raises(InputError, match=r"\(B,16,h,w\)"):
        pipe.decode(torch.zeros(1, 4, 6, 6))
    with pytest.raises(InputError, match="NaN"):
        pipe.decode(torch.full((1, 16, 2, 2), float("nan")))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16", "I", "F", "1"])
def test_images_of_every_mode_load_as_rgb(mode):
    base = picture(32, 16)
    if mode == "I;16":
        image = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257))
    elif mode == "F":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.float32) / 255)
    else:
        image = base.convert(mode)
    t = load_image(image)
    assert t.shape == (3, 16, 32) and t.dtype == torch.float32
    assert 0 <= t.min() and t.max() <= 1
    if mode in ("L", "I;16", "F"):  # greyscale at any bit depth gives the same picture
        assert torch.allclose(t, load_image(base.convert("L")), atol=1 / 255)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert torch.equal(load_image(image), torch.ones(3, 4, 4))


def test_unreadable_and_missing_images(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="cannot read"):
        load_image(bad)
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="values in"):
        load_image(torch.full((3, 4, 4), 2.0))
