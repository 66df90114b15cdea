//! Configuration: one TOML file, read in two stages. The parsed document is walked once by
//! typed getters that record every problem with its span (so `scangate validate` lists them
//! all, with line and column), then cross-field checks run, and only a fully valid file becomes
//! a [`Config`]. Relative paths are resolved against the config file's directory.
//!
//! The commented example `config/scangate.toml` is the technician's reference; `print-config`
//! prints it, and a test loads every file in `config/`.

mod named_files;
mod walk;

pub use named_files::{bearer_token, check_named_files, pem_certificates, pem_private_key};

use std::path::{Path, PathBuf};
use std::time::Duration;
use toml_edit::ImDocument;
use walk::{Problems, Section};

pub use walk::parse_size;

/// Slowest replay speed factor accepted (a thousand times slower than recorded).
pub const MIN_SPEED_FACTOR: f64 = 0.001;

/// The commented example config, as shipped in `config/scangate.toml`.
pub const EXAMPLE: &str = include_str!("../../config/scangate.toml");

#[derive(Debug, Clone)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub spool: SpoolConfig,
    pub suppress: SuppressConfig,
    pub sources: Vec<SourceConfig>,
    pub upstream: UpstreamConfig,
    pub admin: AdminConfig,
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub id: String,
    /// Site name (→ `tenant_id` in the collect profile). Defaults to the gateway id.
    pub site: String,
    pub state_dir: PathBuf,
    /// Where the serial ports' journals live (`source::journal`): `[gateway] journal_dir`, or
    /// `$RUNTIME_DIRECTORY/journal` under systemd, or `<state_dir>/journal`.
    pub journal_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    DropOldest,
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// fsync the WAL at every commit: nothing accepted is lost on power loss.
    Full,
    /// fsync only at checkpoints: may lose the last commits on power loss.
    Normal,
}

#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub max_bytes: u64,
    pub when_full: WhenFull,
    pub sync: SyncMode,
    pub commit_interval: Duration,
    pub commit_max_events: usize,
    /// Bound of the dead letters (their own; not part of `max_bytes`).
    pub dead_letter_max_bytes: u64,
}

/// How repeat reads become events (`[suppress] mode`, or a source's `suppress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuppressMode {
    /// One event per pass, when the pass ends.
    Aggregate,
    /// One event at the first read of a pass; the rest of the pass is swallowed.
    First,
    /// One event per read (no suppression).
    Off,
}

impl SuppressMode {
    pub const CHOICES: [&'static str; 3] = ["aggregate", "first", "off"];

    fn of(name: &str) -> SuppressMode {
        match name {
            "first" => SuppressMode::First,
            "off" => SuppressMode::Off,
            _ => SuppressMode::Aggregate,
        }
    }
}

/// `[suppress]`: repeat suppression and zone arbitration (see `src/suppress/`).
#[derive(Debug, Clone)]
pub struct SuppressConfig {
    pub mode: SuppressMode,
    /// Quiet time that ends a pass.
    pub window: Duration,
    /// Window of sources with protocol = "lines" (barcode scanners) that set none: short,
    /// so a scanner beeping twice on one bag is one pass and the next bag is not merged.
    pub barcode_window: Duration,
    /// A pass lasting this long is emitted and a new one opens (a parked tag).
    pub max_pass: Duration,
    /// Reads weaker than this (dBm, after calibration) are dropped and counted.
    pub min_rssi_dbm: Option<f64>,
    /// Open passes tracked at most; when full the longest idle is emitted early.
    pub max_tracked: usize,
    /// How much stronger (mean RSSI, dB) another zone must read a tag to take its pass.
    pub zone_margin_db: f64,
    /// How long (ms) it must stay stronger.
    pub zone_dwell: Duration,
    /// How fast (dB per second) the current zone's mean fades while it does not read the tag.
    pub zone_fade_db_per_s: f64,
}

/// A source's own suppression settings (`[[source]]` keys), each overriding `[suppress]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceSuppress {
    /// `suppress = "aggregate" | "first" | "off"`.
    pub mode: Option<SuppressMode>,
    /// `window_ms`.
    pub window: Option<Duration>,
    /// `rssi_offset_db`: added to this reader's RSSI, dB (calibration between models).
    pub rssi_offset_db: f64,
    /// `min_rssi_dbm`.
    pub min_rssi_dbm: Option<f64>,
}

/// The decoders (`protocol = "…"` in a `[[source]]`), see `src/protocol/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolKind {
    Lines,
    Em4100,
    ThingMagic,
    UhfBb,
    Chafon,
}

impl ProtocolKind {
    /// Every protocol with its config name.
    pub const ALL: [(&'static str, ProtocolKind); 5] = [
        ("lines", ProtocolKind::Lines),
        ("em4100", ProtocolKind::Em4100),
        ("thingmagic", ProtocolKind::ThingMagic),
        ("uhf-bb", ProtocolKind::UhfBb),
        ("chafon", ProtocolKind::Chafon),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, k)| *k == self)
            .map_or("lines", |(n, _)| n)
    }

    pub fn parse(name: &str) -> Option<ProtocolKind> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, k)| *k)
    }

    /// The port settings the readers of this protocol ship with (REFERENCE-READERS.md).
    pub fn default_baud(self) -> u32 {
        match self {
            ProtocolKind::Lines | ProtocolKind::Em4100 => 9600,
            ProtocolKind::ThingMagic | ProtocolKind::UhfBb => 115_200,
            ProtocolKind::Chafon => 57_600,
        }
    }
}

/// The inventory answer layout of a `chafon` reader (the frames do not tell).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChafonFamily {
    /// UHFReader18 / CF-RU5102: EPCs only.
    Classic,
    /// UHFReader288 / 86, SID UR: antenna and a raw RSSI byte per EPC.
    #[default]
    Rssi,
}

/// A source's decoder and its settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ProtocolConfig {
    pub kind: ProtocolKind,
    /// `lines`: prefix, suffix, field template.
    pub lines: crate::protocol::lines::LinesOptions,
    /// `chafon`: answer layout.
    pub chafon_family: ChafonFamily,
    /// `chafon`: dBm = raw RSSI byte + this (unset: raw only).
    pub raw_rssi_offset_db: Option<f32>,
}

impl From<ProtocolKind> for ProtocolConfig {
    fn from(kind: ProtocolKind) -> Self {
        ProtocolConfig {
            kind,
            lines: Default::default(),
            chafon_family: ChafonFamily::default(),
            raw_rssi_offset_db: None,
        }
    }
}

/// Data bits, parity, stop bits and flow control of a serial port (8N1, no flow control by
/// default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSettings {
    pub baud: u32,
    pub data_bits: tokio_serial::DataBits,
    pub parity: tokio_serial::Parity,
    pub stop_bits: tokio_serial::StopBits,
    pub flow_control: tokio_serial::FlowControl,
}

impl PortSettings {
    pub fn new(baud: u32) -> Self {
        PortSettings {
            baud,
            data_bits: tokio_serial::DataBits::Eight,
            parity: tokio_serial::Parity::None,
            stop_bits: tokio_serial::StopBits::One,
            flow_control: tokio_serial::FlowControl::None,
        }
    }

