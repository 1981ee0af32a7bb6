# Two entry points: `make demo` (the user story on this machine) and `make test` (the whole suite).
# Both create .venv themselves; as root they also install the Debian packages they need.

VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
PYTHON      ?= python3
# Real NBD clients and kernel plumbing the tests drive (nobody here wrote them), and the test VM: QEMU, a
# guest kernel, busybox and a C compiler for its static workload; libvirt for the tests of adopted domains (their
# fixture makes the libvirt-qemu user libvirtd needs, tests/libvirt_lab.py).
DEB_PACKAGES := qemu-utils libnbd-bin python3-libnbd fio nbdkit fuse3 python3-pyfuse3 e2fsprogs util-linux iproute2 nftables qemu-system-x86 linux-image-cloud-amd64 busybox-static gcc libc6-dev libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients

.PHONY: demo test test-all soak lint bench deps venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages (install them as root): $$missing"; exit 0; fi; \
	echo "installing Debian packages: $$missing"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null

demo: deps venv
	$(PY) demo/demo.py

test: deps venv
	$(VENV)/bin/ruff check p2pvbd tests bench demo
	$(PY) -m tests.layers
	$(VENV)/bin/pytest

# Everything, including the cases marked heavy.
test-all: deps venv
	$(VENV)/bin/pytest -m ''

bench: deps venv
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	$(PY) bench/nbd_datapath.py
	$(PY) bench/store_open.py
	$(PY) bench/dht_lookup.py
	$(PY) bench/multipeer_pull.py
	$(PY) bench/migration.py
	$(PY) bench/scale.py --json docs/scale.json

# The migration fault tests (the schedule of `make test` and 180 random runs), and 50 moves of a VM under
# disk, network and memory load that must neither crash it nor change its memory or disk.
soak: deps venv
	$(VENV)/bin/pytest -m '' tests/test_migrate_faults.py
	$(VENV)/bin/pytest -m '' -k 'survives_every_move' tests/test_vm_move.py

lint: venv
	$(VENV)/bin/ruff check p2pvbd tests bench demo
	$(PY) -m tests.layers

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
