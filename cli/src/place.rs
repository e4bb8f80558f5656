//! The data directory: where the store, the daemon's lock and its control socket live, and how
//! each is opened.
//!
//! | path | what |
//! |---|---|
//! | `<dir>/` | the fs store (`VERSION`, `lock`, `log-*`, `snapshot-*`, `quarantine/`) |
//! | `<dir>/sled/` | the sled store, with `--store sled` |
//! | `<dir>/daemon.lock` | held by the one process acting as the store's writer: the daemon, or a command working on the store while no daemon runs; holds `<pid> <role>` |
//! | `<dir>/keel.sock` | the daemon's control socket (0600), removed when it stops |
//! | `<dir>/output/` | each attempt's stdout and stderr, bounded, kept as long as its run's record (0700; `command_job::output`) |
//! | `<dir>/attempts/` | the daemon's commands while they run (0700; a file per command, 0600), so that the next daemon can kill those a crash left running (`command_job` module docs) |
//!
//! With `--store postgres` the store and the leadership lease live in the database; the data
//! directory keeps only this host's things: the lock (one daemon per directory), the socket,
//! `output/` and `attempts/`.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keel_core::{Store, StoreError};
use keel_store_fs::{check_private_dir, FsStore};
use keel_store_postgres::PgStore;
use keel_store_sled::SledStore;

use crate::cli::StoreKind;
use crate::error::Failure;

/// The control socket's file name.
pub(crate) const SOCKET_FILE: &str = "keel.sock";
/// The daemon lock's file name.
pub(crate) const LOCK_FILE: &str = "daemon.lock";
/// The sled store's directory, inside the data directory.
pub(crate) const SLED_DIR: &str = "sled";
/// Where the daemon records its running commands, inside the data directory.
pub(crate) const ATTEMPTS_DIR: &str = "attempts";
/// Where the daemon keeps each attempt's output, inside the data directory.
pub(crate) const OUTPUT_DIR: &str = "output";

/// A data directory and the store adapter it holds.
#[derive(Clone, Debug)]
pub(crate) struct Place {
    pub(crate) dir: PathBuf,
    pub(crate) kind: StoreKind,
    /// `--server URL`: a daemon on another host, reached over HTTP instead of this directory.
    pub(crate) remote: Option<Arc<crate::remote::Remote>>,
    /// `--database-url`: the Postgres database, with `--store postgres`.
    pub(crate) database: Option<DatabaseUrl>,
    /// `--token-file`: the bearer token for `--server`, and for a command sent on to the
    /// leader of a Postgres store (`anyhost::forward`).
    pub(crate) token_file: Option<PathBuf>,
}

/// A Postgres connection string, which may hold a password: never printed.
#[derive(Clone)]
pub(crate) struct DatabaseUrl(pub(crate) String);

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseUrl(..)")
    }
}

impl DatabaseUrl {
    /// The connection settings it names.
    pub(crate) fn config(&self) -> Result<keel_store_postgres::Config, Failure> {
        // The parser's message does not quote the string, so it cannot leak the password.
        keel_store_postgres::parse_config(&self.0).map_err(|e| {
            let detail = match e {
                StoreError::Io(detail) => detail,
                other => other.to_string(),
            };
            Failure::input(format!("--database-url (KEEL_DATABASE_URL): {detail}"))
        })
    }
}

/// An open store, with the adapter-specific handle kept for `doctor`.
#[derive(Clone, Debug)]
pub(crate) enum OpenStore {
    Fs(Arc<FsStore>),
    Sled(Arc<SledStore>),
    Postgres(Arc<PgStore>),
}

impl OpenStore {
    /// The store behind the common interface.
    pub(crate) fn store(&self) -> Arc<dyn Store> {
        match self {
            OpenStore::Fs(s) => s.clone(),
            OpenStore::Sled(s) => s.clone(),
            OpenStore::Postgres(s) => s.clone(),
        }
    }
}

