//! `kind = "serial"`: a UART (or USB serial adapter), opened through tokio-serial.
//!
//! The port is read on a thread of its own with blocking reads, not on the async runtime:
//! an async tty wakes the poller on every write the device makes (hundreds of small writes
//! per second from a busy reader), each wake-up costing a context switch on a small box. The
//! thread instead reads whatever the tty has buffered, then pauses so the kernel collects the
//! next bytes: long enough for about [`TARGET_READ`] bytes at the rate the device has been
//! sending, at most `Feed::read_coalesce` (a few ms, so a trickle of reads is still
//! committed promptly). A read of at least [`STREAMING_READ`] bytes means data is streaming
//! and the next read follows at once. The kernel's tty buffer holds 4 KiB, over 40 ms even at
//! 921,600 baud, so the pause never overflows it; from a faster device (USB CDC, a
//! pseudo-terminal) the rest waits in the driver's buffers, and full reads follow at once.
//!
//! Reads are plain `read(2)` with the termios read timer (`VMIN = 0`, `VTIME`), straight into
//! the port's journal (a mapped file, `source::journal`), so that from the read on a crash
//! loses nothing. No `poll` before each read (on Linux a tty poll also waits for the kernel's
//! input worker); a read with nothing to return comes back after `VTIME_DS` tenths of a
//! second, so a stop request is seen. A read that returns nothing *before* the timer ran
//! means the line hung up (unplugged).
//!
//! When a device is unplugged the kernel discards what is still in its buffer: with the
//! pauses, that is at most one pause's worth of bytes (a few ms of reads).
//!
//! Never waits on the pipeline: while the read channel is full, reads are held in the thread
//! (up to [`HOLD_MAX`]) and the port is read on.
//!
//! Opening: the path is followed as a symlink (`/dev/serial/by-id/…`); the port settings are
//! the source's (`baud`, `data_bits`, `parity`, `stop_bits`, `flow_control`); pending input is
//! never flushed (bytes the device sent while scangate restarted are read); the source's
//! `init` bytes are written after every open (e.g. the command that starts continuous
//! reading, which a reader forgets when it loses power).
//!
//! Closing and reopening: on a read error, a hang-up (unplug), the path vanishing, or no byte
//! for `reopen_after_idle_ms` (when set), the port is closed and reopened with capped,
//! jittered backoff ([`REOPEN_MIN`] … [`REOPEN_MAX`]). The backoff resets only after a
//! connection that delivered bytes or lasted [`STABLE`], so a device that opens and hangs up at once costs one
//! open every few seconds and one log line, not a spin. While the path does not exist it is
//! looked for every [`PATH_POLL`] (a `stat`, not an open), so a replugged reader is back
//! within a fraction of a second.

use super::journal::Journal;
use super::{Feed, SourceRead, Stop};
use crate::config::{PortSettings, ProtocolConfig, SourceConfig};
use crate::protocol::Decoded;
use bytes::BytesMut;
use std::io::Read;
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

pub const REOPEN_MIN: Duration = Duration::from_millis(200);
pub const REOPEN_MAX: Duration = Duration::from_secs(10);
/// A connection that lasted this long resets the reopen backoff.
pub const STABLE: Duration = Duration::from_secs(5);
/// How often a missing device path is looked for.
pub const PATH_POLL: Duration = Duration::from_millis(250);
/// A read this large found the kernel's tty input buffer (4 KiB on Linux, of which 4095
/// bytes are returned) full, so more may be waiting behind it: read again at once.
pub const STREAMING_READ: usize = 4000;
/// Bytes a read should find waiting after a pause: seven eighths of the tty buffer.
pub const TARGET_READ: f64 = 3584.0;
/// How long one blocking read waits for data before looking for a stop request, in tenths of
/// a second (termios `VTIME`).
const VTIME_DS: u8 = 2;
const READ_SIZE: usize = 16 * 1024;

