//! `cargo xtask vm-test [--package P ...] [-- TEST-ARGS...]`: runs the integration tests that
//! need a pure cgroup v2 system in a qemu VM.
//!
//! Why: the development and CI machines are cgroup-hybrid (cpu, memory and pids on v1), so OOM
//! kills under memory.max, pids.max, cgroup.kill and CLONE_INTO_CGROUP cannot be tested on them.
//! The VM boots the Debian cloud kernel (virtio-fs built in, so no initramfs) with the host's root
//! file system shared read-only by virtiofsd, and `vm-init` (vm/init) as PID 1. Host-built test
//! executables run in there unchanged, as root, with MESH_VM_TEST=1 set.
//! ../shared/vm-recipe.md has the measured details behind each choice here.
//!
//! - Which tests: the integration-test targets named `vm_*` of the packages (default
//!   mesh-agent), each run with `--test-threads=1` and TEST-ARGS. Other targets stay host tests.
//! - One VM per test executable: a boot costs 3 to 5 s, and each executable gets a fresh kernel,
//!   cgroup tree and exit code of its own.
//! - Software emulation only (`-accel tcg`): /dev/kvm here is a PVM device that stock kernels
//!   die under, so qemu must never pick kvm. A VM that dies before its test starts (a rare
//!   emulation crash) is booted once more.
//! - Prerequisites live in target/vm and are fetched once: the kernel (`apt-get download`,
//!   unpacked, raw vmlinux taken out of the bzImage because it boots about 1 s faster) and the
//!   Rust virtiofsd (`cargo install`; qemu's C one ignores read-only). qemu itself comes from
//!   scripts/install-deps.
//! - Each run leaves argv, output.log and exit-code in target/vm/results/NAME (see vm/init).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::workspace_root;

/// The metapackage whose dependency names the current bookworm-security cloud kernel.
const KERNEL_META: &str = "linux-image-6.12-cloud-amd64";
const VIRTIOFSD_VERSION: &str = "1.14.0";
/// Per test executable, boot included; emulation runs 5 to 30 times slower than the host.
const TIMEOUT: Duration = Duration::from_secs(600);
const DEFAULT_PACKAGE: &str = "mesh-agent";
/// Software emulation only, never kvm. One TCG thread for both vCPUs: with thread=multi, about
/// one boot in 40 died of an `int3` Oops in kernel code being patched (static keys). virtio-fs
/// needs the shared memory backend. With -no-reboot, the guest's power-off or panic ends qemu.
const QEMU_ARGS: &str = "-accel tcg,thread=single -cpu max -smp 2 \
    -M q35,memory-backend=mem -object memory-backend-memfd,id=mem,size=1G,share=on \
    -nodefaults -no-user-config -no-reboot -display none -serial stdio";
/// No initramfs: the cloud kernel has virtio-pci and virtio-fs built in.
const KERNEL_ARGS: &str = "console=ttyS0 quiet loglevel=1 panic=-1 reboot=t \
    root=root rootfstype=virtiofs ro";

pub fn run(args: &[&str]) -> Result<()> {
    let (packages, test_args) = parse_args(args)?;
    let vm_dir = workspace_root().join("target/vm");
    let tools = Tools::ensure(&vm_dir)?;
    let init = build_init()?;
    let tests = build_tests(&packages)?;
    if tests.is_empty() {
        eprintln!("vm-test: no integration test named vm_* in {packages:?}: nothing to run");
        return Ok(());
    }
    let mut failed = Vec::new();
    for test in &tests {
        let started = Instant::now();
        let results = vm_dir.join("results");
        let code = match boot(&tools, &init, test, &test_args, &results)? {
            Some(code) => code,
            None => {
                // Emulation has rare boot-time crashes (see QEMU_ARGS); one more try.
                eprintln!(
                    "vm-test: the VM died before starting {}: once more",
                    test.name
                );
                boot(&tools, &init, test, &test_args, &results)?
                    .with_context(|| format!("the VM died twice before starting {}", test.name))?
            }
        };
        eprintln!(
            "vm-test: {}: exit code {code} after {:.1} s (boot + run + power-off)",
            test.name,
            started.elapsed().as_secs_f64()
        );
        if code != 0 {
            failed.push(format!("{} (exit code {code})", test.name));
        }
    }
    if !failed.is_empty() {
        bail!("VM tests failed: {}", failed.join(", "));
    }
    Ok(())
}

