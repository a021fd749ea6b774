"""ControlNets: official key/shape parity, loading, injection into Stage C, and the control filters."""

import gzip
import ast
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from stablecascade import checkpoints, configs
from stablecascade.controlnet_filters import (
    CONTROL_CHANNELS, FaceIdentityFilter, MicroResNet, canny_control, face_identity_control, inpaint_control,
    load_saliency_model, outpaint_control, pad_for_outpaint, paint_identity_map, prepare_mask, saliency_mask,
    sr_control, sr_output_size, sr_upscale_control,
)
from stablecascade.errors import CheckpointError, InputError
from stablecascade.models import EfficientNetEncoder, StageC
from stablecascade.models.blocks import ResBlock
from stablecascade.checkpoints import infer_controlnet_config, load_controlnet
from stablecascade.models.controlnet import (
    CONTROLNET, RELEASED_BLOCKS, ControlNet, ControlNetConfig, controlnet_kind,
)

KEYS_DIR = Path(__file__).parent / "data" / "official-keys"  # key names and shapes of the released files (gzip)
TSV = {"canny": "cnet_canny.tsv", "inpaint": "cnet_inpaint.tsv", "sr": "cnet_sr.tsv", "identity": "cnet_identity.tsv"}
TINY_CALLS = 6  # ResBlock calls of the tiny Stage C: down (1, 2), up (2, 1)


def _read_tsv(name):
    lines = gzip.open(KEYS_DIR / f"{name}.gz", "rt").read().splitlines()
    params = next(int(line.split()[-1]) for line in lines if line.startswith("# params"))
    shapes = {}
    for line in lines:
        if line and not line.startswith("#"):
            key, shape = line.split("\t")[:2]
            shapes[key] = tuple(ast.literal_eval(shape))
    return shapes, params


