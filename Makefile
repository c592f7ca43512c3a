# The compose stack and the project's chores. `make help` lists the targets.
# Every target prints the commands it runs (`make -n TARGET` shows them without running).

COMPOSE ?= docker compose
STACK := $(COMPOSE) --env-file .env -f docker/docker-compose.yml
VOLUMES := postgres_data grafana_data loki_data
STAMP := $(shell date -u +%Y%m%dT%H%M%SZ)
BACKUPS := backups
# The application role and database, as in .env (see .env.example).
DB_USER ?= $(shell sed -n 's/^DB_USER=//p' .env 2>/dev/null || echo server)
PG_EXEC := $(STACK) exec -T -e PGUSER=$(or $(DB_USER),server) -e PGDATABASE=vigil postgres

.PHONY: help up down restart rebuild logs ps volumes demo \
        backup $(addprefix backup-,$(VOLUMES)) pg-dump pg-restore \
        test check fmt lint

help:
	@echo "stack:   up down restart rebuild logs ps volumes demo"
	@echo "backup:  backup (every volume) backup-<volume> restore-<volume> FILE=... pg-dump pg-restore FILE=..."
	@echo "code:    test check fmt lint"

up:
	$(STACK) up -d

demo:
	$(STACK) --profile demo up -d

down:
	$(STACK) down

restart:
	$(STACK) restart

rebuild:
	$(STACK) build --pull vigil
	$(STACK) up -d --force-recreate vigil

logs:
	$(STACK) logs -f --tail=200

ps:
	$(STACK) ps

# The stack's volumes are external: create them once, keep them across `down`.
volumes:
	for v in $(VOLUMES); do docker volume create $$v; done

# Archives of each volume under backups/, named volume-TIMESTAMP.tar.gz. Stop the stack
# first (`make down`) for a consistent copy of a running database.
backup: $(addprefix backup-,$(VOLUMES))

$(addprefix backup-,$(VOLUMES)): backup-%:
	mkdir -p $(BACKUPS)
	docker run --rm -v $*:/volume:ro -v $(CURDIR)/$(BACKUPS):/backups alpine:3.20 \
	  tar -czf /backups/$*-$(STAMP).tar.gz -C /volume .

# make restore-postgres_data FILE=backups/postgres_data-20261127T031500Z.tar.gz
restore-%:
	test -n "$(FILE)" || { echo "usage: make $@ FILE=backups/$*-<stamp>.tar.gz" >&2; exit 2; }
	docker run --rm -v $*:/volume -v $(CURDIR)/$(dir $(FILE)):/backups:ro alpine:3.20 \
	  sh -c 'rm -rf /volume/* /volume/..?* /volume/.[!.]* ; tar -xzf /backups/$(notdir $(FILE)) -C /volume'

# Logical backup of vigil's database while the stack runs (pg_dump, custom format).
pg-dump:
	mkdir -p $(BACKUPS)
	PG_EXEC="$(PG_EXEC)" scripts/pg-backup.sh dump > $(BACKUPS)/vigil-$(STAMP).dump

# make pg-restore FILE=backups/vigil-20261127T031500Z.dump
pg-restore:
	test -n "$(FILE)" || { echo "usage: make pg-restore FILE=backups/vigil-<stamp>.dump" >&2; exit 2; }
	PG_EXEC="$(PG_EXEC)" scripts/pg-backup.sh restore < $(FILE)

test:
	./scripts/test

check:
	cargo run --quiet -- check
	cargo run --quiet -- check --config docker/vigil/jobs.toml
	cargo run --quiet -- check --config docker/host-metrics.toml

fmt:
	cargo fmt --all

lint:
	cargo clippy --all-targets -- -D warnings
