"""diffusers-compatible schedulers: our fused DDPM/DDIM steps against diffusers' own schedulers.

Each loop runs our scheduler and diffusers' side by side from the same x_T, with the same
deterministic "model" and generators seeded alike, and compares x_{t-1} and x0 at every step.
diffusers computes in float32 from float32 alphas_cumprod (our tables: float64, rounded once),
so the allowed error is float32 rounding scaled by 1/sqrt(abar_T) ~ 160 at t = 999.
"""

import copy

import pytest
import torch

import diffusion_fast
from diffusion_fast.ops.philox import philox_normal_ref
from diffusion_fast.schedulers import DDIMScheduler, DDPMScheduler, SchedulerOutput

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 3, 6, 5)  # odd spatial sizes, batch 2


def model(x, t):
    """A deterministic ε (or x0, v) predictor depending on x and t; large enough that clipping acts."""
    return 0.7 * x + 0.4 * torch.sin(2.0 * x + 0.01 * float(t))


def assert_close(actual, expected, what, tol=1e-4, scale=1.0):
    """max|actual - expected| <= tol * max(1, max|expected|, scale)."""
    scale = max(1.0, expected.abs().max().item(), scale)
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


def exact_coefficients(ref):
    """A copy of diffusers' scheduler whose coefficients are computed in float64 from the same
    float32 alphas_cumprod (the samples stay float32): the precision of our tables."""
    exact = copy.deepcopy(ref)
    exact.alphas_cumprod = ref.alphas_cumprod.double()
    if hasattr(ref, "one"):
        exact.one = ref.one.double()
    if hasattr(ref, "final_alpha_cumprod"):
        exact.final_alpha_cumprod = ref.final_alpha_cumprod.double()
    return exact


def side_by_side(ours, ref, steps, tols=(3e-4, 1e-5), dtype=torch.float32, **step_kwargs):
    """Full sampling loops of our scheduler, diffusers' and diffusers' with float64 coefficients,
    compared at every step. diffusers' own 1 - abar_t / abar_t' in float32 loses up to ~1e-3 of
    beta at small t, hence ``tols``: against it, and against the float64-coefficient copy."""
    refs = [ref, exact_coefficients(ref)]
    if steps is not None:
        for s in (ours, *refs):
            s.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ys = [x.clone(), x.clone()]
    x = x.to(dtype)
    gens = [torch.Generator().manual_seed(1) for _ in range(3)]
    for i, t in enumerate(ref.timesteps):
        a = ours.step(model(x, t), t, x, generator=gens[0], **step_kwargs)
        assert a.prev_sample.dtype == dtype
        # x0 = (x - sqrt(1 - abar) eps) / sqrt(abar): its rounding errors scale with |x| / sqrt(abar)
        scale = x.abs().max().item()
        x0_scale = scale / ref.alphas_cumprod[t].sqrt().item()
        for k, (r, tolerance) in enumerate(zip(refs, tols)):
            b = r.step(model(ys[k], t), t, ys[k], generator=gens[k + 1], **step_kwargs)
            what = f"{'diffusers' if k == 0 else 'diffusers, float64 coefficients'}, step {i} (t={int(t)})"
            assert_close(a.prev_sample, b.prev_sample, f"prev_sample, {what}", tolerance, scale)
            assert_close(a.pred_original_sample, b.pred_original_sample, f"pred_original_sample, {what}",
                         tolerance, x0_scale)
            ys[k] = b.prev_sample
        x = a.prev_sample
    assert all(torch.equal(gens[0].get_state(), g.get_state()) for g in gens[1:]), "different amounts of noise drawn"
    assert ys[0].abs().max() > 0.1  # not a degenerate loop
    return x, ys[0]


@pytest.mark.parametrize("config,steps", [
    ({"variance_type": "fixed_small"}, 1000),  # the paper's full chain
    ({"variance_type": "fixed_large", "clip_sample": False, "beta_schedule": "scaled_linear"}, 50),
    ({"variance_type": "fixed_small_log", "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"}, 20),
    ({"variance_type": "fixed_large", "steps_offset": 1}, 10),  # last step at t = 1: diffusers adds noise there
    ({"variance_type": "fixed_small", "timestep_spacing": "linspace", "clip_sample_range": 2.0}, 10),
    ({"prediction_type": "sample", "beta_schedule": "sigmoid"}, 10),
    ({"prediction_type": "v_prediction", "clip_sample": False, "variance_type": "fixed_large"}, 10),
    ({"num_train_timesteps": 100, "trained_betas": torch.linspace(1e-3, 0.05, 100).tolist()}, None),  # no set_timesteps
    ({"num_train_timesteps": 100}, 1),  # one step
])
def test_ddpm_matches_diffusers(config, steps):
    side_by_side(DDPMScheduler(**config), diffusers.DDPMScheduler(**config), steps)


