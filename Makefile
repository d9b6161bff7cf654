# ringd: developer entry points. Every target installs what it is missing.
#   make run    ringd in the foreground on conf/demo.toml, with a demo backend
#   make test   the whole test suite
#   make cluster-test  two ringd hosts behind a BGP/ECMP router in network
#               namespaces (root; installs bird2, exabgp, nftables)
#   make fuzz   fuzz the TLS ClientHello and PROXY header parsers under
#               ASan/UBSan for FUZZ_SECONDS (not part of make test)
#   make bench  the side-by-side benchmark (not part of make test)
#   make bench-profile  where the proxies' CPU goes per request (perf)
#   make soak   10 minutes of mixed traffic and chaos through ringd (not part of make test)
#   make deb    the Debian package

PYTHON  ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
APT_PKGS := liburing-dev pkg-config gcc make iproute2 curl netcat-openbsd
SOURCES := $(wildcard supervisor/*.py supervisor/config/*.py worker/*.py native/*.c native/*.h native/*.py) \
           pyproject.toml setup.py

.PHONY: run test fuzz cluster-test cluster-deps deps venv bench bench-profile bench-deps soak deb deb-test clean

# Debian packages, installed only when missing (needs root, as on CI).
deps:
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if ! $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null; then missing="$$missing python3-venv"; fi; \
	if ! $(PYTHON) -c 'import sysconfig,os,sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then missing="$$missing python3-dev"; fi; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

deb:
	sh packaging/build-deb.sh

deb-test: deb
	sh packaging/deb-test.sh

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# The project is installed (not editable) so that the cffi extension is built
# exactly as an install builds it; reinstalled when a source file changes.
$(STAMP): $(VENV)/bin/python $(SOURCES) tests/constraints.txt
	$(VPY) -m pip install -q -c tests/constraints.txt ".[test]"
	@touch $@

venv: deps $(STAMP)

run: venv
	@sh conf/run-demo.sh $(VPY)

# RINGD_CLUSTER_TEST=1 (as .ci/run sets it) also runs the namespace cluster
# test, after installing what it needs.
test: venv $(if $(RINGD_CLUSTER_TEST),cluster-deps)
	$(VPY) -m pytest -q tests

# Longer fuzzing of native/tls_hello.c and native/proxy_recv.c (tests/fuzz/):
# libFuzzer when clang is installed, else the gcc sanitizer driver mutating
# the corpus of tests/parser_corpus.py. Needs gcc (make deps) only.
FUZZ_SECONDS ?= 60
fuzz: deps
	$(PYTHON) tests/fuzz/run.py --seconds $(FUZZ_SECONDS)

# The namespace cluster test (tests/netns_cluster.py, about 70 s, as root).
# bird2 and exabgp are only run inside the test's own namespaces: a bird
# service that the install starts under systemd is stopped and disabled again.
CLUSTER_PKGS := bird2 exabgp nftables curl iproute2
cluster-deps:
	@missing=""; for p in $(CLUSTER_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing && \
	  case "$$missing" in *bird2*) if [ -d /run/systemd/system ]; then \
	    systemctl disable --now bird.service >/dev/null 2>&1 || true; fi;; esac; \
	fi

cluster-test: cluster-deps venv
	RINGD_CLUSTER_TEST=1 $(VPY) -m pytest -q -s tests/test_cluster.py

# Side-by-side benchmark (bench/README.md); BENCH_ARGS=--quick for a smoke run.
# bench-profile: where the work goes per request (perf counts and samples);
# an A/B of two ringd builds: make bench BENCH_ARGS='--ringd-a DIR --ringd-b DIR'.
BENCH_PKGS := haproxy nginx-light libnginx-mod-stream iperf3 wrk

bench: venv
	@$(MAKE) --no-print-directory bench-deps BENCH_PKGS="$(BENCH_PKGS)"
	@$(VPY) -c 'import matplotlib' 2>/dev/null || $(VPY) -m pip install -q matplotlib
	BENCH_MAKE_TARGET=bench $(VPY) bench/run.py $(BENCH_ARGS)

bench-profile: venv
	@$(MAKE) --no-print-directory bench-deps BENCH_PKGS="$(BENCH_PKGS) linux-perf"
	BENCH_MAKE_TARGET=bench-profile $(VPY) bench/run.py --profile $(BENCH_ARGS)

bench-deps:
	@missing=""; for p in $(BENCH_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

# Soak and chaos run (bench/README.md, "Soak"): 10 minutes by default, writes
# bench/results/soak-*.md/.json and soak-latest.md; exit 1 if a check fails.
# SOAK_ARGS="--duration 60" for a smoke, "--ring both" for both ring modes.
soak: venv
	$(VPY) bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
