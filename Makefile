# cai-agent — build, test and check. `make test` is the project's test command (README, CI).
GO          ?= go
BIN         := bin/cai-agent
VERSION     ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
STATICCHECK ?= $(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2
FUZZTIME    ?= 10s
# Minimizing a new input of a large seed (an 8 KB quote) can otherwise take the whole run.
FUZZMINTIME ?= 2s
BENCHTIME   ?= 3x
# Real Ollama for the end-to-end test (built from the Go module proxy, cached outside the repo).
OLLAMA_VERSION ?= 0.5.7
OLLAMA_DIR     ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/cai-agent/ollama-v$(OLLAMA_VERSION)
OLLAMA_BIN     := $(OLLAMA_DIR)/ollama

.PHONY: all build test check fmt fmt-check vet lint bench fuzz ollama print-ollama-bin demo clean

all: build

build:
	$(GO) build -trimpath -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/cai-agent

test:
	$(GO) test -race ./...

fmt:
	gofmt -w $$(git ls-files '*.go')

fmt-check:
	@out=$$(gofmt -l $$(git ls-files -co --exclude-standard '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

lint:
	$(STATICCHECK) ./...

check: fmt-check vet lint test

# Benchmarks: throughput (MB/s via b.SetBytes) and peak memory; results go in the README.
bench:
	$(GO) test -run '^$$' -bench . -benchmem -benchtime $(BENCHTIME) ./...

# A short smoke run of every fuzz target.
fuzz:
	@set -e; for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz' || true); do \
	    echo "== $$pkg $$f"; \
	    $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINTIME) $$pkg; \
	  done; \
	done

# Builds the real Ollama used by the end-to-end test (about 5 minutes on 2 cores, then cached).
ollama: $(OLLAMA_BIN)
$(OLLAMA_BIN):
	mkdir -p $(OLLAMA_DIR)
	GOFLAGS=-mod=mod GOBIN=$(OLLAMA_DIR) $(GO) install \
	  -ldflags "-X github.com/ollama/ollama/version.Version=$(OLLAMA_VERSION)" \
	  github.com/ollama/ollama@v$(OLLAMA_VERSION)

print-ollama-bin:
	@echo $(OLLAMA_BIN)

# The whole mission on this machine with no TEE hardware (see deploy/demo.sh).
demo:
	CAI_OLLAMA_BIN=$${CAI_OLLAMA_BIN:-$(OLLAMA_BIN)} GO=$(GO) bash deploy/demo.sh

clean:
	rm -rf bin
