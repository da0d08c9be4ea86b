"""The streaming server: one WebSocket per browser tab, one `Stream` per WebSocket.

Wire protocol (all JSON text messages carry a "type"):

client -> server
    {"type": "prompt", "prompt": str, "cut": bool}   switch at the next chunk boundary
                                                     (the first prompt starts the stream)
    {"type": "policy", "policy": name}               restart from a fresh stream with this policy
    {"type": "pause"} / {"type": "resume"}
    {"type": "ping"}                                 keeps an idle-but-open tab alive

server -> client
    {"type": "hello", session, fps, width, height, policies, policy, max_prompt_chars, video_url}
    {"type": "ack", "what": "prompt"|"policy"|"pause"|"resume", ...}   a command was accepted
    {"type": "switched", chunk, prompt, cut, policy}  the chunk at which a prompt/policy took effect
    {"type": "error", message}                       a bad command; the stream goes on
    {"type": "busy", message}                        too many sessions: the socket closes (1013)
    {"type": "closed", reason}                       the server ends the session (idle timeout)
    binary: uint32 little-endian n, n bytes of JSON {chunk, frames, height, width, seconds, fps},
            then frames*height*width*3 bytes of RGB. One message per chunk, so a chunk's
            stats can never be separated from its pixels by another message.

Why a policy change restarts the stream: a memory policy owns the cache of the
frames generated so far, in its own layout, so there is no sound way to hand a
running video from one policy to another. The new stream starts from the prompt
in force; the session's mp4 keeps everything generated, across restarts.
"""

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import secrets
import shutil
import struct
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, StreamingResponse

from ..errors import TetherError
from ..memory import POLICIES, make_policy
from ..pipeline import video_to_uint8
from ..vae import StreamingDecoder
from ..video import VideoWriter

PAGE = Path(__file__).with_name("page.html")
MAX_PROMPT_CHARS = 300
BUSY_CLOSE_CODE = 1013  # "try again later"
IDLE_CLOSE_CODE = 1001  # "going away"
log = logging.getLogger("tether.serve")


class GenerationFailed(Exception):
    """The model failed, as opposed to the connection: worth telling the page about."""


class Session:
    """One browser tab's video: its stream, decoder, mp4 and pending commands.

    `make_chunk` and `release` run on the session's own single worker thread,
    so they never overlap and a command arriving mid-chunk waits for the next
    chunk boundary (exactly the semantics of `Stream.set_prompt`).
    """

    def __init__(self, pipeline, policy: str, seed: int = 0, on_release=None):
        self.id = secrets.token_urlsafe(12)  # unguessable: it is also the key to the session's mp4
        self.pipeline = pipeline
        self.policy = policy
        self.seed = seed
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tether-session-{self.id[:6]}")
        self.folder = Path(tempfile.mkdtemp(prefix="tether-serve-"))
        self.video_path = self.folder / "video.mp4"
        self.writer = VideoWriter(self.video_path, fps=pipeline.fps)
        self.video_bytes = 0  # length of the mp4 up to its last complete write: what a download may serve
        self.stream = None
        self.decoder = None
        self.prompt = None
        self.chunks_done = 0
        self.frames_done = 0
        self.generating_seconds = 0.0
        self._lock = threading.Lock()
        self._next_prompt = None
        self._next_policy = None
        self.released = False
        self.on_release = on_release

    # ---- commands, from the event loop ----------------------------------
    def request_prompt(self, prompt: str, cut: bool) -> None:
        with self._lock:
            self._next_prompt = (prompt, cut)
            if self.prompt is None:
                self.prompt = prompt

    def request_policy(self, policy: str) -> None:
        with self._lock:
            self._next_policy = policy

    @property
    def has_prompt(self) -> bool:
        return self.prompt is not None

    # ---- work, on the session's thread -----------------------------------
    def make_chunk(self):
        """Generate, decode and record one chunk; returns (frames, switch event or None, seconds)."""
        with self._lock:
            next_prompt, self._next_prompt = self._next_prompt, None
            next_policy, self._next_policy = self._next_policy, None
        started = time.perf_counter()
        event = None
        with torch.no_grad():
            if next_policy is not None or self.stream is None:
                self.policy = next_policy or self.policy
                self.stream = self.pipeline.make_stream(self.policy, seed=self.seed)
                self.decoder = StreamingDecoder(self.pipeline.codec)
                prompt = next_prompt[0] if next_prompt else self.prompt
                self.stream.set_prompt(prompt)
                event = {"chunk": self.chunks_done, "prompt": prompt, "cut": False, "policy": self.policy}
            elif next_prompt is not None and (next_prompt[0] != self.prompt or next_prompt[1]):
                # (the same prompt again, without a cut, changes nothing: no timeline entry)
                self.stream.set_prompt(*next_prompt)
                event = {"chunk": self.chunks_done, "prompt": next_prompt[0], "cut": bool(next_prompt[1]),
                         "policy": self.policy}
            if event is not None:
                self.prompt = event["prompt"]
            latents = self.stream.step()
            video = self.decoder.decode_chunk(latents.to(self.pipeline.codec_dtype))
            frames = video_to_uint8(video)
        self.writer.write(frames)
        # The writer has committed this chunk: everything up to here is a valid mp4.
        self.video_bytes = os.path.getsize(self.video_path)
        seconds = time.perf_counter() - started
        self.chunks_done += 1
        self.frames_done += len(frames)
        self.generating_seconds += seconds
        return frames, event, seconds

    def release(self) -> None:
        """Drop the stream (its memory cache is the big part) and delete the mp4."""
        self.released = True
        self.writer.close()
        self.stream = self.decoder = None
        shutil.rmtree(self.folder, ignore_errors=True)
        _return_freed_memory()
        if self.on_release is not None:
            self.on_release(self)


