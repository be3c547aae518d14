"""Parameter-update kernels: the numpy path against torch.optim.Adam and the method's
alignment rule; the CUDA source compiles cleanly; the CUDA path against the numpy path
(on a machine with a GPU)."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from grata import kernels

BETA = 1e-4
BETAS = (0.9, 0.999)
EPS = 1e-8
STEPS = 3
LENGTHS = [1, 1000, 19136, 10**6]
U32 = 2.0**-24  # unit roundoff of float32

KERNEL_SOURCE = os.path.join(os.path.dirname(kernels.__file__), "grata_update.cu")


# ---------------------------------------------------------------- independent references


def torch_cos(gp: torch.Tensor, ga: torch.Tensor) -> float:
    """The method's cos, written with torch ops, in float64."""
    gp, ga = gp.double(), ga.double()
    return float(torch.dot(gp, ga) / (gp.norm() * ga.norm() + 1e-12))


def torch_reference(theta0, grads, dtype, lrs=None):
    """theta, m, v (numpy) and the cos of each step after len(grads) steps of
    torch.optim.Adam; lr = beta * (cos + 1)^2 / 4 per step unless lrs are given."""
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=dtype))
    opt = torch.optim.Adam([p], lr=1.0, betas=BETAS, eps=EPS, weight_decay=0.0)
    coss = []
    for k, (gp, ga) in enumerate(grads):
        gp_t, ga_t = torch.tensor(gp, dtype=dtype), torch.tensor(ga, dtype=dtype)
        if lrs is None:
            cos = torch_cos(gp_t, ga_t)
            lr = BETA * (cos + 1.0) ** 2 / 4.0
            coss.append(cos)
        else:
            lr = lrs[k]
        opt.param_groups[0]["lr"] = lr
        p.grad = gp_t.clone()
        opt.step()
    st = opt.state[p]
    return (p.detach().numpy().copy(), st["exp_avg"].numpy().copy(),
            st["exp_avg_sq"].numpy().copy(), coss)


def random_problem(n, dtype, seed, steps=STEPS):
    rng = np.random.default_rng(seed)
    theta = rng.uniform(0.5, 1.5, n) * rng.choice([-1.0, 1.0], n)  # away from 0
    grads = []
    for _ in range(steps):
        gp = rng.standard_normal(n) * 1e-3
        ga = 0.3 * gp + rng.standard_normal(n) * 1e-3  # correlated: cos well inside (-1, 1)
        grads.append((gp.astype(dtype), ga.astype(dtype)))
    return theta.astype(dtype), grads


def run_numpy(theta0, grads, update="grata", lrs=None):
    theta = theta0.copy()
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    coss = []
    for t, (gp, ga) in enumerate(grads, start=1):
        if update == "grata":
            coss.append(kernels.grata_update(theta, m, v, gp, ga, t, BETA, BETAS, EPS))
        else:
            kernels.adam_update(theta, m, v, gp, t, lrs[t - 1], BETAS, EPS)
    return theta, m, v, coss


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def float64_reference_delta(theta0, grads):
    """theta after the steps, in float64 from the (float32) inputs: the exact target of
    the float32 computation."""
    g64 = [(gp.astype(np.float64), ga.astype(np.float64)) for gp, ga in grads]
    theta, _, _, _ = run_numpy(theta0.astype(np.float64), g64)
    return theta


# ---------------------------------------------------------------- numpy path vs torch


@pytest.mark.parametrize("n", LENGTHS)
def test_grata_numpy_float64_matches_torch_adam(n):
    theta0, grads = random_problem(n, np.float64, seed=n)
    theta, m, v, coss = run_numpy(theta0, grads)
    t_theta, t_m, t_v, t_coss = torch_reference(theta0, grads, torch.float64)
    assert rel_err(coss, t_coss) <= 1e-6
    for got, want in ((theta, t_theta), (m, t_m), (v, t_v)):
        assert rel_err(got, want) <= 1e-6
    # The update itself (theta moved by ~1e-4): checks eta, not only theta's magnitude.
    assert rel_err(theta - theta0, t_theta - theta0) <= 1e-6