    /// `9600 8N1` style, as technicians write it (flow control added when on).
    pub fn describe(&self) -> String {
        let bits = match self.data_bits {
            tokio_serial::DataBits::Five => 5,
            tokio_serial::DataBits::Six => 6,
            tokio_serial::DataBits::Seven => 7,
            tokio_serial::DataBits::Eight => 8,
        };
        let parity = match self.parity {
            tokio_serial::Parity::None => 'N',
            tokio_serial::Parity::Odd => 'O',
            tokio_serial::Parity::Even => 'E',
        };
        let stop = match self.stop_bits {
            tokio_serial::StopBits::One => 1,
            tokio_serial::StopBits::Two => 2,
        };
        let flow = match self.flow_control {
            tokio_serial::FlowControl::None => "",
            tokio_serial::FlowControl::Software => " xon/xoff",
            tokio_serial::FlowControl::Hardware => " rts/cts",
        };
        format!("{} {bits}{parity}{stop}{flow}", self.baud)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ReplaySpeed {
    Recorded,
    Max,
    Factor(f64),
}

#[derive(Debug, Clone)]
pub enum SourceKind {
    Serial {
        path: PathBuf,
        port: PortSettings,
        /// Bytes written after every open (e.g. the command that starts continuous reading).
        init: Vec<u8>,
    },
    Replay {
        file: PathBuf,
        speed: ReplaySpeed,
        repeat: u32,
    },
    /// Subscribe to an MQTT broker (see `source::mqtt`).
    Mqtt(Box<MqttSource>),
}

/// `kind = "mqtt"`: a broker, topic filters each with a payload protocol, and the session.
#[derive(Debug, Clone)]
pub struct MqttSource {
    /// Broker host (name or address) and port (`mqtt://host:1883`, `mqtts://host:8883`).
    pub host: String,
    pub port: u16,
    /// `mqtts://`: TLS, verified against `ca_file` (else the system's roots).
    pub tls: bool,
    /// The MQTT client id. Unset: `scangate-<gateway id>-<source name>`, the same at every
    /// start, so the broker keeps the persistent session (and its queued messages) for it.
    pub client_id: Option<String>,
    pub topics: Vec<MqttTopic>,
    /// Subscription QoS: 1 (at least once, acknowledged after commit) or 0.
    pub qos: u8,
    pub username: Option<String>,
    /// File holding the password (or `credential:NAME`); read at every connect.
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// MQTT keep-alive (the broker drops the session's connection after 1.5× this silent).
    pub keep_alive: Duration,
    /// Payloads longer than this are counted, logged and acknowledged without decoding.
    pub max_payload_bytes: usize,
    /// The broker's window of unacknowledged messages to this client (mosquitto's
    /// `max_inflight_messages`, 20 by default): the ingest stage commits early when half of
    /// it waits, so the broker is never stalled for a whole commit interval.
    pub broker_max_inflight: usize,
    /// Reconnect backoff bounds (jittered, doubling).
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Whose clock stamps a read: `gateway` (default: when scangate received the message) or
    /// `reader` (the payload's timestamp when plausible, else the gateway's).
    pub reader_clock: bool,
}

/// One subscription: a topic filter and how its payloads are decoded.
#[derive(Debug, Clone)]
pub struct MqttTopic {
    pub filter: String,
    pub payload: PayloadProtocol,
}

/// How one MQTT payload is decoded.
#[derive(Debug, Clone)]
pub enum PayloadProtocol {
    /// `impinj-iot` (`protocol::impinj_iot`).
    ImpinjIot,
    /// `zebra-iotc` (`protocol::zebra_iotc`).
    ZebraIotc,
    /// `json` with the source's `[source.json]` mapping.
    Json(Box<crate::protocol::json_map::JsonMapping>),
    /// A byte-stream protocol (`lines` …), each payload decoded as a whole.
    Stream(ProtocolConfig),
}

impl PayloadProtocol {
    /// The payload-only protocols' config names.
    pub const NAMES: [&'static str; 3] = ["impinj-iot", "zebra-iotc", "json"];
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub kind: SourceKind,
    pub protocol: ProtocolConfig,
    pub location: String,
    /// Antenna port → location (a portal's antennas at different doors); unlisted antennas
    /// take `location`.
    pub antenna_locations: Vec<(u16, String)>,
    /// Serial: close and reopen the port (and send `init` again) after this long without a
    /// byte. For readers that send keep-alives while they work; unset, silence is normal.
    pub reopen_after_idle: Option<Duration>,
    pub device: String,
    /// Arbitration group: sources whose read zones overlap (default: the source alone).
    pub group: Option<String>,
    /// This source's suppression overrides.
    pub suppress: SourceSuppress,
    pub scan_type: Option<String>,
    /// Sensor readings: one is emitted when its value moved by more than this since the last
    /// one emitted (in the value's own unit; 0: any change)…
    pub deadband: f64,
    /// … or when this long passed since the last one emitted.
    pub heartbeat: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    BagEvents,
    Collect,
}

impl Profile {
    pub fn default_path(self) -> &'static str {
        match self {
            Profile::BagEvents => "/api/v1/events/batch",
            Profile::Collect => "/api/v1/collect",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip(u32),
    Zstd(i32),
    None,
}

impl Compression {
    pub fn content_encoding(self) -> Option<&'static str> {
        match self {
            Compression::Gzip(_) => Some("gzip"),
            Compression::Zstd(_) => Some("zstd"),
            Compression::None => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Fifo,
    LiveFirst,
}

#[derive(Debug, Clone, Default)]
pub struct FieldMapping {
    pub rename: Vec<(String, String)>,
    pub constant: Vec<(String, String)>,
}

/// Largest accepted `upstream.max_in_flight`.
pub const MAX_IN_FLIGHT: usize = 64;
/// `upstream.max_in_flight` when not set.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 16;

/// Where committed events go (`upstream.kind`).
#[derive(Debug, Clone, PartialEq)]
pub enum Sink {
    /// `"http"` (the default): batches are POSTed to the ingest API at `endpoint`.
    Http,
    /// `"redis-streams"`: events are added to a Redis Stream directly (see
    /// `crate::forward::redis`).
    RedisStreams(Box<RedisConfig>),
}

/// How one event becomes a stream entry (`upstream.entry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryShape {
    /// `"json"` (the default): fields `event_id`, `event_type` (`scan` or `sensor`) and
    /// `data`, the event's bag-events JSON object.
    Json,
    /// `"fields"`: every top-level field of the event's bag-events JSON object is a field of
    /// the entry (strings as they are, numbers as decimal text, nulls left out).
    Fields,
}

/// `[upstream]` with `kind = "redis-streams"`.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    /// `redis://host[:port][/db]` or `rediss://…` (TLS), without credentials (they come from
    /// `username` and `password_file`).
    pub url: String,
    /// ACL user name (Redis 6+); None: the `default` user.
    pub username: Option<String>,
    /// File holding the password (or `credential:NAME`); re-read after an authentication
    /// failure.
    pub password_file: Option<PathBuf>,
    /// PEM client certificate and key for TLS client authentication (`rediss://` only).
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// The stream key (`stream`, default `baggage_events`, as in contract 000).
    pub stream: String,
    /// Approximate trimming (`XADD … MAXLEN ~ n`); 0: never trimmed. Default 100,000
    /// (contract 000).
    pub maxlen: u64,
    /// Stream that receives a record of every dead letter (`dlq_stream`, default
    /// `<stream>:dlq`); None when set to "" (dead letters stay in the spool only).
    pub dlq_stream: Option<String>,
    pub entry: EntryShape,
    /// Lifetime of an event's idempotency key (`idempotency_ttl_s`, default 86,400 s as
    /// contract 002 keeps them; contract 000's API keeps 300 s). A copy of an event sent again
    /// after its key expired is added again.
    pub idempotency_ttl: Duration,
    /// Idempotency key of an event: this prefix + its `event_id` (`idempotency_prefix`,
    /// default `{<stream>}:seen:`: the hash tag keeps the keys in the stream's cluster slot).
    pub idempotency_prefix: String,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// HTTP: the full endpoint URL, base url + profile path (or the `path` override). Redis:
    /// the `url` as configured (without credentials). Shown in logs and `status`.
    pub endpoint: String,
    pub sink: Sink,
    pub profile: Profile,
    pub compression: Compression,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub batch_max_events: usize,
    pub batch_max_bytes: usize,
    pub batch_max_delay: Duration,
    pub timeout: Duration,
    /// Idle keep-alive connections are closed after this (`pool_idle_ms`, default 4 s: below
    /// the 5 s that common ingest servers keep an idle connection).
    pub pool_idle: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub auth_retry: Duration,
    pub retry_after_max: Duration,
    pub order: Order,
    pub backlog_max_eps: u32,
    /// Ceiling of requests in flight at once (`max_in_flight`, 1 to [`MAX_IN_FLIGHT`], default
    /// [`DEFAULT_MAX_IN_FLIGHT`]); the forwarder starts at 1 and adapts (see
    /// `crate::forward::concurrency`). 1 sends one batch at a time.
    pub max_in_flight: usize,
    /// `event_type` of the collect profile.
    pub event_type: String,
    pub fields: FieldMapping,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: Option<std::net::SocketAddr>,
    /// `/health` says 503 when a serial reader has been disconnected this long
    /// (`source_down_after_ms`, default 60 s).
    pub source_down_after: Duration,
    /// … and when the upstream has been failing this long (`upstream_down_after_ms`, default
    /// 5 min; shorter outages are what the spool is for).
    pub upstream_down_after: Duration,
    /// A file holding the bearer token every request must carry (`token_file`); required
    /// for a listener on anything but loopback.
    pub token_file: Option<PathBuf>,
}

/// Every problem found in a config file, each with file, line, column and key.
/// The largest config file read (1 MiB: a gateway's config is a few KB).
pub const CONFIG_MAX_BYTES: u64 = 1024 * 1024;

/// The largest file the config names (a CA bundle, a token, a password): 1 MiB.
pub const NAMED_FILE_MAX_BYTES: u64 = 1024 * 1024;

/// Read `path` if it is a regular file of at most `max` bytes. The type is looked at before
/// opening (opening a FIFO for reading blocks for ever; opening a serial device may reset
/// what hangs on it), again on the opened file (the path may have been swapped meanwhile), the
/// file is opened non-blocking (a regular-looking file such as `/proc/kmsg` that would block
/// is an error, not a hang), and the read is bounded (`/dev/zero` would fill the memory). Used
/// for the config file and every file it names.
pub fn read_small_file(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let not_regular = || std::io::Error::other("not a regular file");
    if !std::fs::metadata(path)?.is_file() {
        return Err(not_regular());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(not_regular());
    }
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "larger than {max} bytes: is this the right file?"
        )));
    }
    Ok(bytes)
}

/// [`read_small_file`] of at most [`NAMED_FILE_MAX_BYTES`], as UTF-8 text.
pub fn read_named_text(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_small_file(path, NAMED_FILE_MAX_BYTES)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render_invalid(.path, .errors))]
    Invalid {
        path: PathBuf,
        errors: Vec<LocatedError>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct LocatedError {
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub message: String,
}

/// For the parser's "duplicate key `k` …" reported at line `again`: the line where `k` was
/// first set in the same table (searching back to the table's header), if it is found.
fn first_of_duplicate(text: &str, message: &str, again: usize) -> Option<usize> {
    let key = message.strip_prefix("duplicate key `")?.split('`').next()?;
    let lines: Vec<&str> = text.lines().collect();
    let key_of = |l: &str| {
        let l = l.trim_start();
        l.contains('=').then(|| {
            l.split('=')
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches(['"', '\''])
                .to_string()
        })
    };
    // Only a key set at the start of a line is looked for: a duplicate inside an inline table
    // (`t = { a = 1, a = 2 }`) or a dotted key is on the reported line itself.
    if key_of(lines.get(again.checked_sub(1)?)?).as_deref() != Some(key) {
        return None;
    }
    let mut first = None;
    for n in (1..again).rev() {
        let l = lines.get(n - 1)?.trim_start();
        if l.starts_with('[') {
            break;
        }
        if key_of(l).as_deref() == Some(key) {
            first = Some(n);
        }
    }
    first
}

/// Errors listed in full by [`render_invalid`]; past these, a count (a file this broken is
/// not the one meant, or its first errors cause the rest).
const RENDERED_ERRORS_MAX: usize = 200;
/// Characters of a key shown in an error (a 10,000-character key is shown by its start).
const RENDERED_KEY_MAX: usize = 80;

fn render_invalid(path: &Path, errors: &[LocatedError]) -> String {
    let mut s = format!("{} has {} error(s):", path.display(), errors.len());
    for e in errors.iter().take(RENDERED_ERRORS_MAX) {
        let key = match e.key.char_indices().nth(RENDERED_KEY_MAX) {
            Some((cut, _)) => format!("{}…", &e.key[..cut]),
            None => e.key.clone(),
        };
        s.push_str(&format!(
            "\n  {}:{}:{}: {}: {}",
            path.display(),
            e.line,
            e.column,
            key,
            e.message
        ));
    }
    if errors.len() > RENDERED_ERRORS_MAX {
        s.push_str(&format!(
            "\n  … and {} more error(s) not shown: fix the ones above first",
            errors.len() - RENDERED_ERRORS_MAX
        ));
    }
    s
}

impl ConfigError {
    pub fn errors(&self) -> &[LocatedError] {
        match self {
            ConfigError::Invalid { errors, .. } => errors,
            ConfigError::Read { .. } => &[],
        }
    }
}

/// `s` with what a terminal or a log would act on shown escaped instead: control characters
/// (a newline in a quoted key splits an error line, ESC starts a colour sequence), the line
/// and paragraph separators, and the bidirectional formatting characters (which reorder the
/// text around them), as `\u{…}`.
pub(crate) fn printable(s: &str) -> String {
    let bidi = |c: char| matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !s.chars().any(|c| c.is_control() || bidi(c)) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() || bidi(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A parser error's place is the end of the text (only blanks after it).
fn offset_at_end(text: &str, span: Option<std::ops::Range<usize>>) -> bool {
    span.is_none_or(|s| {
        text.get(s.start..)
            .is_none_or(|rest| rest.trim().is_empty())
    })
}

/// Where each line of a text starts, to turn byte offsets into lines and columns without
/// rescanning the text for each (a file with tens of thousands of errors stays fast).
struct LineIndex(Vec<usize>);

impl LineIndex {
    fn new(text: &str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(at, _)| at + 1))
            .collect();
        LineIndex(starts)
    }

    /// Line and column (both from 1; the column in bytes) of byte `offset`.
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let line = self.0.partition_point(|&start| start <= offset).max(1);
        (line, offset - self.0[line - 1] + 1)
    }
}

#[cfg(test)]
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    LineIndex::new(text).line_col(offset.min(text.len()))
}

