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

pytest:
	mkdir -p .cache
	.venv/bin/pytest -q --junitxml=.cache/junit.xml

test: setup lint typecheck pytest
