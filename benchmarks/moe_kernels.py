"""Triton MoE kernels vs a PyTorch baseline at the real Llama 4 Scout / Maverick MoE shapes, on a CUDA GPU.

    python benchmarks/moe_kernels.py                                  # Scout + Maverick, bf16/int4/fp8, all token counts
    python benchmarks/moe_kernels.py --models scout --formats int4 --decode 1,4 --prefill ""   # a subset
    python benchmarks/moe_kernels.py --cudagraph                     # kernel times without launch overhead
    python benchmarks/moe_kernels.py --smoke                         # tiny shapes on the CPU interpreter: checks the
                                                                      # script end to end, its numbers mean nothing

One MoE layer: hidden 5120, expert width 8192, shared expert of width 8192, 16 (Scout) or 128 (Maverick) experts,
random weights (random routing). For each format and token count it reports
- time of ``moe_forward`` (Triton; decode path for <= 16 tokens, prefill above), median of triton.testing.do_bench,
  which flushes the L2 cache between runs;
- weight bytes that must be read: only the distinct experts the tokens picked, plus the shared expert and the router;
- achieved bandwidth = those bytes / time, and its share of a measured device-to-device copy (bytes read + written / time
  of a 2 GiB ``copy_``), the practical ceiling for a memory-bound kernel; TFLOP/s for prefill;
- the PyTorch baseline (``moe_reference`` in bf16: for each picked expert, dequantize its weights, gather its tokens,
  matmuls) and the speed-up over it;
- max |kernel - fp32 torch reference| / max |reference|.
Prints a Markdown table (paste into benchmarks/KERNELS.md with the device line it prints) and, with --json, the rows.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import shlex
import sys
import time

from common import ArgumentParser, new_file, positive_ints, run_script, summary  # benchmarks/, beside this script

MODELS = {"scout": 16, "maverick": 128}  # experts; hidden 5120 and expert width 8192 for both
FORMATS = ("bf16", "int4", "fp8")
HIDDEN, INTER = 5120, 8192


def random_weights(experts: int, hidden: int, inter: int, weight_format: str, device, seed: int = 0):
    """MoEWeights at full size built expert by expert on the device (a whole fp32 copy of Maverick would be 64 GB)."""
    import torch

    from llama4_export.kernels import DenseWeight, MoEWeights, quantize_fp8, quantize_int4
    from llama4_export.kernels.formats import Fp8Weight, Int4Weight

    g = torch.Generator(device=device).manual_seed(seed)

    def matrix(count: int, k: int, n: int):
        """[count, k, n] as x @ W in the format, filled one expert at a time (each drawn in fp32, converted alone)."""
        def expert():
            return torch.randn(1, k, n, generator=g, device=device) / k**0.5

        if weight_format == "bf16":
            data = torch.empty(count, k, n, dtype=torch.bfloat16, device=device)
            for e in range(count):
                data[e] = expert()[0]
            return DenseWeight(data)
        if weight_format == "int4":
            first = quantize_int4(expert(), block=128)
            packed = first.packed.new_empty(count, *first.packed.shape[1:])
            scales = first.scales.new_empty(count, *first.scales.shape[1:])
            for e in range(count):
                q = first if e == 0 else quantize_int4(expert(), block=128)
                packed[e], scales[e] = q.packed[0], q.scales[0]
            return Int4Weight(packed, scales, k, 128)
        data = torch.empty(count, k, n, dtype=torch.float8_e4m3fn, device=device)
        scale = torch.empty(count, dtype=torch.float32, device=device)
        for e in range(count):
            q = quantize_fp8(expert())
            data[e], scale[e] = q.data[0], q.scale[0]
        return Fp8Weight(data, scale)

    gate, up = matrix(experts, hidden, 2 * inter).split_n(inter)
    router = (torch.randn(experts, hidden, generator=g, device=device) / hidden**0.5).to(torch.bfloat16)
    return MoEWeights(
        router=router, gate=gate, up=up, down=matrix(experts, inter, hidden),
        shared_gate=matrix(1, hidden, inter), shared_up=matrix(1, hidden, inter), shared_down=matrix(1, inter, hidden),
        weight_format=weight_format,
    )


def timer(device):
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA (L2 flushed between runs); wall clock on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=200, return_mode="median")

    def wall(fn):
        fn()
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - start) * 1e3)
        return sorted(runs)[1]

    return wall


def copy_bandwidth(device, measure, gib: float = 2.0) -> float:
    """Bytes read + written per second by a device-to-device copy_ of ``gib`` GiB."""
    import torch

    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = measure(functools.partial(dst.copy_, src))
    del src, dst  # the 4 GiB go back to the device before the kernels run
    return 2 * gib * 2**30 / (ms * 1e-3)


def bench_case(model: str, weight_format: str, tokens: int, weights, measure, measure_kernel, copy_bw: float,
               device) -> dict:
    import torch

    from llama4_export.kernels import moe_forward, moe_reference, route_top1

    x = torch.randn(tokens, weights.hidden_size, device=device, dtype=torch.bfloat16)
    experts, _ = route_top1(x, weights.router)
    picked = int(torch.unique(experts).numel())
    nbytes = weights.bytes_read(picked)
    path = "decode" if tokens <= 16 else "prefill"

    kernel_ms = measure_kernel(lambda: moe_forward(x, weights, path=path))
    baseline_ms = measure(lambda: moe_reference(x, weights, compute_dtype=torch.bfloat16))
    # Error on tokens whose top-2 router logits differ by > 1e-3: a near-tie may route differently in fp32 vs the kernel.
    logits = x.float() @ weights.router.float().T
    top2 = logits.topk(min(2, logits.shape[1]), dim=1).values
    clear = (top2[:, 0] - top2[:, -1]) > 1e-3 if top2.shape[1] == 2 else torch.ones_like(top2[:, 0], dtype=torch.bool)
    ref = moe_reference(x, weights, compute_dtype=torch.float32).float()[clear]
    ours = moe_forward(x, weights, path=path).float()[clear]
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    flops = 2 * tokens * 3 * weights.hidden_size * weights.intermediate_size * 2  # routed + shared expert
    bandwidth = nbytes / (kernel_ms * 1e-3)
    return {
        "model": model, "format": weight_format, "tokens": tokens, "path": path, "experts_picked": picked,
        "weight_bytes": nbytes, "kernel_ms": kernel_ms, "bandwidth_gbs": bandwidth / 1e9,
        "of_copy_bw": bandwidth / copy_bw, "tflops": flops / (kernel_ms * 1e-3) / 1e12, "baseline_ms": baseline_ms,
        "speedup": baseline_ms / kernel_ms, "rel_err_vs_fp32": err,
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| model | format | tokens | path | experts picked | weight MB read | kernel ms | GB/s | % of copy BW | "
             "TFLOP/s | PyTorch ms | speed-up | rel. err |", "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['format']} | {r['tokens']} | {r['path']} | {r['experts_picked']} | "
            f"{r['weight_bytes'] / 1e6:.1f} | {r['kernel_ms']:.3f} | {r['bandwidth_gbs']:.0f} | "
            f"{100 * r['of_copy_bw']:.0f} | "
            f"{r['tflops']:.1f} | {r['baseline_ms']:.3f} | {r['speedup']:.2f}x | {r['rel_err_vs_fp32']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = ArgumentParser(description=summary(__doc__))
    parser.add_argument("--models", default="scout,maverick")
    parser.add_argument("--formats", default="bf16,int4,fp8")
    parser.add_argument("--decode", type=positive_ints, default=None, help="decode token counts (default 1,4,16)")
    parser.add_argument("--prefill", type=positive_ints, default=None,
                        help="prefill token counts (default 512,2048; 40 with --smoke)")
    parser.add_argument("--cudagraph", action="store_true",
                        help="time the kernels replayed from a CUDA graph (no launch overhead; L2 not flushed)")
    parser.add_argument("--json", type=new_file, help="also write the rows to this JSON file")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes (hidden 128, width 64) on the CPU interpreter: exercises the script only")
    args = parser.parse_args()
    for flag, given, known in (("--models", args.models, MODELS), ("--formats", args.formats, FORMATS)):
        unknown = sorted(set(given.split(",")) - set(known))
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")

    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before llama4_export.kernels.triton_moe is imported
    import torch
    import triton

    if args.smoke:
        device, hidden, inter = torch.device("cpu"), 128, 64
    elif torch.cuda.is_available():
        device, hidden, inter = torch.device("cuda"), HIDDEN, INTER
    else:
        sys.exit("moe_kernels.py: no CUDA GPU here; run it on a GPU machine (or --smoke to check the script on the CPU)")

    decode = [1, 4, 16] if args.decode is None else args.decode
    prefill = ([40] if args.smoke else [512, 2048]) if args.prefill is None else args.prefill
    measure = timer(device)
    measure_kernel = measure
    if args.cudagraph and device.type == "cuda":  # the kernels never sync with the host, so they can be captured
        from triton.testing import do_bench_cudagraph

        measure_kernel = lambda fn: do_bench_cudagraph(fn, rep=200, return_mode="median")  # noqa: E731
    copy_bw = copy_bandwidth(device, measure, gib=0.0625 if args.smoke else 2.0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU interpreter ({platform.processor()})"
    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}; device-to-device copy {copy_bw / 1e9:.0f} GB/s")
    print(f"command: python {shlex.join(sys.argv)}\n")

    rows = []
    for model in args.models.split(","):
        for weight_format in args.formats.split(","):
            weights = random_weights(MODELS[model], hidden, inter, weight_format, device)
            for tokens in decode + prefill:
                rows.append(bench_case(model, weight_format, tokens, weights, measure, measure_kernel, copy_bw,
                                       device))
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
            del weights
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print("\n" + markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "copy_bandwidth_gbs": copy_bw / 1e9, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    run_script(main)
