//! Job health and alert incidents: `job_health`, `alert_incidents`, `alert_outbox`,
//! `alert_deliveries`. Opening and resolving an incident take a transaction-scoped
//! advisory lock on the job and scope, so a success and a staleness check on two
//! replicas can never cross (an incident opened just after the success that should
//! have prevented it).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::Row as _;
use uuid::Uuid;

use super::{RunStatus, Store, StoreError};

/// A run's final outcome, as job health records it.
#[derive(Debug, Clone)]
pub struct FinalOutcome<'a> {
    pub job: &'a str,
    pub scope_key: &'a str,
    pub run_id: Uuid,
    pub status: RunStatus,
    pub finished_at: DateTime<Utc>,
}

/// One row of `job_health`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobHealthRow {
    pub job: String,
    pub scope_key: String,
    pub last_run_id: Uuid,
    pub last_status: String,
    pub last_finished_at: DateTime<Utc>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_success_run: Option<Uuid>,
}

/// What opening an incident needs.
#[derive(Debug, Clone)]
pub struct NewIncident<'a> {
    pub job: &'a str,
    pub scope_key: &'a str,
    /// `failed`, `stale` or `late`.
    pub kind: &'a str,
    pub at: DateTime<Utc>,
    pub by: &'a str,
    pub run_id: Option<Uuid>,
    pub summary: &'a str,
    pub details: Value,
    pub notify: &'a [String],
}

/// When an incident may open.
#[derive(Debug, Clone, Copy)]
pub enum OpenIf {
    Always,
    /// Only if the job has had no success after this instant (staleness).
    NoSuccessSince(DateTime<Utc>),
}

/// An incident, as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Incident {
    pub id: Uuid,
    pub job: String,
    pub scope_key: String,
    pub kind: String,
    pub opened_at: DateTime<Utc>,
    pub opened_by: String,
    pub run_id: Option<Uuid>,
    pub summary: String,
    pub details: Value,
    pub notify: Vec<String>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolved_by: Option<String>,
    pub resolved_run_id: Option<Uuid>,
}

/// One delivery's state in the outbox.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeliveryState {
    pub incident_id: Uuid,
    pub event: String,
    pub notifier: String,
    pub attempts: i32,
    pub due_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub gave_up_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// A delivery leased to this replica.
#[derive(Debug, Clone)]
pub struct Pending {
    pub incident_id: Uuid,
    pub event: String,
    pub notifier: String,
    pub payload: Value,
    /// Attempts made before this one.
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
}

/// How one delivery attempt went.
#[derive(Debug, Clone)]
pub struct Attempt<'a> {
    pub at: DateTime<Utc>,
    pub duration: Duration,
    pub delivered: bool,
    pub http_status: Option<u16>,
    pub error: Option<&'a str>,
    pub host: &'a str,
    /// When to try again (not delivered), or `None` to give up.
    pub retry_at: Option<DateTime<Utc>>,
}

/// `GET /api/alerts`: which incidents.
#[derive(Debug, Clone, Default)]
pub struct IncidentQuery<'a> {
    pub job: Option<&'a str>,
    /// `Some(true)`: open ones only; `Some(false)`: resolved ones only.
    pub open: Option<bool>,
    /// Keyset: incidents older than this one (ids are UUIDv7, so time-ordered).
    pub before: Option<Uuid>,
    pub limit: i64,
}

const INCIDENT_COLUMNS: &str = "id, job, scope_key, kind, opened_at, opened_by, run_id, \
     summary, details, notify, resolved_at, resolved_by, resolved_run_id";

fn incident(row: &sqlx::postgres::PgRow) -> Result<Incident, sqlx::Error> {
    Ok(Incident {
        id: row.try_get("id")?,
        job: row.try_get("job")?,
        scope_key: row.try_get("scope_key")?,
        kind: row.try_get("kind")?,
        opened_at: row.try_get("opened_at")?,
        opened_by: row.try_get("opened_by")?,
        run_id: row.try_get("run_id")?,
        summary: row.try_get("summary")?,
        details: row.try_get("details")?,
        notify: row.try_get("notify")?,
        resolved_at: row.try_get("resolved_at")?,
        resolved_by: row.try_get("resolved_by")?,
        resolved_run_id: row.try_get("resolved_run_id")?,
    })
}

