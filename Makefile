PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-slow demo bench bench-accelerator clean fashion-mnist

FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_DIR ?= runs/demo
DEMO_CONFIG ?= configs/fashion_mnist_demo.py
SEQ_IMAGES ?= 500

setup: $(STAMP)

# --no-compile: Python compiles the modules a process imports on first use instead of every
# module of every package at install (95 s against 39 s for the install on Zen 3).
$(STAMP): pyproject.toml requirements.txt bench/requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -e '.[test]' -r bench/requirements.txt
	touch $(STAMP)

# Two workers, the two cores of the CI machine, each taking whole test files (so a file's
# module fixtures, such as a trained toy run, are made once); torch is installed here, so
# its tests must not be skipped. `make test` leaves out the tests marked slow (at least one
# test of every file stays); `make test-slow` runs those, and .ci/run runs both.
PYTEST := INSTARS_REQUIRE_TORCH=1 $(PY) -m pytest -q -n 2 --dist loadfile --durations=10
test: setup
	$(PYTEST) -m "not slow"

test-slow: setup
	$(PYTEST) -m slow

fashion-mnist:
	@test -f $(FASHION_MNIST) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

# The three processes share JAX's persistent compilation cache. certify.py reads the run from
# its workdir: the demo's base model at every σ of its grid in one process (the fair
# comparison), then the sound instance-wise certificate; analyze puts them in one table and
# one plot with the label oracle over the grid.
demo: export JAX_COMPILATION_CACHE_DIR := $(abspath $(DEMO_DIR)/../.jax_cache)
demo: setup fashion-mnist
	$(PY) train.py --config=$(DEMO_CONFIG) --workdir=$(DEMO_DIR)
	$(PY) certify.py --workdir=$(DEMO_DIR) --config.certify.sigma_mode=grid
	$(PY) certify.py --workdir=$(DEMO_DIR) --config.certify.sigma_mode=instance
	@echo "== one base model at each grid σ, the sound instance-wise certificate, the label oracle =="
	$(PY) -m instars_jax.analyze $(DEMO_DIR)/certify/locally_constant.tsv \
	  --oracle $(DEMO_DIR)/certify/sigma_0.25.tsv $(DEMO_DIR)/certify/sigma_0.5.tsv $(DEMO_DIR)/certify/sigma_1.tsv \
	  --radii 0,0.25,0.5,0.75,1,1.5,2 --plot $(DEMO_DIR)/certified_accuracy.png --sigma-hist $(DEMO_DIR)/chosen_sigma.png
	@echo "plots: $(DEMO_DIR)/certified_accuracy.png $(DEMO_DIR)/chosen_sigma.png"

bench: setup fashion-mnist
	$(PY) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	cd bench && PYTHONPATH=.. ../$(PY) certify_throughput.py --models lenet,resnet20,resnet110
	cd bench && PYTHONPATH=.. ../$(PY) train_throughput.py
	cd bench && PYTHONPATH=.. ../$(PY) search_share.py
	cd bench && PYTHONPATH=.. ../$(PY) table_update_cost.py
	cd bench && PYTHONPATH=.. ../$(PY) cohen_loop.py
	cd bench && PYTHONPATH=.. ../$(PY) bf16_agreement.py
	cd bench && PYTHONPATH=.. ../$(PY) input_pipeline.py
	$(PY) train.py --config=$(DEMO_CONFIG) --workdir=$(DEMO_DIR)  # the demo model (resumes if done)
	cd bench && PYTHONPATH=.. ../$(PY) sequential.py --workdir ../$(DEMO_DIR) --images $(SEQ_IMAGES)

# The GPU figures in one prepared script (bench/accelerator.py, ≤ 8 minutes on one H100/H200):
# the profile, the ablation against torch.compile, the MACER and SmoothAdv recipe rows, then
# Cohen's CIFAR-10 run while time is left; one JSON line per part in runs/accelerator.jsonl.
# A device machine has no network: ACCEL_PY=python3 runs it with the machine's own packages.
ACCEL_PY ?= $(abspath $(PY))
bench-accelerator:
	cd bench && PYTHONPATH=.. $(ACCEL_PY) accelerator.py --out ../runs/accelerator.jsonl \
	  --dir ../runs/accelerator

clean:
	rm -rf $(VENV) build *.egg-info
