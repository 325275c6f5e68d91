//! `mesh spore`: pack, inspect, verify and extract signed spores.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use mesh_common::Digest;
use mesh_common::digest::{HashingReader, HashingWriter};
use mesh_common::fsutil::AtomicFile;
use mesh_common::keys::SecretKey;
use mesh_common::manifest::{Compression, Manifest, Nutrients, Security, Slo, SporeSpec};
use mesh_common::spore::{self, PackFile, VerifyOptions, VersionStore};
use mesh_common::trust::TrustStore;

use crate::fabric_client::{FabricArgs, block_on};
use crate::output::{byte_progress, human_bytes};

#[derive(Subcommand)]
pub enum SporeCommand {
    /// Pack a binary (or a spore.toml) into a signed spore file.
    ///
    /// Flag form: `mesh spore pack ./billing --name billing --version 1.4.0 --key mesh.key
    /// -o billing-1.4.0.spore` packs one binary as the spore's command. Manifest form:
    /// `mesh spore pack path/to/spore.toml --key mesh.key` reads name, version, command, files
    /// (sources relative to the toml) and the rest from the file; flags given override it.
    Pack(Box<PackArgs>),
    /// Show a spore's manifest without verifying it (use `verify` before trusting anything).
    Inspect {
        file: PathBuf,
        /// Print the header and manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify a spore: trusted, unrevoked signer; every file hash; no rollback.
    ///
    /// Exits 0 only when everything checks out; otherwise prints one line saying why and
    /// exits 1.
    Verify {
        file: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
    },
    /// Upload a spore to the fabric's content repository; prints its digest.
    Push {
        file: PathBuf,
        #[command(flatten)]
        fabric: FabricArgs,
    },
    /// Download a spore by digest (resumes an interrupted download; checks the digest).
    Pull {
        digest: Digest,
        /// Output file [default: <first 12 hex digits>.spore].
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        fabric: FabricArgs,
    },
    /// Verify a spore and extract its files into a new directory.
    Extract {
        file: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
        /// Directory to create (must not exist).
        #[arg(long, value_name = "DIR")]
        into: PathBuf,
    },
}

#[derive(Args)]
pub struct PackArgs {
    /// The binary to pack, or a spore.toml (or a directory holding one).
    input: PathBuf,
    /// Secret key to sign with (mesh.key from `mesh key gen`).
    #[arg(long, value_name = "KEYFILE")]
    key: PathBuf,
    /// Output file [default: <name>-<version>.spore].
    #[arg(short, long, value_name = "OUT")]
    output: Option<PathBuf>,
    /// App name (a DNS label: a-z, 0-9, '-').
    #[arg(long)]
    name: Option<String>,
    /// Semantic version, e.g. 1.4.0.
    #[arg(long)]
    version: Option<semver::Version>,
    /// Argument passed to the command (repeat for more).
    #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
    args: Vec<String>,
    /// Environment variable KEY=VALUE (repeat for more).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Extra file PATH=SOURCE: SOURCE on disk goes to PATH in the spore (repeat for more).
    #[arg(long = "file", value_name = "PATH=SOURCE")]
    files: Vec<String>,
    /// CPU per instance in thousandths of a core.
    #[arg(long)]
    cpu_milli: Option<u32>,
    /// Memory limit per instance in MiB.
    #[arg(long)]
    memory_mb: Option<u32>,
    /// Most processes and threads per instance.
    #[arg(long)]
    pids: Option<u32>,
    /// HTTP path of the health check.
    #[arg(long, conflicts_with = "tcp_health")]
    health_path: Option<String>,
    /// Check health with a TCP connect instead of HTTP.
    #[arg(long)]
    tcp_health: bool,
    /// Unprivileged user to run as.
    #[arg(long)]
    user: Option<String>,
    /// Capability to keep, e.g. CAP_NET_BIND_SERVICE (repeat for more).
    #[arg(long = "cap", value_name = "CAP")]
    caps: Vec<String>,
    /// Payload encoding.
    #[arg(long, value_enum)]
    compression: Option<CompressionArg>,
}

#[derive(Clone, Copy, ValueEnum)]
enum CompressionArg {
    Zstd,
    None,
}

#[derive(Args)]
pub struct TrustArgs {
    /// Trusted-keys file (a mesh.pub is one); repeat to merge several.
    #[arg(long = "trust", value_name = "FILE", required = true)]
    trust: Vec<PathBuf>,
    /// Revocation list (`revoke <key-id>` lines); repeat to merge several.
    #[arg(long = "revoked", value_name = "FILE")]
    revoked: Vec<PathBuf>,
    /// Rollback store (highest version seen per app, JSON); refuses older versions and
    /// records the verified one.
    #[arg(long, value_name = "FILE")]
    versions: Option<PathBuf>,
    /// With --versions: accept a version older than one already seen.
    #[arg(long, requires = "versions")]
    allow_downgrade: bool,
}

pub fn run(cmd: SporeCommand) -> Result<()> {
    match cmd {
        SporeCommand::Pack(args) => pack(*args),
        SporeCommand::Inspect { file, json } => inspect(&file, json),
        SporeCommand::Verify { file, trust } => {
            let (verified, digest) = open_and(&file, &trust, |s| s.verify())?;
            let m = &verified.manifest;
            println!(
                "ok: {} {} signed by key {}, {} file(s), {} verified, {}",
                m.name,
                m.version,
                verified.key_id,
                m.files.len(),
                human_bytes(verified.content_bytes),
                digest
            );
            Ok(())
        }
        SporeCommand::Push { file, fabric } => push(&file, &fabric),
        SporeCommand::Pull {
            digest,
            output,
            fabric,
        } => {
            let out = output.unwrap_or_else(|| PathBuf::from(format!("{}.spore", digest.short())));
            block_on(async {
                let mut c = fabric.connect().await?;
                let url = blob_url(&c)?;
                let token = fabric.resolve()?.token;
                let pb = byte_progress(u64::MAX, "pulling");
                let n = mesh_common::blob::pull(&url, &token, &digest, &out, |done, total| {
                    pb.set_length(total);
                    pb.set_position(done);
                })
                .await?;
                pb.finish_and_clear();
                c.call("QUIT").await.ok();
                println!("pulled {digest} ({}) to {}", human_bytes(n), out.display());
                Ok(())
            })?
        }
        SporeCommand::Extract { file, trust, into } => {
            let (verified, digest) = open_and(&file, &trust, |s| spore::extract(s, &into))?;
            println!(
                "extracted {} {} ({}) into {}",
                verified.manifest.name,
                verified.manifest.version,
                digest,
                into.display()
            );
            Ok(())
        }
    }
}

fn blob_url(c: &mesh_common::client::Client) -> Result<String> {
    c.blob_url()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("the fabric did not advertise a blob URL in its greeting"))
}

