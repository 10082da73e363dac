"""nanoblock in PyTorch's GPU training machinery: a whole training step
captured in a CUDA graph, torch.compile (inductor) on the GPU, and FSDP2 (fully_shard) over NCCL. Marked `cuda`,
skipped without a GPU (the GPU machine's scripts/gpu_check.sh runs them).
Autocast on CUDA is in tests/test_autocast.py; FSDP2 and DDP over gloo on the
CPU in tests/test_distributed.py."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nanoblock
from conftest import assert_compiled_matches_eager
from test_distributed import batch, fsdp2, make_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def small_gpt(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = nanoblock.GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_embd=128)
    return nanoblock.GPT(cfg).to(device="cuda", dtype=dtype)


def batches(n, B=4, T=64):
    g = torch.Generator().manual_seed(2)
    return [(torch.randint(0, 97, (B, T), generator=g).cuda(),
             torch.randint(0, 97, (B, T), generator=g).cuda()) for _ in range(n)]


def train_step(model, opt, idx, targets):
    _, loss = model(idx, targets)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # gradients keep their memory (the graph's)
    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_training_step_matches_eager(dtype):
    """Forward, backward and an optimizer step captured once, replayed on
    new batches (copied into the captured inputs): the same losses and
    weights as running the steps eagerly."""
    data = batches(6)
    eager = small_gpt(dtype)
    graphed = copy.deepcopy(eager)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    graphed_opt = torch.optim.SGD(graphed.parameters(), lr=0.1)
    eager_losses = [train_step(eager, eager_opt, *b).item() for b in data[1:]]

    # Warm up on a side stream (allocations and lazy initialization happen
    # there, not in the capture), then put the weights back.
    start = copy.deepcopy(graphed.state_dict())
    static_idx, static_targets = (t.clone() for t in data[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            train_step(graphed, graphed_opt, static_idx, static_targets)
    torch.cuda.current_stream().wait_stream(side)
    graphed.load_state_dict(start)  # copies in place: the graph's tensors stay

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = train_step(graphed, graphed_opt, static_idx, static_targets)
    graphed.load_state_dict(start)  # capture does not run the step, but be sure

    graphed_losses = []
    for idx, targets in data[1:]:
        static_idx.copy_(idx)
        static_targets.copy_(targets)
        graph.replay()
        graphed_losses.append(static_loss.item())
    # Same kernels on the same data; cuBLAS may pick other algorithms inside
    # a capture, so allow their rounding, amplified by 5 steps.
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(graphed_losses, eager_losses, **tol)
    for a, b in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_gpt_on_cuda(dynamic):
    """torch.compile (inductor, fullgraph) of a nanoblock GPT on the GPU,
    forward and backward: eager's loss and gradients (float32; inductor
    fuses the embedding and the final LayerNorm its own way, so not bitwise),
    on two batch shapes."""
    torch._dynamo.reset()
    model = small_gpt()
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
    for B, T in ((4, 64), (2, 40)):
        idx, targets = batches(1, B, T)[0]
        assert_compiled_matches_eager(model, compiled, idx, targets,
                                      loss_tol=dict(rtol=1e-5, atol=1e-5),
                                      grad_tol=dict(rtol=1e-4, atol=1e-5))


def nccl_worker(rank, world, init_file, out_file):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    model = fsdp2(make_model().cuda(), "cuda")
    idx, targets = (t.cuda() for t in batch())
    share = idx.shape[0] // world
    _, loss = model(idx[rank * share:(rank + 1) * share], targets[rank * share:(rank + 1) * share])
    loss.backward()
    grads = [p.grad.full_tensor().cpu() for p in model.parameters()]
    if rank == 0:
        torch.save(grads, out_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_nccl_available(),
                    reason="needs NCCL")
def test_fsdp2_nccl_matches_single_process(tmp_path):
    """float64 on 2 GPUs where there are 2 (else 1): gradients equal one
    process's on the whole batch."""
    world = min(2, torch.cuda.device_count())
    out_file = str(tmp_path / "grads.pt")
    mp.spawn(nccl_worker, args=(world, str(tmp_path / "init"), out_file), nprocs=world,
             join=True)
    fsdp_grads = torch.load(out_file)

    model = make_model().cuda()
    idx, targets = (t.cuda() for t in batch())
    model(idx, targets)[1].backward()
    for p, g in zip(model.parameters(), fsdp_grads):
        torch.testing.assert_close(g, p.grad.cpu(), rtol=1e-10, atol=1e-12)
