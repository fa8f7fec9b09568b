"""What a run writes for people: metrics.jsonl, TensorBoard events (tensorboardX, no TensorFlow), PNG grids and
a progress line with steps/s and ETA. Only process 0 writes; other processes get a silent writer.
"""
from __future__ import annotations

import json
import logging as std_logging
import math
import os
import time
from typing import Mapping

import numpy as np
from absl import logging
from PIL import Image


class _DropLibraryInfo(std_logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the progress log (warnings and errors still show)."""

  def filter(self, record) -> bool:
    noisy = "/orbax/" in record.pathname or "/jax/_src/" in record.pathname
    return not (noisy and record.levelno < 30)


def quiet_library_logs() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())


class MetricsWriter:
  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = self._tb = None
    if enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    for k, v in clean.items():
      self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """Steps/s over the last interval and an ETA from it."""

  def __init__(self, first_step: int, total_steps: int):
    self.total = total_steps
    self._step, self._time = first_step, time.perf_counter()

  def line(self, step: int, metrics: Mapping[str, float]) -> str:
    now = time.perf_counter()
    rate = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    eta = (self.total - step) / rate if rate > 0 else math.inf
    shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "finite")
    eta_s = "?" if math.isinf(eta) else f"{int(eta // 60)}m{int(eta % 60):02d}s"
    return f"step {step}/{self.total} | {shown} | {rate:.2f} steps/s | ETA {eta_s}"


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
