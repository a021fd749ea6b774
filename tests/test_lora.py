"""LoRA: reading every supported format, merge/adapter application, tokens, errors, saving."""

import copy

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")

from stablecascade import checkpoints  # noqa: E402
from stablecascade.conditioning import TextEncoder  # noqa: E402
from stablecascade.errors import CheckpointError, InputError  # noqa: E402
from stablecascade.models.blocks import AttnBlock  # noqa: E402
from stablecascade.lora_formats import read_lora, save_lora  # noqa: E402
from stablecascade.models.lora import LoRAManager, LoRAWeights  # noqa: E402
from stablecascade.loading import _load_text_encoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
RANK = 2
PROMPT = "a photo of a dog in the snow"


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base(tiny):
    stage_c = checkpoints.load_diffusers(tiny.prior / "prior", "stage_c")
    te = _load_text_encoder({"text_encoder": tiny.prior / "text_encoder", "tokenizer": tiny.prior / "tokenizer"},
                            torch.float32, "cpu")
    return stage_c, te


@pytest.fixture
def models(base):
    """Fresh copies: tests change weights and embeddings (the tokenizer is never mutated, only replaced)."""
    stage_c, te = base
    return copy.deepcopy(stage_c), TextEncoder(te.tokenizer, copy.deepcopy(te.model))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(1, 16, 8, 8, generator=g), r=torch.tensor([0.6]),
                clip_text=torch.randn(1, 77, 32, generator=g), clip_text_pooled=torch.randn(1, 1, 32, generator=g),
                clip_img=torch.randn(1, 1, 24, generator=g))


@torch.no_grad()
def run(stage_c, te=None, prompt=PROMPT):
    """Stage C output; with `te` the text conditioning comes from the text encoder (so TE changes show)."""
    inputs = _inputs()
    if te is not None:
        inputs["clip_text"], inputs["clip_text_pooled"] = te([prompt])
    return stage_c(**inputs)


def _rand(g, *shape):
    return torch.randn(*shape, generator=g) * 0.2


def _attn_blocks(stage_c):
    return [n for n, m in stage_c.named_modules() if isinstance(m, AttnBlock)]


# ----------------------------------------------------------------------------------------------- LoRA files
def official_lora(stage_c, seed=1, rank=RANK):
    """weights.{i}: per AttnBlock in module order, even = out_proj, odd = in_proj."""
    g, state = torch.Generator().manual_seed(seed), {}
    for j, block in enumerate(_attn_blocks(stage_c)):
        c = stage_c.get_submodule(block).attention.attn.out_proj.weight.shape[0]
        for i, out in ((2 * j, c), (2 * j + 1, 3 * c)):
            state[f"weights.{i}.lora_down"], state[f"weights.{i}.lora_up"] = _rand(g, rank, c), _rand(g, out, rank)
    return state


def _kohya_layer(state, g, name, out, inp, alpha=None, conv=False):
    down, up = _rand(g, RANK, inp), _rand(g, out, RANK)
    if conv:
        down, up = down[:, :, None, None], up[:, :, None, None]
    state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
    if alpha is not None:
        state[f"{name}.alpha"] = torch.tensor(float(alpha))


def kohya_lora(prefix="lora_unet_", diffusers_names=False, seed=2):
    """Official-name or diffusers-name attention layers plus a Linear, kv_mapper, clip_txt_mapper and a conv."""
    g, state, c = torch.Generator().manual_seed(seed), {}, 64
    for block in ("down_blocks_0_2", "up_blocks_0_5"):
        if diffusers_names:
            for part in ("to_q", "to_k", "to_v", "to_out_0"):
                _kohya_layer(state, g, f"{prefix}{block}_attention_{part}", c, c, alpha=1)
        else:
            _kohya_layer(state, g, f"{prefix}{block}_attention_attn_in_proj", 3 * c, c, alpha=4)
            _kohya_layer(state, g, f"{prefix}{block}_attention_attn_out_proj", c, c)
    _kohya_layer(state, g, f"{prefix}down_blocks_1_0_channelwise_0", 4 * c, c, alpha=1)
    _kohya_layer(state, g, f"{prefix}up_blocks_1_2_kv_mapper_1", c, 64)
    _kohya_layer(state, g, f"{prefix}clip_txt_mapper", 64, 32, alpha=1)
    _kohya_layer(state, g, f"{prefix}embedding_1", c, 16, alpha=2, conv=True)
    return state


