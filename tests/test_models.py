"""Forward-pass parity of our networks with the diffusers oracle (fp32, eval) and key/shape parity with the
official module definitions (`official-keys/*.tsv`)."""

import gzip
import ast
import math
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import torch  # noqa: E402
from diffusers import StableCascadeUNet  # noqa: E402

import oracle  # noqa: E402
from stablecascade import checkpoints, configs  # noqa: E402
from stablecascade.models import EfficientNetEncoder, Previewer, StageA, StageB, StageC  # noqa: E402

TOL = 1e-5
KEYS_DIR = Path(__file__).parent / "data" / "official-keys"  # key names and shapes of the released files (gzip)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a - b).abs().max().item()


def _ours(unet, kind):
    """Our model holding the diffusers UNet's weights, through the official key names."""
    cfg = checkpoints.config_from_diffusers(dict(unet.config), kind)
    return checkpoints.build_model(kind, cfg, oracle.official_state_dict(unet), source="test")


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def priors():
    return {name: oracle.diffusers_unet(cfg, seed=100 + i)
            for i, (name, cfg) in enumerate(oracle.PRIOR_CONFIGS.items())}


@pytest.fixture(scope="module")
def decoders():
    return {name: oracle.diffusers_unet(cfg, seed=200 + i)
            for i, (name, cfg) in enumerate(oracle.DECODER_CONFIGS.items())}


@pytest.fixture(scope="module")
def vqgan():
    return oracle.diffusers_vqgan(seed=300)


def _prior_inputs(batch, n_img, h, w, seed):
    g = _gen(seed)
    return dict(
        x=torch.randn(batch, 16, h, w, generator=g),
        r=torch.rand(batch, generator=g),
        clip_text=torch.randn(batch, 77, oracle.TXT_HIDDEN, generator=g),
        clip_text_pooled=torch.randn(batch, 1, oracle.TXT_PROJ, generator=g),
        clip_img=torch.randn(batch, n_img, oracle.IMG_PROJ, generator=g),
    )


# --------------------------------------------------------------------------------------------- Stage C
@pytest.mark.parametrize("name", list(oracle.PRIOR_CONFIGS))
@pytest.mark.parametrize("n_img", [1, 2])
@torch.no_grad()
def test_stage_c_matches_diffusers(priors, name, n_img):
    unet = priors[name]
    ours = _ours(unet, "stage_c")
    assert isinstance(ours, StageC) and not ours.training
    inp = _prior_inputs(2, n_img, 6, 5, seed=n_img)
    ref = unet(sample=inp["x"], timestep_ratio=inp["r"], clip_text_pooled=inp["clip_text_pooled"],
               clip_text=inp["clip_text"], clip_img=inp["clip_img"]).sample
    out = ours(inp["x"], inp["r"], inp["clip_text"], inp["clip_text_pooled"], inp["clip_img"])
    assert out.shape == (2, 16, 6, 5)
    assert ref.abs().max() > 1e-2  # the comparison is not between two near-zero tensors
    assert _max_diff(out, ref) <= TOL
    # the two samples differ (no accidental batch broadcasting)
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("name", list(oracle.PRIOR_CONFIGS))
@torch.no_grad()
def test_stage_c_nonzero_sca_crp_batch1(priors, name):
    # diffusers' `cond or zeros` only works for one-element tensors, so compare nonzero sca/crp at batch 1
    unet = priors[name]
    ours = _ours(unet, "stage_c")
    inp = _prior_inputs(1, 1, 4, 7, seed=7)
    sca, crp = torch.tensor([0.3]), torch.tensor([0.8])
    ref = unet(sample=inp["x"], timestep_ratio=inp["r"], clip_text_pooled=inp["clip_text_pooled"],
               clip_text=inp["clip_text"], clip_img=inp["clip_img"], sca=sca, crp=crp).sample
    out = ours(inp["x"], inp["r"], inp["clip_text"], inp["clip_text_pooled"], inp["clip_img"], sca=sca, crp=crp)
    assert _max_diff(out, ref) <= TOL
    zero = ours(inp["x"], inp["r"], inp["clip_text"], inp["clip_text_pooled"], inp["clip_img"])
    assert (zero - out).abs().max() > 1e-4  # sca/crp really reach the network


