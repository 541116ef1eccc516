//! The `fabvm` binary: parse the command line, run the VM, turn every failure into one line
//! on stderr and a non-zero exit.

use clap::error::ErrorKind;
use clap::Parser;
use vmm::cli::Cli;
use vmm::config::VmConfig;
use vmm::vcpu::exit::StopReason;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .format_target(false)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return;
        }
        Err(e) => {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            fail(first.trim_start_matches("error: "), 2);
        }
    };
    let config = match VmConfig::from_cli(cli) {
        Ok(config) => config,
        Err(e) => fail(&e.to_string(), 2),
    };
    match vmm::runner::run(&config) {
        Ok(StopReason::Failed(message)) => fail(&message, 1),
        Ok(reason) => {
            log::info!("guest stopped: {reason:?}");
            std::process::exit(reason.exit_code());
        }
        Err(e) => fail(&e.to_string(), 1),
    }
}

fn fail(message: &str, code: i32) -> ! {
    eprintln!("fabvm: {message}");
    std::process::exit(code);
}
