"""Training memory, data and logging: frozen models stored in bf16 or int8, glibc returning freed blocks, gradient
checkpointing for every task, 8-bit AdamW's message, LR schedules against diffusers', kohya folder repeats and tag
shuffling, automatic buckets, the DataLoader read-ahead keeping the checkpointed position exact, the latent/text
caches, TensorBoard logging."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from stablecascade.errors import InputError
from stablecascade.train import ConfigError, load_config
from stablecascade.train import cache as cache_mod
from stablecascade.train import data as data_mod
from stablecascade.train.config import from_dict
from stablecascade.train.trainer import Trainer, lr_factor
from conftest import training_image
from test_train import random_tiny_stage_c


@pytest.fixture(scope="module")
def text():
    """The tiny text encoder and tokenizer, built once (each trainer gets its own copy of the model)."""
    from stablecascade.train.text import clip_tokenizer, small_text_model

    return clip_tokenizer(), small_text_model()


def _parts(text, **kw):
    import copy

    return {"text": (text[0], copy.deepcopy(text[1])), **kw}


def _cfg(tmp_path, folder, task="c", **kw):
    base = dict(task=task, output_dir=str(tmp_path / "run"), data=[str(folder)], image_size=64, steps=2,
                batch_size=2, stage_c="new:tiny", effnet="nano", text_encoder="tiny", save_every=100,
                sample_steps=2, model_dropout=0.0, lr=1e-3, num_workers=0, caption_dropout=0.0)
    base.update(kw)
    return from_dict(base).validate()


# ------------------------------------------------------------------------------------------------- memory
def _count_block_calls(trainer):
    """Calls of one Linear inside the first down block during a training step: 2 when the block is recomputed."""
    block = trainer.stage_c.down_blocks[0][0]
    linear = next(m for m in block.modules() if isinstance(m, torch.nn.Linear))
    calls = []
    handle = linear.register_forward_hook(lambda *a: calls.append(1))
    trainer.train_step()
    handle.remove()
    return len(calls)


@pytest.mark.parametrize("task,extra", [("lora", {}), ("controlnet", {"controlnet_kind": "inpaint",
                                                                      "controlnet_bottleneck": "simple"})])
def test_gradient_checkpointing_applies_to_lora_and_controlnet(tmp_path, folder, text, task, extra):
    results = {}
    for ckpt in (False, True):
        cfg = _cfg(tmp_path / str(ckpt), folder, task, gradient_checkpointing=ckpt, **extra)
        trainer = Trainer(cfg, parts=_parts(text, stage_c=random_tiny_stage_c()))
        calls = _count_block_calls(trainer)
        results[ckpt] = (calls, [p.detach().clone() for p in trainer.trained.parameters() if p.requires_grad])
    assert results[True][0] == 2 * results[False][0]  # recomputed in the backward pass
    for a, b in zip(results[False][1], results[True][1]):  # ... to the same update
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _stored(model):
    """{dtype the weight matrices are held in} and {dtype of every other frozen tensor}."""
    from torch.nn.utils import parametrize

    from stablecascade.train.storage import weight_matrices

    matrices = weight_matrices(model)
    held = {(m.parametrizations[n].original if parametrize.is_parametrized(m, n) else getattr(m, n)).dtype
            for m, n in matrices}
    matrix_ids = {id(m.parametrizations[n].original if parametrize.is_parametrized(m, n) else getattr(m, n))
                  for m, n in matrices}
    rest = {p.dtype for p in model.parameters() if id(p) not in matrix_ids and not p.requires_grad}
    return held, rest


@pytest.mark.parametrize("frozen, dtype, held, rest", [("bf16", "bf16", torch.bfloat16, torch.bfloat16),
                                                       ("bf16", "fp32", torch.bfloat16, torch.float32),
                                                       ("int8", "fp32", torch.int8, torch.float32)])
def test_frozen_storage_trains_fp32_lora(tmp_path, folder, text, frozen, dtype, held, rest):
    records = {}
    for storage in ("fp32", frozen):
        cfg = _cfg(tmp_path / storage, folder, "lora", frozen_dtype=storage, dtype=dtype, steps=1)
        trainer = Trainer(cfg, parts=_parts(text, stage_c=random_tiny_stage_c()))
        start = [p.detach().clone() for p in trainer.trained.parameters() if p.requires_grad]
        records[storage] = trainer.train_step()
        records[storage + " layers"] = trainer.trained.targets
    assert records[frozen + " layers"] == records["fp32 layers"]  # stored weights take LoRAs like plain ones
    for model in (trainer.stage_c, trainer.text_model):
        assert _stored(model) == ({held}, {rest})
    trained = [p for p in trainer.trained.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert any(not torch.equal(a, b) for a, b in zip(start, trained))  # the LoRA trained on the stored base
    states = [s for s in trainer.optimizer.state.values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    ours = records[frozen]
    assert math.isfinite(ours["loss"]) and ours["grad_norm"] > 0
    assert ours["loss"] == pytest.approx(records["fp32"]["loss"], rel=0.05)


@pytest.mark.parametrize("frozen, read_as", [("bf16", torch.bfloat16), ("int8", torch.bfloat16)])
def test_frozen_stage_c_is_read_in_its_storage_dtype(tmp_path, folder, text, monkeypatch, frozen, read_as):
    """A LoRA run reads the Stage C file straight into bf16 (int8 is quantized from it), never into a float32
    copy first (the 3.6B model would need 14 GB for that)."""
    from stablecascade import checkpoints
    from stablecascade.train import trainer as trainer_mod

    path = tmp_path / "stage_c.safetensors"
    checkpoints.save_official(random_tiny_stage_c(), path)
    read = []
    load = checkpoints.load_component

    def spy(*args, **kw):
        model = load(*args, **kw)
        read.append({p.dtype for p in model.parameters()})
        return model

    monkeypatch.setattr(trainer_mod.checkpoints, "load_component", spy)
    cfg = _cfg(tmp_path, folder, "lora", stage_c=str(path), frozen_dtype=frozen, steps=1)
    Trainer(cfg, parts=_parts(text))
    assert read == [{read_as}]


def test_int8_storage_expands_to_the_quantized_weight_under_the_lora():
    from torch.nn.utils import parametrize

    from stablecascade.models.lora import LayerDelta, LoRAAdapter
    from stablecascade.train.storage import StoredWeight, store_frozen

    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, 16, generator=g) * torch.logspace(-3, 1, 8).view(8, 1))
    w = layer.weight.detach().clone()
    store_frozen(layer, "int8", torch.float32)
    q, scale = layer.parametrizations.weight.original, layer.parametrizations.weight[0].scale
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert ((layer.weight - w).abs() <= scale / 2 + 1e-7).all()  # within half a step of each row's grid
    up, down = torch.randn(8, 2, generator=g), torch.randn(2, 16, generator=g)
    delta = LayerDelta("stage_c", "", "weight", down, up, 0.5)
    adapter = LoRAAdapter([("l", delta)], {"l": 1.0}, "cpu", trainable=True)
    parametrize.register_parametrization(layer, "weight", adapter)
    assert [type(p) for p in layer.parametrizations.weight] == [StoredWeight, LoRAAdapter]
    torch.testing.assert_close(layer.weight, q.float() * scale + 0.5 * up @ down)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_cpu_training_returns_freed_weight_sized_blocks_to_the_system():
    """Allocating and freeing a 20 MiB tensor three times keeps ~40 MiB resident under glibc's default (its mmap
    threshold rises to the freed size, so later blocks come from the heap), and ~0 once the trainer's setting is on.
    In a fresh process, as the setting is process-wide."""
    script = textwrap.dedent("""
        import torch
        from pathlib import Path
        from stablecascade.train.storage import mmap_large_allocations
        def kept_mib():
            rss = lambda: next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines()
                               if l.startswith("VmRSS")) / 1024
            before = rss()
            for _ in range(3):
                block = torch.ones(5 << 20)
                del block
            return rss() - before
        off = kept_mib()
        assert mmap_large_allocations()
        print(off, kept_mib())
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env).stdout
    off, on = map(float, out.split())
    assert off > 15 and on < 5, (off, on)