def onetrainer_lora(seed=3):
    g, state = torch.Generator().manual_seed(seed), {}
    for part in ("to_q", "to_v", "out_proj"):
        _kohya_layer(state, g, f"lora_prior_unet_down_blocks_1_5_attention_attn_{part}", 64, 64, alpha=1)
    _kohya_layer(state, g, "lora_prior_te_text_model_encoder_layers_0_self_attn_q_proj", 32, 32, alpha=1)
    _kohya_layer(state, g, "lora_prior_te_text_projection", 32, 32, alpha=2)
    return state


def kohya_te_lora(seed=4):
    g, state = torch.Generator().manual_seed(seed), {}
    _kohya_layer(state, g, "lora_te_text_model_encoder_layers_1_mlp_fc1", 64, 32, alpha=1)
    _kohya_layer(state, g, "lora_te_text_model_encoder_layers_0_self_attn_out_proj", 32, 32)
    _kohya_layer(state, g, "lora_unet_up_blocks_1_2_attention_to_out_0", 64, 64)
    return state


FORMATS = {
    "official": (lambda sc: official_lora(sc), "official", False),
    "kohya": (lambda sc: kohya_lora(), "kohya", False),
    "kohya-diffusers-names": (lambda sc: kohya_lora(diffusers_names=True), "kohya", False),
    "onetrainer": (lambda sc: onetrainer_lora(), "onetrainer", True),
    "kohya-te": (lambda sc: kohya_te_lora(), "kohya", True),
}


def _weights(stage_c, te):
    return {**{f"c.{k}": v.clone() for k, v in stage_c.state_dict().items()},
            **{f"te.{k}": v.clone() for k, v in te.model.state_dict().items()}}


def _assert_base(models, before):
    stage_c, te = models
    after = _weights(stage_c, te)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any("parametrizations" in n for n, _ in stage_c.named_modules())


# ----------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_format_changes_output_merge_equals_adapter_and_unmerge_restores(models, fmt):
    stage_c, te = models
    build, label, touches_te = FORMATS[fmt]
    lora = read_lora(build(stage_c), stage_c, te)
    assert lora.format == label and lora.layers
    assert any(d.model == "text_encoder" for d in lora.layers) == touches_te
    base_out, base_te, before = run(stage_c, te), te([PROMPT]), _weights(stage_c, te)

    manager = LoRAManager(stage_c, te)
    manager.add(lora, 0.8, "a")
    manager.merge()
    merged = run(stage_c, te)
    assert not torch.allclose(merged, base_out, atol=1e-4)
    if touches_te:
        assert not torch.allclose(te([PROMPT])[0], base_te[0], atol=1e-4)
    manager.unmerge()
    _assert_base(models, before)
    assert torch.equal(run(stage_c, te), base_out)

    manager.apply("adapter")
    torch.testing.assert_close(run(stage_c, te), merged, rtol=1e-5, atol=1e-5)
    manager.set_scale("a", 0.0)  # live switch-off
    assert torch.equal(run(stage_c, te), base_out)
    manager.unmerge()
    _assert_base(models, before)


