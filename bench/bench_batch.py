"""Throughput of `stablecascade batch` on the built-in nano model: images/s at --batch-size 1 vs 8.

    python bench/bench_batch.py                      # CPU, fp32, 32 rows, 2 + 2 steps, 2 interleaved rounds
    python bench/bench_batch.py --device cuda --dtype bf16 --rows 256 --steps 20 --decoder-steps 10

Each run is the real command (its models loaded once, not counted); the figure is the rate it prints: images
written (PNG encoding and atomic writes included) per second of generation.
"""

import contextlib
import io
import re
import statistics
import tempfile
from pathlib import Path

from common import machine, parser, setup

from stablecascade import cli

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
PLACES = ("at the top left", "at the bottom right", "in the centre", "at the top right")


def images_per_second(prompts: Path, batch_size: int, args) -> float:
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(log):
        status = cli.main(["batch", str(prompts), "--out", out, "--batch-size", str(batch_size), "--steps",
                           str(args.steps), "--decoder-steps", str(args.decoder_steps), "--device", args.device,
                           "--dtype", args.dtype])
    if status != 0:
        raise SystemExit(log.getvalue())
    return float(re.search(r"\(([\d.]+) images/s\)", log.getvalue()).group(1))


def main():
    p = parser(__doc__)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="Stage C steps (default 2)")
    p.add_argument("--decoder-steps", type=int, default=2, help="Stage B steps (default 2)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    args = p.parse_args()
    setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("".join(f"a {COLOURS[i % 4]} {SHAPES[i % 3]} {PLACES[i // 4 % 4]} on a white background\n"
                                   for i in range(args.rows)))
        rates = {size: [] for size in args.sizes}
        for _ in range(args.rounds):
            for size in args.sizes:
                rates[size].append(images_per_second(prompts, size, args))
    print(machine(args))
    print(f"| batch size | images/s (median of {args.rounds}) | all rounds | vs batch size {args.sizes[0]} |")
    print("|---|---|---|---|")
    base = statistics.median(rates[args.sizes[0]])
    for size, values in rates.items():
        m = statistics.median(values)
        print(f"| {size} | {m:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {m / base:.2f}x |")


if __name__ == "__main__":
    main()
