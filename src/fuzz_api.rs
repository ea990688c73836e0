//! Entry points for the fuzz targets in `fuzz/` and for the corpus replay test: each takes
//! arbitrary bytes, feeds them to one input parser (or the masker) and must never panic.
//! Results are ignored, except for the invariants each function asserts; a panic, a hang or
//! a crash is a finding.

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
/// stream is masked at once, in pieces of that stride with one masker, and in pieces that
/// each start afresh where the previous one stopped (as a log file is sent): all three must
/// give the same bytes.
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
    // As a log file is sent: pieces of `stride` bytes (more when all undecided), each
    // masked afresh from where the previous one stopped.
    let mut fresh = Vec::new();
    let (mut from, mut want) = (0, stride);
    while from < stream.len() {
        let to = (from + want).min(stream.len());
        let (masked, used) = masker.mask_prefix(&stream[from..to], to == stream.len());
        if used == 0 {
            want += 1;
            continue;
        }
        fresh.extend(masked);
        from += used;
        want = stride;
    }
    assert_eq!(
        fresh, whole,
        "masking afresh in pieces of {stride} differs from masking at once"
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

/// The attachments unpacker, on arbitrary bytes as the downloaded archive: bytes that start
/// like gzip are the `.tar.gz` itself; others are gzipped first (as a plain tar), so that
/// the fuzzer also reaches the tar reader and the member checks. The archive is unpacked
/// into a fresh folder four levels below a scratch folder, which is then walked without
/// following links: nothing may appear outside the extraction root, nothing under it but
/// folders, single-link files (mode at most 0755) and symlinks whose target resolves,
/// by name, under a phase folder of the root; an archive refused by its checks must have
/// left no root at all.
pub fn attachments(data: &[u8]) {
    use crate::attachments::{unpack, AttachmentError};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);

    let scratch = std::env::temp_dir().join(format!(
        "tf-fuzz-attachments-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&scratch);
    let _cleanup = RemoveOnDrop(scratch.clone());
    let nest = scratch.join("a").join("b").join("c");
    std::fs::create_dir_all(&nest).expect("the scratch folder is writable");
    let archive = scratch.join("attachments.tar.gz");
    let bytes = if data.starts_with(&[0x1f, 0x8b]) {
        data.to_vec()
    } else {
        gzip(data)
    };
    std::fs::write(&archive, bytes).expect("the scratch folder is writable");
    let root = nest.join("attachments");

    let result = unpack(&archive, &root);
    if let Err(
        e @ (AttachmentError::Refused { .. }
        | AttachmentError::TooLarge { .. }
        | AttachmentError::TooManyMembers { .. }),
    ) = &result
    {
        assert!(!root.exists(), "refused ({e}) after writing");
    }
    check_contained(&scratch, &root, &archive);
}

/// Removes a scratch folder (without following links) when dropped, also by a panic.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("writing to memory");
    encoder.finish().expect("writing to memory")
}

/// Walks `scratch` (see [`attachments`]) and panics on anything out of place.
fn check_contained(scratch: &std::path::Path, root: &std::path::Path, archive: &std::path::Path) {
    use crate::attachments::PHASE_FOLDERS;
    use std::os::unix::fs::MetadataExt;
    use std::path::{Component, PathBuf};

    let mut stack = vec![scratch.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).expect("a scratch folder can be listed");
        for entry in entries {
            let path = entry.expect("a scratch entry can be read").path();
            let meta = std::fs::symlink_metadata(&path).expect("a listed entry exists");
            if path == root {
                assert!(meta.is_dir(), "the root is not a folder");
                stack.push(path);
                continue;
            }
            let Ok(rel) = path.strip_prefix(root) else {
                // Outside the root only the archive and the nest of folders above the root.
                let expected = path == archive || (root.starts_with(&path) && meta.is_dir());
                assert!(expected, "written outside the root: {}", path.display());
                if meta.is_dir() {
                    stack.push(path);
                }
                continue;
            };
            let first = rel.components().next().and_then(|c| c.as_os_str().to_str());
            assert!(
                first.is_some_and(|f| PHASE_FOLDERS.contains(&f)),
                "outside the phase folders: {}",
                path.display()
            );
            let kind = meta.file_type();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                assert_eq!(meta.nlink(), 1, "a hard link: {}", path.display());
                assert_eq!(
                    meta.mode() & 0o7777 & !0o755,
                    0,
                    "mode {:o} of {}",
                    meta.mode(),
                    path.display()
                );
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path).expect("a symlink can be read");
                // Resolve by name from the link's folder; never above the root.
                let mut resolved: Vec<&std::ffi::OsStr> =
                    rel.parent().map(|p| p.iter().collect()).unwrap_or_default();
                for component in target.components() {
                    match component {
                        Component::Normal(part) => resolved.push(part),
                        Component::CurDir => {}
                        Component::ParentDir => assert!(
                            resolved.pop().is_some(),
                            "{} -> {} leaves the root",
                            path.display(),
                            target.display()
                        ),
                        Component::RootDir | Component::Prefix(_) => {
                            panic!("{} -> {} is absolute", path.display(), target.display())
                        }
                    }
                }
                let resolved: PathBuf = resolved.iter().collect();
                let first = resolved.iter().next().and_then(|c| c.to_str());
                assert!(
                    resolved.components().count() >= 2
                        && first.is_some_and(|f| PHASE_FOLDERS.contains(&f)),
                    "{} -> {} leaves the phase folders",
                    path.display(),
                    target.display()
                );
                // What it points at, if anything, is inside the root too.
                if let Ok(real) = std::fs::canonicalize(&path) {
                    let real_root = std::fs::canonicalize(root).expect("the root exists");
                    assert!(
                        real.starts_with(&real_root),
                        "{} resolves to {}",
                        path.display(),
                        real.display()
                    );
                }
            } else {
                panic!("neither file, folder nor symlink: {}", path.display());
            }
        }
    }
}

