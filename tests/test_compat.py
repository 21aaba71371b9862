"""The drop-in adapters (infonce_kernels.compat) against the libraries they replace when those
are importable (pytorch-metric-learning, info-nce-pytorch), and against those libraries' formulas
written out here (materialised, float64) otherwise (lightly, open_clip, SupContrast)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_BACKENDS

import infonce_kernels as ik
from infonce_kernels.compat import _common
from infonce_kernels.compat import info_nce_pytorch as c_info
from infonce_kernels.compat import lightly as c_lightly
from infonce_kernels.compat import open_clip as c_clip
from infonce_kernels.compat import pytorch_metric_learning as c_pml
from infonce_kernels.compat import supcontrast as c_sup

BACKENDS = CPU_BACKENDS


def leaves(*shapes, dtype=torch.float64):
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]


def check(ours_fn, theirs_fn, inputs, atol=1e-9, rtol=1e-7):
    """Values and gradients of two functions of the same leaf tensors agree."""
    a = ours_fn(*inputs)
    ga = torch.autograd.grad(a, inputs, allow_unused=True)
    b = theirs_fn(*inputs)
    gb = torch.autograd.grad(b, inputs, allow_unused=True)
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)
    for x, y in zip(ga, gb):
        if x is None or y is None:
            assert (x is None or not x.any()) and (y is None or not y.any())
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


# ---------------------------------------------------------------- lightly (formulas of lightly 1.6)

def lightly_ntxent(out0, out1, t):
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    b = out0.shape[0]
    diag = torch.eye(b, dtype=torch.bool)
    l00, l01, l10, l11 = (x @ y.T / t for x, y in ((out0, out0), (out0, out1), (out1, out0), (out1, out1)))
    logits = torch.cat([torch.cat([l01, l00[~diag].view(b, -1)], 1), torch.cat([l10, l11[~diag].view(b, -1)], 1)])
    return F.cross_entropy(logits, torch.arange(b).repeat(2))


def lightly_dcl(out0, out1, t, weight_fn=None, gather=None, rank=0):
    """lightly 1.6's DCLLoss; with ``gather`` (an all-gather that back-propagates, as lightly's),
    the rows of every rank are keys and ``rank`` places this rank's pairs among them."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    all0, all1 = (out0, out1) if gather is None else (torch.cat(gather(out0)), torch.cat(gather(out1)))

    def half(x0, x1, x0_all, x1_all):
        b = x0.shape[0]
        diag = torch.zeros(b, x0_all.shape[0], dtype=torch.bool)
        diag[torch.arange(b), rank * b + torch.arange(b)] = True  # lightly's eye_rank
        s00, s01 = x0 @ x0_all.T / t, x0 @ x1_all.T / t
        pos = -s01[diag]
        if weight_fn:
            pos = pos * weight_fn(x0, x1)
        negs = torch.cat([s00[~diag].view(b, -1), s01[~diag].view(b, -1)], 1)
        return (pos + torch.logsumexp(negs, 1)).mean()

    return 0.5 * (half(out0, out1, all0, all1) + half(out1, out0, all1, all0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lightly_ntxent(backend):
    check(lambda a, b: c_lightly.NTXentLoss(backend=backend)(a, b), lambda a, b: lightly_ntxent(a, b, 0.5),
          leaves((6, 5), (6, 5)))
    check(lambda a, b: c_lightly.NTXentLoss(0.2, backend=backend)(a, b), lambda a, b: lightly_ntxent(a, b, 0.2),
          leaves((3, 7), (3, 7)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lightly_ntxent_memory_bank(backend):
    torch.manual_seed(1)
    ours = c_lightly.NTXentLoss(0.3, memory_bank_size=(7, 5), backend=backend).double()
    bank = ours.memory_bank.bank.clone()
    assert bank.shape == (7, 5) and torch.allclose(bank.norm(dim=1), torch.ones(7, dtype=torch.float64))
    for step in range(3):  # 4 + 4 > 7: the ring buffer wraps and drops the rest of the batch
        out0, out1 = leaves((4, 5), (4, 5))

        def expected(a, b, bank=bank):
            a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
            logits = torch.cat([(a * b).sum(1, keepdim=True), a @ bank.T], 1) / 0.3
            return F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))

        ptr = int(ours.memory_bank.bank_ptr)
        check(lambda a, b: ours(a, b), expected, [out0, out1])
        # check() called the adapter once: one enqueue of the normalised out1
        new = F.normalize(out1.detach(), dim=1)
        if ptr + 4 >= 7:
            bank[ptr:] = new[: 7 - ptr]
            ptr = 0
        else:
            bank[ptr: ptr + 4] = new
            ptr += 4
        torch.testing.assert_close(ours.memory_bank.bank, bank)
        assert int(ours.memory_bank.bank_ptr) == ptr
    # no update without gradient
    before = ours.memory_bank.bank.clone()
    ours(torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64))
    torch.testing.assert_close(ours.memory_bank.bank, before)


def test_lightly_ntxent_int_bank_and_errors():
    loss = c_lightly.NTXentLoss(memory_bank_size=16)
    out = loss(torch.randn(4, 8, requires_grad=True), torch.randn(4, 8))
    assert loss.memory_bank.bank.shape == (16, 8) and torch.isfinite(out)
    with pytest.raises(ValueError):
        c_lightly.NTXentLoss(temperature=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lightly_dcl_dclw(backend):
    check(lambda a, b: c_lightly.DCLLoss(backend=backend)(a, b), lambda a, b: lightly_dcl(a, b, 0.1),
          leaves((6, 5), (6, 5)))

    def vmf(x0, x1, sigma=0.5):
        return 2 - x0.shape[0] * F.softmax((x0.detach() * x1.detach()).sum(1) / sigma, dim=0)

    check(lambda a, b: c_lightly.DCLWLoss(0.2, sigma=0.7, backend=backend)(a, b),
          lambda a, b: lightly_dcl(a, b, 0.2, lambda x, y: vmf(x, y, 0.7)), leaves((5, 4), (5, 4)))

    def custom(x0, x1):  # a weight with a gradient
        return ((x0 - x1) ** 2).sum(1)

    check(lambda a, b: c_lightly.DCLLoss(0.3, weight_fn=custom, backend=backend)(a, b),
          lambda a, b: lightly_dcl(a, b, 0.3, custom), leaves((4, 3), (4, 3)))


def test_lightly_dcl_matches_loss_family():
    decoupled = pytest.importorskip("infonce_kernels.decoupled")
    dcl, dclw = decoupled.dcl, decoupled.dclw
    a, b = leaves((6, 5), (6, 5))
    torch.testing.assert_close(c_lightly.DCLLoss()(a, b), dcl(a, b))
    torch.testing.assert_close(c_lightly.DCLWLoss()(a, b), dclw(a, b))


# ---------------------------------------------------------------- open_clip

def open_clip_loss(img, txt, s):
    logits_per_image = s * img @ txt.T
    logits_per_text = s * txt @ img.T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_clip(backend):
    img, txt, log_s = leaves((7, 6), (7, 6), ())
    img_n, txt_n = F.normalize(img.detach(), dim=1).requires_grad_(), F.normalize(txt.detach(), dim=1).requires_grad_()
    check(lambda i, t, ls: c_clip.ClipLoss(backend=backend)(i, t, ls.exp()),
          lambda i, t, ls: open_clip_loss(i, t, ls.exp()), [img_n, txt_n, log_s])
    # unnormalised features are used as given, as open_clip's loss does
    check(lambda i, t, ls: c_clip.ClipLoss(backend=backend)(i, t, ls.exp() * 0.1),
          lambda i, t, ls: open_clip_loss(i, t, ls.exp() * 0.1), [img, txt, log_s])
    out = c_clip.ClipLoss()(img_n, txt_n, 10.0, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    # a scalar logit_bias cancels: same value, and a zero (not a missing) gradient, as open_clip
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    with_bias = c_clip.ClipLoss(backend=backend)(img_n, txt_n, 10.0, bias)
    torch.testing.assert_close(with_bias, open_clip_loss(img_n, txt_n, 10.0))
    with_bias.backward()
    assert bias.grad is not None and bias.grad.item() == 0
    with pytest.raises(ValueError, match="logit_bias"):
        c_clip.ClipLoss()(img_n, txt_n, 10.0, torch.zeros(7))
    with pytest.raises(RuntimeError, match="init_process_group"):  # world_size > 1 without a process group
        c_clip.ClipLoss(world_size=2, rank=0)(img_n, txt_n, 10.0)
    with pytest.raises(ValueError, match="use_horovod"):
        c_clip.ClipLoss(use_horovod=True)


# ---------------------------------------------------------------- info-nce-pytorch

def _info_nce_reference():
    try:
        from info_nce import info_nce
        return info_nce
    except ImportError:
        def info_nce(query, positive_key, negative_keys=None, temperature=0.1, reduction="mean",
                     negative_mode="unpaired"):
            q, p = F.normalize(query, dim=-1), F.normalize(positive_key, dim=-1)
            if negative_keys is None:
                return F.cross_entropy(q @ p.T / temperature, torch.arange(len(q)), reduction=reduction)
            n = F.normalize(negative_keys, dim=-1)
            neg = q @ n.T if negative_mode == "unpaired" else (q.unsqueeze(1) @ n.transpose(-2, -1)).squeeze(1)
            logits = torch.cat([(q * p).sum(1, keepdim=True), neg], 1)
            return F.cross_entropy(logits / temperature, torch.zeros(len(q), dtype=torch.long), reduction=reduction)
        return info_nce


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_info_nce_pytorch(backend, reduction):
    ref = _info_nce_reference()
    q, p = leaves((5, 4), (5, 4))
    check(lambda a, b: c_info.InfoNCE(reduction=reduction, backend=backend)(a, b),
          lambda a, b: ref(a, b, reduction=reduction), [q, p])
    q, p, n = leaves((5, 4), (5, 4), (9, 4))
    check(lambda a, b, c: c_info.InfoNCE(0.3, reduction, backend=backend)(a, b, c),
          lambda a, b, c: ref(a, b, c, temperature=0.3, reduction=reduction), [q, p, n])
    q, p, n = leaves((5, 4), (5, 4), (5, 3, 4))
    check(lambda a, b, c: c_info.InfoNCE(0.2, reduction, "paired", backend=backend)(a, b, c),
          lambda a, b, c: ref(a, b, c, temperature=0.2, reduction=reduction, negative_mode="paired"), [q, p, n])
    with pytest.raises(ValueError):
        c_info.InfoNCE(negative_mode="paired")(q, p, torch.randn(9, 4, dtype=torch.float64))


# ---------------------------------------------------------------- pytorch-metric-learning

def _pml_similarities(emb, labels, t, ref_emb, ref_labels):
    """PML's pair set-up: (sym, s, same) with s = cos(emb_i, key_j) / t (M, N) and same (M, N) the
    equal-label mask; the keys are emb itself (sym) or ref_emb."""
    sym = ref_emb is None
    q = F.normalize(emb, dim=1)
    k, kl = (q, labels) if sym else (F.normalize(ref_emb, dim=1), ref_labels)
    return sym, q @ k.T / t, labels[:, None] == kl[None, :]


def pml_ntxent(emb, labels, t, ref_emb=None, ref_labels=None):
    """PML NTXentLoss written out: mean over positive pairs of -log(e^s_ap / (e^s_ap + sum_n e^s_an))."""
    sym, s, same = _pml_similarities(emb, labels, t, ref_emb, ref_labels)
    pos = same & ~torch.eye(len(emb), dtype=torch.bool) if sym else same
    neg_lse = torch.logsumexp(s.masked_fill(same, float("-inf")), 1)
    a, p = pos.nonzero(as_tuple=True)
    if len(a) == 0 or not (~same).any():
        return (emb * 0).sum()
    return (torch.logaddexp(s[a, p], neg_lse[a]) - s[a, p]).mean()


def pml_supcon(emb, labels, t, ref_emb=None, ref_labels=None):
    sym, s, same = _pml_similarities(emb, labels, t, ref_emb, ref_labels)
    keep = ~torch.eye(len(emb), dtype=torch.bool) if sym else torch.ones_like(same)
    pos = (same & keep).double()
    if not pos.any() or not (~same).any():
        return (emb * 0).sum()
    log_prob = s - torch.logsumexp(s.masked_fill(~keep, float("-inf")), 1, keepdim=True)
    loss = -(pos * log_prob).sum(1) / (pos.sum(1) + torch.finfo(s.dtype).tiny)
    return loss[loss > 0].mean()


def _pml():
    try:
        from pytorch_metric_learning import losses
        return losses
    except ImportError:
        return None


LABELS = [
    torch.tensor([0, 1, 0, 2, 1, 0, 3, 2]),          # small classes, one singleton
    torch.tensor([5, 5, 5, 5, 5, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 2]),  # a class > 16
    torch.arange(6).repeat(2),                       # SelfSupervisedLoss-like pairs
    torch.tensor([3, 3, 3, 3]),                      # no negative: 0
    torch.tensor([0, 1, 2, 3]),                      # no positive: 0
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(LABELS)))
@pytest.mark.parametrize("label_op", [True, False] if _common.HAS_LABEL_OP else [False])
def test_pml_ntxent_and_supcon(backend, case, label_op, monkeypatch):
    monkeypatch.setattr(_common, "HAS_LABEL_OP", label_op)
    labels = LABELS[case]
    emb, = leaves((len(labels), 5))
    pml = _pml()
    for t in (0.07, 0.5):
        check(lambda e: c_pml.NTXentLoss(t, backend=backend)(e, labels), lambda e: pml_ntxent(e, labels, t), [emb])
        check(lambda e: c_pml.SupConLoss(t, backend=backend)(e, labels), lambda e: pml_supcon(e, labels, t), [emb])
        if pml is not None:
            check(lambda e: c_pml.NTXentLoss(t, backend=backend)(e, labels),
                  lambda e: pml.NTXentLoss(t)(e, labels), [emb], atol=1e-8, rtol=1e-6)
            check(lambda e: c_pml.SupConLoss(t, backend=backend)(e, labels),
                  lambda e: pml.SupConLoss(t)(e, labels), [emb], atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_op", [True, False] if _common.HAS_LABEL_OP else [False])
def test_pml_ref_emb_and_self_supervised(backend, label_op, monkeypatch):
    monkeypatch.setattr(_common, "HAS_LABEL_OP", label_op)
    labels, ref_labels = torch.tensor([0, 1, 1, 2, 7]), torch.tensor([1, 0, 2, 2, 1, 3])
    emb, ref = leaves((5, 4), (6, 4))
    check(lambda e, r: c_pml.NTXentLoss(0.1, backend=backend)(e, labels, ref_emb=r, ref_labels=ref_labels),
          lambda e, r: pml_ntxent(e, labels, 0.1, r, ref_labels), [emb, ref])
    check(lambda e, r: c_pml.SupConLoss(0.1, backend=backend)(e, labels, ref_emb=r, ref_labels=ref_labels),
          lambda e, r: pml_supcon(e, labels, 0.1, r, ref_labels), [emb, ref])
    pml = _pml()
    z1, z2 = leaves((6, 5), (6, 5))
    for symmetric in (True, False):
        ours = c_pml.SelfSupervisedLoss(c_pml.NTXentLoss(0.5, backend=backend), symmetric=symmetric)
        if pml is not None:
            theirs = pml.SelfSupervisedLoss(pml.NTXentLoss(0.5), symmetric=symmetric)
            check(ours, theirs, [z1, z2], atol=1e-8, rtol=1e-6)
    # symmetric self-supervised NT-Xent is SimCLR's NT-Xent
    check(c_pml.SelfSupervisedLoss(c_pml.NTXentLoss(0.5, backend=backend)),
          lambda a, b: ik.nt_xent(a, b, 0.5, backend=backend), [z1, z2])
    with pytest.raises(ValueError, match="indices_tuple"):
        c_pml.NTXentLoss()(emb, labels, indices_tuple=(labels, labels, labels))


def test_pml_float32_large_class_agrees():
    labels = torch.randint(0, 3, (300,))
    emb = torch.randn(300, 16, requires_grad=True)
    a = c_pml.NTXentLoss()(emb, labels)
    b = pml_ntxent(emb.double(), labels, 0.07)
    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- SupContrast

def supcontrast(features, labels=None, mask=None, temperature=0.07, contrast_mode="all", base_temperature=0.07):
    """SupContrast's SupConLoss.forward, written out (current version, no-positive anchors -> 0)."""
    bsz = features.shape[0]
    if labels is None and mask is None:
        mask = torch.eye(bsz, dtype=features.dtype)
    elif labels is not None:
        labels = labels.contiguous().view(-1, 1)
        mask = torch.eq(labels, labels.T).to(features.dtype)
    else:
        mask = mask.to(features.dtype)
    contrast_count = features.shape[1]
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    if contrast_mode == "one":
        anchor_feature, anchor_count = features[:, 0], 1
    else:
        anchor_feature, anchor_count = contrast_feature, contrast_count
    logits = anchor_feature @ contrast_feature.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True)[0].detach()
    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(bsz * anchor_count).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mask_pos_pairs = mask.sum(1)
    mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, 1, mask_pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, bsz).mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["all", "one"])
def test_supcontrast(backend, mode):
    feats, = leaves((6, 3, 5))
    with torch.no_grad():
        feats /= feats.norm(dim=-1, keepdim=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    mask = (torch.rand(6, 6, dtype=torch.float64) > 0.5).double()
    # weights: row 1 sums to 1e-8 and row 4 to a negative number (below SupContrast's 1e-6 floor,
    # where it divides by 1 instead of the sum), row 5 has no positive
    weights = torch.rand(6, 6, dtype=torch.float64)
    weights[1] = 1e-8 / 6
    weights[4] -= 1.0
    weights[5] = 0.0
    for kw in ({}, {"labels": labels}, {"mask": mask}, {"mask": weights}):
        check(lambda f: c_sup.SupConLoss(0.1, mode, 0.07, backend=backend)(f, **kw),
              lambda f: supcontrast(f, temperature=0.1, contrast_mode=mode, **kw), [feats])
    with pytest.raises(ValueError):
        c_sup.SupConLoss()(feats, labels=labels, mask=mask)
    with pytest.raises(ValueError):
        c_sup.SupConLoss()(feats[:, 0])
