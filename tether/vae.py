"""The Wan2.1 video VAE: loading it, and moving between pixels and latents.

Wan2.1's VAE is causal in time: latent frame 0 encodes pixel frame 0 alone and
every later latent frame encodes the next 4 pixel frames, so F latent frames
decode to 1 + 4 (F - 1) pixel frames. Spatially it downsamples by 8.

Because it is causal, a video can be decoded chunk by chunk as the generator
produces latents, provided the convolutions' temporal context (diffusers'
"feature cache") is carried from one chunk to the next. `StreamingDecoder` does
exactly that, so streamed pixels equal a one-shot decode of the whole video.

Latents handed to and returned from this module are *normalised* per channel,
``(z - latents_mean) / latents_std``, which is the space the diffusion
transformer works in.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, patchify, unpatchify

from tether.errors import TetherError

__all__ = [
    "BUILTIN_VAE_CONFIGS",
    "LatentCodec",
    "StreamingDecoder",
    "StreamingEncoder",
    "builtin_vae",
    "frames_to_video_tensor",
    "load_vae",
    "use_onednn_convolutions",
    "video_tensor_to_frames",
]

# Wan2.1's own VAE is diffusers' default `AutoencoderKLWan()` config (base_dim 96,
# z_dim 16, dim_mult [1, 2, 4, 4], 2 res blocks, temporal downsample
# [False, True, True], and the published latents_mean/std), so an original
# checkpoint is built with no arguments at all.
WAN21_VAE_CONFIG: dict[str, Any] = {}

_UNIT_STATS = {"latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}

# Small VAEs with Wan2.1's exact structure (so they keep the (4, 8, 8) stride and
# the original Wan key layout) but narrow channels. They are randomly initialised
# from a fixed seed, so "toy" is the same model in every process until someone
# trains it and saves it as a diffusers folder.
BUILTIN_VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "toy": {"base_dim": 16, "z_dim": 16, **_UNIT_STATS},
    "tiny": {"base_dim": 4, "z_dim": 16, **_UNIT_STATS},
    # One downsampling stage fewer: a (4, 4, 4) stride, so a 64x64 frame keeps 16x16 latent pixels
    # where "toy" keeps 8x8. At 8x8 the toy world's 14-22 px objects are 2-3 latent pixels wide and
    # the trained encoder kept no shape at all (`tether bench latents`: 23 %, chance 20 %).
    "toy-s4": {"base_dim": 16, "z_dim": 16, "dim_mult": [1, 2, 4], "temperal_downsample": [True, True],
               "scale_factor_spatial": 4, **_UNIT_STATS},
}
_BUILTIN_SEED = 0
# Config key of the per-frame-index latent scale (see LatentCodec), saved with the VAE's config.
FRAME_SCALE_KEY = "latents_frame_scale"

_DIFFUSERS_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_DIFFUSERS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


# ----------------------------------------------------------------------------- loading


def load_vae(
    source: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    config: str | Mapping[str, Any] | None = None,
    fast_cpu_convolutions: bool = True,
) -> AutoencoderKLWan:
    """Load a Wan VAE from a local source, in eval mode with gradients off.

    ``source`` is one of:

    * an original Wan checkpoint file (``Wan2.1_VAE.pth``; also ``.safetensors``
      re-packs), in the original Wan key layout or already in diffusers' layout;
    * a diffusers folder: the VAE folder itself (``config.json`` + weights) or a
      pipeline folder with a ``vae/`` subfolder;
    * the name of a built-in config: ``"toy"`` or ``"tiny"`` (seeded random weights).

    A single checkpoint file carries no config: it is built as Wan2.1's VAE
    unless ``config`` names a built-in config or gives `AutoencoderKLWan`
    arguments (e.g. a "toy" VAE saved in the original Wan layout).

    ``dtype`` defaults to float32 and ``device`` to CPU. Nothing is ever fetched
    from a hub. A checkpoint that does not match the architecture exactly raises
    `TetherError` naming the missing, unexpected and mis-shaped keys.
    ``fast_cpu_convolutions`` applies `use_onednn_convolutions` (see there).
    """
    dtype = dtype or torch.float32
    name = os.fspath(source)
    path = Path(name).expanduser()

    if config is not None and (path.is_dir() or name in BUILTIN_VAE_CONFIGS):
        raise ValueError("config= only applies to single checkpoint files; folders and built-ins carry their own")
    if path.is_dir():
        vae = _load_diffusers_folder(path)
    elif path.is_file():
        vae = _load_checkpoint_file(path, _resolve_config(config))
    elif name in BUILTIN_VAE_CONFIGS:
        vae = builtin_vae(name)
    else:
        raise TetherError(
            f"VAE not found: '{name}' is neither an existing checkpoint file or folder "
            f"nor a built-in VAE ({', '.join(BUILTIN_VAE_CONFIGS)})"
        )

    # nn.Module.to rather than ModelMixin.to: the latter warns about fp32-pinned
    # modules on every dtype cast, and this VAE has none.
    torch.nn.Module.to(vae, device=device or "cpu", dtype=dtype)
    vae.eval().requires_grad_(False)
    if fast_cpu_convolutions:
        use_onednn_convolutions(vae)
    return vae


def builtin_vae(name: str, overrides: Mapping[str, Any] | None = None) -> AutoencoderKLWan:
    """A built-in VAE config's seeded random weights, with `AutoencoderKLWan` arguments changed by `overrides`
    (e.g. ``{"z_dim": 32}`` or ``{"temperal_downsample": [False, True]}``):
    how a variant of the toy VAE is trained from scratch."""
    config = {**_resolve_config(name), **(overrides or {})}
    # The strides follow from the layers (one halving per downsampling stage), so an override can't contradict them.
    config["scale_factor_spatial"] = 2 ** (len(config.get("dim_mult", [1, 2, 4, 4])) - 1)
    config["scale_factor_temporal"] = 2 ** sum(bool(d) for d in config.get("temperal_downsample", [False, True, True]))
    z_dim = config.get("z_dim", 16)
    if len(config.get("latents_mean", [])) != z_dim:  # unit statistics until an export measures them
        config.update(latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_BUILTIN_SEED)
            return AutoencoderKLWan(**config)
    except (TypeError, ValueError, IndexError) as error:
        raise TetherError(f"VAE config '{name}' with {dict(overrides or {})} does not build: {error}") from None


def use_onednn_convolutions(vae: torch.nn.Module) -> None:
    """Route the VAE's float32 CPU 3D convolutions to oneDNN (about 2x faster here).

    PyTorch's CPU backend choice looks at the first four dims of the input, a
    rule written for 2D images; for a single video [1, C, T, H, W] it picks the
    slow reference 3D kernel. Both one-shot and streaming decodes go through the
    same convolutions, so they still agree exactly. Other devices and dtypes
    are untouched, and gradients still flow.
    """
    if not torch.backends.mkldnn.is_available():
        return
    for layer in vae.modules():
        if isinstance(layer, WanCausalConv3d):
            layer._conv_forward = types.MethodType(_conv3d_preferring_onednn, layer)


def _conv3d_preferring_onednn(
    layer: torch.nn.Conv3d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if x.device.type == "cpu" and x.dtype == torch.float32 and layer.padding_mode == "zeros":
        return torch.mkldnn_convolution(x, weight, bias, layer.padding, layer.stride, layer.dilation, layer.groups)
    return torch.nn.Conv3d._conv_forward(layer, x, weight, bias)


def _resolve_config(config: str | Mapping[str, Any] | None) -> Mapping[str, Any]:
    if config is None:
        return WAN21_VAE_CONFIG
    if isinstance(config, str):
        if config not in BUILTIN_VAE_CONFIGS:
            raise TetherError(f"unknown VAE config '{config}' (built-in: {', '.join(BUILTIN_VAE_CONFIGS)})")
        return BUILTIN_VAE_CONFIGS[config]
    return config


def _load_checkpoint_file(path: Path, config: Mapping[str, Any]) -> AutoencoderKLWan:
    """A single weights file, with original Wan or diffusers key names."""
    state_dict = _read_weights(path)
    if not _is_diffusers_layout(state_dict):
        state_dict, shown_names = _convert_original_wan_keys(state_dict)
    else:
        shown_names = None
    return _build_and_load(config, state_dict, f"VAE checkpoint {path}", shown_names)


def _load_diffusers_folder(folder: Path) -> AutoencoderKLWan:
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise TetherError(f"VAE folder {folder} has no config.json (nor a vae/ subfolder with one)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise TetherError(f"could not read VAE config {config_path}: {error}") from None
    class_name = config.get("_class_name", "AutoencoderKLWan")
    if class_name != "AutoencoderKLWan":
        raise TetherError(f"VAE folder {folder} holds a {class_name}, not an AutoencoderKLWan")
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    frame_scale = config.pop(FRAME_SCALE_KEY, None)  # tether's addition: AutoencoderKLWan does not take it

    state_dict = _read_diffusers_weights(folder)
    vae = _build_and_load(config, state_dict, f"VAE folder {folder}", None)
    if frame_scale is not None:
        vae.register_to_config(**{FRAME_SCALE_KEY: list(frame_scale)})
    return vae


def _read_diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    index_path = folder / _DIFFUSERS_INDEX_NAME
    if index_path.is_file():
        try:
            shard_names = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as error:
            raise TetherError(f"could not read weights index {index_path}: {error!r}") from None
        state_dict: dict[str, torch.Tensor] = {}
        for shard_name in shard_names:
            state_dict.update(_read_weights(folder / shard_name))
        return state_dict
    for weight_name in _DIFFUSERS_WEIGHT_NAMES:
        if (folder / weight_name).is_file():
            return _read_weights(folder / weight_name)
    # A lone variant file such as diffusion_pytorch_model.fp16.safetensors.
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return _read_weights(candidates[0])
    raise TetherError(f"VAE folder {folder} has no single weights file (expected {_DIFFUSERS_WEIGHT_NAMES[0]})")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise TetherError(f"VAE weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - any unreadable file is the user's problem
        raise TetherError(f"could not read VAE weights {path}: {type(error).__name__}: {error}") from None
    # Some training scripts wrap the weights in {"state_dict": ...}.
    for wrapper_key in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and set(loaded) == {wrapper_key}:
            loaded = loaded[wrapper_key]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise TetherError(f"VAE weights {path} are not a flat state dict of tensors")
    return dict(loaded)


def _is_diffusers_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(key.startswith(("encoder.conv_in.", "decoder.conv_in.")) for key in state_dict)


def _convert_original_wan_keys(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename original Wan keys to diffusers' with diffusers' own converter.

    Keys are converted one at a time (the converter is a pure per-key mapping) so
    that error messages can name the key as it is spelled in the user's file.
    """
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    converted: dict[str, torch.Tensor] = {}
    original_name_of: dict[str, str] = {}
    for original_key, tensor in state_dict.items():
        ((new_key, new_tensor),) = convert_wan_vae_to_diffusers({original_key: tensor}).items()
        if new_key in converted:
            raise TetherError(
                f"VAE checkpoint has two keys that both map to '{new_key}': "
                f"'{original_name_of[new_key]}' and '{original_key}'"
            )
        converted[new_key] = new_tensor
        original_name_of[new_key] = original_key
    return converted, original_name_of


