"""The `stablecascade` command line, run in-process and as a real subprocess."""

import subprocess
import sys

import pytest
from PIL import Image

from stablecascade.cli import build_parser, main
from stablecascade.images import read_parameters


def run(*argv):
    return main([str(a) for a in argv])


def test_generate_writes_pngs_with_parameters(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    code = run("generate", "a red circle", "--prior", tiny.prior, "--decoder", tiny.decoder, "--width", 72,
               "--height", 64, "--steps", 2, "--decoder-steps", 1, "--seed", 3, "--num-images", 2, "--dtype", "fp32",
               "--device", "cpu", "--negative", "blurry", "--out", out)
    assert code == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["stablecascade_00001.png", "stablecascade_00002.png"]
    assert Image.open(files[0]).size == (72, 64)
    params = read_parameters(files[1])
    assert params["prompt"] == "a red circle" and params["negative_prompt"] == "blurry"
    assert params["seed"] == 3 and params["prior_steps"] == 2 and params["decoder_steps"] == 1
    assert params["dtype"] == "float32" and params["prior"] == str(tiny.prior)
    assert "stablecascade_00002.png" in capsys.readouterr().out


def test_generate_never_overwrites_and_is_reproducible(tiny, tmp_path):
    args = ["generate", "x", "--prior", tiny.prior, "--decoder", tiny.decoder, "--width", 64, "--height", 64,
            "--steps", 1, "--decoder-steps", 1, "--seed", 9, "--dtype", "fp32", "--device", "cpu", "--out", tmp_path]
    assert run(*args) == 0 and run(*args) == 0
    first, second = sorted(tmp_path.glob("*.png"))
    assert second.name == "stablecascade_00002.png"
    assert Image.open(first).tobytes() == Image.open(second).tobytes()


@pytest.mark.parametrize("extra,needle", [
    (["--width", "1001"], "multiples of 8"),
    (["--steps", "0"], "prior_steps"),
    (["--prior", "/nonexistent/stage_c.safetensors"], "not found"),
    (["--prior", "weights.ckpt"], "pickle"),
])
def test_bad_input_exits_2_with_message_and_no_traceback(tiny, tmp_path, capsys, extra, needle):
    (tmp_path / "weights.ckpt").write_bytes(b"\x80\x04")
    args = ["generate", "x", "--prior", tiny.prior, "--decoder", tiny.decoder, "--height", "64", "--width", "64",
            "--dtype", "fp32", "--device", "cpu", "--out", tmp_path / "out"]
    extra = [str(tmp_path / e) if e == "weights.ckpt" else e for e in extra]
    assert run(*args, *extra) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_help_explains_every_option():
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    text = generate.format_help()
    for action in generate._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text"
            assert action.option_strings[-1] in text


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "stablecascade.cli", "generate", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    assert "--decoder-guidance" in result.stdout and "--seed" in result.stdout
