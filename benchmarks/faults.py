r"""Fault-tolerance soak: real process deaths, pre-emption, re-sharded restores, damaged checkpoints, a failing
save, NaN, a second run on one workdir and bad inputs — printed as a table of what was tried and what survived.

  python -m benchmarks.faults                                  # 10 random kill -9 points, every scenario
  python -m benchmarks.faults --kills=3 --steps=30 --seed=1 --json=faults.json --keep=/tmp/soak

Every training process is `benchmarks/fault_worker.py` (the tiny digits VAE, `vae.py:tiny`, through
`genjax.train.trainer.train_and_evaluate`, 8 simulated CPU devices with params sharded data=2 × fsdp=4 unless a row
says otherwise;
async checkpoints every `--every` steps, 3 kept); bad inputs go through the real launcher `python -m
experiments.train`. "Bit-for-bit" compares the final params with one uninterrupted run of the same length on the
same device count; other device counts are compared to 1e-5 (another summation order). Needs a source checkout
(benchmarks/ and experiments/ beside genjax/); takes ~10–30 min on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.fault_worker import (DAMAGE, ROOT, changed_files, snapshot, steps_on_disk, swap_in_previous_arrays,
                                     worker_env)

TOL = 1e-5
TINY_FLAGS = ["--config.model.latent_dim=4", "--config.model.channels=(8,16)", "--config.model.hidden=32",
              "--config.batch_size=16", "--config.num_train_steps=4", "--config.log_every_steps=2",
              "--config.checkpoint_every_steps=2", "--config.eval_every_steps=-1", "--config.sample_every_steps=-1",
              "--config.num_eval_batches=1", "--config.num_sample_images=4", "--config.optimizer.schedule=constant",
              "--config.async_checkpointing=False"]
TINY = ["--config=experiments/configs/vae.py:digits", *TINY_FLAGS]
# (name, launcher flags but --workdir, what its one line must say, the file:function to fix when genjax does not)
BAD_INPUTS = [
    ("unknown variant", ["--config=experiments/configs/vae.py:digitz"], r"unknown variant 'digitz' for vae.py; valid",
     None),
    ("no variant", ["--config=experiments/configs/vae.py"], r"vae.py needs a variant", None),
    ("missing config file", ["--config=experiments/configs/nope.py:x"], r"No such file .*nope.py'; configs: \[",
     None),
    ("config key typo", TINY + ["--config.modle.hidden=3"], r"unknown config field 'modle'.*Did you mean", None),
    ("config value type", TINY + ["--config.num_train_steps=abc"], r"num_train_steps=abc: invalid literal", None),
    ("unknown flag", TINY + ["--bogus=1"], r"Unknown command line flag 'bogus'", None),
    ("stray argument", TINY + ["extra"], r"unexpected arguments: \['extra'\]", None),
    ("empty --workdir (unset $VAR)", TINY + ["--workdir="], r"--workdir='' is empty", None),
    ("parallel", TINY + ["--config.parallel=pmapp"], r"parallel='pmapp' is not one of", None),
    ("batch vs devices", TINY + ["--config.batch_size=12"], r"batch_size=12 must be divisible by data×fsdp=8", None),
    ("mesh", TINY + ["--config.mesh.fsdp=3"], r"does not divide 8 devices", None),
    ("data set name", TINY + ["--config.dataset.name=mnst"], r"unknown data set 'mnst'; available", None),
    ("split", TINY + ["--config.dataset.train_split=validation"], r"no split 'validation'; splits", None),
    ("likelihood", TINY + ["--config.model.likelihood=poisson"], r"likelihood='poisson' is not one of", None),
    ("optimizer", TINY + ["--config.optimizer.name=adamax"], r"optimizer.name='adamax' is not one of", None),
    ("schedule", TINY + ["--config.optimizer.schedule=linear"], r"schedule='linear' is not one of", None),
    ("param sharding", TINY + ["--config.param_sharding=zero3"], r"param_sharding='zero3' is not one of", None),
    ("negative steps", TINY + ["--config.num_train_steps=-5"], r"num_train_steps=-5 must be >= 1", None),
    ("ema decay", TINY + ["--config.ema_decay=1.5"], r"ema_decay=1.5 must be in", None),
    ("keep checkpoints", TINY + ["--config.keep_checkpoints=0"], r"keep_checkpoints=0 must be >= 1", None),
    ("model family", TINY + ["--config.family=vqvae"], r"unknown model family 'vqvae'; valid", None),
    ("image size vs model", TINY + ["--config.model.channels=(8,16,32,64)"], r"8×8 is not divisible .*channels",
     None),
    ("text data, image model", TINY + ["--config.dataset.name=pydoc"], r"image data set; 'pydoc' is text", None),
    ("TFDS data not prepared", TINY + ["--config.dataset.name=mnist"], r"TFDS data set 'mnist'.*tfds build", None),
    ("seed", TINY + ["--config.seed=-1"], r"seed=-1", None),
    ("grad accumulation", TINY + ["--config.grad_accum_steps=3", "--config.num_train_steps=6"],
     r"not divisible by grad_accum_steps=3", None),
    ("model changed under a run", TINY + ["--config.model.hidden=64"], r"does not fit this config", None),
    ("checkpoint of another family", ["--config=experiments/configs/ddpm.py:digits", "--config.batch_size=16"],
     r"holds a 'vae' run; this config trains 'diffusion'", None),
    ("dtype float16", TINY + ["--config.compute_dtype=float16"], r"compute_dtype='float16' is not one of", None),
    ("dtype typo", TINY + ["--config.compute_dtype=bf16"], r"compute_dtype='bf16' is not one of", None),
    ("latent size 0", TINY + ["--config.model.latent_dim=0"], r"model.latent_dim=0 must be >= 1", None),
    ("channels not ints", TINY + ["--config.model.channels=abc"], r"model.channels=.*abc.* must be",
     "genjax/models/vae.py:vae_model (check the widths are ints before min())"),
]


def unchanged(before: dict, workdir: str) -> bool:
  return not changed_files(before, workdir)


def tmp_dirs(workdir: str) -> list[str]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(n for n in os.listdir(d) if "tmp" in n) if os.path.isdir(d) else []


def last_logged_step(workdir: str) -> int:
  steps, path = [], os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    for line in f:
      try:
        steps.append(json.loads(line)["step"])
      except ValueError:          # a line cut short by kill -9
        continue                # skip it: the steps after it are still counted
  return max(steps, default=0)


class Soak:
  def __init__(self, root: str, steps: int, every: int, seed: int):
    self.root, self.steps, self.every = root, steps, every
    self.rng = random.Random(seed)
    self.cache = os.path.join(root, "jax_cache")
    self.cfg = {"num_train_steps": steps, "checkpoint_every_steps": every, "keep_checkpoints": 3,
                "log_every_steps": 1, "eval_every_steps": -1, "sample_every_steps": -1, "async_checkpointing": True,
                "param_sharding": "fsdp", "mesh.data": 2, "mesh.fsdp": 4}
    self.rows: list[dict] = []

  def start(self, args: list[str], devices: int = 8, module: str = "benchmarks.fault_worker") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=worker_env(devices, self.cache),
                            text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

  def train(self, workdir: str, devices: int = 8, extra: list[str] = (), **overrides) -> tuple[int, str, str]:
    child = self.start(["--workdir", workdir, "--overrides", json.dumps({**self.cfg, **overrides}),
                        "--out", workdir + ".npy", *extra], devices)
    out, err = child.communicate()
    return child.returncode, out, err

  def dump(self, workdir: str, step: int, out: str, devices: int) -> dict:
    child = self.start(["--jobs", json.dumps([{"dump_step": step, "workdir": workdir, "out": out}])], devices)
    stdout, err = child.communicate()
    assert child.returncode == 0, err[-2000:]
    return json.loads(stdout.splitlines()[-1])

  def paused(self, workdir: str, pause_at: int, fsize_limit: int = 0, **overrides) -> tuple[subprocess.Popen, str]:
    marker, release = workdir + f".paused{pause_at}", workdir + f".go{pause_at}"
    for f in (marker, release):
      if os.path.exists(f):
        os.remove(f)
    child = self.start(["--workdir", workdir, "--overrides", json.dumps({**self.cfg, **overrides}), "--out",
                        workdir + ".npy", "--pause_at", str(pause_at), "--marker", marker, "--release", release,
                        "--fsize_limit", str(fsize_limit)])
    while not os.path.exists(marker):
      if child.poll() is not None:
        raise RuntimeError(f"worker exited {child.returncode} before pausing:\n{child.communicate()[1][-2000:]}")
      time.sleep(0.01)
    return child, release

  def row(self, scenario: str, tried: str, result: str, survived: bool) -> None:
    self.rows.append({"scenario": scenario, "tried": tried, "result": result, "survived": bool(survived)})
    print(f"  {'ok  ' if survived else 'FAIL'} {scenario}: {tried} -> {result}", flush=True)

  def same(self, workdir: str) -> tuple[bool, str]:
    got, want = np.load(workdir + ".npy"), self.reference
    exact = got.shape == want.shape and np.array_equal(got, want)
    return exact, "bit-for-bit equal" if exact else f"max |diff| {np.max(np.abs(got - want)):.2e}"

  # ---- scenarios ----
  def make_reference(self) -> None:
    self.ref_dir = os.path.join(self.root, "reference")
    rc, _, err = self.train(self.ref_dir)
    assert rc == 0, err[-3000:]
    self.reference = np.load(self.ref_dir + ".npy")
    self.kept = steps_on_disk(self.ref_dir)
    self.row("reference", f"uninterrupted run of {self.steps} steps", f"checkpoints {self.kept}", True)

  def kill_9(self, kills: int) -> None:
    """One run killed `kills` times: each process resumes, trains to a random target step, holds there a random
    while (background saves go on), is released and killed a random few ms later: mid-step, mid-save, anywhere."""
    workdir = os.path.join(self.root, "kill9")
    targets = sorted(self.rng.sample(range(2, self.steps - 1), kills))
    for i, target in enumerate(targets):
      start = max(steps_on_disk(workdir), default=0)
      pause_at = max(1, target - start)
      hold, delay = self.rng.uniform(0.0, 1.0), self.rng.uniform(0.0, 0.05)
      child, release = self.paused(workdir, pause_at)
      time.sleep(hold)
      open(release, "w").close()
      time.sleep(delay)
      child.send_signal(signal.SIGKILL)
      child.communicate()
      killed = child.returncode == -signal.SIGKILL
      self.row(f"kill -9 #{i + 1}", f"resumed at {start}; held at step {start + pause_at} {hold:.2f} s, killed "
               f"{delay * 1000:.0f} ms after", f"{'killed' if killed else f'exit {child.returncode}'}; last logged "
               f"step {last_logged_step(workdir)}, checkpoints {steps_on_disk(workdir)}"
               f"{' + an unfinished save (ignored)' if tmp_dirs(workdir) else ''}", killed or child.returncode == 0)
    rc, _, err = self.train(workdir)
    resumed = re.search(r"Resuming from step (\d+)", err)
    ok, how = self.same(workdir) if rc == 0 else (False, err.strip().splitlines()[-1])
    origin = f"step {resumed.group(1)}" if resumed else "scratch"
    self.row("kill -9: rerun to the end", f"after {kills} kills, from {origin}", how, ok)

  def sigterm_and_second_run(self) -> None:
    workdir = os.path.join(self.root, "sigterm")
    pause_at = self.rng.randint(2, self.steps - 3)
    child, release = self.paused(workdir, pause_at, checkpoint_every_steps=10 ** 6)
    before = snapshot(workdir)
    rc, _, err = self.train(workdir, checkpoint_every_steps=10 ** 6)       # a second process, same workdir
    refused = rc != 0 and f"in use by another training run (pid {child.pid}" in err
    self.row("second run on the same workdir", "started while the first trains",
             "refused, naming the holder; files unchanged" if refused and unchanged(before, workdir) else err[-300:],
             refused and unchanged(before, workdir))
    child.send_signal(signal.SIGTERM)
    open(release, "w").close()
    _, err = child.communicate()
    saved = f"SIGTERM: saved a checkpoint at step {pause_at + 1}" in err
    self.row("SIGTERM (pre-emption)", f"during step {pause_at + 1}",
             f"exit {child.returncode}, checkpoints {steps_on_disk(workdir)}",
             child.returncode == 143 and saved and steps_on_disk(workdir) == [pause_at + 1])
    rc, _, err = self.train(workdir, checkpoint_every_steps=10 ** 6)
    ok, how = self.same(workdir) if rc == 0 else (False, err[-300:])
    self.row("SIGTERM: rerun to the end", f"from step {pause_at + 1}", how, ok)

  def reshard(self) -> None:
    first = self.kept[0]
    want = os.path.join(self.root, "dump8.npy")
    self.dump(self.ref_dir, first, want, 8)
    for devices, mesh in ((4, {"mesh.data": 2, "mesh.fsdp": 2}), (1, {"mesh.data": 1, "mesh.fsdp": 1})):
      workdir = os.path.join(self.root, f"on{devices}")
      shutil.copytree(self.ref_dir, workdir)
      for s in self.kept[1:]:
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(s)))
      got = os.path.join(self.root, f"dump{devices}.npy")
      info = self.dump(workdir, first, got, devices)
      exact = np.array_equal(np.load(got), np.load(want))
      self.row(f"restore 8 → {devices} device(s)", f"checkpoint of step {first}",
               f"{'bit-for-bit' if exact else 'DIFFERENT'}, {info['sharded_arrays']} arrays sharded", exact)
      rc, _, err = self.train(workdir, devices, **mesh)
      diff = float(np.max(np.abs(np.load(workdir + ".npy") - self.reference))) if rc == 0 else float("inf")
      self.row(f"train on after 8 → {devices}", f"steps {first + 1}..{self.steps}", f"max |diff| {diff:.1e}",
               diff <= TOL)
    workdir = os.path.join(self.root, "pmap")
    rc, _, err = self.train(workdir, 8, parallel="pmap", param_sharding="replicated", num_train_steps=first,
                            **{"mesh.data": -1, "mesh.fsdp": 1})
    rc2, _, err = self.train(workdir, 4, **{"mesh.data": 2, "mesh.fsdp": 2})
    diff = float(np.max(np.abs(np.load(workdir + ".npy") - self.reference))) if rc == rc2 == 0 else float("inf")
    self.row("pmap (8 devices) → pjit (4)", f"pmap to step {first}, pjit to {self.steps}", f"max |diff| {diff:.1e}",
             diff <= TOL)

  def damaged(self) -> None:
    latest, previous = self.kept[-1], self.kept[-2]
    kinds = {**DAMAGE, "another step's arrays": lambda d: swap_in_previous_arrays(d, previous)}
    for name, damage in kinds.items():
      workdir = os.path.join(self.root, "damaged_" + re.sub(r"\W+", "_", name))
      shutil.copytree(self.ref_dir, workdir)
      damage(os.path.join(workdir, "checkpoints", str(latest)))
      rc, _, err = self.train(workdir)
      said = f"checkpoint at step {latest}" in err and f"resumed from step {previous}" in err
      ok, how = self.same(workdir) if rc == 0 else (False, err.strip().splitlines()[-1][:200])
      self.row(f"damaged latest: {name}", f"step {latest}", f"fell back to {previous}, said so; {how}"
               if said else how, ok and said)
    workdir = os.path.join(self.root, "all_damaged")
    shutil.copytree(self.ref_dir, workdir)
    for s in self.kept:
      DAMAGE["empty metadata JSON"](os.path.join(workdir, "checkpoints", str(s)))
    before = snapshot(workdir)
    rc, _, err = self.train(workdir)
    ok = rc != 0 and "none of the checkpoints" in err and unchanged(before, workdir)
    self.row("every checkpoint damaged", f"steps {self.kept}", "error, nothing touched" if ok else err[-300:], ok)

  def failing_save(self) -> None:
    workdir = os.path.join(self.root, "disk_full")
    pause_at = self.every + 1                              # the first checkpoint is on disk by then
    child, release = self.paused(workdir, pause_at, fsize_limit=30_000)
    while steps_on_disk(workdir) != [self.every]:
      time.sleep(0.01)
    open(release, "w").close()                            # from here no file may grow past 30 kB
    _, err = child.communicate()
    stopped = child.returncode != 0 and "CheckpointSaveError" in err and "File too large" in err
    last = last_logged_step(workdir)
    self.row("save fails (file size limit, EFBIG)", f"from step {pause_at + 1} on",
             f"save of step {2 * self.every} failed → CheckpointSaveError after step {last}; checkpoints "
             f"{steps_on_disk(workdir)}",
             stopped and last <= 3 * self.every and steps_on_disk(workdir) == [self.every])
    rc, _, err = self.train(workdir)
    ok, how = self.same(workdir) if rc == 0 else (False, err[-300:])
    self.row("failed save: rerun to the end", f"from step {self.every}", how, ok)

  def nan(self) -> None:
    workdir = os.path.join(self.root, "nan")
    at = self.rng.randint(self.every + 1, self.steps - 2)      # batch index `at` feeds step at + 1
    good = (at // self.every) * self.every
    rc, _, err = self.train(workdir, extra=["--nan_at", str(at)])
    named = f"non-finite loss or gradient at step {at + 1}; stopped. Last good checkpoint: step {good}" in err
    self.row("NaN in a batch", f"step {at + 1}", f"exit {rc}, named step {at + 1}, checkpoints "
             f"{steps_on_disk(workdir)}", rc != 0 and named and max(steps_on_disk(workdir)) == good)
    rc, _, err = self.train(workdir)
    ok, how = self.same(workdir) if rc == 0 else (False, err[-300:])
    self.row("NaN: rerun from the last good checkpoint", f"from step {good}", how, ok)

  def launcher(self, argv: list[str]) -> tuple[int, str]:
    child = self.start(argv, 8, "experiments.train")
    _, err = child.communicate()
    return child.returncode, err

  def bad_inputs(self) -> None:
    base = os.path.join(self.root, "launcher_run")
    rc, err = self.launcher([*TINY, f"--workdir={base}"])
    assert rc == 0, err[-3000:]
    not_a_dir = os.path.join(self.root, "not_a_directory")
    with open(not_a_dir, "w") as f:
      f.write("a file the user already had")
    cases = [(name, argv, pattern, owner, None) for name, argv, pattern, owner in BAD_INPUTS]
    cases.append(("workdir is a file", TINY, r"not_a_directory' is a file, not a directory",
                  "genjax/train/workdir.py:check_workdir", not_a_dir))
    passed, gaps = 0, []
    for i, (name, argv, pattern, owner, workdir) in enumerate(cases):
      if workdir is None:
        workdir = os.path.join(self.root, f"bad_{i}")
        shutil.copytree(base, workdir)
      before = snapshot(workdir) if os.path.isdir(workdir) else {"": open(workdir).read()}
      rc, err = self.launcher([*argv, f"--workdir={workdir}"] if not any(a.startswith("--workdir") for a in argv)
                              else argv)
      lines = err.strip().splitlines()
      one_line = (rc == 2 and "Traceback" not in err and bool(lines) and lines[-1].startswith("error: ")
                  and re.search(pattern, lines[-1]) is not None)
      kept = unchanged(before, workdir) if os.path.isdir(workdir) else before == {"": open(workdir).read()}
      passed += one_line and kept
      if not (one_line and kept):
        how = "exit 0, accepted" if rc == 0 else "traceback" if "Traceback" in err else (lines or ["?"])[-1][:80]
        gaps.append(f"{name} ({how}{'' if kept else ', FILES CHANGED'}; fix in {owner or '?'})")
      print(f"    {'ok ' if one_line and kept else 'GAP'} {name}: {lines[-1][:110] if lines else ''}", flush=True)
    self.row("bad inputs (launcher)", f"{len(cases)} kinds on a finished run's workdir",
             f"{passed} gave one `error:` line naming the value, files unchanged" +
             (f"; gaps: {'; '.join(gaps)}" if gaps else ""), passed == len(cases))


def print_table(rows: list[dict]) -> None:
  widths = [max(len(str(r[k])) for r in rows + [{"scenario": "scenario", "tried": "tried", "result": "result"}])
            for k in ("scenario", "tried", "result")]
  widths = [min(w, 60) for w in widths[:2]] + [widths[2]]
  print()
  print(f"| {'scenario':<{widths[0]}} | {'tried':<{widths[1]}} | survived | result")
  print(f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|----------|{'-' * 40}")
  for r in rows:
    print(f"| {r['scenario']:<{widths[0]}} | {r['tried']:<{widths[1]}} | {'yes' if r['survived'] else 'NO':<8} | "
          f"{r['result']}")
  print(f"\nsurvived {sum(r['survived'] for r in rows)} of {len(rows)}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--kills", type=int, default=10, help="random kill -9 points in one run")
  p.add_argument("--steps", type=int, default=80, help="training steps of every run")
  p.add_argument("--every", type=int, default=3, help="checkpoint every N steps")
  p.add_argument("--seed", type=int, default=0, help="seed for the kill points, SIGTERM and NaN steps")
  p.add_argument("--json", default="", help="also write the rows here")
  p.add_argument("--keep", default="", help="work in this directory and keep it (default: a temporary one)")
  p.add_argument("--skip", default="", help="comma-separated scenarios to skip: kill9,sigterm,reshard,damaged,"
                 "save,nan,inputs")
  args = p.parse_args()
  if args.steps < 4 * args.every or args.every < 1 or args.kills < 0:
    raise SystemExit(f"error: need --every >= 1, --steps >= 4 × --every and --kills >= 0, got --steps={args.steps}"
                     f" --every={args.every} --kills={args.kills}")
  root = args.keep or tempfile.mkdtemp(prefix="genjax_faults_")
  os.makedirs(root, exist_ok=True)
  skip = set(filter(None, args.skip.split(",")))
  soak = Soak(root, args.steps, args.every, args.seed)
  t0 = time.time()
  print(f"genjax fault soak in {root}: {args.steps} steps, checkpoint every {args.every}, seed {args.seed}", flush=True)
  soak.make_reference()
  for name, scenario in (("kill9", lambda: soak.kill_9(args.kills)), ("sigterm", soak.sigterm_and_second_run),
                         ("reshard", soak.reshard), ("damaged", soak.damaged), ("save", soak.failing_save),
                         ("nan", soak.nan), ("inputs", soak.bad_inputs)):
    if name not in skip:
      scenario()
  print_table(soak.rows)
  print(f"({time.time() - t0:.0f} s)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"steps": args.steps, "every": args.every, "seed": args.seed, "kills": args.kills,
                 "seconds": round(time.time() - t0, 1), "rows": soak.rows}, f, indent=2)
  if not args.keep:
    shutil.rmtree(root, ignore_errors=True)
  sys.exit(0 if all(r["survived"] for r in soak.rows) else 1)


if __name__ == "__main__":
  main()
