"""A whole text-to-video model: transformer, text encoder and VAE, loaded from one place.

Sources, all local:
- nothing: the built-in toy model shipped in `tether/weights/default/` (or,
  before it exists, the toy config with random weights, and a notice);
- the name of a shipped toy model: `default`, `context-forcing`,
  `grounded-forcing` (bundles in `tether/weights/<name>/`);
- a tether bundle folder (`pipeline.json`, `transformer.safetensors`,
  `text_encoder/`, `vae/`), which is what tether's training exports, or an
  adapter bundle (`pipeline.json` naming a `base` bundle, and a LoRA
  `adapter/` merged into the base's transformer at load);
- an original Wan2.1-T2V folder, or a diffusers-format Wan folder;
- a Self-Forcing / CausVid / LongLive `.pt` generator, with `base=` a Wan
  folder that supplies the VAE and the text encoder.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import TetherError
from .memory import make_policy
from .schedule import DEFAULT_SHIFT
from .stream import Stream

WEIGHTS = Path(__file__).parent / "weights"
BUILTIN = WEIGHTS / "default"
# Toy-world models shipped inside the package, selectable by name (`--checkpoint context-forcing`).
SHIPPED_MODELS = ("default", "context-forcing", "grounded-forcing")


def bundle_folder(checkpoint=None) -> Path:
    """The folder a bundle checkpoint names: the built-in model for None or "default", a shipped name, or a path."""
    if checkpoint is None or str(checkpoint) == "default":
        return BUILTIN
    if str(checkpoint) in SHIPPED_MODELS and not Path(checkpoint).exists():
        return WEIGHTS / str(checkpoint)
    return Path(checkpoint)


def shipped_models() -> list:
    """Names of the shipped toy models whose bundle is present in this install."""
    return [name for name in SHIPPED_MODELS if (WEIGHTS / name / "pipeline.json").exists()]
WAN_SIZE = (480, 832)


@dataclass
class GeneratedChunk:
    index: int
    segment: int
    prompt: str
    latents: torch.Tensor
    frames: np.ndarray | None  # uint8 [T, H, W, 3]
    seconds: float  # wall time this chunk took, decode included


DEFAULT_POLICY = "window"


class Pipeline:
    def __init__(self, model, text_encoder, codec, size, fps: int = 16, description: str = "", policy: str = DEFAULT_POLICY,
                 shift: float = DEFAULT_SHIFT, teacher_sampling: dict | None = None):
        self.model = model
        self.policy = policy  # the memory policy the model was trained with, which it runs by default
        self.shift = shift  # the timestep shift it was trained with: its sampler must use the same
        # How to sample the bundle's teacher (Euler "steps" and "shift"): the grid the student was distilled from.
        self.teacher_sampling = dict(teacher_sampling or {})
        self.text_encoder = text_encoder
        self.codec = codec
        self.height, self.width = size
        self.fps = fps
        self.description = description
        stride = codec.spatial_stride if codec is not None else 8
        self.latent_shape = (model.config.in_channels, self.height // stride, self.width // stride)

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        with torch.no_grad():
            return self.text_encoder.encode([prompt])

    def make_stream(self, policy="window", seed: int = 0, switch=None, policy_options=None, **stream_options) -> Stream:
        if isinstance(policy, str):
            policy = make_policy(policy, **(policy_options or {}))
        stream_options.setdefault("shift", self.shift)
        return Stream(self.model, policy, self.encode_prompt, self.latent_shape, switch=switch, seed=seed, **stream_options)

    def generate(self, timeline, policy="window", seed: int = 0, switch=None, decode: bool = True, stream=None,
                 policy_options=None):
        """Yield a GeneratedChunk per chunk of `timeline`, frames decoded as they are made."""
        from .vae import StreamingDecoder

        stream = stream or self.make_stream(policy, seed=seed, switch=switch, policy_options=policy_options)
        decoder = StreamingDecoder(self.codec) if decode and self.codec is not None else None
        started = time.perf_counter()
        for index, segment_index, latents in stream.run(timeline):
            frames = None
            if decoder is not None:
                with torch.no_grad():
                    video = decoder.decode_chunk(latents.to(self.codec_dtype))
                frames = video_to_uint8(video)
            now = time.perf_counter()
            yield GeneratedChunk(index, segment_index, timeline.segments[segment_index].prompt, latents, frames, now - started)
            started = now

    @property
    def codec_dtype(self):
        return next(self.codec.vae.parameters()).dtype


def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """[1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    pixels = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).cpu().numpy()


