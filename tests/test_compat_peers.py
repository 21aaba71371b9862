"""The adapters against the installed peers' own code: edge cases (batch of one, degenerate and
same-object reference sets, mask dtypes, helper methods, logit_scale <= 0), constructor options,
CrossBatchMemory, lightly's near-identical-embedding precision, and every adapter under
torch.autocast (CPU bf16 and fp16). lightly's and open_clip's loss modules are loaded from their
files (tests/peers/load.py): their package __init__ needs torchvision."""

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "peers"))
import load  # noqa: E402
from test_compat import supcontrast  # noqa: E402  (SupContrast's formula; it is not on PyPI)

from infonce_kernels.compat import info_nce_pytorch as c_info  # noqa: E402
from infonce_kernels.compat import lightly as c_lightly  # noqa: E402
from infonce_kernels.compat import open_clip as c_clip  # noqa: E402
from infonce_kernels.compat import pytorch_metric_learning as c_pml  # noqa: E402
from infonce_kernels.compat import supcontrast as c_sup  # noqa: E402


def peer(name):
    mod = load.module(name)
    if mod is None:
        pytest.skip(f"{name} is not installed here (pip install the test extra)")
    return mod


def values_and_grads(fn, inputs):
    out = fn(*inputs)
    return out.detach().double(), [g.double() for g in torch.autograd.grad(out, inputs)]


# ---------------------------------------------------------------- lightly

def test_lightly_batch_of_one_and_negative_temperature():
    nt, dcl = peer("lightly.loss.ntx_ent_loss"), peer("lightly.loss.dcl_loss")
    a, b = torch.randn(1, 8, requires_grad=True), torch.randn(1, 8)
    assert float(c_lightly.NTXentLoss()(a, b)) == float(nt.NTXentLoss()(a, b)) == 0.0
    assert float(c_lightly.DCLLoss()(a, b)) == float(dcl.DCLLoss()(a, b)) == float("-inf")
    a, b = torch.randn(6, 8, dtype=torch.float64, requires_grad=True), torch.randn(6, 8, dtype=torch.float64)
    theirs, g_theirs = values_and_grads(lambda x: nt.NTXentLoss(-0.7)(x, b), [a])
    ours, g_ours = values_and_grads(lambda x: c_lightly.NTXentLoss(-0.7)(x, b), [a])
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(g_ours, g_theirs)


def test_lightly_constructor_checks(monkeypatch):
    nt = peer("lightly.loss.ntx_ent_loss")
    for cls in (c_lightly.NTXentLoss, c_lightly.DCLLoss):
        monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
        with pytest.raises(ValueError, match="torch.distributed is not available"):
            cls(gather_distributed=True)
        monkeypatch.undo()
    for t in (0.0, 1e-9):
        with pytest.raises(ValueError, match="Illegal temperature"):
            c_lightly.NTXentLoss(t)
        with pytest.raises(ValueError, match="Illegal temperature"):
            nt.NTXentLoss(t)
    loss = c_lightly.NTXentLoss(memory_bank_size=(16, 8))
    assert loss.memory_bank.bank.shape == nt.NTXentLoss(memory_bank_size=(16, 8)).memory_bank.bank.shape


def _correlated(n, rng):
    x = rng.random((n, 1))
    return torch.tensor(np.concatenate([x, 2 * x], axis=1), dtype=torch.float32, requires_grad=True)


@pytest.mark.parametrize("bank", [0, 16])
def test_lightly_precision_on_near_identical_embeddings(bank):
    """lightly's correlated-embedding test (every row normalises to the same direction, so the
    loss is log(2n - 1), or log(bank + 1) with a full memory bank): over many draws our float32
    relative error stays within 2x of lightly's own."""
    nt = peer("lightly.loss.ntx_ent_loss")
    rng = np.random.default_rng(0)
    errors = {"ours": [], "lightly": []}
    for n, t in [(2, 0.1), (8, 0.1), (16, 0.1), (16, 1.0), (8, 7.0)] * 8:
        out0, out1 = _correlated(n, rng), _correlated(n, rng)
        expected = np.log(bank + 1) if bank else np.log(2 * n - 1)
        for name, cls in (("ours", c_lightly.NTXentLoss), ("lightly", nt.NTXentLoss)):
            torch.manual_seed(0)
            loss = cls(t, memory_bank_size=(bank, 2) if bank else 0)
            for _ in range(bank // n + 2 if bank else 1):  # fill the bank with out1's direction
                value = float(loss(out0, out1))
            errors[name].append(abs(value - expected) / expected)
    ours, theirs = np.array(errors["ours"]), np.array(errors["lightly"])
    assert np.median(ours) <= 2 * np.median(theirs) + 1e-9
    assert ours.max() <= 2 * theirs.max() + 1e-9 and ours.max() < 1e-6


# ---------------------------------------------------------------- pytorch-metric-learning

def test_pml_same_object_ref_labels_and_degenerate_sets():
    pml = peer("pytorch_metric_learning.losses")
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 3])
    emb, ref = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    cases = [
        dict(ref_emb=ref, ref_labels=labels),               # the same object: (i, i) pairs dropped
        dict(ref_emb=emb, ref_labels=labels),               # PML's "no reference set"
        dict(ref_emb=ref, ref_labels=labels.clone()),       # an equal copy: (i, i) pairs kept
        dict(ref_emb=ref[:2], ref_labels=torch.tensor([0, 1])),  # one positive + one negative pair
    ]
    for kw in cases:
        lab = labels if kw["ref_emb"].shape[0] == 8 else torch.tensor([0])
        e = (emb if kw["ref_emb"].shape[0] == 8 else emb[:1]).clone().requires_grad_()
        for ours, theirs in ((c_pml.NTXentLoss(0.2), pml.NTXentLoss(0.2)), (c_pml.SupConLoss(0.2), pml.SupConLoss(0.2))):
            a, ga = values_and_grads(lambda x: ours(x, lab, **kw), [e])
            b, gb = values_and_grads(lambda x: theirs(x, lab, **kw), [e])
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)
            torch.testing.assert_close(ga, gb, atol=1e-9, rtol=1e-7)