/// Serialises alert decisions about one job and scope across replicas.
async fn lock_job(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job: &str,
    scope_key: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended('vigil.alerts:' || $1 || ':' || $2, 0))",
    )
    .bind(job)
    .bind(scope_key)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// `job_health` follows a run's outcome, under the job's lock (`vigil_record_outcome`);
/// `true` when open incidents wait for this success to resolve them.
async fn record_health<'e>(
    e: impl sqlx::PgExecutor<'e>,
    o: &FinalOutcome<'_>,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT vigil_record_outcome($1, $2, $3, $4, $5)")
        .bind(o.job)
        .bind(o.scope_key)
        .bind(o.run_id)
        .bind(o.status.as_str())
        .bind(o.finished_at)
        .fetch_one(e)
        .await
}

impl Store {
    /// Records a run's final outcome in `job_health`; after a success, resolves the
    /// job's open incidents (in this scope) and queues their `resolved` deliveries,
    /// with the payload `resolved` makes for each. Returns the incidents it resolved.
    pub async fn record_outcome(
        &self,
        o: &FinalOutcome<'_>,
        host: &str,
        resolved: impl Fn(&Incident) -> Value,
    ) -> Result<Vec<Incident>, StoreError> {
        // One round trip when nothing is open to resolve (vigil_record_outcome takes
        // the job's lock, as the transaction below does).
        if !self.hot_write(async |c| record_health(c, o).await).await? {
            return Ok(Vec::new());
        }
        let call = async {
            let mut tx = self.pool.begin().await?;
            // The same record again (harmless: it only moves forward), and the job's lock
            // held to the commit, so nothing opens unseen while incidents are resolved.
            record_health(&mut *tx, o).await?;
            let success = o.status == RunStatus::Succeeded;
            let mut out = Vec::new();
            if success {
                let rows = sqlx::query(&format!(
                    "UPDATE alert_incidents SET resolved_at = $3, resolved_by = $4,
                         resolved_run_id = $5
                     WHERE job = $1 AND scope_key = $2 AND resolved_at IS NULL
                     RETURNING {INCIDENT_COLUMNS}"
                ))
                .bind(o.job)
                .bind(o.scope_key)
                .bind(o.finished_at)
                .bind(host)
                .bind(o.run_id)
                .fetch_all(&mut *tx)
                .await?;
                for row in &rows {
                    let inc = incident(row)?;
                    queue(
                        &mut tx,
                        inc.id,
                        "resolved",
                        &inc.notify,
                        &resolved(&inc),
                        o.finished_at,
                    )
                    .await?;
                    out.push(inc);
                }
            }
            tx.commit().await?;
            Ok::<_, StoreError>(out)
        };
        self.bounded(call).await
    }

