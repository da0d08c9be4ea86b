"""Reading and writing transformer weights.

Every checkpoint of the field holds the same Wan2.1 network in a different
layout. This module turns each into a `WanTransformer` (whose parameter names
are Wan2.1's original ones) and writes tether's own format.

Sources `load_transformer` accepts, by the name `detect_format` gives them:

- "config": a named config ("tiny", "toy", "wan2.1-t2v-1.3b", ...): random
  weights, always the same ones (seed 0).
- "wan": an original Wan2.1-T2V folder: Wan's `config.json` and
  `diffusion_pytorch_model.safetensors`, or shards listed in
  `diffusion_pytorch_model.safetensors.index.json`.
- "diffusers": a diffusers pipeline folder (its `transformer/` is used) or a
  `WanTransformer3DModel` folder. Names are converted back to the original ones.
- "self-forcing": a `.pt` training checkpoint of Self-Forcing, CausVid or
  LongLive: `{"generator": ..., "generator_ema": ..., "critic": ...}` with keys
  prefixed `model.`; `ema=True` takes `generator_ema`.
- "longlive": a folder with `longlive_base.pt` (a "self-forcing" checkpoint)
  and, optionally, the `lora.pt` that LongLive merges into it.
- "tether": tether's own single `.safetensors` file, its `ModelConfig` in the
  metadata; written by `save_transformer`.
- "safetensors": any other `.safetensors` file of transformer weights
  (original or diffusers names; e.g. ComfyUI's `model.diffusion_model.` files).
- "lora": a LoRA file or PEFT adapter folder: not a model, pass it as `lora=`.

The model config comes from, in order: the `config=` argument; what the
checkpoint states (Wan's or diffusers' `config.json`, tether's metadata); the
tensor shapes. Whatever a checkpoint does not state (diffusers never records
`text_len`, a `.pt` records nothing) is taken from the named config that agrees
with everything it does state; failing that, Wan's defaults (head size 128,
512 text tokens).

Loading is strict: one `TetherError` names every missing key, unexpected key
and shape mismatch. `.pt` files are only ever read with `weights_only=True`.
"""

import json
import math
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .configs import CONFIGS, ModelConfig, get_config
from .errors import TetherError
from .model import WanTransformer
from .model.rope import Rope3D

FORMATS = ("config", "wan", "diffusers", "self-forcing", "longlive", "tether", "safetensors", "lora")

WAN_WEIGHTS = "diffusion_pytorch_model.safetensors"
WAN_INDEX = "diffusion_pytorch_model.safetensors.index.json"
WAN_SHARD_PATTERN = "diffusion_pytorch_model-*-of-*.safetensors"
LONGLIVE_BASE = "longlive_base.pt"
LONGLIVE_LORA = "lora.pt"
TETHER_METADATA_KEY = "tether_config"
# adapter_config.json: the fingerprint of the base weights an adapter was made over (see weights_fingerprint)
BASE_FINGERPRINT_KEY = "tether_base_fingerprint"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# Wan's attention heads are 128 wide at every released size, which is what lets a
# bare state dict (shapes only, no head count) be mapped to a config.
WAN_HEAD_DIM = 128

# Above this many bytes of float32 weights, a random model is built directly in
# the requested dtype, so the 14B config never needs its fp32 size in memory.
# Below it, it is built in fp32 and cast, so that a small model's bf16 weights
# are exactly its fp32 weights rounded.
DIRECT_DTYPE_BUILD_BYTES = 1 << 30

