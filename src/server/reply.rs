//! What the server answered: a [`Reply`] whose body is streamed, saved or discarded, and
//! the pure readers of the answers the client itself looks into (a job's state, the
//! refreshed access token, a short error detail).

use super::{ServerError, ServerErrorKind};
use serde_json::Value;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

/// Largest answer read into memory (a job document, an agent record, an error body).
const MAX_ANSWER: u64 = 64 * 1024 * 1024;

/// The most of an unneeded success answer read to reuse its connection (see
/// [`Reply::discard`]).
const MAX_DISCARDED: u64 = 64 * 1024;

/// An answer; error answers have their body already read into `detail`.
pub(super) struct Reply {
    pub(super) status: u16,
    /// Whether the request that got this answer carried a token.
    pub(super) with_token: bool,
    pub(super) body: ReplyBody,
}

pub(super) enum ReplyBody {
    Stream(Box<ureq::Body>),
    Detail(String),
}

pub(super) enum SaveError {
    Read(io::Error),
    Write(io::Error),
}

impl Reply {
    /// The server's explanation for an error answer (`""` for a success).
    pub(super) fn detail(&self) -> &str {
        match &self.body {
            ReplyBody::Detail(d) => d,
            ReplyBody::Stream(_) => "",
        }
    }

    /// Done with a success answer whose body is not needed (`{}`, `OK`): reads what is left
    /// of it, at most [`MAX_DISCARDED`] bytes, so that its connection goes back to the pool.
    /// A body dropped unread closes the connection, and the next request opens a new one
    /// (over HTTPS, with a new TLS handshake): several per phase.
    pub(super) fn discard(self) {
        if let ReplyBody::Stream(body) = self.body {
            let _ = io::copy(&mut body.into_reader().take(MAX_DISCARDED), &mut io::sink());
        }
    }

    pub(super) fn read_all(self, what: &str) -> Result<Vec<u8>, ServerError> {
        match self.body {
            ReplyBody::Detail(d) => Ok(d.into_bytes()),
            ReplyBody::Stream(mut body) => body
                .with_config()
                .limit(MAX_ANSWER)
                .read_to_vec()
                .map_err(|e| {
                    let kind = if matches!(e, ureq::Error::BodyExceedsLimit(_)) {
                        ServerErrorKind::Malformed
                    } else {
                        ServerErrorKind::Unavailable
                    };
                    ServerError::new(kind, what, format!("reading the answer failed: {e}"))
                }),
        }
    }

    pub(super) fn save_to(self, dest: &Path) -> Result<u64, SaveError> {
        let ReplyBody::Stream(body) = self.body else {
            return Err(SaveError::Read(io::Error::other("no body")));
        };
        let mut reader = body.into_reader();
        let mut file = File::create(dest).map_err(SaveError::Write)?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SaveError::Read(e)),
            };
            file.write_all(&buf[..n]).map_err(SaveError::Write)?;
            total += n as u64;
        }
        file.sync_all().map_err(SaveError::Write)?;
        Ok(total)
    }

    /// The `job_state` of a `GET /v1/result/<id>` answer (see [`parse_job_state`]).
    pub(super) fn job_state(self, what: &str) -> Result<Option<String>, ServerError> {
        let ReplyBody::Stream(body) = self.body else {
            return Ok(None);
        };
        parse_job_state(body.into_reader(), what)
    }
}

/// The `job_state` of a `GET /v1/result/<id>` answer, parsed as a stream: the answer
/// carries the job's whole output, which need not fit in memory. Reading stops as soon as
/// `job_state` has been seen (the real server sorts the keys, so it comes before the
/// `provision_`, `setup_` and `test_` logs); the rest of the answer is left unread.
/// `Ok(None)` for an empty answer, an object without `job_state` or a `job_state` that is
/// not a string; an error for anything else that is not a JSON object.
pub(crate) fn parse_job_state(body: impl Read, what: &str) -> Result<Option<String>, ServerError> {
    let mut counted = Counted {
        inner: body,
        seen_non_space: false,
    };
    let found = std::cell::RefCell::new(None);
    // serde_json reads byte by byte: give it large blocks.
    let buffered = io::BufReader::with_capacity(64 * 1024, &mut counted);
    let mut de = serde_json::Deserializer::from_reader(buffered);
    let parsed = serde::Deserializer::deserialize_map(&mut de, JobStateOnly { found: &found });
    if let Some(state) = found.into_inner() {
        return Ok(state);
    }
    match parsed {
        Ok(()) => Ok(None),
        Err(e) if !counted.seen_non_space && e.is_eof() => Ok(None),
        Err(e) if e.is_io() => Err(ServerError::new(
            ServerErrorKind::Unavailable,
            what,
            format!("reading the answer failed: {e}"),
        )),
        Err(e) => Err(ServerError::new(
            ServerErrorKind::Malformed,
            what,
            format!("the answer is not a JSON object with a job_state: {e}"),
        )),
    }
}

