# The compose stack and the project's chores. `make help` lists the targets.
# Every target prints the commands it runs (`make -n TARGET` shows them without running).

# `docker compose` (v2) where it exists, else Debian's docker-compose 1.29.
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo 'docker compose' || echo docker-compose)
# The project names the volumes and network (vigil_postgres_data, vigil_internal…).
PROJECT ?= vigil
# Read by compose for the ${…} in the compose file; beside the compose file it would
# not be found, hence --env-file.
ENV_FILE ?= .env
# SEED_VOLUMES=1: the seed stack's external volumes (docker/seed-volumes.yml).
SEED_VOLUMES ?=
# More compose files, for example OVERRIDES=docker/stack-test.override.yml.
OVERRIDES ?=
STACK := $(COMPOSE) --env-file $(ENV_FILE) -p $(PROJECT) -f docker/docker-compose.yml \
	$(if $(filter 1,$(SEED_VOLUMES)),-f docker/seed-volumes.yml) $(foreach f,$(OVERRIDES),-f $(f))
# Every profile, so `down` also stops what `demo` or `promtail` started.
ALL_PROFILES := --profile demo --profile promtail
VOLUMES := postgres_data grafana_data loki_data alloy_data promtail_data mongo_data
SEED_VOLUME_NAMES := postgres_data grafana_data loki_data
# A volume's name on the engine: project-scoped, or the seed's own.
volume_name = $(if $(filter 1,$(SEED_VOLUMES)),$(if $(filter $(1),$(SEED_VOLUME_NAMES)),$(1),$(PROJECT)_$(1)),$(PROJECT)_$(1))
# Any image with tar and gzip; vigil's runtime base is there wherever vigil was built.
BACKUP_IMAGE ?= debian:bookworm-slim
STAMP := $(shell date -u +%Y%m%dT%H%M%SZ)
BACKUPS := backups
# The application role and database, as in .env (see .env.example).
DB_USER ?= $(shell sed -n 's/^DB_USER=//p' $(ENV_FILE) 2>/dev/null || echo server)
PG_EXEC := $(STACK) exec -T -e PGUSER=$(or $(DB_USER),server) -e PGDATABASE=vigil postgres
COUNT ?= 500

.PHONY: help up down restart rebuild logs ps volumes demo demo-readings \
        backup $(addprefix backup-,$(VOLUMES)) pg-dump pg-restore \
        test stack-test check fmt lint

help:
	@echo "stack:   up down restart rebuild logs ps demo demo-readings [COUNT=500]"
	@echo "backup:  backup (every volume) backup-<volume> restore-<volume> FILE=... pg-dump pg-restore FILE=..."
	@echo "code:    test stack-test check fmt lint"
	@echo "options: PROJECT=$(PROJECT) ENV_FILE=$(ENV_FILE) SEED_VOLUMES=1 OVERRIDES=file.yml"

up:
	$(STACK) up -d

# The demo profile's MongoDB, seeded, and vigil's reading sync pointed at it.
demo:
	MONGO_URI=mongodb://mongo:27017 $(STACK) --profile demo up -d

# COUNT more pending readings into the demo MongoDB.
demo-readings:
	$(STACK) --profile demo run --rm demo-readings demo-readings --count $(COUNT)

down:
	$(STACK) $(ALL_PROFILES) down

restart:
	$(STACK) restart

rebuild:
	$(STACK) build --pull vigil
	$(STACK) up -d --force-recreate vigil

logs:
	$(STACK) logs -f --tail=200

ps:
	$(STACK) ps

# Only with SEED_VOLUMES=1: the seed's external volumes, created once.
volumes:
	for v in $(SEED_VOLUME_NAMES); do docker volume create $$v; done

# Archives of each volume under backups/, named <volume>-<UTC stamp>.tar.gz; volumes
# that do not exist (mongo_data without the demo) are skipped. Stop the stack first
# (`make down`) for a consistent copy of a running database, or use pg-dump.
backup: $(addprefix backup-,$(VOLUMES))

$(addprefix backup-,$(VOLUMES)): backup-%:
	@if ! docker volume inspect $(call volume_name,$*) >/dev/null 2>&1; then \
	  echo "no volume $(call volume_name,$*): skipped"; \
	else \
	  mkdir -p $(BACKUPS) && echo "$(call volume_name,$*) -> $(BACKUPS)/$*-$(STAMP).tar.gz" && \
	  docker run --rm -v $(call volume_name,$*):/volume:ro -v $(CURDIR)/$(BACKUPS):/backups \
	    $(BACKUP_IMAGE) tar -czf /backups/$*-$(STAMP).tar.gz -C /volume . ; \
	fi

# make restore-postgres_data FILE=backups/postgres_data-20261127T031500Z.tar.gz
# Replaces the volume's content; refuses while a container uses the volume.
restore-%:
	@test -n "$(FILE)" || { echo "usage: make $@ FILE=$(BACKUPS)/$*-<stamp>.tar.gz" >&2; exit 2; }
	@test -f "$(FILE)" || { echo "$(FILE): no such file" >&2; exit 2; }
	@if [ -n "$$(docker ps -q --filter volume=$(call volume_name,$*))" ]; then \
	  echo "volume $(call volume_name,$*) is in use: stop the stack first (make down)" >&2; exit 1; fi
	docker volume inspect $(call volume_name,$*) >/dev/null 2>&1 || \
	  docker volume create --label com.docker.compose.project=$(PROJECT) \
	    --label com.docker.compose.volume=$* $(call volume_name,$*) >/dev/null
	docker run --rm -v $(call volume_name,$*):/volume -v $(abspath $(dir $(FILE))):/backups:ro $(BACKUP_IMAGE) \
	  sh -c 'find /volume -mindepth 1 -delete && tar -xzf /backups/$(notdir $(FILE)) -C /volume'

# Logical backup of vigil's database while the stack runs (pg_dump, custom format).
pg-dump:
	mkdir -p $(BACKUPS)
	PG_EXEC="$(PG_EXEC)" scripts/pg-backup.sh dump > $(BACKUPS)/vigil-$(STAMP).dump.part
	mv $(BACKUPS)/vigil-$(STAMP).dump.part $(BACKUPS)/vigil-$(STAMP).dump
	@echo "$(BACKUPS)/vigil-$(STAMP).dump"

# make pg-restore FILE=backups/vigil-20261127T031500Z.dump
# vigil stops meanwhile (its locks and writes would fight the restore), then starts.
pg-restore:
	@test -n "$(FILE)" || { echo "usage: make pg-restore FILE=$(BACKUPS)/vigil-<stamp>.dump" >&2; exit 2; }
	@test -f "$(FILE)" || { echo "$(FILE): no such file" >&2; exit 2; }
	$(STACK) stop vigil
	status=0; PG_EXEC="$(PG_EXEC)" scripts/pg-backup.sh restore < $(FILE) || status=$$?; \
	  $(STACK) start vigil; exit $$status

test:
	./scripts/test

stack-test:
	./scripts/stack-test

check:
	cargo run --quiet -- check
	cargo run --quiet -- check --config docker/vigil/jobs.toml
	cargo run --quiet -- check --config docker/host-metrics.toml

fmt:
	cargo fmt --all

lint:
	cargo clippy --all-targets -- -D warnings
