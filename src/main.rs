//! The `scangate` binary: CLI parsing and exit codes only; everything else is in the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use scangate::config::{Config, ConfigError};
use scangate::metrics::Metrics;
use scangate::spool;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// EX_CONFIG from sysexits.h: configuration error.
const EXIT_CONFIG: u8 = 78;
/// EX_CANTCREAT: cannot create/write the state (spool) files.
const EXIT_CANTCREAT: u8 = 73;

#[derive(Parser)]
#[command(
    name = "scangate",
    version,
    about = "Edge gateway for RFID readers, barcode scanners and IoT sensors"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway.
    Run {
        #[arg(long, short, default_value = "/etc/scangate/scangate.toml")]
        config: PathBuf,
        /// Seconds to drain on SIGTERM before giving up.
        #[arg(long, default_value_t = 10)]
        grace_secs: u64,
    },
    /// Check a config file; lists every error with line and column. Exit 0 valid, 78 invalid.
    Validate {
        #[arg(long, short, default_value = "/etc/scangate/scangate.toml")]
        config: PathBuf,
    },
    /// Print a fully commented example config.
    PrintConfig,
    /// Show the spool's backlog, oldest event, dead letters and the upstream's last state.
    Status {
        #[arg(long, short, default_value = "/etc/scangate/scangate.toml")]
        config: PathBuf,
    },
    /// Inspect and manage the spool.
    Spool {
        #[arg(long, short, default_value = "/etc/scangate/scangate.toml")]
        config: PathBuf,
        #[command(subcommand)]
        cmd: SpoolCmd,
    },
    /// Run the real pipeline on a bundled capture with an in-process ingest endpoint.
    Demo {
        /// Replay speed factor (1 = recorded speed).
        #[arg(long, default_value_t = 2.0)]
        speed: f64,
    },
    /// Decode a serial port live (or a recorded capture) and show the reads: tag, RSSI,
    /// antenna, reads/s per tag, bad frames. `--protocol auto` says which protocol and baud
    /// rate match and how sure it is.
    Sniff(SniffArgs),
    /// Record what a serial port sends into a capture file (replay format, with the port
    /// settings in its header) to send a field problem in.
    Record {
        #[arg(long)]
        port: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 9600)]
        baud: u32,
        /// Hex bytes written after opening the port.
        #[arg(long)]
        init: Option<String>,
        /// Stop after this many seconds (default: until Ctrl-C).
        #[arg(long)]
        seconds: Option<f64>,
    },
    /// Run the pipeline with a capture file as the only source, until it is all delivered.
    Replay {
        #[arg(long, short, default_value = "/etc/scangate/scangate.toml")]
        config: PathBuf,
        /// The capture file (see hardware-fixtures/README.md).
        file: PathBuf,
        /// "recorded", "max", or a factor.
        #[arg(long, default_value = "max")]
        speed: String,
    },
}