def test_merge_equals_hand_computed_update(models):
    stage_c, te = models
    c = 64
    official, kohya = official_lora(stage_c), kohya_lora(diffusers_names=True)
    first = _attn_blocks(stage_c)[0]
    mha = stage_c.get_submodule(first).attention.attn
    w_in, w_out = mha.in_proj_weight.detach().clone(), mha.out_proj.weight.detach().clone()
    blk = stage_c.get_submodule("up_blocks.0.5").attention.attn
    w_blk = blk.in_proj_weight.detach().clone()

    manager = LoRAManager(stage_c)
    manager.add(read_lora(official, stage_c), 0.7, "official")
    manager.merge()
    up, down = official["weights.1.lora_up"], official["weights.1.lora_down"]  # odd: in_proj of block 0
    torch.testing.assert_close(mha.in_proj_weight, w_in + 0.7 * (up @ down) / RANK, rtol=0, atol=1e-6)
    up, down = official["weights.0.lora_up"], official["weights.0.lora_down"]  # even: out_proj
    torch.testing.assert_close(mha.out_proj.weight, w_out + 0.7 * (up @ down) / RANK, rtol=0, atol=1e-6)
    manager.remove("official")  # re-applies without it
    assert torch.equal(mha.in_proj_weight, w_in)

    manager.add(read_lora(kohya, stage_c), 1.5, "kohya")  # applied at once: the manager is in merge mode
    name = "lora_unet_up_blocks_0_5_attention_to_k"  # rows c:2c of the fused in_proj, alpha 1
    up, down = kohya[f"{name}.lora_up.weight"], kohya[f"{name}.lora_down.weight"]
    expected = w_blk[c:2 * c] + 1.5 * (up @ down) * float(kohya[f"{name}.alpha"]) / RANK
    torch.testing.assert_close(blk.in_proj_weight[c:2 * c], expected, rtol=0, atol=1e-6)
    name = "lora_unet_embedding_1"  # 1x1 conv, alpha 2
    conv = stage_c.embedding[1].weight
    manager.unmerge()
    w_conv = conv.detach().clone()
    manager.merge()
    up, down = kohya[f"{name}.lora_up.weight"].flatten(1), kohya[f"{name}.lora_down.weight"].flatten(1)
    torch.testing.assert_close(conv, w_conv + 1.5 * (up @ down)[:, :, None, None] * 2 / RANK, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["merge", "adapter"])
def test_scale_zero_is_bit_identical(models, mode):
    stage_c, te = models
    base_out, before = run(stage_c, te), _weights(stage_c, te)
    manager = LoRAManager(stage_c, te)
    manager.add(read_lora(onetrainer_lora(), stage_c, te), 0.0)
    manager.add(read_lora(official_lora(stage_c), stage_c, te), 0.0)
    manager.apply(mode)
    assert torch.equal(run(stage_c, te), base_out)
    manager.unmerge()
    _assert_base(models, before)


def test_two_loras_add_up(models):
    stage_c, te = models
    a, b = official_lora(stage_c, seed=5), official_lora(stage_c, seed=6)
    manager = LoRAManager(stage_c, te)
    manager.add(read_lora(a, stage_c), 0.5, "a")
    manager.add(read_lora(b, stage_c), -1.5, "b")
    manager.merge()
    both = run(stage_c)
    for i, block in enumerate(_attn_blocks(stage_c)):
        attn = stage_c.get_submodule(block).attention.attn
        manager.unmerge()
        base_w = attn.in_proj_weight.detach().clone()
        manager.merge()
        k = 2 * i + 1
        total = 0.5 * a[f"weights.{k}.lora_up"] @ a[f"weights.{k}.lora_down"] \
            - 1.5 * b[f"weights.{k}.lora_up"] @ b[f"weights.{k}.lora_down"]
        torch.testing.assert_close(attn.in_proj_weight, base_w + total / RANK, rtol=0, atol=1e-6)
    # one LoRA carrying the summed update gives the same output
    summed = {k: (torch.cat([0.5 * a[k], -1.5 * b[k]], dim=1) if k.endswith("up") else torch.cat([a[k], b[k]]))
              for k in a}
    manager.unmerge()
    single = LoRAManager(stage_c, te)
    lora = read_lora(summed, stage_c)
    for d in lora.layers:
        d.scale = 1 / RANK  # the file's rank is 2·RANK; the factors are those of rank-RANK LoRAs
    single.add(lora, 1.0)
    single.merge()
    torch.testing.assert_close(run(stage_c), both, rtol=1e-5, atol=1e-5)
    single.unmerge()
    # adapter mode: live scale changes equal re-merging at those scales
    manager.apply("adapter")
    manager.set_scale("a", 1.0)
    live = run(stage_c)
    manager.merge()
    torch.testing.assert_close(run(stage_c), live, rtol=1e-5, atol=1e-5)
    manager.remove("a")
    manager.remove("b")
    assert manager.mode == "merge"
    manager.unmerge()


def _fernando_lora(stage_c, te, seed=7):
    g = torch.Generator().manual_seed(seed)
    state = official_lora(stage_c, seed=seed)
    state["embeddings.embeddings"] = _rand(g, 3, 32)
    state["embeddings.indices"] = torch.tensor([1929, 49408, 49409])  # dog</w> (existing), two new tokens
    return state


