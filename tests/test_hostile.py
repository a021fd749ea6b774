"""Hostile and careless input: each bad input gets a clear error (type and message, HTTP status or CLI exit code),
never a traceback, a 5xx, unbounded memory or lost work. Runs on the built-in nano model at 64x64."""

import collections
import contextlib
import io
import json
import math
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

import stablecascade
from stablecascade import checkpoints, limits, server
from stablecascade.cli import main
from stablecascade.configs import STAGE_C
from stablecascade.errors import CheckpointError, InputError, LimitError
from stablecascade.images import load_image
from stablecascade.limits import Limits
from stablecascade.loading import NANO_DIR

TINY = {"width": 64, "height": 64, "prior_steps": 1, "decoder_steps": 1}
SLOW = {"width": 64, "height": 64, "prior_steps": 200, "decoder_steps": 1}  # runs until cancelled


@pytest.fixture(scope="module")
def nano():
    return stablecascade.load_pipeline("nano", "nano", device="cpu", dtype=torch.float32)


# ------------------------------------------------------------------------------------------ crafted files
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of width x height black pixels: a few kB declaring a huge image."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def png_with_ztxt(megabytes: int) -> bytes:
    """An 8x8 PNG carrying a zTXt chunk that inflates to `megabytes` MB (a text-chunk bomb), before its pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    png = buffer.getvalue()
    packer = zlib.compressobj(9)
    block = b"\0" * 2**20
    text = b"".join(packer.compress(block) for _ in range(megabytes)) + packer.flush()
    bomb = png_chunk(b"zTXt", b"comment\0\0" + text)
    end_of_ihdr = 8 + 8 + 13 + 4
    return png[:end_of_ihdr] + bomb + png[end_of_ihdr:]


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


# ------------------------------------------------------------------------------------------ HTTP
@pytest.fixture(scope="module")
def client(nano):
    app = server.create_app(nano, max_queue=60, max_pixels=256 * 256, max_body_bytes=2 * 2**20)
    with TestClient(app) as c:
        yield c


def wait_for(client, job_id, statuses=("done", "failed", "cancelled"), timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job}")


@pytest.mark.parametrize("path,body,needle", [
    ("/v1/txt2img", b'{"prompt": "x", "prior_guidance": NaN}', "finite"),
    ("/v1/txt2img", b'{"prompt": "x", "prior_guidance": Infinity}', "finite"),
    ("/v1/txt2img", b'{"prompt": "x", "compression": -Infinity}', "finite"),
    ("/v1/txt2img", b'{"prompt": "x", "seed": 1e400}', "finite"),
    ("/v1/txt2img", b'{"prompt": "x", "loras": [{"name": "a", "scale": NaN}]}', "loras[0].scale"),
    ("/v1/variation", b'{"images": ["x"], "weights": [1e400]}', "weights[0]"),
    ("/v1/txt2img", b'{"prompt": "\\ud800"}', "surrogate"),
    ("/v1/txt2img", b'{"prompt": "x", "\\udfff": 1}', "surrogate"),
    ("/v1/variation", b'{"images": ["\\udc00"]}', "surrogate"),
    ("/v1/txt2img", b"NaN", "finite"),
])
def test_json_that_python_parses_but_is_no_number_or_text_gets_422(client, path, body, needle):
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert needle in r.json()["message"], r.json()
    assert client.get("/health").json()["queue"]["queued"] == 0


@pytest.mark.parametrize("payload", [
    {"prompt": "x" * 1_000_000},  # over the prompt's max_length
    {"prompt": "x", "x" * 500_000: 1},  # an unknown key that long
    {"prompt": "x", "width": list(range(100_000))},  # a huge value of the wrong type
    {"images": ["x"] * 20_000},  # too many items: one error, not twenty thousand
])
def test_validation_errors_never_echo_large_inputs(client, payload):
    r = client.post("/v1/variation" if "images" in payload else "/v1/txt2img", json=payload)
    assert r.status_code == 422
    assert len(r.content) < 4096, r.content[:300]


def test_bombs_get_413_and_400_not_500(client):
    r = client.post("/v1/img2img", json={"prompt": "x", "image": b64(png_bomb(20000, 20000))})
    assert r.status_code == 413 and "400000000 pixels" in r.json()["detail"], r.text
    r = client.post("/v1/img2img", json={"prompt": "x", "image": b64(png_with_ztxt(50))})
    assert r.status_code == 400 and "metadata" in r.json()["detail"], r.text
    assert client.get("/health").status_code == 200


@contextlib.contextmanager
def live_server(app):
    """The app served by uvicorn on 127.0.0.1 (a free port) in a thread; yields the port."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()


