"""The `stablecascade` command line, run in-process and as a real subprocess."""

import subprocess
import sys

import numpy as np
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
    assert params["seed"] == 4 and params["prior_steps"] == 2 and params["decoder_steps"] == 1
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


@pytest.mark.parametrize("command", ["generate", "variation", "img2img", "reconstruct", "controlnet", "serve", "ui",
                                     "download"])
def test_help_explains_every_option(command):
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    text = parser.format_help()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, f"{command} {action.option_strings or action.dest} has no help text"
            assert (action.option_strings or [action.dest])[-1] in text


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "input.png"
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(path)
    return path


def models(tiny, small_parts):
    return ["--prior", tiny.prior, "--decoder", tiny.decoder, "--effnet", small_parts.effnet, "--previewer",
            small_parts.previewer, "--dtype", "fp32", "--device", "cpu", "--decoder-steps", 1, "--seed", 2]


def test_img2img_with_previews(tiny, small_parts, image_file, tmp_path):
    out, previews = tmp_path / "out", tmp_path / "previews"
    assert run("img2img", image_file, "a boat", "--strength", 0.5, "--steps", 4, "--previews", previews, "--out", out,
               *models(tiny, small_parts)) == 0
    (file,) = out.glob("*.png")
    assert Image.open(file).size == (96, 64)
    params = read_parameters(file)
    assert params["mode"] == "image-to-image" and params["strength"] == 0.5 and params["input"] == str(image_file)
    assert len(list(previews.glob("*.png"))) == 2  # 4 steps x strength 0.5


def test_variation_of_two_images(tiny, small_parts, image_file, tmp_path):
    out = tmp_path / "out"
    assert run("variation", image_file, image_file, "--weights", 1, 0.5, "--width", 64, "--height", 64, "--steps", 1,
               "--out", out, *models(tiny, small_parts)) == 0
    (file,) = out.glob("*.png")
    assert read_parameters(file)["image_weights"] == [1.0, 0.5]


def test_reconstruct_reports_psnr(tiny, small_parts, image_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("reconstruct", image_file, "--out", out, *models(tiny, small_parts)) == 0
    (file,) = out.glob("*.png")
    assert Image.open(file).size == (96, 64)
    assert read_parameters(file)["latent_shape"] == [16, 2, 3]
    assert "PSNR" in capsys.readouterr().out


def test_unreadable_input_image(tiny, small_parts, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    assert run("img2img", bad, "x", "--out", tmp_path / "out", *models(tiny, small_parts)) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "Traceback" not in err


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "stablecascade.cli", "generate", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    assert "--decoder-guidance" in result.stdout and "--seed" in result.stdout