# --------------------------------------------------------------------------------------------- Stage B
@pytest.mark.parametrize("name", list(oracle.DECODER_CONFIGS))
@pytest.mark.parametrize("size", [(24, 20), (36, 28)])
@torch.no_grad()
def test_stage_b_matches_diffusers(decoders, name, size):
    # 24x20 -> 12x10, 6x5, 3x2, 1x1 and 36x28 -> 18x14, 9x7, 4x3, 2x1: the skip-resize path runs
    unet = decoders[name]
    ours = _ours(unet, "stage_b")
    assert isinstance(ours, StageB) and not ours.training
    g = _gen(sum(size))
    x = torch.randn(2, 4, *size, generator=g)
    r = torch.rand(2, generator=g)
    effnet = torch.randn(2, 16, 5, 7, generator=g)  # a different size (and aspect) than x
    pooled = torch.randn(2, 1, oracle.TXT_PROJ, generator=g)
    ref = unet(sample=x, timestep_ratio=r, clip_text_pooled=pooled, effnet=effnet).sample
    out = ours(x, r, effnet, pooled)
    assert out.shape == (2, 4, *size)
    assert ref.abs().max() > 1e-2
    assert _max_diff(out, ref) <= TOL
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("name", list(oracle.DECODER_CONFIGS))
@torch.no_grad()
def test_stage_b_nonzero_sca_batch1(decoders, name):
    unet = decoders[name]
    ours = _ours(unet, "stage_b")
    g = _gen(11)
    x, r = torch.randn(1, 4, 20, 24, generator=g), torch.rand(1, generator=g)
    effnet, pooled = torch.randn(1, 16, 3, 3, generator=g), torch.randn(1, 1, oracle.TXT_PROJ, generator=g)
    sca = torch.tensor([0.6])
    ref = unet(sample=x, timestep_ratio=r, clip_text_pooled=pooled, effnet=effnet, sca=sca).sample
    out = ours(x, r, effnet, pooled, sca=sca)
    assert _max_diff(out, ref) <= TOL
    assert (ours(x, r, effnet, pooled) - out).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------- Stage A
@pytest.fixture(scope="module")
def stage_a(vqgan):
    cfg = checkpoints.config_from_diffusers(dict(vqgan.config), "stage_a")
    assert cfg.scale_factor == 0.43
    return checkpoints.build_model("stage_a", cfg, oracle.official_vqgan_state_dict(vqgan), source="test")


@torch.no_grad()
def test_stage_a_encode_matches_diffusers(vqgan, stage_a):
    assert isinstance(stage_a, StageA) and not stage_a.training
    x = torch.rand(2, 3, 32, 24, generator=_gen(1))
    ref = vqgan.encode(x).latents / 0.43
    out = stage_a.encode(x)
    assert out.shape == (2, 4, 8, 6)
    assert ref.abs().max() > 1e-2
    assert _max_diff(out, ref) <= TOL


@torch.no_grad()
def test_stage_a_decode_matches_diffusers(vqgan, stage_a):
    z = torch.randn(2, 4, 6, 5, generator=_gen(2))
    ref = vqgan.decode(z * 0.43).sample
    out = stage_a.decode(z)
    assert out.shape == (2, 3, 24, 20)
    assert ref.abs().max() > 1e-2
    assert _max_diff(out, ref) <= TOL


@torch.no_grad()
def test_stage_a_quantize_uses_codebook(stage_a):
    x = torch.rand(1, 3, 16, 16, generator=_gen(3))
    q = stage_a.encode(x, quantize=True) * stage_a.config.scale_factor
    codes = stage_a.vquantizer.codebook.weight
    flat = q.permute(0, 2, 3, 1).reshape(-1, q.shape[1])
    assert all((codes - v).abs().sum(1).min() < 1e-6 for v in flat)


# --------------------------------------------------------------------------------- EfficientNet encoder
@torch.no_grad()
def test_effnet_matches_torchvision():
    from torchvision.models import efficientnet_v2_s

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)  # torchvision init keeps activations alive through the deep backbone
        src = EfficientNetEncoder()
    oracle.randomize_(src.mapper, seed=6, std=0.2)  # conv weights and BN running stats
    state = {k: v.clone() for k, v in src.state_dict().items()}
    ours = checkpoints.build_model("effnet", configs.EffnetConfig(), state, source="test")
    assert not ours.training

    features = efficientnet_v2_s(weights=None).features.eval()
    features.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    conv = torch.nn.Conv2d(1280, 16, 1, bias=False)
    conv.weight.copy_(state["mapper.0.weight"])
    bn = torch.nn.BatchNorm2d(16, affine=False).eval()
    bn.running_mean.copy_(state["mapper.1.running_mean"])
    bn.running_var.copy_(state["mapper.1.running_var"])

    x = torch.rand(2, 3, 96, 64, generator=_gen(4))
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    ref = bn(conv(features((x - mean) / std)))
    out = ours(x)
    assert out.shape == (2, 16, 3, 2)
    assert ref.std() > 1e-2
    assert _max_diff(out, ref) <= TOL
    assert ours(torch.rand(1, 3, 100, 70, generator=_gen(5))).shape == (1, 16, 4, 3)  # ceil(H/32)


