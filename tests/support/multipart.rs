//! `multipart/form-data` (RFC 7578): a strict parser for the fake server and a builder for tests.

/// One part of a multipart body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// `name` from `Content-Disposition: form-data; name="..."`.
    pub name: Option<String>,
    /// `filename` from the same header; Werkzeug only treats parts with one as files.
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub data: Vec<u8>,
}

/// The `boundary` parameter of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    let mime = params.next()?.trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        (!v.is_empty() && v.len() <= 70).then(|| v.to_string())
    })
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || from > haystack.len() {
        return None;
    }
    haystack[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// A header parameter such as `name="file"` (quoted or token form).
fn header_param(header: &str, key: &str) -> Option<String> {
    let mut rest = header.split_once(';')?.1;
    loop {
        let trimmed = rest.trim_start();
        if trimmed.is_empty() {
            return None;
        }
        let (k, after) = trimmed.split_once('=')?;
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    _ => value.push(c),
                }
            }
            let end = end?;
            let remaining = quoted[end..].split_once(';').map_or("", |(_, r)| r);
            (value, remaining)
        } else {
            match after.split_once(';') {
                Some((v, r)) => (v.trim().to_string(), r),
                None => (after.trim().to_string(), ""),
            }
        };
        if k.trim().eq_ignore_ascii_case(key) {
            return Some(value);
        }
        rest = remaining;
    }
}

/// Parses a whole body. Errors name what is malformed.
pub fn parse(body: &[u8], boundary: &str) -> Result<Vec<Part>, String> {
    let delimiter = format!("--{boundary}").into_bytes();
    let mut inner_delimiter = b"\r\n".to_vec();
    inner_delimiter.extend_from_slice(&delimiter);

    // The first delimiter starts the body or follows a preamble and CR LF.
    let mut pos = if body.starts_with(&delimiter) {
        delimiter.len()
    } else {
        find(body, &inner_delimiter, 0).ok_or("no opening boundary")? + inner_delimiter.len()
    };
    let mut parts = Vec::new();
    loop {
        let rest = &body[pos..];
        if rest.starts_with(b"--") {
            return Ok(parts);
        }
        // Transport padding, then CR LF.
        let mut p = pos;
        while matches!(body.get(p), Some(b' ' | b'\t')) {
            p += 1;
        }
        if body.get(p..p + 2) != Some(b"\r\n") {
            return Err("boundary not followed by CRLF".into());
        }
        p += 2;
        let (header_text, data_start) = if body[p..].starts_with(b"\r\n") {
            ("", p + 2)
        } else {
            let end = find(body, b"\r\n\r\n", p).ok_or("part headers not terminated")?;
            let text = std::str::from_utf8(&body[p..end]).map_err(|_| "part headers not UTF-8")?;
            (text, end + 4)
        };
        let data_end =
            find(body, &inner_delimiter, data_start).ok_or("part not closed by a boundary")?;
        let mut part = Part {
            name: None,
            filename: None,
            content_type: None,
            data: body[data_start..data_end].to_vec(),
        };
        for line in header_text.split("\r\n").filter(|l| !l.is_empty()) {
            let (name, value) = line.split_once(':').ok_or("malformed part header")?;
            let value = value.trim();
            if name.trim().eq_ignore_ascii_case("Content-Disposition") {
                if !value
                    .split(';')
                    .next()
                    .is_some_and(|d| d.trim().eq_ignore_ascii_case("form-data"))
                {
                    return Err("part disposition is not form-data".into());
                }
                part.name = header_param(value, "name");
                part.filename = header_param(value, "filename");
            } else if name.trim().eq_ignore_ascii_case("Content-Type") {
                part.content_type = Some(value.to_string());
            }
        }
        parts.push(part);
        pos = data_end + inner_delimiter.len();
    }
}

/// Builds a body; returns `(content type header value, body)`.
/// Each part is `(field name, filename, content type, data)`.
pub fn build(parts: &[(&str, Option<&str>, &str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "fake-server-boundary-7d5e4b8f9f6a15f2";
    let mut body = Vec::new();
    for (name, filename, content_type, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n")
                    .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(format!("Content-Type: {content_type}\r\n\r\n").as_bytes());
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// The upload the Python agent sends for artifacts (PROTOCOL §3.13): one part `file`,
/// filename `file`, `application/x-gzip`.
pub fn file_upload(data: &[u8]) -> (String, Vec<u8>) {
    build(&[("file", Some("file"), "application/x-gzip", data)])
}