def test_the_api_key_is_checked_before_a_large_body_is_read(nano):
    app = server.create_app(nano, api_key="s3cret", max_body_bytes=64 * 2**20)
    with live_server(app) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        # announce a 50 MB body and send none of it: the answer must not wait for it
        conn.sendall(b"POST /v1/txt2img HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 50000000\r\n\r\n")
        reply = b""
        while b"API key" not in reply and (chunk := conn.recv(4096)):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 401") and b"API key" in reply, reply


def test_waiting_requests_do_not_starve_the_thread_pool(client):
    running = client.post("/v1/txt2img", json={"prompt": "slow", **SLOW}).json()
    wait_for(client, running["id"], statuses=("running",))
    replies = []
    waiting = [threading.Thread(target=lambda i=i: replies.append(
        client.post("/v1/txt2img?wait=true", json={"prompt": f"w{i}", **SLOW}))) for i in range(45)]
    for t in waiting:  # more than the 40 threads of the pool that serves plain `def` routes
        t.start()
    deadline = time.monotonic() + 60
    while client.get("/health").json()["queue"]["queued"] < 45 and time.monotonic() < deadline:
        time.sleep(0.05)
    start = time.monotonic()
    assert client.get("/health").status_code == 200
    assert len(client.get("/v1/jobs").json()) >= 46  # a `def` route: needs a pool thread
    assert time.monotonic() - start < 5
    for job in client.get("/v1/jobs").json():
        client.delete(f"/v1/jobs/{job['id']}")
    for t in waiting:
        t.join(60)
    assert len(replies) == 45 and {r.status_code for r in replies} == {409}  # cancelled while waiting


def test_finished_jobs_stay_fetchable_however_many_follow(nano):
    with TestClient(server.create_app(nano, max_queue=2, keep_seconds=600.0)) as c:
        done = c.post("/v1/txt2img?wait=true", json={"prompt": "keep me", **TINY}).json()
        assert done["status"] == "done"
        slow = c.post("/v1/txt2img", json={"prompt": "slow", **SLOW}).json()
        wait_for(c, slow["id"], statuses=("running",))
        for i in range(120):  # 120 more finished (cancelled) jobs
            queued = c.post("/v1/txt2img", json={"prompt": f"q{i}", **TINY}).json()
            assert c.delete(f"/v1/jobs/{queued['id']}").json()["status"] == "cancelled"
        c.delete(f"/v1/jobs/{slow['id']}")
        png = c.get(done["images"][0]["url"])
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"


def test_finished_jobs_are_forgotten_after_keep_seconds(nano):
    with TestClient(server.create_app(nano, keep_seconds=1.0)) as c:
        done = c.post("/v1/txt2img?wait=true", json={"prompt": "brief", **TINY}).json()
        assert c.get("/health").json()["limits"]["keep_seconds"] == 1.0
        time.sleep(max(0.0, done["finished"] + 1.2 - time.time()))
        gone = c.get(done["images"][0]["url"])
        assert gone.status_code == 404 and "finished more than 1 s ago" in gone.json()["detail"]


def test_memory_for_kept_results_is_bounded_by_refusing_new_jobs(nano):
    with TestClient(server.create_app(nano, keep_seconds=30.0, max_kept_bytes=1)) as c:
        assert c.post("/v1/txt2img?wait=true", json={"prompt": "a", **TINY}).status_code == 200
        r = c.post("/v1/txt2img", json={"prompt": "b", **TINY})
        assert r.status_code == 429 and "results fill" in r.json()["detail"], r.text
        assert 1 <= int(r.headers["retry-after"]) <= 30


