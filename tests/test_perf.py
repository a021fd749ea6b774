"""Speed and memory features keep the maths: precomputed condition keys/values, oneDNN linears, the float16 rescale
and overflow guard, model/sequential offload and tiled Stage A decoding (tiny models, CPU)."""

import warnings

import oracle
import pytest
import torch
import torch.nn.functional as F

import stablecascade
from stablecascade import InputError, checkpoints, offload
from stablecascade.configs import STAGE_A
from stablecascade.models import StageA
from stablecascade.models.blocks import AttnBlock, ResBlock, linear

SMALL = dict(prompt="a red circle", width=128, height=128, prior_steps=2, decoder_steps=2, seed=3, output_type="pt",
             progress=False)


def _ours(config: dict, kind: str, seed: int):
    unet = oracle.diffusers_unet(config, seed)
    cfg = checkpoints.config_from_diffusers(dict(unet.config), kind)
    return unet, checkpoints.build_model(kind, cfg, oracle.official_state_dict(unet), source="test")


def _prior_inputs(seed, batch=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, 5, 6, generator=g), torch.rand(batch, generator=g),
            dict(clip_text=torch.randn(batch, 77, oracle.TXT_HIDDEN, generator=g),
                 clip_text_pooled=torch.randn(batch, 1, oracle.TXT_PROJ, generator=g),
                 clip_img=torch.randn(batch, 1, oracle.IMG_PROJ, generator=g)))


# ------------------------------------------------------------------------------------ precomputed condition
@torch.no_grad()
def test_precomputed_condition_matches_diffusers_stage_c():
    unet, ours = _ours(oracle.PRIOR_CONFIGS["c_tiny_wide"], "stage_c", 1)
    x, r, cond = _prior_inputs(1)
    ref = unet(sample=x, timestep_ratio=r, **cond).sample
    inputs = ours.precompute(cond)
    assert set(inputs) == {"cond_kv"} and len(inputs["cond_kv"]) == sum(isinstance(m, AttnBlock) for m in ours.modules())
    assert (ours(x, r, **inputs) - ref).abs().max() <= 1e-5
    assert (ours(x, r, **cond) - ref).abs().max() <= 1e-5  # the plain forward still works


@torch.no_grad()
def test_precomputed_condition_matches_diffusers_stage_b():
    unet, ours = _ours(oracle.DECODER_CONFIGS["b_tiny_deep"], "stage_b", 2)
    g = torch.Generator().manual_seed(2)
    x, r = torch.randn(2, 4, 24, 20, generator=g), torch.rand(2, generator=g)
    effnet, pooled = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 1, oracle.TXT_PROJ, generator=g)
    ref = unet(sample=x, timestep_ratio=r, clip_text_pooled=pooled, effnet=effnet).sample
    inputs = ours.precompute(dict(effnet=effnet, clip=pooled))
    assert set(inputs) == {"effnet", "cond_kv"}
    assert (ours(x, r, **inputs) - ref).abs().max() <= 1e-5


def test_pipeline_maps_the_condition_once_per_run(tiny, pipe, monkeypatch):
    calls = []
    for model in (pipe.stage_c, pipe.stage_b):
        original = model.condition
        monkeypatch.setattr(model, "condition", lambda *a, _o=original, **k: calls.append(1) or _o(*a, **k))
    got = pipe(prompt="a cat", width=128, height=128, prior_steps=3, decoder_steps=2, decoder_guidance=2.0,
               sampling="diffusers", output_type="pt", progress=False, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2  # once per stage, not once per step (5 model calls)
    want = oracle.combined_pipeline(tiny.tc)(
        prompt="a cat", width=128, height=128, prior_num_inference_steps=3, num_inference_steps=2,
        prior_guidance_scale=4.0, decoder_guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
        output_type="pt").images
    assert (got - want).abs().max() <= 1e-4


def test_onednn_linear_equals_f_linear():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 48, generator=g).permute(0, 2, 1, 3)  # a strided view, as the blocks pass them
    w, b = torch.randn(96, 48, generator=g), torch.randn(96, generator=g)
    with torch.no_grad():
        assert (linear(x, w, b) - F.linear(x, w, b)).abs().max() <= 1e-5
        assert (linear(x, w, b, "gelu") - F.gelu(F.linear(x, w, b))).abs().max() <= 1e-5
    w.requires_grad_(True)
    linear(x, w, b, "gelu").sum().backward()  # training takes the autograd path
    assert w.grad is not None and w.grad.abs().sum() > 0


