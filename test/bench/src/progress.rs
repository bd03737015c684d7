//! The run's progress bar, and the `[bench] …` log lines printed through it so
//! the bar never hides or garbles them.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar on stderr over the steps of the current stage (lanes, B5, B6).
/// indicatif draws nothing when stderr is not a terminal, so a redirected or
/// CI run gets the log lines alone.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    pub fn new() -> Self {
        let style = ProgressStyle::with_template(
            "{prefix:>5} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} {wide_msg}",
        )
        .expect("the progress template is valid")
        .progress_chars("=> ");
        // Hidden until the first stage has a length to show.
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden()).with_style(style);
        // Batches take seconds: keep the clock moving in between.
        bar.enable_steady_tick(Duration::from_secs(1));
        Self { bar }
    }

    /// One `[bench] …` line, printed above the bar.
    pub fn log(&self, line: &str) {
        self.bar.suspend(|| eprintln!("[bench] {line}"));
    }

    /// Starts a stage of `steps` steps.
    pub fn stage(&self, name: &'static str, steps: u64) {
        self.bar.set_length(steps);
        self.bar.set_position(0);
        self.bar.set_message("");
        self.bar.set_prefix(name);
        if self.bar.is_hidden() {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
        }
    }

    /// What the stage is doing now.
    pub fn doing(&self, what: String) {
        self.bar.set_message(what);
    }

    pub fn advance(&self, steps: u64) {
        self.bar.inc(steps);
    }

    /// Moves to step `position` of the stage (after a part that ended early).
    pub fn reach(&self, position: u64) {
        self.bar.set_position(position);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
