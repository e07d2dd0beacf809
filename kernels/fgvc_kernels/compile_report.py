"""Compile every kernel launch of the bilinear op, in every autotune config, for real GPUs -- no GPU needed.

    python -m fgvc_kernels.compile_report                  # registers, spills, shared memory, MMA, async copies
    python -m fgvc_kernels.compile_report --json out.json  # the same rows for scripts (the tests read them)

Each scenario plans the op's forward and backward launches for a realistic shape on the meta device, then builds
what Triton's JIT would build for those arguments (unit strides as constants, 16-divisible integers and pointers
marked so) and compiles it with `triton.compile(..., target=GPUTarget("cuda", capability, 32))`. Resource usage and
instructions come from the cuobjdump bundled with Triton. Needs Triton's compiler, so TRITON_INTERPRET must be off.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# name: (dtype, (B, C1, C2, N), cross, channels-last, targets)
SCENARIOS = {
    "bcnn_bf16": (torch.bfloat16, (64, 512, 512, 784), False, True, (80, 90)),
    "wsdan_bf16": (torch.bfloat16, (64, 32, 768, 676), True, True, (80, 90)),
    "bcnn_fp16_nchw": (torch.float16, (8, 512, 512, 784), False, False, (90,)),
    "bcnn_fp32": (torch.float32, (8, 512, 512, 784), False, True, (90,)),
}


def plan_launches(scenario: str) -> list:
    """The op's launches (forward, then backward) for a scenario, planned on the meta device."""
    from fgvc_kernels import bilinear

    dtype, (batch, c1, c2, n), cross, channels_last, _ = SCENARIOS[scenario]

    def features(channels: int) -> torch.Tensor:
        if channels_last:
            return torch.empty(batch, n, channels, dtype=dtype, device="meta").transpose(1, 2)
        return torch.empty(batch, channels, n, dtype=dtype, device="meta")

    x, y = features(c1), features(c2) if cross else None
    options = (1.0 / n, "signed", 1e-12, True)
    forward = bilinear.forward_plan(x, y, *options, None)
    z, norm = forward.results
    return forward.launches + bilinear.backward_plan(torch.empty_like(z), z, norm, x, y, *options).launches


def configs_of(kernel) -> list:
    import triton

    if isinstance(kernel, triton.runtime.Autotuner):
        return kernel.configs
    return [triton.Config({}, num_warps=4, num_stages=3)]  # what a plain launch uses


def jit_source(kernel, args: tuple, constants: dict):
    """The ASTSource Triton's JIT would build for these arguments."""
    from triton.compiler import ASTSource

    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # an autotuner wraps the JITFunction
    signature, constexprs, attrs = {}, dict(constants), {}
    for index, (name, value) in enumerate(zip(fn.arg_names[: len(args)], args, strict=True)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # CUDA allocations are 256-byte aligned
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            constexprs[name] = 1  # the JIT specializes the integer 1 (unit strides) as a constant
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in constexprs})
    return ASTSource(fn, signature, constexprs, attrs)


def compile_one(job: tuple[str, int, int, int]) -> dict:
    """Compile launch `launch_index` of a scenario in autotune config `config_index` for sm_`capability`."""
    import triton
    from triton.backends.compiler import GPUTarget

    scenario, capability, launch_index, config_index = job
    launch = plan_launches(scenario)[launch_index]
    config = configs_of(launch.kernel)[config_index]
    source = jit_source(launch.kernel, launch.args, {**launch.constants, **config.kwargs})
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as scratch:
        ptx, cubin = Path(scratch, "kernel.ptx"), Path(scratch, "kernel.cubin")
        ptx.write_text(compiled.asm["ptx"])
        cubin.write_bytes(compiled.asm["cubin"])
        # ptxas -v states spills apart from the stack frame that calls (IEEE sqrt's slow path) need.
        arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
        verbose = _run(tools / "ptxas", "-v", f"--gpu-name={arch}", "-o", str(Path(scratch, "check.cubin")), str(ptx))
        sass = _run(tools / "cuobjdump", "--dump-sass", str(cubin))
    numbers = {what: int(re.search(rf"(\d+) {pattern}", verbose).group(1)) for what, pattern in [
        ("registers", "registers"), ("spill_store_bytes", "bytes spill stores"),
        ("spill_load_bytes", "bytes spill loads"), ("stack_bytes", "bytes stack frame")]}
    return {
        "scenario": scenario, "capability": capability, "kernel": source.name,
        "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
        **numbers, "shared_bytes": compiled.metadata.shared, "gemm": "tl.dot(" in source.fn.src,
        "mma": "HGMMA" in sass or "HMMA" in sass, "async_copy": "LDGSTS" in sass or "UTMALDG" in sass,
    }


def _run(*command) -> str:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def all_jobs(scenarios: list[str]) -> list[tuple[str, int, int, int]]:
    return [(scenario, capability, launch_index, config_index)
            for scenario in scenarios
            for capability in SCENARIOS[scenario][-1]
            for launch_index, launch in enumerate(plan_launches(scenario))
            for config_index in range(len(configs_of(launch.kernel)))]


def triton_version() -> str:
    import triton

    return triton.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("compile_report needs Triton's compiler: unset TRITON_INTERPRET")
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(compile_one, all_jobs(args.scenarios)))
    print("# Bilinear op kernels compiled for real GPUs (no GPU used)\n")
    print(f"Command: `python -m fgvc_kernels.compile_report {' '.join(sys.argv[1:])}`, triton {triton_version()}.")
    print("Scenarios (signed sqrt, L2, fwd + bwd launches): " + "; ".join(
        f"{name}: {str(dtype).removeprefix('torch.')} B={b} C1={c1} C2={c2} N={n} "
        f"{'channels-last' if cl else 'NCHW'}" for name, (dtype, (b, c1, c2, n), _, cl, _) in SCENARIOS.items()
        if name in args.scenarios) + "\n")
    print("| scenario | sm | kernel | config | registers | spilled bytes (store/load) | stack frame | shared bytes "
          "| MMA | async copies |")
    print("|---|---:|---|---|---:|---:|---:|---:|---|---|")
    for row in rows:
        config = " ".join(f"{k}={v}" for k, v in row["config"].items())
        print(f"| {row['scenario']} | {row['capability']} | {row['kernel']} | {config} | {row['registers']} | "
              f"{row['spill_store_bytes']}/{row['spill_load_bytes']} | {row['stack_bytes']} | {row['shared_bytes']} "
              f"| {'yes' if row['mma'] else '-'} | {'yes' if row['async_copy'] else '-'} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
