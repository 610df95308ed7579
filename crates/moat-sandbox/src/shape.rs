//! A sandbox's machine: vCPUs, memory and root disk, checked once, where it is made.
//!
//! Firecracker's `vmm_config/machine_config.rs` is the model: one type with its bounds and one
//! error per bound, so everything after the check (the spec, the VM config, the disk overlay)
//! takes a `Shape` and never checks again.

use std::borrow::Cow;
use std::ops::RangeInclusive;

use moat_hint::Hint;

/// The size of a sandbox's machine. Only [`Shape::new`] makes one, so every `Shape` is within
/// [`Shape::VCPUS`], [`Shape::MEMORY_MIB`] and [`Shape::DISK_MIB`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    vcpus: u32,
    memory_mib: u32,
    disk_mib: u64,
}

/// A size out of its bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("{0} vCPUs is out of range")]
    Vcpus(u32),
    #[error("{0} MiB of memory is out of range")]
    Memory(u32),
    #[error("a {0} MiB disk is out of range")]
    Disk(u64),
}

impl Hint for ShapeError {
    fn hint(&self) -> Option<Cow<'static, str>> {
        Some(
            match self {
                ShapeError::Vcpus(_) => "use 1 to 64 vCPUs",
                ShapeError::Memory(_) => "use 64 MiB to 256 GiB of memory",
                ShapeError::Disk(_) => "use a disk of 64 MiB to 16 TiB",
            }
            .into(),
        )
    }
}

impl Shape {
    /// vCPUs a sandbox may have.
    pub const VCPUS: RangeInclusive<u32> = 1..=64;
    /// Memory a sandbox may have, in MiB: 64 MiB to 256 GiB.
    pub const MEMORY_MIB: RangeInclusive<u32> = 64..=256 * 1024;
    /// Root disk sizes a sandbox may ask for, in MiB: 64 MiB to 16 TiB.
    pub const DISK_MIB: RangeInclusive<u64> = 64..=16 * 1024 * 1024;

    /// A machine of `vcpus` vCPUs, `memory_mib` MiB of memory and a root disk of `disk_mib` MiB.
    /// The disk is a virtual size: an image whose own disk is larger keeps its size.
    pub fn new(vcpus: u32, memory_mib: u32, disk_mib: u64) -> Result<Shape, ShapeError> {
        if !Self::VCPUS.contains(&vcpus) {
            return Err(ShapeError::Vcpus(vcpus));
        }
        if !Self::MEMORY_MIB.contains(&memory_mib) {
            return Err(ShapeError::Memory(memory_mib));
        }
        if !Self::DISK_MIB.contains(&disk_mib) {
            return Err(ShapeError::Disk(disk_mib));
        }
        Ok(Shape { vcpus, memory_mib, disk_mib })
    }

    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    pub fn memory_mib(&self) -> u32 {
        self.memory_mib
    }

    pub fn disk_mib(&self) -> u64 {
        self.disk_mib
    }

    /// The root disk's virtual size in bytes (at most 16 TiB: no overflow).
    pub fn disk_bytes(&self) -> u64 {
        self.disk_mib * 1024 * 1024
    }
}

/// One vCPU, 512 MiB and the smallest disk, which boots at the image's own size (one-shot runs).
impl Default for Shape {
    fn default() -> Shape {
        Shape::new(1, 512, *Shape::DISK_MIB.start()).expect("the default shape is within the bounds")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bound_is_inclusive_and_refused_one_past_it() {
        let (v, m, d) = (Shape::VCPUS, Shape::MEMORY_MIB, Shape::DISK_MIB);
        for (vcpus, memory, disk) in [(*v.start(), *m.start(), *d.start()), (*v.end(), *m.end(), *d.end())] {
            let shape = Shape::new(vcpus, memory, disk).expect("at the bounds");
            assert_eq!((shape.vcpus(), shape.memory_mib(), shape.disk_mib()), (vcpus, memory, disk));
        }
        assert_eq!(Shape::new(0, 512, 4096), Err(ShapeError::Vcpus(0)));
        assert_eq!(Shape::new(65, 512, 4096), Err(ShapeError::Vcpus(65)));
        assert_eq!(Shape::new(1, 63, 4096), Err(ShapeError::Memory(63)));
        assert_eq!(Shape::new(1, 256 * 1024 + 1, 4096), Err(ShapeError::Memory(256 * 1024 + 1)));
        assert_eq!(Shape::new(1, 512, 63), Err(ShapeError::Disk(63)));
        assert_eq!(Shape::new(1, 512, 16 * 1024 * 1024 + 1), Err(ShapeError::Disk(16 * 1024 * 1024 + 1)));
        assert_eq!(Shape::new(1, 512, u64::MAX), Err(ShapeError::Disk(u64::MAX)));
    }

    #[test]
    fn the_first_size_out_of_range_is_the_one_reported() {
        assert_eq!(Shape::new(0, 0, 0), Err(ShapeError::Vcpus(0)));
        assert_eq!(Shape::new(1, 0, 0), Err(ShapeError::Memory(0)));
    }

    #[test]
    fn the_largest_disk_in_bytes_does_not_overflow() {
        let shape = Shape::new(1, 512, *Shape::DISK_MIB.end()).unwrap();
        assert_eq!(shape.disk_bytes(), 16 << 40);
    }

    #[test]
    fn the_default_shape_is_small_and_takes_the_images_disk() {
        let shape = Shape::default();
        assert_eq!((shape.vcpus(), shape.memory_mib(), shape.disk_mib()), (1, 512, 64));
    }

    #[test]
    fn every_error_says_what_is_out_of_range_and_hints_the_bounds() {
        for (e, bounds) in [
            (ShapeError::Vcpus(0), "1 to 64"),
            (ShapeError::Memory(1), "64 MiB to 256 GiB"),
            (ShapeError::Disk(1), "64 MiB to 16 TiB"),
        ] {
            moat_hint::check(&e, true).unwrap();
            assert!(e.to_string().contains("out of range"), "{e}");
            assert!(e.hint().is_some_and(|h| h.contains(bounds)), "{e}");
        }
    }
}
