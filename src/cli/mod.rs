//! The `weightdiff` command (feature `cli`, on by default): parse flags, hand the job to
//! the library ([`crate::jobs`]), show what it says on stderr, print `--json` on stdout,
//! and choose the exit code. It lives in the library so that the binary (`src/main.rs`)
//! and the Python package's `weightdiff` console script run the very same [`main`].

/// A line on stderr. Never panics: with stderr closed (`weightdiff … 2>&1 | head -3`),
/// progress and notes are dropped and the run goes on to write its reports.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod args;
mod progress;

use crate::hub::DownloadProgress;
use crate::jobs::{self, Observer, Outcome, Status};
use crate::pipeline::{LowRankUpdate, Progress, ProgressUpdate};
use args::{Cli, Command, DisplayArgs};
use clap::Parser;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};

/// Exit status when some tensors failed but the run finished (SPEC §5).
const EXIT_TENSOR_ERRORS: u8 = 1;
/// Exit status for unusable arguments or unreadable models (SPEC §5).
const EXIT_UNUSABLE: u8 = 2;
/// Exit status of a run that finished and wrote its reports, but whose models are not a
/// base and a derivative (`unrelated`, `different_architecture`, `nothing_compared`): no
/// LoRA verdict, no adapter. Tensor errors (1) take precedence.
const EXIT_NOT_A_DERIVATIVE: u8 = 3;
/// Exit statuses after a clean stop on SIGINT / SIGTERM (128 + signal number).
const EXIT_SIGINT: u8 = 130;
const EXIT_SIGTERM: u8 = 143;

/// The stop signals: SIGINT and SIGTERM ask the run to stop cleanly (finish the outputs,
/// mark them incomplete); a second one while stopping ends the process at once. The
/// handlers are installed once the job has opened its models ([`Observer::started`]), so
/// Ctrl-C during a download still ends the process.
struct Signals {
    cancel: Arc<AtomicBool>,
    term: Arc<AtomicBool>,
    armed: Once,
}

impl Signals {
    fn new() -> Signals {
        Signals {
            cancel: Arc::new(AtomicBool::new(false)),
            term: Arc::new(AtomicBool::new(false)),
            armed: Once::new(),
        }
    }

    fn arm(&self) {
        use signal_hook::consts::{SIGINT, SIGTERM};
        use signal_hook::flag;
        self.armed.call_once(|| {
            for (sig, code) in [(SIGINT, EXIT_SIGINT), (SIGTERM, EXIT_SIGTERM)] {
                // Registered before the flag setter: it sees the flag as the previous
                // signal left it. Registration fails only for forbidden signals.
                let _ = flag::register_conditional_shutdown(sig, code as i32, self.cancel.clone());
                let _ = flag::register(sig, self.cancel.clone());
            }
            let _ = flag::register(SIGTERM, self.term.clone());
        });
    }
}

/// The terminal as a job's [`Observer`]: progress bar or lines, notes unless quiet,
/// errors always.
struct Terminal {
    progress: progress::Reporter,
    downloads: progress::Downloads,
    /// `--quiet` or `--json`: no notes, no download progress.
    quiet: bool,
    signals: Signals,
}

impl Terminal {
    fn new(display: DisplayArgs) -> Terminal {
        Terminal {
            progress: progress::Reporter::new(display.quiet),
            downloads: progress::Downloads::new(),
            quiet: display.quiet || display.json,
            signals: Signals::new(),
        }
    }

    /// The exit status of a job's outcome (SPEC §5): the one place it is decided.
    fn exit_code(&self, status: Status) -> u8 {
        match status {
            Status::Done => 0,
            Status::TensorErrors => EXIT_TENSOR_ERRORS,
            Status::NotADerivative => EXIT_NOT_A_DERIVATIVE,
            Status::Stopped if self.signals.term.load(Ordering::Relaxed) => EXIT_SIGTERM,
            Status::Stopped => EXIT_SIGINT,
        }
    }
}

