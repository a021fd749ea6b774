"""Training: config system, data (folders, tar shards, buckets, corrupt files), loss goes down on tiny models,
exact resume, LoRA/ControlNet outputs, and a 2-process gloo run that matches the single-process run."""

import io
import tarfile

import numpy as np
import pytest
import torch

from stablecascade import checkpoints, configs
from stablecascade.cli import main as stablecascade_cli
from stablecascade.models import StageC
from stablecascade.train import ConfigError, cli_main, load_config, train
from stablecascade.train import data as data_mod
from stablecascade.train.config import from_dict
from stablecascade.train.trainer import Trainer
from conftest import training_image


def _cfg(tmp_path, folder, task="c", **kw):
    base = dict(task=task, output_dir=str(tmp_path / "run"), data=[str(folder)], image_size=64, steps=4,
                batch_size=4, stage_c="new:tiny", stage_b="new:tiny", stage_a="new:tiny", effnet="nano",
                text_encoder="tiny", save_every=100, sample_steps=2, model_dropout=0.0, lr=1e-3,
                compression=32)  # 2x2 latents for 64 px: fast (the built-in nano encoder's own is 8)
    base.update(kw)
    return from_dict(base).validate()


# ------------------------------------------------------------------------------------------------- config
def test_config_rejects_unknown_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 1e-4\nbatch_sise: 8\n")
    with pytest.raises(ConfigError, match=r"unknown training config key 'batch_sise'.*did you mean batch_size"):
        load_config(f)
    with pytest.raises(ConfigError, match="unknown training config key 'learning_rate'"):
        load_config(None, ["learning_rate=3"])
    with pytest.raises(ConfigError, match="steps must be an integer"):
        load_config(None, ["steps=many"])
    with pytest.raises(ConfigError, match="target"):
        load_config(None, ["target=x0"])
    assert cli_main(["c", "--config", str(f)]) == 2
    assert stablecascade_cli(["train", "c", "--config", str(f)]) == 2  # the same through `stablecascade train`


def test_config_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 1e-4\nsteps: 10\ndata: [a, b]\nema_beta: 0.999\n")
    cfg = load_config(f, ["lr=3e-4", "ema_beta=null", "multi_aspect=['16/9', 1/1]"], task="b")
    assert cfg.lr == 3e-4 and cfg.steps == 10 and cfg.data == ["a", "b"] and cfg.ema_beta is None
    assert cfg.task == "b" and cfg.multi_aspect == ["16/9", "1/1"]


def test_compression_sets_the_stage_c_latent_size(tmp_path, folder, monkeypatch):
    """The effnet sees each image at 32 px per latent cell of `compression`; with the built-in nano encoder and no
    compression given, the one nano's model.json records, so a LoRA on nano trains on the latents it samples."""
    import json
    import shutil

    from stablecascade import loading

    images = torch.rand(2, 3, 64, 64)
    with pytest.raises(ConfigError, match="compression must be a number from 8 to 128"):
        _cfg(tmp_path, folder, compression=4)
    assert Trainer(_cfg(tmp_path, folder, compression=16))._encode_c(images).shape == (2, 16, 4, 4)
    assert Trainer(_cfg(tmp_path, folder, compression=None))._encode_c(images).shape == (2, 16, 4, 4)  # nano's 16
    bundle = tmp_path / "nano"
    shutil.copytree(loading.NANO_DIR, bundle)
    manifest = json.loads((bundle / "model.json").read_text())
    (bundle / "model.json").write_text(json.dumps({**manifest, "compression": 32}))
    monkeypatch.setattr(loading, "NANO_DIR", bundle)
    trainer = Trainer(_cfg(tmp_path, folder, compression=None))
    assert trainer._encode_c(images).shape == (2, 16, 2, 2)
    assert trainer.sample_c(["a"], 64, torch.Generator().manual_seed(0), steps=1).shape[-2:] == (2, 2)
    assert loading.load_pipeline("nano", "nano").compression == 32  # and the pipeline samples at it


