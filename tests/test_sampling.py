"""The sampling core as the pipeline uses it: the registry, per-image seeds, device-independent noise, step events."""

import inspect

import pytest
import torch

from stablecascade import sampling
from stablecascade.pipeline import StableCascadePipeline
from stablecascade.settings import DEFAULTS

FAST = dict(width=64, height=64, prior_steps=2, decoder_steps=2, progress=False, output_type="pt")


def test_registry_names_and_labels():
    assert {"official", "diffusers", "ddim", "euler", "euler_a", "dpmpp_2m"} <= set(sampling.SAMPLERS)
    assert sampling.SAMPLERS["euler_a"].label == "Euler a" and sampling.SAMPLERS["dpmpp_2m"].label == "DPM++ 2M"
    assert all(spec.name == name for name, spec in sampling.SAMPLERS.items())
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        sampling.get("heun")


def test_pipeline_defaults_are_the_settings():
    params = inspect.signature(StableCascadePipeline.__call__).parameters
    assert params["prior_steps"].default == DEFAULTS.prior_steps
    assert params["prior_guidance"].default == DEFAULTS.prior_guidance
    assert params["decoder_steps"].default == DEFAULTS.decoder_steps
    assert params["sampling"].default == DEFAULTS.sampler
    assert params["compression"].default is None  # the model's own: the releases' DEFAULTS.compression
    assert inspect.signature(StableCascadePipeline.__init__).parameters["compression"].default == DEFAULTS.compression


@pytest.mark.parametrize("sampler", ["official", "euler_a"])
def test_each_image_of_a_batch_is_its_seed_alone(pipe, sampler):
    batch = pipe(["a red circle", "a blue square"], num_images_per_prompt=2, seed=7, sampling=sampler, **FAST)
    for i, (prompt, seed) in enumerate([("a red circle", 7), ("a red circle", 8), ("a blue square", 9),
                                        ("a blue square", 10)]):
        alone = pipe(prompt, seed=seed, sampling=sampler, **FAST)
        # the same noise; only float rounding of batched kernels differs (bitwise for a batch of one)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=0, atol=1e-4)
    listed = pipe(["a red circle", "a blue square"], num_images_per_prompt=2, seed=[7, 8, 9, 10], sampling=sampler,
                  **FAST)
    assert torch.equal(listed, batch)
    generators = [torch.Generator().manual_seed(s) for s in (7, 8, 9, 10)]
    assert torch.equal(pipe(["a red circle", "a blue square"], num_images_per_prompt=2, generator=generators,
                            sampling=sampler, **FAST), batch)
    assert (batch[0] - batch[1]).abs().max() > 1e-2
    again = pipe("a red circle", seed=8, sampling=sampler, **FAST)
    assert torch.equal(again, pipe("a red circle", seed=8, sampling=sampler, **FAST))


def test_metadata_carries_each_images_seed(pipe):
    images = pipe("a cat", num_images_per_prompt=3, seed=[5, 50, 500], **{**FAST, "output_type": "pil"})
    assert [im.info["parameters"]["seed"] for im in images] == [5, 50, 500]
    one = pipe("a cat", generator=torch.Generator().manual_seed(5), **{**FAST, "output_type": "pil"})
    assert one[0].info["parameters"]["seed"] is None  # the caller's generator: no seed to record


def test_noise_is_drawn_on_cpu_generators_per_image():
    gens = sampling.seeded([3, 4])
    noise = sampling.randn((2, 4, 5, 5), gens, dtype=torch.float64)
    assert noise.dtype == torch.float64
    assert torch.equal(noise[1].float(), torch.randn(4, 5, 5, generator=torch.Generator().manual_seed(4)))
    whole = sampling.randn((2, 4, 5, 5), torch.Generator().manual_seed(3))
    assert torch.equal(whole, torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        sampling.randn((2, 4), sampling.seeded([1, 2, 3]))


def test_step_events_and_stopping(pipe):
    events = []
    pipe("a cat", seed=1, step_callback=events.append, **{**FAST, "prior_steps": 3})
    assert [(e.stage, e.step, e.total) for e in events] == [("prior", 1, 3), ("prior", 2, 3), ("prior", 3, 3),
                                                             ("decoder", 1, 2), ("decoder", 2, 2)]
    assert events[0].x0.shape[:2] == (1, 16) and events[-1].x0.shape[:2] == (1, 4)

    class Stop(Exception):
        pass

    def stop(event):
        if event.step == 2:
            raise Stop

    seen = []
    with pytest.raises(Stop):
        pipe("a cat", seed=1, step_callback=lambda e: (seen.append(e.step), stop(e)), **FAST)
    assert seen == [1, 2]


def test_step_events_of_img2img_count_its_steps(pipe):
    from PIL import Image

    events = []
    pipe.img2img(Image.new("RGB", (64, 64), (200, 30, 30)), "a cat", strength=0.5, seed=0,
                 step_callback=events.append, **{**FAST, "prior_steps": 4, "decoder_steps": 5})
    assert [(e.stage, e.step, e.total) for e in events] == [("prior", 1, 2), ("prior", 2, 2), ("decoder", 1, 2),
                                                            ("decoder", 2, 2)]


def test_cuda_without_a_gpu_is_one_clear_error(tiny, capsys):
    from stablecascade import cli, load_pipeline
    from stablecascade.errors import InputError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")  # the GPU check script covers machines with one
    with pytest.raises(InputError, match="no usable CUDA GPU"):
        load_pipeline(tiny.prior, tiny.decoder, device="cuda")
    assert cli.main(["generate", "a cat", "--prior", str(tiny.prior), "--decoder", str(tiny.decoder),
                     "--device", "cuda"]) == 2
    assert "no usable CUDA GPU" in capsys.readouterr().err
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        load_pipeline(tiny.prior, tiny.decoder, device="gpu0")


def test_default_dtype_is_float32_off_gpu():
    from stablecascade.loading import default_dtype

    assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("meta")) == torch.float32


@pytest.mark.parametrize(("height", "width"), [(768, 1024), (1024, 768), (300, 301), (224, 500), (517, 333)])
def test_clip_preprocessing_matches_torchvision(height, width):
    from torchvision import transforms
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from stablecascade.conditioning import CLIP_MEAN, CLIP_STD, ImageEncoder

    config = CLIPVisionConfig(image_size=224, patch_size=32, hidden_size=32, intermediate_size=37,
                              num_hidden_layers=1, num_attention_heads=4, projection_dim=8)
    torch.manual_seed(0)
    encoder = ImageEncoder(CLIPVisionModelWithProjection(config))
    images = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(1))
    reference = transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(224), transforms.Normalize(CLIP_MEAN, CLIP_STD)])
    want = encoder.model(pixel_values=reference(images)).image_embeds.unsqueeze(1)
    torch.testing.assert_close(encoder(images), want, rtol=0, atol=1e-5)
