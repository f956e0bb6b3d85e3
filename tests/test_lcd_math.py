"""The LCD math of train_lcm_distill_sd_wds against formulas written out independently from the LCM paper."""

import math

import numpy as np
import pytest
import torch

import train_lcm_distill_sd_wds as lcd


def sd_alphas_cumprod(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012):
    """SD's scaled_linear schedule, written out with numpy."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def test_ddim_timesteps_and_previous_alphas():
    abar = sd_alphas_cumprod()
    solver = lcd.DDIMSolver(abar, timesteps=1000, ddim_timesteps=50)
    expected = [20 * (i + 1) - 1 for i in range(50)]  # k - 1, 2k - 1, ..., T - 1 with k = 20
    assert solver.ddim_timesteps.tolist() == expected
    assert solver.step_ratio == 20
    assert solver.ddim_timesteps.dtype == torch.int64
    prev = solver.ddim_alpha_cumprods_prev.double().numpy()
    assert prev[0] == pytest.approx(abar[0], rel=1e-6)
    for i in range(1, 50):
        assert prev[i] == pytest.approx(abar[expected[i - 1]], rel=1e-6)


def test_ddim_timesteps_uneven_grid():
    solver = lcd.DDIMSolver(sd_alphas_cumprod(), timesteps=1000, ddim_timesteps=3)
    assert solver.ddim_timesteps.tolist() == [332, 665, 998]


def test_ddim_step_matches_formula():
    abar = sd_alphas_cumprod()
    solver = lcd.DDIMSolver(abar, 1000, 50)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=generator)
    eps = torch.randn(3, 4, 8, 8, generator=generator)
    index = torch.tensor([0, 7, 49])
    out = solver.ddim_step(x0, eps, index)
    for b, i in enumerate(index.tolist()):
        a_prev = abar[0] if i == 0 else abar[20 * i - 1]
        expected = math.sqrt(a_prev) * x0[b] + math.sqrt(1 - a_prev) * eps[b]
        torch.testing.assert_close(out[b], expected.float(), rtol=1e-5, atol=1e-5)


def test_boundary_scalings():
    t = torch.tensor([0.0, 1.0, 19.0, 999.0])
    c_skip, c_out = lcd.scalings_for_boundary_conditions(t, timestep_scaling=10.0)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0  # f(x, 0) = x
    for j, tj in enumerate(t.tolist()):
        st = 10.0 * tj
        assert c_skip[j].item() == pytest.approx(0.25 / (st * st + 0.25))
        assert c_out[j].item() == pytest.approx(st / math.sqrt(st * st + 0.25))
    # c_skip^2 * sigma_d^2-ish identity: c_skip + c_out^2 = 1 for sigma_data = 0.5 with this parameterisation
    torch.testing.assert_close(c_skip + c_out**2, torch.ones(4))


@pytest.mark.parametrize("dim", [256, 7])
def test_guidance_scale_embedding(dim):
    w = torch.tensor([0.0, 3.5, 14.0])
    emb = lcd.guidance_scale_embedding(w, embedding_dim=dim)
    assert emb.shape == (3, dim)
    half = dim // 2
    for b, wb in enumerate(w.tolist()):
        for j in range(half):
            freq = math.exp(-math.log(10000.0) * j / (half - 1))
            assert emb[b, j].item() == pytest.approx(math.sin(1000.0 * wb * freq), abs=2e-3)
            assert emb[b, half + j].item() == pytest.approx(math.cos(1000.0 * wb * freq), abs=2e-3)
    if dim % 2:
        assert torch.all(emb[:, -1] == 0)


def test_guidance_embedding_matches_pipeline_helper():
    """The student is trained with the same embedding the diffusers pipeline computes at inference."""
    from diffusers import StableDiffusionPipeline

    w = torch.tensor([2.0, 7.5])
    ours = lcd.guidance_scale_embedding(w, 64)
    theirs = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=64)
    torch.testing.assert_close(ours, theirs)


def schedules():
    abar = torch.tensor(sd_alphas_cumprod(), dtype=torch.float32)
    return abar, abar.sqrt(), (1 - abar).sqrt()


def test_x0_and_eps_for_epsilon_prediction():
    abar, alphas, sigmas = schedules()
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 8, 8, generator=generator)
    eps = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 900])
    a = abar[t].view(2, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    pred_x0 = lcd.get_predicted_original_sample(eps, t, x_t, "epsilon", alphas, sigmas)
    pred_eps = lcd.get_predicted_noise(eps, t, x_t, "epsilon", alphas, sigmas)
    torch.testing.assert_close(pred_x0, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred_eps, eps)


def test_x0_and_eps_for_v_prediction():
    abar, alphas, sigmas = schedules()
    generator = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 4, 8, 8, generator=generator)
    eps = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 500])
    a = abar[t].view(2, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0  # Salimans & Ho's velocity
    pred_x0 = lcd.get_predicted_original_sample(v, t, x_t, "v_prediction", alphas, sigmas)
    pred_eps = lcd.get_predicted_noise(v, t, x_t, "v_prediction", alphas, sigmas)
    torch.testing.assert_close(pred_x0, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred_eps, eps, rtol=1e-4, atol=1e-4)


def test_sample_prediction_and_unknown_type():
    abar, alphas, sigmas = schedules()
    x0 = torch.randn(1, 4, 2, 2)
    t = torch.tensor([100])
    x_t = abar[100].sqrt() * x0 + (1 - abar[100]).sqrt() * torch.ones_like(x0)
    torch.testing.assert_close(lcd.get_predicted_original_sample(x0, t, x_t, "sample", alphas, sigmas), x0)
    torch.testing.assert_close(lcd.get_predicted_noise(x0, t, x_t, "sample", alphas, sigmas), torch.ones_like(x0),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not supported"):
        lcd.get_predicted_original_sample(x0, t, x_t, "flow", alphas, sigmas)


def test_losses():
    pred = torch.tensor([0.0, 1.0, -2.0])
    target = torch.tensor([0.5, 1.0, 1.0])
    assert lcd.consistency_loss(pred, target, "l2").item() == pytest.approx((0.25 + 0 + 9) / 3)
    c = 0.001
    expected = sum(math.sqrt(d * d + c * c) - c for d in (0.5, 0.0, 3.0)) / 3
    assert lcd.consistency_loss(pred, target, "huber", c).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError):
        lcd.consistency_loss(pred, target, "l1")


def test_append_dims_and_ema():
    assert lcd.append_dims(torch.ones(3), 4).shape == (3, 1, 1, 1)
    target = [torch.zeros(2), torch.ones(3)]
    source = [torch.ones(2), torch.zeros(3)]
    lcd.update_ema(target, source, decay=0.95)
    torch.testing.assert_close(target[0], torch.full((2,), 0.05))
    torch.testing.assert_close(target[1], torch.full((3,), 0.95))


def test_batches_already_read_round_robin():
    for num_workers in (1, 2, 3):
        for total in range(10):
            served = [b % num_workers for b in range(total)]  # DataLoader round robin
            for worker in range(num_workers):
                assert lcd.batches_already_read(total, worker, num_workers) == served.count(worker)


class _TwoTimesUnet(torch.nn.Module):
    """Stand-in UNet whose output depends on the text embedding, to check the batched CFG pass."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.unit = torch.nn.Parameter(torch.ones((), dtype=dtype))

    def forward(self, sample, timestep, encoder_hidden_states):
        # mixing dtypes here would promote silently; a network of another dtype must get its own dtype
        assert sample.dtype == encoder_hidden_states.dtype == self.unit.dtype
        scale = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1) * self.unit
        return type("Out", (), {"sample": sample * scale + timestep.view(-1, 1, 1, 1) * 1e-3})()


