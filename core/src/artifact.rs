//! The artifact gate (SPEC A2, the `artifact_gate` rule): before a success is accepted, each
//! required artifact whose reported value names something keel can open must open, and the
//! check's result is kept as verification evidence.
//!
//! The core cannot open anything (it is sans-IO), so a check is an effect: the core asks
//! ([`Effect::VerifyArtifacts`](crate::Effect::VerifyArtifacts) with a [`VerifyRequest`]), the
//! driver performs it and reports each [`CheckResult`] with
//! [`Scheduler::handle_verified`](crate::Scheduler::handle_verified), and the core decides.
//!
//! # What is checked
//!
//! [`TargetKind::classify`] reads a reported value:
//!
//! | value | kind | passes when |
//! |---|---|---|
//! | `http://…`, `https://…` (scheme in any case) | [`TargetKind::Url`] | a `GET` answers HTTP 200 (after redirects), within the driver's timeout |
//! | `file:///abs/path`, `file://localhost/abs/path` | [`TargetKind::File`] | the path exists on the host of the keel process |
//! | `/abs/path` | [`TargetKind::File`] | the same |
//! | anything else: relative paths, `s3://…`, ids, text | not checked | (accepted as today: the name was reported) |
//!
//! Relative paths are not checked: they are relative to the worker's working directory, which
//! keel (possibly on another host) does not know, and resolving them against the daemon's own
//! directory would test the wrong file. A worker that wants a file checked reports an absolute
//! path or a `file://` URL. File checks look at the filesystem of the keel process, so they
//! mean something only where workers and keel share it. A `file://` URL is taken literally (no
//! percent-decoding).
//!
//! # States of one verification request
//!
//! | state | input | next |
//! |---|---|---|
//! | (none) | a success reports required artifacts with checkable values not yet verified in this attempt | `Pending { completion }`: `VerifyArtifacts` emitted; the run stays `Running` under its lease |
//! | (none) | the holder calls `verify(target)` | `Pending { no completion }`: `VerifyArtifacts` emitted |
//! | `Pending` | `handle_verified`, the run still held by the same token | evidence stored on the run and audited; a completion is applied if every check passed, else refused (`Rejected::ArtifactGate`) and an `artifact_gate` incident opens |
//! | `Pending` | `handle_verified` after the attempt ended or changed hands | dropped: refused as the token is (the run moved on) |
//!
//! While a completion waits for its gate another success of the run is refused
//! (`Rejected::VerificationPending`); a failure, a release, a reclaim or a cancel ends the
//! attempt as usual and the gate's late result is dropped.
//!
//! A passing verification is reused: a completion whose artifact has the same target as a
//! verification that passed earlier in the same attempt (an explicit `verify`, or a gate
//! refused for another artifact) is not checked again. A new attempt checks again: what was
//! there for one attempt need not be there for the next.
//!
//! Evidence is kept on the run ([`Run::verifications`](crate::Run::verifications), the newest
//! [`limits::VERIFICATIONS_KEPT_MAX`]) and in the audit trail (a record per request, its
//! `output` the check results), so it survives restarts and is returned with the run.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{Attempt, FencingToken, RunId};
use crate::limits;
use crate::time::Timestamp;

/// Identifies one verification request, so its answer finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VerifyId(pub u64);

impl fmt::Display for VerifyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "verification-{}", self.0)
    }
}

/// What kind of thing a target names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    /// An `http://` or `https://` URL: must answer HTTP 200.
    Url,
    /// A file path (absolute, or a `file://` URL): must exist.
    File,
}

impl TargetKind {
    /// The kind of a reported value, or `None` if keel does not check values like it (see the
    /// module docs).
    pub fn classify(value: &str) -> Option<TargetKind> {
        let lower = value.get(..8).unwrap_or(value).to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            return Some(TargetKind::Url);
        }
        file_path(value).map(|_| TargetKind::File)
    }
}

/// The path a file target names: the value itself if it is absolute, or the path of a
/// `file:///…` or `file://localhost/…` URL.
pub fn file_path(value: &str) -> Option<&str> {
    if value.starts_with('/') {
        return Some(value);
    }
    let rest = strip_prefix_ignore_case(value, "file://")?;
    let rest = strip_prefix_ignore_case(rest, "localhost").unwrap_or(rest);
    rest.starts_with('/').then_some(rest)
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// One thing to check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactCheck {
    /// The required artifact it is for; `None` for an explicit `verify`.
    pub name: Option<String>,
    /// The value as reported: a URL or a path.
    pub target: String,
    /// What the target is.
    pub kind: TargetKind,
}

/// What the driver is asked to check (`Effect::VerifyArtifacts`); it answers with one
/// [`CheckResult`] per check, in order, through `Scheduler::handle_verified`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyRequest {
    /// The request.
    pub id: VerifyId,
    /// The run.
    pub run: RunId,
    /// The lease the request was made under.
    pub token: FencingToken,
    /// The checks: one per required artifact to check, or the one target of a `verify`.
    pub checks: Vec<ArtifactCheck>,
}

/// What the driver found for one check: facts, not a verdict (the core decides what passes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckResult {
    /// The HTTP status of a URL's answer.
    pub status: Option<u16>,
    /// Why the check could not be made or the file is missing (a timeout, a refused
    /// connection, "No such file or directory", HTTP support compiled out).
    pub error: Option<String>,
    /// The start of the body (URLs) or what was found (files), bounded by the driver; the core
    /// keeps [`limits::VERIFICATION_EXCERPT_MAX_BYTES`] of it.
    pub excerpt: String,
}