fn push(file: &Path, fabric: &FabricArgs) -> Result<()> {
    let label = || format!("spore {}", file.display());
    let f = File::open(file).with_context(label)?;
    let len = f.metadata().with_context(label)?.len();
    // Only spores go into the content repository: refuse anything else before uploading.
    spore::inspect_unverified(BufReader::new(File::open(file).with_context(label)?))
        .with_context(label)?;
    let (digest, _) = Digest::of_reader(BufReader::new(f)).with_context(label)?;
    block_on(async {
        let mut c = fabric.connect().await?;
        let url = blob_url(&c)?;
        let token = fabric.resolve()?.token;
        let pb = byte_progress(len, "pushing");
        mesh_common::blob::push(&url, &token, file, &digest, |n| pb.set_position(n))
            .await
            .with_context(label)?;
        pb.finish_and_clear();
        c.call("QUIT").await.ok();
        println!("{digest}");
        Ok(())
    })?
}

fn pack(args: PackArgs) -> Result<()> {
    let key = SecretKey::load(&args.key)?;
    let (mut spec, mut files) = spec_from_input(&args)?;
    if let Some(name) = &args.name {
        spec.name = name.clone();
    }
    if let Some(v) = &args.version {
        spec.version = v.clone();
    }
    if !args.args.is_empty() {
        spec.args = args.args.clone();
    }
    for kv in &args.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--env {kv:?}: want KEY=VALUE"))?;
        spec.env.insert(k.to_string(), v.to_string());
    }
    for pf in &args.files {
        let (path, source) = pf.split_once('=').ok_or_else(|| {
            anyhow!("--file {pf:?}: want PATH=SOURCE (path inside the spore = file on disk)")
        })?;
        files.push(PackFile {
            path: path.to_string(),
            source: PathBuf::from(source),
            mode: None,
        });
    }
    let n = &mut spec.nutrients;
    n.cpu_milli = args.cpu_milli.unwrap_or(n.cpu_milli);
    n.memory_mb = args.memory_mb.unwrap_or(n.memory_mb);
    n.pids = args.pids.unwrap_or(n.pids);
    if args.tcp_health {
        spec.slo.health_path = None;
    } else if let Some(p) = &args.health_path {
        spec.slo.health_path = Some(p.clone());
    }
    if let Some(u) = &args.user {
        spec.security.user = u.clone();
    }
    if !args.caps.is_empty() {
        spec.security.capabilities = args.caps.clone();
    }
    if let Some(c) = args.compression {
        spec.compression = match c {
            CompressionArg::Zstd => Compression::Zstd,
            CompressionArg::None => Compression::None,
        };
    }

    let out_path = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}-{}.spore", spec.name, spec.version)));
    let total: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(&f.source).ok())
        .map(|m| m.len() * 2)
        .sum();
    let pb = byte_progress(total, "packing");
    let mut out =
        AtomicFile::create(&out_path, 0o644).with_context(|| format!("{}", out_path.display()))?;
    let mut hashing = HashingWriter::new(&mut out);
    let manifest = spore::pack(&spec, &files, &key, &mut hashing, &mut |done, _| {
        pb.set_position(done)
    })
    .with_context(|| format!("packing {}", out_path.display()))?;
    let (digest, size) = hashing.finish();
    out.commit()
        .with_context(|| format!("{}", out_path.display()))?;
    pb.finish_and_clear();
    let content = manifest.total_size();
    println!(
        "packed {} {}: {} ({}, {} of files in {} file(s)), signed by key {}",
        manifest.name,
        manifest.version,
        out_path.display(),
        human_bytes(size),
        human_bytes(content),
        manifest.files.len(),
        key.id()
    );
    println!("digest {digest}");
    Ok(())
}

