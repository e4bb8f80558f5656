//! SPEC O3: the store refuses a data directory another user could tamper with, and never opens
//! a store file through a symbolic link.

#![cfg(unix)]
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use keel_core::StoreError;
use keel_store_fs::FsStore;

mod common;
use common::{TempDir, LOG0};

fn refused(dir: &Path) -> (String, String) {
    match FsStore::open(dir) {
        Err(StoreError::Unsafe { path, reason }) => (path, reason),
        Err(e) => panic!("refused, but not as unsafe: {e}"),
        Ok(_) => panic!("{} was opened", dir.display()),
    }
}

/// The reproduction from the issue: a link planted where the first log belongs, pointing at a
/// file of the victim's. keel must not truncate or write it.
#[test]
fn a_link_planted_where_a_store_file_belongs_is_refused_and_its_target_untouched() {
    let tmp = TempDir::created("keel-safety");
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    symlink(&victim, dir.join(LOG0)).unwrap();
    let (path, reason) = refused(&dir);
    assert!(path.ends_with(LOG0), "{path}");
    assert!(reason.contains("symbolic link"), "{reason}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(!dir.join("VERSION").exists(), "nothing was written there");
}

#[test]
fn a_directory_its_group_or_others_may_write_to_is_refused_with_the_fix() {
    let tmp = TempDir::created("keel-safety");
    let dir = tmp.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)).unwrap();
    let (path, reason) = refused(&dir);
    assert_eq!(path, dir.display().to_string());
    assert!(
        reason.contains("mode 0770") && reason.contains("chmod 700"),
        "{reason}"
    );
    assert!(!dir.join("VERSION").exists());
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    FsStore::open(&dir).expect("a private directory opens");
}

#[test]
fn a_directory_another_user_owns_is_refused() {
    let me = rustix::process::geteuid().as_raw();
    // As root, a directory given to `nobody`; otherwise one root owns.
    let tmp = TempDir::created("keel-safety");
    let dir = if me == 0 {
        let dir = tmp.path().join("theirs");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&dir, Some(65_534), Some(65_534)).unwrap();
        dir
    } else {
        Path::new("/").to_path_buf()
    };
    let (_, reason) = refused(&dir);
    assert!(reason.contains("owned by uid"), "{reason}");
    assert!(reason.contains(&format!("(uid {me})")), "{reason}");
}

#[test]
fn a_link_planted_after_the_store_opened_is_not_followed() {
    let tmp = TempDir::created("keel-safety");
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let dir = tmp.path().join("data");
    drop(FsStore::open(&dir).unwrap());
    // Between two opens, the snapshot of a new generation is replaced by a link: the next
    // open must not read through it (it is refused outright).
    symlink(&victim, dir.join("CURRENT.tmp")).unwrap();
    let (path, _) = refused(&dir);
    assert!(path.ends_with("CURRENT.tmp"), "{path}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
}
