# Two commands on a fresh machine: `make run` and `make test`.
# The venv is rebuilt only when a requirements file changes (the stamp), so later runs work offline.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8000
HOST   ?= 127.0.0.1
export PORT HOST

.PHONY: run test lint migrate bench bench-smoke clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

migrate: $(STAMP)
	$(BIN)/flask --app wsgi db upgrade

run: migrate
	exec $(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# The relay benchmark (bench/README.md): direct vs chatapp (SQLite, PostgreSQL) vs LiteLLM, under 10 minutes.
bench: $(STAMP)
	$(BIN)/python bench/run.py

# A short run of the same harness (direct and chatapp on SQLite, tiny loads), of the A/B's and of the
# profiler's, for CI.
bench-smoke: $(STAMP)
	$(BIN)/python bench/run.py --smoke
	$(BIN)/python bench/ab.py HEAD --smoke
	$(BIN)/python bench/profile.py reply --smoke

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