/// Every answer of the server the agent parses, and the refresh-token file. Byte 0 picks
/// the parser (mod 6), the rest is the body:
/// 0. `GET /v1/job`: the poll body, then the job parser the daemon runs on it;
/// 1. `GET /v1/agents/data/<agent>`: the agent record, then its `updated_at` as the
///    heartbeat reads it;
/// 2. `GET /v1/result/<id>`: the streamed `job_state` reader (how the agent sees a
///    cancellation), read at once and one byte at a time, which must agree; a JSON object
///    must never be an error, and one without `job_state` must give `None`;
/// 3. `POST /v1/oauth2/refresh`: the access token of a 200 answer;
/// 4. the refresh-token file;
/// 5. an error answer's body, as put into messages: never empty, at most 500 bytes and
///    an ellipsis.
pub fn server_answer(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => {
            if let Some(document) = crate::server::parse_job_poll(body.to_vec()) {
                assert!(!document.iter().all(u8::is_ascii_whitespace));
                if let Ok(job) = JobSpec::from_json(&document) {
                    assert!(crate::job::check_job_id(job.job_id()).is_ok());
                    touch_job(&job);
                }
            }
        }
        1 => {
            if let Ok(record) = crate::server::parse_agent_record(body) {
                if let Some(updated) = &record.updated_at {
                    let _ = crate::time::age_of(updated);
                }
            }
        }
        2 => {
            let what = "GET /v1/result/fuzz";
            let whole = crate::server::parse_job_state(body, what);
            let trickled = crate::server::parse_job_state(OneByte(body), what);
            let summary = |r: &Result<Option<String>, crate::server::ServerError>| match r {
                Ok(state) => Ok(state.clone()),
                Err(e) => Err(e.kind),
            };
            assert_eq!(
                summary(&whole),
                summary(&trickled),
                "read at once vs bytewise"
            );
            if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) {
                let state = whole.expect("a JSON object is never an error");
                if !map.contains_key("job_state") {
                    assert_eq!(state, None);
                }
            }
        }
        3 => {
            if let Ok(token) = crate::server::parse_refresh_answer(body, "POST /v1/oauth2/refresh")
            {
                assert!(!token.is_empty());
            }
        }
        4 => {
            if let Ok(token) = crate::server::parse_token_file(body) {
                assert!(!token.trim().is_empty());
            }
        }
        _ => {
            let detail = crate::server::detail_of(body);
            assert!(!detail.is_empty(), "empty detail");
            assert!(
                detail.len() <= 500 + '…'.len_utf8(),
                "{} bytes",
                detail.len()
            );
        }
    }
}

/// A reader that hands out one byte per read.
struct OneByte<'a>(&'a [u8]);

impl std::io::Read for OneByte<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match (self.0.split_first(), buf.first_mut()) {
            (Some((&byte, rest)), Some(slot)) => {
                *slot = byte;
                self.0 = rest;
                Ok(1)
            }
            _ => Ok(0),
        }
    }
}

