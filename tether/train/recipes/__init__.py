"""Every recipe registers itself on import."""

from . import teacher  # noqa: F401
from . import ode_init  # noqa: F401
from . import self_forcing  # noqa: F401
from . import grounded_forcing  # noqa: F401
from . import cf_teacher  # noqa: F401
from . import vae  # noqa: F401
from . import context_forcing  # noqa: F401
