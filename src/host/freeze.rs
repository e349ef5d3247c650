//! Freezing a mounted filesystem for the moment of a snapshot, in a small child process
//! (`rbdvol freeze-guard`) so that it is always thawed: the guard freezes, says
//! `frozen`, and thaws as soon as its parent says so, its stdin closes (the daemon
//! exited or crashed), it is asked to stop (SIGTERM/SIGINT/SIGHUP), or its time is up.

use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::command::run_ok;
use crate::error::{Error, Result};

const FSFREEZE_DEADLINE: Duration = Duration::from_secs(20);

/// The guard's own body: freeze, wait for the end, thaw. Exits non-zero if it could
/// not freeze (nothing to undo then) or could not thaw.
pub fn guard(mountpoint: &Path, max: Duration) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the runtime", e))?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        // Handlers first: from now on these signals end the wait instead of the process.
        let mut term = signal(SignalKind::terminate()).map_err(|e| Error::io("SIGTERM", e))?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::io("SIGINT", e))?;
        let mut hup = signal(SignalKind::hangup()).map_err(|e| Error::io("SIGHUP", e))?;
        let mp = mountpoint.as_os_str();
        run_ok(
            "fsfreeze",
            [std::ffi::OsStr::new("-f"), mp],
            FSFREEZE_DEADLINE,
        )
        .await?;
        println!("frozen");
        // Any input or end of input on stdin (the daemon's pipe) means "thaw".
        let (tx, stdin_done) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            use std::io::Read;
            let _ = std::io::stdin().read(&mut [0u8; 1]);
            let _ = tx.send(());
        });
        let why = tokio::select! {
            _ = stdin_done => "asked to thaw (or the daemon exited)",
            _ = tokio::time::sleep(max) => "the freeze reached its time limit",
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => "SIGHUP",
        };
        let mut last = None;
        for _ in 0..3 {
            match run_ok(
                "fsfreeze",
                [std::ffi::OsStr::new("-u"), mp],
                FSFREEZE_DEADLINE,
            )
            .await
            {
                Ok(_) => {
                    eprintln!("thawed {}: {why}", mountpoint.display());
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("three attempts"))
    })
}

/// Thaws the filesystem at `mountpoint` if it is frozen (`fsfreeze -u`); an error
/// when it was not frozen is expected and means nothing.
pub async fn thaw(mountpoint: &Path) -> Result<()> {
    run_ok(
        "fsfreeze",
        [std::ffi::OsStr::new("-u"), mountpoint.as_os_str()],
        FSFREEZE_DEADLINE,
    )
    .await
    .map(|_| ())
}

/// A running guard, seen from the daemon. Dropping it thaws (stdin closes).
pub struct Frozen {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Frozen {
    /// Starts `exe freeze-guard MOUNTPOINT --max-secs N` and waits up to `within` for it
    /// to report the filesystem frozen.
    pub fn start(exe: &Path, mountpoint: &Path, max: Duration, within: Duration) -> Result<Frozen> {
        let mut child = Command::new(exe)
            .arg("freeze-guard")
            .arg(mountpoint)
            .arg("--max-secs")
            .arg(max.as_secs().max(1).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io("starting rbdvol freeze-guard", e))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            if let Some(out) = stdout {
                let first = std::io::BufReader::new(out).lines().next();
                let _ = tx.send(matches!(first, Some(Ok(ref l)) if l == "frozen"));
            }
        });
        let mut frozen = Frozen { child, stdin };
        match rx.recv_timeout(within) {
            Ok(true) => Ok(frozen),
            outcome => {
                // Not frozen (or not yet): closing stdin makes it thaw if it ever does.
                let detail = frozen.finish(Duration::from_secs(25));
                Err(Error::Command {
                    program: "fsfreeze".into(),
                    detail: match outcome {
                        Err(_) => format!(
                            "freezing {} did not finish within {}s; {detail}",
                            mountpoint.display(),
                            within.as_secs()
                        ),
                        Ok(_) => format!("could not freeze {}: {detail}", mountpoint.display()),
                    },
                })
            }
        }
    }

    /// Thaws: closes stdin and waits up to `wait` for the guard to exit; returns what
    /// it said on stderr.
    pub fn finish(&mut self, wait: Duration) -> String {
        self.stdin.take();
        let deadline = std::time::Instant::now() + wait;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if std::time::Instant::now() >= deadline => {
                    return "the freeze guard did not exit; it thaws at its time limit".into()
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        err.trim().to_string()
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.finish(Duration::from_secs(25));
    }
}