/// Verification evidence: one check's result, as stored with the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// The required artifact it was for; `None` for an explicit `verify`.
    #[serde(default)]
    pub name: Option<String>,
    /// The URL or path checked.
    pub target: String,
    /// What the target is.
    pub kind: TargetKind,
    /// True if it passed: HTTP 200 for a URL, present for a file.
    pub ok: bool,
    /// The HTTP status, for URLs that answered.
    #[serde(default)]
    pub status: Option<u16>,
    /// Why the check failed to get an answer, or the file is missing.
    #[serde(default)]
    pub error: Option<String>,
    /// The start of the answer's body or of the error, at most
    /// [`limits::VERIFICATION_EXCERPT_MAX_BYTES`].
    #[serde(default)]
    pub excerpt: String,
    /// The attempt it was made in.
    pub attempt: Attempt,
    /// When the result came back.
    pub at: Timestamp,
}

impl Verification {
    /// The evidence of `check`, judged from what the driver found.
    pub fn judge(
        check: &ArtifactCheck,
        found: CheckResult,
        attempt: Attempt,
        at: Timestamp,
    ) -> Self {
        let ok = found.error.is_none()
            && match check.kind {
                TargetKind::Url => found.status == Some(200),
                TargetKind::File => true,
            };
        Verification {
            name: check.name.clone(),
            target: crate::text::truncate(&check.target, limits::MESSAGE_MAX_BYTES),
            kind: check.kind,
            ok,
            status: found.status,
            error: found
                .error
                .map(|e| crate::text::truncate(&e, limits::MESSAGE_MAX_BYTES)),
            excerpt: crate::text::truncate(&found.excerpt, limits::VERIFICATION_EXCERPT_MAX_BYTES),
            attempt,
            at,
        }
    }
}

impl fmt::Display for Verification {
    /// `report https://example.com/r: HTTP 404 (not found)`, or `/data/out: missing (No such
    /// file or directory)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(name) = &self.name {
            write!(f, "{name} ")?;
        }
        write!(f, "{}: ", self.target)?;
        match (self.kind, self.status, &self.error) {
            (_, _, Some(error)) if self.kind == TargetKind::File => write!(f, "missing ({error})")?,
            (_, _, Some(error)) => write!(f, "failed ({error})")?,
            (TargetKind::Url, Some(status), None) => write!(f, "HTTP {status}")?,
            (TargetKind::Url, None, None) => f.write_str("no answer")?,
            (TargetKind::File, _, None) => f.write_str("exists")?,
        }
        let excerpt = crate::text::truncate(self.excerpt.trim(), 200);
        if !excerpt.is_empty() {
            write!(f, " {excerpt:?}")?;
        }
        Ok(())
    }
}

/// `a; b; c`: the verifications in one line.
pub fn describe(verifications: &[Verification]) -> String {
    verifications
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_classified_by_scheme_and_absoluteness() {
        assert_eq!(TargetKind::classify("https://x/r"), Some(TargetKind::Url));
        assert_eq!(TargetKind::classify("HTTP://x/r"), Some(TargetKind::Url));
        assert_eq!(
            TargetKind::classify("/data/out.csv"),
            Some(TargetKind::File)
        );
        assert_eq!(
            TargetKind::classify("file:///data/out"),
            Some(TargetKind::File)
        );
        assert_eq!(file_path("file://localhost/data/out"), Some("/data/out"));
        assert_eq!(file_path("FILE:///a"), Some("/a"));
        // Relative paths, other schemes and plain values are not checked.
        assert_eq!(TargetKind::classify("out/report.pdf"), None);
        assert_eq!(TargetKind::classify("file://host/a"), None);
        assert_eq!(TargetKind::classify("s3://bucket/k"), None);
        assert_eq!(TargetKind::classify("42"), None);
        assert_eq!(TargetKind::classify(""), None);
    }

    #[test]
    fn only_a_200_passes_a_url_and_any_error_fails() {
        let url = ArtifactCheck {
            name: Some("report".into()),
            target: "http://x/r".into(),
            kind: TargetKind::Url,
        };
        let judge = |status, error: Option<&str>| {
            let found = CheckResult {
                status,
                error: error.map(String::from),
                excerpt: "x".repeat(10_000),
            };
            Verification::judge(&url, found, Attempt(1), Timestamp(5))
        };
        assert!(judge(Some(200), None).ok);
        assert!(!judge(Some(204), None).ok);
        assert!(!judge(Some(404), None).ok);
        assert!(!judge(None, Some("timed out")).ok);
        let v = judge(Some(404), None);
        assert!(v.excerpt.len() <= limits::VERIFICATION_EXCERPT_MAX_BYTES + '…'.len_utf8());
        assert!(v
            .to_string()
            .starts_with("report http://x/r: HTTP 404 \"xxx"));
        let file = ArtifactCheck {
            name: None,
            target: "/a".into(),
            kind: TargetKind::File,
        };
        let missing = CheckResult {
            error: Some("No such file or directory".into()),
            ..CheckResult::default()
        };
        let v = Verification::judge(&file, missing, Attempt(1), Timestamp(5));
        assert!(!v.ok);
        assert_eq!(v.to_string(), "/a: missing (No such file or directory)");
        assert!(Verification::judge(&file, CheckResult::default(), Attempt(1), Timestamp(5)).ok);
    }
}
