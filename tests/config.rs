//! Config files: every shipped file loads; a broken file lists every mistake with its line;
//! the CLI's exit codes (0 valid, 78 invalid).

use scangate::config::Config;
use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_scangate"))
}

#[test]
fn every_file_in_config_dir_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 1);
}

const BROKEN: &str = r#"[gateway]
id = "gw 1"
state_dir = "/tmp/x"

[spool]
max_bytes = "lots"
when_full = "explode"

[[source]]
name = "belt"
kind = "serial"
protocol = "lines"
baud = "fast"
colour = "blue"

[upstream]
url = "ftp://nowhere"
profile = "bag-events"
batch_max_events = 5000
retry_min_ms = 900
retry_max_ms = 100
max_in_flight = 0
"#;

#[test]
fn a_broken_file_lists_every_error_with_line_and_key() {
    let errs = Config::parse(BROKEN, Path::new("/etc/scangate")).unwrap_err();
    let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.key.as_str())).collect();
    let want = [
        (2, "gateway.id"),
        (6, "spool.max_bytes"),
        (7, "spool.when_full"),
        (13, "source[0].baud"),
        (14, "source[0].colour"),
        (17, "upstream.url"),
        (19, "upstream.batch_max_events"),
        (20, "upstream.retry_min_ms"),
        (22, "upstream.max_in_flight"),
    ];
    for w in want {
        assert!(got.contains(&w), "missing {w:?} in {got:?}");
    }
    // The serial source without a path is reported too (at its table).
    assert!(errs.iter().any(|e| e.key == "source[0].path"), "{errs:?}");
    assert!(errs.iter().all(|e| e.column >= 1));
}

#[test]
fn unknown_key_suggests_the_right_one() {
    let text = "[gateway]\nid='g'\nstate_dri='/tmp'\n[[source]]\nname='a'\nkind='replay'\nprotocol='lines'\nfile='x'\n[upstream]\nurl='http://h'\nprofile='collect'\n";
    let errs = Config::parse(text, Path::new("/")).unwrap_err();
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].line, 3);
    assert!(
        errs[0].message.contains("did you mean \"state_dir\""),
        "{}",
        errs[0].message
    );
}

#[test]
fn syntax_error_names_line_and_column() {
    let errs = Config::parse("[gateway]\nid = \"unterminated\n", Path::new("/")).unwrap_err();
    assert_eq!(errs[0].line, 2);
}

#[test]
fn validate_cli_exit_codes_and_listing() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, BROKEN).unwrap();
    let out = bin()
        .args(["validate", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:2:"), "{err}");
    assert!(err.contains("bad.toml:17:"), "{err}");
    assert!(
        err.lines().count() >= 9,
        "every error on its own line:\n{err}"
    );

    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/scangate.toml");
    let out = bin()
        .args(["validate", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let missing = bin()
        .args(["validate", "--config", "/nonexistent/scangate.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/scangate.toml"));
}

#[test]
fn print_config_prints_the_commented_reference_and_it_is_valid() {
    let out = bin().arg("print-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines()
            .filter(|l| l.trim_start().starts_with('#'))
            .count()
            > 30,
        "fully commented"
    );
    Config::parse(&text, Path::new("/etc/scangate")).unwrap();
}

#[test]
fn run_with_unwritable_state_dir_exits_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file where the state directory should be: cannot be created or written.
    let blocker = dir.path().join("state");
    std::fs::write(&blocker, "not a directory").unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, format!("[gateway]\nid='g'\nstate_dir='{}'\n[[source]]\nname='a'\nkind='replay'\nprotocol='lines'\nfile='x.cap'\n[upstream]\nurl='http://127.0.0.1:9'\nprofile='bag-events'\n[admin]\nlisten='off'\n", blocker.display())).unwrap();
    let out = bin().args(["run", "--config"]).arg(&cfg).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(73),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&blocker.display().to_string()) && err.contains("writable"),
        "{err}"
    );
}