impl Config {
    /// Read and validate a config file.
    /// Read and validate the file at `path`: a regular file of at most [`CONFIG_MAX_BYTES`]
    /// (a FIFO or `/dev/zero` linked in by mistake is refused, not read for ever).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read = || -> std::io::Result<String> {
            String::from_utf8(read_small_file(path, CONFIG_MAX_BYTES)?)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        };
        let text = read().map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::parse(&text, &base).map_err(|errors| ConfigError::Invalid {
            path: path.to_path_buf(),
            errors,
        })
    }

    /// Validate config text; relative paths are resolved against `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, Vec<LocatedError>> {
        // A byte-order mark at the very start is an editor's habit (Windows Notepad): fine.
        // One further in is two files joined: named as such, at its place, rather than left
        // to the TOML parser's "invalid key".
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let lines = LineIndex::new(text);
        let line_col = |_: &str, at: usize| lines.line_col(at.min(text.len()));
        // Only a BOM that starts a line (after blanks) is the start of a joined file; one
        // inside a value or a comment is that value's business.
        let boms: Vec<LocatedError> = text
            .match_indices('\u{feff}')
            .filter(|(at, _)| {
                let (_, column) = line_col(text, *at);
                text[*at + 1 - column..*at].trim().is_empty()
            })
            .map(|(at, _)| {
                let (line, column) = line_col(text, at);
                LocatedError {
                    line,
                    column,
                    key: "(syntax)".into(),
                    message: "a byte-order mark (U+FEFF, an invisible character) starts this line: were two files joined? Delete it (it belongs at most at the very start of the file)".into(),
                }
            })
            .collect();
        if !boms.is_empty() {
            return Err(boms);
        }
        let doc = match ImDocument::parse(text) {
            Ok(d) => d,
            Err(e) => {
                let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
                // The parser's message may take several lines: one line here.
                let said = printable(&e.message().trim().replace('\n', "; "));
                let mut message = if offset_at_end(text, e.span()) {
                    // A file that ends inside a key, a value or a table header (the parser
                    // says nothing, or what it expected next).
                    let cut = "the file ends in the middle of a key, value or table header: is it cut short?";
                    if said.is_empty() {
                        cut.to_string()
                    } else {
                        format!("{cut} ({said})")
                    }
                } else if said.is_empty() {
                    "not valid TOML here".into()
                } else {
                    said
                };
                if let Some(first) = first_of_duplicate(text, &message, line) {
                    message =
                        format!("{message}: first set at line {first}, again here (keep one)");
                }
                return Err(vec![LocatedError {
                    line,
                    column,
                    key: "(syntax)".into(),
                    message,
                }]);
            }
        };
        let mut p = Problems::default();
        let cfg = build(&doc, base_dir, &mut p);
        if p.0.is_empty() {
            if let Some(cfg) = cfg {
                return Ok(cfg);
            }
        }
        let mut errors: Vec<LocatedError> =
            p.0.into_iter()
                .map(|pr| {
                    let (line, column) = pr.span.map(|s| line_col(text, s.start)).unwrap_or((1, 1));
                    LocatedError {
                        line,
                        column,
                        key: printable(&pr.key),
                        message: printable(&pr.message),
                    }
                })
                .collect();
        errors.sort_by_key(|e| (e.line, e.column));
        if errors.is_empty() {
            errors.push(LocatedError {
                line: 1,
                column: 1,
                key: "(config)".into(),
                message: "invalid".into(),
            });
        }
        Err(errors)
    }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn ms(v: Option<i64>, default: u64) -> Duration {
    Duration::from_millis(v.map(|v| v as u64).unwrap_or(default))
}

fn build(doc: &toml_edit::Table, base: &Path, p: &mut Problems) -> Option<Config> {
    let mut root = Section::new(doc, "");

    // [gateway]
    let gateway = match root.table(p, "gateway") {
        Some(mut g) => {
            let id = g.required_string(p, "id");
            if let Some(id) = &id {
                if !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
                {
                    p.push(
                        g.span_of("id"),
                        "gateway.id",
                        "use only letters, digits and - _ . : (it is sent in HTTP headers)",
                    );
                }
            }
            let site = g.string(p, "site");
            let state_dir = g
                .string(p, "state_dir")
                .unwrap_or_else(|| "/var/lib/scangate".into());
            let journal_dir = g.string(p, "journal_dir");
            let state_dir = resolve(base, &state_dir);
            // Default: systemd's runtime directory (RAM, kept across restarts with
            // RuntimeDirectoryPreserve=yes: no flash writes at all), else the state dir.
            let journal_dir = match journal_dir {
                Some(j) if j.trim().is_empty() => {
                    p.push(
                        g.span_of("journal_dir"),
                        "gateway.journal_dir",
                        "is empty: give a directory (a tmpfs such as /run/scangate/journal), or leave the key out",
                    );
                    state_dir.join("journal")
                }
                Some(j) => {
                    let dir = resolve(base, &j);
                    // The nearest part of the path that exists must be a directory.
                    let existing = dir.ancestors().find(|a| a.exists());
                    if existing.is_some_and(|a| !a.is_dir()) {
                        p.push(
                            g.span_of("journal_dir"),
                            "gateway.journal_dir",
                            format!("{} exists and is not a directory", dir.display()),
                        );
                    }
                    dir
                }
                None => std::env::var_os("RUNTIME_DIRECTORY")
                    .and_then(|r| std::env::split_paths(&r).next().filter(|p| p.is_absolute()))
                    .map(|r| r.join("journal"))
                    .unwrap_or_else(|| state_dir.join("journal")),
            };
            g.finish(p);
            id.map(|id| GatewayConfig {
                site: site.unwrap_or_else(|| id.clone()),
                id,
                state_dir,
                journal_dir,
            })
        }
        None => {
            p.push(
                Some(0..0),
                "gateway",
                "section [gateway] with at least `id` is required",
            );
            None
        }
    };

    // [spool]
    let spool = {
        let mut s = root.table(p, "spool");
        let mut max_bytes = None;
        let mut when_full = None;
        let mut sync = None;
        let mut interval = None;
        let mut max_events = None;
        let mut dl_max = None;
        if let Some(s) = s.as_mut() {
            max_bytes = s.size(p, "max_bytes", 1 << 20);
            dl_max = s.size(p, "dead_letter_max_bytes", 64 * 1024);
            when_full = s.choice(p, "when_full", &["drop_oldest", "reject"]);
            sync = s.choice(p, "sync", &["full", "normal"]);
            interval = s.integer(p, "commit_interval_ms", 1, 10_000);
            max_events = s.integer(p, "commit_max_events", 1, 100_000);
        }
        if let Some(s) = s {
            s.finish(p);
        }
        SpoolConfig {
            max_bytes: max_bytes.unwrap_or(512 * 1024 * 1024),
            when_full: if when_full == Some("reject") {
                WhenFull::Reject
            } else {
                WhenFull::DropOldest
            },
            sync: if sync == Some("normal") {
                SyncMode::Normal
            } else {
                SyncMode::Full
            },
            commit_interval: ms(interval, 50),
            commit_max_events: max_events.unwrap_or(4096) as usize,
            dead_letter_max_bytes: dl_max.unwrap_or(64 * 1024 * 1024),
        }
    };

    // [suppress]
    let suppress = {
        let mut s = root.table(p, "suppress");
        let (mut mode, mut window, mut max_pass, mut floor) = (None, None, None, None);
        let (mut barcode_window, mut max_tracked, mut margin, mut dwell, mut fade) =
            (None, None, None, None, None);
        if let Some(s) = s.as_mut() {
            mode = s.choice(p, "mode", &SuppressMode::CHOICES);
            window = s.integer(p, "window_ms", 1, 3_600_000);
            barcode_window = s.integer(p, "barcode_window_ms", 1, 3_600_000);
            max_pass = s.integer(p, "max_pass_ms", 1, 86_400_000);
            floor = s.float(p, "min_rssi_dbm", -150.0, 50.0);
            max_tracked = s.integer(p, "max_tracked", 1, 10_000_000);
            margin = s.float(p, "zone_margin_db", 0.0, 100.0);
            dwell = s.integer(p, "zone_dwell_ms", 0, 3_600_000);
            fade = s.float(p, "zone_fade_db_per_s", 0.0, 1000.0);
            if let (Some(w), Some(m)) = (window, max_pass) {
                if m < w {
                    p.push(
                        s.span_of("max_pass_ms"),
                        "suppress.max_pass_ms",
                        format!("must be at least window_ms ({w})"),
                    );
                }
            }
        }
        if let Some(s) = s {
            s.finish(p);
        }
        SuppressConfig {
            mode: SuppressMode::of(mode.unwrap_or("aggregate")),
            window: ms(window, 2000),
            barcode_window: ms(barcode_window, 1000),
            max_pass: ms(max_pass, 30_000),
            min_rssi_dbm: floor,
            max_tracked: max_tracked.unwrap_or(100_000) as usize,
            zone_margin_db: margin.unwrap_or(3.0),
            zone_dwell: ms(dwell, 150),
            zone_fade_db_per_s: fade.unwrap_or(10.0),
        }
    };

    // [[source]]
    let mut sources = Vec::new();
    match root.item("source") {
        None => p.push(Some(0..0), "source", "at least one [[source]] is required"),
        Some(item) => match item.as_array_of_tables() {
            None => p.push(
                item.span(),
                "source",
                "must be written as [[source]] (an array of tables)",
            ),
            Some(arr) => {
                for (i, t) in arr.iter().enumerate() {
                    let mut s = Section::new(t, format!("source[{i}]"));
                    if let Some(src) = build_source(&mut s, base, p) {
                        if sources.iter().any(|o: &SourceConfig| o.name == src.name) {
                            p.push(
                                s.span_of("name"),
                                &s.key_path("name"),
                                format!("duplicate source name \"{}\"", src.name),
                            );
                        }
                        // One device, one reader: a second opener is locked out for good.
                        if let SourceKind::Serial { path, .. } = &src.kind {
                            let same = |o: &SourceConfig| match &o.kind {
                                SourceKind::Serial { path: q, .. } => {
                                    q == path
                                        || std::fs::canonicalize(q).ok().is_some_and(|c| {
                                            std::fs::canonicalize(path).ok() == Some(c)
                                        })
                                }
                                _ => false,
                            };
                            if let Some(o) = sources.iter().find(|o| same(o)) {
                                p.push(
                                    s.span_of("path"),
                                    &s.key_path("path"),
                                    format!("the same device as source \"{}\": a port can be opened by one source only", o.name),
                                );
                            }
                        }
                        // One client id, one session: two would take it from each other.
                        if let SourceKind::Mqtt(m) = &src.kind {
                            let id = |src: &SourceConfig, m: &MqttSource| {
                                m.client_id
                                    .clone()
                                    .unwrap_or_else(|| format!("\u{0}{}", src.name))
                            };
                            let mine = id(&src, m);
                            if let Some(o) = sources.iter().find(|o| match &o.kind {
                                SourceKind::Mqtt(om) => {
                                    id(o, om) == mine && om.host == m.host && om.port == m.port
                                }
                                _ => false,
                            }) {
                                p.push(
                                    s.span_of("client_id"),
                                    &s.key_path("client_id"),
                                    format!("the same client id as source \"{}\" on the same broker: the broker keeps one session per client id, and the two would take it from each other", o.name),
                                );
                            }
                        }
                        sources.push(src);
                    }
                    s.finish(p);
                }
            }
        },
    }

    // [upstream]
    let upstream = match root.table(p, "upstream") {
        Some(mut u) => {
            let up = build_upstream(&mut u, base, p);
            u.finish(p);
            up
        }
        None => {
            p.push(
                Some(0..0),
                "upstream",
                "section [upstream] with `url` and `profile` is required",
            );
            None
        }
    };

    // [admin]
    let admin = {
        let mut listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9898)));
        let mut source_down_after = Duration::from_secs(60);
        let mut upstream_down_after = Duration::from_secs(300);
        let mut token_file = None;
        if let Some(mut a) = root.table(p, "admin") {
            token_file = a.string(p, "token_file").map(|t| {
                check_credential(&a, p, "admin.token_file", &t);
                secret_path(base, &t)
            });
            if let Some(ms) = a.integer(p, "source_down_after_ms", 1000, 86_400_000) {
                source_down_after = Duration::from_millis(ms as u64);
            }
            if let Some(ms) = a.integer(p, "upstream_down_after_ms", 1000, 604_800_000) {
                upstream_down_after = Duration::from_millis(ms as u64);
            }
            if let Some(l) = a.string(p, "listen") {
                if l.is_empty() || l == "off" {
                    listen = None;
                } else {
                    match l.parse() {
                        Ok(addr) => listen = Some(addr),
                        Err(_) => p.push(a.span_of("listen"), "admin.listen", format!("\"{l}\" is not an address:port such as \"127.0.0.1:9898\" (or \"off\")")),
                    }
                }
            }
            if listen.is_some_and(|l| !l.ip().is_loopback()) && token_file.is_none() {
                p.push(
                    a.span_of("listen"),
                    "admin.listen",
                    "an address other than loopback needs `token_file` (a file holding the bearer token every request must carry): /status and /metrics describe the site",
                );
            }
            a.finish(p);
        }
        AdminConfig {
            listen,
            source_down_after,
            upstream_down_after,
            token_file,
        }
    };

    root.finish(p);
    Some(Config {
        gateway: gateway?,
        spool,
        suppress,
        sources,
        upstream: upstream?,
        admin,
    })
}