def _build_and_load(
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    description: str,
    shown_names: Mapping[str, str] | None,
) -> AutoencoderKLWan:
    """Build the model without spending time on random init, then load strictly."""
    try:
        with torch.device("meta"):
            vae = AutoencoderKLWan(**config)
    except TypeError as error:
        raise TetherError(f"{description}: unusable config: {error}") from None
    _raise_on_mismatch(vae, state_dict, description, shown_names)
    vae.load_state_dict(state_dict, strict=True, assign=True)
    return vae


def _raise_on_mismatch(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    description: str,
    shown_names: Mapping[str, str] | None = None,
) -> None:
    """One `TetherError` listing every way the checkpoint differs from the model."""
    shown_names = shown_names or {}
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    missing = [key for key in expected if key not in state_dict]
    unexpected = [shown_names.get(key, key) for key in state_dict if key not in expected]
    mismatched = [
        f"{shown_names.get(key, key)} (checkpoint {tuple(tensor.shape)}, model {expected[key]})"
        for key, tensor in state_dict.items()
        if key in expected and tuple(tensor.shape) != expected[key]
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    for label, names in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if names:
            problems.append(f"{label} ({len(names)}): {_abbreviate(names)}")
    raise TetherError(f"{description} does not fit the VAE architecture: " + "; ".join(problems))


def _abbreviate(names: Iterable[str], shown: int = 4) -> str:
    names = list(names)
    text = ", ".join(names[:shown])
    if len(names) > shown:
        text += f", ... (+{len(names) - shown} more)"
    return text


# ----------------------------------------------------------------------------- pixels <-> tensors


def frames_to_video_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> float32 video [1, 3, T, H, W] in [-1, 1]."""
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    video = frames.permute(3, 0, 1, 2).unsqueeze(0).to(torch.float32)
    return video.div_(127.5).sub_(1.0)


def video_tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """Video [3, T, H, W] or [1, 3, T, H, W] in [-1, 1] -> uint8 frames [T, H, W, 3]."""
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(f"expected a single video, got a batch of {video.shape[0]}")
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected video [3, T, H, W], got {tuple(video.shape)}")
    pixels = (video.detach().float().clamp(-1.0, 1.0) + 1.0).mul_(127.5).round_()
    return pixels.to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


# ----------------------------------------------------------------------------- latents


def std_by_latent_frame(latents: torch.Tensor) -> list:
    """Standard deviation of latents [N, C, F, h, w] at each latent frame index (over clips, channels, pixels)."""
    latents = latents.float()
    return [round(float(latents[:, :, k].std()), 4) for k in range(latents.shape[2])]


class LatentCodec:
    """Encode videos to normalised latents and decode them back, in one shot.

    Videos are float [B, 3, T, H, W] in [-1, 1] with T = 1 + 4k and H, W
    multiples of 8; latents are [B, z, F, H/8, W/8] with F = 1 + k.
    """

    def __init__(self, vae: AutoencoderKLWan):
        self.vae = vae
        config = vae.config
        self.z_dim: int = config.z_dim
        self.temporal_stride: int = config.scale_factor_temporal or 4
        self.spatial_stride: int = config.scale_factor_spatial or 8
        parameter = next(vae.parameters())
        stats_shape = (1, self.z_dim, 1, 1, 1)
        self.latents_mean = torch.tensor(config.latents_mean, dtype=parameter.dtype).view(stats_shape)
        self.latents_std = torch.tensor(config.latents_std, dtype=parameter.dtype).view(stats_shape)
        self.latents_mean = self.latents_mean.to(parameter.device)
        self.latents_std = self.latents_std.to(parameter.device)
        # A causal encoder trained from scratch encodes the first latent frames at a fraction of its
        # steady scale (it starts from empty caches), which leaves them at a lower signal-to-noise
        # ratio than later frames at every diffusion timestep. One factor per leading frame index
        # (the last applies to every later frame) brings each index to unit scale.
        scale = getattr(config, FRAME_SCALE_KEY, None) or [1.0]
        self.frame_scale = torch.tensor(scale, dtype=parameter.dtype, device=parameter.device)

    @property
    def device(self) -> torch.device:
        return self.latents_mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.latents_mean.dtype

    def num_frames(self, num_latent_frames: int) -> int:
        """Pixel frames that ``num_latent_frames`` latent frames decode to."""
        return 1 + self.temporal_stride * (num_latent_frames - 1)

    def num_latent_frames(self, num_frames: int) -> int:
        """Latent frames for ``num_frames`` pixel frames (which must be 1 + 4k)."""
        if num_frames < 1 or (num_frames - 1) % self.temporal_stride:
            raise ValueError(f"a video must have 1 + {self.temporal_stride}k frames, got {num_frames}")
        return 1 + (num_frames - 1) // self.temporal_stride

    def frame_scale_of(self, first_frame: int, num_frames: int) -> torch.Tensor:
        """[1, 1, num_frames, 1, 1]: the scale of latent frames first_frame, first_frame + 1, ... of a video."""
        index = torch.arange(first_frame, first_frame + num_frames, device=self.device)
        return self.frame_scale[index.clamp_max(len(self.frame_scale) - 1)].view(1, 1, -1, 1, 1)

    def normalize(self, raw_latents: torch.Tensor, first_frame: int = 0) -> torch.Tensor:
        """Raw latents of a video's frames first_frame, ... -> unit-scale latents."""
        scale = self.frame_scale_of(first_frame, raw_latents.shape[2])
        return (raw_latents - self.latents_mean) / (self.latents_std * scale)

    def denormalize(self, latents: torch.Tensor, first_frame: int = 0) -> torch.Tensor:
        latents = latents.to(device=self.device, dtype=self.dtype)
        return latents * (self.latents_std * self.frame_scale_of(first_frame, latents.shape[2])) + self.latents_mean

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, T, H, W] in [-1, 1] -> normalised latents (posterior mean)."""
        self._check_video(video, first_chunk=True)
        video = video.to(device=self.device, dtype=self.dtype)
        posterior = self.vae.encode(video).latent_dist
        return self.normalize(posterior.mean)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, z, F, h, w] -> video [B, 3, 1 + 4(F-1), 8h, 8w] in [-1, 1]."""
        self._check_latents(latents)
        return self.vae.decode(self.denormalize(latents)).sample

    def _check_video(self, video: torch.Tensor, first_chunk: bool) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected video [B, 3, T, H, W], got {tuple(video.shape)}")
        num_frames, height, width = video.shape[2:]
        stride = self.temporal_stride
        expected_remainder = 1 if first_chunk else 0
        if num_frames < 1 or num_frames % stride != expected_remainder % stride:
            form = f"1 + {stride}k" if first_chunk else f"{stride}k"
            raise ValueError(f"expected {form} frames, got {num_frames}")
        if height % self.spatial_stride or width % self.spatial_stride:
            raise ValueError(f"video height and width must be multiples of {self.spatial_stride}, got {height}x{width}")

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.z_dim or latents.shape[2] < 1:
            raise ValueError(f"expected latents [B, {self.z_dim}, F, h, w], got {tuple(latents.shape)}")


