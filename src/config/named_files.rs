//! The files a config names besides itself: CA bundles, client certificates and keys, tokens
//! and passwords. Each is read like the config (a regular file of at most
//! [`NAMED_FILE_MAX_BYTES`]: a FIFO or `/dev/zero` is refused, never waited on or read without
//! end), and [`check_named_files`] lets `scangate validate` (the unit's `ExecStartPre` and
//! `ExecReload`) name a missing or wrong file before a start or a reload trips on it.

use super::{read_named_text, read_small_file, Config, Sink, NAMED_FILE_MAX_BYTES};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};

/// A path as messages show it: characters a terminal would act on escaped (see `printable`).
fn shown(path: &Path) -> String {
    super::printable(&path.display().to_string())
}

/// A PEM parser's error in words (its own `Display` shows the offending bytes as numbers).
fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { end_marker } => format!(
            "a PEM section is not closed (no \"-----END {}-----\" line: is the file cut short?)",
            String::from_utf8_lossy(end_marker).trim()
        ),
        E::IllegalSectionStart { line } => format!(
            "a PEM section starts with a damaged line \"{}\"",
            String::from_utf8_lossy(line).escape_debug()
        ),
        E::Base64Decode(e) => format!("a PEM section's base64 text is damaged ({e})"),
        other => other.to_string(),
    }
}

/// The certificates of the PEM file at `path` (a CA bundle, a client certificate chain), in
/// file order, each checked to be an X.509 certificate (parsed as rustls parses one it is to
/// trust).
///
/// Errors, as a message naming the config key `key` and the path: the file cannot be read, a
/// PEM section is malformed, it holds no `CERTIFICATE` section at all, or a section's content
/// is not an X.509 certificate.
pub fn pem_certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_small_file(path, NAMED_FILE_MAX_BYTES)
        .map_err(|e| format!("cannot read {key} {}: {e}", shown(path)))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{key} {}: {}", shown(path), pem_error(&e)))?;
    if certs.is_empty() {
        return Err(format!(
            "{key} {} holds no PEM certificate (no BEGIN CERTIFICATE section)",
            shown(path)
        ));
    }
    let (_, damaged) = rustls::RootCertStore::empty().add_parsable_certificates(certs.clone());
    if damaged > 0 {
        return Err(format!(
            "{key} {}: {damaged} of its {} certificate(s) are not valid X.509 certificates (a damaged or mistaken file?)",
            shown(path),
            certs.len()
        ));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) of the PEM file at `path`.
///
/// Errors, as a message naming `key` and the path: the file cannot be read, a PEM section is
/// malformed, or it holds no key.
pub fn pem_private_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read_small_file(path, NAMED_FILE_MAX_BYTES)
        .map_err(|e| format!("cannot read {key} {}: {e}", shown(path)))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "{key} {} holds no PEM private key (no BEGIN PRIVATE KEY section)",
            shown(path)
        ),
        e => format!("{key} {}: {}", shown(path), pem_error(&e)),
    })
}

/// The bearer token in the file at `path` (the upstream's `token_file`; trimmed, as every
/// secret file), as the forwarder sends it: `Authorization: Bearer <token>`.
///
/// Errors, as a message naming the key and the path: the file cannot be read, is empty, or
/// holds what an HTTP header cannot carry (a second line, a control character).
pub fn bearer_token(path: &Path) -> Result<String, String> {
    let text = read_named_text(path)
        .map_err(|e| format!("cannot read token_file {}: {e}", shown(path)))?;
    // An editor's byte-order mark and newline are not part of the token.
    let token = text.trim_start_matches('\u{feff}').trim();
    if token.is_empty() {
        return Err(format!("token_file {} is empty", shown(path)));
    }
    if token.contains(char::is_whitespace) {
        return Err(format!(
            "token_file {} holds a space or a second line: put the token alone, without \"Bearer \" (scangate adds it)",
            shown(path)
        ));
    }
    if reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).is_err() {
        return Err(format!(
            "token_file {} holds characters an HTTP header cannot carry (a second line, a control character): put the token alone on one line",
            shown(path)
        ));
    }
    Ok(token.to_string())
}

