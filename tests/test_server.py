"""The HTTP API (FastAPI) over the tiny random pipeline: every endpoint, bad payloads, limits, the job queue,
cancellation, timeouts, the API key, and concurrent requests through the single worker."""

import base64
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastapi.testclient import TestClient

from stablecascade import server

FAST = {"width": 64, "height": 64, "prior_steps": 2, "decoder_steps": 1}
SLOW = {"width": 64, "height": 64, "prior_steps": 200, "decoder_steps": 1}  # long enough to cancel while running


def b64_image(width=64, height=64, seed=0, fmt="PNG") -> str:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def decode(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def wait_for(client, job_id, statuses=("done", "failed", "cancelled"), timeout=60, headers=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job}")


@pytest.fixture(scope="module")
def client(pipe):
    app = server.create_app(pipe, max_queue=2, max_pixels=256 * 256, max_body_bytes=512 * 1024, max_timeout=120,
                            extra_parameters={"prior": "tiny", "decoder": "tiny", "dtype": "float32"})
    with TestClient(app) as c:
        yield c


def test_openapi_lists_every_endpoint_and_health_needs_no_key(client):
    spec = client.get("/openapi.json").json()
    for path in ("/v1/txt2img", "/v1/img2img", "/v1/variation", "/v1/controlnet", "/v1/jobs", "/v1/jobs/{job_id}",
                 "/v1/jobs/{job_id}/images/{index}.png", "/v1/jobs/{job_id}/preview.png", "/v1/loras", "/health"):
        assert path in spec["paths"], path
    assert "delete" in spec["paths"]["/v1/jobs/{job_id}"]
    txt2img = spec["components"]["schemas"]["Txt2Img"]
    assert "prompt" in txt2img["required"] and txt2img["properties"]["prior_steps"]["maximum"] == 200
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["queue"]["max"] == 2 and health["device"] == "cpu"
    assert health["auth"] is False and health["limits"]["max_pixels"] == 256 * 256


def test_docs_are_served_offline_with_examples_and_prompt_first(client, pipe):
    spec = client.get("/openapi.json").json()
    txt2img = spec["components"]["schemas"]["Txt2Img"]
    assert list(txt2img["properties"])[0] == "prompt"
    for path in ("/v1/txt2img", "/v1/img2img"):
        example = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["examples"]["example"]
        assert example["value"]["width"] == pipe.native_size and example["value"]["prompt"] == \
            pipe.capabilities().examples[0]
    assert "/sdapi/v1/txt2img" in spec["paths"] and "/sdapi/v1/progress" in spec["paths"]
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert "cdn.jsdelivr.net" not in html and "/static-offline-docs/" in html
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200


def test_names_from_diffusers_and_a1111_are_accepted_and_unknown_ones_get_a_suggestion(client):
    r = client.post("/v1/txt2img?wait=true", json={"prompt": "a fox", "num_inference_steps": 2, "guidance_scale": 3.5,
                                                    "seed": -1, "width": 64, "height": 64, "decoder_steps": 1})
    assert r.status_code == 200, r.text
    params = r.json()["images"][0]["parameters"]
    assert params["prior_steps"] == 2 and params["prior_guidance"] == 3.5 and isinstance(params["seed"], int)
    r = client.post("/v1/txt2img", json={"prompt": "a fox", "steps": 2, "prior_steps": 3})
    assert r.status_code == 422 and "not both" in r.json()["message"]
    r = client.post("/v1/txt2img", json={"prompt": "a fox", "negative_promt": "x"})
    assert r.status_code == 422 and "did you mean 'negative_prompt'" in r.json()["message"]


def test_txt2img_wait_returns_the_pipelines_images_with_parameters(client, pipe):
    r = client.post("/v1/txt2img?wait=true", json={"prompt": "a red circle", "negative_prompt": "blurry",
                                                    "seed": 5, "num_images_per_prompt": 2, **FAST})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "done" and job["mode"] == "txt2img" and len(job["images"]) == 2
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    images = [decode(im["base64"]) for im in job["images"]]
    assert all(im.size == (64, 64) and im.format == "PNG" for im in images)
    params = job["images"][1]["parameters"]
    assert params["prompt"] == "a red circle" and params["negative_prompt"] == "blurry" and params["seed"] == 6  # seed + index
    assert params["prior_steps"] == 2 and params["decoder_steps"] == 1 and params["prior"] == "tiny"
    assert json.loads(images[1].text["stablecascade"]) == params  # the PNG carries them too
    assert job["request"]["prompt"] == "a red circle" and job["request"]["seed"] == 5
    # the same pixels as calling the pipeline directly with the same seed
    direct = pipe("a red circle", negative_prompt="blurry", seed=5, num_images_per_prompt=2, progress=False, **FAST)
    assert [np.asarray(im.convert("RGB")).tolist() for im in images] == [np.asarray(d).tolist() for d in direct]
    # and the PNG endpoint serves the same file
    png = client.get(job["images"][0]["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == base64.b64decode(job["images"][0]["base64"])
    assert client.get(f"/v1/jobs/{job['id']}/images/2.png").status_code == 404


def test_async_job_lifecycle(client):
    r = client.post("/v1/txt2img", json={"prompt": "a boat", "seed": 1, "previews": True, **FAST})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running") and job["images"] == []
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    done = wait_for(client, job["id"])
    assert done["status"] == "done" and done["started"] >= done["created"] and done["finished"] >= done["started"]
    assert done["progress"] == {"stage": "decoder", "step": 1, "total": 1, "percent": 100.0, "eta": 0.0}
    assert done["images"][0]["base64"] is None and done["images"][0]["parameters"]["seed"] == 1
    embedded = client.get(f"/v1/jobs/{job['id']}?include_images=true").json()["images"][0]["base64"]
    assert decode(embedded).size == (64, 64)
    # the live Stage C preview of the last prior step
    assert done["preview_url"] == f"/v1/jobs/{job['id']}/preview.png"
    preview = Image.open(io.BytesIO(client.get(done["preview_url"]).content))
    assert preview.size == (16, 16)  # the Previewer's 8x the 2x2 Stage C latent
    assert job["id"] in [j["id"] for j in client.get("/v1/jobs").json()]
    assert client.get("/v1/jobs/nope").status_code == 404
    # deleting a finished job leaves it as it was
    assert client.delete(f"/v1/jobs/{job['id']}").json()["status"] == "done"


def test_img2img_and_variation(client):
    r = client.post("/v1/img2img?wait=true", json={"image": "data:image/png;base64," + b64_image(96, 64),
                                                   "prompt": "a dog", "strength": 0.5, "seed": 2,
                                                   "prior_steps": 2, "decoder_steps": 1})
    assert r.status_code == 200, r.text
    job = r.json()
    assert decode(job["images"][0]["base64"]).size == (96, 64)  # the size follows the input
    assert job["images"][0]["parameters"]["strength"] == 0.5 and job["request"]["image_size"] == [96, 64]
    assert "image" not in job["request"]
    r = client.post("/v1/variation?wait=true", json={"images": [b64_image(seed=1), b64_image(seed=2, fmt="JPEG")],
                                                     "weights": [1.0, 0.5], "seed": 3, **FAST})
    assert r.status_code == 200, r.text
    params = r.json()["images"][0]["parameters"]
    assert params["mode"] == "variation" and params["image_weights"] == [1.0, 0.5]


@pytest.mark.parametrize("path,payload,status,needle", [
    ("/v1/txt2img", {"prompt": "x", "width": 100}, 422, "multiple of 8"),
    ("/v1/txt2img", {"prompt": "x", "prior_steps": 0}, 422, "prior_steps"),
    ("/v1/txt2img", {"prompt": "x", "decoder_steps": 500}, 422, "decoder_steps"),
    ("/v1/txt2img", {"prompt": "x", "sampling": "fast"}, 422, "sampling"),
    ("/v1/txt2img", {"prompt": "x", "colour": "red"}, 422, "colour"),
    ("/v1/txt2img", {"negative_prompt": "x"}, 422, "prompt"),
    ("/v1/txt2img", {"prompt": "x", "width": 8, "height": 64}, 422, "too small"),
    ("/v1/txt2img", {"prompt": "x", "timeout": 1000, **FAST}, 422, "maximum"),
    ("/v1/txt2img", {"prompt": "x", "loras": [{"name": "a.safetensors"}], **FAST}, None, "LoRA"),
    ("/v1/img2img", {"prompt": "x", "image": "%%% not base64 %%%"}, 400, "base64"),
    ("/v1/img2img", {"prompt": "x", "image": base64.b64encode(b"hello, world").decode()}, 400, "not a PNG"),
    ("/v1/img2img", {"prompt": "x", "image": b64_image(fmt="GIF")}, 400, "GIF"),
    ("/v1/img2img", {"prompt": "x", "image": b64_image(), "strength": 1.5}, 422, "strength"),
    ("/v1/variation", {"images": []}, 422, "images"),
    ("/v1/variation", {"images": [b64_image()], "weights": [1, 2]}, 422, "one weight per image"),
])
def test_bad_payloads_get_clear_4xx(client, path, payload, status, needle):
    r = client.post(path, json=payload)
    if status is None:  # LoRA: 501 until the pipeline supports it, then 400 (this server has no --lora-dir)
        status = 400 if callable(getattr(client.app.state.worker.pipe, "load_lora", None)) else 501
    assert r.status_code == status, r.text
    body = r.json()
    text = body.get("message") or body["detail"]
    assert needle in text, text
    assert client.get("/health").json()["queue"]["queued"] == 0  # nothing was queued


def test_malformed_json_and_oversize_inputs(client):
    r = client.post("/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = client.post("/v1/img2img", json={"prompt": "x", "image": b64_image(300, 300)})  # over 256*256 pixels
    assert r.status_code == 413 and "300x300" in r.json()["detail"]
    r = client.post("/v1/variation", json={"images": [b64_image(), b64_image(260, 256)]})
    assert r.status_code == 413 and "images[1]" in r.json()["detail"]
    r = client.post("/v1/txt2img", json={"prompt": "x", "width": 512, "height": 512})  # output over the limit
    assert r.status_code == 422 and "limit" in r.json()["detail"]
    r = client.post("/v1/txt2img", json={"prompt": "x" * 600_000})  # body over 512 KiB
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(200):
            yield b" " * 4096
        yield b'{"prompt": "x"}'

    r = client.post("/v1/txt2img", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_queue_limit_cancellation_and_timeout(client):
    running = client.post("/v1/txt2img", json={"prompt": "slow", **SLOW}).json()
    wait_for(client, running["id"], statuses=("running",))
    queued = [client.post("/v1/txt2img", json={"prompt": f"q{i}", "seed": i, **FAST}).json() for i in range(2)]
    assert [q["queue_position"] for q in queued] == [0, 1]
    full = client.post("/v1/txt2img", json={"prompt": "one too many", **FAST})
    assert full.status_code == 429 and "full" in full.json()["detail"] and full.headers["retry-after"]
    # a queued job is dropped at once
    dropped = client.delete(f"/v1/jobs/{queued[0]['id']}").json()
    assert dropped["status"] == "cancelled" and dropped["started"] is None
    # the running one stops at its next sampling step
    time.sleep(0.2)
    cancelled = client.delete(f"/v1/jobs/{running['id']}").json()
    assert cancelled["status"] == "cancelled" and cancelled["images"] == []
    assert cancelled["progress"]["stage"] == "prior" and 0 < cancelled["progress"]["step"] < 200
    # the queue moves on
    after = wait_for(client, queued[1]["id"])
    assert after["status"] == "done" and after["images"][0]["parameters"]["prompt"] == "q1"
    assert wait_for(client, queued[0]["id"])["started"] is None  # never ran
    # a timeout stops a running job too, and ?wait=true reports it as 504
    r = client.post("/v1/txt2img?wait=true", json={"prompt": "too slow", "timeout": 0.5, **SLOW})
    assert r.status_code == 504 and r.json()["status"] == "failed"
    assert r.json()["error"]["type"] == "timeout" and "0.5" in r.json()["error"]["message"]


def test_concurrent_requests_run_one_at_a_time(pipe):
    app = server.create_app(pipe, max_queue=8)
    results = {}
    with TestClient(app) as c:
        def post(i):
            results[i] = c.post("/v1/txt2img?wait=true", json={"prompt": f"p{i}", "seed": 100 + i, **FAST})

        threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert sorted(results) == [0, 1, 2, 3]
    jobs = []
    for i, r in results.items():
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["images"][0]["parameters"]["prompt"] == f"p{i}" and job["images"][0]["parameters"]["seed"] == 100 + i
        assert decode(job["images"][0]["base64"]).size == (64, 64)
        jobs.append(job)
    jobs.sort(key=lambda j: j["started"])
    for earlier, later in zip(jobs, jobs[1:]):
        assert earlier["finished"] <= later["started"]  # never two generations at once


def test_api_key(pipe, monkeypatch):
    with TestClient(server.create_app(pipe, api_key="s3cret")) as c:
        assert c.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "nope"}):
            r = c.get("/v1/jobs", headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["detail"]
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/txt2img", json={"prompt": "x"}).status_code == 401
        assert c.get("/v1/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/jobs", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/health").json()["auth"] is True
        spec = c.get("/openapi.json").json()
        assert {"HTTPBearer", "APIKeyHeader"} <= set(spec["components"]["securitySchemes"])
    monkeypatch.setenv(server.API_KEY_ENV, "from-env")
    with TestClient(server.create_app(pipe)) as c:
        assert c.get("/v1/jobs").status_code == 401
        assert c.get("/v1/jobs", headers={"X-API-Key": "from-env"}).status_code == 200


class StubPipe:
    """Stands in for the pipeline where the real one lacks a feature: records LoRA calls, runs 'steps' through a
    Stage C module so the worker's step hooks fire."""

    min_size, native_size, decoder_guidance, device, dtype = 8, 64, 0.0, "cpu", torch.float32

    def __init__(self):
        self.stage_c = torch.nn.Identity()
        self.calls = []
        self.loras = {}

    def __call__(self, prompt, **kw):
        for _ in range(kw.get("prior_steps", 1)):
            self.stage_c(torch.zeros(1))
        image = Image.new("RGB", (kw.get("width", 64), kw.get("height", 64)), "red")
        image.info["parameters"] = {"prompt": prompt, "merged": dict(self.loras)}
        return [image]

    def capabilities(self):
        from stablecascade.capabilities import MODES, Capabilities

        return Capabilities(native_size=64, min_size=8, max_size=128, size_step=8, modes=dict.fromkeys(MODES),
                            controlnets={}, previews=None, examples=["a red fox"])

    def load_lora(self, path, scale=1.0, mode="merge"):
        path = Path(path)
        self.calls.append(("load", path.name, scale))
        self.loras[path.stem] = scale
        return path.stem

    def unload_loras(self):
        self.calls.append(("unload",))
        self.loras.clear()


def test_loras_are_resolved_in_the_lora_dir_and_merged_per_job(tmp_path):
    (tmp_path / "style.safetensors").write_bytes(b"")
    (tmp_path / "other.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    stub = StubPipe()
    with TestClient(server.create_app(stub, lora_dir=tmp_path)) as c:
        assert c.get("/v1/loras").json() == {"available": True, "loras": ["other.safetensors", "style.safetensors"]}
        for name in ("missing.safetensors", "../style.safetensors", "notes.txt"):
            r = c.post("/v1/txt2img", json={"prompt": "x", "loras": [{"name": name}]})
            assert r.status_code == 400 and "unknown LoRA" in r.json()["detail"]
        style = [{"name": "style.safetensors", "scale": 0.7}]
        r = c.post("/v1/txt2img?wait=true", json={"prompt": "x", "loras": style})
        assert r.status_code == 200
        params = r.json()["images"][0]["parameters"]
        assert params["loras"] == [{"path": "style.safetensors", "scale": 0.7}] and params["merged"] == {"style": 0.7}
        c.post("/v1/txt2img?wait=true", json={"prompt": "y", "loras": style})
        assert stub.calls == [("load", "style.safetensors", 0.7)]  # unchanged set: merged once
        r = c.post("/v1/txt2img?wait=true", json={"prompt": "z"})
        params = r.json()["images"][0]["parameters"]
        assert "loras" not in params and params["merged"] == {} and stub.calls[-1] == ("unload",)


# ------------------------------------------------------------------------ ControlNet and LoRA on the real pipeline
@pytest.fixture(scope="module")
def own_pipe(tiny, small_parts):
    """A pipeline of its own: the ControlNets and LoRAs loaded here must not leak into the shared one."""
    import stablecascade

    return stablecascade.load_pipeline(tiny.prior, tiny.decoder, device="cpu", dtype=torch.float32,
                                       effnet=small_parts.effnet, previewer=small_parts.previewer)


def tiny_canny_controlnet(pipe, path):
    from stablecascade import checkpoints
    from stablecascade.models.controlnet import CONTROLNET, ControlNet, ControlNetConfig

    torch.manual_seed(0)
    config = ControlNetConfig(c_in=CONTROLNET["canny"].c_in, c_proj=pipe.stage_c.config.c_hidden[0],
                              proj_blocks=(0, 1))
    checkpoints.save_official(ControlNet(config).eval(), path)
    return path


def kohya_lora_file(pipe, path, seed=0):
    """A kohya-format LoRA on the out-projection of every attention block of the tiny Stage C."""
    from safetensors.torch import save_file

    from stablecascade.models.blocks import AttnBlock

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in pipe.stage_c.named_modules():
        if isinstance(module, AttnBlock):
            c = module.attention.attn.out_proj.weight.shape[0]
            key = "lora_unet_" + name.replace(".", "_") + "_attention_attn_out_proj"
            state[f"{key}.lora_down.weight"] = torch.randn(4, c, generator=g) * 0.5
            state[f"{key}.lora_up.weight"] = torch.randn(c, 4, generator=g) * 0.5
    save_file(state, str(path))
    return path


def test_controlnet_endpoint(own_pipe, tmp_path):
    payload = {"kind": "canny", "image": b64_image(), "prompt": "a house", "seed": 0, **FAST}
    if not callable(getattr(own_pipe, "controlnet", None)):  # before the pipeline had ControlNets
        with TestClient(server.create_app(own_pipe)) as c:
            r = c.post("/v1/controlnet", json=payload)
        assert r.status_code == 501 and "ControlNet" in r.json()["detail"]
        return
    own_pipe.load_controlnet("canny", tiny_canny_controlnet(own_pipe, tmp_path / "canny.safetensors"))
    with TestClient(server.create_app(own_pipe)) as c:
        assert c.get("/health").json()["modes"]["controlnet"]["available"] is True
        r = c.post("/v1/controlnet", json={**payload, "kind": "blur"})
        assert r.status_code == 422 and "kind" in r.json()["message"]
        r = c.post("/v1/controlnet?wait=true", json={**payload, "control_strength": 0.5})
        assert r.status_code == 200, r.text
        job = r.json()
        assert decode(job["images"][0]["base64"]).size == (64, 64)
        params = job["images"][0]["parameters"]
        assert params["controlnet"] == "canny" and params["control_strength"] == 0.5 and params["prompt"] == "a house"
        assert len(job["control_images"]) == 1 and job["request"]["kind"] == "canny"
        control = c.get(job["control_images"][0]["url"])
        assert control.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(control.content)).size == (64, 64)
        # what the model cannot run: 501 with the reason, before anything is queued or fetched
        r = c.post("/v1/controlnet?wait=true", json={**payload, "kind": "face"})
        assert r.status_code == 501 and "never released" in r.json()["detail"]
        r = c.post("/v1/controlnet?wait=true", json={**payload, "kind": "inpaint"})
        assert r.status_code == 501 and "3.6B Stage C" in r.json()["detail"]
        assert c.get("/health").json()["controlnets"]["inpaint"]["available"] is False


def test_real_lora_changes_the_image_and_unloading_restores_it(own_pipe, tmp_path):
    if not callable(getattr(own_pipe, "load_lora", None)):
        pytest.skip("the pipeline has no LoRA support yet")
    kohya_lora_file(own_pipe, tmp_path / "style.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    request = {"prompt": "a cat", "seed": 11, **FAST}
    with TestClient(server.create_app(own_pipe, lora_dir=tmp_path)) as c:
        plain = c.post("/v1/txt2img?wait=true", json=request).json()["images"][0]
        styled = c.post("/v1/txt2img?wait=true", json={**request, "loras": [{"name": "style.safetensors",
                                                                              "scale": 1.5}]})
        assert styled.status_code == 200, styled.text
        styled = styled.json()["images"][0]
        assert styled["parameters"]["loras"] == [{"path": "style.safetensors", "scale": 1.5}]
        assert own_pipe.loras == {"style": 1.5}
        assert decode(styled["base64"]).tobytes() != decode(plain["base64"]).tobytes()
        broken = c.post("/v1/txt2img?wait=true", json={**request, "loras": [{"name": "style.safetensors"},
                                                                             {"name": "broken.safetensors"}]})
        assert broken.status_code == 500 and "broken.safetensors" in broken.json()["error"]["message"]
        assert own_pipe.loras == {}  # nothing half-merged is left behind
        again = c.post("/v1/txt2img?wait=true", json=request).json()["images"][0]
        assert decode(again["base64"]).tobytes() == decode(plain["base64"]).tobytes()


def test_event_stream_reports_progress_with_totals_and_preview_frames(client):
    r = client.post("/v1/txt2img", json={"prompt": "a fox", **FAST, "prior_steps": 3, "decoder_steps": 2,
                                         "previews": True})
    job_id = r.json()["id"]
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in stream.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((name, line.split(":", 1)[1].strip()))
    names = [n for n, _ in events]
    assert names[-1] == "done" and json.loads(events[-1][1])["images"][0]["url"].endswith("/images/0.png")
    steps = [json.loads(d) for n, d in events if n == "progress"]
    prior = [e for e in steps if e.get("stage") == "prior"]
    decoder = [e for e in steps if e.get("stage") == "decoder"]
    # the stream reports the job's latest state each time it changed, so a step passed between two polls (e.g. the
    # prior's last one) may be skipped; the totals and the final state always arrive
    assert prior and {e["total"] for e in prior} == {3} and all(1 <= e["step"] <= 3 for e in prior)
    assert decoder[-1]["step"] == decoder[-1]["total"] == 2
    percents = [e["percent"] for e in prior + decoder]
    assert percents == sorted(percents) and percents[-1] == 100 and all("eta" in e for e in prior + decoder)
    frames = [Image.open(io.BytesIO(base64.b64decode(d))) for n, d in events if n == "preview"]
    assert frames and frames[-1].format == "PNG"
