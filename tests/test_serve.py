"""`tether serve`: the WebSocket protocol, sessions under load, and the page in a real browser."""

import gc
import json
import os
import socket
import struct
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="tether serve needs fastapi")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

from fastapi.testclient import TestClient  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402

from tether.pipeline import load_pipeline  # noqa: E402
from tether.serve import create_app  # noqa: E402
from tether.serve.app import BUSY_CLOSE_CODE, MAX_PROMPT_CHARS  # noqa: E402
from tether.video import probe_video  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def pipeline():
    return load_pipeline()


def decode_chunk(data: bytes):
    """A binary chunk message -> (header dict, raw RGB bytes)."""
    (length,) = struct.unpack_from("<I", data)
    header = json.loads(data[4:4 + length])
    return header, data[4 + length:]


def next_message(ws):
    """The next message, as ("json", dict) or ("chunk", header)."""
    message = ws.receive()
    if message.get("type") == "websocket.close":
        raise WebSocketDisconnect(message.get("code", 1000))
    if message.get("text") is not None:
        return "json", json.loads(message["text"])
    return "chunk", decode_chunk(message["bytes"])[0]


def wait_for(ws, accept, limit=40):
    """Read messages until `accept(kind, body)` holds; returns the messages read, that one last."""
    seen = []
    for _ in range(limit):
        kind, body = next_message(ws)
        seen.append((kind, body))
        if accept(kind, body):
            return seen
    raise AssertionError(f"not seen in {limit} messages: {seen}")


def is_chunk(kind, body):
    return kind == "chunk"


def start(ws, prompt="a red circle bounces on the grass"):
    kind, hello = next_message(ws)
    assert kind == "json" and hello["type"] == "hello"
    ws.send_json({"type": "prompt", "prompt": prompt})
    return hello


# ---- protocol --------------------------------------------------------------
def test_frames_arrive_and_a_prompt_switch_is_acknowledged_then_applied(pipeline):
    app = create_app(pipeline, realtime=False)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        hello = start(ws)
        assert (hello["width"], hello["height"], hello["fps"]) == (64, 64, 16)
        seen = wait_for(ws, is_chunk)
        assert ("json", {"type": "switched", "chunk": 0, "prompt": "a red circle bounces on the grass", "cut": False,
                         "policy": "window"}) in seen
        header = seen[-1][1]
        assert header["chunk"] == 0 and header["frames"] == 9 and header["seconds"] > 0

        ws.send_json({"type": "prompt", "prompt": "a blue  square on snow", "cut": True})
        ack = wait_for(ws, lambda kind, body: kind == "json" and body["type"] == "ack")[-1][1]
        assert ack == {"type": "ack", "what": "prompt", "prompt": "a blue square on snow", "cut": True}
        switched = wait_for(ws, lambda kind, body: kind == "json" and body["type"] == "switched")[-1][1]
        assert switched["prompt"] == "a blue square on snow" and switched["cut"] and switched["chunk"] >= 1
        chunk = wait_for(ws, is_chunk)[-1][1]
        assert chunk["chunk"] == switched["chunk"] and chunk["frames"] == 12  # the switch chunk itself follows

        ws.send_json({"type": "policy", "policy": "dual"})
        restarted = wait_for(ws, lambda kind, body: kind == "json" and body["type"] == "switched")[-1][1]
        assert restarted["policy"] == "dual" and restarted["prompt"] == "a blue square on snow"
        assert wait_for(ws, is_chunk)[-1][1]["frames"] == 9  # a fresh stream starts with a short chunk


def test_bad_messages_get_an_error_and_the_stream_goes_on(pipeline):
    app = create_app(pipeline, realtime=False)
    bad = [("", "malformed"), ("{not json", "malformed"), (json.dumps([1, 2]), "malformed"),
           (json.dumps({"type": "dance"}), "unknown message type"),
           (json.dumps({"type": "prompt", "prompt": "   "}), "empty"),
           (json.dumps({"type": "prompt", "prompt": "x" * (MAX_PROMPT_CHARS + 1)}), "too long"),
           (json.dumps({"type": "prompt", "prompt": 7}), "empty"),
           (json.dumps({"type": "policy", "policy": "no-such-policy"}), "unknown policy")]
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        start(ws)
        wait_for(ws, is_chunk)
        for raw, expected in bad:
            ws.send_text(raw)
            error = wait_for(ws, lambda kind, body: kind == "json" and body["type"] == "error")[-1][1]
            assert expected in error["message"], (raw, error)
        ws.send_bytes(b"\x00\x01")
        assert "JSON text" in wait_for(ws, lambda kind, body: kind == "json" and body["type"] == "error")[-1][1]["message"]
        first = wait_for(ws, is_chunk)[-1][1]["chunk"]
        assert wait_for(ws, is_chunk)[-1][1]["chunk"] == first + 1


