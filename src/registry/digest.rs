//! Artifact digests. A file's digest is its plain SHA-256 (what `sha256sum` prints). A
//! directory's digest is the SHA-256 of its manifest: one line per regular file,
//! `<sha256 hex>  <relative path>\n` (two spaces, `/` separators), sorted by the path's bytes —
//! the output of `find . -type f | sed 's|^./||' | LC_ALL=C sort | xargs sha256sum`. Symlinks are
//! refused unless allowed (then their targets are hashed as if they were regular files).
//!
//! Hashing streams through a fixed 1 MiB buffer, so memory stays flat whatever the artifact size.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const BUFFER: usize = 1024 * 1024;
/// Files at least this big show a progress line on a terminal.
const PROGRESS_FROM: u64 = 256 * 1024 * 1024;

/// One file of a directory artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    pub path: String,
    pub sha256: String,
}

/// What hashing an artifact found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactDigest {
    pub digest: String,
    /// Empty for a single file.
    pub manifest: Vec<ManifestEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is a symlink; symlinks are refused in artifacts unless allowed (--allow-symlinks)"
    )]
    Symlink { path: PathBuf },
    #[error("{path} is neither a file nor a directory")]
    NotAFile { path: PathBuf },
    #[error("{path}: file names must be UTF-8 to be listed in a manifest")]
    NotUtf8 { path: PathBuf },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> DigestError + '_ {
    move |source| DigestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Hashes a file or a directory artifact.
pub fn digest_artifact(path: &Path, allow_symlinks: bool) -> Result<ArtifactDigest, DigestError> {
    let meta = std::fs::symlink_metadata(path).map_err(io(path))?;
    if meta.file_type().is_symlink() && !allow_symlinks {
        return Err(DigestError::Symlink {
            path: path.to_path_buf(),
        });
    }
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if meta.is_file() {
        return Ok(ArtifactDigest {
            digest: sha256_file(path)?,
            manifest: Vec::new(),
        });
    }
    if !meta.is_dir() {
        return Err(DigestError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mut files = Vec::new();
    collect_files(path, path, allow_symlinks, &mut files)?;
    files.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut manifest = Vec::with_capacity(files.len());
    for (relative, full) in files {
        manifest.push(ManifestEntry {
            sha256: sha256_file(&full)?,
            path: relative,
        });
    }
    Ok(ArtifactDigest {
        digest: manifest_digest(&manifest),
        manifest,
    })
}

/// SHA-256 of a manifest in its documented text form.
pub fn manifest_digest(manifest: &[ManifestEntry]) -> String {
    let mut hasher = Sha256::new();
    for entry in manifest {
        hasher.update(entry.sha256.as_bytes());
        hasher.update(b"  ");
        hasher.update(entry.path.as_bytes());
        hasher.update(b"\n");
    }
    hex(&hasher.finalize())
}

fn collect_files(
    root: &Path,
    dir: &Path,
    allow_symlinks: bool,
    out: &mut Vec<(String, PathBuf)>,
) -> Result<(), DigestError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io(&path))?;
        if kind.is_symlink() && !allow_symlinks {
            return Err(DigestError::Symlink { path });
        }
        let meta = std::fs::metadata(&path).map_err(io(&path))?;
        if meta.is_dir() {
            collect_files(root, &path, allow_symlinks, out)?;
        } else if meta.is_file() {
            let relative = path
                .strip_prefix(root)
                .expect("walked from root")
                .to_str()
                .ok_or_else(|| DigestError::NotUtf8 { path: path.clone() })?
                .replace(std::path::MAIN_SEPARATOR, "/");
            out.push((relative, path));
        } else {
            return Err(DigestError::NotAFile { path });
        }
    }
    Ok(())
}

