"""End-to-end text-to-image at 1024x1024 (20 Stage C + 10 Stage B steps), ours vs diffusers' combined pipeline:
wall time and peak memory while generating, each implementation in a fresh process with the same weights.

    python bench/bench_e2e.py                                        # CPU, fp32, real widths, fewer blocks
    python bench/bench_e2e.py --device cuda --dtype bf16 --c-blocks 8,24 --b-blocks 2,6,28,6 --compile

Real widths throughout (Stage C 2048/32 heads, the 1.5B Stage B, the released Stage A); Stage C and Stage B run
fewer blocks (--c-blocks/--b-blocks) where CPU time forbids the full depth, and the text encoder is a one-layer
CLIP of bigG's width (its cost is negligible either way). Both use diffusers' sampler (sampling="diffusers"),
prior guidance 4, decoder guidance 0. Peak memory: growth of the resident set (CPU) or the peak allocated CUDA
memory (GPU) over what the loaded models hold, while generating.
"""

import json
import subprocess
import sys
import time

import torch

from common import (DTYPES, ROOT, diffusers_twin, gib, machine, maybe_compile, parser, peak_rss_bytes, random_model,
                    reset_peak_rss, rss_bytes, setup, stage_b_config, stage_c_config)

PROMPT = "a photograph of a red fox in the snow, golden hour"


def build(args, impl):
    import oracle
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection

    from stablecascade import StableCascadePipeline, configs
    from stablecascade.conditioning import TextEncoder

    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    text_model = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=1, num_attention_heads=20,
        max_position_embeddings=77, projection_dim=1280, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=0)).eval().to(args.device, dtype)
    stage_c = random_model("stage_c", stage_c_config(args.c_blocks), dtype, args.device)
    stage_b = random_model("stage_b", stage_b_config(args.b_blocks), dtype, args.device)
    stage_a = random_model("stage_a", configs.STAGE_A["f4"], torch.float32, args.device)
    if impl == "ours":
        pipe = StableCascadePipeline(maybe_compile(stage_c, args), maybe_compile(stage_b, args), stage_a,
                                     TextEncoder(oracle.build_tokenizer(), text_model), device=args.device,
                                     dtype=dtype, offload=args.offload)
        return lambda: pipe(PROMPT, width=1024, height=1024, prior_steps=args.steps[0], decoder_steps=args.steps[1],
                            sampling="diffusers", seed=0, output_type="pt", progress=False)
    parts = oracle.TinyCascade(tokenizer=oracle.build_tokenizer(), text_encoder=text_model,
                               image_encoder=oracle.tiny_image_encoder(), feature_extractor=CLIPImageProcessor(),
                               prior=maybe_compile(diffusers_twin(stage_c, "stage_c"), args),
                               decoder=maybe_compile(diffusers_twin(stage_b, "stage_b"), args),
                               vqgan=diffusers_twin(stage_a, "stage_a"))
    pipe = oracle.combined_pipeline(parts)
    if args.offload == "model":
        pipe.enable_model_cpu_offload()
    elif args.offload == "sequential":
        pipe.enable_sequential_cpu_offload()
    return lambda: pipe(PROMPT, width=1024, height=1024, prior_num_inference_steps=args.steps[0],
                        num_inference_steps=args.steps[1], prior_guidance_scale=4.0, decoder_guidance_scale=0.0,
                        generator=torch.Generator().manual_seed(0), output_type="pt").images


def child(args):
    with torch.inference_mode():
        generate = build(args, args.impl)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        base_rss = rss_bytes()
        reset_peak_rss()
        start = time.perf_counter()
        images = generate()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - base) if args.device.startswith("cuda") \
            else peak_rss_bytes() - base_rss
    print(json.dumps(dict(seconds=seconds, peak=peak, finite=bool(torch.isfinite(images).all()),
                          shape=list(images.shape))))


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--c-blocks", default="1,1", help="Stage C blocks per level, down path (full model: 8,24)")
    p.add_argument("--b-blocks", default="1,1,1,1", help="Stage B blocks per level, down path (full: 2,6,28,6)")
    p.add_argument("--steps", default="20,10", help="Stage C and Stage B steps (default 20,10)")
    p.add_argument("--offload", choices=["model", "sequential"], help="offload mode of both pipelines (GPU)")
    p.add_argument("--impl", choices=["ours", "diffusers"], help=argparse_hide())
    args = p.parse_args()
    args.steps = tuple(int(v) for v in args.steps.split(","))
    setup(args)
    if args.impl:
        return child(args)
    print(f"# {machine(args)}")
    results = {}
    for impl in ("diffusers", "ours"):
        cmd = [sys.executable, str(ROOT / "bench" / "bench_e2e.py"), *sys.argv[1:], "--impl", impl]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[impl] = json.loads(out.strip().splitlines()[-1])
    d, o = results["diffusers"], results["ours"]
    mem = "peak CUDA memory over the weights" if args.device.startswith("cuda") else "peak RSS growth while generating"
    print(f"| 1024x1024, {args.steps[0]}+{args.steps[1]} steps, C blocks {args.c_blocks}, B blocks {args.b_blocks} "
          f"| diffusers {d['seconds']:.1f} s | ours {o['seconds']:.1f} s | speed-up {d['seconds'] / o['seconds']:.2f}x "
          f"| {mem}: diffusers {gib(d['peak'])}, ours {gib(o['peak'])} |")
    assert d["finite"] and o["finite"] and d["shape"] == o["shape"] == [1, 3, 1024, 1024]


def argparse_hide():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