/// The spec and file list from the positional input: a spore.toml (or a directory holding
/// one), or a binary that becomes the spore's command.
fn spec_from_input(args: &PackArgs) -> Result<(SporeSpec, Vec<PackFile>)> {
    let input = &args.input;
    let toml_path = if input.is_dir() {
        Some(input.join("spore.toml"))
    } else if input.extension().is_some_and(|e| e == "toml") {
        Some(input.clone())
    } else {
        None
    };
    if let Some(path) = toml_path {
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        let spec = SporeSpec::from_toml(&text).with_context(|| format!("{}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let files = spec
            .files
            .iter()
            .map(|f| PackFile {
                path: f.path.clone(),
                source: base.join(&f.source),
                mode: f.mode,
            })
            .collect();
        return Ok((spec, files));
    }
    let meta = std::fs::metadata(input).with_context(|| format!("{}", input.display()))?;
    if !meta.is_file() {
        bail!(
            "{}: not a file; give a binary, a spore.toml or a directory holding one",
            input.display()
        );
    }
    let (Some(name), Some(version)) = (&args.name, &args.version) else {
        bail!(
            "packing a binary needs --name and --version (e.g. --name hello --version 1.0.0), or give a spore.toml"
        );
    };
    let file_name = input
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{}: the file name must be UTF-8", input.display()))?
        .to_string();
    let spec = SporeSpec {
        name: name.clone(),
        version: version.clone(),
        command: file_name.clone(),
        args: Vec::new(),
        env: Default::default(),
        nutrients: Nutrients::default(),
        slo: Slo::default(),
        security: Security::default(),
        compression: Compression::default(),
        files: Vec::new(),
    };
    // The command must be executable in the spore, whatever the bits on the build machine.
    let files = vec![PackFile {
        path: file_name,
        source: input.clone(),
        mode: Some(0o755),
    }];
    Ok((spec, files))
}

fn inspect(file: &Path, json: bool) -> Result<()> {
    let f = File::open(file).with_context(|| format!("spore {}", file.display()))?;
    let (header, manifest) = spore::inspect_unverified(BufReader::new(f))
        .with_context(|| format!("spore {}", file.display()))?;
    if json {
        let v = serde_json::json!({
            "file": file,
            "verified": false,
            "key_id": header.key_id,
            "manifest_bytes": header.manifest_len,
            "manifest": manifest,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print_manifest(&manifest);
    println!(
        "signed by:  key {} (NOT verified: run `mesh spore verify`)",
        header.key_id
    );
    Ok(())
}

fn print_manifest(m: &Manifest) {
    let n = &m.nutrients;
    println!("spore:      {} {}", m.name, m.version);
    println!("command:    {} {}", m.command, m.args.join(" "));
    for (k, v) in &m.env {
        println!("env:        {k}={v}");
    }
    println!(
        "nutrients:  cpu {} milli, memory {} MiB, pids {}",
        n.cpu_milli, n.memory_mb, n.pids
    );
    match &m.slo.health_path {
        Some(p) => println!(
            "health:     GET {p} after {} ms warmup, healthy for {} ms",
            m.slo.warmup_ms, m.slo.min_healthy_ms
        ),
        None => println!(
            "health:     TCP connect after {} ms warmup",
            m.slo.warmup_ms
        ),
    }
    let caps = if m.security.capabilities.is_empty() {
        "none".to_string()
    } else {
        m.security.capabilities.join(",")
    };
    println!("security:   user {}, capabilities {caps}", m.security.user);
    println!("created:    {}", m.created_at);
    println!(
        "payload:    {:?}, {} in {} file(s)",
        m.compression,
        human_bytes(m.total_size()),
        m.files.len()
    );
    for f in &m.files {
        println!(
            "  {:o} {:>10} {} {}",
            f.mode & 0o7777,
            f.size,
            f.sha256.short(),
            f.path
        );
    }
}

/// Opens `file` with the trust options and runs `then` on the open spore; returns its result
/// and the digest of the whole file.
fn open_and<T>(
    file: &Path,
    args: &TrustArgs,
    then: impl FnOnce(spore::OpenSpore<'_, &mut dyn Read>) -> Result<T, spore::SporeError>,
) -> Result<(T, Digest)> {
    let label = || format!("spore {}", file.display());
    let mut trust = TrustStore::new();
    for p in args.trust.iter().chain(&args.revoked) {
        trust.merge_file(p)?;
    }
    let mut versions = match &args.versions {
        Some(p) => Some(VersionStore::load(p).with_context(|| format!("{}", p.display()))?),
        None => None,
    };
    let f = File::open(file).with_context(label)?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let pb = byte_progress(len, "verifying");
    let mut reader = BufReader::with_capacity(256 * 1024, HashingReader::new(pb.wrap_read(f)));
    let opts = VerifyOptions {
        trust: &trust,
        versions: versions.as_mut(),
        allow_downgrade: args.allow_downgrade,
    };
    let result = spore::open(&mut reader as &mut dyn Read, opts).and_then(then);
    pb.finish_and_clear();
    let value = result.with_context(label)?;
    // The payload check read to the end of the file, so this is the whole file's digest.
    let (_, digest, _) = reader.into_inner().into_parts();
    Ok((value, digest))
}
