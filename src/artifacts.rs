//! The artifacts archive (PROTOCOL §8.1): `artifacts/` of a run directory packed as a gzip
//! tarball rooted at the run directory, never following symlinks.

use flate2::write::GzEncoder;
use flate2::Compression;
use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

/// The folder test commands fill, relative to the run directory.
pub const ARTIFACTS_DIR: &str = "artifacts";

#[derive(Debug, thiserror::Error)]
#[error("cannot pack {dir} into {archive}: {source}")]
pub struct ArtifactError {
    pub dir: PathBuf,
    pub archive: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Packs `<rundir>/artifacts` into `archive` (members `artifacts`, `artifacts/...`).
/// Returns `false`, writing nothing, when the folder is missing or empty. Symlinks are
/// stored as links, never followed; sockets, FIFOs and devices are left out.
pub fn pack(rundir: &Path, archive: &Path) -> Result<bool, ArtifactError> {
    let dir = rundir.join(ARTIFACTS_DIR);
    let wrap = |source| ArtifactError {
        dir: dir.clone(),
        archive: archive.to_owned(),
        source,
    };
    let has_entries = match fs::symlink_metadata(&dir) {
        Ok(meta) if meta.is_dir() => fs::read_dir(&dir).map_err(wrap)?.next().is_some(),
        Ok(_) => false,
        Err(err) if err.kind() == io::ErrorKind::NotFound => false,
        Err(err) => return Err(wrap(err)),
    };
    if !has_entries {
        return Ok(false);
    }
    write_archive(&dir, archive).map_err(wrap)?;
    Ok(true)
}

fn write_archive(dir: &Path, archive: &Path) -> io::Result<()> {
    let file = BufWriter::new(File::create(archive)?);
    let mut builder = tar::Builder::new(GzEncoder::new(file, Compression::default()));
    builder.follow_symlinks(false);
    append_tree(&mut builder, dir, Path::new(ARTIFACTS_DIR))?;
    let encoder = builder.into_inner()?;
    let mut file = encoder.finish()?;
    io::Write::flush(&mut file)?;
    file.into_inner().map_err(|e| e.into_error())?.sync_all()
}

fn append_tree<W: io::Write>(
    builder: &mut tar::Builder<W>,
    path: &Path,
    name: &Path,
) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    let kind = meta.file_type();
    if kind.is_dir() {
        builder.append_dir(name, path)?;
        let mut entries: Vec<_> = fs::read_dir(path)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            append_tree(builder, &entry.path(), &name.join(entry.file_name()))?;
        }
    } else if kind.is_file() || kind.is_symlink() {
        // With follow_symlinks(false) a link is stored as a link.
        builder.append_path_with_name(path, name)?;
    } else {
        log::warn!(
            "artifacts: leaving out {} (not a file, folder or symlink)",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;

    fn members(archive: &Path) -> Vec<(String, tar::EntryType)> {
        let file = File::open(archive).expect("archive exists");
        let mut tar = tar::Archive::new(GzDecoder::new(file));
        tar.entries()
            .expect("readable")
            .map(|e| {
                let e = e.expect("entry");
                (
                    e.path().expect("path").display().to_string(),
                    e.header().entry_type(),
                )
            })
            .collect()
    }

    #[test]
    fn missing_or_empty_folder_packs_nothing() {
        let tmp = crate::testing::tempdir("artifacts-empty");
        let dir = tmp.path();
        let archive = dir.join("a.tar.gz");
        assert!(!pack(dir, &archive).expect("no error"));
        fs::create_dir(dir.join(ARTIFACTS_DIR)).expect("mkdir");
        assert!(!pack(dir, &archive).expect("no error"));
        assert!(!archive.exists());
    }

    #[test]
    fn packs_tree_and_keeps_symlinks_as_links() {
        let tmp = crate::testing::tempdir("artifacts-tree");
        let dir = tmp.path();
        let art = dir.join(ARTIFACTS_DIR);
        fs::create_dir_all(art.join("sub")).expect("mkdir");
        fs::write(art.join("a.txt"), "A").expect("write");
        fs::write(art.join("sub/b.bin"), [0u8, 255, 1]).expect("write");
        std::os::unix::fs::symlink("/etc/passwd", art.join("leak")).expect("symlink");
        let archive = dir.join("out.tar.gz");
        assert!(pack(dir, &archive).expect("pack"));
        let got = members(&archive);
        let names: Vec<_> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "artifacts",
                "artifacts/a.txt",
                "artifacts/leak",
                "artifacts/sub",
                "artifacts/sub/b.bin"
            ]
        );
        let leak = got
            .iter()
            .find(|(n, _)| n == "artifacts/leak")
            .expect("link member");
        assert_eq!(leak.1, tar::EntryType::Symlink, "the link is not followed");
    }
}
