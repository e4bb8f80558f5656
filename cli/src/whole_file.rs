//! Small files keel relies on after a crash, written whole or not at all.
//!
//! A record is written to a temporary file in its target's directory, synced, renamed over the
//! target, and the directory is synced: a crash, a full disk or a failed write at any point
//! leaves either the old file or the new one, never an empty or partial one. The temporary
//! file is removed when anything fails before the rename; one left by a process killed
//! meanwhile is a stray file of the directory (the attempts directory's sweep removes it as
//! unreadable).

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Writes `bytes` to `path` whole or not at all. A new file is created 0600 (unix).
pub(crate) fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_with(path, |file| file.write_all(bytes))
}

/// [`write`], with the bytes written by `fill`: the seam through which tests make a write fail
/// halfway, as a full disk does.
fn write_with(path: &Path, fill: impl FnOnce(&mut File) -> io::Result<()>) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    // Created 0600 and removed on drop, so every early return below cleans up after itself.
    let mut temp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    fill(temp.as_file_mut())?;
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|e| e.error)?;
    // The rename is durable once the directory is: without this a machine crash could leave
    // the old name (or none) after the caller was told the record is written.
    sync_dir(dir)
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Directories cannot be opened for syncing here; the rename is as durable as the platform makes it.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use keel_harness::TempDir;

    use super::*;

    /// Writes half of `bytes`, then fails as a full disk does.
    fn half_then_full(bytes: &[u8]) -> impl FnOnce(&mut File) -> io::Result<()> + '_ {
        move |file| {
            file.write_all(&bytes[..bytes.len() / 2])?;
            Err(io::Error::from(io::ErrorKind::StorageFull))
        }
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_write_is_whole_and_private() {
        let tmp = TempDir::created("keel-whole-file");
        let path = tmp.path().join("run-1-1");
        write(&path, b"first\n").unwrap();
        write(&path, b"second\n").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second\n");
        assert_eq!(entries(tmp.path()), ["run-1-1"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn a_failed_write_leaves_no_empty_or_partial_file() {
        let tmp = TempDir::created("keel-whole-file");
        let path = tmp.path().join("run-1-1");
        let error = write_with(&path, half_then_full(b"{\"run\":1}\n")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::StorageFull);
        assert_eq!(entries(tmp.path()), Vec::<String>::new(), "nothing is left");
    }

    #[test]
    fn a_failed_overwrite_keeps_the_old_file() {
        let tmp = TempDir::created("keel-whole-file");
        let path = tmp.path().join("run-1-1");
        write(&path, b"old\n").unwrap();
        let error = write_with(&path, half_then_full(b"a newer record\n")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::StorageFull);
        assert_eq!(fs::read(&path).unwrap(), b"old\n");
        assert_eq!(entries(tmp.path()), ["run-1-1"]);
    }

    #[test]
    fn a_missing_directory_is_an_error_and_creates_nothing() {
        let tmp = TempDir::created("keel-whole-file");
        let path = tmp.path().join("missing").join("run-1-1");
        assert_eq!(
            write(&path, b"x").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(entries(tmp.path()), Vec::<String>::new());
    }
}
