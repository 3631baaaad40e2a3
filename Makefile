# `make demo` and `make test` work on a fresh machine: both install what they need first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUILD := build

.PHONY: install demo test bench clean

install: $(VENV)/.installed

# A stamp file: a second `make install` does nothing unless the package metadata changed.
$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(BUILD)/sample/.done: shard_tools/sample.py | install
	$(PY) -m shard_tools.sample $(BUILD)/sample
	touch $@

demo: install $(BUILD)/sample/.done
	$(VENV)/bin/shard-imagenet $(BUILD)/sample $(BUILD)/shards --shard-size 64 --overwrite --quiet
	rm -rf $(BUILD)/demo-run
	$(PY) train.py --dali --data $(BUILD)/shards --config configs/cpu-demo.yaml --out $(BUILD)/demo-run --device cpu --no-wandb
	$(PY) evaluate.py --checkpoint $(BUILD)/demo-run/best.pt --data $(BUILD)/shards --dali --device cpu

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m benchmarks

clean:
	rm -rf $(BUILD)