# Shown in an error message before "..." for each kind of mismatch.
SHOWN_PER_KIND = 5


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def detect_format(path) -> str:
    """What `path` is: one of `FORMATS`. A string naming a config is "config".

    Raises `TetherError` for a missing path or anything tether cannot read.
    A `.pt` file is opened (memory-mapped, so cheaply) to tell a LoRA from a model.
    """
    if isinstance(path, str) and path in CONFIGS:
        return "config"
    path = Path(path)
    if not path.exists():
        raise TetherError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _folder_format(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        metadata, keys = _safetensors_header(path)
        if TETHER_METADATA_KEY in metadata:
            return "tether"
        return "lora" if keys and all(_is_lora_key(k) for k in keys) else "safetensors"
    if suffix in TORCH_SUFFIXES:
        contents = _torch_load(path)
        return "lora" if _looks_like_lora_file(contents) else "self-forcing"
    raise TetherError(
        f"not a checkpoint tether can read: {path} (expected a folder, a .safetensors file or a "
        f"{'/'.join(TORCH_SUFFIXES)} file)"
    )


def load_transformer(source, dtype=None, device=None, ema=False, lora=None, lora_alpha=None, config=None) -> WanTransformer:
    """A `WanTransformer` from a named config or a checkpoint (see the module docstring).

    dtype: the weights' dtype; None keeps the checkpoint's (float32 if it mixes
        float dtypes; float32 for a named config). Applied after loading, and
        after any LoRA merge, which is computed in float32.
    device: where the model ends up (loading itself happens on the CPU).
    ema: take the EMA weights (`generator_ema`) of a training checkpoint; an
        error for sources that have none.
    lora: a LoRA to merge (a PEFT-style `.pt`/`.safetensors` file or an adapter
        folder); overrides the `lora.pt` of a LongLive folder. Every factor pair
        is merged as W += (alpha / rank) * B @ A.
    lora_alpha: the LoRA's alpha. Default: the adapter folder's
        `adapter_config.json` if there is one, else the rank (scale 1).
        A LoRA `.pt` does not record alpha: check the training config (LongLive:
        `adapter.alpha` in `configs/longlive_inference.yaml`, which is 256 with
        rank 256, i.e. scale 1) and pass e.g. `lora_alpha=256` if it differs
        from the rank.
    config: a config name or `ModelConfig` that overrides whatever the
        checkpoint states or its shapes suggest (the strict check still applies).
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TetherError(f"dtype must be a floating point torch.dtype, not {dtype}")
    if isinstance(source, str) and source in CONFIGS:
        if ema or lora is not None or lora_alpha is not None or config is not None:
            raise TetherError(
                f"'{source}' is a named config with random weights: ema, lora, lora_alpha and config do not apply"
            )
        return _random_model(CONFIGS[source], dtype).to(device)

    path = Path(source)
    fmt = detect_format(path)
    checkpoint = _READERS[fmt](path, ema)
    if lora is not None:
        checkpoint.lora = _read_lora(Path(lora))
        made_over = checkpoint.lora.base_fingerprint
        if made_over and made_over != (found := weights_fingerprint(path)):
            # Its deltas would merge cleanly into any base of the right shape, and silently make noise.
            raise TetherError(f"{checkpoint.lora.label} was made over other base weights than {path} "
                              f"(fingerprint {found[:12]}, the adapter's {made_over[:12]}): "
                              f"load it over the base it was trained on, or retrain it")
    if checkpoint.lora is not None:
        _merge_lora(checkpoint, lora_alpha)
    elif lora_alpha is not None:
        raise TetherError(f"lora_alpha was given but {path} comes with no LoRA")

    cfg = _resolve_config(config) if config is not None else _complete_config(checkpoint.stated_config(), checkpoint.label)
    model = _empty_model(cfg)
    _check_fits(model, checkpoint, cfg)
    _cast_in_place(checkpoint.weights, dtype)
    model.load_state_dict(checkpoint.weights, strict=True, assign=True)
    return model.to(device)


def save_transformer(model: WanTransformer, path, dtype=None) -> None:
    """Write `model` as tether's own single `.safetensors` file (config in the metadata).

    The file is written next to its destination and renamed over it, so a
    crash never leaves a half-written checkpoint under `path`.
    """
    path = Path(path)
    tensors = {
        name: tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype).contiguous()
        for name, tensor in model.state_dict().items()
    }
    metadata = {TETHER_METADATA_KEY: json.dumps(model.config.to_dict()), "format": "pt"}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        from safetensors.torch import save_file

        save_file(tensors, tmp_name, metadata=metadata)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------
# What a reader hands over
# ---------------------------------------------------------------------------


@dataclass
class Lora:
    """LoRA factors by the weight they update: {"blocks.0.self_attn.q.weight": (A [r, in], B [out, r])}."""

    factors: dict
    label: str
    alpha: float = None  # from an adapter_config.json; None when the file does not say
    rslora: bool = False  # PEFT's rank-stabilised scaling alpha / sqrt(r)
    base_fingerprint: str = None  # adapter_config.json's BASE_FINGERPRINT_KEY, when tether wrote it


@dataclass
class Checkpoint:
    """Weights under original Wan names, plus what the checkpoint says about itself."""

    weights: dict
    label: str
    config_fields: dict = None  # ModelConfig fields the checkpoint states; None: infer from shapes
    file_names: dict = field(default_factory=dict)  # original name -> name in the file, where they differ
    lora: Lora = None

    def stated_config(self) -> dict:
        if self.config_fields is not None:
            return dict(self.config_fields)
        return _config_fields_from_shapes(self.weights, self.label)


# ---------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------


def _folder_format(folder: Path) -> str:
    if (folder / "transformer" / "config.json").exists() or (folder / "model_index.json").exists():
        return "diffusers"
    if (folder / LONGLIVE_BASE).exists():
        return "longlive"
    if (folder / "adapter_config.json").exists():
        return "lora"
    config_path = folder / "config.json"
    if config_path.exists():
        stated = _read_json(config_path)
        if stated.get("_class_name") == "WanTransformer3DModel" or "num_attention_heads" in stated:
            return "diffusers"
        if "dim" in stated and "num_heads" in stated:
            return "wan"
        raise TetherError(
            f"{config_path} is neither Wan's nor diffusers' transformer config "
            f"(_class_name: {stated.get('_class_name')!r})"
        )
    weight_files = _folder_weight_files(folder)
    if weight_files:
        # No config: tell the layouts apart by their parameter names.
        _, keys = _safetensors_header(weight_files[0])
        return "diffusers" if _has_diffusers_names(keys) else "wan"
    raise TetherError(
        f"no transformer checkpoint in folder {folder}: expected config.json with {WAN_WEIGHTS} "
        f"(or its shards), a diffusers pipeline, or {LONGLIVE_BASE}"
    )


def _no_ema(path: Path, ema: bool, what: str):
    if ema:
        raise TetherError(f"{path} is {what}, which has no EMA weights; drop ema=True")


def _read_wan_folder(folder: Path, ema: bool) -> Checkpoint:
    _no_ema(folder, ema, "an original Wan2.1 folder")
    checkpoint = _checkpoint_from_files(_folder_weight_files(folder, required=True), f"checkpoint {folder}")
    config_path = folder / "config.json"
    if config_path.exists():
        checkpoint.config_fields = _config_fields_from_wan_json(_read_json(config_path), config_path)
    return checkpoint


def _read_diffusers_folder(folder: Path, ema: bool) -> Checkpoint:
    _no_ema(folder, ema, "a diffusers folder")
    if (folder / "transformer").is_dir():
        folder = folder / "transformer"
    checkpoint = _checkpoint_from_files(_folder_weight_files(folder, required=True), f"checkpoint {folder}")
    config_path = folder / "config.json"
    if config_path.exists():
        checkpoint.config_fields = _config_fields_from_diffusers_json(_read_json(config_path), config_path)
    return checkpoint


def _read_training_checkpoint(path: Path, ema: bool) -> Checkpoint:
    contents = _torch_load(path)
    if _looks_like_lora_file(contents):
        raise TetherError(f"{path} holds only LoRA weights: pass it as lora= next to its base checkpoint")
    tensors = _generator_tensors(contents, ema, path)
    weights, file_names = _to_original_names(tensors, f"checkpoint {path}")
    return Checkpoint(weights, f"checkpoint {path}", file_names=file_names)


def _read_longlive_folder(folder: Path, ema: bool) -> Checkpoint:
    checkpoint = _read_training_checkpoint(folder / LONGLIVE_BASE, ema)
    if (folder / LONGLIVE_LORA).exists():
        checkpoint.lora = _read_lora(folder / LONGLIVE_LORA)
    return checkpoint


def _read_tether_file(path: Path, ema: bool) -> Checkpoint:
    _no_ema(path, ema, "a tether checkpoint")
    metadata, _ = _safetensors_header(path)
    try:
        stated = json.loads(metadata[TETHER_METADATA_KEY])
    except json.JSONDecodeError as error:
        raise TetherError(f"{path}: unreadable {TETHER_METADATA_KEY} metadata ({error})") from None
    config = ModelConfig.from_dict(stated)
    checkpoint = _checkpoint_from_files([path], f"checkpoint {path}")
    checkpoint.config_fields = {f.name: getattr(config, f.name) for f in fields(ModelConfig)}
    return checkpoint


def _read_plain_safetensors(path: Path, ema: bool) -> Checkpoint:
    _no_ema(path, ema, "a plain safetensors file")
    return _checkpoint_from_files([path], f"checkpoint {path}")


def _read_lora_as_model(path: Path, ema: bool) -> Checkpoint:
    raise TetherError(f"{path} holds only LoRA weights: pass it as lora= next to its base checkpoint")


_READERS = {
    "wan": _read_wan_folder,
    "diffusers": _read_diffusers_folder,
    "self-forcing": _read_training_checkpoint,
    "longlive": _read_longlive_folder,
    "tether": _read_tether_file,
    "safetensors": _read_plain_safetensors,
    "lora": _read_lora_as_model,
}


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise TetherError(f"cannot read {path}: {error}") from None


def _folder_weight_files(folder: Path, required: bool = False) -> list:
    """The safetensors files holding a Wan / diffusers transformer: one file or all shards."""
    single = folder / WAN_WEIGHTS
    if single.exists():
        return [single]
    index = folder / WAN_INDEX
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise TetherError(f"{index} has no weight_map")
        shards = [folder / name for name in dict.fromkeys(weight_map.values())]
        absent = [shard.name for shard in shards if not shard.exists()]
        if absent:
            raise TetherError(f"{index} lists shards that are not in {folder}: {', '.join(absent)}")
        return shards
    shards = sorted(folder.glob(WAN_SHARD_PATTERN))
    if not shards and required:
        raise TetherError(f"no {WAN_WEIGHTS} (nor its shards with {WAN_INDEX}) in {folder}")
    return shards


def _safetensors_header(path: Path):
    """(metadata, keys) of a safetensors file, without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}, list(handle.keys())
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise TetherError(f"cannot read {path} as safetensors: {error}") from None