def _return_freed_memory() -> None:
    """Hand freed heap back to the OS, so a closed session's memory shows up as released.

    glibc keeps freed blocks in its arenas; without a trim a server's RSS only
    ever grows, which hides real leaks behind allocator caching.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def frames_message(chunk: int, frames, seconds: float, fps: float) -> bytes:
    header = json.dumps({"chunk": chunk, "frames": len(frames), "height": frames.shape[1], "width": frames.shape[2],
                         "seconds": round(seconds, 4), "fps": round(fps, 2)}).encode()
    return struct.pack("<I", len(header)) + header + frames.tobytes()


def parse_command(raw: str, policies) -> dict:
    """A client message -> a validated command dict; raises ValueError with a message for the page."""
    try:
        message = json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        raise ValueError("malformed message: not JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ValueError("malformed message: expected an object with a 'type'")
    kind = message["type"]
    if kind == "prompt":
        prompt = message.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty")
        prompt = " ".join(prompt.split())
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt is too long ({len(prompt)} characters, at most {MAX_PROMPT_CHARS})")
        return {"type": "prompt", "prompt": prompt, "cut": bool(message.get("cut", False))}
    if kind == "policy":
        policy = message.get("policy")
        if policy not in policies:
            raise ValueError(f"unknown policy {policy!r} (known: {', '.join(policies)})")
        return {"type": "policy", "policy": policy}
    if kind in ("pause", "resume", "ping"):
        return {"type": kind}
    raise ValueError(f"unknown message type {kind!r}")


def create_app(pipeline, policy: str = "window", max_sessions: int = 2, idle_timeout: float = 300.0,
               realtime: bool = True, lead_seconds: float = 1.5) -> FastAPI:
    """The app serving `pipeline` (shared read-only by every session).

    `realtime` paces generation to playback speed, at most `lead_seconds` of
    video ahead of the viewer: a prompt typed now then shows within a couple of
    seconds instead of after a backlog. Tests turn it off to measure throughput.
    """
    make_policy(policy)  # a bad default policy fails at startup, not in the first tab
    policies = sorted(POLICIES)
    app = FastAPI(title="tether serve")
    app.state.sessions = {}
    app.state.pipeline = pipeline

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text()

    @app.get("/health")
    def health():
        return {"ok": True, "sessions": len(app.state.sessions), "max_sessions": max_sessions}

    @app.get("/session/{session_id}/video.mp4")
    def download(session_id: str):
        session = app.state.sessions.get(session_id)
        if session is None or session.released:
            raise HTTPException(404, "no such session (videos are deleted when their tab closes)")
        size = session.video_bytes
        if size == 0:
            raise HTTPException(409, "nothing generated yet")

        def body():
            # The file keeps growing while we read; only its first `size` bytes are known complete.
            with open(session.video_path, "rb") as file:
                left = size
                while left:
                    block = file.read(min(left, 1 << 16))
                    if not block:
                        return
                    left -= len(block)
                    yield block

        return StreamingResponse(body(), media_type="video/mp4", headers={
            "Content-Length": str(size), "Content-Disposition": 'attachment; filename="tether.mp4"'})

    @app.websocket("/ws")
    async def websocket_session(websocket: WebSocket):
        await websocket.accept()
        sessions = app.state.sessions
        if len(sessions) >= max_sessions:
            await websocket.send_json({"type": "busy", "message": f"The server is busy: {len(sessions)} of "
                                       f"{max_sessions} sessions are in use. Try again later."})
            await websocket.close(code=BUSY_CLOSE_CODE)
            return
        # The slot is given back only once the memory is: a chunk still in flight keeps it taken.
        session = Session(pipeline, policy, on_release=lambda done: sessions.pop(done.id, None))
        sessions[session.id] = session  # no await since the check: the slot cannot be taken twice
        send_lock = asyncio.Lock()
        running = asyncio.Event()  # set while there is a prompt and the viewer has not paused
        loop = asyncio.get_running_loop()

        async def send(message):
            async with send_lock:
                if isinstance(message, bytes):
                    await websocket.send_bytes(message)
                else:
                    await websocket.send_json(message)

        async def generate():
            clock_start = None
            paused_at = None
            while True:
                if not running.is_set():
                    paused_at = time.monotonic()
                    await running.wait()
                    if clock_start is not None:
                        clock_start += time.monotonic() - paused_at
                if realtime and clock_start is not None:
                    ahead = session.frames_done / pipeline.fps - (time.monotonic() - clock_start)
                    if ahead > lead_seconds:
                        await asyncio.sleep(ahead - lead_seconds)
                        continue  # the viewer may have paused meanwhile
                try:
                    frames, event, seconds = await loop.run_in_executor(session.executor, session.make_chunk)
                except Exception as error:
                    log.exception("session %s: generation failed", session.id)
                    raise GenerationFailed(str(error) if isinstance(error, TetherError) else repr(error)) from error
                if clock_start is None:
                    clock_start = time.monotonic()
                if event is not None:
                    await send({"type": "switched", **event})
                fps = session.frames_done / max(session.generating_seconds, 1e-9)
                await send(frames_message(session.chunks_done - 1, frames, seconds, fps))

        async def handle(raw: str):
            try:
                command = parse_command(raw, policies)
            except ValueError as error:
                await send({"type": "error", "message": str(error)})
                return
            kind = command["type"]
            if kind == "prompt":
                session.request_prompt(command["prompt"], command["cut"])
                # No chunk index here: one may be in flight; "switched" says where it really applied.
                await send({"type": "ack", "what": "prompt", "prompt": command["prompt"], "cut": command["cut"]})
                if not running.is_set() and not paused:
                    running.set()
            elif kind == "policy":
                session.request_policy(command["policy"])
                await send({"type": "ack", "what": "policy", "policy": command["policy"]})
            elif kind == "pause":
                running.clear()
                await send({"type": "ack", "what": "pause"})
            elif kind == "resume":
                if session.has_prompt:
                    running.set()
                await send({"type": "ack", "what": "resume"})
            return kind

        await send({"type": "hello", "session": session.id, "fps": pipeline.fps, "width": pipeline.width,
                    "height": pipeline.height, "policies": policies, "policy": policy,
                    "max_prompt_chars": MAX_PROMPT_CHARS, "video_url": f"/session/{session.id}/video.mp4"})
        generator = asyncio.create_task(generate())
        paused = False
        try:
            while True:
                receive = asyncio.ensure_future(websocket.receive())
                done, _ = await asyncio.wait({receive, generator}, timeout=idle_timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                if generator in done:
                    receive.cancel()
                    error = generator.exception()
                    if isinstance(error, GenerationFailed):
                        with contextlib.suppress(Exception):  # the tab may be gone too
                            await send({"type": "error", "message": f"generation failed: {error}", "fatal": True})
                            await websocket.close()
                    break  # otherwise sending failed: the tab went away
                if not done:
                    receive.cancel()
                    await send({"type": "closed", "reason": f"idle for {idle_timeout:g} s"})
                    await websocket.close(code=IDLE_CLOSE_CODE)
                    break
                message = receive.result()
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("text") is None:
                    await send({"type": "error", "message": "malformed message: expected JSON text"})
                    continue
                kind = await handle(message["text"])
                if kind in ("pause", "resume"):
                    paused = kind == "pause"
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the tab went away, maybe mid-send: nothing to tell it
        finally:
            generator.cancel()
            # Queued behind any chunk still being made, so the stream is never freed under it;
            # not awaited, since this task may itself be being cancelled (server shutdown).
            session.executor.submit(session.release)
            session.executor.shutdown(wait=False)

    return app