@pytest.mark.parametrize("n", LENGTHS)
def test_grata_numpy_float32_matches_torch_adam(n):
    """float32: the elementwise arithmetic runs in float32 in both implementations, in a
    slightly different order (torch: lerp for m, addcdiv), so results differ by float32
    roundings of the *operands*. theta (kept away from 0) and v (no cancellation) agree to
    1e-6 relative elementwise; m, where b1*m and (1-b1)*g can cancel, to 1e-6 of the
    result plus a floor of 1e-6 of its RMS. The learning rate is checked on the update
    itself against a float64 computation from the same float32 inputs: there the bound
    is float32's resolution of theta (a few ulp of |theta| over the steps)."""
    theta0, grads = random_problem(n, np.float32, seed=n + 1)
    theta, m, v, coss = run_numpy(theta0, grads)
    assert theta.dtype == m.dtype == v.dtype == np.float32
    t_theta, t_m, t_v, t_coss = torch_reference(theta0, grads, torch.float32)
    assert rel_err(coss, t_coss) <= 1e-6
    assert rel_err(theta, t_theta) <= 1e-6
    assert rel_err(v, t_v) <= 1e-6
    m_floor = 1e-6 * float(np.sqrt(np.mean(t_m.astype(np.float64) ** 2)))
    assert np.all(np.abs(m.astype(np.float64) - t_m) <= 1e-6 * np.abs(t_m) + m_floor)

    ref = float64_reference_delta(theta0, grads)
    delta32 = theta.astype(np.float64) - theta0
    delta64 = ref - theta0
    bound = 1e-4 * np.abs(delta64) + 2 * STEPS * U32 * np.abs(theta0.astype(np.float64))
    assert np.all(np.abs(delta32 - delta64) <= bound)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n", [1, 1000, 19136])
def test_adam_numpy_matches_torch_adam(n, dtype):
    theta0, grads = random_problem(n, dtype, seed=7 * n)
    lrs = [1e-4, 3e-4, 1e-3]
    theta, m, v, _ = run_numpy(theta0, grads, update="adam", lrs=lrs)
    t_theta, t_m, t_v, _ = torch_reference(theta0, grads, torch.from_numpy(theta0).dtype, lrs)
    assert rel_err(theta, t_theta) <= 1e-6
    assert rel_err(v, t_v) <= 1e-6
    if dtype == np.float64:
        assert rel_err(m, t_m) <= 1e-6
        assert rel_err(theta - theta0, t_theta - theta0) <= 1e-6


def test_adam_update_returns_none():
    theta, m, v = np.ones(5), np.zeros(5), np.zeros(5)
    assert kernels.adam_update(theta, m, v, np.full(5, 0.1), 1, 1e-3) is None
    # First Adam step moves every coordinate by lr * g / (|g| + eps') ~ lr.
    assert np.allclose(theta, 1 - 1e-3, rtol=0, atol=1e-9)


# ---------------------------------------------------------------- the alignment rule


def one_step(gp, ga, theta=None):
    n = gp.shape[0]
    theta = np.linspace(0.5, 1.5, n) if theta is None else theta
    theta0 = theta.copy()
    m, v = np.zeros(n), np.zeros(n)
    cos = kernels.grata_update(theta, m, v, gp, ga, 1, BETA, BETAS, EPS)
    return cos, theta0, theta, m, v


def first_step_delta(lr, gp):
    """First Adam step from zero moments: m_hat = g, sqrt(v_hat) = |g|, so
    theta -= lr * g / (|g| + eps)."""
    return -lr * gp / (np.abs(gp) + EPS)


def test_auxiliary_gradient_zero_gives_quarter_rate():
    rng = np.random.default_rng(0)
    gp = rng.standard_normal(257)
    cos, theta0, theta, _, _ = one_step(gp, np.zeros(257))
    assert cos == 0.0
    assert np.allclose(theta - theta0, first_step_delta(BETA / 4, gp), rtol=1e-9, atol=0)