def test_target_defaults_to_what_the_model_records(tmp_path, folder, caplog):
    """Finetuning a v model trains v unless the config says otherwise (and then the log says so); the built-in
    nano's model.json says what its stages predict."""
    import json

    from stablecascade.loading import NANO_DIR
    from stablecascade.train.trainer import recorded_settings

    manifest = json.loads((NANO_DIR / "model.json").read_text())
    assert [recorded_settings("nano", k) for k in ("stage_c", "stage_b")] == \
        [{"prediction": p, "shift": s} for p, s in zip(manifest["predictions"], manifest["shifts"])]
    assert recorded_settings("new:tiny", "stage_c") == {}
    Trainer(_cfg(tmp_path, folder, target="v", steps=1)).fit(progress=False)
    path = str(tmp_path / "run" / "final" / "stage_c.safetensors")
    assert recorded_settings(path, "stage_c") == {"prediction": "v", "shift": 2.0}
    assert Trainer(_cfg(tmp_path / "default", folder, stage_c=path, target=None)).target == "v"
    with caplog.at_level("WARNING", logger="stablecascade.train"):
        assert Trainer(_cfg(tmp_path / "eps", folder, stage_c=path, target="eps")).target == "eps"
    assert "stage_c predicts v (its file says so) but target is eps" in caplog.text


# ------------------------------------------------------------------------------------------------- data
def test_buckets_match_the_official_sizes():
    sizes = data_mod.bucket_sizes(768, ["1/1", "1/2", "2/3", "3/4", "9/16"])
    assert (768, 768) in sizes and (1056, 512) in sizes and (928, 608) in sizes and (864, 640) in sizes
    assert (1024, 576) in sizes and (576, 1024) in sizes  # reciprocals are added