# -------------------------------------------------------------------------------------------------- float16
@torch.no_grad()
def test_fp16_rescale_preserves_the_function_and_shrinks_the_stream():
    _, model = _ours(oracle.PRIOR_CONFIGS["c_tiny_wide"], "stage_c", 4)  # two units in the last block group
    x, r, cond = _prior_inputs(4)
    sca, crp = torch.tensor([0.3, 0.6]), torch.tensor([0.9, 0.1])
    c0 = model.config.c_hidden[0]
    cnet = [torch.randn(2, c0, 3, 3) for _ in range(model.resblock_calls)]  # controls reach the rescaled blocks
    stream = []
    model.up_blocks[-1][-1].register_forward_hook(lambda m, a, out: stream.append(out.abs().max()))
    before = model(x, r, **cond, sca=sca, crp=crp, cnet=cnet)
    model.rescale_for_fp16(0.5)
    after = model(x, r, **cond, sca=sca, crp=crp, cnet=cnet)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    assert stream[1] / stream[0] == pytest.approx(0.25, rel=1e-3)  # 2 TimestepBlocks, 0.5 each
    with pytest.raises(ValueError, match="already rescaled"):
        model.rescale_for_fp16()


def _prior_latents(pipe):
    run = pipe._settings(**SMALL)
    return pipe._prior(run)[0]


def test_fp16_pipeline_close_to_fp32(tiny, pipe):
    half = stablecascade.load_pipeline(tiny.prior, tiny.decoder, device="cpu", dtype=torch.float16)
    assert half.stage_c.dtype == torch.float16 and half.stage_c.fp16_rescale == 0.5
    bf16 = stablecascade.load_pipeline(tiny.prior, tiny.decoder, device="cpu", dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning on healthy weights
        want, got, got_bf16 = _prior_latents(pipe), _prior_latents(half), _prior_latents(bf16)
        images = half(**SMALL)
    error, error_bf16 = ((x - want).abs().max() / want.abs().max() for x in (got, got_bf16))
    assert error <= 0.1 and error <= error_bf16
    assert images.shape == (1, 3, 128, 128) and torch.isfinite(images).all()


def test_fp16_overflow_warns_and_recovers(tiny):
    half = stablecascade.load_pipeline(tiny.prior, tiny.decoder, device="cpu", dtype=torch.float16)
    with torch.no_grad():
        half.stage_b.clf[1].weight.mul_(2e4)  # the prediction exceeds float16's 65504, not float32's range
    with pytest.warns(RuntimeWarning, match="Stage B overflowed in float16.*bf16"):
        images = half(**SMALL)
    assert torch.isfinite(images).all()
    assert half.stage_b.dtype == torch.float16  # float32 only for that run


# -------------------------------------------------------------------------------------------------- offload
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_gives_identical_images_and_returns_weights_home(tiny, pipe, mode, monkeypatch):
    moves = []
    original = offload.move
    monkeypatch.setattr(offload, "move", lambda m, device: moves.append((m, str(device))) or original(m, device))
    off = stablecascade.load_pipeline(tiny.prior, tiny.decoder, device="cpu", dtype=torch.float32, offload=mode)
    assert torch.equal(off(**SMALL), pipe(**SMALL))
    last = {}
    for m, device in moves:
        last[m] = device
    parts = [off.stage_c, off.stage_b, off.stage_a, off.text_encoder.model]
    if mode == "model":
        assert all(sum(m is p for m, _ in moves) >= 3 for p in parts)  # home at load, out and back per turn
    else:
        counts = {u: sum(m is u for m, _ in moves) for p in parts for u in p.modules() if u in last}
        assert all(n % 2 == 1 for n in counts.values())  # home at setup, then out-and-back pairs
        ran = [u for u, n in counts.items() if n >= 3]
        assert any(isinstance(u, ResBlock) for u in ran) and any(isinstance(u, AttnBlock) for u in ran)
    assert set(last.values()) == {"cpu"}  # everything ended at home


def test_bad_offload_is_refused(tiny, pipe):
    with pytest.raises(InputError, match="offload must be None, 'model' or 'sequential'"):
        stablecascade.load_pipeline(tiny.prior, tiny.decoder, device="cpu", offload="gpu")
    with pytest.raises(InputError, match="offload must be"):
        stablecascade.StableCascadePipeline(pipe.stage_c, pipe.stage_b, pipe.stage_a, pipe.text_encoder,
                                            offload=True)


# ---------------------------------------------------------------------------------------------- tiled decode
@torch.no_grad()
def test_tiled_decode_matches_untiled():
    stage_a = oracle.randomize_(StageA(STAGE_A["tiny"]), 3, std=0.1).eval()
    z = torch.randn(1, 4, 70, 90, generator=torch.Generator().manual_seed(5))
    full = stage_a.decode(z)
    for tile, overlap in ((32, 16), (40, 24)):  # several tiles per side, a short last tile
        assert (stage_a.decode_tiled(z, tile, overlap) - full).abs().max() <= 1e-5
    assert (stage_a.decode_tiled(z, 32, 0) - full).abs().max() > 1e-3  # without overlap the seams show


def test_pipeline_tiled_decode_option(pipe, monkeypatch):
    seen = []
    monkeypatch.setattr(pipe.stage_a, "decode_tiled", lambda z: seen.append(z.shape) or pipe.stage_a.decode(z))
    pipe(**SMALL, tiled_decode=True)
    pipe(**SMALL)  # 128x128 is below the automatic threshold
    assert seen == [(1, 4, 32, 32)]
    with pytest.raises(InputError, match="tiled_decode"):
        pipe(**SMALL, tiled_decode="yes")
