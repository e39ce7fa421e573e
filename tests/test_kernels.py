"""Fused ops against their pure-PyTorch twins: dtypes, layouts, odd shapes, gradcheck, opcheck, edge cases."""
import os

import pytest
import torch

import cuda_kernels as ck
from cuda_kernels import reference as R
from cuda_kernels.build import cuda_build_possible, cuda_wanted

from kernel_cases import (APGD_TOL, CUDA_TOL, DTYPES, MAP_SHAPES, SIGN_TOL, TOL, apgd_cases,
                          check_pooled_cosine_outputs, map_cases, pooled_cosine_cases, sign_step_cases)
from kernel_cases import layout as _layout

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def sample_inputs(device="cpu", dtype=torch.float32):
    yield from pooled_cosine_cases(dtype, device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pooled_cosine_forward_backward_matches_reference(dtype):
    atol, rtol = TOL[dtype]
    for s, targets, weights in sample_inputs(dtype=dtype):
        s1 = s.detach().clone().requires_grad_(True)
        s2 = s.detach().clone().requires_grad_(True)
        out = ck.pooled_cosine_loss(s1, targets, weights)
        ref = R.pooled_cosine_loss_ref(s2, targets, weights)
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
        upstream = torch.tensor(-2.5, dtype=out.dtype)  # not 1
        (out * upstream).backward()
        (ref * upstream).backward()
        assert s1.grad.dtype == dtype and s1.grad.shape == s.shape
        torch.testing.assert_close(s1.grad.float(), s2.grad.float(), atol=atol * 10, rtol=rtol * 10)
        if s.is_contiguous(memory_format=torch.channels_last) and not s.is_contiguous():
            assert s1.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", MAP_SHAPES)
def test_pooled_cosine_float32_fast_path_matches_reference(shape):
    """The float32 path for small maps: eight rows at a time with vector loads (H*W a multiple of 8 or not: scalar
    tails), C not a multiple of 8 (tail rows), H*W below 8, and larger maps (ATen pooling), student and
    same-shape targets, both layouts, against the pure-PyTorch twin; the op's raw outputs too."""
    for s, targets, weights in map_cases(shape):
        s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        out = ck.pooled_cosine_loss(s1, targets, weights)
        ref = R.pooled_cosine_loss_ref(s2, targets, weights)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        out.backward()
        ref.backward()
        torch.testing.assert_close(s1.grad, s2.grad, atol=1e-7, rtol=1e-4)
        check_pooled_cosine_outputs(torch.ops.fa_kernels.pooled_cosine_loss(s, targets, weights, ck.EPS), s, targets,
                                    weights)


def test_pooled_cosine_empty_batch_is_nan():
    """N = 0: the mean over no rows, NaN, with empty pooled features and coefficients (the CUDA op does the same)."""
    for s, t in [(torch.randn(0, 4, 3, 3), torch.randn(0, 4, 2, 2)), (torch.randn(0, 4, 3, 3), torch.randn(0, 4))]:
        loss, ps, pt, coef = torch.ops.fa_kernels.pooled_cosine_loss(s, [t], [1.0], ck.EPS)
        assert torch.isnan(loss) and ps.shape == (0, 4) and pt.shape == (1, 0, 4) and coef.shape == (0, 4)
        assert torch.isnan(R.pooled_cosine_loss_ref(s, [t], [1.0]))


@pytest.mark.parametrize("student_dtype,target_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                                        (torch.float16, torch.float64), (torch.bfloat16, torch.float32)])
def test_pooled_cosine_mixed_dtypes_are_converted(student_dtype, target_dtype):
    """Targets of another floating dtype are pooled in the student's accumulation type, as reference.py does."""
    g = torch.Generator().manual_seed(7)
    for kind in ("contiguous", "channels_last"):
        s = _layout(torch.randn(3, 6, 4, 5, generator=g).to(student_dtype), kind)
        targets = [_layout(torch.randn(3, 6, 2, 3, generator=g).to(target_dtype), kind),
                   torch.randn(3, 6, generator=g).to(target_dtype)]
        check_pooled_cosine_outputs(torch.ops.fa_kernels.pooled_cosine_loss(s, targets, [1.0, 0.5], ck.EPS), s,
                                    targets, [1.0, 0.5])


def test_pooled_cosine_channels_last_batch_of_65536():
    """A batch above gridDim.y's 65535 (the CUDA kernels once put N there)."""
    g = torch.Generator().manual_seed(8)
    s = torch.randn(65536, 2, 1, 2, generator=g).contiguous(memory_format=torch.channels_last)
    t = torch.randn(65536, 2, generator=g)
    check_pooled_cosine_outputs(torch.ops.fa_kernels.pooled_cosine_loss(s, [t], [1.0], ck.EPS), s, [t], [1.0])


def test_pooled_cosine_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    for shape in [(2, 3, 4, 5), (1, 6, 1, 1), (3, 4, 7, 9)]:
        s = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
        t1 = torch.randn(shape[0], shape[1], 3, 3, dtype=torch.float64, generator=g)
        t2 = torch.randn(shape[0], shape[1], dtype=torch.float64, generator=g)
        assert torch.autograd.gradcheck(lambda x: ck.pooled_cosine_loss(x, [t1, t2], [0.5, 2.0]), (s,))
        assert torch.autograd.gradcheck(lambda x: ck.pooled_cosine_loss(x.contiguous(memory_format=torch.channels_last),
                                                                         [t1], [1.0]), (s,))


def test_pooled_cosine_matches_equation_terms_in_float64():
    """Independent float64 computation of 1 - cos with F.cosine_similarity on the pooled features."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 8, 3, 3, dtype=torch.float64, generator=g)
    t = torch.randn(5, 8, 6, 6, dtype=torch.float64, generator=g)
    direct = (1 - torch.nn.functional.cosine_similarity(s.mean((2, 3)), t.mean((2, 3)), dim=1)).mean()
    torch.testing.assert_close(ck.pooled_cosine_loss(s, [t], [1.0]), direct, atol=1e-12, rtol=1e-12)


def test_pooled_cosine_zero_vectors_are_finite():
    s = torch.zeros(2, 4, 3, 3, requires_grad=True)
    t = torch.zeros(2, 4)
    loss = ck.pooled_cosine_loss(s, [t, torch.randn(2, 4)], [1.0, 1.0])
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(2.0)  # cos = 0 for both terms
    assert torch.isfinite(s.grad).all()


def test_pooled_cosine_targets_get_no_gradient():
    s = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.randn(2, 4, 3, 3, requires_grad=True)
    ck.pooled_cosine_loss(s, [t], [1.0]).backward()
    assert t.grad is None and s.grad is not None


def test_pooled_cosine_bad_arguments():
    with pytest.raises(RuntimeError, match="targets but"):
        ck.pooled_cosine_loss(torch.randn(2, 4, 3, 3), [torch.randn(2, 4)], [1.0, 2.0])
    with pytest.raises(RuntimeError, match="N,C"):
        ck.pooled_cosine_loss(torch.randn(2, 4, 3, 3), [torch.randn(2, 5)], [1.0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_step_matches_reference(dtype):
    for x, grad, xc in sign_step_cases(dtype):
        ref = R.sign_step_ref(x, grad, xc, 0.01, 0.03)
        out = ck.sign_step(x, grad, xc, 0.01, 0.03)
        torch.testing.assert_close(out, ref, atol=SIGN_TOL[dtype], rtol=0)
        assert out.stride() == torch.empty_like(x).stride()  # x's layout, as the fake kernel says
        y = x.clone()
        ck.sign_step_(y, grad, xc, 0.01, 0.03)
        torch.testing.assert_close(y, ref, atol=SIGN_TOL[dtype], rtol=0)
        assert y.stride() == x.clone().stride()  # in place keeps the layout


def test_sign_step_edge_cases():
    x = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.02, 0.98, 0.5])
    c = torch.tensor([0.0, 1.0, 0.5, 0.47, 0.0, 1.0, 0.5])
    g = torch.tensor([-1.0, 1.0, 0.0, 1.0, 1.0, -1.0, 2.0])
    out = ck.sign_step(x, g, c, 0.05, 0.03)
    # on the [0,1] bounds, zero gradient (no move), the eps-ball bound exactly, clipped to the ball
    expected = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.03, 0.97, 0.53])
    torch.testing.assert_close(out, expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(out, R.sign_step_ref(x, g, c, 0.05, 0.03), atol=0, rtol=0)
    # eps = 0 is the identity on the clean image
    xr = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(ck.sign_step(xr, torch.randn_like(xr), xr, 0.1, 0.0), xr, atol=0, rtol=0)


def test_sign_step_in_place_aliasing():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 6, 6, generator=g)
    # x_clean is x itself: the result must equal x (eps-ball of radius eps around x, step within it)
    ref = R.sign_step_ref(x, torch.ones_like(x), x.clone(), 0.01, 0.03)
    y = x.clone()
    ck.sign_step_(y, torch.ones_like(y), y, 0.01, 0.03)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    # the gradient is x itself
    y = x.clone() - 0.5
    ref = R.sign_step_ref(y, y.clone(), torch.zeros_like(y), 0.1, 1.0, -1.0, 1.0)
    ck.sign_step_(y, y, torch.zeros_like(y), 0.1, 1.0, -1.0, 1.0)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)


def test_sign_step_bad_arguments():
    with pytest.raises(RuntimeError, match="same shape"):
        ck.sign_step(torch.rand(2, 3), torch.rand(2, 4), torch.rand(2, 3), 0.1, 0.1)
    with pytest.raises(RuntimeError, match="one dtype"):
        ck.sign_step(torch.rand(2, 3), torch.rand(2, 3).double(), torch.rand(2, 3), 0.1, 0.1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_apgd_step_matches_reference(dtype):
    for x, x_prev, grad, xc, step, eps, momentum, lo, hi in apgd_cases(dtype):
        before = [t.clone() for t in (x, x_prev, grad, xc)]
        out = ck.apgd_step(x, x_prev, grad, xc, step, eps, momentum, lo, hi)
        ref = R.apgd_step_ref(x, x_prev, grad, xc, step, eps, momentum, lo, hi)
        torch.testing.assert_close(out, ref, atol=APGD_TOL[dtype], rtol=0)
        assert out.dtype == dtype and out.stride() == torch.empty_like(x).stride()
        for t, b in zip((x, x_prev, grad, xc), before):  # out of place: the inputs are unchanged
            torch.testing.assert_close(t, b, atol=0, rtol=0)
        # inside the ball (up to the result's rounding into dtype) and the box
        slack = APGD_TOL[dtype] + 1e-6
        assert ((out.double() - xc.double()).abs() <= eps + slack).all()
        assert (out >= lo).all() and (out <= hi).all()


def test_apgd_step_formula_and_special_cases():
    x = torch.tensor([0.50, 0.50, 0.50, 0.50, 0.02, 0.98, 0.50])
    x_prev = torch.tensor([0.48, 0.52, 0.50, 0.47, 0.00, 1.00, 0.49])
    c = torch.tensor([0.50, 0.50, 0.50, 0.47, 0.00, 1.00, 0.50])
    g = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, -1.0, -2.0])
    out = ck.apgd_step(x, x_prev, g, c, 0.02, 0.03, 0.75)
    # by hand: z = P(x + 0.02 sign g); y = P(0.75 z + 0.25 (2x - x_prev))
    z = torch.tensor([0.52, 0.52, 0.50, 0.50, 0.03, 0.97, 0.48])
    expected = (0.75 * z + 0.25 * (2 * x - x_prev))
    expected = torch.minimum(torch.maximum(expected, c - 0.03), c + 0.03).clamp(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # momentum 1 is the plain projected sign step, exactly
    for x, x_prev, grad, xc, step, eps, _, lo, hi in apgd_cases(torch.float32):
        torch.testing.assert_close(ck.apgd_step(x, x_prev, grad, xc, step, eps, 1.0, lo, hi),
                                   ck.sign_step(x, grad, xc, step, eps, lo, hi), atol=0, rtol=0)
    # the first iterate (x_prev = x) has no momentum term; eps = 0 is the identity on the clean image
    xr = torch.rand(2, 3, 5, 5)
    gr = torch.randn_like(xr)
    torch.testing.assert_close(ck.apgd_step(xr, xr, gr, xr, 0.1, 0.0), xr, atol=0, rtol=0)
    x0 = (xr + 0.01).clamp(0, 1)
    torch.testing.assert_close(ck.apgd_step(x0, x0, gr, xr, 0.01, 0.03, 0.75),
                               R.apgd_step_ref(x0, x0, gr, xr, 0.01, 0.03, 0.75), atol=5e-7, rtol=0)


def test_apgd_step_aliasing_and_bad_arguments():
    g = torch.Generator().manual_seed(6)
    x = torch.rand(2, 3, 6, 6, generator=g)
    for args in [(x, x, x, x), (x, x.clone(), x, x.clone())]:  # one tensor in several roles
        ref = R.apgd_step_ref(*[a.clone() for a in args], 0.01, 0.03, 0.75)
        torch.testing.assert_close(ck.apgd_step(*args, 0.01, 0.03, 0.75), ref, atol=5e-7, rtol=0)
    with pytest.raises(RuntimeError, match="same shape"):
        ck.apgd_step(x, x[:1], x, x, 0.01, 0.03)
    with pytest.raises(RuntimeError, match="one dtype"):
        ck.apgd_step(x, x.double(), x, x, 0.01, 0.03)
    with pytest.raises(RuntimeError, match="momentum"):
        ck.apgd_step(x, x, x, x, 0.01, 0.03, 1.5)


def test_opcheck():
    assert ck.load(require=True)
    for s, targets, weights in list(sample_inputs())[::3]:
        torch.library.opcheck(torch.ops.fa_kernels.pooled_cosine_loss, (s.requires_grad_(True), targets, weights, 1e-8))
    x = torch.rand(2, 3, 5, 7)
    for args in [(x.clone(), torch.randn_like(x), x.clone(), 0.01, 0.03, 0.0, 1.0)]:
        torch.library.opcheck(torch.ops.fa_kernels.sign_step, args)
        torch.library.opcheck(torch.ops.fa_kernels.sign_step_, args)
    for x, x_prev, grad, xc, *params in list(apgd_cases(torch.float32))[::4]:
        torch.library.opcheck(torch.ops.fa_kernels.apgd_step, (x, x_prev, grad, xc, *map(float, params)))


def test_ops_under_torch_compile():
    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(s, t, x, g, c):
        loss = ck.pooled_cosine_loss(s, [t], [2.0])
        return loss, ck.sign_step(x, g, c, 0.01, 0.03), ck.apgd_step(x, c, g, c, 0.01, 0.03)

    s = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.randn(2, 4)
    x = torch.rand(2, 3, 4, 4)
    g = torch.randn_like(x)
    loss, y, z = f(s, t, x, g, x)
    loss.backward()
    s2 = s.detach().clone().requires_grad_(True)
    R.pooled_cosine_loss_ref(s2, [t], [2.0]).backward()
    torch.testing.assert_close(loss, R.pooled_cosine_loss_ref(s.detach(), [t], [2.0]))
    torch.testing.assert_close(s.grad, s2.grad)
    torch.testing.assert_close(y, R.sign_step_ref(x, g, x, 0.01, 0.03))
    torch.testing.assert_close(z, R.apgd_step_ref(x, x, g, x, 0.01, 0.03))


def test_cuda_sources_were_compiled_in_this_run():
    possible, why = cuda_build_possible()
    if not possible:
        pytest.skip(f"no CUDA toolchain here: {why}")
    wanted, why = cuda_wanted()
    if not wanted:
        pytest.skip(f"the CUDA sources are not compiled in this run: {why} (`make test` sets FA_KERNELS_CUDA=1)")
    m = ck.manifest()
    assert m["cuda_compiled"], m
    assert "ops_cuda.cuda.o" in m["objects"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fa_kernels::sign_step", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fa_kernels::pooled_cosine_loss", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fa_kernels::apgd_step", "CUDA")
    # the object was compiled from these very sources: the build folder is named by their digest and compiles a
    # copy of them, and the object is newer than that copy; `make test` builds into a folder of the checkout
    # (FA_KERNELS_BUILD), empty in a fresh clone
    obj = os.path.join(m["build_dir"], "ops_cuda.cuda.o")
    staged = os.path.join(m["build_dir"], "src", "ops_cuda.cu")
    src = os.path.join(os.path.dirname(ck.__file__), "csrc", "ops_cuda.cu")
    assert open(staged, "rb").read() == open(src, "rb").read()
    assert os.path.getmtime(obj) >= os.path.getmtime(staged)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    """The CUDA ops against the reference on the CPU, with CUDA_TOL (kernel_cases.py: --use_fast_math)."""
    atol, rtol = CUDA_TOL[dtype]
    for s, targets, weights in sample_inputs("cuda", dtype):
        s1 = s.detach().clone().requires_grad_(True)
        out = ck.pooled_cosine_loss(s1, targets, weights)
        (out * 3).backward()
        s2 = s.detach().cpu().clone().requires_grad_(True)
        ref = R.pooled_cosine_loss_ref(s2, [t.cpu() for t in targets], weights)
        (ref * 3).backward()
        torch.testing.assert_close(out.cpu(), ref, atol=atol, rtol=rtol)
        torch.testing.assert_close(s1.grad.cpu().float(), s2.grad.float(), atol=atol * 10, rtol=rtol * 10)
    x = torch.rand(3, 3, 37, 41, device="cuda", dtype=dtype)
    g = torch.randn_like(x)
    torch.testing.assert_close(ck.sign_step(x, g, x, 0.01, 0.03), R.sign_step_ref(x, g, x, 0.01, 0.03),
                               atol=SIGN_TOL[dtype], rtol=0)
    # an unaligned view exercises the scalar path
    xv, gv = x.view(-1)[1:].clone()[:-1], g.view(-1)[1:][:-1]
    torch.testing.assert_close(ck.sign_step(xv, gv, xv, 0.01, 0.03), R.sign_step_ref(xv, gv, xv, 0.01, 0.03),
                               atol=SIGN_TOL[dtype], rtol=0)
    for x, x_prev, grad, xc, *params in apgd_cases(dtype):
        args = [t.cuda() for t in (x, x_prev, grad, xc)]
        torch.testing.assert_close(ck.apgd_step(*args, *params).cpu(), R.apgd_step_ref(x, x_prev, grad, xc, *params),
                                   atol=APGD_TOL[dtype], rtol=0)


@needs_gpu
def test_cuda_opcheck_and_gradcheck():
    s = torch.randn(2, 3, 4, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    t = torch.randn(2, 3, device="cuda", dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: ck.pooled_cosine_loss(x, [t], [1.0]), (s,))
    torch.library.opcheck(torch.ops.fa_kernels.pooled_cosine_loss, (s, [t], [1.0], 1e-8))