#[test]
fn spool_cli_lists_exports_and_requeues_dead_letters() {
    use scangate::event::{EventBody, ReadKind};
    use scangate::metrics::Metrics;
    use scangate::spool::{Spool, SpoolOptions};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let body = |tag: &str| EventBody {
        kind: ReadKind::BagTag,
        tag: tag.into(),
        source: "s".into(),
        location: "L".into(),
        device: "D".into(),
        scan_type: None,
        antenna: None,
        rssi_cdbm: None,
        read_count: 1,
        first_seen_ms: 1_763_289_000_000,
        last_seen_ms: 1_763_289_000_000,
        symbology: None,
        value: None,
        clock: Default::default(),
    };
    let ids = {
        let (mut sp, _) = Spool::open(
            &state,
            SpoolOptions::default(),
            std::sync::Arc::new(Metrics::default()),
        )
        .unwrap();
        sp.append(
            vec![body("0125000001"), body("0125000002"), body("0125000003")],
            1_763_289_000_000,
        )
        .unwrap();
        let evs = sp.read_after(None, 0, 10).unwrap();
        sp.dead_letter(
            &[
                (evs[0].clone(), Some(422), "bag_id: unknown issuer".into()),
                (evs[2].clone(), Some(207), "duplicate tag".into()),
            ],
            0,
        )
        .unwrap();
        vec![evs[0].event_id.to_string(), evs[2].event_id.to_string()]
    };
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, format!("[gateway]\nid='g'\nstate_dir='{}'\n[[source]]\nname='a'\nkind='replay'\nprotocol='lines'\nfile='x.cap'\n[upstream]\nurl='http://127.0.0.1:9'\nprofile='bag-events'\n", state.display())).unwrap();
    let run = |args: &[&str]| {
        let out = bin()
            .arg("spool")
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listed = run(&["dead-letters"]);
    assert!(
        listed.contains("tag=0125000001")
            && listed.contains("status=422")
            && listed.contains("unknown issuer"),
        "{listed}"
    );
    assert_eq!(listed.lines().count(), 2);
    let exported: Vec<serde_json::Value> = run(&["export"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(exported.len(), 2);
    assert_eq!(exported[0]["event_id"], ids[0]);
    assert_eq!(exported[0]["event"]["tag"], "0125000001");
    assert_eq!(exported[1]["reason"], "duplicate tag");
    assert!(run(&["stats"]).contains("backlog_events 1\n"));
    assert!(run(&["requeue"]).contains("requeued 2"));
    let stats = run(&["stats"]);
    assert!(
        stats.contains("backlog_events 3\n") && stats.contains("dead_letters 0\n"),
        "{stats}"
    );
    // Requeued events keep their event ids (idempotent towards the upstream).
    let (mut sp, _) = Spool::open(
        &state,
        SpoolOptions::default(),
        std::sync::Arc::new(Metrics::default()),
    )
    .unwrap();
    let all: Vec<String> = sp
        .read_after(None, 0, 10)
        .unwrap()
        .iter()
        .map(|e| e.event_id.to_string())
        .collect();
    assert!(ids.iter().all(|id| all.contains(id)), "{all:?} vs {ids:?}");
}

fn with_upstream(extra: &str) -> String {
    format!("[gateway]\nid = \"gw\"\nstate_dir = \"/tmp/x\"\n[[source]]\nname = \"belt\"\nkind = \"serial\"\nprotocol = \"lines\"\npath = \"ttyUSB0\"\n[upstream]\nurl = \"http://ingest:8000\"\nprofile = \"bag-events\"\n{extra}")
}

/// Regression: a constant (or a rename) onto `event_id`, `seq` or `timestamp` passed
/// validation and gave every event the same identity.
#[test]
fn field_mapping_onto_an_identity_field_is_refused_with_its_line() {
    for (extra, key, line) in [
        (
            "[upstream.fields.constant]\nevent_id = \"x\"\n",
            "upstream.fields.constant.event_id",
            13,
        ),
        (
            "[upstream.fields.rename]\nbag_id = \"seq\"\n",
            "upstream.fields.rename.bag_id",
            13,
        ),
        (
            "[upstream.fields.rename]\nlocation = \"timestamp\"\n",
            "upstream.fields.rename.location",
            13,
        ),
        (
            "[upstream.fields.rename]\nno_such_field = \"x\"\n",
            "upstream.fields.rename.no_such_field",
            13,
        ),
        // A chain: event_id renamed away, then timestamp renamed onto it; and a swap.
        (
            "[upstream.fields.rename]\nevent_id = \"uuid\"\ntimestamp = \"event_id\"\n",
            "upstream.fields.rename.timestamp",
            14,
        ),
        (
            "[upstream.fields.rename]\nevent_id = \"seq\"\nseq = \"event_id\"\n",
            "upstream.fields.rename.event_id",
            13,
        ),
    ] {
        let errs = Config::parse(&with_upstream(extra), Path::new("/etc/scangate")).unwrap_err();
        assert!(
            errs.iter().any(|e| e.key == key && e.line == line),
            "{extra}: {errs:?}"
        );
    }
    // Renaming a field to a new name, and adding a new constant, stay valid.
    let ok = with_upstream("[upstream.fields.rename]\nbag_id = \"tag\"\n[upstream.fields.constant]\nairport = \"PTY\"\n");
    Config::parse(&ok, Path::new("/etc/scangate")).unwrap();
}

/// A relative serial path is resolved against the config file's directory, as every other
/// path in the file is.
#[test]
fn a_relative_serial_path_is_resolved_against_the_config_dir() {
    let cfg = Config::parse(&with_upstream(""), Path::new("/etc/scangate")).unwrap();
    let text = with_upstream("").replacen(
        "state_dir = \"/tmp/x\"\n",
        "state_dir = \"/tmp/x\"\njournal_dir = \"j\"\n",
        1,
    );
    let with_journal = Config::parse(&text, Path::new("/etc/scangate")).unwrap();
    assert_eq!(
        with_journal.gateway.journal_dir,
        Path::new("/etc/scangate/j")
    );
    match &cfg.sources[0].kind {
        scangate::config::SourceKind::Serial { path, .. } => {
            assert_eq!(path, Path::new("/etc/scangate/ttyUSB0"))
        }
        other => panic!("{other:?}"),
    }
}

/// Regression: `speed = 1e-300` passed validation and the replay panicked computing its
/// first due time.
#[test]
fn absurd_replay_speeds_are_refused_and_never_panic() {
    let text = "[gateway]\nid = \"gw\"\nstate_dir = \"/tmp/x\"\n[[source]]\nname = \"r\"\nkind = \"replay\"\nprotocol = \"lines\"\nfile = \"x.cap\"\nspeed = 1e-300\n[upstream]\nurl = \"http://ingest:8000\"\nprofile = \"bag-events\"\n";
    let errs = Config::parse(text, Path::new("/etc")).unwrap_err();
    assert!(
        errs.iter()
            .any(|e| e.key == "source[0].speed" && e.line == 9),
        "{errs:?}"
    );
    let out = bin()
        .args([
            "replay",
            "--config",
            "/nonexistent.toml",
            "--speed",
            "1e-300",
            "x",
        ])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), None, "no crash");
    let start = tokio::time::Instant::now();
    for secs in [f64::NAN, f64::INFINITY, -1.0, 1e300, 1e-300, 0.0, 1.8e19] {
        let due = scangate::source::replay::due_at(start, secs);
        assert!(due >= start && due <= start + scangate::source::replay::MAX_RECORD_WAIT);
    }
}

