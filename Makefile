.PHONY: run test test-e2e bench

run:        ## start the service on embedded defaults with the bundled model
	bash scripts/serve.sh

test:       ## the test suite CI runs (installs what it needs, starts PostgreSQL and S3)
	bash scripts/test.sh -m "not e2e"

test-e2e:   ## end-to-end acceptance tests on the real bundled model (slow)
	bash scripts/test.sh -m e2e

bench:      ## queue and job benchmarks (tables, not tests)
	.venv/bin/python benchmarks/queue.py
	.venv/bin/python benchmarks/job.py
