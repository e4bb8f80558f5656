//! Each attempt's output, kept on disk (SPEC O7): `<dir>/<run>/<attempt>.stdout` and
//! `.stderr`, as the command wrote them (control lines included), so `keel logs` can show what
//! a run printed after it ended, successful or not.
//!
//! Bounded: each stream keeps its newest [`KEPT_BYTES_MAX`] at most. When a file reaches the
//! bound it is renamed to `….1` (replacing the previous one) and a new file starts, so the end
//! of the output is always kept, in two files read in order. Kept as long as the run's record:
//! the daemon removes the output of runs the history policy pruned ([`prune`]). Writing is
//! best effort: a failure is logged once and the command runs on without its output kept.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use keel_core::{Attempt, RunId, Store};

/// The most each stream of an attempt keeps in its current file; with the rotated one, at most
/// twice this is on disk per stream.
pub const KEPT_BYTES_MAX: u64 = 1024 * 1024;

/// One stream of one attempt, being kept.
#[derive(Debug)]
pub(crate) struct Kept {
    path: PathBuf,
    file: Option<File>,
    written: u64,
}

impl Kept {
    /// Starts keeping `stream` (`stdout`, `stderr`) of `run`'s `attempt` under `dir`.
    pub(crate) fn open(dir: &Path, run: RunId, attempt: Attempt, stream: &str) -> Kept {
        let path = attempt_path(dir, run, attempt, stream);
        let file = path
            .parent()
            .map_or(Ok(()), create_private_dir)
            .and_then(|()| create(&path));
        let file = match file {
            Ok(file) => Some(file),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot keep the command's output");
                None
            }
        };
        Kept {
            path,
            file,
            written: 0,
        }
    }

    /// Appends `bytes`, rotating at the bound.
    pub(crate) fn write(&mut self, bytes: &[u8]) {
        if self.file.is_none() {
            return;
        }
        if self.written + bytes.len() as u64 > KEPT_BYTES_MAX && self.written > 0 {
            if let Err(e) = self.rotate() {
                self.fail(&e);
                return;
            }
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        match file.write_all(bytes) {
            Ok(()) => self.written += bytes.len() as u64,
            Err(e) => self.fail(&e),
        }
    }

    fn rotate(&mut self) -> io::Result<()> {
        fs::rename(&self.path, rotated(&self.path))?;
        self.file = Some(create(&self.path)?);
        self.written = 0;
        Ok(())
    }

    fn fail(&mut self, error: &io::Error) {
        tracing::warn!(path = %self.path.display(), %error, "stopped keeping the command's output");
        self.file = None;
    }
}

/// Where `stream` of `run`'s `attempt` is kept under `dir`.
pub fn attempt_path(dir: &Path, run: RunId, attempt: Attempt, stream: &str) -> PathBuf {
    dir.join(run.to_string())
        .join(format!("{attempt}.{stream}"))
}

/// The file a stream's older output was rotated to.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// The attempts of `run` that have output kept under `dir`, in order.
pub fn attempts(dir: &Path, run: RunId) -> Vec<Attempt> {
    let Ok(entries) = fs::read_dir(dir.join(run.to_string())) else {
        return Vec::new();
    };
    let mut found: Vec<Attempt> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (attempt, stream) = name.split_once('.')?;
            (stream == "stdout" || stream == "stderr")
                .then(|| attempt.parse().ok().map(Attempt))
                .flatten()
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Removes the output of runs the store no longer holds (pruned by the history policy).
/// Returns how many runs' output went.
pub fn prune(dir: &Path, store: &dyn Store) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_prefix("run-"))
            .and_then(|n| n.parse().ok())
            .map(RunId)
        else {
            continue;
        };
        if matches!(store.run(id), Ok(None)) && fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn create(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true).truncate(true).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_keeps_its_newest_bytes_in_two_files_at_most() {
        let tmp = keel_harness::TempDir::created("keel-output");
        let mut kept = Kept::open(tmp.path(), RunId(7), Attempt(2), "stdout");
        let chunk = vec![b'x'; 400 * 1024];
        for _ in 0..3 {
            kept.write(&chunk);
        }
        kept.write(b"the end\n");
        let path = attempt_path(tmp.path(), RunId(7), Attempt(2), "stdout");
        let current = fs::read(&path).unwrap();
        let older = fs::read(rotated(&path)).unwrap();
        assert!(current.ends_with(b"the end\n"));
        assert!(current.len() as u64 <= KEPT_BYTES_MAX);
        assert!(older.len() as u64 <= KEPT_BYTES_MAX);
        assert_eq!(attempts(tmp.path(), RunId(7)), vec![Attempt(2)]);
        assert_eq!(attempts(tmp.path(), RunId(8)), Vec::<Attempt>::new());
    }

    #[test]
    fn output_of_runs_the_store_pruned_goes() {
        let tmp = keel_harness::TempDir::created("keel-output");
        Kept::open(tmp.path(), RunId(1), Attempt(1), "stdout").write(b"old\n");
        let store = keel_testkit::SharedMemStore::new();
        assert_eq!(prune(tmp.path(), &store), 1);
        assert!(!tmp.path().join("run-1").exists());
    }
}