#[derive(Subcommand)]
enum SpoolCmd {
    /// Counts and sizes.
    Stats,
    /// List dead letters (newest last).
    DeadLetters {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Write dead letters as JSON lines to stdout.
    Export,
    /// Put dead letters back in the queue (all, or the given ids), keeping their event ids.
    Requeue { ids: Vec<i64> },
    /// Re-send every decodable event of a spool file that was moved aside as corrupt
    /// (`spool.db.corrupt-…`), with its original ids. Stop the service first.
    Salvage { file: PathBuf },
}

fn load(config: &Path) -> Result<Config, ExitCode> {
    Config::load(config).map_err(|e| {
        eprintln!("{e}");
        match e {
            ConfigError::Invalid { .. } => ExitCode::from(EXIT_CONFIG),
            ConfigError::Read { .. } => ExitCode::from(EXIT_CONFIG),
        }
    })
}

fn fmt_ms(ms: Option<i64>) -> String {
    ms.map(scangate::event::rfc3339_ms)
        .unwrap_or_else(|| "never".into())
}

/// The files `cfg` names that a start or a reload would trip on, one message each (the unit's
/// `ExecStartPre` and `ExecReload` run `validate`): the admin token (one that cannot be read
/// refuses every admin request, even /health), and the CA bundles, client certificates and
/// keys, tokens and passwords of the upstream and the MQTT sources. A systemd credential
/// exists only inside the service: not checked outside it.
fn unusable_files(cfg: &scangate::config::Config) -> Vec<String> {
    let mut problems = Vec::new();
    if cfg.admin.listen.is_some()
        && !cfg
            .admin
            .token_file
            .as_ref()
            .is_some_and(|p| p.starts_with("$CREDENTIALS_DIRECTORY"))
    {
        if let Some(Err(e)) = scangate::admin::admin_token(cfg) {
            problems.push(format!("admin.token_file: {e}"));
        }
    }
    problems.extend(scangate::config::check_named_files(cfg));
    problems
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(
        cli.cmd,
        Cmd::Run { .. } | Cmd::Demo { .. } | Cmd::Replay { .. }
    ) {
        // Commands that print (status, spool, sniff, …) end quietly when their reader goes
        // away (`| head`), as command-line tools do, instead of panicking on a broken pipe.
        // SAFETY: setting a signal's disposition to its default before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    scangate::service::tune_allocator();
    match cli.cmd {
        Cmd::PrintConfig => {
            print!("{}", scangate::config::EXAMPLE);
            ExitCode::SUCCESS
        }
        Cmd::Validate { config } => match load(&config).map(|cfg| {
            let problems = unusable_files(&cfg);
            (cfg, problems)
        }) {
            Ok((_, problems)) if !problems.is_empty() => {
                for problem in problems {
                    eprintln!("{}: {problem}", config.display());
                }
                ExitCode::from(EXIT_CONFIG)
            }
            Ok((cfg, _)) => {
                println!(
                    "{}: valid ({} source(s), upstream {})",
                    config.display(),
                    cfg.sources.len(),
                    cfg.upstream.endpoint
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Cmd::Run { config, grace_secs } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            run_daemon(cfg, Duration::from_secs(grace_secs), false, Some(config))
        }
        Cmd::Replay {
            config,
            file,
            speed,
        } => {
            let mut cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let speed = match speed.as_str() {
                "max" => scangate::config::ReplaySpeed::Max,
                "recorded" => scangate::config::ReplaySpeed::Recorded,
                f => match f.parse::<f64>() {
                    Ok(f) if (scangate::config::MIN_SPEED_FACTOR..=10_000.0).contains(&f) => {
                        scangate::config::ReplaySpeed::Factor(f)
                    }
                    _ => {
                        eprintln!("--speed must be \"max\", \"recorded\" or a factor between 0.001 and 10000");
                        return ExitCode::from(2);
                    }
                },
            };
            let template = cfg.sources.first().cloned();
            let Some(mut src) = template else {
                return ExitCode::from(EXIT_CONFIG);
            };
            src.kind = scangate::config::SourceKind::Replay {
                file,
                speed,
                repeat: 1,
            };
            cfg.sources = vec![src];
            run_daemon(cfg, Duration::from_secs(10), true, None)
        }
        Cmd::Demo { speed } => {
            if !(scangate::config::MIN_SPEED_FACTOR..=10_000.0).contains(&speed) {
                eprintln!("--speed must be a factor between 0.001 and 10000");
                return ExitCode::from(2);
            }
            scangate::service::init_logging_quiet();
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => return report(e),
            };
            rt.block_on(async {
                let token = CancellationToken::new();
                scangate::service::spawn_signal_handler(token.clone());
                match scangate::demo::run(speed, token).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => report(e),
                }
            })
        }
        Cmd::Sniff(args) => match sniff(args) {
            Ok(code) => code,
            Err(e) => report(e),
        },
        Cmd::Record {
            port,
            out,
            baud,
            init,
            seconds,
        } => {
            let run = || -> anyhow::Result<()> {
                let init = hex_arg(init.as_deref())?;
                let settings = scangate::config::PortSettings::new(baud);
                eprintln!(
                    "recording {} at {} into {}; Ctrl-C to stop",
                    port.display(),
                    settings.describe(),
                    out.display()
                );
                let n = scangate::sniff::record(
                    &port,
                    &settings,
                    &init,
                    &out,
                    seconds.map(Duration::from_secs_f64),
                )?;
                eprintln!("{n} bytes recorded");
                Ok(())
            };
            match run() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => report(e),
            }
        }
        Cmd::Status { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match spool::keeping_owner(&cfg.gateway.state_dir, || status(&cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => report(e),
            }
        }
        Cmd::Spool { config, cmd } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match spool::keeping_owner(&cfg.gateway.state_dir, || spool_cmd(&cfg, cmd)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => report(e),
            }
        }
    }
}

/// `scangate sniff` arguments.
#[derive(clap::Args)]
struct SniffArgs {
    /// The serial port (e.g. /dev/serial/by-id/usb-…).
    #[arg(long, conflicts_with = "capture", required_unless_present = "capture")]
    port: Option<PathBuf>,
    /// A capture file (hardware-fixtures format) to decode offline instead.
    #[arg(long)]
    capture: Option<PathBuf>,
    /// lines, em4100, thingmagic, uhf-bb, chafon, or auto.
    #[arg(long, default_value = "auto")]
    protocol: String,
    /// Baud rate (default: the protocol's; with auto, each common rate is tried).
    #[arg(long)]
    baud: Option<u32>,
    /// Hex bytes written after opening the port (e.g. a start-reading command).
    #[arg(long)]
    init: Option<String>,
    /// Chafon answer layout: rssi (UHFReader288 family) or classic (UHFReader18).
    #[arg(long, default_value = "rssi")]
    family: String,
    /// One JSON object per read (kind, tag, rssi_dbm, antenna, symbology) or skip.
    #[arg(long)]
    json: bool,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long)]
    seconds: Option<f64>,
    /// With auto on a port: how long to listen at each baud rate, ms.
    #[arg(long, default_value_t = 1500)]
    listen_ms: u64,
}

