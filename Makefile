.PHONY: run test test-tour test-e2e bench

run:        ## start the service on embedded defaults with the bundled model
	bash scripts/serve.sh

test:       ## the test suite CI runs (installs what it needs, starts PostgreSQL and S3)
	bash scripts/test.sh -m "not e2e and not tour and not known_failing"

test-tour:  ## the README's quick tour, walked literally on the real model (CI runs it too)
	bash scripts/test.sh -m tour tests/test_quick_tour.py

test-e2e:   ## end-to-end acceptance tests on the real bundled model (slow)
	bash scripts/test.sh -m e2e

bench:      ## queue and job benchmarks (tables, not tests)
	.venv/bin/python benchmarks/queue.py
	.venv/bin/python benchmarks/job.py
