# haoping: `make run` trains, `make test` tests. Both create .venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_ARGS ?=
REWARD_DEV ?= $(if $(wildcard ../shared/data/ranklists_sample.tsv),../shared/data/ranklists_sample.tsv,starter)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv run test proto bootstrap bench bench-learning reward-model clean docker-wheels docker compose-test chaos

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the local CPU wheel, never the CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

proto: venv
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. protos/haoping/v1/haoping.proto

bootstrap: venv
	$(VENV)/bin/haoping bootstrap

run: venv
	$(VENV)/bin/haoping run $(RUN_ARGS)

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs

reward-model: venv
	$(VENV)/bin/haoping train-reward-model --train starter --dev $(REWARD_DEV) --out runs/reward-model --threads 1

# PPO time budget 5 min (cycles never bind); 128 rollouts a cycle, KL coefficient from 0.1 (see README "Results")
LEARNING_ARGS ?= --cycles 1000 --max-seconds 300 --samples-per-prompt 32 \
	--ppo-config '{"learning_rate": 0.001, "minibatch_size": 64, "init_kl_coef": 0.1}'
bench-learning: venv
	$(PY) -m bench.learning $(LEARNING_ARGS) $(RUN_ARGS)

bench: venv
	$(PY) -m bench.serving

# 60 cycles on the starter models, a random process SIGKILLed every ~10 s, beside an unfaulted run
CHAOS_ARGS ?=
chaos: venv
	$(PY) -m bench.chaos $(CHAOS_ARGS)

# docker compose: a wheelhouse built with this host's pip settings (CPU torch), then the images.
# Where no registry is reachable: docker/build-base-image.sh, then BASE_IMAGE=local/debian-py:bookworm.
BASE_IMAGE ?= python:3.11-slim
docker-wheels: venv
	rm -f docker/wheels/haoping-*.whl
	$(PY) -m pip wheel --quiet -w docker/wheels torch==2.13.0 .

docker: docker-wheels
	BASE_IMAGE=$(BASE_IMAGE) docker compose build bootstrap prometheus

compose-test: venv
	HAOPING_COMPOSE_TEST=1 BASE_IMAGE=$(BASE_IMAGE) $(PY) -m pytest -q tests/compose