def test_new_tokens_reach_the_text_encoder_and_unmerge_removes_them(models):
    stage_c, te = models
    state = _fernando_lora(stage_c, te)
    with pytest.raises(CheckpointError, match="new_tokens"):
        read_lora(state, stage_c, te)
    lora = read_lora(state, stage_c, te, new_tokens=[("[fernando]", "^dog</w>"), ("<zed>", None)])
    assert lora.new_tokens == [("[fernando]", "^dog</w>"), ("<zed>", None)]
    tok0, emb0 = te.tokenizer, te.model.get_input_embeddings()
    base_rows = emb0.weight.detach().clone()
    prompt = "a photo of [fernando] and <zed>"
    base_new, base_cat = te([prompt]), te(["a photo of a cat"])
    before = _weights(stage_c, te)

    manager = LoRAManager(stage_c, te)
    manager.add(lora, 1.0, "fernando")
    manager.merge()
    ids = te.tokenizer(prompt).input_ids
    assert 49408 in ids and 49409 in ids and len(te.tokenizer) == 49410
    rows = te.model.get_input_embeddings().weight
    delta = state["embeddings.embeddings"]
    torch.testing.assert_close(rows[49408], base_rows[1929] + delta[1], rtol=0, atol=1e-6)  # mean of one row
    torch.testing.assert_close(rows[49409], delta[2], rtol=0, atol=0)  # no init regex: zeros + delta
    torch.testing.assert_close(rows[1929], base_rows[1929] + delta[0], rtol=0, atol=1e-6)
    assert torch.equal(rows[:49408][torch.arange(49408) != 1929], base_rows[torch.arange(49408) != 1929])
    assert not torch.allclose(te([prompt])[0], base_new[0], atol=1e-4)
    assert torch.equal(te(["a photo of a cat"])[0], base_cat[0])  # rows of other tokens untouched
    # half scale: new rows keep their base, deltas are halved
    manager.set_scale("fernando", 0.5)
    torch.testing.assert_close(te.model.get_input_embeddings().weight[49408], base_rows[1929] + 0.5 * delta[1])

    manager.unmerge()
    assert te.tokenizer is tok0 and te.model.get_input_embeddings() is emb0 and len(te.tokenizer) == 49408
    assert 49408 not in te.tokenizer(prompt).input_ids
    assert torch.equal(te([prompt])[0], base_new[0])
    _assert_base(models, before)


def test_bfloat16_merge_adapter_and_exact_restore(models):
    stage_c, te = models
    stage_c.to(torch.bfloat16)
    te.model.to(torch.bfloat16)
    before = _weights(stage_c, te)
    manager = LoRAManager(stage_c, te)
    manager.add(read_lora(onetrainer_lora(), stage_c, te), 1.3)
    manager.add(read_lora(kohya_lora(diffusers_names=True), stage_c, te), -0.4)
    manager.merge()
    merged = _weights(stage_c, te)
    assert merged["c.embedding.1.weight"].dtype == torch.bfloat16
    assert not torch.equal(merged["c.embedding.1.weight"], before["c.embedding.1.weight"])
    manager.apply("adapter")  # the same float32 sum rounded once: identical weights
    for key, module, param in (("c.down_blocks.1.5.attention.attn.in_proj_weight", "down_blocks.1.5.attention.attn",
                                "in_proj_weight"), ("te.text_projection.weight", "text_projection", "weight")):
        model = stage_c if key.startswith("c.") else te.model
        assert torch.equal(getattr(model.get_submodule(module), param), merged[key])
    manager.unmerge()
    _assert_base(models, before)


def test_onetrainer_bundled_embedding(models):
    stage_c, te = models
    vec = torch.randn(1, 32)
    lora = read_lora({"bundle_emb.<myemb>.clip_g": vec, **kohya_te_lora()}, stage_c, te)
    assert lora.new_tokens == [("<myemb>", None)]  # the placeholder as OneTrainer's prompts write it
    manager = LoRAManager(stage_c, te)
    manager.add(lora, 1.0)
    manager.apply("adapter")
    i = te.tokenizer.convert_tokens_to_ids("<myemb>")
    assert i == 49408 and torch.equal(te.model.get_input_embeddings().weight[i], vec[0])
    manager.unmerge()


