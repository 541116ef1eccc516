//! `fabvm jail`: runs one fabvm VM (or `receive`) as an unprivileged user in new mount, PID,
//! IPC and UTS namespaces and a new (or a named) network namespace, chrooted (`pivot_root`)
//! into a tmpfs that holds only what it needs, with no capabilities and no_new_privs.
//!
//! ```text
//! fabvm jail (root)                     the jailed fabvm (PID 1 of its namespace)
//!  checks, plan (plan.rs)
//!  unshare(PID); fork  ────────────────► unshare(mount, IPC, UTS[, net]) or setns(net)
//!                                        / private; tmpfs root; /dev (kvm, tun, null...),
//!                                        /proc, /tmp, /dev/shm, /run/fabvm; the binary, its
//!                                        libraries and the planned paths bound (ro or rw)
//!                                        pivot_root; drop groups, ids, capabilities;
//!                                        no_new_privs; exec /fabvm ARGS (seccomp filters
//!                                        go on in there as usual)
//!  waits; exits with its status; removes the empty jail directory
//! ```
//!
//! Every mount is made in the child's private mount namespace: nothing shows on the host,
//! and it all goes when the jailed process ends. See docs/jail.md.

mod plan;
mod sys;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

pub use plan::{plan, Bind, Plan};

use crate::cli::JailArgs;

/// Errors from setting up a jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The jailed command line is not one a jail runs.
    #[error("{0}")]
    Command(String),
    /// A path the jail needs.
    #[error("{path}: {1}", path = .0.display())]
    Path(PathBuf, String),
    /// Not allowed or not possible here.
    #[error("{0}")]
    Refused(String),
    /// A system call failed.
    #[error(transparent)]
    Sys(#[from] sys::SysError),
}

impl JailError {
    /// The exit status for this error: 2 for a bad command line, else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            JailError::Command(_) | JailError::Refused(_) => 2,
            _ => 1,
        }
    }
}

/// Where the fabvm binary is inside the jail.
const JAILED_BINARY: &str = "/fabvm";
/// The jailed VMM's runtime directory (its registry and published identities).
const RUNTIME_DIR: &str = "/run/fabvm";

/// Environment variables passed into the jail (everything else is dropped).
fn passed_env() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            matches!(k.as_str(), "RUST_LOG" | "RUST_BACKTRACE" | "FABVM_SECCOMP")
                || k.starts_with("FABVM_TEST_")
        })
        .collect();
    env.push(("FABVM_RUNTIME_DIR".into(), RUNTIME_DIR.into()));
    env.push(("HOME".into(), "/tmp".into()));
    env.push(("XDG_DATA_HOME".into(), "/tmp".into()));
    env
}

