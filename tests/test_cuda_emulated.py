"""The CUDA kernels (cuda_kernels/csrc/ops_cuda.cu) executed on the CPU under the test emulator (tests/cuda_emu), on the
same cases as the CPU tests, against cuda_kernels/reference.py; the emulator's own rules; kernels broken on purpose.

Runs twice: "plain" (UBSan alignment check only) and "sanitized" (AddressSanitizer + UndefinedBehaviorSanitizer,
marked slow). Never a GPU result: speed, races and fast-math numerics are out of its reach (README, "Fused kernels").
"""
import math
import re

import pytest
import torch

from cuda_emu import BuildError, Emulator, EmulatorCrash, build, rewrite_launches, sanitizer_runtime
from cuda_emu.build import OPS_CUDA
from cuda_kernels import reference as R
from cuda_kernels.reference import EPS
from kernel_cases import (APGD_TOL, DTYPES, MAP_SHAPES, SIGN_TOL, apgd_cases, check_pooled_cosine_outputs, layout,
                          map_cases, pooled_cosine_cases, sign_step_cases)


def _library(variant, **kw):
    if variant == "sanitized" and sanitizer_runtime() is None:
        pytest.skip("the C++ compiler has no AddressSanitizer runtime (libasan)")
    try:
        return build(variant, **kw)
    except BuildError as e:  # a compile error of ops_cuda.cu or of the emulator fails the tests
        pytest.fail(f"building the CUDA emulator ({variant}) failed: {e}", pytrace=False)


@pytest.fixture(scope="module", params=["plain", pytest.param("sanitized", marks=pytest.mark.slow)])
def emu(request):
    with Emulator(_library(request.param)) as e:
        yield e


def _pooled(emu, s, targets, weights, eps=EPS):
    return emu.op("pooled_cosine_loss", s, list(targets), [float(w) for w in weights], float(eps))


# ---- the emulator itself -----------------------------------------------------------------------------------

def test_launch_rewrite_changes_only_the_launch_syntax():
    src = open(OPS_CUDA).read()
    text, launches = rewrite_launches(src)
    changed = [(a, b) for a, b in zip(src.splitlines(), text.splitlines()) if a != b]
    assert len(changed) == src.count("<<<") == len(launches) > 0
    for a, b in changed:
        assert "<<<" in a and "<<<" not in b and "launch(" in b
        assert re.sub(r"\s", "", a.replace("<<<", ", ").replace(">>>", ")")) == \
            re.sub(r"\s", "", b.replace("launch(", "", 1))


def test_emulator_runs_warp_primitives_and_grids_exactly(emu):
    r = emu.selftest("warp_ops")  # results are checked inside, against CUDA's documented semantics
    assert [launch["kernel"] for launch in r.launches] == ["warp_ops_kernel"]
    r = emu.selftest("grid")
    assert r.launches[0]["grid"] == [3, 2, 2] and r.launches[0]["block"] == [8, 4, 1]
    assert r.launches[0]["threads"] == 3 * 2 * 2 * 8 * 4


@pytest.mark.parametrize("scenario,message", [
    ("divergent_barrier", "different barriers"),
    ("barrier_after_exit", "exited while 40 of the block's 64 threads wait at __syncthreads"),
    ("partial_warp_shuffle", "exited while lanes 0x0000ffff wait for it in __shfl_down_sync"),
    ("lane_not_in_mask", "is not in its own mask"),
    ("shuffle_reads_outside_mask", "reads lane 16, which is not in the mask"),
    ("mismatched_masks", "divergent warp collectives"),
    ("mask_names_absent_lanes", "names lanes 0xffff0000 that do not exist"),
    ("grid_y_too_large", "CUDA error: invalid configuration argument .*gridDim.y = 65536"),
    ("empty_grid", "CUDA error: invalid configuration argument .*gridDim.x = 0"),
    ("block_too_large", "CUDA error: invalid configuration argument .*1025"),
    ("grid_narrowed", "4294967297 does not fit"),
    ("no_guard", "no CUDAGuard alive"),
    ("default_stream", "legacy default stream, not on the current stream"),
    ("unchecked_launch", "was not followed by C10_CUDA_KERNEL_LAUNCH_CHECK"),
    ("unchecked_at_return", "was not followed by C10_CUDA_KERNEL_LAUNCH_CHECK.. before the op returned"),
])
def test_emulator_refuses_what_cuda_would_refuse_or_leave_undefined(emu, scenario, message):
    with pytest.raises(RuntimeError, match=message):
        emu.selftest(scenario)
    emu.selftest("grid")  # and carries on