def _read_safetensors(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            # get_tensor maps the file; clone so that the model never shares pages
            # with a file that someone may later overwrite in place.
            return {key: handle.get_tensor(key).clone() for key in handle.keys()}
    except Exception as error:
        raise TetherError(f"cannot read {path} as safetensors: {error}") from None


def _checkpoint_from_files(files: list, label: str) -> Checkpoint:
    tensors = {}
    for path in files:
        for key, tensor in _read_safetensors(path).items():
            if key in tensors:
                raise TetherError(f"{label}: key {key} appears in more than one file")
            tensors[key] = tensor
    weights, file_names = _to_original_names(tensors, label)
    return Checkpoint(weights, label, file_names=file_names)


def _torch_load(path: Path):
    """torch.load restricted to plain data (weights_only), memory-mapped where the file allows."""
    try:
        try:
            # mmap: only the tensors actually used (e.g. `generator`, not `critic`) are read.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) file
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TetherError(
            f"cannot read {path}: it holds more than tensors and tether only loads .pt files with "
            f"weights_only=True ({first_line})"
        ) from None
    except Exception as error:
        raise TetherError(f"cannot read {path} with torch.load: {error}") from None


def _own(tensor: torch.Tensor) -> torch.Tensor:
    # Tensors from a memory-mapped torch.load still read from the file; copy them.
    return tensor.clone()


def _generator_tensors(contents, ema: bool, path: Path) -> dict:
    """The generator's flat {name: tensor} out of a training checkpoint's nesting."""
    if not isinstance(contents, dict):
        raise TetherError(f"{path} holds a {type(contents).__name__}, not a dict of weights")
    if "generator" in contents or "generator_ema" in contents:
        wanted = "generator_ema" if ema else "generator"
        if wanted not in contents:
            present = ", ".join(k for k in ("generator", "generator_ema") if k in contents)
            hint = "drop ema=True" if not ema else "pass ema=False"
            raise TetherError(f"{path} has no '{wanted}' weights (it holds {present}; {hint})")
        contents = contents[wanted]
    elif ema:
        raise TetherError(f"{path} has no 'generator_ema' (EMA) weights; drop ema=True")
    # Other trainers nest the state dict one level down.
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(contents, dict) and isinstance(contents.get(wrapper), dict) and not _has_tensors(contents):
            contents = contents[wrapper]
    if not isinstance(contents, dict) or not _has_tensors(contents):
        raise TetherError(f"{path} holds no transformer weights")
    return {key: _own(value) for key, value in contents.items() if isinstance(value, torch.Tensor)}


def _has_tensors(mapping: dict) -> bool:
    return any(isinstance(value, torch.Tensor) for value in mapping.values())


# ---------------------------------------------------------------------------
# Names: wrappers, prefixes, diffusers
# ---------------------------------------------------------------------------

# Path segments that training wrappers insert anywhere in a name (FSDP1, activation
# checkpointing, torch.compile).
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")

# Leading prefixes, stripped repeatedly: PEFT's `base_model.model.`, the
# training wrapper's `model.`, DDP's `module.`, ComfyUI's `model.diffusion_model.`.
# No Wan parameter name starts with any of them.
LEADING_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "model.", "module.")


