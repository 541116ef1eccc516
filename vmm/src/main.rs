//! The `fabvm` binary: parse the command line, run the VM (or a `ctl` / `store` subcommand),
//! turn every failure into one line on stderr and a non-zero exit.

use std::time::Duration;

use clap::error::ErrorKind;
use clap::Parser;
use vmm::api::{client, Request};
use vmm::cli::{
    Cli, ClusterArgs, Command, CtlArgs, CtlOp, HostArgs, HostOp, ReceiveArgs, StoreArgs, StoreOp,
};
use vmm::config::Launch;
use vmm::vcpu::exit::StopReason;

/// How long `fabvm ctl` waits for an answer (a snapshot of a large VM takes a while).
const CTL_TIMEOUT: Duration = Duration::from_secs(600);

fn main() {
    // `FABVM_LOG_TIME=1` stamps each log line with the time in microseconds (for the
    // `fabvm::timing` lines: where a migration's or a restore's time goes).
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"));
    if std::env::var_os("FABVM_LOG_TIME").is_some_and(|v| v == "1") {
        logger.format_timestamp_micros();
    } else {
        logger.format_timestamp(None);
    }
    logger.format_target(false).init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return;
        }
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let rendered = e.render().to_string();
            let usage = rendered
                .lines()
                .find(|l| l.starts_with("Usage:"))
                .unwrap_or("see --help");
            fail(&format!("a subcommand is missing; {}", usage.trim()), 2)
        }
        Err(e) => fail(&one_line(&e.render().to_string()), 2),
    };
    match cli.command {
        Some(Command::Ctl(args)) => ctl(args),
        Some(Command::Store(args)) => store(args),
        Some(Command::Receive(args)) => receive(args),
        Some(Command::Host(args)) => host(args),
        Some(Command::Cluster(args)) => cluster(args),
        Some(Command::Jail(args)) => match vmm::jail::run(&args) {
            Ok(code) => std::process::exit(code),
            Err(e) => fail(&format!("jail: {e}"), e.exit_code()),
        },
        None => run(cli.run),
    }
}

fn run(args: vmm::cli::RunArgs) {
    start_seccomp(args.seccomp);
    if args.share.is_some() {
        if let Err(e) = vmm::sharing::check_available() {
            fail(&e.to_string(), 2);
        }
    }
    let launch = match Launch::from_args(args) {
        Ok(launch) => launch,
        Err(e) => fail(&e.to_string(), 2),
    };
    match vmm::runner::run(&launch) {
        Ok(StopReason::Failed(message)) => fail(&message, 1),
        Ok(reason) => {
            log::info!("guest stopped: {reason:?}");
            std::process::exit(reason.exit_code());
        }
        Err(e) => fail(&e.to_string(), 1),
    }
}

fn receive(args: ReceiveArgs) {
    start_seccomp(args.seccomp);
    match vmm::migration::destination::receive(&args) {
        Ok(StopReason::Failed(message)) => fail(&message, 1),
        Ok(reason) => std::process::exit(reason.exit_code()),
        Err(e) => fail(&e.to_string(), 1),
    }
}

fn ctl(args: CtlArgs) {
    let request = match args.op {
        CtlOp::Pause => Request::Pause,
        CtlOp::Resume => Request::Resume,
        CtlOp::Status => Request::Status,
        CtlOp::Stats => Request::Stats,
        CtlOp::Shutdown => Request::Shutdown,
        CtlOp::Identities => Request::Identities,
        CtlOp::Migrate {
            dest,
            key,
            downtime_ms,
            max_rounds,
            no_compress,
            postcopy,
            postcopy_after,
        } => Request::Migrate {
            dest,
            key: std::path::absolute(&key)
                .unwrap_or(key)
                .display()
                .to_string(),
            downtime_ms,
            max_rounds,
            compress: !no_compress,
            postcopy_after: postcopy_after.or(postcopy.then_some(1)),
        },
        CtlOp::Snapshot { dir } => {
            // The VMM resolves relative paths against its own directory: send an absolute one.
            let dir = std::path::absolute(&dir).unwrap_or(dir);
            Request::Snapshot {
                dir: dir.display().to_string(),
            }
        }
    };
    let show_progress = matches!(request, Request::Migrate { .. }) && !args.json;
    let progress = |p: &serde_json::Value| {
        if show_progress {
            eprintln!(
                "round {}: {:.1} MB sent, {} pages found at destination, {} dirty ({:.0} pages/s), {:.0} MB/s, ~{:.0} ms left{}",
                p["round"],
                p["bytes_sent"].as_f64().unwrap_or(0.0) / 1e6,
                p["pages_found"],
                p["dirty_pages"],
                p["dirty_rate_pages_per_s"].as_f64().unwrap_or(0.0),
                p["bandwidth_mb_per_s"].as_f64().unwrap_or(0.0),
                p["estimated_remaining_ms"].as_f64().unwrap_or(0.0),
                match p["throttle_percent"].as_u64() {
                    Some(t) if t > 0 => format!(", guest throttled {t}%"),
                    _ => String::new(),
                }
            );
        }
    };
    let response = match client::call_with_progress(&args.api_sock, &request, CTL_TIMEOUT, progress)
    {
        Ok(response) => response,
        Err(e) => fail(&e.to_string(), 1),
    };
    if !response.ok {
        fail(response.error.as_deref().unwrap_or("request failed"), 1);
    }
    print_value(&response.result.unwrap_or_default(), args.json);
}

