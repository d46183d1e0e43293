//! Progress on stderr: an indicatif bar with ETA on a terminal, otherwise a plain line
//! every 10 tensors with ETA (for logs of batch jobs, SPEC §5).

use crate::pipeline::{LowRankUpdate, Progress, ProgressUpdate};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

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

/// Where one stage of work stands: units done of a total (bytes or elements, what its
/// time is proportional to) and items (tensors) done of a total.
struct Stage<'a> {
    done: u64,
    total: u64,
    items_done: usize,
    items_total: usize,
    /// Bar template, and the name of the items and of the line prefix.
    template: &'static str,
    items: &'static str,
    label: &'a str,
}

impl Reporter {
    /// Shows `s` as the bar (created with `s`'s template on first use) or, every
    /// [`LINE_EVERY`] items, as a line with the elapsed time since `start` and an ETA.
    fn show(&self, s: Stage<'_>, start: impl FnOnce() -> Instant) {
        match self {
            Reporter::Quiet => {}
            Reporter::Bar(b) => {
                let mut b = b.lock().expect("progress lock");
                let bar = b.get_or_insert_with(|| {
                    let bar = ProgressBar::new(s.total);
                    bar.set_style(
                        ProgressStyle::with_template(s.template).expect("valid template"),
                    );
                    bar
                });
                bar.set_position(s.done);
                bar.set_message(format!("{}/{} {}", s.items_done, s.items_total, s.items));
            }
            Reporter::Lines(..) => {
                if s.items_done.is_multiple_of(LINE_EVERY) || s.items_done == s.items_total {
                    let el = start().elapsed().as_secs_f64();
                    let eta = if s.done > 0 {
                        el * s.total.saturating_sub(s.done) as f64 / s.done as f64
                    } else {
                        0.0
                    };
                    say!(
                        "[{}{}/{}] {el:.1}s elapsed, ETA {eta:.1}s",
                        s.label,
                        s.items_done,
                        s.items_total
                    );
                }
            }
        }
    }

    /// Start of the run (lines only).
    fn run_start(&self) -> Instant {
        match self {
            Reporter::Lines(start, _) => *start,
            _ => Instant::now(),
        }
    }

    /// Start of the low-rank stage: its first report (lines only).
    fn stage_start(&self) -> Instant {
        match self {
            Reporter::Lines(_, stage) => *stage.get_or_init(Instant::now),
            _ => Instant::now(),
        }
    }
}

impl Progress for Reporter {
    fn update(&self, u: ProgressUpdate<'_>) {
        let s = Stage {
            done: u.bytes_done,
            total: u.bytes_total,
            items_done: u.tensors_done,
            items_total: u.tensors_total,
            template: "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            items: "tensors",
            label: "",
        };
        self.show(s, || self.run_start());
    }

    /// The low-rank stage: a bar by elements (its cost is proportional to them) with
    /// ETA, or a line every 10 tensors.
    fn lowrank(&self, u: LowRankUpdate<'_>) {
        let s = Stage {
            done: u.elements_done,
            total: u.elements_total,
            items_done: u.tensors_done,
            items_total: u.tensors_total,
            template: "low rank {bar:40} {human_pos}/{human_len} elements ETA {eta} {msg}",
            items: "matrices",
            label: "low rank ",
        };
        self.show(s, || self.stage_start());
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

impl crate::hub::DownloadProgress for Downloads {
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
