//! Linux errno values, as the uAPI returns them.
//!
//! iommufd's contract is Linux's: the same input gives the same errno. The
//! numbers are the x86_64 Linux ones (`asm-generic/errno-base.h`,
//! `errno.h`).

use core::fmt;

/// A Linux errno.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

macro_rules! errnos {
    ($($name:ident = $val:literal, $text:literal;)*) => {
        impl Errno {
            $(#[doc = $text] pub const $name: Errno = Errno($val);)*

            /// The symbolic name ("EINVAL"), or "E?" for an unknown value.
            pub fn name(self) -> &'static str {
                match self.0 {
                    $($val => stringify!($name),)*
                    _ => "E?",
                }
            }
        }
    };
}

errnos! {
    EPERM = 1, "Operation not permitted.";
    ENOENT = 2, "No such object.";
    EINTR = 4, "Interrupted.";
    EIO = 5, "I/O error.";
    ENXIO = 6, "No such device or address.";
    E2BIG = 7, "Argument too big (non-zero bytes past the known struct).";
    EBADF = 9, "Bad file descriptor.";
    EAGAIN = 11, "Try again.";
    ENOMEM = 12, "Out of memory (or over the pinned-page limit).";
    EFAULT = 14, "Bad user address.";
    EBUSY = 16, "Object or range in use.";
    EEXIST = 17, "Already exists.";
    EXDEV = 18, "Cross-device link.";
    ENODEV = 19, "No such device.";
    EINVAL = 22, "Invalid argument.";
    ENOTTY = 25, "Unknown ioctl.";
    ENOSPC = 28, "No space (no free IOVA).";
    ESPIPE = 29, "Illegal seek (a fault queue read or write not of whole records).";
    ERANGE = 34, "Out of range.";
    EBADE = 52, "Invalid exchange (selftest: pages differ from the user VA).";
    EDEADLK = 35, "Resource deadlock (an access did not release its pins).";
    EOVERFLOW = 75, "Value too large.";
    EBADFD = 77, "File descriptor in bad state (not an access fd).";
    EMSGSIZE = 90, "Message too long (output array too small).";
    EOPNOTSUPP = 95, "Operation not supported.";
    EADDRINUSE = 98, "Address in use.";
    ETIMEDOUT = 110, "Timed out.";
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Result of an iommufd operation.
pub type Result<T> = core::result::Result<T, Errno>;
