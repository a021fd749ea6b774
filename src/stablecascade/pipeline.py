"""The pipeline: owns the loaded parts and runs every mode through Stage C -> Stage B -> Stage A.

Each mode is a thin function over two steps: `_prior` (Stage C sampling from noise or from a noised image latent,
conditioned on text and optionally CLIP image embeddings) and `_decoder` (Stage B sampling conditioned on a
Stage C latent, then Stage A decoding). `loading.load_pipeline` builds one from files; `geometry` has the size maths.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from . import checkpoints, controlnets, diffusion, hub, limits
from . import sampling as sampling_module
from . import offload as offload_module
from .conditioning import ImageEncoder, TextEncoder, load_image_encoder
from .errors import CheckpointError, InputError, UnsupportedError
from .geometry import (COMPRESSION, EFFNET_FACTOR, STAGE_A_FACTOR, check_compression as _check_compression,
                       default_size, latent_sizes, round8)
from .images import load_image, resize, to_pil
from .lora_formats import read_lora
from .models.lora import LoRAManager
from .sampling import StepCallback, StepEvent
from .settings import DEFAULTS, RELEASED_DECODER_GUIDANCE, RELEASED_SHIFTS

log = logging.getLogger(__name__)

TILED_DECODE_AREA = 2048 * 2048  # Stage A decodes larger images in tiles (unless told otherwise)
ImageInput = Union[str, Path, "PIL.Image.Image", torch.Tensor]  # noqa: F821
PreviewCallback = Callable[[int, torch.Tensor], None]


@dataclass
class _Run:
    """Settings of one generation call, validated once and shared by the prior and decoder steps."""

    prompts: list
    negatives: list
    n: int
    width: int
    height: int
    prior_steps: int
    prior_guidance: float
    decoder_steps: int
    decoder_guidance: float
    seeds: Optional[list]  # one per image, None when the caller gave generators
    generator: sampling_module.Generators  # CPU: one per image, or one for the whole batch
    sampling: str  # Stage C's sampler: the call's, or "lcm" when a consistency LoRA or Stage C switched it
    output_type: str
    progress: bool
    compression: float
    preview_callback: Optional[PreviewCallback]
    step_callback: Optional[StepCallback]
    tiled_decode: Optional[bool]
    decoder_sampling: str = DEFAULTS.sampler  # Stage B's: the call's ("lcm" only for a consistency Stage B)

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.n


class StableCascadePipeline:
    def __init__(self, stage_c, stage_b, stage_a, text_encoder: TextEncoder, *, device="cpu", dtype=torch.float32,
                 image_encoder: Union[ImageEncoder, Path, None] = None, effnet: Union[torch.nn.Module, Path, None] = None,
                 previewer: Union[torch.nn.Module, Path, None] = None, offload: Optional[str] = None,
                 native_size: int = 1024, official_shifts: tuple[float, float] = RELEASED_SHIFTS,
                 decoder_guidance: float = RELEASED_DECODER_GUIDANCE, predictions: tuple[str, str] = ("eps", "eps"),
                 shifts_required: bool = False, prompt_examples: Optional[Sequence[str]] = None,
                 compression: float = COMPRESSION, consistency: tuple = (None, None)):
        """`offload`: None keeps every part on `device`; "model" keeps Stage C, Stage B, Stage A and the text encoder
        in CPU memory and moves each to `device` only for its turn; "sequential" moves one block at a time (the
        least device memory, the slowest). The small optional parts stay on `device`. `native_size`: the side the
        prior was trained at, the default width and height; `official_shifts`: the (Stage C, Stage B) schedule
        shifts the models were made for, used by the GDF samplers (all but "diffusers"); `decoder_guidance`: the
        default Stage B guidance of the GDF samplers (1.1 for the released models, as the official notebooks;
        "diffusers" defaults to 0 as diffusers' pipeline); `predictions`: what (Stage C, Stage B) predict, "eps"
        (the released models) or "v"; `shifts_required`: the models were made for `official_shifts` (their files
        say so), so the unshifted "diffusers" sampler warns; `prompt_examples`: prompts the model draws well (None:
        the released models' kind of prompts); `compression`: the default image pixels per Stage C latent cell
        (42.67 for the released models, as their notebooks; the model's own where it was trained at another);
        `consistency`: the (Stage C, Stage B) `sampling.Consistency` records of consistency-distilled stage files
        (None for others): such a stage samples with "lcm" at its recommended steps and guidance by default."""
        offload_module.check_mode(offload)
        self.stage_c, self.stage_b, self.stage_a, self.text_encoder = stage_c, stage_b, stage_a, text_encoder
        self.device, self.dtype, self.offload, self.native_size = torch.device(device), dtype, offload, native_size
        self.official_shifts, self.decoder_guidance = official_shifts, decoder_guidance
        self.compression = _check_compression(compression)
        self.prompt_examples = list(prompt_examples) if prompt_examples else None
        for prediction in predictions:
            if prediction not in ("eps", "v"):
                raise CheckpointError(f"unknown prediction target {prediction!r}; models predict 'eps' or 'v'")
        self.predictions, self.shifts_required, self._warned_shifts = tuple(predictions), shifts_required, False
        self.consistency = tuple(consistency)
        for part in self._offloaded_parts():
            if offload == "model":
                offload_module.move(part, "cpu")
            elif offload == "sequential":
                offload_module.sequential(part, self.device)
        # optional parts: loaded objects, or paths loaded on first use (None: the released files from the Hub)
        self._image_encoder, self._effnet, self._previewer = image_encoder, effnet, previewer
        self._controlnets: dict = {}
        self._loras: Optional[LoRAManager] = None
        self._check_compatible()

    def _check_compatible(self):
        hidden = self.text_encoder.model.config.hidden_size
        pooled = self.text_encoder.model.config.projection_dim
        c, b = self.stage_c.config, self.stage_b.config
        problems = []
        if c.c_clip_text != hidden or c.c_clip_text_pooled != pooled:
            problems.append(f"Stage C expects text features of width {c.c_clip_text}/{c.c_clip_text_pooled}, "
                            f"the text encoder gives {hidden}/{pooled}")
        if b.c_clip != pooled:
            problems.append(f"Stage B expects pooled text of width {b.c_clip}, the text encoder gives {pooled}")
        if b.c_effnet is not None and b.c_effnet != c.c_out:
            problems.append(f"Stage B reads {b.c_effnet}-channel Stage C latents, Stage C makes {c.c_out}")
        if b.c_in != self.stage_a.config.c_latent:
            problems.append(f"Stage B works on {b.c_in} latent channels, Stage A on {self.stage_a.config.c_latent}")
        if problems:
            raise CheckpointError("the loaded parts do not belong together: " + "; ".join(problems))

    # ----------------------------------------------------------------------------------- optional parts
    @property
    def effnet(self) -> torch.nn.Module:
        """The EfficientNet encoder (image -> Stage C latent), loaded on first use; always float32."""
        if not isinstance(self._effnet, torch.nn.Module):
            reason = self.capabilities().reason("img2img")
            if reason:
                raise UnsupportedError(f"encoding images cannot run here: {reason}")
            path = self._effnet or hub.file(hub.DECODER_REPO, "effnet_encoder.safetensors")
            self._effnet = checkpoints.load_official(path, "effnet", dtype=torch.float32, device=self.device)
        return self._effnet

    @property
    def previewer(self) -> torch.nn.Module:
        """The Previewer (Stage C latent -> small RGB), loaded on first use; always float32."""
        if not isinstance(self._previewer, torch.nn.Module):
            reason = self.capabilities().previews
            if reason:
                raise UnsupportedError(f"previews cannot be made here: {reason}")
            path = self._previewer or hub.file(hub.DECODER_REPO, "previewer.safetensors")
            self._previewer = checkpoints.load_official(path, "previewer", dtype=torch.float32, device=self.device)
        return self._previewer

    @property
    def image_encoder(self) -> ImageEncoder:
        """The CLIP image encoder of image variation, loaded on first use."""
        reason = self.capabilities().reason("variation")
        if reason:
            raise UnsupportedError(f"image variation cannot run here: {reason}")
        if not isinstance(self._image_encoder, ImageEncoder):
            path = self._image_encoder or hub.snapshot(hub.PRIOR_REPO, ("image_encoder",)) / "image_encoder"
            self._image_encoder = load_image_encoder(path, self.dtype, self.device)
        width = self._image_encoder.model.config.projection_dim
        if width != self.stage_c.config.c_clip_img:
            raise CheckpointError(f"the image encoder gives {width}-wide embeddings, Stage C expects "
                                  f"{self.stage_c.config.c_clip_img}")
        return self._image_encoder

    def capabilities(self) -> "Capabilities":  # noqa: F821
        """Which modes, sizes and ControlNet kinds this pipeline can run, and why not (see `capabilities.py`)."""
        from .capabilities import of

        return of(self)

    @property
    def stage_a_dtype(self) -> torch.dtype:
        return self.stage_a.in_block[1].weight.dtype

    @property
    def min_size(self) -> int:
        """Smallest output side: Stage B halves its latent once per level after its patchify."""
        cfg = self.stage_b.config
        return STAGE_A_FACTOR * cfg.patch_size * 2 ** (len(cfg.c_hidden) - 1)

    # ---------------------------------------------------------------------------------------- offload
    def _offloaded_parts(self) -> list:
        return [self.text_encoder.model, self.stage_c, self.stage_b, self.stage_a]

    def _running(self, part: torch.nn.Module):
        """Model offload: `part` on the device while the block runs; other modes have it there already."""
        if self.offload == "model":
            return offload_module.running(part, self.device)
        return contextlib.nullcontext(part)

    def _text(self, run: _Run):
        """CLIP hidden states and pooled embeddings of the prompts and of the negative prompts, each repeated
        `run.n` times: (text, pooled), (negative text, negative pooled), in one visit of the encoder to the device."""
        with self._running(self.text_encoder.model):
            return [tuple(t.to(self.device).repeat_interleave(run.n, 0) for t in self.text_encoder(prompts))
                    for prompts in (run.prompts, run.negatives)]

    # ------------------------------------------------------------------------------------------- steps
    def _stage(self, stage: str, model, cond: dict, uncond: dict, guidance: float, x, steps: int, shift: float,
               run: _Run, t_start: float = 1.0) -> torch.Tensor:
        """Sample one stage. float16 overflow is caught without waiting on the device at each step: a non-finite
        result (checked once, at the end) makes the stage run again from the same noise in float32 (its step
        events start again at 1), instead of ending in a black image."""
        sampler = run.sampling if stage == "prior" else run.decoder_sampling
        spec = sampling_module.get(sampler)
        name = {"prior": "Stage C", "decoder": "Stage B"}[stage]
        with self._running(model), _keeping_dtype(model):
            denoise = sampling_module.GuidedDenoiser(model, cond, uncond, guidance, spec.rho)
            states = sampling_module.generator_states(run.generator)
            while True:
                with tqdm(total=steps, desc=name, disable=not run.progress, leave=False) as bar:
                    latents = sampling_module.sample(denoise, x, steps, sampler=sampler, shift=shift,
                                                     t_start=t_start, target=self.predictions[stage == "decoder"],
                                                     generator=run.generator,
                                              callback=self._on_step(stage, steps, run, bar))
                if latents.device.type == "meta" or torch.isfinite(latents).all():  # meta: shape-only runs
                    return latents
                if model.dtype != torch.float16:
                    self._fail_nonfinite(name)
                warnings.warn(f"{name} overflowed in float16 (its result has inf/NaN values); sampling it again in "
                              "float32, which needs twice its weight memory. Use dtype=torch.bfloat16 (--dtype bf16) "
                              "or float32 to avoid this.", RuntimeWarning, stacklevel=3)
                model.float()
                denoise.prepare()
                sampling_module.restore_generators(run.generator, states)

    def _on_step(self, stage: str, total: int, run: _Run, bar):
        previews = run.preview_callback is not None and stage == "prior"
        previewer = self.previewer if previews else None

        def on_step(i, x0):
            bar.update()
            if run.step_callback is not None:
                run.step_callback(StepEvent(stage, i + 1, total, x0))
            if previews:
                run.preview_callback(i, previewer(x0.float()).float().clamp(0, 1))

        return on_step

    def _shifts(self, sampler: str) -> tuple[float, float]:
        """(Stage C, Stage B) schedule shifts: the models' own for the GDF samplers, none for "diffusers"."""
        if sampling_module.get(sampler).model_shifts:
            return self.official_shifts
        if self.shifts_required and self.official_shifts != (1.0, 1.0) and not self._warned_shifts:
            self._warned_shifts = True
            warnings.warn(f"these models were made for schedule shifts {self.official_shifts} (Stage C, Stage B); "
                          f"sampler {sampler!r} samples without shifts and will give poor images. Use "
                          "sampling='official' (or another GDF sampler).", UserWarning, stacklevel=4)
        return 1.0, 1.0

    def default_decoder_guidance(self, sampler: str) -> float:
        """The Stage B guidance `sampler` uses on this model when a call gives none (see `settings`): a consistency
        Stage B's own where it samples with "lcm" (what the web UI and the A1111 API fill in)."""
        consistency = self.consistency[1]
        if consistency is not None and sampler in (DEFAULTS.sampler, "lcm"):
            return consistency.guidance
        return DEFAULTS.decoder_guidance_for(sampling_module.get(sampler), self.decoder_guidance)

    def _fail_nonfinite(self, name: str) -> None:
        """Fail, naming the likely cause, instead of decoding NaN latents into a silent black picture."""
        cause = f"the LoRAs {sorted(self.loras)} at scales {list(self.loras.values())}" if self.loras else \
            "its weights (a broken or wrongly converted file)"
        raise CheckpointError(f"{name} produced NaN or infinite latents; the likely cause is {cause}. Check "
                              "the files, or lower the LoRA scales.")

    def _noise(self, shape, run: _Run) -> torch.Tensor:
        return sampling_module.randn(shape, run.generator, device=self.device)

    def _prior(self, run: _Run, clip_img: Optional[torch.Tensor] = None, init: Optional[torch.Tensor] = None,
               strength: float = 1.0, cnet: Optional[list] = None):
        """Stage C latents (B,16,h,w) and the pooled text of both CFG halves. With `init` (clean latents), start
        from it noised to `strength` (see `_sample_from`). `cnet` is a ControlNet's output for one image, given to
        both CFG halves as in the official code."""
        shift, _ = self._shifts(run.sampling)
        (text, pooled), (neg_text, neg_pooled) = self._text(run)
        no_image = torch.zeros(run.batch, 1, self.stage_c.config.c_clip_img, device=self.device, dtype=self.dtype)
        image = no_image if clip_img is None else clip_img.to(self.device, self.dtype).expand(run.batch, -1, -1)
        cond = dict(clip_text=text, clip_text_pooled=pooled, clip_img=image)
        uncond = dict(clip_text=neg_text, clip_text_pooled=neg_pooled, clip_img=torch.zeros_like(image))
        if cnet is not None:
            cond["cnet"] = uncond["cnet"] = [None if c is None else c.expand(run.batch, -1, -1, -1) for c in cnet]
        (hc, wc), _ = latent_sizes(run.height, run.width, run.compression)
        shape = (run.batch, self.stage_c.config.c_out, hc, wc)
        latents = self._sample_from("prior", self.stage_c, cond, uncond, run.prior_guidance, shape, run.prior_steps,
                                    shift, run, init, strength)
        return latents, pooled, neg_pooled

    def _sample_from(self, stage: str, model, cond: dict, uncond: dict, guidance: float, shape: tuple, steps: int,
                     shift: float, run: _Run, init: Optional[torch.Tensor], strength: float) -> torch.Tensor:
        """Sample one stage from noise or, with `init` (clean latents), from `init` noised to `strength` (0 keeps
        it, 1 is pure noise) over that fraction of the steps. Noising and sampling use the same shifted schedule
        (the official notebook noised at shift 1 but sampled at shift 2)."""
        if init is not None and strength <= 0:  # nothing to denoise: the clean latents themselves, no noise drawn
            return init.to(self.device, torch.float32).expand(shape).clone()
        noise = self._noise(shape, run)
        if init is None or strength >= 1:
            return self._stage(stage, model, cond, uncond, guidance, noise, steps, shift, run)
        lam = diffusion.logsnr(torch.tensor(strength), shift).to(self.device)
        x = diffusion.diffuse(init.to(self.device, torch.float32).expand(shape), noise, lam)
        return self._stage(stage, model, cond, uncond, guidance, x, max(1, int(steps * strength)), shift, run,
                           t_start=strength)

    def _decoder(self, run: _Run, latents_c, pooled, neg_pooled, init: Optional[torch.Tensor] = None,
                 strength: float = 1.0) -> torch.Tensor:
        """Stage B sampling conditioned on Stage C latents, then Stage A decoding -> images (B,3,H,W) in [0, 1].
        With `init` (Stage A latents of an input image), Stage B starts from it noised to `strength`."""
        _, shift = self._shifts(run.decoder_sampling)
        effnet = latents_c.to(self.device, self.dtype)
        cond = dict(effnet=effnet, clip=pooled)
        uncond = dict(effnet=torch.zeros_like(effnet), clip=neg_pooled)
        _, (hb, wb) = latent_sizes(run.height, run.width, run.compression)
        shape = (run.batch, self.stage_b.config.c_out, hb, wb)
        latents_b = self._sample_from("decoder", self.stage_b, cond, uncond, run.decoder_guidance, shape,
                                      run.decoder_steps, shift, run, init, strength)
        tiled = run.tiled_decode if run.tiled_decode is not None else run.width * run.height > TILED_DECODE_AREA
        with self._running(self.stage_a):
            latents_b = latents_b.to(self.stage_a_dtype)
            images = self.stage_a.decode_tiled(latents_b) if tiled else self.stage_a.decode(latents_b)
        return images.float().clamp(0, 1)

    def _output(self, images: torch.Tensor, run: _Run, mode: str, **extra):
        if run.output_type == "pt":
            return images.cpu()
        parameters = dict(mode=mode, width=run.width, height=run.height, prior_steps=run.prior_steps,
                          prior_guidance=run.prior_guidance, decoder_steps=run.decoder_steps,
                          decoder_guidance=run.decoder_guidance, sampling=run.sampling,
                          compression=run.compression, **extra)
        if run.decoder_sampling != run.sampling:
            parameters["decoder_sampling"] = run.decoder_sampling
        pil = to_pil(images)
        for i, im in enumerate(pil):
            im.info["parameters"] = {**parameters, "seed": run.seeds[i] if run.seeds else None,
                                     "prompt": run.prompts[i // run.n],
                                     "negative_prompt": run.negatives[i // run.n], "index_in_batch": i}
        return pil

    # ------------------------------------------------------------------------------------------- modes
    @torch.inference_mode()
    def __call__(
        self,
        prompt: Union[str, Sequence[str]],
        negative_prompt: Union[str, Sequence[str]] = "",
        width: Optional[int] = None,
        height: Optional[int] = None,
        num_images_per_prompt: int = DEFAULTS.num_images,
        prior_steps: int = DEFAULTS.prior_steps,
        prior_guidance: float = DEFAULTS.prior_guidance,
        decoder_steps: int = DEFAULTS.decoder_steps,
        decoder_guidance: Optional[float] = DEFAULTS.decoder_guidance,
        seed: Union[int, Sequence[int], None] = None,
        generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
        sampling: str = DEFAULTS.sampler,
        output_type: str = "pil",
        progress: bool = True,
        compression: Optional[float] = None,
        preview_callback: Optional[PreviewCallback] = None,
        step_callback: Optional[StepCallback] = None,
        tiled_decode: Optional[bool] = None,
    ):
        """Text-to-image. Returns a list of PIL images (each with its parameters in `.info["parameters"]`), or with
        `output_type="pt"` a float tensor in [0, 1] of shape (B,3,H,W). Copies of one prompt are adjacent.
        `width`/`height` default to the model's native size (1024 for the released models, 64 for nano),
        `decoder_guidance` to the model's (1.1 for the released models) with the GDF samplers, 0 with "diffusers".

        `sampling`: a name of `stablecascade.sampling.SAMPLERS` ("official", "diffusers", "ddim", "euler",
        "euler_a", "dpmpp_2m"). `seed`: image i of the call is drawn from seed + i alone (its metadata carries
        that seed, and that seed alone gives the same image), or a list of seeds, one per image; default random.
        `generator`: instead of a seed, one torch.Generator for the whole batch or one per image (a CUDA one is
        replaced by a CPU generator with its seed: noise is always drawn on the CPU, so it does not depend on the
        device). `step_callback(StepEvent)` is called after every sampling step of both stages; raising from it
        stops the run.

        `compression` sets the Stage C latent size (ceil(size / compression)): lower values give more detail at
        more cost; default the model's (42.67 for the released models). `preview_callback(step, preview)` receives
        the Previewer's RGB preview (B,3,8h,8w) in [0, 1] of the current Stage C estimate after every Stage C step.
        `tiled_decode` makes Stage A decode in tiles (bounded memory); None does so above 2048x2048 pixels."""
        run = self._settings(**{k: v for k, v in locals().items() if k != "self"})
        return self._output(self._decoder(run, *self._prior(run)), run, "text-to-image")

    @torch.inference_mode()
    def variation(self, images: Union[ImageInput, Sequence[ImageInput]], prompt: Union[str, Sequence[str]] = "",
                  weights: Optional[Sequence[float]] = None, **options):
        """Image variation: Stage C conditioned on the CLIP image embeddings of one or more images (mixed, each
        scaled by its weight), with or without a prompt. `options` are those of text-to-image."""
        images = images if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise InputError("variation needs at least one image")
        weights = [1.0] * len(images) if weights is None else list(weights)
        if len(weights) != len(images):
            raise InputError(f"got {len(weights)} weights for {len(images)} images; give one weight per image")
        embeds = torch.cat([self.image_encoder(load_image(im)[None].to(self.device)) * w
                            for im, w in zip(images, weights)], dim=1)
        run = self._settings(prompt=prompt, **options)
        return self._output(self._decoder(run, *self._prior(run, clip_img=embeds)), run, "variation",
                            image_weights=weights)

    @torch.inference_mode()
    def img2img(self, image: ImageInput, prompt: Union[str, Sequence[str]], strength: float = 0.8, **options):
        """Image-to-image: both stages start from the image, noised to `strength` (0 keeps it, 1 ignores it), and
        denoise with the prompt over that fraction of their steps: Stage C from the image's Stage C latent, Stage B
        from its Stage A latent, so strength 0 returns Stage A's round trip of the image and low strengths keep its
        fine detail. The output size defaults to the input's, scaled down to at most 1024x1024 pixels of area, in
        multiples of 8. `options` are those of text-to-image."""
        if not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise InputError(f"strength must be between 0 and 1, got {strength!r}")
        pixels = load_image(image)[None]
        width, height = default_size(pixels.shape[-1], pixels.shape[-2])
        options = {"width": width, "height": height, **options}
        run = self._settings(prompt=prompt, **options)
        init_c = init_b = None
        if strength < 1:
            init_c = self._encode(pixels, run.height, run.width, run.compression)
            init_b = self._encode_stage_a(pixels, run.height, run.width)
        prior = self._prior(run, init=init_c, strength=strength)
        return self._output(self._decoder(run, *prior, init=init_b, strength=strength), run, "image-to-image",
                            strength=strength)

    def _encode_stage_a(self, pixels, height, width) -> torch.Tensor:
        """Stage A latents (1,C,H/4,W/4) of an image resized to the output size: where Stage B starts from."""
        _, (hb, wb) = latent_sizes(height, width)
        with self._running(self.stage_a):
            resized = resize(pixels.to(self.device), hb * STAGE_A_FACTOR, wb * STAGE_A_FACTOR).to(self.stage_a_dtype)
            return self.stage_a.encode(resized).float()

    @torch.inference_mode()
    def encode(self, images: Union[ImageInput, Sequence[ImageInput]],
               compression: Optional[float] = None) -> torch.Tensor:
        """Stage C latents (B,16,ceil(H/compression),ceil(W/compression)) of images of one size, through the
        EfficientNet encoder; 1024x1024 -> 16x24x24 by default."""
        images = images if isinstance(images, (list, tuple)) else [images]
        pixels = [load_image(im) for im in images]
        if len({p.shape for p in pixels}) != 1:
            raise InputError("encode() takes images of one size; encode differently sized images separately")
        batch = torch.stack(pixels)
        return self._encode(batch, batch.shape[-2], batch.shape[-1], self._compression(compression)).cpu()

    def _compression(self, compression: Optional[float]) -> float:
        """The asked compression, checked, or the model's own."""
        return _check_compression(self.compression if compression is None else compression)

    def _encode(self, pixels, height, width, compression):
        (hc, wc), _ = latent_sizes(height, width, compression)
        target = (hc * EFFNET_FACTOR, wc * EFFNET_FACTOR)
        usual = max(1.0, EFFNET_FACTOR / self.compression)  # the upscaling the model's own compression implies
        if pixels.shape[-2] * 2 * usual < target[0] or pixels.shape[-1] * 2 * usual < target[1]:
            log.warning("upscaling a %dx%d image to %dx%d for the encoder; details will be soft",
                        pixels.shape[-1], pixels.shape[-2], target[1], target[0])
        return self.effnet(resize(pixels.to(self.device), *target)).float()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, prompt: Union[str, Sequence[str]] = "", **options):
        """Images from Stage C latents (B,16,h,w) through Stage B and Stage A. The output size defaults to the
        latent size times `compression`, in multiples of 8 (24x24 -> 1024x1024). `options` are those of
        text-to-image; `num_images_per_prompt` decodes each latent several times."""
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != self.stage_c.config.c_out:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise InputError(f"latents must be a (B,{self.stage_c.config.c_out},h,w) tensor, got {shape}")
        if not torch.isfinite(latents).all():
            raise InputError("latents contain NaN or infinite values")
        compression = self._compression(options.get("compression"))
        h, w = latents.shape[-2:]
        options = {"height": round8(h * compression), "width": round8(w * compression), **options}
        prompts = [prompt] * latents.shape[0] if isinstance(prompt, str) else list(prompt)
        run = self._settings(prompt=prompts, **options)
        if len(prompts) != latents.shape[0]:
            raise InputError(f"got {len(prompts)} prompts for {latents.shape[0]} latents")
        (_, pooled), (_, neg_pooled) = self._text(run)
        images = self._decoder(run, latents.float().repeat_interleave(run.n, 0), pooled, neg_pooled)
        return self._output(images, run, "decode")

    @torch.inference_mode()
    def controlnet(self, kind: str, control: ImageInput, prompt: Union[str, Sequence[str]], *,
                   mask=None, outpaint=None, control_strength: float = 1.0, saliency=None, face_models=None,
                   **options):
        """Generate under a ControlNet; returns (images, control images) so the filter's work can be seen.

        kind: "canny" (edges of `control`), "inpaint" (regenerate where `mask` is white; `outpaint=pixels` pads the
        image instead, an int or (left, top, right, bottom); without a mask, `saliency` weights find one), "face"
        (insightface identities from `control`, models in `face_models`), "sr" (2x super-resolution of `control`,
        guidance 1 by default as in the official notebook). The output size defaults to the control image's
        (scaled down to 1024x1024 pixels of area), or twice it for "sr". `options` are those of text-to-image."""
        from . import controlnet_filters as filters

        spec = controlnets.get(kind)
        if not isinstance(control_strength, (int, float)) or not math.isfinite(control_strength):
            raise InputError(f"control_strength must be a finite number, got {control_strength!r}")
        net = self.load_controlnet(kind) if kind not in self._controlnets else self._controlnets[kind]
        pixels = load_image(control)[None].to(self.device)
        if kind == "inpaint" and outpaint is not None:
            pixels, mask = filters.pad_for_outpaint(pixels, outpaint)
        if spec.upscale is not None:
            height, width = filters.sr_output_size(*pixels.shape[-2:], scale=spec.upscale)
        else:
            width, height = default_size(pixels.shape[-1], pixels.shape[-2])
        if spec.prior_guidance is not None:
            options = {"prior_guidance": spec.prior_guidance, **options}
        run = self._settings(prompt=prompt, **{"width": width, "height": height, **options})
        (hc, wc), _ = latent_sizes(run.height, run.width, run.compression)
        seen = resize(pixels, hc * EFFNET_FACTOR, wc * EFFNET_FACTOR)  # what the ControlNet's backbone looks at
        control_input, preview = spec.filter(self, pixels, seen, mask=mask, saliency=saliency,
                                             face_models=face_models)
        features = [None if f is None else f * control_strength for f in net(control_input.to(self.dtype))]
        images = self._decoder(run, *self._prior(run, cnet=features))
        preview = resize(preview.float().clamp(0, 1), run.height, run.width).cpu()
        return (self._output(images, run, "controlnet", controlnet=kind, control_strength=control_strength),
                to_pil(preview) if run.output_type == "pil" else preview)

    def load_controlnet(self, kind: str, path: Optional[Union[str, Path]] = None) -> torch.nn.Module:
        """Load the ControlNet used for `kind` (default: the released file from the Hub, when it fits this model)."""
        spec = controlnets.get(kind)
        if path is None:
            reason = self.capabilities().controlnet_reason(kind)
            if reason:
                raise UnsupportedError(f"the {kind} ControlNet cannot run here: {reason}")
            path = hub.file(hub.DECODER_REPO, spec.released_file)
        net = checkpoints.load_controlnet(path, dtype=self.dtype, device=self.device)
        want = spec.config.c_in
        if net.config.c_in != want:
            raise CheckpointError(f"{path} is a ControlNet for {net.config.c_in}-channel controls, not the {kind} "
                                  f"ControlNet ({want} channels)")
        if net.config.c_proj != self.stage_c.config.c_hidden[0] or max(net.config.proj_blocks) >= \
                self.stage_c.resblock_calls:
            raise CheckpointError(f"{path} was made for a different Stage C (the released ControlNets need the 3.6B "
                                  "Stage C)")
        self._controlnets[kind] = net
        return net

    def load_lora(self, path: Union[str, Path, dict], scale: float = 1.0, *, mode: str = "merge",
                  new_tokens: Optional[Sequence] = None, name: Optional[str] = None) -> str:
        """Apply a LoRA (official, kohya or OneTrainer format) to Stage C and the text encoder; several can be
        stacked, each with its scale. mode "merge" folds it into the weights (fastest), "adapter" keeps it
        switchable. `new_tokens` [(token, init regex)] names the trained tokens of official files that do not
        store them (e.g. [("[fernando]", "^dog</w>")]). Returns the LoRA's name for `set_lora_scale`."""
        if mode not in ("merge", "adapter"):
            raise InputError(f"mode must be 'merge' or 'adapter', got {mode!r}")
        if self._loras is None:
            self._loras = LoRAManager(self.stage_c, self.text_encoder)
        lora = read_lora(path, self.stage_c, self.text_encoder, new_tokens=new_tokens)
        rescaled = f"up_blocks.{len(self.stage_c.up_blocks) - 1}."
        if getattr(self.stage_c, "fp16_rescale", None) is not None and any(
                d.model == "stage_c" and d.module.startswith(rescaled) for d in lora.layers):
            raise InputError(f"{path} changes Stage C's last block group, whose weights are rescaled for float16; "
                             "load the pipeline in bfloat16 or float32 to use this LoRA")
        name = self._loras.add(lora, scale, name=name or (Path(path).stem if not isinstance(path, dict) else None))
        self._loras.apply(mode)
        self._offload_swapped_in()
        return name

    def set_lora_scale(self, name: str, scale: float) -> None:
        if self._loras is None:
            raise InputError("no LoRA is loaded")
        self._loras.set_scale(name, scale)
        self._offload_swapped_in()

    def _offload_swapped_in(self) -> None:
        """Token LoRAs swap a new embedding module into the text encoder; under sequential offload it visits the
        device like the module it replaces (a plain one would stay in CPU memory, its input on the device)."""
        if self.offload == "sequential":
            offload_module.sequential(self.text_encoder.model, self.device)

    def unload_loras(self) -> None:
        """Remove every LoRA: weights, tokenizer and token embeddings are restored exactly."""
        if self._loras is not None:
            self._loras.unmerge()
            self._loras = None

    @property
    def loras(self) -> dict:
        """Loaded LoRAs: name -> scale."""
        return {} if self._loras is None else dict(self._loras.scales)

    # --------------------------------------------------------------------------------------- validation
    def _settings(self, prompt, negative_prompt="", width=None, height=None,
                  num_images_per_prompt=DEFAULTS.num_images, prior_steps=DEFAULTS.prior_steps,
                  prior_guidance=DEFAULTS.prior_guidance, decoder_steps=DEFAULTS.decoder_steps,
                  decoder_guidance=DEFAULTS.decoder_guidance, seed=None, generator=None, sampling=DEFAULTS.sampler,
                  output_type="pil", progress=True, compression=None, preview_callback=None,
                  step_callback=None, tiled_decode=None) -> _Run:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError("prompt must be a string or a non-empty list of strings")
        if len(negatives) != len(prompts) or not all(isinstance(p, str) for p in negatives):
            raise InputError(f"negative_prompt must be a string or a list of {len(prompts)} strings "
                             "(one per prompt)")
        if sampling not in sampling_module.SAMPLERS:
            raise InputError(f"sampling must be one of {', '.join(sampling_module.SAMPLERS)}, got {sampling!r}")
        # consistency sampling needs a consistency-distilled stage (a consistency LoRA on Stage C, or the stage file)
        decoder_sampling, decoder_steps, decoder_guidance = sampling_module.consistency_plan(
            self.consistency[1], sampling, decoder_steps, decoder_guidance, DEFAULTS.decoder_steps,
            DEFAULTS.decoder_guidance)
        if decoder_sampling == "lcm" and self.consistency[1] is None:
            decoder_sampling = DEFAULTS.sampler
        if decoder_guidance is None:
            decoder_guidance = self.default_decoder_guidance(decoder_sampling)
        sampling, prior_steps, prior_guidance = sampling_module.consistency_plan(
            (self._loras and self._loras.consistency) or self.consistency[0], sampling, prior_steps, prior_guidance,
            DEFAULTS.prior_steps, DEFAULTS.prior_guidance)
        width = self.native_size if width is None else width
        height = self.native_size if height is None else height
        for name, v in (("width", width), ("height", height)):
            if not isinstance(v, int) or v <= 0 or v % 8:
                near = max(8, round(v / 8) * 8) if isinstance(v, (int, float)) and v > 0 else 1024
                raise InputError(f"{name}={v!r} is not supported: sizes must be positive multiples of 8 "
                                 f"(Stage A decodes 4x4 pixel cells of a latent that Stage B halves). Try {near}.")
        if min(width, height) < self.min_size:
            raise InputError(f"{width}x{height} is too small: Stage B needs at least {self.min_size} pixels per side "
                             f"(it halves its latent {len(self.stage_b.config.c_hidden) - 1} times).")
        for name, v in (("num_images_per_prompt", num_images_per_prompt), ("prior_steps", prior_steps),
                        ("decoder_steps", decoder_steps)):
            if not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a whole number >= 1, got {v!r}")
        for name, v in (("prior_guidance", prior_guidance), ("decoder_guidance", decoder_guidance)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InputError(f"{name} must be a finite number >= 0, got {v!r}")
        if tiled_decode not in (None, True, False):
            raise InputError(f"tiled_decode must be None (automatic), True or False, got {tiled_decode!r}")
        if output_type not in ("pil", "pt"):
            raise InputError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        batch = len(prompts) * num_images_per_prompt
        limits.current().check_generation(width=width, height=height, images=batch,
                                          steps={"prior_steps": prior_steps, "decoder_steps": decoder_steps}, seed=seed)
        if generator is not None:
            if isinstance(generator, (list, tuple)) and len(generator) != batch:
                raise InputError(f"got {len(generator)} generators for {batch} images; give one, or one per image")
            seeds, generator = None, sampling_module.cpu_generators(generator)
        else:
            seeds = _seeds(seed, batch)
            generator = sampling_module.seeded(seeds)
        return _Run(prompts, negatives, num_images_per_prompt, width, height, prior_steps, prior_guidance,
                    decoder_steps, decoder_guidance, seeds, generator, sampling, output_type, progress,
                    self._compression(compression), preview_callback, step_callback, tiled_decode, decoder_sampling)


@contextlib.contextmanager
def _keeping_dtype(model: torch.nn.Module):
    """Put back the model's dtype if the float16 guard upcast it (float16 -> float32 -> float16 is exact)."""
    dtype = model.dtype
    try:
        yield
    finally:
        if model.dtype != dtype:
            model.to(dtype)


def _seeds(seed, batch: int) -> list:
    """One seed per image: seed + i (AUTOMATIC1111's and ComfyUI's convention), or the given list (their range
    and type were checked by `limits.check_seed`)."""
    if seed is None:
        seed = secrets.randbelow(2**31)
    if not isinstance(seed, (list, tuple)):
        return [seed + i for i in range(batch)]
    if len(seed) != batch:
        raise InputError(f"got {len(seed)} seeds for {batch} images; give one seed, or one per image")
    return list(seed)
