//! Sandbox networks: checking a [`NetSpec`], running a network stack per running sandbox,
//! changing the allowlist live, port forwards, and the secrets' CA in the guest.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use moat_api::{ChangeAllowlist, ErrorCode, NetMode, NetSpec, PortForward, SandboxInfo};
use moat_net::tls::{Ca, Secret};
use moat_net::{ConnectGuestError, GuestStream, HostPattern, Policy, Stack, StackConfig};
use moat_proto::Request;
use moat_sandbox::{ExecEvent, LinkError, Sandbox, SandboxError};
use tokio::task::JoinHandle;

use crate::error::ServiceError;
use crate::guest_stream::StderrTail;
use crate::service::Service;

/// Where the guest finds moat's CA, and a bundle of it with the image's own roots.
pub const GUEST_CA: &str = "/etc/moat/ca.pem";
pub const GUEST_CA_BUNDLE: &str = "/etc/moat/ca-bundle.pem";
/// The image's system bundle (Debian and derivatives); moat's CA is appended where it exists.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
const CA_CERT_FILE: &str = "net-ca.pem";
const CA_KEY_FILE: &str = "net-ca.key";

/// The network of one running sandbox.
pub(crate) struct LiveNet {
    /// The QEMU this stack is connected to; a relaunch replaces it.
    pid: u32,
    stack: Stack,
    policy: Arc<RwLock<Policy>>,
    forwards: Mutex<HashMap<u16, JoinHandle<()>>>,
}

impl Drop for LiveNet {
    fn drop(&mut self) {
        for (_, task) in self.forwards.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            task.abort();
        }
    }
}

fn invalid(message: impl Into<String>) -> ServiceError {
    ServiceError::invalid(message.into())
}

const MAX_ENTRIES: usize = 256;

/// Check a network spec from a user: every field, with what to write instead. `create` also
/// requires secret values.
pub fn check(spec: &NetSpec, create: bool) -> Result<(), ServiceError> {
    policy_of(spec)?;
    dns_of(spec)?;
    if spec.mode == NetMode::None
        && (!spec.allow.is_empty()
            || !spec.allow_cidrs.is_empty()
            || !spec.hosts.is_empty()
            || !spec.dns.is_empty()
            || !spec.secrets.is_empty()
            || !spec.ports.is_empty())
    {
        return Err(invalid(
            "a sandbox with network `none` has no network device: drop the allowlist, CIDRs, hosts, DNS, secrets \
             and ports, or choose another mode",
        ));
    }
    if spec.mode == NetMode::Default && !spec.allow.is_empty() {
        return Err(invalid("an allowlist needs mode `allow` (`--net allow=HOST,…`)"));
    }
    if [spec.allow.len(), spec.allow_cidrs.len(), spec.hosts.len(), spec.secrets.len(), spec.ports.len()]
        .iter()
        .any(|n| *n > MAX_ENTRIES)
    {
        return Err(invalid(format!("at most {MAX_ENTRIES} entries per network list")));
    }
    let mut names = std::collections::HashSet::new();
    for s in &spec.secrets {
        let ok_name = !s.name.is_empty()
            && s.name.len() <= 128
            && !s.name.starts_with(|c: char| c.is_ascii_digit())
            && s.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok_name {
            return Err(invalid(format!(
                "secret name {:?} is not an environment variable name: use letters, digits and _",
                s.name
            )));
        }
        if !names.insert(&s.name) {
            return Err(invalid(format!("secret {} is given twice", s.name)));
        }
        if s.hosts.is_empty() {
            return Err(invalid(format!("secret {} is bound to no host: write NAME@HOST", s.name)));
        }
        match &s.value {
            None if create => {
                return Err(invalid(format!(
                    "secret {} has no value: set the environment variable {} for `moat`",
                    s.name, s.name
                )))
            }
            Some(v) if v.is_empty() || v.len() > 16 * 1024 || v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) => {
                return Err(invalid(format!(
                    "secret {}'s value must be 1 byte to 16 KiB without line breaks or NUL bytes",
                    s.name
                )))
            }
            _ => {}
        }
    }
    let mut host_ports = std::collections::HashSet::new();
    for p in &spec.ports {
        check_port(p)?;
        if p.host_port != 0 && !host_ports.insert((p.host_addr.clone(), p.host_port)) {
            return Err(invalid(format!("host port {} is forwarded twice", p.host_port)));
        }
    }
    Ok(())
}

