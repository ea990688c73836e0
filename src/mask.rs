//! Secret masking of phase output (PROTOCOL §10.2), streaming and literal.
//!
//! Each occurrence of a secret value is replaced by `**` + the first 6 hex digits of the
//! SHA-256 of the value + `**`. Unlike the Python agent, values are matched literally (not
//! as regular expressions), empty values are skipped instead of refusing to build, and a
//! secret split across reads is still masked: [`Masker::mask`] holds back only the bytes
//! that could still begin a secret (never more than the longest secret less one byte) and
//! [`Masker::finish`] releases them. Where several secrets match at one place the longest
//! wins; scanning is left to right, so the output of any split of the input equals the
//! output of masking the whole input at once. Works on bytes; output need not be UTF-8.

/// Masks secrets in a byte stream.
#[derive(Clone, Debug, Default)]
pub struct Masker {
    /// Distinct non-empty secrets, longest first, each with its replacement.
    secrets: Vec<(Vec<u8>, Vec<u8>)>,
    /// `first_byte[b]`: some secret starts with byte `b`.
    first_byte: Vec<bool>,
    /// The distinct bytes secrets start with: up to three are searched for with `memchr`
    /// (vectorised) instead of byte by byte through `first_byte`.
    first_bytes: Vec<u8>,
    /// Bytes received but not yet decided: they may begin a secret.
    pending: Vec<u8>,
}

