"""LoRA training: the shipped nano model trains (fp32 and bf16), layer sets and the export format decided before
training, factors and token rows built on the weights' device, token learning rate, EMA export, a LoRA trained
here loads in the pipeline's LoRA manager with the same effect, and the nano token example moves its effect."""

import copy
import functools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stablecascade.conditioning import TextEncoder
from stablecascade.lora_formats import read_lora
from stablecascade.models.lora import LoRAManager, official_layer_order
from stablecascade.loading import NANO_DIR
from stablecascade.train import train
from stablecascade.train.config import ConfigError, from_dict
from stablecascade.train.text import clip_tokenizer, small_text_model
from stablecascade.train.trainer import LoRAModel, Trainer, load_effnet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from nano_token import make_data  # noqa: E402
from test_train import random_tiny_stage_c  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("zorb")
    make_data(root, 32)
    return root


def _cfg(tmp_path, data, **kw):
    base = dict(task="lora", output_dir=str(tmp_path / "run"), data=[str(data)], image_size=64, steps=2, batch_size=2,
                stage_c="nano", effnet="nano", text_encoder="nano", save_every=100, sample_steps=2, lr=1e-3,
                resume="never")
    base.update(kw)
    return from_dict(base).validate()


# ------------------------------------------------------------------------------------------- the nano model
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_shipped_nano_model_trains(tmp_path, token_data, dtype):
    """Its text encoder is stored in float16: loading it without a dtype made every step fail."""
    trainer = Trainer(_cfg(tmp_path, token_data, dtype=dtype, train_tokens=[["[zorb]", None]]))
    assert trainer.text_model.dtype == torch.float32
    record = trainer.train_step()
    assert np.isfinite(record["loss"]) and record["grad_norm"] > 0


def test_effnet_nano_is_the_shipped_trained_encoder():
    shipped = load_file(str(NANO_DIR / "nano_encoder.safetensors"))
    encoder = load_effnet("nano")
    assert all(torch.equal(encoder.state_dict()[k], v.float()) for k, v in shipped.items())


# ------------------------------------------------------------------------------------- layers and formats
@functools.lru_cache(maxsize=1)
def _tokenizer():
    return clip_tokenizer()


@functools.lru_cache(maxsize=1)
def _text_model():
    return small_text_model()


def _lora_model(stage_c=None, te=None, **kw):
    """A LoRAModel on a tiny Stage C and text encoder (the shared tokenizer: only pass new tokens with a copy)."""
    stage_c = stage_c if stage_c is not None else random_tiny_stage_c()
    tokenizer, text_model = te if te is not None else (_tokenizer(), copy.deepcopy(_text_model()))
    cfg = from_dict({"task": "lora", **kw}).validate()
    return LoRAModel(stage_c, text_model, tokenizer, cfg)


def test_layer_sets_and_the_export_format_are_decided_before_training():
    attention = _lora_model()
    assert attention.export_format == "official"
    assert len(attention.targets) == len(official_layer_order(attention.stage_c))
    everything = _lora_model(lora_layers="all", lora_text_layers="attention")
    names = [module for _, module, _ in everything.targets]
    for kind in (".mapper", ".mapper_crp", ".kv_mapper.1", "clip_txt_mapper", ".channelwise.0", "embedding.1",
                 "clf.1", ".self_attn.q_proj"):
        assert any(name.endswith(kind) for name in names), kind
    assert not any("depthwise" in module for _, module, _ in everything.targets)
    assert everything.export_format == "kohya"
    assert _lora_model(lora_layers="attention_ff").export_format == "kohya"
    chosen = _lora_model(lora_layers=[r"down_blocks\.0\..*\.attn$"]).targets  # a list of regular expressions
    assert chosen and all(m.startswith("down_blocks.0.") and p == "in_proj_weight" for _, m, p in chosen)
    with pytest.raises(ConfigError, match="lora_format: official.*kohya"):
        _lora_model(lora_layers="all", lora_format="official")
    with pytest.raises(ConfigError, match="existing vocabulary rows"):
        _lora_model(lora_layers="all", train_tokens=[["^dog</w>", None]])
    with pytest.raises(ConfigError, match="lora_layers"):
        from_dict({"task": "lora", "lora_layers": "everything"}).validate()


def test_factors_and_token_rows_are_built_on_the_weights_device():
    """Stage C on another device than the CPU (here `meta`): nothing the LoRA adds may stay on the CPU."""
    stage_c, text_model = random_tiny_stage_c().to("meta"), copy.deepcopy(_text_model()).to("meta")
    model = _lora_model(stage_c, (copy.deepcopy(_tokenizer()), text_model), lora_layers="all", lora_text_layers="all",
                        train_tokens=[["[new]", "^dog</w>"], ["[blank]", None]])
    tensors = [*model.parameters(), *model.buffers(), *model.init_rows.values(),
               text_model.get_input_embeddings().weight]
    assert tensors and all(t.device.type == "meta" for t in tensors)