def _randomize(module, seed, std=0.05):
    """Seeded N(0, std^2) parameters (every path matters); BatchNorm statistics stay as built."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def _meta(config):
    with torch.device("meta"):
        return ControlNet(config)


# ------------------------------------------------------------------------------------------ architecture
@pytest.mark.parametrize("kind", list(TSV))
def test_released_kinds_match_official_keys(kind):
    want, params = _read_tsv(TSV[kind])
    model = _meta(CONTROLNET[kind])
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(got) ^ set(want)) == []
    assert {k: s for k, s in got.items() if want[k] != s} == {}
    assert sum(p.numel() for p in model.parameters()) == params
    assert CONTROLNET[kind].c_in == CONTROL_CHANNELS[kind]


@pytest.mark.parametrize("kind", list(TSV))
def test_config_inferred_from_official_shapes(kind):
    state = _meta(CONTROLNET[kind]).state_dict()
    config = infer_controlnet_config(state)
    assert config == CONTROLNET[kind] and controlnet_kind(config) == kind


def test_stem_is_unpadded_for_non_rgb_inputs():
    with torch.device("meta"):
        gray, rgb = ControlNet(CONTROLNET["canny"]), ControlNet(ControlNetConfig(c_in=3))
    assert gray.backbone[0][0].padding == (0, 0) and gray.backbone[0][0].bias is None
    assert tuple(gray.backbone[0][0](torch.zeros(1, 1, 64, 64, device="meta")).shape[-2:]) == (31, 31)
    assert tuple(rgb.backbone[0][0](torch.zeros(1, 3, 64, 64, device="meta")).shape[-2:]) == (32, 32)


def test_forward_list_layout_and_zero_initialised_projections():
    torch.manual_seed(0)
    net = ControlNet(ControlNetConfig(c_in=1, c_proj=64, proj_blocks=(0, 4, 5))).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 1, 64, 96))
    assert len(out) == 6 and [i for i, c in enumerate(out) if c is not None] == [0, 4, 5]
    assert all(c.shape == (1, 64, 2, 3) for c in out if c is not None)  # stride 32 after the unpadded stem
    assert all(torch.count_nonzero(c) == 0 for c in out if c is not None)  # fresh net = no control
    with pytest.raises(InputError, match="1-channel"):
        net(torch.rand(1, 3, 64, 64))


def test_large_and_simple_bottlenecks_run():
    torch.manual_seed(0)
    simple = _randomize(ControlNet(ControlNetConfig(c_in=8, c_proj=64, proj_blocks=tuple(range(6)),
                                                           bottleneck_mode="simple")), 1).eval()
    with torch.no_grad():
        out = simple(torch.rand(1, 8, 3, 4))
    assert len(out) == 6 and all(c.shape == (1, 64, 3, 4) for c in out)
    with torch.device("meta"):
        large = ControlNet(CONTROLNET["sr"])
    assert [type(m).__name__ for m in large.backbone][3:11] == ["CNetResBlock"] * 8
    norm = large.backbone[3].blocks[0]
    assert norm.elementwise_affine and norm.eps == 1e-5


# ------------------------------------------------------------------------------------------------ loading
def test_load_official_file_infers_kind_and_casts(tmp_path):
    torch.manual_seed(1)
    net = _randomize(ControlNet(ControlNetConfig(c_in=1, c_proj=64)), 2).eval()
    path = tmp_path / "canny_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))  # official: no metadata
    loaded = load_controlnet(path, dtype=torch.bfloat16)
    assert loaded.config == ControlNetConfig(c_in=1, c_proj=64, proj_blocks=RELEASED_BLOCKS)
    assert loaded.dtype == torch.bfloat16 and not loaded.training
    assert loaded.backbone[0][1].num_batches_tracked.dtype == torch.int64
    ref = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


def test_load_our_file_with_custom_blocks(tmp_path):
    cfg = ControlNetConfig(c_in=8, c_proj=64, proj_blocks=(1, 3), bottleneck_mode="simple")
    net = _randomize(ControlNet(cfg), 3)
    plain, ours = tmp_path / "plain.safetensors", tmp_path / "ours.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(plain))
    checkpoints.save_official(net, ours)
    assert load_controlnet(ours).config == cfg  # our config rides along in the metadata
    with pytest.raises(CheckpointError, match="proj_blocks"):
        load_controlnet(plain)
    assert load_controlnet(plain, proj_blocks=(1, 3)).config == cfg


def test_load_rejects_other_components(tmp_path):
    other = tmp_path / "stage_c.safetensors"
    save_file({"clip_txt_mapper.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(CheckpointError, match="Stage C .* not a ControlNet"):
        load_controlnet(other)
    bad = tmp_path / "bad.safetensors"
    state = ControlNet(ControlNetConfig(c_in=8, c_proj=64, bottleneck_mode="simple")).state_dict()
    state["projections.0.0.weight"] = torch.zeros(3, 8, 1, 1)
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad))
    with pytest.raises(CheckpointError, match="projections.0.0.weight"):
        load_controlnet(bad)


# -------------------------------------------------------------------------------------- Stage C injection
@pytest.fixture(scope="module")
def stage_c():
    return _randomize(StageC(configs.STAGE_C["tiny"]), 7).eval()


def _c_inputs(seed=0, b=2, h=6, w=5):
    g = torch.Generator().manual_seed(seed)
    cfg = configs.STAGE_C["tiny"]
    return (torch.randn(b, 16, h, w, generator=g), torch.rand(b, generator=g),
            torch.randn(b, 77, cfg.c_clip_text, generator=g), torch.randn(b, 1, cfg.c_clip_text_pooled, generator=g),
            torch.randn(b, 1, cfg.c_clip_img, generator=g))


def _run_recording(model, inputs, cnet):
    """Stage C output and the input of every ResBlock call, in execution order."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
             for m in model.modules() if isinstance(m, ResBlock)]
    try:
        with torch.no_grad():
            out = model(*inputs, cnet=cnet)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def test_tiny_stage_c_has_expected_resblock_calls(stage_c):
    _, seen = _run_recording(stage_c, _c_inputs(), None)
    assert len(seen) == TINY_CALLS == stage_c.resblock_calls
    with torch.device("meta"):
        assert StageC(configs.STAGE_C["3b"]).resblock_calls == 64  # indices 0..63 of the released ControlNets
        assert StageC(configs.STAGE_C["1b"]).resblock_calls == 32