impl Masker {
    /// A masker for these secret values; empty values are ignored, duplicates merged.
    pub fn new<I, S>(secrets: I) -> Masker
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let mut values: Vec<Vec<u8>> = secrets
            .into_iter()
            .map(|s| s.as_ref().to_vec())
            .filter(|s| !s.is_empty())
            .collect();
        values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        values.dedup();
        let mut first_byte = vec![false; 256];
        let mut first_bytes = Vec::new();
        for value in &values {
            if !first_byte[usize::from(value[0])] {
                first_byte[usize::from(value[0])] = true;
                first_bytes.push(value[0]);
            }
        }
        let secrets = values
            .into_iter()
            .map(|value| {
                let replacement = replacement(&value).into_bytes();
                (value, replacement)
            })
            .collect();
        Masker {
            secrets,
            first_byte,
            first_bytes,
            pending: Vec::new(),
        }
    }

    /// Whether there is nothing to mask (every value was empty, or none was given).
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// The length of the longest secret; at most this many bytes less one are held back.
    pub fn max_len(&self) -> usize {
        self.secrets.first().map_or(0, |(s, _)| s.len())
    }

    /// Masks the next chunk of the stream and returns the bytes that are now decided.
    pub fn mask(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(chunk.len() + self.pending.len());
        self.mask_into(chunk, &mut out);
        out
    }

    /// Like [`Masker::mask`], appending to `out`.
    pub fn mask_into(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if self.secrets.is_empty() {
            out.extend_from_slice(chunk);
            return;
        }
        if self.pending.is_empty() {
            // Nothing held back: scan the chunk where it is and keep only its undecided tail.
            let consumed = self.scan(chunk, out, false);
            self.pending.extend_from_slice(&chunk[consumed..]);
            return;
        }
        self.pending.extend_from_slice(chunk);
        let consumed = self.scan(&self.pending, out, false);
        self.pending.drain(..consumed);
    }

    /// Like [`Masker::mask`], without copying when it can: the decided bytes are a prefix
    /// of `chunk` itself when no secret was found in it and nothing was held back before
    /// (the common case), else they are built in `scratch` (cleared first).
    pub fn mask_borrowed<'a>(&mut self, chunk: &'a [u8], scratch: &'a mut Vec<u8>) -> &'a [u8] {
        if self.secrets.is_empty() {
            return chunk;
        }
        scratch.clear();
        if self.pending.is_empty() {
            let (plain, found) = self.plain_prefix(chunk);
            if !found {
                self.pending.extend_from_slice(&chunk[plain..]);
                return &chunk[..plain];
            }
        }
        self.mask_into(chunk, scratch);
        scratch
    }

    /// How many leading bytes of `data` (the middle of a stream) are decided and hold no
    /// secret, and whether a secret starts right after them (else the rest may begin one).
    fn plain_prefix(&self, data: &[u8]) -> (usize, bool) {
        let mut at = 0;
        while let Some(next) = self.next_candidate(&data[at..]) {
            at += next;
            let rest = &data[at..];
            for (secret, _) in &self.secrets {
                if secret.len() <= rest.len() {
                    if rest.starts_with(secret) {
                        return (at, true);
                    }
                } else if secret.starts_with(rest) {
                    return (at, false);
                }
            }
            at += 1;
        }
        (data.len(), false)
    }

    /// Ends the stream: masks and returns every byte still held back.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.pending.len());
        self.finish_into(&mut out);
        out
    }

    /// Like [`Masker::finish`], appending to `out`.
    pub fn finish_into(&mut self, out: &mut Vec<u8>) {
        let consumed = self.scan(&self.pending, out, true);
        debug_assert_eq!(consumed, self.pending.len());
        self.pending.clear();
    }

    /// Masks a whole input at once (a fresh masker's `mask` then `finish`).
    pub fn mask_all(&self, data: &[u8]) -> Vec<u8> {
        let mut masker = Masker {
            pending: Vec::new(),
            ..self.clone()
        };
        let mut out = masker.mask(data);
        out.extend(masker.finish());
        out
    }

    /// Masks `piece`, the start of what is left of a stream, afresh (whatever this masker
    /// holds back is not used): returns the masked bytes and how many bytes of `piece` they
    /// stand for. The bytes after those could still begin a secret and must start the next
    /// piece; at the end of the stream (`last`) every byte is decided. A stream masked
    /// piece by piece this way, each piece starting where the previous one stopped, gives
    /// the bytes [`Masker::mask_all`] gives, so each piece can be sent (and sent again)
    /// on its own.
    pub fn mask_prefix(&self, piece: &[u8], last: bool) -> (Vec<u8>, usize) {
        let mut out = Vec::with_capacity(piece.len());
        if self.secrets.is_empty() {
            out.extend_from_slice(piece);
            return (out, piece.len());
        }
        let used = self.scan(piece, &mut out, last);
        (out, used)
    }

    /// Where in `data` the first byte that starts some secret is.
    fn next_candidate(&self, data: &[u8]) -> Option<usize> {
        match *self.first_bytes.as_slice() {
            [a] => memchr::memchr(a, data),
            [a, b] => memchr::memchr2(a, b, data),
            [a, b, c] => memchr::memchr3(a, b, c, data),
            _ => data.iter().position(|&b| self.first_byte[usize::from(b)]),
        }
    }

    /// Scans `data` left to right, writing decided output; returns how many bytes of
    /// `data` were decided. At the end of the stream (`last`) everything is decided.
    fn scan(&self, data: &[u8], out: &mut Vec<u8>, last: bool) -> usize {
        let mut at = 0;
        let mut copied = 0; // data[copied..at] is plain text not yet written
        while at < data.len() {
            let Some(next) = self.next_candidate(&data[at..]) else {
                at = data.len();
                break;
            };
            at += next;
            let rest = &data[at..];
            let mut undecided = false;
            let mut found = None;
            for (secret, replacement) in &self.secrets {
                if secret.len() <= rest.len() {
                    if rest.starts_with(secret) {
                        // Longest first: the first full match is the longest one, unless a
                        // longer secret is still undecided.
                        found = Some((secret.len(), replacement));
                        break;
                    }
                } else if !last && secret.starts_with(rest) {
                    // A longer secret may still match here once more bytes arrive.
                    undecided = true;
                    break;
                }
            }
            if undecided {
                break;
            }
            match found {
                Some((len, replacement)) => {
                    out.extend_from_slice(&data[copied..at]);
                    out.extend_from_slice(replacement);
                    at += len;
                    copied = at;
                }
                None => at += 1,
            }
        }
        out.extend_from_slice(&data[copied..at]);
        at
    }
}