def test_memory_options_are_checked():
    with pytest.raises(ConfigError, match="frozen_dtype"):
        load_config(None, ["frozen_dtype=int4"])
    with pytest.raises(ConfigError, match="contradicts dtype bf16"):
        load_config(None, ["frozen_dtype=fp16", "dtype=bf16"])
    with pytest.raises(ConfigError, match="cache_text works for tasks c and lcm"):
        load_config(None, ["cache_text=true"], task="lora")
    with pytest.raises(ConfigError, match="cache_latents works for Stage C tasks"):
        load_config(None, ["cache_latents=true"], task="controlnet")
    with pytest.raises(ConfigError, match=r"cannot be resized at random .* set effnet_resize: \[1.0, 1.0\]"):
        load_config(None, ["cache_latents=true"], task="b")


def test_adamw8bit_on_cpu_says_what_to_do(tmp_path, folder, text):
    with pytest.raises(InputError, match="adamw8bit needs a CUDA GPU.*optimizer: adamw"):
        Trainer(_cfg(tmp_path, folder, optimizer="adamw8bit"), parts=_parts(text))


# ------------------------------------------------------------------------------------------------- schedules
def test_lr_schedules_match_diffusers():
    from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    steps, warmup = 20, 5
    for schedule, make in (("cosine", lambda o: get_cosine_schedule_with_warmup(o, warmup, steps + 1)),
                           ("constant_with_warmup", lambda o: get_constant_schedule_with_warmup(o, warmup))):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        reference = make(opt)
        opt.step()
        reference.step()  # our update k uses diffusers' factor at k + 1: the first update already moves
        for k in range(steps):
            assert lr_factor(k, steps, warmup, schedule) == pytest.approx(opt.param_groups[0]["lr"]), (schedule, k)
            opt.step()
            reference.step()
    assert lr_factor(steps - 1, steps, warmup, "cosine") > 0
    assert lr_factor(0, 10, 0, "cosine") == 1.0 and math.isclose(lr_factor(9, 10, 0, "cosine"),
                                                                   0.5 * (1 + math.cos(math.pi * 9 / 10)))


