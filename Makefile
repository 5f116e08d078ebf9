# One command on a fresh machine: `make run` (serve the example bank) or
# `make test` (the whole test suite). Each creates .venv first if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATADIR ?= var/bank
USERS ?= var/users
PB ?= tcp:8789:interface=127.0.0.1

.PHONY: venv run test lint bench clean

$(BIN)/.installed: setup.cfg setup.py pyproject.toml txjournal/_speedups.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# compat mode puts the checkout itself on sys.path, which is what lets
	# Twisted's plugin scan find twisted/plugins/txjournal_plugin.py.
	$(BIN)/python -m pip install --quiet --config-settings editable_mode=compat -e '.[test,dev,tls]'
	touch $@

venv: $(BIN)/.installed

run: venv
	mkdir -p -m 700 var
	# First run only: a generated password for admin, kept private in var/.
	test -e $(USERS) || { (umask 077 && $(BIN)/python -c "import secrets; print(secrets.token_urlsafe(24))" > var/admin.password) && $(BIN)/python -m txjournal adduser --users $(USERS) --password-file var/admin.password admin rw; }
	$(BIN)/twistd -n journal --app examples.bank:bank --datadir $(DATADIR) --users $(USERS) --pb $(PB) --snapshot-interval 300

test: venv
	$(BIN)/python -m pytest
	# The pure-Python fallbacks of the C speedups, against the same tests.
	TXJOURNAL_PURE_PYTHON=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_record.py tests/test_fastpaths.py tests/test_speedups.py tests/test_replaying.py tests/test_engine.py tests/test_service.py tests/test_journal_file.py

lint: venv
	$(BIN)/ruff check txjournal tests examples twisted bench
	$(BIN)/mypy

bench: venv
	$(BIN)/python -m pip install --quiet --config-settings editable_mode=compat -e '.[bench]'
	$(BIN)/python bench/run_all.py --quick

clean:
	rm -rf $(VENV) build dist *.egg-info
