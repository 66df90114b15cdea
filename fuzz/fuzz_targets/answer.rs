//! Parsers of upstream answers on arbitrary bytes: 207 bodies (matched against a batch),
//! `Retry-After`, `Location` and content types through the classifier. Never a panic; a 207
//! that matches names only positions inside the batch.
#![no_main]
use libfuzzer_sys::fuzz_target;
use scangate::forward::outcome::{classify, parse_207, parse_retry_after, Answer, Outcome};
use std::time::{Duration, SystemTime};

fuzz_target!(|data: &[u8]| {
    let n = data.first().map_or(0, |b| *b as usize % 40);
    let ids: Vec<uuid::Uuid> = (0..n as u128).map(|i| uuid::Uuid::from_u128(i * 7919 + 1)).collect();
    if let Some(hit) = parse_207(data).matches(&ids) {
        assert!(hit.iter().all(|(i, _)| *i < ids.len()));
    }
    let text = String::from_utf8_lossy(data);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let _ = parse_retry_after(&text, now);
    let status = data.get(1..3).map_or(200, |b| 100 + u16::from_le_bytes([b[0], b[1]]) % 500);
    let mut parts = text.splitn(4, '\n');
    let a = Answer {
        status,
        retry_after: parts.next(),
        location: parts.next(),
        content_type: parts.next(),
        date: None,
        body: data,
    };
    if let Outcome::Delivered = classify(&a, now) {
        assert!((200..300).contains(&status) && status != 207);
    }
});
