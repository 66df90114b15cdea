//! Logging to journald with structured fields, through `systemd-journal-logger`.
//!
//! Every `tracing` event becomes one journal entry: `MESSAGE` is the human text (the message,
//! then `key=value` for each field, as on a terminal), `PRIORITY` its level, and each field is
//! also a journal field of its own (`SOURCE=dock`, `STATUS=503`, `EVENT_ID=…`, `ERROR=…`), so
//! `journalctl -u scangate SOURCE=dock` finds one reader's lines.

use std::fmt::Write as _;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

/// A `tracing` layer writing to the journal.
pub struct JournalLayer {
    journal: systemd_journal_logger::JournalLog,
}

impl JournalLayer {
    /// Connects to the journal's socket (errors when there is none).
    pub fn new() -> std::io::Result<JournalLayer> {
        let journal =
            systemd_journal_logger::JournalLog::new()?.with_syslog_identifier("scangate".into());
        Ok(JournalLayer { journal })
    }
}

/// An event's message and fields, as text.
#[derive(Default)]
struct Fields {
    message: String,
    pairs: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.pairs.push((field.name(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.pairs.push((field.name(), format!("{value:?}")));
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for JournalLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut f = Fields::default();
        event.record(&mut f);
        let mut text = f.message;
        for (k, v) in &f.pairs {
            let _ = write!(text, " {k}={v}");
        }
        let level = match *meta.level() {
            tracing::Level::ERROR => log::Level::Error,
            tracing::Level::WARN => log::Level::Warn,
            tracing::Level::INFO => log::Level::Info,
            tracing::Level::DEBUG => log::Level::Debug,
            tracing::Level::TRACE => log::Level::Trace,
        };
        let kvs: Vec<(&str, &str)> = f.pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let kvs = kvs.as_slice();
        // Nowhere to report a journal that went away.
        let _ = self.journal.journal_send(
            &log::Record::builder()
                .level(level)
                .target(meta.target())
                .module_path(meta.module_path())
                .file(meta.file())
                .line(meta.line())
                .key_values(&kvs)
                .args(format_args!("{text}"))
                .build(),
        );
    }
}

/// How many WARN lines one call site may write for one source in [`REPEAT_WINDOW`]; more are
/// counted, not written.
pub const REPEAT_BURST: u32 = 3;
/// The same for ERROR lines (data loss, operator action: more of them are shown, but a commit
/// failing forty times a second does not flood the journal).
pub const REPEAT_BURST_ERROR: u32 = 20;
/// See [`REPEAT_BURST`].
pub const REPEAT_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// At most this many (call site, source) pairs are tracked; beyond it nothing is held back.
const REPEAT_KEYS_MAX: usize = 4096;

/// Repeated log lines held back: a reader that drops every half second, or an upstream that
/// fails every retry, writes [`REPEAT_BURST`] WARN lines ([`REPEAT_BURST_ERROR`] ERROR lines) a
/// minute per call site, source and message, then one line saying how many were not written
/// (and like what) once the minute is over (with the next line logged anywhere). INFO and
/// below are never held back. The counters in `/metrics` have every one.
/// Windows by (call site, source, message).
type Seen = std::collections::HashMap<(tracing::callsite::Identifier, String, String), Window>;

/// Writes a summary: how many lines were held back, and the last one's message.
type Say = Box<dyn Fn(u64, &str) + Send + Sync>;

pub struct Repeats {
    seen: std::sync::Mutex<Seen>,
    /// When windows that ended with lines held back were last looked for.
    swept: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Writes a summary line (held back, like what) where the log goes (it cannot be an
    /// event: `tracing` does not dispatch from inside a filter).
    say: Say,
}

/// The summary's text.
pub const SUMMARY: &str = "Lines like this one were not written in the last minute (repeated)";

impl Repeats {
    /// `say(held, like)` writes the summary line.
    pub fn new(say: impl Fn(u64, &str) + Send + Sync + 'static) -> Repeats {
        Repeats {
            seen: Default::default(),
            swept: Default::default(),
            say: Box::new(say),
        }
    }

    /// Summaries as WARN lines on stderr (the text log).
    pub fn to_stderr() -> Repeats {
        Repeats::new(|held, like| {
            eprintln!(
                "{} WARN {SUMMARY} held={held} like={like}",
                crate::event::rfc3339_ms(crate::event::wall_now_ms())
            )
        })
    }

    /// Summaries as journal entries (PRIORITY warning, HELD and LIKE fields).
    pub fn to_journal(journal: systemd_journal_logger::JournalLog) -> Repeats {
        Repeats::new(move |held, like| {
            let held = held.to_string();
            let kvs = [("held", held.as_str()), ("like", like)];
            let kvs = kvs.as_slice();
            let _ = journal.journal_send(
                &log::Record::builder()
                    .level(log::Level::Warn)
                    .target("scangate")
                    .key_values(&kvs)
                    .args(format_args!("{SUMMARY} held={held} like={like}"))
                    .build(),
            );
        })
    }
}

struct Window {
    start: tokio::time::Instant,
    written: u32,
    held: u64,
    message: String,
}

/// The `source` field's value of an event (empty without one), and its message.
#[derive(Default)]
struct Key {
    source: String,
    message: String,
}

impl Visit for Key {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "source" => self.source = value.to_string(),
            "message" => self.message = value.to_string(),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "source" => self.source = format!("{value:?}"),
            "message" => self.message = format!("{value:?}"),
            _ => {}
        }
    }
}

impl Repeats {
    /// Whether to write `event`, and the summaries due (held back, like what) of windows
    /// that ended with lines held back (to be said first).
    fn admit(&self, event: &tracing::Event<'_>) -> (bool, Vec<(u64, String)>) {
        let now = tokio::time::Instant::now();
        let said = self.sweep(now);
        // INFO and below are not repeated lines by nature (a reload, a port opening).
        let burst = match *event.metadata().level() {
            tracing::Level::ERROR => REPEAT_BURST_ERROR,
            tracing::Level::WARN => REPEAT_BURST,
            _ => return (true, said),
        };
        let mut k = Key::default();
        event.record(&mut k);
        let id = event.metadata().callsite();
        let Ok(mut seen) = self.seen.lock() else {
            return (true, said);
        };
        if seen.len() >= REPEAT_KEYS_MAX {
            seen.retain(|_, w| now.duration_since(w.start) < REPEAT_WINDOW || w.held > 0);
            if seen.len() >= REPEAT_KEYS_MAX {
                return (true, said);
            }
        }
        let w = seen
            .entry((id, k.source, k.message.clone()))
            .or_insert(Window {
                start: now,
                written: 0,
                held: 0,
                message: String::new(),
            });
        let mut said = said;
        if now.duration_since(w.start) >= REPEAT_WINDOW {
            // Not yet swept (sweeps are a second apart): said now.
            if w.held > 0 {
                said.push((std::mem::take(&mut w.held), std::mem::take(&mut w.message)));
            }
            w.start = now;
            w.written = 0;
        }
        if w.written < burst {
            w.written += 1;
            (true, said)
        } else {
            w.held += 1;
            w.message = k.message;
            (false, said)
        }
    }

