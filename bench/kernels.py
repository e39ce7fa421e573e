"""Fused ops against the eager PyTorch composition of the same formula and a plain copy of the same bytes.

    python bench/kernels.py [--repeat 200] [--ops sign_step,apgd_step,pooled_cosine]

Prints a table per device: shape, dtype, eager ms, fused ms, speed-up, GB/s, % of copy bandwidth.
Not a test: figures depend on the machine; the README records the ones measured.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cuda_kernels as ck  # noqa: E402
from cuda_kernels import reference as R  # noqa: E402


def timeit(fn, repeat, device):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e3


def eager_sign_step(x, g, c, step, eps):
    # the eager composition of the formula (reference.py's twin), its result written back into x
    return R.sign_step_ref_(x, g, c, step, eps)


def bench_sign_step(device, repeat):
    rows = []
    for shape in [(16, 3, 416, 416)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.rand(shape, device=device).to(dtype)
            g, c = torch.randn_like(x), x.clone()
            nbytes = 4 * x.numel() * x.element_size()  # read x, g, c; write x
            dst = torch.empty(4 * x.numel(), device=device, dtype=dtype)
            src = torch.empty(2 * x.numel(), device=device, dtype=dtype)
            copy_ms = timeit(lambda: dst[: 2 * x.numel()].copy_(src), repeat, device)  # 2 reads + 2 writes worth
            eager = timeit(lambda: eager_sign_step(x, g, c, 0.01, 0.03), repeat, device)
            fused = timeit(lambda: ck.sign_step_(x, g, c, 0.01, 0.03), repeat, device)
            gbs = nbytes / fused / 1e6
            rows.append(("sign_step_", shape, dtype, eager, fused, eager / fused, gbs, 100 * copy_ms / fused))
    return rows


def bench_apgd_step(device, repeat):
    rows = []
    for shape in [(16, 3, 416, 416)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.rand(shape, device=device).to(dtype)
            x_prev = (x.float() + 0.01 * torch.randn_like(x, dtype=torch.float32)).clamp(0, 1).to(dtype)
            g, c = torch.randn_like(x), x.clone()
            n = x.numel()
            nbytes = 5 * n * x.element_size()  # read x, x_prev, grad, x_clean; write the result
            src = torch.empty(5 * n // 2, device=device, dtype=dtype)
            dst = torch.empty_like(src)
            copy_ms = timeit(lambda: dst.copy_(src), repeat, device)  # 2.5 reads + 2.5 writes worth
            eager = timeit(lambda: R.apgd_step_ref(x, x_prev, g, c, 0.01, 0.03, 0.75), repeat, device)
            fused = timeit(lambda: ck.apgd_step(x, x_prev, g, c, 0.01, 0.03, 0.75), repeat, device)
            rows.append(("apgd_step", shape, dtype, eager, fused, eager / fused, nbytes / fused / 1e6,
                         100 * copy_ms / fused))
    return rows


def bench_pooled_cosine(device, repeat):
    rows = []
    for shape in [(64, 1024, 13, 13), (64, 256, 4, 4)]:
        for dtype in (torch.float32,):
            s = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
            t1 = torch.randn(shape, device=device, dtype=dtype)
            t2 = torch.randn(shape, device=device, dtype=dtype)

            def eager():
                loss = R.pooled_cosine_loss_ref(s, [t1, t2], [10.0, 10.0])
                (g,) = torch.autograd.grad(loss, s)

            def fused():
                loss = ck.pooled_cosine_loss(s, [t1, t2], [10.0, 10.0])
                (g,) = torch.autograd.grad(loss, s)

            nbytes = 4 * s.numel() * s.element_size()  # read s, t1, t2; write grad
            src = torch.empty(2 * s.numel(), device=device, dtype=dtype)
            dst = torch.empty_like(src)
            copy_ms = timeit(lambda: dst.copy_(src), repeat, device)
            e, f = timeit(eager, repeat, device), timeit(fused, repeat, device)
            rows.append(("pooled_cosine fwd+bwd", shape, dtype, e, f, e / f, nbytes / f / 1e6, 100 * copy_ms / f))
    return rows


def print_table(title, rows):
    print(f"\n{title}")
    hdr = f"{'op':<22} {'shape':<20} {'dtype':<9} {'eager ms':>9} {'fused ms':>9} {'speed-up':>8} {'GB/s':>7} {'% copy':>7}"
    print(hdr)
    print("-" * len(hdr))
    for op, shape, dtype, e, f, sp, gbs, pc in rows:
        print(f"{op:<22} {str(list(shape)):<20} {str(dtype).replace('torch.', ''):<9} {e:9.2f} {f:9.2f} "
              f"{sp:7.1f}x {gbs:7.1f} {pc:6.0f}%")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--ops", default="sign_step,apgd_step,pooled_cosine",
                    help="comma-separated subset of sign_step, apgd_step, pooled_cosine")
    args = ap.parse_args()
    benches = {"sign_step": bench_sign_step, "apgd_step": bench_apgd_step, "pooled_cosine": bench_pooled_cosine}
    chosen = [benches[name] for name in args.ops.split(",")]
    ck.load(require=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print_table("CPU", [row for bench in chosen for row in bench("cpu", args.repeat)])
    if torch.cuda.is_available():
        print_table(f"CUDA ({torch.cuda.get_device_name()})",
                    [row for bench in chosen for row in bench("cuda", args.repeat)])
    else:
        print("\nCUDA: no device on this machine, CUDA table skipped")


if __name__ == "__main__":
    main()
