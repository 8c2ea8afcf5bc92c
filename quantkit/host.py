"""Facts about this machine: CPU model and ISA flags, NVIDIA GPU presence and name.

Every /proc/cpuinfo read of quantkit's own process goes through here. Standard library only:
``quantkit/buildflags.py`` imports it when scripts/install.sh runs that file by path, before
quantkit is installed. (The worker scripts run in other environments — validate/vllm_worker.py,
quantize/vllm/llmc_worker.py — cannot import quantkit; none of them reads /proc/cpuinfo.)
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
SMI_TIMEOUT_S = 20  # nvidia-smi can take seconds while the driver wakes a GPU up

# The flags that decide which kernels an engine can run here (llama.cpp's ISA switches, vLLM's
# AVX-512 / AMX libraries): what host keys and verdict caches are made of.
KERNEL_FLAG_PREFIXES = ("avx", "amx", "fma", "f16c", "bmi2", "sse4")


def _cpuinfo() -> str:
    try:
        return CPUINFO.read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The ISA flags of the first CPU listed in /proc/cpuinfo (or in the text given)."""
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def kernel_flags() -> list[str]:
    return sorted(f for f in cpu_flags() if f.startswith(KERNEL_FLAG_PREFIXES))


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (else what the platform module says)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name") and ":" in line:
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def has_cuda() -> bool:
    """Whether this host has an NVIDIA GPU with a driver loaded.

    Decided from the host, not from torch: quantkit's own venv always holds the CPU torch wheel,
    so ``torch.cuda.is_available()`` there says nothing about the machine. The kernel driver lists
    every GPU under /proc/driver/nvidia/gpus; ``nvidia-smi -L`` covers containers that get the
    device nodes without that proc entry. QUANTKIT_CUDA=0/1 overrides the guess."""
    forced = os.environ.get("QUANTKIT_CUDA")
    if forced in ("0", "1"):
        return forced == "1"
    if NVIDIA_GPUS.is_dir() and any(NVIDIA_GPUS.iterdir()):
        return True
    out = _smi("-L")
    return out is not None and "GPU" in out


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name as nvidia-smi gives it; None without nvidia-smi or a GPU."""
    out = _smi("--query-gpu=name", "--format=csv,noheader")
    return out.strip().splitlines()[0] if out and out.strip() else None


def gpu_count() -> int:
    """NVIDIA GPUs on this host (0 without any): the driver's /proc entries, else nvidia-smi's
    list. ``CUDA_VISIBLE_DEVICES``, when set, bounds what a process may use."""
    if not has_cuda():
        return 0
    n = len(list(NVIDIA_GPUS.iterdir())) if NVIDIA_GPUS.is_dir() else 0
    if n == 0:
        out = _smi("-L")
        n = sum(1 for ln in (out or "").splitlines() if ln.startswith("GPU"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        n = min(n, len([d for d in visible.split(",") if d.strip()]))
    return n


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a cgroup or taskset may exclude
    some of the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _smi(*args: str) -> str | None:
    """nvidia-smi's stdout, None when it is absent or fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        r = subprocess.run([smi, *args], capture_output=True, text=True, timeout=SMI_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None
