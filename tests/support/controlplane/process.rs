//! Processes of the control plane: each logs to a file, dies with the test
//! binary (even when it panics or is killed), and can be restarted with the
//! same command line.

use std::{
    ffi::OsString,
    fs::File,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, OnceLock, mpsc},
    time::{Duration, Instant},
};

/// How the processes are tied to their starter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Killed when the test binary exits, whatever the reason.
    TestBinary,
    /// Left running in its own session (`make cluster-up`); stopped by pid file.
    Detached,
}

pub struct Process {
    pub name: &'static str,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(&'static str, OsString)>,
    log: PathBuf,
    lifetime: Lifetime,
    child: Option<Child>,
}

impl Process {
    pub fn start(
        name: &'static str,
        program: PathBuf,
        args: Vec<OsString>,
        dir: &Path,
        lifetime: Lifetime,
    ) -> Self {
        Self::start_with_env(name, program, args, &[], dir, lifetime)
    }

    /// [`Self::start`] with extra environment variables.
    pub fn start_with_env(
        name: &'static str,
        program: PathBuf,
        args: Vec<OsString>,
        env: &[(&'static str, OsString)],
        dir: &Path,
        lifetime: Lifetime,
    ) -> Self {
        let mut process = Self {
            name,
            program,
            args,
            env: env.to_vec(),
            log: dir.join(format!("{name}.log")),
            lifetime,
            child: None,
        };
        process.spawn();
        process
    }

    /// A slot for a process that starts later; it has no pid and no log.
    pub fn not_started(name: &'static str) -> Self {
        Self {
            name,
            program: PathBuf::new(),
            args: Vec::new(),
            env: Vec::new(),
            log: PathBuf::new(),
            lifetime: Lifetime::TestBinary,
            child: None,
        }
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.log.display()));
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = match self.lifetime {
            Lifetime::TestBinary => spawn_tied_to_this_process(command),
            Lifetime::Detached => {
                use std::os::unix::process::CommandExt;
                command.process_group(0);
                command.spawn()
            }
        }
        .unwrap_or_else(|e| panic!("starting {} ({}): {e}", self.name, self.program.display()));
        if self.lifetime == Lifetime::Detached {
            std::fs::write(self.pid_file(), child.id().to_string()).expect("writing a pid file");
        }
        self.child = Some(child);
    }

    fn pid_file(&self) -> PathBuf {
        self.log.with_extension("pid")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Panics with the log's tail if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!(
                "{} exited with {status}; last log lines:\n{}",
                self.name,
                self.tail(40)
            );
        }
    }

    /// SIGKILL, then wait: like a crash or a node loss.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the process and starts it again with the same command line.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The last `lines` lines of the log.
    pub fn tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.lifetime == Lifetime::TestBinary {
            self.kill();
        }
    }
}

/// The last `lines` lines of a file, or a note that it cannot be read.
pub fn tail(path: &Path, lines: usize) -> String {
    match File::open(path) {
        Ok(file) => {
            let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// Stops the detached processes whose pid files are in `dir`.
pub fn stop_detached(dir: &Path) -> Vec<String> {
    let mut stopped = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return stopped;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "pid") {
            continue;
        }
        let Some(pid) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill(2) with a pid read from our own pid file.
        if unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
            let deadline = Instant::now() + Duration::from_secs(15);
            while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            unsafe { libc::kill(pid, libc::SIGKILL) };
            stopped.push(path.file_stem().unwrap().to_string_lossy().into_owned());
        }
        let _ = std::fs::remove_file(&path);
    }
    stopped
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `command` so that the kernel kills it when this process ends.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, and
/// the test harness runs each test on a thread of its own; so every child is
/// forked by one thread that lives as long as the process.
pub fn spawn_tied_to_this_process(mut command: Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("controlplane-spawner".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("starting the spawner thread");
        Mutex::new(requests)
    });
    let parent = std::process::id() as i32;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .unwrap()
        .send((command, reply))
        .expect("the spawner thread is alive");
    answer.recv().expect("the spawner thread answers")
}

/// A `/proc/PID/status` field in kB.
pub fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// User and system CPU seconds of a process so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which ends with the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / per_second
}
