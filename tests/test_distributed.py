"""DDP and FSDP2 (fully_shard) over a GPT of nanoblock Blocks, gloo, 2
processes on the CPU, give the gradients of one process on the whole batch.
FSDP2 over NCCL on GPUs is in tests/test_cuda_interop.py."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import nanoblock

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6 had it only here
    from torch.distributed._composable.fsdp import fully_shard

WORLD = 2


def make_model():
    torch.manual_seed(0)
    cfg = nanoblock.GPTConfig(block_size=16, vocab_size=17, n_layer=2, n_head=2, n_embd=16)
    return nanoblock.GPT(cfg).double()


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 17, (4, 12), generator=g), torch.randint(0, 17, (4, 12), generator=g)


def ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model)


def fsdp2(model, device_type="cpu"):
    # The mesh's device said outright: left to itself, fully_shard picks the
    # CUDA device where one exists, and gloo with CPU tensors then crashed
    # (seen on the GPU machine, torch 2.11).
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for block in model.transformer.h:  # each Block's parameters sharded on its own
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def worker(rank, wrap, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    torch.set_num_threads(1)
    model = {"ddp": ddp, "fsdp2": fsdp2}[wrap](make_model())
    idx, targets = batch()
    share = idx.shape[0] // WORLD
    _, loss = model(idx[rank * share:(rank + 1) * share], targets[rank * share:(rank + 1) * share])
    loss.backward()  # both average the gradients over the ranks
    # FSDP2's gradients are shards (DTensors): gather them whole
    grads = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
             for p in model.parameters()]
    if rank == 0:
        torch.save(grads, out_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_gloo_matches_single_process(tmp_path, wrap):
    out_file = str(tmp_path / "grads.pt")
    mp.spawn(worker, args=(wrap, str(tmp_path / "init"), out_file), nprocs=WORLD, join=True)
    distributed_grads = torch.load(out_file)

    model = make_model()
    idx, targets = batch()
    _, loss = model(idx, targets)  # every shard has as many targets, so the mean matches
    loss.backward()
    for p, g in zip(model.parameters(), distributed_grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)
