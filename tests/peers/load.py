"""Import the peers' loss modules from their installed files.

lightly's and open_clip's package ``__init__`` import torchvision, which has no build matching
every torch (none for a CPU-only torch 2.13); their loss modules do not need it. ``module(name)``
imports ``lightly.loss.ntx_ent_loss`` or ``open_clip.loss`` while registering the packages on
the way as empty namespaces (their ``__path__`` only), so no package ``__init__`` runs unless it
already ran. lightly's ``lightly/models/utils.py`` (its memory bank's gather helper) imports
``torchvision.ops.StochasticDepth`` at module level without using it for the losses: when
torchvision is absent, a placeholder ``torchvision.ops`` whose ``StochasticDepth`` raises on use
is registered for that import (also when an installed torchvision fails to import: a build for
another torch). Returns None when the peer is not installed.
"""

import importlib
import importlib.util
import sys
import types


def _namespace(name: str) -> bool:
    """Register package ``name`` from its installed directory without running its __init__."""
    if name in sys.modules:
        return True
    spec = importlib.util.find_spec(name) if "." not in name else None
    if "." in name:
        parent, _, child = name.rpartition(".")
        if not _namespace(parent):
            return False
        for path in sys.modules[parent].__path__:
            spec = importlib.machinery.PathFinder.find_spec(name, [path])
            if spec is not None:
                break
    if spec is None or spec.submodule_search_locations is None:
        return False
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules[name] = package
    return True


class _NoTorchvision:
    def __init__(self, *args, **kwargs):
        raise ImportError("torchvision is not installed (placeholder registered by tests/peers/load.py)")


def _torchvision_placeholder() -> None:
    """Register the placeholder unless torchvision imports (a torchvision built for another torch
    raises RuntimeError on import: that counts as absent)."""
    try:
        import torchvision.ops  # noqa: F401
        return
    except Exception:  # ImportError, or a torchvision whose C++ ops do not match this torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    tv.__path__, tv.ops, ops.StochasticDepth = [], ops, _NoTorchvision
    sys.modules.update({"torchvision": tv, "torchvision.ops": ops})


def module(name: str):
    """The module ``name`` (e.g. ``"lightly.loss.dcl_loss"``), or None when it is not installed."""
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or the RuntimeError of a torchvision built for another torch
        top = name.partition(".")[0]
        for half_imported in [m for m in sys.modules if m.startswith(top + ".")]:
            del sys.modules[half_imported]
    parent = name.rpartition(".")[0]
    try:
        if not _namespace(parent):
            return None
        if name.startswith("lightly."):
            # the memory bank lives in packages whose __init__ needs torchvision
            _torchvision_placeholder()
            for extra in ("lightly.models", "lightly.models.modules"):
                _namespace(extra)
        return importlib.import_module(name)
    except ImportError:
        return None