def test_save_read_round_trip(models, tmp_path):
    stage_c, te = models
    state = kohya_lora(diffusers_names=True)
    state = {k: v for k, v in state.items() if "attention" in k}  # only attention layers fit the official format
    lora = read_lora(state, stage_c, te)
    lora.tokens = read_lora(_fernando_lora(stage_c, te), stage_c, te,
                            new_tokens=[("[fernando]", "^dog</w>"), ("<zed>", None)]).tokens
    path = tmp_path / "lora.safetensors"
    save_lora(path, lora, stage_c)
    _, meta = checkpoints.read_state_dict(path)
    assert meta["rank"] == str(3 * RANK)  # q, k, v stacked into one in_proj update
    again = read_lora(path, stage_c, te)  # token strings come from the metadata
    assert again.format == "official" and again.source == str(path)
    assert again.new_tokens == lora.new_tokens

    outputs = []
    for item in (lora, again):
        manager = LoRAManager(stage_c, te)
        manager.add(item, 0.9)
        manager.merge()
        outputs.append((run(stage_c, te, "a [fernando]"), _weights(stage_c, te)))
        manager.unmerge()
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-5)
    for k, v in outputs[0][1].items():
        torch.testing.assert_close(outputs[1][1][k], v, rtol=1e-5, atol=1e-6)


def test_errors_name_the_file_and_key(models, tmp_path):
    stage_c, te = models
    # shape mismatch (a LoRA for a wider Stage C), in a file
    path = tmp_path / "wide.safetensors"
    bad = kohya_lora()
    bad["lora_unet_down_blocks_0_2_attention_attn_out_proj.lora_up.weight"] = torch.zeros(96, RANK)
    save_file(bad, str(path))
    with pytest.raises(CheckpointError, match=r"wide\.safetensors.*lora_unet_down_blocks_0_2_attention_attn_out_proj"):
        read_lora(path, stage_c, te)
    # official file with the wrong layer count
    official = official_lora(stage_c)
    official.update({"weights.12.lora_down": torch.zeros(RANK, 64), "weights.12.lora_up": torch.zeros(64, RANK)})
    with pytest.raises(CheckpointError, match="13 layers.*12 attention layers"):
        read_lora(official, stage_c)
    # official file with the wrong width
    official = official_lora(stage_c)
    official["weights.3.lora_up"] = torch.zeros(3 * 96, RANK)
    with pytest.raises(CheckpointError, match="weights.3"):
        read_lora(official, stage_c)
    # an SDXL LoRA
    sdxl = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.lora_down.weight": torch.zeros(4, 640),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.lora_up.weight": torch.zeros(640, 4)}
    with pytest.raises(CheckpointError, match="input_blocks_4.*different model"):
        read_lora(sdxl, stage_c, te)
    # unknown key format / unsupported variant
    with pytest.raises(CheckpointError, match="unknown LoRA key format.*'foo.bar'"):
        read_lora({"foo.bar": torch.zeros(2)}, stage_c)
    with pytest.raises(CheckpointError, match="LoHa"):
        read_lora({"lora_unet_clip_txt_mapper.hada_w1_a": torch.zeros(2, 2)}, stage_c)
    # corrupt and missing files
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        read_lora(corrupt, stage_c)
    with pytest.raises(CheckpointError, match="not found"):
        read_lora(tmp_path / "missing.safetensors", stage_c)
    # text-encoder layers without a text encoder
    with pytest.raises(InputError, match="text_encoder="):
        read_lora(onetrainer_lora(), stage_c)
    assert isinstance(LoRAWeights().rank, int)


# ------------------------------------------------------------------------------------- OneTrainer key forms
# The layers OneTrainer's Stable Cascade LoRA conversion names (its "all layers" preset writes every one the model
# has), as OMI paths: official module paths, the fused attention's q/k/v rows numbered in_proj.0/1/2.
OT_TOP = ("clf.1", "clip_img_mapper", "clip_txt_mapper", "clip_txt_pooled_mapper", "down_downscalers.1.1.blocks.0",
          "embedding.1", "up_upscalers.0.1.blocks.1")
OT_BLOCK = ("channelwise.0", "channelwise.4", "depthwise", "mapper", "mapper_crp", "mapper_sca", "kv_mapper.1",
            "attention.attn.out_proj", "attention.attn.in_proj.0", "attention.attn.in_proj.1",
            "attention.attn.in_proj.2")
