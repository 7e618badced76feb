//! Crash-safe file writes and file hashing, shared by everything the daemon writes (OTA staging
//! and installs, the model cache, rollback restores). A write goes to a temporary file in the
//! target's directory, is fsync'd, renamed over the target, and the directory is fsync'd: a crash
//! at any point leaves either the old or the new file, never a torn one.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// SHA-256 of everything `r` yields, as lowercase hex (streamed: no copy of the whole file).
pub fn sha256_hex(r: &mut impl Read) -> io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(hex(&h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Replaces `path` with what `write` puts into a fresh file: temporary file, fsync, rename,
/// directory fsync. On failure the temporary file is removed and `path` is untouched.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = tmp_path(path);
    let res = (|| {
        let mut f = File::create(&tmp)?;
        write(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn writes_replace_whole_files_and_failures_leave_the_old_one() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("f");
        write_atomic(&p, |f| f.write_all(b"one")).expect("write");
        write_atomic(&p, |f| f.write_all(b"two")).expect("write");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        let err = write_atomic(&p, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&p).expect("read"), b"two", "old content kept");
        assert!(!tmp_path(&p).exists(), "no temporary file left behind");
    }

    #[test]
    fn hashes_match_the_reference() {
        // SHA-256("abc"), FIPS 180-2.
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_hex(&mut &b"abc"[..]).expect("hash"), want);
        assert_eq!(hex(&Sha256::digest(b"abc")), want);
    }
}
