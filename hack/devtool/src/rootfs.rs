//! The file-system trees and runtime configs of the images a development
//! node needs: the sandbox ("pause") image, a busybox test image, and an
//! image from an arbitrary directory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use oci_spec::image::{Config, ConfigBuilder};

use crate::layout::{ImageRef, Tree};

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The user Kubernetes' own pause image runs as.
const PAUSE_USER: &str = "65535:65535";

/// Says the pause serves the hostname channel (hack/pause/pause.c; the runsc
/// adapter gives such a pause the channel's FIFOs, docs/runtimes.md).
const PAUSE_CHANNEL_ENV: &str = "FAST_SANDBOX_PAUSE_CHANNEL=hostname";

/// The sandbox image: `/pause` and nothing else, run as 65535 like the
/// upstream pause image.
pub fn pause_image(binary: &[u8]) -> Result<(Tree, Config)> {
    ensure_static_elf(binary).context("pause binary")?;
    let mut tree = Tree::default();
    tree.file("/pause", 0o755, binary.to_vec())?;
    let config = ConfigBuilder::default()
        .entrypoint(vec!["/pause".to_owned()])
        .user(PAUSE_USER)
        .working_dir("/")
        .env(vec![DEFAULT_PATH.to_owned(), PAUSE_CHANNEL_ENV.to_owned()])
        .build()
        .context("pause image config")?;
    Ok((tree, config))
}

