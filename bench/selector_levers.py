"""The levers on the sound selector's price (issue 38), measured on one set of σ experts and
the same images: for each selector run (a workdir with the router's nodes, e.g. one trained
with another train.estimator.node_sigma_factor) and each node n, τ is chosen on the held-out
examples (tune.py's sweep: once among τ ≥ 1/2, the largest σ the default route, and once
among all, the default route chosen too), and the thresholded chain's sound row is computed
on the test images at that τ. Beside it, from the experts' own fixed-σ rows (their
certify.py TSVs): the choices' ACR (each test image at the σ the chain chose, with that
expert's CERTIFY at α, no selector cap), the price (choices − sound) and the label oracle.

    python bench/selector_levers.py --runs runs/h3/sel,runs/h3/sel_f2 --node-n 0,20000 \
        --experts runs/h3/cohen_0.5,runs/h3/cohen_1.0 \
        --fixed runs/h3/cohen_0.5/certify/fixed_sigma.tsv,runs/h3/cohen_1.0/certify/fixed_sigma.tsv \
        [--n 10000 --skip 20 --taus 0.05,...,0.99] --out levers.json

The class tests at every grid σ are drawn once per split and shared by the variants that
would draw the same ones (the same seed, α split, n and experts; thresholded.sweep's
`tests`): each variant's rows are those certify.py writes with its settings. An image whose
certificate abstains at a node is reported at σ_1, as the certificate reports it, and its
choice is scored there. Prints JSON; --out keeps it too.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from instars_jax import analyze, certification, data, tune  # noqa: E402
from instars_jax.certificates import fixed_sigma, router, thresholded  # noqa: E402
from instars_jax.selection import estimator  # noqa: E402
from instars_jax.smoothing import sampler  # noqa: E402
from instars_jax.storage import results  # noqa: E402
from instars_jax.storage.results import format_down  # noqa: E402
from instars_jax.storage.workdir import Workdir  # noqa: E402

TAUS = (0.05, 0.1, 0.2, 0.3, 0.45, 0.55, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)


def variant_config(run: str, node_n: int, split: str, args):
  config = certification.run_config(run, {
      "certify.n": args.n, "certify.skip": args.skip, "certify.experts": args.experts,
      "certify.estimator.n": node_n, "certify.sigma_mode": "instance",
      "certify.certificate": "thresholded", "certify.thresholded.sweep": args.taus,
      "certify.thresholded.shared_samples": args.shared})
  config.certify.split = split
  return config


def split_batch(config, split: str, args, cache: dict) -> dict:
  """{"dataset", "batch"}: the split's selected examples (every --skip-th), loaded once."""
  if split not in cache:
    dataset = data.from_config(config)
    part = dataset.holdout if split == "holdout" else dataset.test
    cache[split] = {"dataset": dataset,
                    "batch": part.take(certification.selected_indices(len(part), args.skip, -1))}
  return cache[split]


def prepared(run: str, node_n: int, split: str, args, cache: dict, kind) -> tuple:
  """(config, smoothed model as `kind` certifies, grid, β, batch) of a variant on `split`."""
  config = variant_config(run, node_n, split, args)
  workdir = Workdir(run)
  metadata = certification.run_metadata(config, kind, workdir)
  loaded = split_batch(config, split, args, cache)
  smoothed = certification.smoothed_model(config, workdir, loaded["dataset"], metadata)
  grid = np.asarray(estimator.grid_of(config), np.float32)
  return config, smoothed, grid, thresholded.alpha_split(config)[1], loaded["batch"]


def split_class_tests(run: str, split: str, args, cache: dict) -> dict:
  """The class tests of the chain on `split` (class_tests), from the run's model and experts
  as a fixed-σ certification records them (the chain's smoothed model is the same)."""
  config, smoothed, grid, beta, batch = prepared(run, 0, split, args, cache, fixed_sigma)
  c, metadata = config.certify, smoothed.metadata  # shared only by runs that draw the same
  drawn = ["tests", split, args.skip, config.seed, c.alpha, beta, c.n, c.n0,
           metadata.get("experts") or metadata["checkpoint"], args.shared]
  return class_tests(smoothed, grid, batch["image"], batch["index"], beta, args, drawn, cache)


