//! Who may call the HTTP API: bearer tokens with roles (SPEC A1).
//!
//! A listener on a loopback address with no tokens file is **open**: every caller may do
//! everything, as every local user may use the control socket the daemon's owner can reach.
//! Any other listener needs a tokens file (`[http] tokens = "FILE"`), and then every request
//! but `/healthz` and `/readyz` must carry `Authorization: Bearer SECRET`.
//!
//! The tokens file is TOML, readable by its owner only (a file others can read is refused, as
//! a store file would be):
//!
//! ```toml
//! [[token]]
//! name = "ops"            # named in the daemon's log when it acts
//! role = "operator"       # viewer | worker | operator
//! secret = "at least 16 characters"
//!
//! [[token]]
//! name = "render-fleet"
//! role = "worker"
//! kinds = ["render"]      # optional: the kinds this worker may claim and act on
//! secret = "…"
//! ```
//!
//! | role | may |
//! |---|---|
//! | `viewer` | read: jobs, runs, logs, queue, incidents, rules, workers, events, metrics |
//! | `worker` | claim and the worker contract on runs of its kinds (all kinds if none are listed) |
//! | `operator` | everything a viewer may, and change jobs, runs, leases and incidents |
//!
//! A missing or unknown token answers 401; a known token whose role may not do what it asks
//! answers 403, naming the role it needs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use subtle::ConstantTimeEq;

/// The shortest secret a tokens file may hold.
pub(crate) const SECRET_MIN_CHARS: usize = 16;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Role {
    /// Read everything.
    Viewer,
    /// The worker contract.
    Worker,
    /// Read and change everything but the worker contract.
    Operator,
}

impl Role {
    /// The name, as the tokens file and the errors say it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Worker => "worker",
            Role::Operator => "operator",
        }
    }
}

/// What a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Need {
    /// A read.
    Read,
    /// A worker call (the kind it concerns is checked by the handler).
    Work,
    /// A change by an operator.
    Operate,
}

/// One token of the tokens file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Token {
    pub(crate) name: String,
    pub(crate) role: Role,
    #[serde(default)]
    pub(crate) kinds: Option<BTreeSet<String>>,
    secret: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<Token>,
}

/// Who is calling.
#[derive(Clone, Debug)]
pub(crate) enum Caller {
    /// An open listener: anyone who reaches it may do anything.
    Open,
    /// A token from the tokens file.
    Token(Token),
}

impl Caller {
    /// Whether the caller may do what `need` names; `Err` names the role it would need.
    pub(crate) fn may(&self, need: Need) -> Result<(), String> {
        let Caller::Token(token) = self else {
            return Ok(());
        };
        let allowed = match need {
            Need::Read => matches!(token.role, Role::Viewer | Role::Operator),
            Need::Work => token.role == Role::Worker,
            Need::Operate => token.role == Role::Operator,
        };
        if allowed {
            return Ok(());
        }
        let wanted = match need {
            Need::Read => "viewer or operator",
            Need::Work => "worker",
            Need::Operate => "operator",
        };
        Err(format!(
            "token {:?} has role {}; this needs the {wanted} role",
            token.name,
            token.role.name()
        ))
    }

    /// Whether a worker caller may act on work of `kind`.
    pub(crate) fn may_work_on(&self, kind: &str) -> Result<(), String> {
        match self {
            Caller::Token(Token {
                name,
                kinds: Some(kinds),
                ..
            }) if !kinds.contains(kind) => Err(format!(
                "token {name:?} may work on kinds {kinds:?}, not {kind:?}"
            )),
            _ => Ok(()),
        }
    }

    /// Its name, as an operator action records it: the token's, or `local` on an open
    /// listener.
    pub(crate) fn name(&self) -> String {
        match self {
            Caller::Open => "local".into(),
            Caller::Token(token) => token.name.clone(),
        }
    }

    /// Who it is, for the log line of a change it makes.
    pub(crate) fn actor(&self) -> String {
        match self {
            Caller::Open => "a local HTTP client".into(),
            Caller::Token(token) => format!("token {:?} over HTTP", token.name),
        }
    }
}

/// The tokens a listener accepts; empty for an open one.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tokens {
    tokens: Vec<Token>,
    open: bool,
}

impl Tokens {
    /// An open listener: no token needed.
    pub(crate) fn open() -> Tokens {
        Tokens {
            tokens: Vec::new(),
            open: true,
        }
    }

