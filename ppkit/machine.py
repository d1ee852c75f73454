"""What machine a measurement ran on, and whether it can run the requested device.

Recorded beside every benchmark: the CPU and its int8 / bf16 instruction sets (they
decide whether int8 or bf16 pays off), the cores this process may use, and the library versions.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import InputError

DEVICES = ("cpu", "cuda")


def available_cores() -> int:
    """Number of CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _cpuinfo(field: str) -> str | None:
    """The first value of ``field`` in /proc/cpuinfo (None where there is no such file or field)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo where there is one)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


#: CPU flags that give onnxruntime's int8 matmuls dedicated instructions (int8 gains much more with them)
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


#: CPU flags that make bf16 matmuls fast (``finetune --precision bf16`` on a CPU)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_features(wanted: tuple[str, ...]) -> list[str]:
    """Which of the CPU flags ``wanted`` this CPU has (empty where /proc/cpuinfo is missing)."""
    flags = set((_cpuinfo("flags") or "").split())
    return [f for f in wanted if f in flags]


def cpu_int8_features() -> list[str]:
    """Which of :data:`INT8_CPU_FLAGS` this CPU has."""
    return cpu_features(INT8_CPU_FLAGS)


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Machine and library versions recorded with every benchmark."""
    import onnxruntime
    import transformers

    from . import __version__

    cpu = cpu_name()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_int8_features": cpu_int8_features(),
        "cpu_bf16_features": cpu_features(BF16_CPU_FLAGS),
        "cores_available": available_cores(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "ort_providers": onnxruntime.get_available_providers(),
        "ppkit": __version__,
    }
    try:
        import onnx

        info["onnx"] = onnx.__version__
    except ImportError:  # pragma: no cover - onnx is a dependency
        pass
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def check_device(device: str, backends: Sequence[str]) -> None:
    """Raise :class:`InputError` when ``device`` cannot run the requested backends here."""
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}: use 'cpu' or 'cuda'")
    if device != "cuda":
        return
    if "torch" in backends and not torch.cuda.is_available():
        raise InputError(
            "device='cuda' but torch has no CUDA device (torch "
            f"{torch.__version__}); install a CUDA build of torch or use device='cpu'"
        )
    if "ort" in backends:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InputError(
                "device='cuda' with backend 'ort' needs onnxruntime-gpu (CUDAExecutionProvider), but this "
                f"onnxruntime {ort.__version__} only has {', '.join(ort.get_available_providers())}; "
                "install it with `pip install 'ppkit[gpu]'` (onnxruntime-gpu and a matching CUDA/cuDNN), "
                "or use backend='torch' or device='cpu'"
            )
