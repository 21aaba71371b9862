"""Tests of the SimCLR reference trainer (infonce_kernels.train): tiny end-to-end runs, bit-exact
resume, verified checkpoints, the output directory, every data loader on files written in the exact
distributed formats, and bad options.

Kept small (tiny subsets, width-8 CNN) so the file runs in well under two minutes on 2 CPU cores.
"""

import csv
import json
import math
import os
import pickle
import struct
import sys
import zipfile

import numpy as np
import pytest
import torch

pytest.importorskip("kornia")
pytest.importorskip("sklearn")

import infonce_kernels  # noqa: E402
from infonce_kernels.train import TrainConfig, TrainingInterrupted, train  # noqa: E402
from infonce_kernels.train import cli, trainer  # noqa: E402
from infonce_kernels.train import temperature as train_temperature  # noqa: E402
from infonce_kernels.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from infonce_kernels.train.data import DatasetError, load_dataset  # noqa: E402
from infonce_kernels.train.losses import LOSSES, get_loss, register_loss  # noqa: E402
from infonce_kernels.train.models import build_encoder, SimCLRModel  # noqa: E402
from infonce_kernels.train.optim import LARS, build_optimizer, warmup_cosine  # noqa: E402
from infonce_kernels.train.outputs import plot_curves  # noqa: E402
from infonce_kernels.train.temperature import build_temperature  # noqa: E402


def tiny(tmp_path, name="run", **kw):
    base = dict(dataset="digits", subset=96, batch_size=32, epochs=1, width=8, hidden_dim=16, proj_dim=16,
                eval_every=0, knn_k=5, few_shot=0, progress=False, plot=False, output_dir=str(tmp_path / name))
    base.update(kw)
    return TrainConfig(**base)


def quiet(*a, **k):
    pass


# ---------------------------------------------------------------------------------------------- end to end