@torch.no_grad()
def test_previewer_shape():
    prev = oracle.randomize_(Previewer(configs.PreviewerConfig(c_hidden=64)), seed=8).eval()
    out = prev(torch.randn(2, 16, 3, 5, generator=_gen(6)))
    assert out.shape == (2, 3, 24, 40)
    assert torch.isfinite(out).all() and out.std() > 0


# ------------------------------------------------------------------------------------ official key lists
def _tsv(name):
    lines = gzip.open(KEYS_DIR / f"{name}.tsv.gz", "rt").read().splitlines()
    header = [line for line in lines if line.startswith("# params ")]
    rows = {}
    for line in lines:
        if line.startswith("#") or not line.strip():
            continue
        key, shape, *note = line.split("\t")
        rows[key] = (tuple(ast.literal_eval(shape)), (note or [""])[0])
    return rows, int(header[0].split()[-1])


RELEASED = oracle.released_variants()


@pytest.mark.parametrize(("kind", "config", "tsv"), RELEASED, ids=[r[2] for r in RELEASED])
def test_released_variants_match_official_keys(kind, config, tsv):
    rows, n_params = _tsv(tsv)
    with torch.device("meta"):
        model = checkpoints.MODEL_CLASSES[kind](config)
    state = model.state_dict()
    assert set(state) - set(rows) == set(), "keys the official model does not have"
    assert set(rows) - set(state) == set(), "official keys we lack"
    wrong = {k: (tuple(v.shape), rows[k][0]) for k, v in state.items() if tuple(v.shape) != rows[k][0]}
    assert not wrong
    ints = {k for k, v in state.items() if v.dtype == torch.int64}
    assert ints == {k for k, (_, note) in rows.items() if note == "int64"}
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert sum(math.prod(s) for s, note in rows.values() if note != "int64") >= n_params


# ------------------------------------------------------------------------- our diffusers export loads
@pytest.mark.parametrize("stage", ["prior", "decoder"])
@torch.no_grad()
def test_save_diffusers_loads_in_diffusers(priors, decoders, tmp_path, stage):
    unet = priors["c_tiny_wide"] if stage == "prior" else decoders["b_tiny_deep"]
    kind = "stage_c" if stage == "prior" else "stage_b"
    ours = _ours(unet, kind)
    checkpoints.save_diffusers(ours, tmp_path)
    back = StableCascadeUNet.from_pretrained(tmp_path).eval()
    ref_sd, back_sd = unet.state_dict(), back.state_dict()
    assert set(back_sd) == set(ref_sd)
    assert all(torch.equal(back_sd[k], v) for k, v in ref_sd.items())
    def norm(v):
        return [norm(x) for x in v] if isinstance(v, (list, tuple)) else v

    for field in ("block_out_channels", "num_attention_heads", "block_types_per_layer", "up_blocks_repeat_mappers",
                  "clip_seq", "timestep_conditioning_type", "conditioning_dim", "switch_level"):
        assert norm(back.config[field]) == norm(unet.config[field]), field

    g = _gen(9)
    if kind == "stage_c":
        inp = _prior_inputs(2, 1, 5, 6, seed=9)
        ref = back(sample=inp["x"], timestep_ratio=inp["r"], clip_text_pooled=inp["clip_text_pooled"],
                   clip_text=inp["clip_text"], clip_img=inp["clip_img"]).sample
        out = ours(inp["x"], inp["r"], inp["clip_text"], inp["clip_text_pooled"], inp["clip_img"])
    else:
        x, r = torch.randn(2, 4, 24, 20, generator=g), torch.rand(2, generator=g)
        effnet, pooled = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 1, oracle.TXT_PROJ, generator=g)
        ref = back(sample=x, timestep_ratio=r, clip_text_pooled=pooled, effnet=effnet).sample
        out = ours(x, r, effnet, pooled)
    assert _max_diff(out, ref) <= TOL


@torch.no_grad()
def test_save_diffusers_stage_a_loads_in_diffusers(vqgan, stage_a, tmp_path):
    checkpoints.save_diffusers(stage_a, tmp_path)
    back = type(vqgan).from_pretrained(tmp_path).eval()
    assert back.config.scale_factor == pytest.approx(0.43)
    ref_sd, back_sd = vqgan.state_dict(), back.state_dict()
    assert set(back_sd) == set(ref_sd)
    assert all(torch.equal(back_sd[k], v) for k, v in ref_sd.items())
