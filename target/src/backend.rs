//! Namespace storage: a regular file, a block device, or memory (a memfd), all
//! accessed with positional I/O on one file descriptor, so every kind shares
//! one code path and concurrent commands need no lock around the media.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("{path} does not exist; give --size to create it")]
    MissingNoSize { path: PathBuf },
    #[error(
        "{path} is {actual} bytes, not the requested {requested}; omit --size to use it as it is"
    )]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        requested: u64,
    },
    #[error("{path}: size {size} is not a positive multiple of the {block_size}-byte block size")]
    BadSize {
        path: PathBuf,
        size: u64,
        block_size: u32,
    },
    #[error("{path} is neither a regular file nor a block device")]
    NotFileOrDevice { path: PathBuf },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    File,
    BlockDevice,
    Memory,
}

#[derive(Debug)]
pub struct Backend {
    file: File,
    size: u64,
    kind: BackendKind,
    label: String,
    /// A read-only shared mapping of the whole store, when the kernel gives
    /// one: reads copy from it instead of a pread per command (no syscall,
    /// no page-cache lookup). Only the kernel writes these pages (pwrite,
    /// hole punching), so we never hold a reference into them.
    map: Option<Mapping>,
}

#[derive(Debug)]
struct Mapping {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the mapping is read through raw pointers only, by copies whose
// concurrency with the kernel's writes is governed by the namespace lock.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File, len: u64) -> Option<Self> {
        if len == 0 || len > isize::MAX as u64 {
            return None;
        }
        // SAFETY: a fresh read-only shared mapping of a file we keep open.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        (p != libc::MAP_FAILED).then(|| Mapping {
            ptr: p as *const u8,
            len: len as usize,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BackendError + '_ {
    move |error| BackendError::Io {
        path: path.to_path_buf(),
        error,
    }
}

impl Backend {
    /// Opens a file or block device; a missing file is created sparse when `size` is given.
    pub fn open(path: &Path, size: Option<u64>, block_size: u32) -> Result<Self, BackendError> {
        let check = |s: u64| {
            if s == 0 || !s.is_multiple_of(block_size as u64) {
                Err(BackendError::BadSize {
                    path: path.to_path_buf(),
                    size: s,
                    block_size,
                })
            } else {
                Ok(())
            }
        };
        let exists = path.exists();
        if !exists {
            let Some(size) = size else {
                return Err(BackendError::MissingNoSize {
                    path: path.to_path_buf(),
                });
            };
            check(size)?;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(io_err(path))?;
            f.set_len(size).map_err(io_err(path))?;
            let map = Mapping::new(&f, size);
            return Ok(Self {
                file: f,
                size,
                kind: BackendKind::File,
                label: path.display().to_string(),
                map,
            });
        }
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        let ft = f.metadata().map_err(io_err(path))?.file_type();
        let kind = if ft.is_file() {
            BackendKind::File
        } else if ft.is_block_device() {
            BackendKind::BlockDevice
        } else {
            return Err(BackendError::NotFileOrDevice {
                path: path.to_path_buf(),
            });
        };
        let actual = f.seek(SeekFrom::End(0)).map_err(io_err(path))?;
        if let Some(req) = size {
            if req != actual {
                return Err(BackendError::SizeMismatch {
                    path: path.to_path_buf(),
                    actual,
                    requested: req,
                });
            }
        }
        // A device or file whose size is not a block multiple exposes the whole blocks only.
        let usable = actual - actual % block_size as u64;
        check(usable)?;
        let map = Mapping::new(&f, usable);
        Ok(Self {
            file: f,
            size: usable,
            kind,
            label: path.display().to_string(),
            map,
        })
    }