    /// At most once a second: the windows over with lines held back, whose counts are taken.
    fn sweep(&self, now: tokio::time::Instant) -> Vec<(u64, String)> {
        {
            let Ok(mut swept) = self.swept.lock() else {
                return Vec::new();
            };
            if swept.is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(1)) {
                return Vec::new();
            }
            *swept = Some(now);
        }
        let Ok(mut seen) = self.seen.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for w in seen.values_mut() {
            if w.held > 0 && now.duration_since(w.start) >= REPEAT_WINDOW {
                out.push((std::mem::take(&mut w.held), std::mem::take(&mut w.message)));
            }
        }
        out
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::layer::Filter<S> for Repeats {
    fn enabled(&self, _meta: &tracing::Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &tracing::Event<'_>, _cx: &Context<'_, S>) -> bool {
        let (write, said) = self.admit(event);
        for (held, like) in said {
            (self.say)(held, &like);
        }
        write
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;

    /// Collects written lines.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Lines {
        fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
            let mut f = Fields::default();
            event.record(&mut f);
            let mut text = f.message;
            for (k, v) in &f.pairs {
                text.push_str(&format!(" {k}={v}"));
            }
            self.0.lock().unwrap().push(text);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_lines_are_held_back_and_counted() {
        let lines = Lines::default();
        let said = lines.clone();
        let repeats = Repeats::new(move |held, like| {
            said.0
                .lock()
                .unwrap()
                .push(format!("{SUMMARY} held={held} like={like}"))
        });
        let sub = tracing_subscriber::registry().with(lines.clone().with_filter(repeats));
        let _g = tracing::subscriber::set_default(sub);
        // One call site, as a reader that keeps dropping hits it.
        let closed = |source: &str| tracing::warn!(source, "Serial port closed; reopening");
        for _ in 0..10 {
            closed("dock");
            closed("gate");
        }
        // Another call site is not held back by this one; INFO never; ERRORs after 20.
        tracing::warn!(source = "dock", "Something else");
        for _ in 0..5 {
            tracing::info!("Configuration reloaded");
        }
        for _ in 0..30 {
            tracing::error!(source = "dock", "Spool commit failed; reads dropped");
        }
        assert_eq!(
            lines.0.lock().unwrap().len(),
            2 * REPEAT_BURST as usize + 1 + 5 + REPEAT_BURST_ERROR as usize
        );
        assert!(!lines.0.lock().unwrap().iter().any(|l| l.contains(SUMMARY)));
        tokio::time::advance(REPEAT_WINDOW).await;
        closed("dock");
        // Both readers' summaries (7 held back each), then the line itself.
        let got = lines.0.lock().unwrap().clone();
        let summaries: Vec<&String> = got.iter().filter(|l| l.contains(SUMMARY)).collect();
        assert_eq!(summaries.len(), 3, "{got:?}");
        assert_eq!(
            summaries
                .iter()
                .filter(|l| l.contains("held=7") && l.contains("like=Serial port closed"))
                .count(),
            2,
            "{got:?}"
        );
        assert!(
            summaries
                .iter()
                .any(|l| l.contains("held=10") && l.contains("like=Spool commit failed")),
            "{got:?}"
        );
        assert!(got.last().unwrap().starts_with("Serial port closed"));
    }
}
