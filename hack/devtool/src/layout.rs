//! OCI image layouts packed as tar archives: one single-layer linux/amd64
//! image per archive, byte-for-byte reproducible (fixed mtimes, root
//! ownership, sorted entries, canonical JSON), so an image built twice has
//! the same manifest digest.
//!
//! The archive is what `ctr images import` and `skopeo copy oci-archive:`
//! read: `oci-layout`, `index.json` and `blobs/sha256/<hex>` for the
//! manifest, the config and the gzip layer.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use flate2::{Compression, GzBuilder};
use oci_spec::image::{
    Arch, Config, DescriptorBuilder, Digest, HistoryBuilder, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, OciLayoutBuilder, Os, PlatformBuilder,
    RootFsBuilder, ANNOTATION_REF_NAME,
};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

/// Modification time of every tar entry (the layer's and the archive's).
pub const FIXED_MTIME: u64 = 0;
/// Creation time written into the image config, matching [`FIXED_MTIME`].
const FIXED_CREATED: &str = "1970-01-01T00:00:00Z";
/// The annotation `ctr images import` takes the full image name from.
pub const ANNOTATION_CONTAINERD_IMAGE_NAME: &str = "io.containerd.image.name";

/// A fully qualified image reference (`domain/path:tag`).
///
/// CRI normalises names (`busybox:v1` becomes `docker.io/library/busybox:v1`)
/// while `ctr images import` stores them verbatim, so a name without a
/// domain would be imported under a name CRI never looks up — and a PullImage
/// of it would go to Docker Hub. Only qualified names are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    repository: String,
    tag: String,
}

impl ImageRef {
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.repository, self.tag)
    }
}

impl FromStr for ImageRef {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        ensure!(
            !s.contains('@'),
            "image name {s:?}: digests are not accepted, give a tag"
        );
        let slash = s.rfind('/');
        let (repository, tag) = match s.rfind(':') {
            Some(colon) if slash.is_none_or(|slash| colon > slash) => {
                (&s[..colon], &s[colon + 1..])
            }
            _ => bail!(
                "image name {s:?} has no tag (expected e.g. localhost/fast-sandbox/busybox:v1)"
            ),
        };
        let Some((domain, path)) = repository.split_once('/') else {
            bail!("image name {s:?} has no registry domain (expected e.g. localhost/{repository}:{tag})");
        };
        ensure!(
            domain == "localhost" || domain.contains('.') || domain.contains(':'),
            "image name {s:?}: first component {domain:?} is not a registry domain; \
             CRI would resolve it on docker.io (use localhost/... or 127.0.0.1:PORT/...)"
        );
        let valid_component = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        };
        ensure!(
            path.split('/').all(valid_component),
            "image name {s:?}: repository path {path:?} must be lowercase [a-z0-9._-] components"
        );
        ensure!(
            !tag.is_empty()
                && tag.len() <= 128
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
            "image name {s:?}: invalid tag {tag:?}"
        );
        Ok(Self {
            repository: repository.to_owned(),
            tag: tag.to_owned(),
        })
    }
}

/// One node of a [`Tree`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
}

/// A file-system tree to become one layer. Paths are absolute inside the
/// image; missing parent directories are created with mode 0755.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    /// Keyed by the path without its leading `/`. A parent always sorts
    /// before its children (a prefix sorts first), which tar needs.
    entries: BTreeMap<String, Node>,
}

