//! A throwaway cluster serving TLS on a loopback TCP port, its certificate (for `localhost` and
//! `127.0.0.1`) signed by a CA of its own, both made with the `openssl` command: for the tests of
//! `sslmode=require`. It needs the installed server binaries, like [`super::replica`].

use std::path::{Path, PathBuf};
use std::process::Command;

use keel_store_postgres::Config;

use super::{own_server_binaries, path_str, Cluster};

/// A cluster that serves TLS on `127.0.0.1:port`.
pub struct TlsServer {
    cluster: Cluster,
    port: u16,
    ca: PathBuf,
}

impl TlsServer {
    /// `None` if the Postgres tests are skipped on purpose (`KEEL_SKIP_POSTGRES=1`) or only an
    /// external server is given (said loudly); without the server binaries or `openssl` it
    /// panics, saying what to install.
    pub fn start() -> Option<TlsServer> {
        let bin = own_server_binaries(
            "the TLS test",
            "to start a server with a certificate of its own",
        )?;
        let cluster = Cluster::initialised(&bin);
        let dir = &cluster.sockets;
        let ca = dir.join("ca.pem");
        let (key, cert) = (dir.join("server.key"), dir.join("server.pem"));
        make_certificates(dir, &ca, &key, &cert);
        if let Some((uid, gid)) = cluster.run_as {
            for file in [&key, &cert] {
                std::os::unix::fs::chown(file, Some(uid), Some(gid)).unwrap();
            }
        }
        let port = free_port();
        cluster.serve_on(
            &cluster.sockets,
            port,
            &format!(
                "-c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                path_str(&cert),
                path_str(&key)
            ),
        );
        Some(TlsServer { cluster, port, ca })
    }

    /// A connection string to it over TCP, as `host` (`localhost` or `127.0.0.1`), with
    /// `sslmode`.
    pub fn url(&self, host: &str, sslmode: &str) -> String {
        format!(
            "host={host} port={} user=postgres dbname=postgres sslmode={sslmode}",
            self.port
        )
    }

    /// The CA that signed the server's certificate (PEM).
    pub fn ca(&self) -> &Path {
        &self.ca
    }

    /// Settings for a plain connection on its Unix socket, to look at the sessions.
    pub fn admin(&self) -> Config {
        let mut config = Config::new();
        config
            .host_path(&self.cluster.sockets)
            .port(self.port)
            .user("postgres")
            .dbname("postgres");
        config
    }
}

/// A CA, and a key and certificate for `localhost` and `127.0.0.1` signed by it (P-256).
fn make_certificates(dir: &Path, ca: &Path, key: &Path, cert: &Path) {
    let ca_key = dir.join("ca.key");
    let csr = dir.join("server.csr");
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n\
         basicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-days",
                "2",
                "-subj",
                "/CN=keel test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                path_str(&ca_key),
                "-out",
                path_str(ca),
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=localhost",
                "-keyout",
                path_str(key),
                "-out",
                path_str(&csr),
            ],
        ]
        .concat(),
    );
    openssl(&[
        "x509",
        "-req",
        "-in",
        path_str(&csr),
        "-CA",
        path_str(ca),
        "-CAkey",
        path_str(&ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        path_str(&ext),
        "-out",
        path_str(cert),
    ]);
    use std::os::unix::fs::PermissionsExt;
    // The server refuses a key others can read.
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn openssl(args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "the TLS test needs the openssl command (Debian: apt-get install -y openssl): {e}"
            )
        });
    assert!(
        output.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A TCP port of loopback that nothing listens on now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
