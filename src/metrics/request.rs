//! One scrape's request and answer: the head parsed by `httparse` and checked, routed to
//! `/metrics` or `/health`, and the answer's bytes (every answer closes the connection).

use super::{Metrics, CONTENT_TYPE};

/// Headers a request may have; more are answered 431.
pub(super) const MAX_HEADERS: usize = 64;

pub(super) const TEXT: &str = "text/plain; charset=utf-8";

/// The parts of a request head this server looks at.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub method: String,
    /// The path without query or fragment.
    pub path: String,
    /// A `Content-Length` other than 0 or a `Transfer-Encoding` was sent.
    pub has_body: bool,
}

/// What the bytes received so far hold.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// The head is not whole yet.
    Partial,
    /// A request, and the length of its head (through its blank line).
    Complete(Request, usize),
    /// More headers than [`MAX_HEADERS`].
    TooLarge,
    /// Not an HTTP/1.x request head; what a 400 answer says.
    Invalid(String),
}

/// Parses the request line and headers at the start of `buf` with `httparse`, then checks
/// what this server needs beyond it: an upper-case method and an origin-form (or
/// absolute-form) target.
pub(crate) fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::TooLarge,
        Err(err) => return Parsed::Invalid(parse_error(buf, err)),
    };
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Parsed::Invalid("malformed request line".to_string());
    };
    if !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Parsed::Invalid(format!("malformed method {method:?}"));
    }
    // An absolute-form target (`http://host:port/metrics`) names the path after its host.
    let origin = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    if !origin.starts_with('/') {
        return Parsed::Invalid(format!("malformed request target {target:?}"));
    }
    let path = origin
        .split(['?', '#'])
        .next()
        .unwrap_or(origin)
        .to_string();
    let has_body = request.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            || (h.name.eq_ignore_ascii_case("content-length") && h.value.trim_ascii() != b"0")
    });
    Parsed::Complete(
        Request {
            method: method.to_string(),
            path,
            has_body,
        },
        len,
    )
}

/// What a 400 answer says for an `httparse` error on `buf`.
fn parse_error(buf: &[u8], err: httparse::Error) -> String {
    let line_end = buf.iter().position(|b| *b == b'\n').unwrap_or(buf.len());
    let first = String::from_utf8_lossy(&buf[..line_end]);
    let first = first.trim_end_matches('\r');
    match err {
        httparse::Error::Version => {
            format!("unsupported protocol in {first:?}: HTTP/1.x only")
        }
        httparse::Error::HeaderName | httparse::Error::HeaderValue | httparse::Error::NewLine
            if std::str::from_utf8(&buf[..line_end]).is_ok() =>
        {
            "malformed header line".to_string()
        }
        _ if std::str::from_utf8(&buf[..line_end]).is_err() => {
            "request line is not UTF-8".to_string()
        }
        _ => format!("malformed request line {first:?}"),
    }
}

pub(super) fn route(metrics: &Metrics, request: &Request) -> Vec<u8> {
    let head_only = request.method == "HEAD";
    let readable = head_only || request.method == "GET";
    match request.path.as_str() {
        "/metrics" | "/health" if !readable => response(
            405,
            TEXT,
            format!("method {} not allowed: use GET or HEAD\n", request.method).as_bytes(),
            false,
            &[("Allow", "GET, HEAD")],
        ),
        "/metrics" => response(
            200,
            CONTENT_TYPE,
            metrics.render().as_bytes(),
            head_only,
            &[],
        ),
        "/health" => {
            let (ok, body) = metrics.health().report();
            response(
                if ok { 200 } else { 503 },
                "application/json",
                body.as_bytes(),
                head_only,
                &[],
            )
        }
        _ => response(
            404,
            TEXT,
            b"not found: the paths are /metrics and /health\n",
            head_only,
            &[],
        ),
    }
}

pub(super) fn response(
    status: u16,
    content_type: &str,
    body: &[u8],
    head_only: bool,
    extra: &[(&str, &str)],
) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in extra {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> (Request, usize) {
        match parse(buf) {
            Parsed::Complete(request, len) => (request, len),
            other => panic!(
                "{:?} should parse, got {other:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }

    #[test]
    fn a_head_is_partial_until_its_blank_line() {
        assert_eq!(complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody").1, 27);
        assert_eq!(complete(b"GET / HTTP/1.0\n\n").1, 16);
        for partial in [
            &b""[..],
            b"GET /metr",
            b"GET /metrics HTTP/1.1\r\nHost: sl",
            b"GET / HTTP/1.1\r\nHost: x\r\n",
        ] {
            assert_eq!(parse(partial), Parsed::Partial, "{partial:?}");
        }
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for n in 0..=MAX_HEADERS {
            many.push_str(&format!("X-{n}: y\r\n"));
        }
        assert_eq!(parse(many.as_bytes()), Parsed::TooLarge);
    }

    #[test]
    fn request_heads_are_parsed_or_refused_with_a_reason() {
        let (r, _) = complete(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(
            r,
            Request {
                method: "GET".into(),
                path: "/metrics".into(),
                has_body: false
            }
        );
        let (r, _) = complete(b"POST http://h:1/health HTTP/1.1\r\ncontent-length: 3\r\n\r\n");
        assert_eq!((r.path.as_str(), r.has_body), ("/health", true));
        let (r, _) = complete(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(!r.has_body);
        let (r, _) = complete(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(r.has_body);
        for (bad, says) in [
            (&b"GET /metrics\r\n\r\n"[..], "malformed request line"),
            (b"GARBAGE\r\n\r\n", "malformed request line"),
            (b"get /metrics HTTP/1.1\r\n\r\n", "malformed method"),
            (b"GET /metrics SPDY/3\r\n\r\n", "HTTP/1.x only"),
            (b"GET metrics HTTP/1.1\r\n\r\n", "malformed request target"),
            (
                b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
                "malformed header line",
            ),
            (b"GET /\xff HTTP/1.1\r\n\r\n", "not UTF-8"),
        ] {
            match parse(bad) {
                Parsed::Invalid(why) => assert!(why.contains(says), "{why:?} should say {says:?}"),
                other => panic!("{bad:?} should be refused, got {other:?}"),
            }
        }
    }

    #[test]
    fn responses_carry_length_and_close() {
        let r = String::from_utf8(response(
            405,
            TEXT,
            b"no\n",
            false,
            &[("Allow", "GET, HEAD")],
        ))
        .expect("utf-8");
        assert!(r.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{r}");
        assert!(r.contains("\r\nContent-Length: 3\r\n") && r.contains("\r\nConnection: close\r\n"));
        assert!(r.contains("\r\nAllow: GET, HEAD\r\n") && r.ends_with("\r\n\r\nno\n"));
        let head = String::from_utf8(response(200, TEXT, b"body", true, &[])).expect("utf-8");
        assert!(
            head.contains("Content-Length: 4\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
    }
}
