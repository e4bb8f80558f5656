//! A real Postgres for the tests, never a mock.
//!
//! [`TestDb::new`] gives each test a schema of its own (so tests run in parallel) on:
//!
//! - the server `KEEL_TEST_DATABASE_URL` names, if it is set; or
//! - a throwaway cluster started from the installed server binaries
//!   (`/usr/lib/postgresql/*/bin`, else `initdb` on `PATH`) in a temporary directory,
//!   listening only on a Unix socket there. As root, `initdb` and `pg_ctl` run as the
//!   `postgres` user (`runuser`), which must own the cluster's files.
//!
//! The cluster is shared by the tests of one test binary that are running at once and stopped
//! (`pg_ctl stop -m immediate`) and removed when the last of them drops it, also when a test
//! panics. With no Postgres at all the tests fail with a message saying what to install, unless
//! `KEEL_SKIP_POSTGRES=1` is set, in which case they print loudly that they were skipped.

// Test support: a panic is how a broken environment reports itself.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use keel_harness::TempDir;
use keel_store_postgres::{Config, PgStore};

pub mod replica;

/// The database every test connects to, when set.
pub const DATABASE_URL: &str = "KEEL_TEST_DATABASE_URL";
/// Set to `1` to skip the Postgres tests on a machine without Postgres.
pub const SKIP: &str = "KEEL_SKIP_POSTGRES";

/// One schema of its own on the shared server, dropped with it.
#[derive(Debug)]
pub struct TestDb {
    server: Arc<Server>,
    schema: String,
}

impl TestDb {
    /// A fresh, empty schema, or `None` if the Postgres tests are skipped (`KEEL_SKIP_POSTGRES`).
    pub fn new() -> Option<TestDb> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let server = Server::shared()?;
        let schema = format!(
            "keel_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut client = server.config().connect(postgres::NoTls).unwrap();
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .unwrap();
        Some(TestDb { server, schema })
    }

    /// Settings that connect to this schema (its name is the application name too, so a test
    /// can find its own connections in `pg_stat_activity`).
    pub fn config(&self) -> Config {
        let mut config = self.server.config();
        config.options(&format!("-c search_path={}", self.schema));
        config.application_name(&self.schema);
        config
    }

    /// A connection string for this schema, for a process of its own (keel's daemon).
    pub fn url(&self) -> String {
        self.url_with("")
    }

    /// [`TestDb::url`] with more server settings for its sessions, as `-c name=value` options
    /// separated by spaces (such as `-c idle_in_transaction_session_timeout=1s`).
    pub fn url_with(&self, settings: &str) -> String {
        let schema = &self.schema;
        let options = format!("-c search_path={schema} {settings}");
        let options = options.trim_end();
        match &*self.server {
            Server::External(_, url) if url.starts_with("postgres") => {
                let join = if url.contains('?') { '&' } else { '?' };
                let options = options.replace(' ', "%20").replace('=', "%3D");
                format!("{url}{join}options={options}&application_name={schema}")
            }
            Server::External(_, url) => {
                format!("{url} options='{options}' application_name={schema}")
            }
            Server::Cluster(cluster) => format!(
                "host={} port={PORT} user=postgres dbname=postgres \
                 options='{options}' application_name={schema}",
                path_str(&cluster.sockets)
            ),
        }
    }

    /// The schema's name.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// A new store handle (a new connection) on this schema.
    pub fn open(&self) -> PgStore {
        PgStore::with_config(self.config()).unwrap()
    }

    /// A plain client on this schema, for what a test does behind the store's back.
    pub fn client(&self) -> postgres::Client {
        self.config().connect(postgres::NoTls).unwrap()
    }

    /// Restarts the throwaway cluster (`pg_ctl restart -m fast`, which ends every session),
    /// for a test of what survives a database restart. False on an external server, which a
    /// test must not restart.
    pub fn restart_server(&self) -> bool {
        let Server::Cluster(cluster) = &*self.server else {
            return false;
        };
        let log = cluster.sockets.join("server.log");
        // `-l` again: without it the server would keep pg_ctl's captured stdout open.
        cluster.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&cluster.data),
                "-l",
                path_str(&log),
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "restart",
            ],
        );
        true
    }

    /// Runs `pgbench` from the cluster's own install against its `postgres` database (as the
    /// postgres user, as root), with `args` before the connection options; its output. `None`
    /// on an external server (a benchmark's floor must come from the server it measures).
    pub fn pgbench(&self, args: &[&str]) -> Option<String> {
        let Server::Cluster(cluster) = &*self.server else {
            return None;
        };
        let port = PORT.to_string();
        let mut all = args.to_vec();
        all.extend([
            "-h",
            path_str(&cluster.sockets),
            "-p",
            &port,
            "-U",
            "postgres",
            "postgres",
        ]);
        Some(cluster.run("pgbench", &all))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Only needed on a long-lived server; a throwaway cluster is removed whole.
        if let Server::External(..) = &*self.server {
            if let Ok(mut client) = self.server.config().connect(postgres::NoTls) {
                let _ = client.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.schema));
            }
        }
    }
}

/// Where the tests' databases live.
#[derive(Debug)]
enum Server {
    /// The settings and the string they were parsed from.
    External(Config, String),
    Cluster(Cluster),
}

/// The server of the tests now running in this binary.
static SHARED: Mutex<Weak<Server>> = Mutex::new(Weak::new());

