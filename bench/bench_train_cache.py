"""Training speed on the nano recipe (configs/nano/stage_c.yaml, or with --stage b configs/nano/stage_b.yaml: batch
32 at 64 px, the built-in nano encoder, Stage A and text encoder) with and without the data features: synchronous
decoding in the training process, DataLoader workers, and the on-disk latent + text caches (first run: building
them; second run: reusing them). Besides whole updates per second it reports how many batches per second the input
side (loading, the encoders or the caches) delivers: the part these features change.

    python bench/bench_train_cache.py [--stage c|b] [--images 256] [--steps 12] [--warmup 2]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, parser, setup

sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

NANO = ROOT / "src" / "stablecascade" / "assets" / "nano"


def input_rate(trainer, batches: int) -> float:
    """Global batches per second that the input side delivers: the next batch from the loader, and its latents and
    text embeddings (from the encoders, or from the cache)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(batches):
            item = trainer.loader.__next__()
            if item.latents is None:
                with trainer.autocast:
                    if trainer.cfg.trains == "stage_b":
                        trainer.stage_a.encode(item.images), trainer._stage_b_effnet(item.images, 1.0)
                    else:
                        trainer._encode_c(item.images)
            trainer._text(item.captions)
    return batches / (time.perf_counter() - t0)


def measure(cfg, text, steps: int, warmup: int) -> tuple[float, float, float]:
    """(seconds to build the trainer, input batches per second, updates per second after `warmup` updates)."""
    import copy

    from stablecascade.train.trainer import Trainer

    t0 = time.perf_counter()
    trainer = Trainer(cfg, parts={"text": (text[0], copy.deepcopy(text[1]))})
    built = time.perf_counter() - t0
    for _ in range(warmup):
        trainer.train_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    rate = steps / (time.perf_counter() - t0)
    inputs = input_rate(trainer, 4 * steps)
    trainer.loader.close()
    return built, inputs, rate


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--stage", choices=("c", "b"), default="c")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    setup(args)
    from make_shapes import generate
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    from stablecascade.train import load_config

    work = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    generate(work / "data", args.images)
    text = (AutoTokenizer.from_pretrained(str(NANO / "prior" / "tokenizer")),
            CLIPTextModelWithProjection.from_pretrained(str(NANO / "prior" / "text_encoder"),
                                                        dtype=torch.float32).eval())
    common = [f"data=[{work / 'data'}]", f"effnet=nano:{NANO / 'nano_encoder.safetensors'}", "save_every=100000",
              f"cache_dir={work / 'cache'}"] + ([f"stage_a={NANO / 'decoder' / 'vqgan'}"] if args.stage == "b" else [])
    runs = [("decoding in the training process (num_workers 0)", ["num_workers=0"]),
            ("DataLoader, 2 workers", ["num_workers=2"]),
            ("latent + text cache, first run (builds it)", ["num_workers=2", "cache_latents=true", "cache_text=true"]),
            ("latent + text cache, reused", ["num_workers=2", "cache_latents=true", "cache_text=true"])]
    print(machine(args))
    print(f"| nano Stage {args.stage.upper()}, batch 32, 64 px, {args.images} images | trainer start | input batches/s "
          f"| steps/s |")
    print("|---|---|---|---|")
    for i, (name, extra) in enumerate(runs):
        cfg = load_config(ROOT / "configs" / "nano" / f"stage_{args.stage}.yaml",
                          common + extra + [f"output_dir={work / f'run{i}'}"], task=args.stage)
        built, inputs, rate = measure(cfg, text, args.steps, args.warmup)
        print(f"| {name} | {built:.1f} s | {inputs:.1f} | {rate:.3f} |", flush=True)


if __name__ == "__main__":
    main()