def _random_toy(device, dtype) -> Pipeline:
    from .checkpoints import load_transformer
    from .text import make_toy_text_encoder
    from .vae import LatentCodec, load_vae

    try:
        from .world import vocabulary

        words = vocabulary()
    except ImportError:
        words = []
    model = load_transformer("toy", dtype=dtype, device=device)
    text = make_toy_text_encoder(words, dim=model.config.text_dim, text_len=model.config.text_len, seed=0)
    codec = LatentCodec(load_vae("toy", device=device))
    return Pipeline(model.eval(), text, codec, (64, 64), description="toy config with RANDOM weights (the built-in model is not trained yet)")


def _bundle(folder: Path, device, dtype) -> Pipeline:
    from .checkpoints import load_transformer
    from .text import load_text_encoder
    from .vae import LatentCodec, load_vae

    meta = json.loads((folder / "pipeline.json").read_text())
    if "base" in meta:
        # A LoRA bundle: an adapter over another bundle's transformer, sharing its VAE and text encoder.
        base = (folder / meta["base"]).resolve()
        if not (base / "pipeline.json").exists():
            raise TetherError(f"{folder} is an adapter over '{meta['base']}', but {base} is not a tether bundle")
        model = load_transformer(str(base / "transformer.safetensors"), dtype=dtype, device=device,
                                 lora=str(folder / meta.get("lora", "adapter")))
        components = base
        base_meta = json.loads((base / "pipeline.json").read_text())
        meta.setdefault("shift", base_meta.get("shift", DEFAULT_SHIFT))
        meta.setdefault("teacher_sampling", base_meta.get("teacher_sampling"))
    else:
        model = load_transformer(str(folder / "transformer.safetensors"), dtype=dtype, device=device)
        components = folder
    text = load_text_encoder(str(components / "text_encoder"), device=device)
    codec = LatentCodec(load_vae(str(components / "vae"), device=device))
    size = (meta["height"], meta["width"])
    return Pipeline(model.eval(), text, codec, size, fps=meta.get("fps", 16), description=meta.get("description", str(folder)),
                    policy=meta.get("policy", DEFAULT_POLICY), shift=float(meta.get("shift", DEFAULT_SHIFT)),
                    teacher_sampling=meta.get("teacher_sampling"))


def _wan(folder: Path, transformer_source, device, dtype, **load_options) -> Pipeline:
    from .checkpoints import load_transformer
    from .text import load_text_encoder
    from .vae import LatentCodec, load_vae

    model = load_transformer(str(transformer_source), dtype=dtype, device=device, **load_options)
    text = load_text_encoder(str(folder), dtype=dtype, device=device)
    vae_source = folder / "Wan2.1_VAE.pth"
    codec = LatentCodec(load_vae(str(vae_source if vae_source.exists() else folder), device=device))
    return Pipeline(model.eval(), text, codec, WAN_SIZE, description=str(transformer_source))


def load_pipeline(checkpoint=None, base=None, device="cpu", dtype=None, ema=False, lora=None, lora_alpha=None) -> Pipeline:
    """Load a whole model from `checkpoint` (see the module docstring for the accepted sources)."""
    if dtype is None:
        dtype = torch.float32 if str(device) == "cpu" else torch.bfloat16
    if checkpoint is None:
        if (BUILTIN / "pipeline.json").exists():
            return _bundle(BUILTIN, device, dtype)
        return _random_toy(device, dtype)
    path = Path(checkpoint)
    if str(checkpoint) in SHIPPED_MODELS and not path.exists():
        if str(checkpoint) not in shipped_models():
            raise TetherError(f"shipped model '{checkpoint}' is not in this install (present: {', '.join(shipped_models()) or 'none'})")
        return _bundle(WEIGHTS / str(checkpoint), device, dtype)
    if not path.exists():
        raise TetherError(f"checkpoint not found: {checkpoint}")
    if path.is_dir() and (path / "pipeline.json").exists():
        return _bundle(path, device, dtype)
    options = {"ema": ema, "lora": lora, "lora_alpha": lora_alpha}
    if path.is_dir() and ((path / "transformer").is_dir() or any(path.glob("diffusion_pytorch_model*.safetensors"))):
        source = path / "transformer" if (path / "transformer").is_dir() else path
        return _wan(path, source, device, dtype, **options)
    if path.is_dir() and (path / "longlive_base.pt").exists():
        if base is None:
            raise TetherError("a LongLive folder holds only the generator: pass --base WAN_FOLDER for the VAE and text encoder")
        return _wan(Path(base), path, device, dtype, **options)
    if path.suffix == ".pt":
        if base is None:
            raise TetherError(f"{path.name} holds only the generator: pass --base WAN_FOLDER for the VAE and text encoder")
        if not Path(base).is_dir():
            raise TetherError(f"base folder not found: {base}")
        return _wan(Path(base), path, device, dtype, **options)
    raise TetherError(f"not a checkpoint tether can read: {checkpoint} (expected a tether bundle, a Wan2.1 folder, a diffusers folder or a .pt generator)")
