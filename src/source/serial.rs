//! `kind = "serial"`: a UART (or USB serial adapter) through tokio-serial.
//!
//! Reads into a buffer and decodes; never waits on the pipeline (see `Feed`). On open failure,
//! error or EOF (unplug) it closes the port, sleeps a backoff step and reopens: no reconnect
//! storms. Full port settings and init bytes come with the serial-protocols work.

use super::Feed;
use crate::config::SourceConfig;
use bytes::BytesMut;
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio_serial::SerialPortBuilderExt;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

const REOPEN_MIN: Duration = Duration::from_millis(200);
/// After a short read, wait this long before reading again so that one read (and one wake-up
/// of the pipeline) carries several frames. The kernel's tty buffer (4 KiB) takes over 40 ms to
/// fill even at 921,600 baud, so this can never cause an overflow; it adds at most this much
/// latency to a read.
const READ_COALESCE: Duration = Duration::from_millis(2);
/// A read at least this large means data is streaming: read again at once.
const STREAMING_READ: usize = 2048;
const REOPEN_MAX: Duration = Duration::from_secs(10);

pub async fn run(
    cfg: &SourceConfig,
    path: &Path,
    baud: u32,
    feed: Feed,
    shutdown: CancellationToken,
) {
    let mut delay = REOPEN_MIN;
    let mut last_error: Option<String> = None;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        match tokio_serial::new(path.to_string_lossy(), baud).open_native_async() {
            Ok(mut port) => {
                tracing::info!(source = %cfg.name, path = %path.display(), baud, "Serial port open");
                feed.metrics.sources_connected.add(1);
                last_error = None;
                delay = REOPEN_MIN;
                let mut decoder = crate::protocol::Protocol::new(cfg.protocol);
                let mut buf = BytesMut::with_capacity(8192);
                let reason = loop {
                    if buf.capacity() - buf.len() < 1024 {
                        buf.reserve(8192);
                    }
                    let n = tokio::select! {
                        r = port.read_buf(&mut buf) => r,
                        _ = shutdown.cancelled() => { feed.metrics.sources_connected.sub(1); return; }
                    };
                    match n {
                        Ok(0) => break "end of file (device gone?)".to_string(),
                        Ok(n) => {
                            feed.metrics.frames_in.inc();
                            feed.metrics.bytes_in.add(n as u64);
                            while let Ok(Some(d)) = decoder.decode(&mut buf) {
                                if !feed.push(d).await {
                                    feed.metrics.sources_connected.sub(1);
                                    return;
                                }
                            }
                            if n < STREAMING_READ {
                                tokio::time::sleep(READ_COALESCE).await;
                            }
                        }
                        Err(e) => break e.to_string(),
                    }
                };
                feed.metrics.sources_connected.sub(1);
                tracing::warn!(source = %cfg.name, path = %path.display(), reason = %reason, "Serial port closed; reopening");
            }
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(source = %cfg.name, path = %path.display(), error = %msg, "Cannot open serial port; retrying with backoff");
                    last_error = Some(msg);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
        delay = (delay * 2).min(REOPEN_MAX);
    }
}
