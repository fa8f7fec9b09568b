r"""Evaluate a trained run offline and write `eval.json`: sample quality for image families, test-split
likelihoods for every family, each beside the number it should be compared with (`genjax-evaluate` once installed,
`pip install -e .`):

  python -m experiments.evaluate --workdir=runs/ddpm_digits                   # the family's default sampler
  python -m experiments.evaluate --workdir=runs/ddpm_digits --sampler=dpm_solver --num_steps=20 \
      --output=runs/ddpm_digits/eval_dpm20.json
  python -m experiments.evaluate --workdir=runs/gan_digits --truncation=0.7
  python -m experiments.evaluate --workdir=runs/lm_pydoc

Image families: N samples (default: as many as the eval split holds) drawn in batches with
`task.sample_images(params, rng, n, **options)`, embedded by the data set's in-repo feature network
(`genjax.metrics.features`, trained and cached on first use), and compared with the *train* split:
FD-<data>, KID-<data> (± standard error), precision/recall (k = 3). Beside them: the floor, the same computation
with the *eval* split in place of the samples (real vs real, same N: what a model that generalises perfectly would
score); the memorizer, N *train* images in place of the samples (what replaying the training set would score: a
feature score below the floor can mean copying); and the nearest-train-image distance of the samples over that of
the eval images (`genjax.metrics.memorization`: ~1 generalising, ~0 copies). Every family
with `task.evaluate` also gets its test-split metrics (mean over the whole split, weighted by batch size); for the
LM these are loss (nats), bits per byte and perplexity, next to the byte-unigram baselines.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
from absl import flags, logging

from experiments import cli
from genjax import data as gdata
from genjax import metrics
from genjax.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The launcher's flags; defined only when run as a program, so importing this module (tests, notebooks)
  does not collide with other launchers' flags such as experiments.train's --workdir."""
  flags.DEFINE_string("workdir", None, "Run directory written by experiments.train.")
  flags.DEFINE_string("output", None, "Where to write the JSON (default <workdir>/eval.json).")
  flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
  flags.DEFINE_integer("num_samples", 0, "Samples to draw; 0 = the size of the eval split.")
  flags.DEFINE_integer("sample_batch_size", 256, "Samples per sampler call.")
  flags.DEFINE_integer("eval_batch_size", 0, "Batch size for task.evaluate; 0 = config.batch_size.")
  flags.DEFINE_integer("seed", 0, "Seed for sampling and evaluation.")
  cli.define_sample_option_flags()
  flags.adopt_module_key_flags(cli)          # listed by --help, not only --helpfull
  flags.DEFINE_multi_string("option", [], "Any other sample option as key=value (value: a Python literal or a "
                            "string), e.g. --option=guidance=2.0.")
  flags.DEFINE_string("feature_cache", None, "Feature network cache directory (default $GENJAX_FEATURE_CACHE or "
                      "~/.cache/genjax/features).")
  flags.DEFINE_integer("kid_subsets", 100, "KID subsets.")
  flags.DEFINE_integer("kid_subset_size", 1000, "KID subset size (capped at the set sizes).")
  flags.DEFINE_integer("pr_k", 3, "Nearest neighbours for precision/recall radii.")
  flags.mark_flags_as_required(["workdir"])


def parse_options(named: Mapping[str, Any], extra: list[str]) -> dict:
  """Sample options from the named flags (those set) and `key=value` strings; a bad string names itself."""
  options = {k: v for k, v in named.items() if v is not None}
  for item in extra:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise UserError(f"--option={item!r} must look like key=value, e.g. --option=truncation=0.7")
    try:
      options[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      options[key.strip()] = value
  return options


def draw_samples(task, params, rng, n: int, batch_size: int, options: Mapping[str, Any]):
  """n images [n, H, W, C] (clipped to [0, 1]) from fixed-size batches, and their raw (min, max) before clipping.
  Each family's `sample_images` jits its own work with the options as runtime values where it can, so one batch
  size compiles once, and a sweep over sampler steps compiles nothing more."""
  if n < 1 or batch_size < 1:
    raise UserError(f"num_samples and sample_batch_size must be >= 1, got {n} and {batch_size}")
  bs = min(batch_size, n)
  parts = []
  for i in range(math.ceil(n / bs)):
    images = task.sample_images(params, jax.random.fold_in(rng, i), bs, **options)
    parts.append(np.asarray(jax.device_get(images), np.float32))
  images = np.concatenate(parts)[:n]
  if not np.all(np.isfinite(images)):
    raise UserError(f"the sampler produced {int(np.sum(~np.isfinite(images)))} non-finite pixel values with "
                    f"options {dict(options)}")
  return np.clip(images, 0.0, 1.0), (float(images.min()), float(images.max()))


def evaluate_split(task, params, config, split: str, batch_size: int, rng) -> dict:
  """`task.evaluate` over the whole split in order, each batch's means weighted by its size."""
  src = gdata.get_source(config.dataset, split)
  evaluate = jax.jit(task.evaluate)
  sums, total = {}, 0
  for b, start in enumerate(range(0, len(src), batch_size)):
    examples = [src[i] for i in range(start, min(start + batch_size, len(src)))]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    batch["example_id"] = np.arange(start, start + len(examples), dtype=np.int32)
    m = jax.device_get(evaluate(params, batch, jax.random.fold_in(rng, b)))
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v) * len(examples)
    total += len(examples)
  return {k: v / total for k, v in sums.items()} | {"num_examples": total}