def test_train_tokens_matching_nothing_are_refused_clearly():
    with pytest.raises(ConfigError, match="'\\^zzzq</w>' matches no vocabulary token"):
        _lora_model(train_tokens=[["^zzzq</w>", None]])
    with pytest.raises(ConfigError, match="init regex '\\^zzzq</w>' of '\\[new\\]' matches no vocabulary token"):
        _lora_model(train_tokens=[["[new]", "^zzzq</w>"]])


# ------------------------------------------------------------------------------------------- a whole run
def test_trained_lora_loads_with_the_same_effect_and_ema_is_exported(tmp_path, token_data):
    """All layers + text-encoder attention + a new token, kohya format: what the pipeline's LoRA manager applies
    from the file is what training computed; ema_beta also writes lora_ema.safetensors; the token rows learn at
    token_lr."""
    cfg = _cfg(tmp_path, token_data, stage_c="new:tiny", effnet="nano", text_encoder="tiny", steps=2, lr=1e-2,
               token_lr=0.1, warmup_steps=0, lora_layers="all", lora_text_layers="attention", caption_dropout=0.0,
               train_tokens=[["[zorb]", "^yellow</w>"]], ema_beta=0.5)
    trainer = train(cfg)
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-2, pytest.approx(0.1)]
    final = tmp_path / "run" / "final"
    assert (final / "lora.safetensors").is_file() and (final / "lora_ema.safetensors").is_file()
    plain, ema = load_file(str(final / "lora.safetensors")), load_file(str(final / "lora_ema.safetensors"))
    assert plain.keys() == ema.keys() and any(not torch.equal(plain[k], ema[k]) for k in plain)

    base = trainer.stage_c  # parametrized by the trained LoRA: compute the reference through it
    x, r = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5])
    img = torch.zeros(1, 1, base.config.c_clip_img)
    prompt = ["a [zorb] circle in the centre on a black background"]
    with torch.no_grad():
        trained_out = trainer.trained.eval()(x, r, prompt, img)

    stage_c, text_model = build_base(trainer)
    te = TextEncoder(clip_tokenizer(), text_model)
    lora = read_lora(final / "lora.safetensors", stage_c, te)
    assert lora.format.endswith("kohya") and lora.new_tokens == [("[zorb]", None)]
    manager = LoRAManager(stage_c, te)
    manager.add(lora)
    manager.apply("adapter")
    with torch.no_grad():
        text, pooled = te(prompt)
        loaded_out = stage_c(x, r, clip_text=text, clip_text_pooled=pooled, clip_img=img)
    torch.testing.assert_close(loaded_out, trained_out, rtol=1e-4, atol=1e-5)


def build_base(trainer):
    """Fresh copies of the trainer's frozen base models, without its LoRA parametrizations."""
    from torch.nn.utils import parametrize

    stage_c, text_model = copy.deepcopy(trainer.stage_c), copy.deepcopy(trainer.text_model)
    for model in (stage_c, text_model):
        for m in list(model.modules()):
            for name in list(getattr(m, "parametrizations", {}) or {}):
                parametrize.remove_parametrizations(m, name, leave_parametrized=False)
    emb = text_model.get_input_embeddings()
    text_model.set_input_embeddings(torch.nn.Embedding.from_pretrained(emb.weight[: trainer.trained.base_vocab],
                                                                       padding_idx=emb.padding_idx))
    return stage_c, text_model


def test_nano_token_example_moves_the_colour_share(tmp_path, token_data):
    """The README's example, briefly: a few steps teaching "[zorb]" = yellow already raise the share of yellow
    shapes for "[zorb]" prompts (detected by the nano evaluation's analyser)."""
    import stablecascade
    from nano_token import COLOUR, TOKEN, colour_share, prompts

    cfg = _cfg(tmp_path, token_data, steps=60, batch_size=8, lora_layers=None, token_lr=0.1, warmup_steps=0,
               caption_dropout=0.0, train_tokens=[[TOKEN, None]])
    trainer = Trainer(cfg)
    for _ in range(cfg.steps):
        trainer.train_step()
    path = trainer.trained.save(tmp_path / "zorb.safetensors")
    pipe = stablecascade.load_pipeline("nano", "nano", device="cpu", dtype=torch.float32)
    texts = prompts(8, TOKEN, COLOUR)
    without = colour_share(pipe, texts, COLOUR)
    pipe.load_lora(path)
    with_lora = colour_share(pipe, texts, COLOUR)
    assert with_lora >= without + 0.25, (without, with_lora)
