"""The pipeline: owns the loaded parts and runs text-to-image through Stage C -> Stage B -> Stage A."""

from __future__ import annotations

import math
import secrets
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from . import checkpoints, diffusion, hub
from .conditioning import TextEncoder
from .errors import CheckpointError, InputError
from .images import to_pil

COMPRESSION = 42.67  # image pixels per Stage C latent cell (1024 px -> 24 cells)
STAGE_A_FACTOR = 4  # image pixels per Stage B latent cell
SAMPLING_DEFAULTS = {  # per mode: (Stage C shift, Stage B shift, cfg_rho); official values from the notebooks
    "official": (2.0, 1.0, 0.7),
    "diffusers": (1.0, 1.0, 0.0),
}
PRIOR_KEYS = {"stage_c", "text_encoder", "tokenizer"}
DECODER_KEYS = {"stage_b", "stage_a", "text_encoder", "tokenizer"}
Source = Union[str, Path, Mapping[str, Union[str, Path]]]


def latent_sizes(height: int, width: int, compression: float = COMPRESSION) -> tuple[tuple[int, int], tuple[int, int]]:
    """(Stage C latent h, w), (Stage B latent h, w) for an output size (`official-spec.md` §5)."""
    return ((math.ceil(height / compression), math.ceil(width / compression)),
            (height // STAGE_A_FACTOR, width // STAGE_A_FACTOR))


class StableCascadePipeline:
    def __init__(self, stage_c, stage_b, stage_a, text_encoder: TextEncoder, *, device="cpu",
                 dtype=torch.float32):
        self.stage_c, self.stage_b, self.stage_a, self.text_encoder = stage_c, stage_b, stage_a, text_encoder
        self.device, self.dtype = torch.device(device), dtype
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

    # ------------------------------------------------------------------------------------------ helpers
    def _denoiser(self, model, cond: dict, uncond: Optional[dict], guidance: float, rho: float):
        """ε(x, r) of a stage with classifier-free guidance batched into one model call (active when > 1)."""

        def denoise(x, r):
            if uncond is None or guidance <= 1:
                return model(x.to(self.dtype), r.to(self.dtype), **cond).float()
            both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
            pred = model(torch.cat([x, x]).to(self.dtype), torch.cat([r, r]).to(self.dtype), **both).float()
            pred_cond, pred_uncond = pred.chunk(2)
            return diffusion.guidance(pred_cond, pred_uncond, guidance, rho)

        return denoise

    def _run_stage(self, name, denoise, shape, steps, shift, sampling, generator, progress):
        x = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        with tqdm(total=steps, desc=name, disable=not progress, leave=False) as bar:
            return diffusion.sample(denoise, x, steps, shift=shift, mode=sampling, generator=generator,
                                    callback=lambda i, x0: bar.update())

    # ------------------------------------------------------------------------------------------ text-to-image
    @torch.inference_mode()
    def __call__(
        self,
        prompt: Union[str, Sequence[str]],
        negative_prompt: Union[str, Sequence[str]] = "",
        width: int = 1024,
        height: int = 1024,
        num_images_per_prompt: int = 1,
        prior_steps: int = 20,
        prior_guidance: float = 4.0,
        decoder_steps: int = 10,
        decoder_guidance: float = 0.0,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        sampling: str = "official",
        output_type: str = "pil",
        progress: bool = True,
    ):
        """Text-to-image. Returns a list of PIL images (each with its parameters in `.info`), or with
        `output_type="pt"` a float tensor in [0, 1] of shape (B,3,H,W). Copies of one prompt are adjacent."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        self._validate(prompts, negatives, width, height, num_images_per_prompt, prior_steps, decoder_steps,
                       prior_guidance, decoder_guidance, sampling, output_type)
        self._check_size(width, height)
        if generator is None:
            seed = secrets.randbelow(2**31) if seed is None else int(seed)
            generator = torch.Generator().manual_seed(seed)
        shift_c, shift_b, rho = SAMPLING_DEFAULTS[sampling]
        n = num_images_per_prompt
        (hc, wc), (hb, wb) = latent_sizes(height, width)

        text, pooled = (t.repeat_interleave(n, 0) for t in self.text_encoder(prompts))
        neg_text, neg_pooled = (t.repeat_interleave(n, 0) for t in self.text_encoder(negatives))
        batch = text.shape[0]
        no_image = torch.zeros(batch, 1, self.stage_c.config.c_clip_img, device=self.device, dtype=self.dtype)

        cond_c = dict(clip_text=text, clip_text_pooled=pooled, clip_img=no_image)
        uncond_c = dict(clip_text=neg_text, clip_text_pooled=neg_pooled, clip_img=no_image)
        latents_c = self._run_stage(
            "Stage C", self._denoiser(self.stage_c, cond_c, uncond_c, prior_guidance, rho),
            (batch, self.stage_c.config.c_out, hc, wc), prior_steps, shift_c, sampling, generator, progress)

        effnet = latents_c.to(self.dtype)
        cond_b = dict(effnet=effnet, clip=pooled)
        uncond_b = dict(effnet=torch.zeros_like(effnet), clip=neg_pooled)
        latents_b = self._run_stage(
            "Stage B", self._denoiser(self.stage_b, cond_b, uncond_b, decoder_guidance, rho),
            (batch, self.stage_b.config.c_out, hb, wb), decoder_steps, shift_b, sampling, generator, progress)

        images = self.stage_a.decode(latents_b.to(self.stage_a_dtype)).float().clamp(0, 1)
        if output_type == "pt":
            return images.cpu()
        parameters = dict(negative_prompt=None, width=width, height=height, prior_steps=prior_steps,
                          prior_guidance=prior_guidance, decoder_steps=decoder_steps,
                          decoder_guidance=decoder_guidance, seed=seed, sampling=sampling)
        pil = to_pil(images)
        for i, im in enumerate(pil):
            im.info["parameters"] = {**parameters, "prompt": prompts[i // n], "negative_prompt": negatives[i // n],
                                     "index_in_batch": i}
        return pil

    @property
    def stage_a_dtype(self) -> torch.dtype:
        return self.stage_a.in_block[1].weight.dtype

    @property
    def min_size(self) -> int:
        """Smallest output side: Stage B halves its latent once per level after its patchify."""
        cfg = self.stage_b.config
        return STAGE_A_FACTOR * cfg.patch_size * 2 ** (len(cfg.c_hidden) - 1)

    def _check_size(self, width: int, height: int) -> None:
        if min(width, height) < self.min_size:
            raise InputError(f"{width}x{height} is too small: Stage B needs at least {self.min_size} pixels per side "
                             f"(it halves its latent {len(self.stage_b.config.c_hidden) - 1} times).")

    @staticmethod
    def _validate(prompts, negatives, width, height, n, prior_steps, decoder_steps, prior_guidance,
                  decoder_guidance, sampling, output_type):
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError("prompt must be a string or a non-empty list of strings")
        if len(negatives) != len(prompts) or not all(isinstance(p, str) for p in negatives):
            raise InputError(f"negative_prompt must be a string or a list of {len(prompts)} strings "
                             "(one per prompt)")
        for name, v in (("width", width), ("height", height)):
            if not isinstance(v, int) or v <= 0 or v % 8:
                near = max(8, round(v / 8) * 8) if isinstance(v, (int, float)) and v > 0 else 1024
                raise InputError(f"{name}={v!r} is not supported: sizes must be positive multiples of 8 "
                                 f"(Stage A decodes 4x4 pixel cells of a latent that Stage B halves). Try {near}.")
        for name, v in (("num_images_per_prompt", n), ("prior_steps", prior_steps), ("decoder_steps", decoder_steps)):
            if not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a whole number >= 1, got {v!r}")
        for name, v in (("prior_guidance", prior_guidance), ("decoder_guidance", decoder_guidance)):
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InputError(f"{name} must be a finite number >= 0, got {v!r}")
        if sampling not in SAMPLING_DEFAULTS:
            raise InputError(f"sampling must be one of {sorted(SAMPLING_DEFAULTS)}, got {sampling!r}")
        if output_type not in ("pil", "pt"):
            raise InputError(f"output_type must be 'pil' or 'pt', got {output_type!r}")


# ---------------------------------------------------------------------------------------------- loading
def _resolve(source: Source, role: str, variant: Optional[str]) -> dict:
    """Map a prior/decoder source to {component: path}. Components: see PRIOR_KEYS / DECODER_KEYS."""
    allowed = PRIOR_KEYS if role == "prior" else DECODER_KEYS
    subfolders = {"prior": ("prior", "text_encoder", "tokenizer"), "decoder": ("decoder", "vqgan")}[role]
    if isinstance(source, Mapping):
        unknown = set(source) - allowed
        if unknown:
            raise InputError(f"unknown {role} component(s) {sorted(unknown)}; use {sorted(allowed)}")
        return {k: Path(v) if not hub.looks_like_repo_id(str(v)) else str(v) for k, v in source.items()}
    text = str(source)
    path = Path(text).expanduser()
    if not path.exists():
        if not hub.looks_like_repo_id(text):
            raise CheckpointError(f"{role} not found: {text!r} is neither a file, a folder nor a Hub repo id "
                                  "like 'stabilityai/stable-cascade-prior'.")
        path = hub.snapshot(text, subfolders, variant)
    if path.is_file():
        return {"stage_c" if role == "prior" else "stage_b": path}
    main = path / subfolders[0]
    if not main.is_dir():
        if (path / "config.json").is_file():  # a single diffusers model folder
            return {"stage_c" if role == "prior" else "stage_b": path}
        raise CheckpointError(f"{path} is not a diffusers {role} pipeline folder: it has no {subfolders[0]}/ "
                              "subfolder (nor a config.json of its own).")
    parts = {"stage_c" if role == "prior" else "stage_b": main}
    for key, sub in (("stage_a", "vqgan"), ("text_encoder", "text_encoder"), ("tokenizer", "tokenizer")):
        if key in allowed and (path / sub).is_dir():
            parts[key] = path / sub
    return parts


def _load_text_encoder(parts: dict, dtype, device) -> TextEncoder:
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    def where(key):
        value = parts.get(key) or parts.get("text_encoder")
        if value is None:  # official single files carry no text encoder: use the released one
            return str(hub.snapshot(hub.PRIOR_REPO, ("text_encoder", "tokenizer")) / key)
        return str(value)

    try:
        tokenizer = AutoTokenizer.from_pretrained(where("tokenizer"))
        try:
            model = CLIPTextModelWithProjection.from_pretrained(where("text_encoder"), dtype=dtype)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = CLIPTextModelWithProjection.from_pretrained(where("text_encoder"), torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not load the CLIP text encoder/tokenizer: {e}") from None
    return TextEncoder(tokenizer, model.to(device))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_pipeline(prior: Source = hub.PRIOR_REPO, decoder: Source = hub.DECODER_REPO, *, device=None,
                  dtype=None) -> StableCascadePipeline:
    """Load Stage C (+ text encoder) from `prior` and Stage B + Stage A from `decoder`.

    Each may be a diffusers-layout pipeline folder, a Hub repo id, a single official .safetensors file, or a
    mapping of components to paths: prior {"stage_c", "text_encoder", "tokenizer"}, decoder {"stage_b",
    "stage_a"} (official files or diffusers model folders). Stage A runs in float32 (it is small)."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    variant = "bf16" if dtype == torch.bfloat16 else None
    prior_parts, decoder_parts = _resolve(prior, "prior", variant), _resolve(decoder, "decoder", variant)
    for role, parts, key in (("prior", prior_parts, "stage_c"), ("decoder", decoder_parts, "stage_b")):
        if key not in parts:
            raise InputError(f"the {role} mapping needs a {key!r} entry")
    if "stage_a" not in decoder_parts:
        decoder_parts["stage_a"] = hub.file(hub.DECODER_REPO, "stage_a.safetensors")

    def component(parts, key, kind, kind_dtype):
        value = parts[key]
        path = Path(value) if not isinstance(value, str) or not hub.looks_like_repo_id(value) else None
        if path is None:
            raise InputError(f"{key} must be a local file or folder, got the repo id {value!r}")
        return checkpoints.load_component(path, kind, dtype=kind_dtype, device=device)

    stage_c = component(prior_parts, "stage_c", "stage_c", dtype)
    stage_b = component(decoder_parts, "stage_b", "stage_b", dtype)
    stage_a = component(decoder_parts, "stage_a", "stage_a", torch.float32)
    text_parts = prior_parts if ("text_encoder" in prior_parts or "text_encoder" not in decoder_parts) else decoder_parts
    text_encoder = _load_text_encoder(text_parts, dtype, device)
    return StableCascadePipeline(stage_c, stage_b, stage_a, text_encoder, device=device, dtype=dtype)
