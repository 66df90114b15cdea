//! SIGHUP: what a new configuration changes, and what of it applies while the gateway runs.
//!
//! Applied at once (see `app::run`):
//! - a source whose reading settings changed (`kind` and its keys: path, port settings, init
//!   bytes, broker, topics, credentials…; `protocol`; `reopen_after_idle_ms`) is stopped and
//!   started again with the new ones; every other source keeps running untouched;
//! - a source no longer in the file is stopped (unless a source was added in the same file: a
//!   rename keeps the old one reading until the restart);
//! - changed `[upstream]` settings start the forwarder again with them (what it had in flight
//!   stays in the spool and is sent again, same event ids).
//!
//! Taken at the next start, and named in a WARN: `[gateway]`, `[spool]`, `[suppress]`,
//! `[admin]`, a new source, another `kind` for a source, and a source's settings that its open
//! passes depend on (`location`, `antenna_locations`, `device`, `group`, `suppress`,
//! `scan_type`, `deadband`, `heartbeat_ms`; its reading settings changed in the same edit wait
//! with them). The running values of those stay in effect until then.

use crate::config::{Config, SourceConfig, UpstreamConfig};
use std::fmt::Debug;

/// What a reload does.
#[derive(Debug, Default)]
pub struct Plan {
    /// Sources (with their new settings) to stop and start again.
    pub restart: Vec<SourceConfig>,
    /// Sources (by name) to stop: no longer in the file.
    pub stop: Vec<String>,
    /// The upstream's new settings, when they changed.
    pub upstream: Option<UpstreamConfig>,
    /// Changes that take effect at the next start, each named for the log.
    pub needs_restart: Vec<String>,
}

impl Plan {
    /// Nothing changed at all.
    pub fn is_empty(&self) -> bool {
        self.restart.is_empty()
            && self.stop.is_empty()
            && self.upstream.is_none()
            && self.needs_restart.is_empty()
    }
}

/// Equal as configured (every field, through its `Debug` text: the config types are plain
/// data).
fn same<T: Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// The keys of a source that its open passes and events depend on (the suppression stage
/// holds them from the start), with their values.
fn stage_keys(s: &SourceConfig) -> [(&'static str, String); 8] {
    [
        ("location", format!("{:?}", s.location)),
        ("antenna_locations", format!("{:?}", s.antenna_locations)),
        ("device", format!("{:?}", s.device)),
        ("group", format!("{:?}", s.group)),
        ("suppress", format!("{:?}", s.suppress)),
        ("scan_type", format!("{:?}", s.scan_type)),
        ("deadband", format!("{:?}", s.deadband)),
        ("heartbeat_ms", format!("{:?}", s.heartbeat)),
    ]
}

/// What going from `old` (running) to `new` (just read and valid) does.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let mut p = Plan::default();
    for (section, changed) in [
        ("[gateway]", !same(&old.gateway, &new.gateway)),
        ("[spool]", !same(&old.spool, &new.spool)),
        ("[suppress]", !same(&old.suppress, &new.suppress)),
        ("[admin]", !same(&old.admin, &new.admin)),
    ] {
        if changed {
            p.needs_restart.push(section.to_string());
        }
    }
    let mut added = false;
    for s in &new.sources {
        let Some(o) = old.sources.iter().find(|o| o.name == s.name) else {
            p.needs_restart.push(format!("source \"{}\" added", s.name));
            added = true;
            continue;
        };
        let mut later: Vec<&str> = stage_keys(o)
            .iter()
            .zip(stage_keys(s).iter())
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, _)| a.0)
            .collect();
        let reading = !same(&o.kind, &s.kind)
            || !same(&o.protocol, &s.protocol)
            || o.reopen_after_idle != s.reopen_after_idle;
        // Another kind of source (serial, mqtt, replay) is wired differently from the start.
        if std::mem::discriminant(&o.kind) != std::mem::discriminant(&s.kind) {
            later.push("kind");
        }
        if !later.is_empty() {
            if reading && !later.contains(&"kind") {
                later.push("its reading settings");
            }
            p.needs_restart
                .push(format!("source \"{}\": {}", s.name, later.join(", ")));
            continue;
        }
        if reading {
            p.restart.push(s.clone());
        }
    }
    for o in &old.sources {
        if !new.sources.iter().any(|s| s.name == o.name) {
            // A source renamed or replaced (another one added in the same file) keeps reading
            // under its old name until the restart starts the new one: stopping it now would
            // leave its reader unread.
            if added {
                p.needs_restart
                    .push(format!("source \"{}\" removed", o.name));
            } else {
                p.stop.push(o.name.clone());
            }
        }
    }
    if !same(&old.upstream, &new.upstream) {
        p.upstream = Some(new.upstream.clone());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        Config::parse(text, std::path::Path::new("/tmp")).expect("valid")
    }

    const BASE: &str = r#"
