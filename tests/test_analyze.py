"""The analyzer reproduces Cohen et al.'s own tables and prints what it promises."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from helpers import event_values
from instars_jax import analyze, tune
from instars_jax.certificates import per_sigma
from instars_jax.storage import events, results


def cohen_table(path):
  """{sigma: {radius: value}} from one of the authors' markdown tables."""
  lines = path.read_text().splitlines()
  radii = [float(r) for r in re.findall(r"r = ([\d.]+)", lines[0])]
  table = {}
  for line in lines[2:]:
    sigma = re.search(r"&sigma; = ([\d.]+)", line).group(1)
    values = [float(v) for v in re.findall(r"\| ([\d.]+)", line)]
    table[sigma] = dict(zip(radii, values))
  return table


@pytest.mark.parametrize("dataset, arch", [("cifar10", "resnet110"), ("imagenet", "resnet50")])
def test_reproduces_cohen_tables(shared_dir, dataset, arch):
  fixtures = shared_dir / "fixtures" / "cohen2019"
  table = cohen_table(fixtures / "analysis" / "markdown" / f"vary_noise_{dataset}")
  assert table
  for sigma, expected in table.items():
    path = fixtures / "certify" / dataset / arch / f"noise_{sigma}" / "test" / f"sigma_{sigma}"
    summary = analyze.summarize(path, radii=tuple(expected))
    got = {float(r): float(f"{a:.2f}") for r, a in summary["certified_accuracy"].items()}
    assert got == expected, f"{path}: {got} != {expected}"


@pytest.fixture
def small_results(tmp_path):
  path = tmp_path / "run.tsv"
  writer = results.ResultsWriter(path)
  rows = [(0, 1, 1, 0.8, 0.5), (1, 2, 2, 0.3, 0.5), (2, 0, -1, 0.0, 0.5), (3, 4, 1, 0.9, 0.5)]
  writer.write([dict(idx=i, label=l, predict=p, radius=r, correct=int(l == p), time=0.1, sigma=s,
                       samples=100)
                for i, l, p, r, s in rows])
  return path


def test_certified_accuracy_and_acr(small_results):
  summary = analyze.summarize(small_results, radii=(0.0, 0.25, 0.5, 1.0))
  assert summary["n"] == 4
  assert summary["certified_accuracy"] == {"0": 0.5, "0.25": 0.5, "0.5": 0.25, "1": 0.0}
  assert summary["acr"] == pytest.approx((0.8 + 0.3) / 4)
  assert summary["certificate"] == analyze.UNLABELLED


def test_cli_json_markdown_and_plots(small_results, tmp_path, capsys):
  assert analyze.main([str(small_results), "--radii", "0,0.5", "--format", "json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out == [{"file": str(small_results), "n": 4, "certificate": analyze.UNLABELLED,
                  "sound": True, "certificate_meaning": "",
                  "certified_accuracy": {"0": 0.5, "0.5": 0.25}, "acr": pytest.approx(0.275)}]
  results.write_metadata(small_results, {"certificate": "per_sigma", "sound": False,
                                         "certificate_meaning": per_sigma.MEANING})
  plot, hist = tmp_path / "acc.png", tmp_path / "sigma.png"
  analyze.main([str(small_results), "--plot", str(plot), "--sigma-hist", str(hist)])
  table = capsys.readouterr().out
  assert "| r = 0.25 |" in table and "| per_sigma (UNSOUND) |" in table and "0.275" in table
  assert "not a certificate of the input-dependent classifier" in table
  assert plot.stat().st_size > 1000 and hist.stat().st_size > 1000
  assert analyze.legend_label(small_results) == "per_sigma (UNSOUND)"
  results.write_metadata(small_results, {"certificate": "fixed_sigma", "sigma": 0.5})
  assert analyze.legend_label(small_results) == "fixed_sigma, σ = 0.5"
  results.write_metadata(small_results, {"certificate": "locally_constant",
                                         "estimator": {"grid": [0.25, 0.5, 1.0]}})
  assert analyze.legend_label(small_results) == "locally_constant, σ ∈ {0.25, 0.5, 1} per input"


def test_printed_radii_are_rounded_down(tmp_path):
  path = tmp_path / "r.tsv"
  writer = results.ResultsWriter(path)
  computed = [0.7071067811865476, 2.9999999, 1.23456789e-7, 0.0, 1.0]
  writer.write([{"idx": i, "label": 0, "predict": 0, "radius": r, "correct": 1, "time": 0.1,
                 "sigma": 0.25, "samples": 100} for i, r in enumerate(computed)])
  printed = results.read_results(path)["radius"]
  assert np.all(printed <= np.asarray(computed))
  np.testing.assert_allclose(printed, computed, rtol=1e-5)
  assert printed[1] == 2.99999  # not 3


