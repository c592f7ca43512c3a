//! Delivering one alert to one notifier: a webhook (JSON, optionally signed), Slack's
//! incoming-webhook format, or a program given the JSON on stdin. Each call is bounded
//! by the notifier's timeout and says how it went; retrying is the caller's business.

use std::process::Stdio;
use std::time::Duration;

use hmac::{Hmac, Mac as _};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::io::AsyncWriteExt as _;

use crate::config::{Notifier, NotifierKind, redact};

/// The header carrying `sha256=<hex HMAC-SHA256 of the body>` when a secret is set.
pub const SIGNATURE_HEADER: &str = "X-Vigil-Signature";
/// `opened` or `resolved`.
pub const EVENT_HEADER: &str = "X-Vigil-Event";
/// `<incident id>/<event>/<notifier>`: the same on every retry, for receivers that
/// must not act twice (delivery is at least once).
pub const DELIVERY_HEADER: &str = "X-Vigil-Delivery";

/// Most bytes of a failed answer's body quoted in the error.
const BODY_EXCERPT: usize = 200;

/// A delivery that did not go through.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub http_status: Option<u16>,
    pub error: String,
}

/// What went out.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivered {
    pub http_status: Option<u16>,
}

/// `sha256=<hex>` of `body` under `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length: this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Slack's incoming-webhook body for an alert payload.
pub fn slack_body(payload: &Value) -> Value {
    let event = payload["event"].as_str().unwrap_or("opened");
    let incident = &payload["incident"];
    let job = incident["job"].as_str().unwrap_or("?");
    let kind = incident["kind"].as_str().unwrap_or("?");
    let summary = incident["summary"].as_str().unwrap_or("");
    let (mark, verb) = if event == "resolved" {
        (":white_check_mark:", "resolved")
    } else {
        (":rotating_light:", "opened")
    };
    let mut text = format!("{mark} vigil: job *{job}* {kind} incident {verb}: {summary}");
    if let Some(run) = payload["run"]["id"].as_str() {
        text.push_str(&format!(" (run {run})"));
    }
    json!({ "text": text })
}

/// Delivers `payload` as `event` of incident `delivery` through `notifier`.
pub async fn send(
    http: &reqwest::Client,
    notifier: &Notifier,
    event: &str,
    delivery: &str,
    payload: &Value,
    program_env: &[(String, String)],
) -> Result<Delivered, Failure> {
    match &notifier.kind {
        NotifierKind::Webhook { url, secret } => {
            let body = serde_json::to_vec(payload).map_err(|e| Failure {
                http_status: None,
                error: format!("cannot encode the alert: {e}"),
            })?;
            let mut req = http
                .post(url.expose())
                .timeout(notifier.timeout)
                .header("content-type", "application/json")
                .header(EVENT_HEADER, event)
                .header(DELIVERY_HEADER, delivery);
            if let Some(secret) = secret {
                req = req.header(SIGNATURE_HEADER, signature(secret.expose(), &body));
            }
            post_request(req.body(body)).await
        }
        NotifierKind::Slack { url } => {
            let body = serde_json::to_vec(&slack_body(payload)).map_err(|e| Failure {
                http_status: None,
                error: format!("cannot encode the alert: {e}"),
            })?;
            let req = http
                .post(url.expose())
                .timeout(notifier.timeout)
                .header("content-type", "application/json")
                .body(body);
            post_request(req).await
        }
        NotifierKind::Command { command, env } => {
            run_program(
                command,
                env,
                program_env,
                notifier.timeout,
                event,
                delivery,
                payload,
            )
            .await
        }
    }
}

/// Sends a prepared POST; 2xx is delivered.
pub async fn post_request(req: reqwest::RequestBuilder) -> Result<Delivered, Failure> {
    match req.send().await {
        Ok(resp) => {
            let status = resp.status();
            if status.is_success() {
                Ok(Delivered {
                    http_status: Some(status.as_u16()),
                })
            } else {
                let body = resp.bytes().await.unwrap_or_default();
                let excerpt = String::from_utf8_lossy(&body[..body.len().min(BODY_EXCERPT)])
                    .trim()
                    .to_owned();
                Err(Failure {
                    http_status: Some(status.as_u16()),
                    error: redact(&format!("HTTP {status}: {excerpt}")).into_owned(),
                })
            }
        }
        // reqwest's errors name the URL: redacted, as the URL may be the secret.
        Err(e) => Err(Failure {
            http_status: None,
            error: redact(&without_url(&e)).into_owned(),
        }),
    }
}

/// A reqwest error's text without the URL it names.
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_request() {
        "request failed"
    } else {
        "failed"
    };
    let mut cause = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if cause.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {cause}")
    }
}

async fn run_program(
    command: &[String],
    env: &std::collections::BTreeMap<String, String>,
    program_env: &[(String, String)],
    timeout: Duration,
    event: &str,
    delivery: &str,
    payload: &Value,
) -> Result<Delivered, Failure> {
    let fail = |error: String| Failure {
        http_status: None,
        error,
    };
    let (program, args) = command
        .split_first()
        .ok_or_else(|| fail("no program".to_owned()))?;
    let body = serde_json::to_vec(payload).map_err(|e| fail(format!("cannot encode: {e}")))?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        // Least privilege, as for command jobs: none of vigil's secrets.
        .env_clear()
        .envs(program_env.iter().map(|(k, v)| (k, v)))
        .envs(env)
        .env("VIGIL_ALERT_EVENT", event)
        .env("VIGIL_ALERT_DELIVERY", delivery)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("cannot start {program}: {e}")))?;
    let run = async {
        if let Some(mut stdin) = child.stdin.take() {
            // A program that does not read its input still gets to answer.
            let _ = stdin.write_all(&body).await;
            drop(stdin);
        }
        child.wait_with_output().await
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok(out)) if out.status.success() => Ok(Delivered { http_status: None }),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: String = stderr
                .trim()
                .chars()
                .rev()
                .take(BODY_EXCERPT)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Err(fail(
                redact(&format!("{program} exited with {}: {tail}", out.status)).into_owned(),
            ))
        }
        Ok(Err(e)) => Err(fail(format!("{program}: {e}"))),
        Err(_) => Err(fail(format!(
            "{program} did not finish within {}",
            humantime::format_duration(timeout)
        ))),
    }
}

/// Calls a heartbeat URL once (GET), within `timeout`.
pub async fn ping(http: &reqwest::Client, url: &str, timeout: Duration) -> Result<(), String> {
    match http.get(url).timeout(timeout).send().await {
        Ok(resp) if resp.status().is_success() => Ok(()),
        Ok(resp) => Err(format!("HTTP {}", resp.status())),
        Err(e) => Err(redact(&without_url(&e)).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_the_body_in_hex() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn slack_text_names_job_kind_summary_and_run() {
        let body = slack_body(&json!({
            "event": "opened",
            "incident": { "job": "nightly", "kind": "failed", "summary": "exit 3" },
            "run": { "id": "r1" },
        }));
        let text = body["text"].as_str().unwrap();
        assert!(text.contains("*nightly*"), "{text}");
        assert!(text.contains("failed incident opened: exit 3"), "{text}");
        assert!(text.contains("(run r1)"), "{text}");
    }
}
