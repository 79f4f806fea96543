# Thin wrapper over the CMake presets. `make run` and `make test` work on a fresh Debian 12 as root.
STATE ?= .kiln-state
MANIFESTS ?= examples/manifests

.PHONY: deps configure build test run bench asan clean

deps:
	@scripts/install-deps

configure: deps
	@cmake --preset default >/dev/null

build: configure
	@cmake --build --preset default

test: build
	@ctest --preset default

run: build
	@mkdir -p $(STATE)
	build/bin/kilnd --manifests $(MANIFESTS) --state $(STATE)

bench: build
	@scripts/install-deps --bench
	@cmake --build --preset default --target bench

# Unit and integration tests again under AddressSanitizer + UBSan (CI runs this after `make test`).
asan: deps
	@cmake --preset asan >/dev/null
	@cmake --build --preset asan
	@ctest --preset asan

clean:
	rm -rf build build-asan