const READERS: &str = r#"[gateway]
id = "gw1"
state_dir = "/tmp/x"

[[source]]
name = "replay"
kind = "replay"
protocol = "em4100"
file = "x.cap"
baud = 9600
init = "FF 00"

[[source]]
name = "tm"
kind = "serial"
protocol = "thingmagic"
path = "/dev/ttyUSB0"
init = "FF 0G"
parity = "mark"
fields = ["tag"]

[[source]]
name = "text"
kind = "serial"
protocol = "lines"
path = "/dev/ttyUSB1"
prefix = "0D"
fields = ["rssi", "antenna"]
speed = "max"
[source.antennas]
one = "DOOR"

[upstream]
url = "http://h:8000"
profile = "bag-events"
"#;

/// Reader settings: each mistake named with its line and key (a serial setting on a replay,
/// bad hex, an unknown parity, a template key on a binary protocol, CR as a prefix, a template
/// without a tag, a replay setting on a port, an antenna map key that is not a number).
#[test]
fn reader_settings_errors_are_located() {
    let errs = Config::parse(READERS, Path::new("/etc/scangate")).unwrap_err();
    let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.key.as_str())).collect();
    for want in [
        (10, "source[0].baud"),
        (11, "source[0].init"),
        (18, "source[1].init"),
        (19, "source[1].parity"),
        (20, "source[1].fields"),
        (27, "source[2].prefix"),
        (28, "source[2].fields"),
        (29, "source[2].speed"),
    ] {
        assert!(got.contains(&want), "{want:?} missing from {got:?}");
    }
    assert!(
        got.iter().any(|(_, k)| k.starts_with("source[2].antennas")),
        "{got:?}"
    );
}

/// Settings that would break a binary reader or the port itself are refused before start.
#[test]
fn settings_that_break_a_port_are_refused() {
    let text = r#"[gateway]
id = "gw1"
state_dir = "/tmp/x"

[[source]]
name = "cf"
kind = "serial"
protocol = "chafon"
path = "/dev/ttyUSB0"
flow_control = "software"
data_bits = 7
init = "+F +1"

[[source]]
name = "cf2"
kind = "serial"
protocol = "chafon"
path = "/dev/ttyUSB0"

[[source]]
name = "bad\nname"
kind = "serial"
protocol = "em4100"
path = "/dev/ttyUSB2"

[[source]]
name = "bidi"
kind = "serial"
protocol = "em4100"
path = "/dev/ttyUSB3"
location = "DOOR\u202E1"
[source.antennas]
1 = "X\nY"

[upstream]
url = "http://h:8000"
profile = "bag-events"
"#;
    let errs = Config::parse(text, Path::new("/etc/scangate")).unwrap_err();
    let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
    for want in [
        "source[0].flow_control",
        "source[0].data_bits",
        "source[0].init",
        "source[1].path",
        "source[2].name",
        "source[3].location",
        "source[3].antennas.1",
    ] {
        assert!(keys.contains(&want), "{want} missing from {keys:?}");
    }
    let init = format!(
        "[gateway]\nid = \"gw1\"\nstate_dir = \"/tmp/x\"\n[[source]]\nname = \"tm\"\nkind = \"serial\"\nprotocol = \"thingmagic\"\npath = \"/dev/ttyUSB0\"\ninit = \"{}\"\n[upstream]\nurl = \"http://h:8000\"\nprofile = \"bag-events\"\n",
        "FF".repeat(5000)
    );
    let errs = Config::parse(&init, Path::new("/etc/scangate")).unwrap_err();
    assert!(
        errs.iter()
            .any(|e| e.key == "source[0].init" && e.message.contains("4096")),
        "{errs:?}"
    );
}

/// A journal directory that is empty or a file is refused at validation, not discovered
/// later as a daemon that cannot journal its ports.
#[test]
fn a_bad_journal_dir_is_refused() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let below_file = format!("{}/sub", file.path().display());
    for jd in ["", " ", file.path().to_str().unwrap(), &below_file] {
        let text = format!(
            "[gateway]\nid = \"gw1\"\nstate_dir = \"/tmp/x\"\njournal_dir = \"{jd}\"\n[upstream]\nurl = \"http://h:8000\"\nprofile = \"bag-events\"\n"
        );
        let errs = Config::parse(&text, Path::new("/etc/scangate")).unwrap_err();
        assert!(
            errs.iter().any(|e| e.key == "gateway.journal_dir"),
            "{jd:?}: {errs:?}"
        );
    }
}