impl Tree {
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        self.insert(path, Node::Dir { mode })
    }

    pub fn file(&mut self, path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Result<()> {
        self.insert(
            path,
            Node::File {
                mode,
                data: data.into(),
            },
        )
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        ensure!(!target.is_empty(), "symlink {path}: empty target");
        self.insert(
            path,
            Node::Symlink {
                target: target.to_owned(),
            },
        )
    }

    #[cfg(test)]
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.entries.get(path.trim_start_matches('/'))
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<()> {
        let key = normalise(path)?;
        let mut parent = String::new();
        let components: Vec<&str> = key.split('/').collect();
        for component in &components[..components.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            match self.entries.get(&parent) {
                None => {
                    self.entries
                        .insert(parent.clone(), Node::Dir { mode: 0o755 });
                }
                Some(Node::Dir { .. }) => {}
                Some(_) => bail!("{path}: parent /{parent} is not a directory"),
            }
        }
        match (self.entries.get_mut(&key), node) {
            (None, node) => {
                self.entries.insert(key, node);
            }
            // An explicit directory may refine one implied by a child.
            (Some(Node::Dir { mode }), Node::Dir { mode: new }) => *mode = new,
            (Some(_), _) => bail!("{path}: duplicate entry"),
        }
        Ok(())
    }

    /// The uncompressed layer: a tar with every entry owned by root and
    /// stamped with [`FIXED_MTIME`], in path order.
    pub fn to_tar(&self) -> Result<Vec<u8>> {
        let mut builder = tar::Builder::new(Vec::new());
        builder.mode(tar::HeaderMode::Deterministic);
        for (path, node) in &self.entries {
            let mut header = tar::Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(FIXED_MTIME);
            match node {
                Node::Dir { mode } => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(*mode);
                    header.set_size(0);
                    builder
                        .append_data(&mut header, format!("{path}/"), std::io::empty())
                        .with_context(|| format!("tar: directory /{path}"))?;
                }
                Node::File { mode, data } => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    header.set_size(data.len() as u64);
                    builder
                        .append_data(&mut header, path, data.as_slice())
                        .with_context(|| format!("tar: file /{path}"))?;
                }
                Node::Symlink { target } => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_size(0);
                    builder
                        .append_link(&mut header, path, target)
                        .with_context(|| format!("tar: symlink /{path} -> {target}"))?;
                }
            }
        }
        builder.into_inner().context("tar: finish layer")
    }
}

fn normalise(path: &str) -> Result<String> {
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    ensure!(!trimmed.is_empty(), "{path:?}: not a path below /");
    ensure!(
        trimmed
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".."),
        "{path:?}: empty, '.' or '..' component"
    );
    Ok(trimmed.to_owned())
}

/// An image to write: its name, its runtime config and its only layer.
#[derive(Debug, Clone)]
pub struct Image {
    pub reference: ImageRef,
    pub config: Config,
    pub tree: Tree,
    /// Recorded in the config history (`created_by`).
    pub created_by: String,
}

/// What [`write_layout`] produced, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub manifest: Digest,
    pub config: Digest,
    pub layer: Digest,
    pub diff_id: Digest,
}

/// Writes `image` as an OCI image-layout tar to `out`.
pub fn write_layout<W: Write>(image: &Image, out: W) -> Result<Written> {
    let layer_tar = image.tree.to_tar()?;
    let diff_id = sha256(&layer_tar);
    let layer_gz = gzip(&layer_tar)?;
    let layer_digest = sha256(&layer_gz);

    let config = ImageConfigurationBuilder::default()
        .created(FIXED_CREATED)
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(image.config.clone())
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![diff_id.to_string()])
                .build()
                .context("image config: rootfs")?,
        )
        .history(vec![HistoryBuilder::default()
            .created(FIXED_CREATED)
            .created_by(image.created_by.clone())
            .build()
            .context("image config: history")?])
        .build()
        .context("image config")?;
    let config_json = canonical_json(&config)?;
    let config_digest = sha256(&config_json);

    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(
            DescriptorBuilder::default()
                .media_type(MediaType::ImageConfig)
                .digest(config_digest.clone())
                .size(config_json.len() as u64)
                .build()
                .context("manifest: config descriptor")?,
        )
        .layers(vec![DescriptorBuilder::default()
            .media_type(MediaType::ImageLayerGzip)
            .digest(layer_digest.clone())
            .size(layer_gz.len() as u64)
            .build()
            .context("manifest: layer descriptor")?])
        .build()
        .context("manifest")?;
    let manifest_json = canonical_json(&manifest)?;
    let manifest_digest = sha256(&manifest_json);

    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![DescriptorBuilder::default()
            .media_type(MediaType::ImageManifest)
            .digest(manifest_digest.clone())
            .size(manifest_json.len() as u64)
            .platform(
                PlatformBuilder::default()
                    .architecture(Arch::Amd64)
                    .os(Os::Linux)
                    .build()
                    .context("index: platform")?,
            )
            .annotations(HashMap::from([
                (
                    ANNOTATION_REF_NAME.to_owned(),
                    image.reference.tag().to_owned(),
                ),
                (
                    ANNOTATION_CONTAINERD_IMAGE_NAME.to_owned(),
                    image.reference.to_string(),
                ),
            ]))
            .build()
            .context("index: manifest descriptor")?])
        .build()
        .context("index")?;
    let layout = OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()
        .context("oci-layout")?;

    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    files.insert("oci-layout".into(), canonical_json(&layout)?);
    files.insert("index.json".into(), canonical_json(&index)?);
    for (digest, blob) in [
        (&config_digest, config_json),
        (&manifest_digest, manifest_json),
        (&layer_digest, layer_gz),
    ] {
        files.insert(format!("blobs/sha256/{}", digest.digest()), blob);
    }

    let mut archive = tar::Builder::new(out);
    archive.mode(tar::HeaderMode::Deterministic);
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut header = dir_header();
        archive
            .append_data(&mut header, dir, std::io::empty())
            .with_context(|| format!("archive: {dir}"))?;
    }
    for (name, data) in &files {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(FIXED_MTIME);
        header.set_size(data.len() as u64);
        archive
            .append_data(&mut header, name, data.as_slice())
            .with_context(|| format!("archive: {name}"))?;
    }
    archive
        .into_inner()
        .context("archive: finish")?
        .flush()
        .context("archive: flush")?;

    Ok(Written {
        manifest: manifest_digest,
        config: config_digest,
        layer: layer_digest,
        diff_id,
    })
}