OT_TE = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.out_proj", "self_attn.q_proj", "self_attn.v_proj")


def _ot_name(path: str, model: str, form: str) -> str:
    """OneTrainer's key for an OMI path in its three forms: "omi", "legacy" (kohya-like, the default of its saver)
    and "internal" (dotted diffusers names)."""
    if model == "te":
        return {"omi": f"clip_g.{path}", "legacy": "lora_prior_te_" + path.replace(".", "_"),
                "internal": f"lora_prior_te.{path}"}[form]
    if form == "omi":
        return f"unet.{path}"
    for i, part in enumerate("qkv"):
        path = path.replace(f"attention.attn.in_proj.{i}", {"legacy": f"attention.attn.to_{part}",
                                                             "internal": f"attention.to_{part}"}[form])
    if form == "internal":
        path = path.replace("attention.attn.out_proj", "attention.to_out.0")
    return ("lora_prior_unet_" + path.replace(".", "_")) if form == "legacy" else f"lora_prior_unet.{path}"


def onetrainer_all_layers(stage_c, te, form, seed=11, alpha=2.0):
    """An all-layer OneTrainer LoRA for these models (every layer its conversion names that they have, depthwise
    convolutions as the full convolutions OneTrainer trains, plus one layer of a deeper model), and the weights a
    merge at scale 1 must produce: {"c.<param>" | "te.<param>": expected tensor}."""
    g, state, expected = torch.Generator().manual_seed(seed), {}, {}
    modules = dict(stage_c.named_modules())
    paths = [("c", p) for p in OT_TOP]
    for level in ("down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1"):
        for i in range(len(stage_c.get_submodule(level))):
            paths += [("c", f"{level}.{i}.{sub}") for sub in OT_BLOCK]
    n_layers = te.model.config.num_hidden_layers
    paths += [("te", "text_projection")] + [("te", f"text_model.encoder.layers.{i}.{sub}") for i in range(n_layers)
                                            for sub in OT_TE]
    for model, path in paths:
        owner = stage_c if model == "c" else te.model
        rows = None
        if ".attention.attn.in_proj." in path:
            module, i = path.rsplit(".in_proj.", 1)
            if module not in modules:
                continue
            param, weight = f"{module}.in_proj_weight", owner.get_submodule(module).in_proj_weight
            c = weight.shape[1]
            rows = (int(i) * c, (int(i) + 1) * c)
        else:
            if model == "c" and path not in modules:
                continue
            param, weight = f"{path}.weight", owner.get_submodule(path).weight
        out, inp = weight.shape[0] if rows is None else c, weight.shape[1]
        grouped = getattr(owner.get_submodule(path), "groups", 1) > 1 if rows is None else False
        down = _rand(g, RANK, out if grouped else inp, *weight.shape[2:])  # depthwise: a full conv, c -> r
        up = _rand(g, out, RANK, *[1] * (weight.dim() - 2))
        name = _ot_name(path, model, form)
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
        state[f"{name}.alpha"] = torch.tensor(alpha)
        if grouped:
            continue  # cannot apply: must stay unchanged
        key = f"{model}.{param}"
        full = expected.get(key, weight.detach().float().clone())
        delta = (alpha / RANK) * (up.flatten(1) @ down.flatten(1))
        if rows is None:
            full = full + delta.view(weight.shape)
        else:
            full[rows[0]: rows[1]] += delta
        expected[key] = full
    extra = _ot_name("down_blocks.1.40.channelwise.0", "c", form)  # a layer only a deeper Stage C has
    state[f"{extra}.lora_down.weight"], state[f"{extra}.lora_up.weight"] = _rand(g, RANK, 64), _rand(g, 256, RANK)
    return state, expected


