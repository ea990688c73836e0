//! The server's address and paths as the client writes them: the base URL from
//! `server_address`, percent-encoded path segments, a URL without credentials for
//! messages, and the fixed endpoint class each request counts under in the metrics.

use super::request::Method;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// The endpoint class of a request, for the request-failure metric: a few fixed words,
/// never a job id or an agent name.
pub(super) fn endpoint_class(method: Method, path: &str) -> &'static str {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (_, ["v1", "oauth2", ..]) => "token",
        (_, ["v1", "agents", "data", ..]) => "agent_data",
        (_, ["v1", "agents", "provision_logs", ..]) => "provision_logs",
        (_, ["v1", "agents", ..]) => "advertise",
        (_, ["v1", "job", _, "attachments"]) => "attachments",
        (_, ["v1", "job", _, "events"]) => "events",
        (Method::Get, ["v1", "job"]) => "job_poll",
        (_, ["v1", "result", _, "log", ..]) => "log",
        (_, ["v1", "result", _, "artifact"]) => "artifact",
        (Method::Get, ["v1", "result", _] | ["v1", "result", _, "status"]) => "job_state",
        (_, ["v1", "result", _]) => "result",
        _ => "other",
    }
}

/// A URL without any `user:password@`, for messages.
pub(super) fn without_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host_and_path = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            format!("{scheme}://{host_and_path}")
        }
        None => url.to_string(),
    }
}

pub(super) fn is_https(base: &str) -> bool {
    base.get(..8)
        .is_some_and(|p| p.eq_ignore_ascii_case("https://"))
}

/// `server_address` as a base URL: `http://` prepended unless it starts with `http` (any
/// case), trailing `/` removed, any path prefix kept.
pub fn normalize_base(server_address: &str) -> String {
    let address = server_address.trim();
    let has_scheme = address
        .get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case("http"));
    let url = if has_scheme {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    url.trim_end_matches('/').to_string()
}

/// What a path segment keeps as it is: RFC 3986's unreserved characters (letters, digits,
/// `-`, `.`, `_`, `~`); every other byte is percent-encoded.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes one path segment (job ids and agent names are meant to need nothing).
pub(super) fn seg(segment: &str) -> String {
    utf8_percent_encode(segment, SEGMENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_classes_name_no_ids() {
        for (method, path, class) in [
            (Method::Get, "/v1/job", "job_poll"),
            (Method::Get, "/v1/job/abc/attachments", "attachments"),
            (Method::Post, "/v1/job/abc/events", "events"),
            (Method::Post, "/v1/agents/data/dut-1", "agent_data"),
            (Method::Get, "/v1/agents/data/dut-1", "agent_data"),
            (Method::Post, "/v1/agents/queues", "advertise"),
            (
                Method::Post,
                "/v1/agents/provision_logs/dut-1",
                "provision_logs",
            ),
            (Method::Post, "/v1/result/abc/log/output", "log"),
            (Method::Post, "/v1/result/abc/artifact", "artifact"),
            (Method::Get, "/v1/result/abc", "job_state"),
            (Method::Get, "/v1/result/abc/status", "job_state"),
            (Method::Post, "/v1/result/abc", "result"),
            (Method::Post, "/v1/oauth2/refresh", "token"),
            (Method::Get, "/v1", "other"),
        ] {
            assert_eq!(endpoint_class(method, path), class, "{path}");
        }
    }

    #[test]
    fn base_keeps_prefix_and_adds_scheme() {
        assert_eq!(normalize_base("tf.example.com"), "http://tf.example.com");
        assert_eq!(normalize_base("HTTPS://tf/"), "HTTPS://tf");
        assert_eq!(
            normalize_base(" http://host:8000/prefix/ "),
            "http://host:8000/prefix"
        );
        assert_eq!(normalize_base("é"), "http://é");
    }

    #[test]
    fn segments_are_escaped() {
        assert_eq!(seg("2bac1457-7d5e"), "2bac1457-7d5e");
        assert_eq!(seg("a/b?c d"), "a%2Fb%3Fc%20d");
        assert_eq!(seg("dev_01.lab~x"), "dev_01.lab~x");
        assert_eq!(seg("é%#"), "%C3%A9%25%23");
    }
}
