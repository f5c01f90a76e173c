"""Measuring speed honestly: FLOPs, the device's matmul peak, interleaved timing, and the switches that
turn the project's optimisations off (the baseline) or on.

`scripts/benchmark.py` builds workloads from these pieces. Conventions:
- FLOPs are real floating-point operations (a multiply-accumulate counts 2), as
  `torch.utils.flop_counter.FlopCounterMode` counts them. The DiT paper's "118.6 GFLOPs" for DiT-XL/2 is
  fvcore's count, which counts one MAC as one flop: `dit_forward_macs` reproduces that number and
  `dit_forward_flops` = 2 x it.
- MFU = achieved model FLOP/s / the dense matmul FLOP/s measured on the same device in the same run
  (bf16 on CUDA, fp32 on CPU), so it says how far a workload is from what this device really does.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from util.precision import PRECISIONS, tf32_enabled


# ----------------------------------------------------------------------------------------------
# What a mode switches on
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModeConfig:
    """One column of the benchmark. The defaults are the plain baseline (what the official repos run).

    precision:     autocast dtype of the networks ("fp32" = no autocast; "fp16" adds a grad scaler).
    tf32:          TF32 matmuls/convs for the fp32 parts (CUDA only).
    attention:     "math" = explicit softmax(QK^T)V as official DiT/MAE's timm did; "sdpa" =
                   F.scaled_dot_product_attention (flash / memory-efficient kernels on CUDA).
    optimizer:     AdamW implementation: "loop" (one parameter at a time), "foreach" or "fused".
    ema:           "loop" (official DiT's per-parameter update) or "foreach" (util.ema.update_ema).
    latent_cache:  feed cached latents instead of encoding images with the VAE inside the step.
    channels_last: NHWC convolutions for the VAE / Inception networks.
    compile:       torch.compile the trained / sampled network.
    grad_ckpt:     recompute transformer blocks in the backward pass (saves memory, costs ~1/3 more compute).
    static_graph:  DDP(static_graph=True, gradient_as_bucket_view=True) when the step runs under DDP.
    pin_memory:    page-locked host batches copied with non_blocking=True (CUDA only).
    """

    name: str = "baseline"
    precision: str = "fp32"
    tf32: bool = False
    attention: str = "math"
    optimizer: str = "loop"
    ema: str = "loop"
    latent_cache: bool = False
    channels_last: bool = False
    compile: bool = False
    grad_ckpt: bool = False
    static_graph: bool = False
    pin_memory: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {sorted(PRECISIONS)}; pick one of those.")
        if self.attention not in ("math", "sdpa"):
            raise ValueError(f"attention {self.attention!r} is not 'math' or 'sdpa'; pick one of those.")
        if self.optimizer not in ("loop", "foreach", "fused"):
            raise ValueError(f"optimizer {self.optimizer!r} is not 'loop', 'foreach' or 'fused'; pick one of those.")
        if self.ema not in ("loop", "foreach"):
            raise ValueError(f"ema {self.ema!r} is not 'loop' or 'foreach'; pick one of those.")

    def with_(self, **changes) -> "ModeConfig":
        return replace(self, **changes)

    def describe(self) -> str:
        """Short human-readable list of what differs from the baseline."""
        base = ModeConfig()
        parts = [f"{key}={getattr(self, key)}" for key in self.__dataclass_fields__
                 if key != "name" and getattr(self, key) != getattr(base, key)]
        return ", ".join(parts) or "plain fp32 eager"


def set_attention(model: nn.Module, attention: str) -> int:
    """Switches every timm attention module of `model` to SDPA ("sdpa") or explicit math ("math").

    timm decides per instance through the `fused_attn` attribute; returns how many modules were set.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = attention == "sdpa"
            count += 1
    return count


def enable_gradient_checkpointing(blocks: Iterable[nn.Module]) -> None:
    """Recomputes each block's activations in the backward pass instead of storing them.

    Done per instance (the block's bound forward wrapped in torch.utils.checkpoint), so parameter names
    and state dicts are untouched and official checkpoints still load.
    """
    for block in blocks:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        block.forward = checkpointed


def build_adamw(params, lr: float, implementation: str, device: torch.device, **kwargs) -> torch.optim.AdamW:
    """AdamW as "loop" (foreach=False: one parameter at a time), "foreach" or "fused" (CUDA and CPU)."""
    flags = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[implementation]
    return torch.optim.AdamW(params, lr=lr, **flags, **kwargs)


def perturb_(model: nn.Module, std: float, seed: int) -> None:
    """Adds N(0, std) to every trainable weight, so zero-initialised layers (adaLN-Zero) compute something.

    Used by the equivalence test: a fresh DiT outputs zeros, which every precision reproduces exactly.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * std)


def prepare_network(model: nn.Module, mode: ModeConfig, device: torch.device, blocks_attr: str = "blocks",
                    ddp: bool = False):
    """Moves `model` to `device` with the mode's attention / checkpointing / DDP / compile. Returns the
    module that runs forward (possibly wrapped)."""
    model.to(device)
    set_attention(model, mode.attention)
    if mode.grad_ckpt:
        for attr in blocks_attr.split(","):
            enable_gradient_checkpointing(getattr(model, attr))
    network = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        network = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      static_graph=mode.static_graph, gradient_as_bucket_view=mode.static_graph)
    if mode.compile:
        network = torch.compile(network)
    return network


def host_batch(batch: Dict[str, torch.Tensor], mode: ModeConfig, device: torch.device) -> Dict[str, torch.Tensor]:
    """The batch as a data loader would hand it over: in host memory, page-locked if the mode pins."""
    if mode.pin_memory and device.type == "cuda":
        return {key: value.pin_memory() for key, value in batch.items()}
    return batch


def in_mode(mode: ModeConfig, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`fn` run with the mode's global switches (TF32) set, so interleaved modes do not leak into each other."""
    def run():
        with tf32_enabled(mode.tf32):
            return fn()
    return run


@dataclass
class Workload:
    """One row group of the table: what runs, how many images a call handles, and its FLOPs per image.

    runners: mode name -> a call doing one unit of work (a training step, a full sampling run, one
    encoder batch) that returns a device tensor (the step's loss, the samples, the features).
    """

    name: str
    config: str
    images_per_call: int
    flops_per_image: Optional[float]
    runners: Dict[str, Callable[[], torch.Tensor]]
    notes: str = ""
    extra_modes: List[ModeConfig] = field(default_factory=list)  # this workload's own extra columns
    extra: dict = field(default_factory=dict)
    modes: Optional[List[ModeConfig]] = None  # a workload's own columns (repa: its four variants); None = the modes



@torch.no_grad()
def update_ema_loop(ema_model: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """Official DiT's EMA: two small kernels per parameter, launched from a Python loop (the baseline)."""
    model_params = dict(getattr(model, "module", model).named_parameters())
    for name, param in ema_model.named_parameters():
        param.mul_(decay).add_(model_params[name].detach(), alpha=1 - decay)


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------

def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations (MAC = 2) that `fn()` dispatches, counted by shape (nothing is timed)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def dit_forward_macs(hidden_size: int, depth: int, tokens: int, mlp_ratio: float = 4.0) -> int:
    """Multiply-accumulates of one DiT forward per image, counted the way the DiT paper (fvcore) does.

    Per block: qkv 3D^2T + proj D^2T + MLP 2*ratio*D^2T + attention scores/values 2T^2D + adaLN 6D^2.
    Embedders and the final layer are < 0.5% and left out, as in the paper. DiT-XL/2 at 256 px
    (D=1152, depth 28, T=256) gives 118.6e9.
    """
    d, t = hidden_size, tokens
    per_block = (4 + 2 * mlp_ratio) * d * d * t + 2 * t * t * d + 6 * d * d
    return int(depth * per_block)


def dit_forward_flops(hidden_size: int, depth: int, tokens: int, mlp_ratio: float = 4.0) -> int:
    """Real FLOPs (2 per MAC) of one DiT forward per image; a training step costs ~3x this."""
    return 2 * dit_forward_macs(hidden_size, depth, tokens, mlp_ratio)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finish(result) -> None:
    """Waits for a step's work: reading a device tensor drains the queue (and surfaces NaNs early)."""
    if torch.is_tensor(result):
        result.float().sum().item()


def measure_matmul_peak(device: torch.device, dtype: Optional[torch.dtype] = None, size: Optional[int] = None,
                        min_seconds: float = 0.5) -> dict:
    """Dense (size x size) @ (size x size) throughput on `device`: {"tflops", "dtype", "size"}.

    bf16 at 8192 on CUDA (large enough to saturate tensor cores), fp32 at 1024 on CPU (MKL/oneDNN reach
    their plateau there and it stays fast on 2 cores). The best of several timed calls is kept: the peak
    is what the hardware can do, not an average over the neighbours' load.
    """
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    flops = 2 * size ** 3
    for _ in range(2):  # warm-up: kernel selection, clocks
        torch.mm(a, b)
    synchronize(device)
    best, spent = float("inf"), 0.0
    calls = 0
    while spent < min_seconds or calls < 3:
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        elapsed = time.perf_counter() - start
        best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
    return {"tflops": flops / best / 1e12, "dtype": str(dtype).replace("torch.", ""), "size": size}


@dataclass
class Timings:
    """Seconds per call of one mode, one entry per repeat (wall clock and this process's CPU time)."""

    wall: List[float] = field(default_factory=list)
    cpu: List[float] = field(default_factory=list)

    @property
    def median_wall(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)


def interleaved_timings(runners: Dict[str, Callable[[], object]], device: torch.device, repeats: int = 3,
                        iters: int = 3, warmup: int = 2) -> Dict[str, Timings]:
    """Times every runner `repeats` times, alternating between them (A B A B ...), `iters` calls each.

    Interleaving makes a slow patch of a shared machine hit every mode alike, so the ratios stay
    meaningful even when the absolute numbers move. Each runner is warmed up first (compilation,
    allocator, kernel selection). CPU time is recorded too: on a loaded host it tracks the work done
    rather than the time spent waiting for a core.
    """
    if repeats < 1 or iters < 1:
        raise ValueError(f"repeats and iters must be positive, got {repeats} and {iters}.")
    for runner in runners.values():
        for _ in range(warmup):
            _finish(runner())
    synchronize(device)
    timings = {name: Timings() for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(iters):
                result = runner()
            _finish(result)
            synchronize(device)
            timings[name].wall.append((time.perf_counter() - wall) / iters)
            timings[name].cpu.append((time.process_time() - cpu) / iters)
    return timings


def host_load() -> Optional[tuple]:
    """(1, 5, 15)-minute load averages, or None where the OS does not report them."""
    try:
        import os

        return tuple(round(value, 2) for value in os.getloadavg())
    except (AttributeError, OSError):
        return None
