"""The diffusion maths (`stablecascade.diffusion`) against hand-computed float64 values and diffusers' scheduler.

Expected values are computed independently here with `math` from the formulas in official-spec.md §4 and
diffusers-spec.md §5; the functions under test are never used to produce an expectation."""

import math
import statistics

import pytest
import torch

from stablecascade import diffusion as D
from stablecascade import sampling

# ---------------------------------------------------------------------------------------------------------------
# float64 reference formulas (official-spec §4.1, §4.2, §4.4, §4.8)

S = 0.008
MIN_VAR = math.cos(S / (1 + S) * math.pi / 2) ** 2
LAM_LIMIT = math.log(0.9999 / 0.0001)  # λ(t=0); λ(t=1) = −LAM_LIMIT


def h_alpha_bar(t):
    v = math.cos((t + S) / (1 + S) * math.pi / 2) ** 2 / MIN_VAR
    return min(max(v, 1e-4), 0.9999)


def h_logsnr(t, shift=1.0):
    ab = h_alpha_bar(t)
    lam = math.log(ab / (1 - ab)) + 2 * math.log(1 / shift)
    return min(max(lam, -LAM_LIMIT), LAM_LIMIT)


def h_sigmoid(x):
    return 1 / (1 + math.exp(-x))


def h_scales(lam):
    return math.sqrt(h_sigmoid(lam)), math.sqrt(1 - h_sigmoid(lam))


def h_noise_cond(lam):
    var = min(max(h_sigmoid(lam), 0.0), 1.0)
    t = math.acos(math.sqrt(var * MIN_VAR)) / (math.pi / 2) * (1 + S) - S
    return min(max(t, 0.0), 1.0)


def grid(steps, t_start=1.0):
    return [t_start - t_start * i / steps for i in range(steps + 1)]


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def fake_denoiser(calls=None):
    def denoise(x, r):
        if calls is not None:
            calls.append(r.clone())
        return 0.1 * x + r.view(-1, 1, 1, 1)

    return denoise


# ---------------------------------------------------------------------------------------------------------------
# Schedule


def test_schedule_limits():
    lam = D.logsnr(torch.tensor([0.0, 1.0]))
    assert lam[0].item() == pytest.approx(9.2101, abs=1e-3)
    assert lam[1].item() == pytest.approx(-9.2102, abs=1e-3)
    assert D.LOGSNR_MAX == pytest.approx(LAM_LIMIT, abs=1e-9)
    assert D.LOGSNR_MIN == pytest.approx(-LAM_LIMIT, abs=1e-9)
    # ᾱ clamp to [1e-4, 0.9999]
    ab = D.alpha_bar(torch.tensor([0.0, 1.0]))
    assert ab[0].item() == pytest.approx(0.9999, abs=1e-7)
    assert ab[1].item() == pytest.approx(1e-4, abs=1e-9)


def test_alpha_bar_matches_hand_and_diffusers():
    from diffusers import DDPMWuerstchenScheduler

    ts = torch.linspace(0, 1, 41)
    ours = D.alpha_bar(ts)
    for t, v in zip(ts.tolist(), ours.tolist()):
        assert v == pytest.approx(h_alpha_bar(t), abs=1e-6)
    ref = DDPMWuerstchenScheduler()._alpha_cumprod(ts, torch.device("cpu"))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


SPEC_GRID = {  # official-spec §4.1, 20 steps, linspace(1, 0, 21); (index, quoted λ)
    1: [(0, -9.21), (1, -5.10), (2, -3.70), (18, 3.55), (19, 4.82), (20, 9.21)],
    # the spec quotes 3.44 for index 19; the exact value is 3.4349 (4.8212 − 2·ln 2), hence abs=0.006 below
    2: [(0, -9.21), (1, -6.49), (2, -5.09), (18, 2.16), (19, 3.44), (20, 7.82)],
    4: [(0, -9.21), (1, -7.87), (19, 2.05), (20, 6.44)],
}


@pytest.mark.parametrize("shift", [1, 2, 4])
def test_released_20_step_grid(shift):
    lams = D.logsnr(torch.linspace(1, 0, 21), shift)
    for i, quoted in SPEC_GRID[shift]:
        assert lams[i].item() == pytest.approx(quoted, abs=0.006), (shift, i)
    hand = [h_logsnr(t, shift) for t in grid(20)]
    for i, (got, exp) in enumerate(zip(lams.tolist(), hand)):
        assert got == pytest.approx(exp, abs=2e-3), (shift, i)