def _strip_wrappers(key: str) -> str:
    key = ".".join(part for part in key.split(".") if part not in WRAPPER_SEGMENTS)
    stripped = True
    while stripped:
        stripped = False
        for prefix in LEADING_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


# diffusers -> original, for names outside the blocks and inside one block.
# The inverse of SPEC §6 / diffusers' convert_wan_transformer_to_diffusers.
DIFFUSERS_TOP_LEVEL = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "scale_shift_table": "head.modulation",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
}
DIFFUSERS_IN_BLOCK = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    # The two names swap: diffusers' norm2 is the affine cross-attention input
    # norm, Wan's norm3; the affine-free pre-FFN norm is diffusers' norm3, Wan's norm2.
    "norm2": "norm3",
    "norm3": "norm2",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "scale_shift_table": "modulation",
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _rename_by_prefix(name: str, table: dict) -> str:
    """Replace the longest table entry that is `name` itself or a dotted prefix of it."""
    for old in sorted(table, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            return table[old] + name[len(old):]
    return name


def diffusers_to_original_key(key: str) -> str:
    """One diffusers `WanTransformer3DModel` parameter name -> Wan2.1's original name.

    Names it does not know come back unchanged (the strict check reports them).
    """
    match = _BLOCK_KEY.match(key)
    if match:
        return f"blocks.{match.group(1)}." + _rename_by_prefix(match.group(2), DIFFUSERS_IN_BLOCK)
    return _rename_by_prefix(key, DIFFUSERS_TOP_LEVEL)


def _has_diffusers_names(keys) -> bool:
    return any(
        key.startswith("condition_embedder.") or key.startswith("proj_out.") or ".attn1." in key
        for key in map(_strip_wrappers, keys)
    )


def _to_original_names(tensors: dict, label: str):
    """Original-name weights and, for error messages, each one's name in the file."""
    diffusers_names = _has_diffusers_names(tensors)
    weights, file_names = {}, {}
    for file_key, tensor in tensors.items():
        key = _strip_wrappers(file_key)
        if diffusers_names:
            key = diffusers_to_original_key(key)
        if key in weights:
            raise TetherError(f"{label}: keys {file_names.get(key, key)} and {file_key} both name {key}")
        weights[key] = tensor
        if key != file_key:
            file_names[key] = file_key
    return weights, file_names


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------


def _resolve_config(config) -> ModelConfig:
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, str):
        return get_config(config)
    raise TetherError(f"config must be a config name or a ModelConfig, not {type(config).__name__}")


