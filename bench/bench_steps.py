"""Per-step time of Stage C and Stage B, ours vs diffusers, same weights, same run (interleaved, median).

    python bench/bench_steps.py                                   # CPU, fp32, real widths with fewer blocks
    python bench/bench_steps.py --device cuda --dtype bf16 --c-blocks 8,24 --b-blocks 2,6,28,6 --compile

Stage C: c_hidden 2048, 32 heads (the 3.6B model's widths) on the 24x24 latent of a 1024x1024 image, batch 2
(classifier-free guidance). Stage B: the 1.5B model's widths and repeats on the 256x256 latent, batch 1 (decoder
guidance off, the default). Both implementations get the condition as their pipelines give it: diffusers maps it
in every call, ours once per run (`precompute`), so each step is what one sampling step costs.
"""

import torch

from common import (DTYPES, diffusers_twin, interleaved, machine, maybe_compile, parser, random_model, setup,
                    stage_b_config, stage_c_config)


def stage_c_step(args, dtype):
    ours = random_model("stage_c", stage_c_config(args.c_blocks), dtype, args.device)
    ref = diffusers_twin(ours, "stage_c")
    b, dev = 2, args.device
    x, r = torch.randn(b, 16, 24, 24, device=dev, dtype=dtype), torch.rand(b, device=dev, dtype=dtype)
    cond = dict(clip_text=torch.randn(b, 77, 1280, device=dev, dtype=dtype),
                clip_text_pooled=torch.randn(b, 1, 1280, device=dev, dtype=dtype),
                clip_img=torch.zeros(b, 1, 768, device=dev, dtype=dtype))
    inputs = ours.precompute(cond)
    ours_fn, ref_fn = maybe_compile(ours, args), maybe_compile(ref, args)
    return ({"diffusers": lambda: ref_fn(sample=x, timestep_ratio=r, **cond).sample,
             "ours": lambda: ours_fn(x, r, **inputs)},
            lambda: (ours(x, r, **inputs).float() - ref(sample=x, timestep_ratio=r, **cond).sample.float()))


def stage_b_step(args, dtype):
    ours = random_model("stage_b", stage_b_config(args.b_blocks), dtype, args.device)
    ref = diffusers_twin(ours, "stage_b")
    b, dev, size = 1, args.device, args.b_size
    x, r = torch.randn(b, 4, size, size, device=dev, dtype=dtype), torch.rand(b, device=dev, dtype=dtype)
    effnet = torch.randn(b, 16, 24, 24, device=dev, dtype=dtype)
    pooled = torch.randn(b, 1, 1280, device=dev, dtype=dtype)
    inputs = ours.precompute(dict(effnet=effnet, clip=pooled))
    ours_fn, ref_fn = maybe_compile(ours, args), maybe_compile(ref, args)
    return ({"diffusers": lambda: ref_fn(sample=x, timestep_ratio=r, clip_text_pooled=pooled, effnet=effnet).sample,
             "ours": lambda: ours_fn(x, r, **inputs)},
            lambda: (ours(x, r, **inputs).float()
                     - ref(sample=x, timestep_ratio=r, clip_text_pooled=pooled, effnet=effnet).sample.float()))


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--c-blocks", default="2,2", help="Stage C blocks per level, down path (full model: 8,24)")
    p.add_argument("--b-blocks", default="1,1,2,1", help="Stage B blocks per level, down path (full: 2,6,28,6)")
    p.add_argument("--b-size", type=int, default=256, help="Stage B latent side (256 for 1024x1024 images)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per implementation (default 3)")
    p.add_argument("--stages", default="c,b", help="which stages to time (default c,b)")
    args = p.parse_args()
    setup(args)
    dtype = DTYPES[args.dtype]
    print(f"# {machine(args)}")
    print("| stage | config | diffusers s/step | ours s/step | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|")
    builders = {"c": (stage_c_step, f"2048 wide, blocks {args.c_blocks}, 24x24, batch 2"),
                "b": (stage_b_step, f"1.5B widths, blocks {args.b_blocks}, {args.b_size}x{args.b_size}, batch 1")}
    for stage in args.stages.split(","):
        build, desc = builders[stage]
        with torch.inference_mode():
            fns, diff = build(args, dtype)
            t = interleaved(fns, args.repeats, args.device)
            d = diff().abs().max().item()
        print(f"| Stage {stage.upper()} | {desc} | {t['diffusers']:.3f} | {t['ours']:.3f} | "
              f"{t['diffusers'] / t['ours']:.2f}x | {d:.1e} |", flush=True)
        del fns, diff


if __name__ == "__main__":
    main()