@pytest.mark.parametrize("shift", [2, 4, 0.5])
def test_shift_subtracts_2_ln_shift_unless_clamped(shift):
    ts = torch.linspace(1, 0, 21)
    base, shifted = D.logsnr(ts).tolist(), D.logsnr(ts, shift).tolist()
    n_free = 0
    for b, s in zip(base, shifted):
        want = b - 2 * math.log(shift)
        if -LAM_LIMIT < want < LAM_LIMIT:
            assert s == pytest.approx(want, abs=1e-4)
            n_free += 1
        else:  # the clamp to the *unshifted* limits binds
            assert s == pytest.approx(math.copysign(LAM_LIMIT, want), abs=1e-4)
    assert n_free >= 18


# ---------------------------------------------------------------------------------------------------------------
# Noise condition r


SPEC_R_SHIFT2 = [0.9936, 0.975, 0.950, 0.924, 0.898, 0.870, 0.841, 0.811, 0.779, 0.744, 0.706, 0.664, 0.618,
                 0.567, 0.509, 0.444, 0.372, 0.291, 0.202, 0.106, 0.0071]


def test_released_r_values_shift2():
    r = D.noise_cond(D.logsnr(torch.linspace(1, 0, 21), 2)).tolist()
    for i, (got, quoted) in enumerate(zip(r, SPEC_R_SHIFT2)):
        assert got == pytest.approx(quoted, abs=1e-3), i
        assert got == pytest.approx(h_noise_cond(h_logsnr(grid(20)[i], 2)), abs=1e-4), i


def test_noise_cond_endpoints_and_inverse_of_schedule():
    r = D.noise_cond(D.logsnr(torch.tensor([1.0, 0.0]))).tolist()
    assert r[0] == pytest.approx(0.9936, abs=1e-4)
    assert r[1] == pytest.approx(0.0023, abs=1e-4)
    assert r[0] == pytest.approx(h_noise_cond(-LAM_LIMIT), abs=1e-5)
    assert r[1] == pytest.approx(h_noise_cond(LAM_LIMIT), abs=2e-4)  # float32 acos near 1
    ts = torch.linspace(0.05, 0.95, 19)  # interior: the clamp does not bind
    torch.testing.assert_close(D.noise_cond(D.logsnr(ts)), ts, rtol=0, atol=1e-5)


def test_noise_cond_clamped_to_unit_interval():
    r = D.noise_cond(torch.tensor([-50.0, 50.0, 0.0]))
    assert 0.0 <= r.min().item() and r.max().item() <= 1.0
    assert r[2].item() == pytest.approx(h_noise_cond(0.0), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Scales, diffuse, targets


LAMS = [-9.21, -3.0, -0.5, 0.0, 1.7, 9.21]


def test_scales_hand_computed():
    a, b = D.scales(torch.tensor(LAMS, dtype=torch.float64))
    for lam, ai, bi in zip(LAMS, a.tolist(), b.tolist()):
        ha, hb = h_scales(lam)
        assert ai == pytest.approx(ha, abs=1e-12) and bi == pytest.approx(hb, abs=1e-12)
        assert ai**2 + bi**2 == pytest.approx(1.0, abs=1e-12)
    a32, b32 = D.scales(torch.tensor(LAMS))
    torch.testing.assert_close(a32**2 + b32**2, torch.ones(len(LAMS)), rtol=0, atol=1e-6)
    # spec §4.2: at λ = 9.21 a ≈ 0.99995, b ≈ 0.01
    assert a32[-1].item() == pytest.approx(0.99995, abs=1e-5) and b32[-1].item() == pytest.approx(0.01, abs=1e-4)


def test_diffuse_and_targets_hand_computed():
    lam = torch.tensor([-1.3, 0.7], dtype=torch.float64)
    x0 = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64).view(2, 2, 1, 1)
    eps = torch.tensor([[-0.3, 0.8], [1.1, -2.0]], dtype=torch.float64).view(2, 2, 1, 1)
    x = D.diffuse(x0, eps, lam)
    v = D.target(x0, eps, lam, "v")
    assert D.target(x0, eps, lam, "eps") is eps
    for i, l in enumerate(lam.tolist()):
        a, b = h_scales(l)
        for c in range(2):
            xv, ev = x0[i, c, 0, 0].item(), eps[i, c, 0, 0].item()
            assert x[i, c, 0, 0].item() == pytest.approx(a * xv + b * ev, abs=1e-12)
            assert v[i, c, 0, 0].item() == pytest.approx(a * ev - b * xv, abs=1e-12)