def test_opposite_gradients_freeze_theta_but_update_moments():
    rng = np.random.default_rng(1)
    gp = rng.standard_normal(1000) * 1e-2
    cos, theta0, theta, m, v = one_step(gp, -gp)
    assert cos == pytest.approx(-1.0, abs=1e-9)
    assert np.array_equal(theta, theta0)  # eta ~ beta * 1e-20: below theta's resolution
    assert np.allclose(m, (1 - BETAS[0]) * gp, rtol=1e-12)
    assert np.allclose(v, (1 - BETAS[1]) * gp**2, rtol=1e-12)


def test_equal_gradients_give_full_rate():
    rng = np.random.default_rng(2)
    gp = rng.standard_normal(1000) * 1e-2
    cos, theta0, theta, _, _ = one_step(gp, gp.copy())
    assert cos == pytest.approx(1.0, abs=1e-9)
    assert np.allclose(theta - theta0, first_step_delta(BETA, gp), rtol=1e-6, atol=0)


def test_learning_rate_rule():
    assert kernels.lr_from_cos(1.0, 2.0) == 2.0
    assert kernels.lr_from_cos(0.0, 2.0) == 0.5
    assert kernels.lr_from_cos(-1.0, 2.0) == 0.0


def test_reduction_matches_exact_sums_and_ignores_order():
    """cos against math.fsum (exactly rounded float64 sums) and against the same vectors in
    another order: the pairwise sums stay within a few ulps of the exact value."""
    import math
    rng = np.random.default_rng(3)
    gp = rng.standard_normal(10**5)
    ga = rng.standard_normal(10**5) + 0.3 * gp
    exact = math.fsum(gp * ga) / (math.sqrt(math.fsum(gp * gp)) * math.sqrt(math.fsum(ga * ga))
                                  + 1e-12)
    assert kernels.alignment(gp, ga) == pytest.approx(exact, rel=1e-13, abs=0)
    perm = rng.permutation(gp.size)
    assert kernels.alignment(gp[perm], ga[perm]) == pytest.approx(exact, rel=1e-13, abs=0)
    # float32 inputs are summed in float64: no float32 accumulation error
    g32p, g32a = gp.astype(np.float32), ga.astype(np.float32)
    p64, a64 = g32p.astype(np.float64), g32a.astype(np.float64)
    exact32 = math.fsum(p64 * a64) / (math.sqrt(math.fsum(p64 * p64))
                                      * math.sqrt(math.fsum(a64 * a64)) + 1e-12)
    assert kernels.alignment(g32p, g32a) == pytest.approx(exact32, rel=1e-13, abs=0)


def test_cos_out_and_torch_cpu_tensors_in_place():
    theta0, grads = random_problem(100, np.float32, seed=5, steps=1)
    gp, ga = grads[0]
    ref = theta0.copy()
    m_ref, v_ref = np.zeros(100, np.float32), np.zeros(100, np.float32)
    cos_ref = kernels.grata_update(ref, m_ref, v_ref, gp, ga, 1, BETA)

    theta = torch.tensor(theta0)
    m, v = torch.zeros(100), torch.zeros(100)
    cos_out = torch.full((1,), float("nan"), dtype=torch.float64)
    got = kernels.grata_update(theta, m, v, torch.tensor(gp), torch.tensor(ga), 1, BETA,
                               cos_out=cos_out)
    assert got is None
    assert float(cos_out[0]) == cos_ref
    assert np.array_equal(theta.numpy(), ref) and np.array_equal(m.numpy(), m_ref)
    assert np.array_equal(v.numpy(), v_ref)


# ---------------------------------------------------------------- validation


def arrays(n=8, dtype=np.float32):
    return [np.zeros(n, dtype) for _ in range(5)]


