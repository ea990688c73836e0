//! Reading a range of a log file for a fragment: one `pread` into a reused buffer, cut at
//! the last complete UTF-8 character unless the phase has ended, and for serial logs
//! masked so that each fragment ends where every byte has been decided.

use crate::mask::Masker;
use std::fs::File;
use std::path::Path;

/// A fragment read from a log file.
pub(super) enum Piece {
    Text {
        text: String,
        consumed: u64,
    },
    /// Only the start of a character so far.
    Incomplete,
    /// The file cannot be read (or is shorter than recorded).
    Unreadable(String),
}

/// Reads bytes `start..end` of `path`, at most `max`, ending at the last complete UTF-8
/// character unless `finished` and the read reaches `end`; decodes lossily.
fn read_piece(path: &Path, start: u64, end: u64, max: usize, finished: bool) -> Piece {
    match read_bytes(path, start, end, max, finished) {
        Ok((bytes, _)) => Piece::Text {
            consumed: bytes.len() as u64,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        },
        Err(piece) => piece,
    }
}

/// The bytes [`read_piece`] decodes, and whether they reach `end`; `Err` is the piece to
/// return instead (nothing complete, or unreadable).
fn read_bytes(
    path: &Path,
    start: u64,
    end: u64,
    max: usize,
    finished: bool,
) -> Result<(Vec<u8>, bool), Piece> {
    let mut buf = Vec::new();
    match read_bytes_into(&mut buf, path, start, end, max, finished) {
        Ok((len, last)) => {
            buf.truncate(len);
            Ok((buf, last))
        }
        Err(ReadError::Incomplete) => Err(Piece::Incomplete),
        Err(ReadError::Unreadable(why)) => Err(Piece::Unreadable(why)),
    }
}

/// Why [`read_bytes_into`] has no bytes to send.
pub(super) enum ReadError {
    /// Only the start of a character so far.
    Incomplete,
    /// The file cannot be read (or is shorter than recorded).
    Unreadable(String),
}

/// Reads bytes `start..end` of `path`, at most `max`, into the start of `buf` with one
/// `pread`. `buf` grows as needed and is never shrunk or cleared, so a buffer reused from
/// fragment to fragment is not zeroed again; its bytes past the read are stale. The bytes
/// end at the last complete UTF-8 character unless `finished` and the read reaches `end`.
/// Returns how many bytes and whether they reach `end`.
pub(super) fn read_bytes_into(
    buf: &mut Vec<u8>,
    path: &Path,
    start: u64,
    end: u64,
    max: usize,
    finished: bool,
) -> Result<(usize, bool), ReadError> {
    use std::os::unix::fs::FileExt;
    let want = end.saturating_sub(start).min(max as u64) as usize;
    let file = File::open(path)
        .map_err(|e| ReadError::Unreadable(format!("cannot open {}: {e}", path.display())))?;
    if buf.len() < want {
        buf.resize(want, 0);
    }
    let mut got = 0;
    while got < want {
        match file.read_at(&mut buf[got..want], start + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(ReadError::Unreadable(format!(
                    "cannot read {}: {e}",
                    path.display()
                )))
            }
        }
    }
    if got == 0 {
        return Err(ReadError::Unreadable(format!(
            "{} ends at byte {start}, before the {end} bytes recorded",
            path.display()
        )));
    }
    let reaches_end = start + got as u64 >= end;
    let keep = if finished && reaches_end {
        got
    } else {
        complete_prefix(&buf[..got])
    };
    if keep == 0 {
        return Err(ReadError::Incomplete);
    }
    Ok((keep, reaches_end && keep == got))
}

/// The next fragment of the finished file `path` from `start` (of `end` bytes), masked:
/// about `max` bytes of the file, ending where `masker` has decided every byte, so that the
/// next fragment starts afresh there (see [`Masker::mask_prefix`]) and a fragment sent
/// again after a failure is the same. `consumed` counts bytes of the file.
pub(super) fn masked_piece(
    path: &Path,
    start: u64,
    end: u64,
    max: usize,
    masker: &Masker,
) -> Piece {
    if masker.is_empty() {
        return read_piece(path, start, end, max, true);
    }
    // When all of `max` bytes could still begin a secret, read on by the longest secret
    // (and a cut character): then at least one byte is decided.
    for want in [max, max.saturating_add(masker.max_len() + 4)] {
        let (bytes, last) = match read_bytes(path, start, end, want, true) {
            Ok(read) => read,
            Err(piece) => return piece,
        };
        let (masked, used) = masker.mask_prefix(&bytes, last);
        if used > 0 {
            return Piece::Text {
                text: String::from_utf8_lossy(&masked).into_owned(),
                consumed: used as u64,
            };
        }
    }
    Piece::Unreadable(format!(
        "{}: no byte from {start} could be masked (a bug)",
        path.display()
    ))
}

