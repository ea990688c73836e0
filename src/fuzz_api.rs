//! Entry points for the fuzz targets in `fuzz/` and for the corpus replay test: each takes
//! arbitrary bytes, feeds them to one input parser (or the masker) and must never panic.
//! Results are ignored; only a panic, a hang or a crash is a finding.

use crate::config::Config;
use crate::job::JobSpec;
use crate::mask::Masker;

/// The config parser, on the bytes as text (lossily decoded, as a file read would fail on
/// invalid UTF-8 before parsing); a config that loads must also render and load again.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(config) = Config::from_yaml(&text) {
        let again = Config::from_yaml(&config.effective_yaml());
        assert!(
            again.is_ok(),
            "effective config does not load again: {again:?}\n{}",
            config.effective_yaml()
        );
        let _ = config.command_env();
    }
}

/// The server-job parser, on raw bytes.
pub fn job_json(data: &[u8]) {
    if let Ok(job) = JobSpec::from_json(data) {
        assert_eq!(
            job.document_json(),
            data,
            "testflinger.json must be the bytes received"
        );
        touch_job(&job);
    }
}

/// The person-job parser (`run-job`), on the bytes as text.
pub fn job_yaml(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(job) = JobSpec::from_yaml(&text) {
        // What is written to testflinger.json must be a JSON job the server path accepts.
        let again = JobSpec::from_json(&job.document_json());
        assert!(
            again.is_ok(),
            "document_json does not parse again: {again:?}"
        );
        touch_job(&job);
    }
}

fn touch_job(job: &JobSpec) {
    let _ = (job.test_cmds(), job.job_queue(), job.attachments_complete());
    for phase in crate::phase::Phase::ALL {
        let _ = (job.phase_data(phase), job.secrets(phase));
    }
    let mut copy = job.clone();
    copy.drop_attachment_lists();
}

/// The masker. Layout: byte 0 = number of secrets (mod 4); then per secret one length byte
/// (mod 8) and that many bytes; then one byte of split stride; the rest is the stream. The
/// stream is masked in pieces and at once, and the two results must be equal.
pub fn mask(data: &[u8]) {
    let mut rest = data;
    let mut take = |n: usize| {
        let n = n.min(rest.len());
        let (head, tail) = rest.split_at(n);
        rest = tail;
        head
    };
    let count = take(1).first().map_or(0, |b| b % 4);
    let mut secrets = Vec::new();
    for _ in 0..count {
        let len = take(1).first().map_or(0, |b| usize::from(b % 8));
        secrets.push(take(len).to_vec());
    }
    let stride = take(1).first().map_or(1, |b| usize::from(b % 16) + 1);
    let stream = rest;

    let masker = Masker::new(&secrets);
    let whole = masker.mask_all(stream);
    let mut streaming = masker.clone();
    let mut pieces = Vec::new();
    for piece in stream.chunks(stride) {
        streaming.mask_into(piece, &mut pieces);
    }
    streaming.finish_into(&mut pieces);
    assert_eq!(
        pieces, whole,
        "masking in pieces of {stride} differs from masking at once"
    );
}

/// The journal reader, on raw bytes: a journal that parses must write and parse again to
/// the same value.
pub fn journal(data: &[u8]) {
    if let Ok(journal) = crate::journal::Journal::from_bytes(data) {
        let again = crate::journal::Journal::from_bytes(&journal.to_bytes());
        assert_eq!(again.ok().as_ref(), Some(&journal), "journal round trip");
    }
}
