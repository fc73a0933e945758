//! Bounds-checked little-endian reads from a byte slice.

/// `N` bytes at `off`, if they lie inside `b`.
pub(crate) fn array_at<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    let end = off.checked_add(N)?;
    b.get(off..end)?.try_into().ok()
}

/// The little-endian `u16` at `off`.
pub(crate) fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    array_at(b, off).map(u16::from_le_bytes)
}

/// The little-endian `u32` at `off`.
pub(crate) fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    array_at(b, off).map(u32::from_le_bytes)
}

/// The little-endian `u64` at `off`.
pub(crate) fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    array_at(b, off).map(u64::from_le_bytes)
}

/// `len` bytes at `off` (both from the file, so 64-bit), if inside `b`.
pub(crate) fn range(b: &[u8], off: u64, len: u64) -> Option<&[u8]> {
    let off = usize::try_from(off).ok()?;
    let len = usize::try_from(len).ok()?;
    b.get(off..off.checked_add(len)?)
}

/// The NUL-terminated string at `off` of a string table, at most `max`
/// bytes long (without its NUL); `None` when it has no NUL within that.
pub(crate) fn cstr_at(table: &[u8], off: usize, max: usize) -> Option<&[u8]> {
    let rest = table.get(off..)?;
    let window = rest.get(..rest.len().min(max.saturating_add(1)))?;
    let end = window.iter().position(|&c| c == 0)?;
    window.get(..end)
}
