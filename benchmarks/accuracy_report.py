"""The report half of `benchmarks.sampler_accuracy`: the issue's goals, markdown tables and the log-log plot.

    result = sampler_accuracy.run(...)
    result["goals"] == goals(result["records"]); print(markdown(result)); plot(result, "acc.png")

Goals, checked per (schedule in linear/cosine, mixture, NFE), errors are RMSE against the exact ODE ("<=" with
`TIE_TOLERANCE` relative slack for float32 rounding):
  (a) default: each genjax sampler's default <= the same diffusers scheduler's default (DDIM <-> FlaxDDIMScheduler,
      DPM-Solver++ 2M / 3M <-> FlaxDPMSolverMultistepScheduler order 2 / 3);
      best: the best of the genjax sampler's options <= the best of the diffusers scheduler's options;
  (b) the best genjax sampler (any sampler, any option) <= every diffusers row;
  (c) DPM-Solver++ 2M and UniPC-2 (defaults) at NFE 10 < DDIM (default) at NFE 20.
"""
from __future__ import annotations

import math
from collections import defaultdict

from benchmarks.accuracy_peers import PEER_OF

GOAL_SCHEDULES = ("linear", "cosine")
# "At least as accurate" allows this relative slack: the float32 rounding of identical arithmetic (genjax DDIM on
# the "leading" grid vs diffusers' default DDIM, the same grid and update: ratios 0.99997-1.00004 measured).
TIE_TOLERANCE = 1e-3
SUMMARY_SAMPLERS = ("dpm_solver_2m", "unipc_2")   # goal (c)'s fast samplers, each against DDIM at twice the NFE