fn store(args: StoreArgs) {
    let dir = args.store.unwrap_or_else(fabric::default_dir);
    let mut store = match vmm::snapshot::open_store(&dir) {
        Ok(store) => store,
        Err(e) => fail(&format!("store {}: {e}", dir.display()), 1),
    };
    let value = match args.op {
        StoreOp::Stats => serde_json::json!({
            "store": dir,
            "stats": store.stats(),
            "roots": store.roots(),
            "host": vmm::sharing::host_summary(),
        }),
        StoreOp::Verify => match store.verify() {
            Ok(report) if report.is_clean() => serde_json::to_value(report).unwrap_or_default(),
            Ok(report) => {
                print_value(
                    &serde_json::to_value(&report).unwrap_or_default(),
                    args.json,
                );
                fail(&format!("store {} failed verification", dir.display()), 1);
            }
            Err(e) => fail(&format!("store {}: {e}", dir.display()), 1),
        },
        StoreOp::Gc => match store.gc() {
            Ok(report) => {
                let mut value = serde_json::to_value(report).unwrap_or_default();
                // Memory images no running VM maps go too (on tmpfs they hold RAM).
                if let Ok(images) = vmm::snapshot::image::dir(&dir) {
                    let (count, bytes) = vmm::snapshot::image::remove_unused(&images);
                    value["images_removed"] = count.into();
                    value["image_bytes_freed"] = bytes.into();
                }
                value
            }
            Err(e) => fail(&format!("store {}: {e}", dir.display()), 1),
        },
    };
    print_value(&value, args.json);
}

#[cfg(feature = "etcd")]
fn cluster(args: ClusterArgs) {
    use vmm::cluster::commands::CommandError;
    match vmm::cluster::commands::run(&args) {
        Ok(text) => print_text(&text),
        Err(CommandError::Incomplete { report, line }) => {
            print_text(&report);
            fail(&format!("cluster: {line}"), 1)
        }
        Err(e) => fail(&format!("cluster: {e}"), 1),
    }
}

#[cfg(not(feature = "etcd"))]
fn cluster(_: ClusterArgs) {
    fail("cluster: this fabvm was built without etcd support", 1);
}

#[cfg(feature = "etcd")]
fn host_serve(serve: &vmm::cli::ServeArgs) {
    if let Err(e) = vmm::cluster::agent::serve(serve) {
        fail(&format!("host serve: {e}"), 1);
    }
}

#[cfg(not(feature = "etcd"))]
fn host_serve(_: &vmm::cli::ServeArgs) {
    fail("host serve: this fabvm was built without etcd support", 1);
}

fn host(args: HostArgs) {
    if let HostOp::Serve(serve) = &args.op {
        host_serve(serve);
        return;
    }
    let value = serde_json::to_value(vmm::sharing::host_report()).unwrap_or_default();
    match args.op {
        HostOp::Stats => print_value(&value, args.json),
        HostOp::Metrics { store } => {
            let mut figures = value;
            figures["summary"] = vmm::sharing::host_summary();
            let dir = store.unwrap_or_else(fabric::default_dir);
            // A host without a store (or one busy now) still has VMs to report.
            let store = dir
                .exists()
                .then(|| fabric::Store::open(&dir).ok())
                .flatten();
            if let Some(store) = store {
                figures["store"] = serde_json::to_value(store.stats()).unwrap_or_default();
            }
            print!(
                "{}",
                vmm::metrics::prometheus::render(&figures, "fabvm_host")
            );
        }
        HostOp::Serve(_) => unreachable!("served above"),
    }
}

/// Sets the seccomp mode and starts rayon's workers under their filter, before any thread.
fn start_seccomp(args: vmm::cli::SeccompArgs) {
    if let Err(e) = vmm::seccomp::init(args.mode) {
        fail(&e.to_string(), 1);
    }
    vmm::seccomp::start_workers();
}

/// Prints a result: one line of JSON with `--json`, else indented JSON for people.
fn print_value(value: &serde_json::Value, json: bool) {
    let text = if json {
        serde_json::to_string(value)
    } else {
        serde_json::to_string_pretty(value)
    };
    print_text(&text.unwrap_or_default());
}

/// Prints `text` and a newline on stdout; a reader that went away (`fabvm ctl stats | head`)
/// ends the process quietly rather than with a panic.
fn print_text(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

/// clap's error as one line: its first line, and when that line only introduces a list
/// ("the following required arguments were not provided:"), the list's items after it.
fn one_line(rendered: &str) -> String {
    let mut lines = rendered.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ");
    if !first.ends_with(':') {
        return first.to_string();
    }
    let items: Vec<&str> = lines
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .collect();
    format!("{} {}", first, items.join(", "))
}

fn fail(message: &str, code: i32) -> ! {
    eprintln!("fabvm: {message}");
    std::process::exit(code);
}