fn parse_args<'a>(args: &[&'a str]) -> Result<(Vec<&'a str>, Vec<&'a str>)> {
    let (ours, test_args) = match args.iter().position(|a| *a == "--") {
        Some(i) => (&args[..i], args[i + 1..].to_vec()),
        None => (args, Vec::new()),
    };
    let mut packages = Vec::new();
    let mut it = ours.iter();
    while let Some(arg) = it.next() {
        match *arg {
            "--package" | "-p" => packages.push(*it.next().context("--package needs a name")?),
            other => bail!(
                "vm-test: unknown argument {other:?}\n\
                 usage: cargo xtask vm-test [--package P ...] [-- TEST-ARGS...]"
            ),
        }
    }
    if packages.is_empty() {
        packages.push(DEFAULT_PACKAGE);
    }
    Ok((packages, test_args))
}

/// What booting needs; each is fetched on first use and found in target/vm afterwards.
struct Tools {
    qemu: PathBuf,
    virtiofsd: PathBuf,
    kernel: PathBuf,
}

impl Tools {
    fn ensure(vm_dir: &Path) -> Result<Tools> {
        let qemu = which("qemu-system-x86_64").context(
            "qemu-system-x86_64 not found: run scripts/install-deps (it installs qemu-system-x86)",
        )?;
        Ok(Tools {
            qemu,
            virtiofsd: ensure_virtiofsd(vm_dir)?,
            kernel: ensure_kernel(&vm_dir.join("kernel"))?,
        })
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn ensure_virtiofsd(vm_dir: &Path) -> Result<PathBuf> {
    let root = vm_dir.join("virtiofsd");
    let bin = root.join("bin/virtiofsd");
    if !bin.is_file() {
        let root = root.to_str().context("target/vm path is not UTF-8")?;
        let args = [
            "install",
            "--locked",
            "virtiofsd",
            "--version",
            VIRTIOFSD_VERSION,
        ];
        crate::cargo(&[&args[..], &["--root", root]].concat()).context(
            "building virtiofsd (it needs libseccomp-dev and libcap-ng-dev: run scripts/install-deps)",
        )?;
    }
    Ok(bin)
}

/// The kernel image in `dir`: the raw vmlinux if it could be taken out, else the bzImage.
fn ensure_kernel(dir: &Path) -> Result<PathBuf> {
    let (vmlinux, vmlinuz) = (dir.join("vmlinux"), dir.join("vmlinuz"));
    if vmlinux.is_file() {
        return Ok(vmlinux);
    }
    if !vmlinuz.is_file() {
        fetch_kernel(dir, &vmlinuz)?;
    }
    match decompress_bzimage(&vmlinuz, &vmlinux) {
        Ok(()) => Ok(vmlinux),
        Err(e) => {
            eprintln!("vm-test: booting the bzImage, no raw vmlinux: {e:#}");
            Ok(vmlinuz)
        }
    }
}

/// `apt-get download` of the current cloud kernel, and its /boot/vmlinuz-* as `vmlinuz`.
fn fetch_kernel(dir: &Path, vmlinuz: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir)?;
    let depends = output(Command::new("apt-cache").args(["depends", KERNEL_META]))
        .context("apt-cache (is this Debian 12?)")?;
    let package = depends
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-6.12.") && p.ends_with("-cloud-amd64"))
        .with_context(|| {
            format!("no kernel in `apt-cache depends {KERNEL_META}`: run apt-get update")
        })?
        .to_owned();
    eprintln!("vm-test: downloading {package}");
    let download = || {
        output(
            Command::new("apt-get")
                .args(["download", "-q", &package])
                .current_dir(dir),
        )
    };
    if download().is_err() {
        // Security updates replace the kernel: the package lists may name one that is gone.
        output(Command::new("apt-get").args(["update", "-qq"]))?;
        download().with_context(|| format!("apt-get download {package}"))?;
    }
    let deb = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    let mut unpack = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(&deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("dpkg-deb")?;
    let tar_in = unpack.stdout.take().context("dpkg-deb stdout")?;
    let tar = Command::new("tar")
        .args([
            "-x",
            "--wildcards",
            "--strip-components=2",
            "./boot/vmlinuz-*",
        ])
        .current_dir(dir)
        .stdin(tar_in)
        .status()
        .context("tar")?;
    if !unpack.wait()?.success() || !tar.success() {
        bail!("unpacking {} failed", deb.display());
    }
    let image = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no boot/vmlinuz-* in the kernel package")?;
    fs::rename(&image, vmlinuz)?;
    fs::remove_file(&deb)?;
    fs::write(dir.join("package"), format!("{package}\n"))?;
    Ok(())
}

/// Takes the zstd payload out of a bzImage (its header says where) and decompresses it to an
/// ELF that qemu boots directly (PVH), skipping the in-guest decompression.
fn decompress_bzimage(bzimage: &Path, vmlinux: &Path) -> Result<()> {
    let image = fs::read(bzimage)?;
    let u32_at = |at: usize| -> Option<usize> {
        let bytes = image.get(at..at + 4)?;
        Some(u32::from_le_bytes(bytes.try_into().ok()?) as usize)
    };
    if image.get(0x202..0x206) != Some(b"HdrS") {
        bail!("not a bzImage");
    }
    let setup_sects = match image.get(0x1f1).copied().context("short bzImage")? {
        0 => 4,
        n => usize::from(n),
    };
    let (offset, len) = (u32_at(0x248), u32_at(0x24c));
    let start = (setup_sects + 1) * 512 + offset.context("short bzImage")?;
    let payload = image
        .get(start..start + len.context("short bzImage")?)
        .context("payload outside the bzImage")?;
    // The kernel's build appends the decompressed size to the zstd frame.
    let (frame, size) = payload.split_at(payload.len().saturating_sub(4));
    if !frame.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        bail!("the payload is not zstd");
    }
    let size = u32::from_le_bytes(size.try_into()?) as usize;
    let mut zstd = Command::new("zstd")
        .args(["-d", "-c", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("zstd (run scripts/install-deps)")?;
    let mut stdin = zstd.stdin.take().context("zstd stdin")?;
    let frame = frame.to_vec();
    let feeder = thread::spawn(move || stdin.write_all(&frame));
    let out = zstd.wait_with_output()?;
    let fed = feeder
        .join()
        .map_err(|_| anyhow::anyhow!("zstd feeder panicked"))?;
    if !out.status.success() || fed.is_err() || out.stdout.len() != size {
        bail!("zstd could not decompress the payload");
    }
    if !out.stdout.starts_with(b"\x7fELF") {
        bail!("the payload is not an ELF");
    }
    let tmp = vmlinux.with_extension("tmp");
    fs::write(&tmp, &out.stdout)?;
    fs::rename(&tmp, vmlinux)?;
    Ok(())
}

/// Runs `cmd`, returns its stdout; fails with its stderr.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn build_init() -> Result<PathBuf> {
    let artifacts = cargo_json(&["build", "--locked", "-p", "vm-init"])?;
    artifacts
        .into_iter()
        .find(|a| a.name == "vm-init")
        .map(|a| a.path)
        .context("cargo built no vm-init executable")
}

/// Root-only test targets that run on the host (hybrid cgroups here) and again in the VM
/// (pure cgroup v2): the supervisor's behaviour must hold on both.
const BOTH: [&str; 2] = ["supervise", "accounting"];

/// The `vm_*` integration-test executables of `packages`.
fn build_tests(packages: &[&str]) -> Result<Vec<Artifact>> {
    let mut args = vec!["test", "--locked", "--no-run", "--tests"];
    for p in packages {
        args.extend(["-p", p]);
    }
    let mut tests = cargo_json(&args)?;
    tests.retain(|a| {
        a.kind.iter().any(|k| k == "test")
            && (a.name.starts_with("vm_") || BOTH.contains(&a.name.as_str()))
    });
    Ok(tests)
}

/// An executable cargo built, as its JSON messages describe it.
struct Artifact {
    name: String,
    kind: Vec<String>,
    path: PathBuf,
    package_dir: PathBuf,
}

/// Runs cargo with `--message-format=json-render-diagnostics`; the executables it built.
fn cargo_json(args: &[&str]) -> Result<Vec<Artifact>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let out = Command::new(cargo)
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .current_dir(workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        bail!("cargo {} failed ({})", args.join(" "), out.status);
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let (Some(exe), Some(name), Some(manifest)) = (
            msg["executable"].as_str(),
            msg["target"]["name"].as_str(),
            msg["manifest_path"].as_str(),
        ) else {
            continue;
        };
        let kind = msg["target"]["kind"].as_array().into_iter().flatten();
        found.push(Artifact {
            name: name.to_owned(),
            kind: kind.filter_map(|k| k.as_str().map(str::to_owned)).collect(),
            path: exe.into(),
            package_dir: Path::new(manifest)
                .parent()
                .unwrap_or(Path::new("/"))
                .into(),
        });
    }
    Ok(found)
}

/// Boots one VM that runs `test`; returns the exit code the guest handed back, or None if the
/// VM died before it could start the test.
fn boot(
    tools: &Tools,
    init: &Path,
    test: &Artifact,
    test_args: &[&str],
    results: &Path,
) -> Result<Option<i32>> {
    let out = results.join(&test.name);
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let mut argv = vec![
        test.path.to_string_lossy().into_owned(),
        "--test-threads=1".into(),
    ];
    argv.extend(test_args.iter().map(|a| a.to_string()));
    fs::write(out.join("argv"), nul_joined(&argv))?;
    fs::write(
        out.join("cwd"),
        test.package_dir.as_os_str().as_encoded_bytes(),
    )?;
    let backtrace = std::env::var("RUST_BACKTRACE").unwrap_or_else(|_| "1".into());
    let mut env = vec![
        format!("CARGO_MANIFEST_DIR={}", test.package_dir.display()),
        format!("RUST_BACKTRACE={backtrace}"),
    ];
    env.extend(std::env::var("RUST_LOG").map(|v| format!("RUST_LOG={v}")));
    fs::write(out.join("env"), nul_joined(&env))?;

    // The workspace is shared read-write at its own path: the test executables, the binaries
    // they run and their package dirs (their cwd) live there, and the guest's /tmp is a fresh
    // tmpfs that would hide a workspace under /tmp.
    let share = workspace_root();
    let (init, out_str, share_str) = (
        cmdline_path(init)?,
        cmdline_path(&out)?,
        cmdline_path(&share)?,
    );
    let append = format!("{KERNEL_ARGS} init={init} vm.share={share_str} vm.out={out_str}");
    let mut vm = Vm::new()?;
    let root_sock = vm.virtiofsd(&tools.virtiofsd, Path::new("/"), "root", true)?;
    let out_sock = vm.virtiofsd(&tools.virtiofsd, &share, "out", false)?;
    vm.wait_for_sockets(&[&root_sock, &out_sock])?;
    let mut qemu = Command::new(&tools.qemu);
    qemu.args(QEMU_ARGS.split_whitespace());
    for (id, (sock, tag)) in [(&root_sock, "root"), (&out_sock, "out")]
        .into_iter()
        .enumerate()
    {
        qemu.arg("-chardev")
            .arg(format!("socket,id=vfs{id},path={}", sock.display()))
            .arg("-device")
            .arg(format!("vhost-user-fs-pci,chardev=vfs{id},tag={tag}"));
    }
    qemu.arg("-kernel")
        .arg(&tools.kernel)
        .args(["-append", &append]);
    eprintln!("vm-test: booting a VM for {}", test.name);
    let status = vm.run_qemu(qemu)?;

    let code_file = out.join("exit-code");
    match fs::read_to_string(&code_file) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .with_context(|| format!("{}: {text:?}", code_file.display())),
        // vm-init creates output.log just before it starts the command.
        Err(_) if !out.join("output.log").exists() => {
            vm.print_logs();
            Ok(None)
        }
        Err(e) => bail!(
            "the VM for {} handed back no exit code ({e}; qemu: {status}); \
             the guest's output is above",
            test.name
        ),
    }
}