impl Progress for Terminal {
    fn update(&self, u: ProgressUpdate<'_>) {
        self.progress.update(u);
    }
    fn lowrank(&self, u: LowRankUpdate<'_>) {
        self.progress.lowrank(u);
    }
}

impl Observer for Terminal {
    fn info(&self, line: &str) {
        if !self.quiet {
            say!("{line}");
        }
    }
    fn warn(&self, line: &str) {
        say!("{line}");
    }
    fn error(&self, line: &str) {
        say!("{} {line}", error_label());
    }
    fn started(&self) {
        self.signals.arm();
    }
    fn stage_done(&self) {
        self.progress.finish();
    }
    fn downloads(&self) -> &dyn DownloadProgress {
        if self.quiet {
            &crate::hub::Silent
        } else {
            &self.downloads
        }
    }
}

/// Colour on stderr only for a terminal, and never when `NO_COLOR` is set to anything
/// non-empty (<https://no-color.org>).
fn use_color() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

/// Log lines on stderr through `tracing`: warnings by default, `-v` info, `-vv` debug,
/// `-vvv` trace; a `RUST_LOG` filter, when set, wins.
fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("weightdiff={level}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(use_color())
        .with_target(false)
        // Its own report of a failed write would panic on a closed stderr.
        .log_internal_errors(false)
        .try_init();
}

/// `error:` in bold red when colour is on.
fn error_label() -> &'static str {
    if use_color() {
        "\x1b[1;31merror:\x1b[0m"
    } else {
        "error:"
    }
}

/// Runs the command line `args` (the program name first, as in [`std::env::args_os`])
/// and returns the exit status (SPEC §5).
pub fn main<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        // What clap's `Error::exit` does (help and --version too), without exiting.
        Err(e) => {
            let _ = e.print();
            let _ = std::io::stdout().flush();
            return u8::try_from(e.exit_code()).unwrap_or(EXIT_UNUSABLE);
        }
    };
    init_logging(cli.verbose);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            say!("{} {e:#}", error_label());
            EXIT_UNUSABLE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Compare(args) => {
            let t = Terminal::new(args.display);
            let mut job = args.job()?;
            job.options.cancel = Some(t.signals.cancel.clone());
            finish(&t, jobs::compare(&job, &t)?, args.display)
        }
        Command::ExtractLora(args) => {
            let t = Terminal::new(args.display);
            let mut job = args.job()?;
            job.options.cancel = Some(t.signals.cancel.clone());
            finish(&t, jobs::extract_lora(&job, &t)?, args.display)
        }
        Command::Merge {
            parts,
            output,
            top,
            display,
        } => {
            let t = Terminal::new(display);
            finish(&t, jobs::merge(&parts, &output, top, &t)?, display)
        }
        Command::Inspect { model, json } => {
            let t = Terminal::new(DisplayArgs { quiet: json, json });
            let found = jobs::inspect(&model, &t)?;
            print_stdout(&if json {
                crate::fsio::to_json(&found.to_json())
            } else {
                found.to_text().into_bytes()
            })?;
            Ok(t.exit_code(if found.broken {
                Status::TensorErrors
            } else {
                Status::Done
            }))
        }
        Command::Demo { output, display } => {
            let t = Terminal::new(display);
            finish(&t, jobs::demo(&output, &t)?, display)
        }
        Command::Report { dir, top, display } => {
            let t = Terminal::new(display);
            finish(&t, jobs::regenerate(&dir, top, &t)?, display)
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            // Into a buffer first: the generator panics on a closed stdout.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "weightdiff", &mut script);
            print_stdout(&script)?;
            Ok(0)
        }
    }
}

/// Prints the job's `--json` summary when asked, and picks the exit code.
fn finish(t: &Terminal, o: Outcome, display: DisplayArgs) -> anyhow::Result<u8> {
    if display.json
        && let Some(summary) = &o.summary
    {
        print_stdout(&crate::fsio::to_json(summary))?;
    }
    Ok(t.exit_code(o.status))
}

/// Writes `bytes` to stdout in one go. A closed stdout (`--json | head -c 20`) is not an
/// error of the run: the bytes are dropped and the exit status stays the run's.
fn print_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
