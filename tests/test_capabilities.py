"""What a loaded model can run (pipe.capabilities()), the ControlNet kinds registry every interface reads, OpenCV as
an optional extra, and the huggingface_hub API the code needs."""

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import stablecascade
from stablecascade import cli, controlnets, download
from stablecascade.errors import UnsupportedError
from stablecascade.train.config import TrainConfig

SRC = Path(stablecascade.__file__).parent
# what huggingface_hub 0.25.0 (the pyproject floor) offers, by module: names and the keyword arguments used here
HUB_0_25 = {
    "huggingface_hub": {
        "constants": set(), "try_to_load_from_cache": {"cache_dir", "revision"},
        "hf_hub_url": {"revision", "endpoint"}, "get_hf_file_metadata": {"token"},
        "hf_hub_download": {"revision", "local_dir", "endpoint", "token", "cache_dir", "local_files_only"},
        "snapshot_download": {"allow_patterns", "local_files_only"},
    },
    "huggingface_hub.errors": {name: set() for name in (
        "EntryNotFoundError", "GatedRepoError", "HfHubHTTPError", "LocalEntryNotFoundError", "OfflineModeIsEnabled",
        "RepositoryNotFoundError", "RevisionNotFoundError")},
    "huggingface_hub.utils": {name: set() for name in (
        "are_progress_bars_disabled", "disable_progress_bars", "enable_progress_bars")},
}
HUB_0_25_CONSTANTS = {"HF_HUB_OFFLINE"}


@pytest.fixture(scope="module")
def nano():
    return stablecascade.load_pipeline("nano", "nano", device="cpu", dtype=torch.float32)


def test_every_interface_lists_the_controlnet_kinds_of_the_registry():
    kinds = list(controlnets.KINDS)
    assert kinds == ["canny", "inpaint", "face", "sr"]
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(getattr(a, "choices", None), dict))
    kind_action = next(a for a in sub.choices["controlnet"]._actions if a.dest == "kind")
    assert list(kind_action.choices) == kinds
    from stablecascade.server import schemas

    assert schemas()["ControlNet"].model_json_schema()["properties"]["kind"]["enum"] == kinds
    assert download.files_for(controlnets=controlnets.RELEASED) == [
        "controlnet/canny.safetensors", "controlnet/inpainting.safetensors", "controlnet/super_resolution.safetensors"]
    with pytest.raises(download.DownloadError, match="canny, inpaint, sr"):
        download.files_for(controlnets=["face"])  # never released
    from stablecascade.train.config import ConfigError

    assert TrainConfig(controlnet_kind="sr").validate().controlnet_kind == "sr"
    with pytest.raises(ConfigError, match="canny, inpaint, sr"):
        TrainConfig(controlnet_kind="face").validate()
    for kind in controlnets.KINDS.values():  # the model config's input width is what the filter makes
        assert kind.config.c_in == {"canny": 1, "inpaint": 4, "face": 512, "sr": 16}[kind.name]


def test_nano_reports_what_it_cannot_run_and_never_reaches_for_the_hub(nano, monkeypatch):
    caps = nano.capabilities()
    assert caps.native_size == 64 and caps.min_size == 64 and caps.max_size == 128
    assert caps.reason("txt2img") is None and caps.reason("img2img") is None and caps.previews is None
    assert "CLIP image encoder" in caps.reason("variation")
    assert "3.6B Stage C" in caps.controlnet_reason("canny") and "never released" in caps.controlnet_reason("face")
    assert all(e.startswith("a ") and " background" in e for e in caps.examples)
    d = caps.to_dict()
    assert d["modes"]["controlnet"] == {"available": False, "reason": caps.reason("controlnet")}

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was asked for something the model cannot use")

    monkeypatch.setattr(stablecascade.hub, "file", no_network)
    monkeypatch.setattr(stablecascade.hub, "snapshot", no_network)
    started = time.monotonic()
    with pytest.raises(UnsupportedError, match="canny ControlNet cannot run here: the released ControlNets fit only"):
        nano.controlnet("canny", torch.rand(3, 64, 64), "a red circle")
    with pytest.raises(UnsupportedError, match="image variation cannot run here"):
        nano.variation(torch.rand(3, 64, 64))
    assert time.monotonic() - started < 5


def test_a_loaded_controlnet_makes_its_kind_available(pipe):
    from stablecascade.models.controlnet import ControlNet, ControlNetConfig

    c = pipe.stage_c
    assert pipe.capabilities().controlnet_reason("inpaint") is not None  # the tiny Stage C fits no released net
    net = ControlNet(ControlNetConfig(c_in=4, c_proj=c.config.c_hidden[0], proj_blocks=(0,),
                                      bottleneck_mode="simple"))
    pipe._controlnets["inpaint"] = net
    try:
        assert pipe.capabilities().controlnet_reason("inpaint") is None
        assert pipe.capabilities().reason("controlnet") is None
    finally:
        del pipe._controlnets["inpaint"]


def test_opencv_is_optional_and_its_absence_is_explained(monkeypatch):
    from stablecascade.controlnet_filters import canny_control
    from stablecascade.errors import InputError

    monkeypatch.setitem(sys.modules, "cv2", None)  # what Python does for a module that is not installed
    assert controlnets.KINDS["canny"].missing_packages() == ["opencv-python-headless"]
    with pytest.raises(InputError, match=r"pip install 'stablecascade\[canny\]'"):
        canny_control(torch.rand(1, 3, 32, 32))


def test_the_command_line_starts_without_importing_huggingface_hub():
    code = ("import sys; from stablecascade import cli\n"
            "try:\n    cli.main(['download', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('huggingface_hub' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_only_huggingface_hub_apis_of_the_declared_floor_are_used():
    floor = next(line for line in (SRC.parents[1] / "pyproject.toml").read_text().splitlines()
                 if line.strip().startswith('"huggingface_hub>='))
    assert '"huggingface_hub>=0.25"' in floor
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("huggingface_hub"):
                for alias in node.names:
                    assert alias.name in HUB_0_25.get(node.module, {}), f"{path.name}: {node.module}.{alias.name}"
                    imported[alias.asname or alias.name] = HUB_0_25[node.module][alias.name]
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported:
                unknown = {k.arg for k in node.keywords} - imported[node.func.id]
                assert not unknown, f"{path.name}: {node.func.id}({unknown}) is newer than huggingface_hub 0.25"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "constants" \
                    and "constants" in imported:
                assert node.attr in HUB_0_25_CONSTANTS, f"{path.name}: constants.{node.attr}"