def clean_json(obj):
  """`obj` with non-finite floats as None (strict JSON)."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: clean_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [clean_json(v) for v in obj]
  return obj


def _ok(records):
  return [r for r in records if r["status"] == "ok" and r["rmse"] is not None and math.isfinite(r["rmse"])]


def _table(records):
  """{(schedule, mixture, nfe): {(library, sampler, variant): rmse}}."""
  cells = defaultdict(dict)
  for r in _ok(records):
    cells[(r["schedule"], r["mixture"], r["nfe"])][(r["library"], r["sampler"], r["variant"])] = r["rmse"]
  return cells


def _cell_name(cell):
  return f"{cell[0]}/{cell[1]}/NFE {cell[2]}"


def goals(records) -> dict:
  """Each goal: {"checked": n, "failed": [{"cell", "genjax", "peer", "ratio", ...}]} (ratio = genjax / peer)."""
  cells = _table(records)
  out = {name: {"checked": 0, "failed": []} for name in ("a_default", "a_best", "b", "c")}

  def check(goal, cell, ours, theirs, **extra):
    out[goal]["checked"] += 1
    if not ours <= theirs * (1.0 + TIE_TOLERANCE):
      out[goal]["failed"].append(dict(cell=_cell_name(cell), genjax=ours, peer=theirs, ratio=ours / theirs, **extra))

  for cell, errs in sorted(cells.items()):
    if cell[0] not in GOAL_SCHEDULES:
      continue
    for peer, ours in PEER_OF.items():
      gj = {v: e for (lib, s, v), e in errs.items() if lib == "genjax" and s == ours}
      pe = {v: e for (lib, s, v), e in errs.items() if lib == "diffusers" and s == peer}
      if "default" in gj and "default" in pe:
        check("a_default", cell, gj["default"], pe["default"], sampler=ours)
      if gj and pe:
        best, best_peer = min(gj, key=gj.get), min(pe, key=pe.get)
        check("a_best", cell, gj[best], pe[best_peer], sampler=ours, variant=best, peer_variant=best_peer)
    gj_all = {(s, v): e for (lib, s, v), e in errs.items() if lib == "genjax"}
    pe_all = {(s, v): e for (lib, s, v), e in errs.items() if lib == "diffusers"}
    if gj_all and pe_all:
      best, best_peer = min(gj_all, key=gj_all.get), min(pe_all, key=pe_all.get)
      check("b", cell, gj_all[best], pe_all[best_peer], sampler="/".join(best), peer_sampler="/".join(best_peer))
  for (schedule, mixture, nfe), errs in sorted(cells.items()):
    if schedule not in GOAL_SCHEDULES or nfe != 10:
      continue
    ddim20 = cells.get((schedule, mixture, 20), {}).get(("genjax", "ddim", "default"))
    for fast in SUMMARY_SAMPLERS:
      ours = errs.get(("genjax", fast, "default"))
      if ours is not None and ddim20 is not None:
        check("c", (schedule, mixture, 10), ours, ddim20, sampler=fast, versus="ddim default at NFE 20")
  return out


def geomean_records(records) -> list[dict]:
  """One record per (schedule, NFE, library, sampler, option) with the geometric mean of RMSE over the mixtures
  (mixture "geomean"; only where every mixture ran): the goals with the mixtures pooled."""
  groups = defaultdict(list)
  mixtures = {r["mixture"] for r in records}
  for r in _ok(records):
    groups[(r["schedule"], r["nfe"], r["library"], r["sampler"], r["variant"])].append(r["rmse"])
  return [dict(schedule=k[0], mixture="geomean", nfe=k[1], library=k[2], sampler=k[3], variant=k[4], rmse=_geomean(v),
               status="ok") for k, v in groups.items() if len(v) == len(mixtures)]


def goal_lines(result) -> list[str]:
  text = {"a_default": "(a) genjax default <= diffusers default (same solver)",
          "a_best": "(a) genjax best option <= diffusers best option (same solver)",
          "b": "(b) best genjax sampler <= every diffusers row",
          "c": "(c) DPM-Solver++ 2M / UniPC-2 at NFE 10 < DDIM at NFE 20"}
  lines = []
  for name, g in result["goals"].items():
    pooled = result.get("goals_geomean", {}).get(name)
    pooled_text = "" if not pooled or not pooled["checked"] else (
        f"; pooled over the mixtures (geometric mean): {pooled['checked'] - len(pooled['failed'])}/"
        f"{pooled['checked']} (schedule, NFE) cells")
    if not g["checked"]:
      lines.append(f"- {text[name]}: not checked (peers or samplers missing)")
      continue
    failed = g["failed"]
    lines.append(f"- {text[name]}: {g['checked'] - len(failed)}/{g['checked']} cells pass{pooled_text}")
    for f in failed:
      who = f.get("sampler", "")
      if f.get("variant"):
        who += f" [{f['variant']}] vs [{f['peer_variant']}]"
      lines.append(f"  - FAIL {f['cell']} {who}: {f['genjax']:.4g} vs {f['peer']:.4g} ({f['ratio']:.2f}x)")
  return lines


def _geomean(values):
  return math.exp(sum(math.log(max(v, 1e-30)) for v in values) / len(values)) if values else None


def summary_rows(result, schedules) -> list[dict]:
  """Per (library, sampler): its default and its best option over `schedules`, errors[schedule][nfe] = the
  geometric mean of RMSE over the mixtures ("best" = the option with the lowest mean over all those cells)."""
  nfes = result["nfes"]
  by = defaultdict(lambda: defaultdict(list))      # (lib, sampler, variant) -> (schedule, nfe) -> [rmse per mixture]
  for r in _ok(result["records"]):
    if r["schedule"] in schedules:
      by[(r["library"], r["sampler"], r["variant"])][(r["schedule"], r["nfe"])].append(r["rmse"])
  n_mix = len(result["mixtures"])
  cells = [(s, n) for s in schedules for n in nfes]
  complete = {k: d for k, d in by.items() if all(len(d.get(c, [])) == n_mix for c in cells)}
  rows = []
  for lib, sampler in dict.fromkeys((k[0], k[1]) for k in complete):
    options = {v: {c: _geomean(d[c]) for c in cells} for (l, s, v), d in complete.items() if (l, s) == (lib, sampler)}
    best = min(options, key=lambda v: _geomean(list(options[v].values())))
    label = next(r["label"] for r in result["records"] if r["sampler"] == sampler)
    for variant in dict.fromkeys(v for v in ("default", best) if v in options):
      errors = {s: {n: options[variant][(s, n)] for n in nfes} for s in schedules}
      rows.append(dict(library=lib, sampler=label, variant=variant if variant == "default" else f"best: {variant}",
                       errors=errors))
  return rows


def compact_table(result, schedules=GOAL_SCHEDULES) -> list[str]:
  """One markdown table (docs/results.md): a row per (library, sampler) default and best option, NFE columns per
  schedule, each cell the geometric mean of RMSE over the mixtures."""
  nfes = result["nfes"]
  head = "| library | sampler | option | " + " | ".join(f"{s[:3]} {n}" for s in schedules for n in nfes) + " |"
  out = [head, "|---|---|---|" + "---:|" * (len(nfes) * len(schedules))]
  for row in summary_rows(result, schedules):
    cells = [f"{row['errors'][s][n]:.2g}" for s in schedules for n in nfes]
    out.append(f"| {row['library']} | {row['sampler']} | {row['variant']} | " + " | ".join(cells) + " |")
  return out


def markdown(result) -> str:
  nfes = result["nfes"]
  out = []
  schedules = list(dict.fromkeys(r["schedule"] for r in result["records"]))
  for schedule in schedules:
    out += [f"**{schedule}** — RMSE vs the exact ODE, geometric mean over {len(result['mixtures'])} mixtures",
            "", "| library | sampler | option | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
            "|---|---|---|" + "---:|" * len(nfes)]
    for row in summary_rows(result, [schedule]):
      cells = " | ".join(f"{row['errors'][schedule][n]:.2e}" for n in nfes)
      out.append(f"| {row['library']} | {row['sampler']} | {row['variant']} | {cells} |")
    out.append("")
  out += ["Goals (per schedule x mixture x NFE):", ""] + goal_lines(result)
  failed = [r for r in result["records"] if r["status"] != "ok"]
  if failed:
    out += ["", "Options that did not run:", ""]
    out += sorted({f"- {r['library']} {r['sampler']} [{r['variant']}]: {r['status']}" for r in failed})
  return "\n".join(out)


def plot(result, path: str) -> None:
  """RMSE against model calls (log-log), one panel per (schedule, mixture), defaults only; diffusers dashed."""
  import matplotlib
  import matplotlib.ticker
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  schedules = list(dict.fromkeys(r["schedule"] for r in result["records"]))
  names = list(result["mixtures"])
  fig, axes = plt.subplots(len(schedules), len(names), figsize=(4.0 * len(names), 3.0 * len(schedules) + 0.8),
                           dpi=100, squeeze=False)
  keys = list(dict.fromkeys((r["library"], r["sampler"], r["label"]) for r in _ok(result["records"])))
  ours = [k for k in keys if k[0] == "genjax"]
  colors = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(ours)}
  by_sampler = {k[1]: colors[k] for k in ours}
  for k in keys:   # a diffusers scheduler is drawn dashed in the colour of the genjax solver it is compared with
    colors.setdefault(k, by_sampler.get(PEER_OF.get(k[1]), "gray"))
  handles = {}
  for i, schedule in enumerate(schedules):
    for j, mixture in enumerate(names):
      ax = axes[i][j]
      rows = [r for r in _ok(result["records"])
              if r["schedule"] == schedule and r["mixture"] == mixture and r["variant"] == "default"]
      for key in keys:
        pts = sorted((r["calls"], r["rmse"]) for r in rows if (r["library"], r["sampler"], r["label"]) == key)
        if pts:
          (line,) = ax.plot(*zip(*pts), marker="o", markersize=3, color=colors[key],
                            linestyle="--" if key[0] == "diffusers" else "-")
          handles[key] = line
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set_xticks(result["nfes"], [str(n) for n in result["nfes"]])
      ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
      ax.set_title(f"{schedule} / {mixture}", fontsize=9)
      ax.grid(True, which="both", alpha=0.3)
      if i == len(schedules) - 1:
        ax.set_xlabel("model calls (NFE)")
      if j == 0:
        ax.set_ylabel("RMSE vs exact ODE")
  labels = [k[2] if k[0] == "genjax" else f"diffusers {k[2]} (dashed)" for k in handles]
  fig.legend(list(handles.values()), labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
  fig.suptitle("Each sampler's defaults against the exact probability-flow ODE (float64), same model and x_T",
               fontsize=10)
  fig.tight_layout(rect=(0, 0.7 / (3.0 * len(schedules) + 0.8), 1, 0.97))
  fig.savefig(path)
  plt.close(fig)
