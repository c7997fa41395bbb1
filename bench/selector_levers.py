"""The levers on the sound selector's price (issue 38), measured on one set of σ experts and
the same images: for each selector run (a workdir with the router's nodes, e.g. one trained
with another train.estimator.node_sigma_factor) and each node n, τ is chosen on the held-out
examples (tune.py's sweep: once among τ ≥ 1/2, the largest σ the default route, and once
among all, the default route chosen too), and the thresholded chain's sound row is computed
on the test images at that τ. Beside it, from the experts' own fixed-σ rows (their
certify.py TSVs): the choices' ACR (each test image at the σ the chain chose, with that
expert's CERTIFY at α, no selector cap), the price (choices − sound) and the label oracle,
and where the price goes (price_parts: the class test's smaller α, the nodes' caps; moved and
kept images apart). --project 10,100 adds, from the same node counts, the rows the nodes would
give with 10× and 100× their n at the share of bin 0 they saw: what a larger node n buys,
extrapolated with p̂ held, labelled projected (neither certificates nor bounds). --screen compares selector runs on the held-out
examples alone (no expert TSVs needed, no test-split passes): each variant's row at the τ best
on those same images, against fixed rows read off the class tests at α − β, so its price is
the nodes' caps alone; the JSON's "split" says which split its "test" rows are on.

    python bench/selector_levers.py --runs runs/h3/sel,runs/h3/sel_f2 --node-n 0,20000 --project 10 \
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
import dataclasses
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


def projected(scale: int):
  """The nodes' decision as if each had drawn scale × n samples and seen the same share in
  bin 0 (p̂ held): what a larger node n would give, extrapolated from the n samples drawn.
  Neither a certificate (the counts are not drawn) nor a bound (a real draw may land on the
  other side of τ); scale 1 is the chain's own decision."""
  if scale == 1:
    return thresholded.node_decision

  def decision(counts, node, beta_node, tau):
    scaled = np.round(np.asarray(counts, np.float64) * scale).astype(np.int64)
    return thresholded.node_decision(scaled, dataclasses.replace(node, n=node.n * scale),
                                     beta_node, tau)
  return decision


def swept(run: str, node_n: int, split: str, args, cache: dict, fixed=None) -> dict:
  """{scale: {τ: summary}} of the variant on `split`, for its own node n (scale 1) and each
  --project scale, with the chain's σ per image; on the test split (`fixed`: the experts'
  rows) each summary adds where its price goes (price_parts)."""
  config, smoothed, grid, beta, batch = prepared(run, node_n, split, args, cache, thresholded)
  x, ids, labels = batch["image"], batch["index"], batch["label"]
  tests = split_class_tests(run, split, args, cache)
  chain = router.loaded_nodes(smoothed, config)
  counts = thresholded.chain_counts(smoothed, chain, grid, x, ids, args.shared)
  out = {}
  for scale in (1, *args.project):
    found = thresholded.sweep(smoothed, chain, grid, x, ids, beta, args.taus, tests, args.shared,
                              counts, projected(scale))
    out[scale] = {}
    for tau, cert in found.items():
      default = tune.default_sigma(grid, tau)
      out[scale][tau] = tune.summary(labels, [cert], default) | {
          "sigma": cert.sigma, "idx": ids, "node_sigma": [node.sigma for node in chain],
          "node_n": chain[0].n * scale}
      if fixed is not None:
        out[scale][tau]["price_parts"] = price_parts(cert, ids, tests, labels, fixed, default)
  return out


