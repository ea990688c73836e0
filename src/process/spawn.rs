//! What a command starts with besides its command line: the phase token that marks its
//! processes, and the `oom_score_adj` written in the child between fork and exec.

use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::libc;

/// A fresh 128-bit hex token, unique per command.
pub(super) fn new_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut bytes = [0u8; 16];
    let random = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        use std::hash::{BuildHasher, Hasher};
        let state = std::collections::hash_map::RandomState::new();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            let mut h = state.build_hasher();
            h.write_u32(std::process::id());
            h.write_u128(nanos);
            h.write_u64(count);
            h.write_usize(i);
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The value to write to `/proc/self/oom_score_adj` in the child, formatted before the
/// fork so that the child only calls `open`, `write` and `close` (async-signal-safe).
#[derive(Clone, Copy)]
pub(super) struct OomScoreAdj {
    text: [u8; 12],
    len: usize,
}

impl OomScoreAdj {
    pub(super) fn new(value: i32) -> OomScoreAdj {
        let digits = value.to_string();
        let mut text = [0u8; 12];
        // An i32 has at most 11 characters ("-2147483648").
        let len = digits.len().min(text.len());
        text[..len].copy_from_slice(&digits.as_bytes()[..len]);
        OomScoreAdj { text, len }
    }

    /// Runs in the child between fork and exec: no allocation, no lock, errors ignored (a
    /// sandbox without a writable `/proc`, or a value refused without privilege, must not
    /// stop the command).
    pub(super) fn apply(&self) {
        const PATH: &std::ffi::CStr = c"/proc/self/oom_score_adj";
        // SAFETY: open, write and close are async-signal-safe; the path is a static C
        // string and the buffer lives in this closure's captured copy.
        unsafe {
            let fd = libc::open(PATH.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                let _ = libc::write(fd, self.text.as_ptr().cast(), self.len);
                let _ = libc::close(fd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_score_adj_is_formatted_before_the_fork() {
        for (value, text) in [
            (500, "500"),
            (-1000, "-1000"),
            (0, "0"),
            (i32::MIN, "-2147483648"),
        ] {
            let adj = OomScoreAdj::new(value);
            assert_eq!(&adj.text[..adj.len], text.as_bytes());
        }
    }
}
