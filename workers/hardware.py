"""What this machine has (reported at enrollment) and which device the agent trains on."""

from __future__ import annotations

import os

import psutil


class DeviceError(Exception):
    """No usable device for training with the given options; the message says what to do."""


def detect_hardware() -> dict:
    """The protocol's ``hardware`` object: every CUDA GPU (name, memory), CPUs, RAM, torch and CUDA versions.

    ``cuda`` is the CUDA version torch was built with when a GPU is usable, else ``None``.
    """
    import torch

    gpus = []
    cuda_ok = torch.cuda.is_available()
    if cuda_ok:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"name": props.name, "memory_mb": int(props.total_memory // 2**20)})
    return {
        "gpus": gpus,
        "cpu_count": os.cpu_count() or psutil.cpu_count(logical=True) or 1,
        "memory_mb": int(psutil.virtual_memory().total // 2**20),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda_ok else None,
    }


def parse_gpu_list(text: str | None) -> list[int] | None:
    """``"0,1"`` -> ``[0, 1]``; ``None`` or ``""`` -> ``None`` (all GPUs)."""
    if not text:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise DeviceError(f"--gpus takes GPU indices separated by commas (e.g. 0,1), not {text!r}")
        if int(part) not in out:
            out.append(int(part))
    return out


def choose_device(*, gpus: list[int] | None, allow_cpu: bool, cuda_count: int | None = None) -> str:
    """The torch device string the agent trains on.

    A task runs on one device: the first GPU of ``gpus`` (all GPUs when not given). Without a usable GPU
    the agent trains on the CPU only with ``allow_cpu``; asking for GPUs that do not exist is an error.
    """
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus is not None:
        missing = [i for i in gpus if i >= cuda_count]
        if missing:
            have = f"GPUs 0..{cuda_count - 1}" if cuda_count else "no CUDA GPU"
            raise DeviceError(f"--gpus asks for GPU {', '.join(map(str, missing))} but this machine has {have}")
        return f"cuda:{gpus[0]}"
    if cuda_count > 0:
        return "cuda:0"
    if allow_cpu:
        return "cpu"
    raise DeviceError(
        "no CUDA GPU found. Training on the CPU is slow and only runs that allow it will send work; "
        "start with --allow-cpu to do it anyway"
    )


# --- idle detection (for --idle-only) -------------------------------------------------------------

def gpu_processes(exclude_pids: set[int] | None = None) -> list[int] | None:
    """PIDs of compute processes on the NVIDIA GPUs other than ours, from ``nvidia-smi``; ``None`` when that
    cannot be known (no ``nvidia-smi``, or it failed)."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-compute-apps=pid", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    exclude = exclude_pids if exclude_pids is not None else {os.getpid()}
    return [int(p) for p in out.split() if p.strip().isdigit() and int(p) not in exclude]


def busy_reason(*, cpu_threshold: float = 30.0, sample_s: float = 1.0) -> str | None:
    """Why the machine is not idle, or ``None`` when it is.

    Idle means: system-wide CPU use over ``sample_s`` seconds below ``cpu_threshold`` percent, and no
    other process computing on an NVIDIA GPU (when ``nvidia-smi`` can tell; otherwise only the CPU counts).
    The agent itself is idle while it checks, so its own load does not count.
    """
    load = psutil.cpu_percent(interval=sample_s)
    if load >= cpu_threshold:
        return f"CPU busy ({load:.0f}% >= {cpu_threshold:.0f}%)"
    others = gpu_processes()
    if others:
        return f"GPU in use by process {', '.join(map(str, others[:5]))}"
    return None