/// A `credential:NAME` outside the service: `$CREDENTIALS_DIRECTORY` is set only inside it, so
/// such a file cannot be checked from a shell (inside, `credential:` names a real path).
fn unresolved_credential(path: &Path) -> bool {
    std::env::var_os("CREDENTIALS_DIRECTORY").is_none()
        && path.starts_with("$CREDENTIALS_DIRECTORY")
}

fn secret(key: &str, path: &Path) -> Result<(), String> {
    if unresolved_credential(path) {
        return Ok(());
    }
    read_named_text(path)
        .map(drop)
        .map_err(|e| format!("cannot read {key} {}: {e}", shown(path)))
}

fn certificates(key: &str, path: &Option<PathBuf>) -> Result<(), String> {
    match path {
        Some(p) => pem_certificates(key, p).map(drop),
        None => Ok(()),
    }
}

/// A client certificate and its key: each readable, and the key the certificate's own (as
/// rustls checks it when a connection's TLS settings are made). One message per problem.
fn client_pair(cert: &Option<PathBuf>, key: &Option<PathBuf>) -> Vec<String> {
    let certs = cert
        .as_ref()
        .map(|c| pem_certificates("client_cert_file", c));
    let private = key.as_ref().map(|k| pem_private_key("client_key_file", k));
    match (certs, private) {
        (Some(Ok(certs)), Some(Ok(private))) => {
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            let paired = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    b.with_root_certificates(rustls::RootCertStore::empty())
                        .with_client_auth_cert(certs, private)
                        .map_err(|e| e.to_string())
                });
            match paired {
                Ok(_) => Vec::new(),
                Err(e) if e.contains("KeyMismatch") => vec![format!(
                    "client_key_file is not the key of client_cert_file ({e}): give one certificate's own pair"
                )],
                Err(e) => vec![format!(
                    "client_key_file cannot be used ({e}): a key of a kind TLS here does not take (RSA, ECDSA P-256/P-384 and Ed25519 are taken)?"
                )],
            }
        }
        (c, k) => c
            .and_then(Result::err)
            .into_iter()
            .chain(k.and_then(Result::err))
            .collect(),
    }
}

/// Every file named by `cfg` that cannot be used, one message each, prefixed with where its
/// key is (`upstream: cannot read ca_file …`, `source "dock": client_key_file …`). Checked:
/// the upstream's `token_file` (non-empty, one header line) and `ca_file`, a Redis sink's
/// `password_file`, `client_cert_file` and `client_key_file`, and each MQTT source's
/// `password_file`, `ca_file`, `client_cert_file` and `client_key_file`. Certificates must be
/// PEM X.509 certificates, a client key the private key of its certificate, secrets readable
/// text. `credential:NAME` secrets are checked only where `$CREDENTIALS_DIRECTORY` is set
/// (inside the service). The admin token is checked by the admin module, which owns its
/// rules. Empty: all usable.
pub fn check_named_files(cfg: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let up = &cfg.upstream;
    let mut check = |place: &str, r: Result<(), String>| {
        if let Err(e) = r {
            problems.push(format!("{place}: {e}"));
        }
    };
    if let Some(t) = &up.token_file {
        if !unresolved_credential(t) {
            check("upstream", bearer_token(t).map(drop));
        }
    }
    check("upstream", certificates("ca_file", &up.ca_file));
    if let Sink::RedisStreams(r) = &up.sink {
        if let Some(p) = &r.password_file {
            check("upstream", secret("password_file", p));
        }
        for e in client_pair(&r.client_cert_file, &r.client_key_file) {
            check("upstream", Err(e));
        }
    }
    for s in &cfg.sources {
        let place = format!("source \"{}\"", s.name);
        if let super::SourceKind::Mqtt(m) = &s.kind {
            if let Some(p) = &m.password_file {
                check(&place, secret("password_file", p));
            }
            check(&place, certificates("ca_file", &m.ca_file));
            for e in client_pair(&m.client_cert_file, &m.client_key_file) {
                check(&place, Err(e));
            }
        }
    }
    problems
}
