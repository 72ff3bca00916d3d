"""Measuring training speed: a step-phase timer the loop and plugins report into, model FLOPs
(``torch.utils.flop_counter``), peak memory, and model-FLOPs utilisation against a device peak.

The timer is off in normal training (a shared no-op object, no synchronisation); ``ldm-lab
bench`` turns it on. Phases nest: time spent in a child phase (the autoencoder inside the
forward pass) is subtracted from its parent, so the parts add up to the step.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16/fp16 tensor-core peak (TFLOP/s) by device-name substring; fp32 peaks where the
# device has no faster path. Sources: vendor data sheets (SXM parts).
DEVICE_PEAK_TFLOPS = {  # the first matching key wins: PCIe parts before their SXM name
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "A100-PCIE": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}


class Phases:
    """Wall time per named phase, per step. ``enabled=False`` makes every call a no-op."""

    def __init__(self, enabled: bool = True, device: torch.device | str = "cpu"):
        self.enabled = enabled
        self.cuda = torch.device(device).type == "cuda"
        self.steps: list[dict[str, float]] = []
        self._current: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []  # [start, child time]

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def phase(self, name: str):
        return self._phase(name) if self.enabled else nullcontext()

    @contextmanager
    def _phase(self, name: str):
        self._sync()
        frame = [time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._sync()
            self._stack.pop()
            total = time.perf_counter() - frame[0]
            self._current[name] += total - frame[1]
            if self._stack:
                self._stack[-1][1] += total

    def end_step(self, samples: int) -> None:
        if self.enabled:
            self.steps.append({**self._current, "samples": samples})
            self._current = defaultdict(float)

    def summary(self, skip: int = 0) -> dict:
        """Mean seconds per step of every phase over the steps after the first ``skip``."""
        steps = self.steps[skip:]
        if not steps:
            return {}
        keys = sorted({k for s in steps for k in s if k != "samples"})
        return {k: sum(s.get(k, 0.0) for s in steps) / len(steps) for k in keys}


OFF = Phases(enabled=False)


def model_flops(fn, *args, **kwargs) -> int:
    """FLOPs of ``fn(*args, **kwargs)`` (forward and whatever backward it runs), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions)."""

    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def denoiser_train_flops(net, forward, latent_shape: tuple[int, ...], cond_shape: tuple[int, ...], device,
                         dtype=torch.float32) -> int:
    """FLOPs of one denoiser forward + backward on a batch of ``latent_shape`` (B, C, h, w) with token
    states ``cond_shape`` (B, L, D): the model FLOPs of a training step (weights untouched).
    ``forward(x_t, t, states)`` calls the backbone ``net`` through its denoiser adapter.
    Counted on one sample and scaled (FLOPs are linear in the batch; one sample keeps the extra
    pass's memory small), without gradient checkpointing's recomputed forward."""
    batch = latent_shape[0]
    latent_shape, cond_shape = (1, *latent_shape[1:]), (1, *cond_shape[1:])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(latent_shape, generator=g).to(device, dtype)
    c = torch.randn(cond_shape, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (1,), generator=g).to(device)
    checkpointing = getattr(net, "is_gradient_checkpointing", False)
    if checkpointing:
        net.disable_gradient_checkpointing()

    def step():
        out = forward(x, t, c)
        out.float().pow(2).mean().backward()

    # the global RNG (LoRA dropout draws from it) is left as it was, so a resumed run stays exact
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            flops = model_flops(step)
    finally:
        net.zero_grad(set_to_none=True)
        if checkpointing:
            net.enable_gradient_checkpointing()
    return flops * batch


def peak_tflops(device: torch.device | str, precision: str, given: float | None = None) -> tuple[float | None, str]:
    """The device's peak for ``precision`` (bf16/fp16/tf32/fp32) and where it came from."""
    if given:
        return given, "given"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in DEVICE_PEAK_TFLOPS.items():
            if key in name:
                p = peaks.get(precision) or peaks.get("fp32")
                return p, f"{key} {precision} data sheet"
        return None, f"unknown device {name}: pass --peak-tflops"
    return None, "CPU: pass --peak-tflops for a utilisation figure"


def device_name() -> str:
    """The device a benchmark ran on, in words: the GPU's name, or the CPU's model, the vector
    instructions PyTorch's kernels use on it and the thread count (hosts of one machine type differ:
    the same recipe ran 2.6x faster on an AVX-512/AMX host than on an AVX2 one)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()

    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown model"
    # what decides whether bf16 can be fast here: matrix units and bf16 vector instructions
    extra = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    isa = ", ".join([torch.backends.cpu.get_cpu_capability(), *extra])
    return f"cpu: {model}, {isa}, {torch.get_num_threads()} threads"


def precision_of(mixed_precision: str, tf32: bool) -> str:
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    return "tf32" if tf32 and torch.cuda.is_available() else "fp32"


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# what ``system`` sets after ``reuse`` changed this process: glibc cannot be put back to its dynamic
# mmap threshold once it was set, so the top of that dynamic range (32 MiB on 64-bit) is used, with
# a trim threshold of twice that, which is where the dynamic policy settles for large buffers
_SYSTEM_MMAP_THRESHOLD, _SYSTEM_TRIM_THRESHOLD = 32 << 20, 64 << 20
_host_allocator_tuned = False


def _glibc():
    """The process's C library when it is glibc and no other allocator is preloaded, else None."""

    if not sys.platform.startswith("linux"):
        return None  # macOS/Windows: another C library (ctypes.CDLL(None) is refused on Windows)
    if any(a in os.environ.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc", "mimalloc")):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError off glibc (musl)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except Exception:  # any failure to reach the C library leaves the allocator alone
        return None


def resolve_host_allocator(mode: str, device_type: str) -> str:
    """``train.host_allocator`` for a device: ``auto`` is ``reuse`` on the CPU (the measured win:
    docs/performance.md) and ``system`` elsewhere (the process-wide glibc thresholds are not changed
    on a GPU host, where host memory is not the training step's working memory)."""
    if mode != "auto":
        return mode
    return "reuse" if device_type == "cpu" else "system"


def host_allocator(mode: str) -> str:
    """Set this process's host-memory policy; returns one line saying what was done.

    ``reuse``: glibc returns every freed block above 128 KiB (mmap threshold, adjusted
    dynamically up to 32 MiB) or above the trim threshold at the heap top to the kernel, so each
    training step maps its activation buffers afresh and page-faults tens of megabytes of zeroed
    pages (about 10,000 minor faults per step for the shapes UNet at batch 32). Raising both
    thresholds keeps freed memory in the process for the next step: no faults, same peak. The
    effect of jemalloc/tcmalloc, without preloading a library. Older glibc (before 2.36) caps the
    mmap threshold at 32 MiB, so buffers above that are still mapped per step there. The policy is
    per process: every rank and dataloader worker keeps its own freed memory.

    ``system`` trims the heap and, in a process that ``reuse`` already changed, sets fixed
    thresholds (mmap 32 MiB, trim 64 MiB): glibc has no call that restores its dynamic policy."""
    global _host_allocator_tuned
    libc = _glibc()
    if libc is None:
        return "host allocator: not glibc (or an allocator is preloaded); left as is"
    if mode == "reuse":
        # glibc accepts an mmap threshold up to its heap size limit; older versions cap it at 32 MiB
        big = next((v for v in (1 << 30, 1 << 25) if libc.mallopt(_M_MMAP_THRESHOLD, v) == 1), None)
        if big is None:
            return "host allocator: glibc refused the mmap threshold; left as is"
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        _host_allocator_tuned = True
        return f"host allocator: glibc keeps freed memory for reuse (mmap threshold {big >> 20} MiB, trim 1 GiB)"
    libc.malloc_trim(0)
    if _host_allocator_tuned:
        mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, _SYSTEM_MMAP_THRESHOLD) == 1
        trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, _SYSTEM_TRIM_THRESHOLD) == 1
        if not (mmap_ok and trim_ok):
            return "host allocator: glibc refused the fixed thresholds; the reuse policy set earlier in this process stays"
        _host_allocator_tuned = False
        return "host allocator: glibc with fixed thresholds (mmap 32 MiB, trim 64 MiB; reuse was set earlier in this process)"
    return "host allocator: glibc defaults"


def release_host_memory() -> None:
    """Return free heap memory to the kernel (between benchmark rows, so each starts trimmed)."""

    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory during a ``with`` block: CUDA max allocated on a GPU, else resident set size
    sampled every 5 ms (and its rise over the start)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.peak = self.start = 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start = self.peak = _rss_bytes()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, _rss_bytes())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())
        return False

    @property
    def kind(self) -> str:
        return "GPU max allocated" if self.cuda else "RSS"
