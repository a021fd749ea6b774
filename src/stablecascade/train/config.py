"""Training configuration: one flat dataclass, loaded from YAML, overridable with `--set key=value`.

Unknown keys are rejected with the closest known names, so a typo never silently trains with a default
(the official `finetune_c_3b_v.yaml` shipped a key its own loader refused; `official-spec.md` §7 item 14).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

TASKS = ("c", "b", "lora", "controlnet")


class ConfigError(ValueError):
    """A training configuration problem; the message says which key and what is allowed."""


@dataclass
class TrainConfig:
    # -- what to train
    task: str = "c"  # c | b | lora | controlnet
    output_dir: str = "runs/train"
    seed: int = 0

    # -- models: a checkpoint path (official file or diffusers folder), or "new:<config name>" for a fresh model
    # of a named config in `stablecascade.configs` (e.g. "new:tiny") or "new:nano"
    stage_c: Optional[str] = None
    stage_b: Optional[str] = None
    stage_a: Optional[str] = None
    effnet: Optional[str] = None  # official EfficientNet file, or "nano" for the small trainable-free encoder
    previewer: Optional[str] = None
    text_encoder: Optional[str] = None  # transformers folder (with tokenizer/ next to it or inside), or "tiny"
    tokenizer: Optional[str] = None
    image_encoder: Optional[str] = None  # CLIP vision folder; without it image embeddings are always zero
    model_dropout: Optional[float] = None  # override the dropout of every nn.Dropout in the trained model

    # -- data
    data: list = field(default_factory=list)  # folders of images + .txt captions and/or webdataset .tar shards
    image_size: int = 768
    multi_aspect: list = field(default_factory=list)  # ratios like "16/9"; empty = single square size
    bucket_random_ratio: float = 0.05
    bucket_factor: int = 32
    caption_key: str = "txt"

    # -- optimisation
    steps: int = 1000  # optimizer updates
    batch_size: int = 8  # global batch per update (all ranks, all accumulation steps)
    grad_accum_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    warmup_steps: int = 1  # linear warmup; the first update already uses lr/warmup_steps (never 0)
    max_grad_norm: float = 1.0
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    gradient_checkpointing: bool = False

    # -- diffusion objective
    target: str = "eps"  # eps | v
    noise_shift: float = 1.0  # GDF shift of the training noise levels (SNR / shift²); sampling must use the same
    loss_weight: str = "adaptive"  # adaptive | p2 | constant
    adaptive_buckets: int = 300
    adaptive_beta: float = 0.99
    offset_noise: float = 0.0
    pyramid_noise: bool = True  # Stage B only
    caption_dropout: float = 0.05
    image_embed_prob: float = 0.1  # Stage C: share of samples that see their CLIP image embedding
    effnet_dropout: float = 0.1  # Stage B: share of samples whose effnet conditioning is zeroed
    effnet_resize: list = field(default_factory=lambda: [0.5, 1.0])  # Stage B: conditioning resize range

    # -- EMA
    ema_beta: Optional[float] = None  # None = no EMA
    ema_start: int = 0  # updates before which the EMA is a hard copy
    ema_every: int = 1

    # -- LoRA
    lora_rank: int = 4
    lora_alpha: Optional[float] = None  # None = 1 (the official scale 1/rank)
    lora_filters: list = field(default_factory=lambda: [".attn"])
    train_tokens: list = field(default_factory=list)  # [[token or regex, init regex or null], ...]

    # -- ControlNet
    controlnet_kind: str = "canny"  # canny | inpaint | sr
    controlnet_blocks: Optional[list] = None  # ResBlock calls to control; None = spread over the model
    controlnet_bottleneck: Optional[str] = None  # effnet | simple | large; None = the kind's released mode
    controlnet: Optional[str] = None  # checkpoint to continue from
    # ImageNet weights for a new effnet-bottleneck ControlNet's backbone: torchvision's efficientnet_v2_s file (.pth,
    # read without unpickling code) or a safetensors copy; default: that file if torchvision's cache holds it
    controlnet_backbone_weights: Optional[str] = None

    # -- bookkeeping
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 0  # 0 = only at the end
    sample_prompts: list = field(default_factory=lambda: ["a photo"])
    sample_steps: int = 20
    sample_cfg: float = 4.0
    sample_size: Optional[int] = None  # image size of the samples; default image_size
    resume: str = "auto"  # auto (latest checkpoint in output_dir if any) | never | <checkpoint folder>
    resume_allow_changes: list = field(default_factory=list)  # keys that may differ from the checkpoint's config

    # -- distributed
    use_fsdp: bool = False
    device: Optional[str] = None  # default: cuda:LOCAL_RANK if available, else cpu
    dist_timeout_minutes: float = 60.0  # how long ranks wait for each other (rank 0 saving a checkpoint, exporting)

    def validate(self) -> "TrainConfig":
        def choice(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}")

        choice("task", TASKS)
        choice("dtype", ("fp32", "bf16"))
        choice("target", ("eps", "v"))
        choice("loss_weight", ("adaptive", "p2", "constant"))
        choice("controlnet_kind", ("canny", "inpaint", "sr"))
        for name in ("steps", "batch_size", "grad_accum_steps", "image_size", "save_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.image_size % 32:
            raise ConfigError(f"image_size must be a multiple of 32 (Stage C's latents are 1/32 of the image), got "
                              f"{self.image_size}; e.g. {max(32, round(self.image_size / 32) * 32)}")
        if self.dist_timeout_minutes <= 0:
            raise ConfigError(f"dist_timeout_minutes must be positive, got {self.dist_timeout_minutes}")
        unknown = [k for k in self.resume_allow_changes if k not in FIELDS]
        if unknown:
            raise ConfigError(f"resume_allow_changes: unknown keys {unknown}")
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps must be >= 0")
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(f"batch_size {self.batch_size} is not divisible by grad_accum_steps "
                              f"{self.grad_accum_steps}")
        lo, hi = self.effnet_resize
        if not 0 < lo <= hi:
            raise ConfigError(f"effnet_resize must be [low, high] with 0 < low <= high, got {self.effnet_resize}")
        for entry in self.train_tokens:
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ConfigError(f"train_tokens entries are [token, init_regex] pairs, got {entry!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _unknown(keys, where: str):
    lines = []
    for key in keys:
        close = difflib.get_close_matches(key, FIELDS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        lines.append(f"unknown training config key {key!r} in {where}{hint}")
    lines.append(f"known keys: {', '.join(sorted(FIELDS))}")
    raise ConfigError("\n".join(lines))


def _coerce(name: str, value: Any) -> Any:
    """Check a value against the field's default type (ints may stand for floats; None for optional fields)."""
    f = FIELDS[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        value = str(value)
    elif isinstance(default, list):
        if isinstance(value, (str, int, float)) and name in ("data", "sample_prompts", "lora_filters"):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        value = list(value)
    return value


def from_dict(d: dict, where: str = "the config") -> TrainConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(d).__name__}")
    unknown = [k for k in d if k not in FIELDS]
    if unknown:
        _unknown(unknown, where)
    return TrainConfig(**{k: _coerce(k, v) for k, v in d.items()})


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' with the value read as YAML ('lr=3e-4', 'data=[a, b]', 'ema_beta=null')."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in FIELDS:
        _unknown([key], "--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot read {raw!r}: {e}") from None
    return key, value


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list] = None,
                task: Optional[str] = None) -> TrainConfig:
    """YAML file (optional) + `key=value` overrides + the task given on the command line, validated."""
    import yaml

    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values")
        unknown = [k for k in data if k not in FIELDS]
        if unknown:
            _unknown(unknown, str(path))
    for text in overrides or []:
        key, value = parse_override(text)
        data[key] = value
    if task is not None:
        if "task" in data and data["task"] != task:
            raise ConfigError(f"the config trains task {data['task']!r} but the command asks for {task!r}")
        data["task"] = task
    for key in ("lr", "weight_decay", "adam_eps", "ema_beta", "lora_alpha", "offset_noise", "max_grad_norm"):
        if isinstance(data.get(key), str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                data[key] = float(data[key])
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {data[key]!r}") from None
    return from_dict(data, str(path) if path else "the config").validate()


# Keys that say where outputs go, how often they are written and where the run is: they may change between a
# checkpoint and its resumption (e.g. more `steps`, another GPU count). Any other difference changes what is trained
# (`use_fsdp` changes how the optimizer state is stored).
RESUME_FREE_KEYS = {"output_dir", "steps", "save_every", "keep_checkpoints", "log_every", "sample_every",
                    "sample_prompts", "sample_steps", "sample_cfg", "sample_size", "resume", "resume_allow_changes",
                    "device", "dist_timeout_minutes"}


def resume_differences(saved: dict, current: TrainConfig) -> list[str]:
    """'key: checkpoint value -> current value' for each key that differs and is neither free to change nor
    listed in `current.resume_allow_changes`."""
    now = json.loads(json.dumps(current.to_dict()))  # the form config.json stores (tuples as lists)
    allowed = RESUME_FREE_KEYS | set(current.resume_allow_changes)
    out = []
    for key in sorted(set(now) & set(saved)):  # a key the checkpoint lacks is newer than it: nothing to compare
        if key not in allowed and saved[key] != now[key]:
            out.append(f"{key}: {saved[key]!r} -> {now[key]!r}")
    return out
