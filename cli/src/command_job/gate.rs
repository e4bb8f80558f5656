//! The start gate (module docs of [`super`], "After a crash"): the command cannot run before
//! it is recorded.

#[cfg(unix)]
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use super::CommandSpec;

/// The gate's shell script: `"$@"` is the command. `read` fails at the end of stdin without a
/// line: the daemon that started the gate died before it recorded the command.
#[cfg(unix)]
pub(super) const GATE_SCRIPT: &str = "read -r keel_gate || exit 125; exec \"$@\" </dev/null";

/// The exit code of a gate that closed without letting its command run (in [`GATE_SCRIPT`]).
#[cfg(all(unix, test))]
pub(super) const GATE_CLOSED_EXIT: i32 = 125;

/// Lets the command run: sends the gate its line and closes its stdin. A gate that is gone
/// (the command was killed already) is not an error here: the command's exit status says what
/// happened.
#[cfg(unix)]
pub(super) async fn open_gate(gate: Option<tokio::process::ChildStdin>) {
    use tokio::io::AsyncWriteExt;
    if let Some(mut gate) = gate {
        if let Err(e) = gate.write_all(b"go\n").await {
            tracing::debug!(error = %e, "the command's gate was gone before it opened");
        }
    }
}

impl CommandSpec {
    /// The process to start, with keel's variables `vars` added to its environment.
    ///
    /// On Unix it starts as the gate (module docs, "After a crash"): `/bin/sh` waits for a line
    /// on its stdin, then replaces itself with the command, same pid and process group; at the
    /// end of its stdin without that line it exits with [`GATE_CLOSED_EXIT`] instead.
    pub(super) fn command(&self, vars: &[(&str, Option<String>)]) -> Command {
        #[cfg(unix)]
        let mut command = {
            let mut command = Command::new("/bin/sh");
            command.arg("-c").arg(GATE_SCRIPT).arg("keel-gate");
            if self.shell {
                command.arg("sh").arg("-c").arg(self.argv.join(" "));
            } else {
                command.args(&self.argv);
            }
            command.stdin(Stdio::piped());
            command
        };
        #[cfg(not(unix))]
        let mut command = {
            let mut command = if self.shell {
                let mut command = Command::new("sh");
                command.arg("-c").arg(self.argv.join(" "));
                command
            } else {
                let mut command = Command::new(self.argv.first().map_or("", String::as_str));
                command.args(self.argv.iter().skip(1));
                command
            };
            command.stdin(Stdio::null());
            command
        };
        if let Some(cwd) = &self.cwd {
            command.current_dir(cwd);
        }
        command.envs(&self.env);
        for (name, value) in vars {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Its own process group: a stop reaches everything the command started, and a Ctrl-C
        // at the daemon's terminal reaches only the daemon.
        #[cfg(unix)]
        command.process_group(0);
        command
    }
}

impl CommandSpec {
    /// Whether the program can be started, as `exec` would find it: the gate's shell finds it
    /// only once it runs, so without this a missing program would end as exit code 127 rather
    /// than as the error that names it. The job's own `PATH` wins over the daemon's, as it
    /// does for the command; a relative path is taken from the job's `cwd`. A program that
    /// goes between this check and the `exec` still ends the attempt as a permanent failure
    /// (exit code 127, see "Exit codes").
    #[cfg(unix)]
    pub(super) fn find_program(&self) -> std::io::Result<()> {
        use std::io::{Error, ErrorKind};
        use std::os::unix::fs::PermissionsExt;
        let program = if self.shell {
            "sh"
        } else {
            self.argv.first().map_or("", String::as_str)
        };
        let candidates: Vec<PathBuf> = if program.contains('/') {
            let path = Path::new(program);
            vec![match &self.cwd {
                Some(cwd) if path.is_relative() => cwd.join(path),
                _ => path.to_path_buf(),
            }]
        } else {
            let search = match self.env.get("PATH") {
                Some(path) => Some(std::ffi::OsString::from(path)),
                None => std::env::var_os("PATH"),
            };
            let Some(search) = search else {
                // No search path at all: the shell's default applies; let it decide.
                return Ok(());
            };
            std::env::split_paths(&search)
                .map(|dir| match &self.cwd {
                    Some(cwd) if dir.is_relative() => cwd.join(dir).join(program),
                    _ => dir.join(program),
                })
                .collect()
        };
        let mut not_executable = false;
        for candidate in candidates {
            match std::fs::metadata(&candidate) {
                Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => {
                    return Ok(())
                }
                Ok(_) => not_executable = true,
                Err(_) => {}
            }
        }
        Err(if not_executable {
            Error::new(ErrorKind::PermissionDenied, "not an executable file")
        } else {
            Error::new(ErrorKind::NotFound, "no such program")
        })
    }
}

#[cfg(all(test, unix))]
mod tests {
    use keel_harness::TempDir;

    use super::super::tests::{sh, spec};
    use super::*;

    #[tokio::test]
    async fn a_gate_closed_without_its_line_exits_125_and_runs_nothing() {
        assert!(
            GATE_SCRIPT.contains(&format!("exit {GATE_CLOSED_EXIT};")),
            "{GATE_SCRIPT}"
        );
        let dir = TempDir::created("keel-command-job");
        let marker = dir.path().join("ran");
        let spec = sh(r#"touch "$1""#, &[marker.to_str().unwrap()]);
        let mut child = spec.command(&[]).spawn().unwrap();
        // What a daemon's death does: its end of the gate closes.
        drop(child.stdin.take());
        let status = child.wait().await.unwrap();
        assert_eq!(status.code(), Some(GATE_CLOSED_EXIT));
        assert!(!marker.exists(), "the command ran");

        let mut child = spec.command(&[]).spawn().unwrap();
        open_gate(child.stdin.take()).await;
        assert!(child.wait().await.unwrap().success());
        assert!(marker.exists(), "the opened gate ran the command");
    }

    #[test]
    fn a_program_is_looked_for_as_exec_would() {
        use std::io::ErrorKind as Io;
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::created("keel-command-job");
        let tool = dir.path().join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o644)).unwrap();
        let in_path = |argv: &[&str]| {
            let mut spec = spec(argv);
            spec.env
                .insert("PATH".into(), dir.path().to_str().unwrap().into());
            spec
        };
        assert_eq!(spec(&["sh"]).find_program().map_err(|e| e.kind()), Ok(()));
        let missing = spec(&["keel-test-no-such-program"]).find_program();
        assert_eq!(missing.map_err(|e| e.kind()), Err(Io::NotFound));
        let not_executable = in_path(&["tool"]).find_program();
        assert_eq!(
            not_executable.map_err(|e| e.kind()),
            Err(Io::PermissionDenied)
        );

        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            in_path(&["tool"]).find_program().map_err(|e| e.kind()),
            Ok(())
        );
        let mut relative = spec(&["./tool"]);
        assert_eq!(
            relative.find_program().map_err(|e| e.kind()),
            Err(Io::NotFound),
            "not in the daemon's directory"
        );
        relative.cwd = Some(dir.path().to_path_buf());
        assert_eq!(relative.find_program().map_err(|e| e.kind()), Ok(()));
        let mut shell = in_path(&["tool --flag"]);
        shell.shell = true;
        assert_eq!(
            shell.find_program().map_err(|e| e.kind()),
            Err(Io::NotFound),
            "a shell command needs `sh`, not in this PATH"
        );
    }
}
