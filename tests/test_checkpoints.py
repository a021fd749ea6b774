"""Checkpoint formats: key mapping vs diffusers, config inference, official file == diffusers folder, dtype and
memory behaviour of loading, and clear errors for bad files."""

import gzip
import ast
import json
import random
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import torch  # noqa: E402
from diffusers.loaders.single_file_utils import convert_stable_cascade_unet_single_file_to_diffusers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import oracle  # noqa: E402
import stablecascade  # noqa: E402
from stablecascade import CheckpointError, checkpoints, configs  # noqa: E402

KEYS_DIR = Path(__file__).parent / "data" / "official-keys"  # key names and shapes of the released files (gzip)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny cascade, its diffusers folders, and official single files of its three stages."""
    tc = oracle.build_tiny_cascade()
    root = tmp_path_factory.mktemp("ckpt")
    prior_dir, decoder_dir = oracle.save_diffusers_folders(tc, root / "diffusers")
    files = root / "official"
    files.mkdir()
    c_file, b_file, a_file = files / "stage_c.safetensors", files / "stage_b.safetensors", files / "stage_a.safetensors"
    checkpoints.save_official(checkpoints.load_diffusers(prior_dir / "prior", "stage_c"), c_file)
    checkpoints.save_official(checkpoints.load_diffusers(decoder_dir / "decoder", "stage_b"), b_file)
    save_file(oracle.official_vqgan_state_dict(tc.vqgan), str(a_file))  # as released: no metadata, no scale
    return dict(tc=tc, prior_dir=prior_dir, decoder_dir=decoder_dir, c_file=c_file, b_file=b_file, a_file=a_file)


def _prior_inputs(cfg, batch=2, h=6, w=5, seed=0):
    g = _gen(seed)
    return (torch.randn(batch, cfg.c_in, h, w, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, 77, cfg.c_clip_text, generator=g),
            torch.randn(batch, 1, cfg.c_clip_text_pooled, generator=g),
            torch.randn(batch, 1, cfg.c_clip_img, generator=g))


def _decoder_inputs(cfg, batch=2, h=24, w=20, seed=0):
    g = _gen(seed)
    return (torch.randn(batch, cfg.c_in, h, w, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, cfg.c_effnet, 5, 7, generator=g), torch.randn(batch, 1, cfg.c_clip, generator=g))


def _state_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ key mapping
@pytest.mark.parametrize(("kind", "name"), [("stage_c", "c_tiny"), ("stage_c", "c_tiny_wide"),
                                            ("stage_b", "b_tiny"), ("stage_b", "b_tiny_deep")])