/// Run the source until `shutdown`: the port is served by a thread named after the source.
pub async fn run(
    cfg: &SourceConfig,
    path: &Path,
    port: PortSettings,
    init: &[u8],
    feed: Feed,
    shutdown: CancellationToken,
) {
    let (stop, stopped) = Stop::new();
    let (done_tx, done) = tokio::sync::oneshot::channel::<()>();
    let name = cfg.name.clone();
    let port_cfg = Port {
        path: path.to_path_buf(),
        settings: port,
        init: init.to_vec(),
        protocol: cfg.protocol.clone(),
        idle_reopen: cfg.reopen_after_idle,
    };
    let beat = feed.metrics.progress.beat(&format!("source {name}"));
    let spawned = std::thread::Builder::new()
        .name(format!("serial:{name}"))
        .spawn(move || {
            serve(&name, &port_cfg, &feed, &stopped, &beat);
            beat.retire();
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        tracing::error!(source = %cfg.name, error = %e, "Cannot start the serial reader thread");
        return;
    }
    let mut done = done;
    tokio::select! {
        _ = shutdown.cancelled() => { stop.stop(); let _ = done.await; }
        _ = &mut done => {}
    }
}

/// Bytes of reads (tags and a fixed overhead each) a serial thread holds while the read
/// channel is full. The port is read on meanwhile (a UART cannot be paused); only beyond this
/// are reads dropped, counted `pipeline_full`. 2 MiB is ~20,000 typical reads (4 s at 5,000
/// reads/s), or 500 reads of 4 KiB.
pub const HOLD_MAX: usize = 2 * 1024 * 1024;

/// The reader thread's hand-over: reads go to the channel in order, are held while it is full
/// (the thread never waits on the pipeline), and are dropped only beyond [`HOLD_MAX`].
struct Handover<'a> {
    feed: &'a Feed,
    held: std::collections::VecDeque<SourceRead>,
    /// [`SourceRead::size`] of everything in `held`.
    held_bytes: usize,
    /// Journal position of the last read put into the channel.
    last_sent: u64,
    closed: bool,
    /// The last read handed over was not its frame's last.
    in_frame: bool,
    /// Dropping the rest of a frame whose first read was dropped.
    dropping: bool,
    /// Reads dropped since reads last got through, whether that was said yet, and the pace of
    /// saying it.
    dropped_since: u64,
    drops_said: bool,
    drop_log: crate::metrics::LogThrottle,
    drop_end_log: crate::metrics::LogThrottle,
}

impl<'a> Handover<'a> {
    fn new(feed: &'a Feed) -> Self {
        Handover {
            feed,
            held: std::collections::VecDeque::new(),
            held_bytes: 0,
            last_sent: 0,
            closed: false,
            in_frame: false,
            dropping: false,
            dropped_since: 0,
            drops_said: false,
            drop_log: crate::metrics::LogThrottle::new(Duration::from_secs(10)),
            drop_end_log: crate::metrics::LogThrottle::new(Duration::from_secs(10)),
        }
    }

    /// Hand one decoder output over; `more`: more reads of its frame follow (see
    /// [`SourceRead::frame_more`]).
    fn hand(&mut self, d: Decoded, wall_ms: i64, pos: u64, more: bool) {
        let Some(mut r) = self.feed.read_of(d, wall_ms, pos) else {
            return;
        };
        r.frame_more = more;
        // A frame's reads are kept or dropped together: a frame cut by a drop would leave the
        // ingest stage waiting for the rest of it.
        if self.dropping {
            self.dropping = more;
            self.dropped();
            return;
        }
        let in_frame = std::mem::replace(&mut self.in_frame, more);
        if self.held.is_empty() {
            match self.feed.try_put(r) {
                Ok(()) => {
                    self.last_sent = pos;
                    if self.dropped_since > 0 {
                        self.drops_ended(false);
                    }
                }
                Err(TrySendError::Closed(_)) => self.closed = true,
                Err(TrySendError::Full(r)) => {
                    self.feed.wake.notify_one();
                    self.hold(r);
                }
            }
        } else if self.held_bytes >= HOLD_MAX && !in_frame {
            self.in_frame = false;
            self.dropping = more;
            self.dropped();
        } else {
            // Within the bound, or the rest of a frame already partly handed over (at most
            // one frame beyond the bound).
            self.hold(r);
        }
    }