[gateway]
id = "gw"
state_dir = "/tmp/x"
[[source]]
name = "dock"
kind = "serial"
protocol = "uhf-bb"
path = "/dev/ttyUSB0"
location = "dock-1"
[[source]]
name = "gate"
kind = "serial"
protocol = "chafon"
path = "/dev/ttyUSB1"
[upstream]
url = "http://ingest:8000"
profile = "bag-events"
"#;

    #[test]
    fn the_same_file_changes_nothing() {
        assert!(plan(&cfg(BASE), &cfg(BASE)).is_empty());
    }

    #[test]
    fn a_changed_port_restarts_that_source_only() {
        let new = BASE.replace("/dev/ttyUSB1", "/dev/ttyUSB2");
        let p = plan(&cfg(BASE), &cfg(&new));
        assert_eq!(p.restart.len(), 1);
        assert_eq!(p.restart[0].name, "gate");
        assert!(p.stop.is_empty() && p.upstream.is_none() && p.needs_restart.is_empty());
    }

    #[test]
    fn upstream_removed_source_and_restart_only_changes() {
        let new = BASE
            .replace("http://ingest:8000", "http://ingest:9000")
            .replace(
                "[[source]]\nname = \"gate\"\nkind = \"serial\"\nprotocol = \"chafon\"\npath = \"/dev/ttyUSB1\"\n",
                "",
            )
            .replace("dock-1", "dock-2")
            .replace("[upstream]", "[[source]]\nname = \"new\"\nkind = \"serial\"\nprotocol = \"em4100\"\npath = \"/dev/ttyACM0\"\n[spool]\nmax_bytes = 10000000\n[upstream]");
        let p = plan(&cfg(BASE), &cfg(&new));
        assert!(p.upstream.is_some());
        // A source added in the same edit: the removed one keeps reading until the restart.
        assert!(p.stop.is_empty(), "{p:?}");
        assert!(p
            .needs_restart
            .iter()
            .any(|n| n == "source \"gate\" removed"));
        assert!(p.restart.is_empty(), "{p:?}");
        assert!(p.needs_restart.iter().any(|n| n == "[spool]"), "{p:?}");
        assert!(
            p.needs_restart
                .iter()
                .any(|n| n == "source \"dock\": location"),
            "{p:?}"
        );
        assert!(
            p.needs_restart.iter().any(|n| n == "source \"new\" added"),
            "{p:?}"
        );
    }

    #[test]
    fn a_rename_keeps_the_old_source_reading_until_the_restart() {
        let new = BASE.replace("name = \"gate\"", "name = \"gate-b\"");
        let p = plan(&cfg(BASE), &cfg(&new));
        assert!(p.stop.is_empty(), "{p:?}");
        assert!(p
            .needs_restart
            .iter()
            .any(|n| n == "source \"gate\" removed"));
        assert!(p
            .needs_restart
            .iter()
            .any(|n| n == "source \"gate-b\" added"));
        // Removed alone: stopped now.
        let gone = BASE.replace(
            "[[source]]\nname = \"gate\"\nkind = \"serial\"\nprotocol = \"chafon\"\npath = \"/dev/ttyUSB1\"\n",
            "",
        );
        assert_eq!(plan(&cfg(BASE), &cfg(&gone)).stop, vec!["gate".to_string()]);
    }

    #[test]
    fn a_port_changed_with_the_location_waits_for_the_restart_and_is_named() {
        let new = BASE
            .replace("/dev/ttyUSB0", "/dev/ttyUSB9")
            .replace("dock-1", "dock-2");
        let p = plan(&cfg(BASE), &cfg(&new));
        assert!(p.restart.is_empty(), "{p:?}");
        assert!(
            p.needs_restart
                .iter()
                .any(|n| n == "source \"dock\": location, its reading settings"),
            "{p:?}"
        );
    }
}
