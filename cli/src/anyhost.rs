//! Every command from any host of a shared store (`--store postgres`), and `keel status`.
//!
//! The leading daemon advertises where its HTTP API is in the leadership lease (the
//! `keel_leader.api` column): `[http] advertise` if keel.toml sets it, else derived from the
//! bound listener ([`derived`]). A command that changes something, run on a host whose daemon
//! does not lead (or that runs none), reads the lease and sends the command there through the
//! `--server` client ([`forward`]), saying so once on stderr. A leader that serves no API is
//! named in the refusal. A command never acts on the shared store itself: restoring a scheduler
//! would raise the writer epoch and depose the leader.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use serde_json::Value;

use crate::cli::StoreKind;
use crate::error::Failure;
use crate::place::{Holder, Place};
use crate::protocol::{from_value, DaemonStatus, Request};
use crate::remote::Remote;

/// Why `[http] advertise` is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum AdvertiseError {
    /// Not `http://` or `https://`.
    Scheme(String),
    /// No host after the scheme.
    NoHost(String),
    /// A path, query or fragment: the API is always at `/api/v1` under it.
    Path(String),
    /// Whitespace or a control character.
    Unprintable(String),
}

impl std::fmt::Display for AdvertiseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdvertiseError::Scheme(url) => write!(
                f,
                "{url:?} is not an http:// or https:// URL, such as \"http://host-a.internal:8080\""
            ),
            AdvertiseError::NoHost(url) => {
                write!(
                    f,
                    "{url:?} names no host, as in \"http://host-a.internal:8080\""
                )
            }
            AdvertiseError::Path(url) => write!(
                f,
                "{url:?} has a path, query or fragment; give the daemon's base URL only, such as \
                 \"http://host-a.internal:8080\" (the API is under /api/v1 there)"
            ),
            AdvertiseError::Unprintable(url) => {
                write!(f, "{url:?} holds whitespace or a control character")
            }
        }
    }
}

/// `[http] advertise`: the base URL other hosts reach this daemon's API at, without a trailing
/// `/`.
pub(crate) fn advertise_url(text: &str) -> Result<String, AdvertiseError> {
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(AdvertiseError::Unprintable(text.to_string()));
    }
    let rest = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
        .ok_or_else(|| AdvertiseError::Scheme(text.to_string()))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#']) {
        return Err(AdvertiseError::Path(text.to_string()));
    }
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    if host.is_empty() || host.starts_with(':') {
        return Err(AdvertiseError::NoHost(text.to_string()));
    }
    Ok(text.trim_end_matches('/').to_string())
}

/// The URL a leader bound to `bound` advertises when keel.toml says none: the address itself if
/// it is a specific IP, else `http://HOST:PORT`, HOST being `KEEL_HOSTNAME` or the host name.
pub(crate) fn derived(bound: SocketAddr) -> String {
    if bound.ip().is_unspecified() {
        let worker = crate::direct::daemon_worker(StoreKind::Postgres);
        let host = worker.strip_prefix("local:").unwrap_or(&worker);
        format!("http://{host}:{}", bound.port())
    } else {
        // `[::1]:8080` for IPv6.
        format!("http://{bound}")
    }
}

/// What a leader listening with `settings` advertises once bound to `bound`.
pub(crate) fn advertised(settings: &crate::http::auth::HttpSettings, bound: SocketAddr) -> String {
    settings.advertise.clone().unwrap_or_else(|| derived(bound))
}

/// What a daemon about to take the lead can advertise before its listener is bound: `None`
/// without an API, or when the system picks the port (`:0`; advertised once bound).
pub(crate) fn planned(settings: Option<&crate::http::auth::HttpSettings>) -> Option<String> {
    let settings = settings?;
    match &settings.advertise {
        Some(url) => Some(url.clone()),
        None if settings.listen.port() == 0 => None,
        None => Some(derived(settings.listen)),
    }
}

/// Sends a command that changes something to the leader of the Postgres store in `place`, at
/// the API it advertises; this host's daemon does not lead (or none runs here). Says once, on
/// stderr, where it went. Refused (bad input) when nobody leads or the leader serves no API.
pub(crate) fn forward(place: &Place, request: &Request) -> Result<Value, Failure> {
    static LEADER: OnceLock<Arc<Remote>> = OnceLock::new();
    if let Some(remote) = LEADER.get() {
        return remote.call(request);
    }
    let lease = crate::lead::live_lease(place)?;
    let Some(lease) = lease else {
        return Err(Failure::input(
            "no daemon leads the postgres store, and keel never acts on a shared store \
             directly (that would depose a leader): start one (`keel run --store postgres`), \
             then run the command again",
        ));
    };
    let Some(api) = lease.api.as_deref() else {
        return Err(Failure::input(format!(
            "{} leads the postgres store (term {}) but serves no HTTP API, so this command \
             cannot be sent to it from here: run it on the leader's host, or start the leaders \
             with --http ADDR (or keel.toml's [http] listen); keel never acts on a shared store \
             directly, since that would depose the leader",
            lease.holder, lease.term
        )));
    };
    let remote = Arc::new(Remote::new(api, place.token_file.as_deref())?);
    eprintln!(
        "keel: this host's daemon does not lead the postgres store: sending the command to the \
         leader {} (term {}) at {api}",
        lease.holder, lease.term
    );
    let remote = LEADER.get_or_init(|| remote);
    remote.call(request)
}

