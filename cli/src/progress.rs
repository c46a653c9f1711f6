//! `-p` progress as qemu-img prints it (`    (12.34/100%)` lines ended by `\r`), on stderr.

use std::io::Write;

pub struct Progress {
    enabled: bool,
    last: Option<f64>,
}

impl Progress {
    pub fn new(enabled: bool) -> Progress {
        let mut p = Progress {
            enabled,
            last: None,
        };
        p.show(0.0);
        p
    }

    /// Reports `done` of `total`; prints when the figure moved by 1% or more, or reached 100%.
    pub fn update(&mut self, done: u64, total: u64) {
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

    fn show(&mut self, pct: f64) {
        if self.enabled {
            err!("    ({pct:.2}/100%)\r");
            let _ = std::io::stderr().flush();
        }
        self.last = Some(pct);
    }

    /// Ends the progress line.
    pub fn finish(&mut self) {
        if self.enabled {
            errln!();
        }
    }
}
