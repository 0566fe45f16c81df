"""Data-parallel collectives through shared memory when all ranks share one host's CPUs.

Without an accelerator DeepSpeed communicates over gloo, which moves every collective through
loopback TCP. Its ``deepspeed_shm_comm`` op, which DeepSpeed builds and initialises on every CPU
run, reduces through a shared-memory segment instead, but DeepSpeed uses it only for inference's
tensor-parallel ``inference_all_reduce``; ZeRO's gradient reduction and its gather of the updated
parameters still go through gloo, several times slower for the same sums and gathers (the figures
are in the README, Packing and throughput).

So dstk routes DeepSpeed's blocking ``all_reduce`` (sum) and ``all_gather_into_tensor`` of
floating-point tensors over all ranks through that op, and leaves every other call on gloo:
asynchronous ones (ZeRO-3 overlaps its gathers with compute), sub-groups (the shm segment spans all
ranks), other reductions, and integer tensors. A gather becomes a sum in which each rank
contributes its own slice and zeros elsewhere, which is exact (x + 0 == x).

It is used only where DeepSpeed's op set itself up (every rank local: the launcher's LOCAL_SIZE
equals the world size) and each rank has a core of its own, because the op waits for its peers by
spinning: with more ranks than cores a spinning rank would take the core a peer needs to arrive.
Whether to route is decided from facts every rank shares, so all ranks take the same path for each
collective. ZeRO-3 is left on gloo: it reduces its gradients with reduce-scatters and gathers its
parameters asynchronously, so the routing would save it little, while touching the peers' 66 MiB
exchange buffers adds them to every rank's resident memory, and ZeRO-3 is the stage chosen to
save memory.
"""

from __future__ import annotations

import os

import torch

_ROUTED = "dstk_shm_routed"  # on the backend: route now
_WRAPPED = "dstk_shm_wrapped"  # on the backend: its functions are wrapped
# dtype -> the vector ISA level DeepSpeed's kernel needs for it (its vector_kernel_level());
# other dtypes have no kernel there
_KERNEL_LEVEL = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 2}
_NO_KERNEL = 3


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def route_through_shared_memory(enabled: bool = True) -> bool:
    """Route DeepSpeed's blocking float sums and gathers over all ranks through shared memory, or
    (``enabled=False``) send them to gloo again. Every rank must pass the same ``enabled``.

    Call after ``deepspeed.init_distributed``. Returns whether the routing is on for this process.
    """
    import torch.distributed as dist
    from deepspeed.comm import comm

    backend = comm.cdb
    if backend is None:
        return False
    world = dist.get_world_size()
    level = getattr(backend, "shm_vector_kernel_level", 0)
    setattr(backend, _ROUTED, False)
    if (not enabled or getattr(backend, "shm_comm_op", None) is None or world < 2
            or os.environ.get("LOCAL_SIZE") != str(world) or world > usable_cores()
            or not hasattr(torch.ops.deepspeed, "inference_all_reduce_")):
        return False
    setattr(backend, _ROUTED, True)
    if getattr(backend, _WRAPPED, False):  # a later run in this process
        return True
    all_reduce, all_gather = backend.all_reduce, backend.all_gather_into_tensor

    def routable(group, async_op: bool, *tensors: torch.Tensor) -> bool:
        return (getattr(backend, _ROUTED) and not async_op and dist.get_world_size(group) == world
                and all(_KERNEL_LEVEL.get(t.dtype, _NO_KERNEL) <= level and t.is_contiguous() and t.device.type == "cpu"
                        for t in tensors))

    def shm_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if backend._reduce_op(op) == dist.ReduceOp.SUM and routable(group, async_op, tensor):
            torch.ops.deepspeed.inference_all_reduce_(tensor)
            return None
        return all_reduce(tensor, op, group, async_op)

    def shm_all_gather(output_tensor, input_tensor, group=None, async_op=False):
        if (routable(group, async_op, output_tensor, input_tensor) and input_tensor.dtype == output_tensor.dtype
                and output_tensor.numel() == world * input_tensor.numel()):
            rows = output_tensor.view(world, -1)
            mine = dist.get_rank(group)
            rows[mine].copy_(input_tensor.view(-1))  # ZeRO's input is often this very slice
            rows[:mine].zero_()
            rows[mine + 1:].zero_()
            torch.ops.deepspeed.inference_all_reduce_(output_tensor)
            return None
        return all_gather(output_tensor, input_tensor, group, async_op)

    backend.all_reduce, backend.all_gather_into_tensor = shm_all_reduce, shm_all_gather
    setattr(backend, _WRAPPED, True)
    return True