def test_pml_constructor_options():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
    from pytorch_metric_learning.reducers import AvgNonZeroReducer, MeanReducer, PerAnchorReducer

    c_pml.NTXentLoss(0.1, distance=CosineSimilarity(), reducer=MeanReducer(), embedding_regularizer=None)
    c_pml.SupConLoss(0.1, distance=CosineSimilarity(), reducer=AvgNonZeroReducer())
    with pytest.raises(TypeError, match=r"distance=.*pytorch_metric_learning\.losses\.NTXentLoss"):
        c_pml.NTXentLoss(distance=LpDistance())
    with pytest.raises(TypeError, match=r"reducer=.*pytorch_metric_learning\.losses\.SupConLoss"):
        c_pml.SupConLoss(reducer=MeanReducer())
    with pytest.raises(TypeError, match="reducer"):
        c_pml.NTXentLoss(reducer=PerAnchorReducer(AvgNonZeroReducer()))
    with pytest.raises(TypeError, match="distance"):
        c_pml.NTXentLoss(distance=CosineSimilarity(power=2))
    pml = peer("pytorch_metric_learning.losses")
    assert c_pml.SelfSupervisedLoss.supported_losses() == pml.SelfSupervisedLoss.supported_losses()


@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss"])
@pytest.mark.parametrize("miner", [False, True])
def test_pml_cross_batch_memory(name, miner):
    """PML's CrossBatchMemory around the adapter (it always passes indices_tuple) over several
    steps, against CrossBatchMemory around PML's own loss."""
    pml = peer("pytorch_metric_learning.losses")
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    torch.manual_seed(0)
    mk = (lambda: MultiSimilarityMiner(0.1)) if miner else (lambda: None)
    ours = pml.CrossBatchMemory(getattr(c_pml, name)(0.1), 6, memory_size=20, miner=mk())
    theirs = pml.CrossBatchMemory(getattr(pml, name)(0.1), 6, memory_size=20, miner=mk())
    for _ in range(4):
        emb = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(0, 4, (8,))
        ours.embedding_memory = ours.embedding_memory.double()
        a, ga = values_and_grads(lambda x: ours(x, labels), [emb])
        b, gb = values_and_grads(lambda x: theirs(x, labels), [emb])
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-6)
        torch.testing.assert_close(ga, gb, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------- SupContrast

@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64, torch.bool])
def test_supcontrast_mask_dtypes(mask_dtype):
    feats = F.normalize(torch.randn(6, 2, 5, dtype=torch.float64), dim=-1).requires_grad_()
    mask = torch.rand(6, 6) > 0.5
    mask |= torch.eye(6, dtype=torch.bool)
    a, ga = values_and_grads(lambda f: c_sup.SupConLoss(0.1)(f, mask=mask.to(mask_dtype)), [feats])
    b, gb = values_and_grads(lambda f: supcontrast(f, mask=mask.to(mask_dtype), temperature=0.1), [feats])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


# ---------------------------------------------------------------- open_clip

def test_open_clip_helpers_and_non_positive_scale():
    oc = peer("open_clip.loss")
    img, txt = (F.normalize(torch.randn(7, 6, dtype=torch.float64), dim=1).requires_grad_() for _ in range(2))
    ours, theirs = c_clip.ClipLoss(), oc.ClipLoss()
    for x, y in zip(ours.get_logits(img, txt, 3.0), theirs.get_logits(img, txt, 3.0)):
        torch.testing.assert_close(x, y)
    assert torch.equal(ours.get_ground_truth(img.device, 7), theirs.get_ground_truth(img.device, 7))
    for s in (-2.0, 0.0, 0.5):
        scale = torch.tensor(s, dtype=torch.float64, requires_grad=True)
        a, ga = values_and_grads(lambda i, t, ls: ours(i, t, ls), [img, txt, scale])
        b, gb = values_and_grads(lambda i, t, ls: theirs(i, t, ls), [img, txt, scale])
        assert torch.isfinite(a)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ga, gb)


