"""Mixed precision as one flag: bf16 (default on CUDA), fp16 with a grad scaler, or fp32."""
import contextlib
import os

import torch

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast(device: torch.device | str, precision: str):
    """Autocast context for `precision` on `device` (a no-op context for fp32)."""
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=PRECISIONS[precision])


def make_grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that is only active for fp16 (bf16 has fp32's range, so no loss scaling)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


# torch >= 2.9 sets TF32 per backend through `fp32_precision` ("tf32" | "ieee"); reading the legacy
# `allow_tf32` flags after anything used that API raises on torch 2.14, so this module is the only
# place that touches either, and it uses the new one whenever torch has it (2.11 and 2.14 both do).
_HAS_FP32_PRECISION = hasattr(torch.backends.cuda.matmul, "fp32_precision")


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and cuDNN convolutions on (Ampere+) or off (exact fp32)."""
    if _HAS_FP32_PRECISION:
        mode = "tf32" if enabled else "ieee"
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:  # torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def tf32_state() -> bool:
    """True when fp32 matmuls may use TF32 (read through the same API `set_tf32` writes)."""
    if _HAS_FP32_PRECISION:
        return torch.backends.cuda.matmul.fp32_precision == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


@contextlib.contextmanager
def tf32_enabled(enabled: bool):
    """TF32 on or off inside the block, the previous per-backend settings restored after it."""
    if _HAS_FP32_PRECISION:
        saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    else:
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_tf32(enabled)
    try:
        yield
    finally:
        if _HAS_FP32_PRECISION:
            torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved
        else:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def configure_cuda(tf32: bool = True, deterministic: bool = False) -> None:
    """Backend settings every CUDA entry point uses: TF32 as asked, and either cuDNN autotuning
    (`cudnn.benchmark`: our convs are fixed-shape, so the first call's search pays for itself) or
    deterministic algorithms.

    `deterministic=True` makes a resumed GPU run repeat the uninterrupted one bit for bit: flash and
    memory-efficient attention backward and embedding backward accumulate with atomics, so torch then
    uses their deterministic variants (or the math kernel), cuBLAS needs a fixed workspace
    (CUBLAS_WORKSPACE_CONFIG, set here if the user did not), and cuDNN stops autotuning.
    """
    set_tf32(tf32)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def configure_backend(device: torch.device, precision: str, deterministic: bool = False, say=print) -> None:
    """A trainer's backend setup: `configure_cuda` on CUDA; on CPU, one line through `say` when autocast is on.

    bf16/fp16 autocast on a CPU without AVX512-BF16/AMX is emulated and several times slower than fp32, and the
    default is bf16 (USP's GPU recipe), so CPU runs are told to pass --precision fp32.
    """
    if device.type == "cuda":
        configure_cuda(deterministic=deterministic)
    elif device.type == "cpu" and precision != "fp32":
        say(f"note: --precision {precision} on CPU runs emulated unless the CPU has AVX512-BF16 or AMX, often "
            "several times slower than fp32; pass --precision fp32 for CPU runs.")

