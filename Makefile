.PHONY: run test test-fast bench

run:        ## start the service on embedded defaults with the bundled model
	bash scripts/serve.sh

test:       ## the whole test suite (installs what it needs, starts PostgreSQL)
	bash scripts/test.sh

test-fast:  ## everything except the end-to-end tests on the real model
	bash scripts/test.sh -m "not e2e"

bench:
	.venv/bin/python benchmarks/queue.py
