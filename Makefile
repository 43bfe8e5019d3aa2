# Set-up and the two jobs of README.md. Every target makes the virtual environment
# first: torch==2.13.0 (its CPU wheel) before anything that depends on torch, so pip
# never pulls a multi-GB CUDA build, then the project with its test extra.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.smallfed-installed

.PHONY: simulate test clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

simulate: $(STAMP)
	$(VENV)/bin/smallfed simulate

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
