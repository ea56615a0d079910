# Two commands a newcomer needs: `make run` and `make test`. Everything else is here for them.
# `make test` also installs the system tools the suite runs for real (scripts/ensure-tools.sh).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench demo-upstream clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The API on PORT (3301) and the admin page on ADMIN_PORT (3300). Ctrl-C (or SIGTERM) sends each
# one SIGINT and waits while they drain; if either exits, the other is stopped too. The children
# run in their own sessions so the terminal's Ctrl-C reaches them once, through the trap.
run: SHELL := /bin/bash
run: $(STAMP)
	@setsid $(PY) -m service api & api=$$!; \
	setsid $(PY) -m service admin & admin=$$!; \
	stop() { kill -INT $$api $$admin 2>/dev/null; wait $$api $$admin; }; \
	trap 'stop; exit 0' INT TERM; \
	echo "API: http://$${HOST:-127.0.0.1}:$${PORT:-3301}  admin page: http://$${HOST:-127.0.0.1}:$${ADMIN_PORT:-3300}/"; \
	wait -n $$api $$admin; status=$$?; stop; exit $$status

demo-upstream: $(STAMP)
	$(PY) -m service.demo_upstream --port 8099

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: lint typecheck
	bash scripts/ensure-tools.sh
	bash scripts/pytest.sh

# Every scenario against direct, nginx and the service, plus the resume feature's rows (resume
# off, resume in Redis) and the OpenAI-compatible route's (S1, S2). Smoke run:
# make bench BENCH_ARGS=--quick
bench: $(STAMP)
	$(PY) -m bench --resume-rows --openai-rows $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