@pytest.mark.parametrize("kind", ["eps", "v"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_diffuse_undiffuse_round_trip(kind, dtype):
    g = gen(0)
    x0 = torch.randn(len(LAMS), 3, 4, 4, generator=g, dtype=dtype)
    eps = torch.randn(len(LAMS), 3, 4, 4, generator=g, dtype=dtype)
    lam = torch.tensor(LAMS, dtype=dtype)
    x = D.diffuse(x0, eps, lam)
    x0_hat, eps_hat = D.undiffuse(x, lam, D.target(x0, eps, lam, kind), kind)
    # eps target divides by a ≈ 0.01 at λ = −9.21: float32 error grows by ~100
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=tol)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=tol)


def test_unknown_target_kind_raises():
    x = torch.zeros(1, 1, 2, 2)
    lam = torch.zeros(1)
    with pytest.raises(ValueError):
        D.target(x, x, lam, "x0")
    with pytest.raises(ValueError):
        D.undiffuse(x, lam, x, "x0")


# ---------------------------------------------------------------------------------------------------------------
# Classifier-free guidance


def _pair():
    c = torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.0, 3.0, 1.0, -2.0]]).view(2, 1, 2, 2)
    u = torch.tensor([[0.5, 1.0, 0.0, 0.0], [1.0, -1.0, 2.0, 0.5]]).view(2, 1, 2, 2)
    return c, u


def test_guidance_scale_0_1_and_plain_cfg():
    c, u = _pair()
    torch.testing.assert_close(D.guidance(c, u, 1.0), c, rtol=0, atol=1e-7)
    torch.testing.assert_close(D.guidance(c, u, 0.0), u, rtol=0, atol=1e-7)
    got = D.guidance(c, u, 4.0, rho=0.0).flatten().tolist()
    for g_, ci, ui in zip(got, c.flatten().tolist(), u.flatten().tolist()):
        assert g_ == pytest.approx(ui + 4.0 * (ci - ui), abs=1e-6)


@pytest.mark.parametrize(("w", "rho"), [(4.0, 0.7), (1.5, 1.0), (3.0, 0.3)])
def test_guidance_rho_hand_computed(w, rho):
    c, u = _pair()
    got = D.guidance(c, u, w, rho=rho)
    for i in range(2):
        cs, us = c[i].flatten().tolist(), u[i].flatten().tolist()
        p = [ui + w * (ci - ui) for ci, ui in zip(cs, us)]
        ratio = statistics.stdev(cs) / (statistics.stdev(p) + 1e-9)  # per sample, unbiased (n − 1)
        want = [rho * pi * ratio + (1 - rho) * pi for pi in p]
        for g_, e in zip(got[i].flatten().tolist(), want):
            assert g_ == pytest.approx(e, abs=1e-5)


