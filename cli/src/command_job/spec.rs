//! The job's payload: [`CommandSpec`], parsed and checked at the boundary (module docs of
//! [`super`], "The job's payload").

use std::collections::BTreeMap;
use std::path::PathBuf;

use keel_core::text::floor_char_boundary;
use serde::{Deserialize, Serialize};

use super::CAPTURE_BYTES_MAX;

/// Longest rendering of the command in messages.
pub(super) const COMMAND_LABEL_MAX_BYTES: usize = 80;

/// Variables keel sets for every attempt; a spec's `env` may not set them.
pub(super) const RESERVED_ENV: [&str; 6] = [
    "KEEL_RUN_ID",
    "KEEL_JOB",
    "KEEL_ATTEMPT",
    "KEEL_IDEMPOTENCY_KEY",
    "KEEL_FENCING_TOKEN",
    "KEEL_CHECKPOINT",
];

/// Fields of a spec, for refusing unknown ones.
pub(super) const SPEC_FIELDS: [&str; 6] =
    ["argv", "shell", "cwd", "env", "exit_codes", "capture_bytes"];

/// Fields of `exit_codes`.
pub(super) const EXIT_CODES_FIELDS: [&str; 3] = ["success", "retryable", "permanent"];

/// What a command job runs: its payload, as JSON (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandSpec {
    /// The program and its arguments; run directly, never through a shell unless `shell`.
    pub argv: Vec<String>,
    /// Run `sh -c <argv joined by spaces>` instead.
    #[serde(default, skip_serializing_if = "is_false")]
    pub shell: bool,
    /// The working directory (default: the daemon's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    /// Variables added to the inherited environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Per-job overrides of the default exit-code mapping.
    #[serde(default, skip_serializing_if = "ExitCodes::is_empty")]
    pub exit_codes: ExitCodes,
    /// Bytes of stdout, and of stderr, kept: the tail (default [`CAPTURE_BYTES_DEFAULT`](super::CAPTURE_BYTES_DEFAULT)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_bytes: Option<usize>,
}

/// Exit codes whose outcome a job overrides; a code listed here wins over the default mapping.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCodes {
    /// Codes that mean success.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub success: Vec<i32>,
    /// Codes that mean a failure worth retrying.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retryable: Vec<i32>,
    /// Codes that mean a failure that retrying cannot fix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permanent: Vec<i32>,
}

/// Why a payload is not a valid [`CommandSpec`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandSpecError {
    /// Not JSON, or not an object of the right shape.
    #[error("the payload is not a command spec (a JSON object with an \"argv\" list): {0}")]
    Json(String),
    /// A field keel does not know (a typo, most likely).
    #[error("unknown field {field:?}; the fields are {known}")]
    UnknownField {
        /// The field, with its parent (`exit_codes.retry`).
        field: String,
        /// The fields allowed there.
        known: String,
    },
    /// `argv` has no program.
    #[error("argv is empty: give the program and its arguments, e.g. [\"backup.sh\", \"--full\"]")]
    EmptyArgv,
    /// `argv[0]` is the empty string.
    #[error("argv[0], the program, is empty")]
    EmptyProgram,
    /// A string the operating system cannot take.
    #[error("{field} contains a NUL byte")]
    NulByte {
        /// Where (`argv[2]`, `env.NAME`, `cwd`).
        field: String,
    },
    /// An environment variable name that cannot be set.
    #[error("env name {name:?} is invalid: {reason}")]
    EnvName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// An environment variable keel sets itself.
    #[error("env name {name:?} is set by keel for every attempt and cannot be set by a job")]
    ReservedEnv {
        /// The name.
        name: String,
    },
    /// An exit code no process can exit with.
    #[error("exit_codes.{list} lists {code}; exit codes are 0 to 255")]
    ExitCodeRange {
        /// The list.
        list: &'static str,
        /// The code.
        code: i32,
    },
    /// An exit code listed twice, with different meanings.
    #[error("exit code {code} is listed in both exit_codes.{first} and exit_codes.{second}")]
    ExitCodeConflict {
        /// The code.
        code: i32,
        /// One list.
        first: &'static str,
        /// The other.
        second: &'static str,
    },
    /// `capture_bytes` over [`CAPTURE_BYTES_MAX`].
    #[error("capture_bytes is {got}; the limit is {max}")]
    CaptureBytes {
        /// The value given.
        got: usize,
        /// The limit.
        max: usize,
    },
}

