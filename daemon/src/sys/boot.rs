//! Which A/B slot the system booted from and which image version it runs, for the health message
//! (a fleet view shows which devices run what, and whether an update took).
//!
//! Only reads, never fails: whatever is missing is `None`. The sources are parameters
//! ([`BootSources`]) so unit tests use temp-dir fakes. The slot comes from, in order:
//! 1. `edgeinfer.slot=<name>` on the kernel command line (set by our U-Boot script on the Pi);
//! 2. `boot.slot_suffix=` (`""` is slot a, `"_b"` slot b: NVIDIA's L4T launcher on Jetson, as
//!    meta-tegra's initrd `platform-preboot.sh` reads it), or `rauc.slot=<name>`;
//! 3. the UEFI variable `BootChainOsCurrent` (Jetson UEFI: 4 attribute bytes, then a little-endian
//!    u32, 0 = a, 1 = b), the fallback meta-tegra's initrd uses too.
//!
//! The image version comes from os-release: `IMAGE_ID`/`IMAGE_VERSION` (systemd's fields for an
//! image build, set by the Yocto distro), `VERSION_ID` and `BUILD_ID`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Most bytes read from any of the files (all are well under 4 KiB).
const MAX_BYTES: u64 = 64 * 1024;
/// The Jetson UEFI variable holding the current OS boot chain (0 = a, 1 = b).
const BOOT_CHAIN_VAR: &str = "BootChainOsCurrent-781e084c-a330-417c-b678-38e696380cb9";

/// Where the boot facts are read from.
#[derive(Debug, Clone)]
pub struct BootSources {
    pub os_release: PathBuf,
    pub cmdline: PathBuf,
    pub efivars: PathBuf,
}

impl Default for BootSources {
    fn default() -> Self {
        BootSources {
            os_release: PathBuf::from("/etc/os-release"),
            cmdline: PathBuf::from("/proc/cmdline"),
            efivars: PathBuf::from("/sys/firmware/efi/efivars"),
        }
    }
}

/// The booted slot and image, as reported in health under `boot`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BootInfo {
    /// `a`, `b`, or whatever name the bootloader passed; `None` when not an A/B system.
    pub slot: Option<String>,
    /// Where the slot came from (`cmdline:edgeinfer.slot`, `cmdline:boot.slot_suffix`,
    /// `cmdline:rauc.slot`, `efivar:BootChainOsCurrent`).
    pub slot_source: Option<&'static str>,
    pub image_id: Option<String>,
    pub image_version: Option<String>,
    pub os_id: Option<String>,
    pub version_id: Option<String>,
    pub build_id: Option<String>,
}

fn read_bounded(path: &Path) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    fs::File::open(path).ok()?.take(MAX_BYTES).read_to_end(&mut buf).ok()?;
    Some(buf)
}

/// One `KEY=value` of an os-release file, unquoted (`"..."` or `'...'`, backslash escapes).
fn os_release_value(text: &str, key: &str) -> Option<String> {
    text.lines().rev().find_map(|line| {
        let (k, v) = line.trim().split_once('=')?;
        if k != key {
            return None;
        }
        let v = v.trim();
        let unquoted = match v.as_bytes().first() {
            Some(q @ (b'"' | b'\'')) if v.len() >= 2 && v.as_bytes()[v.len() - 1] == *q => {
                &v[1..v.len() - 1]
            }
            _ => v,
        };
        let mut out = String::with_capacity(unquoted.len());
        let mut chars = unquoted.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                out.extend(chars.next());
            } else {
                out.push(c);
            }
        }
        Some(out).filter(|s| !s.is_empty())
    })
}

/// The slot named on the kernel command line, if any.
fn slot_from_cmdline(cmdline: &str) -> Option<(String, &'static str)> {
    let args: Vec<&str> = cmdline.split_ascii_whitespace().collect();
    let value = |key: &str| args.iter().rev().find_map(|a| a.strip_prefix(key));
    if let Some(s) = value("edgeinfer.slot=").filter(|s| !s.is_empty()) {
        return Some((s.to_string(), "cmdline:edgeinfer.slot"));
    }
    if let Some(sfx) = value("boot.slot_suffix=") {
        let slot = match sfx {
            "" | "_a" => "a".to_string(),
            other => other.trim_start_matches('_').to_string(),
        };
        return Some((slot, "cmdline:boot.slot_suffix"));
    }
    value("rauc.slot=").filter(|s| !s.is_empty()).map(|s| (s.to_string(), "cmdline:rauc.slot"))
}

/// The Jetson UEFI boot chain variable: 4 bytes of attributes, then a little-endian u32.
fn slot_from_efivar(efivars: &Path) -> Option<String> {
    let data = read_bounded(&efivars.join(BOOT_CHAIN_VAR))?;
    let value: [u8; 4] = data.get(4..8)?.try_into().ok()?;
    match u32::from_le_bytes(value) {
        0 => Some("a".into()),
        1 => Some("b".into()),
        _ => None,
    }
}