def test_official_to_diffusers_matches_diffusers_converter(kind, name):
    cfgs = oracle.PRIOR_CONFIGS if kind == "stage_c" else oracle.DECODER_CONFIGS
    unet = oracle.diffusers_unet(cfgs[name], seed=50)
    official = oracle.official_state_dict(unet)
    assert checkpoints.detect_kind(official) == kind
    ours = checkpoints.official_to_diffusers(official, kind)
    ref = convert_stable_cascade_unet_single_file_to_diffusers(dict(official))
    assert set(ours) == set(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    assert _state_equal(ours, unet.state_dict())
    back = checkpoints.diffusers_to_official(ours, kind)
    assert _state_equal(back, official)
    assert checkpoints.detect_kind(ours) == kind  # diffusers naming is recognised too


def test_stage_a_key_mapping():
    vq = oracle.diffusers_vqgan(seed=51)
    official = oracle.official_vqgan_state_dict(vq)
    assert checkpoints.detect_kind(official) == "stage_a"
    as_diffusers = checkpoints.official_to_diffusers(official, "stage_a")
    assert _state_equal(as_diffusers, vq.state_dict())
    assert _state_equal(checkpoints.diffusers_to_official(as_diffusers, "stage_a"), official)


def test_diffusers_to_official_rejects_incomplete_attention():
    unet = oracle.diffusers_unet(oracle.PRIOR_CONFIGS["c_tiny"], seed=52)
    sd = unet.state_dict()
    key = next(k for k in sd if k.endswith(".attention.to_k.weight"))
    del sd[key]
    with pytest.raises(CheckpointError, match="incomplete"):
        checkpoints.diffusers_to_official(sd, "stage_c")


# ---------------------------------------------------------------------------------------- config inference
RELEASED = oracle.released_variants()


@pytest.mark.parametrize(("kind", "config", "tsv"), RELEASED, ids=[r[2] for r in RELEASED])
def test_infer_config_detects_released_variants(kind, config, tsv):
    with torch.device("meta"):
        model = checkpoints.MODEL_CLASSES[kind](config)
    states = {"ours": {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in model.state_dict().items()}}
    # the official key list itself, independent of our module definitions
    rows = [line.split("\t") for line in gzip.open(KEYS_DIR / f"{tsv}.tsv.gz", "rt").read().splitlines()
            if line.strip() and not line.startswith("#")]
    states["official"] = {r[0]: torch.empty(ast.literal_eval(r[1]), device="meta",
                                            dtype=torch.int64 if r[2:] == ["int64"] else torch.float32)
                          for r in rows}
    for source, state in states.items():
        assert checkpoints.detect_kind(state) == kind, source
        assert checkpoints.infer_config(state, kind) == config, source
        if kind in ("stage_c", "stage_b"):  # also under diffusers key names
            assert checkpoints.detect_kind(checkpoints.official_to_diffusers(state, kind)) == kind, source


@pytest.mark.parametrize("name", ["c_tiny_wide", "b_tiny_deep"])
def test_save_official_metadata_round_trip(tmp_path, name):
    kind = "stage_c" if name.startswith("c") else "stage_b"
    unet = oracle.diffusers_unet({**oracle.PRIOR_CONFIGS, **oracle.DECODER_CONFIGS}[name], seed=53)
    cfg = checkpoints.config_from_diffusers(dict(unet.config), kind)
    model = checkpoints.build_model(kind, cfg, oracle.official_state_dict(unet), source="test")
    path = tmp_path / "m.safetensors"
    checkpoints.save_official(model, path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[checkpoints.CONFIG_METADATA_KEY])
    assert type(cfg).from_dict(meta) == cfg
    loaded = checkpoints.load_official(path, kind)
    assert loaded.config == cfg  # head counts included, which the weights alone cannot tell
    assert _state_equal(loaded.state_dict(), model.state_dict())
    # without the metadata, everything visible in the weights is still recovered
    state = checkpoints.read_state_dict(path)[0]
    if kind == "stage_c":  # (Stage B: see the narrow-level test below)
        inferred = checkpoints.infer_config(state, kind)
        assert type(cfg)(**{**inferred.to_dict(), "nhead": cfg.nhead, "dropout": cfg.dropout}) == cfg


def test_infer_config_narrow_stage_b_without_metadata(caplog):
    unet = oracle.diffusers_unet(oracle.DECODER_CONFIGS["b_tiny_deep"], seed=54)  # matches no named variant
    inferred = checkpoints.infer_config(oracle.official_state_dict(unet), "stage_b")
    assert inferred.c_hidden == (16, 24, 32, 32)
    assert inferred.nhead[1:] == (1, 1, 1)  # not 64-wide: the head count cannot be seen, so it is guessed...
    assert "head count unknown" in caplog.text  # ...and the user is told


# ---------------------------------------------------------------------------- official file == diffusers folder
@torch.no_grad()
def test_stage_c_official_file_equals_diffusers_folder(tiny):
    a = checkpoints.load_official(tiny["c_file"], "stage_c")
    b = checkpoints.load_diffusers(tiny["prior_dir"] / "prior", "stage_c")
    assert a.config == b.config
    inputs = _prior_inputs(a.config)
    out = a(*inputs)
    assert torch.equal(out, b(*inputs))
    ref = tiny["tc"].prior(sample=inputs[0], timestep_ratio=inputs[1], clip_text_pooled=inputs[3],
                           clip_text=inputs[2], clip_img=inputs[4]).sample
    assert (out - ref).abs().max() <= 1e-5


@torch.no_grad()
def test_stage_b_official_file_equals_diffusers_folder(tiny):
    a = checkpoints.load_official(tiny["b_file"], "stage_b")
    b = checkpoints.load_diffusers(tiny["decoder_dir"] / "decoder", "stage_b")
    assert a.config == b.config
    inputs = _decoder_inputs(a.config)
    out = a(*inputs)
    assert torch.equal(out, b(*inputs))
    ref = tiny["tc"].decoder(sample=inputs[0], timestep_ratio=inputs[1], clip_text_pooled=inputs[3],
                             effnet=inputs[2]).sample
    assert (out - ref).abs().max() <= 1e-5


@torch.no_grad()
def test_stage_a_official_file_equals_diffusers_folder(tiny):
    a = checkpoints.load_official(tiny["a_file"], "stage_a")
    b = checkpoints.load_diffusers(tiny["decoder_dir"] / "vqgan", "stage_a")
    assert a.config == b.config == configs.StageAConfig(bottleneck_blocks=1, c_hidden=32, codebook_size=16)
    assert a.config.scale_factor == 0.43  # official files carry no scale factor
    x = torch.rand(2, 3, 32, 24, generator=_gen(1))
    z = a.encode(x)
    assert torch.equal(z, b.encode(x))
    assert torch.equal(a.decode(z), b.decode(z))
    assert torch.equal(z, tiny["tc"].vqgan.encode(x).latents / 0.43)


@pytest.fixture(scope="module")
def pipeline_images(tiny):
    prior = {"stage_c": tiny["c_file"], "text_encoder": tiny["prior_dir"] / "text_encoder",
             "tokenizer": tiny["prior_dir"] / "tokenizer"}
    decoder = {"stage_b": tiny["b_file"], "stage_a": tiny["a_file"]}
    kw = dict(device="cpu", dtype=torch.float32)
    run = dict(width=128, height=128, prior_steps=2, decoder_steps=2, seed=3, output_type="pt", progress=False)
    from_files = stablecascade.load_pipeline(prior=prior, decoder=decoder, **kw)("a red cube", **run)
    from_folders = stablecascade.load_pipeline(tiny["prior_dir"], tiny["decoder_dir"], **kw)("a red cube", **run)
    return from_files, from_folders


def test_pipeline_from_official_files_matches_diffusers_folders(pipeline_images):
    from_files, from_folders = pipeline_images
    assert from_files.shape == from_folders.shape == (1, 3, 128, 128)
    assert from_files.std() > 0.05
    assert (from_files - from_folders).abs().max() <= 1e-5


def test_pipeline_from_official_files_equals_diffusers_folders_exactly(pipeline_images):
    from_files, from_folders = pipeline_images
    assert torch.equal(from_files, from_folders)


# ---------------------------------------------------------------------------------------- dtype and memory
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_load_official_dtype_and_no_extra_copies(tiny, dtype):
    model = checkpoints.load_official(tiny["c_file"], "stage_c", dtype=dtype)
    ref = checkpoints.read_state_dict(tiny["c_file"])[0]
    params = dict(model.named_parameters())
    assert params and all(p.dtype == dtype for p in params.values())
    tensors = {**params, **dict(model.named_buffers())}
    assert not any(t.is_meta or t.device.type != "cpu" for t in tensors.values())
    storages = [p.untyped_storage().data_ptr() for p in params.values()]
    assert len(set(storages)) == len(storages)  # no two parameters share memory
    # each parameter owns exactly its own bytes (no view into a larger buffer such as the whole file)
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in params.values())
    assert all(torch.equal(p, ref[k].to(dtype)) for k, p in params.items())
    assert not any(p.requires_grad for p in params.values()) and not model.training


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loaded_parameters_are_aligned(tiny, dtype):
    # the same weights must give the same results whichever format they came from: kernels choose their code
    # path (and rounding) by pointer alignment, and torch's own allocations are 64-byte aligned
    model = checkpoints.load_official(tiny["b_file"], "stage_b", dtype=dtype)
    assert all(p.data_ptr() % 64 == 0 for p in model.parameters())