def _config_fields_from_wan_json(stated: dict, path: Path) -> dict:
    """Wan's own config.json (dim, ffn_dim, in_dim, ...) -> ModelConfig fields."""
    model_type = stated.get("model_type", "t2v")
    if model_type != "t2v":
        raise TetherError(f"{path}: model_type {model_type!r} is not supported; tether runs Wan2.1 text-to-video (t2v)")
    if not stated.get("qk_norm", True) or not stated.get("cross_attn_norm", True):
        raise TetherError(f"{path}: tether's transformer needs qk_norm and cross_attn_norm")
    try:
        return {
            "dim": stated["dim"],
            "ffn_dim": stated["ffn_dim"],
            "num_heads": stated["num_heads"],
            "num_layers": stated["num_layers"],
            "in_channels": stated.get("in_dim", 16),
            "out_channels": stated.get("out_dim", 16),
            "text_dim": stated.get("text_dim", 4096),  # Wan's default; its config.json leaves it out
            "text_len": stated.get("text_len", 512),
            "freq_dim": stated.get("freq_dim", 256),
            "patch_size": tuple(stated.get("patch_size", (1, 2, 2))),
            "eps": stated.get("eps", 1e-6),
        }
    except KeyError as error:
        raise TetherError(f"{path} lacks {error.args[0]}") from None