/// Reads the booted slot and the image version. Never fails; missing facts are `None`.
pub fn read(src: &BootSources) -> BootInfo {
    let os = read_bounded(&src.os_release).map(|b| String::from_utf8_lossy(&b).into_owned());
    let field = |k: &str| os.as_deref().and_then(|t| os_release_value(t, k));
    let cmdline = read_bounded(&src.cmdline).map(|b| String::from_utf8_lossy(&b).into_owned());
    let (slot, slot_source) = match cmdline.as_deref().and_then(slot_from_cmdline) {
        Some((s, from)) => (Some(s), Some(from)),
        None => match slot_from_efivar(&src.efivars) {
            Some(s) => (Some(s), Some("efivar:BootChainOsCurrent")),
            None => (None, None),
        },
    };
    BootInfo {
        slot,
        slot_source,
        image_id: field("IMAGE_ID"),
        image_version: field("IMAGE_VERSION"),
        os_id: field("ID"),
        version_id: field("VERSION_ID"),
        build_id: field("BUILD_ID"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(os_release: &str, cmdline: &str) -> (tempfile::TempDir, BootSources) {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = BootSources {
            os_release: dir.path().join("os-release"),
            cmdline: dir.path().join("cmdline"),
            efivars: dir.path().join("efivars"),
        };
        fs::write(&src.os_release, os_release).expect("write");
        fs::write(&src.cmdline, cmdline).expect("write");
        fs::create_dir(&src.efivars).expect("mkdir");
        (dir, src)
    }

    const OS_RELEASE: &str = "ID=edgeinfer\nNAME=\"edgeinfer OS\"\nVERSION_ID=\"1.2.0\"\n\
        IMAGE_ID=edgeinfer-image\nIMAGE_VERSION='1.2.0+20260901'\nBUILD_ID=\"a\\\"b\"\n";

    #[test]
    fn pi_slot_from_our_cmdline_and_version_from_os_release() {
        let (_d, src) = fake(OS_RELEASE, "console=ttyS0 root=/dev/mmcblk0p3 edgeinfer.slot=b ro\n");
        let b = read(&src);
        assert_eq!(b.slot.as_deref(), Some("b"));
        assert_eq!(b.slot_source, Some("cmdline:edgeinfer.slot"));
        assert_eq!(b.image_id.as_deref(), Some("edgeinfer-image"));
        assert_eq!(b.image_version.as_deref(), Some("1.2.0+20260901"));
        assert_eq!(b.version_id.as_deref(), Some("1.2.0"));
        assert_eq!(b.os_id.as_deref(), Some("edgeinfer"));
        assert_eq!(b.build_id.as_deref(), Some("a\"b"));
    }

    #[test]
    fn jetson_slot_suffix_on_cmdline() {
        let (_d, src) = fake("", "root=PARTLABEL=APP boot.slot_suffix= ro");
        assert_eq!(read(&src).slot.as_deref(), Some("a"));
        let (_d, src) = fake("", "boot.slot_suffix=_b rootwait");
        let b = read(&src);
        assert_eq!(
            (b.slot.as_deref(), b.slot_source),
            (Some("b"), Some("cmdline:boot.slot_suffix"))
        );
    }

    #[test]
    fn jetson_slot_from_the_uefi_variable() {
        let (_d, src) = fake("", "rootwait");
        let mut var = 6u32.to_le_bytes().to_vec();
        var.extend(1u32.to_le_bytes());
        fs::write(src.efivars.join(BOOT_CHAIN_VAR), &var).expect("write");
        let b = read(&src);
        assert_eq!(b.slot.as_deref(), Some("b"));
        assert_eq!(b.slot_source, Some("efivar:BootChainOsCurrent"));
        // A truncated or unknown value is no slot, not a panic.
        fs::write(src.efivars.join(BOOT_CHAIN_VAR), [6, 0, 0]).expect("write");
        assert_eq!(read(&src).slot, None);
        fs::write(src.efivars.join(BOOT_CHAIN_VAR), [6, 0, 0, 0, 7, 0, 0, 0]).expect("write");
        assert_eq!(read(&src).slot, None);
    }

    #[test]
    fn nothing_there_is_all_none() {
        let src = BootSources {
            os_release: "/nonexistent/os-release".into(),
            cmdline: "/nonexistent/cmdline".into(),
            efivars: "/nonexistent/efivars".into(),
        };
        assert_eq!(read(&src), BootInfo::default());
        // Non-A/B systems: no slot even with an os-release.
        let (_d, src) = fake("ID=debian\nVERSION_ID=\"12\"\n", "root=/dev/sda1 quiet");
        let b = read(&src);
        assert_eq!((b.slot, b.version_id.as_deref()), (None, Some("12")));
    }
}
