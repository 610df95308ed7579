//! Mixing host entropy into the guest kernel's pool. Clones of one snapshot start with identical
//! RNG state, so every new connection reseeds with fresh host bytes.

use std::io::Write;
use std::os::fd::AsRawFd;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Largest seed accepted; more adds nothing.
const MAX_SEED: usize = 512;

/// Mix `seed` into the pool, credit it, and make the CRNG reseed now rather than within a
/// minute. Crediting needs CAP_SYS_ADMIN; without it the bytes are still mixed in.
pub fn reseed(seed: &[u8]) -> std::io::Result<()> {
    if seed.is_empty() {
        return Ok(());
    }
    let seed = &seed[..seed.len().min(MAX_SEED)];
    let mut urandom = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    info.resize(8 + seed.len().div_ceil(4) * 4, 0);
    // SAFETY: the buffer is a complete rand_pool_info whose buf_size matches the bytes after the
    // header; the kernel only reads it.
    let credited = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } == 0;
    if !credited {
        urandom.write_all(seed)?;
    }
    // SAFETY: an ioctl without arguments on our own fd.
    unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) };
    Ok(())
}