# ------------------------------------------------------------------------------------------------- data
def test_kohya_folder_repeats(tmp_path):
    for sub, n in (("3_cat", 2), ("dog", 1), ("2_misc/nested", 1)):
        d = tmp_path / sub
        d.mkdir(parents=True)
        for i in range(n):
            training_image(i).save(d / f"{i}.png")
    entries = data_mod.index_sources([str(tmp_path)])
    by_folder = {}
    for e in entries:
        by_folder[e.source.split("/")[-2]] = by_folder.get(e.source.split("/")[-2], 0) + 1
    assert by_folder == {"3_cat": 6, "dog": 1, "nested": 2}
    assert len(data_mod.index_sources([str(tmp_path / "3_cat")])) == 6  # the folder given itself counts too


def test_tag_shuffling_keeps_the_first_tags():
    rule = data_mod.CaptionRule(shuffle=True, keep=2, seed=0)
    caption = "sks person, photo, " + ", ".join(f"tag{i}" for i in range(8))
    orders = set()
    for number in range(6):
        out = rule.apply(caption, number, 0)
        tags = out.split(", ")
        assert tags[:2] == ["sks person", "photo"] and sorted(tags[2:]) == sorted(f"tag{i}" for i in range(8))
        assert out == rule.apply(caption, number, 0)  # the same draw for the same batch and position
        orders.add(out)
    assert len(orders) > 1
    assert data_mod.CaptionRule().apply(caption, 3, 1) == caption