@pytest.mark.parametrize("computed, shown", [
    (2 / 3, "0.666"), (0.12399999, "0.123"), (0.9999, "0.999"), (2.0005, "2.000"),
    (0.4265, "0.426"), (0.25, "0.250"), (1.0, "1.000"), (0.0, "0.000"), (-0.0001, "-0.001")])
def test_aggregates_print_rounded_down(computed, shown):
  assert results.format_down(computed, 3) == shown and float(shown) <= computed


def test_tables_and_tensorboard_never_show_an_aggregate_above_its_value(tmp_path, capsys):
  # Certified accuracy 2/3 at r = 0 and ACR 0.371999 / 3 = 0.1239997: `.3f` shows 0.667 and
  # 0.124, above them.
  path = write_rows(tmp_path / "r.tsv", [(0, 1, 1, 0.371999), (1, 2, 2, 0.0), (2, 0, 1, 0.5)],
                    {"certificate": "fixed_sigma"})
  summary = analyze.summarize(path, radii=(0.0, 0.5))
  assert summary["certified_accuracy"]["0"] == 2 / 3 and summary["acr"] == pytest.approx(0.1239997)
  assert analyze.markdown_table([summary], radii=(0.0, 0.5)).splitlines()[2].startswith(
      f"| {path} | 3 | 0.666 | 0.000 | 0.123 |")
  lines = tune.table({0.9: summary | {"default_sigma": 1.0, "moved": 0.5, "abstain": 0.0}}
                     ).splitlines()
  assert lines[2] == "| 0.9 | 0.666 | 0.000 | **0.123** | 1 | 50.0% | 0.0% |"
  # TensorBoard keeps float32: each value is stored as the largest float32 not above it.
  values = np.random.default_rng(0).uniform(0, 2, 200).tolist() + [2 / 3, summary["acr"]]
  writer = events.EventWriter(tmp_path, "certify")
  writer.write_scalars(0, {f"v{i}": v for i, v in enumerate(values)})
  writer.close()
  stored = np.array([event_values(tmp_path / "tensorboard" / "certify")[f"v{i}"][0][1]
                     for i in range(len(values))], np.float32)
  above = np.nextafter(stored, np.float32(np.inf)).astype(np.float64)
  assert np.all(stored.astype(np.float64) <= values) and np.all(above > values)
  assert np.mean(np.float32(values).astype(np.float64) > values) > 0.3  # nearest rounds up


