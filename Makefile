# Two commands matter: `make lab` (the gateway in front of a real KDC and backend) and `make test`.
# Both start with `make setup`, which installs what is missing and is cheap when nothing is.
SHELL := /bin/bash
PY := .venv/bin/python
# docker.io (dockerd 20.10), docker-compose (v1), mmdebstrap, tini and iptables: `make test` builds and runs
# the compose lab on a real engine (tests/integration/test_compose.py starts dockerd when none runs), and
# `make base-image` makes debian:bookworm-slim where no registry is reachable. systemd: the unit's check
# (`systemd-analyze verify`). chromium: the trace page's browser test.
# libldap2-dev, libsasl2-dev: bonsai (the directory client) builds against them when pip has no wheel;
# libsasl2-modules-gssapi-mit: its SASL GSSAPI bind ([directory] bind = "kerberos").
# apache2, libapache2-mod-auth-gssapi: a Negotiate acceptor that is not our code (tests/integration/
# test_independent_acceptor.py); no Apache service is started (policy-rc.d below), the test runs its own.
# haproxy: tests/integration/test_balancer.py puts it (TCP mode, send-proxy-v2) in front of two gateways.
# samba ... ldb-tools: the Active Directory realm (`make lab-ad`); samba-ad-provision is only a Recommends of
# samba-ad-dc, and provisioning fails without it. iproute2: the AD realm's network namespace.
# faketime: tests/integration/test_ad_clock_skew.py runs one gateway with its wall clock shifted (libfaketime).
# podman catatonit netavark aardvark-dns: the compose lab on Podman (docs/containers.md, "Podman";
# tests/integration/test_podman.py): catatonit is its init for `init: true`, netavark and aardvark-dns the network
# stack that resolves service names; all three only Recommends of podman, which --no-install-recommends leaves out.
DEBS := krb5-kdc krb5-admin-server krb5-kdc-ldap krb5-user libkrb5-dev slapd ldap-utils \
        gcc make curl openssl python3-venv python3-dev \
        docker.io docker-compose mmdebstrap tini iptables systemd chromium \
        podman catatonit netavark aardvark-dns \
        samba samba-ad-dc samba-ad-provision ldb-tools iproute2 haproxy \
        libldap2-dev libsasl2-dev libsasl2-modules-gssapi-mit apache2 libapache2-mod-auth-gssapi faketime
STAMP := .venv/.installed
# Where `kcd-proxy lab up` puts the lab (KCD_LAB_DIR, as it reads it); `make lab` serves the gateway.toml it writes
# there, with the lab's own ports and files (config/lab.toml is its twin for the default .lab only).
LAB_DIR := $(or $(KCD_LAB_DIR),.lab)

.PHONY: setup debs lab lab-ad lab-down test lint unit integration clean bench bench-setup base-image

# proxy/'s bytecode, written here: an editable install compiles none, and where PYTHONDONTWRITEBYTECODE is set (these
# machines' shells) every `python -m proxy` (a gateway, a worker, each CLI command) compiled all of proxy/ from source
# again: 0.16 s of CPU a start out of 0.68 (min of 15, load 6). Python still reads it there; a file edited since is
# compiled again in memory until the next `make`.
setup: debs $(STAMP)
	@$(PY) -m compileall -q proxy

# Installs the missing ones of the packages named in $(1); no service is started meanwhile (policy-rc.d), with
# systemd or with init scripts (apache2, slapd and krb5-kdc would otherwise start on their default ports).
define install_missing
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1; \
	  fi; \
	  apt-get -o DPkg::Lock::Timeout=900 update -q && \
	  apt-get -o DPkg::Lock::Timeout=900 install -y -q --no-install-recommends $$missing; rc=$$?; \
	  if [ -n "$$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
	  exit $$rc; \
	fi
endef

debs:
	$(call install_missing,$(DEBS))

# constraints.txt pins every Python dependency (the images install with it too).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

# debian:bookworm-slim made from the Debian archive the host uses, when the engine lacks it (no registry).
# Needs a running engine: on Debian 12 with systemd `systemctl start docker`; without systemd
# `dockerd --host=unix:///var/run/docker.sock &` (as root).
base-image: debs
	deploy/base-image.sh

lab: setup
	$(PY) -m proxy lab up
	$(PY) -m proxy run --config $(LAB_DIR)/gateway.toml

# The Samba AD DC realm AD.TEST in a network namespace of its own; the gateway runs in there too (the DC
# listens nowhere else). `lab up --ad` prints a curl to paste, in its `ip netns exec` form.
lab-ad: setup
	$(PY) -m proxy lab up --ad
	ip netns exec $$(cat $(LAB_DIR)/ad/netns) $(PY) -m proxy run --config $(LAB_DIR)/ad/gateway.toml

lab-down:
	$(PY) -m proxy lab down

lint: setup
	.venv/bin/ruff check proxy tests bench
	.venv/bin/ruff format --check proxy tests bench
	.venv/bin/mypy

# Four workers on two cores, one test file each at a time (--dist loadfile): each brings up its own lab on free
# ports. Four, because the suite mostly waits (timers, retries, held requests): with three, a quiet fresh clone kept
# the two cores 51% busy on average (docs/testing.md, "Long tests"). --no-loadscope-reorder: the files in tests/conftest.py's order, those
# with `slow` tests first (the Ping test from the start, beside the rest of the suite, not after it; xdist's own
# order, most tests first, started it last). bench-setup: a tiny `make bench` run is part of the suite
# (tests/integration/test_bench_smoke.py), so nginx and wrk are installed for it.
# env -u PYTHONDONTWRITEBYTECODE: where it is set (these machines' shells), no bytecode of tests/ (imported by the
# scripts tests run) nor pytest's rewritten test modules was ever kept: each worker rewrote every test file again
# (8.7 s of CPU a worker against 2.7 s with its cache, docs/testing.md, "What a start costs").
test: lint bench-setup
	env -u PYTHONDONTWRITEBYTECODE .venv/bin/pytest -q -n 4 --dist loadfile --no-loadscope-reorder

# `make bench`: kcd-proxy against nginx, side by side (bench/run.py; about nine minutes; only its tiny smoke run is in `make test`).
BENCH_DEBS := nginx-light wrk gcc libssl-dev curl util-linux heaptrack valgrind

bench-setup:
	$(call install_missing,$(BENCH_DEBS))

bench: setup bench-setup
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	-$(PY) -m proxy lab down
	rm -rf .venv .lab
