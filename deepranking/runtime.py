"""Where and how the arithmetic runs: device, precision, memory format, determinism, seeding.

One function decides each policy, for training and embedding alike:

* :func:`pick_device` — ``auto`` is CUDA when available, else CPU.
* :func:`resolve_precision` — ``--amp auto``: bf16 autocast on a CUDA GPU that has it,
  fp16 autocast *with loss scaling* (``GradScaler``) on one that does not, fp32 on CPU.
* :func:`memory_format` — channels_last: on the CPU about NCHW's time to train (0.89-1.12) and
  faster to embed (0.73-0.92, ``bench/bench_memory_format.py``); what GPUs' tensor cores want.
* :func:`configure_determinism` — ``--deterministic`` turns on PyTorch's deterministic
  algorithms and the cuDNN flags; without it cuDNN may pick the fastest (autotuned) kernels.
* :func:`seed_everything` — ``--seed`` seeds Python, NumPy and torch.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from deepranking.cli import UserError

AMP_CHOICES = ("auto", "on", "off")


def pick_device(name: str = "auto") -> torch.device:
    """Resolve ``auto`` to CUDA when available, else CPU; validate explicit names."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r} (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None: fp32) and whether the loss must be scaled (fp16 only)."""

    dtype: torch.dtype | None
    device_type: str

    @property
    def needs_loss_scaling(self) -> bool:
        # fp16 gradients underflow without scaling; bf16 has fp32's exponent range and needs none.
        return self.dtype == torch.float16

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        """Context for the forward pass (a no-op in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """The scaler every training step goes through; disabled (a pass-through) unless fp16."""
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_loss_scaling)


def resolve_precision(device: torch.device | str, amp: str = "auto", dtype: torch.dtype | None = None) -> Precision:
    """The precision policy. amp: auto (mixed precision on CUDA only), on, off.

    ``dtype`` forces an autocast dtype (tests use it to run the fp16 + GradScaler path on CPU).
    """
    device = torch.device(device)
    if amp not in AMP_CHOICES:
        raise UserError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if dtype is not None:
        return Precision(dtype, device.type)
    on = device.type == "cuda" if amp == "auto" else amp == "on"
    if not on:
        return Precision(None, device.type)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Precision(torch.float16, device.type)  # pre-Ampere GPU: fp16 + loss scaling
    return Precision(torch.bfloat16, device.type)


def memory_format(device: torch.device | str) -> torch.memory_format:
    """channels_last, for training and embedding, on CUDA and CPU alike.

    CUDA: cuDNN's tensor-core kernels want NHWC. CPU (torch 2.14, oneDNN, 2 cores;
    ``python bench/bench_memory_format.py``): channels_last/NCHW time 0.73-0.92 for embedding and
    0.89-1.12 for training at 32-64 px, so NCHW buys nothing. Re-measure before changing this.
    """
    torch.device(device)  # validates the name; one answer for every device today
    return torch.channels_last


def configure_determinism(deterministic: bool, device: torch.device | str) -> None:
    """--deterministic: bit-identical reruns on the same GPU and software (slower); else allow autotuning.

    On CPU our ops are deterministic either way (same seed -> same weights).
    """
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic GEMMs (set before the first CUDA call).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    else:
        torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = deterministic
    # Autotuning picks kernels by timing, which can differ run to run.
    torch.backends.cudnn.benchmark = (not deterministic) and torch.device(device).type == "cuda"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that a run is reproducible."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