fn build_source(s: &mut Section<'_>, base: &Path, p: &mut Problems) -> Option<SourceConfig> {
    let name = s.required_string(p, "name").and_then(|n| {
        if !is_clean_text(&n) || n.len() > 64 {
            p.push(
                s.span_of("name"),
                &s.key_path("name"),
                "must be at most 64 characters, without control characters (it names log lines, metrics and journal files)",
            );
            None
        } else {
            Some(n)
        }
    });
    let kind = s.choice(p, "kind", &["serial", "mqtt", "replay"]);
    if s.table.get("kind").is_none() {
        p.push(
            s.own_span(),
            &s.key_path("kind"),
            "is required: \"serial\", \"mqtt\" or \"replay\"",
        );
    }
    // An MQTT source may name a payload protocol (impinj-iot …) instead of a stream one.
    let payload_name = s
        .table
        .get("protocol")
        .and_then(|i| i.as_str())
        .filter(|n| kind == Some("mqtt") && PayloadProtocol::NAMES.contains(n))
        .map(str::to_string);
    let mqtt_without_protocol = kind == Some("mqtt") && s.table.get("protocol").is_none();
    let protocol = match &payload_name {
        Some(_) => {
            let _ = s.item("protocol");
            Some(ProtocolConfig::from(ProtocolKind::Lines))
        }
        // Every topic names its own protocol (checked with the topics).
        None if mqtt_without_protocol => Some(ProtocolConfig::from(ProtocolKind::Lines)),
        None => protocol_config(s, p),
    };
    let mut location = s.string(p, "location");
    let mut device = s.string(p, "device");
    for (key, v) in [("location", &mut location), ("device", &mut device)] {
        if v.as_ref()
            .is_some_and(|t| !is_clean_text(t) || t.len() > 256)
        {
            p.push(
                s.span_of(key),
                &s.key_path(key),
                "must be at most 256 characters, without control characters",
            );
            *v = None;
        }
    }
    let group = s.string(p, "group");
    if group
        .as_ref()
        .is_some_and(|g| g.is_empty() || !is_clean_text(g) || g.len() > 256)
    {
        p.push(
            s.span_of("group"),
            &s.key_path("group"),
            "must be 1 to 256 characters, without control characters",
        );
    }
    let suppress = SourceSuppress {
        mode: s
            .choice(p, "suppress", &SuppressMode::CHOICES)
            .map(SuppressMode::of),
        window: s
            .integer(p, "window_ms", 1, 3_600_000)
            .map(|ms| Duration::from_millis(ms as u64)),
        rssi_offset_db: s.float(p, "rssi_offset_db", -100.0, 100.0).unwrap_or(0.0),
        min_rssi_dbm: s.float(p, "min_rssi_dbm", -150.0, 50.0),
    };
    let scan_type = s.string(p, "scan_type");
    let reopen_after_idle = s
        .integer(p, "reopen_after_idle_ms", 1000, 86_400_000)
        .map(|ms| Duration::from_millis(ms as u64));
    let path = s.string(p, "path");
    let port = port_settings(s, p, protocol.as_ref().map(|c| c.kind));
    if let (Some(port), Some(proto)) = (&port, &protocol) {
        let binary = !matches!(proto.kind, ProtocolKind::Lines | ProtocolKind::Em4100);
        if binary && port.flow_control == tokio_serial::FlowControl::Software {
            p.push(
                s.span_of("flow_control"),
                &s.key_path("flow_control"),
                format!("\"software\" (XON/XOFF) cannot be used with protocol = \"{}\": the bytes 0x11 and 0x13 (XON/XOFF) occur inside its frames and would be swallowed", proto.kind.name()),
            );
        }
        if binary && port.data_bits != tokio_serial::DataBits::Eight {
            p.push(
                s.span_of("data_bits"),
                &s.key_path("data_bits"),
                format!(
                    "protocol = \"{}\" is binary and needs 8 data bits",
                    proto.kind.name()
                ),
            );
        }
    }
    let init = s.string(p, "init").and_then(|h| match unhex(&h) {
        Some(b) if b.len() > INIT_MAX => {
            p.push(
                s.span_of("init"),
                &s.key_path("init"),
                format!(
                    "{} bytes is more than the {INIT_MAX} an init sequence may have",
                    b.len()
                ),
            );
            None
        }
        Some(b) => Some(b),
        None => {
            p.push(
                s.span_of("init"),
                &s.key_path("init"),
                "expected hex bytes such as \"FF 03 9A 01 0C 00 A3 5D\"",
            );
            None
        }
    });
    let antenna_locations = antenna_map(s, p);
    let file = s.string(p, "file");
    let speed_item = s.item("speed");
    let repeat = s.integer(p, "repeat", 1, 1_000_000);
    let deadband = s.float(p, "deadband", 0.0, 1e12).unwrap_or(0.0);
    let heartbeat = Duration::from_millis(
        s.integer(p, "heartbeat_ms", 1000, 86_400_000)
            .unwrap_or(60_000) as u64,
    );
    let mqtt = if kind == Some("mqtt") {
        let stream = protocol.as_ref().filter(|_| !mqtt_without_protocol);
        mqtt_source(s, base, p, payload_name.as_deref(), stream)
    } else {
        None
    };

    let speed = match speed_item {
        None => ReplaySpeed::Recorded,
        Some(it) => {
            if let Some(st) = it.as_str() {
                match st {
                    "recorded" => ReplaySpeed::Recorded,
                    "max" => ReplaySpeed::Max,
                    other => {
                        p.push(
                            s.span_of("speed"),
                            &s.key_path("speed"),
                            format!(
                                "\"{other}\" is not \"recorded\", \"max\" or a factor such as 2.0"
                            ),
                        );
                        ReplaySpeed::Recorded
                    }
                }
            } else if let Some(f) = it.as_float().or_else(|| it.as_integer().map(|i| i as f64)) {
                if (MIN_SPEED_FACTOR..=10_000.0).contains(&f) {
                    ReplaySpeed::Factor(f)
                } else {
                    p.push(
                        s.span_of("speed"),
                        &s.key_path("speed"),
                        "a speed factor must be between 0.001 and 10000",
                    );
                    ReplaySpeed::Recorded
                }
            } else {
                p.push(
                    s.span_of("speed"),
                    &s.key_path("speed"),
                    "expected \"recorded\", \"max\" or a number",
                );
                ReplaySpeed::Recorded
            }
        }
    };

    // Keys of one kind of source on another are mistakes (a replay has no baud rate).
    let serial_only = [
        "path",
        "baud",
        "data_bits",
        "parity",
        "stop_bits",
        "flow_control",
        "init",
        "reopen_after_idle_ms",
    ];
    let replay_only = ["file", "speed", "repeat"];
    let serial_replay: Vec<&str> = serial_only.iter().chain(&replay_only).copied().collect();
    let not_serial: Vec<&str> = replay_only.iter().chain(&MQTT_KEYS).copied().collect();
    let not_replay: Vec<&str> = serial_only.iter().chain(&MQTT_KEYS).copied().collect();
    let misplaced: &[&str] = match kind {
        Some("serial") => &not_serial,
        Some("replay") => &not_replay,
        Some("mqtt") => &serial_replay,
        _ => &[],
    };
    for key in misplaced {
        if s.table.get(key).is_some() {
            p.push(
                s.span_of(key),
                &s.key_path(key),
                format!("does not apply to kind = \"{}\"", kind.unwrap_or("")),
            );
        }
    }
    let kind = match kind? {
        "serial" => {
            let Some(path) = path else {
                p.push(
                    s.own_span(),
                    &s.key_path("path"),
                    "a serial source needs `path` (e.g. \"/dev/serial/by-id/usb-…\")",
                );
                return None;
            };
            if path.trim().is_empty() {
                p.push(
                    s.span_of("path"),
                    &s.key_path("path"),
                    "is empty: give the serial device (e.g. \"/dev/serial/by-id/usb-…\")",
                );
                return None;
            }
            SourceKind::Serial {
                // Relative to the config file's directory, as every path in the file is.
                path: resolve(base, &path),
                port: port?,
                init: init.unwrap_or_default(),
            }
        }
        "replay" => {
            let Some(file) = file else {
                p.push(
                    s.own_span(),
                    &s.key_path("file"),
                    "a replay source needs `file` (a capture from hardware-fixtures/)",
                );
                return None;
            };
            SourceKind::Replay {
                file: resolve(base, &file),
                speed,
                repeat: repeat.unwrap_or(1) as u32,
            }
        }
        _ => SourceKind::Mqtt(Box::new(mqtt?)),
    };
    let name = name?;
    Some(SourceConfig {
        device: device.unwrap_or_else(|| name.clone()),
        location: location.unwrap_or_else(|| name.clone()),
        name,
        kind,
        protocol: protocol?,
        antenna_locations,
        reopen_after_idle,
        group,
        suppress,
        scan_type,
        deadband,
        heartbeat,
    })
}

