//! Field tools: `scangate sniff` (decode a port live, or a capture offline, and guess the
//! protocol) and `scangate record` (write what a port sends as a capture a technician can
//! send in). Nothing here runs inside the daemon.

use crate::config::{PortSettings, ProtocolConfig, ProtocolKind};
use crate::protocol::{decode_all, Decoded, Protocol};
use crate::source::capture::{self, CaptureKind};
use bytes::BytesMut;
use std::collections::HashMap;
use std::io::{Read as _, Write};
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::codec::Decoder;

/// One decoder output as a JSON line: a read (`kind, tag, rssi_dbm, antenna, symbology`, and
/// `rssi_raw` when the reader gives only its own unit), a skip (`skip, reason, bytes`) or a
/// frame that is not a read (`frame`).
pub fn json_line(d: &Decoded) -> String {
    let v = match d {
        Decoded::Read(r) => {
            let mut v = serde_json::json!({
                "kind": r.kind.as_str(),
                "tag": r.tag,
                "rssi_dbm": r.rssi_dbm,
                "antenna": r.antenna,
                "symbology": r.symbology,
            });
            if let Some(raw) = r.rssi_raw {
                v["rssi_raw"] = raw.into();
            }
            v
        }
        Decoded::Skipped { reason, bytes } => {
            serde_json::json!({"skip": true, "reason": reason, "bytes": bytes})
        }
        Decoded::Frame { what } => serde_json::json!({"frame": what}),
    };
    v.to_string()
}

/// Decode a capture file's text with `cfg`: a serial capture as one byte stream, an MQTT
/// capture message by message. A last line cut short (a recording that ended on a full disk)
/// is left out and returned as a warning. Errors: the capture's format (line and reason).
pub fn decode_capture(
    text: &str,
    cfg: &ProtocolConfig,
) -> Result<(Vec<Decoded>, Option<capture::CaptureError>), capture::CaptureError> {
    let (kind, records, warning) = capture::parse_recording(text)?;
    let outs = match kind {
        CaptureKind::Serial => {
            let bytes: Vec<u8> = records.into_iter().flat_map(|r| r.bytes).collect();
            decode_all(&mut Protocol::new(cfg), &bytes, true)
        }
        CaptureKind::Mqtt => records
            .iter()
            .flat_map(|r| decode_all(&mut Protocol::new(cfg), &r.bytes, true))
            .collect(),
    };
    Ok((outs, warning))
}

/// How well one protocol explains a sample of bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Guess {
    pub protocol: ProtocolKind,
    /// Share of the bytes inside valid frames, 0 … 1.
    pub score: f64,
    pub reads: usize,
    pub frames: usize,
    pub skipped_bytes: usize,
}

impl Guess {
    /// In words, for the technician: how sure the match is.
    pub fn confidence(&self) -> &'static str {
        match (self.score, self.reads + self.frames) {
            (s, n) if s >= 0.95 && n >= 3 => "certain",
            (s, n) if s >= 0.8 && n >= 2 => "likely",
            (s, n) if s >= 0.5 && n >= 1 => "possible",
            _ => "no match",
        }
    }
}

/// Try every protocol on `sample`; best first. A text protocol (`lines`) only wins when the
/// lines are printable reads, so binary frames are never mistaken for text.
pub fn guess(sample: &[u8]) -> Vec<Guess> {
    let mut out: Vec<Guess> = ProtocolKind::ALL
        .iter()
        .map(|(_, kind)| {
            let outs = decode_all(&mut Protocol::of(*kind), sample, true);
            let skipped_bytes: usize = outs
                .iter()
                .map(|d| match d {
                    Decoded::Skipped { bytes, .. } => *bytes,
                    _ => 0,
                })
                .sum();
            let reads = outs
                .iter()
                .filter(|d| matches!(d, Decoded::Read(_)))
                .count();
            let frames = outs
                .iter()
                .filter(|d| matches!(d, Decoded::Frame { .. }))
                .count();
            let score = if sample.is_empty() || reads + frames == 0 {
                0.0
            } else {
                1.0 - skipped_bytes.min(sample.len()) as f64 / sample.len() as f64
            };
            Guess {
                protocol: *kind,
                score,
                reads,
                frames,
                skipped_bytes,
            }
        })
        .collect();
    // Best score; among equals, more frames; then the binary protocols (their checksums make
    // a match meaningful) before lines.
    out.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.frames.cmp(&a.frames))
            .then((a.protocol == ProtocolKind::Lines).cmp(&(b.protocol == ProtocolKind::Lines)))
    });
    out
}

/// The baud rates `sniff --protocol auto` tries on a port, the protocols' defaults first.
pub const AUTO_BAUDS: [u32; 9] = [
    9600, 115_200, 57_600, 19_200, 38_400, 230_400, 460_800, 921_600, 4800,
];

