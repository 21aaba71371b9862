"""Run info-nce-pytorch's own check (its repository's ``imgs/test.py``: InfoNCE against a NumPy
loop over 2 x 100 configurations, paired and unpaired negatives) with the adapter in place of
``info_nce.InfoNCE``. That file is not packaged: pass its path (a checkout of RElbers/info-nce-pytorch).

    python tests/peers/run_info_nce_check.py path/to/info-nce-pytorch/imgs/test.py

Its plot is skipped (matplotlib's backend is set to Agg and ``plot_results`` does nothing).
"""

import importlib.util
import sys

import substitute  # noqa: F401  (replaces info_nce.InfoNCE by the adapter)


def main(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    spec = importlib.util.spec_from_file_location("info_nce_own_check", path)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.InfoNCE is substitute.info_nce_pytorch.InfoNCE, "the adapter was not substituted"
    check.plot_results = lambda results: None
    for paired in (True, False):
        check.check_results(*check.get_results(paired_neg=paired))


if __name__ == "__main__":
    main(sys.argv[1])
