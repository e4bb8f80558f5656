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

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use keel_harness::TempDir;
use keel_store_postgres::{Config, PgStore};
use postgres::config::Host;

pub mod replica;
pub mod tls;

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
        let mut client = postgres::Config::from(server.config())
            .connect(postgres::NoTls)
            .unwrap();
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .unwrap();
        Some(TestDb { server, schema })
    }

    /// Settings that connect to this schema (its name is the application name too, so a test
    /// can find its own connections in `pg_stat_activity`).
    pub fn config(&self) -> Config {
        let mut config = self.server.config();
        config.options(format!("-c search_path={}", self.schema));
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

    /// A [`Proxy`] in front of the server, for this schema: TCP on 127.0.0.1 for the client,
    /// the server's own address (the throwaway cluster's Unix socket) behind it. `Err` says why
    /// not, for an external server the proxy cannot stand in for (several hosts, none).
    pub fn proxy(&self) -> Result<Proxy, String> {
        let config = self.server.config();
        let port = config.get_ports().first().copied().unwrap_or(PORT);
        let upstream = match (config.get_hosts(), config.get_hostaddrs()) {
            (_, [addr]) => Upstream::Tcp(SocketAddr::new(*addr, port).to_string()),
            ([Host::Tcp(host)], []) => Upstream::Tcp(format!("{host}:{port}")),
            ([Host::Unix(dir)], []) => Upstream::Unix(dir.join(format!(".s.PGSQL.{port}"))),
            (hosts, addrs) => {
                return Err(format!(
                    "{DATABASE_URL} names {} hosts and {} addresses; a proxy stands in for one",
                    hosts.len(),
                    addrs.len()
                ))
            }
        };
        // The same settings as `url`, with the proxy for host and port.
        let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        let schema = &self.schema;
        let mut options = format!("-c search_path={schema}");
        if let Some(more) = config.get_options() {
            options = format!("{more} {options}");
        }
        let mut url = format!("options={} application_name={schema}", quote(&options));
        if let Some(user) = config.get_user() {
            url += &format!(" user={}", quote(user));
        }
        if let Some(dbname) = config.get_dbname() {
            url += &format!(" dbname={}", quote(dbname));
        }
        if let Some(password) = config.get_password() {
            url += &format!(" password={}", quote(&String::from_utf8_lossy(password)));
        }
        Ok(Proxy::start(upstream, &url))
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
        postgres::Config::from(self.config())
            .connect(postgres::NoTls)
            .unwrap()
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
            if let Ok(mut client) =
                postgres::Config::from(self.server.config()).connect(postgres::NoTls)
            {
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
        let started = std::time::Instant::now();
        let cluster = Cluster::initialised(bin);
        cluster.serve(&cluster.sockets);
        eprintln!(
            "keel-store-postgres tests: started a throwaway cluster in {} in {:?}",
            cluster.data.display(),
            started.elapsed()
        );
        cluster
    }

    /// A new cluster, initialised (`initdb`), not started.
    fn initialised(bin: &Path) -> Cluster {
        let cluster = Cluster::empty(bin);
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
        self.serve_on(sockets, PORT, "-c listen_addresses=''");
    }

    /// Starts the server with its socket in `sockets` named for `port`, and `settings` (such
    /// as `-c listen_addresses=127.0.0.1`, which makes it listen on `port` there too).
    fn serve_on(&self, sockets: &Path, port: u16, settings: &str) {
        let options = format!("-k {} -p {port} {settings}", path_str(sockets));
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

/// The server binaries for a test that must start clusters of its own (`test`, e.g. "the
/// TLS test", and `why`, what it starts). `None` if the Postgres tests are skipped on purpose
/// (`KEEL_SKIP_POSTGRES=1`) or only an external server is given (said loudly); without the
/// binaries it panics, saying what to install.
fn own_server_binaries(test: &str, why: &str) -> Option<PathBuf> {
    if let Some(bin) = server_binaries() {
        return Some(bin);
    }
    if std::env::var(SKIP).as_deref() == Ok("1") {
        return None;
    }
    if std::env::var(DATABASE_URL).is_ok() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "\n!!!!!!!! SKIPPED: {test} needs the Postgres server binaries {why}. !!!!!!!!\n"
        );
        return None;
    }
    panic!(
        "{test} needs the Postgres server binaries (Debian: apt-get install -y postgresql), or \
         {SKIP}=1 to skip the Postgres tests explicitly"
    );
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

/// Where a [`Proxy`] connects: `host:port`, or a Unix socket's path.
#[derive(Clone, Debug)]
enum Upstream {
    Tcp(String),
    Unix(PathBuf),
}

/// A TCP proxy on 127.0.0.1 in front of the test server (std threads, one pair per
/// connection), which a test can **freeze** like a network partition: it stops forwarding
/// bytes both ways and reads nothing more, but keeps every socket open (no FIN, no RST), and
/// holds new connections without connecting them on. Thawed, it forwards again, the bytes it
/// held included. Stopped on drop.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    url: String,
    frozen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

/// How often a frozen or idle forwarding thread looks at the proxy's state.
const PROXY_TICK: Duration = Duration::from_millis(10);

impl Proxy {
    /// Listens on a free port of 127.0.0.1; `settings` are the connection string's other
    /// key-value pairs (everything but host and port).
    fn start(upstream: Upstream, settings: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let url = format!("host=127.0.0.1 port={} {settings}", addr.port());
        let frozen = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (Arc::clone(&frozen), Arc::clone(&stop));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let (upstream, f, s) = (upstream.clone(), Arc::clone(&f), Arc::clone(&s));
                std::thread::spawn(move || connect(client, &upstream, &f, &s));
            }
        });
        Proxy {
            addr,
            url,
            frozen,
            stop,
        }
    }

    /// A connection string that reaches the test's schema through the proxy.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops forwarding, both ways, on every connection (a partition).
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Forwards again.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.frozen.store(false, Ordering::SeqCst);
        // Wakes the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Waits while the proxy is frozen; false once it stops.