@pytest.mark.parametrize("form", ["legacy", "omi", "internal"])
def test_onetrainer_all_layer_files_change_exactly_the_intended_weights(models, form, caplog):
    stage_c, te = models
    state, expected = onetrainer_all_layers(stage_c, te, form)
    assert any(".depthwise" in k or "_depthwise" in k for k in state)
    before = _weights(stage_c, te)
    with caplog.at_level("WARNING"):
        lora = read_lora(state, stage_c, te)
    assert "depthwise" in caplog.text and "down_blocks" in caplog.text and "40" in caplog.text  # skipped, named
    assert lora.format == {"legacy": "onetrainer", "omi": "omi", "internal": "onetrainer-internal"}[form]
    manager = LoRAManager(stage_c, te)
    manager.add(lora)
    manager.merge()
    after = _weights(stage_c, te)
    assert len(expected) > 40 and any(k.startswith("te.") for k in expected)
    for key, value in after.items():
        if key in expected:
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
        else:  # everything else, the depthwise convolutions included, is untouched
            assert torch.equal(value, before[key]), key
    manager.unmerge()
    _assert_base(models, before)


def test_onetrainer_output_embedding_replaces_the_hidden_state(models, caplog):
    stage_c, te = models
    out_vec = torch.randn(1, 32)
    prompt = "a <glow> dog"
    base = te([prompt])
    with caplog.at_level("WARNING"):
        lora = read_lora({"bundle_emb.<glow>.clip_g": torch.zeros(1, 32), "bundle_emb.<glow>.clip_g_out": out_vec,
                          "bundle_emb.<glow>.clip_l": torch.zeros(1, 768)}, stage_c, te)
    assert "clip_l" in caplog.text  # another encoder's embedding is skipped with a warning, the rest loads
    assert [(t.token, t.output) for t in lora.tokens] == [("<glow>", False), ("<glow>", True)]
    input_only = _no_output_hidden(stage_c, te, lora)
    manager = LoRAManager(stage_c, te)
    manager.add(lora)
    manager.merge()
    ids = te.tokenizer(prompt).input_ids
    pos = ids.index(te.tokenizer.convert_tokens_to_ids("<glow>"))
    hidden, _ = te([prompt])
    assert torch.equal(hidden[0, pos], out_vec[0])  # what Stage C reads at the token is the output vector
    assert not torch.equal(hidden[0, pos + 1], base[0][0, pos + 1])
    manager.set_scale("lora0", 0.5)
    torch.testing.assert_close(te([prompt])[0][0, pos], 0.5 * out_vec[0] + 0.5 * input_only[pos], rtol=1e-5,
                               atol=1e-6)
    manager.unmerge()
    assert torch.equal(te([prompt])[0], base[0])  # hook removed, tokenizer restored


def _no_output_hidden(stage_c, te, lora):
    """The hidden states of the prompt with the LoRA's input rows only (its output embeddings left out)."""
    only_input = LoRAWeights(tokens=[t for t in lora.tokens if not t.output], vocab_size=lora.vocab_size)
    manager = LoRAManager(stage_c, te)
    manager.add(only_input)
    manager.merge()
    hidden = te(["a <glow> dog"])[0][0]
    manager.unmerge()
    return hidden


def test_kohya_save_round_trip_with_every_layer_kind(models, tmp_path):
    stage_c, te = models
    state, _ = onetrainer_all_layers(stage_c, te, "omi")
    lora = read_lora(state, stage_c, te)
    lora.tokens = read_lora({"bundle_emb.[zorb].clip_g": torch.randn(1, 32)}, stage_c, te).tokens
    path = tmp_path / "kohya.safetensors"
    with pytest.raises(InputError, match="kohya"):
        save_lora(path, lora, stage_c)  # the official format cannot hold these layers, and says which to use
    save_lora(path, lora, stage_c, format="kohya")
    saved, meta = checkpoints.read_state_dict(path)
    assert meta["format"] == "kohya"
    # ComfyUI's names for Stable Cascade: fused attention split into to_q/k/v, text encoder as lora_prior_te_
    assert "lora_unet_down_blocks_0_2_attention_attn_to_k.lora_up.weight" in saved
    assert "lora_unet_down_blocks_0_2_attention_attn_out_proj.alpha" in saved
    assert "lora_prior_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in saved
    again = read_lora(path, stage_c, te)
    assert again.new_tokens == [("[zorb]", None)]
    results = []
    for item in (lora, again):
        manager = LoRAManager(stage_c, te)
        manager.add(item)
        manager.merge()
        results.append((_weights(stage_c, te), run(stage_c, te, "a [zorb] dog")))
        manager.unmerge()
    for k, v in results[0][0].items():
        torch.testing.assert_close(results[1][0][k], v, rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-5)
