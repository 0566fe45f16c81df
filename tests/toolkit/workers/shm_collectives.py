"""Worker for test_shm_collectives.py: DeepSpeed's collectives on 2 ranks, routed through shared memory.

Every rank draws every rank's tensors from the same seeds, so it knows the exact sum and gather it
must receive. Before routing, gloo's own functions are wrapped with a counter: the calls that must
stay on gloo are counted there, the routed ones are not.
"""

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.comm import comm

from tests.multirank import write_result
from toolkit.training.shm_collectives import route_through_shared_memory

deepspeed.init_distributed(dist_backend="gloo", verbose=False)
rank, world = dist.get_rank(), dist.get_world_size()
backend = comm.cdb
on_gloo = []


def counted(name, fn):
    def call(*args, **kwargs):
        on_gloo.append(name)
        return fn(*args, **kwargs)

    return call


backend.all_reduce = counted("all_reduce", backend.all_reduce)
backend.all_gather_into_tensor = counted("all_gather_into_tensor", backend.all_gather_into_tensor)
routed = route_through_shared_memory()
again = route_through_shared_memory()  # a second finetune in one process: nothing wrapped twice


def drawn(numel, dtype, of):
    return torch.randn(numel, generator=torch.Generator().manual_seed(of)).to(dtype)


result = {"routed": routed, "again": again, "exact": {}}
# 9M fp32 elements (36 MB) pass through more than one of the op's 32 MiB chunks
for dtype, numel in ((torch.float32, 9_000_000), (torch.bfloat16, 300_001), (torch.float16, 17)):
    name = str(dtype).removeprefix("torch.")
    mine = drawn(numel, dtype, rank)
    dist.all_reduce(mine)
    expected = sum(drawn(numel, dtype, r).float() for r in range(world)).to(dtype)
    result["exact"][f"all_reduce {name}"] = torch.equal(mine, expected)

    everyone = torch.cat([drawn(numel, dtype, r) for r in range(world)])
    gathered = torch.full((world * numel,), float("nan"), dtype=dtype)
    dist.all_gather_into_tensor(gathered, drawn(numel, dtype, rank))
    result["exact"][f"all_gather {name}"] = torch.equal(gathered, everyone)
    # ZeRO passes its own slice of the output as the input
    flat = torch.full((world * numel,), float("nan"), dtype=dtype)
    flat[rank * numel:(rank + 1) * numel] = drawn(numel, dtype, rank)
    dist.all_gather_into_tensor(flat, flat[rank * numel:(rank + 1) * numel])
    result["exact"][f"all_gather in place {name}"] = torch.equal(flat, everyone)
routed_calls = len(on_gloo)

# what stays on gloo, and still gives gloo's answer
ints = torch.tensor([rank + 1] * 4)
dist.all_reduce(ints)
result["exact"]["all_reduce int64"] = ints.tolist() == [3] * 4
top = torch.tensor([float(rank)] * 4)
dist.all_reduce(top, op=dist.ReduceOp.MAX)
result["exact"]["all_reduce max"] = top.tolist() == [1.0] * 4
pending = torch.ones(8)
dist.all_reduce(pending, async_op=True).wait()
result["exact"]["all_reduce async"] = pending.tolist() == [2.0] * 8
strided = torch.ones(4, 2).t()
dist.all_reduce(strided)
result["exact"]["all_reduce strided"] = strided.eq(2).all().item()
# switched off (a ZeRO-3 run after a ZeRO-2 one in this process) and on again
off = route_through_shared_memory(enabled=False)
unrouted = torch.ones(8)
dist.all_reduce(unrouted)
result["exact"]["all_reduce switched off"] = unrouted.tolist() == [2.0] * 8
result.update(routed_calls=routed_calls, on_gloo=on_gloo, off=off, on_again=route_through_shared_memory())
write_result(result)
# without it gloo's threads abort the exit ("terminate called without an active exception")
torch.distributed.destroy_process_group()
