"""GPU acceptance check: the released model sizes, run the ways users run them, in one process (about 5-8 minutes
on one recent GPU). Random weights of the real shapes: full-size Stage C 3.6B, Stage B 1.5B and Stage A, and a
text encoder of CLIP bigG's size.

    python bench/gpu_check.py                          # CUDA: every check at 1024x1024, 20 + 10 steps
    python bench/gpu_check.py --device cpu --tiny      # the same checks on tiny configs (the test suite runs this)

Checks, in order: bf16 text-to-image (time per stage, peak device memory), the same seed again (bitwise), a batch
of 4 (image 0 against the single run), torch.compile, fp16 (Stage C rescaled for float16), model offload,
sequential offload, one LoRA training step on Stage C (bf16 frozen base, gradient checkpointing), and one step of
latent consistency distillation as configs/lcm_c_3b.yaml runs it (a rank-64 LoRA on every layer). Each line
says whether the images are finite; a failing check is reported and the others still run. Exit status 1 when any
check failed. `--json FILE` writes the results for bench/RESULTS.md.
"""

from __future__ import annotations

import json
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from bench_train_memory import text_encoder
from common import gib, machine, parser, random_model, setup

PROMPT = "a photograph of a red fox in the snow, golden hour"


class Clock:
    """Wall time per stage from the pipeline's step events (the device is synchronised once per stage end)."""

    def __init__(self, device: str):
        self.device, self.marks = device, {}

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def start(self) -> None:
        self.sync()
        self.marks = {"start": time.perf_counter()}

    def __call__(self, event) -> None:
        if event.step == event.total:
            self.sync()
            self.marks[event.stage] = time.perf_counter()

    def stages(self) -> dict:
        self.sync()
        end = time.perf_counter()
        m = self.marks
        return {"stage_c_s": m["prior"] - m["start"], "stage_b_s": m["decoder"] - m["prior"],
                "stage_a_s": end - m["decoder"], "total_s": end - m["start"]}


def peak_memory(device: str) -> float:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else float("nan")


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def build(args, dtype, device):
    from stablecascade import configs
    from stablecascade.conditioning import TextEncoder

    size = "tiny" if args.tiny else "3b"
    stage_c = random_model("stage_c", configs.STAGE_C[size], dtype, device)
    stage_b = random_model("stage_b", configs.STAGE_B[size], dtype, device)
    stage_a = random_model("stage_a", configs.STAGE_A["tiny" if args.tiny else "f4"], torch.float32, device)
    tokenizer, text_model = text_encoder(stage_c.config.c_clip_text, dtype)
    return stage_c, stage_b, stage_a, TextEncoder(tokenizer, text_model.to(device))


