use std::ffi::OsString;
use std::os::unix::fs::symlink;

use super::disk::{parse_mountinfo, unescape, vpd_serial, Disk};
use super::holders::{holders, map_path, under, Holder};
use super::*;

/// A directory of its own under the system's temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("moat-agent-volumes-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn mount_points_are_checked_like_file_paths_and_keep_off_the_kernels_trees() {
    for good in ["/data", "/home/user/vol", "/mnt/a b", "/procfoo", "/devices"] {
        assert_eq!(checked_path(good).unwrap(), PathBuf::from(good));
    }
    let msg = |p: &str| checked_path(p).unwrap_err();
    for bad in ["/", "//", "/proc", "/proc/x", "/sys/fs", "/dev", "/dev/shm", "relative", "", "/a/../proc", "/a\0b"] {
        assert_eq!(msg(bad).code, ErrorCode::BadRequest, "{bad:?}");
    }
    assert!(msg("/").message.contains("cannot be mounted on /"));
    assert!(msg("/dev/shm").message.contains("/dev belongs to the kernel"), "{}", msg("/dev/shm").message);
    assert!(msg("/a/../b").message.contains("`..`"));
    assert!(msg(&format!("/{}", "x".repeat(MAX_PATH))).message.contains("at most 4096"));
}

#[test]
fn serials_are_read_from_the_unit_serial_number_page() {
    let page = |serial: &[u8]| {
        let mut p = vec![0, 0x80, 0, serial.len() as u8];
        p.extend_from_slice(serial);
        p
    };
    assert_eq!(vpd_serial(&page(b"moat-vol-1")), Some(&b"moat-vol-1"[..]));
    assert_eq!(vpd_serial(&page(b"  moat-vol-1 \0\0")), Some(&b"moat-vol-1"[..]), "padding is not part of it");
    // Exact matches only: slot 1 must not find slot 10's disk.
    assert_ne!(vpd_serial(&page(b"moat-vol-10")), Some(&b"moat-vol-1"[..]));
    let mut long = page(b"moat-vol-2");
    long[3] = 200;
    assert_eq!(vpd_serial(&long), Some(&b"moat-vol-2"[..]), "a length past the data is cut to it");
    let mut other = page(b"x");
    other[1] = 0x83;
    assert_eq!(vpd_serial(&other), None, "another page");
    assert_eq!(vpd_serial(&[0, 0x80]), None);
    assert_eq!(vpd_serial(&page(b"   ")), None);
}

#[test]
fn disks_are_found_by_serial_in_sysfs() {
    let sys = TempDir::new();
    let disk = |name: &str, serial: &str, dev: &str, size: &str| {
        let d = sys.path().join("block").join(name);
        std::fs::create_dir_all(d.join("device")).unwrap();
        let mut page = vec![0, 0x80, 0, serial.len() as u8];
        page.extend_from_slice(serial.as_bytes());
        std::fs::write(d.join("device/vpd_pg80"), page).unwrap();
        std::fs::write(d.join("dev"), dev).unwrap();
        std::fs::write(d.join("size"), size).unwrap();
    };
    std::fs::create_dir_all(sys.path().join("block/vda")).unwrap();
    disk("sda", "moat-vol-10", "8:0\n", "2048\n");
    disk("sdb", "moat-vol-1", "8:16\n", "0\n");
    disk("sdc", "moat-vol-1", "8:32\n", "2048\n");
    std::fs::write(sys.path().join("block/sdc/device/state"), "deleted\n").unwrap();
    let host = sys.path().join("class/scsi_host/host0");
    std::fs::create_dir_all(&host).unwrap();
    let e = disk::find_disk(sys.path(), "moat-vol-1", Duration::from_millis(1100)).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound, "neither a disk of unknown size nor one being removed is ready");
    assert!(e.message.contains("moat-vol-1") && e.message.contains("did not appear"), "{}", e.message);
    assert_eq!(std::fs::read_to_string(host.join("scan")).unwrap(), "- - -", "a missing disk is scanned for");
    std::fs::write(sys.path().join("block/sdb/size"), "2048\n").unwrap();
    std::fs::write(sys.path().join("block/sdb/device/state"), "running\n").unwrap();
    let found = disk::find_disk(sys.path(), "moat-vol-1", Duration::from_millis(50)).unwrap();
    assert_eq!(found, Disk { name: "sdb".into(), dev: (8, 16) });
    assert!(!disk::is_volume(sys.path(), (8, 16)), "looked up by number, under dev/block");
    std::fs::create_dir_all(sys.path().join("dev/block")).unwrap();
    symlink(sys.path().join("block/sdb"), sys.path().join("dev/block/8:16")).unwrap();
    assert!(disk::is_volume(sys.path(), (8, 16)));
    disk::remove(sys.path(), (8, 16));
    assert_eq!(std::fs::read_to_string(sys.path().join("block/sdb/device/delete")).unwrap(), "1");
}

#[test]
fn a_missing_device_node_is_made_and_a_wrong_one_refused() {
    let dev = TempDir::new();
    let disk = Disk { name: "sdz".into(), dev: (8, 240) };
    std::fs::write(dev.path().join("sdz"), b"not a device").unwrap();
    assert_eq!(disk.node(dev.path()).unwrap_err().code, ErrorCode::Internal);
    std::fs::remove_file(dev.path().join("sdz")).unwrap();
    // Making device nodes takes CAP_MKNOD, which the agent has as PID 1 (and tests run as root).
    if rustix::process::geteuid().is_root() {
        let node = disk.node(dev.path()).unwrap();
        assert_eq!(disk.node(dev.path()).unwrap(), node, "the node made is taken next time");
    }
}

