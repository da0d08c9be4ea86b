"""tether: long, interactive, streaming video generation with autoregressive diffusion.

One Wan2.1-compatible causal transformer; every long-video method of the
field is a memory policy over it.
"""

import os

# OpenMP threads that spin while waiting turn a shared or busy CPU into a 20-50x
# slowdown (measured: a toy training step 11 s instead of 0.4 s on 2 loaded cores).
# Passive waiting costs little on an idle machine. Only effective before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import TetherError  # noqa: E402


def load_transformer(path_or_config_name, dtype=None, device=None, **options):
    """The transformer from a named config or a checkpoint path (see `tether.checkpoints`)."""
    from .checkpoints import load_transformer as _load

    return _load(path_or_config_name, dtype=dtype, device=device, **options)


def load_pipeline(checkpoint=None, **options):
    """Transformer + text encoder + VAE (see `tether.pipeline`)."""
    from .pipeline import load_pipeline as _load

    return _load(checkpoint, **options)


__all__ = ["TetherError", "load_transformer", "load_pipeline"]
