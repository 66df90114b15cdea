//! Running as a service: logging (journald under systemd, human text on a terminal),
//! sd_notify (READY, STATUS, STOPPING, WATCHDOG), and signals.

pub mod logging;
pub mod progress;

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

/// Journald when started by systemd (JOURNAL_STREAM is set), with each event's fields as
/// journal fields ([`logging::JournalLayer`]); else text on stderr, coloured only on a
/// terminal. Repeated lines are held back and counted ([`logging::Repeats`]).
/// `RUST_LOG` / `SCANGATE_LOG` choose the level (default info).
pub fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = std::env::var("SCANGATE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let max = level(&filter, tracing::Level::INFO);
    let level_filter = tracing_subscriber::filter::LevelFilter::from_level(max);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journal) = logging::JournalLayer::new() {
            // Libraries that log through `log` (rustls, rumqttc) go to the journal as well.
            if let Ok(logger) = systemd_journal_logger::JournalLog::new() {
                if logger
                    .with_syslog_identifier("scangate".into())
                    .install()
                    .is_ok()
                {
                    log::set_max_level(match max {
                        tracing::Level::TRACE => log::LevelFilter::Trace,
                        tracing::Level::DEBUG => log::LevelFilter::Debug,
                        tracing::Level::INFO => log::LevelFilter::Info,
                        tracing::Level::WARN => log::LevelFilter::Warn,
                        tracing::Level::ERROR => log::LevelFilter::Error,
                    });
                }
            }
            let summaries = systemd_journal_logger::JournalLog::new()
                .map(|j| j.with_syslog_identifier("scangate".into()));
            let repeats = match summaries {
                Ok(j) => logging::Repeats::to_journal(j),
                Err(_) => logging::Repeats::new(|_, _| {}),
            };
            if tracing_subscriber::registry()
                .with(journal.with_filter(repeats).with_filter(level_filter))
                .try_init()
                .is_ok()
            {
                return;
            }
        }
    }
    // Colour only on a terminal: a log file or a pipe gets plain text.
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false)
                .with_filter(logging::Repeats::to_stderr())
                .with_filter(level_filter),
        )
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

/// `RELOADING=1` (with `MONOTONIC_USEC`, which systemd 253+ requires): a reload began; it ends
/// with [`notify_ready`].
pub fn notify_reloading() {
    let mut states = vec![sd_notify::NotifyState::Reloading];
    if let Ok(t) = sd_notify::NotifyState::monotonic_usec_now() {
        states.push(t);
    }
    let _ = sd_notify::notify(false, &states);
}

pub fn notify_stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

/// Feed the systemd watchdog (when enabled, `WATCHDOG_USEC`) every half interval, only while
/// every stage makes progress or waits for a known reason: the spool thread answers, and no
/// stage is busy past its allowance ([`progress::Progress::wedged`]: a wedged forwarder, a
/// stuck source thread). Otherwise the pings stop, each wedged stage is named in an ERROR and
/// in STATUS, and systemd restarts the daemon. STATUS also reports the backlog.
pub fn spawn_watchdog(
    spool: SpoolHandle,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> Option<tokio::task::JoinHandle<()>> {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let interval = Duration::from_micros(usec);
    metrics.progress.set_allowance(interval);
    // Checked every quarter interval; a ping needs the spool to have answered within half of
    // it (an fsync on a slow SD card), and the loop, at most three quarters long, pings in time.
    let period = interval / 4;
    Some(tokio::spawn(async move {
        let mut said: Vec<String> = Vec::new();
        let mut answered = tokio::time::Instant::now();
        let mut last = None;
        loop {
            tokio::time::sleep(period).await;
            // Waited for up to half the interval: an answer that slow still counts.
            if let Ok(Ok(s)) = tokio::time::timeout(interval / 2, spool.stats()).await {
                answered = tokio::time::Instant::now();
                last = Some(s);
            }
            let spool_ok = answered.elapsed() <= interval / 2;
            let wedged = metrics.progress.wedged();
            let status = match (last.as_ref().filter(|_| spool_ok), wedged.first()) {
                (Some(s), None) => {
                    said.clear();
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
                    continue;
                }
                (_, Some(w)) => format!(
                    "{} made no progress for {} s; the watchdog restarts scangate",
                    w.stage,
                    w.busy_for.as_secs()
                ),
                (_, None) => "the spool does not answer; the watchdog restarts scangate".into(),
            };
            for w in &wedged {
                if !said.contains(&w.stage) {
                    tracing::error!(stage = %w.stage, busy_s = w.busy_for.as_secs(), "A stage made no progress within the watchdog interval; no more watchdog pings: systemd restarts the daemon (what was accepted is in the spool and the port journals)");
                    said.push(w.stage.clone());
                }
            }
            if wedged.is_empty() && !said.iter().any(|s| s == "spool") {
                tracing::error!("The spool thread did not answer within half the watchdog interval; no more watchdog pings: systemd restarts the daemon");
                said.push("spool".into());
            }
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(&status)]);
        }
    }))
}