fn wait_thawed(frozen: &AtomicBool, stop: &AtomicBool) -> bool {
    while frozen.load(Ordering::SeqCst) {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(PROXY_TICK);
    }
    !stop.load(Ordering::SeqCst)
}

/// Connects `client` to the server (once thawed) and forwards both ways until either side ends.
fn connect(client: TcpStream, upstream: &Upstream, frozen: &AtomicBool, stop: &AtomicBool) {
    if !wait_thawed(frozen, stop) {
        return;
    }
    let server: Box<dyn Stream> = match upstream {
        Upstream::Tcp(addr) => match TcpStream::connect(addr) {
            Ok(s) => Box::new(s),
            Err(_) => return,
        },
        Upstream::Unix(path) => match UnixStream::connect(path) {
            Ok(s) => Box::new(s),
            Err(_) => return,
        },
    };
    let (Ok(client_in), Ok(server_in)) = (client.try_clone(), server.clone_box()) else {
        return;
    };
    let client: Box<dyn Stream> = Box::new(client);
    let client_in: Box<dyn Stream> = Box::new(client_in);
    std::thread::scope(|scope| {
        scope.spawn(|| forward(client_in, server, frozen, stop));
        forward(server_in, client, frozen, stop);
    });
}

/// Copies `from` to `to` while the proxy is not frozen; on the end of `from` (or an error),
/// ends `to`'s writing side, as the peer did.
fn forward(
    mut from: Box<dyn Stream>,
    mut to: Box<dyn Stream>,
    frozen: &AtomicBool,
    stop: &AtomicBool,
) {
    let _ = from.read_timeout(PROXY_TICK);
    let mut buf = vec![0; 64 * 1024];
    loop {
        if !wait_thawed(frozen, stop) {
            return;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        // Read just as the proxy froze: held until it thaws.
        if !wait_thawed(frozen, stop) || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.end();
    let _ = from.end_reading();
}

/// Either end of a proxied connection.
trait Stream: Read + Write + Send {
    fn clone_box(&self) -> std::io::Result<Box<dyn Stream>>;
    fn read_timeout(&self, timeout: Duration) -> std::io::Result<()>;
    /// Ends the writing side (a FIN to the peer).
    fn end(&self) -> std::io::Result<()>;
    fn end_reading(&self) -> std::io::Result<()>;
}

impl Stream for TcpStream {
    fn clone_box(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn read_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
    fn end(&self) -> std::io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
    fn end_reading(&self) -> std::io::Result<()> {
        self.shutdown(Shutdown::Read)
    }
}

impl Stream for UnixStream {
    fn clone_box(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn read_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
    fn end(&self) -> std::io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
    fn end_reading(&self) -> std::io::Result<()> {
        self.shutdown(Shutdown::Read)
    }
}