    /// A read dropped because the pipeline stayed full past [`HOLD_MAX`]: counted, and, since
    /// it is data lost, said: once as the dropping starts (at most every 10 s), and with how
    /// many were dropped once a read gets through again ([`Handover::drops_ended`]).
    fn dropped(&mut self) {
        self.feed.metrics.count_drop("pipeline_full", 1);
        self.dropped_since += 1;
        if !self.drops_said && self.drop_log.allow().is_some() {
            self.drops_said = true;
            tracing::error!(source = %self.feed.name, "Reads are being dropped: the pipeline stays full (the spool cannot commit as fast as this port reads: a slow or full disk?); counted in scangate_dropped_total{{reason=\"pipeline_full\"}}");
        }
    }

    /// Reads get through again: how many were dropped since it was last said, if any (at most
    /// every 10 s; the count goes on meanwhile). `last`: the run ends, said now.
    fn drops_ended(&mut self, last: bool) {
        if self.dropped_since > 0 && (last || self.drop_end_log.allow().is_some()) {
            tracing::error!(source = %self.feed.name, reads = self.dropped_since, "Reads were dropped while the pipeline was full (data lost; counted in scangate_dropped_total{{reason=\"pipeline_full\"}})");
            self.dropped_since = 0;
            self.drops_said = false;
        }
    }

    fn hold(&mut self, r: SourceRead) {
        self.held_bytes += r.size();
        self.held.push_back(r);
        self.feed.metrics.serial_held.add(1);
    }

    /// Move held reads into the channel while it has room.
    fn drain(&mut self) {
        let before = self.held.len();
        while let Some(r) = self.held.pop_front() {
            let pos = r.journal_end;
            let size = r.size();
            match self.feed.try_put(r) {
                Ok(()) => {
                    self.last_sent = pos;
                    if self.dropped_since > 0 {
                        self.drops_ended(false);
                    }
                    self.held_bytes -= size;
                }
                Err(TrySendError::Full(r)) => {
                    self.held.push_front(r);
                    self.feed.wake.notify_one();
                    break;
                }
                Err(TrySendError::Closed(_)) => {
                    self.closed = true;
                    self.held.clear();
                    self.held_bytes = 0;
                    break;
                }
            }
        }
        self.feed
            .metrics
            .serial_held
            .sub((before - self.held.len()) as u64);
    }

    /// At stop: every held read goes into the channel (the pipeline drains until the sources
    /// are done), waiting as needed.
    fn finish(&mut self) {
        self.feed.metrics.serial_held.sub(self.held.len() as u64);
        self.held_bytes = 0;
        while let Some(r) = self.held.pop_front() {
            let pos = r.journal_end;
            if self.feed.send_blocking(r) {
                self.last_sent = pos;
            } else {
                self.held.clear();
            }
        }
        self.drops_ended(true);
        // A run started again (a reload) waits until all of this is committed, so that it
        // does not take these reads from the port journal a second time.
        if let Some((_, marks)) = &self.feed.journal {
            marks.set_handed(&self.feed.name, self.last_sent);
        }
    }
}

/// What the reader thread needs of the source's config.
struct Port {
    path: std::path::PathBuf,
    settings: PortSettings,
    init: Vec<u8>,
    protocol: ProtocolConfig,
    idle_reopen: Option<Duration>,
}

/// Open the port with its settings, switch to timed reads, write the init bytes.
fn open_port(p: &Port) -> std::io::Result<std::fs::File> {
    open(&p.path, &p.settings, &p.init)
}