@pytest.mark.parametrize("k", range(TINY_CALLS))
def test_control_is_added_before_exactly_the_kth_resblock_call(stage_c, k):
    inputs = _c_inputs()
    base_out, base = _run_recording(stage_c, inputs, None)
    control = torch.randn(2, 64, 3, 4, generator=torch.Generator().manual_seed(k))  # resized to 6x5 inside
    cnet = [None] * TINY_CALLS
    cnet[k] = control
    out, seen = _run_recording(stage_c, inputs, cnet)
    for j in range(k):
        assert torch.equal(seen[j], base[j]), f"call {j} changed by a control meant for call {k}"
    expected = F.interpolate(control, size=(6, 5), mode="bilinear", align_corners=True)
    torch.testing.assert_close(seen[k] - base[k], expected, rtol=0, atol=1e-5)
    assert not torch.equal(out, base_out)


def test_zero_control_equals_no_control_bitwise(stage_c):
    inputs = _c_inputs(1)
    ref, _ = _run_recording(stage_c, inputs, None)
    zeros = [torch.zeros(2, 64, 2, 2)] * TINY_CALLS
    for cnet in (zeros, [None] * TINY_CALLS, [], zeros[:2]):
        out, _ = _run_recording(stage_c, inputs, cnet)
        assert torch.equal(out, ref)


def test_too_long_control_list_is_refused(stage_c):
    cnet = [None] * TINY_CALLS + [torch.ones(2, 64, 2, 2)]
    with pytest.raises(InputError, match="only 6 ResBlock calls"):
        stage_c(*_c_inputs(), cnet=cnet)


def test_controlnet_output_drives_stage_c(stage_c):
    torch.manual_seed(3)  # the 'simple' bottleneck keeps this fast; the effnet one is tested above
    net = ControlNet(ControlNetConfig(c_in=8, c_proj=64, proj_blocks=(0, 2, 3, 5), bottleneck_mode="simple")).eval()
    hint = torch.rand(2, 8, 2, 2)
    inputs = _c_inputs(2)
    ref, _ = _run_recording(stage_c, inputs, None)
    with torch.no_grad():
        fresh = net(hint)
        assert torch.equal(_run_recording(stage_c, inputs, fresh)[0], ref)  # zero-initialised projections
        for proj in net.projections:
            torch.nn.init.normal_(proj[-1].weight, std=0.05)
        out, _ = _run_recording(stage_c, inputs, net(hint))
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.equal(out, ref)


# ------------------------------------------------------------------------------------------------- canny
def _square(h=256, w=256, lo=64, hi=192):
    img = torch.zeros(1, 3, h, w)
    img[:, :, lo:hi, lo:hi] = 1
    return img


def test_canny_finds_the_square_outline():
    edges = canny_control(_square())
    assert edges.shape == (1, 1, 256, 256) and edges.min() >= 0 and edges.max() <= 1
    ys, xs = torch.nonzero(edges[0, 0] > 0.05, as_tuple=True)
    assert len(ys) > 0
    # distance of each edge pixel to the square's outline (pixels 64..191: Chebyshev radius 64 around 127.5)
    dist = torch.maximum((ys - 127.5).abs(), (xs - 127.5).abs()).sub(64).abs()
    assert dist.max() <= 4, "edge response far from the square's border"
    e = edges[0, 0]
    for side in (e[60:68, 80:176], e[188:196, 80:176], e[80:176, 60:68], e[80:176, 188:196]):
        assert (side.amax(dim=0 if side.shape[0] < side.shape[1] else 1) > 0.3).all()  # every side is traced
    assert e[100:156, 100:156].max() == 0 and e[:40].max() == 0  # flat areas have no edges


def test_canny_keeps_size_and_batch():
    img = torch.cat([_square(120, 200, 30, 90), torch.zeros(1, 3, 120, 200)])
    edges = canny_control(img)
    assert edges.shape == (2, 1, 120, 200) and edges[1].max() == 0 and edges[0].max() > 0.5