/// A minimal userland: a static busybox at `/bin/busybox`, one symlink per
/// applet at the path `busybox --list-full` gives, and the files a shell
/// and the CRI bind mounts expect, plus `/etc/fast-sandbox-image` holding
/// the image's own name: images built under different names differ in
/// content, so a registry copy is really downloaded by a PullImage instead of
/// matching the imported image's layer, and a test can tell from inside a
/// container which image it runs.
///
/// `applets` are paths relative to `/` (`bin/sh`, `usr/bin/wget`, ...).
pub fn busybox_tree(binary: &[u8], applets: &[String], name: &ImageRef) -> Result<Tree> {
    ensure_static_elf(binary).context("busybox binary")?;
    let mut tree = Tree::default();
    for (dir, mode) in [
        ("/bin", 0o755),
        ("/sbin", 0o755),
        ("/usr/bin", 0o755),
        ("/usr/sbin", 0o755),
        ("/etc", 0o755),
        ("/dev", 0o755),
        ("/proc", 0o555),
        ("/sys", 0o555),
        ("/run", 0o755),
        ("/var/run", 0o755),
        ("/home", 0o755),
        ("/root", 0o700),
        ("/tmp", 0o1777),
        ("/var/tmp", 0o1777),
    ] {
        tree.dir(dir, mode)?;
    }
    tree.file("/bin/busybox", 0o755, binary.to_vec())?;
    for applet in applets {
        let path = format!("/{}", applet.trim_start_matches('/'));
        if path == "/bin/busybox" {
            continue;
        }
        tree.symlink(&path, "/bin/busybox")
            .with_context(|| format!("applet {applet}"))?;
    }
    for (path, contents) in [
        (
            "/etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        ("/etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("/etc/nsswitch.conf", "hosts: files dns\n"),
        // Bind-mount targets the CRI fills per sandbox.
        ("/etc/hostname", ""),
        ("/etc/hosts", ""),
        ("/etc/resolv.conf", ""),
    ] {
        tree.file(path, 0o644, contents.as_bytes().to_vec())?;
    }
    tree.file(
        "/etc/fast-sandbox-image",
        0o644,
        format!("{name}\n").into_bytes(),
    )?;
    Ok(tree)
}

pub fn busybox_config() -> Result<Config> {
    ConfigBuilder::default()
        .env(vec![DEFAULT_PATH.to_owned()])
        .cmd(vec!["sh".to_owned()])
        .working_dir("/")
        .build()
        .context("busybox image config")
}

/// The applet paths `busybox --list-full` prints (relative to `/`).
pub fn busybox_applets(binary: &Path) -> Result<Vec<String>> {
    let output = Command::new(binary)
        .arg("--list-full")
        .output()
        .with_context(|| format!("run {} --list-full", binary.display()))?;
    ensure!(
        output.status.success(),
        "{} --list-full failed ({}): {}",
        binary.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let list = String::from_utf8(output.stdout).context("busybox --list-full: not UTF-8")?;
    let applets: Vec<String> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    ensure!(
        !applets.is_empty(),
        "{} --list-full printed no applets",
        binary.display()
    );
    Ok(applets)
}

/// Every directory, regular file and symlink below `dir`, with its
/// permission bits; ownership and times are not kept (all root, fixed time).
pub fn tree_from_dir(dir: &Path) -> Result<Tree> {
    let mut tree = Tree::default();
    walk(dir, "", &mut tree)?;
    ensure!(!tree.is_empty(), "{} is empty", dir.display());
    Ok(tree)
}

fn walk(root: &Path, rel: &str, tree: &mut Tree) -> Result<()> {
    let dir = root.join(rel);
    let mut names = Vec::new();
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("read directory {}", dir.display()))?
    {
        let entry = entry.with_context(|| format!("read directory {}", dir.display()))?;
        let name = entry.file_name().into_string().map_err(|name| {
            anyhow::anyhow!("{}: file name {:?} is not UTF-8", dir.display(), name)
        })?;
        names.push(name);
    }
    names.sort();
    for name in names {
        let rel_path = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let path = root.join(&rel_path);
        let meta =
            std::fs::symlink_metadata(&path).with_context(|| format!("stat {}", path.display()))?;
        let mode = meta.permissions().mode() & 0o7777;
        let file_type = meta.file_type();
        if file_type.is_symlink() {
            let target = std::fs::read_link(&path)
                .with_context(|| format!("readlink {}", path.display()))?;
            let target = target
                .to_str()
                .with_context(|| format!("{}: link target is not UTF-8", path.display()))?;
            tree.symlink(&rel_path, target)?;
        } else if file_type.is_dir() {
            tree.dir(&rel_path, mode)?;
            walk(root, &rel_path, tree)?;
        } else if file_type.is_file() {
            let data = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
            tree.file(&rel_path, mode, data)?;
        } else {
            bail!(
                "{}: unsupported file type (only directories, files and symlinks)",
                path.display()
            );
        }
    }
    Ok(())
}

/// A config for a directory image: `entrypoint`/`cmd` as given, default PATH.
pub fn dir_config(entrypoint: &[String], cmd: &[String]) -> Result<Config> {
    let mut builder = ConfigBuilder::default()
        .env(vec![DEFAULT_PATH.to_owned()])
        .working_dir("/");
    if !entrypoint.is_empty() {
        builder = builder.entrypoint(entrypoint.to_vec());
    }
    if !cmd.is_empty() {
        builder = builder.cmd(cmd.to_vec());
    }
    builder.build().context("image config")
}

/// Fails unless `bytes` is an ELF executable without a program interpreter:
/// the images have no libc, so a dynamically linked binary would fail at
/// container start with a confusing "no such file or directory".
pub fn ensure_static_elf(bytes: &[u8]) -> Result<()> {
    const PT_INTERP: u32 = 3;
    ensure!(
        bytes.len() >= 64 && bytes[..4] == *b"\x7fELF",
        "not an ELF file"
    );
    let (is_64, little) = (bytes[4] == 2, bytes[5] == 1);
    ensure!(little, "big-endian ELF is not supported");
    let u16_at = |off: usize| -> Result<u64> {
        let b = bytes.get(off..off + 2).context("truncated ELF header")?;
        Ok(u64::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let u32_at = |off: usize| -> Result<u64> {
        let b = bytes.get(off..off + 4).context("truncated ELF header")?;
        Ok(u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
    };
    let u64_at = |off: usize| -> Result<u64> {
        let b = bytes.get(off..off + 8).context("truncated ELF header")?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    };
    let (phoff, phentsize, phnum) = if is_64 {
        (u64_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?)
    } else {
        (u32_at(0x1c)?, u16_at(0x2a)?, u16_at(0x2c)?)
    };
    for i in 0..phnum {
        let off = usize::try_from(phoff + i * phentsize).context("ELF program header offset")?;
        if u32_at(off)? == u64::from(PT_INTERP) {
            bail!("dynamically linked (has a program interpreter); build it with -static");
        }
    }
    Ok(())
}

/// Builds the image named `name` from a tree and config.
pub fn image(
    name: &str,
    tree: Tree,
    config: Config,
    created_by: String,
) -> Result<crate::layout::Image> {
    let reference: ImageRef = name.parse()?;
    Ok(crate::layout::Image {
        reference,
        config,
        tree,
        created_by,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Node;

    /// A minimal 64-bit little-endian ELF header with one program header of
    /// type `ph_type`.
    fn elf(ph_type: u32) -> Vec<u8> {
        let mut bytes = vec![0u8; 64 + 56];
        bytes[..4].copy_from_slice(b"\x7fELF");
        bytes[4] = 2; // 64-bit
        bytes[5] = 1; // little endian
        bytes[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        bytes[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        bytes[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        bytes[64..68].copy_from_slice(&ph_type.to_le_bytes());
        bytes
    }

    #[test]
    fn static_elf_check() {
        ensure_static_elf(&elf(1)).expect("PT_LOAD only is static");
        assert!(
            ensure_static_elf(&elf(3)).is_err(),
            "PT_INTERP means dynamic"
        );
        assert!(ensure_static_elf(b"#!/bin/sh\n").is_err());
    }

    #[test]
    fn busybox_tree_has_applets_and_etc() {
        let applets = [
            "bin/sh",
            "bin/cat",
            "sbin/ip",
            "usr/bin/wget",
            "bin/busybox",
        ]
        .map(String::from);
        let name: ImageRef = "localhost/fast-sandbox/busybox:v1".parse().expect("name");
        let tree = busybox_tree(&elf(1), &applets, &name).expect("tree");
        assert_eq!(
            tree.get("/etc/fast-sandbox-image"),
            Some(&Node::File {
                mode: 0o644,
                data: b"localhost/fast-sandbox/busybox:v1\n".to_vec()
            })
        );
        for applet in ["/bin/sh", "/bin/cat", "/sbin/ip", "/usr/bin/wget"] {
            assert_eq!(
                tree.get(applet),
                Some(&Node::Symlink {
                    target: "/bin/busybox".into()
                }),
                "{applet}"
            );
        }
        assert!(matches!(
            tree.get("/bin/busybox"),
            Some(Node::File { mode: 0o755, .. })
        ));
        assert_eq!(tree.get("/tmp"), Some(&Node::Dir { mode: 0o1777 }));
        for file in [
            "/etc/passwd",
            "/etc/group",
            "/etc/hostname",
            "/etc/resolv.conf",
            "/etc/hosts",
        ] {
            assert!(matches!(tree.get(file), Some(Node::File { .. })), "{file}");
        }
    }

    #[test]
    fn pause_image_rejects_dynamic_binaries() {
        assert!(pause_image(&elf(3)).is_err());
        let (tree, config) = pause_image(&elf(1)).expect("pause");
        assert_eq!(tree.len(), 1);
        assert_eq!(
            config.entrypoint().as_deref(),
            Some(&["/pause".to_owned()][..])
        );
    }

    #[test]
    fn dir_tree_keeps_modes_and_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("bin")).expect("mkdir");
        std::fs::write(dir.path().join("bin/app"), b"app").expect("write");
        std::fs::set_permissions(
            dir.path().join("bin/app"),
            std::fs::Permissions::from_mode(0o750),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("bin/app", dir.path().join("app")).expect("symlink");
        let tree = tree_from_dir(dir.path()).expect("tree");
        assert_eq!(
            tree.get("/bin/app"),
            Some(&Node::File {
                mode: 0o750,
                data: b"app".to_vec()
            })
        );
        assert_eq!(
            tree.get("/app"),
            Some(&Node::Symlink {
                target: "bin/app".into()
            })
        );
    }
}