    /// Reads a tokens file. Errors name the file and what is wrong with it.
    pub(crate) fn load(path: &Path) -> Result<Tokens, String> {
        let shown = path.display();
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(path)
                .map_err(|e| format!("tokens file {shown}: cannot read it: {e}"))?;
            if meta.mode() & 0o077 != 0 {
                return Err(format!(
                    "tokens file {shown}: others may read it (mode {:o}); it holds secrets, so \
                     keel reads it only when its owner alone can (chmod 600 {shown})",
                    meta.mode() & 0o777
                ));
            }
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("tokens file {shown}: cannot read it: {e}"))?;
        Tokens::parse(&text).map_err(|e| format!("tokens file {shown}: {e}"))
    }

    /// Parses a tokens file's text.
    pub(crate) fn parse(text: &str) -> Result<Tokens, String> {
        let file: TokensFile = toml::from_str(text).map_err(|e| e.to_string())?;
        if file.token.is_empty() {
            return Err("it names no [[token]]".into());
        }
        let mut names = BTreeSet::new();
        let mut secrets = std::collections::BTreeMap::new();
        for token in &file.token {
            // One secret, two roles: whoever holds it would get whichever role matched last.
            if let Some(first) = secrets.insert(token.secret.as_str(), token.name.as_str()) {
                return Err(format!(
                    "tokens {first:?} and {:?} have the same secret; each token needs its own",
                    token.name
                ));
            }
            if token.secret.chars().count() < SECRET_MIN_CHARS {
                return Err(format!(
                    "token {:?}: its secret is shorter than {SECRET_MIN_CHARS} characters",
                    token.name
                ));
            }
            if !names.insert(token.name.as_str()) {
                return Err(format!("token {:?} is named twice", token.name));
            }
            if token.kinds.is_some() && token.role != Role::Worker {
                return Err(format!(
                    "token {:?}: `kinds` limits workers only, and its role is {}",
                    token.name,
                    token.role.name()
                ));
            }
        }
        Ok(Tokens {
            tokens: file.token,
            open: false,
        })
    }

    /// Who sent `authorization` (the header's value, if any). `Err` is the 401 message.
    pub(crate) fn caller(&self, authorization: Option<&str>) -> Result<Caller, String> {
        if self.open {
            return Ok(Caller::Open);
        }
        let Some(header) = authorization else {
            return Err("this API needs `Authorization: Bearer TOKEN`".into());
        };
        let Some(secret) = header.strip_prefix("Bearer ") else {
            return Err("the Authorization header must be `Bearer TOKEN`".into());
        };
        // Every token is compared, in constant time, so timing tells nothing about which one
        // came close.
        let mut found = None;
        for token in &self.tokens {
            if bool::from(token.secret.as_bytes().ct_eq(secret.trim().as_bytes())) {
                found = Some(token);
            }
        }
        found
            .cloned()
            .map(Caller::Token)
            .ok_or_else(|| "unknown token".to_string())
    }
}

/// The `[http]` settings: where to listen, and the tokens file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HttpSettings {
    pub(crate) listen: std::net::SocketAddr,
    pub(crate) tokens: Option<PathBuf>,
    /// `[http] advertise`: where other hosts reach this API (checked by
    /// `anyhost::advertise_url`); derived from the bound address if unset.
    pub(crate) advertise: Option<String>,
}

impl HttpSettings {
    /// The settings a daemon serves with: `--http ADDR` (`flag`) overrides keel.toml's
    /// `[http] listen` and keeps the rest of its `[http]` section.
    pub(crate) fn merged(
        flag: Option<std::net::SocketAddr>,
        file: Option<HttpSettings>,
    ) -> Option<HttpSettings> {
        match (flag, file) {
            (Some(listen), Some(file)) => Some(HttpSettings { listen, ..file }),
            (Some(listen), None) => Some(HttpSettings {
                listen,
                tokens: None,
                advertise: None,
            }),
            (None, file) => file,
        }
    }

