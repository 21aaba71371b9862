"""CPU dry run of scripts/gpu_first_run (the first-run GPU check of issue 16).

On CPU every stage either runs with tiny sizes (env, the cpu backend's correctness against
float64, the headline benchmark's CLI) or writes a file saying it needs a GPU (build, CUDA
tests); every stage leaves its line in stages.jsonl as it finishes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_first_run")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("bash and coreutils' timeout are needed to run scripts/gpu_first_run")
    out = tmp_path_factory.mktemp("gpu_first_run")
    env = dict(os.environ)
    r = subprocess.run([SCRIPT, "--dry-run", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    return r, out, {s["stage"]: s for s in stages}


def test_every_stage_reports(dry_run):
    r, out, stages = dry_run
    assert list(stages) == ["env", "build", "correctness_cpu", "siglip_baseline", "bench_nt_xent", "bench_clip",
                            "siglip", "cuda_tests"], stages
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("build", "cuda_tests"):                 # what a CPU cannot do is said, in its own file
        assert stages[name]["needs_gpu"] is True
        assert json.loads((out / f"{name}.json").read_text())["status"] == "NEEDS_GPU"


def test_env_records_versions_and_commit(dry_run):
    _, out, _ = dry_run
    env = json.loads((out / "env.json").read_text())
    import torch  # noqa: PLC0415
    assert env["torch"] == torch.__version__ and env["dry_run"] is True
    assert env["commit"] and "triton" in env and "nvidia_smi" in env


def test_correctness_against_float64(dry_run):
    _, out, stages = dry_run
    recs = [json.loads(line) for line in (out / "correctness.jsonl").read_text().splitlines()]
    cases = {r["case"] for r in recs}
    assert cases == {"symmetric_odd_E1", "general_d200_E2", "general_tau0.01", "clip_d512", "clip_odd_B999"}
    assert all(r["status"] == "ok" for r in recs), [r for r in recs if r["status"] != "ok"]
    assert stages["correctness_cpu"]["rc"] == 0
    odd = next(r for r in recs if r["case"] == "clip_odd_B999")
    assert odd["B"] % 2 == 1


def test_bench_results_written(dry_run):
    _, out, stages = dry_run
    for kind in ("nt_xent", "clip"):
        assert stages[f"bench_{kind}"]["rc"] == 0
        results = json.loads((out / f"bench_{kind}" / "cpu.json").read_text())
        assert results, kind


def test_siglip_stage(dry_run):
    # the pairwise sigmoid check: Triton (interpreter) against float64, then the fwd+bwd benchmark
    _, out, stages = dry_run
    assert stages["siglip"]["rc"] == 0
    recs = [json.loads(line) for line in (out / "siglip.jsonl").read_text().splitlines()]
    corr = [r for r in recs if r["part"] == "correctness" and r["backend"] == "triton"]
    assert {r["case"] for r in corr} == {"offset_-3", "labels"} and all(r["status"] == "ok" for r in corr), corr
    bench = {r["provider"]: r for r in recs if r["part"] == "bench"}
    assert bench["triton"]["status"] == "ok" and bench["materialised:fp32"]["status"] == "ok", bench
    assert bench["cuda"]["status"] == "unavailable" and bench["cuda"]["why"]
    # the siglip-kernel baseline's timing: its kernels need CUDA tensors, which is recorded
    assert bench["siglip_kernel"]["status"] == "unavailable" and bench["siglip_kernel"]["why"], bench


def test_siglip_baseline_stage(dry_run):
    # siglip-kernel from the carried wheel folder: installed, or "not installed" with the reason
    # (CI has no .gpu_wheels/); its correctness record says why it cannot run on CPU; never a failure
    _, out, stages = dry_run
    assert stages["siglip_baseline"]["rc"] == 0
    recs = [json.loads(line) for line in (out / "siglip.jsonl").read_text().splitlines()]
    (install,) = [r for r in recs if r["part"] == "install"]
    assert install["status"] in ("installed", "not installed") and install["wheels"].endswith(".gpu_wheels")
    assert install["status"] == "installed" or "fetch_gpu_baselines.sh" in install["why"] or \
        install["why"].startswith("pip"), install
    (corr,) = [r for r in recs if r["part"] == "correctness" and r["backend"] == "siglip_kernel"]
    assert corr["status"] == "unavailable" and corr["why"].startswith(("not installed", "not importable", "its kernels")), corr


def test_worst_case_fits_seven_minutes():
    # issue 16 item 4: the GPU command's stage limits (the build window's parallel stages counted
    # once, every later stage in sequence, each with its --kill-after grace) stay under 7 minutes
    # with margin, and the SigLIP stage keeps the headline case (B = 65,536, d = 768, bf16)
    text = open(SCRIPT).read()
    limits = {m.group(1).strip('"'): int(m.group(2)) for m in re.finditer(r'stage ("?[\w$]+"?) (\d+) ', text)}
    grace = int(re.search(r"--kill-after=(\d+)", text).group(1))
    window = max(limits["build"], limits["correctness_triton_$dt"], limits["siglip_correctness_triton"],
                 limits["siglip_baseline"])
    later = ["env", "correctness_cuda", "bench_nt_xent", "bench_clip", "siglip", "cuda_tests"]
    worst = window + sum(limits[n] for n in later) + grace * (len(later) + 1)
    assert worst <= 400, (worst, limits)
    gpu_siglip = open(os.path.join(ROOT, "scripts", "gpu_siglip.py")).read()
    for flag, default in (("--rows", "65536"), ("--dim", "768"), ("--bench-dtype", '"bf16"')):
        assert re.search(rf'"{flag}".*default={default}', gpu_siglip), flag
    gpu_line = text[text.rindex("stage siglip "):].split("\n")[0:2]
    assert not any(f in " ".join(gpu_line) for f in ("--rows", "--dim", "--parts")), gpu_line
    # the GPU command's siglip-kernel stage runs in the build window (its limit the window's) and
    # the exit status leaves it out: a baseline never fails the check
    assert text.rindex("stage siglip_baseline ") < text.index("\n  wait\n")
    assert """grep -v '"stage": "siglip_baseline"'""" in text.splitlines()[-1]
