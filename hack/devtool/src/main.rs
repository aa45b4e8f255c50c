//! `fast-sandbox-dev`: what a development node needs that Debian does not
//! ship — container images built without a registry, a private containerd's
//! config, and a few CRI operations (wait, smoke, pull, reset) for scripts
//! and tests.

mod cri;
mod instance;
mod layout;
mod rootfs;
mod smoke;

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "fast-sandbox-dev", about, version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build OCI image-layout tars (for `ctr images import` / `skopeo copy oci-archive:`).
    #[command(subcommand)]
    Image(ImageCommand),
    /// Talk to a CRI v1 endpoint (containerd, or the fast-sandbox shim).
    #[command(subcommand)]
    Cri(CriCommand),
    /// Write a private containerd instance's config files into its directory.
    InstanceConfig(InstanceConfigArgs),
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// The sandbox image: a static pause binary as /pause.
    Pause {
        /// A statically linked pause binary (hack/pause/pause.c).
        #[arg(long)]
        binary: PathBuf,
        #[command(flatten)]
        output: ImageOutput,
    },
    /// A root file system: a static busybox with its applets, or a directory.
    Rootfs {
        #[command(flatten)]
        source: RootfsSource,
        /// Entrypoint for --dir images (repeat for each argument).
        #[arg(long, conflicts_with = "busybox")]
        entrypoint: Vec<String>,
        /// Cmd for --dir images (repeat for each argument).
        #[arg(long, conflicts_with = "busybox")]
        cmd: Vec<String>,
        #[command(flatten)]
        output: ImageOutput,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct RootfsSource {
    /// Package this directory as the image's only layer.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// A static busybox binary; the image gets it, its applet links and a minimal /etc.
    #[arg(long)]
    busybox: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ImageOutput {
    /// Fully qualified name with tag, e.g. localhost/fast-sandbox/busybox:v1.
    #[arg(long)]
    name: String,
    /// Where to write the OCI layout tar.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct EndpointArg {
    /// CRI endpoint, unix:///path/to/socket.
    #[arg(long, env = "FAST_SANDBOX_CONTAINERD_ENDPOINT")]
    endpoint: String,
}

#[derive(Debug, Subcommand)]
enum CriCommand {
    /// Wait until Version answers and Status reports RuntimeReady and NetworkReady.
    Wait {
        #[command(flatten)]
        endpoint: EndpointArg,
        /// Give up after this long (e.g. 30s, 500ms, 2m).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
        /// Only require RuntimeReady (an instance without CNI never reports NetworkReady).
        #[arg(long)]
        no_network: bool,
    },
    /// Stop and remove every container and pod sandbox.
    Reset {
        #[command(flatten)]
        endpoint: EndpointArg,
    },
    /// Run one pod with one container, check it from inside, tear it down.
    Smoke {
        #[command(flatten)]
        endpoint: EndpointArg,
        /// The container image (must be on the node unless --pull).
        #[arg(long, env = "FAST_SANDBOX_TEST_IMAGE")]
        image: String,
        /// Runtime handler ("" for containerd's default).
        #[arg(long, default_value = "runc")]
        handler: String,
        /// PullImage first (only images on a 127.0.0.1 registry).
        #[arg(long)]
        pull: bool,
        /// Use the host's network namespace (for an instance without CNI).
        #[arg(long)]
        host_network: bool,
        /// Leave the pod running.
        #[arg(long)]
        keep: bool,
        /// The pod's dns_config nameserver; nothing in the pod resolves names.
        #[arg(long, default_value = "127.0.0.1")]
        dns_server: String,
        /// Parent of the pod's log directory.
        #[arg(long, default_value = "/tmp/fast-sandbox-smoke")]
        log_root: PathBuf,
        /// Map this host port to the pod's port 8080 (exercises the CNI portmap plugin).
        #[arg(long, conflicts_with = "host_network")]
        host_port: Option<u16>,
    },
    /// PullImage from a registry on 127.0.0.1; prints the image id.
    Pull {
        #[command(flatten)]
        endpoint: EndpointArg,
        #[arg(long)]
        image: String,
        /// Check the pulled image is listed, then RemoveImage it again.
        #[arg(long)]
        check_and_remove: bool,
    },
}

#[derive(Debug, Args)]
struct InstanceConfigArgs {
    /// Output of `containerd config default`.
    #[arg(long)]
    base: PathBuf,
    /// The instance directory (absolute).
    #[arg(long)]
    dir: PathBuf,
    #[arg(long)]
    sandbox_image: String,
    /// Private IPv4 range for pods; without it the instance has no CNI network.
    #[arg(long, requires = "bridge")]
    cni_subnet: Option<String>,
    /// Bridge for --cni-subnet.
    #[arg(long, requires = "cni_subnet")]
    bridge: Option<String>,
    /// A registry on 127.0.0.1 (HOST:PORT) to pull from over plain HTTP; repeatable.
    #[arg(long)]
    plain_http_registry: Vec<String>,
    /// One more runc-v2-shim handler, NAME=/path/to/binary (its BinaryName); repeatable.
    #[arg(long)]
    runtime: Vec<String>,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The whole context chain on one line; no backtrace noise when
            // RUST_BACKTRACE happens to be set.
            eprintln!("fast-sandbox-dev: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Image(command) => image(command),
        Command::Cri(command) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start the async runtime")?
            .block_on(cri_command(command)),
        Command::InstanceConfig(args) => instance_config(args),
    }
}

fn image(command: ImageCommand) -> Result<()> {
    let (image, out) = match command {
        ImageCommand::Pause { binary, output } => {
            let bytes = read(&binary)?;
            let (tree, config) =
                rootfs::pause_image(&bytes).with_context(|| format!("{}", binary.display()))?;
            let created_by = format!("fast-sandbox-dev image pause ({})", file_name(&binary));
            (
                rootfs::image(&output.name, tree, config, created_by)?,
                output.out,
            )
        }
        ImageCommand::Rootfs {
            source,
            entrypoint,
            cmd,
            output,
        } => {
            let (tree, config, created_by) = match (source.dir, source.busybox) {
                (Some(dir), None) => (
                    rootfs::tree_from_dir(&dir)?,
                    rootfs::dir_config(&entrypoint, &cmd)?,
                    format!("fast-sandbox-dev image rootfs --dir ({})", file_name(&dir)),
                ),
                (None, Some(busybox)) => {
                    let applets = rootfs::busybox_applets(&busybox)?;
                    let reference: layout::ImageRef = output.name.parse()?;
                    let tree = rootfs::busybox_tree(&read(&busybox)?, &applets, &reference)
                        .with_context(|| format!("{}", busybox.display()))?;
                    (
                        tree,
                        rootfs::busybox_config()?,
                        "fast-sandbox-dev image rootfs --busybox".to_owned(),
                    )
                }
                _ => bail!("give exactly one of --dir and --busybox"),
            };
            (
                rootfs::image(&output.name, tree, config, created_by)?,
                output.out,
            )
        }
    };
    let tmp = out.with_extension("tar.tmp");
    let file = File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let written = layout::write_layout(&image, BufWriter::new(file))
        .with_context(|| format!("write image layout {}", tmp.display()))?;
    std::fs::rename(&tmp, &out)
        .with_context(|| format!("rename {} to {}", tmp.display(), out.display()))?;
    println!("{} {} {}", image.reference, written.manifest, out.display());
    Ok(())
}

async fn cri_command(command: CriCommand) -> Result<()> {
    match command {
        CriCommand::Wait {
            endpoint,
            timeout,
            no_network,
        } => {
            let ready = cri::wait(&endpoint.endpoint, timeout, !no_network).await?;
            eprintln!(
                "{} ready: {} {}",
                endpoint.endpoint, ready.runtime, ready.version
            );
        }
        CriCommand::Reset { endpoint } => {
            let channel = cri::connect(&endpoint.endpoint).await?;
            let done = cri::reset(channel)
                .await
                .with_context(|| format!("reset {}", endpoint.endpoint))?;
            eprintln!(
                "{}: removed {} pod sandbox(es) and {} container(s)",
                endpoint.endpoint, done.sandboxes, done.containers
            );
        }
        CriCommand::Smoke {
            endpoint,
            image,
            handler,
            pull,
            host_network,
            keep,
            dns_server,
            log_root,
            host_port,
        } => {
            let channel = cri::connect(&endpoint.endpoint).await?;
            let options = smoke::Options {
                image,
                handler,
                pull,
                host_network,
                keep,
                dns_server,
                log_root,
                host_port,
            };
            let outcome = smoke::run(channel, &options).await.with_context(|| {
                format!(
                    "smoke test on {} (handler {:?})",
                    endpoint.endpoint, options.handler
                )
            })?;
            let timings: Vec<String> = outcome
                .timings
                .iter()
                .map(|(step, d)| format!("{step} {} ms", d.as_millis()))
                .collect();
            let ip = if outcome.ip.is_empty() {
                "host network"
            } else {
                outcome.ip.as_str()
            };
            eprintln!(
                "smoke ok: handler {:?}, pod {} ({ip}); {}",
                options.handler,
                outcome.sandbox_id,
                timings.join(", ")
            );
            println!("{}", outcome.sandbox_id);
        }
        CriCommand::Pull {
            endpoint,
            image,
            check_and_remove,
        } => {
            let channel = cri::connect(&endpoint.endpoint).await?;
            let started = std::time::Instant::now();
            let id = cri::pull(channel.clone(), &image).await?;
            eprintln!(
                "pulled {image} as {id} in {} ms",
                started.elapsed().as_millis()
            );
            if check_and_remove {
                let listed = cri::image_id(channel.clone(), &image).await?;
                if listed.as_deref() != Some(id.as_str()) {
                    bail!(
                        "after PullImage, ImageStatus of {image} reports {listed:?}, expected {id}"
                    );
                }
                cri::remove_image(channel, &image).await?;
                eprintln!("removed {image} again");
            }
            println!("{id}");
        }
    }
    Ok(())
}

fn instance_config(args: InstanceConfigArgs) -> Result<()> {
    let base = std::fs::read_to_string(&args.base)
        .with_context(|| format!("read {}", args.base.display()))?;
    let network = match (args.cni_subnet, args.bridge) {
        (Some(subnet), Some(bridge)) => Some(instance::Network {
            subnet: subnet.parse()?,
            bridge,
        }),
        (None, None) => None,
        _ => bail!("--cni-subnet and --bridge go together"),
    };
    let settings = instance::Settings {
        sandbox_image: args.sandbox_image,
        plain_http_registries: args.plain_http_registry,
        network,
        extra_runtimes: args
            .runtime
            .iter()
            .map(|r| r.parse())
            .collect::<Result<_>>()?,
    };
    let instance_layout = instance::Layout::new(&args.dir)?;
    instance::write_files(&base, &instance_layout, &settings)
        .with_context(|| format!("write the instance config under {}", args.dir.display()))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("read {}", path.display()))
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// `30s`, `500ms`, `2m`, or a plain number of seconds.
fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .with_context(|| format!("duration {text:?}: expected e.g. 30s"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(value),
        "" | "s" => Duration::from_secs(value),
        "m" => Duration::from_secs(value * 60),
        _ => bail!("duration {text:?}: unit must be ms, s or m"),
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").expect("s"), Duration::from_secs(30));
        assert_eq!(
            parse_duration("250ms").expect("ms"),
            Duration::from_millis(250)
        );
        assert_eq!(parse_duration("2m").expect("m"), Duration::from_secs(120));
        assert_eq!(parse_duration("5").expect("bare"), Duration::from_secs(5));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("s").is_err());
    }
}