# ---------------------------------------------------------------- every adapter under autocast

def _autocast_cases():
    """(name, adapter, peer) callables of (x, y) embeddings (B, d), peers loaded lazily."""
    labels = torch.arange(16) % 3
    return [
        ("lightly NTXentLoss", lambda: c_lightly.NTXentLoss(0.2),
         lambda: peer("lightly.loss.ntx_ent_loss").NTXentLoss(0.2)),
        ("lightly NTXentLoss bank", lambda: c_lightly.NTXentLoss(0.2, memory_bank_size=(32, 16)),
         lambda: peer("lightly.loss.ntx_ent_loss").NTXentLoss(0.2, memory_bank_size=(32, 16))),
        ("lightly DCLLoss", lambda: c_lightly.DCLLoss(), lambda: peer("lightly.loss.dcl_loss").DCLLoss()),
        ("lightly DCLWLoss", lambda: c_lightly.DCLWLoss(), lambda: peer("lightly.loss.dcl_loss").DCLWLoss()),
        ("pml NTXentLoss", lambda: (lambda x, y, m=c_pml.NTXentLoss(0.2): m(torch.cat([x, y]), labels)),
         lambda: (lambda x, y, m=peer("pytorch_metric_learning.losses").NTXentLoss(0.2): m(torch.cat([x, y]), labels))),
        ("pml SupConLoss", lambda: (lambda x, y, m=c_pml.SupConLoss(0.2): m(torch.cat([x, y]), labels)),
         lambda: (lambda x, y, m=peer("pytorch_metric_learning.losses").SupConLoss(0.2): m(torch.cat([x, y]), labels))),
        ("pml SelfSupervisedLoss", lambda: c_pml.SelfSupervisedLoss(c_pml.NTXentLoss(0.2)),
         lambda: (lambda p=peer("pytorch_metric_learning.losses"): p.SelfSupervisedLoss(p.NTXentLoss(0.2)))()),
        ("open_clip ClipLoss", lambda: (lambda x, y, m=c_clip.ClipLoss(): m(F.normalize(x, dim=1), F.normalize(y, dim=1), 10.0)),
         lambda: (lambda x, y, m=peer("open_clip.loss").ClipLoss(): m(F.normalize(x, dim=1), F.normalize(y, dim=1), 10.0))),
        ("info_nce InfoNCE", lambda: c_info.InfoNCE(), lambda: peer("info_nce").InfoNCE()),
        ("SupContrast SupConLoss", lambda: (lambda x, y, m=c_sup.SupConLoss(0.1): m(torch.stack([x[:4], y[:4]], 1) / 4)),
         lambda: (lambda x, y: supcontrast(torch.stack([x[:4], y[:4]], 1) / 4, temperature=0.1))),
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(_autocast_cases())), ids=[c[0] for c in _autocast_cases()])
def test_autocast(case, dtype):
    """The embeddings of a linear layer under CPU autocast (low precision) and the loss under
    autocast: the adapter runs and returns float32, and its value and gradient are within twice
    the peer's own autocast error of the float64 value on the same embeddings (the 2x rule)."""
    name, make_ours, make_theirs = _autocast_cases()[case]
    theirs_fn = make_theirs()  # noqa: F841  (skips when the peer is not installed)
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 16)
    with torch.autocast("cpu", dtype=dtype):
        x, y = layer(torch.randn(8, 12)), layer(torch.randn(8, 12))
    assert x.dtype == dtype
    x, y = x.detach().requires_grad_(), y.detach()

    def run(make, amp, double=False):
        torch.manual_seed(1)  # the same random memory bank for every run
        loss_fn = make()
        if double and isinstance(loss_fn, torch.nn.Module):
            loss_fn = loss_fn.double()
        inp = x.double().detach().requires_grad_() if double else x
        with torch.autocast("cpu", dtype=dtype, enabled=amp):
            loss = loss_fn(inp, y.double() if double else y)
        (grad,) = torch.autograd.grad(loss, inp)
        return loss, grad.double()

    exact, g_exact = run(make_theirs, False, double=True)
    peer_amp, g_peer = run(make_theirs, True)
    ours, g_ours = run(make_ours, True)
    assert ours.dtype == torch.float32, name
    peer_err = (peer_amp.double() - exact).abs().item()
    assert (ours.double() - exact).abs().item() <= 2 * peer_err + 1e-6 * exact.abs().item() + 1e-7, name
    g_peer_err = (g_peer - g_exact).norm().item()
    # the gradient is stored in the embeddings' dtype: its rounding (2^-8 relative for bf16) is
    # a floor for both
    floor = 2.0 ** -(8 if dtype == torch.bfloat16 else 11) * g_exact.norm().item()
    assert (g_ours - g_exact).norm().item() <= 2 * g_peer_err + floor, name