/// Walks a JSON object until its `job_state`, stores it in `found` and stops the parse
/// there (by an error the caller ignores once `found` is set).
struct JobStateOnly<'a> {
    found: &'a std::cell::RefCell<Option<Option<String>>>,
}

impl<'de> serde::de::Visitor<'de> for JobStateOnly<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key == "job_state" {
                let state = match map.next_value::<Value>()? {
                    Value::String(s) => Some(s),
                    _ => None,
                };
                *self.found.borrow_mut() = Some(state);
                return Err(serde::de::Error::custom(
                    "job_state found; the rest is not read",
                ));
            }
            map.next_value::<serde::de::IgnoredAny>()?;
        }
        Ok(())
    }
}

/// Remembers whether anything but whitespace went through, to tell an empty answer from a
/// truncated one.
struct Counted<R> {
    inner: R,
    seen_non_space: bool,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if !self.seen_non_space && buf[..n].iter().any(|b| !b.is_ascii_whitespace()) {
            self.seen_non_space = true;
        }
        Ok(n)
    }
}

/// The access token of a 200 answer to `POST /v1/oauth2/refresh`: a JSON object with a
/// non-empty string `access_token` (other keys, e.g. `refresh_token`, are ignored).
pub(crate) fn parse_refresh_answer(body: &[u8], what: &str) -> Result<String, String> {
    let parsed: Value = serde_json::from_slice(body)
        .map_err(|e| format!("{what} answered 200 with a body that is not JSON: {e}"))?;
    match parsed.get("access_token") {
        Some(Value::String(t)) if !t.is_empty() => Ok(t.clone()),
        _ => Err(format!("{what} answered 200 without an access_token")),
    }
}

/// A short rendering of an error body: `message` and `detail` of a JSON error, else the
/// text, truncated to 500 bytes (and an ellipsis); never empty.
pub(crate) fn detail_of(body: &[u8]) -> String {
    const MAX: usize = 500;
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) {
        let message = map.get("message").and_then(Value::as_str);
        let detail = map.get("detail").filter(|d| match d {
            Value::Null => false,
            Value::Object(o) => !o.is_empty(),
            Value::String(s) => !s.is_empty(),
            _ => true,
        });
        let text = match (message, detail) {
            (Some(m), Some(Value::String(d))) => format!("{m}: {d}"),
            (Some(m), Some(d)) => format!("{m}: {d}"),
            (Some(m), None) => m.to_string(),
            (None, Some(Value::String(d))) => d.clone(),
            (None, Some(d)) => d.to_string(),
            (None, None) => Value::Object(map).to_string(),
        };
        return truncate(text, MAX);
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(empty body)".to_string()
    } else {
        truncate(text.to_string(), MAX)
    }
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_are_short_and_readable() {
        assert_eq!(
            detail_of(br#"{"message": "Validation error", "detail": {"json": {"x": ["Unknown field."]}}}"#),
            r#"Validation error: {"json":{"x":["Unknown field."]}}"#
        );
        assert_eq!(detail_of(br#"{"message": "Nope", "detail": {}}"#), "Nope");
        assert_eq!(detail_of(b"Invalid job id\n"), "Invalid job id");
        assert_eq!(detail_of(b""), "(empty body)");
        let long = "é".repeat(600);
        let d = detail_of(long.as_bytes());
        assert!(d.len() <= 504 && d.ends_with('…'));
    }
}