fn nul_joined(items: &[String]) -> Vec<u8> {
    items.iter().flat_map(|s| s.bytes().chain([0])).collect()
}

/// A path for the kernel command line, which splits at spaces.
fn cmdline_path(path: &Path) -> Result<&str> {
    path.to_str()
        .filter(|s| !s.contains(|c: char| c.is_whitespace() || c == '"'))
        .with_context(|| format!("{} cannot go on a kernel command line", path.display()))
}

/// The processes of one VM and its socket dir; dropping it kills what still runs and cleans up.
struct Vm {
    dir: PathBuf,
    children: Vec<Child>,
}

impl Vm {
    fn new() -> Result<Vm> {
        let dir = std::env::temp_dir().join(format!("mesh-vm-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Vm {
            dir,
            children: Vec::new(),
        })
    }

    /// Starts a virtiofsd sharing `shared`; returns its socket path.
    fn virtiofsd(
        &mut self,
        bin: &Path,
        shared: &Path,
        tag: &str,
        readonly: bool,
    ) -> Result<PathBuf> {
        let sock = self.dir.join(format!("{tag}.sock"));
        let log = fs::File::create(self.dir.join(format!("virtiofsd-{tag}.log")))?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--socket-path={}", sock.display()))
            .arg(format!("--shared-dir={}", shared.display()))
            .arg("--log-level=error")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if readonly {
            cmd.arg("--readonly");
        }
        die_with_parent(&mut cmd);
        self.children.push(
            cmd.spawn()
                .with_context(|| format!("starting {}", bin.display()))?,
        );
        Ok(sock)
    }

