"""What a run writes for people: metrics.jsonl, TensorBoard events (tensorboardX, no TensorFlow), PNG grids and
a progress line with steps/s and ETA, and the one log setup (`setup_logging`). Only process 0 writes; other
processes get a silent writer.
"""
from __future__ import annotations

import json
import logging as std_logging
import math
import os
import sys
import time
from typing import Mapping

import numpy as np
from absl import logging
from PIL import Image


class _DropLibraryInfo(std_logging.Filter):
  """Drops INFO records of orbax, jax and absl internals (e.g. "Unable to initialize backend 'tpu'", orbax's
  per-checkpoint chatter); warnings and errors still show."""

  def filter(self, record) -> bool:
    path = record.pathname.replace(os.sep, "/")
    noisy = "/orbax/" in path or "/jax/" in path or "/jaxlib/" in path or "/absl/" in path
    return not (noisy and record.levelno < std_logging.WARNING)


class _ConsoleFormatter(logging.PythonFormatter):
  """`I 11:20:59 message` on a console; absl's full line (`I1207 11:20:59.447417 139639057144704 trainer.py:138]
  message`) where its handler writes a log file."""

  _short = std_logging.Formatter("%(levelname).1s %(asctime)s %(message)s", "%H:%M:%S")

  def __init__(self, handler: std_logging.StreamHandler):
    super().__init__()
    self._handler = handler

  def format(self, record) -> str:
    stream = self._handler.stream
    if stream in (sys.stderr, sys.__stderr__) or getattr(stream, "name", None) in ("<stderr>", "<stdout>"):
      return self._short.format(record)
    return super().format(record)


def setup_logging() -> None:
  """The one log setup of the loop and every launcher: short console lines, library INFO lines dropped (on every
  handler absl and Python logging use). Idempotent."""
  python_handler = logging.get_absl_handler().python_handler
  if not isinstance(python_handler.formatter, _ConsoleFormatter):
    python_handler.setFormatter(_ConsoleFormatter(python_handler))
  for handler in (logging.get_absl_handler(), python_handler, *std_logging.getLogger().handlers):
    if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
      handler.addFilter(_DropLibraryInfo())