/// Keys only an MQTT source has.
const MQTT_KEYS: [&str; 16] = [
    "broker",
    "topics",
    "client_id",
    "qos",
    "username",
    "password_file",
    "ca_file",
    "client_cert_file",
    "client_key_file",
    "keep_alive_s",
    "max_payload_bytes",
    "broker_max_inflight",
    "reconnect_min_ms",
    "reconnect_max_ms",
    "reader_clock",
    "json",
];

/// Default `max_payload_bytes`: well above rumqttc's 10 KiB default (a reader's batch of a
/// few hundred tags is 50–100 KB).
pub const MQTT_PAYLOAD_DEFAULT: u64 = 1 << 20;

/// Most bytes the topic filters of one source may take in its SUBSCRIBE packet (scangate's
/// outgoing packet limit is above it).
pub const MQTT_SUBSCRIBE_MAX: usize = 60 * 1024;

/// The largest MQTT packet read at all (payloads between `max_payload_bytes` and this are
/// read, counted and acknowledged). A bigger one makes rumqttc drop the connection before its
/// packet id is known, so it cannot be acknowledged; the broker's `message_size_limit` keeps
/// such messages out (README).
pub const MQTT_PACKET_MAX: u64 = 64 << 20;

fn mqtt_source(
    s: &mut Section<'_>,
    base: &Path,
    p: &mut Problems,
    payload_name: Option<&str>,
    stream: Option<&ProtocolConfig>,
) -> Option<MqttSource> {
    let broker = s.required_string(p, "broker");
    let mut ok = true;
    let (mut host, mut port, mut tls) = (String::new(), 0u16, false);
    if let Some(b) = &broker {
        match reqwest::Url::parse(b) {
            Ok(u) if matches!(u.scheme(), "mqtt" | "mqtts" | "tcp" | "ssl") => {
                tls = matches!(u.scheme(), "mqtts" | "ssl");
                port = u.port().unwrap_or(if tls { 8883 } else { 1883 });
                host = u
                    .host_str()
                    .unwrap_or("")
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string();
                if !u.username().is_empty() || u.password().is_some() {
                    p.push(
                        s.span_of("broker"),
                        &s.key_path("broker"),
                        "must not hold credentials: use `username` and `password_file`",
                    );
                    ok = false;
                } else if host.is_empty() {
                    p.push(
                        s.span_of("broker"),
                        &s.key_path("broker"),
                        "has no host (mqtt://host:1883)",
                    );
                    ok = false;
                } else if u.port() == Some(0) {
                    p.push(
                        s.span_of("broker"),
                        &s.key_path("broker"),
                        "port 0 is not a broker's port (1883, or 8883 for mqtts://)",
                    );
                    ok = false;
                } else if !matches!(u.path(), "" | "/")
                    || u.query().is_some()
                    || u.fragment().is_some()
                {
                    p.push(
                        s.span_of("broker"),
                        &s.key_path("broker"),
                        "takes a host and a port only (mqtt://host:1883); topics go in `topics`",
                    );
                    ok = false;
                }
            }
            _ => {
                p.push(
                    s.span_of("broker"),
                    &s.key_path("broker"),
                    format!(
                        "\"{b}\" is not an mqtt:// or mqtts:// URL (e.g. mqtt://127.0.0.1:1883)"
                    ),
                );
                ok = false;
            }
        }
    }
    let json = match s.table(p, "json") {
        Some(mut j) => {
            let mut ptr = |j: &mut Section<'_>, key: &'static str| {
                let v = j.string(p, key)?;
                if v.starts_with('/') {
                    Some(v)
                } else {
                    p.push(
                        j.span_of(key),
                        &j.key_path(key),
                        format!(
                            "\"{v}\" is not a JSON pointer: it starts with / (e.g. \"/data/id\")"
                        ),
                    );
                    None
                }
            };
            let mut m = crate::protocol::json_map::JsonMapping {
                items: ptr(&mut j, "items"),
                tag: ptr(&mut j, "tag"),
                rssi: ptr(&mut j, "rssi"),
                antenna: ptr(&mut j, "antenna"),
                timestamp: ptr(&mut j, "timestamp"),
                value: ptr(&mut j, "value"),
                ..Default::default()
            };
            use crate::protocol::json_map::Field;
            m.sensor_type = j.string(p, "sensor_type").map(|v| Field::parse(&v));
            m.unit = j.string(p, "unit").map(|v| Field::parse(&v));
            m.device = j.string(p, "device").map(|v| Field::parse(&v));
            m.tag_kind = j
                .choice(p, "tag_kind", &["epc", "barcode", "em4100", "text"])
                .map(|k| match k {
                    "barcode" => crate::event::ReadKind::Barcode,
                    "em4100" => crate::event::ReadKind::Em4100,
                    "text" => crate::event::ReadKind::Text,
                    _ => crate::event::ReadKind::Epc,
                });
            if m.tag.is_none() && m.value.is_none() {
                p.push(
                    j.own_span(),
                    &j.key_path("tag"),
                    "a JSON mapping needs `tag` (tag reads) or `value` (sensor readings), or both",
                );
            }
            j.finish(p);
            Some(m)
        }
        None => None,
    };
    let payload_of = |name: &str| -> Option<PayloadProtocol> {
        match name {
            "impinj-iot" => Some(PayloadProtocol::ImpinjIot),
            "zebra-iotc" => Some(PayloadProtocol::ZebraIotc),
            "json" => json.clone().map(|m| PayloadProtocol::Json(Box::new(m))),
            other => {
                let k = ProtocolKind::parse(other)?;
                Some(PayloadProtocol::Stream(match stream {
                    Some(c) if c.kind == k => c.clone(),
                    _ => ProtocolConfig::from(k),
                }))
            }
        }
    };
    let default_payload = match payload_name {
        Some(n) => payload_of(n),
        None => stream.cloned().map(PayloadProtocol::Stream),
    };
    if payload_name == Some("json") && json.is_none() {
        p.push(s.own_span(), &s.key_path("json"), "protocol = \"json\" needs a [source.json] table naming where the tag or value is (e.g. tag = \"/id\")");
        ok = false;
    }
    let mut topics = Vec::new();
    match s.item("topics") {
        None => {
            p.push(
                s.own_span(),
                &s.key_path("topics"),
                "an MQTT source needs `topics` (e.g. [\"readers/+/events\"])",
            );
            ok = false;
        }
        Some(item) => match item.as_array() {
            Some(arr) if !arr.is_empty() => {
                for v in arr.iter() {
                    let (filter, proto) = if let Some(f) = v.as_str() {
                        (Some(f.to_string()), None)
                    } else if let Some(t) = v.as_inline_table() {
                        let mut known = true;
                        for (k, _) in t.iter() {
                            if !matches!(k, "filter" | "protocol") {
                                p.push(v.span(), &s.key_path("topics"), format!("unknown key \"{k}\" in a topic (it takes `filter` and `protocol`)"));
                                known = false;
                            }
                        }
                        let f = t.get("filter").and_then(|f| f.as_str()).map(str::to_string);
                        if f.is_none() {
                            p.push(
                                v.span(),
                                &s.key_path("topics"),
                                "a topic table needs `filter` (a string)",
                            );
                        }
                        let pr = match t.get("protocol") {
                            None => None,
                            Some(x) => match x.as_str() {
                                Some(n) => Some(n.to_string()),
                                None => {
                                    p.push(
                                        x.span(),
                                        &s.key_path("topics"),
                                        "`protocol` is a string",
                                    );
                                    known = false;
                                    None
                                }
                            },
                        };
                        if !known {
                            ok = false;
                        }
                        (f, pr)
                    } else {
                        p.push(v.span(), &s.key_path("topics"), "every topic is a filter string or { filter = \"…\", protocol = \"…\" }");
                        ok = false;
                        continue;
                    };
                    let Some(filter) = filter else {
                        ok = false;
                        continue;
                    };
                    if filter.len() > 65_535
                        || filter.contains('\0')
                        || !rumqttc::valid_filter(&filter)
                    {
                        p.push(v.span(), &s.key_path("topics"), format!("\"{filter}\" is not a valid MQTT topic filter (levels split by /; + stands for a whole level, # only at the end)"));
                        ok = false;
                        continue;
                    }
                    let payload = match &proto {
                        Some(n) => match payload_of(n) {
                            Some(pp) => Some(pp),
                            None if n == "json" => {
                                p.push(
                                    v.span(),
                                    &s.key_path("topics"),
                                    "protocol = \"json\" needs a [source.json] table",
                                );
                                None
                            }
                            None => {
                                let mut names: Vec<&str> = PayloadProtocol::NAMES.to_vec();
                                names.extend(ProtocolKind::ALL.iter().map(|(n, _)| *n));
                                p.push(
                                    v.span(),
                                    &s.key_path("topics"),
                                    format!(
                                        "unknown protocol \"{n}\": one of {}",
                                        names.join(", ")
                                    ),
                                );
                                None
                            }
                        },
                        None if default_payload.is_none() => {
                            p.push(v.span(), &s.key_path("topics"), format!("\"{filter}\" has no protocol: set the source's `protocol` or give this topic {{ filter = \"…\", protocol = \"impinj-iot\" }}"));
                            None
                        }
                        None => default_payload.clone(),
                    };
                    match payload {
                        Some(payload) => topics.push(MqttTopic { filter, payload }),
                        None => ok = false,
                    }
                }
            }
            _ => {
                p.push(
                    s.span_of("topics"),
                    &s.key_path("topics"),
                    "expected a non-empty array of topic filters",
                );
                ok = false;
            }
        },
    }
    // The SUBSCRIBE packet carries every filter (2 bytes of length and a QoS byte each).
    let subscribe_bytes: usize = topics.iter().map(|t| t.filter.len() + 3).sum();
    if subscribe_bytes > MQTT_SUBSCRIBE_MAX {
        p.push(s.span_of("topics"), &s.key_path("topics"), format!("the filters take {subscribe_bytes} bytes; at most {MQTT_SUBSCRIBE_MAX} fit one subscription: use wildcards (+, #)"));
        ok = false;
    }
    for (i, a) in topics.iter().enumerate() {
        if topics[..i].iter().any(|b| b.filter == a.filter) {
            p.push(
                s.span_of("topics"),
                &s.key_path("topics"),
                format!("\"{}\" is listed twice", a.filter),
            );
            ok = false;
        }
    }
    let client_id = s.string(p, "client_id");
    if client_id
        .as_ref()
        .is_some_and(|c| c.is_empty() || c.len() > 256 || !is_clean_text(c))
    {
        p.push(s.span_of("client_id"), &s.key_path("client_id"), "must be 1 to 256 characters without control characters (unset: scangate-<gateway>-<source>)");
        ok = false;
    }
    let qos = s.integer(p, "qos", 0, 2).unwrap_or(1);
    if qos == 2 {
        p.push(s.span_of("qos"), &s.key_path("qos"), "QoS 2 is not supported: use 1 (each event has a stable id, so a message delivered twice is one event upstream)");
        ok = false;
    }
    let username = s.string(p, "username");
    let password_file = s.string(p, "password_file").map(|f| secret_path(base, &f));
    if password_file.is_some() && username.is_none() {
        p.push(
            s.span_of("password_file"),
            &s.key_path("password_file"),
            "MQTT sends a password only with a `username`: set it too",
        );
        ok = false;
    }
    let ca_file = s.string(p, "ca_file").map(|f| resolve(base, &f));
    let client_cert_file = s.string(p, "client_cert_file").map(|f| resolve(base, &f));
    let client_key_file = s.string(p, "client_key_file").map(|f| resolve(base, &f));
    if !tls && (ca_file.is_some() || client_cert_file.is_some() || client_key_file.is_some()) {
        let key = if ca_file.is_some() {
            "ca_file"
        } else if client_cert_file.is_some() {
            "client_cert_file"
        } else {
            "client_key_file"
        };
        p.push(
            s.span_of(key),
            &s.key_path(key),
            "is used with TLS only: the broker must start with mqtts://",
        );
        ok = false;
    }
    if client_cert_file.is_some() != client_key_file.is_some() {
        let key = if client_cert_file.is_some() {
            "client_cert_file"
        } else {
            "client_key_file"
        };
        p.push(
            s.span_of(key),
            &s.key_path(key),
            "a client certificate needs both client_cert_file and client_key_file",
        );
        ok = false;
    }
    let keep_alive = s.integer(p, "keep_alive_s", 5, 3600).unwrap_or(30);
    let max_payload = s
        .size(p, "max_payload_bytes", 1024)
        .unwrap_or(MQTT_PAYLOAD_DEFAULT);
    if max_payload > MQTT_PACKET_MAX {
        p.push(
            s.span_of("max_payload_bytes"),
            &s.key_path("max_payload_bytes"),
            format!("at most {} MiB", MQTT_PACKET_MAX >> 20),
        );
        ok = false;
    }
    let inflight = s.integer(p, "broker_max_inflight", 1, 65_535).unwrap_or(20);
    let rmin = s.integer(p, "reconnect_min_ms", 10, 600_000).unwrap_or(500);
    let rmax = s
        .integer(p, "reconnect_max_ms", 10, 3_600_000)
        .unwrap_or(30_000);
    if rmax < rmin {
        p.push(
            s.span_of("reconnect_max_ms"),
            &s.key_path("reconnect_max_ms"),
            "must not be below reconnect_min_ms",
        );
        ok = false;
    }
    let reader_clock = s.choice(p, "reader_clock", &["gateway", "reader"]) == Some("reader");
    if !ok || broker.is_none() {
        return None;
    }
    Some(MqttSource {
        host,
        port,
        tls,
        client_id,
        topics,
        qos: qos as u8,
        username,
        password_file,
        ca_file,
        client_cert_file,
        client_key_file,
        keep_alive: Duration::from_secs(keep_alive as u64),
        max_payload_bytes: max_payload as usize,
        broker_max_inflight: inflight as usize,
        reconnect_min: Duration::from_millis(rmin as u64),
        reconnect_max: Duration::from_millis(rmax as u64),
        reader_clock,
    })
}

