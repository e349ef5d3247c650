//! Owns the markdown report: the machine and run details, a summary of every target
//! with MET / MISSED, and one section per figure (tables, notes, or the error that
//! stopped it). Written after every figure, so an interrupted run still leaves a report.

use std::path::Path;
use std::time::Duration;

use crate::util::{verdict, Ctx, R};

/// A target and how the run did against it.
pub struct Target {
    pub what: String,
    pub measured: String,
    /// None: the figure failed before the target could be measured.
    pub met: Option<bool>,
    pub why: String,
}

/// One figure's part of the report.
#[derive(Default)]
pub struct Section {
    pub title: String,
    pub body: String,
    pub targets: Vec<Target>,
    pub failed: Option<String>,
    pub took: Duration,
    /// The machine's 1-minute load average when the figure started and ended: other
    /// work on the machine shows up here.
    pub load: (String, String),
}

impl Section {
    pub fn new(title: &str) -> Section {
        Section {
            title: title.to_string(),
            ..Default::default()
        }
    }

    pub fn para(&mut self, text: &str) {
        self.body.push_str(text.trim_end());
        self.body.push_str("\n\n");
    }

    pub fn table(&mut self, head: &[&str], rows: &[Vec<String>]) {
        let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
        self.body
            .push_str(&line(head.iter().map(|h| h.to_string()).collect()));
        self.body
            .push_str(&line(head.iter().map(|_| "---".to_string()).collect()));
        for r in rows {
            self.body.push_str(&line(r.clone()));
        }
        self.body.push('\n');
    }

    pub fn target(&mut self, what: &str, measured: String, met: bool, why: String) {
        self.targets.push(Target {
            what: what.to_string(),
            measured,
            met: Some(met),
            why,
        });
    }
}

/// The 1-minute load average.
pub fn load1() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_string()
}

pub struct Report {
    pub details: Vec<(String, String)>,
    pub sections: Vec<Section>,
    /// Only these figures were run (`--only`); said in the report.
    pub only: Option<Vec<u32>>,
}

impl Report {
    pub fn render(&self) -> String {
        let mut out = String::from(
            "<!-- Written by integration/bench (benches/rbdvol.rs): the latest measured report. \
             Do not edit by hand; run the benchmark again. -->\n# rbdvol benchmark report\n\n",
        );
        out.push_str(
            "Written by `integration/bench` (issue 6); every number below was measured in this one run, \
             all figures side by side on the same throwaway cluster. Latencies are given as \
             **median / p99** (nearest rank: with fewer than 100 samples p99 is the slowest sample). \
             Targets are the issue's, never adjusted; a missed one says MISSED and why. The \
             machine is shared with other work (other engineers' clusters and test runs), so \
             each figure states the 1-minute load average at its start and end; on these 2 \
             cores, anything above 2 means processes were waiting for a CPU.\n\n",
        );
        if let Some(only) = &self.only {
            out.push_str(&format!(
                "**Partial run: only figure(s) {only:?} were run (`--only`).**\n\n"
            ));
        }
        out.push_str("## Machine and run\n\n| | |\n|---|---|\n");
        for (k, v) in &self.details {
            out.push_str(&format!("| {k} | {v} |\n"));
        }
        out.push_str("\n## Targets\n\n| figure | target | measured (median unless said) | verdict |\n|---|---|---|---|\n");
        for sec in &self.sections {
            for t in &sec.targets {
                let v = match t.met {
                    Some(m) => format!("**{}**", verdict(m)),
                    None => "**NOT MEASURED**".into(),
                };
                out.push_str(&format!(
                    "| {} | {} | {} | {} |\n",
                    sec.title, t.what, t.measured, v
                ));
            }
            if sec.failed.is_some() && sec.targets.is_empty() {
                out.push_str(&format!(
                    "| {} | (figure failed) | – | **NOT MEASURED** |\n",
                    sec.title
                ));
            }
        }
        out.push('\n');
        for sec in &self.sections {
            out.push_str(&format!(
                "## {}\n\n_took {:.0} s; 1-minute load average {} at its start, {} at its end_\n\n",
                sec.title,
                sec.took.as_secs_f64(),
                sec.load.0,
                sec.load.1
            ));
            out.push_str(&sec.body);
            if let Some(e) = &sec.failed {
                out.push_str(&format!(
                    "**FAILED**: the figure stopped with an error, so what is above is incomplete: `{}`\n\n",
                    e.replace('`', "'").replace('\n', " ")
                ));
            }
            let verdicts: Vec<&Target> = sec.targets.iter().collect();
            if !verdicts.is_empty() {
                for t in verdicts {
                    let v = match t.met {
                        Some(m) => verdict(m),
                        None => "NOT MEASURED",
                    };
                    out.push_str(&format!(
                        "- **{v}** — {}: measured {}. {}\n",
                        t.what, t.measured, t.why
                    ));
                }
                out.push('\n');
            }
        }
        out
    }

    pub fn write(&self, path: &Path) -> R<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).ctx(format!("creating {}", parent.display()))?;
        }
        let tmp = path.with_extension("md.tmp");
        std::fs::write(&tmp, self.render()).ctx(format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).ctx(format!("renaming to {}", path.display()))
    }
}