/// A systemd credential name is one file name: `credential:../../etc/passwd` is refused.
#[test]
fn a_credential_name_cannot_leave_the_credentials_directory() {
    for name in ["../../etc/passwd", "", "a/b", ".."] {
        let text = format!(
            "[gateway]\nid = \"gw1\"\nstate_dir = \"/tmp/x\"\n[upstream]\nurl = \"http://h:8000\"\nprofile = \"bag-events\"\ntoken_file = \"credential:{name}\"\n[admin]\ntoken_file = \"credential:{name}\"\n"
        );
        let errs = Config::parse(&text, Path::new("/etc/scangate")).unwrap_err();
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"upstream.token_file"), "{name}: {keys:?}");
        assert!(keys.contains(&"admin.token_file"), "{name}: {keys:?}");
    }
}

/// Suppression keys: a bad mode, window, offset or group is refused with its line and key.
#[test]
fn suppression_settings_errors_are_located() {
    let text = "[gateway]\nid = \"gw\"\nstate_dir = \"/var/lib/scangate\"\n\
[suppress]\nmode = \"sometimes\"\nzone_margin_db = -3\nmax_tracked = 0\n\
[[source]]\nname = \"a\"\nkind = \"serial\"\nprotocol = \"uhf-bb\"\npath = \"/dev/ttyUSB0\"\n\
suppress = \"always\"\nwindow_ms = 0\nrssi_offset_db = 500\ngroup = \"\"\n\
[upstream]\nurl = \"http://127.0.0.1:9\"\nprofile = \"bag-events\"\n";
    let errs = Config::parse(text, Path::new("/etc/scangate")).unwrap_err();
    let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.key.as_str())).collect();
    for want in [
        (5, "suppress.mode"),
        (6, "suppress.zone_margin_db"),
        (7, "suppress.max_tracked"),
        (13, "source[0].suppress"),
        (14, "source[0].window_ms"),
        (15, "source[0].rssi_offset_db"),
        (16, "source[0].group"),
    ] {
        assert!(got.contains(&want), "{want:?} missing from {got:?}");
    }
    // The valid forms are taken.
    let ok = text
        .replace("\"sometimes\"", "\"first\"")
        .replace("= -3", "= 3")
        .replace("max_tracked = 0", "max_tracked = 10")
        .replace("\"always\"", "\"off\"")
        .replace("window_ms = 0", "window_ms = 300")
        .replace("= 500", "= -4.5")
        .replace("group = \"\"", "group = \"belt\"");
    let cfg = Config::parse(&ok, Path::new("/etc/scangate")).unwrap();
    assert_eq!(
        cfg.sources[0].suppress.window,
        Some(std::time::Duration::from_millis(300))
    );
    assert_eq!(cfg.sources[0].suppress.rssi_offset_db, -4.5);
    assert_eq!(cfg.suppress.max_tracked, 10);
}

/// Regression: `retry_min_ms` above the default `retry_max_ms` (or `retry_max_ms` below the
/// default `retry_min_ms`) passed validation, and the waits then ignored `retry_min_ms`.
#[test]
fn retry_bounds_are_checked_against_the_default_of_the_one_not_set() {
    for (extra, key) in [
        ("retry_min_ms = 5000\n", "upstream.retry_min_ms"),
        ("retry_max_ms = 50\n", "upstream.retry_max_ms"),
        (
            "retry_min_ms = 300\nretry_max_ms = 200\n",
            "upstream.retry_min_ms",
        ),
    ] {
        let errs = Config::parse(&with_upstream(extra), Path::new("/etc/scangate")).unwrap_err();
        assert!(
            errs.iter().any(|e| e.key == key && e.line >= 12),
            "{extra}: {errs:?}"
        );
    }
    for ok in ["retry_min_ms = 1000\n", "retry_max_ms = 100\n", ""] {
        assert!(
            Config::parse(&with_upstream(ok), Path::new("/etc/scangate")).is_ok(),
            "{ok}"
        );
    }
}

fn with_redis(upstream: &str) -> String {
    format!("[gateway]\nid = \"gw\"\nstate_dir = \"/tmp/x\"\n[[source]]\nname = \"belt\"\nkind = \"serial\"\nprotocol = \"lines\"\npath = \"ttyUSB0\"\n[upstream]\nkind = \"redis-streams\"\n{upstream}")
}

#[test]
fn a_redis_streams_upstream_takes_its_defaults_from_the_contracts() {
    use scangate::config::{EntryShape, Sink};
    let cfg = Config::parse(
        &with_redis("url = \"redis://bus.example:6379\"\n"),
        Path::new("/etc/scangate"),
    )
    .unwrap();
    let Sink::RedisStreams(r) = &cfg.upstream.sink else {
        panic!("not a redis sink");
    };
    assert_eq!(r.stream, "baggage_events");
    assert_eq!(r.maxlen, 100_000);
    assert_eq!(r.dlq_stream.as_deref(), Some("baggage_events:dlq"));
    assert_eq!(r.entry, EntryShape::Json);
    assert_eq!(r.idempotency_ttl, std::time::Duration::from_secs(86_400));
    assert_eq!(r.idempotency_prefix, "{baggage_events}:seen:");
    assert_eq!(cfg.upstream.profile, scangate::config::Profile::BagEvents);

    let cfg = Config::parse(
        &with_redis("url = \"rediss://bus.example:6380/2\"\nusername = \"gw\"\npassword_file = \"redis.pw\"\nstream = \"bags\"\ndlq_stream = \"\"\nentry = \"fields\"\nmaxlen = 0\nidempotency_ttl_s = 300\nca_file = \"ca.pem\"\n"),
        Path::new("/etc/scangate"),
    )
    .unwrap();
    let Sink::RedisStreams(r) = &cfg.upstream.sink else {
        panic!("not a redis sink");
    };
    assert_eq!(r.dlq_stream, None);
    assert_eq!(r.entry, EntryShape::Fields);
    assert_eq!(r.maxlen, 0);
    assert_eq!(r.idempotency_prefix, "{bags}:seen:");
    assert_eq!(
        r.password_file.as_deref(),
        Some(Path::new("/etc/scangate/redis.pw"))
    );
    // The default stays HTTP.
    let cfg = Config::parse(&with_upstream(""), Path::new("/etc/scangate")).unwrap();
    assert_eq!(cfg.upstream.sink, Sink::Http);
}