    /// Opens an incident unless one of its kind is open for the job already (or the
    /// condition fails), and queues its `opened` deliveries with `payload`. `Some`
    /// when this call opened it: this replica alone notifies.
    pub async fn open_incident(
        &self,
        new: &NewIncident<'_>,
        condition: OpenIf,
        id: Uuid,
        payload: &Value,
    ) -> Result<Option<Incident>, StoreError> {
        let call = async {
            let mut tx = self.pool.begin().await?;
            lock_job(&mut tx, new.job, new.scope_key).await?;
            if let OpenIf::NoSuccessSince(since) = condition {
                let fresh: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM job_health
                     WHERE job = $1 AND scope_key = $2 AND last_success_at > $3)",
                )
                .bind(new.job)
                .bind(new.scope_key)
                .bind(since)
                .fetch_one(&mut *tx)
                .await?;
                if fresh {
                    return Ok(None);
                }
            }
            let row = sqlx::query(&format!(
                "INSERT INTO alert_incidents (id, job, scope_key, kind, opened_at, opened_by,
                     run_id, summary, details, notify)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (job, scope_key, kind) WHERE resolved_at IS NULL DO NOTHING
                 RETURNING {INCIDENT_COLUMNS}"
            ))
            .bind(id)
            .bind(new.job)
            .bind(new.scope_key)
            .bind(new.kind)
            .bind(new.at)
            .bind(new.by)
            .bind(new.run_id)
            .bind(super::pg_text(new.summary).as_ref())
            .bind(&new.details)
            .bind(new.notify)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                return Ok(None);
            };
            let inc = incident(&row)?;
            queue(&mut tx, inc.id, "opened", &inc.notify, payload, new.at).await?;
            tx.commit().await?;
            Ok::<_, StoreError>(Some(inc))
        };
        self.bounded(call).await
    }

    /// Takes up to `limit` deliveries that are due and not leased, leasing them to
    /// `host` for `lease`.
    pub async fn lease_deliveries(
        &self,
        host: &str,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<Pending>, StoreError> {
        let call = async {
            let rows = sqlx::query(
                "UPDATE alert_outbox o SET lease_until = now() + $2, leased_by = $1
                 FROM (SELECT incident_id, event, notifier FROM alert_outbox
                       WHERE delivered_at IS NULL AND gave_up_at IS NULL AND due_at <= now()
                         AND (lease_until IS NULL OR lease_until < now())
                       ORDER BY due_at
                       LIMIT $3
                       FOR UPDATE SKIP LOCKED) d
                 WHERE (o.incident_id, o.event, o.notifier) = (d.incident_id, d.event, d.notifier)
                 RETURNING o.incident_id, o.event, o.notifier, o.payload, o.attempts, o.created_at",
            )
            .bind(host)
            .bind(lease)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(Pending {
                        incident_id: r.try_get("incident_id")?,
                        event: r.try_get("event")?,
                        notifier: r.try_get("notifier")?,
                        payload: r.try_get("payload")?,
                        attempts: r.try_get("attempts")?,
                        created_at: r.try_get("created_at")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(StoreError::from)
        };
        self.bounded(call).await
    }

    /// Records an attempt and what follows: delivered, due again at `retry_at`, or
    /// given up.
    pub async fn record_attempt(&self, p: &Pending, a: &Attempt<'_>) -> Result<(), StoreError> {
        let call = async {
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "INSERT INTO alert_deliveries (incident_id, event, notifier, attempt, at,
                     duration_ms, outcome, http_status, error, host)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(p.incident_id)
            .bind(&p.event)
            .bind(&p.notifier)
            .bind(p.attempts + 1)
            .bind(a.at)
            .bind(a.duration.as_secs_f64() * 1000.0)
            .bind(if a.delivered { "delivered" } else { "failed" })
            .bind(a.http_status.map(i32::from))
            .bind(a.error.map(|e| super::pg_text(e).into_owned()))
            .bind(a.host)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE alert_outbox SET attempts = attempts + 1, lease_until = NULL,
                     leased_by = NULL, last_error = $4,
                     delivered_at = CASE WHEN $5 THEN $6 END,
                     due_at = coalesce($7, due_at),
                     gave_up_at = CASE WHEN NOT $5 AND $7 IS NULL THEN $6 END
                 WHERE incident_id = $1 AND event = $2 AND notifier = $3",
            )
            .bind(p.incident_id)
            .bind(&p.event)
            .bind(&p.notifier)
            .bind(a.error.map(|e| super::pg_text(e).into_owned()))
            .bind(a.delivered)
            .bind(a.at)
            .bind(a.retry_at)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<_, StoreError>(())
        };
        self.bounded(call).await
    }

    /// Every `job_health` row (one per job and scope: small).
    pub async fn job_health(&self) -> Result<Vec<JobHealthRow>, StoreError> {
        let call = async {
            let rows = sqlx::query(
                "SELECT job, scope_key, last_run_id, last_status, last_finished_at,
                        last_success_at, last_success_run
                 FROM job_health",
            )
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(JobHealthRow {
                        job: r.try_get("job")?,
                        scope_key: r.try_get("scope_key")?,
                        last_run_id: r.try_get("last_run_id")?,
                        last_status: r.try_get("last_status")?,
                        last_finished_at: r.try_get("last_finished_at")?,
                        last_success_at: r.try_get("last_success_at")?,
                        last_success_run: r.try_get("last_success_run")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(StoreError::from)
        };
        self.bounded(call).await
    }

    /// Fills `job_health` for a job that has none yet from the ledger (a database
    /// older than job health, or rows written by a vigil without it): its last final
    /// run and last success, on `host` for host-scoped jobs. Indexed lookups only.
    pub async fn seed_job_health(
        &self,
        job: &str,
        scope_key: &str,
        host: Option<&str>,
    ) -> Result<(), StoreError> {
        let call = async {
            sqlx::query(
                "INSERT INTO job_health (job, scope_key, last_run_id, last_status,
                     last_finished_at, last_success_at, last_success_run)
                 SELECT $1, $2, last.id, last.status, last.finished_at, ok.finished_at, ok.id
                 FROM (SELECT id, status, finished_at FROM job_runs
                       WHERE job = $1 AND ($3::text IS NULL OR host = $3)
                         AND status IN ('succeeded', 'failed', 'timed_out', 'abandoned', 'skipped')
                         AND finished_at IS NOT NULL
                       ORDER BY started_at DESC LIMIT 1) last
                 LEFT JOIN LATERAL (SELECT id, finished_at FROM job_runs
                       WHERE job = $1 AND status = 'succeeded' AND ($3::text IS NULL OR host = $3)
                       ORDER BY finished_at DESC LIMIT 1) ok ON true
                 ON CONFLICT (job, scope_key) DO NOTHING",
            )
            .bind(job)
            .bind(scope_key)
            .bind(host)
            .execute(&self.pool)
            .await?;
            Ok::<_, StoreError>(())
        };
        self.bounded(call).await
    }

    /// Incidents still open, oldest first.
    /// Every open incident, from the partial index of open ones (never the history).
    pub async fn open_incidents(&self) -> Result<Vec<Incident>, StoreError> {
        let call = async {
            let rows = sqlx::query(&open_incidents_sql())
                .fetch_all(&self.pool)
                .await?;
            rows.iter()
                .map(incident)
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(StoreError::from)
        };
        self.bounded(call).await
    }

    /// Incidents newest first, filtered and paged by keyset.
    pub async fn incidents(&self, q: &IncidentQuery<'_>) -> Result<Vec<Incident>, StoreError> {
        // PostgreSQL's text refuses U+0000, so no job is named with it: such a filter
        // matches nothing (sent, it would fail the statement and answer 500).
        if q.job.is_some_and(|j| j.contains('\0')) {
            return Ok(Vec::new());
        }
        let call = async {
            let rows = sqlx::query(&format!(
                "SELECT {INCIDENT_COLUMNS} FROM alert_incidents
                 WHERE ($1::text IS NULL OR job = $1)
                   AND ($2::bool IS NULL OR (resolved_at IS NULL) = $2)
                   AND ($3::uuid IS NULL OR id < $3)
                 ORDER BY id DESC
                 LIMIT $4"
            ))
            .bind(q.job)
            .bind(q.open)
            .bind(q.before)
            .bind(q.limit)
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(incident)
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(StoreError::from)
        };
        self.bounded(call).await
    }

    /// The outbox rows of these incidents.
    pub async fn deliveries_of(&self, ids: &[Uuid]) -> Result<Vec<DeliveryState>, StoreError> {
        let call = async {
            let rows = sqlx::query(
                "SELECT incident_id, event, notifier, attempts, due_at, delivered_at,
                        gave_up_at, last_error
                 FROM alert_outbox WHERE incident_id = ANY($1)
                 ORDER BY created_at, event, notifier",
            )
            .bind(ids)
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(DeliveryState {
                        incident_id: r.try_get("incident_id")?,
                        event: r.try_get("event")?,
                        notifier: r.try_get("notifier")?,
                        attempts: r.try_get("attempts")?,
                        due_at: r.try_get("due_at")?,
                        delivered_at: r.try_get("delivered_at")?,
                        gave_up_at: r.try_get("gave_up_at")?,
                        last_error: r.try_get("last_error")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(StoreError::from)
        };
        self.bounded(call).await
    }
}

/// Queues one delivery per notifier.
async fn queue(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    incident: Uuid,
    event: &str,
    notifiers: &[String],
    payload: &Value,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    if notifiers.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO alert_outbox (incident_id, event, notifier, payload, created_at, due_at)
         SELECT $1, $2, n, $4, $5, $5 FROM unnest($3::text[]) AS n
         ON CONFLICT DO NOTHING",
    )
    .bind(incident)
    .bind(event)
    .bind(notifiers)
    .bind(payload)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Open incidents: `alert_incidents_open_idx` holds exactly these rows.
pub fn open_incidents_sql() -> String {
    format!(
        "SELECT {INCIDENT_COLUMNS} FROM alert_incidents WHERE resolved_at IS NULL
         ORDER BY id DESC"
    )
}
