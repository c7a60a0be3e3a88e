//! One bash session per markdown file: commands are written to its stdin
//! one at a time, and their output (stdout and stderr together, as a
//! terminal shows them) is read up to a marker the session prints after
//! each command with its exit status.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::Duration;

/// Printed after each command; nothing a document shows contains it.
const MARK: &str = "\u{1e}mayfly-docs-status:";

/// How long one command may take before the session is declared hung. A
/// guard against a blocked walk, not a measure: documented commands take
/// seconds.
const HUNG: Duration = Duration::from_secs(300);

/// A running bash session in its own process group.
pub struct Session {
    /// The bash process.
    child: Child,
    /// Where commands are written.
    stdin: ChildStdin,
    /// Output chunks from the reader thread; closed at end of output.
    output: Receiver<Vec<u8>>,
    /// Output read but not yet claimed by a command.
    pending: Vec<u8>,
}

/// What one command printed and how it ended.
pub struct Ran {
    /// stdout and stderr, interleaved as written.
    pub output: String,
    /// The exit status bash reported (`$?`).
    pub status: i32,
}

impl Session {
    /// Starts bash in `dir` with `path` as its PATH, in a process group of
    /// its own so that everything it starts can be found afterwards.
    pub fn start(dir: &Path, path: &str) -> Session {
        let mut cmd = Command::new("bash");
        cmd.args(["--noprofile", "--norc", "-s"])
            .current_dir(dir)
            .env("PATH", path)
            .env("TERM", "dumb")
            .env("NO_COLOR", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0);
        // A reader's own settings must not leak into the documented runs.
        for (key, _) in std::env::vars() {
            if key.starts_with("MAYFLY_") || key == "SPIFFE_ENDPOINT_SOCKET" || key == "RUST_LOG" {
                cmd.env_remove(key);
            }
        }
        let mut child = cmd.spawn().expect("bash runs");
        let mut stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let (tx, output) = channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        // Errors go where a terminal shows them: beside the output.
        stdin.write_all(b"exec 2>&1\n").expect("bash reads");
        Session {
            child,
            stdin,
            output,
            pending: Vec::new(),
        }
    }

    /// The process group id: the session's and everything it started.
    pub fn group(&self) -> u32 {
        self.child.id()
    }

    /// Runs `command` and returns its output; `Err` if the session ended or
    /// the command hung.
    pub fn run(&mut self, command: &str) -> Result<Ran, String> {
        // Grouped with stdin from /dev/null, so a command that reads its
        // input cannot swallow the session's next lines, while assignments
        // and `$!` still reach the session.
        // The status is put back afterwards, for a following `echo $?`.
        let script = format!(
            "{{ {command}\n}} </dev/null\n__docs_status=$?\n\
             printf '{MARK}%d\\n' \"$__docs_status\"\n(exit $__docs_status)\n"
        );
        self.stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("the session ended: {e}"))?;
        loop {
            if let Some(ran) = self.take() {
                return Ok(ran);
            }
            match self.output.recv_timeout(HUNG) {
                Ok(chunk) => self.pending.extend(chunk),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "no end after {HUNG:?}; output so far:\n{}",
                        self.lossy()
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("the session ended; output:\n{}", self.lossy()));
                }
            }
        }
    }

    /// A finished command from `pending`, if its marker has arrived.
    fn take(&mut self) -> Option<Ran> {
        let mark = MARK.as_bytes();
        let at = self.pending.windows(mark.len()).position(|w| w == mark)?;
        let nl = self.pending[at..].iter().position(|&b| b == b'\n')? + at;
        let status = std::str::from_utf8(&self.pending[at + mark.len()..nl])
            .ok()?
            .parse()
            .ok()?;
        let output = String::from_utf8_lossy(&self.pending[..at]).into_owned();
        self.pending.drain(..=nl);
        Some(Ran { output, status })
    }

    /// What has been read so far, for messages.
    fn lossy(&self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }

    /// Ends the session: `exit`, then waits for bash.
    pub fn finish(mut self) {
        let _ = self.stdin.write_all(b"exit\n");
        drop(self.stdin);
        let _ = self.child.wait();
    }
}

/// The processes still alive in process group `group`, as `pid command`
/// lines.
pub fn survivors(group: u32) -> Vec<String> {
    let out = Command::new("pgrep")
        .args(["-a", "-g", &group.to_string()])
        .output()
        .expect("pgrep runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Kills process group `group` (what a file left behind).
pub fn kill_group(group: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .status();
}