#[test]
fn redis_streams_mistakes_are_named_with_their_key() {
    for (upstream, key, says) in [
        ("url = \"http://bus:6379\"\n", "upstream.url", "redis://"),
        (
            "url = \"redis://:secret@bus:6379\"\n",
            "upstream.url",
            "password_file",
        ),
        ("url = \"redis://bus:6379/x\"\n", "upstream.url", "database"),
        (
            "url = \"redis://bus\"\ntoken_file = \"t\"\n",
            "upstream.token_file",
            "password_file",
        ),
        (
            "url = \"redis://bus\"\ncompression = \"gzip\"\n",
            "upstream.compression",
            "http",
        ),
        (
            "url = \"redis://bus\"\nprofile = \"collect\"\n",
            "upstream.profile",
            "bag-events",
        ),
        (
            "url = \"redis://bus\"\nca_file = \"ca.pem\"\n",
            "upstream.ca_file",
            "rediss://",
        ),
        (
            "url = \"rediss://bus\"\nclient_cert_file = \"c.pem\"\n",
            "upstream.client_cert_file",
            "client_key_file",
        ),
        (
            "url = \"redis://bus\"\ndlq_stream = \"baggage_events\"\n",
            "upstream.dlq_stream",
            "differ",
        ),
        (
            "url = \"redis://bus\"\nstream = \"a\\nb\"\n",
            "upstream.stream",
            "control",
        ),
        (
            "url = \"redis://bus\"\nmaxlen = 1000\n",
            "upstream.maxlen",
            "batch_max_events × max_in_flight = 8000",
        ),
        (
            "url = \"redis://bus\"\nusername = \"gw\"\n",
            "upstream.username",
            "password_file",
        ),
        (
            "url = \"redis://bus\"\nentry = \"xml\"\n",
            "upstream.entry",
            "",
        ),
        (
            "url = \"redis://bus\"\nidempotency_ttl_s = 0\n",
            "upstream.idempotency_ttl_s",
            "",
        ),
    ] {
        let errs = Config::parse(&with_redis(upstream), Path::new("/etc/scangate")).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.key == key && e.message.contains(says) && e.line >= 10),
            "{upstream}: {errs:?}"
        );
    }
    // And the other way round: a Redis key under an HTTP upstream.
    let errs = Config::parse(
        &with_upstream("stream = \"bags\"\n"),
        Path::new("/etc/scangate"),
    )
    .unwrap_err();
    assert!(
        errs.iter()
            .any(|e| e.key == "upstream.stream" && e.message.contains("redis-streams")),
        "{errs:?}"
    );
}

/// What a technician's editor does to a file is named as such: a byte-order mark in the
/// middle (two files joined) at its line and column, a key set twice with both lines. A BOM
/// at the very start is accepted.
#[test]
fn editor_mistakes_are_named_as_such() {
    let good = with_upstream("");
    assert!(Config::parse(&format!("\u{feff}{good}"), Path::new("/etc/scangate")).is_ok());

    let joined = format!("{good}\u{feff}[admin]\nlisten = \"off\"\n");
    let errs = Config::parse(&joined, Path::new("/etc/scangate")).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].message.contains("byte-order mark"), "{errs:?}");
    assert_eq!(
        (errs[0].line, errs[0].column),
        (good.lines().count() + 1, 1)
    );

    let twice = with_upstream("batch_max_events = 10\nretry_min_ms = 50\nbatch_max_events = 20\n");
    let errs = Config::parse(&twice, Path::new("/etc/scangate")).unwrap_err();
    let first = twice
        .lines()
        .position(|l| l.starts_with("batch_max_events"))
        .unwrap()
        + 1;
    assert!(
        errs[0]
            .message
            .contains(&format!("first set at line {first}")),
        "{errs:?}"
    );
    assert_eq!(errs[0].line, first + 2, "{errs:?}");

    // A BOM inside a value or a comment is not a joined file.
    let inside = good.replace("name = \"belt\"", "name = \"be\u{feff}lt\" # \u{feff}");
    let errs = Config::parse(&inside, Path::new("/etc/scangate"))
        .err()
        .unwrap_or_default();
    assert!(
        errs.iter().all(|e| !e.message.contains("byte-order")),
        "{errs:?}"
    );
    // A duplicate inside an inline table names no unrelated line.
    let inline = with_upstream("a = 5\n[upstream.fields.constant]\nx = \"1\"\nx = \"2\"\n");
    let errs = Config::parse(&inline, Path::new("/etc/scangate")).unwrap_err();
    assert!(errs[0].message.contains("first set at line"), "{errs:?}");
    let inline = with_upstream("event_type = \"x\"\nt = { event_type = 1, event_type = 2 }\n");
    let errs = Config::parse(&inline, Path::new("/etc/scangate")).unwrap_err();
    assert!(!errs[0].message.contains("first set at line"), "{errs:?}");
}

