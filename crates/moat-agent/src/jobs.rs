//! Background processes (`exec -d`): they belong to the agent, not to a channel or a connection,
//! so they outlive the request that started them and a reconnecting host. Their recent output is
//! kept in a bounded buffer for whoever attaches later, and followed live by attached channels.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use moat_proto::{AgentError, ErrorCode, ExitStatus, JobInfo, Message, Started, Stream, MAX_CHUNK};
use tokio::sync::{broadcast, mpsc, watch};

use crate::channel::{async_fd, exit_status, kill_group, read_off_thread, readable, Credit, Ctl, Fd, Outbox};
use crate::reaper::Ended;

/// Output kept per background process for later attaches; older output is dropped (and counted).
const KEPT_BYTES: usize = 1 << 20;
/// Ended processes remembered (the oldest are forgotten first).
const MAX_ENDED: usize = 256;
/// Live chunks an attached channel may fall behind before it misses some.
const FOLLOW_QUEUE: usize = 256;

#[derive(Clone, Debug)]
enum Event {
    Data(Stream, Arc<[u8]>),
    End(ExitStatus),
}

struct State {
    kept: VecDeque<(Stream, Arc<[u8]>)>,
    kept_bytes: usize,
    output: u64,
    dropped: u64,
    /// Set once the process exited and its output ended.
    ended: Option<ExitStatus>,
}

struct Job {
    pid: u32,
    argv: Vec<String>,
    started_at: i64,
    state: Mutex<State>,
    follow: broadcast::Sender<Event>,
}

impl Job {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("the job lock is never held across a panic")
    }

    fn record(&self, stream: Stream, data: &[u8]) {
        let chunk: Arc<[u8]> = data.into();
        let mut st = self.lock();
        st.output += data.len() as u64;
        st.kept_bytes += data.len();
        st.kept.push_back((stream, chunk.clone()));
        while st.kept_bytes > KEPT_BYTES {
            let Some((_, old)) = st.kept.pop_front() else { break };
            st.kept_bytes -= old.len();
            st.dropped += old.len() as u64;
        }
        // Sent under the lock, so an attach sees each chunk once: in its snapshot or live.
        let _ = self.follow.send(Event::Data(stream, chunk));
    }

    fn end(&self, status: ExitStatus) {
        let mut st = self.lock();
        st.ended = Some(status);
        let _ = self.follow.send(Event::End(status));
    }

    fn info(&self) -> JobInfo {
        let st = self.lock();
        JobInfo {
            pid: self.pid,
            argv: self.argv.clone(),
            started_at: self.started_at,
            exit: st.ended,
            output_bytes: st.output,
            dropped_bytes: st.dropped,
        }
    }
}

/// The agent's background processes, shared by every connection.
#[derive(Default)]
pub struct Jobs {
    jobs: Mutex<HashMap<u32, Arc<Job>>>,
}

impl Jobs {
    fn get(&self, pid: u32) -> Result<Arc<Job>, AgentError> {
        self.jobs.lock().expect("the jobs lock is never held across a panic").get(&pid).cloned().ok_or_else(|| {
            AgentError {
                code: ErrorCode::NotFound,
                message: format!("There is no background process {pid} (list them with `moat ps BOX`)."),
            }
        })
    }

    pub fn list(&self) -> Vec<JobInfo> {
        let jobs = self.jobs.lock().expect("the jobs lock is never held across a panic");
        let mut list: Vec<JobInfo> = jobs.values().map(|j| j.info()).collect();
        list.sort_by_key(|j| (j.started_at, j.pid));
        list
    }

    /// Take over a started process: pump its output into the buffer, record its end.
    pub fn adopt(
        self: &Arc<Self>,
        pid: u32,
        argv: Vec<String>,
        outputs: Vec<(Stream, OwnedFd)>,
        exited: tokio::sync::oneshot::Receiver<Ended>,
    ) {
        let started_at =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let (follow, _) = broadcast::channel(FOLLOW_QUEUE);
        let state = State { kept: VecDeque::new(), kept_bytes: 0, output: 0, dropped: 0, ended: None };
        let job = Arc::new(Job { pid, argv, started_at, state: Mutex::new(state), follow });
        {
            let mut jobs = self.jobs.lock().expect("the jobs lock is never held across a panic");
            if jobs.len() >= MAX_ENDED {
                let oldest =
                    jobs.values().filter(|j| j.lock().ended.is_some()).min_by_key(|j| j.started_at).map(|j| j.pid);
                if let Some(pid) = oldest {
                    jobs.remove(&pid);
                }
            }
            jobs.insert(pid, job.clone());
        }
        tokio::spawn(async move {
            let (exit_tx, exit_rx) = watch::channel(false);
            let pumps: Vec<_> = outputs
                .into_iter()
                .filter_map(|(stream, fd)| Some((stream, async_fd(fd).ok()?)))
                .map(|(stream, fd)| tokio::spawn(record(job.clone(), stream, fd, exit_rx.clone())))
                .collect();
            let status = exit_status(exited.await.unwrap_or(Ended::Signaled(libc::SIGKILL)), false);
            let _ = exit_tx.send(true);
            for p in pumps {
                let _ = p.await;
            }
            job.end(status);
        });
    }

