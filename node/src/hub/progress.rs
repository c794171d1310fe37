//! Progress of a download: a bar on the terminal (bytes, rate, time left),
//! a log line at every tenth for logs and non-terminals, and the figures
//! handed on (to the cluster view).

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct FetchProgress<'a> {
    what: String,
    bar: ProgressBar,
    logged_tenth: Mutex<Option<u64>>,
    report: Box<dyn Fn(u64, u64) + Send + Sync + 'a>,
}

impl<'a> FetchProgress<'a> {
    /// A progress for fetching `what`; `report(done, total)` gets every
    /// update. The bar draws only when stderr is a terminal.
    pub fn new(what: impl Into<String>, report: impl Fn(u64, u64) + Send + Sync + 'a) -> Self {
        let what = what.into();
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, {eta} left",
        )
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message(what.clone());
        Self {
            what,
            bar,
            logged_tenth: Mutex::new(None),
            report: Box::new(report),
        }
    }

    pub fn update(&self, done: u64, total: u64) {
        self.bar.set_length(total);
        let resumed = self.bar.position() == 0 && done > 0;
        self.bar.set_position(done);
        if resumed {
            // What was on disk already is no speed: measured from here.
            self.bar.reset_eta();
        }
        let tenth = (done * 10).checked_div(total).unwrap_or(10);
        let mut logged = self.logged_tenth.lock().unwrap_or_else(|e| e.into_inner());
        if *logged != Some(tenth) {
            *logged = Some(tenth);
            if self.bar.is_hidden() {
                tracing::info!(
                    what = %self.what,
                    done_mib = done >> 20,
                    total_mib = total >> 20,
                    "download {}%",
                    tenth * 10
                );
            }
        }
        (self.report)(done, total);
    }
}

impl Drop for FetchProgress<'_> {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_found_on_disk_do_not_count_as_speed() {
        let progress = FetchProgress::new("model.gguf", |_, _| {});
        progress.update(4 << 30, 8 << 30); // resumed: 4 GiB were there
        assert_eq!(progress.bar.position(), 4 << 30);
        assert!(
            progress.bar.per_sec() < 1.0,
            "{} bytes/s",
            progress.bar.per_sec()
        );
    }
}