# ----------------------------------------------------------------------------------------- masks / inpaint
def test_user_mask_is_resized_and_binarised():
    from PIL import Image

    pil = Image.fromarray(np.concatenate([np.full((10, 10), 255, np.uint8), np.zeros((10, 10), np.uint8)], axis=1))
    m = prepare_mask(pil, 40, 80, batch=2)
    assert m.shape == (2, 1, 40, 80) and m.dtype == torch.float32
    assert m[:, :, :, :40].eq(1).all() and m[:, :, :, 40:].eq(0).all()
    soft = torch.tensor([[0.2, 0.6], [0.5, 0.9]])
    assert prepare_mask(soft, 2, 2).flatten().tolist() == [0, 1, 0, 1]
    assert prepare_mask(soft > 0.55, 4, 4).sum() == 8
    with pytest.raises(InputError, match="3 masks for 2 images"):
        prepare_mask(torch.ones(3, 4, 4), 4, 4, batch=2)


def test_inpaint_control_whitens_masked_pixels():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 24, generator=g) * 0.9
    mask = torch.zeros(8, 12)
    mask[2:6, 3:9] = 1  # resized x2 to the image
    ctrl = inpaint_control(images, mask)
    assert ctrl.shape == (2, 4, 16, 24)
    m = ctrl[:, 3:]
    assert m.sum() == 2 * 8 * 12 and m[:, :, 4:12, 6:18].eq(1).all()
    assert ctrl[:, :3][m.expand(-1, 3, -1, -1) > 0].eq(1).all()
    assert torch.equal(ctrl[:, :3][m.expand(-1, 3, -1, -1) == 0], images[m.expand(-1, 3, -1, -1) == 0])
    with pytest.raises(InputError, match="mask"):
        inpaint_control(images)


def test_outpaint_pads_and_masks_the_new_area():
    images = torch.rand(1, 3, 16, 24) * 0.9
    padded, mask = pad_for_outpaint(images, (3, 2, 5, 1))
    assert padded.shape == (1, 3, 19, 32) and mask.shape == (1, 1, 19, 32)
    assert torch.equal(padded[:, :, 2:18, 3:27], images)
    assert mask[:, :, 2:18, 3:27].eq(0).all() and mask.sum() == 19 * 32 - 16 * 24
    ctrl = outpaint_control(images, 8)
    assert ctrl.shape == (1, 4, 32, 40) and torch.equal(ctrl[:, :3, 8:24, 8:32], images)
    assert ctrl[:, :3][ctrl[:, 3:].expand(-1, 3, -1, -1) > 0].eq(1).all()
    with pytest.raises(InputError, match="pad"):
        pad_for_outpaint(images, -1)


SALIENCY_KEYS = [f"downsampler.{i}.{p}" for i in (1, 2, 5, 6, 9, 10) for p in ("weight", "bias")] + \
    [f"residual.{r}.resblock.{i}.{p}" for r in (0, 2) for i in (1, 2, 5, 6) for p in ("weight", "bias")] + \
    ["residual.1.weight"] + \
    [f"segmentator.{i}.{p}" for i in (1, 2, 6) for p in ("weight", "bias")]