fn check_port(p: &PortForward) -> Result<IpAddr, ServiceError> {
    if p.guest_port == 0 {
        return Err(invalid("guest port 0 is not a port: use 1 to 65535"));
    }
    p.host_addr
        .parse::<IpAddr>()
        .map_err(|_| invalid(format!("{:?} is not an IP address to listen on: use e.g. 127.0.0.1", p.host_addr)))
}

fn policy_of(spec: &NetSpec) -> Result<Policy, ServiceError> {
    let err = |e: moat_net::NetError| invalid(e.to_string());
    let allow = match spec.mode {
        NetMode::Allow => {
            Some(spec.allow.iter().map(|h| HostPattern::parse(h)).collect::<Result<Vec<_>, _>>().map_err(err)?)
        }
        _ => None,
    };
    let mut allow_cidrs = Vec::new();
    for c in &spec.allow_cidrs {
        let net = match c.parse::<ipnet::Ipv4Net>() {
            Ok(n) => n,
            Err(_) => c
                .parse::<Ipv4Addr>()
                .map(ipnet::Ipv4Net::from)
                .map_err(|_| invalid(format!("{c:?} is not an IPv4 network: use e.g. 10.1.0.0/16 or 127.0.0.1/32")))?,
        };
        allow_cidrs.push(net);
    }
    let mut hosts = HashMap::new();
    for entry in &spec.hosts {
        let bad = || invalid(format!("{entry:?} is not a host entry: use NAME:IP, e.g. db.internal:10.0.0.5"));
        let (name, ip) = entry.rsplit_once(':').ok_or_else(bad)?;
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if !moat_net::policy::is_hostname(&name) {
            return Err(bad());
        }
        hosts.insert(name, ip.parse::<Ipv4Addr>().map_err(|_| bad())?);
    }
    for s in &spec.secrets {
        secret_hosts(s)?;
    }
    Ok(Policy { allow, allow_cidrs, hosts })
}

fn secret_hosts(s: &moat_api::SecretSpec) -> Result<Vec<HostPattern>, ServiceError> {
    s.hosts.iter().map(|h| HostPattern::parse(h).map_err(|e| invalid(format!("secret {}: {e}", s.name)))).collect()
}

fn dns_of(spec: &NetSpec) -> Result<Vec<SocketAddr>, ServiceError> {
    if spec.dns.len() > 4 {
        return Err(invalid("at most 4 DNS servers"));
    }
    spec.dns.iter().map(|d| moat_net::dns::parse_upstream(d).map_err(|e| invalid(e.to_string()))).collect()
}

/// What every process in the sandbox gets in its environment: the secrets' placeholders and where
/// moat's CA is.
pub fn guest_env(spec: &NetSpec) -> Vec<(String, String)> {
    if spec.secrets.is_empty() {
        return Vec::new();
    }
    let mut env: Vec<(String, String)> = spec.secrets.iter().map(|s| (s.name.clone(), s.placeholder())).collect();
    for var in ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"] {
        env.push((var.into(), GUEST_CA_BUNDLE.into()));
    }
    env.push(("NODE_EXTRA_CA_CERTS".into(), GUEST_CA.into()));
    env
}

/// The sandbox's CA, made on first use and kept in its run directory.
fn load_or_make_ca(dir: &Path, name: &str) -> Result<Ca, ServiceError> {
    let (cert, key) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
    if let (Ok(c), Ok(k)) = (std::fs::read_to_string(&cert), std::fs::read_to_string(&key)) {
        if let Ok(ca) = Ca::from_pem(&c, &k) {
            return Ok(ca);
        }
    }
    let ca = Ca::generate(name).map_err(|e| ServiceError::internal(format!("making the sandbox's CA: {e}")))?;
    let write = || -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&key)?;
        std::io::Write::write_all(&mut f, ca.key_pem().as_bytes())?;
        std::fs::write(&cert, ca.cert_pem())
    };
    write().map_err(|e| ServiceError::internal(format!("saving the sandbox's CA in {}: {e}", dir.display())))?;
    Ok(ca)
}

impl Service {
    /// Connect a network stack to a sandbox's freshly started (or adopted) QEMU, open its port
    /// forwards, and put moat's CA into the guest when it has secrets.
    pub(crate) async fn attach_net(
        self: &Arc<Self>,
        info: &SandboxInfo,
        sandbox: &Arc<Sandbox>,
    ) -> Result<(), ServiceError> {
        let mut spec = self.db(|db| db.net_spec(&info.id))?;
        if spec.mode == NetMode::None {
            self.nets.lock().expect("no panics while held").remove(&info.id);
            return Ok(());
        }
        self.fill_secrets(info, &mut spec)?;
        let policy = Arc::new(RwLock::new(policy_of(&spec)?));
        let dns = Arc::new(moat_net::dns::Dns::new(&dns_of(&spec)?).map_err(|e| invalid(e.to_string()))?);
        let dir = self.run_dir(&info.id);
        let secrets = if spec.secrets.is_empty() {
            None
        } else {
            let ca = load_or_make_ca(&dir, &info.name)?;
            install_ca(sandbox, &ca).await.map_err(|e| {
                ServiceError::new(
                    ErrorCode::BootFailed,
                    format!("putting the CA for the sandbox's secrets into the guest failed: {e}"),
                    format!(
                        "a sandbox with secrets needs {SYSTEM_BUNDLE} in the guest to be absent or a regular file \
                         of at most {} KiB, and an agent that answers; remove the sandbox with `moat rm -f {}`",
                        MAX_BUNDLE / 1024,
                        info.name
                    ),
                )
            })?;
            let mut bound = Vec::new();
            for s in &spec.secrets {
                if let Some(value) = &s.value {
                    let secret = Secret { placeholder: s.placeholder(), value: value.clone(), in_body: s.in_body };
                    bound.push((secret_hosts(s)?, secret));
                }
            }
            Some(moat_net::Secrets { ca: Arc::new(ca), bound })
        };
        let weak = Arc::downgrade(self);
        let id = info.id.clone();
        let on_refused = Arc::new(move |message: String| {
            if let Some(svc) = weak.upgrade() {
                let _ = svc.db(|db| db.event(Some(&id), "net.refused", &message));
            }
        });
        // A share of the descriptors, so one guest holding every flow open starves no one else.
        let limits = moat_net::FlowLimits::for_process(self.limits.max_sandboxes);
        let host_addresses = self.limits.host_addresses.clone();
        let config = StackConfig { policy: policy.clone(), dns, on_refused, secrets, limits, host_addresses };
        let nic = moat_vmm::connect_vm_socket(&dir.join(moat_vmm::run_files::NET_SOCKET)).await;
        let stack = nic
            .and_then(|nic| Stack::counted(nic, config, self.metrics.traffic(&info.id, &info.name)))
            .map_err(|e| ServiceError::internal(format!("connecting the network stack to QEMU's NIC socket: {e}")))?;
        let live = LiveNet { pid: sandbox.pid(), stack, policy, forwards: Mutex::new(HashMap::new()) };
        self.nets.lock().expect("no panics while held").insert(info.id.clone(), Arc::new(live));
        // Host port 0 picks a port once; it is kept, so the forward stays put across restarts.
        let mut opened = spec.clone();
        let mut failed = Vec::new();
        for p in &mut opened.ports {
            if let Err(e) = self.open_forward(&info.id, p).await {
                failed.push(format!("{p}: {}", e.message));
            }
        }
        if opened.ports != spec.ports {
            self.db(|db| db.set_net(&info.id, &opened))?;
        }
        if !failed.is_empty() {
            let message = format!("port forwards not opened: {}", failed.join("; "));
            self.db(|db| db.event(Some(&info.id), "net.port", &message))?;
        }
        Ok(())
    }

    /// Drop the network of sandbox `id` if it belongs to the QEMU with `pid` (which has ended).
    pub(crate) fn detach_net(&self, id: &str, pid: u32) {
        let mut nets = self.nets.lock().expect("no panics while held");
        if nets.get(id).is_some_and(|n| n.pid == pid) {
            nets.remove(id);
        }
    }

