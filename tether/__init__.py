"""tether: long, interactive, streaming video generation with autoregressive diffusion.

One Wan2.1-compatible causal transformer; every long-video method of the
field is a memory policy over it.
"""

from .errors import TetherError


def load_transformer(path_or_config_name, dtype=None, device=None, **options):
    """The transformer from a named config or a checkpoint path (see `tether.checkpoints`)."""
    from .checkpoints import load_transformer as _load

    return _load(path_or_config_name, dtype=dtype, device=device, **options)


def load_pipeline(checkpoint=None, **options):
    """Transformer + text encoder + VAE (see `tether.pipeline`)."""
    from .pipeline import load_pipeline as _load

    return _load(checkpoint, **options)


__all__ = ["TetherError", "load_transformer", "load_pipeline"]
