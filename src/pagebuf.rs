//! Byte buffers that start at a page boundary, for reading a pipe.
//!
//! The kernel copies a pipe's pages into a reader's buffer with `rep movsb`. On some
//! processors (measured on an AMD EPYC VM) that copy is several times slower when the
//! destination does not sit at the same offset within its page as the source. A writer
//! fills a pipe's pages from their start, but a heap buffer from `malloc` starts 16 bytes
//! into a page; a [`PageBuf`] starts at a page boundary. Reading the pipe of `run-job` with
//! a secret into one took the same 500 MB from 1.29–1.46× the shell to 0.93× on that VM
//! (bench/README.md, "Other figures"). A file's page cache read with `pread` showed no such
//! difference there, so the live output's reads are left as they are.

/// The page size the buffer is aligned to. On a machine with larger pages it is still
/// aligned to 4 KiB, which is what the copy needs.
pub const PAGE: usize = 4096;

/// `len` usable bytes starting at a page boundary.
#[derive(Debug)]
pub struct PageBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl PageBuf {
    /// `len` zeroed bytes starting at a page boundary (a page more is allocated, so that
    /// one starts within it).
    pub fn new(len: usize) -> PageBuf {
        let raw = vec![0u8; len + PAGE];
        let start = (PAGE - raw.as_ptr() as usize % PAGE) % PAGE;
        PageBuf { raw, start, len }
    }

    /// The usable bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    /// The usable bytes, to be filled.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }

    /// How many bytes are usable.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no byte is usable.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_starts_at_a_page_boundary_with_every_byte_usable() {
        for len in [0, 1, 100, PAGE, 128 * 1024, 256 * 1024 + 7] {
            let mut buf = PageBuf::new(len);
            assert_eq!(buf.as_slice().as_ptr() as usize % PAGE, 0, "len {len}");
            assert_eq!(buf.len(), len);
            assert_eq!(buf.is_empty(), len == 0);
            buf.as_mut_slice().fill(0xA5);
            assert!(buf.as_slice().iter().all(|&b| b == 0xA5), "len {len}");
        }
    }
}
