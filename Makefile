# Two commands on a fresh machine: `make lab` and `make test`. Each creates .venv if missing,
# installs the pinned CPU torch first (an unpinned torch would pull gigabytes of CUDA), then the
# package with the extras it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: test test-all lab bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN)

# The suite tests the lab too (its report draws with matplotlib) and the Hugging Face bridge, so
# both commands install the dev, lab and hf extras.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev,lab,hf]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

test-all: $(VENV)/.installed
	$(PY) -m pytest -q

LAB_OUT ?= lab_out

# The default suite (every finding, 3 seeds, <= 15 min on 2 CPU cores), then report.html /
# report.md and runs.jsonl (every run, for your own analysis) in $(LAB_OUT). Rerunning resumes:
# finished runs are skipped.
lab: $(VENV)/.installed
	$(VENV)/bin/causalmix lab run --suite default --out $(LAB_OUT)
	$(VENV)/bin/causalmix lab report --out $(LAB_OUT)
	$(VENV)/bin/causalmix lab export --out $(LAB_OUT) --format jsonl

# Every script in benchmarks/ (each prints ratios measured side by side in one run; see its
# --help; --quick is short). BENCH_ARGS=--quick passes a flag to all of them.
bench: $(VENV)/.installed
	@for f in benchmarks/[!_]*.py; do echo "== $$f"; $(PY) $$f $(BENCH_ARGS) || exit 1; done

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
