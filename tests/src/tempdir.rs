//! A temporary directory for tests of durable stores, removed when dropped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh path under the system's temporary directory, named after a prefix, the process and
/// a counter so parallel tests and processes never share one. Nothing is created there (a
/// store creates its own directory, with its own permissions); whatever a test leaves is
/// removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A new, unused path whose last component starts with `prefix`.
    pub fn new(prefix: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        // A leftover of an earlier process with the same pid.
        let _ = std::fs::remove_dir_all(&path);
        TempDir { path }
    }

    /// Like [`TempDir::new`], with the directory created (empty). Panics if it cannot be:
    /// this is test support.
    pub fn created(prefix: &str) -> TempDir {
        let dir = TempDir::new(prefix);
        std::fs::create_dir_all(&dir.path).expect("create a temporary directory");
        dir
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A file in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The names of the directory's entries, sorted (empty if it does not exist).
    pub fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
