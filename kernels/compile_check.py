"""Compile the three chunk-attention kernels for a CUDA architecture without a GPU (Triton ships ptxas).

This is how CPU-only machines check that the kernels build for the real target and fit its
shared memory: `python -m kernels.compile_check --arch 90 --head-dim 128 --dtype bf16`.
It must run without TRITON_INTERPRET (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "HEAD_D", "PRECISION")


def _signature(kernel, dtype_name: str) -> dict[str, str]:
    """Triton argument types by naming convention: upper-case pointers, *_scale floats, the rest i32."""
    signature = {}
    for name in kernel.arg_names:
        if name in CONSTEXPRS:
            signature[name] = "constexpr"
        elif name in ("LSE", "DELTA"):
            signature[name] = "*fp32"
        elif name.isupper():
            signature[name] = "*" + dtype_name
        elif name.endswith("scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def compile_kernels(arch: int, head_dim: int, dtype_name: str) -> dict[str, int]:
    """{kernel: shared memory bytes} after compiling forward, dK/dV and dQ to a cubin for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import chunk_attention
    from kernels.kernel_config import tile_configs

    dtype = DTYPES[dtype_name]
    configs = tile_configs(head_dim, dtype, on_cuda=True)
    kernels = {"forward": chunk_attention._fwd_kernel, "dkdv": chunk_attention._dkdv_kernel,
               "dq": chunk_attention._dq_kernel}
    shared = {}
    for name, kernel in kernels.items():
        cfg = configs[name]
        values = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_D=head_dim,
                      PRECISION="ieee" if dtype == torch.float32 else "tf32")
        constexprs = {(kernel.arg_names.index(k),): v for k, v in values.items()}
        source = ASTSource(fn=kernel, signature=_signature(kernel, dtype_name), constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        shared[name] = compiled.metadata.shared
    return shared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an int, e.g. 80, 90")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args(argv)
    for name, nbytes in compile_kernels(args.arch, args.head_dim, args.dtype).items():
        print(f"{name} {nbytes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
