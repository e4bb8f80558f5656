//! The data directory: file names, owner-only creation, the version marker, directory fsync
//! and quarantine copies.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use keel_core::StoreError;

use crate::format::{decode_current, encode_current, Current, VERSION_MARKER, VERSION_MARKER_V1};

pub(crate) const VERSION_FILE: &str = "VERSION";
pub(crate) const LOCK_FILE: &str = "lock";
pub(crate) const QUARANTINE_DIR: &str = "quarantine";
pub(crate) const CURRENT_FILE: &str = "CURRENT";
const VERSION_TMP: &str = "VERSION.tmp";
const CURRENT_TMP: &str = "CURRENT.tmp";

/// The name of generation `generation`'s log.
pub(crate) fn log_name(generation: u64) -> String {
    format!("log-{generation:016x}")
}

/// The name of the snapshot that starts generation `generation`.
pub(crate) fn snapshot_name(generation: u64) -> String {
    format!("snapshot-{generation:016x}")
}

/// Every generation that has a snapshot or a log in `dir`.
pub(crate) fn generations(dir: &Path) -> io::Result<BTreeSet<u64>> {
    let mut found = BTreeSet::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        let hex = name
            .strip_prefix("log-")
            .or_else(|| name.strip_prefix("snapshot-"));
        if let Some(generation) = hex.and_then(parse_generation) {
            found.insert(generation);
        }
    }
    Ok(found)
}

fn parse_generation(hex: &str) -> Option<u64> {
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Files of generations below `keep_from`, half-written snapshots (`.tmp`) of those too.
pub(crate) fn obsolete_files(dir: &Path, keep_from: u64) -> io::Result<Vec<PathBuf>> {
    let mut doomed = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let old = name
            .strip_prefix("log-")
            .or_else(|| name.strip_prefix("snapshot-"))
            .and_then(parse_generation)
            .is_some_and(|generation| generation < keep_from);
        // A snapshot being written, by this handle's thread or another process's, is one of
        // a generation at or after `keep_from`: only older ones were left by an interruption.
        let half_written = name
            .strip_prefix("snapshot-")
            .and_then(|rest| rest.strip_suffix(".tmp"))
            .and_then(parse_generation)
            .is_some_and(|generation| generation < keep_from);
        if old || half_written {
            doomed.push(entry.path());
        }
    }
    Ok(doomed)
}

/// Creates `dir` (and missing parents) owner-only.
pub(crate) fn create_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Makes an existing directory owner-only (a directory the store is initialised in).
pub(crate) fn restrict_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Options for a file the store creates: owner-only, readable and writable, and never through
/// a symbolic link (SPEC O3: a link planted where a store file belongs would have keel truncate
/// and overwrite whatever it points to).
pub(crate) fn owner_only() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600).custom_flags(no_follow());
    }
    options
}

/// Opens a store file to read it, never through a symbolic link.
pub(crate) fn open_read(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(no_follow());
    }
    options.open(path)
}

