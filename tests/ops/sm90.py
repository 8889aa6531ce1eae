"""Compile normlab's Triton kernels for an H100 (sm_90) on any machine, no GPU needed:
the interpreter runs kernels without compiling them, so this is what catches code that
only the compiler rejects (a branch touching an absent pointer, a non-constexpr
ternary). Also reads registers and spills from the cubin with the cuobjdump that ships
with triton. Run in a process without TRITON_INTERPRET.

    python -m tests.ops.sm90      # resource usage of the default launch settings
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from normlab.ops.triton import launch, norm

TARGET = GPUTarget("cuda", 90, 32)
_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def compile_sm90(kernel, types: dict, constexprs: dict, num_warps: int, num_stages: int = 3):
    """``kernel`` compiled for sm_90: ``types`` maps runtime args to Triton types (None:
    an absent pointer), ``constexprs`` the constexpr args."""
    sig, ce = {}, {}
    for i, name in enumerate(inspect.signature(kernel.fn).parameters):
        if name in constexprs or types.get(name) is None:
            sig[name] = "constexpr"
            ce[(i,)] = constexprs.get(name)
        else:
            sig[name] = types[name]
    src = ASTSource(fn=kernel, signature=sig, constexprs=ce)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def resource_usage(compiled) -> dict:
    """Registers, stack and spill bytes of a compiled kernel (cuobjdump on its cubin)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    found = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", text))
    return {k: int(v) for k, v in found.items()}


def fwd_variant(hidden: int, *, rms: bool, res: bool, dropout: bool, dtype=torch.bfloat16,
                res_dtype=None, weight=True, bias=True, strided=False, store_stats=True):
    cfg = launch.block_config(hidden)
    dt = _TYPES[dtype]
    store = res or dropout or res_dtype is not None
    types = dict(X=dt, RES=dt if res else None, W="*fp32" if weight else None,
                 B="*fp32" if bias and not rms else None, Y=dt,
                 RES_OUT=_TYPES[res_dtype or dtype] if store else None,
                 MEAN=None if rms or not store_stats else "*fp32", RSTD="*fp32" if store_stats else None,
                 stride_x="i32", stride_res="i32",
                 stride_y="i32", stride_res_out="i32", rows="i32", hidden="i32", eps="fp32",
                 seed="i64", drop_p="fp32", drop_scale="fp32", stride_x1="i32", stride_x2="i32",
                 n1="i32", n2="i32")
    kernel = norm._fwd_looped_kernel if cfg.looped else norm._fwd_kernel
    consts = dict(IS_RMS=rms, HAS_RES=res, HAS_DROPOUT=dropout, STORE_RES=store,
                  ROUND_TO_RES=store and res_dtype not in (None, dtype), HAS_W=weight,
                  HAS_B=bias and not rms, BLOCK=cfg.block, ROWS=cfg.rows, STRIDED=strided,
                  STORE_STATS=store_stats)
    return compile_sm90(kernel, types, consts, cfg.num_warps, cfg.num_stages)


def bwd_variant(hidden: int, *, rms: bool, res: bool, dropout: bool, dtype=torch.bfloat16,
                weight=True, bias=True, zero_sq=False, strided=False):
    """The backward kernel the launch settings in force pick for ``hidden`` (single-block,
    column-split or looped), compiled."""
    cfg = launch.block_config(hidden)
    dt = _TYPES[dtype]
    has_b = bias and not rms
    types = dict(DY=dt, DRES_OUT=dt if res else None, H=dt, W="*fp32" if weight else None,
                 MEAN=None if rms else "*fp32", RSTD="*fp32", DX=dt, DRES=dt if res else None,
                 DW_PART="*fp32" if weight else None, DB_PART="*fp32" if has_b else None,
                 C1="*fp32" if cfg.looped else None, C2="*fp32" if cfg.looped else None,
                 SQ="*fp32" if zero_sq else None, n_sq="i32", stride_dy="i32", stride_dres_out="i32", stride_h="i32", stride_dx="i32",
                 stride_dres="i32", hidden="i32", rows_per_example="i32",
                 rows_per_program="i32", seed="i64", drop_p="fp32", drop_scale="fp32",
                 stride_dy1="i32", stride_dy2="i32", stride_h1="i32", stride_h2="i32", n1="i32",
                 n2="i32", db_offset="i32")
    kernel, extra = norm.backward_kernel(cfg)
    consts = dict(IS_RMS=rms, HAS_DRES_OUT=res, HAS_RES=res, HAS_DROPOUT=dropout,
                  HAS_W=weight, HAS_B=has_b, BLOCK=cfg.block, ROWS=cfg.bwd_rows, ZERO_SQ=zero_sq,
                  STRIDED=strided, **extra)
    return compile_sm90(kernel, types, consts, cfg.bwd_warps, cfg.num_stages)


def reduce_variant(hidden: int, *, weight: bool, bias: bool, per_example: bool, atomic=False):
    block_c = launch._reduce_block_c(hidden)
    types = dict(PART="*fp32", OUT_W="*bf16" if weight else None, OUT_B="*bf16" if bias else None,
                 SQ="*fp32" if per_example else None, hidden="i32", n_examples="i32",
                 n_chunks="i32", n_col_blocks="i32")
    consts = dict(HAS_W=weight, HAS_B=bias, PER_EXAMPLE=per_example, BLOCK_C=block_c,
                  BLOCK_R=max(1, 4096 // block_c), ATOMIC_SQ=per_example and atomic)
    return compile_sm90(launch._reduce_partials_kernel, types, consts, 4)


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
    print("kernel | hidden | variant | REG | STACK | LOCAL")
    for hidden in (768, 1024, 2048, 4096, 8192, 12288, 16384, 32768):
        for rms in (False, True):
            for name, fn in (("fwd", fwd_variant), ("bwd", bwd_variant)):
                usage = resource_usage(fn(hidden, rms=rms, res=True, dropout=False))
                print(f"{name} | {hidden} | {'rms' if rms else 'ln'}+res | {usage.get('REG')} | "
                      f"{usage.get('STACK')} | {usage.get('LOCAL')}", flush=True)


if __name__ == "__main__":
    main()
