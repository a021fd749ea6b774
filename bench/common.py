"""Shared by the bench scripts: the machine, the two implementations built with the same random weights, timing.

diffusers' StableCascadeUNet gets exactly our weights through the checkpoint key mapping (the q/k/v and renamed
tensors are views of ours, so the pair costs one copy of the weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]  # this checkout, and tests/oracle.py's builders

import torch  # noqa: E402

from stablecascade import checkpoints, configs  # noqa: E402
from stablecascade.models import StageA, StageB, StageC  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and compute (default fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile both implementations' UNets")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return p


def setup(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def machine(args) -> str:
    if args.device.startswith("cuda"):
        where = torch.cuda.get_device_name()
    else:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
        where = f"{model}, {torch.get_num_threads()} threads"
    return (f"{datetime.date.today()} | {where} | torch {torch.__version__} | python {platform.python_version()} | "
            f"{args.dtype}{' + compile' if args.compile else ''}")


def blocks(text: str, n_levels: int) -> tuple:
    """'2,2' -> per-level block counts for the down path; the up path mirrors it."""
    down = tuple(int(v) for v in text.split(","))
    if len(down) != n_levels:
        raise SystemExit(f"give {n_levels} comma-separated block counts, got {text!r}")
    return down, down[::-1]


def stage_c_config(block_text: str):
    return dataclasses.replace(configs.STAGE_C["3b"], blocks=blocks(block_text, 2))


def stage_b_config(block_text: str):
    return dataclasses.replace(configs.STAGE_B["3b"], blocks=blocks(block_text, 4))


@torch.no_grad()
def random_model(kind: str, config, dtype, device, std: float = 0.02):
    """Our model with seeded N(0, std²) weights (normal init of a multi-GB model is the slow part otherwise)."""
    cls = {"stage_c": StageC, "stage_b": StageB, "stage_a": StageA}[kind]
    with torch.device("meta"):
        model = cls(config)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.zeros(v.shape, dtype=v.dtype) if not v.is_floating_point()
             else torch.ones(v.shape, dtype=dtype) if k.endswith("running_var")
             else (torch.randn(v.shape, generator=g) * std).to(dtype) for k, v in model.state_dict().items()}
    return checkpoints.build_model(kind, config, state, source="bench", device=device)


def diffusers_twin(ours, kind: str):
    """diffusers' model (StableCascadeUNet / PaellaVQModel) holding `ours`'s weights."""
    import oracle  # noqa: F401  (quiets diffusers' logging)
    from diffusers import StableCascadeUNet

    config = checkpoints.config_to_diffusers(ours.config)
    cls = oracle.PaellaVQModel if config.pop("_class_name") == "PaellaVQModel" else StableCascadeUNet
    with torch.device("meta"):
        twin = cls(**config)
    twin.load_state_dict(checkpoints.official_to_diffusers(ours.state_dict(), kind), strict=True, assign=True)
    return twin.eval().requires_grad_(False)


def maybe_compile(model, args):
    return torch.compile(model) if args.compile else model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int, device: str, warmup: int = 1) -> dict:
    """Median seconds per call of each function, run in turn (A B A B ...) so both see the same machine load."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM) since start or the last `reset_peak_rss`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
