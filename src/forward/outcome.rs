//! Response classification, separate from the retry policy: an upstream [`Answer`] →
//! [`Outcome`]. Pure and synchronous.
//!
//! Every status is decided deliberately, not only the ones the contracts name (DESIGN.md,
//! "Forwarder"): a 3xx is a misconfiguration (redirects are never followed: a batch is only
//! ever sent where the operator configured it); 409 means the original request with this
//! `Idempotency-Key` is still in progress and may yet fail, so it is retried; a 2xx carrying
//! an HTML page is a captive portal or proxy, not the ingest API; a 207 is read for the
//! events it rejects by id or by position, and one that cannot be matched is settled by
//! re-sending (see [`Partial`]).

use std::time::{Duration, SystemTime};
use uuid::Uuid;

/// What the upstream answered, as far as classification needs it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Answer<'a> {
    pub status: u16,
    pub retry_after: Option<&'a str>,
    /// `Location` of a redirect.
    pub location: Option<&'a str>,
    pub content_type: Option<&'a str>,
    /// The answer's `Date` header: a `Retry-After` date is measured against the server's clock.
    pub date: Option<&'a str>,
    /// At most the first MiB of the body.
    pub body: &'a [u8],
}

/// How a 207 names a rejected event.
#[derive(Debug, Clone, PartialEq)]
pub enum RejectKey {
    /// By `event_id` (compared as a UUID: case and braces do not matter).
    Id(Uuid),
    /// By 0-based position in the batch's `events` array.
    Index(u64),
    /// Something that names no event we can find (a bare message, a malformed id).
    Unknown(String),
}

/// What a 207 body says. [`Partial::matches`] turns it into positions in the batch, or None
/// when it cannot be matched exactly (the forwarder then re-sends the batch in halves, and the
/// idempotent upstream settles each event; it never acknowledges a batch blindly).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Partial {
    pub rejected: Vec<(RejectKey, String)>,
    /// `rejected_count` / `failed_count` / a numeric `failed` or `rejected`, when present.
    pub rejected_count: Option<u64>,
    /// `accepted_count` / `successful` / `succeeded`, when present.
    pub accepted_count: Option<u64>,
    /// The body was not a JSON object.
    pub unreadable: bool,
}