/// Sets up the jail, runs the command in it and waits; returns its exit status (128 + the
/// signal that killed it, if one did).
pub fn run(args: &JailArgs) -> Result<i32, JailError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::Refused("fabvm jail must run as root".into()));
    }
    if args.uid == 0 || args.gid == 0 {
        return Err(JailError::Refused(
            "--uid and --gid must not be 0: the jail runs the VMM unprivileged".into(),
        ));
    }
    let id = match &args.id {
        Some(id) => id.clone(),
        None => format!("jail-{}", std::process::id()),
    };
    if id.is_empty()
        || id.len() > 64
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(JailError::Refused(format!(
            "--id '{id}': use 1 to 64 letters, digits, '-' or '_'"
        )));
    }
    if !args.chroot_base.is_absolute() || !args.chroot_base.is_dir() {
        return Err(JailError::Path(
            args.chroot_base.clone(),
            "--chroot-base must be an existing absolute directory".into(),
        ));
    }
    let plan = plan::plan(&args.command, &args.binds)?;
    for bind in &plan.binds {
        if bind.path.exists() {
            continue;
        }
        if !bind.create {
            return Err(JailError::Path(bind.path.clone(), "does not exist".into()));
        }
        std::fs::create_dir_all(&bind.path)
            .map_err(|e| JailError::Path(bind.path.clone(), e.to_string()))?;
        sys::chown(&bind.path, args.uid, args.gid)?;
    }
    let netns = args.netns.as_ref().map(|name| {
        if name.contains('/') {
            PathBuf::from(name)
        } else {
            Path::new("/run/netns").join(name)
        }
    });
    if let Some(path) = &netns {
        if !path.exists() {
            return Err(JailError::Path(
                path.clone(),
                "no such network namespace".into(),
            ));
        }
    }
    let jail_dir = args.chroot_base.join("fabvm").join(&id);
    let root = jail_dir.join("root");
    if root.exists() {
        return Err(JailError::Path(
            root,
            "in use (another jail with this --id?)".into(),
        ));
    }
    std::fs::create_dir_all(&root).map_err(|e| JailError::Path(root.clone(), e.to_string()))?;
    let setup = Setup {
        root: root.clone(),
        uid: args.uid,
        gid: args.gid,
        netns,
        plan,
        files: binary_files()?,
        command: args.command.clone(),
        env: passed_env(),
    };
    let status = spawn_jailed(&setup);
    let _ = std::fs::remove_dir(&root);
    let _ = std::fs::remove_dir(&jail_dir);
    let _ = std::fs::remove_dir(args.chroot_base.join("fabvm"));
    status
}

/// Everything the jailed child needs, worked out before the fork.
#[derive(Debug)]
struct Setup {
    root: PathBuf,
    uid: u32,
    gid: u32,
    netns: Option<PathBuf>,
    plan: Plan,
    /// (path inside, file outside) for the binary, its interpreter and libraries.
    files: Vec<(PathBuf, PathBuf)>,
    command: Vec<OsString>,
    env: Vec<(String, String)>,
}

