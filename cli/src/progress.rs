//! `-p` progress. On a terminal it is a bar on stderr (bytes done, rate, time left); otherwise
//! it is qemu-img's `    (12.34/100%)` lines ended by `\r` on stdout, where qemu-img prints
//! them and where scripts (and management tools such as vdsm) parse them, so redirected output
//! stays byte for byte what qemu-img prints.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the bar redraws at most: more often only costs the copy loop time.
const BAR_REFRESH_PER_SECOND: u8 = 10;

pub struct Progress {
    enabled: bool,
    /// How far (in points) the figure moves before another line prints: qemu-img's
    /// `qemu_progress_init` argument for the command.
    min_skip: f64,
    last: Option<f64>,
    /// The bytes done at the last [`Progress::advance`].
    done: u64,
    /// The bar, when progress is shown on a terminal.
    bar: Option<ProgressBar>,
}

/// qemu-img's step for most commands (convert, commit, amend).
pub const SKIP_ONE: f64 = 1.0;
/// qemu-img's step for `compare` and `rebase`.
pub const SKIP_TWO: f64 = 2.0;

impl Progress {
    /// Progress shown only when `enabled` (`-p`): as a bar when both stdout and stderr are a
    /// terminal, else in lines at least `min_skip` points apart.
    pub fn new(enabled: bool, min_skip: f64) -> Progress {
        let terminal = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
        Self::with_bar(enabled, min_skip, (enabled && terminal).then(terminal_bar))
    }

    fn with_bar(enabled: bool, min_skip: f64, bar: Option<ProgressBar>) -> Progress {
        let mut p = Progress {
            enabled,
            min_skip,
            last: None,
            done: 0,
            bar,
        };
        p.show(0.0);
        p
    }

    /// Reports `done` of `total` bytes.
    pub fn report(&mut self, done: u64, total: u64) {
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
        self.offer(pct);
    }

    /// Reports `done` of `total` bytes when more is done than at the last call: for a command
    /// that reports the same position from several places (`compare`), where qemu-img reports
    /// each step once.
    pub fn advance(&mut self, done: u64, total: u64) {
        if done > self.done || (total == 0 && self.last.is_none_or(|l| l < 100.0)) {
            self.done = done;
            self.report(done, total);
        }
    }

    /// Reports a percentage, for work not counted in bytes (`amend`).
    pub fn percent(&mut self, pct: f32) {
        let pct = pct.min(100.0);
        if let Some(bar) = &self.bar {
            bar.set_length(10_000);
            bar.set_position((pct.max(0.0) * 100.0) as u64);
            return;
        }
        self.offer(f64::from(pct));
    }

    /// qemu-img's rule: a line when the figure moved by more than the skip either way, or is
    /// exactly 0 or 100 (so a closing report of 100 prints again, as qemu-img's does).
    /// Returns whether the figure was shown.
    fn offer(&mut self, pct: f64) -> bool {
        let last = self.last.unwrap_or(0.0);
        let skip = self.min_skip;
        let shown = pct > last + skip || pct < last - skip || pct == 100.0 || pct == 0.0;
        if shown {
            self.show(pct);
        }
        shown
    }

    fn show(&mut self, pct: f64) {
        if self.enabled && self.bar.is_none() {
            out!("    ({pct:.2}/100%)\r");
            let _ = std::io::stdout().flush();
        }
        self.last = Some(pct);
    }

    /// Ends the progress line (the bar stays, full).
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        } else if self.enabled {
            outln!();
            let _ = std::io::stdout().flush();
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
        let mut p = Progress::with_bar(true, SKIP_ONE, Some(ProgressBar::hidden()));
        p.report(0, 1000);
        p.report(250, 1000);
        let bar = p.bar.clone().expect("a bar");
        assert_eq!((bar.position(), bar.length()), (250, Some(1000)));
        p.report(2000, 1000);
        assert_eq!(bar.position(), 1000, "clamped to the total");
        p.finish();
        assert!(bar.is_finished());
    }

    #[test]
    fn lines_follow_qemu_img_skip_rule() {
        let mut p = Progress::with_bar(false, SKIP_TWO, None);
        let shown: Vec<f64> = [0.0, 1.0, 2.0, 3.0, 4.0, 1.0, 100.0, 100.0]
            .into_iter()
            .filter(|&pct| p.offer(pct))
            .collect();
        // Not more than the skip away: 1, 2 (from 0) and 4 (from 3); 1 is back by exactly 2.
        // 100 prints each time it comes.
        assert_eq!(shown, vec![0.0, 3.0, 100.0, 100.0]);
    }
}