/// Reads a whole store file, never through a symbolic link.
pub(crate) fn read(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    open_read(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(unix)]
fn no_follow() -> i32 {
    // The flag's bits fit an `int`, as `open(2)` takes them.
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// Refuses a data directory another user could tamper with (SPEC O3), before anything in it is
/// read or written: one owned by another user, one its group or others may write to, or one
/// holding a symbolic link (keel's own files are never links, and a link where a store file
/// belongs would have keel read or overwrite whatever it points to).
pub fn check_private_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let unsafe_dir = |reason: String| StoreError::Unsafe {
            path: dir.display().to_string(),
            reason,
        };
        let meta = fs::metadata(dir).map_err(|e| io_error(dir, "cannot read", &e))?;
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me {
            return Err(unsafe_dir(format!(
                "it is owned by uid {}, not by this user (uid {me}); its owner could change what \
                 keel reads and runs. Use a directory of your own (--data-dir)",
                meta.uid()
            )));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(unsafe_dir(format!(
                "its group or others may write to it (mode {mode:04o}); make it private with \
                 `chmod 700 {}`",
                dir.display()
            )));
        }
        let entries = fs::read_dir(dir).map_err(|e| io_error(dir, "cannot list", &e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_error(dir, "cannot list", &e))?;
            let kind = entry
                .file_type()
                .map_err(|e| io_error(&entry.path(), "cannot read", &e))?;
            if kind.is_symlink() {
                return Err(StoreError::Unsafe {
                    path: entry.path().display().to_string(),
                    reason: "it is a symbolic link, and keel never follows one in its data \
                             directory (a link where a store file belongs would have keel \
                             read or overwrite what it points to); remove it"
                        .into(),
                });
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Opens (creating it if needed) a file for reading and writing.
pub(crate) fn open_or_create(path: &Path) -> io::Result<File> {
    owner_only().create(true).truncate(false).open(path)
}

/// Makes the directory's entries (created, renamed, removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    // Elsewhere a directory cannot be opened like this; renames are durable by other means.
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Writes `bytes` to `path` atomically: a temporary file, fsync, rename, directory fsync.
pub(crate) fn write_atomically(
    dir: &Path,
    path: &Path,
    tmp: &Path,
    bytes: &[u8],
) -> io::Result<()> {
    let mut file = owner_only().create(true).truncate(true).open(tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(tmp, path)?;
    sync_dir(dir)
}

/// What the `VERSION` file says about a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Marker {
    /// A store in this format.
    Current,
    /// A store in format 1, which the first compaction migrates.
    V1,
    /// No marker, and nothing but what an interrupted initialisation leaves: the directory
    /// may be made a store.
    Absent,
}

/// Reads the version marker. A different marker is [`StoreError::Version`]; a directory with
/// other files and no marker is refused rather than adopted.
pub(crate) fn marker(dir: &Path) -> Result<Marker, StoreError> {
    marker_once(dir, true)
}

fn marker_once(dir: &Path, again: bool) -> Result<Marker, StoreError> {
    match read(&dir.join(VERSION_FILE)) {
        Ok(found) if found == VERSION_MARKER.as_bytes() => return Ok(Marker::Current),
        Ok(found) if found == VERSION_MARKER_V1.as_bytes() => return Ok(Marker::V1),
        Ok(found) => {
            let text = String::from_utf8_lossy(&found);
            let found: String = text.trim_end().chars().take(80).collect();
            return Err(StoreError::Version {
                found,
                supported: format!(
                    "{} or {}",
                    VERSION_MARKER.trim_end(),
                    VERSION_MARKER_V1.trim_end()
                ),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(&dir.join(VERSION_FILE), "cannot read", &e)),
    }
    let entries = fs::read_dir(dir).map_err(|e| io_error(dir, "cannot list", &e))?;
    let mut foreign = Vec::new();
    let mut store_files = false;
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, "cannot list", &e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let initialising = [LOCK_FILE, VERSION_TMP, QUARANTINE_DIR].contains(&name.as_str());
        if name == VERSION_FILE && again {
            // Written by another process since we looked: read it again.
            return marker_once(dir, false);
        }
        if !initialising {
            store_files |=
                name == CURRENT_FILE || name.starts_with("log-") || name.starts_with("snapshot-");
            foreign.push(name);
        }
    }
    if foreign.is_empty() {
        return Ok(Marker::Absent);
    }
    foreign.sort();
    foreign.truncate(5);
    let hint = if store_files {
        // A store's own files: its marker was lost, and which format wrote them is known.
        let marker = if dir.join(CURRENT_FILE).exists() {
            VERSION_MARKER
        } else {
            VERSION_MARKER_V1
        };
        format!(
            "if this is a keel store whose {VERSION_FILE} file was lost, recreate it with \
             `printf '{}\\n' > {}`, then run `keel doctor`; otherwise point keel at an empty \
             or new directory (--data-dir or KEEL_DATA_DIR)",
            marker.trim_end(),
            dir.join(VERSION_FILE).display()
        )
    } else {
        "point keel at an empty or new directory (--data-dir or KEEL_DATA_DIR)".to_string()
    };
    Err(StoreError::Io(format!(
        "{} is not a keel store: it has no {VERSION_FILE} file but holds other files ({}); \
         refusing to use it: {hint}",
        dir.display(),
        foreign.join(", ")
    )))
}

/// Writes the version marker of a new store.
pub(crate) fn write_marker(dir: &Path) -> io::Result<()> {
    write_atomically(
        dir,
        &dir.join(VERSION_FILE),
        &dir.join(VERSION_TMP),
        VERSION_MARKER.as_bytes(),
    )
}

/// What the `CURRENT` file says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CurrentFile {
    /// The committed generation.
    Named(u64),
    /// No such file: format 1, or a store not yet created.
    Missing,
    /// The file is damaged (why).
    Unreadable(String),
}

/// Reads the `CURRENT` file.
pub(crate) fn read_current(dir: &Path) -> Result<CurrentFile, StoreError> {
    let path = dir.join(CURRENT_FILE);
    let bytes = match read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(CurrentFile::Missing),
        Err(e) => return Err(io_error(&path, "cannot read", &e)),
    };
    Ok(match decode_current(&bytes) {
        Ok(current) => CurrentFile::Named(current.generation),
        Err(e) => CurrentFile::Unreadable(e.to_string()),
    })
}

/// Commits `generation`: writes the `CURRENT` file atomically (always fsynced: it is written
/// once per compaction, and a commit that could vanish would undo the guarantee it gives).
pub(crate) fn write_current(dir: &Path, generation: u64) -> io::Result<()> {
    let bytes = encode_current(Current { generation }).map_err(io::Error::other)?;
    write_atomically(dir, &dir.join(CURRENT_FILE), &dir.join(CURRENT_TMP), &bytes)
}

/// Copies damaged bytes to `quarantine/<name>` unless an earlier scan already did; returns
/// the copy's path.
pub(crate) fn quarantine(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<PathBuf> {
    let quarantine = dir.join(QUARANTINE_DIR);
    create_dir(&quarantine)?;
    let path = quarantine.join(name);
    if fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64) {
        return Ok(path);
    }
    // Unique per process and call: two handles may quarantine the same bytes at once.
    static COPIES: AtomicU64 = AtomicU64::new(0);
    let copy = COPIES.fetch_add(1, Ordering::Relaxed);
    let tmp = quarantine.join(format!("{name}.{}-{copy}.tmp", std::process::id()));
    write_atomically(&quarantine, &path, &tmp, bytes)?;
    Ok(path)
}

/// An I/O failure on `path` as a store error.
pub(crate) fn io_error(path: &Path, what: &str, error: &io::Error) -> StoreError {
    StoreError::Io(format!("{what} {}: {error}", path.display()))
}

#[cfg(all(test, unix))]
mod safety_tests {
    use super::*;

    /// Defence in depth behind `check_private_dir`: even a link that appears after the check
    /// is never opened through, for writing or for reading.
    #[test]
    fn store_files_are_never_opened_through_a_link() {
        let tmp = keel_harness::TempDir::created("keel-nofollow");
        let victim = tmp.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let link = tmp.path().join("log-0000000000000000");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(owner_only()
            .create(true)
            .truncate(true)
            .open(&link)
            .is_err());
        assert!(open_or_create(&link).is_err());
        assert!(read(&link).is_err());
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
    }
}