    /// Listen on the host side of `p` and forward to the guest; with host port 0, `p` learns
    /// the port picked.
    async fn open_forward(&self, id: &str, p: &mut PortForward) -> Result<(), ServiceError> {
        let ip = check_port(p)?;
        let net = self.live_net(id)?;
        let listener = tokio::net::TcpListener::bind((ip, p.host_port)).await.map_err(|e| {
            ServiceError::new(
                ErrorCode::InUse,
                format!("cannot listen on {}:{}: {e}", p.host_addr, p.host_port),
                "pick another host port, or 0 for any free one",
            )
        })?;
        p.host_port = listener.local_addr().map(|a| a.port()).unwrap_or(p.host_port);
        let task = net.stack.forward(listener, p.guest_port);
        net.forwards.lock().expect("no panics while held").insert(p.host_port, task);
        Ok(())
    }

    /// The network stack of running sandbox `id`.
    fn live_net(&self, id: &str) -> Result<Arc<LiveNet>, ServiceError> {
        self.nets.lock().expect("no panics while held").get(id).cloned().ok_or_else(|| {
            ServiceError::new(
                ErrorCode::InvalidPhase,
                "the sandbox has no network device",
                "ports need a network: create the sandbox without `--net none`",
            )
        })
    }

    /// `GET /v1/sandboxes/{ref}/ports/{guest_port}/connect`: one TCP connection to a port of a
    /// running sandbox, made inside the daemon: unlike a port forward it opens no host port, so a
    /// front can serve the sandbox's ports behind its own authentication.
    pub async fn connect_port(&self, reference: &str, guest_port: u16) -> Result<GuestStream, ServiceError> {
        if guest_port == 0 {
            return Err(invalid("guest port 0 is not a port: use 1 to 65535"));
        }
        let (info, _) = self.running(reference)?;
        let net = self.live_net(&info.id)?;
        net.stack.connect_guest(guest_port).await.map_err(|e| match e {
            ConnectGuestError::Refused(_) => ServiceError::new(
                ErrorCode::InvalidPhase,
                format!("port {guest_port} is not open in the sandbox"),
                format!(
                    "start a server listening on port {guest_port} in {} (on 0.0.0.0, not only 127.0.0.1)",
                    info.name
                ),
            ),
            ConnectGuestError::NoAnswer { wait, .. } => ServiceError::new(
                ErrorCode::InvalidPhase,
                format!("port {guest_port} in the sandbox did not answer within {}s", wait.as_secs()),
                format!(
                    "the guest may be overloaded, or a firewall in it drops connections; see `moat logs {}`",
                    info.name
                ),
            ),
            ConnectGuestError::Limit(n) => ServiceError::new(
                ErrorCode::LimitReached,
                format!("the sandbox's network has {n} connections open, the most it may hold"),
                "close some connections to or from the sandbox and try again",
            ),
            ConnectGuestError::Unaddressable(_) => invalid(format!("port {guest_port} cannot be connected to")),
        })
    }

    /// `POST /v1/sandboxes/{ref}/ports`: forward a host port to a running sandbox.
    pub async fn add_port(&self, reference: &str, mut p: PortForward) -> Result<PortForward, ServiceError> {
        let (info, _) = self.running(reference)?;
        let lock = self.op_lock(&info.id);
        let _guard = lock.lock().await;
        let mut spec = self.db(|db| db.net_spec(&info.id))?;
        if spec.ports.iter().any(|q| q.host_port == p.host_port && p.host_port != 0 && q.host_addr == p.host_addr) {
            return Err(ServiceError::new(
                ErrorCode::InUse,
                format!("host port {} is already forwarded", p.host_port),
                "remove it first (`moat port-forward BOX --rm PORT`) or pick another",
            ));
        }
        if spec.ports.len() >= MAX_ENTRIES {
            return Err(invalid(format!("at most {MAX_ENTRIES} port forwards")));
        }
        self.open_forward(&info.id, &mut p).await?;
        spec.ports.push(p.clone());
        self.db(|db| {
            db.set_net(&info.id, &spec)?;
            db.event(Some(&info.id), "net.port", &format!("{} forwards {p}", info.name))
        })?;
        Ok(p)
    }

