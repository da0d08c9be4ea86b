"""`tether bench speed`: how fast one memory policy generates video on the machine at hand.

One run measures, chunk by chunk, the transformer (the stream's step: every
denoising forward plus the commit pass) and the streaming VAE decode
separately, each timestamp taken after a device synchronisation. From these:

- `fps`: video frames per second of wall time, decode included, leaving out
  the first chunk, which pays one-time costs (allocator growth, kernel and
  thread-pool start-up, the VAE's first-frame path); `fps_including_warmup`
  keeps it.
- `achieved_gflops`: FLOPs the transformer must do (counted analytically by
  `tether.flops` from the shapes of the forward passes that actually ran) over
  the transformer's time, against `matmul_peak_gflops`, a plain matmul in the
  same dtype on the same device and thread count, measured in the same run.
- `latency_ratio_last_vs_first_minute`: memory policies must keep per-chunk
  cost flat however long the video runs.
- `no_cache_fps`: the sliding window again (whatever `--policy` is), but
  without a KV cache: every denoising step recomputes the window's frames
  together with the chunk. Its FLOPs against the cached run's are what caching
  K/V saves in principle, its `transformer_fps` what it buys in practice
  (little, where tiny forwards are bound by per-operation overhead).

Text encoding runs once per prompt, before the timed loop, and is excluded.
With `--config` the weights are random (speed does not depend on them): the
transformer of that config, a Wan VAE with a matching latent layout (Wan2.1's
own architecture for `wan2.1-*`), and a stand-in text encoder.
"""

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from .. import flops as flop_count
from ..cli import _device, _dtype, load_from_args
from ..configs import get_config
from ..errors import TetherError
from ..memory import make_policy
from ..model.transformer import WanTransformer
from ..pipeline import WAN_SIZE, Pipeline, video_to_uint8
from ..sampler import FewStepSampler
from ..schedule import add_noise, predict_x0
from ..timeline import FPS, FRAMES_PER_CHUNK, Segment, Timeline, seconds_to_chunks

SMALL_SIZE = (64, 64)
WARMUP_CHUNKS = 1
SECONDS_PER_MINUTE = 60


# ----------------------------------------------------------------------------- random-weight pipelines


class RandomTextEncoder:
    """Stands in for umT5 when benchmarking a config: seeded random embeddings per prompt.

    Text is encoded once per prompt, outside every timing, so its cost is
    irrelevant here, and a real umt5-xxl (5.7B parameters) would only slow
    start-up. Like Wan's encoder, positions past the prompt's words are zero.
    """

    def __init__(self, dim: int, text_len: int, seed: int = 0):
        self.dim, self.text_len, self.seed = dim, text_len, seed

    def encode(self, prompts) -> torch.Tensor:
        out = torch.zeros(len(prompts), self.text_len, self.dim)
        for row, prompt in enumerate(prompts):
            length = min(len(prompt.split()) + 1, self.text_len)  # words plus </s>
            generator = torch.Generator().manual_seed(self.seed + zlib.crc32(prompt.encode()))
            out[row, :length] = torch.randn(length, self.dim, generator=generator)
        return out


def random_vae(config_name: str, latent_channels: int, device, dtype):
    """A randomly initialised Wan VAE whose latents fit the transformer.

    `wan2.1-*`: Wan2.1's own VAE (diffusers' default AutoencoderKLWan config),
    so decode cost is the real one. Other configs: the built-in small VAE of
    the same name when there is one (what the toy pipeline uses), else a
    narrow one (base_dim 16); latent channels always follow the transformer.
    """
    from diffusers import AutoencoderKLWan

    from ..vae import BUILTIN_VAE_CONFIGS, LatentCodec

    if config_name.startswith("wan2.1"):
        options = {}
    else:
        options = dict(BUILTIN_VAE_CONFIGS.get(config_name, {"base_dim": 16}))
        options.update(z_dim=latent_channels, latents_mean=[0.0] * latent_channels, latents_std=[1.0] * latent_channels)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        vae = AutoencoderKLWan(**options)
    vae = vae.to(dtype=dtype).eval().requires_grad_(False)
    return LatentCodec(vae)