def price_parts(cert, ids, tests, labels, fixed: dict, default: float) -> dict:
  """Where the price goes, in ACR (each part a sum over its images ÷ all images, so the parts
  add up): per group of images (moved: certified off the default σ; kept: certified at it;
  node abstained: the class test certified, a node on the path did not decide; class test
  abstained: at the σ chosen, or at σ_1 where a node abstained too), "choices" is
  the expert's own CERTIFY at α at the chosen σ, "class_test" the chain's class test at
  α − β there (other samples: the difference is the smaller α and sampling noise), "sound"
  the certificate, min(node radii, class radius). `cert` and `tests` in the order of `ids`."""
  chosen = np.asarray(cert.sigma, np.float32)
  expert = analyze.choices_radii(chosen, ids, fixed)
  class_prediction, class_radius = (
      np.array([getattr(tests[s], field)[j] for j, s in enumerate(chosen)])
      for field in ("prediction", "radius"))
  class_radius = np.where(class_prediction == labels, class_radius, 0.0)
  sound = np.where(cert.prediction == labels, cert.radius, 0.0)
  certified = cert.prediction != sampler.ABSTAIN
  class_certified = class_prediction != sampler.ABSTAIN
  off_default = chosen != np.float32(default)
  groups = {"all": np.ones(len(chosen), bool), "moved": certified & off_default,
            "kept": certified & ~off_default, "node abstained": ~certified & class_certified,
            "class test abstained": ~certified & ~class_certified}
  return {name: {"images": int(mask.sum()), "choices": float(expert[mask].sum() / len(mask)),
                 "class_test": float(class_radius[mask].sum() / len(mask)),
                 "sound": float(sound[mask].sum() / len(mask))}
          for name, mask in groups.items()}


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
  source = " (class test at α − β)" * (out.get("fixed_rows", "").startswith("class"))
  for sigma, f in fixed.items():
    lines.append(f"| fixed σ = {sigma}{source} | | {cells(f['certified_accuracy'])} "
                 f"| {down(f['acr'])} "
                 f"| {down(f['acr'] / best)} | | | |")
  envelope = {r: max(f["certified_accuracy"][r] for f in fixed.values()) for r in radii}
  gaps = []
  for v in out["variants"]:
    name = (f"{Path(v['run']).name}, node σ {'/'.join(f'{s:g}' for s in v['node_sigma'])}, "
            f"node n {v['node_n']}{' projected, not a certificate' * v.get('projected', False)}"
            f", default: {v['default_route']}")
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
  if out.get("split") == "holdout":  # --screen
    lines.insert(0, "Held-out examples (--screen): each variant's τ chosen on these same "
                    "images, the fixed rows the class tests at α − β.\n")
  return "\n".join(lines + gaps + ["", parts_table(out)])


def parts_table(out: dict) -> str:
  """Where each variant's price goes (price_parts): per group of test images, the choices'
  ACR, the class test's at α − β and the sound one, and the two parts of the price."""
  lines = ["| variant | τ | images | share | choices | class test (α − β) | sound "
           "| price: class test | price: node caps |", "|---" * 9 + "|"]
  down = lambda v: format_down(v, 3)
  for v in out["variants"]:
    name = (f"{Path(v['run']).name}, node n {v['node_n']}"
            f"{' (projected)' * v.get('projected', False)}, default: {v['default_route']}")
    for group, p in v["test"].get("price_parts", {}).items():
      share = p["images"] / v["test"]["price_parts"]["all"]["images"]
      lines.append(f"| {name} | {v['tau']:g} | {group} | {share:.1%} | {down(p['choices'])} "
                   f"| {down(p['class_test'])} | {down(p['sound'])} "
                   f"| {p['choices'] - p['class_test']:.3f} | {p['class_test'] - p['sound']:.3f} |")
  return "\n".join(lines)


def scales(text: str) -> list:
  """--project's node n scales: integers ≥ 2."""
  values = [int(s) for s in text.split(",") if s]
  if any(v < 2 for v in values):
    raise argparse.ArgumentTypeError(f"projection scales must be integers >= 2; got {text}")
  return values


def rows_summary(rows: dict) -> dict:
  """analyze.radius_summary of one fixed row ({idx: (radius, correct)})."""
  return analyze.radius_summary(*(np.array(v) for v in zip(*rows.values())))


def tests_as_fixed(tests: dict, batch: dict) -> dict:
  """fixed_rows' {σ: {idx: (radius, correct)}} from the chain's class tests (CERTIFY at α − β
  on the chain's stream): the fixed-σ rows of --screen, where no expert TSVs cover the split."""
  return {s: {int(i): (float(r), int(p) == int(label)) for i, r, p, label in
              zip(batch["index"], t.radius, t.prediction, batch["label"])}
          for s, t in tests.items()}