/// An admin token file that cannot be used (missing, empty) refuses every admin request once
/// the daemon runs, /health included: `validate` (the unit's ExecStartPre) says so first.
#[test]
fn validate_refuses_an_admin_token_file_that_cannot_be_used() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin-token");
    let cfg = dir.path().join("gw.toml");
    let text = with_upstream("").replace(
        "[upstream]",
        &format!(
            "[admin]\nlisten = \"0.0.0.0:9898\"\ntoken_file = \"{}\"\n[upstream]",
            token.display()
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    let run = || {
        bin()
            .args(["validate", "--config"])
            .arg(&cfg)
            .output()
            .unwrap()
    };
    let out = run();
    assert_eq!(out.status.code(), Some(78), "missing");
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin.token_file"));
    std::fs::write(&token, "\n\n").unwrap();
    let out = run();
    assert_eq!(out.status.code(), Some(78), "empty");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is empty"));
    std::fs::write(&token, "s3cret-admin\n").unwrap();
    assert_eq!(run().status.code(), Some(0));
}

const MQTT_BROKEN: &str = r#"[gateway]
id = "gw"
state_dir = "/tmp/x"

[[source]]
name = "a"
kind = "mqtt"
broker = "http://broker:1883"
topics = ["readers/#/events", { filter = "z/#", protocol = "zebra" }, 7]
protocol = "impinj-iot"
qos = 2
password_file = "/etc/scangate/mqtt.pass"
ca_file = "/etc/ca.pem"
baud = 9600

[[source]]
name = "b"
kind = "mqtt"
broker = "mqtt://user:secret@broker:1883"
protocol = "json"
topics = []

[[source]]
name = "c"
kind = "mqtt"
broker = "mqtts://broker"
topics = ["s/#"]
protocol = "json"
client_cert_file = "/etc/c.pem"
[source.json]
tag = "id"
colour = "/x"

[[source]]
name = "d"
kind = "mqtt"
broker = "mqtt://broker"
topics = ["x/y", "x/y"]
max_payload_bytes = "1 GiB"
reconnect_min_ms = 5000
reconnect_max_ms = 100

[[source]]
name = "e"
kind = "serial"
protocol = "lines"
path = "/dev/ttyUSB0"
broker = "mqtt://broker"

[upstream]
url = "http://ingest:8000"
profile = "bag-events"
"#;

/// MQTT source mistakes, each named with its line and key: not an MQTT URL, an invalid
/// filter, an unknown protocol, a topic that is not a string or table, QoS 2, a password
/// without a user, TLS keys without mqtts://, a serial key on an MQTT source, credentials in
/// the URL, no topics, json without its table, a pointer that is not one, an unknown mapping
/// key, a certificate without its key, a topic listed twice, an oversize payload limit,
/// backoff bounds crossed, and an MQTT key on a serial source.
#[test]
fn mqtt_source_errors_are_located() {
    let errs = Config::parse(MQTT_BROKEN, Path::new("/etc/scangate")).unwrap_err();
    let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.key.as_str())).collect();
    for want in [
        (8, "source[0].broker"),
        (9, "source[0].topics"),
        (11, "source[0].qos"),
        (12, "source[0].password_file"),
        (13, "source[0].ca_file"),
        (14, "source[0].baud"),
        (19, "source[1].broker"),
        (21, "source[1].topics"),
        (29, "source[2].client_cert_file"),
        (31, "source[2].json.tag"),
        (32, "source[2].json.colour"),
        (38, "source[3].topics"),
        (39, "source[3].max_payload_bytes"),
        (41, "source[3].reconnect_max_ms"),
        (48, "source[4].broker"),
    ] {
        assert!(got.contains(&want), "{want:?} missing from {got:?}");
    }
    let text: Vec<String> = errs.iter().map(|e| e.message.clone()).collect();
    let all = text.join("\n");
    for needle in [
        "not an mqtt:// or mqtts:// URL",
        "\"readers/#/events\" is not a valid MQTT topic filter",
        "unknown protocol \"zebra\"",
        "QoS 2 is not supported",
        "must not hold credentials",
        "needs a [source.json] table",
        "is not a JSON pointer",
    ] {
        assert!(all.contains(needle), "{needle:?} not in:\n{all}");
    }
}