def random_pipeline(config_name: str, size, device, dtype) -> Pipeline:
    config = get_config(config_name)
    # Built directly on the device: initialising 1.3B parameters on a CPU first takes a while.
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = WanTransformer(config)
    model = model.to(dtype=dtype).eval().requires_grad_(False)
    text = RandomTextEncoder(config.text_dim, config.text_len)
    codec = random_vae(config_name, config.in_channels, device, dtype)
    return Pipeline(model, text, codec, size, description=f"{config_name} config with random weights")


def resized(pipe: Pipeline, size) -> Pipeline:
    return Pipeline(pipe.model, pipe.text_encoder, pipe.codec, size, fps=pipe.fps, description=pipe.description,
                    shift=pipe.shift)


# ----------------------------------------------------------------------------- measuring helpers


def synchronize(device) -> None:
    """Wait for queued GPU work, so that a timestamp means what it says."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, work):
    """(work(), wall seconds it took, queued GPU work included)."""
    synchronize(device)
    start = time.perf_counter()
    out = work()
    synchronize(device)
    return out, time.perf_counter() - start


def decode_to_pixels(decoder, latents, dtype) -> None:
    """What a viewer needs: the chunk's frames decoded and converted to uint8."""
    with torch.no_grad():
        video_to_uint8(decoder.decode_chunk(latents.to(dtype)))


class ForwardShapes:
    """Records (query tokens, key tokens) of every cached forward pass the model runs.

    Counting FLOPs from what actually ran, rather than from a nominal "forwards
    per chunk x tokens", stays right for samplers that denoise several chunks
    at once (Rolling Forcing) and for re-encodes at prompt switches.
    """

    def __init__(self, model, tokens_per_frame: int):
        self.model = model
        self.tokens_per_frame = tokens_per_frame
        self.calls = []

    def __enter__(self):
        original = self.model.forward_cached

        def recorded(latents, *args, **kwargs):
            past = kwargs.get("past", args[3] if len(args) > 3 else None)
            query = latents.shape[2] * self.tokens_per_frame
            self.calls.append((query, query + self._past_tokens(past)))
            return original(latents, *args, **kwargs)

        self.model.forward_cached = recorded  # an instance attribute shadows the method until __exit__
        return self

    def __exit__(self, *exc):
        del self.model.forward_cached

    def _past_tokens(self, past) -> int:
        if past is None:
            return 0
        layout = getattr(past, "layout", None)
        if layout is not None:
            return len(layout.slots) * self.tokens_per_frame
        first_layer = past(0)  # views build and keep each layer's keys, so this costs nothing extra
        return 0 if first_layer is None else first_layer[0].shape[1]

    def take(self) -> list:
        calls, self.calls = self.calls, []
        return calls


def matmul_peak_gflops(device, dtype) -> tuple:
    """Best of several plain square matmuls: (GFLOP/s, size).

    2048³ on a CPU; 8192³ on a GPU, where a 2048³ product lasts a few
    microseconds and launch overhead would hide the chip's speed.
    """
    size = 8192 if torch.device(device).type == "cuda" else 2048
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)
    a @ b  # warm-up
    best = math.inf
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9, size


