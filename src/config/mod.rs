//! Configuration: one TOML file, read in two stages. The parsed document is walked once by
//! typed getters that record every problem with its span (so `scangate validate` lists them
//! all, with line and column), then cross-field checks run, and only a fully valid file becomes
//! a [`Config`]. Relative paths are resolved against the config file's directory.
//!
//! The commented example `config/scangate.toml` is the technician's reference; `print-config`
//! prints it, and a test loads every file in `config/`.

mod walk;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuppressMode {
    Aggregate,
    First,
}

#[derive(Debug, Clone)]
pub struct SuppressConfig {
    pub mode: SuppressMode,
    pub window: Duration,
    pub max_pass: Duration,
    pub min_rssi_dbm: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolKind {
    Lines,
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
        baud: u32,
    },
    Replay {
        file: PathBuf,
        speed: ReplaySpeed,
        repeat: u32,
    },
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub kind: SourceKind,
    pub protocol: ProtocolKind,
    pub location: String,
    pub device: String,
    pub group: Option<String>,
    pub scan_type: Option<String>,
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

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Full endpoint URL: base url + profile path (or the `path` override).
    pub endpoint: String,
    pub profile: Profile,
    pub compression: Compression,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub batch_max_events: usize,
    pub batch_max_bytes: usize,
    pub batch_max_delay: Duration,
    pub timeout: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub auth_retry: Duration,
    pub retry_after_max: Duration,
    pub order: Order,
    pub backlog_max_eps: u32,
    /// `event_type` of the collect profile.
    pub event_type: String,
    pub fields: FieldMapping,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: Option<std::net::SocketAddr>,
}

/// Every problem found in a config file, each with file, line, column and key.
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

