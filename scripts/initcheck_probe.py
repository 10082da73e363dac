"""Does compute-sanitizer's initcheck see the writes of cuBLAS's GEMMs?

    compute-sanitizer --tool initcheck python scripts/initcheck_probe.py

A bfloat16 and a float32 GEMM (cuBLAS), then a PyTorch copy of each result:
if initcheck reports the copy kernel reading the GEMM's output as never
written, it does not track how that GEMM stores its output (on Hopper,
cuBLAS's bf16 kernels store through the tensor memory accelerator), and
every kernel that reads such an output draws false reports. scripts/
gpu_check.sh runs this beside its initcheck run of the CUDA tests, to tell
those reports from real ones.
"""
import torch

for dtype in (torch.float32, torch.bfloat16):  # float32 first: the print limit
    a = torch.randn(512, 768, device="cuda", dtype=dtype)
    b = torch.randn(768, 2304, device="cuda", dtype=dtype)
    c = a @ b
    d = c.clone()  # reads every element of the GEMM's output
    torch.cuda.synchronize()
    print(f"{dtype}: GEMM then copy done, {d.numel()} elements, "
          f"{d.numel() * d.element_size():,} bytes")