/// Open a serial port for blocking reads that return what is buffered, or nothing after
/// 0.2 s (so a caller can look for a stop request), and write `init` to it. Pending input is
/// not flushed. Errors: the device is missing, busy (another process has it open), or refuses
/// the settings.
pub fn open(path: &Path, s: &PortSettings, init: &[u8]) -> std::io::Result<std::fs::File> {
    let port = tokio_serial::new(path.to_string_lossy(), s.baud)
        .data_bits(s.data_bits)
        .parity(s.parity)
        .stop_bits(s.stop_bits)
        .flow_control(s.flow_control)
        .open_native()
        .map_err(std::io::Error::from)?;
    let file = timed_reads(port)?;
    if !init.is_empty() {
        write_within(&file, init, INIT_WRITE_MAX)?;
    }
    Ok(file)
}

/// A random factor in [0.5, 1.0) for backoff jitter, so gateways that lost the same USB hub
/// do not reopen in step.
fn jitter(d: Duration) -> Duration {
    let r = (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 2000.0;
    d.mul_f64(0.5 + r)
}

/// The reader thread: recover the journal, open, read, journal, decode, hand over; reopen with
/// backoff; until stopped.
/// `beat`: the thread's progress for the watchdog (idle while recovering the journal, which
/// waits for the ingest stage; busy around each read, which returns within `VTIME`).
fn serve(
    name: &str,
    port_cfg: &Port,
    feed: &Feed,
    stopped: &super::Stopped,
    beat: &crate::service::progress::Beat,
) {
    let path = port_cfg.path.as_path();
    let protocol = &port_cfg.protocol;
    let health = feed.health.clone();
    let mut delay = REOPEN_MIN;
    let mut last_error: Option<String> = None;
    let mut opened_before = false;
    let mut flapping_logged = false;
    let mut chunk = vec![0u8; READ_SIZE];
    let mut out = Handover::new(feed);
    // The decoder and its buffer carry over from recovery to the first open: a frame cut by
    // the crash is completed by the bytes the device sends next.
    let mut decoder = crate::protocol::Protocol::new(protocol);
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    let marks = feed.journal.as_ref().map(|(_, m)| m.clone());
    let mut journal = feed.journal.as_ref().and_then(|(dir, marks)| {
        let committed = marks.get(name);
        let mut recovered = 0u64;
        let opened = Journal::open(dir, name, committed, |bytes, wall_ms, end, new_stream| {
            if new_stream {
                // The port was reopened here: a frame cut by it is not continued.
                buf.clear();
                decoder = crate::protocol::Protocol::new(protocol);
            }
            buf.extend_from_slice(bytes);
            while let Ok(Some(d)) = decoder.decode(&mut buf) {
                let (pos, more) = frame_position(&decoder, end.saturating_sub(buf.len() as u64));
                if let Some(mut r) = feed.read_of(d, wall_ms, pos) {
                    r.frame_more = more;
                    recovered += 1;
                    if feed.send_blocking(r) {
                        out.last_sent = pos;
                    }
                }
            }
        });
        match opened {
            Ok(j) => {
                tracing::debug!(source = %name, committed, end = j.end(), files = j.files(), recovered, "Port journal open");
                if recovered > 0 {
                    feed.metrics.journal_recovered.add(recovered);
                    tracing::info!(source = %name, reads = recovered, "Recovered reads from the port journal (read before the last stop, not yet committed)");
                }
                Some(j)
            }
            Err(e) => {
                tracing::error!(source = %name, dir = %dir.display(), error = %e, "Cannot open the port journal: reads flow, but a crash may lose the reads in flight");
                None
            }
        }
    });
    // Every recovered read is in the channel: the suppression stage may end passes by time.
    feed.recovery_done();
    let mut pos_end = journal.as_ref().map_or(0, Journal::end);
    // Positions up to which everything is settled (committed, or consumed without a read in
    // flight): journal files before it can go.
    let settle = |journal: &mut Option<Journal>, out: &Handover<'_>, decoded: u64| {
        if let (Some(j), Some(m)) = (journal.as_mut(), marks.as_ref()) {
            let committed = m.get(name);
            let settled = if out.held.is_empty() && committed >= out.last_sent {
                decoded
            } else {
                committed
            };
            j.maintain(settled);
        }
    };
    // Held reads still go out while the port is away; true when stopped.
    let pause = |out: &mut Handover<'_>, d: Duration| -> bool {
        beat.busy_for(d);
        let deadline = tokio::time::Instant::now() + d;
        loop {
            out.drain();
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            if stopped.wait(left.min(Duration::from_millis(20))) {
                return true;
            }
        }
    };
    while !stopped.is_stopped() && !out.closed {
        beat.busy();
        // A missing path (unplugged USB adapter) is watched, not opened in a loop.
        if !path.exists() {
            let msg = "device path does not exist (unplugged?)".to_string();
            if last_error.as_deref() != Some(msg.as_str()) {
                tracing::warn!(source = %name, path = %path.display(), "Serial device not present; waiting for it to appear");
                health.set_error(Some(msg.clone()));
                last_error = Some(msg);
            }
            if pause(&mut out, PATH_POLL) {
                break;
            }
            continue;
        }
        match open_port(port_cfg) {
            Ok(mut port) => {
                let opened_at = tokio::time::Instant::now();
                let device = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
                if opened_before {
                    health.reopens.inc();
                }
                opened_before = true;
                if !flapping_logged {
                    tracing::info!(source = %name, path = %path.display(), device = %device.display(), settings = %port_cfg.settings.describe(), init_bytes = port_cfg.init.len(), "Serial port open");
                }
                feed.metrics.sources_connected.add(1);
                health.set_connected(true, crate::event::wall_now_ms());
                health.set_error(None);
                last_error = None;
                // Bytes read since the last pause began, and when it began: the device's rate.
                let mut cycle_bytes = 0usize;
                let mut cycle_start = tokio::time::Instant::now();
                let mut last_byte = tokio::time::Instant::now();
                let mut got_bytes = false;
                let reason = loop {
                    if stopped.is_stopped() || out.closed {
                        feed.metrics.sources_connected.sub(1);
                        health.set_connected(false, crate::event::wall_now_ms());
                        out.finish();
                        return;
                    }
                    beat.busy();
                    beat.fault_point_blocking();
                    let started = tokio::time::Instant::now();
                    // Straight into the journal's mapped file: from the read on, a crash
                    // loses nothing (`source::journal`).
                    let read = match journal.as_mut() {
                        Some(j) => j.read_from(&mut port, READ_SIZE),
                        None => port.read(&mut chunk).map(|n| {
                            (&chunk[..n], pos_end + n as u64, crate::event::wall_now_ms())
                        }),
                    };
                    let (n, wall_ms) = match read {
                        Ok((bytes, end, wall_ms)) => {
                            buf.extend_from_slice(bytes);
                            pos_end = end;
                            (bytes.len(), wall_ms)
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => break format!("read error: {e}"),
                    };
                    if n == 0 {
                        // The read timer ran out (no data) or the line hung up.
                        if started.elapsed() < Duration::from_millis(VTIME_DS as u64 * 50) {
                            break "end of file (device gone?)".to_string();
                        }
                        // Idle: a frame in progress will not be completed (readers send a
                        // frame's bytes back to back), so a bogus length byte does not hold
                        // the frames behind it; skipped bytes still pending are reported.
                        // The freed reads come from bytes before `end`: all but the last carry
                        // their start, so a commit group keeps them together.
                        let (start, end) = (pos_end.saturating_sub(buf.len() as u64), pos_end);
                        let freed = decoder.idle(&mut buf);
                        let last_read = freed.iter().rposition(|d| matches!(d, Decoded::Read(_)));
                        for (k, d) in freed.into_iter().enumerate() {
                            let more = last_read.is_some_and(|l| k < l);
                            let pos = if more { start } else { end };
                            out.hand(d, crate::event::wall_now_ms(), pos, more);
                        }
                        out.drain();
                        settle(&mut journal, &out, pos_end.saturating_sub(buf.len() as u64));
                        if !path.exists() {
                            break "device path vanished".to_string();
                        }
                        if port_cfg
                            .idle_reopen
                            .is_some_and(|d| last_byte.elapsed() >= d)
                        {
                            break "no byte from the device for reopen_after_idle_ms".to_string();
                        }
                        continue;
                    }
                    last_byte = tokio::time::Instant::now();
                    got_bytes = true;
                    feed.metrics.frames_in.inc();
                    feed.metrics.bytes_in.add(n as u64);
                    health.bytes.add(n as u64);
                    out.drain();
                    while let Ok(Some(d)) = decoder.decode(&mut buf) {
                        let (pos, more) =
                            frame_position(&decoder, pos_end.saturating_sub(buf.len() as u64));
                        out.hand(d, wall_ms, pos, more);
                    }
                    feed.wake_if_high();
                    settle(&mut journal, &out, pos_end.saturating_sub(buf.len() as u64));
                    cycle_bytes += n;
                    if n < STREAMING_READ {
                        let now = tokio::time::Instant::now();
                        let pause = pause_for(cycle_bytes, now - cycle_start, feed.read_coalesce);
                        cycle_bytes = 0;
                        cycle_start = now;
                        if stopped.wait(pause) {
                            feed.metrics.sources_connected.sub(1);
                            health.set_connected(false, crate::event::wall_now_ms());
                            out.finish();
                            return;
                        }
                    } else {
                        // Streaming: the tty refills its 4 KiB from the driver's buffer in a
                        // kernel worker queued on this CPU by the read. Yielding lets it run
                        // now, so the next read finds bytes instead of sleeping until the
                        // worker has run (a sleep and a wake-up per 4 KiB otherwise).
                        std::thread::yield_now();
                    }
                };
                drop(port);
                feed.metrics.sources_connected.sub(1);
                health.set_connected(false, crate::event::wall_now_ms());
                health.set_error(Some(reason.clone()));
                // A connection that delivered bytes or lasted is a real one: the backoff
                // restarts. One that hung up at once, silent, is a flapping device.
                if got_bytes || opened_at.elapsed() >= STABLE {
                    delay = REOPEN_MIN;
                    flapping_logged = false;
                    tracing::warn!(source = %name, path = %path.display(), reason = %reason, "Serial port closed; reopening");
                } else if !flapping_logged {
                    flapping_logged = true;
                    tracing::warn!(source = %name, path = %path.display(), reason = %reason, "Serial port closes right after opening; retrying with backoff (logged once until it stays open)");
                }
                // A new connection starts a new byte stream: a partial frame is not continued,
                // neither now nor by a recovery of the journal.
                decoder = crate::protocol::Protocol::new(protocol);
                buf.clear();
                if let Some(j) = journal.as_mut() {
                    j.new_stream();
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(source = %name, path = %path.display(), error = %msg, "Cannot open serial port; retrying with backoff");
                    health.set_error(Some(msg.clone()));
                    last_error = Some(msg);
                }
            }
        }
        if pause(&mut out, jitter(delay)) {
            break;
        }
        delay = (delay * 2).min(REOPEN_MAX);
    }
    out.finish();
}

