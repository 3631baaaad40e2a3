# `make demo` and `make test` work on a fresh machine: both install what they need first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUILD := build
DEMO_RUN := $(BUILD)/demo-run

.PHONY: install browser cloud-venv demo test lint bench clean

install: $(VENV)/.installed

# A stamp file: a second `make install` does nothing unless the package metadata changed.
$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# SkyPilot, for the tests that read cloud/*.yaml with its own parser, in a venv of its own: it pins
# click < 8.2, which wandb refuses.
cloud-venv: .venv-cloud/.installed

.venv-cloud/.installed:
	test -x .venv-cloud/bin/python || $(PYTHON) -m venv .venv-cloud
	.venv-cloud/bin/python -m pip install --quiet 'skypilot==0.14.1'
	touch $@

# The browser tests drive Debian's headless Chromium; install it where we may (root), else say how.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "the browser tests need Chromium: sudo apt-get install chromium chromium-driver"; fi

$(BUILD)/sample/.done: shard_tools/sample.py | install
	$(PY) -m shard_tools.sample $(BUILD)/sample
	touch $@

demo: install $(BUILD)/sample/.done
	$(VENV)/bin/shard-imagenet $(BUILD)/sample $(BUILD)/shards --shard-size 64 --overwrite --quiet
	$(PY) train.py --dali --data $(BUILD)/shards --config configs/cpu-demo.yaml --out $(DEMO_RUN) --overwrite --device cpu --no-wandb --spot off
	$(PY) evaluate.py --checkpoint $(DEMO_RUN)/best.pt --data $(BUILD)/shards --dali --device cpu
	@echo ""
	@echo "checkpoint:  $(DEMO_RUN)/best.pt  (last.pt, final_weights.pt beside it)"
	@echo "metrics:     $(DEMO_RUN)/metrics.jsonl"
	@echo "report:      file://$(CURDIR)/$(DEMO_RUN)/report.html"
	@echo "the demo:    $(PY) app.py --checkpoint $(DEMO_RUN)/best.pt   (then open http://127.0.0.1:7860)"

# Two test processes (pytest-xdist), each taking the next test as it frees up (worksteal: the
# long end-to-end tests start first and the short ones fill the gaps). The runs several tests share
# are built once for all workers (conftest.built_once). `make test` runs everything (~3.5 min on 2
# cores); `.venv/bin/python -m pytest -n auto -m "not slow"` is the quick loop (~1 min).
test: install browser cloud-venv lint
	$(PY) -m pytest -q -n auto --dist worksteal

# ruff's checks (pyproject.toml: line length 120, pyflakes, pycodestyle, import order, bugbear), then vermin: no
# API newer than setup.cfg's python_requires floor (the tests run on one newer Python: they cannot see it).
PYTHON_FLOOR := $(shell sed -n 's/^python_requires *= *>= *\([0-9.]*\).*/\1/p' setup.cfg)
FLOOR_CHECKED ?= dali_imagenet shard_tools benchmarks standins $(wildcard *.py)
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/vermin --quiet --no-tips --violations --target=$(PYTHON_FLOOR)- $(FLOOR_CHECKED)

bench: install
	$(PY) -m benchmarks

clean:
	rm -rf $(BUILD)
