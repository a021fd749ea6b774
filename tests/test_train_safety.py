"""Training safety and distributed correctness: checkpoints that cannot run code, damaged checkpoints, changed
configs on resume, unwritable output folders, FSDP2, and the device each piece of training state lands on."""

import json

import pytest
import torch

from stablecascade.errors import CheckpointError
from stablecascade.train import train
from stablecascade.train.config import ConfigError, from_dict
from stablecascade.train.trainer import Trainer
from test_train import _cfg


def test_fsdp2_two_processes_match_one(tmp_path, folder):
    """FSDP2 on gloo: the U-Net's blocks stay their own classes and project their condition keys/values inside
    their unit, so the sharded run trains and matches the single-process run (EMA, checkpoint and export too)."""
    from stablecascade import checkpoints
    from stablecascade.train.launch import spawn_local

    kw = dict(steps=3, batch_size=4, save_every=2, ema_beta=0.9)
    single = train(_cfg(tmp_path / "one", folder, **kw))
    reports = spawn_local(_cfg(tmp_path / "two", folder, use_fsdp=True, **kw).to_dict(), 2, tmp_path / "reports")
    assert [h["loss"] for h in reports[0]["history"]] == pytest.approx([h["loss"] for h in single.history], rel=1e-4)
    for k, v in single.trained.state_dict().items():
        torch.testing.assert_close(reports[0]["state"][k], v, rtol=1e-3, atol=1e-5)
        assert torch.equal(reports[0]["state"][k], reports[1]["state"][k]), k
    exported = checkpoints.load_official(tmp_path / "two" / "run" / "final" / "stage_c.safetensors").state_dict()
    ema = checkpoints.load_official(tmp_path / "two" / "run" / "final" / "stage_c_ema.safetensors").state_dict()
    for k, v in single.ema.state_dict().items():
        torch.testing.assert_close(ema[k], v, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(exported[k], reports[0]["state"][k], rtol=0, atol=0)


class _Payload:
    """Unpickling this creates `marker`: what a hostile state.pt could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("how", ["auto", "path"])
def test_a_pickled_state_is_never_loaded(tmp_path, folder, how):
    import pickle

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(pickle.dumps({"step": 2, "optimizer": _Payload(marker)}))
    (ckpt / "rng_rank0.pt").write_bytes(pickle.dumps(_Payload(marker)))
    (ckpt / "done").write_text("ok")
    cfg = _cfg(tmp_path, folder, resume="auto" if how == "auto" else str(ckpt))
    with pytest.raises(CheckpointError, match="older stablecascade.*pickle.*never read.*resume=never"):
        Trainer(cfg)
    assert not marker.exists()


def test_resume_falls_back_refuses_changes_and_keys_skips_by_file(tmp_path, folder):
    """Newest checkpoint damaged -> the previous one, said in the log; a changed config is refused with the list of
    differences unless allowed; unreadable images are remembered by file; log.jsonl holds each step once."""
    import logging
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):  # two batches of 4 need a whole pass over the data: the unreadable image is met
        shutil.copy(folder / f"{i}.png", data)
    (data / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    kw = dict(data=[str(data)], steps=2, save_every=1, keep_checkpoints=3, log_every=1, batch_size=4)
    first = train(_cfg(tmp_path, folder, **kw))
    assert first.sampler.skipped["unreadable"] == 1
    ckpts = tmp_path / "run" / "checkpoints"
    state = json.loads((ckpts / "step_0000002" / "state.json").read_text())
    assert str(data / "5.png") in json.dumps(state["tree"])  # the unreadable image, named by its file
    model = ckpts / "step_0000002" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])  # the newest checkpoint is damaged

    with pytest.raises(CheckpointError) as e:
        Trainer(_cfg(tmp_path, folder, **{**kw, "steps": 3, "lr": 5e-4, "batch_size": 2}))
    assert "batch_size: 4 -> 2" in str(e.value) and "lr: 0.001 -> 0.0005" in str(e.value)
    assert "resume_allow_changes=[batch_size, lr]" in str(e.value)

    (data / "0a.png").write_bytes((data / "0.png").read_bytes())  # sorts first: every later index shifts by one
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("stablecascade.train").addHandler(handler)
    try:
        resumed = Trainer(_cfg(tmp_path, folder, **{**kw, "steps": 3, "lr": 5e-4, "resume_allow_changes": ["lr"]}))
    finally:
        logging.getLogger("stablecascade.train").removeHandler(handler)
    assert resumed.step == 1
    assert any("step_0000002" in r.getMessage() and "damaged" in r.getMessage() for r in records)
    bad = [resumed.source.entries[i].source for i in resumed.sampler.bad]
    assert bad == [str(data / "5.png")]
    resumed.fit()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_unwritable_output_dir_is_refused_before_training(tmp_path, folder):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "run"):
        with pytest.raises(CheckpointError, match=f"output_dir {out} cannot be written.*--set output_dir"):
            Trainer(from_dict({**_cfg(tmp_path, folder).to_dict(), "output_dir": str(out)}).validate())


def test_a_full_disk_at_save_keeps_the_last_checkpoint(tmp_path, folder):
    """A write that fails at a checkpoint (here: a file size limit, as a full disk fails) stops with a clear
    error; the partial folder is removed, the earlier checkpoint stays, and rerunning resumes from it."""
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import resource, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_train import _cfg
from stablecascade.errors import CheckpointError
from stablecascade.train.trainer import Trainer
from pathlib import Path
cfg = _cfg(Path({str(tmp_path)!r}), Path({str(folder)!r}), steps=2, save_every=1)
trainer = Trainer(cfg)
trainer.train_step()
trainer.save_checkpoint()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
trainer.train_step()
try:
    trainer.save_checkpoint()
except CheckpointError as e:
    print("ERROR:", e)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
print("RESUMED AT", Trainer(cfg).step)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "ERROR: cannot write the checkpoint" in out.stdout, out.stdout + out.stderr
    assert "step_0000001" in out.stdout and "resumes from there" in out.stdout
    assert "RESUMED AT 1" in out.stdout
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_0000001"]


def test_image_size_must_fit_the_latent_grid(tmp_path, folder):
    with pytest.raises(ConfigError, match="image_size must be a multiple of 32.*got 50; e.g. 64"):
        _cfg(tmp_path, folder, image_size=50)


def test_data_patterns_absolute_globs_and_braces(tmp_path, folder):
    import tarfile

    from stablecascade.train.data import index_sources

    for n in range(3):
        with tarfile.open(tmp_path / f"shard-{n:03d}.tar", "w") as tar:
            tar.add(folder / f"{n}.png", arcname=f"{n:05d}.png")
            tar.add(folder / f"{n}.txt", arcname=f"{n:05d}.txt")
    assert len(index_sources([str(tmp_path / "shard-*.tar")])) == 3  # an absolute glob
    braces = index_sources([str(tmp_path / "shard-{000..001}.tar"), str(tmp_path / "shard-{002,002}.tar")])
    assert [e.source for e in braces] == [str(tmp_path / f"shard-{n:03d}.tar") for n in (0, 1, 2, 2)]
    with pytest.raises(FileNotFoundError, match="shard-003.tar"):
        index_sources([str(tmp_path / "shard-{002..003}.tar")])
    with pytest.raises(FileNotFoundError, match=r"pattern .*nothing-\*.tar matches no file"):
        index_sources([str(tmp_path / "nothing-*.tar")])
    with pytest.raises(ValueError, match=r"\{a\} is neither a range"):
        index_sources([str(tmp_path / "shard-{a}.tar")])

def test_cli_unwritable_output_dir_is_one_line_and_exit_2(tmp_path, folder, capsys):
    from stablecascade.train import cli_main

    (tmp_path / "file").write_text("")
    assert cli_main(["c", "--set", f"data={folder}", "--set", f"output_dir={tmp_path / 'file'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: output_dir {tmp_path / 'file'} cannot be written") and "Traceback" not in err


def test_effnet_controlnet_starts_from_imagenet_weights(tmp_path, folder, monkeypatch, caplog):
    """torchvision's ImageNet weights (here a seeded stand-in with the same keys, in torchvision's cache layout)
    initialise a new effnet-kind ControlNet's backbone; without them it says it starts random."""
    import logging

    from safetensors.torch import save_file
    from torchvision.models import EfficientNet_V2_S_Weights, efficientnet_v2_s

    from test_train import _random_stage_c

    stage_c = _random_stage_c(tmp_path / "c.safetensors")
    torch.manual_seed(5)
    imagenet = efficientnet_v2_s(weights=None).state_dict()
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(imagenet, cache / EfficientNet_V2_S_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cfg = _cfg(tmp_path, folder, "controlnet", stage_c=str(stage_c), controlnet_kind="canny")
    backbone = Trainer(cfg).trained.backbone.state_dict()
    assert backbone["0.0.weight"].shape[1] == 1  # a canny edge map: the stem conv alone stays random
    for k, v in backbone.items():
        assert torch.equal(v, imagenet[f"features.{k}"]) or k == "0.0.weight", k

    # an inpaint ControlNet (4-channel input) from a safetensors copy: all but its stem conv
    save_file({k: v.contiguous() for k, v in imagenet.items()}, str(tmp_path / "effnet.safetensors"))
    cfg = _cfg(tmp_path / "b", folder, "controlnet", stage_c=str(stage_c), controlnet_kind="inpaint",
               controlnet_bottleneck="effnet", controlnet_backbone_weights=str(tmp_path / "effnet.safetensors"))
    backbone = Trainer(cfg).trained.backbone.state_dict()
    assert backbone["0.0.weight"].shape[1] == 4
    assert all(torch.equal(v, imagenet[f"features.{k}"]) for k, v in backbone.items() if k != "0.0.weight")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with caplog.at_level(logging.WARNING, "stablecascade.train"):
        Trainer(_cfg(tmp_path / "c", folder, "controlnet", stage_c=str(stage_c), controlnet_kind="canny"))
    assert "starts from RANDOM weights" in caplog.text and "controlnet_backbone_weights" in caplog.text


class NoDeviceMixing(torch.overrides.TorchFunctionMode):
    """Fails any torch call whose tensor arguments (other than 0-dim ones, which torch lets mix) sit on more than
    one device: with the trainer on the `meta` device it finds, on a CPU, what would crash on a GPU. Explicit moves
    and copies are what moving between devices looks like, so they pass."""

    MOVES = {"to", "copy_", "cpu", "cuda", "set_", "_has_compatible_shallow_copy_type"}  # the last: inside Module.to

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in self.MOVES:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            devices = {t.device.type for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0}
            if len(devices) > 1:
                raise AssertionError(f"{getattr(func, '__name__', func)} mixes tensors on {sorted(devices)}")
        return func(*args, **kwargs)


def test_device_guard_catches_mixing():
    with NoDeviceMixing(), pytest.raises(AssertionError, match="mixes tensors on"):
        torch.ones(2, device="meta") + torch.ones(2)


def test_training_state_lands_on_the_trainers_device(tmp_path, folder):
    """On `meta` standing in for an accelerator: a checkpoint written on the CPU resumes with the weights, the EMA
    and the optimizer state on the trainer's device, the CLIP image encoder moves there, and nothing on the way
    mixes devices. (The transformers text encoder cannot run on `meta`, so the loss itself is not run here.)"""
    import oracle

    from stablecascade.conditioning import ImageEncoder

    kw = dict(steps=1, save_every=1, ema_beta=0.9)
    train(_cfg(tmp_path, folder, **kw))
    with NoDeviceMixing():
        trainer = Trainer(_cfg(tmp_path, folder, device="meta", **{**kw, "steps": 2}),
                          parts={"image_encoder": ImageEncoder(oracle.tiny_image_encoder())})
    assert trainer.step == 1
    assert {p.device.type for p in (*trainer.trained.parameters(), *trainer.ema.parameters())} == {"meta"}
    assert {t.device.type for s in trainer.optimizer.state.values() for t in s.values() if t.dim()} == {"meta"}
    assert trainer.image_encoder.model.device.type == "meta"


def test_the_image_encoder_loads_from_safetensors_only(tmp_path, folder):
    """The trainer reads its CLIP image encoder as the pipeline does: a folder's safetensors weights, never a pickle
    `.bin` (unpickling can run code)."""
    import oracle

    from stablecascade.errors import CheckpointError

    encoder = oracle.tiny_image_encoder()
    encoder.save_pretrained(tmp_path / "safe")
    encoder.config.save_pretrained(tmp_path / "pickled")
    torch.save(encoder.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    trainer = Trainer(_cfg(tmp_path, folder, image_encoder=str(tmp_path / "safe")))
    state = trainer.image_encoder.model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in encoder.state_dict().items())
    with pytest.raises(CheckpointError, match="could not load the CLIP image encoder"):
        Trainer(_cfg(tmp_path, folder, image_encoder=str(tmp_path / "pickled")))
