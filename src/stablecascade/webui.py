"""`stablecascade ui`: a Gradio app over one shared pipeline (a thin shell: parsing and presenting only).

Tabs for text-to-image, image variation, image-to-image, ControlNet and LoRA, each with its advanced settings
(defaults of the official Gradio app: seed 0 randomised, prior 20 steps at guidance 4, decoder 10 steps; the size is
the model's own, 1024x1024 for the released models, and the decoder guidance the pipeline's default for the chosen
sampler, set again when another sampler is picked: 1.1 for the released models, 0 with "diffusers"). Jobs go to the same `jobs.Worker`
the HTTP API uses, so one model serves every user: the worker's queue holds jobs in line (the status line says how
many are ahead) and runs one at a time. While Stage C runs, the Previewer's picture of the current estimate is streamed; finished
images land in a gallery (newest first, captions with their settings, full parameters of the selected image) and are
saved as PNGs carrying their parameters.
`--api` serves the HTTP API (/v1, /docs) from the same process and queue.
"""

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from . import controlnets
from .errors import InputError, StableCascadeError
from .jobs import QueueFull, Worker
from .server import model_parameters
from .settings import DEFAULTS as SETTINGS

MAX_SEED = 2**31 - 1
DEFAULTS = {  # the official Gradio app's (gradio_app/app.py), decoder guidance unlocked; the rest from settings
    "num_images": 2, "prior_steps": SETTINGS.prior_steps, "prior_guidance": SETTINGS.prior_guidance,
    "decoder_steps": SETTINGS.decoder_steps, "seed": 0, "randomize_seed": True, "sampling": SETTINGS.sampler,
    "strength": 0.8, "control_strength": 1.0, "lora_scale": 1.0, "previews": True,
}
STAGE_NAMES = {"prior": "Stage C", "decoder": "Stage B"}
TAB_LABELS = {"txt2img": "Text to image", "variation": "Image variation", "img2img": "Image to image",
              "controlnet": "ControlNet", "lora": "LoRA"}
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Consolas", "monospace"]


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry or version checks
    try:
        import gradio as gr
    except ImportError:
        raise InputError("gradio is not installed: install the web extra: pip install 'stablecascade[web]'") from None
    return gr


def theme():
    """Gradio's default theme on the system's fonts (nothing is fetched from font CDNs)."""
    gr = _gradio()
    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)


def caption(p: dict) -> str:
    """A one-line summary of an image's parameters for the gallery."""
    text = (f"{p.get('mode', '')} · seed {p.get('seed')} · {p.get('width')}×{p.get('height')} · "
            f"C {p.get('prior_steps')} steps cfg {p.get('prior_guidance')} · B {p.get('decoder_steps')} steps")
    if p.get("prompt"):
        text = f"{p['prompt'][:60]} · {text}"
    if p.get("loras"):
        text += " · LoRA " + ", ".join(f"{x['path']}@{x['scale']:g}" for x in p["loras"])
    return text


