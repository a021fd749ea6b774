"""The AUTOMATIC1111-compatible API (/sdapi/v1) driven by the real `webuiapi` client against a real `stablecascade
serve` (uvicorn on 127.0.0.1, a free port, the built-in nano model), the returned images' infotext read back with
sd-parsers."""

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import webuiapi
from sd_parsers import ParserManager

import stablecascade

KEY = "s3cret"
PROMPT = "a red circle at the top left on a blue background"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    port = free_port()
    src = str(Path(stablecascade.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    env.pop("STABLECASCADE_PRIOR", None), env.pop("STABLECASCADE_DECODER", None)
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "stablecascade.cli", "serve", "--port", str(port), "--api-key", KEY,
                             "--device", "cpu"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        log.seek(0)
        pytest.fail(f"`stablecascade serve` did not start:\n{log.read()[-3000:]}")
    yield port, base
    proc.terminate()
    proc.wait(30)
    log.close()


def client(port) -> webuiapi.WebUIApi:
    # A1111 clients send credentials as HTTP Basic auth; the server's key is the password
    return webuiapi.WebUIApi(host="127.0.0.1", port=port, username="anyone", password=KEY, sampler="Euler a",
                             steps=3)


def infotext_of(image) -> dict:
    info = ParserManager().parse(image)
    assert info is not None, image.info
    sampler = info.samplers[0]
    return {"prompt": info.full_prompt, "negative": info.full_negative_prompt, "sampler": sampler.name,
            **sampler.parameters, **info.metadata}


def test_webuiapi_txt2img_and_img2img_round_trips(served):
    port, _ = served
    api = client(port)
    result = api.txt2img(prompt=PROMPT, negative_prompt="blurry, dark", seed=7, cfg_scale=4, width=64, height=64,
                         batch_size=2)
    assert len(result.images) == 2 and all(im.size == (64, 64) for im in result.images)
    assert result.info["all_seeds"] == [7, 8] and result.info["sampler_name"] == "Euler a"
    for image, seed in zip(result.images, (7, 8)):
        parsed = infotext_of(image)
        assert parsed["prompt"] == PROMPT and parsed["negative"] == "blurry, dark"
        assert parsed["seed"] == str(seed) and parsed["steps"] == "3" and parsed["sampler"] == "Euler a"
        assert parsed["Size"] == "64x64" and parsed["cfg_scale"] == "4"
    assert result.info["infotexts"][0] == result.images[0].info["parameters"]

    edited = api.img2img(images=[result.image], prompt="a red circle at the top on a blue background",
                         denoising_strength=0.5, seed=3, steps=4, cfg_scale=3, width=64, height=64)
    assert len(edited.images) == 1 and edited.image.size == (64, 64)
    parsed = infotext_of(edited.image)
    assert parsed["prompt"] == "a red circle at the top on a blue background" and parsed["seed"] == "3"
    assert parsed["steps"] == "4" and parsed["Denoising strength"] == "0.5"
    assert edited.info["denoising_strength"] == 0.5


def test_models_samplers_options_progress_and_interrupt(served):
    port, base = served
    api = client(port)
    assert [m["model_name"] for m in api.get_sd_models()] == ["nano"]
    names = [s["name"] for s in api.get_samplers()]
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= set(names)
    assert api.get_options()["sd_model_checkpoint"] == "nano"
    api.set_options({"decoder_steps": 2})
    assert api.get_options()["decoder_steps"] == 2
    assert api.get_progress()["progress"] == 0
    assert api.interrupt() is not None
    # a long job: its progress shows steps, a total and an ETA; interrupt stops it at the next step
    done = {}
    thread = threading.Thread(target=lambda: done.setdefault("r", api.txt2img(prompt=PROMPT, steps=200, seed=1,
                                                                              width=64, height=64)))
    thread.start()
    seen = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        p = api.get_progress()
        if p["state"]["sampling_step"] >= 2:
            seen = p
            break
        time.sleep(0.05)
    assert seen is not None, "no progress reported"
    assert seen["state"]["sampling_steps"] == 200 and 0 < seen["progress"] < 1 and seen["eta_relative"] > 0
    api.interrupt()
    thread.join(60)
    assert done["r"].info["interrupted"] is True and done["r"].images == []


def test_the_key_guards_sdapi_and_bad_fields_are_explained(served):
    port, base = served
    assert httpx.get(f"{base}/sdapi/v1/samplers").status_code == 401
    assert httpx.get(f"{base}/sdapi/v1/samplers", auth=("x", "wrong")).status_code == 401
    r = httpx.post(f"{base}/sdapi/v1/txt2img", auth=("x", KEY), json={"prompt": "x", "sampler_name": "Heun++"})
    assert r.status_code == 422 and "Euler a" in r.json()["detail"]
    r = httpx.post(f"{base}/sdapi/v1/txt2img", auth=("x", KEY), json={"prompt": "x", "width": 4096, "height": 4096})
    assert r.status_code == 422 and "limit" in r.json()["detail"]


def test_decoder_guidance_defaults_to_the_pipelines_for_the_sampler(served):
    port, _ = served
    api = client(port)
    assert api.get_options()["decoder_cfg_scale"] is None  # none set: each sampler's own
    fast = dict(prompt=PROMPT, steps=1, width=64, height=64, override_settings={"decoder_steps": 1})
    guidance = {name: api.txt2img(sampler_name=name, **fast).info["decoder_cfg_scale"] for name in ("diffusers", "DDIM")}
    assert guidance["diffusers"] == 0.0 and guidance["DDIM"] > 1  # nano's own Stage B guidance with GDF samplers
    set_one = {**fast, "override_settings": {"decoder_steps": 1, "decoder_cfg_scale": 2.5}}
    assert api.txt2img(sampler_name="diffusers", **set_one).info["decoder_cfg_scale"] == 2.5
