"""A DistributedSampler that can start in the middle of an epoch and hands out (epoch, index) keys."""
import math

import torch

from util.errors import UserError


class ResumableDistributedSampler(torch.utils.data.Sampler):
    """Splits a per-epoch permutation over ranks like `torch.utils.data.DistributedSampler`.

    Differences that make exact resume possible:
    - it yields `(epoch, index)` keys, so a `SeededDataset` can draw the sample's randomness from
      `sample_generator(seed, epoch, index)` even inside persistent workers that never see
      `set_epoch`;
    - `set_epoch(epoch, start_batch, batch_size)` skips what the ranks already consumed.

    Rank r takes global positions r, r + W, r + 2W, ... of the (padded or truncated) permutation,
    so after k batches of size B on every rank the job has consumed exactly the first k*B*W
    positions. Skipping is expressed in those global positions, which is why a run can resume
    mid-epoch even with a different world size (it then splits the remainder over the new ranks).
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True):
        if dataset_len <= 0:
            raise UserError("the dataset is empty; point the data path at a folder that contains images.")
        if not 0 <= rank < num_replicas:
            raise UserError(f"rank {rank} is outside [0, {num_replicas}).")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        if drop_last:
            self.num_samples = dataset_len // num_replicas  # per rank, full epoch
        else:
            self.num_samples = math.ceil(dataset_len / num_replicas)
        if self.num_samples == 0:
            raise UserError(f"the dataset has {dataset_len} samples, fewer than the {num_replicas} ranks; "
                             "use fewer processes or more data.")
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self.start_sample = 0  # global positions already consumed in this epoch

    def set_epoch(self, epoch: int, start_batch: int = 0, batch_size: int = 0) -> None:
        """Selects the epoch's permutation and skips `start_batch` batches of `batch_size` per rank."""
        self.epoch = int(epoch)
        self.start_sample = min(int(start_batch) * int(batch_size) * self.num_replicas, self.total_size)

    def global_order(self) -> list[int]:
        """The epoch's permutation, padded (by wrapping) or truncated to a multiple of the world size."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            order = list(range(self.dataset_len))
        if len(order) < self.total_size:
            order += (order * math.ceil(self.total_size / len(order)))[: self.total_size - len(order)]
        return order[: self.total_size]

    def __iter__(self):
        order = self.global_order()
        for index in order[self.start_sample + self.rank:: self.num_replicas]:
            yield (self.epoch, index)

    def __len__(self) -> int:
        """Samples this rank still yields in the current epoch (the full `num_samples` when not resuming)."""
        return (self.total_size - self.start_sample) // self.num_replicas
