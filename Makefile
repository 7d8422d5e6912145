# Two commands: `make demo` and `make test`. Both create .venv and install on first use.
SHELL := /bin/bash
PYTHON ?= python3
# pip prints one warning per missing local index folder on these machines; keep only what matters.
QUIET := 2>&1 | { grep -v "is ignored: it is neither" || true; }
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PY) -m pip install -q --upgrade pip $(QUIET)
	set -o pipefail; $(PY) -m pip install -q -r requirements.txt -e . $(QUIET)
	$(PY) -c "import ldlib, torch, diffusers; print('ldlib installed: torch', torch.__version__, 'diffusers', diffusers.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ldlib demo --out runs/demo

# The notebooks' parameters default to a real taef2 run; CI runs them small (LDLIB_<NAME> overrides, see ldlib.core.config.env).
NOTEBOOK_CI := LDLIB_PRESET=tiny LDLIB_STEPS=12 LDLIB_PROXY_STEPS=60 LDLIB_CROPS_PER_IMAGE=2 LDLIB_PER_LATENT=4 LDLIB_N_PAIRS=2

test: $(STAMP)
	$(NOTEBOOK_CI) $(PY) -m pytest -q --nbval-lax tests notebooks

bench: $(STAMP)
	$(PY) -m ldlib bench all

clean:
	rm -rf runs .pytest_cache
