# The README's two commands: `make demo` (the main job) and `make test` (the suite). Both set up first.
VENV := .venv
PY := $(VENV)/bin/python
export MUJOCO_GL ?= egl

.PHONY: setup demo test lint protos
setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/vla-mbpo demo

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

protos: setup
	$(PY) -m protos.generate