    /// `DELETE /v1/sandboxes/{ref}/ports/{host_port}`.
    pub async fn remove_port(&self, reference: &str, host_port: u16) -> Result<NetSpec, ServiceError> {
        let info = self.resolve(reference)?;
        let lock = self.op_lock(&info.id);
        let _guard = lock.lock().await;
        let mut spec = self.db(|db| db.net_spec(&info.id))?;
        let before = spec.ports.len();
        spec.ports.retain(|p| p.host_port != host_port);
        if spec.ports.len() == before {
            return Err(ServiceError::new(
                ErrorCode::NotFound,
                format!("{} has no forward from host port {host_port}", info.name),
                "list them with `moat port-forward BOX`",
            ));
        }
        if let Some(net) = self.nets.lock().expect("no panics while held").get(&info.id) {
            if let Some(task) = net.forwards.lock().expect("no panics while held").remove(&host_port) {
                task.abort();
            }
        }
        self.db(|db| {
            db.set_net(&info.id, &spec)?;
            db.event(Some(&info.id), "net.port", &format!("{} stopped forwarding host port {host_port}", info.name))
        })?;
        Ok(redact(spec))
    }

    /// `POST /v1/sandboxes/{ref}/net/allow`: change the allowlist; new connections and DNS
    /// queries follow it at once.
    pub async fn change_allowlist(&self, reference: &str, change: ChangeAllowlist) -> Result<NetSpec, ServiceError> {
        let info = self.resolve(reference)?;
        let lock = self.op_lock(&info.id);
        let _guard = lock.lock().await;
        let mut spec = self.db(|db| db.net_spec(&info.id))?;
        if spec.mode != NetMode::Allow {
            return Err(ServiceError::new(
                ErrorCode::InvalidRequest,
                format!("{} has network mode `{}`, which has no allowlist", info.name, spec.mode.as_str()),
                "create the sandbox with `--net allow=HOST,…` to restrict it to hostnames",
            ));
        }
        for h in &change.add {
            HostPattern::parse(h).map_err(|e| invalid(e.to_string()))?;
            if !spec.allow.iter().any(|a| a.eq_ignore_ascii_case(h)) {
                spec.allow.push(h.to_ascii_lowercase());
            }
        }
        for h in &change.remove {
            if !spec.allow.iter().any(|a| a.eq_ignore_ascii_case(h)) {
                return Err(ServiceError::new(
                    ErrorCode::NotFound,
                    format!("{h} is not on {}'s allowlist", info.name),
                    "see it with `moat net show BOX`",
                ));
            }
            spec.allow.retain(|a| !a.eq_ignore_ascii_case(h));
        }
        check(&spec, false)?;
        let policy = policy_of(&spec)?;
        self.db(|db| {
            db.set_net(&info.id, &spec)?;
            db.event(Some(&info.id), "net.allow", &format!("{} allows {}", info.name, spec.allow.join(", ")))
        })?;
        if let Some(net) = self.nets.lock().expect("no panics while held").get(&info.id) {
            *net.policy.write().unwrap_or_else(|e| e.into_inner()) = policy;
        }
        Ok(redact(spec))
    }
}

fn redact(mut spec: NetSpec) -> NetSpec {
    for s in &mut spec.secrets {
        s.value = None;
    }
    spec
}

/// How long putting moat's CA into the guest may take. It is a few small file operations that a
/// guest finishes in about a second even when emulated; one that takes longer is stuck or
/// hostile, and must not hold up a start, an adoption, or the sandbox's op lock (which `rm -f`
/// waits for).
const INSTALL_CA_DEADLINE: Duration = Duration::from_secs(10);

/// Most bytes taken of the guest's system bundle (Debian's is about 200 KiB).
const MAX_BUNDLE: usize = 4 * 1024 * 1024;

/// Most bytes of guest-written text (the agent's reasons) put into an error message.
const MAX_GUEST_TEXT: usize = 512;