#[test]
fn mountinfo_gives_points_devices_and_read_only_flags() {
    let text = b"22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw\n\
        30 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
        41 30 8:16 / /mnt/my\\040vol ro,relatime shared:9 master:2 - ext4 /dev/sdb ro,noload\n\
        broken line\n\
        42 30 8:0 / /data rw - ext4 /dev/sda rw\n";
    let m = parse_mountinfo(text);
    assert_eq!(m.len(), 4);
    assert_eq!((m[2].point.to_str(), m[2].dev, m[2].readonly), (Some("/mnt/my vol"), (8, 16), true));
    assert_eq!((m[3].point.to_str(), m[3].dev, m[3].readonly), (Some("/data"), (8, 0), false));
    assert_eq!(unescape(b"a\\040b\\011c\\134d\\\\x\\9"), b"a b\tc\\d\\\\x\\9");
}

#[test]
fn memory_map_lines_give_their_paths() {
    let line = b"7f3c1000-7f3c2000 r-xp 00001000 08:10 1234                       /data/lib/x y.so\n";
    assert_eq!(map_path(line), Some(&b"/data/lib/x y.so"[..]));
    assert_eq!(map_path(b"7ffd-7ffe rw-p 00000000 00:00 0                          [stack]\n"), None);
    assert_eq!(map_path(b"7ffd-7ffe rw-p 00000000 00:00 0\n"), None, "anonymous");
    assert_eq!(map_path(b"garbage"), None);
    let mp = Path::new("/data");
    assert!(under(b"/data", mp) && under(b"/data/a/b", mp) && under(b"/data/f (deleted)", mp));
    assert!(!under(b"/data2/f", mp) && !under(b"/", mp) && !under(b"pipe:[123]", mp));
}

/// A /proc of made-up processes: links and maps name what each one uses.
#[test]
fn holders_are_found_through_links_fds_and_maps() {
    let proc = TempDir::new();
    let process = |pid: u32, comm: &str, cwd: &str, fds: &[&str], maps: &str| {
        let d = proc.path().join(pid.to_string());
        std::fs::create_dir_all(d.join("fd")).unwrap();
        std::fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
        symlink(cwd, d.join("cwd")).unwrap();
        symlink("/", d.join("root")).unwrap();
        symlink("/usr/bin/x", d.join("exe")).unwrap();
        for (i, fd) in fds.iter().enumerate() {
            symlink(fd, d.join("fd").join(i.to_string())).unwrap();
        }
        std::fs::write(d.join("maps"), maps).unwrap();
    };
    process(1, "init", "/", &["/dev/console", "socket:[9]"], "");
    process(12, "sh", "/data/work", &[], "");
    process(40, "python3", "/", &["/dev/null", "/data/db.sqlite (deleted)"], "");
    process(41, "loader", "/", &[], "7f-80 r-xp 0 08:00 5 /usr/lib/libc.so\n7f-80 r-xp 0 08:00 6 /data/lib.so\n");
    process(50, "other", "/data2", &["/data2/f"], "");
    std::fs::create_dir_all(proc.path().join("self")).unwrap();
    std::fs::write(proc.path().join("meminfo"), "").unwrap();

    let (found, total) = holders(proc.path(), Path::new("/data"), 2);
    assert_eq!(total, 3);
    assert_eq!(found, [Holder { pid: 12, comm: "sh".into() }, Holder { pid: 40, comm: "python3".into() }]);
    let msg = busy_message(Path::new("/data"), &found, total, &[]);
    assert_eq!(
        msg,
        "The volume at /data is used by processes 12 (sh), 40 (python3) and 1 more. Stop them, or have them leave \
         /data (close their files, change directory), and unmount again."
    );
    let (found, total) = holders(proc.path(), Path::new("/nothing"), super::holders::SHOWN);
    assert_eq!((found.len(), total), (0, 0));
}

#[test]
fn a_real_process_with_its_directory_on_a_mount_is_named() {
    let dir = TempDir::new();
    let mut child = std::process::Command::new("sleep").arg("30").current_dir(dir.path()).spawn().unwrap();
    let (found, _) = holders(Path::new("/proc"), dir.path(), 100);
    let _ = child.kill();
    let _ = child.wait();
    assert!(found.iter().any(|h| h.pid == child.id() && h.comm == "sleep"), "{found:?}");
}

#[test]
fn busy_messages_say_what_holds_the_volume() {
    let one = [Holder { pid: 7, comm: "vim".into() }];
    let at = Path::new("/v");
    assert!(busy_message(at, &one, 1, &[]).starts_with("The volume at /v is used by process 7 (vim). Stop them"));
    let m = busy_message(at, &[], 0, &["/v/sub".into()]);
    assert!(m.contains("has file systems mounted under it (/v/sub)"), "{m}");
    let m = busy_message(at, &[], 0, &[]);
    assert!(m.contains("no process has anything open in it"), "{m}");
}

#[test]
fn only_a_root_with_nothing_but_lost_and_found_is_fresh() {
    let names = |n: &[&str]| n.iter().map(OsString::from).collect::<Vec<_>>();
    assert!(is_fresh(&names(&[])));
    assert!(is_fresh(&names(&["lost+found"])));
    assert!(!is_fresh(&names(&["lost+found", "data"])));
    assert!(!is_fresh(&names(&["data"])));
}