@pytest.mark.parametrize("config,steps,eta,clipped", [
    ({}, 50, 0.0, False),
    ({}, 10, 0.5, False),
    ({}, 10, 1.0, True),
    ({"timestep_spacing": "linspace", "set_alpha_to_one": False}, 10, 0.5, False),
    ({"timestep_spacing": "trailing", "clip_sample": False}, 50, 1.0, False),
    ({"steps_offset": 1, "set_alpha_to_one": False, "beta_schedule": "scaled_linear"}, 10, 0.0, None),
    ({"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"}, 10, 0.5, True),
    ({"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 10, 0.5, False),
])
def test_ddim_matches_diffusers(config, steps, eta, clipped):
    side_by_side(DDIMScheduler(**config), diffusers.DDIMScheduler(**config), steps,
                 eta=eta, use_clipped_model_output=clipped)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cuda", id="extension"), pytest.param(
    "triton", marks=pytest.mark.skipif(not diffusion_fast.backends.triton_interpret() and not torch.cuda.is_available(),
                                       reason="no Triton"))])
def test_every_backend_matches_diffusers(backend):
    with diffusion_fast.use_backend(backend):
        side_by_side(DDIMScheduler(), diffusers.DDIMScheduler(), 5, eta=0.5)
        side_by_side(DDPMScheduler(), diffusers.DDPMScheduler(), 5)


def test_half_precision_samples():
    """fp16 samples: our step computes in fp32 and rounds once; compared with diffusers in fp32."""
    x, _y = side_by_side(DDIMScheduler(), diffusers.DDIMScheduler(), 10, tols=(1e-2, 1e-2), dtype=torch.float16,
                        eta=0.0)
    assert x.dtype == torch.float16


def test_philox_noise_without_generator():
    """No generator: z = Philox(seed, step = the step's row), i.e. diffusers' step given that noise."""
    ours, ref = DDIMScheduler(seed=123), diffusers.DDIMScheduler()
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x = torch.randn(SHAPE)
    y = x.clone()
    for i, t in enumerate(ours.timesteps):
        z = philox_normal_ref(123, i, x.numel(), torch.float32, "cpu").reshape(SHAPE)
        x = ours.step(model(x, t), t, x, eta=0.8).prev_sample
        y = ref.step(model(y, t), t, y, eta=0.8, variance_noise=z).prev_sample
        assert_close(x, y, f"step {i}")

    ddpm = DDPMScheduler(num_train_timesteps=50, seed=7)
    runs = {}
    for seed in (7, 7, 8):
        ddpm.seed = seed
        ddpm.set_timesteps(50)
        x = torch.ones(SHAPE)
        for t in ddpm.timesteps:
            x = ddpm.step(model(x, t), t, x).prev_sample
        runs.setdefault(seed, []).append(x)
    assert torch.equal(runs[7][0], runs[7][1])
    assert (runs[7][0] - runs[8][0]).abs().max() > 0.1


def test_seed_none_follows_torch_manual_seed():
    s = DDPMScheduler(num_train_timesteps=20)
    out = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        s.set_timesteps(20)
        x = torch.ones(SHAPE)
        for t in s.timesteps:
            x = s.step(model(x, t), t, x).prev_sample
        out.append(x)
    assert torch.equal(out[0], out[1])
    assert not torch.equal(out[0], out[2])