def test_automatic_buckets_from_the_data(tmp_path):
    for i, size in enumerate([(96, 48), (96, 48), (64, 64), (40, 80)]):
        training_image(i, size).save(tmp_path / f"{i}.png")
    source = data_mod.ImageSource(data_mod.index_sources([str(tmp_path)]))
    sizes = data_mod.auto_bucket_sizes(source, 256, 128, 512, factor=16)
    assert len(sizes) == 3  # one per aspect ratio in the data
    for h, w in sizes:
        assert h % 16 == 0 and w % 16 == 0 and 128 <= min(h, w) and max(h, w) <= 512 and 0.9 < h * w / 256**2 <= 1
    for i in range(len(source)):
        width, height = source.size(i)
        h, w = sizes[data_mod.nearest_bucket(sizes, width, height)]
        assert abs(w / h - width / height) < 0.1
    cfg = load_config(None, ["multi_aspect=auto", "bucket_min_size=32"])
    assert cfg.multi_aspect == ["auto"]
    with pytest.raises(ConfigError, match="bucket_min_size"):
        load_config(None, ["multi_aspect=auto", "bucket_min_size=1000"])


def test_loader_reads_ahead_but_checkpoints_what_was_consumed(folder):
    source = data_mod.ImageSource(data_mod.index_sources([str(folder)]))
    sizes = data_mod.bucket_sizes(64, [])
    rule = data_mod.CaptionRule(shuffle=True, seed=1)
    reference = data_mod.Sampler(source, 3, sizes, seed=5)
    sampler = data_mod.Sampler(source, 3, sizes, seed=5)
    loader = data_mod.Loader(sampler, data_mod.BatchReader(source, slice(0, 2), rule), workers=2, prefetch=2)
    for _ in range(5):  # crosses an epoch boundary (8 images, 3 per batch)
        item = next(loader)
        batch = next(reference)
        images, captions = data_mod.load_batch(source, batch, slice(0, 2), {}, rule)
        assert item.batch.indices == batch.indices and torch.equal(item.images, images) and item.captions == captions
        # the position is the consumed one, although the workers have planned further
        assert sampler.state_dict()["cursor"] == reference.state_dict()["cursor"]
        assert sampler.state_dict()["epoch"] == reference.state_dict()["epoch"]
    # moving the sampler from outside (a resume) restarts the read-ahead from there
    saved = reference.state_dict()
    expected = next(reference)
    sampler.load_state_dict(saved)
    assert next(loader).batch.indices == expected.indices
    loader.close()


# ------------------------------------------------------------------------------------------------- caches
def test_latent_and_text_caches_match_and_are_reused(tmp_path, folder, text):
    cache_dir = tmp_path / "cache"
    plain = Trainer(_cfg(tmp_path / "plain", folder, bucket_random_ratio=0.0), parts=_parts(text))
    cached = Trainer(_cfg(tmp_path / "cached", folder, cache_latents=True, cache_text=True,
                          cache_dir=str(cache_dir)), parts=_parts(text))
    for _ in range(2):
        a, b = plain.train_step(), cached.train_step()
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    cached.text_cache.cache.flush()
    shards = sorted(cache_dir.rglob("*.safetensors"))
    assert {p.parent.name.split("-")[0] for p in shards} == {"latents", "text"}
    # a new run with the same encoders reads the cache and encodes nothing
    effnet_calls = []
    again = _cfg(tmp_path / "again", folder, cache_latents=True, cache_text=True, cache_dir=str(cache_dir))
    trainer = Trainer(again, parts=_parts(text, effnet=_counting_effnet(effnet_calls)))
    trainer.text_cache.encode_fn = lambda prompts: pytest.fail(f"encoded {prompts} again")
    trainer.train_step()
    assert effnet_calls == [] and sorted(cache_dir.rglob("*.safetensors")) == shards


