//! The body of a log fragment (PROTOCOL §3.11), built in one reusable buffer: the text is
//! decoded as UTF-8 lossily and escaped for JSON straight from the bytes of the log, and
//! the head (number, timestamp, phase) is written into room kept before it.

use crate::phase::Phase;

/// Bytes kept free before a fragment's text for the head of its body,
/// `{"fragment_number":N,"timestamp":"…","phase":"…","log_data":"` (at most 125 bytes).
const FRAGMENT_HEAD_ROOM: usize = 160;

/// The body of a log fragment (PROTOCOL §3.11) being built in one buffer, which can be
/// reused from fragment to fragment: room for the head, then the text decoded as UTF-8
/// (lossily, like [`String::from_utf8_lossy`]) and escaped for JSON straight from the
/// bytes of the log, with no `String` or `serde_json::Value` in between. The fields come in
/// the order the agent has always sent them; the text is escaped as serde_json escapes it.
pub(super) struct FragmentBody {
    buf: Vec<u8>,
}

impl FragmentBody {
    /// An empty text in `buf` (its old content is dropped, its capacity kept).
    pub(super) fn new(mut buf: Vec<u8>) -> FragmentBody {
        buf.clear();
        buf.resize(FRAGMENT_HEAD_ROOM, 0);
        FragmentBody { buf }
    }

    /// Appends `bytes`, decoded lossily and escaped. Bytes cut anywhere give the same
    /// text as the whole only at character boundaries (a cut character becomes U+FFFD).
    pub(super) fn push_bytes(&mut self, bytes: &[u8]) {
        self.buf.reserve(bytes.len() + bytes.len() / 16 + 2);
        match std::str::from_utf8(bytes) {
            Ok(text) => push_escaped(&mut self.buf, text.as_bytes()),
            Err(_) => {
                for chunk in bytes.utf8_chunks() {
                    push_escaped(&mut self.buf, chunk.valid().as_bytes());
                    if !chunk.invalid().is_empty() {
                        self.buf.extend_from_slice(
                            char::REPLACEMENT_CHARACTER
                                .encode_utf8(&mut [0; 4])
                                .as_bytes(),
                        );
                    }
                }
            }
        }
    }

    /// Appends the start of `bytes` (see [`FragmentBody::push_bytes`]) while the escaped
    /// text stays within `limit` bytes, cut where the lossy decoding of the parts is the
    /// decoding of the whole (before a character, or an invalid sequence, starts). Returns
    /// how many bytes it took: all of them unless the limit was reached.
    pub(super) fn push_bytes_within(&mut self, bytes: &[u8], limit: usize) -> usize {
        let mut done = 0;
        while done < bytes.len() {
            // No byte escapes to more than six: this much always fits.
            let room = limit.saturating_sub(self.text_len()) / 6;
            let mut take = room.min(bytes.len() - done);
            if done + take < bytes.len() {
                take = boundary_before(&bytes[done..], take);
            }
            if take == 0 {
                break;
            }
            self.push_bytes(&bytes[done..done + take]);
            done += take;
        }
        done
    }

    /// Bytes of escaped text so far.
    pub(super) fn text_len(&self) -> usize {
        self.buf.len().saturating_sub(FRAGMENT_HEAD_ROOM)
    }

    /// The buffer, for another body.
    pub(super) fn into_buffer(self) -> Vec<u8> {
        self.buf
    }

