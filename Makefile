# The README's two commands: `make demo` (install + a real distillation on the embedded
# default) and `make test` (install + the whole test suite). Both create .venv themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data/ml-100k
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo teachers proto bench tables clean

install: $(VENV)/.installed

# One environment for the demo and the tests, vision included: open_clip needs torchvision, whose
# only working build here pairs with torch 2.14.1 (constraints/vision.txt; README, "Install").
$(VENV)/.installed: pyproject.toml constraints/vision.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints/vision.txt -e ".[test,vision]"
	touch $@

# The test files spread over the cores, one file per worker at a time (a file's fixtures are built once).
PYTEST_WORKERS ?= auto
test: install
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile

# Teacher checkpoints for the MovieLens committee (skipped when present).
checkpoints/%/teacher.yaml: | install
	$(VENV)/bin/ddistill fit-teacher --kind $* --data $(DATA) --out checkpoints/$*

teachers: checkpoints/mlp-m/teacher.yaml checkpoints/mlp-l/teacher.yaml

# The LM teacher of the tables: 2,400 steps (~1 epoch) under bfloat16 autocast on one thread, bounded by
# steps and not by time, so that every fit on this kind of CPU writes the same file (two fits here gave
# the same hash) and the runs recorded with it stay valid; ~95 min on one core.
checkpoints/lm/teacher.yaml: | install
	$(VENV)/bin/ddistill --threads 1 fit-teacher --kind lm --bf16 --data $(DATA) --out checkpoints/lm \
		--max-steps 2400 --time-budget 36000

# A real distillation on the embedded default: S_base, then DiverseDistill from MLP-M + MLP-L
# in-process, and the soft-label baseline (MT) from the same teachers for comparison; then the
# reports (test MSE, teachers, gap recovery rate, teacher rows the gate saved).
demo: teachers
	rm -rf runs/demo
	$(VENV)/bin/ddistill train --method none --data $(DATA) --run-dir runs/demo/base
	$(VENV)/bin/ddistill train --config configs/demo.yaml --data $(DATA) --run-dir runs/demo/diversedistill
	$(VENV)/bin/ddistill train --method mt --teacher local:checkpoints/mlp-m --teacher local:checkpoints/mlp-l \
		--data $(DATA) --run-dir runs/demo/mt
	$(VENV)/bin/ddistill eval runs/demo/diversedistill --base runs/demo/base
	$(VENV)/bin/ddistill eval runs/demo/mt --base runs/demo/base

proto: install
	$(PY) -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto --grpc_python_out=proto \
		proto/ddistill/teacher/v1/teacher.proto

# Benchmarks (docs/benchmarks.md); run them on a quiet machine.
bench: teachers
	$(PY) bench/teacher_bench.py --teachers mlp-l --reps 200 --out bench/results/teacher_mlp-l.json
	$(PY) bench/teacher_bench.py --teachers lm --reps 20 --out bench/results/teacher_lm.json
	$(PY) bench/trainer_bench.py --rounds 5 --out bench/results/trainer.json
	$(PY) bench/vjp_bench.py --out bench/results/vjp.json
	$(PY) bench/vjp_bench.py --teachers lm --dtype bfloat16 --threads 2 --out bench/results/vjp_lm_bf16.json
	$(PY) bench/load_bench.py --clients 1 2 4 8 --seconds 5 --batch 64 --out bench/results/load.json
	$(PY) bench/serve_bench.py --out bench/results/serve.json
	$(PY) bench/precision_bench.py --teachers lm,mlp-l,vit,clip --out bench/results/precision.json

# The paper's MovieLens tables (docs/results/); LM cells need checkpoints/lm and hours of CPU.
tables: teachers
	$(PY) -m pip install --quiet -c constraints/vision.txt -e ".[experiments]"
	$(PY) experiments/movielens_tables.py --skip-teacher lm --thresholds 0 0.6

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