impl Place {
    /// Refuses, before anything is created, a path that is not a directory and a directory
    /// that holds the other adapter's store, each with what to do.
    pub(crate) fn check(&self) -> Result<(), Failure> {
        if self.dir.exists() && !self.dir.is_dir() {
            return Err(Failure::input(format!(
                "{} is not a directory: a keel data directory holds the store, the daemon's \
                 lock and its socket (pass --data-dir DIR with a directory, or a path that does \
                 not exist yet)",
                self.dir.display()
            )));
        }
        if self.kind == StoreKind::Postgres && self.database.is_none() {
            return Err(Failure::input(
                "--store postgres needs the database: pass --database-url URL, set \
                 KEEL_DATABASE_URL or keel.toml's [daemon] database_url (docs/cli.md, \"Several \
                 hosts on Postgres\")",
            ));
        }
        let fs = self.dir.join("VERSION").exists();
        let sled = self.dir.join(SLED_DIR).is_dir();
        match self.kind {
            StoreKind::Sled if fs && !sled => Err(Failure::input(format!(
                "{} holds an fs store, not a sled one: drop --store sled (or use another \
                 directory for a sled store)",
                self.dir.display()
            ))),
            StoreKind::Fs if sled && !fs => Err(Failure::input(format!(
                "{} holds a sled store, not an fs one: pass --store sled",
                self.dir.display()
            ))),
            _ => Ok(()),
        }
    }

    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.join(SOCKET_FILE)
    }

    pub(crate) fn lock_path(&self) -> PathBuf {
        self.dir.join(LOCK_FILE)
    }

    /// The command-job handler's records of running commands.
    pub(crate) fn attempts_dir(&self) -> PathBuf {
        self.dir.join(ATTEMPTS_DIR)
    }

    /// Each attempt's kept output (`command_job::output`).
    pub(crate) fn output_dir(&self) -> PathBuf {
        self.dir.join(OUTPUT_DIR)
    }

    /// Fails unless the data directory exists (for commands that only read).
    pub(crate) fn require_existing(&self) -> Result<(), Failure> {
        if self.dir.is_dir() {
            return Ok(());
        }
        Err(Failure::runtime(format!(
            "no keel data directory at {} (`keel run` or `keel job add` creates it; \
             pass --data-dir or set KEEL_DATA_DIR to use another)",
            self.dir.display()
        )))
    }

    /// Opens (creating if needed) the store. For fs this must come before anything else is
    /// put in a new directory: store-fs refuses to adopt a directory holding foreign files.
    /// Either way the directory must be private (`check_private_dir`), and a directory this
    /// creates is announced on stderr.
    pub(crate) fn open_store(&self) -> Result<OpenStore, Failure> {
        self.open_store_with_stall_limit(keel_store_postgres::DEFAULT_STALL_LIMIT)
    }

    /// [`Place::open_store`], where a Postgres session stalled inside a transaction is ended by
    /// the server after `stall_limit` (the daemon's is half its leader TTL, so that a successor
    /// is not kept waiting on a stopped leader's store row lock).
    pub(crate) fn open_store_with_stall_limit(
        &self,
        stall_limit: Duration,
    ) -> Result<OpenStore, Failure> {
        let new = !self.dir.exists();
        let store = match self.kind {
            StoreKind::Fs => FsStore::open(&self.dir)
                .map(|s| OpenStore::Fs(Arc::new(s)))
                .map_err(|e| self.store_error(e))?,
            StoreKind::Sled => {
                create_private_dir(&self.dir)?;
                check_private_dir(&self.dir).map_err(|e| self.store_error(e))?;
                SledStore::open(self.dir.join(SLED_DIR))
                    .map(|s| OpenStore::Sled(Arc::new(s)))
                    .map_err(|e| self.store_error(e))?
            }
            // Nothing of the store is in the directory: `prepare` makes it for the daemon,
            // which keeps this host's things there (output, running commands, the socket).
            StoreKind::Postgres => {
                return PgStore::with_stall_limit(self.database_config()?, stall_limit)
                    .map(|s| OpenStore::Postgres(Arc::new(s)))
                    .map_err(|e| self.store_error(e));
            }
        };
        if new {
            eprintln!(
                "{} keel: created the data directory {} ({} store)",
                crate::direct::wall_clock(),
                self.dir.display(),
                self.kind.name()
            );
        }
        Ok(store)
    }

    /// Makes sure the directory exists, as the store would create it (0700).
    pub(crate) fn prepare(&self) -> Result<(), Failure> {
        match self.kind {
            // The fs store creates the directory and its VERSION marker.
            StoreKind::Fs => self.open_store().map(drop),
            StoreKind::Sled | StoreKind::Postgres => create_private_dir(&self.dir),
        }
    }

    /// The Postgres database's settings (`--database-url`), refused by name when missing.
    pub(crate) fn database_config(&self) -> Result<keel_store_postgres::Config, Failure> {
        match &self.database {
            Some(url) => url.config(),
            None => Err(Failure::input(
                "--store postgres needs --database-url URL (or KEEL_DATABASE_URL)",
            )),
        }
    }

    fn store_error(&self, error: StoreError) -> Failure {
        let hint = match (self.kind, &error) {
            (StoreKind::Fs, StoreError::Io(m)) if self.dir.join(SLED_DIR).is_dir() => {
                format!("{m} (it holds a sled store: pass --store sled)")
            }
            (StoreKind::Sled, StoreError::Io(m)) => format!(
                "{m} (a sled store is open in one process at a time: is a daemon or another \
                 keel command using {}?)",
                self.dir.display()
            ),
            (_, StoreError::Version { .. }) => format!(
                "{error} (run the keel version that wrote it, or point keel at another directory \
                 with --data-dir or KEEL_DATA_DIR; nothing in it was changed)"
            ),
            _ => error.to_string(),
        };
        if self.kind == StoreKind::Postgres {
            let at = self
                .database_config()
                .map(|c| format!(" ({})", keel_store_postgres::describe(&c)))
                .unwrap_or_default();
            return Failure::runtime(format!("cannot open the postgres store{at}: {hint}"));
        }
        Failure::runtime(format!(
            "cannot open the {} store in {}: {hint}",
            self.kind.name(),
            self.dir.display()
        ))
    }
}

