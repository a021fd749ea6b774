"""Peak RSS while loading a full-size checkpoint, measured in a fresh process.

    python bench/bench_load.py                       # Stage C lite (1B parameters), bf16: a ~2 GB file
    python bench/bench_load.py --variant 3b          # the 3.6B Stage C (~7 GB in bf16)

Writes a random official-format file to --dir (once; reused if present), then loads it with
`checkpoints.load_official` in a new interpreter and reports the peak resident set size against the file's weight
bytes: the total (interpreter and torch included) and the growth over the RSS just before loading.
"""

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

from common import DTYPES, ROOT, gib


CHILD = """
import json, sys
sys.path.insert(0, {src!r}); sys.path.insert(0, {bench!r})
import torch
from common import peak_rss_bytes, reset_peak_rss, rss_bytes
from stablecascade import checkpoints
before = rss_bytes()
reset_peak_rss()
model = checkpoints.load_official({path!r}, "stage_c", dtype=getattr(torch, {dtype!r}))
print(json.dumps(dict(before=before, peak=peak_rss_bytes(), after=rss_bytes(),
                      weights=sum(t.numel() * t.element_size() for t in model.state_dict().values()))))
"""


def write_checkpoint(path: Path, variant: str, dtype) -> None:
    """A random official-format file, written one tensor at a time (the safetensors layout: header length, JSON
    header, raw bytes), so a 7 GB file needs no 7 GB in memory."""
    import torch

    from stablecascade import configs
    from stablecascade.checkpoints import _FILE_DTYPES
    from stablecascade.models import StageC

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in StageC(configs.STAGE_C[variant]).state_dict().items()}
    size, file_dtype = dtype.itemsize, {v: k for k, v in _FILE_DTYPES.items()}[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = size * math.prod(shape)
        header[name] = {"dtype": file_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for shape in shapes.values():
            tensor = (torch.randn(shape, generator=g) * 0.02).to(dtype)
            f.write(tensor.view(torch.uint8).numpy().tobytes())


def main():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=["1b", "3b"], default="1b", help="Stage C size (default 1b, the lite one)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="file and load dtype (default bf16)")
    p.add_argument("--dir", default="/tmp", help="where the random checkpoint goes (default /tmp)")
    args = p.parse_args()
    path = Path(args.dir) / f"bench_stage_c_{args.variant}_{args.dtype}.safetensors"
    if not path.is_file():
        print(f"writing {path} ...", file=sys.stderr)
        write_checkpoint(path, args.variant, DTYPES[args.dtype])
    dtype = str(DTYPES[args.dtype]).replace("torch.", "")
    code = CHILD.format(src=str(ROOT / "src"), bench=str(ROOT / "bench"), path=str(path), dtype=dtype)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    m = json.loads(out.strip().splitlines()[-1])
    w = m["weights"]
    print(f"| Stage C {args.variant} ({args.dtype}) | weights {gib(w)} | RSS before load {gib(m['before'])} | "
          f"peak {gib(m['peak'])} ({m['peak'] / w:.2f}x weights) | growth {gib(m['peak'] - m['before'])} "
          f"({(m['peak'] - m['before']) / w:.2f}x weights) |")


if __name__ == "__main__":
    main()
