# Two commands on a fresh machine (only Python 3.11+ needed): `make table1` (the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
export HF_HUB_OFFLINE = 1

.PHONY: install test table1 compactness figures export clean-nbs
install: $(VENV)/.installed
$(VENV)/.installed: setup.py settings.ini
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

test: install
	$(BIN)/python -m pytest -q tests

# Table 1 and the paper's figures on the embedded demo (quick mode), and the exported demo model (figures/demo_model/);
# outputs in figures/, executed notebooks in runs/
table1: install
	mkdir -p runs
	$(BIN)/papermill -k python3 --log-output nbs/paper/run_table1.ipynb runs/run_table1.ipynb
	$(BIN)/papermill -k python3 nbs/paper/run_fig_cover.ipynb runs/run_fig_cover.ipynb
	$(BIN)/papermill -k python3 nbs/paper/run_fig_classes.ipynb runs/run_fig_classes.ipynb
	$(BIN)/papermill -k python3 nbs/paper/run_export.ipynb runs/run_export.ipynb

# The full compactness grid behind Table 1's DINO-QPM Compact row (N_f* 10..60 x N_f^c 1..5, one dense phase per seed,
# reused from make table1's DINO-QPM runs); figures/compactness_full.{csv,png,pdf} and figures/compactness_full_table1.*
compactness: install
	mkdir -p runs
	$(BIN)/papermill -k python3 --log-output nbs/paper/run_compactness.ipynb runs/run_compactness.ipynb

export: install
	$(BIN)/nbdev_export

clean-nbs: install
	$(BIN)/nbdev_clean