def _split_bytes(config, split: str):
  """The byte ids of a text split, reassembled from its windows (consecutive windows share one byte)."""
  src = gdata.get_source(config.dataset, split)
  windows = [src[i]["tokens"] for i in range(len(src))]
  return np.concatenate([w[:-1] for w in windows] + [windows[-1][-1:]])


@dataclasses.dataclass(frozen=True)
class ImageReference:
  """The real side of the image metrics, computed once and reused for every set of samples scored against it."""
  name: str                    # data set, and the metrics' suffix (FD-<name>)
  fx: Any                      # genjax.metrics.FeatureExtractor
  real_features: Any           # train split [N, D]
  num_samples: int             # samples to draw per score (default: the eval split's size)
  floor: dict                  # the metrics of the eval split (real vs real) at that size
  memorizer: dict              # the metrics of training images scored as samples (what copying would score)
  train_images: Any            # for the nearest-train-image distances of samples
  held_out_nn_median: float    # median distance from an eval-split image to its nearest training image
  metric_options: dict         # KID subsets, precision/recall k: the same for samples, floor and memorizer
  info: dict                   # where the numbers come from, for eval.json


def image_reference(config, *, num_samples: int = 0, feature_cache: Optional[str] = None,
                    kid_subsets: int = 100, kid_subset_size: int = 1000, pr_k: int = 3,
                    feature_extractor=None) -> ImageReference:
  """The feature network (the cached one for the data set unless `feature_extractor` is given), the train split's
  features and the real-vs-real floor for `config`'s data set."""
  name, data_dir = config.dataset.name, config.dataset.data_dir
  fx = feature_extractor or metrics.load_feature_extractor(name, cache_dir=feature_cache, data_dir=data_dir)
  train_split, eval_split = config.dataset.train_split, config.dataset.eval_split
  real = gdata.load_arrays(name, train_split, data_dir=data_dir)["image"]
  held_out = gdata.load_arrays(name, eval_split, data_dir=data_dir)["image"]
  n = num_samples or len(held_out)
  if n < len(held_out):
    held_out = held_out[np.random.default_rng(0).choice(len(held_out), n, replace=False)]
  real_f = fx(real)
  kw = dict(kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, k=pr_k)
  floor = metrics.feature_metrics(real_f, fx(held_out), name, **kw)
  copies = np.random.default_rng(1).choice(len(real), min(n, len(real)), replace=False)
  memorizer = metrics.feature_metrics(real_f, real_f[copies], name, **kw)
  held_out_nn = float(np.median(metrics.nearest_neighbour_distances(held_out, real)))
  info = {"reference": f"{name} {train_split} split ({len(real)} images)",
          "floor_set": f"{name} {eval_split} split ({len(held_out)} images)",
          "memorizer_set": f"{len(copies)} {name} {train_split}-split images scored as samples",
          "feature_net": {"dataset": name, "test_accuracy": fx.test_accuracy, "feature_dim": fx.feature_dim}}
  return ImageReference(name, fx, real_f, n, floor, memorizer, real, held_out_nn, kw, info)


def progress(message: str) -> None:
  """A line before each slow phase, on stderr (stdout carries the results)."""
  print(message, file=sys.stderr, flush=True)


