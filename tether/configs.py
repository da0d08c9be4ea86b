"""Named transformer configs.

The field's models all share Wan2.1's architecture; they differ only in size.
The small configs are the same architecture at a size a CPU can run: `tiny`
for tests, `toy` for the built-in model trained on the toy world.
"""

from dataclasses import asdict, dataclass, fields

from .errors import TetherError


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TetherError(f"unknown model config fields: {', '.join(unknown)}")
        d = dict(d)
        if "patch_size" in d:
            d["patch_size"] = tuple(d["patch_size"])
        return cls(**d)


CONFIGS = {
    "wan2.1-t2v-1.3b": ModelConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": ModelConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # head_dim 32 keeps a real 3-way RoPE split (t 12 / h 10 / w 10 real dims).
    "tiny": ModelConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_channels=4, out_channels=4,
                        text_dim=32, text_len=16),
    "toy": ModelConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=8, in_channels=16, out_channels=16,
                       text_dim=128, text_len=32),
    # The toy transformer over the "toy-s4" VAE's 16x16 latents: 4x4 patches keep 4x4 tokens per
    # latent frame, so it costs what "toy" costs while the VAE keeps four times the detail.
    "toy-s4": ModelConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=8, in_channels=16, out_channels=16,
                          text_dim=128, text_len=32, patch_size=(1, 4, 4)),
}


def get_config(name: str) -> ModelConfig:
    if name not in CONFIGS:
        raise TetherError(f"unknown model config '{name}' (known: {', '.join(CONFIGS)})")
    return CONFIGS[name]