/// A valid MQTT source: defaults (QoS 1, persistent session id left to the gateway, 1 MiB
/// payloads, the broker window of 20) and per-topic protocols.
#[test]
fn mqtt_source_defaults_and_topic_protocols() {
    let cfg = Config::parse(
        r#"[gateway]
id = "gw"
state_dir = "/tmp/x"
[[source]]
name = "dock"
kind = "mqtt"
broker = "mqtts://broker.local"
topics = ["impinj/+/events", { filter = "sensors/#", protocol = "json" }]
protocol = "impinj-iot"
username = "gw"
password_file = "mqtt.pass"
deadband = 0.25
[source.json]
value = "/v"
sensor_type = "temperature"
[upstream]
url = "http://ingest:8000"
profile = "bag-events"
"#,
        Path::new("/etc/scangate"),
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let s = &cfg.sources[0];
    let scangate::config::SourceKind::Mqtt(m) = &s.kind else {
        panic!("{:?}", s.kind)
    };
    assert_eq!(
        (m.host.as_str(), m.port, m.tls, m.qos),
        ("broker.local", 8883, true, 1)
    );
    assert_eq!(m.client_id, None);
    assert_eq!(m.max_payload_bytes, 1 << 20);
    assert_eq!(m.broker_max_inflight, 20);
    assert_eq!(
        m.password_file.as_deref(),
        Some(Path::new("/etc/scangate/mqtt.pass"))
    );
    assert!(matches!(
        m.topics[0].payload,
        scangate::config::PayloadProtocol::ImpinjIot
    ));
    assert!(matches!(
        m.topics[1].payload,
        scangate::config::PayloadProtocol::Json(_)
    ));
    assert_eq!(s.deadband, 0.25);
    assert_eq!(
        scangate::source::mqtt::default_client_id(&cfg.gateway.id, &s.name),
        "scangate-gw-dock"
    );
}

/// More MQTT mistakes: port 0, a fragment, two sources with one client id on one broker (they
/// would take the session from each other), and filters too long for one subscription.
#[test]
fn mqtt_session_and_subscription_mistakes_are_refused() {
    let long = "a/".repeat(16_000);
    let text = format!(
        r#"[gateway]
id = "gw"
state_dir = "/tmp/x"
[[source]]
name = "a"
kind = "mqtt"
broker = "mqtt://broker:0"
topics = ["x"]
protocol = "impinj-iot"
[[source]]
name = "b"
kind = "mqtt"
broker = "mqtt://broker:1883#here"
topics = ["x"]
protocol = "impinj-iot"
[[source]]
name = "c"
kind = "mqtt"
broker = "mqtt://broker"
client_id = "gw-17"
topics = ["x"]
protocol = "impinj-iot"
[[source]]
name = "d"
kind = "mqtt"
broker = "mqtt://broker:1883"
client_id = "gw-17"
topics = ["x"]
protocol = "impinj-iot"
[[source]]
name = "e"
kind = "mqtt"
broker = "mqtt://broker:1883"
topics = ["{long}x", "{long}y"]
protocol = "impinj-iot"
[upstream]
url = "http://ingest:8000"
profile = "bag-events"
"#
    );
    let errs = Config::parse(&text, Path::new("/etc/scangate")).unwrap_err();
    let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.key.as_str())).collect();
    for want in [
        (7, "source[0].broker"),
        (13, "source[1].broker"),
        (27, "source[3].client_id"),
        (34, "source[4].topics"),
    ] {
        assert!(got.contains(&want), "{want:?} missing from {got:?}");
    }
    let all: Vec<&str> = errs.iter().map(|e| e.message.as_str()).collect();
    assert!(
        all.iter()
            .any(|m| m.contains("the same client id as source \"c\"")),
        "{all:?}"
    );
    assert!(
        all.iter().any(|m| m.contains("fit one subscription")),
        "{all:?}"
    );
}

/// A config path that is a FIFO, a device or too large a file is refused at once, not read
/// for ever (opening a FIFO for reading would block `validate` and a reload).
#[test]
fn only_a_regular_file_of_sane_size_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("scangate.toml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for path in [fifo.as_path(), Path::new("/dev/zero")] {
        let err = Config::load(path).expect_err("refused");
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
    let big = dir.path().join("big.toml");
    std::fs::write(&big, vec![b'#'; 2 * 1024 * 1024]).unwrap();
    let err = Config::load(&big).expect_err("refused");
    assert!(err.to_string().contains("larger than"), "{err}");
}

/// Regression (review): a `ca_file` or `token_file` pointing at `/dev/zero` filled the memory
/// on a reload, and one pointing at a FIFO hung it. Every file the config names is read like
/// the config itself: a regular file, bounded.
#[test]
fn files_the_config_names_are_read_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("token");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for path in [fifo.as_path(), Path::new("/dev/zero")] {
        let err = scangate::config::read_named_text(path).expect_err("refused");
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
    let ok = dir.path().join("ca.pem");
    std::fs::write(&ok, "-----BEGIN CERTIFICATE-----\n").unwrap();
    assert!(scangate::config::read_named_text(&ok).is_ok());
    let big = dir.path().join("big.pem");
    std::fs::write(&big, vec![b'A'; 2 * 1024 * 1024]).unwrap();
    assert!(
        scangate::config::read_small_file(&big, scangate::config::NAMED_FILE_MAX_BYTES).is_err()
    );
}

