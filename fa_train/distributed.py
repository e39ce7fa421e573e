"""Data-parallel training and sharded evaluation under `torchrun` (NCCL on GPUs, gloo on CPUs).

A training step here runs several backward passes (the clean pass, whose gradient also starts the attack, then
the adversarial pass: the paper's gradient reuse) and input-gradient passes inside the attack. PyTorch's
DistributedDataParallel wrapper all-reduces during *each* backward through its forward, which does not fit that
pattern, so the toolkit does what DDP does at the step boundary itself: every rank starts from rank 0's
weights, computes the step's gradients on its shard, and `average_gradients` all-reduces them in flat buckets
before the optimizer step. The result is the data-parallel update DDP would make.

Two things make a run on N ranks equal to a run on one process with the same global batch (tested on the CPU
with gloo, `tests/test_distributed.py`):
- loss normalisers (YOLOv3's counts of positives and of weighted cells) are summed over ranks inside a training
  step (`sync_normalizers`), so each rank's loss is its share of the global-batch loss; and
- `--sync-bn` computes BatchNorm statistics over the global batch: torch.nn.SyncBatchNorm on CUDA;
  on the CPU (which SyncBatchNorm refuses) `CpuSyncBatchNorm`, the same statistics through differentiable
  all-reduces.
The sampler hands each rank its slice of the same global batches and gives every sample a flip seed of its own,
so augmentation does not depend on the number of ranks or workers.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> Optional[str]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns the device this rank should use
    (cuda:LOCAL_RANK on GPUs) or None when not distributed. NCCL when the rank runs on CUDA, else gloo."""
    if env_world_size() <= 1 or is_initialized():
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in (None, "auto") or str(device).startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: CUDA is not available on this machine")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return f"cuda:{local}" if use_cuda else "cpu"


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------------------ samplers


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Batches of a global size B: each epoch one permutation (from `set_epoch`'s seed), cut into global batches,
    each rank taking its contiguous B / world slice. Yields lists of (index, sample_seed) pairs; the dataset
    draws that sample's augmentation from its own seed, so rank and worker counts do not change the data."""

    def __init__(self, n: int, global_batch: int, shuffle: bool = True, drop_last: bool = True, seed: int = 0,
                 rank_: Optional[int] = None, world: Optional[int] = None):
        self.world = world_size() if world is None else world
        self.rank = rank() if rank_ is None else rank_
        if global_batch % self.world:
            raise ValueError(f"--batch-size {global_batch} is the global batch and must be divisible by the number "
                             f"of processes ({self.world})")
        self.n, self.global_batch, self.local = n, global_batch, global_batch // self.world
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed

    def set_epoch(self, seed: int) -> None:
        self.seed = seed

    def __len__(self) -> int:
        return self.n // self.global_batch if self.drop_last else -(-self.n // self.global_batch)

    def __iter__(self) -> Iterator[List[tuple]]:
        g = torch.Generator()
        g.manual_seed(self.seed)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        sample_seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g)
        for b in range(len(self)):
            chunk = order[b * self.global_batch:(b + 1) * self.global_batch]
            part = chunk[self.rank * self.local:(self.rank + 1) * self.local] if len(chunk) == self.global_batch \
                else chunk[self.rank::self.world]  # a short last batch (drop_last=False): strided
            yield [(int(i), int(sample_seeds[i])) for i in part]


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation shard: indices rank, rank + world, ... (no padding, so no image is counted twice)."""

    def __init__(self, n: int, rank_: Optional[int] = None, world: Optional[int] = None):
        self.n = n
        self.world = world_size() if world is None else world
        self.rank = rank() if rank_ is None else rank_

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))


# ------------------------------------------------------------------------------------------------ collectives


def broadcast_model(model: nn.Module) -> None:
    """Every rank starts from rank 0's parameters and buffers (as DDP does at construction)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def average_gradients(params, bucket_bytes: int = 25 * 2**20) -> None:
    """Mean of each parameter's gradient over ranks, all-reduced in flat buckets of one dtype.
    A parameter with no gradient on this rank contributes zeros (every rank must reduce the same buckets)."""
    world = world_size()
    if world == 1:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for p in params + [None]:
        if p is not None and bucket and (p.grad.dtype != bucket[0].grad.dtype or p.grad.device != bucket[0].grad.device):
            _reduce_bucket(bucket, world)
            bucket, size = [], 0
        if p is not None:
            bucket.append(p)
            size += p.grad.numel() * p.grad.element_size()
        if bucket and (p is None or size >= bucket_bytes):
            _reduce_bucket(bucket, world)
            bucket, size = [], 0


def _reduce_bucket(params, world):
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def all_reduce_values(values: List[float], op: str = "sum") -> List[float]:
    """Sum (or max) of a few Python numbers over ranks."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def gather_list(items: list) -> list:
    """The concatenation of every rank's list, in rank order, on every rank."""
    if world_size() == 1:
        return items
    parts: List[Any] = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [x for p in parts for x in p]


def broadcast_object(obj: Any) -> Any:
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------- global loss normalisers

_SYNC_NORMALIZERS = False


@contextlib.contextmanager
def sync_normalizers(enabled: bool = True):
    """Inside a training step: loss denominators are global (see `normalizer`). Every rank runs the same
    sequence of loss computations in a step, so the collectives line up."""
    global _SYNC_NORMALIZERS
    old, _SYNC_NORMALIZERS = _SYNC_NORMALIZERS, enabled and world_size() > 1
    try:
        yield
    finally:
        _SYNC_NORMALIZERS = old


def normalizer(counts: torch.Tensor) -> torch.Tensor:
    """Loss denominators: the local counts, or inside `sync_normalizers` the global counts / world, so that
    the mean over ranks of (local sum / normalizer) is the global-batch mean (global sum / global count)."""
    if not _SYNC_NORMALIZERS:
        return counts
    total = counts.detach().clone()
    dist.all_reduce(total)
    return total / world_size()


# ------------------------------------------------------------------------------------------------ SyncBatchNorm


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, on the CPU (gloo).
    torch.nn.SyncBatchNorm covers CUDA and refuses CPU tensors; this layer computes the same statistics with
    differentiable all-reduces (torch.distributed.nn.functional), so gradients flow through them as well."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_initialized() and world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce as diff_all_reduce

        dims = [0] + list(range(2, x.dim()))
        c = x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        # two passes (mean, then the centred sum of squares), as stable as BatchNorm's own statistics;
        # E[x^2] - E[x]^2 in float32 loses the variance of channels whose mean is large against their spread
        stats = diff_all_reduce(torch.cat([x.sum(dims), count]))
        n = stats[-1]
        mean = stats[:c] / n
        centred = x - mean.view(shape)
        var = diff_all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=m)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers -> torch.nn.SyncBatchNorm (CUDA) or CpuSyncBatchNorm (CPU); parameters and buffers kept,
    so checkpoints load into the plain model. Frozen (eval-mode) BatchNorm layers behave as before."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        out = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        with torch.no_grad():
            if module.affine:
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out