impl Partial {
    /// Positions in a batch of `ids` (in `events` order) that the server rejected, each with
    /// its reason; None when the answer cannot be matched to the batch exactly.
    pub fn matches(&self, ids: &[Uuid]) -> Option<Vec<(usize, String)>> {
        if self.unreadable {
            return None;
        }
        if self.rejected.is_empty()
            && self.rejected_count.is_none()
            && self.accepted_count.is_none()
        {
            // Nothing says which events, nor how many: nothing to go on.
            return None;
        }
        let mut out: Vec<(usize, String)> = Vec::with_capacity(self.rejected.len());
        for (key, reason) in &self.rejected {
            let i = match key {
                RejectKey::Id(id) => ids.iter().position(|x| x == id)?,
                RejectKey::Index(i) => usize::try_from(*i).ok().filter(|&i| i < ids.len())?,
                RejectKey::Unknown(_) => return None,
            };
            if !out.iter().any(|(j, _)| *j == i) {
                out.push((i, reason.clone()));
            }
        }
        let n = out.len() as u64;
        if self.rejected_count.is_some_and(|c| c != n) {
            return None;
        }
        if self
            .accepted_count
            .is_some_and(|a| a.checked_add(n) != Some(ids.len() as u64))
        {
            return None;
        }
        Some(out)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// 2xx (not 207, not an HTML page): every event in the batch is done.
    Delivered,
    /// 207: some events rejected (see [`Partial::matches`]).
    Partial(Partial),
    /// 413: the batch is too large; split it.
    TooLarge,
    /// 400 / 422: some events are refused; bisect to find them. Carries the server's reason.
    Rejected { status: u16, reason: String },
    /// 401 / 403: keep everything, alarm, retry slowly.
    Unauthorized { status: u16, reason: String },
    /// 3xx, 404, 405, a 2xx HTML page: the URL, path or network is wrong. Keep everything,
    /// alarm, retry slowly.
    Misconfigured { status: u16, reason: String },
    /// 429 / 503: wait as long as the server says (when it says).
    Throttled {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// 409, other 5xx, other 4xx, timeouts, connection errors: back off and retry.
    Retry { status: Option<u16>, reason: String },
}

/// Parse a Retry-After value: delay-seconds or an HTTP-date, measured from `now` (the
/// answer's own `Date` when it has one). None when it is neither.
pub fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // delay-seconds too large for 64 bits (RFC 9110 puts no bound on the digits): a very
    // long wait, capped by the caller at retry_after_max_ms, not "no Retry-After".
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(u64::MAX));
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

const REASON_KEYS: [&str; 7] = [
    "reason",
    "error",
    "error_message",
    "detail",
    "message",
    "errors",
    "status",
];

fn text_of(x: &serde_json::Value) -> String {
    match x {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn key_of(o: &serde_json::Map<String, serde_json::Value>) -> RejectKey {
    for k in ["event_id", "eventId", "id"] {
        if let Some(v) = o.get(k) {
            return match v.as_str().and_then(|s| Uuid::parse_str(s.trim()).ok()) {
                Some(id) => RejectKey::Id(id),
                None => RejectKey::Unknown(text_of(v)),
            };
        }
    }
    for k in ["index", "idx", "position"] {
        if let Some(v) = o.get(k) {
            return match v.as_u64() {
                Some(i) => RejectKey::Index(i),
                None => RejectKey::Unknown(text_of(v)),
            };
        }
    }
    RejectKey::Unknown(serde_json::Value::Object(o.clone()).to_string())
}

/// Whether a per-event result entry (`results`, `items`) reports a failure: Some(true) for a
/// failure word or a non-2xx code, Some(false) for a success word or a 2xx code, None when the
/// entry says something else (then the answer cannot be matched, and is settled by re-sending).
fn failed_status(o: &serde_json::Map<String, serde_json::Value>) -> Option<bool> {
    let code = |c: u64| Some(!(200..300).contains(&c));
    match o.get("status").or_else(|| o.get("result")) {
        Some(serde_json::Value::String(s)) => {
            let s = s.trim().to_ascii_lowercase();
            if let Ok(c) = s.parse::<u64>() {
                return code(c);
            }
            match s.as_str() {
                "accepted" | "ok" | "success" | "succeeded" | "created" | "duplicate"
                | "fulfilled" | "stored" => Some(false),
                "rejected" | "failed" | "failure" | "error" | "invalid" | "dlq" | "dead_letter"
                | "dead-letter" => Some(true),
                _ => None,
            }
        }
        Some(serde_json::Value::Number(n)) => n.as_u64().and_then(code),
        Some(serde_json::Value::Bool(ok)) => Some(!ok),
        None if o.contains_key("error") => Some(true),
        _ => None,
    }
}

/// Read a 207 body. Understands the collect contract's `dlq_events` with `rejected_count` and
/// `accepted_count`, the common lists `rejected`, `rejected_events`, `failed`, `failed_events`,
/// `errors` (entries: an event id string, or an object with `event_id`/`eventId`/`id` or a
/// 0-based `index`/`idx`/`position`, and a reason), and per-event `results`/`items` lists whose
/// entries carry a status.
pub fn parse_207(body: &[u8]) -> Partial {
    let Ok(serde_json::Value::Object(v)) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Partial {
            unreadable: true,
            ..Partial::default()
        };
    };
    let mut p = Partial::default();
    let count = |keys: &[&str]| keys.iter().find_map(|k| v.get(*k).and_then(|x| x.as_u64()));
    p.rejected_count = count(&["rejected_count", "failed_count", "rejected", "failed"]);
    p.accepted_count = count(&["accepted_count", "successful", "succeeded", "accepted"]);
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
                serde_json::Value::String(s) => p.rejected.push((
                    match Uuid::parse_str(s.trim()) {
                        Ok(id) => RejectKey::Id(id),
                        Err(_) => RejectKey::Unknown(s.clone()),
                    },
                    "rejected by upstream (207)".to_string(),
                )),
                serde_json::Value::Object(o) => {
                    let reason = REASON_KEYS[..6]
                        .iter()
                        .find_map(|k| o.get(*k))
                        .map(text_of)
                        .unwrap_or_else(|| "rejected by upstream (207)".to_string());
                    p.rejected.push((key_of(o), reason));
                }
                other => p
                    .rejected
                    .push((RejectKey::Unknown(other.to_string()), String::new())),
            }
        }
    }
    for list_key in ["results", "items"] {
        let Some(arr) = v.get(list_key).and_then(|a| a.as_array()) else {
            continue;
        };
        for (i, item) in arr.iter().enumerate() {
            let Some(o) = item.as_object() else { continue };
            let failed = match failed_status(o) {
                Some(f) => f,
                None => {
                    p.rejected
                        .push((RejectKey::Unknown(item.to_string()), String::new()));
                    continue;
                }
            };
            if failed {
                let key = match key_of(o) {
                    RejectKey::Unknown(_) => RejectKey::Index(i as u64),
                    k => k,
                };
                let reason = REASON_KEYS
                    .iter()
                    .find_map(|k| o.get(*k))
                    .map(text_of)
                    .unwrap_or_else(|| "rejected by upstream (207)".to_string());
                p.rejected.push((key, reason));
            }
        }
    }
    p
}