def main() -> int:
    p = parser(__doc__)
    p.set_defaults(device="cuda", dtype="bf16")
    p.add_argument("--tiny", action="store_true", help="tiny configs (a quick run of every check on a CPU)")
    p.add_argument("--size", type=int, help="image side (default 1024; 256 with --tiny)")
    p.add_argument("--steps", type=int, nargs=2, metavar=("PRIOR", "DECODER"), help="default 20 10; 2 2 with --tiny")
    p.add_argument("--skip", nargs="*", default=[], help="checks to leave out (names as printed)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    setup(args)
    from stablecascade import StableCascadePipeline

    device, size = args.device, args.size or (256 if args.tiny else 1024)
    steps = args.steps or ((2, 2) if args.tiny else (20, 10))
    print(machine(args))
    results, clock = [], Clock(device)

    def generate(pipe, seed=0, n=1):
        clock.start()
        images = pipe(PROMPT, width=size, height=size, prior_steps=steps[0], decoder_steps=steps[1], seed=seed,
                      num_images_per_prompt=n, output_type="pt", progress=False, step_callback=clock)
        return images, clock.stages()

    def check(name, fn):
        if name in args.skip:
            return None
        reset_peak(device)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                record = {"check": name, **fn()}
            record["warnings"] = sorted({str(w.message)[:120] for w in caught if issubclass(w.category, RuntimeWarning)})
            record["ok"] = record.get("ok", True) and record.get("finite", True)
        except Exception as e:  # noqa: BLE001 - the report names it; the other checks still run
            record = {"check": name, "ok": False, "error": f"{type(e).__name__}: {e}",
                      "where": traceback.format_exc(limit=-3)}
        record["peak_device_memory"] = peak_memory(device)
        results.append(record)
        shown = {k: (f"{v:.2f}" if isinstance(v, float) and not k.startswith("peak") else v)
                 for k, v in record.items() if k not in ("check", "peak_device_memory", "where")}
        memory = "" if device == "cpu" else f" | peak {gib(record['peak_device_memory'])}"
        print(f"{'PASS' if record['ok'] else 'FAIL'} {name}{memory} | {shown}", flush=True)
        return record

    with torch.inference_mode():
        parts = build(args, torch.bfloat16, device)
        pipe = StableCascadePipeline(*parts, device=device, dtype=torch.bfloat16)
        first = {}

        def bf16():
            first["images"], times = generate(pipe)
            return {**times, "finite": bool(torch.isfinite(first["images"]).all())}

        def same_seed():
            again, times = generate(pipe)
            return {**times, "ok": "images" in first and torch.equal(again, first["images"])}

        def batch_of_4():
            images, times = generate(pipe, n=4)
            diff = float((images[:1] - first["images"]).abs().max()) if "images" in first else float("nan")
            return {**times, "finite": bool(torch.isfinite(images).all()), "image0_max_diff": diff,
                    "ok": diff < 0.05}  # batched bf16 kernels round differently; a different seed differs by ~1

        def compiled():
            stage_c, stage_b, stage_a, text = parts
            compiled_pipe = StableCascadePipeline(torch.compile(stage_c), torch.compile(stage_b), stage_a, text,
                                                  device=device, dtype=torch.bfloat16)
            start = time.perf_counter()
            generate(compiled_pipe)
            warm = time.perf_counter() - start
            images, times = generate(compiled_pipe)
            return {**times, "first_call_s": warm, "finite": bool(torch.isfinite(images).all())}

        check("bf16", bf16)
        check("same_seed", same_seed)
        check("batch_of_4", batch_of_4)
        if not args.tiny or device != "cpu":  # compiling needs a C++ toolchain on a CPU; CI has no use for it
            check("compile", compiled)

        def offload(mode):
            def run():
                offloaded = StableCascadePipeline(*parts, device=device, dtype=torch.bfloat16, offload=mode)
                images, times = generate(offloaded)
                return {**times, "finite": bool(torch.isfinite(images).all())}
            return run

        check("offload_model", offload("model"))
        check("offload_sequential", offload("sequential"))
        del pipe, parts, first
        reset_peak(device)

        def fp16():
            stage_c, stage_b, stage_a, text = build(args, torch.float16, device)
            stage_c.rescale_for_fp16()
            images, times = generate(StableCascadePipeline(stage_c, stage_b, stage_a, text, device=device,
                                                           dtype=torch.float16))
            return {**times, "finite": bool(torch.isfinite(images).all())}

        check("fp16", fp16)

    def train_step(task, **recipe):
        from PIL import Image

        from stablecascade import configs
        from stablecascade.models import EfficientNetEncoder
        from stablecascade.train.config import from_dict
        from stablecascade.train.trainer import Trainer

        work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        (work / "data").mkdir()
        Image.new("RGB", (size, size), (120, 80, 40)).save(work / "data" / "0.png")
        (work / "data" / "0.txt").write_text("a photo of a brown square")
        stage_c = random_model("stage_c", configs.STAGE_C["tiny" if args.tiny else "3b"], torch.bfloat16, device)
        parts = {"stage_c": stage_c, "effnet": EfficientNetEncoder().eval(),
                 "text": text_encoder(stage_c.config.c_clip_text, torch.bfloat16)}
        cfg = from_dict(dict(task=task, output_dir=str(work / "run"), data=[str(work / "data")], image_size=size,
                             batch_size=1, steps=1, frozen_dtype="bf16", dtype="bf16", gradient_checkpointing=True,
                             num_workers=0, caption_dropout=0.0, resume="never", device=device, **recipe)).validate()
        trainer = Trainer(cfg, parts=parts)
        reset_peak(device)
        start = time.perf_counter()
        record = trainer.train_step()
        clock.sync()
        return {"step_s": time.perf_counter() - start, "loss": record["loss"],
                "finite": bool(torch.isfinite(torch.tensor([record["loss"], record["grad_norm"]])).all())}

    check("lora_train_step", lambda: train_step("lora"))
    # the distillation recipe's student, grid and target network (configs/lcm_c_3b.yaml), one step of batch 1
    check("lcm_train_step", lambda: train_step("lcm", lcm_student="lora", lora_rank=64, lora_layers="all",
                                               lcm_guidance=4.0, lcm_skip=50, ema_beta=0.95, loss_weight="constant"))
    failed = [r["check"] for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(args), "size": size, "steps": steps, "results": results},
                                        indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
