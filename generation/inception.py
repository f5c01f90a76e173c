"""The 2015-12-05 Inception-v3 graph used by ADM's evaluator, in PyTorch, loaded from a local file.

The network is torch-fidelity's `inception-v3-compat` (`FeatureExtractorInceptionV3`): it takes
uint8 images, resizes them to 299 px with TF1's bilinear kernel and maps them to (x - 128) / 128
inside the module, as the TF graph ADM runs does. Per image it gives what ADM's evaluator reads:

- pool_3 (2048): FID, Precision/Recall;
- `mixed_6/conv` (TF name) = the 1x1 branch of Mixed_6d after BN + ReLU, (192, 17, 17); ADM keeps
  the first 7 channels of the NHWC tensor and flattens it, so the 2023-d sFID feature is in
  H, W, C order (C, H, W order gives sFIDs in the hundreds against ADM's reference statistics);
- the 1008 logits WITHOUT the fc bias (pool_3 @ W^T), which ADM's Inception Score softmaxes.

torch-fidelity would download its weights and read a given path with `weights_only=False`, so the
file is read here with `weights_only=True`, checked, and handed to torch-fidelity as an in-memory
copy of the already-validated tensors.
"""
import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch_fidelity import feature_extractor_inceptionv3 as fidelity_inception
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from util.checkpoint import load_checkpoint
from util.errors import UserError
from util.precision import tf32_enabled

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_HINT = (f"download {WEIGHTS_FILENAME} from {URL_INCEPTION_V3} (or use pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth, same layout) and pass its path to --inception-weights")

POOL_DIM = 2048
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7  # ADM: spatial[..., :7] of mixed_6/conv
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_SIZE * SPATIAL_SIZE  # 2023

# Tensors whose presence and shape tell the 2015 FID graph apart from other Inception-v3 files
# (torchvision's ImageNet model has 1000 classes and AuxLogits, TF-slim checkpoints other names).
SIGNATURE_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (NUM_LOGITS, POOL_DIM),
    "fc.bias": (NUM_LOGITS,),
}




def load_inception_state_dict(weights_path) -> dict:
    """Reads and checks the weights file; returns a plain {name: tensor} dict (CPU)."""
    path = Path(weights_path)
    if not path.is_file():
        raise UserError(f"Inception weights file {path} does not exist; {WEIGHTS_HINT}.")
    try:
        state = load_checkpoint(path)
    except UserError as error:
        raise UserError(f"Inception weights file {path} cannot be read as a weights-only "
                                    f"state dict; {WEIGHTS_HINT}.") from error
    if not isinstance(state, dict) or not all(torch.is_tensor(value) for value in state.values()):
        raise UserError(f"Inception weights file {path} is not a flat state dict of tensors "
                                    f"(wrong architecture); {WEIGHTS_HINT}.")
    for name, shape in SIGNATURE_SHAPES.items():
        found = tuple(state[name].shape) if name in state else None
        if found != shape:
            problem = f"it has no tensor {name}" if found is None else f"{name} has shape {found}, not {shape}"
            raise UserError(f"Inception weights file {path} is not the 2015-12-05 FID Inception "
                                        f"({problem}); {WEIGHTS_HINT}.")
    # A plain dict carries no `_metadata`, so BatchNorm fills a missing num_batches_tracked with 0
    # (pytorch-fid's converted file may lack it).
    return dict(state)


def _build_network(state: dict, path: Path) -> FeatureExtractorInceptionV3:
    buffer = io.BytesIO()
    torch.save(state, buffer)  # only tensors we already loaded with weights_only=True
    buffer.seek(0)
    try:
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                           feature_extractor_weights_path=buffer)
    except RuntimeError as error:  # strict load_state_dict: missing/unexpected keys or shapes
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), "")[:160]
        raise UserError(f"Inception weights file {path} does not match the 2015-12-05 FID "
                                    f"Inception layout ({detail}); {WEIGHTS_HINT}.") from error


