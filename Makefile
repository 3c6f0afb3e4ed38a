# Drawbridge: `make demo` runs the drill in a namespace lab, `make test` runs every test.
# Both install what they need on a fresh Debian machine (as root) and are idempotent.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := nftables iproute2 openssh-server openssh-client prometheus fping conntrack \
	iptables iputils-ping procps python3-venv postgresql ansible-core \
	chromium poppler-utils fonts-dejavu-core
# conntrack: the agent tears down offloaded connections; postgresql: the tests start a
# throwaway server of their own (the system service is not used); ansible-core: the
# Ansible role's tests (deploy/ansible); chromium: the page's browser tests (driven by
# Playwright's pip package; no browser is ever downloaded); poppler-utils: pdftotext
# reads the PDF report back; fonts-dejavu-core: the PDF's font
BENCH_APT_PACKAGES := curl iperf3
# Playwright's pip package never downloads a browser by itself; say so anyway (Debian's
# chromium is used, see tests/lab/browser.py)
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

.PHONY: help deps venv demo test test-unit test-lab lint bench clean lab-down wheelhouse

help:
	@echo "make demo   - isolation drill in a throwaway namespace lab (root)"
	@echo "make test   - unit + lab tests (root)"
	@echo "make lint   - ruff + mypy"
	@echo "make bench  - benchmarks, results in BENCHMARKS.md format"
	@echo "make wheelhouse - the agent's wheel and every dependency in dist/wheelhouse (for offline gateways)"

deps: .stamp-apt
.stamp-apt: Makefile
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@# the Debian prometheus package starts a server on :9090; the tests run their own
	@# (postgresql: only its binaries are used, for a throwaway cluster per test run)
	@-systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
	@touch $@

# The project with the controller extra and the dev tools, and the namespace lab (its own
# package, never in the production wheel), both editable.
venv: $(BIN)/.installed
$(BIN)/.installed: pyproject.toml deploy/lab/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[controller,dev]' -e ./deploy/lab
	@touch $@

demo: deps venv
	$(BIN)/python -m drawbridge_lab.demo

test: deps venv
	$(BIN)/pytest -q -p no:cacheprovider

test-unit: venv
	$(BIN)/pytest -q tests/unit

test-lab: deps venv
	$(BIN)/pytest -q tests/lab

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: deps venv
	@for p in $(BENCH_APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$p); \
	done
	$(BIN)/python -m bench

# What a gateway without internet access installs from (deploy/ansible: drawbridge_agent_wheelhouse):
# drawbridge's wheel and the wheels of all its dependencies, fetched from the index.
# build/ goes first: setuptools would pack files left there by an older tree.
wheelhouse: venv
	rm -rf build dist/wheelhouse
	$(BIN)/pip wheel -q -w dist/wheelhouse .
	@ls dist/wheelhouse

lab-down: venv
	$(BIN)/drawbridge-lab down --all

clean:
	rm -rf $(VENV) .stamp-apt .pytest_cache .mypy_cache .ruff_cache build dist