/// How long writing the `init` bytes may take: a port that does not take them (hardware flow
/// control with CTS low, an XOFF from the device) is an open error, retried with backoff,
/// never a reader thread blocked for good.
pub const INIT_WRITE_MAX: Duration = Duration::from_secs(2);

/// Write all of `bytes` to the port within `limit`, without blocking past it.
fn write_within(file: &std::fs::File, bytes: &[u8], limit: Duration) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor `file` owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let deadline = tokio::time::Instant::now() + limit;
    let mut rest = bytes;
    let result = loop {
        if rest.is_empty() {
            break Ok(());
        }
        // SAFETY: writes from a live slice of `rest.len()` bytes.
        let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
        if n >= 0 {
            rest = &rest[n as usize..];
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    break Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "the port did not take the init bytes within {limit:?} ({} of {} written): flow control holding it?",
                            bytes.len() - rest.len(),
                            bytes.len()
                        ),
                    ));
                }
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
            }
            _ => break Err(e),
        }
    };
    // SAFETY: restores the flags read above on the same descriptor.
    unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
    result
}

/// The journal position a decoder output settles, and whether more reads of its frame
/// follow: `after` (the position just after the bytes consumed) for a frame's last output,
/// the frame's start for the others (their frame is not settled until its last read is).
fn frame_position(decoder: &crate::protocol::Protocol, after: u64) -> (u64, bool) {
    if decoder.frame_pending() {
        (after.saturating_sub(decoder.last_frame_len() as u64), true)
    } else {
        (after, false)
    }
}