def sampling_key(seed: int):
  """The key samples are drawn with for `seed` (shared with experiments.steps_sweep: equal seeds, equal samples)."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), 1)


def timed_draw(task, params, rng, n: int, batch_size: int, options: Mapping[str, Any]):
  """(images, (min, max) before clipping, seconds) of `draw_samples`."""
  t0 = time.time()
  images, value_range = draw_samples(task, params, rng, n, batch_size, options)
  return images, value_range, time.time() - t0


def image_report(task, params, ref: ImageReference, rng, *, options, sample_batch_size: int = 256,
                 drawn=None) -> dict:
  """Draws `ref.num_samples` images with `options` (or takes `drawn`, a `timed_draw` result of that many) and
  scores them against `ref` (the floor beside them)."""
  drawn = drawn or timed_draw(task, params, rng, ref.num_samples, sample_batch_size, options)
  images, (lo, hi), sample_seconds = drawn
  quality = metrics.feature_metrics(ref.real_features, ref.fx(images), ref.name, **ref.metric_options)
  classes = np.bincount(np.argmax(ref.fx.logits(images), -1), minlength=ref.fx.meta["num_classes"])
  nn_median = float(np.median(metrics.nearest_neighbour_distances(images, ref.train_images)))
  fd = f"FD-{ref.name}"
  return {
      "num_samples": ref.num_samples, "sample_seconds": round(sample_seconds, 2),
      "sample_range_before_clip": [lo, hi], **ref.info,
      "metrics": quality, "floor": ref.floor, "memorizer": ref.memorizer,
      "ratio_to_floor": {fd: quality[fd] / max(ref.floor[fd], 1e-12)},
      # < 1: samples sit closer to training images than unseen real images do; ~0: copies (pixel space, medians).
      "memorization": {"nearest_train_distance_ratio": nn_median / ref.held_out_nn_median,
                       "samples_median_distance": nn_median, "held_out_median_distance": ref.held_out_nn_median},
      "sample_class_histogram": classes.tolist(),
  }


def text_report(config) -> dict:
  train, test = _split_bytes(config, config.dataset.train_split), _split_bytes(config, config.dataset.eval_split)
  return {"unigram_entropy_bits_per_byte": metrics.unigram_entropy_bits(train),
          "unigram_cross_entropy_bits_per_byte_on_eval": metrics.unigram_cross_entropy_bits(train, test)}


def evaluate_run(workdir: str, *, step: Optional[int] = None, options: Optional[dict] = None, num_samples: int = 0,
                 sample_batch_size: int = 256, eval_batch_size: int = 0, seed: int = 0,
                 feature_cache: Optional[str] = None, kid_subsets: int = 100, kid_subset_size: int = 1000,
                 pr_k: int = 3) -> dict:
  """Everything `eval.json` holds, as a dict (see module docstring)."""
  options = dict(options or {})
  run = cli.load_run(workdir, step=step)   # an older step when the newest is unreadable
  config, params, task = run.config, run.params, run.task
  info = gdata.dataset_info(config.dataset.name)
  rng = jax.random.PRNGKey(seed)
  out = {"workdir": os.path.abspath(workdir), "family": config.family, "variant": config.variant,
         "dataset": config.dataset.name, "step": run.step,
         "sample_options": options, "seed": seed}
  if info.kind == "image" and task.sample_images is not None:
    # Samples first: a bad sample option is named before the feature network is built (a minute the first time).
    n = num_samples or len(gdata.get_source(config.dataset, config.dataset.eval_split))
    progress(f"drawing {n} samples ({options or 'default options'}) from {config.family} step {out['step']}")
    drawn = timed_draw(task, params, sampling_key(seed), n, sample_batch_size, options)
    progress(f"scoring against the {config.dataset.name} {config.dataset.train_split} split (its feature network, "
             f"the real-vs-real floor, the memorizer)")
    ref = image_reference(config, num_samples=n, feature_cache=feature_cache, kid_subsets=kid_subsets,
                          kid_subset_size=kid_subset_size, pr_k=pr_k)
    out.update(image_report(task, params, ref, sampling_key(seed), options=options,
                            sample_batch_size=sample_batch_size, drawn=drawn))
  elif options:
    raise UserError(f"sample options {sorted(options)} were given, but the {config.family!r} family on "
                     f"{config.dataset.name!r} is evaluated without sampling")
  if task.evaluate is not None:
    bs = eval_batch_size or int(config.batch_size)
    progress(f"test-split metrics on {config.dataset.name} {config.dataset.eval_split}")
    out["evaluate"] = evaluate_split(task, params, config, config.dataset.eval_split, bs, jax.random.fold_in(rng, 2))
    out["evaluate_split"] = config.dataset.eval_split
  if info.kind == "text":
    out["baselines"] = text_report(config)
    if "loss" in out.get("evaluate", {}):
      # Byte-level LM: "loss" is nats per byte. Perplexity is exp of the split's mean loss, not a mean of
      # per-batch perplexities.
      loss = out["evaluate"]["loss"]
      out["evaluate"]["perplexity"] = float(metrics.perplexity(loss))
      out["evaluate"]["bits_per_byte"] = float(metrics.bits_per_byte(loss))
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # this launcher prints what it does; library INFO lines are noise here
  f = FLAGS
  options = parse_options(cli.sample_options_from_flags(), f.option)
  t0 = time.time()
  result = evaluate_run(f.workdir, step=f.step, options=options, num_samples=f.num_samples,
                        sample_batch_size=f.sample_batch_size, eval_batch_size=f.eval_batch_size, seed=f.seed,
                        feature_cache=f.feature_cache, kid_subsets=f.kid_subsets,
                        kid_subset_size=f.kid_subset_size, pr_k=f.pr_k)
  result["eval_seconds"] = round(time.time() - t0, 2)
  result["command"] = "python -m experiments.evaluate " + " ".join(sys.argv[1:])
  output = f.output or os.path.join(f.workdir, "eval.json")
  with open(output, "w") as fh:
    json.dump(result, fh, indent=2)
  print(json.dumps({k: result[k] for k in ("metrics", "floor", "memorizer", "memorization", "evaluate", "baselines")
                    if k in result}, indent=2))
  print(f"wrote {output}")


def entry() -> None:
  """The `genjax-evaluate` console script: `python -m experiments.evaluate` with the same flags."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  entry()
