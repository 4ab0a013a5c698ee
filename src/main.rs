//! The `cryopod` command line. Options follow CRIU's spelling where CRIU
//! has one, so its users feel at home.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{ArgAction, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use cryopod::dump::{DumpOptions, dump};
use cryopod::restore::{Outcome, RestoreOptions, restore};
use cryopod::sys::Pid;

#[derive(Parser)]
#[command(
    name = "cryopod",
    version,
    about = "Checkpoint/restore for Linux processes, x86_64 and ia32"
)]
struct Cli {
    /// More logging: -v shows each step, -vv everything.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    /// Write the log to this file instead of the terminal.
    #[arg(short = 'o', long = "log-file", global = true, value_name = "LOGFILE")]
    log_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Freeze a process and write its state to an image directory.
    Dump {
        /// The process to dump.
        #[arg(short = 't', long = "tree", value_name = "PID")]
        pid: i32,
        /// Image directory (created if missing).
        #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
        dir: PathBuf,
        /// Let the process go on after the dump instead of killing it.
        #[arg(short = 'R', long)]
        leave_running: bool,
    },
    /// Recreate a process from an image directory.
    Restore {
        /// Image directory.
        #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
        dir: PathBuf,
        /// Return once the process runs, instead of waiting for it.
        #[arg(short = 'd', long = "restore-detached")]
        detached: bool,
        /// Write the restored pid to this file.
        #[arg(long, value_name = "FILE")]
        pidfile: Option<PathBuf>,
    },
    /// Say which kernel features cryopod relies on are present.
    Check,
    /// Print a whole image as JSON.
    Show {
        /// Image directory.
        dir: PathBuf,
    },
}

fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    let level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("CRYOPOD_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("cryopod={level}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match &cli.log_file {
        Some(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("creating log file {}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        None => builder
            .with_ansi(cryopod::sys::stderr_is_tty())
            .with_writer(std::io::stderr)
            .init(),
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    init_logging(&cli)?;
    match cli.cmd {
        Cmd::Dump {
            pid,
            dir,
            leave_running,
        } => {
            dump(&DumpOptions {
                pid: Pid(pid),
                dir,
                leave_running,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Restore {
            dir,
            detached,
            pidfile,
        } => {
            match restore(&RestoreOptions {
                dir,
                detached,
                pidfile,
            })? {
                Outcome::Detached(_) => Ok(ExitCode::SUCCESS),
                Outcome::Exited(code) => Ok(ExitCode::from(code.clamp(0, 255) as u8)),
            }
        }
        Cmd::Check => {
            let ok = cryopod::check::report(&cryopod::check::run());
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Show { dir } => {
            let value = cryopod::image::show(&dir)?;
            println!("{}", serde_json::to_string_pretty(&value)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let to_file = cli.log_file.is_some();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if to_file {
                // The log file tells the whole story; stderr gets the line too.
                tracing::error!("{e:#}");
            }
            eprintln!("cryopod: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