def swept(run: str, node_n: int, split: str, args, cache: dict) -> dict:
  """{τ: summary} of the variant on `split`, with the chain's σ per image and the labels."""
  config, smoothed, grid, beta, batch = prepared(run, node_n, split, args, cache, thresholded)
  x, ids = batch["image"], batch["index"]
  tests = split_class_tests(run, split, args, cache)
  chain = router.loaded_nodes(smoothed, config)
  found = thresholded.sweep(smoothed, chain, grid, x, ids, beta, args.taus, tests, args.shared)
  return {tau: tune.summary(batch["label"], [cert], tune.default_sigma(grid, tau))
          | {"sigma": cert.sigma, "idx": ids, "node_sigma": [node.sigma for node in chain],
             "node_n": chain[0].n}
          for tau, cert in found.items()}


def class_tests(smoothed, grid, x, ids, beta, args, drawn: list, cache: dict) -> dict:
  """thresholded.class_tests for the inputs, drawn once per `drawn` (what they depend on):
  kept in `cache`, and with --cache-dir on disk, so that a later invocation (other selector
  runs on the same experts and images) samples only its nodes."""
  key = hashlib.sha1(json.dumps(drawn, default=str).encode()).hexdigest()[:16]
  if key in cache:
    return cache[key]
  path = Path(args.cache_dir) / f"class_tests_{key}.npz" if args.cache_dir else None
  fields = sampler.Certificate._fields
  if path is not None and path.exists():
    with np.load(path) as saved:
      tests = {np.float32(s): sampler.Certificate(*(saved[f"{s:g}_{f}"] for f in fields))
               for s in grid}
  else:
    tests = thresholded.class_tests(smoothed, grid, x, ids, beta, args.shared)
    if path is not None:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_name(f".{path.stem}.tmp.npz")
      np.savez(tmp, **{f"{s:g}_{f}": np.asarray(v) for s, cert in tests.items()
                       for f, v in zip(fields, cert)})
      tmp.replace(path)
  cache[key] = tests
  return tests


def fixed_rows(paths) -> dict:
  """{float32 σ: {idx: (radius, correct)}} from the experts' fixed-σ TSVs."""
  rows = {}
  for path in paths:
    table = results.read_results(path)
    sigma = np.float32(results.read_metadata(path)["sigma"])
    rows[sigma] = {int(i): (float(r), int(c) == 1)
                   for i, r, c in zip(table["idx"], table["radius"], table["correct"])}
  return rows


def choices_acr(sigma, ids, fixed: dict) -> float:
  """ACR of each image at the σ the chain chose, with that expert's own CERTIFY at α."""
  radius = [fixed[np.float32(s)][int(i)] for s, i in zip(sigma, ids)]
  return float(np.mean([r if c else 0.0 for r, c in radius]))


def table(out: dict) -> str:
  """The markdown table of a levers JSON: the fixed rows, each variant's sound row with its
  ratio, share moved, choices' ratio and price, the oracle, and each sound row's gap to the
  fixed rows' envelope (points); aggregates rounded down."""
  fixed = out["fixed"]
  radii = list(next(iter(fixed.values()))["certified_accuracy"])
  best = max(f["acr"] for f in fixed.values())
  head = ("| row | τ | " + " | ".join(f"r = {r}" for r in radii)
          + " | ACR | × best fixed | moved | choices × | price |")
  lines = [head, "|---" * (len(radii) + 7) + "|"]
  down = lambda v: format_down(v, 3)
  cells = lambda acc: " | ".join(down(a) for a in acc.values())
  for sigma, f in fixed.items():
    lines.append(f"| fixed σ = {sigma} | | {cells(f['certified_accuracy'])} | {down(f['acr'])} "
                 f"| {down(f['acr'] / best)} | | | |")
  envelope = {r: max(f["certified_accuracy"][r] for f in fixed.values()) for r in radii}
  gaps = []
  for v in out["variants"]:
    name = (f"{Path(v['run']).name}, node σ {'/'.join(f'{s:g}' for s in v['node_sigma'])}, "
            f"node n {v['node_n']}, default: {v['default_route']}")
    t = v["test"]
    lines.append(f"| {name} | {v['tau']:g} | {cells(t['certified_accuracy'])} | {down(t['acr'])} "
                 f"| {down(v['sound_ratio'])} | {t['moved']:.1%} | {down(v['choices_ratio'])} "
                 f"| {format_down(v['price'], 3)} |")
    gaps.append(f"| gap to the envelope, points: {name} | | " + " | ".join(
        f"{100 * (t['certified_accuracy'][r] - envelope[r]):+.1f}" for r in radii) + " | | | | | |")
  o = out["oracle"]
  lines.append(f"| label oracle over the experts (not a certificate) | | "
               f"{cells(o['certified_accuracy'])} | {down(o['acr'])} | {down(o['acr'] / best)} "
               "| | | |")
  return "\n".join(lines + gaps)


