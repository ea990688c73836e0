//! Unpacking a job's attachments archive (PROTOCOL §7) without trusting it: every member is
//! checked before anything is written; paths must stay under `provision/`,
//! `firmware_update/` or `test/` of the extraction root; only files, folders and symlinks
//! whose target stays inside a phase folder are accepted; sizes are capped; symlinks are
//! created last, so no file is ever written through one.

use flate2::read::GzDecoder;
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// The folders an attachment may live in, one per phase that takes attachments.
pub const PHASE_FOLDERS: [&str; 3] = ["provision", "firmware_update", "test"];
/// The most bytes an archive may unpack to.
pub const MAX_TOTAL_BYTES: u64 = 8 << 30;
/// The most members an archive may have.
pub const MAX_MEMBERS: usize = 100_000;

/// Why an archive was refused or could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum AttachmentError {
    #[error("member {member:?}: {reason}")]
    Refused { member: String, reason: String },
    #[error("the archive unpacks to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the archive has more than {limit} members")]
    TooManyMembers { limit: usize },
    #[error("cannot read the archive: {0}")]
    Read(#[source] io::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What one checked member becomes.
#[derive(Debug, PartialEq, Eq)]
enum Planned {
    Dir(PathBuf),
    File { path: PathBuf, mode: u32 },
    Symlink { path: PathBuf, target: PathBuf },
}

/// Unpacks the gzip tarball `archive` into `root` (which must not exist yet).
pub fn unpack(archive: &Path, root: &Path) -> Result<(), AttachmentError> {
    let open = || -> Result<tar::Archive<GzDecoder<File>>, AttachmentError> {
        let file = File::open(archive).map_err(AttachmentError::Read)?;
        Ok(tar::Archive::new(GzDecoder::new(file)))
    };
    // Pass 1: check every member; nothing is written.
    let mut plan = Vec::new();
    let mut total: u64 = 0;
    for entry in open()?.entries().map_err(AttachmentError::Read)? {
        let entry = entry.map_err(AttachmentError::Read)?;
        if plan.len() >= MAX_MEMBERS {
            return Err(AttachmentError::TooManyMembers { limit: MAX_MEMBERS });
        }
        total = total.saturating_add(entry.header().size().map_err(AttachmentError::Read)?);
        if total > MAX_TOTAL_BYTES {
            return Err(AttachmentError::TooLarge {
                limit: MAX_TOTAL_BYTES,
            });
        }
        plan.push(check_member(&entry)?);
    }
    check_links(&plan)?;
    // Pass 2: folders and files in archive order, symlinks last.
    fs::create_dir_all(root).map_err(|source| AttachmentError::Write {
        path: root.to_owned(),
        source,
    })?;
    let mut links = Vec::new();
    let mut planned = plan.into_iter();
    for entry in open()?.entries().map_err(AttachmentError::Read)? {
        let mut entry = entry.map_err(AttachmentError::Read)?;
        let Some(step) = planned.next() else { break };
        match step {
            Planned::Dir(rel) => {
                let path = root.join(rel);
                fs::create_dir_all(&path)
                    .map_err(|source| AttachmentError::Write { path, source })?;
            }
            Planned::File { path: rel, mode } => {
                let path = root.join(rel);
                write_file(&mut entry, &path, mode)
                    .map_err(|source| AttachmentError::Write { path, source })?;
            }
            Planned::Symlink { path, target } => links.push((path, target)),
        }
    }
    for (rel, target) in links {
        let path = root.join(rel);
        let made = path
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| std::os::unix::fs::symlink(&target, &path));
        made.map_err(|source| AttachmentError::Write { path, source })?;
    }
    Ok(())
}

fn write_file(entry: &mut impl Read, path: &Path, mode: u32) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    // A duplicate member replaces the earlier file; nothing else can be in the way, as
    // links are only created after every file.
    if fs::symlink_metadata(path).is_ok_and(|m| m.is_file()) {
        fs::remove_file(path)?;
    }
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    io::copy(entry, &mut out)?;
    out.set_permissions(fs::Permissions::from_mode(mode))
}

