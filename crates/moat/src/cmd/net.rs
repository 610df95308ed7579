//! `moat net` and `moat port-forward`.

use moat_api::{ChangeAllowlist, NetSpec, PortForward};

use crate::cli::{AllowAction, HostArgs, NetCommand, PortForwardArgs};
use crate::cmd::daemon::connect;

pub async fn net(command: NetCommand, host: &HostArgs) -> anyhow::Result<i32> {
    let client = connect(host).await?;
    match command {
        NetCommand::Show { sandbox, json } => {
            let net = client.net(&sandbox).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&net)?);
            } else {
                print!("{}", describe(&net));
            }
        }
        NetCommand::Allow { sandbox, action, hosts } => {
            let change = match action {
                AllowAction::Add => ChangeAllowlist { add: hosts, remove: Vec::new() },
                AllowAction::Rm => ChangeAllowlist { add: Vec::new(), remove: hosts },
            };
            let net = client.change_allowlist(&sandbox, &change).await?;
            println!("allow: {}", if net.allow.is_empty() { "(nothing)".into() } else { net.allow.join(", ") });
        }
    }
    Ok(0)
}

/// The network in a few lines, one per setting that is set.
pub fn describe(net: &NetSpec) -> String {
    let mut out = format!("mode: {}\n", net.mode.as_str());
    let mut line = |label: &str, items: Vec<String>| {
        if !items.is_empty() {
            out.push_str(&format!("{label}: {}\n", items.join(", ")));
        }
    };
    line("allow", net.allow.clone());
    line("allow-cidr", net.allow_cidrs.clone());
    line("add-host", net.hosts.clone());
    line("dns", net.dns.clone());
    let secret =
        |s: &moat_api::SecretSpec| format!("{}@{}{}", s.name, s.hosts.join(","), if s.in_body { "+body" } else { "" });
    line("secrets", net.secrets.iter().map(secret).collect());
    line("ports", net.ports.iter().map(PortForward::to_string).collect());
    out
}

pub async fn port_forward(args: PortForwardArgs, host: &HostArgs) -> anyhow::Result<i32> {
    let client = connect(host).await?;
    let ports = match (args.forward, args.rm) {
        (Some(forward), _) => {
            let forward = PortForward::parse(&forward).map_err(|e| anyhow::anyhow!("{e}"))?;
            vec![client.add_port(&args.sandbox, &forward).await?]
        }
        (None, Some(port)) => {
            client.remove_port(&args.sandbox, port).await?;
            return Ok(0);
        }
        (None, None) => client.ports(&args.sandbox).await?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&ports)?);
    } else {
        for p in ports {
            println!("{p}");
        }
    }
    Ok(0)
}