/// The fabvm binary and what it is linked with: the shared objects this very process has
/// mapped (it is the same binary) and the interpreter its ELF header names.
fn binary_files() -> Result<Vec<(PathBuf, PathBuf)>, JailError> {
    let exe = std::fs::read_link("/proc/self/exe")
        .map_err(|e| JailError::Path("/proc/self/exe".into(), e.to_string()))?;
    let mut files = vec![(PathBuf::from(JAILED_BINARY), exe.clone())];
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| JailError::Path("/proc/self/maps".into(), e.to_string()))?;
    for line in maps.lines() {
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        let name = Path::new(path).file_name().unwrap_or_default();
        if path.starts_with('/') && name.to_string_lossy().contains(".so") {
            files.push((PathBuf::from(path), PathBuf::from(path)));
        }
    }
    let elf = std::fs::read(&exe).map_err(|e| JailError::Path(exe.clone(), e.to_string()))?;
    if let Some(interp) = sys::elf_interpreter(&elf) {
        let real = std::fs::canonicalize(&interp)
            .map_err(|e| JailError::Path(interp.clone(), e.to_string()))?;
        files.push((interp, real));
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// Forks the jailed process (PID 1 of a new PID namespace) and waits for it.
fn spawn_jailed(setup: &Setup) -> Result<i32, JailError> {
    sys::unshare(libc::CLONE_NEWPID)?;
    // SAFETY: this process has one thread (no runtime threads are started for `jail`), so
    // the child may go on allocating and calling anything.
    let pid = unsafe { libc::fork() };
    if pid == -1 {
        return Err(JailError::Refused(format!(
            "fork: {}",
            std::io::Error::last_os_error()
        )));
    }
    if pid == 0 {
        let error = match enter(setup) {
            Ok(never) => match never {},
            Err(e) => e,
        };
        eprintln!("fabvm: jail: {error}");
        // SAFETY: ends the child at once, without running the parent's exit handlers.
        unsafe { libc::_exit(1) };
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child; `status` is a valid out-pointer.
        let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
        if ret == pid {
            break;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Err(JailError::Refused(format!(
                "waiting for the jailed fabvm: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    })
}

/// In the child: namespaces, the file system, privileges, then exec.
fn enter(setup: &Setup) -> Result<std::convert::Infallible, JailError> {
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if setup.netns.is_none() {
        flags |= libc::CLONE_NEWNET;
    }
    sys::unshare(flags)?;
    match &setup.netns {
        Some(path) => sys::enter_netns(path)?,
        None => sys::loopback_up()?,
    }
    build_root(setup)?;
    sys::pivot_root(&setup.root)?;
    sys::drop_privileges(setup.uid, setup.gid)?;
    Err(sys::exec(Path::new(JAILED_BINARY), &setup.command, &setup.env).into())
}

/// Mounts the jail's file system under `setup.root` (in this private mount namespace).
fn build_root(setup: &Setup) -> Result<(), JailError> {
    let root = &setup.root;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    sys::mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    sys::mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID,
        Some("mode=0755,size=16m"),
    )?;
    for dir in ["dev/net", "dev/shm", "proc", "tmp", "run/fabvm"] {
        mkdirs(&root.join(dir))?;
    }
    let scratch = libc::MS_NOSUID | libc::MS_NODEV;
    sys::mount(
        Some(Path::new("tmpfs")),
        &root.join("run/fabvm"),
        Some("tmpfs"),
        scratch | libc::MS_NOEXEC,
        Some(&format!("mode=0700,uid={},gid={}", setup.uid, setup.gid)),
    )?;
    for dir in ["tmp", "dev/shm"] {
        sys::mount(
            Some(Path::new("tmpfs")),
            &root.join(dir),
            Some("tmpfs"),
            scratch,
            Some("mode=1777"),
        )?;
    }
    sys::mount(
        Some(Path::new("proc")),
        &root.join("proc"),
        Some("proc"),
        scratch | libc::MS_NOEXEC,
        None,
    )?;
    let dev = root.join("dev");
    sys::char_device(
        &dev.join("kvm"),
        Path::new("/dev/kvm"),
        0o600,
        setup.uid,
        setup.gid,
    )?;
    if setup.plan.tun && Path::new("/dev/net/tun").exists() {
        sys::char_device(
            &dev.join("net/tun"),
            Path::new("/dev/net/tun"),
            0o600,
            setup.uid,
            setup.gid,
        )?;
    }
    for name in ["null", "zero", "urandom"] {
        let host = Path::new("/dev").join(name);
        sys::char_device(&dev.join(name), &host, 0o666, 0, 0)?;
    }
    for (at, file) in &setup.files {
        bind(file, &inside(at), false)?;
    }
    for b in &setup.plan.binds {
        bind(&b.path, &inside(&b.path), b.writable)?;
    }
    // The root itself is read-only: the VMM writes only to what was bound writable and to
    // its scratch tmpfs mounts.
    sys::mount(
        None,
        root,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
        None,
    )?;
    Ok(())
}

fn mkdirs(dir: &Path) -> Result<(), JailError> {
    std::fs::create_dir_all(dir).map_err(|e| JailError::Path(dir.to_path_buf(), e.to_string()))
}

/// Binds `source` (a file or directory) at `target`, read-only unless `writable`, never with
/// set-user-ID programs or device nodes.
fn bind(source: &Path, target: &Path, writable: bool) -> Result<(), JailError> {
    if let Some(parent) = target.parent() {
        mkdirs(parent)?;
    }
    if source.is_dir() {
        mkdirs(target)?;
    } else if !target.exists() {
        std::fs::File::create(target)
            .map_err(|e| JailError::Path(target.to_path_buf(), e.to_string()))?;
    }
    sys::mount(
        Some(source),
        target,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )?;
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
    if !writable {
        flags |= libc::MS_RDONLY;
    }
    sys::mount(None, target, None, flags, None)?;
    Ok(())
}