@pytest.mark.parametrize("case, match", [
    ("length", "same length"),
    ("2d", "1-D"),
    ("strided", "contiguous"),
    ("readonly", "writeable"),
    ("dtype_mix", "one dtype"),
    ("int", "float32 or float64"),
    ("overlap", "overlap"),
    ("step0", "step"),
    ("step_float", "step"),
    ("betas", "betas"),
])
def test_invalid_inputs_raise_value_error(case, match):
    theta, m, v, gp, ga = arrays()
    step = 1
    betas = BETAS
    if case == "length":
        ga = np.zeros(9, np.float32)
    elif case == "2d":
        theta = np.zeros((2, 4), np.float32)
    elif case == "strided":
        theta = np.zeros(16, np.float32)[::2]
    elif case == "readonly":
        m.flags.writeable = False
    elif case == "dtype_mix":
        v = np.zeros(8, np.float64)
    elif case == "int":
        theta, m, v, gp, ga = (np.zeros(8, np.int32) for _ in range(5))
    elif case == "overlap":
        m = theta[:]
    elif case == "step0":
        step = 0
    elif case == "step_float":
        step = 1.0
    elif case == "betas":
        betas = (1.0, 0.999)
    with pytest.raises(ValueError, match=match):
        kernels.grata_update(theta, m, v, gp, ga, step, BETA, betas)


def test_gradients_may_alias_each_other():
    theta, m, v, gp, _ = arrays()
    gp[:] = 1.0
    assert kernels.grata_update(theta, m, v, gp, gp, 1, BETA) == pytest.approx(1.0)


def test_unknown_array_types_rejected():
    with pytest.raises(ValueError, match="unsupported"):
        kernels.grata_update([0.0], [0.0], [0.0], [0.0], [0.0], 1, BETA)


def test_import_needs_no_torch_nor_cuda():
    # cuda-bindings installs a start-up hook that imports the bare `cuda` namespace, so
    # what counts is what importing grata.kernels adds
    code = ("import sys; before = set(sys.modules); import grata.kernels; "
            "new = set(sys.modules) - before; "
            "bad = [m for m in new if m.split('.')[0] in ('torch', 'onnxruntime') "
            "or m == 'cuda' or m.startswith('cuda.')]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---------------------------------------------------------------- flat torch buffers


def test_flat_params_backward_writes_flat_gradient():
    from grata.kernels.torch_flat import FlatParams

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2))
    for p in net.parameters():
        p.requires_grad_(False)
    bn = [p for mod in net if isinstance(mod, torch.nn.BatchNorm2d) for p in mod.parameters()]
    for p in bn:
        p.requires_grad_(True)
    x = torch.randn(1, 3, 8, 8)
    expected = torch.autograd.grad(net(x).square().mean(), bn)

    flat = FlatParams(bn)
    assert flat.n == 12 and flat.check_views()
    net(x).square().mean().backward()
    assert torch.allclose(flat.grads[0], torch.cat([g.reshape(-1) for g in expected]))
    assert flat.check_views()  # backward accumulated in place, into the views
    flat.use_grad(1)
    (2 * net(x).square().mean()).backward()
    assert torch.allclose(flat.grads[1], 2 * flat.grads[0])
    # An update of the flat vector is seen by the module.
    before = net(x).detach().clone()
    kernels.adam_update(flat.theta, flat.m, flat.v, flat.grads[1], 1, 1e-2)
    assert not torch.equal(net(x), before)
    assert flat.check_views()


# ---------------------------------------------------------------- the CUDA source compiles