def test_guidance_rho_is_per_sample():
    c, u = _pair()
    ref = D.guidance(c, u, 4.0, rho=0.7)
    c2, u2 = c.clone(), u.clone()
    c2[1] = c2[1] * 10 + 3
    u2[1] = -u2[1]
    out = D.guidance(c2, u2, 4.0, rho=0.7)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    # and equals a batch of one
    torch.testing.assert_close(D.guidance(c[:1], u[:1], 4.0, rho=0.7), ref[:1], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Samplers


@pytest.mark.parametrize(("lam", "lam_next"), [(-9.21, -5.1), (-2.0, -1.0), (0.3, 2.5), (4.82, 9.21), (-6.49, 7.82)])
def test_ddpm_step_hand_computed(lam, lam_next):
    x0 = torch.tensor([0.7, -1.2, 0.05], dtype=torch.float64)
    eps = torch.tensor([-0.4, 0.9, 1.5], dtype=torch.float64)
    z = torch.tensor([1.1, -0.6, 0.2], dtype=torch.float64)
    got = D.ddpm_step(x0, eps, torch.tensor(lam, dtype=torch.float64), torch.tensor(lam_next, dtype=torch.float64), z)
    a, b = h_scales(lam)
    an, bn = h_scales(lam_next)
    sigma = math.sqrt(bn**2 / b**2) * math.sqrt(1 - a**2 / an**2)
    for gi, xi, ei, zi in zip(got.tolist(), x0.tolist(), eps.tolist(), z.tolist()):
        assert gi == pytest.approx(an * xi + math.sqrt(bn**2 - sigma**2) * ei + sigma * zi, abs=1e-12)


def test_wuerstchen_step_hand_computed():
    t, tn = 0.6, 0.45
    x = torch.tensor([0.3, -0.8])
    eps = torch.tensor([1.0, 0.2])
    z = torch.tensor([-0.5, 0.7])
    got = D.wuerstchen_step(x, eps, torch.tensor(t), torch.tensor(tn), z).tolist()
    ab, abn = h_alpha_bar(t), h_alpha_bar(tn)
    al = ab / abn
    std = math.sqrt((1 - al) * (1 - abn) / (1 - ab))
    for gi, xi, ei, zi in zip(got, x.tolist(), eps.tolist(), z.tolist()):
        mu = (xi - (1 - al) / math.sqrt(1 - ab) * ei) / math.sqrt(al)
        assert gi == pytest.approx(mu + std * zi, abs=1e-5)
    # t_next = 0: the noise is multiplied by 0
    last = D.wuerstchen_step(x, eps, torch.tensor(0.05), torch.tensor(0.0), z)
    torch.testing.assert_close(last, D.wuerstchen_step(x, eps, torch.tensor(0.05), torch.tensor(0.0), 0 * z))


@pytest.mark.parametrize("steps", [4, 10])
def test_ddpm_step_equals_wuerstchen_step_at_shift_1(steps):
    ts = torch.linspace(1, 0, steps + 1)
    g = gen(1)
    x = torch.randn(2, 3, 4, 4, generator=g)
    for i in range(steps - 1):  # the last step differs by design (σ·z vs 0·z); checked separately below
        eps = torch.randn(x.shape, generator=g)
        z = torch.randn(x.shape, generator=g)
        lam, lam_next = D.logsnr(ts[i]), D.logsnr(ts[i + 1])
        x0, eps_ = D.undiffuse(x, lam.expand(2), eps)
        ours = D.ddpm_step(x0, eps_, lam, lam_next, z)
        theirs = D.wuerstchen_step(x, eps, ts[i], ts[i + 1], z)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        x = theirs
    # last step without noise: both give the same mean
    eps = torch.randn(x.shape, generator=g)
    lam, lam_next = D.logsnr(ts[-2]), D.logsnr(ts[-1])
    x0, eps_ = D.undiffuse(x, lam.expand(2), eps)
    zero = torch.zeros_like(x)
    torch.testing.assert_close(D.ddpm_step(x0, eps_, lam, lam_next, zero),
                               D.wuerstchen_step(x, eps, ts[-2], ts[-1], zero), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("steps", "batch"), [(10, 1), (20, 2)])
def test_wuerstchen_step_matches_diffusers(steps, batch):
    from diffusers import DDPMWuerstchenScheduler

    sched = DDPMWuerstchenScheduler()
    sched.set_timesteps(steps)
    g, g1, g2 = gen(3), gen(7), gen(7)
    x_ref = x = torch.randn(batch, 4, 3, 3, generator=g)
    ts = sched.timesteps
    for i, t in enumerate(ts[:-1]):
        eps = torch.randn(x.shape, generator=g)
        x_ref = sched.step(eps, t.expand(batch), x_ref, generator=g1).prev_sample
        x = D.wuerstchen_step(x, eps, t, ts[i + 1], torch.randn(x.shape, generator=g2))
        torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# sample()


@pytest.mark.parametrize(("shift", "t_start", "steps"), [(1.0, 1.0, 5), (2.0, 1.0, 20), (2.0, 0.8, 16), (1.0, 0.5, 3)])
def test_sample_official_calls_and_r(shift, t_start, steps):
    calls = []
    x = torch.randn(2, 2, 3, 3, generator=gen(0))
    sampling.sample(fake_denoiser(calls), x, steps, shift=shift, t_start=t_start, generator=gen(1))
    assert len(calls) == steps
    ts = torch.linspace(t_start, 0, steps + 1)[:-1]
    want = D.noise_cond(D.logsnr(ts, shift))
    for i, r in enumerate(calls):
        assert r.shape == (2,)
        torch.testing.assert_close(r, want[i].expand(2), rtol=0, atol=0)
        assert r[0].item() == pytest.approx(h_noise_cond(h_logsnr(ts[i].item(), shift)), abs=1e-4)


def test_sample_t_start_half():
    calls = []
    sampling.sample(fake_denoiser(calls), torch.zeros(1, 1, 2, 2), 4, t_start=0.5, generator=gen(0))
    assert calls[0].item() == pytest.approx(0.5, abs=1e-5)  # shift 1: r is t
    calls = []
    sampling.sample(fake_denoiser(calls), torch.zeros(1, 1, 2, 2), 4, shift=2, t_start=0.5, generator=gen(0))
    assert calls[0].item() == pytest.approx(h_noise_cond(h_logsnr(0.5, 2)), abs=1e-4)
    calls = []
    sampling.sample(fake_denoiser(calls), torch.zeros(1, 1, 2, 2), 4, t_start=0.5, sampler="diffusers", generator=gen(0))
    assert calls[0].item() == 0.5


def test_sample_diffusers_r_is_t():
    calls = []
    sampling.sample(fake_denoiser(calls), torch.zeros(3, 1, 2, 2), 7, sampler="diffusers", generator=gen(0))
    assert len(calls) == 7
    ts = torch.linspace(1, 0, 8)
    for i, r in enumerate(calls):
        assert torch.equal(r, ts[i].expand(3))


def test_sample_mode_errors():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError):
        sampling.sample(fake_denoiser(), x, 3, shift=2.0, sampler="diffusers")
    with pytest.raises(ValueError):
        sampling.sample(fake_denoiser(), x, 3, sampler="bogus")