    /// Memory-backed storage: an anonymous memfd, so pages are allocated on
    /// first write and holes can be punched like in a file.
    pub fn memory(size: u64, block_size: u32) -> Result<Self, BackendError> {
        let path = PathBuf::from("memory");
        if size == 0 || !size.is_multiple_of(block_size as u64) {
            return Err(BackendError::BadSize {
                path,
                size,
                block_size,
            });
        }
        // SAFETY: memfd_create takes a NUL-terminated name and flags; we own the fd it returns.
        let fd = unsafe { libc::memfd_create(c"dase-ns".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(BackendError::Io {
                path,
                error: io::Error::last_os_error(),
            });
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(|error| BackendError::Io {
            path: path.clone(),
            error,
        })?;
        let map = Mapping::new(&file, size);
        Ok(Self {
            file,
            size,
            kind: BackendKind::Memory,
            label: "memory".into(),
            map,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Appends `len` bytes read at `offset` to `out` without zero-filling
    /// the space first: the read path's one copy, straight into the buffer
    /// that goes to the socket.
    pub fn read_append(
        &self,
        out: &mut bytes::BytesMut,
        len: usize,
        offset: u64,
    ) -> io::Result<()> {
        out.reserve(len);
        if let Some(m) = &self.map {
            if (offset as usize)
                .checked_add(len)
                .is_some_and(|end| end <= m.len)
            {
                // SAFETY: the source lies inside the mapping (checked above),
                // the destination is spare capacity reserved above, and the
                // two cannot overlap; then exactly `len` bytes are initialised.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        m.ptr.add(offset as usize),
                        out.spare_capacity_mut().as_mut_ptr().cast(),
                        len,
                    );
                    out.set_len(out.len() + len);
                }
                return Ok(());
            }
        }
        let mut done = 0;
        while done < len {
            let spare = out.spare_capacity_mut();
            // SAFETY: pread writes at most `len - done` bytes into spare
            // capacity we own; no reference to uninitialised memory is made.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    spare.as_mut_ptr().cast(),
                    len - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past the end of the backing store",
                ));
            }
            // SAFETY: the kernel initialised exactly n bytes.
            unsafe { out.set_len(out.len() + n as usize) };
            done += n as usize;
        }
        Ok(())
    }

    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> io::Result<()> {
        if self.kind == BackendKind::Memory {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Deallocates a range; afterwards it reads as zeros.
    pub fn deallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero_range(offset, len)
    }

    /// Zeroes a range, punching a hole where the media supports it.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: plain syscall on an fd we own; offset and len are checked by the caller.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {
                // Media without hole punching: write zeros.
                let zeros = vec![0u8; (len as usize).min(1 << 20)];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64) as usize;
                    self.file.write_all_at(&zeros[..n], offset + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            _ => Err(e),
        }
    }
}

/// Parses a size such as `4096`, `64k`, `512M`, `2G`, `1T`, `128KiB` (binary
/// multiples). The one size syntax of every `dase` command.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid size '{s}': expected a number with an optional k/M/G/T suffix")
    })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        "p" | "pb" | "pib" => 1 << 50,
        _ => {
            return Err(format!(
                "invalid size '{s}': unknown unit '{unit}' (use k, M, G, T or P)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size '{s}': too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert!(parse_size("12q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn memory_backend_round_trips_and_punches() {
        let b = Backend::memory(1 << 20, 4096).unwrap();
        b.write_at(&[7u8; 8192], 4096).unwrap();
        let mut r = [0u8; 8192];
        b.read_at(&mut r, 4096).unwrap();
        assert!(r.iter().all(|&x| x == 7));
        b.deallocate(4096, 4096).unwrap();
        b.read_at(&mut r, 4096).unwrap();
        assert!(r[..4096].iter().all(|&x| x == 0) && r[4096..].iter().all(|&x| x == 7));
    }

    #[test]
    fn missing_file_without_size_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let e = Backend::open(&d.path().join("nope"), None, 512).unwrap_err();
        assert!(e.to_string().contains("give --size"), "{e}");
        let b = Backend::open(&d.path().join("new"), Some(1 << 20), 512).unwrap();
        assert_eq!(b.size(), 1 << 20);
        let e = Backend::open(&d.path().join("new"), Some(2 << 20), 512).unwrap_err();
        assert!(matches!(e, BackendError::SizeMismatch { .. }));
    }
}