fn check_member<R: Read>(entry: &tar::Entry<'_, R>) -> Result<Planned, AttachmentError> {
    let raw = entry.path_bytes();
    let member = String::from_utf8_lossy(&raw).into_owned();
    let refuse = |reason: &str| AttachmentError::Refused {
        member: member.clone(),
        reason: reason.to_owned(),
    };
    let path = safe_relative(Path::new(&*String::from_utf8_lossy(&raw))).map_err(&refuse)?;
    let header = entry.header();
    match header.entry_type() {
        tar::EntryType::Directory => Ok(Planned::Dir(path)),
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            let mode = header.mode().map_err(AttachmentError::Read)?;
            Ok(Planned::File {
                path,
                mode: file_mode(mode),
            })
        }
        tar::EntryType::Symlink => {
            let target = entry
                .link_name()
                .map_err(AttachmentError::Read)?
                .ok_or_else(|| refuse("symlink without a target"))?
                .into_owned();
            Ok(Planned::Symlink { path, target })
        }
        tar::EntryType::Link => Err(refuse("hard links are not accepted")),
        _ => Err(refuse(
            "only files, folders and symlinks are accepted (not devices, FIFOs or others)",
        )),
    }
}

/// Mode of an unpacked file: at most 0755, always owner read/write, and no execute bits
/// unless the owner could execute it.
fn file_mode(mode: u32) -> u32 {
    let mode = (mode & 0o755) | 0o600;
    if mode & 0o100 == 0 {
        mode & !0o111
    } else {
        mode
    }
}

/// A member path made relative and checked: no root, no `..`, and under a phase folder.
fn safe_relative(path: &Path) -> Result<PathBuf, &'static str> {
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("`..` in the path is not accepted"),
            Component::RootDir | Component::Prefix(_) => {
                return Err("absolute paths are not accepted")
            }
        }
    }
    under_phase_folder(&clean)?;
    Ok(clean)
}

fn under_phase_folder(path: &Path) -> Result<(), &'static str> {
    let mut parts = path.components();
    let first = parts.next().and_then(|c| c.as_os_str().to_str());
    if !first.is_some_and(|f| PHASE_FOLDERS.contains(&f)) {
        return Err("attachments must be under provision/, firmware_update/ or test/");
    }
    if parts.next().is_none() {
        return Err("a phase folder itself cannot be a member");
    }
    Ok(())
}

/// Checks every symlink against the whole plan: its target must be relative and, resolved
/// from the link's folder, stay under a phase folder without ever going above the root and
/// without passing through another symlink (so resolving it on disk gives the same path as
/// resolving it by name). No member may sit below a symlink either, so nothing is ever
/// written through one.
fn check_links(plan: &[Planned]) -> Result<(), AttachmentError> {
    let links: HashSet<&Path> = plan
        .iter()
        .filter_map(|p| match p {
            Planned::Symlink { path, .. } => Some(path.as_path()),
            _ => None,
        })
        .collect();
    if links.is_empty() {
        return Ok(());
    }
    for step in plan {
        let path = match step {
            Planned::Dir(path) | Planned::File { path, .. } | Planned::Symlink { path, .. } => path,
        };
        if path.ancestors().skip(1).any(|a| links.contains(a)) {
            return Err(AttachmentError::Refused {
                member: path.display().to_string(),
                reason: "it would be written through a symlink of the archive".to_owned(),
            });
        }
        if let Planned::Symlink { path, target } = step {
            check_link_target(path, target, &links).map_err(|reason| AttachmentError::Refused {
                member: path.display().to_string(),
                reason: reason.to_owned(),
            })?;
        }
    }
    Ok(())
}