/// Cancel `token` on SIGTERM or SIGINT.
/// Install the signal handlers (synchronously: a signal that arrives after this returns is
/// handled) and cancel `token` on SIGTERM or SIGINT. SIGHUP, SIGUSR1 and SIGUSR2 are never
/// fatal: their default action would end the daemon without draining, and systemd's
/// `Restart=on-failure` does not restart a service that died of SIGHUP. They are logged
/// (config reload comes with the operations work).
/// Call inside the runtime.
pub fn spawn_signal_handler(token: CancellationToken) {
    spawn_signal_handler_with_reload(token, None)
}

/// [`spawn_signal_handler`], and on SIGHUP wake `reload` (the running pipeline reads its
/// configuration again).
pub fn spawn_signal_handler_with_reload(
    token: CancellationToken,
    reload: Option<std::sync::Arc<tokio::sync::Notify>>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    let hup = signal(SignalKind::hangup());
    if let Err(e) = &hup {
        tracing::warn!(error = %e, "Cannot handle SIGHUP; it would stop the daemon");
    }
    // SIGUSR1/SIGUSR2 would end the daemon too (their default action), without draining:
    // a stray `kill -USR1` (log rotation scripts send it) must not stop a gateway.
    let usr1 = signal(SignalKind::user_defined1()).ok();
    let usr2 = signal(SignalKind::user_defined2()).ok();
    // Every other signal whose default action ends a process and that the daemon does not
    // use (a stray `kill -ALRM`): logged and ignored, each on its own task.
    for (name, sig) in [
        ("SIGALRM", libc::SIGALRM),
        ("SIGVTALRM", libc::SIGVTALRM),
        ("SIGPROF", libc::SIGPROF),
        ("SIGIO", libc::SIGIO),
        ("SIGPWR", libc::SIGPWR),
        ("SIGSTKFLT", libc::SIGSTKFLT),
    ] {
        match signal(SignalKind::from_raw(sig)) {
            Ok(mut s) => {
                tokio::spawn(async move {
                    while s.recv().await.is_some() {
                        tracing::info!(signal = name, "Signal received and ignored");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(signal = name, error = %e, "Cannot handle a signal; it would stop the daemon")
            }
        }
    }
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (term, int) else {
            tracing::warn!("Cannot handle SIGTERM/SIGINT");
            return;
        };
        let mut hup = hup.ok();
        let (mut usr1, mut usr2) = (usr1, usr2);
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM received"); break; }
                _ = int.recv() => { tracing::info!("SIGINT received"); break; }
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    match &reload {
                        Some(r) => r.notify_one(),
                        None => tracing::info!("SIGHUP received and ignored (no configuration to reload here)"),
                    }
                }
                Some(()) = wait(usr1.as_mut()) => { tracing::info!("SIGUSR1 received and ignored"); }
                Some(()) = wait(usr2.as_mut()) => { tracing::info!("SIGUSR2 received and ignored"); }
            }
        }
        token.cancel();
    });
}

/// The next delivery of an optional signal stream (never, without one).
async fn wait(s: Option<&mut tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// For the demo: errors only, so the progress line stays readable.
pub fn init_logging_quiet() {
    let filter = std::env::var("SCANGATE_LOG").unwrap_or_default();
    let _ = tracing_subscriber::fmt()
        .with_max_level(level(&filter, tracing::Level::ERROR))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
