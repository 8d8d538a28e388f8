"""Importing torchvision next to a CPU build of torch whose version it was not built for.

transformers and timm (the PyTorch references of the tests and of ``bench --compare torch``) import torchvision
when it is installed. Where the only torchvision wheels at hand are CUDA builds for another torch (as on the
machines this project is developed on, with the CPU torch pinned in requirements-dev.txt), importing it fails
while registering fake kernels for its compiled ops. Only its pure-Python parts are needed, so
:func:`import_torchvision_on_cpu_torch` skips the registrations of ``torchvision::*`` ops that do not exist.
"""
from __future__ import annotations

import sys


def import_torchvision_on_cpu_torch() -> None:
    """Import torchvision (its pure-Python parts when its compiled ops cannot load). No-op when torchvision is
    absent or imports cleanly."""
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return
    except RuntimeError:
        pass
    import torch.library

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    original = torch.library.register_fake

    def register_fake(op, *args, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::"):
            return (lambda fn: fn) if not args else args[0]
        return original(op, *args, **kwargs)

    torch.library.register_fake = register_fake
    try:
        import torchvision  # noqa: F401,F811
    finally:
        torch.library.register_fake = original
