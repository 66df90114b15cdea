//! Running the real `scangate` binary in tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

/// A pseudo-terminal pair whose descriptors are not inherited by processes spawned later (a
/// daemon holding a copy of the master would keep the port "plugged in" after the test
/// closes it).
pub fn pty_pair() -> (serialport::TTYPort, serialport::TTYPort) {
    use std::os::fd::AsRawFd;
    let (master, slave) = serialport::TTYPort::pair().expect("a pseudo-terminal pair");
    for fd in [master.as_raw_fd(), slave.as_raw_fd()] {
        // SAFETY: F_SETFD with FD_CLOEXEC on a descriptor this function owns.
        let r = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        assert_eq!(r, 0, "cannot set FD_CLOEXEC on the pty");
    }
    (master, slave)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl Daemon {
    pub fn spawn(config: &Path, log: &Path) -> Daemon {
        Self::spawn_with(config, log, &[])
    }

    /// [`Daemon::spawn`] with more arguments to `scangate run`.
    pub fn spawn_with(config: &Path, log: &Path, args: &[&str]) -> Daemon {
        Self::spawn_env(config, log, args, &[])
    }

    /// [`Daemon::spawn_with`] with environment variables set (after the defaults, so they
    /// win: `JOURNAL_STREAM` for a journald run).
    pub fn spawn_env(config: &Path, log: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let err = out.try_clone().expect("clone");
        let child = Command::new(env!("CARGO_BIN_EXE_scangate"))
            .args(["run", "--config"])
            .arg(config)
            .args(args)
            .env(
                "SCANGATE_LOG",
                std::env::var("TEST_SCANGATE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("JOURNAL_STREAM")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn scangate");
        Daemon {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn sigterm(&self) {
        self.signal("-TERM");
    }

    /// `kill <sig> <pid>` (`sig`: `-HUP`, `-TERM`, …).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// A real `kill -9`.
    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    /// Wait for exit with a deadline (polling; the process is real).
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let end = tokio::time::Instant::now() + deadline;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            if tokio::time::Instant::now() > end {
                let _ = self.child.kill();
                panic!(
                    "scangate did not exit within {deadline:?}; log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Read a counter from the admin /metrics page (None if unreachable).
pub async fn metric(port: u16, name: &str) -> Option<u64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().parse().ok()))
}

/// Wait (polling every 10 ms, at most `deadline`) until the daemon's metric `name` is `want`.
pub async fn wait_metric(port: u16, name: &str, want: u64, deadline: Duration) -> bool {
    let end = tokio::time::Instant::now() + deadline;
    while tokio::time::Instant::now() < end {
        if metric(port, name).await == Some(want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// A config file for the binary.
pub fn write_config(
    dir: &Path,
    state: &Path,
    sources: &str,
    upstream_url: &str,
    extra: &str,
    admin_port: Option<u16>,
) -> PathBuf {
    let admin = admin_port
        .map(|p| format!("127.0.0.1:{p}"))
        .unwrap_or_else(|| "off".into());
    let text = format!(
        "[gateway]\nid = \"gw-daemon\"\nstate_dir = \"{}\"\n[spool]\ncommit_interval_ms = 5\n{sources}\n[upstream]\nurl = \"{upstream_url}\"\nprofile = \"bag-events\"\nbatch_max_events = 200\nbatch_max_delay_ms = 20\nretry_min_ms = 20\nretry_max_ms = 200\n{extra}\n[admin]\nlisten = \"{admin}\"\n",
        state.display()
    );
    let p = dir.join("scangate.toml");
    std::fs::write(&p, text).expect("write config");
    p
}