@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
def test_nvcc_compiles_kernel_without_warnings(arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    out = tmp_path / f"grata_{arch}.cubin"
    proc = subprocess.run(
        [nvcc, f"-arch={arch}", "-cubin", "--Werror", "all-warnings", "-Xptxas", "-warn-spills",
         "-o", str(out), KERNEL_SOURCE],
        check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    assert out.stat().st_size > 0


def _nvrtc_or_fail():
    """cuda_update with NVRTC. Compiling needs no GPU, so where the test extra installs
    (Linux) a missing cuda-core or NVRTC library is a failure, not a skip."""
    if not sys.platform.startswith("linux"):
        pytest.skip("cuda-core and the NVRTC wheels are installed on Linux only")
    try:
        import cuda.core  # noqa: F401
    except ImportError:
        pytest.fail("cuda-core is missing: pip install -e '.[test]' brings it and NVRTC")
    from grata.kernels import cuda_update

    cuda_update._nvrtc_version()  # raises when the NVRTC library is missing
    return cuda_update


@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
def test_nvrtc_compiles_and_caches_per_arch(arch, tmp_path, monkeypatch):
    cuda_update = _nvrtc_or_fail()
    monkeypatch.setenv("GRATA_CACHE", str(tmp_path))
    cubin = cuda_update.compile_cubin(arch)
    # a CUDA ELF (e_machine 190, little-endian 64-bit) with every kernel the runtime loads
    assert cubin[:4] == b"\x7fELF" and cubin[4] == 2
    assert int.from_bytes(cubin[18:20], "little") == 190
    for name in cuda_update.KERNEL_NAMES:
        assert name.encode() + b"\0" in cubin, name
    cached = list((tmp_path / "kernels" / arch).glob("*.cubin"))
    assert len(cached) == 1 and cached[0].read_bytes() == cubin
    cached[0].write_bytes(b"\x7fELF-from-cache")
    assert cuda_update.compile_cubin(arch) == b"\x7fELF-from-cache"


def test_nvrtc_reports_a_broken_source_as_kernel_unavailable(tmp_path, monkeypatch):
    cuda_update = _nvrtc_or_fail()
    monkeypatch.setenv("GRATA_CACHE", str(tmp_path))
    monkeypatch.setattr(cuda_update, "kernel_source",
                        lambda: 'extern "C" __global__ void k(float* x) { x[0] = y; }')
    with pytest.raises(cuda_update.KernelUnavailable, match="sm_90"):
        cuda_update.compile_cubin("sm_90")


def test_device_array_interface():
    from grata.kernels.cuda_update import DeviceArray

    cai = DeviceArray(4096, 10, owner=object()).__cuda_array_interface__
    assert cai["shape"] == (10,) and cai["typestr"] == "<f4" and cai["data"] == (4096, False)
    assert kernels.backend_of(DeviceArray(4096, 10)) == "cuda"
    with pytest.raises(ValueError, match="mixed"):
        kernels.backend_of(DeviceArray(4096, 10), np.zeros(10))


# ---------------------------------------------------------------- the CUDA path (GPU only)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _cuda_or_skip():
    pytest.importorskip("cuda.core", reason="cuda-core not installed (the gpu extra)")
    from grata.kernels import cuda_update

    return cuda_update


def _device_slices(n, offsets, poison=float("nan"), seed=0):
    """Five float32 device arrays of length n, each a slice at element offset offsets[i]
    of a guarded buffer (offset 0 is 16-byte aligned), plus host copies of the values."""
    rng = np.random.default_rng(seed)
    guard = 8
    host = {
        "theta": rng.uniform(0.5, 1.5, n) * rng.choice([-1.0, 1.0], n),
        "m": rng.standard_normal(n) * 1e-4,
        "v": rng.uniform(0, 1e-6, n),
        "g_p": rng.standard_normal(n) * 1e-3,
    }
    host["g_a"] = 0.3 * host["g_p"] + rng.standard_normal(n) * 1e-3
    host = {k: a.astype(np.float32) for k, a in host.items()}
    bufs, views = {}, {}
    for (name, values), off in zip(host.items(), offsets):
        buf = torch.full((n + 2 * guard + 4,), poison, dtype=torch.float32, device="cuda")
        view = buf[guard + off:guard + off + n]
        view.copy_(torch.from_numpy(values))
        bufs[name], views[name] = (buf, guard + off), view
    return host, bufs, views


def _guards_intact(bufs, n):
    for name, (buf, start) in bufs.items():
        b = buf.cpu().numpy()
        assert np.all(np.isnan(b[:start])), f"{name}: write before the array"
        assert np.all(np.isnan(b[start + n:])), f"{name}: write after the array"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["auto", "single", "cooperative", "two"])
@pytest.mark.parametrize("n", [1, 3, 1000, 19136, 100_003, 10**6])
@pytest.mark.parametrize("offsets", [(0, 0, 0, 0, 0), (1, 1, 1, 1, 1), (0, 1, 2, 3, 0),
                                     (3, 3, 3, 3, 2)])
def test_cuda_grata_matches_numpy(n, mode, offsets):
    cuda_update = _cuda_or_skip()
    host, bufs, views = _device_slices(n, offsets, seed=n)
    theta, m, v = host["theta"].copy(), host["m"].copy(), host["v"].copy()
    cos_ref = kernels.grata_update(theta, m, v, host["g_p"], host["g_a"], 4, BETA)

    cos_out = torch.full((1,), float("nan"), dtype=torch.float32, device="cuda")
    assert kernels.grata_update(views["theta"], views["m"], views["v"], views["g_p"],
                                views["g_a"], 4, BETA, cos_out=cos_out, mode=mode) is None
    torch.cuda.synchronize()
    assert abs(float(cos_out[0]) - cos_ref) <= 1e-5
    for name, ref in (("theta", theta), ("m", m), ("v", v)):
        got = views[name].cpu().numpy()
        assert np.all(np.isfinite(got)), name
        scale = np.abs(ref) + np.abs(host[name])  # result and operand magnitudes
        assert np.all(np.abs(got - ref) <= 8 * U32 * scale + 1e-12), name
    # The update itself, to the resolution theta allows.
    delta, ref_delta = views["theta"].cpu().numpy() - host["theta"], theta - host["theta"]
    assert np.all(np.abs(delta - ref_delta) <= 1e-4 * np.abs(ref_delta)
                  + 4 * U32 * np.abs(host["theta"]))
    _guards_intact(bufs, n)
    assert cuda_update.last_launch["n"] == n


@gpu
@pytest.mark.gpu
def test_cuda_grata_returns_cos_and_is_deterministic():
    _cuda_or_skip()
    n = 2_000_001
    host, _, views = _device_slices(n, (0, 0, 0, 0, 0))
    results = []
    for _ in range(3):
        th = torch.from_numpy(host["theta"]).cuda()
        m, v = torch.from_numpy(host["m"]).cuda(), torch.from_numpy(host["v"]).cuda()
        cos = kernels.grata_update(th, m, v, views["g_p"], views["g_a"], 1, BETA)
        results.append((cos, th.cpu().numpy()))
    assert isinstance(results[0][0], float)
    assert results[0][0] == pytest.approx(kernels.alignment(host["g_p"], host["g_a"]), abs=1e-6)
    for cos, th in results[1:]:
        assert cos == results[0][0] and np.array_equal(th, results[0][1])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 5, 19136, 10**6 + 1])
