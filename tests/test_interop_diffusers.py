"""diffusers interop (difflab.interop): the wrapped model is difflab's model, the scheduler is difflab's sampler.

Every model here is built locally (tiny, random weights, or a test bed's exact model); nothing is downloaded.
"""

import json
import subprocess
import sys
import threading

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from difflab import DiscretePath, gaussian_bed  # noqa: E402
from difflab.guidance import ClassifierFreeGuidance  # noqa: E402
from difflab.interop import DifflabScheduler, diffusers_denoiser  # noqa: E402
from difflab.interop.diffusers_model import BedAsDiffusersModel, betas_from_config, path_from_config  # noqa: E402
from difflab.likelihood import ode_log_likelihood  # noqa: E402
from difflab.paths import smooth_continuation  # noqa: E402
from difflab.pipeline import SAMPLERS, continuous_view  # noqa: E402
from difflab.samplers.time_grids import uniform_t  # noqa: E402
from difflab.testbeds import affine_pushforward  # noqa: E402

SCHEDULE_CONFIGS = [
    {},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "sigmoid"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": True},
    {"num_train_timesteps": 4, "trained_betas": [0.1, 0.2, 0.3, 0.4]},
]


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


@pytest.fixture(scope="module")
def ddpm_config():
    return diffusers.DDPMScheduler(num_train_timesteps=1000).config


# --- the wrapper: schedule, off-by-one, prediction types --------------------------------------------------------
@pytest.mark.parametrize("options", SCHEDULE_CONFIGS)
def test_schedule_is_diffusers_own(options):
    """β of every beta_schedule (and trained/rescaled ones) equal diffusers' (float32 there); ᾱ_cumprod[τ] = ᾱ_{τ+1}.
    diffusers rescales to zero terminal SNR in float32, whose cancellation (√ᾱ − √ᾱ_T) costs it ~1e-4 relative."""
    sched = diffusers.DDPMScheduler(**options)
    path = path_from_config(sched.config)
    rtol = 1e-3 if options.get("rescale_betas_zero_snr") else 1e-5
    assert torch.allclose(betas_from_config(sched.config), sched.betas.double(), rtol=rtol, atol=1e-9)
    assert path.T == len(sched.alphas_cumprod)
    assert torch.allclose(path.alpha_bar[1:], sched.alphas_cumprod.double(), rtol=rtol, atol=1e-9)
    assert path.alpha_bar[0] == 1.0


