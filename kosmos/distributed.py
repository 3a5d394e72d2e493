"""Every collective a training run makes, and the one helper new code reduces through.

A collective is a meeting: every rank must issue the same ones, in the same order, with the same shapes, or
the run hangs (NCCL, gloo) or mixes up numbers (a rank's captions summed with another's text). So a reduction
never runs over "what this rank saw": it runs over a vector whose layout every rank knows from the config
alone, the sources in the config's order (`Mixture.plans`, the same on every rank), zeros for what a rank did
not see. `all_reduce_sum` is that one helper; `pack`/`unpack` lay a dict of per-source figures out in the
fixed order and back.

The collectives of a training step (DDP; `train_kosmos.train`), in order, with their sizes at the paper's
configuration (`configs/kosmos1.yaml`: 1.67B parameters of which 1.36B trainable, 3 sources):

    where                                  what                                   when              size
    training.train_step                    DDP gradient all-reduce (buckets)      last micro-batch  1.36B fp32
                                           (train.ddp_fixed_reduction_order: one, fixed order)
    training.train_step                    loss tokens, ranks with a NaN/inf loss every step        2 fp64
    training.train_step (FSDP2 only)       all-gather weights / reduce-scatter    every micro-batch  per unit
    training.train_step (FSDP2 only)       gradient norm (clip_grad_norm_)        every step        1 fp32
    checkpoint.StopFlag.any_rank           "a rank was signalled"                 every step        1 fp32
    metrics.Meter.report                   the log window, packed                 log_every, saves  fp64: 3 +
                                                                                   8 x sources + streams
    train.train -> Checkpointer.maybe_save barriers (3) + samples seen            every save_every  1 int64
    checkpoint.save_checkpoint (FSDP2)     DCP save planning and writes           every save_every  per shard
    training.evaluate -> eval.loss         "every rank has a micro-batch" + sum   per eval batch    1 + 2 fp64
    training.evaluate -> eval.run          barriers, gathered predictions         every eval_every  objects
    checkpoint.check_finite (FSDP2 load)   non-finite counts                      on resume         tensors

Setup adds accelerate's own (process group creation, DDP's parameter broadcast) and a resume's loads. Every
row is issued by every rank: the per-step ones unconditionally; the per-window, per-save and per-eval ones at
steps that every rank computes from the same counters (`step % log_every`, the stop flag after its
reduction), and the evaluation ones over the config's sources in order, each rank agreeing before every
held-out micro-batch that all of them have one (kosmos.eval.loss.source_loss).

tests/test_distributed.py runs the planning and reduction code of each rank of 8, 64 and 128 under torch's
fake process group and checks that every rank plans the same step, that every logical stream is read by one
worker, and that every rank issues the same log-window reduction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

CHECK_ENV = "KOSMOS_CHECK_COLLECTIVES"
"""Set to 1, every all_reduce_sum first compares what each rank is about to reduce (its name, shape and
dtype) over all ranks and raises CollectiveMismatch, naming both sides, instead of pairing two different
reductions or hanging. The tests set it. (torch's own check, TORCH_DISTRIBUTED_DEBUG=DETAIL, wraps the process
group in a way that makes DDP's constructor crash with SIGSEGV on gloo in torch 2.14.1, so it can check the
runs that have no DDP model only.)"""

NAME_BYTES = 48
"""How much of a reduction's name the check sends along (the fingerprint has a fixed size)."""


class CollectiveMismatch(RuntimeError):
    """Ranks about to issue different collectives: a bug of the code that called them."""


def _fingerprint(t: torch.Tensor, what: str) -> list[int]:
    name = list(what.encode()[:NAME_BYTES].ljust(NAME_BYTES, b"\0"))
    shape = [*t.shape][:4]
    return [*name, t.dim(), *shape, *[-1] * (4 - len(shape)), list(map(str, DTYPES)).index(str(t.dtype))]


DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64, torch.uint8,
          torch.bool)


def _describe(fp: list[int]) -> str:
    name = bytes(fp[:NAME_BYTES]).rstrip(b"\0").decode(errors="replace")
    ndim = fp[NAME_BYTES]
    return f"{name!r} {tuple(fp[NAME_BYTES + 1:NAME_BYTES + 1 + ndim])} {DTYPES[fp[-1]]}"


def _check_same(acc, t: torch.Tensor, what: str) -> None:
    mine = _fingerprint(t, what)
    every = acc.gather(torch.tensor([mine], dtype=torch.long, device=acc.device)).tolist()
    for rank, fp in enumerate(every):
        if fp != mine:
            raise CollectiveMismatch(
                f"rank {acc.process_index} is about to reduce {_describe(mine)} while rank {rank} reduces "
                f"{_describe(fp)}: the ranks issue collectives in different orders (kosmos.distributed)")


def all_reduce_sum(acc, t: torch.Tensor, what: str = "") -> torch.Tensor:
    """`t` summed over the ranks (itself on one process). Every rank must call it with the same shape and
    dtype, at the same point of the run; `what` names the reduction for CollectiveMismatch (see CHECK_ENV)."""
    import os

    if acc.num_processes == 1:
        return t
    if os.environ.get(CHECK_ENV) == "1":
        _check_same(acc, t, what)
    return acc.reduce(t, reduction="sum")


def pack(names: Sequence[str], figures: Mapping[str, Sequence[float]], width: int) -> list[float]:
    """`figures[name]` (`width` numbers each) in the order of `names`, zeros for a name this rank has none
    of: a layout that every rank knows from the config alone."""
    out: list[float] = []
    for name in names:
        row = list(figures.get(name, ()))
        if row and len(row) != width:
            raise ValueError(f"{name}: {len(row)} figures where {width} were expected")
        out += [float(x) for x in row] if row else [0.0] * width
    unknown = set(figures) - set(names)
    if unknown:  # a programming error: a figure outside the agreed layout would be dropped silently
        raise KeyError(f"figures for {sorted(unknown)} outside the agreed sources {list(names)}")
    return out


def unpack(names: Sequence[str], flat: Sequence[float], width: int) -> dict[str, list[float]]:
    """The inverse of `pack`."""
    return {name: list(flat[i * width:(i + 1) * width]) for i, name in enumerate(names)}


def fixed_order_allreduce(ddp_model) -> None:
    """Register a DDP communication hook that all-reduces (averages) each bucket's gradients flattened in the
    parameters' order in the module, whatever order DDP's bucket holds them in
    (`train.ddp_fixed_reduction_order`, which also makes the whole model one bucket). DDP builds its buckets
    in reverse parameter order, then rebuilds them once, after a process's first backward, in the order the
    gradients became ready; each element of a ring all-reduce over 3+ ranks is summed in an order that depends
    on its position, so a process that resumes sums its first step in another order than the uninterrupted run
    did at that step (a difference in the last bits; on 2 ranks a + b = b + a). With one bucket in a fixed
    order the positions, and so the sums, are the same in every step of every run. Must be called before the
    first forward."""
    import torch.distributed as dist

    index = {id(p): i for i, p in enumerate(ddp_model.module.parameters())}

    def hook(state, bucket):
        params, grads = bucket.parameters(), bucket.gradients()
        order = sorted(range(len(params)), key=lambda i: index[id(params[i])])
        flat = torch.cat([grads[i].reshape(-1) for i in order]).div_(dist.get_world_size())
        sizes = [grads[i].numel() for i in order]

        def unflatten(fut):
            parts = dict(zip(order, fut.value()[0].split(sizes), strict=True))
            return torch.cat([parts[i] for i in range(len(params))]).view_as(bucket.buffer())

        return dist.all_reduce(flat, async_op=True).get_future().then(unflatten)

    ddp_model.register_comm_hook(None, hook)