    /// The whole body: the buffer and where in it the body starts.
    pub(super) fn finish(mut self, number: u64, timestamp: &str, phase: Phase) -> (Vec<u8>, usize) {
        let mut head = Vec::with_capacity(FRAGMENT_HEAD_ROOM);
        head.extend_from_slice(b"{\"fragment_number\":");
        head.extend_from_slice(number.to_string().as_bytes());
        head.extend_from_slice(b",\"timestamp\":\"");
        push_escaped(&mut head, timestamp.as_bytes());
        head.extend_from_slice(b"\",\"phase\":\"");
        push_escaped(&mut head, phase.name().as_bytes());
        head.extend_from_slice(b"\",\"log_data\":\"");
        self.buf.extend_from_slice(b"\"}");
        match FRAGMENT_HEAD_ROOM.checked_sub(head.len()) {
            Some(from) => {
                self.buf[from..FRAGMENT_HEAD_ROOM].copy_from_slice(&head);
                (self.buf, from)
            }
            // Cannot happen with the fields' lengths; a copy stays correct if it did.
            None => {
                head.extend_from_slice(&self.buf[FRAGMENT_HEAD_ROOM..]);
                (head, 0)
            }
        }
    }
}

/// A cut of `bytes` at or before `at` (< its length) where decoding the two parts lossily
/// gives the decoding of the whole: before the byte at `at` unless that continues a
/// character or sequence begun at most three bytes before (a character has at most three
/// continuation bytes), else before that sequence's first byte.
fn boundary_before(bytes: &[u8], at: usize) -> usize {
    let continues = |i: usize| bytes[i] & 0xc0 == 0x80;
    (at.saturating_sub(3)..=at)
        .rev()
        .find(|i| !continues(*i))
        .unwrap_or(at)
}

/// Marks the bytes of `word` (little-endian) that must be escaped in a JSON string:
/// below 0x20, `"` or `\\`, each by its high bit. The lowest mark is always a byte that
/// needs escaping; marks above it may be false (a borrow carried from a marked byte).
fn escape_marks(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    let quote = word ^ (ONES * u64::from(b'"'));
    let quote = quote.wrapping_sub(ONES) & !quote & HIGH;
    let backslash = word ^ (ONES * u64::from(b'\\'));
    let backslash = backslash.wrapping_sub(ONES) & !backslash & HIGH;
    below_space | quote | backslash
}

/// Appends the escape of `byte` inside a JSON string, as serde_json writes it, when it
/// needs one (each a fixed-size write); returns whether it did.
#[inline(always)]
fn push_escape(out: &mut Vec<u8>, byte: u8) -> bool {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let short = match byte {
        b'"' => b'"',
        b'\\' => b'\\',
        b'\n' => b'n',
        b'\r' => b'r',
        b'\t' => b't',
        0x08 => b'b',
        0x0c => b'f',
        0..=0x1f => {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 15)],
            ]);
            return true;
        }
        _ => return false,
    };
    out.extend_from_slice(&[b'\\', short]);
    true
}