/// The data directory when none is given (SPEC O3): one per user, whatever the current
/// directory. Root: `/var/lib/keel`. A systemd service with `StateDirectory=`:
/// `$STATE_DIRECTORY`. Others: `$XDG_STATE_HOME/keel`, else `~/.local/state/keel`.
pub(crate) fn default_data_dir() -> Result<PathBuf, Failure> {
    #[cfg(unix)]
    let root = rustix::process::geteuid().is_root();
    #[cfg(not(unix))]
    let root = false;
    data_dir_for(root, |name| std::env::var_os(name))
}

/// [`default_data_dir`] for a user who is `root` or not, with environment `var`.
fn data_dir_for(
    root: bool,
    var: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<PathBuf, Failure> {
    let env = |name: &str| var(name).map(PathBuf::from).filter(|p| p.is_absolute());
    if root {
        return Ok(PathBuf::from("/var/lib/keel"));
    }
    if let Some(dir) = var("STATE_DIRECTORY") {
        // systemd may list several, separated by colons; keel's is the first.
        if let Some(first) = std::env::split_paths(&dir)
            .next()
            .filter(|p| p.is_absolute())
        {
            return Ok(first);
        }
    }
    if let Some(state) = env("XDG_STATE_HOME") {
        return Ok(state.join("keel"));
    }
    match env("HOME") {
        Some(home) => Ok(home.join(".local").join("state").join("keel")),
        None => Err(Failure::input(
            "no data directory: HOME is not set (or not absolute), so keel has no default; \
             pass --data-dir DIR or set KEEL_DATA_DIR"
                .to_string(),
        )),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), Failure> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|e| Failure::runtime(format!("cannot create {}: {e}", dir.display())))
}

/// Who holds the daemon lock, as its file says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Holder {
    Daemon(u32),
    Command(u32),
    Unknown,
}

