"""Mixed precision as one flag: bf16 (default on CUDA), fp16 with a grad scaler, or fp32."""
import argparse
import contextlib

import torch

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_precision_arg(parser: argparse.ArgumentParser, flag: str = "--precision", default: str = "bf16") -> None:
    parser.add_argument(flag, default=default, choices=sorted(PRECISIONS),
                        help="autocast dtype: bf16, fp16 (with a dynamic grad scaler) or fp32 (no autocast)")


def autocast(device: torch.device | str, precision: str):
    """Autocast context for `precision` on `device` (a no-op context for fp32)."""
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=PRECISIONS[precision])


def make_grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that is only active for fp16 (bf16 has fp32's range, so no loss scaling)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


def enable_tf32() -> None:
    """Lets fp32 matmuls/convs use TF32 tensor cores on Ampere+ (DiT/MAE train with this on)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