# ------------------------------------------------------------------------------------------ bad files
def _raises(path, kind="stage_c", *parts):
    with pytest.raises(CheckpointError) as info:
        checkpoints.load_official(path, kind)
    msg = str(info.value)
    assert Path(path).name in msg, msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"stage_c{suffix}"
    _raises(path, "stage_c", "pickle")  # refused by name, before looking for the file
    path.write_bytes(b"\x80\x04not really a pickle")
    _raises(path, "stage_c", "pickle")


def test_missing_file(tmp_path):
    _raises(tmp_path / "nowhere" / "stage_c.safetensors", "stage_c", "not found")


def test_truncated_file(tiny, tmp_path):
    data = tiny["c_file"].read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    msg = _raises(path, "stage_c", "truncated")
    assert "safetensors" in msg


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(random.Random(0).randbytes(4096))
    _raises(path, "stage_c", "safetensors")


def test_wrong_stage(tiny):
    msg = _raises(tiny["b_file"], "stage_c", "Stage B", "Stage C")
    assert msg.index("Stage B") < msg.index("Stage C")  # "holds Stage B ... expected Stage C"
    _raises(tiny["c_file"], "stage_b", "Stage C", "Stage B")
    _raises(tiny["a_file"], "stage_c", "Stage A", "Stage C")


def _rewrite(src, dst, edit):
    state, meta = checkpoints.read_state_dict(src)
    edit(state)
    save_file(state, str(dst), metadata=meta)


@pytest.mark.parametrize("key", ["down_blocks.1.0.channelwise.4.weight", "clip_img_mapper.bias",
                                 "up_blocks.1.0.channelwise.0.weight"])
def test_missing_key(tiny, tmp_path, key):
    expected = tuple(checkpoints.read_state_dict(tiny["c_file"])[0][key].shape)
    path = tmp_path / "missing_key.safetensors"
    _rewrite(tiny["c_file"], path, lambda s: s.pop(key))
    _raises(path, "stage_c", "missing", repr(key), str(expected))


@pytest.mark.parametrize("key", ["down_blocks.0.0.depthwise.weight", "embedding.1.weight"])
def test_missing_structural_key_without_metadata(tiny, tmp_path, key):
    # released files carry no config: a key the layout is read from must still give a clear error
    state = checkpoints.read_state_dict(tiny["c_file"])[0]
    state.pop(key)
    path = tmp_path / "released_like.safetensors"
    save_file(state, str(path))
    _raises(path, "stage_c", repr(key), "incomplete")


def test_wrong_shape(tiny, tmp_path):
    key = "down_blocks.0.2.kv_mapper.1.weight"
    good = tuple(checkpoints.read_state_dict(tiny["c_file"])[0][key].shape)
    bad = (good[0], good[1] + 3)
    path = tmp_path / "wrong_shape.safetensors"
    _rewrite(tiny["c_file"], path, lambda s: s.__setitem__(key, torch.zeros(bad)))
    _raises(path, "stage_c", repr(key), str(bad), str(good))