/// A name or location shown in logs, metrics and upstream events: no control characters and
/// no bidirectional overrides (which make text read differently than it is).
fn is_clean_text(t: &str) -> bool {
    !t.chars()
        .any(|c| c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'))
}

/// Longest `init` sequence, bytes (reader start commands are tens of bytes).
pub const INIT_MAX: usize = 4096;

/// Where a secret is read from: a file path (relative to the config file), or
/// `credential:NAME`, a systemd credential (`LoadCredential=NAME:/path` in the unit: the
/// file `$CREDENTIALS_DIRECTORY/NAME`, readable by the service only and never in the config).
fn secret_path(base: &Path, value: &str) -> PathBuf {
    credential_path(value, std::env::var_os("CREDENTIALS_DIRECTORY").as_deref())
        .unwrap_or_else(|| resolve(base, value))
}

/// A `credential:NAME` must name one file of the credentials directory.
fn check_credential(s: &Section<'_>, p: &mut Problems, key: &str, value: &str) {
    if let Some(name) = value.strip_prefix("credential:") {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            p.push(
                s.span_of(key.rsplit('.').next().unwrap_or(key)),
                key,
                format!("\"{name}\" is not a credential name (one file name, as in LoadCredential=NAME:…)"),
            );
        }
    }
}

/// `credential:NAME` → `<dir>/NAME` (`$CREDENTIALS_DIRECTORY/NAME`, literally, outside a
/// service, so the error names what is missing); None for a plain path.
pub fn credential_path(value: &str, dir: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    let name = value.strip_prefix("credential:")?;
    // A credential name is one file name: nothing outside the credentials directory.
    let name = if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        "<invalid credential name>"
    } else {
        name
    };
    Some(match dir {
        Some(d) => Path::new(d).join(name),
        None => PathBuf::from(format!("$CREDENTIALS_DIRECTORY/{name}")),
    })
}

/// Hex bytes, spaces allowed: "FF 03 9A" or "ff039a".
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    digits
        .chunks(2)
        .map(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 16).ok())
        .collect()
}

/// `protocol` and its options (`prefix`, `suffix`, `fields`, `separator`, `family`,
/// `raw_rssi_offset_db`).
fn protocol_config(s: &mut Section<'_>, p: &mut Problems) -> Option<ProtocolConfig> {
    let names: Vec<&'static str> = ProtocolKind::ALL.iter().map(|(n, _)| *n).collect();
    let kind = match s.choice(p, "protocol", &names) {
        Some(n) => ProtocolKind::parse(n),
        None if s.table.get("protocol").is_none() => {
            p.push(
                s.own_span(),
                &s.key_path("protocol"),
                format!("is required: one of {}", names.join(", ")),
            );
            None
        }
        None => None,
    };
    let mut bytes = |s: &mut Section<'_>, key: &'static str| {
        let v = s.string(p, key)?;
        match unhex(&v) {
            Some(b) if !b.is_empty() => Some(b),
            _ => {
                p.push(
                    s.span_of(key),
                    &s.key_path(key),
                    format!("\"{v}\" is not hex bytes: write STX as \"02\", ETX as \"03\", \"RD:\" as \"52 44 3A\""),
                );
                None
            }
        }
    };
    let mut prefix = bytes(s, "prefix");
    let mut suffix = bytes(s, "suffix");
    for (key, v) in [("prefix", &mut prefix), ("suffix", &mut suffix)] {
        if v.as_ref()
            .is_some_and(|b| b.contains(&b'\r') || b.contains(&b'\n'))
        {
            p.push(
                s.span_of(key),
                &s.key_path(key),
                "must not contain CR (0D) or LF (0A): they end a line already",
            );
            *v = None;
        }
    }
    let separator = s.string(p, "separator");
    let fields = s.string_array(p, "fields").and_then(|names| {
        let parsed: Option<Vec<_>> = names
            .iter()
            .map(|n| crate::protocol::lines::Field::parse(n))
            .collect();
        let tags = parsed
            .iter()
            .flatten()
            .filter(|f| **f == crate::protocol::lines::Field::Tag)
            .count();
        match parsed {
            Some(f) if tags == 1 => Some(f),
            _ => {
                p.push(
                    s.span_of("fields"),
                    &s.key_path("fields"),
                    format!(
                        "the columns are named from {} and exactly one is \"tag\"",
                        crate::protocol::lines::Field::NAMES.join(", ")
                    ),
                );
                None
            }
        }
    });
    if fields.is_some() && separator.as_deref().is_some_and(str::is_empty) {
        p.push(
            s.span_of("separator"),
            &s.key_path("separator"),
            "must not be empty",
        );
    }
    let family = match s.choice(p, "family", &["rssi", "classic"]) {
        Some("classic") => ChafonFamily::Classic,
        _ => ChafonFamily::Rssi,
    };
    let offset = s.float(p, "raw_rssi_offset_db", -300.0, 100.0);
    let kind = kind?;
    let only = |s: &Section<'_>, p: &mut Problems, key: &str, set: bool, proto: ProtocolKind| {
        if set && kind != proto {
            p.push(
                s.span_of(key),
                &s.key_path(key),
                format!("applies only to protocol = \"{}\"", proto.name()),
            );
        }
    };
    only(s, p, "prefix", prefix.is_some(), ProtocolKind::Lines);
    only(s, p, "suffix", suffix.is_some(), ProtocolKind::Lines);
    only(s, p, "fields", fields.is_some(), ProtocolKind::Lines);
    only(s, p, "separator", separator.is_some(), ProtocolKind::Lines);
    only(
        s,
        p,
        "family",
        s.table.get("family").is_some(),
        ProtocolKind::Chafon,
    );
    only(
        s,
        p,
        "raw_rssi_offset_db",
        offset.is_some(),
        ProtocolKind::Chafon,
    );
    Some(ProtocolConfig {
        kind,
        lines: crate::protocol::lines::LinesOptions {
            prefix: prefix.unwrap_or_default(),
            suffix: suffix.unwrap_or_default(),
            fields,
            separator: separator.unwrap_or_else(|| ",".into()),
        },
        chafon_family: family,
        raw_rssi_offset_db: offset.map(|o| o as f32),
    })
}

/// `baud` (default: the protocol's), `data_bits`, `parity`, `stop_bits`, `flow_control`.
fn port_settings(
    s: &mut Section<'_>,
    p: &mut Problems,
    kind: Option<ProtocolKind>,
) -> Option<PortSettings> {
    use tokio_serial::{DataBits, FlowControl, Parity, StopBits};
    let default_baud = kind.map_or(9600, ProtocolKind::default_baud);
    let mut ok = true;
    let baud = match s.item("baud") {
        None => default_baud,
        Some(_) => match s.integer(p, "baud", 50, 4_000_000) {
            Some(b) => b as u32,
            None => {
                ok = false;
                default_baud
            }
        },
    };
    let mut port = PortSettings::new(baud);
    if s.item("data_bits").is_some() {
        match s.integer(p, "data_bits", 5, 8) {
            Some(5) => port.data_bits = DataBits::Five,
            Some(6) => port.data_bits = DataBits::Six,
            Some(7) => port.data_bits = DataBits::Seven,
            Some(_) => port.data_bits = DataBits::Eight,
            None => ok = false,
        }
    }
    if s.item("parity").is_some() {
        match s.choice(p, "parity", &["none", "odd", "even"]) {
            Some("odd") => port.parity = Parity::Odd,
            Some("even") => port.parity = Parity::Even,
            Some(_) => port.parity = Parity::None,
            None => ok = false,
        }
    }
    if s.item("stop_bits").is_some() {
        match s.integer(p, "stop_bits", 1, 2) {
            Some(2) => port.stop_bits = StopBits::Two,
            Some(_) => port.stop_bits = StopBits::One,
            None => ok = false,
        }
    }
    if s.item("flow_control").is_some() {
        match s.choice(p, "flow_control", &["none", "software", "hardware"]) {
            Some("software") => port.flow_control = FlowControl::Software,
            Some("hardware") => port.flow_control = FlowControl::Hardware,
            Some(_) => port.flow_control = FlowControl::None,
            None => ok = false,
        }
    }
    ok.then_some(port)
}