def _config_fields_from_diffusers_json(stated: dict, path: Path) -> dict:
    """diffusers' WanTransformer3DModel config -> ModelConfig fields (text_len is never recorded)."""
    if stated.get("image_dim") is not None or stated.get("added_kv_proj_dim") is not None:
        raise TetherError(f"{path} is an image-to-video transformer; tether runs Wan2.1 text-to-video")
    if not stated.get("cross_attn_norm", True) or stated.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise TetherError(f"{path}: tether's transformer needs cross_attn_norm and qk_norm 'rms_norm_across_heads'")
    # Defaults are WanTransformer3DModel's own, for config.json files that omit them.
    heads = stated.get("num_attention_heads", 40)
    return {
        "dim": heads * stated.get("attention_head_dim", 128),
        "ffn_dim": stated.get("ffn_dim", 13824),
        "num_heads": heads,
        "num_layers": stated.get("num_layers", 40),
        "in_channels": stated.get("in_channels", 16),
        "out_channels": stated.get("out_channels", 16),
        "text_dim": stated.get("text_dim", 4096),
        "freq_dim": stated.get("freq_dim", 256),
        "patch_size": tuple(stated.get("patch_size", (1, 2, 2))),
        "eps": stated.get("eps", 1e-6),
    }


def _config_fields_from_shapes(weights: dict, label: str) -> dict:
    """The ModelConfig fields that tensor shapes determine (everything but heads, text_len, eps, theta)."""

    def shape_of(key):
        if key not in weights:
            raise TetherError(f"cannot work out the model size of {label}: it has no {key}; pass config=")
        return tuple(weights[key].shape)

    patch = shape_of("patch_embedding.weight")
    if len(patch) != 5:
        raise TetherError(f"{label}: patch_embedding.weight has shape {list(patch)}, not a 3D convolution's")
    dim, in_channels, *patch_size = patch
    block_indices = {int(m.group(1)) for m in map(_BLOCK_KEY.match, weights) if m}
    first_ffn = next((f"blocks.{i}.ffn.0.weight" for i in sorted(block_indices) if f"blocks.{i}.ffn.0.weight" in weights),
                     "blocks.0.ffn.0.weight")
    return {
        "dim": dim,
        "ffn_dim": shape_of(first_ffn)[0],
        # max + 1, not a count: a checkpoint that lacks a whole block is reported as missing keys.
        "num_layers": max(block_indices) + 1 if block_indices else 0,
        "in_channels": in_channels,
        "out_channels": shape_of("head.head.weight")[0] // max(1, math.prod(patch_size)),
        "text_dim": shape_of("text_embedding.0.weight")[1],
        "freq_dim": shape_of("time_embedding.0.weight")[1],
        "patch_size": tuple(patch_size),
    }


def _complete_config(known: dict, label: str) -> ModelConfig:
    """A full ModelConfig from the fields a checkpoint determines.

    A named config that agrees with every known field supplies the rest (so a
    tiny test checkpoint gets `tiny`'s 16 text tokens and 2 heads); otherwise
    Wan's defaults apply, heads included (dim / 128).
    """
    for named in CONFIGS.values():
        if all(getattr(named, name) == value for name, value in known.items()):
            return named
    if "num_heads" not in known:
        if known["dim"] % WAN_HEAD_DIM:
            raise TetherError(
                f"cannot tell the number of attention heads of {label}: dim {known['dim']} is not a multiple of "
                f"Wan's head size {WAN_HEAD_DIM} and matches no named config; pass config="
            )
        known["num_heads"] = known["dim"] // WAN_HEAD_DIM
    try:
        return ModelConfig(**known)
    except TypeError as error:
        raise TetherError(f"{label}: unusable config: {error}") from None