def test_denoiser_forward_feeds_each_network_its_own_dtype_and_returns_fp32():
    """What makes fp16/bf16 work without autocast (DeepSpeed, CPU): inputs cast to the network, output fp32."""
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    cond = {"encoder_hidden_states": torch.randn(2, 5, 8), "added_cond_kwargs": {"time_ids": torch.ones(2, 6)}}
    casted = lcd.cast_floats(cond, torch.bfloat16)
    assert casted["encoder_hidden_states"].dtype == casted["added_cond_kwargs"]["time_ids"].dtype == torch.bfloat16
    assert lcd.cast_floats({"ids": t}, torch.bfloat16)["ids"].dtype == torch.int64
    for dtype in (torch.float32, torch.bfloat16):
        out = lcd.denoiser_forward(_TwoTimesUnet(dtype), x, t, encoder_hidden_states=cond["encoder_hidden_states"])
        assert out.dtype == torch.float32
        reference = _TwoTimesUnet()(x.to(dtype).float(), t, cond["encoder_hidden_states"].to(dtype).float()).sample
        torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)


def test_teacher_cfg_batched_equals_two_passes():
    abar, alphas, sigmas = schedules()
    solver = lcd.DDIMSolver(abar, 1000, 50)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    index = torch.tensor([3, 40])
    t = solver.ddim_timesteps[index]
    cond = {"encoder_hidden_states": torch.randn(2, 5, 8, generator=generator)}
    uncond = {"encoder_hidden_states": torch.randn(2, 5, 8, generator=generator)}
    w = torch.tensor([5.0, 12.0])
    unet = _TwoTimesUnet()
    args = (unet, x, t, index, w, cond, uncond, solver, alphas, sigmas, "epsilon")
    batched = lcd.teacher_guided_ddim_step(*args, batched=True)
    separate = lcd.teacher_guided_ddim_step(*args, batched=False)
    torch.testing.assert_close(batched, separate)
    # and against the CFG + DDIM formula written out
    eps_c = unet(x, t, cond["encoder_hidden_states"]).sample
    eps_u = unet(x, t, uncond["encoder_hidden_states"]).sample
    a = abar[t].view(2, 1, 1, 1)
    x0_c, x0_u = (x - (1 - a).sqrt() * eps_c) / a.sqrt(), (x - (1 - a).sqrt() * eps_u) / a.sqrt()
    wv = w.view(2, 1, 1, 1)
    x0 = x0_c + wv * (x0_c - x0_u)
    eps = eps_c + wv * (eps_c - eps_u)
    a_prev = abar[t - 20].view(2, 1, 1, 1)
    torch.testing.assert_close(batched, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, rtol=1e-4, atol=1e-4)