/// Blocking reads that return what is buffered at once, or nothing after `VTIME_DS` tenths of
/// a second: `VMIN = 0`, `VTIME = VTIME_DS` (raw mode is already set by tokio-serial).
fn timed_reads(port: impl std::os::fd::IntoRawFd) -> std::io::Result<std::fs::File> {
    use nix::sys::termios::{tcgetattr, tcsetattr, SetArg, SpecialCharacterIndices};
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: `into_raw_fd` hands over the port's open descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(port.into_raw_fd()) };
    let mut t = tcgetattr(&fd)?;
    t.control_chars[SpecialCharacterIndices::VMIN as usize] = 0;
    t.control_chars[SpecialCharacterIndices::VTIME as usize] = VTIME_DS;
    tcsetattr(&fd, SetArg::TCSANOW, &t)?;
    Ok(std::fs::File::from(fd))
}

/// The pause after a short read: the time the device needs to send [`TARGET_READ`] bytes at
/// the rate it sent `bytes` over `over`, at most `max`.
pub fn pause_for(bytes: usize, over: Duration, max: Duration) -> Duration {
    let per_sec = bytes as f64 / over.as_secs_f64().max(1e-6);
    if per_sec <= 0.0 {
        return max;
    }
    Duration::from_secs_f64(TARGET_READ / per_sec).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port that takes no more output (its buffer full: flow control holding it) fails the
    /// init write after the limit instead of blocking the reader thread for good.
    #[test]
    fn an_init_write_that_cannot_complete_times_out() {
        use std::os::fd::FromRawFd;
        let mut fds = [0i32; 2];
        // SAFETY: pipe(2) fills the two-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors were just created and are owned here only.
        let (_r, w) = unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        };
        let started = tokio::time::Instant::now();
        // More than a pipe holds (64 KiB), and nobody reads.
        let e = write_within(&w, &vec![0xFF; 256 * 1024], Duration::from_millis(200))
            .expect_err("cannot complete");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // A write that fits completes.
        let (_r2, w2) = {
            let mut f = [0i32; 2];
            // SAFETY: as above.
            assert_eq!(unsafe { libc::pipe(f.as_mut_ptr()) }, 0);
            // SAFETY: as above.
            unsafe {
                (
                    std::fs::File::from_raw_fd(f[0]),
                    std::fs::File::from_raw_fd(f[1]),
                )
            }
        };
        write_within(&w2, &[1, 2, 3], Duration::from_millis(200)).unwrap();
    }

    #[test]
    fn pause_follows_the_device_rate_up_to_the_limit() {
        let max = Duration::from_millis(10);
        // 490 kB/s (5,000 frames/s of 98 bytes): ~7.3 ms for 3.5 KiB.
        let p = pause_for(4900, Duration::from_millis(10), max);
        assert!(
            p > Duration::from_millis(7) && p < Duration::from_millis(8),
            "{p:?}"
        );
        // A trickle (or an idle line): the full coalescing pause.
        assert_eq!(pause_for(30, Duration::from_millis(200), max), max);
        assert_eq!(pause_for(0, Duration::from_millis(1), max), max);
        // Streaming at 10 MB/s: well under a millisecond, so the buffer never waits full.
        assert!(pause_for(40_000, Duration::from_millis(4), max) < Duration::from_micros(400));
    }
}
