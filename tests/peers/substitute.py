"""pytest plugin: run the peers' own loss tests with the infonce_kernels adapters in place of
the peers' classes.

    python -m pytest -p substitute <peer test files>        (with tests/peers on PYTHONPATH)

At import (before the peers' test modules are collected) it loads the peers' loss modules
(tests/peers/load.py, so lightly's and open_clip's need no torchvision) and replaces, in those
modules and in the packages the tests import them from, every class the adapters provide. A
test module that does ``from lightly.loss import NTXentLoss`` then gets the adapter. Subprocesses
started with the same command line (DDP launchers) load the plugin again.
"""

import sys
import types

import load

from infonce_kernels.compat import info_nce_pytorch, lightly, open_clip, pytorch_metric_learning

SUBSTITUTES = {
    "lightly.loss.ntx_ent_loss": {"NTXentLoss": lightly.NTXentLoss},
    "lightly.loss.dcl_loss": {"DCLLoss": lightly.DCLLoss, "DCLWLoss": lightly.DCLWLoss},
    "pytorch_metric_learning.losses": {"NTXentLoss": pytorch_metric_learning.NTXentLoss,
                                       "SupConLoss": pytorch_metric_learning.SupConLoss,
                                       "SelfSupervisedLoss": pytorch_metric_learning.SelfSupervisedLoss},
    "open_clip.loss": {"ClipLoss": open_clip.ClipLoss},
    "info_nce": {"InfoNCE": info_nce_pytorch.InfoNCE, "info_nce": info_nce_pytorch.info_nce},
}


def _substitute() -> list:
    done = []
    for name, classes in SUBSTITUTES.items():
        mod = load.module(name)
        if mod is None:
            continue
        for owner in (mod, sys.modules.get(name.rpartition(".")[0])):
            if isinstance(owner, types.ModuleType):
                for attr, adapter in classes.items():
                    setattr(owner, attr, adapter)
        done.append(name)
    return done


SUBSTITUTED = _substitute()


def pytest_report_header(config):
    return "infonce_kernels adapters substituted in: " + ", ".join(SUBSTITUTED)
