# The README's two commands: `make demo` and `make test`. Both set up what is missing first.
PYTHON ?= python3
VENV ?= .venv
VENV_TL3 ?= .venv-tl3
# CPU machines take the CPU build of torch that pip finds on this machine's disk; with an
# NVIDIA GPU visible, pip's default CUDA build. Override with `make TORCH_SPEC=... test`.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
PIP_FLAGS ?= -q --disable-pip-version-check

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PYTHONHASHSEED = 0

.PHONY: demo test test-fast install browser lint clean

# venv with torch first (so the open torch range installs nothing more), then the package.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/pip install $(PIP_FLAGS) "$(TORCH_SPEC)"
	$(VENV)/bin/pip install $(PIP_FLAGS) -e ".[dev]"
	touch $@

# The same, on the TransformerLens 3.9 line (where HookedTransformer still exists).
$(VENV_TL3)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_TL3)
	$(VENV_TL3)/bin/python -c "import torch" 2>/dev/null || $(VENV_TL3)/bin/pip install $(PIP_FLAGS) "$(TORCH_SPEC)"
	$(VENV_TL3)/bin/pip install $(PIP_FLAGS) -e ".[dev]" "transformer-lens>=3.9,<4"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	JAX_PLATFORMS=cpu $(VENV)/bin/bayescirc demo --out demo-out

# Headless Chromium for the report's browser test (Debian's package; needs root or sudo).
# Without it the browser test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null ) \
	  || echo "warning: could not install chromium; the report's browser test will be skipped"; }

# Test files run side by side, one per core (at most 4: each worker holds a fit's memory); a file
# stays on one worker, so its module fixtures (simulated data, fits) are made once.
# On 2 cores the TransformerLens 4 run took 9.2 min this way, 12.9 min one test at a time.
PYTEST_WORKERS ?= -n auto --maxprocesses=4 --dist loadfile

test: $(VENV)/.installed $(VENV_TL3)/.installed browser
	JAX_PLATFORMS=cpu $(VENV)/bin/python -m pytest $(PYTEST_WORKERS)
	JAX_PLATFORMS=cpu $(VENV_TL3)/bin/python -m pytest $(PYTEST_WORKERS) -m tl

test-fast: $(VENV)/.installed
	JAX_PLATFORMS=cpu $(VENV)/bin/python -m pytest $(PYTEST_WORKERS) -m "not slow and not browser"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check bayescirc tests benchmarks

clean:
	rm -rf $(VENV) $(VENV_TL3) build *.egg-info .pytest_cache
