//! The files a config names besides itself: CA bundles, client certificates and keys, tokens
//! and passwords. Each is read like the config (a regular file of at most
//! [`NAMED_FILE_MAX_BYTES`]: a FIFO or `/dev/zero` is refused, never waited on or read without
//! end), and [`check_named_files`] lets `scangate validate` (the unit's `ExecStartPre` and
//! `ExecReload`) name a missing or wrong file before a start or a reload trips on it.

use super::{read_named_text, read_small_file, Config, Sink, NAMED_FILE_MAX_BYTES};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;

/// The certificates of the PEM file at `path` (a CA bundle, a client certificate chain), in
/// file order.
///
/// Errors, as a message naming the config key `key` and the path: the file cannot be read, a
/// PEM section is malformed, or it holds no `CERTIFICATE` section at all.
pub fn pem_certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_small_file(path, NAMED_FILE_MAX_BYTES)
        .map_err(|e| format!("cannot read {key} {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{key} {} is not a valid PEM file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{key} {} holds no PEM certificate (no BEGIN CERTIFICATE section)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) of the PEM file at `path`.
///
/// Errors, as a message naming `key` and the path: the file cannot be read or holds no key.
pub fn pem_private_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read_small_file(path, NAMED_FILE_MAX_BYTES)
        .map_err(|e| format!("cannot read {key} {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| format!("{key} {} holds no PEM private key: {e}", path.display()))
}

/// A `credential:NAME` outside the service: `$CREDENTIALS_DIRECTORY` is set only inside it, so
/// such a file cannot be checked from a shell.
fn unresolved_credential(path: &Path) -> bool {
    path.starts_with("$CREDENTIALS_DIRECTORY")
}

fn secret(key: &str, path: &Path) -> Result<(), String> {
    if unresolved_credential(path) {
        return Ok(());
    }
    read_named_text(path)
        .map(drop)
        .map_err(|e| format!("cannot read {key} {}: {e}", path.display()))
}

fn certificates(key: &str, path: &Option<std::path::PathBuf>) -> Result<(), String> {
    match path {
        Some(p) if !unresolved_credential(p) => pem_certificates(key, p).map(drop),
        _ => Ok(()),
    }
}

fn private_key(key: &str, path: &Option<std::path::PathBuf>) -> Result<(), String> {
    match path {
        Some(p) if !unresolved_credential(p) => pem_private_key(key, p).map(drop),
        _ => Ok(()),
    }
}

/// Every file named by `cfg` that cannot be used, one message each, prefixed with where its
/// key is (`upstream.ca_file: …`, `source "dock": password_file: …`). Checked: the upstream's
/// `token_file` and `ca_file`, a Redis sink's `password_file`, `client_cert_file` and
/// `client_key_file`, and each MQTT source's `password_file`, `ca_file`, `client_cert_file` and
/// `client_key_file`. Certificates must hold at least one PEM certificate, keys a PEM private
/// key, secrets must be readable text. `credential:NAME` files are checked only where
/// `$CREDENTIALS_DIRECTORY` is set (inside the service). The admin token is checked by the
/// admin module, which owns its rules. Empty: all usable.
pub fn check_named_files(cfg: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let up = &cfg.upstream;
    let mut check = |place: &str, r: Result<(), String>| {
        if let Err(e) = r {
            problems.push(format!("{place}: {e}"));
        }
    };
    if let Some(t) = &up.token_file {
        check("upstream", secret("token_file", t));
    }
    check("upstream", certificates("ca_file", &up.ca_file));
    if let Sink::RedisStreams(r) = &up.sink {
        if let Some(p) = &r.password_file {
            check("upstream", secret("password_file", p));
        }
        check(
            "upstream",
            certificates("client_cert_file", &r.client_cert_file),
        );
        check(
            "upstream",
            private_key("client_key_file", &r.client_key_file),
        );
    }
    for s in &cfg.sources {
        let place = format!("source \"{}\"", s.name);
        if let super::SourceKind::Mqtt(m) = &s.kind {
            if let Some(p) = &m.password_file {
                check(&place, secret("password_file", p));
            }
            check(&place, certificates("ca_file", &m.ca_file));
            check(
                &place,
                certificates("client_cert_file", &m.client_cert_file),
            );
            check(&place, private_key("client_key_file", &m.client_key_file));
        }
    }
    problems
}
