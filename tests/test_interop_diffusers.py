"""genjax.interop.diffusers against diffusers' own PyTorch UNet2DModel and schedulers (test oracles, CPU, offline).

Tiny random models are built with the real diffusers classes, written with `save_pretrained`, loaded with genjax and
compared on the same inputs. The oracle tests skip when torch / diffusers are not installed (the `interop-test`
extra); the error tests need neither.
"""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax.errors import CheckpointError, UserError
from genjax.interop.diffusers import load_sampler_options, load_schedule, load_unet, load_unet_config

# Two tiny U-Nets covering the options the DDPM family uses: multi-head attention with group norm everywhere and
# diffusers' defaults (cos-first embedding, no shift, symmetric downsample padding), and the google/ddpm-* style
# (sin-first, freq_shift=1, asymmetric padding) with scale_shift conditioning, one head, a mid-block attention
# without group norm, and a mid-block scale factor.
VARIANTS = {
    "multihead_defaults": dict(flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, attention_head_dim=8,
                               resnet_time_scale_shift="default", norm_eps=1e-5),
    "ddpm_style_scale_shift": dict(flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, attention_head_dim=None,
                                   resnet_time_scale_shift="scale_shift", norm_eps=1e-6, mid_block_scale_factor=2.0),
}


def _tiny_unet(**options):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  model = diffusers.UNet2DModel(
      sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
      down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
      norm_num_groups=8, **options)
  with torch.no_grad():  # move every parameter off its init (zero biases, unit norms) so that each one matters
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module")
def saved_unets(tmp_path_factory):
  """variant -> (torch model, (apply_fn, params) loaded by genjax from its save_pretrained directory)."""
  out = {}
  for name, options in VARIANTS.items():
    model = _tiny_unet(**options)
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    out[name] = model, load_unet(path)
  return out


@pytest.fixture
def saved_unet(saved_unets):
  return saved_unets["ddpm_style_scale_shift"]   # the google/ddpm-* style: what old-format checkpoints are


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("timesteps", [[0, 417, 999], [0.5, 123.25, 998.9]], ids=["int_t", "fractional_t"])
def test_unet_output_matches_diffusers(saved_unets, variant, timesteps):
  import torch
  model, (apply_fn, params) = saved_unets[variant]
  x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)  # NCHW for torch
  t = np.asarray(timesteps)
  with torch.no_grad():
    expected = model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
  got = np.asarray(apply_fn(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t))).transpose(0, 3, 1, 2)
  scale = np.abs(expected).max()
  assert scale > 0.1
  np.testing.assert_array_less(np.abs(got - expected).max(), 1e-4 * scale)