/// Whether a body is markup (an HTML or XML page: a captive portal, a proxy's error or login
/// page) rather than an answer of a JSON ingest API: an HTML content type, or a body whose
/// first character (after a byte-order mark and white space) is `<`.
fn is_html(content_type: Option<&str>, body: &[u8]) -> bool {
    if content_type.is_some_and(|t| {
        let t = t.trim_start().to_ascii_lowercase();
        t.starts_with("text/html") || t.starts_with("application/xhtml")
    }) {
        return true;
    }
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    body.iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'<')
}

pub fn classify(a: &Answer<'_>, now: SystemTime) -> Outcome {
    let status = a.status;
    match status {
        200..=299 if is_html(a.content_type, a.body) => Outcome::Misconfigured {
            status,
            reason: format!(
                "HTTP {status} with an HTML page (markup), not an answer of the ingest API (a captive portal or proxy in the way?)"
            ),
        },
        207 => Outcome::Partial(parse_207(a.body)),
        200..=299 => Outcome::Delivered,
        300..=399 => Outcome::Misconfigured {
            status,
            reason: match a.location {
                Some(l) => format!(
                    "HTTP {status} redirect to {l}; redirects are not followed (set upstream url/path to the ingest API itself)"
                ),
                None => format!("HTTP {status} redirect without a Location; redirects are not followed"),
            },
        },
        409 => Outcome::Retry {
            status: Some(409),
            reason: format!(
                "HTTP 409: the upstream is still handling this batch (same Idempotency-Key); retrying ({})",
                reason_from_body(409, a.body)
            ),
        },
        413 => Outcome::TooLarge,
        400 | 422 => Outcome::Rejected {
            status,
            reason: reason_from_body(status, a.body),
        },
        401 | 403 => Outcome::Unauthorized {
            status,
            reason: reason_from_body(status, a.body),
        },
        404 | 405 => Outcome::Misconfigured {
            status,
            reason: reason_from_body(status, a.body),
        },
        429 | 503 => {
            let server_now = a
                .date
                .and_then(|d| httpdate::parse_http_date(d.trim()).ok())
                .unwrap_or(now);
            Outcome::Throttled {
                status,
                retry_after: a.retry_after.and_then(|v| parse_retry_after(v, server_now)),
            }
        }
        _ => Outcome::Retry {
            status: Some(status),
            reason: reason_from_body(status, a.body),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(status: u16, retry_after: Option<&str>, body: &[u8]) -> Outcome {
        classify(
            &Answer {
                status,
                retry_after,
                body,
                ..Answer::default()
            },
            SystemTime::now(),
        )
    }

    #[test]
    fn statuses_map_to_outcomes() {
        assert_eq!(st(200, None, b"{}"), Outcome::Delivered);
        assert_eq!(st(202, None, b""), Outcome::Delivered);
        assert_eq!(st(413, None, b""), Outcome::TooLarge);
        assert!(
            matches!(st(422, None, br#"{"detail":"bad bag_id"}"#), Outcome::Rejected { status: 422, reason } if reason.contains("bad bag_id"))
        );
        assert!(matches!(
            st(401, None, b""),
            Outcome::Unauthorized { status: 401, .. }
        ));
        assert_eq!(
            st(429, Some("7"), b""),
            Outcome::Throttled {
                status: 429,
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(
            st(503, None, b""),
            Outcome::Throttled {
                status: 503,
                retry_after: None
            }
        );
        assert!(matches!(
            st(500, None, b""),
            Outcome::Retry {
                status: Some(500),
                ..
            }
        ));
    }

    /// Answers no contract names, each decided deliberately: never a delivery.
    #[test]
    fn redirects_conflicts_and_html_pages_are_not_deliveries() {
        for status in [300, 301, 302, 303, 304, 307, 308] {
            let o = classify(
                &Answer {
                    status,
                    location: Some("/moved"),
                    ..Answer::default()
                },
                SystemTime::now(),
            );
            assert!(
                matches!(&o, Outcome::Misconfigured { reason, .. } if reason.contains("/moved")),
                "{status}: {o:?}"
            );
        }
        assert!(matches!(
            st(409, None, b""),
            Outcome::Retry {
                status: Some(409),
                ..
            }
        ));
        for (ct, body) in [
            (Some("text/html; charset=utf-8"), &b"{}"[..]),
            (Some("TEXT/HTML"), b""),
            (None, b"\n  <!DOCTYPE html><html><body>Login</body></html>"),
            (Some("application/octet-stream"), b"<HTML><head>"),
            (Some("text/plain"), b"\xEF\xBB\xBF<!DOCTYPE html><html>"),
            (None, b"<!DOCTYPE  html>"),
            (None, b"<head><title>Login</title></head>"),
            (None, b"<?xml version=\"1.0\"?><html xmlns=\"x\">"),
            (None, b"<!-- portal --><html>"),
        ] {
            for status in [200, 201, 202, 204, 207] {
                let o = classify(
                    &Answer {
                        status,
                        content_type: ct,
                        body,
                        ..Answer::default()
                    },
                    SystemTime::now(),
                );
                assert!(
                    matches!(o, Outcome::Misconfigured { .. }),
                    "{status} {ct:?}: {o:?}"
                );
            }
        }
    }

    #[test]
    fn a_retry_after_too_large_for_64_bits_is_a_long_wait_not_none() {
        let now = SystemTime::now();
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }

    #[test]
    fn retry_after_http_date() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        // Measured against the answer's own Date, not our clock (ours is a day ahead here).
        let o = classify(
            &Answer {
                status: 503,
                retry_after: Some("Wed, 21 Oct 2015 07:28:30 GMT"),
                date: Some("Wed, 21 Oct 2015 07:28:00 GMT"),
                ..Answer::default()
            },
            now + Duration::from_secs(86_400),
        );
        assert_eq!(
            o,
            Outcome::Throttled {
                status: 503,
                retry_after: Some(Duration::from_secs(30))
            }
        );
    }

    fn ids(n: u128) -> Vec<Uuid> {
        (1..=n).map(|i| Uuid::from_u128(0xabc0_0000 + i)).collect()
    }

    #[test]
    fn partial_lists_ids_and_reasons_in_several_shapes() {
        let ids = ids(3);
        let body = format!(
            r#"{{"accepted_count":1,"rejected_count":2,"dlq_events":[{{"event_id":"{}","error":"bad learner"}},"{}"]}}"#,
            ids[0].hyphenated().to_string().to_uppercase(),
            ids[2].braced()
        );
        assert_eq!(
            parse_207(body.as_bytes()).matches(&ids),
            Some(vec![
                (0, "bad learner".into()),
                (2, "rejected by upstream (207)".into())
            ])
        );
    }

    /// Regression: a 207 listing rejected events by position left them deleted without a dead
    /// letter.
    #[test]
    fn partial_by_index_is_understood() {
        let ids = ids(10);
        let p = parse_207(
            br#"{"rejected_count":2,"errors":[{"index":2,"message":"bad"},{"index":7}]}"#,
        );
        let m = p.matches(&ids).unwrap();
        assert_eq!(m.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [2, 7]);
        assert_eq!(m[0].1, "bad");
        // Per-event results.
        let p = parse_207(br#"{"results":[{"status":"accepted"},{"status":"rejected","message":"no"},{"status":201},{"status":"201"}]}"#);
        assert_eq!(p.matches(&ids[..4]), Some(vec![(1, "no".into())]));
        // A status word nobody knows: not taken as a rejection, settled by re-sending.
        let p = parse_207(br#"{"results":[{"status":"queued"},{"status":"queued"}]}"#);
        assert_eq!(p.matches(&ids[..2]), None);
    }

    #[test]
    fn partial_that_cannot_be_matched_is_refused() {
        let ids = ids(10);
        for body in [
            &br#"{"rejected_count":2,"errors":[{"index":2}]}"#[..],
            br#"{"rejected_count":1,"errors":[{"index":12}]}"#,
            br#"{"errors":["bad field"]}"#,
            br#"{"failed":2,"errors":["a","b"]}"#,
            br#"{"dlq_events":[{"event_id":"00000000-0000-0000-0000-000000000001"}]}"#,
            br#"{"accepted_count":9}"#,
            br#"{}"#,
            b"<html>",
            b"",
            b"[1,2]",
        ] {
            assert_eq!(
                parse_207(body).matches(&ids),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // A count that agrees with nothing listed: everything was accepted.
        assert_eq!(
            parse_207(br#"{"accepted_count":10,"rejected_count":0}"#).matches(&ids),
            Some(vec![])
        );
    }
}
