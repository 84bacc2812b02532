# The two commands of the README:
#   make demo   set everything up, then run the offline end-to-end demo
#   make test   set everything up, then lint, type-check and run the whole test suite
.PHONY: setup demo test lint typecheck pytest

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/animatediff-blender demo --out demo-output

lint:
	.venv/bin/ruff check protocol backend blender_addon tests build.py pkg

# mypy sees the installed package names (animatediff_blender.*) through a link farm, so
# imports between protocol/ and backend/ are checked, not treated as missing.
typecheck:
	mkdir -p .cache/typecheck/animatediff_blender
	ln -sfn ../../../protocol .cache/typecheck/animatediff_blender/protocol
	ln -sfn ../../../backend .cache/typecheck/animatediff_blender/backend
	ln -sfn ../../../pkg/__init__.py .cache/typecheck/animatediff_blender/__init__.py
	MYPYPATH=.cache/typecheck .venv/bin/mypy -p animatediff_blender

# The suites bound by the CPU alone (tiny models, dynamo tracing) run in two processes with
# one torch thread each (~2.2x faster on two cores); the rest runs after them, alone: the
# add-on and server tests wait on real time, and the server matrix compares frames bit for
# bit with stock diffusers, which needs two threads or more: at one, oneDNN rounds the
# server's 4-frame decode chunks differently from stock's 16-frame decode (1 in 255, a few
# pixels).
CPU_BOUND_TESTS := tests/backend/bench tests/backend/engine tests/backend/models

pytest:
	mkdir -p .cache
	rm -f .cache/junit*.xml
	status=0; \
	OMP_NUM_THREADS=1 .venv/bin/pytest -q -n 2 --junitxml=.cache/junit-cpu-bound.xml $(CPU_BOUND_TESTS) || status=$$?; \
	.venv/bin/pytest -q --junitxml=.cache/junit.xml $(CPU_BOUND_TESTS:%=--ignore=%) || status=$$?; \
	exit $$status

test: setup lint typecheck pytest