# ---- the same cases as the CPU tests -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_pooled_cosine_matches_reference(emu, dtype):
    for s, targets, weights in pooled_cosine_cases(dtype):
        check_pooled_cosine_outputs(_pooled(emu, s, targets, weights).value, s, targets, weights)


@pytest.mark.parametrize("shape", MAP_SHAPES)
def test_emulated_pooled_cosine_maps_of_every_size(emu, shape):
    for s, targets, weights in map_cases(shape):
        check_pooled_cosine_outputs(_pooled(emu, s, targets, weights).value, s, targets, weights)


def test_emulated_pooled_cosine_float64_and_zero_vectors(emu):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 8, 3, 3, dtype=torch.float64, generator=g)
    t = torch.randn(5, 8, 6, 6, dtype=torch.float64, generator=g)
    direct = (1 - torch.nn.functional.cosine_similarity(s.mean((2, 3)), t.mean((2, 3)), dim=1)).mean()
    torch.testing.assert_close(_pooled(emu, s, [t], [1.0]).value[0], direct, atol=1e-12, rtol=1e-12)
    z = torch.zeros(2, 4, 3, 3)
    loss, _, _, coef = _pooled(emu, z, [torch.zeros(2, 4), torch.randn(2, 4)], [1.0, 1.0]).value
    assert loss.item() == pytest.approx(2.0) and torch.isfinite(coef).all()


