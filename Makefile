# conn-tracer: run everything as root on a Debian 12 host.
.PHONY: setup setup-test serve trace check test lint bench bench-quick bench-reference

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

serve: setup
	.venv/bin/conn-tracer serve

trace: setup
	.venv/bin/conn-tracer trace

check: setup
	.venv/bin/conn-tracer check

test: setup-test
	.venv/bin/ruff check app tests bench
	.venv/bin/python -m pytest

# `make setup` installs only the runtime; the linters come on first use.
lint: setup
	@[ -x .venv/bin/ruff ] && [ -x .venv/bin/mypy ] || .venv/bin/pip install -q --disable-pip-version-check "ruff>=0.4" "mypy>=1.10"
	.venv/bin/ruff check app tests bench
	.venv/bin/mypy

bench: setup-test
	.venv/bin/python bench/run.py

bench-quick: setup-test
	.venv/bin/python bench/run.py --quick

# A full run that also replaces bench/results/reference.{json,txt}, the run the README quotes.
bench-reference: setup-test
	.venv/bin/python bench/run.py --save-reference
