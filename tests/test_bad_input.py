"""Bad input gets a ValueError/TypeError naming the argument, before any kernel runs."""

import pytest
import torch

import infonce_kernels as ik

X = torch.randn(4, 3)
Y = torch.randn(4, 3)
NAN = torch.tensor([[1.0, float("nan"), 0.0]] * 4)

CASES = [
    # (callable, exception, message fragment)
    (lambda: ik.lse(X.numpy(), Y, 1.0), TypeError, "q must be a torch.Tensor"),
    (lambda: ik.lse(X, Y.long(), 1.0), TypeError, "k must be float16"),
    (lambda: ik.lse(X, Y.double(), 1.0), TypeError, "same dtype"),
    (lambda: ik.lse(X[0], Y, 1.0), ValueError, "q must be 2-D"),
    (lambda: ik.lse(X, torch.randn(4, 3, 1), 1.0), ValueError, "k must be 2-D"),
    (lambda: ik.lse(torch.empty(0, 3), Y, 1.0), ValueError, "empty batch"),
    (lambda: ik.lse(X, torch.empty(0, 3), 1.0), ValueError, "empty batch"),
    (lambda: ik.lse(X, torch.randn(4, 5), 1.0), ValueError, "same feature size"),
    (lambda: ik.lse(torch.randn(4, 0), torch.randn(4, 0), 1.0), ValueError, "feature size 0"),
    (lambda: ik.lse(X, Y, 0.0), ValueError, "scale must be positive"),
    (lambda: ik.lse(X, Y, -1.0), ValueError, "scale must be positive"),
    (lambda: ik.lse(X, Y, float("inf")), ValueError, "scale must be positive"),
    (lambda: ik.lse(X, Y, torch.tensor(-2.0)), ValueError, "scale must be positive"),
    (lambda: ik.lse(X, Y, torch.tensor(float("nan"))), ValueError, "scale must be positive"),
    (lambda: ik.lse(X, Y, torch.tensor([1.0, 2.0])), ValueError, "scale must be a number"),
    (lambda: ik.lse(X, Y, "1"), TypeError, "scale must be a float"),
    (lambda: ik.lse(X, Y, torch.tensor(2)), TypeError, "scale must be a floating-point"),
    (lambda: ik.lse(NAN, Y, 1.0), ValueError, "q contains NaN"),
    (lambda: ik.lse(X, NAN, 1.0), ValueError, "k contains NaN"),
    (lambda: ik.lse(X, Y, 1.0, exclude=torch.zeros(4, 3, dtype=torch.long)), ValueError, "exclude must have shape"),
    (lambda: ik.lse(X, Y, 1.0, exclude=torch.zeros(5, 1, dtype=torch.long)), ValueError, "exclude must have shape"),
    (lambda: ik.lse(X, Y, 1.0, exclude=torch.zeros(4, 1)), TypeError, "exclude must be an integer"),
    (lambda: ik.lse(X, Y, 1.0, exclude=[[0]] * 4), TypeError, "exclude must be an integer tensor"),
    (lambda: ik.lse(X, Y, 1.0, exclude=torch.full((4, 1), 4)), ValueError, r"exclude indices must lie in \[-1, 4\)"),
    (lambda: ik.lse(X, Y, 1.0, exclude=torch.full((4, 1), -2)), ValueError, "exclude indices"),
    (lambda: ik.lse(X, Y[:1], 1.0, exclude=torch.zeros(4, 1, dtype=torch.long)), ValueError, "every key from row 0"),
    (lambda: ik.lse(X, Y[:2], 1.0, exclude=torch.tensor([[0, -1]] * 3 + [[1, 0]])), ValueError, "every key from row 3"),
    (lambda: ik.lse(X, Y, 1.0, symmetric=True), ValueError, "symmetric=True requires k to be q"),
    (lambda: ik.lse(X, Y, 1.0, backend="gpu"), ValueError, "backend must be"),
    (lambda: ik.lse(X, Y, 1.0, backend=3), TypeError, "backend must be a string"),
    (lambda: ik.lse(X, Y, 1.0, row_labels=torch.zeros(4, dtype=torch.long)), ValueError, "row_labels and key_labels go together"),
    (lambda: ik.lse(X, Y, 1.0, positive=torch.zeros(4, dtype=torch.long)), ValueError, "positive only applies"),
    (lambda: ik.lse(X, Y, 1.0, row_labels=torch.zeros(3, dtype=torch.long), key_labels=torch.zeros(4, dtype=torch.long)),
     ValueError, r"row_labels must have shape \(4,\)"),
    (lambda: ik.lse(X, Y, 1.0, row_labels=torch.zeros(4), key_labels=torch.zeros(4)), TypeError, "row_labels must be an integer"),
    (lambda: ik.lse(X, Y, 1.0, row_labels=torch.zeros(4, dtype=torch.long), key_labels=torch.arange(4),
                    positive=torch.full((4,), 9)), ValueError, r"positive indices must lie in \[-1, 4\)"),
    (lambda: ik.lse(X, Y, 1.0, row_labels=torch.zeros(4, dtype=torch.long), key_labels=torch.zeros(4, dtype=torch.long)),
     ValueError, "remove every key from some row"),
    (lambda: ik.lse(X, Y, 1.0, exclude=torch.tensor([[1]] * 4), row_labels=torch.zeros(4, dtype=torch.long),
                    key_labels=torch.tensor([0, 1, 0, 0]), positive=torch.ones(4, dtype=torch.long)),
     ValueError, "remove every key from some row"),
    (lambda: ik.nt_xent(X[:1], Y[:1]), ValueError, "at least 2 pairs"),
    (lambda: ik.nt_xent(X, Y[:3]), ValueError, "same number of rows"),
    (lambda: ik.nt_xent(X, torch.randn(4, 2)), ValueError, "same feature size"),
    (lambda: ik.nt_xent(X, Y, 0.0), ValueError, "temperature must be positive"),
    (lambda: ik.nt_xent(X, Y, torch.tensor(-0.1)), ValueError, "temperature must be positive"),
    (lambda: ik.nt_xent(X, NAN), ValueError, "z2 contains NaN"),
    (lambda: ik.nt_xent(X, Y, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: ik.nt_xent(torch.empty(0, 3), torch.empty(0, 3)), ValueError, "z1 needs at least 1 row"),
    (lambda: ik.info_nce(X, Y[:2]), ValueError, "same number of rows"),
    (lambda: ik.info_nce(X, Y, negative_keys=torch.randn(5, 4)), ValueError, "negative_keys must have the same feature size"),
    (lambda: ik.info_nce(X, Y, negative_keys=torch.empty(0, 3)), ValueError, "negative_keys needs at least 1 row"),
    (lambda: ik.info_nce(X, Y, negative_keys=NAN), ValueError, "negative_keys contains NaN"),
    (lambda: ik.info_nce(X, Y, temperature=-1.0), ValueError, "temperature must be positive"),
    (lambda: ik.clip_loss(X, Y, 0.0), ValueError, "logit_scale must be positive"),
    (lambda: ik.clip_loss(X, Y, torch.tensor(float("inf"))), ValueError, "logit_scale must be positive"),
    (lambda: ik.clip_loss(X, Y.half(), 1.0), TypeError, "same dtype"),
    (lambda: ik.clip_loss(NAN, Y, 1.0), ValueError, "image_features contains NaN"),
    (lambda: ik.NTXentLoss(reduction="max"), ValueError, "reduction must be one of"),
]


@pytest.mark.parametrize("call,error,message", CASES, ids=[c[2] for c in CASES])
def test_bad_input_is_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_device_mismatch_is_named():
    meta = torch.randn(4, 3, device="meta")
    with pytest.raises(ValueError, match="same device"):
        ik.lse(X, meta, 1.0)
    with pytest.raises(ValueError, match="exclude is on meta"):
        ik.lse(X, Y, 1.0, exclude=torch.zeros(4, 1, dtype=torch.long, device="meta"))