    fn wait_for_sockets(&mut self, socks: &[&Path]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socks.iter().all(|s| s.exists()) {
            if Instant::now() > deadline || self.any_exited()? {
                self.print_logs();
                bail!("virtiofsd did not start");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn any_exited(&mut self) -> Result<bool> {
        for child in &mut self.children {
            if child.try_wait()?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Runs qemu to its end (the guest powers off) or to the timeout, printing the guest's
    /// console as it comes; the virtiofsds end with it.
    fn run_qemu(&mut self, mut qemu: Command) -> Result<std::process::ExitStatus> {
        die_with_parent(&mut qemu);
        let mut child = qemu
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let console = child.stdout.take().context("qemu stdout")?;
        self.children.push(child);
        let printer = thread::spawn(move || print_console(console));
        let deadline = Instant::now() + TIMEOUT;
        let (status, timed_out) = loop {
            let qemu = self.children.last_mut().context("no qemu")?;
            if let Some(status) = qemu.try_wait()? {
                break (status, false);
            }
            if Instant::now() > deadline {
                qemu.kill()?;
                break (qemu.wait()?, true);
            }
            thread::sleep(Duration::from_millis(50));
        };
        let _ = printer.join();
        // virtiofsd exits when qemu disconnects; give it a moment before Drop kills it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self
            .children
            .iter_mut()
            .any(|c| matches!(c.try_wait(), Ok(None)))
        {
            if Instant::now() > deadline {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        if timed_out {
            bail!(
                "the VM did not finish within {} s: killed",
                TIMEOUT.as_secs()
            );
        }
        Ok(status)
    }

    fn kill_all(&mut self) {
        for child in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    fn print_logs(&self) {
        for tag in ["root", "out"] {
            let log = fs::read_to_string(self.dir.join(format!("virtiofsd-{tag}.log")));
            if let Ok(log) = log.as_deref().map(str::trim)
                && !log.is_empty()
            {
                eprintln!("vm-test: virtiofsd ({tag}) said:\n{log}");
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill_all();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Copies the guest's serial console to our stdout, without the tty's carriage returns.
fn print_console(mut console: impl Read) {
    let mut buf = [0u8; 4096];
    let stdout = std::io::stdout();
    while let Ok(n) = console.read(&mut buf) {
        if n == 0 {
            break;
        }
        let text: Vec<u8> = buf[..n].iter().copied().filter(|b| *b != b'\r').collect();
        let mut lock = stdout.lock();
        let _ = lock.write_all(&text);
        let _ = lock.flush();
    }
}

/// qemu and virtiofsd end with this process even if it is killed before its cleanup runs.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only makes one prctl call.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
