"""DDP (gloo, 2 processes on the CPU) over a GPT of nanoblock Blocks gives the
gradients of one process on the whole batch."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nanoblock

WORLD = 2


def make_model():
    torch.manual_seed(0)
    cfg = nanoblock.GPTConfig(block_size=16, vocab_size=17, n_layer=2, n_head=2, n_embd=16)
    return nanoblock.GPT(cfg).double()


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 17, (4, 12), generator=g), torch.randint(0, 17, (4, 12), generator=g)


def ddp_worker(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    idx, targets = batch()
    share = idx.shape[0] // WORLD
    _, loss = model(idx[rank * share:(rank + 1) * share], targets[rank * share:(rank + 1) * share])
    loss.backward()  # DDP averages the gradients over the ranks
    if rank == 0:
        torch.save([p.grad for p in model.module.parameters()], out_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_gloo_matches_single_process(tmp_path):
    out_file = str(tmp_path / "grads.pt")
    mp.spawn(ddp_worker, args=(str(tmp_path / "init"), out_file), nprocs=WORLD, join=True)
    ddp_grads = torch.load(out_file)

    model = make_model()
    idx, targets = batch()
    _, loss = model(idx, targets)  # every shard has as many targets, so the mean matches
    loss.backward()
    for p, g in zip(model.parameters(), ddp_grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)