/// The files a device connector writes into the run directory. Byte 0 picks (mod 4) the
/// reader and, for `device-connector-error.json`, the phase (byte 0 / 4, mod 7); the rest
/// is the file:
/// 0. `device-connector-error.json` (objects appended back to back): the failure detail;
/// 1. `device-info.json` as posted to the server: a JSON object whose keys survive the trip;
/// 2. `device-info.json` as the release probe reads it: a device ip that passes the ssh
///    argument check cannot be read by ssh as an option or another destination;
/// 3. the DUT's `/etc/os-release` (over ssh): the release label.
pub fn device_files(data: &[u8]) {
    let Some((&which, text)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            let phases = crate::phase::Phase::ALL;
            let phase = phases[usize::from(which / 4) % phases.len()];
            let detail = crate::outcome::parse_connector_error(text, phase);
            assert!(detail.is_empty() || detail.contains(": "), "{detail:?}");
        }
        1 => {
            if let Some(info) = crate::outcome::parse_device_info(text) {
                assert!(info.is_object());
                let posted = serde_json::to_vec(&info).expect("a JSON value serialises");
                let again: serde_json::Value =
                    serde_json::from_slice(&posted).expect("what was posted parses again");
                // Keys and their order survive (numbers may move by a rounding step).
                let keys = |v: &serde_json::Value| {
                    v.as_object()
                        .map(|m| m.keys().cloned().collect::<Vec<_>>())
                        .unwrap_or_default()
                };
                assert_eq!(keys(&again), keys(&info), "device info changed on the way");
            }
        }
        2 => {
            if let Ok(Some(ip)) = crate::release::parse_device_ip(text, "device-info.json") {
                assert!(!ip.is_empty());
                if crate::release::check(&ip, true).is_ok() {
                    assert!(!ip.starts_with('-'), "{ip:?}");
                    assert!(!ip.contains(['@', ' ', '/', '\n', '=']), "{ip:?}");
                }
            }
        }
        _ => {
            let label = crate::release::release_label(&String::from_utf8_lossy(text));
            assert!(!label.is_empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A scratch tree as [`attachments`] leaves it, with `plant` applied; whether the walk
    /// of [`check_contained`] accepts it.
    fn walk_accepts(name: &str, plant: impl Fn(&Path, &Path)) -> bool {
        let scratch =
            std::env::temp_dir().join(format!("tf-fuzz-walk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        let _cleanup = RemoveOnDrop(scratch.clone());
        let root = scratch.join("a/b/c/attachments");
        std::fs::create_dir_all(root.join("test/sub")).expect("scratch");
        std::fs::write(root.join("test/sub/run.sh"), b"x").expect("scratch");
        std::fs::write(scratch.join("attachments.tar.gz"), b"").expect("scratch");
        plant(&scratch, &root);
        let walked = std::panic::catch_unwind(|| {
            check_contained(&scratch, &root, &scratch.join("attachments.tar.gz"))
        });
        walked.is_ok()
    }

    #[test]
    fn the_walk_finds_what_escaped() {
        use std::os::unix::fs::symlink;
        assert!(walk_accepts("clean", |_, root| {
            symlink("sub/run.sh", root.join("test/inside")).expect("link");
            symlink("../test/sub", root.join("test/sub/up")).expect("link");
        }));
        assert!(!walk_accepts("outside", |scratch, _| {
            std::fs::write(scratch.join("a/b/evil"), b"x").expect("plant");
        }));
        assert!(!walk_accepts("no-phase", |_, root| {
            std::fs::write(root.join("evil"), b"x").expect("plant");
        }));
        assert!(!walk_accepts("link-up", |_, root| {
            symlink("../../x", root.join("test/l")).expect("link");
        }));
        assert!(!walk_accepts("link-abs", |_, root| {
            symlink("/etc/passwd", root.join("test/l")).expect("link");
        }));
        assert!(!walk_accepts("link-root", |_, root| {
            symlink("..", root.join("test/l")).expect("link");
        }));
        assert!(!walk_accepts("hard", |_, root| {
            std::fs::hard_link(root.join("test/sub/run.sh"), root.join("test/h")).expect("link");
        }));
        assert!(!walk_accepts("setuid", |_, root| {
            use std::os::unix::fs::PermissionsExt;
            let path = root.join("test/sub/run.sh");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o4755))
                .expect("chmod");
        }));
    }
}