def test_cuda_adam_matches_numpy(n):
    _cuda_or_skip()
    host, bufs, views = _device_slices(n, (1, 1, 1, 1, 0), seed=n + 3)
    theta, m, v = host["theta"].copy(), host["m"].copy(), host["v"].copy()
    kernels.adam_update(theta, m, v, host["g_p"], 2, 1e-3)
    kernels.adam_update(views["theta"], views["m"], views["v"], views["g_p"], 2, 1e-3)
    torch.cuda.synchronize()
    for name, ref in (("theta", theta), ("m", m), ("v", v)):
        got = views[name].cpu().numpy()
        assert np.all(np.abs(got - ref) <= 8 * U32 * (np.abs(ref) + np.abs(host[name]))), name
    _guards_intact(bufs, n)


@gpu
@pytest.mark.gpu
def test_cuda_runs_on_torch_current_stream():
    cuda_update = _cuda_or_skip()
    n = 50_000
    _, _, views = _device_slices(n, (0, 0, 0, 0, 0))
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        kernels.grata_update(views["theta"], views["m"], views["v"], views["g_p"], views["g_a"],
                             1, BETA, cos_out=torch.zeros(1, device="cuda"))
    assert cuda_update.last_launch["stream"] == s.cuda_stream
    s.synchronize()


