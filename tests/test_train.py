"""Tests of the SimCLR reference trainer (infonce_kernels.train): tiny end-to-end runs, bit-exact
resume, every data loader on files written in the exact distributed formats, and bad options.

Kept small (tiny subsets, width-8 CNN) so the file runs in well under two minutes on 2 CPU cores.
"""

import csv
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("kornia")
pytest.importorskip("sklearn")

import infonce_kernels  # noqa: E402
from infonce_kernels.train import TrainConfig, TrainingInterrupted, train  # noqa: E402
from infonce_kernels.train import cli  # noqa: E402
from infonce_kernels.train.data import DatasetError, load_dataset  # noqa: E402
from infonce_kernels.train.losses import LOSSES, get_loss, register_loss  # noqa: E402
from infonce_kernels.train.models import build_encoder, SimCLRModel  # noqa: E402
from infonce_kernels.train.optim import LARS, build_optimizer, warmup_cosine  # noqa: E402
from infonce_kernels.train.temperature import Temperature  # noqa: E402


def tiny(tmp_path, name="run", **kw):
    base = dict(dataset="digits", subset=96, batch_size=32, epochs=1, width=8, hidden_dim=16, proj_dim=16,
                eval_every=0, knn_k=5, few_shot=0, progress=False, plot=False, output_dir=str(tmp_path / name))
    base.update(kw)
    return TrainConfig(**base)


def quiet(*a, **k):
    pass


# ---------------------------------------------------------------------------------------------- end to end


def test_tiny_end_to_end(tmp_path):
    s = train(tiny(tmp_path, plot=True, few_shot=2), log=quiet)
    out = tmp_path / "run"
    for f in ("steps.csv", "epochs.csv", "metrics.json", "curves.png", "last.pt"):
        assert (out / f).is_file(), f
    assert set(s["random_init"]) == {"knn", "linear", "linear_2shot"} == set(s["trained"])
    for v in list(s["random_init"].values()) + list(s["trained"].values()):
        assert 0.0 <= v <= 1.0
    steps = list(csv.DictReader(open(out / "steps.csv")))
    assert len(steps) == 3  # 96 images // 32
    assert all(math.isfinite(float(r["loss"])) for r in steps)
    assert {"loss", "temperature", "lr", "samples_per_s"} <= set(steps[0])
    m = json.load(open(out / "metrics.json"))
    assert m["summary"]["trained"] == s["trained"]
    assert m["epochs"][0]["epoch"] == 0 and "knn" in m["epochs"][0]  # the random-init evaluation