def _png_width(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", head[16:20])[0]  # IHDR width


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_tiny_end_to_end(tmp_path, umask_027):
    export = tmp_path / "exported" / "encoder.pt"
    os.makedirs(export.parent)
    s = train(tiny(tmp_path, plot=True, few_shot=2, export=str(export)), log=quiet)
    out = tmp_path / "run"
    for f in ("steps.csv", "epochs.csv", "metrics.json", "curves.png", "last.pt"):
        assert (out / f).is_file(), f
    # every file gets the mode of the user's umask (not mkstemp's 0600)
    for f in list(out.iterdir()) + [export]:
        assert f.stat().st_mode & 0o777 == umask_027, f
    # the checkpoint and the export load with torch.load's weights_only=True
    ck = torch.load(out / "last.pt", weights_only=True)
    enc = build_encoder("smallcnn", 1, 8, width=8)
    exported = torch.load(export, weights_only=True)
    enc.load_state_dict(exported)  # strict: exactly the encoder's keys
    for k, v in exported.items():
        assert torch.equal(v, ck["model"]["encoder." + k]), k
    assert _png_width(out / "curves.png") == 1000  # a fixed temperature gets no panel of its own
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
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_run(a, b):
    sa, sb = _state(a), _state(b)
    assert sa["global_step"] == sb["global_step"]
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    assert sa["temperature"].keys() == sb["temperature"].keys()
    for k, v in sa["temperature"].items():
        assert torch.equal(v, sb["temperature"][k]) if torch.is_tensor(v) else v == sb["temperature"][k], k
    for pid, st in sa["optimizer"]["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                assert torch.equal(v, sb["optimizer"]["state"][pid][k]), (pid, k)
    assert sa["scheduler"]["last_epoch"] == sb["scheduler"]["last_epoch"]
    la = [r["loss"] for r in sa["history"]["steps"]]
    lb = [r["loss"] for r in sb["history"]["steps"]]
    assert la == lb


_FULL_RUNS = {}


def _full_run(tmp_path_factory, mode):
    """last.pt of the uninterrupted 2-epoch run with this temperature mode (trained once per module)."""
    if mode not in _FULL_RUNS:
        d = tmp_path_factory.mktemp(f"full-{mode}")
        train(tiny(d, **_RESUME_KW, temperature_mode=mode), log=quiet)
        _FULL_RUNS[mode] = d / "run" / "last.pt"
    return _FULL_RUNS[mode]


# SGD momentum and a learnable temperature (or a schedule): every kind of state must survive
_RESUME_KW = dict(epochs=2, probe=False, optimizer="sgd", lr=0.05)


def _as_version_1(path):
    """Rewrite a checkpoint the way the trainer wrote it before checksums: numpy RNG states (the
    legacy tuple), no format or digest, no schedule state."""
    ck = torch.load(path, weights_only=True)
    del ck["format"], ck["sha256"]
    ck["version"] = 1
    for r in ck["rng"]:
        n = r["numpy"]
        r["numpy"] = (n["bit_generator"], n["state"]["key"].numpy().astype(np.uint32), n["state"]["pos"],
                      n["has_gauss"], n["gauss"])
    if ck["config"]["temperature_mode"] != "learnable":
        ck["temperature"] = {}
    torch.save(ck, path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # numpy arrays inside, as in the old files


@pytest.mark.parametrize("stop,mode,legacy", [(dict(stop_after_epochs=1), "learnable", False),
                                              (dict(stop_after_steps=4), "learnable", False),
                                              (dict(stop_after_steps=4), "cosine", True)],
                         ids=["epoch-boundary", "mid-epoch", "version-1-checkpoint"])
def test_resume_is_bit_identical(tmp_path, tmp_path_factory, stop, mode, legacy):
    full = _full_run(tmp_path_factory, mode)
    kw = dict(_RESUME_KW, temperature_mode=mode)
    with pytest.raises(TrainingInterrupted) as ei:
        train(tiny(tmp_path, "split", **kw, **stop), log=quiet)
    assert ei.value.requested and os.path.isfile(ei.value.checkpoint)
    first = _state(ei.value.checkpoint)["global_step"]
    assert 0 < first < 6
    previous = tmp_path / "split" / "previous.pt"  # one checkpoint back, not a second copy of last.pt
    assert not previous.exists() or _state(previous)["global_step"] < first
    if legacy:
        _as_version_1(ei.value.checkpoint)
    train(tiny(tmp_path, "split", **kw, resume="auto"), log=quiet)
    _assert_same_run(full, tmp_path / "split" / "last.pt")
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


# ---------------------------------------------------------------------------------------------- checkpoints


def _payload(seed=0):
    """A small checkpoint payload with every entry the trainer writes."""
    g = torch.Generator().manual_seed(seed)
    return dict(config={"seed": seed, "temperature_mode": "fixed"},
                model={"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)},
                temperature={"last_step": 3}, optimizer={"state": {}, "param_groups": []}, scheduler={"last_epoch": 3},
                epoch=seed, step_in_epoch=0, global_step=3 * seed, history={"steps": [], "epochs": []},
                baseline={"knn": 0.5}, rng=[{"torch": torch.get_rng_state()}])


def _flip_tensor_byte(path, record_suffix="data/0", offset=7):
    """Flip one byte inside a tensor's stored bytes (torch.save stores them uncompressed)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(record_suffix))
        assert info.compress_type == zipfile.ZIP_STORED
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        at = info.header_offset + 30 + name_len + extra_len + offset
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x10]))


def test_checkpoint_round_trip_keeps_previous(tmp_path):
    path = str(tmp_path / "last.pt")
    save_checkpoint(_payload(1), path)
    save_checkpoint(_payload(2), path)
    last, prev = load_checkpoint(path), load_checkpoint(str(tmp_path / "previous.pt"))
    assert last["epoch"] == 2 and prev["epoch"] == 1
    assert torch.equal(last["model"]["w"], _payload(2)["model"]["w"])
    assert torch.load(path, weights_only=True)["global_step"] == 6  # plain torch.load, default safety
    save_checkpoint(_payload(3), path)
    assert load_checkpoint(str(tmp_path / "previous.pt"))["epoch"] == 2  # the last two are kept
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "previous.pt"]
    with pytest.raises(TypeError, match="numpy.float64"):
        save_checkpoint(dict(_payload(), baseline={"knn": np.float64(0.5)}), path)  # would need a pickled class
    assert load_checkpoint(path)["epoch"] == 3  # a refused write leaves the files alone


def test_damaged_checkpoint_is_refused_and_previous_offered(tmp_path):
    path = str(tmp_path / "last.pt")
    save_checkpoint(_payload(1), path)
    save_checkpoint(_payload(2), path)
    _flip_tensor_byte(path)
    damaged = torch.load(path, weights_only=True)  # torch itself reads the damaged values silently
    assert not torch.equal(damaged["model"]["w"], _payload(2)["model"]["w"])
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path)
    msg = str(ei.value)
    assert path in msg and "damaged" in msg and "--resume " + str(tmp_path / "previous.pt") in msg
    assert "epoch 1" in msg and "\n" not in msg
    _flip_tensor_byte(str(tmp_path / "previous.pt"))
    with pytest.raises(CheckpointError, match="previous checkpoint is unusable too"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", ["empty", "truncated", "text", "foreign-dict", "tensor", "pickled-class",
                                     "future-version"])
def test_unusable_checkpoint_files_give_one_clear_error(tmp_path, content):
    path = str(tmp_path / "ck.pt")
    save_checkpoint(_payload(1), path)
    data = open(path, "rb").read()
    if content == "empty":
        data = b""
    elif content == "truncated":
        data = data[:len(data) // 2]
    elif content == "text":
        data = b"epoch=3\n" * 20
    if content in ("empty", "truncated", "text"):
        open(path, "wb").write(data)
    elif content == "foreign-dict":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content == "pickled-class":
        torch.save({"x": zipfile.ZipInfo("a")}, path)
    elif content == "future-version":
        torch.save(dict(load_checkpoint(path), version=99), path)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path)
    assert str(ei.value).startswith(path) and "\n" not in str(ei.value)


def test_damaged_checkpoint_through_the_command(tmp_path, capsys):
    """A run of 2 epochs leaves last.pt and previous.pt; a damaged last.pt is refused by --resume with
    one line (exit 2, no traceback) that offers previous.pt, from which the run continues."""
    argv = ["--subset", "64", "--batch-size", "32", "--epochs", "2", "--width", "8", "--hidden-dim", "8",
            "--proj-dim", "8", "--no-probe", "--no-plot", "--no-progress", "--eval-every", "0", "--knn-k", "3",
            "--output-dir", str(tmp_path / "cli")]
    assert cli.main(argv) == 0
    last, prev = tmp_path / "cli" / "last.pt", tmp_path / "cli" / "previous.pt"
    assert _state(last)["epoch"] == 2 and _state(prev)["epoch"] == 1
    _flip_tensor_byte(str(last), offset=3)
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        cli.main(argv + ["--resume"])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 2
    assert str(last) in err and "damaged" in err and f"--resume {prev}" in err
    assert cli.main(argv + ["--resume", str(prev)]) == 0
    assert _state(last)["epoch"] == 2


# ---------------------------------------------------------------------------------------------- output directory


def test_existing_run_is_not_overwritten_unless_asked(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for f in ("metrics.json", "previous.pt"):
        (out / f).write_text("the other run's")
    monkeypatch.setattr(trainer, "load_dataset", lambda *a, **k: pytest.fail("refused only after loading data"))
    with pytest.raises(ValueError, match="--output-dir: .* holds another run .*--overwrite"):
        train(tiny(tmp_path), log=quiet)
    with pytest.raises(SystemExit) as ei:
        cli.main(["--no-progress", "--output-dir", str(out)])
    assert ei.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == "the other run's"
    monkeypatch.undo()
    train(tiny(tmp_path, overwrite=True), log=quiet)
    assert json.load(open(out / "metrics.json"))["summary"]["global_step"] == 3
    assert not (out / "previous.pt").exists()  # the other run's files are gone, not mixed in
    with pytest.raises(ValueError, match="--overwrite: cannot be combined with --resume"):
        train(tiny(tmp_path, overwrite=True, resume="auto"), log=quiet)


def test_unwritable_output_dir_is_found_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "load_dataset", lambda *a, **k: pytest.fail("checked only after loading data"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="--output-dir: cannot create directory"):
        train(tiny(tmp_path, output_dir=str(blocker / "out")), log=quiet)
    with pytest.raises(ValueError, match="--export: cannot create directory"):
        train(tiny(tmp_path, export=str(blocker / "sub" / "enc.pt")), log=quiet)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_dir_is_found_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "load_dataset", lambda *a, **k: pytest.fail("checked only after loading data"))
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="--output-dir: cannot write in"):
            train(tiny(tmp_path, output_dir=str(ro)), log=quiet)
    finally:
        ro.chmod(0o755)


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
    err = capsys.readouterr().err
    assert option in err
    # one line saying what is wrong, one pointing to --help; not the usage block
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "usage:" not in err and "--help" in lines[1], err


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["--help"])
    assert ei.value.code == 0
    text = capsys.readouterr().out
    entries = text.split("\n  -")[1:]  # one per option (each starts on a line of its own)
    assert len(entries) > 30
    for entry in entries:
        assert entry.count("default") <= 1, entry
    assert "(default: None)" not in text and "--overwrite" in text and "--export" in text


def test_stop_after_exits_zero_with_a_message(tmp_path, capsys):
    rc = cli.main(["--subset", "64", "--batch-size", "32", "--epochs", "2", "--width", "8", "--hidden-dim", "8",
                   "--proj-dim", "8", "--no-probe", "--no-plot", "--no-progress", "--eval-every", "0",
                   "--knn-k", "3", "--stop-after-steps", "1", "--output-dir", str(tmp_path / "stop")])
    assert rc == 0
    assert "stopped as asked by --stop-after-steps" in capsys.readouterr().out
    assert _state(tmp_path / "stop" / "last.pt")["global_step"] == 1


def test_missing_train_extra_names_the_pip_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    assert cli.main(["--no-progress", "--output-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "scikit-learn" in err and "pip install 'infonce_kernels[train]'" in err
    assert len(err.strip().splitlines()) == 1


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


def test_temperature_modes_use_the_package_classes():
    """One temperature implementation: the trainer builds the package's classes (issue 12)."""
    assert not hasattr(train_temperature, "Temperature")
    fixed = build_temperature("fixed", 0.3, tau_min=0.05, t0=1.0, total_steps=10)
    assert isinstance(fixed, infonce_kernels.ConstantTemperature) and fixed.temperature_at(100) == 0.3
    t = build_temperature("log", 0.5, tau_min=0.1, t0=10, total_steps=1)
    assert isinstance(t, infonce_kernels.LogarithmicAnnealing)
    assert t.temperature_at(0) == pytest.approx(0.5)
    assert t.temperature_at(10) == pytest.approx(1 / (2 * math.log(math.e + 1)))
    assert t.temperature_at(10**9) == pytest.approx(0.1)  # capped at beta_max = 1/tau_min
    lin = build_temperature("linear", 0.5, tau_min=0.1, t0=1.0, total_steps=8)
    cos = build_temperature("cosine", 0.5, tau_min=0.1, t0=1.0, total_steps=8)
    assert [lin.temperature_at(s) for s in (0, 4, 8, 20)] == pytest.approx([0.5, 0.3, 0.1, 0.1])
    assert [cos.temperature_at(s) for s in (0, 4, 8, 20)] == pytest.approx([0.5, 0.3, 0.1, 0.1])
    assert cos.temperature_at(2) == pytest.approx(0.1 + 0.4 * (1 + math.cos(math.pi / 4)) / 2)
    lt = build_temperature("learnable", 0.5, tau_min=0.05, t0=1.0, total_steps=1)
    assert isinstance(lt, infonce_kernels.LearnableTemperature)
    tau = lt()
    assert tau.requires_grad and float(tau.detach()) == pytest.approx(0.5)
    assert set(lt.state_dict()) == {"log_scale"}  # the key the trainer's checkpoints always had
    with torch.no_grad():
        lt.log_scale.fill_(10.0)
    lt.clamp_()
    assert lt.value == pytest.approx(0.05)
    with pytest.raises(ValueError, match="--temperature-mode"):
        build_temperature("exponential", 0.5, tau_min=0.1, t0=1.0, total_steps=1)


def _history(taus):
    steps = [dict(step=i + 1, epoch=1, loss=5.0 - 0.1 * i, temperature=t) for i, t in enumerate(taus)]
    return {"steps": steps, "epochs": [dict(epoch=0, step=0, knn=0.5), dict(epoch=1, step=len(taus), knn=0.7)]}


def test_plot_draws_the_temperature_only_when_it_changes(tmp_path):
    plot_curves(str(tmp_path / "fixed.png"), _history([0.1] * 6), {"knn": 0.5})
    plot_curves(str(tmp_path / "annealed.png"), _history([0.5, 0.4, 0.3, 0.2, 0.1, 0.1]), {"knn": 0.5})
    assert _png_width(tmp_path / "fixed.png") == 1000  # two panels: loss, accuracy
    assert _png_width(tmp_path / "annealed.png") == 1500  # three: loss, temperature, accuracy


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
        assert largest["largest"] == 32 and largest["limit"] == "--max-batch"  # --quick: 16 and 32 fit