@gpu
@pytest.mark.gpu
def test_cuda_rejects_bad_device_arrays():
    _cuda_or_skip()
    a = torch.zeros(8, device="cuda")
    with pytest.raises(ValueError, match="float32"):
        kernels.grata_update(a.double(), a.double(), a.double(), a.double(), a.double(), 1, BETA)
    with pytest.raises(ValueError, match="overlap"):
        kernels.grata_update(a, a, torch.zeros(8, device="cuda"), a.clone(), a.clone(), 1, BETA)
    with pytest.raises(ValueError, match="mixed"):
        kernels.grata_update(a, a.clone(), a.clone(), np.zeros(8, np.float32), a.clone(), 1, BETA)


# ---------------------------------------------------------------- launch plumbing (no GPU)


def _kernel_signatures():
    """name -> list of numpy scalar types of the parameters, read from the .cu source."""
    import re

    with open(KERNEL_SOURCE) as f:
        src = f.read()
    sigs = {}
    for name, params in re.findall(
            r'extern "C" __global__ void __launch_bounds__\([^)]*\)\s*(\w+)\(([^)]*)\)', src):
        types = []
        for p in params.split(","):
            decl = " ".join(p.split()[:-1])
            if "*" in decl:
                types.append(np.uint64)
            elif decl == "long long":
                types.append(np.int64)
            elif decl == "double":
                types.append(np.float64)
            elif decl == "float":
                types.append(np.float32)
            else:
                raise AssertionError(f"unexpected parameter type {decl!r} in {name}")
        sigs[name] = types
    return sigs


class _FakeCore:
    """Just enough of cuda.core to run cuda_update's host code: records launches."""

    def __init__(self, cooperative=True):
        import types

        self.launches = []
        core = self

        class Kernel:
            def __init__(self, name):
                self.name = name
                self.occupancy = types.SimpleNamespace(
                    max_active_blocks_per_multiprocessor=lambda block, smem: 2)

        class Obj:
            def get_kernel(self, name):
                return Kernel(name)

        class Stream:
            def sync(self):
                pass

        class Device:
            def __init__(self, i):
                self.compute_capability = types.SimpleNamespace(major=9, minor=0)
                self.properties = types.SimpleNamespace(multiprocessor_count=4,
                                                        cooperative_launch=cooperative)

            def set_current(self):
                pass

            def allocate(self, size, stream):
                return types.SimpleNamespace(handle=1 << 20, size=size)

            def create_stream(self, obj):
                return Stream()

        class LaunchConfig:
            def __init__(self, grid, block, is_cooperative):
                self.grid, self.block, self.cooperative = grid, block, is_cooperative

        self.Device, self.LaunchConfig = Device, LaunchConfig
        self.ObjectCode = types.SimpleNamespace(from_cubin=lambda b: Obj())
        self.LEGACY_DEFAULT_STREAM = Stream()
        self.launch = lambda stream, config, kernel, *args: core.launches.append(
            (kernel.name, config, args))


class _FakeDriver:
    def cuMemsetD8Async(self, ptr, value, size, stream):
        return (0,)

    def cuMemcpyDtoHAsync(self, dst, src, nbytes, stream):
        return self.cuMemcpyDtoH(dst, src, nbytes)

    def cuMemcpyDtoH(self, dst, src, nbytes):
        import ctypes

        value = np.array([0.25], dtype=np.float64 if nbytes == 8 else np.float32)
        ctypes.memmove(dst, value.ctypes.data, nbytes)
        return (0,)


@pytest.fixture
def fake_cuda(monkeypatch):
    from grata.kernels import cuda_update

    fake = _FakeCore()
    monkeypatch.setattr(cuda_update, "_core", lambda: fake)
    monkeypatch.setattr(cuda_update, "_driver", lambda: _FakeDriver())
    monkeypatch.setattr(cuda_update, "compile_cubin", lambda arch: b"")
    monkeypatch.setattr(cuda_update, "_STATES", {})
    return fake