def describe_device(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu_model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({torch.get_num_threads()} threads, {cpu_model})"


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def video_frames(latent_frames: int, first_chunk: bool) -> int:
    """Pixel frames that a chunk's latent frames decode to (Wan's causal VAE: the very first latent frame gives 1)."""
    return 4 * latent_frames - 3 if first_chunk else 4 * latent_frames


def check_writable(path: str) -> None:
    """Fail before a long run, not after it, if the JSON cannot be written."""
    target = Path(path)
    if target.is_dir():
        raise TetherError(f"--json {path} is a directory")
    if not target.parent.is_dir():
        raise TetherError(f"cannot write --json {path}: directory {target.parent} does not exist")
    existed = target.exists()
    try:
        with open(target, "a"):
            pass
    except OSError as error:
        raise TetherError(f"cannot write --json {path}: {error.strerror}") from None
    if not existed:
        target.unlink()


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


# ----------------------------------------------------------------------------- the runs


def run_cached(pipe: Pipeline, policy_name: str, num_chunks: int, prompt: str, seed: int, decode: bool,
               quiet: bool) -> dict:
    """Generate `num_chunks` chunks with the policy's KV cache; per-chunk timings and FLOPs."""
    from ..vae import StreamingDecoder

    device, config = pipe.model.device, pipe.model.config
    tokens = flop_count.tokens_per_frame(config, *pipe.latent_shape[1:])
    stream = pipe.make_stream(policy_name, seed=seed)
    stream.text_context(prompt)  # text runs once per prompt: keep it out of the timed loop
    decoder = StreamingDecoder(pipe.codec) if decode else None
    timeline = Timeline((Segment(prompt, num_chunks),))
    chunks = []
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    with ForwardShapes(pipe.model, tokens) as shapes, \
            tqdm(total=num_chunks, unit="chunk", desc=f"bench [{policy_name}]", disable=quiet, file=sys.stderr) as bar:
        steps = stream.run(timeline)
        for index in range(num_chunks):
            (_, _, latents), transformer_s = timed(device, lambda: next(steps))
            decode_s = timed(device, lambda: decode_to_pixels(decoder, latents, pipe.codec_dtype))[1] if decode else 0.0
            calls = shapes.take()
            chunks.append({
                "frames": video_frames(latents.shape[2], first_chunk=index == 0),
                "transformer_s": transformer_s,
                "decode_s": decode_s,
                "flops": sum(flop_count.forward_flops(config, q, k) for q, k in calls),
                "forwards": len(calls),
                "cached_frames": max(((k - q) // tokens for q, k in calls), default=0),
            })
            bar.update(1)
    # CPU seconds this process used per wall second and thread: well below 1 on a CPU run
    # means other processes took the cores, and every timing above is pessimistic.
    cpu_busy = (time.process_time() - cpu_start) / ((time.perf_counter() - wall_start) * torch.get_num_threads())
    return {"chunks": chunks, "forwards_per_chunk": flop_count.forwards_per_chunk(stream.sampler), "cpu_busy": cpu_busy}


class RecomputingWindow:
    """The sliding window without a KV cache, to show what the cache buys.

    Every denoising step runs the transformer over [the last W clean frames +
    the noisy chunk], block-causally (each 3-frame chunk sees itself and the
    chunks before it; context frames at timestep 0, the chunk at the step's),
    and keeps only the chunk's output. No commit pass: nothing is cached, so
    4 forwards per chunk instead of 5, but each over W + 3 frames.
    """

    def __init__(self, pipe: Pipeline, window: int, prompt: str, seed: int, chunk_frames: int = 3):
        self.model = pipe.model
        self.latent_shape = pipe.latent_shape
        self.window, self.chunk_frames = window, chunk_frames
        self.sampler = FewStepSampler(shift=pipe.shift)
        self.rng = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.text = self.model.encode_text(pipe.encode_prompt(prompt).to(self.model.device))
        self.context = []  # clean latent frames [1, C, 1, h, w], oldest first
        self.next_index = 0
        self.frames_per_forward = 0  # window + chunk frames in the last chunk's forwards

    def _noise(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.rng).to(self.model.device, self.model.dtype)

    @torch.no_grad()
    def next_chunk(self) -> torch.Tensor:
        n = self.chunk_frames
        context = self.context[-self.window:] if self.window else []
        first_position = self.next_index - len(context)
        positions = list(range(first_position, self.next_index + n))
        self.frames_per_forward = len(positions)
        x = self._noise((1, self.latent_shape[0], n, *self.latent_shape[1:]))
        timesteps = self.sampler.timesteps
        for i, t in enumerate(timesteps):
            frames = torch.cat(context + [x], dim=2)
            per_frame_t = torch.tensor([[0.0] * len(context) + [t] * n], device=self.model.device)
            flow = self.model.forward_block_causal(frames, per_frame_t, self.text, chunk_size=n,
                                                   frame_positions=positions)[:, :, -n:]
            x0 = predict_x0(x.float(), flow.float(), t)
            if i + 1 < len(timesteps):
                x = add_noise(x0, self._noise(x0.shape).float(), timesteps[i + 1]).to(self.model.dtype)
        x0 = x0.to(self.model.dtype)
        self.context = (self.context + list(x0.split(1, dim=2)))[-max(self.window, 1):]
        self.next_index += n
        return x0


def run_without_cache(pipe: Pipeline, window: int, num_chunks: int, prompt: str, seed: int, decode: bool,
                      quiet: bool) -> list:
    from ..vae import StreamingDecoder

    device, config = pipe.model.device, pipe.model.config
    tokens = flop_count.tokens_per_frame(config, *pipe.latent_shape[1:])
    generator = RecomputingWindow(pipe, window, prompt, seed)
    decoder = StreamingDecoder(pipe.codec) if decode else None
    chunks = []
    for index in tqdm(range(num_chunks), unit="chunk", desc="bench [window, no cache]", disable=quiet, file=sys.stderr):
        latents, transformer_s = timed(device, generator.next_chunk)
        decode_s = timed(device, lambda: decode_to_pixels(decoder, latents, pipe.codec_dtype))[1] if decode else 0.0
        forward = flop_count.block_causal_flops(config, tokens, generator.frames_per_forward, generator.chunk_frames)
        chunks.append({"frames": video_frames(latents.shape[2], first_chunk=index == 0),
                       "transformer_s": transformer_s, "decode_s": decode_s, "seconds": transformer_s + decode_s,
                       "flops": len(generator.sampler.timesteps) * forward})
    return chunks


# ----------------------------------------------------------------------------- summarising


def frames_per_second(chunks: list, seconds_key: str = "seconds") -> float | None:
    seconds = sum(c[seconds_key] for c in chunks)
    return sum(c["frames"] for c in chunks) / seconds if chunks and seconds > 0 else None


def latency_ratio(chunk_ms: list, chunks_per_minute: int) -> tuple:
    """(median latency of the last minute / of the first minute, how it was computed).

    The warm-up chunk is left out. Videos shorter than two minutes compare the
    last third of the chunks with the first third instead.
    """
    steady = chunk_ms[WARMUP_CHUNKS:]
    if len(steady) >= 2 * chunks_per_minute:
        span, basis = chunks_per_minute, "median chunk latency of the last 60 s of video over the first 60 s (warm-up chunk excluded)"
    elif len(steady) >= 3:
        span = len(steady) // 3
        basis = ("video shorter than 2 minutes: median chunk latency of the last third of the chunks over the first "
                 "third (warm-up chunk excluded)")
    else:
        return None, "too few chunks to compare (need at least 4)"
    return statistics.median(steady[-span:]) / statistics.median(steady[:span]), basis


def summarise(run: dict, no_cache: list | None, window: int | None) -> dict:
    chunks = run["chunks"]
    for c in chunks:
        c["seconds"] = c["transformer_s"] + c["decode_s"]
    timed = chunks[WARMUP_CHUNKS:] or chunks  # a one-chunk run has nothing after its warm-up
    transformer_s = sum(c["transformer_s"] for c in timed)
    timed_flops = sum(c["flops"] for c in timed)
    chunk_ms = [1000 * c["seconds"] for c in chunks]
    ratio, basis = latency_ratio(chunk_ms, chunks_per_minute=round(SECONDS_PER_MINUTE * FPS / FRAMES_PER_CHUNK))
    result = {
        "fps": frames_per_second(timed),
        "fps_including_warmup": frames_per_second(chunks),
        "warmup_chunks_excluded": len(chunks) - len(timed),
        "transformer_fps": frames_per_second(timed, "transformer_s"),
        "chunk_ms": chunk_ms,
        "transformer_ms": [1000 * c["transformer_s"] for c in chunks],
        "decode_ms": [1000 * c["decode_s"] for c in chunks],
        "median_chunk_ms": statistics.median(chunk_ms),
        "latency_ratio_last_vs_first_minute": ratio,
        "latency_ratio_basis": basis,
        "cached_frames": [c["cached_frames"] for c in chunks],
        "forwards_per_chunk": run["forwards_per_chunk"],
        "forwards": [c["forwards"] for c in chunks],
        "chunk_flops": [c["flops"] for c in chunks],
        "flops_per_chunk": timed_flops / len(timed),
        "flops_per_frame": timed_flops / sum(c["frames"] for c in timed),
        "achieved_gflops": timed_flops / transformer_s / 1e9 if transformer_s > 0 else None,
        "cpu_busy": run["cpu_busy"],
    }
    if no_cache:
        # Compare at a full window: chunks before it fills attend to less and are cheaper.
        full = [c for i, c in enumerate(no_cache) if i >= max(WARMUP_CHUNKS, math.ceil(window / 3))]
        compared = full or no_cache[WARMUP_CHUNKS:] or no_cache
        result.update({
            "no_cache_fps": frames_per_second(compared),
            "no_cache_transformer_fps": frames_per_second(compared, "transformer_s"),
            "no_cache_flops_per_chunk": sum(c["flops"] for c in compared) / len(compared),
            "no_cache_basis": (f"sliding window of {window} latent frames recomputed at every denoising step (4 forwards "
                               f"of window + chunk, block-causal), {len(no_cache)} chunks, "
                               + ("timed once the window is full" if full else "window never full: all chunks after warm-up")),
            "no_cache_chunk_ms": [1000 * c["seconds"] for c in no_cache],
        })
    else:
        result.update({"no_cache_fps": None, "no_cache_transformer_fps": None, "no_cache_flops_per_chunk": None,
                       "no_cache_basis": "skipped",
                       "no_cache_chunk_ms": []})
    return result


def report(result: dict) -> str:
    """The human-readable summary printed to the terminal."""
    model = f"config {result['config']} (random weights)" if result["config"] else f"checkpoint {result['checkpoint']}"
    seconds = sum(result["chunk_ms"]) / 1000
    share = sum(result["transformer_ms"]) / max(sum(result["chunk_ms"]), 1e-9)
    lines = [
        f"tether bench speed: policy {result['policy']}, {model}, {result['height']}x{result['width']}, "
        f"{result['device']}, {result['dtype']}",
        f"  {result['num_chunks']} chunks, {result['frames']} frames ({result['frames'] / FPS:.1f} s of video) in {seconds:.1f} s"
        + ("" if result["decode"] else " (VAE decode skipped)"),
        f"  fps {result['fps']:.2f} after the first chunk ({result['fps_including_warmup']:.2f} including it); "
        f"transformer {100 * share:.0f}% of the time, decode {100 * (1 - share):.0f}%",
        f"  chunk latency median {result['median_chunk_ms']:.0f} ms; last vs first: "
        + ("n/a" if result["latency_ratio_last_vs_first_minute"] is None else f"{result['latency_ratio_last_vs_first_minute']:.2f}")
        + f" ({result['latency_ratio_basis']})",
        f"  transformer: {result['flops_per_chunk']:.3g} FLOP per chunk ({result['flops_per_frame']:.3g} per frame), "
        f"achieved {result['achieved_gflops']:.1f} GFLOP/s = {100 * result['achieved_gflops'] / result['matmul_peak_gflops']:.0f}% "
        f"of the {result['dtype']} matmul peak measured now ({result['matmul_peak_gflops']:.1f} GFLOP/s)",
    ]
    if result["no_cache_fps"]:
        lines.append(f"  without a KV cache (window recomputed every step): {result['no_cache_fps']:.2f} fps; transformer alone "
                     f"{result['no_cache_transformer_fps']:.2f} fps against {result['transformer_fps']:.2f} with the cache: "
                     f"the cache saves x{result['no_cache_flops_per_chunk'] / result['flops_per_chunk']:.1f} FLOPs and buys "
                     f"x{result['transformer_fps'] / result['no_cache_transformer_fps']:.1f} in time")
    lines.append(f"  this process got {100 * result['cpu_busy']:.0f}% of its {result['threads']} threads' wall time; "
                 f"load average {result['load_average'][0]:.1f} at start, {result['load_average'][1]:.1f} at end")
    memory = f"  peak memory: {result['peak_rss_mb']:.0f} MB resident"
    if result["peak_gpu_mb"] is not None:
        memory += f", {result['peak_gpu_mb']:.0f} MB GPU"
    lines.append(memory)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command


def load_benchmark_pipeline(args, device, dtype) -> Pipeline:
    if args.config and args.checkpoint:
        raise TetherError("give --config (random weights) or --checkpoint, not both")
    if args.config:
        get_config(args.config)  # unknown name: one-line error
        default_size = WAN_SIZE if args.config.startswith("wan") else SMALL_SIZE
        size = (default_size[0] if args.height is None else args.height, default_size[1] if args.width is None else args.width)
        check_size(size)
        return random_pipeline(args.config, size, device, dtype or _default_dtype(device))
    pipe = load_from_args(args)
    if args.height is not None or args.width is not None:
        size = (pipe.height if args.height is None else args.height, pipe.width if args.width is None else args.width)
        check_size(size)
        pipe = resized(pipe, size)
    return pipe


def _default_dtype(device):
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def check_size(size) -> None:
    # The VAE downsamples by 8 and the transformer patches 2x2 latents.
    if any(side <= 0 or side % 16 for side in size):
        raise TetherError(f"--height/--width must be positive multiples of 16, got {size[0]}x{size[1]}")


@torch.no_grad()  # not set_grad_enabled(False): main may run in-process and must not leak the mode
def main(args) -> int:
    num_chunks = seconds_to_chunks(args.seconds)
    make_policy(args.policy)  # fail on a bad name before loading anything
    if args.json:
        check_writable(args.json)
    if args.threads is not None:
        if args.threads < 1:
            raise TetherError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.no_cache_chunks is not None and args.no_cache_chunks < 0:
        raise TetherError(f"--no-cache-chunks must be 0 or more, got {args.no_cache_chunks}")
    device = _device(args.device)
    load_at_start = os.getloadavg()[0]

    pipe = load_benchmark_pipeline(args, device, _dtype(args.dtype))
    decode = not args.no_decode and pipe.codec is not None
    model_dtype = pipe.model.dtype
    peak_gflops, matmul_size = matmul_peak_gflops(device, model_dtype)

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cached = run_cached(pipe, args.policy, num_chunks, args.prompt, args.seed, decode, args.quiet)
    rss = peak_rss_mb()  # before the no-cache run, which holds bigger activations
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if torch.device(device).type == "cuda" else None

    window = make_policy("window").window
    no_cache_chunks = args.no_cache_chunks
    if no_cache_chunks is None:
        no_cache_chunks = min(num_chunks, math.ceil(window / 3) + 4)
    no_cache = run_without_cache(pipe, window, no_cache_chunks, args.prompt, args.seed, decode, args.quiet) \
        if no_cache_chunks else None

    result = {
        "policy": args.policy,
        "config": args.config,
        "checkpoint": None if args.config else (args.checkpoint or "built-in"),
        "model": pipe.description,
        "seconds": args.seconds,
        "num_chunks": num_chunks,
        "frames": sum(c["frames"] for c in cached["chunks"]),
        "height": pipe.height,
        "width": pipe.width,
        "tokens_per_frame": flop_count.tokens_per_frame(pipe.model.config, *pipe.latent_shape[1:]),
        "decode": decode,
        "device": describe_device(device),
        "threads": torch.get_num_threads(),
        "dtype": str(model_dtype).removeprefix("torch."),
        **summarise(cached, no_cache, window),
        "matmul_peak_gflops": peak_gflops,
        "matmul_size": matmul_size,
        "peak_rss_mb": rss,
        "peak_gpu_mb": gpu,
        # Other processes on the same cores slow every timing: the 1-minute load average, at start and end.
        "load_average": [load_at_start, os.getloadavg()[0]],
        "text_encoding": "excluded: encoded once per prompt before the timed loop",
        "torch": torch.__version__,
        "tether_commit": git_commit(),
    }
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
