//! Decoding arbitrary bytes never panics, and short inputs read as zero-extended.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use proptest::prelude::*;
use ukvmi_wire::*;

fn check<T: FromBytes + IntoBytes + Immutable + Copy>(bytes: &[u8]) {
    let v: T = read_zext(bytes);
    let out = v.as_bytes();
    let n = out.len().min(bytes.len());
    assert_eq!(&out[..n], &bytes[..n]);
    assert!(out[n..].iter().all(|&b| b == 0));
}

proptest! {
    #[test]
    fn read_zext_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
        check::<MsgHdr>(&bytes);
        check::<VcpuHdr>(&bytes);
        check::<VcpuEvent>(&bytes);
        check::<VcpuGetRegistersReply>(&bytes);
        check::<KvmXsave>(&bytes);
        check::<handshake::ToIntrospector>(&bytes);
        let _ = tail(&bytes, 16);
        let _ = msg::name(u16::from_le_bytes([bytes.first().copied().unwrap_or(0), 0]));
    }

    #[test]
    fn errno_decoding_is_total(v in any::<i32>()) {
        if let Some(e) = KvmErrno::from_wire(v) {
            prop_assert_eq!(e.wire(), v);
        }
    }
}