fn dir_header() -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(FIXED_MTIME);
    header.set_size(0);
    header
}

pub fn sha256(data: &[u8]) -> Digest {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // 64 lowercase hex digits always parse as a sha256 digest.
    Digest::from_str(&format!("sha256:{hex}")).expect("a sha256 hex string is a valid digest")
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    // No file name and mtime 0 in the gzip header, so the bytes depend only
    // on `data`.
    let mut encoder = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    encoder.write_all(data).context("gzip layer")?;
    encoder.finish().context("gzip layer: finish")
}

/// JSON with object keys sorted at every level. oci-spec keeps annotations
/// and labels in `HashMap`s, whose iteration order changes from run to run;
/// sorting makes the bytes, and so the digests, reproducible.
pub fn canonical_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    fn sorted(value: serde_json::Value) -> serde_json::Value {
        match value {
            serde_json::Value::Object(map) => {
                let entries: BTreeMap<String, serde_json::Value> =
                    map.into_iter().map(|(k, v)| (k, sorted(v))).collect();
                serde_json::Value::Object(entries.into_iter().collect())
            }
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.into_iter().map(sorted).collect())
            }
            other => other,
        }
    }
    let value = serde_json::to_value(value).context("serialise to JSON")?;
    serde_json::to_vec(&sorted(value)).context("serialise to JSON")
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use oci_spec::image::{
        ConfigBuilder, ImageConfiguration, ImageIndex, ImageManifest, OciLayout,
    };

    use super::*;

    fn sample_image() -> Image {
        let mut tree = Tree::default();
        tree.file("/bin/tool", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
            .expect("file");
        tree.symlink("/usr/bin/tool", "/bin/tool").expect("symlink");
        tree.dir("/tmp", 0o1777).expect("dir");
        Image {
            reference: "localhost/fast-sandbox/test:v1".parse().expect("valid ref"),
            config: ConfigBuilder::default()
                .entrypoint(vec!["/bin/tool".to_owned()])
                .labels(HashMap::from([
                    ("a".to_owned(), "1".to_owned()),
                    ("b".to_owned(), "2".to_owned()),
                    ("c".to_owned(), "3".to_owned()),
                ]))
                .build()
                .expect("config"),
            tree,
            created_by: "test".into(),
        }
    }

    fn read_archive(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
        let mut archive = tar::Archive::new(bytes);
        let mut files = BTreeMap::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let path = entry.path().expect("path").to_string_lossy().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("read");
            files.insert(path, data);
        }
        files
    }

    fn blob<'a>(files: &'a BTreeMap<String, Vec<u8>>, digest: &Digest) -> &'a [u8] {
        let data = files
            .get(&format!("blobs/sha256/{}", digest.digest()))
            .unwrap_or_else(|| panic!("blob {digest} missing"));
        assert_eq!(
            &sha256(data),
            digest,
            "blob content does not match its digest"
        );
        data
    }

    #[test]
    fn layout_is_consistent() {
        let mut out = Vec::new();
        let written = write_layout(&sample_image(), &mut out).expect("write");
        let files = read_archive(&out);

        let layout: OciLayout = serde_json::from_slice(&files["oci-layout"]).expect("oci-layout");
        assert_eq!(layout.image_layout_version(), "1.0.0");

        let index: ImageIndex = serde_json::from_slice(&files["index.json"]).expect("index");
        assert_eq!(index.manifests().len(), 1);
        let descriptor = &index.manifests()[0];
        assert_eq!(descriptor.digest(), &written.manifest);
        let annotations = descriptor.annotations().as_ref().expect("annotations");
        assert_eq!(annotations[ANNOTATION_REF_NAME], "v1");
        assert_eq!(
            annotations[ANNOTATION_CONTAINERD_IMAGE_NAME],
            "localhost/fast-sandbox/test:v1"
        );

        let manifest_bytes = blob(&files, descriptor.digest());
        assert_eq!(descriptor.size(), manifest_bytes.len() as u64);
        let manifest: ImageManifest = serde_json::from_slice(manifest_bytes).expect("manifest");
        assert_eq!(manifest.config().digest(), &written.config);
        let config_bytes = blob(&files, manifest.config().digest());
        assert_eq!(manifest.config().size(), config_bytes.len() as u64);
        assert_eq!(manifest.layers().len(), 1);
        let layer = &manifest.layers()[0];
        assert_eq!(layer.media_type(), &MediaType::ImageLayerGzip);
        let layer_gz = blob(&files, layer.digest());
        assert_eq!(layer.size(), layer_gz.len() as u64);

        let mut layer_tar = Vec::new();
        flate2::read::GzDecoder::new(layer_gz)
            .read_to_end(&mut layer_tar)
            .expect("gunzip");
        let config: ImageConfiguration = serde_json::from_slice(config_bytes).expect("config");
        assert_eq!(
            config.rootfs().diff_ids(),
            &vec![sha256(&layer_tar).to_string()]
        );
        assert_eq!(written.diff_id, sha256(&layer_tar));

        let layer_files = read_archive(&layer_tar);
        assert_eq!(
            layer_files.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "bin/",
                "bin/tool",
                "tmp/",
                "usr/",
                "usr/bin/",
                "usr/bin/tool"
            ]
        );
    }

    #[test]
    fn layout_is_reproducible() {
        let (mut first, mut second) = (Vec::new(), Vec::new());
        let a = write_layout(&sample_image(), &mut first).expect("write");
        let b = write_layout(&sample_image(), &mut second).expect("write");
        assert_eq!(a, b);
        assert!(first == second, "archives differ between two builds");
    }

    #[test]
    fn layer_entries_are_root_owned_with_fixed_mtime() {
        let tar_bytes = sample_image().tree.to_tar().expect("tar");
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        for entry in archive.entries().expect("entries") {
            let entry = entry.expect("entry");
            let header = entry.header();
            assert_eq!(header.uid().expect("uid"), 0);
            assert_eq!(header.gid().expect("gid"), 0);
            assert_eq!(header.mtime().expect("mtime"), FIXED_MTIME);
        }
    }

    #[test]
    fn tree_rejects_conflicts_and_bad_paths() {
        let mut tree = Tree::default();
        tree.file("/a", 0o644, b"x".to_vec()).expect("file");
        assert!(
            tree.file("/a/b", 0o644, b"y".to_vec()).is_err(),
            "a file cannot be a parent"
        );
        assert!(tree.symlink("/a", "/b").is_err(), "duplicate");
        assert!(tree.dir("/../etc", 0o755).is_err());
        assert!(tree.dir("/", 0o755).is_err());
        tree.file("/d/e", 0o644, b"z".to_vec())
            .expect("implied parent");
        tree.dir("/d", 0o700)
            .expect("refining an implied directory");
        assert_eq!(tree.get("/d"), Some(&Node::Dir { mode: 0o700 }));
    }

    #[test]
    fn image_refs_must_be_qualified_and_tagged() {
        let ok: ImageRef = "localhost/fast-sandbox/pause:v1".parse().expect("valid");
        assert_eq!(ok.to_string(), "localhost/fast-sandbox/pause:v1");
        assert_eq!(ok.tag(), "v1");
        let with_port: ImageRef = "127.0.0.1:5000/fast-sandbox/busybox:v1"
            .parse()
            .expect("valid");
        assert_eq!(with_port.tag(), "v1");
        for bad in [
            "busybox:v1",
            "library/busybox:v1",
            "localhost/busybox",
            "127.0.0.1:5000/busybox",
            "localhost/Busybox:v1",
            "localhost/busybox@sha256:00",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad} should be rejected");
        }
    }
}