def test_cli_main_and_output(tmp_path, capsys):
    rc = cli.main(["--subset", "64", "--batch-size", "32", "--epochs", "1", "--width", "8", "--hidden-dim", "8",
                   "--proj-dim", "8", "--no-probe", "--no-plot", "--no-progress", "--eval-every", "0",
                   "--knn-k", "3", "--output-dir", str(tmp_path / "cli")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "infonce-train configuration" in text  # config echo
    assert "random init" in text and "trained" in text and "kNN" in text


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same_run(a, b):
    sa, sb = _state(a), _state(b)
    assert sa["global_step"] == sb["global_step"]
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    for k, v in sa["temperature"].items():
        assert torch.equal(v, sb["temperature"][k]), k
    for pid, st in sa["optimizer"]["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                assert torch.equal(v, sb["optimizer"]["state"][pid][k]), (pid, k)
    assert sa["scheduler"]["last_epoch"] == sb["scheduler"]["last_epoch"]
    la = [r["loss"] for r in sa["history"]["steps"]]
    lb = [r["loss"] for r in sb["history"]["steps"]]
    assert la == lb


@pytest.mark.parametrize("stop", [dict(stop_after_epochs=1), dict(stop_after_steps=4)],
                         ids=["epoch-boundary", "mid-epoch"])
def test_resume_is_bit_identical(tmp_path, stop):
    # learnable temperature + SGD momentum: every kind of state must survive the checkpoint
    kw = dict(epochs=2, probe=False, temperature_mode="learnable", optimizer="sgd", lr=0.05)
    train(tiny(tmp_path, "full", **kw), log=quiet)
    with pytest.raises(TrainingInterrupted) as ei:
        train(tiny(tmp_path, "split", **kw, **stop), log=quiet)
    assert os.path.isfile(ei.value.checkpoint)
    first = _state(ei.value.checkpoint)["global_step"]
    assert 0 < first < 6
    train(tiny(tmp_path, "split", **kw, resume="auto"), log=quiet)
    _assert_same_run(tmp_path / "full" / "last.pt", tmp_path / "split" / "last.pt")
    steps = list(csv.DictReader(open(tmp_path / "split" / "steps.csv")))
    assert [int(r["step"]) for r in steps] == list(range(1, 7))


def test_log_annealed_temperature_and_lars(tmp_path):
    s = train(tiny(tmp_path, temperature_mode="log", temperature=0.5, tau_min=0.2, anneal_t0=1.0,
                   optimizer="lars", lr=0.5, probe=False), log=quiet)
    steps = list(csv.DictReader(open(tmp_path / "run" / "steps.csv")))
    taus = [float(r["temperature"]) for r in steps]
    assert taus[0] == pytest.approx(0.5)
    assert taus == sorted(taus, reverse=True) and taus[-1] >= 0.2
    assert taus[1] == pytest.approx(1 / (2.0 * math.log(math.e + 1)))
    assert s["trained"]["knn"] >= 0


@pytest.mark.parametrize("loss", sorted(set(LOSSES) - {"nt_xent"}))
def test_every_registered_loss_trains_by_name(tmp_path, loss):
    s = train(tiny(tmp_path, loss=loss, probe=False), log=quiet)
    steps = list(csv.DictReader(open(tmp_path / "run" / "steps.csv")))
    assert len(steps) == 3 and all(math.isfinite(float(r["loss"])) for r in steps)
    assert s["trained"]["knn"] >= 0


# ---------------------------------------------------------------------------------------------- data loaders


def _write_cifar(root, names, label_key, n=4, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    arrays = {}
    for name in names:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump({b"batch_label": b"x", label_key: labels, b"data": data, b"filenames": [b"a"] * n}, f)
        arrays[name] = (data, labels)
    return arrays


def test_cifar10_loader(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    arrays = _write_cifar(root, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels")
    b = load_dataset("cifar10", root)
    assert b.ssl_x.shape == (20, 3, 32, 32) and b.ssl_x.dtype == torch.uint8
    assert b.test_x.shape == (4, 3, 32, 32)
    data, labels = arrays["data_batch_1"]
    # CIFAR rows are 1024 red, 1024 green, 1024 blue values, each row-major 32x32
    assert torch.equal(b.ssl_x[0, 1], torch.from_numpy(data[0, 1024:2048].reshape(32, 32)))
    assert b.ssl_y[:4].tolist() == labels and b.num_classes == 10


def test_cifar100_loader(tmp_path):
    root = tmp_path / "cifar-100-python"
    arrays = _write_cifar(root, ["train", "test"], b"fine_labels", n=6)
    b = load_dataset("cifar100", root)
    assert b.ssl_x.shape == (6, 3, 32, 32) and b.test_y.tolist() == arrays["test"][1]
    assert b.num_classes == 100


def test_stl10_loader_column_major(tmp_path):
    root = tmp_path / "stl10_binary"
    root.mkdir()
    rng = np.random.default_rng(0)
    imgs = {s: rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8) for s, n in
            (("train", 3), ("test", 2), ("unlabeled", 4))}
    for s, x in imgs.items():
        # STL-10 stores each channel column-major (Fortran order)
        np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tofile(root / f"{s}_X.bin")
    np.array([1, 10, 5], dtype=np.uint8).tofile(root / "train_y.bin")
    np.array([2, 3], dtype=np.uint8).tofile(root / "test_y.bin")
    b = load_dataset("stl10", root)
    assert torch.equal(b.train_x, torch.from_numpy(imgs["train"]))
    assert torch.equal(b.test_x, torch.from_numpy(imgs["test"]))
    assert b.train_y.tolist() == [0, 9, 4] and b.test_y.tolist() == [1, 2]
    assert b.ssl_x.shape == (7, 3, 96, 96) and b.ssl_y.tolist() == [0, 9, 4, -1, -1, -1, -1]


def _write_images(root, classes, n, size=(12, 10)):
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")


def test_imagefolder_loader_split_and_presplit(tmp_path):
    flat = tmp_path / "flat"
    _write_images(flat, ["cat", "dog"], 5)
    b = load_dataset("imagefolder", flat, seed=0, image_size=8)
    assert b.ssl_x.shape[1:] == (3, 8, 8)
    assert len(b.train_y) + len(b.test_y) == 10 and b.num_classes == 2
    assert sorted(b.test_y.tolist()) == [0, 1]  # stratified
    pre = tmp_path / "pre"
    _write_images(pre / "train", ["a", "b", "c"], 2)
    _write_images(pre / "val", ["a", "b", "c"], 1)
    b = load_dataset("imagefolder", pre, image_size=16)
    assert b.train_x.shape == (6, 3, 16, 16) and b.test_y.tolist() == [0, 1, 2]


def test_training_on_generated_cifar_with_resnet18(tmp_path):
    root = tmp_path / "cifar"
    _write_cifar(root, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", n=4)
    s = train(TrainConfig(dataset="cifar10", data_dir=str(root), image_size=8, batch_size=8, epochs=1,
                          arch="resnet18", hidden_dim=32, proj_dim=16, knn_k=3, probe=False, eval_every=0,
                          optimizer="lars", progress=False, plot=False, output_dir=str(tmp_path / "out")), log=quiet)
    assert s["global_step"] == 2


def test_digits_loader_split_is_fixed_by_seed():
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert len(a.train_y) + len(a.test_y) == 1797 and a.ssl_x.shape[1:] == (1, 8, 8)
    assert torch.equal(a.test_x, b.test_x) and not torch.equal(a.test_x, c.test_x)


@pytest.mark.parametrize("case", ["missing_dir", "missing_file", "not_pickle", "bad_shape", "missing_key"])
def test_cifar_malformed(tmp_path, case):
    root = tmp_path / "c10"
    if case != "missing_dir":
        _write_cifar(root, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels")
    target = root / "data_batch_3"
    if case == "missing_file":
        os.remove(target)
    elif case == "not_pickle":
        target.write_bytes(b"not a pickle")
    elif case == "bad_shape":
        with open(target, "wb") as f:
            pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    elif case == "missing_key":
        with open(target, "wb") as f:
            pickle.dump({b"data": np.zeros((4, 3072), np.uint8)}, f)
    with pytest.raises(DatasetError) as ei:
        load_dataset("cifar10", root)
    msg = str(ei.value)
    assert str(root) in msg and "data_batch_1" in msg  # names the path and the expected layout


def test_stl10_malformed(tmp_path):
    root = tmp_path / "stl"
    root.mkdir()
    (root / "train_X.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(DatasetError, match="train_X.bin.*3\\*96\\*96"):
        load_dataset("stl10", root)
    np.zeros((1, 3, 96, 96), np.uint8).tofile(root / "train_X.bin")
    with pytest.raises(DatasetError, match="train_y.bin"):
        load_dataset("stl10", root)
    np.array([1, 2], np.uint8).tofile(root / "train_y.bin")
    with pytest.raises(DatasetError, match="2 labels for 1 images"):
        load_dataset("stl10", root)


def test_imagefolder_malformed(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("imagefolder", tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images found"):
        load_dataset("imagefolder", tmp_path / "empty")
    (tmp_path / "empty" / "cls" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="broken.png"):
        load_dataset("imagefolder", tmp_path / "empty")


# ---------------------------------------------------------------------------------------------- bad options


@pytest.mark.parametrize("argv,option", [
    (["--batch-size", "1"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--temperature", "-0.1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--lr", "-1"], "--lr"),
    (["--warmup-epochs", "50", "--epochs", "10"], "--warmup-epochs"),
    (["--momentum", "1.5"], "--momentum"),
    (["--knn-k", "0"], "--knn-k"),
    (["--dataset", "cifar10"], "--data-dir"),
    (["--data-dir", "/tmp"], "--data-dir"),
    (["--temperature-mode", "learnable", "--temperature", "0.1", "--tau-min", "0.5"], "--tau-min"),
    (["--arch", "vgg"], "--arch"),
    (["--optimizer", "adam"], "--optimizer"),
    (["--device", "tpu"], "--device"),
    (["--stop-after-epochs", "5", "--epochs", "2"], "--stop-after-epochs"),
])
def test_bad_options_are_argparse_errors(argv, option, capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(argv)
    assert ei.value.code == 2
    assert option in capsys.readouterr().err


def test_bad_options_raising_late(tmp_path, capsys):
    base = ["--no-progress", "--output-dir", str(tmp_path / "o")]
    cases = [
        (["--loss", "no_such_loss"], "nt_xent"),  # lists the available names
        (["--dataset", "cifar10", "--data-dir", str(tmp_path / "missing")], str(tmp_path / "missing")),
        (["--resume"], "--resume"),
        (["--subset", "20", "--batch-size", "64"], "--batch-size"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as ei:
            cli.main(argv + base)
        assert ei.value.code == 2
        assert expected in capsys.readouterr().err


def test_programmatic_errors_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="--batch-size"):
        train(tiny(tmp_path, batch_size=0), log=quiet)
    with pytest.raises(ValueError, match="--loss: 'nope'.*available: .*nt_xent"):
        train(tiny(tmp_path, loss="nope"), log=quiet)


# ---------------------------------------------------------------------------------------------- pieces


def test_loss_registry(monkeypatch):
    assert {"nt_xent", "info_nce", "dcl", "dhel", "supcon"} <= set(LOSSES)
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    ref = infonce_kernels.nt_xent(z1, z2, temperature=0.3)
    assert torch.allclose(get_loss("nt_xent")(z1, z2, 0.3), ref)
    # a loss added to the package later is found by name; supcon gets all views + labels
    seen = {}

    def fake_supcon(z, labels, *, temperature, backend):
        seen.update(shape=tuple(z.shape), labels=labels.tolist(), backend=backend)
        return z.sum() * 0

    monkeypatch.setattr(infonce_kernels, "supcon", fake_supcon, raising=False)
    get_loss("supcon", backend="reference")(z1, z2, 0.1, torch.arange(6))
    assert seen == dict(shape=(12, 4), labels=list(range(6)) * 2, backend="reference")
    with pytest.raises(ValueError, match="needs a label"):
        get_loss("supcon")(z1, z2, 0.1, None)
    monkeypatch.setattr(infonce_kernels, "my_loss", lambda a, b, temperature, backend: (a - b).pow(2).mean(),
                        raising=False)
    register_loss("my_loss")
    try:
        assert get_loss("my_loss")(z1, z1, 0.1) == 0
    finally:
        LOSSES.pop("my_loss")


def test_temperature_modes():
    assert Temperature("fixed", 0.3)(100) == 0.3
    t = Temperature("log", 0.5, tau_min=0.1, t0=10)
    assert t(0) == pytest.approx(0.5)
    assert t(10) == pytest.approx(1 / (2 * math.log(math.e + 1)))
    assert t(10**9) == pytest.approx(0.1)  # capped at beta_max = 1/tau_min
    lin, cos = Temperature("linear", 0.5, tau_min=0.1, total_steps=8), Temperature("cosine", 0.5, tau_min=0.1, total_steps=8)
    assert [lin(s) for s in (0, 4, 8, 20)] == pytest.approx([0.5, 0.3, 0.1, 0.1])
    assert [cos(s) for s in (0, 4, 8, 20)] == pytest.approx([0.5, 0.3, 0.1, 0.1])
    assert cos(2) == pytest.approx(0.1 + 0.4 * (1 + math.cos(math.pi / 4)) / 2)
    lt = Temperature("learnable", 0.5, tau_min=0.05)
    tau = lt(0)
    assert torch.is_tensor(tau) and tau.requires_grad and float(tau.detach()) == pytest.approx(0.5)
    with torch.no_grad():
        lt.log_scale.fill_(10.0)
    lt.clamp_()
    assert lt.value(0) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="--temperature-mode"):
        Temperature("exponential", 0.5)
    with pytest.raises(ValueError, match="--anneal-t0"):
        Temperature("log", 0.5, t0=0.0)


def test_lars_excludes_bias_and_norm_and_schedule():
    model = SimCLRModel(build_encoder("smallcnn", 1, 8, width=4), 8, 4)
    opt = build_optimizer("lars", model, lr=0.1, weight_decay=1e-4)
    assert isinstance(opt, LARS)
    excluded = [g for g in opt.param_groups if g["lars_exclude"]][0]
    assert excluded["weight_decay"] == 0 and all(p.ndim <= 1 for p in excluded["params"])
    f = warmup_cosine(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    # one LARS step on a weight moves it by about lr * eta * ||w||
    w = torch.nn.Parameter(torch.ones(4, 4))
    w.grad = torch.full((4, 4), 5.0)
    LARS([w], lr=1.0, momentum=0.0, eta=0.01).step()
    assert torch.allclose(w, torch.full((4, 4), 1 - 0.01))


def test_resnets_shapes():
    x = torch.randn(2, 3, 8, 8)
    assert build_encoder("resnet18", 3, 8)(x).shape == (2, 512)
    assert build_encoder("resnet50", 3, 8)(x).shape == (2, 2048)
    enc = build_encoder("resnet18", 3, 96, stem="auto")
    assert isinstance(enc.stem[-1], torch.nn.MaxPool2d)  # ImageNet stem above 64 px
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_gpu_train_bench_dry_run_on_cpu(tmp_path):
    """scripts/gpu_train_bench.py (the trainer's GPU measurements) runs end to end on the CPU in
    its quick mode: every section fills its figures, with the fused and the reference backend."""
    import subprocess
    import sys

    pytest.importorskip("PIL")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "gpu_train_bench.py")
    r = subprocess.run([sys.executable, script, "--device", "cpu", "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / "gpu_train_bench.json"))
    assert res["fused_backend"] == "cpu" and res["machine"]["torch"] == torch.__version__
    assert res["digits"]["trained"]["knn"] > 0 and res["digits"]["samples_per_s"] > 0
    for backend in ("cpu", "reference"):
        assert res["imagefolder"][backend]["samples_per_s"] > 0
        largest = res["largest_batch"][backend]
        assert largest["largest"] == 128 and largest["limit"] == "--max-batch"  # --quick: 64 and 128 fit
