"""Bitwise regression check of every public loss and of ``lse`` on the ``cpu`` backend.

Runs a fixed set of seeded cases (float32 and float64, values and the gradients of every input
that takes one, a tensor temperature among them) and either writes the results to a baseline
file (``--write``) or compares them with it bit for bit, exiting non-zero on any difference.
The committed baseline (scripts/bitwise_baseline.pt) was written before the package was
restructured, so a passing check shows that a refactoring changed no value and no gradient.

    python scripts/check_bitwise.py            # compare with the baseline (exit 1 on a difference)
    python scripts/check_bitwise.py --write    # (re)write the baseline

Runs with one thread, so that the comparison does not depend on the machine's core count.
"""

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import infonce_kernels as ik  # noqa: E402

BASELINE = os.path.join(HERE, "bitwise_baseline.pt")
BACKEND = "cpu"


def _views(gen, dtype, b=6, d=5):
    return [torch.randn(b, d, generator=gen, dtype=dtype).requires_grad_() for _ in range(2)]


def _tensor(value, dtype):
    return torch.tensor(value, dtype=dtype, requires_grad=True)


def cases(dtype):
    """name -> (function of a seeded generator returning (output, [inputs that get gradients]))."""

    def two(fn, **kw):
        def run(gen):
            z1, z2 = _views(gen, dtype)
            return fn(z1, z2, backend=BACKEND, **kw), [z1, z2]
        return run

    def two_tau(fn, tau, **kw):
        def run(gen):
            z1, z2 = _views(gen, dtype)
            t = _tensor(tau, dtype)
            return fn(z1, z2, t, backend=BACKEND, **kw), [z1, z2, t]
        return run

    def info_nce_bank(gen):
        q, k = _views(gen, dtype)
        bank = torch.randn(9, 5, generator=gen, dtype=dtype).requires_grad_()
        return ik.info_nce(q, k, negative_keys=bank, temperature=0.2, backend=BACKEND), [q, k]

    def info_nce_tensor_tau(gen):
        q, k = _views(gen, dtype)
        t = _tensor(0.15, dtype)
        return ik.info_nce(q, k, temperature=t, reduction="none", backend=BACKEND), [q, k, t]

    def clip(gen):
        img, txt = _views(gen, dtype)
        s = _tensor(7.5, dtype)
        return ik.clip_loss(img, txt, s, backend=BACKEND), [img, txt, s]

    def clip_none(gen):
        img, txt = _views(gen, dtype)
        return ik.clip_loss(img, txt, 3.0, normalize=False, reduction="none", backend=BACKEND), [img, txt]

    def supcon_labels(gen):
        z = torch.randn(10, 5, generator=gen, dtype=dtype).requires_grad_()
        labels = torch.randint(0, 3, (10,), generator=gen)
        t = _tensor(0.2, dtype)
        return ik.supcon(z, labels, t, backend=BACKEND), [z, t]

    def supcon_views(gen):
        f = torch.randn(5, 3, 4, generator=gen, dtype=dtype).requires_grad_()
        return ik.supcon(f, None, 0.3, base_temperature=0.07, reduction="none", backend=BACKEND), [f]

    def supcon_views_labels(gen):
        f = torch.randn(6, 2, 4, generator=gen, dtype=dtype).requires_grad_()
        labels = torch.tensor([0, 1, 0, 2, 1, 3])
        return ik.supcon(f, labels, 0.1, reduction="sum", backend=BACKEND), [f]

    def kcl_t(gen):
        z1, z2 = _views(gen, dtype)
        t = _tensor(1.5, dtype)
        return ik.kcl(z1, z2, t, 8.0, backend=BACKEND), [z1, z2, t]

    def alignment(alpha):
        def run(gen):
            x, y = _views(gen, dtype)
            return ik.alignment(x, y, alpha), [x, y]
        return run

    def uniformity(gen):
        x = torch.randn(7, 4, generator=gen, dtype=dtype).requires_grad_()
        t = _tensor(2.0, dtype)
        return ik.uniformity(x, t, backend=BACKEND), [x, t]

    def lse(symmetric, labelled, e):
        def run(gen):
            m, n, d = 7, 9, 5
            q = torch.randn(m, d, generator=gen, dtype=dtype).requires_grad_()
            k = q if symmetric else torch.randn(n, d, generator=gen, dtype=dtype).requires_grad_()
            n = k.shape[0]
            exclude = torch.randint(-1, n, (m, e), generator=gen) if e else None
            kw = {}
            if labelled:
                kw["row_labels"] = torch.randint(0, 3, (m,), generator=gen)
                kw["key_labels"] = kw["row_labels"] if symmetric else torch.randint(0, 3, (n,), generator=gen)
                kw["positive"] = torch.arange(m) if symmetric else torch.randint(-1, n, (m,), generator=gen)
            s = _tensor(1.7, dtype)
            out = ik.lse(q, k, s, exclude=exclude, symmetric=symmetric, backend=BACKEND, **kw)
            return out, [q, s] if symmetric else [q, k, s]
        return run

    return {
        "nt_xent": two(ik.nt_xent),
        "nt_xent_tensor_tau_none": two_tau(ik.nt_xent, 0.3, reduction="none"),
        "nt_xent_unnormalized_sum": two(ik.nt_xent, temperature=2.0, normalize=False, reduction="sum"),
        "info_nce": two(ik.info_nce),
        "info_nce_bank": info_nce_bank,
        "info_nce_tensor_tau": info_nce_tensor_tau,
        "clip_loss": clip,
        "clip_loss_none": clip_none,
        "supcon_labels": supcon_labels,
        "supcon_views": supcon_views,
        "supcon_views_labels": supcon_views_labels,
        "dcl": two_tau(ik.dcl, 0.2),
        "dclw": two(ik.dclw, temperature=0.3, sigma=0.7),
        "dclw_weights_grad": two(ik.dclw, detach_weights=False, reduction="none"),
        "dhel": two_tau(ik.dhel, 0.4),
        "dhel_one_view": two(ik.dhel, include_augs=False, reduction="sum"),
        "kcl": kcl_t,
        "kcl_none": two(ik.kcl, reduction="none"),
        "hard_negative_nt_xent": two(ik.hard_negative_nt_xent, beta=0.5, tau_plus=0.1),
        "hard_negative_nt_xent_tensor_tau": two_tau(ik.hard_negative_nt_xent, 0.5, reduction="none"),
        "debiased_nt_xent": two(ik.debiased_nt_xent, tau_plus=0.2),
        "debiased_nt_xent_plain": two_tau(ik.debiased_nt_xent, 0.4, tau_plus=0.0),
        "alignment": alignment(2),
        "alignment_alpha": alignment(1.5),
        "uniformity": uniformity,
        "lse": lse(False, False, 0),
        "lse_exclude": lse(False, False, 2),
        "lse_labels": lse(False, True, 1),
        "lse_symmetric": lse(True, False, 1),
        "lse_symmetric_labels": lse(True, True, 2),
    }