/// Plain SHA-256 of one file, streamed; shows progress on a terminal for big files.
pub fn sha256_file(path: &Path) -> Result<String, DigestError> {
    let mut file = File::open(path).map_err(io(path))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let show = size >= PROGRESS_FROM && std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; BUFFER];
    let mut done = 0u64;
    let mut shown_at = 0u64;
    loop {
        let n = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(path)(e)),
        };
        hasher.update(&buffer[..n]);
        done += n as u64;
        if show && done - shown_at >= 64 * 1024 * 1024 {
            shown_at = done;
            let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-6) / 1e6;
            eprint!(
                "\r  hashing {}: {:>3}% ({} of {} MB, {rate:.0} MB/s)",
                path.display(),
                done * 100 / size.max(1),
                done / 1_000_000,
                size / 1_000_000
            );
            let _ = std::io::stderr().flush();
        }
    }
    if show {
        eprintln!();
    }
    Ok(hex(&hasher.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// How a directory on disk differs from a recorded manifest.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ManifestDiff {
    pub changed: Vec<String>,
    pub missing: Vec<String>,
    pub extra: Vec<String>,
}

pub fn diff_manifests(expected: &[ManifestEntry], actual: &[ManifestEntry]) -> ManifestDiff {
    let mut diff = ManifestDiff::default();
    for e in expected {
        match actual.iter().find(|a| a.path == e.path) {
            None => diff.missing.push(e.path.clone()),
            Some(a) if a.sha256 != e.sha256 => diff.changed.push(e.path.clone()),
            Some(_) => {}
        }
    }
    for a in actual {
        if expected.iter().all(|e| e.path != a.path) {
            diff.extra.push(a.path.clone());
        }
    }
    diff
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weir-digest-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn known_vectors() {
        let d = dir("vectors");
        let abc = d.join("abc");
        std::fs::write(&abc, "abc").unwrap();
        assert_eq!(
            sha256_file(&abc).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let empty = d.join("empty");
        std::fs::write(&empty, "").unwrap();
        assert_eq!(
            digest_artifact(&empty, false).unwrap().digest,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn directory_digest_is_its_sha256sum_manifest_whatever_the_creation_order() {
        let a = dir("order-a");
        let b = dir("order-b");
        std::fs::create_dir_all(a.join("sub")).unwrap();
        std::fs::create_dir_all(b.join("sub")).unwrap();
        std::fs::write(a.join("z.bin"), "zz").unwrap();
        std::fs::write(a.join("sub/a.json"), "{}").unwrap();
        std::fs::write(a.join("abc"), "abc").unwrap();
        std::fs::write(b.join("abc"), "abc").unwrap();
        std::fs::write(b.join("sub/a.json"), "{}").unwrap();
        std::fs::write(b.join("z.bin"), "zz").unwrap();
        let da = digest_artifact(&a, false).unwrap();
        let db = digest_artifact(&b, false).unwrap();
        assert_eq!(da, db);
        let paths: Vec<_> = da.manifest.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["abc", "sub/a.json", "z.bin"]);
        // The documented form: sha256 of "<hex>  <path>\n" lines.
        let text: String = da
            .manifest
            .iter()
            .map(|e| format!("{}  {}\n", e.sha256, e.path))
            .collect();
        assert_eq!(da.digest, hex(&Sha256::digest(text.as_bytes())));
        let _ = std::fs::remove_dir_all(&a);
        let _ = std::fs::remove_dir_all(&b);
    }

    #[test]
    fn symlinks_are_refused_unless_allowed() {
        let d = dir("symlink");
        std::fs::write(d.join("real"), "x").unwrap();
        std::os::unix::fs::symlink(d.join("real"), d.join("link")).unwrap();
        let err = digest_artifact(&d, false).unwrap_err();
        assert!(matches!(err, DigestError::Symlink { .. }), "{err}");
        assert_eq!(digest_artifact(&d, true).unwrap().manifest.len(), 2);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn diffs_name_changed_missing_and_extra_files() {
        let e = |p: &str, h: &str| ManifestEntry {
            path: p.into(),
            sha256: h.into(),
        };
        let diff = diff_manifests(
            &[e("a", "1"), e("b", "2"), e("c", "3")],
            &[e("a", "1"), e("b", "9"), e("d", "4")],
        );
        assert_eq!(diff.changed, ["b"]);
        assert_eq!(diff.missing, ["c"]);
        assert_eq!(diff.extra, ["d"]);
    }
}