def test_saliency_model_layout_and_mask(tmp_path):
    model = MicroResNet()
    assert sorted(model.state_dict()) == sorted(SALIENCY_KEYS)
    assert model.state_dict()["residual.1.weight"].shape == (64, 1, 1, 1)
    assert model.state_dict()["downsampler.1.weight"].shape == (8, 3, 9, 9)
    assert model.state_dict()["segmentator.6.weight"].shape == (1, 16, 9, 9)
    path = tmp_path / "saliency_model.safetensors"
    save_file({k: v.contiguous() for k, v in _randomize(model, 5, std=0.3).state_dict().items()}, str(path))
    loaded = load_saliency_model(path)
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert model(images).shape == (2, 1, 6, 8)
    m = saliency_mask(images, loaded, threshold=0.5)
    inv = saliency_mask(images, loaded, threshold=0.5, invert=True)
    assert m.shape == (2, 1, 48, 64) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert (inv + m == 1).float().mean() > 0.99  # inverted up to rounding ties at the blur threshold
    ctrl = inpaint_control(images, saliency=path, threshold=0.5)
    assert ctrl.shape == (2, 4, 48, 64) and torch.equal(ctrl[:, 3:], m)
    with pytest.raises(CheckpointError, match="pickle"):
        load_saliency_model(tmp_path / "saliency_model.pt")
    bad = tmp_path / "bad.safetensors"
    save_file({"downsampler.1.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(CheckpointError, match="saliency"):
        load_saliency_model(bad)


# --------------------------------------------------------------------------------------- super-resolution
def _fake_effnet():
    """Stand-in with the encoder's interface (16 channels, ceil(H/32) x ceil(W/32)), fast enough to call often."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.AvgPool2d(32, ceil_mode=True), torch.nn.Conv2d(3, 16, 1)).eval()


def test_sr_control_definition():
    enc = _fake_effnet()
    images = torch.rand(2, 3, 96, 160, generator=torch.Generator().manual_seed(2))
    ctrl = sr_control(enc, images)
    assert ctrl.shape == (2, 16, 4, 6)  # 48x80 -> 2x3 -> x2
    with torch.no_grad():
        ref = enc(images[:, :, ::2, ::2]).repeat_interleave(2, -2).repeat_interleave(2, -1)
    assert torch.equal(ctrl, ref)
    up = sr_upscale_control(enc, images)
    assert up.shape == (2, 16, 6, 10)
    assert torch.equal(up, sr_control(enc, F.interpolate(images, scale_factor=2, mode="nearest")))


def test_sr_control_with_the_real_encoder():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(40)
        effnet = EfficientNetEncoder().eval()
    ctrl = sr_control(effnet, torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(3)))
    assert ctrl.shape == (1, CONTROL_CHANNELS["sr"], 2, 4) and torch.isfinite(ctrl).all()


@pytest.mark.parametrize("h,w", [(768, 768), (1024, 1024), (1024, 768), (1000, 1001), (333, 517), (65, 4), (1, 1)])
def test_sr_output_size_gives_even_stage_b_latents(h, w):
    oh, ow = sr_output_size(h, w)
    for out, inp in ((oh, h), (ow, w)):
        assert out % 8 == 0 and (out // 4) % 2 == 0 and out >= 8
        assert abs(out - 2 * inp) <= 4 or inp < 4
    # the official rule (control x 32 x 4/3) breaks at 1024 px: 2730 px -> Stage B latent 683 (odd)
    assert sr_output_size(1024, 1024) == (2048, 2048)


# ------------------------------------------------------------------------------------------- face identity
def test_face_filter_without_insightface_names_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "insightface", None)  # as if not installed
    with pytest.raises(InputError, match="insightface") as err:
        FaceIdentityFilter(tmp_path)
    assert "pip install insightface onnxruntime" in str(err.value) and "w600k_r50.onnx" in str(err.value)
    with pytest.raises(InputError, match="insightface"):
        face_identity_control(torch.rand(1, 3, 64, 64), tmp_path)


def test_identity_map_paints_normalised_ids_over_boxes():
    ids = [torch.tensor([[3.0, 4.0] + [0.0] * 510, [0.0] * 511 + [2.0]]), torch.zeros(0, 512)]
    boxes = [torch.tensor([[40.0, 70.0, 130.0, 150.0], [250.0, 5.0, 255.9, 20.0]]), torch.zeros(0, 4)]
    out = paint_identity_map(boxes, ids, 224, 256)
    assert out.shape == (2, 512, 7, 8)
    # face 0: x 40..130 -> cells 1..4, y 70..150 -> cells 2..5 (rounded)
    assert torch.equal(out[0, :2, 2:5, 1:4], torch.tensor([0.6, 0.8])[:, None, None].expand(2, 3, 3))
    assert out[0, :2].ne(0).sum() == 2 * 9
    # face 1: tiny box at the right border still gets one cell, the last column
    assert out[0, 511].nonzero().tolist() == [[0, 7]] and out[0, 511, 0, 7] == 1
    assert out[1].abs().sum() == 0
    with pytest.raises(InputError, match="32x32"):
        paint_identity_map([torch.zeros(0, 4)], [torch.zeros(0, 512)], 16, 64)


def test_control_channels_match_released_configs():
    assert {k: CONTROLNET[k].c_in for k in CONTROLNET} == CONTROL_CHANNELS
    assert all(max(CONTROLNET[k].proj_blocks) == 63 for k in CONTROLNET)
    assert CONTROLNET["identity"].proj_blocks == tuple(range(64))
