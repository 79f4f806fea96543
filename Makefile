# Thin wrapper over the CMake presets. `make run` and `make test` work on a fresh Debian 12 as root.
STATE ?= .kiln-state
MANIFESTS ?= examples/manifests

.PHONY: deps configure build test dev chaos run install package package-test bench asan fuzz format format-check tidy clean

deps:
	@scripts/install-deps

configure: deps
	@cmake --preset default >/dev/null

build: configure
	@cmake --build --preset default

test: build
	@ctest --preset default

# The fast developer build: -O0, mold (or lld), its own build-dev/; `ctest --preset dev` tests it.
dev:
	@scripts/install-deps --dev || echo "make dev: mold is missing; linking with lld or GNU ld"
	@cmake --preset dev >/dev/null
	@cmake --build --preset dev

# The long chaos run: kilnd SIGKILLed CHAOS_ITERATIONS times at random moments (the short version
# runs in `make test`). KILN_CHAOS_SEED=N repeats a run's choices; see docs/testing.md.
CHAOS_ITERATIONS ?= 200
chaos: build
	@KILN_CHAOS_ITERATIONS=$(CHAOS_ITERATIONS) build/bin/kiln_chaos_tests --durations yes "[chaos]"

# The demo. Ctrl-C stops the instances and kiln-proxy it started, then kilnd (a kilnd run by
# systemd leaves them running across its restarts instead); a second Ctrl-C exits at once.
run: build
	@mkdir -p $(STATE)
	build/bin/kilnd --manifests $(MANIFESTS) --state $(STATE) --stop-instances-on-exit

# kilnd, kilnctl and kiln-proxy into PREFIX/bin, the systemd unit, the example config, the
# monitoring files and the docs (packaging/install.cmake lists where). DESTDIR stages it.
PREFIX ?= /usr/local
install: build
	@DESTDIR=$(DESTDIR) cmake --install build --prefix $(PREFIX)

# build/kiln_VERSION_ARCH.deb (CPack; Depends from dpkg-shlibdeps).
package: build
	@cd build && rm -f kiln_*.deb && cpack -G DEB >/dev/null && ls -1 "$$PWD"/kiln_*.deb

# Builds the binaries and that .deb, installs it on this machine, runs the installed kilnd on a temporary directory, removes
# it again (root; CI runs it; refuses when a kiln package is installed already).
package-test: configure
	@scripts/package-test

bench: build
	@scripts/install-deps --bench
	@cmake --build --preset default --target bench

# Unit and integration tests again under AddressSanitizer + UBSan (CI runs this after `make test`).
asan: deps
	@cmake --preset asan >/dev/null
	@cmake --build --preset asan
	@ctest --preset asan

# The manifest loader under libFuzzer + ASan + UBSan (clang), FUZZ_SECONDS long, from the committed
# seeds in fuzz/corpus/manifest (new inputs go to build-fuzz/corpus, never into the repository).
# Fails on a crash, a leak, an input slower than 1 s or more than 512 MB; the input that did it is
# written to build-fuzz/crashes/ (commit it to fuzz/corpus/manifest as a regression seed).
# fuzz/lsan.supp says which leak inside libfyaml itself is known and why it is suppressed.
FUZZ_SECONDS ?= 60
fuzz:
	@scripts/install-deps --fuzz
	@cmake --preset fuzz >/dev/null
	@cmake --build --preset fuzz
	@mkdir -p build-fuzz/corpus/manifest build-fuzz/crashes
	LSAN_OPTIONS=suppressions=$(CURDIR)/fuzz/lsan.supp:print_suppressions=0 \
	  build-fuzz/bin/manifest_fuzzer build-fuzz/corpus/manifest fuzz/corpus/manifest \
	  -max_total_time=$(FUZZ_SECONDS) -timeout=1 -rss_limit_mb=512 -malloc_limit_mb=512 \
	  -max_len=131072 -print_final_stats=1 -artifact_prefix=build-fuzz/crashes/

# Every C++ file is formatted by .clang-format (Google style, 100 columns); CI checks it.
SOURCES = $(shell git ls-files '*.h' '*.cc')
format:
	@scripts/install-deps --lint
	@clang-format -i $(SOURCES)
format-check:
	@scripts/install-deps --lint
	@clang-format --dry-run --Werror $(SOURCES)

# clang-tidy (.clang-tidy) on the .cc files changed since .ci/tidy-base; `scripts/tidy --all`
# checks every file. Needs build/compile_commands.json, so it builds first.
tidy: build
	@scripts/install-deps --lint
	@scripts/tidy

clean:
	rm -rf build build-asan build-fuzz build-dev
