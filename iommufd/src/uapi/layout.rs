//! How a uAPI struct is modelled: little-endian fields at the header's byte
//! offsets, declared once and checked against the Rust layout.
//!
//! Each argument struct is a `#[repr(C)]` Rust struct whose fields carry the
//! header's names. Because the crate forbids `unsafe`, nothing is
//! transmuted: every struct has `SIZE`, `read(&[u8])` and `write(&mut [u8])`
//! which (de)serialise little-endian fields at the header's byte offsets.
//! The offsets are written down once, in the field list given to the
//! `uapi_struct!` macro, and compile-time asserts check that the Rust layout
//! (`size_of`, `offset_of!`) agrees with them, so a typo in either place
//! fails the build. The same list gives each struct's [`UapiStruct::FIELDS`]
//! (name, offset, size of every field), which tools that decode recorded
//! arguments use instead of keeping offsets of their own.
//!
//! `read` treats bytes beyond the slice as zero and `write` stores only the
//! bytes that fit in the slice (a field cut by the end is written partially,
//! low bytes first). That is exactly a byte copy of a prefix of the struct,
//! which is what the kernel does when user and kernel sizes differ.

/// A plain integer (or byte array) field that can live in a uAPI struct.
pub trait LeField: Copy {
    /// Reads the field at `off`; bytes past the end of `b` read as zero.
    fn get(b: &[u8], off: usize) -> Self;
    /// Writes the field at `off`; bytes past the end of `b` are dropped.
    fn put(self, b: &mut [u8], off: usize);
}

fn get_bytes<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        if let Some(v) = off.checked_add(i).and_then(|p| b.get(p)) {
            *o = *v;
        }
    }
    out
}

fn put_bytes(src: &[u8], b: &mut [u8], off: usize) {
    for (i, v) in src.iter().enumerate() {
        if let Some(d) = off.checked_add(i).and_then(|p| b.get_mut(p)) {
            *d = *v;
        }
    }
}

macro_rules! le_int {
    ($($t:ty),*) => {$(
        impl LeField for $t {
            fn get(b: &[u8], off: usize) -> Self {
                <$t>::from_le_bytes(get_bytes(b, off))
            }
            fn put(self, b: &mut [u8], off: usize) {
                put_bytes(&self.to_le_bytes(), b, off)
            }
        }
    )*};
}
le_int!(u8, u16, u32, u64, i32);

impl<const N: usize> LeField for [u8; N] {
    fn get(b: &[u8], off: usize) -> Self {
        get_bytes(b, off)
    }
    fn put(self, b: &mut [u8], off: usize) {
        put_bytes(&self, b, off)
    }
}

/// One field of a uAPI struct, as its declaration gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldLayout {
    /// The header's field name, prefixed with the union member's name for
    /// the members of `iommu_test_cmd`'s union (`"mock_domain.out_hwpt_id"`).
    pub name: &'static str,
    /// Byte offset from the start of the struct.
    pub offset: usize,
    /// Size in bytes.
    pub size: usize,
}

/// What every `uapi_struct!` struct provides besides its `read`/`write`.
pub trait UapiStruct {
    /// `sizeof` of the C struct.
    const SIZE: usize;
    /// The C struct name.
    const C_NAME: &'static str;
    /// Every field in declaration (offset) order.
    const FIELDS: &'static [FieldLayout];
}

/// Size of a field's type, given a projection from the struct to the
/// field; never calls the closure, so it works in constants.
#[doc(hidden)]
pub const fn size_of_projection<S, T, F: FnOnce(&S) -> T>(_f: &F) -> usize {
    core::mem::size_of::<T>()
}

