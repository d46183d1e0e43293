//! Progress on stderr: an indicatif bar with ETA on a terminal, otherwise a plain line
//! every 10 tensors with ETA (for logs of batch jobs, SPEC §5).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;
use weightdiff::pipeline::{LowRankUpdate, Progress, ProgressUpdate};

/// Lines every this many tensors when stderr is not a terminal.
const LINE_EVERY: usize = 10;

pub enum Reporter {
    Quiet,
    Bar(Mutex<Option<ProgressBar>>),
    /// Start of the run, and of the low-rank stage once it reports.
    Lines(Instant, OnceLock<Instant>),
}

impl Reporter {
    pub fn new(quiet: bool) -> Reporter {
        if quiet {
            Reporter::Quiet
        } else if std::io::stderr().is_terminal() {
            Reporter::Bar(Mutex::new(None))
        } else {
            Reporter::Lines(Instant::now(), OnceLock::new())
        }
    }

    pub fn finish(&self) {
        if let Reporter::Bar(b) = self
            && let Some(bar) = b.lock().expect("progress lock").take()
        {
            bar.finish_and_clear();
        }
    }
}

impl Progress for Reporter {
    fn update(&self, u: ProgressUpdate<'_>) {
        match self {
            Reporter::Quiet => {}
            Reporter::Bar(b) => {
                let mut b = b.lock().expect("progress lock");
                let bar = b.get_or_insert_with(|| {
                    let bar = ProgressBar::new(u.bytes_total);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
                        )
                        .expect("valid template"),
                    );
                    bar
                });
                bar.set_position(u.bytes_done);
                bar.set_message(format!("{}/{} tensors", u.tensors_done, u.tensors_total));
            }
            Reporter::Lines(start, _) => {
                if u.tensors_done.is_multiple_of(LINE_EVERY) || u.tensors_done == u.tensors_total {
                    let el = start.elapsed().as_secs_f64();
                    let eta = if u.bytes_done > 0 {
                        el * (u.bytes_total - u.bytes_done) as f64 / u.bytes_done as f64
                    } else {
                        0.0
                    };
                    say!(
                        "[{}/{}] {:.1}s elapsed, ETA {:.1}s",
                        u.tensors_done,
                        u.tensors_total,
                        el,
                        eta
                    );
                }
            }
        }
    }

    /// The low-rank stage: a bar by elements (its cost is proportional to them) with
    /// ETA, or a line every 10 tensors.
    fn lowrank(&self, u: LowRankUpdate<'_>) {
        match self {
            Reporter::Quiet => {}
            Reporter::Bar(b) => {
                let mut b = b.lock().expect("progress lock");
                let bar = b.get_or_insert_with(|| {
                    let bar = ProgressBar::new(u.elements_total);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "low rank {bar:40} {human_pos}/{human_len} elements ETA {eta} {msg}",
                        )
                        .expect("valid template"),
                    );
                    bar
                });
                bar.set_position(u.elements_done);
                bar.set_message(format!("{}/{} matrices", u.tensors_done, u.tensors_total));
            }
            Reporter::Lines(_, stage) => {
                let start = stage.get_or_init(Instant::now);
                if u.tensors_done.is_multiple_of(LINE_EVERY) || u.tensors_done == u.tensors_total {
                    let el = start.elapsed().as_secs_f64();
                    let eta = if u.elements_done > 0 {
                        el * (u.elements_total - u.elements_done) as f64 / u.elements_done as f64
                    } else {
                        0.0
                    };
                    say!(
                        "[low rank {}/{}] {:.1}s elapsed, ETA {:.1}s",
                        u.tensors_done,
                        u.tensors_total,
                        el,
                        eta
                    );
                }
            }
        }
    }
}

/// Download progress on stderr: a byte bar on a terminal, otherwise a line per file.
pub struct Downloads {
    bar: Mutex<Option<ProgressBar>>,
    terminal: bool,
}

impl Downloads {
    pub fn new() -> Downloads {
        Downloads {
            bar: Mutex::new(None),
            terminal: std::io::stderr().is_terminal(),
        }
    }
}

impl weightdiff::hub::DownloadProgress for Downloads {
    fn start(&self, file: &str, bytes: Option<u64>) {
        let size = bytes.map_or(String::new(), |b| format!(" ({:.1} MB)", b as f64 / 1e6));
        if !self.terminal {
            say!("downloading {file}{size}");
            return;
        }
        let bar = ProgressBar::new(bytes.unwrap_or(0));
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("valid template"),
        );
        bar.set_message(format!("downloading {file}"));
        *self.bar.lock().expect("progress lock") = Some(bar);
    }

    fn advance(&self, n: u64) {
        if let Some(bar) = &*self.bar.lock().expect("progress lock") {
            bar.inc(n);
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.bar.lock().expect("progress lock").take() {
            bar.finish_and_clear();
        }
    }
}