/// Where `keel status` got its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Via {
    /// This host's daemon, on its control socket.
    Socket,
    /// The daemon `--server` names.
    Server,
    /// The database: no daemon answers here (Postgres only).
    Database,
    /// Nothing: no daemon runs (fs, sled).
    Nothing,
}

impl Via {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Via::Socket => "socket",
            Via::Server => "server",
            Via::Database => "database",
            Via::Nothing => "none",
        }
    }
}

/// What `keel status` found.
#[derive(Clone, Debug)]
pub(crate) struct Found {
    pub(crate) via: Via,
    /// The daemon's, or this process's when no daemon answered.
    pub(crate) status: DaemonStatus,
    /// With no daemon answering: the pid of a daemon standing by here (it holds the data
    /// directory's lock but opens no socket until it leads).
    pub(crate) standby: Option<u32>,
    /// The data directory (not with `--server`).
    pub(crate) dir: Option<std::path::PathBuf>,
}

impl Found {
    /// The answering daemon's state: `leading`, `standing_by`, `running` (fs, sled) or
    /// `not_running`.
    pub(crate) fn daemon(&self) -> &'static str {
        match (self.via, &self.status.leader) {
            (Via::Socket | Via::Server, Some(leader)) if leader.leading => "leading",
            (Via::Socket | Via::Server, Some(_)) => "standing_by",
            (Via::Socket | Via::Server, None) => "running",
            _ if self.standby.is_some() => "standing_by",
            _ => "not_running",
        }
    }
}

/// `keel status`: asks the daemon (this host's, or `--server`'s); with none, reads the lease
/// on Postgres, and says no daemon runs on fs and sled.
pub(crate) fn status(place: &Place) -> Result<Found, Failure> {
    if let Some(remote) = &place.remote {
        return Ok(Found {
            via: Via::Server,
            status: from_value(remote.call(&Request::Status)?)?,
            standby: None,
            dir: None,
        });
    }
    let dir = Some(place.dir.clone());
    if place.dir.is_dir() {
        if let Some(mut client) = crate::client::Client::connect(place)? {
            return Ok(Found {
                via: Via::Socket,
                status: from_value(client.call(&Request::Status)?)?,
                standby: None,
                dir,
            });
        }
    }
    let standby = match crate::place::lock_holder(place) {
        Some(Holder::Daemon(pid)) => Some(pid),
        _ => None,
    };
    let postgres = place.kind == StoreKind::Postgres;
    let status = DaemonStatus {
        pid: None,
        store: place.kind.name().into(),
        worker: crate::direct::daemon_worker(place.kind),
        leader: if postgres {
            Some(crate::lead::current(place, false)?)
        } else {
            None
        },
    };
    Ok(Found {
        via: if postgres {
            Via::Database
        } else {
            Via::Nothing
        },
        status,
        // On fs and sled a daemon holding the lock without a socket is starting.
        standby: standby.filter(|_| postgres),
        dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_advertised_url_is_a_base_url_with_a_host() {
        assert_eq!(
            advertise_url("http://host-a.internal:8080/"),
            Ok("http://host-a.internal:8080".to_string())
        );
        assert_eq!(
            advertise_url("https://keel.example.com"),
            Ok("https://keel.example.com".to_string())
        );
        assert!(matches!(
            advertise_url("host-a:8080"),
            Err(AdvertiseError::Scheme(_))
        ));
        assert!(matches!(
            advertise_url("http://:8080"),
            Err(AdvertiseError::NoHost(_))
        ));
        assert!(matches!(
            advertise_url("http://host-a:8080/api/v1"),
            Err(AdvertiseError::Path(_))
        ));
        assert!(matches!(
            advertise_url("http://host a:8080"),
            Err(AdvertiseError::Unprintable(_))
        ));
    }

    #[test]
    fn a_specific_address_is_advertised_as_bound_and_a_wildcard_by_host_name() {
        let bound: SocketAddr = "10.0.0.5:4711".parse().unwrap();
        assert_eq!(derived(bound), "http://10.0.0.5:4711");
        let v6: SocketAddr = "[::1]:8080".parse().unwrap();
        assert_eq!(derived(v6), "http://[::1]:8080");
        let any: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let host = crate::direct::daemon_worker(StoreKind::Postgres);
        let host = host.strip_prefix("local:").unwrap();
        assert_eq!(derived(any), format!("http://{host}:8080"));
    }

    #[test]
    fn a_port_the_system_picks_is_advertised_only_once_bound() {
        use crate::http::auth::HttpSettings;
        let at = |listen: &str, advertise: Option<&str>| HttpSettings {
            listen: listen.parse().unwrap(),
            tokens: None,
            advertise: advertise.map(str::to_string),
        };
        assert_eq!(planned(None), None);
        assert_eq!(planned(Some(&at("127.0.0.1:0", None))), None);
        assert_eq!(
            planned(Some(&at("127.0.0.1:8080", None))).as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(
            planned(Some(&at("0.0.0.0:0", Some("http://lb.internal:80")))).as_deref(),
            Some("http://lb.internal:80"),
            "an advertised URL is known before binding"
        );
        let bound = "127.0.0.1:4711".parse().unwrap();
        assert_eq!(
            advertised(&at("127.0.0.1:0", None), bound),
            "http://127.0.0.1:4711"
        );
    }
}