/// The length of `bytes` without a trailing incomplete UTF-8 sequence (invalid bytes
/// elsewhere are kept: the lossy decoding replaces them the same way in any cut).
fn complete_prefix(bytes: &[u8]) -> usize {
    let mut at = 0;
    loop {
        match std::str::from_utf8(&bytes[at..]) {
            Ok(_) => return bytes.len(),
            Err(e) => match e.error_len() {
                Some(bad) => at += e.valid_up_to() + bad,
                None => return at + e.valid_up_to(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_prefix_cuts_only_an_incomplete_tail() {
        assert_eq!(complete_prefix(b"abc"), 3);
        assert_eq!(complete_prefix("a€".as_bytes()), 4);
        assert_eq!(complete_prefix(&"a€".as_bytes()[..3]), 1);
        assert_eq!(complete_prefix(&"a€".as_bytes()[..2]), 1);
        assert_eq!(complete_prefix(b"a\xffb"), 3);
        assert_eq!(complete_prefix(b"a\xff\xe2\x82"), 2);
        assert_eq!(complete_prefix(b"\xe2"), 0);
        // Invalid after a lead byte: already undecodable, nothing to wait for.
        assert_eq!(complete_prefix(b"\xe2A"), 2);
        assert_eq!(complete_prefix(b""), 0);
    }

    /// Cutting at `complete_prefix` and decoding each piece lossily gives the lossy
    /// decoding of the whole, for every cut of some nasty inputs.
    #[test]
    fn lossy_pieces_concatenate_to_the_lossy_whole() {
        let inputs: [&[u8]; 4] = [
            "héllo €𝄞 wörld".as_bytes(),
            b"\xf0\x9f\x98\x80\xff\xe2\x82\xac\xe2\x82A\xc3",
            b"\xed\xa0\x80\xf4\x90\x80\x80\xe0\x80\x80ok",
            b"\xc3\xa9\xc3",
        ];
        for input in inputs {
            let whole = String::from_utf8_lossy(input).into_owned();
            for first_cut in 0..=input.len() {
                // Stream with bytes arriving in two reads split at `first_cut`.
                let mut out = String::new();
                let mut sent = 0;
                for known in [first_cut, input.len()] {
                    let last = known == input.len();
                    while sent < known {
                        let piece = &input[sent..known];
                        let keep = if last {
                            piece.len()
                        } else {
                            complete_prefix(piece)
                        };
                        if keep == 0 {
                            break;
                        }
                        out.push_str(&String::from_utf8_lossy(&piece[..keep]));
                        sent += keep;
                    }
                }
                assert_eq!(out, whole, "input {input:?} cut at {first_cut}");
            }
        }
    }

    #[test]
    fn read_piece_respects_max_and_finished() {
        let tmp = crate::testing::tempdir("stream");
        let dir = tmp.path().to_path_buf();
        let path = dir.join("test.log");
        std::fs::write(&path, "ab€".as_bytes()).expect("write");
        match read_piece(&path, 0, 4, 100, false) {
            Piece::Text { text, consumed } => assert_eq!((text.as_str(), consumed), ("ab", 2)),
            _ => panic!("expected text"),
        }
        assert!(matches!(
            read_piece(&path, 2, 4, 100, false),
            Piece::Incomplete
        ));
        match read_piece(&path, 2, 4, 100, true) {
            Piece::Text { text, consumed } => {
                assert_eq!((text.as_str(), consumed), ("\u{fffd}", 2))
            }
            _ => panic!("expected text"),
        }
        match read_piece(&path, 0, 5, 3, true) {
            Piece::Text { text, consumed } => assert_eq!((text.as_str(), consumed), ("ab", 2)),
            _ => panic!("expected text"),
        }
        assert!(matches!(
            read_piece(&path, 5, 9, 100, true),
            Piece::Unreadable(_)
        ));
        assert!(matches!(
            read_piece(&dir.join("absent"), 0, 1, 100, true),
            Piece::Unreadable(_)
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// A serial log sent fragment by fragment from its file, each masked afresh where
        /// the previous one stopped, whatever the fragment size: no fragment holds a
        /// secret, and together they are the whole file masked at once and decoded.
        #[test]
        fn masked_fragments_hold_no_secret_and_add_up_to_the_whole(
            secrets in proptest::collection::vec("[g-k]{1,5}|é[g-k]{0,3}", 1..4),
            parts in proptest::collection::vec(("[g-k €é\n]{0,8}", 0usize..4), 0..16),
            max in 4usize..24,
        ) {
            let mut data = Vec::new();
            for (filler, pick) in &parts {
                data.extend_from_slice(filler.as_bytes());
                if let Some(secret) = secrets.get(*pick) {
                    data.extend_from_slice(secret.as_bytes());
                }
            }
            let tmp = crate::testing::tempdir("stream-mask");
            let dir = tmp.path().to_path_buf();
            let path = dir.join("test-serial.log");
            std::fs::write(&path, &data).expect("write");
            let masker = Masker::new(&secrets);
            let mut sent = String::new();
            let mut offset = 0u64;
            while offset < data.len() as u64 {
                match masked_piece(&path, offset, data.len() as u64, max, &masker) {
                    Piece::Text { text, consumed } => {
                        for secret in &secrets {
                            proptest::prop_assert!(!text.contains(secret.as_str()), "{:?} in {:?}", secret, text);
                        }
                        proptest::prop_assert!(consumed > 0);
                        sent.push_str(&text);
                        offset += consumed;
                    }
                    Piece::Incomplete => proptest::prop_assert!(false, "incomplete at {}", offset),
                    Piece::Unreadable(why) => proptest::prop_assert!(false, "{}", why),
                }
            }
            for secret in &secrets {
                proptest::prop_assert!(!sent.contains(secret.as_str()), "{:?} in {:?}", secret, sent);
            }
            let whole = String::from_utf8_lossy(&masker.mask_all(&data)).into_owned();
            proptest::prop_assert_eq!(sent, whole);
        }
    }
}