def _count_causal_convs(module: torch.nn.Module) -> int:
    return sum(isinstance(layer, WanCausalConv3d) for layer in module.modules())


class _CausalStream:
    """Shared bookkeeping of a streaming encoder or decoder: the feature cache.

    diffusers' Wan encoder/decoder take a list with one slot per causal conv and
    fill each slot with the last frames that conv saw (or the marker "Rep" for
    the first-frame special case). Carrying that list between calls is all it
    takes to continue a video where the previous call stopped.
    """

    def __init__(self, codec: LatentCodec, module: torch.nn.Module):
        self.codec = codec
        self._num_slots = _count_causal_convs(module)
        self.reset()

    def reset(self) -> None:
        """Forget the previous video; the next chunk starts a new one."""
        self._feature_cache: list[Any] = [None] * self._num_slots
        self.latent_frames_done = 0

    @property
    def started(self) -> bool:
        return self.latent_frames_done > 0

    def state_dict(self) -> dict[str, Any]:
        """The stream's position and cached features, enough to resume it later."""
        return {"latent_frames_done": self.latent_frames_done, "feature_cache": list(self._feature_cache)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume a stream saved with `state_dict` (same VAE)."""
        cache = list(state["feature_cache"])
        if len(cache) != self._num_slots:
            raise TetherError(
                f"stream state has {len(cache)} cached features but this VAE needs {self._num_slots}; "
                "it was saved with a different VAE"
            )
        device = self.codec.device
        self._feature_cache = [entry.to(device) if isinstance(entry, torch.Tensor) else entry for entry in cache]
        self.latent_frames_done = int(state["latent_frames_done"])


class StreamingDecoder(_CausalStream):
    """Decode a video's latents chunk by chunk, as they are generated.

    The concatenation of all `decode_chunk` outputs equals `LatentCodec.decode`
    of the concatenated latents. Chunks may have any number of latent frames;
    the first chunk's first latent frame yields 1 pixel frame, every other
    latent frame 4.
    """

    def __init__(self, codec: LatentCodec):
        super().__init__(codec, codec.vae.decoder)

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, z, f, h, w] -> video [B, 3, t, 8h, 8w] in [-1, 1]."""
        self.codec._check_latents(latents)
        vae = self.codec.vae
        hidden = vae.post_quant_conv(self.codec.denormalize(latents, first_frame=self.latent_frames_done))
        # One latent frame per decoder call, exactly like diffusers' one-shot
        # decode, so results match it bit for bit.
        pieces = []
        for frame_index in range(hidden.shape[2]):
            pieces.append(
                vae.decoder(
                    hidden[:, :, frame_index : frame_index + 1],
                    feat_cache=self._feature_cache,
                    feat_idx=[0],
                    first_chunk=not self.started,
                )
            )
            self.latent_frames_done += 1
        video = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
        if vae.config.patch_size is not None:
            video = unpatchify(video, patch_size=vae.config.patch_size)
        return video.clamp_(-1.0, 1.0)


class StreamingEncoder(_CausalStream):
    """Encode a video chunk by chunk: 1 + 4k pixel frames first, then 4k per chunk.

    The concatenation of all `encode_chunk` outputs equals `LatentCodec.encode`
    of the concatenated video.
    """

    def __init__(self, codec: LatentCodec):
        super().__init__(codec, codec.vae.encoder)

    @torch.no_grad()
    def encode_chunk(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, t, H, W] in [-1, 1] -> normalised latents [B, z, f, H/8, W/8]."""
        self.codec._check_video(video, first_chunk=not self.started)
        vae = self.codec.vae
        video = video.to(device=self.codec.device, dtype=self.codec.dtype)
        if vae.config.patch_size is not None:
            video = patchify(video, patch_size=vae.config.patch_size)
        stride = self.codec.temporal_stride
        # The causal encoder consumes the first frame alone, then groups of 4.
        group_starts = list(range(0 if self.started else 1, video.shape[2], stride))
        if not self.started:
            group_starts.insert(0, 0)
        group_ends = group_starts[1:] + [video.shape[2]]
        first_frame = self.latent_frames_done
        pieces = []
        for start, end in zip(group_starts, group_ends):
            pieces.append(vae.encoder(video[:, :, start:end], feat_cache=self._feature_cache, feat_idx=[0]))
            self.latent_frames_done += 1
        moments = vae.quant_conv(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
        mean = moments[:, : self.codec.z_dim]
        return self.codec.normalize(mean, first_frame=first_frame)
