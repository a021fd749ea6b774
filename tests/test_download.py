"""`stablecascade download` against a tiny fake Hugging Face Hub on 127.0.0.1 (the endpoints hf_hub_download
uses: HEAD/GET /{repo}/resolve/{revision}/{file}), and the offline paths (HF_HUB_OFFLINE, unreachable Hub,
files from the huggingface_hub cache)."""

import hashlib
import http.server
import socket
import threading

import pytest

from stablecascade import download

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "stabilityai/stable-cascade"


class FakeHub:
    """Serves `files` (name -> bytes) of one repo the way the Hub does; records every request."""

    def __init__(self, files):
        self.files = dict(files)
        self.corrupt = set()  # served with other bytes than their ETag says
        self.drop_once = set()  # the first GET stops half-way (connection closed)
        self.requests = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body):
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
                prefix = f"/{REPO}/resolve/"
                if not self.path.startswith(prefix):
                    return self._error(404, "RepoNotFound")
                revision, _, name = self.path[len(prefix):].partition("/")
                if revision not in ("main", COMMIT):
                    return self._error(404, "RevisionNotFound")
                if name not in hub.files:
                    return self._error(404, "EntryNotFound")
                data = hub.files[name]
                etag = hashlib.sha256(data).hexdigest()
                if name in hub.corrupt:
                    data = bytes(b ^ 0xFF for b in data)
                start = 0
                wanted = self.headers.get("Range")
                if wanted and wanted.startswith("bytes=") and wanted.endswith("-"):
                    start = int(wanted[len("bytes="):-1])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                if name in hub.drop_once:
                    hub.drop_once.discard(name)
                    self.wfile.write(data[start:len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def _error(self, status, code):
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def gets(self):
        return [r for r in self.requests if r[0] == "GET"]


def content(name: str) -> bytes:
    return hashlib.sha512(name.encode()).digest() * 700  # ~45 kB, different per file


@pytest.fixture
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest switched it on for the session


@pytest.fixture
def hub(online, monkeypatch, tmp_path):
    names = download.files_for() + download.files_for(variant="small-small", dtype="fp32")
    names.append("controlnet/canny.safetensors")
    fake = FakeHub({n: content(n) for n in names})
    fake.thread.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # hf_hub_download's cache stays in the test
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


def test_choices_match_download_models_sh():
    essential = ["stage_a.safetensors", "previewer.safetensors", "effnet_encoder.safetensors"]
    assert download.files_for(essential=True) == essential
    assert download.files_for() == essential + ["stage_b_bf16.safetensors", "stage_c_bf16.safetensors"]
    assert download.files_for(variant="big-small") == ["stage_b_bf16.safetensors", "stage_c_lite_bf16.safetensors"]
    assert download.files_for(variant="small-big", dtype="fp32") == ["stage_b_lite.safetensors", "stage_c.safetensors"]
    assert download.files_for(True, "small-small") == essential + ["stage_b_lite_bf16.safetensors",
                                                                    "stage_c_lite_bf16.safetensors"]
    assert download.files_for(controlnets=["canny"]) == ["controlnet/canny.safetensors"]
    with pytest.raises(download.DownloadError, match="big-big"):
        download.files_for(variant="huge")


def test_download_fetches_checks_and_reuses(hub, tmp_path, capsys):
    out = tmp_path / "models"
    assert download.main(["essential", "--variant", "small-small", "--dtype", "fp32", "--dir", str(out),
                          "--controlnet", "canny", "--quiet"]) == 0
    names = download.files_for(True, "small-small", "fp32", ["canny"])
    for name in names:
        assert (out / name).read_bytes() == content(name), name
    assert len(hub.gets()) == len(names)
    captured = capsys.readouterr()
    assert str(out / "stage_c_lite.safetensors") in captured.out
    assert "SHA-256 checked" in captured.err and f"[{len(names)}/{len(names)}]" in captured.err
    assert f"--prior {out}/stage_c_lite.safetensors --decoder {out}/stage_b_lite.safetensors" in captured.err
    # a second run finds everything in place: no transfer, no re-hashing
    hub.requests.clear()
    assert download.main(["essential", "--variant", "small-small", "--dtype", "fp32", "--dir", str(out),
                          "--quiet"]) == 0
    assert hub.gets() == [] and "SHA-256 checked" not in capsys.readouterr().err


def test_an_interrupted_transfer_resumes(hub, tmp_path):
    from huggingface_hub import constants

    big = content("stage_a.safetensors") * (5 * constants.DOWNLOAD_CHUNK_SIZE // len(content("x")) // 2)
    hub.files["stage_a.safetensors"] = big  # 2.5 chunks: the first one arrives before the connection drops
    hub.drop_once.add("stage_a.safetensors")
    paths = download.download(["stage_a.safetensors"], tmp_path / "m", progress=False, log=lambda m: None)
    assert paths[0].read_bytes() == big
    ranges = [r[2] for r in hub.gets()]
    assert ranges == [None, f"bytes={constants.DOWNLOAD_CHUNK_SIZE}-"]  # the second GET continues, not restarts


def test_a_corrupt_file_is_deleted_with_a_clear_error(hub, tmp_path, capsys):
    hub.corrupt.add("previewer.safetensors")
    assert download.main(["essential", "--dir", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "previewer.safetensors is corrupt" in err and "run the command again" in err and "Traceback" not in err
    assert not (tmp_path / "previewer.safetensors").exists()
    assert (tmp_path / "stage_a.safetensors").is_file()  # the good files before it stay


def test_unknown_file_or_repo(hub, tmp_path, capsys):
    assert download.main(["--variant", "big-big", "--repo", "someone/else", "--dir", str(tmp_path), "--quiet"]) == 2
    assert "someone/else was not found" in capsys.readouterr().err
    with pytest.raises(download.DownloadError, match="has no file nope.safetensors"):
        download.download(["nope.safetensors"], tmp_path, log=lambda m: None)


def test_offline_mode_reports_missing_files_and_keeps_present_ones(hub, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    out = tmp_path / "models"
    assert download.main(["essential", "--dir", str(out), "--quiet"]) == 0
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    assert download.main(["essential", "--dir", str(out), "--quiet"]) == 0  # all present: fine offline
    assert download.main(["essential", "--variant", "big-big", "--dir", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "offline mode is on (HF_HUB_OFFLINE)" in err
    assert "stage_b_bf16.safetensors, stage_c_bf16.safetensors" in err and "stage_a" not in err.split("error:")[1]
    assert hub.requests == []  # offline means no traffic at all


def test_unreachable_hub_is_reported_as_offline(online, tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert download.main(["essential", "--dir", str(tmp_path), "--endpoint", f"http://127.0.0.1:{port}",
                          "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot be reached" in err and "stage_a.safetensors" in err and "Connect to the network" in err
    assert "Traceback" not in err


def test_offline_copies_from_the_huggingface_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "cache"
    repo_dir = cache / "models--stabilityai--stable-cascade"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "stage_a.safetensors").write_bytes(b"cached stage a")
    out = tmp_path / "models"
    paths = download.download(["stage_a.safetensors"], out, cache_dir=cache, log=lambda m: None)
    assert paths == [out / "stage_a.safetensors"] and paths[0].read_bytes() == b"cached stage a"
    with pytest.raises(download.DownloadError, match="offline"):
        download.download(["previewer.safetensors"], out, cache_dir=cache, log=lambda m: None)


def test_help_explains_every_option():
    import argparse

    parser = argparse.ArgumentParser()
    download.add_arguments(parser)
    text = parser.format_help()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and (action.option_strings or [action.dest])[-1] in text
