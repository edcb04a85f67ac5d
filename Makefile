# The two commands of the README: `make demo` trains on the embedded dataset, `make test` runs the
# test suite. Both create .venv/ and install everything on a fresh machine first.
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
# The demo trains for a few epochs on a subset of Fashion-MNIST, on the CPU, in a few minutes.
DEMO_ARGS ?= --model convnext_atto --device cpu --epochs 4 --batch_size 32 --input_size 32 \
	--train_subset 10000 --eval_subset 2000 --num_workers 2 --lr 2e-3 --warmup_epochs 1 \
	--output_dir output/demo --log_dir output/demo/tb

.PHONY: setup data demo test test-timm-all clean

setup: $(VENV)/.installed

# The export extras (onnx, onnxruntime) and the time-series data packages (statsmodels, sktime)
# are optional for users but installed here, so that the test suite checks those paths too.
$(VENV)/.installed: requirements.txt requirements-export.txt requirements-modalities.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt -r requirements-export.txt -r requirements-modalities.txt
	touch $@

data:
	@bash tools/install_fashion_mnist.sh
	@bash tools/install_speech_testdata.sh

# The demo starts from scratch each time (a kept output/demo would auto-resume, finished).
demo: setup data
	rm -rf output/demo
	OMP_NUM_THREADS=1 $(PY) main.py $(DEMO_ARGS)

# Compiling the CUDA extension first catches a broken build (setup.py skips it, with a message,
# where no CUDA toolkit is found).
test: setup data
	$(PY) setup.py -q build_ext --inplace
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not timm_all" tests

# timm's own tests/test_models.py on every registered model (make test runs it on the smallest
# model of each family).
test-timm-all: setup
	$(PY) -m pytest -q -m timm_all tests/test_timm_suite.py

clean:
	rm -rf output
