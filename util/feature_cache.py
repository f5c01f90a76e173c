"""REPA feature cache, read side: the frozen target encoder's patch tokens of every image and of its flip.

It sits next to a latent cache (util/latent_cache.py) and is indexed the same way: image k of the
ImageFolder (sorted order), orientation 0 = the image, 1 = its horizontal flip. Training reads the
latent of (k, flip) and the features of (k, flip) for the same draw, so a flipped latent is aligned
with the flipped image's features.

Layout of `<cache_dir>` (written by `python -m generation.cache_features`):
  manifest.json             encoder identity, image size, crop, classes, file list hash, token grid,
                            dtype, shard size + `complete`, `count`, `shards_crc32` once finished
  shard-00000.safetensors   for images [k*S, (k+1)*S): features (n, 2, T, D) (float16 by default),
                            valid (n,) uint8 (0 = unreadable image)
"""
from pathlib import Path

import safetensors
import torch

from util.latent_cache import read_complete_manifest, read_manifest as read_cache_manifest, shard_path, verify_shard

COMMAND = "generation.cache_features"


def read_manifest(cache_dir) -> dict:
    return read_cache_manifest(cache_dir, "feature cache", COMMAND)


class FeatureCache:
    """Read side: `features(image_index, flip) -> (T, D)` float32 of ImageFolder image `image_index`.

    `expect` holds manifest values the run needs ({"encoder": ..., "image_size": ..., "crop": ...,
    "files_sha256": ...}); any difference is refused with one sentence naming it.
    """

    def __init__(self, cache_dir, expect: dict | None = None):
        self.cache_dir = Path(cache_dir)
        self.manifest = read_complete_manifest(self.cache_dir, expect, "feature cache", COMMAND)
        self.shard_size = int(self.manifest["shard_size"])
        self._handles = {}  # per process: DataLoader workers open their own

    @staticmethod
    def open_shard(path: Path):
        return safetensors.safe_open(str(path), framework="pt")

    def features(self, image_index: int, flip: int) -> torch.Tensor:
        shard, row = divmod(int(image_index), self.shard_size)
        if shard not in self._handles:
            verify_shard(self.cache_dir, self.manifest, shard, "feature cache", COMMAND)
            self._handles[shard] = self.open_shard(shard_path(self.cache_dir, shard))
        return self._handles[shard].get_slice("features")[row, flip].float()  # (T, D)

    def __getstate__(self):  # safetensors handles do not pickle; workers reopen them
        return {**self.__dict__, "_handles": {}}