    /// The tokens a listener with these settings accepts. A non-loopback listener without a
    /// tokens file is refused.
    pub(crate) fn tokens(&self) -> Result<Tokens, String> {
        match &self.tokens {
            Some(path) => Tokens::load(path),
            None if self.listen.ip().is_loopback() => Ok(Tokens::open()),
            None => Err(format!(
                "{} is not a loopback address, and anyone who reaches it could change jobs: \
                 name a tokens file in keel.toml's [http] section, `tokens = \"FILE\"` \
                 (docs/api.md, \"Authentication and roles\")",
                self.listen
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        [[token]]
        name = "ops"
        role = "operator"
        secret = "0123456789abcdef-ops"

        [[token]]
        name = "render"
        role = "worker"
        kinds = ["render"]
        secret = "0123456789abcdef-render"

        [[token]]
        name = "dash"
        role = "viewer"
        secret = "0123456789abcdef-dash"
    "#;

    #[test]
    fn roles_allow_what_the_table_says() {
        let tokens = Tokens::parse(FILE).unwrap();
        let ops = tokens.caller(Some("Bearer 0123456789abcdef-ops")).unwrap();
        let render = tokens
            .caller(Some("Bearer 0123456789abcdef-render"))
            .unwrap();
        let dash = tokens.caller(Some("Bearer 0123456789abcdef-dash")).unwrap();
        assert!(ops.may(Need::Operate).is_ok() && ops.may(Need::Read).is_ok());
        assert!(ops.may(Need::Work).unwrap_err().contains("worker role"));
        assert!(render.may(Need::Work).is_ok());
        assert!(render.may(Need::Read).is_err() && render.may(Need::Operate).is_err());
        assert!(render.may_work_on("render").is_ok());
        assert!(render.may_work_on("mail").unwrap_err().contains("\"mail\""));
        assert!(dash.may(Need::Read).is_ok());
        let refused = dash.may(Need::Operate).unwrap_err();
        assert!(
            refused.contains("\"dash\"") && refused.contains("operator"),
            "{refused}"
        );
        assert_eq!(ops.actor(), "token \"ops\" over HTTP");
    }

    #[test]
    fn missing_wrong_and_malformed_tokens_are_refused() {
        let tokens = Tokens::parse(FILE).unwrap();
        assert!(tokens.caller(None).unwrap_err().contains("Bearer"));
        assert!(tokens.caller(Some("Basic abc")).is_err());
        assert_eq!(
            tokens
                .caller(Some("Bearer 0123456789abcdef-nope"))
                .unwrap_err(),
            "unknown token"
        );
        assert!(matches!(Tokens::open().caller(None).unwrap(), Caller::Open));
    }

    #[test]
    fn bad_tokens_files_are_refused_by_name() {
        let short = "[[token]]\nname = \"a\"\nrole = \"viewer\"\nsecret = \"short\"\n";
        assert!(Tokens::parse(short)
            .unwrap_err()
            .contains("shorter than 16"));
        let same = format!("{FILE}\n[[token]]\nname = \"again\"\nrole = \"operator\"\nsecret = \"0123456789abcdef-render\"\n");
        assert!(Tokens::parse(&same).unwrap_err().contains("same secret"));
        let twice = format!("{FILE}\n[[token]]\nname = \"ops\"\nrole = \"viewer\"\nsecret = \"0123456789abcdef-x\"\n");
        assert!(Tokens::parse(&twice).unwrap_err().contains("named twice"));
        let role = "[[token]]\nname = \"a\"\nrole = \"admin\"\nsecret = \"0123456789abcdef\"\n";
        assert!(Tokens::parse(role).unwrap_err().contains("admin"));
        let kinds = "[[token]]\nname = \"a\"\nrole = \"viewer\"\nkinds = [\"x\"]\nsecret = \"0123456789abcdef\"\n";
        assert!(Tokens::parse(kinds).unwrap_err().contains("workers only"));
        assert!(Tokens::parse("").unwrap_err().contains("no [[token]]"));
    }

    #[test]
    fn a_public_listener_needs_a_tokens_file_and_a_readable_one_is_refused() {
        let public = HttpSettings {
            listen: "0.0.0.0:8080".parse().unwrap(),
            tokens: None,
            advertise: None,
        };
        assert!(public.tokens().unwrap_err().contains("not a loopback"));
        let local = HttpSettings {
            listen: "127.0.0.1:8080".parse().unwrap(),
            tokens: None,
            advertise: None,
        };
        assert!(local.tokens().unwrap().open);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, FILE).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Tokens::load(&path).unwrap_err().contains("chmod 600"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Tokens::load(&path).unwrap().tokens.len(), 3);
    }
}