def test_stage_b_caches_both_latents_and_trains_as_without(tmp_path, folder, text):
    """Task b caches each image's Stage A latent and the Stage C latent it is conditioned on, and the captions'
    text embeddings: the same loss as encoding every batch, and a second run reads them all from the cache without
    running an encoder."""
    cache_dir = tmp_path / "cache"
    stage_b = dict(stage_c=None, stage_b="new:tiny", stage_a="new:tiny", effnet_resize=[1.0, 1.0],
                   bucket_random_ratio=0.0)
    plain = Trainer(_cfg(tmp_path / "plain", folder, task="b", **stage_b), parts=_parts(text))
    cached = Trainer(_cfg(tmp_path / "cached", folder, task="b", cache_latents=True, cache_text=True,
                          cache_dir=str(cache_dir), **stage_b), parts=_parts(text, stage_a=plain.stage_a))
    for _ in range(2):
        a, b = plain.train_step(), cached.train_step()
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    cached.text_cache.cache.flush()
    shards = sorted(cache_dir.rglob("*.safetensors"))
    latents = cache_mod.DiskCache(next(p.parent for p in shards if p.parent.name.startswith("latents")))
    assert {key.rsplit(".", 1)[1] for key in latents.where} == {"latent", "effnet"} and len(latents.where) == 2 * 8
    effnet_calls = []
    again = _cfg(tmp_path / "again", folder, task="b", cache_latents=True, cache_text=True, cache_dir=str(cache_dir),
                 **stage_b)
    trainer = Trainer(again, parts=_parts(text, stage_a=plain.stage_a, effnet=_counting_effnet(effnet_calls)))
    trainer.stage_a.encode = lambda images: pytest.fail("Stage A encoded again")
    trainer.text_cache.encode_fn = lambda prompts: pytest.fail(f"encoded {prompts} again")
    trainer.train_step()
    assert effnet_calls == [] and sorted(cache_dir.rglob("*.safetensors")) == shards


def _counting_effnet(calls):
    from stablecascade.train.trainer import load_effnet

    effnet = load_effnet("nano")
    forward = effnet.forward

    def counted(x):
        calls.append(x.shape)
        return forward(x)

    effnet.forward = counted
    return effnet


def test_a_different_encoder_gets_its_own_cache(tmp_path):
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    assert cache_mod.fingerprint(a) != cache_mod.fingerprint(b)
    assert cache_mod.fingerprint(a, "bf16") != cache_mod.fingerprint(a, "fp32")
    store = cache_mod.DiskCache(tmp_path)
    store.put("k", torch.arange(3.0))
    store.flush()
    assert torch.equal(cache_mod.DiskCache(tmp_path).get("k"), torch.arange(3.0))
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_cache_keeps_a_bounded_number_of_shards_open_and_pickles_without_them(tmp_path, monkeypatch):
    import pickle

    monkeypatch.setattr(cache_mod, "SHARD_ENTRIES", 1)
    monkeypatch.setattr(cache_mod, "OPEN_SHARDS", 2)
    store = cache_mod.DiskCache(tmp_path)
    for i in range(4):
        store.put(f"k{i}", torch.full((2,), float(i)))
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    for _ in range(2):
        for i in range(4):
            assert torch.equal(store.get(f"k{i}"), torch.full((2,), float(i)))
            assert len(store.readers) <= 2
    copy = pickle.loads(pickle.dumps(store))  # a DataLoader worker's copy opens its own readers
    assert not copy.readers and torch.equal(copy.get("k3"), torch.full((2,), 3.0))


# ------------------------------------------------------------------------------------------------- logging
def test_tensorboard_logs_loss_lr_grad_norm_and_samples(tmp_path, folder, text):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from stablecascade.train import train

    cfg = _cfg(tmp_path, folder, steps=3, log_every=1, log_with="tensorboard", lr_schedule="cosine",
               warmup_steps=2)
    trainer = train(cfg, parts=_parts(text))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss/raw", "loss/smoothed", "lr", "grad_norm"} <= set(tags["scalars"])
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([h["lr"] for h in trainer.history])
    assert [e.value for e in events.Scalars("grad_norm")] == pytest.approx([h["grad_norm"] for h in trainer.history])
    assert events.Scalars("loss/smoothed")[0].value == pytest.approx(trainer.history[0]["loss"])
    assert "samples" in tags["images"]