impl CommandSpec {
    /// The spec as a job payload: compact JSON, without the fields left at their defaults.
    pub fn to_payload(&self) -> String {
        // Strings, booleans, integers and string-keyed maps always serialise.
        serde_json::to_string(self).expect("a CommandSpec serialises to JSON")
    }

    /// Parses and validates a job payload. Unknown fields are refused.
    pub fn from_payload(payload: &str) -> Result<CommandSpec, CommandSpecError> {
        let value: serde_json::Value =
            serde_json::from_str(payload).map_err(|e| CommandSpecError::Json(e.to_string()))?;
        check_fields(&value)?;
        let spec: CommandSpec =
            serde_json::from_value(value).map_err(|e| CommandSpecError::Json(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks what the JSON shape cannot: a program to run, strings the operating system takes,
    /// environment names that can be set, exit codes that make sense, a bounded capture.
    pub fn validate(&self) -> Result<(), CommandSpecError> {
        let Some(program) = self.argv.first() else {
            return Err(CommandSpecError::EmptyArgv);
        };
        if program.is_empty() {
            return Err(CommandSpecError::EmptyProgram);
        }
        for (i, arg) in self.argv.iter().enumerate() {
            if arg.contains('\0') {
                return Err(CommandSpecError::NulByte {
                    field: format!("argv[{i}]"),
                });
            }
        }
        if let Some(cwd) = &self.cwd {
            if cwd.as_os_str().as_encoded_bytes().contains(&0) {
                return Err(CommandSpecError::NulByte {
                    field: "cwd".into(),
                });
            }
        }
        for (name, value) in &self.env {
            let reason = if name.is_empty() {
                Some("it is empty")
            } else if name.contains('=') {
                Some("it contains '='")
            } else if name.contains('\0') {
                Some("it contains a NUL byte")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(CommandSpecError::EnvName {
                    name: name.clone(),
                    reason,
                });
            }
            if RESERVED_ENV.contains(&name.as_str()) {
                return Err(CommandSpecError::ReservedEnv { name: name.clone() });
            }
            if value.contains('\0') {
                return Err(CommandSpecError::NulByte {
                    field: format!("env.{name}"),
                });
            }
        }
        self.exit_codes.validate()?;
        if let Some(got) = self.capture_bytes {
            if got > CAPTURE_BYTES_MAX {
                return Err(CommandSpecError::CaptureBytes {
                    got,
                    max: CAPTURE_BYTES_MAX,
                });
            }
        }
        Ok(())
    }

    /// The command, for messages: the program, or the shell command, shortened.
    pub(super) fn label(&self) -> String {
        let text = if self.shell {
            format!("sh -c '{}'", self.argv.join(" "))
        } else {
            self.argv.first().cloned().unwrap_or_default()
        };
        if text.len() <= COMMAND_LABEL_MAX_BYTES {
            return format!("`{text}`");
        }
        let cut = floor_char_boundary(&text, COMMAND_LABEL_MAX_BYTES);
        format!("`{}…`", &text[..cut])
    }
}

impl ExitCodes {
    pub(super) fn is_empty(&self) -> bool {
        self.success.is_empty() && self.retryable.is_empty() && self.permanent.is_empty()
    }

    pub(super) fn validate(&self) -> Result<(), CommandSpecError> {
        let lists = [
            ("success", &self.success),
            ("retryable", &self.retryable),
            ("permanent", &self.permanent),
        ];
        for (i, (list, codes)) in lists.iter().enumerate() {
            for &code in codes.iter() {
                if !(0..=255).contains(&code) {
                    return Err(CommandSpecError::ExitCodeRange { list, code });
                }
                if let Some((other, _)) = lists[i + 1..].iter().find(|(_, c)| c.contains(&code)) {
                    return Err(CommandSpecError::ExitCodeConflict {
                        code,
                        first: list,
                        second: other,
                    });
                }
            }
        }
        Ok(())
    }
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// Refuses fields a spec does not have, so a typo is an error instead of a silent default.
fn check_fields(value: &serde_json::Value) -> Result<(), CommandSpecError> {
    let Some(object) = value.as_object() else {
        // serde reports the wrong shape.
        return Ok(());
    };
    for field in object.keys() {
        if !SPEC_FIELDS.contains(&field.as_str()) {
            return Err(CommandSpecError::UnknownField {
                field: field.clone(),
                known: SPEC_FIELDS.join(", "),
            });
        }
    }
    if let Some(codes) = object.get("exit_codes").and_then(|c| c.as_object()) {
        for field in codes.keys() {
            if !EXIT_CODES_FIELDS.contains(&field.as_str()) {
                return Err(CommandSpecError::UnknownField {
                    field: format!("exit_codes.{field}"),
                    known: EXIT_CODES_FIELDS.join(", "),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::spec;
    use super::*;

    #[test]
    fn a_spec_round_trips_and_its_payload_leaves_defaults_out() {
        let minimal = spec(&["backup.sh", "--full"]);
        assert_eq!(minimal.to_payload(), r#"{"argv":["backup.sh","--full"]}"#);
        assert_eq!(
            CommandSpec::from_payload(&minimal.to_payload()).unwrap(),
            minimal
        );
        let full = CommandSpec {
            shell: true,
            cwd: Some("/srv".into()),
            env: BTreeMap::from([("BUCKET".to_string(), "s3://b".to_string())]),
            exit_codes: ExitCodes {
                success: vec![1],
                retryable: vec![3],
                permanent: vec![4],
            },
            capture_bytes: Some(100),
            ..minimal
        };
        assert_eq!(CommandSpec::from_payload(&full.to_payload()).unwrap(), full);
    }

    #[test]
    fn a_bad_payload_is_a_typed_error_that_says_what_is_wrong() {
        let error = |payload: &str| CommandSpec::from_payload(payload).unwrap_err();
        assert!(matches!(error("{argv"), CommandSpecError::Json(_)));
        assert!(matches!(error(r#"["ls"]"#), CommandSpecError::Json(_)));
        assert!(matches!(
            error(r#"{"argv": "ls"}"#),
            CommandSpecError::Json(_)
        ));
        assert!(matches!(
            error(r#"{"shell": true}"#),
            CommandSpecError::Json(_)
        ));
        assert_eq!(error(r#"{"argv": []}"#), CommandSpecError::EmptyArgv);
        assert_eq!(error(r#"{"argv": [""]}"#), CommandSpecError::EmptyProgram);
        assert_eq!(
            error(r#"{"argv": ["ls"], "enviroment": {}}"#),
            CommandSpecError::UnknownField {
                field: "enviroment".into(),
                known: SPEC_FIELDS.join(", ")
            }
        );
        assert!(matches!(
            error(r#"{"argv": ["ls"], "exit_codes": {"retry": [3]}}"#),
            CommandSpecError::UnknownField { field, .. } if field == "exit_codes.retry"
        ));
        assert_eq!(
            error(r#"{"argv": ["ls", "a\u0000b"]}"#),
            CommandSpecError::NulByte {
                field: "argv[1]".into()
            }
        );
        assert!(matches!(
            error(r#"{"argv": ["ls"], "env": {"A=B": "c"}}"#),
            CommandSpecError::EnvName { .. }
        ));
        assert!(matches!(
            error(r#"{"argv": ["ls"], "env": {"": "c"}}"#),
            CommandSpecError::EnvName { .. }
        ));
        assert_eq!(
            error(r#"{"argv": ["ls"], "env": {"KEEL_CHECKPOINT": "x"}}"#),
            CommandSpecError::ReservedEnv {
                name: "KEEL_CHECKPOINT".into()
            }
        );
        assert_eq!(
            error(r#"{"argv": ["ls"], "exit_codes": {"permanent": [256]}}"#),
            CommandSpecError::ExitCodeRange {
                list: "permanent",
                code: 256
            }
        );
        assert_eq!(
            error(r#"{"argv": ["ls"], "exit_codes": {"success": [3], "permanent": [3]}}"#),
            CommandSpecError::ExitCodeConflict {
                code: 3,
                first: "success",
                second: "permanent"
            }
        );
        assert_eq!(
            error(r#"{"argv": ["ls"], "capture_bytes": 1048577}"#),
            CommandSpecError::CaptureBytes {
                got: 1_048_577,
                max: CAPTURE_BYTES_MAX
            }
        );
        // Messages name the problem.
        assert!(CommandSpecError::EmptyArgv
            .to_string()
            .contains("argv is empty"));
    }
}