def test_model_sees_diffusers_timestep_one_below_ddpm_step(ddpm_config):
    """difflab's DDPM step t is diffusers' timestep t − 1 (discrete) and u − 1 for the fractional step u = tT."""
    seen = []

    def model(x, timestep, return_dict=False):
        seen.append(timestep.clone())
        return (torch.zeros_like(x),)

    den = diffusers_denoiser(model, ddpm_config)
    den(torch.zeros(2, 3), 5)
    continuous_view(den)(torch.zeros(2, 3), 0.5)
    assert seen[0].tolist() == [4.0, 4.0]
    assert seen[1].tolist() == [499.0, 499.0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_wrapped_model_is_the_exact_model_at_every_step(prediction_type, ddpm_config):
    """An exact model trained the diffusers way (targets from diffusers' own ``alphas_cumprod``/``get_velocity``),
    wrapped, gives the bed's exact (x̂0, ε̂) on difflab's path at the matching DDPM step — the off-by-one and the
    prediction-type map checked against diffusers' own definitions (its ``alphas_cumprod = cumprod(1 − betas)`` taken
    in float64 from its float32 β: agreement to 1e-6 relative, while neighbouring steps differ by β_t ≥ 1e-4)."""
    bed = gaussian_bed(4, condition=10.0, seed=1)
    sched = diffusers.DDPMScheduler(prediction_type=prediction_type)
    path = path_from_config(sched.config)

    alphas_cumprod = torch.cumprod(1.0 - sched.betas.double(), 0)

    def model(x, timestep, return_dict=False):  # diffusers' convention: ᾱ = alphas_cumprod[τ]
        ab = alphas_cumprod[timestep.long()].reshape(-1, 1)
        x0, eps, _ = bed.posterior_means(x, ab.sqrt().flatten(), (1 - ab).sqrt().flatten())
        if prediction_type == "v_prediction":
            return (ab.sqrt() * eps - (1 - ab).sqrt() * x0,)
        return (eps if prediction_type == "epsilon" else x0,)

    den = diffusers_denoiser(model, sched.config)
    exact = bed.denoiser(path)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for t in (1, 10, 500, 1000):
        got, want = den(x, t), exact(x, t)
        assert torch.allclose(got.x0, want.x0, rtol=1e-6, atol=1e-9)
        assert torch.allclose(got.eps, want.eps, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(den(x, 500).eps, exact(x, 501).eps, rtol=1e-6, atol=1e-9)


def test_add_noise_matches_diffusers(ddpm_config):
    """diffusers forms ᾱ by a float32 cumulative product over 1000 steps, difflab in float64: the coefficients differ
    by up to ~1e-6 relative at τ = 999 (largest difference over 20 seeds: 3.0e-6), so the match is asserted to 2e-5."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    tau = torch.tensor([0, 500, 999])
    ours = DifflabScheduler.from_config(ddpm_config).add_noise(x0, noise, tau)
    assert torch.allclose(ours, diffusers.DDPMScheduler.from_config(ddpm_config).add_noise(x0, noise, tau), atol=2e-5)


# --- the scheduler in diffusers' own pipeline loop ---------------------------------------------------------------
@pytest.mark.parametrize("solver", ["deis", "heun", "ddpm"])
def test_ddpm_pipeline_with_difflab_scheduler_is_difflab_sampler(solver, unet, ddpm_config):
    """DDPMPipeline (diffusers' loop) with ``pipe.scheduler = DifflabScheduler.from_config(...)`` returns exactly
    the samples of ``SAMPLERS[solver]`` on the wrapped UNet from the same noise (and, for DDPM, the same generator)."""
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler.from_config(ddpm_config))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DifflabScheduler.from_config(pipe.scheduler.config, solver=solver)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=8, output_type="np").images

    gen = torch.Generator().manual_seed(3)
    x_T = torch.randn((2, 2, 8, 8), generator=gen)  # DDPMPipeline's draw
    x_T = x_T if solver == "ddpm" else x_T.double()
    with torch.no_grad():
        out = SAMPLERS[solver](diffusers_denoiser(unet, ddpm_config), x_T, 8, generator=gen)
    expected = (out.x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert len(pipe.scheduler.timesteps) == out.nfe <= 8
    assert (images == expected).all()


def _pipeline_loop(scheduler, model, z: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' documented sampling loop."""
    scheduler.set_timesteps(steps)
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)[0]
        x = scheduler.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("solver,prediction_type", [("deis", "epsilon"), ("dpmpp2m", "v_prediction")])
def test_gaussian_bed_through_pipeline_loop_has_difflabs_exact_kl(solver, prediction_type):
    """The exact model of a 16-D Gaussian bed driven by diffusers' loop with DifflabScheduler has the exact KL
    (affine push-forward, SPEC §8) of difflab's own sampler on the bed's exact denoiser. The two differ only in
    the model's time input (float32 diffusers timesteps vs float64 path time): agreement to 1e-4 relative."""
    bed = gaussian_bed(16, condition=100.0, seed=0)
    config = diffusers.DDPMScheduler(prediction_type=prediction_type).config
    path = path_from_config(config)
    scheduler = DifflabScheduler.from_config(config, solver=solver)
    model = BedAsDiffusersModel(bed, path, prediction_type)
    prior = scheduler.init_noise_sigma

    mean, cov = affine_pushforward(lambda z: _pipeline_loop(scheduler, model, z / prior, 10), bed.D, prior)
    kl_loop = float(bed.kl_from_gaussian(mean, cov))
    mean, cov = affine_pushforward(lambda z: SAMPLERS[solver](bed.denoiser(path), z, 10).x, bed.D, prior)
    kl_difflab = float(bed.kl_from_gaussian(mean, cov))
    assert model.calls == len(scheduler.timesteps) == 10
    assert kl_loop == pytest.approx(kl_difflab, rel=1e-4)


# --- Stable Diffusion: text encoder, VAE, conditional UNet, CFG ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tokenizer")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  norm_num_groups=4, sample_size=8).eval()
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        skip_prk_steps=True, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_stable_diffusion_cfg_with_difflab_scheduler(tiny_sd):
    """StableDiffusionPipeline (tokenizer, text encoder, conditional UNet, VAE, its own CFG at scale 3) runs end to
    end on DifflabScheduler, and its latents are difflab's CFG (prompt embeddings as the condition, the negative
    prompt's as ∅) run by the scheduler's default solver — difflab's default sampler — on the wrapped UNet."""
    from difflab.interop.diffusers_scheduler import DEFAULT_SOLVER

    assert DEFAULT_SOLVER == "default"
    pipe = tiny_sd
    pipe.scheduler = DifflabScheduler.from_config(pipe.scheduler.config)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(height=8, width=8, num_inference_steps=6, guidance_scale=3.0)
    images = pipe("a cat", latents=z, output_type="np", **kwargs).images
    assert images.shape == (1, 8, 8, 3) and (images >= 0).all() and (images <= 1).all()
    latents = pipe("a cat", latents=z, output_type="latent", **kwargs).images

    with torch.no_grad():
        cond, null = pipe.encode_prompt("a cat", "cpu", 1, True)
        den = diffusers_denoiser(pipe.unet, pipe.scheduler.config, context=cond, null_context=null[0])
        guided = ClassifierFreeGuidance(den, 3.0)
        out = SAMPLERS[DEFAULT_SOLVER](guided, (z * pipe.scheduler.init_noise_sigma).double(), 6,
                                       y=torch.zeros(1).long())
    assert out.nfe == 2 * len(pipe.scheduler.timesteps)
    assert torch.allclose(latents, out.x.float(), atol=1e-4)


# --- the ODE likelihood on a wrapped model -----------------------------------------------------------------------
def test_ode_likelihood_of_wrapped_exact_model_is_the_beds():
    """ode_log_likelihood through the wrapper (diffusers timesteps, float32 time input) equals the one of the bed's
    exact denoiser on the continuation ``continuous_view`` uses (the spline of log ᾱ), on the same grid."""
    bed = gaussian_bed(4, condition=10.0, seed=2)
    config = diffusers.DDPMScheduler().config
    path = path_from_config(config)
    cont = smooth_continuation(path)
    grid = uniform_t(cont, 40, clean_end=False)
    x = bed.sample(3, generator=torch.Generator().manual_seed(0))
    wrapped = ode_log_likelihood(continuous_view(diffusers_denoiser(BedAsDiffusersModel(bed, path), config)), x,
                                 solver="heun", timesteps=grid)
    native = ode_log_likelihood(bed.denoiser(cont), x, solver="heun", timesteps=grid)
    assert torch.allclose(wrapped["logp"], native["logp"], rtol=1e-5)


def test_ode_likelihood_runs_on_wrapped_unet(unet, ddpm_config):
    cont_den = continuous_view(diffusers_denoiser(unet, ddpm_config))
    x = torch.rand(2, 2, 8, 8) * 2 - 1
    res = ode_log_likelihood(cont_den, x, solver="euler", timesteps=uniform_t(cont_den.path, 4, clean_end=False),
                             divergence="hutchinson", generator=torch.Generator().manual_seed(0))
    assert res["logp"].shape == (2,) and torch.isfinite(res["logp"]).all()


# --- the protocol: config round trip, order of calls, clear errors ------------------------------------------------
def test_config_save_load_round_trip(tmp_path, ddpm_config):
    sched = DifflabScheduler.from_config(ddpm_config, solver="dpmpp2m", beta_schedule="scaled_linear")
    sched.save_pretrained(tmp_path)
    loaded = DifflabScheduler.from_pretrained(tmp_path)
    assert loaded.config.solver == "dpmpp2m" and loaded.config.beta_schedule == "scaled_linear"
    sched.set_timesteps(7)
    loaded.set_timesteps(7)
    assert torch.equal(sched.timesteps, loaded.timesteps)
    # and back: a diffusers scheduler reads the schedule from difflab's config
    assert diffusers.DDIMScheduler.from_config(loaded.config).config.beta_schedule == "scaled_linear"


def test_protocol_errors(ddpm_config):
    sched = DifflabScheduler.from_config(ddpm_config, solver="heun")
    x = torch.randn(1, 2)
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        sched.step(x, 999, x)
    sched.set_timesteps(5)
    with pytest.raises(ValueError, match="expected"):
        sched.step(x, sched.timesteps[1], x)
    prev = sched.step(torch.zeros_like(x), sched.timesteps[0], x).prev_sample
    with pytest.raises(ValueError, match="not the prev_sample"):
        sched.step(torch.zeros_like(x), sched.timesteps[1], prev + 1)
    for t in sched.timesteps[1:]:
        prev = sched.step(torch.zeros_like(x), t, prev).prev_sample
    with pytest.raises(RuntimeError, match="are done"):
        sched.step(x, sched.timesteps[-1], prev)
    with pytest.raises(ValueError, match="unknown solver"):
        DifflabScheduler(solver="rk45")


def test_set_timesteps_abandons_a_solve_in_progress(ddpm_config):
    sched = DifflabScheduler.from_config(ddpm_config)
    before = threading.active_count()
    sched.set_timesteps(6)
    x = torch.randn(1, 2)
    sched.step(torch.zeros_like(x), sched.timesteps[0], x)
    assert threading.active_count() == before + 1
    sched.set_timesteps(6)
    assert threading.active_count() == before


def test_worker_errors_reach_the_pipeline(ddpm_config):
    """An error inside the solver (here: a model output of the wrong shape) is raised in the caller's thread."""
    sched = DifflabScheduler.from_config(ddpm_config)
    sched.set_timesteps(4)
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError):
        sched.step(torch.zeros(5, 7), sched.timesteps[0], x)


def test_core_never_imports_diffusers():
    """Importing difflab and every module outside difflab.interop loads no diffusers."""
    code = (
        "import importlib, pkgutil, sys, difflab\n"
        "for m in pkgutil.walk_packages(difflab.__path__, 'difflab.'):\n"
        "    if not m.name.startswith('difflab.interop'):\n"
        "        importlib.import_module(m.name)\n"
        "import difflab.interop.diffusers_model\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('diffusers', 'transformers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