def test_cli_errors_name_the_problem(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    analyze.main([str(tmp_path / "missing.tsv")])
  assert exit_.value.code == 2
  assert f"results file not found: {tmp_path / 'missing.tsv'}" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_:
    analyze.main([str(tmp_path / "x.tsv"), "--radii", "a,b"])
  assert exit_.value.code == 2
  assert "--radii must be comma-separated numbers; got 'a,b'" in capsys.readouterr().err
  (tmp_path / "bad.tsv").write_text("a\tb\n1\t2\n")
  with pytest.raises(SystemExit):
    analyze.main([str(tmp_path / "bad.tsv")])
  assert "is not a certification TSV" in capsys.readouterr().err


def test_writer_resumes_and_drops_a_torn_line(small_results):
  with small_results.open("a") as f:
    f.write("4\t1\t1\t0.")  # killed mid-write
  writer = results.ResultsWriter(small_results)
  assert writer.done == {0, 1, 2, 3}
  writer.write([dict(idx=4, label=1, predict=1, radius=0.5, correct=1, time=0.1, sigma=0.5, samples=100)])
  table = results.read_results(small_results)
  np.testing.assert_array_equal(table["idx"], [0, 1, 2, 3, 4])
  np.testing.assert_allclose(table["radius"], [0.8, 0.3, 0.0, 0.9, 0.5])


def write_rows(path, rows, metadata, sigmas=None):
  writer = results.ResultsWriter(path)
  sigmas = sigmas or [metadata.get("sigma", 0.5)] * len(rows)
  writer.write([dict(idx=i, label=y, predict=p, radius=r, correct=int(p == y), time=0.1,
                     sigma=s, samples=100) for (i, y, p, r), s in zip(rows, sigmas)])
  results.write_metadata(path, metadata)
  return path


def test_the_label_oracle_takes_the_largest_correct_radius_per_image(tmp_path, capsys):
  # Image 0: right at both σ (0.3 and 0.8: oracle 0.8); 1: right only at the small σ (0.4);
  # 2: right only at the large one (1.2); 3: wrong at both (0). ACRs 0.175, 0.5; oracle 0.6.
  small = write_rows(tmp_path / "small.tsv", [(0, 1, 1, 0.3), (1, 2, 2, 0.4), (2, 0, 1, 0.2),
                                              (3, 1, 0, 0.1)], {"certificate": "fixed_sigma"})
  large = write_rows(tmp_path / "large.tsv", [(3, 1, 2, 0.9), (0, 1, 1, 0.8), (1, 2, 0, 0.5),
                                              (2, 0, 0, 1.2)], {"certificate": "fixed_sigma"})
  chooser = write_rows(tmp_path / "chooser.tsv", [(0, 1, 1, 0.5), (1, 2, 2, 0.4),
                                                  (2, 0, 0, 0.7), (3, 1, 2, 0.0)],
                       {"certificate": "locally_constant"})
  oracle = analyze.oracle_summary([small, large], radii=(0.0, 0.5, 1.0))
  assert oracle["acr"] == pytest.approx((0.8 + 0.4 + 1.2) / 4)
  assert oracle["certified_accuracy"] == {"0": 0.75, "0.5": 0.5, "1": 0.25}
  assert oracle["sound"] is False  # it knows the label: no certificate
  assert analyze.main([str(chooser), "--oracle", str(small), str(large), "--radii", "0,0.5",
                       "--format", "json"]) == 0
  rows = json.loads(capsys.readouterr().out)
  assert [r["file"] for r in rows] == [str(small), str(large), str(chooser),
                                       "oracle over small.tsv, large.tsv"]
  shares = [r["oracle_gain_share"] for r in rows]
  assert shares == pytest.approx([(0.175 - 0.5) / 0.1, 0.0, (0.4 - 0.5) / 0.1, 1.0])
  analyze.main(["--oracle", str(small), str(large), "--radii", "0"])
  table = capsys.readouterr().out
  assert "| share of oracle gain |" in table and "| +1.00 | label oracle" in table
  other = write_rows(tmp_path / "other.tsv", [(0, 1, 1, 0.3), (5, 2, 2, 0.4)], {})
  with pytest.raises(SystemExit):
    analyze.main(["--oracle", str(small), str(other)])
  assert "same test images" in capsys.readouterr().err


def test_an_instance_wise_row_s_choices_and_price_are_read_off_the_fixed_sigma_files(tmp_path,
                                                                                    capsys):
  # The chooser certifies images 0 and 2 at σ = 1.0 (0.6, 1.0), 1 at 0.5 (0.3), 3 wrongly at
  # 0.5: ACR 0.475. Its choices on the experts' own rows: 0.8 + 0.4 + 1.2 + 0 → 0.6; price 0.125.
  small = write_rows(tmp_path / "small.tsv", [(0, 1, 1, 0.3), (1, 2, 2, 0.4), (2, 0, 1, 0.2),
                                              (3, 1, 0, 0.1)], {"sigma": 0.5})
  large = write_rows(tmp_path / "large.tsv", [(0, 1, 1, 0.8), (1, 2, 0, 0.5), (2, 0, 0, 1.2),
                                              (3, 1, 2, 0.9)], {"sigma": 1.0})
  rows = [(0, 1, 1, 0.6), (1, 2, 2, 0.3), (2, 0, 0, 1.0), (3, 1, 2, 0.0)]
  chooser = write_rows(tmp_path / "chooser.tsv", rows, {"certificate": "thresholded"},
                       sigmas=[1.0, 0.5, 1.0, 0.5])
  elsewhere = write_rows(tmp_path / "elsewhere.tsv", rows, {"certificate": "thresholded"},
                         sigmas=[1.0, 0.25, 1.0, 0.5])  # σ = 0.25 has no file: no price
  assert analyze.main([str(chooser), str(elsewhere), "--oracle", str(small), str(large),
                       "--format", "json"]) == 0
  summaries = {Path(r["file"]).stem: r for r in json.loads(capsys.readouterr().out)}
  assert summaries["chooser"]["acr"] == pytest.approx(0.475)
  assert summaries["chooser"]["choices_acr"] == pytest.approx(0.6)
  assert summaries["chooser"]["price"] == pytest.approx(0.125)
  assert not {"price", "choices_acr"} & (summaries["elsewhere"].keys() | summaries["small"].keys())
  analyze.main([str(chooser), "--oracle", str(small), str(large), "--radii", "0"])
  assert "| choices' ACR | price |" in capsys.readouterr().out
