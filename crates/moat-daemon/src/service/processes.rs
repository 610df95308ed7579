//! Background processes in a sandbox (`moat exec -d`): start, list and signal them. The agent
//! keeps them, so they outlive the request that started them and daemon restarts; following
//! their output is [`Service::attach`].

use moat_api::{ErrorCode, JobInfo, ProcessStarted, SandboxInfo, StartProcess};
use moat_proto::{ExecRequest, Request, Started};

use super::labels::process_env;
use super::Service;
use crate::error::{process_error, ServiceError};

/// What the agent is asked to run in the background for `req` in sandbox `info`.
fn process_request(info: &SandboxInfo, req: StartProcess) -> Result<ExecRequest, ServiceError> {
    if req.argv.is_empty() {
        return Err(ServiceError::new(ErrorCode::InvalidRequest, "no command given", "give the command after `--`"));
    }
    Ok(ExecRequest {
        argv: req.argv,
        env: process_env(info, req.env),
        cwd: req.cwd,
        user: req.user,
        detach: true,
        ..Default::default()
    })
}

impl Service {
    /// Start a background process in a running sandbox.
    pub async fn start_process(&self, reference: &str, req: StartProcess) -> Result<ProcessStarted, ServiceError> {
        let (info, sandbox) = self.running(reference)?;
        let exec = sandbox.exec(process_request(&info, req)?).await.map_err(super::exec::start_error)?;
        Ok(ProcessStarted { pid: exec.pid() })
    }

    /// The background processes of a running sandbox, running or ended.
    pub async fn processes(&self, reference: &str) -> Result<Vec<JobInfo>, ServiceError> {
        let (_, sandbox) = self.running(reference)?;
        match sandbox.request(Request::Jobs).await.map_err(process_error)? {
            Started::Jobs { jobs } => Ok(jobs),
            other => Err(ServiceError::new(
                ErrorCode::Internal,
                format!("the agent answered {other:?}"),
                "report this as a bug",
            )),
        }
    }

    /// Send `signal` to a background process's group.
    pub async fn kill_process(&self, reference: &str, pid: u32, signal: i32) -> Result<(), ServiceError> {
        let (_, sandbox) = self.running(reference)?;
        sandbox.request(Request::Kill { pid, signal }).await.map_err(process_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_background_process_needs_a_command() {
        let info = crate::state::tests::sample("abc000000001", "a");
        let e = process_request(&info, StartProcess::default()).expect_err("no command");
        assert_eq!((e.code, e.message.as_str()), (ErrorCode::InvalidRequest, "no command given"));
        let req = StartProcess { argv: vec!["sleep".into(), "9".into()], ..StartProcess::default() };
        let req = process_request(&info, req).expect("a command");
        assert!(req.detach && !req.stdin && req.tty.is_none());
        assert_eq!(req.argv, ["sleep", "9"]);
    }
}