def run_all():
    """{case/dtype/value|grad{i}: tensor} for every case."""
    torch.set_num_threads(1)
    results = {}
    for dtype in (torch.float32, torch.float64):
        for number, (name, case) in enumerate(sorted(cases(dtype).items())):
            gen = torch.Generator().manual_seed(1000 + number)
            out, inputs = case(gen)
            weight = torch.randn(out.shape, generator=gen, dtype=out.dtype)
            grads = torch.autograd.grad((out * weight).sum(), inputs)
            key = f"{name}/{str(dtype).replace('torch.', '')}"
            results[f"{key}/value"] = out.detach()
            for i, g in enumerate(grads):
                results[f"{key}/grad{i}"] = g
    return results


def _bits(t):
    """The tensor's raw bits as integers (so -0.0 != 0.0 and NaN payloads count)."""
    return t.contiguous().view({torch.float64: torch.int64, torch.float32: torch.int32}[t.dtype])


def compare(results, baseline):
    """Lines describing every difference (missing cases, dtype, shape or any bit)."""
    problems = []
    for key in sorted(set(results) | set(baseline)):
        if key not in baseline:
            problems.append(f"{key}: not in the baseline")
        elif key not in results:
            problems.append(f"{key}: missing from this run")
        else:
            new, old = results[key], baseline[key]
            if new.dtype != old.dtype or new.shape != old.shape:
                problems.append(f"{key}: {new.dtype}{tuple(new.shape)} != baseline {old.dtype}{tuple(old.shape)}")
            elif not torch.equal(_bits(new), _bits(old)):
                diff = (new.double() - old.double()).abs().max().item()
                problems.append(f"{key}: differs (max abs difference {diff:.3g})")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the baseline instead of comparing")
    args = parser.parse_args(argv)
    results = run_all()
    if args.write:
        torch.save(results, BASELINE)
        print(f"wrote {len(results)} tensors to {os.path.relpath(BASELINE)}")
        return 0
    baseline = torch.load(BASELINE, weights_only=True)
    problems = compare(results, baseline)
    for line in problems:
        print(line)
    print(f"{len(results)} tensors compared: {'all bitwise equal' if not problems else f'{len(problems)} differ'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