def summary(args, fixed: dict, variants) -> dict:
  """The levers JSON: the fixed rows, the label oracle over them (per image the largest radius
  where correct), and the variants."""
  ids = list(next(iter(fixed.values())))
  if any(set(rows) != set(ids) for rows in fixed.values()):
    raise ValueError("the fixed rows hold different images")
  stacked = np.array([[rows[i] for i in ids] for rows in fixed.values()])  # [σ, image, 2]
  oracle = analyze.radius_summary(*analyze.label_oracle(stacked[..., 0], stacked[..., 1]))
  fixed_out = {f"{s:g}": rows_summary(rows) for s, rows in fixed.items()}
  best = max(f["acr"] for f in fixed_out.values())
  return {"fixed": fixed_out, "oracle": oracle, "oracle_ratio": oracle["acr"] / best,
          "fixed_rows": "expert TSVs at α" if args.fixed else "class tests at α − β",
          "split": "holdout" if args.screen else "test", "n": args.n, "skip": args.skip,
          "experts": args.experts, "variants": variants}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--table", default="", help="print the table of this levers JSON, only")
  parser.add_argument("--runs", help="selector workdirs, commas between")
  parser.add_argument("--node-n", default="0", help="node n values (0: --n), commas between")
  parser.add_argument("--project", type=scales,
                      default=[], help="node n scales to project from the counts drawn "
                      "(projected: p̂ held, not a certificate), commas between")
  parser.add_argument("--experts", help="certify.experts: one run per grid σ")
  parser.add_argument("--fixed", default="", help="the experts' fixed-σ TSVs, grid order")
  parser.add_argument("--screen", action="store_true",
                      help="held-out examples only: each variant's row at the τ best on them "
                      "(chosen on the same images), the fixed rows from the class tests")
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
  if not (args.runs and args.experts and (args.fixed or args.screen)):
    parser.error("--runs, --experts and --fixed or --screen are required (or --table FILE)")
  if args.screen and args.fixed:
    parser.error("--screen reads its fixed rows off the held-out class tests: drop --fixed")
  args.taus = tuple(float(t) for t in args.taus.split(","))
  caches = {}
  first = args.runs.split(",")[0]
  if args.class_tests_only:
    for split in ("holdout",) if args.screen else ("holdout", "test"):
      split_class_tests(first, split, args, caches)
    return 0
  if args.fixed:
    fixed = analyze.fixed_rows(args.fixed.split(","))
  else:
    tests = split_class_tests(first, "holdout", args, caches)
    fixed = tests_as_fixed(tests, caches["holdout"]["batch"])
  best_fixed = max(rows_summary(rows)["acr"] for rows in fixed.values())
  variants = []
  for run in args.runs.split(","):
    if args.screen and split_class_tests(run, "holdout", args, caches) is not tests:
      raise ValueError(f"{run} draws other class tests than {first}: --screen's fixed rows "
                       "are the first run's")
    for node_n in (int(v) for v in args.node_n.split(",")):
      held_outs = swept(run, node_n, "holdout", args, caches, fixed if args.screen else None)
      rows = held_outs if args.screen else swept(run, node_n, "test", args, caches, fixed)
      for scale, held_out in held_outs.items():
        for default, taus in (("largest σ", [t for t in args.taus if t >= 0.5]),
                              ("chosen on held-out", list(args.taus))):
          tau = tune.best_threshold({t: held_out[t] for t in taus})
          row = rows[scale][tau]
          choices = analyze.choices_acr(row["sigma"], row["idx"], fixed)
          variants.append({
              "run": run, "node_n": row["node_n"], "node_sigma": row["node_sigma"],
              "projected": scale != 1, "default_route": default, "tau": tau,
              "held_out": {f"{t:g}": {k: v for k, v in s.items() if k not in ("sigma", "idx")}
                           for t, s in held_out.items()},
              "test": {k: v for k, v in row.items() if k not in ("sigma", "idx")}
                      | {"projected": scale != 1},
              "sound_ratio": row["acr"] / best_fixed, "choices_acr": choices,
              "choices_ratio": choices / best_fixed, "price": choices - row["acr"],
              "sigma_shares": {f"{s:g}": float(np.mean(row["sigma"] == s))
                               for s in np.unique(row["sigma"])}})
          print(json.dumps(variants[-1] | {"held_out": "..."}), file=sys.stderr, flush=True)
          if args.out:  # what is measured so far, kept as it comes
            Path(args.out).write_text(json.dumps(summary(args, fixed, variants), indent=1,
                                                 default=float))
  text = json.dumps(summary(args, fixed, variants), indent=1, default=float)
  if args.out:
    Path(args.out).write_text(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
