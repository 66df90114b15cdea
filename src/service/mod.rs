//! Running as a service: logging (journald under systemd, human text on a terminal),
//! sd_notify (READY, STATUS, STOPPING, WATCHDOG), and signals.

use crate::spool::actor::SpoolHandle;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Tune glibc's allocator for a small, long-running daemon. Call first thing in `main`, before
/// any other thread exists.
///
/// At most 2 arenas: every thread otherwise gets an arena of its own, each keeping its freed
/// memory. The mmap threshold is left to glibc: the forwarder reuses its large buffers (JSON
/// body, compressor state), and mapping and unmapping every batch-sized allocation cost about
/// 1 µs of CPU per event in page faults (BENCHMARKS.md).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads
    // exist (the runtime is not built yet), and invalid values are rejected by glibc (ignored).
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Drop this process's page-table mappings of code it ran only while starting (argument and
/// config parsing, spool open and integrity check, TLS and runtime set-up).
///
/// Executable code is mapped from the binary and its libraries; when code is first run the
/// kernel maps not just the page touched but its neighbours ("fault-around"), so after start-up
/// nearly the whole 5 MB binary counts as resident although the running pipeline uses a
/// fraction of it. This tells the kernel to forget those mappings: the pages stay in the page
/// cache, and code still in use is mapped again on its next run (a minor fault, no disk read),
/// so the resident set shrinks to the code the pipeline actually runs.
///
/// Only read-only mappings that cannot hold modified data are touched: executable segments,
/// and the binary's first (header and read-only data) segment. Relocated read-only data
/// (RELRO) and all writable mappings are left alone.
pub fn release_startup_pages() {
    #[cfg(target_os = "linux")]
    {
        // smaps rather than maps: each mapping's count of anonymous (copy-on-write) pages
        // proves it holds no modified data.
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
            return;
        };
        let exe = std::fs::read_link("/proc/self/exe").ok();
        let mut released = 0usize;
        for (header, anonymous_kb) in mappings(&smaps) {
            let mut f = header.split_whitespace();
            let (Some(range), Some(perms), Some(offset)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let path = f.nth(2).map(std::path::Path::new);
            let Some(path) = path.filter(|p| p.is_absolute()) else {
                continue; // anonymous, heap, stack, vdso
            };
            let is_exe = exe.as_deref() == Some(path);
            let eligible = perms == "r-xp" || (is_exe && perms == "r--p" && offset == "00000000");
            if !eligible || anonymous_kb != Some(0) {
                continue;
            }
            let Some((a, b)) = range.split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            else {
                continue;
            };
            // SAFETY: the range is a whole read-only, file-backed private mapping of this
            // process with no anonymous (modified) pages, from /proc/self/smaps; MADV_DONTNEED
            // only drops its page-table entries, and the next access maps the same file pages
            // again.
            let r = unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED)
            };
            if r == 0 {
                released += end - start;
            }
        }
        tracing::debug!(bytes = released, "Released start-up code mappings");
    }
}

/// Each mapping's header line in `/proc/self/smaps` with its `Anonymous:` size in kB.
#[cfg(target_os = "linux")]
fn mappings(smaps: &str) -> Vec<(&str, Option<u64>)> {
    let mut out: Vec<(&str, Option<u64>)> = Vec::new();
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            out.push((line, None));
        } else if let (Some(last), Some(kb)) = (out.last_mut(), line.strip_prefix("Anonymous:")) {
            last.1 = kb.split_whitespace().next().and_then(|v| v.parse().ok());
        }
    }
    out
}

/// `trace|debug|info|warn|error` → a level (anything else: `default`). A plain level rather than
/// an env-filter expression: the filter's regex engine would add about a megabyte of resident
/// code to a daemon whose budget is 8 MB.
fn level(text: &str, default: tracing::Level) -> tracing::Level {
    match text.trim().to_ascii_lowercase().as_str() {
        "trace" => tracing::Level::TRACE,
        "debug" => tracing::Level::DEBUG,
        "info" => tracing::Level::INFO,
        "warn" => tracing::Level::WARN,
        "error" => tracing::Level::ERROR,
        _ => default,
    }
}

/// Journald when started by systemd (JOURNAL_STREAM is set), else text on stderr.
/// `RUST_LOG` / `SCANGATE_LOG` choose the level (default info).
pub fn init_logging() {
    let filter = std::env::var("SCANGATE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(logger) = systemd_journal_logger::JournalLog::new() {
            if logger
                .with_syslog_identifier("scangate".into())
                .install()
                .is_ok()
            {
                let level = match filter.to_ascii_lowercase().as_str() {
                    "trace" => log::LevelFilter::Trace,
                    "debug" => log::LevelFilter::Debug,
                    "warn" => log::LevelFilter::Warn,
                    "error" => log::LevelFilter::Error,
                    _ => log::LevelFilter::Info,
                };
                log::set_max_level(level);
                // No tracing subscriber: tracing's `log` feature forwards every event to journald.
                return;
            }
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_max_level(level(&filter, tracing::Level::INFO))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

pub fn notify_ready(status: &str) {
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ],
    );
}

pub fn notify_stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

/// Feed the systemd watchdog (when enabled) only while the spool thread answers; report the
/// backlog in STATUS.
pub fn spawn_watchdog(spool: SpoolHandle) -> Option<tokio::task::JoinHandle<()>> {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let period = Duration::from_micros(usec / 2);
    Some(tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            if let Ok(Ok(s)) = tokio::time::timeout(period, spool.stats()).await {
                let status = format!(
                    "backlog {} events, {} dead letters",
                    s.backlog, s.dead_letters
                );
                let _ = sd_notify::notify(
                    false,
                    &[
                        sd_notify::NotifyState::Watchdog,
                        sd_notify::NotifyState::Status(&status),
                    ],
                );
            }
        }
    }))
}

/// Cancel `token` on SIGTERM or SIGINT.
pub fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            return;
        };
        let Ok(mut int) = signal(SignalKind::interrupt()) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        token.cancel();
    });
}

/// For the demo: errors only, so the progress line stays readable.
pub fn init_logging_quiet() {
    let filter = std::env::var("SCANGATE_LOG").unwrap_or_default();
    let _ = tracing_subscriber::fmt()
        .with_max_level(level(&filter, tracing::Level::ERROR))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    fn rss_file_kb() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("RssFile:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn releasing_startup_pages_shrinks_the_mapped_code_and_everything_still_runs() {
        // Run plenty of code first so that it is mapped.
        let cfg = crate::config::Config::parse(crate::config::EXAMPLE, std::path::Path::new("/"));
        assert!(cfg.is_ok());
        let before = rss_file_kb();
        super::release_startup_pages();
        let after = rss_file_kb();
        assert!(after < before, "RssFile {before} kB -> {after} kB");
        // Code is mapped again on demand.
        let again = crate::config::Config::parse(crate::config::EXAMPLE, std::path::Path::new("/"));
        assert_eq!(cfg.is_ok(), again.is_ok());
    }
}