fn render_invalid(path: &Path, errors: &[LocatedError]) -> String {
    let mut s = format!("{} has {} error(s):", path.display(), errors.len());
    for e in errors {
        s.push_str(&format!(
            "\n  {}:{}:{}: {}: {}",
            path.display(),
            e.line,
            e.column,
            e.key,
            e.message
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

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
    (line, col)
}

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
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
        let doc = match ImDocument::parse(text) {
            Ok(d) => d,
            Err(e) => {
                let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
                let message = e.message().trim().to_string();
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
                        key: pr.key,
                        message: pr.message,
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
            g.finish(p);
            let state_dir = resolve(base, &state_dir);
            // Default: systemd's runtime directory (RAM, kept across restarts with
            // RuntimeDirectoryPreserve=yes: no flash writes at all), else the state dir.
            let journal_dir = match journal_dir {
                Some(j) => resolve(base, &j),
                None => std::env::var_os("RUNTIME_DIRECTORY")
                    .and_then(|r| std::env::split_paths(&r).next().filter(|p| p.is_absolute()))
                    .map(|r| r.join("journal"))
                    .unwrap_or_else(|| state_dir.join("journal")),
            };
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
        if let Some(s) = s.as_mut() {
            mode = s.choice(p, "mode", &["aggregate", "first"]);
            window = s.integer(p, "window_ms", 1, 3_600_000);
            max_pass = s.integer(p, "max_pass_ms", 1, 86_400_000);
            floor = s.float(p, "min_rssi_dbm", -150.0, 50.0);
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
            mode: if mode == Some("first") {
                SuppressMode::First
            } else {
                SuppressMode::Aggregate
            },
            window: ms(window, 2000),
            max_pass: ms(max_pass, 30_000),
            min_rssi_dbm: floor,
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
        if let Some(mut a) = root.table(p, "admin") {
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
            a.finish(p);
        }
        AdminConfig { listen }
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
    let name = s.required_string(p, "name");
    let kind = s.choice(p, "kind", &["serial", "mqtt", "replay"]);
    if s.table.get("kind").is_none() {
        p.push(
            s.own_span(),
            &s.key_path("kind"),
            "is required: \"serial\", \"mqtt\" or \"replay\"",
        );
    }
    let protocol = match s.choice(p, "protocol", &["lines"]) {
        Some(_) => Some(ProtocolKind::Lines),
        None if s.table.get("protocol").is_none() => {
            p.push(
                s.own_span(),
                &s.key_path("protocol"),
                "is required (this version decodes \"lines\")",
            );
            None
        }
        None => None,
    };
    let location = s.string(p, "location");
    let device = s.string(p, "device");
    let group = s.string(p, "group");
    let scan_type = s.string(p, "scan_type");
    let path = s.string(p, "path");
    let baud = s.integer(p, "baud", 50, 4_000_000);
    let file = s.string(p, "file");
    let speed_item = s.item("speed");
    let repeat = s.integer(p, "repeat", 1, 1_000_000);
    let broker = s.string(p, "broker");
    let topics = s.string_array(p, "topics");

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
                baud: baud.unwrap_or(9600) as u32,
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
        _ => {
            let _ = (broker, topics);
            p.push(s.span_of("kind"), &s.key_path("kind"), "kind = \"mqtt\" is not available in this version yet; use \"serial\" or \"replay\"");
            return None;
        }
    };
    let name = name?;
    Some(SourceConfig {
        device: device.unwrap_or_else(|| name.clone()),
        location: location.unwrap_or_else(|| name.clone()),
        name,
        kind,
        protocol: protocol?,
        group,
        scan_type,
    })
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

fn build_upstream(u: &mut Section<'_>, base: &Path, p: &mut Problems) -> Option<UpstreamConfig> {
    let url = u.required_string(p, "url");
    let profile = u.choice(p, "profile", &["bag-events", "collect"]);
    if u.table.get("profile").is_none() {
        p.push(
            u.own_span(),
            "upstream.profile",
            "is required: \"bag-events\" or \"collect\"",
        );
    }
    let path = u.string(p, "path");
    let compression = u.choice(p, "compression", &["gzip", "zstd", "none"]);
    let level = u.integer(p, "compression_level", 1, 19);
    let token_file = u.string(p, "token_file");
    let ca_file = u.string(p, "ca_file");
    let max_events = u.integer(p, "batch_max_events", 1, 1000);
    let max_bytes = u.size(p, "batch_max_bytes", 1024);
    let max_delay = u.integer(p, "batch_max_delay_ms", 0, 3_600_000);
    let timeout = u.integer(p, "timeout_ms", 100, 600_000);
    let retry_min = u.integer(p, "retry_min_ms", 1, 600_000);
    let retry_max = u.integer(p, "retry_max_ms", 1, 3_600_000);
    let auth_retry = u.integer(p, "auth_retry_ms", 100, 3_600_000);
    let retry_after_max = u.integer(p, "retry_after_max_ms", 100, 86_400_000);
    let order = u.choice(p, "order", &["fifo", "live-first"]);
    let backlog_eps = u.integer(p, "backlog_max_eps", 1, 10_000_000);
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

    if let (Some(a), Some(b)) = (retry_min, retry_max) {
        if a > b {
            p.push(
                u.span_of("retry_min_ms"),
                "upstream.retry_min_ms",
                format!("must not exceed retry_max_ms ({b})"),
            );
        }
    }
    let endpoint = url.as_ref().and_then(|url| {
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
    Some(UpstreamConfig {
        endpoint: endpoint?,
        profile: if profile? == "collect" {
            Profile::Collect
        } else {
            Profile::BagEvents
        },
        compression,
        token_file: token_file.map(|t| resolve(base, &t)),
        ca_file: ca_file.map(|t| resolve(base, &t)),
        batch_max_events: max_events.unwrap_or(500) as usize,
        batch_max_bytes: max_bytes.unwrap_or(4 * 1024 * 1024) as usize,
        batch_max_delay: ms(max_delay, 1000),
        timeout: ms(timeout, 10_000),
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
        event_type: event_type.unwrap_or("interaction").to_string(),
        fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
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
