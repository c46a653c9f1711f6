//! `-p` progress on stderr. On a terminal it is a bar (bytes done, rate, time left); otherwise
//! it is qemu-img's `    (12.34/100%)` lines ended by `\r`, which scripts and qemu-iotests
//! parse, so redirected output stays byte for byte what qemu-img prints. `amend` prints the
//! lines on stdout, where qemu-img prints them, because qemu-iotests pipe its stdout alone.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the bar redraws at most: more often only costs the copy loop time.
const BAR_REFRESH_PER_SECOND: u8 = 10;

pub struct Progress {
    enabled: bool,
    /// Lines go to stdout rather than stderr.
    stdout: bool,
    last: Option<f64>,
    /// The bar, when progress is shown on a terminal.
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Progress shown only when `enabled` (`-p`), as a bar when stderr is a terminal.
    pub fn new(enabled: bool) -> Progress {
        let bar = (enabled && std::io::stderr().is_terminal()).then(terminal_bar);
        Self::with_bar(enabled, bar)
    }

    /// Progress whose lines go to stdout, as qemu-img prints them.
    pub fn on_stdout(enabled: bool) -> Progress {
        let bar = (enabled && std::io::stderr().is_terminal()).then(terminal_bar);
        let mut p = Progress {
            enabled,
            stdout: true,
            last: None,
            bar,
        };
        p.show(0.0);
        p
    }

    fn with_bar(enabled: bool, bar: Option<ProgressBar>) -> Progress {
        let mut p = Progress {
            enabled,
            stdout: false,
            last: None,
            bar,
        };
        p.show(0.0);
        p
    }

    /// Reports `done` of `total`; prints when the figure moved by 1% or more, or reached 100%.
    pub fn update(&mut self, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done.min(total));
            return;
        }
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        if self
            .last
            .is_none_or(|last| pct - last >= 1.0 || (pct >= 100.0 && last < 100.0))
        {
            self.show(pct);
        }
    }

    /// Reports `done` of `total` by qemu-img's rule for `convert`: a line when the figure
    /// moved by more than `min_skip` points either way, or is exactly 0 or 100 (so a closing
    /// report of 100 prints again, as qemu-img's does).
    pub fn report(&mut self, done: u64, total: u64, min_skip: f64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done.min(total));
            return;
        }
        let pct = if total == 0 {
            100.0
        } else {
            (done as f64 * 100.0 / total as f64).min(100.0)
        };
        self.offer(pct, min_skip);
    }

    /// Reports a percentage (as `amend` accounts it) by the same rule with a 1-point skip.
    pub fn percent(&mut self, pct: f32) {
        let pct = pct.min(100.0);
        if let Some(bar) = &self.bar {
            bar.set_length(10_000);
            bar.set_position((pct.max(0.0) * 100.0) as u64);
            return;
        }
        self.offer(f64::from(pct), 1.0);
    }

    fn offer(&mut self, pct: f64, min_skip: f64) {
        let last = self.last.unwrap_or(0.0);
        if pct > last + min_skip || pct < last - min_skip || pct == 100.0 || pct == 0.0 {
            self.show(pct);
        }
    }

    fn show(&mut self, pct: f64) {
        if self.enabled && self.bar.is_none() {
            if self.stdout {
                out!("    ({pct:.2}/100%)\r");
                let _ = std::io::stdout().flush();
            } else {
                err!("    ({pct:.2}/100%)\r");
                let _ = std::io::stderr().flush();
            }
        }
        self.last = Some(pct);
    }

    /// Ends the progress line (the bar stays, full).
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        } else if self.enabled && self.stdout {
            outln!();
            let _ = std::io::stdout().flush();
        } else if self.enabled {
            errln!();
        }
    }
}

impl Drop for Progress {
    /// A command that fails midway leaves the bar where it stopped, on a line of its own.
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }
}

/// A byte-counting bar on stderr.
fn terminal_bar() -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(0),
        ProgressDrawTarget::stderr_with_hz(BAR_REFRESH_PER_SECOND),
    );
    // The template is a constant, so it always parses; fall back to the default style anyway.
    if let Ok(style) = ProgressStyle::with_template(
        "{wide_bar} {percent:>3}% {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_follows_bytes_done_and_ends_full() {
        let mut p = Progress::with_bar(true, Some(ProgressBar::hidden()));
        p.update(0, 1000);
        p.update(250, 1000);
        let bar = p.bar.clone().expect("a bar");
        assert_eq!((bar.position(), bar.length()), (250, Some(1000)));
        p.update(2000, 1000);
        assert_eq!(bar.position(), 1000, "clamped to the total");
        p.finish();
        assert!(bar.is_finished());
    }
}