/// Why the CA could not be put into the guest. Every case is the guest's doing (or its agent's),
/// so it fails that sandbox alone.
#[derive(Debug, thiserror::Error)]
enum InstallCaError {
    #[error("the guest did not finish within {}s", INSTALL_CA_DEADLINE.as_secs())]
    Deadline,
    #[error("the guest's {SYSTEM_BUNDLE} is over {} KiB", MAX_BUNDLE / 1024)]
    BundleTooLarge,
    #[error("reading the guest's CA bundle: {0}")]
    Read(String),
    #[error("writing {path} in the guest: {reason}")]
    Write { path: &'static str, reason: String },
}

/// Guest-written text, cut to [`MAX_GUEST_TEXT`] bytes for an error message.
fn guest_text(mut text: String) -> String {
    if text.len() > MAX_GUEST_TEXT {
        let mut end = MAX_GUEST_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// What the agent said, without the link's wording around it.
fn agent_reason(e: SandboxError) -> String {
    guest_text(match e {
        SandboxError::Link(LinkError::Agent(a)) => a.message,
        e => e.to_string(),
    })
}

/// Put moat's CA into the guest, within [`INSTALL_CA_DEADLINE`]: its own file, a bundle with
/// the image's roots, and the image's system bundle where there is one (so tools that ignore the
/// environment trust it too).
///
/// The image's roots are read from the guest, which may have replaced the file with anything:
/// the read is bounded in time and size, and the agent refuses what is not a regular file. The
/// host has no better copy to build the bundle from: it keeps images only as disk files, and the
/// guest may rightly have changed its roots since.
async fn install_ca(sandbox: &Sandbox, ca: &Ca) -> Result<(), InstallCaError> {
    tokio::time::timeout(INSTALL_CA_DEADLINE, put_ca(sandbox, ca)).await.unwrap_or(Err(InstallCaError::Deadline))
}

async fn put_ca(sandbox: &Sandbox, ca: &Ca) -> Result<(), InstallCaError> {
    let cert = ca.cert_pem().to_string();
    let _ = sandbox
        .file_op(Request::Mkdir { path: "/etc/moat".into(), parents: true, mode: Some(0o755), owner: None })
        .await;
    let system = read_guest_bundle(sandbox).await?.unwrap_or_default();
    write_guest_file(sandbox, GUEST_CA, cert.as_bytes()).await?;
    let mut bundle = system.clone();
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(cert.as_bytes());
    write_guest_file(sandbox, GUEST_CA_BUNDLE, &bundle).await?;
    if !system.is_empty() && !system.windows(cert.len()).any(|w| w == cert.as_bytes()) {
        write_guest_file(sandbox, SYSTEM_BUNDLE, &bundle).await?;
    }
    Ok(())
}

/// The guest's system bundle, or `None` when it has none. At most [`MAX_BUNDLE`] bytes are
/// taken: past that the stream is dropped, which closes its channel and stops the agent.
async fn read_guest_bundle(sandbox: &Sandbox) -> Result<Option<Vec<u8>>, InstallCaError> {
    let mut exec = match sandbox.file_stream(Request::ReadFile { path: SYSTEM_BUNDLE.into() }).await {
        Ok(exec) => exec,
        Err(SandboxError::Link(LinkError::Agent(e))) if e.code == moat_proto::ErrorCode::NotFound => return Ok(None),
        Err(e) => return Err(InstallCaError::Read(agent_reason(e))),
    };
    let mut data = Vec::new();
    let mut reason = StderrTail::default();
    loop {
        match exec.next_event().await.map_err(|e| InstallCaError::Read(agent_reason(e.into())))? {
            ExecEvent::Stdout(d) if data.len() + d.len() > MAX_BUNDLE => return Err(InstallCaError::BundleTooLarge),
            ExecEvent::Stdout(d) => data.extend_from_slice(&d),
            ExecEvent::Stderr(d) => reason.push(&d),
            ExecEvent::Exit(s) if s.code == Some(0) => return Ok(Some(data)),
            ExecEvent::Exit(_) => return Err(InstallCaError::Read(guest_text(reason.text()))),
        }
    }
}

async fn write_guest_file(sandbox: &Sandbox, path: &'static str, data: &[u8]) -> Result<(), InstallCaError> {
    let fail = |reason: String| InstallCaError::Write { path, reason };
    let request = Request::WriteFile { path: path.into(), mode: Some(0o644), atomic: true, owner: None };
    let mut exec = sandbox.file_stream(request).await.map_err(|e| fail(agent_reason(e)))?;
    let control = exec.control();
    control.write_stdin(data).await.map_err(|e| fail(agent_reason(e.into())))?;
    control.close_stdin().await.map_err(|e| fail(agent_reason(e.into())))?;
    let mut reason = StderrTail::default();
    loop {
        match exec.next_event().await.map_err(|e| fail(agent_reason(e.into())))? {
            ExecEvent::Stdout(_) => {}
            ExecEvent::Stderr(d) => reason.push(&d),
            ExecEvent::Exit(s) if s.code == Some(0) => return Ok(()),
            ExecEvent::Exit(_) => return Err(fail(guest_text(reason.text()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_api::SecretSpec;

    fn secret(name: &str, value: Option<&str>, hosts: &[&str]) -> SecretSpec {
        SecretSpec {
            name: name.into(),
            value: value.map(String::from),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            in_body: false,
        }
    }

    fn rejects(spec: NetSpec, create: bool, says: &str) {
        let e = check(&spec, create).expect_err(says);
        assert!(e.message.contains(says), "{:?} does not say {says:?}", e.message);
    }

    #[test]
    fn specs_are_checked_field_by_field() {
        let allow = NetSpec {
            mode: NetMode::Allow,
            allow: vec!["pypi.org".into(), "*.pythonhosted.org".into()],
            ..NetSpec::default()
        };
        check(&allow, true).unwrap();
        let none = NetSpec { mode: NetMode::None, ..NetSpec::default() };
        check(&none, true).unwrap();
        rejects(NetSpec { dns: vec!["1.1.1.1".into()], ..none.clone() }, true, "no network device");
        rejects(NetSpec { allow: vec!["x.org".into()], ..NetSpec::default() }, true, "needs mode `allow`");
        rejects(NetSpec { allow: vec!["1.2.3.4".into()], ..allow.clone() }, true, "--allow-cidr");
        rejects(NetSpec { allow_cidrs: vec!["10.0.0.0/33".into()], ..NetSpec::default() }, true, "not an IPv4 network");
        check(&NetSpec { allow_cidrs: vec!["127.0.0.1".into(), "10.0.0.0/8".into()], ..NetSpec::default() }, true)
            .unwrap();
        rejects(NetSpec { hosts: vec!["db:300.1.1.1".into()], ..NetSpec::default() }, true, "NAME:IP");
        rejects(NetSpec { dns: vec!["dns.google".into()], ..NetSpec::default() }, true, "IP or IP:PORT");
        let ports = |s: &str| NetSpec { ports: vec![PortForward::parse(s).unwrap()], ..NetSpec::default() };
        rejects(ports("8080:0"), true, "guest port 0");
        rejects(ports("localhost:8080:80"), true, "not an IP address");
        check(&ports("0.0.0.0:0:80"), true).unwrap();
    }

    #[test]
    fn secrets_need_a_name_a_host_and_a_clean_value() {
        let with = |s: SecretSpec| NetSpec { secrets: vec![s], ..NetSpec::default() };
        check(&with(secret("OPENAI_API_KEY", Some("sk-1"), &["api.openai.com"])), true).unwrap();
        rejects(with(secret("OPENAI_API_KEY", None, &["api.openai.com"])), true, "set the environment variable");
        check(&with(secret("K", None, &["a.test"])), false).unwrap();
        rejects(with(secret("BAD-NAME", Some("v"), &["a.test"])), true, "environment variable name");
        rejects(with(secret("K", Some("v"), &[])), true, "bound to no host");
        rejects(with(secret("K", Some("a\r\nX-Injected: 1"), &["a.test"])), true, "line breaks");
        let twice = NetSpec {
            secrets: vec![secret("K", Some("v"), &["a.test"]), secret("K", Some("w"), &["b.test"])],
            ..NetSpec::default()
        };
        rejects(twice, true, "given twice");
    }

    /// Reasons the guest writes end up in errors and `last_error`: bounded, and still UTF-8.
    #[test]
    fn guest_text_in_errors_is_bounded() {
        assert_eq!(guest_text("/x is a FIFO, not a regular file.".into()), "/x is a FIFO, not a regular file.");
        let long = guest_text("é".repeat(MAX_GUEST_TEXT));
        assert!(long.len() <= MAX_GUEST_TEXT + '…'.len_utf8() && long.ends_with('…'), "{}", long.len());
    }

    #[test]
    fn the_guest_environment_has_placeholders_and_the_ca_never_values() {
        let spec = NetSpec { secrets: vec![secret("K", Some("real-value"), &["a.test"])], ..NetSpec::default() };
        let env = guest_env(&spec);
        assert!(env.contains(&("K".into(), "moat_placeholder_K".into())));
        assert!(env.contains(&("SSL_CERT_FILE".into(), GUEST_CA_BUNDLE.into())));
        assert!(env.contains(&("NODE_EXTRA_CA_CERTS".into(), GUEST_CA.into())));
        assert!(!format!("{env:?}").contains("real-value"));
        assert!(!format!("{spec:?}").contains("real-value"));
        assert!(guest_env(&NetSpec::default()).is_empty());
    }
}