impl Server {
    fn shared() -> Option<Arc<Server>> {
        let mut shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(server) = shared.upgrade() {
            return Some(server);
        }
        let server = Arc::new(Server::start()?);
        *shared = Arc::downgrade(&server);
        Some(server)
    }

    fn start() -> Option<Server> {
        if let Ok(url) = std::env::var(DATABASE_URL) {
            let config = url
                .parse()
                .unwrap_or_else(|e| panic!("{DATABASE_URL} is not a connection string: {e}"));
            return Some(Server::External(config, url));
        }
        let Some(bin) = server_binaries() else {
            if std::env::var(SKIP).as_deref() == Ok("1") {
                // Straight to stderr, once per test binary: the test harness captures
                // `eprintln!` of passing tests, and a skip must not pass quietly.
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    use std::io::Write;
                    let _ = writeln!(
                        std::io::stderr(),
                        "\n!!!!!!!! SKIPPED: the keel-store-postgres tests of this binary did \
                         not run: no Postgres here and {SKIP}=1. !!!!!!!!\n"
                    );
                });
                return None;
            }
            panic!(
                "keel-store-postgres tests need a real Postgres and found none: no \
                 {DATABASE_URL}, and no initdb in /usr/lib/postgresql/*/bin or on PATH. \
                 Install the server (Debian: apt-get install -y postgresql), or point \
                 {DATABASE_URL} at a database, or set {SKIP}=1 to skip these tests explicitly."
            );
        };
        Some(Server::Cluster(Cluster::start(&bin)))
    }

    fn config(&self) -> Config {
        match self {
            Server::External(config, _) => config.clone(),
            Server::Cluster(cluster) => cluster.config(),
        }
    }
}

/// The cluster's port: only the name of its socket file, since it listens on no address.
const PORT: u16 = 5432;

/// A throwaway cluster, stopped and removed on drop.
#[derive(Debug)]
struct Cluster {
    /// Removed on drop, after the server stopped.
    _root: TempDir,
    bin: PathBuf,
    data: PathBuf,
    /// The socket directory, which also holds the server log.
    sockets: PathBuf,
    /// As root: the `postgres` user's uid and gid, which the server runs as.
    run_as: Option<(u32, u32)>,
}

impl Cluster {
    /// A new cluster, initialised and started.
    fn start(bin: &Path) -> Cluster {
        let cluster = Cluster::empty(bin);
        let started = std::time::Instant::now();
        cluster.run(
            "initdb",
            &[
                "-N",
                "-D",
                path_str(&cluster.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        cluster.serve(&cluster.sockets);
        eprintln!(
            "keel-store-postgres tests: started a throwaway cluster in {} in {:?}",
            cluster.data.display(),
            started.elapsed()
        );
        cluster
    }

    /// Settings that connect to the cluster's `postgres` database.
    fn config(&self) -> Config {
        let mut config = Config::new();
        config
            .host_path(&self.sockets)
            .port(PORT)
            .user("postgres")
            .dbname("postgres");
        config
    }

    /// The directories of a cluster, empty, owned by the user the server runs as.
    fn empty(bin: &Path) -> Cluster {
        let root = TempDir::created("keel-pg");
        let run_as = rustix::process::geteuid()
            .is_root()
            .then(|| postgres_user().expect("as root, the tests need the postgres user"));
        let data = root.path().join("data");
        let sockets = root.path().join("run");
        for dir in [&data, &sockets] {
            std::fs::create_dir(dir).unwrap();
        }
        if let Some((uid, gid)) = run_as {
            use std::os::unix::fs::PermissionsExt;
            // The postgres user must reach its directories inside root's private temp dir.
            std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
            for dir in [&data, &sockets] {
                std::os::unix::fs::chown(dir, Some(uid), Some(gid)).unwrap();
            }
        }
        Cluster {
            _root: root,
            bin: bin.to_owned(),
            data,
            sockets,
            run_as,
        }
    }

    /// Starts the server on a socket in `sockets`, its log in its own socket directory.
    fn serve(&self, sockets: &Path) {
        let options = format!("-k {} -p {PORT} -c listen_addresses=''", path_str(sockets));
        let log = self.sockets.join("server.log");
        // `-w` makes pg_ctl wait until the server accepts connections (it polls, with its own
        // deadline `-t`), so the tests need no wait of their own.
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.data),
                "-l",
                path_str(&log),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Runs a server binary (as the postgres user, as root) and panics with its output if it
    /// fails.
    fn run(&self, program: &str, args: &[&str]) -> String {
        let path = self.bin.join(program);
        let mut command = if self.run_as.is_some() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&path);
            command
        } else {
            Command::new(&path)
        };
        let output = command
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "{program} {args:?} failed ({}):\n{text}",
            output.status
        );
        text
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let path = self.bin.join("pg_ctl");
        let mut command = if self.run_as.is_some() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&path);
            command
        } else {
            Command::new(&path)
        };
        // Immediate: nothing in a throwaway cluster needs a clean shutdown.
        let _ = command
            .args(["-D", path_str(&self.data), "-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// The newest installed server's `bin` directory.
fn server_binaries() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
    })
}

/// The `postgres` user's uid and gid, from `/etc/passwd`.
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != "postgres" {
            return None;
        }
        let _password = fields.next()?;
        Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
    })
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}
