"""Compile every kernel launch of the bilinear op, in every autotune config it may use, for sm_80 ... sm_90 -- no GPU.

    python -m fgvc_kernels.compile_report                  # registers, spills, shared memory, MMA, async copies
    python -m fgvc_kernels.compile_report --json out.json  # the same rows for scripts (the tests read them)

Each scenario plans the op's forward and backward launches for a realistic shape on the meta device, for each GPU
(so the autotuned launches carry the configs kept for that GPU's shared memory), then builds
what Triton's JIT would build for those arguments (unit strides as constants, 16-divisible integers and pointers
marked so) and compiles it with `triton.compile(..., target=GPUTarget("cuda", capability, 32))`. Resource usage and
instructions come from the cuobjdump bundled with Triton. Needs Triton's compiler, so TRITON_INTERPRET must be off.
A last row builds the forward kernel for sm_75 (Turing, T4) to show why the op runs its torch path (cuBLAS) there.
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
from dataclasses import dataclass
from pathlib import Path

import torch

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32"}
EVERY_TARGET = (80, 86, 89, 90)  # the GPUs the op runs its kernels on (bilinear.TRITON_MIN_CAPABILITY)
TURING = 75  # built once, in the smallest forward config, to show Triton's dot is not MMA there
TURING_JOB = ("bcnn_fp16_nchw", TURING, 0, 0)


@dataclass(frozen=True)
class Scenario:
    """A realistic call of the op: dtype, (B, C1, C2, N), cross or self, layout, options, the GPUs it is built for."""

    dtype: torch.dtype
    shape: tuple[int, int, int, int]
    cross: bool
    channels_last: bool
    targets: tuple[int, ...]
    sqrt_mode: str = "signed"
    normalize: bool = True
    center: bool = False
    out_dtype: torch.dtype | None = None
    fp32_precision: str = "highest"  # torch.set_float32_matmul_precision: "high" lets fp32 run in TF32

    def describe(self) -> str:
        batch, c1, c2, n = self.shape
        options = f"{self.sqrt_mode} sqrt" + (", L2" if self.normalize else "") + (", centred" if self.center else "")
        if self.dtype == torch.float32:
            options += f", float32 matmul precision {self.fp32_precision!r}"
        return (f"{str(self.dtype).removeprefix('torch.')} B={batch} C1={c1} C2={c2} N={n} "
                f"{'channels-last' if self.channels_last else 'NCHW'}, {options}, "
                f"sm {'/'.join(map(str, self.targets))}")


SCENARIOS = {
    "bcnn_bf16": Scenario(torch.bfloat16, (64, 512, 512, 784), False, True, EVERY_TARGET),
    "wsdan_bf16": Scenario(torch.bfloat16, (64, 32, 768, 676), True, True, EVERY_TARGET),
    "isqrt_bf16": Scenario(torch.bfloat16, (64, 256, 256, 784), False, True, EVERY_TARGET, sqrt_mode="none",
                           normalize=False, center=True, out_dtype=torch.float32),
    "isqrt_fp16": Scenario(torch.float16, (64, 256, 256, 784), False, True, EVERY_TARGET, sqrt_mode="none",
                           normalize=False, center=True, out_dtype=torch.float32),
    "bcnn_fp16_nchw": Scenario(torch.float16, (8, 512, 512, 784), False, False, EVERY_TARGET),
    "bcnn_fp32": Scenario(torch.float32, (8, 512, 512, 784), False, True, EVERY_TARGET, fp32_precision="high"),
}


def target_of(capability: int):
    """The op's target for a GPU it runs its kernels on, or Turing's (64 KB of shared memory) for the one row."""
    from fgvc_kernels import bilinear_triton

    return bilinear_triton.TARGETS.get(capability) or bilinear_triton.Target(TURING, 64 << 10)


def plan_launches(name: str, capability: int) -> list:
    """The op's launches (forward, then backward) for a scenario on one GPU, planned on the meta device: the
    autotuned ones carry the configs kept for that GPU."""
    from fgvc_kernels import bilinear_triton
    from fgvc_kernels.bilinear import saved_dtype

    scenario = SCENARIOS[name]
    batch, c1, c2, n = scenario.shape
    target = target_of(capability)

    def features(channels: int) -> torch.Tensor:
        if scenario.channels_last:
            return torch.empty(batch, n, channels, dtype=scenario.dtype, device="meta").transpose(1, 2)
        return torch.empty(batch, channels, n, dtype=scenario.dtype, device="meta")

    x, y = features(c1), features(c2) if scenario.cross else None
    options = (1.0 / n, scenario.sqrt_mode, 1e-12, scenario.normalize, scenario.center)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(scenario.fp32_precision)
    try:
        forward = bilinear_triton.forward_plan(x, y, *options, saved_dtype(scenario.out_dtype or scenario.dtype),
                                               target)
        z, norm = forward.results
        backward = bilinear_triton.backward_plan(torch.empty_like(z), z, norm, x, y, *options, target)
    finally:
        torch.set_float32_matmul_precision(precision)
    return forward.launches + backward.launches


def shared_estimate(launch, config) -> int | None:
    """The shared memory the pruning assumed for a tuned launch in `config` (None for untuned launches)."""
    from fgvc_kernels import bilinear_triton

    dtype = next(arg.dtype for arg in launch.args if isinstance(arg, torch.Tensor))
    if "BLOCK_1" in config.kwargs:
        return bilinear_triton.forward_shared_bytes(config, dtype)
    if "BLOCK_R" in config.kwargs:
        grad, out, *_ = launch.args
        reads_z = launch.constants["NORMALIZE"] or launch.constants["SQRT_MODE"] != 0
        gz_bytes = bilinear_triton.gz_bytes(grad, out.element_size() if reads_z else 0, launch.constants["SYMMETRIC"])
        return bilinear_triton.backward_shared_bytes(config, launch.args[4].dtype, gz_bytes)
    return None


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
    launch = plan_launches(scenario, capability)[launch_index]
    config = launch.configs[config_index]
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
        **numbers, "shared_bytes": compiled.metadata.shared, "estimated_shared_bytes": shared_estimate(launch, config),
        "shared_limit": target_of(capability).shared_bytes, "gemm": "tl.dot(" in source.fn.src,
        "mma": "HGMMA" in sass or "HMMA" in sass, "async_copy": "LDGSTS" in sass or "UTMALDG" in sass,
    }


def _run(*command) -> str:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def all_jobs(scenarios: list[str], targets: list[int]) -> list[tuple[str, int, int, int]]:
    return [(scenario, capability, launch_index, config_index)
            for scenario in scenarios
            for capability in SCENARIOS[scenario].targets if capability in targets
            for launch_index, launch in enumerate(plan_launches(scenario, capability))
            for config_index in range(len(launch.configs))]


def triton_version() -> str:
    import triton

    return triton.__version__


def pruned(scenario: str, capability: int) -> list[str]:
    """The configs each tuned launch of a scenario leaves out on one GPU, with the shared memory they would need."""
    import triton

    from fgvc_kernels import bilinear_triton

    lines = []
    for launch in plan_launches(scenario, capability):
        if not isinstance(launch.kernel, triton.runtime.Autotuner):
            continue
        forward = launch.kernel.fn is bilinear_triton._bilinear_forward_kernel
        every = bilinear_triton.FORWARD_CONFIGS if forward else bilinear_triton.BACKWARD_CONFIGS
        lines += [f"| {scenario} | {capability} | {launch.kernel.fn.__name__} | {_describe(config.all_kwargs())} | "
                  f"{shared_estimate(launch, config)} |" for config in every if config not in launch.configs]
    return lines


def _describe(config: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in config.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--targets", nargs="+", type=int, choices=EVERY_TARGET, default=list(EVERY_TARGET),
                        help="compute capabilities to build for (each scenario's own list, narrowed to these)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("compile_report needs Triton's compiler: unset TRITON_INTERPRET")
    with ProcessPoolExecutor(args.workers) as pool:
        *rows, turing = list(pool.map(compile_one, [*all_jobs(args.scenarios, args.targets), TURING_JOB]))
    print("# Bilinear op kernels compiled for real GPUs (no GPU used)\n")
    print(f"Command: `python -m fgvc_kernels.compile_report {' '.join(sys.argv[1:])}`, triton {triton_version()}.\n")
    print("Scenarios (forward + backward launches, as the op plans them for each GPU):\n")
    print("\n".join(f"- {name}: {SCENARIOS[name].describe()}" for name in args.scenarios) + "\n")
    print("| scenario | sm | kernel | config | registers | spilled bytes (store/load) | stack frame | shared bytes "
          "| estimate / limit | MMA | async copies |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---|---|")
    for row in rows:
        estimate = row["estimated_shared_bytes"]
        print(f"| {row['scenario']} | {row['capability']} | {row['kernel']} | {_describe(row['config'])} | "
              f"{row['registers']} | {row['spill_store_bytes']}/{row['spill_load_bytes']} | {row['stack_bytes']} | "
              f"{row['shared_bytes']} | {'-' if estimate is None else estimate} / {row['shared_limit']} | "
              f"{'yes' if row['mma'] else '-'} | {'yes' if row['async_copy'] else '-'} |")
    left_out = [line for name in args.scenarios for capability in SCENARIOS[name].targets
                if capability in args.targets for line in pruned(name, capability)]
    print("\nConfigs pruned at run time (too wide for the channels, not square in the self case, or over the GPU's "
          "shared memory by the estimate):\n")
    print("| scenario | sm | kernel | config | estimated shared bytes |\n|---|---:|---|---|---:|")
    print("\n".join(left_out))
    print(f"\nsm_75: the forward kernel ({_describe(turing['config'])}, fp16) compiles to "
          f"{'tensor-core MMA' if turing['mma'] else 'FMA, no tensor-core MMA'} with {turing['registers']} registers "
          f"and {turing['spill_store_bytes']} spilled bytes, so on Turing the op runs its torch path (cuBLAS).")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "turing": turing}, indent=1))


if __name__ == "__main__":
    main()
