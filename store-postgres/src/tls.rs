//! TLS to the database.
//!
//! | `sslmode` | keel connects |
//! |---|---|
//! | `disable`, `prefer` (the default) | without TLS |
//! | `require` (or libpq's `verify-ca`, `verify-full`, read as `require`) | with TLS, the server's certificate checked against the system's trusted roots and its name against the host connected to, like libpq's `verify-full` |
//!
//! libpq's `require` encrypts without checking who answers; keel always checks, since an
//! unchecked channel to the store would let anyone on the path rewrite the schedule. `prefer`
//! connects in clear text rather than half-check: ask for `require` to encrypt. The trusted
//! roots are the system's (`/etc/ssl/certs` on Debian), or the PEM file `SSL_CERT_FILE` (or
//! directory `SSL_CERT_DIR`) names: that is how a private CA is trusted. A Unix socket never
//! uses TLS (Postgres does not offer it there).

use std::sync::Arc;

use keel_core::StoreError;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Config, NoTls};

use crate::client::Client;
use rustls::{ClientConfig, RootCertStore};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Parses a connection string as libpq takes it (key-value pairs or a `postgresql://` URL).
/// libpq's `sslmode=verify-ca` and `verify-full` are read as `require`, which keel verifies
/// as `verify-full` does (module docs); tokio-postgres knows neither.
pub fn parse_config(params: &str) -> Result<Config, StoreError> {
    let params = params
        .replace("sslmode=verify-full", "sslmode=require")
        .replace("sslmode=verify-ca", "sslmode=require");
    params.parse().map_err(|e| {
        StoreError::Io(format!(
            "invalid Postgres connection string: {}",
            crate::with_causes(&e)
        ))
    })
}

/// Where `config` connects, for messages: hosts, ports, user, database and `sslmode`, never the
/// password (`host=db.internal port=5432 user=keel dbname=keel sslmode=require`).
pub fn describe(config: &Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|host| match host {
            Host::Tcp(name) => name.clone(),
            #[cfg(unix)]
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    let mut said = Vec::new();
    if !hosts.is_empty() {
        said.push(format!("host={}", hosts.join(",")));
    }
    if !ports.is_empty() {
        said.push(format!("port={}", ports.join(",")));
    }
    if let Some(user) = config.get_user() {
        said.push(format!("user={user}"));
    }
    if let Some(db) = config.get_dbname() {
        said.push(format!("dbname={db}"));
    }
    let mode = match config.get_ssl_mode() {
        SslMode::Disable => "disable",
        SslMode::Require => "require",
        _ => "prefer",
    };
    said.push(format!("sslmode={mode}"));
    said.join(" ")
}

/// Connects as `config`'s `sslmode` says (module docs).
pub(crate) fn connect(config: &Config) -> Result<Client, StoreError> {
    match config.get_ssl_mode() {
        SslMode::Require => Client::connect(config, connector()?),
        _ => Client::connect(config, NoTls),
    }
}

/// A TLS connector that trusts the system's roots.
fn connector() -> Result<MakeRustlsConnect, StoreError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_owned(), ToString::to_string);
        return Err(StoreError::Io(format!(
            "postgres: sslmode=require, but no trusted root certificate could be loaded ({why}); \
             install the system's CA certificates, or point SSL_CERT_FILE at a PEM file of the \
             CA that signed the server's certificate"
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Io(format!("postgres: TLS setup failed: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_verify_modes_are_read_as_require_and_the_default_is_prefer() {
        for params in [
            "host=db sslmode=verify-full",
            "host=db sslmode=verify-ca",
            "postgresql://keel@db/keel?sslmode=verify-full",
            "host=db sslmode=require",
        ] {
            assert_eq!(
                parse_config(params).unwrap().get_ssl_mode(),
                SslMode::Require,
                "{params}"
            );
        }
        assert_eq!(
            parse_config("host=db").unwrap().get_ssl_mode(),
            SslMode::Prefer
        );
        assert_eq!(
            describe(&parse_config("postgresql://keel:s3cret@db.internal:6432/jobs").unwrap()),
            "host=db.internal port=6432 user=keel dbname=jobs sslmode=prefer",
            "never the password"
        );
        assert!(matches!(
            parse_config("host=db sslmode=sometimes"),
            Err(StoreError::Io(m)) if m.contains("sslmode")
        ));
    }
}