impl Holder {
    fn parse(text: &str) -> Holder {
        let mut words = text.split_whitespace();
        let pid = words.next().and_then(|p| p.parse().ok());
        match (pid, words.next()) {
            (Some(pid), Some("daemon")) => Holder::Daemon(pid),
            (Some(pid), Some(_)) => Holder::Command(pid),
            _ => Holder::Unknown,
        }
    }
}

/// The exclusive advisory lock on `<dir>/daemon.lock`: one store writer at a time. Released
/// when dropped, and by the kernel if the process dies.
#[derive(Debug)]
pub(crate) struct DaemonLock {
    file: File,
}

impl DaemonLock {
    /// Takes the lock if it is free; `Ok(Err(holder))` if another process holds it.
    pub(crate) fn try_take(
        place: &Place,
        role: &str,
    ) -> Result<Result<DaemonLock, Holder>, Failure> {
        let path = place.lock_path();
        let file = open_lock_file(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(Ok(DaemonLock::claimed(file, role, &path)?)),
            Err(TryLockError::WouldBlock) => Ok(Err(read_holder(&path))),
            Err(TryLockError::Error(e)) => Err(Failure::runtime(format!(
                "cannot lock {}: {e}",
                path.display()
            ))),
        }
    }

    /// Waits for the lock (blocking the thread).
    pub(crate) fn take_blocking(place: &Place, role: &str) -> Result<DaemonLock, Failure> {
        let path = place.lock_path();
        let file = open_lock_file(&path)?;
        file.lock()
            .map_err(|e| Failure::runtime(format!("cannot lock {}: {e}", path.display())))?;
        DaemonLock::claimed(file, role, &path)
    }

    /// Writes the holder into the lock file in place. Not through `whole_file`: the lock is on
    /// this inode, which a rename would replace, and nothing depends on the text after a crash
    /// (the kernel releases the lock; an empty or partial text reads as `Holder::Unknown`, used
    /// only in messages).
    fn claimed(mut file: File, role: &str, path: &Path) -> Result<DaemonLock, Failure> {
        let write = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            writeln!(file, "{} {role}", std::process::id())
        };
        write(&mut file)
            .map_err(|e| Failure::runtime(format!("cannot write {}: {e}", path.display())))?;
        Ok(DaemonLock { file })
    }
}

impl Drop for DaemonLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

/// Who holds the lock, if anyone (for messages and `doctor`).
pub(crate) fn lock_holder(place: &Place) -> Option<Holder> {
    held_lock_text(place).map(|text| Holder::parse(&text))
}

/// The text of the lock file while another process holds the lock (empty if it cannot be
/// read, which parses as `Holder::Unknown`); `None` if nobody holds it.
fn held_lock_text(place: &Place) -> Option<String> {
    let path = place.lock_path();
    let file = File::open(&path).ok()?;
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            None
        }
        Err(_) => Some(read_lock_text(&path)),
    }
}

/// The store kind a daemon holding the lock runs on, as its lock file says (`PID daemon
/// STORE`); `None` if no daemon holds the lock or its text does not say (an older daemon).
fn daemon_store(place: &Place) -> Option<(u32, String)> {
    let text = held_lock_text(place)?;
    let Holder::Daemon(pid) = Holder::parse(&text) else {
        return None;
    };
    let store = text.split_whitespace().nth(2)?;
    Some((pid, store.to_owned()))
}

/// Refuses a command set up for another store kind than the daemon running in its data
/// directory: commands take the store from `--store`/`KEEL_STORE` (fs by default), not from
/// the daemon's `keel.toml`, and a command on fs beside a Postgres standby would otherwise
/// report no daemon, or call the directory no keel store.
pub(crate) fn check_daemon_store(place: &Place) -> Result<(), Failure> {
    match daemon_store(place) {
        Some((pid, store)) if store != place.kind.name() => Err(Failure::input(format!(
            "a keel daemon (pid {pid}) runs on the {store} store in {}, but this command was \
             set up for the {} store: give it the daemon's store, with --store {store} or \
             KEEL_STORE={store}{} (commands read their flags and the environment, not \
             keel.toml)",
            place.dir.display(),
            place.kind.name(),
            if store == "postgres" {
                ", and its database with --database-url or KEEL_DATABASE_URL"
            } else {
                ""
            }
        ))),
        _ => Ok(()),
    }
}

