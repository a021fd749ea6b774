"""`stablecascade batch`: prompt files, per-row seeds, grouping, torchrun, resume, bad rows, Ctrl-C, webdataset
shards that webdataset and our trainer read. Runs the built-in nano model at 64 px with two steps per stage."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stablecascade import batch, cli
from stablecascade.errors import InputError
from stablecascade.images import read_parameters

PROMPTS = ["a red circle at the top left on a blue background", "a green square at the bottom right on a white "
           "background", "a yellow triangle in the centre on a black background", "a blue circle at the top right "
           "on a red background", "a white square at the bottom left on a green background"]
FAST = ["--steps", "2", "--decoder-steps", "2", "--device", "cpu", "--dtype", "fp32"]
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def nano():
    """The nano pipeline, loaded once; the commands below get it instead of loading their own."""
    return cli._load(cli.build_parser().parse_args(["generate", "x", *FAST]))


class Recorder(list):
    """The seeds of every pipeline call; `before` runs at the start of each call."""

    before = None


@pytest.fixture
def calls(monkeypatch, nano):
    """Run `batch` in this process with the shared pipeline, recording its calls."""
    made = Recorder()

    class Recording:
        def __getattr__(self, name):
            return getattr(nano, name)

        def __call__(self, *args, **kwargs):
            made.append(kwargs["seed"])
            if made.before is not None:
                made.before()
            return nano(*args, **kwargs)

    monkeypatch.setattr(cli, "_load", lambda args: Recording())
    return made


def _batch(prompts: Path, out: Path, *extra) -> int:
    return cli.main(["batch", str(prompts), "--out", str(out), *FAST, *extra])


def _txt(tmp_path, prompts=PROMPTS) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n\n")  # a blank line is not a row
    return path


def _pngs(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def _manifest(out: Path) -> list:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _samples(out: Path) -> dict:
    """key -> {ext: bytes} of every webdataset shard in `out`."""
    samples = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                assert ext not in samples.setdefault(key, {}), f"{m.name} twice"
                samples[key][ext] = tar.extractfile(m).read()
    return samples


# ------------------------------------------------------------------------------------------------ formats
def test_prompt_files_in_three_formats(tmp_path):
    types = cli.build_parser().parse_args(["batch", "p.txt"]).row_options
    rows = batch.read_rows(_txt(tmp_path, ["  first prompt ", "", "second, with a comma"]), types)
    assert [(r.index, r.prompt, r.options) for r in rows] == [(0, "first prompt", {}),
                                                              (1, "second, with a comma", {})]

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "seed": 7, "width": 128, "negative": "blurry", "guidance": 2.5}\n\n'
                     '{"prompt": "b", "sampler": "diffusers", "lora_scale": 0.5}\n{"prompt": "c", "sede": 1}\n'
                     '{"prompt": "d", "width": "wide"}\nnot json\n["a list"]\n{"seed": 3}\n')
    rows = batch.read_rows(jsonl, types)
    assert rows[0].options == {"seed": 7, "width": 128, "negative": "blurry", "guidance": 2.5}
    assert rows[1].options == {"sampling": "diffusers", "lora_scale": 0.5} and rows[1].error is None
    assert "unknown option 'sede' (did you mean 'seed'?)" in rows[2].error
    assert "width='wide' is not a whole number" in rows[3].error
    assert "not valid JSON" in rows[4].error and "JSON object" in rows[5].error and "no 'prompt'" in rows[6].error

    table = tmp_path / "p.csv"
    table.write_text('prompt,seed,steps,guidance,negative\n"a cat, sitting",5,3,,\nb,,,6.5,dark\n')
    rows = batch.read_rows(table, types)
    assert [(r.prompt, r.options) for r in rows] == [("a cat, sitting", {"seed": 5, "steps": 3}),
                                                     ("b", {"guidance": 6.5, "negative": "dark"})]
    table.write_text("prompt,colour\nx,red\n")
    with pytest.raises(InputError, match=r"unknown column\(s\) \['colour'\]"):
        batch.read_rows(table, types)
    table.write_text("text\nx\n")
    with pytest.raises(InputError, match="needs a 'prompt' column"):
        batch.read_rows(table, types)
    assert cli.main(["batch", str(tmp_path / "missing.txt")]) == 2


def test_groups_and_seeds_depend_only_on_the_rows(tmp_path):
    parser = cli.build_parser()
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "a"}, {"prompt": "b", "width": 128}, {"prompt": "c", "seed": 100}, {"prompt": "d", "width": 128},
        {"prompt": "e", "negative": "x"}, {"prompt": "f", "lora_scale": 0.5}]))
    args = parser.parse_args(["batch", str(jsonl), "--seed", "10", "--num-images", "2", "--batch-size", "2"])
    groups = batch.plan(batch.read_rows(jsonl, args.row_options), args, cli._options, 2)
    assert [[r.prompt for r in g.rows] for g in groups] == [["a", "c"], ["b", "d"], ["e"], ["f"]]
    assert [r.seed for g in groups for r in g.rows] == [10, 100, 12, 16, 18, 20]  # own, else base + row x images
    assert groups[1].settings["width"] == 128 and groups[3].lora_scale == 0.5
    assert groups[2].rows[0].negative == "x" and groups[0].rows[0].negative == ""


# ------------------------------------------------------------------------------------------------ runs
def test_png_output_manifest_and_row_options(tmp_path, calls):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": PROMPTS[0], "seed": 123, "negative": "green", "steps": 1}) + "\n" +
                     json.dumps({"prompt": PROMPTS[1]}) + "\n")
    out = tmp_path / "out"
    assert _batch(jsonl, out, "--seed", "50", "--num-images", "2", "--batch-size", "4") == 0
    assert sorted(_pngs(out)) == ["00000000_00.png", "00000000_01.png", "00000001_00.png", "00000001_01.png"]
    meta = read_parameters(out / "00000000_01.png")
    assert (meta["seed"], meta["prior_steps"], meta["negative_prompt"], meta["row"], meta["index_in_row"]) == \
        (124, 1, "green", 0, 1)
    assert read_parameters(out / "00000001_00.png")["seed"] == 52  # base 50 + row 1 x 2 images
    manifest = _manifest(out)
    assert [(m["row"], m["index_in_row"], m["file"]) for m in manifest] == \
        [(0, 0, "00000000_00.png"), (0, 1, "00000000_01.png"), (1, 0, "00000001_00.png"), (1, 1, "00000001_01.png")]
    assert manifest[2] == {"file": "00000001_00.png", **read_parameters(out / "00000001_00.png")}
    assert len(calls) == 2  # the two rows differ in their steps: two groups
    assert not (out / "errors.jsonl").exists() and not (out / batch.PARTS).exists()
    assert not list(out.glob("*" + batch.TMP))


def test_batch_size_changes_no_row(tmp_path, calls):
    """Each image's noise comes from its own seed; batched matrix products round differently from single ones on
    a CPU, so pixels may move by one level of 255, never more."""
    prompts = _txt(tmp_path)
    assert _batch(prompts, tmp_path / "one", "--batch-size", "1") == 0
    assert _batch(prompts, tmp_path / "three", "--batch-size", "3") == 0
    assert [len(s) for s in calls] == [1] * 5 + [3, 2]
    one, three = _pngs(tmp_path / "one"), _pngs(tmp_path / "three")
    assert sorted(one) == sorted(three) and len(one) == 5
    for name in one:
        a, b = (np.asarray(Image.open(io.BytesIO(x[name]))).astype(int) for x in (one, three))
        assert np.abs(a - b).max() <= 1, name
        assert read_parameters(tmp_path / "one" / name) == read_parameters(tmp_path / "three" / name)
    differ = [np.asarray(Image.open(io.BytesIO(one[n]))) for n in sorted(one)]
    assert all(np.abs(differ[0].astype(int) - d).max() > 10 for d in differ[1:])  # the rows are different pictures


def test_two_torchrun_processes_make_what_one_makes(tmp_path, calls):
    """torchrun, 2 processes on gloo: together they write exactly the files of a one-process run, bitwise."""
    prompts = _txt(tmp_path)
    assert _batch(prompts, tmp_path / "one", "--batch-size", "2") == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    from stablecascade.train.launch import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "stablecascade.cli", "batch", str(prompts), "--out", str(tmp_path / "two"),
           "--batch-size", "2", *FAST]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0:" in done.stderr and "rank 1:" in done.stderr and "img/s" in done.stderr
    assert "3 image(s)" in done.stderr and "2 image(s)" in done.stderr  # groups 0, 2 on rank 0; group 1 on rank 1
    assert _pngs(tmp_path / "two") == _pngs(tmp_path / "one")
    assert _manifest(tmp_path / "two") == _manifest(tmp_path / "one")


def test_bad_rows_are_recorded_and_the_batch_goes_on(tmp_path, calls):
    jsonl = tmp_path / "p.jsonl"
    rows = [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "width": 60}, {"prompt": PROMPTS[2], "guidance": 1e30},
            {"prompt": PROMPTS[3], "sizes": 2}, {"prompt": PROMPTS[4], "lora_scale": 0.5}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{oops\n")
    out = tmp_path / "out"
    assert _batch(jsonl, out, "--batch-size", "4") == 1
    assert sorted(_pngs(out)) == ["00000000_00.png"]
    errors = {e["row"]: e["error"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert sorted(errors) == [1, 2, 3, 4, 5]
    assert "width=60 is not supported" in errors[1] and "NaN" in errors[2] and "unknown option 'sizes'" in errors[3]
    assert "--lora" in errors[4] and "not valid JSON" in errors[5]
    # fixed rows run on the next call; the rows still bad stay recorded, the good row is not made again
    rows[1]["width"] = 64
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{oops\n")
    calls.clear()
    assert _batch(jsonl, out, "--batch-size", "4") == 1
    assert [len(s) for s in calls] == [1, 1]  # row 1, then row 2 again
    assert sorted(_pngs(out)) == ["00000000_00.png", "00000001_00.png"]
    assert [json.loads(e)["row"] for e in (out / "errors.jsonl").read_text().splitlines()] == [2, 3, 4, 5]


def test_webdataset_resume_after_a_crash_inside_a_shard(tmp_path, calls, monkeypatch):
    prompts = _txt(tmp_path)
    whole = tmp_path / "whole"
    assert _batch(prompts, whole, "--format", "webdataset", "--shard-size", "2") == 0
    assert sorted(p.name for p in whole.glob("*.tar")) == ["shard-00000-000000.tar", "shard-00000-000001.tar",
                                                          "shard-00000-000002.tar"]
    add = batch.ShardStore.add

    def crash_on_the_fourth(self, key, png, parameters):
        if key.startswith("00000003"):
            raise RuntimeError("killed")
        add(self, key, png, parameters)

    monkeypatch.setattr(batch.ShardStore, "add", crash_on_the_fourth)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):
        _batch(prompts, out, "--format", "webdataset", "--shard-size", "2")
    assert [p.name for p in out.glob("*.tar")] == ["shard-00000-000000.tar"]  # row 2 was in the unfinished shard
    assert list(out.glob("*.tar" + batch.TMP))
    monkeypatch.setattr(batch.ShardStore, "add", add)
    calls.clear()
    assert _batch(prompts, out, "--format", "webdataset", "--shard-size", "2") == 0
    assert [s[0] for s in calls] == [2, 3, 4]  # only the rows not in a finished shard, by their seeds
    assert not list(out.glob("*" + batch.TMP))
    assert _samples(out) == _samples(whole)  # every row once, the same bytes as without the crash
    assert [m["row"] for m in _manifest(out)] == [0, 1, 2, 3, 4]
    assert _batch(prompts, out, "--format", "webdataset", "--shard-size", "2") == 0 and len(calls) == 3


def test_ctrl_c_stops_after_the_current_group(tmp_path, calls):
    calls.before = lambda: os.kill(os.getpid(), signal.SIGINT)  # arrives while the first group is generated
    out = tmp_path / "out"
    handler = signal.getsignal(signal.SIGINT)
    assert _batch(_txt(tmp_path), out, "--batch-size", "2") == 130
    assert len(calls) == 1 and sorted(_pngs(out)) == ["00000000_00.png", "00000001_00.png"]
    assert [m["row"] for m in _manifest(out)] == [0, 1]
    assert signal.getsignal(signal.SIGINT) is handler


def test_webdataset_shards_load_and_train(tmp_path, calls):
    import webdataset as wds

    from stablecascade.train import data

    out = tmp_path / "shards"
    assert _batch(_txt(tmp_path), out, "--format", "webdataset", "--shard-size", "3", "--batch-size", "5") == 0
    shards = sorted(str(p) for p in out.glob("*.tar"))
    assert len(shards) == 2
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert [s["txt"] for s in samples] == PROMPTS
    assert [s["json"]["seed"] for s in samples] == [0, 1, 2, 3, 4] and samples[0]["png"].size == (64, 64)
    source = data.ImageSource(data.index_sources([str(out)]))  # what the trainer reads: captions from .txt
    assert [source.caption(i) for i in range(len(source))] == PROMPTS
    settings = dict(data=f"[{out}]", output_dir=tmp_path / "run", image_size=64, steps=2, batch_size=2,
                    stage_c="new:tiny", stage_b="new:tiny", stage_a="new:tiny", effnet="nano", text_encoder="tiny",
                    sample_steps=1, save_every=100)
    assert cli.main(["train", "c", "--quiet", *[x for k, v in settings.items() for x in ("--set", f"{k}={v}")]]) == 0
    assert (tmp_path / "run" / "final" / "stage_c.safetensors").is_file()
