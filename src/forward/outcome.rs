//! Response classification, separate from the retry policy: (status, Retry-After, body) →
//! [`Outcome`]. Pure and synchronous.

use std::time::{Duration, SystemTime};

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// 2xx (and 409 "already have it"): every event in the batch is done.
    Delivered,
    /// 207: these event ids were rejected (with the server's reason); the rest are done.
    Partial { rejected: Vec<(String, String)> },
    /// 413: the batch is too large; split it.
    TooLarge,
    /// 400 / 422: some events are refused; bisect to find them. Carries the server's reason.
    Rejected { status: u16, reason: String },
    /// 401 / 403: keep everything, alarm, retry slowly.
    Unauthorized { status: u16, reason: String },
    /// 404 / 405: the URL or path is wrong. Keep everything, alarm, retry slowly.
    Misconfigured { status: u16, reason: String },
    /// 429 / 503: wait as long as the server says (when it says).
    Throttled {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// Other 5xx, other 4xx, timeouts, connection errors: back off and retry.
    Retry { status: Option<u16>, reason: String },
}

/// Parse a Retry-After value: delay-seconds or an HTTP-date.
pub fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    httpdate::parse_http_date(v)
        .ok()
        .map(|t| t.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A short reason from a response body: a JSON `detail`/`error`/`message`, or the text itself.
pub fn reason_from_body(status: u16, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(2000)])
        .trim()
        .to_string();
    let detail = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            for k in ["detail", "error", "message", "reason", "errors"] {
                if let Some(x) = v.get(k) {
                    return Some(match x {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    });
                }
            }
            None
        });
    let r = detail.unwrap_or(text);
    let r: String = r.chars().take(500).collect();
    if r.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {r}")
    }
}

/// The events a 207 body lists as rejected. Accepts the collect contract's `dlq_events` and the
/// common spellings `rejected`, `failed`, `errors`; each entry either an event id string or an
/// object with `event_id` (or `id`) and a reason (`reason`, `error`, `error_message`, `detail`,
/// `message`).
pub fn rejected_from_207(body: &[u8]) -> Vec<(String, String)> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for list_key in [
        "dlq_events",
        "rejected",
        "rejected_events",
        "failed",
        "failed_events",
        "errors",
    ] {
        let Some(arr) = v.get(list_key).and_then(|a| a.as_array()) else {
            continue;
        };
        for item in arr {
            match item {
                serde_json::Value::String(id) => {
                    out.push((id.clone(), "rejected by upstream (207)".to_string()))
                }
                serde_json::Value::Object(o) => {
                    let id = o
                        .get("event_id")
                        .or_else(|| o.get("id"))
                        .and_then(|x| x.as_str());
                    let reason = [
                        "reason",
                        "error",
                        "error_message",
                        "detail",
                        "message",
                        "errors",
                    ]
                    .iter()
                    .find_map(|k| o.get(*k))
                    .map(|x| match x {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .unwrap_or_else(|| "rejected by upstream (207)".to_string());
                    if let Some(id) = id {
                        out.push((id.to_string(), reason));
                    }
                }
                _ => {}
            }
        }
    }
    out
}

pub fn classify(status: u16, retry_after: Option<&str>, body: &[u8], now: SystemTime) -> Outcome {
    match status {
        207 => Outcome::Partial {
            rejected: rejected_from_207(body),
        },
        200..=299 | 409 => Outcome::Delivered,
        413 => Outcome::TooLarge,
        400 | 422 => Outcome::Rejected {
            status,
            reason: reason_from_body(status, body),
        },
        401 | 403 => Outcome::Unauthorized {
            status,
            reason: reason_from_body(status, body),
        },
        404 | 405 => Outcome::Misconfigured {
            status,
            reason: reason_from_body(status, body),
        },
        429 | 503 => Outcome::Throttled {
            status,
            retry_after: retry_after.and_then(|v| parse_retry_after(v, now)),
        },
        _ => Outcome::Retry {
            status: Some(status),
            reason: reason_from_body(status, body),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_outcomes() {
        let now = SystemTime::now();
        assert_eq!(classify(200, None, b"{}", now), Outcome::Delivered);
        assert_eq!(classify(202, None, b"", now), Outcome::Delivered);
        assert_eq!(classify(413, None, b"", now), Outcome::TooLarge);
        assert!(
            matches!(classify(422, None, br#"{"detail":"bad bag_id"}"#, now), Outcome::Rejected { status: 422, reason } if reason.contains("bad bag_id"))
        );
        assert!(matches!(
            classify(401, None, b"", now),
            Outcome::Unauthorized { status: 401, .. }
        ));
        assert_eq!(
            classify(429, Some("7"), b"", now),
            Outcome::Throttled {
                status: 429,
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(
            classify(503, None, b"", now),
            Outcome::Throttled {
                status: 503,
                retry_after: None
            }
        );
        assert!(matches!(
            classify(500, None, b"", now),
            Outcome::Retry {
                status: Some(500),
                ..
            }
        ));
    }

    #[test]
    fn retry_after_http_date() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn partial_lists_ids_and_reasons_in_several_shapes() {
        let body = br#"{"accepted_count":1,"rejected_count":2,"dlq_events":[{"event_id":"a","error":"bad learner"},"b"]}"#;
        assert_eq!(
            rejected_from_207(body),
            vec![
                ("a".into(), "bad learner".into()),
                ("b".into(), "rejected by upstream (207)".into())
            ]
        );
    }
}
