//! `moat df`: where the disk went, and what `moat prune`, `moat image gc` and `moat gc` would
//! give back.

use moat_api::{DiskUsage, DiskUse};

use crate::cli::{DfArgs, HostArgs};
use crate::cmd::daemon::connect;
use crate::cmd::volume::size;

pub async fn df(args: DfArgs, host: &HostArgs) -> anyhow::Result<i32> {
    let usage = connect(host).await?.df().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&usage)?);
    } else {
        print!("{}", table(&usage));
    }
    Ok(0)
}

/// The human table: use by kind, then what each cleaning command would free.
fn table(u: &DiskUsage) -> String {
    let row = |what: &str, d: DiskUse| format!("{what:<15} {:>6} {:>9}\n", d.count, size(d.bytes));
    let mut out = format!("{:<15} {:>6} {:>9}\n", "KIND", "COUNT", "SIZE");
    for (kind, d) in u.kinds() {
        out += &row(kind, d);
    }
    out += &format!("{:<15} {:>6} {:>9}\n", "total", "", size(u.total_bytes()));
    out += &format!("\n{:<15} {:>6} {:>9}\n", "RECLAIMABLE BY", "COUNT", "SIZE");
    let r = u.reclaimable;
    for (command, d) in [("moat prune", r.prune), ("moat image gc", r.image_gc), ("moat gc", r.gc)] {
        out += &row(command, d);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_every_kind_the_total_and_the_commands() {
        let mut u = DiskUsage::default();
        u.images.add(3 << 30);
        u.sandboxes.add(512 << 10);
        u.reclaimable.prune.add(512 << 10);
        let t = table(&u);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0].split_whitespace().collect::<Vec<_>>(), ["KIND", "COUNT", "SIZE"]);
        assert_eq!(lines[1].split_whitespace().collect::<Vec<_>>(), ["images", "1", "3.0G"]);
        assert_eq!(lines[5].split_whitespace().collect::<Vec<_>>(), ["sandboxes", "1", "512.0K"]);
        assert_eq!(lines[7].split_whitespace().collect::<Vec<_>>(), ["total", "3.0G"]);
        assert!(t.contains("moat prune") && t.contains("moat image gc") && t.contains("moat gc"), "{t}");
        assert_eq!(size(0), "0B");
        assert_eq!(size(1536), "1.5K");
    }
}
