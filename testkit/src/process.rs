//! Running the `moat` binary: one-shot commands and long-running children.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(20);

/// A `moat` binary and the environment its commands get.
#[derive(Clone, Debug)]
pub struct Moat {
    bin: PathBuf,
    env: Vec<(String, String)>,
    echo: bool,
}

impl Moat {
    /// The binary at `bin`.
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self {
            bin: bin.into(),
            env: Vec::new(),
            echo: false,
        }
    }

    /// This very binary (`moat demo` runs itself).
    pub fn current_exe() -> Result<Self> {
        Ok(Self::new(std::env::current_exe()?))
    }

    /// An environment variable for every command run from here on.
    #[must_use]
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Copy every log line of spawned processes to this process's stderr,
    /// prefixed with the process's name.
    #[must_use]
    pub fn echo(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    /// The binary's path.
    pub fn path(&self) -> &Path {
        &self.bin
    }

    /// A command for `moat ARGS...` with this environment, no stdin.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `moat ARGS...` to completion, whatever its exit status.
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        self.command(args)
            .output()
            .with_context(|| format!("run {}", self.bin.display()))
    }

    /// Runs `moat ARGS...`; its stdout if it succeeded, else an error with
    /// its stderr.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.output(args)?;
        if !out.status.success() {
            bail!(
                "moat {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Starts `moat ARGS...` as `name`, its stderr (the log) read line by
    /// line, kept, and copied to `log` if given.
    pub fn spawn(&self, name: &str, args: &[&str], log: Option<&Path>) -> Result<Process> {
        Process::start(name, self.command(args), log, self.echo)
    }
}

/// A running `moat` whose log lines are kept. Killed on drop.
pub struct Process {
    name: String,
    /// The child process itself.
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    log: Option<PathBuf>,
}

impl Process {
    /// Starts a prepared command as `name` (`moat` in a network namespace,
    /// say): its stderr (the log) read line by line, kept, copied to `log`
    /// if given, and echoed to this process's stderr if `echo`.
    pub fn start(name: &str, mut cmd: Command, log: Option<&Path>, echo: bool) -> Result<Self> {
        let mut file = log.map(std::fs::File::create).transpose()?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {name}"))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let echo = echo.then(|| name.to_owned());
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(f) = &mut file {
                    let _ = writeln!(f, "{line}");
                }
                if let Some(name) = &echo {
                    eprintln!("[{name}] {line}");
                }
                sink.lock().expect("log lines").push(line);
            }
        });
        Ok(Self {
            name: name.to_owned(),
            child,
            lines,
            reader: Some(reader),
            log: log.map(Path::to_owned),
        })
    }

    /// The name it was started as.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every log line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("log lines").clone()
    }

    /// How many log lines so far.
    pub fn count(&self) -> usize {
        self.lines.lock().expect("log lines").len()
    }

    /// The JSON log lines after the first `from` lines (others skipped).
    pub fn json_since(&self, from: usize) -> Vec<Value> {
        let lines = self.lines.lock().expect("log lines");
        let lines = lines.get(from..).unwrap_or_default();
        lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// A JSON log line that satisfies `pred`; an error once the process has
    /// exited without one.
    fn look(&mut self, pred: &impl Fn(&Value) -> bool) -> Result<Option<Value>> {
        let found = |p: &Self| p.json_since(0).into_iter().find(|v| pred(v));
        if let Some(v) = found(self) {
            return Ok(Some(v));
        }
        let Some(status) = self.child.try_wait()? else {
            return Ok(None);
        };
        // Its stderr is closed: every line it wrote is read once the reader ends.
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        match found(self) {
            Some(v) => Ok(Some(v)),
            None => bail!("{} exited ({status}) {}", self.name, self.where_to_look()),
        }
    }

    /// Where its log is: the file, or the lines themselves.
    fn where_to_look(&self) -> String {
        match &self.log {
            Some(path) => format!("; see {}", path.display()),
            None => format!("; its log:\n{}", self.lines().join("\n")),
        }
    }

    /// One look for a JSON log line that satisfies `pred`: an error after
    /// `deadline` or if the process has exited without one.
    fn look_until(
        &mut self,
        deadline: Instant,
        pred: &impl Fn(&Value) -> bool,
    ) -> Result<Option<Value>> {
        let found = self.look(pred)?;
        if found.is_none() && Instant::now() > deadline {
            bail!(
                "{} did not log it in time{}",
                self.name,
                self.where_to_look()
            );
        }
        Ok(found)
    }

    /// Waits until a JSON log line satisfies `pred`; an error after
    /// `timeout` or if the process exits first. Blocks the thread.
    pub fn wait_for_log(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.look_until(deadline, &pred)? {
                Some(v) => return Ok(v),
                None => std::thread::sleep(POLL),
            }
        }
    }

    /// [`Process::wait_for_log`] for async callers: sleeps on the runtime.
    pub async fn wait_for_log_async(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.look_until(deadline, &pred)? {
                Some(v) => return Ok(v),
                None => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// The address listener `name` reported in its `listening` line
    /// (`ca`, `admin`, or an inbound/outbound listener's name), within 30 s.
    pub fn listening(&mut self, name: &str) -> Result<SocketAddr> {
        let line = self.wait_for_log(Duration::from_secs(30), listening(name))?;
        address(&line)
    }

    /// [`Process::listening`] for async callers.
    pub async fn listening_async(&mut self, name: &str) -> Result<SocketAddr> {
        let line = self
            .wait_for_log_async(Duration::from_secs(30), listening(name))
            .await?;
        address(&line)
    }

    /// Sends signal `sig` (`libc::SIGTERM`, ...).
    pub fn signal(&self, sig: i32) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: kill(2) with a pid this process spawned and still owns
        // (not yet reaped, so it cannot have been reused).
        if unsafe { libc::kill(pid, sig) } != 0 {
            bail!(
                "signal {sig} to {}: {}",
                self.name,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Its exit status once it has exited, if that is within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(POLL);
        }
        None
    }

    /// SIGTERM, then its exit status once it has exited; killed, and an
    /// error, if that takes longer than `grace`.
    pub async fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{} did not stop within {grace:?} of SIGTERM", self.name);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Matches the `listening` line of listener `name`.
fn listening(name: &str) -> impl Fn(&Value) -> bool + '_ {
    move |v| v["message"] == "listening" && v["listener"] == name
}

fn address(line: &Value) -> Result<SocketAddr> {
    let addr = line["addr"]
        .as_str()
        .context("a listening line without addr")?;
    Ok(addr.parse()?)
}