/// `validate` of a config (written to `cfg`) with an `mqtts://` source and an `https://`
/// upstream naming these files (relative to the config's directory): its exit code and stderr.
fn validate_tls(
    cfg: &Path,
    up_ca: &str,
    token: &str,
    mqtt_ca: &str,
    key: &str,
) -> (Option<i32>, String) {
    let text = format!(
        "[gateway]\nid = \"gw\"\nstate_dir = \"/tmp/x\"\n\
         [[source]]\nname = \"dock\"\nkind = \"mqtt\"\nbroker = \"mqtts://broker:8883\"\n\
         topics = [\"readers/+/events\"]\nprotocol = \"impinj-iot\"\n\
         ca_file = \"{mqtt_ca}\"\nclient_cert_file = \"ca.pem\"\nclient_key_file = \"{key}\"\n\
         [upstream]\nurl = \"https://ingest:8443\"\nprofile = \"bag-events\"\n\
         ca_file = \"{up_ca}\"\ntoken_file = \"{token}\"\n"
    );
    std::fs::write(cfg, text).unwrap();
    let out = bin()
        .args(["validate", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every file the config names is checked by `validate` (the unit's ExecStartPre and
/// ExecReload), each problem on its own line naming its key: a CA bundle that is missing, not
/// PEM, or a FIFO (refused at once, not waited on), an MQTT client key that is no key, an
/// upstream token that cannot be read. Before, all of these passed and the start or the
/// reload failed (or an MQTT connect hung on the FIFO).
#[test]
fn validate_names_every_unusable_file_the_config_names() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(p("ca.pem"), cert.cert.pem()).unwrap();
    std::fs::write(p("client.key"), cert.signing_key.serialize_pem()).unwrap();
    std::fs::write(p("token"), "t0ken\n").unwrap();
    std::fs::write(p("notes.txt"), "this is not a certificate\n").unwrap();
    let fifo = p("ca.fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let cfg = p("gw.toml");
    let run = |up_ca: &str, token: &str, mqtt_ca: &str, key: &str| {
        validate_tls(&cfg, up_ca, token, mqtt_ca, key)
    };
    let (code, err) = run("ca.pem", "token", "ca.pem", "client.key");
    assert_eq!(code, Some(0), "all usable: {err}");

    let (code, err) = run("missing.pem", "no-token", "ca.fifo", "ca.pem");
    assert_eq!(code, Some(78), "{err}");
    for expected in [
        "upstream: cannot read ca_file",
        "upstream: cannot read token_file",
        "source \"dock\": cannot read ca_file",
        "not a regular file",
        "source \"dock\": client_key_file",
        "holds no PEM private key",
    ] {
        assert!(err.contains(expected), "{expected:?} in {err}");
    }
    assert_eq!(err.lines().count(), 4, "one line per file: {err}");

    let (code, err) = run("notes.txt", "token", "ca.pem", "client.key");
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("upstream: ca_file") && err.contains("holds no PEM certificate"),
        "{err}"
    );
}

/// From a review: files that are readable and look right but cannot be used, each named by
/// `validate` with its key (before, all passed and the start or every connect failed): a CA
/// whose PEM section holds no certificate, a client key that is another certificate's, a
/// token of two lines (no HTTP header carries it) or of blanks only, and a PEM file cut short
/// (its error in words, not bytes).
#[test]
fn validate_names_files_that_are_readable_but_unusable() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["other".to_string()]).unwrap();
    std::fs::write(p("ca.pem"), cert.cert.pem()).unwrap();
    std::fs::write(p("client.key"), cert.signing_key.serialize_pem()).unwrap();
    std::fs::write(p("other.key"), other.signing_key.serialize_pem()).unwrap();
    std::fs::write(
        p("garbage.pem"),
        "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQgdGhpcyBpcyBub3QgYSBjZXJ0\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(p("cut.pem"), "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
    std::fs::write(p("two-lines.token"), "tok1\ntok2\n").unwrap();
    std::fs::write(p("blank.token"), " \n\n").unwrap();
    std::fs::write(p("good.token"), "t0ken\n").unwrap();
    let cfg = p("gw.toml");
    let run = |up_ca: &str, token: &str, mqtt_ca: &str, key: &str| {
        validate_tls(&cfg, up_ca, token, mqtt_ca, key)
    };
    let (code, err) = run("ca.pem", "good.token", "ca.pem", "client.key");
    assert_eq!(code, Some(0), "all usable: {err}");

    let (code, err) = run("garbage.pem", "two-lines.token", "cut.pem", "other.key");
    assert_eq!(code, Some(78), "{err}");
    for expected in [
        "upstream: ca_file",
        "are not valid X.509 certificates",
        "upstream: token_file",
        "holds a space or a second line",
        "source \"dock\": ca_file",
        "a PEM section is not closed (no \"-----END CERTIFICATE-----\" line",
        "source \"dock\": client_key_file is not the key of client_cert_file",
    ] {
        assert!(err.contains(expected), "{expected:?} in {err}");
    }
    assert_eq!(err.lines().count(), 4, "one line per file: {err}");

    let (code, err) = run("ca.pem", "blank.token", "ca.pem", "client.key");
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("token_file") && err.contains("is empty"),
        "{err}"
    );
    // "Bearer" written into the file (scangate adds it), and a control character.
    for (name, text) in [
        ("bearer.token", "Bearer t0ken\n"),
        ("ctl.token", "t0\u{7}ken\n"),
    ] {
        std::fs::write(p(name), text).unwrap();
        let (code, err) = run("ca.pem", name, "ca.pem", "client.key");
        assert_eq!(code, Some(78), "{name}: {err}");
        assert!(err.contains("token_file"), "{name}: {err}");
    }
    // An editor's byte-order mark and CRLF are not part of the token: accepted.
    std::fs::write(p("bom.token"), "\u{feff}t0ken\r\n").unwrap();
    let (code, err) = run("ca.pem", "bom.token", "ca.pem", "client.key");
    assert_eq!(code, Some(0), "{err}");
    // A path with a newline and an escape sequence is shown escaped, on one line.
    let (code, err) = run(
        "ca.pem",
        "no\\nsuch\\u001b[31m.token",
        "ca.pem",
        "client.key",
    );
    assert_eq!(code, Some(78), "{err}");
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(!err.contains('\u{1b}'), "{err:?}");
}