def test_variance_noise_and_generator_lists():
    ours, ref = DDIMScheduler(), diffusers.DDIMScheduler()
    for s in (ours, ref):
        s.set_timesteps(10)
    x, t = torch.randn(SHAPE), ours.timesteps[3]
    z = torch.randn(SHAPE)
    a = ours.step(model(x, t), t, x, eta=1.0, variance_noise=z)
    b = ref.step(model(x, t), t, x, eta=1.0, variance_noise=z)
    assert_close(a.prev_sample, b.prev_sample, "variance_noise")
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    ref_gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    a = ours.step(model(x, t), t, x, eta=1.0, generator=gens)
    b = ref.step(model(x, t), t, x, eta=1.0, generator=ref_gens)
    assert_close(a.prev_sample, b.prev_sample, "one generator per batch element")

    ddpm = DDPMScheduler()
    ddpm.set_timesteps(10)
    t = ddpm.timesteps[2]
    given = ddpm.step(model(x, t), t, x, variance_noise=torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)))
    drawn = ddpm.step(model(x, t), t, x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(given.prev_sample, drawn.prev_sample, rtol=0, atol=0)


def test_timestep_forms_and_return_dict():
    s = DDIMScheduler()
    s.set_timesteps(10)
    x = torch.randn(SHAPE)
    t = s.timesteps[4]
    a = s.step(model(x, t), t, x)
    b = s.step(model(x, t), int(t), x)
    c = s.step(model(x, t), t.reshape(1), x, return_dict=False)
    assert isinstance(a, SchedulerOutput) and isinstance(c, tuple) and len(c) == 2
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a[0], c[0])
    assert torch.equal(a["pred_original_sample"], c[1])
    assert s.scale_model_input(x, t) is x and s.init_noise_sigma == 1.0 and len(s) == 1000


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_noise_and_velocity_equal_diffusers(cls, dtype):
    ours = getattr(diffusion_fast.schedulers, cls)(beta_schedule="scaled_linear", beta_end=0.012, beta_start=8.5e-4)
    ref = getattr(diffusers, cls)(beta_schedule="scaled_linear", beta_end=0.012, beta_start=8.5e-4)
    x0, noise = torch.randn(SHAPE, dtype=dtype), torch.randn(SHAPE, dtype=dtype)
    t = torch.tensor([999, 17])
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    assert torch.equal(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t))


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("steps,config", [(10, {}), (7, {"timestep_spacing": "linspace"}),
                                          (7, {"timestep_spacing": "trailing"}), (20, {"steps_offset": 1}),
                                          (1000, {})])
def test_timesteps_equal_diffusers(cls, steps, config):
    ours, ref = getattr(diffusion_fast.schedulers, cls)(**config), getattr(diffusers, cls)(**config)
    assert torch.equal(ours.timesteps, ref.timesteps)  # before set_timesteps
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps)


def test_ddpm_custom_timesteps():
    ours, ref = DDPMScheduler(), diffusers.DDPMScheduler()
    ours.set_timesteps(timesteps=[900, 500, 260, 3])
    ref.set_timesteps(timesteps=[900, 500, 260, 3])
    side_by_side(ours, ref, None)
    assert ours.previous_timestep(500) == 260 and ours.previous_timestep(3) == -1


# A pipeline's scheduler_config.json (google/ddpm-cifar10-32's fields) as from_config gets it.
HUB_CONFIG = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02,
              "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000,
              "trained_betas": None, "variance_type": "fixed_large"}


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
def test_from_config_round_trips(cls, tmp_path):
    ref_cls, our_cls = getattr(diffusers, cls), getattr(diffusion_fast.schedulers, cls)
    ref = ref_cls(beta_schedule="scaled_linear", clip_sample=False, steps_offset=1, prediction_type="v_prediction")
    ours = our_cls.from_config(ref.config)
    public = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert {k: ours.config[k] for k in public} == public
    back = ref_cls.from_config(ours.config)  # and diffusers reads ours
    assert {k: back.config[k] for k in public} == public
    again = our_cls.from_config(ours.config, clip_sample=True)
    assert again.config.clip_sample and again.config.beta_schedule == "scaled_linear"
    assert ours.config.num_train_timesteps == 1000  # attribute access, like diffusers' FrozenDict
    ours.save_config(tmp_path)
    assert dict(our_cls.from_pretrained(tmp_path).config) == dict(ours.config)
    assert {k: ref_cls.from_pretrained(tmp_path).config[k] for k in public} == public
    # a pipeline's (older, partial) config, also across classes
    ours, ref = our_cls.from_config(HUB_CONFIG), ref_cls.from_config(HUB_CONFIG)
    side_by_side(ours, ref, 10)


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.mark.parametrize("pipeline,kwargs", [("DDPMPipeline", {}), ("DDIMPipeline", {"eta": 0.0}),
                                             ("DDIMPipeline", {"eta": 0.7, "use_clipped_model_output": True})])
