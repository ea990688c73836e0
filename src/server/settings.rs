//! What the HTTP client is configured with: [`HttpSettings`] and its parts. A leaf of
//! `server/`, so the request layer (`client`) and the API (`http`) both read it without
//! importing each other.

use super::backoff::{Backoff, RetryPolicy};
use crate::config::Config;
use std::path::PathBuf;
use std::time::Duration;

/// Largest fragment of a log sent in one request (PROTOCOL §6.2: 1 MiB).
pub const FRAGMENT_SIZE: usize = 1024 * 1024;

/// Largest `log_data` of one fragment as sent, escaped for JSON. Text that escapes badly
/// (a control byte becomes `\u00XX`, six bytes) would otherwise make a 1 MiB fragment a
/// 6 MiB body; with this cut a fragment stays far below what the server can store as one
/// MongoDB document (16 MiB; its text is never longer than the escaped text) and what a
/// production ingress takes (20 MiB), and the two bodies the live-output pipeline holds
/// stay within 6 MiB together (the agent within 16 MiB of RSS whatever a job prints). A
/// fragment whose escaped text would be longer is cut shorter than the fragment size.
pub const MAX_FRAGMENT_TEXT: usize = 3 * 1024 * 1024;

/// Per-request time limits (PROTOCOL §1.2). Every request also has the connect limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Most calls: 30 s.
    pub default: Duration,
    /// `POST .../log/<type>`: 60 s.
    pub log: Duration,
    /// Attachments download and artifact upload: 600 s.
    pub transfer: Duration,
    /// `POST /v1/oauth2/refresh`: 15 s.
    pub refresh: Duration,
    /// `GET /v1`: 10 s.
    pub health: Duration,
    /// Establishing a connection (capped by the request's own limit): 10 s.
    pub connect: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            default: Duration::from_secs(30),
            log: Duration::from_secs(60),
            transfer: Duration::from_secs(600),
            refresh: Duration::from_secs(15),
            health: Duration::from_secs(10),
            connect: Duration::from_secs(10),
        }
    }
}

/// Everything [`HttpServer`] needs to know.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    /// `server_address`; `http://` is prepended unless it starts with `http`
    /// (any case). A path prefix is kept: endpoints are joined under it.
    pub base_url: String,
    /// `agent_id`: the agent's name in paths and in the `agent_name` cookie.
    pub agent_id: String,
    /// The refresh-token file (`--token-file`); `None` sends no token at all.
    pub token_file: Option<PathBuf>,
    /// While output flows, at most one live-output post per this interval (1 s).
    pub output_post_interval: Duration,
    pub timeouts: Timeouts,
    /// Attempts and back-off for requests that are safe to repeat; the back-off (not the
    /// attempt count) also paces the resending of live output.
    pub retry: RetryPolicy,
    /// Back-off between failed token refreshes (1 s doubling to 60 s).
    pub refresh_backoff: Backoff,
    /// How long [`Server::finish_output`] waits for a phase's output to be delivered (5 s).
    pub finish_wait: Duration,
    /// Largest log fragment in bytes of the log file (1 MiB; at least 16).
    pub fragment_size: usize,
    /// Live output: the next fragment is read and built while the previous one is on the
    /// wire (true). False sends one fragment, then prepares the next (for comparisons).
    pub prepare_ahead: bool,
}

impl HttpSettings {
    /// The defaults of PROTOCOL §1.2 for `server_address` and `agent_id`.
    pub fn new(server_address: &str, agent_id: &str) -> HttpSettings {
        HttpSettings {
            base_url: server_address.to_string(),
            agent_id: agent_id.to_string(),
            token_file: None,
            output_post_interval: Duration::from_secs(1),
            timeouts: Timeouts::default(),
            retry: RetryPolicy::default(),
            refresh_backoff: Backoff {
                base: Duration::from_secs(1),
                cap: Duration::from_secs(60),
            },
            finish_wait: Duration::from_secs(5),
            fragment_size: FRAGMENT_SIZE,
            prepare_ahead: true,
        }
    }

    /// The defaults, with `server_address`, `agent_id`, `token_file` and
    /// `output_post_interval` from the agent's config.
    pub fn from_config(config: &Config) -> HttpSettings {
        let mut settings = HttpSettings::new(&config.server_address, &config.agent_id);
        settings.token_file = config.token_file.as_ref().map(PathBuf::from);
        settings.output_post_interval = config.output_post_period();
        settings
    }
}
