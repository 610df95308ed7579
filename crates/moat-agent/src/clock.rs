//! Setting the guest wall clock from the host's hello (the guest has no RTC worth trusting, and a
//! restored snapshot wakes up with the time it was saved at).

/// Set CLOCK_REALTIME to `unix_ns` nanoseconds since the Unix epoch.
pub fn set_wall_clock(unix_ns: u128) -> std::io::Result<()> {
    let secs = libc::time_t::try_from(unix_ns / 1_000_000_000)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "the host time is out of range"))?;
    // Below one billion, so it fits in a c_long.
    let nanos = (unix_ns % 1_000_000_000) as libc::c_long;
    let ts = libc::timespec { tv_sec: secs, tv_nsec: nanos };
    // SAFETY: clock_settime reads a valid timespec we own.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