fn hex_arg(s: Option<&str>) -> anyhow::Result<Vec<u8>> {
    match s {
        None => Ok(Vec::new()),
        Some(h) => scangate::config::unhex(h)
            .ok_or_else(|| anyhow::anyhow!("--init \"{h}\" is not hex bytes such as \"FF 03 9A\"")),
    }
}

fn sniff(a: SniffArgs) -> anyhow::Result<ExitCode> {
    use scangate::config::{ChafonFamily, PortSettings, ProtocolConfig, ProtocolKind};
    use std::io::Write;
    let family = match a.family.as_str() {
        "rssi" => ChafonFamily::Rssi,
        "classic" => ChafonFamily::Classic,
        f => anyhow::bail!("--family \"{f}\" is not rssi or classic"),
    };
    let kind = match a.protocol.as_str() {
        "auto" => None,
        p => Some(ProtocolKind::parse(p).ok_or_else(|| {
            anyhow::anyhow!(
                "--protocol \"{p}\" is not one of lines, em4100, thingmagic, uhf-bb, chafon, auto"
            )
        })?),
    };
    let cfg = |kind: ProtocolKind| {
        let mut c = ProtocolConfig::from(kind);
        c.chafon_family = family;
        c
    };
    let mut out = std::io::stdout().lock();
    if let Some(file) = a.capture {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
        let kind = match kind {
            Some(k) => k,
            None => {
                let (_, recs, _) = scangate::source::capture::parse_recording(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                let bytes: Vec<u8> = recs.into_iter().flat_map(|r| r.bytes).collect();
                let g = scangate::sniff::guess(&bytes).remove(0);
                if !a.json {
                    writeln!(
                        out,
                        "protocol: {} ({}: {:.0}% of bytes in valid frames)",
                        g.protocol.name(),
                        g.confidence(),
                        g.score * 100.0
                    )?;
                }
                g.protocol
            }
        };
        let (outs, warning) = scangate::sniff::decode_capture(&text, &cfg(kind))
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        if let Some(w) = warning {
            eprintln!(
                "warning: {}: {w} (the recording was cut short; that line is left out)",
                file.display()
            );
        }
        for d in &outs {
            if a.json {
                writeln!(out, "{}", scangate::sniff::json_line(d))?;
            } else {
                match d {
                    scangate::protocol::Decoded::Read(r) => writeln!(
                        out,
                        "{:<8} {:<32} rssi {} antenna {}",
                        r.kind.as_str(),
                        r.tag,
                        r.rssi_dbm.map_or_else(
                            || r.rssi_raw.map_or("-".into(), |v| format!("raw {v}")),
                            |v| format!("{v:.1} dBm")
                        ),
                        r.antenna.map_or("-".into(), |v| v.to_string())
                    )?,
                    scangate::protocol::Decoded::Skipped { reason, bytes } => {
                        writeln!(out, "BAD      {reason} ({bytes} bytes)")?
                    }
                    scangate::protocol::Decoded::Frame { what } => {
                        writeln!(out, "frame    {what}")?
                    }
                }
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(port) = a.port else {
        anyhow::bail!("give --port or --capture");
    };
    let init = hex_arg(a.init.as_deref())?;
    let (settings, kind) = match kind {
        Some(k) => (PortSettings::new(a.baud.unwrap_or(k.default_baud())), k),
        None => match scangate::sniff::auto_detect(
            &port,
            a.baud,
            &init,
            Duration::from_millis(a.listen_ms),
            &mut out,
        )? {
            Some(found) => found,
            None => return Ok(ExitCode::from(1)),
        },
    };
    scangate::sniff::sniff_port(
        &port,
        &settings,
        &cfg(kind),
        &init,
        a.json,
        a.seconds.map(Duration::from_secs_f64),
        &mut out,
    )?;
    Ok(ExitCode::SUCCESS)
}

fn report(e: anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::FAILURE
}

/// One async worker: the async stages (ingest, forwarder, admin) are light, and the heavy
/// work has threads of its own (each serial port, the spool). With two workers the runtime
/// spends more on waking the second one than it gains: at 5,000 reads/s it cost 20 % more CPU
/// per read and 1 MB more memory, with the same full-speed throughput (BENCHMARKS.md).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `config`: the file to read again on SIGHUP (`scangate run`).
fn run_daemon(
    cfg: Config,
    grace: Duration,
    exit_when_idle: bool,
    config: Option<PathBuf>,
) -> ExitCode {
    scangate::service::init_logging();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return report(e),
    };
    rt.block_on(async move {
        let token = CancellationToken::new();
        let reload = config.map(|path| scangate::app::Reload {
            path,
            asked: Arc::new(tokio::sync::Notify::new()),
        });
        scangate::service::spawn_signal_handler_with_reload(
            token.clone(),
            reload.as_ref().map(|r| r.asked.clone()),
        );
        let metrics = Arc::new(Metrics::default());
        tracing::info!(gateway = %cfg.gateway.id, sources = cfg.sources.len(), upstream = %cfg.upstream.endpoint, "scangate starting");
        let opts = scangate::app::RunOptions {
            grace,
            exit_when_idle,
            reload,
            ..Default::default()
        };
        match scangate::app::run(cfg, metrics, token, opts, |_| {}).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e @ scangate::app::AppError::Spool(spool::SpoolError::StateDir { .. } | spool::SpoolError::Open { .. } | spool::SpoolError::ReadOnly(_))) => {
                tracing::error!(error = %e, "Cannot open the spool");
                eprintln!("error: {e}");
                ExitCode::from(EXIT_CANTCREAT)
            }
            Err(e) => {
                tracing::error!(error = %e, "scangate stopped with an error");
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn status(cfg: &Config) -> anyhow::Result<()> {
    let conn = spool::Spool::open_read_only(&cfg.gateway.state_dir)?;
    let s = spool::stats_of(&conn)?;
    let now = scangate::event::wall_now_ms();
    println!("gateway:         {}", cfg.gateway.id);
    match &cfg.upstream.sink {
        scangate::config::Sink::Http => println!("upstream:        http {}", cfg.upstream.endpoint),
        scangate::config::Sink::RedisStreams(r) => println!(
            "upstream:        redis-streams {} stream {}{}",
            r.url,
            r.stream,
            r.dlq_stream
                .as_deref()
                .map(|d| format!(", dead letters also in {d}"))
                .unwrap_or_default()
        ),
    }
    println!(
        "spool:           {}",
        spool::Spool::path_in(&cfg.gateway.state_dir).display()
    );
    println!("backlog:         {} events", s.backlog);
    println!(
        "oldest event:    {}",
        s.oldest_committed_ms
            .map(|t| format!(
                "{} ({}s ago)",
                scangate::event::rfc3339_ms(t),
                (now - t) / 1000
            ))
            .unwrap_or_else(|| "none".into())
    );
    println!("dead letters:    {}", s.dead_letters);
    println!("last delivery:   {}", fmt_ms(s.last_delivery_ms));
    println!(
        "upstream error:  {}",
        s.last_error
            .as_deref()
            .map(|e| format!("{e} (since {})", fmt_ms(s.last_error_ms)))
            .unwrap_or_else(|| "none".into())
    );
    println!(
        "spool size:      {} bytes used of {} max",
        s.used_bytes, cfg.spool.max_bytes
    );
    match cfg
        .admin
        .listen
        .map(|a| live_status(a, cfg.admin.token_file.as_deref()))
    {
        Some(Ok(v)) => {
            let sup = &v["suppression"];
            println!(
                "suppression:     {} reads in, {} passes out ({} reads folded into open passes, {} under the RSSI floor); {} passes open, {} forced closes (max_tracked), {} moved to a stronger zone",
                sup["reads"], sup["passes_emitted"], sup["suppressed"], sup["below_floor"], sup["tracked"], sup["forced_closes"], sup["moves"]
            );
            if v["clock_unsynced"] == true {
                println!("WARNING:         the wall clock is not set (before this build's date): reads are stamped on boot time and delivery waits until it syncs (check NTP)");
            }
            for src in v["sources"].as_array().into_iter().flatten() {
                let since = src["since_ms"].as_i64();
                let state = if src["kind"] == "replay" {
                    "replay (a capture file, no port)".to_string()
                } else if src["connected"] == true {
                    format!("connected since {}", fmt_ms(since))
                } else {
                    format!(
                        "DISCONNECTED since {} ({})",
                        fmt_ms(since),
                        src["last_error"].as_str().unwrap_or("not opened yet")
                    )
                };
                println!(
                    "reader {:<9} {state}; last frame {}; {} bytes, {} frames, {} reads, {} reopens, bad frames {}, other frames {}",
                    src["name"].as_str().unwrap_or("?"),
                    fmt_ms(src["last_frame_ms"].as_i64()),
                    src["bytes"],
                    src["frames"],
                    src["reads"],
                    src["reopens"],
                    src["bad_frames"],
                    src["other_frames"]
                );
                let antennas: Vec<String> = src["antennas"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| match a["port"].as_u64() {
                        None => format!("no port {}", a["reads"]),
                        Some(p) if a["and_above"] == true => format!("{p}+: {}", a["reads"]),
                        Some(p) => format!("{p}: {}", a["reads"]),
                    })
                    .collect();
                if !antennas.is_empty() {
                    println!("  reads by antenna: {}", antennas.join(", "));
                }
                let now = v["now_ms"].as_i64().unwrap_or(0);
                for r in src["recent_reads"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .rev()
                    .take(3)
                {
                    println!(
                        "  read {:<24} {:>8} antenna {:<3} {} ms ago",
                        r["tag"].as_str().unwrap_or("?"),
                        r["rssi_dbm"]
                            .as_f64()
                            .map_or("–".to_string(), |d| format!("{d:.1} dBm")),
                        r["antenna"]
                            .as_u64()
                            .map_or("–".to_string(), |a| a.to_string()),
                        (now - r["at_ms"].as_i64().unwrap_or(now)).max(0)
                    );
                }
            }
        }
        Some(Err(e)) => println!(
            "readers:         could not ask the running daemon ({e:#}): no live port state"
        ),
        None => println!("readers:         the admin listener is off: no live port state"),
    }
    for q in spool::quarantined(&cfg.gateway.state_dir) {
        println!(
            "WARNING:         {} was moved aside as corrupt; its events are NOT sent until you stop the service and run: scangate spool salvage {}",
            q.display(),
            q.display()
        );
    }
    Ok(())
}

/// The running daemon's `/status` (1 s timeout).
fn live_status(
    addr: std::net::SocketAddr,
    token_file: Option<&Path>,
) -> anyhow::Result<serde_json::Value> {
    let token = token_file
        .map(std::fs::read_to_string)
        .transpose()?
        .map(|t| t.trim().to_string());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()?;
        let mut req = client.get(format!("http://{addr}/status"));
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        let body = req.send().await?.error_for_status()?.bytes().await?;
        Ok(serde_json::from_slice(&body)?)
    })
}

fn spool_cmd(cfg: &Config, cmd: SpoolCmd) -> anyhow::Result<()> {
    match cmd {
        SpoolCmd::Stats => {
            let conn = spool::Spool::open_read_only(&cfg.gateway.state_dir)?;
            let s = spool::stats_of(&conn)?;
            println!("backlog_events {}\nchunks {}\ndead_letters {}\nnext_seq {}\nused_bytes {}\nfile_bytes {}\nmax_bytes {}", s.backlog, s.chunks, s.dead_letters, s.next_seq, s.used_bytes, s.file_bytes, cfg.spool.max_bytes);
        }
        SpoolCmd::DeadLetters { limit } => {
            let conn = spool::Spool::open_read_only(&cfg.gateway.state_dir)?;
            for d in spool::newest_dead_letters(&conn, limit)? {
                let tag = d
                    .body
                    .as_ref()
                    .map(|b| b.tag.clone())
                    .unwrap_or_else(|| format!("<{} raw bytes>", d.raw.len()));
                println!(
                    "#{} seq={} event_id={} tag={} status={} failed={} reason={}",
                    d.id,
                    d.seq,
                    d.event_id,
                    tag,
                    d.status.map(|s| s.to_string()).unwrap_or("-".into()),
                    fmt_ms(Some(d.failed_ms)),
                    d.reason
                );
            }
        }
        SpoolCmd::Export => {
            let conn = spool::Spool::open_read_only(&cfg.gateway.state_dir)?;
            let mut out = std::io::stdout().lock();
            // A page at a time: bounded memory however many there are.
            let mut after = 0;
            loop {
                let page = spool::dead_letters_page(&conn, after, 500)?;
                let Some(last) = page.last() else { break };
                after = last.id;
                for d in page {
                    let v = serde_json::json!({
                        "id": d.id, "seq": d.seq, "event_id": d.event_id, "committed": fmt_ms(Some(d.committed_ms)),
                        "failed": fmt_ms(Some(d.failed_ms)), "status": d.status, "reason": d.reason,
                        "event": d.body.as_ref().map(|b| serde_json::json!({
                            "kind": b.kind.as_str(), "tag": b.tag, "source": b.source, "location": b.location, "device": b.device,
                            "antenna": b.antenna, "rssi_dbm": b.rssi_dbm(), "read_count": b.read_count,
                            "first_seen": fmt_ms(Some(b.first_seen_ms)), "last_seen": fmt_ms(Some(b.last_seen_ms)),
                        })),
                        "raw_hex": if d.raw.is_empty() { None } else { Some(d.raw.iter().map(|b| format!("{b:02x}")).collect::<String>()) },
                    });
                    use std::io::Write;
                    writeln!(out, "{v}")?;
                }
            }
        }
        SpoolCmd::Requeue { ids } => {
            let (mut sp, _) = spool::Spool::open(
                &cfg.gateway.state_dir,
                spool::SpoolOptions::of(cfg),
                Arc::new(Metrics::default()),
            )?;
            let n = sp.requeue(
                if ids.is_empty() { None } else { Some(&ids) },
                scangate::event::wall_now_ms(),
            )?;
            println!(
                "requeued {n} dead letter(s); scangate sends them with their original event ids"
            );
        }
        SpoolCmd::Salvage { file } => {
            let (mut sp, _) = spool::Spool::open(
                &cfg.gateway.state_dir,
                spool::SpoolOptions::of(cfg),
                Arc::new(Metrics::default()),
            )?;
            let r = sp
                .salvage(&file, scangate::event::wall_now_ms())
                .with_context(|| format!("cannot salvage {}", file.display()))?;
            println!(
                "salvaged {}: {} undelivered event(s) queued again{}, {} already delivered, {} dead letter(s) kept, {} damaged row(s) skipped; the file is now {}.salvaged",
                file.display(),
                r.events,
                if r.same_ids { " with their original event ids" } else { " (the file's id salt differs: they get new event ids)" },
                r.already_delivered,
                r.dead_letters,
                r.unreadable_rows,
                file.display()
            );
        }
    }
    Ok(())
}
