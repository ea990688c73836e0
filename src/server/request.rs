//! One request to the server, described so that it can be sent again: its method, path,
//! body, time limit, whether it may be repeated and whether it carries the access token;
//! and the streamed `multipart/form-data` body of an upload.

use serde_json::Value;
use std::fs::File;
use std::io::{self, Cursor, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Method {
    Get,
    Post,
}

/// Which failures a request may be repeated after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Repeat {
    /// Repeating has no further effect: after any transport error and any 5xx.
    Idempotent,
    /// Repeating may duplicate: only when the server surely did not act (no connection,
    /// or it answered 5xx).
    Unsafe,
    /// Only when no connection was made.
    Once,
    /// A log fragment: like `Unsafe`, and also after an ambiguous failure, with a warning,
    /// because a lost fragment is worse than a rare duplicate (PROTOCOL §3.11).
    Fragment,
}

pub(super) enum Payload {
    None,
    Json(Vec<u8>),
    /// A JSON body that starts `from` bytes into the buffer (a log fragment built in place,
    /// see [`FragmentBody`](super::fragment::FragmentBody)).
    JsonFrom {
        body: Vec<u8>,
        from: usize,
    },
    /// A `multipart/form-data` body with one part `file`, streamed from `path`.
    Multipart {
        path: PathBuf,
        boundary: String,
    },
}

/// Whether a request needs the access token (PROTOCOL §1.3, the role table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Auth {
    /// An agent endpoint: the token goes along, renewed first when it is due.
    Required,
    /// An endpoint any role may read, anonymous callers too while the server has OIDC off
    /// (the job state, the agent record): the cached token goes along while it is fresh,
    /// none otherwise, and none is obtained or renewed for it, so that a phase that only
    /// checks for cancellation never refreshes a token. Once the server refuses such a
    /// request sent without a token (OIDC on), these requests are treated as
    /// [`Auth::Required`] for the rest of the agent's life.
    Optional,
    /// Never a token (the health probe, the refresh itself).
    Never,
}

/// One request, replayable.
pub(super) struct Req {
    pub(super) method: Method,
    /// `/v1/...`, segments already escaped.
    pub(super) path: String,
    pub(super) query: Vec<(&'static str, String)>,
    pub(super) payload: Payload,
    pub(super) timeout: Option<Duration>,
    pub(super) repeat: Repeat,
    /// Attempts in total; `None` uses the retry policy.
    pub(super) attempts: Option<u32>,
    pub(super) auth: Auth,
    /// What the request carries, for warnings about possible duplicates.
    pub(super) label: Option<String>,
}

impl Req {
    pub(super) fn get(path: String) -> Req {
        Req {
            method: Method::Get,
            path,
            query: Vec::new(),
            payload: Payload::None,
            timeout: None,
            repeat: Repeat::Idempotent,
            attempts: None,
            auth: Auth::Required,
            label: None,
        }
    }

    pub(super) fn post_json(path: String, body: &Value) -> Req {
        // Serialising a `Value` cannot fail (its map keys are strings).
        let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
        Req {
            method: Method::Post,
            payload: Payload::Json(bytes),
            ..Req::get(path)
        }
    }

    pub(super) fn timeout(mut self, timeout: Duration) -> Req {
        self.timeout = Some(timeout);
        self
    }

    pub(super) fn repeat(mut self, repeat: Repeat) -> Req {
        self.repeat = repeat;
        self
    }

    pub(super) fn attempts(mut self, attempts: u32) -> Req {
        self.attempts = Some(attempts);
        self
    }

    pub(super) fn without_auth(mut self) -> Req {
        self.auth = Auth::Never;
        self
    }

    /// For an endpoint that any role, and an anonymous caller, may read (see
    /// [`Auth::Optional`]).
    pub(super) fn token_optional(mut self) -> Req {
        self.auth = Auth::Optional;
        self
    }

    /// The buffer of a fragment's body, for the next fragment to be built in.
    pub(super) fn into_buffer(self) -> Option<Vec<u8>> {
        match self.payload {
            Payload::JsonFrom { body, .. } | Payload::Json(body) => Some(body),
            _ => None,
        }
    }

    /// `POST /v1/result/<id>`, for messages (never with the host or credentials).
    pub(super) fn what(&self) -> String {
        let method = match self.method {
            Method::Get => "GET",
            Method::Post => "POST",
        };
        if self.query.is_empty() {
            format!("{method} {}", self.path)
        } else {
            let query: Vec<String> = self.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{method} {}?{}", self.path, query.join("&"))
        }
    }
}

/// The streamed multipart body and its exact length.
pub(super) fn multipart_body(
    path: &Path,
    boundary: &str,
) -> Result<(impl Read + 'static, u64), String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let size = file
        .metadata()
        .map_err(|e| format!("cannot read the size of {}: {e}", path.display()))?
        .len();
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"file\"\r\n\
         Content-Type: application/x-gzip\r\n\r\n"
    )
    .into_bytes();
    let tail = format!("\r\n--{boundary}--\r\n").into_bytes();
    let length = head.len() as u64 + size + tail.len() as u64;
    let reader = Cursor::new(head)
        .chain(Exact {
            inner: file.take(size),
            left: size,
        })
        .chain(Cursor::new(tail));
    Ok((reader, length))
}

/// Yields exactly `left` bytes: an error if the file shrank, so the request fails instead
/// of leaving the server waiting for the promised length.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being uploaded",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_body_has_the_promised_length() {
        let tmp = crate::testing::tempdir("mp");
        let dir = tmp.path().to_path_buf();
        let path = dir.join("a.tar.gz");
        std::fs::write(&path, b"\x1f\x8b binary \r\n-- data").expect("write");
        let (mut reader, length) = multipart_body(&path, "XYZ").expect("body");
        let mut all = Vec::new();
        reader.read_to_end(&mut all).expect("read");
        assert_eq!(all.len() as u64, length);
        let text = String::from_utf8_lossy(&all);
        assert!(text.starts_with(
            "--XYZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"file\"\r\n"
        ));
        assert!(text.ends_with("\r\n--XYZ--\r\n"));
    }
}