def test_pause_stops_generation_and_resume_restarts_it(pipeline):
    app = create_app(pipeline, realtime=False)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        start(ws)
        wait_for(ws, is_chunk)
        ws.send_json({"type": "pause"})
        wait_for(ws, lambda kind, body: kind == "json" and body.get("what") == "pause")
        session = next(iter(app.state.sessions.values()))
        done = session.chunks_done
        time.sleep(1.5)
        assert session.chunks_done <= done + 1  # the chunk already in flight when the pause came may land
        ws.send_json({"type": "resume"})
        wait_for(ws, lambda kind, body: kind == "chunk" and body["chunk"] >= done)


def test_more_sessions_than_the_maximum_are_told_busy_and_closed(pipeline):
    app = create_app(pipeline, max_sessions=1, realtime=False)
    with TestClient(app) as client, client.websocket_connect("/ws") as first:
        start(first)
        with client.websocket_connect("/ws") as second:
            kind, busy = next_message(second)
            assert kind == "json" and busy["type"] == "busy" and "busy" in busy["message"]
            with pytest.raises(WebSocketDisconnect) as closed:
                next_message(second)
            assert closed.value.code == BUSY_CLOSE_CODE
        wait_for(first, is_chunk)  # the session in the slot is unaffected


def test_disconnecting_frees_the_session_and_its_video(pipeline, tmp_path):
    app = create_app(pipeline, realtime=False)
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as ws:
            hello = start(ws)
            frames = sum(body["frames"] for kind, body in wait_for(ws, lambda k, b: k == "chunk" and b["chunk"] == 1)
                         if kind == "chunk")
            session = app.state.sessions[hello["session"]]
            response = client.get(hello["video_url"])
            assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
            (tmp_path / "so-far.mp4").write_bytes(response.content)
            num_frames, fps, width, height = probe_video(tmp_path / "so-far.mp4")
            assert num_frames >= frames and (fps, width, height) == (16, 64, 64)
            folder = session.folder
            assert folder.exists()
        # Closed mid-generation: the chunk in flight finishes, then everything goes.
        deadline = time.monotonic() + 10
        while (app.state.sessions or folder.exists() or not session.released) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not app.state.sessions and not folder.exists() and session.stream is None
        assert client.get(hello["video_url"]).status_code == 404
        assert client.get("/health").json()["sessions"] == 0


def test_a_failing_model_is_reported_and_the_session_freed(pipeline, monkeypatch):
    from tether.errors import TetherError
    from tether.serve.app import Session

    def broken(self):
        raise TetherError("the model broke")

    monkeypatch.setattr(Session, "make_chunk", broken)
    app = create_app(pipeline, realtime=False)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        start(ws)
        error = wait_for(ws, lambda kind, body: kind == "json" and body["type"] == "error")[-1][1]
        assert error == {"type": "error", "message": "generation failed: the model broke", "fatal": True}
    wait_until_no_sessions(app)


def test_an_idle_session_is_closed(pipeline):
    app = create_app(pipeline, idle_timeout=0.3, realtime=False)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        next_message(ws)  # hello; then silence
        closed = wait_for(ws, lambda kind, body: kind == "json" and body["type"] == "closed")[-1][1]
        assert "idle" in closed["reason"]
    wait_until_no_sessions(app)


