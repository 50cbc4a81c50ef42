# obd — build, test and demo targets. `make help` lists them.
GO          ?= go
BIN         := bin
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
DEPS        := make gcc pkg-config e2fsprogs erofs-utils libext2fs-dev zlib1g-dev libisal-dev liblz4-1 fuse3 containerd runc docker-registry busybox-static

.PHONY: help build test lint check deps demo bench clean

help: ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

build: ## build bin/obd
	$(GO) build -o $(BIN)/ ./cmd/...

test: ## run all tests (system tests skip without root/tools unless OBD_REQUIRE_SYSTEM_TESTS=1)
	$(GO) test -count=1 ./...

lint: ## gofmt, go vet, staticcheck, and no build outputs in git
	@out=$$(git ls-files | while read -r f; do [ -f "$$f" ] && case "$$(head -c 4 "$$f" | od -An -c | tr -d ' ')" in 177ELF*) echo "$$f";; esac; done; git ls-files '*.pprof' '*.prof' '*.test'); \
	  if [ -n "$$out" ]; then echo "build outputs in git:"; echo "$$out"; exit 1; fi
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

check: lint test ## what CI runs

deps: ## install the Debian packages obd needs (root)
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(DEPS)

demo: deps build ## install, build and run the end-to-end demo (root)
	$(BIN)/obd demo

bench: ## format benchmarks (medians of 5 runs)
	$(GO) test -run='^$$' -bench=. -benchtime=1s -count=5 ./zfile/ ./lsmt/

clean: ## remove build output
	rm -rf $(BIN)