# ------------------------------------------------------------------------------------------ command line
def run_cli(argv, capsys) -> tuple:
    """stablecascade.cli.main in this process: (exit code, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    return code, capsys.readouterr().err


def one_line_error(code, err, needle):
    assert code == 2, err
    assert needle in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err


@pytest.mark.parametrize("argv,needle", [
    (["--width", "1e9"], "invalid int value: '1e9'"),
    (["--seed", "2**64"], "invalid int value: '2**64'"),
    (["--seed", str(2**64)], "seed 18446744073709551616 is out of range"),
    (["--seed", "-1"], "out of range"),
    (["--width", "100000", "--height", "64"], "raise the limit with --max-pixels"),
    (["--width", "65536", "--height", "65536"], "raise the limit with --max-pixels"),
    (["--num-images", "10000"], "raise the limit with --max-images"),
    (["--steps", "100000"], "raise the limit with --max-steps"),
    (["--decoder-steps", "2000000000"], "raise the limit with --max-steps"),
    (["--max-pixels", "0"], "--max-pixels must be a whole number >= 1"),
    # a raised limit lets the size through: the next limit speaks
    (["--width", "4096", "--height", "4096", "--max-pixels", str(4096 * 4096), "--steps", "501"], "--max-steps"),
])
def test_cli_refuses_what_is_over_the_limits_in_one_line_before_loading(argv, needle, tmp_path, capsys):
    one_line_error(*run_cli(["generate", "a red circle", *argv, "--out", str(tmp_path)], capsys), needle)
    assert not list(tmp_path.iterdir())


def test_cli_refuses_image_bombs_and_bad_inputs_before_loading(tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(12000, 12000))
    assert bomb.stat().st_size < 100_000
    out = str(tmp_path / "out")
    one_line_error(*run_cli(["img2img", str(bomb), "x", "--out", out], capsys), "raise --max-input-pixels")
    one_line_error(*run_cli(["reconstruct", str(bomb), "--out", out], capsys), "12000x12000")
    text_bomb = tmp_path / "ztxt.png"
    text_bomb.write_bytes(png_with_ztxt(50))
    one_line_error(*run_cli(["variation", str(text_bomb), "--out", out], capsys), "metadata")
    truncated = tmp_path / "cut.png"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[:60])
    one_line_error(*run_cli(["controlnet", "x", "--kind", "canny", "--control", str(truncated), "--out", out],
                            capsys), "cut.png")


def test_cli_checks_out_and_previews_before_loading(tmp_path, capsys):
    a_file = tmp_path / "taken.png"
    a_file.write_bytes(b"not a folder")
    for option, folder, needle in (("--out", a_file, "is a file"), ("--out", a_file / "sub", "cannot hold"),
                                   ("--previews", a_file, "is a file")):
        one_line_error(*run_cli(["generate", "x", option, str(folder)], capsys), f"{option} {folder}")
    assert a_file.read_bytes() == b"not a folder"


# ------------------------------------------------------------------------------------------ images
def test_exif_orientation_is_applied_when_reading(tmp_path):
    stored = Image.new("RGB", (8, 4), "blue")
    stored.paste((255, 0, 0), (0, 0, 4, 4))  # left half red, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: display rotated 90 degrees clockwise (a portrait phone photo)
    path = tmp_path / "portrait.png"
    stored.save(path, exif=exif)
    image = load_image(path)
    assert image.shape == (3, 8, 4)  # upright: portrait
    assert torch.equal(image[:, :4], torch.tensor([1.0, 0, 0])[:, None, None].expand(3, 4, 4))  # red on top
    assert torch.equal(image[:, 4:], torch.tensor([0, 0, 1.0])[:, None, None].expand(3, 4, 4))


def test_input_limit_holds_for_paths_pil_images_and_tensors(tmp_path):
    small = Limits(max_input_pixels=100)
    previous = limits.current()
    limits.set_current(small)
    try:
        Image.new("RGB", (10, 10)).save(tmp_path / "ok.png")
        assert load_image(tmp_path / "ok.png").shape == (3, 10, 10)
        for source in (Image.new("RGB", (11, 10)), torch.zeros(3, 10, 11)):
            with pytest.raises(LimitError, match="110 pixels, over the limit of 100.*--max-input-pixels"):
                load_image(source)
    finally:
        limits.set_current(previous)


def run_memory_bounded(imports: str, *calls: str) -> list:
    """Evaluate each of `calls` in a fresh Python whose address space may grow at most 1 GiB past `imports`; the
    line each printed: the error it raised ("LimitError ..."), or "returned"."""
    src = str(Path(stablecascade.__file__).resolve().parents[1])
    program = textwrap.dedent("""
        import resource
        {imports}
        from stablecascade.errors import StableCascadeError
        size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, size + 2**30))
        for call in {calls!r}:
            try:
                eval(call)
                print("returned")
            except StableCascadeError as e:
                print(type(e).__name__, str(e).replace("\\n", " "))
        """).format(imports=imports, calls=list(calls))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


def test_a_17_kb_png_of_12000x12000_pixels_stays_within_memory(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(12000, 12000))  # would be 1.7 GB as float pixels
    [out] = run_memory_bounded("from stablecascade import images", f"images.load_image({str(bomb)!r})")
    assert out.startswith("LimitError") and "12000x12000" in out, out


# ------------------------------------------------------------------------------------------ pure validators
@given(width=st.integers(1, 10**12), height=st.integers(1, 10**12), max_pixels=st.integers(1, 10**13))
def test_size_limit_property(width, height, max_pixels):
    rule = Limits(max_pixels=max_pixels)
    if width * height <= max_pixels:
        rule.check_output(width, height)
    else:
        with pytest.raises(LimitError, match=f"{width}x{height}.*--max-pixels"):
            rule.check_output(width, height)


@given(images=st.integers(1, 10**6), steps=st.integers(1, 10**9), seed=st.one_of(st.none(), st.integers(-2**70, 2**70)))
def test_generation_limits_property(images, steps, seed):
    rule = Limits()
    over = images > rule.max_images or steps > rule.max_steps
    bad_seed = seed is not None and not 0 <= seed <= 2**64 - images
    try:
        rule.check_generation(width=64, height=64, images=images, steps={"prior_steps": steps}, seed=seed)
    except LimitError as e:
        assert over and ("--max-images" in str(e) or "--max-steps" in str(e))
    except InputError as e:
        assert bad_seed and not over and "seed" in str(e)
    else:
        assert not over and not bad_seed


@settings(max_examples=50)
@given(st.one_of(st.floats(), st.text(), st.booleans(), st.integers(-5, 0)))
def test_limits_refuse_values_that_are_no_positive_whole_number(value):
    with pytest.raises(InputError, match="--max-steps must be a whole number >= 1"):
        Limits(max_steps=value)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["prior_guidance", "decoder_guidance"]),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30), st.booleans(),
                       st.text(max_size=5)))
def test_guidance_is_any_finite_number_at_least_zero(pipe, name, value):
    """Checked before anything is drawn: what the guidance validation accepts is exactly the finite numbers >= 0."""
    valid = not isinstance(value, (bool, str)) and math.isfinite(value) and value >= 0
    call = lambda: pipe._settings("a cat", width=64, height=64, **{name: value})  # noqa: E731
    if valid:
        assert getattr(call(), name) == value
    else:
        with pytest.raises(InputError, match=f"{name} must be a finite number >= 0"):
            call()


# ------------------------------------------------------------------------------------------ checkpoints and configs
@pytest.fixture
def bundle(tmp_path):
    """A writable copy of the built-in nano model bundle, to tamper with."""
    copy = tmp_path / "bundle"
    shutil.copytree(NANO_DIR, copy)
    return copy


def edit_json(path: Path, change) -> None:
    path.write_text(change(json.loads(path.read_text())) if callable(change) else change)


def with_(**fields):
    return lambda d: json.dumps({**d, **fields})


def without(key):
    return lambda d: json.dumps({k: v for k, v in d.items() if k != key})


@pytest.mark.parametrize("change,needle", [
    ("{", "is not a readable diffusers config"),
    ("", "is not a readable diffusers config"),
    ("[1, 2]", "this file holds a list"),
    (without("in_channels"), "'in_channels' is missing"),
    (with_(block_out_channels=128), "TypeError"),
    (with_(down_num_layers_per_block=[100000000, 2]), "blocks[0] (down)[0]=100000000"),
    (with_(down_num_layers_per_block=[3, 2]), "down_blocks.0: the config implies 9 blocks, the file holds 6"),
    (with_(num_attention_heads=["4", 4]), "'<=' not supported"),
    (with_(kernel_size=1e300), "kernel_size=1e+300"),
    (with_(block_types_per_layer=[["SDCascadeFooBlock"]] * 2), "'SDCascadeFooBlock' is missing or unknown"),
    ('{"_class_name": "StableCascadeUNet", "clip_text_in_channels": 32, "dropout": NaN}', "is missing"),
])
def test_bad_diffusers_config_gets_one_clear_checkpoint_error(bundle, change, needle):
    folder = bundle / "prior" / "prior"
    edit_json(folder / "config.json", change)
    with pytest.raises(CheckpointError) as e:
        checkpoints.load_component(folder, "stage_c")
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def nano_stage_c_file(bundle: Path, path: Path, config) -> Path:
    """The nano Stage C as an official file whose stablecascade_config metadata is `config` (any JSON text)."""
    state, _ = checkpoints.read_state_dict(next((bundle / "prior" / "prior").glob("*.safetensors")))
    save_file(checkpoints.diffusers_to_official(state, "stage_c"), str(path),
              metadata={checkpoints.CONFIG_METADATA_KEY: config})
    return path


def nano_config(**changes) -> str:
    return json.dumps({**STAGE_C["nano"].to_dict(), **changes})


@pytest.mark.parametrize("config,needle", [
    (nano_config(blocks=[[100000000, 1], [1, 1]]), "blocks[0] (down)[0]=100000000"),
    (nano_config(blocks=[[200, 2], [2, 2]]), "the config implies 600 blocks, the file holds 6"),
    (nano_config(colour="red"), "unknown keys ['colour']"),
    (nano_config(c_hidden="wide"), "every per-level list must have 4 entries"),
    (nano_config(level_config=["CTX", "CTA"]), "level_config[0]='CTX'"),
    ("not json", "metadata is not JSON"),
    ("[1]", "metadata is a JSON list"),
])
def test_bad_config_metadata_gets_one_clear_checkpoint_error(bundle, tmp_path, config, needle):
    path = nano_stage_c_file(bundle, tmp_path / "stage_c.safetensors", config)
    with pytest.raises(CheckpointError) as e:
        checkpoints.load_component(path, "stage_c")
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_valid_metadata_still_loads(bundle, tmp_path):
    path = nano_stage_c_file(bundle, tmp_path / "stage_c.safetensors", nano_config())
    assert checkpoints.load_component(path, "stage_c").config == STAGE_C["nano"]


def test_crafted_configs_are_refused_within_bounded_memory(bundle, tmp_path):
    """The two crafted configs of the report: before validation they built 10^8 blocks on the meta device."""
    edit_json(bundle / "prior" / "prior" / "config.json", with_(down_num_layers_per_block=[100000000, 2]))
    crafted = nano_stage_c_file(bundle, tmp_path / "crafted.safetensors", nano_config(blocks=[[100000000, 1],
                                                                                              [1, 1]]))
    out = run_memory_bounded("from stablecascade import checkpoints",
                             f"checkpoints.load_component({str(bundle / 'prior' / 'prior')!r}, 'stage_c')",
                             f"checkpoints.load_component({str(crafted)!r}, 'stage_c')")
    assert len(out) == 2 and all(line.startswith("CheckpointError") and "100000000" in line for line in out), out


@pytest.mark.parametrize("index,needle", [
    ("{", "not a readable safetensors index"),
    ('{"weight_map": {"a": "../../elsewhere.safetensors"}}', "same folder"),
    ('{"weight_map": []}', "weight_map"),
    ('{"metadata": {}}', "weight_map"),
])
def test_bad_index_json(bundle, index, needle):
    folder = bundle / "prior" / "prior"
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=re.escape(needle)):
        checkpoints.load_component(folder, "stage_c")


@pytest.mark.parametrize("change,needle", [
    ("[]", "this file holds a list"),
    (with_(native_size="64"), "native_size='64'"),
    (with_(shifts=[2.0]), "shifts=[2.0]"),
    (with_(decoder_guidance=-1), "decoder_guidance=-1"),
    (with_(compression=4), "compression=4"),
    (with_(effnet="../../elsewhere.safetensors"), "effnet='../../elsewhere.safetensors'"),
    (without("previewer"), "previewer=None"),
])
def test_bad_model_json(bundle, tmp_path, capsys, change, needle):
    edit_json(bundle / "model.json", change)
    code, err = run_cli(["generate", "x", "--prior", str(bundle), "--decoder", str(bundle),
                         "--out", str(tmp_path / "out")], capsys)
    one_line_error(code, err, needle)


class Plant:
    """Pickled, it writes a marker file when unpickled: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_text_encoder_is_never_unpickled(bundle, tmp_path, capsys):
    folder = bundle / "prior" / "text_encoder"
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"text_model.embeddings.token_embedding.weight": Plant(str(marker))}, folder / "pytorch_model.bin")
    code, err = run_cli(["generate", "x", "--prior", str(bundle), "--decoder", str(bundle),
                         "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "CLIP text encoder" in err and "Traceback" not in err, err
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ non-finite values
LORA_LAYER = "lora_unet_down_blocks_0_2_attention_attn_out_proj"  # the first AttnBlock's out_proj in nano's Stage C


def lora_file(path: Path, down: float, up: float, alpha=None) -> Path:
    """A kohya-format rank-4 LoRA of one nano Stage C layer, every value of down/up set as given."""
    state = {f"{LORA_LAYER}.lora_down.weight": torch.full((4, 128), down),
             f"{LORA_LAYER}.lora_up.weight": torch.full((128, 4), up)}
    if alpha is not None:
        state[f"{LORA_LAYER}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("down,up,alpha,needle", [
    (float("nan"), 0.01, None, "NaN or infinite"),
    (0.01, float("inf"), None, "NaN or infinite"),
    (0.01, 0.01, float("nan"), "alpha"),
    (1000.0, 1000.0, None, "can change weights by up to 4e+06"),
])
def test_broken_lora_files_are_refused_at_load(nano, tmp_path, down, up, alpha, needle):
    before = nano.stage_c.state_dict()["down_blocks.0.2.attention.attn.out_proj.weight"].clone()
    with pytest.raises(CheckpointError, match=re.escape(needle)):
        nano.load_lora(lora_file(tmp_path / "broken.safetensors", down, up, alpha))
    assert nano.loras == {}
    assert torch.equal(nano.stage_c.state_dict()["down_blocks.0.2.attention.attn.out_proj.weight"], before)


def test_non_finite_lora_scales_are_refused(nano, tmp_path, capsys):
    path = lora_file(tmp_path / "fine.safetensors", 0.01, 0.01)
    for scale in (float("nan"), float("inf")):
        with pytest.raises(InputError, match="finite"):
            nano.load_lora(path, scale=scale)
    assert nano.loras == {}
    name = nano.load_lora(path, scale=0.5)
    try:
        with pytest.raises(InputError, match="finite"):
            nano.set_lora_scale(name, float("-inf"))
    finally:
        nano.unload_loras()
    for scale in ("nan", "inf", "-Infinity"):
        one_line_error(*run_cli(["generate", "x", "--lora", f"{path}:{scale}", "--out", str(tmp_path / "o")],
                                capsys), "finite number")


def test_latents_that_turn_non_finite_fail_naming_the_lora(nano, tmp_path):
    name = nano.load_lora(lora_file(tmp_path / "loud.safetensors", 0.5, 0.5), scale=1e30)  # finite, absurd
    try:
        with pytest.raises(CheckpointError, match=r"Stage C produced NaN or infinite latents.*LoRAs \['loud'\]"):
            nano("a red circle", seed=0, progress=False, **TINY)
    finally:
        nano.unload_loras()
    assert nano("a red circle", seed=0, progress=False, **TINY)[0].getextrema() != ((0, 0), (0, 0), (0, 0))


# ------------------------------------------------------------------------------------------ fuzzing the HTTP API
FUZZ_EXAMPLES = 300  # about a minute on a laptop CPU


def test_schemathesis_fuzz_of_the_http_api_finds_no_5xx(nano):
    """Positive and negative cases generated from the server's own OpenAPI schema, sent to uvicorn on 127.0.0.1.
    Jobs are queued without ?wait (a waiting request would make the fuzz as slow as generation)."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase
    from schemathesis import GenerationMode

    app = server.create_app(nano, max_queue=2, max_pixels=64 * 64, max_body_bytes=256 * 1024)
    with live_server(app) as port:
        base = f"http://127.0.0.1:{port}"
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        strategy = st.one_of(*(schema.as_strategy(mode, query={"wait": "false"})
                               for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)))
        tried, server_errors = collections.Counter(), []

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def fuzz(case):
            response = case.call(base_url=base, timeout=30)
            tried[f"{case.method} {case.path}"] += 1
            if response.status_code >= 500 and response.status_code != 501:  # 501: what the model cannot run
                server_errors.append((case.method, case.formatted_path, response.status_code, response.text[:300]))

        fuzz()
        for job in requests.get(f"{base}/v1/jobs", timeout=30).json():  # leave no work behind
            requests.delete(f"{base}/v1/jobs/{job['id']}", timeout=30)
        health = requests.get(f"{base}/health", timeout=10)
    print(f"schemathesis: {sum(tried.values())} cases: {dict(tried)}")
    assert not server_errors, server_errors[:5]
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert sum(tried.values()) >= FUZZ_EXAMPLES // 2 and len(tried) >= 8  # most operations were reached