def summary(args, fixed_paths, variants) -> dict:
  fixed = {f"{results.read_metadata(p)['sigma']:g}": analyze.summarize(p) for p in fixed_paths}
  oracle = analyze.oracle_summary(fixed_paths)
  best = max(f["acr"] for f in fixed.values())
  return {"fixed": fixed, "oracle": oracle, "oracle_ratio": oracle["acr"] / best, "n": args.n,
          "skip": args.skip, "experts": args.experts, "variants": variants}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--table", default="", help="print the table of this levers JSON, only")
  parser.add_argument("--runs", help="selector workdirs, commas between")
  parser.add_argument("--node-n", default="0", help="node n values (0: --n), commas between")
  parser.add_argument("--experts", help="certify.experts: one run per grid σ")
  parser.add_argument("--fixed", help="the experts' fixed-σ TSVs, grid order")
  parser.add_argument("--n", type=int, default=10_000)
  parser.add_argument("--skip", type=int, default=20)
  parser.add_argument("--taus", default=",".join(map(str, TAUS)))
  parser.add_argument("--shared", action="store_true",
                      help="certify.thresholded.shared_samples for every variant")
  parser.add_argument("--cache-dir", default="",
                      help="keep the class tests here for later invocations on other runs")
  parser.add_argument("--class-tests-only", action="store_true",
                      help="draw the class tests of the first run into --cache-dir and stop "
                           "(they need no selector: its nodes may still be training)")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  if args.table:
    print(table(json.loads(Path(args.table).read_text())))
    return 0
  if not (args.runs and args.experts and args.fixed):
    parser.error("--runs, --experts and --fixed are required (or --table FILE)")
  args.taus = tuple(float(t) for t in args.taus.split(","))
  fixed_paths = args.fixed.split(",")
  caches = {}
  if args.class_tests_only:
    for split in ("holdout", "test"):
      split_class_tests(args.runs.split(",")[0], split, args, caches)
    return 0
  fixed = fixed_rows(fixed_paths)
  best_fixed = max(analyze.summarize(p)["acr"] for p in fixed_paths)
  variants = []
  for run in args.runs.split(","):
    for node_n in (int(v) for v in args.node_n.split(",")):
      held_out = swept(run, node_n, "holdout", args, caches)
      test = swept(run, node_n, "test", args, caches)
      for default, taus in (("largest σ", [t for t in args.taus if t >= 0.5]),
                            ("chosen on held-out", list(args.taus))):
        tau = tune.best_threshold({t: held_out[t] for t in taus})
        row = test[tau]
        choices = choices_acr(row["sigma"], row["idx"], fixed)
        variants.append({
            "run": run, "node_n": row["node_n"], "node_sigma": row["node_sigma"],
            "default_route": default, "tau": tau,
            "held_out": {f"{t:g}": {k: v for k, v in s.items() if k not in ("sigma", "idx")}
                         for t, s in held_out.items()},
            "test": {k: v for k, v in row.items() if k not in ("sigma", "idx")},
            "sound_ratio": row["acr"] / best_fixed, "choices_acr": choices,
            "choices_ratio": choices / best_fixed, "price": choices - row["acr"],
            "sigma_shares": {f"{s:g}": float(np.mean(row["sigma"] == s))
                             for s in np.unique(row["sigma"])}})
        print(json.dumps(variants[-1] | {"held_out": "..."}), file=sys.stderr, flush=True)
        if args.out:  # what is measured so far, kept as it comes
          Path(args.out).write_text(json.dumps(summary(args, fixed_paths, variants), indent=1,
                                               default=float))
  text = json.dumps(summary(args, fixed_paths, variants), indent=1, default=float)
  if args.out:
    Path(args.out).write_text(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