fn read_holder(path: &Path) -> Holder {
    Holder::parse(&read_lock_text(path))
}

/// The lock file's text; empty if it cannot be read.
fn read_lock_text(path: &Path) -> String {
    let mut text = String::new();
    match File::open(path).and_then(|mut f| f.read_to_string(&mut text)) {
        Ok(_) => text,
        Err(_) => String::new(),
    }
}

fn open_lock_file(path: &Path) -> Result<File, Failure> {
    if let Some(dir) = path.parent().filter(|d| d.is_dir()) {
        check_private_dir(dir).map_err(|e| Failure::runtime(e.to_string()))?;
    }
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .map_err(|e| Failure::runtime(format!("cannot open {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_data_directory_is_one_per_user_whatever_the_current_directory() {
        fn env<'a>(
            vars: &'a [(&'a str, &'a str)],
        ) -> impl Fn(&str) -> Option<std::ffi::OsString> + 'a {
            move |name: &str| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        }
        let home = [("HOME", "/home/ada")];
        assert_eq!(
            data_dir_for(true, env(&home)).unwrap(),
            PathBuf::from("/var/lib/keel")
        );
        assert_eq!(
            data_dir_for(false, env(&home)).unwrap(),
            PathBuf::from("/home/ada/.local/state/keel")
        );
        let xdg = [("HOME", "/home/ada"), ("XDG_STATE_HOME", "/srv/state")];
        assert_eq!(
            data_dir_for(false, env(&xdg)).unwrap(),
            PathBuf::from("/srv/state/keel")
        );
        // systemd's StateDirectory= wins; a relative XDG path is ignored, as the spec says.
        let unit = [
            ("STATE_DIRECTORY", "/var/lib/keel-a:/var/lib/other"),
            ("XDG_STATE_HOME", "relative"),
        ];
        assert_eq!(
            data_dir_for(false, env(&unit)).unwrap(),
            PathBuf::from("/var/lib/keel-a")
        );
        let error = data_dir_for(false, env(&[])).unwrap_err();
        assert!(error.message().contains("pass --data-dir"), "{error:?}");
    }

    #[test]
    fn holders_are_read_from_the_lock_file() {
        assert_eq!(Holder::parse("42 daemon\n"), Holder::Daemon(42));
        assert_eq!(Holder::parse("42 daemon postgres\n"), Holder::Daemon(42));
        assert_eq!(Holder::parse("7 command\n"), Holder::Command(7));
        assert_eq!(Holder::parse(""), Holder::Unknown);
    }

    /// A command set up for fs beside a daemon on Postgres is refused by name, saying what to
    /// set, rather than reporting no daemon or calling the directory no keel store.
    #[test]
    fn a_command_for_another_store_than_the_daemons_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let place = |kind| Place {
            dir: dir.path().to_owned(),
            kind,
            remote: None,
            database: None,
            token_file: None,
        };
        // No daemon: nothing to compare with.
        check_daemon_store(&place(StoreKind::Fs)).unwrap();
        let _daemon = DaemonLock::try_take(&place(StoreKind::Postgres), "daemon postgres")
            .unwrap()
            .unwrap();
        let refused = check_daemon_store(&place(StoreKind::Fs)).unwrap_err();
        let message = refused.to_string();
        assert!(message.contains("runs on the postgres store"), "{message}");
        assert!(message.contains("KEEL_STORE=postgres"), "{message}");
        assert!(message.contains("KEEL_DATABASE_URL"), "{message}");
        assert!(message.contains("not keel.toml"), "{message}");
        // The same kind as the daemon's is fine.
        check_daemon_store(&place(StoreKind::Postgres)).unwrap();
    }
}