@pytest.mark.parametrize(("mode", "draws"), [("official", lambda n: n - 1), ("diffusers", lambda n: n)])
def test_sample_rng_draw_count(mode, draws):
    steps = 6
    x = torch.zeros(2, 3, 4, 4)
    g = gen(11)
    sampling.sample(fake_denoiser(), x, steps, sampler=mode, generator=g)
    ref = gen(11)
    for _ in range(draws(steps)):
        torch.randn(x.shape, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


@pytest.mark.parametrize("mode", ["official", "diffusers"])
def test_sample_callback_and_determinism(mode):
    seen = []
    x = torch.randn(2, 2, 3, 3, generator=gen(0))
    out1 = sampling.sample(fake_denoiser(), x, 5, sampler=mode, generator=gen(5), callback=lambda i, x0: seen.append((i, x0)))
    assert [i for i, _ in seen] == list(range(5))
    assert all(x0.shape == x.shape for _, x0 in seen)
    out2 = sampling.sample(fake_denoiser(), x, 5, sampler=mode, generator=gen(5))
    assert torch.equal(out1, out2)
    out3 = sampling.sample(fake_denoiser(), x, 5, sampler=mode, generator=gen(6))
    assert not torch.equal(out1, out3)
    if mode == "official":  # the result is the last step's x0 prediction
        assert torch.equal(out1, seen[-1][1])


def test_sample_diffusers_matches_scheduler_loop():
    from diffusers import DDPMWuerstchenScheduler

    steps, batch = 10, 2
    x = torch.randn(batch, 4, 3, 3, generator=gen(0))
    den = fake_denoiser()
    ours = sampling.sample(den, x, steps, sampler="diffusers", generator=gen(9))
    sched = DDPMWuerstchenScheduler()
    sched.set_timesteps(steps)
    g, lat = gen(9), x.clone()
    for t in sched.timesteps[:-1]:
        ratio = t.expand(batch)
        lat = sched.step(den(lat, ratio), ratio, lat, generator=g).prev_sample
    torch.testing.assert_close(ours, lat, rtol=0, atol=1e-5)


def test_sample_official_matches_hand_loop():
    """GDF's DDPM loop (§4.7/§4.8) written out in float64 with hand-computed λ; result = last x0."""
    steps, shift = 6, 2.0
    x = torch.randn(1, 2, 2, 2, generator=gen(0))
    den = fake_denoiser()
    ours = sampling.sample(den, x, steps, shift=shift, generator=gen(4))
    g = gen(4)
    lams = [h_logsnr(t, shift) for t in grid(steps)]
    xh = x.double()
    for i in range(steps):
        a, b = h_scales(lams[i])
        eps = 0.1 * xh + h_noise_cond(lams[i])
        x0 = (xh - b * eps) / a
        if i < steps - 1:
            an, bn = h_scales(lams[i + 1])
            sigma = math.sqrt(bn**2 / b**2) * math.sqrt(1 - a**2 / an**2)
            z = torch.randn(x.shape, generator=g).double()
            xh = an * x0 + math.sqrt(bn**2 - sigma**2) * eps + sigma * z
    torch.testing.assert_close(ours.double(), x0, rtol=1e-5, atol=2e-4)