def test_image_transform_crop_and_flip():
    import random

    from PIL import Image

    image = Image.new("RGB", (300, 200), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 150, 200))  # left half blue
    transform = lcd.ImageTransform(64, "bilinear", center_crop=True, random_flip=False)
    pixels, original_size, crop = transform(image, random.Random(0))
    assert pixels.shape == (3, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
    assert original_size == (200, 300)  # (height, width)
    assert crop == (0, (96 - 64) // 2)
    random_crop = lcd.ImageTransform(64, "bicubic", center_crop=False, random_flip=True)
    seen = set()
    for seed in range(20):
        pixels, _, (top, left) = random_crop(image, random.Random(seed))
        assert top == 0 and 0 <= left <= 96 - 64
        seen.add(bool(pixels[2, 32, 0] > 0))  # blue at the left edge unless flipped
    assert seen == {True, False}


def test_sample_filter():
    f = lcd.SampleFilter(min_image_size=256, max_watermark_probability=0.5, min_aesthetic_score=5.0)
    assert f.reject_by_metadata({}) is None
    assert f.reject_by_metadata({"width": 300, "height": 200}) == "too small"
    assert f.reject_by_metadata({"original_width": 1024, "original_height": 512, "width": 10, "height": 10}) is None
    assert f.reject_by_metadata({"pwatermark": 0.9}) == "watermark"
    assert f.reject_by_metadata({"aesthetic": 4.0}) == "aesthetic"
    assert f.reject_by_metadata({"width": 512, "height": 512, "pwatermark": 0.1, "aesthetic": 6.0}) is None


def test_data_errors_exit_with_one_line_also_from_a_worker_traceback():
    wrapped = lcd.DataError("Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent call "
                            "last):\n  File \"x.py\", line 1\nDataError: a whole pass over 1 shard(s) gave nothing")
    for error, line in ((wrapped, "error: a whole pass over 1 shard(s) gave nothing"),
                        (lcd.DataError("no usable sample"), "error: no usable sample")):
        with pytest.raises(SystemExit) as exit_:
            lcd.exit_on_data_error(error)
        assert exit_.value.code == line
    with pytest.raises(KeyError):
        lcd.exit_on_data_error(KeyError("unrelated"))


# ----------------------------------------
# Phased Consistency distillation (PCM), against formulas written out from the PCM paper (Wang et al. 2024)
# ----------------------------------------


def written_out_edges(num_ddim_timesteps, num_phases):
    """For each grid index i: the start e_j = floor(j N / M) of its phase, by search (no closed form)."""
    starts = [j * num_ddim_timesteps // num_phases for j in range(num_phases)]
    return [max(e for e in starts if e <= i) for i in range(num_ddim_timesteps)]


@pytest.mark.parametrize("n,m", [(10, 1), (10, 2), (10, 5), (10, 10), (8, 4), (50, 5), (50, 4), (12, 3), (10, 4)])
def test_phase_edges_against_a_search(n, m):
    index = torch.arange(n)
    edges = lcd.phase_edge_index(index, n, m).tolist()
    assert edges == written_out_edges(n, m)
    assert len(set(edges)) == m  # M phases, each non-empty
    if m == 1:
        assert edges == [0] * n  # one phase: every point belongs to the trajectory's start (consistency models)
    if m == n:
        assert edges == list(range(n))  # N phases: every grid point is its own edge


class _StandInUnet(torch.nn.Module):
    """A smooth function of (x, t, text) with its own weights: student, teacher and target differ."""

    def __init__(self, gain, calls=None):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(float(gain)))
        self.calls = calls

    def forward(self, sample, timestep, encoder_hidden_states):
        if self.calls is not None:
            self.calls.append(timestep.clone())
        text = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        out = torch.tanh(self.gain * sample + timestep.view(-1, 1, 1, 1) / 1000.0 + text)
        return type("Out", (), {"sample": out})()


def pcm_context(num_ddim_timesteps, num_phases, student, teacher, target, w=(2.0, 2.0)):
    import argparse
    import contextlib

    from diffusers import DDPMScheduler

    args = argparse.Namespace(num_ddim_timesteps=num_ddim_timesteps, num_phases=num_phases, w_min=w[0], w_max=w[1],
                              loss_type="l2", huber_c=0.001, timestep_scaling_factor=None)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return lcd.make_lcd_context(args, scheduler, student, teacher, target, w_embedding_dim=0, device="cpu",
                                autocast=contextlib.nullcontext)


def written_out_pcm_loss(n, m, student, teacher, target, latents, cond, uncond, seed, w=2.0):
    """The PCM loss from the paper's definitions in float64 numpy, with the same random draws as the script."""
    abar = sd_alphas_cumprod()
    k = 1000 // n
    grid = [(i + 1) * k - 1 for i in range(n)]
    torch.manual_seed(seed)
    index = torch.randint(0, n, (latents.shape[0],)).tolist()
    noise = torch.randn_like(latents).double().numpy()
    z0 = latents.double().numpy()
    edges = written_out_edges(n, m)

    def alpha_below(i):  # abar at the grid point below grid index i; abar[0] below the first one
        return abar[0] if i == 0 else abar[grid[i - 1]]

    def x0_eps(net, x, t, text):
        out = net(torch.tensor(x[None], dtype=torch.float32), torch.tensor([t]), text[None]).sample[0].detach().double().numpy()
        return (x - np.sqrt(1 - abar[t]) * out) / np.sqrt(abar[t]), out

    def jump(x0, eps, alpha):
        return np.sqrt(alpha) * x0 + np.sqrt(1 - alpha) * eps

    total = 0.0
    for b, i in enumerate(index):
        t = grid[i]
        x_t = np.sqrt(abar[t]) * z0[b] + np.sqrt(1 - abar[t]) * noise[b]
        s = alpha_below(edges[i])  # abar at the phase's lower end
        prediction = jump(*x0_eps(student, x_t, t, cond[b]), s)
        x0_c, eps_c = x0_eps(teacher, x_t, t, cond[b])
        x0_u, eps_u = x0_eps(teacher, x_t, t, uncond[b])
        x_prev = jump(x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u), alpha_below(i))
        if i == edges[i]:
            goal = x_prev
        else:
            goal = jump(*x0_eps(target, x_prev, max(t - k, 0), cond[b]), s)
        total += ((prediction - goal) ** 2).mean()
    return total / len(index), index


@pytest.mark.parametrize("n,m", [(10, 2), (8, 4), (10, 1), (10, 10)])
def test_pcm_loss_against_written_out_formula(n, m):
    generator = torch.Generator().manual_seed(4)
    latents = torch.randn(6, 4, 4, 4, generator=generator)
    cond = torch.randn(6, 3, 8, generator=generator)
    uncond = torch.randn(6, 3, 8, generator=generator) * 0.1
    target_calls = []
    student, teacher, target = _StandInUnet(0.5), _StandInUnet(-0.3), _StandInUnet(0.8, calls=target_calls)
    ctx = pcm_context(n, m, student, teacher, target)
    torch.manual_seed(11)
    loss = lcd.distillation_loss(ctx, latents, {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond})
    expected, index = written_out_pcm_loss(n, m, student, teacher, target, latents, cond, uncond, seed=11)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert loss.requires_grad and not any(p.grad is not None for p in target.parameters())
    if m == n:  # every point is an edge: the target is the teacher's DDIM step, the target network never runs
        assert target_calls == []
    if m == 1:  # one phase: the student maps every point to the trajectory's start (a consistency model)
        assert all(lcd.phase_edge_index(torch.tensor(index), n, m) == 0)


def test_pcm_at_m_equals_n_is_the_teachers_guided_ddim_step_and_lcd_is_unchanged():
    """M = N: the loss is the distance of the student's one DDIM step to the teacher's guided one (the paper's
    limit where PCM needs no consistency target). And --num_phases unset still gives LCD's loss."""
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(4, 4, 4, 4, generator=generator)
    cond = {"encoder_hidden_states": torch.randn(4, 3, 8, generator=generator)}
    uncond = {"encoder_hidden_states": torch.zeros(4, 3, 8)}
    student, teacher = _StandInUnet(0.5), _StandInUnet(-0.3)
    ctx = pcm_context(10, 10, student, teacher, _StandInUnet(0.8))
    torch.manual_seed(3)
    loss = lcd.pcm_loss(ctx, latents, cond, uncond)
    torch.manual_seed(3)
    index, start, _, noisy, w, _ = lcd.sample_training_points(ctx, latents)
    schedules = (ctx.alpha_schedule, ctx.sigma_schedule)
    out = student(noisy, start, **cond).sample
    student_step = ctx.solver.ddim_step(lcd.get_predicted_original_sample(out, start, noisy, "epsilon", *schedules),
                                        lcd.get_predicted_noise(out, start, noisy, "epsilon", *schedules), index)
    teacher_step = lcd.teacher_guided_ddim_step(teacher, noisy, start, index, w, cond, uncond, ctx.solver, *schedules,
                                                "epsilon")
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(student_step, teacher_step))
    # LCD (no --num_phases) goes through lcd_loss, boundary scalings and all
    ctx.args.num_phases, ctx.args.timestep_scaling_factor = None, 10.0
    torch.manual_seed(3)
    lcd_value = lcd.distillation_loss(ctx, latents, cond, uncond)
    torch.manual_seed(3)
    torch.testing.assert_close(lcd_value, lcd.lcd_loss(ctx, latents, cond, uncond))
    assert lcd_value.item() != pytest.approx(loss.item())