# ---- a real server -----------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(app):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def stream_chunks(address, chunks, results, index):
    """One client: connect, prompt, read `chunks` chunks; records (frames, seconds) or the error."""
    from websockets.sync.client import connect

    try:
        with connect(f"ws://{address}/ws", open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "hello"
            ws.send(json.dumps({"type": "prompt", "prompt": f"a small {['red', 'blue', 'green'][index % 3]} star"}))
            frames, started = 0, None
            got = 0
            while got < chunks:
                message = ws.recv(timeout=30)
                if isinstance(message, bytes):
                    header, _ = decode_chunk(message)
                    if started is None:  # time from the first chunk: the prompt encode is a one-off
                        started = time.perf_counter()
                    else:
                        frames += header["frames"]
                    got += 1
            results[index] = (frames, time.perf_counter() - started)
    except Exception as error:  # reported by the test, not lost in a thread
        results[index] = error


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc")
def test_load_concurrent_sessions_stream_one_more_is_refused_and_memory_returns(pipeline):
    pytest.importorskip("websockets", reason="a WebSocket client for the load test")
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    sessions, chunks = 2, 4
    app = create_app(pipeline, max_sessions=sessions, realtime=False)
    with running_server(app) as address:
        # Warm up as many sessions at once: the first ones pay one-off allocations (thread pools,
        # allocator arenas, kernels) that are kept for reuse.
        warm = {}
        run_clients(address, sessions, 2, warm)
        assert not any(isinstance(result, Exception) for result in warm.values()), warm
        wait_until_no_sessions(app)
        baseline = rss_bytes()

        results = {}
        threads = [threading.Thread(target=stream_chunks, args=(address, chunks, results, i)) for i in range(sessions)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while len(app.state.sessions) < sessions and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(app.state.sessions) == sessions
        alive = [weakref.ref(session) for session in app.state.sessions.values()]
        with connect(f"ws://{address}/ws", open_timeout=10) as extra:
            assert json.loads(extra.recv(timeout=10))["type"] == "busy"
            with pytest.raises(ConnectionClosed) as closed:
                extra.recv(timeout=10)
            assert closed.value.rcvd.code == BUSY_CLOSE_CODE
        for thread in threads:
            thread.join(timeout=60)
        assert all(not thread.is_alive() for thread in threads)
        for index in range(sessions):
            assert not isinstance(results[index], Exception), results[index]
            frames, seconds = results[index]
            assert frames == 12 * (chunks - 1)
            print(f"session {index}: {frames / seconds:.1f} frames/s with {sessions} concurrent sessions")
        wait_until_no_sessions(app)
        gc.collect()
        assert not any(ref() for ref in alive), "a closed session is still referenced: its memory is never freed"
        grown = rss_bytes() - baseline
        print(f"RSS after the sessions closed: {grown / 2**20:+.1f} MiB from baseline")
        # The allocator's arenas make RSS drift by tens of MiB either way; a leak would only grow.
        assert grown < 96 * 2**20, f"RSS grew {grown / 2**20:.0f} MiB and stayed"

        # A tab that vanishes mid-chunk: the server finishes the chunk, frees the session and carries on.
        with connect(f"ws://{address}/ws", open_timeout=10) as gone:
            gone.recv(timeout=10)
            gone.send(json.dumps({"type": "prompt", "prompt": "a green star"}))
        wait_until_no_sessions(app)
        again = {}
        stream_chunks(address, 2, again, 0)
        assert not isinstance(again[0], Exception), again[0]


def run_clients(address, count, chunks, results):
    threads = [threading.Thread(target=stream_chunks, args=(address, chunks, results, i)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)


def wait_until_no_sessions(app, seconds=15):
    deadline = time.monotonic() + seconds
    while app.state.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not app.state.sessions


# ---- the page in a real browser ------------------------------------------------
def test_page_in_headless_chromium(pipeline, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium): the browser test needs it")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright")

    app = create_app(pipeline)
    with running_server(app) as address, playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 640}, accept_downloads=True)
            page.goto(f"http://{address}/")
            frame_count = lambda: int(page.text_content("#frame-count"))  # noqa: E731
            page.wait_for_function("Number(document.getElementById('frame-count').textContent) > 5", timeout=30000)
            assert page.evaluate("() => { const c = document.getElementById('screen');"
                                 " return c.width === 64 && getComputedStyle(c).imageRendering === 'pixelated'; }")
            # The canvas shows generated pixels, not an empty (transparent) board.
            assert page.evaluate("() => document.getElementById('screen').getContext('2d')"
                                 ".getImageData(0, 0, 64, 64).data[3]") == 255

            page.fill("#prompt", "")
            page.click("#send")
            page.wait_for_function("document.getElementById('message').textContent.includes('empty')")

            page.fill("#prompt", "a yellow triangle drifts over the ocean")
            page.click("#send")
            page.wait_for_selector("#timeline li:has-text('yellow triangle')", timeout=30000)
            before = frame_count()
            page.wait_for_function(f"Number(document.getElementById('frame-count').textContent) > {before + 12}",
                                   timeout=30000)
            screenshot = os.environ.get("TETHER_SERVE_SCREENSHOT")  # docs/serve.png is made this way
            page.screenshot(path=screenshot or str(tmp_path / "serve.png"))

            page.fill("#prompt", "the camera pans left over the desert")
            page.click("#cut")
            page.wait_for_selector("#timeline li:has-text('desert') .cut", timeout=30000)
            page.select_option("#policy", "dual")
            page.wait_for_selector("#timeline li:has-text('desert') .policy:text-is('dual')", timeout=30000)

            page.click("#pause")
            paused_at = frame_count()
            page.wait_for_timeout(500)
            assert frame_count() == paused_at
            page.click("#pause")
            page.wait_for_function(f"Number(document.getElementById('frame-count').textContent) > {paused_at}",
                                   timeout=30000)

            with page.expect_download(timeout=30000) as download_info:
                page.click("#download")
            saved = tmp_path / "download.mp4"
            download_info.value.save_as(saved)
            num_frames, fps, width, height = probe_video(saved)
            assert num_frames >= 9 + 12 and (fps, width, height) == (16, 64, 64)
        finally:
            browser.close()
        wait_until_no_sessions(app)


# ---- the command -------------------------------------------------------------
def test_tether_serve_command_serves_the_page_on_localhost(tmp_path):
    import subprocess
    import urllib.request

    from tether.cli import main

    # One line, before any model is loaded.
    assert main(["serve", "--policy", "no-such-policy"]) == 2
    assert main(["serve", "--max-sessions", "0"]) == 2
    assert main(["serve", "--idle-timeout", "0"]) == 2
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tether", "serve", "--port", str(port), "--max-sessions", "1"],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    assert json.load(response) == {"ok": True, "sessions": 0, "max_sessions": 1}
                break
            except OSError:
                assert time.monotonic() < deadline, "tether serve did not come up"
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert "<canvas" in response.read().decode()
    finally:
        server.terminate()
        server.wait(timeout=20)
