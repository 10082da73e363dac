"""What was built, for which torch/CUDA/arch, and which ops run where.

    python -m nanoblock.info

Paste its output into bug reports.
"""
import platform
import sys

import torch

import nanoblock
from nanoblock import _build_info

OPS = ("layer_norm_forward", "add_layer_norm_forward", "layer_norm_backward",
       "causal_attention_forward", "causal_attention_backward", "gelu_forward",
       "gelu_backward", "block_forward", "block_backward")


def backends_of(op):
    """The dispatch keys with a kernel registered for nanoblock::op (read from
    the dispatcher, not from the build notes)."""
    name = f"nanoblock::{op}"
    return [key for key in ("CPU", "CUDA", "AutocastCPU", "AutocastCUDA")
            if torch._C._dispatch_has_kernel_for_dispatch_key(name, key)]


def report():
    lines = [
        f"nanoblock        {nanoblock.__version__} ({nanoblock.__file__})",
        f"built            {_build_info.backend} extension: {_build_info.reason}",
        f"built against    torch {_build_info.torch_version}, CUDA {_build_info.torch_cuda_version}, "
        f"nvcc {_build_info.nvcc_version}, archs {_build_info.cuda_arch_list}",
        f"running with     torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()} on {platform.machine()}",
        f"CPU threads      {torch.get_num_threads()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}            {p.name}, sm_{p.major}{p.minor}, "
                         f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
    else:
        lines.append("GPU              none visible to torch")
    if _build_info.torch_version != torch.__version__:
        lines.append(f"WARNING          built against torch {_build_info.torch_version} but "
                     f"running {torch.__version__}: rebuild (pip install --no-build-isolation -e .)")
    lines.append("ops (backends with a registered kernel):")
    for op in OPS:
        lines.append(f"  nanoblock::{op:26s} {', '.join(backends_of(op)) or 'none'}")
    lines.append("dropout in training: in the kernels, CPU and CUDA (same rng, same masks)")
    return "\n".join(lines)


def main():
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