/// One read from a port opened by `serial::open`: `Ok(0)` when nothing came for 0.2 s, an
/// error when the device hung up (a read that returns nothing at once: unplugged).
fn read_port(port: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        let started = Instant::now();
        match port.read(buf) {
            Ok(0) if started.elapsed() < Duration::from_millis(100) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the device hung up (unplugged?)",
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Read from an open port for `listen`, at most `max` bytes.
fn sample(port: &mut std::fs::File, listen: Duration, max: usize) -> std::io::Result<Vec<u8>> {
    let end = Instant::now() + listen;
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::new();
    while Instant::now() < end && out.len() < max {
        let n = read_port(port, &mut buf)?;
        out.extend_from_slice(&buf[..n]);
    }
    Ok(out)
}

/// `sniff --protocol auto` on a port: listen at each baud rate (the given one only, if any),
/// after writing `init` (readers that stay silent until told to start), and report the best
/// protocol. Returns the port settings and protocol that matched.
pub fn auto_detect(
    path: &Path,
    baud: Option<u32>,
    init: &[u8],
    listen: Duration,
    out: &mut impl Write,
) -> anyhow::Result<Option<(PortSettings, ProtocolKind)>> {
    let bauds: Vec<u32> = baud.map_or(AUTO_BAUDS.to_vec(), |b| vec![b]);
    let mut best: Option<(PortSettings, Guess)> = None;
    for b in bauds {
        let settings = PortSettings::new(b);
        let mut port = crate::source::serial::open(path, &settings, init)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        let bytes = sample(&mut port, listen, 64 * 1024)?;
        let g = guess(&bytes).remove(0);
        writeln!(
            out,
            "{:>7} baud: {:>6} bytes, best {} ({:.0}% of bytes in valid frames, {} reads, {} other frames): {}",
            b,
            bytes.len(),
            g.protocol.name(),
            g.score * 100.0,
            g.reads,
            g.frames,
            g.confidence()
        )?;
        let better = best.as_ref().is_none_or(|(_, x)| g.score > x.score);
        let certain = g.confidence() == "certain";
        if better {
            best = Some((settings, g));
        }
        if certain {
            break;
        }
    }
    match best {
        Some((s, g)) if g.confidence() != "no match" => {
            writeln!(
                out,
                "match: protocol = \"{}\", baud = {} ({})",
                g.protocol.name(),
                s.baud,
                g.confidence()
            )?;
            Ok(Some((s, g.protocol)))
        }
        _ => {
            writeln!(
                out,
                "no protocol matched: check the wiring, the reader's output mode, or try --baud"
            )?;
            Ok(None)
        }
    }
}

/// Reads per second per tag over the last second (for aiming antennas). Bounded: tags not
/// seen for a second are forgotten.
#[derive(Default)]
struct Rates(HashMap<String, Vec<Instant>>);

impl Rates {
    fn seen(&mut self, tag: &str, now: Instant) -> usize {
        let window = Duration::from_secs(1);
        if self.0.len() > 10_000 {
            self.0
                .retain(|_, v| v.last().is_some_and(|t| now - *t < window));
        }
        let v = self.0.entry(tag.to_string()).or_default();
        v.retain(|t| now - *t < window);
        v.push(now);
        v.len()
    }
}

/// `sniff --port`: decode a port live until `duration` (or forever) and print each read
/// (tag, RSSI, antenna, reads/s of that tag) and each bad frame; `json` prints JSON lines.
pub fn sniff_port(
    path: &Path,
    settings: &PortSettings,
    proto: &ProtocolConfig,
    init: &[u8],
    json: bool,
    duration: Option<Duration>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut port = crate::source::serial::open(path, settings, init)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    if !json {
        writeln!(
            out,
            "{} at {}, protocol {}; Ctrl-C to stop",
            path.display(),
            settings.describe(),
            proto.kind.name()
        )?;
    }
    let start = Instant::now();
    let mut decoder = Protocol::new(proto);
    let mut buf = BytesMut::new();
    let mut rates = Rates::default();
    let mut chunk = vec![0u8; 4096];
    while duration.is_none_or(|d| start.elapsed() < d) {
        let n = read_port(&mut port, &mut chunk)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let mut outs = Vec::new();
        if n == 0 {
            outs.extend(decoder.idle(&mut buf));
        } else {
            buf.extend_from_slice(&chunk[..n]);
            while let Ok(Some(d)) = decoder.decode(&mut buf) {
                outs.push(d);
            }
        }
        for d in outs {
            if json {
                writeln!(out, "{}", json_line(&d))?;
                continue;
            }
            let t = start.elapsed().as_secs_f64();
            match &d {
                Decoded::Read(r) => {
                    let rssi = match (r.rssi_dbm, r.rssi_raw) {
                        (Some(v), _) => format!("{v:>6.1} dBm"),
                        (None, Some(raw)) => format!("raw {raw:>5}"),
                        _ => "       -  ".into(),
                    };
                    let ant = r.antenna.map_or("-".into(), |a| a.to_string());
                    let per_s = rates.seen(&r.tag, Instant::now());
                    writeln!(
                        out,
                        "{t:>9.3}s  {:<8} {:<32} {rssi}  ant {ant:<3} {per_s:>4} reads/s",
                        r.kind.as_str(),
                        r.tag
                    )?;
                }
                Decoded::Skipped { reason, bytes } => {
                    writeln!(out, "{t:>9.3}s  BAD      {reason} ({bytes} bytes)")?
                }
                Decoded::Frame { what } => writeln!(out, "{t:>9.3}s  frame    {what}")?,
            }
        }
        out.flush()?;
    }
    Ok(())
}

/// `record`: write what the port sends as a `scangate-capture v1 serial` file, one record per
/// read with its offset in ms, flushed as it goes (a file cut by Ctrl-C is still valid).
/// Returns the bytes recorded.
pub fn record(
    path: &Path,
    settings: &PortSettings,
    init: &[u8],
    file: &Path,
    duration: Option<Duration>,
) -> anyhow::Result<u64> {
    let mut port = crate::source::serial::open(path, settings, init)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(file)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", file.display()))?,
    );
    writeln!(f, "scangate-capture v1 serial")?;
    writeln!(
        f,
        "# recorded by scangate record {}",
        env!("CARGO_PKG_VERSION")
    )?;
    writeln!(f, "# port: {}", path.display())?;
    if let Ok(dev) = std::fs::canonicalize(path) {
        writeln!(f, "# device: {}", dev.display())?;
    }
    writeln!(f, "# settings: {}", settings.describe())?;
    if !init.is_empty() {
        writeln!(f, "# init: {}", crate::protocol::hex_upper(init))?;
    }
    writeln!(
        f,
        "# started: {}",
        crate::event::rfc3339_ms(crate::event::wall_now_ms())
    )?;
    f.flush()?;
    let start = Instant::now();
    let mut total = 0u64;
    let mut chunk = vec![0u8; 4096];
    while duration.is_none_or(|d| start.elapsed() < d) {
        let n = read_port(&mut port, &mut chunk)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        if n == 0 {
            continue;
        }
        total += n as u64;
        let hex: Vec<String> = chunk[..n].iter().map(|b| format!("{b:02x}")).collect();
        writeln!(f, "{} hex {}", start.elapsed().as_millis(), hex.join(" "))?;
        f.flush()?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guess_names_each_protocol_from_its_own_frames() {
        let samples: [(&[u8], ProtocolKind); 4] = [
            (
                b"0125728359\r\n]E04006381333931\r\n0125728360\r\n",
                ProtocolKind::Lines,
            ),
            (
                b"\x0262E3086CED08\x03\x0262E3086CED08\x03\x0262E3086CED08\x03",
                ProtocolKind::Em4100,
            ),
            (
                &[
                    0xBB, 0x01, 0xFF, 0x00, 0x01, 0x15, 0x16, 0x7E, 0xBB, 0x01, 0xFF, 0x00, 0x01,
                    0x15, 0x16, 0x7E, 0xBB, 0x01, 0x28, 0x00, 0x01, 0x00, 0x2A, 0x7E,
                ],
                ProtocolKind::UhfBb,
            ),
            (
                &[
                    0x15, 0x00, 0x01, 0x03, 0x01, 0x01, 0x0C, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                    0x00, 0x00, 0x00, 0x00, 0x03, 0x13, 0x6B, 0xB1, 0xA5, 0x15, 0x00, 0x01, 0x03,
                    0x01, 0x01, 0x0C, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                    0x03, 0x13, 0x6B, 0xB1, 0xA5, 0x05, 0x00, 0x76, 0x01, 0xEB, 0xD8,
                ],
                ProtocolKind::Chafon,
            ),
        ];
        for (bytes, want) in samples {
            let g = guess(bytes);
            assert_eq!(g[0].protocol, want, "{g:?}");
            assert_eq!(g[0].confidence(), "certain", "{g:?}");
        }
        // Line noise (bytes that start no UTF-8 character and no frame) matches nothing.
        let noise: Vec<u8> = (0..300).map(|i| 0x80 + (i % 0x3A) as u8).collect();
        assert_eq!(
            guess(&noise)[0].confidence(),
            "no match",
            "{:?}",
            guess(&noise)
        );
    }

    #[test]
    fn json_lines_name_reads_skips_and_frames() {
        let out = decode_all(
            &mut Protocol::of(ProtocolKind::Em4100),
            b"\x00\x0262E3086CED08\x03",
            true,
        );
        let lines: Vec<String> = out.iter().map(json_line).collect();
        assert_eq!(lines[0], r#"{"bytes":1,"reason":"garbage","skip":true}"#);
        let v: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(v["tag"], "62E3086CED");
        assert_eq!(v["kind"], "em4100");
        assert!(v["rssi_dbm"].is_null());
    }
}
