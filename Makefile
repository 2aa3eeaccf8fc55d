# Two commands matter: `make lab` (the gateway in front of a real KDC and backend) and `make test`.
# Both start with `make setup`, which installs what is missing and is cheap when nothing is.
SHELL := /bin/bash
PY := .venv/bin/python
DEBS := krb5-kdc krb5-admin-server krb5-kdc-ldap krb5-user libkrb5-dev slapd ldap-utils \
        gcc make curl openssl python3-venv python3-dev
STAMP := .venv/.installed

.PHONY: setup debs lab lab-down test lint unit integration clean

setup: debs $(STAMP)

debs:
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

lab: setup
	$(PY) -m proxy lab up
	$(PY) -m proxy run --config config/lab.toml

lab-down:
	$(PY) -m proxy lab down

lint: setup
	.venv/bin/ruff check proxy tests
	.venv/bin/ruff format --check proxy tests
	.venv/bin/mypy

test: lint
	.venv/bin/pytest -q

clean:
	-$(PY) -m proxy lab down
	rm -rf .venv .lab