class _InceptionLayout(nn.Module):
    """torch-fidelity's inception-v3-compat layers (same names, shapes and default initialisation), built
    without its weight loading, so a random state dict of exactly that layout can be made offline."""

    def __init__(self):
        super().__init__()
        blocks = fidelity_inception
        self.Conv2d_1a_3x3 = blocks.BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = blocks.BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = blocks.BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = blocks.BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = blocks.BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = blocks.InceptionA(192, pool_features=32)
        self.Mixed_5c = blocks.InceptionA(256, pool_features=64)
        self.Mixed_5d = blocks.InceptionA(288, pool_features=64)
        self.Mixed_6a = blocks.InceptionB(288)
        self.Mixed_6b = blocks.InceptionC(768, channels_7x7=128)
        self.Mixed_6c = blocks.InceptionC(768, channels_7x7=160)
        self.Mixed_6d = blocks.InceptionC(768, channels_7x7=160)
        self.Mixed_6e = blocks.InceptionC(768, channels_7x7=192)
        self.Mixed_7a = blocks.InceptionD(768)
        self.Mixed_7b = blocks.InceptionE_1(1280)
        self.Mixed_7c = blocks.InceptionE_2(2048)
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)


def random_inception_state_dict(seed: int = 0) -> dict:
    """A state dict of the FID Inception's exact layout (pytorch-fid's keys) with seeded random weights.

    He-initialised convs keep activations O(1) through the 94 layers and BN statistics are perturbed so
    every layer does something. For offline checks of the evaluation pipeline only (tests,
    `evaluate.py --random-inception`, scripts/gpu_check.py): the features are deterministic but
    meaningless, so numbers computed with them are NOT FID/IS/sFID and must never be reported as such.
    """
    generator = torch.Generator().manual_seed(seed)
    network = _InceptionLayout()
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
        network.fc.weight.copy_(torch.randn(network.fc.weight.shape, generator=generator) * 0.05)
        network.fc.bias.copy_(torch.randn(network.fc.bias.shape, generator=generator) * 0.05)
    return {name: value for name, value in network.state_dict().items() if not name.endswith("num_batches_tracked")}


def save_random_inception_weights(path, seed: int = 0) -> Path:
    """Writes `random_inception_state_dict(seed)` to `path` (loadable by `InceptionFeatureExtractor`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_inception_state_dict(seed), path)
    return path


@contextlib.contextmanager
def full_fp32(device: torch.device):
    """TF32 off for the Inception pass: ADM's features are fp32, and TF32 convolutions move FID."""
    if device.type != "cuda":
        yield
        return
    with tf32_enabled(False):
        yield


def spatial_features(mixed_6_conv: torch.Tensor) -> torch.Tensor:
    """(N, 192, 17, 17) NCHW activation -> (N, 2023): first 7 channels, flattened H, W, C (TF NHWC)."""
    return mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(mixed_6_conv.shape[0], -1)


def to_nchw_uint8(images) -> torch.Tensor:
    """uint8 images (N, H, W, 3) or (N, 3, H, W), numpy or torch -> uint8 tensor (N, 3, H, W)."""
    images = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if images.dtype != torch.uint8 or images.dim() != 4 or 3 not in (images.shape[1], images.shape[3]):
        raise ValueError(f"Inception input must be uint8 images (N, H, W, 3) or (N, 3, H, W), got "
                         f"{images.dtype} {tuple(images.shape)}; convert with np.clip(x, 0, 255).astype(np.uint8).")
    return images.permute(0, 3, 1, 2) if images.shape[3] == 3 else images


class InceptionFeatureExtractor:
    """ADM's Inception features from torch-fidelity's inception-v3-compat.

    `features(images)` takes uint8 (N, H, W, 3) or (N, 3, H, W) at any size and returns float32
    CPU tensors `(pool (N, 2048), spatial (N, 2023), logits_unbiased (N, 1008))`.
    """

    def __init__(self, weights_path, device="cpu"):
        path = Path(weights_path)
        self.device = torch.device(device)
        self.network = _build_network(load_inception_state_dict(path), path).to(self.device)
        self._mixed_6_conv = None
        # torch-fidelity does not expose mixed_6/conv; BasicConv2d's output is already BN + ReLU.
        self.network.Mixed_6d.branch1x1.register_forward_hook(self._keep_mixed_6_conv)

    def _keep_mixed_6_conv(self, module, inputs, output):
        self._mixed_6_conv = spatial_features(output).float()

    @torch.no_grad()
    def features(self, images):
        batch = to_nchw_uint8(images)
        if self.device.type == "cuda":
            batch = batch.pin_memory()  # lets the copy overlap the previous batch's kernels
        batch = batch.to(self.device, non_blocking=True)
        with full_fp32(self.device):
            pool, logits = self.network(batch)  # (N, 2048), (N, 1008) = pool @ fc.weight^T
        spatial, self._mixed_6_conv = self._mixed_6_conv, None
        return pool.float().cpu(), spatial.cpu(), logits.float().cpu()
