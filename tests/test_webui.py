"""The Gradio web UI over the tiny random pipeline, driven in a real headless Chromium (Debian's `chromium`,
through Playwright): type a prompt, click Generate, see the image. Plus the handlers without a browser
(previews streamed, cancellation, input errors) and the UI served together with the HTTP API.

Chromium is required, not optional: CI installs it (`apt-get install -y chromium`); point
$STABLECASCADE_CHROMIUM at another binary if it lives elsewhere."""

import json
import os
import shutil
import socket
import time

import pytest
from PIL import Image

from stablecascade import webui

SMALL = {"width": 64, "height": 64, "prior_steps": 2, "decoder_steps": 1, "num_images": 1}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str:
    path = os.environ.get("STABLECASCADE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path or not os.path.exists(path):
        pytest.fail("Chromium is needed for the web UI test and was not found: install it (Debian/Ubuntu: "
                    "`apt-get install -y chromium`) or set STABLECASCADE_CHROMIUM to its path", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("ui-out")
    port = free_port()
    demo = webui.launch(pipe, port=port, out_dir=out, defaults=SMALL, block=False, quiet=True, api=True,
                        extra_parameters={"prior": "tiny", "decoder": "tiny", "dtype": "float32"})
    yield demo, f"http://127.0.0.1:{port}/", out
    webui.close(demo)


def local_only(page, url: str) -> list:
    """Make the page fail every request that leaves the server (the app must work offline); returns them."""
    outside = []

    def route(r):
        if r.request.url.startswith(url.rstrip("/")):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    return outside


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the Python package playwright is needed for the web UI test: pip install playwright",
                    pytrace=False)
    executable = chromium_path()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_typing_a_prompt_and_clicking_generate_shows_an_image(ui, browser, tmp_path):
    demo, url, out = ui
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    outside = local_only(page, url)  # the app must work without (and never reach for) the internet
    page.goto(url)
    page.wait_for_selector("#txt2img-prompt textarea", timeout=30_000)
    for tab in ("Text to image", "Image variation", "Image to image", "ControlNet", "LoRA"):
        assert page.get_by_role("tab", name=tab).is_visible(), tab
    page.fill("#txt2img-prompt textarea", "a lighthouse at dusk")
    page.click("#txt2img-generate")
    page.wait_for_selector("#gallery img", timeout=60_000)
    page.wait_for_function("document.querySelector('#status').innerText.includes('Done')", timeout=30_000)
    # the picture really decoded in the browser, at the generated size
    size = page.eval_on_selector("#gallery img", "img => [img.naturalWidth, img.naturalHeight]")
    assert size == [64, 64]
    assert page.query_selector("#preview img") is not None  # the last Stage C preview stays on screen
    shown = page.inner_text("#parameters")  # the parameters of the new image, next to the gallery
    assert "a lighthouse at dusk" in shown and "prior_steps" in shown and "seed" in shown
    page.screenshot(path=str(tmp_path / "webui.png"), full_page=True)
    assert outside == []
    page.close()
    # the saved PNG carries the parameters, plus the model names
    saved = sorted(out.glob("*.png"))
    assert len(saved) == 1
    with Image.open(saved[0]) as im:
        params = json.loads(im.text["stablecascade"])
        assert im.size == (64, 64)
    assert params["prompt"] == "a lighthouse at dusk" and params["prior_steps"] == 2 and params["prior"] == "tiny"


def test_generate_streams_previews_then_the_gallery(pipe, tmp_path):
    from stablecascade.jobs import Worker

    with Worker(pipe) as worker:
        ui = webui.WebUI(worker, out_dir=tmp_path, defaults=SMALL)
        values = {**ui.defaults, "prompt": "a fox", "negative_prompt": "", "randomize_seed": False, "seed": 7,
                  "prior_steps": 3}
        updates = list(ui._generate(ui._txt2img, values, [{"path": "older.png", "caption": "old", "parameters": {}}],
                                    "seed-box", None))
    assert updates[0]["seed-box"] == 7
    previews = [u[ui._preview_box] for u in updates if ui._preview_box in u]
    assert previews and previews[-1].size == (256, 256)  # 16x16 Previewer output, enlarged for display
    final = updates[-1]
    gallery = final[ui._gallery_box]
    assert len(gallery) == 2 and gallery[1] == ("older.png", "old")  # newest first
    assert gallery[0][1].startswith("a fox · text-to-image · seed 7 · 64×64 · C 3 steps")
    assert final[ui._details_box]["seed"] == 7 and "Done: 1 image(s)" in final[ui._status_box]


def test_closing_the_stream_cancels_the_job_and_bad_input_is_reported(pipe, tmp_path):
    from stablecascade.jobs import Worker

    with Worker(pipe) as worker:
        ui = webui.WebUI(worker, out_dir=tmp_path, defaults=SMALL)
        values = {**ui.defaults, "prompt": "slow", "negative_prompt": "", "prior_steps": 50, "previews": False}
        stream = ui._generate(ui._txt2img, values, [], "seed-box", None)
        next(stream)
        job = worker.jobs()[-1]
        deadline = time.monotonic() + 30
        while job.status == "queued" and time.monotonic() < deadline:
            time.sleep(0.01)
        stream.close()  # what Gradio does when the user cancels or leaves
        assert job.wait(30) and job.status == "cancelled" and not job.pngs
        # input errors go to the status line only: the gallery, preview, parameters and seed keep what they show
        updates = list(ui._generate(ui._txt2img, {**values, "prompt": "  "}, [], "seed-box", None))
        assert updates == [{ui._status_box: "⚠ type a prompt first"}]
        updates = list(ui._generate(ui._img2img, {**values, "image": None, "strength": 0.5}, [], "seed-box", None))
        assert updates == [{ui._status_box: "⚠ upload an input image"}]


def test_ui_and_http_api_from_one_process(pipe, tmp_path):
    import httpx

    port = free_port()
    demo = webui.launch(pipe, port=port, out_dir=tmp_path, defaults=SMALL, block=False, quiet=True, api=True,
                        api_key="k")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            assert c.get("/health").json()["auth"] is True
            assert c.get("/v1/jobs").status_code == 401
            r = c.post("/v1/txt2img?wait=true", headers={"X-API-Key": "k"},
                       json={"prompt": "x", "width": 64, "height": 64, "prior_steps": 1, "decoder_steps": 1})
            assert r.status_code == 200 and r.json()["status"] == "done"
            page = c.get("/")
            assert page.status_code == 200 and "gradio" in page.text.lower()
    finally:
        webui.close(demo)


def test_controlnet_and_lora_tabs_run_real_jobs(tiny, small_parts, tmp_path):
    import stablecascade
    import torch

    from stablecascade.jobs import Worker
    from test_server import kohya_lora_file, tiny_canny_controlnet

    own = stablecascade.load_pipeline(tiny.prior, tiny.decoder, device="cpu", dtype=torch.float32,
                                      effnet=small_parts.effnet, previewer=small_parts.previewer)
    if not (callable(getattr(own, "controlnet", None)) and callable(getattr(own, "load_lora", None))):
        pytest.skip("the pipeline has no ControlNet/LoRA support yet")
    own.load_controlnet("canny", tiny_canny_controlnet(own, tmp_path / "canny.safetensors"))
    (tmp_path / "loras").mkdir()
    kohya_lora_file(own, tmp_path / "loras" / "style.safetensors")
    with Worker(own) as worker:
        ui = webui.WebUI(worker, out_dir=tmp_path / "out", lora_dir=tmp_path / "loras", defaults=SMALL)
        assert ui._lora_files() == ["style.safetensors"]
        base = {**ui.defaults, "negative_prompt": "", "randomize_seed": False, "seed": 3, "previews": False}
        control = {**base, "kind": "canny", "image": Image.new("RGB", (64, 64), "white"), "mask": None,
                   "control_strength": 1.0, "prompt": "a house", "size_from_input": True}
        final = list(ui._generate(ui._controlnet, control, [], "seed-box", None))[-1]
        gallery = final[ui._gallery_box]
        assert [c for _, c in gallery][1] == "control image (canny)" and "controlnet" in gallery[0][1]
        lora = {**base, "files": ["style.safetensors"], "upload": None, "scale": 0.8, "prompt": "a cat"}
        final = list(ui._generate(ui._lora, lora, [], "seed-box", None))[-1]
        assert final[ui._gallery_box][0][1].endswith("LoRA style.safetensors@0.8")
        assert final[ui._details_box]["loras"] == [{"path": "style.safetensors", "scale": 0.8}]


def test_an_error_keeps_earlier_results_and_tabs_the_model_cannot_run_are_disabled(ui, browser, pipe, tmp_path):
    demo, url, out = ui
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    outside = local_only(page, url)
    page.goto(url)
    page.wait_for_selector("#txt2img-prompt textarea", timeout=30_000)
    # the tiny test model fits none of the released ControlNets: its tab is disabled and the reason is shown
    reason = pipe.capabilities().reason("controlnet")
    assert reason and page.get_by_role("tab", name="ControlNet").is_disabled()
    assert not page.get_by_role("tab", name="Text to image").is_disabled()
    assert "ControlNet" in page.inner_text("#unavailable") and "3.6B Stage C" in page.inner_text("#unavailable")
    page.fill("#txt2img-prompt textarea", "a red door")
    page.click("#txt2img-generate")
    page.wait_for_function("document.querySelector('#status').innerText.includes('Done')", timeout=60_000)
    shown = page.inner_text("#parameters")
    page.fill("#txt2img-prompt textarea", "   ")
    page.click("#txt2img-generate")
    page.wait_for_function("document.querySelector('#status').innerText.includes('type a prompt first')",
                           timeout=30_000)
    # the gallery, the parameters and the seed still show the earlier results, with no error badge on them
    assert page.query_selector("#gallery img") is not None and page.inner_text("#parameters") == shown
    for box in ("#gallery", "#parameters", "#preview"):
        assert "Error" not in page.inner_text(box), box
    assert page.locator(".error").count() == 0  # Gradio's red error badges over the outputs
    page.screenshot(path=str(tmp_path / "error-keeps-results.png"), full_page=True)
    assert outside == []
    page.close()


def test_api_docs_render_offline_in_the_browser(ui, browser):
    demo, url, out = ui
    named = {fn.api_name for fn in demo.fns.values()}
    assert {"txt2img", "variation", "img2img", "controlnet", "lora", "cancel"} <= named  # not /run, /run_1...
    page = browser.new_page()
    outside = local_only(page, url)
    page.goto(url + "docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    assert "stablecascade API" in page.inner_text(".swagger-ui .info .title")
    page.get_by_text("/sdapi/v1/txt2img", exact=True).first.wait_for(timeout=10_000)
    page.goto(url + "redoc")
    page.get_by_text("/v1/txt2img", exact=True).first.wait_for(timeout=30_000)
    # ReDoc asks for a web font and its own logo from the internet, and renders without them; nothing else leaves
    assert [u for u in outside if not u.startswith(("https://fonts.googleapis.com/", "https://cdn.redoc.ly/"))] == []
    page.close()


def test_the_status_line_says_how_many_jobs_are_ahead_and_how_far_the_running_one_is(pipe, tmp_path):
    import re

    from stablecascade.jobs import Worker

    with Worker(pipe) as worker:
        ui = webui.WebUI(worker, out_dir=tmp_path, defaults=SMALL)
        slow = dict(prompt="a fox", width=64, height=64, prior_steps=200, decoder_steps=1, seed=1)
        running = worker.submit("txt2img", slow)
        deadline = time.monotonic() + 30
        while running.progress.get("step", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        second, third = worker.submit("txt2img", slow), worker.submit("txt2img", slow)
        assert ui._status(second) == "Queued: 1 ahead." and ui._status(third) == "Queued: 2 ahead."
        assert re.fullmatch(r"Stage C step \d+ / 200 \(\d+ %, about \d+ s left\)…", ui._status(running))
        for job in (third, second, running):
            worker.cancel(job.id)
        assert running.wait(30) and running.status == "cancelled"


def test_decoder_guidance_defaults_to_the_pipelines_for_the_chosen_sampler(pipe, tmp_path):
    from stablecascade.jobs import Worker
    from stablecascade.settings import DEFAULTS

    with Worker(pipe) as worker:
        official = webui.WebUI(worker, out_dir=tmp_path, defaults=SMALL)
        diffusers = webui.WebUI(worker, out_dir=tmp_path, defaults={**SMALL, "sampling": "diffusers"})
        values = {**diffusers.defaults, "prompt": "a fox", "negative_prompt": "", "randomize_seed": False}
        final = list(diffusers._generate(diffusers._txt2img, values, [], "seed-box", None))[-1]
    assert official.defaults["sampling"] == DEFAULTS.sampler == "official"
    assert official.defaults["decoder_guidance"] == pipe.decoder_guidance == 1.1
    assert diffusers.defaults["decoder_guidance"] == 0.0
    assert final[diffusers._details_box]["decoder_guidance"] == 0.0  # what the job ran with
    # picking a sampler sets the slider of its tab to that sampler's default
    radios = {fn.inputs[0]._id for fn in official.blocks.fns.values() if fn.fn == official.decoder_guidance_for}
    assert len(radios) == len(webui.TAB_LABELS)
    assert [official.decoder_guidance_for(s) for s in ("diffusers", "euler", "official")] == [0.0, 1.1, 1.1]
