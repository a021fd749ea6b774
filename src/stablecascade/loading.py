"""Loading a pipeline: where each part comes from (a diffusers folder, a Hub repo id, an official file, a mapping of
parts, a model bundle such as the built-in nano model), the settings the model files record, and the device and dtype
to run on. `load_pipeline` reads them and builds a `StableCascadePipeline`."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from . import checkpoints, hub
from . import offload as offload_module
from . import sampling as sampling_module
from .conditioning import TextEncoder, load_text_encoder
from .errors import CheckpointError, InputError
from .pipeline import StableCascadePipeline
from .settings import RELEASED_SHIFTS

RELEASED_CLIP_IMG = 768  # embedding width of the released CLIP ViT-L image encoder
PRIOR_KEYS = {"stage_c", "text_encoder", "tokenizer", "image_encoder"}
DECODER_KEYS = {"stage_b", "stage_a", "text_encoder", "tokenizer"}
NANO_DIR = Path(__file__).parent / "assets" / "nano"  # hub.NANO, made by scripts/train_nano.py
Source = Union[str, Path, Mapping[str, Union[str, Path]]]

def _resolve(source: Source, role: str, variant: Optional[str]) -> dict:
    """Map a prior/decoder source to {component: path}. Components: see PRIOR_KEYS / DECODER_KEYS."""
    allowed = PRIOR_KEYS if role == "prior" else DECODER_KEYS
    subfolders = {"prior": ("prior", "text_encoder", "tokenizer"), "decoder": ("decoder", "vqgan")}[role]
    if isinstance(source, Mapping):
        unknown = set(source) - allowed
        if unknown:
            raise InputError(f"unknown {role} component(s) {sorted(unknown)}; use {sorted(allowed)}")
        return {k: Path(v) for k, v in source.items()}
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
    for key, sub in (("stage_a", "vqgan"), ("text_encoder", "text_encoder"), ("tokenizer", "tokenizer"),
                     ("image_encoder", "image_encoder")):
        if key in allowed and (path / sub).is_dir():
            parts[key] = path / sub
    return parts


def _load_text_encoder(parts: dict, dtype, device) -> TextEncoder:
    def where(key):
        value = parts.get(key) or parts.get("text_encoder")
        if value is None:  # official single files carry no text encoder: use the released one
            return hub.snapshot(hub.PRIOR_REPO, ("text_encoder", "tokenizer")) / key
        return value

    return load_text_encoder(where("text_encoder"), where("tokenizer"), dtype=dtype, device=device)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs that compute in it natively (compute capability 8.0, Ampere, and later: older ones emulate
    it slowly, though `torch.cuda.is_bf16_supported()` says yes), else float32."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    return torch.float32


def check_device(device) -> torch.device:
    """The device, or a clear error when it does not exist here."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use e.g. 'cuda', 'cuda:1' or 'cpu'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {str(device)!r} was asked for, but PyTorch finds no usable CUDA GPU here (no "
                             "GPU, a driver older than this PyTorch build, or a CPU-only build); use device 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {str(device)!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return device