@pytest.mark.parametrize("n,m", [(8, 4), (10, 5), (50, 5), (20, 4), (10, 1)])
def test_tcd_scheduler_with_m_steps_samples_the_phase_edges(n, m):
    """The saved sampler (TCDScheduler, eta 0) visits exactly the phase edges and steps by the same DDIM jump as
    training; DDIM with trailing spacing does the same when the grid reaches t = T - 1."""
    from diffusers import DDIMScheduler, TCDScheduler

    abar = sd_alphas_cumprod()
    solver = lcd.DDIMSolver(abar, 1000, n)
    config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "set_alpha_to_one": False}
    tcd = TCDScheduler(**config, original_inference_steps=n)
    tcd.set_timesteps(m)
    grid = solver.ddim_timesteps.tolist()
    edges = sorted(set(written_out_edges(n, m)))  # e_0 = 0 < e_1 < ... < e_{M-1}
    assert tcd.timesteps.tolist() == [grid[-1]] + [grid[e - 1] for e in reversed(edges[1:])]
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(1, 4, 4, 4, generator=generator)
    for timestep in tcd.timesteps:
        model_output = torch.randn(1, 4, 4, 4, generator=generator)
        i = grid.index(int(timestep))
        a = torch.tensor(abar[int(timestep)], dtype=torch.float32)
        x0 = (x - (1 - a).sqrt() * model_output) / a.sqrt()
        expected = solver.ddim_step(x0, model_output, lcd.phase_edge_index(torch.tensor([i]), n, m))
        x = tcd.step(model_output, timestep, x, eta=0.0).prev_sample
        torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-5)
    if n * (1000 // n) == 1000:
        ddim = DDIMScheduler(**config, timestep_spacing="trailing")
        ddim.set_timesteps(m)
        assert ddim.timesteps.tolist() == tcd.timesteps.tolist()