def _config_label(cfg: ModelConfig) -> str:
    for name, named in CONFIGS.items():
        if named == cfg:
            return name
    return f"(dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads, ffn {cfg.ffn_dim})"


# ---------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------

# `blocks.0.self_attn.q.lora_A.weight`, or with PEFT's adapter name: `...lora_A.default.weight`.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def _is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def _looks_like_lora_file(contents) -> bool:
    if not isinstance(contents, dict):
        return False
    if "generator_lora" in contents:  # LongLive: {"generator_lora": ..., "critic_lora": ...}
        return True
    keys = [key for key, value in contents.items() if isinstance(value, torch.Tensor)]
    return bool(keys) and all(_is_lora_key(key) for key in keys)


def _read_lora(path: Path) -> Lora:
    label = f"LoRA {path}"
    if not path.exists():
        raise TetherError(f"LoRA not found: {path}")
    alpha, rslora, base = None, False, None
    if path.is_dir():
        # A PEFT adapter folder (save_pretrained): its config records alpha.
        adapter_config = _read_json(path / "adapter_config.json") if (path / "adapter_config.json").exists() else {}
        alpha, rslora = adapter_config.get("lora_alpha"), bool(adapter_config.get("use_rslora", False))
        base = adapter_config.get(BASE_FINGERPRINT_KEY)
        if (path / "adapter_model.safetensors").exists():
            tensors = _read_safetensors(path / "adapter_model.safetensors")
        elif (path / "adapter_model.bin").exists():
            tensors = _lora_tensors(_torch_load(path / "adapter_model.bin"), path)
        else:
            raise TetherError(f"no adapter_model.safetensors or adapter_model.bin in {path}")
    elif path.suffix.lower() == ".safetensors":
        tensors = _read_safetensors(path)
    else:
        tensors = _lora_tensors(_torch_load(path), path)
    return Lora(_pair_factors(tensors, label), label, alpha, rslora, base)


def weights_fingerprint(path) -> str:
    """A cheap identity of a weights file (or a folder's safetensors files): sha256 of each file's size and
    its first and last 4 MiB. Training changes every tensor, so two different trainings of one
    architecture differ in both ends, while a 1.3B base is fingerprinted without reading 2.8 GB."""
    import hashlib

    path = Path(path)
    folder = path.is_dir()
    files = sorted(path.rglob("*.safetensors")) if folder else [path]
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path) if folder else ''}:{size}".encode())  # not a lone file's name
        with open(file, "rb") as handle:
            digest.update(handle.read(4 << 20))
            handle.seek(max(0, size - (4 << 20)))
            digest.update(handle.read())
    return digest.hexdigest()


def _lora_tensors(contents, path: Path) -> dict:
    if isinstance(contents, dict) and isinstance(contents.get("generator_lora"), dict):
        contents = contents["generator_lora"]
    if not isinstance(contents, dict) or not _has_tensors(contents):
        raise TetherError(f"{path} holds no LoRA weights")
    return {key: _own(value) for key, value in contents.items() if isinstance(value, torch.Tensor)}


def _pair_factors(tensors: dict, label: str) -> dict:
    halves, adapters, strays = {}, set(), []
    for file_key, tensor in tensors.items():
        match = _LORA_KEY.match(_strip_wrappers(file_key))
        if not match:
            strays.append(file_key)
            continue
        adapters.add(match["adapter"])
        halves.setdefault(match["module"] + ".weight", {})[match["factor"]] = tensor
    if strays:
        raise TetherError(f"{label} has keys that are not LoRA A/B factors: {_listing(strays)}")
    if len(adapters) > 1:
        raise TetherError(f"{label} holds several adapters ({', '.join(sorted(map(str, adapters)))}); keep one")
    unpaired = [key for key, pair in halves.items() if len(pair) != 2]
    if unpaired:
        raise TetherError(f"{label}: LoRA factors without their A or B partner for {_listing(unpaired)}")
    return {key: (pair["A"], pair["B"]) for key, pair in halves.items()}


