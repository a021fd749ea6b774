"""Training: Stage C and Stage B finetuning, LoRAs and ControlNets (the official `train/` scripts), and latent
consistency distillation of Stage C into a few-step LoRA (lcm), on one CPU or many GPUs.

    stablecascade train c|b|lora|controlnet|lcm --config FILE.yaml [--set key=value ...]

Under `torchrun --nproc-per-node N -m stablecascade.train ...` it trains with torch.distributed (DDP; `use_fsdp: true`
for FSDP).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from ..errors import StableCascadeError
from .config import TASKS, ConfigError, TrainConfig, load_config

__all__ = ["TrainConfig", "ConfigError", "load_config", "train", "cli_main", "add_arguments", "run"]


def train(cfg: TrainConfig, parts: Optional[dict] = None):
    """Run a whole training from a config; returns the Trainer (its `history` holds the per-step records)."""
    from .trainer import Trainer

    trainer = Trainer(cfg, parts=parts)
    try:
        trainer.fit()
    finally:
        trainer.dist.close()
    return trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=TASKS, help="c: Stage C finetune; b: Stage B finetune; lora: Stage C LoRA "
                        "(+ new tokens); controlnet: Stage C ControlNet; lcm: a few-step Stage C (latent consistency "
                        "distillation, a LoRA by default)")
    parser.add_argument("--config", "-c", help="training recipe (YAML); see configs/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (value read as YAML); repeatable")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors")


def run(args: argparse.Namespace) -> int:
    """Train from parsed arguments; returns the exit status (2 for configuration errors, with one clear message)."""
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", force=True)
    try:
        cfg = load_config(args.config, args.overrides, task=args.task)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        trainer = train(cfg)
    except (ValueError, FileNotFoundError, StableCascadeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if trainer.dist.main:
        print(f"trained {cfg.task} for {trainer.step} steps; outputs in {cfg.output_dir}/final")
    return 0


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m stablecascade.train ...` (what torchrun runs), the same as `stablecascade train ...`."""
    parser = argparse.ArgumentParser(prog="stablecascade train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # python -m stablecascade.train ...
    sys.exit(cli_main())