/// `[source.antennas]`: antenna port → location, e.g. `1 = "door-3-in"`.
fn antenna_map(s: &mut Section<'_>, p: &mut Problems) -> Vec<(u16, String)> {
    let mut out = Vec::new();
    for (k, v) in s.string_map(p, "antennas") {
        match k.parse::<u16>() {
            Ok(_) if !is_clean_text(&v) || v.len() > 256 => p.push(
                s.span_of("antennas"),
                &format!("{}.{k}", s.key_path("antennas")),
                "the location must be at most 256 characters, without control characters",
            ),
            Ok(port) if !v.trim().is_empty() => out.push((port, v)),
            Ok(_) => p.push(
                s.span_of("antennas"),
                &format!("{}.{k}", s.key_path("antennas")),
                "the location must not be empty",
            ),
            Err(_) => p.push(
                s.span_of("antennas"),
                &format!("{}.{k}", s.key_path("antennas")),
                "keys are antenna port numbers, e.g. 1 = \"door-3-in\"",
            ),
        }
    }
    out
}

/// `[upstream.fields]`: renames must name a field the profile writes and must not land on
/// another written key (or another rename's target); constants must not be a written key.
/// Otherwise one key is written twice, and an identity field (`event_id`, `seq`, `timestamp`)
/// could be the same for every event, which an idempotent upstream drops as duplicates.
fn check_fields(u: &Section<'_>, profile: Profile, fields: &FieldMapping, p: &mut Problems) {
    let written = crate::forward::profile::event_keys(profile);
    let table = u.table.get("fields").and_then(|f| f.as_table_like());
    let span = |sub: &str, key: &str| {
        table
            .and_then(|t| t.get(sub))
            .and_then(|s| s.as_table_like())
            .and_then(|t| t.get_key_value(key))
            .and_then(|(k, v)| k.span().or_else(|| v.span()))
            .or_else(|| u.span_of("fields"))
    };
    // The keys an event ends up with: written keys after renames.
    let final_key = |k: &str| {
        fields
            .rename
            .iter()
            .find(|(from, _)| from == k)
            .map_or(k.to_string(), |(_, to)| to.clone())
    };
    let finals: Vec<String> = written.iter().map(|k| final_key(k)).collect();
    for (i, (from, to)) in fields.rename.iter().enumerate() {
        let key = format!("upstream.fields.rename.{from}");
        if !written.contains(&from.as_str()) {
            p.push(
                span("rename", from),
                &key,
                format!(
                    "the {} profile writes no field \"{from}\"; it writes: {}",
                    profile_name(profile),
                    written.join(", ")
                ),
            );
            continue;
        }
        // A target that is any key the profile writes is refused, even one renamed away: a
        // chain (`event_id` → "uuid", `timestamp` → "event_id") would still put another value
        // where an identity field is expected.
        let clash = written.contains(&to.as_str())
            || finals
                .iter()
                .zip(written)
                .any(|(f, w)| *w != from && f == to)
            || fields.rename[..i].iter().any(|(_, t)| t == to);
        if clash || to.is_empty() {
            p.push(
                span("rename", from),
                &key,
                format!("\"{to}\" is already a field of every event (or another rename's target); pick a name no other field has"),
            );
        }
    }
    for (name, _) in &fields.constant {
        if finals.iter().any(|f| f == name) || written.contains(&name.as_str()) {
            p.push(
                span("constant", name),
                &format!("upstream.fields.constant.{name}"),
                format!("\"{name}\" is a field scangate writes for every event (event_id, seq and timestamp identify it); a constant may only add a new field"),
            );
        }
    }
}

fn profile_name(profile: Profile) -> &'static str {
    match profile {
        Profile::BagEvents => "bag-events",
        Profile::Collect => "collect",
    }
}

/// Keys of `[upstream]` that only one `kind` reads.
const HTTP_ONLY: &[&str] = &[
    "path",
    "compression",
    "compression_level",
    "token_file",
    "pool_idle_ms",
    "event_type",
];
const REDIS_ONLY: &[&str] = &[
    "username",
    "password_file",
    "client_cert_file",
    "client_key_file",
    "stream",
    "maxlen",
    "dlq_stream",
    "entry",
    "idempotency_ttl_s",
    "idempotency_prefix",
];

/// A Redis stream or key name: not empty, no control characters (they are shown in logs).
fn check_key_name(u: &Section<'_>, p: &mut Problems, key: &'static str, v: &str) {
    if v.is_empty() || v.len() > 1024 || v.chars().any(|c| c.is_control()) {
        p.push(
            u.span_of(key),
            &format!("upstream.{key}"),
            "must be 1 to 1024 characters without control characters",
        );
    }
}

/// The `redis-streams` keys of `[upstream]`.
fn build_redis(
    u: &mut Section<'_>,
    base: &Path,
    p: &mut Problems,
    url: Option<&str>,
) -> Option<RedisConfig> {
    let username = u.string(p, "username");
    let password_file = u.string(p, "password_file");
    let client_cert = u.string(p, "client_cert_file");
    let client_key = u.string(p, "client_key_file");
    let stream = u.string(p, "stream");
    let maxlen = u.integer(p, "maxlen", 0, i64::MAX);
    let dlq = u.string(p, "dlq_stream");
    let entry = u.choice(p, "entry", &["json", "fields"]);
    let ttl = u.integer(p, "idempotency_ttl_s", 1, 365 * 86_400);
    let prefix = u.string(p, "idempotency_prefix");
    let url = url?;
    let tls = url.starts_with("rediss://");
    match reqwest::Url::parse(url) {
        Ok(parsed)
            if (parsed.scheme() == "redis" || parsed.scheme() == "rediss")
                && parsed.host_str().is_some_and(|h| !h.is_empty()) =>
        {
            if parsed.password().is_some() || !parsed.username().is_empty() {
                p.push(u.span_of("url"), "upstream.url", "must not carry a user name or password: put the password in a file named by password_file (and the ACL user in username), so the config can be shared without the secret");
            }
            let path = parsed.path().trim_start_matches('/');
            if !path.is_empty() && path.parse::<u16>().is_err() {
                p.push(
                    u.span_of("url"),
                    "upstream.url",
                    format!("\"/{path}\" is not a database number (redis://host:6379/0)"),
                );
            }
        }
        _ => {
            p.push(
                u.span_of("url"),
                "upstream.url",
                format!(
                    "\"{url}\" is not a redis:// or rediss:// URL (e.g. redis://bus.example:6379)"
                ),
            );
        }
    }
    if !tls && (client_cert.is_some() || client_key.is_some() || u.table.get("ca_file").is_some()) {
        let key = if client_cert.is_some() {
            "client_cert_file"
        } else if client_key.is_some() {
            "client_key_file"
        } else {
            "ca_file"
        };
        p.push(
            u.span_of(key),
            &format!("upstream.{key}"),
            "is used with TLS only: the url must start with rediss://",
        );
    }
    if client_cert.is_some() != client_key.is_some() {
        let (key, missing) = if client_cert.is_some() {
            ("client_cert_file", "client_key_file")
        } else {
            ("client_key_file", "client_cert_file")
        };
        p.push(
            u.span_of(key),
            &format!("upstream.{key}"),
            format!("needs {missing} too: the certificate and its key go together (TLS client authentication)"),
        );
    }
    let stream = stream.unwrap_or_else(|| "baggage_events".into());
    check_key_name(u, p, "stream", &stream);
    let dlq_stream = match dlq {
        None => Some(format!("{stream}:dlq")),
        Some(d) if d.is_empty() => None,
        Some(d) => {
            check_key_name(u, p, "dlq_stream", &d);
            if d == stream {
                p.push(
                    u.span_of("dlq_stream"),
                    "upstream.dlq_stream",
                    "must differ from stream (dead letters would reach the consumers as events)",
                );
            }
            Some(d)
        }
    };
    let prefix = prefix.unwrap_or_else(|| format!("{{{stream}}}:seen:"));
    check_key_name(u, p, "idempotency_prefix", &prefix);
    if let Some(pw) = &password_file {
        check_credential(u, p, "upstream.password_file", pw);
    }
    if username.is_some() && password_file.is_none() {
        p.push(
            u.span_of("username"),
            "upstream.username",
            "needs password_file: a Redis ACL user signs in with a password (without it scangate would connect as the default user)",
        );
    }
    Some(RedisConfig {
        url: url.to_string(),
        username,
        password_file: password_file.map(|f| secret_path(base, &f)),
        client_cert_file: client_cert.map(|f| resolve(base, &f)),
        client_key_file: client_key.map(|f| secret_path(base, &f)),
        stream,
        maxlen: maxlen.unwrap_or(100_000) as u64,
        dlq_stream,
        entry: if entry == Some("fields") {
            EntryShape::Fields
        } else {
            EntryShape::Json
        },
        idempotency_ttl: Duration::from_secs(ttl.unwrap_or(86_400) as u64),
        idempotency_prefix: prefix,
    })
}