fn check_link_target(
    link: &Path,
    target: &Path,
    links: &HashSet<&Path>,
) -> Result<(), &'static str> {
    let mut resolved: PathBuf = link.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut parts = target.components().peekable();
    while let Some(component) = parts.next() {
        match component {
            Component::Normal(part) => {
                resolved.push(part);
                if parts.peek().is_some() && links.contains(resolved.as_path()) {
                    return Err("symlink target passes through another symlink");
                }
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if !resolved.pop() {
                    return Err("symlink target leaves the extraction root");
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err("symlink targets must be relative")
            }
        }
    }
    under_phase_folder(&resolved).map_err(|_| "symlink target leaves the phase folders")
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use proptest::prelude::*;

    enum Member<'a> {
        File(&'a str, &'a [u8], u32),
        Dir(&'a str),
        Link(&'a str, &'a str),
        Fifo(&'a str),
        Hard(&'a str, &'a str),
    }

    /// Builds an archive with raw header names, so hostile paths can be written.
    fn archive(dir: &Path, members: &[Member<'_>]) -> PathBuf {
        let path = dir.join("a.tar.gz");
        let file = File::create(&path).expect("create");
        let mut builder = tar::Builder::new(GzEncoder::new(file, flate2::Compression::fast()));
        for m in members {
            let mut h = tar::Header::new_gnu();
            let (name, data): (&str, &[u8]) = match m {
                Member::File(n, d, mode) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    (n, d)
                }
                Member::Dir(n) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    (n, &[])
                }
                Member::Link(n, t) | Member::Hard(n, t) => {
                    h.set_entry_type(if matches!(m, Member::Link(..)) {
                        tar::EntryType::Symlink
                    } else {
                        tar::EntryType::Link
                    });
                    // Raw, like the name: hostile targets are written as given.
                    let gnu = h.as_gnu_mut().expect("gnu header");
                    gnu.linkname[..t.len()].copy_from_slice(t.as_bytes());
                    (n, &[])
                }
                Member::Fifo(n) => {
                    h.set_entry_type(tar::EntryType::Fifo);
                    (n, &[])
                }
            };
            {
                let gnu = h.as_gnu_mut().expect("gnu header");
                gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            }
            h.set_size(data.len() as u64);
            h.set_cksum();
            builder.append(&h, data).expect("append");
        }
        builder.into_inner().expect("tar").finish().expect("gzip");
        path
    }

    #[test]
    fn unpacks_files_dirs_and_inside_links_with_safe_modes() {
        let tmp = crate::testing::tempdir("attach-ok");
        let dir = tmp.path();
        let a = archive(
            dir,
            &[
                Member::Dir("test/sub"),
                Member::File("test/sub/run.sh", b"echo hi", 0o4777),
                Member::File("provision/config.json", b"{}", 0o666),
                Member::Link("test/cfg", "../provision/config.json"),
            ],
        );
        let root = dir.join("attachments");
        unpack(&a, &root).expect("accepted");
        let mode = |p: &str| {
            fs::metadata(root.join(p))
                .expect("exists")
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("test/sub/run.sh"), 0o755);
        assert_eq!(mode("provision/config.json"), 0o644);
        assert_eq!(
            fs::read(root.join("test/cfg")).expect("link resolves"),
            b"{}"
        );
    }

    #[test]
    fn refuses_hostile_members_before_writing_anything() {
        let cases: Vec<(&str, Vec<Member<'_>>)> = vec![
            ("dotdot", vec![Member::File("test/../../evil", b"x", 0o644)]),
            ("absolute", vec![Member::File("/tmp/evil", b"x", 0o644)]),
            ("outside phase", vec![Member::File("other/x", b"x", 0o644)]),
            ("bare phase", vec![Member::Dir("test")]),
            ("link out", vec![Member::Link("test/l", "../../etc")]),
            ("link abs", vec![Member::Link("test/l", "/etc/passwd")]),
            ("link to root", vec![Member::Link("test/l", "..")]),
            ("fifo", vec![Member::Fifo("test/f")]),
            ("hard link", vec![Member::Hard("test/h", "test/x")]),
        ];
        for (label, members) in cases {
            let tmp = crate::testing::tempdir("attach-bad");
            let dir = tmp.path();
            let mut all = vec![Member::File("test/first", b"written?", 0o644)];
            all.extend(members);
            let a = archive(dir, &all);
            let root = dir.join("attachments");
            let err = unpack(&a, &root).expect_err(label);
            assert!(
                matches!(err, AttachmentError::Refused { .. }),
                "{label}: {err}"
            );
            assert!(!root.exists(), "{label}: nothing written before the check");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let tmp = crate::testing::tempdir("attach-garbage");
        let dir = tmp.path();
        let a = dir.join("x.tar.gz");
        fs::write(&a, b"not gzip at all").expect("write");
        assert!(unpack(&a, &dir.join("out")).is_err());
        fs::write(&a, b"").expect("write");
        assert!(unpack(&a, &dir.join("out")).is_err());
    }

    fn arb_component() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "test",
            "provision",
            "firmware_update",
            "a",
            "b",
            "..",
            ".",
            "/",
            "",
        ])
    }

    proptest! {
        /// Whatever the member path and link target, an accepted one stays under a phase
        /// folder of the root.
        #[test]
        fn accepted_paths_never_leave_their_root(
            parts in prop::collection::vec(arb_component(), 0..6),
            target in prop::collection::vec(arb_component(), 0..6),
        ) {
            let path = PathBuf::from(parts.join("/"));
            if let Ok(clean) = safe_relative(&path) {
                prop_assert!(clean.components().all(|c| matches!(c, Component::Normal(_))));
                prop_assert!(PHASE_FOLDERS.iter().any(|f| clean.starts_with(f)));
                let target = PathBuf::from(target.join("/"));
                if check_link_target(&clean, &target, &HashSet::new()).is_ok() {
                    // Resolve independently: never above the root, ends under a phase folder.
                    let mut depth: Vec<String> = clean
                        .parent()
                        .map(|p| p.iter().map(|c| c.to_string_lossy().into_owned()).collect())
                        .unwrap_or_default();
                    for c in target.components() {
                        match c {
                            Component::Normal(p) => depth.push(p.to_string_lossy().into_owned()),
                            Component::ParentDir => prop_assert!(depth.pop().is_some()),
                            Component::CurDir => {}
                            _ => prop_assert!(false, "absolute target accepted"),
                        }
                    }
                    prop_assert!(depth.len() >= 2);
                    prop_assert!(PHASE_FOLDERS.contains(&depth[0].as_str()));
                }
            }
        }
    }

    /// A member for [`archive`]: kind (0 file, 1 folder, 2 symlink, 3 hard link, 4 FIFO),
    /// path and link target. Hostile paths and targets come from [`arb_component`];
    /// most are plain names under a phase folder, so that many archives are accepted.
    fn arb_member() -> impl Strategy<Value = (u8, String, String)> {
        let hostile = || prop::collection::vec(arb_component(), 0..4).prop_map(|p| p.join("/"));
        let plain = || prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..3);
        let phase = || prop::sample::select(PHASE_FOLDERS.to_vec());
        let path = prop_oneof![
            1 => hostile(),
            3 => (phase(), plain()).prop_map(|(f, p)| format!("{f}/{}", p.join("/"))),
        ];
        let target = prop_oneof![
            1 => hostile(),
            1 => plain().prop_map(|p| p.join("/")),
            2 => (0usize..4, phase(), plain())
                .prop_map(|(up, f, p)| format!("{}{f}/{}", "../".repeat(up), p.join("/"))),
        ];
        let kind =
            prop_oneof![3 => Just(0u8), 2 => Just(1), 3 => Just(2), 1 => Just(3), 1 => Just(4)];
        (kind, path, target)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Whole archives of random members with hostile paths and link targets, unpacked
        /// by the fuzz target's harness: whatever is accepted, nothing is written outside
        /// the root, nothing under it but folders, single-link files and symlinks that
        /// resolve under a phase folder; a refused archive writes nothing.
        #[test]
        fn unpacked_archives_stay_in_their_root(
            members in prop::collection::vec(arb_member(), 1..5),
        ) {
            let tmp = crate::testing::tempdir("attach-prop");
            let dir = tmp.path();
            let built: Vec<Member<'_>> = members
                .iter()
                .map(|(kind, path, target)| match kind {
                    0 => Member::File(path, b"data", 0o4777),
                    1 => Member::Dir(path),
                    2 => Member::Link(path, target),
                    3 => Member::Hard(path, target),
                    _ => Member::Fifo(path),
                })
                .collect();
            let bytes = fs::read(archive(dir, &built)).expect("read the archive");
            crate::fuzz_api::attachments(&bytes);
        }
    }

    #[test]
    fn links_through_links_are_refused() {
        let tmp = crate::testing::tempdir("attach-chain");
        let dir = tmp.path();
        let a = archive(
            dir,
            &[
                Member::Link("test/up", "../provision"),
                Member::Link("test/esc", "up/../../x"),
            ],
        );
        assert!(unpack(&a, &dir.join("attachments")).is_err());
        let b = archive(
            dir,
            &[
                Member::Link("test/d", "../provision"),
                Member::File("test/d/evil", b"x", 0o644),
            ],
        );
        assert!(unpack(&b, &dir.join("attachments2")).is_err());
    }
}