/// Appends `bytes` (UTF-8) escaped for the inside of a JSON string. Sixteen bytes at a
/// time are checked for anything to escape; runs that need nothing are copied whole, and
/// the first byte that does is found from the marks, not byte by byte.
fn push_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let mut copied = 0;
    let mut at = 0;
    while at + 16 <= bytes.len() {
        let (marks, base) = match (escape_marks(word(at)), escape_marks(word(at + 8))) {
            (0, 0) => {
                at += 16;
                continue;
            }
            (0, marks) => (marks, at + 8),
            (marks, _) => (marks, at),
        };
        let first = base + (marks.trailing_zeros() / 8) as usize;
        if first > copied {
            out.extend_from_slice(&bytes[copied..first]);
            copied = first;
        }
        if push_escape(out, bytes[first]) {
            copied = first + 1;
        }
        at = first + 1;
    }
    for (i, byte) in bytes.iter().enumerate().skip(at) {
        if matches!(byte, 0..=0x1f | b'"' | b'\\') {
            out.extend_from_slice(&bytes[copied..i]);
            push_escape(out, *byte);
            copied = i + 1;
        }
    }
    out.extend_from_slice(&bytes[copied..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// A body as the agent sent it before bodies were built in place: serde_json's.
    fn serde_body(number: u64, timestamp: &str, phase: Phase, bytes: &[u8]) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "fragment_number": number,
            "timestamp": timestamp,
            "phase": phase.name(),
            "log_data": String::from_utf8_lossy(bytes),
        }))
        .expect("serialise")
    }

    fn built_body(
        buf: Vec<u8>,
        number: u64,
        timestamp: &str,
        phase: Phase,
        pieces: &[&[u8]],
    ) -> Vec<u8> {
        let mut body = FragmentBody::new(buf);
        for piece in pieces {
            body.push_bytes(piece);
        }
        let (buf, from) = body.finish(number, timestamp, phase);
        buf[from..].to_vec()
    }

    #[test]
    fn fragment_bodies_escape_like_serde_json() {
        let ts = "2026-01-05T10:00:00.123456+00:00";
        for bytes in [
            &b""[..],
            b"plain text\n",
            b"quote \" backslash \\ tab \t cr \r bs \x08 ff \x0c nul \x00 us \x1f del \x7f",
            "héllo €𝄞 wörld".as_bytes(),
            b"bad \xff\xfe then \xe2\x82 cut \xc3",
            b"0123456789abcdef\"0123456789abcdef\\",
        ] {
            for phase in [Phase::Setup, Phase::FirmwareUpdate] {
                assert_eq!(
                    built_body(Vec::new(), u64::MAX, ts, phase, &[bytes]),
                    serde_body(u64::MAX, ts, phase, bytes),
                    "{bytes:?}"
                );
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Whatever the bytes (escapes, control bytes, multi-byte and invalid UTF-8, at any
        /// offset within the 16-byte steps) and whatever the buffer held before, a body
        /// built in place is byte for byte the one serde_json writes; pieces cut at
        /// character boundaries give the body of the whole.
        #[test]
        fn fragment_bodies_are_serde_json_bodies(
            bytes in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::Just(b'x'),
                    proptest::prelude::Just(b'"'),
                    proptest::prelude::Just(b'\\'),
                    0u8..0x20,
                    0x20u8..0x80,
                    proptest::prelude::any::<u8>(),
                ],
                0..80,
            ),
            cut in 0usize..80,
            number in proptest::prelude::any::<u64>(),
            stale in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        ) {
            let ts = "2026-01-05T10:00:00.123456+00:00";
            let expected = serde_body(number, ts, Phase::Test, &bytes);
            proptest::prop_assert_eq!(
                &built_body(stale, number, ts, Phase::Test, &[&bytes]),
                &expected
            );
            let cut = cut.min(bytes.len());
            if std::str::from_utf8(&bytes).is_ok() && std::str::from_utf8(&bytes[..cut]).is_ok() {
                proptest::prop_assert_eq!(
                    &built_body(Vec::new(), number, ts, Phase::Test, &[&bytes[..cut], &bytes[cut..]]),
                    &expected
                );
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Bytes of any kind cut into fragments by an escaped-text limit: every fragment
        /// takes something and stays within the limit, and the fragments' texts add up to
        /// the lossy decoding of the whole (no character or invalid sequence is split).
        #[test]
        fn fragments_cut_by_the_text_limit_add_up_to_the_whole(
            bytes in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::Just(b'x'),
                    0u8..0x20,
                    0x80u8..0xc0,
                    0xc2u8..0xf5,
                    proptest::prelude::any::<u8>(),
                ],
                0..120,
            ),
            limit in 24usize..100,
        ) {
            let mut text = String::new();
            let mut done = 0;
            while done < bytes.len() {
                let mut body = FragmentBody::new(Vec::new());
                let took = body.push_bytes_within(&bytes[done..], limit);
                proptest::prop_assert!(took > 0, "no progress at {}", done);
                proptest::prop_assert!(body.text_len() <= limit, "{} > {}", body.text_len(), limit);
                let (buf, from) = body.finish(0, "t", Phase::Test);
                let parsed: Value = serde_json::from_slice(&buf[from..]).expect("a JSON body");
                text.push_str(parsed["log_data"].as_str().expect("log_data"));
                done += took;
            }
            proptest::prop_assert_eq!(text, String::from_utf8_lossy(&bytes).into_owned());
        }
    }
}