def test_emulated_pooled_cosine_bad_arguments(emu):
    with pytest.raises(RuntimeError, match="targets but"):
        _pooled(emu, torch.randn(2, 4, 3, 3), [torch.randn(2, 4)], [1.0, 2.0])
    with pytest.raises(RuntimeError, match="N,C"):
        _pooled(emu, torch.randn(2, 4, 3, 3), [torch.randn(2, 5)], [1.0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_sign_step_matches_reference(emu, dtype):
    for x, grad, xc in sign_step_cases(dtype):
        ref = R.sign_step_ref(x, grad, xc, 0.01, 0.03)
        out = emu.op("sign_step", x, grad, xc, 0.01, 0.03, 0.0, 1.0).value
        torch.testing.assert_close(out, ref, atol=SIGN_TOL[dtype], rtol=0)
        assert out.stride() == torch.empty_like(x).stride()
        y = emu.op("sign_step_", x.clone(), grad, xc, 0.01, 0.03, 0.0, 1.0).args[0]
        torch.testing.assert_close(y, ref, atol=SIGN_TOL[dtype], rtol=0)
        assert y.stride() == x.clone().stride()


def test_emulated_sign_step_edge_cases_and_aliasing(emu):
    x = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.02, 0.98, 0.5])
    c = torch.tensor([0.0, 1.0, 0.5, 0.47, 0.0, 1.0, 0.5])
    g = torch.tensor([-1.0, 1.0, 0.0, 1.0, 1.0, -1.0, 2.0])
    out = emu.op("sign_step", x, g, c, 0.05, 0.03, 0.0, 1.0).value
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 0.5, 0.5, 0.03, 0.97, 0.53]), atol=1e-7, rtol=0)
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 6, 6, generator=gen)
    y = x.clone()  # x_clean is x itself
    (y,) = emu.op("sign_step_", y, torch.ones_like(y), y, 0.01, 0.03, 0.0, 1.0).args[:1]
    torch.testing.assert_close(y, R.sign_step_ref(x, torch.ones_like(x), x, 0.01, 0.03), atol=0, rtol=0)
    y = x.clone() - 0.5  # the gradient is x itself: out == x == grad in the kernel
    ref = R.sign_step_ref(y, y.clone(), torch.zeros_like(y), 0.1, 1.0, -1.0, 1.0)
    (y,) = emu.op("sign_step_", y, y, torch.zeros_like(y), 0.1, 1.0, -1.0, 1.0).args[:1]
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="one dtype"):
        emu.op("sign_step", torch.rand(2, 3), torch.rand(2, 3).double(), torch.rand(2, 3), 0.1, 0.1, 0.0, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_apgd_step_matches_reference(emu, dtype):
    for x, x_prev, grad, xc, *params in apgd_cases(dtype):
        out = emu.op("apgd_step", x, x_prev, grad, xc, *map(float, params)).value
        torch.testing.assert_close(out, R.apgd_step_ref(x, x_prev, grad, xc, *params), atol=APGD_TOL[dtype], rtol=0)
        assert out.stride() == torch.empty_like(x).stride()
        if params[2] == 1.0:  # momentum 1: the sign step, exactly
            sign = emu.op("sign_step", x, grad, xc, float(params[0]), float(params[1]), float(params[3]),
                          float(params[4])).value
            torch.testing.assert_close(out, sign, atol=0, rtol=0)
    x = torch.rand(2, 3, 6, 6)
    out = emu.op("apgd_step", x, x, x, x, 0.01, 0.03, 0.75, 0.0, 1.0).value  # one tensor in every role
    torch.testing.assert_close(out, R.apgd_step_ref(x, x, x, x, 0.01, 0.03, 0.75), atol=5e-7, rtol=0)
    with pytest.raises(RuntimeError, match="momentum"):
        emu.op("apgd_step", x, x, x, x, 0.01, 0.03, -0.5, 0.0, 1.0)


# ---- the defects issue 13 lists: each of these failed on the kernels before the fix ------------------------

def test_emulated_empty_batch_is_nan_like_the_cpu(emu):
    for t in (torch.randn(0, 4, 2, 2), torch.randn(0, 4)):
        r = _pooled(emu, torch.randn(0, 4, 3, 3), [t], [1.0])
        loss, ps, pt, coef = r.value
        assert torch.isnan(loss) and ps.shape == (0, 4) and pt.shape == (1, 0, 4) and coef.shape == (0, 4)
        assert r.launches == []  # nothing to launch; a zero grid is an invalid configuration


@pytest.mark.parametrize("student_dtype,target_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                                        (torch.float16, torch.float64), (torch.bfloat16, torch.float32)])
def test_emulated_mixed_dtypes_are_converted_like_the_cpu(emu, student_dtype, target_dtype):
    g = torch.Generator().manual_seed(7)
    for kind in ("contiguous", "channels_last"):
        s = layout(torch.randn(3, 6, 4, 5, generator=g).to(student_dtype), kind)
        targets = [layout(torch.randn(3, 6, 2, 3, generator=g).to(target_dtype), kind),
                   torch.randn(3, 6, generator=g).to(target_dtype)]
        check_pooled_cosine_outputs(_pooled(emu, s, targets, [1.0, 0.5]).value, s, targets, [1.0, 0.5])


def test_emulated_channels_last_batch_of_65536(emu):
    g = torch.Generator().manual_seed(8)
    s = torch.randn(65536, 2, 1, 2, generator=g).contiguous(memory_format=torch.channels_last)
    t = torch.randn(65536, 2, generator=g)
    r = _pooled(emu, s, [t], [1.0])
    check_pooled_cosine_outputs(r.value, s, [t], [1.0])
    assert all(launch["grid"][1:] == [1, 1] for launch in r.launches)


def test_emulated_grids_are_bounded_and_one_dimensional(emu):
    """Every grid comes from a bounded int64 count (no 32-bit narrowing, no gridDim.y/z), whatever N * C is; the
    emulator itself refuses a narrowed count (test_emulator_refuses...[grid_narrowed])."""
    s, t = torch.randn(300, 300, 1, 1), torch.randn(300, 300, 2, 2)  # 90000 rows: above 65535 blocks of one row each
    r = _pooled(emu, s, [t], [1.0])
    check_pooled_cosine_outputs(r.value, s, [t], [1.0])
    for launch in r.launches:
        assert launch["grid"][1:] == [1, 1] and 1 <= launch["grid"][0] <= 65535, launch


def test_emulated_pooled_cosine_allocates_no_constants_and_never_syncs(emu):
    """No `ones` tensor per call (the upstream gradient is applied by the backward on the device) and nothing that
    reads a device value on the host."""
    s, targets, weights = next(pooled_cosine_cases())
    aten = _pooled(emu, s, targets, weights).aten
    assert not [op for op in aten if re.search(r"\.(ones|full|fill_|scalar_tensor|item|_local_scalar_dense)", op)], aten


def _kernel_signature(src, name):
    m = re.search(r"__global__\s+void\s+" + re.escape(name) + r"\s*\(([^)]*)\)", src)
    assert m, f"no __global__ {name} in ops_cuda.cu"
    return m.group(1)


def test_in_place_step_kernel_has_no_restrict_pointers(emu):
    """sign_step_ passes out == x (and grad may be x): a __restrict__ on any of its pointers is undefined behaviour,
    which no test output can show reliably, so the kernel the emulator saw launched is checked in the source."""
    x = torch.rand(4, 3, 5, 5)
    r = emu.op("sign_step_", x, x, x.clone(), 0.01, 0.03, 0.0, 1.0)
    kernels = {k.split("<")[0] for launch in r.launches for k in launch["kernel"].split(" | ")}
    assert kernels
    for kernel in kernels:
        assert "__restrict__" not in _kernel_signature(emu.lib.source, kernel), kernel


@pytest.mark.parametrize("dtype,per_thread", [(torch.float16, 8), (torch.bfloat16, 8), (torch.float32, 4),
                                              (torch.float64, 2)])
def test_emulated_sign_step_grid_sized_for_its_vector_width(emu, dtype, per_thread):
    """16-byte accesses: 8 half / bfloat16, 4 float, 2 double elements per thread, and a grid sized for that."""
    for n in (1031, 70001):
        x = torch.rand(n).to(dtype)
        r = emu.op("sign_step", x, torch.randn_like(x), x, 0.01, 0.03, 0.0, 1.0)
        (launch,) = r.launches
        assert launch["grid"][0] == math.ceil(math.ceil(n / per_thread) / launch["block"][0]), (n, launch)
        xv = torch.rand(n + 1).to(dtype)[1:]  # misaligned by one element: one element per thread
        (launch,) = emu.op("sign_step", xv, xv, xv, 0.01, 0.03, 0.0, 1.0).launches
        assert launch["grid"][0] == math.ceil(n / launch["block"][0]), (n, launch)


@pytest.mark.parametrize("hw,lanes_per_row", [((1, 1), 1), ((2, 2), 4), ((4, 4), 16), ((13, 13), 32)])
def test_emulated_small_map_pooling_keeps_lanes_busy(emu, hw, lanes_per_row):
    """Maps of 4x4 .. 13x13 (the stride-32 layers the alignment taps): several rows per block, at most one lane per
    position, instead of a 256-thread block per row."""
    s, t = torch.randn(8, 64, *hw), torch.randn(8, 64)
    r = _pooled(emu, s, [t], [1.0])
    check_pooled_cosine_outputs(r.value, s, [t], [1.0])
    (pool,) = [launch for launch in r.launches if launch["kernel"].startswith("pool")]
    assert pool["threads"] == 8 * 64 * lanes_per_row, pool


# ---- kernels broken on purpose: the emulator must catch each ---------------------------------------------------
#
# One copy of ops_cuda.cu with two independent breakages (one compile instead of two): block_sum's first barrier moved
# into a branch only half of the block takes (block_sum serves the pooling of large maps only), and the alignment
# check of the vectorised elementwise kernels removed (only the sign and APGD steps use them).
BREAKAGES = [("  if (lane == 0) warp_sums[warp] = v;\n  __syncthreads();",
              "  if (lane == 0) warp_sums[warp] = v;\n  if (warp < 4) __syncthreads();"),
             ("  if (aligned) {  // a thread per VEC elements", "  if (true) {")]


@pytest.fixture(scope="module")
def broken():
    src = open(OPS_CUDA).read()
    for old, new in BREAKAGES:
        assert src.count(old) == 1, f"the text to break is not in ops_cuda.cu once: {old!r}"
        src = src.replace(old, new)
    with Emulator(_library("plain", cu_text=src, tag="broken")) as e:
        yield e


def test_broken_kernel_barrier_in_divergent_code_is_caught(broken):
    s = torch.randn(1, 2, 40, 40)  # 1600 positions: a block per row, through block_sum
    with pytest.raises(RuntimeError, match="different barriers"):
        _pooled(broken, s, [torch.randn(1, 2)], [1.0])


def test_broken_kernel_alignment_check_removed_is_caught(broken):
    x = torch.rand(1001)
    broken.op("sign_step", x, x, x, 0.01, 0.03, 0.0, 1.0)  # aligned pointers: nothing to see
    xv = torch.rand(1002)[1:]  # 4 bytes past a 64-byte boundary: 16-byte vector accesses are misaligned
    with pytest.raises(EmulatorCrash, match="misaligned address"):
        broken.op("sign_step", xv, xv, xv, 0.01, 0.03, 0.0, 1.0)