def _merge_lora(checkpoint: Checkpoint, lora_alpha) -> None:
    """W += (alpha / rank) * B @ A for every factor pair, in float32, in place."""
    lora = checkpoint.lora
    absent, misfit = [], []
    for key, (down, up) in lora.factors.items():
        if key not in checkpoint.weights:
            absent.append(key)
            continue
        weight = checkpoint.weights[key]
        fits = down.ndim == 2 and up.ndim == 2 and up.shape[1] == down.shape[0]
        if not fits or (up.shape[0], down.shape[1]) != tuple(weight.shape):
            misfit.append(f"{key}: A {list(down.shape)}, B {list(up.shape)} vs weight {list(weight.shape)}")
            continue
        rank = down.shape[0]
        alpha = lora_alpha if lora_alpha is not None else lora.alpha if lora.alpha is not None else rank
        scale = alpha / (math.sqrt(rank) if lora.rslora else rank)
        merged = weight.float() + scale * (up.float() @ down.float())
        checkpoint.weights[key] = merged.to(weight.dtype)
    if absent or misfit:
        problems = []
        if absent:
            problems.append(f"{len(absent)} targets not in the model ({_listing(absent)})")
        if misfit:
            problems.append(f"{len(misfit)} shape mismatches ({_listing(misfit)})")
        raise TetherError(f"{lora.label} does not fit {checkpoint.label}: " + ", ".join(problems))


# ---------------------------------------------------------------------------
# Building and checking
# ---------------------------------------------------------------------------


def _empty_model(cfg: ModelConfig) -> WanTransformer:
    """The model with parameters on `meta`: no memory, no time spent on random init."""
    with torch.device("meta"):
        model = WanTransformer(cfg)
    # Rope3D keeps its frequencies as plain tensors, not buffers, so the meta context
    # made them on meta too and no state dict will replace them: build it for real.
    model.rope = Rope3D(cfg.head_dim, cfg.rope_theta)
    return model


def _random_model(cfg: ModelConfig, dtype) -> WanTransformer:
    """Random weights from seed 0, leaving the caller's random state alone."""
    dtype = dtype or torch.float32
    fp32_bytes = 4 * sum(p.numel() for p in _empty_model(cfg).parameters())
    build_dtype = dtype if fp32_bytes > DIRECT_DTYPE_BUILD_BYTES else torch.float32
    previous_default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.set_default_dtype(build_dtype)
        try:
            model = WanTransformer(cfg)
        finally:
            torch.set_default_dtype(previous_default)
    return model.to(dtype)


def _check_fits(model: WanTransformer, checkpoint: Checkpoint, cfg: ModelConfig) -> None:
    """One TetherError naming every missing key, unexpected key and shape mismatch."""
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    weights = checkpoint.weights
    missing = [key for key in expected if key not in weights]
    unexpected = [checkpoint.file_names.get(key, key) for key in weights if key not in expected]
    mismatched = [
        f"{key}: checkpoint {list(tensor.shape)} vs model {list(expected[key])}"
        for key, tensor in weights.items()
        if key in expected and tuple(tensor.shape) != expected[key]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_listing(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({_listing(mismatched)})")
    if problems:
        raise TetherError(f"{checkpoint.label} does not fit config {_config_label(cfg)}: " + ", ".join(problems))


def _listing(items: list) -> str:
    shown = ", ".join(items[:SHOWN_PER_KIND])
    return shown + (", ..." if len(items) > SHOWN_PER_KIND else "")


def _cast_in_place(weights: dict, dtype) -> None:
    """Bring every weight to `dtype`, one tensor at a time so peak memory stays near one copy.

    With no dtype, a checkpoint in one float dtype keeps it; a mixed one becomes float32,
    since the model computes in the dtype of its weights.
    """
    if dtype is None:
        float_dtypes = {t.dtype for t in weights.values() if t.is_floating_point()}
        if len(float_dtypes) <= 1:
            return
        dtype = torch.float32
    for key in list(weights):
        if weights[key].is_floating_point():
            weights[key] = weights[key].to(dtype)
