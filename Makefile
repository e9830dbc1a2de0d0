# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.jacplug-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,torchdistill,huggingface,lightning,tensorboard,mlflow,ray]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/jacplug train --teacher resnet50 --student resnet18

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup

clean:
	rm -rf $(VENV) build *.egg-info runs
