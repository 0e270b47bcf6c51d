# Agora — the two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test install migrate seed lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e ".[server,dev]"
	touch $(STAMP)

install: $(STAMP)

# Embedded default: SQLite, a filesystem Celery broker, checkpoints on disk. Nothing else to install.
run: export DJANGO_DEBUG ?= 1
run: export AGORA_PUBLIC_URL ?= http://$(HOST):$(PORT)
run: export AGORA_HOST := $(HOST)
run: export AGORA_HEARTBEAT_INTERVAL_S ?= 5
# A demo member who signs up can vote once the console e-mail is confirmed (production adds an account age).
run: export AGORA_VOTER_ELIGIBILITY ?= verified_email
# Short voting windows so the governance loop can be finished in the demo: 10 minutes unless the author
# chooses between 2 minutes and a day.
run: export AGORA_VOTING_PERIOD_HOURS ?= 0.1667
run: export AGORA_VOTING_MIN_HOURS ?= 0.0334
run: export AGORA_VOTING_MAX_HOURS ?= 24
run: export AGORA_PORT := $(PORT)
run: $(STAMP)
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py seed_demo
	@echo ""
	@echo "  Agora is starting: open http://$(HOST):$(PORT)/  (log in as alice / agora-demo, admin: admin / agora-demo)"
	@echo ""
	$(BIN)/honcho -f Procfile.local start

# The whole suite. Uses PostgreSQL and Redis when DATABASE_URL / REDIS_URL are set, the embedded default otherwise.
test: export DJANGO_SECRET_KEY ?= test-only-secret-key
test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

clean:
	rm -rf var .pytest_cache