@pytest.mark.parametrize("mode, n, expect", [
    ("auto", 5000, ["grata_fused_single"]),
    ("auto", 19136, ["grata_fused"]),
    ("auto", 10**6, ["grata_fused"]),
    ("single", 10**6, ["grata_fused_single"]),
    ("cooperative", 10**5, ["grata_fused"]),
    ("two", 10**5, ["grata_reduce", "grata_apply"]),
])
def test_launch_arguments_match_kernel_signatures(fake_cuda, mode, n, expect):
    from grata.kernels.cuda_update import BLOCK, SINGLE_BLOCK, DeviceArray

    sigs = _kernel_signatures()
    assert set(sigs) == {"grata_fused_single", "grata_fused", "grata_reduce", "grata_apply",
                         "adam_step"}
    arrays = [DeviceArray(4096 * (k + 1) * n, n) for k in range(5)]
    cos = kernels.grata_update(*arrays, 7, BETA, mode=mode)
    assert cos == 0.25  # read back from the published scalar
    kernels.adam_update(*arrays[:4], 7, 1e-3)
    launched = fake_cuda.launches
    assert [name for name, _, _ in launched] == [*expect, "adam_step"]
    for name, config, args in launched:
        assert [type(a) for a in args] == sigs[name], name
        block = SINGLE_BLOCK if name == "grata_fused_single" else BLOCK
        assert config.block == block
        assert config.cooperative == (name == "grata_fused" and config.grid > 1)
        if name == "grata_fused":
            assert 1 < config.grid <= 8  # 4 SMs x 2 resident blocks (the fake occupancy)
    first = launched[0][2]
    assert first[5 if expect[0] != "grata_reduce" else 2] == n  # the length argument


def test_launch_falls_back_to_two_kernels_without_cooperative_launch(monkeypatch):
    from grata.kernels import cuda_update
    from grata.kernels.cuda_update import DeviceArray

    fake = _FakeCore(cooperative=False)
    monkeypatch.setattr(cuda_update, "_core", lambda: fake)
    monkeypatch.setattr(cuda_update, "_driver", lambda: _FakeDriver())
    monkeypatch.setattr(cuda_update, "compile_cubin", lambda arch: b"")
    monkeypatch.setattr(cuda_update, "_STATES", {})
    arrays = [DeviceArray(1 << (30 + k), 10**6) for k in range(5)]
    cos_out = DeviceArray(1 << 36, 1)
    assert kernels.grata_update(*arrays, 1, BETA, cos_out=cos_out) is None
    assert [name for name, _, _ in fake.launches] == ["grata_reduce", "grata_apply"]
    with pytest.raises(cuda_update.KernelUnavailable, match="cooperative"):
        kernels.grata_update(*arrays, 1, BETA, mode="cooperative")


def test_device_arrays_validated(fake_cuda):
    from grata.kernels.cuda_update import DeviceArray

    a = [DeviceArray(1 << (30 + k), 100) for k in range(5)]
    with pytest.raises(ValueError, match="overlap"):
        kernels.grata_update(a[0], DeviceArray(a[0].ptr + 40, 100), *a[2:], 1, BETA)
    with pytest.raises(ValueError, match="same length"):
        kernels.grata_update(*a[:4], DeviceArray(1 << 40, 99), 1, BETA)
    with pytest.raises(ValueError, match="writeable"):
        kernels.grata_update(DeviceArray(1 << 41, 100, readonly=True), *a[1:], 1, BETA)
    with pytest.raises(ValueError, match="aligned"):
        kernels.grata_update(DeviceArray((1 << 42) + 2, 100), *a[1:], 1, BETA)
    with pytest.raises(ValueError, match="step"):
        kernels.grata_update(*a, 0, BETA)
    assert fake_cuda.launches == []