    /// Signal a background process's group; refused once it ended (its pid may be reused).
    pub fn kill(&self, pid: u32, signal: i32) -> Result<(), AgentError> {
        let job = self.get(pid)?;
        if !(1..=64).contains(&signal) {
            return Err(AgentError {
                code: ErrorCode::BadRequest,
                message: format!("{signal} is not a signal number."),
            });
        }
        if job.lock().ended.is_some() {
            return Err(AgentError {
                code: ErrorCode::BadRequest,
                message: format!("Process {pid} has already ended."),
            });
        }
        kill_group(pid as i32, signal);
        Ok(())
    }

    /// Stream a background process's output on channel `id` (see `Request::Attach`).
    pub async fn attach(&self, id: u32, pid: u32, replay: bool, out: Outbox, mut ctl: mpsc::UnboundedReceiver<Ctl>) {
        let job = match self.get(pid) {
            Ok(j) => j,
            Err(e) => {
                out.send(id, Message::Error(e)).await;
                out.send(id, Message::Close).await;
                return;
            }
        };
        let (snapshot, ended, mut live) = {
            let st = job.lock();
            let snapshot: Vec<_> = if replay { st.kept.iter().cloned().collect() } else { Vec::new() };
            (snapshot, st.ended, job.follow.subscribe())
        };
        out.send(id, Message::Started(Started::Stream)).await;
        let credits = [Credit::new(), Credit::new()];
        for (stream, data) in snapshot {
            if !send(id, &out, &mut ctl, &credits, stream, &data).await {
                return;
            }
        }
        let status = match ended {
            Some(status) => status,
            None => loop {
                tokio::select! {
                    event = live.recv() => match event {
                        Ok(Event::Data(stream, data)) => {
                            if !send(id, &out, &mut ctl, &credits, stream, &data).await {
                                return;
                            }
                        }
                        Ok(Event::End(status)) => break status,
                        // Fell behind: those chunks are only in the buffer now; go on live.
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    msg = ctl.recv() => match msg {
                        Some(Ctl::Credit(Stream::Stdout, n)) => credits[0].give(n),
                        Some(Ctl::Credit(Stream::Stderr, n)) => credits[1].give(n),
                        Some(Ctl::Close) | None => return,
                        Some(_) => {}
                    },
                }
            },
        };
        out.send(id, Message::Eof { stream: Stream::Stdout }).await;
        out.send(id, Message::Eof { stream: Stream::Stderr }).await;
        out.send(id, Message::Exit(status)).await;
        out.send(id, Message::Close).await;
    }
}

/// Send one chunk under its stream's credit, still taking credit and close from the host.
async fn send(
    id: u32,
    out: &Outbox,
    ctl: &mut mpsc::UnboundedReceiver<Ctl>,
    credits: &[Arc<Credit>; 2],
    stream: Stream,
    data: &[u8],
) -> bool {
    let credit = &credits[if stream == Stream::Stdout { 0 } else { 1 }];
    let mut at = 0;
    while at < data.len() {
        let n = loop {
            tokio::select! {
                n = credit.take((data.len() - at).min(MAX_CHUNK) as u32) => break n as usize,
                msg = ctl.recv() => match msg {
                    Some(Ctl::Credit(Stream::Stdout, n)) => credits[0].give(n),
                    Some(Ctl::Credit(Stream::Stderr, n)) => credits[1].give(n),
                    Some(Ctl::Close) | None => return false,
                    Some(_) => {}
                },
            }
        };
        if !out.send(id, Message::Data { stream, data: data[at..at + n].to_vec() }).await {
            return false;
        }
        at += n;
    }
    true
}

/// Read one output pipe of a background process into its buffer until it ends.
async fn record(job: Arc<Job>, stream: Stream, fd: Fd, mut exited: watch::Receiver<bool>) {
    let mut buf = vec![0u8; MAX_CHUNK];
    while let Some(ready) = readable(&fd, &mut exited).await {
        let (read, back) = read_off_thread(&fd, ready, buf, MAX_CHUNK).await;
        buf = back;
        match read {
            Ok(0) => break,
            Ok(n) => job.record(stream, &buf[..n]),
            Err(rustix::io::Errno::AGAIN) => {}
            Err(_) => break,
        }
    }
}
