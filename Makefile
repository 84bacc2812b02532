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

typecheck:
	.venv/bin/mypy protocol backend pkg

pytest:
	mkdir -p .cache
	.venv/bin/pytest -q --junitxml=.cache/junit.xml

test: setup lint typecheck pytest
