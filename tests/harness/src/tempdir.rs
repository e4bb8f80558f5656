//! A temporary directory for tests of durable stores, removed when dropped.

use std::path::{Path, PathBuf};

/// A fresh path under the system's temporary directory, whose last component starts with a
/// prefix. `tempfile` makes the directory that holds it, with an unpredictable name and owner-
/// only permissions, so parallel tests and processes never share one and nobody else can plant
/// anything in it. Whatever a test leaves is removed on drop.
#[derive(Debug)]
pub struct TempDir {
    root: tempfile::TempDir,
    path: PathBuf,
}

impl TempDir {
    /// A new, unused path whose last component starts with `prefix`. Nothing is created at the
    /// path itself (a store creates its own directory, with its own permissions).
    pub fn new(prefix: &str) -> TempDir {
        let root = root(prefix);
        let path = root.path().join(prefix);
        TempDir { root, path }
    }

    /// Like [`TempDir::new`], with the directory created (empty, owner-only). Panics if it
    /// cannot be: this is test support.
    pub fn created(prefix: &str) -> TempDir {
        let root = root(prefix);
        let path = root.path().to_path_buf();
        TempDir { root, path }
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

    /// The directory `tempfile` made, which holds [`TempDir::path`] (or is it).
    pub fn root(&self) -> &Path {
        self.root.path()
    }
}

fn root(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("{prefix}-"))
        .tempdir()
        .expect("create a temporary directory")
}
