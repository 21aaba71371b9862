"""A description of the machine and software a benchmark ran on."""

import os
import platform
import subprocess
import sys

import torch


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit():
    """The commit of the infonce_kernels being measured: HEAD of the checkout that holds it (with
    "-dirty" for uncommitted changes to tracked files), or $INFONCE_COMMIT where the tree is a copy
    without .git (e.g. a device machine); None for an installed copy outside a checkout."""
    if os.environ.get("INFONCE_COMMIT"):
        return os.environ["INFONCE_COMMIT"]
    import infonce_kernels

    package = os.path.dirname(os.path.abspath(infonce_kernels.__file__))

    def git(*args):
        out = subprocess.run(["git", "-C", package, *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()

    try:
        top = git("rev-parse", "--show-toplevel")
        # a venv inside some other repository is not the package's checkout
        if not top or os.path.realpath(os.path.join(top, "infonce_kernels")) != os.path.realpath(package):
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _package_version():
    try:
        from importlib.metadata import version

        return version("infonce_kernels")
    except Exception:  # noqa: BLE001 - a source tree on PYTHONPATH, not installed
        return None


def describe(device="cpu"):
    info = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "infonce_kernels": _package_version(),
        "git_commit": _git_commit(),
        # 1, 5 and 15 minute load averages: on a shared machine the timings scale with them
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    for name in ("lightly", "pytorch_metric_learning", "inf_cl"):
        try:
            mod = __import__(name)
            info[name] = getattr(mod, "__version__", "installed")
        except Exception:  # noqa: BLE001 - absent or broken: not a peer here
            info[name] = None
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu_name=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                    gpu_capability=f"{props.major}.{props.minor}")
    else:
        info["gpu_name"] = None
    return info