class MetricsWriter:
  """metrics.jsonl (one JSON record per write, with `step` and `time`, Unix seconds) and TensorBoard events.

  `resume_step`: the step a run resumes from; records of later steps (written before an interruption and computed
  again now) are dropped from metrics.jsonl and hidden in TensorBoard (`purge_step`), so every step appears once.
  Files are opened at the first write: a run that stops before logging anything leaves none behind.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled, self.workdir, self.resume_step = enabled, workdir, int(resume_step)
    self._jsonl = self._tb = None

  def _open(self) -> None:
    path = os.path.join(self.workdir, "metrics.jsonl")
    if os.path.exists(path):
      kept = [line for line in open(path) if _record_step(line) <= self.resume_step]
      with open(path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(path + ".tmp", path)
    self._jsonl = open(path, "a")
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"),
                             purge_step=self.resume_step + 1 if self.resume_step else None)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    if self._jsonl is None:
      self._open()
    clean = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), "time": round(time.time(), 3), **clean}) + "\n")
    self._jsonl.flush()
    for k, v in clean.items():
      self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def write_images(self, step: int, tag: str, grid: np.ndarray) -> None:
    """A uint8 [H, W, 3] image grid in TensorBoard's Images tab."""
    if self.enabled:
      if self._tb is None:
        self._open()
      self._tb.add_image(tag, grid, int(step), dataformats="HWC")
      self._tb.flush()

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self.enabled:
      if self._tb is None:
        self._open()
      self._tb.add_text(tag, text, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()


def _record_step(line: str) -> float:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return float("inf")                    # a half-written last line of a killed run: dropped


LINE_WIDTH = 120


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
  """Steps/s and ETA from training-step time only: the compile (before the first timed step) and the time spent
  evaluating, sampling and checkpointing (`exclude`) do not count, so the ETA neither counts compilation nor jumps
  after an evaluation."""

  def __init__(self, first_step: int, total_steps: int):
    self.total = total_steps
    self._step, self._time, self._excluded = first_step, None, 0.0
    self._steps_done, self._seconds = 0, 0.0

  def start(self, step: int) -> None:
    """Starts the clock (call after the first, compiling, step)."""
    self._step, self._time, self._excluded = step, time.perf_counter(), 0.0

  def exclude(self, seconds: float) -> None:
    self._excluded += seconds

  def interval(self, step: int) -> dict:
    """{"steps_per_second", "eta_seconds"} of the steps since the last call (empty before `start`)."""
    if self._time is None:
      return {}
    now = time.perf_counter()
    seconds = max(now - self._time - self._excluded, 1e-9)
    steps = step - self._step
    self._step, self._time, self._excluded = step, now, 0.0
    if steps <= 0:
      return {}
    self._steps_done, self._seconds = self._steps_done + steps, self._seconds + seconds
    rate = steps / seconds
    return {"steps_per_second": rate, "eta_seconds": (self.total - step) * self._seconds / self._steps_done}


def _short(key: str) -> str:
  return key.replace("grad_norm", "gnorm").replace("learning_rate", "lr")


def log_line(step: int, total: int, metrics: Mapping[str, float], rates: Mapping[str, float]) -> str:
  """`step 100/2000 | loss 1.23 | ... | 12.3 steps/s | 790 ex/s | MFU 41% | ETA 2m10s`, at most LINE_WIDTH columns:
  losses first, then other metrics while they fit (all of them are in metrics.jsonl / TensorBoard)."""
  head = f"step {step}/{total}"
  tail = []
  if "steps_per_second" in rates:
    tail.append(f"{rates['steps_per_second']:.3g} steps/s")
  for key, unit in (("tokens_per_second", "tok/s"), ("examples_per_second", "ex/s")):
    if key in rates:
      tail.append(f"{rates[key]:.3g} {unit}")
      break
  if rates.get("mfu") is not None:
    tail.append(f"MFU {100 * rates['mfu']:.1f}%")
  if "eta_seconds" in rates:
    tail.append(f"ETA {format_duration(rates['eta_seconds'])}")
  keys = sorted((k for k in metrics if k != "finite"),
                key=lambda k: (0 if k.endswith("loss") else 1 if k == "lr" else 2, "/" in k))
  fields = [f"{_short(k)} {metrics[k]:.4g}" for k in keys]
  line = head
  budget = LINE_WIDTH - len(" | ".join([head] + tail))
  for f in fields:
    if len(f) + 3 > budget:
      break
    line, budget = f"{line} | {f}", budget - len(f) - 3
  return " | ".join([line] + tail)


def image_grid(images: np.ndarray, columns: int | None = None, upscale: int = 1) -> np.ndarray:
  """[N, H, W, C] in [0, 1] → one uint8 [rows·(H+1)+1, cols·(W+1)+1, 3] grid with 1-pixel gaps."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [N, H, W, 1 or 3], got shape {images.shape}")
  n, h, w, c = images.shape
  if c == 1:
    images = np.repeat(images, 3, axis=-1)
  cols = columns or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1, 3), np.float32)
  for i in range(n):
    r, col = divmod(i, cols)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = images[i]
  grid = (np.clip(grid, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
  return grid.repeat(upscale, 0).repeat(upscale, 1) if upscale > 1 else grid


def save_image_grid(images: np.ndarray, path: str, columns: int | None = None) -> str:
  """Writes a PNG grid, upscaled so that small images (8×8 digits) stay visible."""
  h = np.asarray(images).shape[1]
  Image.fromarray(image_grid(images, columns, upscale=max(1, 96 // max(h, 1)))).save(path)
  logging.info("wrote %s", path)
  return path