fn build_upstream(u: &mut Section<'_>, base: &Path, p: &mut Problems) -> Option<UpstreamConfig> {
    let kind = u.choice(p, "kind", &["http", "redis-streams"]);
    let redis = kind == Some("redis-streams");
    let url = u.required_string(p, "url");
    let profile = u.choice(p, "profile", &["bag-events", "collect"]);
    if redis {
        if profile == Some("collect") {
            p.push(u.span_of("profile"), "upstream.profile", "a Redis Stream takes bag-events entries (contract 000): leave profile out or set \"bag-events\"");
        }
        for key in HTTP_ONLY {
            if u.item(key).is_some() {
                p.push(
                    u.span_of(key),
                    &format!("upstream.{key}"),
                    format!(
                        "applies to kind = \"http\" only; this upstream is a Redis Stream{}",
                        if *key == "token_file" {
                            " (its password goes in password_file)"
                        } else {
                            ""
                        }
                    ),
                );
            }
        }
    } else {
        if u.table.get("profile").is_none() {
            p.push(
                u.own_span(),
                "upstream.profile",
                "is required: \"bag-events\" or \"collect\"",
            );
        }
        for key in REDIS_ONLY {
            if u.item(key).is_some() {
                p.push(
                    u.span_of(key),
                    &format!("upstream.{key}"),
                    "applies to kind = \"redis-streams\" only (set kind, or remove this key)",
                );
            }
        }
    }
    let profile = if redis {
        Some(profile.unwrap_or("bag-events"))
    } else {
        profile
    };
    let sink = if redis {
        build_redis(u, base, p, url.as_deref()).map(|r| Sink::RedisStreams(Box::new(r)))
    } else {
        Some(Sink::Http)
    };
    let path = u.string(p, "path");
    let compression = u.choice(p, "compression", &["gzip", "zstd", "none"]);
    let level = u.integer(p, "compression_level", 1, 19);
    let token_file = u.string(p, "token_file");
    let ca_file = u.string(p, "ca_file");
    let max_events = u.integer(p, "batch_max_events", 1, 1000);
    let max_bytes = u.size(p, "batch_max_bytes", 1024);
    let max_delay = u.integer(p, "batch_max_delay_ms", 0, 3_600_000);
    let timeout = u.integer(p, "timeout_ms", 100, 600_000);
    let pool_idle = u.integer(p, "pool_idle_ms", 0, 3_600_000);
    let retry_min = u.integer(p, "retry_min_ms", 1, 600_000);
    let retry_max = u.integer(p, "retry_max_ms", 1, 3_600_000);
    let auth_retry = u.integer(p, "auth_retry_ms", 100, 3_600_000);
    let retry_after_max = u.integer(p, "retry_after_max_ms", 100, 86_400_000);
    let order = u.choice(p, "order", &["fifo", "live-first"]);
    let backlog_eps = u.integer(p, "backlog_max_eps", 1, 10_000_000);
    let max_in_flight = u.integer(p, "max_in_flight", 1, MAX_IN_FLIGHT as i64);
    let event_type = u.choice(
        p,
        "event_type",
        &["interaction", "progress", "assessment", "error", "system"],
    );
    let mut fields = FieldMapping::default();
    if let Some(mut f) = u.table(p, "fields") {
        fields.rename = f.string_map(p, "rename");
        fields.constant = f.string_map(p, "constant");
        f.finish(p);
    }

    if let Some(profile) = profile {
        let profile = if profile == "collect" {
            Profile::Collect
        } else {
            Profile::BagEvents
        };
        check_fields(u, profile, &fields, p);
    }

    // Compared with the defaults of the one not set (100 and 1000).
    if retry_min.is_some() || retry_max.is_some() {
        let (a, b) = (retry_min.unwrap_or(100), retry_max.unwrap_or(1000));
        if a > b {
            let (key, msg) = if retry_min.is_some() {
                (
                    "retry_min_ms",
                    format!(
                        "must not exceed retry_max_ms ({b}{})",
                        if retry_max.is_none() {
                            ", the default"
                        } else {
                            ""
                        }
                    ),
                )
            } else {
                (
                    "retry_max_ms",
                    format!("must not be below retry_min_ms ({a}, the default)"),
                )
            };
            p.push(u.span_of(key), &format!("upstream.{key}"), msg);
        }
    }
    let endpoint = url.as_ref().and_then(|url| {
        if redis {
            return Some(url.clone());
        }
        let ok = (url.starts_with("http://") || url.starts_with("https://")) && reqwest::Url::parse(url).is_ok();
        if !ok {
            p.push(u.span_of("url"), "upstream.url", format!("\"{url}\" is not an http:// or https:// URL (the ingest API's base, e.g. http://ingest.example:8000)"));
            return None;
        }
        let profile = if profile == Some("collect") { Profile::Collect } else { Profile::BagEvents };
        let suffix = path.clone().unwrap_or_else(|| profile.default_path().to_string());
        Some(format!("{}{}", url.trim_end_matches('/'), suffix))
    });
    if let Some(pth) = &path {
        if !pth.starts_with('/') {
            p.push(u.span_of("path"), "upstream.path", "must start with '/'");
        }
    }
    let compression = match compression.unwrap_or("gzip") {
        "zstd" => Compression::Zstd(level.unwrap_or(1) as i32),
        "none" => Compression::None,
        _ => {
            if level.is_some_and(|l| l > 9) {
                p.push(
                    u.span_of("compression_level"),
                    "upstream.compression_level",
                    "gzip levels are 1 to 9",
                );
            }
            Compression::Gzip(level.unwrap_or(1) as u32)
        }
    };
    if let Some(Sink::RedisStreams(r)) = &sink {
        let batch = max_events.unwrap_or(500) as u64;
        let flight = max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT as i64) as u64;
        if r.maxlen > 0 && r.maxlen < batch * flight {
            p.push(
                u.span_of("maxlen"),
                "upstream.maxlen",
                format!("{} would trim the gateway's own batches before any consumer reads them: use 0 (no trimming) or at least batch_max_events × max_in_flight = {}", r.maxlen, batch * flight),
            );
        }
    }
    Some(UpstreamConfig {
        endpoint: endpoint?,
        sink: sink?,
        profile: if profile? == "collect" {
            Profile::Collect
        } else {
            Profile::BagEvents
        },
        compression,
        token_file: token_file.map(|t| {
            check_credential(u, p, "upstream.token_file", &t);
            secret_path(base, &t)
        }),
        ca_file: ca_file.map(|t| resolve(base, &t)),
        batch_max_events: max_events.unwrap_or(500) as usize,
        batch_max_bytes: max_bytes.unwrap_or(4 * 1024 * 1024) as usize,
        batch_max_delay: ms(max_delay, 1000),
        timeout: ms(timeout, 10_000),
        pool_idle: ms(pool_idle, 4_000),
        retry_min: ms(retry_min, 100),
        retry_max: ms(retry_max, 1000),
        auth_retry: ms(auth_retry, 30_000),
        retry_after_max: ms(retry_after_max, 300_000),
        order: if order == Some("live-first") {
            Order::LiveFirst
        } else {
            Order::Fifo
        },
        backlog_max_eps: backlog_eps.unwrap_or(2000) as u32,
        max_in_flight: max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT as i64) as usize,
        event_type: event_type.unwrap_or("interaction").to_string(),
        fields,
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn credentials_come_from_the_service_credentials_directory() {
        let dir = std::ffi::OsStr::new("/run/credentials/scangate.service");
        assert_eq!(
            credential_path("credential:upstream-token", Some(dir)),
            Some(PathBuf::from(
                "/run/credentials/scangate.service/upstream-token"
            ))
        );
        assert_eq!(
            credential_path("credential:upstream-token", None),
            Some(PathBuf::from("$CREDENTIALS_DIRECTORY/upstream-token"))
        );
        assert_eq!(credential_path("/etc/scangate/token", Some(dir)), None);
    }

    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab\ncd", 2), (1, 3), "the newline is on its line");
        assert_eq!(line_col("ab\ncd", 3), (2, 1));
        assert_eq!(
            line_col("ab\n\n", 4),
            (3, 1),
            "the end, after a last newline"
        );
        assert_eq!(line_col("", 0), (1, 1));
    }

    /// Against a plain rescan of the text, for every offset of texts with empty lines,
    /// CRLF and multi-byte characters.
    #[test]
    fn line_index_agrees_with_a_rescan() {
        for text in [
            "",
            "\n",
            "a",
            "\n\nx\r\ny",
            "é\n€€\n\n🦀x\n",
            "[a]\nb = 1\n",
        ] {
            for offset in (0..=text.len()).filter(|&o| text.is_char_boundary(o)) {
                let before = &text[..offset];
                let line = before.matches('\n').count() + 1;
                let col = before.rfind('\n').map_or(offset + 1, |i| offset - i);
                assert_eq!(line_col(text, offset), (line, col), "{text:?} at {offset}");
            }
        }
    }

    /// Keys and messages are shown escaped where a terminal would act on them: a newline
    /// in a quoted key (one error over two lines), ESC (colours), a right-to-left override.
    #[test]
    fn keys_with_control_and_bidi_characters_are_shown_escaped() {
        let text = "[gateway]\n\"a\\nb\" = 1\n\"\\u001b[31mRED\\r\u{202e}evil\" = 2\n";
        let errors = Config::parse(text, Path::new("/etc")).unwrap_err();
        let shown = render_invalid(Path::new("gw.toml"), &errors);
        assert!(
            !shown.contains('\u{1b}') && !shown.contains('\r') && !shown.contains('\u{202e}'),
            "{shown:?}"
        );
        assert!(shown.contains("a\\u{a}b"), "{shown}");
        assert!(
            shown.contains("\\u{1b}[31mRED\\u{d}\\u{202e}evil"),
            "{shown}"
        );
        assert_eq!(
            shown.lines().count(),
            1 + errors.len(),
            "one line per error: {shown}"
        );
    }

    /// A file cut inside a value: the parser's message is empty; ours says what happened.
    #[test]
    fn a_file_cut_short_is_named_as_such() {
        let errors = Config::parse("[suppress]\nwindow_ms = ", Path::new("/etc")).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!((errors[0].line, errors[0].column), (2, 13));
        assert!(errors[0].message.contains("cut short"), "{:?}", errors[0]);
        // However it is cut, with the newline an editor adds or not; the parser's own words
        // (of several lines) on one line.
        for end in [
            "window_ms = \n",
            "mode = \"aggr",
            "x = [1, 2\n",
            "x = { a = 1",
            "x = \"\"\"abc\n",
            "[suppr",
            "window_",
            "window_ms = 20_\n",
        ] {
            let errors =
                Config::parse(&format!("[suppress]\n{end}"), Path::new("/etc")).unwrap_err();
            assert!(
                errors[0].message.contains("cut short"),
                "{end:?}: {:?}",
                errors[0]
            );
            assert!(
                !errors[0].message.contains("\\u{a}"),
                "{end:?}: {:?}",
                errors[0]
            );
        }
    }

    /// A file that is mostly errors: the first 200 listed, the rest counted; a huge key shown
    /// by its first 80 characters (whole characters, here multi-byte).
    #[test]
    fn a_flood_of_errors_is_listed_in_part_with_short_keys() {
        let long_key = "é".repeat(10_000);
        let text: String = std::iter::once(format!("\"{long_key}\" = 1\n"))
            .chain((0..5_000).map(|i| format!("[x{i}]\n")))
            .collect();
        let errors = Config::parse(&text, Path::new("/etc")).unwrap_err();
        assert!(errors.len() > RENDERED_ERRORS_MAX, "{}", errors.len());
        assert!(
            errors.iter().any(|e| e.line == 5_001),
            "the last line's error is located"
        );
        let shown = render_invalid(Path::new("gw.toml"), &errors);
        assert_eq!(
            shown.lines().count(),
            1 + RENDERED_ERRORS_MAX + 1,
            "{shown:.300}"
        );
        assert!(shown.ends_with(&format!(
            "… and {} more error(s) not shown: fix the ones above first",
            errors.len() - RENDERED_ERRORS_MAX
        )));
        let mut keys: Vec<&LocatedError> = errors.iter().collect();
        keys.sort_by_key(|e| std::cmp::Reverse(e.key.len()));
        let one = render_invalid(Path::new("gw.toml"), &[keys[0].clone()]);
        assert!(one.len() < 1_000, "{one:.300}");
        assert!(
            one.contains(&format!("{}…", "é".repeat(RENDERED_KEY_MAX))),
            "{one:.300}"
        );
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let cfg = Config::parse(
            "[gateway]\nid='gw1'\n[[source]]\nname='a'\nkind='replay'\nprotocol='lines'\nfile='x.cap'\n[upstream]\nurl='http://h:8000/'\nprofile='collect'\n",
            Path::new("/etc/scangate"),
        )
        .expect("valid");
        assert_eq!(cfg.upstream.endpoint, "http://h:8000/api/v1/collect");
        assert_eq!(cfg.spool.sync, SyncMode::Full);
        assert_eq!(cfg.gateway.site, "gw1");
        assert!(
            matches!(&cfg.sources[0].kind, SourceKind::Replay { file, .. } if file == Path::new("/etc/scangate/x.cap"))
        );
    }
}
