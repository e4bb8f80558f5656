//! A primary and a streaming replica of it, for failover tests: throwaway clusters of their
//! own (never the shared server, which other tests use at the same time), so they need the
//! installed server binaries even where `KEEL_TEST_DATABASE_URL` is set.

use std::time::{Duration, Instant};

use keel_store_postgres::Config;

use super::{own_server_binaries, path_str, Cluster, PORT};

/// A primary with one asynchronous streaming replica.
pub struct Pair {
    primary: Cluster,
    replica: Cluster,
}

impl Pair {
    /// Starts a primary, then a replica from its base backup (`pg_basebackup -R`), streaming.
    /// `None` if the Postgres tests are skipped on purpose (`KEEL_SKIP_POSTGRES=1`), or if only
    /// an external server is given (said loudly); without any Postgres it panics, saying what
    /// to install.
    pub fn start() -> Option<Pair> {
        let why = format!(
            "to start a primary and a replica; {} names a server it cannot fail over",
            super::DATABASE_URL
        );
        let bin = own_server_binaries("the failover test", &why)?;
        let primary = Cluster::start(&bin);
        let replica = Cluster::empty(&bin);
        // The server refuses a data directory others can read; initdb sets this itself.
        {
            use std::os::unix::fs::PermissionsExt;
            let private = std::fs::Permissions::from_mode(0o700);
            std::fs::set_permissions(&replica.data, private).unwrap();
        }
        replica.run(
            "pg_basebackup",
            &[
                "-D",
                path_str(&replica.data),
                "-R",
                "-X",
                "stream",
                "-h",
                path_str(&primary.sockets),
                "-p",
                &PORT.to_string(),
                "-U",
                "postgres",
            ],
        );
        replica.serve(&replica.sockets);
        Some(Pair { primary, replica })
    }

    /// Settings that connect to the primary: after [`Pair::fail_over`], to the promoted
    /// replica, which serves at the primary's address.
    pub fn primary(&self) -> Config {
        self.primary.config()
    }

    /// [`Pair::primary`] as a connection string, for a process of its own (keel's daemon).
    pub fn primary_url(&self) -> String {
        format!(
            "host={} port={PORT} user=postgres dbname=postgres",
            path_str(&self.primary.sockets)
        )
    }

    /// Settings that connect to the replica, before [`Pair::fail_over`].
    pub fn replica(&self) -> Config {
        self.replica.config()
    }

    /// Waits until the replica has replayed everything the primary has written so far.
    pub fn wait_replayed(&self) {
        let mut primary = postgres::Config::from(self.primary())
            .connect(postgres::NoTls)
            .unwrap();
        let written: String = primary
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .unwrap()
            .get(0);
        let mut replica = postgres::Config::from(self.replica())
            .connect(postgres::NoTls)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let caught_up: bool = replica
                .query_one(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                    &[&written],
                )
                .unwrap()
                .get(0);
            if caught_up {
                return;
            }
            assert!(Instant::now() < deadline, "the replica never caught up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fails over: the primary stops at once (as a crash), the replica is promoted and starts
    /// serving where the primary did (its socket), as a virtual IP or a DNS name moved over
    /// would make it.
    pub fn fail_over(&self) {
        self.primary.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.primary.data),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        self.replica.run(
            "pg_ctl",
            &["-D", path_str(&self.replica.data), "-w", "promote"],
        );
        self.replica.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.replica.data),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
        self.replica.serve(&self.primary.sockets);
    }
}
