//! keel on a Postgres reached over TLS (`sslmode=require`): a server of its own on a loopback
//! TCP port with a certificate from a CA of its own (store-postgres's test support). The CA is
//! trusted through `SSL_CERT_FILE`, as an operator trusts a private CA; a client that does not
//! trust it is refused, and every session of a daemon is encrypted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../../store-postgres/tests/common/mod.rs"]
mod pg;

use common::Place;

#[test]
fn sslmode_require_encrypts_every_session_and_checks_the_servers_certificate() {
    let Some(server) = pg::tls::TlsServer::start() else {
        return;
    };
    let place = Place::new("pg-tls");
    let ca = server.ca().to_str().unwrap();
    let keel = |url: &str, trust: &str, args: &[&str]| {
        let mut all = vec!["--store", "postgres", "--database-url", url];
        all.extend_from_slice(args);
        let output = place
            .command(&all)
            .env("SSL_CERT_FILE", trust)
            .output()
            .unwrap();
        common::Done(output)
    };

    // Trusting the CA, a command reads over TLS, by name and by address (both in the
    // certificate); libpq's verify-full is read as require.
    for url in [
        server.url("localhost", "require"),
        server.url("127.0.0.1", "require"),
        server.url("localhost", "verify-full"),
    ] {
        keel(&url, ca, &["job", "ls"]).expect_code(0);
    }

    // Not trusting it (the system's roots only), the same command is refused, saying why.
    keel(
        &server.url("localhost", "require"),
        "/etc/ssl/certs/ca-certificates.crt",
        &["job", "ls"],
    )
    .expect_code(1)
    .expect_stderr("certificate");

    // A daemon's sessions (the store's and the lease's) are all encrypted.
    let config = place.config("[daemon]\nshutdown_budget = \"2s\"\n");
    let url = server.url("localhost", "require");
    let mut daemon = place.spawn_daemon(
        &[
            "--store",
            "postgres",
            "--database-url",
            &url,
            "run",
            "--config",
            config.to_str().unwrap(),
        ],
        &[("KEEL_HOSTNAME", "host-tls"), ("SSL_CERT_FILE", ca)],
    );
    daemon.wait_for(&["ready: postgres store"]);
    let mut admin = postgres::Config::from(server.admin())
        .connect(postgres::NoTls)
        .unwrap();
    let row = admin
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) \
             WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()",
            &[],
        )
        .unwrap();
    let (sessions, encrypted): (i64, i64) = (row.get(0), row.get(1));
    assert!(sessions >= 2, "the daemon has {sessions} session(s)");
    assert_eq!(encrypted, sessions, "every session of the daemon uses TLS");
    daemon.stop();

    // sslmode=disable: no TLS, and no certificate needed.
    keel(
        &server.url("localhost", "disable"),
        "/nonexistent",
        &["job", "ls"],
    )
    .expect_code(0);
}
