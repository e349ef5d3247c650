//! Running external programs (rbd, blkid, mkfs, mount, losetup, fsck): always an argv,
//! never a shell; always a deadline, after which the whole process group is killed
//! (mkfs and rbd fork helpers that would otherwise outlive us); stderr is captured
//! into the error so the user sees what the program said.

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::error::{Error, Result};

/// What a finished program left behind.
#[derive(Debug, Clone)]
pub struct Output {
    /// The exit code; `None` if it died of a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs `program args…` to completion or until `deadline`, whichever comes first.
/// A program that cannot be started, or overruns, is an error; a non-zero exit is
/// not (callers decide what exit codes mean).
pub async fn run<I, S>(program: &str, args: I, deadline: Duration) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let shown = describe(program, &args);
    let mut cmd = Command::new(program);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so the deadline can kill everything it started.
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| Error::Command {
        program: program.to_string(),
        detail: format!("cannot start {shown}: {e}"),
    })?;
    let pid = child.id();
    tracing::debug!(command = %shown, "running");
    match tokio::time::timeout(deadline, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
        Ok(Err(e)) => Err(Error::Command {
            program: program.to_string(),
            detail: format!("{shown}: {e}"),
        }),
        Err(_) => {
            if let Some(pid) = pid {
                kill_group(pid);
            }
            Err(Error::Command {
                program: program.to_string(),
                detail: format!(
                    "{shown} did not finish within {}s and was killed",
                    deadline.as_secs()
                ),
            })
        }
    }
}

/// Like [`run`], but a non-zero exit is an error carrying the program's stderr.
pub async fn run_ok<I, S>(program: &str, args: I, deadline: Duration) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = run(program, &args, deadline).await?;
    if out.success() {
        return Ok(out);
    }
    Err(Error::Command {
        program: program.to_string(),
        detail: failure_text(&describe(program, &args), &out),
    })
}

/// "`cmd` exited with status N: <last lines of stderr>".
pub fn failure_text(shown: &str, out: &Output) -> String {
    let status = match out.code {
        Some(c) => format!("exit status {c}"),
        None => "killed by a signal".to_string(),
    };
    let said = if out.stderr.trim().is_empty() {
        out.stdout.trim()
    } else {
        out.stderr.trim()
    };
    let tail: Vec<&str> = said.lines().rev().take(4).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    if tail.is_empty() {
        format!("{shown} failed with {status}")
    } else {
        format!("{shown} failed with {status}: {}", tail.join(" / "))
    }
}

fn describe(program: &str, args: &[std::ffi::OsString]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn kill_group(pid: u32) {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    if let Err(e) = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL) {
        tracing::warn!(pid, error = %e, "could not kill the process group of an overrunning command");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_and_exit_codes_are_reported() {
        let out = run(
            "sh",
            ["-c", "echo out; echo err >&2; exit 3"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
        let err = run_ok(
            "sh",
            ["-c", "echo boom >&2; exit 1"],
            Duration::from_secs(5),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("exit status 1") && err.contains("boom"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_overrunning_command_and_its_children_are_killed() {
        let marker = tempfile::tempdir().unwrap();
        let pidfile = marker.path().join("grandchild");
        // The shell starts a grandchild that would outlive a plain kill of the shell.
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let started = std::time::Instant::now();
        let err = run("sh", ["-c", &script], Duration::from_millis(300))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("was killed"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let grandchild: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let alive = std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false);
        assert!(!alive, "the grandchild survived the deadline");
    }

    #[tokio::test]
    async fn a_missing_program_is_a_clear_error() {
        let err = run("/nonexistent/prog", ["x"], Duration::from_secs(1))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot start"), "{err}");
    }
}
