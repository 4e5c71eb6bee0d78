# isovisor — set-up, tests and demos. `make demo` and `make test` install what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Debian packages the project needs: assembler for test guests, QEMU as the conformance
# reference and benchmark peer, acpica for ACPI table checks, swtpm for the TPM,
# busybox-static for initramfs, lz4 for extracting the stock kernel, e2fsprogs for the
# ext4 image the test kernel mounts from virtio-blk; dnsmasq-base and nftables for tenant
# networks (DHCP, anti-spoofing); libtss2-dev (+ pkg-config, gcc) to
# build tpm2-pytss, which has no wheels, and the TCTIs it loads (swtpm, host /dev/tpmrm0);
# libssl-dev (+ gcc) for the native AES-XTS of encrypted disks (`make native`).
APT_PACKAGES := nasm qemu-system-x86 acpica-tools swtpm swtpm-tools busybox-static lz4 \
                python3-venv libseccomp2 e2fsprogs dnsmasq-base nftables \
                libtss2-dev libtss2-tctildr0 libtss2-tcti-swtpm0 libtss2-tcti-device0 pkg-config gcc \
                libssl-dev

GUEST_SRCS := $(wildcard guests/*.asm)
GUEST_ELFS := $(patsubst guests/%.asm,guests/build/%.elf,$(GUEST_SRCS))

.PHONY: setup system-deps venv guests native dev-integrity demo test test-slow lint bench guest-linux clean help fuzz security-report

help:
	@echo "make demo        install what is missing, boot a guest, then the daemon demo"
	@echo "make test        install what is missing, run the test suite"
	@echo "make test-slow   stock Linux boots under this host's emulation (minutes)"
	@echo "make lint        ruff + mypy (strict on kvm, memory, devices, security)"
	@echo "make native      build the encrypted disks' AES-XTS library (part of setup)"
	@echo "make bench       exit-rate benchmark against QEMU, writes bench/RESULTS.md"
	@echo "make guest-linux fetch and cache Debian's cloud kernel (apt-get download) and build its virtio-module initramfs"
	@echo "make fuzz        run every fuzz harness for FUZZ_SECONDS each (default 30; FUZZ_HARNESSES=...)"
	@echo "make security-report  attack-surface coverage: threat model, harnesses, fuzz runs, findings"

setup: system-deps venv guests native dev-integrity

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(VENV)/.stamp: pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.stamp

guests/build/%.elf: guests/%.asm guests/include/*.inc
	@mkdir -p guests/build
	nasm -f elf32 -I guests/include/ -o guests/build/$*.o $<
	ld -m elf_i386 -T guests/guest.ld -o $@ guests/build/$*.o
	@rm -f guests/build/$*.o

guests: system-deps $(GUEST_ELFS)

# Encrypted disks' AES-XTS (isovisor/devices/diskcrypt/xts_native.c): a shared library
# beside its source, loaded by path with ctypes; OpenSSL's libcrypto does the AES.
XTS_LIB := isovisor/devices/diskcrypt/libisovisor_xts.so

$(XTS_LIB): isovisor/devices/diskcrypt/xts_native.c | system-deps
	gcc -std=c11 -O3 -fPIC -shared -Wall -Wextra -Werror -fstack-protector-strong \
	    -D_FORTIFY_SOURCE=2 -Wl,-z,relro,-z,now -Wl,-z,noexecstack -o $@ $< -lcrypto

native: $(XTS_LIB)

# VMM and platform integrity for development (docs/INTEGRITY.md): a release key and a
# policy key made once in .isovisor/ (git-ignored, 0700, keys 0600), the code manifest
# signed again whenever the code changed, and a signed policy accepting this host as it is.
# `isovisor daemon run --config .isovisor/isovisord.toml` gates every VM launch with them.
INTEGRITY_DIR := .isovisor

dev-integrity: venv
	$(VENV)/bin/isovisor integrity dev-setup --dir $(INTEGRITY_DIR)

# The main job with embedded defaults: one guest booted directly, then the daemon, its
# launch gate on (.isovisor's manifest and policy, a swtpm it starts), with two tenants
# whose administrators each boot a VM through the mutual-TLS API, and one launch refused.
demo: setup
	$(VENV)/bin/isovisor run --kernel guests/build/hello.elf
	$(PY) -m isovisor.host.demo

test: setup
	$(PY) -m pytest -q --durations=15

test-slow: setup
	$(PY) -m pytest -q -m slow --timeout 1800

lint: setup
	$(VENV)/bin/ruff check isovisor tests bench
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/exits.py

guest-linux: system-deps venv
	$(PY) -m isovisor.tools.guest_linux

# Fuzzing (fuzz/README.md): each harness in fuzz/harnesses/ for FUZZ_SECONDS; stats go to
# cache/fuzz/, crashes to fuzz/findings/. Every harness runs; the target fails if any did.
FUZZ_SECONDS ?= 30
FUZZ_HARNESSES ?= $(sort $(basename $(notdir $(filter-out %/__init__.py,$(wildcard fuzz/harnesses/*.py)))))

fuzz: venv
	@mkdir -p cache/fuzz; failed=""; for h in $(FUZZ_HARNESSES); do \
	  echo "fuzz $$h: $(FUZZ_SECONDS) s"; \
	  $(PY) -m fuzz.run $$h --seconds $(FUZZ_SECONDS) >cache/fuzz/$$h.log 2>&1 \
	    || { echo "fuzz $$h: FAILED (cache/fuzz/$$h.log, fuzz/findings/)"; failed="$$failed $$h"; }; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: failed:$$failed"; exit 1; fi

security-report: venv
	$(PY) -m isovisor.security.report

clean:
	rm -rf guests/build $(XTS_LIB) $(VENV) .pytest_cache .mypy_cache