def enlarge(image, at_least: int = 256):
    """Scale a small preview up by a whole factor (nearest neighbour) so the browser shows it crisp."""
    from PIL import Image

    factor = max(1, at_least // max(image.size))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


class WebUI:
    """The Gradio Blocks app and its handlers. `defaults` override DEFAULTS (e.g. small sizes for tests)."""

    def __init__(self, worker: Worker, *, out_dir=None, lora_dir=None, defaults: Optional[dict] = None,
                 title: str = "Stable Cascade"):
        self.worker = worker
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="stablecascade-ui-"))
        self.lora_dir = Path(lora_dir).expanduser() if lora_dir else None
        native = {"width": worker.pipe.native_size, "height": worker.pipe.native_size,
                  "compression": worker.pipe.compression}
        self.defaults = {**DEFAULTS, **native, **(defaults or {})}
        self.defaults.setdefault("decoder_guidance", self.decoder_guidance_for(self.defaults["sampling"]))
        self.title = title
        self.caps = worker.capabilities()
        self._session_jobs: dict = {}
        self._lock = threading.Lock()
        self.blocks = self._build()

    def decoder_guidance_for(self, sampler: str) -> float:
        """The decoder guidance slider's value for `sampler`: the pipeline's default (0 for "diffusers")."""
        return self.worker.pipe.default_decoder_guidance(sampler)

    # ----------------------------------------------------------------------------------------- layout
    def _advanced(self, gr, tab: str, size_from_input: bool = False) -> dict:
        from .sampling import SAMPLERS

        d, caps = self.defaults, self.caps
        lo, hi = caps.min_size, max(caps.max_size, d["width"], d["height"])
        step = 64 if lo % 64 == 0 and hi % 64 == 0 else caps.size_step
        c = {}
        with gr.Accordion("Advanced settings", open=False):
            c["negative_prompt"] = gr.Textbox(label="Negative prompt", value="", placeholder="what to steer away from",
                                              elem_id=f"{tab}-negative")
            if size_from_input:
                c["size_from_input"] = gr.Checkbox(label="Size from the input image (at most 1024×1024 of area)",
                                                   value=True)
            with gr.Row():
                c["width"] = gr.Slider(lo, hi, value=d["width"], step=step, label="Width", elem_id=f"{tab}-width")
                c["height"] = gr.Slider(lo, hi, value=d["height"], step=step, label="Height", elem_id=f"{tab}-height")
            with gr.Row():
                c["seed"] = gr.Slider(0, MAX_SEED, value=d["seed"], step=1, label="Seed", elem_id=f"{tab}-seed")
                c["randomize_seed"] = gr.Checkbox(label="Randomize seed", value=d["randomize_seed"],
                                                  elem_id=f"{tab}-randomize")
            c["num_images"] = gr.Slider(1, 4, value=d["num_images"], step=1, label="Images per prompt")
            with gr.Row():
                c["prior_steps"] = gr.Slider(1, 50, value=d["prior_steps"], step=1, label="Prior (Stage C) steps")
                c["prior_guidance"] = gr.Slider(0, 20, value=d["prior_guidance"], step=0.1,
                                                label="Prior guidance scale")
            with gr.Row():
                c["decoder_steps"] = gr.Slider(1, 30, value=d["decoder_steps"], step=1, label="Decoder (Stage B) steps")
                c["decoder_guidance"] = gr.Slider(0, 20, value=d["decoder_guidance"], step=0.1,
                                                  label="Decoder guidance scale (≤ 1: off)")
            with gr.Row():
                c["compression"] = gr.Slider(8, 64, value=d["compression"], step=0.01,
                                             label="Compression (lower: more detail, slower)")
                c["sampling"] = gr.Radio(list(SAMPLERS), value=d["sampling"], label="Sampler")
            c["sampling"].input(self.decoder_guidance_for, c["sampling"], c["decoder_guidance"], queue=False,
                                api_name=False)
            c["previews"] = gr.Checkbox(label="Live previews (Stage C)", value=d["previews"])
        return c

    def _build(self):
        gr = _gradio()
        caps = self.caps
        d = self.defaults
        self.events = []
        unavailable = {TAB_LABELS[m]: caps.reason(m) for m in ("variation", "img2img", "controlnet") if caps.reason(m)}
        if not self.worker.loras_supported:
            unavailable[TAB_LABELS["lora"]] = "this pipeline cannot load LoRAs"
        with gr.Blocks(title=self.title, analytics_enabled=False) as blocks:
            gr.Markdown(f"# {self.title}\nStable Cascade (Würstchen v3): Stage C draws a tiny latent from your "
                        f"prompt, Stage B and Stage A turn it into pixels. This model draws best at "
                        f"{caps.native_size}×{caps.native_size} (sizes from {caps.min_size} to {caps.max_size}).")
            if unavailable:
                gr.Markdown("Not available with this model: " + "; ".join(
                    f"**{tab}**: {reason}" for tab, reason in unavailable.items()), elem_id="unavailable")
            history = gr.State([])

            def tab(mode):
                label = TAB_LABELS[mode]
                return gr.Tab(label, id=mode, elem_id=f"tab-{mode}", interactive=label not in unavailable)

            with gr.Tabs():
                with tab("txt2img"):
                    t_prompt = gr.Textbox(label="Prompt", lines=2, placeholder="what to draw", elem_id="txt2img-prompt")
                    t_button = gr.Button("Generate", variant="primary", elem_id="txt2img-generate")
                    t_adv = self._advanced(gr, "txt2img")
                    gr.Examples(caps.examples, inputs=[t_prompt])
                with tab("variation"):
                    with gr.Row():
                        v_image1 = gr.Image(label="Image", type="pil", elem_id="variation-image1")
                        v_image2 = gr.Image(label="Second image (optional, mixed in)", type="pil")
                    with gr.Row():
                        v_weight1 = gr.Slider(0, 2, value=1.0, step=0.05, label="Weight of the image")
                        v_weight2 = gr.Slider(0, 2, value=1.0, step=0.05, label="Weight of the second image")
                    v_prompt = gr.Textbox(label="Prompt (optional)", lines=1, elem_id="variation-prompt")
                    v_button = gr.Button("Generate variations", variant="primary", elem_id="variation-generate")
                    v_adv = self._advanced(gr, "variation")
                with tab("img2img"):
                    i_image = gr.Image(label="Input image", type="pil", elem_id="img2img-image")
                    i_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="img2img-prompt")
                    i_strength = gr.Slider(0, 1, value=d["strength"], step=0.01,
                                           label="Strength (0 keeps the input, 1 ignores it)")
                    i_button = gr.Button("Generate", variant="primary", elem_id="img2img-generate")
                    i_adv = self._advanced(gr, "img2img", size_from_input=True)
                with tab("controlnet"):
                    usable = [k for k in controlnets.KINDS if caps.controlnet_reason(k) is None]
                    c_kind = gr.Radio(usable or list(controlnets.KINDS), value=(usable or ["canny"])[0],
                                      label="ControlNet", info=controlnets.summary())
                    with gr.Row():
                        c_image = gr.Image(label="Control image", type="pil", elem_id="controlnet-image")
                        c_mask = gr.Image(label="Mask (inpaint; white = redraw)", type="pil", image_mode="L")
                    c_strength = gr.Slider(0, 2, value=d["control_strength"], step=0.05, label="Control strength")
                    c_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="controlnet-prompt")
                    c_button = gr.Button("Generate", variant="primary", elem_id="controlnet-generate",
                                         interactive=bool(usable))
                    c_adv = self._advanced(gr, "controlnet", size_from_input=True)
                with tab("lora"):
                    choices = self._lora_files()
                    l_files = gr.Dropdown(choices, value=[], multiselect=True, label="LoRAs from "
                                          f"{self.lora_dir or 'the --lora-dir folder (none given)'}")
                    l_upload = gr.File(label="…or upload LoRA files (.safetensors)", file_count="multiple",
                                       file_types=[".safetensors"])
                    l_scale = gr.Slider(-2, 2, value=d["lora_scale"], step=0.05, label="LoRA scale")
                    l_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="lora-prompt")
                    l_button = gr.Button("Generate", variant="primary", elem_id="lora-generate",
                                         interactive=self.worker.loras_supported)
                    l_adv = self._advanced(gr, "lora")
            with gr.Row():
                with gr.Column(scale=1):
                    preview = gr.Image(label="Live preview (Stage C)", interactive=False, format="png", height=256,
                                       elem_id="preview")
                    status = gr.Markdown("Ready.", elem_id="status")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                with gr.Column(scale=3):
                    gallery = gr.Gallery(label="Results (newest first)", columns=4, height=480, format="png",
                                         elem_id="gallery", interactive=False)
                    details = gr.JSON(label="Parameters of the selected image", elem_id="parameters")

            outputs = [preview, gallery, status, history, details]
            self._preview_box, self._gallery_box, self._status_box = preview, gallery, status
            self._history_box, self._details_box = history, details

            def wire(name: str, button, inputs: dict, adv: dict, build: Callable):
                fields = {**inputs, **adv}

                def run(data, request: gr.Request):
                    values = {name: data[comp] for name, comp in fields.items()}
                    yield from self._generate(build, values, data[history], adv["seed"], request)

                # the worker's queue orders the jobs (and says "2 ahead"); Gradio only bounds how many wait
                event = button.click(run, inputs={history, *fields.values()}, outputs=outputs + [adv["seed"]],
                                     api_name=name, concurrency_limit=self.worker.max_queue + 1,
                                     concurrency_id="jobs", show_progress="hidden")
                self.events.append(event)

            wire("txt2img", t_button, {"prompt": t_prompt}, t_adv, self._txt2img)
            wire("variation", v_button, {"image1": v_image1, "image2": v_image2, "weight1": v_weight1,
                                         "weight2": v_weight2, "prompt": v_prompt}, v_adv, self._variation)
            wire("img2img", i_button, {"image": i_image, "prompt": i_prompt, "strength": i_strength}, i_adv,
                 self._img2img)
            wire("controlnet", c_button, {"kind": c_kind, "image": c_image, "mask": c_mask,
                                          "control_strength": c_strength, "prompt": c_prompt}, c_adv, self._controlnet)
            wire("lora", l_button, {"files": l_files, "upload": l_upload, "scale": l_scale, "prompt": l_prompt},
                 l_adv, self._lora)

            def stop(request: gr.Request):
                job_id = self._session_jobs.get(getattr(request, "session_hash", None))
                if job_id:
                    self.worker.cancel(job_id)
                return "Cancelled."

            cancel.click(stop, None, status, cancels=self.events, queue=False, api_name="cancel")

            def select(items, evt: gr.SelectData):
                return items[evt.index]["parameters"] if 0 <= evt.index < len(items) else None

            gallery.select(select, history, details, queue=False, api_name=False)
        return blocks

    def _lora_files(self) -> list:
        if self.lora_dir is None or not self.lora_dir.is_dir():
            return []
        return sorted(p.name for p in self.lora_dir.glob("*.safetensors"))

    # ------------------------------------------------------------------------------- request building
    @staticmethod
    def _options(v: dict, size: bool = True) -> dict:
        seed = random.randint(0, MAX_SEED) if v["randomize_seed"] else int(v["seed"])
        options = dict(negative_prompt=v["negative_prompt"] or "", num_images_per_prompt=int(v["num_images"]),
                       prior_steps=int(v["prior_steps"]), prior_guidance=float(v["prior_guidance"]),
                       decoder_steps=int(v["decoder_steps"]), decoder_guidance=float(v["decoder_guidance"]),
                       seed=seed, sampling=v["sampling"], compression=float(v["compression"]))
        if size and not v.get("size_from_input"):
            options.update(width=int(v["width"]), height=int(v["height"]))
        return options

    def _txt2img(self, v):
        if not (v["prompt"] or "").strip():
            raise InputError("type a prompt first")
        return "txt2img", dict(prompt=v["prompt"], **self._options(v)), ()

    def _variation(self, v):
        images, weights = [], []
        for image, weight in ((v["image1"], v["weight1"]), (v["image2"], v["weight2"])):
            if image is not None:
                images.append(image)
                weights.append(float(weight))
        if not images:
            raise InputError("upload an image to make variations of")
        return "variation", dict(images=images, weights=weights, prompt=v["prompt"] or "", **self._options(v)), ()

    def _img2img(self, v):
        if v["image"] is None:
            raise InputError("upload an input image")
        return "img2img", dict(image=v["image"], prompt=v["prompt"] or "", strength=float(v["strength"]),
                               **self._options(v)), ()

    def _controlnet(self, v):
        if v["image"] is None:
            raise InputError("upload a control image")
        return "controlnet", dict(kind=v["kind"], control=v["image"], mask=v["mask"], prompt=v["prompt"] or "",
                                  control_strength=float(v["control_strength"]), **self._options(v)), ()

    def _lora(self, v):
        paths = [self.lora_dir / name for name in (v["files"] or []) if self.lora_dir is not None]
        paths += [Path(getattr(f, "name", f)) for f in (v["upload"] or [])]
        if not paths:
            raise InputError("choose or upload a LoRA")
        if not (v["prompt"] or "").strip():
            raise InputError("type a prompt first")
        return "txt2img", dict(prompt=v["prompt"], **self._options(v)), tuple((p, float(v["scale"])) for p in paths)

    # ------------------------------------------------------------------------------------ generation
    def _status(self, job) -> str:
        """Where the job is: its place in the worker's queue, or the stage, step, percent and time left."""
        if job.status == "queued":
            ahead = (self.worker.position(job) or 0) + (self.worker.running is not None)
            return f"Queued: {ahead} ahead." if ahead else "Starting…"
        p = job.progress
        if p.get("stage") is None:
            return "Encoding the prompt…"
        eta = f", about {p['eta']:.0f} s left" if p.get("eta") is not None else ""
        return f"{STAGE_NAMES[p['stage']]} step {p['step']} / {p['total']} ({p['percent']:.0f} %{eta})…"

    def _error(self, message: str) -> dict:
        """An update showing an error in the status line (and a toast), leaving the earlier results in place."""
        _gradio().Warning(message)
        return {self._status_box: f"⚠ {message}"}

    def _generate(self, build, values: dict, history: list, seed_box, request):
        try:
            mode, kwargs, loras = build(values)
            summary = {k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool, type(None)))}
            job = self.worker.submit(mode, kwargs, request=summary, previews=bool(values["previews"]), loras=loras)
        except (QueueFull, StableCascadeError) as e:
            yield self._error(str(e))
            return
        session = getattr(request, "session_hash", None)
        self._session_jobs[session] = job.id
        started = time.monotonic()
        try:
            yield {seed_box: kwargs["seed"], self._status_box: self._status(job)}
            version, shown = -1, None
            while not job.done:
                version = job.wait_for_change(version, timeout=1.0)
                update = {self._status_box: self._status(job)}
                if job.preview is not None and job.preview is not shown:
                    shown = job.preview
                    update[self._preview_box] = enlarge(shown)
                yield update
        finally:
            if not job.done:  # the browser went away or Cancel was pressed
                self.worker.cancel(job.id)
            self._session_jobs.pop(session, None)
        if job.status == "cancelled":
            yield {self._status_box: "Cancelled."}
            return
        if job.status == "failed":
            yield self._error(job.error["message"])
            return
        items = self._save(job)
        history = items + list(history)
        seconds = time.monotonic() - started
        notes = "".join(f"\n\n⚠ {w}" for w in job.warnings)
        yield {self._gallery_box: [(item["path"], item["caption"]) for item in history],
               self._history_box: history, self._details_box: items[0]["parameters"] if items else None,
               self._status_box: f"Done: {len(job.pngs)} image(s) in {seconds:.1f} s, seed {kwargs['seed']}.{notes}"}

    def _save(self, job) -> list:
        """Write the job's PNGs (parameters in their metadata) to the output folder."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        items = []
        for i, (png, params) in enumerate(zip(job.pngs, job.parameters)):
            path = self.out_dir / f"stablecascade_{stamp}_{job.id[:8]}_{i}.png"
            path.write_bytes(png)
            items.append({"path": str(path), "caption": caption(params), "parameters": params})
        for i, png in enumerate(job.control_pngs):
            path = self.out_dir / f"stablecascade_{stamp}_{job.id[:8]}_control{i}.png"
            path.write_bytes(png)
            items.append({"path": str(path), "caption": f"control image ({job.request.get('kind', '')})",
                          "parameters": {"mode": "control"}})
        return items


def build_ui(worker: Worker, *, out_dir=None, lora_dir=None, defaults: Optional[dict] = None,
             title: str = "Stable Cascade"):
    """The Gradio Blocks app over a started (or to be started) `Worker`."""
    ui = WebUI(worker, out_dir=out_dir, lora_dir=lora_dir, defaults=defaults, title=title)
    ui.blocks.webui = ui
    return ui.blocks


def launch(pipe=None, *, worker: Optional[Worker] = None, host: str = "127.0.0.1", port: int = 7860,
           queue_size: int = 20, max_queue: int = 8, out_dir="outputs", lora_dir=None, defaults=None,
           api: bool = False, api_key: Optional[str] = None, extra_parameters: Optional[dict] = None,
           block: bool = True, quiet: bool = False):
    """Start the web UI on a loaded pipeline (or a shared `Worker`). With `block=False` it returns the running
    Blocks (stop it with `close(demo)`); with `api=True` the HTTP API is served at /v1 from the same worker."""
    gr = _gradio()
    if worker is None:
        worker = Worker(pipe, max_queue=max_queue, extra_parameters=extra_parameters)
    worker.start()
    demo = build_ui(worker, out_dir=out_dir, lora_dir=lora_dir, defaults=defaults)
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    allowed = [str(demo.webui.out_dir.resolve())]
    if not api:
        demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, share=False,
                    allowed_paths=allowed, theme=theme(), ssr_mode=False, quiet=quiet, show_error=True)
        return demo
    import uvicorn

    from .server import create_app

    app = create_app(worker=worker, api_key=api_key, lora_dir=lora_dir)
    app = gr.mount_gradio_app(app, demo, path="/", allowed_paths=allowed, theme=theme(), ssr_mode=False,
                              show_error=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning" if quiet else "info")
    uvicorn_server = uvicorn.Server(config)
    if block:
        uvicorn_server.run()
        return demo
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    while not uvicorn_server.started and thread.is_alive():
        time.sleep(0.05)
    demo.uvicorn_server = uvicorn_server
    return demo


def close(demo) -> None:
    """Stop a UI started with `launch(..., block=False)`: its web server and its worker."""
    server = getattr(demo, "uvicorn_server", None)
    if server is not None:
        server.should_exit = True
    else:
        demo.close()
    demo.webui.worker.stop()


# ------------------------------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `stablecascade ui` (the model options come from the command line's shared group)."""
    g = p.add_argument_group("web UI")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 to share on the network "
                                                       "(default 127.0.0.1)")
    g.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    g.add_argument("--out", default="outputs", help="folder the generated PNGs are saved in (default ./outputs)")
    g.add_argument("--lora-dir", metavar="DIR", help="folder of LoRA .safetensors files to offer in the LoRA tab")
    g.add_argument("--queue-size", type=int, default=20, help="users that may wait in the queue (default 20)")
    g.add_argument("--api", action="store_true", help="also serve the HTTP API (/v1, docs at /docs) from the same "
                                                     "process and queue")
    g.add_argument("--api-key", default=os.environ.get("STABLECASCADE_API_KEY"),
                   help="with --api: key required on /v1 routes (default: $STABLECASCADE_API_KEY)")


def main(args, load: Callable) -> int:
    """`stablecascade ui`: check the web dependencies, load the models with `load(args)`, serve until Ctrl+C."""
    from .server import require_web_extra

    require_web_extra("gradio", *(("fastapi", "uvicorn") if args.api else ()))
    pipe = load(args)
    print(f"web UI on http://{args.host}:{args.port}" + (" (API at /v1, docs at /docs)" if args.api else ""),
          file=sys.stderr)
    launch(pipe, host=args.host, port=args.port, out_dir=args.out, lora_dir=args.lora_dir,
           queue_size=args.queue_size, api=args.api, api_key=args.api_key or None,
           extra_parameters=model_parameters(args, pipe))
    return 0


__all__ = ["WebUI", "build_ui", "launch", "close", "add_arguments", "main", "caption"]