def test_drop_into_diffusers_pipeline(pipeline, kwargs, one_thread):
    unet = tiny_unet()
    name = pipeline.replace("Pipeline", "Scheduler")
    ref_scheduler = getattr(diffusers, name)()
    images = {}
    for scheduler in (ref_scheduler, getattr(diffusion_fast.schedulers, name).from_config(ref_scheduler.config)):
        pipe = getattr(diffusers, pipeline)(unet=unet, scheduler=scheduler).to("cpu")
        pipe.set_progress_bar_config(disable=True)
        images[type(scheduler).__module__.split(".")[0]] = pipe(
            batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=8, output_type="np",
            **kwargs).images
    assert images["diffusers"].std() > 0.01
    assert abs(images["diffusion_fast"] - images["diffusers"]).max() < 1e-4


def test_config_errors():
    bad = [({"beta_schedule": "cosine"}, ValueError, "beta_schedule"),
           ({"beta_end": 1.5}, ValueError, "beta"),
           ({"beta_start": "a"}, TypeError, "beta_start"),
           ({"trained_betas": [0.1, 0.2]}, ValueError, "trained_betas"),
           ({"num_train_timesteps": 1}, ValueError, "num_train_timesteps"),
           ({"prediction_type": "x0"}, ValueError, "prediction_type"),
           ({"thresholding": True}, ValueError, "thresholding"),
           ({"rescale_betas_zero_snr": True}, ValueError, "rescale_betas_zero_snr"),
           ({"timestep_spacing": "even"}, ValueError, "timestep_spacing"),
           ({"clip_sample_range": 0.0}, ValueError, "clip_sample_range"),
           ({"steps_offset": -1}, ValueError, "steps_offset"),
           ({"seed": -1}, ValueError, "seed")]
    for cls in (DDPMScheduler, DDIMScheduler):
        for config, error, match in bad:
            with pytest.raises(error, match=match):
                cls(**config)
    for variance in ("learned", "learned_range", "fixed_large_log"):
        with pytest.raises(ValueError, match="variance_type"):
            DDPMScheduler(variance_type=variance)
    with pytest.raises(TypeError, match="set_alpha_to_one"):
        DDIMScheduler(set_alpha_to_one="yes")
    with pytest.raises(TypeError, match="read-only"):
        DDIMScheduler().config["clip_sample"] = False
    with pytest.raises(TypeError, match="mapping"):
        DDIMScheduler.from_config("google/ddpm-cifar10-32")


def test_step_errors():
    s = DDIMScheduler()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(1001)
    with pytest.raises(ValueError, match="steps_offset"):
        DDIMScheduler(steps_offset=1).set_timesteps(1000)  # timesteps reach 1000
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 998"):
        s.step(x, 998, x)
    with pytest.raises(TypeError, match="timestep"):
        s.step(x, 900.0, x)
    with pytest.raises(ValueError, match="model_output"):
        s.step(x[:1], 900, x)
    with pytest.raises(ValueError, match="eta"):
        s.step(x, 900, x, eta=-0.5)
    with pytest.raises(ValueError, match="variance_noise"):
        s.step(x, 900, x, eta=1.0, variance_noise=x[:, :2])
    with pytest.raises(ValueError, match="at most one"):
        s.step(x, 900, x, eta=1.0, variance_noise=x, generator=torch.Generator())
    with pytest.raises(ValueError, match="one per batch element"):
        s.step(x, 900, x, eta=1.0, generator=[torch.Generator()] * 3)
    with pytest.raises(ValueError, match="timesteps"):
        s.add_noise(x, x, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="noise"):
        s.add_noise(x, x[:1], torch.tensor([0, 1]))
    d = DDPMScheduler()
    with pytest.raises(ValueError, match="exactly one"):
        d.set_timesteps(10, timesteps=[5, 1])
    with pytest.raises(ValueError, match="strictly decreasing"):
        d.set_timesteps(timesteps=[5, 7])


@pytest.mark.cuda
def test_cuda_matches_diffusers_with_a_cpu_generator():
    """On the GPU with a CPU generator: the noise is drawn on the CPU (as diffusers does) and moved."""
    ours, ref = DDIMScheduler(), diffusers.DDIMScheduler()
    ours.set_timesteps(10, device="cuda")
    ref.set_timesteps(10)
    x = torch.randn(SHAPE)
    y, x = x.clone(), x.cuda()
    g_ours, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in ref.timesteps:
        x = ours.step(model(x, t), int(t), x, eta=0.5, generator=g_ours).prev_sample
        y = ref.step(model(y, t), t, y, eta=0.5, generator=g_ref).prev_sample
        assert_close(x.cpu(), y, f"t={int(t)}", 1e-3)
