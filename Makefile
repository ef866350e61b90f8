# Two commands do everything on a fresh machine:
#   make app    set up .venv if missing, install, start the dashboard
#   make test   set up .venv if missing, install, run every test
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PORT ?= 8501
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: app test bench lint

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

# On a laptop a viewer may download a missing torchvision dataset; a hosted server leaves
# QP_ALLOW_DATA_DOWNLOAD unset (off), so that no viewer makes it fetch and write.
app: $(STAMP)
	QP_ALLOW_DATA_DOWNLOAD=$${QP_ALLOW_DATA_DOWNLOAD:-1} $(VENV)/bin/streamlit run app.py --server.port $(PORT)

test: $(STAMP)
	bash scripts/ensure_chromium.sh
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m qcore bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .
