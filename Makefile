# `make demo` and `make test` work on a fresh Debian 12 machine as root: both install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# debootstrap + keyring: builds; gnupg: gpgv and the test keys; zstd/xz: unpacking in tests; openssh-client:
# ssh-keygen in the key-scan tests; python3-venv: the virtual environment on Debian's own python3;
# systemd-container: systemd-pull, which the tests use to show systemd can verify what we publish, and
# systemd-nspawn; lxc, uidmap (newuidmap), dnsmasq-base, iproute2: `tmplbuild test` and its tests; skopeo: the OCI
# channel (push, pull, the stock verification the tests and the demo run); docker-registry: the Distribution
# registry the tests and the demo start on 127.0.0.1; umoci and jq: lxc-oci (`lxc-create -t oci`), which the tests
# run; apache2-utils: htpasswd, for the registry-authentication test; qemu-user-static and binfmt-support: arm64
# and armhf builds and boot tests on an amd64 host (binfmt_misc, the `binfmt` target).
APT_PACKAGES := debootstrap debian-archive-keyring gnupg zstd xz-utils openssh-client python3-venv ca-certificates \
	systemd-container lxc uidmap dnsmasq-base iproute2 skopeo docker-registry umoci jq apache2-utils \
	qemu-user-static binfmt-support

.PHONY: all system-deps subids binfmt venv test test-all test-fast demo bench bench-serve bench-fetch bench-publish clean

all: test

system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Root's subordinate id range (root:100000:65536, as Proxmox VE sets it): unprivileged containers, the Proxmox
# default, are tested and demonstrated on a fresh machine too. Idempotent; an existing range is never touched.
subids:
	@sh contrib/subids.sh

# binfmt_misc mounted and qemu-user-static's entries enabled: foreign architectures build and boot here.
binfmt:
	@sh contrib/binfmt.sh

test: system-deps venv subids binfmt
	$(PY) -m pytest -q

# Every architecture the shipped recipes list, booted under emulation too (arm64 is in `make test`; armhf here).
test-all: system-deps venv subids binfmt
	TMPLBUILD_TEST_ARCHES=arm64,armhf $(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not build"

demo: system-deps venv subids
	PYTHON=$(PY) sh contrib/demo.sh

bench: system-deps venv
	@command -v mmdebstrap >/dev/null || (apt-get update -q && apt-get install -y -q mmdebstrap)
	$(PY) bench/build.py

bench-serve: system-deps venv
	@command -v nginx >/dev/null && command -v wrk >/dev/null && command -v curl >/dev/null || \
		(apt-get update -q && apt-get install -y -q nginx wrk curl)
	$(PY) bench/serve.py

bench-fetch: system-deps venv
	@command -v nginx >/dev/null && command -v curl >/dev/null || (apt-get update -q && apt-get install -y -q nginx curl)
	$(PY) bench/fetch.py

bench-publish: system-deps venv
	$(PY) bench/publish.py

clean:
	rm -rf $(VENV) out .pytest_cache
