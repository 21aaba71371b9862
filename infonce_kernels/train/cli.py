"""Command line: ``python -m infonce_kernels.train [options]`` or ``infonce-train [options]``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import BACKENDS, DATASET_DEFAULTS, PRECISIONS, STEMS, TrainConfig, resolve
from .data import DATASETS, DatasetError
from .extras import MissingExtraError
from .models import ARCHS
from .optim import OPTIMIZERS
from .temperature import TEMPERATURE_MODES

D = TrainConfig()


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help once: not when the help already states its
    default, nor for a flag (off unless given) or a None default (the dataset's or a computed
    default, which the help states)."""

    def _get_help_string(self, action):
        text = action.help
        if "default" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Errors as one line (what is wrong) plus a pointer to --help, not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def _dflt(key: str) -> str:
    return "dataset default: " + ", ".join(f"{d} {v[key]}" for d, v in DATASET_DEFAULTS.items())


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="infonce-train",
        description="SimCLR reference trainer for infonce_kernels. With no options it trains a small CNN on "
                    "scikit-learn's bundled 8x8 digits (a few minutes on a laptop CPU) and reports kNN and "
                    "linear-probe accuracy beside a randomly initialised encoder.",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=D.dataset, help="training data")
    g.add_argument("--data-dir", default=None, help="dataset directory (all datasets except digits)")
    g.add_argument("--subset", type=int, default=None, help="keep at most N images per split (quick runs)")
    g.add_argument("--image-size", type=int, default=None, help="side of the augmented crops; " + _dflt("image_size"))
    g.add_argument("--aug-strength", type=float, default=None, help="augmentation strength; " + _dflt("aug_strength"))
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHS, default=None, help=_dflt("arch"))
    g.add_argument("--stem", choices=STEMS, default=D.stem, help="ResNet stem; auto = cifar for images <= 64 px")
    g.add_argument("--width", type=int, default=D.width, help="smallcnn base width")
    g.add_argument("--hidden-dim", type=int, default=None, help="projection-head hidden width (default: encoder width)")
    g.add_argument("--proj-dim", type=int, default=D.proj_dim, help="projection output dimension")
    g = p.add_argument_group("loss and temperature")
    g.add_argument("--loss", default=D.loss, help="loss of infonce_kernels by name: nt_xent, info_nce, dcl, dclw, "
                                                  "dhel, supcon (needs labels), kcl, hard_negative_nt_xent, "
                                                  "debiased_nt_xent")
    g.add_argument("--backend", choices=BACKENDS, default=D.backend, help="infonce_kernels backend")
    g.add_argument("--temperature", "--tau", type=float, default=None,
                   help="temperature (initial value for learnable / log); " + _dflt("temperature"))
    g.add_argument("--temperature-mode", choices=TEMPERATURE_MODES, default=D.temperature_mode,
                   help="fixed; learnable (log-parameterised, clamped at --tau-min); log: beta(t) = "
                        "beta0*ln(e + t/t0) capped at 1/--tau-min; linear / cosine: from --temperature down "
                        "to --tau-min over the run")
    g.add_argument("--tau-min", type=float, default=D.tau_min, help="lower bound of the temperature")
    g.add_argument("--anneal-t0", type=float, default=None, help="log schedule t0 in steps (default: one epoch)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help=_dflt("optimizer"))
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: base lr x batch/256)")
    g.add_argument("--weight-decay", type=float, default=None, help=_dflt("weight_decay"))
    g.add_argument("--momentum", type=float, default=D.momentum, help="SGD and LARS momentum")
    g.add_argument("--epochs", type=int, default=None, help=_dflt("epochs"))
    g.add_argument("--warmup-epochs", type=float, default=None, help=_dflt("warmup_epochs"))
    g.add_argument("--batch-size", type=int, default=None, help="global batch size; " + _dflt("batch_size"))
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=D.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--precision", choices=PRECISIONS, default=D.precision, help="auto = bf16 autocast on CUDA")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="SyncBatchNorm under DDP (default: on when WORLD_SIZE > 1 on CUDA)")
    g.add_argument("--grad-cache-chunk", type=int, default=None, metavar="N",
                   help="gradient caching: train the whole --batch-size with the activations of N images "
                        "(both views) at a time, one extra forward pass; exact gradients, BatchNorm "
                        "statistics per chunk (docs/grad_cache.md; default: off)")
    g.add_argument("--seed", type=int, default=D.seed, help="seed of the initialisation, split and augmentation")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=None, help="evaluate every N epochs (0: only start and end); "
                   + _dflt("eval_every"))
    g.add_argument("--knn-k", type=int, default=None, help=_dflt("knn_k") + " (capped at the bank size)")
    g.add_argument("--probe", action=argparse.BooleanOptionalAction, default=D.probe, help="linear probe")
    g.add_argument("--probe-max-train", type=int, default=D.probe_max_train,
                   help="fit the linear probe on at most N training features")
    g.add_argument("--few-shot", type=int, default=None,
                   help="also fit the linear probe on N labelled images per class (mean of 5 draws; 0 = off); "
                   + _dflt("few_shot"))
    g = p.add_argument_group("outputs")
    g.add_argument("--output-dir", default=None, help="default: runs/simclr-<dataset>")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default path: <output-dir>/last.pt; the one before it is "
                        "<output-dir>/previous.pt)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output-dir (refused without it)")
    g.add_argument("--export", default=None, metavar="PATH",
                   help="at the end, write the trained encoder's state_dict to PATH (torch.save; loads with "
                        "weights_only=True into the encoder built by infonce_kernels.train.models.build_encoder)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=D.progress, help="tqdm progress bar")
    g.add_argument("--plot", action=argparse.BooleanOptionalAction, default=D.plot, help="write curves.png")
    g.add_argument("--stop-after-epochs", type=int, default=None,
                   help="checkpoint and stop after this epoch (exit status 0; continue with --resume)")
    g.add_argument("--stop-after-steps", type=int, default=None,
                   help="checkpoint and stop after this global step (exit status 0; continue with --resume)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    kw = vars(args).copy()
    if kw["output_dir"] is None:
        kw["output_dir"] = f"runs/simclr-{kw['dataset']}"
    return TrainConfig(**kw)


def main(argv: Optional[List[str]] = None) -> int:
    """Exit status: 0 when the run completes or stops as asked by --stop-after-*; 130 after Ctrl-C
    (checkpoint written); 2 for a bad option, dataset or checkpoint; 1 when the train extra is missing."""
    from .trainer import TrainingInterrupted, train

    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    try:
        resolve(cfg)  # every bad option -> argparse error naming it, before any work
    except ValueError as e:
        parser.error(str(e))
    try:
        train(cfg)
    except TrainingInterrupted as e:  # the trainer has said where the checkpoint is
        return 0 if e.requested else 130
    except MissingExtraError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    except DatasetError as e:
        parser.error(str(e))
    except ValueError as e:
        if str(e).startswith("--"):
            parser.error(str(e))
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
