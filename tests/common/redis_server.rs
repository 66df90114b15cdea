//! A real `redis-server` (Debian's, installed by `.ci/run`) on a free loopback port, with its
//! own config and data directory, started and stopped by the test.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

pub struct RedisServer {
    pub port: u16,
    pub dir: tempfile::TempDir,
    conf: PathBuf,
    child: Option<Child>,
    /// Password of the `default` user, when the config sets one.
    pub password: Option<String>,
    /// TLS only (`tls-port`): the CA and client certificate the tests connect with.
    tls: Option<redis::TlsCertificates>,
}

impl RedisServer {
    /// Start a server; `extra`: more config lines (`requirepass`, `user …`, `maxmemory`).
    pub fn start(extra: &str) -> RedisServer {
        Self::start_with(extra, None)
    }

    /// A server that speaks TLS only, on its port: `files` are the PEM files of its
    /// certificate, key and the CA bundle it checks client certificates against (client
    /// certificates required); `client` what the tests connect with.
    pub fn start_tls(
        extra: &str,
        files: (&Path, &Path, &Path),
        client: redis::TlsCertificates,
    ) -> RedisServer {
        let (cert, key, ca) = files;
        let conf = format!(
            "tls-port {{port}}\nport 0\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\ntls-auth-clients yes\n{extra}",
            cert.display(),
            key.display(),
            ca.display()
        );
        Self::start_with(&conf, Some(client))
    }

    fn start_with(extra: &str, tls: Option<redis::TlsCertificates>) -> RedisServer {
        let port = super::daemon::free_port();
        let extra = extra.replace("{port}", &port.to_string());
        let port_line = if tls.is_some() {
            String::new()
        } else {
            format!("port {port}\n")
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("redis.conf");
        std::fs::write(
            &conf,
            format!(
                "{port_line}bind 127.0.0.1\nprotected-mode no\ndaemonize no\nsave \"\"\nappendonly no\ndir {}\nlogfile {}\nenable-debug-command yes\n{extra}\n",
                dir.path().display(),
                dir.path().join("redis.log").display()
            ),
        )
        .expect("write redis.conf");
        let password = extra
            .lines()
            .find_map(|l| l.strip_prefix("requirepass "))
            .map(|p| p.trim().to_string());
        let mut s = RedisServer {
            port,
            dir,
            conf,
            child: None,
            password,
            tls,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.try_conn() {
                Ok(mut c) => {
                    if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                        return;
                    }
                }
                // Up, with a certificate a test made unacceptable on purpose.
                Err(e)
                    if e.to_string().contains("NotValidYet")
                        || e.to_string().contains("certificate") =>
                {
                    return
                }
                Err(_) => {}
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {} within 20 s (log: {})",
                self.port,
                std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
            );
            // Polled (with a deadline) until it answers: it starts in milliseconds.
            std::thread::yield_now();
        }
    }

    /// The server's process id (for CPU readings), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn try_conn(&self) -> redis::RedisResult<redis::Connection> {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let url = match &self.password {
            Some(p) => format!("{scheme}://:{p}@127.0.0.1:{}", self.port),
            None => self.url(),
        };
        let client = match &self.tls {
            Some(t) => redis::Client::build_with_tls(url, t.clone())?,
            None => redis::Client::open(url)?,
        };
        client.get_connection_with_timeout(Duration::from_secs(2))
    }

    /// A connection as the `default` user (with its password).
    pub fn conn(&self) -> redis::Connection {
        self.try_conn().expect("connect to the test redis-server")
    }

    /// Stop the server (SIGKILL: data not kept, as `save ""`), and wait for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port with the same config.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Run one command (its reply ignored); panics on an error reply.
    pub fn run(&self, args: &[&str]) {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        let _: redis::Value = c
            .query(&mut self.conn())
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }

    pub fn xlen(&self, stream: &str) -> u64 {
        redis::cmd("XLEN")
            .arg(stream)
            .query(&mut self.conn())
            .expect("XLEN")
    }

    /// Every entry of `stream`, in order: its fields as (name, value) strings.
    pub fn entries(&self, stream: &str) -> Vec<Vec<(String, String)>> {
        let mut out = Vec::new();
        let mut c = self.conn();
        let mut start = "-".to_string();
        loop {
            let page: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg(stream)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(10_000)
                .query(&mut c)
                .expect("XRANGE");
            let n = page.len();
            if let Some((last, _)) = page.last() {
                start = format!("({last}");
            }
            out.extend(page.into_iter().map(|(_, f)| f));
            if n < 10_000 {
                return out;
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The value of field `name` of an entry.
pub fn field<'a>(entry: &'a [(String, String)], name: &str) -> Option<&'a str> {
    entry
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}