/// The text that replaces `secret`: `**` + first 6 hex digits of its SHA-256 + `**`, as the
/// Python agent's `Masker` writes it (`hashlib.sha256(text.encode()).hexdigest()[:6]`; a
/// secret arrives as UTF-8 text, so hashing its bytes hashes what Python encodes).
pub fn replacement(secret: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret);
    let prefix = digest.as_ref().get(..3).unwrap_or_default();
    let hex: String = prefix.iter().map(|b| format!("{b:02x}")).collect();
    format!("**{hex}**")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mask_in_pieces(masker: &Masker, data: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut m = Masker {
            pending: Vec::new(),
            ..masker.clone()
        };
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        cuts.sort_unstable();
        let mut out = Vec::new();
        let mut from = 0;
        for cut in cuts {
            out.extend(m.mask(&data[from..cut]));
            from = cut;
        }
        out.extend(m.mask(&data[from..]));
        out.extend(m.finish());
        out
    }

    /// Like [`mask_in_pieces`], through [`Masker::mask_borrowed`].
    fn mask_borrowed_in_pieces(masker: &Masker, data: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut m = Masker {
            pending: Vec::new(),
            ..masker.clone()
        };
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.push(data.len());
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        let mut from = 0;
        for cut in cuts {
            out.extend_from_slice(m.mask_borrowed(&data[from..cut], &mut scratch));
            from = cut;
        }
        out.extend(m.finish());
        out
    }

    #[test]
    fn mask_borrowed_copies_only_what_holds_a_secret() {
        let mut m = Masker::new(["hunter2"]);
        let mut scratch = Vec::new();
        let plain = b"nothing to hide, 1 GB of it";
        let out = m.mask_borrowed(plain, &mut scratch);
        assert_eq!(out, plain);
        assert_eq!(out.as_ptr(), plain.as_ptr(), "the chunk itself, not a copy");
        let tail = b"log: hunt";
        let out = m.mask_borrowed(tail, &mut scratch);
        assert_eq!((out, out.as_ptr()), (&b"log: "[..], tail.as_ptr()));
        let out = m.mask_borrowed(b"er2 done", &mut scratch).to_vec();
        assert_eq!(out, format!("{} done", replacement(b"hunter2")).as_bytes());
        let out = m.mask_borrowed(b"a hunter2 b", &mut scratch).to_vec();
        assert_eq!(out, format!("a {} b", replacement(b"hunter2")).as_bytes());
        assert_eq!(m.finish(), b"");
    }

    /// Masks `data` in pieces of `size` bytes (more when a piece is all undecided), each
    /// with [`Masker::mask_prefix`] and starting where the previous one stopped.
    fn mask_in_fresh_pieces(masker: &Masker, data: &[u8], size: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut from = 0;
        let mut want = size;
        while from < data.len() {
            let to = (from + want).min(data.len());
            let (masked, used) = masker.mask_prefix(&data[from..to], to == data.len());
            if used == 0 {
                want += 1;
                continue;
            }
            assert!(!masked.is_empty(), "bytes decided into nothing");
            out.push(masked);
            from += used;
            want = size;
        }
        out
    }

    #[test]
    fn mask_prefix_stops_before_an_undecided_secret() {
        let m = Masker::new(["hunter2"]);
        let (out, used) = m.mask_prefix(b"log: hunt", false);
        assert_eq!((out.as_slice(), used), (&b"log: "[..], 5));
        let (out, used) = m.mask_prefix(b"hunter2 ok", false);
        assert_eq!(out, format!("{} ok", replacement(b"hunter2")).as_bytes());
        assert_eq!(used, 10);
        assert_eq!(m.mask_prefix(b"hun", false), (Vec::new(), 0));
        assert_eq!(m.mask_prefix(b"hun", true), (b"hun".to_vec(), 3));
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// The Python agent's masks for these secrets, computed with its own `Masker`
    /// (`agent/src/testflinger_agent/masking.py` of canonical/testflinger at fe381ff2, run
    /// under python3 with `Masker([re.escape(secret)], hash_length=6).apply(...)`), so the
    /// masked logs of both agents are byte for byte the same. `**01a546**` is also the
    /// example in that file's docstring.
    #[test]
    fn masks_are_the_python_agents() {
        let known: [(&str, &str); 5] = [
            ("hunter2", "**f52fbd**"),
            ("123-45-6789", "**01a546**"),
            ("pässwörd", "**46970b**"),
            ("s3cr3t with spaces", "**b1f825**"),
            (
                "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxy",
                "**96a61e**",
            ),
        ];
        for (secret, mask) in known {
            assert_eq!(replacement(secret.as_bytes()), mask, "{secret}");
        }
        // The same Masker on a line with two secrets, each occurring again.
        let m = Masker::new(["hunter2", "pässwörd"]);
        assert_eq!(
            m.mask_all("login hunter2 then pässwörd and hunter2".as_bytes()),
            b"login **f52fbd** then **46970b** and **f52fbd**"
        );
    }

    #[test]
    fn replacement_is_sha256_prefix() {
        // SHA-256("abc") = ba7816bf…
        assert_eq!(replacement(b"abc"), "**ba7816**");
        let m = Masker::new(["abc"]);
        assert_eq!(
            m.mask_all(b"x abc y abcabc"),
            b"x **ba7816** y **ba7816****ba7816**"
        );
    }

    #[test]
    fn literal_not_regex() {
        let m = Masker::new(["a.c", "(x|y)*"]);
        assert_eq!(
            m.mask_all(b"abc a.c"),
            format!("abc {}", replacement(b"a.c")).as_bytes()
        );
        assert_eq!(
            m.mask_all(b"xy (x|y)*"),
            format!("xy {}", replacement(b"(x|y)*")).as_bytes()
        );
    }

    #[test]
    fn empty_values_are_skipped_and_pass_through() {
        let mut m = Masker::new(["", ""]);
        assert!(m.is_empty());
        assert_eq!(m.mask(b"anything"), b"anything");
        assert_eq!(m.finish(), b"");
        let m = Masker::new(Vec::<String>::new());
        assert_eq!(m.mask_all(b"\xff\x00"), b"\xff\x00");
    }

    #[test]
    fn longest_secret_wins() {
        let m = Masker::new(["pass", "password"]);
        assert_eq!(m.mask_all(b"password"), replacement(b"password").as_bytes());
        assert_eq!(
            m.mask_all(b"passw"),
            format!("{}w", replacement(b"pass")).as_bytes()
        );
    }

    #[test]
    fn split_secret_is_masked_and_little_is_held_back() {
        let mut m = Masker::new(["hunter2"]);
        assert_eq!(m.mask(b"log: hun"), b"log: ");
        assert_eq!(m.mask(b"ter"), b"");
        assert_eq!(
            m.mask(b"2 done"),
            format!("{} done", replacement(b"hunter2")).as_bytes()
        );
        assert_eq!(m.mask(b"hunt"), b"");
        assert_eq!(m.mask(b"ing"), b"hunting");
        assert_eq!(m.mask(b"hu"), b"");
        assert_eq!(m.finish(), b"hu");
        assert_eq!(m.max_len(), 7);
    }

    #[test]
    fn bytes_that_are_not_utf8() {
        let m = Masker::new([&b"\xff\xfe"[..]]);
        assert_eq!(
            m.mask_all(b"\x00\xff\xfe\x01"),
            [&b"\x00"[..], replacement(b"\xff\xfe").as_bytes(), b"\x01"].concat()
        );
    }

    proptest! {
        /// For random secrets and random split points, masking in pieces equals masking at
        /// once, and the output holds no secret. Secrets use letters that never occur in a
        /// replacement (`*` and hex digits), so a secret cannot appear by accident.
        #[test]
        fn pieces_equal_whole_and_no_secret_survives(
            secrets in proptest::collection::vec("[g-k]{1,6}", 1..4),
            parts in proptest::collection::vec(("[g-k ]{0,8}", 0usize..4), 0..12),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let mut data = Vec::new();
            for (filler, pick) in &parts {
                data.extend_from_slice(filler.as_bytes());
                if let Some(secret) = secrets.get(*pick) {
                    data.extend_from_slice(secret.as_bytes());
                }
            }
            let masker = Masker::new(&secrets);
            let whole = masker.mask_all(&data);
            let pieces = mask_in_pieces(&masker, &data, &cuts);
            prop_assert_eq!(&pieces, &whole);
            prop_assert_eq!(&mask_borrowed_in_pieces(&masker, &data, &cuts), &whole);
            for secret in &secrets {
                prop_assert!(!contains(&whole, secret.as_bytes()), "{:?} in {:?}", secret, String::from_utf8_lossy(&whole));
            }
            // Pieces masked afresh (as log fragments sent from a file are), of every size.
            for size in 1..=8 {
                let fragments = mask_in_fresh_pieces(&masker, &data, size);
                prop_assert_eq!(fragments.concat(), whole.clone(), "pieces of {}", size);
                for (fragment, secret) in fragments.iter().flat_map(|f| secrets.iter().map(move |s| (f, s))) {
                    prop_assert!(!contains(fragment, secret.as_bytes()), "{:?} in {:?}", secret, String::from_utf8_lossy(fragment));
                }
            }
        }

        /// Any bytes, any secrets: streaming never differs from masking at once, and the
        /// held-back tail never reaches the longest secret's length.
        #[test]
        fn arbitrary_bytes_stream_like_whole(
            secrets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..5), 0..4),
            data in proptest::collection::vec(any::<u8>(), 0..64),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let masker = Masker::new(&secrets);
            prop_assert_eq!(mask_in_pieces(&masker, &data, &cuts), masker.mask_all(&data));
            prop_assert_eq!(mask_borrowed_in_pieces(&masker, &data, &cuts), masker.mask_all(&data));
            let size = cuts.first().map_or(1, |c| c % 6 + 1);
            prop_assert_eq!(mask_in_fresh_pieces(&masker, &data, size).concat(), masker.mask_all(&data));
            let mut m = masker.clone();
            for byte in &data {
                m.mask(&[*byte]);
                prop_assert!(m.pending.len() < m.max_len().max(1));
            }
        }
    }
}
