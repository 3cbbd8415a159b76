# Every target creates .venv when missing; nothing needs installing by hand.
PY       ?= python3
VENV     := .venv
VPY      := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
PIP      := $(VPY) -m pip install -q -c constraints.txt

.PHONY: install pretrain-smoke test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	@command -v mpirun >/dev/null 2>&1 || { \
	  echo "installing openmpi (mpirun, libmpi) through apt"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openmpi-bin libopenmpi-dev) >/dev/null \
	  || echo "warning: could not apt-get install openmpi; MPI launch will be unavailable"; }
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	@# torch alone and first: pip then takes the local CPU build (see environment.md).
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

pretrain-smoke: $(STAMP)
	$(VPY) -m pretrain.smoke

test: $(STAMP)
	$(VPY) -m pytest -q tests

test-fast: $(STAMP)
	$(VPY) -m pytest -q tests/unit

bench: $(STAMP)
	$(VPY) bench/preprocess.py

clean:
	rm -rf $(VENV) runs smoke