def load_pipeline(prior: Source = hub.PRIOR_REPO, decoder: Source = hub.DECODER_REPO, *, device=None, dtype=None,
                  effnet: Union[str, Path, torch.nn.Module, None] = None,
                  previewer: Union[str, Path, torch.nn.Module, None] = None,
                  offload: Optional[str] = None) -> StableCascadePipeline:
    """Load Stage C (+ text encoder) from `prior` and Stage B + Stage A from `decoder`.

    Each may be a diffusers-layout pipeline folder, a Hub repo id, a single official .safetensors file, or a
    mapping of components to paths: prior {"stage_c", "text_encoder", "tokenizer", "image_encoder"}, decoder
    {"stage_b", "stage_a"} (official files or diffusers model folders). `effnet` and `previewer` are official
    files or loaded modules (default: the released ones from the Hub, fetched when first needed). Stage A, the
    EfficientNet encoder and the Previewer run in float32 (they are small).

    dtype=torch.float16 rescales Stage C's last block group so its activations fit float16 (same function, see
    `StageC.rescale_for_fp16`); a stage that still overflows warns and finishes in float32. `offload` ("model" or
    "sequential") keeps the big parts in CPU memory, see `StableCascadePipeline`.

    "nano" (for both) is the built-in model: a tiny cascade trained on 64x64 coloured shapes ("a red circle at
    the top left on a blue background") that runs offline in a second; its own encoder and Previewer come with it.
    Any folder laid out like it (model.json, prior/, decoder/; scripts/train_nano.py writes one) loads the same way."""
    offload_module.check_mode(offload)
    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise InputError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
    device = check_device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    load_device = torch.device("cpu") if offload else device
    model_defaults = {}  # what a bundle's model.json sets; the constructor's defaults are the released models'
    bundle = _bundle(prior)
    if bundle is not None:
        from .models.effnet import load_nano_encoder

        manifest = checkpoints.read_bundle_manifest(bundle / "model.json")
        prior = bundle / "prior"
        model_defaults = dict(native_size=manifest["native_size"], official_shifts=tuple(manifest["shifts"]),
                              decoder_guidance=manifest["decoder_guidance"], shifts_required=True,
                              predictions=tuple(manifest.get("predictions", ("eps", "eps"))),
                              prompt_examples=manifest.get("examples"),
                              **{k: manifest[k] for k in ("compression",) if k in manifest})
        effnet = effnet or load_nano_encoder(bundle / manifest["effnet"], device=device)
        previewer = previewer or bundle / manifest["previewer"]
    bundle = _bundle(decoder)
    if bundle is not None:
        decoder = bundle / "decoder"
    variant = "bf16" if dtype == torch.bfloat16 else None
    prior_parts, decoder_parts = _resolve(prior, "prior", variant), _resolve(decoder, "decoder", variant)
    for role, parts, key in (("prior", prior_parts, "stage_c"), ("decoder", decoder_parts, "stage_b")):
        if key not in parts:
            raise InputError(f"the {role} mapping needs a {key!r} entry")
    if "stage_a" not in decoder_parts:
        decoder_parts["stage_a"] = hub.file(hub.DECODER_REPO, "stage_a.safetensors")

    model_defaults.update(_recorded_settings(prior_parts["stage_c"], decoder_parts["stage_b"], model_defaults))
    stage_c = checkpoints.load_component(prior_parts["stage_c"], "stage_c", dtype=dtype, device=load_device)
    if dtype == torch.float16:
        stage_c.rescale_for_fp16()
    stage_b = checkpoints.load_component(decoder_parts["stage_b"], "stage_b", dtype=dtype, device=load_device)
    stage_a = checkpoints.load_component(decoder_parts["stage_a"], "stage_a", dtype=torch.float32, device=load_device)
    text_parts = prior_parts if ("text_encoder" in prior_parts or "text_encoder" not in decoder_parts) else decoder_parts
    text_encoder = _load_text_encoder(text_parts, dtype, load_device)
    return StableCascadePipeline(stage_c, stage_b, stage_a, text_encoder, device=device, dtype=dtype,
                                 image_encoder=prior_parts.get("image_encoder"),
                                 effnet=_part(effnet), previewer=_part(previewer), offload=offload,
                                 **model_defaults)


STAGE_NAMES = {"prior": "Stage C (prior)", "decoder": "Stage B (decoder)"}


def _recorded_settings(stage_c_path, stage_b_path, defaults: dict) -> dict:
    """Prediction targets, shifts and consistency records in the stage files (by our trainer), over the
    bundle's/released."""
    recorded = [sampling_module.read_model_metadata(p) for p in (stage_c_path, stage_b_path)]
    if not any(recorded):
        return {}
    shifts = list(defaults.get("official_shifts", RELEASED_SHIFTS))
    predictions = list(defaults.get("predictions", ("eps", "eps")))
    for i, found in enumerate(recorded):
        shifts[i] = found.get("shift", shifts[i])
        predictions[i] = found.get("prediction", predictions[i])
    consistency = tuple(found.get("consistency") for found in recorded)
    for path, found, stage in zip((stage_c_path, stage_b_path), consistency, ("prior", "decoder")):
        if found is not None and found.stage != stage:
            raise CheckpointError(f"{path} is a consistency-distilled {STAGE_NAMES[found.stage]}, but was given as "
                                  f"the {STAGE_NAMES[stage]}; give it as the {found.stage}")
    return dict(official_shifts=tuple(shifts), predictions=tuple(predictions), shifts_required=True,
                consistency=consistency)


def _bundle(source: Source) -> Optional[Path]:
    """A model bundle: a folder with model.json, prior/ and decoder/ (what scripts/train_nano.py writes; "nano" is
    the built-in one), or None."""
    if isinstance(source, Mapping):
        return None
    path = NANO_DIR if str(source) == hub.NANO else Path(source).expanduser()
    return path if (path / "model.json").is_file() else None


def _part(value):
    """An optional part as the pipeline holds it: a loaded module, a path to load on first use, or None."""
    return value if value is None or isinstance(value, torch.nn.Module) else Path(value)
