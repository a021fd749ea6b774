"""Training configuration: one flat dataclass, loaded from YAML, overridable with `--set key=value`.

Unknown keys are rejected with the closest known names, so a typo never silently trains with a default
(the official `finetune_c_3b_v.yaml` shipped a key its own loader refused).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..controlnets import TRAINABLE

TASKS = ("c", "b", "lora", "controlnet", "lcm")


class ConfigError(ValueError):
    """A training configuration problem; the message says which key and what is allowed."""


@dataclass
class TrainConfig:
    # -- what to train
    task: str = "c"  # c | b | lora | controlnet | lcm
    output_dir: str = "runs/train"
    seed: int = 0

    # -- models: a checkpoint path (official file or diffusers folder), or "new:<config name>" for a fresh model
    # of a named config in `stablecascade.configs` (e.g. "new:tiny") or "new:nano"; "nano" is the built-in nano
    # model's part (stage_c, stage_b, stage_a, effnet, previewer, text_encoder)
    stage_c: Optional[str] = None
    stage_b: Optional[str] = None
    stage_a: Optional[str] = None
    effnet: Optional[str] = None  # official EfficientNet file, "nano" (the nano model's encoder) or "nano:<file>"
    previewer: Optional[str] = None
    text_encoder: Optional[str] = None  # transformers folder (with tokenizer/ next to it or inside), or "tiny"
    tokenizer: Optional[str] = None
    image_encoder: Optional[str] = None  # CLIP vision folder; without it image embeddings are always zero
    model_dropout: Optional[float] = None  # override the dropout of every nn.Dropout in the trained model

    # -- data
    data: list = field(default_factory=list)  # folders of images + .txt captions and/or webdataset .tar shards
    image_size: int = 768
    multi_aspect: list = field(default_factory=list)  # ratios like "16/9"; ["auto"] = from the data; empty = square
    bucket_min_size: Optional[int] = None  # "auto" buckets: shortest side allowed (default image_size / 2)
    bucket_max_size: Optional[int] = None  # "auto" buckets: longest side allowed (default image_size * 2)
    bucket_random_ratio: float = 0.05
    bucket_factor: int = 32
    caption_key: str = "txt"
    shuffle_tags: bool = False  # shuffle the comma-separated tags of each caption (a new order every time)
    keep_tokens: int = 0  # with shuffle_tags: the first N tags stay in place (kohya's keep_tokens)
    tag_separator: str = ","
    num_workers: int = 2  # DataLoader worker processes decoding images (0 = in the training process)
    prefetch_batches: int = 2  # batches each worker prepares ahead
    cache_latents: bool = False  # latents computed once and kept on disk (centre crops, no jitter); Stage C tasks and b
    cache_text: bool = False  # tasks c, lcm of Stage C and b: text embeddings kept on disk, keyed by caption
    cache_dir: Optional[str] = None  # default: <output_dir>/cache; shareable between runs of the same encoders

    # -- optimisation
    steps: int = 1000  # optimizer updates
    batch_size: int = 8  # global batch per update (all ranks, all accumulation steps)
    grad_accum_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    warmup_steps: int = 1  # linear warmup; the first update already uses lr/warmup_steps (never 0)
    lr_schedule: str = "constant_with_warmup"  # constant_with_warmup | cosine (to 0 after the last update)
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes, CUDA only)
    max_grad_norm: float = 1.0
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    frozen_dtype: str = "fp32"  # fp32 | bf16 | fp16 | int8: storage of the frozen models' weights (train/storage.py);
    # with dtype bf16 (or fp16 storage) they run under autocast, else their bf16/int8 weights are expanded to fp32 one
    # layer at a time; trained parameters and optimizer state stay fp32
    gradient_checkpointing: bool = False  # recompute the U-Net blocks' activations in backward (every task)

    # -- diffusion objective
    target: Optional[str] = None  # eps | v; None: what the trained model records (file, nano model.json), else eps
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
    # image pixels per Stage C latent cell: the effnet sees each image resized to ceil(side / compression) * 32
    # (None: as it is, 32 px per cell, as the official Stage C trains at 768 px for 24x24 latents)
    compression: Optional[float] = None

    # -- EMA
    ema_beta: Optional[float] = None  # None = no EMA
    ema_start: int = 0  # updates before which the EMA is a hard copy
    ema_every: int = 1

    # -- LoRA
    lora_rank: int = 4
    lora_alpha: Optional[float] = None  # None = 1 (the official scale 1/rank)
    # the layers LoRAs train: a preset (Stage C: attention | attention_ff | all; text encoder: attention | all)
    # or a list of regular expressions searched in module paths; null = none
    lora_layers: Union[str, list, None] = "attention"
    lora_text_layers: Union[str, list, None] = None
    lora_format: str = "auto"  # auto (official when it holds every trained layer, else kohya) | official | kohya
    train_tokens: list = field(default_factory=list)  # [[token or regex, init regex or null], ...]
    token_lr: Optional[float] = None  # learning rate of the trained token rows; None = lr

    # -- ControlNet
    controlnet_kind: str = "canny"  # one of controlnets.TRAINABLE
    controlnet_blocks: Optional[list] = None  # ResBlock calls to control; None = spread over the model
    controlnet_bottleneck: Optional[str] = None  # effnet | simple | large; None = the kind's released mode
    controlnet: Optional[str] = None  # checkpoint to continue from
    # ImageNet weights for a new effnet-bottleneck ControlNet's backbone: torchvision's efficientnet_v2_s file (.pth,
    # read without unpickling code) or a safetensors copy; default: that file if torchvision's cache holds it
    controlnet_backbone_weights: Optional[str] = None

    # -- latent consistency distillation (task lcm): the frozen stage teaches a student (a LoRA on Stage C, saved as
    # lora.safetensors, or a full copy) the consistency function; the target network is the EMA (ema_beta)
    lcm_stage: str = "c"  # c (Stage C, from stage_c) | b (Stage B, from stage_b: a full-weight student)
    lcm_student: str = "lora"  # lora (lora_* keys apply) | full
    lcm_guidance: float = 4.0  # the teacher's classifier-free guidance, fixed for the run (the student samples at 1)
    lcm_timesteps: int = 1000  # the fine grid of t in [0, 1] ...
    lcm_skip: int = 50  # ... of which the teacher's one DDIM step spans this many (start levels: multiples of it)
    lcm_loss: str = "huber"  # huber (pseudo-Huber, as LCM) | l2
    lcm_huber_c: float = 0.001
    lcm_steps: int = 4  # the sampling steps the exported file recommends (and the preview samples use)
    lcm_sample_guidance: float = 1.0  # the guidance it recommends (and previews use): 1 = none, one call per step

    # -- bookkeeping
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    log_with: str = "none"  # none | tensorboard (events under <output_dir>/tensorboard); log.jsonl is always written
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
        choice("frozen_dtype", ("fp32", "bf16", "fp16", "int8"))
        choice("optimizer", ("adamw", "adamw8bit"))
        choice("lr_schedule", ("constant_with_warmup", "cosine"))
        choice("log_with", ("none", "tensorboard"))
        if self.dtype == "bf16" and self.frozen_dtype == "fp16":
            raise ConfigError("frozen_dtype fp16 runs the models under fp16 autocast, which contradicts dtype bf16: "
                              "use frozen_dtype bf16, or dtype fp32")
        if self.multi_aspect == ["auto"]:
            lo = self.bucket_min_size or self.image_size // 2
            hi = self.bucket_max_size or self.image_size * 2
            if not 0 < lo <= self.image_size <= hi:
                raise ConfigError(f"automatic buckets need bucket_min_size ({lo}) <= image_size ({self.image_size}) "
                                  f"<= bucket_max_size ({hi})")
        elif "auto" in self.multi_aspect:
            raise ConfigError("multi_aspect: give either [auto] (buckets from the data) or a list of ratios, not both")
        for name in ("keep_tokens", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.prefetch_batches < 1:
            raise ConfigError(f"prefetch_batches must be at least 1, got {self.prefetch_batches}")
        if self.cache_latents and not (self.task in ("c", "lora", "lcm") and self.trains == "stage_c"
                                       or self.task == "b"):
            raise ConfigError(f"cache_latents works for Stage C tasks (c, lora, lcm of Stage C) and task b; task "
                              f"{self.task!r} of {self.trains} needs the pixels of every step")
        if self.cache_latents and self.image_encoder and self.image_embed_prob > 0:
            raise ConfigError("cache_latents keeps no pixels for the CLIP image encoder: set image_embed_prob: 0 "
                              "or cache_latents: false")
        if self.cache_text and not (self.task in ("c", "lcm") and self.trains == "stage_c" or self.task == "b"):
            raise ConfigError(f"cache_text works for tasks c and lcm of Stage C and task b (a frozen text encoder), "
                              f"not {self.task!r} of {self.trains}: set cache_text: false")
        if self.target is not None:
            choice("target", ("eps", "v"))
        choice("loss_weight", ("adaptive", "p2", "constant"))
        choice("controlnet_kind", TRAINABLE)
        choice("lcm_stage", ("c", "b"))
        choice("lcm_student", ("lora", "full"))
        choice("lcm_loss", ("huber", "l2"))
        if self.task == "lcm":
            self._check_lcm()
        choice("lora_format", ("auto", "official", "kohya"))
        from ..models.lora import LAYER_PRESETS, STAGE_C, TEXT_ENCODER

        for name, which in (("lora_layers", STAGE_C), ("lora_text_layers", TEXT_ENCODER)):
            value = getattr(self, name)
            if isinstance(value, str) and value not in LAYER_PRESETS[which]:
                raise ConfigError(f"{name}: {value!r} is not one of {', '.join(LAYER_PRESETS[which])} (or give a "
                                  "list of regular expressions matching module paths)")
            if isinstance(value, list) and not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must be a preset name or a list of regular expressions, got {value!r}")
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
        if self.compression is not None and not (isinstance(self.compression, (int, float))
                                                 and 8 <= self.compression <= 128):
            raise ConfigError(f"compression must be a number from 8 to 128 (or null), got {self.compression!r}")
        lo, hi = self.effnet_resize
        if not 0 < lo <= hi:
            raise ConfigError(f"effnet_resize must be [low, high] with 0 < low <= high, got {self.effnet_resize}")
        if self.cache_latents and self.task == "b" and lo != hi:
            raise ConfigError(f"cache_latents keeps one Stage C latent per image, so Stage B's conditioning cannot "
                              f"be resized at random (effnet_resize {list(self.effnet_resize)}): set effnet_resize: "
                              f"[{hi}, {hi}] or cache_latents: false")
        for entry in self.train_tokens:
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ConfigError(f"train_tokens entries are [token, init_regex] pairs, got {entry!r}")
        return self

    def _check_lcm(self) -> None:
        if self.ema_beta is None:
            raise ConfigError("task lcm needs ema_beta: its target network is the EMA of the student (LCM uses 0.95)")
        if self.lcm_skip < 1 or self.lcm_timesteps % self.lcm_skip:
            raise ConfigError(f"lcm_skip ({self.lcm_skip}) must be >= 1 and divide lcm_timesteps "
                              f"({self.lcm_timesteps})")
        if self.lcm_steps < 1 or min(self.lcm_guidance, self.lcm_sample_guidance) < 0 or self.lcm_huber_c <= 0:
            raise ConfigError("lcm_steps must be >= 1, lcm_guidance and lcm_sample_guidance >= 0, lcm_huber_c > 0")
        if self.lcm_student == "lora" and (self.lora_text_layers or self.train_tokens):
            raise ConfigError("an lcm LoRA changes Stage C only: set lora_text_layers: null and train_tokens: []")
        if self.lcm_stage == "b" and self.lcm_student != "full":
            raise ConfigError("a Stage B consistency student is a full copy of Stage B (LoRAs apply to Stage C): set "
                              "lcm_student: full")

    @property
    def trains(self) -> str:
        """The stage the task trains or distils: "stage_b" for task b and lcm of Stage B, else "stage_c"."""
        return "stage_b" if self.task == "b" or (self.task == "lcm" and self.lcm_stage == "b") else "stage_c"

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
    if value is None or default is None or (name in ("lora_layers", "lora_text_layers")
                                            and isinstance(value, (str, list))):
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
        if isinstance(value, (str, int, float)) and name in ("data", "sample_prompts", "multi_aspect"):
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
    for key in ("lr", "weight_decay", "adam_eps", "ema_beta", "lora_alpha", "offset_noise", "max_grad_norm",
                "token_lr"):
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
                    "device", "dist_timeout_minutes", "lcm_steps", "lcm_sample_guidance"}


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
