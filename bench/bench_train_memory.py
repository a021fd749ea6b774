"""Peak memory of one LoRA training step on Stage C: random weights built directly in the frozen dtype (no fp32
copy ever exists), the EfficientNet encoder, a text encoder of CLIP bigG's size (32 layers, 1280 wide), rank-4 LoRA
on every attention layer, batch 1. Peak RSS from /proc (VmHWM), reset after the models are built, so the step's
own peak is measured as well as the total; with --device cuda also the GPU's peak allocated memory.

    python bench/bench_train_memory.py [--variant 3b] [--size 1024] [--frozen-dtype bf16|int8] [--dtype fp32|bf16]
                                       [--no-checkpointing] [--c-blocks 1,1]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import DTYPES, machine, parser, random_model, setup, stage_c_config, sync

import torch  # noqa: E402


def rss_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def text_encoder(width: int, dtype: torch.dtype):
    """CLIP bigG's text encoder (32 layers) when `width` is 1280, else a 2-layer one of that width."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from stablecascade.train.text import CLIP_VOCAB, clip_tokenizer

    big = width == 1280
    cfg = CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=32 if big else 2, num_attention_heads=20 if big else 4,
                         max_position_embeddings=77, projection_dim=width, hidden_act="gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    torch.manual_seed(0)
    return clip_tokenizer(), CLIPTextModelWithProjection._from_config(cfg, dtype=dtype).eval()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--variant", default="3b", help="Stage C config: 3b (3.6B, default), 1b, tiny")
    p.add_argument("--c-blocks", help="the 3b widths with these blocks per level, e.g. 1,1 (a quick probe; full: 8,24)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--frozen-dtype", choices=["fp32", "bf16", "fp16", "int8"], default="bf16",
                   help="storage of the frozen models' weights (--dtype is what the step computes in)")
    p.add_argument("--no-checkpointing", action="store_true")
    args = p.parse_args()
    setup(args)
    from PIL import Image

    from stablecascade.models import EfficientNetEncoder
    from stablecascade.train.config import from_dict
    from stablecascade.train.storage import mmap_large_allocations
    from stablecascade.train.trainer import Trainer

    work = Path(tempfile.mkdtemp(prefix="bench_mem_"))
    (work / "data").mkdir()
    Image.new("RGB", (args.size, args.size), (120, 80, 40)).save(work / "data" / "0.png")
    (work / "data" / "0.txt").write_text("a photo of a brown square")
    frozen = DTYPES.get(args.frozen_dtype, torch.bfloat16)  # int8 weights are quantized from bf16 ones
    mmap_large_allocations()  # what the trainer sets, set before building as a run reading files does
    base_rss = rss_gib("VmRSS")
    t0 = time.perf_counter()
    from stablecascade import configs

    config = stage_c_config(args.c_blocks) if args.c_blocks else configs.STAGE_C[args.variant]
    stage_c = random_model("stage_c", config, frozen, "cpu")
    parts = {"stage_c": stage_c, "effnet": EfficientNetEncoder().eval(),
             "text": text_encoder(stage_c.config.c_clip_text, frozen)}
    del stage_c
    cfg = from_dict(dict(task="lora", output_dir=str(work / "run"), data=[str(work / "data")], image_size=args.size,
                         batch_size=1, steps=1, frozen_dtype=args.frozen_dtype, dtype=args.dtype,
                         gradient_checkpointing=not args.no_checkpointing, num_workers=0, caption_dropout=0.0,
                         resume="never", device=args.device)).validate()
    trainer = Trainer(cfg, parts=parts)
    parts.clear()
    built = time.perf_counter() - t0
    weights = sum(t.numel() * t.element_size() for m in (trainer.stage_c, trainer.text_model, trainer.effnet)
                  for t in m.parameters()) / 2**30
    trained = sum(p.numel() for p in trainer.trained.parameters() if p.requires_grad)
    loaded_rss, build_peak = rss_gib("VmRSS"), rss_gib("VmHWM")
    reset_peak()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        loaded_gpu = torch.cuda.memory_allocated() / 2**30
    t0 = time.perf_counter()
    record = trainer.train_step()
    sync(args.device)
    step_s = time.perf_counter() - t0
    peak = rss_gib("VmHWM")
    print(machine(args))
    print(f"Stage C {args.c_blocks or args.variant}, {args.size}x{args.size}, batch 1, frozen {args.frozen_dtype}, "
          f"compute {args.dtype}, checkpointing "
          f"{not args.no_checkpointing}: frozen weights {weights:.2f} GiB, {trained / 1e6:.2f}M trained parameters")
    print(f"RSS before building {base_rss:.2f} GiB, with the models {loaded_rss:.2f} GiB (built in {built:.0f} s, "
          f"peak {build_peak:.2f} GiB while building)")
    print(f"peak RSS of the step {peak:.2f} GiB (+{peak - loaded_rss:.2f} GiB over the loaded models), "
          f"step {step_s:.0f} s, loss {record['loss']:.4f}, grad norm {record['grad_norm']:.3g}")
    if cuda:
        print(f"GPU memory: {loaded_gpu:.2f} GiB with the models, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} "
              "GiB allocated in the step")


if __name__ == "__main__":
    main()