def test_tar_shards_buckets_and_corrupt_images(tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        def add(name, payload):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for i, size in enumerate([(96, 48), (48, 96), (64, 64), (96, 48), (48, 96), (64, 64)]):
            buf = io.BytesIO()
            training_image(i, size).save(buf, format="PNG")
            add(f"{i:05d}.png", buf.getvalue())
            add(f"{i:05d}.txt", f"caption {i}".encode())
        add("bad.png", b"\x89PNG\r\n\x1a\n garbage")
        add("bad.txt", b"broken")
    source = data_mod.ImageSource(data_mod.index_sources([str(shard)]))
    assert len(source) == 7 and source.caption(0) == "caption 0"
    sizes = data_mod.bucket_sizes(64, ["2/1"], factor=16)
    sampler = data_mod.Sampler(source, 2, sizes, seed=0, random_ratio=0.0)
    seen = []
    for _ in range(4):
        batch = next(sampler)
        images, caps = data_mod.load_batch(source, batch, slice(None), sampler.skipped)
        assert images.shape[-2:] == batch.size and len(caps) == 2
        for i in batch.indices:  # every image went to the bucket of its own aspect
            w, h = source.size(i)
            assert (w > h) == (batch.size[1] > batch.size[0]) or w == h
        seen += batch.indices
    assert sampler.skipped["unreadable"] == 1
    assert 6 not in seen
    # the position is exactly restorable
    state = sampler.state_dict()
    nxt = next(sampler)
    sampler2 = data_mod.Sampler(source, 2, sizes, seed=0, random_ratio=0.0)
    sampler2.load_state_dict(state)
    again = next(sampler2)
    assert again.indices == nxt.indices and torch.equal(again.crops, nxt.crops)


# ------------------------------------------------------------------------------------------------- training
def _fixed_batch_loss(trainer):
    """The loss on the first global batch with fixed noise and timesteps (training state untouched)."""
    gen_state, sampler_state = trainer.gen.get_state(), trainer.sampler.state_dict()
    trainer.gen.manual_seed(1234)
    trainer.sampler.load_state_dict({**sampler_state, "epoch": 0, "cursor": 0,
                                     "pending": {k: [] for k in sampler_state["pending"]}})
    batch = next(trainer.sampler)
    images, captions = data_mod.load_batch(trainer.source, batch, slice(None), {})
    trainer.trained.eval()
    with torch.no_grad():
        _, raw, _ = trainer._loss(images, captions)
    trainer.trained.train()
    trainer.gen.set_state(gen_state)
    trainer.sampler.load_state_dict(sampler_state)
    return float(raw.mean())


@pytest.mark.parametrize("task,extra", [("c", {}), ("c", {"target": "v"}), ("b", {})])
def test_training_lowers_the_loss(tmp_path, folder, task, extra):
    # 30 steps: with the nano encoder of 2026-11-30 20 lowered Stage C's loss by 9 %, at the edge of the 10 % asked
    cfg = _cfg(tmp_path, folder, task, steps=30, lr=3e-3, caption_dropout=0.0, loss_weight="constant", **extra)
    trainer = Trainer(cfg)
    before = _fixed_batch_loss(trainer)
    trainer.fit()
    after = _fixed_batch_loss(trainer)
    assert after < 0.9 * before, (before, after)
    out = tmp_path / "run" / "final" / f"stage_{task}.safetensors"
    model = checkpoints.load_official(out)  # the pipeline can load what was trained
    assert torch.equal(next(iter(model.state_dict().values())), next(iter(trainer.trained.state_dict().values())))
    assert list((tmp_path / "run" / "samples").glob("*.png"))


@pytest.mark.parametrize("task", ["c", "c cached", "lcm", "lcm of stage b"])
def test_resume_is_exact(tmp_path, folder, task):
    kw = dict(task=task.split()[0], steps=4, ema_beta=0.9, grad_accum_steps=2, save_every=2, model_dropout=0.1,
              warmup_steps=3, multi_aspect=["1/1", "2/1"], bucket_random_ratio=0.5)
    if task == "c cached":  # the nano recipe's Stage C: inputs from the training caches, the EMA starting late
        kw.update(cache_latents=True, cache_text=True, ema_start=3, multi_aspect=[])
    if task == "lcm":  # a LoRA student on a Stage C whose output is not zero-initialised (its grads would be zero)
        kw.update(stage_c=str(_random_stage_c(tmp_path / "c.safetensors")), lcm_skip=250)
    if task == "lcm of stage b":  # a full-weight student of Stage B, on square images (a 64x32 one is too small)
        kw.update(lcm_stage="b", lcm_student="full", lcm_skip=250, multi_aspect=[])
    full = train(_cfg(tmp_path / "a", folder, **kw))
    _cfg_half = _cfg(tmp_path / "b", folder, **{**kw, "steps": 2})
    train(_cfg_half)
    resumed = train(_cfg(tmp_path / "b", folder, **kw))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for (k, a), b in zip(full.trained.state_dict().items(), resumed.trained.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(full.loss_weight.losses, resumed.loss_weight.losses)
    assert (tmp_path / "b" / "run" / "cache").is_dir() == (task == "c cached")


def random_tiny_stage_c() -> StageC:
    """A tiny Stage C with seeded weights large enough for LoRA updates to show."""
    torch.manual_seed(3)
    model = StageC(configs.STAGE_C["tiny"])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _random_stage_c(path):
    checkpoints.save_official(random_tiny_stage_c(), path)
    return path


def test_lora_with_a_new_token(tmp_path, folder):
    from stablecascade.lora_formats import read_lora

    stage_c = _random_stage_c(tmp_path / "c.safetensors")
    concept = tmp_path / "concept"
    concept.mkdir()
    for i in range(4):
        training_image(i).save(concept / f"{i}.png")
        (concept / f"{i}.txt").write_text("a [pic] on a wall")
    cfg = _cfg(tmp_path, concept, "lora", stage_c=str(stage_c), steps=3, lr=1e-2, caption_dropout=0.0,
               train_tokens=[["[pic]", "^picture</w>"]])
    trainer = train(cfg)
    path = tmp_path / "run" / "final" / "lora.safetensors"
    assert path.is_file() and trainer.history[-1]["grad_norm"] > 0
    from transformers import CLIPTextModelWithProjection  # noqa: F401 - the text encoder kind the LoRA refers to

    from stablecascade.train.text import clip_tokenizer, small_text_model
    from stablecascade.conditioning import TextEncoder

    base = checkpoints.load_official(stage_c)
    lora = read_lora(path, base, TextEncoder(clip_tokenizer(), small_text_model()))
    assert len(lora.layers) == len(trainer.trained.targets) and lora.new_tokens == [("[pic]", "^picture</w>")]
    assert lora.tokens[0].vector.abs().sum() > 0


def test_controlnet_training(tmp_path, folder):
    stage_c = _random_stage_c(tmp_path / "c.safetensors")
    cfg = _cfg(tmp_path, folder, "controlnet", stage_c=str(stage_c), steps=2, controlnet_kind="inpaint",
               controlnet_bottleneck="simple", loss_weight="p2")
    trainer = train(cfg)
    assert trainer.history[-1]["grad_norm"] > 0
    cnet = checkpoints.load_controlnet(tmp_path / "run" / "final" / "controlnet.safetensors")
    assert cnet.config.c_in == 4


def test_two_processes_match_one(tmp_path, folder):
    """DDP on gloo: both ranks hold the same weights, and the loss curve equals the single-process run."""
    from stablecascade.train.launch import spawn_local

    kw = dict(steps=3, batch_size=4, loss_weight="adaptive", save_every=2)
    single = train(_cfg(tmp_path / "one", folder, **kw))
    reports = spawn_local(_cfg(tmp_path / "two", folder, **kw).to_dict(), 2, tmp_path / "reports")
    for k, v in reports[0]["state"].items():
        assert torch.equal(v, reports[1]["state"][k]), k
    one = [h["loss"] for h in single.history]
    two = [h["loss"] for h in reports[0]["history"]]
    assert two == pytest.approx(one, rel=1e-4, abs=1e-6)
    for k, v in single.trained.state_dict().items():
        torch.testing.assert_close(reports[0]["state"][k], v, rtol=1e-3, atol=1e-5)


def test_shipped_recipes_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_shape_dataset_and_detector_agree(tmp_path):
    """The evaluation's detector reads back what the generator drew (for every combination kind), and still does
    when the picture is blurred by one or two pixels: a decoder's soft edges and blunted corners must not turn a
    triangle into a circle."""
    import random
    import sys
    from pathlib import Path

    from PIL import ImageFilter

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from eval_nano import analyse
    from make_shapes import COLOURS, POSITIONS, SHAPES, draw, generate, heldout

    rng = random.Random(0)
    for shape in SHAPES:
        for position in POSITIONS:
            colour = rng.choice(list(COLOURS))
            background = rng.choice([c for c in COLOURS if c != colour])
            picture = draw(colour, shape, position, background, 64, jitter=1.0, rng=rng)
            truth = {"colour": colour, "shape": shape, "position": position, "background": background}
            assert analyse(np.asarray(picture)) == truth
            for radius in (1.0, 2.0):  # the former detector (fill of the bounding box) read no triangle at 2
                assert analyse(np.asarray(picture.filter(ImageFilter.GaussianBlur(radius)))) == truth, (truth, radius)
    made = generate(tmp_path, 10)
    assert not {m[:3] for m in made} & heldout()
    assert (tmp_path / "000000.txt").read_text().startswith("a ")


def test_v_model_round_trip_through_the_pipeline(tmp_path, folder, tiny, small_parts):
    """Train a v-prediction Stage C for 2 steps, export it, load it in the pipeline: it is sampled as v (what its
    file records), which equals an ε sampler driven by a hand-written v -> ε conversion."""
    import math
    import warnings

    from stablecascade import load_pipeline, sampling

    train(_cfg(tmp_path, folder, steps=2, target="v"))
    exported = tmp_path / "run" / "final" / "stage_c.safetensors"
    assert sampling.read_model_metadata(exported) == {"prediction": "v", "shift": 2.0}
    pipe = load_pipeline({"stage_c": exported, "text_encoder": tiny.prior / "text_encoder",
                          "tokenizer": tiny.prior / "tokenizer"}, tiny.decoder, device="cpu", dtype=torch.float32,
                         effnet=small_parts.effnet, previewer=small_parts.previewer)
    assert pipe.predictions == ("v", "eps") and pipe.official_shifts == (2.0, 1.0)
    events = []
    pipe("a picture", seed=3, width=64, height=64, prior_steps=3, decoder_steps=1, progress=False, output_type="pt",
         step_callback=events.append)
    got = [e.x0 for e in events if e.stage == "prior"][-1]

    text, pooled = pipe.text_encoder(["a picture"])
    neg_text, neg_pooled = pipe.text_encoder([""])
    no_img = torch.zeros(1, 1, pipe.stage_c.config.c_clip_img)
    guided = sampling.GuidedDenoiser(pipe.stage_c, dict(clip_text=text, clip_text_pooled=pooled, clip_img=no_img),
                                     dict(clip_text=neg_text, clip_text_pooled=neg_pooled, clip_img=no_img), 4.0, 0.7)

    def eps_from_v(x, r):
        v = guided(x, r)
        var = torch.cos((r + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
        a, b = var.clamp(1e-4, 0.9999).sqrt().view(-1, 1, 1, 1), (1 - var.clamp(1e-4, 0.9999)).sqrt().view(-1, 1, 1, 1)
        return b * x + a * v  # ε = b·x + a·v for x = a·x0 + b·ε, v = a·ε − b·x0

    g = torch.Generator().manual_seed(3)
    x = torch.randn(got.shape, generator=g)
    want = sampling.sample(eps_from_v, x, 3, shift=2.0, generator=g)
    assert (got - want).abs().max() / want.abs().max() <= 1e-4
    g = torch.Generator().manual_seed(3)
    as_eps = sampling.sample(guided, torch.randn(got.shape, generator=g), 3, shift=2.0, generator=g)
    assert (got - as_eps).abs().max() / want.abs().max() > 1e-2  # reading v as ε would be visibly wrong

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            pipe("a picture", seed=3, width=64, height=64, prior_steps=1, decoder_steps=1, progress=False,
                 sampling="diffusers", output_type="pt")
    assert sum("made for schedule shifts (2.0, 1.0)" in str(w.message) for w in caught) == 1