/// Declares a `#[repr(C)]` uAPI struct from one field list `name: type =
/// offset`, with `SIZE`, `FIELDS`, `read`, `write` and compile-time layout
/// asserts for the total size and for every field offset. A union member
/// of `iommu_test_cmd` names itself (`member "mock_domain"`) so its field
/// names carry the prefix the header's `cmd.mock_domain.x` would.
macro_rules! uapi_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident ($cname:literal, size $size:literal $(, member $member:literal)?) {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty = $off:literal ),* $(,)?
        }
    ) => {
        uapi_struct! {
            @emit [$($member)?]
            $(#[$meta])*
            pub struct $name ($cname, size $size) {
                $( $(#[$fmeta])* $field : $ty = $off ),*
            }
        }
    };
    (
        @emit $member:tt
        $(#[$meta:meta])*
        pub struct $name:ident ($cname:literal, size $size:literal) {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty = $off:literal ),*
        }
    ) => {
        $(#[$meta])*
        #[doc = concat!("\n\nC name: `struct ", $cname, "`, ", stringify!($size), " bytes.")]
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $name {
            /// `sizeof` of the C struct.
            pub const SIZE: usize = $size;
            /// The C struct name.
            pub const C_NAME: &'static str = $cname;

            /// Decodes the struct from its little-endian byte image; bytes
            /// missing at the end of `bytes` read as zero.
            pub fn read(bytes: &[u8]) -> Self {
                Self { $( $field: <$ty as $crate::uapi::LeField>::get(bytes, $off), )* }
            }

            /// Encodes the struct into `bytes` (padding bytes are left
            /// untouched; bytes past the end of `bytes` are dropped).
            pub fn write(&self, bytes: &mut [u8]) {
                $( $crate::uapi::LeField::put(self.$field, bytes, $off); )*
            }

            /// The byte image of the struct, `SIZE` bytes, padding zeroed.
            pub fn to_bytes(&self) -> alloc::vec::Vec<u8> {
                let mut v = alloc::vec![0u8; $size];
                self.write(&mut v);
                v
            }
        }

        impl $crate::uapi::UapiStruct for $name {
            const SIZE: usize = $size;
            const C_NAME: &'static str = $cname;
            const FIELDS: &'static [$crate::uapi::FieldLayout] = &[$(
                $crate::uapi::FieldLayout {
                    name: uapi_field_name!($member, $field),
                    offset: $off,
                    size: $crate::uapi::layout::size_of_projection(&|s: &$name| s.$field),
                },
            )*];
        }

        impl Default for $name {
            /// All fields zero.
            fn default() -> Self {
                Self::read(&[])
            }
        }

        impl $crate::uapi::LeField for $name {
            fn get(b: &[u8], off: usize) -> Self {
                Self::read(b.get(off..).unwrap_or(&[]))
            }
            fn put(self, b: &mut [u8], off: usize) {
                if let Some(s) = b.get_mut(off..) {
                    self.write(s)
                }
            }
        }

        const _: () = assert!(core::mem::size_of::<$name>() == $size);
        $( const _: () = assert!(core::mem::offset_of!($name, $field) == $off); )*
    };
}

/// A field's name in [`FieldLayout`]: plain, or after its union member's.
macro_rules! uapi_field_name {
    ([], $field:ident) => {
        stringify!($field)
    };
    ([$member:literal], $field:ident) => {
        concat!($member, ".", stringify!($field))
    };
}

/// Offset of the end of a field (`offsetofend`), for the tables.
macro_rules! end_of {
    ($t:ty, $f:ident) => {
        core::mem::offset_of!($t, $f) + $crate::uapi::layout::size_of_projection(&|s: &$t| s.$f)
    };
}

#[cfg(test)]
mod tests {
    use crate::uapi::*;

    #[test]
    fn short_read_and_write_are_prefix_copies() {
        let m = IommuIoasUnmap { size: 24, ioas_id: 2, iova: 0x1000, length: 0x0102_0304_0506_0708 };
        let mut short = [0u8; 20];
        m.write(&mut short);
        assert_eq!(&short[..], &m.to_bytes()[..20]);
        let r = IommuIoasUnmap::read(&short);
        assert_eq!(r.length, 0x0506_0708);
        assert_eq!(r.iova, 0x1000);
    }

    /// Every struct's field list tiles it in order: offsets increase, no
    /// field overlaps the next or runs past the end.
    fn tiles<T: UapiStruct>() {
        let mut end = 0;
        for f in T::FIELDS {
            assert!(f.offset >= end, "{}: {} overlaps the field before it", T::C_NAME, f.name);
            end = f.offset + f.size;
        }
        assert!(end <= T::SIZE, "{}: fields run past the end", T::C_NAME);
    }

    #[test]
    fn field_lists_describe_the_structs() {
        assert_eq!(
            IommuIoasMap::FIELDS.iter().map(|f| (f.name, f.offset, f.size)).collect::<alloc::vec::Vec<_>>(),
            [
                ("size", 0, 4),
                ("flags", 4, 4),
                ("ioas_id", 8, 4),
                ("__reserved", 12, 4),
                ("user_va", 16, 8),
                ("length", 24, 8),
                ("iova", 32, 8)
            ]
        );
        assert_eq!(IommuTestMockDomain::FIELDS[1].name, "mock_domain.out_hwpt_id");
        assert_eq!(IommuTestCmd::FIELDS[4], FieldLayout { name: "payload", offset: 16, size: 48 });
        assert_eq!(vfio::VfioIommuType1InfoCapIovaRange::FIELDS[0].size, 8);
        tiles::<IommuDestroy>();
        tiles::<IommuHwptAlloc>();
        tiles::<IommuHwInfo>();
        tiles::<IommuTestCmd>();
        tiles::<IommuTestDirty>();
        tiles::<vfio::VfioIommuType1Info>();
    }
}
