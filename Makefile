# haoping: `make run` trains, `make test` tests. Both create .venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_ARGS ?=
REWARD_DEV ?= $(if $(wildcard ../shared/data/ranklists_sample.tsv),../shared/data/ranklists_sample.tsv,starter)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv run test proto bootstrap bench bench-distributed bench-real-size bench-weight-sync bench-weight-broadcast-ab bench-learning bench-peer reward-model run-rm clean docker-wheels docker compose-test chaos

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the local CPU wheel, never the CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,linear]'
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

# The JD rank lists when they are beside the repo, the starter lists from the corpus otherwise.
REWARD_TRAIN ?= $(if $(wildcard ../shared/data/jd_ranklists_train.tsv),../shared/data/jd_ranklists_train.tsv,starter)
# Recipe for real lists: twice the starter recipe's steps (the held-out slice still gains at 600).
REWARD_LIST_RECIPE ?= --steps 800 --eval-every 100
REWARD_ARGS ?= $(if $(filter starter,$(REWARD_TRAIN)),,$(REWARD_LIST_RECIPE))
REWARD_THREADS ?= 1
reward-model: venv
	$(VENV)/bin/haoping bootstrap > /dev/null
	$(VENV)/bin/haoping train-reward-model --train $(REWARD_TRAIN) --dev $(REWARD_DEV) --out runs/reward-model \
		--threads $(REWARD_THREADS) $(REWARD_ARGS)

# PPO against runs/reward-model (trained first if missing), then the starter classifier, which PPO
# never saw, judges held-out samples of the policy before and after (runs/latest/judged.json).
RM_RUN_ARGS ?= --cycles 1000 --max-seconds 240 --samples-per-prompt 32 --scorer-normalize sigmoid \
	--ppo-config '{"learning_rate": 0.001, "minibatch_size": 64, "init_kl_coef": 0.1}'
run-rm: venv
	test -f runs/reward-model/metrics.json || $(MAKE) reward-model
	$(VENV)/bin/haoping run --scorer-backend reward-model --scorer-model runs/reward-model $(RM_RUN_ARGS) $(RUN_ARGS)
	$(VENV)/bin/haoping evaluate --before starter:policy --after runs/latest \
		--scorer-backend reward-model --scorer-model runs/reward-model \
		--evaluator-backend classifier --evaluator-model starter:classifier --out runs/latest/judged.json

# 300 s training budget (cycles never bind), 512 held-out samples. The default algorithm: GRPO,
# 64 rollouts a cycle, one Adam step each, KL penalty 0.03 in the reward, learning rate x0.1 while
# the last 3 batches' mean reward is >= 0.93 (docs/algorithms.md). PPO as before:
# make bench-learning ALGORITHM_ARGS="--algorithm ppo --samples-per-prompt 32 --minibatch-size 64 --init-kl-coef 0.1"
ALGORITHM_ARGS ?= --algorithm grpo --samples-per-prompt 16 --learning-rate 1.5e-3 --kl-penalty reward \
	--init-kl-coef 0.03 --no-adaptive-kl --target-reward 0.93 --target-reward-lr-factor 0.1
LEARNING_ARGS ?= --cycles 100000 --max-seconds 300 --eval-samples 512 $(ALGORITHM_ARGS)
bench-learning: venv
	$(PY) -m bench.learning $(LEARNING_ARGS) $(RUN_ARGS)

bench: venv
	$(PY) -m bench.serving
	$(MAKE) bench-weight-sync

# trainer -> 2 generators sync of a random GPT-2-base-sized policy: broadcast vs pull vs raw safetensors
WEIGHT_SYNC_ARGS ?=
bench-weight-sync: venv
	$(PY) -m bench.weight_sync $(WEIGHT_SYNC_ARGS)

# where the broadcast's time goes: its variants (the former one too) and bare gloo side by side
bench-weight-broadcast-ab: venv
	$(PY) -m bench.weight_broadcast_ab

# the data-parallel trainer's Step: 1 process vs 2 on the same rollouts (docs/distributed.md)
bench-distributed: venv
	$(VENV)/bin/haoping bootstrap > /dev/null
	$(PY) -m bench.distributed

# haoping vs TRL on the same task, back to back, 300 s of training each (~30 min; docs/peer.md).
# Each TRL release gets its own venv beside ours, pinned in bench/peer/requirements-*.txt.
PEER_VENVS := bench/peer/.venvs
PEER_ARGS ?=
$(PEER_VENVS)/%/.installed: bench/peer/requirements-%.txt
	rm -rf $(PEER_VENVS)/$*
	$(PYTHON) -m venv $(PEER_VENVS)/$*
	$(PEER_VENVS)/$*/bin/python -m pip install --quiet -r $<
	touch $@

# the haoping runs take bench-learning's LEARNING_ARGS (through the environment: they hold quotes)
bench-peer: export HAOPING_LEARNING_ARGS = $(LEARNING_ARGS)
bench-peer: venv $(PEER_VENVS)/trl-1.16/.installed $(PEER_VENVS)/trl-1.12/.installed
	$(PY) -m bench.peer $(PEER_ARGS)

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

# the serving figures with a policy of uer/gpt2-chinese-cluecorpussmall's size (random weights, ~100M
# parameters), beside the starter classifier (~3 min); writes bench/results_real_size.json
REAL_SIZE_ARGS ?=
bench-real-size: venv
	$(PY) -m bench.real_size $(REAL_SIZE_ARGS)
