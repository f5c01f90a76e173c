"""CUDA-path settings that can be checked on CPU: one TF32 API, the deterministic switch, guidance mixed and
images decoded in fp32 whatever the sampling precision."""
import os

import pytest
import torch

from generation.sampling import Guidance, ImageGenerator
from models.dit import DiT_models
from util import precision


@pytest.fixture
def restore_backends():
    saved = (precision.tf32_state(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    precision.set_tf32(saved[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1], saved[2]
    torch.use_deterministic_algorithms(saved[3])
    if saved[4] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def test_tf32_is_set_and_read_through_the_new_api_only(restore_backends):
    """torch 2.14 raises when the legacy allow_tf32 flags are read after the fp32_precision API was used, so
    set_tf32 / tf32_enabled must write and read fp32_precision (present since torch 2.9)."""
    precision.set_tf32(True)
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    with precision.tf32_enabled(False):
        assert torch.backends.cuda.matmul.fp32_precision == "ieee" and not precision.tf32_state()
    assert precision.tf32_state() and torch.backends.cudnn.conv.fp32_precision == "tf32"


def test_configure_cuda_autotunes_or_makes_kernels_deterministic(restore_backends):
    precision.configure_cuda(tf32=False)
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    assert not precision.tf32_state()
    precision.configure_cuda(deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")


def test_configure_backend_sets_up_cuda_or_names_the_cpu_autocast_cost(restore_backends, monkeypatch):
    """CUDA: configure_cuda with the run's --deterministic. CPU: silent in fp32; under bf16/fp16 autocast one
    line that names the fix (--precision fp32), since the default bf16 is emulated on most CPUs."""
    calls, lines = [], []
    monkeypatch.setattr(precision, "configure_cuda", lambda **kwargs: calls.append(kwargs))
    precision.configure_backend(torch.device("cuda", 0), "bf16", deterministic=True, say=lines.append)
    assert calls == [{"deterministic": True}] and lines == []
    precision.configure_backend(torch.device("cpu"), "fp32", say=lines.append)
    assert lines == []
    for dtype in ("bf16", "fp16"):
        precision.configure_backend(torch.device("cpu"), dtype, say=lines.append)
    assert len(lines) == 2 and all("--precision fp32" in line for line in lines) and calls == [{"deterministic": True}]
    assert lines[0].startswith("note: --precision bf16 on CPU")


def tiny_dit():
    torch.manual_seed(0)
    model = DiT_models["DiT-S/2"](input_size=4, num_classes=3, hidden_size=32, depth=1, num_heads=2).eval()
    with torch.no_grad():  # adaLN-Zero starts at zero output; give every layer something to compute
        for param in model.parameters():
            param.add_(torch.randn(param.shape) * 0.2)
    return model


def test_guidance_is_mixed_in_fp32_under_bf16_autocast():
    """forward_with_cfg under bf16 autocast = the bf16 network output, cast to fp32, then mixed in fp32."""
    model = tiny_dit()
    x = torch.randn(2, 4, 4, 4)
    x = torch.cat([x[:1], x[:1]])
    t, y = torch.tensor([500, 500]), torch.tensor([1, 3])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        guided = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
        raw = model.forward(x, t, y)
    assert guided.dtype == torch.float32
    raw = raw.float()
    cond, uncond = raw[:1, :3], raw[1:, :3]
    expected = uncond + 4.0 * (cond - uncond)  # fp32 arithmetic on the bf16-rounded outputs
    torch.testing.assert_close(guided[:1, :3], expected, rtol=0, atol=0)
    torch.testing.assert_close(guided[1:, :3], expected, rtol=0, atol=0)


class RecordingCodec:
    """Stands in for the VAE: records the dtype and autocast state its decoder is called with."""

    def __init__(self):
        self.calls = []

    def decode(self, latents):
        self.calls.append((latents.dtype, torch.is_autocast_enabled("cpu")))
        return torch.tanh(latents[:, :3].repeat_interleave(8, dim=-1).repeat_interleave(8, dim=-2))


def test_images_are_decoded_in_fp32_even_when_sampling_in_bf16():
    codec = RecordingCodec()

    def one_step_sampler(model_fn, z, model_kwargs, generators):
        return model_fn(z, torch.full((z.shape[0],), 10), **model_kwargs)[:, :4]

    generator = ImageGenerator(tiny_dit(), codec, one_step_sampler, num_classes=3, latent_shape=(4, 4, 4),
                               device=torch.device("cpu"), guidance=Guidance(scale=1.5), precision="bf16",
                               stochastic=False)
    images, labels = generator.generate(0, [0, 1])
    assert images.shape == (2, 32, 32, 3) and images.dtype == torch.uint8
    assert codec.calls == [(torch.float32, False)]
