"""Writing and reading H.264 mp4 files, progressively and kill-safe.

A streaming generator produces a video a chunk at a time, possibly for hours,
and may be killed at any moment. `VideoWriter` therefore writes a *fragmented*
mp4: a header (``ftyp`` + an empty ``moov``) followed by self-contained
``moof`` + ``mdat`` fragments. Every `VideoWriter.write` call appends complete
fragments before returning, so a file cut off at any point after a write plays
back every frame written up to then.

FFmpeg's mp4 muxer only emits a fragment when the *next* keyframe arrives, and
PyAV offers no way to force it out earlier. So each `write` is encoded by its
own short-lived encoder+muxer into memory, and its fragments are appended to
the file. Encoders with identical settings produce identical stream headers,
which is checked, so the fragments form one valid stream. Fragments are
appended disguised as padding and then "committed" by rewriting one 8-byte
box header, so even a kill in the middle of a write leaves a readable file.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import av
import numpy as np

from tether.errors import TetherError

__all__ = ["VideoWriter", "check_writable", "probe_video", "read_video"]

_HEADER_BOXES = ("ftyp", "moov")
_FRAGMENT_BOXES = ("moof", "mdat")
_MP4_OPTIONS = {
    # empty_moov: the header carries no sample table, so it never needs
    # rewriting. frag_discont: each fragment's start time comes from its first
    # frame's timestamp rather than restarting at zero. default_base_moof: data
    # offsets are relative to each fragment, so fragments can be relocated.
    "movflags": "frag_keyframe+empty_moov+default_base_moof+frag_discont",
    # Keep absolute timestamps; the default would shift each fragment to zero.
    "avoid_negative_ts": "disabled",
}


def check_writable(path: str | os.PathLike) -> Path:
    """Fail fast, with a one-line `TetherError`, if ``path`` cannot be written.

    Call this before starting expensive generation work.
    """
    path = Path(path).expanduser()
    folder = path.parent
    if not folder.is_dir():
        raise TetherError(f"cannot write {path}: folder {folder} does not exist")
    if path.is_dir():
        raise TetherError(f"cannot write {path}: it is a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise TetherError(f"cannot write {path}: the existing file is not writable")
    try:
        # Actually creating a file is the only reliable test (read-only mounts, ACLs, root).
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tether-write-check-"):
            pass
    except OSError as error:
        raise TetherError(f"cannot write {path}: folder {folder} is not writable ({error.strerror})") from None
    return path


class VideoWriter:
    """Write an H.264 mp4 progressively, one `write` of uint8 frames at a time.

    Each `write` is durable once it returns: if the process dies afterwards
    (even by SIGKILL) the file plays back every frame written so far. Each write
    starts with a keyframe, so write whole chunks rather than single frames.
    Odd frame sizes are padded to even ones (H.264 4:2:0 needs even sizes) by
    repeating the last row/column.

    >>> with VideoWriter("out.mp4", fps=16) as writer:   # doctest: +SKIP
    ...     writer.write(frames)  # uint8 [T, H, W, 3]
    """

    def __init__(self, path: str | os.PathLike, fps: float = 16, *, crf: int = 18, preset: str = "fast"):
        self.path = check_writable(path)
        self.fps = Fraction(fps).limit_denominator(1001)
        self.crf = crf
        self.preset = preset
        self.frames_written = 0
        self.frame_size: tuple[int, int] | None = None  # (height, width) as given by the caller
        self._file: io.BufferedWriter | None = None
        self._header: bytes | None = None
        self._fragments_written = 0
        self._closed = False

    def write(self, frames: Any) -> None:
        """Append uint8 frames [T, H, W, 3] (numpy or CPU torch) to the video."""
        if self._closed:
            raise ValueError(f"VideoWriter for {self.path} is closed")
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
        if len(frames) == 0:
            return
        if self.frame_size is None:
            self.frame_size = frames.shape[1:3]
        elif frames.shape[1:3] != self.frame_size:
            raise ValueError(f"frame size changed from {self.frame_size} to {frames.shape[1:3]} mid-video")

        encoded = self._encode(_pad_to_even(frames), first_frame_index=self.frames_written)
        header, fragments = _split_header(encoded)
        if self._file is None:
            self._file = open(self.path, "wb")
            self._header = header
            self._file.write(header)
        elif header != self._header:
            raise RuntimeError("the encoder produced different stream headers for the same settings")
        fragment_bytes = self._renumber(fragments)
        start = self._file.tell()
        self._write_disguised(fragment_bytes)
        self._commit(start, fragment_bytes[:8])
        self.frames_written += len(frames)

    def _write_disguised(self, fragment_bytes: bytes) -> None:
        """Write the fragments behind a "free" (padding) box header that spans them all.

        A write cut short by a kill would otherwise leave a truncated fragment,
        which makes FFmpeg refuse to open the whole file; truncated padding at
        the end of a file is harmless.
        """
        self._file.write(struct.pack(">I4s", len(fragment_bytes), b"free") + fragment_bytes[8:])
        # Hand the bytes to the OS: from then on they survive the process being killed.
        self._file.flush()

    def _commit(self, start: int, real_box_header: bytes) -> None:
        """Turn the padding back into the first fragment box: its 8-byte header.

        Even half done this is safe: a "free" box the size of the first moof,
        followed by intact boxes, still reads as the earlier frames.
        """
        self._file.seek(start)
        self._file.write(real_box_header)
        self._file.flush()
        self._file.seek(0, os.SEEK_END)

    def flush(self) -> None:
        """Also push written frames to disk (fsync), to survive a power loss."""
        if self._file is not None and not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        """Finish the file. Nothing is left to write: every fragment is already out."""
        self._closed = True
        if self._file is not None and not self._file.closed:
            self._file.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _encode(self, frames: np.ndarray, first_frame_index: int) -> bytes:
        """A complete little fragmented mp4 holding ``frames``, in memory."""
        buffer = io.BytesIO()
        with av.open(buffer, "w", format="mp4", options=_MP4_OPTIONS) as container:
            stream = container.add_stream("libx264", rate=self.fps)
            stream.height, stream.width = frames.shape[1:3]
            stream.pix_fmt = "yuv420p"
            # No B-frames: decode order equals display order, so each fragment
            # starts exactly at its first frame's timestamp.
            stream.options = {"crf": str(self.crf), "preset": self.preset, "bf": "0"}
            for offset, pixels in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                frame.pts = first_frame_index + offset
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        return buffer.getvalue()

    def _renumber(self, fragments: list[tuple[str, bytes]]) -> bytes:
        """Give the fragments the file-wide sequence numbers players expect."""
        renumbered = []
        for box_type, box in fragments:
            if box_type == "moof":
                self._fragments_written += 1
                box = _set_fragment_sequence_number(box, self._fragments_written)
            renumbered.append(box)
        return b"".join(renumbered)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """All frames of a video file as uint8 [T, H, W, 3]."""
    with _open_for_reading(path) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        if not frames:
            return np.zeros((0, stream.codec_context.height, stream.codec_context.width, 3), np.uint8)
    return np.stack(frames)


def probe_video(path: str | os.PathLike) -> tuple[int, float, int, int]:
    """(num_frames, fps, width, height) of a video file, without decoding it.

    Frames are counted by demuxing, since a fragmented mp4's header holds no count.
    """
    with _open_for_reading(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        num_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
        return num_frames, float(rate or 0.0), stream.codec_context.width, stream.codec_context.height


def _open_for_reading(path: str | os.PathLike) -> av.container.InputContainer:
    path = Path(path).expanduser()
    if not path.is_file():
        raise TetherError(f"video not found: {path}")
    try:
        container = av.open(str(path), "r")
    except av.FFmpegError as error:
        raise TetherError(f"cannot read video {path}: {error}") from None
    if not container.streams.video:
        container.close()
        raise TetherError(f"{path} has no video stream")
    return container


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    pad_height, pad_width = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_height or pad_width):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_height), (0, pad_width), (0, 0)), mode="edge")


def _iter_boxes(data: bytes, start: int = 0):
    """ISO-BMFF boxes laid end to end in ``data[start:]``, as (type, start, end)."""
    position = start
    while position < len(data):
        size, box_type = struct.unpack_from(">I4s", data, position)
        if size < 8:  # 0 ("to end of file") and 1 (64-bit size) never occur in FFmpeg's fragments
            raise RuntimeError(f"unexpected mp4 box size {size}")
        yield box_type.decode("latin-1"), position, position + size
        position += size


def _split_header(encoded: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    header, fragments = [], []
    for box_type, start, end in _iter_boxes(encoded):
        box = encoded[start:end]
        if box_type in _HEADER_BOXES:
            header.append(box)
        elif box_type in _FRAGMENT_BOXES:
            fragments.append((box_type, box))
        # Anything else (the trailing random-access index "mfra") describes this
        # in-memory file only and is dropped.
    return b"".join(header), fragments


def _set_fragment_sequence_number(moof: bytes, sequence_number: int) -> bytes:
    for child_type, start, _ in _iter_boxes(moof, start=8):
        if child_type == "mfhd":
            patched = bytearray(moof)
            # The number follows the child's box header (8 bytes) and version/flags (4).
            struct.pack_into(">I", patched, start + 12, sequence_number)
            return bytes(patched)
    raise RuntimeError("mp4 fragment without an mfhd box")
