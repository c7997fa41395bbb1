"""Certified accuracy and average certified radius (ACR) of certification results, and the
label-oracle ceiling of a set of them.

    python -m instars_jax.analyze [FILE ...] [--oracle FILE FILE ...] [--radii 0,0.25,0.5]
                                  [--format markdown|json] [--plot out.png]
                                  [--sigma-hist sigmas.png]

Certified accuracy at r is the fraction of rows with correct == 1 and radius >= r; the ACR is
the mean over all rows of radius * correct (abstentions count 0).

--oracle takes files certified on the same test images (one base model at each grid σ, or
one model per σ) and adds the label oracle: for each image, the largest radius among the
files where it is correct. It knows the label, so it is no certificate; it bounds what any
choice among those files can reach. Every row then shows its share of the oracle's ACR gain
over the best of the oracle's files: (ACR − best) / (oracle − best).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from instars_jax.storage import results
from instars_jax.storage.results import format_down

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
UNLABELLED = "unlabelled (no metadata sidecar)"


def shown_kind(kind: str, sound: bool = True) -> str:
  """The kind as tables print it: marked UNSOUND where its radius does not certify the
  classifier it deploys (the results' `sound` metadata)."""
  return kind if sound else f"{kind} (UNSOUND)"


def certified_accuracy(radius, correct, radii) -> np.ndarray:
  """Fraction of rows that are correct with radius >= r, for each r in radii."""
  radius, correct = np.asarray(radius), np.asarray(correct) == 1
  return np.array([np.mean(correct & (radius >= r)) for r in radii])


def average_certified_radius(radius, correct) -> float:
  return float(np.mean(np.asarray(radius) * (np.asarray(correct) == 1)))


def radius_key(r: float) -> str:
  return f"{r:g}"


def radius_summary(radius, correct, radii=DEFAULT_RADII) -> dict:
  """{"certified_accuracy": {r: fraction}, "acr"} of rows with these radii and correctness."""
  accuracy = certified_accuracy(radius, correct, radii)
  return {"certified_accuracy": {radius_key(r): float(a) for r, a in zip(radii, accuracy)},
          "acr": average_certified_radius(radius, correct)}


def summarize(path, radii=DEFAULT_RADII) -> dict:
  """One file's numbers: {"file", "n", "certificate", "certified_accuracy", "acr"}."""
  table = results.read_results(path)
  metadata = results.read_metadata(path)
  return {
      "file": str(path),
      "n": int(len(table["idx"])),
      "certificate": metadata.get("certificate", UNLABELLED),
      "sound": metadata.get("sound", True),
      "certificate_meaning": metadata.get("certificate_meaning", ""),
  } | radius_summary(table["radius"], table["correct"], radii)


ORACLE = "label oracle (knows the label: not a certificate)"


def oracle_summary(paths, radii=DEFAULT_RADII) -> dict:
  """summarize's dict for the label oracle over `paths` (`oracle_radii`)."""
  radius, hit = oracle_radii(paths)
  return {"file": "oracle over " + ", ".join(Path(p).name for p in paths), "n": len(radius),
          "certificate": ORACLE, "sound": False,
          "certificate_meaning": ""} | radius_summary(radius, hit, radii)


def oracle_radii(paths) -> tuple:
  """(radius, correct) of the label oracle over `paths`, which must hold the same test images
  with the same labels: per image the largest radius among the files where it is correct."""
  tables = [results.read_results(p) for p in paths]
  order = [np.argsort(t["idx"]) for t in tables]
  idx = [t["idx"][o] for t, o in zip(tables, order)]
  for path, i in zip(paths[1:], idx[1:]):
    if not np.array_equal(i, idx[0]):
      raise ValueError(f"--oracle needs files certified on the same test images: {path} and "
                       f"{paths[0]} differ")
  labels = [t["label"][o] for t, o in zip(tables, order)]
  if any(not np.array_equal(label, labels[0]) for label in labels[1:]):
    raise ValueError("--oracle needs files with the same labels for each test image")
  return label_oracle(np.stack([t["radius"][o] for t, o in zip(tables, order)]),
                      np.stack([t["correct"][o] == 1 for t, o in zip(tables, order)]))


def label_oracle(radius, correct) -> tuple:
  """(radius, correct) of the label oracle from [files, images] arrays of the same images:
  per image the largest radius among the files where it is correct (0 where none is)."""
  correct = np.asarray(correct, bool)
  best = np.max(np.where(correct, radius, -np.inf), axis=0)
  hit = correct.any(axis=0)
  return np.where(hit, best, 0.0), hit.astype(int)


def fixed_rows(paths) -> dict:
  """{float32 σ: {idx: (radius, correct)}} from fixed-σ results files (one σ each)."""
  rows = {}
  for path in paths:
    table = results.read_results(path)
    sigma = np.float32(results.read_metadata(path)["sigma"])
    rows[sigma] = {int(i): (float(r), int(c) == 1)
                   for i, r, c in zip(table["idx"], table["radius"], table["correct"])}
  return rows


def choices_radii(sigma, ids, fixed: dict) -> np.ndarray:
  """Each image's radius (0 where wrong) at the σ an instance-wise row chose, with that σ's
  own fixed-σ certificate (`fixed_rows`): no selector's cap or α split."""
  return np.array([r if c else 0.0 for r, c in (fixed[np.float32(s)][int(i)]
                                                  for s, i in zip(sigma, ids))])


def choices_acr(sigma, ids, fixed: dict) -> float:
  """The choices' ACR (the mean of `choices_radii`); a row's price is this minus its ACR."""
  return float(np.mean(choices_radii(sigma, ids, fixed)))


def with_choices(summaries, oracle_paths) -> list:
  """The summaries of instance-wise rows whose every σ has a fixed-σ file among
  `oracle_paths` on the same images, with `choices_acr` and `price` (choices − ACR)."""
  fixed = fixed_rows([p for p in oracle_paths if "sigma" in results.read_metadata(p)])
  out = []
  for s in summaries:
    table = results.read_results(s["file"])
    if ("sigma" in table and "sigma" not in results.read_metadata(s["file"])
        and all(int(i) in fixed.get(np.float32(v), ()) for v, i in zip(table["sigma"],
                                                                     table["idx"]))):
      choices = choices_acr(table["sigma"], table["idx"], fixed)
      s = s | {"choices_acr": choices, "price": choices - s["acr"]}
    out.append(s)
  return out


def with_oracle_shares(summaries, oracle: dict, pool) -> list:
  """The summaries with each one's `oracle_gain_share`: (ACR − best of `pool`) / (oracle ACR −
  best of `pool`), `pool` being the summaries of the oracle's files."""
  best = max(s["acr"] for s in pool)
  gain = oracle["acr"] - best
  return [s | {"oracle_gain_share": (s["acr"] - best) / gain if gain > 0 else float("nan")}
          for s in summaries]


def markdown_table(summaries, radii=DEFAULT_RADII) -> str:
  """Certified accuracy at each radius, the ACR and the certificate kind, one row per file
  (and each one's share of the oracle's gain, when the summaries have it), every number
  rounded down (results.format_down; --format json gives them in full)."""
  shares = all("oracle_gain_share" in s for s in summaries)
  prices = any("price" in s for s in summaries)
  header = (["file", "n"] + [f"r = {radius_key(r)}" for r in radii] + ["ACR"]
            + (["share of oracle gain"] if shares else [])
            + (["choices' ACR", "price"] if prices else []) + ["certificate"])
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  for s in summaries:
    cells = [s["file"], str(s["n"])]
    cells += [format_down(s["certified_accuracy"][radius_key(r)], 3) for r in radii]
    cells += [format_down(s["acr"], 3)]
    if shares:
      share = format_down(s["oracle_gain_share"], 2)
      cells += [share if share.startswith("-") else "+" + share]
    if prices:
      cells += ([format_down(s["choices_acr"], 3), format_down(s["price"], 3)] if "price" in s
                else ["", ""])
    cells += [shown_kind(s["certificate"], s["sound"])]
    lines.append("| " + " | ".join(cells) + " |")
  meanings = {shown_kind(s["certificate"], s["sound"]): s["certificate_meaning"]
              for s in summaries if s["certificate_meaning"]}
  lines += [f"\n{kind}: {meaning}" for kind, meaning in meanings.items()]
  return "\n".join(lines)


def legend_label(path) -> str:
  """A plot legend for a results file: its certificate kind and σ, from the sidecar;
  unsound kinds say so."""
  metadata = results.read_metadata(path)
  kind = metadata.get("certificate")
  if kind is None:
    return f"{Path(path).stem} (unlabelled)"
  grid = metadata.get("grid") or metadata.get("estimator", {}).get("grid")
  if "sigma" in metadata:
    sigma = f"σ = {metadata['sigma']:g}"
  elif grid:
    sigma = f"σ ∈ {{{', '.join(f'{g:g}' for g in grid)}}} per input"
  elif "search" in metadata:
    sigma = f"σ searched in [{metadata['search']['sigma_min']:g}, {metadata['search']['sigma_max']:g}]"
  else:
    sigma = ""
  return shown_kind(f"{kind}, {sigma}" if sigma else kind, metadata.get("sound", True))


def plot_certified_accuracy(paths, out_path, oracle=()) -> None:
  """Certified accuracy against radius, one curve per file, labelled by certificate and σ,
  and (given `oracle` files) the label oracle over them, dashed."""
  fig, ax = new_figure()
  curves = [(results.read_results(p), legend_label(p),
             ":" if not results.read_metadata(p).get("sound", True) else "-") for p in paths]
  if oracle:
    radius, hit = oracle_radii(oracle)
    curves.append(({"radius": radius, "correct": hit}, ORACLE, "--"))
  for table, label, linestyle in curves:
    grid = np.linspace(0.0, max(float(np.max(table["radius"], initial=0.0)), 1e-3) * 1.05, 200)
    ax.plot(grid, certified_accuracy(table["radius"], table["correct"], grid), label=label,
            linestyle=linestyle, color="grey" if label == ORACLE else None)
  ax.set_xlabel("L2 radius")
  ax.set_ylabel("certified accuracy")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  save_figure(fig, ax, out_path)


def plot_sigma_histogram(paths, out_path) -> None:
  """Histogram of the `sigma` column of each file (the σ each instance was certified at)."""
  tables = [results.read_results(path) for path in paths]
  for path, table in zip(paths, tables):
    if "sigma" not in table:
      raise ValueError(f"{path} has no sigma column to plot")
  values = np.concatenate([t["sigma"] for t in tables])
  low, high = float(values.min()), float(values.max())
  bins = np.linspace(low * 0.95, high * 1.05 if high > low else low * 1.05, 41)
  fig, ax = new_figure()
  for path, table in zip(paths, tables):
    ax.hist(table["sigma"], bins=bins, alpha=0.6, label=legend_label(path))
  ax.set_xlabel("σ used for certification")
  ax.set_ylabel("instances")
  save_figure(fig, ax, out_path)


def new_figure(width: float = 6.0):
  """A matplotlib (figure, axes) on the Agg backend (no display needed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt.subplots(figsize=(width, 4))


def save_figure(fig, ax, out_path) -> None:
  import matplotlib.pyplot as plt
  if ax.get_legend_handles_labels()[0]:
    ax.legend()
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  plt.close(fig)


def parse_radii(text: str) -> tuple[float, ...]:
  try:
    radii = tuple(float(r) for r in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--radii must be comma-separated numbers; got {text!r}")
  if any(r < 0 for r in radii):
    raise argparse.ArgumentTypeError(f"--radii must be >= 0; got {text!r}")
  return radii


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m instars_jax.analyze", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("files", nargs="*", help="certification TSV files")
  parser.add_argument("--oracle", nargs="+", default=[], metavar="FILE",
                      help="files on the same test images whose label oracle to add")
  parser.add_argument("--radii", type=parse_radii, default=DEFAULT_RADII)
  parser.add_argument("--format", choices=("markdown", "json"), default="markdown")
  parser.add_argument("--plot", help="write certified accuracy against radius to this PNG")
  parser.add_argument("--sigma-hist", help="write a histogram of the sigma column to this PNG")
  args = parser.parse_args(argv)
  if not args.files and not args.oracle:
    parser.error("give results files, --oracle files, or both")
  try:
    files = args.oracle + [f for f in args.files if f not in args.oracle]
    summaries = [summarize(f, args.radii) for f in files]
    if args.oracle:
      oracle = oracle_summary(args.oracle, args.radii)
      summaries = with_oracle_shares(with_choices(summaries, args.oracle) + [oracle], oracle,
                                     summaries[: len(args.oracle)])
  except (FileNotFoundError, ValueError) as error:
    parser.error(str(error))
  if args.format == "json":
    print(json.dumps(summaries, indent=2))
  else:
    print(markdown_table(summaries, args.radii))
  if args.plot:
    plot_certified_accuracy(files, args.plot, args.oracle)
  if args.sigma_hist:
    plot_sigma_histogram(args.files or files, args.sigma_hist)
  return 0


if __name__ == "__main__":
  sys.exit(main())