def test_pipeline_directory_runs_genjax_ddim_like_diffusers_ddim(tmp_path):
  """A DDPMPipeline directory (unet/ + scheduler/, v-prediction, cosine betas) sampled with genjax's DDIM equals
  diffusers' own DDIMScheduler loop on the torch U-Net: same trailing timesteps, final step to alpha-bar = 1."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from genjax.interop.diffusers import load_pipeline, sample_images
  from genjax.samplers import ddim_sample
  model = _tiny_unet(**VARIANTS["multihead_defaults"])
  scheduler = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                                      timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
  path = str(tmp_path / "pipe")
  diffusers.DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(path)
  pipe = load_pipeline(path)
  assert pipe.options == {"prediction": "v", "clip_denoised": None} and pipe.image_shape() == (8, 8, 3)
  x_T = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
  scheduler.set_timesteps(4)
  x = torch.from_numpy(x_T)
  with torch.no_grad():
    for t in scheduler.timesteps:
      x = scheduler.step(model(x, t).sample, t, x).prev_sample
  expected = x.numpy()
  got = ddim_sample(pipe.model_fn, pipe.schedule, jnp.asarray(x_T.transpose(0, 2, 3, 1)), num_steps=4,
                    spacing="trailing", rng=jax.random.PRNGKey(0), **pipe.options)  # rng as sample_images passes
  got = np.asarray(got).transpose(0, 3, 1, 2)
  np.testing.assert_array_less(np.abs(got - expected).max(), 1e-4 * np.abs(expected).max())
  # sample_images draws x_T from the first half of its rng and maps [-1, 1] to [0, 1] (same compiled program).
  rng = jax.random.PRNGKey(3)
  images = sample_images(pipe, rng, 2, sampler="ddim", num_steps=4, spacing="trailing")
  noise_rng, sampler_rng = jax.random.split(rng)
  direct = ddim_sample(pipe.model_fn, pipe.schedule, jax.random.normal(noise_rng, (2, 8, 8, 3)), num_steps=4,
                       spacing="trailing", rng=sampler_rng, **pipe.options)
  np.testing.assert_allclose(images, np.clip((np.asarray(direct) + 1) / 2, 0, 1), atol=1e-6)
  with pytest.raises(UserError, match="option 'eta' does not apply to sampler='dpm_solver'; valid: order"):
    sample_images(pipe, rng, 2, sampler="dpm_solver", eta=0.5)
  with pytest.raises(UserError, match="sampler='ddmi' is not one of: ddpm, ddim"):
    sample_images(pipe, rng, 2, sampler="ddmi")


def test_apply_fn_checks_shapes_in_one_line(saved_unet):
  _, (apply_fn, params) = saved_unet
  with pytest.raises(UserError, match=r"x must be NHWC \[batch, height, width, 3\] with height and width multiples "
                                      r"of 2, got shape \(1, 3, 8, 8\)"):
    apply_fn(params, jnp.zeros((1, 3, 8, 8)), jnp.zeros((1,)))        # NCHW by mistake
  with pytest.raises(UserError, match=r"t must have shape \[batch\] = \(2,\) or be a scalar, got shape \(3,\)"):
    apply_fn(params, jnp.zeros((2, 8, 8, 3)), jnp.zeros((3,)))


def test_half_precision_checkpoints_load_as_float32(saved_unet, tmp_path):
  import copy
  import torch
  model, (_, params) = saved_unet
  for dtype, eps in ((torch.float16, 2.0 ** -11), (torch.bfloat16, 2.0 ** -8)):  # unit roundoff of the storage
    path = str(tmp_path / str(dtype))
    copy.deepcopy(model).to(dtype).save_pretrained(path)
    _, loaded = load_unet(path)
    assert {leaf.dtype for leaf in jax.tree.leaves(loaded)} == {jnp.dtype(jnp.float32)}
    close = jax.tree.map(lambda a, b: bool(np.allclose(a, b, rtol=eps, atol=1e-6)), params, loaded)
    assert all(jax.tree.leaves(close))


def test_sample_cli_rejects_options_that_do_not_apply(tmp_path):
  from experiments.sample import sample_diffusers
  with pytest.raises(UserError, match="--guidance does not apply to --diffusers_model; valid: --sampler"):
    sample_diffusers(str(tmp_path), options={"sampler": "ddim", "guidance": 2.0})
  with pytest.raises(CheckpointError, match="no config.json"):
    sample_diffusers(str(tmp_path), options={"sampler": "ddim"})


def test_old_attention_weight_names_load_the_same(saved_unet, tmp_path):
  """google/ddpm-* checkpoints carry the pre-0.14 attention names query/key/value/proj_attn."""
  from safetensors.numpy import load_file, save_file
  model, (_, params) = saved_unet
  model.save_pretrained(str(tmp_path))
  weights = str(tmp_path / "diffusion_pytorch_model.safetensors")
  renamed = {}
  for key, value in load_file(weights).items():
    for new, old in {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}.items():
      key = key.replace(f".{new}.", f".{old}.")
    renamed[key] = value
  assert sum(".query." in k for k in renamed) >= 2  # the down/up blocks' and (if any) the mid block's
  save_file(renamed, weights)
  _, from_old_names = load_unet(str(tmp_path))
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, from_old_names)
  assert all(jax.tree.leaves(same))


def test_sharded_checkpoint_loads_the_same_and_a_missing_shard_is_named(saved_unet, tmp_path):
  model, (_, params) = saved_unet
  model.save_pretrained(str(tmp_path), max_shard_size="20KB")   # diffusers writes shards + an index
  shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
  assert len(shards) > 2 and os.path.exists(tmp_path / "diffusion_pytorch_model.safetensors.index.json")
  _, loaded = load_unet(str(tmp_path))
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, loaded)))
  os.remove(tmp_path / shards[1])
  with pytest.raises(CheckpointError, match=f"missing shard {shards[1]} listed in"):
    load_unet(str(tmp_path))


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedule_matches_ddpm_scheduler(tmp_path, beta_schedule):
  diffusers = pytest.importorskip("diffusers")
  scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=0.00085,
                                      beta_end=0.012, prediction_type="sample", clip_sample=False)
  scheduler.save_pretrained(str(tmp_path))
  sched = load_schedule(str(tmp_path))
  np.testing.assert_allclose(sched.betas, scheduler.betas.numpy(), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(sched.alphas_cumprod, scheduler.alphas_cumprod.numpy(), rtol=2e-6, atol=1e-8)
  assert load_sampler_options(str(tmp_path)) == {"prediction": "x0", "clip_denoised": None}


def test_zero_terminal_snr_schedule_matches_ddim_scheduler(tmp_path):
  diffusers = pytest.importorskip("diffusers")
  scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True,
                                      prediction_type="v_prediction")
  scheduler.save_pretrained(str(tmp_path))
  sched = load_schedule(str(tmp_path))
  # diffusers rescales in float32 and re-derives betas as 1 - abar_t / abar_{t-1}, which costs it ~1e-7 absolute
  # (about 1e-3 relative on the smallest betas); genjax works in float64.
  np.testing.assert_allclose(sched.betas, scheduler.betas.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sched.alphas_cumprod, scheduler.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)
  assert float(sched.alphas_cumprod[-1]) == 0.0
  assert load_sampler_options(str(tmp_path)) == {"prediction": "v", "clip_denoised": (-1.0, 1.0)}


# --------------------------------------------------------------------------------------------- errors (no torch)
_CONFIG = dict(_class_name="UNet2DModel", sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 8],
               layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
               down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"])


def _write(path, name, content):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, name), "w") as f:
    json.dump(content, f)
  return str(path)


def test_directory_without_config_is_one_line_error(tmp_path):
  with pytest.raises(CheckpointError, match=r"no config.json in .*not a diffusers UNet2DModel directory") as e:
    load_unet(str(tmp_path))
  assert "\n" not in str(e.value)
  with pytest.raises(CheckpointError, match="does not exist"):
    load_unet(str(tmp_path / "absent"))
  with pytest.raises(CheckpointError, match="no scheduler_config.json"):
    load_schedule(str(tmp_path))


@pytest.mark.parametrize("field,value", [
    ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D"]),
    ("up_block_types", ["SkipUpBlock2D", "UpBlock2D"]),
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("time_embedding_type", "fourier"),
    ("resnet_time_scale_shift", "spatial"),
    ("upsample_type", "resnet"),
    ("mid_block_type", "UNetMidBlock2DCrossAttn"),
    ("_class_name", "UNet2DConditionModel"),
])
def test_unsupported_option_names_the_field(tmp_path, field, value):
  path = _write(tmp_path, "config.json", {**_CONFIG, field: value})
  with pytest.raises(CheckpointError, match=rf"^unsupported diffusers option {field}=") as e:
    load_unet_config(path)
  assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_weight_file_errors_name_the_problem(tmp_path):
  from safetensors.numpy import save_file
  path = _write(tmp_path, "config.json", _CONFIG)
  with open(os.path.join(path, "diffusion_pytorch_model.bin"), "wb"):
    pass
  with pytest.raises(CheckpointError, match=r"no diffusion_pytorch_model.safetensors .*\.bin.*safetensors only"):
    load_unet(path)
  save_file({"conv_in.weight": np.zeros((8, 1, 3, 3), np.float32)},
            os.path.join(path, "diffusion_pytorch_model.safetensors"))
  with pytest.raises(CheckpointError, match=r"lacks conv_in\.bias"):
    load_unet(path)
  save_file({"conv_in.weight": np.zeros((8, 2, 3, 3), np.float32)},
            os.path.join(path, "diffusion_pytorch_model.safetensors"))
  with pytest.raises(CheckpointError, match=r"conv_in\.weight has shape \(8, 2, 3, 3\), config.json implies "
                                            r"\(8, 1, 3, 3\)"):
    load_unet(path)
  weights = os.path.join(path, "diffusion_pytorch_model.safetensors")
  data = open(weights, "rb").read()
  for content in (data[:len(data) - 8], b"garbage"):       # truncated (a raw SafetensorError traceback before), junk
    with open(weights, "wb") as f:
      f.write(content)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(weights)} is truncated or not a safetensors file") as e:
      load_unet(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("update,match", [
    ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'; supported: linear, scaled_linear, squaredcos_cap_v2"),
    ({"beta_schedule": None, "_class_name": "ScoreSdeVeScheduler"}, "'ScoreSdeVeScheduler' has no beta_schedule"),
])
def test_unsupported_schedule_names_the_field(tmp_path, update, match):
  config = {"_class_name": "DDPMScheduler", "num_train_timesteps": 10, "beta_schedule": "linear", **update}
  config = {k: v for k, v in config.items() if v is not None}
  with pytest.raises(CheckpointError, match=match):
    load_schedule(_write(tmp_path, "scheduler_config.json", config))


def test_unknown_prediction_type_names_the_field(tmp_path):
  path = _write(tmp_path, "scheduler_config.json", {"beta_schedule": "linear", "prediction_type": "flow"})
  with pytest.raises(CheckpointError, match="prediction_type='flow'; supported: epsilon, v_prediction, sample"):
    load_sampler_options(path)


@pytest.mark.slow
def test_benchmark_and_steps_sweep_run_a_diffusers_model(tmp_path):
  """benchmarks/samplers.py and experiments/steps_sweep.py on a diffusers directory: changing the step count
  compiles nothing; an image size without in-repo features is timed with FD skipped, saying why."""
  from benchmarks import samplers as bench
  from experiments import steps_sweep
  _tiny_unet(**VARIANTS["multihead_defaults"]).save_pretrained(str(tmp_path))
  _write(tmp_path, "scheduler_config.json", {"_class_name": "DDPMScheduler", "beta_schedule": "linear"})
  records = bench.run(None, ["ddim", "heun"], [2, 3], [2], repeats=5, peers=False, diffusers_model=str(tmp_path))
  assert [(r["sampler"], r["num_steps"], r["compiles"]) for r in records] == [
      ("ddim", 2, 0), ("ddim", 3, 0), ("heun", 2, 0), ("heun", 3, 0)]
  result = steps_sweep.sweep_diffusers(str(tmp_path), ["unipc"], [2, 3], num_samples=4, sample_batch_size=4,
                                       log=lambda *_: None)
  assert result["metric"] is None and "makes 8x8x3 images" in result["fd_skipped"]
  assert [p["compiles"] for p in result["points"]][1:] == [0]
  with pytest.raises(UserError, match="--option=guidance=... does not apply to --diffusers_model"):
    steps_sweep.sweep_diffusers(str(tmp_path), ["ddim"], [2], options={"guidance": 2.0})
