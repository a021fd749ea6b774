"""Hostile and careless input: each bad input gets a clear error (type and message, HTTP status or CLI exit code),
never a traceback, a 5xx, unbounded memory or lost work. Runs on the built-in nano model at 64x64."""

import contextlib
import io
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import stablecascade
from stablecascade import server

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
