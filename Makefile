# make run   — build the default pipeline (synthetic cohort -> reports) in a local venv
# make test  — the test suite (what CI runs)
# make lint  — snakemake --lint and snakefmt --check (both also run by the tests)
# make experiments — the article's Table 2 settings side by side (config/paper_table2.yaml)
# make small-data  — its small-data claim: each labelling on 2, 4, 8 and all training scans
#                    (config/paper_small_data.yaml)
PYTHON ?= python3
VENV   ?= .venv
CORES  ?= 2
BIN     = $(VENV)/bin

.PHONY: run test lint experiments small-data install clean

$(BIN)/snakemake: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,slurm]"
	touch $(BIN)/snakemake

install: $(BIN)/snakemake

run: install
	$(BIN)/snakemake --cores $(CORES)

experiments: install
	$(BIN)/snakemake experiments --cores $(CORES) --configfile config/paper_table2.yaml

small-data: install
	$(BIN)/snakemake experiments --cores $(CORES) --configfile config/paper_small_data.yaml

test: install
	$(BIN)/python -m pytest tests -v --durations=15

lint: install
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check .

clean:
	rm -rf results .snakemake
